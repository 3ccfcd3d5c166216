//! Carrier: the TLS end of one stream, whichever way the peer carries it.
//!
//! A stream between two ambassadors travels either **raw** (the TLS connection is the byte
//! stream: stunnel, ghostunnel and `openssl` peers, or a legate that did not take `legate/1`)
//! or as a **stream** of a multiplexed `legate/1` connection. The server side receives a stream
//! on a carrier (its inbound end); the client side sends one on a carrier (its outbound end).
//! Everything after that (answer, relay) is the same code for both.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::mux::{self, RefuseCode};
use crate::relay::{self, Totals};

/// The TLS end of one stream.
pub enum Carrier<S> {
    /// The whole TLS connection is this one stream.
    Raw(Box<S>),
    /// One stream of a multiplexed connection.
    Stream(mux::Stream),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Carrier<S> {
    /// Server side: the stream's service is connected. Raw carriers have no one to tell.
    pub fn ready(&self) {
        if let Carrier::Stream(s) = self {
            s.ready();
        }
    }

    /// Server side: the stream is refused. A multiplexed peer learns why; a raw one sees its
    /// connection closed.
    pub async fn refuse(self, code: RefuseCode, message: &str) {
        match self {
            Carrier::Stream(s) => s.refuse(code, message),
            Carrier::Raw(mut tls) => {
                let _ = tls.shutdown().await;
            }
        }
    }

    /// Relays between `plain` and this carrier until both directions end, or `close_timeout`
    /// after the first, `lifetime`, or `stop`. `sent_end`: the plain side's end was already sent
    /// (before READY).
    /// `Totals::up` counts plain → carrier, `down` carrier → plain.
    pub async fn relay<P: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        plain: P,
        close_timeout: Duration,
        sent_end: bool,
        lifetime: Option<Duration>,
        stop: Option<tokio_util::sync::CancellationToken>,
    ) -> Totals {
        let end = relay::End {
            deadline: lifetime.map(|d| tokio::time::Instant::now() + d),
            stop,
        };
        match self {
            Carrier::Raw(tls) => relay::relay(plain, &mut **tls, close_timeout, end).await,
            Carrier::Stream(s) => s.relay(plain, close_timeout, sent_end, end).await,
        }
    }
}
