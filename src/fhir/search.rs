//! FHIR search and read over the cache, inside a search context (tenant,
//! optional patient, granted scopes): the query parser, the SQL builder and
//! the `searchset` Bundle.
//!
//! Supported (R4 4.0.1 subset): `_id`, `_lastUpdated`, `_count` (default
//! and cap in `Limits`), `_offset` (paging), `_sort` (`date`, `-date`,
//! `_lastUpdated`, `-_lastUpdated`), the token and date parameters listed
//! per type in [`super::params`], `patient`/`subject`, and
//! `_include=MedicationRequest:medication`. Anything else — a parameter,
//! modifier or prefix — is an error naming it.
//!
//! Invariants:
//! - every value is a bound SQL parameter, never spliced into SQL text;
//! - the tenant, the patient compartment and the granted scopes are
//!   conditions of the one SQL query that produces both the page and
//!   `total`, so paging and counts never see anything outside them;
//! - outside the compartment, tenant or grant, a read fails with the same
//!   error whether or not the resource exists.

use percent_encoding::percent_decode_str;
use rusqlite::types::Value as Sql;
use rusqlite::{Connection, params_from_iter};
use serde::Serialize;
use serde_json::value::RawValue;

use super::date::{self, DateRange, Prefix};
use super::params::{self as p, Kind, TypeDef};
use super::{store, tenant_id};
use crate::limits::Limits;
use crate::scopes::{ResourceSel, Scope, ScopeParam};

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

fn invalid(s: impl Into<String>) -> SearchError {
    SearchError::Invalid(s.into())
}

/// One alternative of a token parameter value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TokenQ {
    /// `code`: any system.
    Code(String),
    /// `system|code`.
    SysCode(String, String),
    /// `|code`: no system.
    NoSys(String),
    /// `system|`: any code in the system.
    SysOnly(String),
}

#[derive(Debug, Clone)]
enum Filter {
    Token {
        param: i64,
        alts: Vec<TokenQ>,
    },
    Date {
        param: i64,
        prefix: Prefix,
        range: DateRange,
    },
    Id(Vec<String>),
    LastUpdated {
        prefix: Prefix,
        range: DateRange,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SortKey {
    Date,
    LastUpdated,
}

/// A parsed search.
#[derive(Debug, Clone)]
pub struct Query {
    def: &'static TypeDef,
    filters: Vec<Filter>,
    count: usize,
    offset: usize,
    sort: Option<(SortKey, bool)>,
    include_medication: bool,
    patient_param: Option<(String, String)>,
    /// The query string as given (for the self link).
    raw: String,
}

/// Parses `Type?name=value&…`.
pub fn parse(q: &str, limits: &Limits) -> Result<Query, SearchError> {
    if q.len() > limits.search_max_query_bytes {
        return Err(invalid(format!(
            "query is over {} bytes",
            limits.search_max_query_bytes
        )));
    }
    let (ty, rest) = q.split_once('?').unwrap_or((q, ""));
    let def = p::type_def(ty).ok_or_else(|| {
        if crate::scopes::is_type_name(ty) {
            invalid(format!(
                "type {ty} is not searchable (it is stored and readable by id only)"
            ))
        } else {
            invalid(format!("{ty:?} is not a FHIR resource type"))
        }
    })?;
    let mut query = Query {
        def,
        filters: Vec::new(),
        count: limits.search_default_count,
        offset: 0,
        sort: None,
        include_medication: false,
        patient_param: None,
        raw: q.to_owned(),
    };
    for pair in rest.split('&').filter(|s| !s.is_empty()) {
        let (name_raw, value_raw) = pair
            .split_once('=')
            .ok_or_else(|| invalid(format!("parameter {pair:?} has no value")))?;
        let name = decode(name_raw)?;
        let value = decode(value_raw)?;
        if value.is_empty() {
            return Err(invalid(format!("parameter {name} has an empty value")));
        }
        let (base, modifier) = match name.split_once(':') {
            Some((b, m)) => (b.to_owned(), Some(m.to_owned())),
            None => (name.clone(), None),
        };
        if let Some(m) = modifier {
            return Err(invalid(format!("modifier :{m} on {base} is not supported")));
        }
        query.add(&base, &value, limits)?;
    }
    Ok(query)
}

fn decode(s: &str) -> Result<String, SearchError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| invalid(format!("{s:?} is not valid percent-encoded UTF-8")))
}

/// Splits on unescaped commas (`\,` is a literal comma).
fn split_or(v: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.extend(chars.next()),
            ',' => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    out.push(cur);
    out
}

fn parse_token(v: &str) -> Result<TokenQ, String> {
    match v.split_once('|') {
        None if !v.is_empty() => Ok(TokenQ::Code(v.to_owned())),
        Some(("", c)) if !c.is_empty() => Ok(TokenQ::NoSys(c.to_owned())),
        Some((s, "")) if !s.is_empty() => Ok(TokenQ::SysOnly(s.to_owned())),
        Some((s, c)) if !s.is_empty() && !c.is_empty() && !c.contains('|') => {
            Ok(TokenQ::SysCode(s.to_owned(), c.to_owned()))
        }
        _ => Err(format!(
            "{v:?} is not a token (code, system|code, |code or system|)"
        )),
    }
}

impl Query {
    fn add(&mut self, name: &str, value: &str, limits: &Limits) -> Result<(), SearchError> {
        match name {
            "_count" => {
                let n: usize = value
                    .parse()
                    .map_err(|_| invalid(format!("_count {value:?} is not a number")))?;
                self.count = n.min(limits.search_max_count);
            }
            "_offset" => {
                self.offset = value
                    .parse()
                    .map_err(|_| invalid(format!("_offset {value:?} is not a number")))?;
            }
            "_sort" => {
                let (desc, key) = match value.strip_prefix('-') {
                    Some(k) => (true, k),
                    None => (false, value),
                };
                let key = match key {
                    "date" if self.def.sort_param.is_some() => SortKey::Date,
                    "_lastUpdated" => SortKey::LastUpdated,
                    other => {
                        return Err(invalid(format!(
                            "_sort={other} is not supported for {} (date, _lastUpdated)",
                            self.def.name
                        )));
                    }
                };
                if self.sort.is_some() {
                    return Err(invalid("only one _sort key is supported"));
                }
                self.sort = Some((key, desc));
            }
            "_include" => {
                if value != "MedicationRequest:medication" || self.def.name != "MedicationRequest" {
                    return Err(invalid(format!(
                        "_include={value} is not supported (only MedicationRequest:medication)"
                    )));
                }
                self.include_medication = true;
            }
            "_id" => self.filters.push(Filter::Id(split_or(value))),
            "_lastUpdated" => {
                let (prefix, range) = date::parse_search_value(value)
                    .map_err(|e| invalid(format!("_lastUpdated: {e}")))?;
                self.filters.push(Filter::LastUpdated { prefix, range });
            }
            "patient" | "subject"
                if self.def.in_patient_compartment() && self.def.name != "Patient" =>
            {
                let id = value.strip_prefix("Patient/").unwrap_or(value);
                if !super::is_valid_id(id) || value.contains(',') {
                    return Err(invalid(format!("{name}={value:?} must name one Patient")));
                }
                if let Some((_, prev)) = &self.patient_param
                    && prev != id
                {
                    return Err(invalid(format!("{name} names two different patients")));
                }
                self.patient_param = Some((name.to_owned(), id.to_owned()));
            }
            _ => {
                let param = self.def.param(name).ok_or_else(|| {
                    if name.starts_with('_') {
                        invalid(format!("parameter {name} is not supported"))
                    } else {
                        invalid(format!(
                            "parameter {name} is not supported for {}",
                            self.def.name
                        ))
                    }
                })?;
                match param.kind {
                    Kind::Token => {
                        let alts = split_or(value)
                            .iter()
                            .map(|a| parse_token(a).map_err(|e| invalid(format!("{name}: {e}"))))
                            .collect::<Result<_, _>>()?;
                        self.filters.push(Filter::Token {
                            param: param.code,
                            alts,
                        });
                    }
                    Kind::Date => {
                        if value.contains(',') {
                            return Err(invalid(format!(
                                "{name}: comma-separated dates are not supported"
                            )));
                        }
                        let (prefix, range) = date::parse_search_value(value)
                            .map_err(|e| invalid(format!("{name}: {e}")))?;
                        self.filters.push(Filter::Date {
                            param: param.code,
                            prefix,
                            range,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// SQL fragments with their bound values, built in order.
#[derive(Default)]
struct Sql2 {
    text: String,
    args: Vec<Sql>,
}

impl Sql2 {
    fn push(&mut self, s: &str) {
        self.text.push_str(s);
    }
    fn arg(&mut self, v: impl Into<Sql>) {
        self.text.push('?');
        self.args.push(v.into());
    }
}

/// A scope restriction: OR over the outer list of (AND over token
/// conditions `(param code, token)`).
type ScopeFilter = Vec<Vec<(i64, TokenQ)>>;

/// The scope restriction for a type: `None` = no restriction. Err when
/// nothing is granted.
fn scope_filters(
    def: &TypeDef,
    grants: Grants<'_>,
    need_search: bool,
) -> Result<Option<ScopeFilter>, SearchError> {
    let Grants::Scopes(scopes) = grants else {
        return Ok(None);
    };
    let applicable: Vec<&Scope> = scopes
        .iter()
        .filter(|s| match &s.resource {
            ResourceSel::Any => true,
            ResourceSel::Type(t) => t == def.name,
        })
        .filter(|s| if need_search { s.search } else { s.read })
        .collect();
    if applicable.is_empty() {
        return Err(SearchError::NotGranted(def.name.to_owned()));
    }
    let mut ors = Vec::new();
    for s in applicable {
        if s.filters.is_empty() {
            return Ok(None);
        }
        let mut ands = Vec::new();
        for (param, tok) in &s.filters {
            let name = match param {
                ScopeParam::Category => "category",
                ScopeParam::Code => {
                    if def.param("code").is_some() {
                        "code"
                    } else {
                        "vaccine-code"
                    }
                }
                ScopeParam::Status => {
                    if def.param("status").is_some() {
                        "status"
                    } else {
                        "clinical-status"
                    }
                }
            };
            // A filter on a parameter the type lacks matches nothing.
            let code = def.param(name).map_or(-1, |p| p.code);
            let q = match &tok.system {
                Some(sys) => TokenQ::SysCode(sys.clone(), tok.code.clone()),
                None => TokenQ::Code(tok.code.clone()),
            };
            ands.push((code, q));
        }
        ors.push(ands);
    }
    Ok(Some(ors))
}

fn token_cond(sql: &mut Sql2, alias: &str, alts: &[TokenQ]) {
    sql.push("(");
    for (i, a) in alts.iter().enumerate() {
        if i > 0 {
            sql.push(" OR ");
        }
        match a {
            TokenQ::Code(c) => {
                sql.push(&format!("{alias}.code = "));
                sql.arg(c.clone());
            }
            TokenQ::SysCode(s, c) => {
                sql.push(&format!("({alias}.code = "));
                sql.arg(c.clone());
                sql.push(&format!(" AND {alias}.system = "));
                sql.arg(s.clone());
                sql.push(")");
            }
            TokenQ::NoSys(c) => {
                sql.push(&format!("({alias}.code = "));
                sql.arg(c.clone());
                sql.push(&format!(" AND {alias}.system = '')"));
            }
            TokenQ::SysOnly(s) => {
                sql.push(&format!("{alias}.system = "));
                sql.arg(s.clone());
            }
        }
    }
    sql.push(")");
}

fn date_cond(sql: &mut Sql2, lo: &str, hi: &str, prefix: Prefix, r: DateRange) {
    let (a, b) = (r.low, r.high);
    match prefix {
        Prefix::Eq => {
            sql.push(&format!("({lo} >= "));
            sql.arg(a);
            sql.push(&format!(" AND {hi} <= "));
            sql.arg(b);
            sql.push(")");
        }
        Prefix::Ne => {
            sql.push(&format!("NOT ({lo} >= "));
            sql.arg(a);
            sql.push(&format!(" AND {hi} <= "));
            sql.arg(b);
            sql.push(")");
        }
        Prefix::Gt => {
            sql.push(&format!("{hi} > "));
            sql.arg(b);
        }
        Prefix::Lt => {
            sql.push(&format!("{lo} < "));
            sql.arg(a);
        }
        Prefix::Ge => {
            sql.push(&format!("{hi} >= "));
            sql.arg(a);
        }
        Prefix::Le => {
            sql.push(&format!("{lo} <= "));
            sql.arg(b);
        }
    }
}

/// Which index drives the scan.
enum Driver {
    Token(i64, Vec<TokenQ>),
    Date(i64, Prefix, DateRange),
    Compartment,
}

/// Builds `SELECT DISTINCT d.rid, d.sort_ms FROM … WHERE …` for the query.
fn build_where(q: &Query, tid: i64, patient: Option<&str>, scope: &Option<ScopeFilter>) -> Sql2 {
    let def = q.def;
    // AND-ed token filters: the query's, plus a lone scope's.
    let mut tokens: Vec<(i64, Vec<TokenQ>)> = q
        .filters
        .iter()
        .filter_map(|f| match f {
            Filter::Token { param, alts } => Some((*param, alts.clone())),
            _ => None,
        })
        .collect();
    let lone_scope = matches!(scope, Some(ors) if ors.len() == 1);
    if let (true, Some(ors)) = (lone_scope, scope) {
        tokens.extend(ors[0].iter().map(|(p, t)| (*p, vec![t.clone()])));
    }
    let date_driver = q.filters.iter().find_map(|f| match f {
        Filter::Date {
            param,
            prefix: pr @ (Prefix::Ge | Prefix::Gt),
            range,
        } => Some(Driver::Date(*param, *pr, *range)),
        _ => None,
    });
    let driver = date_driver
        .or_else(|| tokens.first().map(|(p, a)| Driver::Token(*p, a.clone())))
        .unwrap_or(Driver::Compartment);

    let mut sql = Sql2::default();
    let table = match driver {
        Driver::Token(..) => "idx_token",
        Driver::Date(..) => "idx_date",
        Driver::Compartment => "compartment",
    };
    sql.push(&format!(
        "SELECT DISTINCT d.rid, d.sort_ms FROM {table} d WHERE d.tid = "
    ));
    sql.arg(tid);
    if let Some(pid) = patient {
        sql.push(" AND d.patient = ");
        sql.arg(pid.to_owned());
    }
    sql.push(" AND d.type = ");
    sql.arg(def.code);
    let mut skip_token = None;
    match &driver {
        Driver::Token(param, alts) => {
            sql.push(" AND d.param = ");
            sql.arg(*param);
            sql.push(" AND ");
            token_cond(&mut sql, "d", alts);
            skip_token = Some(0usize);
        }
        Driver::Date(param, prefix, range) => {
            sql.push(" AND d.param = ");
            sql.arg(*param);
            sql.push(" AND ");
            date_cond(&mut sql, "d.low", "d.high", *prefix, *range);
        }
        Driver::Compartment => {}
    }
    for (i, (param, alts)) in tokens.iter().enumerate() {
        if skip_token == Some(i) {
            continue;
        }
        exists_token(&mut sql, *param, alts);
    }
    for f in &q.filters {
        match f {
            Filter::Token { .. } => {}
            Filter::Date {
                param,
                prefix,
                range,
            } => {
                sql.push(
                    " AND EXISTS (SELECT 1 FROM idx_date x WHERE x.rid = d.rid AND x.param = ",
                );
                sql.arg(*param);
                sql.push(" AND ");
                date_cond(&mut sql, "x.low", "x.high", *prefix, *range);
                sql.push(")");
            }
            Filter::Id(ids) => {
                sql.push(" AND d.rid IN (SELECT rid FROM resources WHERE tid = ");
                sql.arg(tid);
                sql.push(" AND type = ");
                sql.arg(def.name.to_owned());
                sql.push(" AND id IN (");
                for (i, id) in ids.iter().enumerate() {
                    if i > 0 {
                        sql.push(", ");
                    }
                    sql.arg(id.clone());
                }
                sql.push("))");
            }
            Filter::LastUpdated { prefix, range } => {
                sql.push(" AND EXISTS (SELECT 1 FROM resources r WHERE r.rid = d.rid AND ");
                date_cond(
                    &mut sql,
                    "r.last_updated",
                    "r.last_updated",
                    *prefix,
                    *range,
                );
                sql.push(")");
            }
        }
    }
    if let (false, Some(ors)) = (lone_scope, scope) {
        scope_cond(&mut sql, ors);
    }
    sql
}

/// Appends ` AND (…)`: the OR of each scope's AND-ed token conditions on `d`.
fn scope_cond(sql: &mut Sql2, ors: &ScopeFilter) {
    sql.push(" AND (");
    for (i, ands) in ors.iter().enumerate() {
        if i > 0 {
            sql.push(" OR ");
        }
        sql.push("(1");
        for (param, t) in ands {
            exists_token(sql, *param, std::slice::from_ref(t));
        }
        sql.push(")");
    }
    sql.push(")");
}

fn exists_token(sql: &mut Sql2, param: i64, alts: &[TokenQ]) {
    sql.push(" AND EXISTS (SELECT 1 FROM idx_token t WHERE t.rid = d.rid AND t.param = ");
    sql.arg(param);
    sql.push(" AND ");
    token_cond(sql, "t", alts);
    sql.push(")");
}

/// A searchset Bundle, serialised with the stored resources spliced in.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Bundle {
    resource_type: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    /// Matches in total (all pages).
    pub total: u64,
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
        total,
        link,
        entry: entries,
    })
}

fn empty_bundle(q: &Query) -> Bundle {
    Bundle {
        resource_type: "Bundle",
        kind: "searchset",
        total: 0,
        link: vec![Link {
            relation: "self",
            url: q.raw.clone(),
        }],
        entry: Vec::new(),
    }
}

fn with_offset(raw: &str, offset: usize) -> String {
    let (ty, rest) = raw.split_once('?').unwrap_or((raw, ""));
    let mut parts: Vec<&str> = rest
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("_offset="))
        .collect();
    let o = format!("_offset={offset}");
    parts.push(&o);
    format!("{ty}?{}", parts.join("&"))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Result<Query, String> {
        parse(s, &Limits::default()).map_err(|e| e.to_string())
    }

    #[test]
    fn parses_every_supported_form() {
        let x = q("Observation?code=http://loinc.org|8867-4,|hr,http://x|,abc&category=vital-signs&date=ge2025-09&_sort=-date&_count=10&_offset=20").unwrap();
        assert_eq!(x.count, 10);
        assert_eq!(x.offset, 20);
        assert_eq!(x.sort, Some((SortKey::Date, true)));
        match &x.filters[0] {
            Filter::Token { alts, .. } => assert_eq!(
                alts,
                &vec![
                    TokenQ::SysCode("http://loinc.org".into(), "8867-4".into()),
                    TokenQ::NoSys("hr".into()),
                    TokenQ::SysOnly("http://x".into()),
                    TokenQ::Code("abc".into())
                ]
            ),
            f => panic!("{f:?}"),
        }
        assert!(q("MedicationRequest?status=active&intent=order&authoredon=le2025-10-01&_include=MedicationRequest:medication").is_ok());
        assert!(q("Condition?clinical-status=active&onset-date=2025&recorded-date=lt2025-06-01T10:00:00Z").is_ok());
        assert!(q("Immunization?vaccine-code=http://hl7.org/fhir/sid/cvx|140").is_ok());
        assert!(q("Encounter?type=x&_lastUpdated=gt2025-01-01&_sort=_lastUpdated").is_ok());
        assert!(q("Observation?code=a%7Cb").is_ok(), "percent-encoded |");
        assert_eq!(
            q("Observation?_count=100000").unwrap().count,
            Limits::default().search_max_count
        );
    }

    #[test]
    fn everything_outside_the_subset_is_named() {
        for (s, want) in [
            (
                "Observation?foo=bar",
                "parameter foo is not supported for Observation",
            ),
            (
                "Observation?_elements=id",
                "parameter _elements is not supported",
            ),
            (
                "Observation?code:text=x",
                "modifier :text on code is not supported",
            ),
            (
                "Observation?date=sa2025",
                "date: date prefix \"sa\" is not supported",
            ),
            ("Observation?date=2025-13", "date: \"2025-13\""),
            ("Observation?_sort=code", "_sort=code is not supported"),
            (
                "Observation?_include=Observation:subject",
                "_include=Observation:subject is not supported",
            ),
            (
                "Observation?intent=order",
                "parameter intent is not supported for Observation",
            ),
            ("Observation?code=", "empty value"),
            ("Observation?code=a|b|c", "is not a token"),
            ("Observation?_count=lots", "_count \"lots\" is not a number"),
            ("Basic?code=x", "type Basic is not searchable"),
            ("observation?code=x", "is not a FHIR resource type"),
            ("Observation?patient=a,b", "must name one Patient"),
        ] {
            let e = q(s).expect_err(s);
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    #[test]
    fn escaped_commas_and_next_links() {
        assert_eq!(
            split_or(r"a\,b,c"),
            vec!["a,b".to_string(), "c".to_string()]
        );
        assert_eq!(
            with_offset("Observation?code=x&_offset=5", 10),
            "Observation?code=x&_offset=10"
        );
    }
}
