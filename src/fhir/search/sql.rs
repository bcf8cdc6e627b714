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
    let def = q.def;
    for (i, (param, alts)) in tokens.iter().enumerate() {
        if skip == Some(i) {
            continue;
        }
        exists_token(sql, *param, alts);
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

/// `Observation.code` rows, read through the partial index
/// `idx_token_lastn` (schema migration 2): the literals must match its
/// `WHERE` for SQLite to use it. A macro, so that the group seeks below
/// are whole literals (`concat!`).
macro_rules! lastn_rows {
    () => {
        "d.type = 2 AND d.param = 1"
    };
}
pub(super) const LASTN_ROWS: &str = lastn_rows!();

/// `$lastn`'s first group: the highest (`code`, `system`) of the patient.
pub(super) const LASTN_FIRST_GROUP: &str = concat!(
    "SELECT d.system, d.code FROM idx_token d INDEXED BY idx_token_lastn WHERE ",
    lastn_rows!(),
    " AND d.tid = ?1 AND d.patient = ?2",
    " ORDER BY d.code DESC, d.system DESC, d.sort_ms DESC LIMIT 1"
);

/// `$lastn`'s next group: the highest (`code`, `system`) below (?3, ?4).
pub(super) const LASTN_NEXT_GROUP: &str = concat!(
    "SELECT d.system, d.code FROM idx_token d INDEXED BY idx_token_lastn WHERE ",
    lastn_rows!(),
    " AND d.tid = ?1 AND d.patient = ?2 AND (d.code, d.system) < (?3, ?4)",
    " ORDER BY d.code DESC, d.system DESC, d.sort_ms DESC LIMIT 1"
);

/// `$lastn` for one code group: the newest `max` rows of one (`system`,
/// `code`) in the patient's compartment that pass every filter and scope,
/// newest first. A backward range scan of `idx_token_lastn` that stops at
/// `max`, starting on the page the group's seek just read. Built once per
/// search: the group's code and system are the arguments at
/// [`LASTN_CODE_ARG`] and [`LASTN_CODE_ARG`] + 1, set for each group.
pub(super) fn build_lastn_group(
    q: &Query,
    tid: i64,
    patient: &str,
    scope: &Option<ScopeFilter>,
    max: usize,
) -> Sql2 {
    let (tokens, lone_scope) = and_tokens(q, scope);
    let mut sql = Sql2::default();
    sql.push(&format!(
        "SELECT d.rid, d.sort_ms FROM idx_token d INDEXED BY idx_token_lastn WHERE {LASTN_ROWS} AND d.tid = "
    ));
    sql.arg(tid);
    sql.push(" AND d.patient = ");
    sql.arg(patient.to_owned());
    sql.push(" AND d.code = ");
    sql.arg(String::new());
    sql.push(" AND d.system = ");
    sql.arg(String::new());
    push_filters(&mut sql, q, tid, &tokens, None, scope, lone_scope);
    sql.push(&format!(" ORDER BY d.sort_ms DESC, d.rid DESC LIMIT {max}"));
    sql
}

/// Where [`build_lastn_group`] binds the group's code (and, next, system).
pub(super) const LASTN_CODE_ARG: usize = 2;

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
    fn the_lastn_literals_are_observation_code() {
        // LASTN_ROWS and migration 2's partial index spell these out.
        let obs = crate::fhir::params::type_def("Observation").unwrap();
        assert_eq!(obs.code, 2);
        assert_eq!(obs.param("code").map(|p| p.code), Some(1));
        assert!(crate::fhir::schema::MIGRATIONS[1].contains("WHERE type = 2 AND param = 1"));
    }
}
