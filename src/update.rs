//! The vendor update channel: a static HTTPS directory holding a signed
//! `index.json` and the bundles it lists (docs/update-channel.md).
//!
//! The index is a DSSE envelope (payloadType [`INDEX_TYPE`]) whose payload
//! is [`Index`]: a version, an expiry, and per bundle its file, name,
//! version, sha256 and size. This plays TUF's timestamp/snapshot roles:
//! - **freeze:** an index past its `expires` (by the trusted clock) is
//!   refused, so a mirror cannot keep serving an old, vulnerable set;
//! - **rollback:** an index whose `version` is below the last one accepted
//!   from this URL, or equal with different content, is refused;
//! - **endless data / substitution:** each download is capped at the size
//!   the index signs and must hash to its signed sha256; else it is refused
//!   before anything is installed.
//!
//! Trust: the index must carry a valid signature by a trusted, unrevoked
//! key whose namespaces cover every bundle it lists. Each bundle is then
//! installed through the ordinary verifier (signature threshold, expiry,
//! version floor), so the index adds freshness, never authority.
//!
//! Every refusal and every install is recorded in the audit log.

use std::path::Path;

use anyhow::{Context, Result, bail};
use ed25519_dalek::SigningKey;
use rusqlite::OptionalExtension;
use semver::Version;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bundle::envelope::Envelope;
use crate::bundle::manifest::{PluginName, format_time, parse_time};
use crate::bundle::trust::TrustPolicy;
use crate::config::Upstream;
use crate::datadir::DataDir;
use crate::limits::Limits;
use crate::sync::client::{Client, SyncError};

/// The DSSE payloadType of an update index.
pub const INDEX_TYPE: &str = "application/vnd.clinicbox.index.v1+json";

/// The signed index.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Index {
    /// Monotonic version; a box never accepts a lower one from a URL.
    pub version: u64,
    /// RFC 3339; after it the index is stale and refused.
    pub expires: String,
    /// The bundles.
    pub bundles: Vec<IndexEntry>,
}

/// One bundle in the index.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IndexEntry {
    /// File name, relative to the index (no `/`).
    pub file: String,
    /// `vendor/name`.
    pub name: String,
    /// Semantic version.
    pub version: String,
    /// Lowercase hex sha256 of the file.
    pub sha256: String,
    /// File size in bytes.
    pub size: u64,
}

/// Builds and signs an index over bundle files (`clinicbox bundle index`).
pub fn build_index(
    files: &[&Path],
    version: u64,
    expires: time::OffsetDateTime,
    key: &SigningKey,
    limits: &Limits,
) -> Result<Vec<u8>> {
    let mut bundles = Vec::new();
    for path in files {
        let bytes = crate::bundle::read_bundle_file(path, limits)
            .with_context(|| format!("{}", path.display()))?;
        let insp = crate::bundle::inspect(&bytes, limits)
            .with_context(|| format!("{}", path.display()))?;
        let m = insp
            .manifest
            .with_context(|| format!("{}: the manifest does not parse", path.display()))?;
        let file = path
            .file_name()
            .and_then(|n| n.to_str())
            .with_context(|| format!("{}: no file name", path.display()))?
            .to_owned();
        bundles.push(IndexEntry {
            file,
            name: m.name,
            version: m.version,
            sha256: insp.bundle_sha256,
            size: insp.bundle_size,
        });
    }
    let index = Index {
        version,
        expires: format_time(expires),
        bundles,
    };
    let payload = serde_json::to_vec(&index)?;
    let mut env = Envelope::unsigned_as(INDEX_TYPE, &payload);
    env.sign(key)?;
    Ok(env.to_bytes())
}

/// Why an index or a download was refused.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// Fetching failed (network, TLS, status).
    #[error(transparent)]
    Fetch(#[from] SyncError),
    /// The index is malformed or its signature does not hold.
    #[error("index {url}: {reason}")]
    BadIndex {
        /// Index URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// Past its expiry.
    #[error("index {url}: stale: it expired at {expires} (now {now}); the channel may be frozen")]
    Stale {
        /// Index URL.
        url: String,
        /// Its expiry.
        expires: String,
        /// The trusted now.
        now: String,
    },
    /// Older than the last accepted.
    #[error(
        "index {url}: rollback: version {version} is older than version {seen} accepted before"
    )]
    Rollback {
        /// Index URL.
        url: String,
        /// Its version.
        version: u64,
        /// The last accepted.
        seen: u64,
    },
    /// A download did not match the index.
    #[error("{url}: {reason}")]
    Download {
        /// Bundle URL.
        url: String,
        /// Why.
        reason: String,
    },
}

/// A verified index and its envelope digest.
#[derive(Debug)]
pub struct VerifiedIndex {
    /// The index.
    pub index: Index,
    /// sha256 of the envelope bytes.
    pub digest: String,
}

/// Checks an index envelope: shape, signature by a trusted key covering
/// every listed name, expiry, and version against the last accepted.
pub fn verify_index(
    url: &str,
    bytes: &[u8],
    policy: &TrustPolicy,
    now: time::OffsetDateTime,
    last: Option<(u64, String)>,
    limits: &Limits,
) -> Result<VerifiedIndex, UpdateError> {
    let bad = |reason: String| UpdateError::BadIndex {
        url: url.to_owned(),
        reason,
    };
    let env = Envelope::parse_as(bytes, INDEX_TYPE, limits.max_index_bytes as usize, limits)
        .map_err(|e| bad(e.to_string()))?;
    let index: Index =
        serde_json::from_slice(&env.payload).map_err(|e| bad(format!("malformed index: {e}")))?;
    if index.bundles.len() > limits.max_index_entries {
        return Err(bad(format!(
            "lists {} bundles, more than {}",
            index.bundles.len(),
            limits.max_index_entries
        )));
    }
    let signers: Vec<_> = policy
        .keys
        .iter()
        .filter(|k| k.revoked_at.is_none())
        .filter(|k| (0..env.signatures.len()).any(|i| env.verifies(i, &k.key)))
        .collect();
    if signers.is_empty() {
        return Err(bad("no signature by a trusted, unrevoked key".into()));
    }
    for (i, b) in index.bundles.iter().enumerate() {
        let name =
            PluginName::parse(&b.name).map_err(|r| bad(format!("bundles[{i}].name: {r}")))?;
        if !signers
            .iter()
            .any(|k| k.namespaces.iter().any(|ns| ns.covers(&name)))
        {
            return Err(bad(format!(
                "bundles[{i}].name: {name} is outside every namespace the index's signers are trusted for"
            )));
        }
        Version::parse(&b.version)
            .map_err(|e| bad(format!("bundles[{i}].version: {:?}: {e}", b.version)))?;
        let safe = !b.file.is_empty()
            && b.file.len() <= 255
            && !b.file.starts_with('.')
            && b.file
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+'));
        if !safe {
            return Err(bad(format!(
                "bundles[{i}].file: {:?} is not a plain file name",
                b.file
            )));
        }
        if b.sha256.len() != 64
            || !b
                .sha256
                .bytes()
                .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(bad(format!(
                "bundles[{i}].sha256: must be 64 lowercase hex digits"
            )));
        }
        if b.size == 0 || b.size > limits.max_bundle_bytes {
            return Err(bad(format!(
                "bundles[{i}].size: {} is outside 1..={}",
                b.size, limits.max_bundle_bytes
            )));
        }
    }
    let expires = parse_time(&index.expires).map_err(|r| bad(format!("expires: {r}")))?;
    if expires <= now {
        return Err(UpdateError::Stale {
            url: url.to_owned(),
            expires: index.expires.clone(),
            now: format_time(now),
        });
    }
    let digest = hex::encode(Sha256::digest(bytes));
    if let Some((seen, seen_digest)) = last {
        if index.version < seen {
            return Err(UpdateError::Rollback {
                url: url.to_owned(),
                version: index.version,
                seen,
            });
        }
        if index.version == seen && digest != seen_digest {
            return Err(bad(format!(
                "version {seen} was accepted before with different content; a new index needs a new version"
            )));
        }
    }
    Ok(VerifiedIndex { index, digest })
}

/// Downloads one listed bundle: at most its signed size, and it must hash
/// to its signed digest.
pub fn download(client: &Client, url: &str, entry: &IndexEntry) -> Result<Vec<u8>, UpdateError> {
    let fail = |reason: String| UpdateError::Download {
        url: url.to_owned(),
        reason,
    };
    let bytes = match client.get_bytes(url, entry.size) {
        Ok(b) => b,
        Err(SyncError::TooLarge { .. }) => {
            return Err(fail(format!(
                "oversize: more than the {} bytes the index signs",
                entry.size
            )));
        }
        Err(e) => return Err(e.into()),
    };
    if bytes.len() as u64 != entry.size {
        return Err(fail(format!(
            "size {} does not match the {} bytes the index signs",
            bytes.len(),
            entry.size
        )));
    }
    let got = hex::encode(Sha256::digest(&bytes));
    if got != entry.sha256 {
        return Err(fail(format!(
            "digest mismatch: sha256 {got}, the index signs {}",
            entry.sha256
        )));
    }
    Ok(bytes)
}

/// What one poll did, per bundle.
#[derive(Debug, Serialize)]
pub struct PollReport {
    /// The index version accepted (None if refused).
    pub index_version: Option<u64>,
    /// Each listed bundle newer than the plugin's version floor.
    pub bundles: Vec<BundleOutcome>,
    /// How many were installed.
    pub installed: usize,
}

impl PollReport {
    /// The bundles that were refused (or could not be fetched).
    pub fn refused(&self) -> impl Iterator<Item = (&str, &str)> {
        self.bundles.iter().filter_map(|b| match &b.result {
            BundleResult::Refused { reason } => Some((b.file.as_str(), reason.as_str())),
            BundleResult::Installed { .. } => None,
        })
    }
}

/// One listed bundle's fate in a poll.
#[derive(Debug, Serialize)]
pub struct BundleOutcome {
    /// Its file name in the index.
    pub file: String,
    /// Installed, or refused and why.
    #[serde(flatten)]
    pub result: BundleResult,
}

/// Installed, or refused with the reason.
#[derive(Debug, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum BundleResult {
    /// Verified and installed (or already current).
    Installed {
        /// `vendor/name`.
        plugin: String,
        /// Its version.
        version: String,
        /// What the install did.
        install: crate::bundle::store::InstallOutcome,
    },
    /// Not installed: refused (digest, size, verification) or not fetched.
    Refused {
        /// Why, naming the step.
        reason: String,
    },
}

impl std::fmt::Display for BundleResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BundleResult::Installed {
                plugin,
                version,
                install,
            } => write!(f, "{plugin} {version} {install:?}"),
            BundleResult::Refused { reason } => write!(f, "refused: {reason}"),
        }
    }
}

/// One poll of the channel `up` for data dir `dir`.
pub fn poll_once(dir: &DataDir, up: &Upstream, limits: &Limits) -> Result<PollReport> {
    let client = Client::new(up, limits)?;
    let index_url = format!("{}/index.json", up.url);
    let record = |outcome: &str, detail: serde_json::Value| {
        let body = serde_json::json!({"action": "update", "url": index_url, "outcome": outcome, "detail": detail});
        if let Err(e) = crate::audit::note(dir, "update", &body) {
            log::error!("cannot record an update-channel event: {e:#}");
        }
    };
    let state = dir.open_state()?;
    let result = (|| -> Result<VerifiedIndex, UpdateError> {
        let bytes = match client.get_bytes(&index_url, limits.max_index_bytes) {
            Err(SyncError::TooLarge { cap, .. }) => {
                return Err(UpdateError::BadIndex {
                    url: index_url.clone(),
                    reason: format!("oversize: more than {cap} bytes"),
                });
            }
            r => r?,
        };
        let local = |e: anyhow::Error| UpdateError::BadIndex {
            url: index_url.clone(),
            reason: format!("{e:#}"),
        };
        let policy = TrustPolicy::load(&state).map_err(local)?;
        let now = dir
            .open_audit()
            .and_then(|a| crate::clock::trusted_now(&a))
            .map_err(local)?;
        let last: Option<(u64, String)> = state
            .query_row(
                "SELECT version, digest FROM update_channel WHERE url = ?1",
                [&index_url],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()
            .map_err(|e| UpdateError::BadIndex {
                url: index_url.clone(),
                reason: format!("cannot read the last accepted index from state.db: {e}"),
            })?;
        verify_index(&index_url, &bytes, &policy, now, last, limits)
    })();
    let verified = match result {
        Ok(v) => v,
        Err(UpdateError::Fetch(e)) => return Err(e.into()), // offline: not a refusal
        Err(e) => {
            record("refused", serde_json::json!(e.to_string()));
            return Err(e.into());
        }
    };
    let now = format_time(crate::clock::system_now()?);
    state.execute(
        "INSERT INTO update_channel (url, version, expires, digest, checked_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (url) DO UPDATE SET version = excluded.version, expires = excluded.expires, digest = excluded.digest, checked_at = excluded.checked_at",
        rusqlite::params![index_url, verified.index.version as i64, verified.index.expires, verified.digest, now],
    )?;
    let mut report = PollReport {
        index_version: Some(verified.index.version),
        bundles: vec![],
        installed: 0,
    };
    for entry in &verified.index.bundles {
        // Compared with the highest version ever accepted (the version
        // floor), not the current one: after `plugin rollback` or `plugin
        // remove`, the channel does not bring back what the admin took away;
        // only a newer release installs.
        let installed: Option<String> = state
            .query_row(
                "SELECT version FROM version_floors WHERE name = ?1",
                [&entry.name],
                |r| r.get(0),
            )
            .optional()?;
        let newer = match installed.as_deref().map(Version::parse) {
            Some(Ok(have)) => Version::parse(&entry.version).is_ok_and(|want| want > have),
            _ => true,
        };
        if !newer {
            continue;
        }
        let url = format!("{}/{}", up.url, entry.file);
        let outcome = (|| -> Result<crate::admin::InstallReport> {
            let bytes = download(&client, &url, entry)?;
            let staging = dir.root().join("updates");
            crate::fsutil::ensure_private_dir(&staging, 0o700)?;
            let path = staging.join(&entry.file);
            crate::fsutil::write_atomic(&path, &bytes, 0o600, "update")?;
            let r = crate::admin::install_file(dir, &path, limits);
            let _ = std::fs::remove_file(&path);
            r
        })();
        match outcome {
            Ok(r) => {
                report.installed += 1;
                report.bundles.push(BundleOutcome {
                    file: entry.file.clone(),
                    result: BundleResult::Installed {
                        plugin: r.plugin,
                        version: r.version,
                        install: r.outcome,
                    },
                });
            }
            Err(e) => {
                let reason = format!("{e:#}");
                // A refused download is recorded; one that could not be
                // fetched (offline, HTTP error) is retried next poll.
                if matches!(
                    e.downcast_ref::<UpdateError>(),
                    Some(UpdateError::Download { .. })
                ) {
                    record(
                        "refused",
                        serde_json::json!({"file": entry.file, "reason": reason}),
                    );
                }
                report.bundles.push(BundleOutcome {
                    file: entry.file.clone(),
                    result: BundleResult::Refused { reason },
                });
            }
        }
    }
    Ok(report)
}

/// The daemon's poll: one pass, with outcomes counted and the runtime
/// preloaded after an install. Returns how many bundles were installed.
pub fn poll(app: &crate::daemon::App, up: &Upstream) -> Result<usize> {
    let env = app.rt.env();
    let report = match poll_once(&env.dir, up, &env.limits) {
        Ok(r) => r,
        Err(e) => {
            app.metrics.bundle("updates", "poll-failed");
            return Err(e);
        }
    };
    for b in &report.bundles {
        match &b.result {
            BundleResult::Refused { .. } => {
                app.metrics.bundle("updates", "rejected");
                log::warn!("updates: {}: {}", b.file, b.result);
            }
            BundleResult::Installed { .. } => {
                app.metrics.bundle("updates", "accepted");
                log::info!("updates: {}: {}", b.file, b.result);
            }
        }
    }
    if report.installed > 0 {
        let _ = app.rt.preload();
    }
    let refused = report.refused().count();
    if refused > 0 {
        bail!("{refused} of {} new bundles refused", report.bundles.len());
    }
    Ok(report.installed)
}
