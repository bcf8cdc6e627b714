//! End-to-end tests of `clinicbox run` through the real binary: the local
//! API with and without valid tokens, vitals ingest to NEWS2, the inbox,
//! SIGTERM under load, SIGHUP, malformed HTTP and systemd notifications.

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use clinicbox::fhir::synth::round::{Reading, bundle as vitals};
use common::daemon::{Daemon, TEST_CONFIG, records, token};
use common::{NEWS2_VITALS, news2_box};
use serde_json::{Value, json};

const INVOKE: &str = "/plugins/acme/news2/news2_latest";

/// A resend's answer: 201, the one reading `reference` unchanged, nothing
/// stored, and scored again (the device may have timed out waiting).
fn assert_scored_resend(a: &common::daemon::Answer, reference: &Value) {
    assert_eq!(a.status, 201, "{}", a.text());
    let v = a.json();
    assert_eq!(v["unchanged"], json!([reference]), "{v}");
    assert_eq!(v["stored"], json!([]), "{v}");
    assert_eq!(
        v["triggered"][0]["output"]["resourceType"], "RiskAssessment",
        "the resend gets its score: {v}"
    );
}

fn invoke_body(patient: &str) -> Vec<u8> {
    json!({"patient": patient, "purpose": "TREAT"})
        .to_string()
        .into_bytes()
}

#[test]
fn api_answers_by_token_role_and_tenant_and_records_refusals() {
    let b = news2_box(3, true);
    let app = token(&b, "frontdesk", "app", "clinic-a", &[NEWS2_VITALS]);
    let device = token(&b, "monitor-1", "device", "clinic-a", &[]);
    let admin = token(&b, "it", "admin", "clinic-a", &[]);
    let other = token(&b, "other-clinic", "app", "clinic-b", &[NEWS2_VITALS]);
    let revoked = token(&b, "old", "app", "clinic-a", &[NEWS2_VITALS]);
    b.ok(&["token", "revoke", "old"]);
    let list = b.json(&["token", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 5);
    assert!(
        !list.to_string().contains(&app),
        "token list shows a secret"
    );
    let d = Daemon::start(&b, TEST_CONFIG, &[]);

    assert_eq!(d.get("/healthz", None, &[]).status, 200);
    assert_eq!(d.get("/readyz", None, &[]).json()["status"], "ready");

    // 401: none, garbage, revoked.
    for t in [None, Some("cbx_00000000_nope"), Some(revoked.as_str())] {
        let a = d.post(INVOKE, t, &invoke_body("p0002"));
        assert_eq!(a.status, 401, "{t:?}: {}", a.text());
        assert_eq!(
            a.header("www-authenticate"),
            Some("Bearer realm=\"clinicbox\"")
        );
        assert_eq!(a.json()["resourceType"], "OperationOutcome");
    }
    // 403: wrong role, wrong tenant.
    let a = d.get("/status", Some(&device), &[]);
    assert_eq!(a.status, 403);
    assert!(
        a.text().contains("has role device; status needs admin"),
        "{}",
        a.text()
    );
    let a = d.post(INVOKE, Some(&device), &invoke_body("p0002"));
    assert_eq!(a.status, 403);
    let a = d.get(
        "/fhir/Observation?patient=p0001",
        Some(&app),
        &[("X-Tenant", "clinic-b")],
    );
    assert_eq!(a.status, 403);
    assert!(
        a.text()
            .contains("acts for tenant clinic-a, not for clinic-b"),
        "{}",
        a.text()
    );

    // A valid call: the RiskAssessment and the id of its audit record.
    let a = d.post(INVOKE, Some(&app), &invoke_body("p0002"));
    assert_eq!(a.status, 200, "{}", a.text());
    let v = a.json();
    assert_eq!(v["output"]["resourceType"], "RiskAssessment");
    assert_eq!(v["output"]["subject"]["reference"], "Patient/p0002");
    let call_id = v["call_id"].as_str().unwrap().to_owned();
    assert_eq!(a.header("x-audit-id"), Some(call_id.as_str()));
    // The other clinic's token reaches only its own (empty) tenant, where
    // NEWS2 is not granted: the plugin runs, its search is denied, it fails.
    // However often: the plugin's own error is not misbehaviour, so one
    // clinic cannot quarantine NEWS2 for the other.
    for _ in 0..6 {
        let a = d.post(INVOKE, Some(&other), &invoke_body("p0002"));
        assert_eq!(a.status, 422, "{}", a.text());
        assert!(a.text().contains("fhir_search"), "{}", a.text());
    }
    let a = d.post(INVOKE, Some(&app), &invoke_body("p0002"));
    assert_eq!(a.status, 200, "still serving clinic-a: {}", a.text());

    // FHIR search and read within the token's scopes and tenant.
    let a = d.get(
        "/fhir/Observation?patient=p0001&category=vital-signs&_count=2",
        Some(&app),
        &[],
    );
    assert_eq!(a.status, 200, "{}", a.text());
    let bundle = a.json();
    assert_eq!(bundle["type"], "searchset");
    assert!(bundle["total"].as_u64().unwrap() > 2);
    let first = bundle["entry"][0]["fullUrl"].as_str().unwrap().to_owned();
    let a = d.get(&format!("/fhir/{first}"), Some(&app), &[]);
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["resourceType"], "Observation");
    let a = d.get("/fhir/Patient?_count=1", Some(&app), &[]);
    assert_eq!(
        a.status,
        403,
        "Patient is not in the token's scopes: {}",
        a.text()
    );
    let a = d.get("/fhir/Observation?patient=p0001", Some(&other), &[]);
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["total"], 0, "clinic-b sees nothing of clinic-a");

    // Admin endpoints.
    let s = d.get("/status", Some(&admin), &[]).json();
    assert_eq!(s["ready"], true);
    assert_eq!(s["plugins"][0]["name"], "acme/news2");
    // The data disk, read now: the real file system and database files.
    let disk = &s["disk"];
    let (avail, size) = (
        disk["available_bytes"].as_u64().unwrap_or(0),
        disk["size_bytes"].as_u64().unwrap_or(0),
    );
    assert!(avail > 0 && avail <= size, "{disk}");
    assert_eq!(disk["warn_under_percent"], 10, "{disk}");
    assert!(disk["fhir_db_bytes"].as_u64().unwrap_or(0) > 0, "{disk}");
    assert!(disk["audit_db_bytes"].as_u64().unwrap_or(0) > 0, "{disk}");
    let m = d.get("/metrics", Some(&admin), &[]).text();
    for gauge in [
        "clinicbox_data_disk_available_bytes ",
        "clinicbox_data_disk_size_bytes ",
        "clinicbox_fhir_db_bytes ",
        "clinicbox_audit_db_bytes ",
    ] {
        let v = m
            .lines()
            .find_map(|l| l.strip_prefix(gauge))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(v > 0.0, "{gauge}: {m}");
    }
    assert!(
        m.contains("clinicbox_plugin_calls_total{plugin=\"acme/news2\",outcome=\"ok\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("clinicbox_http_requests_total{route=\"invoke\",status=\"401\"} 3"),
        "{m}"
    );
    assert!(m.contains("clinicbox_audit_backlog_records "), "{m}");
    // The one NEWS2 call left its patient's instance idle, and warm.
    let idle = m
        .lines()
        .find_map(|l| l.strip_prefix("clinicbox_idle_instance_bytes "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(idle > 0.0, "{m}");

    // A token revoked from the CLI (another process) while the daemon runs
    // is refused from the very next request, on whichever API workers the
    // 20 requests after it reach (each keeps a memo of state.db that this
    // must empty; runtime::conns's tests cover one worker's logic).
    for _ in 0..20 {
        assert_eq!(d.get("/status", Some(&admin), &[]).status, 200);
    }
    b.ok(&["token", "revoke", "it"]);
    for _ in 0..20 {
        assert_eq!(d.get("/status", Some(&admin), &[]).status, 401);
    }

    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    // Every refusal is in the audit log, with the token when there was one.
    let denied = records(&b, "api.denied");
    assert_eq!(denied.iter().filter(|r| r["status"] == 401).count(), 3 + 20);
    assert_eq!(denied.iter().filter(|r| r["status"] == 403).count(), 3);
    assert!(denied.iter().any(|r| r["token_name"] == "monitor-1"));
    // The call is recorded with the token as requester.
    let calls = records(&b, "plugin.call");
    let call = calls
        .iter()
        .find(|c| c["call_id"] == call_id.as_str())
        .expect("call record");
    assert_eq!(call["requester"], "api:app:frontdesk");
    assert_eq!(records(&b, "fhir.access").len(), 4);
    b.ok(&["audit", "verify"]);
}

#[test]
fn vitals_ingest_stores_triggers_news2_and_refuses_bad_fhir_whole() {
    let b = news2_box(3, true);
    let device = token(&b, "monitor-7", "device", "clinic-a", &[]);
    let admin = token(&b, "ops", "admin", "clinic-a", &[]);
    let d = Daemon::start(&b, TEST_CONFIG, &[]);
    let reading = Reading {
        rr: 24.0,
        spo2: 93.0,
        hr: 118.0,
        ..Reading::NORMAL
    };
    let doc = vitals("p0001", "2030-01-01T00:00:00Z", &reading);
    let a = d.post("/fhir/Bundle", Some(&device), doc.to_string().as_bytes());
    assert_eq!(a.status, 201, "{}", a.text());
    let v = a.json();
    let stored: BTreeSet<String> = v["stored"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(stored.len(), 6);
    let t = &v["triggered"][0];
    assert_eq!(t["plugin"], "acme/news2", "{v}");
    assert_eq!(t["function"], "news2_latest");
    let ra = &t["output"];
    assert_eq!(ra["resourceType"], "RiskAssessment", "{v}");
    assert_eq!(ra["subject"]["reference"], "Patient/p0001");
    // 2 (RR 24) + 2 (SpO2 93) + 2 (pulse 118) = 6, from the new readings.
    assert_eq!(ra["extension"][0]["valueInteger"], 6, "{ra}");
    for basis in ra["basis"].as_array().unwrap() {
        assert!(
            stored.contains(basis["reference"].as_str().unwrap()),
            "{basis}"
        );
    }

    // One Observation alone also triggers; resent unchanged, it is not
    // stored again but is scored again (the device may have timed out
    // waiting for its score).
    let mut one = doc["entry"][0]["resource"].clone();
    one["id"] = json!("rr-fixed-1");
    let a = d.post(
        "/fhir/Observation",
        Some(&device),
        one.to_string().as_bytes(),
    );
    assert_eq!(a.status, 201, "{}", a.text());
    assert_eq!(a.json()["stored"][0], "Observation/rr-fixed-1");
    let a = d.post(
        "/fhir/Observation",
        Some(&device),
        one.to_string().as_bytes(),
    );
    assert_scored_resend(&a, &json!("Observation/rr-fixed-1"));
    // Without an id, the Bundle's first reading again is a resend (see
    // below); a later reading is new and triggers.
    one.as_object_mut().unwrap().remove("id");
    let a = d.post(
        "/fhir/Observation",
        Some(&device),
        one.to_string().as_bytes(),
    );
    let again = a.json()["unchanged"].clone();
    assert_eq!(again.as_array().map(Vec::len), Some(1), "{}", a.text());
    assert!(
        stored.contains(again[0].as_str().unwrap()),
        "the Bundle's own id: {again}"
    );
    one["effectiveDateTime"] = json!("2030-01-01T00:00:05Z");
    let a = d.post(
        "/fhir/Observation",
        Some(&device),
        one.to_string().as_bytes(),
    );
    assert_eq!(a.status, 201, "{}", a.text());
    assert_eq!(
        a.json()["triggered"][0]["output"]["resourceType"],
        "RiskAssessment"
    );
    // Without an id, a resend (a device retrying after a timeout or a 503)
    // is the same reading: same id, unchanged, not stored twice.
    let id_less = a.json()["stored"][0].clone();
    let stats = b.json(&["fhir", "stats"]);
    let a = d.post(
        "/fhir/Observation",
        Some(&device),
        one.to_string().as_bytes(),
    );
    assert_scored_resend(&a, &id_less);
    assert_eq!(b.json(&["fhir", "stats"]), stats, "a resend was stored");

    // Bad input: clear errors naming the entry and field; nothing stored.
    let before = b.json(&["fhir", "stats"]);
    let mut bad = doc.clone();
    bad["entry"][3]["resource"]["subject"] = json!({"reference": "Group/ward3"});
    for (body, status, says) in [
        (b"{not json".to_vec(), 400, "not JSON"),
        (
            bad.to_string().into_bytes(),
            422,
            "Bundle.entry[3].resource.subject.reference",
        ),
        (
            json!({"resourceType": "Patient"}).to_string().into_bytes(),
            422,
            "resourceType: expected Bundle",
        ),
    ] {
        let a = d.post("/fhir/Bundle", Some(&device), &body);
        assert_eq!(a.status, status, "{}", a.text());
        assert!(a.text().contains(says), "{}", a.text());
    }
    let mut no_status = one.clone();
    no_status.as_object_mut().unwrap().remove("status");
    let a = d.post(
        "/fhir/Observation",
        Some(&device),
        no_status.to_string().as_bytes(),
    );
    assert_eq!(a.status, 422);
    assert!(
        a.text().contains("Observation.status: required"),
        "{}",
        a.text()
    );
    assert_eq!(
        b.json(&["fhir", "stats"]),
        before,
        "a refused request stored something"
    );

    // Every ingest request is timed, and each stage of the six that got
    // as far as storing: /metrics tells clinic IT where the time went.
    let m = d.get("/metrics", Some(&admin), &[]).text();
    let count = |series: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    assert_eq!(
        count("clinicbox_http_request_seconds_count{route=\"ingest\"}"),
        Some(10),
        "{m}"
    );
    assert_eq!(
        count("clinicbox_ingest_stage_seconds_count{stage=\"queue\"}"),
        Some(10),
        "{m}"
    );
    for stage in ["store", "plugins", "durable", "record"] {
        assert_eq!(
            count(&format!(
                "clinicbox_ingest_stage_seconds_count{{stage=\"{stage}\"}}"
            )),
            Some(6),
            "{stage}: {m}"
        );
    }
    // The plugins stage held the six NEWS2 calls, each with its durable
    // record; the stages are disjoint slices of their requests.
    let secs = |series: &str| {
        m.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    assert_eq!(
        count("clinicbox_plugin_call_seconds_count{plugin=\"acme/news2\"}"),
        Some(6),
        "{m}"
    );
    let news2 = secs("clinicbox_plugin_call_seconds_sum{plugin=\"acme/news2\"}");
    let stage = |s: &str| {
        secs(&format!(
            "clinicbox_ingest_stage_seconds_sum{{stage=\"{s}\"}}"
        ))
    };
    assert!(stage("plugins") >= news2 && news2 > 0.0, "{m}");
    let stages: f64 = ["queue", "store", "plugins", "durable", "record"]
        .iter()
        .map(|s| stage(s))
        .sum();
    assert!(
        stages <= secs("clinicbox_http_request_seconds_sum{route=\"ingest\"}"),
        "{m}"
    );

    // The three threads every device request passes through in turn run
    // ten nice levels ahead of the rest (`[daemon]
    // pipeline_priority_boost`), where the system allows it.
    let nice = nice_by_thread(d.child.id());
    let base = nice["worker-0"];
    // What this system allows a thread of this process (the daemon has
    // the same credentials and limits): asked of a thread here.
    clinicbox::priority::set_pipeline_boost(10);
    let probe = std::thread::spawn(|| clinicbox::priority::pipeline_thread("probe"))
        .join()
        .unwrap();
    clinicbox::priority::set_pipeline_boost(0);
    let boosted = match probe {
        clinicbox::priority::Applied::Nice(n) => n,
        _ => base,
    };
    for thread in ["api", "fhir-writer", "audit-writer"] {
        assert_eq!(nice[thread], boosted, "{thread}: {nice:?}");
    }
    assert_eq!(nice["fhir.db-ckpt"], base, "{nice:?}");

    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let ingests = records(&b, "fhir.ingest");
    assert_eq!(ingests.len(), 6);
    assert_eq!(ingests[0]["token"].as_str().unwrap().len(), 12);
    b.ok(&["audit", "verify"]);
}

/// The audit log refusing every append (a broken audit disk, by the
/// `error:audit.append` fail-point): device ingest answers 503 with
/// Retry-After and withholds the plugin's output, the reading is stored
/// once, and the device's retry, once the log works again, is answered
/// with its score and recorded. Nothing is lost, nothing stored twice.
#[test]
fn an_ingest_the_audit_log_cannot_record_is_refused_and_its_retry_recorded() {
    let b = news2_box(3, true);
    let device = token(&b, "monitor-9", "device", "clinic-a", &[]);
    let reading = Reading {
        rr: 24.0,
        ..Reading::NORMAL
    };
    let doc = vitals("p0001", "2030-02-01T00:00:00Z", &reading);
    let mut one = doc["entry"][0]["resource"].clone();
    one["id"] = json!("rr-audit-down");
    let before = b.json(&["fhir", "stats"]);

    let d = Daemon::start(
        &b,
        TEST_CONFIG,
        &[("CLINICBOX_FAILPOINT", "error:audit.append")],
    );
    let a = d.post(
        "/fhir/Observation",
        Some(&device),
        one.to_string().as_bytes(),
    );
    assert_eq!(a.status, 503, "{}", a.text());
    assert_eq!(a.header("retry-after"), Some("30"), "{:?}", a.headers);
    assert!(a.text().contains("could not be recorded"), "{}", a.text());
    assert_eq!(d.get("/healthz", None, &[]).status, 200);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    // NEWS2 ran, and its output was withheld; the writer survived the
    // start record's failure to fail the ingest's record too.
    assert!(
        log.contains("cannot record the call, output withheld"),
        "{log}"
    );
    assert!(
        log.contains("api: cannot record an ingest: cannot append to the audit log"),
        "{log}"
    );
    let observations = |stats: &Value| stats["tenants"]["clinic-a"]["Observation"][0].clone();
    let stored = b.json(&["fhir", "stats"]);
    assert_eq!(
        observations(&stored),
        json!(observations(&before).as_u64().unwrap() + 1),
        "the reading was stored before the refusal: {stored}"
    );

    // The log works again; the device retries the same reading.
    let d = Daemon::start(&b, TEST_CONFIG, &[]);
    let a = d.post(
        "/fhir/Observation",
        Some(&device),
        one.to_string().as_bytes(),
    );
    assert_scored_resend(&a, &json!("Observation/rr-audit-down"));
    let call_id = a.json()["triggered"][0]["call_id"].clone();
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert_eq!(
        observations(&b.json(&["fhir", "stats"])),
        observations(&stored),
        "stored twice"
    );
    let ingests: Vec<Value> = records(&b, "fhir.ingest")
        .into_iter()
        .filter(|r| r["unchanged"] == json!(["Observation/rr-audit-down"]))
        .collect();
    assert_eq!(ingests.len(), 1, "{ingests:?}");
    assert_eq!(ingests[0]["patients"], json!(["p0001"]), "{:?}", ingests[0]);
    assert_eq!(ingests[0]["resources"], json!([]), "{:?}", ingests[0]);
    let calls = records(&b, "plugin.call");
    let call = calls.iter().find(|c| c["call_id"] == call_id);
    assert!(
        call.is_some_and(|c| c["patient"] == "p0001" && c["outcome"] == "ok"),
        "{call_id} in {calls:?}"
    );
    let out = b.run(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn inbox_installs_dropped_bundles_and_moves_refused_ones_aside() {
    let b = common::TestBox::new();
    b.trust_dev_vendor();
    b.synth_and_import(3, 120, &["clinic-a"]);
    let app = token(&b, "app", "app", "clinic-a", &[]);
    let admin = token(&b, "it", "admin", "clinic-a", &[]);
    let d = Daemon::start(&b, TEST_CONFIG, &[]);
    assert_eq!(
        d.post(INVOKE, Some(&app), &invoke_body("p0001")).status,
        404
    );

    let inbox = b.data.join("inbox");
    let good = std::fs::read(common::example_bundle()).unwrap();
    let mut tampered = good.clone();
    let n = tampered.len();
    tampered[n - 100] ^= 1;
    std::fs::write(inbox.join("tampered.cbx"), &tampered).unwrap();
    std::fs::write(inbox.join("notes.txt"), b"hello").unwrap();
    std::fs::write(inbox.join("acme-news2.cbx"), &good).unwrap();

    d.wait_for("the dropped bundle to be served", || {
        d.get("/status", Some(&admin), &[]).json()["plugins"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["name"] == "acme/news2"))
    });
    d.wait_for("the rejects to be moved aside", || {
        inbox.join("rejected/tampered.cbx").exists() && inbox.join("rejected/notes.txt").exists()
    });
    assert!(inbox.join("accepted/acme-news2.cbx").exists());
    let reason = std::fs::read_to_string(inbox.join("rejected/tampered.cbx.reason.txt")).unwrap();
    assert!(reason.contains("step"), "{reason}");
    let left: Vec<_> = std::fs::read_dir(&inbox)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .collect();
    assert!(left.is_empty(), "files left in the inbox: {left:?}");

    // Served without a restart: grant, then call over HTTP.
    b.grant_news2();
    let a = d.post(INVOKE, Some(&app), &invoke_body("p0002"));
    assert_eq!(a.status, 200, "{}", a.text());
    // A rejected file is not retried: its decision is recorded once.
    std::thread::sleep(Duration::from_millis(500));
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let decisions = records(&b, "bundle.decision");
    let rejected: Vec<_> = decisions
        .iter()
        .filter(|r| r["outcome"] == "rejected")
        .collect();
    assert_eq!(rejected.len(), 1, "{decisions:?}");
    assert!(
        decisions.iter().any(|r| r["outcome"] == "accepted"),
        "{decisions:?}"
    );
}

#[test]
fn sigterm_under_load_answers_or_refuses_every_call_and_records_each_answered_one() {
    let b = news2_box(3, true);
    let app = token(&b, "load", "app", "clinic-a", &[NEWS2_VITALS]);
    let d = Daemon::start(&b, TEST_CONFIG, &[]);
    let answered = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(u16, Option<String>)>::new()));
    let mut clients = Vec::new();
    for i in 0..6 {
        let (base, app, answered) = (d.base.clone(), app.clone(), answered.clone());
        clients.push(std::thread::spawn(move || {
            let agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(30)))
                .build()
                .new_agent();
            let _ = i;
            let patient = "p0002";
            loop {
                let r = agent
                    .post(format!("{base}{INVOKE}"))
                    .header("Authorization", format!("Bearer {app}"))
                    .send(invoke_body(patient));
                let Ok(mut r) = r else { break }; // the listener is gone
                let status = r.status().as_u16();
                let body: Value = r
                    .body_mut()
                    .read_to_vec()
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or(Value::Null);
                answered
                    .lock()
                    .unwrap()
                    .push((status, body["call_id"].as_str().map(str::to_owned)));
                if status != 200 {
                    break;
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(1500));
    let (status, log) = d.stop();
    for c in clients {
        c.join().unwrap();
    }
    assert!(status.success(), "exit {status:?}: {log}");
    assert!(log.contains("stopped cleanly"), "{log}");
    let answered = answered.lock().unwrap().clone();
    let ok: BTreeSet<String> = answered
        .iter()
        .filter(|(s, _)| *s == 200)
        .filter_map(|(_, id)| id.clone())
        .collect();
    assert!(
        ok.len() > 20,
        "too little load to mean anything: {}",
        ok.len()
    );
    assert!(
        answered.iter().all(|(s, _)| *s == 200 || *s == 503),
        "{:?}",
        answered
            .iter()
            .filter(|(s, _)| *s != 200)
            .collect::<Vec<_>>()
    );
    // Exactly the answered calls are recorded: none lost, none recorded
    // without its answer, each whole (the chain verifies).
    let recorded: BTreeSet<String> = records(&b, "plugin.call")
        .iter()
        .filter(|r| r["requester"] == "api:app:load")
        .map(|r| r["call_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(recorded, ok);
    b.ok(&["audit", "verify"]);
    let stops = records(&b, "daemon");
    assert_eq!(stops.last().unwrap()["action"], "stop");
    assert_eq!(stops.last().unwrap()["unfinished_requests"], 0);
}

#[test]
fn sighup_reloads_the_config_and_a_bad_one_changes_nothing() {
    let b = news2_box(1, false);
    let admin = token(&b, "it", "admin", "clinic-a", &[]);
    let d = Daemon::start(&b, TEST_CONFIG, &[]);
    assert_eq!(
        d.get("/status", Some(&admin), &[]).json()["updates"],
        Value::Null
    );

    // [updates] applies at once; the two start-only changes are named.
    std::fs::write(
        &b.config,
        format!(
            "{}pipeline_priority_boost = 4\n[limits]\napi_workers = 3\n\
             [updates]\nurl = \"https://updates.example/acme\"\n",
            TEST_CONFIG
        ),
    )
    .unwrap();
    d.signal("HUP");
    d.wait_for("the reloaded config", || {
        d.get("/status", Some(&admin), &[]).json()["updates"] == "https://updates.example/acme"
    });
    std::fs::write(&b.config, "colour = \"blue\"\n").unwrap();
    d.signal("HUP");
    d.wait_for("the refused reload to be recorded", || {
        records(&b, "daemon")
            .iter()
            .any(|r| r["outcome"] == "refused")
    });
    assert_eq!(d.get("/readyz", None, &[]).status, 200);
    assert_eq!(
        d.get("/status", Some(&admin), &[]).json()["updates"],
        "https://updates.example/acme"
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(log.contains("unknown field `colour`"), "{log}");
    let reloads: Vec<_> = records(&b, "daemon")
        .into_iter()
        .filter(|r| r["action"] == "reload")
        .collect();
    assert_eq!(reloads.len(), 2);
    assert_eq!(reloads[0]["outcome"], "ok");
    assert_eq!(
        reloads[0]["restart_needed"],
        json!(["limits.api_workers", "daemon.pipeline_priority_boost"])
    );
    assert!(
        log.contains(
            "these changes wait for the next restart (until then the daemon runs with their old values): limits.api_workers, daemon.pipeline_priority_boost"
        ),
        "{log}"
    );
}

/// Sends raw bytes and returns what the server answered before closing
/// (or within `wait`).
fn raw(addr: &str, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn malformed_http_gets_a_clean_4xx_and_the_daemon_stays_healthy() {
    let b = news2_box(3, true);
    let app = token(&b, "app", "app", "clinic-a", &[NEWS2_VITALS]);
    let config = format!(
        "{TEST_CONFIG}[limits]\nrequest_head_timeout_ms = 500\nrequest_body_timeout_ms = 500\nmax_request_body_kib = 64\n"
    );
    let d = Daemon::start(&b, &config, &[]);
    let addr = d.addr();
    let w = Duration::from_secs(5);

    let r = raw(&addr, b"GARBAGE\r\n\r\n", w);
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    let r = raw(&addr, big.as_bytes(), w);
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    let huge = format!(
        "POST {INVOKE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {app}\r\nContent-Length: 10000000\r\n\r\n"
    );
    let r = raw(&addr, huge.as_bytes(), w);
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    // A chunked body that grows past the bound.
    let mut chunked = format!(
        "POST {INVOKE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {app}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..80 {
        chunked.extend_from_slice(format!("400\r\n{}\r\n", "x".repeat(1024)).as_bytes());
    }
    let r = raw(&addr, &chunked, w);
    assert!(r.starts_with("HTTP/1.1 413"), "{r}");
    // Slow body: 408 after the body timeout.
    let started = Instant::now();
    let slow = format!(
        "POST {INVOKE} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {app}\r\nContent-Length: 100\r\n\r\n{{\"pat"
    );
    let r = raw(&addr, slow.as_bytes(), w);
    assert!(r.starts_with("HTTP/1.1 408"), "{r}");
    assert!(started.elapsed() < Duration::from_secs(4));
    // Slowloris: a head that never ends is cut off after the head timeout.
    let started = Instant::now();
    let r = raw(
        &addr,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(10),
    );
    assert!(!r.contains(" 200 "), "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "slow head held {:?}",
        started.elapsed()
    );
    // Bad JSON, unknown fields, bad patient: 400 naming the problem.
    for (body, says) in [
        (&b"{\"patient\": "[..], "request body"),
        (
            br#"{"patient": "p0001", "colour": 1}"#,
            "unknown field `colour`",
        ),
        (br#"{"patient": "../etc"}"#, "field `patient`"),
    ] {
        let a = d.post(INVOKE, Some(&app), body);
        assert_eq!(a.status, 400, "{}", a.text());
        assert!(a.text().contains(says), "{}", a.text());
    }
    let a = d.post("/nowhere", Some(&app), b"{}");
    assert_eq!(a.status, 404);
    let a = d.post(
        "/plugins/acme/news2/nope",
        Some(&app),
        &invoke_body("p0002"),
    );
    assert_eq!(a.status, 404, "{}", a.text());
    let said = a.json()["issue"][0]["diagnostics"].clone();
    assert_eq!(said, "acme/news2 does not export \"nope\"");
    let a = d.get(INVOKE, Some(&app), &[]);
    assert_eq!(a.status, 405);
    assert_eq!(a.header("allow"), Some("POST"));

    // Still healthy and serving.
    assert_eq!(d.get("/healthz", None, &[]).status, 200);
    assert_eq!(
        d.post(INVOKE, Some(&app), &invoke_body("p0002")).status,
        200
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn systemd_gets_ready_watchdog_and_stopping() {
    let b = news2_box(1, false);
    let sock_path = b.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // As under the unit: no usable $HOME, the code cache in CacheDirectory.
    let cache = b.path("var-cache-clinicbox");
    let d = Daemon::start(
        &b,
        TEST_CONFIG,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
            ("HOME", "/nonexistent/home"),
            ("CLINICBOX_CACHE_DIR", cache.to_str().unwrap()),
        ],
    );
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(got.contains("READY=1") && got.matches("WATCHDOG=1").count() >= 2) {
        assert!(Instant::now() < deadline, "got only {got:?}");
        let n = sock.recv(&mut buf).unwrap();
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
        got.push('\n');
    }
    let ready_at = got.find("READY=1").unwrap();
    assert!(ready_at < got.find("WATCHDOG=1").unwrap(), "{got}");
    assert!(got.contains("STATUS=serving on 127.0.0.1:"), "{got}");
    let cached = walk_files(&cache);
    assert!(
        !cached.is_empty(),
        "nothing compiled into {}",
        cache.display()
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let mut rest = String::new();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    while let Ok(n) = sock.recv(&mut buf) {
        rest.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(rest.contains("STOPPING=1"), "{rest}");
}

#[test]
fn the_api_speaks_tls_when_configured() {
    use rcgen::{CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let b = news2_box(3, true);
    let app = token(&b, "app", "app", "clinic-a", &[NEWS2_VITALS]);
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let cert_path = b.file("api.pem", cert.pem().as_bytes());
    let key_path = b.file("api.key", key.serialize_pem().as_bytes());
    let config = TEST_CONFIG.replace(
        "listen = \"127.0.0.1:0\"\n",
        &format!(
            "listen = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert_path.display(),
            key_path.display()
        ),
    );
    let d = Daemon::start(&b, &config, &[]);
    assert!(d.base.starts_with("https://"), "{}", d.base);
    let roots = ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![
        ureq::tls::Certificate::from_der(ca.der()).to_owned(),
    ]));
    let agent = ureq::Agent::config_builder()
        .tls_config(ureq::tls::TlsConfig::builder().root_certs(roots).build())
        .http_status_as_error(false)
        .build()
        .new_agent();
    let url = d.base.replace("127.0.0.1", "localhost");
    let mut r = agent
        .post(format!("{url}{INVOKE}"))
        .header("Authorization", format!("Bearer {app}"))
        .send(&invoke_body("p0002")[..])
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = serde_json::from_slice(&r.body_mut().read_to_vec().unwrap()).unwrap();
    assert_eq!(body["output"]["resourceType"], "RiskAssessment");
    // Plain HTTP on the TLS port gets no answer.
    let r = raw(
        &d.addr(),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(!r.contains("200"), "{r}");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk_files(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn the_daemon_syncs_the_audit_log_and_rides_out_an_upstream_outage() {
    use common::upstream::{CertKind, Fault, Upstream};
    let b = news2_box(3, true);
    let app = token(&b, "app", "app", "clinic-a", &[NEWS2_VITALS]);
    let admin = token(&b, "it", "admin", "clinic-a", &[]);
    let up = Upstream::start(b.tmp.path(), CertKind::Good);
    // The first passes fail (500s), then upstream recovers.
    up.inject(&[Fault::Status500, Fault::Status500, Fault::Status500]);
    let config = format!(
        "{TEST_CONFIG}[upstream]\nurl = \"{}\"\nca_file = \"{}\"\nattempts = 1\nbackoff_ms = 50\nbackoff_max_ms = 200\ninterval_secs = 1\n",
        up.url,
        up.ca_pem.display()
    );
    let d = Daemon::start(&b, &config, &[]);
    for _ in 0..3 {
        assert_eq!(
            d.post(INVOKE, Some(&app), &invoke_body("p0002")).status,
            200
        );
    }
    d.wait_for("the backlog to reach upstream", || {
        let s = d.get("/status", Some(&admin), &[]).json();
        s["audit"]["backlog_records"] == 0 && s["audit"]["last_success"].is_string()
    });
    let m = d.get("/metrics", Some(&admin), &[]).text();
    assert!(m.contains("clinicbox_sync_failures_total 3"), "{m}");
    assert!(m.contains("clinicbox_audit_backlog_records 0"), "{m}");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    // Every call reached upstream exactly once as an AuditEvent.
    let calls: Vec<String> = records(&b, "plugin.call")
        .iter()
        .map(|r| r["call_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(calls.len(), 3);
    let ids = up.ids();
    assert!(ids.len() >= 3, "{ids:?}");
    assert!(
        up.seen.lock().unwrap().puts.values().all(|n| *n == 1),
        "a record was sent twice"
    );
}

/// The nice value of each thread of process `pid`, by thread name (the
/// last thread of a name wins).
fn nice_by_thread(pid: u32) -> std::collections::BTreeMap<String, i32> {
    let mut out = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        // A thread that ended meanwhile has no stat any more.
        let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("stat")) else {
            continue;
        };
        // `tid (comm) state ppid …`: nice is the 19th field, the 17th after
        // the comm's closing parenthesis.
        let (head, rest) = stat.rsplit_once(')').unwrap();
        let comm = head.split_once('(').unwrap().1.to_owned();
        let nice: i32 = rest.split_whitespace().nth(16).unwrap().parse().unwrap();
        out.insert(comm, nice);
    }
    out
}
