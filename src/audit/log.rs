//! Appending to the audit log: the hash chain and group commit.
//!
//! Record `n`'s hash is `sha256("clinicbox-audit-v1\0" ‖ prev ‖ n ‖ id ‖
//! time ‖ kind ‖ body)`, each variable field prefixed by its length as a
//! u64 (big-endian), `prev` being record `n - 1`'s hash (32 zero bytes for
//! record 1). docs/audit-format.md has the details.
//!
//! Invariants:
//! - appends are serialised by SQLite's write lock (`BEGIN IMMEDIATE`); the
//!   chain head is read inside that transaction, so any number of processes
//!   may append to one log;
//! - `append`/`append_one` return only after the transaction holding the
//!   record has committed with `synchronous=FULL`;
//! - [`AuditLog`] batches the records of concurrent callers into one
//!   transaction (group commit): one fsync covers them all, and each caller
//!   still waits for its own record to be durable.

use std::sync::mpsc;

use anyhow::{Context, Result};
use ed25519_dalek::SigningKey;
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::checkpoint;
use crate::bundle::manifest::format_time;
use crate::checkpointer::Checkpointer;
use crate::clock;
use crate::datadir::DataDir;
use crate::limits::Limits;

/// WAL frames after which the writer's background checkpoint starts
/// (`crate::checkpointer`). Records are appended, so few pages repeat.
const CHECKPOINT_AT: i64 = 2_000;

/// Domain separation for record hashes.
const DOMAIN: &[u8] = b"clinicbox-audit-v1\0";

/// A record to append.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Record kind, e.g. `plugin.call`.
    pub kind: &'static str,
    /// JSON body, hashed exactly as stored.
    pub body: String,
}

impl Entry {
    /// An entry of `kind` with `body` serialised as JSON.
    pub fn new(kind: &'static str, body: &impl serde::Serialize) -> Entry {
        Entry {
            kind,
            body: serde_json::to_string(body).unwrap_or_else(|e| {
                // Serialising plain structs cannot fail; keep a record anyway.
                serde_json::json!({ "unserialisable": e.to_string() }).to_string()
            }),
        }
    }
}

/// Where an appended record landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Its sequence number.
    pub seq: i64,
    /// Its id (uuid).
    pub id: String,
}

/// A stored, sealed record.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Record {
    /// Sequence number.
    pub seq: i64,
    /// uuid.
    pub id: String,
    /// RFC 3339.
    pub time: String,
    /// Kind.
    pub kind: String,
    /// JSON body as stored.
    pub body: String,
    /// Previous record's hash, hex.
    pub prev: String,
    /// This record's hash, hex.
    pub hash: String,
}

/// The hash of a record.
pub fn record_hash(
    prev: &[u8],
    seq: i64,
    id: &str,
    time: &str,
    kind: &str,
    body: &str,
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(prev);
    h.update((seq as u64).to_be_bytes());
    for field in [id, time, kind, body] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    h.finalize().into()
}

/// When to sign checkpoints: every `every` records or `secs` seconds.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Records between checkpoints.
    pub every: i64,
    /// Seconds between checkpoints (when there are new records).
    pub secs: i64,
}

impl Policy {
    /// From the limits.
    pub fn of(limits: &Limits) -> Policy {
        Policy {
            every: limits.audit_checkpoint_every as i64,
            secs: limits.audit_checkpoint_secs as i64,
        }
    }
}

/// The signer of checkpoints: the appliance key and the policy.
pub struct Signer<'a> {
    /// Appliance identity.
    pub key: &'a SigningKey,
    /// When.
    pub policy: Policy,
}

/// Appends `entries` in one transaction and returns their receipts, after
/// the commit. With a signer, signs a checkpoint in the same transaction
/// when the policy says one is due.
pub fn append_batch(
    conn: &Connection,
    signer: Option<&Signer>,
    entries: &[Entry],
) -> Result<Vec<Receipt>> {
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
    seal(&tx)?;
    let now = clock::trusted_now(&tx)?;
    let time = format_time(now);
    let (mut seq, mut prev, mut cum) = head(&tx)?;
    let mut out = Vec::with_capacity(entries.len());
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO log (seq, id, time, kind, body, cum_bytes, prev, hash)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for e in entries {
            seq += 1;
            let id = new_id()?;
            cum += e.body.len() as i64;
            let hash = record_hash(&prev, seq, &id, &time, e.kind, &e.body);
            insert.execute(params![
                seq,
                id,
                time,
                e.kind,
                e.body,
                cum,
                &prev[..],
                &hash[..]
            ])?;
            prev = hash;
            out.push(Receipt { seq, id });
        }
    }
    if let Some(s) = signer {
        checkpoint::maybe_sign(&tx, s, seq, &prev, now)?;
    }
    // The fault tests' broken disk: the batch is written, then its commit
    // fails, and the transaction rolls back.
    if crate::fsutil::errpoint("audit.append") {
        anyhow::bail!("cannot commit audit records: fail-point error:audit.append");
    }
    tx.commit().context("cannot commit audit records")?;
    Ok(out)
}

/// Appends one entry (its own transaction) and returns its receipt.
pub fn append_one(conn: &Connection, signer: Option<&Signer>, entry: Entry) -> Result<Receipt> {
    append_batch(conn, signer, std::slice::from_ref(&entry))?
        .pop()
        .context("no receipt for the appended record")
}

/// Appends one entry and, when the checkpoint policy says one is due, signs
/// a checkpoint with the appliance key of `dir` in the same transaction.
pub fn append_signed(dir: &DataDir, conn: &Connection, entry: Entry) -> Result<Receipt> {
    let limits = Limits::default();
    match crate::keys::read_secret(&dir.identity_key(), limits.max_key_file_bytes) {
        Ok(key) => {
            let signer = Signer {
                key: &key,
                policy: Policy::of(&limits),
            };
            append_one(conn, Some(&signer), entry)
        }
        Err(e) => {
            log::warn!("audit checkpoint not signed: {e}");
            append_one(conn, None, entry)
        }
    }
}

/// The chain head: (seq, hash, cum_bytes) of the last sealed record, or
/// (0, zeros, 0).
pub fn head(conn: &Connection) -> Result<(i64, [u8; 32], i64)> {
    let row: Option<(i64, Vec<u8>, i64)> = conn
        .prepare_cached("SELECT seq, hash, cum_bytes FROM log ORDER BY seq DESC LIMIT 1")?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    Ok(match row {
        None => (0, [0; 32], 0),
        Some((seq, hash, cum)) => (
            seq,
            hash.try_into()
                .map_err(|_| anyhow::anyhow!("audit record {seq}: hash is not 32 bytes"))?,
            cum,
        ),
    })
}

/// Seals migrated records that have no id and hash yet (schema 3 moved the
/// earlier tables in without them). Runs inside the caller's transaction.
pub fn seal(conn: &Connection) -> Result<()> {
    let pending: Vec<(i64, String, String, String)> = {
        let mut stmt = conn.prepare_cached(
            "SELECT seq, time, kind, body FROM log WHERE hash IS NULL ORDER BY seq",
        )?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
            .collect::<Result<_, _>>()?
    };
    if pending.is_empty() {
        return Ok(());
    }
    let first = pending[0].0;
    let (mut prev, mut cum) = if first == 1 {
        ([0u8; 32], 0i64)
    } else {
        let (h, c): (Vec<u8>, i64) = conn.query_row(
            "SELECT hash, cum_bytes FROM log WHERE seq = ?1",
            [first - 1],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        (
            h.try_into()
                .map_err(|_| anyhow::anyhow!("audit record {}: bad hash", first - 1))?,
            c,
        )
    };
    let mut update = conn.prepare_cached(
        "UPDATE log SET id = ?2, cum_bytes = ?3, prev = ?4, hash = ?5 WHERE seq = ?1",
    )?;
    for (seq, time, kind, body) in pending {
        let id = new_id()?;
        cum += body.len() as i64;
        let hash = record_hash(&prev, seq, &id, &time, &kind, &body);
        update.execute(params![seq, id, cum, &prev[..], &hash[..]])?;
        prev = hash;
    }
    Ok(())
}

/// Seals migrated records now, in their own transaction, if there are any
/// (a cheap indexed check otherwise).
pub fn seal_pending(conn: &Connection) -> Result<()> {
    let any: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM log WHERE hash IS NULL)")?
        .query_row([], |r| r.get(0))?;
    if any {
        let tx =
            rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)?;
        seal(&tx)?;
        tx.commit()?;
    }
    Ok(())
}

/// Reads records `from..=to` (sealed), oldest first.
pub fn read_range(conn: &Connection, from: i64, to: i64) -> Result<Vec<Record>> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, id, time, kind, body, prev, hash FROM log WHERE seq BETWEEN ?1 AND ?2 ORDER BY seq",
    )?;
    let rows = stmt.query_map([from, to], |r| {
        Ok(Record {
            seq: r.get(0)?,
            id: r.get::<_, Option<String>>(1)?.unwrap_or_default(),
            time: r.get(2)?,
            kind: r.get(3)?,
            body: r.get(4)?,
            prev: hex::encode(r.get::<_, Option<Vec<u8>>>(5)?.unwrap_or_default()),
            hash: hex::encode(r.get::<_, Option<Vec<u8>>>(6)?.unwrap_or_default()),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Bytes of record bodies after `acked_seq`: the backlog not yet upstream.
pub fn backlog_bytes(conn: &Connection) -> Result<(i64, i64)> {
    let (seq, _, cum) = head(conn)?;
    let (acked, acked_cum): (i64, i64) = conn.query_row(
        "SELECT s.acked_seq, coalesce((SELECT cum_bytes FROM log WHERE seq = s.acked_seq), 0)
         FROM sync_state s WHERE id = 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok((seq - acked, cum - acked_cum))
}

/// A fresh id: a UUID version 7 (RFC 9562), its first 48 bits the Unix
/// time in ms and the rest from the OS random source. Ids made together
/// sort together, so the audit log's id and call-id indexes (and the FHIR
/// cache's resource index, for ids assigned at ingest) grow at their end
/// instead of dirtying a random page per record.
pub fn new_id() -> Result<String> {
    let mut random = [0u8; 10];
    getrandom::fill(&mut random)
        .map_err(|e| anyhow::anyhow!("the OS random source failed: {e}"))?;
    let ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    let ms = u64::try_from(ms).unwrap_or(0);
    Ok(uuid::Builder::from_unix_timestamp_millis(ms, &random)
        .into_uuid()
        .hyphenated()
        .to_string())
}

/// The shared, group-committing appender of one data dir's log.
///
/// One writer thread owns the write connection. Callers hand it their entry
/// and block until it answers; it takes everything queued, appends it in one
/// transaction (one fsync), and answers each caller. Each caller is woken
/// exactly once, when its own record is durable.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Request>,
    signs: bool,
}

type Request = (Entry, mpsc::SyncSender<Result<Receipt, String>>);

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("signs_checkpoints", &self.signs)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens the log of `dir`, with the appliance key for checkpoints, and
    /// starts its writer thread (which ends when the last clone is dropped).
    pub fn open(dir: &DataDir, limits: &Limits) -> Result<AuditLog> {
        let conn = dir.open_audit()?;
        let key = crate::keys::read_secret(&dir.identity_key(), limits.max_key_file_bytes)
            .map_err(|e| log::warn!("audit checkpoints will not be signed: {e}"))
            .ok();
        let signs = key.is_some();
        let policy = Policy::of(limits);
        let wait = std::time::Duration::from_micros(limits.group_commit_wait_us);
        let ckpt = Checkpointer::start("audit.db", &conn, dir.open_audit()?, CHECKPOINT_AT)?;
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                crate::priority::pipeline_thread("audit-writer");
                writer(conn, ckpt, key, policy, wait, rx)
            })
            .context("cannot start the audit writer thread")?;
        Ok(AuditLog { tx, signs })
    }

    /// Appends `entry` and returns once it is durable (group commit).
    pub fn append(&self, entry: Entry) -> Result<Receipt> {
        self.submit(entry)?.wait()
    }

    /// Queues `entry` without waiting. The writer commits in queue order,
    /// so once a later append is durable this one is too (or failed: check
    /// with [`Pending::wait`], which then returns at once). Lets a caller
    /// overlap its own work, or several records, with one fsync.
    pub fn submit(&self, entry: Entry) -> Result<Pending> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.tx
            .send((entry, reply))
            .map_err(|_| anyhow::anyhow!("the audit writer has stopped"))?;
        Ok(Pending(answer))
    }
}

/// A queued append (see [`AuditLog::submit`]).
#[derive(Debug)]
pub struct Pending(mpsc::Receiver<Result<Receipt, String>>);

impl Pending {
    /// Waits until the record is durable (or failed).
    pub fn wait(self) -> Result<Receipt> {
        self.0
            .recv()
            .map_err(|_| anyhow::anyhow!("the audit writer stopped before answering"))?
            .map_err(anyhow::Error::msg)
    }
}

/// The writer thread: waits for one request, gathers what else arrives
/// within `wait` (`crate::group`), appends it all in one transaction,
/// answers every caller.
fn writer(
    conn: Connection,
    mut ckpt: Checkpointer,
    key: Option<SigningKey>,
    policy: Policy,
    wait: std::time::Duration,
    rx: mpsc::Receiver<Request>,
) {
    while let Ok(first) = rx.recv() {
        let batch = crate::group::gather(&rx, first, wait, 10_000);
        let (entries, replies): (Vec<Entry>, Vec<_>) = batch.into_iter().unzip();
        let signer = key.as_ref().map(|key| Signer { key, policy });
        match append_batch(&conn, signer.as_ref(), &entries) {
            Ok(receipts) => {
                for (reply, r) in replies.into_iter().zip(receipts) {
                    let _ = reply.send(Ok(r));
                }
            }
            Err(e) => {
                let msg = format!("cannot append to the audit log: {e:#}");
                for reply in replies {
                    let _ = reply.send(Err(msg.clone()));
                }
            }
        }
        // After the answers: a caller never waits for a checkpoint.
        ckpt.after_commit(&conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_uuid_v7_and_sort_by_time() {
        let a = new_id().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_id().unwrap();
        for id in [&a, &b] {
            let u = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(u.get_version_num(), 7, "{id}");
            assert_eq!(u.get_variant(), uuid::Variant::RFC4122, "{id}");
        }
        assert!(a < b, "{a} then {b}");
        assert_ne!(new_id().unwrap(), new_id().unwrap());
    }

    #[test]
    fn the_hash_covers_every_field_and_the_link() {
        let base = record_hash(&[0; 32], 1, "a", "t", "k", "{}");
        assert_ne!(base, record_hash(&[1; 32], 1, "a", "t", "k", "{}"));
        assert_ne!(base, record_hash(&[0; 32], 2, "a", "t", "k", "{}"));
        assert_ne!(base, record_hash(&[0; 32], 1, "b", "t", "k", "{}"));
        assert_ne!(base, record_hash(&[0; 32], 1, "a", "u", "k", "{}"));
        assert_ne!(base, record_hash(&[0; 32], 1, "a", "t", "j", "{}"));
        assert_ne!(base, record_hash(&[0; 32], 1, "a", "t", "k", "{ }"));
        // Length prefixes: moving a byte between fields changes the hash.
        assert_ne!(
            record_hash(&[0; 32], 1, "ab", "c", "k", "{}"),
            record_hash(&[0; 32], 1, "a", "bc", "k", "{}")
        );
    }
}
