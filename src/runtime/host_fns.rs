//! The clinicbox host functions of ABI 1 (`extism:host/user`):
//! `fhir_search(query)`, `fhir_read("Type/id")` and `audit_note(json)`.
//!
//! Each takes one Extism memory offset (a UTF-8 string) and returns one
//! (a JSON document). Denials and errors come back as a FHIR
//! `OperationOutcome` rather than a trap, so a plugin can handle them.
//!
//! Invariants:
//! - the capability check is the first thing each function does, against
//!   the per-call context (tenant, patient, granted scopes);
//! - every access, allowed or denied, is committed to `audit.db` before its
//!   result is written into the plugin's memory;
//! - a panic inside a host function is caught and becomes a trap, so the
//!   instance is discarded rather than poisoned.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use serde_json::json;
use wasmtime::Caller;

use super::CallCtx;
use super::conns::{self, Db};
use super::host::{self, State};
use super::record::{self, AccessRecord};
use crate::fhir::search::{self, Grants, SearchContext, SearchError};

/// Runs host function `name` for the guest: reads its argument block,
/// dispatches, and returns the offset of the result block. An `Err` traps
/// the guest (and the instance is discarded).
pub(crate) fn host_call(
    name: &'static str,
    granted: bool,
    mut caller: Caller<'_, State>,
    off: i64,
) -> wasmtime::Result<i64> {
    let ctx: Arc<CallCtx> = caller
        .data()
        .ctx()
        .cloned()
        .ok_or_else(|| wasmtime::Error::msg(format!("{name} called outside a plugin call")))?;
    let arg = host::read_arg(&mut caller, off, ctx.env.limits.max_host_arg_bytes, name)?;
    let arg = String::from_utf8(arg)
        .map_err(|_| wasmtime::Error::msg(format!("{name}: argument is not UTF-8")))?;
    let (wall, cpu) = (Instant::now(), super::thread_cpu_time());
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        if crate::fsutil::armed_failpoint().is_some() {
            let point = format!("host.{name}");
            crate::fsutil::panicpoint(&point);
            crate::fsutil::delaypoint(&point);
        }
        dispatch(name, granted, &ctx, &arg)
    }));
    let waited = wall
        .elapsed()
        .saturating_sub(super::thread_cpu_time().saturating_sub(cpu));
    ctx.host_wait_ns.fetch_add(
        u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX),
        std::sync::atomic::Ordering::Relaxed,
    );
    let json = match result {
        Ok(Ok(json)) => json,
        Ok(Err(e)) => return Err(wasmtime::Error::msg(format!("{name}: {e:#}"))),
        Err(_) => {
            return Err(wasmtime::Error::msg(format!(
                "host function {name} panicked; the instance is discarded"
            )));
        }
    };
    host::write_block(&mut caller, json.as_bytes())
}

/// The clinicbox host functions the granted scopes call for: `fhir_search`
/// with a search scope, `fhir_read` with a read scope; `audit_note` always
/// (a plugin may add to the audit log, never read it).
pub fn linked(scopes: &[crate::scopes::Scope]) -> Vec<&'static str> {
    let mut v = Vec::with_capacity(3);
    if scopes.iter().any(|s| s.search) {
        v.push("fhir_search");
    }
    if scopes.iter().any(|s| s.read) {
        v.push("fhir_read");
    }
    v.push("audit_note");
    v
}

fn outcome(code: &str, msg: &str) -> String {
    json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": msg}]}).to_string()
}

/// Runs one host function: capability check, work, record, result.
fn dispatch(name: &'static str, granted: bool, ctx: &CallCtx, arg: &str) -> Result<String> {
    let started = Instant::now();
    let n = ctx
        .host_calls
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (status, detail, body) = if n >= ctx.env.limits.max_host_calls_per_call {
        (
            "denied",
            format!(
                "more than {} host calls in one plugin call",
                ctx.env.limits.max_host_calls_per_call
            ),
            None,
        )
    } else if !granted {
        (
            "denied",
            format!(
                "{name} is not linked: no scope granted to this plugin for tenant {} allows it",
                ctx.tenant
            ),
            None,
        )
    } else {
        match name {
            "fhir_search" => fhir(ctx, arg, true)?,
            "fhir_read" => fhir(ctx, arg, false)?,
            _ => note(arg),
        }
    };
    let rec = AccessRecord {
        call_id: ctx.call_id.clone(),
        time: crate::bundle::manifest::format_time(time::OffsetDateTime::now_utc()),
        plugin: ctx.plugin.clone(),
        host_fn: name.to_owned(),
        tenant: ctx.tenant.clone(),
        patient: ctx.patient.clone(),
        query: arg.chars().take(4096).collect(),
        outcome: status.to_owned(),
        detail: detail.clone(),
        duration_us: started.elapsed().as_micros() as u64,
    };
    // Queued now; durable before any output of this call leaves the host:
    // the call's own record is appended after it, in the same writer
    // queue, and the call waits for both (Runtime::call).
    let t = Instant::now();
    let pending = record::access(&ctx.env.audit, &rec)?;
    ctx.pending
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(pending);
    add_db_time(ctx, t);
    Ok(match body {
        Some(b) => b,
        None => outcome(
            if status == "denied" {
                "forbidden"
            } else {
                "invalid"
            },
            &detail,
        ),
    })
}

type Answer = (&'static str, String, Option<String>);

fn fhir(ctx: &CallCtx, arg: &str, is_search: bool) -> Result<Answer> {
    // Capability first: the function does nothing without a grant for it.
    let allowed = ctx
        .scopes
        .iter()
        .any(|s| if is_search { s.search } else { s.read });
    if !allowed {
        let what = if is_search {
            "fhir_search"
        } else {
            "fhir_read"
        };
        return Ok((
            "denied",
            format!(
                "{what} is not granted to this plugin for tenant {}",
                ctx.tenant
            ),
            None,
        ));
    }
    let sctx = SearchContext {
        tenant: &ctx.tenant,
        patient: Some(&ctx.patient),
        grants: Grants::Scopes(&ctx.scopes),
    };
    let t = Instant::now();
    let result = conns::with(&ctx.env.dir, Db::Fhir, |fhir| {
        Ok(if is_search {
            search::parse(arg, &ctx.env.limits)
                .and_then(|q| search::search(fhir, &sctx, &q))
                .map(|b| {
                    let n = b.total.unwrap_or(b.entry.len() as u64);
                    (n, serde_json::to_string(&b).unwrap_or_default())
                })
        } else {
            search::read(fhir, &sctx, arg).map(|j| (1, j))
        })
    });
    add_db_time(ctx, t);
    let result = result?;
    Ok(match result {
        Ok((total, body)) => ("ok", format!("{total} resources"), Some(body)),
        Err(SearchError::Db(e)) => return Err(e.into()),
        Err(e @ (SearchError::NotGranted(_) | SearchError::OtherPatient { .. })) => {
            ("denied", e.to_string(), None)
        }
        Err(e @ SearchError::NotFound(_)) => (
            "denied",
            e.to_string(),
            Some(outcome("not-found", &e.to_string())),
        ),
        Err(e @ SearchError::Invalid(_)) => ("error", e.to_string(), None),
    })
}

fn add_db_time(ctx: &CallCtx, since: Instant) {
    ctx.db_ns.fetch_add(
        since.elapsed().as_nanos() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
}

fn note(arg: &str) -> Answer {
    match serde_json::from_str::<serde_json::Value>(arg) {
        Ok(v) if v.is_object() => (
            "ok",
            "note recorded".into(),
            Some(json!({"recorded": true}).to_string()),
        ),
        _ => ("error", "audit_note takes a JSON object".into(), None),
    }
}
