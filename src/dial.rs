//! Dial: outbound TCP connections with a deadline.
//!
//! In: a `host:port` and the connect timeout. Out: a connected, tuned `TcpStream`. Every address
//! the name resolves to is tried in order until one connects, all within the one deadline.

use std::io;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use crate::config::HostPort;

/// Why a dial failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot resolve {addr}: {source}")]
    Resolve { addr: String, source: io::Error },
    #[error("{addr} resolves to no address")]
    NoAddress { addr: String },
    #[error("connect to {addr} failed: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("connect to {addr} timed out after {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
}

/// Connects to `addr` within `timeout`, trying each resolved address in turn.
pub async fn dial(addr: &HostPort, timeout: Duration) -> Result<TcpStream, Error> {
    let name = addr.to_string();
    let attempt = async {
        let candidates = tokio::net::lookup_host((addr.host.as_str(), addr.port))
            .await
            .map_err(|source| Error::Resolve {
                addr: name.clone(),
                source,
            })?;
        let mut last = None;
        for candidate in candidates {
            match TcpStream::connect(candidate).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(source) => Error::Connect {
                addr: name.clone(),
                source,
            },
            None => Error::NoAddress { addr: name.clone() },
        })
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(Error::Timeout {
            addr: name,
            timeout,
        }),
    }
}

/// Sets TCP_NODELAY (the tunnel must not add Nagle delay to small requests) and, for sockets
/// that cross the network, TCP keepalive so a silently dead peer is noticed.
pub fn tune(stream: &TcpStream, keepalive: Option<Duration>) {
    // Failures here leave a working socket with default options; nothing to report upward.
    let _ = stream.set_nodelay(true);
    if let Some(idle) = keepalive.filter(|d| !d.is_zero()) {
        let interval = (idle / 3).max(Duration::from_secs(1));
        let ka = TcpKeepalive::new()
            .with_time(idle)
            .with_interval(interval)
            .with_retries(3);
        let _ = SockRef::from(stream).set_tcp_keepalive(&ka);
    }
}
