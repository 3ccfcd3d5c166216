//! Multiplexed legate/1: every consumer connection of a client tunnel is a stream on one TLS
//! connection; each stream has its own flow-control window, and a stream the server never took
//! is opened again on a fresh connection without losing or repeating a byte.

mod harness;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::thread;

use harness::{Backend, Legate, Pki};

/// Resident memory of a process, in bytes.
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

#[test]
fn concurrent_consumers_share_one_tls_connection() {
    let pki = Pki::new();
    let backend = Backend::echo(b"ok:");
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    // One worker thread, so one kept connection (the default is one per thread).
    let client = Legate::client(&pki, "client", server.addr(), &["--threads=1"]);
    let addr = client.addr();
    let workers: Vec<_> = (0..20)
        .map(|w| {
            thread::spawn(move || {
                for i in 0..5 {
                    let msg = format!("worker {w} request {i}");
                    assert_eq!(
                        harness::exchange(addr, msg.as_bytes()),
                        format!("ok:{msg}").into_bytes()
                    );
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    harness::eventually("100 streams in the server log", harness::DEADLINE, || {
        (server.log.count(&["connection closed", "outcome=ok"]) == 100).then_some(())
    });
    // Each stream is logged with its TLS connection's peer address: one connection for all.
    let peers = harness::stream_peers(&server.log);
    assert_eq!(
        peers.len(),
        1,
        "100 streams used {} TLS connections",
        peers.len()
    );
    assert_eq!(backend.accepted(), 100);
}

#[test]
fn a_consumer_that_does_not_read_holds_up_neither_the_others_nor_memory() {
    const BLAST: usize = 64 * 1024 * 1024;
    let pattern = |i: usize| (i % 253) as u8;
    let pki = Pki::new();
    // "A" gets 64 MiB at once; anything else is echoed.
    let backend = Backend::start(move |mut s| {
        let mut first = [0u8; 1];
        if s.read_exact(&mut first).is_err() {
            return;
        }
        if &first == b"A" {
            let chunk: Vec<u8> = (0..BLAST / 64).map(pattern).collect();
            for _ in 0..64 {
                if s.write_all(&chunk).is_err() {
                    return;
                }
            }
            let _ = s.shutdown(Shutdown::Write);
            return;
        }
        s.write_all(&first).unwrap();
        let mut buf = [0u8; 4096];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s.shutdown(Shutdown::Write);
    });
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    assert_eq!(harness::exchange(client.addr(), b"warm"), b"warm");
    let (client_before, server_before) = (rss(client.pid()), rss(server.pid()));

    let mut slow = harness::connect(client.addr());
    slow.write_all(b"A").unwrap();
    // While the slow consumer reads nothing, the others get through on the same connection.
    for i in 0..50 {
        let msg = format!("B{i}");
        assert_eq!(
            harness::exchange(client.addr(), msg.as_bytes()),
            msg.as_bytes()
        );
    }
    // The stalled stream holds at most its window (1 MiB) in each ambassador, plus socket
    // buffers: not the 64 MiB the backend wants to send.
    let (client_grew, server_grew) = (
        rss(client.pid()).saturating_sub(client_before),
        rss(server.pid()).saturating_sub(server_before),
    );
    assert!(
        client_grew < 16 << 20,
        "client side grew by {client_grew} bytes"
    );
    assert!(
        server_grew < 16 << 20,
        "server side grew by {server_grew} bytes"
    );

    // And every byte arrives once the consumer reads.
    let mut got = Vec::with_capacity(BLAST);
    slow.read_to_end(&mut got).unwrap();
    assert_eq!(got.len(), BLAST);
    assert!(
        got.chunks(BLAST / 64)
            .all(|c| c.iter().enumerate().all(|(i, b)| *b == pattern(i))),
        "the slow stream's bytes came back changed"
    );
}

#[test]
fn a_stream_on_a_dead_connection_is_opened_again_without_losing_or_repeating_bytes() {
    harness::a_dead_connection_is_replaced(
        &["--peer-is-legate"],
        &["multiplexed connection ready"],
        "stream was not taken; opening it on a fresh connection",
    );
}

#[test]
fn pool_size_zero_gives_each_consumer_a_connection_of_its_own() {
    let pki = Pki::new();
    let backend = Backend::echo(b"ok:");
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    let client = Legate::client(&pki, "client", server.addr(), &["--pool-size=0"]);
    for i in 0..3 {
        let msg = format!("one {i}");
        assert_eq!(
            harness::exchange(client.addr(), msg.as_bytes()),
            format!("ok:{msg}").into_bytes()
        );
    }
    harness::eventually("3 streams in the server log", harness::DEADLINE, || {
        (server.log.count(&["connection closed", "outcome=ok"]) == 3).then_some(())
    });
    assert_eq!(
        harness::stream_peers(&server.log).len(),
        3,
        "three consumers, three TLS connections"
    );
}

/// A client of `server` with `flags` (and --peer-is-legate), once it keeps `kept` connections.
fn client_keeping(pki: &Pki, server: &Legate, flags: &[&str], kept: usize) -> Legate {
    let mut flags = flags.to_vec();
    flags.push("--peer-is-legate");
    let client = Legate::client(pki, "client", server.addr(), &flags);
    let kept = format!("kept={kept}");
    client
        .log
        .wait_for(&["multiplexed connection ready", kept.as_str()]);
    client
}

#[test]
fn streams_spread_over_the_kept_connections() {
    let pki = Pki::new();
    let backend = Backend::echo(b"ok:");
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    let client = client_keeping(&pki, &server, &["--pool-size=3"], 3);
    // Three consumers open at once go to the connection with the fewest streams: one each.
    let mut held = Vec::new();
    for i in 0..3 {
        let mut s = harness::connect(client.addr());
        let msg = format!("held {i}");
        s.write_all(msg.as_bytes()).unwrap();
        let mut got = vec![0u8; 3 + msg.len()];
        s.read_exact(&mut got).unwrap();
        held.push(s);
    }
    drop(held);
    harness::eventually("3 streams in the server log", harness::DEADLINE, || {
        (server.log.count(&["connection closed", "outcome=ok"]) == 3).then_some(())
    });
    assert_eq!(harness::stream_peers(&server.log).len(), 3);
}

#[test]
fn the_pool_keeps_a_connection_per_worker_thread_by_default() {
    let pki = Pki::new();
    let backend = Backend::echo(b"ok:");
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    // Three worker threads and no --pool-size: three kept connections, so the streams' TLS
    // work is not held to one thread.
    let client = client_keeping(&pki, &server, &["--threads=3"], 3);
    assert_eq!(harness::exchange(client.addr(), b"spread"), b"ok:spread");
    // --pool-size still decides when given: one thread, two connections.
    client_keeping(&pki, &server, &["--threads=1", "--pool-size=2"], 2);
}

#[test]
fn streams_count_against_the_servers_connection_limit() {
    let pki = Pki::new();
    let backend = Backend::echo(b"ok:");
    // Each stream counts as a connection: two fill a limit of two.
    let server = Legate::server(
        &pki,
        &backend.target(),
        &["--allow-cn=client", "--max-concurrent-conns=2"],
    );
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    let hold = |tag: &str| {
        let mut s = harness::connect(client.addr());
        s.write_all(tag.as_bytes()).unwrap();
        let mut got = vec![0u8; 3 + tag.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, format!("ok:{tag}").into_bytes());
        s
    };
    let first = hold("one");
    let _second = hold("two");
    // The third is refused, and the client says why.
    let mut third = harness::connect(client.addr());
    third.write_all(b"three").unwrap();
    assert_eq!(harness::read_until_closed(&mut third), b"");
    let line = client.log.wait_for(&["outcome=refused"]);
    assert!(line.contains("connection limit"), "{line}");
    assert_eq!(backend.accepted(), 2);
    // A place freed is a place taken.
    drop(first);
    harness::eventually("a freed place", harness::DEADLINE, || {
        let mut s = harness::connect(client.addr());
        s.write_all(b"four").ok()?;
        s.shutdown(Shutdown::Write).ok()?;
        (harness::read_until_closed(&mut s) == b"ok:four").then_some(())
    });
}

#[test]
fn a_target_reset_after_its_half_close_ends_the_consumer_connection_at_once() {
    let pki = Pki::new();
    let (reset_tx, reset_rx) = std::sync::mpsc::channel();
    let reset_tx = std::sync::Mutex::new(reset_tx);
    // The target ends its direction cleanly, takes 1 MiB, then closes with bytes unread: a
    // reset. The consumer's direction is then open, out of window, with nothing coming back.
    let backend = Backend::start(move |mut s| {
        s.shutdown(Shutdown::Write).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        s.read_exact(&mut buf).unwrap();
        drop(s);
        reset_tx
            .lock()
            .unwrap()
            .send(std::time::Instant::now())
            .unwrap();
    });
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    let client = Legate::client(&pki, "client", server.addr(), &["--close-timeout=60s"]);
    let mut consumer = harness::connect(client.addr());
    let mut sink = consumer.try_clone().unwrap();
    // Bounded: with the connection held open, writes stall, and the test fails at the deadline.
    sink.set_write_timeout(Some(harness::DEADLINE)).unwrap();
    let writer = thread::spawn(move || {
        let chunk = vec![1u8; 64 * 1024];
        while sink.write_all(&chunk).is_ok() {}
        std::time::Instant::now()
    });
    // The target's direction ended cleanly: EOF for the consumer.
    assert_eq!(harness::read_all(&mut consumer), b"");
    let reset_at = reset_rx.recv_timeout(harness::DEADLINE).unwrap();
    // Writes fail once the client side has closed the consumer's connection: well within the
    // 60 s close timeout, and before the harness's deadline.
    let cut_at = writer.join().unwrap();
    let took = cut_at.saturating_duration_since(reset_at);
    assert!(
        took < std::time::Duration::from_secs(5),
        "cut {took:?} after the reset"
    );
}
