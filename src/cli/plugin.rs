//! `clinicbox plugin …`: install, list, roll back, remove, and the history
//! of bundle decisions.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use super::Ctx;
use crate::bundle::manifest::PluginName;
use crate::bundle::store;
use crate::{admin, audit};

/// `plugin` subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Verify a bundle and install it (keeps the previous version).
    Install {
        /// The `.cbx` bundle.
        file: PathBuf,
    },
    /// List installed plugins.
    List,
    /// Remove a plugin and its kept previous version (its version floor stays).
    Remove {
        /// `vendor/name`.
        name: String,
    },
    /// Switch a plugin back to its kept previous version.
    Rollback {
        /// `vendor/name`.
        name: String,
    },
    /// Show recent bundle decisions (accepted and refused).
    History {
        /// How many, newest last.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

fn plugin_name(s: &str) -> Result<String> {
    PluginName::parse(s)
        .map(|n| n.to_string())
        .map_err(|e| anyhow::anyhow!("plugin name {s:?} {e}"))
}

/// Runs a `plugin` subcommand.
pub fn run(ctx: &Ctx, cmd: Cmd) -> Result<()> {
    let limits = &ctx.config.limits;
    match cmd {
        Cmd::Install { file } => {
            let r = admin::install_file(&ctx.dir, &file, limits)?;
            ctx.out.emit(&r, || match r.outcome {
                store::InstallOutcome::Installed => format!(
                    "installed {} {} (manifest {}), signed by {}",
                    r.plugin,
                    r.version,
                    &r.digest[..16],
                    r.signers
                        .iter()
                        .map(|s| &s[..16])
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                store::InstallOutcome::AlreadyInstalled => {
                    format!(
                        "{} {} is already installed; nothing changed",
                        r.plugin, r.version
                    )
                }
            })
        }
        Cmd::List => {
            let state = ctx.dir.open_state()?;
            let plugins = store::list(&ctx.dir, &state)?;
            ctx.out.emit(&plugins, || {
                if plugins.is_empty() {
                    return "no plugins installed".into();
                }
                let mut s = format!(
                    "{:<28} {:<12} {:<12} {}\n",
                    "PLUGIN", "VERSION", "PREVIOUS", "MANIFEST"
                );
                for p in &plugins {
                    s += &format!(
                        "{:<28} {:<12} {:<12} {}\n",
                        p.name,
                        p.version,
                        p.previous_version.as_deref().unwrap_or("-"),
                        &p.digest[..16]
                    );
                }
                s
            })
        }
        Cmd::Remove { name } => {
            let name = plugin_name(&name)?;
            let v = admin::remove(&ctx.dir, &name)?;
            ctx.out
                .emit(&serde_json::json!({"removed": name, "version": v}), || {
                    format!("removed {name} {v}; its version floor stays")
                })
        }
        Cmd::Rollback { name } => {
            let name = plugin_name(&name)?;
            let r = admin::rollback(&ctx.dir, &name, limits)?;
            ctx.out.emit(&r, || {
                format!("rolled {} back from {} to {}", r.plugin, r.from, r.to)
            })
        }
        Cmd::History { limit } => {
            let decisions = audit::recent(&ctx.dir.open_audit()?, limit)?;
            ctx.out.emit(&decisions, || {
                let mut s = String::new();
                for d in &decisions {
                    s += &format!(
                        "#{} {} {} {} {} {}: {}\n",
                        d.seq,
                        d.time,
                        d.action,
                        d.outcome,
                        d.plugin.as_deref().unwrap_or("?"),
                        d.version.as_deref().unwrap_or(""),
                        d.reason
                    );
                }
                if s.is_empty() {
                    s = "no decisions recorded yet".into();
                }
                s
            })
        }
    }
}
