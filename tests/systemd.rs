//! systemd integration (issue 18): readiness notification (`Type=notify`) and socket
//! activation (`--listen=systemd:NAME`, as ghostunnel's). systemd itself is not needed: the
//! tests speak its two protocols, a datagram socket in NOTIFY_SOCKET and a listening socket
//! passed as fd 3 with LISTEN_FDS / LISTEN_FDNAMES.

mod harness;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use harness::{DEADLINE, Legate, Pki, Redis, Reply};

fn next(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .expect("a notification before the deadline");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_reloading_and_stopping_are_told_to_systemd() {
    let pki = Pki::new();
    let redis = Redis::start();
    let path = pki.path("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut args = vec![
        "server".to_string(),
        "--listen=127.0.0.1:0".into(),
        format!("--target={}", redis.addr()),
        "--allow-cn=client".into(),
    ];
    args.extend(pki.flags("server"));
    let notify = path.display().to_string();
    let mut server = Legate::start_with_env(&args, 1, &[("NOTIFY_SOCKET", &notify)]);
    assert_eq!(next(&socket), "READY=1");
    server.signal(libc::SIGHUP);
    let reloading = next(&socket);
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading}"
    );
    let usec: u64 = reloading.rsplit('=').next().unwrap().parse().unwrap();
    assert!(usec > 0);
    assert_eq!(next(&socket), "READY=1");
    server.signal(libc::SIGTERM);
    assert_eq!(next(&socket), "STOPPING=1");
    assert!(server.wait_exit(DEADLINE).success());
}

#[test]
fn a_socket_systemd_passes_in_is_listened_on() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let pki = Pki::new();
    let redis = Redis::start();
    // What systemd does for a socket unit with FileDescriptorName=tls: binds, listens, and
    // passes the socket as fd 3.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new(harness::legate_bin());
    cmd.args([
        "server",
        "--listen=systemd:tls",
        &format!("--target={}", redis.addr()),
        "--allow-cn=client",
    ])
    .args(pki.flags("server"))
    .env("LISTEN_FDS", "1")
    .env("LISTEN_FDNAMES", "tls");
    // SAFETY: dup2 is async-signal-safe; fd 3 is what the child inherits.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec: clear it instead.
            let ok = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if ok < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let server = Legate::spawn(cmd, 1);
    assert_eq!(server.addr(), addr, "it listens where systemd bound");
    let client = Legate::client(&pki, "client", addr, &[]);
    let mut s = harness::connect(client.addr());
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(
        harness::resp(&mut s, &[b"PING"]).unwrap(),
        Reply::Simple("PONG".into())
    );
    // A name systemd did not pass, and no sockets at all, are clear errors at startup.
    let refused = |env: &[(&str, &str)]| {
        let mut args = vec![
            "server".to_string(),
            "--listen=systemd:other".into(),
            format!("--target={}", redis.addr()),
            "--allow-all".into(),
        ];
        args.extend(pki.flags("server"));
        let out = Command::new(harness::legate_bin())
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = refused(&[("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", "tls")]);
    assert!(e.contains("FileDescriptorName=other"), "{e}");
    let e = refused(&[]);
    assert!(e.contains("LISTEN_FDS is not set"), "{e}");
}
