//! SIGTERM and SIGINT: stop accepting, let open connections finish, exit 0 when drained and
//! non-zero when the shutdown timeout cut them.

mod harness;

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use harness::{Backend, Legate, Pki, connect, read_all};

#[test]
fn sigterm_during_a_transfer_lets_it_complete_and_exits_0() {
    let pki = Pki::new();
    let backend = Backend::echo(b"");
    let mut server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    let mut client = Legate::client(&pki, "client", server.addr(), &[]);
    let chunk: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();

    let mut s = connect(client.addr());
    s.write_all(&chunk).unwrap();
    // The first half is through both ambassadors and back before the signals.
    let mut first = vec![0u8; chunk.len()];
    std::io::Read::read_exact(&mut s, &mut first).unwrap();
    assert!(first == chunk);
    client.signal(libc::SIGTERM);
    server.signal(libc::SIGTERM);
    client
        .log
        .wait_for(&["stopped accepting; draining", "open_connections=1"]);
    // The server also counts the client's ready pooled connections, which close at once.
    server.log.wait_for(&["stopped accepting; draining"]);

    // New consumers are no longer accepted...
    assert!(
        TcpStream::connect(client.addr()).is_err(),
        "client still accepts"
    );
    // ...but the open transfer carries on to its end.
    s.write_all(&chunk).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let echoed = read_all(&mut s);
    assert_eq!(echoed.len(), chunk.len());
    assert!(echoed == chunk);
    drop(s);

    assert_eq!(client.wait_exit(harness::DEADLINE).code(), Some(0));
    assert_eq!(server.wait_exit(harness::DEADLINE).code(), Some(0));
    client.log.wait_for(&["all connections finished"]);
}

#[test]
fn the_shutdown_timeout_cuts_stuck_connections_and_exits_non_zero() {
    let pki = Pki::new();
    let backend = Backend::echo(b"hello:");
    let mut server = Legate::server(
        &pki,
        &backend.target(),
        &["--allow-cn=client", "--shutdown-timeout=300ms"],
    );
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    let mut s = connect(client.addr());
    let mut hello = [0u8; 6];
    std::io::Read::read_exact(&mut s, &mut hello).unwrap();
    server.signal(libc::SIGINT);
    let status = server.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1));
    server
        .log
        .wait_for(&["shutdown cut open connections", "open_connections=1"]);
}
