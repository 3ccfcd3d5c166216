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

/// The metrics of one tunnel.
pub struct TunnelMetrics {
    outcomes: Vec<AtomicU64>,
    open: AtomicI64,
    bytes_up: AtomicU64,
    bytes_down: AtomicU64,
    pub handshake: Histogram,
    pub duration: Histogram,
}

impl TunnelMetrics {
    fn new() -> TunnelMetrics {
        TunnelMetrics {
            outcomes: Outcome::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            open: AtomicI64::new(0),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            handshake: Histogram::new(HANDSHAKE_BUCKETS),
            duration: Histogram::new(DURATION_BUCKETS),
        }
    }

    /// Counts an open connection until the guard drops.
    pub fn open(self: &Arc<Self>) -> OpenGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(self.clone())
    }

    /// Records the end of a connection.
    pub fn finished(&self, outcome: Outcome, up: u64, down: u64, elapsed: Duration) {
        self.outcomes[outcome.index()].fetch_add(1, Ordering::Relaxed);
        self.bytes_up.fetch_add(up, Ordering::Relaxed);
        self.bytes_down.fetch_add(down, Ordering::Relaxed);
        self.duration.observe(elapsed);
    }

    pub fn open_connections(&self) -> i64 {
        self.open.load(Ordering::Relaxed)
    }
}

/// Decrements the open-connection gauge when dropped, however the connection ends.
pub struct OpenGuard(Arc<TunnelMetrics>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Identifies a tunnel's series: its name and side.
pub type Key = (String, &'static str);

/// All tunnels' metrics, plus process-wide counters.
#[derive(Default)]
pub struct Metrics {
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
            .or_insert_with(|| Arc::new(TunnelMetrics::new()))
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
