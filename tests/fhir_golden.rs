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

/// Every vital sign of `patient`, newest first (all pages).
fn all_vitals(b: &TestBox, patient: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let page = b.search(
            "clinic-a",
            patient,
            &format!(
                "Observation?category=vital-signs&_sort=-date&_count=500&_offset={}",
                out.len()
            ),
        );
        let entries = page["entry"].as_array().cloned().unwrap_or_default();
        if entries.is_empty() {
            return out;
        }
        out.extend(entries.into_iter().map(|e| e["resource"].clone()));
    }
}

/// `$lastn` as the spec defines it, computed the slow way: for every
/// `system|code` of `Observation.code`, the first `max` of the newest-first
/// list; each once, in list order.
fn lastn_by_hand(all: &[Value], max: usize) -> Vec<String> {
    let mut taken: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut ids = Vec::new();
    for o in all {
        let mut keep = false;
        for c in o["code"]["coding"].as_array().into_iter().flatten() {
            let key = (
                c["system"].as_str().unwrap_or("").to_owned(),
                c["code"].as_str().unwrap_or("").to_owned(),
            );
            let n = taken.entry(key).or_default();
            if *n < max {
                *n += 1;
                keep = true;
            }
        }
        if keep {
            ids.push(o["id"].as_str().unwrap().to_owned());
        }
    }
    ids
}

#[test]
fn lastn_is_the_newest_of_each_code_whatever_the_history() {
    let b = setup();
    let ids = |bundle: &Value| -> Vec<String> {
        bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
            .collect()
    };
    for patient in ["p0001", "p0003"] {
        let all = all_vitals(&b, patient);
        assert!(all.len() > 50, "{patient}: a history ({})", all.len());
        for max in [1, 3] {
            let got = b.search(
                "clinic-a",
                patient,
                &format!("Observation/$lastn?category=vital-signs&max={max}"),
            );
            let want = lastn_by_hand(&all, max);
            assert!(want.len() >= 5 * max, "{patient}: several codes");
            assert_eq!(ids(&got), want, "{patient} max={max}");
            assert_eq!(got.get("total"), None);
            assert_eq!(got["type"], "searchset");
        }
    }
    // The filters narrow the candidates before "newest" is taken.
    let hr = b.search(
        "clinic-a",
        "p0001",
        "Observation/$lastn?category=vital-signs&code=http://loinc.org|8867-4&max=2",
    );
    let all_hr: Vec<Value> = all_vitals(&b, "p0001")
        .into_iter()
        .filter(|o| o["code"]["coding"][0]["code"] == "8867-4")
        .collect();
    assert_eq!(ids(&hr), lastn_by_hand(&all_hr, 2));
    assert_eq!(ids(&hr).len(), 2);
    // A filter that fails every group's newest rows: "newest" is of what
    // passes, and a group with nothing before the cutoff is left out.
    let all = all_vitals(&b, "p0001");
    let when = |o: &Value| {
        o["effectiveDateTime"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        all.iter()
            .all(|o| when(o).len() == 20 && when(o).ends_with('Z')),
        "instants in one format, so that they compare as strings"
    );
    let cutoff = when(&all[all.len() / 2]);
    let before: Vec<Value> = all.iter().filter(|o| when(o) < cutoff).cloned().collect();
    for max in [1, 3] {
        let got = b.search(
            "clinic-a",
            "p0001",
            &format!("Observation/$lastn?category=vital-signs&date=lt{cutoff}&max={max}"),
        );
        let want = lastn_by_hand(&before, max);
        assert!(!want.is_empty() && want.len() < all.len());
        assert_eq!(ids(&got), want, "date=lt{cutoff} max={max}");
    }
    // Nothing of another tenant's or patient's data, and bad requests are
    // named.
    let none = b.search(
        "clinic-c",
        "p0001",
        "Observation/$lastn?category=vital-signs",
    );
    assert_eq!(none["entry"], json!([]));
    for (q, want) in [
        (
            "Observation/$lastn?code=x",
            "a category parameter is required",
        ),
        (
            "Observation/$lastn?category=vital-signs&_sort=-date",
            "$lastn: _sort is not supported",
        ),
        (
            "Observation/$lastn?category=vital-signs&max=0",
            "max \"0\" is not a positive integer",
        ),
        (
            "Condition/$lastn?category=x",
            "the only operation supported is Observation/$lastn",
        ),
        (
            "Observation/$lastn?category=vital-signs&patient=p0002",
            "names a patient other than the one in context",
        ),
    ] {
        let out = b.run(&[
            "fhir",
            "search",
            "--tenant",
            "clinic-a",
            "--patient",
            "p0001",
            q,
        ]);
        assert!(!out.status.success(), "{q}");
        assert!(
            common::stderr(&out).contains(want),
            "{q}: {}",
            common::stderr(&out)
        );
    }
    let out = b.run(&[
        "fhir",
        "search",
        "--tenant",
        "clinic-a",
        "Observation/$lastn?category=vital-signs",
    ]);
    assert!(
        common::stderr(&out).contains("a patient or subject parameter is required"),
        "{}",
        common::stderr(&out)
    );
}

/// Whether the token `q` (`code`, `system|code`, `|code` or `system|`)
/// matches one of `codings` ((system, code), system "" when none).
fn token_matches(q: &str, codings: &[(String, String)]) -> bool {
    codings.iter().any(|(s, c)| match q.split_once('|') {
        None => c == q,
        Some(("", qc)) => s.is_empty() && c == qc,
        Some((qs, "")) => s == qs,
        Some((qs, qc)) => s == qs && c == qc,
    })
}

fn codings(v: &Value) -> Vec<(String, String)> {
    v.as_array()
        .map(|a| a.iter().collect::<Vec<_>>())
        .unwrap_or_else(|| vec![v])
        .into_iter()
        .flat_map(|cc| cc["coding"].as_array().cloned().unwrap_or_default())
        .map(|c| {
            (
                c["system"].as_str().unwrap_or("").to_owned(),
                c["code"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

/// `$lastn` reads a table keyed by category: categories with and without
/// systems, several categories per Observation, several per query (OR) or
/// AND-ed, `system|` and `|code` forms, statuses as codes and as
/// `system|code`, and scopes that do or do not coincide with the query;
/// each answer equals the by-hand one over the same Observations.
#[test]
fn lastn_by_category_status_and_scope_equals_the_by_hand_answer() {
    let b = TestBox::new();
    let vs = "http://terminology.hl7.org/CodeSystem/observation-category";
    let status_sys = "http://hl7.org/fhir/observation-status";
    let cats = [
        json!([{"coding": [{"system": vs, "code": "vital-signs"}]}]),
        json!([{"coding": [{"system": vs, "code": "laboratory"}]}]),
        json!([{"coding": [{"system": vs, "code": "vital-signs"}]}, {"coding": [{"code": "survey"}]}]),
        json!([{"coding": [{"system": "http://other", "code": "vital-signs"}, {"system": "http://other", "code": "survey"}]}]),
        // One category code under two systems: two rows of one Observation.
        json!([{"coding": [{"system": vs, "code": "vital-signs"}, {"system": "http://local", "code": "vital-signs"}]}]),
        json!(null),
    ];
    let codes = [
        json!({"coding": [{"system": "http://loinc.org", "code": "8867-4"}]}),
        json!({"coding": [{"system": "http://loinc.org", "code": "9279-1"}]}),
        json!({"coding": [{"system": "http://loinc.org", "code": "2339-0"}, {"system": "http://local", "code": "glu"}]}),
        json!({"coding": [{"code": "8867-4"}]}),
    ];
    let statuses = ["final", "preliminary", "amended", "entered-in-error"];
    let n = 97;
    let mut all = Vec::new();
    let mut ndjson = String::new();
    for i in 0..n {
        // Written in an order unrelated to time; every time distinct.
        let minute = (i * 37) % n;
        let mut o = json!({
            "resourceType": "Observation", "id": format!("o{i:03}"),
            "status": statuses[(i / 2) % statuses.len()],
            "code": codes[i % codes.len()],
            "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": format!("2026-01-01T{:02}:{:02}:00Z", minute / 60, minute % 60),
        });
        let category = &cats[(i / 3) % cats.len()];
        if !category.is_null() {
            o["category"] = category.clone();
        }
        // Some are in p2's compartment too (as performer).
        if i % 4 == 0 {
            o["performer"] = json!([{"reference": "Patient/p2"}]);
        }
        // Some have no status (not valid FHIR, but stored as given): its
        // `status` column is NULL and no status filter matches.
        if i % 13 == 5 {
            o.as_object_mut().unwrap().remove("status");
        }
        ndjson.push_str(&o.to_string());
        ndjson.push('\n');
        all.push(o);
    }
    let file = b.file("Observation.ndjson", ndjson.as_bytes());
    b.import("clinic-a", &[&file]);
    all.sort_by(|x, y| {
        y["effectiveDateTime"]
            .as_str()
            .cmp(&x["effectiveDateTime"].as_str())
    });

    // (query, scopes): the query's category, status and code tokens are
    // AND-ed lists of OR-ed alternatives, as the scopes' are.
    let cases: &[(&str, &[&str])] = &[
        ("category=vital-signs&status=final,amended", &[]),
        ("category=vital-signs,laboratory", &[]),
        (&format!("category={vs}|vital-signs")[..], &[]),
        ("category=http://other|", &[]),
        ("category=|survey", &[]),
        ("category=vital-signs&category=survey", &[]),
        (
            &format!("category=vital-signs&status={status_sys}|final")[..],
            &[],
        ),
        ("category=vital-signs&status=|final", &[]),
        ("category=laboratory&status=final,amended,preliminary", &[]),
        ("category=vital-signs&code=http://loinc.org|8867-4", &[]),
        (
            "category=vital-signs",
            &[&format!("patient/Observation.rs?category={vs}|vital-signs")[..]],
        ),
        (
            "category=vital-signs,laboratory",
            &["patient/Observation.rs?category=survey"],
        ),
        (
            "category=laboratory,survey",
            &[
                "patient/Observation.rs?category=survey",
                "patient/Observation.rs?status=final",
            ],
        ),
        // A lone status scope, and one with its system.
        (
            "category=vital-signs,laboratory",
            &["patient/Observation.rs?status=final"],
        ),
        (
            "category=vital-signs",
            &["patient/Observation.rs?status=http://hl7.org/fhir/observation-status|amended"],
        ),
    ];
    for (query, scopes) in cases {
        let pairs: Vec<(&str, &str)> = query
            .split('&')
            .map(|p| p.split_once('=').unwrap())
            .collect();
        let scope_pairs: Vec<(&str, &str)> = scopes
            .iter()
            .map(|s| s.split_once('?').unwrap().1.split_once('=').unwrap())
            .collect();
        let holds = |o: &Value, (name, value): (&str, &str)| -> bool {
            let have = match name {
                "category" => codings(&o["category"]),
                "code" => codings(&o["code"]),
                "status" => o["status"]
                    .as_str()
                    .map(|st| (status_sys.to_owned(), st.to_owned()))
                    .into_iter()
                    .collect(),
                _ => unreachable!(),
            };
            value.split(',').any(|alt| token_matches(alt, &have))
        };
        for (patient, max) in [("p1", 1), ("p1", 2), ("p2", 1), ("p2", 2)] {
            let passing: Vec<Value> = all
                .iter()
                .filter(|o| patient == "p1" || o["performer"][0]["reference"] == "Patient/p2")
                .filter(|o| pairs.iter().all(|p| holds(o, *p)))
                .filter(|o| scopes.is_empty() || scope_pairs.iter().any(|p| holds(o, *p)))
                .cloned()
                .collect();
            let mut args = vec![
                "--json",
                "fhir",
                "search",
                "--tenant",
                "clinic-a",
                "--patient",
                patient,
            ];
            for s in scopes.iter() {
                args.extend(["--scope", s]);
            }
            let q = format!("Observation/$lastn?{query}&max={max}");
            let q_for = format!("{patient}: {q}");
            args.push(&q);
            let got: Value = serde_json::from_slice(&b.run(&args).stdout)
                .unwrap_or_else(|e| panic!("{q_for} {scopes:?}: {e}"));
            let got: Vec<String> = got["entry"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
                .collect();
            let want = lastn_by_hand(&passing, max);
            // Only `|final` (no system, where status has one) finds nothing.
            assert_eq!(
                want.is_empty(),
                query.contains("status=|"),
                "{q_for} {scopes:?}: a case with an answer"
            );
            assert_eq!(got, want, "{q_for} {scopes:?}");
        }
    }
}
