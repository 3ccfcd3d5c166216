//! Peer pool: the client side's connections to its server ambassador.
//!
//! In: a client tunnel's config and TLS end. Out: for each consumer connection, something to
//! carry it on ([`Dialed`]): a kept multiplexed `legate/1` connection, or a TLS connection of
//! its own.
//!
//! **Detection costs nothing.** Until it knows better, the pool opens no connection that no
//! consumer asked for. A consumer's own connection offers `legate/1` in ALPN: taken, it becomes
//! the pool's multiplexed connection with that consumer as its first stream; not taken, the
//! consumer is carried raw on it, and the pool remembers the peer is raw (until a dial fails
//! or the TLS material is reloaded), so every later consumer gets a TLS connection of its own,
//! dialled when it connects, with session resumption, as ghostunnel does. Consumers that
//! arrive while the first connection is being made wait for it rather than dial their own.
//!
//! **Kept connections.** Once the peer is known to speak `legate/1` (it took it, a route is
//! configured, or `--peer-is-legate` says so, in which case from startup), a keeper task holds
//! `--pool-size` multiplexed connections open, proves each live with PING, and replaces those
//! that die, drain (GOAWAY), predate a reload, or near the server's idle limit. New streams go
//! to the connection with the fewest.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::TunnelConfig;
use crate::dial;
use crate::metrics::TunnelMetrics;
use crate::mux::{Conn, Role};
use crate::net::Address;
use crate::outcome::{Failure, Outcome, fail};
use crate::tls::{self, ClientStream, ClientTls, PeerIdentity};
use crate::upstream::{Endpoint, Refresh, Set};
use arc_swap::ArcSwap;
use rustls::pki_types::ServerName;

/// How long a server keeps an idle connection when its HELLO does not say.
const ASSUMED_IDLE: Duration = Duration::from_secs(30);
/// How often a kept connection is asked to prove itself live (or `--keepalive`, if shorter).
const PING_EVERY: Duration = Duration::from_secs(5);
/// The most connections kept per server without `--pool-size`: one per worker thread up to
/// this many.
const MAX_DEFAULT_POOL: usize = 4;

/// A client tunnel's server ambassadors: the set the balancer picks from, and a pool per
/// endpoint. Both can be replaced by a reload that changes only the targets
/// ([`Peers::update`]).
pub struct Peers {
    pub set: Set,
    pools: ArcSwap<Vec<Arc<PeerPool>>>,
    cfg: Arc<TunnelConfig>,
    tls: Arc<ClientTls>,
    metrics: Arc<TunnelMetrics>,
    stop: CancellationToken,
    started: AtomicBool,
    /// Held while the endpoint list and the pools are brought in line, so two changes at once
    /// cannot both make a pool for the same new endpoint.
    syncing: Mutex<()>,
}

impl Peers {
    /// The server ambassadors of `cfg`'s target (their names were checked at startup), with
    /// its discovery sources started.
    pub fn new(
        cfg: Arc<TunnelConfig>,
        tls: Arc<ClientTls>,
        metrics: Arc<TunnelMetrics>,
        stop: CancellationToken,
    ) -> Arc<Peers> {
        let upstream = cfg.target.clone().expect("a client side has a target");
        let peers = Arc::new(Peers {
            set: Set::new(&upstream, upstream.balance.unwrap_or(cfg.balance), false),
            pools: ArcSwap::from_pointee(Vec::new()),
            cfg,
            tls,
            metrics,
            stop,
            started: AtomicBool::new(false),
            syncing: Mutex::new(()),
        });
        peers.sync_pools();
        let weak: Weak<dyn Refresh> = Arc::downgrade(&peers) as Weak<dyn Refresh>;
        peers.set.discover_for(&weak);
        peers
    }

    fn pool(&self, endpoint: &Arc<Endpoint>, name: ServerName<'static>) -> Arc<PeerPool> {
        PeerPool::new(
            self.cfg.clone(),
            self.tls.clone(),
            (endpoint.clone(), name),
            self.metrics.clone(),
            self.stop.child_token(),
        )
    }

    /// Starts each pool (see [`PeerPool::start`]).
    pub fn start(&self) {
        self.started.store(true, Ordering::Release);
        for pool in self.pools.load().iter() {
            pool.start();
        }
    }

    /// The pools now, one per endpoint.
    pub fn pools(&self) -> Arc<Vec<Arc<PeerPool>>> {
        self.pools.load_full()
    }

    /// The pool of endpoint `e`, unless it was removed meanwhile.
    pub fn pool_for(&self, e: &Endpoint) -> Option<Arc<PeerPool>> {
        self.pools
            .load()
            .iter()
            .find(|p| p.endpoint.id == e.id)
            .cloned()
    }

    /// Takes `cfg`'s server ambassadors (a reload that changed only them).
    pub fn update(&self, cfg: &TunnelConfig) {
        if let Some(upstream) = &cfg.target {
            let _one = self.syncing.lock().unwrap_or_else(|e| e.into_inner());
            self.set.update(upstream);
            self.sync_pools();
        }
    }

    /// Ends discovery and every pool's keeper (the tunnel stopped); streams open carry on.
    pub fn close(&self) {
        self.set.close();
        for pool in self.pools().iter() {
            pool.close();
        }
    }

    /// Gives every endpoint of the set a pool: pools of endpoints still listed stay as they
    /// are, new ones get pools (an endpoint whose name cannot be a TLS server name gets none,
    /// and is said so), and removed ones stop taking streams (their open streams carry on).
    fn sync_pools(&self) {
        let old = self.pools();
        let mut pools = Vec::new();
        for e in self.set.endpoints().iter() {
            if let Some(kept) = old.iter().find(|p| p.endpoint.id == e.id) {
                pools.push(kept.clone());
                continue;
            }
            let name = match tls::server_name(&self.cfg.server_name_of(&e.spec)) {
                Ok(name) => name,
                Err(err) => {
                    tracing::warn!(tunnel = %self.cfg.name, endpoint = %e.spec.addr, error = %err, "endpoint not used");
                    continue;
                }
            };
            let pool = self.pool(e, name);
            if self.started.load(Ordering::Acquire) {
                pool.start();
            }
            pools.push(pool);
        }
        for gone in old
            .iter()
            .filter(|p| !pools.iter().any(|k| Arc::ptr_eq(k, p)))
        {
            gone.close();
        }
        self.pools.store(Arc::new(pools));
    }
}

impl Refresh for Peers {
    fn refresh(&self) {
        let _one = self.syncing.lock().unwrap_or_else(|e| e.into_inner());
        if self.set.refresh_endpoints() {
            self.sync_pools();
        }
    }
}

/// What a consumer connection is carried on.
pub enum Dialed {
    /// A TLS connection of its own that did not take `legate/1`.
    Raw {
        tls: Box<ClientStream>,
        session: String,
        identity: PeerIdentity,
    },
    /// A multiplexed connection to open a stream on.
    Mux(MuxConn),
}

/// A multiplexed connection and what the consumer logs say about it.
#[derive(Clone)]
pub struct MuxConn {
    pub conn: Arc<Conn>,
    pub session: String,
    pub identity: Option<PeerIdentity>,
    /// The client's TLS generation it was made with: after a reload it takes no new streams.
    generation: u64,
    /// Whether the pool keeps it (`--pool-size=0`: each connection carries one stream).
    pub kept: bool,
}

impl MuxConn {
    /// Whether new streams may go on it now.
    fn usable(&self, generation: u64) -> bool {
        let idle_limit = match self.conn.hello() {
            Some(h) if h.idle_secs > 0 => Duration::from_secs(u64::from(h.idle_secs)),
            _ => ASSUMED_IDLE,
        };
        // Retired well before the server gives up on it, allowing for scheduling slack.
        self.conn.usable()
            && self.generation == generation
            && self.conn.idle_for() < idle_limit.mul_f64(0.75)
    }
}

/// What the pool knows of its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Unknown,
    /// It did not take `legate/1`: one TLS connection per consumer.
    Raw,
    /// It speaks `legate/1`: streams on kept connections.
    Legate,
}

struct State {
    kind: Kind,
    /// The TLS generation `kind` was learned under: a reload forgets it.
    generation: u64,
    conns: Vec<MuxConn>,
}

/// One client tunnel's connections to its server ambassador.
pub struct PeerPool {
    cfg: Arc<TunnelConfig>,
    tls: Arc<ClientTls>,
    /// The server ambassador this pool connects to, and the name its certificate must carry.
    endpoint: Arc<Endpoint>,
    server_name: ServerName<'static>,
    metrics: Arc<TunnelMetrics>,
    state: Mutex<State>,
    /// While the kind is being learned (or the first kept connection made), one dial at a
    /// time: consumers arriving meanwhile wait and share its result.
    opening: tokio::sync::Mutex<()>,
    /// Wakes the keeper: a connection changed, or the peer turned out to speak `legate/1`.
    wake: Arc<Notify>,
    keeping: AtomicBool,
    stop: CancellationToken,
    /// Connections to keep: `--pool-size`, or one per runtime worker thread.
    size: usize,
}

impl PeerPool {
    /// A pool for `endpoint` that has opened nothing yet. `stop` ends its keeper.
    fn new(
        cfg: Arc<TunnelConfig>,
        tls: Arc<ClientTls>,
        endpoint: (Arc<Endpoint>, ServerName<'static>),
        metrics: Arc<TunnelMetrics>,
        stop: CancellationToken,
    ) -> Arc<PeerPool> {
        let generation = tls.generation();
        // One connection per worker thread by default: one connection's TLS work runs on one
        // thread at a time, so with several threads the streams spread over as many. At most
        // MAX_DEFAULT_POOL, so a big host does not keep dozens of connections to every server.
        let workers =
            tokio::runtime::Handle::try_current().map_or(1, |h| h.metrics().num_workers());
        let size = cfg.pool_size.unwrap_or(workers.clamp(1, MAX_DEFAULT_POOL));
        Arc::new(PeerPool {
            cfg,
            tls,
            endpoint: endpoint.0,
            server_name: endpoint.1,
            metrics,
            state: Mutex::new(State {
                kind: Kind::Unknown,
                generation,
                conns: Vec::new(),
            }),
            opening: tokio::sync::Mutex::new(()),
            wake: Arc::new(Notify::new()),
            keeping: AtomicBool::new(false),
            stop,
            size,
        })
    }

    /// Starts keeping connections ahead of consumers when the peer is known to be legate
    /// (a route, or `--peer-is-legate`); otherwise does nothing until a consumer connects.
    pub fn start(self: &Arc<Self>) {
        if self.cfg.peer_is_legate {
            self.keep();
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What is known of the peer under TLS generation `generation`.
    fn kind(&self, generation: u64) -> Kind {
        let mut s = self.state();
        if s.generation != generation {
            s.generation = generation;
            s.kind = Kind::Unknown;
        }
        s.kind
    }

    fn set_kind(&self, kind: Kind, generation: u64) {
        let mut s = self.state();
        s.kind = kind;
        s.generation = generation;
    }

    /// The kept connection with the fewest streams that takes new ones.
    fn pick(&self, generation: u64) -> Option<MuxConn> {
        let s = self.state();
        s.conns
            .iter()
            .filter(|c| c.usable(generation))
            .min_by_key(|c| c.conn.active())
            .cloned()
    }

    /// Something to carry one consumer connection on.
    pub async fn connection(self: &Arc<Self>) -> Result<Dialed, Failure> {
        let generation = self.tls.generation();
        if let Some(c) = self.pick(generation) {
            return Ok(Dialed::Mux(c));
        }
        let shared = self.size > 0;
        match self.kind(generation) {
            Kind::Raw => return self.dial(generation).await,
            Kind::Legate if !shared => return self.dial(generation).await,
            Kind::Legate | Kind::Unknown => {}
        }
        // Wait for the connection being made, but no longer than a dial may take: against a
        // server that does not answer, consumers must not queue up one timeout after another.
        let one = tokio::time::timeout(self.cfg.connect_timeout, self.opening.lock())
            .await
            .ok();
        if let Some(c) = self.pick(generation) {
            return Ok(Dialed::Mux(c));
        }
        if self.kind(generation) == Kind::Raw {
            drop(one);
        }
        self.dial(generation).await
    }

    /// A new connection for a consumer: it becomes the pool's if the peer takes `legate/1`.
    async fn dial(self: &Arc<Self>, generation: u64) -> Result<Dialed, Failure> {
        let (tls, identity) = match self.dial_peer(Some(&self.metrics)).await {
            Ok(dialed) => dialed,
            Err(f) => {
                // What was learned of a peer that cannot be reached now is stale.
                if self.kind(generation) == Kind::Raw {
                    self.set_kind(Kind::Unknown, generation);
                }
                return Err(f);
            }
        };
        let session = tls::describe_session(tls.get_ref().1);
        if !tls::negotiated_legate(tls.get_ref().1) {
            if self.kind(generation) != Kind::Raw {
                tracing::info!(tunnel = %self.cfg.name, target = %self.target(), "server did not take legate/1: each consumer connection gets a TLS connection of its own");
                self.set_kind(Kind::Raw, generation);
            }
            return Ok(Dialed::Raw {
                tls: Box::new(tls),
                session,
                identity,
            });
        }
        self.set_kind(Kind::Legate, generation);
        let c = self.adopt(tls, session, Some(identity), generation);
        if c.kept {
            self.keep();
        }
        Ok(Dialed::Mux(c))
    }

    /// Starts a multiplexed connection on `tls` (`legate/1` taken); kept unless
    /// `--pool-size=0`.
    fn adopt(
        self: &Arc<Self>,
        tls: ClientStream,
        session: String,
        identity: Option<PeerIdentity>,
        generation: u64,
    ) -> MuxConn {
        let conn = Conn::start(Role::Client, tls, &[], |_, _| {});
        let c = MuxConn {
            conn,
            session,
            identity,
            generation,
            // A closed pool (its server left the list) keeps nothing: no keeper would tend it.
            kept: self.size > 0 && !self.stop.is_cancelled(),
        };
        if c.kept {
            self.state().conns.push(c.clone());
            let (conn, wake) = (c.conn.clone(), self.wake.clone());
            // Wakes the keeper on every change; ends with the connection (a cancellation,
            // which cannot be missed the way a notification between two polls can).
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = conn.ended() => break,
                        _ = conn.changed() => wake.notify_one(),
                    }
                }
                wake.notify_one();
            });
        }
        c
    }

    fn target(&self) -> String {
        self.endpoint.spec.addr.to_string()
    }

    /// The server ambassador this pool connects to.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// A new TLS connection to this pool's server, outside the pool (`/_status` probes).
    pub async fn dial_peer(
        &self,
        metrics: Option<&TunnelMetrics>,
    ) -> Result<(ClientStream, PeerIdentity), Failure> {
        let target = &self.endpoint.spec.addr;
        dial_peer(
            &self.cfg,
            target,
            &self.tls,
            self.server_name.clone(),
            metrics,
        )
        .await
    }

    /// Stops keeping connections: the keeper ends and kept connections take no new streams
    /// (the server ambassador was removed from the list).
    fn close(&self) {
        self.stop.cancel();
        for c in self.state().conns.drain(..) {
            c.conn.drain();
        }
    }

    /// Starts the keeper, once.
    fn keep(self: &Arc<Self>) {
        if self.size == 0 || self.keeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move { pool.keeper().await });
    }

    /// Keeps `--pool-size` live multiplexed connections until the tunnel stops, or until the
    /// peer turns out not to speak `legate/1`. Failures back off up to 5 s, so a server that is
    /// down is not hammered; consumers dial by themselves meanwhile.
    async fn keeper(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        let mut last_ping = Instant::now();
        loop {
            let generation = self.tls.generation();
            let ping = last_ping.elapsed() >= PING_EVERY.min(self.cfg.keepalive);
            if ping {
                last_ping = Instant::now();
            }
            let live = self.retire(generation, ping);
            if live < self.size {
                let opened = tokio::select! {
                    _ = self.stop.cancelled() => return,
                    r = self.open_kept(generation) => r,
                };
                match opened {
                    Ok(()) => {
                        backoff = Duration::from_millis(100);
                        continue;
                    }
                    Err(None) => {
                        self.keeping.store(false, Ordering::Release);
                        return;
                    }
                    Err(Some(why)) => {
                        tracing::debug!(tunnel = %self.cfg.name, error = %why, "opening a multiplexed connection failed");
                        tokio::select! {
                            _ = self.stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Drops kept connections that take no new streams (draining those that still have some)
    /// and ends those silent for `--keepalive` since a PING; with `ping`, asks the others to
    /// prove themselves live. Returns how many are left. (A PING in flight is data in the
    /// socket, which turns TCP keepalive off: this check takes its place, on the same clock.)
    fn retire(&self, generation: u64, ping: bool) -> usize {
        let limit = self.cfg.keepalive;
        let mut s = self.state();
        s.conns.retain(|c| {
            if !c.usable(generation) {
                c.conn.drain();
                return false;
            }
            if c.conn.silent_for().is_some_and(|w| w > limit) {
                let why = format!(
                    "nothing from the server within {limit:?} of a PING (--keepalive): connection presumed dead"
                );
                // The kept connection is this server ambassador's health check.
                self.endpoint.failed(&why);
                c.conn.kill(why);
                return false;
            }
            if ping && c.conn.hello().is_some() {
                c.conn.ping();
            }
            true
        });
        s.conns.len()
    }

    /// Opens one kept connection and waits for the greeting that proves it live and admitted.
    /// `Err(None)`: the peer does not speak `legate/1`, and keeping stops.
    async fn open_kept(self: &Arc<Self>, generation: u64) -> Result<(), Option<String>> {
        // Consumers that arrive meanwhile wait for this connection rather than dial their own.
        let one = self.opening.lock().await;
        let dialed = self.dial_peer(None).await;
        match &dialed {
            Ok(_) => self.endpoint.succeeded(),
            Err(f) => self.endpoint.failed(&f.detail),
        }
        let (mut tls, identity) = dialed.map_err(|f| Some(f.detail))?;
        if !tls::negotiated_legate(tls.get_ref().1) {
            tracing::warn!(tunnel = %self.cfg.name, target = %self.target(), "server did not take legate/1 although this tunnel expects a legate server (--peer-is-legate or --route); keeping no connections, each consumer gets its own");
            self.set_kind(Kind::Raw, generation);
            let _ = tls.shutdown().await;
            return Err(None);
        }
        let session = tls::describe_session(tls.get_ref().1);
        let c = self.adopt(tls, session, Some(identity), generation);
        drop(one);
        match tokio::time::timeout(self.cfg.connect_timeout, c.conn.greeted()).await {
            Ok(Ok(_)) => {
                self.set_kind(Kind::Legate, generation);
                tracing::debug!(tunnel = %self.cfg.name, kept = self.state().conns.len(), "multiplexed connection ready");
                Ok(())
            }
            Ok(Err(why)) => Err(Some(why)),
            Err(_) => {
                let why = format!("no greeting within {:?}", self.cfg.connect_timeout);
                c.conn.kill(why.clone());
                Err(Some(why))
            }
        }
    }
}

/// Connects to the server ambassador at `target` and completes the handshake (checking its
/// certificate for `name`), both within the connect timeout (the handshake checks the server
/// against the `--verify-*` pins).
async fn dial_peer(
    cfg: &TunnelConfig,
    target: &Address,
    client: &ClientTls,
    name: ServerName<'static>,
    metrics: Option<&TunnelMetrics>,
) -> Result<(ClientStream, PeerIdentity), Failure> {
    let deadline = Instant::now() + cfg.connect_timeout;
    let tcp = dial::dial(target, cfg.connect_timeout)
        .await
        .map_err(|e| fail(Outcome::DialFailed, e))?;
    tcp.tune(Some(cfg.keepalive));
    let handshake = Instant::now();
    let handshaken = tokio::time::timeout_at(deadline.into(), client.connect(tcp, name)).await;
    if let Some(m) = metrics {
        match &handshaken {
            Ok(Ok(_)) => m.handshake_done(handshake.elapsed()),
            _ => m.handshake_failed(handshake.elapsed()),
        }
    }
    let tls = match handshaken {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            // A server the --verify-* pins refuse is an authorization failure, as on the
            // server side, though the handshake is what stopped it.
            let outcome = if tls::refused_by_pins(&e) {
                Outcome::Unauthorized
            } else {
                Outcome::HandshakeFailed
            };
            return Err(fail(
                outcome,
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
    // The --verify-* pins were checked inside the handshake (tls::PinnedVerifier).
    let id = tls::peer_identity(tls.get_ref().1).map_err(|e| fail(Outcome::Unauthorized, e))?;
    Ok((tls, id))
}
