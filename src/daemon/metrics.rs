//! In-process counters of the daemon, rendered as Prometheus text at
//! `GET /metrics`.
//!
//! Counters and histograms live in memory and reset when the daemon
//! restarts (Prometheus handles resets). Gauges that describe durable
//! state (audit backlog, quarantines, sync state) are read from the
//! databases at scrape time, so they are never stale.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency histogram buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// The daemon's counters.
#[derive(Default)]
pub struct Metrics {
    /// Requests by (route, status).
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// Plugin calls by (plugin, outcome).
    calls: Mutex<BTreeMap<(String, &'static str), u64>>,
    /// Call latency by plugin.
    latency: Mutex<BTreeMap<String, Histogram>>,
    /// Inbox and update-channel outcomes by (source, outcome).
    bundles: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Observations stored by device ingest.
    pub ingested: AtomicU64,
    /// Requests being served now.
    pub inflight: AtomicU64,
    /// Connections open now.
    pub connections: AtomicU64,
    /// Sync passes that failed / succeeded.
    pub sync_failures: AtomicU64,
    /// Sync passes that succeeded.
    pub sync_successes: AtomicU64,
}

fn bump<K: Ord>(m: &Mutex<BTreeMap<K, u64>>, k: K) {
    let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
    *m.entry(k).or_default() += 1;
}

/// A label value with `\`, `"` and newlines escaped.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Counts one answered request.
    pub fn request(&self, route: &'static str, status: u16) {
        bump(&self.requests, (route, status));
    }

    /// Counts one plugin call and its latency.
    pub fn call(&self, plugin: &str, outcome: &'static str, took: Duration) {
        bump(&self.calls, (plugin.to_owned(), outcome));
        let mut h = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let h = h.entry(plugin.to_owned()).or_default();
        let s = took.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += s;
    }

    /// Counts one bundle decision from the inbox or the update channel.
    pub fn bundle(&self, source: &'static str, outcome: &'static str) {
        bump(&self.bundles, (source, outcome));
    }

    /// The Prometheus text exposition, with `gauges` (name, help, value)
    /// read from durable state appended.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP clinicbox_http_requests_total Local API requests answered.\n# TYPE clinicbox_http_requests_total counter"
        );
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "clinicbox_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP clinicbox_plugin_calls_total Plugin calls by outcome.\n# TYPE clinicbox_plugin_calls_total counter"
        );
        for ((plugin, outcome), n) in self.calls.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(
                out,
                "clinicbox_plugin_calls_total{{plugin=\"{}\",outcome=\"{outcome}\"}} {n}",
                esc(plugin)
            );
        }
        let _ = writeln!(
            out,
            "# HELP clinicbox_plugin_call_seconds Plugin call latency, durable audit record included.\n# TYPE clinicbox_plugin_call_seconds histogram"
        );
        for (plugin, h) in self
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let p = esc(plugin);
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "clinicbox_plugin_call_seconds_bucket{{plugin=\"{p}\",le=\"{b}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "clinicbox_plugin_call_seconds_bucket{{plugin=\"{p}\",le=\"+Inf\"}} {}\nclinicbox_plugin_call_seconds_sum{{plugin=\"{p}\"}} {}\nclinicbox_plugin_call_seconds_count{{plugin=\"{p}\"}} {}",
                h.count, h.sum, h.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP clinicbox_bundles_total Bundle decisions of the inbox and update channel.\n# TYPE clinicbox_bundles_total counter"
        );
        for ((source, outcome), n) in self
            .bundles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "clinicbox_bundles_total{{source=\"{source}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        let simple = [
            (
                "clinicbox_ingested_observations_total",
                "counter",
                "Resources stored by device ingest.",
                self.ingested.load(Ordering::Relaxed),
            ),
            (
                "clinicbox_inflight_requests",
                "gauge",
                "Requests being served.",
                self.inflight.load(Ordering::Relaxed),
            ),
            (
                "clinicbox_open_connections",
                "gauge",
                "Open API connections.",
                self.connections.load(Ordering::Relaxed),
            ),
            (
                "clinicbox_sync_failures_total",
                "counter",
                "Sync passes that failed.",
                self.sync_failures.load(Ordering::Relaxed),
            ),
            (
                "clinicbox_sync_successes_total",
                "counter",
                "Sync passes that succeeded.",
                self.sync_successes.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, v) in simple {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        }
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_escapes_labels() {
        let m = Metrics::default();
        m.request("invoke", 200);
        m.request("invoke", 200);
        m.call("acme/x\"y", "ok", Duration::from_millis(3));
        let t = m.render(&[("clinicbox_audit_backlog_records", "Backlog.", 7.0)]);
        assert!(t.contains("clinicbox_http_requests_total{route=\"invoke\",status=\"200\"} 2"));
        assert!(t.contains("plugin=\"acme/x\\\"y\",le=\"0.005\"} 1"));
        assert!(t.contains("plugin=\"acme/x\\\"y\",le=\"0.002\"} 0"));
        assert!(t.contains("clinicbox_audit_backlog_records 7"));
    }
}
