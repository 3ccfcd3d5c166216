//! Drop-in for ghostunnel: its command lines (`--flag=value`, PKCS#12, `unix:` addresses), its
//! `/_status` and `/_metrics` shapes read by `curl`, its metrics moving as ghostunnel's do
//! (churn, a handshake flood, descriptor exhaustion), `--max-conn-lifetime`,
//! `--target-status`, `--enable-pprof`, and its checks at its moments (`--verify-*` inside the
//! handshake, `--disable-authentication` asking for no certificate, `--connect-timeout`
//! bounding the incoming handshake).

mod harness;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::{
    Backend, DEADLINE, Legate, Pki, connect, eventually, exchange, ghost_metrics, http_get,
    legate_bin, pkcs12, read_until_closed, refused_at_startup, status_addr,
};

const COUNTERS: [&str; 6] = [
    "accept.total",
    "accept.success",
    "accept.error",
    "accept.timeout",
    "conn.open",
    "conn.timeout",
];
const TIMER: [&str; 8] = [
    "count",
    "min",
    "max",
    "mean",
    "50-percentile",
    "75-percentile",
    "95-percentile",
    "99-percentile",
];

/// Every series ghostunnel reports, under `prefix`.
fn series(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = COUNTERS.iter().map(|c| format!("{prefix}.{c}")).collect();
    for timer in ["conn.handshake", "conn.lifetime"] {
        names.extend(TIMER.iter().map(|s| format!("{prefix}.{timer}.{s}")));
    }
    names.sort();
    names
}

/// The value of ghostunnel series `name` (default prefix) at `status`.
fn metric(status: SocketAddr, name: &str) -> f64 {
    let all = ghost_metrics(status, "/_metrics");
    *all.get(&format!("ghostunnel.{name}"))
        .unwrap_or_else(|| panic!("{name} missing: {all:?}"))
}

/// Waits until series `name` at `status` is `want`.
fn metric_becomes(status: SocketAddr, name: &str, want: f64) {
    eventually(&format!("{name} to be {want}"), DEADLINE, || {
        (metric(status, name) == want).then_some(())
    });
}

/// `curl ARGS`, expecting success; returns the body.
fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--fail-with-body"])
        .args(args)
        .output()
        .expect("curl is needed (apt-get install curl)");
    assert!(out.status.success(), "curl {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_series_is_there_from_startup_under_the_prefix() {
    let pki = Pki::new();
    let backend = Backend::echo(b"");
    let server = Legate::server(
        &pki,
        &backend.target(),
        &["--allow-all", "--status=http://127.0.0.1:0"],
    );
    let status = status_addr(&server);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let reply = http_get(status, "/_metrics", None);
    let list: Vec<serde_json::Value> = serde_json::from_str(&reply.body).unwrap();
    for m in &list {
        let mut keys: Vec<_> = m.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(keys, ["hostname", "metric", "timestamp", "value"], "{m}");
        assert!((m["timestamp"].as_i64().unwrap() - now).abs() < 60, "{m}");
    }
    for path in ["/_metrics", "/_metrics/json", "/_metrics?format=json"] {
        let m = ghost_metrics(status, path);
        assert_eq!(
            m.keys().cloned().collect::<Vec<_>>(),
            series("ghostunnel"),
            "{path}"
        );
        assert!(m.values().all(|v| *v == 0.0), "{path}: {m:?}");
    }

    let other = Legate::server(
        &pki,
        &backend.target(),
        &[
            "--allow-all",
            "--status=http://127.0.0.1:0",
            "--metrics-prefix=edge.cache",
        ],
    );
    let m = ghost_metrics(status_addr(&other), "/_metrics/json");
    assert_eq!(m.keys().cloned().collect::<Vec<_>>(), series("edge.cache"));
}

#[test]
fn metrics_move_under_churn_a_handshake_flood_and_stalled_handshakes() {
    let pki = Pki::new();
    let backend = Backend::echo(b"ok:");
    let server = Legate::server(
        &pki,
        &backend.target(),
        &[
            "--allow-cn=client",
            "--status=http://127.0.0.1:0",
            "--connect-timeout=1s",
        ],
    );
    let client = Legate::client(
        &pki,
        "client",
        server.addr(),
        &["--raw", "--status=http://127.0.0.1:0"],
    );
    let (s_status, c_status) = (status_addr(&server), status_addr(&client));

    // A churn of 600 connections, each a TLS connection of its own (raw, as ghostunnel's).
    for _ in 0..600 {
        assert_eq!(exchange(client.addr(), b"x"), b"ok:x");
    }
    for status in [s_status, c_status] {
        metric_becomes(status, "conn.open", 0.0);
        let m = ghost_metrics(status, "/_metrics");
        for (name, want) in [
            ("accept.total", 600.0),
            ("accept.success", 600.0),
            ("accept.error", 0.0),
            ("accept.timeout", 0.0),
            ("conn.lifetime.count", 600.0),
            ("conn.handshake.count", 600.0),
        ] {
            assert_eq!(m[&format!("ghostunnel.{name}")], want, "{name}: {m:?}");
        }
        let g = |s: &str| m[&format!("ghostunnel.conn.handshake.{s}")];
        assert!(
            0.0 < g("min") && g("min") <= g("50-percentile") && g("99-percentile") <= g("max"),
            "{m:?}"
        );
    }

    // A flood of connections that are not TLS, all at once: each an accept and a handshake
    // error.
    let flood: Vec<_> = (0..40)
        .map(|_| {
            let addr = server.addr();
            std::thread::spawn(move || {
                let mut s = connect(addr);
                let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
                read_until_closed(&mut s);
            })
        })
        .collect();
    for t in flood {
        t.join().unwrap();
    }
    metric_becomes(s_status, "accept.error", 40.0);

    // Handshakes that never start: counted open at once, cut by --connect-timeout (1s), and
    // counted as timeouts (and errors, as in ghostunnel).
    let started = Instant::now();
    let mut stalled: Vec<TcpStream> = (0..5).map(|_| connect(server.addr())).collect();
    metric_becomes(s_status, "accept.total", 645.0);
    for s in &mut stalled {
        assert!(read_until_closed(s).is_empty());
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(8),
        "{waited:?}"
    );
    metric_becomes(s_status, "conn.open", 0.0);
    assert_eq!(metric(s_status, "accept.timeout"), 5.0);
    assert_eq!(metric(s_status, "accept.error"), 45.0);
    assert_eq!(metric(s_status, "accept.success"), 600.0);
}

#[test]
fn a_failing_accept_counts_as_an_accept_error_and_the_server_recovers() {
    let pki = Pki::new();
    let backend = Backend::echo(b"ok:");
    let mut args = vec![
        "server".to_string(),
        "--listen=127.0.0.1:0".into(),
        format!("--target={}", backend.target()),
        "--allow-cn=client".into(),
        "--status=http://127.0.0.1:0".into(),
        "--connect-timeout=30s".into(),
    ];
    args.extend(pki.flags("server"));
    let server = Legate::start_with_fd_limit(&args, 1, 48);
    let status = status_addr(&server);

    // Silent connections hold a descriptor each until accept() runs out of them.
    let held: Vec<TcpStream> = (0..80).map(|_| connect(server.addr())).collect();
    server.log.wait_for(&["accept failed; pausing"]);
    drop(held);
    // Every held connection is accepted in the end and fails its handshake; the failed
    // accept() calls come on top.
    eventually("the held connections to be handled", DEADLINE, || {
        let m = ghost_metrics(status, "/_metrics");
        (m["ghostunnel.accept.total"] == 80.0 && m["ghostunnel.conn.open"] == 0.0).then_some(m)
    });
    let errors = metric(status, "accept.error");
    assert!(
        errors > 80.0,
        "accept.error {errors}: failed accept() calls not counted"
    );

    let client = Legate::client(&pki, "client", server.addr(), &["--raw"]);
    assert_eq!(exchange(client.addr(), b"after"), b"ok:after");
    metric_becomes(status, "accept.success", 1.0);
}

#[test]
fn max_conn_lifetime_cuts_idle_connections_on_both_sides() {
    let pki = Pki::new();
    let backend = Backend::echo(b"ok:");
    // The client side cuts its consumers' streams (the server, without the flag, does not).
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    let client = Legate::client(
        &pki,
        "client",
        server.addr(),
        &["--status=http://127.0.0.1:0", "--max-conn-lifetime=1s"],
    );
    let status = status_addr(&client);
    let opened = Instant::now();
    let mut idle: Vec<TcpStream> = (0..30)
        .map(|_| {
            let mut s = connect(client.addr());
            let mut tag = [0u8; 3];
            s.read_exact(&mut tag).unwrap();
            assert_eq!(&tag, b"ok:");
            s
        })
        .collect();
    metric_becomes(status, "conn.open", 30.0);
    for s in &mut idle {
        assert!(read_until_closed(s).is_empty());
    }
    assert!(opened.elapsed() >= Duration::from_secs(1));
    metric_becomes(status, "conn.open", 0.0);
    assert_eq!(metric(status, "conn.timeout"), 30.0);
    assert_eq!(client.log.count(&["outcome=expired"]), 30);

    // The server side, with raw clients as ghostunnel's: each TLS connection is cut.
    let server = Legate::server(
        &pki,
        &backend.target(),
        &[
            "--allow-cn=client",
            "--status=http://127.0.0.1:0",
            "--max-conn-lifetime=1s",
        ],
    );
    let raw = Legate::client(&pki, "client", server.addr(), &["--raw"]);
    let mut conns: Vec<TcpStream> = (0..3).map(|_| connect(raw.addr())).collect();
    for s in &mut conns {
        assert_eq!(read_until_closed(s), b"ok:");
    }
    let status = status_addr(&server);
    metric_becomes(status, "conn.timeout", 3.0);
    metric_becomes(status, "conn.open", 0.0);
}

#[test]
fn target_status_checks_the_backend_over_http_through_the_target() {
    let code = Arc::new(AtomicU16::new(200));
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let backend = {
        let (code, seen) = (code.clone(), seen.clone());
        Backend::start(move |mut s| {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                head.push(byte[0]);
            }
            seen.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&head).into_owned());
            let code = code.load(Ordering::SeqCst);
            let _ = write!(
                s,
                "HTTP/1.1 {code} Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        })
    };
    let pki = Pki::new();
    let server = Legate::server(
        &pki,
        &backend.target(),
        &[
            "--allow-all",
            "--status=http://127.0.0.1:0",
            "--target-status=http://health.internal:8080/healthz?full=1",
        ],
    );
    let status = status_addr(&server);
    let reply = http_get(status, "/_status", None);
    assert_eq!(reply.code, 200, "{}", reply.body);
    let doc: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(doc["backend_status"], "ok");
    assert!(doc.get("backend_error").is_none(), "{doc}");
    let request = seen.lock().unwrap()[0].clone();
    assert!(
        request.starts_with("GET /healthz?full=1 HTTP/1.1\r\n")
            && request.contains("\r\nHost: health.internal:8080\r\n"),
        "{request}"
    );

    code.store(500, Ordering::SeqCst);
    let reply = http_get(status, "/_status", None);
    assert_eq!(reply.code, 503, "{}", reply.body);
    let doc: serde_json::Value = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["status"], "critical");
    assert_eq!(doc["backend_ok"], false);
    assert_eq!(doc["backend_status"], "critical");
    assert_eq!(doc["backend_error"], "target returned status: 500");

    // Only http:// and https:// can be checked: one line, exit 2.
    let mut args: Vec<String> = ["server", "--listen=127.0.0.1:0", "--allow-all"]
        .map(String::from)
        .into();
    args.push(format!("--target={}", backend.target()));
    args.push("--target-status=ftp://health.internal/".into());
    args.extend(pki.flags("server"));
    let err = refused_at_startup(&args);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("only http:// and https://"), "{err}");
}

/// `legate gen-certs` into `dir`.
fn gen_certs(dir: &Path) {
    let out = Command::new(legate_bin())
        .args(["gen-certs", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// The scheme and port of a status listener, from its log line.
fn status_url(legate: &Legate) -> (String, u16) {
    let line = legate.log.wait_for(&["status listening"]);
    let url = harness::field(&line, "status").unwrap();
    let (scheme, addr) = url.split_once("://").unwrap();
    (
        scheme.to_string(),
        addr.parse::<SocketAddr>().unwrap().port(),
    )
}

#[test]
fn curl_reads_the_status_over_https_on_both_sides_with_gen_certs_files() {
    let dir = tempfile::tempdir().unwrap();
    gen_certs(dir.path());
    let file = |f: &str| dir.path().join(f).display().to_string();
    let backend = Backend::echo(b"ok:");
    let server = Legate::start(
        &[
            "server".into(),
            "--listen=127.0.0.1:0".into(),
            format!("--target={}", backend.target()),
            format!("--cert={}", file("server.crt")),
            format!("--key={}", file("server.key")),
            format!("--cacert={}", file("ca.crt")),
            "--allow-cn=client".into(),
            "--status=127.0.0.1:0".into(),
        ],
        1,
    );
    let client = Legate::start(
        &[
            "client".into(),
            "--listen=127.0.0.1:0".into(),
            format!("--target=localhost:{}", server.addr().port()),
            format!("--cert={}", file("client.crt")),
            format!("--key={}", file("client.key")),
            format!("--cacert={}", file("ca.crt")),
            "--status=127.0.0.1:0".into(),
        ],
        1,
    );
    assert_eq!(exchange(client.addr(), b"hi"), b"ok:hi");
    // The server's certificate is for localhost; the client's for its own name, "client".
    for (side, name) in [(&server, "localhost"), (&client, "client")] {
        let (scheme, port) = status_url(side);
        assert_eq!(scheme, "https");
        let resolve = format!("{name}:{port}:127.0.0.1");
        let url = format!("https://{name}:{port}/_status");
        let body = curl(&["--cacert", &file("ca.crt"), "--resolve", &resolve, &url]);
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["ok"], true, "{doc}");
        for key in [
            "status",
            "listen_address",
            "forward_address",
            "backend_ok",
            "backend_status",
            "time",
            "last_reload",
            "hostname",
            "message",
            "revision",
            "compiler",
        ] {
            assert!(doc.get(key).is_some(), "{key} missing: {doc}");
        }
        let url = format!("https://{name}:{port}/_metrics");
        let list: serde_json::Value = serde_json::from_str(&curl(&[
            "--cacert",
            &file("ca.crt"),
            "--resolve",
            &resolve,
            &url,
        ]))
        .unwrap();
        assert!(list.as_array().unwrap().len() >= 22, "{list}");
    }
}

#[test]
fn a_ghostunnel_command_line_with_pkcs12_and_unix_sockets() {
    let pki = Pki::new();
    let backend = Backend::echo(b"ok:");
    let server_p12 = pkcs12(&pki, "server", "s3cret", &[], "server.p12");
    let client_p12 = pkcs12(&pki, "client", "", &[], "client.p12");
    let listen = pki.path("server.sock");
    let status_sock = pki.path("status.sock");
    let _server = Legate::start(
        &[
            "server".into(),
            format!("--listen=unix:{}", listen.display()),
            format!("--target={}", backend.target()),
            format!("--keystore={}", server_p12.display()),
            "--storepass=s3cret".into(),
            format!("--cacert={}", pki.ca_cert().display()),
            "--allow-cn=client".into(),
            format!("--status=unix:{}", status_sock.display()),
        ],
        1,
    );
    let client = Legate::start(
        &[
            "client".into(),
            "--listen=127.0.0.1:0".into(),
            format!("--target=unix:{}", listen.display()),
            "--override-server-name=localhost".into(),
            format!("--keystore={}", client_p12.display()),
            format!("--cacert={}", pki.ca_cert().display()),
            "--verify-cn=server".into(),
        ],
        1,
    );
    assert_eq!(exchange(client.addr(), b"p12"), b"ok:p12");
    eventually("the status socket", DEADLINE, || {
        status_sock.exists().then_some(())
    });
    let sock = status_sock.display().to_string();
    let body = curl(&["--unix-socket", &sock, "http://localhost/_status"]);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["ok"], true, "{doc}");
    assert_eq!(doc["listen_address"], format!("unix:{}", listen.display()));
    let m: Vec<serde_json::Value> = serde_json::from_str(&curl(&[
        "--unix-socket",
        &sock,
        "http://localhost/_metrics",
    ]))
    .unwrap();
    assert!(
        m.iter()
            .any(|e| e["metric"] == "ghostunnel.accept.success" && e["value"] == 1),
        "{m:?}"
    );
}

#[test]
fn disable_authentication_asks_for_no_certificate_and_status_falls_back_to_http() {
    let pki = Pki::new();
    let backend = Backend::echo(b"ok:");
    // As ghostunnel: --cacert next to --disable-authentication does not bring certificates back.
    let server = Legate::server(&pki, &backend.target(), &["--disable-authentication"]);
    let ca = format!("--cacert={}", pki.ca_cert().display());
    let anonymous = Legate::start(
        &[
            "client".into(),
            "--listen=127.0.0.1:0".into(),
            format!("--target=localhost:{}", server.addr().port()),
            "--disable-authentication".into(),
            ca.clone(),
            "--status=127.0.0.1:0".into(),
        ],
        1,
    );
    assert_eq!(exchange(anonymous.addr(), b"anon"), b"ok:anon");
    // No certificate to serve with: the bare status address is plain HTTP.
    let (scheme, port) = status_url(&anonymous);
    assert_eq!(scheme, "http");
    let body = curl(&[&format!("http://127.0.0.1:{port}/_status")]);
    assert!(body.contains("\"ok\":true"), "{body}");

    // A client certificate from a CA the server never heard of is not even asked for.
    let foreign = Pki::new();
    let stranger = foreign.leaf("client");
    let client = Legate::start(
        &[
            "client".into(),
            "--listen=127.0.0.1:0".into(),
            format!("--target=localhost:{}", server.addr().port()),
            format!("--cert={}", stranger.cert.display()),
            format!("--key={}", stranger.key.display()),
            ca,
        ],
        1,
    );
    assert_eq!(exchange(client.addr(), b"foreign"), b"ok:foreign");

    // Asking for HTTPS status with no certificate is one clear line.
    let mut args: Vec<String> = [
        "client",
        "--listen=127.0.0.1:0",
        "--target=localhost:1",
        "--disable-authentication",
        "--status=https://127.0.0.1:0",
    ]
    .map(String::from)
    .into();
    args.push(format!("--cacert={}", pki.ca_cert().display()));
    let err = refused_at_startup(&args);
    assert!(err.contains("HTTPS needs a certificate"), "{err}");
}

#[test]
fn verify_pins_fail_the_handshake_so_the_server_never_sees_a_connection() {
    let pki = Pki::new();
    let backend = Backend::echo(b"ok:");
    let server = Legate::server(
        &pki,
        &backend.target(),
        &["--allow-cn=client", "--status=http://127.0.0.1:0"],
    );
    let client = Legate::client(&pki, "client", server.addr(), &["--verify-cn=someone-else"]);
    let mut s = connect(client.addr());
    let _ = s.write_all(b"x");
    assert!(read_until_closed(&mut s).is_empty());
    client.log.wait_for(&[
        "outcome=unauthorized",
        "server identity CN=server does not match the --verify-* pins",
    ]);
    let status = status_addr(&server);
    metric_becomes(status, "accept.error", 1.0);
    assert_eq!(metric(status, "accept.success"), 0.0);
    let line = server.log.wait_for(&["outcome=handshake_failed"]);
    assert!(line.contains("alert"), "{line}");
    assert_eq!(backend.accepted(), 0);
}

#[test]
fn enable_pprof_serves_the_live_task_count_as_a_goroutine_profile() {
    let pki = Pki::new();
    let backend = Backend::echo(b"");
    let server = Legate::server(
        &pki,
        &backend.target(),
        &[
            "--allow-all",
            "--status=http://127.0.0.1:0",
            "--enable-pprof",
        ],
    );
    let status = status_addr(&server);
    let total = || -> u64 {
        let reply = http_get(status, "/debug/pprof/goroutine?debug=1", None);
        assert_eq!(reply.code, 200);
        let first = reply.body.lines().next().unwrap().to_string();
        first
            .strip_prefix("goroutine profile: total ")
            .unwrap_or_else(|| panic!("{first}"))
            .parse()
            .unwrap()
    };
    let idle = total();
    let held: Vec<TcpStream> = (0..20).map(|_| connect(server.addr())).collect();
    eventually("20 more tasks", DEADLINE, || {
        (total() >= idle + 20).then_some(())
    });
    drop(held);
    eventually("the tasks to end", DEADLINE, || {
        (total() <= idle).then_some(())
    });

    // Without --status there is nowhere to serve it.
    let mut args: Vec<String> = [
        "server",
        "--listen=127.0.0.1:0",
        "--allow-all",
        "--enable-pprof",
    ]
    .map(String::from)
    .into();
    args.push(format!("--target={}", backend.target()));
    args.extend(pki.flags("server"));
    let err = refused_at_startup(&args);
    assert!(err.contains("--enable-pprof needs --status"), "{err}");
}

#[test]
fn status_json_matches_ghostunnels_fields() {
    let pki = Pki::new();
    let backend = Backend::echo(b"");
    let server = Legate::server(
        &pki,
        &backend.target(),
        &["--allow-all", "--status=http://127.0.0.1:0"],
    );
    let reply = http_get(status_addr(&server), "/_status", None);
    let doc: BTreeMap<String, serde_json::Value> = serde_json::from_str(&reply.body).unwrap();
    assert_eq!(doc["status"], "ok");
    assert_eq!(doc["backend_status"], "ok");
    assert_eq!(doc["message"], "listening");
    assert_eq!(doc["revision"], env!("CARGO_PKG_VERSION"));
    assert!(doc["compiler"].as_str().unwrap().starts_with("rustc "));
    assert!(!doc["hostname"].as_str().unwrap().is_empty());
    let time = doc["time"].as_str().unwrap();
    assert!(time.len() > 20 && time.ends_with('Z'), "{time}");
}

#[test]
fn handshake_timeout_overrides_connect_timeout_for_the_incoming_handshake() {
    let pki = Pki::new();
    let backend = Backend::echo(b"");
    let server = Legate::server(
        &pki,
        &backend.target(),
        &[
            "--allow-all",
            "--connect-timeout=1s",
            "--handshake-timeout=3s",
        ],
    );
    let started = Instant::now();
    let mut s = connect(server.addr());
    assert!(read_until_closed(&mut s).is_empty());
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(2900) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    server
        .log
        .wait_for(&["outcome=handshake_failed", "timed out after 3s"]);
}
