//! FHIR cache benchmark (issue: local FHIR cache). Not a test: it prints
//! medians and side-by-side ratios for BENCHMARKS.md.
//!
//! `cargo bench --bench fhir` generates ~500k resources (200 patients ×
//! 2,500, one tenant; override with BENCH_PATIENTS / BENCH_PER_PATIENT),
//! then measures in one run:
//! - import throughput with all indexes, against the floor: the same JSON
//!   lines inserted into one plain SQLite table without indexes;
//! - search latency for three patient-scoped queries, p50 and p99;
//! - read by id, raw and through a plugin-style search context;
//! - the database size against the NDJSON size.

use std::path::Path;
use std::time::Instant;

use clinicbox::fhir::import::{self, Options};
use clinicbox::fhir::search::{self, Grants, SearchContext};
use clinicbox::fhir::synth::{self, SynthSpec};
use clinicbox::limits::Limits;
use clinicbox::scopes::Scope;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn dir_bytes(d: &Path) -> u64 {
    std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

fn main() {
    let patients = env("BENCH_PATIENTS", 200);
    let per = env("BENCH_PER_PATIENT", 2500);
    let tmp = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        tenants: vec!["bench".into()],
        patients_per_tenant: patients,
        resources_per_patient: per,
        ..SynthSpec::default()
    };
    let t = Instant::now();
    synth::write_ndjson(&spec, tmp.path()).unwrap();
    let src = tmp.path().join("bench");
    let mut files: Vec<_> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let ndjson_bytes = dir_bytes(&src);
    let lines: usize = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap().lines().count())
        .sum();
    println!(
        "data: {lines} resources, {patients} patients x {per}, NDJSON {:.1} MiB (generated in {:.1}s)",
        ndjson_bytes as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );

    // Floor: the same lines into one table, no indexes, same pragmas and batch size.
    let floor_db = tmp.path().join("floor.db");
    let floor = rusqlite::Connection::open(&floor_db).unwrap();
    floor.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; CREATE TABLE r(json TEXT NOT NULL);").unwrap();
    let t = Instant::now();
    let mut n = 0usize;
    floor.execute_batch("BEGIN").unwrap();
    for f in &files {
        for line in std::fs::read_to_string(f).unwrap().lines() {
            floor
                .prepare_cached("INSERT INTO r(json) VALUES (?1)")
                .unwrap()
                .execute([line])
                .unwrap();
            n += 1;
            if n.is_multiple_of(Limits::default().import_batch) {
                floor.execute_batch("COMMIT; BEGIN").unwrap();
            }
        }
    }
    floor.execute_batch("COMMIT").unwrap();
    let floor_rate = n as f64 / t.elapsed().as_secs_f64();

    // clinicbox import with every index.
    let data = tmp.path().join("data");
    let dd = clinicbox::datadir::DataDir::new(&data);
    dd.init().unwrap();
    let mut conn = clinicbox::fhir::open(&dd).unwrap();
    let opts = Options {
        tenant: "bench".into(),
        strict: false,
        now_ms: 0,
        progress: None,
    };
    let t = Instant::now();
    let reports = import::import_files(&mut conn, &files, &opts, &Limits::default()).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let written: u64 = reports.iter().map(|r| r.written()).sum();
    let rate = written as f64 / secs;
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    let db_bytes = std::fs::metadata(dd.fhir_db()).unwrap().len();
    println!(
        "import: {rate:.0} resources/s ({written} in {secs:.1}s); floor (plain insert, no indexes): {floor_rate:.0}/s; ratio {:.2} of floor",
        rate / floor_rate
    );
    println!(
        "size: fhir.db {:.1} MiB = {:.2} x NDJSON",
        db_bytes as f64 / 1048576.0,
        db_bytes as f64 / ndjson_bytes as f64
    );

    // Searches, as a plugin would run them: patient context + scopes.
    let limits = Limits::default();
    let scopes: Vec<Scope> = ["patient/Observation.rs", "patient/MedicationRequest.rs"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let end = spec.start_unix + i64::from(spec.days) * 86_400;
    let since = clinicbox::fhir::date::format_millis((end - 30 * 86_400) * 1000);
    let queries = [
        (
            "latest 50 vital signs",
            "Observation?category=vital-signs&_sort=-date&_count=50".to_owned(),
        ),
        (
            "active MedicationRequests",
            "MedicationRequest?status=active".to_owned(),
        ),
        (
            "labs in the last 30 days",
            format!("Observation?category=laboratory&date=ge{since}&_sort=-date"),
        ),
    ];
    // NEWS2's own query, under NEWS2's scope (the query the daemon runs on
    // every ingested reading).
    let news2_scopes: Vec<Scope> = ["patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let queries = queries.map(|(label, q)| (label, q, &scopes));
    let queries = queries.into_iter().chain([(
        "NEWS2's $lastn, NEWS2's scope",
        "Observation/$lastn?category=vital-signs&status=final,amended,corrected,preliminary&max=1"
            .to_owned(),
        &news2_scopes,
    )]);
    let rounds = env("BENCH_ROUNDS", 5);
    for (label, q, scopes) in queries {
        let parsed = search::parse(&q, &limits).unwrap();
        let mut times = Vec::new();
        let mut matched = 0u64;
        for _ in 0..rounds {
            for p in 0..patients {
                let pid = format!("p{p:04}");
                let ctx = SearchContext {
                    tenant: "bench",
                    patient: Some(&pid),
                    grants: Grants::Scopes(scopes),
                };
                let t = Instant::now();
                let b = search::search(&conn, &ctx, &parsed).unwrap();
                times.push(t.elapsed().as_secs_f64() * 1e6);
                matched += b.total.unwrap_or(b.entry.len() as u64);
            }
        }
        let avg = matched as f64 / (rounds * patients) as f64;
        println!(
            "search {label:<30} p50 {:>7.1} µs  p99 {:>7.1} µs  (avg total {avg:.0}; {q})",
            pct(&mut times.clone(), 0.5),
            pct(&mut times, 0.99)
        );
    }

    // Read by id.
    let ids: Vec<(String, String)> = conn
        .prepare("SELECT r.id, c.patient FROM resources r JOIN compartment c ON c.rid = r.rid WHERE r.type = 'Observation' ORDER BY r.rid % 7919, r.rid LIMIT 100000")
        .unwrap()
        .query_map([], |r| Ok((r.get(0).unwrap(), r.get(1).unwrap())))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let tid = clinicbox::fhir::tenant_id(&conn, "bench", false)
        .unwrap()
        .unwrap();
    let t = Instant::now();
    for (id, _) in &ids {
        clinicbox::fhir::store::read(&conn, tid, "Observation", id)
            .unwrap()
            .unwrap();
    }
    let raw = ids.len() as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for (id, pid) in &ids {
        let ctx = SearchContext {
            tenant: "bench",
            patient: Some(pid),
            grants: Grants::Scopes(&scopes),
        };
        search::read(&conn, &ctx, &format!("Observation/{id}")).unwrap();
    }
    let scoped = ids.len() as f64 / t.elapsed().as_secs_f64();
    println!(
        "read by id: {raw:.0}/s raw; {scoped:.0}/s through a patient + scope context ({} reads)",
        ids.len()
    );

    index_order(&conn, tid, patients, rounds);
}

/// The token index's column order, measured: the vitals query (count all,
/// keep the newest 50) through the shipped key and two alternatives built
/// on the same data.
fn index_order(conn: &rusqlite::Connection, tid: i64, patients: usize, rounds: usize) {
    conn.execute_batch(
        "CREATE INDEX alt_system_first ON idx_token(tid, patient, type, param, code, system, sort_ms);
         CREATE INDEX alt_no_sort_key ON idx_token(tid, patient, type, param, code, rid);",
    )
    .unwrap();
    let variants = [
        ("shipped (.., code, sort_ms, rid, system)", "NOT INDEXED"),
        (
            "alt (.., code, system, sort_ms)",
            "INDEXED BY alt_system_first",
        ),
        (
            "alt (.., code, rid): no sort key",
            "INDEXED BY alt_no_sort_key",
        ),
    ];
    for (label, hint) in variants {
        let sql = format!(
            "SELECT DISTINCT d.rid, d.sort_ms FROM idx_token d {hint} WHERE d.tid = ?1 AND d.patient = ?2 AND d.type = 2 \
             AND d.param = 2 AND d.code = 'vital-signs' ORDER BY d.sort_ms DESC, d.rid DESC"
        );
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(rusqlite::params![tid, "p0000"], |r| r.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let mut times = Vec::new();
        for _ in 0..rounds {
            for p in 0..patients {
                let pid = format!("p{p:04}");
                let t = Instant::now();
                let mut stmt = conn.prepare_cached(&sql).unwrap();
                let mut rows = stmt.query(rusqlite::params![tid, pid]).unwrap();
                let (mut n, mut page) = (0, Vec::new());
                while let Some(r) = rows.next().unwrap() {
                    if page.len() < 50 {
                        page.push(r.get::<_, i64>(0).unwrap());
                    }
                    n += 1;
                }
                assert!(n > 0 && page.len() == 50);
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        println!(
            "index order {label:<36} p50 {:>6.1} µs  p99 {:>6.1} µs  plan: {}",
            pct(&mut times.clone(), 0.5),
            pct(&mut times, 0.99),
            plan.join(" / ")
        );
    }
}
