//! `legate/1` control frames: HELLO, OPEN, READY, REFUSED (`docs/protocol.md`).
//!
//! In: bytes from an established TLS stream. Out: typed frames, or an error that says what was
//! wrong with the bytes. Frames are read with exact reads, so whatever follows a frame (the
//! consumer's first bytes behind an OPEN) stays in the stream for the relay.

use std::fmt;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// The largest control-frame payload accepted. Nothing legitimate comes close.
pub const MAX_PAYLOAD: usize = 4096;
/// The longest route name.
pub const MAX_ROUTE: usize = 64;

const HELLO: u8 = 0x01;
const OPEN: u8 = 0x02;
const READY: u8 = 0x03;
const REFUSED: u8 = 0x04;
/// Stream frames, after READY when [`FEATURE_FRAMED`] was granted: bytes, the end of one
/// direction (a half-close), and the reset of the whole stream.
pub const DATA: u8 = 0x05;
pub const END: u8 = 0x06;
pub const ABORT: u8 = 0x07;

/// Feature bit: after READY both directions are DATA frames closed by END (or ABORT), and a
/// connection whose stream ended cleanly in both directions carries the next OPEN.
pub const FEATURE_FRAMED: u8 = 0x01;
/// Feature bit: the connection carries many streams at once, each frame naming its stream
/// (`mux.rs`); the client asks for it by opening a stream with a multiplexed OPEN.
pub const FEATURE_MUX: u8 = 0x02;

/// The largest DATA payload (the length field is 16 bits).
pub const MAX_DATA: usize = u16::MAX as usize;

/// The 3-byte header of a stream frame with `len` bytes of payload.
pub fn stream_header(kind: u8, len: usize) -> [u8; 3] {
    debug_assert!(len <= MAX_DATA);
    let l = (len as u16).to_be_bytes();
    [kind, l[0], l[1]]
}

/// Why a server refused an OPEN. The numbers are on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseCode {
    UnknownRoute = 1,
    DialFailed = 2,
    Forbidden = 3,
    BadRequest = 4,
    Unavailable = 5,
    /// Multiplexed connections: this connection takes no new streams; open it on another.
    Draining = 6,
}

impl RefuseCode {
    pub(crate) fn from_u8(v: u8) -> Option<RefuseCode> {
        Some(match v {
            1 => RefuseCode::UnknownRoute,
            2 => RefuseCode::DialFailed,
            3 => RefuseCode::Forbidden,
            4 => RefuseCode::BadRequest,
            5 => RefuseCode::Unavailable,
            6 => RefuseCode::Draining,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RefuseCode::UnknownRoute => "unknown_route",
            RefuseCode::DialFailed => "dial_failed",
            RefuseCode::Forbidden => "forbidden",
            RefuseCode::BadRequest => "bad_request",
            RefuseCode::Unavailable => "unavailable",
            RefuseCode::Draining => "draining",
        }
    }
}

impl fmt::Display for RefuseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The client's request for a stream to a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub features: u8,
    /// Empty means the server's default target.
    pub route: String,
    /// Where the consumer connected from, as the client ambassador saw it.
    pub consumer: Option<SocketAddr>,
}

/// One control frame. `features` are bit sets for negotiating later additions: HELLO says what
/// the server offers, OPEN what the client wants of that, READY what the server granted. This
/// version defines none and sends 0; unknown bits are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `idle_secs`: how long the server keeps a connection open between streams (0: it does
    /// not say). Clients replace pooled connections well before that.
    Hello {
        version: u8,
        features: u8,
        idle_secs: u32,
    },
    Open(Open),
    Ready {
        features: u8,
    },
    Refused {
        code: RefuseCode,
        message: String,
    },
}

impl Frame {
    fn name(&self) -> &'static str {
        match self {
            Frame::Hello { .. } => "HELLO",
            Frame::Open(_) => "OPEN",
            Frame::Ready { .. } => "READY",
            Frame::Refused { .. } => "REFUSED",
        }
    }
}

/// What was wrong with the bytes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connection closed before a complete {0} frame")]
    Closed(&'static str),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("malformed {0} frame: {1}")]
    Malformed(&'static str, &'static str),
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    Version(u8),
    #[error("expected {expected}, got {got}")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
}

/// A route name is 0 to 64 of `[A-Za-z0-9._-]`; empty means the default target.
pub fn valid_route(name: &str) -> bool {
    name.len() <= MAX_ROUTE
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Serialises a frame: type (1 byte), payload length (2 bytes, big endian), payload.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let mut payload = Vec::new();
    let kind = match frame {
        Frame::Hello {
            version,
            features,
            idle_secs,
        } => {
            payload.extend_from_slice(&[*version, *features]);
            payload.extend_from_slice(&idle_secs.to_be_bytes());
            HELLO
        }
        Frame::Open(open) => {
            payload = open_payload(open);
            OPEN
        }
        Frame::Ready { features } => {
            payload.push(*features);
            READY
        }
        Frame::Refused { code, message } => {
            payload.push(*code as u8);
            let mut end = message.len().min(MAX_PAYLOAD - 1);
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            payload.extend_from_slice(&message.as_bytes()[..end]);
            REFUSED
        }
    };
    let mut out = Vec::with_capacity(3 + payload.len());
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

/// An OPEN frame's payload (also the body of a multiplexed OPEN).
pub fn open_payload(open: &Open) -> Vec<u8> {
    let mut payload = vec![VERSION, open.features];
    payload.push(open.route.len() as u8);
    payload.extend_from_slice(open.route.as_bytes());
    let addr = open.consumer.map(|a| a.to_string()).unwrap_or_default();
    payload.push(addr.len() as u8);
    payload.extend_from_slice(addr.as_bytes());
    payload
}

/// Parses an OPEN payload.
pub fn decode_open(payload: &[u8]) -> Result<Open, Error> {
    if payload.len() > MAX_PAYLOAD {
        return Err(Error::TooLarge(payload.len()));
    }
    match decode(OPEN, payload)? {
        Frame::Open(open) => Ok(open),
        _ => unreachable!("decode(OPEN, ..) yields an OPEN or an error"),
    }
}

/// Parses one frame's payload.
pub fn decode(kind: u8, payload: &[u8]) -> Result<Frame, Error> {
    match kind {
        HELLO => {
            let mut p = payload;
            let version = take_u8(&mut p, "HELLO")?;
            let features = take_u8(&mut p, "HELLO")?;
            // Added after the first release of version 1; absent means "not said".
            let idle_secs = match p {
                [a, b, c, d, ..] => u32::from_be_bytes([*a, *b, *c, *d]),
                _ => 0,
            };
            Ok(Frame::Hello {
                version,
                features,
                idle_secs,
            })
        }
        OPEN => {
            let mut p = payload;
            let version = take_u8(&mut p, "OPEN")?;
            if version != VERSION {
                return Err(Error::Version(version));
            }
            let features = take_u8(&mut p, "OPEN")?;
            let route = take_str(&mut p, "OPEN")?;
            if !valid_route(route) {
                return Err(Error::Malformed("OPEN", "invalid route name"));
            }
            let addr = take_str(&mut p, "OPEN")?;
            let consumer = if addr.is_empty() {
                None
            } else {
                Some(
                    addr.parse()
                        .map_err(|_| Error::Malformed("OPEN", "invalid consumer address"))?,
                )
            };
            if !p.is_empty() {
                return Err(Error::Malformed("OPEN", "trailing bytes"));
            }
            Ok(Frame::Open(Open {
                features,
                route: route.to_string(),
                consumer,
            }))
        }
        READY => {
            let mut p = payload;
            let features = take_u8(&mut p, "READY")?;
            Ok(Frame::Ready { features })
        }
        REFUSED => {
            let (&code, message) = payload
                .split_first()
                .ok_or(Error::Malformed("REFUSED", "empty payload"))?;
            let code =
                RefuseCode::from_u8(code).ok_or(Error::Malformed("REFUSED", "unknown code"))?;
            Ok(Frame::Refused {
                code,
                message: String::from_utf8_lossy(message).into_owned(),
            })
        }
        other => Err(Error::UnknownType(other)),
    }
}

fn take_u8(p: &mut &[u8], frame: &'static str) -> Result<u8, Error> {
    let (&b, rest) = p
        .split_first()
        .ok_or(Error::Malformed(frame, "truncated"))?;
    *p = rest;
    Ok(b)
}

fn take_str<'a>(p: &mut &'a [u8], frame: &'static str) -> Result<&'a str, Error> {
    let len = take_u8(p, frame)? as usize;
    if p.len() < len {
        return Err(Error::Malformed(frame, "truncated"));
    }
    let (s, rest) = p.split_at(len);
    *p = rest;
    std::str::from_utf8(s).map_err(|_| Error::Malformed(frame, "not UTF-8"))
}

/// Reads exactly one frame, and not a byte more.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    expecting: &'static str,
) -> Result<Frame, Error> {
    let mut header = [0u8; 3];
    r.read_exact(&mut header)
        .await
        .map_err(|e| closed(e, expecting))?;
    read_rest(r, header, expecting).await
}

/// The payload of a frame whose header was read, and the frame.
async fn read_rest<R: AsyncRead + Unpin>(
    r: &mut R,
    header: [u8; 3],
    expecting: &'static str,
) -> Result<Frame, Error> {
    let len = u16::from_be_bytes([header[1], header[2]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(Error::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)
        .await
        .map_err(|e| closed(e, expecting))?;
    decode(header[0], &payload)
}

/// Reads one frame and insists on its type (by name: "HELLO", "OPEN", ...), except that a
/// REFUSED is always returned as is so the caller can report it.
pub async fn expect_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    expected: &'static str,
) -> Result<Frame, Error> {
    let frame = read_frame(r, expected).await?;
    if frame.name() == expected || matches!(frame, Frame::Refused { .. }) {
        Ok(frame)
    } else {
        Err(Error::Unexpected {
            expected,
            got: frame.name(),
        })
    }
}

/// What a server reads where a stream may start.
pub enum Opening {
    Open(Open),
    /// The header of a multiplexed OPEN: from here on the connection is multiplexed, and the
    /// rest of that frame is still unread.
    Mux([u8; 3]),
}

/// Reads an OPEN, or the header of a multiplexed one, and not a byte more.
pub async fn read_opening<R: AsyncRead + Unpin>(r: &mut R) -> Result<Opening, Error> {
    let mut header = [0u8; 3];
    r.read_exact(&mut header)
        .await
        .map_err(|e| closed(e, "OPEN"))?;
    if header[0] == crate::mux::M_OPEN {
        return Ok(Opening::Mux(header));
    }
    match read_rest(r, header, "OPEN").await? {
        Frame::Open(open) => Ok(Opening::Open(open)),
        other => Err(Error::Unexpected {
            expected: "OPEN",
            got: other.name(),
        }),
    }
}

fn closed(e: std::io::Error, expecting: &'static str) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Error::Closed(expecting)
    } else {
        Error::Io(e)
    }
}

/// Writes one frame and flushes it through the TLS layer.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    w.write_all(&encode(frame)).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(frame: Frame) {
        let bytes = encode(&frame);
        let len = u16::from_be_bytes([bytes[1], bytes[2]]) as usize;
        assert_eq!(len, bytes.len() - 3);
        assert_eq!(decode(bytes[0], &bytes[3..]).unwrap(), frame);
    }

    #[test]
    fn frames_roundtrip() {
        roundtrip(Frame::Hello {
            version: 1,
            features: FEATURE_FRAMED,
            idle_secs: 60,
        });
        assert_eq!(
            decode(HELLO, &[1, 0]).unwrap(),
            Frame::Hello {
                version: 1,
                features: 0,
                idle_secs: 0
            }
        );
        roundtrip(Frame::Ready { features: 0 });
        roundtrip(Frame::Open(Open {
            features: 0,
            route: "redis-main".into(),
            consumer: Some("10.1.2.3:4567".parse().unwrap()),
        }));
        roundtrip(Frame::Open(Open {
            features: 3,
            route: String::new(),
            consumer: None,
        }));
        roundtrip(Frame::Refused {
            code: RefuseCode::UnknownRoute,
            message: "no route \"x\"".into(),
        });
    }

    #[test]
    fn bad_open_is_an_error_not_a_panic() {
        assert!(matches!(decode(OPEN, &[]), Err(Error::Malformed(..))));
        assert!(matches!(decode(OPEN, &[9, 0, 0]), Err(Error::Version(9))));
        assert!(matches!(decode(OPEN, &[1]), Err(Error::Malformed(..))));
        assert!(matches!(
            decode(OPEN, &[1, 0, 5, b'a']),
            Err(Error::Malformed(..))
        ));
        assert!(matches!(
            decode(OPEN, &[1, 0, 1, b'/', 0]),
            Err(Error::Malformed(_, "invalid route name"))
        ));
        assert!(matches!(
            decode(OPEN, &[1, 0, 0, 3, b'x', b'y', b'z']),
            Err(Error::Malformed(_, "invalid consumer address"))
        ));
        assert!(matches!(
            decode(OPEN, &[1, 0, 0, 0, 7]),
            Err(Error::Malformed(..))
        ));
        assert!(matches!(decode(HELLO, &[1]), Err(Error::Malformed(..))));
        assert!(matches!(decode(READY, &[]), Err(Error::Malformed(..))));
        assert!(matches!(decode(0x7f, &[]), Err(Error::UnknownType(0x7f))));
    }

    #[tokio::test]
    async fn read_frame_leaves_following_bytes() {
        let mut bytes = encode(&Frame::Ready { features: 0 });
        bytes.extend_from_slice(b"payload");
        let mut r = &bytes[..];
        assert_eq!(
            read_frame(&mut r, "READY").await.unwrap(),
            Frame::Ready { features: 0 }
        );
        assert_eq!(r, b"payload");
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_refused() {
        let mut r: &[u8] = &[OPEN, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut r, "OPEN").await,
            Err(Error::TooLarge(65535))
        ));
        let mut r: &[u8] = &[OPEN, 0, 10, 1];
        assert!(matches!(
            read_frame(&mut r, "OPEN").await,
            Err(Error::Closed("OPEN"))
        ));
    }

    #[test]
    fn long_refusal_messages_are_cut_on_a_char_boundary() {
        let msg = "é".repeat(MAX_PAYLOAD);
        let bytes = encode(&Frame::Refused {
            code: RefuseCode::DialFailed,
            message: msg,
        });
        assert!(bytes.len() - 3 <= MAX_PAYLOAD);
        assert!(decode(bytes[0], &bytes[3..]).is_ok());
    }
}
