//! The audit log (`audit.db`): one append-only, hash-chained sequence of
//! records (bundle decisions, plugin calls, host-function accesses and
//! denials, grants, quarantines, imports, sync events), with checkpoints
//! signed by the appliance's key, and the trusted clock's high-water mark.
//! The format is specified in docs/audit-format.md.
//!
//! - [`log`]: appending (group commit) and the chain;
//! - [`checkpoint`]: signed (size, root, time) statements;
//! - [`verify`]: recomputing everything offline;
//! - [`auditevent`]: each record as a FHIR R4 AuditEvent (IHE BALP);
//! - this file: the schema and the bundle-decision records.
//!
//! Invariants:
//! - a record, once sealed (its hash set), can never be changed or deleted
//!   through SQLite (triggers abort it); `audit verify` catches any change
//!   made around SQLite;
//! - a record is committed (WAL, `synchronous=FULL`) before the caller that
//!   appended it goes on: before a decision is reported, a call's output
//!   returned, or a host function's data handed to a plugin.

pub mod auditevent;
pub mod checkpoint;
pub mod log;
pub mod verify;

use anyhow::{Context, Result};
use rusqlite::Connection;
use serde::Serialize;

/// Ordered migrations; index + 1 is the schema version.
pub const MIGRATIONS: &[&str] = &[
    // 1: the trusted clock and bundle decisions.
    "
    CREATE TABLE clock (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        high_water  INTEGER NOT NULL            -- unix seconds, only grows
    ) STRICT;
    CREATE TABLE bundle_decisions (
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        time          TEXT NOT NULL,            -- trusted clock, RFC 3339
        action        TEXT NOT NULL,            -- install | rollback | remove
        source        TEXT NOT NULL,            -- file path or plugin name
        bundle_sha256 TEXT,                     -- of the .cbx file, if read
        plugin        TEXT,                     -- from the signed manifest
        version       TEXT,
        signers       TEXT NOT NULL,            -- JSON array of verified key ids
        outcome       TEXT NOT NULL CHECK (outcome IN ('accepted', 'rejected', 'no-op')),
        reason        TEXT NOT NULL
    ) STRICT;
    CREATE TRIGGER bundle_decisions_no_update BEFORE UPDATE ON bundle_decisions
        BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
    CREATE TRIGGER bundle_decisions_no_delete BEFORE DELETE ON bundle_decisions
        BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
    ",
    // 2: plugin calls and host-function accesses.
    "
    CREATE TABLE plugin_calls (
        seq          INTEGER PRIMARY KEY AUTOINCREMENT,
        call_id      TEXT NOT NULL UNIQUE,      -- uuid, also on its host accesses
        time         TEXT NOT NULL,
        plugin       TEXT NOT NULL,
        version      TEXT NOT NULL,
        digest       TEXT NOT NULL,             -- manifest sha256
        function     TEXT NOT NULL,
        tenant       TEXT NOT NULL,
        patient      TEXT NOT NULL,
        requester    TEXT NOT NULL,             -- the app or user asking
        purpose      TEXT NOT NULL,             -- purpose of use
        outcome      TEXT NOT NULL,             -- ok | error | refused | quarantined
        detail       TEXT NOT NULL,
        duration_us  INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE host_accesses (
        seq          INTEGER PRIMARY KEY AUTOINCREMENT,
        call_id      TEXT NOT NULL,
        time         TEXT NOT NULL,
        plugin       TEXT NOT NULL,
        host_fn      TEXT NOT NULL,             -- fhir_search | fhir_read | audit_note
        tenant       TEXT NOT NULL,
        patient      TEXT NOT NULL,
        query        TEXT NOT NULL,             -- the search, reference or note
        outcome      TEXT NOT NULL,             -- ok | denied | error
        detail       TEXT NOT NULL,             -- e.g. total returned, or the reason
        duration_us  INTEGER NOT NULL
    ) STRICT;
    CREATE TRIGGER plugin_calls_append_only BEFORE UPDATE ON plugin_calls
        BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
    CREATE TRIGGER plugin_calls_no_delete BEFORE DELETE ON plugin_calls
        BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
    CREATE TRIGGER host_accesses_append_only BEFORE UPDATE ON host_accesses
        BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
    CREATE TRIGGER host_accesses_no_delete BEFORE DELETE ON host_accesses
        BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
    ",
    // 3: one hash-chained log absorbs the tables of 1 and 2 (kept as
    // views); legacy rows are sealed (id, chain) by `log::seal` on open.
    "
    CREATE TABLE log (
        seq        INTEGER PRIMARY KEY,           -- 1, 2, 3, … without gaps
        id         TEXT UNIQUE,                   -- uuid; the AuditEvent id
        time       TEXT NOT NULL,                 -- trusted clock, RFC 3339
        kind       TEXT NOT NULL,                 -- see docs/audit-format.md
        body       TEXT NOT NULL,                 -- JSON, hashed as stored
        cum_bytes  INTEGER,                       -- running total of body bytes
        prev       BLOB,                          -- hash of seq - 1
        hash       BLOB                           -- NULL only until sealed
    ) STRICT;
    CREATE TRIGGER log_sealed BEFORE UPDATE ON log WHEN OLD.hash IS NOT NULL
        BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
    CREATE TRIGGER log_no_delete BEFORE DELETE ON log
        BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
    CREATE INDEX log_unsealed ON log (seq) WHERE hash IS NULL;
    CREATE TABLE checkpoints (
        size    INTEGER PRIMARY KEY,              -- records covered
        root    BLOB NOT NULL,                    -- hash of record `size`
        time    TEXT NOT NULL,
        key_id  TEXT NOT NULL,                    -- the appliance key
        sig     BLOB NOT NULL                     -- ed25519 over the statement
    ) STRICT;
    CREATE TRIGGER checkpoints_no_update BEFORE UPDATE ON checkpoints
        BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
    CREATE TRIGGER checkpoints_no_delete BEFORE DELETE ON checkpoints
        BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
    CREATE TABLE sync_state (
        id               INTEGER PRIMARY KEY CHECK (id = 1),
        acked_seq        INTEGER NOT NULL DEFAULT 0,   -- upstream has 1..=acked_seq
        acked_checkpoint INTEGER,                      -- size of the last checkpoint sent with an acked batch
        last_success     TEXT,
        last_error       TEXT,
        last_error_time  TEXT,
        attempts         INTEGER NOT NULL DEFAULT 0    -- consecutive failures
    ) STRICT;
    INSERT INTO sync_state (id) VALUES (1);
    INSERT INTO log (time, kind, body)
    SELECT time, kind, body FROM (
        SELECT time, 0 AS src, seq, 'bundle.decision' AS kind,
               json_object('action', action, 'source', source, 'bundle_sha256', bundle_sha256,
                           'plugin', plugin, 'version', version, 'signers', json(signers),
                           'outcome', outcome, 'reason', reason) AS body
        FROM bundle_decisions
        UNION ALL
        SELECT time, 1, seq, 'plugin.call',
               json_object('call_id', call_id, 'time', time, 'plugin', plugin, 'version', version,
                           'digest', digest, 'function', function, 'tenant', tenant, 'patient', patient,
                           'requester', requester, 'purpose', purpose, 'outcome', outcome,
                           'detail', detail, 'duration_us', duration_us)
        FROM plugin_calls
        UNION ALL
        SELECT time, 2, seq, 'host.access',
               json_object('call_id', call_id, 'time', time, 'plugin', plugin, 'host_fn', host_fn,
                           'tenant', tenant, 'patient', patient, 'query', query, 'outcome', outcome,
                           'detail', detail, 'duration_us', duration_us)
        FROM host_accesses
    ) ORDER BY time, src, seq;
    DROP TABLE bundle_decisions;
    DROP TABLE plugin_calls;
    DROP TABLE host_accesses;
    CREATE VIEW bundle_decisions AS
        SELECT seq, time, body ->> '$.action' AS action, body ->> '$.source' AS source,
               body ->> '$.bundle_sha256' AS bundle_sha256, body ->> '$.plugin' AS plugin,
               body ->> '$.version' AS version, body -> '$.signers' AS signers,
               body ->> '$.outcome' AS outcome, body ->> '$.reason' AS reason
        FROM log WHERE kind = 'bundle.decision';
    CREATE VIEW plugin_calls AS
        SELECT seq, body ->> '$.call_id' AS call_id, body ->> '$.time' AS time,
               body ->> '$.plugin' AS plugin, body ->> '$.version' AS version,
               body ->> '$.digest' AS digest, body ->> '$.function' AS function,
               body ->> '$.tenant' AS tenant, body ->> '$.patient' AS patient,
               body ->> '$.requester' AS requester, body ->> '$.purpose' AS purpose,
               body ->> '$.outcome' AS outcome, body ->> '$.detail' AS detail,
               body ->> '$.duration_us' AS duration_us
        FROM log WHERE kind = 'plugin.call';
    CREATE VIEW host_accesses AS
        SELECT seq, body ->> '$.call_id' AS call_id, body ->> '$.time' AS time,
               body ->> '$.plugin' AS plugin, body ->> '$.host_fn' AS host_fn,
               body ->> '$.tenant' AS tenant, body ->> '$.patient' AS patient,
               body ->> '$.query' AS query, body ->> '$.outcome' AS outcome,
               body ->> '$.detail' AS detail, body ->> '$.duration_us' AS duration_us
        FROM log WHERE kind = 'host.access';
    CREATE INDEX log_call_id ON log (body ->> '$.call_id') WHERE kind IN ('plugin.call', 'host.access');
    ",
];

/// One bundle decision.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Decision {
    /// Sequence number (0 before it is recorded).
    pub seq: i64,
    /// When (trusted clock).
    pub time: String,
    /// `install`, `rollback` or `remove`.
    pub action: String,
    /// The file or name acted on.
    pub source: String,
    /// sha256 of the bundle file, when one was read.
    pub bundle_sha256: Option<String>,
    /// Plugin name, when known from a verified manifest.
    pub plugin: Option<String>,
    /// Plugin version, when known.
    pub version: Option<String>,
    /// Key ids whose signatures verified.
    pub signers: Vec<String>,
    /// `accepted`, `rejected` or `no-op`.
    pub outcome: String,
    /// The exact reason.
    pub reason: String,
}

/// Appends `d` as a `bundle.decision` record (its `seq` and `time` are
/// assigned here), durably, and returns its seq.
pub fn record(dir: &crate::datadir::DataDir, audit: &Connection, d: &Decision) -> Result<i64> {
    let body = serde_json::json!({
        "action": d.action,
        "source": d.source,
        "bundle_sha256": d.bundle_sha256,
        "plugin": d.plugin,
        "version": d.version,
        "signers": d.signers,
        "outcome": d.outcome,
        "reason": d.reason,
    });
    let receipt = log::append_signed(dir, audit, log::Entry::new("bundle.decision", &body))
        .context("cannot record the bundle decision in audit.db")?;
    Ok(receipt.seq)
}

/// Appends an administrative record (`grant`, `quarantine`, `fhir.import`,
/// `audit.export`, …) to the log of `dir`, durably, and returns its seq.
pub fn note(
    dir: &crate::datadir::DataDir,
    kind: &'static str,
    body: &serde_json::Value,
) -> Result<i64> {
    let conn = dir.open_audit()?;
    let receipt = log::append_signed(dir, &conn, log::Entry::new(kind, body))
        .with_context(|| format!("cannot record the {kind} in audit.db"))?;
    Ok(receipt.seq)
}

/// When the records not yet acknowledged upstream exceed the disk budget,
/// the reason PHI-returning work must be refused (fail closed); `None`
/// when within budget or when there is no budget (no upstream).
pub fn over_budget(audit: &Connection, limits: &crate::limits::Limits) -> Result<Option<String>> {
    let Some(budget) = limits.audit_budget_bytes else {
        return Ok(None);
    };
    let (records, bytes) = log::backlog_bytes(audit)?;
    Ok(budget_exceeded(limits, bytes).then(|| {
        format!(
            "fail-closed: {records} audit records ({bytes} bytes) are not yet upstream, over the disk budget of {budget} bytes; requests that return patient data are refused until the log syncs"
        )
    }))
}

/// True when `bytes` of unacknowledged record bodies exceed the disk
/// budget (never without a budget). The one definition of fail-closed.
pub fn budget_exceeded(limits: &crate::limits::Limits, bytes: i64) -> bool {
    limits.audit_budget_bytes.is_some_and(|b| bytes as u64 > b)
}

/// The newest `limit` decisions, oldest first.
pub fn recent(audit: &Connection, limit: u32) -> Result<Vec<Decision>> {
    let mut stmt = audit.prepare(
        "SELECT seq, time, action, source, bundle_sha256, plugin, version, signers, outcome, reason
         FROM (SELECT * FROM bundle_decisions ORDER BY seq DESC LIMIT ?1) ORDER BY seq",
    )?;
    let rows = stmt.query_map([limit], |r| {
        let signers: String = r.get(7)?;
        Ok(Decision {
            seq: r.get(0)?,
            time: r.get(1)?,
            action: r.get(2)?,
            source: r.get(3)?,
            bundle_sha256: r.get(4)?,
            plugin: r.get(5)?,
            version: r.get(6)?,
            signers: serde_json::from_str(&signers).unwrap_or_default(),
            outcome: r.get(8)?,
            reason: r.get(9)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
