//! Half-close through the tunnel, in both directions, over legate/1 and raw mode.

mod harness;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::sync::mpsc;
use std::time::Duration;

use harness::{Backend, Legate, Pki, connect, read_all};

fn pair(pki: &Pki, backend: &Backend, client_extra: &[&str]) -> (Legate, Legate) {
    let server = Legate::server(pki, &backend.target(), &["--allow-cn=client"]);
    let client = Legate::client(pki, "client", server.addr(), client_extra);
    (server, client)
}

#[test]
fn consumer_half_close_reaches_backend_and_reply_still_arrives() {
    for mode in [&[][..], &["--raw"][..]] {
        let pki = Pki::new();
        // Replies only once it has seen EOF: proof the consumer's FIN crossed the tunnel.
        let backend = Backend::start(|mut s| {
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            s.write_all(format!("got {} bytes: ", got.len()).as_bytes())
                .unwrap();
            s.write_all(&got).unwrap();
        });
        let (_server, client) = pair(&pki, &backend, mode);
        let mut s = connect(client.addr());
        s.write_all(b"question").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_all(&mut s), b"got 8 bytes: question", "mode {mode:?}");
    }
}

#[test]
fn backend_half_close_reaches_consumer_and_consumer_can_still_send() {
    for mode in [&[][..], &["--raw"][..]] {
        let pki = Pki::new();
        let (tx, rx) = mpsc::channel();
        let backend = Backend::start(move |mut s| {
            s.write_all(b"banner").unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            tx.send(got).unwrap();
        });
        let (_server, client) = pair(&pki, &backend, mode);
        let mut s = connect(client.addr());
        // EOF arrives while our own write side is still open.
        assert_eq!(read_all(&mut s), b"banner", "mode {mode:?}");
        s.write_all(b"late answer").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let got = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(got, b"late answer", "mode {mode:?}");
    }
}

#[test]
fn close_timeout_ends_a_half_open_connection() {
    let pki = Pki::new();
    // A backend that never reads nor closes: it holds the connection until the test ends.
    let backend = Backend::start(|_held| {
        loop {
            std::thread::park();
        }
    });
    let server = Legate::server(
        &pki,
        &backend.target(),
        &["--allow-cn=client", "--close-timeout=200ms"],
    );
    // The client's own close timeout is long: with both at 200 ms, whichever timer started first
    // cut the stream, and the client's (started at the consumer's half-close, before the END
    // reached the server) often won, so the server logged the stream as ended, not cut.
    let client = Legate::client(&pki, "client", server.addr(), &["--close-timeout=60s"]);
    let mut s = connect(client.addr());
    s.write_all(b"x").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    // The consumer sees the connection end long before the backend would close it.
    let started = std::time::Instant::now();
    assert_eq!(read_all(&mut s), b"");
    assert!(started.elapsed() < Duration::from_secs(10));
    server.log.wait_for(&["connection closed", "cut=true"]);
}
