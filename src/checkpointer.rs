//! WAL checkpoints kept off a group-committing writer's critical path
//! (the audit log's and the FHIR cache's writer threads).
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses its
//! threshold: that commit, and every caller queued behind it, waits while
//! thousands of pages are copied back into the database file and fsynced
//! (10–20 ms for `fhir.db` under device ingest, growing with the file).
//! Instead:
//!
//! 1. the writer's connection has no automatic checkpoint; a WAL hook tells
//!    the writer how many frames the WAL holds after each commit;
//! 2. while the WAL holds `start_at` frames or more, the writer wakes a
//!    checkpointer thread after each commit (unless it is still busy),
//!    which runs a PASSIVE checkpoint on its own connection while the
//!    writer goes on (WAL mode lets them run side by side). The first
//!    round copies most of the WAL; the next ones copy the little that was
//!    committed meanwhile, and soon one finishes while the writer gathers
//!    its next group;
//! 3. the writer's next transaction then finds the WAL fully copied back
//!    and starts it again from the beginning, so it stays near `start_at`
//!    frames instead of growing;
//!    (A reader still reading from the WAL's old frames puts that off to
//!    a later round.)
//! 4. only if that keeps failing and the WAL reaches `4 × start_at` frames
//!    does the writer itself run a RESTART checkpoint, waiting at most
//!    [`RESTART_WAIT`] for readers; if they are still there it tries again
//!    after another `start_at` frames. The WAL stays bounded, and the
//!    writer never stalls for long.
//!
//! Invariants: checkpoints never touch durability (a commit is durable in
//! the WAL before any of this runs); a failed or blocked checkpoint is
//! logged and retried after a later commit, never fatal; the thread ends
//! after its current round once the [`Checkpointer`] is dropped.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::Connection;

thread_local! {
    /// Frames in the WAL after the last commit on this thread's writer
    /// connection (set by [`wal_frames_hook`]).
    static WAL_FRAMES: Cell<i64> = const { Cell::new(0) };
}

fn wal_frames_hook(_: &rusqlite::hooks::Wal, frames: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.with(|c| c.set(i64::from(frames)));
    Ok(())
}

/// The longest the writer waits for readers in its own RESTART checkpoint.
pub const RESTART_WAIT: Duration = Duration::from_millis(100);

/// The writer thread's side of background checkpoints for one database.
pub struct Checkpointer {
    name: &'static str,
    start_at: i64,
    /// WAL frames at which the writer runs a RESTART itself.
    restart_at: i64,
    busy: Arc<AtomicBool>,
    wake: mpsc::SyncSender<()>,
}

/// Clears the busy flag when a round ends, even by a panic.
struct RoundDone(Arc<AtomicBool>);

impl Drop for RoundDone {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer")
            .field("db", &self.name)
            .field("start_at", &self.start_at)
            .finish_non_exhaustive()
    }
}

impl Checkpointer {
    /// Takes over checkpoints of `writer`'s database: turns its automatic
    /// checkpoint off and starts a thread that checkpoints through
    /// `background` (a second connection to the same file) once the WAL
    /// holds `start_at` frames. Call [`Checkpointer::after_commit`] from
    /// the thread that owns `writer`, after each of its commits.
    pub fn start(
        name: &'static str,
        writer: &Connection,
        background: Connection,
        start_at: i64,
    ) -> Result<Checkpointer> {
        // Replaces SQLite's own hook, and with it the automatic checkpoint.
        writer.wal_hook(Some(wal_frames_hook));
        let busy = Arc::new(AtomicBool::new(false));
        let (wake, woken) = mpsc::sync_channel::<()>(1);
        let done = busy.clone();
        std::thread::Builder::new()
            .name(format!("{name}-ckpt"))
            .spawn(move || {
                while woken.recv().is_ok() {
                    let _round = RoundDone(done.clone());
                    if let Err(e) = passive(&background) {
                        log::warn!("{name}: background checkpoint failed (retried later): {e:#}");
                    }
                }
            })
            .with_context(|| format!("cannot start the {name} checkpoint thread"))?;
        let start_at = start_at.max(1);
        Ok(Checkpointer {
            name,
            start_at,
            restart_at: start_at.saturating_mul(4),
            busy,
            wake,
        })
    }

    /// After a commit on the writer connection: wakes the checkpointer
    /// while the WAL is over the threshold (and it is idle), or, past four
    /// times the threshold, checkpoints and restarts the WAL itself.
    pub fn after_commit(&mut self, writer: &Connection) {
        // Taken, so that a group that committed nothing acts on nothing.
        let frames = WAL_FRAMES.with(|c| c.replace(0));
        if frames >= self.restart_at {
            self.restart(writer, frames);
            return;
        }
        if frames < self.start_at || self.busy.load(Ordering::Acquire) {
            return;
        }
        self.busy.store(true, Ordering::Release);
        if self.wake.try_send(()).is_err() {
            self.busy.store(false, Ordering::Release);
        }
    }

    /// The writer's own RESTART checkpoint, waiting at most
    /// [`RESTART_WAIT`] for readers (and for a background round).
    fn restart(&mut self, writer: &Connection, frames: i64) {
        let result = (|| -> Result<bool> {
            writer.busy_timeout(RESTART_WAIT)?;
            let blocked = writer
                .query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0))
                .context("PRAGMA wal_checkpoint(RESTART)");
            writer.busy_timeout(crate::db::BUSY_TIMEOUT)?;
            Ok(blocked? != 0)
        })();
        match result {
            Ok(false) => {
                self.restart_at = self.start_at.saturating_mul(4);
                return;
            }
            Ok(true) => log::warn!(
                "{}: WAL at {frames} frames and readers still in it; trying again later",
                self.name
            ),
            Err(e) => log::warn!("{}: checkpoint failed (retried later): {e:#}", self.name),
        }
        self.restart_at = frames.saturating_add(self.start_at);
    }
}

/// A PASSIVE checkpoint: copies back what no reader still needs, waiting
/// for no one.
fn passive(conn: &Connection) -> Result<()> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        .context("PRAGMA wal_checkpoint(PASSIVE)")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wal_frames(path: &std::path::Path) -> u64 {
        // A WAL file is a 32-byte header and (24 + page) bytes per frame.
        std::fs::metadata(path.with_extension("db-wal"))
            .map(|m| m.len().saturating_sub(32) / (24 + 4096))
            .unwrap_or(0)
    }

    /// A WAL-mode test database with one table, its writer connection and
    /// the writer's checkpointer.
    struct Fixture {
        _tmp: tempfile::TempDir,
        path: std::path::PathBuf,
        writer: Connection,
        ck: Checkpointer,
    }

    impl Fixture {
        fn new(start_at: i64) -> Fixture {
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join("t.db");
            let writer = open_wal(&path);
            writer.execute_batch("CREATE TABLE t (x BLOB)").unwrap();
            let ck = Checkpointer::start("test", &writer, open_wal(&path), start_at).unwrap();
            Fixture {
                _tmp: tmp,
                path,
                writer,
                ck,
            }
        }

        /// Commits one single-page row, calls `after_commit` and returns
        /// how long that took; then lets the background round finish, as
        /// it would between two groups.
        fn commit(&mut self) -> Duration {
            self.writer
                .execute("INSERT INTO t VALUES (?1)", [&vec![7u8; 3000]])
                .unwrap();
            let t = std::time::Instant::now();
            self.ck.after_commit(&self.writer);
            let took = t.elapsed();
            while self.ck.busy.load(Ordering::Acquire) {
                std::thread::yield_now();
            }
            took
        }

        fn open(&self) -> Connection {
            open_wal(&self.path)
        }
    }

    fn open_wal(path: &std::path::Path) -> Connection {
        let c = Connection::open(path).unwrap();
        c.pragma_update(None, "journal_mode", "WAL").unwrap();
        c.busy_timeout(crate::db::BUSY_TIMEOUT).unwrap();
        c
    }

    #[test]
    fn the_wal_is_checkpointed_in_the_background_and_restarted() {
        let mut f = Fixture::new(100);
        for _ in 0..2000 {
            f.commit();
        }
        // Without checkpoints 2,000 single-page commits leave 2,000+ frames.
        // Restarted after background rounds, the WAL file never reaches the
        // 4 × 100 frames at which the writer would have to step in.
        let frames = wal_frames(&f.path);
        assert!(frames < 400, "WAL file holds {frames} frames");
        let n: i64 = f
            .open()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2000);
    }

    #[test]
    fn a_reader_in_the_way_delays_the_restart_without_stalling_the_writer() {
        let mut f = Fixture::new(50);
        // A reader keeps the snapshot of the WAL's first frames: no round
        // can copy the WAL back whole, and it grows past 4 × 50 frames.
        let reader = f.open();
        reader
            .execute_batch("BEGIN; SELECT count(*) FROM t;")
            .unwrap();
        let worst = (0..400).map(|_| f.commit()).max().unwrap();
        assert!(
            worst < Duration::from_secs(2),
            "the writer waited {worst:?} in one checkpoint"
        );
        reader.execute_batch("COMMIT").unwrap();
        for _ in 0..400 {
            f.commit();
        }
        let frames: i64 = f
            .open()
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
            .unwrap();
        assert!(frames < 200, "the WAL still holds {frames} frames");
    }
}
