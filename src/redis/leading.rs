//! The consumer's leading commands under `consumer_auth = "local"`: its `AUTH` is answered here
//! (`+OK`, never reaching Redis) and its `HELLO ... AUTH user password` reaches Redis without
//! the `AUTH` part, so the ambassador's credentials are the only ones Redis sees. From the
//! first other command on, the relay is a plain byte copy again.
//!
//! In: the consumer's bytes (fuzzed with [`Leading`], `fuzz/fuzz_targets/resp.rs`) and Redis's
//! replies. Out: what goes on to Redis, and the replies in the order the commands were sent:
//! a local `+OK` waits behind the replies owed for commands sent to Redis before it.
//!
//! [`Filtered`] wraps the connection to Redis, so the relay needs nothing else: its write side
//! takes the consumer's bytes, its read side gives the consumer Redis's replies with the local
//! ones in their places.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::resp;

/// The largest leading command read: longer, and it is relayed as it is.
pub const MAX_COMMAND: usize = 64 * 1024;

/// A reply owed to the consumer, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// Redis answers this one.
    Upstream,
    /// Answered here with these bytes.
    Local(Vec<u8>),
}

/// The leading-command state: pure, so it is unit-tested and fuzzed without sockets.
#[derive(Debug)]
pub struct Leading {
    /// Still reading leading commands.
    open: bool,
    /// Bytes of a leading command not yet complete.
    pending: Vec<u8>,
    /// Replies owed, while any of them is answered here.
    pub slots: VecDeque<Slot>,
}

impl Default for Leading {
    fn default() -> Leading {
        Leading {
            open: true,
            pending: Vec::new(),
            slots: VecDeque::new(),
        }
    }
}

impl Leading {
    /// Whether nothing is left to do: every later byte is relayed as it is.
    pub fn done(&self) -> bool {
        !self.open && self.slots.is_empty()
    }

    /// Whether consumer bytes are still looked at.
    pub fn open(&self) -> bool {
        self.open
    }

    /// Takes consumer bytes; appends what goes on to Redis to `forward`.
    pub fn consumer(&mut self, bytes: &[u8], forward: &mut Vec<u8>) {
        if !self.open {
            forward.extend_from_slice(bytes);
            return;
        }
        self.pending.extend_from_slice(bytes);
        while self.open {
            let parsed = match self.pending.first() {
                None => return,
                // An inline command (typed by hand): not looked into.
                Some(b) if *b != b'*' => None,
                Some(_) => match resp::parse(&self.pending, MAX_COMMAND) {
                    Ok(None) => return,
                    Ok(Some((v, used))) => Some((v, used)),
                    Err(_) => None,
                },
            };
            let Some((value, used)) = parsed else {
                self.close(forward);
                return;
            };
            let Some(args) = resp::as_command(&value) else {
                self.close(forward);
                return;
            };
            match args[0].to_ascii_uppercase().as_slice() {
                b"AUTH" => {
                    let reply: &[u8] = if (2..=3).contains(&args.len()) {
                        b"+OK\r\n"
                    } else {
                        b"-ERR wrong number of arguments for 'auth' command\r\n"
                    };
                    self.slots.push_back(Slot::Local(reply.to_vec()));
                }
                b"HELLO" => {
                    forward.extend_from_slice(&resp::command(&without_auth(&args)));
                    self.slots.push_back(Slot::Upstream);
                }
                _ => {
                    self.close(forward);
                    return;
                }
            }
            self.pending.drain(..used);
        }
    }

    /// The consumer ended its side: what is pending goes on as it is.
    pub fn end(&mut self, forward: &mut Vec<u8>) {
        if self.open {
            self.close(forward);
        }
    }

    fn close(&mut self, forward: &mut Vec<u8>) {
        self.open = false;
        forward.append(&mut self.pending);
        // Replies owed only by Redis need no more looking at.
        if !self.slots.iter().any(|s| matches!(s, Slot::Local(_))) {
            self.slots.clear();
        }
    }
}

/// `HELLO [protover [AUTH user password] [SETNAME name]]` without its `AUTH` part.
fn without_auth<'a>(args: &[&'a [u8]]) -> Vec<&'a [u8]> {
    let mut out = Vec::with_capacity(args.len());
    let mut i = 0;
    while i < args.len() {
        if i >= 2 && args[i].eq_ignore_ascii_case(b"AUTH") && i + 2 < args.len() {
            i += 3;
            continue;
        }
        out.push(args[i]);
        i += 1;
    }
    out
}

/// The connection to Redis with the consumer's leading commands handled as [`Leading`] says.
pub struct Filtered<P> {
    inner: P,
    lead: Leading,
    /// Bytes for Redis not yet written.
    out: Vec<u8>,
    out_at: usize,
    /// Bytes from Redis not yet given to the consumer.
    from_redis: Vec<u8>,
    /// Bytes of `from_redis` that are the reply of the slot at the head.
    emitting: usize,
    /// How much of the local reply at the head was given.
    local_at: usize,
    redis_ended: bool,
    /// The read side, waiting on Redis while a local reply may become due.
    reader: Option<Waker>,
}

impl<P> Filtered<P> {
    pub fn new(inner: P) -> Filtered<P> {
        Filtered {
            inner,
            lead: Leading::default(),
            out: Vec::new(),
            out_at: 0,
            from_redis: Vec::new(),
            emitting: 0,
            local_at: 0,
            redis_ended: false,
            reader: None,
        }
    }
}

impl<P: AsyncWrite + Unpin> Filtered<P> {
    /// Writes what is waiting for Redis.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.out.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_at..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.out_at += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.out.clear();
        self.out_at = 0;
        Poll::Ready(Ok(()))
    }

    fn wake_reader(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }
}

impl<P: AsyncWrite + Unpin> AsyncWrite for Filtered<P> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        std::task::ready!(this.drain(cx))?;
        if !this.lead.open() {
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        this.lead.consumer(buf, &mut this.out);
        // A local reply may be due now, or Redis's replies no longer need looking at.
        this.wake_reader();
        // Taken whether or not it is all written now: the rest goes with the next write or
        // the flush the relay makes after each write.
        let _ = this.drain(cx)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.lead.open() {
            this.lead.end(&mut this.out);
            this.wake_reader();
        }
        std::task::ready!(this.drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl<P: AsyncRead + Unpin> AsyncRead for Filtered<P> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match this.lead.slots.front() {
                Some(Slot::Local(reply)) => {
                    let n = (reply.len() - this.local_at).min(buf.remaining());
                    buf.put_slice(&reply[this.local_at..this.local_at + n]);
                    this.local_at += n;
                    if this.local_at == reply.len() {
                        this.local_at = 0;
                        this.lead.slots.pop_front();
                    }
                    return Poll::Ready(Ok(()));
                }
                Some(Slot::Upstream) if this.emitting > 0 => {
                    let n = this.emitting.min(buf.remaining());
                    buf.put_slice(&this.from_redis[..n]);
                    this.from_redis.drain(..n);
                    this.emitting -= n;
                    if this.emitting == 0 {
                        this.lead.slots.pop_front();
                    }
                    return Poll::Ready(Ok(()));
                }
                Some(Slot::Upstream) => {
                    match resp::parse(&this.from_redis, super::MAX_REPLY) {
                        Ok(Some((_, used))) => {
                            this.emitting = used;
                            continue;
                        }
                        Ok(None) if this.redis_ended => {
                            // Redis is gone mid-reply: what it sent is all there is.
                            this.lead.slots.clear();
                            continue;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            let why = format!("Redis's reply is not RESP: {e}");
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                why,
                            )));
                        }
                    }
                    let mut chunk = [0u8; 4096];
                    let mut rb = ReadBuf::new(&mut chunk);
                    match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                        Poll::Ready(Ok(())) if rb.filled().is_empty() => this.redis_ended = true,
                        Poll::Ready(Ok(())) => this.from_redis.extend_from_slice(rb.filled()),
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {
                            this.reader = Some(cx.waker().clone());
                            return Poll::Pending;
                        }
                    }
                }
                None if !this.from_redis.is_empty() => {
                    let n = this.from_redis.len().min(buf.remaining());
                    buf.put_slice(&this.from_redis[..n]);
                    this.from_redis.drain(..n);
                    return Poll::Ready(Ok(()));
                }
                None if this.redis_ended => return Poll::Ready(Ok(())),
                None => {
                    let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
                    if polled.is_pending() && !this.lead.done() {
                        // A local reply may become due before Redis says anything.
                        this.reader = Some(cx.waker().clone());
                    }
                    return polled;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn cmd(args: &[&str]) -> Vec<u8> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        resp::command(&args)
    }

    #[test]
    fn auth_is_answered_here_and_hello_loses_its_auth() {
        let mut lead = Leading::default();
        let mut forward = Vec::new();
        let mut input = cmd(&["auth", "app", "old"]);
        input.extend(cmd(&["HELLO", "3", "AUTH", "app", "old", "SETNAME", "me"]));
        input.extend(cmd(&["SET", "k", "v"]));
        input.extend(cmd(&["AUTH", "not", "leading"]));
        // Byte by byte: a command split anywhere is the same command.
        for b in &input {
            lead.consumer(std::slice::from_ref(b), &mut forward);
        }
        let mut want = cmd(&["HELLO", "3", "SETNAME", "me"]);
        want.extend(cmd(&["SET", "k", "v"]));
        want.extend(cmd(&["AUTH", "not", "leading"]));
        assert_eq!(
            String::from_utf8_lossy(&forward),
            String::from_utf8_lossy(&want)
        );
        assert_eq!(
            lead.slots,
            [Slot::Local(b"+OK\r\n".to_vec()), Slot::Upstream]
        );
        assert!(!lead.open());
    }

    #[test]
    fn anything_else_first_is_relayed_untouched() {
        for first in [
            &b"PING\r\n"[..],
            b"*1\r\n:1\r\n",
            b"*-5\r\n",
            b"$3\r\nabc\r\n",
        ] {
            let mut lead = Leading::default();
            let mut forward = Vec::new();
            lead.consumer(first, &mut forward);
            lead.consumer(&cmd(&["AUTH", "x"]), &mut forward);
            let mut want = first.to_vec();
            want.extend(cmd(&["AUTH", "x"]));
            assert_eq!(forward, want);
            assert!(lead.done());
        }
    }

    #[test]
    fn a_partial_command_at_the_end_goes_on_as_it_is() {
        let mut lead = Leading::default();
        let mut forward = Vec::new();
        lead.consumer(b"*2\r\n$4\r\nAUTH\r\n$9\r\nabc", &mut forward);
        assert!(forward.is_empty());
        lead.end(&mut forward);
        assert_eq!(forward, b"*2\r\n$4\r\nAUTH\r\n$9\r\nabc");
        let mut lead = Leading::default();
        let mut forward = Vec::new();
        lead.consumer(&cmd(&["AUTH", "a", "b", "c"]), &mut forward);
        assert_eq!(
            lead.slots,
            [Slot::Local(
                b"-ERR wrong number of arguments for 'auth' command\r\n".to_vec()
            )]
        );
    }

    #[tokio::test]
    async fn a_local_reply_waits_behind_the_redis_reply_owed_before_it() {
        let (near, mut redis) = tokio::io::duplex(1 << 16);
        let mut f = Filtered::new(near);
        let mut sent = cmd(&["HELLO", "2"]);
        sent.extend(cmd(&["AUTH", "pw"]));
        sent.extend(cmd(&["PING"]));
        f.write_all(&sent).await.unwrap();
        f.flush().await.unwrap();
        let mut want = cmd(&["HELLO", "2"]);
        want.extend(cmd(&["PING"]));
        let mut got = vec![0; want.len()];
        redis.read_exact(&mut got).await.unwrap();
        assert_eq!(got, want);
        // The HELLO reply arrives in pieces, the PING's with its tail.
        redis.write_all(b"*2\r\n$6\r\nserver\r\n").await.unwrap();
        redis.write_all(b"$5\r\nredis\r\n+PONG\r\n").await.unwrap();
        redis.shutdown().await.unwrap();
        let mut replies = Vec::new();
        f.read_to_end(&mut replies).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&replies),
            "*2\r\n$6\r\nserver\r\n$5\r\nredis\r\n+OK\r\n+PONG\r\n"
        );
    }
}
