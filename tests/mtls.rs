//! Refusals: every way a peer can fail authentication, each with a clear log line, and nothing
//! reaching the backend in any of them.

mod harness;

use std::io::Write;
use std::process::{Command, Stdio};

use harness::{Backend, Legate, Pki, connect, read_all};
use legate::certs::{LeafSpec, Usage, Validity};

/// A consumer that sends a request through `client` and finds the connection closed unanswered.
fn consumer_is_turned_away(client: &Legate) {
    let mut s = connect(client.addr());
    let _ = s.write_all(b"*1\r\n$4\r\nPING\r\n");
    assert_eq!(
        harness::read_until_closed(&mut s),
        b"",
        "the consumer got an answer"
    );
}

/// Checks the backend saw no connection once the refusal has been logged.
fn backend_untouched(backend: &Backend) {
    assert_eq!(
        backend.accepted(),
        0,
        "a refused connection reached the backend"
    );
}

/// A client ambassador presenting the certificate issued as `leaf` to a server that allows
/// CN "client": the consumer is turned away, the server logs a failed handshake, and nothing
/// reaches the backend. Returns the server's log line.
fn refused_at_handshake(pki: &Pki, leaf: &str) -> String {
    let backend = Backend::echo(b"");
    let server = Legate::server(pki, &backend.target(), &["--allow-cn=client"]);
    let client = Legate::client(pki, leaf, server.addr(), &[]);
    consumer_is_turned_away(&client);
    let line = server.log.wait_for(&["outcome=handshake_failed"]);
    backend_untouched(&backend);
    line
}

#[test]
fn a_client_without_certificate_is_refused() {
    let pki = Pki::new();
    let backend = Backend::echo(b"");
    let server = Legate::server(&pki, &backend.target(), &["--allow-all"]);
    let mut child = Command::new("openssl")
        .args(["s_client", "-quiet", "-connect"])
        .arg(server.addr().to_string())
        .arg("-CAfile")
        .arg(pki.ca_cert())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl is needed (apt-get install openssl)");
    let _ = child.stdin.take().unwrap().write_all(b"PING\r\n");
    let line = server
        .log
        .wait_for(&["connection failed", "outcome=handshake_failed"]);
    assert!(line.contains("peer sent no certificates"), "{line}");
    let _ = child.kill();
    let _ = child.wait();
    backend_untouched(&backend);
}

#[test]
fn a_client_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let other = Pki::new();
    let backend = Backend::echo(b"");
    let server = Legate::server(&pki, &backend.target(), &["--allow-all"]);
    let client = Legate::start(
        &[
            "client".into(),
            "--listen=127.0.0.1:0".into(),
            format!("--target=localhost:{}", server.addr().port()),
            format!("--cert={}", other.leaf("client").cert.display()),
            format!("--key={}", other.leaf("client").key.display()),
            format!("--cacert={}", pki.ca_cert().display()),
        ],
        1,
    );
    consumer_is_turned_away(&client);
    let line = server.log.wait_for(&["outcome=handshake_failed"]);
    assert!(line.contains("UnknownIssuer"), "{line}");
    let line = client.log.wait_for(&["connection failed"]);
    assert!(line.contains("server ended the connection"), "{line}");
    backend_untouched(&backend);
}

#[test]
fn an_identity_not_allowed_is_refused() {
    let pki = Pki::new();
    pki.issue("intruder", &LeafSpec::new("intruder", Usage::Client));
    let backend = Backend::echo(b"");
    let server = Legate::server(
        &pki,
        &backend.target(),
        &["--allow-cn=client", "--allow-uri=spiffe://td/app/*"],
    );
    let client = Legate::client(&pki, "intruder", server.addr(), &[]);
    consumer_is_turned_away(&client);
    let line = server.log.wait_for(&["outcome=unauthorized"]);
    assert!(
        line.contains("CN=intruder") && line.contains("not allowed"),
        "{line}"
    );
    let line = client.log.wait_for(&["connection failed"]);
    assert!(line.contains("did not admit this client"), "{line}");
    backend_untouched(&backend);
}

#[test]
fn an_allowed_uri_wildcard_admits_a_spiffe_identity() {
    let pki = Pki::new();
    let mut spec = LeafSpec::new("svc", Usage::Client);
    spec.uris = vec!["spiffe://td/app/web".into()];
    pki.issue("svc", &spec);
    let backend = Backend::echo(b"hi:");
    let server = Legate::server(&pki, &backend.target(), &["--allow-uri=spiffe://td/app/*"]);
    let client = Legate::client(&pki, "svc", server.addr(), &[]);
    let mut s = connect(client.addr());
    s.write_all(b"x").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut s), b"hi:x");
    server
        .log
        .wait_for(&["outcome=ok", "identity=\"spiffe://td/app/web\""]);
}

#[test]
fn an_expired_client_certificate_is_refused() {
    let pki = Pki::new();
    let mut spec = LeafSpec::new("client", Usage::Client);
    spec.validity = Validity::expired();
    pki.issue("old", &spec);
    let line = refused_at_handshake(&pki, "old");
    assert!(line.contains("certificate expired"), "{line}");
}

#[test]
fn plaintext_to_the_tls_port_is_refused() {
    let pki = Pki::new();
    let backend = Backend::echo(b"");
    let server = Legate::server(&pki, &backend.target(), &["--allow-all"]);
    let mut s = connect(server.addr());
    s.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    // The server answers with a TLS alert at most, never with the service's reply.
    let reply = read_all(&mut s);
    assert!(!reply.windows(4).any(|w| w == b"PONG"));
    let line = server.log.wait_for(&["outcome=handshake_failed"]);
    assert!(line.contains("peer does not speak TLS"), "{line}");
    backend_untouched(&backend);
}

#[test]
fn a_server_with_the_wrong_name_is_refused_by_the_client() {
    let pki = Pki::new();
    let backend = Backend::echo(b"");
    let server = Legate::server(&pki, &backend.target(), &["--allow-all"]);
    let client = Legate::client(
        &pki,
        "client",
        server.addr(),
        &["--override-server-name=redis.example.com"],
    );
    consumer_is_turned_away(&client);
    let line = client.log.wait_for(&["outcome=handshake_failed"]);
    assert!(
        line.contains("not valid for name") && line.contains("redis.example.com"),
        "{line}"
    );
    backend_untouched(&backend);
}

#[test]
fn a_server_from_another_ca_is_refused_by_the_client() {
    let pki = Pki::new();
    let other = Pki::new();
    let backend = Backend::echo(b"");
    let server = Legate::server(&other, &backend.target(), &["--allow-all"]);
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    consumer_is_turned_away(&client);
    let line = client.log.wait_for(&["outcome=handshake_failed"]);
    assert!(line.contains("UnknownIssuer"), "{line}");
    backend_untouched(&backend);
}

#[test]
fn a_server_failing_the_verify_pins_is_refused_by_the_client() {
    let pki = Pki::new();
    let backend = Backend::echo(b"");
    let server = Legate::server(&pki, &backend.target(), &["--allow-all"]);
    let client = Legate::client(
        &pki,
        "client",
        server.addr(),
        &["--verify-cn=cache-primary"],
    );
    consumer_is_turned_away(&client);
    let line = client.log.wait_for(&["outcome=unauthorized"]);
    assert!(
        line.contains("does not match the --verify-* pins"),
        "{line}"
    );
    backend_untouched(&backend);
    // And the matching pin lets the same connection through.
    let client = Legate::client(&pki, "client", server.addr(), &["--verify-cn=server"]);
    let mut s = connect(client.addr());
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut s), b"");
    client.log.wait_for(&["outcome=ok"]);
    assert_eq!(backend.accepted(), 1);
}

#[test]
fn a_client_certificate_not_yet_valid_is_refused() {
    let pki = Pki::new();
    let mut spec = LeafSpec::new("client", Usage::Client);
    spec.validity = Validity::not_yet_valid();
    pki.issue("early", &spec);
    let line = refused_at_handshake(&pki, "early");
    assert!(line.contains("not valid yet"), "{line}");
}

#[test]
fn a_server_certificate_used_as_a_client_certificate_is_refused() {
    let pki = Pki::new();
    // CN "client", but issued for server authentication only: the EKU forbids client use.
    let mut spec = LeafSpec::new("client", Usage::Server);
    spec.names = vec!["localhost".into()];
    pki.issue("wrong-usage", &spec);
    let line = refused_at_handshake(&pki, "wrong-usage");
    assert!(
        line.contains("does not allow extended key usage for client authentication"),
        "{line}"
    );
}

#[test]
fn a_self_signed_client_certificate_is_refused() {
    let pki = Pki::new();
    // An end-entity certificate that is its own issuer, with the expected name and usage.
    let leaf = pki.leaf("selfie");
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=client"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .args(["-addext", "extendedKeyUsage=clientAuth"])
        .arg("-keyout")
        .arg(&leaf.key)
        .arg("-out")
        .arg(&leaf.cert)
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(made.success());
    let line = refused_at_handshake(&pki, "selfie");
    assert!(
        line.contains("UnknownIssuer") || line.contains("unknown issuer"),
        "{line}"
    );
}

#[test]
fn allow_ip_admits_a_client_by_its_ip_san_and_refuses_others() {
    let pki = Pki::new();
    let mut spec = LeafSpec::new("worker", Usage::Client);
    spec.names = vec!["10.1.2.3".into()];
    pki.issue("worker", &spec);
    let backend = Backend::echo(b"ok:");
    // ghostunnel's hidden spelling, --allow-ip-san, means the same.
    let server = Legate::server(
        &pki,
        &backend.target(),
        &["--allow-ip=fd00::7", "--allow-ip-san=10.1.2.3"],
    );
    let client = Legate::client(&pki, "worker", server.addr(), &[]);
    assert_eq!(harness::exchange(client.addr(), b"hi"), b"ok:hi");

    let backend = Backend::echo(b"");
    let server = Legate::server(&pki, &backend.target(), &["--allow-ip=10.9.9.9"]);
    let client = Legate::client(&pki, "worker", server.addr(), &[]);
    consumer_is_turned_away(&client);
    let line = server.log.wait_for(&["outcome=unauthorized"]);
    assert!(line.contains("CN=worker"), "{line}");
    backend_untouched(&backend);
}

#[test]
fn verify_ip_pins_the_servers_ip_san() {
    let pki = Pki::new();
    let backend = Backend::echo(b"ok:");
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    // The server leaf carries the IP SAN 127.0.0.1.
    let client = Legate::client(
        &pki,
        "client",
        server.addr(),
        &["--verify-ip-san=127.0.0.1"],
    );
    assert_eq!(harness::exchange(client.addr(), b"hi"), b"ok:hi");

    let client = Legate::client(&pki, "client", server.addr(), &["--verify-ip=10.9.9.9"]);
    consumer_is_turned_away(&client);
    let line = client.log.wait_for(&["outcome=unauthorized"]);
    assert!(
        line.contains("does not match the --verify-* pins"),
        "{line}"
    );
}

#[test]
fn an_allow_ip_that_is_not_an_address_is_one_clear_line() {
    let out = Command::new(harness::legate_bin())
        .args(["server", "--listen=127.0.0.1:0", "--target=127.0.0.1:1"])
        .args(Pki::new().flags("server"))
        .arg("--allow-ip=10.0.0.300")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--allow-ip \"10.0.0.300\" is not an IP address"),
        "{err}"
    );
}
