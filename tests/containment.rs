//! Scope: hostile plugins, run through the real host. A corpus of WAT
//! plugins (infinite loop, memory growth, deep recursion, traps, huge
//! output, log spam, a cross-patient stash, misuse of every host function,
//! undeclared imports, WASI and HTTP) and a Rust one (`plugins/hostile`: a
//! real panic, log spam, 16 MiB output, a stash in a global) must each end
//! with a specific error within its limit, leave the host alive, discard the
//! instance, not disturb other calls, and be recorded.

mod common;

use std::sync::Arc;

use clinicbox::datadir::DataDir;
use clinicbox::limits::Limits;
use clinicbox::runtime::{CallError, CallRequest, Runtime, record};
use common::*;
use serde_json::{Value, json};

const HOSTILE_IMPORTS: &str = r#"
  (import "extism:host/user" "fhir_search" (func $fhir_search (param i64) (result i64)))
  (import "extism:host/user" "fhir_read" (func $fhir_read (param i64) (result i64)))
  (import "extism:host/user" "audit_note" (func $audit_note (param i64) (result i64)))
  (import "extism:host/env" "log_info" (func $log_info (param i64)))
"#;

const HOSTILE: &str = r#"
  (global $stash_len (mut i32) (i32.const 0))
  (data (i32.const 0) "ok")
  (func (export "ok") (result i32) (call $out_block (call $to_kernel (i32.const 0) (i32.const 2))) (i32.const 0))
  (func (export "echo") (result i32) (call $out_block (call $copy_in)) (i32.const 0))
  (func (export "spin") (result i32) (loop $l (br $l)) (i32.const 0))
  (func (export "grow") (result i32)
    (loop $l (br_if $l (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))
    unreachable)
  (func $rec (export "recurse") (result i32) (i32.add (call $rec) (i32.const 1)))
  (func (export "trap") (result i32) unreachable)
  (func (export "divzero") (result i32) (i32.div_s (i32.const 1) (i32.const 0)))
  (func (export "huge_output") (result i32)
    (call $output_set (call $alloc (i64.const 8388608)) (i64.const 8388608)) (i32.const 0))
  (func (export "logspam") (result i32) (local $i i32)
    (loop $l (call $log_info (call $to_kernel (i32.const 0) (i32.const 64)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 100000000))))
    (i32.const 0))
  (func (export "search") (result i32) (call $out_block (call $fhir_search (call $copy_in))) (i32.const 0))
  (func (export "read") (result i32) (call $out_block (call $fhir_read (call $copy_in))) (i32.const 0))
  (func (export "note") (result i32) (call $out_block (call $audit_note (call $copy_in))) (i32.const 0))
  (func (export "stash") (result i32) (local $n i32) (local $i i32)
    (call $out_block (call $to_kernel (i32.const 1024) (global.get $stash_len)))
    (local.set $n (i32.wrap_i64 (call $input_length)))
    (block $d (loop $l (br_if $d (i32.ge_u (local.get $i) (local.get $n)))
      (i32.store8 (i32.add (i32.const 1024) (local.get $i)) (call $input_load_u8 (i64.extend_i32_u (local.get $i))))
      (local.set $i (i32.add (local.get $i) (i32.const 1))) (br $l)))
    (if (i32.gt_u (local.get $n) (i32.const 0)) (then (global.set $stash_len (local.get $n))))
    (i32.const 0))
  (func (export "fail") (result i32) (call $error_set (call $to_kernel (i32.const 0) (i32.const 2))) (i32.const 1))
"#;

const EXPORTS: &[&str] = &[
    "ok",
    "echo",
    "spin",
    "grow",
    "recurse",
    "trap",
    "divzero",
    "huge_output",
    "logspam",
    "search",
    "read",
    "note",
    "stash",
    "fail",
];
const VITALS: &str = "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs";

fn obs(id: &str, patient: &str, category: &str) -> Value {
    json!({"resource": {"resourceType": "Observation", "id": id, "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": format!("Patient/{patient}")}, "effectiveDateTime": "2025-09-01T10:00:00Z"}})
}

/// A box with FHIR data for two tenants, the hostile plugin installed as
/// `evil/hostile` (and a well-behaved copy as `good/steady`), granted only
/// vital-sign Observations for clinic-a.
fn setup() -> (TestBox, Arc<Runtime>) {
    let b = TestBox::new();
    let evil = Vendor::new(b.tmp.path(), "evil");
    b.trust(&evil, "evil/");
    b.trust(&evil, "good/");
    let wasm = wat(HOSTILE_IMPORTS, HOSTILE);
    for name in ["evil/hostile", "good/steady"] {
        let bundle = custom_bundle(
            name,
            "1.0.0",
            &wasm,
            EXPORTS,
            &["patient/Observation.rs", "patient/Condition.rs"],
            &evil.key,
        );
        let p = b.file(&format!("{}.cbx", name.replace('/', "-")), &bundle);
        b.ok(&["plugin", "install", p.to_str().unwrap()]);
        b.ok(&["plugin", "grant", "--tenant", "clinic-a", name, VITALS]);
    }
    let a = json!({"resourceType": "Bundle", "type": "collection", "entry": [
        obs("p1-v1", "p1", "vital-signs"), obs("p1-l1", "p1", "laboratory"), obs("p2-v1", "p2", "vital-signs"),
        {"resource": {"resourceType": "Condition", "id": "p1-c1", "subject": {"reference": "Patient/p1"}}}]});
    let bb = json!({"resourceType": "Bundle", "type": "collection", "entry": [obs("b-only", "p1", "vital-signs")]});
    for (tenant, doc) in [("clinic-a", a), ("clinic-b", bb)] {
        let f = b.file(&format!("{tenant}.json"), doc.to_string().as_bytes());
        b.import(tenant, &[&f]);
    }
    let rt = Arc::new(Runtime::new(DataDir::new(&b.data), Limits::default()).unwrap());
    (b, rt)
}

fn req(plugin: &str, patient: &str, function: &str, input: &str) -> CallRequest {
    CallRequest {
        tenant: "clinic-a".into(),
        patient: patient.into(),
        requester: "test".into(),
        purpose: "TREAT".into(),
        plugin: plugin.into(),
        function: function.into(),
        input: input.as_bytes().to_vec(),
    }
}

fn call(rt: &Runtime, patient: &str, function: &str, input: &str) -> Result<String, String> {
    rt.call(&req("evil/hostile", patient, function, input))
        .map(|o| String::from_utf8(o.output).unwrap())
        .map_err(|e| e.to_string())
}

fn last_call(b: &TestBox) -> record::CallRecord {
    let audit = DataDir::new(&b.data).open_audit().unwrap();
    record::recent_calls(&audit, 1).unwrap().pop().unwrap()
}

#[test]
fn a_timeout_floor_raises_a_signed_time_limit_and_the_error_names_the_one_enforced() {
    let (b, _) = setup();
    // The hostile plugin signs 50 ms (a manifest above the ceiling is
    // refused outright, so only the floor can change what is enforced).
    let floor = Limits {
        min_plugin_timeout_ms: 120,
        ..Limits::default()
    };
    let rt = Runtime::new(DataDir::new(&b.data), floor).unwrap();
    let want = "exceeded its time limit (120 ms)";
    let err = call(&rt, "p1", "spin", "").expect_err("spin");
    assert!(err.contains(want), "{err}");
    assert!(last_call(&b).detail.contains(want));
}

#[test]
fn every_hostile_case_ends_with_its_own_error_and_the_host_lives_on() {
    let (b, rt) = setup();
    // Plugin logs are forwarded at info (to no logger here), so they count
    // against the per-call log cap.
    log::set_max_level(log::LevelFilter::Info);
    assert_eq!(call(&rt, "p1", "ok", "").unwrap(), "ok", "control");
    for (function, want) in [
        ("spin", "exceeded its time limit (50 ms)"),
        ("grow", "memory limit reached (16 MiB)"),
        ("recurse", "stack overflow"),
        ("trap", "trapped"),
        ("divzero", "trapped"),
        (
            "huge_output",
            "output is 8388608 bytes, over the limit of 1048576",
        ),
        ("logspam", "exceeded its time limit"),
        ("fail", "failed: ok"),
    ] {
        let err = call(&rt, "p1", function, "").expect_err(function);
        assert!(err.contains(want), "{function}: {err}");
        let rec = last_call(&b);
        assert_eq!(
            (rec.function.as_str(), rec.outcome.as_str()),
            (function, "error"),
            "{function} not recorded"
        );
        assert!(
            rec.detail.contains(want),
            "{function}: recorded {:?}",
            rec.detail
        );
        if function == "logspam" {
            // 16 KiB were forwarded; everything beyond was dropped, counted.
            assert!(
                rec.detail.contains("log bytes over the cap dropped"),
                "log cap not recorded: {:?}",
                rec.detail
            );
        }
        // The host is alive and the next call gets a working instance.
        assert_eq!(call(&rt, "p1", "ok", "").unwrap(), "ok", "after {function}");
    }
}

#[test]
fn an_instance_never_carries_one_patients_data_to_another() {
    let (_b, rt) = setup();
    assert_eq!(call(&rt, "p1", "stash", "secret-of-p1").unwrap(), "");
    // Patient p2 must get a fresh instance: nothing stashed.
    assert_eq!(
        call(&rt, "p2", "stash", "").unwrap(),
        "",
        "p1's data leaked to p2"
    );
    // Control: p1's own instance is reused, so the stash is really there.
    assert_eq!(call(&rt, "p1", "stash", "").unwrap(), "secret-of-p1");
    // Nor across tenants with the same patient id.
    let mut other = req("evil/hostile", "p1", "stash", "");
    other.tenant = "clinic-b".into();
    assert_eq!(
        String::from_utf8(rt.call(&other).unwrap().output).unwrap(),
        ""
    );
}

fn outcome_code(body: &str) -> Option<String> {
    let v: Value = serde_json::from_str(body).ok()?;
    (v["resourceType"] == "OperationOutcome")
        .then(|| v["issue"][0]["code"].as_str().unwrap_or("").to_owned())
}

#[test]
fn host_functions_see_one_patient_one_tenant_and_only_the_grant() {
    let (b, rt) = setup();
    let own: Value =
        serde_json::from_str(&call(&rt, "p1", "search", "Observation").unwrap()).unwrap();
    assert_eq!(own["total"], 1, "only p1's vital sign: {own}");
    assert_eq!(own["entry"][0]["fullUrl"], "Observation/p1-v1");
    for (f, input, code) in [
        ("search", "Observation?patient=p2", "forbidden"),
        ("search", "Condition", "forbidden"),
        ("read", "Observation/p2-v1", "not-found"),
        ("read", "Observation/b-only", "not-found"),
        ("read", "Observation/p1-l1", "not-found"),
        ("read", "Condition/p1-c1", "not-found"),
        ("search", "Observation?code:text=x", "invalid"),
    ] {
        let body = call(&rt, "p1", f, input).unwrap();
        assert_eq!(
            outcome_code(&body).as_deref(),
            Some(code),
            "{f} {input}: {body}"
        );
    }
    let labs: Value = serde_json::from_str(
        &call(&rt, "p1", "search", "Observation?category=laboratory").unwrap(),
    )
    .unwrap();
    assert_eq!(labs["total"], 0, "ungranted category");
    for inj in [
        "Observation?code=' OR 1=1 --",
        "Observation?_id=x') UNION SELECT json FROM resources --",
        "Patient/p1' OR '1'='1",
    ] {
        let body = call(
            &rt,
            "p1",
            if inj.contains('?') { "search" } else { "read" },
            inj,
        )
        .unwrap();
        let v: Value = serde_json::from_str(&body).unwrap();
        assert!(
            v["total"] == 0 || v["resourceType"] == "OperationOutcome",
            "{inj}: {body}"
        );
    }
    assert_eq!(
        call(&rt, "p1", "read", "Observation/p1-v1").map(|s| s.contains("p1-v1")),
        Ok(true)
    );
    // Every access is recorded with its outcome.
    let rec = last_call(&b);
    let audit = DataDir::new(&b.data).open_audit().unwrap();
    let acc = record::accesses_of(&audit, &rec.call_id).unwrap();
    assert_eq!(
        (acc.len(), acc[0].host_fn.as_str(), acc[0].outcome.as_str()),
        (1, "fhir_read", "ok")
    );
    let denied: i64 = audit
        .query_row(
            "SELECT count(*) FROM host_accesses WHERE outcome = 'denied'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(denied >= 6, "denials recorded: {denied}");
    // audit_note can only add.
    assert_eq!(
        call(&rt, "p1", "note", r#"{"why":"test"}"#).unwrap(),
        r#"{"recorded":true}"#
    );
}

#[test]
fn a_runaway_plugin_neither_stops_nor_fails_other_calls() {
    let (_b, rt) = setup();
    let spinner = {
        let rt = rt.clone();
        std::thread::spawn(move || (0..4).all(|_| call(&rt, "p1", "spin", "").is_err()))
    };
    // Meanwhile: another plugin, and a sibling instance of the same plugin.
    let mut ok = 0;
    for i in 0..40 {
        let plugin = if i % 2 == 0 {
            "good/steady"
        } else {
            "evil/hostile"
        };
        let out = rt
            .call(&req(plugin, "p2", "ok", ""))
            .expect("a concurrent call failed");
        assert_eq!(out.output, b"ok");
        ok += 1;
    }
    assert!(
        spinner.join().unwrap(),
        "every spin must end in its budget error"
    );
    assert_eq!(ok, 40);
}

#[test]
fn repeated_failures_quarantine_until_an_admin_enables() {
    let (b, rt) = setup();
    // Errors the plugin reports itself (bad input, a refused host call)
    // are answers, not misbehaviour: any number of them, from any caller,
    // quarantine nothing.
    for _ in 0..8 {
        let e = call(&rt, "p1", "fail", "").unwrap_err();
        assert!(e.contains("failed"), "{e}");
    }
    assert_eq!(call(&rt, "p1", "ok", "").unwrap(), "ok");
    for _ in 0..5 {
        assert!(call(&rt, "p1", "trap", "").is_err());
    }
    let err = rt.call(&req("evil/hostile", "p1", "ok", "")).unwrap_err();
    assert!(matches!(err, CallError::Quarantined { .. }), "{err}");
    assert_eq!(last_call(&b).outcome, "quarantined");
    // Other plugins are unaffected.
    assert!(rt.call(&req("good/steady", "p1", "ok", "")).is_ok());
    b.ok(&["plugin", "enable", "evil/hostile"]);
    assert_eq!(call(&rt, "p1", "ok", "").unwrap(), "ok");
}

#[test]
fn undeclared_imports_wasi_and_http_are_refused_at_install_by_name() {
    let b = TestBox::new();
    let evil = Vendor::new(b.tmp.path(), "evil");
    b.trust(&evil, "evil/");
    let ok_fn = r#"(func (export "run") (result i32) (i32.const 0))"#;
    for (import, want) in [
        (
            r#"(import "extism:host/user" "read_host_memory" (func (param i64) (result i64)))"#,
            "extism:host/user::read_host_memory (function)",
        ),
        (
            r#"(import "wasi_snapshot_preview1" "path_open" (func (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))"#,
            "wasi_snapshot_preview1::path_open",
        ),
        (
            r#"(import "wasi_snapshot_preview1" "environ_get" (func (param i32 i32) (result i32)))"#,
            "wasi_snapshot_preview1::environ_get",
        ),
        (
            r#"(import "extism:host/env" "http_request" (func (param i64 i64) (result i64)))"#,
            "extism:host/env::http_request",
        ),
        (
            r#"(import "extism:host/env" "var_set" (func (param i64 i64)))"#,
            "extism:host/env::var_set",
        ),
        (
            r#"(import "env" "memory" (memory 1))"#,
            "env::memory (memory)",
        ),
    ] {
        let wasm = wat::parse_str(format!("(module {import} {ok_fn})")).unwrap();
        let bundle = custom_bundle(
            "evil/x",
            "1.0.0",
            &wasm,
            &["run"],
            &["patient/Observation.rs"],
            &evil.key,
        );
        let p = b.file("x.cbx", &bundle);
        let out = b.run(&["plugin", "install", p.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(3), "{import}");
        assert!(
            stderr(&out).contains(&format!("step 7 (wasm): the module imports {want}")),
            "{import}: {}",
            stderr(&out)
        );
    }
    // fhir_search without a requested search scope is refused too.
    let wasm = wat::parse_str(format!(r#"(module (import "extism:host/user" "fhir_search" (func (param i64) (result i64))) {ok_fn})"#)).unwrap();
    let bundle = custom_bundle(
        "evil/x",
        "1.0.0",
        &wasm,
        &["run"],
        &["patient/Observation.r"],
        &evil.key,
    );
    let out = b.run(&[
        "plugin",
        "install",
        b.file("y.cbx", &bundle).to_str().unwrap(),
    ]);
    assert!(
        stderr(&out)
            .contains("imports fhir_search, but the manifest requests no scope allowing it"),
        "{}",
        stderr(&out)
    );
    // An export the manifest lists but the module lacks.
    let bundle = custom_bundle(
        "evil/x",
        "1.0.0",
        &wat::parse_str(format!("(module {ok_fn})")).unwrap(),
        &["run", "missing"],
        &[],
        &evil.key,
    );
    let out = b.run(&[
        "plugin",
        "install",
        b.file("z.cbx", &bundle).to_str().unwrap(),
    ]);
    assert!(
        stderr(&out).contains("export \"missing\" listed in the manifest is not exported"),
        "{}",
        stderr(&out)
    );
    assert!(b.installed().is_empty());
}

/// `clinicbox call`: the hostile plugin reads p1's Observation p1-v1
/// through `fhir_read`.
const READ_P1_V1: [&str; 9] = [
    "call",
    "--tenant",
    "clinic-a",
    "--patient",
    "p1",
    "--input",
    "Observation/p1-v1",
    "evil/hostile",
    "read",
];

#[test]
fn a_panicking_host_function_is_contained_and_the_instance_replaced() {
    let (b, _rt) = setup();
    let args = READ_P1_V1;
    // The host's failure, however often, is not the plugin's: no quarantine.
    for _ in 0..6 {
        let out = b.run_env(&args, &[("CLINICBOX_FAILPOINT", "host.fhir_read")]);
        assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("host function fhir_read panicked"),
            "{}",
            stderr(&out)
        );
    }
    let out = b.run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("p1-v1"));
}

#[test]
fn a_timeout_the_host_caused_fails_the_call_but_quarantines_nothing() {
    let (b, _rt) = setup();
    let args = READ_P1_V1;
    // fhir_read waits 300 ms (a stalled disk, say) inside a 50 ms limit:
    // the call runs out of time while the host keeps it waiting. More
    // times than the quarantine count, and each is still an error with
    // the limit named.
    let n = Limits::default().quarantine_after + 1;
    for _ in 0..n {
        let out = b.run_env(&args, &[("CLINICBOX_FAILPOINT", "delay:host.fhir_read")]);
        assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
        let e = stderr(&out);
        assert!(
            e.contains("exceeded its time limit (50 ms); instance discarded; host functions kept it waiting")
                && e.contains("so it is not counted towards quarantine"),
            "{e}"
        );
    }
    let rec = last_call(&b);
    assert_eq!(rec.outcome, "error");
    assert!(rec.detail.contains("kept it waiting"), "{rec:?}");
    // Not quarantined: the next call answers.
    let out = b.run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("p1-v1"));
    // Time in its own code always counts: as many spinning calls as the
    // quarantine count quarantine it, whatever the machine's load.
    let spin = [
        "call",
        "--tenant",
        "clinic-a",
        "--patient",
        "p1",
        "evil/hostile",
        "spin",
    ];
    for _ in 0..Limits::default().quarantine_after {
        let out = b.run(&spin);
        assert!(
            stderr(&out).contains("exceeded its time limit (50 ms); instance discarded"),
            "{}",
            stderr(&out)
        );
    }
    let out = b.run(&args);
    assert!(
        stderr(&out).contains("plugin evil/hostile is quarantined"),
        "{}",
        stderr(&out)
    );
}

/// Builds `plugins/hostile` (Rust, extism-pdk) with the vendors' script.
fn hostile_rust_wasm() -> Vec<u8> {
    let out = std::process::Command::new(repo().join("update-bundles/build-plugin.sh"))
        .arg(repo().join("plugins/hostile"))
        .output()
        .expect("run build-plugin.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(String::from_utf8(out.stdout).unwrap().trim()).expect("hostile.wasm")
}

#[test]
fn a_hostile_rust_plugin_is_contained_too() {
    let (b, rt) = setup();
    let evil = Vendor::new(b.tmp.path(), "evil2");
    b.trust(&evil, "rusty/");
    let bundle = custom_bundle(
        "rusty/hostile",
        "1.0.0",
        &hostile_rust_wasm(),
        &["panic", "log_spam", "huge", "stash"],
        &[],
        &evil.key,
    );
    let p = b.file("rusty.cbx", &bundle);
    b.ok(&["plugin", "install", p.to_str().unwrap()]);
    let call = |patient: &str, function: &str, input: &str| {
        rt.call(&req("rusty/hostile", patient, function, input))
            .map(|o| String::from_utf8(o.output).unwrap())
            .map_err(|e| e.to_string())
    };
    for (function, want) in [
        ("panic", "trapped"),
        ("log_spam", "exceeded its time limit"),
        ("huge", "memory limit reached (16 MiB)"),
    ] {
        let err = call("p1", function, "boom").expect_err(function);
        assert!(err.contains(want), "{function}: {err}");
        assert_eq!(last_call(&b).outcome, "error", "{function} not recorded");
        assert_eq!(
            call("p1", "stash", "").unwrap(),
            "",
            "host not alive after {function}"
        );
    }
    assert_eq!(call("p1", "stash", "rust-secret-of-p1").unwrap(), "");
    assert_eq!(
        call("p2", "stash", "").unwrap(),
        "",
        "p1's data leaked to p2"
    );
    assert_eq!(call("p1", "stash", "").unwrap(), "rust-secret-of-p1");
}

#[test]
fn a_host_function_is_linked_only_while_a_grant_allows_it() {
    let (b, rt) = setup();
    let search = "Observation";
    // Granted: the search runs.
    let ok: Value = serde_json::from_str(&call(&rt, "p1", "search", search).unwrap()).unwrap();
    assert_eq!(ok["total"], 1, "granted search answers data: {ok}");
    // Revoked: new instances link a denial stub, and the idle instance that
    // had the real function is not reused (its key no longer matches).
    b.ok(&["plugin", "ungrant", "--tenant", "clinic-a", "evil/hostile"]);
    let denied = call(&rt, "p1", "search", search).unwrap();
    assert_eq!(
        outcome_code(&denied).as_deref(),
        Some("forbidden"),
        "{denied}"
    );
    let audit = DataDir::new(&b.data).open_audit().unwrap();
    let last = last_call(&b);
    let acc = record::accesses_of(&audit, &last.call_id).unwrap();
    assert_eq!(acc.len(), 1);
    assert_eq!(acc[0].outcome, "denied");
    assert!(
        acc[0].detail.contains("fhir_search is not linked"),
        "{}",
        acc[0].detail
    );
    // Granted again: linked again.
    b.ok(&[
        "plugin",
        "grant",
        "--tenant",
        "clinic-a",
        "evil/hostile",
        VITALS,
    ]);
    let again: Value = serde_json::from_str(&call(&rt, "p1", "search", search).unwrap()).unwrap();
    assert_eq!(again["total"], 1, "{again}");
}

/// A removed plugin's code and idle instances are freed by
/// `forget_stale`, a kept one's are not, and a call to it afterwards is
/// refused as not installed.
#[test]
fn a_removed_plugins_code_and_idle_instances_are_freed() {
    let (b, rt) = setup();
    assert_eq!(call(&rt, "p1", "stash", "kept").unwrap(), "");
    let steady = rt
        .call(&req("good/steady", "p1", "stash", "x"))
        .map(|o| o.output)
        .unwrap();
    assert!(steady.is_empty());
    let both = rt.idle_bytes();
    assert!(both > 0);
    assert_eq!(rt.forget_stale().unwrap(), Vec::<String>::new());
    assert_eq!(rt.idle_bytes(), both, "nothing stale, nothing dropped");

    b.ok(&["plugin", "remove", "good/steady"]);
    assert_eq!(rt.forget_stale().unwrap(), ["good/steady"]);
    assert!(
        rt.idle_bytes() < both && rt.idle_bytes() > 0,
        "the removed plugin's instance is gone, the other's stays"
    );
    assert_eq!(
        call(&rt, "p1", "stash", "").unwrap(),
        "kept",
        "evil/hostile's warm instance kept its patient's stash"
    );
    let e = rt
        .call(&req("good/steady", "p1", "stash", ""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not installed"), "{e}");
}

#[test]
fn idle_instances_stay_warm_per_patient_within_the_memory_budget() {
    let (b, rt) = setup();
    // The default budget keeps 30 patients' instances: each still holds
    // what its own patient's call stashed.
    for i in 0..30 {
        assert_eq!(
            call(&rt, &format!("q{i}"), "stash", &format!("s{i}")).unwrap(),
            ""
        );
    }
    assert!(rt.idle_bytes() > 0);
    let per = rt.idle_bytes() / 30;
    for i in 0..30 {
        assert_eq!(
            call(&rt, &format!("q{i}"), "stash", "").unwrap(),
            format!("s{i}")
        );
    }

    // No budget: nothing is kept, every call gets a fresh instance.
    let none = Limits {
        idle_instances_mib: 0,
        ..Limits::default()
    };
    let rt0 = Runtime::new(DataDir::new(&b.data), none).unwrap();
    assert_eq!(call(&rt0, "p1", "stash", "x").unwrap(), "");
    assert_eq!(
        call(&rt0, "p1", "stash", "").unwrap(),
        "",
        "kept with no budget"
    );
    assert_eq!(rt0.idle_bytes(), 0);

    // A budget for a few: the least recently used patients go first, and
    // the idle memory never exceeds the budget.
    let small = Limits {
        idle_instances_mib: 8,
        ..Limits::default()
    };
    let budget = 8 * 1024 * 1024;
    let fit = budget / per;
    assert!((2..20).contains(&fit), "{per} bytes per instance");
    let rt8 = Runtime::new(DataDir::new(&b.data), small).unwrap();
    for i in 0..fit + 3 {
        assert_eq!(
            call(&rt8, &format!("r{i}"), "stash", &format!("t{i}")).unwrap(),
            ""
        );
        assert!(rt8.idle_bytes() <= budget, "over budget after r{i}");
    }
    for i in (3..fit + 3).rev() {
        assert_eq!(
            call(&rt8, &format!("r{i}"), "stash", "").unwrap(),
            format!("t{i}"),
            "r{i}"
        );
    }
    assert_eq!(call(&rt8, "r0", "stash", "").unwrap(), "", "r0 was evicted");

    // The budget is box-wide: another plugin's instance makes room by
    // evicting the least recently idle one, whichever plugin it belongs to.
    let steady = |patient: &str, input: &str| {
        rt8.call(&req("good/steady", patient, "stash", input))
            .map(|o| String::from_utf8(o.output).unwrap())
            .unwrap()
    };
    assert_eq!(steady("g1", "u1"), "");
    assert!(rt8.idle_bytes() <= budget);
    assert_eq!(
        steady("g1", ""),
        "u1",
        "kept although hostile's fill the budget"
    );
}
