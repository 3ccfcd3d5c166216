//! A real redis-server behind a legate server, a legate client in front, with certificates
//! written by `legate gen-certs`.

mod harness;

use std::process::Command;
use std::thread;

use harness::{Legate, Redis, Reply, connect, legate_bin, resp};

/// Runs `legate gen-certs` into a temp dir and returns it.
fn gen_certs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(legate_bin())
        .args(["gen-certs", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "gen-certs failed: {out:?}");
    dir
}

fn flags(dir: &std::path::Path, leaf: &str) -> Vec<String> {
    vec![
        format!("--cert={}", dir.join(format!("{leaf}.crt")).display()),
        format!("--key={}", dir.join(format!("{leaf}.key")).display()),
        format!("--cacert={}", dir.join("ca.crt").display()),
    ]
}

/// redis ← legate server ← legate client, all on loopback.
fn tunnel(redis: &Redis, certs: &std::path::Path) -> (Legate, Legate) {
    let mut args = vec![
        "server".to_string(),
        "--listen=127.0.0.1:0".into(),
        format!("--target={}", redis.addr()),
        "--allow-cn=client".into(),
    ];
    args.extend(flags(certs, "server"));
    let server = Legate::start(&args, 1);
    let mut args = vec![
        "client".to_string(),
        "--listen=127.0.0.1:0".into(),
        format!("--target=localhost:{}", server.addr().port()),
    ];
    args.extend(flags(certs, "client"));
    let client = Legate::start(&args, 1);
    (server, client)
}

#[test]
fn ping_set_get_through_the_tunnel() {
    let redis = Redis::start();
    let certs = gen_certs();
    let (server, client) = tunnel(&redis, certs.path());
    let mut s = connect(client.addr());
    assert_eq!(
        resp(&mut s, &[b"PING"]).unwrap(),
        Reply::Simple("PONG".into())
    );
    assert_eq!(
        resp(&mut s, &[b"SET", b"greeting", b"hello"]).unwrap(),
        Reply::Simple("OK".into())
    );
    assert_eq!(
        resp(&mut s, &[b"GET", b"greeting"]).unwrap(),
        Reply::Bulk(Some(b"hello".to_vec()))
    );
    drop(s);
    // Both sides log the connection's end with the peer identity and byte counts.
    let line = server.log.wait_for(&["connection closed", "outcome=ok"]);
    assert!(line.contains("identity=\"CN=client\""), "{line}");
    assert!(
        line.contains("bytes_up=") && line.contains("duration_ms="),
        "{line}"
    );
    client
        .log
        .wait_for(&["connection closed", "outcome=ok", "CN=localhost"]);
}

#[test]
fn a_64_mib_value_arrives_byte_exact() {
    let redis = Redis::start();
    let certs = gen_certs();
    let (_server, client) = tunnel(&redis, certs.path());
    let value: Vec<u8> = (0..64 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut s = connect(client.addr());
    assert_eq!(
        resp(&mut s, &[b"SET", b"big", &value]).unwrap(),
        Reply::Simple("OK".into())
    );
    let got = resp(&mut s, &[b"GET", b"big"]).unwrap();
    let Reply::Bulk(Some(got)) = got else {
        panic!("GET big returned {got:?}")
    };
    assert_eq!(got.len(), value.len());
    assert!(got == value, "the value came back changed");
    // And the direct view agrees: redis holds exactly what was sent.
    let mut direct = connect(format!("127.0.0.1:{}", redis.port).parse().unwrap());
    assert_eq!(
        resp(&mut direct, &[b"STRLEN", b"big"]).unwrap(),
        Reply::Int(value.len() as i64)
    );
}

#[test]
fn a_hundred_concurrent_clients() {
    let redis = Redis::start();
    let certs = gen_certs();
    let (server, client) = tunnel(&redis, certs.path());
    let addr = client.addr();
    // Every connection is open at once before any of them sends its commands.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(100));
    let workers: Vec<_> = (0..100)
        .map(|i| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut s = connect(addr);
                barrier.wait();
                let key = format!("key-{i}");
                let val = format!("value-{i}");
                assert_eq!(
                    resp(&mut s, &[b"SET", key.as_bytes(), val.as_bytes()]).unwrap(),
                    Reply::Simple("OK".into())
                );
                assert_eq!(
                    resp(&mut s, &[b"GET", key.as_bytes()]).unwrap(),
                    Reply::Bulk(Some(val.into_bytes()))
                );
            })
        })
        .collect();
    for w in workers {
        w.join().expect("a client failed");
    }
    harness::eventually("100 closed connections", harness::DEADLINE, || {
        (server.log.count(&["connection closed", "outcome=ok"]) == 100).then_some(())
    });
    let mut s = connect(client.addr());
    assert_eq!(resp(&mut s, &[b"DBSIZE"]).unwrap(), Reply::Int(100));
}
