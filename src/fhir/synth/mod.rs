//! Deterministic synthetic FHIR R4 data for golden tests and benchmarks.
//!
//! [`generate`] produces several tenants, each with a small tenant-level
//! `Medication` catalogue followed by its patients; every patient has months
//! of vital-sign rounds and lab panels (`Observation`), lab
//! `DiagnosticReport`s, `Encounter`s, `Condition`s, `MedicationRequest`s,
//! `MedicationStatement`s, `AllergyIntolerance`s, `Immunization`s,
//! `Procedure`s and `DocumentReference`s. [`write_ndjson`] writes the same
//! stream as Bulk Data style NDJSON files.
//!
//! Invariants:
//! - Same [`SynthSpec`] (including `seed`) → byte-identical output. Each
//!   patient draws from its own `fastrand::Rng` seeded from the spec seed, the
//!   tenant name and the patient index; only `u32`/`i64` draws are used so the
//!   stream does not depend on the platform's pointer width. No clock, no hash
//!   map iteration.
//! - Ids match `[A-Za-z0-9\-\.]{1,64}` and are unique per tenant and resource
//!   type (`p0007`, `p0007-obs-00123`, `med-0003`). Different tenants reuse
//!   the same ids on purpose, to exercise tenant isolation.
//! - Every patient-compartment resource references its own patient as
//!   `{"reference":"Patient/<id>"}` in the R4 compartment field (`subject`, or
//!   `patient` for `AllergyIntolerance` and `Immunization`). `Medication` is
//!   not in the patient compartment and is emitted once per tenant, first.
//! - Each patient yields exactly `resources_per_patient` resources, the
//!   `Patient` first; with 12 or more, at least one of each kind.
//! - All times are UTC RFC 3339 inside the window
//!   `[start_unix, start_unix + max(days, 1) days)`; every resource has
//!   `meta.lastUpdated` at or after its latest clinical time (+1 h, clamped
//!   to the window). `start_unix` is clamped to years 1900..=9999.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const LOINC: &str = "http://loinc.org";
const SNOMED: &str = "http://snomed.info/sct";
const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";
const CVX: &str = "http://hl7.org/fhir/sid/cvx";
const UCUM: &str = "http://unitsofmeasure.org";
const ACVPU: &str = "urn:clinicbox:acvpu";
const TERMINOLOGY: &str = "http://terminology.hl7.org/CodeSystem/";
const DAY: i64 = 86_400;
const HOUR: i64 = 3_600;
const MIN_START: i64 = -2_208_988_800; // 1900-01-01T00:00:00Z
const MAX_TIME: i64 = 253_402_300_799; // 9999-12-31T23:59:59Z

/// What to generate. Equal specs generate byte-identical data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthSpec {
    /// Tenant names, in output order; should be distinct path-safe names.
    pub tenants: Vec<String>,
    /// Patients generated per tenant.
    pub patients_per_tenant: usize,
    /// Resources per patient, the `Patient` itself included.
    pub resources_per_patient: usize,
    /// PRNG seed; each patient's stream is derived from it.
    pub seed: u64,
    /// Start of the clinical time window (Unix seconds, UTC).
    pub start_unix: i64,
    /// Length of the window in days (0 is treated as 1).
    pub days: u32,
}

impl Default for SynthSpec {
    fn default() -> Self {
        SynthSpec {
            tenants: vec!["clinic-a".to_owned(), "clinic-b".to_owned()],
            patients_per_tenant: 5,
            resources_per_patient: 200,
            seed: 42,
            start_unix: 1_735_689_600, // 2025-01-01T00:00:00Z
            days: 270,
        }
    }
}

/// Calls `sink(tenant, resource)` for every generated resource, in a deterministic order
/// (tenant, patient, then resource).
pub fn generate(spec: &SynthSpec, mut sink: impl FnMut(&str, serde_json::Value)) {
    let win = Window::new(spec);
    let counts = plan(spec.resources_per_patient);
    // With zero resources per patient there is not even a `Patient` to emit.
    let patients = spec.patients_per_tenant * usize::from(spec.resources_per_patient > 0);
    for tenant in &spec.tenants {
        for (i, med) in MEDS.iter().enumerate() {
            sink(tenant, medication(i, med, &win));
        }
        for p in 0..patients {
            let mut patient = PatientGen::new(spec, tenant, p, win);
            patient.run(&counts, &mut |r| sink(tenant, r));
        }
    }
}

/// Writes Bulk Data style NDJSON: `<dir>/<tenant>/<ResourceType>.ndjson`, one resource per line
/// (compact JSON, "\n" terminated). Returns per-tenant per-type counts.
///
/// Tenant names must be distinct single path components; existing files are truncated.
pub fn write_ndjson(
    spec: &SynthSpec,
    dir: &std::path::Path,
) -> anyhow::Result<std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>> {
    for (i, t) in spec.tenants.iter().enumerate() {
        let safe = !t.is_empty() && t != "." && t != ".." && !t.contains(['/', '\\', '\0']);
        if !safe {
            bail!("tenant name {t:?} is not a safe directory name");
        }
        if spec.tenants[..i].contains(t) {
            bail!("tenant {t:?} is listed twice");
        }
    }
    let mut out = NdjsonOut {
        root: dir.to_path_buf(),
        ..NdjsonOut::default()
    };
    let mut failure = None;
    generate(spec, |tenant, res| {
        if failure.is_none() {
            failure = out.push(tenant, &res).err();
        }
    });
    if let Some(e) = failure {
        return Err(e);
    }
    out.close_tenant()?;
    Ok(out.counts)
}

#[derive(Default)]
struct NdjsonOut {
    root: PathBuf,
    tenant: String,
    files: BTreeMap<String, BufWriter<File>>,
    counts: BTreeMap<String, BTreeMap<String, u64>>,
}

impl NdjsonOut {
    fn push(&mut self, tenant: &str, res: &Value) -> anyhow::Result<()> {
        if tenant != self.tenant {
            self.close_tenant()?;
            self.tenant = tenant.to_owned();
            let d = self.root.join(tenant);
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let rtype = res["resourceType"]
            .as_str()
            .context("resource without resourceType")?;
        if !self.files.contains_key(rtype) {
            let path = self.root.join(tenant).join(format!("{rtype}.ndjson"));
            let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            self.files.insert(rtype.to_owned(), BufWriter::new(f));
        }
        let w = self
            .files
            .get_mut(rtype)
            .context("writer was just inserted")?;
        serde_json::to_writer(&mut *w, res).context("writing NDJSON line")?;
        w.write_all(b"\n").context("writing NDJSON line")?;
        *self
            .counts
            .entry(tenant.to_owned())
            .or_default()
            .entry(rtype.to_owned())
            .or_default() += 1;
        Ok(())
    }

    fn close_tenant(&mut self) -> anyhow::Result<()> {
        for (rtype, mut w) in std::mem::take(&mut self.files) {
            w.flush()
                .with_context(|| format!("flushing {}/{rtype}.ndjson", self.tenant))?;
        }
        Ok(())
    }
}

/// Builds item `k` of one kind for clinical time `t`.
type Build = fn(&mut PatientGen, usize, i64) -> Value;
/// Resource kinds after the `Patient`.
#[derive(Clone, Copy)]
enum Kind {
    Vital,
    Lab,
    Each(Build),
}
const KINDS: usize = 11;
/// Emission order (labs before reports) and relative weights: vitals 60 %,
/// labs 20 %, the other nine kinds share the remaining 20 %.
const WEIGHTS: [(Kind, u64); KINDS] = [
    (Kind::Each(PatientGen::encounter), 30),
    (Kind::Each(PatientGen::condition), 20),
    (Kind::Vital, 540),
    (Kind::Lab, 180),
    (Kind::Each(PatientGen::report), 30),
    (Kind::Each(PatientGen::med_request), 30),
    (Kind::Each(PatientGen::med_statement), 20),
    (Kind::Each(PatientGen::allergy), 10),
    (Kind::Each(PatientGen::immunization), 10),
    (Kind::Each(PatientGen::procedure), 10),
    (Kind::Each(PatientGen::document), 20),
];

/// Splits `total` (Patient included) into per-kind counts, largest remainder first.
fn plan(total: usize) -> [usize; KINDS] {
    let mut counts = [0usize; KINDS];
    let Some(rest) = total.checked_sub(1) else {
        return counts;
    };
    let floor = usize::from(total >= 12);
    let spare = (rest - floor * KINDS) as u128;
    let sum: u128 = WEIGHTS.iter().map(|w| u128::from(w.1)).sum();
    let mut rems = [(0u128, 0usize); KINDS];
    for (i, &(_, w)) in WEIGHTS.iter().enumerate() {
        counts[i] = floor + (spare * u128::from(w) / sum) as usize;
        rems[i] = (spare * u128::from(w) % sum, i);
    }
    let left = rest - counts.iter().sum::<usize>();
    rems.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in rems.iter().take(left) {
        counts[i] += 1;
    }
    counts
}

#[derive(Clone, Copy)]
struct Window {
    start: i64,
    span: i64,
}

impl Window {
    fn new(spec: &SynthSpec) -> Self {
        let span = i64::from(spec.days.max(1)) * DAY;
        Window {
            start: spec.start_unix.clamp(MIN_START, MAX_TIME + 1 - span),
            span,
        }
    }
    fn clamp(&self, t: i64) -> i64 {
        t.clamp(self.start, self.start + self.span - 1)
    }
}

fn rfc3339(t: i64) -> String {
    OffsetDateTime::from_unix_timestamp(t)
        .expect("synthetic times are clamped to years 1900..=9999")
        .format(&Rfc3339)
        .expect("RFC 3339 formatting of a UTC time in years 0..=9999 cannot fail")
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Per-patient stream seed: spec seed XOR a mix of FNV-1a(tenant) and the index.
fn stream_seed(seed: u64, tenant: &str, patient: usize) -> u64 {
    let fnv = tenant.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    seed ^ splitmix(fnv ^ splitmix(patient as u64))
}

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({"system": system, "code": code, "display": display})
}
fn concept(system: &str, code: &str, display: &str) -> Value {
    json!({"coding": [coding(system, code, display)], "text": display})
}
fn hl7(cs: &str, code: &str, display: &str) -> Value {
    json!({"coding": [coding(&format!("{TERMINOLOGY}{cs}"), code, display)]})
}

/// A numeric measurement: ranges are in units of 10^-dec; `None` = no such band.
struct Measure {
    loinc: &'static str,
    display: &'static str,
    unit: &'static str,
    dec: u32,
    normal: (i64, i64),
    low: Option<(i64, i64)>,
    high: Option<(i64, i64)>,
}

use codes::*;

/// Code tables, one entry per line.
#[rustfmt::skip]
mod codes;
pub mod round;

fn medication(i: usize, med: &(&str, &str, &str), win: &Window) -> Value {
    json!({
        "resourceType": "Medication", "id": format!("med-{i:04}"),
        "meta": {"lastUpdated": rfc3339(win.start)},
        "status": "active", "code": concept(RXNORM, med.0, med.1),
    })
}

#[derive(Clone, Copy)]
enum Band {
    Normal,
    Low,
    High,
}

struct PatientGen {
    rng: fastrand::Rng,
    win: Window,
    index: usize,
    pid: String,
    /// (id, LOINC, effective time) of the lab Observations, in panels of `LABS.len()`.
    labs: Vec<(String, &'static str, i64)>,
}

impl PatientGen {
    fn new(spec: &SynthSpec, tenant: &str, index: usize, win: Window) -> Self {
        let rng = fastrand::Rng::with_seed(stream_seed(spec.seed, tenant, index));
        let pid = format!("p{index:04}");
        PatientGen {
            rng,
            win,
            index,
            pid,
            labs: Vec::new(),
        }
    }

    /// Emits the `Patient`, then each kind's block; vitals and labs share the `obs` ids.
    fn run(&mut self, counts: &[usize; KINDS], sink: &mut dyn FnMut(Value)) {
        sink(self.patient());
        let mut obs = 0;
        for (&(kind, _), &n) in WEIGHTS.iter().zip(counts) {
            match kind {
                Kind::Vital => self.vitals(n, obs, sink),
                Kind::Lab => self.lab_panels(n, obs, sink),
                Kind::Each(build) => {
                    for k in 0..n {
                        let t = self.spread(k, n);
                        sink(build(self, k, t));
                    }
                }
            }
            if let Kind::Vital | Kind::Lab = kind {
                obs += n;
            }
        }
    }

    fn pct(&mut self, p: u32) -> bool {
        self.rng.u32(0..100) < p
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.u32(0..items.len() as u32) as usize]
    }
    fn id(&self, abbr: &str, k: usize) -> String {
        format!("{}-{abbr}-{k:05}", self.pid)
    }
    fn subject(&self) -> Value {
        json!({"reference": format!("Patient/{}", self.pid)})
    }
    /// `t` clamped into the window, as RFC 3339.
    fn at(&self, t: i64) -> String {
        rfc3339(self.win.clamp(t))
    }
    /// `meta` for a resource whose latest clinical time is `latest`.
    fn meta(&self, latest: i64) -> Value {
        json!({"lastUpdated": self.at(latest + HOUR)})
    }
    /// Time of item `k` of `n`, spread evenly over the window with jitter.
    fn spread(&mut self, k: usize, n: usize) -> i64 {
        let slot = (self.win.span / n.max(1) as i64).max(1);
        let t = self.win.start + k as i64 * slot + self.rng.i64(0..slot);
        self.win.clamp(t)
    }
    fn status(&mut self) -> &'static str {
        match self.rng.u32(0..100) {
            0..=2 => "amended",
            3..=5 => "preliminary",
            _ => "final",
        }
    }

    fn patient(&mut self) -> Value {
        let gender = match self.rng.u32(0..100) {
            0..=47 => "female",
            48..=95 => "male",
            96..=98 => "other",
            _ => "unknown",
        };
        let birth = self.win.start - self.rng.i64(18 * 365..95 * 365) * DAY;
        let birth_date = OffsetDateTime::from_unix_timestamp(birth)
            .expect("birth dates lie after year 1800")
            .date()
            .format(time::macros::format_description!("[year]-[month]-[day]"))
            .expect("date formatting into a String cannot fail");
        let mrn = format!("MRN-{:06}", self.index);
        json!({
            "resourceType": "Patient", "id": self.pid, "meta": self.meta(self.win.start - HOUR),
            "active": true, "identifier": [{"system": "urn:clinicbox:mrn", "value": mrn}],
            "name": [{"use": "official", "family": self.pick(&FAMILY),
                      "given": [self.pick(&GIVEN)]}],
            "gender": gender, "birthDate": birth_date,
        })
    }

    /// An `Observation` without a value; `cat` and `code` are (code, display) pairs.
    fn observation(&mut self, id: String, t: i64, cat: (&str, &str), code: (&str, &str)) -> Value {
        json!({
            "resourceType": "Observation", "id": id, "meta": self.meta(t),
            "status": self.status(), "category": [hl7("observation-category", cat.0, cat.1)],
            "code": concept(LOINC, code.0, code.1), "subject": self.subject(),
            "effectiveDateTime": self.at(t),
        })
    }

    fn band(&mut self, m: &Measure, abnormal_pct: u32) -> Band {
        if !self.pct(abnormal_pct) {
            return Band::Normal;
        }
        match (m.low, m.high, self.rng.bool()) {
            (Some(_), Some(_), true) | (Some(_), None, _) => Band::Low,
            (_, Some(_), _) => Band::High,
            _ => Band::Normal,
        }
    }

    fn quantity(&mut self, m: &Measure, band: Band) -> Value {
        let range = match band {
            Band::Low => m.low,
            Band::High => m.high,
            Band::Normal => None,
        };
        let (lo, hi) = range.unwrap_or(m.normal);
        quantity(m, self.rng.i64(lo..=hi))
    }

    /// A quantity `Observation`, abnormal (with `interpretation`) in `abnormal_pct` % of cases.
    fn measured(&mut self, id: String, t: i64, cat: (&str, &str), m: &Measure, pct: u32) -> Value {
        let band = self.band(m, pct);
        let mut obs = self.observation(id, t, cat, (m.loinc, m.display));
        obs["valueQuantity"] = self.quantity(m, band);
        interpret(&mut obs, band);
        obs
    }

    /// Vital-sign rounds of six observations, every few hours on some days.
    fn vitals(&mut self, n: usize, first: usize, sink: &mut dyn FnMut(Value)) {
        let rounds = n.div_ceil(VITALS.len());
        let days = (self.win.span / DAY) as usize;
        let per_day = rounds.div_ceil(days).max(6);
        let interval = (DAY / per_day as i64).max(1);
        let episodes = rounds.div_ceil(per_day);
        let mut i = 0;
        for e in 0..episodes {
            // Episode `e` falls on a distinct day within its share of the window.
            let (d0, d1) = (e * days / episodes, (e + 1) * days / episodes);
            let day = d0 as i64 + self.rng.i64(0..(d1 - d0).max(1) as i64);
            let round0 = self.win.start + day * DAY + self.rng.i64(0..interval);
            for r in 0..per_day as i64 {
                let t = round0 + r * interval + self.rng.i64(-600..=600);
                for slot in 0..VITALS.len() {
                    if i == n {
                        return;
                    }
                    let id = self.id("obs", first + i);
                    sink(self.vital(id, slot, t + 60 * slot as i64));
                    i += 1;
                }
            }
        }
    }

    fn vital(&mut self, id: String, slot: usize, t: i64) -> Value {
        const CAT: (&str, &str) = ("vital-signs", "Vital Signs");
        const BP: (&str, &str) = ("85354-9", "Blood pressure panel with all children optional");
        match slot {
            0..=3 => self.measured(id, t, CAT, &VITALS[slot], 8),
            4 => {
                let band = self.band(&VITALS[4], 8);
                let mut obs = self.observation(id, t, CAT, BP);
                let mut parts = Vec::new();
                for m in &VITALS[4..] {
                    let value = self.quantity(m, band);
                    let code = concept(LOINC, m.loinc, m.display);
                    parts.push(json!({"code": code, "valueQuantity": value}));
                }
                obs["component"] = Value::Array(parts);
                interpret(&mut obs, band);
                obs
            }
            _ => {
                let (code, display) = match self.pct(92) {
                    true => ACVPU_CODES[0],
                    false => self.pick(&ACVPU_CODES[1..]),
                };
                let mut obs = self.observation(id, t, CAT, ("67775-7", "Level of responsiveness"));
                obs["valueCodeableConcept"] = concept(ACVPU, code, display);
                obs
            }
        }
    }

    /// Lab panels of all six tests drawn together, spread over the window.
    fn lab_panels(&mut self, n: usize, first: usize, sink: &mut dyn FnMut(Value)) {
        let panels = n.div_ceil(LABS.len());
        for i in 0..n {
            let (p, m) = (i / LABS.len(), &LABS[i % LABS.len()]);
            let t = match self.labs.last() {
                Some(&(_, _, t)) if i % LABS.len() != 0 => t,
                _ => self.spread(p, panels),
            };
            let id = self.id("obs", first + i);
            let mut obs = self.measured(id.clone(), t, ("laboratory", "Laboratory"), m, 10);
            let (lo, hi) = (quantity(m, m.normal.0), quantity(m, m.normal.1));
            obs["referenceRange"] = json!([{"low": lo, "high": hi}]);
            self.labs.push((id, m.loinc, t));
            sink(obs);
        }
    }

    /// A lab report on the latest panel drawn at or before `t` (else the first).
    fn report(&mut self, k: usize, t: i64) -> Value {
        let panels: Vec<_> = self.labs.chunks(LABS.len()).collect();
        let latest = panels.partition_point(|p| p[0].2 <= t).saturating_sub(1);
        let panel = panels.get(latest).copied().unwrap_or(&[]);
        let members = |p: usize| -> Vec<Value> {
            (panel.iter())
                .filter(|l| PANELS[p].2.contains(&l.1))
                .map(|l| json!({"reference": format!("Observation/{}", l.0)}))
                .collect()
        };
        let (mut p, mut result) = (k % 2, members(k % 2));
        if result.is_empty() {
            (p, result) = (1 - p, members(1 - p));
        }
        let t = panel.first().map_or(t, |l| l.2);
        let issued = t + 2 * HOUR;
        let mut dr = json!({
            "resourceType": "DiagnosticReport", "id": self.id("dr", k), "meta": self.meta(issued),
            "status": "final", "category": [hl7("v2-0074", "LAB", "Laboratory")],
            "code": concept(LOINC, PANELS[p].0, PANELS[p].1), "subject": self.subject(),
            "effectiveDateTime": self.at(t), "issued": self.at(issued),
        });
        if !result.is_empty() {
            dr["result"] = Value::Array(result);
        }
        dr
    }

    fn encounter(&mut self, k: usize, t: i64) -> Value {
        let (class, class_display, code, display, minutes) = self.pick(&ENCOUNTER_TYPES);
        let end = t + self.rng.i64(minutes.0..=minutes.1) * 60;
        let finished = !self.pct(5);
        let mut period = json!({"start": self.at(t)});
        if finished {
            period["end"] = json!(self.at(end));
        }
        json!({
            "resourceType": "Encounter", "id": self.id("enc", k),
            "meta": self.meta(if finished { end } else { t }),
            "status": if finished { "finished" } else { "in-progress" },
            "class": coding(&format!("{TERMINOLOGY}v3-ActCode"), class, class_display),
            "type": [concept(SNOMED, code, display)], "subject": self.subject(), "period": period,
        })
    }

    fn condition(&mut self, k: usize, t: i64) -> Value {
        let (code, display) = self.pick(&CONDITIONS);
        let recorded = t + self.rng.i64(0..3 * DAY);
        let category = match self.pct(50) {
            true => ("problem-list-item", "Problem List Item"),
            false => ("encounter-diagnosis", "Encounter Diagnosis"),
        };
        let resolved = self.pct(35);
        let clinical = if resolved {
            ("resolved", "Resolved")
        } else {
            ("active", "Active")
        };
        let mut c = json!({
            "resourceType": "Condition", "id": self.id("cond", k), "meta": self.meta(recorded),
            "clinicalStatus": hl7("condition-clinical", clinical.0, clinical.1),
            "verificationStatus": hl7("condition-ver-status", "confirmed", "Confirmed"),
            "category": [hl7("condition-category", category.0, category.1)],
            "code": concept(SNOMED, code, display), "subject": self.subject(),
            "onsetDateTime": self.at(t), "recordedDate": self.at(recorded),
        });
        if resolved {
            let abated = recorded + self.rng.i64(1..=60) * DAY;
            c["abatementDateTime"] = json!(self.at(abated));
            c["meta"] = self.meta(abated);
        }
        c
    }

    /// Even `k` carry a `medicationCodeableConcept`, odd `k` a `medicationReference`.
    fn med_request(&mut self, k: usize, t: i64) -> Value {
        let i = self.rng.u32(0..MEDS.len() as u32) as usize;
        let status = self.pick(&["active", "active", "completed", "stopped"]);
        let cat = match self.pct(40) {
            true => ("inpatient", "Inpatient"),
            false => ("outpatient", "Outpatient"),
        };
        let mut mr = json!({
            "resourceType": "MedicationRequest", "id": self.id("medrx", k), "meta": self.meta(t),
            "status": status, "intent": "order",
            "category": [hl7("medicationrequest-category", cat.0, cat.1)],
            "subject": self.subject(), "authoredOn": self.at(t),
            "dosageInstruction": [{"text": MEDS[i].2}],
        });
        if k.is_multiple_of(2) {
            mr["medicationCodeableConcept"] = concept(RXNORM, MEDS[i].0, MEDS[i].1);
        } else {
            let reference = format!("Medication/med-{i:04}");
            mr["medicationReference"] = json!({"reference": reference, "display": MEDS[i].1});
        }
        mr
    }

    fn med_statement(&mut self, k: usize, t: i64) -> Value {
        let (code, display, _) = self.pick(&MEDS);
        json!({
            "resourceType": "MedicationStatement", "id": self.id("medst", k), "meta": self.meta(t),
            "status": if self.pct(70) { "active" } else { "completed" },
            "medicationCodeableConcept": concept(RXNORM, code, display),
            "subject": self.subject(), "effectiveDateTime": self.at(t),
        })
    }

    fn allergy(&mut self, k: usize, t: i64) -> Value {
        let (system, code, display, category) = self.pick(&ALLERGIES);
        json!({
            "resourceType": "AllergyIntolerance", "id": self.id("allergy", k), "meta": self.meta(t),
            "clinicalStatus": hl7("allergyintolerance-clinical", "active", "Active"),
            "verificationStatus": hl7("allergyintolerance-verification", "confirmed", "Confirmed"),
            "type": "allergy", "category": [category],
            "criticality": if self.pct(30) { "high" } else { "low" },
            "code": concept(system, code, display), "patient": self.subject(),
            "recordedDate": self.at(t),
        })
    }

    fn immunization(&mut self, k: usize, t: i64) -> Value {
        let (code, display) = self.pick(&VACCINES);
        json!({
            "resourceType": "Immunization", "id": self.id("imm", k), "meta": self.meta(t),
            "status": "completed", "vaccineCode": concept(CVX, code, display),
            "patient": self.subject(), "occurrenceDateTime": self.at(t), "primarySource": true,
        })
    }

    fn procedure(&mut self, k: usize, t: i64) -> Value {
        let (code, display) = self.pick(&PROCEDURES);
        let end = t + self.rng.i64(20..=180) * 60;
        let mut p = json!({
            "resourceType": "Procedure", "id": self.id("proc", k), "meta": self.meta(end),
            "status": "completed", "code": concept(SNOMED, code, display),
            "subject": self.subject(),
        });
        if self.rng.bool() {
            p["performedPeriod"] = json!({"start": self.at(t), "end": self.at(end)});
        } else {
            p["performedDateTime"] = json!(self.at(t));
        }
        p
    }

    fn document(&mut self, k: usize, t: i64) -> Value {
        const CATEGORY: &str =
            "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category";
        let (code, display) = self.pick(&DOC_TYPES);
        let remark = self.pick(&NOTES);
        let note = B64.encode(format!("{display} for {}: {remark}.", self.pid).as_bytes());
        json!({
            "resourceType": "DocumentReference", "id": self.id("doc", k), "meta": self.meta(t),
            "status": "current", "type": concept(LOINC, code, display),
            "category": [{"coding": [coding(CATEGORY, "clinical-note", "Clinical Note")]}],
            "subject": self.subject(), "date": self.at(t),
            "content": [{"attachment": {"contentType": "text/plain", "data": note}}],
        })
    }
}

/// A UCUM `Quantity` for `raw` in units of 10^-dec (integral when `dec` is 0).
fn quantity(m: &Measure, raw: i64) -> Value {
    let value = match m.dec {
        0 => json!(raw),
        dec => json!(raw as f64 / 10f64.powi(dec as i32)),
    };
    json!({"value": value, "unit": m.unit, "system": UCUM, "code": m.unit})
}

fn interpret(obs: &mut Value, band: Band) {
    let (code, display) = match band {
        Band::Normal => return,
        Band::Low => ("L", "Low"),
        Band::High => ("H", "High"),
    };
    obs["interpretation"] = json!([hl7("v3-ObservationInterpretation", code, display)]);
}

#[cfg(test)]
mod tests;
