//! `clinicbox init`: create or complete the data dir (idempotent).

use anyhow::Result;

use super::Ctx;

/// Runs `init`.
pub fn run(ctx: &Ctx) -> Result<()> {
    let report = ctx.dir.init()?;
    ctx.out.emit(&report, || {
        format!(
            "{} data dir {}\nappliance identity key {}",
            if report.created_identity {
                "initialised"
            } else {
                "already initialised:"
            },
            report.data_dir,
            report.identity_key_id
        )
    })
}
