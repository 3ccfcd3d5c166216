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

use crate::protocol;

/// Bytes per read from the plain side: one full TLS record (16 KiB of plaintext), sealed and
/// written with one write; below the 64 KiB a DATA frame can carry. 8, 32 and 64 KiB were
/// slower (docs/performance.md). A framed read leaves room for its frame's header in the record
/// ([`frame_payload`]).
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
    use std::cell::RefCell;

    /// Header room in front of the payload: a multiplexed DATA frame's 7 bytes (a framed
    /// stream's 3-byte header goes in its last 3).
    pub const HEAD: usize = crate::mux::HEAD;
    const KEEP: usize = 64;

    thread_local! {
        static SPARE: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
    }

    pub fn take() -> Box<[u8]> {
        SPARE
            .with(|s| s.borrow_mut().pop())
            .unwrap_or_else(|| vec![0u8; HEAD + super::BUF_SIZE].into_boxed_slice())
    }

    pub fn give(buf: Box<[u8]>) {
        SPARE.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < KEEP {
                s.push(buf);
            }
        });
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
    let failed = std::sync::OnceLock::new();
    let mut upward = std::pin::pin!(copy(&mut in_r, &mut out_w, &up, &failed));
    let mut downward = std::pin::pin!(copy(&mut out_r, &mut in_w, &down, &failed));

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
        failed: failed.get().cloned(),
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

/// How one direction of a framed stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// END sent or received: the direction is complete and the connection still in step.
    End,
    /// Anything else: a reset, ABORT, a broken peer, an unknown frame.
    Broken,
}

/// The result of a framed relay.
#[derive(Debug, Default, Clone)]
pub struct FramedTotals {
    /// Bytes carried from the plain side into DATA frames.
    pub to_frames: u64,
    /// Bytes carried from DATA frames to the plain side.
    pub from_frames: u64,
    /// Both directions ended with END in time: the TLS connection may carry another stream.
    pub reusable: bool,
    /// The close timeout passed with one direction still open.
    pub cut: bool,
    /// An I/O error that means the link failed (see [`Totals::failed`]).
    pub failed: Option<String>,
}

/// Relays one `legate/1` framed stream between `plain` and the (borrowed) TLS connection `tls`:
/// plain bytes go out as DATA frames and EOF as END; DATA frames come in as plain bytes and END
/// as a write shutdown. `sent_end` says END was already sent for the plain side (it ended
/// before READY). The TLS connection is left open; whether it can carry another stream is in
/// [`FramedTotals::reusable`].
pub async fn relay_framed<P, T>(
    plain: P,
    tls: &mut T,
    close_timeout: Duration,
    sent_end: bool,
) -> FramedTotals
where
    P: AsyncRead + AsyncWrite,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (mut plain_r, mut plain_w) = tokio::io::split(plain);
    let (mut tls_r, mut tls_w) = tokio::io::split(tls);
    let out_count = AtomicU64::new(0);
    let in_count = AtomicU64::new(0);
    let failed = std::sync::OnceLock::new();
    let outward = async {
        if sent_end {
            Ending::End
        } else {
            to_frames(&mut plain_r, &mut tls_w, &out_count, &failed).await
        }
    };
    let inward = from_frames(&mut tls_r, &mut plain_w, &in_count, &failed);
    let (first, second, cut) =
        both_directions(outward, inward, close_timeout, |e| *e == Ending::Broken).await;
    let second = second.unwrap_or(Ending::Broken);
    FramedTotals {
        to_frames: out_count.load(Ordering::Relaxed),
        from_frames: in_count.load(Ordering::Relaxed),
        reusable: first == Ending::End && second == Ending::End,
        cut,
        failed: failed.get().cloned(),
    }
}

/// Runs both directions of a stream. Once one has ended, the other gets `close_timeout` to end
/// too, unless `broken` says the first one broke the stream (then the other is not waited for).
/// Returns how the first to end ended, how the other did (`None`: not waited for, or cut), and
/// whether the close timeout cut it.
pub(crate) async fn both_directions<T>(
    outward: impl Future<Output = T>,
    inward: impl Future<Output = T>,
    close_timeout: Duration,
    broken: impl Fn(&T) -> bool,
) -> (T, Option<T>, bool) {
    let mut outward = std::pin::pin!(outward);
    let mut inward = std::pin::pin!(inward);
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

/// Plain bytes out as DATA frames, then END; a plain-side error sends ABORT.
async fn to_frames<R, W>(
    r: &mut R,
    w: &mut W,
    count: &AtomicU64,
    failed: &std::sync::OnceLock<String>,
) -> Ending
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Header and payload in one buffer, so each frame is one write and one TLS record. The
    // buffer is taken only while bytes move: a stream waiting on its consumer holds none.
    let mut slot = None;
    let end = protocol::stream_header(protocol::END, 0);
    loop {
        let n = match read_lazy_max(r, &mut slot, frame_payload(3)).await {
            Ok(n) => n,
            Err(e) => {
                note_failure(&e, failed);
                let _ = w
                    .write_all(&protocol::stream_header(protocol::ABORT, 0))
                    .await;
                let _ = w.flush().await;
                return Ending::Broken;
            }
        };
        let frame = match slot.as_deref_mut() {
            Some(buf) if n > 0 => {
                buf[spare::HEAD - 3..spare::HEAD]
                    .copy_from_slice(&protocol::stream_header(protocol::DATA, n));
                &buf[spare::HEAD - 3..spare::HEAD + n]
            }
            _ => &end[..],
        };
        if let Err(e) = async {
            w.write_all(frame).await?;
            w.flush().await
        }
        .await
        {
            note_failure(&e, failed);
            return Ending::Broken;
        }
        if n == 0 {
            return Ending::End;
        }
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// DATA frames in as plain bytes; END shuts the plain side's write half.
async fn from_frames<R, W>(
    r: &mut R,
    w: &mut W,
    count: &AtomicU64,
    failed: &std::sync::OnceLock<String>,
) -> Ending
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut plain_ok = true;
    loop {
        // Waiting for a header needs no buffer: an idle stream holds none.
        let mut header = [0u8; 3];
        if let Err(e) = r.read_exact(&mut header).await {
            note_failure(&e, failed);
            let _ = w.shutdown().await;
            return Ending::Broken;
        }
        let len = u16::from_be_bytes([header[1], header[2]]) as usize;
        match header[0] {
            protocol::DATA => {
                let mut owned = SpareBuf::take();
                let buf = &mut owned[SpareBuf::HEAD..];
                // Payloads may exceed our buffer: copy them through in pieces.
                let mut left = len;
                while left > 0 {
                    let take = left.min(buf.len());
                    if let Err(e) = r.read_exact(&mut buf[..take]).await {
                        note_failure(&e, failed);
                        let _ = w.shutdown().await;
                        return Ending::Broken;
                    }
                    left -= take;
                    // After the plain side failed, keep reading to stay in step, but drop the
                    // bytes: the stream is broken either way.
                    if plain_ok
                        && (w.write_all(&buf[..take]).await.is_err() || w.flush().await.is_err())
                    {
                        plain_ok = false;
                    }
                    count.fetch_add(take as u64, Ordering::Relaxed);
                }
                if !plain_ok {
                    return Ending::Broken;
                }
            }
            protocol::END if len == 0 => {
                let _ = w.shutdown().await;
                return Ending::End;
            }
            _ => {
                // ABORT, or a frame that has no place here.
                let _ = w.shutdown().await;
                return Ending::Broken;
            }
        }
    }
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
            let totals = relay(near, Failing(kind), Duration::from_millis(50)).await;
            assert_eq!(totals.failed.is_some(), failed, "{kind:?} (raw)");
            let (_consumer, near) = duplex(64);
            let mut link = Failing(kind);
            let totals = relay_framed(near, &mut link, Duration::from_millis(50), false).await;
            assert_eq!(totals.failed.is_some(), failed, "{kind:?} (framed)");
            assert!(!totals.reusable);
        }
    }

    #[tokio::test]
    async fn framed_streams_end_cleanly_and_leave_the_connection_reusable() {
        // consumer <-> relay_framed(client) <== frames ==> relay_framed(server) <-> backend
        let (mut consumer, c_near) = duplex(1024);
        let (mut client_tls, mut server_tls) = duplex(1024);
        let (s_near, mut backend) = duplex(1024);
        let client = tokio::spawn(async move {
            let t = relay_framed(c_near, &mut client_tls, Duration::from_secs(5), false).await;
            (t, client_tls)
        });
        let server = tokio::spawn(async move {
            let t = relay_framed(s_near, &mut server_tls, Duration::from_secs(5), false).await;
            (t, server_tls)
        });
        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let expected = big.clone();
        let service = tokio::spawn(async move {
            let mut got = Vec::new();
            backend.read_to_end(&mut got).await.unwrap();
            assert!(got == expected);
            backend.write_all(b"reply").await.unwrap();
            backend.shutdown().await.unwrap();
        });
        consumer.write_all(&big).await.unwrap();
        consumer.shutdown().await.unwrap();
        service.await.unwrap();
        let mut reply = Vec::new();
        consumer.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply");
        let (c, mut client_tls) = client.await.unwrap();
        let (s, mut server_tls) = server.await.unwrap();
        assert!(c.reusable && s.reusable);
        assert_eq!((c.to_frames, c.from_frames), (100_000, 5));
        assert_eq!((s.to_frames, s.from_frames), (5, 100_000));
        // The connection is still in step: bytes written now arrive as written.
        client_tls.write_all(b"next").await.unwrap();
        let mut next = [0u8; 4];
        server_tls.read_exact(&mut next).await.unwrap();
        assert_eq!(&next, b"next");
    }

    #[tokio::test]
    async fn a_stream_that_does_not_end_in_time_is_not_reused() {
        let (mut client_tls, mut server_tls) = duplex(1024);
        let (c_near, consumer) = duplex(64);
        let (s_near, _backend) = duplex(64);
        drop(consumer); // the plain side vanishes: reads see EOF, writes fail
        let server = tokio::spawn(async move {
            relay_framed(s_near, &mut server_tls, Duration::from_millis(200), false).await
        });
        let c = relay_framed(c_near, &mut client_tls, Duration::from_millis(200), false).await;
        drop(client_tls);
        let s = server.await.unwrap();
        assert!(!s.reusable);
        assert!(!c.reusable);
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
