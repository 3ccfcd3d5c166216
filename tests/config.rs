//! `legate run --config`: many tunnels in one process, and every config problem at once.

mod harness;

use std::io::Write;
use std::net::Shutdown;
use std::process::Command;

use harness::{Backend, Legate, Pki, connect, free_port, legate_bin, read_all, write_config};

#[test]
fn three_tunnels_run_in_one_process() {
    let pki = Pki::new();
    let main = Backend::echo(b"main:");
    let jobs = Backend::echo(b"jobs:");
    let port = free_port();
    let text = format!(
        r#"
shutdown_timeout = "5s"

[tunnels.edge]
side = "server"
listen = "127.0.0.1:{port}"
target = "{main}"
routes = {{ jobs = "{jobs}" }}
allow_cn = ["client"]
{server_files}
[tunnels.app]
side = "client"
listen = "127.0.0.1:0"
target = "localhost:{port}"
{client_files}
[tunnels.worker]
side = "client"
listen = "127.0.0.1:0"
target = "localhost:{port}"
route = "jobs"
{client_files}"#,
        main = main.target(),
        jobs = jobs.target(),
        server_files = pki.toml_files("server"),
        client_files = pki.toml_files("client"),
    );
    let config = write_config(pki.dir.path(), &text);
    let check = Command::new(legate_bin())
        .args(["run", "--check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    assert_eq!(
        String::from_utf8_lossy(&check.stdout),
        "config OK: 3 tunnel(s)\n"
    );

    let legate = Legate::start(
        &[
            "run".into(),
            "--config".into(),
            config.display().to_string(),
        ],
        3,
    );
    for (tunnel, reply) in [("app", &b"main:hi"[..]), ("worker", b"jobs:hi")] {
        let mut s = connect(legate.addrs[tunnel]);
        s.write_all(b"hi").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_all(&mut s), reply, "through tunnel {tunnel}");
    }
    legate
        .log
        .wait_for(&["tunnel=edge", "outcome=ok", "route=\"jobs\""]);
    legate.log.wait_for(&["tunnel=worker", "outcome=ok"]);
}

#[test]
fn a_bad_config_reports_every_error_at_once_and_exits_2() {
    let pki = Pki::new();
    let text = format!(
        r#"
[tunnels.one]
side = "server"
listen = "127.0.0.1:http"
target = "10.1.2.3:6379"
{server_files}
[tunnels.two]
side = "client"
listen = "0.0.0.0:6380"
target = "server.internal:8443"
close_timeout = "forever"
{client_files}
[tunnels.three]
side = "sideways"
"#,
        server_files = pki.toml_files("server"),
        client_files = pki.toml_files("client"),
    );
    let config = write_config(pki.dir.path(), &text);
    for args in [&["run", "--config"][..], &["run", "--check", "--config"]] {
        let out = Command::new(legate_bin())
            .args(args)
            .arg(&config)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        for expected in [
            "tunnel \"one\": --listen: address \"127.0.0.1:http\": port \"http\" is not a number",
            "tunnel \"one\": no access rule",
            "tunnel \"one\": target 10.1.2.3:6379 is not a loopback address",
            "tunnel \"two\": --close-timeout \"forever\" is not a duration",
            "tunnel \"two\": --listen 0.0.0.0:6380 is not a loopback address",
            "tunnel \"three\": TOML parse error at line 20, column 8: 20 | side = \"sideways\": unknown variant `sideways`",
        ] {
            assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
        }
        // One line per problem, each prefixed with the file.
        assert!(err.lines().all(|l| l.starts_with("legate: ")), "{err}");
        assert_eq!(err.lines().count(), 6, "{err}");
    }
}

#[test]
fn check_loads_certificates_too() {
    let pki = Pki::new();
    let text = format!(
        r#"
[tunnels.edge]
side = "server"
listen = "127.0.0.1:0"
target = "127.0.0.1:6379"
allow_all = true
cert = "missing.crt"
key = {key:?}
cacert = {ca:?}
"#,
        key = pki.leaf("server").key.display().to_string(),
        ca = pki.ca_cert().display().to_string(),
    );
    let config = write_config(pki.dir.path(), &text);
    let out = Command::new(legate_bin())
        .args(["run", "--check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    // Relative paths are resolved against the config file's directory.
    let missing = pki.path("missing.crt");
    assert!(
        err.contains(&format!("cannot read certificate {}", missing.display())),
        "{err}"
    );
}

#[test]
fn startup_problems_are_one_line_and_exit_2() {
    let pki = Pki::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                format!("--listen={}", taken.local_addr().unwrap()),
                "--target=127.0.0.1:6379".into(),
            ],
            "cannot listen on 127.0.0.1:",
        ),
        (
            vec![
                "--listen=127.0.0.1:0".into(),
                "--target=no-such-host.invalid:6379".into(),
                "--unsafe-target".into(),
            ],
            "target no-such-host.invalid:6379 does not resolve",
        ),
        (
            vec![
                "--listen=127.0.0.1:0".into(),
                "--target=127.0.0.1:6379".into(),
                "--connect-timeout=ages".into(),
            ],
            "--connect-timeout \"ages\" is not a duration",
        ),
    ];
    for (args, expected) in cases {
        let out = Command::new(legate_bin())
            .arg("server")
            .args(&args)
            .arg("--allow-all")
            .args(pki.flags("server"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<_> = err.lines().filter(|l| l.starts_with("legate: ")).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(lines[0].contains(expected), "{args:?}: {err}");
    }
}

#[test]
fn every_bad_tls_file_is_reported_at_once() {
    let pki = Pki::new();
    std::fs::write(pki.path("empty.pem"), "").unwrap();
    // Private, so the key check reaches its contents.
    std::fs::set_permissions(
        pki.path("empty.pem"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let out = Command::new(legate_bin())
        .args([
            "server",
            "--listen=127.0.0.1:0",
            "--target=127.0.0.1:6379",
            "--allow-all",
        ])
        .arg(format!("--cert={}", pki.path("nope.crt").display()))
        .arg(format!("--key={}", pki.path("empty.pem").display()))
        .arg(format!("--cacert={}", pki.leaf("server").key.display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<_> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(
        lines[0].contains("cannot read certificate") && lines[0].contains("nope.crt"),
        "{err}"
    );
    assert!(
        lines[1].contains("empty.pem holds no PEM PRIVATE KEY"),
        "{err}"
    );
    assert!(
        lines[2].contains("CA bundle") && lines[2].contains("holds no PEM CERTIFICATE"),
        "{err}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("legate: tunnel \"server\": ")),
        "{err}"
    );
}

#[test]
fn a_key_that_does_not_match_the_certificate_is_refused() {
    let pki = Pki::new();
    let out = Command::new(legate_bin())
        .args(["client", "--listen=127.0.0.1:0", "--target=localhost:1"])
        .arg(format!("--cert={}", pki.leaf("client").cert.display()))
        .arg(format!("--key={}", pki.leaf("server").key.display()))
        .arg(format!("--cacert={}", pki.ca_cert().display()))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("do not fit together"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn skip_resolve_starts_with_a_target_that_does_not_resolve_yet() {
    let pki = Pki::new();
    let server = Legate::server(
        &pki,
        "no-such-host.invalid:6379",
        &["--allow-all", "--unsafe-target", "--skip-resolve"],
    );
    // It serves; a connection finds the target missing and says so.
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    let mut s = connect(client.addr());
    s.write_all(b"hello").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut s), b"");
    let line = server.log.wait_for(&["outcome=dial_failed"]);
    assert!(line.contains("no-such-host.invalid"), "{line}");
}
