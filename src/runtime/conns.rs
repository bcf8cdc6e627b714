//! Per-thread SQLite connections for the call path.
//!
//! Opening a database (and checking its migrations) costs far more than a
//! call; each thread keeps one connection to each of `state.db`, `audit.db`
//! and `fhir.db` of one data dir, opened on first use (an API worker opens
//! them when it starts, [`warm`]). Invariant: a
//! connection is only used by the thread that opened it.

use std::cell::RefCell;
use std::path::PathBuf;

use anyhow::Result;
use rusqlite::Connection;

use crate::datadir::DataDir;

struct Conns {
    root: PathBuf,
    state: Connection,
    audit: Connection,
    fhir: Connection,
}

thread_local! {
    static CONNS: RefCell<Option<Conns>> = const { RefCell::new(None) };
}

/// Which database.
#[derive(Debug, Clone, Copy)]
pub enum Db {
    /// `state.db`
    State,
    /// `audit.db`
    Audit,
    /// `fhir.db`
    Fhir,
}

/// Opens this thread's connections to `dir` ahead of their first use, and
/// reads each schema (SQLite parses it on a connection's first statement).
pub fn warm(dir: &DataDir) -> Result<()> {
    for db in [Db::State, Db::Audit, Db::Fhir] {
        with(dir, db, |c| {
            c.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))?;
            Ok(())
        })?;
    }
    Ok(())
}

/// Runs `f` with this thread's connection to `db` of `dir`.
pub fn with<T>(dir: &DataDir, db: Db, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
    CONNS.with(|cell| {
        let mut slot = cell
            .try_borrow_mut()
            .map_err(|_| anyhow::anyhow!("re-entrant database use on one thread"))?;
        if slot.as_ref().is_none_or(|c| c.root != dir.root()) {
            *slot = Some(Conns {
                root: dir.root().to_path_buf(),
                state: dir.open_state()?,
                audit: dir.open_audit()?,
                // Reads (searches, host functions): device ingest writes
                // through fhir::writer, imports and sync on their own.
                fhir: crate::fhir::open(dir)?,
            });
        }
        let c = slot
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("connection cache is empty"))?;
        f(match db {
            Db::State => &c.state,
            Db::Audit => &c.audit,
            Db::Fhir => &c.fhir,
        })
    })
}
