//! Relay: copies bytes both ways between the inbound and outbound streams.
//!
//! In: two connected streams and the close timeout. Out: byte counts each way and how the
//! relay ended. EOF on one side becomes a write shutdown on the other (for TLS: close_notify,
//! then FIN), so half-closed protocols work through the tunnel. The relay ends when both
//! directions are done, or `close_timeout` after the first one finished. A reset or broken pipe
//! ends its direction like an EOF: that is how peers close, not a fault of the tunnel.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes per read: one full TLS record, so each read fills a record and each write seals one.
pub const BUF_SIZE: usize = 16 * 1024;

/// How the relay went.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    /// Inbound to outbound (consumer toward service).
    pub up: u64,
    /// Outbound to inbound (service toward consumer).
    pub down: u64,
    /// The other direction was still open when the close timeout passed.
    pub cut: bool,
}

/// Relays until both directions end or the close timeout passes after the first one.
pub async fn relay<A, B>(inbound: A, outbound: B, close_timeout: Duration) -> Totals
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    let (mut in_r, mut in_w) = tokio::io::split(inbound);
    let (mut out_r, mut out_w) = tokio::io::split(outbound);
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let mut upward = std::pin::pin!(copy(&mut in_r, &mut out_w, &up));
    let mut downward = std::pin::pin!(copy(&mut out_r, &mut in_w, &down));

    let up_first = tokio::select! {
        _ = &mut upward => true,
        _ = &mut downward => false,
    };
    let rest = async {
        if up_first {
            downward.await
        } else {
            upward.await
        }
    };
    let cut = tokio::time::timeout(close_timeout, rest).await.is_err();
    Totals {
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
        cut,
    }
}

/// Copies until EOF or an error, then shuts the writer down. Counts as it goes, so the count is
/// right even when the copy is abandoned at the close timeout.
async fn copy<R, W>(r: &mut R, w: &mut W, count: &AtomicU64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    let result = async {
        loop {
            let n = match r.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                // A TLS peer that closes TCP without close_notify: raw-mode peers do this, and
                // the byte stream they sent is complete as far as anyone can tell.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            };
            w.write_all(&buf[..n]).await?;
            // TLS buffers a sealed record until flushed.
            w.flush().await?;
            count.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    .await;
    // Propagate the end of this direction whatever ended it; a failure here means the other
    // side is gone already.
    let _ = w.shutdown().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn half_close_passes_through_and_reply_still_arrives() {
        // consumer <-> (a_far, a_near) relay (b_near, b_far) <-> backend
        let (mut consumer, a_near) = duplex(64);
        let (b_near, mut backend) = duplex(64);
        let relay = tokio::spawn(relay(a_near, b_near, Duration::from_secs(5)));

        consumer.write_all(b"question").await.unwrap();
        consumer.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"question");

        backend.write_all(b"answer").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut reply = Vec::new();
        consumer.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"answer");

        let totals = relay.await.unwrap();
        assert_eq!((totals.up, totals.down, totals.cut), (8, 6, false));
    }

    #[tokio::test]
    async fn close_timeout_cuts_the_open_direction() {
        let (mut consumer, a_near) = duplex(64);
        let (b_near, _backend) = duplex(64);
        let relay = tokio::spawn(relay(a_near, b_near, Duration::from_millis(50)));
        consumer.shutdown().await.unwrap();
        let totals = relay.await.unwrap();
        assert!(totals.cut);
    }
}
