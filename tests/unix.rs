//! `unix:PATH` addresses for --listen and --target, on both sides.

mod harness;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Command;

use harness::{Legate, Pki, legate_bin};

/// An echo backend on a UNIX socket that prefixes its replies with `tag`.
fn unix_echo(path: &Path, tag: &'static [u8]) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for s in listener.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut got = Vec::new();
                s.read_to_end(&mut got).unwrap();
                s.write_all(tag).unwrap();
                s.write_all(&got).unwrap();
            });
        }
    });
}

#[test]
fn a_tunnel_over_unix_sockets_end_to_end() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let (app, tls, service) = (
        dir.path().join("app.sock"),
        dir.path().join("tls.sock"),
        dir.path().join("service.sock"),
    );
    unix_echo(&service, b"unix:");
    // A socket file left behind by a process that is gone does not stop the server binding.
    drop(UnixListener::bind(&tls).unwrap());
    assert!(tls.exists());

    let mut args = vec![
        "server".to_string(),
        format!("--listen=unix:{}", tls.display()),
        format!("--target=unix:{}", service.display()),
        "--allow-cn=client".into(),
    ];
    args.extend(pki.flags("server"));
    let mut server = Legate::start(&args, 1);
    assert_eq!(server.listens["server"], format!("unix:{}", tls.display()));

    let mut args = vec![
        "client".to_string(),
        format!("--listen=unix:{}", app.display()),
        format!("--target=unix:{}", tls.display()),
        "--override-server-name=localhost".into(),
    ];
    args.extend(pki.flags("client"));
    let mut client = Legate::start(&args, 1);

    let mut s = UnixStream::connect(&app).unwrap();
    s.set_read_timeout(Some(harness::DEADLINE)).unwrap();
    s.write_all(b"over sockets").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, b"unix:over sockets");
    let line = server.log.wait_for(&["connection closed", "outcome=ok"]);
    assert!(
        line.contains("peer=unix") && line.contains("CN=client"),
        "{line}"
    );

    // The socket files go away with the processes.
    client.signal(libc::SIGTERM);
    server.signal(libc::SIGTERM);
    assert_eq!(client.wait_exit(harness::DEADLINE).code(), Some(0));
    assert_eq!(server.wait_exit(harness::DEADLINE).code(), Some(0));
    assert!(!app.exists() && !tls.exists());
}

#[test]
fn a_unix_target_on_a_client_needs_a_server_name() {
    let pki = Pki::new();
    let out = Command::new(legate_bin())
        .args([
            "client",
            "--listen=127.0.0.1:0",
            "--target=unix:/tmp/x.sock",
        ])
        .args(pki.flags("client"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("set --override-server-name"), "{err}");
}

#[test]
fn a_socket_in_use_is_not_stolen() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.sock");
    let _busy = UnixListener::bind(&path).unwrap();
    let out = Command::new(legate_bin())
        .arg("server")
        .arg(format!("--listen=unix:{}", path.display()))
        .args(["--target=127.0.0.1:1", "--allow-all"])
        .args(pki.flags("server"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listening on this socket already"), "{err}");
}
