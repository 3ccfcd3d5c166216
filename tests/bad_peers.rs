//! Bad peers: handshake floods, and `legate/1` frames that are truncated, malformed, of an
//! unknown version or type, or never followed by anything. Each gets a REFUSED or a close; none stops
//! the server or other clients, and none reaches the target.

mod harness;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use harness::{Backend, DEADLINE, Legate, Pki, connect, eventually, exchange, tls_connect};
use legate::mux::frame::{self, Frame, Open};

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Reads one frame off a hand-driven TLS connection.
fn read_frame(tls: &mut Tls) -> std::io::Result<Frame> {
    let mut buf = bytes::BytesMut::new();
    let mut header = [0u8; 3];
    tls.read_exact(&mut header)?;
    let mut rest = vec![0u8; u16::from_be_bytes([header[1], header[2]]) as usize];
    tls.read_exact(&mut rest)?;
    buf.extend_from_slice(&header);
    buf.extend_from_slice(&rest);
    match frame::decode(&mut buf) {
        Ok(Some(f)) => Ok(f),
        Ok(None) => unreachable!("a whole frame was read"),
        Err(e) => Err(std::io::Error::other(e.to_string())),
    }
}

/// A `legate/1` connection that has received the server's HELLO.
fn greeted(pki: &Pki, server: &Legate) -> Tls {
    let mut tls = tls_connect(pki, "client", server.addr(), &[b"legate/1"]);
    match read_frame(&mut tls).unwrap() {
        Frame::Hello(h) if h.version == 1 => tls,
        other => panic!("expected HELLO, got {other:?}"),
    }
}

/// The next frame is REFUSED for stream `id`, and its message contains `says`.
fn assert_refused(tls: &mut Tls, id: u32, says: &str) {
    match read_frame(tls).unwrap() {
        Frame::Refused(i, _, message) if i == id => {
            assert!(message.contains(says), "{message}")
        }
        other => panic!("expected REFUSED, got {other:?}"),
    }
}

/// True once the server has closed the connection (EOF or reset), having sent at most a
/// GOAWAY before; false if it sent anything else.
fn closed_by_server(tls: &mut Tls) -> bool {
    loop {
        match read_frame(tls) {
            Ok(Frame::GoAway) => continue,
            Ok(_) => return false,
            Err(_) => return true,
        }
    }
}

fn open_frame(id: u32, route: &str) -> Vec<u8> {
    let open = Open {
        route: route.into(),
        consumer: None,
    };
    frame::encode(frame::OPEN, id, &frame::open_body(&open))
}

/// The server still serves: a legate client reaches the echo backend through it.
fn still_serves(pki: &Pki, server: &Legate) {
    let client = Legate::client(pki, "client", server.addr(), &[]);
    assert_eq!(exchange(client.addr(), b"ping"), b"echo:ping");
}

#[test]
fn a_handshake_flood_does_not_stop_real_clients() {
    let pki = Pki::new();
    let backend = Backend::echo(b"echo:");
    let server = Legate::server(
        &pki,
        &backend.target(),
        &["--allow-cn=client", "--handshake-timeout=2s"],
    );
    let silent: Vec<TcpStream> = (0..40).map(|_| connect(server.addr())).collect();
    let mut garbage: Vec<TcpStream> = (0..20).map(|_| connect(server.addr())).collect();
    for (i, s) in garbage.iter_mut().enumerate() {
        let junk: Vec<u8> = (0..1024u32).map(|b| (b * 31 + i as u32) as u8).collect();
        let _ = s.write_all(&junk);
    }
    // With all 60 hanging on, real clients connect and work, again and again.
    let client = Legate::client(&pki, "client", server.addr(), &["--pool-size=0"]);
    let started = Instant::now();
    for i in 0..10 {
        let msg = format!("request {i}");
        assert_eq!(
            exchange(client.addr(), msg.as_bytes()),
            format!("echo:{msg}").as_bytes()
        );
    }
    // Were the accept loop held by the 40 silent handshakes (2 s each), this would take far
    // longer than 5 s.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "real clients waited behind the flood: {:?}",
        started.elapsed()
    );
    // The silent ones are cut at the handshake timeout, the garbage ones at once.
    for mut s in silent.into_iter().chain(garbage) {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => continue, // a TLS alert, then the close
            }
        }
    }
    let timed_out = eventually("the silent handshakes to be logged", DEADLINE, || {
        let n = server
            .log
            .count(&["outcome=handshake_failed", "timed out after 2s"]);
        (n >= 40).then_some(n)
    });
    assert_eq!(timed_out, 40);
    assert!(server.log.count(&["outcome=handshake_failed"]) >= 60);
    assert_eq!(
        backend.accepted(),
        10,
        "only the real requests reached the target"
    );
}

#[test]
fn bad_open_frames_are_refused_or_closed_and_the_server_carries_on() {
    let pki = Pki::new();
    let backend = Backend::echo(b"echo:");
    let server = Legate::server(
        &pki,
        &backend.target(),
        &["--allow-cn=client", "--idle-timeout=1s"],
    );

    // Unknown version, or a route whose length runs past the body: REFUSED saying so, and
    // the connection carries on.
    let mut tls = greeted(&pki, &server);
    let mut open = open_frame(1, "");
    open[7] = 9; // the version byte
    tls.write_all(&open).unwrap();
    assert_refused(&mut tls, 1, "protocol version 9");
    tls.write_all(&frame::encode(frame::OPEN, 3, &[1, 0, 200]))
        .unwrap();
    assert_refused(&mut tls, 3, "truncated");
    tls.write_all(&open_frame(5, "")).unwrap();
    assert!(matches!(read_frame(&mut tls), Ok(Frame::Ready(5))));

    // A frame too short to name its stream: the connection ends.
    let mut tls = greeted(&pki, &server);
    tls.write_all(&[frame::OPEN, 0x00, 0x02, 0, 0]).unwrap();
    assert!(closed_by_server(&mut tls));

    // Truncated, then the client closes: the server closes too.
    let mut tls = greeted(&pki, &server);
    let open = open_frame(1, "");
    tls.write_all(&open[..open.len() - 2]).unwrap();
    tls.conn.send_close_notify();
    tls.flush().unwrap();
    tls.sock.shutdown(Shutdown::Write).unwrap();
    assert!(closed_by_server(&mut tls));

    // Truncated, then nothing: cut at the idle timeout, not held forever.
    let mut tls = greeted(&pki, &server);
    tls.write_all(&open[..open.len() - 2]).unwrap();
    let waited = Instant::now();
    assert!(closed_by_server(&mut tls));
    assert!(
        waited.elapsed() < Duration::from_secs(5),
        "{:?}",
        waited.elapsed()
    );

    // An unknown frame type.
    let mut tls = greeted(&pki, &server);
    tls.write_all(&frame::encode(0x7f, 1, &[])).unwrap();
    assert!(closed_by_server(&mut tls));

    // Only the good OPEN reached the target.
    assert_eq!(backend.accepted(), 1, "a bad OPEN reached the target");
    // Log lines arrive just after the closes: two refused OPENs, two broken connections.
    eventually("the protocol errors to be logged", DEADLINE, || {
        (server.log.count(&["outcome=protocol_error"]) >= 4).then_some(())
    });
    assert_eq!(server.log.count(&["panicked"]), 0);
    still_serves(&pki, &server);
}

#[test]
fn a_client_that_opens_and_then_says_nothing_holds_only_its_own_stream() {
    let pki = Pki::new();
    let backend = Backend::echo(b"echo:");
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    let mut quiet = Vec::new();
    for _ in 0..5 {
        let mut tls = greeted(&pki, &server);
        tls.write_all(&open_frame(1, "")).unwrap();
        assert!(matches!(read_frame(&mut tls), Ok(Frame::Ready(1))));
        quiet.push(tls);
    }
    // Five streams sit open to the target, saying nothing; everyone else is served.
    still_serves(&pki, &server);
    assert_eq!(backend.accepted(), 6);
    // When such a client finally speaks, its stream works.
    let mut tls = quiet.pop().unwrap();
    let mut data = frame::encode(frame::DATA, 1, b"hi");
    data.extend_from_slice(&frame::encode(frame::END, 1, &[]));
    tls.write_all(&data).unwrap();
    // The echo's tag and the echo may come as one DATA frame or several.
    let mut reply = Vec::new();
    while reply.len() < b"echo:hi".len() {
        match read_frame(&mut tls).unwrap() {
            Frame::Data(1, body) => reply.extend_from_slice(&body),
            Frame::Window(..) => {}
            other => panic!("expected DATA, got {other:?}"),
        }
    }
    assert_eq!(reply, b"echo:hi");
}

#[test]
fn bad_multiplexed_frames_are_refused_or_close_the_connection_and_the_server_carries_on() {
    let pki = Pki::new();
    // The target never reads, so the server soon stops granting window to a stream.
    let backend = Backend::start(|s| {
        let _held = s;
        std::thread::park();
    });
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);

    // A bad OPEN refuses its stream only; the connection carries the next one.
    let mut tls = greeted(&pki, &server);
    let mut open = open_frame(1, "");
    open[7] = 9; // the version byte
    tls.write_all(&open).unwrap();
    assert!(matches!(
        read_frame(&mut tls).unwrap(),
        Frame::Refused(1, frame::RefuseCode::BadRequest, _)
    ));
    tls.write_all(&open_frame(3, "")).unwrap();
    assert!(matches!(read_frame(&mut tls), Ok(Frame::Ready(3))));

    // DATA past the window: the server ends the connection rather than buffer without bound.
    let chunk = frame::encode(frame::DATA, 3, &[7u8; 16 * 1024]);
    let mut sent = 0usize;
    while sent < 256 << 20 && tls.write_all(&chunk).is_ok() {
        sent += chunk.len();
    }
    assert!(closed_by_server(&mut tls), "still open after {sent} bytes");
    server
        .log
        .wait_for(&["stream 3 sent past its flow-control window"]);

    // Frames that have no place on a multiplexed connection end it: an unknown type, an OPEN
    // with a server-side (even) id, an OPEN for a stream that is open, an id that goes back,
    // a frame only a server sends.
    for bad in [
        frame::encode(0x7f, 1, &[]),
        open_frame(2, ""),
        [open_frame(5, ""), open_frame(5, "")].concat(),
        [open_frame(7, ""), open_frame(3, "")].concat(),
        frame::encode(frame::GOAWAY, 0, &[]),
    ] {
        let mut tls = greeted(&pki, &server);
        tls.write_all(&open_frame(1, "")).unwrap();
        assert!(matches!(read_frame(&mut tls), Ok(Frame::Ready(1))));
        tls.write_all(&bad).unwrap();
        let mut closed = false;
        for _ in 0..3 {
            match read_frame(&mut tls) {
                Ok(Frame::Ready(_) | Frame::GoAway) => continue,
                _ => {
                    closed = true;
                    break;
                }
            }
        }
        assert!(closed, "the connection survived {bad:?}");
    }
    assert_eq!(server.log.count(&["panicked"]), 0);
    let backend = Backend::echo(b"echo:");
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    still_serves(&pki, &server);
}
