//! `clinicbox plugin …`: install, list, roll back, remove, and the history
//! of bundle decisions.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use rusqlite::OptionalExtension;

use super::{Ctx, NotFound};
use crate::bundle::manifest::{Manifest, PluginName, format_time};
use crate::bundle::store;
use crate::runtime::{grants, record};
use crate::scopes::Scope;
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
    /// Grant a plugin SMART v2 scopes for one tenant (a subset of what its
    /// manifest requests).
    Grant {
        /// The tenant (clinic).
        #[arg(long)]
        tenant: String,
        /// `vendor/name`.
        name: String,
        /// Scopes, e.g. `patient/Observation.rs?category=…|vital-signs`.
        #[arg(required = true)]
        scopes: Vec<String>,
    },
    /// Remove every grant of a plugin for one tenant.
    Ungrant {
        /// The tenant.
        #[arg(long)]
        tenant: String,
        /// `vendor/name`.
        name: String,
    },
    /// List grants.
    Grants {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Lift a plugin's quarantine.
    Enable {
        /// `vendor/name`.
        name: String,
    },
    /// Show recent plugin calls (with `--accesses`, their host-function accesses).
    Calls {
        /// How many, newest last.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Include each call's host-function accesses.
        #[arg(long)]
        accesses: bool,
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
        Cmd::Grant {
            tenant,
            name,
            scopes,
        } => {
            let name = plugin_name(&name)?;
            let parsed = scopes
                .iter()
                .map(|s| s.parse::<Scope>())
                .collect::<Result<Vec<_>, _>>()?;
            let mut state = ctx.dir.open_state()?;
            let manifest_json: Option<String> = state
                .query_row(
                    "SELECT v.manifest FROM plugins p JOIN plugin_versions v ON v.digest = p.current WHERE p.name = ?1",
                    [&name],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(manifest_json) = manifest_json else {
                return Err(NotFound(format!("plugin {name} is not installed")).into());
            };
            let manifest = Manifest::parse(manifest_json.as_bytes(), limits)?;
            let now = format_time(crate::clock::trusted_now(&ctx.dir.open_audit()?)?);
            let all = grants::grant(&mut state, &tenant, &name, &manifest, &parsed, &now)?;
            crate::audit::note(
                &ctx.dir,
                "grant",
                &serde_json::json!({"action": "grant", "tenant": tenant, "plugin": name.to_string(), "scopes": scopes}),
            )?;
            ctx.out.emit(&all, || {
                format!("{name} now holds for {tenant}:\n  {}", all.join("\n  "))
            })
        }
        Cmd::Ungrant { tenant, name } => {
            let name = plugin_name(&name)?;
            let n = grants::revoke_all(&ctx.dir.open_state()?, &tenant, &name)?;
            crate::audit::note(
                &ctx.dir,
                "grant",
                &serde_json::json!({"action": "ungrant", "tenant": tenant, "plugin": name.to_string(), "removed": n}),
            )?;
            ctx.out.emit(&serde_json::json!({"removed": n}), || {
                format!("removed {n} grants of {name} for {tenant}")
            })
        }
        Cmd::Grants { tenant } => {
            let rows = grants::list(&ctx.dir.open_state()?, tenant.as_deref())?;
            ctx.out.emit(&rows, || {
                let mut s = String::new();
                for r in &rows {
                    s += &format!("{:<16} {:<24} {}\n", r.tenant, r.plugin, r.scope);
                }
                if s.is_empty() {
                    s = "no grants".into();
                }
                s
            })
        }
        Cmd::Enable { name } => {
            let name = plugin_name(&name)?;
            let lifted = grants::enable(&ctx.dir.open_state()?, &name)?;
            crate::audit::note(
                &ctx.dir,
                "quarantine",
                &serde_json::json!({"action": "enable", "plugin": name.to_string(), "lifted": lifted}),
            )?;
            ctx.out.emit(
                &serde_json::json!({"enabled": name, "was_quarantined": lifted}),
                || {
                    if lifted {
                        format!("{name} re-enabled")
                    } else {
                        format!("{name} was not quarantined")
                    }
                },
            )
        }
        Cmd::Calls { limit, accesses } => {
            let audit = ctx.dir.open_audit()?;
            let calls = record::recent_calls(&audit, limit)?;
            let mut rows = Vec::new();
            for c in calls {
                let acc = if accesses {
                    record::accesses_of(&audit, &c.call_id)?
                } else {
                    Vec::new()
                };
                rows.push(serde_json::json!({"call": c, "accesses": acc}));
            }
            ctx.out.emit(&rows, || {
                let mut s = String::new();
                for r in &rows {
                    let c = &r["call"];
                    s += &format!(
                        "{} {} {} {} {}/{} {} {}us: {}\n",
                        c["time"].as_str().unwrap_or(""),
                        c["plugin"].as_str().unwrap_or(""),
                        c["function"].as_str().unwrap_or(""),
                        c["outcome"].as_str().unwrap_or(""),
                        c["tenant"].as_str().unwrap_or(""),
                        c["patient"].as_str().unwrap_or(""),
                        c["call_id"].as_str().unwrap_or(""),
                        c["duration_us"],
                        c["detail"].as_str().unwrap_or("")
                    );
                    for a in r["accesses"].as_array().into_iter().flatten() {
                        s += &format!(
                            "    {} {} {}: {}\n",
                            a["host_fn"].as_str().unwrap_or(""),
                            a["outcome"].as_str().unwrap_or(""),
                            a["query"].as_str().unwrap_or(""),
                            a["detail"].as_str().unwrap_or("")
                        );
                    }
                }
                s
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
