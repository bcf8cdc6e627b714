//! The audit database (`audit.db`): the append-only record of every bundle
//! decision, and the trusted clock's high-water mark.
//!
//! This is the interim log; the tamper-evident chain, signed checkpoints and
//! upstream sync build on these tables with further migrations.
//!
//! Invariants: rows are only ever inserted (SQLite triggers abort any UPDATE
//! or DELETE); a decision is committed (WAL, `synchronous=FULL`) before the
//! command that made it reports its outcome.

use anyhow::{Context, Result};
use rusqlite::{Connection, params};
use serde::Serialize;

use crate::bundle::manifest::format_time;
use crate::clock;

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

/// Appends `d` (its `seq` and `time` are assigned here) and returns its seq.
pub fn record(audit: &Connection, d: &Decision) -> Result<i64> {
    let now = clock::trusted_now(audit)?;
    let signers = serde_json::to_string(&d.signers)?;
    audit
        .execute(
            "INSERT INTO bundle_decisions
               (time, action, source, bundle_sha256, plugin, version, signers, outcome, reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                format_time(now),
                d.action,
                d.source,
                d.bundle_sha256,
                d.plugin,
                d.version,
                signers,
                d.outcome,
                d.reason
            ],
        )
        .context("cannot record the bundle decision in audit.db")?;
    Ok(audit.last_insert_rowid())
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
