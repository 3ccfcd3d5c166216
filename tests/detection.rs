//! Detection without extra connections: a legate client opens nothing before a consumer asks,
//! finds out on the consumer's own connection whether its peer speaks `legate/1`, carries the
//! consumer raw when it does not (one TLS connection per consumer, as ghostunnel does), and
//! keeps a multiplexed connection when it does. Told its peer is legate, it connects ahead.

mod harness;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use harness::{Backend, DEADLINE, Legate, Pki, connect, eventually};

/// Asserts that `f` stays true for `window`: for what must *not* happen, there is no event to
/// wait for, only a bounded look.
fn stays(what: &str, window: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + window;
    while Instant::now() < end {
        assert!(f(), "{what}");
        // The polling pause `eventually` uses too.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TLS server that is not legate (no ALPN), requiring client certificates: it counts the
/// connections it accepts and answers `raw:` and what it read, on each.
struct RawTlsServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

impl RawTlsServer {
    fn start(pki: &Pki) -> RawTlsServer {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = legate::tls::provider();
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(pki.ca_cert()).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let leaf = pki.leaf("server");
        let chain = CertificateDer::pem_file_iter(&leaf.cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(&leaf.key).unwrap();
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_client_cert_verifier(verifier)
                .with_single_cert(chain, key)
                .unwrap(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let config = config.clone();
                std::thread::spawn(move || {
                    let conn = rustls::ServerConnection::new(config).unwrap();
                    let mut tls = rustls::StreamOwned::new(conn, tcp);
                    let mut line = Vec::new();
                    let mut byte = [0u8; 1];
                    while tls.read(&mut byte).is_ok_and(|n| n == 1) && byte[0] != b'\n' {
                        line.push(byte[0]);
                    }
                    let _ = tls.write_all(b"raw:");
                    let _ = tls.write_all(&line);
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                });
            }
        });
        RawTlsServer { addr, accepted }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

#[test]
fn a_raw_tls_server_sees_one_connection_per_consumer_and_none_besides() {
    let pki = Pki::new();
    let raw = RawTlsServer::start(&pki);
    let client = Legate::client(&pki, "client", raw.addr, &["--pool-size=4"]);
    stays(
        "no connection before a consumer",
        Duration::from_secs(1),
        || raw.accepted() == 0,
    );
    let ask = |i: usize| {
        let mut s = connect(client.addr());
        s.write_all(format!("consumer {i}\n").as_bytes()).unwrap();
        harness::read_until_closed(&mut s)
    };
    assert_eq!(ask(0), b"raw:consumer 0");
    assert_eq!(raw.accepted(), 1);
    // Several at once, and one after another: a connection each, dialled when it connects.
    let together: Vec<_> = (1..=5)
        .map(|i| {
            let mut s = connect(client.addr());
            s.write_all(format!("consumer {i}\n").as_bytes()).unwrap();
            s
        })
        .collect();
    for (i, mut s) in together.into_iter().enumerate() {
        assert_eq!(
            harness::read_until_closed(&mut s),
            format!("raw:consumer {}", i + 1).into_bytes()
        );
    }
    assert_eq!(ask(6), b"raw:consumer 6");
    assert_eq!(raw.accepted(), 7);
    stays(
        "no connection after the consumers",
        Duration::from_secs(1),
        || raw.accepted() == 7,
    );
    // The client remembered the peer is raw, and said so once.
    assert_eq!(client.log.count(&["server did not take legate/1"]), 1);
}

/// A legate server in front of an echo backend, with a plain-HTTP status listener to read its
/// open-connections gauge from.
fn echo_server_with_status(pki: &Pki) -> (Backend, Legate) {
    let backend = Backend::echo(b"echo:");
    let server = Legate::server(
        pki,
        &backend.target(),
        &["--allow-cn=client", "--status=http://127.0.0.1:0"],
    );
    (backend, server)
}

#[test]
fn against_a_legate_server_the_first_consumer_is_answered_and_its_connection_kept() {
    let pki = Pki::new();
    let (_backend, server) = echo_server_with_status(&pki);
    // One worker thread, so one kept connection (the default is one per thread).
    let client = Legate::client(&pki, "client", server.addr(), &["--threads=1"]);
    stays(
        "no connection before a consumer",
        Duration::from_secs(1),
        || harness::open_connections(&server) == 0,
    );
    // The first consumer's own connection becomes the multiplexed one, with it as the first
    // stream.
    assert_eq!(harness::exchange(client.addr(), b"first"), b"echo:first");
    for i in 0..10 {
        let msg = format!("then {i}");
        assert_eq!(
            harness::exchange(client.addr(), msg.as_bytes()),
            format!("echo:{msg}").into_bytes()
        );
    }
    eventually("11 streams in the server log", DEADLINE, || {
        (server.log.count(&["connection closed", "outcome=ok"]) == 11).then_some(())
    });
    assert_eq!(harness::stream_peers(&server.log).len(), 1);
    // And it stays open for the next consumer.
    assert_eq!(harness::open_connections(&server), 1);
}

#[test]
fn a_client_told_its_peer_is_legate_connects_before_the_first_consumer() {
    let pki = Pki::new();
    let (_backend, server) = echo_server_with_status(&pki);
    let client = Legate::client(
        &pki,
        "client",
        server.addr(),
        &["--threads=1", "--peer-is-legate"],
    );
    eventually("the kept connection", DEADLINE, || {
        (harness::open_connections(&server) == 1).then_some(())
    });
    client.log.wait_for(&["multiplexed connection ready"]);
    assert_eq!(harness::exchange(client.addr(), b"warm"), b"echo:warm");
    // The consumer's stream went on the connection made before it: the server still has that
    // one connection and no other, and logged the stream on it.
    server.log.wait_for(&["connection closed", "outcome=ok"]);
    assert_eq!(harness::stream_peers(&server.log).len(), 1);
    assert_eq!(harness::open_connections(&server), 1);
}
