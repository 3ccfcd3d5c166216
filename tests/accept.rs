//! The accept loop: slow handshakes never block it, the connection limit holds, and logs come
//! out as JSON when asked.

mod harness;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Command, Stdio};

use harness::{Backend, Legate, Pki, connect, read_all};

#[test]
fn silent_connections_do_not_block_others_and_time_out() {
    let pki = Pki::new();
    let backend = Backend::echo(b"ok:");
    let server = Legate::server(
        &pki,
        &backend.target(),
        &["--allow-cn=client", "--handshake-timeout=500ms"],
    );
    // Connections that never send a ClientHello.
    let silent: Vec<TcpStream> = (0..20).map(|_| connect(server.addr())).collect();
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    assert_eq!(harness::exchange(client.addr(), b"x"), b"ok:x");
    harness::eventually("20 handshake timeouts", harness::DEADLINE, || {
        (server.log.count(&["TLS handshake timed out after 500ms"]) == 20).then_some(())
    });
    // The server closed them.
    for mut s in silent {
        let mut buf = [0u8; 1];
        assert_eq!(s.read(&mut buf).unwrap_or(0), 0);
    }
}

#[test]
fn max_concurrent_conns_makes_the_next_connection_wait() {
    let pki = Pki::new();
    let backend = Backend::echo(b"hi:");
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    let client = Legate::client(&pki, "client", server.addr(), &["--max-concurrent-conns=1"]);
    let mut first = connect(client.addr());
    let mut hello = [0u8; 3];
    first.read_exact(&mut hello).unwrap();
    assert_eq!(&hello, b"hi:");

    // The second is queued by the kernel, not served, while the first is open...
    let mut second = connect(client.addr());
    second.write_all(b"queued").unwrap();
    second.shutdown(Shutdown::Write).unwrap();
    second
        .set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 16];
    let early = second.read(&mut buf);
    assert!(
        early.is_err(),
        "the second connection was served early: {early:?}"
    );
    assert_eq!(backend.accepted(), 1);

    // ...and served once the first ends.
    first.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut first), b"");
    second.set_read_timeout(Some(harness::DEADLINE)).unwrap();
    assert_eq!(read_all(&mut second), b"hi:queued");
}

#[test]
fn json_logs_have_one_object_per_line() {
    let pki = Pki::new();
    let backend = Backend::echo(b"");
    let mut child = Command::new(harness::legate_bin())
        .args(["server", "--log-format=json", "--listen=127.0.0.1:0"])
        .arg(format!("--target={}", backend.target()))
        .arg("--allow-all")
        .args(pki.flags("server"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Every line up to the "listening" one is a JSON object.
    let mut line = String::new();
    for l in BufReader::new(child.stderr.take().unwrap()).lines() {
        line = l.unwrap();
        assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
        if line.contains("\"listening\"") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    for field in [
        "\"message\":\"listening\"",
        "\"tunnel\":\"server\"",
        "\"side\":\"server\"",
        "\"level\":\"INFO\"",
        "\"listen\":\"127.0.0.1:",
    ] {
        assert!(line.contains(field), "{field} missing in {line}");
    }
}
