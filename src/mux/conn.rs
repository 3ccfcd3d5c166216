//! Conn: one `legate/1` connection carrying many streams (docs/protocol.md).
//!
//! In: an established TLS connection (server side: HELLO already written; client side: HELLO
//! still to come, and read here first). Out: streams ([`Stream`]), each with its own
//! flow-control window so a slow consumer holds up nobody else. One task reads the connection
//! and hands each frame to its stream ([`dispatch`]). Frames the streams queue go out in
//! batches: the stream that queues the 8th frame writes the batch, and a writer task writes
//! what is left once the ready streams have run. With fifty consumers, the requests that
//! arrive together cross in a few TLS writes instead of fifty; that is where the requests per
//! second come from (docs/performance.md).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::frame::{self, Frame, Hello, Open, RefuseCode};
use super::stream::{Msg, Stream, Window};
use crate::relay::SpareBuf;

/// What each side may send on a stream before the other grants more, each direction. Large
/// enough for a stream to fill a long fat link on its own; an idle stream holds none of it.
pub const WINDOW: u32 = 1 << 20;

/// Read size from the connection: four full TLS records.
const READ: usize = 64 * 1024;
/// A batch is written once it holds this much: three full DATA frames, each one TLS record.
/// With four (64 KiB) one multiplexed stream carried 5-6% less than with three or two
/// (bench/ab.py, 6 rounds). Why was not measured: a smaller batch reaches the far side sooner,
/// and four came to 65,624 bytes with the records' overhead, past loopback's 65,483-byte MSS.
const BATCH: usize = 48 * 1024;
/// ... or once it holds this many frames. Unbounded batches put the two ambassadors in
/// lock-step: fifty replies in one write come back as fifty requests in one write, and each
/// side's CPU idles while the other works (measured: 45% idle per core against 12% for one
/// connection per consumer). Bounded ones keep several batches in flight
/// (docs/performance.md).
const BATCH_FRAMES: usize = 8;
/// DATA frames this large are written from their relay buffer; smaller frames are copied
/// together, so a backlog of small frames does not hold a 16 KiB buffer each.
const COPY_BELOW: usize = 4096;
/// The most answers (PONG, READY, REFUSED, WINDOW) a server queues for a client that sends and
/// does not read. DATA is bounded by the windows; answers are not, so a client flooding PINGs
/// or OPENs without reading would otherwise grow the queue without end.
const MAX_QUEUED_ANSWERS: usize = 4 << 20;

/// What a server says when it refuses a stream because the connection takes no new ones; the
/// client opens the stream again on a new connection.
pub const DRAINING: &str = "connection draining; open the stream on a new one";

/// Which end of the connection this is: clients open streams, with odd ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

/// What the streams hand the writer.
pub(super) enum Out {
    /// A DATA frame built in a relay buffer: header and payload, `len` bytes in all.
    Data(SpareBuf, usize),
    /// A small frame, encoded.
    Frame(Vec<u8>),
    /// Write what is queued, then close the connection.
    Close,
}

/// A piece of what goes to the peer.
enum Chunk {
    /// A DATA frame in its relay buffer: bytes `start..end`.
    Spare(SpareBuf, usize, usize),
    /// Small frames copied together, from `start`.
    Copied(Vec<u8>, usize),
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Spare(b, start, end) => &b[*start..*end],
            Chunk::Copied(v, start) => &v[*start..],
        }
    }
}

/// Frames queued for the connection, in order.
#[derive(Default)]
struct Pending {
    chunks: VecDeque<Chunk>,
    bytes: usize,
    frames: usize,
    /// Bytes of small frames (not DATA) among `bytes`.
    control: usize,
    close: bool,
}

impl Pending {
    fn push_copied(&mut self, bytes: &[u8]) {
        match self.chunks.back_mut() {
            Some(Chunk::Copied(v, _)) => v.extend_from_slice(bytes),
            _ => self.chunks.push_back(Chunk::Copied(bytes.to_vec(), 0)),
        }
        self.bytes += bytes.len();
    }
}

/// The first chunks, as slices for one vectored write.
fn slices(chunks: &VecDeque<Chunk>) -> Vec<io::IoSlice<'_>> {
    chunks
        .iter()
        .take(64)
        .map(|c| io::IoSlice::new(c.bytes()))
        .collect()
}

/// Drops the first `n` bytes of `chunks`.
fn consume(chunks: &mut VecDeque<Chunk>, mut n: usize) {
    while n > 0 {
        let Some(c) = chunks.front_mut() else { return };
        let len = c.bytes().len();
        if n < len {
            match c {
                Chunk::Spare(_, start, _) | Chunk::Copied(_, start) => *start += n,
            }
            return;
        }
        n -= len;
        chunks.pop_front();
    }
}

/// The connection's write half. The writer task takes it out while it waits on the socket.
type Sink = Box<dyn AsyncWrite + Send + Unpin>;

pub(super) struct Slot {
    pub(super) tx: mpsc::UnboundedSender<Msg>,
    pub(super) window: Arc<Window>,
    /// The peer sent END: no DATA or END may follow.
    ended: bool,
}

/// One multiplexed connection.
pub struct Conn {
    role: Role,
    pending: Mutex<Pending>,
    sink: Mutex<Option<Sink>>,
    /// Wakes the writer task.
    wake: Notify,
    streams: Mutex<HashMap<u32, Slot>>,
    next_id: AtomicU32,
    /// Server side: the last stream id the client opened (ids only grow).
    last_peer_id: AtomicU32,
    /// Client side: the server's greeting, once read.
    hello: OnceLock<Hello>,
    /// Set once the connection failed or closed; the reason.
    dead: OnceLock<String>,
    /// Cancelled with `dead`: ends streams blocked on their plain side.
    pub(super) dead_token: CancellationToken,
    /// Why a write failed; the reader ends the connection with it.
    write_error: OnceLock<String>,
    /// The peer broke the protocol (the reason is in `dead`).
    violated: AtomicBool,
    /// No new streams: GOAWAY sent (server) or received (client), or retired.
    draining: AtomicBool,
    active: AtomicUsize,
    born: Instant,
    /// When `active` last dropped to zero, in ms since `born`.
    idle_ms: AtomicU64,
    /// Client side: when the PING in flight was sent (ms since `born`), or `NO_PING`.
    ping_sent_ms: AtomicU64,
    /// When the reader last got bytes from the peer while a PING was in flight (ms since
    /// `born`).
    read_ms: AtomicU64,
    /// Signalled when the greeting arrives, the last stream ends, and when the connection
    /// drains or dies.
    changed: Notify,
}

const NO_PING: u64 = u64::MAX;

impl Conn {
    /// Starts the reader and writer tasks on an established connection. `initial`: bytes
    /// already read from it. `on_open` (server side) is called for each new stream the peer
    /// opens.
    pub fn start<S>(
        role: Role,
        stream: S,
        initial: &[u8],
        on_open: impl FnMut(Incoming, Result<Open, frame::Error>) + Send + 'static,
    ) -> Arc<Conn>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        let conn = Arc::new(Conn {
            role,
            pending: Mutex::new(Pending::default()),
            sink: Mutex::new(Some(Box::new(w))),
            wake: Notify::new(),
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            last_peer_id: AtomicU32::new(0),
            hello: OnceLock::new(),
            dead: OnceLock::new(),
            dead_token: CancellationToken::new(),
            write_error: OnceLock::new(),
            violated: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            born: Instant::now(),
            idle_ms: AtomicU64::new(0),
            ping_sent_ms: AtomicU64::new(NO_PING),
            read_ms: AtomicU64::new(0),
            changed: Notify::new(),
        });
        tokio::spawn(write_loop(conn.clone()));
        let reader = conn.clone();
        let initial = BytesMut::from(initial);
        tokio::spawn(async move {
            let why = match read_loop(r, initial, &reader, on_open).await {
                // A client that wrote before the server closed on it may meet a broken pipe
                // first; what matters is that it was never greeted.
                Ok(()) if reader.role == Role::Client && reader.hello.get().is_none() => {
                    NOT_ADMITTED.to_string()
                }
                Ok(()) => match reader.write_error.get() {
                    Some(e) => e.clone(),
                    None => "the peer closed the connection".to_string(),
                },
                Err(Ended::Failed(e)) => e,
                Err(Ended::Violated(e)) => {
                    reader.violated.store(true, Ordering::Relaxed);
                    e
                }
            };
            reader.kill(why);
        });
        conn
    }

    pub(super) fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Slot>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sink(&self) -> std::sync::MutexGuard<'_, Option<Sink>> {
        self.sink.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the connection: every stream learns it is gone, and the writer closes. A stream
    /// the server never answered may be opened again elsewhere only if the server had greeted
    /// us: before that, the failure is the connection's (not admitted, not legate).
    pub fn kill(&self, why: String) {
        if self.dead.set(why.clone()).is_err() {
            return;
        }
        self.dead_token.cancel();
        self.draining.store(true, Ordering::SeqCst);
        let retry = self.role == Role::Client && self.hello.get().is_some();
        let slots: Vec<Slot> = self.streams().drain().map(|(_, s)| s).collect();
        for s in slots {
            let _ = s.tx.send(Msg::Gone(why.clone(), retry));
            s.window.more.notify_one();
        }
        self.send(Out::Close);
        self.changed.notify_waiters();
    }

    /// Why the connection is dead, if it is.
    pub fn dead(&self) -> Option<&str> {
        self.dead.get().map(String::as_str)
    }

    /// Whether it died because the peer broke the protocol.
    pub fn violated(&self) -> bool {
        self.violated.load(Ordering::Relaxed)
    }

    /// Whether new streams may be opened on it.
    pub fn usable(&self) -> bool {
        self.dead.get().is_none() && !self.draining.load(Ordering::SeqCst)
    }

    /// Client side: the server's greeting, if it has arrived.
    pub fn hello(&self) -> Option<Hello> {
        self.hello.get().copied()
    }

    /// Client side: waits for the greeting (the server admitted us), or for the connection to
    /// die before it (the reason).
    pub async fn greeted(&self) -> Result<Hello, String> {
        loop {
            let changed = self.changed.notified();
            if let Some(h) = self.hello.get() {
                return Ok(*h);
            }
            if let Some(why) = self.dead.get() {
                return Err(why.clone());
            }
            changed.await;
        }
    }

    /// Streams open now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// How long the connection has had no stream (zero while it has one).
    pub fn idle_for(&self) -> Duration {
        if self.active() > 0 {
            return Duration::ZERO;
        }
        let since = Duration::from_millis(self.idle_ms.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(since)
    }

    /// Takes no new streams; closes once the open ones have ended. The server tells the
    /// client with GOAWAY.
    pub fn drain(&self) {
        if self.draining.swap(true, Ordering::SeqCst) {
            return;
        }
        if self.role == Role::Server {
            self.send(Out::Frame(frame::encode(frame::GOAWAY, 0, &[])));
        }
        if self.active() == 0 {
            self.send(Out::Close);
        }
        self.changed.notify_waiters();
    }

    /// Waits until the connection is dead, or drained and without streams.
    pub async fn closed(&self) {
        loop {
            let changed = self.changed.notified();
            if self.dead.get().is_some()
                || (self.draining.load(Ordering::SeqCst) && self.active() == 0)
            {
                return;
            }
            changed.await;
        }
    }

    /// Waits until the connection has ended (the peer closed it, or it failed).
    pub async fn ended(&self) {
        self.dead_token.cancelled().await;
    }

    /// Waits until something changed: the greeting came, a stream ended, the connection
    /// drained or died.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Client side: asks the server to prove the connection live, unless a PING is already
    /// in flight. Returns whether it sent one.
    pub fn ping(&self) -> bool {
        let now = self.born.elapsed().as_millis() as u64;
        let sent = self
            .ping_sent_ms
            .compare_exchange(NO_PING, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if sent {
            self.send(Out::Frame(frame::encode(
                frame::PING,
                0,
                &now.to_be_bytes(),
            )));
        }
        sent
    }

    /// Client side: with a PING in flight, how long the connection has been silent since it
    /// was sent: anything read counts, since a PONG can wait behind a window's worth of DATA
    /// on a slow link. `None` with none in flight.
    pub fn silent_for(&self) -> Option<Duration> {
        let sent = self.ping_sent_ms.load(Ordering::Acquire);
        if sent == NO_PING {
            return None;
        }
        let now = self.born.elapsed().as_millis() as u64;
        let heard = self.read_ms.load(Ordering::Acquire).max(sent);
        Some(Duration::from_millis(now.saturating_sub(heard)))
    }

    pub(super) fn register(self: &Arc<Conn>, id: u32) -> Stream {
        let (tx, rx) = mpsc::unbounded_channel();
        let window = Arc::new(Window::new(WINDOW));
        {
            // `kill` sets `dead` before it empties the map under this lock: a stream registered
            // after that learns at once that the connection is gone.
            let mut streams = self.streams();
            if let Some(why) = self.dead.get() {
                let retry = self.role == Role::Client && self.hello.get().is_some();
                let _ = tx.send(Msg::Gone(why.clone(), retry));
            } else {
                streams.insert(
                    id,
                    Slot {
                        tx,
                        window: window.clone(),
                        ended: false,
                    },
                );
            }
        }
        self.active.fetch_add(1, Ordering::SeqCst);
        Stream::new(id, self.clone(), rx, window)
    }

    /// Client side: a new stream, announced to the server with OPEN, then `early` bytes of the
    /// consumer's (at most a window's worth) and, if `end`, END: none of it waits for READY.
    pub fn open(self: &Arc<Conn>, open: &Open, early: &[u8], end: bool) -> Stream {
        let id = self.next_id.fetch_add(2, Ordering::Relaxed);
        if id >= u32::MAX / 2 {
            // Ids are not reused on a connection: retire it long before they run out.
            self.drain();
        }
        let h = self.register(id);
        let mut first = frame::encode(frame::OPEN, id, &frame::open_body(open));
        for chunk in early.chunks(crate::relay::BUF_SIZE) {
            first.extend_from_slice(&frame::header(frame::DATA, id, chunk.len()));
            first.extend_from_slice(chunk);
        }
        h.window()
            .send
            .fetch_sub(early.len() as i64, Ordering::Relaxed);
        if end {
            first.extend_from_slice(&frame::header(frame::END, id, 0));
        }
        self.send(Out::Frame(first));
        h
    }

    /// Queues a frame; a full batch is written at once.
    pub(super) fn send(&self, o: Out) {
        let mut p = self.pending();
        if p.close {
            // The connection is closing: nobody will read what comes after.
            return;
        }
        // A small frame of the only stream (a lone request or reply) has nothing to wait for:
        // it goes out now rather than after a hop to the writer task.
        let urgent = match &o {
            Out::Data(_, len) => *len < COPY_BELOW && self.active() <= 1,
            _ => false,
        };
        match o {
            Out::Data(buf, len) if len >= COPY_BELOW => {
                p.bytes += len;
                p.chunks.push_back(Chunk::Spare(buf, 0, len));
            }
            Out::Data(buf, len) => p.push_copied(&buf[..len]),
            Out::Frame(f) => {
                p.control += f.len();
                p.push_copied(&f);
            }
            Out::Close => p.close = true,
        }
        if self.role == Role::Server && p.control > MAX_QUEUED_ANSWERS && !p.close {
            let why = format!(
                "protocol error: the client does not read its answers ({} bytes queued)",
                p.control
            );
            drop(p);
            self.violated.store(true, Ordering::Relaxed);
            // Never called with the streams lock held, which `kill` takes.
            self.kill(why);
            return;
        }
        p.frames += 1;
        let first = p.frames == 1;
        let full = urgent || p.frames >= BATCH_FRAMES || p.bytes >= BATCH || p.close;
        let closing = p.close;
        drop(p);
        // When everything went out here, the writer task has nothing to do: waking it would
        // cost a task switch per lone request or reply.
        let all_written = full && !closing && self.write_now();
        if (first || full) && !all_written {
            self.wake.notify_one();
        }
    }

    /// Writes what is queued without waiting: as much as the socket takes now. The rest, and
    /// anything TLS holds back, is the writer task's (which the caller wakes). True when all of
    /// it was written and flushed.
    fn write_now(&self) -> bool {
        let Ok(mut sink) = self.sink.try_lock() else {
            return false;
        };
        let Some(w) = sink.as_mut() else {
            return false;
        };
        let mut chunks = {
            let mut p = self.pending();
            p.frames = 0;
            p.bytes = 0;
            p.control = 0;
            std::mem::take(&mut p.chunks)
        };
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        while !chunks.is_empty() {
            let polled = std::pin::Pin::new(&mut *w).poll_write_vectored(&mut cx, &slices(&chunks));
            match polled {
                std::task::Poll::Ready(Ok(n)) if n > 0 => consume(&mut chunks, n),
                // Pending, or an error the writer task will meet and report.
                _ => break,
            }
        }
        if chunks.is_empty() {
            matches!(
                std::pin::Pin::new(&mut *w).poll_flush(&mut cx),
                std::task::Poll::Ready(Ok(()))
            )
        } else {
            // Unwritten bytes go back in front of what was queued meanwhile.
            let mut p = self.pending();
            let newer = std::mem::take(&mut p.chunks);
            p.bytes += chunks.iter().map(|c| c.bytes().len()).sum::<usize>();
            chunks.extend(newer);
            p.chunks = chunks;
            p.frames += 1;
            false
        }
    }

    /// A stream ended: forget it, and close a draining connection that has none left.
    pub(super) fn release(&self, id: u32) {
        self.streams().remove(&id);
        if self.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle_ms
                .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
            if self.draining.load(Ordering::SeqCst) {
                self.send(Out::Close);
            }
            self.changed.notify_waiters();
        }
    }
}

/// What a client says when the server closed before its greeting.
const NOT_ADMITTED: &str = "server closed the connection before greeting us: \
    it did not admit this client (see its log and --allow-* rules)";

/// How a connection's reading ended, other than by the peer's close.
enum Ended {
    /// The connection failed (an I/O error).
    Failed(String),
    /// The peer sent something that breaks the protocol.
    Violated(String),
}

/// Reads frames and hands each to its stream, until the connection ends. A frame that breaks
/// the protocol ends the connection with a reason.
async fn read_loop<R: AsyncRead + Unpin>(
    mut r: R,
    mut buf: BytesMut,
    conn: &Arc<Conn>,
    mut on_open: impl FnMut(Incoming, Result<Open, frame::Error>),
) -> Result<(), Ended> {
    let mut handed_over = false;
    loop {
        let violated = |e: String| Ended::Violated(format!("protocol error: {e}"));
        while let Some(f) = frame::decode(&mut buf).map_err(|e| violated(e.to_string()))? {
            handed_over |= matches!(f, Frame::Data(..));
            dispatch(conn, f, &mut on_open).map_err(violated)?;
        }
        if buf.capacity() - buf.len() < READ / 2 {
            buf.reserve(READ);
        }
        if handed_over {
            // Let the streams write what this read brought while it is still in the cache,
            // rather than read on ahead up to the window.
            tokio::task::yield_now().await;
            if conn.active() > 1 {
                // An ambassador shares its host, often its one core, with the service or the
                // application next to it. Without this yield it reads on while data arrives,
                // and the process it just handed requests (or replies) to waits for the end of
                // its time slice: every request of a burst piles up in one place while the far
                // side idles. Measured with fifty Redis clients, each side pinned to its own
                // core: 1.31x the requests per second at the same CPU per request
                // (docs/performance.md). A lone stream does not yield, so one client's latency
                // does not wait behind other work on a busy CPU.
                std::thread::yield_now();
            }
            handed_over = false;
        }
        let read = tokio::select! {
            r = r.read_buf(&mut buf) => r,
            // Killed from outside (no PONG, no greeting in time): stop reading now rather than
            // when the kernel gives up on the socket.
            _ = conn.dead_token.cancelled() => return Ok(()),
        };
        match read {
            Ok(0) => return Ok(()),
            Ok(_) => {
                // Only a PING in flight asks when we last heard from the peer: no clock read
                // per read otherwise.
                if conn.ping_sent_ms.load(Ordering::Relaxed) != NO_PING {
                    conn.read_ms
                        .store(conn.born.elapsed().as_millis() as u64, Ordering::Release);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) if conn.role == Role::Client && conn.hello.get().is_none() => {
                // A server that does not admit us closes, and the bytes we sent meanwhile can
                // turn its close into a reset: the cause is the same.
                return Err(Ended::Failed(format!(
                    "server ended the connection before greeting us ({}): it did not admit this \
                     client (see its log and --allow-* rules)",
                    crate::tls::describe_handshake_error(&e)
                )));
            }
            Err(e) => return Err(Ended::Failed(format!("connection failed: {e}"))),
        }
    }
}

/// Hands one frame to where it goes. `Err`: the frame breaks the protocol, and the connection
/// ends with that reason.
pub(super) fn dispatch(
    conn: &Arc<Conn>,
    f: Frame,
    on_open: &mut impl FnMut(Incoming, Result<Open, frame::Error>),
) -> Result<(), String> {
    let client = conn.role == Role::Client;
    if client && conn.hello.get().is_none() && !matches!(f, Frame::Hello(_)) {
        return Err(format!("expected HELLO first, got {f:?}"));
    }
    let to_stream = |id: u32, msg: Msg| {
        // A stream that already ended may still get frames the peer sent meanwhile.
        if let Some(s) = conn.streams().get(&id) {
            let _ = s.tx.send(msg);
        }
    };
    match f {
        Frame::Hello(h) if client => {
            if conn.hello.get().is_some() {
                return Err("a second HELLO".into());
            }
            if h.version != frame::VERSION {
                return Err(format!(
                    "the server speaks legate/1 version {}, this build {}",
                    h.version,
                    frame::VERSION
                ));
            }
            let _ = conn.hello.set(h);
            conn.changed.notify_waiters();
        }
        Frame::Open(id, open) if !client => {
            if id.is_multiple_of(2) || id <= conn.last_peer_id.load(Ordering::Relaxed) {
                return Err(format!(
                    "OPEN for stream {id}, which is not a new client stream"
                ));
            }
            conn.last_peer_id.store(id, Ordering::Relaxed);
            let incoming = Incoming {
                conn: conn.clone(),
                id,
            };
            match open {
                Ok(_) if !conn.usable() => incoming.refuse(RefuseCode::Draining, DRAINING),
                // A bad OPEN is the caller's to refuse (and to log): the connection carries on.
                open => on_open(incoming, open),
            }
        }
        Frame::Ready(id) if client => to_stream(id, Msg::Ready),
        Frame::Refused(id, code, message) if client => {
            let msg = if code == RefuseCode::Draining {
                Msg::Gone(format!("server refused the stream: {message}"), true)
            } else {
                Msg::Refused(code, message)
            };
            to_stream(id, msg);
        }
        Frame::Data(id, body) => {
            let streams = conn.streams();
            if let Some(s) = streams.get(&id) {
                if s.ended {
                    return Err(format!("DATA on stream {id} after its END"));
                }
                let len = body.len() as i64;
                if s.window.recv.fetch_sub(len, Ordering::Relaxed) < len {
                    return Err(format!("stream {id} sent past its flow-control window"));
                }
                let _ = s.tx.send(Msg::Data(Bytes::from(body)));
            }
        }
        Frame::End(id) => {
            if let Some(s) = conn.streams().get_mut(&id) {
                if s.ended {
                    return Err(format!("a second END on stream {id}"));
                }
                s.ended = true;
                let _ = s.tx.send(Msg::End);
            }
        }
        Frame::Reset(id) => {
            if let Some(s) = conn.streams().get(&id) {
                s.window.set_reset();
                let _ = s.tx.send(Msg::Reset);
            }
        }
        Frame::Window(id, grant) => {
            if let Some(s) = conn.streams().get(&id) {
                s.window.grant(grant);
            }
        }
        Frame::GoAway if client => {
            conn.draining.store(true, Ordering::SeqCst);
            if conn.active() == 0 {
                conn.send(Out::Close);
            }
            conn.changed.notify_waiters();
        }
        Frame::Ping(nonce) if !client => {
            conn.send(Out::Frame(frame::encode(frame::PONG, 0, &nonce)));
        }
        Frame::Pong(_) if client => {
            conn.ping_sent_ms.store(NO_PING, Ordering::Release);
        }
        other => {
            let side = if client { "server" } else { "client" };
            return Err(format!("a {side} may not send {other:?}"));
        }
    }
    Ok(())
}

/// Writes what the streams queued and nobody wrote yet, and flushes what TLS holds back;
/// closes the connection after `Out::Close`.
async fn write_loop(conn: Arc<Conn>) {
    loop {
        conn.wake.notified().await;
        loop {
            // The sink first, then the queue: a stream's `write_now` holds the sink while it
            // writes and puts back what the socket did not take, in front of the queue; taking
            // them in the same order keeps every byte in order.
            let Some(mut w) = conn.sink().take() else {
                return;
            };
            let (mut chunks, close) = {
                let mut p = conn.pending();
                p.frames = 0;
                p.bytes = 0;
                p.control = 0;
                (std::mem::take(&mut p.chunks), p.close)
            };
            let written = async {
                while !chunks.is_empty() {
                    let n = w.write_vectored(&slices(&chunks)).await?;
                    if n == 0 {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    consume(&mut chunks, n);
                }
                w.flush().await
            }
            .await;
            if let Err(e) = written {
                // Not the end yet: what the peer sent before is still in the socket, and the
                // reader delivers it before it ends the connection (it meets the same failure
                // or the peer's close). Nothing more is written.
                let _ = conn.write_error.set(format!("connection failed: {e}"));
                conn.pending().close = true;
                return;
            }
            if close {
                // Bounded: on a path that drops everything, a full send buffer would hold the
                // task (and the socket) until the kernel gives up.
                let _ = tokio::time::timeout(Duration::from_secs(5), w.shutdown()).await;
                return;
            }
            *conn.sink() = Some(w);
            if conn.pending().chunks.is_empty() {
                break;
            }
        }
    }
}

/// A stream the client opened, not yet accepted (server side).
pub struct Incoming {
    conn: Arc<Conn>,
    id: u32,
}

impl Incoming {
    /// Takes the stream.
    pub fn accept(self) -> Stream {
        self.conn.register(self.id)
    }

    /// Refuses it; nothing more happens on it.
    pub fn refuse(self, code: RefuseCode, message: &str) {
        self.conn.send(Out::Frame(frame::encode(
            frame::REFUSED,
            self.id,
            &frame::refused_body(code, message),
        )));
    }

    /// The connection it came on.
    pub fn conn(&self) -> &Conn {
        &self.conn
    }
}
