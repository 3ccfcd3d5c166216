//! Operator switches: --quiet classes and --disable-authentication.

mod harness;

use std::io::Write;
use std::net::Shutdown;
use std::process::Command;

use harness::{Backend, Legate, Pki, connect, legate_bin, read_all};

fn roundtrip(addr: std::net::SocketAddr, reply: &[u8]) {
    let mut s = connect(addr);
    s.write_all(b"x").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut s), reply);
}

/// One good connection and one plaintext (failed handshake) connection, then a clean stop, so
/// every line the server would write has been written.
fn traffic_then_stop(pki: &Pki, quiet: &str) -> String {
    let backend = Backend::echo(b"ok:");
    let mut server = Legate::server(pki, &backend.target(), &["--allow-cn=client", quiet]);
    let client = Legate::client(pki, "client", server.addr(), &[]);
    roundtrip(client.addr(), b"ok:x");
    client.log.wait_for(&["connection closed"]);
    let mut plain = connect(server.addr());
    plain.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let _ = harness::read_until_closed(&mut plain);
    server.signal(libc::SIGTERM);
    assert_eq!(server.wait_exit(harness::DEADLINE).code(), Some(0));
    server.log.text()
}

#[test]
fn quiet_conns_hides_good_connections_only() {
    let pki = Pki::new();
    let log = traffic_then_stop(&pki, "--quiet=conns");
    assert!(!log.contains("connection closed"), "{log}");
    assert!(log.contains("outcome=handshake_failed"), "{log}");
}

#[test]
fn quiet_handshake_errs_hides_failed_handshakes_only() {
    let pki = Pki::new();
    let log = traffic_then_stop(&pki, "--quiet=handshake-errs");
    assert!(log.contains("connection closed"), "{log}");
    assert!(!log.contains("handshake_failed"), "{log}");
}

#[test]
fn disable_authentication_needs_no_certificates_and_says_so() {
    let pki = Pki::new();
    let backend = Backend::echo(b"open:");
    let leaf = pki.leaf("server");
    let server = Legate::start(
        &[
            "server".into(),
            "--listen=127.0.0.1:0".into(),
            format!("--target={}", backend.target()),
            format!("--cert={}", leaf.cert.display()),
            format!("--key={}", leaf.key.display()),
            "--disable-authentication".into(),
        ],
        1,
    );
    server.log.wait_for(&["WARN", "AUTHENTICATION DISABLED"]);
    // A client with no certificate at all...
    let anonymous = Legate::start(
        &[
            "client".into(),
            "--listen=127.0.0.1:0".into(),
            format!("--target=localhost:{}", server.addr().port()),
            format!("--cacert={}", pki.ca_cert().display()),
            "--disable-authentication".into(),
        ],
        1,
    );
    roundtrip(anonymous.addr(), b"open:x");
    // ...and one with a certificate both get through.
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    roundtrip(client.addr(), b"open:x");
    let line = server.log.wait_for(&["connection closed", "outcome=ok"]);
    assert!(line.contains("identity=\"-\""), "{line}");
}

#[test]
fn allow_rules_with_disable_authentication_are_refused() {
    let pki = Pki::new();
    let out = Command::new(legate_bin())
        .args(["server", "--listen=127.0.0.1:0", "--target=127.0.0.1:1"])
        .args(["--disable-authentication", "--allow-cn=client"])
        .args(pki.flags("server"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot be combined with --disable-authentication"),
        "{err}"
    );
}
