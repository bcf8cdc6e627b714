//! Time, and the trusted clock that expiry checks use.
//!
//! The trusted clock is `max(system clock, newest time this box has seen)`.
//! The high-water mark is kept in `audit.db` and only ever moves forward, so
//! setting the system clock back cannot revive an expired bundle (TUF's
//! "indefinite freeze" defence works only if time cannot be rewound).
//!
//! Tests and the outage simulations replace the system clock with the
//! `CLINICBOX_FAKE_NOW` environment variable (an RFC 3339 time). It moves
//! the *system* clock only; the high-water mark still applies to it.

use anyhow::{Context, Result};
use rusqlite::{Connection, OptionalExtension, params};
use time::OffsetDateTime;

use crate::bundle::manifest::parse_time;

/// Environment variable that overrides the system clock (tests, drills).
pub const FAKE_NOW_ENV: &str = "CLINICBOX_FAKE_NOW";

/// The system clock, or `CLINICBOX_FAKE_NOW` when set.
pub fn system_now() -> Result<OffsetDateTime> {
    match std::env::var(FAKE_NOW_ENV) {
        Ok(s) => parse_time(&s)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("environment variable {FAKE_NOW_ENV}")),
        Err(_) => Ok(OffsetDateTime::now_utc()),
    }
}

/// The trusted time: never earlier than any time recorded before. Advances
/// and persists the high-water mark in `audit` (table `clock`).
pub fn trusted_now(audit: &Connection) -> Result<OffsetDateTime> {
    let sys = system_now()?;
    // On every audit batch: cached statements, not a parse each time.
    let stored: Option<i64> = audit
        .prepare_cached("SELECT high_water FROM clock WHERE id = 1")
        .and_then(|mut s| s.query_row([], |r| r.get(0)).optional())
        .context("cannot read the trusted clock from audit.db")?;
    let sys_secs = sys.unix_timestamp();
    match stored {
        Some(hw) if hw >= sys_secs => {
            if hw > sys_secs + 300 {
                log::warn!(
                    "system clock is {}s behind the newest time this box has seen; using the latter",
                    hw - sys_secs
                );
            }
            OffsetDateTime::from_unix_timestamp(hw).context("stored trusted clock out of range")
        }
        _ => {
            audit
                .prepare_cached(
                    "INSERT INTO clock(id, high_water) VALUES (1, ?1)
                     ON CONFLICT(id) DO UPDATE SET high_water = max(high_water, excluded.high_water)",
                )
                .and_then(|mut s| s.execute(params![sys_secs]))
                .context("cannot advance the trusted clock in audit.db")?;
            Ok(sys)
        }
    }
}
