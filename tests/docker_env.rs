//! Docker-link variables (issue 18): `--from-docker-env=ALIAS` makes one tunnel per
//! `ALIAS_PORT_<port>_TCP` variable, as a classic ambassador container does. The variables are
//! the set Docker's link documentation shows for a linked Redis, with loopback addresses so the
//! round trip stays on this machine (the documented values themselves are parsed in
//! src/config/docker.rs's unit tests).

mod harness;

use harness::{Legate, Pki, Redis, Reply};

/// Docker's link variables for alias `redis` pointing at `host:port`, plus a UDP port and an
/// alias that is not allowed.
fn link_env(host: &str, port: u16) -> Vec<(String, String)> {
    let p = port.to_string();
    [
        ("REDIS_NAME", "/web/redis".to_string()),
        ("REDIS_PORT", format!("tcp://{host}:{p}")),
        (&*format!("REDIS_PORT_{p}_TCP"), format!("tcp://{host}:{p}")),
        (&*format!("REDIS_PORT_{p}_TCP_PROTO"), "tcp".into()),
        (&*format!("REDIS_PORT_{p}_TCP_PORT"), p.clone()),
        (&*format!("REDIS_PORT_{p}_TCP_ADDR"), host.into()),
        ("REDIS_PORT_5353_UDP", format!("udp://{host}:5353")),
        ("WEB_PORT_80_TCP", format!("tcp://{host}:80")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn start(args: Vec<String>, env: &[(String, String)]) -> Legate {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Legate::start_with_env(&args, 1, &env)
}

#[test]
fn an_ambassador_pair_from_link_variables_carries_redis() {
    let pki = Pki::new();
    let redis = Redis::start();
    // The server ambassador "container" is 127.0.0.2, linked to Redis; the application's
    // client ambassador is 127.0.0.3, linked to the server ambassador. Each listens on the
    // linked port, as Docker's ambassadors do.
    let mut args: Vec<String> = vec![
        "server".into(),
        "--from-docker-env=redis".into(),
        "--listen=127.0.0.2".into(),
        "--allow-cn=client".into(),
    ];
    args.extend(pki.flags("server"));
    let server = start(args, &link_env("127.0.0.1", redis.port));
    let mut args: Vec<String> = vec![
        "client".into(),
        "--from-docker-env=redis".into(),
        "--listen=127.0.0.3".into(),
        "--override-server-name=localhost".into(),
    ];
    args.extend(pki.flags("client"));
    let client = start(args, &link_env("127.0.0.2", redis.port));
    let addr = client.addr();
    assert_eq!(addr.to_string(), format!("127.0.0.3:{}", redis.port));
    let mut s = harness::connect(addr);
    assert_eq!(
        harness::resp(&mut s, &[b"SET", b"linked", b"yes"]).unwrap(),
        Reply::Simple("OK".into())
    );
    assert_eq!(
        redis.command(&["GET", "linked"]),
        Reply::Bulk(Some(b"yes".to_vec()))
    );
    // The UDP link is named and skipped; WEB, not listed, got no tunnel.
    for side in [&server, &client] {
        let log = side.log.text();
        assert!(
            log.contains("UDP link skipped") && log.contains("REDIS_PORT_5353_UDP"),
            "{log}"
        );
        assert_eq!(side.log.count(&["listening"]), 1, "{log}");
        assert!(log.contains("-redis-"), "{log}");
    }
}

#[test]
fn link_variables_are_checked_at_startup() {
    let pki = Pki::new();
    let base = |extra: &[&str]| {
        let mut args: Vec<String> = vec!["client".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(pki.flags("client"));
        args
    };
    let run = |args: Vec<String>, env: &[(String, String)]| {
        let out = std::process::Command::new(harness::legate_bin())
            .args(&args)
            .env_clear()
            .envs(env.iter().cloned())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let env = link_env("127.0.0.2", 6379);
    let e = run(base(&["--from-docker-env=cache"]), &env);
    assert!(e.contains("no CACHE_PORT_<port>_TCP variable"), "{e}");
    let e = run(
        base(&["--from-docker-env=redis", "--target=127.0.0.1:1"]),
        &env,
    );
    assert!(e.contains("drop --target"), "{e}");
    let e = run(base(&["--from-docker-env=redis", "--listen=0.0.0.0"]), &env);
    assert!(e.contains("--unsafe-listen"), "{e}");
    let e = run(
        base(&["--from-docker-env=redis", "--listen=127.0.0.1:7000"]),
        &env,
    );
    assert!(e.contains("give the host only"), "{e}");
}
