//! Scope: the tamper-evident audit log as an auditor meets it: records made
//! by real commands (installs, a rejected bundle, an import, grants, NEWS2
//! calls with their host accesses, a denial), `audit verify` on the clean
//! log, then each tampering (edit, delete, reorder, truncate) made with
//! sqlite3 around the append-only triggers, each caught with the first bad
//! record named. Also: the schema-3 migration of older records, and the
//! FHIR rendering of every kind validated by FHIR.js against the R4
//! StructureDefinitions.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use rusqlite::Connection;
use serde_json::Value;

/// A box with every kind of record: decisions (accepted, rejected, no-op),
/// an import, grants, NEWS2 calls with host accesses, a denied call.
fn busy_box() -> TestBox {
    let b = news2_box(3, false);
    // A denied call (no grant yet): the call and its denied access.
    assert_eq!(b.call_news2("p0002").status.code(), Some(7));
    b.grant_news2();
    for _ in 0..8 {
        assert!(b.call_news2("p0002").status.success());
    }
    // A rejected bundle and a no-op reinstall.
    let mut bytes = std::fs::read(example_bundle()).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 1;
    let bad = b.file("tampered.cbx", &bytes);
    assert_eq!(
        b.run(&["plugin", "install", bad.to_str().unwrap()])
            .status
            .code(),
        Some(3)
    );
    b.ok(&["plugin", "install", example_bundle().to_str().unwrap()]);
    // An administrator's read on the command line.
    b.search("clinic-a", "p0002", "Observation?_count=1");
    b
}

fn kinds(b: &TestBox) -> Vec<String> {
    b.json(&["audit", "tail", "-n", "1000"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap().to_owned())
        .collect()
}

/// Opens audit.db as an attacker with file access would: the append-only
/// triggers dropped first.
fn tamper(data: &Path, sql: &str) {
    let c = Connection::open(data.join("audit.db")).unwrap();
    c.execute_batch(
        "DROP TRIGGER log_sealed; DROP TRIGGER log_no_delete;
         DROP TRIGGER checkpoints_no_update; DROP TRIGGER checkpoints_no_delete;",
    )
    .unwrap();
    c.execute_batch(sql).unwrap();
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn every_kind_of_record_is_chained_and_verifies() {
    let b = busy_box();
    let k = kinds(&b);
    for want in [
        "bundle.decision",
        "fhir.import",
        "grant",
        "plugin.call",
        "host.access",
        "fhir.access",
    ] {
        assert!(k.iter().any(|x| x == want), "no {want} record in {k:?}");
    }
    let recs = b.json(&["audit", "tail", "-n", "1000"]);
    let recs = recs.as_array().unwrap();
    // seq runs 1..=n, and each record links to the one before.
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["seq"], i as i64 + 1);
        if i > 0 {
            assert_eq!(r["prev"], recs[i - 1]["hash"]);
        }
    }
    // The denied search and the rejected bundle are on record.
    assert!(recs.iter().any(|r| {
        r["kind"] == "host.access"
            && r["body"]
                .as_str()
                .unwrap()
                .contains("\"outcome\":\"denied\"")
    }));
    assert!(recs.iter().any(|r| {
        r["kind"] == "bundle.decision"
            && r["body"]
                .as_str()
                .unwrap()
                .contains("\"outcome\":\"rejected\"")
    }));
    let v = b.json(&["audit", "verify"]);
    assert_eq!(v["records"], recs.len());
    assert!(v["checkpoints"].as_u64().unwrap() >= 1, "{v}");
}

#[test]
fn each_tampering_is_caught_and_the_first_bad_record_named() {
    let b = busy_box();
    let n = b.json(&["audit", "verify"])["records"].as_i64().unwrap();
    assert!(n >= 20, "{n} records");
    // An export anchors the current head (in state.db and in a file).
    let export = b.path("audit.ndjson");
    b.ok(&["audit", "export", "--out", export.to_str().unwrap()]);
    let cp_file = format!("{}.checkpoint.json", export.display());
    assert_eq!(
        std::fs::read_to_string(&export).unwrap().lines().count() as i64,
        n
    );
    let cases: Vec<(&str, String, String)> = vec![
        (
            "edit",
            "UPDATE log SET body = replace(body, 'clinic-a', 'clinic-b') WHERE seq = 7".into(),
            "record 7: its content does not match its hash (edited)".into(),
        ),
        (
            "delete",
            "DELETE FROM log WHERE seq = 9".into(),
            "record 9 is missing: the log goes from 8 to 10 (deleted)".into(),
        ),
        (
            // Swap records 11 and 12 whole (all but seq).
            "reorder",
            "CREATE TEMP TABLE t AS SELECT * FROM log WHERE seq IN (11, 12);
             DELETE FROM log WHERE seq IN (11, 12);
             INSERT INTO log SELECT 11, id, time, kind, body, cum_bytes, prev, hash FROM t WHERE seq = 12;
             INSERT INTO log SELECT 12, id, time, kind, body, cum_bytes, prev, hash FROM t WHERE seq = 11;"
                .into(),
            "record 11: its link does not match the hash of record 10".into(),
        ),
        (
            // Cut the tail, and the checkpoints that covered it.
            "truncate",
            format!("DELETE FROM log WHERE seq > {}; DELETE FROM checkpoints WHERE size > {};", n - 5, n - 5),
            format!("the log ends at record {}, but the checkpoint at {n} exported", n - 5),
        ),
    ];
    for (what, sql, want) in cases {
        let copy = b.path(&format!("tampered-{what}"));
        copy_dir(&b.data, &copy);
        tamper(&copy, &sql);
        let out = Command::new(env!("CARGO_BIN_EXE_clinicbox"))
            .args(["--data-dir", copy.to_str().unwrap(), "--config"])
            .arg(&b.config)
            .args(["audit", "verify"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(8), "{what}: {}", stderr(&out));
        assert!(stderr(&out).contains(&want), "{what}: {}", stderr(&out));
    }
    // A truncation that also removed the state.db anchor is still caught
    // by the exported checkpoint file.
    let copy = b.path("tampered-all");
    copy_dir(&b.data, &copy);
    tamper(
        &copy,
        &format!(
            "DELETE FROM log WHERE seq > {}; DELETE FROM checkpoints;",
            n - 1
        ),
    );
    Connection::open(copy.join("state.db"))
        .unwrap()
        .execute("DELETE FROM audit_anchors", [])
        .unwrap();
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_clinicbox"))
            .args(["--data-dir", copy.to_str().unwrap(), "--config"])
            .arg(&b.config)
            .args(["audit", "verify"])
            .args(extra)
            .output()
            .unwrap()
    };
    assert!(
        run(&[]).status.success(),
        "without an anchor it cannot tell"
    );
    let out = run(&["--checkpoint", &cp_file]);
    assert_eq!(out.status.code(), Some(8));
    assert!(stderr(&out).contains("(truncated)"), "{}", stderr(&out));
    // The clean log still verifies against the file.
    b.ok(&["audit", "verify", "--checkpoint", &cp_file]);
}

#[test]
fn records_from_before_the_chain_are_migrated_and_sealed() {
    // A schema-2 audit.db (as issues 2-4 left it) with one record of each
    // earlier table.
    let b = TestBox::new();
    let audit = b.data.join("audit.db");
    std::fs::remove_file(&audit).unwrap();
    let _ = std::fs::remove_file(b.data.join("audit.db-wal"));
    let _ = std::fs::remove_file(b.data.join("audit.db-shm"));
    let c = Connection::open(&audit).unwrap();
    for m in &clinicbox::audit::MIGRATIONS[..2] {
        c.execute_batch(m).unwrap();
    }
    c.pragma_update(None, "user_version", 2).unwrap();
    c.execute_batch(
        "INSERT INTO bundle_decisions (time, action, source, signers, outcome, reason)
           VALUES ('2026-11-25T01:00:00Z', 'install', 'a.cbx', '[\"k1\"]', 'accepted', 'installed');
         INSERT INTO plugin_calls (call_id, time, plugin, version, digest, function, tenant, patient, requester, purpose, outcome, detail, duration_us)
           VALUES ('c1', '2026-11-25T02:00:00Z', 'acme/x', '1.0.0', 'd', 'f', 'clinic-a', 'p1', 'cli', 'TREAT', 'ok', '2 bytes out', 10);
         INSERT INTO host_accesses (call_id, time, plugin, host_fn, tenant, patient, query, outcome, detail, duration_us)
           VALUES ('c1', '2026-11-25T01:30:00Z', 'acme/x', 'fhir_read', 'clinic-a', 'p1', 'Observation/o1', 'ok', '1 resources', 5);",
    )
    .unwrap();
    drop(c);
    // The old readers still work (views), in time order, and the first
    // write seals the moved rows into the chain.
    // Opening the log seals them: it verifies before anything is written.
    let v = b.json(&["audit", "verify"]);
    assert_eq!(v["records"], 3, "{v}");
    let hist = b.json(&["plugin", "history"]);
    assert_eq!(hist[0]["source"], "a.cbx");
    assert_eq!(hist[0]["signers"][0], "k1");
    b.ok(&["plugin", "ungrant", "--tenant", "clinic-a", "acme/x"]);
    let recs = b.json(&["audit", "tail"]);
    let kinds: Vec<&str> = recs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds[..3],
        ["bundle.decision", "host.access", "plugin.call"]
    );
    let v = b.json(&["audit", "verify"]);
    assert!(v["records"].as_i64().unwrap() >= 3, "{v}");
}

/// Runs FHIR.js over `resources`, installing it first if needed (npm).
fn fhir_js(resources: &[Value]) -> Vec<Value> {
    let dir = repo().join("tests/fhir-validator");
    if !dir.join("node_modules/fhir").is_dir() {
        let st = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .status()
            .expect("npm (Node.js) is needed to validate FHIR output");
        assert!(st.success(), "npm ci in tests/fhir-validator failed");
    }
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), serde_json::to_vec(resources).unwrap()).unwrap();
    let out = Command::new("node")
        .arg(dir.join("validate.js"))
        .arg(tmp.path())
        .output()
        .expect("node");
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn every_record_renders_as_a_valid_fhir_r4_auditevent_after_balp() {
    let b = busy_box();
    let recs = b.json(&["audit", "tail", "-n", "1000"]);
    let mut out = b.cmd();
    let evs: Vec<Value> = serde_json::from_slice(
        &out.args(["audit", "tail", "-n", "1000", "--format", "fhir"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(evs.len(), recs.as_array().unwrap().len());
    // Validity, by FHIR.js against the R4 StructureDefinitions and value
    // sets, unexpected properties counting as errors.
    for (i, r) in fhir_js(&evs).iter().enumerate() {
        assert_eq!(r["valid"], true, "AuditEvent {i} ({}): {r}", evs[i]);
        // No message at all, except where FHIR.js lacks the value set (it
        // ships no v3-PurposeOfUse): there it says so, then cannot find
        // the code.
        let msgs = r["messages"].as_array().unwrap();
        let unknown_vs: Vec<&Value> = msgs
            .iter()
            .filter(|m| {
                m["message"]
                    .as_str()
                    .unwrap()
                    .contains("could not be found")
            })
            .map(|m| &m["location"])
            .collect();
        for m in msgs {
            let excused = unknown_vs.contains(&&m["location"]);
            assert!(excused, "AuditEvent {i}: {m}");
        }
    }
    // The validator is not a rubber stamp.
    let mut broken = evs[0].clone();
    broken["outcome"] = Value::from("3");
    broken["agent"] = Value::Array(vec![]);
    assert_eq!(fhir_js(&[broken])[0]["valid"], false);
    // BALP shape of a search by a plugin.
    let search = evs
        .iter()
        .find(|e| e["subtype"][0]["code"] == "search-type")
        .expect("a search AuditEvent");
    assert_eq!(search["type"]["code"], "rest");
    assert_eq!(search["action"], "E");
    assert_eq!(search["entity"][0]["what"]["reference"], "Patient/p0002");
    assert_eq!(search["entity"][1]["role"]["code"], "24");
    assert!(search["entity"][1]["query"].as_str().is_some());
    // A denial is outcome 4, a rejected bundle a Security Alert.
    assert!(
        evs.iter()
            .any(|e| e["subtype"][0]["code"] == "search-type" && e["outcome"] == "4")
    );
    let rejected = evs
        .iter()
        .find(|e| e["type"]["code"] == "110113")
        .expect("a security alert");
    assert_eq!(rejected["outcome"], "4");
    assert!(evs.iter().any(|e| e["type"]["code"] == "110100"));
    // The call carries the requester and the purpose of use.
    let call = evs
        .iter()
        .find(|e| e["subtype"][0]["code"] == "operation" && e["outcome"] == "0")
        .expect("a call");
    assert_eq!(call["agent"][0]["requestor"], true);
    assert_eq!(call["purposeOfEvent"][0]["coding"][0]["code"], "TREAT");
}
