//! The `legate` binary: parse flags, set up logging, dispatch to a subcommand.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use legate::cli::{Cli, Command, GenCertsArgs, LogFormat};
use legate::config::{self, Config, ProcessFile, TunnelFile};
use legate::daemon::{self, EXIT_INVALID};
use legate::{certs, tunnel};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let all_quiet = cli.quiet.contains(&legate::log::QuietClass::All);
    init_logging(cli.log_format, all_quiet);
    legate::log::set_quiet(cli.quiet);
    let threads = cli.threads;
    match cli.command {
        Command::Server(args) => serve_flags("server", args.into_file(), threads),
        Command::Client(args) => serve_flags("client", args.into_file(), threads),
        Command::Run(args) => {
            let config = match config::load(&args.config) {
                Ok(c) => c,
                Err(problems) => return invalid(&problems.to_string()),
            };
            if args.check {
                return check(config);
            }
            let config = Config {
                threads: threads.or(config.threads),
                ..config
            };
            serve(config, Some(args.config))
        }
        Command::GenCerts(args) => gen_certs(args),
        Command::Check(args) => check_tunnels(args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "legate", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man => {
            match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => invalid(&format!("cannot write the man page: {e}")),
            }
        }
    }
}

/// `RUST_LOG` decides the levels; without it, info (or warn with `--quiet=all`).
fn init_logging(format: LogFormat, quiet: bool) {
    let default = if quiet { "warn" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
    }
}

/// Reports invalid input: every line of it, then exit 2.
fn invalid(message: &str) -> ExitCode {
    for line in message.lines() {
        eprintln!("legate: {line}");
    }
    ExitCode::from(EXIT_INVALID)
}

fn serve_flags(
    name: &str,
    (file, process): (TunnelFile, ProcessFile),
    threads: Option<usize>,
) -> ExitCode {
    let process = ProcessFile { threads, ..process };
    let env: Vec<(String, String)> = std::env::vars().collect();
    // One tunnel, or one per Docker link (--from-docker-env).
    let tunnels = file.expand(name, &env).and_then(|files| {
        let (mut ok, mut problems) = (Vec::new(), Vec::new());
        for (name, file) in files {
            match file.validate(&name, None) {
                Ok(t) => ok.push(t),
                Err(p) => problems.extend(p),
            }
        }
        if problems.is_empty() {
            Ok(ok)
        } else {
            Err(problems)
        }
    });
    match (tunnels, process.into_config(Vec::new())) {
        (Ok(t), Ok(mut config)) => {
            config.tunnels.extend(t);
            serve(config, None)
        }
        (t, c) => {
            let mut problems = t.err().unwrap_or_default();
            problems.extend(c.err().unwrap_or_default());
            invalid(&problems.join("\n"))
        }
    }
}

/// Runs the daemon; `path` is the config file to reread on reload, if any.
fn serve(config: Config, path: Option<std::path::PathBuf>) -> ExitCode {
    raise_fd_limit();
    let threads = worker_threads(config.threads);
    // One thread: a current-thread runtime, which skips the work-stealing machinery entirely.
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => return invalid(&format!("cannot start the async runtime: {e}")),
    };
    match runtime.block_on(daemon::run(config, path)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => invalid(&format!("{e:#}")),
    }
}

/// Raises the soft limit on open files to the hard limit. Each relayed connection holds two
/// descriptors, and the usual soft limit of 1024 would turn consumers away at about 500
/// connections on a machine that allows far more (Go's runtime and HAProxy do the same).
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, initialised rlimit for this process.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= lim.rlim_max {
            return;
        }
        let before = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
            tracing::debug!(
                from = before,
                to = lim.rlim_max,
                "raised the open-file limit"
            );
        }
    }
}

/// `--threads`, or by default half the CPUs (at least one): an ambassador shares its machine
/// with the application or service it stands next to, and on small machines one thread that
/// never hands work across cores relays faster than two that do (docs/performance.md).
fn worker_threads(configured: Option<usize>) -> usize {
    configured.filter(|n| *n > 0).unwrap_or_else(|| {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cpus / 2).max(1)
    })
}

fn check(config: Config) -> ExitCode {
    let count = config.tunnels.len();
    match daemon::prepare(config.tunnels) {
        Ok(_) => {
            println!("config OK: {count} tunnel(s)");
            ExitCode::SUCCESS
        }
        Err(errors) => invalid(
            &errors
                .iter()
                .map(tunnel::Error::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
        ),
    }
}

/// `legate check`: each client tunnel's steps, as text or JSON; the exit code is the worst.
fn check_tunnels(args: legate::cli::CheckArgs) -> ExitCode {
    use legate::check::{Step, Verdict};
    let tunnels: Result<Vec<config::TunnelConfig>, String> = match &args.config {
        Some(path) => config::load(path)
            .map(|c| {
                c.tunnels
                    .into_iter()
                    .filter(|t| args.tunnel.as_ref().is_none_or(|n| *n == t.name))
                    .collect()
            })
            .map_err(|p| p.to_string()),
        None => {
            let mut argv = vec!["legate".to_string(), "client".into()];
            if !args.client.iter().any(|a| a.starts_with("--listen")) {
                argv.push("--listen=127.0.0.1:0".into());
            }
            argv.extend(args.client.iter().cloned());
            match Cli::try_parse_from(argv) {
                Ok(Cli {
                    command: Command::Client(c),
                    ..
                }) => c
                    .into_file()
                    .0
                    .validate("client", None)
                    .map(|t| vec![t])
                    .map_err(|p| p.join("; ")),
                Ok(_) => Err("give the flags `legate client` takes".into()),
                Err(e) => Err(e.to_string().lines().next().unwrap_or_default().to_string()),
            }
        }
    };
    let results: Vec<(String, Vec<Step>)> = match tunnels {
        Err(e) => vec![(
            String::new(),
            vec![Step {
                step: "config".into(),
                verdict: Verdict::Fail,
                detail: e,
                hint: Some(
                    "fix what is named; `legate run --config FILE --check` says the same".into(),
                ),
            }],
        )],
        Ok(t) if t.is_empty() => {
            return invalid("no such tunnel to check");
        }
        Ok(tunnels) => {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => return invalid(&format!("cannot start the async runtime: {e}")),
            };
            runtime.block_on(async {
                let mut out = Vec::new();
                for t in &tunnels {
                    out.push((t.name.clone(), legate::check::run(t, args.redis).await));
                }
                out
            })
        }
    };
    let worst = results
        .iter()
        .flat_map(|(_, steps)| steps.iter().map(|s| s.verdict))
        .max()
        .unwrap_or(Verdict::Ok);
    if args.json {
        let steps: Vec<serde_json::Value> = results
            .iter()
            .flat_map(|(tunnel, steps)| {
                steps.iter().map(move |s| {
                    serde_json::json!({
                        "tunnel": tunnel,
                        "step": s.step,
                        "verdict": s.verdict.as_str(),
                        "detail": s.detail,
                        "hint": s.hint,
                    })
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(steps));
    } else {
        for (tunnel, steps) in &results {
            if !tunnel.is_empty() {
                println!("tunnel {tunnel}:");
            }
            for s in steps {
                println!("  {:<7} {}: {}", s.verdict.as_str(), s.step, s.detail);
                if let Some(h) = &s.hint {
                    println!("          -> {h}");
                }
            }
        }
    }
    ExitCode::from(worst.exit_code())
}

fn gen_certs(args: GenCertsArgs) -> ExitCode {
    let (server_names, clients) = if args.server_name.is_empty() && args.client.is_empty() {
        (
            vec!["localhost".to_string(), "127.0.0.1".to_string()],
            vec!["client".to_string()],
        )
    } else {
        (args.server_name, args.client)
    };
    let request = certs::GenRequest {
        out: args.out.clone(),
        server_names,
        clients,
        trust_domain: args.trust_domain,
        days: args.days,
        key_type: args.key_type,
        force: args.force,
    };
    let report = match certs::generate(&request) {
        Ok(r) => r,
        Err(e) => return invalid(&e.to_string()),
    };
    let ca = report.ca_cert.display();
    if report.ca_reused {
        println!("reused CA {ca}");
    } else {
        println!(
            "wrote CA {ca} (its key {}/ca.key stays private)",
            args.out.display()
        );
    }
    if let Some((crt, key)) = &report.server {
        println!(
            "wrote server certificate {} and key {}",
            crt.display(),
            key.display()
        );
    }
    for (name, crt, key) in &report.clients {
        println!(
            "wrote client certificate {} and key {} for {name:?}",
            crt.display(),
            key.display()
        );
    }
    println!("\nstart the two sides with:\n");
    if let Some((crt, key)) = &report.server {
        let allow = match report.clients.first() {
            Some((name, _, _)) => format!("--allow-cn={name}"),
            None => "--allow-all".to_string(),
        };
        println!(
            "  legate server --listen=0.0.0.0:8443 --target=127.0.0.1:6379 --cert={} --key={} --cacert={ca} {allow}",
            crt.display(),
            key.display()
        );
    }
    let server_host = request
        .server_names
        .first()
        .map_or("SERVER-HOST", String::as_str);
    for (_, crt, key) in report.clients.iter().take(1) {
        println!(
            "  legate client --listen=127.0.0.1:6380 --target={server_host}:8443 --cert={} --key={} --cacert={ca}",
            crt.display(),
            key.display()
        );
    }
    ExitCode::SUCCESS
}
