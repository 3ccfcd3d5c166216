//! Discovery with real parts: dnsmasq (Debian's `dnsmasq-base`) on a free loopback port as
//! the nameserver, real redis-servers and legate servers. SRV priorities and failover, a new
//! SRV set picked up while an open connection stays where it is, a DNS outage that keeps the
//! last set, each server ambassador checked against its SRV target's name, and a watched file
//! edited by atomic rename.

mod harness;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{
    Backend, DEADLINE, Killed, Legate, Pki, Redis, Reply, connect, eventually, free_port, http_get,
    read_all, status_addr,
};

/// dnsmasq answering for `records` (`--srv-host=...`, `--host-record=...` values) on a UDP and
/// TCP `port` of 127.0.0.1, with a TTL of one second.
fn dnsmasq(port: u16, records: &[String]) -> Killed {
    let child = Command::new("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--conf-file=/dev/null",
            "--pid-file=",
            "--local-ttl=1",
            "--log-facility=-",
        ])
        .arg(format!("--port={port}"))
        .args(records)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq is needed (apt-get install dnsmasq-base)");
    let mut child = Killed(child);
    eventually("dnsmasq to listen", DEADLINE, || {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("dnsmasq exited with {status}");
        }
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
    child
}

fn srv(name: &str, target: &str, port: u16, priority: u16) -> Vec<String> {
    vec![
        format!("--srv-host={name},{target},{port},{priority},1"),
        format!("--host-record={target},127.0.0.1"),
    ]
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// `INCR counter` on a connection through `addr`, returning the new value.
fn incr(s: &mut TcpStream) -> i64 {
    match harness::resp(s, &[b"INCR", b"counter"]).unwrap() {
        Reply::Int(n) => n,
        other => panic!("{other:?}"),
    }
}

/// Which of `redises` holds `key` (set through the tunnel).
fn holder(redises: &[&Redis], key: &str) -> usize {
    let found: Vec<usize> = redises
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            let mut s = TcpStream::connect(r.addr()).unwrap();
            harness::resp(&mut s, &[b"EXISTS", key.as_bytes()]).unwrap() == Reply::Int(1)
        })
        .map(|(i, _)| i)
        .collect();
    assert_eq!(found.len(), 1, "{key} in {found:?}");
    found[0]
}

fn set_through(addr: SocketAddr, key: &str) {
    let mut s = connect(addr);
    assert_eq!(
        harness::resp(&mut s, &[b"SET", key.as_bytes(), b"1"]).unwrap(),
        Reply::Simple("OK".into())
    );
}

#[test]
fn srv_priorities_send_traffic_to_the_first_and_fail_over_to_the_next() {
    let pki = Pki::new();
    let (r10, r20) = (Redis::start(), Redis::start());
    let dns = free_port();
    let mut records = srv(
        "_redis._tcp.cache.test",
        "r10.cache.test",
        port_of(&r10.addr()),
        10,
    );
    records.extend(srv(
        "_redis._tcp.cache.test",
        "r20.cache.test",
        port_of(&r20.addr()),
        20,
    ));
    let _dns = dnsmasq(dns, &records);
    let server = Legate::server(
        &pki,
        "srv:_redis._tcp.cache.test.",
        &[
            "--allow-cn=client",
            &format!("--nameserver=127.0.0.1:{dns}"),
        ],
    );
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    for i in 0..5 {
        let key = format!("first{i}");
        set_through(client.addr(), &key);
        assert_eq!(holder(&[&r10, &r20], &key), 0, "priority 10 first");
    }
    drop(r10);
    for i in 0..5 {
        let key = format!("after{i}");
        set_through(client.addr(), &key);
        let mut s = TcpStream::connect(r20.addr()).unwrap();
        assert_eq!(
            harness::resp(&mut s, &[b"EXISTS", key.as_bytes()]).unwrap(),
            Reply::Int(1)
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
fn a_new_srv_set_is_followed_and_an_outage_keeps_the_last_one() {
    let pki = Pki::new();
    let (old, new) = (Redis::start(), Redis::start());
    let dns = free_port();
    let name = "_redis._tcp.cache.test";
    let dnsmasq_old = dnsmasq(dns, &srv(name, "old.cache.test", port_of(&old.addr()), 10));
    let server = Legate::server(
        &pki,
        "srv:_redis._tcp.cache.test.",
        &[
            "--allow-cn=client",
            "--status=http://127.0.0.1:0",
            &format!("--nameserver=127.0.0.1:{dns}"),
            "--dns-min-interval=200ms",
            "--dns-max-interval=1s",
        ],
    );
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    let mut held = connect(client.addr());
    assert_eq!(incr(&mut held), 1);
    set_through(client.addr(), "a");
    assert_eq!(holder(&[&old, &new], "a"), 0);

    // An outage: the last set is kept, and /_status says what failed.
    drop(dnsmasq_old);
    let status = status_addr(&server);
    eventually("the source to report the outage", DEADLINE, || {
        let doc: serde_json::Value =
            serde_json::from_str(&http_get(status, "/_status", None).body).unwrap();
        let source = &doc["tunnels"][0]["sources"][0];
        (source["error"].is_string() && source["endpoints"] == 1).then_some(())
    });
    let text = http_get(status, "/_metrics/prometheus", None).body;
    for series in ["legate_discovery_failing{", "legate_discovery_endpoints{"] {
        let line = text
            .lines()
            .find(|l| l.starts_with(series))
            .unwrap_or_else(|| panic!("{series} missing: {text}"));
        assert!(line.ends_with(" 1"), "{line}");
    }
    set_through(client.addr(), "b");
    assert_eq!(holder(&[&old, &new], "b"), 0);
    assert_eq!(incr(&mut held), 2);

    // A new set: new connections go there within the interval plus a second.
    let _dnsmasq_new = dnsmasq(dns, &srv(name, "new.cache.test", port_of(&new.addr()), 10));
    let changed = Instant::now();
    let mut i = 0;
    eventually("new connections to reach the new set", DEADLINE, || {
        i += 1;
        let key = format!("c{i}");
        set_through(client.addr(), &key);
        (holder(&[&old, &new], &key) == 1).then_some(())
    });
    // Re-resolution interval (1s at most here, after a back-off of at most 1s) plus a second.
    assert!(
        changed.elapsed() < Duration::from_secs(3),
        "{:?}",
        changed.elapsed()
    );
    // The open connection is untouched: still on the old Redis.
    assert_eq!(incr(&mut held), 3);
    let mut s = TcpStream::connect(old.addr()).unwrap();
    assert_eq!(
        harness::resp(&mut s, &[b"GET", b"counter"]).unwrap(),
        Reply::Bulk(Some(b"3".to_vec()))
    );
}

#[test]
fn each_server_ambassador_is_checked_against_its_srv_target_name() {
    let pki = Pki::new();
    let backend = Backend::echo(b"ok:");
    // s1 and s3 present certificates for their own SRV target names; s2's is for another name
    // (one s1 would pass: any one name for all would let s2 through or keep s3 out).
    for (leaf, name) in [
        ("s1", "s1.amb.test"),
        ("s2", "s1.amb.test"),
        ("s3", "s3.amb.test"),
    ] {
        let mut spec = legate::certs::LeafSpec::new(leaf, legate::certs::Usage::Server);
        spec.names = vec![name.into()];
        pki.issue(leaf, &spec);
    }
    let start = |leaf: &str| {
        let mut args = vec![
            "server".to_string(),
            "--listen=127.0.0.1:0".into(),
            format!("--target={}", backend.target()),
            "--allow-cn=client".into(),
        ];
        args.extend(pki.flags(leaf));
        Legate::start(&args, 1)
    };
    let (s1, s2, s3) = (start("s1"), start("s2"), start("s3"));
    let dns = free_port();
    let name = "_legate._tcp.amb.test";
    let mut records = srv(name, "s1.amb.test", s1.addr().port(), 10);
    records.extend(srv(name, "s2.amb.test", s2.addr().port(), 10));
    records.extend(srv(name, "s3.amb.test", s3.addr().port(), 10));
    let _dns = dnsmasq(dns, &records);
    let mut args = vec![
        "client".to_string(),
        "--listen=127.0.0.1:0".into(),
        "--target=srv:_legate._tcp.amb.test.".into(),
        format!("--nameserver=127.0.0.1:{dns}"),
        "--status=http://127.0.0.1:0".into(),
        "--balance=round-robin".into(),
    ];
    args.extend(pki.flags("client"));
    let client = Legate::start(&args, 1);
    for i in 0..12 {
        let msg = format!("m{i}");
        let mut s = connect(client.addr());
        s.write_all(msg.as_bytes()).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_all(&mut s), format!("ok:{msg}").as_bytes());
    }
    // s2 was tried and refused (its certificate does not carry its name); s1 and s3 served.
    assert_eq!(s2.log.count(&["outcome=ok"]), 0);
    client.log.wait_for(&["s2.amb.test", "handshake"]);
    assert!(s1.log.count(&["outcome=ok"]) >= 3, "{}", s1.log.text());
    assert!(s3.log.count(&["outcome=ok"]) >= 3, "{}", s3.log.text());
    let reply = http_get(status_addr(&client), "/_status", None);
    let doc: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    let endpoints = doc["tunnels"][0]["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 3, "{doc}");
}

/// Writes `text` to `path` as editors and Kubernetes do: a new file renamed over the old.
fn atomic_write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn a_watched_file_is_followed_and_an_invalid_one_keeps_the_last_set() {
    let pki = Pki::new();
    let (a, b) = (Backend::echo(b"a"), Backend::echo(b"b"));
    let file = pki.path("endpoints.toml");
    atomic_write(&file, &format!("endpoints = [\"{}\"]\n", a.target()));
    let server = Legate::server(
        &pki,
        &format!("file:{}", file.display()),
        &["--allow-cn=client"],
    );
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    let first = |addr: SocketAddr| {
        let mut s = connect(addr);
        let mut tag = [0u8; 1];
        s.read_exact(&mut tag).unwrap();
        tag[0]
    };
    assert_eq!(first(client.addr()), b'a');
    atomic_write(&file, &format!("endpoints = [\"{}\"]\n", b.target()));
    eventually("the file's new endpoint", DEADLINE, || {
        (first(client.addr()) == b'b').then_some(())
    });
    atomic_write(&file, "endpoints = [\"not an address\"]\n");
    server.log.wait_for(&["discovery failed", "endpoints.toml"]);
    for _ in 0..5 {
        assert_eq!(first(client.addr()), b'b', "the last good set is kept");
    }
}

#[test]
fn a_route_with_no_endpoint_refuses_with_no_endpoint() {
    let pki = Pki::new();
    let dns = free_port();
    // A nameserver that knows nothing: NXDOMAIN.
    let _dns = dnsmasq(dns, &[]);
    let server = Legate::server(
        &pki,
        "srv:_redis._tcp.nowhere.test.",
        &[
            "--allow-cn=client",
            &format!("--nameserver=127.0.0.1:{dns}"),
        ],
    );
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    let mut s = connect(client.addr());
    let _ = s.write_all(b"PING\r\n");
    assert!(harness::read_until_closed(&mut s).is_empty());
    let line = server.log.wait_for(&["outcome=no_endpoint"]);
    assert!(line.contains("srv:_redis._tcp.nowhere.test."), "{line}");
    client.log.wait_for(&["outcome=refused", "no_endpoint"]);
}

#[test]
fn an_invalid_file_past_the_hold_time_leaves_no_endpoint() {
    let pki = Pki::new();
    let a = Backend::echo(b"a");
    let file = pki.path("endpoints.toml");
    atomic_write(&file, &format!("endpoints = [\"{}\"]\n", a.target()));
    let server = Legate::server(
        &pki,
        &format!("file:{}", file.display()),
        &["--allow-cn=client", "--discovery-hold=3s"],
    );
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    let mut s = connect(client.addr());
    let mut tag = [0u8; 1];
    s.read_exact(&mut tag).unwrap();
    assert_eq!(&tag, b"a");
    atomic_write(&file, "endpoints = [\"not an address\"]\n");
    server
        .log
        .wait_for(&["discovery failed", "keeping the last endpoints"]);
    // Held for 3 s from the last good read, then gone.
    eventually("the hold time to run out", DEADLINE, || {
        let mut s = connect(client.addr());
        let _ = s.write_all(b"x");
        let _ = s.shutdown(Shutdown::Write);
        let answer = harness::read_until_closed(&mut s);
        assert!(answer.is_empty() || answer == b"ax", "{answer:?}");
        answer.is_empty().then_some(())
    });
    server.log.wait_for(&["outcome=no_endpoint"]);
}
