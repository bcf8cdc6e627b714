//! Unit tests of the synthetic data generator.

use super::*;
use std::collections::BTreeSet;

fn small() -> SynthSpec {
    SynthSpec {
        resources_per_patient: 120,
        patients_per_tenant: 3,
        ..SynthSpec::default()
    }
}

fn collect(spec: &SynthSpec) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    generate(spec, |t, r| out.push((t.to_owned(), r)));
    out
}

fn rtype(r: &Value) -> &str {
    r["resourceType"].as_str().unwrap()
}

fn compartment_field(rtype: &str) -> Option<&'static str> {
    match rtype {
        "AllergyIntolerance" | "Immunization" => Some("patient"),
        "Patient" | "Medication" => None,
        _ => Some("subject"),
    }
}

/// Resources of each patient, keyed by (tenant, patient id), in stream order; also checks
/// that each tenant's Medications come before its first Patient.
fn by_patient(all: &[(String, Value)]) -> BTreeMap<(String, String), Vec<Value>> {
    let mut map: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for (t, r) in all {
        match rtype(r) {
            "Medication" => assert!(map.keys().all(|k| k.0 != *t), "late Medication"),
            "Patient" => current = Some((t.clone(), r["id"].as_str().unwrap().to_owned())),
            _ => {}
        }
        if rtype(r) != "Medication" {
            let key = current.clone().expect("a Patient comes first");
            assert_eq!(key.0, *t);
            map.entry(key).or_default().push(r.clone());
        }
    }
    map
}

#[test]
fn deterministic_and_seed_sensitive() {
    let spec = small();
    let text = |s: &SynthSpec| {
        collect(s)
            .iter()
            .map(|(t, r)| format!("{t} {r}\n"))
            .collect::<String>()
    };
    assert_eq!(rfc3339(spec.start_unix), "2025-01-01T00:00:00Z");
    assert_eq!(text(&spec), text(&spec));
    assert_ne!(
        text(&spec),
        text(&SynthSpec {
            seed: 43,
            ..spec.clone()
        })
    );
}

#[test]
fn exact_counts_per_patient_and_mix() {
    for n in [0, 1, 2, 5, 11, 12, 13, 57, 200, 2500] {
        let spec = SynthSpec {
            resources_per_patient: n,
            patients_per_tenant: 2,
            ..SynthSpec::default()
        };
        let all = collect(&spec);
        let meds = all.iter().filter(|(_, r)| rtype(r) == "Medication").count();
        assert_eq!(meds, MEDS.len() * spec.tenants.len());
        let patients = by_patient(&all);
        assert_eq!(patients.len(), if n == 0 { 0 } else { 4 });
        for rs in patients.values() {
            assert_eq!(rs.len(), n);
            assert_eq!(rtype(&rs[0]), "Patient");
            let kinds: BTreeSet<String> = rs
                .iter()
                .map(|r| match rtype(r) {
                    "Observation" => format!(
                        "Observation/{}",
                        r["category"][0]["coding"][0]["code"].as_str().unwrap()
                    ),
                    t => t.to_owned(),
                })
                .collect();
            if n >= 12 {
                assert_eq!(kinds.len(), 12, "n={n}: {kinds:?}");
            }
        }
    }
    let p = plan(2500);
    assert_eq!(p.iter().sum::<usize>(), 2499);
    assert_eq!(p, [84, 56, 1494, 498, 84, 84, 56, 29, 29, 29, 56]);
}

#[test]
fn compartment_references_and_times() {
    let spec = small();
    let (lo, hi) = (
        rfc3339(spec.start_unix),
        rfc3339(spec.start_unix + i64::from(spec.days) * DAY - 1),
    );
    for ((_, pid), rs) in by_patient(&collect(&spec)) {
        for r in &rs {
            let id = r["id"].as_str().unwrap();
            assert!(id == pid || id.starts_with(&format!("{pid}-")), "{id}");
            if let Some(field) = compartment_field(rtype(r)) {
                assert_eq!(
                    r[field],
                    json!({"reference": format!("Patient/{pid}")}),
                    "{r}"
                );
            }
            let updated = r["meta"]["lastUpdated"].as_str().unwrap();
            assert!(
                updated.ends_with('Z') && updated.len() == 20 && *updated >= *lo && *updated <= *hi,
                "{updated}"
            );
            for key in [
                "effectiveDateTime",
                "onsetDateTime",
                "recordedDate",
                "abatementDateTime",
                "authoredOn",
                "occurrenceDateTime",
                "performedDateTime",
                "date",
                "issued",
            ] {
                if let Some(t) = r[key].as_str() {
                    assert!(*t >= *lo && t <= updated, "{key} {t} > {updated} in {r}");
                }
            }
            for key in ["period", "performedPeriod"] {
                if let Some(end) = r[key]["end"].as_str() {
                    assert!(r[key]["start"].as_str().unwrap() <= end && end <= updated);
                }
            }
        }
    }
}

#[test]
fn references_resolve() {
    let all = collect(&SynthSpec {
        resources_per_patient: 400,
        ..small()
    });
    let mut known: BTreeSet<(String, String)> = BTreeSet::new();
    let (mut med_refs, mut result_refs) = (0, 0);
    for (t, r) in &all {
        if rtype(r) == "Patient" {
            known.retain(|(tenant, target)| tenant != t || target.starts_with("Medication/"));
        }
        known.insert((
            t.clone(),
            format!("{}/{}", rtype(r), r["id"].as_str().unwrap()),
        ));
        if let Some(reference) = r["medicationReference"]["reference"].as_str() {
            assert!(
                known.contains(&(t.clone(), reference.to_owned())),
                "{reference}"
            );
            med_refs += 1;
        }
        for res in r["result"].as_array().into_iter().flatten() {
            let target = res["reference"].as_str().unwrap();
            assert!(known.contains(&(t.clone(), target.to_owned())), "{target}");
            result_refs += 1;
        }
    }
    assert!(med_refs > 0 && result_refs > 0);
}

#[test]
fn ids_valid_and_unique_per_tenant_and_type() {
    let all = collect(&small());
    let mut seen = BTreeSet::new();
    for (t, r) in &all {
        let id = r["id"].as_str().unwrap();
        assert!(!id.is_empty() && id.len() <= 64);
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'),
            "{id}"
        );
        assert!(
            seen.insert((t.clone(), rtype(r).to_owned(), id.to_owned())),
            "duplicate {t} {id}"
        );
    }
    let ids = |tenant: &str| {
        all.iter()
            .filter(|(t, _)| t == tenant)
            .map(|(_, r)| r["id"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids("clinic-a"), ids("clinic-b"));
}

#[test]
fn write_ndjson_roundtrip() {
    let spec = small();
    let dir = std::env::temp_dir().join(format!("clinicbox-synth-{}", std::process::id()));
    let counts = write_ndjson(&spec, &dir).unwrap();
    let mut expected: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    generate(&spec, |t, r| {
        *expected
            .entry(t.to_owned())
            .or_default()
            .entry(rtype(&r).to_owned())
            .or_default() += 1
    });
    assert_eq!(counts, expected);
    for (tenant, types) in &counts {
        for (ty, &n) in types {
            let text =
                std::fs::read_to_string(dir.join(tenant).join(format!("{ty}.ndjson"))).unwrap();
            assert!(text.ends_with('\n'));
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines.len() as u64, n);
            for line in lines {
                let v: Value = serde_json::from_str(line).unwrap();
                assert_eq!(rtype(&v), ty);
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    let bad = SynthSpec {
        tenants: vec!["../x".into()],
        ..spec
    };
    assert!(write_ndjson(&bad, &dir).is_err());
}

#[test]
fn vitals_are_mostly_normal_with_some_abnormal() {
    let spec = SynthSpec {
        resources_per_patient: 2500,
        patients_per_tenant: 1,
        ..small()
    };
    let (mut vitals, mut flagged, mut alert) = (0, 0, 0);
    generate(&spec, |_, r| {
        if r["category"][0]["coding"][0]["code"] == "vital-signs" {
            vitals += 1;
            flagged += usize::from(r.get("interpretation").is_some());
            alert += usize::from(r["valueCodeableConcept"]["coding"][0]["code"] == "A");
        }
    });
    assert_eq!(vitals, 2 * 1494);
    assert!(
        flagged * 100 > vitals * 2 && flagged * 100 < vitals * 12,
        "{flagged}/{vitals}"
    );
    assert!(alert * 6 * 100 > vitals * 85, "{alert}");
}
