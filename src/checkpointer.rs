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
//! 4. only if that keeps failing (readers always in the way) and the WAL
//!    reaches `4 × start_at` frames does the writer itself run a RESTART
//!    checkpoint, waiting for readers: the WAL stays bounded.
//!
//! Invariants: checkpoints never touch durability (a commit is durable in
//! the WAL before any of this runs); a failed checkpoint is logged and
//! retried after a later commit, never fatal; the thread ends when the
//! [`Checkpointer`] is dropped.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

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

/// The writer thread's side of background checkpoints for one database.
pub struct Checkpointer {
    name: &'static str,
    start_at: i64,
    busy: Arc<AtomicBool>,
    wake: mpsc::SyncSender<()>,
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
                    if let Err(e) = passive(&background) {
                        log::warn!("{name}: background checkpoint failed (retried later): {e:#}");
                    }
                    done.store(false, Ordering::Release);
                }
            })
            .with_context(|| format!("cannot start the {name} checkpoint thread"))?;
        Ok(Checkpointer {
            name,
            start_at: start_at.max(1),
            busy,
            wake,
        })
    }

    /// After a commit on the writer connection: wakes the checkpointer
    /// while the WAL is over the threshold (and it is idle), or, past four
    /// times the threshold, checkpoints and restarts the WAL itself.
    pub fn after_commit(&mut self, writer: &Connection) {
        let frames = WAL_FRAMES.with(Cell::get);
        if frames < self.start_at || self.busy.load(Ordering::Acquire) {
            return;
        }
        if frames >= self.start_at.saturating_mul(4) {
            log::info!(
                "{}: WAL at {frames} frames, checkpointing in the writer",
                self.name
            );
            if let Err(e) = writer
                .query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
                .context("PRAGMA wal_checkpoint(RESTART)")
            {
                log::warn!("{}: checkpoint failed (retried later): {e:#}", self.name);
            }
            return;
        }
        self.busy.store(true, Ordering::Release);
        if self.wake.try_send(()).is_err() {
            self.busy.store(false, Ordering::Release);
        }
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

    #[test]
    fn the_wal_is_checkpointed_in_the_background_and_restarted() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("t.db");
        let open = || {
            let c = Connection::open(&path).unwrap();
            c.pragma_update(None, "journal_mode", "WAL").unwrap();
            c
        };
        let writer = open();
        writer.execute_batch("CREATE TABLE t (x BLOB)").unwrap();
        let mut ck = Checkpointer::start("test", &writer, open(), 100).unwrap();
        let blob = vec![7u8; 3000];
        for _ in 0..2000 {
            writer
                .execute("INSERT INTO t VALUES (?1)", [&blob])
                .unwrap();
            ck.after_commit(&writer);
            // Let the background thread keep up, as it would between groups.
            if ck.busy.load(Ordering::Acquire) {
                while ck.busy.load(Ordering::Acquire) {
                    std::thread::yield_now();
                }
            }
        }
        // Without checkpoints 2,000 single-page commits leave 2,000+ frames.
        // Restarted after background rounds, the WAL file never reaches the
        // 4 × 100 frames at which the writer would have to step in.
        let frames = wal_frames(&path);
        assert!(frames < 400, "WAL file holds {frames} frames");
        let n: i64 = open()
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2000);
    }
}
