//! Metrics: counters, gauges and histograms per tunnel and side, rendered as Prometheus text
//! exposition or JSON.
//!
//! In: events from the connection pipeline (an outcome, bytes, durations). Out: `/_metrics`.
//! Everything is a relaxed atomic, so recording costs a few uncontended adds per connection.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::outcome::Outcome;

/// Upper bounds (seconds) of the handshake histogram's buckets.
const HANDSHAKE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Upper bounds (seconds) of the connection-duration histogram's buckets.
const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

/// A fixed-bucket histogram.
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last one is +Inf.
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// (upper bound, cumulative count) pairs, the +Inf bucket last, and the sum in seconds.
    fn snapshot(&self) -> (Vec<(f64, u64)>, f64) {
        let mut total = 0;
        let mut out = Vec::with_capacity(self.counts.len());
        for (i, c) in self.counts.iter().enumerate() {
            total += c.load(Ordering::Relaxed);
            out.push((self.bounds.get(i).copied().unwrap_or(f64::INFINITY), total));
        }
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (out, sum)
    }
}

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

/// The metrics of one tunnel.
pub struct TunnelMetrics {
    /// The process-wide ghostunnel series this tunnel also counts into.
    pub ghostunnel: Arc<Ghostunnel>,
    outcomes: Vec<AtomicU64>,
    open: AtomicI64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    pub handshake: Histogram,
    pub duration: Histogram,
}

impl TunnelMetrics {
    fn new(ghostunnel: Arc<Ghostunnel>) -> TunnelMetrics {
        TunnelMetrics {
            ghostunnel,
            outcomes: Outcome::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            open: AtomicI64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            handshake: Histogram::new(HANDSHAKE_BUCKETS),
            duration: Histogram::new(DURATION_BUCKETS),
        }
    }

    /// Counts an accepted connection as open until the guard drops, and then its lifetime.
    pub fn open(self: &Arc<Self>) -> OpenGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.ghostunnel.accept_total.fetch_add(1, Ordering::Relaxed);
        self.ghostunnel.conn_open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(self.clone(), std::time::Instant::now())
    }

    /// A TLS handshake (incoming on the server side, outgoing on the client side) took `d`.
    pub fn handshake_done(&self, d: Duration) {
        self.handshake.observe(d);
        self.ghostunnel.handshake.observe(d);
    }

    /// An accepted connection was set up (handshake and onward connection) or failed to be;
    /// `timed_out`: its incoming handshake timed out.
    /// A timed-out handshake counts as an error too, as in ghostunnel.
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
        self.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
        self.bytes_up.fetch_add(up, Ordering::Relaxed);
        self.bytes_down.fetch_add(down, Ordering::Relaxed);
        self.duration.observe(elapsed);
    }

    pub fn open_connections(&self) -> i64 {
        self.open.load(Ordering::Relaxed)
    }
}

/// Decrements the open-connection gauges and times the connection's life when dropped,
/// however the connection ends.
pub struct OpenGuard(Arc<TunnelMetrics>, std::time::Instant);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        let g = &self.0.ghostunnel;
        g.conn_open.fetch_sub(1, Ordering::Relaxed);
        g.lifetime.observe(self.1.elapsed());
    }
}

/// Identifies a tunnel's series: its name and side.
pub type Key = (String, &'static str);

/// All tunnels' metrics, plus process-wide counters.
#[derive(Default)]
pub struct Metrics {
    pub ghostunnel: Arc<Ghostunnel>,
    tunnels: Mutex<BTreeMap<Key, Arc<TunnelMetrics>>>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
}

/// Values computed at scrape time rather than counted: per tunnel, its certificate's expiry.
pub type Expiries = Vec<(Key, Option<i64>)>;

impl Metrics {
    /// The series of a tunnel, created on first use and kept across reloads.
    pub fn tunnel(&self, name: &str, side: &'static str) -> Arc<TunnelMetrics> {
        let mut map = self.tunnels.lock().unwrap_or_else(|e| e.into_inner());
        map.entry((name.to_string(), side))
            .or_insert_with(|| Arc::new(TunnelMetrics::new(self.ghostunnel.clone())))
            .clone()
    }

    pub fn reloaded(&self, ok: bool) {
        let c = if ok {
            &self.reloads_ok
        } else {
            &self.reloads_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn entries(&self) -> Vec<(Key, Arc<TunnelMetrics>)> {
        let map = self.tunnels.lock().unwrap_or_else(|e| e.into_inner());
        map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Prometheus text exposition format, version 0.0.4.
    pub fn prometheus(&self, expiries: &Expiries) -> String {
        let entries = self.entries();
        let mut out = String::new();
        let labels = |(name, side): &Key| format!("tunnel=\"{}\",side=\"{side}\"", escape(name));

        header(
            &mut out,
            "legate_connections_total",
            "counter",
            "Connections by how they ended.",
        );
        for (key, m) in &entries {
            for (i, outcome) in Outcome::ALL.iter().enumerate() {
                let n = m.outcomes[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "legate_connections_total{{{},outcome=\"{outcome}\"}} {n}",
                    labels(key)
                );
            }
        }
        header(
            &mut out,
            "legate_open_connections",
            "gauge",
            "Connections open now.",
        );
        for (key, m) in &entries {
            let _ = writeln!(
                out,
                "legate_open_connections{{{}}} {}",
                labels(key),
                m.open_connections()
            );
        }
        header(
            &mut out,
            "legate_bytes_total",
            "counter",
            "Bytes relayed; up is consumer to service.",
        );
        for (key, m) in &entries {
            for (dir, c) in [("up", &m.bytes_up), ("down", &m.bytes_down)] {
                let _ = writeln!(
                    out,
                    "legate_bytes_total{{{},direction=\"{dir}\"}} {}",
                    labels(key),
                    c.load(Ordering::Relaxed)
                );
            }
        }
        for (name, help, pick) in [
            (
                "legate_handshake_duration_seconds",
                "TLS handshake time.",
                (|m: &TunnelMetrics| &m.handshake) as fn(&TunnelMetrics) -> &Histogram,
            ),
            (
                "legate_connection_duration_seconds",
                "Connection lifetime.",
                |m: &TunnelMetrics| &m.duration,
            ),
        ] {
            header(&mut out, name, "histogram", help);
            for (key, m) in &entries {
                let (buckets, sum) = pick(m).snapshot();
                for (bound, count) in &buckets {
                    let le = if bound.is_infinite() {
                        "+Inf".to_string()
                    } else {
                        bound.to_string()
                    };
                    let _ = writeln!(out, "{name}_bucket{{{},le=\"{le}\"}} {count}", labels(key));
                }
                let count = buckets.last().map_or(0, |b| b.1);
                let _ = writeln!(out, "{name}_sum{{{}}} {sum}", labels(key));
                let _ = writeln!(out, "{name}_count{{{}}} {count}", labels(key));
            }
        }
        header(
            &mut out,
            "legate_certificate_expiry_timestamp_seconds",
            "gauge",
            "When the tunnel's current certificate expires (Unix time).",
        );
        for (key, expiry) in expiries {
            if let Some(t) = expiry {
                let _ = writeln!(
                    out,
                    "legate_certificate_expiry_timestamp_seconds{{{}}} {t}",
                    labels(key)
                );
            }
        }
        header(
            &mut out,
            "legate_reloads_total",
            "counter",
            "Reloads by result.",
        );
        let _ = writeln!(
            out,
            "legate_reloads_total{{result=\"ok\"}} {}",
            self.reloads_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "legate_reloads_total{{result=\"failed\"}} {}",
            self.reloads_failed.load(Ordering::Relaxed)
        );
        out
    }

    /// The same figures as JSON.
    pub fn json(&self, expiries: &Expiries) -> serde_json::Value {
        let expiry: BTreeMap<&Key, Option<i64>> = expiries.iter().map(|(k, v)| (k, *v)).collect();
        let tunnels: Vec<_> = self
            .entries()
            .iter()
            .map(|(key, m)| {
                let outcomes: serde_json::Map<String, serde_json::Value> = Outcome::ALL
                    .iter()
                    .enumerate()
                    .map(|(i, o)| {
                        (
                            o.as_str().to_string(),
                            m.outcomes[i].load(Ordering::Relaxed).into(),
                        )
                    })
                    .collect();
                let histogram = |h: &Histogram| {
                    let (buckets, sum) = h.snapshot();
                    serde_json::json!({
                        "buckets": buckets.iter().map(|(b, c)| serde_json::json!({
                            "le": if b.is_infinite() { "+Inf".to_string() } else { b.to_string() },
                            "count": c,
                        })).collect::<Vec<_>>(),
                        "sum": sum,
                        "count": buckets.last().map_or(0, |b| b.1),
                    })
                };
                serde_json::json!({
                    "tunnel": key.0,
                    "side": key.1,
                    "connections": outcomes,
                    "open_connections": m.open_connections(),
                    "bytes_up": m.bytes_up.load(Ordering::Relaxed),
                    "bytes_down": m.bytes_down.load(Ordering::Relaxed),
                    "handshake_duration_seconds": histogram(&m.handshake),
                    "connection_duration_seconds": histogram(&m.duration),
                    "certificate_expiry_timestamp_seconds": expiry.get(key).copied().flatten(),
                })
            })
            .collect();
        serde_json::json!({
            "tunnels": tunnels,
            "reloads": {
                "ok": self.reloads_ok.load(Ordering::Relaxed),
                "failed": self.reloads_failed.load(Ordering::Relaxed),
            },
        })
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value: backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_millis(500));
        h.observe(Duration::from_secs(5));
        let (b, sum) = h.snapshot();
        assert_eq!(b.iter().map(|x| x.1).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!((sum - 5.55).abs() < 1e-6);
    }

    #[test]
    fn prometheus_text_has_every_series() {
        let m = Metrics::default();
        let t = m.tunnel("cache\"x", "server");
        let guard = t.open();
        t.handshake.observe(Duration::from_millis(3));
        t.finished(Outcome::Ok, 10, 20, Duration::from_millis(40));
        let text = m.prometheus(&vec![(("cache\"x".into(), "server"), Some(1_900_000_000))]);
        assert!(
            text.contains(
                "legate_connections_total{tunnel=\"cache\\\"x\",side=\"server\",outcome=\"ok\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains("legate_open_connections{tunnel=\"cache\\\"x\",side=\"server\"} 1"));
        assert!(text.contains("direction=\"down\"} 20"));
        assert!(text.contains("legate_handshake_duration_seconds_bucket{tunnel=\"cache\\\"x\",side=\"server\",le=\"0.005\"} 1"));
        assert!(text.contains(
            "legate_connection_duration_seconds_count{tunnel=\"cache\\\"x\",side=\"server\"} 1"
        ));
        assert!(text.contains("legate_certificate_expiry_timestamp_seconds{tunnel=\"cache\\\"x\",side=\"server\"} 1900000000"));
        drop(guard);
        assert!(
            m.prometheus(&vec![])
                .contains("legate_open_connections{tunnel=\"cache\\\"x\",side=\"server\"} 0")
        );
    }
}
