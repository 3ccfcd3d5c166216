//! Upstreams with several endpoints, on both sides: weighted round robin and power of two
//! choices, failover on a failed connect (server side: to the next service instance; client
//! side: to the next server ambassador, with the consumer's early bytes), passive health
//! ejecting a dead endpoint and readmitting it once it answers, and `/_status` listing each
//! endpoint.

mod harness;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use harness::{
    Backend, DEADLINE, Legate, Pki, Redis, Reply, connect, eventually, exchange, free_port,
    http_get, read_all, status_addr, steady_consumers,
};

/// The first tunnel's endpoints in `/_status`, as (address, state, open).
fn endpoints(legate: &Legate) -> Vec<(String, String, u64)> {
    let reply = http_get(status_addr(legate), "/_status", None);
    let doc: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    doc["tunnels"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_string(),
                e["state"].as_str().unwrap().to_string(),
                e["open"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn state_of(legate: &Legate, addr: &str) -> String {
    endpoints(legate)
        .into_iter()
        .find(|e| e.0 == addr)
        .unwrap_or_else(|| panic!("{addr} not listed"))
        .1
}

#[test]
fn weighted_round_robin_splits_one_to_three() {
    let pki = Pki::new();
    let (a, b) = (Backend::echo(b"a"), Backend::echo(b"b"));
    let server = Legate::server(
        &pki,
        &a.target(),
        &[
            "--allow-cn=client",
            &format!("--target={},weight=3", b.target()),
            "--balance=round-robin",
        ],
    );
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    let mut counts = BTreeMap::new();
    for _ in 0..400 {
        let tag = exchange(client.addr(), b"")[0];
        *counts.entry(tag).or_insert(0) += 1;
    }
    let share_a = f64::from(counts[&b'a']) / 400.0;
    assert!((share_a - 0.25).abs() <= 0.07, "{counts:?}");
    assert_eq!(counts[&b'a'] + counts[&b'b'], 400);
}

#[test]
fn power_of_two_choices_spreads_held_connections_evenly() {
    let pki = Pki::new();
    let backends = [
        Backend::echo(b"0"),
        Backend::echo(b"1"),
        Backend::echo(b"2"),
    ];
    let flags: Vec<String> = backends[1..]
        .iter()
        .map(|b| format!("--target={}", b.target()))
        .chain([
            "--allow-cn=client".into(),
            "--status=http://127.0.0.1:0".into(),
        ])
        .collect();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = Legate::server(&pki, &backends[0].target(), &flags);
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut s = connect(client.addr());
        let mut tag = [0u8; 1];
        s.read_exact(&mut tag).unwrap();
        held.push(s);
    }
    let open: Vec<u64> = endpoints(&server).iter().map(|e| e.2).collect();
    assert_eq!(open.iter().sum::<u64>(), 10, "{open:?}");
    let (min, max) = (open.iter().min().unwrap(), open.iter().max().unwrap());
    assert!(max - min <= 2, "{open:?}");
    drop(held);
    eventually("the open counts to fall", DEADLINE, || {
        endpoints(&server).iter().all(|e| e.2 == 0).then_some(())
    });
}

#[test]
fn a_dead_service_endpoint_is_skipped_ejected_and_readmitted_when_it_answers() {
    let pki = Pki::new();
    let live = Backend::echo(b"live:");
    let dead_port = free_port();
    let dead = format!("127.0.0.1:{dead_port}");
    let server = Legate::server(
        &pki,
        &dead,
        &[
            "--allow-cn=client",
            &format!("--target={}", live.target()),
            "--balance=round-robin",
            "--status=http://127.0.0.1:0",
            "--connect-timeout=2s",
        ],
    );
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    // Every consumer gets through, whichever endpoint the balancer tried first.
    for i in 0..10 {
        let msg = format!("m{i}");
        let reply = exchange(client.addr(), msg.as_bytes());
        assert_eq!(reply, format!("live:{msg}").as_bytes());
    }
    assert_eq!(state_of(&server, &dead), "ejected");
    server
        .log
        .wait_for(&["endpoint ejected after failed connects", &dead]);

    // It comes back: after the back-off it is tried on probation and readmitted.
    let revived = Backend::echo_on(TcpListener::bind(&dead).unwrap(), b"back:");
    let started = Instant::now();
    eventually("the revived endpoint to be readmitted", DEADLINE, || {
        let reply = exchange(client.addr(), b"x");
        assert!(reply == b"live:x" || reply == b"back:x", "{reply:?}");
        (state_of(&server, &dead) == "healthy" && revived.accepted() >= 2).then_some(())
    });
    assert!(started.elapsed() < Duration::from_secs(15));
    server.log.wait_for(&["endpoint readmitted", &dead]);
}

#[test]
fn routes_take_several_endpoints_from_repeated_flags_and_toml_lists() {
    let pki = Pki::new();
    let (a, b) = (Backend::echo(b"a"), Backend::echo(b"b"));
    let dir = tempfile::tempdir().unwrap();
    let config = harness::write_config(
        dir.path(),
        &format!(
            "[tunnels.cache]\nside = \"server\"\nlisten = \"127.0.0.1:0\"\nallow_all = true\n{}\
             [tunnels.cache.routes]\n\
             both = {{ target = [\"{}\", \"{},weight=1\"], balance = \"round-robin\" }}\n",
            pki.toml_files("server"),
            a.target(),
            b.target()
        ),
    );
    let server = Legate::start(&["run".into(), format!("--config={}", config.display())], 1);
    let client = Legate::client(&pki, "client", server.addr(), &["--route=both"]);
    let tags: Vec<u8> = (0..4).map(|_| exchange(client.addr(), b"")[0]).collect();
    assert_eq!(tags.iter().filter(|t| **t == b'a').count(), 2, "{tags:?}");

    // Flags: the same route name twice is one route with two endpoints.
    let server = Legate::server(
        &pki,
        &a.target(),
        &[
            "--allow-all",
            &format!("--route=both={}", a.target()),
            &format!("--route=both={}", b.target()),
            "--balance=round-robin",
        ],
    );
    let client = Legate::client(&pki, "client", server.addr(), &["--route=both"]);
    let tags: Vec<u8> = (0..4).map(|_| exchange(client.addr(), b"")[0]).collect();
    assert_eq!(tags.iter().filter(|t| **t == b'b').count(), 2, "{tags:?}");
}

#[test]
fn a_killed_server_ambassador_costs_no_consumer_an_error() {
    let pki = Pki::new();
    let redis = Redis::start();
    let mut servers: Vec<Legate> = (0..3)
        .map(|_| Legate::server(&pki, &redis.addr(), &["--allow-cn=client"]))
        .collect();
    let targets: Vec<String> = servers
        .iter()
        .skip(1)
        .map(|s| format!("--target=localhost:{}", s.addr().port()))
        .chain(["--status=http://127.0.0.1:0".into()])
        .collect();
    let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
    let client = Legate::client(&pki, "client", servers[0].addr(), &targets);
    let incr = |n: usize| {
        for _ in 0..n {
            let mut s = connect(client.addr());
            let reply = harness::resp(&mut s, &[b"INCR", b"counter"]).unwrap();
            assert!(matches!(reply, Reply::Int(_)), "{reply:?}");
        }
    };
    incr(30);
    // Every server ambassador took some.
    for s in &servers {
        assert!(s.log.count(&["outcome=ok"]) > 0, "{}", s.log.text());
    }
    // Every one of those has ended (and been logged) before the kill: what fails after it
    // was opened after it.
    eventually("the first 30 to be logged", DEADLINE, || {
        let ended = client.log.count(&["connection closed"])
            + client.log.count(&["WARN connection failed"]);
        (ended >= 30).then_some(())
    });
    let failed_before = client.log.count(&["WARN connection failed"]);
    let victim = servers.remove(1);
    victim.signal(libc::SIGKILL);
    let mut victim = victim;
    victim.wait_exit(DEADLINE);
    // Connections opened after the kill: none fails.
    incr(60);
    let mut s = connect(client.addr());
    assert_eq!(
        harness::resp(&mut s, &[b"GET", b"counter"]).unwrap(),
        Reply::Bulk(Some(b"90".to_vec()))
    );
    assert_eq!(
        client.log.count(&["WARN connection failed"]),
        failed_before,
        "{}",
        client.log.text()
    );
}

#[test]
fn client_failover_carries_the_early_bytes_to_the_next_server() {
    let pki = Pki::new();
    let backend = Backend::echo(b"ok:");
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    // The first server in the list is not there at all.
    let nowhere = free_port();
    let client = Legate::client(
        &pki,
        "client",
        format!("127.0.0.1:{nowhere}").parse().unwrap(),
        &[
            &format!("--target=localhost:{}", server.addr().port()),
            "--balance=round-robin",
        ],
    );
    for i in 0..6 {
        // Sent at once: these bytes travel with the stream's OPEN (or the raw connection) and
        // must reach the service exactly once, whichever server was tried first.
        let msg = format!("early bytes {i}");
        assert_eq!(
            exchange(client.addr(), msg.as_bytes()),
            format!("ok:{msg}").as_bytes()
        );
    }
    assert_eq!(
        client.log.count(&["WARN connection failed"]),
        0,
        "{}",
        client.log.text()
    );
}

#[test]
fn status_lists_every_endpoint_and_a_route_is_up_while_one_endpoint_is() {
    let pki = Pki::new();
    let live = Backend::echo(b"");
    let dead = format!("127.0.0.1:{}", free_port());
    let server = Legate::server(
        &pki,
        &live.target(),
        &[
            "--allow-all",
            &format!("--target={dead},weight=2"),
            "--status=http://127.0.0.1:0",
        ],
    );
    let reply = http_get(status_addr(&server), "/_status", None);
    assert_eq!(reply.code, 200, "{}", reply.body);
    let doc: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    let listed = &doc["tunnels"][0]["endpoints"];
    assert_eq!(listed[0]["address"], live.target());
    assert_eq!(listed[1]["address"], dead);
    assert_eq!(listed[1]["weight"], 2);
    assert_eq!(
        doc["forward_address"],
        format!("{} {dead},weight=2", live.target())
    );
}

#[test]
fn a_reload_that_changes_only_targets_takes_them_in_place() {
    let pki = Pki::new();
    let (one, two) = (Backend::echo(b"1"), Backend::echo(b"2"));
    // Client side: its server ambassador moves from server_1 to server_2.
    let server_1 = Legate::server(&pki, &one.target(), &["--allow-cn=client"]);
    let server_2 = Legate::server(&pki, &two.target(), &["--allow-cn=client"]);
    let (a, b) = (Backend::echo(b"a"), Backend::echo(b"b"));
    let dir = tempfile::tempdir().unwrap();
    let config = |front: SocketAddr, back: &Backend| {
        format!(
            "status = \"http://127.0.0.1:0\"\n[tunnels.front]\nside = \"client\"\nlisten = \"127.0.0.1:0\"\ntarget = \"localhost:{}\"\n{}\
             [tunnels.back]\nside = \"server\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{}\"\nallow_all = true\n{}",
            front.port(),
            pki.toml_files("client"),
            back.target(),
            pki.toml_files("server"),
        )
    };
    let path = harness::write_config(dir.path(), &config(server_1.addr(), &a));
    let legate = Legate::start(&["run".into(), format!("--config={}", path.display())], 2);
    let (front, back) = (legate.addrs["front"], legate.addrs["back"]);
    // Server side: consumers reach "back" through a client of their own; its target moves a → b.
    let to_back = Legate::client(&pki, "client", back, &[]);
    assert_eq!(exchange(front, b"x"), b"1x");
    assert_eq!(exchange(to_back.addr(), b"x"), b"ax");
    // Connections open across the reload stay where they are.
    let mut held_front = connect(front);
    let mut held_back = connect(to_back.addr());
    let mut tag = [0u8; 1];
    held_front.read_exact(&mut tag).unwrap();
    assert_eq!(&tag, b"1");
    held_back.read_exact(&mut tag).unwrap();
    assert_eq!(&tag, b"a");

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let consumers = [
        steady_consumers(front, stop.clone(), done.clone()),
        steady_consumers(to_back.addr(), stop.clone(), done.clone()),
    ];
    eventually("consumers before the reload", DEADLINE, || {
        (done.load(Ordering::SeqCst) >= 20).then_some(())
    });
    let before = done.load(Ordering::SeqCst);
    std::fs::write(&path, config(server_2.addr(), &b)).unwrap();
    legate.signal(libc::SIGHUP);
    legate
        .log
        .wait_for(&["targets updated in place", "tunnel=front"]);
    legate
        .log
        .wait_for(&["targets updated in place", "tunnel=back"]);
    let reloaded = legate.log.wait_for(&["config reloaded"]);
    assert!(reloaded.contains("changed=[]"), "{reloaded}");
    eventually("consumers to reach the new targets", DEADLINE, || {
        (exchange(front, b"x") == b"2x" && exchange(to_back.addr(), b"x") == b"bx").then_some(())
    });
    eventually("consumers after the reload", DEADLINE, || {
        (done.load(Ordering::SeqCst) >= before + 20).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    for c in consumers {
        let (answers, failures) = c.join().unwrap();
        assert!(failures.is_empty(), "{failures:?} ({answers:?})");
        assert!(answers.len() == 2, "both targets answered: {answers:?}");
    }
    for (held, want) in [(&mut held_front, b"1"), (&mut held_back, b"a")] {
        held.write_all(b"still").unwrap();
        held.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_all(held), b"still", "echoed by {:?}", want);
    }
    // The listeners never moved: no tunnel listened anew.
    assert_eq!(
        legate.log.count(&["INFO listening"]),
        2,
        "{}",
        legate.log.text()
    );
    // Endpoint series follow the list: the old endpoints' are gone.
    let text = http_get(status_addr(&legate), "/_metrics/prometheus", None).body;
    let series = |addr: &str| format!("endpoint=\"{addr}\"}}");
    assert!(text.contains(&series(&b.target())), "{text}");
    assert!(!text.contains(&series(&a.target())), "{text}");
}

#[test]
fn active_checks_take_a_dead_endpoint_out_before_any_consumer_meets_it() {
    let pki = Pki::new();
    let live = Backend::echo(b"live:");
    let flaky = TcpListener::bind("127.0.0.1:0").unwrap();
    let flaky_addr = flaky.local_addr().unwrap().to_string();
    let server = Legate::server(
        &pki,
        &live.target(),
        &[
            "--allow-cn=client",
            &format!("--target={flaky_addr}"),
            "--balance=round-robin",
            "--status=http://127.0.0.1:0",
            "--health-interval=100ms",
            "--health-fall=2",
            "--health-rise=2",
        ],
    );
    assert_eq!(state_of(&server, &flaky_addr), "healthy");
    drop(flaky);
    eventually("the checks to take it down", DEADLINE, || {
        (state_of(&server, &flaky_addr) == "down").then_some(())
    });
    server
        .log
        .wait_for(&["endpoint down: health checks fail", &flaky_addr]);
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    for i in 0..6 {
        let msg = format!("m{i}");
        assert_eq!(
            exchange(client.addr(), msg.as_bytes()),
            format!("live:{msg}").as_bytes()
        );
    }
    // No consumer was sent to it: its passive health never saw a failed connect.
    assert_eq!(server.log.count(&["endpoint ejected"]), 0);
    let back = TcpListener::bind(&flaky_addr).unwrap();
    eventually("the checks to bring it back", DEADLINE, || {
        (state_of(&server, &flaky_addr) == "healthy").then_some(())
    });
    server
        .log
        .wait_for(&["endpoint up: health checks pass again", &flaky_addr]);
    drop(back);
}
