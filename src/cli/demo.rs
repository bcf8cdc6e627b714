//! `clinicbox demo`: the main job on embedded defaults, for a newcomer.
//!
//! Inits a data dir under `./`, trusts the embedded dev vendor key for the
//! `acme/` namespace, installs the embedded example bundles, imports a small
//! synthetic patient set for tenant `clinic-a`, grants NEWS2 its
//! vital-signs scope, scores one patient through the sandboxed plugin, and
//! verifies the audit log that recorded all of it. Running it again changes
//! nothing but adding the new call's audit records (every other step is
//! idempotent). The embedded files are the ones in `update-bundles/`.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::Ctx;
use crate::audit::{checkpoint, verify};
use crate::bundle::manifest::Manifest;
use crate::bundle::store;
use crate::bundle::trust::{self, Namespace};
use crate::datadir::DataDir;
use crate::fhir::{import, synth};
use crate::runtime::{CallRequest, Runtime, grants};
use crate::scopes::Scope;
use crate::{admin, bundle, clock, fsutil, keys};

const TENANT: &str = "clinic-a";
const PATIENT: &str = "p0002";
const NEWS2_SCOPE: &str = "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|vital-signs";

/// The dev vendor's public key (test only), as in update-bundles/.
pub const DEV_VENDOR_PUB: &str = include_str!("../../update-bundles/dev-vendor.pub");
/// The signed example bundles, as in update-bundles/.
pub const EXAMPLE_BUNDLES: &[(&str, &[u8])] = &[
    (
        "acme-news2.cbx",
        include_bytes!("../../update-bundles/acme-news2.cbx"),
    ),
    (
        "acme-allergy-check.cbx",
        include_bytes!("../../update-bundles/acme-allergy-check.cbx"),
    ),
];

/// `demo` options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Data dir for the demo (created if missing).
    #[arg(long, default_value = "./clinicbox-demo", value_name = "DIR")]
    dir: PathBuf,
    /// Only walk through the steps; do not start the daemon afterwards.
    #[arg(long)]
    no_serve: bool,
    /// Where the demo daemon listens (localhost only by default).
    #[arg(long, default_value = "127.0.0.1:8787", value_name = "ADDR")]
    listen: String,
}

/// Runs the demo.
pub fn run(ctx: &Ctx, args: Args) -> Result<()> {
    let dir = DataDir::new(&args.dir);
    let init = dir.init()?;
    eprintln!(
        "1/7 data dir {} ready (appliance key {})",
        init.data_dir,
        &init.identity_key_id[..16]
    );

    let vendor = keys::parse_public(DEV_VENDOR_PUB, "update-bundles/dev-vendor.pub (embedded)")?;
    let ns = Namespace::parse("acme/").map_err(anyhow::Error::msg)?;
    let now = clock::trusted_now(&dir.open_audit()?)?;
    let added = trust::add(
        &mut dir.open_state()?,
        &vendor,
        &[ns],
        None,
        "dev vendor (TEST ONLY)",
        now,
    )?;
    crate::audit::note(
        &dir,
        "trust",
        &serde_json::json!({"action": "add", "key_id": added.key_id, "comment": "dev vendor (TEST ONLY)", "thresholds": added.thresholds}),
    )?;
    eprintln!(
        "2/7 trusted dev vendor key {} for acme/",
        &added.key_id[..16]
    );

    for (file, bytes) in EXAMPLE_BUNDLES {
        let example = args.dir.join(file);
        fsutil::write_atomic(&example, bytes, 0o644, "demo")
            .with_context(|| format!("cannot write {}", example.display()))?;
        let r = admin::install_file(&dir, &example, &ctx.config.limits)?;
        let what = match r.outcome {
            store::InstallOutcome::Installed => "verified and installed",
            store::InstallOutcome::AlreadyInstalled => "already installed, nothing changed",
        };
        eprintln!("3/7 {} {}: {what}", r.plugin, r.version);
    }

    let plugins = store::list(&dir, &dir.open_state()?)?;
    for p in &plugins {
        eprintln!("    {} {}  manifest {}", p.name, p.version, &p.digest[..16]);
    }

    // A small synthetic clinic: 3 patients, 120 resources each.
    let spec = synth::SynthSpec {
        tenants: vec![TENANT.into()],
        patients_per_tenant: 3,
        resources_per_patient: 120,
        ..synth::SynthSpec::default()
    };
    let mut entries = Vec::new();
    synth::generate(&spec, |_, r| {
        entries.push(serde_json::json!({"resource": r}))
    });
    let n = entries.len();
    let doc = serde_json::json!({"resourceType": "Bundle", "type": "collection", "entry": entries});
    let opts = import::Options {
        tenant: TENANT.into(),
        strict: true,
        now_ms: clock::system_now()?.unix_timestamp() * 1000,
        progress: None,
    };
    let report = import::import_bundle_doc(
        &mut crate::fhir::open(&dir)?,
        "synthetic patients",
        doc,
        &opts,
    )?;
    crate::audit::note(
        &dir,
        "fhir.import",
        &serde_json::json!({"action": "import", "tenant": TENANT, "files": [report]}),
    )?;
    eprintln!("4/7 imported {n} synthetic resources (3 patients) for tenant {TENANT}");

    let manifest_json: String = dir.open_state()?.query_row(
        "SELECT v.manifest FROM plugins p JOIN plugin_versions v ON v.digest = p.current WHERE p.name = 'acme/news2'",
        [],
        |r| r.get(0),
    )?;
    let manifest = Manifest::parse(manifest_json.as_bytes(), &ctx.config.limits)?;
    let scope: Scope = NEWS2_SCOPE.parse()?;
    let now = bundle::manifest::format_time(clock::trusted_now(&dir.open_audit()?)?);
    grants::grant(
        &mut dir.open_state()?,
        TENANT,
        "acme/news2",
        &manifest,
        &[scope],
        &now,
    )?;
    crate::audit::note(
        &dir,
        "grant",
        &serde_json::json!({"action": "grant", "tenant": TENANT, "plugin": "acme/news2", "scopes": [NEWS2_SCOPE]}),
    )?;
    eprintln!("5/7 granted acme/news2 {NEWS2_SCOPE} for {TENANT}");

    let rt = Runtime::new(dir.clone(), ctx.config.limits.clone())?;
    let out = rt.call(&CallRequest {
        tenant: TENANT.into(),
        patient: PATIENT.into(),
        requester: "demo".into(),
        purpose: "TREAT".into(),
        plugin: "acme/news2".into(),
        function: "news2_latest".into(),
        input: b"{}".to_vec(),
    })?;
    let ra: serde_json::Value = serde_json::from_slice(&out.output)?;
    let score = ra
        .pointer("/prediction/0/outcome/text")
        .and_then(|v| v.as_str())
        .unwrap_or("?");
    eprintln!(
        "6/7 acme/news2 news2_latest for {PATIENT}: RiskAssessment, risk {score}, from {} observations (call {})",
        ra["basis"].as_array().map_or(0, Vec::len),
        out.call_id
    );
    drop(rt);

    let key = keys::read_public(&dir.identity_pub(), ctx.config.limits.max_key_file_bytes)?;
    let verified = verify::verify(
        &dir.open_audit()?,
        &key,
        &checkpoint::anchors(&dir.open_state()?)?,
    )??;
    eprintln!(
        "7/7 audit log verified: {} records, chain head {}",
        verified.records,
        &verified.head[..16]
    );
    let summary = serde_json::json!({"plugins": plugins, "risk_assessment": ra, "audit": verified});
    if !args.no_serve {
        return serve(ctx, &args, &dir);
    }
    ctx.out.emit(&summary, || {
        format!(
            "{}\n\nnext, try:\n  clinicbox --data-dir {d} audit tail\n  clinicbox --data-dir {d} audit show {} --format fhir\n  clinicbox --data-dir {d} plugin calls --accesses",
            serde_json::to_string_pretty(&ra).unwrap_or_default(),
            verified.records,
            d = args.dir.display()
        )
    })
}

/// Creates fresh demo tokens (revoking the previous demo's), writes a
/// sample vitals Bundle, prints curl commands, and runs the daemon on the
/// demo data dir until Ctrl-C.
fn serve(ctx: &Ctx, args: &Args, dir: &DataDir) -> Result<()> {
    use crate::tokens::{self, Role};
    let state = dir.open_state()?;
    for t in tokens::list(&state)? {
        if t.name.starts_with("demo-") && t.revoked_at.is_none() {
            tokens::revoke(&state, &t.id)?;
        }
    }
    let stamp = clock::system_now()?.unix_timestamp();
    let mut made = Vec::new();
    for (role, scopes) in [
        (Role::App, vec!["patient/*.rs".parse::<Scope>()?]),
        (Role::Device, vec![]),
        (Role::Admin, vec![]),
    ] {
        let name = format!("demo-{role}-{stamp}");
        let t = tokens::create(&state, &name, role, TENANT, &scopes)?;
        crate::audit::note(
            dir,
            "token",
            &serde_json::json!({"action": "create", "id": t.id, "name": name, "role": role, "tenant": TENANT}),
        )?;
        made.push(t.token);
    }
    let vitals = args.dir.join("vitals.json");
    let reading = synth::round::Reading {
        rr: 24.0,
        spo2: 93.0,
        hr: 118.0,
        ..synth::round::Reading::NORMAL
    };
    let now = bundle::manifest::format_time(clock::system_now()?);
    let doc = synth::round::bundle("p0003", &now, &reading);
    fsutil::write_atomic(
        &vitals,
        serde_json::to_string_pretty(&doc)?.as_bytes(),
        0o644,
        "demo",
    )?;
    let mut config = ctx.config.clone();
    config.daemon.listen.clone_from(&args.listen);
    let base = format!("http://{}", args.listen);
    let d = args.dir.display();
    eprintln!(
        "\nclinicbox is starting on {base} with the demo data dir (Ctrl-C stops it). Try:\n\
         \x20 curl -s {base}/readyz\n\
         \x20 curl -s -H 'Authorization: Bearer {admin}' {base}/status\n\
         \x20 curl -s -H 'Authorization: Bearer {app}' -d '{{\"patient\":\"p0002\"}}' {base}/plugins/acme/news2/news2_latest\n\
         \x20 curl -s -H 'Authorization: Bearer {app}' '{base}/fhir/Observation?patient=p0001&category=vital-signs&_count=2'\n\
         \x20 curl -s -H 'Authorization: Bearer {device}' -H 'Content-Type: application/fhir+json' --data @{d}/vitals.json {base}/fhir/Bundle\n\
         \x20 curl -s -H 'Authorization: Bearer {admin}' {base}/metrics\n\
         \x20 cp some-plugin.cbx {d}/inbox/    # hot-installed within seconds\n\
         (these demo tokens are for tenant {TENANT}; make real ones with `clinicbox token create`)",
        app = made[0],
        device = made[1],
        admin = made[2],
    );
    let reload_config = config.clone();
    crate::daemon::run(
        dir.clone(),
        config,
        Box::new(move || Ok(reload_config.clone())),
        |url| eprintln!("clinicbox: serving on {url}"),
    )
}
