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
//! 2. once the WAL holds an eighth of `start_at` frames, the writer wakes a
//!    checkpointer thread after each commit (unless it is still busy),
//!    which runs a PASSIVE checkpoint on its own connection while the
//!    writer goes on (WAL mode lets them run side by side). Rounds follow
//!    one another, each copying back what was committed during the last:
//!    the copying (and the fsync of the database file that ends each
//!    round) is spread out, not one burst of `start_at` pages that would
//!    hold up the writer's own fsync of the WAL behind it. Under steady
//!    load the writer commits during every round, so no round ends with
//!    the WAL copied back whole;
//! 3. so once the WAL holds `start_at` frames and a round has ended with
//!    at most [`CATCH_UP`] frames left to copy, the writer copies those
//!    itself, right after its next commit
//!    (a PASSIVE checkpoint on its own connection: a few hundred pages and
//!    two fsyncs, a millisecond or two, after its callers were answered).
//!    The WAL is then copied back whole, and the writer's next transaction
//!    starts it again from the beginning, so it stays near `start_at`
//!    frames instead of growing. More than that left: another round; each
//!    is shorter than the last. (A reader still reading the WAL's old
//!    frames puts the restart off; the writer then tries again after its
//!    next commit.)
//! 4. only if that keeps failing and the WAL reaches `4 × start_at` frames
//!    does the writer itself run a RESTART checkpoint, waiting at most
//!    [`RESTART_WAIT`] for readers; if they are still there it tries again
//!    after another `start_at` frames. The WAL stays bounded, and the
//!    writer never stalls for long.
//!
//! Invariants: checkpoints never weaken durability (SQLite fsyncs the WAL
//! before it copies frames back and the database before the WAL can start
//! over, at `synchronous` NORMAL or FULL, which every connection here
//! uses); the writer and the thread never checkpoint at once (the writer
//! does only while the thread is idle, and only it wakes the thread); a
//! failed or blocked checkpoint is logged and retried after a later
//! commit, never fatal; the thread ends after its current round once the
//! [`Checkpointer`] is dropped.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
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

/// Frames left after a background round that the writer copies back
/// itself (4 KiB pages: 1 MiB), so that the WAL can start over.
pub const CATCH_UP: i64 = 256;

/// What the last background round left, for the writer's catch-up: set by
/// the thread before it clears `busy`, read by the writer after seeing it
/// clear.
#[derive(Default)]
struct LastRound {
    /// The WAL generation the writer asked the round for (see
    /// [`Checkpointer::generation`]).
    asked: AtomicU64,
    /// The generation the last finished round ran in.
    ran: AtomicU64,
    /// WAL frames that round found copied back when it ended.
    copied: AtomicI64,
    /// Tests only: how long each of this checkpointer's rounds sleeps
    /// before it checkpoints, in µs (a slow round under load).
    #[cfg(test)]
    delay_us: AtomicU64,
}

/// The writer thread's side of background checkpoints for one database.
pub struct Checkpointer {
    name: &'static str,
    /// WAL frames from which background rounds copy (`start_at / 8`).
    copy_from: i64,
    /// WAL frames from which the writer starts the WAL over.
    start_at: i64,
    /// WAL frames at which the writer runs a RESTART itself.
    restart_at: i64,
    busy: Arc<AtomicBool>,
    wake: mpsc::SyncSender<()>,
    last: Arc<LastRound>,
    /// Counts the WAL's restarts as the writer saw them (its frames after a
    /// commit dropped), so a round's figures are never read against a WAL
    /// that has started over since.
    generation: u64,
    /// Frames after the writer's last commit.
    frames: i64,
    /// RESTART checkpoints the writer ran (tests only).
    #[cfg(test)]
    restarts: u64,
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
    /// `background` (a second connection to the same file) from an eighth
    /// of `start_at` frames on, and starts the WAL over near `start_at`
    /// frames (module docs). Call [`Checkpointer::after_commit`] from
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
        let last = Arc::new(LastRound::default());
        let round = last.clone();
        std::thread::Builder::new()
            .name(format!("{name}-ckpt"))
            .spawn(move || {
                while woken.recv().is_ok() {
                    let _round = RoundDone(done.clone());
                    #[cfg(test)]
                    std::thread::sleep(Duration::from_micros(
                        round.delay_us.load(Ordering::Relaxed),
                    ));
                    let generation = round.asked.load(Ordering::Acquire);
                    match passive(&background) {
                        Ok(copied) => {
                            round.copied.store(copied, Ordering::Release);
                            round.ran.store(generation, Ordering::Release);
                        }
                        Err(e) => {
                            log::warn!(
                                "{name}: background checkpoint failed (retried later): {e:#}"
                            );
                        }
                    }
                }
            })
            .with_context(|| format!("cannot start the {name} checkpoint thread"))?;
        let start_at = start_at.max(1);
        Ok(Checkpointer {
            name,
            copy_from: (start_at / 8).max(1),
            start_at,
            restart_at: start_at.saturating_mul(4),
            busy,
            wake,
            last,
            // Round figures start at generation 0 with nothing copied:
            // the first generation is 1.
            generation: 1,
            frames: 0,
            #[cfg(test)]
            restarts: 0,
        })
    }

    /// After a commit on the writer connection: while the WAL is over the
    /// threshold and the checkpointer is idle, copies back the little its
    /// last round left (so the WAL can start over) or wakes it for another
    /// round; past four times the threshold, checkpoints and restarts the
    /// WAL itself.
    pub fn after_commit(&mut self, writer: &Connection) {
        // Taken, so that a group that committed nothing acts on nothing.
        let frames = WAL_FRAMES.with(|c| c.replace(0));
        if frames == 0 {
            return;
        }
        if frames < self.frames {
            // The WAL started over: a raised RESTART mark is spent too.
            self.generation += 1;
            self.restart_at = self.start_at.saturating_mul(4);
        }
        self.frames = frames;
        if frames < self.copy_from || self.busy.load(Ordering::Acquire) {
            return;
        }
        if frames >= self.restart_at {
            self.restart(writer, frames);
            return;
        }
        let last_round_here = self.last.ran.load(Ordering::Acquire) == self.generation;
        let left = frames - self.last.copied.load(Ordering::Acquire);
        if frames >= self.start_at && last_round_here && left <= CATCH_UP {
            match passive(writer) {
                // Copied back whole: the next transaction starts the WAL
                // over (unless a reader is still in it). Either way the
                // next catch-up has only the next commit's frames to copy.
                Ok(copied) => self.last.copied.store(copied, Ordering::Release),
                Err(e) => log::warn!("{}: checkpoint failed (retried later): {e:#}", self.name),
            }
            return;
        }
        self.last.asked.store(self.generation, Ordering::Release);
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
        #[cfg(test)]
        {
            self.restarts += 1;
        }
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
/// for no one. Returns the WAL frames copied back once it ended (all of
/// them, if it could).
fn passive(conn: &Connection) -> Result<i64> {
    let (busy, copied) = conn
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(2)?))
        })
        .context("PRAGMA wal_checkpoint(PASSIVE)")?;
    // Busy: another connection was checkpointing (the CLI in another
    // process, or a sync pull's automatic checkpoint); nothing is known
    // of what is copied.
    Ok(if busy != 0 { 0 } else { copied.max(0) })
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

    /// Under steady load a background round never ends with the WAL
    /// copied back whole (here each round takes 3 ms or more, while the
    /// writer commits on without waiting for it): the writer copies back
    /// the little the last round left, and the WAL starts over near its
    /// threshold, without ever needing the writer's RESTART.
    #[test]
    fn under_steady_load_the_writer_catches_up_and_the_wal_starts_over() {
        let mut f = Fixture::new(1_000);
        f.ck.last.delay_us.store(3_000, Ordering::Relaxed);
        let (mut most, mut restarted, mut n) = (0, 0, 0);
        while restarted < 3 && n < 20_000 {
            f.writer
                .execute("INSERT INTO t VALUES (?1)", [&vec![7u8; 3000]])
                .unwrap();
            let frames = WAL_FRAMES.with(Cell::get);
            if frames < f.ck.frames {
                restarted += 1;
            }
            most = most.max(frames);
            f.ck.after_commit(&f.writer);
            n += 1;
        }
        assert_eq!(f.ck.restarts, 0, "the writer needed RESTART checkpoints");
        assert!(
            restarted >= 3,
            "the WAL started over {restarted} times in {n} commits"
        );
        assert!(most < 2_000, "the WAL reached {most} frames");
        let count: i64 = f
            .open()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, n);
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
