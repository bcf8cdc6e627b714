//! Scope: crash safety of the audit log and its upload. 200 times, a
//! `clinicbox call` (which appends a call and its host accesses) and a
//! `clinicbox sync --once` run side by side and are killed with SIGKILL at
//! a random moment. Afterwards: every call that had answered is on record,
//! the chain verifies, and after one more sync the upstream holds exactly
//! the local records, none twice.

mod common;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use common::upstream::{CertKind, Upstream};
use common::*;
use serde_json::Value;

#[test]
fn kill_9_at_random_points_loses_no_acknowledged_record_and_duplicates_nothing() {
    let b = news2_box(3, true);
    let up = Upstream::start(b.tmp.path(), CertKind::Good);
    std::fs::write(
        &b.config,
        format!(
            "[upstream]\nurl = \"{}\"\nca_file = \"{}\"\nattempts = 1\nio_timeout_ms = 2000\n",
            up.url,
            up.ca_pem.display()
        ),
    )
    .unwrap();
    let mut answered = BTreeSet::new();
    let mut killed = 0;
    let rounds = 200;
    for round in 0..rounds {
        let mut call = b.cmd();
        call.arg("--json")
            .args(news2_call("p0002"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut sync = b.cmd();
        sync.args(["sync", "--once"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut c = call.spawn().unwrap();
        let mut s = sync.spawn().unwrap();
        std::thread::sleep(Duration::from_micros(fastrand::u64(0..30_000)));
        for child in [&mut c, &mut s] {
            if child.try_wait().unwrap().is_none() {
                killed += 1;
            }
            let _ = child.kill(); // SIGKILL
        }
        let out = c.wait_with_output().unwrap();
        let _ = s.wait();
        if out.status.success() {
            let v: Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("round {round}: answered without JSON: {e}"));
            answered.insert(v["call_id"].as_str().unwrap().to_owned());
        }
    }
    assert!(
        killed >= rounds / 4,
        "only {killed} processes were killed mid-way"
    );
    assert!(!answered.is_empty(), "no call ever finished");
    // Every answered call is on record, and the chain is whole.
    b.ok(&["audit", "verify"]);
    let recs = b.json(&["audit", "tail", "-n", "1000000"]);
    let recorded: BTreeSet<String> = recs
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "plugin.call")
        .map(|r| {
            let body: Value = serde_json::from_str(r["body"].as_str().unwrap()).unwrap();
            body["call_id"].as_str().unwrap().to_owned()
        })
        .collect();
    let lost: Vec<_> = answered.difference(&recorded).collect();
    assert!(
        lost.is_empty(),
        "answered calls missing from the log: {lost:?}"
    );
    // One clean sync: upstream has exactly the local records, each once.
    b.ok(&["sync", "--once"]);
    let local: BTreeSet<String> = b
        .json(&["audit", "tail", "-n", "1000000"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    let seen = up.seen.lock().unwrap();
    let remote: BTreeSet<String> = seen.audit_events.keys().cloned().collect();
    assert_eq!(remote, local);
    let positions: BTreeSet<&str> = seen
        .audit_events
        .values()
        .map(|e| e["meta"]["extension"][0]["valueString"].as_str().unwrap())
        .collect();
    assert_eq!(positions.len(), local.len(), "a record went upstream twice");
    eprintln!(
        "{rounds} rounds, {killed} processes killed mid-way, {} calls answered, {} records, {} PUTs",
        answered.len(),
        local.len(),
        seen.puts.values().sum::<u32>()
    );
}
