//! The group-committing writer of the FHIR cache, for many small
//! concurrent writes that must each be durable before they are answered
//! (device ingest: a bedside monitor's 201 means "on disk").
//!
//! One writer thread owns a `fhir.db` connection. Callers hand it their
//! resources and block; it takes everything queued, stores it all in one
//! transaction, commits once and answers every caller, then fsyncs the WAL
//! once for the whole group and tells every caller again. So 200 devices
//! sending at once cost a handful of fsyncs, not 200, and no caller sleeps
//! in SQLite's busy handler waiting for another's commit.
//!
//! Committed, then durable: the connection commits with
//! `synchronous=NORMAL` (in WAL mode: the commit writes the WAL but does
//! not fsync it; checkpoints still fsync the WAL before copying it back,
//! and the database after). So a group is visible to readers as soon as it
//! has committed, and its callers go on (device ingest runs the triggered
//! plugins, which read it) while the writer fsyncs the WAL. A caller's
//! [`Durable::wait`] returns once that fsync has. A crash of the process
//! loses nothing committed (it is in the OS page cache); a power loss can
//! lose the groups whose fsync had not returned, and SQLite's WAL checksums
//! drop exactly those on the next open, never corrupting the file.
//!
//! Invariants:
//! - a caller's resources are stored all or none, and one caller's failure
//!   touches no other: a group with a failing upsert is rolled back whole,
//!   the failing caller gets its error, and the others are stored again
//!   together;
//! - a caller is answered `Ok` only after the commit that holds its
//!   resources returned, and [`Durable::wait`] is `Ok` only after an
//!   fsync of the WAL that began after that commit returned; if the
//!   group's commit fails, every caller of the group gets the error and
//!   nothing of the group is stored;
//! - if an fsync of the WAL fails, its callers get the error, and so does
//!   every later store until the daemon restarts: after a failed fsync
//!   Linux may have dropped the unwritten pages, so nothing committed since
//!   the last good fsync can be called durable again (SQLite itself
//!   refuses a commit whose fsync failed; here the commit came first). The
//!   OS may still hold those pages, marked written, until the box reboots
//!   (docs/operations.md);
//! - the WAL file is fsynced through one file descriptor the writer opens
//!   at start and keeps: SQLite removes the file only when the last
//!   connection to `fhir.db` closes, and this writer's stays open. Kept,
//!   not reopened per group: Linux reports a write-back error to every
//!   descriptor that was open when it happened, even after another
//!   descriptor (the checkpointer's, a sync pull's) saw it first, while a
//!   descriptor opened later would never hear of it;
//! - WAL checkpoints run off this thread (`crate::checkpointer`), but for
//!   the last few hundred pages before the WAL starts over (after the
//!   callers were answered) and a RESTART of at most 100 ms if the WAL
//!   outgrows four times its threshold;
//! - a full disk is told apart ([`WriteError::DiskFull`]): nothing of the
//!   group is stored, and the caller can say "retry later" rather than
//!   report a fault;
//! - the thread ends when the last [`Writer`] clone is dropped.

use std::sync::{Arc, mpsc};

use anyhow::{Context, Result};
use rusqlite::{Connection, TransactionBehavior};
use serde_json::Value;

use super::store::{self, Upserted};
use crate::checkpointer::Checkpointer;
use crate::datadir::DataDir;

/// Why a caller's resources were not stored (none of them were).
#[derive(Debug, Clone, thiserror::Error)]
pub enum WriteError {
    /// The disk holding `fhir.db` is full (SQLite's `SQLITE_FULL`): a
    /// resend after space is freed succeeds.
    #[error("cannot store in the FHIR cache: the disk is full: {0}")]
    DiskFull(String),
    /// Anything else: a resource the cache refused, an I/O error, a
    /// stopped writer.
    #[error("{0}")]
    Failed(String),
}

/// True if SQLite reported a full disk anywhere in `e`'s chain.
fn is_disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<rusqlite::Error>()
            .and_then(rusqlite::Error::sqlite_error_code)
            == Some(rusqlite::ErrorCode::DiskFull)
    })
}

/// Most callers taken into one transaction.
const MAX_GROUP: usize = 512;
/// WAL frames (4 KiB pages) after which a background checkpoint starts
/// (`crate::checkpointer`; SQLite's automatic one: 1,000). Devices touch
/// every patient's index pages over and over: a long WAL lets a page that
/// many groups rewrote be copied back once.
const CHECKPOINT_AT: i64 = 8_000;

struct Job {
    tenant: String,
    /// Shared with the caller, who reads them again afterwards.
    resources: Arc<[Value]>,
    now_ms: i64,
    reply: mpsc::SyncSender<Result<Vec<Upserted>, WriteError>>,
    durable: mpsc::SyncSender<Result<(), WriteError>>,
}

/// Resources that have committed (readers see them) and the wait for
/// them to be on disk.
#[derive(Debug)]
pub struct Stored {
    /// What each upsert did, in order.
    pub upserted: Vec<Upserted>,
    /// Waits for the fsync of the WAL that makes them durable.
    pub durable: Durable,
}

/// The wait for a committed group's fsync ([`Stored::durable`]).
#[derive(Debug)]
#[must_use = "a store is durable only once `Durable::wait` says so"]
pub struct Durable(mpsc::Receiver<Result<(), WriteError>>);

impl Durable {
    /// Returns once the resources are durable, or why they may not be.
    pub fn wait(self) -> Result<(), WriteError> {
        self.0.recv().map_err(|_| {
            WriteError::Failed("the FHIR writer stopped before its fsync returned".into())
        })?
    }
}

/// A handle on the writer thread of one data dir's `fhir.db`.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("fhir::Writer").finish_non_exhaustive()
    }
}

/// The writer's page cache, as SQLite's `cache_size` (negative: KiB):
/// 4 MiB, not the 64 MiB of the searching connections. After every commit
/// in which a B-tree split reordered its new pages (`balance_nonroot`
/// swaps them through the lock-byte page's number, far beyond the end of
/// the file), SQLite's page cache walks its whole hash table to drop pages
/// past the end, so that walk costs in proportion to the cache. At 64 MiB
/// it was a fifth of this thread's CPU; pages evicted from 4 MiB come back
/// from the OS page cache for less. Measured in BENCHMARKS.md.
const WRITER_CACHE_KIB: i64 = -4 * 1024;

impl Writer {
    /// Opens `fhir.db` of `dir` for writing and starts the writer thread.
    pub fn open(dir: &DataDir, limits: &crate::limits::Limits) -> Result<Writer> {
        let wait = std::time::Duration::from_micros(limits.group_commit_wait_us);
        let conn = super::open(dir)?;
        // Commits without fsync; the writer fsyncs the WAL itself (above).
        conn.pragma_update(None, "synchronous", "NORMAL")
            .context("fhir.db: cannot set synchronous=NORMAL")?;
        conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB)
            .context("fhir.db: cannot set cache_size")?;
        let ckpt = Checkpointer::start("fhir.db", &conn, super::open(dir)?, CHECKPOINT_AT)?;
        let mut path = dir.fhir_db().into_os_string();
        path.push("-wal");
        // `super::open` has read the database, which opened (created) the
        // WAL; it stays until this writer's connection closes.
        let wal = Wal::open(path.into())?;
        Writer::start(conn, ckpt, wait, wal)
    }

    /// Starts the writer thread on `conn`, fsyncing `wal`.
    fn start(
        conn: Connection,
        ckpt: Checkpointer,
        wait: std::time::Duration,
        wal: Wal,
    ) -> Result<Writer> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("fhir-writer".into())
            .spawn(move || {
                crate::priority::pipeline_thread("fhir-writer");
                run(conn, ckpt, wait, rx, wal)
            })
            .context("cannot start the FHIR writer thread")?;
        Ok(Writer { tx })
    }

    /// Stores `resources` in `tenant` (created if new) and returns, once
    /// they have committed, what each upsert did and the wait for them to
    /// be durable. `now_ms` is the `lastUpdated` of resources that carry
    /// none.
    pub fn store(
        &self,
        tenant: &str,
        resources: Arc<[Value]>,
        now_ms: i64,
    ) -> Result<Stored, WriteError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let (durable, synced) = mpsc::sync_channel(1);
        self.tx
            .send(Job {
                tenant: tenant.to_owned(),
                resources,
                now_ms,
                reply,
                durable,
            })
            .map_err(|_| WriteError::Failed("the FHIR writer has stopped".into()))?;
        let upserted = answer
            .recv()
            .map_err(|_| WriteError::Failed("the FHIR writer stopped before answering".into()))??;
        Ok(Stored {
            upserted,
            durable: Durable(synced),
        })
    }
}

/// The WAL file of `fhir.db`, held open for the writer's life (see the
/// invariants above for why it is never reopened).
struct Wal {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl Wal {
    fn open(path: std::path::PathBuf) -> Result<Wal> {
        let file = std::fs::File::open(&path)
            .with_context(|| format!("cannot open {} to fsync it", path.display()))?;
        Ok(Wal { file, path })
    }

    /// fsyncs (fdatasync) the whole file, whichever descriptor wrote it.
    fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// The writer thread: waits for one job, gathers what else arrives within
/// `wait` (`crate::group`), stores it all in one transaction, answers
/// every caller, fsyncs the WAL and tells every caller again.
fn run(
    mut conn: Connection,
    mut ckpt: Checkpointer,
    wait: std::time::Duration,
    rx: mpsc::Receiver<Job>,
    wal: Wal,
) {
    // Set by the first failed fsync; every store after it fails with it.
    let mut failed_fsync: Option<String> = None;
    while let Ok(first) = rx.recv() {
        let group = crate::group::gather(&rx, first, wait, MAX_GROUP);
        if let Some(why) = &failed_fsync {
            let err = WriteError::Failed(why.clone());
            for job in group {
                let _ = job.reply.send(Err(err.clone()));
            }
            continue;
        }
        match store_group(&mut conn, &group) {
            Ok(results) => {
                let mut waiting = Vec::with_capacity(group.len());
                for (job, r) in group.into_iter().zip(results) {
                    if job.reply.send(r).is_ok() {
                        waiting.push(job.durable);
                    }
                }
                let synced = wal.sync().map_err(|e| {
                    let why = format!(
                        "cannot store in the FHIR cache: the fsync of {} failed ({e}); \
                         what was stored since the last good fsync may not be on disk, \
                         and nothing more is stored until clinicbox restarts",
                        wal.path.display()
                    );
                    log::error!("fhir writer: {why}");
                    failed_fsync = Some(why.clone());
                    WriteError::Failed(why)
                });
                for d in waiting {
                    let _ = d.send(synced.clone());
                }
            }
            Err(e) => {
                let err = if is_disk_full(&e) {
                    WriteError::DiskFull(format!("{e:#}"))
                } else {
                    WriteError::Failed(format!("cannot store in the FHIR cache: {e:#}"))
                };
                for job in group {
                    let _ = job.reply.send(Err(err.clone()));
                }
            }
        }
        // After the answers: a caller never waits for a checkpoint.
        ckpt.after_commit(&conn);
    }
}

/// One transaction for the whole group, committed once. If a job fails,
/// the transaction is rolled back, that job is set aside with its error,
/// and the rest are stored again in one transaction; so a failure touches
/// no one else, and the group still costs one fsync. Failures are rare
/// (ingest checks each resource before it queues it), and the common case
/// pays for no savepoints. The outer error is the group's (nothing of it
/// stored: the commit failed, or SQLite itself rolled the transaction back
/// after an error, or the disk is full, which is no one caller's fault);
/// the inner ones are per job.
fn store_group(
    conn: &mut Connection,
    group: &[Job],
) -> Result<Vec<Result<Vec<Upserted>, WriteError>>> {
    let mut refused: Vec<Option<String>> = vec![None; group.len()];
    // Each round either commits or sets one more job aside.
    loop {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut stored = Vec::with_capacity(group.len());
        let mut failure = None;
        for (i, job) in group.iter().enumerate() {
            if refused[i].is_some() {
                stored.push(None);
                continue;
            }
            match store_job(&tx, job) {
                Ok(done) => stored.push(Some(done)),
                Err(e) => {
                    failure = Some((i, e));
                    break;
                }
            }
        }
        let Some((i, e)) = failure else {
            tx.commit()?;
            return Ok(stored
                .into_iter()
                .zip(refused)
                .map(|(done, why)| done.ok_or_else(|| WriteError::Failed(why.unwrap_or_default())))
                .collect());
        };
        if is_disk_full(&e) {
            return Err(e);
        }
        if tx.is_autocommit() {
            anyhow::bail!("the group's transaction was rolled back by SQLite: {e:#}");
        }
        tx.rollback()?;
        log::debug!("fhir writer: a caller's resources were refused: {e:#}");
        refused[i] = Some(format!("{e:#}"));
    }
}

/// Stores one job's resources in the open transaction `tx`.
fn store_job(tx: &Connection, job: &Job) -> Result<Vec<Upserted>> {
    let tid = super::tenant_id(tx, &job.tenant, true)?
        .ok_or_else(|| anyhow::anyhow!("tenant {} could not be created", job.tenant))?;
    job.resources
        .iter()
        .map(|res| Ok(store::upsert(tx, tid, res, job.now_ms)?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obs(id: &str, patient: &str) -> Value {
        json!({"resourceType": "Observation", "id": id, "status": "final",
               "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
               "subject": {"reference": format!("Patient/{patient}")},
               "effectiveDateTime": "2026-11-26T10:00:00Z",
               "valueQuantity": {"value": 70}})
    }

    /// A caller's job for tenant t1, stored directly with `store_group`.
    fn job(resources: Vec<Value>) -> Job {
        Job {
            tenant: "t1".into(),
            resources: resources.into(),
            now_ms: 0,
            reply: mpsc::sync_channel(1).0,
            durable: mpsc::sync_channel(1).0,
        }
    }

    /// An initialised data dir (in a temporary directory).
    fn data_dir() -> (tempfile::TempDir, DataDir) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = DataDir::new(tmp.path());
        dir.init().unwrap();
        (tmp, dir)
    }

    /// An initialised data dir and a `fhir.db` connection in it.
    fn fixture() -> (tempfile::TempDir, Connection) {
        let (tmp, dir) = data_dir();
        let conn = crate::fhir::open(&dir).unwrap();
        (tmp, conn)
    }

    #[test]
    fn a_group_with_refused_callers_stores_all_the_others() {
        let (_tmp, mut conn) = fixture();
        let bad = json!({"resourceType": "Observation", "id": "bad id"});
        // One group of five: the 2nd and 4th callers are refused.
        let group = [
            job(vec![obs("a1", "p1"), obs("a2", "p1")]),
            job(vec![obs("b1", "p1"), bad.clone()]),
            job(vec![obs("c1", "p2")]),
            job(vec![bad]),
            job(vec![obs("e1", "p2")]),
        ];
        let results = store_group(&mut conn, &group).unwrap();
        let ok: Vec<bool> = results.iter().map(Result::is_ok).collect();
        assert_eq!(ok, [true, false, true, false, true]);
        assert!(
            results[1]
                .as_ref()
                .unwrap_err()
                .to_string()
                .contains("bad id"),
            "{results:?}"
        );
        let ids: Vec<String> = conn
            .prepare("SELECT id FROM resources ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        // Nothing of a refused caller, all of every other one.
        assert_eq!(ids, ["a1", "a2", "c1", "e1"]);
    }

    /// A full disk (here SQLite's page limit, which fails the same way:
    /// `SQLITE_FULL`) fails the whole group as such and stores nothing of
    /// it; with room again, the same group is stored.
    #[test]
    fn a_full_disk_is_reported_as_such_and_stores_nothing() {
        let (_tmp, mut conn) = fixture();
        store_group(&mut conn, &[job(vec![obs("first", "p0")])]).unwrap();
        let pages: i64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        conn.pragma_update(None, "max_page_count", pages).unwrap();
        let group: Vec<Job> = (0..20)
            .map(|i| {
                job((0..50)
                    .map(|k| obs(&format!("o{i}-{k}"), &format!("p{i}")))
                    .collect())
            })
            .collect();
        let e = store_group(&mut conn, &group).unwrap_err();
        assert!(is_disk_full(&e), "{e:#}");
        let count = |conn: &Connection| -> i64 {
            conn.query_row("SELECT count(*) FROM resources", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(count(&conn), 1, "nothing of the group was stored");
        conn.pragma_update(None, "max_page_count", 1_000_000)
            .unwrap();
        let results = store_group(&mut conn, &group).unwrap();
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(count(&conn), 1 + 20 * 50);
    }

    #[test]
    fn concurrent_callers_are_each_stored_whole_or_refused_alone() {
        let (_tmp, dir) = data_dir();
        let w = Writer::open(&dir, &crate::limits::Limits::default()).unwrap();
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let w = w.clone();
                std::thread::spawn(move || {
                    let mut batch =
                        vec![obs(&format!("o{i}a"), "p1"), obs(&format!("o{i}b"), "p1")];
                    if i % 4 == 0 {
                        // A resource the store refuses: this caller alone fails.
                        batch.push(json!({"resourceType": "Observation", "id": "bad id"}));
                    }
                    let stored = w.store("t1", batch.into(), 0).and_then(|s| {
                        s.durable.wait()?;
                        Ok(s.upserted)
                    });
                    (i, stored)
                })
            })
            .collect();
        for t in threads {
            let (i, r) = t.join().unwrap();
            if i % 4 == 0 {
                assert!(r.is_err(), "caller {i}");
            } else {
                assert_eq!(r.unwrap(), vec![Upserted::Created, Upserted::Created]);
            }
        }
        let conn = crate::fhir::open(&dir).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM resources", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            n,
            12 * 2,
            "the refused callers stored nothing, the rest all"
        );
        // A resend is unchanged, not a new version.
        assert_eq!(
            w.store("t1", vec![obs("o1a", "p1")].into(), 0)
                .unwrap()
                .upserted,
            vec![Upserted::Unchanged]
        );
    }

    /// Other connections see a group as soon as `store` returns, before
    /// its fsync is waited for; `Durable::wait` then says it is on disk.
    #[test]
    fn a_store_is_visible_once_committed_and_then_durable() {
        let (_tmp, dir) = data_dir();
        let w = Writer::open(&dir, &crate::limits::Limits::default()).unwrap();
        let reader = crate::fhir::open(&dir).unwrap();
        let stored = w.store("t1", vec![obs("v1", "p1")].into(), 0).unwrap();
        assert_eq!(stored.upserted, vec![Upserted::Created]);
        let seen: i64 = reader
            .query_row("SELECT count(*) FROM resources WHERE id = 'v1'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(seen, 1, "committed, so visible to readers");
        stored.durable.wait().unwrap();
    }

    /// A failed fsync fails its group's durable wait, naming the file, and
    /// every later store at once: nothing after it is called durable.
    #[test]
    fn a_failed_fsync_fails_its_group_and_every_store_after_it() {
        let (tmp, dir) = data_dir();
        let conn = crate::fhir::open(&dir).unwrap();
        let ckpt =
            Checkpointer::start("fhir.db", &conn, crate::fhir::open(&dir).unwrap(), 8_000).unwrap();
        // A "WAL" whose fsync fails: a pipe (fdatasync: EINVAL).
        let (pipe, _other_end) = std::io::pipe().unwrap();
        let wal = Wal {
            file: std::fs::File::from(std::os::fd::OwnedFd::from(pipe)),
            path: tmp.path().join("broken").join("fhir.db-wal"),
        };
        let w = Writer::start(conn, ckpt, std::time::Duration::ZERO, wal).unwrap();
        let stored = w.store("t1", vec![obs("f1", "p1")].into(), 0).unwrap();
        let e = stored.durable.wait().unwrap_err().to_string();
        assert!(
            e.contains("broken/fhir.db-wal") && e.contains("fsync"),
            "{e}"
        );
        let later = w.store("t1", vec![obs("f2", "p1")].into(), 0).unwrap_err();
        assert!(
            later.to_string().contains("until clinicbox restarts"),
            "{later}"
        );
        let reader = crate::fhir::open(&dir).unwrap();
        let n: i64 = reader
            .query_row("SELECT count(*) FROM resources WHERE id = 'f2'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(n, 0, "nothing is stored after a failed fsync");
    }
}
