//! `clinicbox sync`: audit records up, FHIR data down.
//!
//! `sync --once` runs one pass and exits (status 1 when upstream could not
//! be reached within the configured attempts); plain `sync` runs a pass
//! every `upstream.interval_secs`, backing off after failures, until
//! stopped. `sync status` shows the backlog, the last success and the last
//! error.

use anyhow::Result;
use clap::{Args as ClapArgs, Subcommand};

use super::Ctx;
use crate::sync::{self, backoff::Backoff, upload};

/// `sync` arguments.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// One pass, then exit.
    #[arg(long)]
    once: bool,
    /// Show the sync state instead.
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

/// `sync` subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Backlog, last success, last error, and whether calls fail closed.
    Status,
}

/// Runs `sync`.
pub fn run(ctx: &Ctx, args: Args) -> Result<()> {
    if let Some(Cmd::Status) = args.cmd {
        let s = upload::status(
            &ctx.dir.open_audit()?,
            ctx.config.upstream.as_ref(),
            &ctx.config.limits,
        )?;
        return ctx.out.emit(&s, || {
            let mut t = format!(
                "upstream: {}\nbacklog: {} records ({} bytes){}\nacknowledged up to record {}\nlast success: {}",
                s.upstream.as_deref().unwrap_or("(none configured)"),
                s.backlog_records,
                s.backlog_bytes,
                s.budget_bytes
                    .map(|b| format!(" of a {b}-byte budget"))
                    .unwrap_or_default(),
                s.acked_seq,
                s.last_success.as_deref().unwrap_or("never"),
            );
            if let Some(e) = &s.last_error {
                t += &format!(
                    "\nlast error ({}, {} failed tries in a row): {e}",
                    s.last_error_time.as_deref().unwrap_or("?"),
                    s.failed_attempts
                );
            }
            if s.fail_closed {
                t += "\nFAIL-CLOSED: calls that return patient data are refused until the backlog syncs";
            }
            t
        });
    }
    if args.once {
        let r = sync::pass(&ctx.dir, &ctx.config)?;
        return ctx.out.emit(&r, || {
            let mut t = format!(
                "uploaded: {} entries in {} batches ({} retries); acknowledged up to record {}, {} pending",
                r.upload.sent, r.upload.batches, r.upload.retries, r.upload.acked_seq, r.upload.backlog
            );
            for p in &r.pull {
                t += &format!(
                    "\npulled {}: {} pages, {} changed, {} rejected; up to {}",
                    p.resource_type,
                    p.pages,
                    p.changed,
                    p.rejected,
                    p.last_updated.as_deref().unwrap_or("-")
                );
            }
            t
        });
    }
    let up = ctx
        .config
        .upstream
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("no [upstream] in the config; nothing to sync with"))?;
    let mut backoff = Backoff::new(up.backoff, up.backoff_max);
    loop {
        match sync::pass(&ctx.dir, &ctx.config) {
            Ok(r) => {
                backoff.reset();
                log::info!(
                    "sync: {} entries sent, acknowledged up to {}, {} pending",
                    r.upload.sent,
                    r.upload.acked_seq,
                    r.upload.backlog
                );
                std::thread::sleep(up.interval);
            }
            Err(e) => {
                let d = backoff.next_delay().max(up.backoff);
                log::warn!("sync failed, next try in {} ms: {e}", d.as_millis());
                std::thread::sleep(d);
            }
        }
    }
}
