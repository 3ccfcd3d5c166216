//! Bad local input: key files open to others, unreadable and malformed files. Each is one line
//! naming the file and what to do, and exit 2, before anything listens.

mod harness;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

use harness::{Legate, Pki, legate_bin};

fn server_with(pki: &Pki, files: &[String], extra: &[&str]) -> Output {
    Command::new(legate_bin())
        .args([
            "server",
            "--listen=127.0.0.1:0",
            "--target=127.0.0.1:1",
            "--allow-all",
        ])
        .args(files)
        .args(extra)
        .env("RUST_LOG", "warn")
        .current_dir(pki.dir.path())
        .output()
        .unwrap()
}

/// Exit 2 with exactly one `legate:` line on stderr, which contains every one of `needles`.
fn one_line_exit_2(out: &Output, needles: &[&str]) {
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<_> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("legate: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} not in {err}");
    }
}

fn chmod(path: &std::path::Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_key_readable_by_others_is_refused_unless_allowed() {
    let pki = Pki::new();
    let key = pki.leaf("server").key;
    for mode in [0o644, 0o640, 0o604, 0o660] {
        chmod(&key, mode);
        let out = server_with(&pki, &pki.flags("server"), &[]);
        one_line_exit_2(
            &out,
            &[
                &key.display().to_string(),
                &format!("mode {mode:04o}"),
                "chmod 600",
                "--allow-readable-key",
            ],
        );
    }
    // Owner-only modes are fine; so is an open mode with the explicit flag.
    chmod(&key, 0o400);
    let mut server = Legate::server(&pki, "127.0.0.1:1", &["--allow-all"]);
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(harness::DEADLINE).success());
    chmod(&key, 0o644);
    let mut server = Legate::server(
        &pki,
        "127.0.0.1:1",
        &["--allow-all", "--allow-readable-key"],
    );
    server.signal(libc::SIGTERM);
    assert!(server.wait_exit(harness::DEADLINE).success());
}

#[test]
fn a_keystore_readable_by_others_is_refused_and_the_config_file_can_allow_it() {
    let pki = Pki::new();
    let leaf = pki.leaf("server");
    let store = pki.path("server.pem");
    let combined =
        std::fs::read_to_string(&leaf.cert).unwrap() + &std::fs::read_to_string(&leaf.key).unwrap();
    std::fs::write(&store, combined).unwrap();
    chmod(&store, 0o644);
    let keystore = [
        format!("--keystore={}", store.display()),
        format!("--cacert={}", pki.ca_cert().display()),
    ];
    let out = server_with(&pki, &keystore, &[]);
    one_line_exit_2(
        &out,
        &["keystore", &store.display().to_string(), "mode 0644"],
    );

    // The same waiver in a config file, checked by `run --check`.
    let config = harness::write_config(
        pki.dir.path(),
        &format!(
            "[tunnels.s]\nside = \"server\"\nlisten = \"127.0.0.1:0\"\ntarget = \"127.0.0.1:1\"\n\
             allow_all = true\nkeystore = {:?}\ncacert = {:?}\nallow_readable_key = true\n",
            store.display().to_string(),
            pki.ca_cert().display().to_string()
        ),
    );
    let out = Command::new(legate_bin())
        .args(["run", "--check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

#[test]
fn unreadable_and_malformed_files_name_the_file() {
    let pki = Pki::new();
    let leaf = pki.leaf("server");
    // Root reads any file whatever its mode, so "unreadable" is a directory here.
    let dir = pki.path("a-directory");
    std::fs::create_dir(&dir).unwrap();
    let bad_pem = pki.path("bad.crt");
    std::fs::write(
        &bad_pem,
        "-----BEGIN CERTIFICATE-----\n!!!! not base64 !!!!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let garbage_key = pki.path("garbage.key");
    std::fs::write(&garbage_key, b"\x00\x01\x02 random bytes, no PEM at all").unwrap();
    chmod(&garbage_key, 0o600);
    let key_not_cert = pki.path("cert-as-key.key");
    std::fs::copy(&leaf.cert, &key_not_cert).unwrap();
    chmod(&key_not_cert, 0o600);

    let ca = format!("--cacert={}", pki.ca_cert().display());
    let cert = format!("--cert={}", leaf.cert.display());
    let key = format!("--key={}", leaf.key.display());
    let cases: Vec<(Vec<String>, Vec<String>)> = vec![
        (
            vec![format!("--cert={}", dir.display()), key.clone(), ca.clone()],
            vec!["cannot read certificate".into(), dir.display().to_string()],
        ),
        (
            vec![
                cert.clone(),
                key.clone(),
                format!("--cacert={}", dir.display()),
            ],
            vec!["cannot read CA bundle".into(), dir.display().to_string()],
        ),
        (
            vec![
                format!("--cert={}", bad_pem.display()),
                key.clone(),
                ca.clone(),
            ],
            vec![
                "certificate".into(),
                bad_pem.display().to_string(),
                "not valid PEM".into(),
            ],
        ),
        (
            vec![
                cert.clone(),
                format!("--key={}", garbage_key.display()),
                ca.clone(),
            ],
            vec!["private key".into(), garbage_key.display().to_string()],
        ),
        (
            vec![
                cert.clone(),
                format!("--key={}", key_not_cert.display()),
                ca.clone(),
            ],
            vec![
                "holds no PEM PRIVATE KEY".into(),
                key_not_cert.display().to_string(),
            ],
        ),
    ];
    for (files, needles) in cases {
        let out = server_with(&pki, &files, &[]);
        let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
        one_line_exit_2(&out, &needles);
    }
}
