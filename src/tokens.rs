//! Bearer tokens of the local API: who may call which endpoint, for which
//! tenant.
//!
//! A token is `cbx_<id>_<secret>`: `id` (8 hex) is a public handle for
//! `token list` and `token revoke`; `secret` is 32 random bytes, base64url.
//! Only the SHA-256 of the whole token is stored (`state.db`, table
//! `api_tokens`), so a copy of the database does not yield usable tokens.
//!
//! Invariants: a token has exactly one [`Role`] and one tenant; a revoked
//! token never authenticates again; lookups compare hashes, never secrets.

use std::fmt;
use std::str::FromStr;

use anyhow::{Context, Result, bail};
use base64::Engine;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::bundle::manifest::format_time;
use crate::scopes::Scope;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A bedside device: ingest Observations (and the plugins they trigger).
    Device,
    /// A clinic app: invoke plugins, read and search the FHIR cache.
    App,
    /// Clinic IT: `/status` and `/metrics`, plus everything an app may do.
    Admin,
}

impl Role {
    /// The role's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Device => "device",
            Role::App => "app",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "device" => Ok(Role::Device),
            "app" => Ok(Role::App),
            "admin" => Ok(Role::Admin),
            other => Err(format!("{other:?} is not a role (device, app, admin)")),
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, Serialize)]
pub struct Principal {
    /// Token id (`tok_…`).
    pub id: String,
    /// Token name, e.g. `ward3-monitor-12`.
    pub name: String,
    /// Role.
    pub role: Role,
    /// The one tenant the token acts for.
    pub tenant: String,
    /// SMART v2 scopes for FHIR reads and searches (apps).
    #[serde(skip)]
    pub scopes: Vec<Scope>,
}

/// One row of `token list` (never the secret or its hash).
#[derive(Debug, Serialize)]
pub struct Listed {
    /// Token id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Role.
    pub role: String,
    /// Tenant.
    pub tenant: String,
    /// Scopes.
    pub scopes: Vec<String>,
    /// Created.
    pub created_at: String,
    /// Revoked, if so.
    pub revoked_at: Option<String>,
}

/// A created token: the only time its secret is shown.
#[derive(Debug, Serialize)]
pub struct Created {
    /// Token id.
    pub id: String,
    /// The bearer token itself.
    pub token: String,
}

/// What `state.db` keeps of a token: its SHA-256.
pub fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Creates a token. `name` must be unique; `scopes` only for apps/admins.
pub fn create(
    state: &Connection,
    name: &str,
    role: Role,
    tenant: &str,
    scopes: &[Scope],
) -> Result<Created> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bail!("token name {name:?}: use 1 to 64 of A-Z a-z 0-9 - _ .");
    }
    if !crate::fhir::is_valid_tenant(tenant) {
        bail!("tenant {tenant:?} is not a valid tenant name");
    }
    if role == Role::Device && !scopes.is_empty() {
        bail!("device tokens take no scopes: devices only ingest");
    }
    let mut raw = [0u8; 36];
    getrandom::fill(&mut raw).map_err(|e| anyhow::anyhow!("no randomness for a token: {e}"))?;
    let id = format!("tok_{}", hex::encode(&raw[..4]));
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw[4..]);
    let token = format!("cbx_{}_{secret}", &id[4..]);
    let scopes_json =
        serde_json::to_string(&scopes.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    let now = format_time(crate::clock::system_now()?);
    state
        .execute(
            "INSERT INTO api_tokens (id, name, role, tenant, scopes, hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![id, name, role.as_str(), tenant, scopes_json, hash(&token).as_slice(), now],
        )
        .map_err(|e| match e {
            rusqlite::Error::SqliteFailure(f, _)
                if f.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                anyhow::anyhow!("a token named {name:?} already exists")
            }
            e => anyhow::Error::from(e).context("cannot store the token"),
        })?;
    Ok(Created { id, token })
}

/// Every token, newest first.
pub fn list(state: &Connection) -> Result<Vec<Listed>> {
    let mut stmt = state.prepare(
        "SELECT id, name, role, tenant, scopes, created_at, revoked_at FROM api_tokens ORDER BY created_at DESC, id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Listed {
            id: r.get(0)?,
            name: r.get(1)?,
            role: r.get(2)?,
            tenant: r.get(3)?,
            scopes: serde_json::from_str(&r.get::<_, String>(4)?).unwrap_or_default(),
            created_at: r.get(5)?,
            revoked_at: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Revokes the token with this id or name. Returns its id.
pub fn revoke(state: &Connection, id_or_name: &str) -> Result<String> {
    let now = format_time(crate::clock::system_now()?);
    let id: Option<String> = state
        .query_row(
            "SELECT id FROM api_tokens WHERE id = ?1 OR name = ?1",
            [id_or_name],
            |r| r.get(0),
        )
        .optional()?;
    let id = id.ok_or_else(|| crate::cli::NotFound(format!("no token {id_or_name:?}")))?;
    state.execute(
        "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, ?2) WHERE id = ?1",
        params![id, now],
    )?;
    Ok(id)
}

/// Why a bearer token did not authenticate (all answered with 401).
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer …` header.
    #[error("no bearer token")]
    Missing,
    /// Not a clinicbox token, or unknown.
    #[error("unknown token")]
    Unknown,
    /// Revoked.
    #[error("token {0} is revoked")]
    Revoked(String),
}

/// Looks a presented token up by its hash: the principal it stands for,
/// or why it is refused. The outer `Err` is a `state.db` failure, which
/// says nothing about the token (callers must not remember it as a
/// refusal).
pub fn authenticate(
    state: &Connection,
    presented: &str,
) -> rusqlite::Result<Result<Principal, AuthError>> {
    if !presented.starts_with("cbx_") || presented.len() > 128 {
        return Ok(Err(AuthError::Unknown));
    }
    let row: Option<(String, String, String, String, String, Option<String>)> = state
        .prepare_cached(
            "SELECT id, name, role, tenant, scopes, revoked_at FROM api_tokens WHERE hash = ?1",
        )?
        .query_row([hash(presented).as_slice()], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .optional()?;
    let Some((id, name, role, tenant, scopes, revoked)) = row else {
        return Ok(Err(AuthError::Unknown));
    };
    if revoked.is_some() {
        return Ok(Err(AuthError::Revoked(id)));
    }
    let Ok(role) = role.parse() else {
        return Ok(Err(AuthError::Unknown));
    };
    let scopes: Vec<String> = serde_json::from_str(&scopes).unwrap_or_default();
    Ok(Ok(Principal {
        id,
        name,
        role,
        tenant,
        scopes: scopes.iter().filter_map(|s| s.parse().ok()).collect(),
    }))
}

/// Parses `--scope` values for `token create`.
pub fn parse_scopes(scopes: &[String]) -> Result<Vec<Scope>> {
    scopes
        .iter()
        .map(|s| s.parse::<Scope>().with_context(|| format!("--scope {s:?}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let conn =
            crate::db::open(&dir.path().join("state.db"), crate::state::MIGRATIONS, true).unwrap();
        (dir, conn)
    }

    #[test]
    fn create_authenticate_revoke() {
        let (_d, db) = state();
        let t = create(&db, "monitor-1", Role::Device, "clinic-a", &[]).unwrap();
        let p = authenticate(&db, &t.token).unwrap().unwrap();
        assert_eq!(
            (p.role, p.tenant.as_str(), p.id.as_str()),
            (Role::Device, "clinic-a", t.id.as_str())
        );
        // Only the hash is stored.
        let stored: Vec<u8> = db
            .query_row("SELECT hash FROM api_tokens", [], |r| r.get(0))
            .unwrap();
        assert_ne!(stored, t.token.as_bytes());
        assert!(!list(&db).unwrap()[0].id.is_empty());
        assert!(matches!(
            authenticate(&db, "cbx_00_x"),
            Ok(Err(AuthError::Unknown))
        ));
        assert!(create(&db, "monitor-1", Role::App, "clinic-a", &[]).is_err());
        revoke(&db, "monitor-1").unwrap();
        assert!(matches!(
            authenticate(&db, &t.token),
            Ok(Err(AuthError::Revoked(_)))
        ));
    }

    #[test]
    fn a_database_failure_is_not_a_refusal() {
        let (_d, db) = state();
        let t = create(&db, "monitor-1", Role::Device, "clinic-a", &[]).unwrap();
        db.execute_batch("DROP TABLE api_tokens").unwrap();
        // The API answers this with 503 and does not remember it.
        assert!(authenticate(&db, &t.token).is_err());
    }

    #[test]
    fn refuses_bad_names_tenants_and_device_scopes() {
        let (_d, db) = state();
        assert!(create(&db, "a b", Role::App, "clinic-a", &[]).is_err());
        assert!(create(&db, "x", Role::App, "Clinic A", &[]).is_err());
        let s = parse_scopes(&["patient/Observation.rs".into()]).unwrap();
        assert!(create(&db, "x", Role::Device, "clinic-a", &s).is_err());
    }
}
