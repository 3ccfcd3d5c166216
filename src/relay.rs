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

use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Bytes per read from the plain side: one full TLS record (16 KiB of plaintext), sealed and
/// written with one write; below the 64 KiB a DATA frame can carry. 8, 32 and 64 KiB were
/// slower (docs/performance.md). A read for a `legate/1` stream leaves room for its frame's
/// header in the record ([`frame_payload`]).
pub const BUF_SIZE: usize = 16 * 1024;

/// The most payload a frame with a `head`-byte header should carry so that header and payload
/// fill one TLS record and no more. A full 16 KiB payload behind its header spills a record of
/// a few bytes: a second record to seal, send and open, and on the multiplexed path a second
/// `writev` per batch (measured: one of 50 bytes after every 64 KiB, docs/performance.md).
pub(crate) const fn frame_payload(head: usize) -> usize {
    BUF_SIZE - head
}

/// Relay buffers are taken only while bytes are moving and handed back when a read would wait,
/// so an idle connection holds none. Spares are kept per thread, a few dozen at most.
mod spare {
    /// Header room in front of the payload: a `legate/1` DATA frame's 7 bytes
    /// (`mux::frame::HEAD`, which checks that it fits).
    pub const HEAD: usize = 7;
    const KEEP: usize = 64;

    pub fn take() -> Box<[u8]> {
        crate::spare::take(HEAD + super::BUF_SIZE)
    }

    pub fn give(buf: Box<[u8]>) {
        crate::spare::give(buf, KEEP);
    }
}

/// A relay buffer borrowed from the spare list, given back when dropped (however the holder
/// ends). Its first `HEAD` bytes are room for a frame header.
pub(crate) struct SpareBuf(Option<Box<[u8]>>);

impl SpareBuf {
    pub(crate) const HEAD: usize = spare::HEAD;

    pub(crate) fn take() -> SpareBuf {
        SpareBuf(Some(spare::take()))
    }
}

impl std::ops::Deref for SpareBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for SpareBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().expect("present until dropped")
    }
}

impl Drop for SpareBuf {
    fn drop(&mut self) {
        if let Some(buf) = self.0.take() {
            spare::give(buf);
        }
    }
}

/// Reads into `buf[spare::HEAD..]`, taking a buffer from the spares for the read; a read that
/// has to wait drops it, which gives it back. Returns the byte count; the buffer is in `slot`
/// after a read that returned bytes, and goes back to the spares when `slot` is dropped.
async fn read_lazy<R: AsyncRead + Unpin>(
    r: &mut R,
    slot: &mut Option<SpareBuf>,
) -> io::Result<usize> {
    read_lazy_max(r, slot, BUF_SIZE).await
}

/// [`read_lazy`], reading at most `max` bytes.
pub(crate) async fn read_lazy_max<R: AsyncRead + Unpin>(
    r: &mut R,
    slot: &mut Option<SpareBuf>,
    max: usize,
) -> io::Result<usize> {
    let max = max.min(BUF_SIZE);
    std::future::poll_fn(|cx| {
        let mut buf = slot.take().unwrap_or_else(SpareBuf::take);
        let mut rb = tokio::io::ReadBuf::new(&mut buf[spare::HEAD..spare::HEAD + max]);
        let result = std::task::ready!(std::pin::Pin::new(&mut *r).poll_read(cx, &mut rb));
        let n = rb.filled().len();
        *slot = Some(buf);
        std::task::Poll::Ready(result.map(|()| n))
    })
    .await
}

/// How the relay went.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    /// Inbound to outbound (consumer toward service).
    pub up: u64,
    /// Outbound to inbound (service toward consumer).
    pub down: u64,
    /// The other direction was still open when the close timeout passed.
    pub cut: bool,
    /// An I/O error that ended a direction and is not how peers close (a keepalive or
    /// retransmission timeout, a TLS record that does not decrypt): the link failed.
    pub failed: Option<String>,
    /// The relay was cut at its deadline (`--max-conn-lifetime`).
    pub expired: bool,
    /// The relay was stopped from outside (its Redis stopped being master).
    pub stopped: bool,
}

/// What may end a relay before its two sides do.
#[derive(Debug, Default, Clone)]
pub struct End {
    /// `--max-conn-lifetime`.
    pub deadline: Option<Instant>,
    /// Cancelled when the session must end (its endpoint stopped being master).
    pub stop: Option<tokio_util::sync::CancellationToken>,
}

/// Why [`until`] gave up on its work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    Deadline,
    Stopped,
}

/// Whether an error that ended a direction means the link failed, rather than that the peer
/// closed: resets, broken pipes and a TLS peer closing without close_notify are how peers close.
pub(crate) fn note_failure(e: &io::Error, failed: &std::sync::OnceLock<String>) {
    use io::ErrorKind::*;
    if !matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected
    ) {
        let _ = failed.set(e.to_string());
    }
}

/// Runs `work` until `end`'s deadline or stop, if any; which came first otherwise. `work`
/// comes pinned by the caller, so this future does not hold a second copy of it.
pub(crate) async fn until<T>(
    end: &End,
    work: std::pin::Pin<&mut impl Future<Output = T>>,
) -> Result<T, Cut> {
    let stopped = async {
        match &end.stop {
            Some(stop) => stop.cancelled().await,
            None => std::future::pending().await,
        }
    };
    let timed = async {
        match end.deadline {
            Some(d) => tokio::time::timeout_at(d, work)
                .await
                .map_err(|_| Cut::Deadline),
            None => Ok(work.await),
        }
    };
    tokio::select! {
        biased;
        r = timed => r,
        () = stopped => Err(Cut::Stopped),
    }
}

/// Relays until both directions end or the close timeout passes after the first one, or until
/// `end` (its deadline, or its stop).
pub async fn relay<A, B>(inbound: A, outbound: B, close_timeout: Duration, end: End) -> Totals
where
    A: AsyncRead + AsyncWrite,
    B: AsyncRead + AsyncWrite,
{
    let (mut in_r, mut in_w) = tokio::io::split(inbound);
    let (mut out_r, mut out_w) = tokio::io::split(outbound);
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let failed = std::sync::OnceLock::new();
    let mut upward = std::pin::pin!(copy(&mut in_r, &mut out_w, &up, &failed));
    let mut downward = std::pin::pin!(copy(&mut out_r, &mut in_w, &down, &failed));

    let both = async {
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
        tokio::time::timeout(close_timeout, rest).await.is_err()
    };
    let cut = until(&end, std::pin::pin!(both)).await;
    Totals {
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
        cut: cut.unwrap_or(false),
        failed: failed.get().cloned(),
        expired: cut == Err(Cut::Deadline),
        stopped: cut == Err(Cut::Stopped),
    }
}

/// Copies until EOF or an error, then shuts the writer down. Counts as it goes, so the count is
/// right even when the copy is abandoned at the close timeout.
async fn copy<R, W>(
    r: &mut R,
    w: &mut W,
    count: &AtomicU64,
    failed: &std::sync::OnceLock<String>,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut slot = None;
    let result = async {
        loop {
            let n = match read_lazy(r, &mut slot).await {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                // A TLS peer that closes TCP without close_notify: raw-mode peers do this, and
                // the byte stream they sent is complete as far as anyone can tell.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            };
            let buf = slot
                .as_ref()
                .expect("a read that returned bytes keeps its buffer");
            w.write_all(&buf[spare::HEAD..spare::HEAD + n]).await?;
            // TLS buffers a sealed record until flushed.
            w.flush().await?;
            count.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    .await;
    drop(slot);
    if let Err(e) = &result {
        note_failure(e, failed);
    }
    // Propagate the end of this direction whatever ended it; a failure here means the other
    // side is gone already.
    let _ = w.shutdown().await;
    result
}

/// Runs both directions of a stream. Once one has ended, the other gets `close_timeout` to end
/// too, unless `broken` says the first one broke the stream (then the other is not waited for).
/// Returns how the first to end ended, how the other did (`None`: not waited for, or cut), and
/// whether the close timeout cut it.
///
/// The two directions come pinned by the caller: taken by value, an async fn keeps its
/// arguments and the pinned copies apart, and this future doubled (1.6 KB per stream, held for
/// its whole life; docs/performance.md).
pub(crate) async fn both_directions<T>(
    mut outward: std::pin::Pin<&mut impl Future<Output = T>>,
    mut inward: std::pin::Pin<&mut impl Future<Output = T>>,
    close_timeout: Duration,
    broken: impl Fn(&T) -> bool,
) -> (T, Option<T>, bool) {
    let (first, out_first) = tokio::select! {
        e = &mut outward => (e, true),
        e = &mut inward => (e, false),
    };
    if broken(&first) {
        return (first, None, false);
    }
    let rest = async {
        if out_first {
            inward.await
        } else {
            outward.await
        }
    };
    match tokio::time::timeout(close_timeout, rest).await {
        Ok(e) => (first, Some(e), false),
        Err(_) => (first, None, true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, duplex};

    #[tokio::test]
    async fn half_close_passes_through_and_reply_still_arrives() {
        // consumer <-> (a_far, a_near) relay (b_near, b_far) <-> backend
        let (mut consumer, a_near) = duplex(64);
        let (b_near, mut backend) = duplex(64);
        let relay = tokio::spawn(relay(
            a_near,
            b_near,
            Duration::from_secs(5),
            End::default(),
        ));

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

    /// A stream whose reads fail with `kind`, as a socket does when keepalive gives up.
    struct Failing(io::ErrorKind);

    impl AsyncRead for Failing {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Err(io::Error::from(self.0)))
        }
    }

    impl AsyncWrite for Failing {
        fn poll_write(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            std::task::Poll::Ready(Err(io::Error::from(self.0)))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_timed_out_link_is_a_failure_and_a_reset_is_a_close() {
        for (kind, failed) in [
            (io::ErrorKind::TimedOut, true),
            (io::ErrorKind::ConnectionReset, false),
            (io::ErrorKind::UnexpectedEof, false),
        ] {
            let (_consumer, near) = duplex(64);
            let totals = relay(
                near,
                Failing(kind),
                Duration::from_millis(50),
                End::default(),
            )
            .await;
            assert_eq!(totals.failed.is_some(), failed, "{kind:?} (raw)");
        }
    }

    #[tokio::test]
    async fn close_timeout_cuts_the_open_direction() {
        let (mut consumer, a_near) = duplex(64);
        let (b_near, _backend) = duplex(64);
        let relay = tokio::spawn(relay(
            a_near,
            b_near,
            Duration::from_millis(50),
            End::default(),
        ));
        consumer.shutdown().await.unwrap();
        let totals = relay.await.unwrap();
        assert!(totals.cut);
    }
}
