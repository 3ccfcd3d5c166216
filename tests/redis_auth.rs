//! Credentials injection (issue 17, first part): a server ambassador authenticates to Redis
//! before the consumer's bytes, so a consumer that sends no AUTH reaches a Redis that wants one.

mod harness;

use std::io::{BufRead, BufReader, Read, Write};

use harness::{Legate, Pki, Redis, Reply, connect};

/// A server ambassador in front of `redis` with the password in `file`, and a client.
fn pair(pki: &Pki, redis: &Redis, file: &std::path::Path) -> (Legate, Legate) {
    let server = Legate::server(
        pki,
        &redis.addr(),
        &[
            "--allow-cn=client",
            &format!("--redis-password-file={}", file.display()),
        ],
    );
    let client = Legate::client(pki, "client", server.addr(), &[]);
    (server, client)
}

#[test]
fn a_consumer_without_auth_reaches_a_requirepass_redis() {
    let pki = Pki::new();
    let redis = Redis::start_with(&["--requirepass", "s3cret pw"]);
    let file = pki.password_file("s3cret pw", 0o600);
    let (server, client) = pair(&pki, &redis, &file);
    let mut s = connect(client.addr());
    assert_eq!(
        harness::resp(&mut s, &[b"SET", b"k", b"v"]).unwrap(),
        Reply::Simple("OK".into())
    );
    assert_eq!(
        harness::resp(&mut s, &[b"GET", b"k"]).unwrap(),
        Reply::Bulk(Some(b"v".to_vec()))
    );
    // The secret is in no log line.
    assert!(
        !server.log.text().contains("s3cret"),
        "{}",
        server.log.text()
    );
}

#[test]
fn an_acl_user_from_the_environment() {
    let pki = Pki::new();
    // redis-server takes a directive's words as separate arguments.
    let redis = Redis::start_with(&[
        "--user", "app", "on", ">apppw", "~*", "&*", "+@all", "--user", "default", "off",
    ]);
    let mut args = vec![
        "server".to_string(),
        "--listen=127.0.0.1:0".into(),
        format!("--target={}", redis.addr()),
        "--allow-cn=client".into(),
        "--redis-user=app".into(),
        "--redis-password-env=CACHE_PW".into(),
    ];
    args.extend(pki.flags("server"));
    let server = Legate::start_with_env(&args, 1, &[("CACHE_PW", "apppw")]);
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    let mut s = connect(client.addr());
    assert_eq!(
        harness::resp(&mut s, &[b"ACL", b"WHOAMI"]).unwrap(),
        Reply::Bulk(Some(b"app".to_vec()))
    );
}

#[test]
fn a_wrong_secret_gives_the_consumer_a_resp_error_then_eof() {
    let pki = Pki::new();
    let redis = Redis::start_with(&["--requirepass", "right"]);
    let file = pki.password_file("wrong", 0o600);
    let (server, client) = pair(&pki, &redis, &file);
    let mut s = connect(client.addr());
    s.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("-ERR legate: upstream authentication failed: WRONGPASS"),
        "{line}"
    );
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "EOF after the error: {rest:?}");
    let logged = server.log.wait_for(&["outcome=auth_failed"]);
    assert!(!logged.contains("wrong"), "{logged}");
}

#[test]
fn a_thousand_pipelined_sets_sent_before_auth_finished_all_apply_in_order() {
    let pki = Pki::new();
    let redis = Redis::start_with(&["--requirepass", "pw"]);
    let file = pki.password_file("pw", 0o600);
    let (_server, client) = pair(&pki, &redis, &file);
    let mut s = connect(client.addr());
    let mut batch = Vec::new();
    for i in 0..1000 {
        let v = i.to_string();
        batch.extend_from_slice(
            format!("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n${}\r\n{v}\r\n", v.len()).as_bytes(),
        );
    }
    // All at once, right after connecting: the ambassador is still authenticating.
    s.write_all(&batch).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    for i in 0..1000 {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, "+OK\r\n", "reply {i}");
    }
    assert_eq!(
        harness::resp(&mut s, &[b"GET", b"k"]).unwrap(),
        Reply::Bulk(Some(b"999".to_vec()))
    );
}

#[test]
fn a_password_file_others_can_read_is_refused_at_startup() {
    let pki = Pki::new();
    let file = pki.password_file("pw", 0o644);
    let mut args: Vec<String> = [
        "server",
        "--listen=127.0.0.1:0",
        "--target=127.0.0.1:6379",
        "--allow-all",
    ]
    .map(String::from)
    .into();
    args.push(format!("--redis-password-file={}", file.display()));
    args.extend(pki.flags("server"));
    let err = harness::refused_at_startup(&args);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("chmod 600") && !err.contains("pw\n"), "{err}");
}

/// A server ambassador with the password in `file` and `--redis-consumer-auth=POLICY`.
fn pair_with_policy(pki: &Pki, redis: &Redis, file: &std::path::Path, policy: &str) -> Legate {
    Legate::server(
        pki,
        &redis.addr(),
        &[
            "--allow-cn=client",
            &format!("--redis-password-file={}", file.display()),
            &format!("--redis-consumer-auth={policy}"),
        ],
    )
}

/// The consumer's own AUTH and HELLO 3 AUTH, carrying a stale password: relayed (Redis refuses
/// them), or answered here (the ambassador's credentials stand and the consumer carries on).
#[test]
fn the_consumers_own_auth_is_passed_on_or_answered_here() {
    let pki = Pki::new();
    let redis = Redis::start_with(&["--requirepass", "current"]);
    let file = pki.password_file("current", 0o600);
    for policy in ["pass", "local"] {
        let server = pair_with_policy(&pki, &redis, &file, policy);
        let client = Legate::client(&pki, "client", server.addr(), &[]);
        let mut s = connect(client.addr());
        let auth = harness::resp(&mut s, &[b"AUTH", b"stale"]).unwrap();
        let hello =
            harness::resp(&mut s, &[b"HELLO", b"3", b"AUTH", b"default", b"stale"]).unwrap();
        match policy {
            "pass" => {
                assert!(
                    matches!(&auth, Reply::Error(e) if e.starts_with("WRONGPASS")),
                    "{auth:?}"
                );
                assert!(
                    matches!(&hello, Reply::Error(e) if e.starts_with("WRONGPASS")),
                    "{hello:?}"
                );
            }
            _ => {
                assert_eq!(auth, Reply::Simple("OK".into()));
                // HELLO reached Redis without its AUTH: the RESP3 map, protocol 3.
                let Reply::Array(fields) = &hello else {
                    panic!("{hello:?}")
                };
                let proto = fields
                    .chunks(2)
                    .find(|kv| kv[0] == Reply::Bulk(Some(b"proto".to_vec())));
                assert_eq!(proto.map(|kv| kv[1].clone()), Some(Reply::Int(3)));
            }
        }
        // Either way the connection is the ambassador's, authenticated: it works.
        assert_eq!(
            harness::resp(&mut s, &[b"SET", policy.as_bytes(), b"1"]).unwrap(),
            Reply::Simple("OK".into())
        );
        // After the leading commands the relay is a byte copy: a later AUTH reaches Redis.
        let late = harness::resp(&mut s, &[b"AUTH", b"stale"]).unwrap();
        assert!(
            matches!(&late, Reply::Error(e) if e.starts_with("WRONGPASS")),
            "{late:?}"
        );
    }
}

#[test]
fn hello_3_authenticates_an_acl_user_in_one_round_trip() {
    let pki = Pki::new();
    let redis = Redis::start_with(&[
        "--user", "app", "on", ">apppw", "~*", "&*", "+@all", "--user", "default", "off",
    ]);
    let file = pki.password_file("apppw", 0o600);
    let server = Legate::server(
        &pki,
        &redis.addr(),
        &[
            "--allow-cn=client",
            "--redis-user=app",
            "--redis-hello=3",
            &format!("--redis-password-file={}", file.display()),
        ],
    );
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    let mut s = connect(client.addr());
    assert_eq!(
        harness::resp(&mut s, &[b"ACL", b"WHOAMI"]).unwrap(),
        Reply::Bulk(Some(b"app".to_vec()))
    );
    // HELLO 3 was what authenticated: the connection speaks RESP3 (a verbatim string here).
    s.write_all(b"*2\r\n$6\r\nCLIENT\r\n$4\r\nINFO\r\n")
        .unwrap();
    let mut got = Vec::new();
    let text = harness::eventually("CLIENT INFO's reply", harness::DEADLINE, || {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).ok()?;
        got.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        text.ends_with("\r\n").then_some(text)
    });
    assert!(
        text.starts_with('=') && text.contains("user=app") && text.contains("resp=3"),
        "{text}"
    );
}

/// A client ambassador straight to a Redis that speaks TLS itself (`--raw`, no legate server):
/// it authenticates over that TLS connection, with the same flags a server side takes.
#[test]
fn a_client_side_authenticates_to_a_redis_that_speaks_tls() {
    let pki = Pki::new();
    let (_redis, tls_port) = Redis::start_tls(&pki, "tlspw");
    let client_for = |secret: &str, policy: &str| {
        let file = pki.password_file(secret, 0o600);
        let mut args = vec![
            "client".to_string(),
            "--listen=127.0.0.1:0".into(),
            format!("--target=localhost:{tls_port}"),
            "--raw".into(),
            format!("--redis-password-file={}", file.display()),
            format!("--redis-consumer-auth={policy}"),
        ];
        args.extend(pki.flags("client"));
        Legate::start(&args, 1)
    };
    let client = client_for("tlspw", "local");
    let mut s = connect(client.addr());
    // A stale password of the consumer's own is answered here; the ambassador's stands.
    assert_eq!(
        harness::resp(&mut s, &[b"AUTH", b"stale"]).unwrap(),
        Reply::Simple("OK".into())
    );
    assert_eq!(
        harness::resp(&mut s, &[b"SET", b"k", b"over tls"]).unwrap(),
        Reply::Simple("OK".into())
    );
    drop(client);
    let wrong = client_for("nope", "pass");
    let mut s = connect(wrong.addr());
    let got = String::from_utf8_lossy(&harness::read_until_closed(&mut s)).into_owned();
    assert!(
        got.starts_with("-ERR legate: upstream authentication failed: WRONGPASS")
            && got.ends_with("\r\n")
            && got.lines().count() == 1,
        "{got}"
    );
    wrong.log.wait_for(&["outcome=auth_failed"]);
}
