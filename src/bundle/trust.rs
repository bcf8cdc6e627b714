//! The trust store: which vendor keys may sign which plugin namespaces, with
//! what threshold (docs/bundle-format.md §4, step 6).
//!
//! In the spirit of TUF delegations: a key is delegated one or more
//! namespaces (`acme/` covers every `acme/*` plugin; `acme/news2` covers one
//! plugin). For a plugin name, the *governing* namespace is the longest
//! delegated namespace that covers it; its threshold says how many
//! *distinct*, non-revoked keys delegated that namespace must have signed.
//!
//! Invariants: a key signs nothing outside its namespaces; two signatures by
//! one key count once; revocation is permanent and takes effect for the very
//! next verification (the policy is loaded from `state.db` per decision).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use anyhow::{Context, Result, bail};
use ed25519_dalek::VerifyingKey;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::bundle::manifest::{PluginName, format_time};
use crate::keys::KeyId;

/// A delegated namespace: `vendor/` (a whole vendor) or `vendor/name` (one
/// plugin). `acme/*` is accepted on input as a synonym of `acme/`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Namespace(String);

impl Namespace {
    /// Parses a namespace as written by an admin.
    pub fn parse(s: &str) -> Result<Namespace, String> {
        let s = s.strip_suffix('*').unwrap_or(s);
        if let Some(vendor) = s.strip_suffix('/') {
            // Validate the vendor part by validating a placeholder name in it.
            PluginName::parse(&format!("{vendor}/x"))
                .map_err(|e| format!("namespace {s:?}: vendor {e}"))?;
            Ok(Namespace(s.to_owned()))
        } else {
            PluginName::parse(s).map_err(|e| {
                format!("namespace {s:?} must be vendor/ or vendor/name: the name {e}")
            })?;
            Ok(Namespace(s.to_owned()))
        }
    }

    /// A namespace covering every plugin; only for `bundle verify --pub`,
    /// where the admin names the exact keys to check against.
    pub(crate) fn everything() -> Namespace {
        Namespace(String::new())
    }

    /// True if this namespace covers `name`.
    pub fn covers(&self, name: &PluginName) -> bool {
        if self.0.is_empty() || self.0.ends_with('/') {
            name.as_str().starts_with(&self.0)
        } else {
            name.as_str() == self.0
        }
    }

    /// The namespace text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("*")
        } else {
            f.write_str(&self.0)
        }
    }
}

/// A key known to the trust store.
#[derive(Debug, Clone)]
pub struct TrustedKey {
    /// Its id.
    pub id: KeyId,
    /// The key.
    pub key: VerifyingKey,
    /// Namespaces it is delegated.
    pub namespaces: BTreeSet<Namespace>,
    /// Set once revoked; a revoked key never counts again.
    pub revoked_at: Option<String>,
    /// Admin's label.
    pub comment: String,
    /// When it was added.
    pub added_at: String,
}

/// The whole trust policy, loaded for one decision.
#[derive(Debug, Clone, Default)]
pub struct TrustPolicy {
    /// Every known key, revoked ones included (to explain refusals).
    pub keys: Vec<TrustedKey>,
    /// Threshold per delegated namespace.
    pub thresholds: BTreeMap<Namespace, u32>,
}

impl TrustPolicy {
    /// A policy that trusts exactly `keys`, for every namespace, threshold 1.
    pub fn only(keys: &[VerifyingKey]) -> TrustPolicy {
        let ns = Namespace::everything();
        TrustPolicy {
            keys: keys
                .iter()
                .map(|k| TrustedKey {
                    id: KeyId::of(k),
                    key: *k,
                    namespaces: BTreeSet::from([ns.clone()]),
                    revoked_at: None,
                    comment: "given on the command line".into(),
                    added_at: String::new(),
                })
                .collect(),
            thresholds: BTreeMap::from([(ns, 1)]),
        }
    }

    /// The longest delegated namespace covering `name`, with its threshold.
    pub fn governing(&self, name: &PluginName) -> Option<(&Namespace, u32)> {
        self.thresholds
            .iter()
            .filter(|(ns, _)| ns.covers(name))
            .max_by_key(|(ns, _)| ns.0.len())
            .map(|(ns, t)| (ns, *t))
    }

    /// Loads the policy from `state.db`.
    pub fn load(conn: &Connection) -> Result<TrustPolicy> {
        let mut thresholds = BTreeMap::new();
        let mut stmt = conn.prepare("SELECT namespace, threshold FROM namespaces")?;
        for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, u32>(1)?)))? {
            let (ns, t) = row?;
            thresholds.insert(Namespace(ns), t);
        }
        let mut keys = Vec::new();
        let mut stmt = conn.prepare(
            "SELECT key_id, public_key, comment, added_at, revoked_at FROM trusted_keys ORDER BY added_at, key_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
            ))
        })?;
        let mut ns_stmt = conn.prepare("SELECT namespace FROM delegations WHERE key_id = ?1")?;
        for row in rows {
            let (id, raw, comment, added_at, revoked_at) = row?;
            let bytes: [u8; 32] = raw
                .try_into()
                .map_err(|_| anyhow::anyhow!("state.db: trusted key {id} is not 32 bytes"))?;
            let key = VerifyingKey::from_bytes(&bytes)
                .with_context(|| format!("state.db: trusted key {id} is not a valid key"))?;
            let namespaces = ns_stmt
                .query_map([&id], |r| r.get::<_, String>(0))?
                .map(|r| r.map(Namespace))
                .collect::<Result<_, _>>()?;
            keys.push(TrustedKey {
                id: KeyId::of(&key),
                key,
                namespaces,
                revoked_at,
                comment,
                added_at,
            });
        }
        Ok(TrustPolicy { keys, thresholds })
    }
}

/// What `trust add` did.
#[derive(Debug, Serialize)]
pub struct AddReport {
    /// The key.
    pub key_id: String,
    /// Namespaces now delegated to it.
    pub namespaces: Vec<String>,
    /// Thresholds of those namespaces.
    pub thresholds: BTreeMap<String, u32>,
}

/// Trusts `key` for `namespaces`. `threshold`, when given, sets each of those
/// namespaces' threshold; otherwise a new namespace gets 1 and an existing
/// one keeps its own. A revoked key cannot be trusted again.
pub fn add(
    conn: &mut Connection,
    key: &VerifyingKey,
    namespaces: &[Namespace],
    threshold: Option<u32>,
    comment: &str,
    now: time::OffsetDateTime,
) -> Result<AddReport> {
    if namespaces.is_empty() {
        bail!("at least one --namespace is required: a key may only sign inside its namespaces");
    }
    let id = KeyId::of(key);
    let tx = conn.transaction()?;
    let revoked: Option<Option<String>> = tx
        .query_row(
            "SELECT revoked_at FROM trusted_keys WHERE key_id = ?1",
            [id.as_str()],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(Some(at)) = revoked {
        bail!(
            "key {id} was revoked at {at}; revocation is permanent, generate and trust a new key"
        );
    }
    tx.execute(
        "INSERT INTO trusted_keys(key_id, public_key, comment, added_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(key_id) DO NOTHING",
        params![
            id.as_str(),
            key.as_bytes().as_slice(),
            comment,
            format_time(now)
        ],
    )?;
    let mut thresholds = BTreeMap::new();
    for ns in namespaces {
        match threshold {
            Some(t) => tx.execute(
                "INSERT INTO namespaces(namespace, threshold) VALUES (?1, ?2)
                 ON CONFLICT(namespace) DO UPDATE SET threshold = excluded.threshold",
                params![ns.as_str(), t],
            )?,
            None => tx.execute(
                "INSERT INTO namespaces(namespace, threshold) VALUES (?1, 1)
                 ON CONFLICT(namespace) DO NOTHING",
                params![ns.as_str()],
            )?,
        };
        tx.execute(
            "INSERT OR IGNORE INTO delegations(namespace, key_id) VALUES (?1, ?2)",
            params![ns.as_str(), id.as_str()],
        )?;
        let t: u32 = tx.query_row(
            "SELECT threshold FROM namespaces WHERE namespace = ?1",
            [ns.as_str()],
            |r| r.get(0),
        )?;
        thresholds.insert(ns.to_string(), t);
    }
    let all: Vec<String> = {
        let mut stmt =
            tx.prepare("SELECT namespace FROM delegations WHERE key_id = ?1 ORDER BY namespace")?;
        stmt.query_map([id.as_str()], |r| r.get(0))?
            .collect::<Result<_, _>>()?
    };
    tx.commit()?;
    Ok(AddReport {
        key_id: id.to_string(),
        namespaces: all,
        thresholds,
    })
}

/// Revokes the key whose id starts with `id_prefix` (at least 8 hex digits,
/// and unambiguous). Returns the full id. Revoking twice is an error.
pub fn revoke(conn: &mut Connection, id_prefix: &str, now: time::OffsetDateTime) -> Result<KeyId> {
    if id_prefix.len() < 8 || !id_prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("key id {id_prefix:?}: give at least 8 hex digits of the key id (see `trust list`)");
    }
    let prefix = id_prefix.to_ascii_lowercase();
    let tx = conn.transaction()?;
    let matches: Vec<(String, Option<String>)> = {
        let mut stmt = tx.prepare(
            "SELECT key_id, revoked_at FROM trusted_keys WHERE substr(key_id, 1, ?2) = ?1",
        )?;
        stmt.query_map(params![prefix, prefix.len()], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<_, _>>()?
    };
    let (id, revoked_at) = match matches.as_slice() {
        [] => return Err(crate::cli::NotFound(format!("no trusted key has id {prefix}…")).into()),
        [one] => one.clone(),
        _ => bail!(
            "key id prefix {prefix} is ambiguous: it matches {} keys",
            matches.len()
        ),
    };
    if let Some(at) = revoked_at {
        bail!("key {id} is already revoked (at {at})");
    }
    tx.execute(
        "UPDATE trusted_keys SET revoked_at = ?2 WHERE key_id = ?1",
        params![id, format_time(now)],
    )?;
    tx.commit()?;
    KeyId::parse(&id).context("state.db holds a malformed key id")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> PluginName {
        PluginName::parse(s).unwrap()
    }

    #[test]
    fn namespaces_cover_and_the_longest_governs() {
        let vendor = Namespace::parse("acme/*").unwrap();
        assert_eq!(vendor.as_str(), "acme/");
        let one = Namespace::parse("acme/news2").unwrap();
        assert!(vendor.covers(&name("acme/news2")));
        assert!(!vendor.covers(&name("acmecorp/news2")));
        assert!(one.covers(&name("acme/news2")));
        assert!(!one.covers(&name("acme/news22")));
        let policy = TrustPolicy {
            keys: vec![],
            thresholds: BTreeMap::from([(vendor.clone(), 1), (one.clone(), 2)]),
        };
        assert_eq!(policy.governing(&name("acme/news2")), Some((&one, 2)));
        assert_eq!(policy.governing(&name("acme/other")), Some((&vendor, 1)));
        assert_eq!(policy.governing(&name("evil/news2")), None);
    }

    #[test]
    fn bad_namespaces_are_refused() {
        for bad in ["", "/", "../", "Acme/", "acme", "acme/x/y", "*"] {
            assert!(Namespace::parse(bad).is_err(), "{bad}");
        }
    }
}
