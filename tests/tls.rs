//! The TLS the ambassadors negotiate: 1.3 with post-quantum hybrid key exchange by default,
//! 1.2 only when asked, and session resumption on reconnect.

mod harness;

use std::io::Write;
use std::net::Shutdown;
use std::process::{Command, Stdio};

use harness::{Backend, Legate, Pki, connect, read_all};

fn roundtrip(client: &Legate) {
    let mut s = connect(client.addr());
    s.write_all(b"x").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut s), b"ok:x");
}

#[test]
fn tls_13_with_post_quantum_key_exchange_by_default() {
    let pki = Pki::new();
    let backend = Backend::echo(b"ok:");
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    roundtrip(&client);
    let line = server.log.wait_for(&["connection closed", "outcome=ok"]);
    assert!(line.contains("tls=\"TLSv1_3 "), "{line}");
    assert!(line.contains(" X25519MLKEM768 "), "{line}");
}

#[test]
fn reconnects_resume_the_tls_session() {
    let pki = Pki::new();
    let backend = Backend::echo(b"ok:");
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    // Without the pool every consumer connection gets its own TLS connection.
    let client = Legate::client(&pki, "client", server.addr(), &["--pool-size=0"]);
    roundtrip(&client);
    client.log.wait_for(&["connection closed", " full\""]);
    roundtrip(&client);
    let line = client.log.wait_for(&["connection closed", " resumed\""]);
    // A resumed session still proves the server's identity from the original handshake.
    assert!(line.contains("identity=\"CN=server\""), "{line}");
    server
        .log
        .wait_for(&["connection closed", " resumed\"", "CN=client"]);
}

fn s_client_tls12(pki: &Pki, server: &Legate) -> bool {
    let leaf = pki.leaf("client");
    let out = Command::new("openssl")
        .args(["s_client", "-tls1_2", "-connect"])
        .arg(server.addr().to_string())
        .arg("-cert")
        .arg(&leaf.cert)
        .arg("-key")
        .arg(&leaf.key)
        .arg("-CAfile")
        .arg(pki.ca_cert())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.contains("Protocol  : TLSv1.2") && !stdout.contains("Cipher is (NONE)")
}

#[test]
fn tls_12_only_when_asked() {
    let pki = Pki::new();
    let backend = Backend::echo(b"");
    let strict = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    assert!(!s_client_tls12(&pki, &strict));
    let line = strict.log.wait_for(&["outcome=handshake_failed"]);
    assert!(line.contains("TLS 1.3 is required"), "{line}");

    let lenient = Legate::server(
        &pki,
        &backend.target(),
        &["--allow-cn=client", "--min-tls-version=1.2"],
    );
    assert!(s_client_tls12(&pki, &lenient));
    lenient
        .log
        .wait_for(&["connection closed", "tls=\"TLSv1_2 "]);
}

#[test]
fn max_tls_version_12_speaks_only_12_on_both_sides() {
    let pki = Pki::new();
    let backend = Backend::echo(b"ok:");
    // Case-insensitive, as ghostunnel's; a maximum of 1.2 alone lowers the minimum with it.
    let server = Legate::server(
        &pki,
        &backend.target(),
        &["--allow-cn=client", "--max-tls-version=tls1.2"],
    );
    assert!(s_client_tls12(&pki, &server));
    // A client that insists on 1.3 (the default) cannot agree with it...
    let strict = Legate::client(&pki, "client", server.addr(), &[]);
    assert_eq!(harness::exchange(strict.addr(), b"x"), b"");
    strict.log.wait_for(&["outcome=handshake_failed"]);
    // ... one capped at 1.2 too can, and the session says 1.2.
    let capped = Legate::client(&pki, "client", server.addr(), &["--max-tls-version=TLS1.2"]);
    assert_eq!(harness::exchange(capped.addr(), b"hi"), b"ok:hi");
    capped
        .log
        .wait_for(&["connection closed", "outcome=ok", "tls=\"TLSv1_2 "]);
}

#[test]
fn a_tls_version_range_that_is_empty_is_one_clear_line() {
    let out = Command::new(harness::legate_bin())
        .args(["server", "--listen=127.0.0.1:0", "--target=127.0.0.1:1"])
        .args(Pki::new().flags("server"))
        .args([
            "--allow-all",
            "--min-tls-version=TLS1.3",
            "--max-tls-version=TLS1.2",
        ])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no version is left"), "{err}");
}
