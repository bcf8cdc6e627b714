//! The installed-plugin store: content-addressed bundle files plus the
//! `plugins` / `plugin_versions` / `version_floors` tables in `state.db`
//! (docs/bundle-format.md §6, step 9 and the install protocol).
//!
//! Install protocol, under one `BEGIN IMMEDIATE` transaction of `state.db`:
//!
//! 1. step 9, the version floor: refuse a version below the highest ever
//!    accepted for this name, or the floor version with different content;
//!    the current version again is a no-op;
//! 2. write `plugins/<manifest-sha256>.cbx` atomically (temp file, fsync,
//!    rename, directory fsync) unless that exact file is already there;
//! 3. point `plugins.current` at it, keep the old current as `previous`,
//!    raise the floor, and commit;
//! 4. delete bundle files no row references any more (and stray temp files).
//!
//! Invariant: a crash at any point leaves either the old or the new version
//! installed, complete: the pointer switches only in the commit, and the
//! file it points to was made durable before it.

use std::fs;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use semver::Version;
use serde::Serialize;

use super::verify::VerifiedBundle;
use crate::datadir::DataDir;
use crate::fsutil::{self, failpoint};

/// Step 9: a version-floor refusal.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    /// Lower than the highest version ever accepted.
    #[error(
        "step 9 (version floor): {plugin} {version} is older than {floor}, the newest version accepted; downgrades are refused (use `plugin rollback` for the kept previous version)"
    )]
    Downgrade {
        /// Plugin.
        plugin: String,
        /// Offered version.
        version: String,
        /// The floor.
        floor: String,
    },
    /// Same version as the floor but different signed content.
    #[error(
        "step 9 (version floor): {plugin} {version} was already accepted with different content (manifest {floor_digest}); a changed plugin needs a new version"
    )]
    VersionReused {
        /// Plugin.
        plugin: String,
        /// Version.
        version: String,
        /// The digest accepted before.
        floor_digest: String,
    },
}

/// Result of an install.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum InstallOutcome {
    /// Now the current version.
    Installed,
    /// This exact version was already current; nothing changed.
    AlreadyInstalled,
}

/// One installed plugin, as `plugin list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InstalledPlugin {
    /// `vendor/name`.
    pub name: String,
    /// Current version.
    pub version: String,
    /// Manifest digest of the current version.
    pub digest: String,
    /// The kept previous version, if any.
    pub previous_version: Option<String>,
    /// Its manifest digest.
    pub previous_digest: Option<String>,
    /// Key ids that signed the current version.
    pub signers: Vec<String>,
    /// When the current pointer last changed.
    pub updated_at: String,
    /// The current version's stored bundle file.
    pub file: String,
}

fn blob_path(dir: &DataDir, digest: &str) -> PathBuf {
    dir.plugins_dir().join(format!("{digest}.cbx"))
}

/// Installs a verified bundle (steps 9 and the protocol above).
pub fn install(
    dir: &DataDir,
    conn: &mut Connection,
    bundle: &VerifiedBundle,
    now: &str,
) -> Result<InstallOutcome> {
    let m = bundle.manifest();
    let name = m.name.as_str();
    let digest = bundle.manifest_digest();
    failpoint("install.begin");
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;

    // 9. Version floor.
    let floor: Option<(String, String)> = tx
        .query_row(
            "SELECT version, digest FROM version_floors WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((floor_v, floor_digest)) = &floor {
        let floor_version = Version::parse(floor_v)
            .with_context(|| format!("state.db: floor of {name} is not semver"))?;
        if m.version < floor_version {
            return Err(FloorError::Downgrade {
                plugin: name.into(),
                version: m.version.to_string(),
                floor: floor_v.clone(),
            }
            .into());
        }
        if m.version == floor_version && floor_digest != digest {
            return Err(FloorError::VersionReused {
                plugin: name.into(),
                version: m.version.to_string(),
                floor_digest: floor_digest.clone(),
            }
            .into());
        }
    }
    let current: Option<String> = tx
        .query_row("SELECT current FROM plugins WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?;
    if current.as_deref() == Some(digest) {
        return Ok(InstallOutcome::AlreadyInstalled);
    }

    // The bundle file, made durable before anything points at it.
    let path = blob_path(dir, digest);
    let already = fs::read(&path).ok().is_some_and(|b| b == bundle.bytes());
    if !already {
        fsutil::write_atomic(&path, bundle.bytes(), 0o600, "install.blob")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }

    let signers: Vec<&str> = bundle.signers().iter().map(|k| k.as_str()).collect();
    tx.execute(
        "INSERT INTO plugin_versions
           (digest, name, version, wasm_sha256, wasm_size, bundle_sha256, signers, manifest, installed_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT(digest) DO UPDATE SET bundle_sha256 = excluded.bundle_sha256,
           signers = excluded.signers, installed_at = excluded.installed_at",
        params![
            digest,
            name,
            m.version.to_string(),
            m.wasm_sha256,
            m.wasm_size as i64,
            bundle.bundle_sha256(),
            serde_json::to_string(&signers)?,
            String::from_utf8_lossy(bundle.manifest_json()),
            now
        ],
    )?;
    tx.execute(
        "INSERT INTO plugins(name, current, previous, updated_at) VALUES (?1, ?2, NULL, ?3)
         ON CONFLICT(name) DO UPDATE SET previous = plugins.current,
           current = excluded.current, updated_at = excluded.updated_at",
        params![name, digest, now],
    )?;
    let raise_floor = floor
        .as_ref()
        .and_then(|(v, _)| Version::parse(v).ok())
        .is_none_or(|f| m.version > f);
    if raise_floor {
        tx.execute(
            "INSERT INTO version_floors(name, version, digest) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET version = excluded.version, digest = excluded.digest",
            params![name, m.version.to_string(), digest],
        )?;
    }
    failpoint("install.before-commit");
    tx.commit()?;
    failpoint("install.committed");
    collect_garbage(dir, conn)?;
    failpoint("install.done");
    Ok(InstallOutcome::Installed)
}

/// Swaps `current` and `previous` of `name` (an explicit admin action; the
/// version floor is not lowered). Returns (from, to) versions. The caller
/// must have re-verified the previous bundle first.
pub fn rollback(conn: &mut Connection, name: &str, now: &str) -> Result<(String, String)> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let row: Option<(String, Option<String>)> = tx
        .query_row(
            "SELECT current, previous FROM plugins WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((current, previous)) = row else {
        return Err(crate::cli::NotFound(format!("plugin {name} is not installed")).into());
    };
    let Some(previous) = previous else {
        bail!("plugin {name} has no kept previous version to roll back to");
    };
    tx.execute(
        "UPDATE plugins SET current = ?2, previous = ?3, updated_at = ?4 WHERE name = ?1",
        params![name, previous, current, now],
    )?;
    let version = |d: &str| -> Result<String> {
        Ok(tx.query_row(
            "SELECT version FROM plugin_versions WHERE digest = ?1",
            [d],
            |r| r.get(0),
        )?)
    };
    let from = version(&current)?;
    let to = version(&previous)?;
    tx.commit()?;
    Ok((from, to))
}

/// The stored bundle file of `name`'s previous version, if any.
pub fn previous_bundle_path(
    dir: &DataDir,
    conn: &Connection,
    name: &str,
) -> Result<Option<PathBuf>> {
    let prev: Option<Option<String>> = conn
        .query_row(
            "SELECT previous FROM plugins WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()?;
    match prev {
        None => Err(crate::cli::NotFound(format!("plugin {name} is not installed")).into()),
        Some(p) => Ok(p.map(|d| blob_path(dir, &d))),
    }
}

/// Removes `name` (both versions). Its version floor stays. Returns the
/// version that was current.
pub fn remove(dir: &DataDir, conn: &mut Connection, name: &str) -> Result<String> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: Option<String> = tx
        .query_row(
            "SELECT v.version FROM plugins p JOIN plugin_versions v ON v.digest = p.current WHERE p.name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()?;
    let Some(version) = version else {
        return Err(crate::cli::NotFound(format!("plugin {name} is not installed")).into());
    };
    tx.execute("DELETE FROM plugins WHERE name = ?1", [name])?;
    tx.commit()?;
    collect_garbage(dir, conn)?;
    Ok(version)
}

/// Deletes version rows and bundle files that no plugin references, and
/// stray temp files from interrupted installs.
pub fn collect_garbage(dir: &DataDir, conn: &mut Connection) -> Result<()> {
    conn.execute(
        "DELETE FROM plugin_versions WHERE digest NOT IN
           (SELECT current FROM plugins UNION SELECT previous FROM plugins WHERE previous IS NOT NULL)",
        [],
    )?;
    let live: std::collections::HashSet<String> = {
        let mut stmt = conn.prepare("SELECT digest FROM plugin_versions")?;
        stmt.query_map([], |r| r.get::<_, String>(0))?
            .map(|r| r.map(|d| format!("{d}.cbx")))
            .collect::<Result<_, _>>()?
    };
    let plugins_dir = dir.plugins_dir();
    let entries = fs::read_dir(&plugins_dir)
        .with_context(|| format!("cannot list {}", plugins_dir.display()))?;
    let mut removed = false;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !live.contains(&name) {
            fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
            removed = true;
        }
    }
    if removed {
        fsutil::sync_dir(&plugins_dir)?;
    }
    Ok(())
}

/// Every installed plugin, by name.
pub fn list(dir: &DataDir, conn: &Connection) -> Result<Vec<InstalledPlugin>> {
    let mut stmt = conn.prepare(
        "SELECT p.name, c.version, p.current, pv.version, p.previous, c.signers, p.updated_at
         FROM plugins p JOIN plugin_versions c ON c.digest = p.current
         LEFT JOIN plugin_versions pv ON pv.digest = p.previous
         ORDER BY p.name",
    )?;
    let rows = stmt.query_map([], |r| {
        let signers: String = r.get(5)?;
        let digest: String = r.get(2)?;
        Ok(InstalledPlugin {
            name: r.get(0)?,
            version: r.get(1)?,
            file: blob_path(dir, &digest).display().to_string(),
            digest,
            previous_version: r.get(3)?,
            previous_digest: r.get(4)?,
            signers: serde_json::from_str(&signers).unwrap_or_default(),
            updated_at: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
