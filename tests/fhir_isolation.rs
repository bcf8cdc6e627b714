//! Scope: search and read never leak outside the search context. A
//! hand-built data set with two tenants that reuse the same ids, two
//! patients, labs and vitals, medications; every way of trying to reach
//! another patient's, another tenant's, an ungranted type's or an ungranted
//! category's data is refused or comes back empty, including through
//! `_include`, and the refusal looks the same whether or not data exists.

mod common;

use common::*;
use serde_json::{Value, json};

const VITALS: &str = "http://terminology.hl7.org/CodeSystem/observation-category|vital-signs";

fn obs(id: &str, patient: &str, category: &str, when: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final",
        "meta": {"lastUpdated": "2025-10-01T00:00:00Z"},
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": format!("Patient/{patient}")}, "effectiveDateTime": when})
}

fn dataset(tenant_marker: &str) -> Value {
    let mut entries: Vec<Value> = vec![
        json!({"resourceType": "Patient", "id": "p1", "name": [{"text": format!("{tenant_marker} one")}]}),
        json!({"resourceType": "Patient", "id": "p2", "name": [{"text": format!("{tenant_marker} two")}]}),
        obs("p1-v1", "p1", "vital-signs", "2025-09-01T10:00:00Z"),
        obs("p1-v2", "p1", "vital-signs", "2025-09-02T10:00:00Z"),
        obs("p1-l1", "p1", "laboratory", "2025-09-03T10:00:00Z"),
        obs("p2-v1", "p2", "vital-signs", "2025-09-01T10:00:00Z"),
        obs("p2-l1", "p2", "laboratory", "2025-09-03T10:00:00Z"),
        json!({"resourceType": "Condition", "id": "p1-c1", "subject": {"reference": "Patient/p1"},
               "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]}}),
        json!({"resourceType": "Medication", "id": "m1", "code": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197361"}]}}),
        json!({"resourceType": "MedicationRequest", "id": "p1-mr1", "status": "active", "intent": "order",
               "subject": {"reference": "Patient/p1"}, "medicationReference": {"reference": "Medication/m1"}, "authoredOn": "2025-09-01"}),
        // Hostile data: a "medication" reference pointing at another patient's Observation.
        json!({"resourceType": "MedicationRequest", "id": "p1-mr2", "status": "active", "intent": "order",
               "subject": {"reference": "Patient/p1"}, "medicationReference": {"reference": "Observation/p2-l1"}, "authoredOn": "2025-09-02"}),
    ];
    let entries: Vec<Value> = entries.drain(..).map(|r| json!({"resource": r})).collect();
    json!({"resourceType": "Bundle", "type": "collection", "entry": entries})
}

fn setup() -> TestBox {
    let b = TestBox::new();
    for tenant in ["clinic-a", "clinic-b"] {
        let f = b.file(
            &format!("{tenant}.json"),
            dataset(tenant).to_string().as_bytes(),
        );
        b.import(tenant, &[&f]);
    }
    b
}

fn search(
    b: &TestBox,
    tenant: &str,
    patient: Option<&str>,
    scopes: &[&str],
    q: &str,
) -> Result<Value, String> {
    let mut args = vec!["--json", "fhir", "search", "--tenant", tenant];
    if let Some(p) = patient {
        args.extend(["--patient", p]);
    }
    for s in scopes {
        args.extend(["--scope", s]);
    }
    args.push(q);
    let out = b.run(&args);
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(stderr(&out))
    }
}

fn read(
    b: &TestBox,
    tenant: &str,
    patient: Option<&str>,
    scopes: &[&str],
    r: &str,
) -> Result<Value, String> {
    let mut args = vec!["fhir", "read", "--tenant", tenant];
    if let Some(p) = patient {
        args.extend(["--patient", p]);
    }
    for s in scopes {
        args.extend(["--scope", s]);
    }
    args.push(r);
    let out = b.run(&args);
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(stderr(&out))
    }
}

fn ids(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["fullUrl"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_patient_context_sees_only_that_patients_compartment() {
    let b = setup();
    let r = search(
        &b,
        "clinic-a",
        Some("p1"),
        &["patient/Observation.rs"],
        "Observation?_sort=date",
    )
    .unwrap();
    assert_eq!(
        ids(&r),
        [
            "Observation/p1-v1",
            "Observation/p1-v2",
            "Observation/p1-l1"
        ]
    );
    assert_eq!(r["total"], 3);
    // Another patient's resource by id: the same error as a missing one.
    let other = read(
        &b,
        "clinic-a",
        Some("p1"),
        &["patient/Observation.rs"],
        "Observation/p2-v1",
    )
    .unwrap_err();
    let missing = read(
        &b,
        "clinic-a",
        Some("p1"),
        &["patient/Observation.rs"],
        "Observation/nope",
    )
    .unwrap_err();
    assert!(
        other.contains("Observation/p2-v1: not found or not granted"),
        "{other}"
    );
    assert_eq!(other.replace("p2-v1", "X"), missing.replace("nope", "X"));
    // An _id search for it finds nothing.
    let r = search(
        &b,
        "clinic-a",
        Some("p1"),
        &["patient/Observation.rs"],
        "Observation?_id=p2-v1,p1-v1",
    )
    .unwrap();
    assert_eq!(ids(&r), ["Observation/p1-v1"]);
}

#[test]
fn a_patient_parameter_naming_another_patient_is_refused() {
    let b = setup();
    for q in ["Observation?patient=p2", "Observation?subject=Patient/p2"] {
        let e = search(&b, "clinic-a", Some("p1"), &["patient/Observation.rs"], q).unwrap_err();
        assert!(
            e.contains("names a patient other than the one in context"),
            "{q}: {e}"
        );
    }
    assert!(
        search(
            &b,
            "clinic-a",
            Some("p1"),
            &["patient/Observation.rs"],
            "Observation?patient=p1"
        )
        .is_ok()
    );
}

#[test]
fn tenants_never_see_each_other_even_with_identical_ids() {
    let b = setup();
    let a = read(&b, "clinic-a", Some("p1"), &[], "Patient/p1").unwrap();
    let bb = read(&b, "clinic-b", Some("p1"), &[], "Patient/p1").unwrap();
    assert_eq!(a["name"][0]["text"], "clinic-a one");
    assert_eq!(bb["name"][0]["text"], "clinic-b one");
    let r = search(&b, "clinic-a", None, &[], "Observation").unwrap();
    assert_eq!(r["total"], 5, "only clinic-a's five observations");
    let none = read(&b, "clinic-c", None, &[], "Patient/p1").unwrap_err();
    assert!(
        none.contains("Patient/p1: not found or not granted"),
        "{none}"
    );
}

#[test]
fn an_ungranted_type_is_refused_the_same_with_or_without_data() {
    let b = setup();
    let with_data = search(
        &b,
        "clinic-a",
        Some("p1"),
        &["patient/Observation.rs"],
        "Condition",
    )
    .unwrap_err();
    let without = search(
        &b,
        "clinic-a",
        Some("p2"),
        &["patient/Observation.rs"],
        "Condition",
    )
    .unwrap_err();
    assert!(with_data.contains("Condition: not granted"), "{with_data}");
    assert_eq!(with_data, without);
    let e = read(
        &b,
        "clinic-a",
        Some("p1"),
        &["patient/Observation.rs"],
        "Condition/p1-c1",
    )
    .unwrap_err();
    assert!(
        e.contains("Condition/p1-c1: not found or not granted"),
        "{e}"
    );
    // Read-only scope does not allow search, and search-only does not allow read.
    assert!(
        search(
            &b,
            "clinic-a",
            Some("p1"),
            &["patient/Condition.r"],
            "Condition"
        )
        .unwrap_err()
        .contains("not granted")
    );
    assert!(
        read(
            &b,
            "clinic-a",
            Some("p1"),
            &["patient/Condition.s"],
            "Condition/p1-c1"
        )
        .is_err()
    );
    assert!(
        read(
            &b,
            "clinic-a",
            Some("p1"),
            &["patient/Condition.r"],
            "Condition/p1-c1"
        )
        .is_ok()
    );
}

#[test]
fn an_ungranted_category_is_filtered_inside_the_query_and_counts() {
    let b = setup();
    let vitals_only = format!("patient/Observation.rs?category={VITALS}");
    let r = search(&b, "clinic-a", Some("p1"), &[&vitals_only], "Observation").unwrap();
    assert_eq!(ids(&r), ["Observation/p1-v1", "Observation/p1-v2"]);
    assert_eq!(r["total"], 2, "total must not count the lab");
    let r = search(
        &b,
        "clinic-a",
        Some("p1"),
        &[&vitals_only],
        "Observation?category=laboratory",
    )
    .unwrap();
    assert_eq!(r["total"], 0);
    // A query condition the scope implies (the scope's system|code is one
    // of its alternatives) gives the rows of the scope alone.
    for q in [
        "Observation?category=vital-signs",
        "Observation?category=laboratory,vital-signs",
        "Observation?category=http://terminology.hl7.org/CodeSystem/observation-category|",
    ] {
        let r = search(&b, "clinic-a", Some("p1"), &[&vitals_only], q).unwrap();
        assert_eq!(ids(&r), ["Observation/p1-v1", "Observation/p1-v2"], "{q}");
        assert_eq!(r["total"], 2, "{q}");
    }
    let e = read(
        &b,
        "clinic-a",
        Some("p1"),
        &[&vitals_only],
        "Observation/p1-l1",
    )
    .unwrap_err();
    assert!(e.contains("not found or not granted"), "{e}");
    // Paging keeps to the grant: page size 1, total 2, a next link.
    let r = search(
        &b,
        "clinic-a",
        Some("p1"),
        &[&vitals_only],
        "Observation?_count=1&_sort=-date",
    )
    .unwrap();
    assert_eq!(ids(&r), ["Observation/p1-v2"]);
    assert_eq!(r["link"][1]["relation"], "next");
    let next = r["link"][1]["url"].as_str().unwrap();
    let r = search(&b, "clinic-a", Some("p1"), &[&vitals_only], next).unwrap();
    assert_eq!(ids(&r), ["Observation/p1-v1"]);
    // Two scopes OR together.
    let labs = "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory";
    let r = search(
        &b,
        "clinic-a",
        Some("p1"),
        &[&vitals_only, labs],
        "Observation",
    )
    .unwrap();
    assert_eq!(r["total"], 3);
}

#[test]
fn include_is_authorised_on_its_own_and_never_crosses_a_patient() {
    let b = setup();
    let q = "MedicationRequest?_include=MedicationRequest:medication&_sort=authoredon";
    let both = [
        "patient/MedicationRequest.rs",
        "patient/Medication.r",
        "patient/Observation.rs",
    ];
    let r = search(&b, "clinic-a", Some("p1"), &both, q);
    // authoredon is not a _sort key (only date and _lastUpdated): refused by name.
    assert!(r.unwrap_err().contains("_sort=authoredon is not supported"));
    let q = "MedicationRequest?_include=MedicationRequest:medication&_sort=date";
    let r = search(&b, "clinic-a", Some("p1"), &both, q).unwrap();
    assert_eq!(
        ids(&r),
        [
            "MedicationRequest/p1-mr1",
            "MedicationRequest/p1-mr2",
            "Medication/m1"
        ]
    );
    assert_eq!(r["entry"][2]["search"]["mode"], "include");
    assert_eq!(r["total"], 2, "includes are not counted in total");
    // Without a Medication grant the include is left out.
    let r = search(
        &b,
        "clinic-a",
        Some("p1"),
        &["patient/MedicationRequest.rs"],
        q,
    )
    .unwrap();
    assert_eq!(
        ids(&r),
        ["MedicationRequest/p1-mr1", "MedicationRequest/p1-mr2"]
    );
}

#[test]
fn injection_strings_are_values_not_sql() {
    let b = setup();
    for q in [
        "Observation?code=' OR 1=1 --",
        "Observation?_id=x' UNION SELECT json FROM resources --",
        "Observation?category=vital-signs%27%20OR%20%271%27=%271",
        "Observation?code=http://x|'); DROP TABLE resources; --",
    ] {
        let r = search(&b, "clinic-a", Some("p1"), &["patient/Observation.rs"], q).unwrap();
        assert_eq!(r["total"], 0, "{q}");
    }
    let r = search(&b, "clinic-a", None, &[], "Observation").unwrap();
    assert_eq!(r["total"], 5, "tables intact");
}
