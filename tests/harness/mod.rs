//! Test harness: real certificates, a real redis-server, the real `legate` binary, loopback
//! ports chosen at run time, and polling with deadlines instead of sleeps.

#![allow(dead_code)] // each test file uses a different part of the harness

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use legate::certs::{Ca, KeyType, LeafSpec, Usage, Validity};

/// How long any wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// A port nobody listens on right now (for services that cannot bind port 0 and report it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A CA and leaves in a temporary directory, issued by legate's own certs module.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
}

/// A certificate and key on disk.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The serial number, when this leaf was just issued.
    pub serial: Vec<u8>,
}

impl Pki {
    /// A CA with a server leaf (`server`: localhost, 127.0.0.1) and a client leaf (`client`).
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        // A distinct name per CA, as separately made CAs have in life.
        let name = format!("test CA {}", dir.path().display());
        let ca = Ca::generate(&name, KeyType::EcdsaP256, Validity::days(30)).unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
        let pki = Pki { dir, ca };
        let mut server = LeafSpec::new("server", Usage::Server);
        server.names = vec!["localhost".into(), "127.0.0.1".into()];
        pki.issue("server", &server);
        pki.issue("client", &LeafSpec::new("client", Usage::Client));
        pki
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// `redis.pw` holding `secret` (and a trailing newline, as `echo` writes it), with `mode`.
    pub fn password_file(&self, secret: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.path("redis.pw");
        std::fs::write(&path, format!("{secret}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    /// Issues a leaf and writes `NAME.crt` / `NAME.key`.
    pub fn issue(&self, name: &str, spec: &LeafSpec) -> Leaf {
        let issued = self.ca.issue(spec).unwrap();
        let mut leaf = self.leaf(name);
        std::fs::write(&leaf.cert, issued.cert_pem).unwrap();
        legate::certs::write_file(&leaf.key, &issued.key_pem, true, true).unwrap();
        leaf.serial = issued.serial;
        leaf
    }

    pub fn leaf(&self, name: &str) -> Leaf {
        Leaf {
            cert: self.path(&format!("{name}.crt")),
            key: self.path(&format!("{name}.key")),
            serial: Vec::new(),
        }
    }

    /// `cert = …`, `key = …` and `cacert = …` lines of a config file, for leaf `name`.
    pub fn toml_files(&self, name: &str) -> String {
        let l = self.leaf(name);
        format!(
            "cert = {:?}\nkey = {:?}\ncacert = {:?}\n",
            l.cert.display().to_string(),
            l.key.display().to_string(),
            self.ca_cert().display().to_string()
        )
    }

    /// `--cert=… --key=… --cacert=…` for leaf `name`.
    pub fn flags(&self, name: &str) -> Vec<String> {
        let leaf = self.leaf(name);
        vec![
            format!("--cert={}", leaf.cert.display()),
            format!("--key={}", leaf.key.display()),
            format!("--cacert={}", self.ca_cert().display()),
        ]
    }
}

/// Lines a child process writes to stderr, shared with the test.
#[derive(Clone, Default)]
pub struct Log {
    inner: Arc<(Mutex<Vec<String>>, Condvar)>,
    /// Set once the process's stderr reached EOF: every line has been read.
    ended: Arc<std::sync::atomic::AtomicBool>,
}

impl Log {
    fn follow(&self, stream: impl Read + Send + 'static) {
        let log = self.clone();
        thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let (lines, cv) = &*log.inner;
                lines.lock().unwrap().push(line);
                cv.notify_all();
            }
            log.ended.store(true, Ordering::SeqCst);
        });
    }

    pub fn text(&self) -> String {
        let lines = self.inner.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.join("\n")
    }

    /// Waits for a line containing every one of `needles`, and returns it.
    pub fn wait_for(&self, needles: &[&str]) -> String {
        let (lines, cv) = &*self.inner;
        let end = Instant::now() + DEADLINE;
        let mut guard = lines.lock().unwrap();
        loop {
            if let Some(l) = guard.iter().find(|l| needles.iter().all(|n| l.contains(n))) {
                return l.clone();
            }
            let now = Instant::now();
            if now >= end {
                let text = guard.join("\n");
                drop(guard); // a poisoned log would hide this message behind another panic
                panic!("no log line with {needles:?} within {DEADLINE:?}; log so far:\n{text}");
            }
            guard = cv.wait_timeout(guard, end - now).unwrap().0;
        }
    }

    pub fn count(&self, needles: &[&str]) -> usize {
        self.inner
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }
}

/// The real `legate` binary.
pub struct Legate {
    child: Child,
    pub log: Log,
    /// Tunnel name → the TCP address it listens on.
    pub addrs: HashMap<String, SocketAddr>,
    /// Tunnel name → what it listens on, as logged (TCP or `unix:PATH`).
    pub listens: HashMap<String, String>,
    exited: Option<ExitStatus>,
}

pub fn legate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_legate")
}

impl Legate {
    /// Starts `legate ARGS` and waits until `tunnels` listeners report their addresses.
    pub fn start(args: &[String], tunnels: usize) -> Legate {
        Legate::start_with_env(args, tunnels, &[])
    }

    /// [`Legate::start`] with extra environment variables.
    pub fn start_with_env(args: &[String], tunnels: usize, env: &[(&str, &str)]) -> Legate {
        let mut cmd = Command::new(legate_bin());
        cmd.args(args).envs(env.iter().copied());
        Legate::spawn(cmd, tunnels)
    }

    /// [`Legate::start`] with at most `nofile` open file descriptors (RLIMIT_NOFILE).
    pub fn start_with_fd_limit(args: &[String], tunnels: usize, nofile: u64) -> Legate {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(legate_bin());
        cmd.args(args);
        // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: nofile,
                    rlim_max: nofile,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Legate::spawn(cmd, tunnels)
    }

    pub fn spawn(mut cmd: Command, tunnels: usize) -> Legate {
        let mut child = cmd
            .env("RUST_LOG", "info,legate=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn legate");
        let log = Log::default();
        log.follow(child.stderr.take().unwrap());
        let mut me = Legate {
            child,
            log,
            addrs: HashMap::new(),
            listens: HashMap::new(),
            exited: None,
        };
        eventually("legate to listen", DEADLINE, || {
            if let Ok(Some(status)) = me.child.try_wait() {
                panic!(
                    "legate exited with {status} before listening:\n{}",
                    me.log.text()
                );
            }
            (me.log.count(&["INFO listening"]) >= tunnels).then_some(())
        });
        for line in me
            .log
            .text()
            .lines()
            .filter(|l| l.contains("INFO listening"))
        {
            let name = field(line, "tunnel").unwrap();
            let listen = field(line, "listen").unwrap();
            if let Ok(addr) = listen.parse() {
                me.addrs.insert(name.clone(), addr);
            }
            me.listens.insert(name, listen);
        }
        me
    }

    /// `legate server` on a port chosen by the kernel, with the common flags and `extra`.
    pub fn server(pki: &Pki, target: &str, extra: &[&str]) -> Legate {
        let mut args = vec![
            "server".to_string(),
            "--listen=127.0.0.1:0".into(),
            format!("--target={target}"),
        ];
        args.extend(pki.flags("server"));
        args.extend(extra.iter().map(|s| s.to_string()));
        Legate::start(&args, 1)
    }

    /// `legate client` toward `server`, authenticating as leaf `leaf` of `pki`.
    pub fn client(pki: &Pki, leaf: &str, server: SocketAddr, extra: &[&str]) -> Legate {
        let mut args = vec![
            "client".to_string(),
            "--listen=127.0.0.1:0".into(),
            format!("--target=localhost:{}", server.port()),
        ];
        args.extend(pki.flags(leaf));
        args.extend(extra.iter().map(|s| s.to_string()));
        Legate::start(&args, 1)
    }

    /// The address of the only tunnel.
    pub fn addr(&self) -> SocketAddr {
        assert_eq!(self.addrs.len(), 1, "addr() is for single-tunnel processes");
        *self.addrs.values().next().unwrap()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// How many file descriptors the process has open.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// How many threads the process runs.
    pub fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .unwrap()
            .count()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for the process to exit, and for its last log lines to be read.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let status = eventually("legate to exit", timeout, || self.child.try_wait().unwrap());
        self.exited = Some(status);
        eventually("the end of legate's log", timeout, || {
            self.log.ended.load(Ordering::SeqCst).then_some(())
        });
        status
    }
}

impl Drop for Legate {
    fn drop(&mut self) {
        if self.exited.is_some() {
            return;
        }
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if thread::panicking() {
            eprintln!("--- legate log ---\n{}", self.log.text());
        }
    }
}

/// The value of `name=value` in a tracing text line (quotes stripped).
pub fn field(line: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=");
    let start = line.find(&key)? + key.len();
    let rest = &line[start..];
    if let Some(quoted) = rest.strip_prefix('"') {
        Some(quoted[..quoted.find('"')?].to_string())
    } else {
        Some(rest.split_whitespace().next()?.to_string())
    }
}

/// A real redis-server on loopback; killed on drop.
pub struct Redis {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// A redis-server with `extra` options (e.g. `--requirepass`), ready when it answers PING
    /// (with PONG, or asking for authentication).
    pub fn start_with(extra: &[&str]) -> Redis {
        let bin = "redis-server";
        for _ in 0..5 {
            let port = free_port();
            let dir = tempfile::tempdir().unwrap();
            let mut child = Command::new(bin)
                .args(["--port", &port.to_string()])
                .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(dir.path())
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot run {bin}: {e}; install it (apt-get install redis-server)")
                });
            let ready = eventually("redis to answer or exit", DEADLINE, || {
                if let Ok(Some(_)) = child.try_wait() {
                    return Some(false); // lost the port race; try another
                }
                let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
                resp(&mut s, &[b"PING"]).ok().map(|r| match r {
                    Reply::Simple(pong) => pong == "PONG",
                    Reply::Error(e) => e.starts_with("NOAUTH"),
                    _ => false,
                })
            });
            if ready {
                return Redis {
                    child,
                    port,
                    _dir: dir,
                };
            }
        }
        panic!("redis-server did not start on any of 5 ports");
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    /// A redis-server that also speaks TLS, with `pki`'s server certificate, requiring client
    /// certificates from its CA and the password `password`; and its TLS port.
    pub fn start_tls(pki: &Pki, password: &str) -> (Redis, u16) {
        let tls_port = free_port();
        let leaf = pki.leaf("server");
        let (cert, key, ca) = (
            leaf.cert.display().to_string(),
            leaf.key.display().to_string(),
            pki.ca_cert().display().to_string(),
        );
        let redis = Redis::start_with(&[
            "--requirepass",
            password,
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            "yes",
        ]);
        (redis, tls_port)
    }

    /// Sends one command on a fresh connection.
    pub fn command(&self, args: &[&str]) -> Reply {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        resp(&mut s, &args).unwrap()
    }
}

/// The port a Redis behind `addr` listens on, asked through a fresh connection (which Redis a
/// route reached).
pub fn reached_port(addr: SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    match resp(&mut s, &[b"CONFIG", b"GET", b"port"]).ok()? {
        Reply::Array(kv) => match kv.get(1) {
            Some(Reply::Bulk(Some(p))) => String::from_utf8_lossy(p).parse().ok(),
            _ => None,
        },
        _ => None,
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

/// Sends one command and reads its reply.
pub fn resp(s: &mut TcpStream, args: &[&[u8]]) -> std::io::Result<Reply> {
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        req.extend_from_slice(a);
        req.extend_from_slice(b"\r\n");
    }
    s.write_all(&req)?;
    read_reply(&mut BufReader::new(s))
}

fn read_reply(r: &mut impl BufRead) -> std::io::Result<Reply> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let body = line.trim_end_matches("\r\n");
    let (kind, rest) = body.split_at(1);
    Ok(match kind {
        "+" => Reply::Simple(rest.into()),
        "-" => Reply::Error(rest.into()),
        ":" => Reply::Int(rest.parse().unwrap()),
        "$" => {
            let len: i64 = rest.parse().unwrap();
            if len < 0 {
                Reply::Bulk(None)
            } else {
                let mut buf = vec![0; len as usize + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(len as usize);
                Reply::Bulk(Some(buf))
            }
        }
        "*" | "%" => {
            // A RESP3 map (HELLO 3's reply) reads as its keys and values in a row.
            let n: usize = rest.parse().unwrap();
            let n = if kind == "%" { n * 2 } else { n };
            Reply::Array((0..n).map(|_| read_reply(r)).collect::<Result<_, _>>()?)
        }
        other => panic!("unexpected RESP type {other:?} in {line:?}"),
    })
}

/// The distinct peer addresses in a server's "connection closed" lines: each stream is logged
/// with its TLS connection's peer, so this is the TLS connections that carried streams.
pub fn stream_peers(log: &Log) -> Vec<String> {
    let mut peers: Vec<String> = log
        .text()
        .lines()
        .filter(|l| l.contains("connection closed"))
        .map(|l| field(l, "peer").unwrap())
        .collect();
    peers.sort();
    peers.dedup();
    peers
}

/// Connects with a read timeout, so a broken tunnel fails the test instead of hanging it.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A TCP backend that records what each connection sent; counts connections.
pub struct Backend {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
}

impl Backend {
    /// Runs `handler` on each accepted connection in its own thread.
    pub fn start(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> Backend {
        Backend::start_on(TcpListener::bind("127.0.0.1:0").unwrap(), handler)
    }

    /// [`Backend::start`] on a listener bound already (a port chosen before).
    pub fn start_on(
        listener: TcpListener,
        handler: impl Fn(TcpStream) + Send + Sync + 'static,
    ) -> Backend {
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let handler = Arc::new(handler);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                count.fetch_add(1, Ordering::SeqCst);
                let h = handler.clone();
                thread::spawn(move || h(stream));
            }
        });
        Backend { addr, accepted }
    }

    /// A backend that writes `tag` followed by everything it receives (an echo).
    pub fn echo(tag: &'static [u8]) -> Backend {
        Backend::echo_on(TcpListener::bind("127.0.0.1:0").unwrap(), tag)
    }

    /// [`Backend::echo`] on a listener bound already.
    pub fn echo_on(listener: TcpListener, tag: &'static [u8]) -> Backend {
        Backend::start_on(listener, move |mut s| {
            if s.write_all(tag).is_err() {
                return;
            }
            let mut buf = [0u8; 16 * 1024];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = s.shutdown(Shutdown::Write);
        })
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn target(&self) -> String {
        self.addr.to_string()
    }
}

/// Reads until EOF (bounded by the stream's read timeout).
pub fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read to EOF");
    out
}

/// Connects to `addr`, sends `msg`, half-closes, and returns everything read until the
/// connection closes: one request and its whole reply.
pub fn exchange(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    let mut s = connect(addr);
    s.write_all(msg).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    read_until_closed(&mut s)
}

/// Runs `legate ARGS`, which must refuse to start: exit 2. Returns what it wrote to stderr.
pub fn refused_at_startup(args: &[String]) -> String {
    let out = Command::new(legate_bin()).args(args).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Reads until the tunnel closes the connection. A connection closed with our request unread
/// may end in a reset instead of a FIN; both count as closed.
pub fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out) {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }
    out
}

/// Writes a config file into `dir`.
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("legate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// An HTTP response from a status listener.
#[derive(Debug)]
pub struct HttpReply {
    pub code: u16,
    pub body: String,
    /// The certificate the server presented (HTTPS only).
    pub cert: Option<Vec<u8>>,
}

/// `GET path` from a status listener: plain HTTP, or HTTPS verified against `ca` for the name
/// "localhost".
pub fn http_get(addr: SocketAddr, path: &str, ca: Option<&Path>) -> HttpReply {
    use rustls::pki_types::pem::PemObject;
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let tcp = connect(addr);
    let (raw, cert) = match ca {
        None => {
            let mut tcp = tcp;
            tcp.write_all(request.as_bytes()).unwrap();
            (read_all(&mut tcp), None)
        }
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
            let config = rustls::ClientConfig::builder_with_provider(legate::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let conn = rustls::ClientConnection::new(
                std::sync::Arc::new(config),
                "localhost".try_into().unwrap(),
            )
            .unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            tls.write_all(request.as_bytes()).unwrap();
            let mut raw = Vec::new();
            let _ = tls.read_to_end(&mut raw);
            let cert = tls
                .conn
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec());
            (raw, cert)
        }
    };
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    HttpReply {
        code,
        body: body.to_string(),
        cert,
    }
}

/// `openssl pkcs12 -export` of leaf `name`, with `extra` options; returns the file.
pub fn pkcs12(pki: &Pki, name: &str, password: &str, extra: &[&str], file: &str) -> PathBuf {
    let leaf = pki.leaf(name);
    let out = pki.path(file);
    let status = Command::new("openssl")
        .args(["pkcs12", "-export"])
        .args(extra)
        .arg("-in")
        .arg(&leaf.cert)
        .arg("-inkey")
        .arg(&leaf.key)
        .arg("-passout")
        .arg(format!("pass:{password}"))
        .arg("-out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success(), "openssl pkcs12 -export {extra:?} failed");
    out
}

/// Connects through `addr` every 5 ms until `stop`, sending "x" and expecting a one-byte tag
/// and the echo (`Backend::echo` with a one-byte tag); counts answers by their tag, and the
/// connections that failed. `done` counts attempts as they finish.
pub fn steady_consumers(
    addr: SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    done: Arc<AtomicUsize>,
) -> std::thread::JoinHandle<(std::collections::BTreeMap<u8, usize>, Vec<String>)> {
    std::thread::spawn(move || {
        let (mut answers, mut failures) = (std::collections::BTreeMap::new(), Vec::new());
        while !stop.load(Ordering::SeqCst) {
            let attempt = (|| -> std::io::Result<Vec<u8>> {
                let mut s = TcpStream::connect(addr)?;
                s.set_read_timeout(Some(DEADLINE))?;
                s.write_all(b"x")?;
                s.shutdown(Shutdown::Write)?;
                let mut out = Vec::new();
                s.read_to_end(&mut out)?;
                Ok(out)
            })();
            match attempt {
                Ok(out) if out.len() == 2 => *answers.entry(out[0]).or_insert(0) += 1,
                Ok(out) => failures.push(format!("answer {out:?}")),
                Err(e) => failures.push(e.to_string()),
            }
            done.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(5));
        }
        (answers, failures)
    })
}

/// The DER of the first certificate in a PEM file.
pub fn cert_der(path: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(path)
        .unwrap()
        .to_vec()
}

/// The `legate_open_connections` gauge of a legate with a plain-HTTP status listener.
pub fn open_connections(legate: &Legate) -> i64 {
    let body = http_get(status_addr(legate), "/_metrics/prometheus", None).body;
    body.lines()
        .filter(|l| l.starts_with("legate_open_connections{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<i64>().unwrap())
        .sum()
}

/// ghostunnel's metrics list (`/_metrics`, or `path`) from a plain-HTTP status listener, as
/// name → value; every entry checked for ghostunnel's four keys.
pub fn ghost_metrics(addr: SocketAddr, path: &str) -> std::collections::BTreeMap<String, f64> {
    let reply = http_get(addr, path, None);
    assert_eq!(reply.code, 200, "{}", reply.body);
    let list: Vec<serde_json::Value> = serde_json::from_str(&reply.body).unwrap();
    list.iter()
        .map(|m| {
            assert!(m["timestamp"].is_i64() && m["hostname"].is_string(), "{m}");
            let name = m["metric"].as_str().unwrap().to_string();
            (name, m["value"].as_f64().unwrap())
        })
        .collect()
}

/// The address the status listener reported in the log.
pub fn status_addr(legate: &Legate) -> SocketAddr {
    let line = legate.log.wait_for(&["status listening"]);
    let url = field(&line, "status").unwrap();
    url.split("://").nth(1).unwrap().parse().unwrap()
}

/// A TLS client speaking for leaf `leaf` of `pki` to `addr` (as "localhost"), offering `alpn`:
/// for tests that play a misbehaving peer by hand.
pub fn tls_connect(
    pki: &Pki,
    leaf: &str,
    addr: SocketAddr,
    alpn: &[&[u8]],
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(pki.ca_cert()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let l = pki.leaf(leaf);
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(&l.cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&l.key).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(legate::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let conn =
        rustls::ClientConnection::new(std::sync::Arc::new(config), "localhost".try_into().unwrap())
            .unwrap();
    let tcp = connect(addr);
    tcp.set_read_timeout(Some(DEADLINE)).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// Makes closing `s` send a reset instead of a FIN (SO_LINGER with a zero timeout).
pub fn reset_on_close(s: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized linger struct.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

/// A TCP relay between the two ambassadors that can turn every connection it holds into one
/// that looks alive but dies at the first byte the client sends, like a peer that restarted
/// behind a NAT that still answers for the old connection.
pub struct Trap {
    pub addr: SocketAddr,
    pub armed: Arc<std::sync::atomic::AtomicBool>,
}

impl Trap {
    pub fn start(to: SocketAddr) -> Trap {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = armed.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(down) = conn else { continue };
                let Ok(up) = TcpStream::connect(to) else {
                    continue;
                };
                // Connections made after arming behave; those from before are the trap.
                let made_after_arming = flag.load(Ordering::SeqCst);
                let (flag, d2, u2) = (
                    flag.clone(),
                    down.try_clone().unwrap(),
                    up.try_clone().unwrap(),
                );
                thread::spawn(move || pipe(up, d2));
                thread::spawn(move || {
                    let mut down = down;
                    let mut up = u2;
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = down.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        if flag.load(Ordering::SeqCst) && !made_after_arming {
                            // Drop the client's bytes and the connection: nothing reaches the
                            // server.
                            let _ = down.shutdown(Shutdown::Both);
                            let _ = up.shutdown(Shutdown::Both);
                            return;
                        }
                        if up.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = up.shutdown(Shutdown::Write);
                });
            }
        });
        Trap { addr, armed }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16384];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A client whose ready connections all die at the first byte it sends on them (behind a
/// [`Trap`]), and a consumer that sends 50,000 bytes: the reply must be exact, the target must
/// see the bytes once, and the client must log `retried`. `client_flags` pick the scheme;
/// `ready` is the log line that says its connections are ready.
pub fn a_dead_connection_is_replaced(client_flags: &[&str], ready: &[&str], retried: &str) {
    let pki = Pki::new();
    let (tx, rx) = std::sync::mpsc::channel();
    let tx = Mutex::new(tx);
    let backend = Backend::start(move |mut s| {
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(b"got:").unwrap();
        s.write_all(&got).unwrap();
        tx.lock().unwrap().send(got).unwrap();
    });
    let server = Legate::server(&pki, &backend.target(), &["--allow-cn=client"]);
    let trap = Trap::start(server.addr());
    let mut args = vec![
        "client".to_string(),
        "--listen=127.0.0.1:0".into(),
        format!("--target=127.0.0.1:{}", trap.addr.port()),
        "--override-server-name=localhost".into(),
        format!("--cert={}", pki.leaf("client").cert.display()),
        format!("--key={}", pki.leaf("client").key.display()),
        format!("--cacert={}", pki.ca_cert().display()),
    ];
    args.extend(client_flags.iter().map(|f| f.to_string()));
    let client = Legate::start(&args, 1);
    client.log.wait_for(ready);
    // The connections look alive, but die at the first byte the client sends on them.
    trap.armed.store(true, Ordering::SeqCst);

    let payload: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    let reply = exchange(client.addr(), &payload);
    let mut expected = b"got:".to_vec();
    expected.extend_from_slice(&payload);
    assert!(reply == expected, "the reply differs from the payload");
    // The backend saw the payload once, complete.
    let seen = rx.recv_timeout(DEADLINE).unwrap();
    assert!(seen == payload);
    assert_eq!(backend.accepted(), 1);
    client.log.wait_for(&[retried]);
}

/// A child process killed (and reaped) when dropped: peers such as openssl or stunnel.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
