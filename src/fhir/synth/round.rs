//! One bedside monitor reading: the six NEWS2 vital signs of one patient at
//! one time, as a FHIR `collection` Bundle of Observations, the shape a
//! device POSTs to `/fhir/Bundle`. Used by the demo, the tests and the
//! ingest benchmark.

use serde_json::{Value, json};

/// The values of one reading.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    /// Respiratory rate, /min.
    pub rr: f64,
    /// SpO2, %.
    pub spo2: f64,
    /// Systolic blood pressure, mm[Hg].
    pub sbp: f64,
    /// Pulse, /min.
    pub hr: f64,
    /// Temperature, Cel.
    pub temp: f64,
    /// ACVPU: `A`, `C`, `V`, `P` or `U`.
    pub acvpu: &'static str,
}

impl Reading {
    /// A normal reading (NEWS2 0).
    pub const NORMAL: Reading = Reading {
        rr: 16.0,
        spo2: 97.0,
        sbp: 120.0,
        hr: 70.0,
        temp: 37.0,
        acvpu: "A",
    };
}

fn loinc(code: &str, display: &str) -> Value {
    json!({"coding": [{"system": "http://loinc.org", "code": code, "display": display}]})
}

/// The reading as a Bundle for `patient` at `when` (RFC 3339). Ids are
/// left out: the box assigns them, as for a FHIR create.
pub fn bundle(patient: &str, when: &str, r: &Reading) -> Value {
    let obs = |code: Value, value: (&str, Value)| {
        let mut o = json!({
            "resourceType": "Observation", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": code,
            "subject": {"reference": format!("Patient/{patient}")},
            "effectiveDateTime": when,
        });
        o[value.0] = value.1;
        json!({"resource": o})
    };
    let qty = |v: f64, unit: &str| {
        (
            "valueQuantity",
            json!({"value": v, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}),
        )
    };
    let entries = vec![
        obs(loinc("9279-1", "Respiratory rate"), qty(r.rr, "/min")),
        obs(
            loinc("59408-5", "Oxygen saturation by pulse oximetry"),
            qty(r.spo2, "%"),
        ),
        obs(
            loinc("8480-6", "Systolic blood pressure"),
            qty(r.sbp, "mm[Hg]"),
        ),
        obs(loinc("8867-4", "Heart rate"), qty(r.hr, "/min")),
        obs(loinc("8310-5", "Body temperature"), qty(r.temp, "Cel")),
        obs(
            loinc("67775-7", "Level of responsiveness"),
            (
                "valueCodeableConcept",
                json!({"coding": [{"system": "urn:clinicbox:acvpu", "code": r.acvpu}]}),
            ),
        ),
    ];
    json!({"resourceType": "Bundle", "type": "collection", "entry": entries})
}
