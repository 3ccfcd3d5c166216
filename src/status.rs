//! The status listener: `GET /_status` (JSON health, ghostunnel's keys), `GET /_metrics`
//! (ghostunnel's JSON list; Prometheus text at `/_metrics/prometheus`), optionally
//! `/debug/pprof/goroutine`, over HTTPS with a tunnel's live certificate or over plain HTTP.
//!
//! In: the daemon's shared [`State`]. Out: small HTTP/1.1 responses, one per connection. The
//! HTTP handling is deliberately minimal (a request line and headers, no body, then close):
//! status endpoints need nothing more, and a full HTTP stack would be most of the binary.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::config::TunnelConfig;
use crate::metrics::{EndpointSample, Expiries, Metrics, SourceSample};
use crate::net::Listener;
use crate::tunnel::{self, TlsEnd, Upstreams};

/// How long a status client gets to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;

/// What the process is doing, as `/_status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Listening,
    Reloading,
    Stopping,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Listening => "listening",
            Phase::Reloading => "reloading",
            Phase::Stopping => "stopping",
        }
    }
}

/// One running tunnel, as the status listener sees it.
#[derive(Clone)]
pub struct TunnelView {
    pub cfg: Arc<TunnelConfig>,
    pub listen: String,
    pub tls: TlsEnd,
    pub upstreams: Upstreams,
}

struct Inner {
    phase: Phase,
    last_reload: Option<SystemTime>,
    last_reload_error: Option<String>,
    tunnels: Vec<TunnelView>,
}

/// State shared between the daemon (which writes it) and the status listener (which reads it).
pub struct State {
    inner: RwLock<Inner>,
    pub metrics: Arc<Metrics>,
    /// `--metrics-prefix`.
    metrics_prefix: String,
    /// `--enable-pprof`.
    pprof: bool,
}

impl State {
    pub fn new(metrics: Arc<Metrics>, metrics_prefix: String, pprof: bool) -> State {
        State {
            metrics_prefix,
            pprof,
            inner: RwLock::new(Inner {
                phase: Phase::Listening,
                last_reload: None,
                last_reload_error: None,
                tunnels: Vec::new(),
            }),
            metrics,
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_phase(&self, phase: Phase) {
        self.write().phase = phase;
    }

    pub fn set_tunnels(&self, tunnels: Vec<TunnelView>) {
        self.write().tunnels = tunnels;
    }

    /// Records a reload: when, and its error if it failed.
    pub fn reloaded(&self, error: Option<String>) {
        let mut w = self.write();
        w.last_reload = Some(SystemTime::now());
        w.last_reload_error = error;
    }

    pub fn tunnels(&self) -> Vec<TunnelView> {
        self.read().tunnels.clone()
    }

    /// Every tunnel's endpoints as they are now, for their metrics.
    fn endpoint_samples(&self) -> Vec<EndpointSample> {
        let mut all = Vec::new();
        for t in self.read().tunnels.iter() {
            for (route, e, takes) in t.upstreams.endpoints(&t.cfg) {
                all.push(EndpointSample {
                    tunnel: t.cfg.name.clone(),
                    side: t.cfg.side.as_str(),
                    route,
                    endpoint: e.spec.addr.to_string(),
                    open: e.open(),
                    up: takes,
                });
            }
        }
        all
    }

    /// Every tunnel's discovery sources as they are now, for their metrics.
    fn source_samples(&self) -> Vec<SourceSample> {
        let mut all = Vec::new();
        for t in self.read().tunnels.iter() {
            for (route, v) in t.upstreams.sources(&t.cfg) {
                all.push(SourceSample {
                    tunnel: t.cfg.name.clone(),
                    side: t.cfg.side.as_str(),
                    route,
                    source: v.source,
                    endpoints: v.endpoints,
                    failing: v.error.is_some(),
                });
            }
        }
        all
    }

    fn expiries(&self) -> Expiries {
        self.read()
            .tunnels
            .iter()
            .map(|t| ((t.cfg.name.clone(), t.cfg.side.as_str()), t.tls.not_after()))
            .collect()
    }

    /// Whether some tunnel has a certificate the HTTPS status listener can present.
    pub fn has_https_config(&self) -> bool {
        self.https_config().is_some()
    }

    /// The HTTPS config: the first tunnel (by name) that has a certificate, as it is now.
    fn https_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.read()
            .tunnels
            .iter()
            .find_map(|t| t.tls.status_config())
    }

    /// The `/_status` document and whether everything is healthy.
    async fn status(&self) -> (bool, serde_json::Value) {
        let (phase, last_reload, last_error, tunnels) = {
            let r = self.read();
            (
                r.phase,
                r.last_reload,
                r.last_reload_error.clone(),
                r.tunnels.clone(),
            )
        };
        // Probe every backend at once: the slowest decides how long /_status takes.
        let mut probes = tokio::task::JoinSet::new();
        for (i, t) in tunnels.iter().enumerate() {
            let (cfg, upstreams) = (t.cfg.clone(), t.upstreams.clone());
            probes.spawn(async move { (i, tunnel::probe_backend(&cfg, &upstreams).await) });
        }
        let mut results: Vec<Result<(), String>> =
            vec![Err("probe did not finish".to_string()); tunnels.len()];
        while let Some(done) = probes.join_next().await {
            if let Ok((i, r)) = done {
                results[i] = r;
            }
        }
        let mut views = Vec::new();
        let mut errors = Vec::new();
        for (t, result) in tunnels.iter().zip(results) {
            if let Err(e) = &result {
                errors.push(if tunnels.len() > 1 {
                    format!("{}: {e}", t.cfg.name)
                } else {
                    e.clone()
                });
            }
            views.push(serde_json::json!({
                "tunnel": t.cfg.name,
                "side": t.cfg.side.as_str(),
                "listen_address": t.listen,
                "forward_address": forward(&t.cfg),
                "backend_ok": result.is_ok(),
                "backend_error": result.err(),
                "endpoints": endpoints(t),
                "sources": sources(t),
            }));
        }
        let backend_ok = errors.is_empty();
        // As ghostunnel's: a reload does not make the process unhealthy; stopping does.
        let ok = backend_ok && phase != Phase::Stopping;
        let word = |good: bool| if good { "ok" } else { "critical" };
        let mut doc = serde_json::json!({
            "ok": ok,
            "status": word(ok),
            "backend_ok": backend_ok,
            "backend_status": word(backend_ok),
            "time": humantime::format_rfc3339_nanos(SystemTime::now()).to_string(),
            // ghostunnel's zero time before the first reload.
            "last_reload": last_reload.map_or_else(
                || "0001-01-01T00:00:00Z".to_string(),
                |t| humantime::format_rfc3339_nanos(t).to_string(),
            ),
            "hostname": hostname(),
            "message": phase.as_str(),
            "revision": env!("CARGO_PKG_VERSION"),
            "compiler": env!("LEGATE_RUSTC_VERSION"),
            "version": env!("CARGO_PKG_VERSION"),
            "last_reload_error": last_error,
            "tunnels": views,
        });
        if !backend_ok {
            doc["backend_error"] = errors.join("; ").into();
        }
        // ghostunnel's addresses: the one tunnel's, or every tunnel's joined.
        doc["listen_address"] = join(&tunnels, |t| t.listen.clone()).into();
        doc["forward_address"] = join(&tunnels, |t| forward(&t.cfg)).into();
        (ok, doc)
    }
}

/// Each endpoint of a tunnel: its route, address, passive health and open connections.
fn endpoints(t: &TunnelView) -> Vec<serde_json::Value> {
    t.upstreams
        .endpoints(&t.cfg)
        .iter()
        .map(|(route, e, _)| {
            let mut v = serde_json::json!({
                "route": route,
                "address": e.spec.addr.to_string(),
                "weight": e.spec.weight,
                "state": e.state_name(),
                "open": e.open(),
            });
            // A Redis route's role checks: what the endpoint last said it is.
            if let Some(role) = e.role() {
                v["role"] = role.into();
            }
            v
        })
        .collect()
}

/// Each discovery source of a tunnel: what it found, its last error, and the age of its last
/// good answer.
fn sources(t: &TunnelView) -> Vec<serde_json::Value> {
    t.upstreams
        .sources(&t.cfg)
        .iter()
        .map(|(route, v)| {
            serde_json::json!({
                "route": route,
                "source": v.source,
                "endpoints": v.endpoints,
                "error": v.error,
                "last_good_seconds_ago": v.last_good_secs,
            })
        })
        .collect()
}

fn join(tunnels: &[TunnelView], f: impl Fn(&TunnelView) -> String) -> String {
    tunnels.iter().map(f).collect::<Vec<_>>().join(",")
}

/// This host's name, as ghostunnel's `/_status` and metrics give it.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that much.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

fn forward(cfg: &TunnelConfig) -> String {
    let mut parts: Vec<String> = cfg.target.iter().map(ToString::to_string).collect();
    parts.extend(cfg.routes.iter().map(|(name, a)| format!("{name}={a}")));
    parts.join(",")
}

/// Serves status requests until `stop` is cancelled.
pub async fn serve(listener: Listener, https: bool, state: Arc<State>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "status listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            if !https {
                return respond(stream, &state).await;
            }
            let Some(config) = state.https_config() else {
                return;
            };
            let accepted =
                tokio::time::timeout(REQUEST_TIMEOUT, TlsAcceptor::from(config).accept(stream))
                    .await;
            if let Ok(Ok(tls)) = accepted {
                respond(tls, &state).await;
            }
        });
    }
}

/// Reads one request and writes one response.
async fn respond<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, state: &State) {
    let Ok(Some(target)) = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut s)).await else {
        return;
    };
    let (code, kind, body) = match target {
        Request::Get(path, query) => route(state, &path, &query).await,
        Request::Other => (405, "text/plain", "only GET is supported\n".into()),
    };
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body.as_bytes()).await;
    let _ = s.shutdown().await;
}

const JSON: &str = "application/json";
/// What `prometheus-client` writes: the OpenMetrics text, which Prometheus asks for first.
const PROMETHEUS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The answer to `GET path?query`: code, content type, body.
async fn route(state: &State, path: &str, query: &str) -> (u16, &'static str, String) {
    let format = query
        .split('&')
        .find_map(|q| q.strip_prefix("format="))
        .unwrap_or("");
    match (path.trim_end_matches('/'), format) {
        ("/_status", _) => {
            let (ok, doc) = state.status().await;
            (if ok { 200 } else { 503 }, JSON, doc.to_string() + "\n")
        }
        ("/_metrics" | "/_metrics/prometheus", "prometheus") | ("/_metrics/prometheus", _) => {
            let endpoints = state.endpoint_samples();
            let sources = state.source_samples();
            let text = state
                .metrics
                .prometheus(&state.expiries(), &endpoints, &sources);
            (200, PROMETHEUS, text)
        }
        ("/_metrics/legate", _) => (
            200,
            JSON,
            state.metrics.json(&state.expiries()).to_string() + "\n",
        ),
        ("/_metrics" | "/_metrics/json", _) => {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            let list = state
                .metrics
                .ghostunnel
                .json(&state.metrics_prefix, &hostname(), now);
            (200, JSON, list.to_string() + "\n")
        }
        ("/debug/pprof/goroutine", _) if state.pprof => (200, "text/plain", tasks_profile()),
        ("/debug/pprof", _) if state.pprof => (
            200,
            "text/plain",
            "profiles: goroutine (/debug/pprof/goroutine?debug=1): the live task count\n".into(),
        ),
        _ => (
            404,
            "text/plain",
            "not found: try /_status, /_metrics, /_metrics/prometheus or /_metrics/legate\n".into(),
        ),
    }
}

/// What `--enable-pprof` serves for ghostunnel's goroutine profile: the runtime's live tasks,
/// first line as Go writes it, so leak checks that read the total keep working.
fn tasks_profile() -> String {
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    format!(
        "goroutine profile: total {tasks}\n\n# legate counts tokio tasks (every connection, stream and listener is one); there are no stacks to show.\n"
    )
}

/// A request head, as far as the status listener cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// `GET path?query`: the path and the query.
    Get(String, String),
    Other,
}

/// Reads a request head; `None` if it is malformed or too long.
async fn read_request<S: AsyncRead + Unpin>(s: &mut S) -> Option<Request> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    parse_request(&buf)
}

/// Parses a request head's first line (bytes from the network: fuzzed, `fuzz/fuzz_targets/http.rs`).
pub fn parse_request(head: &[u8]) -> Option<Request> {
    let head = std::str::from_utf8(head).ok()?;
    let mut parts = head.lines().next()?.split(' ');
    let (method, target) = (parts.next()?, parts.next()?);
    if method != "GET" {
        return Some(Request::Other);
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Some(Request::Get(path.to_string(), query.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request(b"GET /_metrics?format=prometheus HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Request::Get("/_metrics".into(), "format=prometheus".into()))
        );
        assert_eq!(
            parse_request(b"POST /_status HTTP/1.1\r\n\r\n"),
            Some(Request::Other)
        );
        assert_eq!(parse_request(b"GET\r\n\r\n"), None);
        assert_eq!(parse_request(b"\xff\xfe"), None);
    }
}
