//! Tunnel: one listener and the pipeline every connection on it goes through.
//!
//! In: a validated [`TunnelConfig`]. Out: served connections, each ending in one logged
//! [`Outcome`]. [`serve_conn`] is the only place that knows the order of the stages:
//!
//! ```text
//! accept ─▶ inbound (plain | TLS handshake) ─▶ authorize ─▶ route ─▶ dial
//!        ─▶ outbound (plain | TLS handshake + legate/1 open) ─▶ relay ─▶ log
//! ```

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::Acceptor;
use crate::config::{Side, TunnelConfig};
use crate::dial;
use crate::metrics::TunnelMetrics;
use crate::mux;
use crate::net::{Address, Listener, PeerAddr, Stream};
use crate::pool::{MuxPool, Pool};
use crate::protocol::{self, Frame, Open, RefuseCode};
use crate::proxy_protocol;
use crate::relay;
use crate::tls::{self, ClientStream, ClientTls, PeerIdentity, ServerStream, ServerTls};

/// How a connection ended: the log field and the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The client closed after the handshake without asking for anything (a status probe).
    Idle,
    HandshakeFailed,
    Unauthorized,
    ProtocolError,
    UnknownRoute,
    DialFailed,
    Refused,
    /// The relay ended on an I/O error that is not how peers close: a keepalive or
    /// retransmission timeout (the link died), or TLS records that do not decrypt.
    Aborted,
}

impl Outcome {
    /// Every outcome, in metric order.
    pub const ALL: [Outcome; 9] = [
        Outcome::Ok,
        Outcome::Idle,
        Outcome::HandshakeFailed,
        Outcome::Unauthorized,
        Outcome::ProtocolError,
        Outcome::UnknownRoute,
        Outcome::DialFailed,
        Outcome::Refused,
        Outcome::Aborted,
    ];

    pub fn index(self) -> usize {
        Outcome::ALL
            .iter()
            .position(|o| *o == self)
            .expect("ALL lists every outcome")
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Idle => "idle",
            Outcome::HandshakeFailed => "handshake_failed",
            Outcome::Unauthorized => "unauthorized",
            Outcome::ProtocolError => "protocol_error",
            Outcome::UnknownRoute => "unknown_route",
            Outcome::DialFailed => "dial_failed",
            Outcome::Refused => "refused",
            Outcome::Aborted => "aborted",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A class of connection log lines that `--quiet` can silence (ghostunnel's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuietClass {
    All,
    Conns,
    ConnErrs,
    HandshakeErrs,
}

/// The classes silenced in this process, set once at startup.
static QUIET: std::sync::OnceLock<Vec<QuietClass>> = std::sync::OnceLock::new();

/// Sets the `--quiet` classes; later calls are ignored.
pub fn set_quiet(classes: Vec<QuietClass>) {
    let _ = QUIET.set(classes);
}

fn quiet(class: QuietClass) -> bool {
    QUIET
        .get()
        .is_some_and(|q| q.contains(&class) || q.contains(&QuietClass::All))
}

/// Why a tunnel could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}", prefix_lines(tunnel, source))]
    Tls { tunnel: String, source: tls::Error },
    #[error("tunnel {tunnel:?}: target {target} does not resolve ({source}); check the name")]
    Resolve {
        tunnel: String,
        target: String,
        source: io::Error,
    },
    #[error("tunnel {tunnel:?}: cannot listen on {addr}: {source}")]
    Bind {
        tunnel: String,
        addr: String,
        source: io::Error,
    },
}

/// `tunnel "NAME": ` before every line of `e`, so each problem names its tunnel.
fn prefix_lines(tunnel: &str, e: &impl fmt::Display) -> String {
    e.to_string()
        .lines()
        .map(|l| format!("tunnel {tunnel:?}: {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The TLS end of a tunnel, loaded and ready, and reloadable.
#[derive(Clone)]
pub enum TlsEnd {
    Client(Arc<ClientTls>),
    Server(Arc<ServerTls>),
}

impl TlsEnd {
    /// Reloads certificate, key, CA bundle and CRL together; see [`ServerTls::reload`].
    pub fn reload(&self) -> Result<(), tls::Error> {
        match self {
            TlsEnd::Client(c) => c.reload(),
            TlsEnd::Server(s) => s.reload(),
        }
    }

    /// When this side's current certificate expires (Unix seconds).
    pub fn not_after(&self) -> Option<i64> {
        match self {
            TlsEnd::Client(c) => c.not_after(),
            TlsEnd::Server(s) => s.not_after(),
        }
    }

    /// The config an HTTPS status listener uses: this side's live certificate.
    pub fn status_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        match self {
            TlsEnd::Client(c) => c.status_config(),
            TlsEnd::Server(s) => s.status_config(),
        }
    }
}

/// A tunnel whose TLS material loaded and whose configuration is consistent, not yet bound.
pub struct Prepared {
    cfg: Arc<TunnelConfig>,
    tls: TlsEnd,
}

impl Prepared {
    /// Loads certificates, key and CA bundle and builds the TLS config: everything short of
    /// binding, so `legate run --check` finds what startup would.
    pub fn new(cfg: TunnelConfig) -> Result<Prepared, Error> {
        let tls = match cfg.side {
            Side::Server => {
                ServerTls::new(&cfg.tls, cfg.min_tls).map(|s| TlsEnd::Server(Arc::new(s)))
            }
            Side::Client => {
                ClientTls::new(&cfg.tls, cfg.min_tls, &cfg.server_name, cfg.legate_protocol)
                    .map(|c| TlsEnd::Client(Arc::new(c)))
            }
        }
        .map_err(|source| Error::Tls {
            tunnel: cfg.name.clone(),
            source,
        })?;
        // A name that does not resolve now is a typo far more often than a service not yet
        // up; say so at startup rather than at the first connection.
        for target in cfg.target.iter().chain(cfg.routes.values()) {
            let Address::Tcp(hp) = target else { continue };
            if let Err(source) =
                std::net::ToSocketAddrs::to_socket_addrs(&(hp.host.as_str(), hp.port))
            {
                return Err(Error::Resolve {
                    tunnel: cfg.name.clone(),
                    target: target.to_string(),
                    source,
                });
            }
        }
        Ok(Prepared {
            cfg: Arc::new(cfg),
            tls,
        })
    }

    pub fn config(&self) -> &TunnelConfig {
        &self.cfg
    }

    /// The reloadable TLS end, for the daemon to reload and the status listener to present.
    pub fn tls(&self) -> &TlsEnd {
        &self.tls
    }

    /// Binds the listener, so a port conflict fails startup rather than the first connection.
    /// Connections are counted in `metrics`.
    pub async fn bind(self, metrics: Arc<TunnelMetrics>) -> Result<Tunnel, Error> {
        let listener = Listener::bind(&self.cfg.listen)
            .await
            .map_err(|source| Error::Bind {
                tunnel: self.cfg.name.clone(),
                addr: self.cfg.listen.to_string(),
                source,
            })?;
        let acceptor = Acceptor::new(listener, self.cfg.max_concurrent_conns);
        Ok(Tunnel {
            shared: Arc::new(Shared {
                limit: (self.cfg.max_concurrent_conns > 0)
                    .then(|| Arc::new(tokio::sync::Semaphore::new(self.cfg.max_concurrent_conns))),
                pool: (self.cfg.side == Side::Client
                    && self.cfg.legate_protocol
                    && self.cfg.pool_size > 0)
                    .then(|| Arc::new(Pool::new(self.cfg.pool_size))),
                // --pool-size=0 asks for no shared connections: no pool and no multiplexing.
                mux: (self.cfg.side == Side::Client
                    && self.cfg.legate_protocol
                    && self.cfg.mux
                    && self.cfg.pool_size > 0)
                    .then(|| Arc::new(MuxPool::default())),
                cfg: self.cfg,
                tls: self.tls,
                metrics,
            }),
            acceptor,
        })
    }
}

/// What every connection of a tunnel reads.
struct Shared {
    cfg: Arc<TunnelConfig>,
    tls: TlsEnd,
    metrics: Arc<TunnelMetrics>,
    /// Client side over `legate/1`: connections kept ready.
    pool: Option<Arc<Pool>>,
    /// Client side over multiplexed `legate/1`: the connection every stream goes over.
    mux: Option<Arc<MuxPool>>,
    /// Server side, `--max-concurrent-conns` for multiplexed streams: each counts as one
    /// connection (the TLS connections are capped by the acceptor).
    limit: Option<Arc<tokio::sync::Semaphore>>,
}

/// A bound tunnel.
pub struct Tunnel {
    acceptor: Acceptor,
    shared: Arc<Shared>,
}

impl Tunnel {
    pub fn local_addr(&self) -> io::Result<String> {
        self.acceptor.local_addr()
    }

    pub fn config(&self) -> &TunnelConfig {
        &self.shared.cfg
    }

    /// Accepts until `stop` is cancelled, spawning each connection on `tracker` so the daemon
    /// can wait for them to drain. The listener closes when this returns.
    pub async fn serve(self, stop: CancellationToken, tracker: TaskTracker) {
        if let TlsEnd::Client(client) = &self.shared.tls {
            let (pool, mux) = (self.shared.pool.clone(), self.shared.mux.clone());
            let (client, cfg, stop) = (client.clone(), self.shared.cfg.clone(), stop.clone());
            tokio::spawn(async move {
                // A server that does not multiplex gets the pool of framed connections.
                if let Some(mux) = mux
                    && mux.keep(&cfg, &client, &stop).await
                {
                    return;
                }
                if let Some(pool) = pool {
                    pool.refill(&cfg, &client, stop).await;
                }
            });
        }
        loop {
            let (tcp, peer, permit) = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = self.acceptor.accept() => accepted,
            };
            let shared = self.shared.clone();
            let stop = stop.clone();
            tracker.spawn(async move {
                serve_conn(&shared, tcp, peer, &stop).await;
                drop(permit);
            });
        }
    }
}

/// What the log line at the end of a connection says.
#[derive(Clone)]
struct Record {
    peer: PeerAddr,
    /// Server side over `legate/1`: the consumer's address, as the client side saw it.
    consumer: Option<std::net::SocketAddr>,
    identity: Option<PeerIdentity>,
    /// The negotiated TLS session, from `tls::describe_session`.
    session: Option<String>,
    route: Option<String>,
    target: Option<String>,
    totals: relay::Totals,
}

impl Record {
    fn new(peer: PeerAddr) -> Record {
        Record {
            peer,
            consumer: None,
            identity: None,
            session: None,
            route: None,
            target: None,
            totals: relay::Totals::default(),
        }
    }
}

/// A stage that failed: the outcome and what to say about it.
pub(crate) struct Failure {
    pub(crate) outcome: Outcome,
    pub(crate) detail: String,
}

pub(crate) fn fail(outcome: Outcome, detail: impl fmt::Display) -> Failure {
    Failure {
        outcome,
        detail: detail.to_string(),
    }
}

/// One accepted connection, start to end. The client side serves one consumer; the server side
/// serves one peer connection, which over framed `legate/1` carries one stream after another.
async fn serve_conn(t: &Arc<Shared>, tcp: Stream, peer: PeerAddr, stop: &CancellationToken) {
    let _open = t.metrics.open();
    match &t.tls {
        TlsEnd::Server(server) => serve_peer(t, server, tcp, peer, stop).await,
        TlsEnd::Client(client) => serve_consumer(t, client, tcp, peer).await,
    }
}

/// Counts and logs the end of one consumer connection (one stream).
fn finish(t: &Shared, rec: &Record, started: Instant, result: Result<(), Failure>) {
    let elapsed = started.elapsed();
    let outcome = result.as_ref().map_or_else(|f| f.outcome, |()| Outcome::Ok);
    t.metrics
        .finished(outcome, rec.totals.up, rec.totals.down, elapsed);
    log_end(&t.cfg, rec, elapsed, result);
}

/// Server side: handshake and authorize once; then, over `legate/1`, one stream per OPEN for
/// as long as each ends cleanly (framed), or the one raw stream to the default target. Once
/// the tunnel stops accepting (`stop`), a connection waiting for its next OPEN is closed: it
/// carries no stream, so draining need not wait for it.
async fn serve_peer(
    t: &Arc<Shared>,
    server: &ServerTls,
    tcp: Stream,
    peer: PeerAddr,
    stop: &CancellationToken,
) {
    let cfg = &t.cfg;
    let started = Instant::now();
    let mut rec = Record::new(peer);
    tcp.tune(Some(cfg.keepalive));
    // Subscribed before the handshake, so a reload during it counts as one after it.
    let mut reloads = server.reloads();
    // The set-up stages are boxed: their futures are large and short-lived, and left inline
    // they would size every connection's task for its whole life (docs/performance.md).
    let mut tls = match Box::pin(handshake_in(server, tcp, cfg.handshake_timeout)).await {
        // Boxed: the connection state stays put while the future around it stays small.
        Ok(tls) => Box::new(tls),
        Err(f) => return finish(t, &rec, started, Err(f)),
    };
    t.metrics.handshake.observe(started.elapsed());
    rec.session = Some(tls::describe_session(tls.get_ref().1));
    match authorize(cfg, &tls) {
        Ok(id) => rec.identity = id,
        Err(f) => return finish(t, &rec, started, Err(f)),
    }
    if !tls::negotiated_legate(tls.get_ref().1) {
        // Raw mode: the TLS stream is the byte stream to the default target.
        let result = serve_stream(t, &mut tls, None, &mut rec).await.map(|_| ());
        return finish(t, &rec, started, result);
    }
    let hello = Frame::Hello {
        version: protocol::VERSION,
        features: protocol::FEATURE_FRAMED | protocol::FEATURE_MUX,
        idle_secs: u32::try_from(cfg.idle_timeout.as_secs()).unwrap_or(u32::MAX),
    };
    if protocol::write_frame(&mut tls, &hello).await.is_err() {
        return finish(
            t,
            &rec,
            started,
            Err(fail(Outcome::Idle, "client left before HELLO")),
        );
    }
    let mut started = started;
    loop {
        let mut stream_rec = Record::new(peer);
        stream_rec.session = rec.session.clone();
        stream_rec.identity = rec.identity.clone();
        // A connection made under certificates, a CA bundle or a CRL that have since been
        // reloaded starts no new stream: the client must handshake afresh.
        let next = if reloads.has_changed().unwrap_or(true) {
            Err("TLS material reloaded; idle connection closed")
        } else {
            // Biased: an OPEN that arrives together with a reload must not slip past it.
            tokio::select! {
                biased;
                _ = reloads.changed() => Err("TLS material reloaded; idle connection closed"),
                _ = stop.cancelled() => Err("tunnel stopping; idle connection closed"),
                open = Box::pin(read_open(cfg, &mut tls)) => Ok(open),
            }
        };
        let open = match next {
            Ok(Ok(protocol::Opening::Open(open))) => open,
            Ok(Ok(protocol::Opening::Mux(head))) => {
                let info = ConnInfo::new(&stream_rec, &tls);
                let why = serve_mux(t, tls, &head, info, reloads, stop).await;
                return finish(t, &stream_rec, started, Err(fail(Outcome::Idle, why)));
            }
            Ok(Err(f)) => return finish(t, &stream_rec, started, Err(f)),
            Err(why) => {
                let _ = tls.shutdown().await;
                return finish(t, &stream_rec, started, Err(fail(Outcome::Idle, why)));
            }
        };
        let result = serve_stream(t, &mut tls, Some(open), &mut stream_rec).await;
        let again = matches!(result, Ok(true));
        finish(t, &stream_rec, started, result.map(|_| ()));
        if !again {
            return;
        }
        // Between streams the connection idles in the client's pool; the next stream's
        // duration starts with its OPEN.
        started = Instant::now();
    }
}

/// Server side: one stream: route, dial the target (and send it the PROXY header), answer a
/// `legate/1` client READY or REFUSED, relay. Returns whether the connection can carry another
/// stream.
async fn serve_stream(
    t: &Shared,
    tls: &mut ServerStream,
    open: Option<Open>,
    rec: &mut Record,
) -> Result<bool, Failure> {
    let cfg = &t.cfg;
    let route = open.as_ref().map_or("", |o| o.route.as_str());
    rec.route = open.as_ref().map(|o| o.route.clone());
    rec.consumer = open.as_ref().and_then(|o| o.consumer);
    let target = pick_target(cfg, route);
    rec.target = target.map(ToString::to_string);
    let mut dialed = Box::pin(dial_target(cfg, target, route)).await;
    if let (true, Ok(plain)) = (cfg.proxy_protocol, &mut dialed) {
        let info = ConnInfo::new(rec, tls);
        if let Err(e) = send_proxy_header(plain, rec, &info).await {
            dialed = Err(e);
        }
    }
    let framed = open
        .as_ref()
        .is_some_and(|o| o.features & protocol::FEATURE_FRAMED != 0);
    if open.is_some() {
        let answer = match &dialed {
            Ok(_) => Frame::Ready {
                features: if framed { protocol::FEATURE_FRAMED } else { 0 },
            },
            Err((code, f)) => Frame::Refused {
                code: *code,
                message: f.detail.clone(),
            },
        };
        // If the client is gone, the relay (or nothing) will notice; the outcome is decided
        // by the dial.
        let _ = protocol::write_frame(tls, &answer).await;
        if dialed.is_err() && framed {
            linger(tls).await;
        }
    }
    let plain = dialed.map_err(|(_, f)| f)?;
    if framed {
        let r = relay::relay_framed(plain, tls, cfg.close_timeout, false).await;
        rec.totals = relay::Totals {
            up: r.from_frames,
            down: r.to_frames,
            cut: r.cut,
            failed: r.failed,
        };
        relay_failure(rec)?;
        Ok(r.reusable)
    } else {
        rec.totals = relay::relay(tls, plain, cfg.close_timeout).await;
        relay_failure(rec)?;
        Ok(false)
    }
}

/// Server side: a connection the client made multiplexed (its first OPEN was a multiplexed
/// one, whose header is `head`). Streams run as tasks of their own; this waits until the
/// connection ends, and stops it taking streams (GOAWAY) when the tunnel stops, the TLS
/// material is reloaded, or it has had no stream for the idle timeout. Returns why it ended.
async fn serve_mux(
    t: &Arc<Shared>,
    tls: Box<ServerStream>,
    head: &[u8],
    info: ConnInfo,
    mut reloads: tokio::sync::watch::Receiver<u64>,
    stop: &CancellationToken,
) -> String {
    let cfg = &t.cfg;
    let streams = TaskTracker::new();
    let on_open = {
        let (t, streams) = (t.clone(), streams.clone());
        let (reloads, stop) = (reloads.clone(), stop.clone());
        move |incoming: mux::Incoming, open: Open| {
            // Checked as each OPEN arrives, not only when this task next runs: no stream
            // starts on a connection made under reloaded TLS material or after the stop.
            if reloads.has_changed().unwrap_or(true) || stop.is_cancelled() {
                incoming.conn().drain();
                return incoming.refuse(RefuseCode::Draining, mux::DRAINING);
            }
            // Each stream counts against --max-concurrent-conns as a connection would.
            let permit = match &t.limit {
                Some(limit) => match limit.clone().try_acquire_owned() {
                    Ok(permit) => Some(permit),
                    Err(_) => {
                        let why = "server at its connection limit (--max-concurrent-conns)";
                        return incoming.refuse(RefuseCode::Unavailable, why);
                    }
                },
                None => None,
            };
            let (t, info) = (t.clone(), info.clone());
            let h = incoming.accept();
            streams.spawn(async move {
                serve_mux_stream(&t, info, h, open).await;
                drop(permit);
            });
        }
    };
    let conn = mux::Conn::start(mux::Role::Server, tls, head, on_open);
    let mut why = None;
    while why.is_none() {
        let idle_left = cfg.idle_timeout.saturating_sub(conn.idle_for());
        why = tokio::select! {
            biased;
            _ = reloads.changed() => Some("TLS material reloaded; connection drained"),
            _ = stop.cancelled() => Some("tunnel stopping; connection drained"),
            _ = conn.closed() => None,
            _ = tokio::time::sleep(idle_left) => (conn.active() == 0
                && conn.idle_for() >= cfg.idle_timeout)
                .then_some("no stream within the idle timeout; connection closed"),
        };
        if conn.dead().is_some() {
            break;
        }
    }
    conn.drain();
    conn.closed().await;
    streams.close();
    streams.wait().await;
    // A lingering close: the client closes its side once it has read our last frames. Closing
    // first could meet its late frames with a reset, which destroys what it has not read yet.
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.ended()).await;
    why.map_or_else(
        || conn.dead().unwrap_or("connection closed").to_string(),
        str::to_string,
    )
}

/// Server side: one stream of a multiplexed connection: route, dial, READY or REFUSED, relay.
async fn serve_mux_stream(t: &Shared, info: ConnInfo, mut h: mux::StreamHandle, open: Open) {
    let cfg = &t.cfg;
    let started = Instant::now();
    let mut rec = Record::new(info.peer);
    rec.session = info.session.clone();
    rec.identity = info.identity.clone();
    rec.route = Some(open.route.clone());
    rec.consumer = open.consumer;
    let target = pick_target(cfg, &open.route);
    rec.target = target.map(ToString::to_string);
    let mut dialed = Box::pin(dial_target(cfg, target, &open.route)).await;
    if let (true, Ok(plain)) = (cfg.proxy_protocol, &mut dialed)
        && let Err(e) = send_proxy_header(plain, &rec, &info).await
    {
        dialed = Err(e);
    }
    let plain = match dialed {
        Ok(plain) => plain,
        Err((code, f)) => {
            h.refuse(code, &f.detail);
            return finish(t, &rec, started, Err(f));
        }
    };
    h.ready();
    let r = h.relay(plain, cfg.close_timeout, false).await;
    rec.totals = relay::Totals {
        up: r.from_frames,
        down: r.to_frames,
        cut: r.cut,
        failed: r.failed,
    };
    let result = relay_failure(&rec);
    finish(t, &rec, started, result);
}

/// A relay that ended on a failed link (not a close) is reported as `aborted`.
fn relay_failure(rec: &Record) -> Result<(), Failure> {
    match &rec.totals.failed {
        Some(e) => Err(fail(Outcome::Aborted, format!("connection broke: {e}"))),
        None => Ok(()),
    }
}

/// After refusing a framed stream: the client may already have sent DATA behind its OPEN.
/// Closing with those bytes unread would reset the connection and could destroy the REFUSED
/// frame in flight, so end our side and read until the client closes (briefly).
async fn linger(tls: &mut ServerStream) {
    let _ = tls.shutdown().await;
    let drain = async {
        let mut sink = [0u8; 4096];
        while matches!(tokio::io::AsyncReadExt::read(tls, &mut sink).await, Ok(n) if n > 0) {}
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

/// Client side: one consumer connection, over a pooled framed `legate/1` connection when the
/// pool is on, else over a connection of its own.
async fn serve_consumer(t: &Shared, client: &ClientTls, mut tcp: Stream, peer: PeerAddr) {
    let cfg = &t.cfg;
    let started = Instant::now();
    let mut rec = Record::new(peer);
    tcp.tune(None);
    rec.target = cfg.target.as_ref().map(ToString::to_string);
    let result = match (&t.mux, &t.pool) {
        (Some(mux), _) if mux.is_on() => consumer_mux(t, client, mux, &mut tcp, &mut rec).await,
        (_, Some(pool)) if pool.is_on() => {
            consumer_framed(t, client, pool, &mut tcp, &mut rec).await
        }
        _ => consumer_own(t, client, &mut tcp, &mut rec).await,
    };
    finish(t, &rec, started, result);
}

/// Client side without a pool: dial, handshake, open (over `legate/1`), relay.
async fn consumer_own(
    t: &Shared,
    client: &ClientTls,
    tcp: &mut Stream,
    rec: &mut Record,
) -> Result<(), Failure> {
    let cfg = &t.cfg;
    let (tls, identity) = Box::pin(dial_peer(cfg, client, Some(&t.metrics))).await?;
    rec.session = Some(tls::describe_session(tls.get_ref().1));
    rec.identity = Some(identity);
    let tls = Box::pin(open_out(cfg, tls, rec)).await?;
    rec.totals = relay::relay(tcp, tls, cfg.close_timeout).await;
    relay_failure(rec)
}

/// The most consumer bytes sent ahead of READY, kept to resend if the connection turns out dead.
const MAX_EARLY: usize = 64 * 1024;

/// Client side with a pool: take a ready connection (or make one), send OPEN and the consumer's
/// first bytes at once without waiting for READY, then relay DATA frames. A pooled connection
/// that turns out dead before READY is replaced by a fresh one, and the early bytes are sent
/// again there: nothing is lost, and a connection that was dead when taken delivered nothing
/// (the one remaining window is in docs/protocol.md). A connection whose stream ends cleanly
/// goes back to the pool.
async fn consumer_framed(
    t: &Shared,
    client: &ClientTls,
    pool: &Pool,
    consumer: &mut Stream,
    rec: &mut Record,
) -> Result<(), Failure> {
    let cfg = &t.cfg;
    let mut early = Vec::new();
    let mut consumer_done = false;
    let generation = client.generation();
    let mut pooled = pool.take(generation);
    let (mut tls, idle_limit) = loop {
        let was_pooled = pooled.is_some();
        let (mut tls, idle_limit) = match pooled.take() {
            Some(c) => c,
            None => match Box::pin(crate::pool::open(cfg, client, Some(&t.metrics))).await {
                Ok((tls, idle_limit, _)) => (tls, idle_limit),
                Err(crate::pool::OpenError::Failed(f)) => return Err(f),
                Err(crate::pool::OpenError::NotFramed | crate::pool::OpenError::NotMux) => {
                    // A server without framing (or not legate at all): no pool, and this
                    // consumer gets a connection of its own.
                    pool.turn_off();
                    return Box::pin(consumer_own(t, client, consumer, rec)).await;
                }
            },
        };
        rec.session = Some(tls::describe_session(tls.get_ref().1));
        rec.identity = tls::peer_identity(tls.get_ref().1).ok();
        rec.route = Some(cfg.route.clone());
        let opened = Box::pin(open_early(
            cfg,
            &mut tls,
            consumer,
            rec.peer,
            &mut early,
            &mut consumer_done,
        ))
        .await;
        match opened {
            Ok(()) => break (tls, idle_limit),
            Err(Early::Refused(f)) => return Err(f),
            Err(Early::Dead(detail)) if was_pooled => {
                tracing::debug!(tunnel = %cfg.name, error = %detail, "pooled connection was dead; retrying on a fresh one");
            }
            Err(Early::Dead(detail)) => {
                return Err(fail(Outcome::ProtocolError, detail));
            }
        }
    };
    // READY arrived: the early bytes will not be sent again, so do not hold them for the
    // connection's life.
    let early_len = early.len() as u64;
    drop(early);
    let r = relay::relay_framed(&mut *consumer, &mut tls, cfg.close_timeout, consumer_done).await;
    rec.totals = relay::Totals {
        up: early_len + r.to_frames,
        down: r.from_frames,
        cut: r.cut,
        failed: r.failed,
    };
    if r.reusable {
        pool.put(tls, idle_limit, generation);
    }
    relay_failure(rec)?;
    Ok(())
}

/// Client side, multiplexed: open a stream on the tunnel's connection with the consumer's first
/// bytes behind OPEN, then relay. A stream the server did nothing with (the connection died
/// before READY, or was draining) is opened again on a fresh connection with the same early
/// bytes, as with the pool.
async fn consumer_mux(
    t: &Shared,
    client: &ClientTls,
    mux: &MuxPool,
    consumer: &mut Stream,
    rec: &mut Record,
) -> Result<(), Failure> {
    let cfg = &t.cfg;
    let open = Open {
        features: protocol::FEATURE_FRAMED | protocol::FEATURE_MUX,
        route: cfg.route.clone(),
        consumer: rec.peer.socket_addr(),
    };
    let mut early = Vec::new();
    let mut consumer_done = false;
    let mut tries = 0;
    let mut stream = loop {
        let c = match Box::pin(mux.get(cfg, client, Some(&t.metrics))).await {
            Ok(c) => c,
            Err(crate::pool::OpenError::Failed(f)) => return Err(f),
            Err(_) => {
                // The server does not multiplex: this consumer goes the framed way.
                return match &t.pool {
                    Some(pool) => Box::pin(consumer_framed(t, client, pool, consumer, rec)).await,
                    None => Box::pin(consumer_own(t, client, consumer, rec)).await,
                };
            }
        };
        rec.session = Some(c.session.clone());
        rec.identity = c.identity.clone();
        rec.route = Some(cfg.route.clone());
        let mut stream = c.conn.open(&open, &early, consumer_done);
        let answer = Box::pin(mux_answer(
            cfg,
            &mut stream,
            consumer,
            &mut early,
            &mut consumer_done,
        ))
        .await;
        match answer {
            Ok(()) => break stream,
            Err(Early::Refused(f)) => return Err(f),
            Err(Early::Dead(detail)) if tries < 3 => {
                tries += 1;
                tracing::debug!(tunnel = %cfg.name, error = %detail, "stream was not taken; opening it on a fresh connection");
            }
            Err(Early::Dead(detail)) => return Err(fail(Outcome::ProtocolError, detail)),
        }
    };
    let early_len = early.len() as u64;
    drop(early);
    let r = stream
        .relay(&mut *consumer, cfg.close_timeout, consumer_done)
        .await;
    rec.totals = relay::Totals {
        up: early_len + r.to_frames,
        down: r.from_frames,
        cut: r.cut,
        failed: r.failed,
    };
    relay_failure(rec)
}

/// Waits for the answer to a multiplexed OPEN, meanwhile sending the consumer's bytes (kept to
/// send again if the stream must be opened elsewhere).
async fn mux_answer(
    cfg: &TunnelConfig,
    stream: &mut mux::StreamHandle,
    consumer: &mut Stream,
    early: &mut Vec<u8>,
    consumer_done: &mut bool,
) -> Result<(), Early> {
    use tokio::io::AsyncReadExt;
    let deadline = tokio::time::Instant::now() + cfg.connect_timeout;
    let mut buf = relay::SpareBuf::take();
    loop {
        let room = !*consumer_done && early.len() < MAX_EARLY;
        tokio::select! {
            answer = tokio::time::timeout_at(deadline, stream.answer()) => {
                return match answer {
                    Ok(mux::Answer::Ready) => Ok(()),
                    Ok(mux::Answer::Refused(code, message)) => Err(Early::Refused(fail(
                        Outcome::Refused,
                        format!("server refused route {:?}: {code}: {message}", cfg.route),
                    ))),
                    Ok(mux::Answer::Gone(why)) => Err(Early::Dead(why)),
                    Err(_) => Err(Early::Refused(fail(
                        Outcome::ProtocolError,
                        format!("no answer to OPEN within {:?}", cfg.connect_timeout),
                    ))),
                };
            }
            n = consumer.read(&mut buf[..MAX_EARLY.min(relay::BUF_SIZE)]), if room => {
                let n = n.unwrap_or(0);
                if n == 0 {
                    *consumer_done = true;
                } else {
                    early.extend_from_slice(&buf[..n]);
                }
                stream.send_early(&buf[..n]);
            }
        }
    }
}

enum Early {
    /// The server answered REFUSED (or something else that is final).
    Refused(Failure),
    /// The connection failed before any answer: safe to try again elsewhere.
    Dead(String),
}

/// Sends OPEN, any early bytes already taken from the consumer, and more of them as they come,
/// until READY arrives (or REFUSED, or the connection fails).
async fn open_early(
    cfg: &TunnelConfig,
    tls: &mut ClientStream,
    consumer: &mut Stream,
    consumer_addr: PeerAddr,
    early: &mut Vec<u8>,
    consumer_done: &mut bool,
) -> Result<(), Early> {
    use tokio::io::AsyncReadExt;
    let dead = |e: &dyn fmt::Display| Early::Dead(format!("server connection failed: {e}"));
    let open = Frame::Open(Open {
        features: protocol::FEATURE_FRAMED,
        route: cfg.route.clone(),
        consumer: consumer_addr.socket_addr(),
    });
    let mut first = protocol::encode(&open);
    for chunk in early.chunks(protocol::MAX_DATA) {
        first.extend_from_slice(&protocol::stream_header(protocol::DATA, chunk.len()));
        first.extend_from_slice(chunk);
    }
    if *consumer_done {
        first.extend_from_slice(&protocol::stream_header(protocol::END, 0));
    }
    let (mut rd, mut wr) = tokio::io::split(tls);
    if let Err(e) = async {
        wr.write_all(&first).await?;
        wr.flush().await
    }
    .await
    {
        return Err(dead(&e));
    }
    let deadline = tokio::time::Instant::now() + cfg.connect_timeout;
    let mut answer = std::pin::pin!(tokio::time::timeout_at(
        deadline,
        protocol::expect_frame(&mut rd, "READY")
    ));
    let mut buf = relay::SpareBuf::take();
    loop {
        let room = !*consumer_done && early.len() < MAX_EARLY;
        tokio::select! {
            answer = &mut answer => {
                return match answer {
                    Ok(Ok(Frame::Ready { features })) if features & protocol::FEATURE_FRAMED != 0 => Ok(()),
                    Ok(Ok(Frame::Refused { code, message })) => Err(Early::Refused(fail(
                        Outcome::Refused,
                        format!("server refused route {:?}: {code}: {message}", cfg.route),
                    ))),
                    Ok(Ok(other)) => Err(Early::Refused(fail(
                        Outcome::ProtocolError,
                        format!("expected a framed READY, got {other:?}"),
                    ))),
                    Ok(Err(e)) => Err(Early::Dead(describe_open_error(&e))),
                    Err(_) => Err(Early::Refused(fail(
                        Outcome::ProtocolError,
                        format!("no answer to OPEN within {:?}", cfg.connect_timeout),
                    ))),
                };
            }
            n = consumer.read(&mut buf[relay::SpareBuf::HEAD..]), if room => {
                let n = n.unwrap_or(0);
                let frame = if n == 0 {
                    *consumer_done = true;
                    &protocol::stream_header(protocol::END, 0)[..]
                } else {
                    const HEAD: usize = relay::SpareBuf::HEAD;
                    early.extend_from_slice(&buf[HEAD..HEAD + n]);
                    buf[HEAD - 3..HEAD].copy_from_slice(&protocol::stream_header(protocol::DATA, n));
                    &buf[HEAD - 3..HEAD + n]
                };
                if let Err(e) = async { wr.write_all(frame).await?; wr.flush().await }.await {
                    return Err(dead(&e));
                }
            }
        }
    }
}

/// Server side: the TLS handshake, under the handshake timeout, in this connection's task.
async fn handshake_in(
    server: &ServerTls,
    tcp: Stream,
    timeout: Duration,
) -> Result<ServerStream, Failure> {
    match tokio::time::timeout(timeout, server.accept(tcp)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(fail(
            Outcome::HandshakeFailed,
            format!(
                "TLS handshake failed: {}",
                tls::describe_handshake_error(&e)
            ),
        )),
        Err(_) => Err(fail(
            Outcome::HandshakeFailed,
            format!("TLS handshake timed out after {timeout:?}"),
        )),
    }
}

/// Server side: the client's certificate chains to the CA (rustls checked that); now its
/// identity must pass the `--allow-*` rules. With `--disable-authentication` there is no
/// identity to check.
fn authorize(cfg: &TunnelConfig, tls: &ServerStream) -> Result<Option<PeerIdentity>, Failure> {
    if cfg.disable_authentication {
        return Ok(None);
    }
    let id = tls::peer_identity(tls.get_ref().1).map_err(|e| fail(Outcome::Unauthorized, e))?;
    if cfg.allow.admits(&id) {
        Ok(Some(id))
    } else {
        Err(fail(
            Outcome::Unauthorized,
            format!("client identity {id} is not allowed by the --allow-* rules"),
        ))
    }
}

/// Server side over `legate/1`: the next OPEN. A client may keep a connection in its pool for
/// up to `--idle-timeout` before using it; closing it unused is not an error (outcome `idle`).
async fn read_open(
    cfg: &TunnelConfig,
    tls: &mut ServerStream,
) -> Result<protocol::Opening, Failure> {
    let opening = match tokio::time::timeout(cfg.idle_timeout, protocol::read_opening(tls)).await {
        Ok(Ok(opening)) => opening,
        Ok(Err(protocol::Error::Closed(_))) => {
            return Err(fail(
                Outcome::Idle,
                "client closed without opening a stream",
            ));
        }
        Ok(Err(protocol::Error::Io(e))) => {
            return Err(fail(Outcome::Idle, format!("client connection ended: {e}")));
        }
        Ok(Err(e)) => {
            if matches!(
                e,
                protocol::Error::Version(_)
                    | protocol::Error::Malformed(..)
                    | protocol::Error::TooLarge(_)
            ) {
                let refusal = Frame::Refused {
                    code: RefuseCode::BadRequest,
                    message: e.to_string(),
                };
                let _ = protocol::write_frame(tls, &refusal).await;
            }
            return Err(fail(Outcome::ProtocolError, format!("bad OPEN: {e}")));
        }
        Err(_) => {
            return Err(fail(
                Outcome::Idle,
                format!("no OPEN within the idle timeout ({:?})", cfg.idle_timeout),
            ));
        }
    };
    Ok(opening)
}

/// Checks that this tunnel could serve a connection now, for `/_status`: the server side
/// connects to each target; the client side completes a TLS handshake with its server and,
/// over `legate/1`, waits for the greeting that says it was admitted.
pub async fn probe_backend(cfg: &TunnelConfig, tls: &TlsEnd) -> Result<(), String> {
    let timeout = cfg.connect_timeout.min(Duration::from_secs(5));
    match tls {
        TlsEnd::Server(_) => {
            for target in cfg.target.iter().chain(cfg.routes.values()) {
                dial::dial(target, timeout)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(())
        }
        TlsEnd::Client(client) => {
            let (mut stream, _) = dial_peer(cfg, client, None).await.map_err(|f| f.detail)?;
            if tls::negotiated_legate(stream.get_ref().1) {
                let hello = protocol::expect_frame(&mut stream, "HELLO");
                match tokio::time::timeout(timeout, hello).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(describe_open_error(&e)),
                    Err(_) => return Err("no greeting from the server".into()),
                }
            }
            let _ = stream.shutdown().await;
            Ok(())
        }
    }
}

/// Server side: what every stream of one TLS connection shares, for logs and PROXY headers.
#[derive(Clone)]
struct ConnInfo {
    peer: PeerAddr,
    session: Option<String>,
    identity: Option<PeerIdentity>,
    /// Where the client connected to: the PROXY header's destination.
    destination: Option<std::net::SocketAddr>,
    tls_version: Option<String>,
}

impl ConnInfo {
    fn new(rec: &Record, tls: &ServerStream) -> ConnInfo {
        let (stream, conn) = tls.get_ref();
        ConnInfo {
            peer: rec.peer,
            session: rec.session.clone(),
            identity: rec.identity.clone(),
            destination: stream.get_ref().local_addr(),
            tls_version: conn.protocol_version().map(|v| match v {
                rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_string(),
                rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_string(),
                other => format!("{other:?}"),
            }),
        }
    }
}

/// Server side: the PROXY v2 header, sent to the target first. The source is the consumer as
/// the client ambassador saw it (`legate/1`), or else the TLS peer.
async fn send_proxy_header(
    plain: &mut Stream,
    rec: &Record,
    info: &ConnInfo,
) -> Result<(), (RefuseCode, Failure)> {
    let header = proxy_protocol::Header {
        source: rec.consumer.or(rec.peer.socket_addr()),
        destination: info.destination,
        tls_version: info.tls_version.clone(),
        common_name: rec
            .identity
            .as_ref()
            .and_then(|id| id.common_names.first().cloned()),
        identity: rec.identity.as_ref().map(ToString::to_string),
    };
    plain.write_all(&header.encode()).await.map_err(|e| {
        let detail = format!("sending the PROXY header to the target failed: {e}");
        (RefuseCode::DialFailed, fail(Outcome::DialFailed, detail))
    })
}

/// Server side: the target for a route name ("" is the default target).
fn pick_target<'a>(cfg: &'a TunnelConfig, route: &str) -> Option<&'a Address> {
    if route.is_empty() {
        cfg.target.as_ref()
    } else {
        cfg.routes.get(route)
    }
}

/// Server side: connect to the service.
async fn dial_target(
    cfg: &TunnelConfig,
    target: Option<&Address>,
    route: &str,
) -> Result<Stream, (RefuseCode, Failure)> {
    let Some(target) = target else {
        let detail = if route.is_empty() {
            "no default target: this server only serves named routes".to_string()
        } else {
            format!("unknown route {route:?}")
        };
        return Err((
            RefuseCode::UnknownRoute,
            fail(Outcome::UnknownRoute, detail),
        ));
    };
    match dial::dial(target, cfg.connect_timeout).await {
        Ok(tcp) => {
            tcp.tune(None);
            Ok(tcp)
        }
        Err(e) => Err((RefuseCode::DialFailed, fail(Outcome::DialFailed, e))),
    }
}

/// Client side: connect to the legate server and complete the handshake, both within the
/// connect timeout; then check the server against the `--verify-*` pins.
pub(crate) async fn dial_peer(
    cfg: &TunnelConfig,
    client: &ClientTls,
    metrics: Option<&TunnelMetrics>,
) -> Result<(ClientStream, PeerIdentity), Failure> {
    let target = cfg.target.as_ref().expect("a client tunnel has a target");
    let deadline = Instant::now() + cfg.connect_timeout;
    let tcp = dial::dial(target, cfg.connect_timeout)
        .await
        .map_err(|e| fail(Outcome::DialFailed, e))?;
    tcp.tune(Some(cfg.keepalive));
    let handshake = Instant::now();
    let tls = match tokio::time::timeout_at(deadline.into(), client.connect(tcp)).await {
        Ok(Ok(tls)) => {
            if let Some(m) = metrics {
                m.handshake.observe(handshake.elapsed());
            }
            tls
        }
        Ok(Err(e)) => {
            return Err(fail(
                Outcome::HandshakeFailed,
                format!(
                    "TLS handshake with {target} failed: {}",
                    tls::describe_handshake_error(&e)
                ),
            ));
        }
        Err(_) => {
            return Err(fail(
                Outcome::HandshakeFailed,
                format!(
                    "TLS handshake with {target} timed out after {:?}",
                    cfg.connect_timeout
                ),
            ));
        }
    };
    let id = tls::peer_identity(tls.get_ref().1).map_err(|e| fail(Outcome::Unauthorized, e))?;
    if !cfg.verify.is_empty() && !cfg.verify.admits(&id) {
        return Err(fail(
            Outcome::Unauthorized,
            format!("server identity {id} does not match the --verify-* pins"),
        ));
    }
    Ok((tls, id))
}

/// Client side: over `legate/1`, wait for the server's greeting (proof it admitted our
/// certificate), ask for the route, and wait for READY.
async fn open_out(
    cfg: &TunnelConfig,
    mut tls: ClientStream,
    rec: &mut Record,
) -> Result<ClientStream, Failure> {
    if !tls::negotiated_legate(tls.get_ref().1) {
        return Ok(tls);
    }
    rec.route = Some(cfg.route.clone());
    let consumer = rec.peer;
    let exchange = async {
        match protocol::expect_frame(&mut tls, "HELLO").await? {
            Frame::Hello { .. } => {}
            refused => return Ok(refused),
        }
        let open = Frame::Open(Open {
            features: 0,
            route: cfg.route.clone(),
            consumer: consumer.socket_addr(),
        });
        protocol::write_frame(&mut tls, &open).await?;
        protocol::expect_frame(&mut tls, "READY").await
    };
    let answer = match tokio::time::timeout(cfg.connect_timeout, exchange).await {
        Ok(Ok(frame)) => frame,
        Ok(Err(e)) => {
            return Err(fail(Outcome::ProtocolError, describe_open_error(&e)));
        }
        Err(_) => {
            return Err(fail(
                Outcome::ProtocolError,
                format!(
                    "no legate/1 answer from the server within {:?}",
                    cfg.connect_timeout
                ),
            ));
        }
    };
    match answer {
        Frame::Ready { .. } => Ok(tls),
        Frame::Refused { code, message } => Err(fail(
            Outcome::Refused,
            format!("server refused route {:?}: {code}: {message}", cfg.route),
        )),
        other => Err(fail(
            Outcome::ProtocolError,
            format!("expected READY, got {other:?}"),
        )),
    }
}

/// In TLS 1.3 a client learns that the server rejected its certificate only when it first
/// reads, which is here; say so rather than report a bare protocol error.
pub(crate) fn describe_open_error(e: &protocol::Error) -> String {
    match e {
        protocol::Error::Io(io) => format!(
            "server ended the connection: {}",
            tls::describe_handshake_error(io)
        ),
        protocol::Error::Closed("HELLO") => "server closed the connection before greeting us: \
             it did not admit this client (see its log and --allow-* rules)"
            .to_string(),
        e => format!("legate/1 exchange failed: {e}"),
    }
}

fn log_end(cfg: &TunnelConfig, rec: &Record, elapsed: Duration, result: Result<(), Failure>) {
    let identity = rec.identity.as_ref().map(ToString::to_string);
    let identity = identity.as_deref().unwrap_or("-");
    let route = rec.route.as_deref().unwrap_or("-");
    let session = rec.session.as_deref().unwrap_or("-");
    let consumer = rec
        .consumer
        .map_or_else(|| "-".to_string(), |c| c.to_string());
    let target = rec.target.as_deref().unwrap_or("-");
    let ms = elapsed.as_secs_f64() * 1000.0;
    let t = &rec.totals;
    let class = match &result {
        Ok(()) => QuietClass::Conns,
        // An unused connection ending (a status probe, a pooled connection retired or closed
        // at shutdown) is routine: debug level, and silenced with the good connections.
        Err(f) if f.outcome == Outcome::Idle => {
            if !quiet(QuietClass::Conns) {
                tracing::debug!(tunnel = %cfg.name, side = %cfg.side, peer = %rec.peer, detail = f.detail.as_str(), "idle connection ended");
            }
            return;
        }
        Err(f) if f.outcome == Outcome::HandshakeFailed => QuietClass::HandshakeErrs,
        Err(_) => QuietClass::ConnErrs,
    };
    if quiet(class) {
        return;
    }
    match result {
        Ok(()) => tracing::info!(
            tunnel = %cfg.name, side = %cfg.side, peer = %rec.peer, consumer, identity, route,
            target, tls = session, bytes_up = t.up, bytes_down = t.down, duration_ms = format_args!("{ms:.1}"),
            outcome = %Outcome::Ok, cut = t.cut,
            "connection closed"
        ),
        Err(f) => tracing::warn!(
            tunnel = %cfg.name, side = %cfg.side, peer = %rec.peer, consumer, identity, route,
            target, tls = session, bytes_up = t.up, bytes_down = t.down, duration_ms = format_args!("{ms:.1}"),
            outcome = %f.outcome, error = f.detail.as_str(),
            "connection failed"
        ),
    }
}
