//! Building the one SQL query of a search: the driving index, the AND-ed
//! filters, and the scope conditions, with every value a bound parameter.

use rusqlite::types::Value as Sql;

use super::query::{Filter, Query, TokenQ};
use super::{Grants, SearchError};
use crate::fhir::date::{DateRange, Prefix};
use crate::fhir::params::TypeDef;
use crate::scopes::{ResourceSel, Scope, ScopeParam};

/// SQL fragments with their bound values, built in order.
#[derive(Default)]
pub(super) struct Sql2 {
    pub(super) text: String,
    pub(super) args: Vec<Sql>,
}

impl Sql2 {
    pub(super) fn push(&mut self, s: &str) {
        self.text.push_str(s);
    }
    pub(super) fn arg(&mut self, v: impl Into<Sql>) {
        self.text.push('?');
        self.args.push(v.into());
    }
}

/// A scope restriction: OR over the outer list of (AND over token
/// conditions `(param code, token)`).
pub(super) type ScopeFilter = Vec<Vec<(i64, TokenQ)>>;

/// The scope restriction for a type: `None` = no restriction. Err when
/// nothing is granted.
pub(super) fn scope_filters(
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

pub(super) fn token_cond(sql: &mut Sql2, alias: &str, alts: &[TokenQ]) {
    token_cond_on(
        sql,
        &format!("{alias}.code"),
        &format!("{alias}.system"),
        alts,
    );
}

/// ` (…)`: whether the (`code`, `system`) columns match one of `alts`.
fn token_cond_on(sql: &mut Sql2, code: &str, system: &str, alts: &[TokenQ]) {
    sql.push("(");
    for (i, a) in alts.iter().enumerate() {
        if i > 0 {
            sql.push(" OR ");
        }
        match a {
            TokenQ::Code(c) => {
                sql.push(&format!("{code} = "));
                sql.arg(c.clone());
            }
            TokenQ::SysCode(s, c) => {
                sql.push(&format!("({code} = "));
                sql.arg(c.clone());
                sql.push(&format!(" AND {system} = "));
                sql.arg(s.clone());
                sql.push(")");
            }
            TokenQ::NoSys(c) => {
                sql.push(&format!("({code} = "));
                sql.arg(c.clone());
                sql.push(&format!(" AND {system} = '')"));
            }
            TokenQ::SysOnly(s) => {
                sql.push(&format!("{system} = "));
                sql.arg(s.clone());
            }
        }
    }
    sql.push(")");
}

pub(super) fn date_cond(sql: &mut Sql2, lo: &str, hi: &str, prefix: Prefix, r: DateRange) {
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
pub(super) enum Driver {
    Token(i64, Vec<TokenQ>),
    Date(i64, Prefix, DateRange),
    Compartment,
}

/// Builds `SELECT DISTINCT d.rid, d.sort_ms FROM … WHERE …` for the query.
pub(super) fn build_where(
    q: &Query,
    tid: i64,
    patient: Option<&str>,
    scope: &Option<ScopeFilter>,
) -> Sql2 {
    let def = q.def;
    let (tokens, lone_scope) = and_tokens(q, scope);
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
    push_filters(&mut sql, q, tid, &tokens, skip_token, scope, lone_scope);
    sql
}

/// The AND-ed query and scope tokens: the query's token filters, plus the
/// conditions of a lone scope (several scopes are OR-ed by `scope_cond`).
fn and_tokens(q: &Query, scope: &Option<ScopeFilter>) -> (Vec<(i64, Vec<TokenQ>)>, bool) {
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
    (tokens, lone_scope)
}

/// Appends every condition on the driving row `d` but the driver's own:
/// the tokens (but `skip`), dates, ids, `_lastUpdated`, and the OR-ed scopes.
fn push_filters(
    sql: &mut Sql2,
    q: &Query,
    tid: i64,
    tokens: &[(i64, Vec<TokenQ>)],
    skip: Option<usize>,
    scope: &Option<ScopeFilter>,
    lone_scope: bool,
) {
    for (i, (param, alts)) in tokens.iter().enumerate() {
        if skip == Some(i) {
            continue;
        }
        exists_token(sql, *param, alts);
    }
    push_other_filters(sql, q, tid, scope, lone_scope);
}

/// Appends the conditions on `d` that are not AND-ed tokens: dates, ids,
/// `_lastUpdated`, and the OR of several scopes.
fn push_other_filters(
    sql: &mut Sql2,
    q: &Query,
    tid: i64,
    scope: &Option<ScopeFilter>,
    lone_scope: bool,
) {
    let def = q.def;
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
                date_cond(sql, "x.low", "x.high", *prefix, *range);
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
                date_cond(sql, "r.last_updated", "r.last_updated", *prefix, *range);
                sql.push(")");
            }
        }
    }
    if let (false, Some(ors)) = (lone_scope, scope) {
        scope_cond(sql, ors);
    }
}

/// `$lastn` reads `obs_lastn` (schema migration 3): a patient's
/// Observation code groups, within one category, in (`code`, `system`)
/// order, each group's rows newest first.
///
/// The first group of category ?3: its (category, system, code).
pub(super) const LASTN_FIRST_GROUP: &str = "SELECT category, system, code FROM obs_lastn \
     WHERE tid = ?1 AND patient = ?2 AND category = ?3 \
     ORDER BY code DESC, system DESC, sort_ms DESC LIMIT 1";

/// The next group of category ?3 below (`code`, `system`) = (?4, ?5): the
/// same code with a lower system, else the next lower code. Two seeks,
/// each a plain range on the key's next column: SQLite does not seek
/// backward to a row-value bound (`(code, system) < (?4, ?5)` walks back
/// over every row of the higher groups, so the search grew with history).
/// A macro so that both next-group statements are whole literals.
macro_rules! next_in_category {
    () => {
        "SELECT * FROM (SELECT category, system, code FROM obs_lastn \
         WHERE tid = ?1 AND patient = ?2 AND category = ?3 AND code = ?4 AND system < ?5 \
         ORDER BY system DESC, sort_ms DESC LIMIT 1) \
         UNION ALL SELECT * FROM (SELECT category, system, code FROM obs_lastn \
         WHERE tid = ?1 AND patient = ?2 AND category = ?3 AND code < ?4 \
         ORDER BY code DESC, system DESC, sort_ms DESC LIMIT 1)"
    };
}
pub(super) const LASTN_NEXT_GROUP: &str = concat!(next_in_category!(), " LIMIT 1");

/// For a `system|` category (any code): the first group of any category.
pub(super) const LASTN_FIRST_GROUP_ANY: &str = "SELECT category, system, code FROM obs_lastn \
     WHERE tid = ?1 AND patient = ?2 \
     ORDER BY category DESC, code DESC, system DESC, sort_ms DESC LIMIT 1";

/// For a `system|` category: the next group below (?3, ?4, ?5): within
/// the category as [`LASTN_NEXT_GROUP`], else the next lower category.
pub(super) const LASTN_NEXT_GROUP_ANY: &str = concat!(
    next_in_category!(),
    " UNION ALL SELECT * FROM (SELECT category, system, code FROM obs_lastn \
     WHERE tid = ?1 AND patient = ?2 AND category < ?3 \
     ORDER BY category DESC, code DESC, system DESC, sort_ms DESC LIMIT 1) LIMIT 1"
);

/// The category code an alternative of `$lastn`'s `category` names
/// (None for `system|`, which names every code of a system).
pub(super) fn lastn_category(alt: &TokenQ) -> Option<&str> {
    match alt {
        TokenQ::Code(c) | TokenQ::SysCode(_, c) | TokenQ::NoSys(c) => Some(c),
        TokenQ::SysOnly(_) => None,
    }
}

/// Whether every `obs_lastn` row read for category alternative `alt`
/// (its category code, and its category system when `alt` names one)
/// shows that its resource matches the category token `t`.
fn category_implied(t: &TokenQ, alt: &TokenQ) -> bool {
    let (alt_sys, alt_code) = match alt {
        TokenQ::Code(c) => (None, Some(c)),
        TokenQ::SysCode(s, c) => (Some(s.as_str()), Some(c)),
        TokenQ::NoSys(c) => (Some(""), Some(c)),
        TokenQ::SysOnly(s) => (Some(s.as_str()), None),
    };
    match t {
        TokenQ::Code(c) => alt_code == Some(c),
        TokenQ::SysCode(s, c) => alt_code == Some(c) && alt_sys == Some(s.as_str()),
        TokenQ::NoSys(c) => alt_code == Some(c) && alt_sys == Some(""),
        TokenQ::SysOnly(s) => alt_sys == Some(s.as_str()),
    }
}

/// `$lastn` for one code group of one category alternative `alt` of the
/// query's `category`: the newest `max` rows of one (`category`, `code`,
/// `system`) in the patient's `obs_lastn` that pass every filter and
/// scope, newest first. A backward range scan that stops at `max`,
/// starting on the page the group's seek just read. Built once per
/// alternative: the group's category, code and system are the arguments at
/// [`LASTN_GROUP_ARG`] and the two after it, set for each group.
///
/// The rows make most conditions column tests: the query's `category`
/// (the rows are that category's) and any category token they imply; any
/// other category token is tested on the row's own category coding first
/// (a scope's `system|vital-signs` against a query's `vital-signs`); and a
/// `status` of plain codes is the `status` column, unless it is NULL.
/// Every other condition is the same `EXISTS` as in any search.
pub(super) fn build_lastn_group(
    q: &Query,
    tid: i64,
    patient: &str,
    scope: &Option<ScopeFilter>,
    max: usize,
    alt: &TokenQ,
) -> Sql2 {
    use crate::fhir::params::codes::{CATEGORY, STATUS};
    let (tokens, lone_scope) = and_tokens(q, scope);
    let mut sql = Sql2::default();
    // DISTINCT: a category code under two systems is two rows of one
    // Observation, adjacent in the key, which must not take two of `max`.
    sql.push("SELECT DISTINCT d.rid, d.sort_ms FROM obs_lastn d WHERE d.tid = ");
    sql.arg(tid);
    sql.push(" AND d.patient = ");
    sql.arg(patient.to_owned());
    sql.push(" AND d.category = ");
    sql.arg(String::new());
    sql.push(" AND d.code = ");
    sql.arg(String::new());
    sql.push(" AND d.system = ");
    sql.arg(String::new());
    match alt {
        TokenQ::SysCode(s, _) | TokenQ::SysOnly(s) => {
            sql.push(" AND d.cat_system = ");
            sql.arg(s.clone());
        }
        TokenQ::NoSys(_) => sql.push(" AND d.cat_system = ''"),
        TokenQ::Code(_) => {}
    }
    // The query's own category (the first category token) is the
    // alternative being read.
    let own = tokens.iter().position(|(p, _)| *p == CATEGORY);
    for (i, (param, alts)) in tokens.iter().enumerate() {
        if Some(i) == own {
            continue;
        }
        match (*param, alts.as_slice()) {
            (CATEGORY, [t]) if category_implied(t, alt) => {}
            // The row's own category coding shows most matches; the
            // resource's other category codings are looked up only when
            // it does not.
            (CATEGORY, _) => {
                sql.push(" AND (");
                token_cond_on(&mut sql, "d.category", "d.cat_system", alts);
                sql.push(" OR (1");
                exists_token(&mut sql, *param, alts);
                sql.push("))");
            }
            // The `status` column, unless the resource has not exactly one.
            // Equalities OR-ed, not `IN (…)`, which SQLite builds a
            // temporary b-tree for on every run.
            (STATUS, _) if alts.iter().all(|a| matches!(a, TokenQ::Code(_))) => {
                sql.push(" AND (");
                for a in alts {
                    if let TokenQ::Code(c) = a {
                        sql.push("d.status = ");
                        sql.arg(c.clone());
                        sql.push(" OR ");
                    }
                }
                sql.push("(d.status IS NULL");
                exists_token(&mut sql, *param, alts);
                sql.push("))");
            }
            _ => exists_token(&mut sql, *param, alts),
        }
    }
    push_other_filters(&mut sql, q, tid, scope, lone_scope);
    sql.push(&format!(" ORDER BY d.sort_ms DESC, d.rid DESC LIMIT {max}"));
    sql
}

/// Where [`build_lastn_group`] binds the group's category (and, next, its
/// code and system).
pub(super) const LASTN_GROUP_ARG: usize = 2;

/// Appends ` AND (…)`: the OR of each scope's AND-ed token conditions on `d`.
pub(super) fn scope_cond(sql: &mut Sql2, ors: &ScopeFilter) {
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

pub(super) fn exists_token(sql: &mut Sql2, param: i64, alts: &[TokenQ]) {
    sql.push(" AND EXISTS (SELECT 1 FROM idx_token t WHERE t.rid = d.rid AND t.param = ");
    sql.arg(param);
    sql.push(" AND ");
    token_cond(sql, "t", alts);
    sql.push(")");
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_lastn_literals_are_observation_code_category_and_status() {
        // Migration 3 fills obs_lastn with these codes spelt out.
        use crate::fhir::params::{OBSERVATION, codes, type_def};
        let obs = type_def("Observation").unwrap();
        assert_eq!(obs.code, OBSERVATION);
        assert_eq!(OBSERVATION, 2);
        assert_eq!(obs.param("code").map(|p| p.code), Some(codes::CODE));
        assert_eq!(obs.param("category").map(|p| p.code), Some(codes::CATEGORY));
        assert_eq!(obs.param("status").map(|p| p.code), Some(codes::STATUS));
        assert_eq!((codes::CODE, codes::CATEGORY, codes::STATUS), (1, 2, 3));
        let m = crate::fhir::schema::MIGRATIONS[2];
        assert!(m.contains("c.type = 2 AND c.param = 1"), "{m}");
        assert!(
            m.contains("k.param = 2") && m.contains("s.param = 3"),
            "{m}"
        );
    }

    #[test]
    fn a_category_token_is_implied_only_by_rows_that_show_it() {
        use super::{TokenQ as T, category_implied};
        let code = |c: &str| T::Code(c.into());
        let sys = |s: &str, c: &str| T::SysCode(s.into(), c.into());
        // Rows of alternative `vital-signs` (any system) show the code only.
        assert!(category_implied(&code("vital-signs"), &code("vital-signs")));
        assert!(!category_implied(
            &sys("s", "vital-signs"),
            &code("vital-signs")
        ));
        assert!(!category_implied(&code("laboratory"), &code("vital-signs")));
        // Rows of `s|vital-signs` show both.
        assert!(category_implied(
            &sys("s", "vital-signs"),
            &sys("s", "vital-signs")
        ));
        assert!(category_implied(
            &T::SysOnly("s".into()),
            &sys("s", "vital-signs")
        ));
        assert!(!category_implied(
            &sys("t", "vital-signs"),
            &sys("s", "vital-signs")
        ));
        assert!(category_implied(
            &T::NoSys("x".into()),
            &T::NoSys("x".into())
        ));
        assert!(!category_implied(&T::NoSys("x".into()), &code("x")));
        // Rows of `s|` show the system only.
        assert!(!category_implied(&code("x"), &T::SysOnly("s".into())));
    }
}
