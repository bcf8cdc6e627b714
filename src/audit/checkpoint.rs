//! Signed checkpoints: "the log had `size` records, the last one hashing to
//! `root`, at `time`", signed by the appliance's ed25519 key.
//!
//! The signed statement is the UTF-8 text
//! `clinicbox-audit-checkpoint-v1\n{size}\n{root hex}\n{time}\n{key id}\n`
//! (docs/audit-format.md). A checkpoint is what travels upstream with each
//! batch and what `audit export` writes out, so a later truncation of the
//! log shows against it.
//!
//! Invariant: a checkpoint is written in the same transaction as the records
//! it covers, so it never refers to records that are not durable.

use anyhow::{Context, Result};
use ed25519_dalek::{Signature, Signer as _, VerifyingKey};
use rusqlite::{Connection, params};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::log::Signer;
use crate::bundle::manifest::{format_time, parse_time};
use crate::keys::KeyId;

/// A signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Records covered (1..=size).
    pub size: i64,
    /// Hash of record `size`, hex.
    pub root: String,
    /// When it was signed (RFC 3339).
    pub time: String,
    /// The appliance key's id.
    pub key_id: String,
    /// ed25519 signature over [`Checkpoint::statement`], hex.
    pub sig: String,
}

impl Checkpoint {
    /// The exact bytes signed.
    pub fn statement(size: i64, root: &str, time: &str, key_id: &str) -> String {
        format!("clinicbox-audit-checkpoint-v1\n{size}\n{root}\n{time}\n{key_id}\n")
    }

    /// Checks the signature with `key`.
    pub fn verify(&self, key: &VerifyingKey) -> Result<(), String> {
        if KeyId::of(key).as_str() != self.key_id {
            return Err(format!(
                "checkpoint at {} is signed by key {}, not this appliance's key {}",
                self.size,
                self.key_id,
                KeyId::of(key)
            ));
        }
        let sig: [u8; 64] = hex::decode(&self.sig)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| format!("checkpoint at {}: signature is not 64 hex bytes", self.size))?;
        let msg = Checkpoint::statement(self.size, &self.root, &self.time, &self.key_id);
        key.verify_strict(msg.as_bytes(), &Signature::from_bytes(&sig))
            .map_err(|_| format!("checkpoint at {}: the signature does not verify", self.size))
    }
}

/// Signs and stores a checkpoint at `size` if the policy says one is due:
/// `every` records since the last, or `secs` seconds with new records.
pub fn maybe_sign(
    conn: &Connection,
    s: &Signer,
    size: i64,
    root: &[u8; 32],
    now: OffsetDateTime,
) -> Result<Option<Checkpoint>> {
    let last = latest(conn)?;
    let due = match &last {
        None => size > 0,
        Some(c) if c.size >= size => false,
        Some(c) => {
            let age = parse_time(&c.time)
                .map(|t| (now - t).whole_seconds())
                .unwrap_or(i64::MAX);
            size - c.size >= s.policy.every || age >= s.policy.secs
        }
    };
    if !due {
        return Ok(None);
    }
    sign(conn, s.key, size, root, now).map(Some)
}

/// Signs and stores a checkpoint at `size` now.
pub fn sign(
    conn: &Connection,
    key: &ed25519_dalek::SigningKey,
    size: i64,
    root: &[u8; 32],
    now: OffsetDateTime,
) -> Result<Checkpoint> {
    let key_id = KeyId::of(&key.verifying_key()).to_string();
    let root = hex::encode(root);
    let time = format_time(now);
    let sig = key.sign(Checkpoint::statement(size, &root, &time, &key_id).as_bytes());
    let c = Checkpoint {
        size,
        root,
        time,
        key_id,
        sig: hex::encode(sig.to_bytes()),
    };
    conn.prepare_cached(
        "INSERT INTO checkpoints (size, root, time, key_id, sig) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(size) DO NOTHING",
    )?
    .execute(params![
        c.size,
        hex::decode(&c.root)?,
        c.time,
        c.key_id,
        sig.to_bytes().to_vec()
    ])
    .context("cannot store the audit checkpoint")?;
    Ok(c)
}

/// The columns [`all_where`] reads, as a literal for `concat!` (whole
/// SQL literals, so each statement is prepared once per connection).
macro_rules! select_checkpoints {
    () => {
        "SELECT size, root, time, key_id, sig FROM checkpoints"
    };
}

/// The newest checkpoint, if any.
pub fn latest(conn: &Connection) -> Result<Option<Checkpoint>> {
    // On every audit batch (`maybe_sign`): a cached statement, not a parse.
    Ok(all_where(
        conn,
        concat!(select_checkpoints!(), " ORDER BY size DESC LIMIT 1"),
        [],
    )?
    .pop())
}

/// Every checkpoint, oldest first.
pub fn all(conn: &Connection) -> Result<Vec<Checkpoint>> {
    all_where(conn, concat!(select_checkpoints!(), " ORDER BY size"), [])
}

/// The checkpoints `sql` (`select_checkpoints!()` with its tail) selects.
fn all_where(conn: &Connection, sql: &str, args: impl rusqlite::Params) -> Result<Vec<Checkpoint>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(args, |r| {
        Ok(Checkpoint {
            size: r.get(0)?,
            root: hex::encode(r.get::<_, Vec<u8>>(1)?),
            time: r.get(2)?,
            key_id: r.get(3)?,
            sig: hex::encode(r.get::<_, Vec<u8>>(4)?),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The checkpoint at exactly `size`, if one was signed.
pub fn at(conn: &Connection, size: i64) -> Result<Option<Checkpoint>> {
    Ok(all_where(
        conn,
        concat!(select_checkpoints!(), " WHERE size = ?1"),
        [size],
    )?
    .pop())
}

/// Keeps `c` as an anchor in `state.db` (`source`: `upstream` when upstream
/// acknowledged a batch carrying it, `export` when it was exported).
pub fn store_anchor(state: &Connection, c: &Checkpoint, source: &str) -> Result<()> {
    state.execute(
        "INSERT INTO audit_anchors (size, checkpoint, source, time) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(source, size) DO NOTHING",
        params![c.size, serde_json::to_string(c)?, source, c.time],
    )?;
    Ok(())
}

/// The anchors kept in `state.db`, each with a description.
pub fn anchors(state: &Connection) -> Result<Vec<(String, Checkpoint)>> {
    let mut stmt = state.prepare("SELECT source, checkpoint FROM audit_anchors ORDER BY size")?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (source, text) = row?;
        let c: Checkpoint = serde_json::from_str(&text)
            .with_context(|| format!("state.db: a stored {source} anchor is not a checkpoint"))?;
        let what = match source.as_str() {
            "upstream" => format!("the checkpoint at {} acknowledged by upstream", c.size),
            _ => format!("the checkpoint at {} exported", c.size),
        };
        out.push((what, c));
    }
    Ok(out)
}
