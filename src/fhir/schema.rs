//! The FHIR cache's schema (`fhir.db`), as ordered migrations.
//!
//! Layout, chosen so that every patient-scoped query is one index range
//! scan (see BENCHMARKS.md for the measurements behind the column order):
//!
//! - `resources`: one row per (tenant, type, id), the current version's
//!   JSON, versionId, lastUpdated (ms), content hash, tombstone flag.
//! - `compartment`: (tenant, patient, type, sort key, rid) for every
//!   patient whose compartment holds the resource (patient '' when none).
//! - `idx_token`: (tenant, patient, type, param, code, sort key, rid,
//!   system), so "this patient's vital signs, newest first" is a backward
//!   range scan that needs no sort.
//! - `idx_date`: (tenant, patient, type, param, high, low, rid), so "since
//!   date X" is a range scan on `high`.
//! - `idx_ref`: reference targets used by `_include`.
//! - `idx_token_lastn`: a partial index of the Observation `code` rows by
//!   (tenant, patient, code, system, sort key), for `Observation/$lastn`.
//!
//! Invariant: index rows exist only for live (non-deleted) resources and
//! always match the stored JSON; they are rewritten in the same
//! transaction as the resource row.

/// Ordered migrations; index + 1 is the schema version.
pub const MIGRATIONS: &[&str] = &[
    // 1: resources, compartment and search indexes.
    "
    CREATE TABLE tenants (
        tid   INTEGER PRIMARY KEY,
        name  TEXT NOT NULL UNIQUE
    ) STRICT;
    CREATE TABLE resources (
        rid           INTEGER PRIMARY KEY,
        tid           INTEGER NOT NULL REFERENCES tenants(tid),
        type          TEXT NOT NULL,
        id            TEXT NOT NULL,
        version_id    INTEGER NOT NULL,
        last_updated  INTEGER NOT NULL,          -- Unix ms, UTC
        hash          BLOB NOT NULL,             -- sha256 of the content without meta.versionId/lastUpdated
        deleted       INTEGER NOT NULL DEFAULT 0,
        json          TEXT,                      -- NULL for a tombstone
        UNIQUE (tid, type, id)
    ) STRICT;
    CREATE TABLE compartment (
        tid      INTEGER NOT NULL,
        patient  TEXT NOT NULL,                  -- '' when in no patient's compartment
        type     INTEGER NOT NULL,
        sort_ms  INTEGER NOT NULL,               -- sort key; i64::MIN when absent
        rid      INTEGER NOT NULL,
        PRIMARY KEY (tid, patient, type, sort_ms, rid)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX compartment_rid ON compartment(rid);
    CREATE TABLE idx_token (
        tid      INTEGER NOT NULL,
        patient  TEXT NOT NULL,
        type     INTEGER NOT NULL,
        param    INTEGER NOT NULL,
        code     TEXT NOT NULL,
        sort_ms  INTEGER NOT NULL,
        rid      INTEGER NOT NULL,
        system   TEXT NOT NULL,                  -- '' when the value has no system
        PRIMARY KEY (tid, patient, type, param, code, sort_ms, rid, system)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX idx_token_rid ON idx_token(rid, param, code);
    CREATE TABLE idx_date (
        tid      INTEGER NOT NULL,
        patient  TEXT NOT NULL,
        type     INTEGER NOT NULL,
        param    INTEGER NOT NULL,
        high     INTEGER NOT NULL,
        low      INTEGER NOT NULL,
        rid      INTEGER NOT NULL,
        sort_ms  INTEGER NOT NULL,
        PRIMARY KEY (tid, patient, type, param, high, low, rid)
    ) STRICT, WITHOUT ROWID;
    CREATE INDEX idx_date_rid ON idx_date(rid, param);
    CREATE TABLE idx_ref (
        rid      INTEGER NOT NULL,
        param    TEXT NOT NULL,                  -- e.g. 'medication'
        target   TEXT NOT NULL,                  -- 'Type/id'
        PRIMARY KEY (rid, param, target)
    ) STRICT, WITHOUT ROWID;
    ",
    // 2: `Observation/$lastn`: each patient's Observation.code groups
    // (`system`, `code`) in order, and each group's rows newest first, so
    // the newest few of every code are one index seek per group however
    // long the history. Partial: Observation (type 2) `code` (param 1) rows.
    "
    CREATE INDEX idx_token_lastn ON idx_token(tid, patient, code, system, sort_ms, rid)
        WHERE type = 2 AND param = 1;
    ",
];
