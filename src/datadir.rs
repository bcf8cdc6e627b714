//! The appliance's data directory: its layout, `init`, and opening its
//! databases.
//!
//! ```text
//! <data-dir>/            mode 0700
//!   state.db             trust store, installed plugins, version floors
//!   audit.db             append-only decision log and the trusted clock
//!   fhir.db              the FHIR R4 cache (resources and search indexes)
//!   identity.key         the appliance's ed25519 key, mode 0600
//!   identity.pub
//!   plugins/             content-addressed bundles: <manifest-sha256>.cbx
//!   cache/               wasmtime's compiled-code cache (safe to delete)
//! ```
//!
//! Invariants: `init` is idempotent and never replaces an existing identity
//! key; every other command refuses a data dir that `init` has not made, so
//! a typo in `--data-dir` cannot silently create an empty appliance.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rusqlite::Connection;
use thiserror::Error;

use crate::{audit, db, fsutil, keys, state};

/// The data dir exists but was never initialised.
#[derive(Debug, Error)]
#[error("data dir {0} is not initialised (no state.db); run `clinicbox init` first")]
pub struct NotInitialised(pub String);

/// Paths inside one data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
    cache: Option<PathBuf>,
}

/// What `init` did.
#[derive(Debug, serde::Serialize)]
pub struct InitReport {
    /// The data dir.
    pub data_dir: String,
    /// False if it was already initialised.
    pub created_identity: bool,
    /// The appliance identity key id.
    pub identity_key_id: String,
}

impl DataDir {
    /// A data dir rooted at `root` (nothing is touched yet).
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir {
            root: root.into(),
            cache: None,
        }
    }

    /// The same data dir with the compiled-code cache somewhere else
    /// (systemd's `CacheDirectory`); `None` keeps `<root>/cache`.
    pub fn with_cache(mut self, cache: Option<PathBuf>) -> DataDir {
        self.cache = cache;
        self
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The state database.
    pub fn state_db(&self) -> PathBuf {
        self.root.join("state.db")
    }
    /// The audit database.
    pub fn audit_db(&self) -> PathBuf {
        self.root.join("audit.db")
    }
    /// The appliance's secret key.
    pub fn identity_key(&self) -> PathBuf {
        self.root.join("identity.key")
    }
    /// The appliance's public key.
    pub fn identity_pub(&self) -> PathBuf {
        self.root.join("identity.pub")
    }
    /// The FHIR cache database.
    pub fn fhir_db(&self) -> PathBuf {
        self.root.join("fhir.db")
    }
    /// Compiled-code cache (wasmtime), so a new process loads a plugin
    /// without compiling it again: `<root>/cache` unless
    /// [`DataDir::with_cache`] moved it. Never under `$HOME`.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache
            .clone()
            .unwrap_or_else(|| self.root.join("cache"))
    }
    /// The content-addressed bundle store.
    pub fn plugins_dir(&self) -> PathBuf {
        self.root.join("plugins")
    }

    /// Creates or completes the data dir. Safe to run any number of times.
    pub fn init(&self) -> Result<InitReport> {
        fsutil::ensure_private_dir(&self.root, 0o700)
            .with_context(|| format!("cannot create data dir {}", self.root.display()))?;
        fsutil::ensure_private_dir(&self.plugins_dir(), 0o700)
            .with_context(|| format!("cannot create {}", self.plugins_dir().display()))?;
        for (path, migrations) in [
            (self.state_db(), state::MIGRATIONS),
            (self.audit_db(), audit::MIGRATIONS),
            (self.fhir_db(), crate::fhir::schema::MIGRATIONS),
        ] {
            db::open(&path, migrations, true)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("cannot restrict {}", path.display()))?;
        }
        let key_path = self.identity_key();
        let created_identity = !key_path.exists();
        let key = if created_identity {
            let key = keys::generate()?;
            keys::write_pair(
                &key,
                &key_path,
                &self.identity_pub(),
                "clinicbox appliance identity",
                &["clinicbox appliance identity key: signs audit checkpoints. Keep private."],
            )?;
            fsutil::sync_dir(&self.root)?;
            key
        } else {
            keys::read_secret(&key_path, 4096)?
        };
        Ok(InitReport {
            data_dir: self.root.display().to_string(),
            created_identity,
            identity_key_id: keys::KeyId::of(&key.verifying_key()).to_string(),
        })
    }

    fn require_init(&self) -> Result<()> {
        if self.state_db().is_file() {
            Ok(())
        } else {
            Err(NotInitialised(self.root.display().to_string()).into())
        }
    }

    /// Opens the state database of an initialised data dir.
    pub fn open_state(&self) -> Result<Connection> {
        self.require_init()?;
        Ok(db::open(&self.state_db(), state::MIGRATIONS, false)?)
    }

    /// Opens the audit database of an initialised data dir.
    pub fn open_audit(&self) -> Result<Connection> {
        self.require_init()?;
        let conn = db::open(&self.audit_db(), audit::MIGRATIONS, false)?;
        // Records moved in by schema 3 join the chain before anything reads it.
        audit::log::seal_pending(&conn)?;
        Ok(conn)
    }
}
