//! Pool: handshaken `legate/1` connections kept ready on the client side, so a consumer
//! connection pays no TLS handshake and no round trip to set one up.
//!
//! In: a client tunnel's config and TLS end. Out: live connections on demand. A background task
//! keeps `pool_size` connections ready, each proven live by the server's HELLO (the server
//! speaks first, and only after it admitted our certificate), and replaces them before the
//! server's idle limit. A connection whose stream ended cleanly in both directions comes back
//! for the next consumer. A connection that died in the pool is noticed when taken (a read
//! that is not pending) and dropped.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::TunnelConfig;
use crate::metrics::TunnelMetrics;
use crate::protocol::{self, FEATURE_FRAMED, Frame};
use crate::tls::{ClientStream, ClientTls};
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
                    Ok((stream, idle_limit)) => {
                        backoff = Duration::from_millis(100);
                        self.put(stream, idle_limit, generation);
                        tracing::debug!(tunnel = %cfg.name, ready = self.idle().len(), "pooled connection ready");
                        continue;
                    }
                    Err(OpenError::NotFramed) => {
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
) -> Result<(Box<ClientStream>, Duration), OpenError> {
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
            Ok((stream, limit))
        }
        Frame::Hello { .. } => Err(OpenError::NotFramed),
        other => Err(OpenError::Failed(fail(
            Outcome::ProtocolError,
            format!("expected HELLO, got {other:?}"),
        ))),
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
