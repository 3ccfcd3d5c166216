//! Daemon: starts every tunnel of a [`Config`], waits for a signal, drains.
//!
//! In: a validated config. Out: the process's exit status. Startup loads every tunnel's TLS
//! material and binds every listener before any of them serves, so a bad file or a taken port
//! stops the process before it accepts anything. SIGTERM or SIGINT stops accepting; open
//! connections get `shutdown_timeout` to finish; a second signal stops at once.

use std::time::Duration;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, TunnelConfig};
use crate::tunnel::{self, Prepared};

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

/// Runs the config until a signal, and returns the exit status.
pub async fn run(config: Config) -> anyhow::Result<u8> {
    // Handlers first: a SIGTERM that arrives during startup must drain, not kill.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let prepared = prepare(config.tunnels).map_err(|errors| {
        anyhow::anyhow!(
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    let mut tunnels = Vec::new();
    for p in prepared {
        tunnels.push(p.bind().await?);
    }

    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut servers = Vec::new();
    for t in tunnels {
        let cfg = t.config();
        let target = match (&cfg.target, cfg.routes.is_empty()) {
            (Some(t), _) => t.to_string(),
            (None, false) => "-".to_string(),
            (None, true) => unreachable!("validated: a tunnel has a target or routes"),
        };
        let routes = cfg
            .routes
            .iter()
            .map(|(name, addr)| format!("{name}={addr}"))
            .collect::<Vec<_>>()
            .join(",");
        tracing::info!(tunnel = %cfg.name, config = ?cfg, "effective configuration");
        if cfg.disable_authentication {
            match cfg.side {
                crate::config::Side::Server => tracing::warn!(
                    tunnel = %cfg.name,
                    "AUTHENTICATION DISABLED: clients need no certificate; anyone who can reach this port reaches the target"
                ),
                crate::config::Side::Client => tracing::warn!(
                    tunnel = %cfg.name,
                    "authentication disabled: this client presents no certificate"
                ),
            }
        }
        tracing::info!(
            tunnel = %cfg.name,
            side = %cfg.side,
            listen = %t.local_addr()?,
            target,
            routes,
            "listening"
        );
        servers.push(tokio::spawn(t.serve(stop.clone(), tracker.clone())));
    }

    let signal_name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    stop.cancel();
    for s in servers {
        // The accept loops end promptly once cancelled; their listeners close with them.
        let _ = s.await;
    }
    tracker.close();
    let open = tracker.len();
    tracing::info!(
        signal = signal_name,
        open_connections = open,
        timeout = ?config.shutdown_timeout,
        "stopped accepting; draining"
    );
    let drained = tokio::select! {
        _ = tracker.wait() => true,
        _ = tokio::time::sleep(config.shutdown_timeout) => false,
        _ = term.recv() => false,
        _ = int.recv() => false,
    };
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

/// Parses an optional shutdown timeout flag.
pub fn shutdown_timeout(value: Option<&str>) -> Result<Duration, String> {
    match value {
        None => Ok(crate::config::DEFAULT_SHUTDOWN_TIMEOUT),
        Some(s) => crate::config::parse_duration("--shutdown-timeout", s),
    }
}
