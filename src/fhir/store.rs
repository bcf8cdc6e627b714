//! Writing and reading resources in `fhir.db`: upsert with the
//! newest-wins rule, tombstones, and index maintenance.
//!
//! Upsert rule, per (tenant, type, id): identical content (same hash,
//! ignoring `meta.versionId` and `meta.lastUpdated`) is a no-op; an incoming
//! `meta.lastUpdated` older than the stored one is skipped as stale;
//! otherwise the resource is stored as a new version. Invariants: the stored
//! JSON always carries the stored `meta.versionId` and `meta.lastUpdated`;
//! index rows are deleted and re-extracted in the same transaction; a
//! tombstone keeps the row (with `deleted = 1`) but no JSON and no index rows.

use rusqlite::{Connection, OptionalExtension, params};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::params::{self as p, TypeDef};
use super::{ResourceError, StoreError, date, is_valid_id};

/// Sort key stored when a resource has no sort date.
pub const NO_SORT: i64 = i64::MIN;

/// What an upsert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upserted {
    /// New resource.
    Created,
    /// New version of an existing (or deleted) resource.
    Updated,
    /// Same content as stored: nothing written.
    Unchanged,
    /// Older than the stored version: nothing written.
    Stale,
}

/// What a delete did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// A live resource became a tombstone.
    Deleted,
    /// Already deleted, or never stored.
    Absent,
    /// The stored version is newer than the deletion.
    Stale,
}

/// Validates the shape of a resource and returns (type, id).
pub fn identify(res: &Value) -> Result<(&str, &str), ResourceError> {
    let obj = res
        .as_object()
        .ok_or(ResourceError::new("not a JSON object"))?;
    let ty = obj
        .get("resourceType")
        .and_then(Value::as_str)
        .ok_or(ResourceError::new("missing resourceType"))?;
    if !crate::scopes::is_type_name(ty) {
        return Err(ResourceError(format!(
            "resourceType {ty:?} is not a FHIR type name"
        )));
    }
    let id = obj
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| ResourceError(format!("{ty} has no id")))?;
    if !is_valid_id(id) {
        return Err(ResourceError(format!(
            "{ty} id {id:?} is not a valid FHIR id"
        )));
    }
    Ok((ty, id))
}

/// The content hash: SHA-256 of the compact JSON with `meta.versionId` and
/// `meta.lastUpdated` removed, and `meta` too if that empties it (object
/// keys serialise sorted).
pub fn content_hash(res: &Value) -> [u8; 32] {
    let Some(obj) = res.as_object() else {
        return Sha256::digest(res.to_string().as_bytes()).into();
    };
    let meta = match obj.get("meta") {
        Some(Value::Object(m)) => {
            let rest: Map<String, Value> = m
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "versionId" | "lastUpdated"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (!rest.is_empty()).then_some(Value::Object(rest))
        }
        other => other.cloned(),
    };
    Sha256::digest(WithMeta { obj, meta }.to_json()).into()
}

/// The id a device ingest gives an Observation sent without one, if the
/// reading has a time of day: a UUID (version 8, RFC 9562) whose first 48
/// bits are that time in Unix ms and whose other bits are SHA-256 of the
/// tenant and the [`content_hash`]. The time is the first readable
/// `dateTime` with a time of day among `effectiveDateTime`,
/// `effectiveInstant`, `effectivePeriod.start` and `issued`; `None` if
/// there is none (nothing then tells two such readings apart, so they must
/// not share an id).
///
/// - A resend of the same reading (a device retrying after a timeout or a
///   503) gets the same id and is recognised as unchanged instead of being
///   stored twice; any difference in content gives another id.
/// - Readings arrive in time order, so their ids do too, and each new row
///   lands at the end of the `(tenant, type, id)` index, as UUID v7 ids
///   did, instead of on a random page.
/// - The tenant is hashed in so that equal ids never reveal equal
///   readings across tenants.
pub fn content_id(tenant: &str, res: &Value) -> Option<String> {
    let ms = [
        res.get("effectiveDateTime"),
        res.get("effectiveInstant"),
        res.pointer("/effectivePeriod/start"),
        res.get("issued"),
    ]
    .into_iter()
    .flatten()
    .filter_map(Value::as_str)
    .filter(|t| t.contains('T'))
    .find_map(|t| date::parse(t).ok())
    .and_then(|r| u64::try_from(r.low).ok())?;
    let mut h = Sha256::new();
    h.update(b"clinicbox content id v1\0");
    h.update(tenant.as_bytes());
    h.update(b"\0");
    h.update(content_hash(res));
    let digest: [u8; 32] = h.finalize().into();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    Some(
        uuid::Builder::from_custom_bytes(bytes)
            .into_uuid()
            .hyphenated()
            .to_string(),
    )
}

/// A resource object written with its `meta` replaced (or left out when
/// `None`), without copying the resource. Keys stay sorted, exactly as
/// `Value` writes them, so the bytes are those of the modified copy.
struct WithMeta<'a> {
    obj: &'a Map<String, Value>,
    meta: Option<Value>,
}

impl WithMeta<'_> {
    fn to_json(&self) -> Vec<u8> {
        // Writing JSON values to memory cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl Serialize for WithMeta<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        let mut meta = self.meta.as_ref();
        for (k, v) in self.obj {
            if k.as_str() >= "meta"
                && let Some(m) = meta.take()
            {
                map.serialize_entry("meta", m)?;
            }
            if k != "meta" {
                map.serialize_entry(k, v)?;
            }
        }
        if let Some(m) = meta {
            map.serialize_entry("meta", m)?;
        }
        map.end()
    }
}

/// `meta.lastUpdated` in Unix ms, if present and valid.
pub fn last_updated_ms(res: &Value) -> Result<Option<i64>, ResourceError> {
    match res.pointer("/meta/lastUpdated") {
        None => Ok(None),
        Some(Value::String(s)) => date::parse(s)
            .map(|r| Some(r.low))
            .map_err(|e| ResourceError(format!("meta.lastUpdated: {e}"))),
        Some(_) => Err(ResourceError::new("meta.lastUpdated is not a string")),
    }
}

/// Stores `res` for tenant `tid`. `fallback_ms` is used when the resource
/// has no `meta.lastUpdated` (the export's transactionTime, or now).
pub fn upsert(
    conn: &Connection,
    tid: i64,
    res: &Value,
    fallback_ms: i64,
) -> Result<Upserted, StoreError> {
    let (ty, id) = identify(res)?;
    let incoming_ms = last_updated_ms(res)?.unwrap_or(fallback_ms);
    let hash = content_hash(res);
    let existing: Option<(i64, i64, i64, Vec<u8>, bool)> = conn
        .prepare_cached(
            "SELECT rid, version_id, last_updated, hash, deleted FROM resources WHERE tid = ?1 AND type = ?2 AND id = ?3",
        )?
        .query_row(params![tid, ty, id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)))
        .optional()?;
    if let Some((_, _, stored_ms, stored_hash, deleted)) = &existing {
        if !deleted && stored_hash.as_slice() == hash.as_slice() {
            return Ok(Upserted::Unchanged);
        }
        if incoming_ms < *stored_ms {
            return Ok(Upserted::Stale);
        }
    }
    let version = existing.as_ref().map_or(1, |e| e.1 + 1);
    let json = stored_json(res, version, incoming_ms);
    let rid = match &existing {
        Some((rid, ..)) => {
            conn.prepare_cached(
                "UPDATE resources SET version_id = ?2, last_updated = ?3, hash = ?4, deleted = 0, json = ?5 WHERE rid = ?1",
            )?
            .execute(params![rid, version, incoming_ms, hash.as_slice(), json])?;
            clear_index(conn, *rid)?;
            *rid
        }
        None => {
            conn.prepare_cached(
                "INSERT INTO resources (tid, type, id, version_id, last_updated, hash, json) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![tid, ty, id, version, incoming_ms, hash.as_slice(), json])?;
            conn.last_insert_rowid()
        }
    };
    if let Some(def) = p::type_def(ty) {
        write_index(conn, tid, rid, def, id, res)?;
    }
    Ok(if existing.is_some() {
        Upserted::Updated
    } else {
        Upserted::Created
    })
}

/// Turns `type/id` into a tombstone as of `at_ms`.
pub fn delete(
    conn: &Connection,
    tid: i64,
    ty: &str,
    id: &str,
    at_ms: i64,
) -> Result<Deleted, StoreError> {
    let existing: Option<(i64, i64, i64, bool)> = conn
        .prepare_cached("SELECT rid, version_id, last_updated, deleted FROM resources WHERE tid = ?1 AND type = ?2 AND id = ?3")?
        .query_row(params![tid, ty, id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .optional()?;
    match existing {
        None | Some((_, _, _, true)) => Ok(Deleted::Absent),
        Some((_, _, stored_ms, false)) if at_ms < stored_ms => Ok(Deleted::Stale),
        Some((rid, version, _, false)) => {
            conn.prepare_cached(
                "UPDATE resources SET version_id = ?2, last_updated = ?3, deleted = 1, json = NULL, hash = x'' WHERE rid = ?1",
            )?
            .execute(params![rid, version + 1, at_ms])?;
            clear_index(conn, rid)?;
            Ok(Deleted::Deleted)
        }
    }
}

/// The JSON stored for `res`: with `meta.versionId` and `meta.lastUpdated`
/// set (a `meta` that is not an object is kept as it is).
fn stored_json(res: &Value, version: i64, ms: i64) -> String {
    let Some(obj) = res.as_object() else {
        return res.to_string();
    };
    let meta = match obj.get("meta") {
        None | Some(Value::Object(_)) => {
            let mut m = obj
                .get("meta")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            m.insert("versionId".into(), Value::String(version.to_string()));
            m.insert("lastUpdated".into(), Value::String(date::format_millis(ms)));
            Value::Object(m)
        }
        Some(other) => other.clone(),
    };
    // serde_json writes valid UTF-8.
    String::from_utf8(
        WithMeta {
            obj,
            meta: Some(meta),
        }
        .to_json(),
    )
    .unwrap_or_default()
}

/// Deletes a resource's index rows. `obs_lastn` first: its keys are the
/// resource's `code` × `category` rows of `idx_token` (as written by
/// [`write_index`] and schema migration 3), so each is one seek by the
/// whole key.
fn clear_index(conn: &Connection, rid: i64) -> rusqlite::Result<()> {
    let keys: Vec<(i64, String, String, String, String, i64)> = conn
        .prepare_cached(
            "SELECT c.tid, c.patient, k.code, c.code, c.system, c.sort_ms
               FROM idx_token c
               JOIN idx_token k ON k.rid = c.rid AND k.param = 2 AND k.patient = c.patient
              WHERE c.rid = ?1 AND c.param = 1 AND c.type = 2",
        )?
        .query_map([rid], |r| r.try_into())?
        .collect::<rusqlite::Result<_>>()?;
    let mut lastn = conn.prepare_cached(
        "DELETE FROM obs_lastn WHERE tid = ?1 AND patient = ?2 AND category = ?3 \
         AND code = ?4 AND system = ?5 AND sort_ms = ?6 AND rid = ?7",
    )?;
    for (tid, patient, category, code, system, sort) in keys {
        lastn.execute(params![tid, patient, category, code, system, sort, rid])?;
    }
    for sql in [
        "DELETE FROM compartment WHERE rid = ?1",
        "DELETE FROM idx_token WHERE rid = ?1",
        "DELETE FROM idx_date WHERE rid = ?1",
        "DELETE FROM idx_ref WHERE rid = ?1",
    ] {
        conn.prepare_cached(sql)?.execute([rid])?;
    }
    Ok(())
}

fn write_index(
    conn: &Connection,
    tid: i64,
    rid: i64,
    def: &TypeDef,
    id: &str,
    res: &Value,
) -> rusqlite::Result<()> {
    let e = p::extract(def, id, res);
    let sort = e.sort_ms.unwrap_or(NO_SORT);
    let none = [String::new()];
    let patients: &[String] = if e.patients.is_empty() {
        &none
    } else {
        &e.patients
    };
    let mut comp =
        conn.prepare_cached("INSERT OR IGNORE INTO compartment VALUES (?1, ?2, ?3, ?4, ?5)")?;
    let mut tok = conn.prepare_cached(
        "INSERT OR IGNORE INTO idx_token VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    let mut dat = conn
        .prepare_cached("INSERT OR IGNORE INTO idx_date VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)")?;
    let lastn = LastnRows::of(def, &e);
    let mut obs = conn.prepare_cached(
        "INSERT OR IGNORE INTO obs_lastn VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    for patient in patients {
        comp.execute(params![tid, patient, def.code, sort, rid])?;
        for (cat_system, cat) in &lastn.categories {
            for (system, code) in &lastn.codes {
                obs.execute(params![
                    tid,
                    patient,
                    cat,
                    code,
                    system,
                    sort,
                    rid,
                    cat_system,
                    lastn.status
                ])?;
            }
        }
        for (param, system, code) in &e.tokens {
            tok.execute(params![
                tid,
                patient,
                def.code,
                param,
                code,
                sort,
                rid,
                system.as_deref().unwrap_or("")
            ])?;
        }
        for (param, r) in &e.dates {
            dat.execute(params![
                tid, patient, def.code, param, r.high, r.low, rid, sort
            ])?;
        }
    }
    if let Some(target) = &e.medication_ref {
        conn.prepare_cached("INSERT OR IGNORE INTO idx_ref VALUES (?1, 'medication', ?2)")?
            .execute(params![rid, target])?;
    }
    Ok(())
}

/// An Observation's `obs_lastn` rows (schema migration 3): every
/// (category, code) coding pair, with the one status (None when there is
/// not exactly one). Empty for every other type.
struct LastnRows<'a> {
    categories: Vec<(&'a str, &'a str)>,
    codes: Vec<(&'a str, &'a str)>,
    status: Option<&'a str>,
}

impl<'a> LastnRows<'a> {
    fn of(def: &TypeDef, e: &'a p::Extracted) -> LastnRows<'a> {
        let mut rows = LastnRows {
            categories: Vec::new(),
            codes: Vec::new(),
            status: None,
        };
        if def.code != p::OBSERVATION {
            return rows;
        }
        let mut statuses: Vec<(&str, &str)> = Vec::new();
        for (param, system, code) in &e.tokens {
            let pair = (system.as_deref().unwrap_or(""), code.as_str());
            match *param {
                p::codes::CATEGORY => rows.categories.push(pair),
                p::codes::CODE => rows.codes.push(pair),
                p::codes::STATUS => statuses.push(pair),
                _ => {}
            }
        }
        statuses.sort_unstable();
        statuses.dedup();
        if let [(_, status)] = statuses[..] {
            rows.status = Some(status);
        }
        rows
    }
}

/// A stored, live resource.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Internal row id.
    pub rid: i64,
    /// The JSON text.
    pub json: String,
}

/// Reads the live resource `type/id` of tenant `tid`.
pub fn read(conn: &Connection, tid: i64, ty: &str, id: &str) -> rusqlite::Result<Option<Stored>> {
    conn.prepare_cached(
        "SELECT rid, json FROM resources WHERE tid = ?1 AND type = ?2 AND id = ?3 AND deleted = 0",
    )?
    .query_row(params![tid, ty, id], |r| {
        Ok(Stored {
            rid: r.get(0)?,
            json: r.get(1)?,
        })
    })
    .optional()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hash_ignores_version_and_last_updated_and_key_order() {
        let a = json!({"resourceType": "Patient", "id": "p", "meta": {"versionId": "3", "lastUpdated": "2025-01-01T00:00:00Z"}, "gender": "female"});
        let b: Value =
            serde_json::from_str(r#"{"gender":"female","id":"p","resourceType":"Patient"}"#)
                .unwrap();
        assert_eq!(content_hash(&a), content_hash(&b));
        let c = json!({"resourceType": "Patient", "id": "p", "gender": "male"});
        assert_ne!(content_hash(&a), content_hash(&c));
    }

    #[test]
    fn identify_names_what_is_missing() {
        assert_eq!(identify(&json!([])).unwrap_err().0, "not a JSON object");
        assert_eq!(
            identify(&json!({"id": "x"})).unwrap_err().0,
            "missing resourceType"
        );
        assert_eq!(
            identify(&json!({"resourceType": "Patient"})).unwrap_err().0,
            "Patient has no id"
        );
        assert!(
            identify(&json!({"resourceType": "Patient", "id": "a b"}))
                .unwrap_err()
                .0
                .contains("not a valid FHIR id")
        );
    }

    /// The JSON written without copying the resource is byte for byte the
    /// JSON of the modified copy (how it was made before), so stored hashes
    /// stay comparable and stored JSON keeps its form.
    #[test]
    fn json_written_in_place_equals_the_modified_copy() {
        fn copy_hash(res: &Value) -> [u8; 32] {
            let mut v = res.clone();
            if let Some(meta) = v.get_mut("meta").and_then(Value::as_object_mut) {
                meta.remove("versionId");
                meta.remove("lastUpdated");
                if meta.is_empty() {
                    v.as_object_mut().map(|o| o.remove("meta"));
                }
            }
            Sha256::digest(v.to_string().as_bytes()).into()
        }
        fn copy_json(res: &Value, version: i64, ms: i64) -> String {
            let mut v = res.clone();
            let obj = v.as_object_mut().unwrap();
            let meta = obj.entry("meta").or_insert_with(|| json!({}));
            if let Some(m) = meta.as_object_mut() {
                m.insert("versionId".into(), json!(version.to_string()));
                m.insert("lastUpdated".into(), json!(date::format_millis(ms)));
            }
            v.to_string()
        }
        let cases = [
            json!({"resourceType": "Observation", "id": "a"}),
            json!({"resourceType": "Observation", "id": "a", "meta": {"versionId": "3"}}),
            json!({"resourceType": "Observation", "id": "a",
                   "meta": {"lastUpdated": "2030-01-01T00:00:00Z", "profile": ["x"]}}),
            json!({"resourceType": "Observation", "meta": "odd", "id": "a"}),
            json!({"id": "a", "language": "en", "metaX": 1, "me": 2, "resourceType": "Patient",
                   "name": [{"family": "Ünïcødé \"quoted\""}]}),
            json!({"a": 1}),
        ];
        for res in &cases {
            assert_eq!(content_hash(res), copy_hash(res), "{res}");
            assert_eq!(
                stored_json(res, 7, 1_900_000_000_123),
                copy_json(res, 7, 1_900_000_000_123),
                "{res}"
            );
        }
    }
}
