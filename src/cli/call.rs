//! `clinicbox call`: run one plugin function for one tenant and patient.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::Ctx;
use crate::runtime::{CallRequest, Runtime};

/// `call` options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The tenant (clinic).
    #[arg(long)]
    tenant: String,
    /// The patient id.
    #[arg(long)]
    patient: String,
    /// Who is asking (app or user), recorded with the call.
    #[arg(long, default_value = "cli")]
    requester: String,
    /// Purpose of use (HL7 v3 PurposeOfUse, e.g. TREAT), recorded.
    #[arg(long, default_value = "TREAT")]
    purpose: String,
    /// JSON input, or `@file` to read it from a file.
    #[arg(long, default_value = "{}")]
    input: String,
    /// `vendor/name`.
    name: String,
    /// Exported function.
    function: String,
}

/// Runs `call`.
pub fn run(ctx: &Ctx, args: Args) -> Result<()> {
    let input = match args.input.strip_prefix('@') {
        Some(path) => crate::fsutil::read_bounded(
            &PathBuf::from(path),
            ctx.config.limits.max_host_arg_bytes * 16,
        )
        .with_context(|| format!("--input {}", args.input))?,
        None => args.input.into_bytes(),
    };
    ctx.dir.open_state()?;
    let rt = Runtime::new(ctx.dir.clone(), ctx.config.limits.clone())?;
    let req = CallRequest {
        tenant: args.tenant,
        patient: args.patient,
        requester: args.requester,
        purpose: args.purpose,
        plugin: args.name,
        function: args.function,
        input,
    };
    let out = rt.call(&req)?;
    eprintln!(
        "call {} served by {} {}",
        out.call_id, req.plugin, out.version
    );
    let text = String::from_utf8_lossy(&out.output).into_owned();
    if ctx.out_json() {
        let output: serde_json::Value =
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        ctx.out.emit(
            &serde_json::json!({"call_id": out.call_id, "version": out.version, "output": output}),
            String::new,
        )
    } else {
        ctx.out.raw(&text)
    }
}
