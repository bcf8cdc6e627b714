//! Scope: the second example plugin, `acme/allergy-check`, written in C
//! against the Extism ABI (no PDK), end to end: the signed bundle from
//! `update-bundles/`, a patient's active allergies and medication requests
//! in the cache, a grant, and `clinicbox call … check`, which answers with
//! one DetectedIssue per conflicting (medication, allergy) pair.

mod common;

use common::*;
use serde_json::{Value, json};

const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";

fn med(id: &str, patient: &str, code: &str) -> Value {
    json!({"resource": {"resourceType": "MedicationRequest", "id": id, "status": "active", "intent": "order",
        "subject": {"reference": format!("Patient/{patient}")}, "authoredOn": "2025-09-01",
        "medicationCodeableConcept": {"coding": [{"system": RXNORM, "code": code}]}}})
}

fn allergy(id: &str, patient: &str, code: &str) -> Value {
    json!({"resource": {"resourceType": "AllergyIntolerance", "id": id, "category": ["medication"],
        "clinicalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical", "code": "active"}]},
        "patient": {"reference": format!("Patient/{patient}")}, "code": {"coding": [{"system": RXNORM, "code": code}]}}})
}

#[test]
fn allergy_check_flags_a_penicillin_allergy_against_amoxicillin_only() {
    let b = TestBox::new();
    b.ok(&[
        "trust",
        "add",
        "--namespace",
        "acme/",
        repo()
            .join("update-bundles/dev-vendor.pub")
            .to_str()
            .unwrap(),
    ]);
    let bundle = repo().join("update-bundles/acme-allergy-check.cbx");
    b.ok(&["plugin", "install", bundle.to_str().unwrap()]);
    let data = json!({"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Patient", "id": "p1"}},
        allergy("a1", "p1", "7980"),
        med("m1", "p1", "723"),
        med("m2", "p1", "197361"),
        {"resource": {"resourceType": "Patient", "id": "p2"}},
        med("m3", "p2", "723"),
    ]});
    let f = b.file("data.json", data.to_string().as_bytes());
    b.import("clinic-a", &[&f]);
    let call = |patient: &str| {
        b.run(&[
            "call",
            "--tenant",
            "clinic-a",
            "--patient",
            patient,
            "acme/allergy-check",
            "check",
        ])
    };

    let denied = call("p1");
    assert_eq!(denied.status.code(), Some(7));
    assert!(
        stderr(&denied).contains("fhir_search refused"),
        "{}",
        stderr(&denied)
    );

    b.ok(&[
        "plugin",
        "grant",
        "--tenant",
        "clinic-a",
        "acme/allergy-check",
        "patient/MedicationRequest.rs",
        "patient/AllergyIntolerance.rs",
    ]);
    let out = call("p1");
    assert!(out.status.success(), "{}", stderr(&out));
    let issues: Value = serde_json::from_slice(&out.stdout).unwrap();
    let issues = issues.as_array().expect("an array of DetectedIssue");
    assert_eq!(issues.len(), 1, "{issues:?}");
    assert_eq!(issues[0]["resourceType"], "DetectedIssue");
    assert_eq!(issues[0]["patient"]["reference"], "Patient/p1");
    let implicated: Vec<&str> = issues[0]["implicated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reference"].as_str().unwrap())
        .collect();
    assert_eq!(
        implicated,
        ["MedicationRequest/m1", "AllergyIntolerance/a1"]
    );

    // p2 takes amoxicillin too, but has no allergy: nothing to flag, and
    // p1's allergy never reaches p2's call.
    let out = call("p2");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        json!([])
    );
}
