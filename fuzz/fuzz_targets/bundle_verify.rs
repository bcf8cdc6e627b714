//! Fuzz target: arbitrary bytes through the whole verifier (container
//! framing, DSSE envelope, signatures, manifest, trust, digest, expiry)
//! against a policy trusting one fixed key. Must never panic; any input
//! that verifies would be a forgery (the key's secret is not in the corpus).
#![no_main]

use clinicbox::bundle::trust::TrustPolicy;
use clinicbox::bundle::verify::{PartialFacts, verify};
use clinicbox::limits::Limits;
use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let policy = TrustPolicy::only(&[key.verifying_key()]);
    let now = time::OffsetDateTime::UNIX_EPOCH;
    let _ = clinicbox::bundle::inspect(data, &Limits::default());
    let r = verify(data.to_vec(), &policy, now, &Limits::default(), &mut PartialFacts::default());
    // The fuzzer cannot sign with the key, so nothing it makes may verify
    // unless it copied a valid signature, which needs a valid seed input.
    let _ = r;
});
