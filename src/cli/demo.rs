//! `clinicbox demo`: the main job on embedded defaults, for a newcomer.
//!
//! Inits a data dir under `./`, trusts the embedded dev vendor key for the
//! `acme/` namespace, installs the embedded example bundles and lists the
//! installed plugins. Running it again changes nothing (every step is
//! idempotent). The embedded files are the ones in `update-bundles/`.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::Ctx;
use crate::bundle::store;
use crate::bundle::trust::{self, Namespace};
use crate::datadir::DataDir;
use crate::{admin, clock, fsutil, keys};

/// The dev vendor's public key (test only), as in update-bundles/.
pub const DEV_VENDOR_PUB: &str = include_str!("../../update-bundles/dev-vendor.pub");
/// The signed example bundles, as in update-bundles/.
pub const EXAMPLE_BUNDLES: &[(&str, &[u8])] = &[
    (
        "acme-news2.cbx",
        include_bytes!("../../update-bundles/acme-news2.cbx"),
    ),
    (
        "acme-allergy-check.cbx",
        include_bytes!("../../update-bundles/acme-allergy-check.cbx"),
    ),
];

/// `demo` options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Data dir for the demo (created if missing).
    #[arg(long, default_value = "./clinicbox-demo", value_name = "DIR")]
    dir: PathBuf,
}

/// Runs the demo.
pub fn run(ctx: &Ctx, args: Args) -> Result<()> {
    let dir = DataDir::new(&args.dir);
    let init = dir.init()?;
    eprintln!(
        "1/4 data dir {} ready (appliance key {})",
        init.data_dir,
        &init.identity_key_id[..16]
    );

    let vendor = keys::parse_public(DEV_VENDOR_PUB, "update-bundles/dev-vendor.pub (embedded)")?;
    let ns = Namespace::parse("acme/").map_err(anyhow::Error::msg)?;
    let now = clock::trusted_now(&dir.open_audit()?)?;
    let added = trust::add(
        &mut dir.open_state()?,
        &vendor,
        &[ns],
        None,
        "dev vendor (TEST ONLY)",
        now,
    )?;
    eprintln!(
        "2/4 trusted dev vendor key {} for acme/",
        &added.key_id[..16]
    );

    for (file, bytes) in EXAMPLE_BUNDLES {
        let example = args.dir.join(file);
        fsutil::write_atomic(&example, bytes, 0o644, "demo")
            .with_context(|| format!("cannot write {}", example.display()))?;
        let r = admin::install_file(&dir, &example, &ctx.config.limits)?;
        let what = match r.outcome {
            store::InstallOutcome::Installed => "verified and installed",
            store::InstallOutcome::AlreadyInstalled => "already installed, nothing changed",
        };
        eprintln!("3/4 {} {}: {what}", r.plugin, r.version);
    }

    let plugins = store::list(&dir, &dir.open_state()?)?;
    eprintln!("4/4 installed plugins:");
    ctx.out.emit(&plugins, || {
        let mut s = String::new();
        for p in &plugins {
            s += &format!(
                "  {} {}  manifest {}  file {}\n",
                p.name,
                p.version,
                &p.digest[..16],
                p.file
            );
        }
        s += &format!(
            "\nnext: clinicbox --data-dir {} plugin history",
            args.dir.display()
        );
        s
    })
}
