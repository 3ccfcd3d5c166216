//! Dial: outbound connections with a deadline.
//!
//! In: an address (`host:port` or `unix:PATH`) and the connect timeout. Out: a connected
//! [`Stream`]. Every address a name resolves to is tried in order until one connects, all
//! within the one deadline.

use std::io;
use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};

use crate::net::{Address, HostPort, Stream};

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

/// Connects to `addr` within `timeout`.
pub async fn dial(addr: &Address, timeout: Duration) -> Result<Stream, Error> {
    let name = addr.to_string();
    let attempt = async {
        match addr {
            Address::Systemd(_) => Err(Error::Connect {
                addr: name.clone(),
                source: std::io::Error::other("systemd: addresses are for --listen only"),
            }),
            Address::Tcp(hp) => dial_tcp(hp, &name).await.map(Stream::Tcp),
            Address::Unix(path) => {
                UnixStream::connect(path)
                    .await
                    .map(Stream::Unix)
                    .map_err(|source| Error::Connect {
                        addr: name.clone(),
                        source,
                    })
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(Error::Timeout {
            addr: name,
            timeout,
        }),
    }
}

/// Tries each address `addr` resolves to, in turn.
async fn dial_tcp(addr: &HostPort, name: &str) -> Result<TcpStream, Error> {
    let name = name.to_string();
    {
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
    }
}
