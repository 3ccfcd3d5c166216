//! The legate/1 pool: consumer connections reuse handshaken connections, and a pooled
//! connection that turns out dead is replaced without losing or repeating a byte.

mod harness;

use harness::{Backend, Legate, Pki};

#[test]
fn consumer_connections_reuse_pooled_connections() {
    let pki = Pki::new();
    let backend = Backend::echo(b"ok:");
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    let client = Legate::client(
        &pki,
        "client",
        server.addr(),
        &["--pool-size=2", "--mux=false"],
    );
    for i in 0..30 {
        let msg = format!("request {i}");
        assert_eq!(
            harness::exchange(client.addr(), msg.as_bytes()),
            format!("ok:{msg}").into_bytes()
        );
    }
    harness::eventually("30 streams in the server log", harness::DEADLINE, || {
        (server.log.count(&["connection closed", "outcome=ok"]) == 30).then_some(())
    });
    // Streams are logged with the TLS connection's peer address: few connections, many streams.
    let peers = harness::stream_peers(&server.log);
    assert!(
        peers.len() <= 4,
        "30 streams used {} TLS connections",
        peers.len()
    );
    assert_eq!(backend.accepted(), 30);
}

#[test]
fn a_dead_pooled_connection_is_replaced_without_losing_or_repeating_bytes() {
    // Let the pool fill (three connections greeted by the server) before they die.
    harness::a_dead_connection_is_replaced(
        &["--pool-size=3", "--mux=false"],
        &["pooled connection ready", "ready=3"],
        "pooled connection was dead; retrying on a fresh one",
    );
}
