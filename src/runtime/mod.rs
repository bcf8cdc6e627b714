//! The plugin runtime: installed plugins run on the Extism ABI (wasmtime)
//! with no ambient authority, one tenant and one patient per call.
//!
//! - [`abi`]: what a module may import and must export (checked at install);
//! - [`host`]: the Extism kernel, linking and the call sequence on wasmtime;
//! - [`host_fns`]: `fhir_search`, `fhir_read`, `audit_note`;
//! - [`grants`]: per-tenant scope grants, failure counts and quarantine;
//! - [`record`]: call and access records in `audit.db`;
//! - this file: loading (compile once per installed version), the instance
//!   pool, hot swap, and the call path.
//!
//! Invariants:
//! - no WASI, no HTTP hosts, no filesystem paths; memory and time
//!   limits come from the manifest, clamped by [`Limits`];
//! - a host function is linked into an instance only when the tenant's
//!   grants allow it; otherwise the import resolves to a stub that records
//!   and returns the denial (and the linked ones still check per call);
//! - an instance only ever serves one (tenant, patient): the pool keys idle
//!   instances by it, so state a plugin keeps in globals or its heap can
//!   never reach another patient's call (a fresh instance is made instead);
//!   idle instances are bounded box-wide by memory
//!   (`Limits::idle_instances_mib`), the least recently idle of any plugin
//!   dropped first;
//! - a trap, a limit, a host-function panic or any error discards the
//!   instance; it is never returned to the pool;
//! - a call runs on the version current when it started: installing or
//!   rolling back swaps an `Arc` and in-flight calls finish on the old one;
//! - every call, refused or not, is recorded before its output is returned.

pub mod abi;
pub(crate) mod conns;
pub mod grants;
pub mod host;
pub mod host_fns;
pub mod record;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rusqlite::OptionalExtension;
use sha2::{Digest, Sha256};

use crate::audit::log::AuditLog;
use crate::bundle::container;
use crate::bundle::manifest::{Manifest, format_time};
use crate::datadir::DataDir;
use crate::limits::Limits;
use crate::scopes::Scope;
use conns::Db;

/// What every call can reach: the data dir and the limits.
#[derive(Debug)]
pub struct Env {
    /// The data dir (its fhir.db, audit.db, state.db).
    pub dir: DataDir,
    /// Bounds.
    pub limits: Limits,
    /// The audit log (group commit).
    pub audit: AuditLog,
}

/// The per-call context host functions see. Built fresh for every call and
/// taken back from the instance when the call ends.
#[derive(Debug)]
pub struct CallCtx {
    /// This call's id.
    pub call_id: String,
    /// The clinic.
    pub tenant: String,
    /// The patient.
    pub patient: String,
    /// Plugin name.
    pub plugin: String,
    /// Scopes granted to the plugin for this tenant.
    pub scopes: Vec<Scope>,
    /// Host calls made so far in this call.
    pub host_calls: AtomicU32,
    /// Nanoseconds host functions spent in SQLite (queries and access
    /// records) during this call.
    pub db_ns: AtomicU64,
    /// Nanoseconds host functions kept the plugin waiting during this call
    /// without computing for it: their wall time less their thread's CPU
    /// time (a stalled disk, a lock, the thread descheduled).
    pub host_wait_ns: AtomicU64,
    /// Environment.
    pub env: Arc<Env>,
    /// Access records queued by host functions during this call; the call
    /// waits for them before its output may leave.
    pub pending: Mutex<Vec<crate::audit::log::Pending>>,
}

/// A request to run one exported function.
#[derive(Debug, Clone)]
pub struct CallRequest {
    /// Tenant (clinic).
    pub tenant: String,
    /// Patient id.
    pub patient: String,
    /// The requesting app or user.
    pub requester: String,
    /// Purpose of use (e.g. TREAT).
    pub purpose: String,
    /// `vendor/name`.
    pub plugin: String,
    /// Exported function.
    pub function: String,
    /// Input bytes (JSON).
    pub input: Vec<u8>,
}

/// A successful call.
#[derive(Debug, Clone)]
pub struct CallOutput {
    /// The call's id (its audit record).
    pub call_id: String,
    /// Version that served it.
    pub version: String,
    /// Output bytes.
    pub output: Vec<u8>,
    /// Time the instance ran this call (guest code and host functions),
    /// in µs; the call record's `duration_us` adds the lookups around it.
    pub guest_us: u64,
    /// Of `guest_us`, the time host functions spent in SQLite, in µs.
    pub host_db_us: u64,
}

/// Why a call failed. The call is recorded in every case.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No such plugin.
    #[error("plugin {0} is not installed")]
    NotInstalled(String),
    /// Quarantined after repeated failures.
    #[error(
        "plugin {plugin} is quarantined ({reason}); an admin must run `clinicbox plugin enable {plugin}`"
    )]
    Quarantined {
        /// Plugin.
        plugin: String,
        /// Why.
        reason: String,
    },
    /// Refused before running (bad context, nothing granted to run with).
    #[error("refused: {0}")]
    Refused(String),
    /// The plugin has no such exported function.
    #[error("{plugin} does not export {function:?}")]
    NotExported {
        /// Plugin.
        plugin: String,
        /// The function asked for.
        function: String,
    },
    /// The unsynced audit backlog is over its disk budget (fail closed).
    #[error("{0}")]
    FailClosed(String),
    /// The appliance failed (database, loading the stored bundle); not
    /// the caller's or the plugin's fault.
    #[error("internal error: {0}")]
    Internal(String),
    /// The call ran but its record, or the record of a data access it
    /// made, could not be written (a full disk, say): its output is
    /// withheld. A retry once the audit log can be written again runs the
    /// call again.
    #[error("{0}")]
    Unrecorded(String),
    /// No instance became free in time.
    #[error("plugin {0} is busy: no instance free within the wait limit")]
    Busy(String),
    /// The plugin failed: returned an error, trapped, or hit a limit.
    #[error("plugin {plugin} {function} failed: {message}")]
    Failed {
        /// Plugin.
        plugin: String,
        /// Function.
        function: String,
        /// What happened.
        message: String,
        /// The plugin misbehaved (a trap, its time or memory limit, an
        /// oversized output), as opposed to answering with its own error
        /// (Extism `error_set`, e.g. "spo2 must be between 0 and 100") or
        /// the host failing (a panic, a database or audit error in a host
        /// function). Only misbehaviour counts towards quarantine: a
        /// caller's bad input, a call in a tenant where the plugin was
        /// granted nothing, or a sick disk must not let one caller disable
        /// a plugin for the box.
        misbehaved: bool,
    },
}

/// One installed version, compiled, with its instance pool.
struct Loaded {
    version: String,
    digest: String,
    manifest: Manifest,
    engine: host::HostEngine,
    module: wasmtime::Module,
    ilimits: host::InstanceLimits,
    pool: Mutex<Pool>,
    freed: Condvar,
}

/// A plugin version's instances: idle ones (oldest first) and a count of
/// those out serving calls.
#[derive(Default)]
struct Pool {
    idle: Vec<Idle>,
    busy: usize,
}

/// Which instances may serve a call: same tenant, same patient, and the
/// same host functions linked (a grant change means new instances).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PoolKey {
    tenant: String,
    patient: String,
    linked: Vec<&'static str>,
}

/// An idle instance, counted in the runtime's idle bytes until it is
/// taken or dropped (evicted, or with its version on a hot swap).
struct Idle {
    key: PoolKey,
    instance: Option<host::Instance>,
    bytes: usize,
    /// When it went idle (box-wide least-recently-used order).
    since: Instant,
    idle_bytes: Arc<AtomicUsize>,
}

impl Drop for Idle {
    fn drop(&mut self) {
        self.idle_bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// The runtime: installed plugins by name, compiled on first use.
pub struct Runtime {
    env: Arc<Env>,
    plugins: RwLock<HashMap<String, Arc<Loaded>>>,
    /// Held while loading; holds the engine, made on first load.
    loading: Mutex<Option<host::HostEngine>>,
    /// Memory held by idle instances of every plugin, in bytes.
    idle_bytes: Arc<AtomicUsize>,
}

impl Runtime {
    /// A runtime over an initialised data dir.
    pub fn new(dir: DataDir, limits: Limits) -> Result<Runtime> {
        let audit = AuditLog::open(&dir, &limits)?;
        Ok(Runtime {
            env: Arc::new(Env { dir, limits, audit }),
            plugins: RwLock::new(HashMap::new()),
            loading: Mutex::new(None),
            idle_bytes: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Bytes held by idle instances, box-wide (bounded by
    /// `Limits::idle_instances_mib`).
    pub fn idle_bytes(&self) -> usize {
        self.idle_bytes.load(Ordering::Relaxed)
    }

    /// Drops the compiled code and idle instances of plugins that are no
    /// longer installed, or no longer at the version loaded (`plugin
    /// remove`, `plugin rollback`, an install, perhaps by another process).
    /// A call loads the current version anyway; this frees what the old
    /// one held, which otherwise stays until the idle budget pushes its
    /// instances out, and its code for good. Calls in flight keep their
    /// own reference and finish on the version they started with. Returns
    /// the plugins dropped.
    pub fn forget_stale(&self) -> Result<Vec<String>> {
        // The loader's lock (taken before the map's, as `current` does):
        // no version is loaded between reading what is current and
        // dropping what is not, so a version loaded just now is never
        // taken for a stale one.
        let loader = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        let current: HashMap<String, String> = conns::with(&self.env.dir, Db::State, |s| {
            let mut stmt = s.prepare_cached("SELECT name, current FROM plugins")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })?;
        let mut names: Vec<String> = self
            .plugins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(name, l)| current.get(*name) != Some(&l.digest))
            .map(|(name, _)| name.clone())
            .collect();
        if names.is_empty() {
            return Ok(names);
        }
        names.sort();
        let stale: Vec<Arc<Loaded>> = {
            let mut map = self.plugins.write().unwrap_or_else(|p| p.into_inner());
            names.iter().filter_map(|n| map.remove(n)).collect()
        };
        // Dropped here, outside both locks: instances take a moment.
        drop(loader);
        drop(stale);
        Ok(names)
    }

    /// The current version of `name`, loading (compiling) it if the cached
    /// one is missing or no longer current. Cheap when nothing changed.
    fn current(&self, name: &str) -> Result<Arc<Loaded>, CallError> {
        let refused = |e: String| CallError::Internal(e);
        let mut last_err = String::new();
        // A concurrent install may replace (and clean up) the version we are
        // about to load; then the next attempt sees the newer one.
        for _ in 0..3 {
            let digest: Option<String> = conns::memo(&self.env.dir, "current", name, |state| {
                Ok(state
                    .prepare_cached("SELECT current FROM plugins WHERE name = ?1")?
                    .query_row([name], |r| r.get(0))
                    .optional()?)
            })
            .map_err(|e| refused(format!("{e:#}")))?;
            let Some(digest) = digest else {
                return Err(CallError::NotInstalled(name.to_owned()));
            };
            if let Some(l) = self.cached(name, &digest) {
                return Ok(l);
            }
            // One loader at a time; re-check after waiting for it.
            let mut engine = self.loading.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(l) = self.cached(name, &digest) {
                return Ok(l);
            }
            if engine.is_none() {
                *engine = Some(
                    engine_for(&self.env.dir, &self.env.limits)
                        .map_err(|e| refused(format!("{e:#}")))?,
                );
            }
            let Some(engine) = engine.as_ref() else {
                continue;
            };
            match conns::with(&self.env.dir, Db::State, |state| {
                self.load(engine, state, name, &digest)
            }) {
                Ok(loaded) => {
                    let loaded = Arc::new(loaded);
                    if let Ok(mut m) = self.plugins.write() {
                        m.insert(name.to_owned(), loaded.clone());
                    }
                    return Ok(loaded);
                }
                Err(e) => {
                    // Perhaps replaced meanwhile: read `current` again.
                    conns::forget(&self.env.dir, "current", name);
                    last_err = format!("cannot load {name}: {e:#}");
                }
            }
        }
        Err(refused(last_err))
    }

    /// The data dir, limits and audit log every call uses.
    pub fn env(&self) -> &Env {
        &self.env
    }

    /// Installed plugins and their current manifest digests, by name.
    fn installed(&self) -> Result<Vec<(String, String)>> {
        conns::memo(&self.env.dir, "installed", "", |state| {
            let mut stmt =
                state.prepare_cached("SELECT name, current FROM plugins ORDER BY name")?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Loads (compiles, or takes from the code cache) every installed
    /// plugin now, so the first call does not pay for it. Returns each
    /// plugin with its version, or why it could not be loaded.
    pub fn preload(&self) -> Result<Vec<(String, Result<String, String>)>> {
        Ok(self
            .installed()?
            .into_iter()
            .map(|(name, _)| {
                let r = self
                    .current(&name)
                    .map(|l| l.version.clone())
                    .map_err(|e| e.to_string());
                (name, r)
            })
            .collect())
    }

    /// Every subscription of every installed plugin's current version, as
    /// (plugin, subscription). Cheap when nothing changed: one query.
    pub fn subscriptions(&self) -> Result<Vec<(String, crate::bundle::manifest::Subscription)>> {
        let mut out = Vec::new();
        for (name, digest) in self.installed()? {
            let loaded = match self.cached(&name, &digest) {
                Some(l) => l,
                None => match self.current(&name) {
                    Ok(l) => l,
                    Err(e) => {
                        log::warn!("subscriptions of {name}: {e}");
                        continue;
                    }
                },
            };
            for sub in &loaded.manifest.subscriptions {
                out.push((name.clone(), sub.clone()));
            }
        }
        Ok(out)
    }

    fn cached(&self, name: &str, digest: &str) -> Option<Arc<Loaded>> {
        self.plugins
            .read()
            .ok()
            .and_then(|m| m.get(name).cloned())
            .filter(|l| l.digest == digest)
    }

    fn load(
        &self,
        engine: &host::HostEngine,
        state: &rusqlite::Connection,
        name: &str,
        digest: &str,
    ) -> Result<Loaded> {
        let (version, manifest_json, bundle_sha): (String, String, String) = state.query_row(
            "SELECT version, manifest, bundle_sha256 FROM plugin_versions WHERE digest = ?1",
            [digest],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let limits = &self.env.limits;
        let manifest = Manifest::parse(manifest_json.as_bytes(), limits)?;
        let path = self.env.dir.plugins_dir().join(format!("{digest}.cbx"));
        let bytes = crate::fsutil::read_bounded(&path, limits.max_bundle_bytes)?;
        // The stored file must still be exactly what was verified at install.
        anyhow::ensure!(
            hex::encode(Sha256::digest(&bytes)) == bundle_sha,
            "{} changed on disk since it was installed",
            path.display()
        );
        let wasm = container::parse(&bytes, limits)?.wasm.to_vec();
        anyhow::ensure!(
            hex::encode(Sha256::digest(&wasm)) == manifest.wasm_sha256,
            "wasm digest mismatch in {}",
            path.display()
        );
        let memory_mib = manifest.limits.memory_mib.min(limits.max_plugin_memory_mib);
        let timeout_ms = u64::from(
            manifest
                .limits
                .timeout_ms
                .max(limits.min_plugin_timeout_ms)
                .min(limits.max_plugin_timeout_ms),
        );
        let module = engine
            .compile(&wasm)
            .with_context(|| format!("cannot compile {name} {version}"))?;
        let ilimits = host::InstanceLimits {
            plugin: name.to_owned(),
            memory_bytes: memory_mib as usize * 1024 * 1024,
            timeout: Duration::from_millis(timeout_ms),
            table_elements: limits.max_table_elements,
            log_bytes_per_call: limits.max_log_bytes_per_call,
            log_line_bytes: limits.max_log_line_bytes,
        };
        Ok(Loaded {
            version,
            digest: digest.to_owned(),
            manifest,
            engine: engine.clone(),
            module,
            ilimits,
            pool: Mutex::new(Pool::default()),
            freed: Condvar::new(),
        })
    }

    /// Runs one call and records it.
    pub fn call(&self, req: &CallRequest) -> Result<CallOutput, CallError> {
        let started = Instant::now();
        let call_id = match crate::audit::log::new_id() {
            Ok(id) => id,
            Err(e) => return Err(CallError::Internal(format!("{e:#}"))),
        };
        let mut rec = record::CallRecord {
            call_id: call_id.clone(),
            time: format_time(time::OffsetDateTime::now_utc()),
            plugin: req.plugin.clone(),
            version: String::new(),
            digest: String::new(),
            function: req.function.clone(),
            tenant: req.tenant.clone(),
            patient: req.patient.clone(),
            requester: req.requester.clone(),
            purpose: req.purpose.clone(),
            outcome: String::new(),
            detail: String::new(),
            duration_us: 0,
        };
        let mut pending = Vec::new();
        let result = self.call_inner(req, &call_id, &mut rec, &mut pending);
        rec.duration_us = started.elapsed().as_micros() as u64;
        let (outcome, detail) = match &result {
            Ok(o) => ("ok", format!("{} bytes out", o.output.len())),
            Err(CallError::Quarantined { reason, .. }) => ("quarantined", reason.clone()),
            Err(e @ (CallError::Failed { .. } | CallError::Internal(_))) => {
                ("error", e.to_string())
            }
            Err(e) => ("refused", e.to_string()),
        };
        rec.outcome = outcome.to_owned();
        // call_inner may have left a note (dropped log bytes).
        rec.detail = if rec.detail.is_empty() {
            detail
        } else {
            format!("{detail}; {}", rec.detail)
        };
        record::call(&self.env.audit, &rec).map_err(|e| {
            CallError::Unrecorded(format!("cannot record the call, output withheld: {e:#}"))
        })?;
        // Queued before the call record, so already settled: any failure
        // means an access went unrecorded, and the output stays inside.
        for p in pending {
            p.wait().map_err(|e| {
                CallError::Unrecorded(format!(
                    "cannot record a data access of the call, output withheld: {e:#}"
                ))
            })?;
        }
        let now = format_time(time::OffsetDateTime::now_utc());
        let dir = &self.env.dir;
        let quarantined_now = match &result {
            Ok(_) => {
                // No write (and no write lock) unless it had been failing.
                // Read now, not from the memo: another call may have
                // failed while this one ran.
                let reset = conns::with(dir, Db::State, |state| {
                    if grants::failing(state, &req.plugin).unwrap_or(true) {
                        grants::reset_failures(state, &req.plugin)?;
                    }
                    Ok(())
                });
                if let Err(e) = reset {
                    log::warn!("{}: cannot reset its failure count: {e:#}", req.plugin);
                }
                false
            }
            Err(CallError::Failed {
                message,
                misbehaved: true,
                ..
            }) => conns::with(dir, Db::State, |state| {
                grants::note_failure(
                    state,
                    &req.plugin,
                    message,
                    self.env.limits.quarantine_after,
                    &now,
                )
            })
            .unwrap_or(false),
            Err(_) => false,
        };
        if quarantined_now {
            let body = serde_json::json!({
                "action": "quarantine",
                "plugin": req.plugin,
                "version": rec.version,
                "outcome": "quarantined",
                "reason": format!(
                    "quarantined after {} consecutive failures; last: {}",
                    self.env.limits.quarantine_after, rec.detail
                ),
            });
            let _ = self
                .env
                .audit
                .append(crate::audit::log::Entry::new("quarantine", &body));
        }
        result
    }

    fn call_inner(
        &self,
        req: &CallRequest,
        call_id: &str,
        rec: &mut record::CallRecord,
        pending: &mut Vec<crate::audit::log::Pending>,
    ) -> Result<CallOutput, CallError> {
        if !crate::fhir::is_valid_tenant(&req.tenant) || !crate::fhir::is_valid_id(&req.patient) {
            return Err(CallError::Refused(
                "a call needs a valid tenant and patient id".into(),
            ));
        }
        conns::recheck(&self.env.dir).map_err(|e| CallError::Internal(format!("{e:#}")))?;
        let quarantine = conns::memo(&self.env.dir, "quarantine", &req.plugin, |state| {
            grants::quarantined(state, &req.plugin)
        })
        .map_err(|e| CallError::Internal(format!("{e:#}")))?;
        if let Some(reason) = quarantine {
            return Err(CallError::Quarantined {
                plugin: req.plugin.clone(),
                reason,
            });
        }
        let closed = conns::with(&self.env.dir, Db::Audit, |audit| {
            crate::audit::over_budget(audit, &self.env.limits)
        })
        .map_err(|e| CallError::Internal(format!("{e:#}")))?;
        if let Some(reason) = closed {
            return Err(CallError::FailClosed(reason));
        }
        let loaded = self.current(&req.plugin)?;
        rec.version = loaded.version.clone();
        rec.digest = loaded.digest.clone();
        if !loaded.manifest.exports.contains(&req.function) {
            return Err(CallError::NotExported {
                plugin: req.plugin.clone(),
                function: req.function.clone(),
            });
        }
        let scopes = grants::granted_memo(&self.env.dir, &req.tenant, &req.plugin)
            .map_err(|e| CallError::Internal(format!("{e:#}")))?;
        let ctx = Arc::new(CallCtx {
            call_id: call_id.to_owned(),
            tenant: req.tenant.clone(),
            patient: req.patient.clone(),
            plugin: req.plugin.clone(),
            scopes,
            host_calls: AtomicU32::new(0),
            db_ns: AtomicU64::new(0),
            host_wait_ns: AtomicU64::new(0),
            env: self.env.clone(),
            pending: Mutex::new(Vec::new()),
        });
        let linked = host_fns::linked(&ctx.scopes);
        let key = PoolKey {
            tenant: req.tenant.clone(),
            patient: req.patient.clone(),
            linked: linked.clone(),
        };
        let mut instance = self.checkout(&loaded, &key, &req.plugin)?;
        let fail = |message: String, misbehaved: bool| CallError::Failed {
            plugin: req.plugin.clone(),
            function: req.function.clone(),
            message,
            misbehaved,
        };
        let ran = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            instance.call(
                &req.function,
                &req.input,
                Some(ctx.clone()),
                self.env.limits.max_output_bytes,
            )
        }));
        let guest_us = ran.elapsed().as_micros() as u64;
        let host_wait = Duration::from_nanos(ctx.host_wait_ns.load(Ordering::Relaxed));
        pending.append(&mut ctx.pending.lock().unwrap_or_else(|p| p.into_inner()));
        let host_db_us = ctx.db_ns.load(Ordering::Relaxed) / 1000;
        let dropped = instance.dropped_log_bytes;
        if dropped > 0 {
            log::warn!(
                "{} {}: {dropped} bytes of plugin log over the cap of {} per call dropped",
                req.plugin,
                req.function,
                self.env.limits.max_log_bytes_per_call
            );
            rec.detail = format!("{dropped} log bytes over the cap dropped");
        }
        let outcome = match result {
            // The host's own failures (a panic, a database or audit error
            // inside a host function) are not the plugin's: they fail the
            // call but count nothing towards its quarantine.
            Err(_) => Err(fail(
                "panicked inside the host; instance discarded".into(),
                false,
            )),
            // Out of time while the host kept it waiting: a slow host,
            // not a plugin too long.
            Ok(Err(e @ host::Failure::Timeout))
                if host_made_it_wait(host_wait, loaded.ilimits.timeout) =>
            {
                Err(fail(
                    format!(
                        "{}; host functions kept it waiting {:.1} ms, so it is not counted \
                         towards quarantine",
                        describe(&e, &loaded.ilimits),
                        host_wait.as_secs_f64() * 1e3
                    ),
                    false,
                ))
            }
            Ok(Err(e)) => Err(fail(
                describe(&e, &loaded.ilimits),
                !matches!(e, host::Failure::Guest(_) | host::Failure::Host(_)),
            )),
            Ok(Ok(out)) => Ok(out),
        };
        match outcome {
            Ok(output) => {
                self.checkin(&loaded, key, instance);
                Ok(CallOutput {
                    call_id: call_id.to_owned(),
                    version: loaded.version.clone(),
                    output,
                    guest_us,
                    host_db_us,
                })
            }
            Err(e) => {
                drop(instance);
                self.release(&loaded);
                Err(e)
            }
        }
    }

    /// An instance for `key`: an idle one that served the same tenant and
    /// patient, or a new one; waits while the plugin has
    /// `max_instances_per_plugin` out serving calls.
    fn checkout(
        &self,
        loaded: &Loaded,
        key: &PoolKey,
        name: &str,
    ) -> Result<host::Instance, CallError> {
        let limits = &self.env.limits;
        let deadline = Instant::now() + Duration::from_millis(limits.pool_wait_ms);
        let mut pool = loaded.pool.lock().unwrap_or_else(|p| p.into_inner());
        while pool.busy >= limits.max_instances_per_plugin {
            let now = Instant::now();
            if now >= deadline {
                return Err(CallError::Busy(name.to_owned()));
            }
            pool = loaded
                .freed
                .wait_timeout(pool, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        pool.busy += 1;
        if let Some(i) = pool.idle.iter().rposition(|x| &x.key == key)
            && let Some(instance) = pool.idle.remove(i).instance.take()
        {
            return Ok(instance);
        }
        drop(pool);
        host::Instance::new(
            &loaded.engine,
            &loaded.module,
            &loaded.manifest.exports,
            &key.linked,
            &loaded.ilimits,
        )
        .map_err(|e| {
            self.release(loaded);
            CallError::Internal(format!("cannot instantiate {name}: {e:#}"))
        })
    }

    /// Returns a healthy instance to the pool, keeping it idle for its
    /// patient within the box-wide idle memory budget
    /// (`Limits::idle_instances_mib`): the least recently idle instances of
    /// any plugin are dropped first to make room.
    fn checkin(&self, loaded: &Loaded, key: PoolKey, instance: host::Instance) {
        let budget = self.env.limits.idle_instances_mib as usize * 1024 * 1024;
        let bytes = instance.memory_bytes();
        self.release(loaded);
        if bytes > budget {
            return;
        }
        // One pool lock at a time (never two), so check-ins of different
        // plugins cannot deadlock.
        while self.idle_bytes.load(Ordering::Relaxed) + bytes > budget {
            if !self.evict_oldest_idle() {
                break;
            }
        }
        let mut pool = loaded.pool.lock().unwrap_or_else(|p| p.into_inner());
        if self.idle_bytes.load(Ordering::Relaxed) + bytes <= budget {
            self.idle_bytes.fetch_add(bytes, Ordering::Relaxed);
            pool.idle.push(Idle {
                key,
                instance: Some(instance),
                bytes,
                since: Instant::now(),
                idle_bytes: self.idle_bytes.clone(),
            });
        }
    }

    /// Drops the box's least recently idle instance; false if none is idle.
    fn evict_oldest_idle(&self) -> bool {
        let loaded: Vec<Arc<Loaded>> = self
            .plugins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let mut oldest: Option<(Instant, &Arc<Loaded>)> = None;
        for l in &loaded {
            let since = l
                .pool
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .idle
                .first()
                .map(|i| i.since);
            if let Some(t) = since
                && oldest.is_none_or(|(o, _)| t < o)
            {
                oldest = Some((t, l));
            }
        }
        let Some((_, l)) = oldest else {
            return false;
        };
        // Dropping the Idle lowers the idle bytes. If another thread took
        // it meanwhile, the caller's next pass looks again.
        let mut pool = l.pool.lock().unwrap_or_else(|p| p.into_inner());
        if !pool.idle.is_empty() {
            pool.idle.remove(0);
        }
        true
    }

    /// Frees the busy slot of an instance that is done serving (returned
    /// to idle, failed, or never started) and wakes one waiting call.
    fn release(&self, loaded: &Loaded) {
        let mut pool = loaded.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.busy = pool.busy.saturating_sub(1);
        loaded.freed.notify_one();
    }
}

/// The wasm engine for `dir`, caching compiled code under the data dir
/// (never in `$HOME`); without a usable cache dir, it compiles every time.
fn engine_for(dir: &DataDir, limits: &Limits) -> Result<host::HostEngine> {
    match cache_dir(dir) {
        Ok(cache) => host::HostEngine::new(limits, Some(&cache)),
        Err(e) => {
            log::warn!("compiled-code cache disabled: {e:#}");
            host::HostEngine::new(limits, None)
        }
    }
}

/// Compiles `wasm` into the compiled-code cache of `dir`, so that the first
/// call of a freshly installed plugin, in any process, does not compile.
pub fn precompile(dir: &DataDir, limits: &Limits, wasm: &[u8]) -> Result<()> {
    engine_for(dir, limits)?.compile(wasm).map(drop)
}

/// The compiled-code cache dir, `<data-dir>/cache/wasmtime`, created
/// private. wasmtime wants it absolute.
fn cache_dir(dir: &DataDir) -> Result<std::path::PathBuf> {
    let cache = dir.cache_dir();
    crate::fsutil::ensure_private_dir(&cache, 0o700)?;
    Ok(cache.canonicalize()?.join("wasmtime"))
}

/// The CPU time this thread has used (`CLOCK_THREAD_CPUTIME_ID`). A call
/// runs on its caller's thread, host functions included.
pub(crate) fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// Whether a call that ran out of its `limit` did so because host
/// functions kept it waiting for at least half of it (wall time in them
/// less their CPU time: a stalled disk behind a search, say, or their
/// thread descheduled on an overloaded box). The call still fails, bounded
/// as always, but that is no evidence against the plugin, so it counts
/// nothing towards quarantine. Time in the plugin's own code always
/// counts: a plugin cannot escape quarantine by spinning, however many of
/// its instances compete for the cores.
fn host_made_it_wait(waited: Duration, limit: Duration) -> bool {
    waited >= limit / 2
}

/// A plugin failure in words: the guest's error message, or the trap. A
/// limit is named as enforced (`l`: the manifest's, within the box's
/// `Limits`), not as signed.
fn describe(e: &host::Failure, l: &host::InstanceLimits) -> String {
    use host::Failure as F;
    match e {
        F::Timeout => format!(
            "exceeded its time limit ({} ms); instance discarded",
            l.timeout.as_millis()
        ),
        F::Memory => format!(
            "memory limit reached ({} MiB); instance discarded",
            l.memory_bytes / (1024 * 1024)
        ),
        F::StackOverflow => "stack overflow (call stack exhausted); instance discarded".into(),
        F::Trap(t) => format!("trapped: {t}; instance discarded"),
        F::OutputTooLarge(..) | F::Guest(_) | F::Host(_) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{host_made_it_wait, thread_cpu_time};

    #[test]
    fn a_timeout_is_the_hosts_when_host_functions_kept_it_waiting_half_the_limit() {
        let ms = Duration::from_millis;
        assert!(host_made_it_wait(ms(25), ms(50)));
        assert!(host_made_it_wait(ms(300), ms(50)));
        assert!(!host_made_it_wait(ms(24), ms(50)));
        assert!(!host_made_it_wait(ms(0), ms(50)));
    }

    #[test]
    fn thread_cpu_time_counts_this_thread_running_not_sleeping_nor_others() {
        // Another thread spins while this one sleeps: a process-wide clock
        // would count its time here.
        let spin = std::thread::spawn(|| {
            let t = Instant::now();
            while t.elapsed() < Duration::from_millis(60) {
                std::hint::spin_loop();
            }
        });
        let t0 = thread_cpu_time();
        std::thread::sleep(Duration::from_millis(40));
        let slept = thread_cpu_time() - t0;
        spin.join().unwrap();
        assert!(slept < Duration::from_millis(10), "{slept:?}");
        let t1 = thread_cpu_time();
        let start = Instant::now();
        while thread_cpu_time() - t1 < Duration::from_millis(20) {
            assert!(start.elapsed() < Duration::from_secs(30), "never ran");
        }
    }
}
