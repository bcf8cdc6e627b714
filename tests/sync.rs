//! Scope: upstream sync against a real HTTPS server on 127.0.0.1
//! (tests/common/upstream.rs, certificates from rcgen): audit upload
//! through every fault (500s, a failed entry inside a batch, a hang past
//! the timeout, a dropped connection, "committed but the response was
//! lost"), each followed by a check that upstream holds exactly the local
//! records; TLS refusals (untrusted, wrong host, expired, plain http);
//! pinning, bearer tokens and mTLS; sync down with an interrupted,
//! resumed page chain; and a 7-day outage on a fake clock through the
//! fail-closed disk budget and back.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::upstream::{CertKind, Fault, Upstream};
use common::*;
use serde_json::{Value, json};

fn config(b: &TestBox, up: &Upstream, extra: &str) {
    let text = format!(
        "[upstream]\nurl = \"{}\"\nca_file = \"{}\"\nbackoff_ms = 10\nbackoff_max_ms = 50\nio_timeout_ms = 1500\nconnect_timeout_ms = 1500\n{extra}\n",
        up.url,
        up.ca_pem.display()
    );
    std::fs::write(&b.config, text).unwrap();
}

fn local_ids(b: &TestBox) -> BTreeSet<String> {
    b.json(&["audit", "tail", "-n", "1000000"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Upstream holds exactly the local records: none missing, none extra, and
/// each record once (distinct ids, distinct chain positions).
fn assert_exactly_local(b: &TestBox, up: &Upstream, when: &str) {
    let local = local_ids(b);
    let seen = up.seen.lock().unwrap();
    let remote: BTreeSet<String> = seen.audit_events.keys().cloned().collect();
    assert_eq!(remote, local, "{when}: upstream differs from the local log");
    let seqs: BTreeSet<String> = seen
        .audit_events
        .values()
        .map(|e| {
            e["meta"]["extension"][0]["valueString"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        seqs.len(),
        local.len(),
        "{when}: a record is upstream twice"
    );
    let st = b.json(&["sync", "status"]);
    assert_eq!(st["backlog_records"], 0, "{when}: {st}");
}

fn make_records(b: &TestBox, calls: usize) {
    for _ in 0..calls {
        b.ok(&as_refs(&news2_call("p0002")));
    }
}

#[test]
fn every_upload_fault_ends_with_upstream_holding_exactly_the_local_records() {
    let b = news2_box(3, true);
    let up = Upstream::start(b.tmp.path(), CertKind::Good);
    config(&b, &up, "attempts = 1");
    make_records(&b, 2);
    let r = b.json(&["sync", "--once"]);
    assert!(r["upload"]["sent"].as_u64().unwrap() > 5, "{r}");
    assert_exactly_local(&b, &up, "first upload");
    assert!(
        !up.seen.lock().unwrap().checkpoints.is_empty(),
        "checkpoint travels"
    );

    for fault in [
        Fault::Status500,
        Fault::EntryFails(2),
        Fault::Hang(Duration::from_secs(3)),
        Fault::Reset,
        Fault::CommitThenDrop,
    ] {
        make_records(&b, 2);
        up.inject(std::slice::from_ref(&fault));
        let out = b.run(&["sync", "--once"]);
        assert_eq!(out.status.code(), Some(1), "{fault:?} must fail the pass");
        let st = b.json(&["sync", "status"]);
        assert!(
            st["backlog_records"].as_i64().unwrap() > 0,
            "{fault:?}: {st}"
        );
        assert!(st["last_error"].as_str().is_some(), "{fault:?}: {st}");
        // The next pass delivers everything, once.
        b.ok(&["sync", "--once"]);
        assert_exactly_local(&b, &up, &format!("after {fault:?}"));
    }
    // A lost response means upstream got those entries twice, as the same
    // AuditEvents: resent, not duplicated.
    assert!(up.seen.lock().unwrap().puts.values().any(|&n| n > 1));
    // Upstream's checkpoint anchors `audit verify`.
    let v = b.json(&["audit", "verify"]);
    assert!(v["anchors"].as_u64().unwrap() >= 1, "{v}");
}

#[test]
fn retries_within_a_pass_back_off_and_recover() {
    let b = news2_box(3, true);
    let up = Upstream::start(b.tmp.path(), CertKind::Good);
    config(&b, &up, "attempts = 4");
    make_records(&b, 1);
    up.inject(&[Fault::Status500, Fault::Reset, Fault::EntryFails(0)]);
    let r = b.json(&["sync", "--once"]);
    assert_eq!(r["upload"]["retries"], 3, "{r}");
    assert_exactly_local(&b, &up, "after three failed tries");
}

#[test]
fn tls_refuses_untrusted_wrong_host_expired_and_plain_http() {
    for (kind, want) in [
        (CertKind::Untrusted, "untrusted certificate"),
        (CertKind::WrongHost, "hostname mismatch"),
        (CertKind::Expired, "has expired"),
    ] {
        let b = TestBox::new();
        let up = Upstream::start(b.tmp.path(), kind);
        config(&b, &up, "attempts = 1");
        b.ok(&["plugin", "ungrant", "--tenant", "clinic-a", "acme/x"]);
        let out = b.run(&["sync", "--once"]);
        assert_eq!(out.status.code(), Some(1), "{kind:?}");
        assert!(stderr(&out).contains(want), "{kind:?}: {}", stderr(&out));
        assert!(up.ids().is_empty(), "{kind:?}: nothing may be sent");
        let st = b.json(&["sync", "status"]);
        assert!(st["last_error"].as_str().unwrap().contains(want), "{st}");
    }
    // http:// is a config error unless explicitly allowed.
    let b = TestBox::new();
    std::fs::write(&b.config, "[upstream]\nurl = \"http://127.0.0.1:9/fhir\"\n").unwrap();
    let out = b.run(&["sync", "status"]);
    assert_eq!(out.status.code(), Some(5));
    assert!(
        stderr(&out).contains("field `upstream.url`"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("allow_plain_http"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_pinned_certificate_a_bearer_token_and_mtls_work() {
    // Pinning: trust exactly the server's own self-signed certificate (no
    // CA would vouch for it).
    let b = TestBox::new();
    let up = Upstream::start(b.tmp.path(), CertKind::Untrusted);
    let token = b.file("token", b"s3cr3t-token\n");
    std::fs::write(
        &b.config,
        format!(
            "[upstream]\nurl = \"{}\"\npinned_cert = \"{}\"\ntoken_file = \"{}\"\n",
            up.url,
            up.cert_pem.display(),
            token.display()
        ),
    )
    .unwrap();
    b.ok(&["plugin", "ungrant", "--tenant", "clinic-a", "acme/x"]);
    b.ok(&["sync", "--once"]);
    assert_exactly_local(&b, &up, "pinned");
    assert!(
        up.seen
            .lock()
            .unwrap()
            .auth
            .iter()
            .all(|a| a == "Bearer s3cr3t-token")
    );

    // mTLS: refused without a client certificate, accepted with one.
    let b = TestBox::new();
    let up = Upstream::start_with(b.tmp.path(), CertKind::Good, true);
    config(&b, &up, "attempts = 1");
    b.ok(&["plugin", "ungrant", "--tenant", "clinic-a", "acme/x"]);
    assert_eq!(b.run(&["sync", "--once"]).status.code(), Some(1));
    assert!(up.ids().is_empty());
    let d = b.tmp.path();
    config(
        &b,
        &up,
        &format!(
            "attempts = 1\nclient_cert = \"{}\"\nclient_key = \"{}\"",
            d.join("client-cert.pem").display(),
            d.join("client-key.pem").display()
        ),
    );
    b.ok(&["sync", "--once"]);
    assert_exactly_local(&b, &up, "mTLS");
}

fn obs(id: &str, when: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final",
           "meta": {"lastUpdated": when},
           "code": {"text": "heart rate"}, "subject": {"reference": "Patient/p1"},
           "effectiveDateTime": when, "valueQuantity": {"value": 70, "unit": "/min"}})
}

fn cached_ids(b: &TestBox) -> BTreeSet<String> {
    let bundle = b.search("clinic-a", "p1", "Observation?_count=100");
    bundle["entry"]
        .as_array()
        .map(|e| {
            e.iter()
                .map(|x| x["resource"]["id"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn sync_down_follows_pages_and_resumes_after_an_interruption() {
    let b = TestBox::new();
    let up = Upstream::start(b.tmp.path(), CertKind::Good);
    let first: Vec<Value> = (1..=5)
        .map(|i| obs(&format!("o{i}"), &format!("2026-11-20T0{i}:00:00Z")))
        .collect();
    up.resources
        .lock()
        .unwrap()
        .insert("Observation".into(), first);
    config(
        &b,
        &up,
        "attempts = 1\npull_tenant = \"clinic-a\"\npull_types = [\"Observation\"]",
    );
    // Three pages of two; page 1 arrives, page 2 fails.
    up.inject(&[Fault::Pass, Fault::Status500]);
    let out = b.run(&["sync", "--once"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(cached_ids(&b), ["o1", "o2"].map(String::from).into());
    let next: Option<String> = rusqlite::Connection::open(b.data.join("state.db"))
        .unwrap()
        .query_row("SELECT next_url FROM pull_cursors", [], |r| r.get(0))
        .unwrap();
    assert!(
        next.as_deref().unwrap_or("").contains("_offset=2"),
        "{next:?}"
    );
    // The next pass resumes at page 2, not at the start.
    up.seen.lock().unwrap().gets.clear();
    b.ok(&["sync", "--once"]);
    let gets = up.seen.lock().unwrap().gets.clone();
    assert!(gets[0].contains("_offset=2"), "resumed: {gets:?}");
    assert_eq!(gets.len(), 2, "pages 2 and 3 only: {gets:?}");
    assert_eq!(
        cached_ids(&b),
        ["o1", "o2", "o3", "o4", "o5"].map(String::from).into()
    );
    // Later: only what changed upstream since the cursor is fetched.
    up.resources
        .lock()
        .unwrap()
        .get_mut("Observation")
        .unwrap()
        .extend([
            obs("n1", "2026-11-21T01:00:00Z"),
            obs("o1", "2026-11-21T02:00:00Z"), // a new version of o1
        ]);
    up.seen.lock().unwrap().gets.clear();
    let r = b.json(&["sync", "--once"]);
    let gets = up.seen.lock().unwrap().gets.clone();
    assert_eq!(gets.len(), 1, "{gets:?}");
    assert!(
        gets[0].contains("_lastUpdated=gt2026%2D11%2D20T05%3A00%3A00Z"),
        "{gets:?}"
    );
    assert_eq!(r["pull"][0]["changed"], 2, "{r}");
    assert_eq!(cached_ids(&b).len(), 6);
}

#[test]
fn a_week_offline_fails_closed_within_the_budget_and_recovers_everything() {
    let b = news2_box(3, true);
    let up = Upstream::start(b.tmp.path(), CertKind::Good);
    // A small budget, and an upstream that is down (every request reset).
    config(&b, &up, "attempts = 1\naudit_budget_kib = 12");
    b.ok(&["sync", "--once"]);
    up.inject(&vec![Fault::Reset; 1000]);
    let start = time::macros::datetime!(2026-12-01 08:00 UTC);
    let mut ok = 0;
    let mut refused = 0;
    // Seven days, a call every six hours, a sync attempt every day.
    for step in 0..28 {
        let now = start + time::Duration::hours(6 * step);
        let now = now
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let env = [("CLINICBOX_FAKE_NOW", now.as_str())];
        let out = b.run_env(&as_refs(&news2_call("p0002")), &env);
        match out.status.code() {
            Some(0) => {
                assert_eq!(refused, 0, "a call succeeded after fail-closed began");
                ok += 1;
            }
            Some(3) => {
                assert!(stderr(&out).contains("fail-closed"), "{}", stderr(&out));
                refused += 1;
            }
            other => panic!("step {step}: {other:?}: {}", stderr(&out)),
        }
        if step % 4 == 3 {
            assert_eq!(b.run_env(&["sync", "--once"], &env).status.code(), Some(1));
        }
    }
    assert!(
        ok > 0 && refused > 0,
        "{ok} calls served, {refused} refused"
    );
    let st = b.json(&["sync", "status"]);
    assert_eq!(st["fail_closed"], true, "{st}");
    // Every refusal is on record, in the chain.
    let recs = b.json(&["audit", "tail", "-n", "100000"]);
    let refusals = recs
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["kind"] == "plugin.call" && r["body"].as_str().unwrap().contains("fail-closed")
        })
        .count();
    assert_eq!(refusals, refused);
    b.ok(&["audit", "verify"]);
    // A read on the command line is refused too, and recorded.
    let out = b.run(&["fhir", "read", "--tenant", "clinic-a", "Patient/p0002"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("fail-closed"));
    // Upstream is back: everything is delivered, and calls work again.
    up.faults.lock().unwrap().clear();
    b.ok(&["sync", "--once"]);
    assert_exactly_local(&b, &up, "after the outage");
    b.ok(&as_refs(&news2_call("p0002")));
    assert_eq!(b.json(&["sync", "status"])["fail_closed"], false);
}

#[test]
fn the_periodic_sync_delivers_new_records_until_stopped() {
    let b = news2_box(3, true);
    let up = Upstream::start(b.tmp.path(), CertKind::Good);
    config(&b, &up, "attempts = 2\ninterval_secs = 1");
    let mut child = b
        .cmd()
        .args(["sync"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let wait_for = |n: usize| {
        for _ in 0..100 {
            if up.ids().len() >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    };
    let before = local_ids(&b).len();
    assert!(wait_for(before), "the first pass did not deliver");
    // Upstream goes away for a moment; new records still arrive later.
    up.inject(&[Fault::Status500, Fault::Reset]);
    assert!(b.call_news2("p0002").status.success());
    let now = local_ids(&b).len();
    assert!(
        wait_for(now),
        "records made while the sync runs were not delivered"
    );
    assert_eq!(
        child.try_wait().unwrap(),
        None,
        "the periodic sync stopped by itself"
    );
    child.kill().unwrap();
    let _ = child.wait();
    let local = local_ids(&b);
    let remote: BTreeSet<String> = up.ids().into_iter().collect();
    assert!(
        remote.is_subset(&local),
        "upstream has records the box does not"
    );
}
