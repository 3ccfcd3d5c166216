//! The legate/1 pool: consumer connections reuse handshaken connections, and a pooled
//! connection that turns out dead is replaced without losing or repeating a byte.

mod harness;

use std::io::{Read, Write};
use std::sync::atomic::Ordering;

use harness::{Backend, Legate, Pki, Trap};

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
    let pki = Pki::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let backend = Backend::start(move |mut s| {
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(b"got:").unwrap();
        s.write_all(&got).unwrap();
        tx.lock().unwrap().send(got).unwrap();
    });
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    let trap = Trap::start(server.addr());
    let client = Legate::start(
        &[
            "client".into(),
            "--listen=127.0.0.1:0".into(),
            format!("--target=127.0.0.1:{}", trap.addr.port()),
            "--override-server-name=localhost".into(),
            "--pool-size=3".into(),
            "--mux=false".into(),
            format!("--cert={}", pki.leaf("client").cert.display()),
            format!("--key={}", pki.leaf("client").key.display()),
            format!("--cacert={}", pki.ca_cert().display()),
        ],
        1,
    );
    // Let the pool fill: three connections greeted by the server.
    client.log.wait_for(&["pooled connection ready", "ready=3"]);
    trap.armed.store(true, Ordering::SeqCst);

    let payload: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    let reply = harness::exchange(client.addr(), &payload);
    let mut expected = b"got:".to_vec();
    expected.extend_from_slice(&payload);
    assert!(reply == expected, "the reply differs from the payload");
    // The backend saw the payload once, complete.
    let seen = rx.recv_timeout(harness::DEADLINE).unwrap();
    assert!(seen == payload);
    assert_eq!(backend.accepted(), 1);
    client
        .log
        .wait_for(&["pooled connection was dead; retrying on a fresh one"]);
}
