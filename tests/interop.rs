//! Raw mode interoperates with TLS peers that are not legate, in both directions: `openssl
//! s_server`, `stunnel4` and HAProxy servers behind a legate client, and `openssl s_client`,
//! `stunnel4` and HAProxy clients in front of a legate server, with a Redis round trip through
//! each of the real daemons.

mod harness;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use harness::{Backend, DEADLINE, Killed, Legate, Pki, Redis, Reply, connect, eventually};

fn openssl() -> Command {
    Command::new("openssl")
}

/// `openssl s_server` with the `server` leaf, requiring a client certificate, answering each
/// line reversed (`-rev`), with `extra` flags; and its address.
fn s_server(pki: &Pki, extra: &[&str]) -> (Killed, SocketAddr) {
    let server_leaf = pki.leaf("server");
    let mut child = openssl()
        .args(["s_server", "-accept", "127.0.0.1:0", "-rev", "-Verify", "1"])
        .args(extra)
        .arg("-cert")
        .arg(&server_leaf.cert)
        .arg("-key")
        .arg(&server_leaf.key)
        .arg("-CAfile")
        .arg(pki.ca_cert())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl is needed (apt-get install openssl)");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let s_server = Killed(child);
    let port: u16 = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("ACCEPT ")
                .map(|a| a.rsplit(':').next().unwrap().parse().unwrap())
        })
        .expect("s_server prints its port");
    (s_server, format!("127.0.0.1:{port}").parse().unwrap())
}

/// Sends `line` through `client` and reads until the reversed line comes back.
fn reversed(client: &Legate, line: &str) {
    let mut s = connect(client.addr());
    s.write_all(format!("{line}\n").as_bytes()).unwrap();
    // -rev answers each line reversed: only possible if the bytes crossed TLS intact.
    let want: String = line.chars().rev().collect();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&got).contains(&want) {
        let n = s.read(&mut buf).expect("read from the tunnel");
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn a_legate_client_talks_to_openssl_s_server() {
    let pki = Pki::new();
    let (s_server, addr) = s_server(&pki, &[]);
    let client = Legate::client(&pki, "client", addr, &[]);
    reversed(&client, "hello legate");
    // The legate client saw no legate/1 (no ALPN): the log line has no route.
    let line = client.log.wait_for(&["connection closed", "outcome=ok"]);
    assert!(line.contains("route=\"-\""), "{line}");
    drop(s_server);
}

#[test]
fn openssl_s_server_accepting_one_connection_gets_the_consumers_bytes() {
    let pki = Pki::new();
    // The server takes one connection only: had the client opened one of its own at startup
    // (as it once did, for a pool), the consumer's bytes would go nowhere.
    let (_s_server, addr) = s_server(&pki, &["-naccept", "1"]);
    let client = Legate::client(&pki, "client", addr, &[]);
    reversed(&client, "only one connection");
}

#[test]
fn openssl_s_client_talks_to_a_legate_server() {
    let pki = Pki::new();
    let backend = Backend::echo(b"echo:");
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    let leaf = pki.leaf("client");
    let mut child = openssl()
        .args(["s_client", "-quiet", "-connect"])
        .arg(server.addr().to_string())
        .arg("-cert")
        .arg(&leaf.cert)
        .arg("-key")
        .arg(&leaf.key)
        .arg("-CAfile")
        .arg(pki.ca_cert())
        .args(["-verify_return_error", "-servername", "localhost"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl is needed (apt-get install openssl)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from openssl\n")
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let s_client = Killed(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            let _ = tx.send(got.clone());
        }
    });
    let deadline = std::time::Instant::now() + harness::DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let got = rx
            .recv_timeout(left.max(Duration::from_millis(1)))
            .expect("echo through legate");
        if got == b"echo:from openssl\n" {
            break;
        }
    }
    drop(s_client);
    let line = server.log.wait_for(&["connection closed"]);
    assert!(line.contains("CN=client"), "{line}");
    let _ = connect(server.addr()).shutdown(Shutdown::Both);
}

/// Runs a peer daemon (`stunnel4 CONF` or `haproxy -db -f CONF`) until dropped, once it
/// listens on `port` (neither can report a kernel-chosen port, so the port is picked free).
fn daemon(program: &str, args: &[&std::path::Path], port: u16) -> Killed {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{program} is needed (apt-get install {program}): {e}"));
    let mut child = Killed(child);
    eventually(&format!("{program} to listen on {port}"), DEADLINE, || {
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("{program} exited with {status}");
        }
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    child
}

/// A stunnel4 service from `body` (its `[service]` lines), listening on `port`.
fn stunnel(pki: &Pki, body: &str, port: u16) -> Killed {
    let conf = pki.path(&format!("stunnel-{port}.conf"));
    std::fs::write(&conf, format!("foreground = yes\npid =\n[service]\n{body}")).unwrap();
    daemon("stunnel4", &[conf.as_path()], port)
}

/// HAProxy in TCP mode with `body` (its frontend and backend), listening on `port`.
fn haproxy(pki: &Pki, body: &str, port: u16) -> Killed {
    let conf = pki.path(&format!("haproxy-{port}.cfg"));
    std::fs::write(
        &conf,
        format!(
            "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n{body}"
        ),
    )
    .unwrap();
    let db = std::path::Path::new("-db");
    let f = std::path::Path::new("-f");
    daemon("haproxy", &[db, f, conf.as_path()], port)
}

/// Leaf `name`'s certificate and key in one PEM file, as HAProxy's `crt` wants.
fn combined_pem(pki: &Pki, name: &str) -> std::path::PathBuf {
    let leaf = pki.leaf(name);
    let path = pki.path(&format!("{name}-combined.pem"));
    let mut pem = std::fs::read(&leaf.cert).unwrap();
    pem.extend(std::fs::read(&leaf.key).unwrap());
    std::fs::write(&path, pem).unwrap();
    path
}

/// A SET and a GET of `key` through `addr`.
fn redis_round_trip(addr: SocketAddr, key: &str) {
    let mut s = connect(addr);
    assert_eq!(
        harness::resp(&mut s, &[b"SET", key.as_bytes(), b"through"]).unwrap(),
        Reply::Simple("OK".into())
    );
    assert_eq!(
        harness::resp(&mut s, &[b"GET", key.as_bytes()]).unwrap(),
        Reply::Bulk(Some(b"through".to_vec()))
    );
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[test]
fn a_legate_client_carries_redis_to_a_stunnel_server() {
    let pki = Pki::new();
    let redis = Redis::start();
    let port = harness::free_port();
    let leaf = pki.leaf("server");
    let _stunnel = stunnel(
        &pki,
        &format!(
            "accept = 127.0.0.1:{port}\nconnect = {}\ncert = {}\nkey = {}\nCAfile = {}\n\
             verifyChain = yes\nrequireCert = yes\n",
            redis.addr(),
            leaf.cert.display(),
            leaf.key.display(),
            pki.ca_cert().display()
        ),
        port,
    );
    let client = Legate::client(&pki, "client", local(port), &[]);
    redis_round_trip(client.addr(), "legate-to-stunnel");
}

#[test]
fn a_legate_client_carries_redis_to_an_haproxy_server() {
    let pki = Pki::new();
    let redis = Redis::start();
    let port = harness::free_port();
    let _haproxy = haproxy(
        &pki,
        &format!(
            "frontend tls\n  bind 127.0.0.1:{port} ssl crt {} ca-file {} verify required\n  default_backend redis\n\
             backend redis\n  server redis {}\n",
            combined_pem(&pki, "server").display(),
            pki.ca_cert().display(),
            redis.addr()
        ),
        port,
    );
    let client = Legate::client(&pki, "client", local(port), &[]);
    redis_round_trip(client.addr(), "legate-to-haproxy");
}

#[test]
fn a_stunnel_client_reaches_redis_through_a_legate_server() {
    let pki = Pki::new();
    let redis = Redis::start();
    let server = Legate::server(&pki, &redis.addr(), &["--allow-cn=client"]);
    let port = harness::free_port();
    let leaf = pki.leaf("client");
    let _stunnel = stunnel(
        &pki,
        &format!(
            "client = yes\naccept = 127.0.0.1:{port}\nconnect = {}\ncert = {}\nkey = {}\n\
             CAfile = {}\nverifyChain = yes\ncheckHost = localhost\n",
            server.addr(),
            leaf.cert.display(),
            leaf.key.display(),
            pki.ca_cert().display()
        ),
        port,
    );
    redis_round_trip(local(port), "stunnel-to-legate");
    let line = server.log.wait_for(&["connection closed", "outcome=ok"]);
    assert!(line.contains("CN=client"), "{line}");
}

#[test]
fn an_haproxy_client_reaches_redis_through_a_legate_server() {
    let pki = Pki::new();
    let redis = Redis::start();
    let server = Legate::server(&pki, &redis.addr(), &["--allow-cn=client"]);
    let port = harness::free_port();
    let _haproxy = haproxy(
        &pki,
        &format!(
            "frontend plain\n  bind 127.0.0.1:{port}\n  default_backend legate\n\
             backend legate\n  server legate {} ssl crt {} ca-file {} verify required sni str(localhost) verifyhost localhost\n",
            server.addr(),
            combined_pem(&pki, "client").display(),
            pki.ca_cert().display()
        ),
        port,
    );
    redis_round_trip(local(port), "haproxy-to-legate");
    let line = server.log.wait_for(&["connection closed", "outcome=ok"]);
    assert!(line.contains("CN=client"), "{line}");
}
