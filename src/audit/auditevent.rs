//! Each audit record as a FHIR R4 `AuditEvent`, after IHE BALP (Basic Audit
//! Log Patterns).
//!
//! - a plugin's `fhir_search` → `type` rest, `subtype` search-type, action
//!   E, with the patient entity and the query (base64) entity;
//! - a plugin's `fhir_read` → rest / read, action R, the patient and the
//!   resource read;
//! - a plugin call → rest / operation, action E, with the patient;
//! - agents: the requesting app or user (requestor), the plugin (client,
//!   DICOM 110153 Source Role ID) and the appliance (server, 110152
//!   Destination Role ID); `source.observer` is the appliance;
//! - outcome 0 (success), 4 (refused or denied), 8 (failed);
//! - bundle decisions → DICOM 110100 Application Activity, rejections
//!   110113 Security Alert; quarantines are Security Alerts too.
//!
//! Invariant: rendering is a pure function of the stored record (and the
//! appliance id), so the AuditEvent uploaded for a record is always the
//! same document and `PUT AuditEvent/{id}` is idempotent.

use base64::Engine as _;
use serde_json::{Value, json};

use super::log::Record;

const DCM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const EVENT_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-event-type";
const RESTFUL: &str = "http://hl7.org/fhir/restful-interaction";
const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
const OBJECT_ROLE: &str = "http://terminology.hl7.org/CodeSystem/object-role";
const PARTICIPATION: &str = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType";
const ACT_REASON: &str = "http://terminology.hl7.org/CodeSystem/v3-ActReason";
/// Identifier system of clinicbox appliances (their key ids).
pub const APPLIANCE_SYSTEM: &str = "urn:clinicbox:appliance";
/// Identifier system of clinicbox plugins (`vendor/name`).
pub const PLUGIN_SYSTEM: &str = "urn:clinicbox:plugin";
/// Extension carrying the record's place in the chain.
pub const CHAIN_EXTENSION: &str = "urn:clinicbox:audit-chain";

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({"system": system, "code": code, "display": display})
}

fn s<'a>(b: &'a Value, k: &str) -> &'a str {
    b.get(k).and_then(Value::as_str).unwrap_or("")
}

/// Renders `r` as an AuditEvent recorded by appliance `appliance` (its key
/// id).
pub fn render(r: &Record, appliance: &str) -> Value {
    let body: Value = serde_json::from_str(&r.body).unwrap_or_else(|_| json!({}));
    let observer = json!({
        "identifier": {"system": APPLIANCE_SYSTEM, "value": appliance},
        "display": format!("clinicbox appliance {}", &appliance[..appliance.len().min(16)])
    });
    let server = json!({
        "type": {"coding": [coding(DCM, "110152", "Destination Role ID")]},
        "who": observer.clone(),
        "requestor": false
    });
    let mut ev = json!({
        "resourceType": "AuditEvent",
        "id": r.id,
        "meta": {"extension": [{
            "url": CHAIN_EXTENSION,
            "valueString": format!("seq={} hash={}", r.seq, r.hash)
        }]},
        "recorded": r.time,
        "source": {
            "observer": observer,
            "type": [coding("http://terminology.hl7.org/CodeSystem/security-source-type", "4", "Application Server")]
        },
    });
    let plugin_agent = |name: &str, version: &str| {
        let mut who = json!({"identifier": {"system": PLUGIN_SYSTEM, "value": name}});
        who["display"] = json!(if version.is_empty() {
            format!("plugin {name}")
        } else {
            format!("plugin {name} {version}")
        });
        json!({
            "type": {"coding": [coding(DCM, "110153", "Source Role ID")]},
            "who": who,
            "requestor": false
        })
    };
    let patient_entity = |tenant: &str, patient: &str| {
        if !crate::fhir::is_valid_id(patient) {
            return json!({
                "type": coding(ENTITY_TYPE, "1", "Person"),
                "role": coding(OBJECT_ROLE, "1", "Patient"),
                "description": format!("tenant {tenant}, patient {patient:?} (not a valid id)")
            });
        }
        json!({
            "what": {"reference": format!("Patient/{patient}")},
            "type": coding(ENTITY_TYPE, "1", "Person"),
            "role": coding(OBJECT_ROLE, "1", "Patient"),
            "description": format!("tenant {tenant}")
        })
    };
    let (outcome, desc) = outcome_of(r.kind.as_str(), &body);
    match r.kind.as_str() {
        "host.access" | "fhir.access" => {
            let f = s(&body, "host_fn");
            let query = s(&body, "query");
            let (subtype, action, entity) = match f {
                "fhir_search" => (
                    coding(RESTFUL, "search-type", "search type"),
                    "E",
                    json!({
                        "type": coding(ENTITY_TYPE, "2", "System Object"),
                        "role": coding(OBJECT_ROLE, "24", "Query"),
                        "query": base64::engine::general_purpose::STANDARD.encode(query)
                    }),
                ),
                "fhir_read" => {
                    // Only a well-formed `Type/id` becomes a reference; any
                    // other text (a plugin can pass anything) is kept as a
                    // description, so upstream never rejects the event.
                    let mut e = json!({
                        "type": coding(ENTITY_TYPE, "2", "System Object"),
                        "role": coding(OBJECT_ROLE, "4", "Domain Resource")
                    });
                    if is_reference(query) {
                        e["what"] = json!({"reference": query});
                    } else {
                        e["description"] = json!(format!("read of {query:?}"));
                    }
                    (coding(RESTFUL, "read", "read"), "R", e)
                }
                _ => (
                    coding(RESTFUL, "operation", "operation"),
                    "E",
                    json!({
                        "type": coding(ENTITY_TYPE, "2", "System Object"),
                        "role": coding(OBJECT_ROLE, "13", "Security Resource"),
                        "description": "note from the plugin",
                        "detail": [{"type": "note", "valueString": query}]
                    }),
                ),
            };
            ev["type"] = coding(EVENT_TYPE, "rest", "Restful Operation");
            ev["subtype"] = json!([subtype]);
            ev["action"] = json!(action);
            ev["agent"] = if r.kind == "fhir.access" {
                json!([{
                    "type": {"coding": [coding(PARTICIPATION, "IRCP", "information recipient")]},
                    "who": {"display": s(&body, "requester")},
                    "requestor": true
                }, server])
            } else {
                json!([plugin_agent(s(&body, "plugin"), ""), server])
            };
            ev["source"]["site"] = json!(s(&body, "tenant"));
            ev["entity"] = if s(&body, "patient").is_empty() {
                json!([entity])
            } else {
                json!([
                    patient_entity(s(&body, "tenant"), s(&body, "patient")),
                    entity
                ])
            };
        }
        "plugin.call" => {
            ev["type"] = coding(EVENT_TYPE, "rest", "Restful Operation");
            ev["subtype"] = json!([coding(RESTFUL, "operation", "operation")]);
            ev["action"] = json!("E");
            let requester = s(&body, "requester");
            ev["agent"] = json!([
                {
                    "type": {"coding": [coding(PARTICIPATION, "IRCP", "information recipient")]},
                    "who": {"display": if requester.is_empty() { "unknown" } else { requester }},
                    "requestor": true
                },
                plugin_agent(s(&body, "plugin"), s(&body, "version")),
                server
            ]);
            let purpose = s(&body, "purpose");
            if !purpose.is_empty() {
                ev["purposeOfEvent"] =
                    json!([{"coding": [{"system": ACT_REASON, "code": purpose}]}]);
            }
            ev["source"]["site"] = json!(s(&body, "tenant"));
            ev["entity"] = json!([
                patient_entity(s(&body, "tenant"), s(&body, "patient")),
                {
                    "type": coding(ENTITY_TYPE, "2", "System Object"),
                    "role": coding(OBJECT_ROLE, "4", "Domain Resource"),
                    "description": format!("{} {} (manifest {})", s(&body, "plugin"), s(&body, "function"), s(&body, "digest")),
                    "detail": [{"type": "call_id", "valueString": s(&body, "call_id")}]
                }
            ]);
        }
        kind => {
            // Application activity: bundle decisions, grants, imports, sync;
            // security alerts: rejections and quarantines.
            let alert = (kind == "bundle.decision" && s(&body, "outcome") == "rejected")
                || kind == "quarantine"
                || kind == "api.denied";
            ev["type"] = if alert {
                coding(DCM, "110113", "Security Alert")
            } else {
                coding(DCM, "110100", "Application Activity")
            };
            ev["action"] = json!(match s(&body, "action") {
                "install" | "grant" | "import" | "add" => "C",
                "remove" | "ungrant" | "revoke" => "D",
                "rollback" | "enable" => "U",
                _ => "E",
            });
            let mut agents = vec![server];
            if !s(&body, "plugin").is_empty() {
                agents.insert(0, plugin_agent(s(&body, "plugin"), s(&body, "version")));
            }
            ev["agent"] = json!(agents);
            ev["entity"] = json!([{
                "type": coding(ENTITY_TYPE, "2", "System Object"),
                "role": coding(OBJECT_ROLE, "4", "Domain Resource"),
                "description": kind,
                "detail": [{"type": "record", "valueString": r.body}]
            }]);
        }
    }
    ev["outcome"] = json!(outcome);
    if !desc.is_empty() {
        ev["outcomeDesc"] = json!(desc);
    }
    ev
}

/// `Type/id` with a FHIR resource type name and a FHIR id.
fn is_reference(s: &str) -> bool {
    let Some((ty, id)) = s.split_once('/') else {
        return false;
    };
    ty.chars().next().is_some_and(|c| c.is_ascii_uppercase())
        && ty.len() <= 64
        && ty.chars().all(|c| c.is_ascii_alphanumeric())
        && crate::fhir::is_valid_id(id)
}

/// BALP outcome code (0, 4, 8) and description.
fn outcome_of(kind: &str, body: &Value) -> (&'static str, String) {
    let o = s(body, "outcome");
    let detail = || {
        let d = s(body, "reason");
        if d.is_empty() { s(body, "detail") } else { d }.to_owned()
    };
    match (kind, o) {
        (_, "ok" | "accepted" | "no-op" | "") => ("0", String::new()),
        (_, "denied" | "refused" | "rejected") => ("4", detail()),
        _ => ("8", detail()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(query: &str, patient: &str) -> Record {
        Record {
            seq: 1,
            id: "9b2e4d1c-0000-4000-8000-000000000001".into(),
            time: "2026-11-26T05:00:00.000Z".into(),
            kind: "host.access".into(),
            body: json!({"call_id": "c", "plugin": "evil/x", "host_fn": "fhir_read", "tenant": "clinic-a",
                         "patient": patient, "query": query, "outcome": "denied", "detail": "no"})
            .to_string(),
            prev: String::new(),
            hash: "ab".into(),
        }
    }

    #[test]
    fn only_well_formed_references_become_references() {
        let ok = render(&access("Observation/o-1.2", "p1"), "k");
        assert_eq!(ok["entity"][0]["what"]["reference"], "Patient/p1");
        assert_eq!(ok["entity"][1]["what"]["reference"], "Observation/o-1.2");
        // Whatever a plugin passes is described, never referenced, so an
        // upstream that checks references cannot reject the event.
        for junk in [
            "x y",
            "Observation/../../etc",
            "observation/1",
            "'; DROP TABLE log; --",
            "",
        ] {
            let ev = render(&access(junk, "p1"), "k");
            assert!(ev["entity"][1].get("what").is_none(), "{junk:?}: {ev}");
            assert!(
                ev["entity"][1]["description"]
                    .as_str()
                    .unwrap()
                    .contains("read of")
            );
            assert_eq!(ev["outcome"], "4");
        }
        let ev = render(&access("Observation/1", "not a patient id"), "k");
        assert!(ev["entity"][0].get("what").is_none(), "{ev}");
    }
}
