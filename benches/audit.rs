//! Audit log benchmark. Not a test: it prints rates, medians and
//! side-by-side ratios for BENCHMARKS.md (`cargo bench --bench audit`).
//!
//! In one run:
//! - durable appends through `AuditLog` (group commit) from 1, 8 and 64
//!   threads, beside the baseline of one transaction (one fsync) per record;
//! - upload of 50,000 records to the loopback HTTPS upstream;
//! - `audit verify` over 1,000,000 records.
//!
//! `BENCH_VERIFY_RECORDS` and `BENCH_UPLOAD_RECORDS` scale it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clinicbox::audit::log::{self, AuditLog, Entry};
use clinicbox::audit::verify;
use clinicbox::config::Upstream as UpstreamConfig;
use clinicbox::datadir::DataDir;
use clinicbox::limits::Limits;

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

/// A realistic record body: a host access of a plugin search.
fn body(i: u64) -> serde_json::Value {
    serde_json::json!({
        "call_id": format!("00000000-0000-4000-8000-{i:012}"),
        "time": "2026-11-26T04:00:00.000Z",
        "plugin": "acme/news2",
        "host_fn": "fhir_search",
        "tenant": "clinic-a",
        "patient": format!("p{:04}", i % 1000),
        "query": "Observation?category=vital-signs&_sort=-date&_count=50",
        "outcome": "ok",
        "detail": "42 resources",
        "duration_us": 180
    })
}

fn fresh() -> (tempfile::TempDir, DataDir) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = DataDir::new(tmp.path().join("data"));
    dir.init().unwrap();
    (tmp, dir)
}

/// Records/s with `threads` appenders for about `secs`.
fn group_commit(threads: usize, secs: f64) -> (f64, u64) {
    let (_tmp, dir) = fresh();
    let log = AuditLog::open(&dir, &Limits::default()).unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let log = log.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    log.append(Entry::new("host.access", &body(t as u64 * 1_000_000 + n)))
                        .unwrap();
                    n += 1;
                }
                n
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let total: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    let rate = total as f64 / started.elapsed().as_secs_f64();
    // Everything appended is there, chained.
    let key = clinicbox::keys::read_public(&dir.identity_pub(), 4096).unwrap();
    let conn = dir.open_audit().unwrap();
    let report = verify::verify(&conn, &key, &[]).unwrap().unwrap();
    assert_eq!(report.records as u64, total);
    (rate, total)
}

/// Records/s with one transaction (one fsync) per record, one thread.
fn one_fsync_each(secs: f64) -> f64 {
    let (_tmp, dir) = fresh();
    let conn = dir.open_audit().unwrap();
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed().as_secs_f64() < secs {
        log::append_one(&conn, None, Entry::new("host.access", &body(n))).unwrap();
        n += 1;
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Fills a log with `n` records in big transactions.
fn fill(dir: &DataDir, n: u64) {
    let conn = dir.open_audit().unwrap();
    let mut i = 0;
    while i < n {
        let batch: Vec<Entry> = (i..(i + 10_000).min(n))
            .map(|k| Entry::new("host.access", &body(k)))
            .collect();
        i += batch.len() as u64;
        log::append_batch(&conn, None, &batch).unwrap();
    }
}

fn main() {
    let env_n = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };

    // 1. Durable appends.
    let base = one_fsync_each(3.0);
    println!("durable appends, one transaction (fsync) per record, 1 thread: {base:.0} records/s");
    for threads in [1, 8, 64] {
        let (rate, total) = group_commit(threads, 3.0);
        println!(
            "durable appends, AuditLog group commit, {threads:>2} threads: {rate:.0} records/s ({total} records, verified) = {:.1}x the baseline",
            rate / base
        );
    }

    // 2. Upload to the loopback HTTPS upstream.
    let n_up = env_n("BENCH_UPLOAD_RECORDS", 50_000);
    let (tmp, dir) = fresh();
    fill(&dir, n_up);
    let up = common::upstream::Upstream::start(tmp.path(), common::upstream::CertKind::Good);
    let cfg = UpstreamConfig {
        url: up.url.clone(),
        ca_file: Some(up.ca_pem.clone()),
        pinned_cert: None,
        token_file: None,
        client_cert: None,
        plain_http: false,
        connect_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(30),
        attempts: 1,
        backoff: Duration::from_millis(10),
        backoff_max: Duration::from_millis(10),
        interval: Duration::from_secs(60),
        pull: None,
    };
    let t = Instant::now();
    let r = clinicbox::sync::upload::upload(&dir, &cfg, &Limits::default()).unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(up.ids().len() as i64, r.acked_seq);
    println!(
        "upload to the loopback HTTPS upstream: {} records in {} batches, {secs:.2} s = {:.0} records/s (server parsing and storing included)",
        r.sent,
        r.batches,
        r.sent as f64 / secs
    );

    // 3. audit verify over many records.
    let n_ver = env_n("BENCH_VERIFY_RECORDS", 1_000_000);
    let (_tmp2, dir2) = fresh();
    let t = Instant::now();
    fill(&dir2, n_ver);
    let fill_secs = t.elapsed().as_secs_f64();
    let key = clinicbox::keys::read_public(&dir2.identity_pub(), 4096).unwrap();
    let conn = dir2.open_audit().unwrap();
    let t = Instant::now();
    let report = verify::verify(&conn, &key, &[]).unwrap().unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(report.records as u64, n_ver);
    let size = std::fs::metadata(dir2.audit_db())
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "audit verify over {n_ver} records ({:.0} MiB): {secs:.2} s = {:.0} records/s (filling took {fill_secs:.1} s)",
        size as f64 / 1048576.0,
        n_ver as f64 / secs
    );
}
