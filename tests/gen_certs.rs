//! `legate gen-certs`: what it writes, with which permissions, and what it refuses to do.

mod harness;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use harness::legate_bin;

fn gen_certs(out: &Path, args: &[&str]) -> Output {
    Command::new(legate_bin())
        .arg("gen-certs")
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .unwrap()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn openssl_verify(ca: &Path, cert: &Path) {
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca)
        .arg(cert)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

fn text_of(cert: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-text", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn writes_a_ca_and_leaves_with_private_keys_0600_and_prints_both_commands() {
    let dir = tempfile::tempdir().unwrap();
    let out = gen_certs(dir.path(), &[]);
    assert!(out.status.success(), "{out:?}");
    for key in ["ca.key", "server.key", "client.key"] {
        assert_eq!(mode(&dir.path().join(key)), 0o600, "{key}");
    }
    for cert in ["server.crt", "client.crt"] {
        openssl_verify(&dir.path().join("ca.crt"), &dir.path().join(cert));
    }
    let server = text_of(&dir.path().join("server.crt"));
    assert!(
        server.contains("DNS:localhost") && server.contains("IP Address:127.0.0.1"),
        "{server}"
    );
    assert!(server.contains("TLS Web Server Authentication"), "{server}");
    let client = text_of(&dir.path().join("client.crt"));
    assert!(client.contains("TLS Web Client Authentication"), "{client}");
    // It serves the client's status port under its own name, and no host's: a client key must
    // not pass as a server for localhost, nor match --allow-dns=localhost.
    assert!(client.contains("DNS:client"), "{client}");
    assert!(
        !client.contains("DNS:localhost") && !client.contains("IP Address:127.0.0.1"),
        "{client}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let commands: Vec<_> = stdout
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("legate "))
        .collect();
    assert_eq!(commands.len(), 2, "{stdout}");
    assert!(commands[0].starts_with("legate server ") && commands[0].contains("--allow-cn=client"));
    assert!(
        commands[1].starts_with("legate client ")
            && commands[1].contains("--target=localhost:8443")
    );
}

#[test]
fn never_overwrites_without_force() {
    let dir = tempfile::tempdir().unwrap();
    assert!(gen_certs(dir.path(), &[]).status.success());
    let before = std::fs::read(dir.path().join("server.key")).unwrap();
    let again = gen_certs(dir.path(), &[]);
    assert_eq!(again.status.code(), Some(2));
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("already exists; pass --force to overwrite it"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("server.key")).unwrap(),
        before
    );

    // --force replaces the leaves, still 0600 even if the old file was loosened.
    std::fs::set_permissions(
        dir.path().join("server.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    assert!(gen_certs(dir.path(), &["--force"]).status.success());
    assert_ne!(
        std::fs::read(dir.path().join("server.key")).unwrap(),
        before
    );
    assert_eq!(mode(&dir.path().join("server.key")), 0o600);
}

#[test]
fn reuses_the_ca_to_issue_more_leaves() {
    let dir = tempfile::tempdir().unwrap();
    assert!(gen_certs(dir.path(), &[]).status.success());
    let ca = std::fs::read(dir.path().join("ca.crt")).unwrap();
    let out = gen_certs(
        dir.path(),
        &["--client", "billing", "--trust-domain", "example.org"],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("reused CA"));
    assert_eq!(std::fs::read(dir.path().join("ca.crt")).unwrap(), ca);
    openssl_verify(&dir.path().join("ca.crt"), &dir.path().join("billing.crt"));
    let text = text_of(&dir.path().join("billing.crt"));
    assert!(text.contains("URI:spiffe://example.org/billing"), "{text}");
    assert!(
        text.contains("CN = billing") || text.contains("CN=billing"),
        "{text}"
    );
}

#[test]
fn other_key_types_work() {
    for (kind, marker) in [("ed25519", "ED25519"), ("rsa2048", "rsaEncryption")] {
        let dir = tempfile::tempdir().unwrap();
        let out = gen_certs(
            dir.path(),
            &[
                "--key-type",
                kind,
                "--server-name",
                "db.internal",
                "--client",
                "app",
            ],
        );
        assert!(out.status.success(), "{kind}: {out:?}");
        openssl_verify(&dir.path().join("ca.crt"), &dir.path().join("server.crt"));
        let text = text_of(&dir.path().join("app.crt"));
        assert!(text.contains(marker), "{kind}: {text}");
    }
}

#[test]
fn bad_requests_are_refused_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    for (args, expected) in [
        (&["--client", "../evil"][..], "must be letters, digits"),
        (&["--client", "ca"][..], "would overwrite the ca files"),
        (&["--days", "0"][..], "--days must be at least 1"),
        (
            &["--trust-domain", "spiffe://x"][..],
            "must be a bare domain",
        ),
    ] {
        let out = gen_certs(dir.path(), args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{args:?}: {err}");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "{args:?} wrote files"
        );
    }
}
