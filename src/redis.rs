//! Redis: what a server ambassador says to Redis itself before the consumer's bytes. With
//! `redis_password_file` (or `redis_password_env`), it authenticates the connection (`AUTH
//! password`, or `AUTH user password` for an ACL user), reads and swallows the reply, and only
//! then relays: a consumer that knows nothing of credentials reaches a Redis that wants them.
//!
//! In: a connected service stream and the credentials' source. Out: an authenticated stream,
//! or why not, in one line without the secret. The secret is read from its file (mode 0600
//! checked) or environment variable for each connection, so a changed file is used at once
//! and the secret is held nowhere else: not in the config, a log line or `/_status`.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The longest reply line read from Redis for AUTH.
pub const MAX_REPLY: usize = 4096;

/// Where the password comes from: never a flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    File(PathBuf),
    Env(String),
}

/// A server side's credentials for its Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// An ACL user; `None` is `AUTH password` (the default user).
    pub user: Option<String>,
    pub password: PasswordSource,
}

impl Credentials {
    /// The password now; an error names the file or variable, not the secret.
    pub fn password(&self) -> Result<Vec<u8>, String> {
        let mut secret = match &self.password {
            PasswordSource::File(path) => {
                use std::os::unix::fs::PermissionsExt;
                let meta = std::fs::metadata(path)
                    .map_err(|e| format!("redis password file {}: {e}", path.display()))?;
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(format!(
                        "redis password file {} is readable by group or others (mode {mode:03o}); chmod 600 it",
                        path.display()
                    ));
                }
                std::fs::read(path)
                    .map_err(|e| format!("redis password file {}: {e}", path.display()))?
            }
            PasswordSource::Env(name) => std::env::var(name)
                .map_err(|_| {
                    format!("environment variable {name} (the redis password) is not set")
                })?
                .into_bytes(),
        };
        // A file written by `echo` ends in a newline that is not part of the password.
        while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            secret.pop();
        }
        if secret.is_empty() {
            return Err("the redis password is empty".into());
        }
        Ok(secret)
    }
}

/// `AUTH [user] password` as a RESP array.
pub fn auth_command(user: Option<&str>, password: &[u8]) -> Vec<u8> {
    let mut args: Vec<&[u8]> = vec![b"AUTH"];
    if let Some(user) = user {
        args.push(user.as_bytes());
    }
    args.push(password);
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A status reply: `+OK` or `-ERR ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Ok(String),
    Err(String),
}

/// One simple-string or error reply at the head of `buf` (bytes from Redis: fuzzed,
/// `fuzz/fuzz_targets/redis.rs`): `Ok(None)` until its line is complete,
/// `Err` when it is not such a reply or is longer than [`MAX_REPLY`].
pub fn parse_status(buf: &[u8]) -> Result<Option<(Status, usize)>, String> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > MAX_REPLY {
            return Err(format!("a reply line longer than {MAX_REPLY} bytes"));
        }
        return Ok(None);
    };
    if end > MAX_REPLY {
        return Err(format!("a reply line longer than {MAX_REPLY} bytes"));
    }
    let text = String::from_utf8_lossy(&buf[1..end.max(1)]).into_owned();
    let status = match buf.first() {
        Some(b'+') => Status::Ok(text),
        Some(b'-') => Status::Err(text),
        _ => return Err("the reply to AUTH is not a status line".into()),
    };
    Ok(Some((status, end + 2)))
}

/// Authenticates `s` within `timeout`; `Err` says why in one line (Redis's own error, which
/// never repeats the password).
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    creds: &Credentials,
    timeout: Duration,
) -> Result<(), String> {
    let password = creds.password()?;
    let exchange = async {
        s.write_all(&auth_command(creds.user.as_deref(), &password))
            .await
            .map_err(|e| format!("sending AUTH failed: {e}"))?;
        let mut buf = Vec::with_capacity(64);
        let mut chunk = [0u8; 256];
        loop {
            if let Some((status, used)) = parse_status(&buf)? {
                if used != buf.len() {
                    // AUTH has one reply: anything more is not Redis answering us.
                    return Err("more than one reply to AUTH".into());
                }
                return match status {
                    Status::Ok(_) => Ok(()),
                    Status::Err(e) => Err(e),
                };
            }
            let n = s
                .read(&mut chunk)
                .await
                .map_err(|e| format!("reading the reply to AUTH failed: {e}"))?;
            if n == 0 {
                return Err("Redis closed the connection before answering AUTH".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(format!("no reply to AUTH within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_commands_are_resp_arrays() {
        assert_eq!(
            auth_command(None, b"s3cret"),
            b"*2\r\n$4\r\nAUTH\r\n$6\r\ns3cret\r\n"
        );
        assert_eq!(
            auth_command(Some("app"), b"p w"),
            b"*3\r\n$4\r\nAUTH\r\n$3\r\napp\r\n$3\r\np w\r\n"
        );
    }

    #[test]
    fn status_lines_parse_and_everything_else_is_refused() {
        assert_eq!(
            parse_status(b"+OK\r\n").unwrap(),
            Some((Status::Ok("OK".into()), 5))
        );
        assert_eq!(
            parse_status(b"-WRONGPASS invalid\r\n").unwrap(),
            Some((Status::Err("WRONGPASS invalid".into()), 20))
        );
        assert_eq!(parse_status(b"+OK").unwrap(), None);
        assert_eq!(parse_status(b"").unwrap(), None);
        assert!(parse_status(b":1\r\n").is_err());
        assert!(parse_status(&vec![b'+'; MAX_REPLY + 2]).is_err());
        assert_eq!(
            parse_status(b"\r\n").unwrap_err(),
            "the reply to AUTH is not a status line"
        );
    }

    #[test]
    fn a_password_file_must_be_private_and_loses_its_newline() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let creds = Credentials {
            user: None,
            password: PasswordSource::File(path.clone()),
        };
        let e = creds.password().unwrap_err();
        assert!(e.contains("chmod 600") && !e.contains("s3cret"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(creds.password().unwrap(), b"s3cret");
    }
}
