//! Which FHIR R4 resource types are indexed, their search parameters (the
//! subset clinicbox supports), their Patient-compartment fields, and the
//! extraction of index values from a resource at write time.
//!
//! Sources: the R4 (4.0.1) search parameter registry and
//! `compartmentdefinition-patient`. Invariant: a parameter is searchable
//! only if it is listed here; the search parser refuses every other name.

use serde_json::Value;

use super::date::{self, DateRange};

/// The kind of a search parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `system|code` tokens from code, Coding or CodeableConcept values.
    Token,
    /// Date ranges from date, dateTime, instant or Period values.
    Date,
}

/// One search parameter of one type.
#[derive(Debug)]
pub struct ParamDef {
    /// The FHIR search parameter name.
    pub name: &'static str,
    /// Stable small integer stored in index rows.
    pub code: i64,
    /// Token or date.
    pub kind: Kind,
    /// Element names (choice types spelled out) holding the values.
    pub paths: &'static [&'static str],
    /// Code system of a primitive `code` element (bound to a required value set).
    pub implicit_system: Option<&'static str>,
}

/// One indexed resource type.
#[derive(Debug)]
pub struct TypeDef {
    /// The resource type name.
    pub name: &'static str,
    /// Stable small integer stored in index rows.
    pub code: i64,
    /// Supported search parameters (besides `_id` and `_lastUpdated`).
    pub params: &'static [ParamDef],
    /// Reference elements that put a resource in a patient's compartment.
    pub compartment: &'static [&'static str],
    /// The date parameter `_sort=date` orders by (and the sort key stored).
    pub sort_param: Option<&'static str>,
}

macro_rules! token {
    ($name:literal, $code:literal, [$($p:literal),*]) => {
        ParamDef { name: $name, code: $code, kind: Kind::Token, paths: &[$($p),*], implicit_system: None }
    };
    ($name:literal, $code:literal, [$($p:literal),*], $sys:literal) => {
        ParamDef { name: $name, code: $code, kind: Kind::Token, paths: &[$($p),*], implicit_system: Some($sys) }
    };
}
macro_rules! date {
    ($name:literal, $code:literal, [$($p:literal),*]) => {
        ParamDef { name: $name, code: $code, kind: Kind::Date, paths: &[$($p),*], implicit_system: None }
    };
}

/// Parameter codes (stable: they are stored in `fhir.db`).
pub mod codes {
    /// `code`
    pub const CODE: i64 = 1;
    /// `category`
    pub const CATEGORY: i64 = 2;
    /// `status`
    pub const STATUS: i64 = 3;
    /// `clinical-status`
    pub const CLINICAL_STATUS: i64 = 4;
    /// `intent`
    pub const INTENT: i64 = 5;
    /// `vaccine-code`
    pub const VACCINE_CODE: i64 = 6;
    /// `type`
    pub const TYPE: i64 = 7;
    /// `date`
    pub const DATE: i64 = 20;
    /// `authoredon`
    pub const AUTHOREDON: i64 = 21;
    /// `onset-date`
    pub const ONSET_DATE: i64 = 22;
    /// `recorded-date`
    pub const RECORDED_DATE: i64 = 23;
}

/// Observation's type code (its `$lastn` table, `obs_lastn`, is only for it).
pub const OBSERVATION: i64 = 2;

/// Every indexed type. Codes are stable (stored in `fhir.db`).
pub static TYPES: &[TypeDef] = &[
    TypeDef {
        name: "Patient",
        code: 1,
        params: &[],
        compartment: &[],
        sort_param: None,
    },
    TypeDef {
        name: "Observation",
        code: 2,
        params: &[
            token!("code", 1, ["code"]),
            token!("category", 2, ["category"]),
            token!(
                "status",
                3,
                ["status"],
                "http://hl7.org/fhir/observation-status"
            ),
            date!(
                "date",
                20,
                [
                    "effectiveDateTime",
                    "effectivePeriod",
                    "effectiveInstant",
                    "effectiveTiming"
                ]
            ),
        ],
        compartment: &["subject", "performer"],
        sort_param: Some("date"),
    },
    TypeDef {
        name: "Condition",
        code: 3,
        params: &[
            token!("code", 1, ["code"]),
            token!("category", 2, ["category"]),
            token!("clinical-status", 4, ["clinicalStatus"]),
            date!("onset-date", 22, ["onsetDateTime", "onsetPeriod"]),
            date!("recorded-date", 23, ["recordedDate"]),
        ],
        compartment: &["subject", "asserter"],
        sort_param: Some("recorded-date"),
    },
    TypeDef {
        name: "MedicationRequest",
        code: 4,
        params: &[
            token!("code", 1, ["medicationCodeableConcept"]),
            token!("category", 2, ["category"]),
            token!(
                "status",
                3,
                ["status"],
                "http://hl7.org/fhir/CodeSystem/medicationrequest-status"
            ),
            token!(
                "intent",
                5,
                ["intent"],
                "http://hl7.org/fhir/CodeSystem/medicationrequest-intent"
            ),
            date!("authoredon", 21, ["authoredOn"]),
        ],
        compartment: &["subject"],
        sort_param: Some("authoredon"),
    },
    TypeDef {
        name: "MedicationStatement",
        code: 5,
        params: &[
            token!("code", 1, ["medicationCodeableConcept"]),
            token!("category", 2, ["category"]),
            token!(
                "status",
                3,
                ["status"],
                "http://hl7.org/fhir/CodeSystem/medication-statement-status"
            ),
            date!("date", 20, ["effectiveDateTime", "effectivePeriod"]),
        ],
        compartment: &["subject"],
        sort_param: Some("date"),
    },
    TypeDef {
        name: "AllergyIntolerance",
        code: 6,
        params: &[
            token!("code", 1, ["code"]),
            token!(
                "category",
                2,
                ["category"],
                "http://hl7.org/fhir/allergy-intolerance-category"
            ),
            token!("clinical-status", 4, ["clinicalStatus"]),
            date!("date", 20, ["recordedDate"]),
            date!("onset-date", 22, ["onsetDateTime", "onsetPeriod"]),
        ],
        compartment: &["patient", "recorder", "asserter"],
        sort_param: Some("date"),
    },
    TypeDef {
        name: "Encounter",
        code: 7,
        params: &[
            token!(
                "status",
                3,
                ["status"],
                "http://hl7.org/fhir/encounter-status"
            ),
            token!("type", 7, ["type"]),
            date!("date", 20, ["period"]),
        ],
        compartment: &["subject"],
        sort_param: Some("date"),
    },
    TypeDef {
        name: "Immunization",
        code: 8,
        params: &[
            token!("status", 3, ["status"], "http://hl7.org/fhir/event-status"),
            token!("vaccine-code", 6, ["vaccineCode"]),
            date!("date", 20, ["occurrenceDateTime"]),
        ],
        compartment: &["patient"],
        sort_param: Some("date"),
    },
    TypeDef {
        name: "Procedure",
        code: 9,
        params: &[
            token!("code", 1, ["code"]),
            token!("category", 2, ["category"]),
            token!("status", 3, ["status"], "http://hl7.org/fhir/event-status"),
            date!("date", 20, ["performedDateTime", "performedPeriod"]),
        ],
        compartment: &["subject", "performer"],
        sort_param: Some("date"),
    },
    TypeDef {
        name: "DiagnosticReport",
        code: 10,
        params: &[
            token!("code", 1, ["code"]),
            token!("category", 2, ["category"]),
            token!(
                "status",
                3,
                ["status"],
                "http://hl7.org/fhir/diagnostic-report-status"
            ),
            date!("date", 20, ["effectiveDateTime", "effectivePeriod"]),
        ],
        compartment: &["subject"],
        sort_param: Some("date"),
    },
    TypeDef {
        name: "DocumentReference",
        code: 11,
        params: &[
            token!("type", 7, ["type"]),
            token!("category", 2, ["category"]),
            token!(
                "status",
                3,
                ["status"],
                "http://hl7.org/fhir/document-reference-status"
            ),
            date!("date", 20, ["date"]),
        ],
        compartment: &["subject", "author"],
        sort_param: Some("date"),
    },
    TypeDef {
        name: "Medication",
        code: 12,
        params: &[token!("code", 1, ["code"])],
        compartment: &[],
        sort_param: None,
    },
];

/// The definition of `name`, if it is an indexed type.
pub fn type_def(name: &str) -> Option<&'static TypeDef> {
    TYPES.iter().find(|t| t.name == name)
}

impl TypeDef {
    /// The search parameter `name` of this type.
    pub fn param(&self, name: &str) -> Option<&'static ParamDef> {
        self.params.iter().find(|p| p.name == name)
    }

    /// True if resources of this type can be in a patient's compartment.
    pub fn in_patient_compartment(&self) -> bool {
        self.name == "Patient" || !self.compartment.is_empty()
    }
}

/// Index values extracted from one resource.
#[derive(Debug, Default, PartialEq)]
pub struct Extracted {
    /// (param code, system, code).
    pub tokens: Vec<(i64, Option<String>, String)>,
    /// (param code, range).
    pub dates: Vec<(i64, DateRange)>,
    /// Patient ids whose compartment holds the resource.
    pub patients: Vec<String>,
    /// The sort key: low bound of the sort parameter's first value.
    pub sort_ms: Option<i64>,
    /// Reference targets used by `_include` (`MedicationRequest:medication`).
    pub medication_ref: Option<String>,
}

/// Extracts index values from `res` (of type `def`, id `id`).
pub fn extract(def: &TypeDef, id: &str, res: &Value) -> Extracted {
    let mut out = Extracted::default();
    for p in def.params {
        for path in p.paths {
            for v in values(res, path) {
                match p.kind {
                    Kind::Token => tokens(v, p, &mut out.tokens),
                    Kind::Date => {
                        if let Some(r) = date_value(v) {
                            out.dates.push((p.code, r));
                        }
                    }
                }
            }
        }
    }
    out.tokens.sort();
    out.tokens.dedup();
    if let Some(sp) = def.sort_param.and_then(|n| def.param(n)) {
        out.sort_ms = out
            .dates
            .iter()
            .filter(|(c, _)| *c == sp.code)
            .map(|(_, r)| r.low)
            .min();
    }
    if def.name == "Patient" {
        out.patients.push(id.to_owned());
    }
    for field in def.compartment {
        for v in values(res, field) {
            if let Some(pid) = v
                .get("reference")
                .and_then(Value::as_str)
                .and_then(patient_id)
            {
                out.patients.push(pid.to_owned());
            }
        }
    }
    out.patients.sort();
    out.patients.dedup();
    if def.name == "MedicationRequest" {
        out.medication_ref = res
            .pointer("/medicationReference/reference")
            .and_then(Value::as_str)
            .map(str::to_owned);
    }
    out
}

/// The id in a `Patient/<id>` reference (relative, or absolute ending so).
pub fn patient_id(reference: &str) -> Option<&str> {
    let mut parts = reference.rsplit('/');
    let id = parts.next()?;
    (parts.next() == Some("Patient") && super::is_valid_id(id)).then_some(id)
}

/// The values at element `name` of `res`: each array item, or the value.
fn values<'a>(res: &'a Value, name: &str) -> Vec<&'a Value> {
    match res.get(name) {
        Some(Value::Array(items)) => items.iter().collect(),
        Some(v) => vec![v],
        None => vec![],
    }
}

fn tokens(v: &Value, p: &ParamDef, out: &mut Vec<(i64, Option<String>, String)>) {
    match v {
        Value::String(code) => {
            out.push((p.code, p.implicit_system.map(str::to_owned), code.clone()))
        }
        Value::Object(o) => {
            if let Some(Value::Array(codings)) = o.get("coding") {
                for c in codings {
                    coding(c, p.code, out);
                }
            } else {
                coding(v, p.code, out);
            }
        }
        _ => {}
    }
}

fn coding(c: &Value, param: i64, out: &mut Vec<(i64, Option<String>, String)>) {
    if let Some(code) = c.get("code").and_then(Value::as_str) {
        let system = c.get("system").and_then(Value::as_str).map(str::to_owned);
        out.push((param, system, code.to_owned()));
    }
}

fn date_value(v: &Value) -> Option<DateRange> {
    match v {
        Value::String(s) => date::parse(s).ok(),
        Value::Object(o) => {
            // Period: missing start/end are open bounds.
            let start = o
                .get("start")
                .and_then(Value::as_str)
                .and_then(|s| date::parse(s).ok());
            let end = o
                .get("end")
                .and_then(Value::as_str)
                .and_then(|s| date::parse(s).ok());
            if start.is_none() && end.is_none() {
                // Timing: its first event, if any.
                return o
                    .get("event")
                    .and_then(Value::as_array)
                    .and_then(|e| e.first())
                    .and_then(Value::as_str)
                    .and_then(|s| date::parse(s).ok());
            }
            Some(DateRange {
                low: start.map_or(i64::MIN, |r| r.low),
                high: end.map_or(i64::MAX, |r| r.high),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn codes_are_unique() {
        let mut t: Vec<i64> = TYPES.iter().map(|t| t.code).collect();
        t.sort();
        t.dedup();
        assert_eq!(t.len(), TYPES.len());
        for ty in TYPES {
            for p in ty.params {
                let same: Vec<_> = TYPES
                    .iter()
                    .flat_map(|t| t.params)
                    .filter(|q| q.name == p.name)
                    .collect();
                assert!(
                    same.iter().all(|q| q.code == p.code && q.kind == p.kind),
                    "{}",
                    p.name
                );
            }
        }
    }

    #[test]
    fn extracts_tokens_dates_and_compartment() {
        let obs = json!({
            "resourceType": "Observation", "id": "o1", "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}, {"code": "hr"}]},
            "subject": {"reference": "Patient/p1"},
            "performer": [{"reference": "Practitioner/x"}, {"reference": "https://ehr.example/fhir/Patient/p2"}],
            "effectiveDateTime": "2025-09-14T10:00:00+02:00"
        });
        let e = extract(type_def("Observation").unwrap(), "o1", &obs);
        assert!(e.tokens.contains(&(
            codes::CODE,
            Some("http://loinc.org".into()),
            "8867-4".into()
        )));
        assert!(e.tokens.contains(&(codes::CODE, None, "hr".into())));
        assert!(e.tokens.contains(&(
            codes::STATUS,
            Some("http://hl7.org/fhir/observation-status".into()),
            "final".into()
        )));
        assert_eq!(e.patients, vec!["p1".to_string(), "p2".to_string()]);
        assert_eq!(e.dates.len(), 1);
        assert_eq!(e.sort_ms, Some(e.dates[0].1.low));
    }

    #[test]
    fn periods_have_open_ends() {
        let enc = json!({"resourceType": "Encounter", "period": {"start": "2025-09-14"}, "subject": {"reference": "Patient/p"}});
        let e = extract(type_def("Encounter").unwrap(), "e", &enc);
        assert_eq!(e.dates[0].1.high, i64::MAX);
    }

    #[test]
    fn patient_references() {
        assert_eq!(patient_id("Patient/abc"), Some("abc"));
        assert_eq!(patient_id("http://x/fhir/Patient/abc"), Some("abc"));
        assert_eq!(patient_id("Group/abc"), None);
        assert_eq!(patient_id("Patient/"), None);
    }
}
