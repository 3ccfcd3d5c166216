//! legate/1: named routes on one server port, and refusals the client can explain.

mod harness;

use harness::{Backend, Legate, Pki};

/// A server with two routes and no default target.
fn routed_server(pki: &Pki, alpha: &Backend, beta: &Backend) -> Legate {
    let mut args = vec![
        "server".to_string(),
        "--listen=127.0.0.1:0".into(),
        format!("--route=alpha={}", alpha.target()),
        format!("--route=beta={}", beta.target()),
        "--allow-cn=client".into(),
    ];
    args.extend(pki.flags("server"));
    Legate::start(&args, 1)
}

#[test]
fn two_routes_on_one_port_reach_two_backends() {
    let pki = Pki::new();
    let alpha = Backend::echo(b"alpha:");
    let beta = Backend::echo(b"beta:");
    let server = routed_server(&pki, &alpha, &beta);
    let to_alpha = Legate::client(&pki, "client", server.addr(), &["--route=alpha"]);
    let to_beta = Legate::client(&pki, "client", server.addr(), &["--route=beta"]);
    assert_eq!(harness::exchange(to_alpha.addr(), b"one"), b"alpha:one");
    assert_eq!(harness::exchange(to_beta.addr(), b"two"), b"beta:two");
    assert_eq!(harness::exchange(to_alpha.addr(), b"three"), b"alpha:three");
    assert_eq!((alpha.accepted(), beta.accepted()), (2, 1));
    let line = server.log.wait_for(&["outcome=ok", "route=\"beta\""]);
    assert!(line.contains(&beta.target()), "{line}");
}

#[test]
fn an_unknown_route_is_refused_and_the_client_says_why() {
    let pki = Pki::new();
    let alpha = Backend::echo(b"alpha:");
    let beta = Backend::echo(b"beta:");
    let server = routed_server(&pki, &alpha, &beta);
    let client = Legate::client(&pki, "client", server.addr(), &["--route=gamma"]);
    assert_eq!(harness::exchange(client.addr(), b"hello"), b"");
    let line = client
        .log
        .wait_for(&["connection failed", "outcome=refused"]);
    assert!(
        line.contains("server refused route") && line.contains("unknown_route"),
        "{line}"
    );
    assert!(line.contains("gamma"), "{line}");
    server
        .log
        .wait_for(&["outcome=unknown_route", "route=\"gamma\""]);
    assert_eq!(alpha.accepted() + beta.accepted(), 0);
}

#[test]
fn a_dead_target_is_reported_to_the_client() {
    let pki = Pki::new();
    let dead = format!("127.0.0.1:{}", harness::free_port());
    let server = Legate::server(&pki, &dead, &["--allow-cn=client"]);
    let client = Legate::client(&pki, "client", server.addr(), &[]);
    assert_eq!(harness::exchange(client.addr(), b"hello"), b"");
    let line = client.log.wait_for(&["outcome=refused"]);
    assert!(
        line.contains("dial_failed") && line.contains(&dead),
        "{line}"
    );
    server.log.wait_for(&["outcome=dial_failed"]);
}

#[test]
fn a_raw_client_gets_the_default_target() {
    let pki = Pki::new();
    let backend = Backend::echo(b"default:");
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    let client = Legate::client(&pki, "client", server.addr(), &["--raw"]);
    assert_eq!(harness::exchange(client.addr(), b"x"), b"default:x");
    // Raw mode: no route on either side's log line.
    let line = server.log.wait_for(&["outcome=ok"]);
    assert!(line.contains("route=\"-\""), "{line}");
}
