//! The synthetic data set's code tables (LOINC, SNOMED CT, RxNorm, CVX
//! codes with display names and plausible value ranges), one entry per line.

use super::{Measure, RXNORM, SNOMED};

type Range = Option<(i64, i64)>;
/// (LOINC, display, UCUM unit, decimals, normal, low, high).
const fn m(
    loinc: &'static str, display: &'static str, unit: &'static str,
    dec: u32, normal: (i64, i64), low: Range, high: Range,
) -> Measure {
    Measure { loinc, display, unit, dec, normal, low, high }
}

pub(super) const VITALS: [Measure; 6] = [
    m("8867-4", "Heart rate", "/min", 0, (58, 100), Some((36, 49)), Some((111, 150))),
    m("9279-1", "Respiratory rate", "/min", 0, (12, 20), Some((6, 9)), Some((24, 36))),
    m("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "%",
        0, (95, 100), Some((82, 92)), None),
    m("8310-5", "Body temperature", "Cel", 1, (361, 376), Some((340, 355)), Some((381, 405))),
    m("8480-6", "Systolic blood pressure", "mm[Hg]",
        0, (100, 139), Some((75, 90)), Some((160, 220))),
    m("8462-4", "Diastolic blood pressure", "mm[Hg]",
        0, (60, 89), Some((38, 50)), Some((95, 125))),
];
pub(super) const LABS: [Measure; 6] = [
    m("2339-0", "Glucose [Mass/volume] in Blood", "mg/dL",
        0, (70, 140), Some((40, 60)), Some((180, 400))),
    m("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL",
        1, (120, 170), Some((70, 110)), Some((180, 200))),
    m("2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "mg/dL",
        2, (60, 120), Some((30, 50)), Some((150, 450))),
    m("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "mmol/L",
        1, (35, 50), Some((28, 33)), Some((56, 68))),
    m("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "mmol/L",
        0, (135, 145), Some((122, 132)), Some((148, 158))),
    m("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "10*3/uL",
        1, (45, 110), Some((15, 35)), Some((120, 300))),
];
/// (LOINC, display, member LOINC codes) of the two lab report panels.
pub(super) const PANELS: [(&str, &str, &[&str]); 2] = [
    ("24323-8", "Comprehensive metabolic 2000 panel - Serum or Plasma",
        &["2339-0", "2160-0", "2823-3", "2951-2"]),
    ("58410-2", "CBC panel - Blood by Automated count", &["718-7", "6690-2"]),
];
pub(super) const ACVPU_CODES: [(&str, &str); 5] = [
    ("A", "Alert"), ("C", "New confusion"), ("V", "Responds to voice"),
    ("P", "Responds to pain"), ("U", "Unresponsive"),
];
/// Tenant-level medication catalogue: (RxNorm code, display, dosage text).
pub(super) const MEDS: [(&str, &str, &str); 7] = [
    ("197361", "amlodipine 5 MG Oral Tablet", "5 mg by mouth once daily"),
    ("860975", "metformin hydrochloride 500 MG Extended Release Oral Tablet",
        "500 mg by mouth with evening meal"),
    ("7980", "penicillin G", "2 million units IV every 4 hours"),
    ("723", "amoxicillin", "500 mg by mouth three times daily"),
    ("314076", "lisinopril 10 MG Oral Tablet", "10 mg by mouth once daily"),
    ("259255", "atorvastatin 80 MG Oral Tablet", "80 mg by mouth at night"),
    ("745679", "albuterol 0.09 MG/ACTUAT Metered Dose Inhaler",
        "2 puffs every 4 hours as needed"),
];
/// SNOMED CT condition codes.
pub(super) const CONDITIONS: [(&str, &str); 7] = [
    ("38341003", "Hypertensive disorder"), ("44054006", "Diabetes mellitus type 2"),
    ("195967001", "Asthma"), ("13645005", "Chronic obstructive lung disease"),
    ("233604007", "Pneumonia"), ("68566005", "Urinary tract infectious disease"),
    ("386661006", "Fever"),
];
/// (system, code, display, AllergyIntolerance.category)
pub(super) const ALLERGIES: [(&str, &str, &str, &str); 4] = [
    (RXNORM, "7980", "Penicillin G", "medication"),
    (RXNORM, "723", "Amoxicillin", "medication"),
    (SNOMED, "91935009", "Allergy to peanuts", "food"),
    (SNOMED, "300913006", "Shellfish allergy", "food"),
];
/// (v3-ActCode class, display, SNOMED CT type, display, (min, max) length in minutes).
type EncounterType = (&'static str, &'static str, &'static str, &'static str, (i64, i64));
pub(super) const ENCOUNTER_TYPES: [EncounterType; 5] = [
    ("AMB", "ambulatory", "185349003", "Encounter for check up", (15, 60)),
    ("AMB", "ambulatory", "270427003", "Patient-initiated encounter", (15, 90)),
    ("AMB", "ambulatory", "390906007", "Follow-up encounter", (10, 40)),
    ("IMP", "inpatient encounter", "32485007", "Hospital admission", (1440, 7200)),
    ("IMP", "inpatient encounter", "50849002", "Emergency room admission", (240, 2880)),
];
/// CVX vaccine codes.
pub(super) const VACCINES: [(&str, &str); 4] = [
    ("140", "Influenza, seasonal, injectable, preservative free"),
    ("207", "COVID-19, mRNA, LNP-S, PF, 100 mcg/0.5mL dose"),
    ("115", "Tdap"), ("133", "Pneumococcal conjugate PCV 13"),
];
/// SNOMED CT procedure codes.
pub(super) const PROCEDURES: [(&str, &str); 4] = [
    ("73761001", "Colonoscopy"), ("80146002", "Appendectomy"),
    ("430193006", "Medication reconciliation"), ("117015009", "Throat culture"),
];
/// LOINC document types.
pub(super) const DOC_TYPES: [(&str, &str); 2] =
    [("34133-9", "Summary of episode note"), ("11506-3", "Progress note")];
pub(super) const NOTES: [&str; 4] =
    ["patient stable", "vitals reviewed", "medication adjusted", "follow-up in two weeks"];
pub(super) const FAMILY: [&str; 8] =
    ["Smith", "Okafor", "Garcia", "Nguyen", "Kowalski", "Haddad", "Larsen", "Tanaka"];
pub(super) const GIVEN: [&str; 8] =
    ["Alex", "Maria", "Sam", "Priya", "John", "Amara", "Lena", "Kenji"];
