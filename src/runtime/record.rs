//! Recording plugin calls (`plugin.call`) and host-function accesses
//! (`host.access`) in the audit log, and reading them back.
//!
//! Invariant: a call's output leaves the host only once the call's record
//! and the records of every host access it made are durable (group commit,
//! `synchronous=FULL`). An access is queued when it happens and not waited
//! for there: until the call returns, the data it covers is inside the
//! sandbox, which has no other way out.

use anyhow::Result;
use rusqlite::Connection;

use crate::audit::log::{AuditLog, Entry, Receipt};
use serde::Serialize;

/// One finished plugin call.
#[derive(Debug, Clone, Serialize)]
pub struct CallRecord {
    /// Call id (uuid).
    pub call_id: String,
    /// When it started (RFC 3339).
    pub time: String,
    /// Plugin name.
    pub plugin: String,
    /// Plugin version (empty if not resolved).
    pub version: String,
    /// Manifest digest (empty if not resolved).
    pub digest: String,
    /// Exported function.
    pub function: String,
    /// Tenant.
    pub tenant: String,
    /// Patient.
    pub patient: String,
    /// The requesting app or user.
    pub requester: String,
    /// Purpose of use.
    pub purpose: String,
    /// ok | error | refused | quarantined.
    pub outcome: String,
    /// Error text, or the output size.
    pub detail: String,
    /// Wall-clock duration.
    pub duration_us: u64,
}

/// Appends a call record, durably.
pub fn call(log: &AuditLog, r: &CallRecord) -> Result<Receipt> {
    log.append(Entry::new("plugin.call", r))
}

/// One host-function access.
#[derive(Debug, Clone, Serialize)]
pub struct AccessRecord {
    /// The call it belongs to.
    pub call_id: String,
    /// When (RFC 3339).
    pub time: String,
    /// Plugin name.
    pub plugin: String,
    /// fhir_search | fhir_read | audit_note.
    pub host_fn: String,
    /// Tenant.
    pub tenant: String,
    /// Patient.
    pub patient: String,
    /// The query, reference or note.
    pub query: String,
    /// ok | denied | error.
    pub outcome: String,
    /// Result size, or the reason.
    pub detail: String,
    /// Duration.
    pub duration_us: u64,
}

/// Appends a host-access record, durably.
pub fn access(log: &AuditLog, r: &AccessRecord) -> Result<crate::audit::log::Pending> {
    log.submit(Entry::new("host.access", r))
}

/// The newest `limit` calls, oldest first.
pub fn recent_calls(audit: &Connection, limit: u32) -> Result<Vec<CallRecord>> {
    let mut stmt = audit.prepare(
        "SELECT call_id, time, plugin, version, digest, function, tenant, patient, requester, purpose, outcome, detail, duration_us
         FROM (SELECT * FROM plugin_calls ORDER BY seq DESC LIMIT ?1) ORDER BY seq",
    )?;
    let rows = stmt.query_map([limit], |r| {
        Ok(CallRecord {
            call_id: r.get(0)?,
            time: r.get(1)?,
            plugin: r.get(2)?,
            version: r.get(3)?,
            digest: r.get(4)?,
            function: r.get(5)?,
            tenant: r.get(6)?,
            patient: r.get(7)?,
            requester: r.get(8)?,
            purpose: r.get(9)?,
            outcome: r.get(10)?,
            detail: r.get(11)?,
            duration_us: r.get::<_, i64>(12)? as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Host accesses of one call, in order.
pub fn accesses_of(audit: &Connection, call_id: &str) -> Result<Vec<AccessRecord>> {
    let mut stmt = audit.prepare(
        "SELECT call_id, time, plugin, host_fn, tenant, patient, query, outcome, detail, duration_us FROM host_accesses WHERE call_id = ?1 ORDER BY seq",
    )?;
    let rows = stmt.query_map([call_id], |r| {
        Ok(AccessRecord {
            call_id: r.get(0)?,
            time: r.get(1)?,
            plugin: r.get(2)?,
            host_fn: r.get(3)?,
            tenant: r.get(4)?,
            patient: r.get(5)?,
            query: r.get(6)?,
            outcome: r.get(7)?,
            detail: r.get(8)?,
            duration_us: r.get::<_, i64>(9)? as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
