//! `clinicbox trust …`: delegate plugin namespaces to vendor keys.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use serde::Serialize;

use super::Ctx;
use crate::bundle::trust::{self, Namespace, TrustPolicy};
use crate::{clock, keys};

/// `trust` subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Trust a vendor public key for one or more namespaces.
    Add {
        /// Namespace the key may sign: `vendor/` (or `vendor/*`) for a whole
        /// vendor, `vendor/name` for one plugin. Repeatable.
        #[arg(long = "namespace", required = true, value_name = "NS")]
        namespaces: Vec<String>,
        /// Distinct trusted keys required for these namespaces.
        #[arg(long, value_name = "N")]
        threshold: Option<u32>,
        /// A label for the key (default: the .pub file's name).
        #[arg(long)]
        comment: Option<String>,
        /// The vendor's public key file.
        key: PathBuf,
    },
    /// List trusted (and revoked) keys with their namespaces.
    List,
    /// Revoke a key permanently (give at least 8 hex digits of its id).
    Revoke {
        /// The key id or a unique prefix of it.
        key_id: String,
    },
}

#[derive(Serialize)]
struct KeyRow {
    key_id: String,
    comment: String,
    namespaces: Vec<String>,
    added_at: String,
    revoked_at: Option<String>,
}

#[derive(Serialize)]
struct Listing {
    keys: Vec<KeyRow>,
    thresholds: std::collections::BTreeMap<String, u32>,
}

/// Runs a `trust` subcommand.
pub fn run(ctx: &Ctx, cmd: Cmd) -> Result<()> {
    let limits = &ctx.config.limits;
    match cmd {
        Cmd::Add {
            namespaces,
            threshold,
            comment,
            key,
        } => {
            let namespaces = namespaces
                .iter()
                .map(|n| Namespace::parse(n).map_err(|e| anyhow::anyhow!("--namespace: {e}")))
                .collect::<Result<Vec<_>>>()?;
            if let Some(t) = threshold {
                anyhow::ensure!(
                    (1..=limits.max_threshold).contains(&t),
                    "--threshold {t} is outside 1..={}",
                    limits.max_threshold
                );
            }
            let vk = keys::read_public(&key, limits.max_key_file_bytes)?;
            let mut state = ctx.dir.open_state()?;
            let now = clock::trusted_now(&ctx.dir.open_audit()?)?;
            let comment = comment.unwrap_or_else(|| {
                key.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
            let r = trust::add(&mut state, &vk, &namespaces, threshold, &comment, now)?;
            crate::audit::note(
                &ctx.dir,
                "trust",
                &serde_json::json!({"action": "add", "key_id": r.key_id, "comment": comment, "thresholds": r.thresholds}),
            )?;
            ctx.out.emit(&r, || {
                let t: Vec<String> = r
                    .thresholds
                    .iter()
                    .map(|(n, t)| format!("{n} (threshold {t})"))
                    .collect();
                format!("trusted key {} for {}", r.key_id, t.join(", "))
            })
        }
        Cmd::List => {
            let state = ctx.dir.open_state()?;
            let policy = TrustPolicy::load(&state)?;
            let listing = Listing {
                keys: policy
                    .keys
                    .iter()
                    .map(|k| KeyRow {
                        key_id: k.id.to_string(),
                        comment: k.comment.clone(),
                        namespaces: k.namespaces.iter().map(ToString::to_string).collect(),
                        added_at: k.added_at.clone(),
                        revoked_at: k.revoked_at.clone(),
                    })
                    .collect(),
                thresholds: policy
                    .thresholds
                    .iter()
                    .map(|(n, t)| (n.to_string(), *t))
                    .collect(),
            };
            ctx.out.emit(&listing, || {
                if listing.keys.is_empty() {
                    return "no trusted keys; add one with `clinicbox trust add --namespace VENDOR/ KEY.pub`".into();
                }
                let mut s = format!("{:<18} {:<9} {:<24} {}\n", "KEY", "STATUS", "NAMESPACES", "COMMENT");
                for k in &listing.keys {
                    let ns: Vec<String> = k
                        .namespaces
                        .iter()
                        .map(|n| format!("{n}(t={})", listing.thresholds.get(n).copied().unwrap_or(1)))
                        .collect();
                    s += &format!(
                        "{:<18} {:<9} {:<24} {}\n",
                        &k.key_id[..16],
                        if k.revoked_at.is_some() { "revoked" } else { "trusted" },
                        ns.join(","),
                        k.comment
                    );
                }
                s
            })
        }
        Cmd::Revoke { key_id } => {
            let mut state = ctx.dir.open_state()?;
            let now = clock::trusted_now(&ctx.dir.open_audit()?)?;
            let id = trust::revoke(&mut state, &key_id, now)?;
            crate::audit::note(
                &ctx.dir,
                "trust",
                &serde_json::json!({"action": "revoke", "key_id": id.to_string()}),
            )?;
            ctx.out
                .emit(&serde_json::json!({"revoked": id.to_string()}), || {
                    format!("revoked key {id}; its signatures no longer count")
                })
        }
    }
}
