//! --proxy-protocol: the target receives a PROXY v2 header with the real consumer's address
//! and the client's identity, parsed here by an independent reader.

mod harness;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;

use harness::{Backend, Legate, Pki, connect, read_all};

/// What a PROXY v2 header said.
#[derive(Debug, Default)]
struct Seen {
    source: Option<SocketAddr>,
    destination: Option<SocketAddr>,
    tls_version: Option<String>,
    cn: Option<String>,
    identity: Option<String>,
    payload: Vec<u8>,
}

/// Reads a PROXY v2 header (HAProxy's spec, section 2.2) and then the rest of the stream.
fn parse(s: &mut TcpStream) -> Seen {
    let mut head = [0u8; 16];
    s.read_exact(&mut head).unwrap();
    assert_eq!(
        &head[..12],
        b"\r\n\r\n\0\r\nQUIT\n",
        "no PROXY v2 signature"
    );
    assert_eq!(head[12], 0x21, "version 2, command PROXY");
    let len = u16::from_be_bytes([head[14], head[15]]) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    let mut seen = Seen::default();
    let tlvs = match head[13] {
        0x11 => {
            let ip = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
            let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
            seen.source = Some(SocketAddr::from((ip(&body[0..4]), port(&body[8..10]))));
            seen.destination = Some(SocketAddr::from((ip(&body[4..8]), port(&body[10..12]))));
            &body[12..]
        }
        other => panic!("unexpected family 0x{other:02x}"),
    };
    let mut rest = tlvs;
    while !rest.is_empty() {
        let (kind, n) = (rest[0], u16::from_be_bytes([rest[1], rest[2]]) as usize);
        let value = &rest[3..3 + n];
        match kind {
            0x20 => {
                assert_eq!(value[0] & 0x01, 0x01, "PP2_CLIENT_SSL");
                assert_eq!(&value[1..5], &[0, 0, 0, 0], "verified");
                let mut sub = &value[5..];
                while !sub.is_empty() {
                    let (k, m) = (sub[0], u16::from_be_bytes([sub[1], sub[2]]) as usize);
                    let v = String::from_utf8(sub[3..3 + m].to_vec()).unwrap();
                    match k {
                        0x21 => seen.tls_version = Some(v),
                        0x22 => seen.cn = Some(v),
                        _ => {}
                    }
                    sub = &sub[3 + m..];
                }
            }
            0xE0 => seen.identity = Some(String::from_utf8(value.to_vec()).unwrap()),
            _ => {}
        }
        rest = &rest[3 + n..];
    }
    s.read_to_end(&mut seen.payload).unwrap();
    seen
}

fn proxy_backend() -> (Backend, mpsc::Receiver<Seen>) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let backend = Backend::start(move |mut s| {
        let seen = parse(&mut s);
        s.write_all(b"parsed").unwrap();
        tx.lock().unwrap().send(seen).unwrap();
    });
    (backend, rx)
}

fn send(client: &Legate) -> SocketAddr {
    let mut s = connect(client.addr());
    let me = s.local_addr().unwrap();
    s.write_all(b"payload").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut s), b"parsed");
    me
}

#[test]
fn the_target_sees_the_real_consumer_over_legate_1() {
    let pki = Pki::new();
    let (backend, seen) = proxy_backend();
    let server = Legate::server(
        &pki,
        &backend.target(),
        &["--allow-cn=client", "--proxy-protocol"],
    );
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    let consumer = send(&client);
    let seen = seen.recv_timeout(harness::DEADLINE).unwrap();
    // The consumer's own address, not the client ambassador's.
    assert_eq!(seen.source, Some(consumer));
    assert_eq!(seen.destination, Some(server.addr()));
    assert_eq!(seen.tls_version.as_deref(), Some("TLSv1.3"));
    assert_eq!(seen.cn.as_deref(), Some("client"));
    assert_eq!(seen.identity.as_deref(), Some("CN=client"));
    assert_eq!(seen.payload, b"payload");
    let line = server.log.wait_for(&["connection closed"]);
    assert!(line.contains(&format!("consumer=\"{consumer}\"")), "{line}");
}

#[test]
fn in_raw_mode_the_target_sees_the_tls_peer() {
    let pki = Pki::new();
    let (backend, seen) = proxy_backend();
    let server = Legate::server(
        &pki,
        &backend.target(),
        &["--allow-cn=client", "--proxy-protocol"],
    );
    let client = Legate::client(&pki, "client", server.addr(), &["--raw"]);
    let consumer = send(&client);
    let seen = seen.recv_timeout(harness::DEADLINE).unwrap();
    let source = seen.source.unwrap();
    // Raw mode carries no consumer address: the source is the client ambassador's socket.
    assert_ne!(source, consumer);
    assert!(source.ip().is_loopback());
    let line = server.log.wait_for(&["connection closed"]);
    assert!(line.contains(&format!("peer={source}")), "{line}");
    assert_eq!(seen.payload, b"payload");
}
