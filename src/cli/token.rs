//! `clinicbox token …`: bearer tokens of the local API. Creating and
//! revoking a token is recorded in the audit log; the secret is printed
//! once and stored only as a hash.

use anyhow::Result;
use clap::Subcommand;

use super::Ctx;
use crate::tokens::{self, Role};

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Create a token and print it (the only time it is shown).
    Create {
        /// A unique name, e.g. `ward3-monitor-12` or `frontdesk-app`.
        #[arg(long)]
        name: String,
        /// `device` (ingest vitals), `app` (call plugins, read FHIR) or
        /// `admin` (status, metrics, and what an app may do).
        #[arg(long, value_parser = clap::value_parser!(String))]
        role: String,
        /// The one tenant (clinic) the token acts for.
        #[arg(long)]
        tenant: String,
        /// SMART v2 scopes for FHIR reads and searches (app, admin);
        /// repeatable. An app without scopes reads nothing.
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id or name; it never works again.
    Revoke {
        /// `tok_…` id or the name.
        token: String,
    },
}

/// Runs a `token` subcommand.
pub fn run(ctx: &Ctx, cmd: Cmd) -> Result<()> {
    let state = ctx.dir.open_state()?;
    match cmd {
        Cmd::Create {
            name,
            role,
            tenant,
            scopes,
        } => {
            let role: Role = role.parse().map_err(anyhow::Error::msg)?;
            let scopes = tokens::parse_scopes(&scopes)?;
            let created = tokens::create(&state, &name, role, &tenant, &scopes)?;
            crate::audit::note(
                &ctx.dir,
                "token",
                &serde_json::json!({"action": "create", "id": created.id, "name": name, "role": role, "tenant": tenant,
                    "scopes": scopes.iter().map(ToString::to_string).collect::<Vec<_>>()}),
            )?;
            ctx.out.emit(&created, || {
                format!(
                    "{}\n(token {} for {role} in {tenant}; shown once, store it now)",
                    created.token, created.id
                )
            })
        }
        Cmd::List => {
            let list = tokens::list(&state)?;
            ctx.out.emit(&list, || {
                let mut s = String::new();
                for t in &list {
                    s += &format!(
                        "{:<13} {:<24} {:<6} {:<12} {}{}\n",
                        t.id,
                        t.name,
                        t.role,
                        t.tenant,
                        t.scopes.join(" "),
                        t.revoked_at
                            .as_ref()
                            .map_or(String::new(), |r| format!(" REVOKED {r}"))
                    );
                }
                s
            })
        }
        Cmd::Revoke { token } => {
            let id = tokens::revoke(&state, &token)?;
            crate::audit::note(
                &ctx.dir,
                "token",
                &serde_json::json!({"action": "revoke", "id": id}),
            )?;
            ctx.out.emit(&serde_json::json!({"revoked": id}), || {
                format!("revoked {id}")
            })
        }
    }
}
