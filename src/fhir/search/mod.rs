//! FHIR search and read over the cache, inside a search context (tenant,
//! optional patient, granted scopes): the query parser, the SQL builder and
//! the `searchset` Bundle.
//!
//! Supported (R4 4.0.1 subset): `_id`, `_lastUpdated`, `_count` (default
//! and cap in `Limits`), `_offset` (paging), `_sort` (`date`, `-date`,
//! `_lastUpdated`, `-_lastUpdated`), the token and date parameters listed
//! per type in [`super::params`], `patient`/`subject`, and
//! `_include=MedicationRequest:medication`; and the operation
//! `Observation/$lastn` (`max`, a required `category`, and the other
//! Observation parameters as filters). Anything else — a parameter,
//! modifier or prefix — is an error naming it.
//!
//! Invariants:
//! - every value is a bound SQL parameter, never spliced into SQL text;
//! - the tenant, the patient compartment and the granted scopes are
//!   conditions of the one SQL query that produces both the page and
//!   `total`, so paging and counts never see anything outside them;
//! - outside the compartment, tenant or grant, a read fails with the same
//!   error whether or not the resource exists.

mod query;
mod sql;

use rusqlite::{Connection, OptionalExtension, params_from_iter};
use serde::Serialize;
use serde_json::value::RawValue;

use super::params as p;
use super::{store, tenant_id};
use crate::scopes::Scope;
use query::{Filter, SortKey, with_offset};
pub use query::{Query, parse};
use sql::{Sql2, build_where, scope_cond, scope_filters};

/// Who is asking: one tenant, optionally one patient, and their grants.
#[derive(Debug, Clone, Copy)]
pub struct SearchContext<'a> {
    /// The clinic.
    pub tenant: &'a str,
    /// The patient whose compartment bounds every query (plugins: always).
    pub patient: Option<&'a str>,
    /// What may be read.
    pub grants: Grants<'a>,
}

/// What a context may read.
#[derive(Debug, Clone, Copy)]
pub enum Grants<'a> {
    /// Everything in the tenant (the admin CLI).
    All,
    /// Only what these SMART v2 scopes allow.
    Scopes(&'a [Scope]),
}

/// Why a search or read failed.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// The query is outside the supported subset or malformed.
    #[error("invalid search: {0}")]
    Invalid(String),
    /// The type is not granted (same for every query of that type).
    #[error("{0}: not granted")]
    NotGranted(String),
    /// A read of something missing, or outside compartment, tenant or grant.
    #[error("{0}: not found or not granted")]
    NotFound(String),
    /// A `patient`/`subject` parameter names another patient.
    #[error("refused: parameter {param} names a patient other than the one in context")]
    OtherPatient {
        /// The parameter.
        param: String,
    },
    /// The database failed.
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
}

pub(super) fn invalid(s: impl Into<String>) -> SearchError {
    SearchError::Invalid(s.into())
}

/// A searchset Bundle, serialised with the stored resources spliced in.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Bundle {
    resource_type: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    /// Matches in total (all pages); `None` with `_total=none`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    link: Vec<Link>,
    /// The page's entries (matches, then includes).
    pub entry: Vec<Entry>,
}

#[derive(Serialize)]
struct Link {
    relation: &'static str,
    url: String,
}

/// One Bundle entry.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// `Type/id`.
    pub full_url: String,
    /// The resource JSON as stored.
    pub resource: Box<RawValue>,
    search: EntrySearch,
}

#[derive(Serialize)]
struct EntrySearch {
    mode: &'static str,
}

/// Runs a search in `ctx`.
pub fn search(
    conn: &Connection,
    ctx: &SearchContext<'_>,
    q: &Query,
) -> Result<Bundle, SearchError> {
    in_snapshot(conn, || search_inner(conn, ctx, q))
}

/// Runs `f`'s statements in one read transaction (unless the caller has
/// one open): one consistent snapshot for the whole search (the page of
/// ids and their rows cannot disagree), and one lock and cache check
/// instead of one per statement.
fn in_snapshot<T>(
    conn: &Connection,
    f: impl FnOnce() -> Result<T, SearchError>,
) -> Result<T, SearchError> {
    if !conn.is_autocommit() {
        return f();
    }
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Deferred)?;
    let out = f();
    // Read-only: ending it either way releases the snapshot; the search's
    // own error, if any, is the one to report.
    let ended = tx.commit();
    let out = out?;
    ended?;
    Ok(out)
}

fn search_inner(
    conn: &Connection,
    ctx: &SearchContext<'_>,
    q: &Query,
) -> Result<Bundle, SearchError> {
    let scope = scope_filters(q.def, ctx.grants, true)?;
    let patient = match (&q.patient_param, ctx.patient) {
        (Some((param, id)), Some(ctx_p)) if id != ctx_p => {
            return Err(SearchError::OtherPatient {
                param: param.clone(),
            });
        }
        (Some((_, id)), None) => Some(id.as_str()),
        (_, p) => p,
    };
    if ctx.patient.is_some() && !q.def.in_patient_compartment() {
        // Not patient data: only reachable through _include.
        return Err(SearchError::NotGranted(format!(
            "{} (not in the patient compartment)",
            q.def.name
        )));
    }
    let Some(tid) = tenant_id(conn, ctx.tenant, false).map_err(|e| invalid(format!("{e:#}")))?
    else {
        return Ok(empty_bundle(q));
    };
    if let Some(max) = q.lastn {
        let patient =
            patient.ok_or_else(|| invalid("$lastn: a patient or subject parameter is required"))?;
        return lastn(conn, q, tid, patient, &scope, max);
    }
    // One pass yields both `total` and the page: the ordered match stream
    // is counted to its end, and only the page's rids are kept.
    let mut sql = build_where(q, tid, patient, &scope);
    match q.sort {
        Some((SortKey::Date, true)) => sql.push(" ORDER BY d.sort_ms DESC, d.rid DESC"),
        Some((SortKey::Date, false)) => sql.push(" ORDER BY d.sort_ms ASC, d.rid ASC"),
        Some((SortKey::LastUpdated, desc)) => sql.push(if desc {
            " ORDER BY (SELECT last_updated FROM resources WHERE rid = d.rid) DESC, d.rid DESC"
        } else {
            " ORDER BY (SELECT last_updated FROM resources WHERE rid = d.rid) ASC, d.rid ASC"
        }),
        None => sql.push(" ORDER BY d.rid"),
    }
    // With `_total=none` the stream stops one row past the page (enough to
    // know whether there is a next page): the cost is the page's, not the
    // whole history's.
    if q.no_total {
        sql.push(&format!(" LIMIT {}", q.offset + q.count + 1));
    }
    let mut total = 0u64;
    let mut rids: Vec<i64> = Vec::with_capacity(q.count.min(64));
    let mut stmt = conn.prepare_cached(&sql.text)?;
    let mut rows = stmt.query(params_from_iter(sql.args.iter()))?;
    while let Some(row) = rows.next()? {
        if total >= q.offset as u64 && rids.len() < q.count {
            rids.push(row.get(0)?);
        }
        total += 1;
    }
    drop(rows);
    let mut entries = Vec::with_capacity(rids.len());
    let mut stmt = conn.prepare_cached("SELECT type, id, json FROM resources WHERE rid = ?1")?;
    for rid in &rids {
        let (ty, id, json): (String, String, String) =
            stmt.query_row([rid], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        entries.push(entry(&ty, &id, json, "match")?);
    }
    if q.include_medication {
        entries.extend(includes(conn, ctx, tid, &rids)?);
    }
    let mut link = vec![Link {
        relation: "self",
        url: q.raw.clone(),
    }];
    if (q.offset + q.count) < total as usize && q.count > 0 {
        link.push(Link {
            relation: "next",
            url: with_offset(&q.raw, q.offset + q.count),
        });
    }
    Ok(Bundle {
        resource_type: "Bundle",
        kind: "searchset",
        total: (!q.no_total).then_some(total),
        link,
        entry: entries,
    })
}

/// `Observation/$lastn`: for each code group (`system`, `code`) of the
/// patient's Observations, the newest `max` that match every filter and
/// scope; all of them, each once, newest first (by the `date` sort key),
/// without `total` or paging.
///
/// Read from `obs_lastn`, category by category: for each alternative of
/// the (required) `category`, the groups of that category are found by a
/// loose index scan (one seek per group, not a pass over the history),
/// and each group is one backward range scan that stops at `max`. The cost
/// follows the number of codes in the asked categories, not of rows, and
/// codes of other categories (a patient's labs, when vital signs are asked
/// for) are never read.
fn lastn(
    conn: &Connection,
    q: &Query,
    tid: i64,
    patient: &str,
    scope: &Option<sql::ScopeFilter>,
    max: usize,
) -> Result<Bundle, SearchError> {
    let categories = q
        .filters
        .iter()
        .find_map(|f| match f {
            Filter::Token { param, alts } if *param == p::codes::CATEGORY => Some(alts.as_slice()),
            _ => None,
        })
        .ok_or_else(|| invalid("$lastn: a category parameter is required"))?;
    // (system, code) → its newest (sort key, rid), from every alternative.
    let mut groups: std::collections::BTreeMap<(String, String), Vec<(i64, i64)>> =
        std::collections::BTreeMap::new();
    for alt in categories {
        let category = sql::lastn_category(alt);
        let mut group_sql = sql::build_lastn_group(q, tid, patient, scope, max, alt);
        let mut group_stmt = conn.prepare_cached(&group_sql.text)?;
        let group_of =
            |r: &rusqlite::Row<'_>| -> rusqlite::Result<(String, String, String)> { r.try_into() };
        // Groups from the highest down: each seek lands on the group's
        // newest row, whose page the group's own scan then finds cached.
        let mut group = match category {
            Some(c) => conn
                .prepare_cached(sql::LASTN_FIRST_GROUP)?
                .query_row(rusqlite::params![tid, patient, c], group_of),
            None => conn
                .prepare_cached(sql::LASTN_FIRST_GROUP_ANY)?
                .query_row(rusqlite::params![tid, patient], group_of),
        }
        .optional()?;
        while let Some((cat, system, code)) = group {
            let at = sql::LASTN_GROUP_ARG;
            group_sql.args[at] = cat.clone().into();
            group_sql.args[at + 1] = code.clone().into();
            group_sql.args[at + 2] = system.clone().into();
            let rows = group_stmt.query_map(params_from_iter(group_sql.args.iter()), |r| {
                Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(0)?))
            })?;
            let newest = groups.entry((system.clone(), code.clone())).or_default();
            for row in rows {
                newest.push(row?);
            }
            // Within one category (`cat` is then that category), or across.
            let next = match category {
                Some(_) => sql::LASTN_NEXT_GROUP,
                None => sql::LASTN_NEXT_GROUP_ANY,
            };
            group = conn
                .prepare_cached(next)?
                .query_row(rusqlite::params![tid, patient, cat, code, system], group_of)
                .optional()?;
        }
    }
    // A group read under several categories keeps its newest `max`.
    let mut found: Vec<(i64, i64)> = Vec::new();
    for (_, mut rows) in groups {
        rows.sort_unstable_by(|a, b| b.cmp(a));
        rows.dedup();
        rows.truncate(max);
        found.extend(rows);
    }
    // An Observation with several codings is in several groups: once here.
    found.sort_unstable_by(|a, b| b.cmp(a));
    found.dedup();
    let mut entries = Vec::with_capacity(found.len());
    let mut stmt = conn.prepare_cached("SELECT id, json FROM resources WHERE rid = ?1")?;
    for (_, rid) in &found {
        let (id, json): (String, String) = stmt.query_row([rid], |r| Ok((r.get(0)?, r.get(1)?)))?;
        entries.push(entry("Observation", &id, json, "match")?);
    }
    Ok(Bundle {
        resource_type: "Bundle",
        kind: "searchset",
        total: None,
        link: vec![Link {
            relation: "self",
            url: q.raw.clone(),
        }],
        entry: entries,
    })
}

fn empty_bundle(q: &Query) -> Bundle {
    Bundle {
        resource_type: "Bundle",
        kind: "searchset",
        total: (!q.no_total && q.lastn.is_none()).then_some(0),
        link: vec![Link {
            relation: "self",
            url: q.raw.clone(),
        }],
        entry: Vec::new(),
    }
}

fn entry(ty: &str, id: &str, json: String, mode: &'static str) -> Result<Entry, SearchError> {
    let resource = RawValue::from_string(json)
        .map_err(|e| invalid(format!("stored {ty}/{id} is not JSON: {e}")))?;
    Ok(Entry {
        full_url: format!("{ty}/{id}"),
        resource,
        search: EntrySearch { mode },
    })
}

/// `_include=MedicationRequest:medication`: each referenced Medication,
/// authorised on its own (its type must be granted for read, its scope
/// filters must hold). Unauthorised targets are silently left out, as a
/// FHIR server leaves out includes the client may not see.
fn includes(
    conn: &Connection,
    ctx: &SearchContext<'_>,
    tid: i64,
    rids: &[i64],
) -> Result<Vec<Entry>, SearchError> {
    let mut targets: Vec<String> = Vec::new();
    let mut stmt =
        conn.prepare_cached("SELECT target FROM idx_ref WHERE rid = ?1 AND param = 'medication'")?;
    for rid in rids {
        for t in stmt.query_map([rid], |r| r.get::<_, String>(0))? {
            let t = t?;
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
    }
    let mut out = Vec::new();
    for t in targets {
        if let Ok(json) = read_authorised(conn, ctx, tid, &t) {
            let (ty, id) = t.split_once('/').unwrap_or(("", ""));
            out.push(entry(ty, id, json, "include")?);
        }
    }
    Ok(out)
}

/// Reads `Type/id` in `ctx`. Missing, deleted, other-tenant,
/// other-patient and ungranted all give the same [`SearchError::NotFound`].
pub fn read(
    conn: &Connection,
    ctx: &SearchContext<'_>,
    reference: &str,
) -> Result<String, SearchError> {
    in_snapshot(conn, || read_inner(conn, ctx, reference))
}

fn read_inner(
    conn: &Connection,
    ctx: &SearchContext<'_>,
    reference: &str,
) -> Result<String, SearchError> {
    let Some(tid) = tenant_id(conn, ctx.tenant, false).map_err(|e| invalid(format!("{e:#}")))?
    else {
        return Err(SearchError::NotFound(reference.to_owned()));
    };
    read_authorised(conn, ctx, tid, reference)
}

fn read_authorised(
    conn: &Connection,
    ctx: &SearchContext<'_>,
    tid: i64,
    reference: &str,
) -> Result<String, SearchError> {
    let not_found = || SearchError::NotFound(reference.to_owned());
    let (ty, id) = reference
        .split_once('/')
        .ok_or_else(|| invalid(format!("{reference:?} is not Type/id")))?;
    if !crate::scopes::is_type_name(ty) || !super::is_valid_id(id) {
        return Err(invalid(format!("{reference:?} is not Type/id")));
    }
    let def = p::type_def(ty);
    let scope = match (def, ctx.grants) {
        (_, Grants::All) => None,
        (None, Grants::Scopes(_)) => return Err(not_found()), // unindexed types are never granted
        (Some(d), g) => scope_filters(d, g, false).map_err(|_| not_found())?,
    };
    let stored = store::read(conn, tid, ty, id)?.ok_or_else(not_found)?;
    if let (Some(pid), Some(d)) = (ctx.patient, def) {
        if d.in_patient_compartment() {
            let inside: bool = conn
                .prepare_cached("SELECT EXISTS (SELECT 1 FROM compartment WHERE rid = ?1 AND tid = ?2 AND patient = ?3)")?
                .query_row(rusqlite::params![stored.rid, tid, pid], |r| r.get(0))?;
            if !inside {
                return Err(not_found());
            }
        }
    } else if ctx.patient.is_some() && def.is_none() {
        return Err(not_found());
    }
    if let Some(ors) = scope {
        let mut sql = Sql2::default();
        sql.push("SELECT EXISTS (SELECT 1 FROM compartment d WHERE d.rid = ");
        sql.arg(stored.rid);
        scope_cond(&mut sql, &ors);
        sql.push(")");
        let ok: bool = conn
            .prepare_cached(&sql.text)?
            .query_row(params_from_iter(sql.args.iter()), |r| r.get(0))?;
        if !ok {
            return Err(not_found());
        }
    }
    Ok(stored.json)
}
