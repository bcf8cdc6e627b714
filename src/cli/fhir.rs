//! `clinicbox fhir …`: import into, read from and search the FHIR cache.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use serde::Serialize;

use super::Ctx;
use crate::fhir::import::{self, Options};
use crate::fhir::search::{self, Grants, SearchContext};
use crate::fhir::{self, synth};
use crate::scopes::Scope;

/// `fhir` subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Import Bulk Data NDJSON (.ndjson, .ndjson.gz), export manifests and Bundles.
    Import {
        /// The tenant (clinic) to import into.
        #[arg(long)]
        tenant: String,
        /// Roll back a whole file on its first error.
        #[arg(long)]
        strict: bool,
        /// Files to import, in order.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Read one resource: `Type/id`.
    Read {
        #[command(flatten)]
        scope: ScopeArgs,
        /// `Type/id`.
        reference: String,
    },
    /// Search: `'Observation?category=vital-signs&_sort=-date&_count=50'`.
    Search {
        #[command(flatten)]
        scope: ScopeArgs,
        /// `Type?params`.
        query: String,
    },
    /// Counts per tenant and type, and the database size.
    Stats,
    /// Write a deterministic synthetic data set as Bulk Data NDJSON.
    Synth {
        /// Output directory (one sub-directory per tenant).
        #[arg(long)]
        out: PathBuf,
        /// Tenants, comma-separated.
        #[arg(long, default_value = "clinic-a,clinic-b", value_delimiter = ',')]
        tenants: Vec<String>,
        /// Patients per tenant.
        #[arg(long, default_value_t = 5)]
        patients: usize,
        /// Resources per patient (including the Patient).
        #[arg(long, default_value_t = 200)]
        per_patient: usize,
        /// PRNG seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

/// The search context options shared by `read` and `search`.
#[derive(Debug, clap::Args)]
pub struct ScopeArgs {
    /// The tenant (clinic).
    #[arg(long)]
    tenant: String,
    /// Restrict to this patient's compartment.
    #[arg(long)]
    patient: Option<String>,
    /// Restrict to these SMART v2 scopes (as a plugin would be); repeatable.
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
}

/// Who is asking on the command line, for the audit record.
fn requester() -> String {
    format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
    )
}

/// Records a `fhir.access` (durable before anything is printed).
fn record_access(
    ctx: &Ctx,
    scope: &ScopeArgs,
    action: &str,
    query: &str,
    ok: bool,
    detail: &str,
) -> Result<()> {
    crate::audit::note(
        &ctx.dir,
        "fhir.access",
        &serde_json::json!({
            "action": action,
            "host_fn": if action == "read" { "fhir_read" } else { "fhir_search" },
            "requester": requester(),
            "tenant": scope.tenant,
            "patient": scope.patient,
            "query": query,
            "outcome": if ok { "ok" } else { "denied" },
            "detail": detail,
        }),
    )?;
    Ok(())
}

/// Refuses (and records the refusal) when the audit backlog is over budget.
fn fail_closed(ctx: &Ctx, scope: &ScopeArgs, action: &str, query: &str) -> Result<()> {
    let reason = crate::audit::over_budget(&ctx.dir.open_audit()?, &ctx.config.limits)?;
    if let Some(reason) = reason {
        record_access(ctx, scope, action, query, false, &reason)?;
        return Err(crate::runtime::CallError::FailClosed(reason).into());
    }
    Ok(())
}

impl ScopeArgs {
    fn parsed(&self) -> Result<Vec<Scope>> {
        self.scopes
            .iter()
            .map(|s| s.parse::<Scope>().map_err(anyhow::Error::from))
            .collect()
    }
}

#[derive(Serialize)]
struct Stats {
    database: String,
    bytes: u64,
    tenants: BTreeMap<String, BTreeMap<String, (u64, u64)>>,
}

/// Runs a `fhir` subcommand.
pub fn run(ctx: &Ctx, cmd: Cmd) -> Result<()> {
    let limits = &ctx.config.limits;
    match cmd {
        Cmd::Import {
            tenant,
            strict,
            files,
        } => {
            let mut conn = fhir::open(&ctx.dir)?;
            let tty = std::io::stderr().is_terminal();
            let now_ms = crate::clock::system_now()?.unix_timestamp() * 1000;
            let opts = Options {
                tenant,
                strict,
                now_ms,
                progress: tty.then_some(progress as fn(u64)),
            };
            let started = std::time::Instant::now();
            let reports = import::import_files(&mut conn, &files, &opts, limits)?;
            crate::audit::note(
                &ctx.dir,
                "fhir.import",
                &serde_json::json!({"action": "import", "tenant": opts.tenant, "files": reports}),
            )?;
            if let Some(bar) = PROGRESS.get() {
                bar.finish_and_clear();
            }
            let secs = started.elapsed().as_secs_f64();
            let errors: usize = reports.iter().map(|r| r.skipped as usize).sum();
            for r in &reports {
                for e in &r.errors {
                    eprintln!("{e}");
                }
            }
            ctx.out.emit(&reports, || summary(&reports, secs))?;
            if errors > 0 {
                anyhow::bail!("{errors} lines or entries were skipped (see above)");
            }
            Ok(())
        }
        Cmd::Read { scope, reference } => {
            let conn = fhir::open(&ctx.dir)?;
            let scopes = scope.parsed()?;
            let sctx = context(&scope, &scopes);
            fail_closed(ctx, &scope, "read", &reference)?;
            let result = search::read(&conn, &sctx, &reference);
            let detail = match &result {
                Ok(_) => "1 resource".to_owned(),
                Err(e) => e.to_string(),
            };
            record_access(ctx, &scope, "read", &reference, result.is_ok(), &detail)?;
            ctx.out.raw(&result?)
        }
        Cmd::Search { scope, query } => {
            let conn = fhir::open(&ctx.dir)?;
            let scopes = scope.parsed()?;
            let sctx = context(&scope, &scopes);
            let q = search::parse(&query, limits)?;
            fail_closed(ctx, &scope, "search", &query)?;
            let result = search::search(&conn, &sctx, &q);
            let detail = match &result {
                Ok(b) => format!("{} resources", b.total.unwrap_or(b.entry.len() as u64)),
                Err(e) => e.to_string(),
            };
            record_access(ctx, &scope, "search", &query, result.is_ok(), &detail)?;
            let bundle = result?;
            let text = serde_json::to_string(&bundle)?;
            ctx.out.emit(&bundle, || text)
        }
        Cmd::Stats => {
            let conn = fhir::open(&ctx.dir)?;
            let mut tenants: BTreeMap<String, BTreeMap<String, (u64, u64)>> = BTreeMap::new();
            let mut stmt = conn.prepare(
                "SELECT t.name, r.type, sum(r.deleted = 0), sum(r.deleted) FROM resources r JOIN tenants t ON t.tid = r.tid GROUP BY 1, 2 ORDER BY 1, 2",
            )?;
            for row in stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u64>(2)?,
                    r.get::<_, u64>(3)?,
                ))
            })? {
                let (t, ty, live, dead) = row?;
                tenants.entry(t).or_default().insert(ty, (live, dead));
            }
            let path = ctx.dir.fhir_db();
            let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            let s = Stats {
                database: path.display().to_string(),
                bytes,
                tenants,
            };
            ctx.out.emit(&s, || {
                let mut out = format!("{} ({:.1} MiB)\n", s.database, s.bytes as f64 / 1048576.0);
                for (t, types) in &s.tenants {
                    for (ty, (live, dead)) in types {
                        out += &format!("{t:<16} {ty:<22} {live:>9} live {dead:>7} deleted\n");
                    }
                }
                out
            })
        }
        Cmd::Synth {
            out,
            tenants,
            patients,
            per_patient,
            seed,
        } => {
            let spec = synth::SynthSpec {
                tenants,
                patients_per_tenant: patients,
                resources_per_patient: per_patient,
                seed,
                ..synth::SynthSpec::default()
            };
            let counts = synth::write_ndjson(&spec, &out)
                .with_context(|| format!("cannot write {}", out.display()))?;
            ctx.out.emit(&counts, || {
                let n: u64 = counts.values().flat_map(|m| m.values()).sum();
                format!(
                    "wrote {n} resources under {} (one directory per tenant)",
                    out.display()
                )
            })
        }
    }
}

fn context<'a>(args: &'a ScopeArgs, scopes: &'a [Scope]) -> SearchContext<'a> {
    SearchContext {
        tenant: &args.tenant,
        patient: args.patient.as_deref(),
        grants: if args.scopes.is_empty() {
            Grants::All
        } else {
            Grants::Scopes(scopes)
        },
    }
}

/// The terminal's progress display during `fhir import` (none when stderr
/// is not a terminal: then only the summary is printed).
static PROGRESS: std::sync::OnceLock<indicatif::ProgressBar> = std::sync::OnceLock::new();

fn progress(more_lines: u64) {
    if let Some(bar) = PROGRESS.get() {
        bar.inc(more_lines);
    }
}

fn summary(reports: &[import::FileReport], secs: f64) -> String {
    let mut out = String::new();
    let mut total = 0u64;
    for r in reports {
        out += &format!(
            "{} ({}){}\n",
            r.file,
            r.kind,
            if r.rolled_back {
                ": ROLLED BACK (--strict)"
            } else {
                ""
            }
        );
        for (ty, c) in &r.types {
            total += c.created + c.updated + c.unchanged + c.stale + c.deleted;
            out += &format!(
                "  {ty:<22} {:>8} created {:>8} updated {:>8} unchanged {:>6} stale {:>6} deleted\n",
                c.created, c.updated, c.unchanged, c.stale, c.deleted
            );
        }
        if r.skipped > 0 {
            out += &format!("  skipped {} (errors above)\n", r.skipped);
        }
    }
    out += &format!(
        "{total} resources in {secs:.1}s ({:.0}/s)",
        total as f64 / secs.max(1e-9)
    );
    out
}
