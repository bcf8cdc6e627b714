//! JSON in, FHIR R4 `RiskAssessment` JSON out.
//!
//! `assess` is the whole `news2` behaviour as a pure function: it parses the
//! host's input, validates it field by field, scores it with
//! [`crate::score`], and renders the resource. `parse_latest_input` and
//! `assess_latest` are the same for `news2_latest`, with the vital signs
//! taken from a FHIR searchset bundle by [`crate::vitals`] and the
//! observations used listed in `RiskAssessment.basis`. Nothing here uses a
//! clock, randomness or host calls, so equal input gives byte-equal output.

use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::score::{self, Assessment, Consciousness, RiskBand, Spo2Scale, Vitals};
use crate::vitals;

/// Text of `RiskAssessment.method`.
pub const METHOD_TEXT: &str = "NEWS2 (Royal College of Physicians, 2017)";
/// Code system of the `method` coding (clinicbox-local).
pub const METHOD_SYSTEM: &str = "https://clinicbox.example/fhir/CodeSystem/risk-assessment-method";
/// HL7 risk-probability code system used for `qualitativeRisk`.
pub const RISK_PROBABILITY_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/risk-probability";
/// Code system carrying the exact NEWS2 band (clinicbox-local).
pub const NEWS2_RISK_SYSTEM: &str = "https://clinicbox.example/fhir/CodeSystem/news2-clinical-risk";
/// Prefix of every extension URL this plugin emits.
pub const EXTENSION_PREFIX: &str = "https://clinicbox.example/fhir/StructureDefinition/news2-";
/// `subject.display` when the input names no patient (`subject` is 1..1).
pub const UNIDENTIFIED_SUBJECT: &str = "unidentified patient";

/// One input field's JSON value, accepted whatever its type so that a wrongly
/// typed value is reported with its field name rather than by serde.
/// (A hand-written visitor instead of `serde_json::Value` keeps the generic
/// map machinery out of the wasm.)
enum Raw {
    /// A non-negative JSON integer.
    UInt(u64),
    /// Any other JSON number.
    Number(f64),
    Bool(bool),
    Str(String),
    /// An array or object (contents skipped).
    Other,
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(RawVisitor)
    }
}

struct RawVisitor;

impl<'de> Visitor<'de> for RawVisitor {
    type Value = Raw;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a json value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Raw, E> {
        Ok(Raw::Bool(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Raw, E> {
        Ok(Raw::UInt(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Raw, E> {
        // Only reached for negative integers; exactness is irrelevant as
        // every negative value is rejected by the range checks.
        Ok(Raw::Number(v as f64))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Raw, E> {
        Ok(Raw::Number(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Raw, E> {
        Ok(Raw::Str(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Raw, E> {
        Ok(Raw::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Raw::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Raw, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Raw::Other)
    }
}

/// The input document, field by field; `null` counts as absent.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a json object")]
struct RawInput {
    respiratory_rate: Option<Raw>,
    spo2: Option<Raw>,
    spo2_scale: Option<Raw>,
    on_oxygen: Option<Raw>,
    systolic_bp: Option<Raw>,
    pulse: Option<Raw>,
    consciousness: Option<Raw>,
    temperature: Option<Raw>,
    patient: Option<Raw>,
}

/// The `news2_latest` input document: an optional patient and SpO2 scale.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a json object")]
struct RawLatestInput {
    patient: Option<Raw>,
    spo2_scale: Option<Raw>,
}

/// Validated `news2_latest` input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestRequest {
    /// Asserted subject; checked against the observations' subject.
    pub patient: Option<String>,
    /// SpO2 scale to score with (scale 1 unless the input says 2).
    pub spo2_scale: Spo2Scale,
}

/// Validated input.
struct Input {
    vitals: Vitals,
    patient: Option<String>,
    /// References of the observations the vitals came from (may be empty).
    basis: Vec<String>,
}

fn number(field: &str, value: Option<Raw>) -> Result<f64, String> {
    match value {
        None => Err(format!("{field} is required")),
        Some(Raw::UInt(n)) => Ok(n as f64),
        Some(Raw::Number(n)) => Ok(n),
        Some(_) => Err(format!("{field} must be a number")),
    }
}

/// The optional `spo2_scale` field: 1 (the default) or 2.
fn spo2_scale(value: Option<Raw>) -> Result<Spo2Scale, String> {
    match value {
        None => Ok(Spo2Scale::Scale1),
        Some(Raw::UInt(n)) => Spo2Scale::from_number(n).ok_or_else(|| SPO2_SCALE_ERROR.into()),
        Some(_) => Err(SPO2_SCALE_ERROR.into()),
    }
}

const SPO2_SCALE_ERROR: &str = "spo2_scale must be 1 or 2";

/// The optional `patient` field: a non-empty reference without whitespace.
fn patient(value: Option<Raw>) -> Result<Option<String>, String> {
    match value {
        None => Ok(None),
        Some(Raw::Str(s)) => {
            if s.is_empty() {
                return Err("patient must not be empty".into());
            }
            if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err("patient must be a reference without whitespace".into());
            }
            Ok(Some(s))
        }
        Some(_) => Err("patient must be a string reference".into()),
    }
}

const CONSCIOUSNESS_ERROR: &str = r#"consciousness must be one of "A", "C", "V", "P", "U""#;

fn parse_input(input_json: &str) -> Result<Input, String> {
    let raw: RawInput =
        serde_json::from_str(input_json).map_err(|e| format!("invalid input: {e}"))?;

    let respiratory_rate = number("respiratory_rate", raw.respiratory_rate)?;
    let spo2 = number("spo2", raw.spo2)?;
    let spo2_scale = spo2_scale(raw.spo2_scale)?;
    let on_oxygen = match raw.on_oxygen {
        None => return Err("on_oxygen is required".into()),
        Some(Raw::Bool(b)) => b,
        Some(_) => return Err("on_oxygen must be true or false".into()),
    };
    let systolic_bp = number("systolic_bp", raw.systolic_bp)?;
    let pulse = number("pulse", raw.pulse)?;
    let consciousness = match raw.consciousness {
        None => return Err("consciousness is required".into()),
        Some(Raw::Str(code)) => Consciousness::from_code(&code).ok_or(CONSCIOUSNESS_ERROR)?,
        Some(_) => return Err(CONSCIOUSNESS_ERROR.into()),
    };
    let temperature = number("temperature", raw.temperature)?;
    let patient = patient(raw.patient)?;

    Ok(Input {
        vitals: Vitals {
            respiratory_rate,
            spo2,
            spo2_scale,
            on_oxygen,
            systolic_bp,
            pulse,
            consciousness,
            temperature,
        },
        patient,
        basis: Vec::new(),
    })
}

#[derive(Serialize)]
struct Coding {
    system: &'static str,
    code: &'static str,
    display: &'static str,
}

#[derive(Serialize)]
struct CodeableConcept {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    coding: Vec<Coding>,
    text: &'static str,
}

#[derive(Serialize)]
struct Reference {
    #[serde(skip_serializing_if = "Option::is_none")]
    reference: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    display: Option<&'static str>,
}

#[derive(Serialize)]
struct Extension {
    url: String,
    #[serde(rename = "valueInteger")]
    value_integer: u8,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Prediction {
    outcome: CodeableConcept,
    qualitative_risk: CodeableConcept,
}

#[derive(Serialize)]
struct Annotation {
    text: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RiskAssessment {
    resource_type: &'static str,
    extension: Vec<Extension>,
    status: &'static str,
    method: CodeableConcept,
    subject: Reference,
    /// Omitted when empty, so `news2` output has no `basis`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    basis: Vec<Reference>,
    prediction: [Prediction; 1],
    note: [Annotation; 1],
}

/// `(code, display)` in the HL7 risk-probability code system for a band.
///
/// That code system has no "low-medium", so both NEWS2 middle bands map to
/// `moderate`: a red score already calls for an urgent clinical review. The
/// exact band stays in `text` and in a second, clinicbox-local coding.
pub fn risk_probability(band: RiskBand) -> (&'static str, &'static str) {
    match band {
        RiskBand::Low => ("low", "Low likelihood"),
        RiskBand::LowMedium | RiskBand::Medium => ("moderate", "Moderate likelihood"),
        RiskBand::High => ("high", "High likelihood"),
    }
}

fn news2_risk_display(band: RiskBand) -> &'static str {
    match band {
        RiskBand::Low => "Low clinical risk",
        RiskBand::LowMedium => "Low-medium clinical risk (single parameter scoring 3)",
        RiskBand::Medium => "Medium clinical risk",
        RiskBand::High => "High clinical risk",
    }
}

/// Extension slug for each named sub-score of [`score::SubScores::named`].
fn extension_slug(name: &str) -> &'static str {
    match name {
        "respiratory_rate" => "respiratory-rate",
        "spo2" => "spo2",
        "air_or_oxygen" => "air-or-oxygen",
        "systolic_bp" => "systolic-bp",
        "pulse" => "pulse",
        "consciousness" => "consciousness",
        _ => "temperature",
    }
}

fn note_text(vitals: &Vitals, a: &Assessment) -> String {
    let s = &a.sub_scores;
    format!(
        "NEWS2 aggregate score {} ({} clinical risk). Sub-scores: respiratory_rate {}, \
         spo2 {} (scale {}), air_or_oxygen {} ({}), systolic_bp {}, pulse {}, \
         consciousness {} ({}), temperature {}.",
        a.aggregate,
        a.risk.as_str(),
        s.respiratory_rate,
        s.spo2,
        vitals.spo2_scale.number(),
        s.air_or_oxygen,
        if vitals.on_oxygen { "oxygen" } else { "air" },
        s.systolic_bp,
        s.pulse,
        s.consciousness,
        vitals.consciousness.code(),
        s.temperature,
    )
}

fn render(input: Input, a: &Assessment) -> Result<String, String> {
    let ext = |slug: &str, value: u8| Extension {
        url: format!("{EXTENSION_PREFIX}{slug}"),
        value_integer: value,
    };
    let mut extension = vec![ext("aggregate-score", a.aggregate)];
    extension.extend(
        a.sub_scores
            .named()
            .iter()
            .map(|&(name, value)| ext(extension_slug(name), value)),
    );
    extension.push(ext("spo2-scale", input.vitals.spo2_scale.number()));

    let (risk_code, risk_display) = risk_probability(a.risk);
    let band = a.risk.as_str();
    let subject = match input.patient {
        Some(reference) => Reference {
            reference: Some(reference),
            display: None,
        },
        None => Reference {
            reference: None,
            display: Some(UNIDENTIFIED_SUBJECT),
        },
    };

    let resource = RiskAssessment {
        resource_type: "RiskAssessment",
        extension,
        status: "final",
        method: CodeableConcept {
            coding: vec![Coding {
                system: METHOD_SYSTEM,
                code: "news2",
                display: METHOD_TEXT,
            }],
            text: METHOD_TEXT,
        },
        subject,
        basis: input
            .basis
            .into_iter()
            .map(|r| Reference {
                reference: Some(r),
                display: None,
            })
            .collect(),
        prediction: [Prediction {
            outcome: CodeableConcept {
                coding: Vec::new(),
                text: band,
            },
            qualitative_risk: CodeableConcept {
                coding: vec![
                    Coding {
                        system: RISK_PROBABILITY_SYSTEM,
                        code: risk_code,
                        display: risk_display,
                    },
                    Coding {
                        system: NEWS2_RISK_SYSTEM,
                        code: band,
                        display: news2_risk_display(a.risk),
                    },
                ],
                text: band,
            },
        }],
        note: [Annotation {
            text: note_text(&input.vitals, a),
        }],
    };
    serde_json::to_string(&resource).map_err(|e| format!("output serialization failed: {e}"))
}

/// Scores one NEWS2 input document and returns a FHIR R4 `RiskAssessment`
/// as compact JSON, or a lowercase error message naming the offending field.
pub fn assess(input_json: &str) -> Result<String, String> {
    let input = parse_input(input_json)?;
    let assessment = score::score(&input.vitals).map_err(|e| e.to_string())?;
    render(input, &assessment)
}

/// Validates the `news2_latest` input: empty (or whitespace-only) text,
/// `{}`, or an object with the optional fields `patient`
/// (`"Patient/123"`) and `spo2_scale` (1 or 2, default 1), validated as in
/// `news2`.
///
/// The host searches the calling patient's compartment whatever this says;
/// a given patient is only checked against the observations' subject.
pub fn parse_latest_input(input_json: &str) -> Result<LatestRequest, String> {
    if input_json.trim().is_empty() {
        return Ok(LatestRequest {
            patient: None,
            spo2_scale: Spo2Scale::Scale1,
        });
    }
    let raw: RawLatestInput =
        serde_json::from_str(input_json).map_err(|e| format!("invalid input: {e}"))?;
    Ok(LatestRequest {
        patient: patient(raw.patient)?,
        spo2_scale: spo2_scale(raw.spo2_scale)?,
    })
}

/// Scores the newest vital signs in `searchset_json` (the host's answer to
/// [`vitals::SEARCH_QUERY`]) and returns a FHIR R4 `RiskAssessment` whose
/// `basis` references the observations used, or a lowercase error message.
///
/// `request` comes from [`parse_latest_input`]. Its patient becomes the
/// subject and must match the observations' subject; without it the
/// subject is the first observation's `subject.reference`.
pub fn assess_latest(request: &LatestRequest, searchset_json: &str) -> Result<String, String> {
    let latest = vitals::from_searchset(searchset_json)?;
    let patient = match (request.patient.as_deref(), latest.patient) {
        (Some(asked), Some(found)) if !vitals::same_reference(asked, &found) => {
            return Err(format!(
                "the observations are for {found}, not for the requested patient {asked}"
            ));
        }
        (Some(asked), _) => Some(asked.to_owned()),
        (None, found) => found,
    };
    let input = Input {
        vitals: Vitals {
            spo2_scale: request.spo2_scale,
            ..latest.vitals
        },
        patient,
        basis: latest.basis,
    };
    let assessment = score::score(&input.vitals).map_err(|e| e.to_string())?;
    render(input, &assessment)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const EXAMPLE: &str = r#"{"respiratory_rate": 18, "spo2": 97, "spo2_scale": 1, "on_oxygen": false, "systolic_bp": 120, "pulse": 80, "consciousness": "A", "temperature": 37.0, "patient": "Patient/123"}"#;

    fn run(input: &str) -> Value {
        let out = assess(input).expect("valid input");
        serde_json::from_str(&out).expect("output is json")
    }

    /// The example input with one field replaced (or removed when `None`).
    fn with(field: &str, value: Option<Value>) -> String {
        let mut v: Value = serde_json::from_str(EXAMPLE).expect("example is json");
        let obj = v.as_object_mut().expect("example is an object");
        match value {
            Some(x) => {
                obj.insert(field.to_string(), x);
            }
            None => {
                obj.remove(field);
            }
        }
        v.to_string()
    }

    fn ext(doc: &Value, slug: &str) -> Option<u64> {
        let url = format!("{EXTENSION_PREFIX}{slug}");
        doc["extension"]
            .as_array()?
            .iter()
            .find(|e| e["url"] == url.as_str())?["valueInteger"]
            .as_u64()
    }

    fn err(input: &str) -> String {
        assess(input).expect_err("must be rejected")
    }

    #[test]
    fn example_input_gives_a_low_risk_assessment() {
        let doc = run(EXAMPLE);
        assert_eq!(doc["resourceType"], "RiskAssessment");
        assert_eq!(doc["status"], "final");
        assert_eq!(doc["subject"]["reference"], "Patient/123");
        assert!(doc["subject"].get("display").is_none());
        assert_eq!(doc["method"]["text"], METHOD_TEXT);
        assert_eq!(doc["method"]["coding"][0]["code"], "news2");
        assert_eq!(doc["prediction"][0]["outcome"]["text"], "low");
        let risk = &doc["prediction"][0]["qualitativeRisk"];
        assert_eq!(risk["text"], "low");
        assert_eq!(risk["coding"][0]["system"], RISK_PROBABILITY_SYSTEM);
        assert_eq!(risk["coding"][0]["code"], "low");
        assert_eq!(risk["coding"][1]["system"], NEWS2_RISK_SYSTEM);
        assert_eq!(risk["coding"][1]["code"], "low");
        assert_eq!(ext(&doc, "aggregate-score"), Some(0));
        assert_eq!(ext(&doc, "spo2-scale"), Some(1));
        for slug in [
            "respiratory-rate",
            "spo2",
            "air-or-oxygen",
            "systolic-bp",
            "pulse",
            "consciousness",
            "temperature",
        ] {
            assert_eq!(ext(&doc, slug), Some(0), "{slug}");
        }
        assert_eq!(doc["extension"].as_array().map(Vec::len), Some(9));
        assert!(
            doc["note"][0]["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("NEWS2 aggregate score 0 (low clinical risk)"))
        );
    }

    #[test]
    fn output_is_deterministic_and_starts_with_resource_type() {
        let a = assess(EXAMPLE).expect("valid");
        let b = assess(EXAMPLE).expect("valid");
        assert_eq!(a, b);
        assert!(a.starts_with(r#"{"resourceType":"RiskAssessment","#), "{a}");
    }

    #[test]
    fn every_risk_band_is_coded() {
        let cases = [
            // (field overrides, band, risk-probability code, aggregate)
            (vec![], "low", "low", 0),
            (
                vec![("consciousness", Value::from("V"))],
                "low-medium",
                "moderate",
                3,
            ),
            (
                vec![
                    ("consciousness", Value::from("V")),
                    ("on_oxygen", Value::from(true)),
                ],
                "medium",
                "moderate",
                5,
            ),
            (
                vec![
                    ("consciousness", Value::from("U")),
                    ("on_oxygen", Value::from(true)),
                    ("pulse", Value::from(135)),
                ],
                "high",
                "high",
                8,
            ),
        ];
        for (overrides, band, code, aggregate) in cases {
            let mut v: Value = serde_json::from_str(EXAMPLE).expect("json");
            for (k, x) in overrides {
                v[k] = x;
            }
            let doc = run(&v.to_string());
            assert_eq!(doc["prediction"][0]["outcome"]["text"], band);
            let risk = &doc["prediction"][0]["qualitativeRisk"];
            assert_eq!(risk["coding"][0]["code"], code, "{band}");
            assert_eq!(risk["coding"][1]["code"], band);
            assert_eq!(risk["text"], band);
            assert_eq!(ext(&doc, "aggregate-score"), Some(aggregate), "{band}");
        }
    }

    #[test]
    fn scale2_on_oxygen_is_scored_through_json() {
        let mut v: Value = serde_json::from_str(EXAMPLE).expect("json");
        v["spo2_scale"] = Value::from(2);
        v["on_oxygen"] = Value::from(true);
        v["spo2"] = Value::from(97);
        let doc = run(&v.to_string());
        assert_eq!(ext(&doc, "spo2"), Some(3));
        assert_eq!(ext(&doc, "air-or-oxygen"), Some(2));
        assert_eq!(ext(&doc, "spo2-scale"), Some(2));
        assert_eq!(ext(&doc, "aggregate-score"), Some(5));
        v["on_oxygen"] = Value::from(false);
        let doc = run(&v.to_string());
        assert_eq!(ext(&doc, "spo2"), Some(0));
        assert_eq!(ext(&doc, "aggregate-score"), Some(0));
    }

    #[test]
    fn optional_fields_default() {
        // spo2_scale defaults to 1: 90 % scores 3 on scale 1.
        let input = with("spo2_scale", None);
        let input = {
            let mut v: Value = serde_json::from_str(&input).expect("json");
            v["spo2"] = Value::from(90);
            v.to_string()
        };
        let doc = run(&input);
        assert_eq!(ext(&doc, "spo2-scale"), Some(1));
        assert_eq!(ext(&doc, "spo2"), Some(3));

        // No patient: subject falls back to a display-only reference.
        let doc = run(&with("patient", None));
        assert!(doc["subject"].get("reference").is_none());
        assert_eq!(doc["subject"]["display"], UNIDENTIFIED_SUBJECT);

        // null is treated as absent for optional fields.
        let doc = run(&with("patient", Some(Value::Null)));
        assert_eq!(doc["subject"]["display"], UNIDENTIFIED_SUBJECT);
        let doc = run(&with("spo2_scale", Some(Value::Null)));
        assert_eq!(ext(&doc, "spo2-scale"), Some(1));
    }

    #[test]
    fn missing_required_fields_are_named() {
        for field in [
            "respiratory_rate",
            "spo2",
            "on_oxygen",
            "systolic_bp",
            "pulse",
            "consciousness",
            "temperature",
        ] {
            assert_eq!(err(&with(field, None)), format!("{field} is required"));
            assert_eq!(
                err(&with(field, Some(Value::Null))),
                format!("{field} is required")
            );
        }
    }

    #[test]
    fn wrongly_typed_fields_are_named() {
        for field in [
            "respiratory_rate",
            "spo2",
            "systolic_bp",
            "pulse",
            "temperature",
        ] {
            assert_eq!(
                err(&with(field, Some(Value::from("12")))),
                format!("{field} must be a number")
            );
            assert_eq!(
                err(&with(field, Some(Value::from(true)))),
                format!("{field} must be a number")
            );
            for nested in [serde_json::json!([1, 2]), serde_json::json!({"value": 12})] {
                assert_eq!(
                    err(&with(field, Some(nested))),
                    format!("{field} must be a number")
                );
            }
        }
        assert_eq!(
            err(&with("on_oxygen", Some(Value::from("no")))),
            "on_oxygen must be true or false"
        );
        assert_eq!(
            err(&with("on_oxygen", Some(Value::from(0)))),
            "on_oxygen must be true or false"
        );
        for bad in [
            Value::from(0),
            Value::from(3),
            Value::from(1.5),
            Value::from("1"),
        ] {
            assert_eq!(
                err(&with("spo2_scale", Some(bad))),
                "spo2_scale must be 1 or 2"
            );
        }
        for bad in [
            Value::from("a"),
            Value::from("Alert"),
            Value::from(""),
            Value::from(0),
        ] {
            assert!(
                err(&with("consciousness", Some(bad))).starts_with("consciousness must be one of")
            );
        }
        assert_eq!(
            err(&with("patient", Some(Value::from(123)))),
            "patient must be a string reference"
        );
        assert_eq!(
            err(&with("patient", Some(Value::from("")))),
            "patient must not be empty"
        );
        assert_eq!(
            err(&with("patient", Some(Value::from("Patient/ 1")))),
            "patient must be a reference without whitespace"
        );
    }

    #[test]
    fn every_consciousness_code_is_accepted() {
        for (code, expected) in [("A", 0), ("C", 3), ("V", 3), ("P", 3), ("U", 3)] {
            let doc = run(&with("consciousness", Some(Value::from(code))));
            assert_eq!(ext(&doc, "consciousness"), Some(expected), "{code}");
        }
    }

    #[test]
    fn impossible_values_are_rejected_with_the_field_name() {
        let cases = [
            ("respiratory_rate", Value::from(-1)),
            ("spo2", Value::from(101)),
            ("spo2", Value::from(-3)),
            ("systolic_bp", Value::from(-120)),
            ("pulse", Value::from(-80)),
            ("temperature", Value::from(98.6)),
        ];
        for (field, bad) in cases {
            let e = err(&with(field, Some(bad)));
            assert!(e.starts_with(&format!("{field} must be between")), "{e}");
        }
    }

    #[test]
    fn unknown_duplicate_and_malformed_input_is_rejected() {
        let e = err(&with("heart_rate", Some(Value::from(80))));
        assert!(
            e.starts_with("invalid input: unknown field `heart_rate`"),
            "{e}"
        );

        let dup = EXAMPLE.replacen(r#""pulse": 80"#, r#""pulse": 80, "pulse": 30"#, 1);
        let e = err(&dup);
        assert!(
            e.starts_with("invalid input: duplicate field `pulse`"),
            "{e}"
        );

        assert!(err("").starts_with("invalid input: "));
        assert!(err("{").starts_with("invalid input: "));
        assert!(err("[1, 2]").contains("expected a json object"));
        assert!(err("42").contains("expected a json object"));
        // JSON has no NaN or infinity; overflowing numbers fail to parse.
        let e = err(&EXAMPLE.replacen("37.0", "1e999", 1));
        assert!(e.starts_with("invalid input: "), "{e}");
    }

    #[test]
    fn errors_are_lowercase() {
        for input in [
            with("pulse", None),
            with("spo2", Some(Value::from(150))),
            with("spo2_scale", Some(Value::from(9))),
            with("on_oxygen", Some(Value::Null)),
            with("extra", Some(Value::from(1))),
        ] {
            let e = err(&input);
            let first = e.chars().next().expect("non-empty message");
            assert!(first.is_lowercase(), "{e}");
        }
    }

    #[test]
    fn real_valued_inputs_use_the_next_band() {
        let doc = run(&with("temperature", Some(Value::from(38.05))));
        assert_eq!(ext(&doc, "temperature"), Some(1));
        let doc = run(&with("respiratory_rate", Some(Value::from(20.5))));
        assert_eq!(ext(&doc, "respiratory-rate"), Some(2));
    }
    // ---- news2_latest ----

    fn searchset(resources: &[Value]) -> String {
        let entry: Vec<Value> = resources
            .iter()
            .map(|r| serde_json::json!({"resource": r, "search": {"mode": "match"}}))
            .collect();
        serde_json::json!({"resourceType": "Bundle", "type": "searchset", "entry": entry})
            .to_string()
    }

    fn observation(id: &str, code: &str, value: Value) -> Value {
        let mut o = serde_json::json!({
            "resourceType": "Observation", "id": id, "status": "final",
            "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
            "subject": {"reference": "Patient/123"},
        });
        if value.is_object() && value.get("coding").is_some() {
            o["valueCodeableConcept"] = value;
        } else if value.is_object() {
            o["valueQuantity"] = value;
        } else {
            o["valueQuantity"] = serde_json::json!({"value": value});
        }
        o
    }

    /// The EXAMPLE vitals as a newest-first searchset (systolic in a panel).
    fn example_round() -> Vec<Value> {
        let mut bp = observation("bp", "85354-9", Value::Null);
        if let Some(o) = bp.as_object_mut() {
            o.remove("valueQuantity");
        }
        bp["component"] = serde_json::json!([
            {"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
             "valueQuantity": {"value": 120, "unit": "mm[Hg]"}},
        ]);
        vec![
            observation("rr", "9279-1", Value::from(18)),
            observation("sat", "59408-5", Value::from(97)),
            bp,
            observation("hr", "8867-4", Value::from(80)),
            observation(
                "avpu",
                "67775-7",
                serde_json::json!({"coding": [{"code": "A"}]}),
            ),
            observation("temp", "8310-5", Value::from(37.0)),
        ]
    }

    fn request(patient: Option<&str>) -> LatestRequest {
        LatestRequest {
            patient: patient.map(str::to_owned),
            spo2_scale: Spo2Scale::Scale1,
        }
    }

    fn latest(patient: Option<&str>, json: &str) -> Result<String, String> {
        assess_latest(&request(patient), json)
    }

    fn run_latest(patient: Option<&str>, resources: &[Value]) -> Value {
        let out = latest(patient, &searchset(resources)).expect("usable searchset");
        serde_json::from_str(&out).expect("output is json")
    }

    #[test]
    fn news2_output_has_no_basis() {
        assert!(run(EXAMPLE).get("basis").is_none());
    }

    #[test]
    fn latest_matches_news2_plus_basis() {
        let doc = run_latest(None, &example_round());
        let mut direct = run(EXAMPLE);
        assert_eq!(doc["subject"]["reference"], "Patient/123");
        assert_eq!(
            doc["basis"],
            serde_json::json!([
                {"reference": "Observation/rr"},
                {"reference": "Observation/sat"},
                {"reference": "Observation/bp"},
                {"reference": "Observation/hr"},
                {"reference": "Observation/avpu"},
                {"reference": "Observation/temp"},
            ])
        );
        // Apart from `basis`, the resource equals news2 on the same vitals.
        if let Some(o) = direct.as_object_mut() {
            o.insert("basis".into(), doc["basis"].clone());
        }
        assert_eq!(doc, direct);

        let text = latest(None, &searchset(&example_round())).expect("usable");
        assert!(
            text.contains(
                r#""subject":{"reference":"Patient/123"},"basis":[{"reference":"Observation/rr"}"#
            ),
            "{text}"
        );
        assert_eq!(
            latest(None, &searchset(&example_round())),
            Ok(text),
            "deterministic"
        );
    }

    #[test]
    fn latest_scores_oxygen_and_fahrenheit() {
        let mut resources = vec![
            observation(
                "o2",
                "3151-8",
                serde_json::json!({"value": 2, "unit": "L/min"}),
            ),
            observation(
                "temp2",
                "8310-5",
                serde_json::json!({"value": 102.2, "unit": "[degF]", "code": "[degF]"}),
            ),
        ];
        resources.extend(example_round());
        let doc = run_latest(None, &resources);
        assert_eq!(ext(&doc, "air-or-oxygen"), Some(2));
        assert_eq!(ext(&doc, "temperature"), Some(1), "39.0 °C");
        assert_eq!(ext(&doc, "aggregate-score"), Some(3));
        let basis = doc["basis"].as_array().map(Vec::len);
        assert_eq!(basis, Some(7));
        assert_eq!(doc["basis"][2]["reference"], "Observation/o2");
        assert_eq!(doc["basis"][6]["reference"], "Observation/temp2");
    }

    #[test]
    fn latest_uses_the_requested_spo2_scale() {
        let mut resources = example_round();
        resources[1] = observation("sat", "59408-5", Value::from(89));
        let doc = run_latest(None, &resources);
        assert_eq!(
            (ext(&doc, "spo2"), ext(&doc, "spo2-scale")),
            (Some(3), Some(1))
        );
        let scale2 = LatestRequest {
            patient: None,
            spo2_scale: Spo2Scale::Scale2,
        };
        let out = assess_latest(&scale2, &searchset(&resources)).expect("usable");
        let doc: Value = serde_json::from_str(&out).expect("json");
        assert_eq!(
            (ext(&doc, "spo2"), ext(&doc, "spo2-scale")),
            (Some(0), Some(2))
        );
    }

    #[test]
    fn latest_patient_is_checked_against_the_observations() {
        let doc = run_latest(Some("Patient/123"), &example_round());
        assert_eq!(doc["subject"]["reference"], "Patient/123");
        assert_eq!(
            latest(Some("Patient/9"), &searchset(&example_round())),
            Err(
                "the observations are for Patient/123, not for the requested patient Patient/9"
                    .into()
            )
        );
        // Observations without subject: the asked patient, else unidentified.
        let mut anonymous = example_round();
        for r in &mut anonymous {
            if let Some(o) = r.as_object_mut() {
                o.remove("subject");
            }
        }
        let doc = run_latest(Some("Patient/9"), &anonymous);
        assert_eq!(doc["subject"]["reference"], "Patient/9");
        let doc = run_latest(None, &anonymous);
        assert_eq!(doc["subject"]["display"], UNIDENTIFIED_SUBJECT);
    }

    #[test]
    fn latest_errors_are_lowercase_and_specific() {
        let refused = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"forbidden","diagnostics":"scope denied"}]}"#;
        assert_eq!(
            latest(None, refused),
            Err("fhir_search refused: scope denied".into())
        );
        let mut resources = example_round();
        resources.remove(0);
        assert_eq!(
            latest(None, &searchset(&resources)),
            Err("no recent respiratory rate (LOINC 9279-1) observation".into())
        );
        // Implausible values are still rejected by the scorer.
        let mut resources = example_round();
        resources[1] = observation("sat", "59408-5", Value::from(101));
        assert_eq!(
            latest(None, &searchset(&resources)),
            Err("spo2 must be between 0 and 100 %, got 101".into())
        );
        for e in [
            latest(None, refused),
            latest(None, "not json"),
            latest(None, &searchset(&resources)),
        ] {
            let e = e.expect_err("must fail");
            assert!(e.starts_with(char::is_lowercase), "{e}");
        }
    }

    #[test]
    fn latest_input_is_optional() {
        for empty in [
            "",
            "  \n",
            "{}",
            r#"{"patient": null}"#,
            r#"{"spo2_scale": null}"#,
            r#"{"spo2_scale": 1}"#,
        ] {
            assert_eq!(parse_latest_input(empty), Ok(request(None)), "{empty:?}");
        }
        assert_eq!(
            parse_latest_input(r#"{"patient": "Patient/x", "spo2_scale": 2}"#),
            Ok(LatestRequest {
                patient: Some("Patient/x".into()),
                spo2_scale: Spo2Scale::Scale2,
            })
        );
        for bad in ["0", "3", "1.5", r#""2""#] {
            assert_eq!(
                parse_latest_input(&format!(r#"{{"spo2_scale": {bad}}}"#)),
                Err("spo2_scale must be 1 or 2".into()),
                "{bad}"
            );
        }
        assert_eq!(
            parse_latest_input(r#"{"patient": 1}"#),
            Err("patient must be a string reference".into())
        );
        assert_eq!(
            parse_latest_input(r#"{"patient": ""}"#),
            Err("patient must not be empty".into())
        );
        let e = parse_latest_input(r#"{"spo2": 97}"#).expect_err("unknown field");
        assert!(e.starts_with("invalid input: unknown field `spo2`"), "{e}");
        let e = parse_latest_input("[]").expect_err("not an object");
        assert!(e.contains("expected a json object"), "{e}");
    }
}
