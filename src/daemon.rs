//! Daemon: runs the tunnels of a [`Config`], reloads on signal, drains on shutdown.
//!
//! In: a validated config (and the file it came from, for `legate run`). Out: the process's
//! exit status. Startup loads every tunnel's TLS material and binds every listener before any
//! of them serves, so a bad file or a taken port stops the process before it accepts anything.
//!
//! - SIGHUP, SIGUSR1 and `--timed-reload` reload: certificates, keys, CA bundles and CRLs of
//!   every tunnel, and with `legate run` the config file too (unchanged tunnels keep running,
//!   removed ones drain, added ones start, changed ones are replaced). A reload that fails
//!   changes nothing; the error is logged and shown in `/_status`. Open connections are never
//!   cut by a reload.
//! - SIGTERM or SIGINT stops accepting; open connections get `shutdown_timeout` to finish; a
//!   second signal stops at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{self, Config, Side, TunnelConfig};
use crate::metrics::Metrics;
use crate::net::Listener;
use crate::status::{self, Phase, State, TunnelView};
use crate::tunnel::{self, Prepared, Tunnel};

/// Exit status after every connection drained.
pub const EXIT_DRAINED: u8 = 0;
/// Exit status when the shutdown timeout (or a second signal) cut connections.
pub const EXIT_CUT: u8 = 1;
/// Exit status for invalid input: flags, config, certificates, a port that cannot be bound.
pub const EXIT_INVALID: u8 = 2;

/// Loads every tunnel's TLS material, reporting every failure at once.
pub fn prepare(tunnels: Vec<TunnelConfig>) -> Result<Vec<Prepared>, Vec<tunnel::Error>> {
    let mut ready = Vec::new();
    let mut errors = Vec::new();
    for t in tunnels {
        match Prepared::new(t) {
            Ok(p) => ready.push(p),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(ready)
    } else {
        Err(errors)
    }
}

fn joined(errors: &[tunnel::Error]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A tunnel that is serving.
struct Running {
    view: TunnelView,
    stop: CancellationToken,
    server: JoinHandle<Listener>,
    /// Its mDNS announcement, withdrawn when it stops.
    announced: Option<crate::mdns::Announcement>,
}

impl Running {
    /// Stops accepting; returns the listener, still open (dropped, it closes). Its
    /// connections carry on. An mDNS announcement is withdrawn first, so clients stop
    /// choosing this server before it stops taking them.
    async fn stop(self) -> Option<Listener> {
        drop(self.announced);
        self.stop.cancel();
        self.server.await.ok()
    }
}

struct Daemon {
    config: Config,
    path: Option<PathBuf>,
    running: BTreeMap<String, Running>,
    tracker: TaskTracker,
    state: Arc<State>,
}

impl Daemon {
    /// Binds and starts a prepared tunnel.
    async fn start(&mut self, p: Prepared) -> Result<(), tunnel::Error> {
        let running = self.launch(p, None).await?;
        self.running.insert(running.view.cfg.name.clone(), running);
        Ok(())
    }

    /// Starts a prepared tunnel on `listener` (handed over by the tunnel it replaces), or on
    /// one it binds.
    async fn launch(
        &self,
        p: Prepared,
        listener: Option<Listener>,
    ) -> Result<Running, tunnel::Error> {
        let cfg = Arc::new(p.config().clone());
        let tls = p.tls().clone();
        let metrics = self.state.metrics.tunnel(&cfg.name, cfg.side.as_str());
        let tunnel: Tunnel = match listener {
            Some(listener) => p.on(listener, metrics),
            None => p.bind(metrics).await?,
        };
        let listen = tunnel
            .local_addr()
            .unwrap_or_else(|_| cfg.listen.to_string());
        log_start(&cfg, &listen);
        let upstreams = tunnel.upstreams();
        let stop = CancellationToken::new();
        let server = tokio::spawn(tunnel.serve(stop.clone(), self.tracker.clone()));
        let announced = if cfg.announce {
            let routes: Vec<String> = cfg.routes.keys().cloned().collect();
            match listen.parse() {
                Ok(addr) => match crate::mdns::announce(&cfg.name, addr, &routes) {
                    Ok(a) => Some(a),
                    Err(e) => {
                        tracing::warn!(tunnel = %cfg.name, error = %e, "not announced over mDNS");
                        None
                    }
                },
                Err(_) => None,
            }
        } else {
            None
        };
        Ok(Running {
            view: TunnelView {
                cfg,
                listen,
                tls,
                upstreams,
            },
            stop,
            server,
            announced,
        })
    }

    fn publish(&self) {
        self.state
            .set_tunnels(self.running.values().map(|r| r.view.clone()).collect());
    }

    /// Reloads; on failure nothing changes. Returns the error for the log and `/_status`.
    async fn reload(&mut self) -> Result<(), String> {
        match self.path.clone() {
            Some(path) => self.reload_file(&path).await,
            None => self.reload_tls(None),
        }
    }

    /// Reloads the TLS material of running tunnels (all, or those in `only`).
    fn reload_tls(&self, only: Option<&[String]>) -> Result<(), String> {
        let mut errors = Vec::new();
        for (name, r) in &self.running {
            if only.is_some_and(|o| !o.contains(name)) {
                continue;
            }
            if let Err(e) = r.view.tls.reload() {
                errors.push(format!("tunnel {name:?}: {e}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    async fn reload_file(&mut self, path: &std::path::Path) -> Result<(), String> {
        let new = config::load(path).map_err(|p| p.0.join("; "))?;
        let old: Vec<TunnelConfig> = self
            .running
            .values()
            .map(|r| (*r.view.cfg).clone())
            .collect();
        let diff = config::diff(&old, &new.tunnels);
        // Load everything new before touching anything running: an added tunnel whose
        // certificate does not load must not cost a changed tunnel its old version.
        let incoming: Vec<TunnelConfig> = new
            .tunnels
            .iter()
            .filter(|t| diff.added.contains(&t.name) || diff.changed.contains(&t.name))
            .cloned()
            .collect();
        let prepared = prepare(incoming).map_err(|e| joined(&e).replace('\n', "; "))?;
        // Tunnels whose targets alone changed keep their listener and connections; their TLS
        // material reloads like that of unchanged ones.
        let kept: Vec<String> = diff
            .unchanged
            .iter()
            .chain(&diff.retargeted)
            .cloned()
            .collect();
        // Every new target checked before anything is taken (TLS material included), so a
        // reload that fails here changes nothing.
        let retargets: Vec<&TunnelConfig> = new
            .tunnels
            .iter()
            .filter(|t| diff.retargeted.contains(&t.name))
            .collect();
        for cfg in &retargets {
            tunnel::check_targets(cfg).map_err(|e| e.to_string().replace('\n', "; "))?;
        }
        self.reload_tls(Some(&kept))?;
        for cfg in retargets {
            let Some(r) = self.running.get_mut(&cfg.name) else {
                continue;
            };
            r.view.upstreams.retarget(cfg);
            r.view.cfg = Arc::new(cfg.clone());
            let (target, routes) = targets(cfg);
            tracing::info!(tunnel = %cfg.name, %target, %routes, "targets updated in place");
        }
        if new.status != self.config.status
            || new.timed_reload != self.config.timed_reload
            || new.metrics_prefix != self.config.metrics_prefix
            || new.enable_pprof != self.config.enable_pprof
            || new.discovery != self.config.discovery
        {
            tracing::warn!(
                "status, timed_reload, metrics_prefix, enable_pprof, nameserver, dns_*_interval and discovery_hold changes take effect at the next start"
            );
        }
        self.config.shutdown_timeout = new.shutdown_timeout;
        for name in &diff.removed {
            if let Some(r) = self.running.remove(name) {
                r.stop().await;
            }
        }
        // Tunnels that keep their address first (they free nothing and bind nothing), then
        // those that move (each frees its old address once its new one is bound), then new
        // ones, which may take an address a moved tunnel freed. Two tunnels swapping addresses
        // cannot both bind first: that takes two reloads.
        let stage = |p: &Prepared| match self.running.get(&p.config().name) {
            Some(r) if r.view.cfg.listen == p.config().listen => 0,
            Some(_) => 1,
            None => 2,
        };
        let mut prepared = prepared;
        prepared.sort_by_key(|p| stage(p));
        let mut errors = Vec::new();
        for p in prepared {
            if let Err(e) = self.replace(p).await {
                errors.push(e.to_string());
            }
        }
        self.publish();
        tracing::info!(
            added = ?diff.added, removed = ?diff.removed, changed = ?diff.changed,
            retargeted = ?diff.retargeted, unchanged = diff.unchanged.len(), "config reloaded"
        );
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

/// A tunnel's target and routes, as the log shows them.
fn targets(cfg: &TunnelConfig) -> (String, String) {
    let target = cfg
        .target
        .as_ref()
        .map_or_else(|| "-".to_string(), ToString::to_string);
    let routes = cfg
        .routes
        .iter()
        .map(|(name, addr)| format!("{name}={addr}"))
        .collect::<Vec<_>>()
        .join(",");
    (target, routes)
}

impl Daemon {
    /// Starts `p`, replacing the running tunnel of that name if there is one, without a moment
    /// when its port refuses connections: on the same address the old tunnel hands its
    /// listener over (connections arriving meanwhile wait in the backlog); on a new address the
    /// new one binds first, and if it cannot, the old one keeps serving.
    async fn replace(&mut self, p: Prepared) -> Result<(), tunnel::Error> {
        let name = p.config().name.clone();
        let same_address = self
            .running
            .get(&name)
            .map(|r| r.view.cfg.listen == p.config().listen);
        let running = match same_address {
            Some(true) => {
                let old = self.running.remove(&name).expect("checked above");
                let listener = old.stop().await;
                self.launch(p, listener).await?
            }
            Some(false) => {
                let new = self.launch(p, None).await?;
                if let Some(old) = self.running.remove(&name) {
                    old.stop().await;
                }
                new
            }
            None => self.launch(p, None).await?,
        };
        self.running.insert(name, running);
        Ok(())
    }
}

fn log_start(cfg: &TunnelConfig, listen: &str) {
    tracing::info!(tunnel = %cfg.name, config = ?cfg, "effective configuration");
    if cfg.disable_authentication {
        match cfg.side {
            Side::Server => tracing::warn!(
                tunnel = %cfg.name,
                "AUTHENTICATION DISABLED: clients need no certificate; anyone who can reach this port reaches the target"
            ),
            Side::Client => tracing::warn!(
                tunnel = %cfg.name,
                "authentication disabled: this client presents no certificate"
            ),
        }
    }
    let (target, routes) = targets(cfg);
    tracing::info!(
        tunnel = %cfg.name,
        side = %cfg.side,
        listen,
        target,
        routes,
        "listening"
    );
}

struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
    usr1: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        let on = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("installing the {name} handler"))
        };
        Ok(Signals {
            term: on(SignalKind::terminate(), "SIGTERM")?,
            int: on(SignalKind::interrupt(), "SIGINT")?,
            hup: on(SignalKind::hangup(), "SIGHUP")?,
            usr1: on(SignalKind::user_defined1(), "SIGUSR1")?,
        })
    }
}

/// What woke the main loop.
enum Event {
    Stop(&'static str),
    Reload(&'static str),
}

/// Runs the config until SIGTERM/SIGINT, and returns the exit status. `path` is the config
/// file to reread on reload (`legate run`).
pub async fn run(config: Config, path: Option<PathBuf>) -> anyhow::Result<u8> {
    // Handlers first: a signal that arrives during startup must be handled, not kill us.
    let mut signals = Signals::install()?;

    crate::upstream::discovery::configure(config.discovery.clone());
    let prepared =
        prepare(config.tunnels.clone()).map_err(|errors| anyhow::anyhow!(joined(&errors)))?;
    let state = Arc::new(State::new(
        Arc::new(Metrics::default()),
        config.metrics_prefix.clone(),
        config.enable_pprof,
    ));
    let mut daemon = Daemon {
        config,
        path,
        running: BTreeMap::new(),
        tracker: TaskTracker::new(),
        state: state.clone(),
    };
    for p in prepared {
        daemon.start(p).await?;
    }
    daemon.publish();

    let status_stop = CancellationToken::new();
    if let Some(addr) = daemon.config.status.clone() {
        let can_serve = state.has_https_config();
        if addr.https == Some(true) && !can_serve {
            anyhow::bail!(
                "--status https://{}: HTTPS needs a certificate and no tunnel has one; write the address without https:// (plain HTTP)",
                addr.addr
            );
        }
        let https = addr
            .https
            .unwrap_or(can_serve && !matches!(addr.addr, crate::net::Address::Unix(_)));
        let listener = Listener::bind(&addr.addr)
            .await
            .with_context(|| format!("cannot listen for status on {}", addr.addr))?;
        let scheme = if https { "https" } else { "http" };
        tracing::info!(status = %format!("{scheme}://{}", listener.local_addr()?), "status listening");
        tokio::spawn(status::serve(
            listener,
            https,
            state.clone(),
            status_stop.clone(),
        ));
    }

    // Every tunnel (and the status listener) is listening: systemd may start what needs us.
    crate::notify::notify("READY=1");

    let mut timer = daemon.config.timed_reload.map(|every| {
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let stopped_by = loop {
        let tick = async {
            match timer.as_mut() {
                Some(t) => {
                    t.tick().await;
                }
                None => std::future::pending().await,
            }
        };
        let event = tokio::select! {
            _ = signals.term.recv() => Event::Stop("SIGTERM"),
            _ = signals.int.recv() => Event::Stop("SIGINT"),
            _ = signals.hup.recv() => Event::Reload("SIGHUP"),
            _ = signals.usr1.recv() => Event::Reload("SIGUSR1"),
            _ = tick => Event::Reload("timer"),
        };
        match event {
            Event::Stop(name) => break name,
            Event::Reload(trigger) => {
                state.set_phase(Phase::Reloading);
                crate::notify::reloading();
                let result = daemon.reload().await;
                match &result {
                    Ok(()) => tracing::info!(trigger, "reload complete"),
                    Err(e) => tracing::error!(
                        trigger,
                        error = e.as_str(),
                        "reload failed; keeping the previous configuration"
                    ),
                }
                state.metrics.reloaded(result.is_ok());
                state.reloaded(result.err());
                state.set_phase(Phase::Listening);
                crate::notify::notify("READY=1");
            }
        }
    };

    state.set_phase(Phase::Stopping);
    crate::notify::notify("STOPPING=1");
    for (_, r) in std::mem::take(&mut daemon.running) {
        r.stop().await;
    }
    let tracker = daemon.tracker;
    tracker.close();
    let shutdown_timeout = daemon.config.shutdown_timeout;
    tracing::info!(
        signal = stopped_by,
        open_connections = tracker.len(),
        timeout = ?shutdown_timeout,
        "stopped accepting; draining"
    );
    let drained = tokio::select! {
        _ = tracker.wait() => true,
        _ = tokio::time::sleep(shutdown_timeout) => false,
        _ = signals.term.recv() => false,
        _ = signals.int.recv() => false,
    };
    status_stop.cancel();
    if drained {
        tracing::info!("all connections finished; exiting");
        Ok(EXIT_DRAINED)
    } else {
        tracing::warn!(
            open_connections = tracker.len(),
            "shutdown cut open connections"
        );
        Ok(EXIT_CUT)
    }
}
