//! `news2`: clinicbox plugin computing the Royal College of Physicians
//! National Early Warning Score 2 (NEWS2, 2017 chart) from one set of vital
//! signs, returned as a FHIR R4 `RiskAssessment`.
//!
//! Role: the host calls the exported function `news2` with a JSON document
//! of observations (see `README.md`); the plugin answers with the resource
//! JSON, or fails the call with a lowercase message naming the bad field.
//!
//! Invariants:
//! - Pure and deterministic: no clock, no randomness, no host calls besides
//!   reading the input and setting the output, so equal input gives
//!   byte-equal output.
//! - Nothing is scored unless every field is present (or defaulted), of the
//!   right type, finite and physiologically possible; unknown and duplicate
//!   fields are rejected.
//! - Scoring lives in [`score`], which has no Extism, JSON or FHIR types;
//!   [`assess`] is the whole JSON-in/JSON-out behaviour as a plain function,
//!   and the Extism export below only wraps it.

mod assess;
pub mod score;

pub use assess::assess;

/// The Extism export. Only compiled for wasm: natively the Extism host
/// imports do not exist, and tests go through [`assess`] instead.
#[cfg(target_arch = "wasm32")]
mod plugin {
    use extism_pdk::{Error, FnResult, WithReturnCode, plugin_fn};

    /// Exit code of a call rejected for bad input.
    const INVALID_INPUT: i32 = 1;

    #[plugin_fn]
    pub fn news2(input: String) -> FnResult<String> {
        crate::assess(&input).map_err(|e| WithReturnCode::new(Error::msg(e), INVALID_INPUT))
    }
}
