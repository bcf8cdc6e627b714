//! Sync down: refresh the FHIR cache from upstream with incremental
//! searches, `GET {Type}?_lastUpdated=gt{cursor}&_sort=_lastUpdated`,
//! following `Bundle.link[next]`, each page upserted through the import
//! path (newest `meta.lastUpdated` wins; identical content is a no-op).
//!
//! Invariants:
//! - a page is committed before the cursor moves past it, and the cursor
//!   (`state.db` `pull_cursors`) records where the chain in progress goes
//!   on, so an interrupted pull resumes at the next page;
//! - `last_updated` only advances when a chain is complete, to the newest
//!   time seen in it: nothing between is skipped.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use serde_json::Value;

use super::client::{Client, SyncError};
use crate::datadir::DataDir;
use crate::fhir::import::{self, Options};

/// What a pull did, per type.
#[derive(Debug, Default, Serialize)]
pub struct PullReport {
    /// Resource type.
    pub resource_type: String,
    /// Pages fetched.
    pub pages: u64,
    /// Resources created or updated.
    pub changed: u64,
    /// Entries refused by the import (named in `errors`).
    pub rejected: u64,
    /// The first few import errors.
    pub errors: Vec<String>,
    /// The cursor after the pull.
    pub last_updated: Option<String>,
}

struct Cursor {
    last: Option<String>,
    pending_max: Option<String>,
    next: Option<String>,
}

fn load(state: &Connection, tenant: &str, ty: &str) -> anyhow::Result<Cursor> {
    Ok(state
        .query_row(
            "SELECT last_updated, pending_max, next_url FROM pull_cursors WHERE tenant = ?1 AND type = ?2",
            params![tenant, ty],
            |r| {
                Ok(Cursor {
                    last: r.get(0)?,
                    pending_max: r.get(1)?,
                    next: r.get(2)?,
                })
            },
        )
        .optional()?
        .unwrap_or(Cursor {
            last: None,
            pending_max: None,
            next: None,
        }))
}

fn save(state: &Connection, tenant: &str, ty: &str, c: &Cursor) -> anyhow::Result<()> {
    state.execute(
        "INSERT INTO pull_cursors (tenant, type, last_updated, pending_max, next_url) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(tenant, type) DO UPDATE SET last_updated = excluded.last_updated,
           pending_max = excluded.pending_max, next_url = excluded.next_url",
        params![tenant, ty, c.last, c.pending_max, c.next],
    )?;
    Ok(())
}

/// Pulls every change of `ty` since the cursor into `tenant`'s cache.
pub fn pull_type(
    dir: &DataDir,
    client: &Client,
    tenant: &str,
    ty: &str,
    max_pages: u64,
) -> Result<PullReport, SyncError> {
    let local = |e: anyhow::Error| SyncError::Local(format!("{e:#}"));
    let state = dir.open_state().map_err(local)?;
    let mut fhir = crate::fhir::open(dir).map_err(local)?;
    // The cursor (state.db, synchronous=FULL) moves past a page only after
    // the page is committed; the page must then be on disk too, or a power
    // cut could keep the cursor and lose the page for good.
    fhir.pragma_update(None, "synchronous", "FULL")
        .map_err(|e| local(e.into()))?;
    let mut c = load(&state, tenant, ty).map_err(local)?;
    let mut report = PullReport {
        resource_type: ty.to_owned(),
        ..PullReport::default()
    };
    loop {
        let url = match &c.next {
            Some(n) => n.clone(),
            None => match &c.last {
                Some(t) => format!(
                    "{ty}?_lastUpdated=gt{}&_sort=_lastUpdated&_count=500",
                    percent_encoding::utf8_percent_encode(t, percent_encoding::NON_ALPHANUMERIC)
                ),
                None => format!("{ty}?_sort=_lastUpdated&_count=500"),
            },
        };
        let page = match client.get(&url) {
            Ok(p) => p,
            // A stored next-page link the server no longer knows (paging
            // state expired, base moved): start the chain again from the
            // cursor. Nothing is lost; re-imports are no-ops.
            Err(e) if c.next.is_some() && stale_link(&e) => {
                log::warn!("sync down {ty}: {e}; restarting from the cursor");
                c.next = None;
                c.pending_max = None;
                save(&state, tenant, ty, &c).map_err(local)?;
                continue;
            }
            Err(e) => return Err(e),
        };
        if page.get("resourceType").and_then(Value::as_str) != Some("Bundle")
            || page.get("type").and_then(Value::as_str) != Some("searchset")
        {
            return Err(SyncError::Protocol {
                url,
                reason: "the answer is not a searchset Bundle".into(),
            });
        }
        let newest = page
            .get("entry")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|e| {
                e.pointer("/resource/meta/lastUpdated")
                    .and_then(Value::as_str)
            })
            .max_by_key(|t| instant_ms(t))
            .map(str::to_owned);
        let next = page
            .get("link")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|l| l.get("relation").and_then(Value::as_str) == Some("next"))
            .and_then(|l| l.get("url").and_then(Value::as_str))
            .map(str::to_owned);
        let opts = Options {
            tenant: tenant.to_owned(),
            strict: false,
            now_ms: crate::clock::system_now().map_err(local)?.unix_timestamp() * 1000,
            progress: None,
        };
        let r = import::import_bundle_doc(&mut fhir, &url, page, &opts).map_err(local)?;
        report.pages += 1;
        report.changed += r.types.values().map(|t| t.created + t.updated).sum::<u64>();
        report.rejected += r.skipped;
        report.errors.extend(r.errors.iter().take(5).cloned());
        // The page is committed; now move the cursor past it.
        c.pending_max = newest_of(c.pending_max.take(), newest);
        match next {
            Some(n) if n == url => {
                return Err(SyncError::Protocol {
                    url,
                    reason: "the next-page link points at the same page".into(),
                });
            }
            Some(n) => c.next = Some(n),
            None => {
                c.next = None;
                c.last = newest_of(c.last.take(), c.pending_max.take());
            }
        }
        save(&state, tenant, ty, &c).map_err(local)?;
        if c.next.is_none() || report.pages >= max_pages {
            break;
        }
    }
    report.last_updated = c.last;
    Ok(report)
}

fn stale_link(e: &SyncError) -> bool {
    match e {
        SyncError::Status { status, .. } => (400..500).contains(status),
        SyncError::Protocol { reason, .. } => reason.contains("leaves the upstream base"),
        _ => false,
    }
}

/// An instant as epoch ms (instants with different offsets compare right).
fn instant_ms(t: &str) -> i64 {
    crate::fhir::store::last_updated_ms(&serde_json::json!({"meta": {"lastUpdated": t}}))
        .ok()
        .flatten()
        .unwrap_or(i64::MIN)
}

fn newest_of(a: Option<String>, b: Option<String>) -> Option<String> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if instant_ms(&b) > instant_ms(&a) {
            b
        } else {
            a
        }),
        (a, b) => a.or(b),
    }
}
