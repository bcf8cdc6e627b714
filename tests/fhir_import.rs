//! Scope: `clinicbox fhir import` through the real binary — NDJSON plain and
//! gzipped, export manifests with deletions, transaction Bundles with
//! urn:uuid references, re-import idempotence, the newest-wins rule, and
//! bad input (malformed lines, invalid UTF-8, truncated gzip, --strict), each
//! reported as file:line without damaging what is stored.

mod common;

use std::io::Write;

use common::*;
use serde_json::{Value, json};

fn obs(id: &str, patient: &str, code: &str, when: &str, updated: &str) -> Value {
    json!({
        "resourceType": "Observation", "id": id, "status": "final",
        "meta": {"lastUpdated": updated},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": format!("Patient/{patient}")},
        "effectiveDateTime": when,
        "valueQuantity": {"value": 80, "unit": "/min"}
    })
}

fn ndjson(lines: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for l in lines {
        out.extend_from_slice(l.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn read(b: &TestBox, tenant: &str, reference: &str) -> Option<Value> {
    let out = b.run(&["fhir", "read", "--tenant", tenant, reference]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).unwrap())
}

fn import(
    b: &TestBox,
    tenant: &str,
    files: &[&std::path::Path],
    extra: &[&str],
) -> (bool, Value, String) {
    let mut args = vec!["--json", "fhir", "import", "--tenant", tenant];
    args.extend_from_slice(extra);
    let paths: Vec<String> = files
        .iter()
        .map(|p| p.to_str().unwrap().to_owned())
        .collect();
    args.extend(paths.iter().map(String::as_str));
    let out = b.run(&args);
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.success(), report, stderr(&out))
}

#[test]
fn ndjson_and_gzip_import_and_reimport_changes_nothing() {
    let b = TestBox::new();
    let plain = b.file(
        "Observation.ndjson",
        &ndjson(&[
            obs(
                "o1",
                "p1",
                "8867-4",
                "2025-09-14T10:00:00Z",
                "2025-09-14T11:00:00Z",
            ),
            obs(
                "o2",
                "p1",
                "9279-1",
                "2025-09-14T10:00:00Z",
                "2025-09-14T11:00:00Z",
            ),
        ]),
    );
    let gz = b.file(
        "Patient.ndjson.gz",
        &gzip(&ndjson(&[
            json!({"resourceType": "Patient", "id": "p1", "gender": "female"}),
        ])),
    );
    let (ok, report, err) = import(&b, "clinic-a", &[&plain, &gz], &[]);
    assert!(ok, "{err}");
    assert_eq!(report[0]["types"]["Observation"]["created"], 2);
    assert_eq!(report[1]["types"]["Patient"]["created"], 1);
    let o1 = read(&b, "clinic-a", "Observation/o1").expect("o1 stored");
    assert_eq!(o1["meta"]["versionId"], "1");
    assert_eq!(o1["meta"]["lastUpdated"], "2025-09-14T11:00:00Z");

    let (ok, report, _) = import(&b, "clinic-a", &[&plain, &gz], &[]);
    assert!(ok);
    assert_eq!(report[0]["types"]["Observation"]["unchanged"], 2);
    assert_eq!(report[0]["types"]["Observation"]["created"], 0);
    assert_eq!(
        read(&b, "clinic-a", "Observation/o1").unwrap()["meta"]["versionId"],
        "1"
    );
}

#[test]
fn newest_last_updated_wins_and_older_is_stale() {
    let b = TestBox::new();
    let v2 = b.file(
        "Observation.ndjson",
        &ndjson(&[obs("o1", "p1", "NEW", "2025-09-14", "2025-09-20T00:00:00Z")]),
    );
    import(&b, "clinic-a", &[&v2], &[]);
    let v1 = b.file("old/Observation.ndjson", &[]);
    std::fs::create_dir_all(v1.parent().unwrap()).unwrap();
    std::fs::write(
        &v1,
        ndjson(&[obs("o1", "p1", "OLD", "2025-09-14", "2025-09-10T00:00:00Z")]),
    )
    .unwrap();
    let (_, report, _) = import(&b, "clinic-a", &[&v1], &[]);
    assert_eq!(report[0]["types"]["Observation"]["stale"], 1);
    let stored = read(&b, "clinic-a", "Observation/o1").unwrap();
    assert_eq!(stored["code"]["coding"][0]["code"], "NEW");
    let v3 = b.file("new/Observation.ndjson", &[]);
    std::fs::create_dir_all(v3.parent().unwrap()).unwrap();
    std::fs::write(
        &v3,
        ndjson(&[obs(
            "o1",
            "p1",
            "NEWER",
            "2025-09-14",
            "2025-09-25T00:00:00Z",
        )]),
    )
    .unwrap();
    let (_, report, _) = import(&b, "clinic-a", &[&v3], &[]);
    assert_eq!(report[0]["types"]["Observation"]["updated"], 1);
    let stored = read(&b, "clinic-a", "Observation/o1").unwrap();
    assert_eq!(stored["code"]["coding"][0]["code"], "NEWER");
    assert_eq!(stored["meta"]["versionId"], "2");
}

#[test]
fn export_manifest_with_deletions_and_transaction_time_fallback() {
    let b = TestBox::new();
    let dir = b.path("export");
    std::fs::create_dir_all(&dir).unwrap();
    let mut no_meta = obs("o2", "p1", "9279-1", "2025-09-14T10:00:00Z", "x");
    no_meta.as_object_mut().unwrap().remove("meta");
    std::fs::write(
        dir.join("Observation.ndjson"),
        ndjson(&[
            obs(
                "o1",
                "p1",
                "8867-4",
                "2025-09-14T10:00:00Z",
                "2025-09-14T11:00:00Z",
            ),
            no_meta,
        ]),
    )
    .unwrap();
    let manifest = json!({
        "transactionTime": "2025-10-01T00:00:00Z", "request": "https://ehr/fhir/$export", "requiresAccessToken": false,
        "output": [{"type": "Observation", "url": "Observation.ndjson"}], "error": []
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    let (ok, _, err) = import(&b, "clinic-a", &[&dir.join("manifest.json")], &[]);
    assert!(ok, "{err}");
    assert_eq!(
        read(&b, "clinic-a", "Observation/o2").unwrap()["meta"]["lastUpdated"],
        "2025-10-01T00:00:00Z"
    );

    // A later export deletes o1.
    let del = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "DELETE", "url": "Observation/o1"}}]});
    std::fs::write(dir.join("del.ndjson"), ndjson(&[del])).unwrap();
    let manifest = json!({"transactionTime": "2025-11-01T00:00:00Z", "output": [],
        "deleted": [{"type": "Bundle", "url": "del.ndjson"}]});
    std::fs::write(dir.join("manifest2.json"), manifest.to_string()).unwrap();
    let (ok, report, err) = import(&b, "clinic-a", &[&dir.join("manifest2.json")], &[]);
    assert!(ok, "{err}");
    assert_eq!(report[0]["types"]["Observation"]["deleted"], 1);
    assert!(
        read(&b, "clinic-a", "Observation/o1").is_none(),
        "tombstoned resource must not read"
    );
    let search = b.json(&[
        "fhir",
        "search",
        "--tenant",
        "clinic-a",
        "Observation?_id=o1",
    ]);
    assert_eq!(search["total"], 0);
    let stats = b.json(&["fhir", "stats"]);
    assert_eq!(stats["tenants"]["clinic-a"]["Observation"], json!([1, 1]));
}

#[test]
fn transaction_bundle_rewrites_urn_uuid_references() {
    let b = TestBox::new();
    let pat = "urn:uuid:0b7c9b2e-63a5-4c1f-9a0e-2a7a0d1f0001";
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": pat, "resource": {"resourceType": "Patient", "gender": "male"}, "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:0b7c9b2e-63a5-4c1f-9a0e-2a7a0d1f0002",
         "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": pat}, "effectiveDateTime": "2025-09-14"},
         "request": {"method": "POST", "url": "Observation"}},
        {"resource": {"resourceType": "Condition", "id": "c1", "subject": {"reference": pat}, "code": {"text": "y"}},
         "request": {"method": "PUT", "url": "Condition/c1"}}
    ]});
    let f = b.file("tx.json", bundle.to_string().as_bytes());
    let (ok, report, err) = import(&b, "clinic-a", &[&f], &[]);
    assert!(ok, "{err}");
    assert_eq!(report[0]["kind"], "bundle/transaction");
    let obs = read(
        &b,
        "clinic-a",
        "Observation/0b7c9b2e-63a5-4c1f-9a0e-2a7a0d1f0002",
    )
    .unwrap();
    assert_eq!(
        obs["subject"]["reference"],
        "Patient/0b7c9b2e-63a5-4c1f-9a0e-2a7a0d1f0001"
    );
    let cond = read(&b, "clinic-a", "Condition/c1").unwrap();
    assert_eq!(
        cond["subject"]["reference"],
        "Patient/0b7c9b2e-63a5-4c1f-9a0e-2a7a0d1f0001"
    );
    // In that patient's compartment:
    let s = b.search(
        "clinic-a",
        "0b7c9b2e-63a5-4c1f-9a0e-2a7a0d1f0001",
        "Condition",
    );
    assert_eq!(s["total"], 1);
}

#[test]
fn a_failing_transaction_bundle_is_all_or_nothing() {
    let b = TestBox::new();
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "ok"}, "request": {"method": "PUT", "url": "Patient/ok"}},
        {"resource": {"resourceType": "Patient", "id": "bad id!"}, "request": {"method": "PUT", "url": "Patient/x"}}
    ]});
    let f = b.file("tx.json", bundle.to_string().as_bytes());
    let (ok, report, err) = import(&b, "clinic-a", &[&f], &[]);
    assert!(!ok);
    assert!(
        err.contains("tx.json: entry[1]: Patient id \"bad id!\" is not a valid FHIR id"),
        "{err}"
    );
    assert_eq!(report[0]["rolled_back"], true);
    assert!(read(&b, "clinic-a", "Patient/ok").is_none());
}

#[test]
fn malformed_lines_are_reported_by_file_and_line_and_skipped() {
    let b = TestBox::new();
    let good = obs(
        "o1",
        "p1",
        "8867-4",
        "2025-09-14T10:00:00Z",
        "2025-09-14T11:00:00Z",
    );
    let mut bytes = ndjson(std::slice::from_ref(&good));
    bytes.extend_from_slice(b"{not json\n");
    bytes.extend_from_slice(b"{\"resourceType\":\"Observation\",\"id\":\"bad\xff\xfe\"}\n");
    bytes.extend_from_slice(b"{\"resourceType\":\"Patient\",\"id\":\"p9\"}\n");
    bytes.extend_from_slice(b"{\"resourceType\":\"Observation\"}\n");
    bytes.extend_from_slice(&ndjson(&[obs(
        "o2",
        "p1",
        "9279-1",
        "2025-09-14T10:00:00Z",
        "2025-09-14T11:00:00Z",
    )]));
    let f = b.file("Observation.ndjson", &bytes);
    let (ok, report, err) = import(&b, "clinic-a", &[&f], &[]);
    assert!(!ok, "errors must fail the command");
    let name = f.display().to_string();
    assert!(err.contains(&format!("{name}:2: invalid JSON")), "{err}");
    assert!(err.contains(&format!("{name}:3: invalid UTF-8")), "{err}");
    assert!(
        err.contains(&format!(
            "{name}:4: resourceType Patient in a file named for Observation"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!("{name}:5: Observation has no id")),
        "{err}"
    );
    assert_eq!(report[0]["skipped"], 4);
    assert_eq!(report[0]["types"]["Observation"]["created"], 2);
    assert!(read(&b, "clinic-a", "Observation/o2").is_some());
}

#[test]
fn strict_rolls_back_the_whole_file_and_keeps_what_was_stored() {
    let b = TestBox::new();
    let first = b.file("a/Observation.ndjson", &[]);
    std::fs::create_dir_all(first.parent().unwrap()).unwrap();
    std::fs::write(
        &first,
        ndjson(&[obs(
            "o1",
            "p1",
            "KEEP",
            "2025-09-14",
            "2025-09-14T11:00:00Z",
        )]),
    )
    .unwrap();
    import(&b, "clinic-a", &[&first], &[]);
    let mut bytes = ndjson(&[
        obs("o1", "p1", "CHANGED", "2025-09-14", "2025-09-30T00:00:00Z"),
        obs("o3", "p1", "NEW", "2025-09-14", "2025-09-30T00:00:00Z"),
    ]);
    bytes.extend_from_slice(b"oops\n");
    let f = b.file("Observation.ndjson", &bytes);
    let (ok, report, err) = import(&b, "clinic-a", &[&f], &["--strict"]);
    assert!(!ok);
    assert!(err.contains(":3: invalid JSON"), "{err}");
    assert_eq!(report[0]["rolled_back"], true);
    assert_eq!(
        read(&b, "clinic-a", "Observation/o1").unwrap()["code"]["coding"][0]["code"],
        "KEEP"
    );
    assert!(read(&b, "clinic-a", "Observation/o3").is_none());
}

#[test]
fn truncated_gzip_keeps_what_was_read_and_says_where_it_stopped() {
    let b = TestBox::new();
    let lines: Vec<Value> = (0..2000)
        .map(|i| {
            obs(
                &format!("o{i}"),
                "p1",
                "8867-4",
                "2025-09-14T10:00:00Z",
                "2025-09-14T11:00:00Z",
            )
        })
        .collect();
    let gz = gzip(&ndjson(&lines));
    let f = b.file("Observation.ndjson.gz", &gz[..gz.len() * 2 / 3]);
    let (ok, report, err) = import(&b, "clinic-a", &[&f], &[]);
    assert!(!ok);
    assert!(err.contains("compressed stream is truncated"), "{err}");
    let created = report[0]["types"]["Observation"]["created"]
        .as_u64()
        .unwrap();
    assert!(created > 100 && created < 2000, "created {created}");
    // And with --strict nothing of it stays.
    let b2 = TestBox::new();
    let f2 = b2.file("Observation.ndjson.gz", &gz[..gz.len() * 2 / 3]);
    let (_, report, _) = import(&b2, "clinic-a", &[&f2], &["--strict"]);
    assert_eq!(report[0]["rolled_back"], true);
    assert!(read(&b2, "clinic-a", "Observation/o0").is_none());
}

#[test]
fn an_overlong_line_is_skipped_with_its_size() {
    let b = TestBox::new();
    let mut big = obs("big", "p1", "8867-4", "2025-09-14", "2025-09-14T11:00:00Z");
    big["note"] = json!([{"text": "x".repeat(17 * 1024 * 1024)}]);
    let bytes = ndjson(&[
        big,
        obs("o2", "p1", "9279-1", "2025-09-14", "2025-09-14T11:00:00Z"),
    ]);
    let f = b.file("Observation.ndjson", &bytes);
    let (_, report, err) = import(&b, "clinic-a", &[&f], &[]);
    assert!(
        err.contains(":1: line is ") && err.contains("over the limit of 16777216"),
        "{err}"
    );
    assert_eq!(report[0]["types"]["Observation"]["created"], 1);
}
