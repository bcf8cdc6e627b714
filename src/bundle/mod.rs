//! Signed plugin bundles (`.cbx`): the format, vendor tooling (pack, sign,
//! inspect), verification and the installed store.
//!
//! The format is specified byte by byte in `docs/bundle-format.md`; the
//! step numbers in comments and errors refer to its §5.

pub mod container;
pub mod envelope;
pub mod manifest;
pub mod store;
pub mod trust;
pub mod verify;

use std::path::Path;

use anyhow::{Context, Result};
use ed25519_dalek::SigningKey;
use serde::Serialize;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::fsutil;
use crate::limits::Limits;
use envelope::Envelope;
use manifest::{Manifest, ManifestSource, RawManifest, RawWasm, format_time};
pub use verify::{VerifiedBundle, VerifyError};

/// Step 1: reads a bundle file, refusing it from its metadata alone if it is
/// over `limits.max_bundle_bytes`, and never reading past the cap.
pub fn read_bundle_file(path: &Path, limits: &Limits) -> Result<Vec<u8>, VerifyError> {
    Ok(fsutil::read_bounded(path, limits.max_bundle_bytes)?)
}

/// Builds an unsigned bundle from a vendor manifest source and a module.
pub fn pack(
    source: ManifestSource,
    wasm: &[u8],
    created: OffsetDateTime,
    expires: OffsetDateTime,
    limits: &Limits,
) -> Result<(Manifest, Vec<u8>)> {
    anyhow::ensure!(
        wasm.starts_with(b"\0asm"),
        "the module does not start with the WebAssembly magic bytes"
    );
    let raw = RawManifest {
        name: source.name,
        version: source.version,
        abi: source.abi,
        wasm: RawWasm {
            sha256: hex::encode(Sha256::digest(wasm)),
            size: wasm.len() as u64,
        },
        exports: source.exports,
        scopes: source.scopes,
        limits: source.limits,
        created: format_time(created),
        expires: format_time(expires),
        description: source.description,
        subscriptions: source.subscriptions,
    };
    let manifest = Manifest::from_raw(raw, limits)?;
    let env = Envelope::unsigned(&manifest.to_json());
    Ok((manifest.clone(), container::build(&env.to_bytes(), wasm)))
}

/// Adds a signature by `key` to bundle bytes. The bundle's framing and
/// envelope are checked, but not its existing signatures.
pub fn sign(bytes: &[u8], key: &SigningKey, limits: &Limits) -> Result<Vec<u8>> {
    let parts = container::parse(bytes, limits).context("cannot sign: step 2 (container)")?;
    let mut env: Envelope = serde_json::from_slice(parts.envelope)
        .context("cannot sign: step 3 (envelope): malformed DSSE envelope")?;
    anyhow::ensure!(
        env.payload_type == envelope::PAYLOAD_TYPE,
        "cannot sign: wrong payloadType {:?}",
        env.payload_type
    );
    anyhow::ensure!(
        env.signatures.len() < limits.max_signatures,
        "cannot sign: the bundle already has {} signatures, the most accepted",
        env.signatures.len()
    );
    env.sign(key)?;
    Ok(container::build(&env.to_bytes(), parts.wasm))
}

/// What `bundle inspect` shows. Nothing here is verified.
#[derive(Debug, Serialize)]
pub struct Inspection {
    /// Always false: inspect checks framing only.
    pub verified: bool,
    /// sha256 of the file.
    pub bundle_sha256: String,
    /// File size.
    pub bundle_size: u64,
    /// sha256 of the manifest payload.
    pub manifest_sha256: String,
    /// sha256 of the wasm module as present.
    pub wasm_sha256: String,
    /// Size of the wasm module as present.
    pub wasm_size: u64,
    /// The DSSE payloadType.
    pub payload_type: String,
    /// keyid hints of the signatures, in order.
    pub signer_hints: Vec<String>,
    /// The manifest as written, if it parses.
    pub manifest: Option<RawManifest>,
    /// Why the manifest does not parse, if it does not.
    pub manifest_error: Option<String>,
}

/// Reads a bundle's parts without verifying anything (for humans).
pub fn inspect(bytes: &[u8], limits: &Limits) -> Result<Inspection> {
    let parts = container::parse(bytes, limits).context("step 2 (container)")?;
    let env: Envelope = serde_json::from_slice(parts.envelope)
        .context("step 3 (envelope): malformed DSSE envelope")?;
    use base64::Engine as _;
    let payload = base64::engine::general_purpose::STANDARD
        .decode(&env.payload)
        .context("step 3 (envelope): payload is not base64")?;
    let (manifest, manifest_error) = match serde_json::from_slice::<RawManifest>(&payload) {
        Ok(m) => (Some(m), None),
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(Inspection {
        verified: false,
        bundle_sha256: hex::encode(Sha256::digest(bytes)),
        bundle_size: bytes.len() as u64,
        manifest_sha256: hex::encode(Sha256::digest(&payload)),
        wasm_sha256: hex::encode(Sha256::digest(parts.wasm)),
        wasm_size: parts.wasm.len() as u64,
        payload_type: env.payload_type,
        signer_hints: env.signatures.into_iter().map(|s| s.keyid).collect(),
        manifest,
        manifest_error,
    })
}
