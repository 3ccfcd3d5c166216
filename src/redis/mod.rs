//! Redis: what an ambassador says to Redis itself before the consumer's bytes, and what a
//! check asks it.
//!
//! In: a connected stream to Redis and the route's [`Settings`]. Out: [`prepare`] readies the
//! stream for a consumer, in one round trip where HELLO serves: it authenticates (`AUTH
//! [user] password`, or `HELLO n AUTH user password`), learns the role when only a master
//! will do, and swallows the replies; or it says why not ([`Refusal`]), in one line without
//! the secret. [`probe`] is a role check's look (role, and a master's replicas).
//!
//! The secret is read from its file (mode 0600 checked) or environment variable for each
//! connection, so a changed file is used at once and the secret is held nowhere else: not in
//! the config, a log line or `/_status`. The replies are read by the bounded [`resp`] reader;
//! the consumer's own leading AUTH is [`leading`]'s.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub mod leading;
pub mod resp;

/// The largest reply read from Redis while readying a connection or checking it.
pub const MAX_REPLY: usize = 64 * 1024;

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

/// What a route does as a Redis route (`protocol = "redis"`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settings {
    /// Sent before the consumer's bytes, if any.
    pub credentials: Option<Credentials>,
    /// Authenticate with `HELLO n AUTH user password` (switching the connection to RESP n)
    /// instead of `AUTH`.
    pub hello: Option<u8>,
    /// What happens to the consumer's own leading `AUTH` and `HELLO ... AUTH`.
    pub consumer_auth: ConsumerAuth,
    /// Only a master takes connections (`require_role = "master"`).
    pub require_master: bool,
}

impl Settings {
    /// Whether a connection needs anything said to Redis before the consumer's bytes.
    pub fn prepares(&self) -> bool {
        self.credentials.is_some() || self.require_master
    }
}

/// The consumer's own `AUTH` (and the `AUTH` of its `HELLO`) before its first other command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsumerAuth {
    /// Relayed to Redis as sent: the relay is a byte copy from the start.
    #[default]
    Pass,
    /// Answered by the ambassador: `AUTH` gets `+OK` without reaching Redis, and `HELLO`
    /// reaches it without its `AUTH` part. The ambassador's credentials are the ones used.
    Local,
}

impl std::str::FromStr for ConsumerAuth {
    type Err = String;
    fn from_str(s: &str) -> Result<ConsumerAuth, String> {
        match s {
            "pass" => Ok(ConsumerAuth::Pass),
            "local" => Ok(ConsumerAuth::Local),
            _ => Err(format!(
                "--redis-consumer-auth {s:?}: write pass (relay the consumer's AUTH) or local (answer it here)"
            )),
        }
    }
}

/// Why a connection to Redis was not made ready for a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Redis refused the credentials (or wanted some and there are none).
    Auth(String),
    /// `require_role = "master"` and this Redis is not one.
    NotMaster(String),
    /// It did not answer as Redis does.
    Failed(String),
}

/// A Redis's role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Master,
    Replica,
    Other(String),
}

impl Role {
    fn from_name(name: &str) -> Role {
        match name {
            "master" => Role::Master,
            "slave" | "replica" => Role::Replica,
            other => Role::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Role::Master => "master",
            Role::Replica => "replica",
            Role::Other(s) => s,
        }
    }
}

/// What a check learnt of a Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub role: Role,
    /// A master's connected replicas, when it would say (`ROLE` or `INFO` allowed).
    pub replicas: Option<usize>,
}

/// A connection to Redis (or a Sentinel) that sends commands and reads replies.
pub struct Conn<'a, S> {
    s: &'a mut S,
    buf: Vec<u8>,
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin> Conn<'a, S> {
    pub fn new(s: &'a mut S) -> Conn<'a, S> {
        Conn { s, buf: Vec::new() }
    }

    /// Sends a command without waiting for its reply.
    pub async fn send(&mut self, args: &[&[u8]]) -> Result<(), String> {
        self.s
            .write_all(&resp::command(args))
            .await
            .map_err(|e| format!("sending {} failed: {e}", String::from_utf8_lossy(args[0])))
    }

    /// The next value Redis sends (a reply, or a published message).
    pub async fn next(&mut self) -> Result<resp::Value, String> {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some((v, used)) = resp::parse(&self.buf, MAX_REPLY).map_err(|e| e.0)? {
                self.buf.drain(..used);
                return Ok(v);
            }
            let n = self
                .s
                .read(&mut chunk)
                .await
                .map_err(|e| format!("reading from Redis failed: {e}"))?;
            if n == 0 {
                return Err("the connection closed".into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends `command` and reads its one reply (nothing may follow it).
    pub async fn request(&mut self, args: &[&[u8]]) -> Result<resp::Value, String> {
        self.send(args).await?;
        let name = String::from_utf8_lossy(args[0]);
        let reply = self
            .next()
            .await
            .map_err(|e| format!("waiting for the reply to {name}: {e}"))?;
        if !self.buf.is_empty() {
            return Err(format!("more than one reply to {name}"));
        }
        Ok(reply)
    }
}

/// An error reply's text.
fn error_text(e: &[u8]) -> String {
    String::from_utf8_lossy(e).into_owned()
}

/// An error that means "this Redis does not offer HELLO to this user": try the older way.
fn try_older(e: &str) -> bool {
    e.starts_with("ERR unknown command") || e.starts_with("NOPERM")
}

/// `HELLO proto [AUTH user password]`.
fn hello(proto: u8, creds: Option<(&str, &[u8])>) -> Vec<Vec<u8>> {
    let mut args = vec![b"HELLO".to_vec(), proto.to_string().into_bytes()];
    if let Some((user, password)) = creds {
        args.extend([
            b"AUTH".to_vec(),
            user.as_bytes().to_vec(),
            password.to_vec(),
        ]);
    }
    args
}

fn refs(args: &[Vec<u8>]) -> Vec<&[u8]> {
    args.iter().map(Vec::as_slice).collect()
}

/// Readies a connection to Redis for a consumer, within `timeout`: authenticates, and with
/// `require_master` learns the role. One round trip when HELLO serves (it authenticates and
/// tells the role at once); `ROLE`, then `INFO replication`, for a Redis or a user without it.
pub async fn prepare<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    settings: &Settings,
    timeout: Duration,
) -> Result<(), Refusal> {
    let work = async {
        let role = handshake(s, settings).await?;
        match role {
            Some(Role::Master) | None => Ok(()),
            Some(role) => Err(Refusal::NotMaster(format!(
                "Redis is {}, not master",
                role.as_str()
            ))),
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(Refusal::Failed(format!(
            "no reply from Redis within {timeout:?}"
        ))),
    }
}

/// Authenticates as `settings` say and, with `require_master`, returns the role.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    settings: &Settings,
) -> Result<Option<Role>, Refusal> {
    let password = match &settings.credentials {
        Some(c) => Some(c.password().map_err(Refusal::Auth)?),
        None => None,
    };
    let creds = settings
        .credentials
        .as_ref()
        .zip(password.as_deref())
        .map(|(c, p)| (c.user.as_deref().unwrap_or("default"), p));
    let mut conn = Conn { s, buf: Vec::new() };
    let failed = Refusal::Failed;
    if settings.require_master || settings.hello.is_some() {
        let args = hello(settings.hello.unwrap_or(2), creds);
        match conn.request(&refs(&args)).await.map_err(failed)? {
            resp::Value::Error(e) if !try_older(&error_text(&e)) => {
                return Err(Refusal::Auth(error_text(&e)));
            }
            resp::Value::Error(_) => {
                // No HELLO here: AUTH, then the role the older ways.
                if let Some((user, password)) = creds {
                    auth(&mut conn, user, settings.credentials.as_ref(), password).await?;
                }
            }
            reply => {
                let role = reply.field("role").and_then(resp::Value::text);
                if settings.require_master {
                    return match role {
                        Some(r) => Ok(Some(Role::from_name(&r))),
                        None => Err(failed("HELLO's reply names no role".into())),
                    };
                }
                return Ok(None);
            }
        }
    } else if let Some((user, password)) = creds {
        auth(&mut conn, user, settings.credentials.as_ref(), password).await?;
    }
    if !settings.require_master {
        return Ok(None);
    }
    let probe = older_probe(&mut conn).await.map_err(failed)?;
    Ok(Some(probe.role))
}

/// `AUTH [user] password`: `+OK` or the refusal.
async fn auth<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<'_, S>,
    user: &str,
    creds: Option<&Credentials>,
    password: &[u8],
) -> Result<(), Refusal> {
    let mut args: Vec<&[u8]> = vec![b"AUTH"];
    if creds.is_some_and(|c| c.user.is_some()) {
        args.push(user.as_bytes());
    }
    args.push(password);
    match conn.request(&args).await.map_err(Refusal::Failed)? {
        resp::Value::Simple(_) => Ok(()),
        resp::Value::Error(e) => Err(Refusal::Auth(error_text(&e))),
        _ => Err(Refusal::Failed("the reply to AUTH is not a status".into())),
    }
}

/// The role and replicas by `ROLE`, then by `INFO replication`.
async fn older_probe<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<'_, S>,
) -> Result<Probe, String> {
    let role = conn.request(&[b"ROLE"]).await?;
    if let Some(p) = parse_role(&role) {
        return Ok(p);
    }
    let info = conn.request(&[b"INFO", b"replication"]).await?;
    match &info {
        resp::Value::Bulk(text) => parse_info(text).ok_or_else(|| "INFO names no role".into()),
        resp::Value::Error(e) => Err(format!(
            "neither ROLE nor INFO is allowed: {}",
            error_text(e)
        )),
        _ => Err("INFO's reply is not text".into()),
    }
}

/// `ROLE`'s reply: `["master", offset, [[ip, port, offset], ...]]`, `["slave", ...]`.
pub fn parse_role(v: &resp::Value) -> Option<Probe> {
    let resp::Value::Array(items) = v else {
        return None;
    };
    let role = Role::from_name(&items.first()?.text()?);
    let replicas = match (&role, items.get(2)) {
        (Role::Master, Some(resp::Value::Array(r))) => Some(r.len()),
        _ => None,
    };
    Some(Probe { role, replicas })
}

/// `INFO replication`'s text: `role:master` and `connected_slaves:N`.
pub fn parse_info(text: &[u8]) -> Option<Probe> {
    let text = String::from_utf8_lossy(text);
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
            .map(str::trim)
    };
    let role = Role::from_name(field("role")?);
    let replicas = field("connected_slaves").and_then(|n| n.parse().ok());
    Some(Probe {
        role: role.clone(),
        replicas: (role == Role::Master).then_some(replicas).flatten(),
    })
}

/// A health check's look at a Redis: authenticates if it must, learns the role by HELLO and,
/// for a master, its replicas by `ROLE` (or `INFO replication`) where allowed.
pub async fn probe<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    settings: &Settings,
    timeout: Duration,
) -> Result<Probe, String> {
    let work = async {
        let check = Settings {
            require_master: true,
            hello: None,
            ..settings.clone()
        };
        let why = |r: Refusal| match r {
            Refusal::Auth(e) => format!("authentication failed: {e}"),
            Refusal::NotMaster(e) | Refusal::Failed(e) => e,
        };
        let role = handshake(s, &check)
            .await
            .map_err(why)?
            .unwrap_or(Role::Master);
        if role != Role::Master {
            return Ok(Probe {
                role,
                replicas: None,
            });
        }
        let mut conn = Conn { s, buf: Vec::new() };
        // Replicas tell a master in charge from one left behind; unknown when not allowed.
        Ok(older_probe(&mut conn).await.unwrap_or(Probe {
            role: Role::Master,
            replicas: None,
        }))
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| Err(format!("no reply from Redis within {timeout:?}")))
}
#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn roles_from_role_and_info() {
        let master = resp::parse(b"*3\r\n$6\r\nmaster\r\n:10\r\n*1\r\n*3\r\n$9\r\n127.0.0.1\r\n$4\r\n6380\r\n$2\r\n10\r\n", 4096)
            .unwrap()
            .unwrap()
            .0;
        assert_eq!(
            parse_role(&master),
            Some(Probe {
                role: Role::Master,
                replicas: Some(1)
            })
        );
        let replica = resp::parse(
            b"*5\r\n$5\r\nslave\r\n$9\r\n127.0.0.1\r\n:6379\r\n$9\r\nconnected\r\n:10\r\n",
            4096,
        )
        .unwrap()
        .unwrap()
        .0;
        assert_eq!(parse_role(&replica).unwrap().role, Role::Replica);
        assert_eq!(parse_role(&resp::Value::Int(1)), None);
        let info = b"# Replication\r\nrole:master\r\nconnected_slaves:2\r\n";
        assert_eq!(
            parse_info(info),
            Some(Probe {
                role: Role::Master,
                replicas: Some(2)
            })
        );
        assert_eq!(parse_info(b"role:slave\r\n").unwrap().role, Role::Replica);
        assert_eq!(parse_info(b"nothing"), None);
    }

    /// Plays Redis on the far end of a pipe: answers each command with the next reply.
    async fn fake_redis(
        replies: Vec<&'static [u8]>,
    ) -> (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<Vec<Vec<u8>>>,
    ) {
        let (near, mut far) = tokio::io::duplex(1 << 16);
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut buf = Vec::new();
            for reply in replies {
                let (v, used) = loop {
                    if let Some(found) = resp::parse(&buf, 1 << 16).unwrap() {
                        break found;
                    }
                    let mut chunk = [0u8; 512];
                    let n = far.read(&mut chunk).await.unwrap();
                    assert!(n > 0, "closed before the next command");
                    buf.extend_from_slice(&chunk[..n]);
                };
                buf.drain(..used);
                seen.push(resp::as_command(&v).unwrap().join(&b' '));
                far.write_all(reply).await.unwrap();
            }
            seen
        });
        (near, task)
    }

    fn env_creds(var: &str, user: Option<&str>) -> Credentials {
        // SAFETY: each test sets a variable of its own name.
        unsafe { std::env::set_var(var, "pw") };
        Credentials {
            user: user.map(str::to_string),
            password: PasswordSource::Env(var.into()),
        }
    }

    #[tokio::test]
    async fn one_round_trip_authenticates_and_learns_the_role() {
        let settings = Settings {
            credentials: Some(env_creds("LEGATE_TEST_PW_1", Some("app"))),
            require_master: true,
            ..Settings::default()
        };
        let (mut s, redis) = fake_redis(vec![b"%1\r\n$4\r\nrole\r\n$7\r\nreplica\r\n"]).await;
        let r = prepare(&mut s, &settings, Duration::from_secs(5)).await;
        assert_eq!(
            r,
            Err(Refusal::NotMaster("Redis is replica, not master".into()))
        );
        assert_eq!(redis.await.unwrap(), [b"HELLO 2 AUTH app pw".to_vec()]);

        let (mut s, redis) =
            fake_redis(vec![b"-WRONGPASS invalid username-password pair\r\n"]).await;
        let r = prepare(&mut s, &settings, Duration::from_secs(5)).await;
        assert!(matches!(r, Err(Refusal::Auth(e)) if e.starts_with("WRONGPASS")));
        redis.await.unwrap();
    }

    #[tokio::test]
    async fn without_hello_it_falls_back_to_auth_role_and_info() {
        let settings = Settings {
            credentials: Some(env_creds("LEGATE_TEST_PW_2", None)),
            require_master: true,
            ..Settings::default()
        };
        let (mut s, redis) = fake_redis(vec![
            b"-ERR unknown command 'HELLO'\r\n",
            b"+OK\r\n",
            b"-NOPERM this user has no permissions to run the 'role' command\r\n",
            b"$33\r\nrole:master\r\nconnected_slaves:0\r\n\r\n",
        ])
        .await;
        assert_eq!(
            prepare(&mut s, &settings, Duration::from_secs(5)).await,
            Ok(())
        );
        let seen = redis.await.unwrap();
        assert_eq!(seen[1], b"AUTH pw");
        assert_eq!(seen[3], b"INFO replication");
        // Credentials alone: AUTH, one round trip.
        let plain = Settings {
            require_master: false,
            ..settings
        };
        let (mut s, redis) = fake_redis(vec![b"+OK\r\n"]).await;
        assert_eq!(
            prepare(&mut s, &plain, Duration::from_secs(5)).await,
            Ok(())
        );
        assert_eq!(redis.await.unwrap(), [b"AUTH pw".to_vec()]);
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
