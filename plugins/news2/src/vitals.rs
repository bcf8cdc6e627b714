//! FHIR `searchset` Bundle of vital-sign `Observation`s in, one NEWS2 input
//! ([`Vitals`]) out, with the references of the observations it came from.
//!
//! Role: `news2_latest` asks the host for [`SEARCH_QUERY`] and hands the
//! answer to [`from_searchset`]. This module is pure (no Extism, no host
//! calls), so the whole selection logic is testable natively.
//!
//! Selection rules:
//! - Entries are taken in bundle order, which is newest first
//!   (`_sort=-date`); the first observation that carries a parameter is the
//!   one used for it. Only `Observation` entries with `search.mode` `match`
//!   (or none) and a `status` of `final`, `amended`, `corrected` or
//!   `preliminary` count; `entered-in-error`, `cancelled`, `registered`,
//!   `unknown` and status-less observations are skipped.
//! - Codes are matched in `code.coding` with system `http://loinc.org`.
//! - If the newest observation for a parameter has no usable value (no
//!   `valueQuantity.value`, an unknown temperature unit, no ACVPU code), the
//!   call fails rather than falling back to an older, staler reading.
//! - Supplemental oxygen is decided by the newest observation carrying an
//!   inhaled-oxygen flow rate (3151-8) or concentration (3150-0), either as
//!   its own code or as a `component` (as in the FHIR pulse-oximetry
//!   profile): flow > 0 or concentration > 21 % means oxygen. No such
//!   observation means air.
//! - The SpO2 scale is always scale 1 (nothing in a vitals search says a
//!   patient has a scale-2 target).
//!
//! Invariants: no panics on host data (no indexing, no unwrap), and the
//! result depends only on the bundle text, so it is deterministic.

use serde::Deserialize;

use crate::score::{Consciousness, Spo2Scale, Vitals};

/// The FHIR query `news2_latest` runs through the host's `fhir_search`:
/// the Last N operation, i.e. the newest eligible observation of each code,
/// newest first. However long the history and however fast one device
/// sends one vital sign, every parameter's newest reading is in the answer
/// (a search of the newest N rows could be all pulse readings), and the
/// answer stays a few observations long.
pub const SEARCH_QUERY: &str =
    "Observation/$lastn?category=vital-signs&status=final,amended,corrected,preliminary&max=1";

/// The LOINC code system URI.
pub const LOINC_SYSTEM: &str = "http://loinc.org";

/// LOINC codes read from the bundle.
pub mod loinc {
    /// Respiratory rate.
    pub const RESPIRATORY_RATE: &str = "9279-1";
    /// Oxygen saturation in arterial blood by pulse oximetry.
    pub const SPO2_PULSE_OXIMETRY: &str = "59408-5";
    /// Oxygen saturation in arterial blood.
    pub const SPO2: &str = "2708-6";
    /// Systolic blood pressure (own observation or panel component).
    pub const SYSTOLIC_BP: &str = "8480-6";
    /// Blood pressure panel with all children optional.
    pub const BP_PANEL: &str = "85354-9";
    /// Heart rate.
    pub const PULSE: &str = "8867-4";
    /// Body temperature.
    pub const TEMPERATURE: &str = "8310-5";
    /// Level of responsiveness (ACVPU).
    pub const CONSCIOUSNESS: &str = "67775-7";
    /// Inhaled oxygen flow rate (L/min).
    pub const OXYGEN_FLOW: &str = "3151-8";
    /// Inhaled oxygen concentration (%).
    pub const OXYGEN_CONCENTRATION: &str = "3150-0";
}

/// Inhaled oxygen concentration of room air, in percent: anything above is
/// supplemental oxygen.
pub const AIR_OXYGEN_PERCENT: f64 = 21.0;

/// One NEWS2 input assembled from the newest observations.
#[derive(Debug, Clone, PartialEq)]
pub struct Latest {
    pub vitals: Vitals,
    /// `subject.reference` of the first observation in the bundle that has
    /// one; every observation used refers to the same patient.
    pub patient: Option<String>,
    /// References (`Observation/<id>`) of the observations used, in chart
    /// order (respiration, SpO2, oxygen, blood pressure, pulse,
    /// consciousness, temperature), without duplicates.
    pub basis: Vec<String>,
}

// ---- The subset of FHIR JSON read here. Unknown fields are ignored. ----

/// A top-level answer: a `Bundle` or an `OperationOutcome`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Response {
    resource_type: String,
    #[serde(rename = "type")]
    kind: Option<String>,
    entry: Option<Vec<Entry>>,
    issue: Option<Vec<Issue>>,
}

#[derive(Deserialize)]
struct Issue {
    code: Option<String>,
    diagnostics: Option<String>,
    details: Option<Text>,
}

#[derive(Deserialize)]
struct Text {
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    full_url: Option<String>,
    resource: Option<Resource>,
    search: Option<EntrySearch>,
}

#[derive(Deserialize)]
struct EntrySearch {
    mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "resourceType")]
enum Resource {
    Observation(Box<Observation>),
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Observation {
    id: Option<String>,
    status: Option<String>,
    code: Option<Concept>,
    subject: Option<Reference>,
    value_quantity: Option<Quantity>,
    value_codeable_concept: Option<Concept>,
    component: Option<Vec<Component>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Component {
    code: Option<Concept>,
    value_quantity: Option<Quantity>,
}

#[derive(Deserialize)]
struct Concept {
    coding: Option<Vec<Coding>>,
}

#[derive(Deserialize)]
struct Coding {
    system: Option<String>,
    code: Option<String>,
}

#[derive(Deserialize)]
struct Reference {
    reference: Option<String>,
}

#[derive(Deserialize)]
struct Quantity {
    value: Option<f64>,
    unit: Option<String>,
    code: Option<String>,
}

impl Concept {
    fn codings(&self) -> &[Coding] {
        self.coding.as_deref().unwrap_or_default()
    }
}

/// Whether `concept` has a LOINC coding with `code`.
fn has_loinc(concept: Option<&Concept>, code: &str) -> bool {
    concept.is_some_and(|c| {
        c.codings()
            .iter()
            .any(|k| k.system.as_deref() == Some(LOINC_SYSTEM) && k.code.as_deref() == Some(code))
    })
}

impl Observation {
    fn has_code(&self, code: &str) -> bool {
        has_loinc(self.code.as_ref(), code)
    }

    fn components(&self) -> &[Component] {
        self.component.as_deref().unwrap_or_default()
    }

    fn subject_reference(&self) -> Option<&str> {
        self.subject.as_ref()?.reference.as_deref()
    }
}

/// Statuses whose value may be scored.
const USABLE_STATUSES: [&str; 4] = ["final", "amended", "corrected", "preliminary"];

/// An observation eligible for selection, with its bundle `fullUrl`.
struct Candidate<'a> {
    obs: &'a Observation,
    full_url: Option<&'a str>,
}

impl Candidate<'_> {
    /// The reference written into `basis`: `Observation/<id>`, or the
    /// entry's `fullUrl` when the resource has no id.
    fn reference(&self) -> Result<String, String> {
        match (&self.obs.id, self.full_url) {
            (Some(id), _) if is_fhir_id(id) => Ok(format!("Observation/{id}")),
            (Some(id), _) => Err(format!("observation id {id:?} is not a valid fhir id")),
            (None, Some(url)) if !url.is_empty() && !url.contains(char::is_whitespace) => {
                Ok(url.to_owned())
            }
            (None, _) => Err("a selected observation has neither an id nor a fullUrl".into()),
        }
    }

    /// The reference for error messages (never fails).
    fn name(&self) -> String {
        self.reference()
            .unwrap_or_else(|_| "an observation without a valid id".into())
    }
}

/// FHIR `id`: 1 to 64 of `A-Z a-z 0-9 - .`.
fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Whether two references name the same resource, allowing one to be the
/// absolute form of the other (`http://host/fhir/Patient/1` vs `Patient/1`).
pub fn same_reference(a: &str, b: &str) -> bool {
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    short == long
        || (short.contains('/')
            && long
                .strip_suffix(short)
                .is_some_and(|prefix| prefix.ends_with('/')))
}

/// The message of an `OperationOutcome`: each issue's diagnostics (or
/// details text, or code), joined by `; `.
fn outcome_message(issues: &[Issue]) -> String {
    let parts: Vec<&str> = issues
        .iter()
        .filter_map(|i| {
            i.diagnostics
                .as_deref()
                .or(i.details.as_ref().and_then(|d| d.text.as_deref()))
                .or(i.code.as_deref())
        })
        .filter(|s| !s.is_empty())
        .collect();
    if parts.is_empty() {
        "no diagnostics".into()
    } else {
        parts.join("; ")
    }
}

/// The newest candidate for which `pick` returns something, with that thing.
fn newest<'c, 'a, T>(
    candidates: &'c [Candidate<'a>],
    pick: impl Fn(&'a Observation) -> Option<T>,
) -> Option<(&'c Candidate<'a>, T)> {
    candidates
        .iter()
        .find_map(|c| pick(c.obs).map(|found| (c, found)))
}

/// A NEWS2 parameter, as named in error messages.
struct Param {
    what: &'static str,
    /// The code(s) that carry it.
    codes: &'static str,
}

const RESPIRATORY_RATE: Param = Param {
    what: "respiratory rate",
    codes: "LOINC 9279-1",
};
const SPO2: Param = Param {
    what: "spo2",
    codes: "LOINC 59408-5 or 2708-6",
};
const SYSTOLIC_BP: Param = Param {
    what: "systolic blood pressure",
    codes: "LOINC 8480-6, alone or in a 85354-9 panel",
};
const PULSE: Param = Param {
    what: "pulse",
    codes: "LOINC 8867-4",
};
const TEMPERATURE: Param = Param {
    what: "temperature",
    codes: "LOINC 8310-5",
};
const CONSCIOUSNESS: Param = Param {
    what: "consciousness",
    codes: "ACVPU, LOINC 67775-7",
};

impl Param {
    fn missing(&self) -> String {
        format!("no recent {} ({}) observation", self.what, self.codes)
    }

    fn no_value(&self, c: &Candidate<'_>) -> String {
        format!(
            "latest {} observation ({}) has no valueQuantity.value",
            self.what,
            c.name()
        )
    }
}

/// The observations used: references in order without duplicates, and the
/// subject each one names.
#[derive(Default)]
struct Basis {
    references: Vec<String>,
    subjects: Vec<(String, String)>,
}

impl Basis {
    fn add(&mut self, c: &Candidate<'_>) -> Result<(), String> {
        let r = c.reference()?;
        if !self.references.contains(&r) {
            if let Some(s) = c.obs.subject_reference() {
                self.subjects.push((r.clone(), s.to_owned()));
            }
            self.references.push(r);
        }
        Ok(())
    }
}

/// A numeric value found in the newest observation carrying a parameter.
struct Found<'c, 'a> {
    candidate: &'c Candidate<'a>,
    quantity: &'a Quantity,
    value: f64,
}

/// Finds the newest observation carrying `param` via `pick`, records it in
/// `basis` and returns its value.
fn numeric<'c, 'a>(
    candidates: &'c [Candidate<'a>],
    basis: &mut Basis,
    param: &Param,
    pick: impl Fn(&'a Observation) -> Option<Option<&'a Quantity>>,
) -> Result<Found<'c, 'a>, String> {
    let (candidate, quantity) = newest(candidates, pick).ok_or_else(|| param.missing())?;
    let quantity = quantity.ok_or_else(|| param.no_value(candidate))?;
    let value = quantity.value.ok_or_else(|| param.no_value(candidate))?;
    basis.add(candidate)?;
    Ok(Found {
        candidate,
        quantity,
        value,
    })
}

/// The quantity of an observation whose own code is any of `codes`.
fn own_quantity<'a>(obs: &'a Observation, codes: &[&str]) -> Option<Option<&'a Quantity>> {
    codes
        .iter()
        .any(|code| obs.has_code(code))
        .then_some(obs.value_quantity.as_ref())
}

/// Systolic BP: an 8480-6 observation, or the 8480-6 component of an
/// 85354-9 panel (a panel without that component does not count).
fn systolic(obs: &Observation) -> Option<Option<&Quantity>> {
    if obs.has_code(loinc::SYSTOLIC_BP) {
        return Some(obs.value_quantity.as_ref());
    }
    if obs.has_code(loinc::BP_PANEL) {
        return obs
            .components()
            .iter()
            .find(|k| has_loinc(k.code.as_ref(), loinc::SYSTOLIC_BP))
            .map(|k| k.value_quantity.as_ref());
    }
    None
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum TemperatureUnit {
    Celsius,
    Fahrenheit,
}

fn unit_from_code(code: &str) -> Option<TemperatureUnit> {
    match code {
        "Cel" => Some(TemperatureUnit::Celsius),
        "[degF]" => Some(TemperatureUnit::Fahrenheit),
        _ => None,
    }
}

fn unit_from_text(unit: &str) -> Option<TemperatureUnit> {
    match unit {
        "Cel" | "°C" | "C" | "degC" => Some(TemperatureUnit::Celsius),
        "[degF]" | "°F" | "F" | "degF" => Some(TemperatureUnit::Fahrenheit),
        _ => None,
    }
}

/// The unit of a temperature quantity: the UCUM `code` when present, else
/// the `unit` text, else Celsius. A code and a unit text that name
/// different scales, or a unit that is neither, fail.
fn temperature_unit(q: &Quantity, c: &Candidate<'_>) -> Result<TemperatureUnit, String> {
    let unsupported = |u: &str| {
        format!(
            "latest temperature observation ({}) has unsupported unit {u:?} (expected Cel or [degF])",
            c.name()
        )
    };
    let from_code = match q.code.as_deref() {
        Some(code) => Some(unit_from_code(code).ok_or_else(|| unsupported(code))?),
        None => None,
    };
    let from_text = q.unit.as_deref().map(|u| (u, unit_from_text(u)));
    match (from_code, from_text) {
        (Some(a), Some((u, Some(b)))) if a != b => Err(format!(
            "latest temperature observation ({}) has conflicting unit {u:?} and code {:?}",
            c.name(),
            q.code.as_deref().unwrap_or_default()
        )),
        (Some(a), _) => Ok(a),
        (None, Some((_, Some(b)))) => Ok(b),
        (None, Some((u, None))) => Err(unsupported(u)),
        (None, None) => Ok(TemperatureUnit::Celsius),
    }
}

/// Degrees Fahrenheit to Celsius, rounded to 1e-6 °C so that binary
/// floating-point noise cannot push a chart boundary (100.4 °F = 38.0 °C)
/// into the next band.
pub fn fahrenheit_to_celsius(f: f64) -> f64 {
    ((f - 32.0) * 5.0 / 9.0 * 1e6).round() / 1e6
}

/// The inhaled-oxygen quantities of an observation (own code and
/// components), as `(code, quantity)`; `None` if it has none.
fn oxygen_sources(obs: &Observation) -> Option<Vec<(&'static str, Option<&Quantity>)>> {
    let codes = [loinc::OXYGEN_FLOW, loinc::OXYGEN_CONCENTRATION];
    let mut sources = Vec::new();
    for code in codes {
        if obs.has_code(code) {
            sources.push((code, obs.value_quantity.as_ref()));
        }
    }
    for k in obs.components() {
        for code in codes {
            if has_loinc(k.code.as_ref(), code) {
                sources.push((code, k.value_quantity.as_ref()));
            }
        }
    }
    (!sources.is_empty()).then_some(sources)
}

/// Whether the newest inhaled-oxygen observation shows supplemental oxygen.
fn on_oxygen(candidates: &[Candidate<'_>], basis: &mut Basis) -> Result<bool, String> {
    let Some((c, sources)) = newest(candidates, oxygen_sources) else {
        return Ok(false);
    };
    let mut oxygen = false;
    for (code, quantity) in sources {
        let bad = |why: &str| {
            format!(
                "latest inhaled oxygen observation ({}) {why} for LOINC {code}",
                c.name()
            )
        };
        let q = quantity.ok_or_else(|| bad("has no valueQuantity.value"))?;
        let value = q.value.ok_or_else(|| bad("has no valueQuantity.value"))?;
        if value < 0.0 {
            return Err(bad("has a negative value"));
        }
        oxygen |= if code == loinc::OXYGEN_FLOW {
            value > 0.0
        } else {
            if q.code.iter().chain(&q.unit).any(|u| u != "%") {
                return Err(bad("has a unit other than %"));
            }
            value > AIR_OXYGEN_PERCENT
        };
    }
    basis.add(c)?;
    Ok(oxygen)
}

/// The ACVPU level of the newest 67775-7 observation.
fn consciousness(candidates: &[Candidate<'_>], basis: &mut Basis) -> Result<Consciousness, String> {
    let (c, value) = newest(candidates, |o| {
        o.has_code(loinc::CONSCIOUSNESS)
            .then_some(o.value_codeable_concept.as_ref())
    })
    .ok_or_else(|| CONSCIOUSNESS.missing())?;
    let mut levels = value
        .map(Concept::codings)
        .unwrap_or_default()
        .iter()
        .filter_map(|k| k.code.as_deref().and_then(Consciousness::from_code));
    let level = levels.next().ok_or_else(|| {
        format!(
            "latest consciousness observation ({}) has no ACVPU code (A, C, V, P or U) in valueCodeableConcept",
            c.name()
        )
    })?;
    if levels.any(|other| other != level) {
        return Err(format!(
            "latest consciousness observation ({}) has conflicting ACVPU codes",
            c.name()
        ));
    }
    basis.add(c)?;
    Ok(level)
}

/// Builds the NEWS2 input from the answer of `fhir_search(SEARCH_QUERY)`.
///
/// Fails with a lowercase message when the host answered with an
/// `OperationOutcome` (`fhir_search refused: <diagnostics>`), when the
/// answer is not a searchset bundle, when a parameter has no observation
/// (`no recent respiratory rate (LOINC 9279-1) observation`), when the
/// newest observation of a parameter has no usable value, or when the
/// observations used name different patients.
pub fn from_searchset(json: &str) -> Result<Latest, String> {
    let response: Response = serde_json::from_str(json)
        .map_err(|e| format!("fhir_search returned an unreadable answer: {e}"))?;
    match response.resource_type.as_str() {
        "Bundle" => {}
        "OperationOutcome" => {
            let issues = response.issue.as_deref().unwrap_or_default();
            return Err(format!("fhir_search refused: {}", outcome_message(issues)));
        }
        other => {
            return Err(format!(
                "fhir_search returned a {other:?} resource, expected a searchset bundle"
            ));
        }
    }
    if response.kind.as_deref() != Some("searchset") {
        return Err(format!(
            "fhir_search returned a bundle of type {:?}, expected searchset",
            response.kind.as_deref().unwrap_or_default()
        ));
    }

    let entries = response.entry.as_deref().unwrap_or_default();
    let observations: Vec<Candidate<'_>> = entries
        .iter()
        .filter(|e| {
            e.search
                .as_ref()
                .and_then(|s| s.mode.as_deref())
                .is_none_or(|m| m == "match")
        })
        .filter_map(|e| match &e.resource {
            Some(Resource::Observation(obs)) => Some(Candidate {
                obs,
                full_url: e.full_url.as_deref(),
            }),
            _ => None,
        })
        .collect();
    let candidates: Vec<Candidate<'_>> = observations
        .into_iter()
        .filter(|c| {
            c.obs
                .status
                .as_deref()
                .is_some_and(|s| USABLE_STATUSES.contains(&s))
        })
        .collect();

    let mut basis = Basis::default();
    let respiratory_rate = numeric(&candidates, &mut basis, &RESPIRATORY_RATE, |o| {
        own_quantity(o, &[loinc::RESPIRATORY_RATE])
    })?
    .value;
    let spo2 = numeric(&candidates, &mut basis, &SPO2, |o| {
        own_quantity(o, &[loinc::SPO2_PULSE_OXIMETRY, loinc::SPO2])
    })?
    .value;
    let on_oxygen = on_oxygen(&candidates, &mut basis)?;
    let systolic_bp = numeric(&candidates, &mut basis, &SYSTOLIC_BP, systolic)?.value;
    let pulse = numeric(&candidates, &mut basis, &PULSE, |o| {
        own_quantity(o, &[loinc::PULSE])
    })?
    .value;
    let consciousness = consciousness(&candidates, &mut basis)?;
    let temperature = {
        let found = numeric(&candidates, &mut basis, &TEMPERATURE, |o| {
            own_quantity(o, &[loinc::TEMPERATURE])
        })?;
        match temperature_unit(found.quantity, found.candidate)? {
            TemperatureUnit::Celsius => found.value,
            TemperatureUnit::Fahrenheit => fahrenheit_to_celsius(found.value),
        }
    };

    // The subject: the first observation naming one. Every observation used
    // must name the same patient (or none).
    let patient = candidates
        .iter()
        .find_map(|c| c.obs.subject_reference())
        .map(str::to_owned);
    if let Some(p) = &patient
        && let Some((r, s)) = basis.subjects.iter().find(|(_, s)| !same_reference(s, p))
    {
        return Err(format!(
            "observation {r} is for subject {s}, not {p}; refusing to mix patients"
        ));
    }

    Ok(Latest {
        vitals: Vitals {
            respiratory_rate,
            spo2,
            spo2_scale: Spo2Scale::Scale1,
            on_oxygen,
            systolic_bp,
            pulse,
            consciousness,
            temperature,
        },
        patient,
        basis: basis.references,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    const PATIENT: &str = "Patient/p1";

    fn loinc_concept(code: &str) -> Value {
        json!({"coding": [{"system": LOINC_SYSTEM, "code": code}]})
    }

    /// A final vital-signs observation with a quantity value.
    fn quantity(id: &str, code: &str, value: f64, unit: &str) -> Value {
        json!({
            "resourceType": "Observation", "id": id, "status": "final",
            "category": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                "code": "vital-signs"}]}],
            "code": loinc_concept(code), "subject": {"reference": PATIENT},
            "valueQuantity": {"value": value, "unit": unit,
                              "system": "http://unitsofmeasure.org", "code": unit},
        })
    }

    fn bp_panel(id: &str, systolic: f64, diastolic: f64) -> Value {
        let part = |code: &str, v: f64| {
            json!({"code": loinc_concept(code),
                   "valueQuantity": {"value": v, "unit": "mm[Hg]", "code": "mm[Hg]"}})
        };
        json!({
            "resourceType": "Observation", "id": id, "status": "final",
            "code": loinc_concept(loinc::BP_PANEL), "subject": {"reference": PATIENT},
            "component": [part("8462-4", diastolic), part(loinc::SYSTOLIC_BP, systolic)],
        })
    }

    fn acvpu(id: &str, code: &str) -> Value {
        json!({
            "resourceType": "Observation", "id": id, "status": "final",
            "code": loinc_concept(loinc::CONSCIOUSNESS), "subject": {"reference": PATIENT},
            "valueCodeableConcept": {"coding": [{"system": "urn:clinicbox:acvpu", "code": code}]},
        })
    }

    /// One full, normal round (scores 0), newest first.
    fn round() -> Vec<Value> {
        vec![
            quantity("rr", loinc::RESPIRATORY_RATE, 16.0, "/min"),
            quantity("spo2", loinc::SPO2_PULSE_OXIMETRY, 97.0, "%"),
            bp_panel("bp", 120.0, 80.0),
            quantity("hr", loinc::PULSE, 70.0, "/min"),
            acvpu("avpu", "A"),
            quantity("temp", loinc::TEMPERATURE, 37.0, "Cel"),
        ]
    }

    fn bundle(resources: &[Value]) -> String {
        let entry: Vec<Value> = resources
            .iter()
            .map(|r| {
                json!({
                    "fullUrl": format!("Observation/{}", r["id"].as_str().unwrap_or("x")),
                    "resource": r, "search": {"mode": "match"},
                })
            })
            .collect();
        json!({"resourceType": "Bundle", "type": "searchset",
               "total": entry.len(), "entry": entry})
        .to_string()
    }

    fn ok(resources: &[Value]) -> Latest {
        from_searchset(&bundle(resources)).expect("usable bundle")
    }

    fn err(resources: &[Value]) -> String {
        from_searchset(&bundle(resources)).expect_err("must fail")
    }

    /// `round()` with the observation of `id` replaced (or removed on `None`).
    fn round_with(id: &str, replacement: Option<Value>) -> Vec<Value> {
        round()
            .into_iter()
            .filter_map(|r| {
                if r["id"] == id {
                    replacement.clone()
                } else {
                    Some(r)
                }
            })
            .collect()
    }

    #[test]
    fn a_full_round_becomes_vitals_with_basis_and_subject() {
        let latest = ok(&round());
        assert_eq!(
            latest.vitals,
            Vitals {
                respiratory_rate: 16.0,
                spo2: 97.0,
                spo2_scale: Spo2Scale::Scale1,
                on_oxygen: false,
                systolic_bp: 120.0,
                pulse: 70.0,
                consciousness: Consciousness::Alert,
                temperature: 37.0,
            }
        );
        assert_eq!(latest.patient.as_deref(), Some(PATIENT));
        assert_eq!(
            latest.basis,
            [
                "Observation/rr",
                "Observation/spo2",
                "Observation/bp",
                "Observation/hr",
                "Observation/avpu",
                "Observation/temp"
            ]
        );
    }

    #[test]
    fn newest_observation_of_each_parameter_wins() {
        // Newer readings first, then the older full round.
        let mut resources = vec![
            quantity("rr2", loinc::RESPIRATORY_RATE, 26.0, "/min"),
            quantity("hr2", loinc::PULSE, 120.0, "/min"),
            acvpu("avpu2", "V"),
        ];
        resources.extend(round());
        let latest = ok(&resources);
        assert_eq!(latest.vitals.respiratory_rate, 26.0);
        assert_eq!(latest.vitals.pulse, 120.0);
        assert_eq!(latest.vitals.consciousness, Consciousness::Voice);
        assert_eq!(latest.vitals.spo2, 97.0);
        assert_eq!(
            latest.basis,
            [
                "Observation/rr2",
                "Observation/spo2",
                "Observation/bp",
                "Observation/hr2",
                "Observation/avpu2",
                "Observation/temp"
            ]
        );
    }

    #[test]
    fn systolic_comes_from_a_panel_or_a_standalone_observation() {
        // Panel only (the round): the 8480-6 component, not the diastolic.
        assert_eq!(ok(&round()).vitals.systolic_bp, 120.0);

        // A newer standalone 8480-6 beats the older panel.
        let mut resources = vec![quantity("sbp", loinc::SYSTOLIC_BP, 95.0, "mm[Hg]")];
        resources.extend(round());
        let latest = ok(&resources);
        assert_eq!(latest.vitals.systolic_bp, 95.0);
        assert!(latest.basis.contains(&"Observation/sbp".to_owned()));
        assert!(!latest.basis.contains(&"Observation/bp".to_owned()));

        // A newer panel beats an older standalone one.
        let mut resources = round();
        resources.push(quantity("sbp", loinc::SYSTOLIC_BP, 95.0, "mm[Hg]"));
        assert_eq!(ok(&resources).vitals.systolic_bp, 120.0);

        // Standalone only.
        let resources = round_with(
            "bp",
            Some(quantity("sbp", loinc::SYSTOLIC_BP, 101.0, "mm[Hg]")),
        );
        assert_eq!(ok(&resources).vitals.systolic_bp, 101.0);

        // A newer panel without a systolic component does not count.
        let mut diastolic_only = bp_panel("dia", 0.0, 70.0);
        if let Some(parts) = diastolic_only["component"].as_array_mut() {
            parts.truncate(1);
        }
        let mut resources = vec![diastolic_only];
        resources.extend(round());
        assert_eq!(ok(&resources).vitals.systolic_bp, 120.0);
    }

    #[test]
    fn spo2_accepts_either_code() {
        let resources = round_with("spo2", Some(quantity("sat", loinc::SPO2, 93.0, "%")));
        assert_eq!(ok(&resources).vitals.spo2, 93.0);
    }

    #[test]
    fn missing_parameters_are_named() {
        let cases = [
            (
                "rr",
                "no recent respiratory rate (LOINC 9279-1) observation",
            ),
            (
                "spo2",
                "no recent spo2 (LOINC 59408-5 or 2708-6) observation",
            ),
            (
                "bp",
                "no recent systolic blood pressure (LOINC 8480-6, alone or in a 85354-9 panel) observation",
            ),
            ("hr", "no recent pulse (LOINC 8867-4) observation"),
            (
                "avpu",
                "no recent consciousness (ACVPU, LOINC 67775-7) observation",
            ),
            ("temp", "no recent temperature (LOINC 8310-5) observation"),
        ];
        for (id, message) in cases {
            assert_eq!(err(&round_with(id, None)), message, "{id}");
        }
        // An empty searchset (no `entry` at all) reports the first parameter.
        let empty = r#"{"resourceType":"Bundle","type":"searchset","total":0}"#;
        assert_eq!(
            from_searchset(empty).expect_err("nothing to score"),
            "no recent respiratory rate (LOINC 9279-1) observation"
        );
    }

    #[test]
    fn codes_must_be_loinc() {
        let mut rr = quantity("rr", loinc::RESPIRATORY_RATE, 16.0, "/min");
        rr["code"]["coding"][0]["system"] = json!("http://snomed.info/sct");
        assert!(err(&round_with("rr", Some(rr))).starts_with("no recent respiratory rate"));
    }

    #[test]
    fn operation_outcome_is_a_refusal_with_its_diagnostics() {
        let denied = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"forbidden","diagnostics":"fhir_search is not granted to this plugin for tenant t1"}]}"#;
        assert_eq!(
            from_searchset(denied).expect_err("refused"),
            "fhir_search refused: fhir_search is not granted to this plugin for tenant t1"
        );
        let two = r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid","diagnostics":"bad _sort"},{"severity":"error","code":"not-found"}]}"#;
        assert_eq!(
            from_searchset(two).expect_err("refused"),
            "fhir_search refused: bad _sort; not-found"
        );
        let bare = r#"{"resourceType":"OperationOutcome"}"#;
        assert_eq!(
            from_searchset(bare).expect_err("refused"),
            "fhir_search refused: no diagnostics"
        );
    }

    #[test]
    fn other_answers_are_rejected() {
        for (json, start) in [
            ("", "fhir_search returned an unreadable answer: "),
            ("[]", "fhir_search returned an unreadable answer: "),
            ("{}", "fhir_search returned an unreadable answer: "),
            (
                r#"{"resourceType":"Patient","id":"p1"}"#,
                r#"fhir_search returned a "Patient" resource"#,
            ),
            (
                r#"{"resourceType":"Bundle","type":"batch-response","entry":[]}"#,
                r#"fhir_search returned a bundle of type "batch-response", expected searchset"#,
            ),
            (
                r#"{"resourceType":"Bundle","type":"searchset","entry":[{"resource":{"id":"x"}}]}"#,
                "fhir_search returned an unreadable answer: ",
            ),
        ] {
            let e = from_searchset(json).expect_err("must fail");
            assert!(e.starts_with(start), "{json}: {e}");
        }
    }

    #[test]
    fn fahrenheit_is_converted_to_celsius() {
        let temp = |value: f64, unit: &str| {
            round_with(
                "temp",
                Some(quantity("temp", loinc::TEMPERATURE, value, unit)),
            )
        };
        assert_eq!(ok(&temp(98.6, "[degF]")).vitals.temperature, 37.0);
        // Chart boundary: exactly 38.0 °C, not 38.000000000000007.
        assert_eq!(ok(&temp(100.4, "[degF]")).vitals.temperature, 38.0);
        assert_eq!(ok(&temp(95.0, "[degF]")).vitals.temperature, 35.0);
        assert_eq!(ok(&temp(37.5, "Cel")).vitals.temperature, 37.5);

        // Unit text only (no UCUM code).
        let mut t = quantity("temp", loinc::TEMPERATURE, 102.2, "°F");
        if let Some(q) = t["valueQuantity"].as_object_mut() {
            q.remove("code");
        }
        assert_eq!(ok(&round_with("temp", Some(t))).vitals.temperature, 39.0);
        // No unit at all: Celsius.
        let mut t = quantity("temp", loinc::TEMPERATURE, 36.4, "Cel");
        t["valueQuantity"] = json!({"value": 36.4});
        assert_eq!(ok(&round_with("temp", Some(t))).vitals.temperature, 36.4);

        // Unknown or conflicting units fail.
        let e = err(&temp(310.0, "K"));
        assert!(e.contains(r#"unsupported unit "K""#), "{e}");
        let mut t = quantity("temp", loinc::TEMPERATURE, 98.6, "[degF]");
        t["valueQuantity"]["unit"] = json!("°C");
        let e = err(&round_with("temp", Some(t)));
        assert!(e.contains("conflicting unit"), "{e}");
    }

    #[test]
    fn oxygen_from_flow_or_concentration() {
        let with_first = |obs: Value| {
            let mut resources = vec![obs];
            resources.extend(round());
            ok(&resources)
        };
        assert!(!ok(&round()).vitals.on_oxygen, "no oxygen observation: air");

        let flow = |v: f64| quantity("o2", loinc::OXYGEN_FLOW, v, "L/min");
        let conc = |v: f64| quantity("o2", loinc::OXYGEN_CONCENTRATION, v, "%");
        let latest = with_first(flow(2.0));
        assert!(latest.vitals.on_oxygen);
        assert_eq!(
            latest.basis.get(2).map(String::as_str),
            Some("Observation/o2")
        );
        assert!(!with_first(flow(0.0)).vitals.on_oxygen);
        assert!(with_first(conc(28.0)).vitals.on_oxygen);
        assert!(!with_first(conc(21.0)).vitals.on_oxygen);

        // Only the newest oxygen observation counts: air now, oxygen before.
        let mut resources = vec![quantity("o2now", loinc::OXYGEN_FLOW, 0.0, "L/min")];
        resources.extend(round());
        resources.push(quantity("o2old", loinc::OXYGEN_FLOW, 4.0, "L/min"));
        let latest = ok(&resources);
        assert!(!latest.vitals.on_oxygen);
        assert!(latest.basis.contains(&"Observation/o2now".to_owned()));
        assert!(!latest.basis.contains(&"Observation/o2old".to_owned()));

        // As components of the pulse-oximetry observation (FHIR profile).
        let mut spo2 = quantity("spo2", loinc::SPO2_PULSE_OXIMETRY, 95.0, "%");
        spo2["component"] = json!([
            {"code": loinc_concept(loinc::OXYGEN_FLOW),
             "valueQuantity": {"value": 0, "unit": "L/min"}},
            {"code": loinc_concept(loinc::OXYGEN_CONCENTRATION),
             "valueQuantity": {"value": 35, "unit": "%", "code": "%"}},
        ]);
        let latest = ok(&round_with("spo2", Some(spo2)));
        assert!(latest.vitals.on_oxygen);
        assert_eq!(
            latest
                .basis
                .iter()
                .filter(|r| *r == "Observation/spo2")
                .count(),
            1,
            "no duplicate basis entries"
        );

        // Unusable oxygen observations fail rather than guess.
        let mut no_value = flow(1.0);
        no_value["valueQuantity"] = Value::Null;
        let mut resources = vec![no_value];
        resources.extend(round());
        assert!(err(&resources).contains("has no valueQuantity.value for LOINC 3151-8"));
        let mut resources = vec![conc(0.4)];
        resources[0]["valueQuantity"]["unit"] = json!("1");
        resources[0]["valueQuantity"]["code"] = json!("1");
        resources.extend(round());
        assert!(err(&resources).contains("has a unit other than %"));
        let mut resources = vec![flow(-1.0)];
        resources.extend(round());
        assert!(err(&resources).contains("has a negative value"));
    }

    #[test]
    fn newest_reading_without_a_value_fails_instead_of_using_an_older_one() {
        let mut rr = quantity("rr2", loinc::RESPIRATORY_RATE, 0.0, "/min");
        rr["valueQuantity"] = Value::Null;
        rr["dataAbsentReason"] = json!({"text": "not measured"});
        let mut resources = vec![rr];
        resources.extend(round());
        assert_eq!(
            err(&resources),
            "latest respiratory rate observation (Observation/rr2) has no valueQuantity.value"
        );

        let unknown = acvpu("avpu", "alert");
        let e = err(&round_with("avpu", Some(unknown)));
        assert!(e.contains("has no ACVPU code"), "{e}");
        let mut two = acvpu("avpu", "A");
        two["valueCodeableConcept"]["coding"] =
            json!([{"code": "A"}, {"system": "urn:x", "code": "U"}]);
        let e = err(&round_with("avpu", Some(two)));
        assert!(e.contains("conflicting ACVPU codes"), "{e}");
        let mut same = acvpu("avpu", "C");
        same["valueCodeableConcept"]["coding"] = json!([{"code": "C"}, {"code": "C"}]);
        assert_eq!(
            ok(&round_with("avpu", Some(same))).vitals.consciousness,
            Consciousness::Confusion
        );
    }

    #[test]
    fn unusable_statuses_and_non_matches_are_skipped() {
        for status in [
            Some("entered-in-error"),
            Some("cancelled"),
            Some("registered"),
            Some("unknown"),
            None,
        ] {
            let mut wrong = quantity("rr2", loinc::RESPIRATORY_RATE, 40.0, "/min");
            match status {
                Some(s) => wrong["status"] = json!(s),
                None => {
                    if let Some(o) = wrong.as_object_mut() {
                        o.remove("status");
                    }
                }
            }
            let mut resources = vec![wrong];
            resources.extend(round());
            assert_eq!(ok(&resources).vitals.respiratory_rate, 16.0, "{status:?}");
        }
        for status in ["amended", "corrected", "preliminary"] {
            let mut newer = quantity("rr2", loinc::RESPIRATORY_RATE, 22.0, "/min");
            newer["status"] = json!(status);
            let mut resources = vec![newer];
            resources.extend(round());
            assert_eq!(ok(&resources).vitals.respiratory_rate, 22.0, "{status}");
        }

        // Included entries, outcome entries and other resource types are ignored.
        let mut json: Value = serde_json::from_str(&bundle(&round())).expect("json");
        let extra = [
            json!({"resource": quantity("inc", loinc::RESPIRATORY_RATE, 40.0, "/min"),
                   "search": {"mode": "include"}}),
            json!({"resource": {"resourceType": "OperationOutcome",
                                "issue": [{"severity": "warning", "code": "informational"}]},
                   "search": {"mode": "outcome"}}),
            json!({"resource": {"resourceType": "Patient", "id": "p1",
                                "status": 3, "code": "not a concept"}}),
        ];
        if let Some(entries) = json["entry"].as_array_mut() {
            for (i, e) in extra.into_iter().enumerate() {
                entries.insert(i, e);
            }
        }
        let latest = from_searchset(&json.to_string()).expect("usable");
        assert_eq!(latest.vitals.respiratory_rate, 16.0);
    }

    #[test]
    fn basis_uses_ids_or_full_urls() {
        let mut rr = quantity("rr", loinc::RESPIRATORY_RATE, 16.0, "/min");
        if let Some(o) = rr.as_object_mut() {
            o.remove("id");
        }
        // `bundle` then writes fullUrl "Observation/x".
        let latest = ok(&round_with("rr", Some(rr)));
        assert_eq!(
            latest.basis.first().map(String::as_str),
            Some("Observation/x")
        );

        let bad = quantity("r r", loinc::RESPIRATORY_RATE, 16.0, "/min");
        assert_eq!(
            err(&round_with("rr", Some(bad))),
            r#"observation id "r r" is not a valid fhir id"#
        );
    }

    #[test]
    fn subject_comes_from_the_first_observation_and_must_be_shared() {
        let mut resources = round();
        // The absolute form of the same patient is the same subject.
        resources[1]["subject"]["reference"] = json!("https://ehr.example/fhir/Patient/p1");
        if let Some(o) = resources[0].as_object_mut() {
            o.remove("subject");
        }
        let latest = ok(&resources);
        assert_eq!(
            latest.patient.as_deref(),
            Some("https://ehr.example/fhir/Patient/p1")
        );

        let mut resources = round();
        resources[3]["subject"]["reference"] = json!("Patient/p2");
        assert_eq!(
            err(&resources),
            "observation Observation/hr is for subject Patient/p2, not Patient/p1; refusing to mix patients"
        );

        let mut resources = round();
        for r in &mut resources {
            if let Some(o) = r.as_object_mut() {
                o.remove("subject");
            }
        }
        assert_eq!(ok(&resources).patient, None);
    }

    #[test]
    fn reference_comparison() {
        assert!(same_reference("Patient/1", "Patient/1"));
        assert!(same_reference("http://h/fhir/Patient/1", "Patient/1"));
        assert!(same_reference("Patient/1", "http://h/fhir/Patient/1"));
        assert!(!same_reference("Patient/11", "Patient/1"));
        assert!(!same_reference("http://h/fhir/XPatient/1", "Patient/1"));
        assert!(!same_reference("Patient/1", "1"));
        assert!(!same_reference("Patient/1", "Patient/2"));
    }

    #[test]
    fn fahrenheit_conversion_is_exact_on_chart_values() {
        for (f, c) in [
            (95.0, 35.0),
            (96.8, 36.0),
            (100.4, 38.0),
            (102.2, 39.0),
            (32.0, 0.0),
        ] {
            assert_eq!(fahrenheit_to_celsius(f), c, "{f}");
        }
    }

    #[test]
    fn selection_is_deterministic() {
        let json = bundle(&round());
        assert_eq!(from_searchset(&json), from_searchset(&json));
    }
}
