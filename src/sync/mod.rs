//! Sync with the upstream FHIR server, when online: audit records up
//! ([`upload`]), FHIR data down ([`pull`]), over [`client`] (ureq +
//! rustls), retried with [`backoff`].
//!
//! Invariants: a failed pass changes nothing upstream-facing except the
//! error it records; every cursor moves only past work that is durable on
//! both sides; the clinic keeps working while upstream is away (only the
//! audit disk budget can stop PHI-returning calls, and only by failing
//! closed).

pub mod backoff;
pub mod client;
pub mod pull;
pub mod upload;

use serde::Serialize;

use crate::config::Config;
use crate::datadir::DataDir;
use client::SyncError;

/// Pages of one type fetched in one pass at most (a runaway paging chain
/// resumes in the next pass).
const MAX_PAGES_PER_PASS: u64 = 10_000;

/// One pass: upload, then pull.
#[derive(Debug, Serialize)]
pub struct PassReport {
    /// The upload.
    pub upload: upload::UploadReport,
    /// The pulls, per type.
    pub pull: Vec<pull::PullReport>,
}

/// Runs one sync pass with the config's upstream.
pub fn pass(dir: &DataDir, config: &Config) -> Result<PassReport, SyncError> {
    let up = config.upstream.as_ref().ok_or_else(|| {
        SyncError::Local("no [upstream] in the config; nothing to sync with".into())
    })?;
    let limits = &config.limits;
    let upload = upload::upload(dir, up, limits)?;
    let mut pulls = Vec::new();
    if let Some((tenant, types)) = &up.pull {
        let client = client::Client::new(up, limits)?;
        for ty in types {
            let mut backoff = backoff::Backoff::new(up.backoff, up.backoff_max);
            let mut attempt = 0;
            let r = loop {
                match pull::pull_type(dir, &client, tenant, ty, MAX_PAGES_PER_PASS) {
                    Ok(r) => break r,
                    Err(e) => {
                        attempt += 1;
                        if attempt >= up.attempts {
                            let _ = crate::audit::note(
                                dir,
                                "sync",
                                &serde_json::json!({"action": "pull", "outcome": "failed", "type": ty, "detail": e.to_string()}),
                            );
                            return Err(e);
                        }
                        std::thread::sleep(backoff.next_delay());
                    }
                }
            };
            pulls.push(r);
        }
    }
    Ok(PassReport {
        upload,
        pull: pulls,
    })
}
