//! The signed plugin manifest (docs/bundle-format.md §3, step 5) and the
//! vendor's `plugin.toml` that `bundle pack` turns into one.
//!
//! Parsing is two-stage: serde reads [`RawManifest`] (exactly the JSON
//! fields, `deny_unknown_fields`), then [`Manifest::from_raw`] validates every
//! field into typed values, naming the field on error. Invariant: a
//! `Manifest` value is always valid: a safe plugin name, semver version,
//! supported ABI, well-formed digest, unique export names, valid SMART v2
//! scopes, limits within the ceilings, and `created < expires`.

use std::fmt;

use semver::Version;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::limits::Limits;
use crate::scopes::Scope;

/// The host ABI versions this build can run.
pub const SUPPORTED_ABI: &[u32] = &[1];

/// The manifest exactly as serialised in the DSSE payload.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawManifest {
    /// `vendor/name`.
    pub name: String,
    /// Semantic version.
    pub version: String,
    /// Host ABI version.
    pub abi: u32,
    /// The wasm module this manifest binds.
    pub wasm: RawWasm,
    /// Functions the host may call.
    pub exports: Vec<String>,
    /// Requested SMART v2 scopes.
    pub scopes: Vec<String>,
    /// Requested resource limits.
    pub limits: RequestedLimits,
    /// RFC 3339 creation time.
    pub created: String,
    /// RFC 3339 expiry time.
    pub expires: String,
    /// Free text for humans.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Resources whose arrival (device ingest) triggers a function.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscriptions: Vec<RawSubscription>,
}

/// One subscription as written: `criteria` is a FHIR search on one type
/// with the token filters a scope allows (`Observation?category=vital-signs`),
/// `function` an exported function called with the matching patient.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawSubscription {
    /// `Type` or `Type?param=token&…` (params: category, code, status).
    pub criteria: String,
    /// The exported function to call.
    pub function: String,
}

/// A validated subscription: the criteria are held as a search scope, so
/// they have exactly a scope's syntax and matching rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The criteria as given (canonical form of the scope's filters).
    pub criteria: String,
    /// The type and filters.
    pub filter: Scope,
    /// The exported function to call.
    pub function: String,
}

impl Subscription {
    /// True if `res` (a resource with this `id`) matches the criteria:
    /// the same type, and every filter's token among its indexed values.
    pub fn matches(&self, res: &serde_json::Value, id: &str) -> bool {
        let crate::scopes::ResourceSel::Type(ty) = &self.filter.resource else {
            return false;
        };
        if res.get("resourceType").and_then(|t| t.as_str()) != Some(ty.as_str()) {
            return false;
        }
        let Some(def) = crate::fhir::params::type_def(ty) else {
            return false;
        };
        let found = crate::fhir::params::extract(def, id, res);
        self.filter.filters.iter().all(|(param, want)| {
            let Some(p) = def.param(param.name()) else {
                return false;
            };
            found.tokens.iter().any(|(code, system, value)| {
                *code == p.code
                    && *value == want.code
                    && (want.system.is_none() || *system == want.system)
            })
        })
    }
}

/// The wasm binding in a manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawWasm {
    /// Lowercase hex SHA-256 of the module.
    pub sha256: String,
    /// Module size in bytes.
    pub size: u64,
}

/// Per-plugin limits the vendor asks for; the host clamps them further.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RequestedLimits {
    /// Linear memory, MiB.
    pub memory_mib: u32,
    /// Wall-clock time per call, ms.
    pub timeout_ms: u32,
}

/// The vendor's `plugin.toml`: a manifest without the parts `pack` fills in
/// (wasm digest and size, created, expires).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestSource {
    /// `vendor/name`.
    pub name: String,
    /// Semantic version.
    pub version: String,
    /// Host ABI version.
    pub abi: u32,
    /// Functions the host may call.
    pub exports: Vec<String>,
    /// Requested SMART v2 scopes.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Requested limits.
    pub limits: RequestedLimits,
    /// Free text for humans.
    #[serde(default)]
    pub description: Option<String>,
    /// Subscriptions (see [`RawSubscription`]).
    #[serde(default)]
    pub subscriptions: Vec<RawSubscription>,
}

/// A namespaced, path-safe plugin name: `vendor/name`, lowercase ASCII
/// letters, digits and inner hyphens; vendor ≤ 32 and name ≤ 64 characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PluginName(String);

impl PluginName {
    /// Validates a plugin name, explaining any refusal.
    pub fn parse(s: &str) -> Result<PluginName, String> {
        if s.is_empty() {
            return Err("is empty".into());
        }
        if let Some(c) = s.chars().find(|c| !c.is_ascii()) {
            return Err(format!(
                "contains the non-ASCII character U+{:04X}; names are lowercase ASCII",
                c as u32
            ));
        }
        if s.starts_with('/') {
            return Err("is an absolute path; expected vendor/name".into());
        }
        if s.split(['/', '\\']).any(|seg| seg == ".." || seg == ".") || s.contains('\\') {
            return Err("contains a path component (. .. or \\); expected vendor/name".into());
        }
        if s.chars().any(|c| c.is_ascii_uppercase()) {
            return Err("contains uppercase letters; names are lowercase".into());
        }
        let (vendor, name) = s
            .split_once('/')
            .ok_or("has no vendor; expected vendor/name")?;
        if name.contains('/') {
            return Err("has more than one '/'; expected vendor/name".into());
        }
        check_segment(vendor, "vendor", 32)?;
        check_segment(name, "name", 64)?;
        Ok(PluginName(s.to_owned()))
    }

    /// The full `vendor/name`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_segment(seg: &str, what: &str, max: usize) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    if seg.is_empty() || seg.len() > max {
        return Err(format!("{what} part must be 1 to {max} characters"));
    }
    if !seg.chars().all(ok_char) {
        return Err(format!(
            "{what} part {seg:?} may hold only a-z, 0-9 and '-'"
        ));
    }
    if seg.starts_with('-') || seg.ends_with('-') {
        return Err(format!("{what} part {seg:?} may not start or end with '-'"));
    }
    Ok(())
}

impl fmt::Display for PluginName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// `vendor/name`.
    pub name: PluginName,
    /// Semantic version.
    pub version: Version,
    /// Host ABI version (one of [`SUPPORTED_ABI`]).
    pub abi: u32,
    /// Lowercase hex SHA-256 of the wasm module.
    pub wasm_sha256: String,
    /// Size of the wasm module in bytes.
    pub wasm_size: u64,
    /// Exported functions the host may call.
    pub exports: Vec<String>,
    /// Requested scopes.
    pub scopes: Vec<Scope>,
    /// Requested limits.
    pub limits: RequestedLimits,
    /// Creation time.
    pub created: OffsetDateTime,
    /// Expiry time.
    pub expires: OffsetDateTime,
    /// Free text.
    pub description: Option<String>,
    /// What triggers which function on ingest.
    pub subscriptions: Vec<Subscription>,
}

/// Why a manifest was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ManifestError {
    /// Not JSON/TOML of the manifest's shape (includes unknown fields).
    #[error("malformed manifest: {0}")]
    Malformed(String),
    /// A field's value is invalid.
    #[error("manifest field `{field}`: {reason}")]
    Field {
        /// The field, dotted (`limits.memory_mib`, `scopes[2]`).
        field: String,
        /// What is wrong.
        reason: String,
    },
}

fn field_err(field: impl Into<String>, reason: impl Into<String>) -> ManifestError {
    ManifestError::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Parses an RFC 3339 time.
pub fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(s, &Rfc3339).map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))
}

/// Formats a time as RFC 3339 in UTC, e.g. `2026-11-25T00:00:00Z`.
pub fn format_time(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

impl Manifest {
    /// Parses and validates manifest JSON (the DSSE payload).
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Manifest, ManifestError> {
        let raw: RawManifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        Manifest::from_raw(raw, limits)
    }

    /// Validates every field of a raw manifest.
    pub fn from_raw(raw: RawManifest, limits: &Limits) -> Result<Manifest, ManifestError> {
        let name = PluginName::parse(&raw.name).map_err(|r| field_err("name", r))?;
        let version = Version::parse(&raw.version)
            .map_err(|e| field_err("version", format!("{:?} is not semver: {e}", raw.version)))?;
        if !SUPPORTED_ABI.contains(&raw.abi) {
            return Err(field_err(
                "abi",
                format!(
                    "host ABI {} is not supported (this build runs {SUPPORTED_ABI:?})",
                    raw.abi
                ),
            ));
        }
        let digest_ok = raw.wasm.sha256.len() == 64
            && raw
                .wasm
                .sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !digest_ok {
            return Err(field_err("wasm.sha256", "must be 64 lowercase hex digits"));
        }
        if raw.wasm.size == 0 || raw.wasm.size > limits.max_wasm_bytes {
            return Err(field_err(
                "wasm.size",
                format!("{} is outside 1..={}", raw.wasm.size, limits.max_wasm_bytes),
            ));
        }
        if raw.exports.is_empty() || raw.exports.len() > limits.max_exports {
            return Err(field_err(
                "exports",
                format!("must list 1 to {} functions", limits.max_exports),
            ));
        }
        for (i, e) in raw.exports.iter().enumerate() {
            if !is_export_name(e) {
                return Err(field_err(
                    format!("exports[{i}]"),
                    format!("{e:?} is not a function name ([A-Za-z_][A-Za-z0-9_]*, at most 64)"),
                ));
            }
            if raw.exports[..i].contains(e) {
                return Err(field_err(
                    format!("exports[{i}]"),
                    format!("{e:?} is listed twice"),
                ));
            }
        }
        if raw.scopes.len() > limits.max_scopes {
            return Err(field_err(
                "scopes",
                format!("at most {} scopes may be requested", limits.max_scopes),
            ));
        }
        let mut scopes = Vec::with_capacity(raw.scopes.len());
        for (i, s) in raw.scopes.iter().enumerate() {
            let scope: Scope = s.parse().map_err(|e: crate::scopes::ScopeError| {
                field_err(format!("scopes[{i}]"), e.to_string())
            })?;
            if scopes.contains(&scope) {
                return Err(field_err(
                    format!("scopes[{i}]"),
                    format!("{s:?} is listed twice"),
                ));
            }
            scopes.push(scope);
        }
        let l = raw.limits;
        if l.memory_mib == 0 || l.memory_mib > limits.max_plugin_memory_mib {
            return Err(field_err(
                "limits.memory_mib",
                format!(
                    "{} is outside 1..={}",
                    l.memory_mib, limits.max_plugin_memory_mib
                ),
            ));
        }
        if l.timeout_ms == 0 || l.timeout_ms > limits.max_plugin_timeout_ms {
            return Err(field_err(
                "limits.timeout_ms",
                format!(
                    "{} is outside 1..={}",
                    l.timeout_ms, limits.max_plugin_timeout_ms
                ),
            ));
        }
        let created = parse_time(&raw.created).map_err(|r| field_err("created", r))?;
        let expires = parse_time(&raw.expires).map_err(|r| field_err("expires", r))?;
        if expires <= created {
            return Err(field_err("expires", "must be later than `created`"));
        }
        if let Some(d) = &raw.description
            && (d.chars().count() > 1024 || d.chars().any(|c| c.is_control() && c != '\n'))
        {
            return Err(field_err(
                "description",
                "must be at most 1024 characters without control characters",
            ));
        }
        if raw.subscriptions.len() > limits.max_exports {
            return Err(field_err(
                "subscriptions",
                format!("at most {} subscriptions", limits.max_exports),
            ));
        }
        let mut subscriptions = Vec::with_capacity(raw.subscriptions.len());
        for (i, sub) in raw.subscriptions.iter().enumerate() {
            subscriptions.push(
                parse_subscription(sub, &raw.exports)
                    .map_err(|r| field_err(format!("subscriptions[{i}]"), r))?,
            );
        }
        Ok(Manifest {
            name,
            version,
            abi: raw.abi,
            wasm_sha256: raw.wasm.sha256,
            wasm_size: raw.wasm.size,
            exports: raw.exports,
            scopes,
            limits: l,
            created,
            expires,
            description: raw.description,
            subscriptions,
        })
    }

    /// The manifest as its serialisable raw form.
    pub fn to_raw(&self) -> RawManifest {
        RawManifest {
            name: self.name.to_string(),
            version: self.version.to_string(),
            abi: self.abi,
            wasm: RawWasm {
                sha256: self.wasm_sha256.clone(),
                size: self.wasm_size,
            },
            exports: self.exports.clone(),
            scopes: self.scopes.iter().map(ToString::to_string).collect(),
            limits: self.limits,
            created: format_time(self.created),
            expires: format_time(self.expires),
            description: self.description.clone(),
            subscriptions: self
                .subscriptions
                .iter()
                .map(|s| RawSubscription {
                    criteria: s.criteria.clone(),
                    function: s.function.clone(),
                })
                .collect(),
        }
    }

    /// Canonical JSON bytes: what `bundle pack` puts in the payload.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings and integers always serialises.
        serde_json::to_vec(&self.to_raw()).unwrap_or_default()
    }
}

impl ManifestSource {
    /// Parses a vendor's `plugin.toml`; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<ManifestSource, ManifestError> {
        toml::from_str(text).map_err(|e| ManifestError::Malformed(format!("{file}: {e}")))
    }
}

/// Parses subscription criteria through the scope parser: `Type?filters`
/// becomes the search scope `patient/Type.s?filters`.
fn parse_subscription(sub: &RawSubscription, exports: &[String]) -> Result<Subscription, String> {
    if !exports.contains(&sub.function) {
        return Err(format!("function {:?} is not in `exports`", sub.function));
    }
    let (ty, query) = match sub.criteria.split_once('?') {
        Some((t, q)) => (t, Some(q)),
        None => (sub.criteria.as_str(), None),
    };
    if !crate::scopes::is_type_name(ty) || crate::fhir::params::type_def(ty).is_none() {
        return Err(format!(
            "criteria {:?}: {ty:?} is not a resource type the cache indexes",
            sub.criteria
        ));
    }
    let scope_text = match query {
        Some(q) => format!("patient/{ty}.s?{q}"),
        None => format!("patient/{ty}.s"),
    };
    let filter: Scope = scope_text.parse().map_err(|e: crate::scopes::ScopeError| {
        format!("criteria {:?}: {}", sub.criteria, e.reason)
    })?;
    let def = crate::fhir::params::type_def(ty);
    for (param, _) in &filter.filters {
        if def.and_then(|d| d.param(param.name())).is_none() {
            return Err(format!(
                "criteria {:?}: {ty} has no search parameter {:?}",
                sub.criteria,
                param.name()
            ));
        }
    }
    Ok(Subscription {
        criteria: sub.criteria.clone(),
        filter,
        function: sub.function.clone(),
    })
}

fn is_export_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && s.len() <= 64
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn raw() -> RawManifest {
        RawManifest {
            name: "acme/news2".into(),
            version: "1.2.3".into(),
            abi: 1,
            wasm: RawWasm {
                sha256: "ab".repeat(32),
                size: 10,
            },
            exports: vec!["news2".into()],
            scopes: vec!["patient/Observation.rs".into()],
            limits: RequestedLimits {
                memory_mib: 16,
                timeout_ms: 100,
            },
            created: "2026-01-01T00:00:00Z".into(),
            expires: "2027-01-01T00:00:00Z".into(),
            description: None,
            subscriptions: vec![],
        }
    }

    #[test]
    fn subscriptions_parse_match_and_name_the_bad_field() {
        let mut r = raw();
        r.subscriptions = vec![RawSubscription {
            criteria: "Observation?category=vital-signs".into(),
            function: "news2".into(),
        }];
        let m = Manifest::from_raw(r.clone(), &Limits::default()).unwrap();
        let obs = serde_json::json!({"resourceType": "Observation", "id": "o1",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}]});
        assert!(m.subscriptions[0].matches(&obs, "o1"));
        let lab = serde_json::json!({"resourceType": "Observation", "id": "o2",
            "category": [{"coding": [{"code": "laboratory"}]}]});
        assert!(!m.subscriptions[0].matches(&lab, "o2"));
        let again = Manifest::parse(&m.to_json(), &Limits::default()).unwrap();
        assert_eq!(again, m);
        for (criteria, function, want) in [
            ("Observation", "nope", "subscriptions[0]"),
            ("Nonsense?category=x", "news2", "not a resource type"),
            ("Patient?category=x", "news2", "no search parameter"),
            ("Observation?foo=x", "news2", "criteria"),
        ] {
            r.subscriptions[0] = RawSubscription {
                criteria: criteria.into(),
                function: function.into(),
            };
            let e = Manifest::from_raw(r.clone(), &Limits::default())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("subscriptions[0]") && e.contains(want),
                "{criteria}: {e}"
            );
        }
    }

    #[test]
    fn valid_manifest_round_trips_through_json() {
        let m = Manifest::from_raw(raw(), &Limits::default()).unwrap();
        let again = Manifest::parse(&m.to_json(), &Limits::default()).unwrap();
        assert_eq!(m, again);
    }

    #[test]
    fn unknown_field_is_refused_by_name() {
        let mut v = serde_json::to_value(raw()).unwrap();
        v["run_as_root"] = true.into();
        let err = Manifest::parse(v.to_string().as_bytes(), &Limits::default()).unwrap_err();
        assert!(
            err.to_string().contains("unknown field `run_as_root`"),
            "{err}"
        );
    }

    #[test]
    fn plugin_name_tricks_are_refused() {
        for (name, why) in [
            ("../etc/passwd", "path component"),
            ("acme/../../x", "path component"),
            ("/etc/passwd", "absolute path"),
            ("Acme/news2", "uppercase"),
            ("acme/NEWS2", "uppercase"),
            ("аcme/news2", "non-ASCII"),  // Cyrillic а (U+0430)
            ("acme/news２", "non-ASCII"), // fullwidth digit
            ("acme", "no vendor"),
            ("acme/news2/x", "more than one"),
            ("acme/", "1 to 64"),
            ("acme/-x", "start or end"),
            ("acme/a_b", "only a-z"),
            ("acme\\news2", "path component"),
            ("", "empty"),
        ] {
            let err = PluginName::parse(name).expect_err(name);
            assert!(err.contains(why), "{name}: {err}");
        }
        assert!(PluginName::parse("acme-health/news2-v2").is_ok());
    }

    #[test]
    fn field_errors_name_the_field() {
        let l = Limits::default();
        type Mutation = Box<dyn Fn(&mut RawManifest)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|r| r.version = "1.0".into()), "`version`"),
            (Box::new(|r| r.abi = 9), "`abi`"),
            (
                Box::new(|r| r.wasm.sha256 = "AB".repeat(32)),
                "`wasm.sha256`",
            ),
            (Box::new(|r| r.exports.push("news2".into())), "`exports[1]`"),
            (
                Box::new(|r| r.scopes.push("user/*.rs".into())),
                "`scopes[1]`",
            ),
            (
                Box::new(|r| r.limits.memory_mib = 100_000),
                "`limits.memory_mib`",
            ),
            (Box::new(|r| r.limits.timeout_ms = 0), "`limits.timeout_ms`"),
            (Box::new(|r| r.expires = r.created.clone()), "`expires`"),
            (Box::new(|r| r.created = "yesterday".into()), "`created`"),
        ];
        for (mutate, want) in cases {
            let mut r = raw();
            mutate(&mut r);
            let err = Manifest::from_raw(r, &l).unwrap_err().to_string();
            assert!(err.contains(want), "want {want}: {err}");
        }
    }
}
