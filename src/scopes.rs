//! SMART App Launch v2 scopes, the subset clinicbox grants to plugins.
//!
//! Grammar (anything else is refused with the reason):
//!
//! ```text
//! scope   = "patient/" type "." perms [ "?" filter *( "&" filter ) ]
//! type    = "*" / FHIR resource type name  (e.g. Observation)
//! perms   = "r" / "s" / "rs"               (read, search; SMART v2 order)
//! filter  = ("category" / "code" / "status") "=" token
//! token   = system "|" code  /  code       (exact match, no wildcards)
//! ```
//!
//! `user/` and `system/` contexts, the write letters `c u d`, SMART v1
//! `.read`/`.write`/`.*` suffixes, unknown filter parameters and repeated
//! filter parameters are refused. Filters in one scope are ANDed; separate
//! scopes are ORed. Invariant: a parsed [`Scope`] always renders back to the
//! canonical string it was parsed from (`Display`), so stored grants and
//! manifests compare byte for byte.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// Which resource types a scope covers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceSel {
    /// `*`: every type.
    Any,
    /// One named type.
    Type(String),
}

/// A filter parameter allowed in a scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScopeParam {
    /// `category`
    Category,
    /// `code`
    Code,
    /// `status`
    Status,
}

impl ScopeParam {
    /// The parameter's name in a scope string.
    pub fn name(self) -> &'static str {
        match self {
            ScopeParam::Category => "category",
            ScopeParam::Code => "code",
            ScopeParam::Status => "status",
        }
    }
}

/// An exact `system|code` token, or a bare `code`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token {
    /// The code system URI, if given.
    pub system: Option<String>,
    /// The code.
    pub code: String,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.system {
            Some(s) => write!(f, "{s}|{}", self.code),
            None => f.write_str(&self.code),
        }
    }
}

/// A parsed, valid SMART v2 patient scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope {
    /// The resource type(s) covered.
    pub resource: ResourceSel,
    /// `r`: read by id.
    pub read: bool,
    /// `s`: search.
    pub search: bool,
    /// Filters, sorted by parameter, ANDed.
    pub filters: Vec<(ScopeParam, Token)>,
}

/// Why a scope string was refused.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid scope {scope:?}: {reason}")]
pub struct ScopeError {
    /// The scope as given.
    pub scope: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for Scope {
    type Err = ScopeError;

    fn from_str(s: &str) -> Result<Scope, ScopeError> {
        let fail = |reason: &str| ScopeError {
            scope: s.to_owned(),
            reason: reason.to_owned(),
        };
        let (context, rest) = s
            .split_once('/')
            .ok_or_else(|| fail("expected patient/<Type>.<r|s|rs>"))?;
        match context {
            "patient" => {}
            "user" | "system" => {
                return Err(fail(&format!(
                    "{context}/ scopes are not granted to plugins; only patient/ scopes are"
                )));
            }
            _ => return Err(fail("scope context must be patient/")),
        }
        let (body, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        let (ty, perms) = body
            .rsplit_once('.')
            .ok_or_else(|| fail("expected <Type>.<r|s|rs> after patient/"))?;
        let resource = if ty == "*" {
            ResourceSel::Any
        } else if is_type_name(ty) {
            ResourceSel::Type(ty.to_owned())
        } else {
            return Err(fail(&format!("{ty:?} is not a FHIR resource type name")));
        };
        let (read, search) = match perms {
            "r" => (true, false),
            "s" => (false, true),
            "rs" => (true, true),
            "read" | "write" | "*" => {
                return Err(fail(
                    "SMART v1 permissions are not accepted; use the v2 letters r, s or rs",
                ));
            }
            p if p.contains(['c', 'u', 'd']) => {
                return Err(fail(
                    "write permissions (c, u, d) are never granted to plugins",
                ));
            }
            "sr" => return Err(fail("permission letters must be in SMART order: rs")),
            _ => return Err(fail("permissions must be r, s or rs")),
        };
        let mut filters: Vec<(ScopeParam, Token)> = Vec::new();
        if let Some(q) = query {
            if q.is_empty() {
                return Err(fail("empty filter after '?'"));
            }
            for pair in q.split('&') {
                let (name, value) = pair
                    .split_once('=')
                    .ok_or_else(|| fail(&format!("filter {pair:?} is not name=value")))?;
                let param = match name {
                    "category" => ScopeParam::Category,
                    "code" => ScopeParam::Code,
                    "status" => ScopeParam::Status,
                    other => {
                        return Err(fail(&format!(
                            "filter parameter {other:?} is not supported (category, code, status)"
                        )));
                    }
                };
                if filters.iter().any(|(p, _)| *p == param) {
                    return Err(fail(&format!("filter parameter {name:?} is repeated")));
                }
                filters.push((param, parse_token(value).map_err(|r| fail(&r))?));
            }
            filters.sort();
        }
        Ok(Scope {
            resource,
            read,
            search,
            filters,
        })
    }
}

fn parse_token(value: &str) -> Result<Token, String> {
    let bad = |c: char| c.is_whitespace() || c.is_control() || matches!(c, '&' | '?' | ',' | '*');
    if value.is_empty() {
        return Err("empty filter value".into());
    }
    if value.chars().any(bad) {
        return Err(format!(
            "filter value {value:?} has a forbidden character (space, control, & ? , *)"
        ));
    }
    match value.split_once('|') {
        Some((system, code)) => {
            if system.is_empty() || code.is_empty() || code.contains('|') {
                return Err(format!(
                    "filter value {value:?} must be exactly system|code, both non-empty"
                ));
            }
            Ok(Token {
                system: Some(system.to_owned()),
                code: code.to_owned(),
            })
        }
        None => Ok(Token {
            system: None,
            code: value.to_owned(),
        }),
    }
}

/// True if `s` is a syntactically valid FHIR resource type name.
pub fn is_type_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('A'..='Z'))
        && s.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric())
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ty = match &self.resource {
            ResourceSel::Any => "*",
            ResourceSel::Type(t) => t.as_str(),
        };
        let perms = match (self.read, self.search) {
            (true, true) => "rs",
            (true, false) => "r",
            _ => "s",
        };
        write!(f, "patient/{ty}.{perms}")?;
        for (i, (p, t)) in self.filters.iter().enumerate() {
            let sep = if i == 0 { '?' } else { '&' };
            write!(f, "{sep}{}={t}", p.name())?;
        }
        Ok(())
    }
}

impl Scope {
    /// True if everything `self` allows is also allowed by `wider`: the
    /// test an admin grant must pass against the manifest's request.
    pub fn is_within(&self, wider: &Scope) -> bool {
        let type_ok = match (&wider.resource, &self.resource) {
            (ResourceSel::Any, _) => true,
            (ResourceSel::Type(w), ResourceSel::Type(s)) => w == s,
            (ResourceSel::Type(_), ResourceSel::Any) => false,
        };
        let perms_ok = (!self.read || wider.read) && (!self.search || wider.search);
        // Every restriction of the wider scope must also restrict this one.
        let filters_ok = wider.filters.iter().all(|f| self.filters.contains(f));
        type_ok && perms_ok && filters_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Scope, String> {
        s.parse::<Scope>().map_err(|e| e.reason)
    }

    #[test]
    fn accepts_the_v2_forms_and_round_trips() {
        for s in [
            "patient/Observation.rs",
            "patient/*.r",
            "patient/Condition.s",
            "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs",
            "patient/MedicationRequest.rs?status=active",
            "patient/Observation.s?category=http://x|labs&code=http://loinc.org|1234-5",
        ] {
            assert_eq!(parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn filters_are_canonically_ordered() {
        let s = parse("patient/Observation.s?code=a|b&category=c|d").unwrap();
        assert_eq!(s.to_string(), "patient/Observation.s?category=c|d&code=a|b");
    }

    #[test]
    fn refuses_everything_outside_the_subset_with_a_reason() {
        let cases = [
            ("user/Observation.rs", "user/ scopes are not granted"),
            ("system/*.rs", "system/ scopes are not granted"),
            ("patient/Observation.cruds", "write permissions"),
            ("patient/Observation.ru", "write permissions"),
            ("patient/Observation.read", "SMART v1"),
            ("patient/Observation.sr", "SMART order"),
            ("patient/observation.rs", "not a FHIR resource type"),
            ("patient/../x.rs", "not a FHIR resource type"),
            ("patient/Observation.rs?foo=bar", "\"foo\" is not supported"),
            ("patient/Observation.rs?code=a&code=b", "repeated"),
            ("patient/Observation.rs?code=", "empty filter value"),
            ("patient/Observation.rs?code=a|", "exactly system|code"),
            ("patient/Observation.rs?code=a b", "forbidden character"),
            ("patient/Observation.rs?", "empty filter"),
            ("launch/patient", "context must be patient/"),
        ];
        for (s, want) in cases {
            let err = parse(s).expect_err(s);
            assert!(err.contains(want), "{s}: {err}");
        }
    }

    #[test]
    fn subset_rules() {
        let wide = parse("patient/Observation.rs").unwrap();
        let narrow = parse("patient/Observation.s?category=a|vital-signs").unwrap();
        assert!(narrow.is_within(&wide));
        assert!(!wide.is_within(&narrow));
        assert!(wide.is_within(&parse("patient/*.rs").unwrap()));
        assert!(!parse("patient/*.r").unwrap().is_within(&wide));
        assert!(!parse("patient/Condition.r").unwrap().is_within(&wide));
    }
}
