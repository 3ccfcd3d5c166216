//! Accept: the listening socket, the connection limit, and backoff on accept errors.
//!
//! In: a bound listener and an optional limit. Out: accepted connections, each with the permit
//! that holds its place under `--max-concurrent-conns`. When the limit is reached, new
//! connections wait in the kernel's backlog instead of being accepted and dropped.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::net::{Listener, PeerAddr, Stream};

/// A listener with an optional cap on open connections.
pub struct Acceptor {
    listener: Listener,
    limit: Option<Arc<Semaphore>>,
    /// Told of every accept() that failed on the listener (for `accept.error`).
    on_error: Box<dyn Fn() + Send + Sync>,
}

impl Acceptor {
    /// `max` of 0 means no limit.
    pub fn new(
        listener: Listener,
        max: usize,
        on_error: impl Fn() + Send + Sync + 'static,
    ) -> Acceptor {
        Acceptor {
            listener,
            limit: (max > 0).then(|| Arc::new(Semaphore::new(max))),
            on_error: Box::new(on_error),
        }
    }

    /// The listening socket back, still open: a replacement tunnel takes it over, so
    /// connections arriving meanwhile wait in the backlog rather than being refused.
    pub fn into_listener(self) -> Listener {
        self.listener
    }

    pub fn local_addr(&self) -> io::Result<String> {
        self.listener.local_addr()
    }

    /// The next connection. Errors such as running out of file descriptors are logged and
    /// retried with a growing pause (up to one second), so a burst cannot spin the loop.
    pub async fn accept(&self) -> (Stream, PeerAddr, Option<OwnedSemaphorePermit>) {
        let permit = match &self.limit {
            // The semaphore is never closed, so acquiring cannot fail.
            Some(s) => s.clone().acquire_owned().await.ok(),
            None => None,
        };
        let mut pause = Duration::from_millis(5);
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => return (stream, peer, permit),
                // The connection is gone before it was accepted: still a failed accept().
                Err(e) if is_per_connection(&e) => (self.on_error)(),
                Err(e) => {
                    (self.on_error)();
                    tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64, "accept failed; pausing");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// Errors that concern only the connection being accepted, not the listener.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}
