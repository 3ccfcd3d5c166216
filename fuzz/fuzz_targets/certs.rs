//! Certificate, key, CA bundle, CRL and keystore loading: any file contents give the loaded
//! items or a one-line error, never a panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use legate::tls;
use libfuzzer_sys::fuzz_target;

fn file() -> &'static PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        std::env::temp_dir().join(format!("legate-fuzz-certs-{}", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = file();
    std::fs::write(path, data).unwrap();
    for result in [
        tls::load_certs("certificate", path).map(drop),
        tls::load_key(path).map(drop),
        tls::load_roots(path).map(drop),
        tls::load_crls(path).map(drop),
        tls::load_keystore(path, &tls::Secret::default()).map(drop),
    ] {
        if let Err(e) = result {
            assert!(!e.to_string().is_empty());
        }
    }
});
