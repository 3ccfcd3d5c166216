//! The TLS stream after the handshake: rustls' handshake, then legate's own record layer on
//! rustls' keys and ciphers.
//!
//! rustls drives the handshake through its unbuffered API, on a buffer of ours. Then it hands
//! over the traffic keys and a [`KernelConnection`] (its interface for kTLS), which derives the
//! next keys on a key update and stores session tickets. From there every received record is
//! decrypted in place in one read buffer by rustls' own `MessageDecrypter`, and its plaintext
//! is copied once, into the caller's buffer. That is the only copy of a byte in user space
//! between the socket and the next socket; tokio-rustls made three (a read-ahead into rustls'
//! deframer, rustls' plaintext `Vec`, that `Vec` into the caller's buffer). The one exception
//! is a record that straddles the end of the read buffer: its received part is moved to the
//! front before the rest is read (docs/performance.md).
//!
//! What rustls would do after the handshake is done here, the same way, and tested below:
//! close_notify (read as EOF, sent on shutdown), alerts (a fatal one ends the stream with
//! `AlertReceived`; a bad record is answered with one), TLS 1.3 key updates (the peer's, and
//! an answer when it asks; ours before the cipher's confidentiality limit), session tickets
//! (client side, kept for resumption), and a TCP close without close_notify (an
//! `UnexpectedEof` error, as rustls reports it).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::crypto::cipher::{
    InboundOpaqueMessage, MessageDecrypter, MessageEncrypter, OutboundChunks, OutboundPlainMessage,
};
use rustls::kernel::KernelConnection;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncodeTlsData, UnbufferedStatus};
use rustls::{
    AlertDescription, ClientConfig, ConnectionTrafficSecrets, ContentType, HandshakeKind,
    ProtocolVersion, ServerConfig, SupportedCipherSuite,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::net::Stream;

/// Plaintext per record (RFC 8446 5.1).
const MAX_FRAGMENT: usize = 16 * 1024;
/// A record's header.
const HEADER: usize = 5;
/// The largest record payload a peer may send: the plaintext plus the cipher's expansion,
/// up to 256 bytes in TLS 1.3 and 2048 in TLS 1.2.
const MAX_CIPHERTEXT: usize = MAX_FRAGMENT + 2048;
/// The read buffer: three full records and room for a fourth's start, so that a record
/// straddling its end (moved to the front) is at most a quarter of what one read brings.
const READ_BUF: usize = 64 * 1024;
/// A record's start this short is kept aside while its connection waits for the rest, and
/// the read buffer goes back: a peer that stops mid-record holds a few bytes, not 64 KiB.
const PARKED: usize = 1024;
/// Encrypted bytes that may wait for the socket before a write waits with them.
const WRITE_AHEAD: usize = 64 * 1024;
/// Handshake bytes a peer may send before the handshake must have finished.
const MAX_HANDSHAKE_BYTES: usize = 256 * 1024;
/// Before rustls' hard limit on sequence numbers (it refuses at `u64::MAX - 1`).
const SEQ_SOFT_LIMIT: u64 = 0xffff_ffff_ffff_0000;

/// Read buffers kept per thread for streams that have nothing buffered ([`crate::spare`]).
const SPARE_KEEP: usize = 16;

/// What the handshake settled, for the log and for authorization.
#[derive(Debug, Clone)]
pub struct Session {
    version: Option<ProtocolVersion>,
    suite: Option<rustls::CipherSuite>,
    group: Option<rustls::NamedGroup>,
    kind: Option<HandshakeKind>,
    alpn: Option<Vec<u8>>,
    peer: Option<CertificateDer<'static>>,
}

impl Session {
    fn of(c: &rustls::CommonState) -> Session {
        Session {
            version: c.protocol_version(),
            suite: c.negotiated_cipher_suite().map(|s| s.suite()),
            group: c.negotiated_key_exchange_group().map(|g| g.name()),
            kind: c.handshake_kind(),
            alpn: c.alpn_protocol().map(<[u8]>::to_vec),
            peer: c
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|c| c.clone().into_owned()),
        }
    }

    /// The protocol both sides agreed by ALPN, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.alpn.as_deref()
    }

    /// The negotiated protocol version.
    pub fn protocol_version(&self) -> Option<ProtocolVersion> {
        self.version
    }

    /// The peer's end-entity certificate, verified by the handshake.
    pub fn peer_certificate(&self) -> Option<&CertificateDer<'static>> {
        self.peer.as_ref()
    }

    /// Version, cipher suite, key exchange group, and whether the handshake was full or
    /// resumed, e.g. `TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519MLKEM768 full`.
    pub fn describe(&self) -> String {
        let or_dash = |s: Option<String>| s.unwrap_or_else(|| "-".to_string());
        let kind = match self.kind {
            Some(HandshakeKind::Resumed) => "resumed",
            Some(HandshakeKind::FullWithHelloRetryRequest) => "full+retry",
            Some(HandshakeKind::Full) => "full",
            None => "-",
        };
        format!(
            "{} {} {} {kind}",
            or_dash(self.version.map(|v| format!("{v:?}"))),
            or_dash(self.suite.map(|s| format!("{s:?}"))),
            or_dash(self.group.map(|g| format!("{g:?}"))),
        )
    }
}

/// rustls' side of an established connection: new keys on a key update, session tickets.
enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

impl Kernel {
    fn suite(&self) -> SupportedCipherSuite {
        match self {
            Kernel::Client(k) => k.negotiated_cipher_suite(),
            Kernel::Server(k) => k.negotiated_cipher_suite(),
        }
    }

    fn tls13(&self) -> bool {
        let v = match self {
            Kernel::Client(k) => k.protocol_version(),
            Kernel::Server(k) => k.protocol_version(),
        };
        v == ProtocolVersion::TLSv1_3
    }

    fn next_tx(&mut self) -> Result<Box<dyn MessageEncrypter>, rustls::Error> {
        let (_, secrets) = match self {
            Kernel::Client(k) => k.update_tx_secret()?,
            Kernel::Server(k) => k.update_tx_secret()?,
        };
        encrypter(self.suite(), secrets)
    }

    fn next_rx(&mut self) -> Result<Box<dyn MessageDecrypter>, rustls::Error> {
        let (_, secrets) = match self {
            Kernel::Client(k) => k.update_rx_secret()?,
            Kernel::Server(k) => k.update_rx_secret()?,
        };
        decrypter(self.suite(), secrets)
    }

    fn ticket(&mut self, body: &[u8]) -> Result<(), rustls::Error> {
        match self {
            Kernel::Client(k) => k.handle_new_session_ticket(body),
            Kernel::Server(_) => Err(unexpected("a NewSessionTicket from a client")),
        }
    }
}

fn unexpected(what: &str) -> rustls::Error {
    rustls::Error::General(format!("peer sent {what} after the handshake"))
}

fn key_iv(
    s: ConnectionTrafficSecrets,
) -> Result<(rustls::crypto::cipher::AeadKey, rustls::crypto::cipher::Iv), rustls::Error> {
    match s {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => Ok((key, iv)),
        #[allow(unreachable_patterns)]
        _ => Err(rustls::Error::General(
            "negotiated a cipher legate's record layer does not know".into(),
        )),
    }
}

fn encrypter(
    suite: SupportedCipherSuite,
    s: ConnectionTrafficSecrets,
) -> Result<Box<dyn MessageEncrypter>, rustls::Error> {
    let (key, iv) = key_iv(s)?;
    Ok(match suite {
        SupportedCipherSuite::Tls13(s) => s.aead_alg.encrypter(key, iv),
        SupportedCipherSuite::Tls12(s) => {
            // rustls gives TLS 1.2's fixed IV and explicit nonce start as one 12-byte IV.
            let fixed = s.aead_alg.key_block_shape().fixed_iv_len;
            let iv = iv.as_ref();
            s.aead_alg.encrypter(key, &iv[..fixed], &iv[fixed..])
        }
    })
}

fn decrypter(
    suite: SupportedCipherSuite,
    s: ConnectionTrafficSecrets,
) -> Result<Box<dyn MessageDecrypter>, rustls::Error> {
    let (key, iv) = key_iv(s)?;
    Ok(match suite {
        SupportedCipherSuite::Tls13(s) => s.aead_alg.decrypter(key, iv),
        SupportedCipherSuite::Tls12(s) => {
            let fixed = s.aead_alg.key_block_shape().fixed_iv_len;
            s.aead_alg.decrypter(key, &iv.as_ref()[..fixed])
        }
    })
}

fn confidentiality_limit(suite: SupportedCipherSuite) -> u64 {
    let common = match suite {
        SupportedCipherSuite::Tls13(s) => &s.common,
        SupportedCipherSuite::Tls12(s) => &s.common,
    };
    common.confidentiality_limit.min(SEQ_SOFT_LIMIT)
}

/// A record's header: its type, version and payload length. `Ok(None)`: fewer than five
/// bytes. Refuses a length no peer may send.
pub fn record_header(
    b: &[u8],
) -> Result<Option<(ContentType, ProtocolVersion, usize)>, rustls::Error> {
    let [typ, v0, v1, l0, l1, ..] = *b else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([l0, l1]));
    if len > MAX_CIPHERTEXT {
        return Err(rustls::Error::PeerSentOversizedRecord);
    }
    Ok(Some((
        ContentType::from(typ),
        ProtocolVersion::from(u16::from_be_bytes([v0, v1])),
        len,
    )))
}

/// The first whole handshake message in `b` (type, body, bytes it takes), or `None` when `b`
/// holds only the start of one.
pub fn handshake_message(b: &[u8]) -> Option<(u8, &[u8], usize)> {
    let [typ, a, b1, c, ref rest @ ..] = *b else {
        return None;
    };
    let len = u32::from_be_bytes([0, a, b1, c]) as usize;
    let body = rest.get(..len)?;
    Some((typ, body, 4 + len))
}

const KEY_UPDATE: u8 = 24;
const NEW_SESSION_TICKET: u8 = 4;
const HELLO_REQUEST: u8 = 0;

/// The receiving half's state.
struct Rx {
    dec: Box<dyn MessageDecrypter>,
    seq: u64,
    /// Present while bytes are buffered.
    buf: Option<Box<[u8]>>,
    /// The last record's plaintext not yet read: `buf[plain..plain_end]`.
    plain: usize,
    plain_end: usize,
    /// Received bytes not yet decrypted: `buf[pos..len]`.
    pos: usize,
    len: usize,
    /// Plaintext that came with the handshake's last flight, read first.
    early: Vec<u8>,
    /// A post-handshake message split over records.
    join: Vec<u8>,
    /// The start of a record, up to [`PARKED`] bytes, kept while the read buffer went back.
    parked: Vec<u8>,
    end: RxEnd,
}

enum RxEnd {
    Open,
    /// close_notify received: EOF.
    Closed,
    /// The socket closed without close_notify.
    Truncated,
    Failed(rustls::Error),
}

impl Rx {
    fn release_if_empty(&mut self) {
        if self.plain == self.plain_end && self.pos == self.len {
            (self.plain, self.plain_end, self.pos, self.len) = (0, 0, 0, 0);
            if let Some(buf) = self.buf.take() {
                crate::spare::give(buf, SPARE_KEEP);
            }
        }
    }

    /// Before waiting for the socket: gives the read buffer back unless a long partial
    /// record is in it (only an incomplete record can be left when this is called).
    fn park(&mut self) {
        let partial = self.len - self.pos;
        if self.plain == self.plain_end
            && partial > 0
            && partial <= PARKED
            && let Some(buf) = &self.buf
        {
            self.parked.extend_from_slice(&buf[self.pos..self.len]);
            self.pos = self.len;
        }
        self.release_if_empty();
    }

    /// Room to read into, with the record at `pos` whole once it has arrived.
    fn room(&mut self) -> &mut [u8] {
        let buf = self.buf.get_or_insert_with(|| crate::spare::take(READ_BUF));
        if !self.parked.is_empty() {
            // Only while the buffer was away, so it is fresh here.
            buf[..self.parked.len()].copy_from_slice(&self.parked);
            (self.pos, self.len) = (0, self.parked.len());
            self.parked = Vec::new();
        }
        if self.pos == self.len {
            (self.pos, self.len) = (0, 0);
        } else if buf.len() - self.pos < HEADER + MAX_CIPHERTEXT {
            buf.copy_within(self.pos..self.len, 0);
            self.len -= self.pos;
            self.pos = 0;
        }
        &mut buf[self.len..]
    }
}

/// The sending half's state.
struct Tx {
    enc: Box<dyn MessageEncrypter>,
    seq: u64,
    limit: u64,
    /// Encrypted records waiting for the socket; `sent` bytes of the first are written.
    out: VecDeque<Vec<u8>>,
    sent: usize,
    queued: usize,
    /// close_notify or a fatal alert is queued: no more records.
    closed: bool,
    /// The peer asked for a key update: ours goes before our next record.
    answer_update: bool,
}

impl Tx {
    fn seal(&mut self, typ: ContentType, payload: OutboundChunks<'_>) -> Result<(), rustls::Error> {
        let msg = OutboundPlainMessage {
            typ,
            version: ProtocolVersion::TLSv1_2,
            payload,
        };
        let record = self.enc.encrypt(msg, self.seq)?.encode();
        self.seq += 1;
        self.queued += record.len();
        self.out.push_back(record);
        Ok(())
    }

    /// Queues a fatal alert, the last record this side sends.
    fn alert(&mut self, e: &rustls::Error) {
        let desc = match e {
            rustls::Error::DecryptError => AlertDescription::BadRecordMac,
            rustls::Error::PeerSentOversizedRecord => AlertDescription::RecordOverflow,
            rustls::Error::InvalidMessage(_) => AlertDescription::DecodeError,
            rustls::Error::AlertReceived(_) => return,
            _ => AlertDescription::UnexpectedMessage,
        };
        if !self.closed {
            let _ = self.seal(ContentType::Alert, (&[2, u8::from(desc)][..]).into());
            self.closed = true;
        }
    }

    /// Writes queued records until none is left or the socket is full.
    fn poll_send(&mut self, io: &mut Stream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            let w = ready!(self.with_slices(|s| Pin::new(&mut *io).poll_write_vectored(cx, s)))?;
            self.consume(w)?;
        }
        Poll::Ready(Ok(()))
    }

    /// Writes what the socket takes now, from the reading side: without waiting, and without
    /// taking the writer's wakeup.
    fn send_now(&mut self, io: &Stream) {
        while !self.out.is_empty() {
            match self.with_slices(|s| io.try_write_vectored(s)) {
                Ok(w) if self.consume(w).is_ok() => {}
                _ => return,
            }
        }
    }

    /// `f` on the first queued records, as slices for one vectored write.
    fn with_slices<T>(&self, f: impl FnOnce(&[IoSlice<'_>]) -> T) -> T {
        let mut slices = [IoSlice::new(&[]); 16];
        let mut n = 0;
        for (i, r) in self.out.iter().take(slices.len()).enumerate() {
            slices[i] = IoSlice::new(if i == 0 { &r[self.sent..] } else { r });
            n += 1;
        }
        f(&slices[..n])
    }

    /// Drops `w` written bytes from the queue.
    fn consume(&mut self, mut w: usize) -> io::Result<()> {
        if w == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        self.queued -= w;
        while w > 0 {
            let left = self.out[0].len() - self.sent;
            if w < left {
                self.sent += w;
                break;
            }
            w -= left;
            self.sent = 0;
            self.out.pop_front();
        }
        Ok(())
    }
}

/// An established TLS connection over a [`Stream`].
pub struct TlsStream {
    io: Stream,
    session: Session,
    kernel: Kernel,
    rx: Rx,
    tx: Tx,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

fn to_io(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn truncated() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "peer closed connection without sending TLS close_notify",
    )
}

impl TlsStream {
    /// The socket and what the handshake settled, as tokio-rustls' `get_ref` gives them.
    pub fn get_ref(&self) -> (&Stream, &Session) {
        (&self.io, &self.session)
    }

    /// Sends a TLS 1.3 key update before the next record; `ask`: the peer is asked to update
    /// its keys too. For tests: legate updates its keys itself before the cipher's limit.
    #[cfg(test)]
    fn update_keys_now(&mut self, ask: bool) -> Result<(), rustls::Error> {
        self.update_tx_keys(ask)
    }

    fn update_tx_keys(&mut self, ask: bool) -> Result<(), rustls::Error> {
        // The KeyUpdate goes under the old key; every record after it under the new one.
        let msg = [KEY_UPDATE, 0, 0, 1, u8::from(ask)];
        self.tx.seal(ContentType::Handshake, (&msg[..]).into())?;
        self.tx.enc = self.kernel.next_tx()?;
        self.tx.seq = 0;
        self.tx.answer_update = false;
        Ok(())
    }

    /// Before the next application record: the key update the peer asked for, or ours when the
    /// sequence number nears the cipher's limit.
    fn before_record(&mut self) -> Result<(), rustls::Error> {
        if self.tx.answer_update || self.tx.seq >= self.tx.limit {
            if !self.kernel.tls13() {
                // TLS 1.2 has no key update: the connection ends, and the next one starts
                // with fresh keys.
                return Err(rustls::Error::General(
                    "this TLS 1.2 connection reached its cipher's record limit".into(),
                ));
            }
            self.update_tx_keys(false)?;
        }
        Ok(())
    }

    /// Decrypts the record at `rx.pos` if it has arrived whole, and acts on it. `Ok(false)`:
    /// more bytes are needed.
    fn open_record(&mut self) -> Result<bool, rustls::Error> {
        let TlsStream { rx, tx, kernel, .. } = self;
        let Some(buf) = rx.buf.as_mut() else {
            return Ok(false);
        };
        let Some((typ, version, len)) = record_header(&buf[rx.pos..rx.len])? else {
            return Ok(false);
        };
        if rx.len - rx.pos < HEADER + len {
            return Ok(false);
        }
        if kernel.tls13() && typ != ContentType::ApplicationData {
            return Err(rustls::Error::InappropriateMessage {
                expect_types: vec![ContentType::ApplicationData],
                got_type: typ,
            });
        }
        let base = buf.as_ptr() as usize;
        let start = rx.pos + HEADER;
        rx.pos = start + len;
        let msg = InboundOpaqueMessage::new(typ, version, &mut buf[start..start + len]);
        let plain = rx.dec.decrypt(msg, rx.seq)?;
        rx.seq += 1;
        match plain.typ {
            ContentType::ApplicationData => {
                if !rx.join.is_empty() {
                    return Err(rustls::Error::PeerMisbehaved(
                        rustls::PeerMisbehaved::MessageInterleavedWithHandshakeMessage,
                    ));
                }
                rx.plain = plain.payload.as_ptr() as usize - base;
                rx.plain_end = rx.plain + plain.payload.len();
            }
            ContentType::Alert => match *plain.payload {
                [_, 0] => rx.end = RxEnd::Closed,
                // user_canceled, and TLS 1.2's warnings, are not the end.
                [_, 90] => {}
                [1, _] if !kernel.tls13() => {}
                [_, desc] => return Err(rustls::Error::AlertReceived(desc.into())),
                _ => {
                    return Err(rustls::Error::InvalidMessage(
                        rustls::InvalidMessage::MessageTooShort,
                    ));
                }
            },
            ContentType::Handshake => {
                let mut joined = std::mem::take(&mut rx.join);
                let mut rest = if joined.is_empty() {
                    plain.payload
                } else {
                    joined.extend_from_slice(plain.payload);
                    &joined[..]
                };
                while let Some((typ, body, used)) = handshake_message(rest) {
                    rest = &rest[used..];
                    match typ {
                        KEY_UPDATE if kernel.tls13() => {
                            if !rest.is_empty() {
                                return Err(rustls::Error::PeerMisbehaved(
                                    rustls::PeerMisbehaved::KeyEpochWithPendingFragment,
                                ));
                            }
                            match body {
                                [0] => {}
                                [1] => tx.answer_update = true,
                                _ => {
                                    return Err(rustls::Error::InvalidMessage(
                                        rustls::InvalidMessage::InvalidKeyUpdate,
                                    ));
                                }
                            }
                            rx.dec = kernel.next_rx()?;
                            rx.seq = 0;
                        }
                        NEW_SESSION_TICKET if kernel.tls13() => kernel.ticket(body)?,
                        // A TLS 1.2 server asking to renegotiate: legate never does.
                        HELLO_REQUEST if !kernel.tls13() => {}
                        other => return Err(unexpected(&format!("handshake message {other}"))),
                    }
                }
                if rest.len() > MAX_FRAGMENT {
                    return Err(rustls::Error::InvalidMessage(
                        rustls::InvalidMessage::HandshakePayloadTooLarge,
                    ));
                }
                rx.join = rest.to_vec();
            }
            other => {
                return Err(rustls::Error::InappropriateMessage {
                    expect_types: vec![ContentType::ApplicationData],
                    got_type: other,
                });
            }
        }
        Ok(true)
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.rx.early.is_empty() {
            let n = me.rx.early.len().min(dst.remaining());
            dst.put_slice(&me.rx.early[..n]);
            me.rx.early.drain(..n);
            if me.rx.early.is_empty() {
                me.rx.early = Vec::new();
            }
            return Poll::Ready(Ok(()));
        }
        let mut copied = false;
        loop {
            if me.rx.plain < me.rx.plain_end {
                let buf = me.rx.buf.as_ref().expect("plaintext is in the buffer");
                let n = (me.rx.plain_end - me.rx.plain).min(dst.remaining());
                dst.put_slice(&buf[me.rx.plain..me.rx.plain + n]);
                me.rx.plain += n;
                copied = true;
                if dst.remaining() == 0 {
                    me.rx.release_if_empty();
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            match &me.rx.end {
                RxEnd::Open => {}
                _ if copied => return Poll::Ready(Ok(())),
                RxEnd::Closed => return Poll::Ready(Ok(())),
                RxEnd::Truncated => return Poll::Ready(Err(truncated())),
                RxEnd::Failed(e) => return Poll::Ready(Err(to_io(e.clone()))),
            }
            match me.open_record() {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    me.tx.alert(&e);
                    // Best effort: the alert goes now if the socket takes it.
                    me.tx.send_now(&me.io);
                    me.rx.end = RxEnd::Failed(e);
                    continue;
                }
            }
            if copied {
                me.rx.park();
                return Poll::Ready(Ok(()));
            }
            let room = me.rx.room();
            let mut rb = ReadBuf::new(room);
            match Pin::new(&mut me.io).poll_read(cx, &mut rb) {
                Poll::Pending => {
                    me.rx.park();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => {
                    me.rx.release_if_empty();
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        me.rx.end = if me.rx.pos < me.rx.len {
                            RxEnd::Failed(rustls::Error::InvalidMessage(
                                rustls::InvalidMessage::MessageTooShort,
                            ))
                        } else {
                            RxEnd::Truncated
                        };
                        me.rx.release_if_empty();
                    }
                    me.rx.len += n;
                }
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if me.tx.queued >= WRITE_AHEAD {
            ready!(me.tx.poll_send(&mut me.io, cx))?;
        }
        if me.tx.closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS connection is closed for writing",
            )));
        }
        let mut parts: [&[u8]; 64] = [&[]; 64];
        let mut k = 0;
        let mut left = WRITE_AHEAD;
        for b in bufs {
            if k == parts.len() || left == 0 {
                break;
            }
            let b = &b[..b.len().min(left)];
            if !b.is_empty() {
                parts[k] = b;
                k += 1;
                left -= b.len();
            }
        }
        let taken = WRITE_AHEAD - left;
        if taken == 0 {
            return Poll::Ready(Ok(0));
        }
        let mut chunks = OutboundChunks::new(&parts[..k]);
        while !chunks.is_empty() {
            me.before_record().map_err(to_io)?;
            let (record, rest) = chunks.split_at(MAX_FRAGMENT);
            me.tx
                .seal(ContentType::ApplicationData, record)
                .map_err(to_io)?;
            chunks = rest;
        }
        // What the socket does not take now goes with the next write or flush.
        if let Poll::Ready(Err(e)) = me.tx.poll_send(&mut me.io, cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(taken))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.tx.poll_send(&mut me.io, cx))?;
        Pin::new(&mut me.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if !me.tx.closed {
            me.tx
                .seal(ContentType::Alert, (&[1, 0][..]).into())
                .map_err(to_io)?;
            me.tx.closed = true;
        }
        ready!(me.tx.poll_send(&mut me.io, cx))?;
        Pin::new(&mut me.io).poll_shutdown(cx)
    }
}

/// A rustls connection during its handshake, either side.
trait Handshaking: Sized {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn common(&self) -> &rustls::CommonState;
    fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Kernel), rustls::Error>;
}

/// The two sides' connections differ only in their types.
macro_rules! handshaking {
    ($conn:ty, $data:ty, $kernel:ident) => {
        impl Handshaking for $conn {
            type Data = $data;
            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, Self::Data> {
                self.process_tls_records(incoming)
            }
            fn common(&self) -> &rustls::CommonState {
                self
            }
            fn into_kernel(self) -> Result<(rustls::ExtractedSecrets, Kernel), rustls::Error> {
                let (s, k) = self.dangerous_into_kernel_connection()?;
                Ok((s, Kernel::$kernel(k)))
            }
        }
    };
}

handshaking!(UnbufferedClientConnection, ClientConnectionData, Client);
handshaking!(UnbufferedServerConnection, ServerConnectionData, Server);

fn encode<Data>(e: &mut EncodeTlsData<'_, Data>, out: &mut Vec<u8>) -> Result<(), rustls::Error> {
    let at = out.len();
    out.resize(at + 4096, 0);
    loop {
        match e.encode(&mut out[at..]) {
            Ok(n) => {
                out.truncate(at + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(s)) => out.resize(at + s.required_size, 0),
            Err(EncodeError::AlreadyEncoded) => {
                out.truncate(at);
                return Ok(());
            }
        }
    }
}

async fn read_more(io: &mut Stream, inbuf: &mut Vec<u8>) -> io::Result<()> {
    if inbuf.len() > MAX_HANDSHAKE_BYTES {
        return Err(to_io(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::HandshakePayloadTooLarge,
        )));
    }
    inbuf.reserve(8192);
    if io.read_buf(inbuf).await? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed the connection during the TLS handshake",
        ));
    }
    Ok(())
}

/// Runs a handshake to its end on `io`, `inbuf` holding what was read already; then takes the
/// keys from rustls.
async fn drive<H: Handshaking>(
    mut conn: H,
    mut io: Stream,
    mut inbuf: Vec<u8>,
) -> io::Result<TlsStream> {
    let mut out = Vec::new();
    let mut early = Vec::new();
    let mut peer_closed = false;
    loop {
        let UnbufferedStatus { discard, state } = conn.process(&mut inbuf);
        let mut blocked = false;
        let mut done = false;
        let mut failed = None;
        match state {
            Err(e) => failed = Some(e),
            Ok(ConnectionState::EncodeTlsData(mut e)) => encode(&mut e, &mut out).map_err(to_io)?,
            Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
            Ok(ConnectionState::BlockedHandshake) => blocked = true,
            Ok(ConnectionState::ReadTraffic(mut r)) => {
                while let Some(record) = r.next_record() {
                    early.extend_from_slice(record.map_err(to_io)?.payload);
                }
            }
            Ok(ConnectionState::WriteTraffic(_)) => done = true,
            Ok(ConnectionState::PeerClosed | ConnectionState::Closed) => {
                peer_closed = true;
                done = true;
            }
            Ok(other) => {
                failed = Some(rustls::Error::General(format!(
                    "unexpected handshake state {other:?}"
                )))
            }
        }
        inbuf.drain(..discard);
        if done && conn.common().is_handshaking() {
            // A server may write before the client's Finished (half-RTT data, which legate's
            // configs do not enable); the keys are taken only once the handshake is whole.
            (done, blocked) = (false, true);
        }
        if let Some(e) = failed {
            // Send the alert rustls queued for the peer, as tokio-rustls would.
            for _ in 0..4 {
                // (With what is left of the input: rustls' deframer keeps positions in it.)
                match conn.process(&mut inbuf).state {
                    Ok(ConnectionState::EncodeTlsData(mut enc)) => {
                        let _ = encode(&mut enc, &mut out);
                    }
                    Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                    _ => break,
                }
            }
            let _ = io.write_all(&out).await;
            return Err(to_io(e));
        }
        if !out.is_empty() && (blocked || done) {
            io.write_all(&out).await?;
            out.clear();
        }
        if done {
            break;
        }
        if blocked {
            read_more(&mut io, &mut inbuf).await?;
        }
    }
    let session = Session::of(conn.common());
    let (secrets, kernel) = conn.into_kernel().map_err(to_io)?;
    let suite = kernel.suite();
    let mut rx = Rx {
        dec: decrypter(suite, secrets.rx.1).map_err(to_io)?,
        seq: secrets.rx.0,
        buf: None,
        plain: 0,
        plain_end: 0,
        pos: 0,
        len: 0,
        early,
        join: Vec::new(),
        parked: Vec::new(),
        end: if peer_closed {
            RxEnd::Closed
        } else {
            RxEnd::Open
        },
    };
    if !inbuf.is_empty() {
        let room = rx.room();
        room[..inbuf.len()].copy_from_slice(&inbuf);
        rx.len = inbuf.len();
    }
    let mut enc = encrypter(suite, secrets.tx.1).map_err(to_io)?;
    if secrets.tx.0 > 0 {
        // TLS 1.2 (TLS 1.3's keys start at 0). aws-lc's AES-GCM sealing key takes the first
        // sequence number it is given for 0 and then refuses one that does not grow from
        // there; rustls sealed the Finished message as 0. So it is shown 0 once, on an empty
        // record that is dropped unsent: nothing an observer could see uses that nonce twice.
        let empty = OutboundPlainMessage {
            typ: ContentType::ApplicationData,
            version: ProtocolVersion::TLSv1_2,
            payload: (&[][..]).into(),
        };
        let _ = enc.encrypt(empty, 0);
    }
    let tx = Tx {
        enc,
        seq: secrets.tx.0,
        limit: confidentiality_limit(suite),
        out: VecDeque::new(),
        sent: 0,
        queued: 0,
        closed: false,
        answer_update: false,
    };
    Ok(TlsStream {
        io,
        session,
        kernel,
        rx,
        tx,
    })
}

/// The client's handshake on `io`, checking the server's certificate against `name`.
pub async fn connect(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    io: Stream,
) -> io::Result<TlsStream> {
    let conn = UnbufferedClientConnection::new(config, name).map_err(to_io)?;
    drive(conn, io, Vec::new()).await
}

/// The server's handshake on `io`, with the config `choose` picks for the ClientHello.
pub async fn accept(
    mut io: Stream,
    choose: impl FnOnce(&rustls::server::ClientHello<'_>) -> Arc<ServerConfig>,
) -> io::Result<TlsStream> {
    // rustls' Acceptor reads the ClientHello from a copy; the connection then starts over
    // from the same bytes with the config chosen.
    let mut acceptor = rustls::server::Acceptor::default();
    let mut inbuf = Vec::new();
    let config = loop {
        let start = inbuf.len();
        read_more(&mut io, &mut inbuf).await?;
        let mut fresh = &inbuf[start..];
        while !fresh.is_empty() {
            acceptor.read_tls(&mut fresh)?;
        }
        match acceptor.accept() {
            Ok(None) => {}
            Ok(Some(accepted)) => break choose(&accepted.client_hello()),
            Err((e, mut alert)) => {
                let mut bytes = Vec::new();
                let _ = alert.write_all(&mut bytes);
                let _ = io.write_all(&bytes).await;
                return Err(to_io(e));
            }
        }
    };
    let conn = UnbufferedServerConnection::new(config).map_err(to_io)?;
    drive(conn, io, inbuf).await
}

/// For the unit tests below and the fuzz target (`fuzz/fuzz_targets/tls_record.rs`).
#[doc(hidden)]
pub mod testing {
    use super::*;
    use crate::certs::{Ca, KeyType, LeafSpec, Usage, Validity};
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;

    /// Mutual TLS configs, client and server, under a new CA named `ca`; both offer
    /// `legate/1`. The server's certificate is for `localhost`.
    pub fn configs(
        ca: &str,
        versions: &'static [&'static rustls::SupportedProtocolVersion],
    ) -> (Arc<ClientConfig>, Arc<ServerConfig>) {
        let ca = Ca::generate(ca, KeyType::default(), Validity::days(1)).unwrap();
        let leaf = |cn: &str, usage| {
            let mut spec = LeafSpec::new(cn, usage);
            spec.names = vec!["localhost".into()];
            let issued = ca.issue(&spec).unwrap();
            let chain = CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
            (chain, key)
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let roots = Arc::new(roots);
        let provider = super::super::provider();
        let (chain, key) = leaf("server", Usage::Server);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .unwrap();
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .unwrap();
        server.enable_secret_extraction = true;
        server.alpn_protocols = vec![b"legate/1".to_vec()];
        let (chain, key) = leaf("client", Usage::Client);
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        client.enable_secret_extraction = true;
        client.alpn_protocols = vec![b"legate/1".to_vec()];
        (Arc::new(client), Arc::new(server))
    }

    /// TLS 1.3 configs made once per process.
    pub fn tls13_configs() -> (Arc<ClientConfig>, Arc<ServerConfig>) {
        static CONFIGS: std::sync::OnceLock<(Arc<ClientConfig>, Arc<ServerConfig>)> =
            std::sync::OnceLock::new();
        CONFIGS
            .get_or_init(|| configs("fuzz CA", super::super::TLS13_ONLY))
            .clone()
    }

    /// A client and a server connected over a UNIX socket pair, handshake done.
    pub async fn pair(
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    ) -> io::Result<(TlsStream, TlsStream)> {
        let (c, s) = tokio::net::UnixStream::pair()?;
        let name = ServerName::try_from("localhost").expect("a valid name");
        let (c, s) = tokio::join!(
            connect(client, name, Stream::Unix(c)),
            accept(Stream::Unix(s), move |_| server)
        );
        Ok((c?, s?))
    }

    /// Seals `payload` as one record of content type `typ`, whatever both are, and sends it.
    pub async fn send_record(s: &mut TlsStream, typ: u8, payload: &[u8]) -> io::Result<()> {
        s.tx.seal(ContentType::from(typ), payload.into())
            .map_err(to_io)?;
        s.flush().await
    }

    /// Writes `bytes` to the socket under the TLS, as they are.
    pub async fn send_raw(s: &mut TlsStream, bytes: &[u8]) -> io::Result<()> {
        s.flush().await?;
        s.io.write_all(bytes).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    type Peer<T> = tokio_rustls::TlsStream<T>;

    struct Pki {
        client: Arc<ClientConfig>,
        server: Arc<ServerConfig>,
    }

    fn pki(versions: &'static [&'static rustls::SupportedProtocolVersion]) -> Pki {
        pki_of("record test CA", versions)
    }

    fn pki_of(ca: &str, versions: &'static [&'static rustls::SupportedProtocolVersion]) -> Pki {
        let (client, server) = testing::configs(ca, versions);
        Pki { client, server }
    }

    async fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dial = TcpStream::connect(l.local_addr().unwrap());
        let (a, b) = tokio::join!(dial, l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    fn name() -> ServerName<'static> {
        ServerName::try_from("localhost").unwrap()
    }

    /// Ours on the client side, tokio-rustls (rustls' buffered connection) on the server's.
    async fn ours_dialing(p: &Pki) -> (TlsStream, Peer<TcpStream>) {
        let (c, s) = tcp_pair().await;
        let acceptor = tokio_rustls::TlsAcceptor::from(p.server.clone());
        let (ours, peer) = tokio::join!(
            connect(p.client.clone(), name(), Stream::Tcp(c)),
            acceptor.accept(s)
        );
        (ours.unwrap(), Peer::Server(peer.unwrap()))
    }

    /// Ours on the server side, tokio-rustls on the client's.
    async fn ours_accepting(p: &Pki) -> (TlsStream, Peer<TcpStream>) {
        let (c, s) = tcp_pair().await;
        let connector = tokio_rustls::TlsConnector::from(p.client.clone());
        let config = p.server.clone();
        let (ours, peer) = tokio::join!(
            accept(Stream::Tcp(s), move |_| config),
            connector.connect(name(), c)
        );
        (ours.unwrap(), Peer::Client(peer.unwrap()))
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Sends `data` one way and back the other at once, then closes each side's writing
    /// half: each side must read the other's bytes whole, then a clean EOF.
    async fn exchange(mut ours: TlsStream, mut peer: Peer<TcpStream>, len: usize) {
        let to_peer = pattern(len, 1);
        let to_us = pattern(len, 7);
        let (mut pr, mut pw) = tokio::io::split(&mut peer);
        let (mut or, mut ow) = tokio::io::split(&mut ours);
        let send_ours = async {
            ow.write_all(&to_peer).await.unwrap();
            ow.shutdown().await.unwrap();
        };
        let send_peer = async {
            pw.write_all(&to_us).await.unwrap();
            pw.shutdown().await.unwrap();
        };
        let read_ours = async {
            let mut got = Vec::new();
            or.read_to_end(&mut got).await.map(|_| got)
        };
        let read_peer = async {
            let mut got = Vec::new();
            pr.read_to_end(&mut got).await.map(|_| got)
        };
        let ((), (), ours_got, peer_got) = tokio::join!(send_ours, send_peer, read_ours, read_peer);
        assert!(ours_got.expect("our side reads to a clean EOF") == to_us);
        assert!(peer_got.expect("the peer reads to a clean EOF") == to_peer);
    }

    #[tokio::test]
    async fn a_megabyte_each_way_with_rustls_peers_on_both_sides_and_versions() {
        for versions in [super::super::TLS13_ONLY, super::super::TLS12_ONLY] {
            let p = pki(versions);
            let (ours, peer) = ours_dialing(&p).await;
            exchange(ours, peer, 1 << 20).await;
            let (ours, peer) = ours_accepting(&p).await;
            exchange(ours, peer, 1 << 20).await;
        }
    }

    #[tokio::test]
    async fn the_session_says_what_was_negotiated() {
        let p = pki(super::super::TLS13_ONLY);
        let (ours, _peer) = ours_dialing(&p).await;
        let s = &ours.get_ref().1;
        assert_eq!(s.alpn_protocol(), Some(&b"legate/1"[..]));
        assert_eq!(s.protocol_version(), Some(ProtocolVersion::TLSv1_3));
        assert!(
            s.describe()
                .starts_with("TLSv1_3 TLS13_AES_128_GCM_SHA256 "),
            "{}",
            s.describe()
        );
        let id = crate::tls::PeerIdentity::from_der(s.peer_certificate().unwrap()).unwrap();
        assert!(id.to_string().contains("server"), "{id}");
    }

    /// Reads exactly `n` bytes and checks them against `pattern(n, seed)`.
    async fn expect<R: AsyncRead + Unpin>(r: &mut R, n: usize, seed: u8) {
        let mut got = vec![0; n];
        r.read_exact(&mut got).await.unwrap();
        assert!(got == pattern(n, seed));
    }

    #[tokio::test]
    async fn key_updates_either_way_and_the_answer_to_a_request() {
        let p = pki(super::super::TLS13_ONLY);
        for dialing in [true, false] {
            let (mut ours, mut peer) = if dialing {
                ours_dialing(&p).await
            } else {
                ours_accepting(&p).await
            };
            // The peer updates its keys and asks us to (rustls asks): we must follow its new
            // key, and answer with ours before our next record.
            match &mut peer {
                Peer::Client(c) => c.get_mut().1.refresh_traffic_keys().unwrap(),
                Peer::Server(s) => s.get_mut().1.refresh_traffic_keys().unwrap(),
            }
            peer.write_all(&pattern(100_000, 3)).await.unwrap();
            peer.flush().await.unwrap();
            expect(&mut ours, 100_000, 3).await;
            assert!(ours.tx.answer_update, "the request was noted");
            assert!(ours.rx.buf.is_none(), "all read: the read buffer went back");
            ours.write_all(&pattern(50_000, 4)).await.unwrap();
            ours.flush().await.unwrap();
            assert!(!ours.tx.answer_update, "answered");
            expect(&mut peer, 50_000, 4).await;
            // Ours, asking for the peer's: rustls answers, and we follow its new key.
            ours.update_keys_now(true).unwrap();
            ours.write_all(&pattern(70_000, 5)).await.unwrap();
            ours.flush().await.unwrap();
            expect(&mut peer, 70_000, 5).await;
            peer.write_all(&pattern(30_000, 6)).await.unwrap();
            peer.flush().await.unwrap();
            expect(&mut ours, 30_000, 6).await;
            exchange(ours, peer, 10_000).await;
        }
    }

    #[tokio::test]
    async fn data_in_the_clients_last_handshake_flight_is_read_first_and_whole() {
        // rustls' buffered client sends plaintext written before the handshake ended right
        // after its Finished, in the same write: our server's handshake takes it in the same
        // read and must hand it on before what follows.
        let p = pki(super::super::TLS13_ONLY);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let client = p.client.clone();
        let sender = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut sock = std::net::TcpStream::connect(addr).unwrap();
            let mut conn = rustls::ClientConnection::new(client, name()).unwrap();
            conn.writer().write_all(&pattern(3000, 9)).unwrap();
            while conn.is_handshaking() {
                conn.complete_io(&mut sock).unwrap();
            }
            while conn.wants_write() {
                conn.write_tls(&mut sock).unwrap();
            }
            conn.writer().write_all(&pattern(5000, 10)).unwrap();
            conn.send_close_notify();
            while conn.wants_write() {
                conn.write_tls(&mut sock).unwrap();
            }
            // Wait for the server's close before closing the socket.
            let mut rest = Vec::new();
            let _ = sock.read_to_end(&mut rest);
        });
        let (s, _) = l.accept().await.unwrap();
        let config = p.server.clone();
        let mut ours = accept(Stream::Tcp(s), move |_| config).await.unwrap();
        let mut got = Vec::new();
        ours.read_to_end(&mut got).await.unwrap();
        let mut want = pattern(3000, 9);
        want.extend(pattern(5000, 10));
        assert!(got == want, "{} bytes, not the 8000 sent", got.len());
        ours.shutdown().await.unwrap();
        drop(ours);
        sender.join().unwrap();
    }

    #[tokio::test]
    async fn a_peer_stopped_mid_record_leaves_a_few_bytes_held_not_the_buffer() {
        let (client, server) = testing::tls13_configs();
        let (mut ours, mut peer) = testing::pair(client, server).await.unwrap();
        peer.tx
            .seal(ContentType::ApplicationData, (&pattern(500, 11)[..]).into())
            .unwrap();
        let record = peer.tx.out.pop_front().unwrap();
        peer.tx.queued -= record.len();
        let (head, tail) = record.split_at(3);
        testing::send_raw(&mut peer, head).await.unwrap();
        let mut buf = [0u8; 600];
        // The three bytes arrive, the read waits for the rest.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while ours.rx.parked.is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the bytes never arrived"
            );
            let waited =
                tokio::time::timeout(std::time::Duration::from_millis(20), ours.read(&mut buf));
            assert!(waited.await.is_err(), "a read returned with half a header");
        }
        assert_eq!(ours.rx.parked.len(), 3);
        assert!(
            ours.rx.buf.is_none(),
            "the read buffer went back while waiting"
        );
        testing::send_raw(&mut peer, tail).await.unwrap();
        expect(&mut ours, 500, 11).await;
        assert!(ours.rx.parked.is_empty() && ours.rx.buf.is_none());
    }

    #[tokio::test]
    async fn keys_are_updated_before_the_ciphers_record_limit() {
        let p = pki(super::super::TLS13_ONLY);
        let (mut ours, mut peer) = ours_dialing(&p).await;
        ours.tx.limit = 3;
        // 40 records: a key update after every third, each under a fresh sequence.
        ours.write_all(&pattern(40 * MAX_FRAGMENT, 8))
            .await
            .unwrap();
        ours.flush().await.unwrap();
        expect(&mut peer, 40 * MAX_FRAGMENT, 8).await;
        assert!(ours.tx.seq <= 3);
    }

    #[tokio::test]
    async fn a_tcp_close_without_close_notify_is_unexpected_eof() {
        let p = pki(super::super::TLS13_ONLY);
        let (mut ours, peer) = ours_dialing(&p).await;
        let Peer::Server(peer) = peer else {
            unreachable!()
        };
        let (tcp, _) = peer.into_inner();
        drop(tcp);
        let mut buf = [0u8; 10];
        let e = ours.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
        // And it stays so.
        let e = ours.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }

    /// Writes `bytes` on the peer's socket under its TLS, then reads on our side.
    async fn forged(bytes: &[u8]) -> (io::Error, io::Result<usize>) {
        let p = pki(super::super::TLS13_ONLY);
        let (mut ours, mut peer) = ours_dialing(&p).await;
        peer.get_mut().0.write_all(bytes).await.unwrap();
        let mut buf = [0u8; 100];
        let e = ours.read(&mut buf).await.unwrap_err();
        ours.flush().await.unwrap();
        let answer = peer.read(&mut buf).await;
        (e, answer)
    }

    fn rustls_error(e: &io::Error) -> &rustls::Error {
        e.get_ref()
            .and_then(|e| e.downcast_ref())
            .expect("a rustls error")
    }

    #[tokio::test]
    async fn a_forged_record_fails_and_is_answered_with_bad_record_mac() {
        let mut record = vec![23, 3, 3, 0, 40];
        record.extend([0x5a; 40]);
        let (e, answer) = forged(&record).await;
        assert_eq!(rustls_error(&e), &rustls::Error::DecryptError);
        let answer = answer.unwrap_err();
        assert_eq!(
            rustls_error(&answer),
            &rustls::Error::AlertReceived(AlertDescription::BadRecordMac)
        );
    }

    #[tokio::test]
    async fn an_oversized_record_is_refused_with_record_overflow() {
        let (e, answer) = forged(&[23, 3, 3, 0xff, 0xff]).await;
        assert_eq!(rustls_error(&e), &rustls::Error::PeerSentOversizedRecord);
        let answer = answer.unwrap_err();
        assert_eq!(
            rustls_error(&answer),
            &rustls::Error::AlertReceived(AlertDescription::RecordOverflow)
        );
    }

    #[tokio::test]
    async fn a_handshake_the_client_refuses_sends_the_server_an_alert() {
        let p = pki(super::super::TLS13_ONLY);
        let other = pki_of("another CA", super::super::TLS13_ONLY);
        let (c, s) = tcp_pair().await;
        // The server's certificate is from a CA the client does not trust.
        let config = other.server.clone();
        let (ours, peer) = tokio::join!(
            accept(Stream::Tcp(s), move |_| config),
            connect(p.client.clone(), name(), Stream::Tcp(c))
        );
        let ours = ours.unwrap_err();
        assert_eq!(
            rustls_error(&ours),
            &rustls::Error::AlertReceived(AlertDescription::UnknownCA),
            "{ours}"
        );
        let peer = peer.unwrap_err();
        assert!(
            matches!(rustls_error(&peer), rustls::Error::InvalidCertificate(_)),
            "{peer}"
        );
    }

    #[test]
    fn record_headers_and_handshake_messages_parse_and_refuse() {
        assert!(record_header(&[23, 3, 3, 0]).unwrap().is_none());
        let (typ, v, len) = record_header(&[23, 3, 3, 1, 0, 9]).unwrap().unwrap();
        assert_eq!(
            (typ, v, len),
            (ContentType::ApplicationData, ProtocolVersion::TLSv1_2, 256)
        );
        assert!(record_header(&[23, 3, 3, 0x48, 0x01]).is_err());
        assert_eq!(
            handshake_message(&[24, 0, 0, 1, 1, 9]),
            Some((24, &[1u8][..], 5))
        );
        assert_eq!(handshake_message(&[24, 0, 0, 2, 1]), None);
        assert_eq!(handshake_message(&[24, 0, 0]), None);
    }
}
