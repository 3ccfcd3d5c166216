//! Bulk bytes cross between the ambassadors in full TLS records: a frame's header and its
//! payload fill one record, and no record of a few bytes trails each frame (until 2026-12-02
//! a full 16 KiB read behind its header spilled one: docs/performance.md, "The byte path").

mod harness;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;

use harness::{Backend, Legate, Pki};

/// TLS 1.3 application data: record type 23; a full record carries 16 KiB of plaintext, its
/// content type byte and a 16-byte tag.
const APP_DATA: u8 = 23;
const FULL: usize = 16 * 1024 + 1 + 16;
/// Records this short carry under 100 bytes: control frames, the end of the handshake, and the
/// spilled bytes this test is about.
const TINY: usize = 100 + 1 + 16;
const BULK: usize = 4 << 20;

/// A TCP relay between the ambassadors that reads the record headers (plaintext in TLS 1.3)
/// of what the client side sends and keeps the length of each application data record.
struct RecordTap {
    addr: SocketAddr,
    lengths: Arc<Mutex<Vec<usize>>>,
}

impl RecordTap {
    fn start(to: SocketAddr) -> RecordTap {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let lengths = Arc::new(Mutex::new(Vec::new()));
        let seen = lengths.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut down) = conn else { continue };
                let Ok(mut up) = TcpStream::connect(to) else {
                    continue;
                };
                let (mut d2, mut u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                thread::spawn(move || {
                    let _ = std::io::copy(&mut u2, &mut d2);
                    let _ = d2.shutdown(Shutdown::Write);
                });
                let seen = seen.clone();
                thread::spawn(move || {
                    let mut header = Vec::with_capacity(5);
                    let mut skip = 0usize;
                    let mut buf = [0u8; 64 * 1024];
                    while let Ok(n) = down.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        // Counted before they are passed on, so that every record is counted
                        // by the time the target's answer can come back.
                        let mut rest = &buf[..n];
                        while !rest.is_empty() {
                            if skip > 0 {
                                let k = skip.min(rest.len());
                                skip -= k;
                                rest = &rest[k..];
                                continue;
                            }
                            let k = (5 - header.len()).min(rest.len());
                            header.extend_from_slice(&rest[..k]);
                            rest = &rest[k..];
                            if header.len() == 5 {
                                skip = usize::from(u16::from_be_bytes([header[3], header[4]]));
                                if header[0] == APP_DATA {
                                    seen.lock().unwrap().push(skip);
                                }
                                header.clear();
                            }
                        }
                        if up.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = up.shutdown(Shutdown::Write);
                });
            }
        });
        RecordTap { addr, lengths }
    }
}

/// FNV-1a, to check that the bytes arrived whole without sending them back (an echo would add
/// the client's window grants, small records of their own, to what the tap counts).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Sends `BULK` bytes through a client (with `client_flags`) to a target that answers with
/// their length and hash once the consumer has finished, checks the answer, and returns the
/// lengths of the records the client side sent.
fn bulk_records(client_flags: &[&str]) -> Vec<usize> {
    let pki = Pki::new();
    let backend = Backend::start(|mut s| {
        let mut got = Vec::new();
        if s.read_to_end(&mut got).is_ok() {
            let _ = s.write_all(format!("{} {}", got.len(), fnv(&got)).as_bytes());
        }
    });
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    let tap = RecordTap::start(server.addr());
    let client = Legate::client(&pki, "client", tap.addr, client_flags);
    let data: Vec<u8> = (0..BULK).map(|i| (i % 251) as u8).collect();
    let mut s = harness::connect(client.addr());
    s.write_all(&data).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let answer = String::from_utf8(harness::read_all(&mut s)).unwrap();
    assert_eq!(
        answer,
        format!("{BULK} {}", fnv(&data)),
        "what the target received"
    );
    tap.lengths.lock().unwrap().clone()
}

fn assert_full_records(lengths: &[usize]) {
    let full = lengths.iter().filter(|&&l| l == FULL).count();
    let tiny = lengths.iter().filter(|&&l| l < TINY).count();
    // 4 MiB is 256 full records; reads that come back short make some smaller.
    assert!(full >= 64, "only {full} full records of {}", lengths.len());
    // One spilled record per frame (or per multiplexed batch) would be 64 to 256 of them.
    assert!(
        tiny <= 16,
        "{tiny} records under {TINY} bytes among {}: frames spill out of their record",
        lengths.len()
    );
}

#[test]
fn multiplexed_bulk_data_crosses_in_full_records() {
    assert_full_records(&bulk_records(&[]));
}

#[test]
fn raw_bulk_data_crosses_in_full_records() {
    assert_full_records(&bulk_records(&["--raw"]));
}
