//! `clinicbox key …`: vendor signing keys.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde::Serialize;

use super::Ctx;
use crate::keys::{self, KeyId};

/// `key` subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Generate a new ed25519 key pair: NAME.key (mode 0600) and NAME.pub.
    Generate {
        /// Path prefix of the files to write; neither may exist yet.
        #[arg(long, value_name = "NAME")]
        out: PathBuf,
        /// A label stored in both files.
        #[arg(long, default_value = "")]
        comment: String,
    },
}

#[derive(Serialize)]
struct Generated {
    key_id: String,
    secret_key: String,
    public_key: String,
}

/// Runs a `key` subcommand.
pub fn run(ctx: &Ctx, cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Generate { out, comment } => {
            let secret = with_ext(&out, "key");
            let public = with_ext(&out, "pub");
            for p in [&secret, &public] {
                anyhow::ensure!(
                    !p.exists(),
                    "{} already exists; refusing to overwrite a key",
                    p.display()
                );
            }
            let key = keys::generate()?;
            keys::write_pair(&key, &secret, &public, &comment, &[])
                .with_context(|| format!("cannot write the key pair {}", out.display()))?;
            let g = Generated {
                key_id: KeyId::of(&key.verifying_key()).to_string(),
                secret_key: secret.display().to_string(),
                public_key: public.display().to_string(),
            };
            ctx.out.emit(&g, || {
                format!(
                    "wrote {} (secret, mode 0600) and {}\nkey id {}",
                    g.secret_key, g.public_key, g.key_id
                )
            })
        }
    }
}

fn with_ext(prefix: &std::path::Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}
