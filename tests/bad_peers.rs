//! Bad peers: handshake floods, and `legate/1` OPEN frames that are truncated, oversized, of an
//! unknown version, or never followed by anything. Each gets a REFUSED or a close; none stops
//! the server or other clients, and none reaches the target.

mod harness;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use harness::{Backend, DEADLINE, Legate, Pki, connect, eventually, exchange, tls_connect};
use legate::protocol::{self, Frame, Open};

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Reads one control frame off a hand-driven TLS connection.
fn read_frame(tls: &mut Tls) -> std::io::Result<Frame> {
    let mut header = [0u8; 3];
    tls.read_exact(&mut header)?;
    let mut payload = vec![0u8; u16::from_be_bytes([header[1], header[2]]) as usize];
    tls.read_exact(&mut payload)?;
    protocol::decode(header[0], &payload).map_err(|e| std::io::Error::other(e.to_string()))
}

/// A `legate/1` connection that has received the server's HELLO.
fn greeted(pki: &Pki, server: &Legate) -> Tls {
    let mut tls = tls_connect(pki, "client", server.addr(), &[b"legate/1"]);
    match read_frame(&mut tls).unwrap() {
        Frame::Hello { version: 1, .. } => tls,
        other => panic!("expected HELLO, got {other:?}"),
    }
}

/// The next frame is REFUSED, and its message contains `says`.
fn assert_refused(tls: &mut Tls, says: &str) {
    match read_frame(tls).unwrap() {
        Frame::Refused { message, .. } => assert!(message.contains(says), "{message}"),
        other => panic!("expected REFUSED, got {other:?}"),
    }
}

/// True once the server has closed the connection (EOF or reset), false if it sent bytes.
fn closed_by_server(tls: &mut Tls) -> bool {
    let mut buf = [0u8; 64];
    !matches!(tls.read(&mut buf), Ok(n) if n > 0)
}

fn open_frame(route: &str) -> Vec<u8> {
    protocol::encode(&Frame::Open(Open {
        features: protocol::FEATURE_FRAMED,
        route: route.into(),
        consumer: None,
    }))
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

    // Unknown version: REFUSED saying so, then the close.
    let mut tls = greeted(&pki, &server);
    let mut open = open_frame("");
    open[3] = 9;
    tls.write_all(&open).unwrap();
    assert_refused(&mut tls, "protocol version 9");
    assert!(closed_by_server(&mut tls));

    // Oversized: a length beyond the largest control frame is refused before it is read.
    let mut tls = greeted(&pki, &server);
    tls.write_all(&[0x02, 0xff, 0xff]).unwrap();
    tls.write_all(&[0u8; 1000]).unwrap();
    assert_refused(&mut tls, "65535 bytes exceeds");
    assert!(closed_by_server(&mut tls));

    // Malformed: the route's length runs past the payload.
    let mut tls = greeted(&pki, &server);
    tls.write_all(&[0x02, 0x00, 0x03, 1, 1, 200]).unwrap();
    assert_refused(&mut tls, "");
    assert!(closed_by_server(&mut tls));

    // Truncated, then the client closes: the server closes too.
    let mut tls = greeted(&pki, &server);
    let open = open_frame("");
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

    // An unknown frame type where OPEN belongs.
    let mut tls = greeted(&pki, &server);
    tls.write_all(&[0x7f, 0x00, 0x00]).unwrap();
    assert!(closed_by_server(&mut tls));

    assert_eq!(backend.accepted(), 0, "a bad OPEN reached the target");
    // Log lines arrive just after the closes.
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
        tls.write_all(&open_frame("")).unwrap();
        assert!(matches!(read_frame(&mut tls), Ok(Frame::Ready { .. })));
        quiet.push(tls);
    }
    // Five streams sit open to the target, saying nothing; everyone else is served.
    still_serves(&pki, &server);
    assert_eq!(backend.accepted(), 6);
    // When such a client finally speaks, its stream works.
    let mut tls = quiet.pop().unwrap();
    let mut data = protocol::stream_header(protocol::DATA, 2).to_vec();
    data.extend_from_slice(b"hi");
    tls.write_all(&data).unwrap();
    // The echo's tag and the echo may come as one DATA frame or several.
    let mut reply = Vec::new();
    while reply.len() < b"echo:hi".len() {
        let mut header = [0u8; 3];
        tls.read_exact(&mut header).unwrap();
        assert_eq!(header[0], protocol::DATA);
        let mut payload = vec![0u8; u16::from_be_bytes([header[1], header[2]]) as usize];
        tls.read_exact(&mut payload).unwrap();
        reply.extend_from_slice(&payload);
    }
    assert_eq!(reply, b"echo:hi");
}

/// A multiplexed frame: type, length of id and body, stream id, body.
fn mux_frame(kind: u8, id: u32, body: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend_from_slice(&((4 + body.len()) as u16).to_be_bytes());
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// Reads one multiplexed frame: (type, stream id, body).
fn read_mux(tls: &mut Tls) -> std::io::Result<(u8, u32, Vec<u8>)> {
    let mut header = [0u8; 7];
    tls.read_exact(&mut header)?;
    let len = u16::from_be_bytes([header[1], header[2]]) as usize;
    let mut body = vec![0u8; len - 4];
    tls.read_exact(&mut body)?;
    let id = u32::from_be_bytes([header[3], header[4], header[5], header[6]]);
    Ok((header[0], id, body))
}

fn mux_open(id: u32) -> Vec<u8> {
    let open = Open {
        features: protocol::FEATURE_FRAMED | protocol::FEATURE_MUX,
        route: String::new(),
        consumer: None,
    };
    mux_frame(legate::mux::M_OPEN, id, &protocol::open_payload(&open))
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
    let mut open = mux_open(1);
    open[7] = 9; // the version byte
    tls.write_all(&open).unwrap();
    let (kind, id, body) = read_mux(&mut tls).unwrap();
    assert_eq!(
        (kind, id, body[0]),
        (legate::mux::M_REFUSED, 1, 4),
        "{body:?}"
    );
    tls.write_all(&mux_open(3)).unwrap();
    assert_eq!(read_mux(&mut tls).unwrap().0, legate::mux::M_READY);

    // DATA past the window: the server ends the connection rather than buffer without bound.
    let chunk = mux_frame(legate::mux::M_DATA, 3, &[7u8; 16 * 1024]);
    let mut sent = 0usize;
    while sent < 256 << 20 && tls.write_all(&chunk).is_ok() {
        sent += chunk.len();
    }
    assert!(closed_by_server(&mut tls), "still open after {sent} bytes");
    server
        .log
        .wait_for(&["stream 3 sent past its flow-control window"]);

    // Frames that have no place on a multiplexed connection end it: an unknown type, an OPEN
    // with a server-side (even) id, an OPEN for a stream that is open.
    for bad in [
        mux_frame(0x7f, 1, &[]),
        mux_open(2),
        [mux_open(5), mux_open(5)].concat(),
    ] {
        let mut tls = greeted(&pki, &server);
        tls.write_all(&mux_open(1)).unwrap();
        assert_eq!(read_mux(&mut tls).unwrap().0, legate::mux::M_READY);
        tls.write_all(&bad).unwrap();
        let mut closed = false;
        for _ in 0..3 {
            match read_mux(&mut tls) {
                Ok((legate::mux::M_READY, _, _)) => continue,
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
