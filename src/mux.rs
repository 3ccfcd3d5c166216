//! Mux: many consumer streams over one `legate/1` connection (feature MUX, docs/protocol.md).
//!
//! In: a TLS connection that greeted with HELLO. Out: streams, each relayed between a plain
//! socket and the connection, with its own flow-control window so a slow consumer holds up
//! nobody else. One task reads the connection and hands each frame to its stream. Frames the
//! streams queue go out in batches: the stream that queues the 8th frame writes the batch, and
//! a writer task writes what is left once the ready streams have run. With fifty consumers, the
//! requests that arrive together cross in a few TLS writes instead of fifty; that is where the
//! requests per second come from (docs/performance.md).

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};

use crate::protocol::{self, Open, RefuseCode};
use crate::relay::{self, FramedTotals, SpareBuf};

/// Stream frames carry the stream's id after the 3-byte header.
pub const M_OPEN: u8 = 0x08;
pub const M_READY: u8 = 0x09;
pub const M_REFUSED: u8 = 0x0a;
pub const M_DATA: u8 = 0x0b;
pub const M_END: u8 = 0x0c;
pub const M_ABORT: u8 = 0x0d;
pub const M_WINDOW: u8 = 0x0e;
/// Id 0: the server takes no new streams on this connection; open them elsewhere.
pub const GOAWAY: u8 = 0x0f;

/// Header of a stream frame: type, length (of id + body), id.
pub const HEAD: usize = 7;

/// What each side may send on a stream before the other grants more, each direction. Large
/// enough for a stream to fill a long fat link on its own; an idle stream holds none of it.
pub const WINDOW: u32 = 1 << 20;

/// Read size from the connection: four full TLS records.
const READ: usize = 64 * 1024;
/// The most a stream gathers from its queue for one write to its plain side.
const GATHER: usize = 256 * 1024;
/// A batch is written once it holds this much: three full DATA frames, each one TLS record.
/// With four (64 KiB) one multiplexed stream carried 5-6% less than with three or two
/// (bench/ab.py, 6 rounds). Why was not measured: a smaller batch reaches the far side sooner,
/// and four came to 65,624 bytes with the records' overhead, past loopback's 65,483-byte MSS.
const BATCH: usize = 48 * 1024;

/// What the connection's reader hands a stream.
#[derive(Debug)]
enum Msg {
    Ready,
    Refused(RefuseCode, String),
    Data(Bytes),
    End,
    Abort,
    /// The connection failed, or (client side) the server is draining it and refused this
    /// stream before doing anything with it.
    Gone(String),
}

/// What the streams hand the writer.
enum Out {
    /// A DATA frame built in a relay buffer: header and payload, `len` bytes in all.
    Data(SpareBuf, usize),
    /// A small frame, encoded.
    Frame(Vec<u8>),
    /// Write what is queued, then close the connection.
    Close,
}

/// Frames queued for the connection, in order.
#[derive(Default)]
struct Pending {
    chunks: std::collections::VecDeque<Chunk>,
    bytes: usize,
    frames: usize,
    close: bool,
}

/// DATA frames this large are written from their relay buffer; smaller frames are copied
/// together, so a backlog of small frames does not hold a 16 KiB buffer each.
const COPY_BELOW: usize = 4096;

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
fn slices(chunks: &std::collections::VecDeque<Chunk>) -> Vec<io::IoSlice<'_>> {
    chunks
        .iter()
        .take(64)
        .map(|c| io::IoSlice::new(c.bytes()))
        .collect()
}

/// Drops the first `n` bytes of `chunks`.
fn consume(chunks: &mut std::collections::VecDeque<Chunk>, mut n: usize) {
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

/// A stream that queues the `batch_frames`-th frame (or `BATCH` bytes) writes the batch itself,
/// at once; the writer task writes whatever is left when the streams that are ready have run.
/// Unbounded batches put the two ambassadors in lock-step: fifty replies in one write come
/// back as fifty requests in one write, and each side's CPU idles while the other works
/// (measured: 45% idle per core against 12% for one connection per consumer). Bounded ones
/// keep several batches in flight. docs/performance.md has the measurements.
fn batch_frames() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("LEGATE_MUX_BATCH")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0)
            .unwrap_or(8)
    })
}

/// Whether the reader gives its CPU away once (`sched_yield`) after a read whose frames went
/// to the streams of several consumers, once those streams have written them to their plain
/// sides. An ambassador shares its host, often its one core, with the service or the
/// application it stands next to. Without the yield it reads on while the data arrives, and
/// the process it just handed requests (or replies) to waits for the end of its time slice:
/// every request of a burst piles up in one place while the far side's CPU idles, and the two
/// sides work in turn instead of at once. Measured with fifty Redis clients, each side pinned to
/// its own core (`bench/cpu_ab.py`, 8 rounds): 37% and 45% idle on the two cores without it, 18%
/// and 25% with it, and 1.31x the requests per second at the same CPU per request
/// (docs/performance.md). A lone stream does not yield, so one client's latency does not wait
/// behind other work on a busy CPU. `LEGATE_MUX_YIELD=0` turns it off, for measurements.
fn hand_over_cpu() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LEGATE_MUX_YIELD").map_or(true, |v| v != "0"))
}

/// Per-stream state the reader and the stream share.
struct Window {
    /// Bytes this side may still send.
    send: AtomicI64,
    /// Wakes a sender waiting for credit.
    more: Notify,
    /// Bytes the peer may still send before we grant more; below zero is a protocol error.
    recv: AtomicI64,
    /// The peer reset the stream (ABORT): both directions end now, whatever they wait on.
    aborted: AtomicBool,
    abort: Notify,
}

impl Window {
    async fn aborted(&self) {
        loop {
            let abort = self.abort.notified();
            if self.aborted.load(Ordering::Acquire) {
                return;
            }
            abort.await;
        }
    }
}

struct Slot {
    tx: mpsc::UnboundedSender<Msg>,
    window: Arc<Window>,
}

/// Which end of the connection this is: clients open streams with odd ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
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
    /// Set once the connection failed or closed; the reason.
    dead: std::sync::OnceLock<String>,
    /// Cancelled with `dead`: ends streams blocked on their plain side.
    dead_token: tokio_util::sync::CancellationToken,
    /// Why a write failed; the reader ends the connection with it.
    write_error: std::sync::OnceLock<String>,
    /// No new streams: GOAWAY sent (server) or received (client), or retired.
    draining: AtomicBool,
    active: AtomicUsize,
    /// When `active` last dropped to zero, in ms since `born`.
    born: Instant,
    idle_ms: AtomicU64,
    /// Signalled when the last stream ends and when the connection dies.
    changed: Notify,
}

fn header(kind: u8, id: u32, body: usize) -> [u8; HEAD] {
    let len = ((4 + body) as u16).to_be_bytes();
    let id = id.to_be_bytes();
    [kind, len[0], len[1], id[0], id[1], id[2], id[3]]
}

fn frame(kind: u8, id: u32, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEAD + body.len());
    f.extend_from_slice(&header(kind, id, body.len()));
    f.extend_from_slice(body);
    f
}

impl Conn {
    /// Starts the reader and writer tasks on an established connection (HELLO already
    /// exchanged). `on_open` (server side) is called for each new stream the peer opens.
    pub fn start<S>(
        role: Role,
        stream: S,
        initial: &[u8],
        on_open: impl FnMut(Incoming, Open) + Send + 'static,
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
            dead: std::sync::OnceLock::new(),
            dead_token: tokio_util::sync::CancellationToken::new(),
            write_error: std::sync::OnceLock::new(),
            draining: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            born: Instant::now(),
            idle_ms: AtomicU64::new(0),
            changed: Notify::new(),
        });
        tokio::spawn(write_loop(conn.clone()));
        let reader = conn.clone();
        let initial = BytesMut::from(initial);
        tokio::spawn(async move {
            let why = match read_loop(r, initial, &reader, on_open).await {
                Ok(()) => match reader.write_error.get() {
                    Some(e) => e.clone(),
                    None => "the peer closed the connection".to_string(),
                },
                Err(e) => e,
            };
            reader.kill(why);
        });
        conn
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Slot>> {
        self.streams.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends the connection: every stream learns it is gone, and the writer closes.
    fn kill(&self, why: String) {
        if self.dead.set(why.clone()).is_err() {
            return;
        }
        self.dead_token.cancel();
        self.draining.store(true, Ordering::Relaxed);
        let slots: Vec<Slot> = self.streams().drain().map(|(_, s)| s).collect();
        for s in slots {
            let _ = s.tx.send(Msg::Gone(why.clone()));
            s.window.more.notify_one();
        }
        self.send(Out::Close);
        self.changed.notify_waiters();
    }

    /// Why the connection is dead, if it is.
    pub fn dead(&self) -> Option<&str> {
        self.dead.get().map(String::as_str)
    }

    /// Whether new streams may be opened on it.
    pub fn usable(&self) -> bool {
        self.dead.get().is_none() && !self.draining.load(Ordering::Relaxed)
    }

    /// Streams open now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
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
        if self.draining.swap(true, Ordering::Relaxed) {
            return;
        }
        if self.role == Role::Server {
            self.send(Out::Frame(frame(GOAWAY, 0, &[])));
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
                || (self.draining.load(Ordering::Relaxed) && self.active() == 0)
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

    /// Waits until something changed: a stream ended, the connection drained or died.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    fn register(self: &Arc<Conn>, id: u32) -> StreamHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let window = Arc::new(Window {
            send: AtomicI64::new(i64::from(WINDOW)),
            more: Notify::new(),
            recv: AtomicI64::new(i64::from(WINDOW)),
            aborted: AtomicBool::new(false),
            abort: Notify::new(),
        });
        self.streams().insert(
            id,
            Slot {
                tx,
                window: window.clone(),
            },
        );
        self.active.fetch_add(1, Ordering::Relaxed);
        StreamHandle {
            id,
            conn: self.clone(),
            rx,
            window,
            ended: false,
            peer_aborted: false,
        }
    }

    /// Client side: a new stream, announced to the server with OPEN (and any early bytes).
    pub fn open(self: &Arc<Conn>, open: &Open, early: &[u8], end: bool) -> StreamHandle {
        let id = self.next_id.fetch_add(2, Ordering::Relaxed);
        if id >= u32::MAX / 2 {
            // Ids are not reused on a connection: retire it long before they run out.
            self.drain();
        }
        let h = self.register(id);
        let mut first = frame(M_OPEN, id, &protocol::open_payload(open));
        for chunk in early.chunks(relay::BUF_SIZE) {
            first.extend_from_slice(&header(M_DATA, id, chunk.len()));
            first.extend_from_slice(chunk);
        }
        h.window
            .send
            .fetch_sub(early.len() as i64, Ordering::Relaxed);
        if end {
            first.extend_from_slice(&header(M_END, id, 0));
        }
        h.send(Out::Frame(first));
        h
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sink(&self) -> std::sync::MutexGuard<'_, Option<Sink>> {
        self.sink.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame; a full batch is written at once.
    fn send(&self, o: Out) {
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
            Out::Frame(f) => p.push_copied(&f),
            Out::Close => p.close = true,
        }
        p.frames += 1;
        let first = p.frames == 1;
        let full = urgent || p.frames >= batch_frames() || p.bytes >= BATCH || p.close;
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
    fn release(&self, id: u32) {
        self.streams().remove(&id);
        if self.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.idle_ms
                .store(self.born.elapsed().as_millis() as u64, Ordering::Relaxed);
            if self.draining.load(Ordering::Relaxed) {
                self.send(Out::Close);
            }
            self.changed.notify_waiters();
        }
    }
}

/// Reads frames and hands each to its stream, until the connection ends. A frame that breaks
/// the protocol ends the connection with a reason.
async fn read_loop<R: AsyncRead + Unpin>(
    mut r: R,
    mut buf: BytesMut,
    conn: &Arc<Conn>,
    mut on_open: impl FnMut(Incoming, Open),
) -> Result<(), String> {
    let mut handed_over = false;
    loop {
        while buf.len() >= 3 {
            let kind = buf[0];
            let len = usize::from(u16::from_be_bytes([buf[1], buf[2]]));
            if buf.len() < 3 + len {
                break;
            }
            if len < 4 {
                return Err(format!("frame 0x{kind:02x} without a stream id"));
            }
            let id = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]);
            buf.advance(HEAD);
            let body = buf.split_to(len - 4);
            handed_over |= kind == M_DATA;
            dispatch(conn, kind, id, body, &mut on_open)?;
        }
        if buf.capacity() - buf.len() < READ / 2 {
            buf.reserve(READ);
        }
        if handed_over {
            // Let the streams write what this read brought while it is still in the cache,
            // rather than read on ahead up to the window.
            tokio::task::yield_now().await;
            if conn.active() > 1 && hand_over_cpu() {
                // SAFETY: sched_yield takes no arguments; it only puts this thread behind the
                // other runnable ones on its CPU.
                unsafe { libc::sched_yield() };
            }
            handed_over = false;
        }
        match r.read_buf(&mut buf).await {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(format!("connection failed: {e}")),
        }
    }
}

fn dispatch(
    conn: &Arc<Conn>,
    kind: u8,
    id: u32,
    body: BytesMut,
    on_open: &mut impl FnMut(Incoming, Open),
) -> Result<(), String> {
    let to_stream = |msg: Msg| {
        // A stream that already ended may still get frames the peer sent meanwhile.
        if let Some(s) = conn.streams().get(&id) {
            let _ = s.tx.send(msg);
        }
    };
    match kind {
        M_OPEN if conn.role == Role::Server => {
            if id.is_multiple_of(2) || conn.streams().contains_key(&id) {
                return Err(format!(
                    "OPEN for stream {id}, which is not a new client stream"
                ));
            }
            let incoming = Incoming {
                conn: conn.clone(),
                id,
            };
            let open = match protocol::decode_open(&body) {
                Ok(open) => open,
                Err(e) => {
                    incoming.refuse(RefuseCode::BadRequest, &e.to_string());
                    return Ok(());
                }
            };
            if !conn.usable() {
                incoming.refuse(RefuseCode::Draining, DRAINING);
                return Ok(());
            }
            on_open(incoming, open);
        }
        M_READY if conn.role == Role::Client => to_stream(Msg::Ready),
        M_REFUSED if conn.role == Role::Client => {
            let (&code, message) = body.split_first().ok_or("empty REFUSED frame")?;
            let code = RefuseCode::from_u8(code).ok_or("REFUSED with an unknown code")?;
            let message = String::from_utf8_lossy(message).into_owned();
            let msg = if code == RefuseCode::Draining {
                Msg::Gone(format!("server refused the stream: {message}"))
            } else {
                Msg::Refused(code, message)
            };
            to_stream(msg);
        }
        M_DATA => {
            if body.is_empty() {
                return Err(format!("empty DATA frame on stream {id}"));
            }
            let streams = conn.streams();
            if let Some(s) = streams.get(&id) {
                let left = s
                    .window
                    .recv
                    .fetch_sub(body.len() as i64, Ordering::Relaxed);
                if left < body.len() as i64 {
                    return Err(format!("stream {id} sent past its flow-control window"));
                }
                let _ = s.tx.send(Msg::Data(body.freeze()));
            }
        }
        M_END => to_stream(Msg::End),
        M_ABORT => {
            if let Some(s) = conn.streams().get(&id) {
                s.window.aborted.store(true, Ordering::Release);
                s.window.abort.notify_one();
                let _ = s.tx.send(Msg::Abort);
            }
        }
        M_WINDOW => {
            let grant: [u8; 4] = body[..].try_into().map_err(|_| "malformed WINDOW frame")?;
            if let Some(s) = conn.streams().get(&id) {
                let add = i64::from(u32::from_be_bytes(grant));
                s.window.send.fetch_add(add, Ordering::Relaxed);
                s.window.more.notify_one();
            }
        }
        GOAWAY if conn.role == Role::Client => {
            conn.draining.store(true, Ordering::Relaxed);
            if conn.active() == 0 {
                conn.send(Out::Close);
            }
            conn.changed.notify_waiters();
        }
        other => {
            return Err(format!(
                "unexpected frame 0x{other:02x} on a multiplexed connection"
            ));
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
            let (mut chunks, close) = {
                let mut p = conn.pending();
                p.frames = 0;
                p.bytes = 0;
                (std::mem::take(&mut p.chunks), p.close)
            };
            let Some(mut w) = conn.sink().take() else {
                return;
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
                let _ = w.shutdown().await;
                return;
            }
            *conn.sink() = Some(w);
            if conn.pending().chunks.is_empty() {
                break;
            }
        }
    }
}

/// What a server says when it refuses a stream because the connection takes no new ones; the
/// client opens the stream again on a new connection.
pub const DRAINING: &str = "connection draining; open the stream on a new one";

/// A stream the client opened, not yet accepted (server side).
pub struct Incoming {
    conn: Arc<Conn>,
    id: u32,
}

impl Incoming {
    /// Takes the stream.
    pub fn accept(self) -> StreamHandle {
        self.conn.register(self.id)
    }

    /// Refuses it; nothing more happens on it.
    pub fn refuse(self, code: RefuseCode, message: &str) {
        self.conn.send(Out::Frame(frame(
            M_REFUSED,
            self.id,
            &refusal(code, message),
        )));
    }

    /// The connection it came on.
    pub fn conn(&self) -> &Conn {
        &self.conn
    }
}

fn refusal(code: RefuseCode, message: &str) -> Vec<u8> {
    let mut p = vec![code as u8];
    let mut end = message.len().min(protocol::MAX_PAYLOAD - 1);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    p.extend_from_slice(&message.as_bytes()[..end]);
    p
}

/// One stream on a multiplexed connection. Dropping it ends the stream (ABORT unless it ended
/// cleanly both ways).
pub struct StreamHandle {
    id: u32,
    conn: Arc<Conn>,
    rx: mpsc::UnboundedReceiver<Msg>,
    window: Arc<Window>,
    /// Both directions ended with END: nothing to abort.
    ended: bool,
    peer_aborted: bool,
}

/// How the answer to a client's OPEN went.
pub enum Answer {
    Ready,
    Refused(RefuseCode, String),
    /// Nothing was done with the stream (the connection failed, or the server was draining
    /// it): safe to open it again elsewhere.
    Gone(String),
}

impl StreamHandle {
    fn send(&self, o: Out) {
        self.conn.send(o);
    }

    /// Server side: the stream is admitted and its target connected.
    pub fn ready(&self) {
        self.send(Out::Frame(frame(M_READY, self.id, &[])));
    }

    /// Server side: the stream is refused; it ends here.
    pub fn refuse(mut self, code: RefuseCode, message: &str) {
        self.send(Out::Frame(frame(
            M_REFUSED,
            self.id,
            &refusal(code, message),
        )));
        self.ended = true;
    }

    /// Client side: waits for READY or REFUSED. Data frames cannot come before either.
    pub async fn answer(&mut self) -> Answer {
        match self.rx.recv().await {
            Some(Msg::Ready) => Answer::Ready,
            Some(Msg::Refused(code, message)) => {
                self.ended = true;
                Answer::Refused(code, message)
            }
            Some(Msg::Gone(why)) => {
                self.ended = true;
                Answer::Gone(why)
            }
            Some(Msg::Abort) => {
                self.peer_aborted = true;
                Answer::Gone("the server reset the stream before answering".into())
            }
            Some(other) => Answer::Refused(
                RefuseCode::BadRequest,
                format!("expected READY, got {other:?}"),
            ),
            None => Answer::Gone("connection closed".into()),
        }
    }

    /// Client side, before READY: more early bytes (counted against the window, which early
    /// bytes never exceed), or END.
    pub fn send_early(&self, bytes: &[u8]) {
        let f = if bytes.is_empty() {
            frame(M_END, self.id, &[])
        } else {
            self.window
                .send
                .fetch_sub(bytes.len() as i64, Ordering::Relaxed);
            frame(M_DATA, self.id, bytes)
        };
        self.send(Out::Frame(f));
    }

    /// Relays the stream between `plain` and the connection until both directions end, or
    /// `close_timeout` after the first. `sent_end`: END already went out (before READY).
    pub async fn relay<P: AsyncRead + AsyncWrite>(
        &mut self,
        plain: P,
        close_timeout: Duration,
        sent_end: bool,
    ) -> FramedTotals {
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
        // A reset from the peer ends both directions, even when one ended cleanly and left the
        // other waiting for window the peer will never grant; a stream blocked on its plain
        // side (a target that does not read) ends at the latest a close timeout after its
        // connection died.
        let both = relay::both_directions(outward, inward, close_timeout, Result::is_err);
        let mut both = std::pin::pin!(both);
        let (first, second, cut) = tokio::select! {
            r = &mut both => r,
            _ = window.aborted() => (Err(true), None, false),
            // What the peer sent before the connection ended is still delivered, within the
            // close timeout.
            _ = self.conn.dead_token.cancelled() => tokio::select! {
                r = &mut both => r,
                _ = tokio::time::sleep(close_timeout) => (Err(true), None, true),
            },
        };
        let second = second.unwrap_or(Err(false));
        self.peer_aborted = matches!(first, Err(true)) || matches!(second, Err(true));
        self.ended = first.is_ok() && second.is_ok();
        FramedTotals {
            to_frames: out_count.load(Ordering::Relaxed),
            from_frames: in_count.load(Ordering::Relaxed),
            reusable: self.ended,
            cut,
            failed: failed
                .get()
                .cloned()
                .or_else(|| self.conn.dead().map(str::to_string).filter(|_| !self.ended)),
        }
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        if !self.ended && !self.peer_aborted && self.conn.dead().is_none() {
            self.send(Out::Frame(frame(M_ABORT, self.id, &[])));
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
            conn.send(Out::Frame(frame(M_END, id, &[])));
            return Ok(());
        }
        let mut buf = slot.expect("a read that returned bytes keeps its buffer");
        buf[..HEAD].copy_from_slice(&header(M_DATA, id, n));
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
        let mut slices = [io::IoSlice::new(&[]); 64];
        let k = (bufs.len() - first).min(slices.len());
        for (slice, b) in slices.iter_mut().zip(&bufs[first..first + k]) {
            *slice = io::IoSlice::new(b);
        }
        let mut n = w.write_vectored(&slices[..k]).await?;
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
/// plain side's write half. `Err(true)`: the peer aborted; `Err(false)`: broken here.
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
                    conn.send(Out::Frame(frame(M_WINDOW, id, &unacked.to_be_bytes())));
                    unacked = 0;
                }
            }
            Some(Msg::End) => {
                let _ = w.shutdown().await;
                return Ok(());
            }
            Some(Msg::Abort) => {
                let _ = w.shutdown().await;
                return Err(true);
            }
            Some(Msg::Gone(why)) => {
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
