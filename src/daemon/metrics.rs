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

/// Upper bounds of the latency histogram buckets, in seconds: fine
/// enough around device ingest's 10 ms goal to tell a 5 ms answer from a
/// 15 ms one.
const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0,
];

/// The stages of a device ingest request, timed one by one
/// (`clinicbox_ingest_stage_seconds`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum IngestStage {
    /// From the request's body being read to a worker taking it up.
    Queue,
    /// Checking the resources and storing them (until the FHIR writer's
    /// group has committed; its fsync runs on beside the plugins).
    Store,
    /// The triggered plugin calls, each with its durable audit records.
    Plugins,
    /// What is left of waiting for the stored resources' fsync.
    Durable,
    /// What is left of waiting for the `fhir.ingest` record to be durable.
    Record,
}

impl IngestStage {
    fn label(self) -> &'static str {
        match self {
            IngestStage::Queue => "queue",
            IngestStage::Store => "store",
            IngestStage::Plugins => "plugins",
            IngestStage::Durable => "durable",
            IngestStage::Record => "record",
        }
    }
}

/// A Prometheus histogram over [`BUCKETS`] (cumulative counts).
#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, took: Duration) {
        let s = took.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += s;
    }

    /// Writes the `_bucket`, `_sum` and `_count` lines of `name` with
    /// `labels` (already escaped, `key="value"` pairs joined by commas).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels},le=\"{b}\"}} {}",
                self.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels},le=\"+Inf\"}} {}\n{name}_sum{{{labels}}} {}\n{name}_count{{{labels}}} {}",
            self.count, self.sum, self.count
        );
    }
}

/// Writes one histogram family: its `# HELP` and `# TYPE` lines, then
/// each key's series, labelled by `labels(key)`.
fn render_histograms<K: Ord>(
    out: &mut String,
    name: &str,
    help: &str,
    m: &Mutex<BTreeMap<K, Histogram>>,
    labels: impl Fn(&K) -> String,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
    for (key, h) in m.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        h.render(out, name, &labels(key));
    }
}

/// Adds `took` to the histogram of `key` in `m`.
fn observe<K: Ord>(m: &Mutex<BTreeMap<K, Histogram>>, key: K, took: Duration) {
    let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
    m.entry(key).or_default().observe(took);
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
    /// Request latency by route, from the head's arrival to the answer.
    request_latency: Mutex<BTreeMap<&'static str, Histogram>>,
    /// Device ingest latency by stage.
    ingest_stages: Mutex<BTreeMap<IngestStage, Histogram>>,
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
    /// Counts one answered request and how long it took.
    pub fn request(&self, route: &'static str, status: u16, took: Duration) {
        bump(&self.requests, (route, status));
        observe(&self.request_latency, route, took);
    }

    /// Counts one plugin call and its latency.
    pub fn call(&self, plugin: &str, outcome: &'static str, took: Duration) {
        bump(&self.calls, (plugin.to_owned(), outcome));
        observe(&self.latency, plugin.to_owned(), took);
    }

    /// Times one stage of a device ingest request.
    pub fn ingest_stage(&self, stage: IngestStage, took: Duration) {
        observe(&self.ingest_stages, stage, took);
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
        render_histograms(
            &mut out,
            "clinicbox_plugin_call_seconds",
            "Plugin call latency, durable audit record included.",
            &self.latency,
            |plugin| format!("plugin=\"{}\"", esc(plugin)),
        );
        render_histograms(
            &mut out,
            "clinicbox_http_request_seconds",
            "Local API request latency, from the request head's arrival to the answer.",
            &self.request_latency,
            |route| format!("route=\"{route}\""),
        );
        render_histograms(
            &mut out,
            "clinicbox_ingest_stage_seconds",
            "Device ingest latency by stage: queue (waiting for a worker), store (checks and the group commit, up to its commit), plugins (triggered calls and their durable records), durable (the rest of the wait for the FHIR cache's fsync), record (the rest of the ingest record's wait).",
            &self.ingest_stages,
            |stage| format!("stage=\"{}\"", stage.label()),
        );
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
        m.request("invoke", 200, Duration::from_millis(4));
        m.request("invoke", 200, Duration::from_millis(12));
        m.call("acme/x\"y", "ok", Duration::from_millis(3));
        m.ingest_stage(IngestStage::Store, Duration::from_micros(2500));
        let t = m.render(&[("clinicbox_audit_backlog_records", "Backlog.", 7.0)]);
        assert!(t.contains("clinicbox_http_requests_total{route=\"invoke\",status=\"200\"} 2"));
        assert!(t.contains("plugin=\"acme/x\\\"y\",le=\"0.005\"} 1"));
        assert!(t.contains("plugin=\"acme/x\\\"y\",le=\"0.002\"} 0"));
        assert!(t.contains("clinicbox_plugin_call_seconds_count{plugin=\"acme/x\\\"y\"} 1"));
        assert!(
            t.contains("clinicbox_http_request_seconds_bucket{route=\"invoke\",le=\"0.005\"} 1")
        );
        assert!(
            t.contains("clinicbox_http_request_seconds_bucket{route=\"invoke\",le=\"0.015\"} 2")
        );
        assert!(t.contains("clinicbox_http_request_seconds_count{route=\"invoke\"} 2"));
        assert!(
            t.contains("clinicbox_ingest_stage_seconds_bucket{stage=\"store\",le=\"0.002\"} 0")
        );
        assert!(
            t.contains("clinicbox_ingest_stage_seconds_bucket{stage=\"store\",le=\"0.003\"} 1")
        );
        assert!(t.contains("clinicbox_ingest_stage_seconds_bucket{stage=\"store\",le=\"+Inf\"} 1"));
        assert!(t.contains("clinicbox_audit_backlog_records 7"));
    }
}
