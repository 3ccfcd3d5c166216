//! The status listener: /_status and /_metrics over HTTPS with the live certificate or over
//! plain HTTP, and 503 when the target is down.

mod harness;

use std::io::Write;
use std::net::Shutdown;

use harness::{
    Backend, Legate, Pki, cert_der, connect, free_port, http_get, read_all, status_addr,
};

#[test]
fn status_and_metrics_over_https_with_the_live_certificate() {
    let pki = Pki::new();
    let backend = Backend::echo(b"ok:");
    let server = Legate::server(
        &pki,
        &backend.target(),
        &["--allow-cn=client", "--status=127.0.0.1:0"],
    );
    let status = status_addr(&server);
    // Raw, as a ghostunnel client would be: the server's figures below count exactly this one
    // connection.
    let client = Legate::client(&pki, "client", server.addr(), &["--raw"]);
    let mut s = connect(client.addr());
    s.write_all(b"hello").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut s), b"ok:hello");
    server.log.wait_for(&["connection closed", "outcome=ok"]);

    let reply = http_get(status, "/_status", Some(&pki.ca_cert()));
    assert_eq!(reply.code, 200, "{}", reply.body);
    assert_eq!(reply.cert.unwrap(), cert_der(&pki.leaf("server").cert));
    let doc: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(doc["ok"], true);
    assert_eq!(doc["message"], "listening");
    assert_eq!(doc["backend_ok"], true);
    assert_eq!(doc["listen_address"], server.addr().to_string());
    assert_eq!(doc["forward_address"], backend.target());
    assert_eq!(doc["version"], env!("CARGO_PKG_VERSION"));
    // ghostunnel's zero time before the first reload.
    assert_eq!(doc["last_reload"], "0001-01-01T00:00:00Z");

    let metrics = http_get(status, "/_metrics/prometheus", Some(&pki.ca_cert()));
    assert_eq!(metrics.code, 200);
    let text = metrics.body;
    for needle in [
        "legate_connections_total{tunnel=\"server\",side=\"server\",outcome=\"ok\"} 1",
        "legate_bytes_total{tunnel=\"server\",side=\"server\",direction=\"up\"} 5",
        "legate_bytes_total{tunnel=\"server\",side=\"server\",direction=\"down\"} 8",
        "legate_open_connections{tunnel=\"server\",side=\"server\"} 0",
        "legate_handshake_duration_seconds_count{tunnel=\"server\",side=\"server\"} 1",
        "legate_reloads_total{result=\"ok\"} 0",
        "legate_connection_duration_seconds_count{tunnel=\"server\",side=\"server\"} 1",
        "legate_certificate_expiry_timestamp_seconds{tunnel=\"server\",side=\"server\"} ",
        "# TYPE legate_handshake_duration_seconds histogram",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    let again = http_get(status, "/_metrics?format=prometheus", Some(&pki.ca_cert())).body;
    assert!(
        again.contains("# TYPE legate_connections counter"),
        "{again}"
    );
    let json = http_get(status, "/_metrics/legate", Some(&pki.ca_cert()));
    let doc: serde_json::Value = serde_json::from_str(&json.body).unwrap();
    assert_eq!(doc["tunnels"][0]["connections"]["ok"], 1);
    assert_eq!(doc["tunnels"][0]["bytes_down"], 8);
    assert_eq!(http_get(status, "/nope", Some(&pki.ca_cert())).code, 404);

    // After a reload the status listener presents the new certificate: the live one.
    let mut spec = legate::certs::LeafSpec::new("server-next", legate::certs::Usage::Server);
    spec.names = vec!["localhost".into()];
    pki.issue("server", &spec);
    server.signal(libc::SIGHUP);
    server.log.wait_for(&["reload complete"]);
    let reply = http_get(status, "/_status", Some(&pki.ca_cert()));
    assert_eq!(reply.cert.unwrap(), cert_der(&pki.leaf("server").cert));
    let doc: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert!(
        doc["last_reload"] != "0001-01-01T00:00:00Z" && doc["last_reload_error"].is_null(),
        "{doc}"
    );
}

#[test]
fn status_is_503_when_the_target_is_down() {
    let pki = Pki::new();
    let dead = format!("127.0.0.1:{}", free_port());
    let server = Legate::server(&pki, &dead, &["--allow-all", "--status=http://127.0.0.1:0"]);
    let reply = http_get(status_addr(&server), "/_status", None);
    assert_eq!(reply.code, 503, "{}", reply.body);
    let doc: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["backend_ok"], false);
    assert_eq!(doc["status"], "critical");
    assert_eq!(doc["backend_status"], "critical");
    let err = doc["backend_error"].as_str().unwrap();
    assert!(err.contains(&dead), "{err}");
    assert_eq!(doc["tunnels"][0]["backend_error"], err);
}

#[test]
fn a_client_side_status_checks_the_server_admits_it() {
    let pki = Pki::new();
    let backend = Backend::echo(b"");
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    let client = Legate::client(
        &pki,
        "client",
        server.addr(),
        &["--status=http://127.0.0.1:0"],
    );
    let status = status_addr(&client);
    let reply = http_get(status, "/_status", None);
    assert_eq!(reply.code, 200, "{}", reply.body);
    // The probe is a handshake and a greeting: it never reaches the backend.
    assert_eq!(backend.accepted(), 0);

    // A client the server does not admit reports it.
    pki.issue(
        "stranger",
        &legate::certs::LeafSpec::new("stranger", legate::certs::Usage::Client),
    );
    let stranger = Legate::client(
        &pki,
        "stranger",
        server.addr(),
        &["--status=http://127.0.0.1:0"],
    );
    let reply = http_get(status_addr(&stranger), "/_status", None);
    assert_eq!(reply.code, 503, "{}", reply.body);
    assert!(
        reply.body.contains("did not admit this client"),
        "{}",
        reply.body
    );
}
