//! Device ingest: `POST /fhir/Observation` (one Observation) and
//! `POST /fhir/Bundle` (a Bundle of Observations) from bedside devices.
//!
//! Steps, each before the next:
//! 1. parse and check every resource (an Observation with a
//!    `subject` of `Patient/<id>`); one bad entry refuses the whole request
//!    with 400/422 naming the entry and field, and nothing is stored;
//! 2. store them in the token's tenant, all or none, through the
//!    group-committing writer (`fhir::writer`): concurrent devices share
//!    one transaction and one fsync (an Observation without `id` gets one
//!    derived from its tenant and content, [`store::content_id`], so that a
//!    device resending the same reading after a timeout or a 503 does not
//!    store it twice). This returns once they have committed; the WAL's
//!    fsync runs meanwhile, beside steps 3–4;
//! 3. queue the `fhir.ingest` record in the audit log;
//! 4. run, per patient, every plugin function whose manifest subscription
//!    matches one of the stored (or resent unchanged) resources, with input
//!    `{"patient": "Patient/<id>"}`; each call is recorded by the runtime;
//! 5. wait until the resources are durable (the fsync of step 2) and the
//!    `fhir.ingest` record is; only then answer 201 with what was stored
//!    and each triggered call's output (e.g. a NEWS2 `RiskAssessment`) or
//!    error. So a 201 still means "on disk", and the fsync is no longer on
//!    the way to the plugins.
//!
//! Steps 1–2 (`store`), 4 (`plugins`) and 5's waits for the fsync
//! (`durable`) and for the record (`record`) are timed in `/metrics`
//! (`clinicbox_ingest_stage_seconds`), beside the wait for a worker
//! before step 1 (`queue`, timed in `super::http`).

use serde::Serialize;
use serde_json::{Value, json};

use super::App;
use super::api::{CallAnswer, RETRY_LATER_SECS, Reply, requester, run_call};
use super::metrics::IngestStage;
use crate::audit::log::Entry;
use crate::fhir::{self, store};
use crate::runtime::CallRequest;
use crate::tokens::Principal;

/// Handles an ingest request.
pub fn ingest(app: &App, who: &Principal, segs: &[&str], body: &[u8]) -> Reply {
    let env = app.rt.env();
    let started = std::time::Instant::now();
    let doc: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Reply::error(400, "structure", &format!("request body is not JSON: {e}")),
    };
    let expect_bundle = segs.len() == 1 || segs[1] == "Bundle";
    let resources = match collect(
        doc,
        &who.tenant,
        expect_bundle,
        env.limits.max_ingest_entries,
    ) {
        Ok(r) => r,
        Err(msg) => return Reply::error(422, "invalid", &msg),
    };
    let now_ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    // A 201 means on disk: the writer commits in one transaction with
    // whatever other devices sent, and fsyncs once for all of them.
    let (refs, values): (Vec<(String, String)>, Vec<Value>) = resources
        .into_iter()
        .map(|(id, patient, res)| ((id, patient), res))
        .unzip();
    let values: std::sync::Arc<[Value]> = values.into();
    let stored = app
        .fhir_writer
        .store(&who.tenant, values.clone(), now_ms as i64);
    app.metrics
        .ingest_stage(IngestStage::Store, started.elapsed());
    let (written, durable) = match stored {
        Ok(s) => (s.upserted, s.durable),
        Err(fhir::writer::WriteError::DiskFull(e)) => {
            log::error!("api: ingest: the disk holding fhir.db is full: {e}");
            return Reply::error(
                503,
                "transient",
                "the clinicbox data disk is full: nothing was stored; resend later",
            )
            .retry_after(RETRY_LATER_SECS);
        }
        Err(e) => {
            log::error!("api: ingest: {e:#}");
            return Reply::error(500, "exception", &format!("cannot store: {e:#}"));
        }
    };
    // Every patient the request carried readings of, stored or not: the
    // record of a resend (or of the retry of an ingest that could not be
    // recorded) names its patient too.
    let patients: std::collections::BTreeSet<String> =
        refs.iter().map(|(_, p)| p.clone()).collect();
    // A resource resent unchanged (or older than what is stored) is not
    // stored again; it is listed as `unchanged`. A resend still triggers
    // (a device that timed out waiting for its score resends to get it);
    // an older version than the stored one does not.
    let mut resources: Vec<(String, String, &Value)> = Vec::new();
    let mut unchanged: Vec<String> = Vec::new();
    let mut resent: Vec<(String, String, &Value)> = Vec::new();
    for (((id, patient), res), w) in refs.into_iter().zip(values.iter()).zip(written) {
        match w {
            store::Upserted::Created | store::Upserted::Updated => {
                resources.push((id, patient, res));
            }
            store::Upserted::Unchanged => {
                unchanged.push(format!("Observation/{id}"));
                resent.push((id, patient, res));
            }
            store::Upserted::Stale => unchanged.push(format!("Observation/{id}")),
        }
    }
    app.metrics
        .ingested
        .fetch_add(resources.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let refs: Vec<String> = resources
        .iter()
        .map(|(id, _, _)| format!("Observation/{id}"))
        .collect();
    let record = json!({
        "action": "ingest",
        "requester": requester(who),
        "token": who.id,
        "tenant": who.tenant,
        "resources": refs,
        "unchanged": unchanged,
        "patients": patients,
    });
    // Queued now, waited for before the answer: the triggered calls'
    // records share its fsync.
    let recorded = match env.audit.submit(Entry::new("fhir.ingest", &record)) {
        Ok(p) => p,
        Err(e) => {
            // No answer before the fsync, this one included.
            if let Err(why) = durable.wait() {
                return not_durable(&why);
            }
            return unrecorded(&e);
        }
    };
    let plugins_started = std::time::Instant::now();
    let subs = match app.rt.subscriptions() {
        Ok(s) => s,
        Err(e) => {
            log::error!("api: subscriptions: {e:#}");
            vec![]
        }
    };
    // (plugin, function, patient), each once, in a stable order; only
    // plugins granted something in this tenant (an ungranted one could
    // only answer with the host's denial).
    let granted = |plugin: &str| {
        crate::runtime::grants::granted_memo(&env.dir, &who.tenant, plugin)
            .is_ok_and(|g| !g.is_empty())
    };
    let mut triggers = std::collections::BTreeSet::new();
    for (plugin, sub) in subs.iter().filter(|(p, _)| granted(p)) {
        for (id, patient, res) in resources.iter().chain(&resent) {
            if sub.matches(res, id) {
                triggers.insert((plugin.clone(), sub.function.clone(), patient.clone()));
            }
        }
    }
    let mut triggered = Vec::new();
    for (plugin, function, patient) in triggers {
        let call = CallRequest {
            tenant: who.tenant.clone(),
            patient: patient.clone(),
            requester: requester(who),
            purpose: "TREAT".into(),
            plugin: plugin.clone(),
            function: function.clone(),
            input: json!({"patient": format!("Patient/{patient}")})
                .to_string()
                .into_bytes(),
        };
        triggered.push(match run_call(app, &call) {
            Ok(mut answer) => {
                answer.patient = Some(format!("Patient/{patient}"));
                Triggered::Answered(answer)
            }
            Err(reply) => Triggered::Refused(json!({
                "plugin": plugin,
                "function": function,
                "patient": format!("Patient/{patient}"),
                "status": reply.status,
                "error": serde_json::from_slice::<Value>(&reply.body).unwrap_or(Value::Null),
            })),
        });
    }
    let durable_started = std::time::Instant::now();
    app.metrics
        .ingest_stage(IngestStage::Plugins, durable_started - plugins_started);
    let synced = durable.wait();
    let record_started = std::time::Instant::now();
    app.metrics
        .ingest_stage(IngestStage::Durable, record_started - durable_started);
    if let Err(e) = synced {
        return not_durable(&e);
    }
    let recorded = recorded.wait();
    app.metrics
        .ingest_stage(IngestStage::Record, record_started.elapsed());
    if let Err(e) = recorded {
        return unrecorded(&e);
    }
    Reply::json(
        201,
        &Answer {
            stored: refs,
            triggered,
            unchanged,
        },
    )
}

/// The 201 answer (fields sorted, as they always were).
#[derive(Serialize)]
struct Answer {
    stored: Vec<String>,
    triggered: Vec<Triggered>,
    unchanged: Vec<String>,
}

/// One triggered call: its answer, or why it has none.
#[derive(Serialize)]
#[serde(untagged)]
enum Triggered {
    Answered(CallAnswer),
    Refused(Value),
}

/// The 500 for Observations whose fsync failed.
fn not_durable(e: &fhir::writer::WriteError) -> Reply {
    log::error!("api: ingest: {e:#}");
    Reply::error(
        500,
        "exception",
        &format!("the Observations may not be on disk; resend them: {e:#}"),
    )
}

fn unrecorded(e: &anyhow::Error) -> Reply {
    log::error!("api: cannot record an ingest: {e:#}");
    Reply::error(
        503,
        "transient",
        "stored, but the ingest could not be recorded; retry",
    )
    .retry_after(RETRY_LATER_SECS)
}

/// The request's Observations as (id, patient, resource), all checked; an
/// Observation without `id` gets its [`store::content_id`] in `tenant`,
/// or, if it has no time of day to make one from, a new UUID v7.
fn collect(
    mut doc: Value,
    tenant: &str,
    expect_bundle: bool,
    max: usize,
) -> Result<Vec<(String, String, Value)>, String> {
    let ty = doc
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("");
    let list: Vec<(String, Value)> = if expect_bundle {
        if ty != "Bundle" {
            return Err(format!("resourceType: expected Bundle, got {ty:?}"));
        }
        let Some(entries) = doc.get_mut("entry").and_then(Value::as_array_mut) else {
            return Err("Bundle.entry: missing or not an array".into());
        };
        if entries.is_empty() || entries.len() > max {
            return Err(format!(
                "Bundle.entry: must hold 1 to {max} entries, has {}",
                entries.len()
            ));
        }
        entries
            .iter_mut()
            .enumerate()
            .map(|(i, e)| match e.get_mut("resource") {
                Some(r) => Ok((format!("Bundle.entry[{i}].resource"), r.take())),
                None => Err(format!("Bundle.entry[{i}]: no resource")),
            })
            .collect::<Result<_, _>>()?
    } else {
        vec![("Observation".to_owned(), doc)]
    };
    let mut out = Vec::with_capacity(list.len());
    for (at, mut res) in list {
        let rty = res
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or("");
        if rty != "Observation" {
            return Err(format!(
                "{at}.resourceType: device ingest takes Observations, got {rty:?}"
            ));
        }
        let id = match res.get("id") {
            None => {
                let id = match store::content_id(tenant, &res) {
                    Some(id) => id,
                    None => crate::audit::log::new_id().map_err(|e| format!("{e:#}"))?,
                };
                res["id"] = json!(id);
                id
            }
            Some(Value::String(s)) if fhir::is_valid_id(s) => s.clone(),
            Some(other) => return Err(format!("{at}.id: {other} is not a FHIR id")),
        };
        let subject = res
            .pointer("/subject/reference")
            .and_then(Value::as_str)
            .unwrap_or("");
        let Some(patient) = subject
            .strip_prefix("Patient/")
            .filter(|p| fhir::is_valid_id(p))
        else {
            return Err(format!(
                "{at}.subject.reference: must be Patient/<id>, got {subject:?}"
            ));
        };
        if res.get("status").and_then(Value::as_str).is_none() {
            return Err(format!("{at}.status: required"));
        }
        if res.get("code").is_none() {
            return Err(format!("{at}.code: required"));
        }
        store::last_updated_ms(&res).map_err(|e| format!("{at}.{e}"))?;
        out.push((id, patient.to_owned(), res));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collect_checks_every_entry_and_names_it() {
        let obs = json!({"resourceType": "Observation", "status": "final", "code": {}, "subject": {"reference": "Patient/p1"}});
        let got = collect(obs.clone(), "t1", false, 10).unwrap();
        assert_eq!(got[0].1, "p1");
        assert_eq!(got[0].0.len(), 36, "an id was assigned");
        let mut bad = obs.clone();
        bad["subject"] = json!({"reference": "Group/g"});
        let bundle =
            json!({"resourceType": "Bundle", "entry": [{"resource": obs}, {"resource": bad}]});
        let e = collect(bundle, "t1", true, 10).unwrap_err();
        assert!(
            e.starts_with("Bundle.entry[1].resource.subject.reference"),
            "{e}"
        );
        let e = collect(json!({"resourceType": "Patient"}), "t1", false, 10).unwrap_err();
        assert!(e.contains("takes Observations"), "{e}");
        let many = json!({"resourceType": "Bundle", "entry": vec![json!({}); 11]});
        assert!(
            collect(many, "t1", true, 10)
                .unwrap_err()
                .contains("1 to 10")
        );
    }

    /// A resent reading keeps its id (so it is not stored twice); another
    /// reading, or the same one in another tenant, gets another.
    #[test]
    fn an_id_less_observation_gets_the_same_id_when_resent() {
        let obs = json!({"resourceType": "Observation", "status": "final", "code": {"text": "pulse"},
            "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2026-11-27T06:00:00.1Z",
            "valueQuantity": {"value": 72}});
        let id = |o: &Value, t: &str| collect(o.clone(), t, false, 10).unwrap()[0].0.clone();
        let first = id(&obs, "t1");
        assert!(fhir::is_valid_id(&first), "{first}");
        assert_eq!(id(&obs, "t1"), first, "a resend keeps its id");
        let mut restamped = obs.clone();
        restamped["meta"] = json!({"lastUpdated": "2026-11-27T06:00:01Z"});
        assert_eq!(
            id(&restamped, "t1"),
            first,
            "meta.lastUpdated is not content"
        );
        assert_ne!(id(&obs, "t2"), first, "another tenant");
        let mut later = obs.clone();
        later["effectiveDateTime"] = json!("2026-11-27T06:00:00.2Z");
        let second = id(&later, "t1");
        assert_ne!(second, first, "another reading");
        assert!(
            second > first,
            "ids sort by the reading's time: {first} {second}"
        );
        // 2026-11-27T06:00:00.100Z, in Unix ms: the first 48 bits.
        let ms = 1_795_759_200_100u64;
        assert_eq!(
            first.replace('-', "")[..12],
            format!("{ms:012x}"),
            "{first}"
        );
        let mut other = obs.clone();
        other["valueQuantity"]["value"] = json!(73);
        assert_ne!(id(&other, "t1"), first, "another value");
        // No time of day: nothing tells two such readings apart, so each
        // gets a new id (as before content ids).
        let mut dateless = obs.clone();
        dateless
            .as_object_mut()
            .unwrap()
            .remove("effectiveDateTime");
        assert_ne!(id(&dateless, "t1"), id(&dateless, "t1"), "no time");
        let mut day = obs.clone();
        day["effectiveDateTime"] = json!("2026-11-27");
        assert_ne!(id(&day, "t1"), id(&day, "t1"), "a date only");
        // The time comes from effective[x] first, issued last; an
        // unreadable one is passed over.
        let mut both = obs.clone();
        both["issued"] = json!("2026-11-27T07:00:00Z");
        assert_eq!(
            id(&both, "t1")[..8],
            first[..8],
            "effectiveDateTime before issued"
        );
        let mut bad = both.clone();
        bad["effectiveDateTime"] = json!("yesterday");
        let at_issued = format!("{:012x}", 1_795_762_800_000u64);
        assert_eq!(
            id(&bad, "t1").replace('-', "")[..12],
            at_issued,
            "issued, the readable one"
        );
    }
}
