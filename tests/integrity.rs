//! Integrity and churn: large transfers both ways at once with checksums, one byte at a time,
//! hundreds of short connections and resets, after which descriptors and the open-connection
//! gauge are back where they started.

mod harness;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;

use harness::{Backend, DEADLINE, Legate, Pki, connect, eventually, exchange};

/// A deterministic byte stream: xorshift64, eight bytes per step. A lost, repeated or reordered
/// byte changes the digest.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// FNV-1a over 8-byte words (and the tail), with the length: fast enough in a debug build.
#[derive(Default)]
struct Digest {
    h: u64,
    len: u64,
}

impl Digest {
    fn update(&mut self, data: &[u8]) {
        // Transfers are read in whatever pieces TCP gives: fold byte by byte into words so the
        // digest does not depend on where the pieces split.
        for &b in data {
            self.h = (self.h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        self.len += data.len() as u64;
    }
}

/// Sends `len` pattern bytes from `seed` and half-closes; returns the digest of what was sent.
fn send_pattern(mut w: TcpStream, seed: u64, len: u64) -> (u64, u64) {
    let mut p = Pattern(seed);
    let mut d = Digest::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        p.fill(&mut buf[..n]);
        d.update(&buf[..n]);
        w.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    w.shutdown(Shutdown::Write).unwrap();
    (d.h, d.len)
}

/// Reads to EOF; returns the digest of what arrived.
fn digest_until_eof(mut r: TcpStream) -> (u64, u64) {
    let mut d = Digest::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).unwrap() {
            0 => return (d.h, d.len),
            n => d.update(&buf[..n]),
        }
    }
}

/// Bytes each way for the large transfer: 1 GiB, or `LEGATE_TEST_BYTES`.
fn transfer_bytes() -> u64 {
    std::env::var("LEGATE_TEST_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 30)
}

#[test]
fn a_gib_each_way_at_the_same_time_arrives_intact() {
    let len = transfer_bytes();
    let pki = Pki::new();
    // The target sends its own stream while it digests ours: full duplex.
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let target_addr = target.local_addr().unwrap();
    let service = thread::spawn(move || {
        let (s, _) = target.accept().unwrap();
        let reader = s.try_clone().unwrap();
        let receiving = thread::spawn(move || digest_until_eof(reader));
        let sent = send_pattern(s, 2, len);
        (sent, receiving.join().unwrap())
    });
    let server = Legate::server(&pki, &target_addr.to_string(), &["--allow-cn=client"]);
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    let consumer = connect(client.addr());
    let reader = consumer.try_clone().unwrap();
    let receiving = thread::spawn(move || digest_until_eof(reader));
    let sent_up = send_pattern(consumer, 1, len);
    let got_down = receiving.join().unwrap();
    let (sent_down, got_up) = service.join().unwrap();
    assert_eq!(sent_up.1, len);
    assert_eq!(
        got_up, sent_up,
        "consumer to service: bytes lost or changed"
    );
    assert_eq!(
        got_down, sent_down,
        "service to consumer: bytes lost or changed"
    );
    // The log line counts what was carried.
    let line = client.log.wait_for(&["outcome=ok"]);
    assert!(line.contains(&format!("bytes_up={len}")), "{line}");
    assert!(line.contains(&format!("bytes_down={len}")), "{line}");
}

#[test]
fn four_kib_one_byte_at_a_time_arrive_in_order() {
    let pki = Pki::new();
    let backend = Backend::echo(b"");
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    let mut s = connect(client.addr());
    let sent: Vec<u8> = (0..4096u32).map(|i| (i * 7 + i / 256) as u8).collect();
    let reader = s.try_clone().unwrap();
    let echoed = thread::spawn(move || {
        let mut r = reader;
        let mut got = vec![0u8; 4096];
        r.read_exact(&mut got).unwrap();
        got
    });
    for b in &sent {
        s.write_all(std::slice::from_ref(b)).unwrap();
    }
    assert_eq!(echoed.join().unwrap(), sent);
}

/// A server and a client side in front of `backend`, each with a plain-HTTP status listener.
fn pair_with_status(pki: &Pki, backend: &Backend) -> (Legate, Legate) {
    pair_with_status_and(pki, backend, &[])
}

fn pair_with_status_and(pki: &Pki, backend: &Backend, client_flags: &[&str]) -> (Legate, Legate) {
    let status = "--status=http://127.0.0.1:0";
    let server = Legate::server(pki, &backend.target(), &["--allow-cn=client", status]);
    let mut flags = vec![status];
    flags.extend_from_slice(client_flags);
    let client = Legate::client(pki, "client", server.addr(), &flags);
    (server, client)
}

#[test]
fn six_hundred_short_connections_leave_nothing_behind() {
    let pki = Pki::new();
    let backend = Backend::echo(b"echo:");
    let (server, client) = pair_with_status(&pki, &backend);
    // Warm up: the pool fills, the status listener answers.
    assert_eq!(exchange(client.addr(), b"x"), b"echo:x");
    let settled = |l: &Legate| {
        eventually("the open-connection gauge to read 0", DEADLINE, || {
            (harness::open_connections(l) == 0).then_some(())
        })
    };
    settled(&client);
    let base = [
        (client.open_fds(), client.threads()),
        (server.open_fds(), server.threads()),
    ];
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let addr = client.addr();
            thread::spawn(move || {
                for i in 0..100 {
                    let msg = format!("{w}-{i}");
                    assert_eq!(
                        exchange(addr, msg.as_bytes()),
                        format!("echo:{msg}").as_bytes()
                    );
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    eventually("601 connection lines", DEADLINE, || {
        (client.log.count(&["outcome=ok", "bytes_up="]) == 601).then_some(())
    });
    settled(&client);
    // Descriptors come back to where they were (the pool refills to its size, and connections
    // returned after use retire with the server's idle limit, so allow the pool's extra
    // connections: at most 64, each one descriptor on each side). Threads: no thread per
    // connection; the runtime's blocking pool (name resolution) may keep a few for 10 s.
    for ((fds0, thr0), legate) in base.iter().zip([&client, &server]) {
        eventually("descriptors to return to the baseline", DEADLINE, || {
            (legate.open_fds() <= fds0 + 64).then_some(())
        });
        let now = legate.threads();
        assert!(now <= thr0 + 4, "threads: {thr0} before, {now} after");
    }
}

#[test]
fn consumers_that_reset_leave_the_gauge_at_zero() {
    // The server side counts its TLS connections: the kept multiplexed ones (one per worker
    // thread by default).
    consumers_reset(&["--peer-is-legate", "--threads=1"], 1);
    consumers_reset(&["--peer-is-legate", "--pool-size=3"], 3);
}

fn consumers_reset(client_flags: &[&str], server_conns: i64) {
    let pki = Pki::new();
    let backend = Backend::echo(b"echo:");
    let (server, client) = pair_with_status_and(&pki, &backend, client_flags);
    eventually("the connections to be ready", DEADLINE, || {
        (harness::open_connections(&server) == server_conns).then_some(())
    });
    let mut conns = Vec::new();
    for i in 0..40 {
        let mut s = connect(client.addr());
        let msg = format!("r{i}");
        s.write_all(msg.as_bytes()).unwrap();
        let mut got = vec![0u8; 5 + msg.len()];
        s.read_exact(&mut got).unwrap();
        conns.push(s);
    }
    eventually("40 open connections on the client side", DEADLINE, || {
        (harness::open_connections(&client) == 40).then_some(())
    });
    for s in conns {
        harness::reset_on_close(&s);
        drop(s);
    }
    eventually(
        "the client's gauge back to 0 after the resets",
        DEADLINE,
        || (harness::open_connections(&client) == 0).then_some(()),
    );
    // A reset stream ends alone: the multiplexed connections carry on.
    eventually(
        "the server's gauge back to the ready connections",
        DEADLINE,
        || (harness::open_connections(&server) == server_conns).then_some(()),
    );
    // The tunnel still works.
    assert_eq!(exchange(client.addr(), b"after"), b"echo:after");
}
