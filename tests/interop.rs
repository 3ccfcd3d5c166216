//! Raw mode interoperates with TLS peers that are not legate: `openssl s_server` behind a
//! legate client, and `openssl s_client` in front of a legate server.

mod harness;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use harness::{Backend, Killed, Legate, Pki, connect};

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
