//! `clinicbox run` (the daemon, see [`crate::daemon`]) and `clinicbox
//! update` (one poll of the vendor update channel).

use std::path::PathBuf;

use anyhow::{Result, bail};

use super::Ctx;
use crate::config::Config;

/// Runs the daemon until SIGTERM. SIGHUP re-reads `config_path` (or the
/// default path) with the same rules as at start. `cache_dir` (from
/// `--cache-dir` or `CLINICBOX_CACHE_DIR`) overrides the file's, at start
/// and on every reload, so a reload never reports the file's as waiting.
pub fn run(ctx: &Ctx, config_path: Option<PathBuf>, cache_dir: Option<PathBuf>) -> Result<()> {
    let forced = move |mut c: Config| {
        if let Some(d) = &cache_dir {
            c.cache_dir = Some(d.clone());
        }
        c
    };
    let start = forced(ctx.config.clone());
    let reload = Box::new(move || Ok(forced(Config::load(config_path.as_deref())?)));
    crate::daemon::run(ctx.dir.clone(), start, reload, |url| {
        eprintln!("clinicbox: serving on {url}");
    })
}

/// Polls the update channel once and prints what it did.
pub fn update(ctx: &Ctx) -> Result<()> {
    let Some(up) = &ctx.config.updates else {
        bail!("no [updates] in the config; nothing to poll");
    };
    let report = crate::update::poll_once(&ctx.dir, up, &ctx.config.limits)?;
    ctx.out.emit(&report, || {
        let mut s = format!(
            "index version {} accepted; {} installed\n",
            report.index_version.unwrap_or(0),
            report.installed
        );
        for b in &report.bundles {
            s += &format!("  {}: {}\n", b.file, b.result);
        }
        s
    })?;
    let refused: Vec<String> = report
        .refused()
        .map(|(file, reason)| format!("{file}: refused: {reason}"))
        .collect();
    if !refused.is_empty() {
        bail!(
            "{} bundles were refused: {}",
            refused.len(),
            refused.join("; ")
        );
    }
    Ok(())
}
