//! Inbound: the end a connection arrives on.
//!
//! Client side: a consumer's plain socket, nothing to do. Server side: a TLS handshake in the
//! connection's own task under the handshake timeout, the client's identity checked against
//! the `--allow-*` rules, and, when the client took `legate/1`, the greeting that tells it it
//! was admitted. In: an accepted socket. Out: an authorised TLS connection and what every
//! stream on it shares ([`ConnInfo`]), or a [`Failure`].

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::config::TunnelConfig;
use crate::log::Record;
use crate::mux::{self, Hello};
use crate::net::{PeerAddr, Stream};
use crate::outcome::{Failure, Outcome, fail};
use crate::tls::{self, PeerIdentity, ServerStream, ServerTls};

/// Server side: the TLS handshake, under the handshake timeout, in this connection's task.
pub async fn handshake(
    server: &ServerTls,
    tcp: Stream,
    timeout: Duration,
) -> Result<ServerStream, Failure> {
    match tokio::time::timeout(timeout, server.accept(tcp)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(fail(
            Outcome::HandshakeFailed,
            format!(
                "TLS handshake failed: {}",
                tls::describe_handshake_error(&e)
            ),
        )),
        Err(_) => Err(fail(
            Outcome::HandshakeFailed,
            format!("TLS handshake timed out after {timeout:?}"),
        )),
    }
}

/// Server side: the client's certificate chains to the CA (rustls checked that); now its
/// identity must pass the `--allow-*` rules. With `--disable-authentication` there is no
/// identity to check.
pub fn authorize(cfg: &TunnelConfig, tls: &ServerStream) -> Result<Option<PeerIdentity>, Failure> {
    if cfg.disable_authentication {
        return Ok(None);
    }
    let id = tls::peer_identity(tls.get_ref().1).map_err(|e| fail(Outcome::Unauthorized, e))?;
    if cfg.allow.admits(&id) {
        Ok(Some(id))
    } else {
        Err(fail(
            Outcome::Unauthorized,
            format!("client identity {id} is not allowed by the --allow-* rules"),
        ))
    }
}

/// Server side over `legate/1`: the greeting, sent once the client is admitted (in TLS 1.3 the
/// client finishes its handshake before we judged its certificate; HELLO is how it knows).
pub async fn greet(cfg: &TunnelConfig, tls: &mut ServerStream) -> Result<(), Failure> {
    let hello = mux::frame::hello(&Hello {
        version: mux::frame::VERSION,
        features: 0,
        idle_secs: u32::try_from(cfg.idle_timeout.as_secs()).unwrap_or(u32::MAX),
    });
    let sent = async {
        tls.write_all(&hello).await?;
        tls.flush().await
    };
    sent.await
        .map_err(|e| fail(Outcome::Idle, format!("client left before HELLO: {e}")))
}

/// Server side: what every stream of one TLS connection shares, for logs and PROXY headers.
#[derive(Clone)]
pub struct ConnInfo {
    pub peer: PeerAddr,
    pub session: Option<String>,
    pub identity: Option<PeerIdentity>,
    /// Where the client connected to: the PROXY header's destination.
    pub destination: Option<std::net::SocketAddr>,
    pub tls_version: Option<String>,
}

impl ConnInfo {
    pub fn new(rec: &Record, tls: &ServerStream) -> ConnInfo {
        let (stream, conn) = tls.get_ref();
        ConnInfo {
            peer: rec.peer,
            session: rec.session.clone(),
            identity: rec.identity.clone(),
            destination: stream.local_addr(),
            tls_version: conn.protocol_version().map(|v| match v {
                rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_string(),
                rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_string(),
                other => format!("{other:?}"),
            }),
        }
    }

    /// A fresh log record for one stream on this connection.
    pub fn record(&self) -> Record {
        let mut rec = Record::new(self.peer);
        rec.session = self.session.clone();
        rec.identity = self.identity.clone();
        rec
    }
}
