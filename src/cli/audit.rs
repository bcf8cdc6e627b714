//! `clinicbox audit …`: read, export and verify the audit log.
//!
//! `verify` recomputes the chain and every checkpoint offline, against the
//! anchors kept in `state.db` (checkpoints acknowledged upstream or
//! exported) and any `--checkpoint` files, and exits 8 on the first bad
//! record. `export` writes NDJSON and a freshly signed checkpoint beside it,
//! which then anchors later verifications.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Subcommand, ValueEnum};
use rusqlite::{Connection, OptionalExtension};
use serde_json::Value;

use super::{Ctx, NotFound};
use crate::audit::checkpoint::{self, Checkpoint};
use crate::audit::log::{self, Record};
use crate::audit::{auditevent, verify};
use crate::{clock, fsutil, keys};

/// Output form of records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// The stored records (seq, id, time, kind, body, prev, hash).
    Records,
    /// FHIR R4 AuditEvents (IHE BALP).
    Fhir,
}

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Recompute the chain and checkpoints; exit 8 on the first bad record.
    Verify {
        /// A checkpoint file written by `audit export` (repeatable).
        #[arg(long = "checkpoint", value_name = "FILE")]
        checkpoints: Vec<PathBuf>,
    },
    /// The newest records.
    Tail {
        /// How many.
        #[arg(short = 'n', long, default_value_t = 20)]
        limit: u32,
        /// Output form (with --json or as text).
        #[arg(long, value_enum, default_value_t = Format::Records)]
        format: Format,
    },
    /// One record, by seq or id.
    Show {
        /// A sequence number or a record id (uuid).
        record: String,
        /// Output form.
        #[arg(long, value_enum, default_value_t = Format::Records)]
        format: Format,
    },
    /// Write records as NDJSON, and a signed checkpoint to FILE.checkpoint.json.
    Export {
        /// Output file.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// First record.
        #[arg(long, default_value_t = 1)]
        from: i64,
        /// Output form.
        #[arg(long, value_enum, default_value_t = Format::Records)]
        format: Format,
    },
}

/// Runs an `audit` subcommand.
pub fn run(ctx: &Ctx, cmd: Cmd) -> Result<()> {
    let conn = ctx.dir.open_audit()?;
    match cmd {
        Cmd::Verify { checkpoints } => {
            let key = keys::read_public(
                &ctx.dir.identity_pub(),
                ctx.config.limits.max_key_file_bytes,
            )?;
            let mut anchors = checkpoint::anchors(&ctx.dir.open_state()?)?;
            for f in &checkpoints {
                let text = fsutil::read_bounded(f, 64 * 1024)?;
                let c: Checkpoint = serde_json::from_slice(&text)
                    .with_context(|| format!("{}: not a checkpoint file", f.display()))?;
                anchors.push((format!("the checkpoint in {}", f.display()), c));
            }
            match verify::verify(&conn, &key, &anchors)? {
                Ok(report) => ctx.out.emit(&report, || {
                    format!(
                        "OK: {} records, chain head {}; {} checkpoints and {} anchors verified",
                        report.records,
                        &report.head[..16.min(report.head.len())],
                        report.checkpoints,
                        report.anchors
                    )
                }),
                Err(t) => Err(t.into()),
            }
        }
        Cmd::Tail { limit, format } => {
            let (head, _, _) = log::head(&conn)?;
            let recs = log::read_range(&conn, (head - i64::from(limit) + 1).max(1), head)?;
            print_records(ctx, &recs, format)
        }
        Cmd::Show { record, format } => {
            let seq: Option<i64> = match record.parse::<i64>() {
                Ok(n) => Some(n),
                Err(_) => conn
                    .query_row("SELECT seq FROM log WHERE id = ?1", [&record], |r| r.get(0))
                    .optional()?,
            };
            let recs = match seq {
                Some(n) => log::read_range(&conn, n, n)?,
                None => Vec::new(),
            };
            let Some(r) = recs.into_iter().next() else {
                return Err(NotFound(format!("no audit record {record}")).into());
            };
            match format {
                Format::Records => ctx.out.emit(&r, || {
                    format!(
                        "seq {}\nid {}\ntime {}\nkind {}\nhash {}\nprev {}\n{}",
                        r.seq, r.id, r.time, r.kind, r.hash, r.prev, r.body
                    )
                }),
                Format::Fhir => {
                    let ev = auditevent::render(&r, &appliance(ctx)?);
                    ctx.out.raw(&serde_json::to_string_pretty(&ev)?)
                }
            }
        }
        Cmd::Export { out, from, format } => export(ctx, &conn, &out, from, format),
    }
}

fn appliance(ctx: &Ctx) -> Result<String> {
    let key = keys::read_public(
        &ctx.dir.identity_pub(),
        ctx.config.limits.max_key_file_bytes,
    )?;
    Ok(keys::KeyId::of(&key).to_string())
}

fn print_records(ctx: &Ctx, recs: &[Record], format: Format) -> Result<()> {
    match format {
        Format::Records => ctx.out.emit(&recs, || {
            recs.iter()
                .map(|r| {
                    format!(
                        "{:>8} {} {:<16} {}",
                        r.seq,
                        r.time,
                        r.kind,
                        summary(&r.body)
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        }),
        Format::Fhir => {
            let id = appliance(ctx)?;
            let evs: Vec<Value> = recs.iter().map(|r| auditevent::render(r, &id)).collect();
            ctx.out.raw(&serde_json::to_string_pretty(&evs)?)
        }
    }
}

/// A one-line gist of a record body.
fn summary(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_default();
    let g = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("");
    let mut parts = Vec::new();
    for k in [
        "action", "plugin", "version", "function", "host_fn", "tenant", "patient", "outcome",
    ] {
        if !g(k).is_empty() {
            parts.push(format!("{k}={}", g(k)));
        }
    }
    let detail = if g("reason").is_empty() {
        g("detail")
    } else {
        g("reason")
    };
    if !detail.is_empty() {
        parts.push(format!("({})", detail.chars().take(80).collect::<String>()));
    }
    parts.join(" ")
}

fn export(ctx: &Ctx, conn: &Connection, out: &PathBuf, from: i64, format: Format) -> Result<()> {
    let limits = &ctx.config.limits;
    let key = keys::read_secret(&ctx.dir.identity_key(), limits.max_key_file_bytes)?;
    // A checkpoint at the current head, signed now.
    let (head, root, _) = log::head(conn)?;
    anyhow::ensure!(head > 0, "the audit log is empty; nothing to export");
    let cp = match checkpoint::at(conn, head)? {
        Some(c) => c,
        None => checkpoint::sign(conn, &key, head, &root, clock::trusted_now(conn)?)?,
    };
    let appliance = keys::KeyId::of(&key.verifying_key()).to_string();
    let tmp = out.with_extension("partial");
    let mut w = std::io::BufWriter::new(
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
    );
    let mut n = 0u64;
    let mut at = from.max(1);
    while at <= head {
        let to = (at + 9_999).min(head);
        for r in log::read_range(conn, at, to)? {
            let line = match format {
                Format::Records => serde_json::to_string(&r)?,
                Format::Fhir => auditevent::render(&r, &appliance).to_string(),
            };
            writeln!(w, "{line}")?;
            n += 1;
        }
        at = to + 1;
    }
    w.flush()?;
    w.into_inner()
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", tmp.display()))?
        .sync_all()?;
    std::fs::rename(&tmp, out).with_context(|| format!("cannot write {}", out.display()))?;
    let cp_path = PathBuf::from(format!("{}.checkpoint.json", out.display()));
    fsutil::write_atomic(
        &cp_path,
        serde_json::to_string_pretty(&cp)?.as_bytes(),
        0o644,
        "audit-export",
    )?;
    checkpoint::store_anchor(&ctx.dir.open_state()?, &cp, "export")?;
    #[derive(serde::Serialize)]
    struct Exported<'a> {
        records: u64,
        file: String,
        checkpoint_file: String,
        checkpoint: &'a Checkpoint,
    }
    let rep = Exported {
        records: n,
        file: out.display().to_string(),
        checkpoint_file: cp_path.display().to_string(),
        checkpoint: &cp,
    };
    ctx.out.emit(&rep, || {
        format!(
            "exported {n} records to {}; signed checkpoint (size {}) in {}",
            rep.file, cp.size, rep.checkpoint_file
        )
    })
}
