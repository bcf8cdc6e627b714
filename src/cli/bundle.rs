//! `clinicbox bundle …`: vendor tooling to pack, sign, verify and inspect.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde::Serialize;
use time::{Duration, OffsetDateTime};

use super::Ctx;
use crate::bundle::manifest::{ManifestSource, format_time, parse_time};
use crate::bundle::trust::TrustPolicy;
use crate::bundle::verify::{self, PartialFacts};
use crate::{bundle, clock, fsutil, keys};

/// `bundle` subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Make an unsigned bundle from a manifest source (plugin.toml) and a module.
    Pack {
        /// The vendor manifest (TOML): name, version, abi, exports, scopes, limits.
        #[arg(long, value_name = "plugin.toml")]
        manifest: PathBuf,
        /// The WebAssembly module.
        #[arg(long, value_name = "FILE.wasm")]
        wasm: PathBuf,
        /// Where to write the bundle.
        #[arg(long, value_name = "FILE.cbx")]
        out: PathBuf,
        /// Creation time (RFC 3339). Default: $SOURCE_DATE_EPOCH if set, else now.
        #[arg(long, value_name = "TIME")]
        created: Option<String>,
        /// Expiry time (RFC 3339). Default: created + --valid-days.
        #[arg(long, value_name = "TIME", conflicts_with = "valid_days")]
        expires: Option<String>,
        /// Validity in days when --expires is not given.
        #[arg(long, default_value_t = 365, value_name = "DAYS")]
        valid_days: u32,
    },
    /// Add a signature to a bundle (in place, atomically, unless --out).
    Sign {
        /// The signer's secret key file.
        #[arg(long, value_name = "K.key")]
        key: PathBuf,
        /// Write the signed bundle here instead of replacing FILE.
        #[arg(long, value_name = "FILE.cbx")]
        out: Option<PathBuf>,
        /// The bundle.
        file: PathBuf,
    },
    /// Verify a bundle against the trust store, or against the given keys.
    Verify {
        /// Trust exactly these public keys (any namespace, threshold 1)
        /// instead of the data dir's trust store.
        #[arg(long = "pub", value_name = "K.pub")]
        pubs: Vec<PathBuf>,
        /// The bundle.
        file: PathBuf,
    },
    /// Show a bundle's manifest, digests and signers, WITHOUT verifying it.
    Inspect {
        /// The bundle.
        file: PathBuf,
    },
    /// Write the signed index of an update channel over bundle files, for
    /// publishing with the bundles on any static HTTPS server.
    Index {
        /// The signer's secret key file (trusted by the boxes for every
        /// listed bundle's namespace).
        #[arg(long, value_name = "K.key")]
        key: PathBuf,
        /// Index version: must grow with every publication; boxes refuse
        /// a lower one (rollback).
        #[arg(long = "index-version", value_name = "N")]
        index_version: u64,
        /// Hours until the index expires; boxes refuse it after that
        /// (freeze), so republish well before.
        #[arg(long, default_value_t = 168, value_name = "HOURS")]
        valid_hours: u32,
        /// Where to write the index (publish it as `index.json` beside the
        /// bundles).
        #[arg(long, value_name = "index.json")]
        out: PathBuf,
        /// The bundles (published under their file names).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Serialize)]
struct Verified<'a> {
    verified: bool,
    plugin: String,
    version: String,
    manifest_sha256: &'a str,
    bundle_sha256: &'a str,
    wasm_sha256: &'a str,
    signers: Vec<String>,
    expires: String,
    checked_at: String,
}

/// Runs a `bundle` subcommand.
pub fn run(ctx: &Ctx, cmd: Cmd) -> Result<()> {
    let limits = &ctx.config.limits;
    match cmd {
        Cmd::Pack {
            manifest,
            wasm,
            out,
            created,
            expires,
            valid_days,
        } => {
            let src_bytes = fsutil::read_bounded(&manifest, limits.max_manifest_source_bytes)?;
            let text = std::str::from_utf8(&src_bytes)
                .with_context(|| format!("{} is not UTF-8", manifest.display()))?;
            let source = ManifestSource::parse(text, &manifest.display().to_string())?;
            let module = fsutil::read_bounded(&wasm, limits.max_wasm_bytes)?;
            let created = match created {
                Some(t) => parse_time(&t)
                    .map_err(anyhow::Error::msg)
                    .context("--created")?,
                None => match std::env::var("SOURCE_DATE_EPOCH") {
                    Ok(s) => {
                        let secs: i64 = s
                            .trim()
                            .parse()
                            .context("SOURCE_DATE_EPOCH is not an integer")?;
                        OffsetDateTime::from_unix_timestamp(secs)
                            .context("SOURCE_DATE_EPOCH out of range")?
                    }
                    Err(_) => clock::system_now()?,
                },
            };
            let expires = match expires {
                Some(t) => parse_time(&t)
                    .map_err(anyhow::Error::msg)
                    .context("--expires")?,
                None => created + Duration::days(valid_days.into()),
            };
            let (m, bytes) = bundle::pack(source, &module, created, expires, limits)
                .with_context(|| format!("cannot pack {}", manifest.display()))?;
            fsutil::write_atomic(&out, &bytes, 0o644, "pack")
                .with_context(|| format!("cannot write {}", out.display()))?;
            let raw = m.to_raw();
            ctx.out.emit(&raw, || {
                format!(
                    "packed {} {} into {} (unsigned; sign it with `clinicbox bundle sign`)\nwasm sha256 {}",
                    raw.name,
                    raw.version,
                    out.display(),
                    raw.wasm.sha256
                )
            })
        }
        Cmd::Sign { key, out, file } => {
            let signing = keys::read_secret(&key, limits.max_key_file_bytes)?;
            let bytes = bundle::read_bundle_file(&file, limits)?;
            let signed = bundle::sign(&bytes, &signing, limits)
                .with_context(|| format!("cannot sign {}", file.display()))?;
            let dest = out.unwrap_or_else(|| file.clone());
            fsutil::write_atomic(&dest, &signed, 0o644, "sign")
                .with_context(|| format!("cannot write {}", dest.display()))?;
            let id = keys::KeyId::of(&signing.verifying_key()).to_string();
            ctx.out.emit(
                &serde_json::json!({"signed": dest.display().to_string(), "key_id": id}),
                || format!("signed {} with key {id}", dest.display()),
            )
        }
        Cmd::Verify { pubs, file } => {
            let (policy, now) = if pubs.is_empty() {
                let state = ctx.dir.open_state()?;
                let audit = ctx.dir.open_audit()?;
                (TrustPolicy::load(&state)?, clock::trusted_now(&audit)?)
            } else {
                let keys = pubs
                    .iter()
                    .map(|p| keys::read_public(p, limits.max_key_file_bytes))
                    .collect::<Result<Vec<_>, _>>()?;
                (TrustPolicy::only(&keys), clock::system_now()?)
            };
            let bytes = bundle::read_bundle_file(&file, limits)?;
            let v = verify::verify(bytes, &policy, now, limits, &mut PartialFacts::default())
                .with_context(|| format!("{} refused", file.display()))?;
            let m = v.manifest();
            let report = Verified {
                verified: true,
                plugin: m.name.to_string(),
                version: m.version.to_string(),
                manifest_sha256: v.manifest_digest(),
                bundle_sha256: v.bundle_sha256(),
                wasm_sha256: &m.wasm_sha256,
                signers: v.signers().iter().map(ToString::to_string).collect(),
                expires: format_time(m.expires),
                checked_at: format_time(now),
            };
            ctx.out.emit(&report, || {
                format!(
                    "OK {} {}: signed by {} (steps 1-8 passed; the version floor is checked at install)",
                    report.plugin,
                    report.version,
                    report.signers.join(", ")
                )
            })
        }
        Cmd::Index {
            key,
            index_version,
            valid_hours,
            out,
            files,
        } => {
            let key = keys::read_secret(&key, limits.max_key_file_bytes)?;
            let expires = clock::system_now()? + Duration::hours(valid_hours.into());
            let paths: Vec<&std::path::Path> = files.iter().map(PathBuf::as_path).collect();
            let bytes = crate::update::build_index(&paths, index_version, expires, &key, limits)?;
            fsutil::write_atomic(&out, &bytes, 0o644, "index")
                .with_context(|| format!("cannot write {}", out.display()))?;
            ctx.out.emit(
                &serde_json::json!({"index": out, "version": index_version, "expires": format_time(expires), "bundles": files.len()}),
                || {
                    format!(
                        "wrote {} (version {index_version}, {} bundles, expires {})",
                        out.display(),
                        files.len(),
                        format_time(expires)
                    )
                },
            )
        }
        Cmd::Inspect { file } => {
            let bytes = bundle::read_bundle_file(&file, limits)?;
            let i = bundle::inspect(&bytes, limits)
                .with_context(|| format!("{} is malformed", file.display()))?;
            ctx.out.emit(&i, || {
                let mut s = format!(
                    "UNVERIFIED view of {} ({} bytes, sha256 {})\n",
                    file.display(),
                    i.bundle_size,
                    i.bundle_sha256
                );
                s += &format!("payloadType   {}\n", i.payload_type);
                s += &format!("manifest      sha256 {}\n", i.manifest_sha256);
                s += &format!("wasm          {} bytes, sha256 {}\n", i.wasm_size, i.wasm_sha256);
                if i.signer_hints.is_empty() {
                    s += "signatures    none (unsigned)\n";
                }
                for (n, h) in i.signer_hints.iter().enumerate() {
                    s += &format!("signature {n}   keyid hint {h}\n");
                }
                match (&i.manifest, &i.manifest_error) {
                    (Some(m), _) => {
                        s += &format!("name          {}\nversion       {}\nabi           {}\n", m.name, m.version, m.abi);
                        s += &format!("exports       {}\n", m.exports.join(", "));
                        s += &format!("scopes        {}\n", m.scopes.join(" "));
                        s += &format!(
                            "limits        memory {} MiB, timeout {} ms\n",
                            m.limits.memory_mib, m.limits.timeout_ms
                        );
                        s += &format!("created       {}\nexpires       {}\n", m.created, m.expires);
                        if m.wasm.sha256 != i.wasm_sha256 {
                            s += "WARNING       the manifest's wasm digest does not match the module\n";
                        }
                    }
                    (None, Some(e)) => s += &format!("manifest      does not parse: {e}\n"),
                    (None, None) => {}
                }
                s
            })
        }
    }
}
