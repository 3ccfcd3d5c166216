//! Addresses, listeners and streams: TCP (`host:port`) or UNIX sockets (`unix:PATH`).
//!
//! In: an address as written in a flag or config file. Out: a listener that accepts, or a
//! stream that reads and writes, whichever the address names. Everything above this module
//! works with [`Stream`] and never asks which kind it has, except to set TCP options.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// A `host:port` address; the host may be a name, resolved when it is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    pub fn parse(s: &str) -> Result<HostPort, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("address {s:?} needs a port, as in host:port"))?;
        let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        if bracketed.is_none() && host.contains(':') {
            return Err(format!(
                "address {s:?}: write IPv6 addresses in brackets, as in [::1]:8443"
            ));
        }
        let host = bracketed.unwrap_or(host);
        if host.is_empty() {
            return Err(format!(
                "address {s:?} has no host; write 127.0.0.1:PORT or 0.0.0.0:PORT"
            ));
        }
        if host.contains(':') && host.parse::<IpAddr>().is_err() {
            return Err(format!(
                "address {s:?}: write IPv6 addresses in brackets, as in [::1]:8443"
            ));
        }
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("address {s:?}: port {port:?} is not a number from 0 to 65535"))?;
        Ok(HostPort {
            host: host.to_string(),
            port,
        })
    }

    /// True for `localhost` and loopback IP addresses: reachable only from this host.
    pub fn is_loopback(&self) -> bool {
        self.host.eq_ignore_ascii_case("localhost")
            || self.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }
}

impl From<SocketAddr> for HostPort {
    fn from(a: SocketAddr) -> HostPort {
        HostPort {
            host: a.ip().to_string(),
            port: a.port(),
        }
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Where to listen or connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    Tcp(HostPort),
    Unix(PathBuf),
    /// `systemd:NAME`: a listening socket systemd passed in (socket activation,
    /// `FileDescriptorName=NAME`); for listening only.
    Systemd(String),
}

impl Address {
    /// `unix:PATH`, `systemd:NAME` or `host:port`.
    pub fn parse(s: &str) -> Result<Address, String> {
        if let Some(name) = s.strip_prefix("systemd:") {
            return if name.is_empty() || name.contains(':') {
                Err(format!(
                    "address {s:?}: write systemd:NAME, NAME being the socket unit's FileDescriptorName"
                ))
            } else {
                Ok(Address::Systemd(name.to_string()))
            };
        }
        match s.strip_prefix("unix:") {
            Some("") => Err(format!(
                "address {s:?}: unix: needs a path, as in unix:/run/app.sock"
            )),
            Some(path) => Ok(Address::Unix(PathBuf::from(path))),
            None => HostPort::parse(s).map(Address::Tcp),
        }
    }

    /// True when only this host can reach it: loopback TCP, or any UNIX socket.
    pub fn is_local(&self) -> bool {
        match self {
            Address::Tcp(hp) => hp.is_loopback(),
            // The socket unit says where it listens: that is the operator saying so.
            Address::Unix(_) | Address::Systemd(_) => true,
        }
    }

    /// The host part, which a client side checks the server's certificate against.
    pub fn host(&self) -> Option<&str> {
        match self {
            Address::Tcp(hp) => Some(&hp.host),
            Address::Unix(_) | Address::Systemd(_) => None,
        }
    }

    /// Relative UNIX socket paths resolve against `base` (a config file's directory).
    pub fn resolve(self, base: Option<&Path>) -> Address {
        match (self, base) {
            (Address::Unix(p), Some(base)) if p.is_relative() => Address::Unix(base.join(p)),
            (a, _) => a,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(hp) => hp.fmt(f),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Systemd(name) => write!(f, "systemd:{name}"),
        }
    }
}

/// Who connected to a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerAddr {
    Tcp(SocketAddr),
    /// A UNIX socket peer: such peers are unnamed.
    Unix,
}

impl PeerAddr {
    pub fn socket_addr(self) -> Option<SocketAddr> {
        match self {
            PeerAddr::Tcp(a) => Some(a),
            PeerAddr::Unix => None,
        }
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Tcp(a) => a.fmt(f),
            PeerAddr::Unix => f.write_str("unix"),
        }
    }
}

/// A listening socket.
pub enum Listener {
    Tcp(TcpListener),
    /// The path is removed again when the listener is dropped (unless empty: a socket
    /// systemd passed in is systemd's to remove).
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds `addr`. A UNIX socket file left behind by a process that is gone is replaced; one
    /// that something still listens on is "address in use", like a TCP port.
    pub async fn bind(addr: &Address) -> io::Result<Listener> {
        match addr {
            Address::Tcp(hp) => TcpListener::bind((hp.host.as_str(), hp.port))
                .await
                .map(Listener::Tcp),
            Address::Unix(path) => {
                if std::fs::symlink_metadata(path).is_ok() {
                    if UnixStream::connect(path).await.is_ok() {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            "a process is listening on this socket already",
                        ));
                    }
                    use std::os::unix::fs::FileTypeExt;
                    if !std::fs::symlink_metadata(path)?.file_type().is_socket() {
                        return Err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            "the path exists and is not a socket; not replacing it",
                        ));
                    }
                    std::fs::remove_file(path)?;
                }
                UnixListener::bind(path).map(|l| Listener::Unix(l, path.clone()))
            }
            Address::Systemd(name) => inherited(name),
        }
    }

    /// What it listens on, for the log: `127.0.0.1:8443` or `unix:/run/legate.sock`.
    pub fn local_addr(&self) -> io::Result<String> {
        Ok(match self {
            Listener::Tcp(l) => l.local_addr()?.to_string(),
            Listener::Unix(l, path) if path.as_os_str().is_empty() => {
                match l.local_addr()?.as_pathname() {
                    Some(p) => format!("unix:{}", p.display()),
                    None => "unix:(unnamed)".into(),
                }
            }
            Listener::Unix(_, path) => format!("unix:{}", path.display()),
        })
    }

    pub async fn accept(&self) -> io::Result<(Stream, PeerAddr)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                Ok((Stream::Tcp(s), PeerAddr::Tcp(peer)))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                Ok((Stream::Unix(s), PeerAddr::Unix))
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self
            && !path.as_os_str().is_empty()
        {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The listening socket systemd passed in under `name` (socket activation: `LISTEN_FDS`,
/// `LISTEN_FDNAMES`, `LISTEN_PID`, from fd 3 on). Each call takes a duplicate, so a reload
/// that binds it again gets its own descriptor and the one systemd passed stays open.
fn inherited(name: &str) -> io::Result<Listener> {
    use std::os::fd::{FromRawFd, RawFd};
    let missing = |why: String| io::Error::new(io::ErrorKind::NotFound, why);
    let count: RawFd = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| missing("no sockets were passed in (LISTEN_FDS is not set: start legate from a socket unit)".to_string()))?;
    if let Some(pid) = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        && pid != std::process::id()
    {
        return Err(missing(format!(
            "the sockets passed in were meant for process {pid}"
        )));
    }
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let index = names
        .split(':')
        .position(|n| n == name)
        .filter(|i| (*i as RawFd) < count)
        .ok_or_else(|| missing(format!("no socket of that name was passed in (LISTEN_FDNAMES={names:?}); set FileDescriptorName={name} in the socket unit")))?;
    let fd = 3 + index as RawFd;
    // SAFETY: dup of a descriptor number; a negative result is an error, checked.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a fresh descriptor this function owns.
    let socket = unsafe { socket2::Socket::from_raw_fd(dup) };
    let listening = socket.is_listener().unwrap_or(false);
    if !listening {
        return Err(io::Error::other(
            "the socket passed in under that name is not a listening stream socket (ListenStream=)",
        ));
    }
    socket.set_nonblocking(true)?;
    match socket.local_addr()?.as_unix() {
        Some(_) => UnixListener::from_std(std::os::unix::net::UnixListener::from(
            std::os::fd::OwnedFd::from(socket),
        ))
        .map(|l| Listener::Unix(l, PathBuf::new())),
        None => TcpListener::from_std(std::net::TcpListener::from(socket)).map(Listener::Tcp),
    }
}

/// A connected byte stream.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// Writes what the socket takes now without waiting, and without registering for
    /// readiness: a task other than the writer's may call it without taking the writer's
    /// wakeup.
    pub fn try_write_vectored(&self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.try_write_vectored(bufs),
            Stream::Unix(s) => s.try_write_vectored(bufs),
        }
    }

    /// This end's address, for TCP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Stream::Tcp(s) => s.local_addr().ok(),
            Stream::Unix(_) => None,
        }
    }

    /// Sets TCP_NODELAY (the tunnel must not add Nagle delay to small requests) and, for
    /// sockets that cross the network, TCP keepalive so a silently dead peer is noticed.
    /// Nothing to set on UNIX sockets.
    pub fn tune(&self, keepalive: Option<Duration>) {
        let Stream::Tcp(tcp) = self else { return };
        // Failures leave a working socket with default options; nothing to report upward.
        let _ = tcp.set_nodelay(true);
        if let Some(idle) = keepalive.filter(|d| !d.is_zero()) {
            let (interval, retries) = probe_schedule(idle);
            let ka = TcpKeepalive::new()
                .with_time(idle)
                .with_interval(interval)
                .with_retries(retries);
            let _ = SockRef::from(tcp).set_tcp_keepalive(&ka);
        }
    }
}

/// After `idle` without a packet from the peer, how often to probe and how many unanswered
/// probes end the connection: a dead link is noticed about `2 × idle` after its last packet.
/// Probes after the first go out only on a link that has already gone quiet, so many close
/// probes cost a healthy link nothing, and they make a false abort from a burst of lost packets
/// unlikely: with 10 probes a quarter of which are dropped (a loopback backlog overflowing under
/// 10,000 connections' probes, bench/LOAD.md), one connection in a million is cut, where 3
/// probes cut one in 64. The kernel counts the interval in whole seconds.
fn probe_schedule(idle: Duration) -> (Duration, u32) {
    let interval = (idle.as_secs() / 10).max(1);
    let retries = (idle.as_secs() / interval).clamp(3, 127) as u32;
    (Duration::from_secs(interval), retries)
}

/// Implements `AsyncRead` and `AsyncWrite` for an enum whose variants each hold one stream.
macro_rules! delegate_io {
    ($ty:ident { $($variant:ident),+ }) => {
        impl tokio::io::AsyncRead for $ty {
            fn poll_read(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($ty::$variant(s) => std::pin::Pin::new(s).poll_read(cx, buf),)+
                }
            }
        }

        impl tokio::io::AsyncWrite for $ty {
            fn poll_write(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $($ty::$variant(s) => std::pin::Pin::new(s).poll_write(cx, buf),)+
                }
            }

            fn poll_write_vectored(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                match self.get_mut() {
                    $($ty::$variant(s) => std::pin::Pin::new(s).poll_write_vectored(cx, bufs),)+
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    $($ty::$variant(s) => s.is_write_vectored(),)+
                }
            }

            fn poll_flush(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($ty::$variant(s) => std::pin::Pin::new(s).poll_flush(cx),)+
                }
            }

            fn poll_shutdown(
                self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                match self.get_mut() {
                    $($ty::$variant(s) => std::pin::Pin::new(s).poll_shutdown(cx),)+
                }
            }
        }
    };
}
delegate_io!(Stream { Tcp, Unix });

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse() {
        assert_eq!(
            Address::parse("unix:/run/a.sock").unwrap(),
            Address::Unix("/run/a.sock".into())
        );
        assert!(Address::parse("unix:").is_err());
        assert!(Address::parse("unix:/x").unwrap().is_local());
        assert_eq!(HostPort::parse("[::1]:80").unwrap().host, "::1");
        assert!(HostPort::parse("[::1]:80").unwrap().is_loopback());
        assert!(HostPort::parse("localhost:1").unwrap().is_loopback());
        assert!(!HostPort::parse("0.0.0.0:1").unwrap().is_loopback());
        assert!(HostPort::parse("::1:80").is_err());
        assert!(HostPort::parse("host").is_err());
        assert!(HostPort::parse("host:99999").is_err());
        assert_eq!(HostPort::parse("[::1]:80").unwrap().to_string(), "[::1]:80");
        assert_eq!(
            Address::parse("unix:rel.sock")
                .unwrap()
                .resolve(Some(Path::new("/etc/legate")))
                .to_string(),
            "unix:/etc/legate/rel.sock"
        );
    }

    /// The schedule reaches the socket: read back from the kernel, the default 30 s idle
    /// probes 10 times 3 s apart (a dead link is noticed after 60 s, as with 3 probes 10 s
    /// apart before), and short idle times keep 3 probes 1 s apart.
    #[tokio::test]
    async fn keepalive_schedule_reaches_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        for (idle, interval, retries) in [(30, 3, 10), (3, 1, 3), (1, 1, 3), (600, 60, 10)] {
            let stream = Stream::Tcp(TcpStream::connect(addr).await.unwrap());
            stream.tune(Some(Duration::from_secs(idle)));
            let Stream::Tcp(tcp) = &stream else {
                unreachable!()
            };
            let sock = SockRef::from(tcp);
            assert!(sock.keepalive().unwrap());
            assert_eq!(
                sock.tcp_keepalive_time().unwrap(),
                Duration::from_secs(idle)
            );
            assert_eq!(
                sock.tcp_keepalive_interval().unwrap(),
                Duration::from_secs(interval)
            );
            assert_eq!(sock.tcp_keepalive_retries().unwrap(), retries);
        }
        let off = Stream::Tcp(TcpStream::connect(addr).await.unwrap());
        off.tune(Some(Duration::ZERO));
        let Stream::Tcp(tcp) = &off else {
            unreachable!()
        };
        assert!(!SockRef::from(tcp).keepalive().unwrap());
    }
}
