//! Tunnel: one listener and the pipeline every connection on it goes through.
//!
//! In: a validated [`TunnelConfig`]. Out: served connections, each stream ending in one logged
//! [`Outcome`]. This is the only place that knows the order of the stages; read top to bottom,
//! [`serve_conn`] and the functions under it are the flow:
//!
//! ```text
//! client side:  accept ─▶ inbound (plain) ─▶ outbound: peer (stream on a kept legate/1
//!               connection, or a TLS connection of its own) ─▶ relay ─▶ finish
//! server side:  accept ─▶ inbound (TLS handshake, authorize, HELLO) ─▶ for each stream:
//!               route ─▶ outbound: service (dial, PROXY header) ─▶ answer ─▶ relay ─▶ finish
//! ```
//!
//! A server stream arrives on a [`Carrier`]: the raw TLS connection, or one stream of a
//! multiplexed connection; [`serve_stream`] is the same for both.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::Acceptor;
use crate::carrier::Carrier;
use crate::config::{Side, TunnelConfig};
use crate::inbound::{self, ConnInfo};
use crate::log::{self, Record};
use crate::metrics::TunnelMetrics;
use crate::mux::{self, Open, RefuseCode};
use crate::net::{Address, Listener, PeerAddr, Stream};
use crate::outbound::{self, Early};
use crate::outcome::{Failure, Outcome, fail};
use crate::peer_pool::{PeerPool, Peers};
use crate::tls::{self, ClientTls, ServerStream, ServerTls};
use crate::upstream::discovery::SourceView;
use crate::upstream::{Endpoint, Routes, Set, join_all};
use crate::{dial, health};
use crate::{redis, relay};

/// Why a tunnel could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}", prefix_lines(tunnel, source))]
    Tls { tunnel: String, source: tls::Error },
    #[error(
        "tunnel {tunnel:?}: target {target} does not resolve ({cause}); check the name, or pass --skip-resolve if it will exist later"
    )]
    Resolve {
        tunnel: String,
        target: String,
        // Not `source`: the message says it already, and a chain would say it twice.
        cause: io::Error,
    },
    #[error("tunnel {tunnel:?}: cannot listen on {addr}: {cause}")]
    Bind {
        tunnel: String,
        addr: String,
        cause: io::Error,
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

/// Checks a tunnel's targets before they are used: client side, each server ambassador's
/// certificate name; both sides, that each name resolves (a name that does not resolve now is
/// a typo far more often than a service not yet up; unless told it may not exist yet, with
/// `--skip-resolve`). Discovered endpoints are checked as they are found.
pub fn check_targets(cfg: &TunnelConfig) -> Result<(), Error> {
    if let (Side::Client, Some(target)) = (cfg.side, &cfg.target) {
        for e in &target.endpoints {
            tls::server_name(&cfg.server_name_of(e)).map_err(|source| Error::Tls {
                tunnel: cfg.name.clone(),
                source,
            })?;
        }
    }
    let upstreams = cfg.target.iter().chain(cfg.routes.values());
    let checked = upstreams.filter(|_| !cfg.skip_resolve);
    for target in checked.flat_map(|u| u.addresses()) {
        let Address::Tcp(hp) = target else { continue };
        if let Err(cause) = std::net::ToSocketAddrs::to_socket_addrs(&(hp.host.as_str(), hp.port)) {
            return Err(Error::Resolve {
                tunnel: cfg.name.clone(),
                target: target.to_string(),
                cause,
            });
        }
    }
    Ok(())
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
                ServerTls::new(&cfg.tls, cfg.tls_versions).map(|s| TlsEnd::Server(Arc::new(s)))
            }
            Side::Client => {
                ClientTls::new(&cfg.tls, cfg.tls_versions, &cfg.verify, cfg.legate_protocol)
                    .map(|c| TlsEnd::Client(Arc::new(c)))
            }
        }
        .map_err(|source| Error::Tls {
            tunnel: cfg.name.clone(),
            source,
        })?;
        check_targets(&cfg)?;
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
            .map_err(|cause| Error::Bind {
                tunnel: self.cfg.name.clone(),
                addr: self.cfg.listen.to_string(),
                cause,
            })?;
        Ok(self.on(listener, metrics))
    }

    /// The tunnel on a listener already bound (one a tunnel it replaces handed over).
    pub fn on(self, listener: Listener, metrics: Arc<TunnelMetrics>) -> Tunnel {
        let acceptor = Acceptor::new(listener, self.cfg.max_concurrent_conns, {
            let metrics = metrics.clone();
            move || metrics.accept_failed()
        });
        let stop = CancellationToken::new();
        let peers = match &self.tls {
            TlsEnd::Client(client) => Some(Peers::new(
                self.cfg.clone(),
                client.clone(),
                metrics.clone(),
                stop.clone(),
            )),
            TlsEnd::Server(_) => None,
        };
        let routes = Arc::new(Routes::new(&self.cfg));
        Tunnel {
            shared: Arc::new(Shared {
                limit: (self.cfg.max_concurrent_conns > 0)
                    .then(|| Arc::new(tokio::sync::Semaphore::new(self.cfg.max_concurrent_conns))),
                peers,
                routes,
                cfg: self.cfg,
                tls: self.tls,
                metrics,
            }),
            acceptor,
            stop,
        }
    }
}

/// What every connection of a tunnel reads.
struct Shared {
    cfg: Arc<TunnelConfig>,
    tls: TlsEnd,
    metrics: Arc<TunnelMetrics>,
    /// Client side: the server ambassadors and the connections to each.
    peers: Option<Arc<Peers>>,
    /// Server side: the default target's endpoints and each route's.
    routes: Arc<Routes>,
    /// Server side, `--max-concurrent-conns` for multiplexed streams: each counts as one
    /// connection (the TLS connections are capped by the acceptor).
    limit: Option<Arc<tokio::sync::Semaphore>>,
}

/// A bound tunnel.
pub struct Tunnel {
    acceptor: Acceptor,
    shared: Arc<Shared>,
    /// Ends the peer pool's keeper when serving ends.
    stop: CancellationToken,
}

impl Tunnel {
    pub fn local_addr(&self) -> io::Result<String> {
        self.acceptor.local_addr()
    }

    pub fn config(&self) -> &TunnelConfig {
        &self.shared.cfg
    }

    /// Accepts until `stop` is cancelled, spawning each connection on `tracker` so the daemon
    /// can wait for them to drain. Returns the listener, still open: dropped, it closes; handed
    /// to a replacement, nobody connecting meanwhile is refused.
    pub async fn serve(self, stop: CancellationToken, tracker: TaskTracker) -> Listener {
        let _keeper = self.stop.clone().drop_guard();
        if let Some(peers) = &self.shared.peers {
            peers.start();
        }
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => None,
                accepted = self.acceptor.accept() => Some(accepted),
            };
            let Some((tcp, peer, permit)) = accepted else {
                // Stopped: discovery and health checks end with it, whatever still runs.
                match &self.shared.peers {
                    Some(peers) => peers.close(),
                    None => self.shared.routes.close(),
                }
                return self.acceptor.into_listener();
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

/// One accepted connection, start to end. The client side serves one consumer; the server side
/// serves one TLS connection, which carries one stream (raw) or many (`legate/1`).
async fn serve_conn(t: &Arc<Shared>, tcp: Stream, peer: PeerAddr, stop: &CancellationToken) {
    let _open = t.metrics.open();
    match (&t.tls, &t.peers) {
        // Boxed: one task type serves both sides, and the server side's connection future is
        // the larger; inline, it would size every client-side consumer's task too.
        (TlsEnd::Server(server), _) => Box::pin(serve_peer(t, server, tcp, peer, stop)).await,
        (TlsEnd::Client(_), Some(peers)) => serve_consumer(t, peers, tcp, peer).await,
        (TlsEnd::Client(_), None) => unreachable!("a client tunnel has a peer pool"),
    }
}

/// Client side: one consumer connection: a carrier to the server ambassador (the consumer's
/// first bytes go with the stream's OPEN), then the relay.
async fn serve_consumer(t: &Shared, peers: &Peers, mut tcp: Stream, peer: PeerAddr) {
    let cfg = &t.cfg;
    let started = Instant::now();
    let mut rec = Record::new(peer);
    tcp.tune(None);
    let result = async {
        let mut early = Early::default();
        let carrier = Box::pin(outbound::peer(peers, cfg, &mut tcp, &mut rec, &mut early))
            .await
            .inspect_err(|_| rec.totals.up = early.len());
        t.metrics
            .accepted(carrier.as_ref().map(|_| ()).map_err(|_| false));
        let (carrier, _in_use) = carrier?;
        // The early bytes will not be sent again: do not hold them for the connection's life.
        let (early_len, sent_end) = (early.len(), early.done);
        drop(early);
        let redis = cfg.target.as_ref().and_then(|u| u.redis.as_ref());
        let totals = match (redis, carrier) {
            // --raw to a Redis that speaks TLS: this side authenticates (config checks --raw).
            (Some(settings), Carrier::Raw(mut tls)) => {
                if let Err(f) = Box::pin(ready_redis(cfg, settings, &mut tls, &mut tcp)).await {
                    rec.totals.down = f.1;
                    return Err(f.0);
                }
                let end = relay::End {
                    deadline: cfg
                        .max_conn_lifetime
                        .map(|d| tokio::time::Instant::now() + d),
                    stop: None,
                };
                // Boxed, as the other rare paths' relays are: inline, the largest of them would
                // size every consumer's task.
                if settings.consumer_auth == redis::ConsumerAuth::Local {
                    let redis = redis::leading::Filtered::new(&mut *tls);
                    Box::pin(relay::relay(&mut tcp, redis, cfg.close_timeout, end)).await
                } else {
                    Box::pin(relay::relay(&mut tcp, &mut *tls, cfg.close_timeout, end)).await
                }
            }
            (_, mut carrier) => {
                carrier
                    .relay(
                        &mut tcp,
                        cfg.close_timeout,
                        sent_end,
                        cfg.max_conn_lifetime,
                        None,
                    )
                    .await
            }
        };
        rec.totals = relay::Totals {
            up: early_len + totals.up,
            ..totals
        };
        relay_failure(&rec)
    }
    .await;
    finish(t, &rec, started, result);
}

/// Client side, straight to a Redis that speaks TLS: readies the connection as a server
/// ambassador readies its plain one. A refused AUTH is told to the consumer as a RESP error
/// (the bytes sent to it are returned with the failure).
async fn ready_redis(
    cfg: &TunnelConfig,
    settings: &redis::Settings,
    tls: &mut crate::tls::ClientStream,
    consumer: &mut Stream,
) -> Result<(), (Failure, u64)> {
    use tokio::io::AsyncWriteExt;
    if !settings.prepares() {
        return Ok(());
    }
    match redis::prepare(tls, settings, cfg.connect_timeout).await {
        Ok(()) => Ok(()),
        Err(redis::Refusal::Auth(why)) => {
            let (reply, f) = auth_refused(&why);
            let _ = consumer.write_all(reply.as_bytes()).await;
            let _ = consumer.shutdown().await;
            Err((f, reply.len() as u64))
        }
        Err(redis::Refusal::NotMaster(why) | redis::Refusal::Failed(why)) => {
            Err((fail(Outcome::DialFailed, why), 0))
        }
    }
}

/// Redis refused the ambassador's credentials: the one RESP error line the consumer reads
/// before EOF, and the failure logged.
fn auth_refused(why: &str) -> (String, Failure) {
    // One line, whatever the reason says.
    let why = why.replace(['\r', '\n'], " ");
    let reply = format!("-ERR legate: upstream authentication failed: {why}\r\n");
    let failure = fail(
        Outcome::AuthFailed,
        format!("Redis refused the credentials: {why}"),
    );
    (reply, failure)
}

/// Server side: handshake and authorize once; then either the one raw stream to the default
/// target, or, over `legate/1`, the greeting and a stream per OPEN.
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
    let reloads = server.reloads();
    // The set-up stages are boxed: their futures are large and short-lived, and left inline
    // they would size every connection's task for its whole life (docs/performance.md).
    let mut tls = match Box::pin(inbound::handshake(server, tcp, cfg.handshake_timeout)).await {
        // Boxed: the connection state stays put while the future around it stays small.
        Ok(tls) => Box::new(tls),
        Err(f) => {
            t.metrics.handshake_failed(started.elapsed());
            t.metrics
                .accepted(Err(started.elapsed() >= cfg.handshake_timeout));
            return finish(t, &rec, started, Err(f));
        }
    };
    t.metrics.handshake_done(started.elapsed());
    rec.session = Some(tls::describe_session(tls.get_ref().1));
    match inbound::authorize(cfg, &tls) {
        Ok(id) => rec.identity = id,
        Err(f) => {
            t.metrics.accepted(Err(false));
            return finish(t, &rec, started, Err(f));
        }
    }
    let info = ConnInfo::new(&rec, &tls);
    if !tls::negotiated_legate(tls.get_ref().1) {
        // Raw: the TLS stream is the byte stream to the default target.
        return serve_stream(t, &info, Carrier::Raw(tls), None, started).await;
    }
    let greeted = inbound::greet(cfg, &mut tls).await;
    t.metrics
        .accepted(greeted.as_ref().map_err(|_| false).copied());
    if let Err(f) = greeted {
        return finish(t, &rec, started, Err(f));
    }
    let ended = serve_mux(t, tls, info, reloads, stop).await;
    finish(t, &rec, started, Err(ended));
}

/// Server side: one stream, whatever carried it: route, dial the service (and send it the
/// PROXY header), answer READY or REFUSED, relay, finish.
async fn serve_stream(
    t: &Shared,
    info: &ConnInfo,
    mut carrier: Carrier<ServerStream>,
    open: Option<Open>,
    started: Instant,
) {
    let cfg = &t.cfg;
    let mut rec = info.record();
    let route = open.as_ref().map_or("", |o| o.route.as_str());
    rec.route = open.as_ref().map(|o| o.route.clone());
    rec.consumer = open.as_ref().and_then(|o| o.consumer);
    let set = t.routes.get(route);
    let service = Box::pin(outbound::service(cfg, set.as_deref(), &mut rec, info)).await;
    let redis = set.as_ref().and_then(|s| s.redis.clone());
    // Not held for the relay: a set a reload replaced goes (with its tasks) as soon as no new
    // connection can pick from it.
    drop(set);
    // A raw connection is its one stream: its onward connection decides whether it was set up.
    if matches!(carrier, Carrier::Raw(_)) {
        t.metrics
            .accepted(service.as_ref().map(|_| ()).map_err(|_| false));
    }
    let result = match service {
        Err((_, f)) if f.outcome == Outcome::AuthFailed => {
            // The consumer reads a RESP error it understands, then EOF.
            carrier.ready();
            let (reply, failure) = auth_refused(&f.detail);
            let plain =
                tokio::io::join(std::io::Cursor::new(reply.into_bytes()), tokio::io::sink());
            // Boxed: a rare path, which would otherwise size every stream's task.
            let totals = Box::pin(carrier.relay(plain, cfg.close_timeout, false, None, None)).await;
            rec.totals = relay::Totals {
                up: totals.down,
                down: totals.up,
                ..totals
            };
            Err(failure)
        }
        Err((code, f)) => {
            carrier.refuse(code, &f.detail).await;
            Err(f)
        }
        Ok((plain, in_use)) => {
            carrier.ready();
            // A Redis route's sessions end when their Redis stops being master or leaves
            // the route (a Sentinel named another).
            let stop = in_use.sessions.clone();
            let (close, lifetime) = (cfg.close_timeout, cfg.max_conn_lifetime);
            let totals = match redis.as_ref().map(|r| r.consumer_auth) {
                Some(redis::ConsumerAuth::Local) => {
                    // Boxed: the filter's relay is the larger, and only its routes pay for it.
                    let plain = redis::leading::Filtered::new(plain);
                    Box::pin(carrier.relay(plain, close, false, lifetime, stop)).await
                }
                _ => carrier.relay(plain, close, false, lifetime, stop).await,
            };
            // The carrier is the client's end: what it sends goes up to the service.
            rec.totals = relay::Totals {
                up: totals.down,
                down: totals.up,
                ..totals
            };
            relay_failure(&rec)
        }
    };
    finish(t, &rec, started, result);
}

/// Server side: a `legate/1` connection, greeted. Streams run as tasks of their own; this waits
/// until the connection ends, and stops it taking streams (GOAWAY) when the tunnel stops, the
/// TLS material is reloaded, or it has had no stream for the idle timeout. Returns how it
/// ended: `idle` (the connection's streams have lines of their own), or `protocol_error`.
async fn serve_mux(
    t: &Arc<Shared>,
    tls: Box<ServerStream>,
    info: ConnInfo,
    mut reloads: tokio::sync::watch::Receiver<u64>,
    stop: &CancellationToken,
) -> Failure {
    let cfg = &t.cfg;
    let streams = TaskTracker::new();
    // Shared by the connection's streams: a clone per stream was 232 bytes in each stream's
    // task and a copy of every name in it on the heap.
    let info = Arc::new(info);
    let on_open = {
        let (t, streams) = (t.clone(), streams.clone());
        let (reloads, stop) = (reloads.clone(), stop.clone());
        move |incoming: mux::Incoming, open: Result<Open, mux::frame::Error>| {
            let open = match open {
                Ok(open) => open,
                Err(e) => {
                    let f = fail(Outcome::ProtocolError, format!("bad OPEN: {e}"));
                    let mut rec = info.record();
                    rec.route = Some(String::new());
                    incoming.refuse(RefuseCode::BadRequest, &e.to_string());
                    return finish(&t, &rec, Instant::now(), Err(f));
                }
            };
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
            let stream = incoming.accept();
            streams.spawn(async move {
                let started = Instant::now();
                serve_stream(&t, &info, Carrier::Stream(stream), Some(open), started).await;
                drop(permit);
            });
        }
    };
    let conn = mux::Conn::start(mux::Role::Server, tls, &[], on_open);
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
    let why = why.map_or_else(
        || conn.dead().unwrap_or("connection closed").to_string(),
        str::to_string,
    );
    let outcome = if conn.violated() {
        Outcome::ProtocolError
    } else {
        Outcome::Idle
    };
    fail(outcome, why)
}

/// A relay cut at `--max-conn-lifetime` is reported as `expired`; one that ended on a failed
/// link (not a close), as `aborted`.
fn relay_failure(rec: &Record) -> Result<(), Failure> {
    if rec.totals.stopped {
        return Err(fail(
            Outcome::NotMaster,
            "closed: its Redis is no longer the master this route uses",
        ));
    }
    if rec.totals.expired {
        return Err(fail(
            Outcome::Expired,
            "closed at its maximum lifetime (--max-conn-lifetime)",
        ));
    }
    match &rec.totals.failed {
        Some(e) => Err(fail(Outcome::Aborted, format!("connection broke: {e}"))),
        None => Ok(()),
    }
}

/// Counts and logs the end of one stream (or of a connection that carried none).
fn finish(t: &Shared, rec: &Record, started: Instant, result: Result<(), Failure>) {
    let elapsed = started.elapsed();
    let outcome = result.as_ref().map_or_else(|f| f.outcome, |()| Outcome::Ok);
    t.metrics
        .finished(outcome, rec.totals.up, rec.totals.down, elapsed);
    log::log_end(&t.cfg, rec, elapsed, result);
}

/// A running tunnel's endpoints, for `/_status`.
#[derive(Clone)]
pub enum Upstreams {
    Server(Arc<Routes>),
    Client(Arc<Peers>),
}

impl Upstreams {
    /// Every discovery source with its route, as it stands.
    pub fn sources(&self, cfg: &TunnelConfig) -> Vec<(String, SourceView)> {
        let views = |route: &str, set: &Set| {
            let route = route.to_string();
            set.sources()
                .iter()
                .map(move |s| (route.clone(), s.view()))
                .collect::<Vec<_>>()
        };
        match self {
            Upstreams::Server(routes) => {
                let table = routes.table();
                let mut all: Vec<_> = table.default.iter().flat_map(|s| views("", s)).collect();
                for (name, set) in &table.named {
                    all.extend(views(name, set));
                }
                all
            }
            Upstreams::Client(peers) => views(&cfg.route, &peers.set),
        }
    }

    /// Every endpoint with its route ("" for the default target; client side: the route it
    /// asks for), and whether it may take new connections now ([`Set::taking`]).
    pub fn endpoints(&self, cfg: &TunnelConfig) -> Vec<(String, Arc<Endpoint>, bool)> {
        let now = Instant::now();
        let with_route = |route: &str, set: &Set| {
            set.taking(now)
                .into_iter()
                .map(|(e, takes)| (route.to_string(), e, takes))
                .collect::<Vec<_>>()
        };
        match self {
            Upstreams::Server(routes) => {
                let table = routes.table();
                let default = table.default.iter().map(|s| (String::new(), s));
                let named = table.named.iter().map(|(n, s)| (n.clone(), s));
                default
                    .chain(named)
                    .flat_map(|(route, set)| with_route(&route, set))
                    .collect()
            }
            Upstreams::Client(peers) => with_route(&cfg.route, &peers.set),
        }
    }
}

impl Upstreams {
    /// Takes `cfg`'s targets and routes in place (a reload that changed nothing else): new
    /// connections go to the new endpoints at once; open ones stay where they are. The caller
    /// runs [`check_targets`] first, for every tunnel it changes.
    pub fn retarget(&self, cfg: &TunnelConfig) {
        match self {
            Upstreams::Server(routes) => routes.update(cfg),
            Upstreams::Client(peers) => peers.update(cfg),
        }
    }
}

impl Tunnel {
    pub fn upstreams(&self) -> Upstreams {
        match &self.shared.peers {
            Some(peers) => Upstreams::Client(peers.clone()),
            None => Upstreams::Server(self.shared.routes.clone()),
        }
    }
}

/// Checks that this tunnel could serve a connection now, for `/_status`: the server side
/// connects to each target (or GETs `--target-status` through it); the client side completes a
/// TLS handshake with its server and, over `legate/1`, waits for the greeting that says it was
/// admitted. A route (or the client's set of servers) is healthy when one of its endpoints is.
pub async fn probe_backend(cfg: &TunnelConfig, upstreams: &Upstreams) -> Result<(), String> {
    let timeout = cfg.connect_timeout.min(Duration::from_secs(5));
    match upstreams {
        Upstreams::Server(routes) => {
            let table = routes.table();
            if let (Some(url), Some(set)) = (&cfg.target_status, &table.default) {
                let endpoints = set.endpoints();
                let checks = endpoints
                    .iter()
                    .map(|e| health::http_status(&e.spec.addr, url, timeout));
                return any_ok(join_all(checks).await);
            }
            let sets = table.default.iter().chain(table.named.values());
            for set in sets {
                let endpoints = set.endpoints();
                let dials = endpoints.iter().map(|e| async move {
                    dial::dial(&e.spec.addr, timeout)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                });
                any_ok(join_all(dials).await)?;
            }
            Ok(())
        }
        Upstreams::Client(peers) => {
            let pools = peers.pools();
            let probes = pools.iter().map(|p| probe_peer(p, timeout));
            any_ok(join_all(probes).await)
        }
    }
}

/// Ok if any is; otherwise every error, joined.
fn any_ok(results: Vec<Result<(), String>>) -> Result<(), String> {
    if results.iter().any(Result::is_ok) {
        return Ok(());
    }
    if results.is_empty() {
        return Err("no endpoint yet: discovery has found none".into());
    }
    Err(results
        .into_iter()
        .filter_map(Result::err)
        .collect::<Vec<_>>()
        .join("; "))
}

async fn probe_peer(pool: &PeerPool, timeout: Duration) -> Result<(), String> {
    let (mut tls, _) = pool.dial_peer(None).await.map_err(|f| f.detail)?;
    if !tls::negotiated_legate(tls.get_ref().1) {
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut tls).await;
        return Ok(());
    }
    let conn = mux::Conn::start(mux::Role::Client, tls, &[], |_, _| {});
    let greeted = tokio::time::timeout(timeout, conn.greeted()).await;
    conn.drain();
    match greeted {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(why)) => Err(why),
        Err(_) => Err("no greeting from the server".into()),
    }
}
