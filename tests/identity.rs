//! Identity formats: PKCS#12 keystores (OpenSSL 3's PBES2/AES-256-CBC and the legacy
//! RC2/3DES algorithms, with and without a password) and combined PEM files.

mod harness;

use std::io::Write;
use std::net::Shutdown;
use std::path::Path;
use std::process::Command;

use harness::{Backend, Legate, Pki, connect, legate_bin, pkcs12, read_all};

fn algorithms(p12: &Path, password: &str, legacy: bool) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["pkcs12", "-info", "-noout", "-in"])
        .arg(p12)
        .arg("-passin")
        .arg(format!("pass:{password}"));
    if legacy {
        cmd.arg("-legacy");
    }
    let out = cmd.output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A client whose identity is `identity_flags`, against a server admitting only CN=client.
fn works_with(pki: &Pki, identity_flags: &[String], env: Option<(&str, &str)>) {
    let backend = Backend::echo(b"ok:");
    let server = Legate::server(pki, &backend.target(), &["--allow-cn=client"]);
    let mut args = vec![
        "client".to_string(),
        "--listen=127.0.0.1:0".into(),
        format!("--target=localhost:{}", server.addr().port()),
        format!("--cacert={}", pki.ca_cert().display()),
    ];
    args.extend(identity_flags.iter().cloned());
    let client = match env {
        Some((k, v)) => Legate::start_with_env(&args, 1, &[(k, v)]),
        None => Legate::start(&args, 1),
    };
    let mut s = connect(client.addr());
    s.write_all(b"x").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut s), b"ok:x");
    server.log.wait_for(&["outcome=ok", "CN=client"]);
}

#[test]
fn an_openssl_3_pkcs12_with_an_empty_password() {
    let pki = Pki::new();
    let p12 = pkcs12(&pki, "client", "", &[], "client.p12");
    assert!(algorithms(&p12, "", false).contains("AES-256-CBC"));
    works_with(&pki, &[format!("--keystore={}", p12.display())], None);
}

#[test]
fn an_openssl_3_pkcs12_with_a_password_from_the_flag_or_the_environment() {
    let pki = Pki::new();
    let p12 = pkcs12(&pki, "client", "s3cret", &[], "client.p12");
    works_with(
        &pki,
        &[
            format!("--keystore={}", p12.display()),
            "--storepass=s3cret".into(),
        ],
        None,
    );
    works_with(
        &pki,
        &[format!("--keystore={}", p12.display())],
        Some(("KEYSTORE_PASS", "s3cret")),
    );
}

#[test]
fn legacy_pkcs12_files_rc2_and_3des() {
    let pki = Pki::new();
    let legacy = pkcs12(&pki, "client", "old", &["-legacy"], "legacy.p12");
    assert!(algorithms(&legacy, "old", true).contains("RC2"));
    works_with(
        &pki,
        &[
            format!("--keystore={}", legacy.display()),
            "--storepass=old".into(),
        ],
        None,
    );
    let des = pkcs12(
        &pki,
        "client",
        "old",
        &[
            "-keypbe",
            "PBE-SHA1-3DES",
            "-certpbe",
            "PBE-SHA1-3DES",
            "-macalg",
            "sha1",
        ],
        "3des.p12",
    );
    assert!(algorithms(&des, "old", false).contains("TripleDES"));
    works_with(
        &pki,
        &[
            format!("--keystore={}", des.display()),
            "--storepass=old".into(),
        ],
        None,
    );
}

#[test]
fn a_combined_pem_keystore() {
    let pki = Pki::new();
    let leaf = pki.leaf("client");
    let combined = pki.path("combined.pem");
    let mut text = std::fs::read_to_string(&leaf.cert).unwrap();
    text.push_str(&std::fs::read_to_string(&leaf.key).unwrap());
    legate::certs::write_file(&combined, &text, true, true).unwrap();
    works_with(&pki, &[format!("--keystore={}", combined.display())], None);
}

#[test]
fn a_wrong_keystore_password_is_one_clear_line() {
    let pki = Pki::new();
    let p12 = pkcs12(&pki, "client", "right", &[], "client.p12");
    let out = Command::new(legate_bin())
        .args(["client", "--listen=127.0.0.1:0", "--target=localhost:1"])
        .arg(format!("--keystore={}", p12.display()))
        .arg("--storepass=wrong")
        .arg(format!("--cacert={}", pki.ca_cert().display()))
        .env_remove("KEYSTORE_PASS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("wrong password (set --storepass or KEYSTORE_PASS)"),
        "{err}"
    );
}
