//! Upload: pending audit records go upstream as FHIR `batch` Bundles of at
//! most 500 entries, each `PUT AuditEvent/{id}`, so a retry never makes a
//! duplicate. The latest signed checkpoint rides in `Bundle.signature`.
//!
//! Invariants:
//! - the cursor (`sync_state.acked_seq`) only moves over a prefix of
//!   entries the server answered 2xx; a failed entry and everything after
//!   it is sent again on the next try;
//! - records are never dropped or rewritten; an AuditEvent is a pure
//!   function of its record, so a resend is byte-identical;
//! - a pass that sends anything first appends its own `sync` record, so the
//!   pass's record travels in that same pass and a quiet log stays quiet.

use base64::Engine as _;
use ed25519_dalek::SigningKey;
use rusqlite::{Connection, params};
use serde::Serialize;
use serde_json::{Value, json};

use super::backoff::Backoff;
use super::client::{Client, SyncError};
use crate::audit::auditevent::{self, APPLIANCE_SYSTEM};
use crate::audit::checkpoint::{self, Checkpoint};
use crate::audit::log::{self, Entry};
use crate::bundle::manifest::format_time;
use crate::clock;
use crate::config::Upstream;
use crate::datadir::DataDir;
use crate::limits::Limits;

/// What an upload pass did.
#[derive(Debug, Default, Serialize)]
pub struct UploadReport {
    /// Entries sent (resends included).
    pub sent: u64,
    /// Batches posted.
    pub batches: u64,
    /// The cursor after the pass.
    pub acked_seq: i64,
    /// Records still pending.
    pub backlog: i64,
    /// Tries that failed and were retried within the pass.
    pub retries: u32,
}

/// Uploads everything pending, retrying with backoff up to the configured
/// attempts. Ends with an error if a try still fails at the last attempt.
pub fn upload(dir: &DataDir, up: &Upstream, limits: &Limits) -> Result<UploadReport, SyncError> {
    let local = |e: anyhow::Error| SyncError::Local(format!("{e:#}"));
    let conn = dir.open_audit().map_err(local)?;
    let key = crate::keys::read_secret(&dir.identity_key(), limits.max_key_file_bytes)
        .map_err(|e| SyncError::Local(format!("appliance key: {e}")))?;
    let client = Client::new(up, limits)?;
    let mut report = UploadReport::default();
    let mut backoff = Backoff::new(up.backoff, up.backoff_max);
    let appliance = crate::keys::KeyId::of(&key.verifying_key()).to_string();
    // Open the pass: its own record, and a checkpoint covering everything
    // it is about to send.
    let (acked, head) = cursor(&conn).map_err(local)?;
    if acked >= head {
        report.acked_seq = acked;
        return Ok(report);
    }
    // Sync events are recorded when the state changes (the first try after
    // a success, the first failure), so a long outage adds two records,
    // not two per pass.
    let failing: i64 = conn
        .query_row("SELECT attempts FROM sync_state WHERE id = 1", [], |r| {
            r.get(0)
        })
        .map_err(|e| local(e.into()))?;
    if failing == 0 {
        log::append_one(
            &conn,
            None,
            Entry::new(
                "sync",
                &json!({"action": "upload", "upstream": client.base(), "from": acked + 1, "pending": head - acked}),
            ),
        )
        .map_err(local)?;
    }
    let cp = checkpoint_at_head(&conn, &key).map_err(local)?;
    let mut attempt = 0u32;
    loop {
        match send_pending(&conn, &client, &appliance, &cp, limits, &mut report) {
            Ok(()) => break,
            Err(e) => {
                attempt += 1;
                note_failure(&conn, &e).map_err(local)?;
                if attempt >= up.attempts {
                    if failing > 0 {
                        return Err(e);
                    }
                    let _ = log::append_one(
                        &conn,
                        None,
                        Entry::new(
                            "sync",
                            &json!({"action": "failed", "outcome": "failed", "upstream": client.base(), "detail": e.to_string(), "attempts": attempt}),
                        ),
                    );
                    return Err(e);
                }
                report.retries += 1;
                std::thread::sleep(backoff.next_delay());
            }
        }
    }
    let (acked, head) = cursor(&conn).map_err(local)?;
    report.acked_seq = acked;
    report.backlog = head - acked;
    conn.execute(
        "UPDATE sync_state SET last_success = ?1, last_error = NULL, attempts = 0 WHERE id = 1",
        [format_time(clock::trusted_now(&conn).map_err(local)?)],
    )
    .map_err(|e| local(e.into()))?;
    // Upstream has the checkpoint now: it anchors `audit verify`.
    if acked >= cp.size {
        let state = dir.open_state().map_err(local)?;
        checkpoint::store_anchor(&state, &cp, "upstream").map_err(local)?;
        conn.execute(
            "UPDATE sync_state SET acked_checkpoint = ?1 WHERE id = 1",
            [cp.size],
        )
        .map_err(|e| local(e.into()))?;
    }
    Ok(report)
}

/// (acked_seq, head seq).
pub fn cursor(conn: &Connection) -> anyhow::Result<(i64, i64)> {
    let acked: i64 = conn.query_row("SELECT acked_seq FROM sync_state WHERE id = 1", [], |r| {
        r.get(0)
    })?;
    let (head, _, _) = log::head(conn)?;
    Ok((acked, head))
}

fn checkpoint_at_head(conn: &Connection, key: &SigningKey) -> anyhow::Result<Checkpoint> {
    let (head, root, _) = log::head(conn)?;
    match checkpoint::at(conn, head)? {
        Some(c) => Ok(c),
        None => checkpoint::sign(conn, key, head, &root, clock::trusted_now(conn)?),
    }
}

/// Sends batches until the cursor reaches the checkpoint's size (records
/// appended after the pass began wait for the next pass). While one batch
/// is on the wire, the next is rendered on another thread.
fn send_pending(
    conn: &Connection,
    client: &Client,
    appliance: &str,
    cp: &Checkpoint,
    limits: &Limits,
    report: &mut UploadReport,
) -> Result<(), SyncError> {
    let local = |e: anyhow::Error| SyncError::Local(format!("{e:#}"));
    let render = |recs: &[log::Record]| serde_json::to_vec(&batch(recs, appliance, cp));
    let mut prepared: Option<(i64, usize, Vec<u8>)> = None;
    loop {
        let (acked, _) = cursor(conn).map_err(local)?;
        if acked >= cp.size {
            return Ok(());
        }
        let (n, body) = match prepared.take() {
            Some((from, n, body)) if from == acked + 1 => (n, body),
            _ => {
                let to = (acked + limits.sync_batch as i64).min(cp.size);
                let recs = log::read_range(conn, acked + 1, to).map_err(local)?;
                contiguous(&recs, acked + 1, to)?;
                let body = render(&recs).map_err(|e| SyncError::Local(e.to_string()))?;
                (recs.len(), body)
            }
        };
        let last = acked + n as i64;
        let next_recs = if last < cp.size {
            let to = (last + limits.sync_batch as i64).min(cp.size);
            let r = log::read_range(conn, last + 1, to).map_err(local)?;
            contiguous(&r, last + 1, to)?;
            r
        } else {
            Vec::new()
        };
        report.batches += 1;
        report.sent += n as u64;
        let (answer, next_body) = std::thread::scope(|s| {
            let next = (!next_recs.is_empty()).then(|| s.spawn(|| render(&next_recs)));
            let answer = client.post_json(&body);
            (answer, next.map(|h| h.join()))
        });
        if let Some(Ok(Ok(b))) = next_body {
            prepared = Some((last + 1, next_recs.len(), b));
        }
        let answer = answer?;
        let ok = acked_prefix(&answer, n).map_err(|reason| SyncError::Protocol {
            url: client.base().to_owned(),
            reason,
        })?;
        if ok > 0 {
            conn.execute(
                "UPDATE sync_state SET acked_seq = ?1 WHERE id = 1 AND acked_seq = ?2",
                params![acked + ok as i64, acked],
            )
            .map_err(|e| local(e.into()))?;
        }
        if ok < n {
            let e = &answer["entry"][ok]["response"];
            return Err(SyncError::Protocol {
                url: client.base().to_owned(),
                reason: format!(
                    "entry for record {} answered {} ({}); it and the rest will be sent again",
                    acked + ok as i64 + 1,
                    e["status"].as_str().unwrap_or("no status"),
                    e.get("outcome").map(|o| o.to_string()).unwrap_or_default()
                ),
            });
        }
    }
}

/// Records `from..=to` must all be there: a gap means the log was
/// tampered with, and nothing past it is sent until `audit verify` is run.
fn contiguous(recs: &[log::Record], from: i64, to: i64) -> Result<(), SyncError> {
    let ok = recs.len() as i64 == to - from + 1
        && recs
            .iter()
            .enumerate()
            .all(|(i, r)| r.seq == from + i as i64);
    if ok {
        Ok(())
    } else {
        Err(SyncError::Local(format!(
            "audit records {from}..={to} are not all there; run `clinicbox audit verify`"
        )))
    }
}

/// The batch Bundle for `recs`, carrying checkpoint `cp`.
pub fn batch(recs: &[log::Record], appliance: &str, cp: &Checkpoint) -> Value {
    let cp_json = serde_json::to_vec(cp).unwrap_or_default();
    json!({
        "resourceType": "Bundle",
        "type": "batch",
        "signature": [{
            "type": [{"system": "urn:iso-astm:E1762-95:2013", "code": "1.2.840.10065.1.12.1.14", "display": "Source Signature"}],
            "when": cp.time,
            "who": {"identifier": {"system": APPLIANCE_SYSTEM, "value": appliance}},
            "sigFormat": "application/vnd.clinicbox.audit-checkpoint+json",
            "data": base64::engine::general_purpose::STANDARD.encode(cp_json)
        }],
        "entry": recs.iter().map(|r| json!({
            "fullUrl": format!("urn:uuid:{}", r.id),
            "resource": auditevent::render(r, appliance),
            "request": {"method": "PUT", "url": format!("AuditEvent/{}", r.id)}
        })).collect::<Vec<_>>()
    })
}

/// How many leading entries of a batch-response were answered 2xx.
fn acked_prefix(answer: &Value, sent: usize) -> Result<usize, String> {
    if answer.get("resourceType").and_then(Value::as_str) != Some("Bundle")
        || answer.get("type").and_then(Value::as_str) != Some("batch-response")
    {
        return Err("the answer is not a batch-response Bundle".into());
    }
    let entries = answer
        .get("entry")
        .and_then(Value::as_array)
        .ok_or("the batch-response has no entries")?;
    if entries.len() != sent {
        return Err(format!(
            "the batch-response has {} entries for {sent} sent",
            entries.len()
        ));
    }
    Ok(entries
        .iter()
        .take_while(|e| {
            e.pointer("/response/status")
                .and_then(Value::as_str)
                .is_some_and(|s| s.starts_with('2'))
        })
        .count())
}

fn note_failure(conn: &Connection, e: &SyncError) -> anyhow::Result<()> {
    conn.execute(
        "UPDATE sync_state SET last_error = ?1, last_error_time = ?2, attempts = attempts + 1 WHERE id = 1",
        params![e.to_string(), format_time(clock::trusted_now(conn)?)],
    )?;
    Ok(())
}

/// `sync status`: backlog, last success, last error.
#[derive(Debug, Serialize)]
pub struct Status {
    /// Upstream URL, if configured.
    pub upstream: Option<String>,
    /// Records not yet acknowledged.
    pub backlog_records: i64,
    /// Their body bytes.
    pub backlog_bytes: i64,
    /// The disk budget, if any.
    pub budget_bytes: Option<u64>,
    /// True when calls are refused for the backlog.
    pub fail_closed: bool,
    /// Highest acknowledged record.
    pub acked_seq: i64,
    /// Last successful pass.
    pub last_success: Option<String>,
    /// Last error and when.
    pub last_error: Option<String>,
    /// When the last error happened.
    pub last_error_time: Option<String>,
    /// Consecutive failed tries.
    pub failed_attempts: i64,
}

/// The sync status recorded in `conn` (an open `audit.db`).
pub fn status(conn: &Connection, up: Option<&Upstream>, limits: &Limits) -> anyhow::Result<Status> {
    let (records, bytes) = log::backlog_bytes(conn)?;
    let (acked, last_success, last_error, last_error_time, attempts) = conn.query_row(
        "SELECT acked_seq, last_success, last_error, last_error_time, attempts FROM sync_state WHERE id = 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
    )?;
    Ok(Status {
        upstream: up.map(|u| u.url.clone()),
        backlog_records: records,
        backlog_bytes: bytes,
        budget_bytes: limits.audit_budget_bytes,
        fail_closed: crate::audit::budget_exceeded(limits, bytes),
        acked_seq: acked,
        last_success,
        last_error,
        last_error_time,
        failed_attempts: attempts,
    })
}
