//! Metrics: per tunnel and side, counters, gauges and histograms rendered as Prometheus text by
//! the `prometheus-client` crate (legate's own names), plus ghostunnel's process-wide series
//! as its JSON list.
//!
//! In: events from the connection pipeline (an outcome, bytes, durations). Out: `/_metrics`.
//! A tunnel's handles are looked up once, when it starts, so recording is a few atomic adds per
//! connection (and a short lock per histogram observation).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::outcome::Outcome;

/// Upper bounds (seconds) of the handshake histogram's buckets.
const HANDSHAKE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Upper bounds (seconds) of the connection-duration histogram's buckets.
const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// How many recent observations a [`Timer`] keeps for its statistics, as go-metrics' default
/// sample does.
const TIMER_SAMPLE: usize = 1028;

/// A ghostunnel-style timer: a count of every observation, and min, max, mean and percentiles
/// over the most recent [`TIMER_SAMPLE`] of them, in nanoseconds.
#[derive(Default)]
pub struct Timer {
    count: AtomicU64,
    /// A ring of recent observations (ns) and where the next one goes.
    recent: Mutex<(Vec<u64>, usize)>,
}

impl Timer {
    pub fn observe(&self, d: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let mut r = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        let (ring, next) = &mut *r;
        if ring.len() < TIMER_SAMPLE {
            ring.push(ns);
        } else {
            ring[*next] = ns;
        }
        *next = (*next + 1) % TIMER_SAMPLE;
    }

    /// `(suffix, value)` pairs as go-metrics expands a timer: `count min max mean` and the
    /// 50th, 75th, 95th and 99th percentiles (interpolated as go-metrics does), all 0 when
    /// nothing was observed.
    pub fn expand(&self) -> Vec<(&'static str, f64)> {
        let count = self.count.load(Ordering::Relaxed) as f64;
        let mut v = self
            .recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone();
        v.sort_unstable();
        let (min, max) = (v.first().copied(), v.last().copied());
        let mean = if v.is_empty() {
            0.0
        } else {
            v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64
        };
        let pct = |p: f64| -> f64 {
            if v.is_empty() {
                return 0.0;
            }
            // go-metrics: position p*(n+1), clamped, linear between neighbours.
            let pos = p * (v.len() as f64 + 1.0);
            if pos < 1.0 {
                v[0] as f64
            } else if pos >= v.len() as f64 {
                v[v.len() - 1] as f64
            } else {
                let lower = v[pos as usize - 1] as f64;
                let upper = v[pos as usize] as f64;
                lower + (pos - pos.floor()) * (upper - lower)
            }
        };
        vec![
            ("count", count),
            ("min", min.unwrap_or(0) as f64),
            ("max", max.unwrap_or(0) as f64),
            ("mean", mean),
            ("50-percentile", pct(0.5)),
            ("75-percentile", pct(0.75)),
            ("95-percentile", pct(0.95)),
            ("99-percentile", pct(0.99)),
        ]
    }
}

/// The series ghostunnel reports, process-wide, with its meanings: `accept.total` and
/// `conn.open` rise when a TCP connection is accepted, `conn.open` falls when its handling
/// ends; `accept.success` counts connections whose handshake and onward connection worked,
/// `accept.error` failed accept() calls, handshakes and onward connections, `accept.timeout`
/// incoming handshakes that timed out (also errors); `conn.timeout` connections closed at
/// `--max-conn-lifetime`.
#[derive(Default)]
pub struct Ghostunnel {
    pub accept_total: AtomicU64,
    pub accept_success: AtomicU64,
    pub accept_error: AtomicU64,
    pub accept_timeout: AtomicU64,
    pub conn_open: AtomicI64,
    pub conn_timeout: AtomicU64,
    pub handshake: Timer,
    pub lifetime: Timer,
}

impl Ghostunnel {
    /// ghostunnel's `/_metrics/json` list: one object per value, every series always present.
    pub fn json(&self, prefix: &str, hostname: &str, now: i64) -> serde_json::Value {
        let mut values: Vec<(String, f64)> = vec![
            ("accept.total".into(), load(&self.accept_total)),
            ("accept.success".into(), load(&self.accept_success)),
            ("accept.error".into(), load(&self.accept_error)),
            ("accept.timeout".into(), load(&self.accept_timeout)),
            (
                "conn.open".into(),
                self.conn_open.load(Ordering::Relaxed) as f64,
            ),
            ("conn.timeout".into(), load(&self.conn_timeout)),
        ];
        for (name, timer) in [
            ("conn.handshake", &self.handshake),
            ("conn.lifetime", &self.lifetime),
        ] {
            values.extend(
                timer
                    .expand()
                    .into_iter()
                    .map(|(suffix, v)| (format!("{name}.{suffix}"), v)),
            );
        }
        let named = |name: &str| {
            if prefix.is_empty() {
                name.to_string()
            } else {
                format!("{prefix}.{name}")
            }
        };
        values
            .into_iter()
            .map(|(name, value)| {
                // Whole numbers print as integers, as ghostunnel's counters do.
                let value = if value.fract() == 0.0 && value.abs() < 9e15 {
                    serde_json::Value::from(value as i64)
                } else {
                    serde_json::Value::from(value)
                };
                serde_json::json!({
                    "timestamp": now,
                    "metric": named(&name),
                    "value": value,
                    "hostname": hostname,
                })
            })
            .collect()
    }
}

fn load(c: &AtomicU64) -> f64 {
    c.load(Ordering::Relaxed) as f64
}

/// The metrics of one tunnel: handles into the families, taken once.
pub struct TunnelMetrics {
    /// The process-wide ghostunnel series this tunnel also counts into.
    pub ghostunnel: Arc<Ghostunnel>,
    /// By outcome, in [`Outcome::ALL`] order.
    outcomes: Vec<Counter>,
    open: Gauge,
    bytes_up: Counter,
    bytes_down: Counter,
    handshake: Timed,
    duration: Timed,
}

/// A Prometheus histogram, and the count and sum for the JSON (the crate does not expose them).
struct Timed {
    histogram: Histogram,
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Timed {
    fn new(histogram: Histogram) -> Timed {
        Timed {
            histogram,
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        self.histogram.observe(d.as_secs_f64());
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "count": self.count.load(Ordering::Relaxed),
            "sum": self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
        })
    }
}

impl TunnelMetrics {
    /// Counts an accepted connection as open until the guard drops, and then its lifetime.
    pub fn open(self: &Arc<Self>) -> OpenGuard {
        self.open.inc();
        self.ghostunnel.accept_total.fetch_add(1, Ordering::Relaxed);
        self.ghostunnel.conn_open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(self.clone(), std::time::Instant::now())
    }

    /// A TLS handshake (incoming on the server side, outgoing on the client side) took `d`.
    pub fn handshake_done(&self, d: Duration) {
        self.handshake.observe(d);
        self.ghostunnel.handshake.observe(d);
    }

    /// A TLS handshake failed after `d`: ghostunnel's timer counts it (its `conn.handshake`
    /// times every handshake); legate's histogram times those that worked.
    pub fn handshake_failed(&self, d: Duration) {
        self.ghostunnel.handshake.observe(d);
    }

    /// An accepted connection was set up (handshake and onward connection) or failed to be;
    /// `Err(true)`: its incoming handshake timed out. A timed-out handshake counts as an error
    /// too, as in ghostunnel.
    pub fn accepted(&self, result: Result<(), bool>) {
        let g = &self.ghostunnel;
        match result {
            Ok(()) => g.accept_success.fetch_add(1, Ordering::Relaxed),
            Err(timed_out) => {
                if timed_out {
                    g.accept_timeout.fetch_add(1, Ordering::Relaxed);
                }
                g.accept_error.fetch_add(1, Ordering::Relaxed)
            }
        };
    }

    /// accept() itself failed (e.g. out of file descriptors).
    pub fn accept_failed(&self) {
        self.ghostunnel.accept_error.fetch_add(1, Ordering::Relaxed);
    }

    /// Records the end of a connection.
    pub fn finished(&self, outcome: Outcome, up: u64, down: u64, elapsed: Duration) {
        if outcome == Outcome::Expired {
            self.ghostunnel.conn_timeout.fetch_add(1, Ordering::Relaxed);
        }
        self.outcomes[outcome.index()].inc();
        self.bytes_up.inc_by(up);
        self.bytes_down.inc_by(down);
        self.duration.observe(elapsed);
    }

    pub fn open_connections(&self) -> i64 {
        self.open.get()
    }
}

/// Decrements the open-connection gauges and times the connection's life when dropped,
/// however the connection ends.
pub struct OpenGuard(Arc<TunnelMetrics>, std::time::Instant);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.dec();
        let g = &self.0.ghostunnel;
        g.conn_open.fetch_sub(1, Ordering::Relaxed);
        g.lifetime.observe(self.1.elapsed());
    }
}

/// Identifies a tunnel's series: its name and side.
pub type Key = (String, &'static str);

/// Values computed at scrape time rather than counted: per tunnel, its certificate's expiry.
pub type Expiries = Vec<(Key, Option<i64>)>;

/// One endpoint as a scrape sees it: its series exist while it is listed.
#[derive(Debug, Clone)]
pub struct EndpointSample {
    pub tunnel: String,
    pub side: &'static str,
    pub route: String,
    pub endpoint: String,
    pub open: usize,
    /// Given new connections now (not ejected, not down by checks).
    pub up: bool,
}

/// One discovery source as a scrape sees it.
#[derive(Debug, Clone)]
pub struct SourceSample {
    pub tunnel: String,
    pub side: &'static str,
    pub route: String,
    pub source: String,
    pub endpoints: usize,
    /// Its last lookup failed (its endpoints are held, or gone past the hold time).
    pub failing: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    tunnel: String,
    side: String,
    route: String,
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    tunnel: String,
    side: String,
    route: String,
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    tunnel: String,
    side: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    tunnel: String,
    side: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    tunnel: String,
    side: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

type Histograms = Family<TunnelLabels, Histogram, fn() -> Histogram>;

/// The metric families, each also registered in the registry (a family is a shared handle).
struct Families {
    connections: Family<OutcomeLabels, Counter>,
    open: Family<TunnelLabels, Gauge>,
    bytes: Family<DirectionLabels, Counter>,
    handshake: Histograms,
    duration: Histograms,
    expiry: Family<TunnelLabels, Gauge>,
    reloads: Family<ResultLabels, Counter>,
    endpoint_open: Family<EndpointLabels, Gauge>,
    endpoint_up: Family<EndpointLabels, Gauge>,
    source_endpoints: Family<SourceLabels, Gauge>,
    source_failing: Family<SourceLabels, Gauge>,
}

/// All tunnels' metrics, plus process-wide ones.
pub struct Metrics {
    pub ghostunnel: Arc<Ghostunnel>,
    /// Held across a scrape: the expiry series are set then encoded, and two scrapes at once
    /// must not clear each other's.
    registry: Mutex<Registry>,
    families: Families,
    tunnels: Mutex<BTreeMap<Key, Arc<TunnelMetrics>>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let families = Families {
            connections: Family::default(),
            open: Family::default(),
            bytes: Family::default(),
            handshake: Family::new_with_constructor(|| {
                Histogram::new(HANDSHAKE_BUCKETS.iter().copied())
            }),
            duration: Family::new_with_constructor(|| {
                Histogram::new(DURATION_BUCKETS.iter().copied())
            }),
            expiry: Family::default(),
            reloads: Family::default(),
            endpoint_open: Family::default(),
            endpoint_up: Family::default(),
            source_endpoints: Family::default(),
            source_failing: Family::default(),
        };
        let mut registry = Registry::default();
        let f = &families;
        registry.register(
            "legate_connections",
            "Connections (streams, over legate/1) by how they ended",
            f.connections.clone(),
        );
        registry.register(
            "legate_open_connections",
            "Connections open now",
            f.open.clone(),
        );
        registry.register(
            "legate_bytes",
            "Bytes relayed; up is consumer to service",
            f.bytes.clone(),
        );
        registry.register(
            "legate_handshake_duration_seconds",
            "TLS handshake time",
            f.handshake.clone(),
        );
        registry.register(
            "legate_connection_duration_seconds",
            "Connection lifetime",
            f.duration.clone(),
        );
        registry.register(
            "legate_certificate_expiry_timestamp_seconds",
            "When the tunnel's current certificate expires (Unix time)",
            f.expiry.clone(),
        );
        registry.register("legate_reloads", "Reloads by result", f.reloads.clone());
        registry.register(
            "legate_endpoint_open_connections",
            "Connections open to each upstream endpoint",
            f.endpoint_open.clone(),
        );
        registry.register(
            "legate_endpoint_up",
            "1 while an endpoint takes new connections (not ejected, not down by checks)",
            f.endpoint_up.clone(),
        );
        registry.register(
            "legate_discovery_endpoints",
            "Endpoints a discovery source gives now",
            f.source_endpoints.clone(),
        );
        registry.register(
            "legate_discovery_failing",
            "1 while a discovery source's last lookup failed",
            f.source_failing.clone(),
        );
        // Both results are series from startup, at 0.
        for result in ["ok", "failed"] {
            drop(f.reloads.get_or_create(&ResultLabels {
                result: result.into(),
            }));
        }
        Metrics {
            ghostunnel: Arc::default(),
            registry: Mutex::new(registry),
            families,
            tunnels: Mutex::default(),
        }
    }
}

impl Metrics {
    /// The series of a tunnel, created on first use and kept across reloads.
    pub fn tunnel(&self, name: &str, side: &'static str) -> Arc<TunnelMetrics> {
        let mut map = self.tunnels.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((name.to_string(), side))
            .or_insert_with(|| {
                let f = &self.families;
                let labels = TunnelLabels {
                    tunnel: name.into(),
                    side: side.into(),
                };
                let outcomes = Outcome::ALL
                    .iter()
                    .map(|o| {
                        f.connections.get_or_create_owned(&OutcomeLabels {
                            tunnel: name.into(),
                            side: side.into(),
                            outcome: o.as_str().into(),
                        })
                    })
                    .collect();
                let bytes = |direction: &str| {
                    f.bytes.get_or_create_owned(&DirectionLabels {
                        tunnel: name.into(),
                        side: side.into(),
                        direction: direction.into(),
                    })
                };
                Arc::new(TunnelMetrics {
                    ghostunnel: self.ghostunnel.clone(),
                    outcomes,
                    open: f.open.get_or_create_owned(&labels),
                    bytes_up: bytes("up"),
                    bytes_down: bytes("down"),
                    handshake: Timed::new(f.handshake.get_or_create_owned(&labels)),
                    duration: Timed::new(f.duration.get_or_create_owned(&labels)),
                })
            })
            .clone()
    }

    pub fn reloaded(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.families
            .reloads
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }

    fn entries(&self) -> Vec<(Key, Arc<TunnelMetrics>)> {
        let map = self.tunnels.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// The Prometheus text (OpenMetrics) of every series, with the expiries and endpoints set as
    /// they are now (an endpoint no longer listed has no series).
    pub fn prometheus(
        &self,
        expiries: &Expiries,
        endpoints: &[EndpointSample],
        sources: &[SourceSample],
    ) -> String {
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let (found, failing) = (
            &self.families.source_endpoints,
            &self.families.source_failing,
        );
        found.clear();
        failing.clear();
        for s in sources {
            let labels = SourceLabels {
                tunnel: s.tunnel.clone(),
                side: s.side.to_string(),
                route: s.route.clone(),
                source: s.source.clone(),
            };
            found.get_or_create(&labels).set(s.endpoints as i64);
            failing.get_or_create(&labels).set(i64::from(s.failing));
        }
        let (open, up) = (&self.families.endpoint_open, &self.families.endpoint_up);
        open.clear();
        up.clear();
        for e in endpoints {
            let labels = EndpointLabels {
                tunnel: e.tunnel.clone(),
                side: e.side.to_string(),
                route: e.route.clone(),
                endpoint: e.endpoint.clone(),
            };
            open.get_or_create(&labels).set(e.open as i64);
            up.get_or_create(&labels).set(i64::from(e.up));
        }
        let expiry = &self.families.expiry;
        expiry.clear();
        for ((tunnel, side), t) in expiries {
            if let Some(t) = t {
                let labels = TunnelLabels {
                    tunnel: tunnel.clone(),
                    side: side.to_string(),
                };
                expiry.get_or_create(&labels).set(*t);
            }
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    /// The same figures as JSON (`/_metrics/legate`).
    pub fn json(&self, expiries: &Expiries) -> serde_json::Value {
        let expiry: BTreeMap<&Key, Option<i64>> = expiries.iter().map(|(k, v)| (k, *v)).collect();
        let tunnels: Vec<_> = self
            .entries()
            .iter()
            .map(|(key, m)| {
                let outcomes: serde_json::Map<String, serde_json::Value> = Outcome::ALL
                    .iter()
                    .zip(&m.outcomes)
                    .map(|(o, c)| (o.as_str().to_string(), c.get().into()))
                    .collect();
                serde_json::json!({
                    "tunnel": key.0,
                    "side": key.1,
                    "connections": outcomes,
                    "open_connections": m.open_connections(),
                    "bytes_up": m.bytes_up.get(),
                    "bytes_down": m.bytes_down.get(),
                    "handshake_duration_seconds": m.handshake.json(),
                    "connection_duration_seconds": m.duration.json(),
                    "certificate_expiry_timestamp_seconds": expiry.get(key).copied().flatten(),
                })
            })
            .collect();
        let reloads = |result: &str| {
            self.families
                .reloads
                .get_or_create(&ResultLabels {
                    result: result.into(),
                })
                .get()
        };
        serde_json::json!({
            "tunnels": tunnels,
            "reloads": { "ok": reloads("ok"), "failed": reloads("failed") },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_every_series() {
        let m = Metrics::default();
        let t = m.tunnel("cache\"x", "server");
        let guard = t.open();
        t.handshake_done(Duration::from_millis(3));
        t.finished(Outcome::Ok, 10, 20, Duration::from_millis(40));
        let sample = EndpointSample {
            tunnel: "cache\"x".into(),
            side: "server",
            route: String::new(),
            endpoint: "127.0.0.1:6379".into(),
            open: 2,
            up: true,
        };
        let text = m.prometheus(
            &vec![(("cache\"x".into(), "server"), Some(1_900_000_000))],
            &[sample],
            &[],
        );
        for needle in [
            "legate_connections_total{tunnel=\"cache\\\"x\",side=\"server\",outcome=\"ok\"} 1",
            "legate_connections_total{tunnel=\"cache\\\"x\",side=\"server\",outcome=\"expired\"} 0",
            "legate_open_connections{tunnel=\"cache\\\"x\",side=\"server\"} 1",
            "direction=\"down\"} 20",
            "legate_handshake_duration_seconds_bucket{le=\"0.005\",tunnel=\"cache\\\"x\",side=\"server\"} 1",
            "legate_connection_duration_seconds_count{tunnel=\"cache\\\"x\",side=\"server\"} 1",
            "legate_certificate_expiry_timestamp_seconds{tunnel=\"cache\\\"x\",side=\"server\"} 1900000000",
            "legate_reloads_total{result=\"failed\"} 0",
            "legate_endpoint_open_connections{tunnel=\"cache\\\"x\",side=\"server\",route=\"\",endpoint=\"127.0.0.1:6379\"} 2",
            "legate_endpoint_up{tunnel=\"cache\\\"x\",side=\"server\",route=\"\",endpoint=\"127.0.0.1:6379\"} 1",
            "# TYPE legate_connections counter",
            "# EOF",
        ] {
            assert!(text.contains(needle), "{needle} missing:\n{text}");
        }
        drop(guard);
        let text = m.prometheus(&vec![], &[], &[]);
        assert!(text.contains("legate_open_connections{tunnel=\"cache\\\"x\",side=\"server\"} 0"));
        // A tunnel whose expiry is no longer known has no expiry series.
        assert!(
            !text.contains("legate_certificate_expiry_timestamp_seconds{"),
            "{text}"
        );
    }

    #[test]
    fn timers_expand_as_go_metrics_does() {
        let t = Timer::default();
        assert!(t.expand().iter().all(|(_, v)| *v == 0.0));
        for ms in 1..=100 {
            t.observe(Duration::from_millis(ms));
        }
        let e: BTreeMap<_, _> = t.expand().into_iter().collect();
        assert_eq!(e["count"], 100.0);
        assert_eq!(e["min"], 1e6);
        assert_eq!(e["max"], 1e8);
        assert_eq!(e["mean"], 50.5e6);
        // go-metrics: position p(n+1) = 50.5, between the 50th and 51st values.
        assert_eq!(e["50-percentile"], 50.5e6);
        assert_eq!(e["99-percentile"], 99.99e6);
        // The statistics cover the most recent observations only; the count covers all.
        for _ in 0..TIMER_SAMPLE {
            t.observe(Duration::from_millis(7));
        }
        let e: BTreeMap<_, _> = t.expand().into_iter().collect();
        assert_eq!(e["count"], (100 + TIMER_SAMPLE) as f64);
        assert_eq!((e["min"], e["max"]), (7e6, 7e6));
    }

    #[test]
    fn ghostunnel_json_names_every_series_under_the_prefix() {
        let g = Ghostunnel::default();
        g.accept_total.fetch_add(3, Ordering::Relaxed);
        let list = g.json("edge", "host-1", 1_700_000_000);
        let list = list.as_array().unwrap();
        assert_eq!(list.len(), 6 + 2 * 8);
        assert!(list.iter().all(|m| m["hostname"] == "host-1"
            && m["timestamp"] == 1_700_000_000
            && m["metric"].as_str().unwrap().starts_with("edge.")));
        let total = list
            .iter()
            .find(|m| m["metric"] == "edge.accept.total")
            .unwrap();
        assert_eq!(total["value"], 3);
        assert!(total["value"].is_u64(), "counters are integers: {total}");
    }
}
