//! `legate check` (issue 18): each failure named at its step, with the exit code of the worst.
//! Real server ambassadors, a real Redis, real certificates (one expired, one from another CA).

mod harness;

use std::process::Command;

use harness::{Legate, Pki, Redis};
use legate::certs::{LeafSpec, Usage, Validity};

/// `legate check --json ARGS` (check's own flags first, then the client's): the exit code and
/// the steps.
fn check(args: &[String]) -> (i32, Vec<serde_json::Value>) {
    let (own, client): (Vec<&String>, Vec<&String>) =
        args.iter().partition(|a| a.as_str() == "--redis");
    let out = Command::new(harness::legate_bin())
        .arg("check")
        .arg("--json")
        .args(own)
        .args(client)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let steps: Vec<serde_json::Value> = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{e}: {text} {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap(), steps)
}

/// The step called `name`.
fn named<'a>(steps: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    steps
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("no step {name:?}: {steps:#?}"))
}

/// The first failed step: its name and detail.
fn failed(steps: &[serde_json::Value]) -> (String, String, String) {
    let s = steps
        .iter()
        .find(|s| s["verdict"] == "fail")
        .unwrap_or_else(|| panic!("no failed step: {steps:#?}"));
    let text = |k: &str| s[k].as_str().unwrap_or_default().to_string();
    (text("step"), text("detail"), text("hint"))
}

fn client_flags(pki: &Pki, leaf: &str, server: std::net::SocketAddr) -> Vec<String> {
    let mut args = vec![format!("--target=localhost:{}", server.port())];
    args.extend(pki.flags(leaf));
    args
}

#[test]
fn a_working_tunnel_passes_every_step() {
    let pki = Pki::new();
    let redis = Redis::start();
    let server = Legate::server(&pki, &redis.addr(), &["--allow-cn=client"]);
    let mut args = client_flags(&pki, "client", server.addr());
    args.push("--redis".into());
    let (code, steps) = check(&args);
    assert_eq!(code, 0, "{steps:#?}");
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    for want in [
        "config",
        "certificates",
        "resolve localhost",
        "connect",
        "TLS with",
        "legate/1",
        "the default target",
        "Redis PING",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(want)),
            "{want} in {names:?}"
        );
    }
    // The own certificate's names, issuer and chain.
    let chain = named(&steps, "certificate chain");
    let detail = chain["detail"].as_str().unwrap();
    assert_eq!(chain["verdict"], "ok", "{chain}");
    assert!(
        detail.starts_with("CN=client, SANs [") && detail.ends_with("chains to the CA bundle"),
        "{detail}"
    );
}

#[test]
fn each_failure_is_named_at_its_step() {
    let pki = Pki::new();
    let redis = Redis::start();
    let server = Legate::server(&pki, &redis.addr(), &["--allow-cn=client"]);

    // An expired certificate of this side's own.
    let mut spec = LeafSpec::new("client", Usage::Client);
    spec.validity = Validity::expired();
    pki.issue("old", &spec);
    let (code, steps) = check(&client_flags(&pki, "old", server.addr()));
    let (step, detail, _) = failed(&steps);
    assert_eq!((code, step.as_str()), (2, "certificates"), "{steps:#?}");
    assert!(detail.contains("expired"), "{detail}");

    // A CA that did not issue the server's certificate.
    let other = Pki::new();
    let mut args = client_flags(&pki, "client", server.addr());
    args.retain(|a| !a.starts_with("--cacert"));
    args.push(format!("--cacert={}", other.ca_cert().display()));
    let (code, steps) = check(&args);
    let (step, _, hint) = failed(&steps);
    assert_eq!(code, 2);
    assert!(step.starts_with("TLS with"), "{steps:#?}");
    assert!(hint.contains("--cacert"), "{hint}");
    // That CA did not issue this side's certificate either: a warning (a peer may trust
    // another CA), which names why.
    let chain = named(&steps, "certificate chain");
    assert_eq!(chain["verdict"], "warn", "{chain}");
    assert!(
        chain["detail"].as_str().unwrap().contains("UnknownIssuer"),
        "{chain}"
    );

    // Nothing listening.
    let port = harness::free_port();
    let args = client_flags(&pki, "client", format!("127.0.0.1:{port}").parse().unwrap());
    let (code, steps) = check(&args);
    let (step, detail, _) = failed(&steps);
    assert_eq!(code, 2);
    assert!(step.starts_with("connect "), "{steps:#?}");
    assert!(detail.contains("refused"), "{detail}");

    // A route the server does not have.
    let mut args = client_flags(&pki, "client", server.addr());
    args.push("--route=nope".into());
    let (code, steps) = check(&args);
    let (step, detail, _) = failed(&steps);
    assert_eq!(code, 2);
    assert!(step.starts_with("route \"nope\""), "{steps:#?}");
    assert!(detail.contains("unknown_route"), "{detail}");
}

#[test]
fn a_revoked_own_certificate_is_named_at_the_chain_step() {
    let pki = Pki::new();
    let revoked = pki.issue("revoked", &LeafSpec::new("client", Usage::Client));
    let crl = pki.path("ca.crl");
    std::fs::write(
        &crl,
        pki.ca
            .crl(std::slice::from_ref(&revoked.serial), 1)
            .unwrap(),
    )
    .unwrap();
    let port = harness::free_port();
    let mut args = client_flags(
        &pki,
        "revoked",
        format!("127.0.0.1:{port}").parse().unwrap(),
    );
    args.push(format!("--crl={}", crl.display()));
    let (_, steps) = check(&args);
    let chain = named(&steps, "certificate chain");
    assert_eq!(chain["verdict"], "warn", "{chain}");
    assert!(
        chain["detail"].as_str().unwrap().contains("Revoked"),
        "{chain}"
    );
}

#[test]
fn a_wrong_redis_password_is_named() {
    let pki = Pki::new();
    let redis = Redis::start_with(&["--requirepass", "right"]);
    let pw = pki.password_file("wrong", 0o600);
    let server = Legate::server(
        &pki,
        &redis.addr(),
        &[
            "--allow-cn=client",
            &format!("--redis-password-file={}", pw.display()),
        ],
    );
    let mut args = client_flags(&pki, "client", server.addr());
    args.push("--redis".into());
    let (code, steps) = check(&args);
    let (step, detail, hint) = failed(&steps);
    assert_eq!(code, 2);
    assert!(step.starts_with("Redis PING"), "{steps:#?}");
    assert!(detail.contains("WRONGPASS"), "{detail}");
    assert!(hint.contains("--redis-password-file"), "{hint}");
}

/// A config file: a server side's Redis exchange checked at the service (a wrong password
/// named there), and a client side's file source looked up before its servers are tried.
#[test]
fn a_config_file_checks_server_sides_and_discovery_too() {
    let pki = Pki::new();
    let redis = Redis::start_with(&["--requirepass", "right"]);
    let pw = pki.password_file("wrong", 0o600);
    let server = Legate::server(&pki, &redis.addr(), &["--allow-cn=client"]);
    let eps = pki.path("eps.toml");
    std::fs::write(
        &eps,
        format!("endpoints = [\"localhost:{}\"]\n", server.addr().port()),
    )
    .unwrap();
    let text = format!(
        "[tunnels.cache]\nside = \"server\"\nlisten = \"127.0.0.1:0\"\ntarget = \"{}\"\nallow_cn = [\"client\"]\nredis_password_file = {:?}\n{}\n\
         [tunnels.app]\nside = \"client\"\nlisten = \"127.0.0.1:0\"\ntarget = \"file:{}\"\noverride_server_name = \"localhost\"\n{}",
        redis.addr(),
        pw.display().to_string(),
        pki.toml_files("server"),
        eps.display(),
        pki.toml_files("client"),
    );
    let config = harness::write_config(pki.dir.path(), &text);
    let run = |tunnel: &str| {
        check(&[
            "--config".into(),
            config.display().to_string(),
            "--tunnel".into(),
            tunnel.into(),
        ])
    };
    let (code, steps) = run("cache");
    let (step, detail, hint) = failed(&steps);
    assert_eq!(code, 2, "{steps:#?}");
    assert_eq!(step, format!("target {}", redis.addr()));
    assert!(
        detail.contains("WRONGPASS") && hint.contains("--redis-password-file"),
        "{detail} {hint}"
    );
    // A server side's certificate is checked as a server's.
    assert_eq!(
        named(&steps, "certificate chain")["verdict"],
        "ok",
        "{steps:#?}"
    );
    let (code, steps) = run("app");
    assert_eq!(code, 0, "{steps:#?}");
    let found = steps
        .iter()
        .find(|s| s["step"].as_str().unwrap().starts_with("discovery file:"))
        .unwrap();
    assert!(
        found["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("localhost:{}", server.addr().port()))
    );
    assert!(steps.iter().any(|s| {
        s["step"]
            .as_str()
            .unwrap()
            .starts_with("TLS with localhost")
    }));
}

/// A client side straight to a Redis that speaks TLS: its own credentials are checked before
/// the PING, and a wrong one is named.
#[test]
fn a_raw_client_to_a_tls_redis_checks_its_credentials() {
    let pki = Pki::new();
    let (_redis, tls_port) = Redis::start_tls(&pki, "tlspw");
    let with_password = |secret: &str| {
        let pw = pki.password_file(secret, 0o600);
        let mut args = vec![
            "--redis".to_string(),
            format!("--target=localhost:{tls_port}"),
            "--raw".into(),
            format!("--redis-password-file={}", pw.display()),
        ];
        args.extend(pki.flags("client"));
        check(&args)
    };
    let (code, steps) = with_password("tlspw");
    assert_eq!(code, 0, "{steps:#?}");
    assert!(steps.iter().any(|s| s["detail"] == "PONG"), "{steps:#?}");
    let (code, steps) = with_password("nope");
    let (step, detail, _) = failed(&steps);
    assert_eq!(code, 2);
    assert!(step.starts_with("Redis credentials at"), "{steps:#?}");
    assert!(detail.contains("WRONGPASS"), "{detail}");
}
