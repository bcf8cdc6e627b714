//! The DSSE envelope that carries and signs a bundle's manifest
//! (docs/bundle-format.md §2, steps 3–4).
//!
//! ```json
//! {"payloadType": "application/vnd.clinicbox.manifest.v1+json",
//!  "payload": "<base64 manifest JSON>",
//!  "signatures": [{"keyid": "<hex sha256 of the public key>", "sig": "<base64>"}]}
//! ```
//!
//! Each signature is ed25519 over `PAE(payloadType, payload)`:
//! `"DSSEv1" SP len(type) SP type SP len(body) SP body`, lengths as ASCII
//! decimal byte counts. Verification uses `verify_strict` (no malleable or
//! small-order signatures). Invariants: the `keyid` is a hint only and never
//! selects trust; unknown envelope fields are refused; a signature counts
//! only if it verifies against the key that is credited with it.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::keys::KeyId;
use crate::limits::Limits;

/// The only payloadType clinicbox accepts.
pub const PAYLOAD_TYPE: &str = "application/vnd.clinicbox.manifest.v1+json";

/// A DSSE envelope as stored in the bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Envelope {
    /// Must equal [`PAYLOAD_TYPE`].
    pub payload_type: String,
    /// base64 of the manifest JSON bytes.
    pub payload: String,
    /// Signatures over PAE(payloadType, payload).
    pub signatures: Vec<EnvelopeSignature>,
}

/// One signature in an envelope.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EnvelopeSignature {
    /// Hint: hex SHA-256 of the signer's public key. Never trusted.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub keyid: String,
    /// base64 of the 64-byte ed25519 signature.
    pub sig: String,
}

/// Why an envelope was refused (step 3).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Not valid JSON of the envelope shape.
    #[error("malformed DSSE envelope: {0}")]
    Malformed(String),
    /// payloadType is not ours.
    #[error("wrong DSSE payloadType {found:?}, expected {expected:?}")]
    WrongPayloadType {
        /// What the envelope says.
        found: String,
        /// What was expected.
        expected: &'static str,
    },
    /// payload is not base64.
    #[error("DSSE payload is not valid base64: {0}")]
    PayloadEncoding(String),
    /// The decoded payload is too big.
    #[error("manifest is {size} bytes, over the limit of {cap} bytes")]
    PayloadTooLarge {
        /// Decoded size.
        size: usize,
        /// Cap.
        cap: usize,
    },
    /// No signatures, or too many.
    #[error("envelope has {count} signatures; between 1 and {max} are accepted")]
    SignatureCount {
        /// Signatures present.
        count: usize,
        /// The cap.
        max: usize,
    },
    /// `bundle sign` with a key that already signed this envelope.
    #[error("key {0} has already signed this bundle; a key counts only once")]
    AlreadySigned(String),
    /// A signature is not 64 base64-encoded bytes.
    #[error("signature {index} is malformed: {reason}")]
    SignatureEncoding {
        /// Its position in `signatures`.
        index: usize,
        /// Why.
        reason: String,
    },
}

/// An envelope whose framing is valid, with its payload decoded and its
/// signatures parsed. The signatures are NOT yet checked against any key.
#[derive(Debug, Clone)]
pub struct ParsedEnvelope {
    /// The payloadType that was checked (and is signed over).
    pub payload_type: &'static str,
    /// The raw payload bytes (the manifest JSON), exactly as signed.
    pub payload: Vec<u8>,
    /// (keyid hint, signature) in envelope order.
    pub signatures: Vec<(String, Signature)>,
}

/// Pre-Authentication Encoding (DSSE v1).
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload_type.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

impl Envelope {
    /// A new, unsigned envelope around `payload`.
    pub fn unsigned(payload: &[u8]) -> Envelope {
        Envelope::unsigned_as(PAYLOAD_TYPE, payload)
    }

    /// A new, unsigned envelope of another payloadType (the update
    /// channel's index).
    pub fn unsigned_as(payload_type: &str, payload: &[u8]) -> Envelope {
        Envelope {
            payload_type: payload_type.to_owned(),
            payload: B64.encode(payload),
            signatures: Vec::new(),
        }
    }

    /// Parses envelope JSON (step 3): shape, payloadType, payload, sizes.
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<ParsedEnvelope, EnvelopeError> {
        Envelope::parse_as(bytes, PAYLOAD_TYPE, limits.max_manifest_bytes, limits)
    }

    /// Parses an envelope that must have `payload_type`, with a payload of
    /// at most `max_payload` bytes.
    pub fn parse_as(
        bytes: &[u8],
        payload_type: &'static str,
        max_payload: usize,
        limits: &Limits,
    ) -> Result<ParsedEnvelope, EnvelopeError> {
        let env: Envelope =
            serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        env.check(payload_type, max_payload, limits)
    }

    fn check(
        &self,
        payload_type: &'static str,
        max_payload: usize,
        limits: &Limits,
    ) -> Result<ParsedEnvelope, EnvelopeError> {
        if self.payload_type != payload_type {
            return Err(EnvelopeError::WrongPayloadType {
                found: self.payload_type.clone(),
                expected: payload_type,
            });
        }
        // base64 expands 3 bytes to 4: refuse before decoding what cannot fit.
        if self.payload.len() / 4 * 3 > max_payload + 3 {
            return Err(EnvelopeError::PayloadTooLarge {
                size: self.payload.len() / 4 * 3,
                cap: max_payload,
            });
        }
        let payload = B64
            .decode(&self.payload)
            .map_err(|e| EnvelopeError::PayloadEncoding(e.to_string()))?;
        if payload.len() > max_payload {
            return Err(EnvelopeError::PayloadTooLarge {
                size: payload.len(),
                cap: max_payload,
            });
        }
        let count = self.signatures.len();
        if count == 0 || count > limits.max_signatures {
            return Err(EnvelopeError::SignatureCount {
                count,
                max: limits.max_signatures,
            });
        }
        let mut signatures = Vec::with_capacity(count);
        for (index, s) in self.signatures.iter().enumerate() {
            let raw = B64
                .decode(&s.sig)
                .map_err(|e| EnvelopeError::SignatureEncoding {
                    index,
                    reason: format!("not base64: {e}"),
                })?;
            let bytes: [u8; 64] =
                raw.try_into()
                    .map_err(|v: Vec<u8>| EnvelopeError::SignatureEncoding {
                        index,
                        reason: format!("{} bytes, expected 64", v.len()),
                    })?;
            signatures.push((s.keyid.clone(), Signature::from_bytes(&bytes)));
        }
        Ok(ParsedEnvelope {
            payload_type,
            payload,
            signatures,
        })
    }

    /// Adds a signature by `key` over the payload. Signing the same payload
    /// with the same key twice is refused, since it could never count twice.
    pub fn sign(&mut self, key: &SigningKey) -> Result<(), EnvelopeError> {
        let payload = B64
            .decode(&self.payload)
            .map_err(|e| EnvelopeError::PayloadEncoding(e.to_string()))?;
        let keyid = KeyId::of(&key.verifying_key()).to_string();
        if self.signatures.iter().any(|s| s.keyid == keyid) {
            return Err(EnvelopeError::AlreadySigned(keyid));
        }
        let sig = key.sign(&pae(&self.payload_type, &payload));
        self.signatures.push(EnvelopeSignature {
            keyid,
            sig: B64.encode(sig.to_bytes()),
        });
        Ok(())
    }

    /// Serialises the envelope as compact JSON.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain strings and vectors cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

impl ParsedEnvelope {
    /// True if signature `index` verifies (strictly) under `key`.
    pub fn verifies(&self, index: usize, key: &VerifyingKey) -> bool {
        let msg = pae(self.payload_type, &self.payload);
        self.signatures
            .get(index)
            .is_some_and(|(_, sig)| key.verify_strict(&msg, sig).is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_the_dsse_spec_example() {
        // From the DSSE protocol document's worked example.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn sign_then_verify_and_tamper() {
        let key = crate::keys::generate().unwrap();
        let mut env = Envelope::unsigned(b"{\"x\":1}");
        env.sign(&key).unwrap();
        let parsed = Envelope::parse(&env.to_bytes(), &Limits::default()).unwrap();
        assert!(parsed.verifies(0, &key.verifying_key()));
        let other = crate::keys::generate().unwrap();
        assert!(!parsed.verifies(0, &other.verifying_key()));
        let mut tampered = parsed.clone();
        tampered.payload[2] ^= 1;
        assert!(!tampered.verifies(0, &key.verifying_key()));
    }

    #[test]
    fn refuses_wrong_type_unknown_fields_and_no_signatures() {
        let l = Limits::default();
        let mut env = Envelope::unsigned(b"{}");
        assert!(matches!(
            Envelope::parse(&env.to_bytes(), &l),
            Err(EnvelopeError::SignatureCount { count: 0, .. })
        ));
        env.payload_type = "application/vnd.in-toto+json".into();
        env.sign(&crate::keys::generate().unwrap()).unwrap();
        assert!(matches!(
            Envelope::parse(&env.to_bytes(), &l),
            Err(EnvelopeError::WrongPayloadType { .. })
        ));
        let extra = br#"{"payloadType":"x","payload":"","signatures":[],"extra":1}"#;
        let err = Envelope::parse(extra, &l).unwrap_err().to_string();
        assert!(err.contains("unknown field `extra`"), "{err}");
    }
}
