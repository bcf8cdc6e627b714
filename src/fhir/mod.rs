//! The local FHIR R4 cache: resources of each clinic (tenant) in SQLite
//! (`fhir.db`), bulk import, and patient-compartment search.
//!
//! - [`schema`]: tables and indexes; [`params`]: indexed types, search
//!   parameters and compartment rules; [`date`]: FHIR date ranges;
//! - [`store`]: upsert/delete/read; [`import`]: NDJSON, export manifests
//!   and Bundles; [`search`]: the query parser, SQL builder and searchset;
//! - [`synth`]: a deterministic synthetic data set for tests and benches.
//!
//! Invariant: every query the appliance runs for a plugin or app is bound to
//! one tenant and, for plugins, one patient, and is filtered by the granted
//! scopes inside the SQL, so counts and pages never include anything else.

pub mod date;
pub mod import;
pub mod params;
pub mod schema;
pub mod search;
pub mod store;
pub mod synth;
pub mod writer;

use anyhow::Result;
use rusqlite::{Connection, OptionalExtension, params};

use crate::datadir::DataDir;
use crate::db;

/// A resource was rejected; the message says why (the caller adds where).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ResourceError(pub String);

impl ResourceError {
    /// A fixed reason.
    pub fn new(s: &str) -> ResourceError {
        ResourceError(s.to_owned())
    }
}

/// A write failed: either the resource is invalid (report it, go on) or
/// the database failed (stop).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The resource is invalid.
    #[error(transparent)]
    Invalid(#[from] ResourceError),
    /// The database failed; the import must stop.
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
}

/// True for a valid FHIR id: `[A-Za-z0-9\-\.]{1,64}`.
pub fn is_valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// True for a valid tenant name: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn is_valid_tenant(s: &str) -> bool {
    let mut b = s.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.len() <= 63
        && b.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

/// Opens the FHIR cache of a data dir (creating `fhir.db` if missing).
/// `synchronous=NORMAL` in WAL mode: a crash never corrupts the cache, and
/// at worst loses the last commits of an import, which re-running restores.
pub fn open(dir: &DataDir) -> Result<Connection> {
    dir.open_state()?; // refuses an uninitialised data dir
    let conn = db::open(&dir.fhir_db(), schema::MIGRATIONS, true)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "cache_size", -65536)?; // 64 MiB page cache
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(conn)
}

/// The id of tenant `name`, creating it if `create`.
pub fn tenant_id(conn: &Connection, name: &str, create: bool) -> Result<Option<i64>> {
    anyhow::ensure!(
        is_valid_tenant(name),
        "tenant {name:?} is not a valid tenant name ([a-z0-9][a-z0-9-]*, at most 63)"
    );
    let lookup = || -> Result<Option<i64>> {
        Ok(conn
            .prepare_cached("SELECT tid FROM tenants WHERE name = ?1")?
            .query_row(params![name], |r| r.get(0))
            .optional()?)
    };
    match lookup()? {
        None if create => {
            conn.prepare_cached("INSERT OR IGNORE INTO tenants(name) VALUES (?1)")?
                .execute([name])?;
            lookup()
        }
        found => Ok(found),
    }
}
