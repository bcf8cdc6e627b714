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
//! - `obs_lastn`: for `Observation/$lastn`, one row per (category coding,
//!   code coding) pair of each Observation, keyed (tenant, patient,
//!   category, code, system, sort key, rid, category system), with the
//!   Observation's status alongside. So a patient's code groups *within a
//!   category* are one loose index scan, each group newest first, and the
//!   usual `status` filter is a column test: the groups of other categories
//!   (a lab code, when vital signs are asked for) are never visited,
//!   however long their history. A group is read past its newest rows only
//!   as far as a filter rejects them. `status` is NULL unless the resource
//!   has exactly one status. No index by rid: its rows are exactly the
//!   product of the resource's `code` and `category` rows in `idx_token`,
//!   which give the keys to delete (`store::clear_index`).
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
    // 3: `obs_lastn` replaces `idx_token_lastn`, filled from `idx_token`:
    // Observation (type 2) `code` (param 1) rows × the same resource's
    // `category` (param 2) rows for the same patient, with its single
    // `status` (param 3) or NULL. The old index goes last: the fill reads
    // the Observation code rows through it.
    "
    CREATE TABLE obs_lastn (
        tid         INTEGER NOT NULL,
        patient     TEXT NOT NULL,
        category    TEXT NOT NULL,               -- the category coding's code
        code        TEXT NOT NULL,
        system      TEXT NOT NULL,               -- the code coding's system; '' when none
        sort_ms     INTEGER NOT NULL,
        rid         INTEGER NOT NULL,
        cat_system  TEXT NOT NULL,               -- the category coding's system; '' when none
        status      TEXT,                        -- the one status code; NULL when not exactly one
        PRIMARY KEY (tid, patient, category, code, system, sort_ms, rid, cat_system)
    ) STRICT, WITHOUT ROWID;
    INSERT OR IGNORE INTO obs_lastn
    SELECT c.tid, c.patient, k.code, c.code, c.system, c.sort_ms, c.rid, k.system,
           (SELECT CASE WHEN count(*) = 1 THEN max(s.code) END
              FROM idx_token s WHERE s.rid = c.rid AND s.param = 3 AND s.patient = c.patient)
      FROM idx_token c
      JOIN idx_token k ON k.rid = c.rid AND k.param = 2 AND k.patient = c.patient
     WHERE c.type = 2 AND c.param = 1;
    DROP INDEX idx_token_lastn;
    ",
];

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::MIGRATIONS;
    use crate::fhir::store::upsert;

    /// Migration 3 fills `obs_lastn` for a cache written before it with
    /// exactly the rows the writer now writes.
    #[test]
    fn migration_3_backfills_obs_lastn_as_the_writer_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let cat = |s: Option<&str>, c: &str| match s {
            Some(s) => json!({"coding": [{"system": s, "code": c}]}),
            None => json!({"coding": [{"code": c}]}),
        };
        let vs = "http://terminology.hl7.org/CodeSystem/observation-category";
        let observations = [
            json!({"resourceType": "Observation", "id": "a", "status": "final",
                "category": [cat(Some(vs), "vital-signs")],
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}, {"code": "hr"}]},
                "subject": {"reference": "Patient/p1"},
                "performer": [{"reference": "Patient/p2"}],
                "effectiveDateTime": "2026-01-01T00:00:00Z"}),
            json!({"resourceType": "Observation", "id": "b", "status": "preliminary",
                "category": [cat(Some(vs), "vital-signs"), cat(None, "laboratory")],
                "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]},
                "subject": {"reference": "Patient/p1"}}),
            // Not one status: NULL. No category: no rows.
            json!({"resourceType": "Observation", "id": "c", "status": ["final", "amended"],
                "category": [cat(None, "survey")], "code": {"text": "x", "coding": [{"code": "q"}]},
                "subject": {"reference": "Patient/p1"}}),
            json!({"resourceType": "Observation", "id": "d", "status": "final",
                "code": {"coding": [{"code": "q"}]}, "subject": {"reference": "Patient/p1"}}),
            json!({"resourceType": "Condition", "id": "e",
                "category": [cat(None, "problem-list-item")], "code": {"coding": [{"code": "q"}]},
                "subject": {"reference": "Patient/p1"}}),
        ];
        let a_path = dir.path().join("a.db");
        let a = crate::db::open(&a_path, MIGRATIONS, true).unwrap();
        a.execute("INSERT INTO tenants(name) VALUES ('t')", [])
            .unwrap();
        for o in &observations {
            upsert(&a, 1, o, 0).unwrap();
        }
        let rows = |c: &rusqlite::Connection| -> Vec<Vec<rusqlite::types::Value>> {
            let mut stmt = c
                .prepare("SELECT * FROM obs_lastn ORDER BY tid, patient, category, code, system, rid, cat_system")
                .unwrap();
            stmt.query_map([], |r| (0..9).map(|i| r.get(i)).collect())
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        let written = rows(&a);
        // a: 2 patients × 1 category × 2 codes; b: 2 categories; c: 1.
        assert_eq!(written.len(), 4 + 2 + 1, "{written:?}");
        let null_status = written
            .iter()
            .filter(|r| r[8] == rusqlite::types::Value::Null)
            .count();
        assert_eq!(null_status, 1, "{written:?}");
        drop(a);

        // The same index rows in a cache at schema 2, then migrated.
        let b_path = dir.path().join("b.db");
        let b = crate::db::open(&b_path, &MIGRATIONS[..2], true).unwrap();
        b.execute("ATTACH ?1 AS a", [a_path.to_str().unwrap()])
            .unwrap();
        b.execute_batch(
            "INSERT INTO tenants SELECT * FROM a.tenants;
             INSERT INTO resources SELECT * FROM a.resources;
             INSERT INTO idx_token SELECT * FROM a.idx_token;
             DETACH a;",
        )
        .unwrap();
        drop(b);
        let b = crate::db::open(&b_path, MIGRATIONS, false).unwrap();
        assert_eq!(rows(&b), written);

        // An update and a delete leave exactly the rows of what is stored.
        use rusqlite::types::Value::{Integer, Text};
        let rid = |id: &str| {
            b.query_row("SELECT rid FROM resources WHERE id = ?1", [id], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap()
        };
        let mut changed = observations[0].clone();
        changed["category"] = json!([cat(None, "laboratory")]);
        changed["code"] = json!({"coding": [{"code": "z"}]});
        upsert(&b, 1, &changed, 1).unwrap();
        crate::fhir::store::delete(&b, 1, "Observation", "b", 10).unwrap();
        let after = rows(&b);
        let of = |id: &str| -> Vec<&Vec<rusqlite::types::Value>> {
            after.iter().filter(|r| r[6] == Integer(rid(id))).collect()
        };
        assert!(of("b").is_empty(), "{after:?}");
        assert_eq!(of("c").len(), 1, "{after:?}");
        let a_rows = of("a");
        assert_eq!(a_rows.len(), 2, "one per patient: {after:?}");
        for r in a_rows {
            assert_eq!(
                (&r[2], &r[3], &r[4], &r[7]),
                (
                    &Text("laboratory".into()),
                    &Text("z".into()),
                    &Text(String::new()),
                    &Text(String::new())
                ),
                "{r:?}"
            );
        }
        assert_eq!(after.len(), 3, "{after:?}");
    }
}
