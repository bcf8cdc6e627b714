//! Per-thread SQLite connections for the call path.
//!
//! Opening a database (and checking its migrations) costs far more than a
//! call; each thread keeps one connection to each of `state.db`, `audit.db`
//! and `fhir.db` of one data dir, opened on first use (an API worker opens
//! them when it starts, [`warm`]). Invariant: a
//! connection is only used by the thread that opened it.
//!
//! ## The state memo
//!
//! Every API request reads the same few `state.db` rows (its token, the
//! installed plugins and current versions, grants and quarantine), each in
//! its own read transaction. Inside a request scope ([`begin_request`])
//! these reads go through [`memo`]: each thread keeps what it read, and
//! drops all of it whenever `state.db` may have changed since. Invariants:
//! - a request scope starts by asking SQLite whether any other connection
//!   (another thread, the CLI in another process) committed to `state.db`
//!   (`PRAGMA data_version`); if so the memo is emptied before the request
//!   reads anything, so a revoked token or grant, an install or a
//!   quarantine is seen by the very next request, as without the memo;
//! - each plugin call checks again ([`recheck`]), so the second call
//!   triggered by one ingest sees a quarantine or revoke that landed while
//!   the first ran;
//! - a read whose result proved stale is dropped ([`forget`]);
//! - failed reads are never kept;
//! - this thread's own writes (`total_changes`) empty it too;
//! - outside a request scope (the CLI, sync loops, tests) [`memo`] always
//!   reads the database;
//! - it holds at most `Limits::state_memo_entries` entries (keys can come
//!   from request paths); past that it starts over.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use rusqlite::Connection;

use crate::datadir::DataDir;

struct Conns {
    root: PathBuf,
    state: Connection,
    audit: Connection,
    fhir: Connection,
    memo: Memo,
}

/// What this thread read from `state.db` during request scopes.
#[derive(Default)]
struct Memo {
    /// Inside a request scope; only then are entries used.
    active: bool,
    /// Most entries (from `Limits::state_memo_entries`).
    cap: usize,
    /// `state.db`'s data version and this connection's change count when
    /// the entries were read.
    seen: (i64, u64),
    entries: HashMap<(&'static str, String), Box<dyn Any>>,
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
    with_conns(dir, |c| {
        f(match db {
            Db::State => &c.state,
            Db::Audit => &c.audit,
            Db::Fhir => &c.fhir,
        })
    })
}

fn with_conns<T>(dir: &DataDir, f: impl FnOnce(&mut Conns) -> Result<T>) -> Result<T> {
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
                memo: Memo::default(),
            });
        }
        let c = slot
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("connection cache is empty"))?;
        f(c)
    })
}

/// A request scope on this thread (see the module docs); ends when dropped.
#[must_use = "the scope ends when this is dropped"]
pub struct RequestScope(());

impl Drop for RequestScope {
    fn drop(&mut self) {
        CONNS.with(|cell| {
            if let Ok(mut slot) = cell.try_borrow_mut()
                && let Some(c) = slot.as_mut()
            {
                c.memo.active = false;
            }
        });
    }
}

/// Starts a request scope for `dir`: empties this thread's state memo if
/// `state.db` changed since it was filled. One read transaction.
pub fn begin_request(dir: &DataDir, cap: usize) -> Result<RequestScope> {
    with_conns(dir, |c| {
        check(c)?;
        c.memo.cap = cap;
        c.memo.active = true;
        Ok(RequestScope(()))
    })
}

/// Inside a request scope, checks `state.db` again (one read transaction)
/// and empties the memo if it changed: each plugin call of a request sees
/// a quarantine, revoke or install that landed while earlier ones ran.
pub fn recheck(dir: &DataDir) -> Result<()> {
    with_conns(dir, |c| if c.memo.active { check(c) } else { Ok(()) })
}

/// Drops the memo's entry for `kind` and `key`, which proved stale.
pub fn forget(dir: &DataDir, kind: &'static str, key: &str) {
    let _ = with_conns(dir, |c| {
        c.memo.entries.remove(&(kind, key.to_owned()));
        Ok(())
    });
}

fn check(c: &mut Conns) -> Result<()> {
    let version: i64 = c
        .state
        .prepare_cached("PRAGMA data_version")?
        .query_row([], |r| r.get(0))?;
    c.memo.refresh((version, c.state.total_changes()));
    Ok(())
}

/// `load(state.db)`, or what it returned earlier in a request scope while
/// `state.db` stayed unchanged. `kind` names the query, `key` its argument.
pub fn memo<T: Clone + 'static>(
    dir: &DataDir,
    kind: &'static str,
    key: &str,
    load: impl FnOnce(&Connection) -> Result<T>,
) -> Result<T> {
    with_conns(dir, |c| {
        if !c.memo.active {
            return load(&c.state);
        }
        // Our own writes do not change data_version.
        let seen = (c.memo.seen.0, c.state.total_changes());
        c.memo.refresh(seen);
        let k = (kind, key.to_owned());
        if let Some(v) = c.memo.entries.get(&k).and_then(|v| v.downcast_ref::<T>()) {
            return Ok(v.clone());
        }
        let v = load(&c.state)?;
        if c.memo.entries.len() >= c.memo.cap {
            c.memo.entries.clear();
        }
        if c.memo.cap > 0 {
            c.memo.entries.insert(k, Box::new(v.clone()));
        }
        Ok(v)
    })
}

impl Memo {
    fn refresh(&mut self, seen: (i64, u64)) {
        if self.seen != seen {
            self.entries.clear();
            self.seen = seen;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh data dir.
    struct Fixture {
        _tmp: tempfile::TempDir,
        dir: DataDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let tmp = tempfile::tempdir().unwrap();
            let dir = DataDir::new(tmp.path().join("data"));
            dir.init().unwrap();
            Fixture { _tmp: tmp, dir }
        }

        /// Plugin "p"'s failure count through the memo, and whether this
        /// read reached the database.
        fn read(&self) -> (i64, bool) {
            let mut loaded = false;
            let n = memo(&self.dir, "failures", "p", |s| {
                loaded = true;
                Ok(s.query_row(
                    "SELECT coalesce(max(consecutive_failures), 0) FROM plugin_health WHERE plugin = 'p'",
                    [],
                    |r| r.get::<_, i64>(0),
                )?)
            })
            .unwrap();
            (n, loaded)
        }
    }

    fn set_failures(conn: &Connection, n: i64) {
        conn.execute(
            "INSERT INTO plugin_health(plugin, consecutive_failures) VALUES ('p', ?1)
             ON CONFLICT(plugin) DO UPDATE SET consecutive_failures = ?1",
            [n],
        )
        .unwrap();
    }

    #[test]
    fn another_connections_commit_is_seen_by_the_next_request() {
        let f = Fixture::new();
        let other = f.dir.open_state().unwrap();
        {
            let _r = begin_request(&f.dir, 16).unwrap();
            assert_eq!(f.read(), (0, true));
            assert_eq!(f.read(), (0, false), "the second read is the memo's");
        }
        {
            let _r = begin_request(&f.dir, 16).unwrap();
            assert_eq!(f.read(), (0, false), "nothing changed in between");
        }
        // Another process (here: connection) commits between two requests.
        set_failures(&other, 3);
        let _r = begin_request(&f.dir, 16).unwrap();
        assert_eq!(f.read(), (3, true));
    }

    #[test]
    fn recheck_sees_a_commit_made_during_the_request_and_forget_drops_one_entry() {
        let f = Fixture::new();
        let other = f.dir.open_state().unwrap();
        let _r = begin_request(&f.dir, 16).unwrap();
        assert_eq!(f.read(), (0, true));
        set_failures(&other, 4);
        assert_eq!(f.read(), (0, false), "within one step the memo stands");
        recheck(&f.dir).unwrap();
        assert_eq!(f.read(), (4, true), "the next plugin call sees it");
        forget(&f.dir, "failures", "p");
        assert_eq!(f.read(), (4, true), "forgotten: read again");
        assert_eq!(f.read(), (4, false));
    }

    #[test]
    fn a_failed_read_is_not_remembered() {
        let f = Fixture::new();
        let _r = begin_request(&f.dir, 16).unwrap();
        let failed: Result<i64> = memo(&f.dir, "k", "x", |_| anyhow::bail!("disk I/O error"));
        assert!(failed.is_err());
        assert_eq!(memo(&f.dir, "k", "x", |_| Ok(7)).unwrap(), 7);
    }

    #[test]
    fn this_threads_own_write_empties_the_memo() {
        let f = Fixture::new();
        let _r = begin_request(&f.dir, 16).unwrap();
        assert_eq!(f.read(), (0, true));
        with(&f.dir, Db::State, |s| {
            set_failures(s, 2);
            Ok(())
        })
        .unwrap();
        assert_eq!(f.read(), (2, true), "data_version misses own writes");
    }

    #[test]
    fn outside_a_request_every_read_reaches_the_database() {
        let f = Fixture::new();
        drop(begin_request(&f.dir, 16).unwrap());
        assert_eq!(f.read(), (0, true));
        assert_eq!(f.read(), (0, true));
    }

    #[test]
    fn the_memo_starts_over_at_its_cap() {
        let f = Fixture::new();
        let _r = begin_request(&f.dir, 2).unwrap();
        let hits = |key: &str| {
            let mut loaded = false;
            memo(&f.dir, "k", key, |_| {
                loaded = true;
                Ok(())
            })
            .unwrap();
            loaded
        };
        assert!(hits("a"));
        assert!(hits("b"));
        assert!(!hits("a"));
        assert!(hits("c"), "a third key");
        assert!(hits("a"), "emptied to make room");
        let len = || CONNS.with(|c| c.borrow().as_ref().unwrap().memo.entries.len());
        assert_eq!(len(), 2);
        drop(_r);
        let _r = begin_request(&f.dir, 0).unwrap();
        assert!(hits("z") && hits("z"), "a cap of 0 keeps nothing");
        assert_eq!(len(), 0);
    }
}
