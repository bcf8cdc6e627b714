//! Admin actions on plugins, each one verified and recorded as a decision:
//! install a bundle file, roll back, remove.
//!
//! This is the single path into the store, shared by the CLI and (later)
//! the daemon's inbox and update channel. Invariants: every attempt, accepted
//! or refused, is appended to `audit.db` before the outcome is returned; a
//! refusal never writes to `state.db` or the plugins directory.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::audit::{self, Decision};
use crate::bundle::manifest::format_time;
use crate::bundle::store::{self, InstallOutcome};
use crate::bundle::trust::TrustPolicy;
use crate::bundle::verify::{self, PartialFacts};
use crate::bundle::{self, VerifiedBundle};
use crate::clock;
use crate::datadir::DataDir;
use crate::limits::Limits;

/// What `plugin install` reports.
#[derive(Debug, Serialize)]
pub struct InstallReport {
    /// `installed` or `already-installed`.
    pub outcome: InstallOutcome,
    /// Plugin name.
    pub plugin: String,
    /// Its version.
    pub version: String,
    /// Manifest digest.
    pub digest: String,
    /// Key ids that counted.
    pub signers: Vec<String>,
    /// The decision's sequence number in audit.db.
    pub decision: i64,
}

fn decision(
    action: &str,
    source: &str,
    facts: &PartialFacts,
    outcome: &str,
    reason: String,
) -> Decision {
    Decision {
        seq: 0,
        time: String::new(),
        action: action.into(),
        source: source.into(),
        bundle_sha256: facts.bundle_sha256.clone(),
        plugin: facts.plugin.clone(),
        version: facts.version.clone(),
        signers: facts.signers.clone(),
        outcome: outcome.into(),
        reason,
    }
}

fn facts_of(b: &VerifiedBundle) -> PartialFacts {
    PartialFacts {
        bundle_sha256: Some(b.bundle_sha256().into()),
        plugin: Some(b.manifest().name.to_string()),
        version: Some(b.manifest().version.to_string()),
        signers: b.signers().iter().map(ToString::to_string).collect(),
    }
}

/// Verifies bundle bytes against the trust store at the trusted time.
fn verify_with_store(
    dir: &DataDir,
    bytes: Vec<u8>,
    limits: &Limits,
    facts: &mut PartialFacts,
) -> Result<VerifiedBundle> {
    let state = dir.open_state()?;
    let audit_db = dir.open_audit()?;
    let policy = TrustPolicy::load(&state)?;
    let now = clock::trusted_now(&audit_db)?;
    Ok(verify::verify(bytes, &policy, now, limits, facts)?)
}

/// Verifies and installs the bundle at `path`, recording the decision.
pub fn install_file(dir: &DataDir, path: &Path, limits: &Limits) -> Result<InstallReport> {
    let source = path.display().to_string();
    let audit_db = dir.open_audit()?;
    let mut facts = PartialFacts::default();
    let result = (|| -> Result<InstallReport> {
        let bytes = bundle::read_bundle_file(path, limits)?;
        let verified = verify_with_store(dir, bytes, limits, &mut facts)?;
        let mut state = dir.open_state()?;
        let now = format_time(clock::trusted_now(&audit_db)?);
        let outcome = store::install(dir, &mut state, &verified, &now)?;
        // Compile now, into the compiled-code cache, so the first call (in
        // this or any later process) does not pay for it.
        if outcome == InstallOutcome::Installed
            && let Err(e) = crate::runtime::precompile(dir, limits, verified.wasm())
        {
            log::warn!(
                "installed {} but could not precompile it: {e:#}",
                verified.manifest().name
            );
        }
        Ok(InstallReport {
            outcome,
            plugin: verified.manifest().name.to_string(),
            version: verified.manifest().version.to_string(),
            digest: verified.manifest_digest().into(),
            signers: verified.signers().iter().map(ToString::to_string).collect(),
            decision: 0,
        })
    })();
    match result {
        Ok(mut report) => {
            let (outcome, reason) = match report.outcome {
                InstallOutcome::Installed => ("accepted", "verified and installed".to_owned()),
                InstallOutcome::AlreadyInstalled => (
                    "no-op",
                    "this exact version is already installed".to_owned(),
                ),
            };
            report.decision = audit::record(
                dir,
                &audit_db,
                &decision("install", &source, &facts, outcome, reason),
            )?;
            Ok(report)
        }
        Err(e) => {
            audit::record(
                dir,
                &audit_db,
                &decision("install", &source, &facts, "rejected", format!("{e:#}")),
            )
            .context("the bundle was refused, and recording the refusal also failed")?;
            Err(e)
        }
    }
}

/// What `plugin rollback` reports.
#[derive(Debug, Serialize)]
pub struct RollbackReport {
    /// Plugin name.
    pub plugin: String,
    /// Version that was current.
    pub from: String,
    /// Version now current.
    pub to: String,
    /// Decision sequence number.
    pub decision: i64,
}

/// Swaps `name` back to its kept previous version, after re-verifying that
/// bundle against today's trust store and trusted clock (a key revoked since,
/// or an expired bundle, is not revived). The version floor does not apply.
pub fn rollback(dir: &DataDir, name: &str, limits: &Limits) -> Result<RollbackReport> {
    let audit_db = dir.open_audit()?;
    let mut facts = PartialFacts {
        plugin: Some(name.into()),
        ..PartialFacts::default()
    };
    let result = (|| -> Result<(String, String)> {
        let mut state = dir.open_state()?;
        let Some(prev) = store::previous_bundle_path(dir, &state, name)? else {
            anyhow::bail!("plugin {name} has no kept previous version to roll back to");
        };
        let bytes = bundle::read_bundle_file(&prev, limits)?;
        let verified = verify_with_store(dir, bytes, limits, &mut facts)
            .context("the kept previous version no longer verifies")?;
        facts = facts_of(&verified);
        let now = format_time(clock::trusted_now(&audit_db)?);
        store::rollback(&mut state, name, &now)
    })();
    match result {
        Ok((from, to)) => {
            let reason = format!("admin rollback from {from} to {to}");
            let seq = audit::record(
                dir,
                &audit_db,
                &decision("rollback", name, &facts, "accepted", reason),
            )?;
            Ok(RollbackReport {
                plugin: name.into(),
                from,
                to,
                decision: seq,
            })
        }
        Err(e) => {
            audit::record(
                dir,
                &audit_db,
                &decision("rollback", name, &facts, "rejected", format!("{e:#}")),
            )?;
            Err(e)
        }
    }
}

/// Removes `name`, recording the decision. Returns the removed version.
pub fn remove(dir: &DataDir, name: &str) -> Result<String> {
    let audit_db = dir.open_audit()?;
    let mut state = dir.open_state()?;
    let mut facts = PartialFacts {
        plugin: Some(name.into()),
        ..PartialFacts::default()
    };
    match store::remove(dir, &mut state, name) {
        Ok(version) => {
            facts.version = Some(version.clone());
            audit::record(
                dir,
                &audit_db,
                &decision(
                    "remove",
                    name,
                    &facts,
                    "accepted",
                    "admin removed the plugin; its version floor stays".into(),
                ),
            )?;
            Ok(version)
        }
        Err(e) => {
            audit::record(
                dir,
                &audit_db,
                &decision("remove", name, &facts, "rejected", format!("{e:#}")),
            )?;
            Err(e)
        }
    }
}
