//! Pool: handshaken `legate/1` connections kept ready on the client side, so a consumer
//! connection pays no TLS handshake and no round trip to set one up.
//!
//! In: a client tunnel's config and TLS end. Out: live connections on demand. A background task
//! keeps `pool_size` connections ready, each proven live by the server's HELLO (the server
//! speaks first, and only after it admitted our certificate), and replaces them before the
//! server's idle limit. A connection whose stream ended cleanly in both directions comes back
//! for the next consumer. A connection that died in the pool is noticed when taken (a read
//! that is not pending) and dropped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::TunnelConfig;
use crate::metrics::TunnelMetrics;
use crate::mux::{Conn, Role};
use crate::protocol::{self, FEATURE_FRAMED, FEATURE_MUX, Frame};
use crate::tls::{ClientStream, ClientTls, PeerIdentity};
use crate::tunnel::{Failure, Outcome, describe_open_error, dial_peer, fail};

/// How long a server keeps an idle connection when its HELLO does not say.
const ASSUMED_IDLE: Duration = Duration::from_secs(30);

/// A ready connection.
pub struct Pooled {
    pub stream: Box<ClientStream>,
    /// Since when it has been idle.
    since: Instant,
    /// How long the server lets it idle.
    idle_limit: Duration,
    /// The client's TLS generation it was made with: after a reload it is not used.
    generation: u64,
}

impl Pooled {
    /// Retired well before the server gives up on it, allowing for scheduling slack.
    fn fresh_enough(&self) -> bool {
        self.since.elapsed() < self.idle_limit.mul_f64(0.75)
    }
}

/// Ready connections of one client tunnel.
pub struct Pool {
    /// How many to keep ready.
    size: usize,
    /// The most kept, counting connections returned after use: a burst of churning consumers
    /// finds the connections the previous burst returned, instead of handshaking afresh.
    /// Those beyond `size` retire with the server's idle limit.
    max_idle: usize,
    idle: Mutex<Vec<Pooled>>,
    /// Wakes the refill task when a connection was taken.
    taken: Notify,
    /// Cleared when the server turns out not to offer framing: consumers then dial their own.
    on: AtomicBool,
}

/// Why a connection could not be opened for the pool.
pub(crate) enum OpenError {
    /// Connect, handshake, the `--verify-*` pins or the greeting failed.
    Failed(Failure),
    /// The server speaks `legate/1` without stream framing, or not `legate/1` at all.
    NotFramed,
    /// The server offers framing but not multiplexing (an older legate).
    NotMux,
}

impl Pool {
    pub fn new(size: usize) -> Pool {
        Pool {
            size,
            max_idle: size.saturating_mul(8).max(64),
            idle: Mutex::new(Vec::new()),
            taken: Notify::new(),
            on: AtomicBool::new(true),
        }
    }

    /// False once the server turned out not to offer framed `legate/1`.
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Turns the pool off for good (the server does not offer framing).
    pub fn turn_off(&self) {
        self.on.store(false, Ordering::Relaxed);
        self.idle().clear();
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Pooled>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently proven live connection made with TLS generation `generation`, if any,
    /// with the server's idle limit.
    pub fn take(&self, generation: u64) -> Option<(Box<ClientStream>, Duration)> {
        let mut idle = self.idle();
        let found = loop {
            let Some(mut p) = idle.pop() else { break None };
            if p.generation == generation && p.fresh_enough() && still_open(&mut p.stream) {
                break Some((p.stream, p.idle_limit));
            }
        };
        drop(idle);
        self.taken.notify_one();
        found
    }

    /// Returns a connection whose last stream ended cleanly (or a new one).
    pub fn put(&self, stream: Box<ClientStream>, idle_limit: Duration, generation: u64) {
        let mut idle = self.idle();
        if idle.len() < self.max_idle {
            idle.push(Pooled {
                stream,
                since: Instant::now(),
                idle_limit,
                generation,
            });
        }
    }

    /// Keeps `size` connections ready until `stop`. Failures back off up to 5 s, so a server
    /// that is down is not hammered; the consumer path dials by itself meanwhile.
    pub async fn refill(&self, cfg: &TunnelConfig, tls: &ClientTls, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let generation = tls.generation();
            self.retire_stale(generation);
            if self.idle().len() < self.size {
                let opened = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = open(cfg, tls, None) => r,
                };
                match opened {
                    Ok((stream, idle_limit, _)) => {
                        backoff = Duration::from_millis(100);
                        self.put(stream, idle_limit, generation);
                        tracing::debug!(tunnel = %cfg.name, ready = self.idle().len(), "pooled connection ready");
                        continue;
                    }
                    Err(OpenError::NotFramed | OpenError::NotMux) => {
                        tracing::info!(tunnel = %cfg.name, "server does not offer framed legate/1; pool off");
                        self.turn_off();
                        return;
                    }
                    Err(OpenError::Failed(f)) => {
                        tracing::debug!(tunnel = %cfg.name, error = %f.detail, "pool: opening a connection failed");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.taken.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Drops connections that are too old, from before a reload, or closed by the server.
    fn retire_stale(&self, generation: u64) {
        self.idle().retain_mut(|p| {
            p.generation == generation && p.fresh_enough() && still_open(&mut p.stream)
        });
    }
}

/// Connects, handshakes, checks the `--verify-*` pins and waits for HELLO: a connection proven
/// live and admitted. Returns it with the server's idle limit.
pub(crate) async fn open(
    cfg: &TunnelConfig,
    tls: &ClientTls,
    metrics: Option<&TunnelMetrics>,
) -> Result<(Box<ClientStream>, Duration, u8), OpenError> {
    let (stream, _) = dial_peer(cfg, tls, metrics)
        .await
        .map_err(OpenError::Failed)?;
    let mut stream = Box::new(stream);
    if !crate::tls::negotiated_legate(stream.get_ref().1) {
        return Err(OpenError::NotFramed);
    }
    let hello = tokio::time::timeout(
        cfg.connect_timeout,
        protocol::expect_frame(&mut stream, "HELLO"),
    )
    .await
    .map_err(|_| OpenError::Failed(fail(Outcome::ProtocolError, "no greeting from the server")))?
    .map_err(|e| OpenError::Failed(fail(Outcome::ProtocolError, describe_open_error(&e))))?;
    match hello {
        Frame::Hello {
            features,
            idle_secs,
            ..
        } if features & FEATURE_FRAMED != 0 => {
            let limit = if idle_secs == 0 {
                ASSUMED_IDLE
            } else {
                Duration::from_secs(u64::from(idle_secs))
            };
            Ok((stream, limit, features))
        }
        Frame::Hello { .. } => Err(OpenError::NotFramed),
        other => Err(OpenError::Failed(fail(
            Outcome::ProtocolError,
            format!("expected HELLO, got {other:?}"),
        ))),
    }
}

/// The client side's multiplexed connection: one connection, proven live by HELLO, carries
/// every consumer stream of the tunnel. It is replaced when it dies, when the server drains it
/// (GOAWAY), after a TLS reload, and before the server's idle limit.
pub struct MuxPool {
    current: Mutex<Option<MuxConn>>,
    /// One connection is opened at a time; consumers arriving meanwhile wait for it.
    opening: tokio::sync::Mutex<()>,
    on: AtomicBool,
}

/// A live multiplexed connection and what the consumer logs say about it.
#[derive(Clone)]
pub struct MuxConn {
    pub conn: Arc<Conn>,
    pub session: String,
    pub identity: Option<PeerIdentity>,
    generation: u64,
    idle_limit: Duration,
}

impl Default for MuxPool {
    fn default() -> Self {
        MuxPool {
            current: Mutex::new(None),
            opening: tokio::sync::Mutex::new(()),
            on: AtomicBool::new(true),
        }
    }
}

impl MuxPool {
    /// False once the server turned out not to offer multiplexing.
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Option<MuxConn>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current connection if new streams may go on it; one that may not is drained.
    fn usable(&self, generation: u64) -> Option<MuxConn> {
        let mut cur = self.current();
        let c = cur.as_ref()?;
        if c.conn.usable()
            && c.generation == generation
            && c.conn.idle_for() < c.idle_limit.mul_f64(0.75)
        {
            return Some(c.clone());
        }
        c.conn.drain();
        *cur = None;
        None
    }

    /// A connection to open a stream on: the current one, or a new one.
    pub(crate) async fn get(
        &self,
        cfg: &TunnelConfig,
        tls: &ClientTls,
        metrics: Option<&TunnelMetrics>,
    ) -> Result<MuxConn, OpenError> {
        let generation = tls.generation();
        if let Some(c) = self.usable(generation) {
            return Ok(c);
        }
        let _one = self.opening.lock().await;
        if let Some(c) = self.usable(generation) {
            return Ok(c);
        }
        let (stream, idle_limit, features) = open(cfg, tls, metrics).await?;
        if features & FEATURE_MUX == 0 {
            self.on.store(false, Ordering::Relaxed);
            return Err(OpenError::NotMux);
        }
        let session = crate::tls::describe_session(stream.get_ref().1);
        let identity = crate::tls::peer_identity(stream.get_ref().1).ok();
        let conn = Conn::start(Role::Client, stream, &[], |_, _| {});
        let c = MuxConn {
            conn,
            session,
            identity,
            generation,
            idle_limit,
        };
        *self.current() = Some(c.clone());
        tracing::debug!(tunnel = %cfg.name, "multiplexed connection ready");
        Ok(c)
    }

    /// Keeps a connection ready until `stop`, so the first consumer after a failure or a
    /// retirement pays no handshake. Failures back off up to 5 s. Returns `false` when the
    /// server does not multiplex (the caller falls back to the framed pool).
    pub async fn keep(
        &self,
        cfg: &TunnelConfig,
        tls: &ClientTls,
        stop: &CancellationToken,
    ) -> bool {
        let mut backoff = Duration::from_millis(100);
        loop {
            let got = tokio::select! {
                _ = stop.cancelled() => return true,
                r = self.get(cfg, tls, None) => r,
            };
            match got {
                Ok(c) => {
                    backoff = Duration::from_millis(100);
                    tokio::select! {
                        _ = stop.cancelled() => return true,
                        _ = c.conn.changed() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Err(OpenError::NotFramed | OpenError::NotMux) => {
                    tracing::info!(tunnel = %cfg.name, "server does not offer multiplexed legate/1; using a pool of connections");
                    self.on.store(false, Ordering::Relaxed);
                    return false;
                }
                Err(OpenError::Failed(f)) => {
                    tracing::debug!(tunnel = %cfg.name, error = %f.detail, "mux: opening a connection failed");
                    tokio::select! {
                        _ = stop.cancelled() => return true,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// True when a read would wait: no EOF, no error, and no unexpected bytes from the server.
fn still_open(stream: &mut ClientStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    matches!(
        std::pin::Pin::new(stream).poll_read(&mut cx, &mut buf),
        Poll::Pending
    )
}
