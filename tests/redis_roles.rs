//! Master-only routing (issue 17): `require_role = "master"` on a route with several Redis
//! endpoints, per host behind one client route, and a route that follows Redis Sentinels.
//! Real redis-server processes, real replication, real failovers.

mod harness;

use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use harness::{DEADLINE, Legate, Pki, Redis, Reply, connect, eventually, reached_port};

/// `replica` follows `master`, its link up.
fn replicate(replica: &Redis, master: &Redis) {
    let port = master.port.to_string();
    // "OK", or "OK Already connected to specified master".
    let r = replica.command(&["REPLICAOF", "127.0.0.1", &port]);
    assert!(
        matches!(&r, Reply::Simple(ok) if ok.starts_with("OK")),
        "{r:?}"
    );
    eventually("the replica's link to come up", DEADLINE, || match replica
        .command(&["INFO", "replication"])
    {
        Reply::Bulk(Some(b)) => String::from_utf8_lossy(&b)
            .contains("master_link_status:up")
            .then_some(()),
        _ => None,
    });
    // And the master counts it (ROLE lists a replica once it is online there too).
    eventually(
        "the master to list its replica",
        DEADLINE,
        || match master.command(&["ROLE"]) {
            Reply::Array(r) => {
                matches!(r.get(2), Some(Reply::Array(l)) if !l.is_empty()).then_some(())
            }
            _ => None,
        },
    );
}

fn promote(r: &Redis) {
    assert_eq!(
        r.command(&["REPLICAOF", "NO", "ONE"]),
        Reply::Simple("OK".into())
    );
}

#[test]
fn only_the_master_takes_connections_and_one_left_behind_gets_none() {
    let pki = Pki::new();
    // `alone` is a master with no replicas; `leader` is a master with one: split brain, where
    // `alone` is the one a failover left behind.
    let (alone, leader, replica) = (Redis::start(), Redis::start(), Redis::start());
    replicate(&replica, &leader);
    let server = Legate::server(
        &pki,
        &alone.addr(),
        &[
            "--allow-cn=client",
            &format!("--target={}", leader.addr()),
            &format!("--target={}", replica.addr()),
            "--require-role=master",
        ],
    );
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    for _ in 0..30 {
        assert_eq!(
            reached_port(client.addr()),
            Some(leader.port),
            "{}",
            server.log.text()
        );
    }
    // Take the replica away: two masters, neither with replicas, and both take connections.
    promote(&replica);
    eventually("the other master to be used", DEADLINE, || {
        (0..10)
            .any(|_| reached_port(client.addr()) != Some(leader.port))
            .then_some(())
    });
}

/// A writer on one connection at a time, reconnecting when it ends: counts failed writes and
/// READONLY errors on connections opened after `settled`.
struct Writer {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Tally>,
}

#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    failed: u64,
    readonly_after_settled: u64,
    longest_gap: Duration,
}

impl Writer {
    fn start(addr: std::net::SocketAddr, settled: Arc<AtomicBool>) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut t = Tally::default();
            let mut last_ok = Instant::now();
            let mut i = 0u64;
            while !stopping.load(Ordering::Relaxed) {
                let opened_settled = settled.load(Ordering::SeqCst);
                let Ok(mut s) = TcpStream::connect(addr) else {
                    t.failed += 1;
                    continue;
                };
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                while !stopping.load(Ordering::Relaxed) {
                    i += 1;
                    let v = i.to_string();
                    match harness::resp(&mut s, &[b"SET", b"w", v.as_bytes()]) {
                        Ok(Reply::Simple(_)) => {
                            t.ok += 1;
                            t.longest_gap = t.longest_gap.max(last_ok.elapsed());
                            last_ok = Instant::now();
                        }
                        Ok(Reply::Error(e)) => {
                            t.failed += 1;
                            if e.starts_with("READONLY") && opened_settled {
                                t.readonly_after_settled += 1;
                            }
                        }
                        _ => {
                            t.failed += 1;
                            break;
                        }
                    }
                }
            }
            t
        });
        Writer { stop, handle }
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

#[test]
fn a_swap_of_primary_and_replica_moves_writes_and_closes_sessions_on_the_old_master() {
    let pki = Pki::new();
    let (a, b) = (Redis::start(), Redis::start());
    replicate(&b, &a);
    let server = Legate::server(
        &pki,
        &a.addr(),
        &[
            "--allow-cn=client",
            &format!("--target={}", b.addr()),
            "--require-role=master",
            "--health-interval=200ms",
        ],
    );
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    assert_eq!(reached_port(client.addr()), Some(a.port));
    let settled = Arc::new(AtomicBool::new(false));
    let writer = Writer::start(client.addr(), settled.clone());
    eventually("writes to reach a", DEADLINE, || {
        matches!(a.command(&["GET", "w"]), Reply::Bulk(Some(_))).then_some(())
    });
    // The swap, as an operator (or Sentinel) does it: promote b, then make a its replica.
    promote(&b);
    replicate(&a, &b);
    settled.store(true, Ordering::SeqCst);
    let before = match b.command(&["GET", "w"]) {
        Reply::Bulk(Some(v)) => String::from_utf8_lossy(&v).parse::<u64>().unwrap(),
        other => panic!("{other:?}"),
    };
    eventually("writes to go on at b", DEADLINE, || {
        match b.command(&["GET", "w"]) {
            Reply::Bulk(Some(v)) => {
                (String::from_utf8_lossy(&v).parse::<u64>().unwrap() > before + 2000).then_some(())
            }
            _ => None,
        }
    });
    let tally = writer.finish();
    eprintln!("swap under writes: {tally:?}");
    assert_eq!(tally.readonly_after_settled, 0, "{tally:?}");
    assert!(tally.ok > 1000, "{tally:?}");
    // The session on a was closed by the ambassador once a was a replica.
    server.log.wait_for(&["outcome=not_master"]);
}

#[test]
fn per_host_gating_behind_one_client_route_loses_no_new_connection() {
    let pki = Pki::new();
    let (a, b) = (Redis::start(), Redis::start());
    replicate(&b, &a);
    let gate = |r: &Redis| {
        Legate::server(
            &pki,
            &r.addr(),
            &["--allow-cn=client", "--require-role=master"],
        )
    };
    let (sa, sb) = (gate(&a), gate(&b));
    let client = Legate::client(
        &pki,
        "client",
        sa.addr(),
        &[&format!(
            "--target=127.0.0.1:{},name=localhost",
            sb.addr().port()
        )],
    );
    // New connections, one SET each, while the roles swap. A connection whose life spans a
    // REPLICAOF call could meet either role, so those are counted apart: `swaps` is odd
    // during a call and moves on at each end of it.
    let swaps = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (swaps, stop, addr) = (swaps.clone(), stop.clone(), client.addr());
        std::thread::spawn(move || {
            let (mut ok, mut errors, mut spanning) = (0, Vec::new(), 0);
            while !stop.load(Ordering::SeqCst) {
                let before = swaps.load(Ordering::SeqCst);
                let mut s = connect(addr);
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let r = harness::resp(&mut s, &[b"SET", b"k", b"v"]);
                if before % 2 == 1 || swaps.load(Ordering::SeqCst) != before {
                    spanning += 1;
                } else if matches!(r, Ok(Reply::Simple(_))) {
                    ok += 1;
                } else {
                    errors.push(format!("{r:?}"));
                }
            }
            (ok, errors, spanning)
        })
    };
    let step = |f: &dyn Fn()| {
        std::thread::sleep(Duration::from_millis(300));
        swaps.fetch_add(1, Ordering::SeqCst);
        f();
        swaps.fetch_add(1, Ordering::SeqCst);
    };
    step(&|| promote(&b));
    // Only the command itself is the swap; the resync after it is ordinary running.
    step(&|| {
        let port = b.port.to_string();
        assert_eq!(
            a.command(&["REPLICAOF", "127.0.0.1", &port]),
            Reply::Simple("OK".into())
        );
    });
    replicate(&a, &b);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let (ok, errors, spanning) = worker.join().unwrap();
    eprintln!(
        "per-host gating: {ok} new connections ok, {spanning} spanning a REPLICAOF, errors {errors:?}"
    );
    let failed: Vec<String> = [&client, &sa, &sb]
        .iter()
        .flat_map(|l| {
            l.log
                .text()
                .lines()
                .filter(|l| l.contains("outcome=") && !l.contains("outcome=ok"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .take(12)
        .collect();
    assert!(
        errors.is_empty(),
        "{} errors, first {:?}; lines {failed:#?}",
        errors.len(),
        errors.first()
    );
    assert!(ok > 50, "{ok}");
    // Now every new connection reaches b, through a's ambassador refusing with not_master.
    for _ in 0..10 {
        assert_eq!(reached_port(client.addr()), Some(b.port));
    }
    sa.log.wait_for(&["outcome=not_master"]);
}

/// A real `redis-server --sentinel` watching `master` as "cache" (quorum 2, down after 1 s).
struct Sentinel {
    child: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Sentinel {
    fn start(master: &Redis) -> Sentinel {
        for _ in 0..5 {
            let port = harness::free_port();
            let dir = tempfile::tempdir().unwrap();
            let conf = dir.path().join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor cache 127.0.0.1 {} 2\nsentinel down-after-milliseconds cache 1000\nsentinel failover-timeout cache 10000\n",
                    dir.path().display(),
                    master.port
                ),
            )
            .unwrap();
            if let Some(child) = Sentinel::run(&conf, port) {
                return Sentinel { child, port, dir };
            }
        }
        panic!("no sentinel started on any of 5 ports");
    }

    /// Runs a sentinel with `conf` until it answers on `port`; `None` if it exits first.
    fn run(conf: &std::path::Path, port: u16) -> Option<std::process::Child> {
        let mut child = std::process::Command::new("redis-server")
            .arg(conf)
            .arg("--sentinel")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("redis-server --sentinel");
        let up = eventually("a sentinel to answer or exit", DEADLINE, || {
            if let Ok(Some(_)) = child.try_wait() {
                return Some(false);
            }
            let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
            (harness::resp(&mut s, &[b"PING"]).ok()? == Reply::Simple("PONG".into()))
                .then_some(true)
        });
        up.then_some(child)
    }

    /// Stops it and starts it again on the same port with the configuration it rewrote.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let conf = self.dir.path().join("sentinel.conf");
        self.child = Sentinel::run(&conf, self.port).expect("the sentinel to come back");
    }

    fn command(&self, args: &[&str]) -> Reply {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        harness::resp(&mut s, &args).unwrap()
    }

    /// Clients subscribed to something on this Sentinel.
    fn subscribers(&self) -> usize {
        match self.command(&["CLIENT", "LIST"]) {
            Reply::Bulk(Some(b)) => String::from_utf8_lossy(&b)
                .lines()
                .filter(|l| l.contains(" sub=1 "))
                .count(),
            _ => 0,
        }
    }

    /// Subscribes here to `+switch-master`; the receiver gets the instant each arrives.
    fn announcements(&self) -> std::sync::mpsc::Receiver<Instant> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        harness::resp(&mut s, &[b"SUBSCRIBE", b"+switch-master"]).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(s);
            loop {
                let mut line = String::new();
                if std::io::BufRead::read_line(&mut r, &mut line).unwrap_or(0) == 0 {
                    return;
                }
                if line.contains("+switch-master") {
                    let _ = tx.send(Instant::now());
                }
            }
        });
        rx
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A master, its replica, three Sentinels that know both, and a server ambassador whose
/// target follows them, with a client; new connections reach the master.
fn sentinel_setup(pki: &Pki) -> (Redis, Redis, Vec<Sentinel>, Legate, Legate) {
    let (m, r) = (Redis::start(), Redis::start());
    replicate(&r, &m);
    let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(&m)).collect();
    for s in &sentinels {
        eventually(
            "each sentinel to know the replica and the others",
            DEADLINE,
            || {
                let replicas = matches!(s.command(&["SENTINEL", "REPLICAS", "cache"]), Reply::Array(l) if !l.is_empty());
                let peers = matches!(s.command(&["SENTINEL", "SENTINELS", "cache"]), Reply::Array(l) if l.len() == 2);
                (replicas && peers).then_some(())
            },
        );
    }
    let list: Vec<String> = sentinels
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    let target = format!("sentinel:cache@{}", list.join(","));
    let server = Legate::server(pki, &target, &["--allow-cn=client"]);
    let client = Legate::client(pki, "client", server.addr(), &[]);
    eventually("the route to reach the master", DEADLINE, || {
        (reached_port(client.addr()) == Some(m.port)).then_some(())
    });
    (m, r, sentinels, server, client)
}

/// Polls new connections until one reaches `port`; how long after `since` that was.
fn reached_after(client: &Legate, port: u16, since: Instant) -> Duration {
    eventually("a new connection to reach the new master", DEADLINE, || {
        (reached_port(client.addr()) == Some(port)).then_some(())
    });
    since.elapsed()
}

#[test]
fn a_route_follows_a_sentinel_failover_as_it_is_announced() {
    let pki = Pki::new();
    let (_m, r, sentinels, server, client) = sentinel_setup(&pki);
    let announced = sentinels[1].announcements();
    eventually("SENTINEL FAILOVER to be taken", DEADLINE, || {
        (sentinels[2].command(&["SENTINEL", "FAILOVER", "cache"]) == Reply::Simple("OK".into()))
            .then_some(())
    });
    let at = announced.recv_timeout(DEADLINE).expect("+switch-master");
    let lag = reached_after(&client, r.port, at);
    eprintln!(
        "SENTINEL FAILOVER: new connections reach the new master {lag:?} after +switch-master"
    );
    assert!(lag < Duration::from_millis(500), "{lag:?}");
    server.log.wait_for(&["sentinel announced a new master"]);
}

#[test]
fn a_frozen_master_with_one_sentinel_down_is_failed_over() {
    let pki = Pki::new();
    let (m, r, mut sentinels, server, client) = sentinel_setup(&pki);
    // The Sentinel the route asked first goes away: it moves to the next and subscribes there.
    drop(sentinels.remove(0));
    eventually(
        "the route to subscribe on another sentinel",
        DEADLINE,
        || (sentinels.iter().map(Sentinel::subscribers).sum::<usize>() >= 1).then_some(()),
    );
    let announced = sentinels[0].announcements();
    // A session open on the master when it freezes.
    let mut held = connect(client.addr());
    assert_eq!(
        harness::resp(&mut held, &[b"SET", b"held", b"1"]).unwrap(),
        Reply::Simple("OK".into())
    );
    // SIGSTOP: the master hangs without closing anything; only the Sentinels notice.
    unsafe { libc::kill(m.pid(), libc::SIGSTOP) };
    let at = announced.recv_timeout(DEADLINE).expect("+switch-master");
    let lag = reached_after(&client, r.port, at);
    // The held session is closed by the ambassador, not left hanging on the frozen master.
    held.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut rest = [0u8; 64];
    let ended = std::io::Read::read(&mut held, &mut rest);
    let timed_out = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )
    };
    assert!(
        matches!(&ended, Ok(0)) || matches!(&ended, Err(e) if !timed_out(e)),
        "closed, not timed out: {ended:?}"
    );
    unsafe { libc::kill(m.pid(), libc::SIGCONT) };
    eprintln!(
        "SIGSTOP failover: new connections reach the new master {lag:?} after +switch-master"
    );
    assert!(lag < Duration::from_millis(500), "{lag:?}");
    server.log.wait_for(&["outcome=not_master"]);
}

#[test]
fn a_route_resubscribes_after_its_sentinel_restarts() {
    let pki = Pki::new();
    let (_m, r, mut sentinels, _server, client) = sentinel_setup(&pki);
    let subscribed = |sentinels: &[Sentinel]| {
        eventually("the route to subscribe on a sentinel", DEADLINE, || {
            sentinels.iter().position(|s| s.subscribers() >= 1)
        })
    };
    let first = subscribed(&sentinels);
    sentinels[first].restart();
    // The route asks the Sentinel that last answered first: the restarted one takes it back.
    eventually(
        "the route to subscribe on the restarted sentinel",
        DEADLINE,
        || (sentinels[first].subscribers() >= 1).then_some(()),
    );
    let announced = sentinels[first].announcements();
    let other = (first + 1) % sentinels.len();
    eventually("SENTINEL FAILOVER to be taken", DEADLINE, || {
        (sentinels[other].command(&["SENTINEL", "FAILOVER", "cache"]) == Reply::Simple("OK".into()))
            .then_some(())
    });
    let at = announced.recv_timeout(DEADLINE).expect("+switch-master");
    let lag = reached_after(&client, r.port, at);
    assert!(lag < Duration::from_millis(500), "{lag:?}");
}
