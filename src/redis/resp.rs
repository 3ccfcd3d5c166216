//! RESP, the Redis protocol: one value at the head of a buffer, RESP2 and RESP3 alike.
//!
//! In: bytes from Redis, a Sentinel or a consumer (fuzzed: `fuzz/fuzz_targets/resp.rs`). Out:
//! a [`Value`] and how many bytes it took, `Ok(None)` while it is incomplete, or an error when
//! the bytes are not RESP or exceed the bound given (total size, nesting, element count): a
//! peer cannot make the reader hold more than the bound, recurse without end, or panic.

use std::fmt;

/// The deepest nesting accepted (ROLE, HELLO and Sentinel replies nest two or three deep).
pub const MAX_DEPTH: usize = 8;

/// One RESP value. RESP3's extra types are kept apart only where legate reads them.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `+...`, and RESP3's one-line types (`,` double, `#` boolean, `(` big number).
    Simple(Vec<u8>),
    /// `-...` and RESP3's `!` blob error.
    Error(Vec<u8>),
    Int(i64),
    /// `$` and RESP3's `=` verbatim string (its `txt:` prefix kept).
    Bulk(Vec<u8>),
    /// `*`, RESP3's `~` set and `>` push.
    Array(Vec<Value>),
    /// RESP3's `%`: keys and values in order.
    Map(Vec<(Value, Value)>),
    /// `$-1`, `*-1` and RESP3's `_`.
    Null,
}

impl Value {
    /// The bytes of a string-like value (simple, bulk).
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Simple(b) | Value::Bulk(b) => Some(b),
            _ => None,
        }
    }

    /// A string-like value as text.
    pub fn text(&self) -> Option<String> {
        self.bytes()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }

    /// The value under `key` in a map, or in RESP2's flat `[key, value, ...]` array (HELLO's
    /// reply in either protocol).
    pub fn field(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Map(pairs) => pairs
                .iter()
                .find(|(k, _)| k.bytes() == Some(key.as_bytes()))
                .map(|(_, v)| v),
            Value::Array(items) => items
                .chunks_exact(2)
                .find(|kv| kv[0].bytes() == Some(key.as_bytes()))
                .map(|kv| &kv[1]),
            _ => None,
        }
    }
}

/// Why bytes are not an acceptable RESP value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

fn err<T>(why: impl Into<String>) -> Result<T, Error> {
    Err(Error(why.into()))
}

/// One value at the head of `buf`, and the bytes it takes: `Ok(None)` until it is complete.
/// `limit` bounds its size in bytes, and so its element counts and string lengths.
pub fn parse(buf: &[u8], limit: usize) -> Result<Option<(Value, usize)>, Error> {
    let mut p = Parser {
        buf: &buf[..buf.len().min(limit)],
        limit,
        truncated: buf.len() > limit,
    };
    match p.value(0, 0) {
        Ok(Some((v, end))) => Ok(Some((v, end))),
        Ok(None) if p.truncated => err(format!("a RESP value longer than {limit} bytes")),
        other => other,
    }
}

struct Parser<'a> {
    buf: &'a [u8],
    limit: usize,
    /// Bytes past the limit exist: incomplete within it means too long.
    truncated: bool,
}

type Parsed = Result<Option<(Value, usize)>, Error>;

impl Parser<'_> {
    /// The line starting at `at` (without CRLF), and where the next one starts.
    fn line(&self, at: usize) -> Option<(&[u8], usize)> {
        let rest = self.buf.get(at..)?;
        let end = rest.windows(2).position(|w| w == b"\r\n")?;
        Some((&rest[..end], at + end + 2))
    }

    fn value(&mut self, at: usize, depth: usize) -> Parsed {
        if depth > MAX_DEPTH {
            return err(format!("RESP nested deeper than {MAX_DEPTH}"));
        }
        let Some(&kind) = self.buf.get(at) else {
            return Ok(None);
        };
        let Some((line, next)) = self.line(at + 1) else {
            return Ok(None);
        };
        match kind {
            b'+' | b',' | b'#' | b'(' => Ok(Some((Value::Simple(line.to_vec()), next))),
            b'-' => Ok(Some((Value::Error(line.to_vec()), next))),
            b':' => Ok(Some((Value::Int(integer(line)?), next))),
            b'_' => Ok(Some((Value::Null, next))),
            b'$' | b'=' | b'!' => {
                let n = integer(line)?;
                if n == -1 && kind == b'$' {
                    return Ok(Some((Value::Null, next)));
                }
                let n = self.count(n)?;
                let Some(body) = self.buf.get(next..next + n) else {
                    return Ok(None);
                };
                match self.buf.get(next + n..next + n + 2) {
                    None | Some([b'\r']) => return Ok(None),
                    Some(b"\r\n") => {}
                    Some(_) => return err("a RESP string not followed by CRLF"),
                }
                let v = if kind == b'!' {
                    Value::Error(body.to_vec())
                } else {
                    Value::Bulk(body.to_vec())
                };
                Ok(Some((v, next + n + 2)))
            }
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                let n = integer(line)?;
                if n == -1 && kind == b'*' {
                    return Ok(Some((Value::Null, next)));
                }
                let pairs = matches!(kind, b'%' | b'|');
                let n = self.count(n)?;
                let items = if pairs { n.saturating_mul(2) } else { n };
                // Each element takes at least 3 bytes: a count beyond that cannot fit.
                if items.saturating_mul(3) > self.limit {
                    return err(format!(
                        "a RESP aggregate of {n} elements exceeds the bound"
                    ));
                }
                let mut at = next;
                let mut values = Vec::with_capacity(items.min(64));
                for _ in 0..items {
                    let Some((v, end)) = self.value(at, depth + 1)? else {
                        return Ok(None);
                    };
                    values.push(v);
                    at = end;
                }
                if kind == b'|' {
                    // Attributes describe the value that follows; that value is the reply.
                    return match self.value(at, depth + 1)? {
                        Some((v, end)) => Ok(Some((v, end))),
                        None => Ok(None),
                    };
                }
                if pairs {
                    let mut it = values.into_iter();
                    let mut map = Vec::with_capacity(n.min(64));
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        map.push((k, v));
                    }
                    return Ok(Some((Value::Map(map), at)));
                }
                Ok(Some((Value::Array(values), at)))
            }
            other => err(format!("not RESP: a value starts with byte {other:#04x}")),
        }
    }

    /// A length or count: not negative, within the bound.
    fn count(&self, n: i64) -> Result<usize, Error> {
        match usize::try_from(n) {
            Ok(n) if n <= self.limit => Ok(n),
            Ok(_) => err(format!(
                "a RESP length of {n} exceeds the bound of {}",
                self.limit
            )),
            Err(_) => err(format!("a negative RESP length ({n})")),
        }
    }
}

fn integer(line: &[u8]) -> Result<i64, Error> {
    std::str::from_utf8(line)
        .ok()
        .filter(|s| !s.is_empty() && !s.starts_with('+'))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            Error(format!(
                "not a RESP integer: {:?}",
                String::from_utf8_lossy(line)
            ))
        })
}

/// A command as Redis takes it: an array of bulk strings.
pub fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A value that is a command (an array of bulk strings): its arguments.
pub fn as_command(v: &Value) -> Option<Vec<&[u8]>> {
    match v {
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|i| match i {
                Value::Bulk(b) => Some(b.as_slice()),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(bytes: &[u8]) -> Value {
        let (v, used) = parse(bytes, 1 << 16).unwrap().expect("complete");
        assert_eq!(used, bytes.len(), "{:?}", String::from_utf8_lossy(bytes));
        v
    }

    #[test]
    fn resp2_values() {
        assert_eq!(one(b"+OK\r\n"), Value::Simple(b"OK".to_vec()));
        assert_eq!(one(b"-ERR no\r\n"), Value::Error(b"ERR no".to_vec()));
        assert_eq!(one(b":-12\r\n"), Value::Int(-12));
        assert_eq!(one(b"$3\r\na\r\n\r\n"), Value::Bulk(b"a\r\n".to_vec()));
        assert_eq!(one(b"$-1\r\n"), Value::Null);
        assert_eq!(one(b"*-1\r\n"), Value::Null);
        assert_eq!(
            one(b"*2\r\n$4\r\nROLE\r\n*1\r\n:1\r\n"),
            Value::Array(vec![
                Value::Bulk(b"ROLE".to_vec()),
                Value::Array(vec![Value::Int(1)])
            ])
        );
    }

    #[test]
    fn resp3_values_and_hello_fields() {
        let hello = b"%2\r\n$6\r\nserver\r\n$5\r\nredis\r\n$4\r\nrole\r\n$6\r\nmaster\r\n";
        let v = one(hello);
        assert_eq!(
            v.field("role").and_then(Value::text).as_deref(),
            Some("master")
        );
        let flat = b"*4\r\n$6\r\nserver\r\n$5\r\nredis\r\n$4\r\nrole\r\n$7\r\nreplica\r\n";
        assert_eq!(
            one(flat).field("role").and_then(Value::text).as_deref(),
            Some("replica")
        );
        assert_eq!(one(b"_\r\n"), Value::Null);
        assert_eq!(one(b"#t\r\n"), Value::Simple(b"t".to_vec()));
        assert_eq!(one(b"!3\r\nERR\r\n"), Value::Error(b"ERR".to_vec()));
        assert_eq!(one(b"~1\r\n:1\r\n"), Value::Array(vec![Value::Int(1)]));
        assert_eq!(one(b"|1\r\n+a\r\n+b\r\n:5\r\n"), Value::Int(5));
    }

    #[test]
    fn incomplete_values_wait_for_more() {
        for whole in [
            &b"*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n"[..],
            b"%1\r\n+a\r\n:1\r\n",
        ] {
            for cut in 0..whole.len() {
                assert_eq!(parse(&whole[..cut], 1024).unwrap(), None, "cut at {cut}");
            }
        }
    }

    #[test]
    fn bounds_and_garbage_are_errors() {
        assert!(
            parse(b"$100\r\n", 64).is_err(),
            "a string longer than the bound"
        );
        assert!(parse(b"*1000\r\n", 64).is_err(), "more elements than fit");
        assert!(
            parse(&[b'+'; 100], 64).is_err(),
            "a line longer than the bound"
        );
        assert!(parse(b"$-2\r\n", 64).is_err());
        assert!(parse(b"$2\r\nabcd", 64).is_err(), "no CRLF after a string");
        assert!(parse(b"?\r\n", 64).is_err());
        assert!(parse(b":+1\r\n", 64).is_err());
        let deep = "*1\r\n".repeat(MAX_DEPTH + 2) + ":1\r\n";
        assert!(
            parse(deep.as_bytes(), 1024).is_err(),
            "nesting beyond the bound"
        );
    }

    #[test]
    fn commands_round_trip() {
        let bytes = command(&[b"HELLO", b"3", b"AUTH", b"u", b"p w"]);
        let v = one(&bytes);
        assert_eq!(
            as_command(&v).unwrap(),
            vec![&b"HELLO"[..], b"3", b"AUTH", b"u", b"p w"]
        );
        assert_eq!(as_command(&one(b"*1\r\n:1\r\n")), None);
    }
}
