//! Stream: one consumer connection's worth of a multiplexed connection.
//!
//! In: frames the connection's reader hands over ([`Msg`]), and a plain socket. Out: the plain
//! socket's bytes as DATA frames within the stream's send window, and the peer's DATA written
//! to the plain socket, granting the window back as it goes; END both ways for the half-close.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};

use super::conn::{Conn, Out, WINDOW};
use super::frame::{self, HEAD, RefuseCode};
use crate::relay::{self, Totals};

/// The most a stream gathers from its queue for one write to its plain side.
const GATHER: usize = 256 * 1024;

/// What the connection's reader hands a stream.
#[derive(Debug)]
pub(super) enum Msg {
    Ready,
    Refused(RefuseCode, String),
    Data(Bytes),
    End,
    Reset,
    /// The connection failed, or the server is draining it and refused this stream. `true`:
    /// nothing was done with the stream, and the connection had been greeted, so it may be
    /// opened again elsewhere.
    Gone(String, bool),
}

/// Per-stream state the reader and the stream share.
pub(super) struct Window {
    /// Bytes this side may still send.
    pub(super) send: AtomicI64,
    /// Wakes a sender waiting for credit.
    pub(super) more: Notify,
    /// Bytes the peer may still send before we grant more; below zero is a protocol error.
    pub(super) recv: AtomicI64,
    /// The peer reset the stream: both directions end now, whatever they wait on.
    pub(super) reset: AtomicBool,
    pub(super) on_reset: Notify,
}

/// Send credit: shared by the reader (which grants) and the stream (which spends).
impl Window {
    pub(super) fn new(size: u32) -> Window {
        Window {
            send: AtomicI64::new(i64::from(size)),
            more: Notify::new(),
            recv: AtomicI64::new(i64::from(size)),
            reset: AtomicBool::new(false),
            on_reset: Notify::new(),
        }
    }

    pub(super) fn grant(&self, n: u32) {
        self.send.fetch_add(i64::from(n), Ordering::Relaxed);
        self.more.notify_one();
    }

    pub(super) fn set_reset(&self) {
        self.reset.store(true, Ordering::Release);
        self.on_reset.notify_one();
    }

    async fn was_reset(&self) {
        loop {
            let reset = self.on_reset.notified();
            if self.reset.load(Ordering::Acquire) {
                return;
            }
            reset.await;
        }
    }
}

/// How the answer to a client's OPEN went.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    Ready,
    Refused(RefuseCode, String),
    /// The stream never got an answer. `retry`: nothing was done with it and the server had
    /// admitted us, so it may be opened again on another connection.
    Gone {
        why: String,
        retry: bool,
    },
}

/// One stream on a multiplexed connection. Dropping it ends the stream (RESET unless it ended
/// cleanly both ways).
pub struct Stream {
    id: u32,
    conn: Arc<Conn>,
    rx: mpsc::UnboundedReceiver<Msg>,
    window: Arc<Window>,
    /// Both directions ended with END, or the stream was refused: nothing to reset.
    ended: bool,
    peer_reset: bool,
}

impl Stream {
    pub(super) fn new(
        id: u32,
        conn: Arc<Conn>,
        rx: mpsc::UnboundedReceiver<Msg>,
        window: Arc<Window>,
    ) -> Stream {
        Stream {
            id,
            conn,
            rx,
            window,
            ended: false,
            peer_reset: false,
        }
    }

    pub(super) fn window(&self) -> &Window {
        &self.window
    }

    /// The connection this stream is on.
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }

    /// Server side: the stream is admitted and its target connected.
    pub fn ready(&self) {
        self.conn
            .send(Out::Frame(frame::encode(frame::READY, self.id, &[])));
    }

    /// Server side: the stream is refused; it ends here.
    pub fn refuse(mut self, code: RefuseCode, message: &str) {
        self.conn.send(Out::Frame(frame::encode(
            frame::REFUSED,
            self.id,
            &frame::refused_body(code, message),
        )));
        self.ended = true;
    }

    /// Client side: waits for READY or REFUSED. DATA cannot come before either.
    pub async fn answer(&mut self) -> Answer {
        match self.rx.recv().await {
            Some(Msg::Ready) => Answer::Ready,
            Some(Msg::Refused(code, message)) => {
                self.ended = true;
                Answer::Refused(code, message)
            }
            Some(Msg::Gone(why, retry)) => {
                self.ended = true;
                Answer::Gone { why, retry }
            }
            Some(Msg::Reset) => {
                self.peer_reset = true;
                Answer::Gone {
                    why: "the server reset the stream before answering".into(),
                    retry: true,
                }
            }
            Some(other) => Answer::Refused(
                RefuseCode::BadRequest,
                format!("expected READY, got {other:?}"),
            ),
            None => Answer::Gone {
                why: "connection closed".into(),
                retry: true,
            },
        }
    }

    /// Client side, before READY: more early bytes (counted against the window, which early
    /// bytes never exceed), or END when `bytes` is empty.
    pub fn send_early(&self, bytes: &[u8]) {
        let f = if bytes.is_empty() {
            frame::encode(frame::END, self.id, &[])
        } else {
            self.window
                .send
                .fetch_sub(bytes.len() as i64, Ordering::Relaxed);
            frame::encode(frame::DATA, self.id, bytes)
        };
        self.conn.send(Out::Frame(f));
    }

    /// Relays the stream between `plain` and the connection until both directions end, or
    /// `close_timeout` after the first. `sent_end`: END already went out (before READY).
    /// `up` counts plain → stream, `down` stream → plain.
    pub async fn relay<P: AsyncRead + AsyncWrite>(
        &mut self,
        plain: P,
        close_timeout: Duration,
        sent_end: bool,
        end: relay::End,
    ) -> Totals {
        let (mut plain_r, mut plain_w) = tokio::io::split(plain);
        let out_count = AtomicU64::new(0);
        let in_count = AtomicU64::new(0);
        let failed = std::sync::OnceLock::new();
        let (id, conn, window) = (self.id, &self.conn, &self.window);
        let outward = async {
            if sent_end {
                return Ok(());
            }
            to_stream(id, conn, window, &mut plain_r, &out_count, &failed).await
        };
        let rx = &mut self.rx;
        let inward = from_stream(id, conn, window, rx, &mut plain_w, &in_count, &failed);
        let (outward, inward) = (std::pin::pin!(outward), std::pin::pin!(inward));
        // A reset from the peer ends both directions, even when one ended cleanly and left the
        // other waiting for window the peer will never grant; a stream blocked on its plain
        // side (a target that does not read) ends at the latest a close timeout after its
        // connection died.
        let both = relay::both_directions(outward, inward, close_timeout, Result::is_err);
        let mut both = std::pin::pin!(both);
        let work = std::pin::pin!(async {
            tokio::select! {
                r = &mut both => r,
                _ = window.was_reset() => (Err(true), None, false),
                // What the peer sent before the connection ended is still delivered, within the
                // close timeout.
                _ = self.conn.dead_token.cancelled() => tokio::select! {
                    r = &mut both => r,
                    _ = tokio::time::sleep(close_timeout) => (Err(true), None, true),
                },
            }
        });
        let ended = relay::until(&end, work).await;
        let (expired, stopped) = match &ended {
            Err(relay::Cut::Deadline) => (true, false),
            Err(relay::Cut::Stopped) => (false, true),
            Ok(_) => (false, false),
        };
        // Cut at the deadline or stopped: not ended, so dropping the stream resets it.
        let (first, second, cut) = ended.unwrap_or((Err(false), None, false));
        let second = second.unwrap_or(Err(false));
        self.peer_reset = matches!(first, Err(true)) || matches!(second, Err(true));
        self.ended = first.is_ok() && second.is_ok();
        Totals {
            up: out_count.load(Ordering::Relaxed),
            down: in_count.load(Ordering::Relaxed),
            cut,
            failed: failed
                .get()
                .cloned()
                .or_else(|| self.conn.dead().map(str::to_string).filter(|_| !self.ended)),
            expired,
            stopped,
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if !self.ended && !self.peer_reset && self.conn.dead().is_none() {
            self.conn
                .send(Out::Frame(frame::encode(frame::RESET, self.id, &[])));
        }
        self.conn.release(self.id);
    }
}

/// Plain bytes out as DATA frames within the window, then END. `Err(false)`: broken here.
async fn to_stream<R: AsyncRead + Unpin>(
    id: u32,
    conn: &Conn,
    window: &Window,
    r: &mut R,
    count: &AtomicU64,
    failed: &std::sync::OnceLock<String>,
) -> Result<(), bool> {
    loop {
        let credit = loop {
            let more = window.more.notified();
            let credit = window.send.load(Ordering::Relaxed);
            if credit > 0 {
                break credit as usize;
            }
            if conn.dead().is_some() {
                return Err(false);
            }
            more.await;
        };
        let mut slot = None;
        let max = credit.min(relay::frame_payload(HEAD));
        let n = match relay::read_lazy_max(r, &mut slot, max).await {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
            Err(e) => {
                relay::note_failure(&e, failed);
                return Err(false);
            }
        };
        if n == 0 {
            conn.send(Out::Frame(frame::encode(frame::END, id, &[])));
            return Ok(());
        }
        let mut buf = slot.expect("a read that returned bytes keeps its buffer");
        buf[..HEAD].copy_from_slice(&frame::header(frame::DATA, id, n));
        window.send.fetch_sub(n as i64, Ordering::Relaxed);
        conn.send(Out::Data(buf, HEAD + n));
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Writes every byte of `bufs` (and empties it), with as few vectored writes as the writer
/// takes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    bufs: &mut Vec<Bytes>,
) -> io::Result<()> {
    let mut first = 0;
    while first < bufs.len() {
        // The slices are made on the stack of each poll, not kept in the future across the
        // wait: 1 KB that every stream's task would hold for its whole life.
        let mut n = std::future::poll_fn(|cx| {
            let mut slices = [io::IoSlice::new(&[]); 64];
            let k = (bufs.len() - first).min(slices.len());
            for (slice, b) in slices.iter_mut().zip(&bufs[first..first + k]) {
                *slice = io::IoSlice::new(b);
            }
            std::pin::Pin::new(&mut *w).poll_write_vectored(cx, &slices[..k])
        })
        .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let b = &mut bufs[first];
            let take = n.min(b.len());
            b.advance(take);
            n -= take;
            if b.is_empty() {
                first += 1;
            }
        }
    }
    bufs.clear();
    Ok(())
}

/// DATA frames in as plain bytes, granting the window back as they are written; END shuts the
/// plain side's write half. `Err(true)`: the peer reset; `Err(false)`: broken here.
async fn from_stream<W: AsyncWrite + Unpin>(
    id: u32,
    conn: &Conn,
    window: &Window,
    rx: &mut mpsc::UnboundedReceiver<Msg>,
    w: &mut W,
    count: &AtomicU64,
    failed: &std::sync::OnceLock<String>,
) -> Result<(), bool> {
    let mut unacked: u32 = 0;
    let mut batch: Vec<Bytes> = Vec::new();
    let mut next = None;
    loop {
        let msg = match next.take() {
            Some(msg) => Some(msg),
            None => rx.recv().await,
        };
        match msg {
            Some(Msg::Data(bytes)) => {
                // Everything already queued for this stream goes out in one write: fewer
                // syscalls, and fewer wakeups of whoever reads the plain side.
                let mut n = bytes.len();
                batch.push(bytes);
                while n < GATHER {
                    match rx.try_recv() {
                        Ok(Msg::Data(more)) => {
                            n += more.len();
                            batch.push(more);
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if let Err(e) = async {
                    write_all_vectored(w, &mut batch).await?;
                    w.flush().await
                }
                .await
                {
                    relay::note_failure(&e, failed);
                    let _ = w.shutdown().await;
                    return Err(false);
                }
                count.fetch_add(n as u64, Ordering::Relaxed);
                unacked += n as u32;
                if unacked >= WINDOW / 4 {
                    window.recv.fetch_add(i64::from(unacked), Ordering::Relaxed);
                    conn.send(Out::Frame(frame::encode(
                        frame::WINDOW,
                        id,
                        &unacked.to_be_bytes(),
                    )));
                    unacked = 0;
                }
            }
            Some(Msg::End) => {
                let _ = w.shutdown().await;
                return Ok(());
            }
            Some(Msg::Reset) => {
                let _ = w.shutdown().await;
                return Err(true);
            }
            Some(Msg::Gone(why, _)) => {
                let _ = failed.set(why);
                let _ = w.shutdown().await;
                return Err(true);
            }
            Some(Msg::Ready | Msg::Refused(..)) | None => {
                let _ = w.shutdown().await;
                return Err(false);
            }
        }
    }
}
