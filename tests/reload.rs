//! Reload: certificates and CRLs on SIGHUP without dropping a connection, and `legate run`
//! rereading its config file.

mod harness;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;

use harness::{
    Backend, Legate, Pki, connect, free_port, http_get, read_all, status_addr, write_config,
};
use legate::certs::{LeafSpec, Usage};

fn server_leaf(pki: &Pki, cn: &str) {
    let mut spec = LeafSpec::new(cn, Usage::Server);
    spec.names = vec!["localhost".into(), "127.0.0.1".into()];
    pki.issue("server", &spec);
}

fn roundtrip(addr: std::net::SocketAddr, tag: &[u8]) {
    let mut s = connect(addr);
    s.write_all(b"ping").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut expected = tag.to_vec();
    expected.extend_from_slice(b"ping");
    assert_eq!(read_all(&mut s), expected);
}

/// Sends `total` bytes in two halves with a pause (the barrier) between, reading the echo as it
/// goes; checks every byte.
fn transfer(addr: std::net::SocketAddr, seed: u8, total: usize, halfway: Arc<Barrier>) {
    let data: Vec<u8> = (0..total)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect();
    let mut s = connect(addr);
    let mut reader = s.try_clone().unwrap();
    let expect = data.clone();
    let check = thread::spawn(move || {
        let mut got = vec![0u8; expect.len()];
        reader.read_exact(&mut got).unwrap();
        assert!(got == expect, "transfer {seed} came back changed");
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    });
    let (first, second) = data.split_at(total / 2);
    s.write_all(first).unwrap();
    halfway.wait(); // every transfer is open and moving
    halfway.wait(); // the reloads are done
    s.write_all(second).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    check.join().unwrap();
}

#[test]
fn reload_under_load_keeps_every_byte_and_switches_certificates() {
    let pki = Pki::new();
    let backend = Backend::echo(b"");
    let server = Legate::server(
        &pki,
        &backend.target(),
        &["--allow-cn=client", "--status=http://127.0.0.1:0"],
    );
    let status = status_addr(&server);
    let client = Legate::client(&pki, "client", server.addr(), &["--verify-dns=localhost"]);
    let halfway = Arc::new(Barrier::new(5));
    let transfers: Vec<_> = (0..4)
        .map(|i| {
            let (addr, halfway) = (client.addr(), halfway.clone());
            thread::spawn(move || transfer(addr, i, 8 * 1024 * 1024, halfway))
        })
        .collect();
    halfway.wait();

    for (round, cn) in ["server-v2", "server-v3"].iter().enumerate() {
        server_leaf(&pki, cn);
        server.signal(libc::SIGHUP);
        harness::eventually("the reload", harness::DEADLINE, || {
            (server.log.count(&["reload complete"]) == round + 1).then_some(())
        });
        roundtrip(client.addr(), b"");
        client
            .log
            .wait_for(&["connection closed", &format!("identity=\"CN={cn}\"")]);
    }

    // A broken certificate changes nothing: the old one stays, and /_status says why.
    std::fs::write(pki.leaf("server").cert, "not a certificate").unwrap();
    server.signal(libc::SIGHUP);
    let line = server.log.wait_for(&["reload failed"]);
    assert!(line.contains("server.crt"), "{line}");
    roundtrip(client.addr(), b"");
    harness::eventually(
        "a second connection to server-v3",
        harness::DEADLINE,
        || {
            (client
                .log
                .count(&["connection closed", "identity=\"CN=server-v3\""])
                == 2)
                .then_some(())
        },
    );
    let doc: serde_json::Value =
        serde_json::from_str(&http_get(status, "/_status", None).body).unwrap();
    assert!(
        doc["last_reload_error"]
            .as_str()
            .unwrap()
            .contains("server.crt"),
        "{doc}"
    );
    assert!(doc["last_reload"].is_string());
    assert_eq!(doc["ok"], true);

    halfway.wait();
    for t in transfers {
        t.join().expect("a transfer lost bytes or failed");
    }
    // None of the four long transfers was cut.
    harness::eventually(
        "four complete transfers in the log",
        harness::DEADLINE,
        || {
            let done = server
                .log
                .count(&["connection closed", "outcome=ok", "bytes_up=8388608"]);
            (done == 4).then_some(())
        },
    );
}

/// A client whose certificate a reloaded CRL revokes, with a resumable session, a multiplexed
/// connection or pooled connections: each must be refused afterwards.
fn revoked_client_is_refused(client_flags: &[&str]) {
    let pki = Pki::new();
    let client_leaf = pki.issue("client", &LeafSpec::new("client", Usage::Client));
    let crl = pki.path("ca.crl");
    std::fs::write(&crl, pki.ca.crl(&[], 1).unwrap()).unwrap();
    let backend = Backend::echo(b"ok:");
    let server = Legate::server(
        &pki,
        &backend.target(),
        &["--allow-cn=client", &format!("--crl={}", crl.display())],
    );
    let client = Legate::client(&pki, "client", server.addr(), client_flags);
    roundtrip(client.addr(), b"ok:");
    roundtrip(client.addr(), b"ok:");
    if client_flags.contains(&"--pool-size=0") {
        // The client holds a session it could resume.
        client.log.wait_for(&["connection closed", " resumed\""]);
    }

    std::fs::write(
        &crl,
        pki.ca
            .crl(std::slice::from_ref(&client_leaf.serial), 2)
            .unwrap(),
    )
    .unwrap();
    server.signal(libc::SIGHUP);
    server.log.wait_for(&["reload complete"]);
    let mut s = connect(client.addr());
    let _ = s.write_all(b"ping");
    assert_eq!(harness::read_until_closed(&mut s), b"");
    let line = server.log.wait_for(&["outcome=handshake_failed"]);
    assert!(line.contains("Revoked"), "{line}");
    assert_eq!(backend.accepted(), 2);
}

#[test]
fn a_revoked_client_is_refused_after_a_crl_reload_also_when_resuming() {
    revoked_client_is_refused(&["--pool-size=0"]);
}

#[test]
fn a_revoked_client_cannot_use_its_multiplexed_connection_after_a_crl_reload() {
    revoked_client_is_refused(&[]);
}

#[test]
fn a_revoked_client_cannot_use_its_kept_connections_after_a_crl_reload() {
    revoked_client_is_refused(&["--peer-is-legate", "--pool-size=2"]);
}

fn client_table(pki: &Pki, name: &str, port: u16) -> String {
    format!(
        "[tunnels.{name}]\nside = \"client\"\nlisten = \"127.0.0.1:0\"\ntarget = \"localhost:{port}\"\n{}\n",
        pki.toml_files("client")
    )
}

#[test]
fn config_reload_adds_removes_changes_and_ignores_an_invalid_file() {
    let pki = Pki::new();
    let one = Backend::echo(b"one:");
    let two = Backend::echo(b"two:");
    let port = free_port();
    // A new close timeout makes "edge" changed (replaced), not only retargeted (taken in
    // place, tests/upstreams.rs).
    let edge = |target: &str, close: &str| {
        format!(
            "[tunnels.edge]\nside = \"server\"\nlisten = \"127.0.0.1:{port}\"\ntarget = \"{target}\"\nclose_timeout = \"{close}\"\nallow_cn = [\"client\"]\n{}\n",
            pki.toml_files("server")
        )
    };
    let status_line = "status = \"http://127.0.0.1:0\"\n";
    let first = format!(
        "{status_line}{}{}{}",
        edge(&one.target(), "10s"),
        client_table(&pki, "app", port),
        client_table(&pki, "old", port)
    );
    let path = write_config(pki.dir.path(), &first);
    let legate = Legate::start(
        &["run".into(), "--config".into(), path.display().to_string()],
        3,
    );
    let status = status_addr(&legate);
    roundtrip(legate.addrs["app"], b"one:");
    // A connection through "old" stays open across the reload that removes "old".
    let mut held = connect(legate.addrs["old"]);
    held.write_all(b"held").unwrap();
    let mut buf = [0u8; 8];
    held.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"one:held");

    let second = format!(
        "{status_line}{}{}{}",
        edge(&two.target(), "5s"),
        client_table(&pki, "app", port),
        client_table(&pki, "new", port)
    );
    write_config(pki.dir.path(), &second);
    legate.signal(libc::SIGHUP);
    let line = legate.log.wait_for(&["config reloaded"]);
    assert!(
        line.contains("added=[\"new\"]")
            && line.contains("removed=[\"old\"]")
            && line.contains("changed=[\"edge\"]")
            && line.contains("unchanged=1"),
        "{line}"
    );
    // "app" kept its listener and now reaches the changed edge's new target.
    roundtrip(legate.addrs["app"], b"two:");
    // "new" listens; "old" does not, but its open connection still works.
    let new_line = legate.log.wait_for(&["INFO listening", "tunnel=new"]);
    let new_addr = harness::field(&new_line, "listen")
        .unwrap()
        .parse()
        .unwrap();
    roundtrip(new_addr, b"two:");
    assert!(TcpStream::connect(legate.addrs["old"]).is_err());
    held.write_all(b"more").unwrap();
    held.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut held), b"more");

    // An invalid file changes nothing and says why.
    write_config(
        pki.dir.path(),
        "[tunnels.edge]\nside = \"server\"\nlisten = 5\n",
    );
    legate.signal(libc::SIGUSR1);
    let line = legate.log.wait_for(&["reload failed"]);
    assert!(
        line.contains("keeping the previous configuration"),
        "{line}"
    );
    roundtrip(legate.addrs["app"], b"two:");
    roundtrip(new_addr, b"two:");
    let doc: serde_json::Value =
        serde_json::from_str(&http_get(status, "/_status", None).body).unwrap();
    let err = doc["last_reload_error"].as_str().unwrap();
    assert!(err.contains("tunnel \"edge\""), "{err}");
    assert_eq!(doc["tunnels"].as_array().unwrap().len(), 3, "{doc}");
}

#[test]
fn timed_reload_picks_up_new_certificates() {
    let pki = Pki::new();
    let backend = Backend::echo(b"");
    let server = Legate::server(
        &pki,
        &backend.target(),
        &["--allow-cn=client", "--timed-reload=200ms"],
    );
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    server_leaf(&pki, "server-timed");
    let before = server.log.count(&["reload complete"]);
    harness::eventually(
        "a timed reload after the new certificate",
        harness::DEADLINE,
        || (server.log.count(&["reload complete", "trigger=\"timer\""]) > before + 1).then_some(()),
    );
    roundtrip(client.addr(), b"");
    client
        .log
        .wait_for(&["connection closed", "identity=\"CN=server-timed\""]);
}

#[test]
fn a_changed_tunnel_takes_over_its_listener_and_a_failed_move_keeps_the_old_one() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let pki = Pki::new();
    // One tag byte: what steady_consumers expects before the echo of its "x".
    let backend = Backend::echo(b"e");
    let port = free_port();
    let edge = |listen: u16, close: &str| {
        format!(
            "[tunnels.edge]\nside = \"server\"\nlisten = \"127.0.0.1:{listen}\"\ntarget = \"{}\"\nclose_timeout = \"{close}\"\nallow_cn = [\"client\"]\n{}\n",
            backend.target(),
            pki.toml_files("server")
        )
    };
    let path = write_config(pki.dir.path(), &edge(port, "10s"));
    let legate = Legate::start(
        &["run".into(), "--config".into(), path.display().to_string()],
        1,
    );
    // Raw: every consumer is a TLS connection of its own to the edge's port.
    let client = Legate::client(
        &pki,
        "client",
        format!("127.0.0.1:{port}").parse().unwrap(),
        &["--raw"],
    );
    let (stop, done) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    let consumers = harness::steady_consumers(client.addr(), stop.clone(), done.clone());
    let wait_more = |n: usize| {
        let target = done.load(Ordering::SeqCst) + n;
        harness::eventually("more consumers", harness::DEADLINE, || {
            (done.load(Ordering::SeqCst) >= target).then_some(())
        });
    };
    wait_more(20);

    // Changed (a new close timeout), same address: the listener is handed over.
    write_config(pki.dir.path(), &edge(port, "5s"));
    legate.signal(libc::SIGHUP);
    let line = legate.log.wait_for(&["config reloaded"]);
    assert!(line.contains("changed=[\"edge\"]"), "{line}");
    wait_more(20);

    // Moved to a port something else holds: the reload fails and the old tunnel serves on.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    write_config(pki.dir.path(), &edge(taken_port, "5s"));
    legate.signal(libc::SIGHUP);
    legate
        .log
        .wait_for(&["reload failed; keeping the previous configuration"]);
    wait_more(20);
    stop.store(true, Ordering::SeqCst);
    let (answers, failures) = consumers.join().unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(answers.values().sum::<usize>() >= 60, "{answers:?}");
    drop(taken);
}
