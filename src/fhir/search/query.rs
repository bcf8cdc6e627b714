//! Parsing a search (`Type?name=value&…`) into a [`Query`]: the supported
//! subset of FHIR R4 search parameters, prefixes and value forms; anything
//! else is an error that names it.

use percent_encoding::percent_decode_str;

use super::{SearchError, invalid};
use crate::fhir::date::{self, DateRange, Prefix};
use crate::fhir::params::{self as p, Kind, TypeDef};
use crate::limits::Limits;

/// One alternative of a token parameter value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum TokenQ {
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
pub(super) enum Filter {
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
pub(super) enum SortKey {
    Date,
    LastUpdated,
}

/// A parsed search.
#[derive(Debug, Clone)]
pub struct Query {
    pub(super) def: &'static TypeDef,
    pub(super) filters: Vec<Filter>,
    pub(super) count: usize,
    pub(super) offset: usize,
    pub(super) sort: Option<(SortKey, bool)>,
    pub(super) include_medication: bool,
    pub(super) patient_param: Option<(String, String)>,
    /// The query string as given (for the self link).
    pub(super) raw: String,
    /// `_total=none`: do not count every match (Bundle.total is left out,
    /// and the search stops after the page), for callers that only want the
    /// newest few of a long history.
    pub(super) no_total: bool,
    /// `Observation/$lastn`: the newest `max` matches of each code
    /// (`system|code` of `Observation.code`), instead of one sorted page.
    pub(super) lastn: Option<usize>,
}

/// Parses `Type?name=value&…`, or `Observation/$lastn?name=value&…`.
pub fn parse(q: &str, limits: &Limits) -> Result<Query, SearchError> {
    if q.len() > limits.search_max_query_bytes {
        return Err(invalid(format!(
            "query is over {} bytes",
            limits.search_max_query_bytes
        )));
    }
    let (path, rest) = q.split_once('?').unwrap_or((q, ""));
    let (ty, lastn) = match path.split_once('/') {
        Some(("Observation", "$lastn")) => ("Observation", true),
        Some((t, op)) => {
            return Err(invalid(format!(
                "{t}/{op}: the only operation supported is Observation/$lastn"
            )));
        }
        None => (path, false),
    };
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
        no_total: false,
        lastn: lastn.then_some(1),
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
        if query.lastn.is_some() {
            query.add_lastn(&base, &value, limits)?;
        } else {
            query.add(&base, &value, limits)?;
        }
    }
    if query.lastn.is_some() {
        let has_category = query.filters.iter().any(
            |f| matches!(f, Filter::Token { param, .. } if Some(*param) == def.param("category").map(|p| p.code)),
        );
        if !has_category {
            return Err(invalid("$lastn: a category parameter is required"));
        }
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
    /// A `$lastn` parameter: `max`, or an ordinary filter; the paging and
    /// result-shaping parameters do not apply to it.
    fn add_lastn(&mut self, name: &str, value: &str, limits: &Limits) -> Result<(), SearchError> {
        match name {
            "max" => {
                let n: usize = value.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    invalid(format!("$lastn: max {value:?} is not a positive integer"))
                })?;
                self.lastn = Some(n.min(limits.search_max_count));
                Ok(())
            }
            "_count" | "_offset" | "_sort" | "_include" | "_total" => Err(invalid(format!(
                "$lastn: {name} is not supported (use max; results are newest first)"
            ))),
            _ => self.add(name, value, limits),
        }
    }

    fn add(&mut self, name: &str, value: &str, limits: &Limits) -> Result<(), SearchError> {
        match name {
            "_count" => {
                let n: usize = value
                    .parse()
                    .map_err(|_| invalid(format!("_count {value:?} is not a number")))?;
                self.count = n.min(limits.search_max_count);
            }
            "_total" => match value {
                "none" => self.no_total = true,
                // An exact count is what every search gives by default.
                "accurate" | "estimate" => self.no_total = false,
                other => {
                    return Err(invalid(format!(
                        "_total={other} is not one of none, estimate, accurate"
                    )));
                }
            },
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
                if !crate::fhir::is_valid_id(id) || value.contains(',') {
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

/// The query string with `_offset` replaced (for `next` links).
pub(super) fn with_offset(raw: &str, offset: usize) -> String {
    let (ty, rest) = raw.split_once('?').unwrap_or((raw, ""));
    let mut parts: Vec<&str> = rest
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("_offset="))
        .collect();
    let o = format!("_offset={offset}");
    parts.push(&o);
    format!("{ty}?{}", parts.join("&"))
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
