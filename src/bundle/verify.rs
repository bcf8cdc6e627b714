//! Bundle verification: the numbered steps of docs/bundle-format.md §5.
//! The only way to obtain a [`VerifiedBundle`].
//!
//! Step 1 (size cap before reading) happens in [`super::read_bundle_file`];
//! steps 2–8 happen here, in order, and each failure names its step. Step 9
//! (the version floor) needs the installed state and runs inside the install
//! transaction (`store::install`), so no other install can race it.
//!
//! Invariants: nothing in the manifest is looked at before at least one
//! signature over it has verified against a known key; the wasm bytes are
//! trusted only through the digest in that signed manifest; a
//! `VerifiedBundle` is immutable and cannot be built anywhere else.

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};
use thiserror::Error;
use time::OffsetDateTime;

use super::container::{self, FrameError};
use super::envelope::{Envelope, EnvelopeError};
use super::manifest::{Manifest, ManifestError, format_time};
use super::trust::TrustPolicy;
use crate::keys::KeyId;
use crate::limits::Limits;

/// Why a bundle was refused. Each variant names the step that refused it.
#[derive(Debug, Error)]
pub enum VerifyError {
    /// Step 1: file over the size cap, or unreadable.
    #[error("step 1 (size)")]
    Read(#[from] crate::fsutil::ReadError),
    /// Step 2: container framing.
    #[error("step 2 (container)")]
    Frame(#[from] FrameError),
    /// Step 3: DSSE envelope.
    #[error("step 3 (envelope)")]
    Envelope(#[from] EnvelopeError),
    /// Step 4: a signature claims a known key but does not verify under it.
    #[error(
        "step 4 (signature): signature {index} claims key {key} but does not verify; \
         the manifest or the signature was altered"
    )]
    BadSignature {
        /// Position in the envelope.
        index: usize,
        /// The key it claims.
        key: String,
    },
    /// Step 4: no signature verifies under any trusted key.
    #[error("step 4 (signature): no signature is by a trusted key (key id hints: {hints})")]
    UntrustedSigner {
        /// The keyid hints the envelope carried.
        hints: String,
    },
    /// Step 5: the signed manifest is invalid.
    #[error("step 5 (manifest)")]
    Manifest(#[from] ManifestError),
    /// Step 6: no namespace delegation covers the plugin.
    #[error("step 6 (trust): no trusted key is delegated a namespace covering {plugin}")]
    NoDelegation {
        /// The plugin name.
        plugin: String,
    },
    /// Step 6: signed by trusted keys, but none delegated this namespace.
    #[error(
        "step 6 (trust): key {key} is trusted only for {allowed}, not for {plugin} (namespace {namespace})"
    )]
    OutsideNamespace {
        /// The signer.
        key: String,
        /// Its namespaces.
        allowed: String,
        /// The plugin.
        plugin: String,
        /// The governing namespace.
        namespace: String,
    },
    /// Step 6: the only signers for this namespace are revoked.
    #[error("step 6 (trust): key {key} was revoked at {at}; its signature no longer counts")]
    Revoked {
        /// The revoked key.
        key: String,
        /// When.
        at: String,
    },
    /// Step 6: too few distinct trusted signers.
    #[error(
        "step 6 (trust): namespace {namespace} needs {need} distinct trusted keys, got {have} \
         ({signatures} signatures; a key counts once)"
    )]
    Threshold {
        /// The governing namespace.
        namespace: String,
        /// Its threshold.
        need: u32,
        /// Distinct counted keys.
        have: usize,
        /// Signatures in the envelope.
        signatures: usize,
    },
    /// Step 7: wasm size differs from the signed manifest.
    #[error("step 7 (wasm): module is {actual} bytes, the signed manifest says {signed}")]
    WasmSize {
        /// Signed size.
        signed: u64,
        /// Actual size.
        actual: u64,
    },
    /// Step 7: wasm digest differs from the signed manifest.
    #[error("step 7 (wasm): module sha256 is {actual}, the signed manifest says {signed}")]
    WasmDigest {
        /// Signed digest.
        signed: String,
        /// Actual digest.
        actual: String,
    },
    /// Step 7: the module does not fit host ABI 1 (imports, exports).
    #[error("step 7 (wasm)")]
    Abi(#[from] crate::runtime::abi::AbiError),
    /// Step 8: expired against the trusted clock.
    #[error("step 8 (expiry): bundle expired at {expires}; trusted time is {now}")]
    Expired {
        /// Its expiry.
        expires: String,
        /// The trusted time.
        now: String,
    },
}

/// A bundle that passed steps 1–8. Fields are private: this type can only
/// be built by [`verify`], so holding one proves the checks ran.
#[derive(Debug, Clone)]
pub struct VerifiedBundle {
    manifest: Manifest,
    manifest_json: Vec<u8>,
    manifest_digest: String,
    bundle_sha256: String,
    signers: Vec<KeyId>,
    bytes: Vec<u8>,
    wasm_range: std::ops::Range<usize>,
}

impl VerifiedBundle {
    /// The validated, signed manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// The signed manifest bytes exactly as signed.
    pub fn manifest_json(&self) -> &[u8] {
        &self.manifest_json
    }
    /// Hex sha256 of the signed manifest: the plugin version's identity.
    pub fn manifest_digest(&self) -> &str {
        &self.manifest_digest
    }
    /// Hex sha256 of the whole `.cbx` file.
    pub fn bundle_sha256(&self) -> &str {
        &self.bundle_sha256
    }
    /// Distinct trusted keys whose signatures counted.
    pub fn signers(&self) -> &[KeyId] {
        &self.signers
    }
    /// The whole bundle file.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// The wasm module, digest-checked.
    pub fn wasm(&self) -> &[u8] {
        &self.bytes[self.wasm_range.clone()]
    }
}

/// Facts learned before a refusal, for the decision record.
#[derive(Debug, Default, Clone)]
pub struct PartialFacts {
    /// sha256 of the file, once read.
    pub bundle_sha256: Option<String>,
    /// Plugin name, once the signed manifest parsed.
    pub plugin: Option<String>,
    /// Version, likewise.
    pub version: Option<String>,
    /// Keys whose signatures verified.
    pub signers: Vec<String>,
}

/// Runs steps 2–8 on a bundle's bytes. `facts` collects what was learned,
/// so a refusal can still be recorded precisely.
pub fn verify(
    bytes: Vec<u8>,
    policy: &TrustPolicy,
    now: OffsetDateTime,
    limits: &Limits,
    facts: &mut PartialFacts,
) -> Result<VerifiedBundle, VerifyError> {
    let bundle_sha256 = hex::encode(Sha256::digest(&bytes));
    facts.bundle_sha256 = Some(bundle_sha256.clone());

    // 2. Container framing: magic, lengths within caps, no trailing bytes.
    let parts = container::parse(&bytes, limits)?;
    let wasm_start = parts.envelope.len() + 20;
    let wasm_range = wasm_start..wasm_start + parts.wasm.len();

    // 3. Envelope: shape, exact payloadType, payload and signature encoding.
    let env = Envelope::parse(parts.envelope, limits)?;

    // 4. Signatures: each must verify (verify_strict over PAE) under some
    //    known key. The keyid hint is used only to explain failures.
    let mut verified: BTreeSet<KeyId> = BTreeSet::new();
    for (index, (hint, _)) in env.signatures.iter().enumerate() {
        match policy.keys.iter().find(|k| env.verifies(index, &k.key)) {
            Some(k) => {
                verified.insert(k.id.clone());
            }
            None => {
                if let Some(k) = policy.keys.iter().find(|k| k.id.as_str() == hint) {
                    return Err(VerifyError::BadSignature {
                        index,
                        key: k.id.to_string(),
                    });
                }
            }
        }
    }
    facts.signers = verified.iter().map(ToString::to_string).collect();
    if verified.is_empty() {
        let hints: Vec<&str> = env.signatures.iter().map(|(h, _)| h.as_str()).collect();
        return Err(VerifyError::UntrustedSigner {
            hints: if hints.iter().all(|h| h.is_empty()) {
                "none".into()
            } else {
                hints.join(", ")
            },
        });
    }

    // 5. Manifest: parse and validate only bytes a known key signed.
    let manifest = Manifest::parse(&env.payload, limits)?;
    facts.plugin = Some(manifest.name.to_string());
    facts.version = Some(manifest.version.to_string());

    // 6. Trust policy: the governing namespace's threshold of distinct,
    //    non-revoked keys delegated that namespace.
    let (namespace, need) =
        policy
            .governing(&manifest.name)
            .ok_or_else(|| VerifyError::NoDelegation {
                plugin: manifest.name.to_string(),
            })?;
    let signers_here: Vec<_> = policy
        .keys
        .iter()
        .filter(|k| verified.contains(&k.id) && k.namespaces.contains(namespace))
        .collect();
    let counted: Vec<KeyId> = signers_here
        .iter()
        .filter(|k| k.revoked_at.is_none())
        .map(|k| k.id.clone())
        .collect();
    if counted.len() < need as usize {
        if let Some(k) = signers_here.iter().find(|k| k.revoked_at.is_some()) {
            return Err(VerifyError::Revoked {
                key: k.id.to_string(),
                at: k.revoked_at.clone().unwrap_or_default(),
            });
        }
        if signers_here.is_empty() {
            // Every verified signer is trusted, but for other namespaces.
            if let Some(k) = policy.keys.iter().find(|k| verified.contains(&k.id)) {
                let allowed: Vec<String> = k.namespaces.iter().map(ToString::to_string).collect();
                return Err(VerifyError::OutsideNamespace {
                    key: k.id.to_string(),
                    allowed: if allowed.is_empty() {
                        "nothing".into()
                    } else {
                        allowed.join(", ")
                    },
                    plugin: manifest.name.to_string(),
                    namespace: namespace.to_string(),
                });
            }
        }
        return Err(VerifyError::Threshold {
            namespace: namespace.to_string(),
            need,
            have: counted.len(),
            signatures: env.signatures.len(),
        });
    }

    // 7. Wasm: size, then sha256, must match the signed manifest.
    let wasm = parts.wasm;
    if wasm.len() as u64 != manifest.wasm_size {
        return Err(VerifyError::WasmSize {
            signed: manifest.wasm_size,
            actual: wasm.len() as u64,
        });
    }
    let actual = hex::encode(Sha256::digest(wasm));
    if actual != manifest.wasm_sha256 {
        return Err(VerifyError::WasmDigest {
            signed: manifest.wasm_sha256.clone(),
            actual,
        });
    }

    // 7 (cont.). The module is valid wasm, imports only host ABI 1 (and
    //    fhir_* only if its scopes allow them), and exports what it lists.
    crate::runtime::abi::check(wasm, &manifest)?;

    // 8. Expiry against the trusted clock (never earlier than any time seen).
    if now >= manifest.expires {
        return Err(VerifyError::Expired {
            expires: format_time(manifest.expires),
            now: format_time(now),
        });
    }

    let manifest_digest = hex::encode(Sha256::digest(&env.payload));
    Ok(VerifiedBundle {
        manifest,
        manifest_json: env.payload,
        manifest_digest,
        bundle_sha256,
        signers: counted,
        bytes,
        wasm_range,
    })
}
