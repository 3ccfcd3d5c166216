//! Health checks of a service, for `/_status`: `--target-status`, an HTTP GET sent over a
//! connection to the tunnel's target (whatever host the URL names), healthy only on a 200.
//!
//! In: the target address and the URL. Out: `Ok` or what was wrong, in one line. An `https://`
//! URL is verified as a browser would: the system's roots, for the URL's host.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::config::TargetStatus;
use crate::dial;
use crate::net::Address;

/// The longest status line and headers read from the service's answer.
const MAX_HEAD: usize = 8 * 1024;

/// GETs `url` over a connection to `target`, all within `timeout`.
pub async fn http_status(
    target: &Address,
    url: &TargetStatus,
    timeout: Duration,
) -> Result<(), String> {
    let check = async {
        let tcp = dial::dial(target, timeout)
            .await
            .map_err(|e| e.to_string())?;
        if !url.https {
            return get(tcp, url).await;
        }
        let name = rustls::pki_types::ServerName::try_from(url.host.clone())
            .map_err(|e| format!("{}: {e}", url.host))?;
        let tls = tokio_rustls::TlsConnector::from(https_config())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS to {} failed: {e}", url.url))?;
        get(tls, url).await
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(result) => result,
        Err(_) => Err(format!("GET {} timed out after {timeout:?}", url.url)),
    }
}

/// Sends the request and reads the status line.
async fn get<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    url: &TargetStatus,
) -> Result<(), String> {
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: legate/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        url.path,
        url.authority,
        env!("CARGO_PKG_VERSION")
    );
    s.write_all(request.as_bytes())
        .await
        .map_err(|e| format!("GET {}: {e}", url.url))?;
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.contains(&b'\n') {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("GET {}: {e}", url.url))?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return Err(format!("GET {}: no HTTP answer", url.url));
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let code = status_code(&head).ok_or_else(|| format!("GET {}: no HTTP answer", url.url))?;
    if code == 200 {
        Ok(())
    } else {
        Err(format!("target returned status: {code}"))
    }
}

/// The code of an HTTP/1.x status line (bytes from the service: fuzzed,
/// `fuzz/fuzz_targets/http.rs`).
pub fn status_code(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    // Three digits, the first 1-9, as RFC 9110 says ("001" or "+20" are not codes).
    match parts.next()?.as_bytes() {
        [a @ b'1'..=b'9', b @ b'0'..=b'9', c @ b'0'..=b'9'] => {
            Some(u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0'))
        }
        _ => None,
    }
}

/// The client config for `https://` checks: the system's roots, loaded once.
fn https_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .expect("the provider supports the default versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            status_code(b"HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(status_code(b"HTTP/1.1 200\r\n"), Some(200));
        assert_eq!(status_code(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 2000 OK\r\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 abc OK\r\n"), None);
        // Found by the fuzzer: not codes, though u16 parses them.
        assert_eq!(status_code(b"HTTP/1.2 001 O\n"), None);
        assert_eq!(status_code(b"HTTP/1.1 +20 OK\r\n"), None);
    }
}
