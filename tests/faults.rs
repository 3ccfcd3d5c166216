//! Faults: a target that dies mid-transfer or is slow to accept, a server side that restarts
//! under a running client side, and file descriptors running out.

mod harness;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener};
use std::thread;
use std::time::{Duration, Instant};

use harness::{Backend, DEADLINE, Legate, Pki, connect, eventually, exchange, free_port};

#[test]
fn a_target_that_dies_mid_transfer_closes_the_consumer_promptly() {
    let pki = Pki::new();
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let target_addr = target.local_addr().unwrap();
    // Sends 1 MiB of a 4 MiB reply, then dies: its socket is closed with a reset.
    let service = thread::spawn(move || {
        let (mut s, _) = target.accept().unwrap();
        let mut req = [0u8; 4];
        s.read_exact(&mut req).unwrap();
        s.write_all(&vec![7u8; 1 << 20]).unwrap();
        harness::reset_on_close(&s);
    });
    let server = Legate::server(&pki, &target_addr.to_string(), &["--allow-cn=client"]);
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    let mut s = connect(client.addr());
    s.write_all(b"GET!").unwrap();
    service.join().unwrap();
    let started = Instant::now();
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    assert!(got <= 1 << 20, "more bytes than the target sent: {got}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the consumer waited {:?} to see the close",
        started.elapsed()
    );
    // Both sides log the connection as ended, and keep serving.
    server.log.wait_for(&["bytes_down="]);
    client.log.wait_for(&["bytes_down="]);
}

#[test]
fn a_target_slow_to_accept_still_gets_every_byte() {
    let pki = Pki::new();
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let target_addr = target.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let service = thread::spawn(move || {
        // The connection waits in the backlog until the test says so.
        rx.recv().unwrap();
        let (mut s, _) = target.accept().unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(&got).unwrap();
    });
    let server = Legate::server(&pki, &target_addr.to_string(), &["--allow-cn=client"]);
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    let mut s = connect(client.addr());
    let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&sent).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    // The server side has dialed (the kernel completed the connect into the backlog) while the
    // target has not accepted yet.
    eventually("the server side to connect to the target", DEADLINE, || {
        established_to(target_addr.port()).then_some(())
    });
    tx.send(()).unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    assert_eq!(back, sent);
    service.join().unwrap();
}

/// True when some TCP connection to `port` exists (from /proc/net/tcp): connected, or already
/// half-closed by its dialer.
fn established_to(port: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap()
        + &std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
    table.lines().skip(1).any(|l| {
        let f: Vec<_> = l.split_whitespace().collect();
        f.len() > 3 && f[2].ends_with(&format!(":{port:04X}"))
    })
}

#[test]
fn a_restarted_server_side_is_found_again_without_restarting_the_client_side() {
    let pki = Pki::new();
    let backend = Backend::echo(b"echo:");
    let port = free_port();
    let start_server = || {
        let mut args = vec![
            "server".to_string(),
            format!("--listen=127.0.0.1:{port}"),
            format!("--target={}", backend.target()),
            "--allow-cn=client".into(),
        ];
        args.extend(pki.flags("server"));
        Legate::start(&args, 1)
    };
    let mut server = start_server();
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    assert_eq!(exchange(client.addr(), b"one"), b"echo:one");
    server.signal(libc::SIGTERM);
    server.wait_exit(DEADLINE);
    // Down: consumers are closed, not hung.
    let mut s = connect(client.addr());
    let _ = s.write_all(b"two");
    let _ = s.shutdown(Shutdown::Write);
    assert_eq!(harness::read_until_closed(&mut s), b"");
    // Up again on the same port: the pooled connections of the old process are dead, and are
    // replaced; consumers get through again.
    let server = start_server();
    eventually("a consumer to get through the new server", DEADLINE, || {
        let mut s = connect(client.addr());
        s.write_all(b"three").ok()?;
        s.shutdown(Shutdown::Write).ok()?;
        (harness::read_until_closed(&mut s) == b"echo:three").then_some(())
    });
    for i in 0..20 {
        let msg = format!("after restart {i}");
        assert_eq!(
            exchange(client.addr(), msg.as_bytes()),
            format!("echo:{msg}").as_bytes()
        );
    }
    drop(server);
}

fn set_nofile(pid: i32, limit: u64) {
    let new = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit.max(4096),
    };
    // SAFETY: prlimit on our own child with a valid rlimit; the old value is not asked for.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn running_out_of_descriptors_is_survived_and_recovered() {
    let pki = Pki::new();
    let backend = Backend::echo(b"echo:");
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    let client = Legate::client(&pki, "client", server.addr(), &["--pool-size=0"]);
    assert_eq!(exchange(client.addr(), b"before"), b"echo:before");
    // Leave the client side room for about ten more descriptors: each consumer needs two.
    let limit = client.open_fds() as u64 + 10;
    set_nofile(client.pid(), limit);
    let mut held = Vec::new();
    for i in 0..20 {
        let mut s = connect(client.addr());
        let msg = format!("held {i}");
        let _ = s.write_all(msg.as_bytes());
        held.push(s);
    }
    // Some of those could not be served; the process says so and stays up.
    client.log.wait_for(&["Too many open files"]);
    set_nofile(client.pid(), 4096);
    drop(held);
    // Recovered: new consumers are served again, with no restart.
    eventually(
        "consumers to be served after the limit was raised",
        DEADLINE,
        || {
            let mut s = connect(client.addr());
            s.write_all(b"after").ok()?;
            s.shutdown(Shutdown::Write).ok()?;
            (harness::read_until_closed(&mut s) == b"echo:after").then_some(())
        },
    );
}

#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    use std::os::unix::process::CommandExt;
    let pki = Pki::new();
    let mut cmd = std::process::Command::new(harness::legate_bin());
    cmd.args([
        "server",
        "--listen=127.0.0.1:0",
        "--target=127.0.0.1:1",
        "--allow-all",
    ])
    .args(pki.flags("server"))
    .stderr(std::process::Stdio::null());
    // SAFETY: only setrlimit, which is async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 256,
                rlim_max: 4096,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let mut child = cmd.spawn().unwrap();
    let limits = eventually("the limit to be raised", DEADLINE, || {
        let text = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).ok()?;
        let line = text
            .lines()
            .find(|l| l.starts_with("Max open files"))?
            .to_string();
        line.contains("4096                 4096").then_some(line)
    });
    assert!(limits.contains("4096"), "{limits}");
    child.kill().unwrap();
    child.wait().unwrap();
}
