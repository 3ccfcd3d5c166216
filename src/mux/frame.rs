//! Frame: the `legate/1` codec (docs/protocol.md), and nothing else.
//!
//! In: bytes from the peer, in a buffer that grows as they arrive. Out: one [`Frame`] at a time
//! (`Ok(None)` while the buffer holds less than a whole frame), or an [`Error`] that says what
//! was wrong with the bytes. Every frame is `type (1) | length (2, of id + body) | id (4) |
//! body`; the bodies of control frames (HELLO, OPEN, REFUSED, WINDOW, PING) are parsed here,
//! DATA bodies are handed on untouched.

use std::fmt;
use std::net::SocketAddr;

use bytes::{Buf, BytesMut};

/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Header of every frame: type, length (of id + body), stream id.
pub const HEAD: usize = 7;
// Relay buffers keep room for a DATA header in front of what they read.
const _: () = assert!(HEAD == crate::relay::SpareBuf::HEAD);
/// The largest body a frame can carry (the length field is 16 bits and counts the id).
pub const MAX_BODY: usize = u16::MAX as usize - 4;
/// The largest body of a control frame (OPEN, REFUSED). Nothing legitimate comes close.
pub const MAX_CONTROL: usize = 4096;
/// The longest route name.
pub const MAX_ROUTE: usize = 64;

/// Server → client, stream 0, the first frame: the server admitted the client.
pub const HELLO: u8 = 0x01;
/// Client → server: a new stream (odd id, larger than the last).
pub const OPEN: u8 = 0x02;
/// Server → client: the stream's target is connected.
pub const READY: u8 = 0x03;
/// Server → client: the stream is refused, with a code and a message.
pub const REFUSED: u8 = 0x04;
/// Both ways: bytes of the stream.
pub const DATA: u8 = 0x05;
/// Both ways: this direction of the stream is complete (a half-close).
pub const END: u8 = 0x06;
/// Both ways: the stream is reset.
pub const RESET: u8 = 0x07;
/// Both ways: the sender may send that many more DATA bytes on the stream.
pub const WINDOW: u8 = 0x08;
/// Server → client, stream 0: open no new streams on this connection.
pub const GOAWAY: u8 = 0x09;
/// Client → server, stream 0: prove the connection is live; answered with PONG.
pub const PING: u8 = 0x0a;
/// Server → client, stream 0: the answer to PING, with its body.
pub const PONG: u8 = 0x0b;

/// Why a server refused a stream. The numbers are on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseCode {
    UnknownRoute = 1,
    DialFailed = 2,
    Forbidden = 3,
    BadRequest = 4,
    Unavailable = 5,
    /// This connection takes no new streams: open the stream on another; nothing was done.
    Draining = 6,
    /// The route has no endpoint now (discovery found none, or lost them past the hold time).
    NoEndpoint = 7,
    /// The route is a Redis route that requires a master, and no endpoint is one now.
    NotMaster = 8,
}

impl RefuseCode {
    pub fn from_u8(v: u8) -> Option<RefuseCode> {
        Some(match v {
            1 => RefuseCode::UnknownRoute,
            2 => RefuseCode::DialFailed,
            3 => RefuseCode::Forbidden,
            4 => RefuseCode::BadRequest,
            5 => RefuseCode::Unavailable,
            6 => RefuseCode::Draining,
            7 => RefuseCode::NoEndpoint,
            8 => RefuseCode::NotMaster,
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
            RefuseCode::NoEndpoint => "no_endpoint",
            RefuseCode::NotMaster => "not_master",
        }
    }
}

impl fmt::Display for RefuseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The server's greeting. `features` is a bit set for later additions (none defined: 0);
/// `idle_secs` is how long the server keeps a connection without streams (0: not said).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub version: u8,
    pub features: u8,
    pub idle_secs: u32,
}

/// The client's request for a stream to a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// Empty means the server's default target.
    pub route: String,
    /// Where the consumer connected from, as the client ambassador saw it.
    pub consumer: Option<SocketAddr>,
}

/// One decoded frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Open(u32, Result<Open, Error>),
    Ready(u32),
    Refused(u32, RefuseCode, String),
    Data(u32, BytesMut),
    End(u32),
    Reset(u32),
    Window(u32, u32),
    GoAway,
    Ping([u8; 8]),
    Pong([u8; 8]),
}

/// What was wrong with the bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("frame 0x{0:02x} without a stream id")]
    NoId(u8),
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("malformed {0} frame: {1}")]
    Malformed(&'static str, &'static str),
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    Version(u8),
    #[error("{0} frame on stream {1}, which is for stream 0 only")]
    NotStreamZero(&'static str, u32),
    #[error("{0} frame on stream 0")]
    StreamZero(&'static str),
}

/// A route name is 0 to 64 of `[A-Za-z0-9._-]`; empty means the default target.
pub fn valid_route(name: &str) -> bool {
    name.len() <= MAX_ROUTE
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The header of a frame with a `body`-byte body.
pub fn header(kind: u8, id: u32, body: usize) -> [u8; HEAD] {
    debug_assert!(body <= MAX_BODY);
    let len = ((4 + body) as u16).to_be_bytes();
    let id = id.to_be_bytes();
    [kind, len[0], len[1], id[0], id[1], id[2], id[3]]
}

/// A whole frame.
pub fn encode(kind: u8, id: u32, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEAD + body.len());
    f.extend_from_slice(&header(kind, id, body.len()));
    f.extend_from_slice(body);
    f
}

pub fn hello(h: &Hello) -> Vec<u8> {
    let mut body = vec![h.version, h.features];
    body.extend_from_slice(&h.idle_secs.to_be_bytes());
    encode(HELLO, 0, &body)
}

/// An OPEN's body: version, features (0), route (length-prefixed), consumer address (text,
/// length-prefixed, may be empty).
pub fn open_body(open: &Open) -> Vec<u8> {
    let mut body = vec![VERSION, 0];
    body.push(open.route.len() as u8);
    body.extend_from_slice(open.route.as_bytes());
    let addr = open.consumer.map(|a| a.to_string()).unwrap_or_default();
    body.push(addr.len() as u8);
    body.extend_from_slice(addr.as_bytes());
    body
}

/// A REFUSED body: the code, then the message cut to fit (on a character boundary).
pub fn refused_body(code: RefuseCode, message: &str) -> Vec<u8> {
    let mut body = vec![code as u8];
    let mut end = message.len().min(MAX_CONTROL - 1);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    body.extend_from_slice(&message.as_bytes()[..end]);
    body
}

/// Takes one frame off the front of `buf`: `Ok(None)` when it holds less than a whole frame
/// (nothing is taken then). An error means the connection is unusable: the stream is out of
/// step or the peer speaks something else. A malformed OPEN is not such an error: it comes
/// back as `Frame::Open(id, Err(..))`, to be refused on its own.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, Error> {
    if buf.len() < 3 {
        return Ok(None);
    }
    let kind = buf[0];
    let len = usize::from(u16::from_be_bytes([buf[1], buf[2]]));
    if len < 4 {
        return Err(Error::NoId(kind));
    }
    if buf.len() < 3 + len {
        return Ok(None);
    }
    let id = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]);
    buf.advance(HEAD);
    let body = buf.split_to(len - 4);
    parse(kind, id, body).map(Some)
}

fn parse(kind: u8, id: u32, body: BytesMut) -> Result<Frame, Error> {
    let on_zero = |name| {
        if id == 0 {
            Ok(())
        } else {
            Err(Error::NotStreamZero(name, id))
        }
    };
    let on_stream = |name| {
        if id == 0 {
            Err(Error::StreamZero(name))
        } else {
            Ok(())
        }
    };
    Ok(match kind {
        HELLO => {
            on_zero("HELLO")?;
            let mut p = &body[..];
            let version = take_u8(&mut p, "HELLO")?;
            let features = take_u8(&mut p, "HELLO")?;
            let idle: [u8; 4] = p
                .get(..4)
                .and_then(|s| s.try_into().ok())
                .ok_or(Error::Malformed("HELLO", "truncated"))?;
            Frame::Hello(Hello {
                version,
                features,
                idle_secs: u32::from_be_bytes(idle),
            })
        }
        OPEN => {
            on_stream("OPEN")?;
            Frame::Open(id, parse_open(&body))
        }
        READY => {
            on_stream("READY")?;
            Frame::Ready(id)
        }
        REFUSED => {
            on_stream("REFUSED")?;
            let (&code, message) = body
                .split_first()
                .ok_or(Error::Malformed("REFUSED", "empty body"))?;
            let code =
                RefuseCode::from_u8(code).ok_or(Error::Malformed("REFUSED", "unknown code"))?;
            Frame::Refused(id, code, String::from_utf8_lossy(message).into_owned())
        }
        DATA => {
            on_stream("DATA")?;
            if body.is_empty() {
                return Err(Error::Malformed("DATA", "empty body"));
            }
            Frame::Data(id, body)
        }
        END => {
            on_stream("END")?;
            Frame::End(id)
        }
        RESET => {
            on_stream("RESET")?;
            Frame::Reset(id)
        }
        WINDOW => {
            on_stream("WINDOW")?;
            let grant: [u8; 4] = body[..]
                .try_into()
                .map_err(|_| Error::Malformed("WINDOW", "the body is not 4 bytes"))?;
            Frame::Window(id, u32::from_be_bytes(grant))
        }
        GOAWAY => {
            on_zero("GOAWAY")?;
            Frame::GoAway
        }
        PING | PONG => {
            let name = if kind == PING { "PING" } else { "PONG" };
            on_zero(name)?;
            let nonce: [u8; 8] = body[..]
                .try_into()
                .map_err(|_| Error::Malformed(name, "the body is not 8 bytes"))?;
            if kind == PING {
                Frame::Ping(nonce)
            } else {
                Frame::Pong(nonce)
            }
        }
        other => return Err(Error::UnknownType(other)),
    })
}

/// Parses an OPEN's body.
pub fn parse_open(body: &[u8]) -> Result<Open, Error> {
    if body.len() > MAX_CONTROL {
        return Err(Error::Malformed("OPEN", "longer than 4096 bytes"));
    }
    let mut p = body;
    let version = take_u8(&mut p, "OPEN")?;
    if version != VERSION {
        return Err(Error::Version(version));
    }
    let _features = take_u8(&mut p, "OPEN")?;
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
    Ok(Open {
        route: route.to_string(),
        consumer,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn one(bytes: &[u8]) -> Result<Option<Frame>, Error> {
        decode(&mut BytesMut::from(bytes))
    }

    #[test]
    fn frames_roundtrip() {
        let h = Hello {
            version: 1,
            features: 0,
            idle_secs: 60,
        };
        assert_eq!(one(&hello(&h)), Ok(Some(Frame::Hello(h))));
        let open = Open {
            route: "redis-main".into(),
            consumer: Some("10.1.2.3:4567".parse().unwrap()),
        };
        assert_eq!(
            one(&encode(OPEN, 5, &open_body(&open))),
            Ok(Some(Frame::Open(5, Ok(open))))
        );
        let bare = Open {
            route: String::new(),
            consumer: None,
        };
        assert_eq!(
            one(&encode(OPEN, 1, &open_body(&bare))),
            Ok(Some(Frame::Open(1, Ok(bare))))
        );
        assert_eq!(
            one(&encode(
                REFUSED,
                3,
                &refused_body(RefuseCode::UnknownRoute, "no route")
            )),
            Ok(Some(Frame::Refused(
                3,
                RefuseCode::UnknownRoute,
                "no route".into()
            )))
        );
        assert_eq!(
            one(&encode(WINDOW, 7, &9u32.to_be_bytes())),
            Ok(Some(Frame::Window(7, 9)))
        );
        assert_eq!(
            one(&encode(PING, 0, &[1; 8])),
            Ok(Some(Frame::Ping([1; 8])))
        );
        assert_eq!(one(&encode(GOAWAY, 0, &[])), Ok(Some(Frame::GoAway)));
    }

    #[test]
    fn a_partial_frame_waits_for_more_and_takes_nothing() {
        let whole = encode(DATA, 1, b"hello");
        for cut in 0..whole.len() {
            let mut buf = BytesMut::from(&whole[..cut]);
            assert_eq!(decode(&mut buf), Ok(None), "cut at {cut}");
            assert_eq!(buf.len(), cut);
        }
        let mut buf = BytesMut::from(&[whole.clone(), whole].concat()[..]);
        for _ in 0..2 {
            assert_eq!(
                decode(&mut buf),
                Ok(Some(Frame::Data(1, BytesMut::from(&b"hello"[..]))))
            );
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        assert_eq!(one(&[DATA, 0, 3, 0, 0, 0]), Err(Error::NoId(DATA)));
        assert_eq!(one(&encode(0x7f, 1, &[])), Err(Error::UnknownType(0x7f)));
        assert!(matches!(
            one(&encode(DATA, 1, &[])),
            Err(Error::Malformed(..))
        ));
        assert!(matches!(
            one(&encode(DATA, 0, b"x")),
            Err(Error::StreamZero(_))
        ));
        assert!(matches!(
            one(&encode(GOAWAY, 3, &[])),
            Err(Error::NotStreamZero(..))
        ));
        assert!(matches!(
            one(&encode(HELLO, 0, &[1, 0])),
            Err(Error::Malformed(..))
        ));
        assert!(matches!(
            one(&encode(WINDOW, 1, &[0, 1])),
            Err(Error::Malformed(..))
        ));
        assert!(matches!(
            one(&encode(REFUSED, 1, &[99])),
            Err(Error::Malformed(..))
        ));
    }

    #[test]
    fn a_bad_open_is_refused_on_its_own() {
        for (body, want) in [
            (&[][..], Error::Malformed("OPEN", "truncated")),
            (&[9, 0, 0][..], Error::Version(9)),
            (&[1, 0, 5, b'a'][..], Error::Malformed("OPEN", "truncated")),
            (
                &[1, 0, 1, b'/', 0][..],
                Error::Malformed("OPEN", "invalid route name"),
            ),
            (
                &[1, 0, 0, 3, b'x', b'y', b'z'][..],
                Error::Malformed("OPEN", "invalid consumer address"),
            ),
            (
                &[1, 0, 0, 0, 7][..],
                Error::Malformed("OPEN", "trailing bytes"),
            ),
        ] {
            assert_eq!(
                one(&encode(OPEN, 1, body)),
                Ok(Some(Frame::Open(1, Err(want))))
            );
        }
    }

    #[test]
    fn long_refusal_messages_are_cut_on_a_char_boundary() {
        let body = refused_body(RefuseCode::DialFailed, &"é".repeat(MAX_CONTROL));
        assert!(body.len() <= MAX_CONTROL);
        assert!(matches!(
            one(&encode(REFUSED, 1, &body)),
            Ok(Some(Frame::Refused(1, RefuseCode::DialFailed, _)))
        ));
    }
}
