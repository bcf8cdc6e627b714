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
use extism::{CurrentPlugin, Function, PTR, UserData, Val};
use serde_json::json;

use super::conns::{self, Db};
use super::record::{self, AccessRecord};
use super::{CallCtx, abi};
use crate::fhir::search::{self, Grants, SearchContext, SearchError};

/// The three host functions, each bound to `extism:host/user`.
pub fn functions() -> Vec<Function> {
    abi::USER_FUNCTIONS
        .iter()
        .map(|&name| {
            Function::new(
                name,
                [PTR],
                [PTR],
                UserData::new(()),
                move |plugin: &mut CurrentPlugin, inputs: &[Val], outputs: &mut [Val], _| {
                    host_call(name, plugin, inputs, outputs)
                },
            )
            .with_namespace(abi::USER_MODULE)
        })
        .collect()
}

fn host_call(
    name: &'static str,
    plugin: &mut CurrentPlugin,
    inputs: &[Val],
    outputs: &mut [Val],
) -> Result<()> {
    let ctx: Arc<CallCtx> = plugin.host_context::<Arc<CallCtx>>()?.clone();
    let handle = plugin
        .memory_from_val(&inputs[0])
        .ok_or_else(|| anyhow::anyhow!("{name}: argument is not a valid memory offset"))?;
    if handle.len() as u64 > ctx.env.limits.max_host_arg_bytes {
        anyhow::bail!(
            "{name}: argument is {} bytes, over the limit of {}",
            handle.len(),
            ctx.env.limits.max_host_arg_bytes
        );
    }
    let arg = plugin.memory_str(handle)?.to_owned();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        crate::fsutil::panicpoint(&format!("host.{name}"));
        dispatch(name, &ctx, &arg)
    }));
    let json = match result {
        Ok(r) => r?,
        Err(_) => anyhow::bail!("host function {name} panicked; the instance is discarded"),
    };
    let out = plugin.memory_new(json)?;
    outputs[0] = plugin.memory_to_val(out);
    Ok(())
}

fn outcome(code: &str, msg: &str) -> String {
    json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": msg}]}).to_string()
}

/// Runs one host function: capability check, work, record, result.
fn dispatch(name: &'static str, ctx: &CallCtx, arg: &str) -> Result<String> {
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
    // Durable before the data leaves.
    conns::with(&ctx.env.dir, Db::Audit, |audit| record::access(audit, &rec))?;
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
    let result = conns::with(&ctx.env.dir, Db::Fhir, |fhir| {
        Ok(if is_search {
            search::parse(arg, &ctx.env.limits)
                .and_then(|q| search::search(fhir, &sctx, &q))
                .map(|b| (b.total, serde_json::to_string(&b).unwrap_or_default()))
        } else {
            search::read(fhir, &sctx, arg).map(|j| (1, j))
        })
    })?;
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
