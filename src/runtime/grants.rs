//! Per-tenant scope grants (`plugin grant`), and plugin health
//! (consecutive failures, quarantine), in `state.db`.
//!
//! Invariant: a grant is always a subset of what the plugin's installed
//! manifest requests — every granted scope lies within some requested
//! scope — checked when it is recorded.

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::conns;
use crate::bundle::manifest::Manifest;
use crate::datadir::DataDir;
use crate::scopes::Scope;

/// Records `scopes` for (tenant, plugin), refusing any scope the manifest
/// did not request. Returns the tenant's full grant list afterwards.
pub fn grant(
    conn: &mut Connection,
    tenant: &str,
    plugin: &str,
    manifest: &Manifest,
    scopes: &[Scope],
    now: &str,
) -> Result<Vec<String>> {
    anyhow::ensure!(
        crate::fhir::is_valid_tenant(tenant),
        "tenant {tenant:?} is not a valid tenant name"
    );
    for s in scopes {
        if !manifest.scopes.iter().any(|r| s.is_within(r)) {
            let requested: Vec<String> = manifest.scopes.iter().map(ToString::to_string).collect();
            bail!(
                "scope {s} is not within what {plugin} requests ({})",
                if requested.is_empty() {
                    "nothing".to_owned()
                } else {
                    requested.join(" ")
                }
            );
        }
    }
    let tx = conn.transaction()?;
    for s in scopes {
        tx.execute(
            "INSERT OR IGNORE INTO plugin_grants(tenant, plugin, scope, granted_at) VALUES (?1, ?2, ?3, ?4)",
            params![tenant, plugin, s.to_string(), now],
        )?;
    }
    tx.commit()?;
    Ok(granted(conn, tenant, plugin)?
        .iter()
        .map(ToString::to_string)
        .collect())
}

/// Removes every grant of `plugin` for `tenant`. Returns how many.
pub fn revoke_all(conn: &Connection, tenant: &str, plugin: &str) -> Result<usize> {
    Ok(conn.execute(
        "DELETE FROM plugin_grants WHERE tenant = ?1 AND plugin = ?2",
        params![tenant, plugin],
    )?)
}

/// [`granted`] through this thread's state memo (`runtime::conns`).
pub fn granted_memo(dir: &DataDir, tenant: &str, plugin: &str) -> Result<Vec<Scope>> {
    // Tenant names cannot hold '/', so the key is unambiguous.
    conns::memo(dir, "grants", &format!("{tenant}/{plugin}"), |state| {
        granted(state, tenant, plugin)
    })
}

/// The scopes granted to `plugin` for `tenant`.
pub fn granted(conn: &Connection, tenant: &str, plugin: &str) -> Result<Vec<Scope>> {
    let mut stmt = conn.prepare_cached(
        "SELECT scope FROM plugin_grants WHERE tenant = ?1 AND plugin = ?2 ORDER BY scope",
    )?;
    let rows = stmt.query_map(params![tenant, plugin], |r| r.get::<_, String>(0))?;
    let mut out = Vec::new();
    for r in rows {
        let s = r?;
        out.push(
            s.parse::<Scope>()
                .with_context(|| format!("state.db holds an invalid grant {s:?}"))?,
        );
    }
    Ok(out)
}

/// One grant row for `plugin grants`.
#[derive(Debug, Serialize)]
pub struct GrantRow {
    /// Tenant.
    pub tenant: String,
    /// Plugin.
    pub plugin: String,
    /// Scope.
    pub scope: String,
    /// When.
    pub granted_at: String,
}

/// All grants, optionally of one tenant.
pub fn list(conn: &Connection, tenant: Option<&str>) -> Result<Vec<GrantRow>> {
    let mut stmt = conn.prepare(
        "SELECT tenant, plugin, scope, granted_at FROM plugin_grants WHERE ?1 IS NULL OR tenant = ?1 ORDER BY tenant, plugin, scope",
    )?;
    let rows = stmt.query_map([tenant], |r| {
        Ok(GrantRow {
            tenant: r.get(0)?,
            plugin: r.get(1)?,
            scope: r.get(2)?,
            granted_at: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// `Some(reason)` if the plugin is quarantined.
pub fn quarantined(conn: &Connection, plugin: &str) -> Result<Option<String>> {
    Ok(conn
        .prepare_cached("SELECT quarantined_at, reason FROM plugin_health WHERE plugin = ?1 AND quarantined_at IS NOT NULL")?
        .query_row([plugin], |r| Ok(format!("since {}: {}", r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .optional()?)
}

/// Counts one failed call; quarantines at `threshold` consecutive failures.
/// Returns true if this failure quarantined the plugin.
pub fn note_failure(
    conn: &Connection,
    plugin: &str,
    reason: &str,
    threshold: u32,
    now: &str,
) -> Result<bool> {
    conn.execute(
        "INSERT INTO plugin_health(plugin, consecutive_failures) VALUES (?1, 1)
         ON CONFLICT(plugin) DO UPDATE SET consecutive_failures = consecutive_failures + 1",
        [plugin],
    )?;
    let n: u32 = conn.query_row(
        "SELECT consecutive_failures FROM plugin_health WHERE plugin = ?1",
        [plugin],
        |r| r.get(0),
    )?;
    if n >= threshold {
        let changed = conn.execute(
            "UPDATE plugin_health SET quarantined_at = ?2, reason = ?3 WHERE plugin = ?1 AND quarantined_at IS NULL",
            params![plugin, now, format!("{n} consecutive failures, the last: {reason}")],
        )?;
        return Ok(changed > 0);
    }
    Ok(false)
}

/// True if `plugin` has failed since its last success. Read before
/// [`reset_failures`]: the common case (no failures) then takes no write
/// lock, so concurrent successful calls never queue on state.db.
pub fn failing(conn: &Connection, plugin: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM plugin_health WHERE plugin = ?1 AND consecutive_failures > 0)")?
        .query_row([plugin], |r| r.get(0))?)
}

/// Counts `plugin`'s consecutive failures from zero again.
pub fn reset_failures(conn: &Connection, plugin: &str) -> Result<()> {
    conn.prepare_cached("UPDATE plugin_health SET consecutive_failures = 0 WHERE plugin = ?1 AND consecutive_failures > 0")?
        .execute([plugin])?;
    Ok(())
}

/// Lifts a quarantine (`plugin enable`). Returns false if there was none.
pub fn enable(conn: &Connection, plugin: &str) -> Result<bool> {
    Ok(conn.execute(
        "UPDATE plugin_health SET quarantined_at = NULL, reason = NULL, consecutive_failures = 0 WHERE plugin = ?1 AND quarantined_at IS NOT NULL",
        [plugin],
    )? > 0)
}
