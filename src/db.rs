//! Opening clinicbox's SQLite databases, with versioned migrations.
//!
//! Each database has an ordered list of migrations; `PRAGMA user_version`
//! records how many have run. Migrations run inside one transaction each, so
//! a crash mid-migration leaves the previous version. Invariants: every
//! connection opens in WAL mode with `synchronous=FULL` (a committed
//! transaction survives power loss; `fhir.db`'s connections lower it, see
//! `fhir::open` and `fhir::writer`) and foreign keys on; a database newer
//! than this build (more migrations than it knows) is refused, never
//! downgraded.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use thiserror::Error;

/// How long a connection waits for another's lock before it reports busy.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// A database could not be opened or migrated.
#[derive(Debug, Error)]
pub enum DbError {
    /// SQLite failed.
    #[error("database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: String,
        /// The cause.
        source: rusqlite::Error,
    },
    /// The file was written by a newer clinicbox.
    #[error(
        "database {path} is at schema version {found}, newer than this build's {known}; \
         refusing to touch it (was clinicbox downgraded?)"
    )]
    TooNew {
        /// The database file.
        path: String,
        /// Its version.
        found: u32,
        /// The newest this build knows.
        known: u32,
    },
}

/// Opens (creating if `create`) the database at `path` and brings it to the
/// newest schema in `migrations`.
pub fn open(path: &Path, migrations: &[&str], create: bool) -> Result<Connection, DbError> {
    let err = |source| DbError::Sqlite {
        path: path.display().to_string(),
        source,
    };
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let mut conn = Connection::open_with_flags(path, flags).map_err(err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(err)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(err)?;
    let found: u32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(err)?;
    let known = migrations.len() as u32;
    if found > known {
        return Err(DbError::TooNew {
            path: path.display().to_string(),
            found,
            known,
        });
    }
    for (i, sql) in migrations.iter().enumerate().skip(found as usize) {
        // Another process may be migrating too: take the write lock, then
        // look again.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(err)?;
        let now: u32 = tx
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(err)?;
        if now as usize > i {
            continue;
        }
        tx.execute_batch(sql).map_err(err)?;
        tx.pragma_update(None, "user_version", (i + 1) as u32)
            .map_err(err)?;
        tx.commit().map_err(err)?;
    }
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_run_once_and_newer_db_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.db");
        let m1 = ["CREATE TABLE a(x)"];
        let m2 = ["CREATE TABLE a(x)", "CREATE TABLE b(y)"];
        open(&p, &m1, true).unwrap();
        let c = open(&p, &m2, false).unwrap();
        let v: u32 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, 2);
        drop(c);
        open(&p, &m2, false).unwrap();
        assert!(matches!(
            open(&p, &m1, false),
            Err(DbError::TooNew {
                found: 2,
                known: 1,
                ..
            })
        ));
    }

    /// `.cargo/config.toml` builds SQLite without the two process-wide
    /// locks every thread would queue on (see the comment there).
    #[test]
    fn sqlite_is_built_without_process_wide_locks() {
        let c = Connection::open_in_memory().unwrap();
        let opts: Vec<String> = c
            .prepare("PRAGMA compile_options")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            !opts.iter().any(|o| o == "ENABLE_MEMORY_MANAGEMENT"),
            "{opts:?}"
        );
        assert!(opts.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"), "{opts:?}");
    }
}
