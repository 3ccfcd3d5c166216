//! A serving legate on x86-64 glibc starts itself again with glibc's vector-loop `memcpy` for
//! copies up to 2 MiB (src/main.rs, `memcpy`; docs/performance.md, "The copy that ran at
//! 2 GB/s"), in the same process, and keeps an operator's own setting of that tunable.
#![cfg(all(target_os = "linux", target_env = "gnu", target_arch = "x86_64"))]

mod harness;

use harness::{Backend, Legate, Pki, exchange};

const OURS: &str = "glibc.cpu.x86_rep_movsb_threshold=2097152";

/// GLIBC_TUNABLES as the process with this PID was started (after any exec of its own). The
/// dynamic loader splits the variable at each `:` in place, with NULs, so in
/// `/proc/PID/environ` the tunables after the first follow it as entries of their own.
fn tunables(pid: i32) -> Option<String> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let mut entries = env
        .split(|&b| b == 0)
        .map(|kv| String::from_utf8_lossy(kv).into_owned());
    let first = entries.find_map(|kv| kv.strip_prefix("GLIBC_TUNABLES=").map(str::to_string))?;
    let rest: Vec<String> = entries.take_while(|kv| kv.starts_with("glibc.")).collect();
    Some(
        std::iter::once(first)
            .chain(rest)
            .collect::<Vec<_>>()
            .join(":"),
    )
}

fn server_with(pki: &Pki, target: &str, tunables: &str) -> Legate {
    server_with_env(pki, target, &[("GLIBC_TUNABLES", tunables)])
}

fn server_with_env(pki: &Pki, target: &str, env: &[(&str, &str)]) -> Legate {
    let mut args = vec![
        "server".to_string(),
        "--listen=127.0.0.1:0".into(),
        format!("--target={target}"),
    ];
    args.extend(pki.flags("server"));
    args.push("--allow-cn=client".into());
    Legate::start_with_env(&args, 1, env)
}

#[test]
fn a_serving_legate_restarts_itself_with_the_vector_loop_and_still_carries_bytes() {
    let pki = Pki::new();
    let backend = Backend::echo(b"echo:");
    let server = server_with(&pki, &backend.target(), "");
    // The PID the test spawned now runs with the tunable: the exec kept the process.
    assert_eq!(tunables(server.pid()).as_deref(), Some(OURS));
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    assert_eq!(tunables(client.pid()).as_deref(), Some(OURS));
    assert_eq!(exchange(client.addr(), b"ping"), b"echo:ping");
}

#[test]
fn other_tunables_are_kept_and_an_operators_threshold_wins() {
    let pki = Pki::new();
    let backend = Backend::echo(b"echo:");
    let other = "glibc.malloc.arena_max=2";
    let server = server_with(&pki, &backend.target(), other);
    assert_eq!(
        tunables(server.pid()),
        Some(format!("{other}:{OURS}")),
        "the operator's other tunables stay, ours is added"
    );
    let own = "glibc.cpu.x86_rep_movsb_threshold=8192";
    let server = server_with(&pki, &backend.target(), own);
    assert_eq!(tunables(server.pid()).as_deref(), Some(own));
}

#[test]
fn a_restarted_legate_does_not_restart_again_even_without_the_tunable() {
    // As if the loader had dropped GLIBC_TUNABLES from the restarted process: the marker
    // stops a second exec, and legate serves on.
    let pki = Pki::new();
    let backend = Backend::echo(b"echo:");
    let server = server_with_env(
        &pki,
        &backend.target(),
        &[("GLIBC_TUNABLES", ""), ("LEGATE_RESTARTED_FOR_MEMCPY", "1")],
    );
    assert_eq!(tunables(server.pid()).as_deref(), Some(""));
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    assert_eq!(exchange(client.addr(), b"ping"), b"echo:ping");
}
