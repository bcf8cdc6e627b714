//! `audit verify`: recompute the whole chain offline and check every
//! checkpoint and anchor against it.
//!
//! What each tampering looks like (docs/audit-format.md):
//! - an edited record no longer matches its own hash;
//! - a deleted record leaves a gap in `seq`;
//! - a reordered record's `prev` no longer matches the hash before it (and
//!   its time may run backwards);
//! - a truncated log is shorter than a checkpoint that was signed, sent
//!   upstream, or exported: the anchors. Without an anchor a truncation at
//!   the very end cannot be told from a shorter log, which is why checkpoints
//!   leave the box.
//!
//! Invariant: verification only reads; it reports the first bad record.

use anyhow::Result;
use ed25519_dalek::VerifyingKey;
use rusqlite::Connection;
use serde::Serialize;

use super::checkpoint::{self, Checkpoint};
use super::log::record_hash;

/// What a clean verification covered.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Records checked (1..=records).
    pub records: i64,
    /// Hash of the last record, hex.
    pub head: String,
    /// Checkpoints in the log that verified.
    pub checkpoints: usize,
    /// Anchors (exported or acknowledged checkpoints) that verified.
    pub anchors: usize,
}

/// The first problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Tampered(pub String);

/// Verifies the log in `conn` with the appliance key, against `anchors`.
pub fn verify(
    conn: &Connection,
    key: &VerifyingKey,
    anchors: &[(String, Checkpoint)],
) -> Result<Result<Report, Tampered>> {
    let mut stmt =
        conn.prepare("SELECT seq, id, time, kind, body, prev, hash FROM log ORDER BY seq")?;
    let mut rows = stmt.query([])?;
    let mut expected = 1i64;
    let mut prev = [0u8; 32];
    let mut prev_time = String::new();
    // Hashes at checkpoint sizes, to compare with the checkpoints after.
    let mut wanted: Vec<(String, Checkpoint)> = checkpoint::all(conn)?
        .into_iter()
        .map(|c| (format!("checkpoint at {}", c.size), c))
        .collect();
    let n_checkpoints = wanted.len();
    wanted.extend(anchors.iter().cloned());
    for (what, c) in &wanted {
        if let Err(e) = c.verify(key) {
            return Ok(Err(Tampered(format!("{what}: {e}"))));
        }
    }
    let mut roots: std::collections::HashMap<i64, String> = wanted
        .iter()
        .map(|(_, c)| (c.size, String::new()))
        .collect();
    while let Some(r) = rows.next()? {
        let seq: i64 = r.get(0)?;
        if seq != expected {
            return Ok(Err(Tampered(format!(
                "record {expected} is missing: the log goes from {} to {seq} (deleted)",
                expected - 1
            ))));
        }
        let id: Option<String> = r.get(1)?;
        let time: String = r.get(2)?;
        let kind: String = r.get(3)?;
        let body: String = r.get(4)?;
        let stored_prev: Option<Vec<u8>> = r.get(5)?;
        let stored: Option<Vec<u8>> = r.get(6)?;
        let (Some(id), Some(stored_prev), Some(stored)) = (id, stored_prev, stored) else {
            return Ok(Err(Tampered(format!(
                "record {seq} is not sealed (no id or hash)"
            ))));
        };
        if stored_prev != prev {
            return Ok(Err(Tampered(format!(
                "record {seq}: its link does not match the hash of record {} (records reordered, removed or replaced)",
                seq - 1
            ))));
        }
        let h = record_hash(&prev, seq, &id, &time, &kind, &body);
        if stored != h {
            return Ok(Err(Tampered(format!(
                "record {seq}: its content does not match its hash (edited)"
            ))));
        }
        if time < prev_time {
            return Ok(Err(Tampered(format!(
                "record {seq}: its time {time} is before record {}'s {prev_time} (reordered)",
                seq - 1
            ))));
        }
        if let Some(slot) = roots.get_mut(&seq) {
            *slot = hex::encode(h);
        }
        prev = h;
        prev_time = time;
        expected += 1;
    }
    let records = expected - 1;
    for (what, c) in &wanted {
        if c.size > records {
            return Ok(Err(Tampered(format!(
                "the log ends at record {records}, but {what} (signed {}) covers {} records (truncated)",
                c.time, c.size
            ))));
        }
        if roots.get(&c.size).map(String::as_str) != Some(c.root.as_str()) {
            return Ok(Err(Tampered(format!(
                "record {}: its hash differs from the one signed in {what} (rewritten)",
                c.size
            ))));
        }
    }
    Ok(Ok(Report {
        records,
        head: hex::encode(prev),
        checkpoints: n_checkpoints,
        anchors: anchors.len(),
    }))
}
