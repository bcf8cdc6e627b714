//! `news2`: clinicbox plugin computing the Royal College of Physicians
//! National Early Warning Score 2 (NEWS2, 2017 chart), returned as a FHIR R4
//! `RiskAssessment`.
//!
//! Role: two exports (see `README.md`).
//! - `news2`: the host passes one set of vital signs as JSON; the plugin
//!   answers with the resource JSON, or fails the call with a lowercase
//!   message naming the bad field. It makes no host calls.
//! - `news2_latest`: the plugin calls the host function `fhir_search`
//!   (`extism:host/user`) once, with [`vitals::SEARCH_QUERY`], takes the
//!   newest observation of each parameter from the searchset bundle and
//!   answers as `news2` does, with `basis` referencing the observations
//!   used. A host `OperationOutcome` fails the call
//!   (`fhir_search refused: …`).
//!
//! Invariants:
//! - Deterministic: no clock, no randomness, and no host calls besides the
//!   one search, so equal input (and equal search answer) gives byte-equal
//!   output.
//! - Nothing is scored unless every parameter is present (or defaulted), of
//!   the right type, finite and physiologically possible; unknown and
//!   duplicate input fields are rejected.
//! - Scoring lives in [`score`], which has no Extism, JSON or FHIR types;
//!   [`vitals`] turns a bundle into a score input; [`assess()`] and
//!   [`assess_latest`] are the whole JSON-in/JSON-out behaviour as plain
//!   functions, and the Extism exports below only wrap them.

mod assess;
pub mod score;
pub mod vitals;

pub use assess::{LatestRequest, assess, assess_latest, parse_latest_input};

/// The Extism exports and host imports. Only compiled for wasm: natively
/// the Extism host imports do not exist, and tests go through [`assess()`]
/// and [`assess_latest`] instead.
#[cfg(target_arch = "wasm32")]
mod plugin {
    use extism_pdk::{Error, FnResult, WithReturnCode, host_fn, plugin_fn};

    /// Exit code of a failed call (bad input, refused or unusable search).
    const FAILED: i32 = 1;

    fn fail(message: String) -> WithReturnCode<Error> {
        WithReturnCode::new(Error::msg(message), FAILED)
    }

    #[host_fn("extism:host/user")]
    extern "ExtismHost" {
        /// Runs a FHIR search in the calling patient's compartment, within
        /// the plugin's granted scopes; answers a searchset `Bundle` or an
        /// `OperationOutcome`.
        fn fhir_search(query: String) -> String;
    }

    #[plugin_fn]
    pub fn news2(input: String) -> FnResult<String> {
        crate::assess(&input).map_err(fail)
    }

    #[plugin_fn]
    pub fn news2_latest(input: String) -> FnResult<String> {
        let request = crate::parse_latest_input(&input).map_err(fail)?;
        // SAFETY: `fhir_search` is provided by the clinicbox host with the
        // Extism ABI (one memory offset in, one out), which the generated
        // wrapper follows.
        let bundle = unsafe { fhir_search(crate::vitals::SEARCH_QUERY.to_string()) }
            .map_err(|e| fail(format!("fhir_search failed: {e}")))?;
        crate::assess_latest(&request, &bundle).map_err(fail)
    }
}
