//! Log: the one line each connection (or stream) ends with, and `--quiet`.
//!
//! In: a [`Record`] filled in by the stages as they pass, and the result. Out: one `info` line
//! for a good connection, one `warn` line for a failed one, unless `--quiet` silences its class.

use std::time::Duration;

use crate::config::TunnelConfig;
use crate::net::PeerAddr;
use crate::outcome::{Failure, Outcome};
use crate::relay;
use crate::tls::PeerIdentity;

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

/// What the log line at the end of a connection says.
#[derive(Clone)]
pub struct Record {
    pub peer: PeerAddr,
    /// Server side over `legate/1`: the consumer's address, as the client side saw it.
    pub consumer: Option<std::net::SocketAddr>,
    pub identity: Option<PeerIdentity>,
    /// The negotiated TLS session, from `tls::describe_session`.
    pub session: Option<String>,
    pub route: Option<String>,
    pub target: Option<String>,
    pub totals: relay::Totals,
}

impl Record {
    pub fn new(peer: PeerAddr) -> Record {
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

pub fn log_end(cfg: &TunnelConfig, rec: &Record, elapsed: Duration, result: Result<(), Failure>) {
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
