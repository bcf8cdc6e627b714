//! The local API's routes: authentication, roles, and the handlers.
//!
//! | route | who | what |
//! | --- | --- | --- |
//! | `GET /healthz` | anyone | the process is alive |
//! | `GET /readyz` | anyone | plugins loaded, not draining |
//! | `GET /metrics` | admin | Prometheus text |
//! | `GET /status` | admin | JSON: plugins, audit backlog, sync, inbox |
//! | `POST /plugins/{vendor}/{name}/{function}` | app, admin | run a plugin |
//! | `POST /fhir/Observation`, `POST /fhir/Bundle` | device, admin | ingest vitals ([`super::ingest`]) |
//! | `GET /fhir/{Type}?…`, `GET /fhir/{Type}/{id}` | app, admin | search / read within the token's scopes |
//!
//! Invariants:
//! - the tenant always comes from the token; a request naming another
//!   tenant (`X-Tenant`) gets 403;
//! - every 401 and 403 is recorded in the audit log (`api.denied`) before
//!   it is answered, as is every FHIR read or search (`fhir.access`); plugin
//!   calls are recorded by the runtime;
//! - errors are FHIR `OperationOutcome`s that say what was wrong.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use hyper::Method;
use hyper::http::request::Parts;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::App;
use crate::audit::log::Entry;
use crate::fhir::search::{self, Grants, SearchContext, SearchError};
use crate::runtime::conns::{self, Db};
use crate::runtime::{CallError, CallRequest};
use crate::tokens::{self, AuthError, Principal, Role};

/// An answer, before it becomes an HTTP response.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: u16,
    /// Content type.
    pub content_type: &'static str,
    /// Extra headers.
    pub headers: Vec<(&'static str, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl Reply {
    /// A JSON answer.
    pub fn json(status: u16, v: &impl Serialize) -> Reply {
        match serde_json::to_vec(v) {
            Ok(body) => Reply {
                status,
                content_type: "application/json",
                headers: vec![],
                body,
            },
            Err(e) => Reply::error(500, "exception", &format!("cannot encode the answer: {e}")),
        }
    }

    /// A FHIR JSON answer.
    pub fn fhir(status: u16, body: Vec<u8>) -> Reply {
        Reply {
            status,
            content_type: "application/fhir+json",
            headers: vec![],
            body,
        }
    }

    /// An `OperationOutcome` with one error issue (`code` from the FHIR
    /// issue-type value set).
    pub fn error(status: u16, code: &str, diagnostics: &str) -> Reply {
        Reply::fhir(
            status,
            json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]})
                .to_string()
                .into_bytes(),
        )
    }

    /// Adds `Retry-After`.
    pub fn retry_after(mut self, secs: u32) -> Reply {
        self.headers.push(("Retry-After", secs.to_string()));
        self
    }

    fn header(mut self, k: &'static str, v: String) -> Reply {
        self.headers.push((k, v));
        self
    }
}

/// `/healthz` and `/readyz`, answered without authentication and without
/// leaving the executor.
pub fn probe(app: &App, parts: &Parts) -> Option<(&'static str, Reply)> {
    if parts.method != Method::GET {
        return None;
    }
    match parts.uri.path() {
        "/healthz" => Some(("healthz", Reply::json(200, &json!({"status": "ok"})))),
        "/readyz" => {
            let ready = app.ready.load(Ordering::Relaxed) && !app.draining.load(Ordering::Relaxed);
            Some(if ready {
                ("readyz", Reply::json(200, &json!({"status": "ready"})))
            } else {
                (
                    "readyz",
                    Reply::json(
                        503,
                        &json!({"status": if app.draining.load(Ordering::Relaxed) { "draining" } else { "starting" }}),
                    ),
                )
            })
        }
        _ => None,
    }
}

/// Handles one authenticated-route request (on a blocking thread).
pub fn handle(app: &App, peer: SocketAddr, parts: &Parts, body: &[u8]) -> (&'static str, Reply) {
    let path = parts.uri.path();
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let m = &parts.method;
    let (route, roles, allowed): (&'static str, &[Role], &[Method]) = match segs.as_slice() {
        ["metrics"] => ("metrics", &[Role::Admin], &[Method::GET]),
        ["status"] => ("status", &[Role::Admin], &[Method::GET]),
        ["plugins", _, _, _] => ("invoke", &[Role::App, Role::Admin], &[Method::POST]),
        ["fhir", "Observation"] if m == Method::POST => {
            ("ingest", &[Role::Device, Role::Admin], &[Method::POST])
        }
        ["fhir", "Bundle"] | ["fhir"] => ("ingest", &[Role::Device, Role::Admin], &[Method::POST]),
        ["fhir", _] | ["fhir", _, _] => ("fhir", &[Role::App, Role::Admin], &[Method::GET]),
        _ => {
            return (
                "unknown",
                Reply::error(404, "not-found", &format!("no route {path}")),
            );
        }
    };
    if !allowed.contains(m) {
        return (
            route,
            Reply::error(
                405,
                "not-supported",
                &format!("{m} is not allowed on {path}"),
            )
            .header(
                "Allow",
                allowed
                    .iter()
                    .map(Method::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        );
    }
    // One look at state.db for the whole request; its token, plugin,
    // grant and health reads then come from this thread's memo unless
    // state.db changed (runtime::conns).
    let env = app.rt.env();
    let _scope = conns::begin_request(&env.dir, env.limits.state_memo_entries)
        .map_err(|e| log::error!("api: state.db: {e:#}"))
        .ok();
    let who = match authenticate(app, parts) {
        Ok(Ok(p)) => p,
        // state.db could not be read: not the client's fault, and not a
        // refusal to record.
        Err(e) => {
            log::error!("api: token lookup: {e:#}");
            return (
                route,
                Reply::error(503, "transient", "cannot check the token now; retry").retry_after(1),
            );
        }
        Ok(Err(e)) => {
            let reason = e.to_string();
            deny(app, peer, parts, None, 401, &reason);
            return (
                route,
                Reply::error(401, "login", &reason)
                    .header("WWW-Authenticate", "Bearer realm=\"clinicbox\"".into()),
            );
        }
    };
    if !roles.contains(&who.role) {
        let reason = format!(
            "token {} has role {}; {route} needs {}",
            who.id,
            who.role,
            roles
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(" or ")
        );
        deny(app, peer, parts, Some(&who), 403, &reason);
        return (route, Reply::error(403, "forbidden", &reason));
    }
    if let Some(t) = parts.headers.get("x-tenant")
        && t.as_bytes() != who.tenant.as_bytes()
    {
        let reason = format!(
            "token {} acts for tenant {}, not for {}",
            who.id,
            who.tenant,
            String::from_utf8_lossy(t.as_bytes())
        );
        deny(app, peer, parts, Some(&who), 403, &reason);
        return (route, Reply::error(403, "forbidden", &reason));
    }
    let reply = match route {
        "metrics" => metrics(app),
        "status" => status(app),
        "invoke" => invoke(app, &who, &segs, body),
        "ingest" => super::ingest::ingest(app, &who, &segs, body),
        _ => fhir(app, &who, &segs, parts.uri.query()),
    };
    (route, reply)
}

/// The principal the request's bearer token stands for, or why it is
/// refused; `Err` if `state.db` could not be read (the next request looks
/// again: failed reads are not memoised).
fn authenticate(app: &App, parts: &Parts) -> anyhow::Result<Result<Principal, AuthError>> {
    let token = parts
        .headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let Some(token) = token else {
        return Ok(Err(AuthError::Missing));
    };
    let key = hex::encode(tokens::hash(token));
    conns::memo(&app.rt.env().dir, "token", &key, |state| {
        Ok(tokens::authenticate(state, token)?)
    })
}

/// Records a refused request (401/403) durably.
fn deny(
    app: &App,
    peer: SocketAddr,
    parts: &Parts,
    who: Option<&Principal>,
    status: u16,
    reason: &str,
) {
    let body = json!({
        "outcome": "denied",
        "status": status,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "remote": peer.ip().to_string(),
        "token": who.map(|p| &p.id),
        "token_name": who.map(|p| &p.name),
        "role": who.map(|p| p.role),
        "tenant": who.map(|p| &p.tenant),
        "reason": reason,
    });
    if let Err(e) = app.rt.env().audit.append(Entry::new("api.denied", &body)) {
        log::error!("api: cannot record a denied request: {e:#}");
    }
}

/// Who asked, as recorded with calls and accesses.
pub fn requester(who: &Principal) -> String {
    format!("api:{}:{}", who.role, who.name)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvokeBody {
    /// Patient id (or `Patient/<id>`).
    patient: String,
    /// HL7 v3 PurposeOfUse (default TREAT).
    #[serde(default)]
    purpose: Option<String>,
    /// The plugin's input (any JSON; default `{}`).
    #[serde(default)]
    input: Option<Value>,
}

fn invoke(app: &App, who: &Principal, segs: &[&str], body: &[u8]) -> Reply {
    let (vendor, name, function) = (segs[1], segs[2], segs[3]);
    let req: InvokeBody = match serde_json::from_slice(body) {
        Ok(b) => b,
        Err(e) => {
            return Reply::error(
                400,
                "structure",
                &format!(
                    "request body: {e} (expected {{\"patient\": …, \"purpose\": …, \"input\": …}})"
                ),
            );
        }
    };
    let patient = req
        .patient
        .strip_prefix("Patient/")
        .unwrap_or(&req.patient)
        .to_owned();
    if !crate::fhir::is_valid_id(&patient) {
        return Reply::error(
            400,
            "value",
            &format!("field `patient`: {:?} is not a FHIR id", req.patient),
        );
    }
    let purpose = req.purpose.unwrap_or_else(|| "TREAT".into());
    if purpose.is_empty()
        || purpose.len() > 64
        || !purpose
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Reply::error(
            400,
            "value",
            &format!("field `purpose`: {purpose:?} is not a PurposeOfUse code"),
        );
    }
    let input = req
        .input
        .unwrap_or_else(|| json!({}))
        .to_string()
        .into_bytes();
    let call = CallRequest {
        tenant: who.tenant.clone(),
        patient,
        requester: requester(who),
        purpose,
        plugin: format!("{vendor}/{name}"),
        function: function.to_owned(),
        input,
    };
    match run_call(app, &call) {
        Ok(out) => Reply::json(200, &out).header("X-Audit-Id", out.call_id.clone()),
        Err(reply) => reply,
    }
}

/// A successful call as the API answers it (fields in the order a JSON
/// object of them always had: sorted).
#[derive(Debug, Serialize)]
pub struct CallAnswer {
    /// The call's audit record id.
    pub call_id: String,
    /// The function called.
    pub function: String,
    /// What the plugin returned.
    pub output: Output,
    /// `Patient/<id>`, in device ingest's list of triggered calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    /// The plugin.
    pub plugin: String,
    /// Its version.
    pub version: String,
}

/// A plugin's output: its JSON as the plugin wrote it (checked, not
/// decoded and encoded again), or a JSON string if it is not JSON.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Output {
    /// JSON that `serde_json::Value` accepts.
    Json(Box<RawValue>),
    /// Anything else, as text (invalid UTF-8 replaced).
    Text(String),
}

impl Output {
    /// Two scans of valid output: the strict check, then `RawValue`'s own
    /// (syntax only; it has no unchecked constructor). One copy.
    fn new(bytes: &[u8]) -> Output {
        let text = String::from_utf8_lossy(bytes);
        let json = text.trim_matches([' ', '\t', '\n', '\r']);
        if serde_json::from_str::<StrictJson>(json).is_ok()
            && let Ok(raw) = RawValue::from_string(json.to_owned())
        {
            return Output::Json(raw);
        }
        Output::Text(text.into_owned())
    }
}

/// Accepts what `serde_json::Value` accepts, without building it:
/// `RawValue` alone only checks the syntax, and would pass on lone
/// surrogate escapes, numbers out of range or nesting deeper than 128,
/// which strict clients refuse (duplicate keys pass, as in `Value`).
struct StrictJson;

impl<'de> Deserialize<'de> for StrictJson {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<StrictJson, D::Error> {
        d.deserialize_any(StrictJson)
    }
}

impl<'de> serde::de::Visitor<'de> for StrictJson {
    type Value = StrictJson;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<StrictJson, E> {
        Ok(StrictJson)
    }
    fn visit_i64<E>(self, _: i64) -> Result<StrictJson, E> {
        Ok(StrictJson)
    }
    fn visit_u64<E>(self, _: u64) -> Result<StrictJson, E> {
        Ok(StrictJson)
    }
    fn visit_f64<E>(self, _: f64) -> Result<StrictJson, E> {
        Ok(StrictJson)
    }
    fn visit_str<E>(self, _: &str) -> Result<StrictJson, E> {
        Ok(StrictJson)
    }
    fn visit_unit<E>(self) -> Result<StrictJson, E> {
        Ok(StrictJson)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut a: A) -> Result<StrictJson, A::Error> {
        while a.next_element::<StrictJson>()?.is_some() {}
        Ok(StrictJson)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut a: A) -> Result<StrictJson, A::Error> {
        while a.next_entry::<StrictJson, StrictJson>()?.is_some() {}
        Ok(StrictJson)
    }
}

/// The `Retry-After` of a 503 that a person has to mend, not a moment: a
/// full disk, or an audit log that cannot take a record (a call's, whose
/// output is then withheld, or an ingest's).
pub(super) const RETRY_LATER_SECS: u32 = 30;

/// Runs a call, counting it; a success becomes the JSON the API returns.
pub fn run_call(app: &App, call: &CallRequest) -> Result<CallAnswer, Reply> {
    let started = std::time::Instant::now();
    let result = app.rt.call(call);
    let outcome = match &result {
        Ok(_) => "ok",
        Err(CallError::Failed { .. }) => "failed",
        Err(CallError::Busy(_)) => "busy",
        Err(CallError::Quarantined { .. }) => "quarantined",
        Err(CallError::Internal(_) | CallError::Unrecorded(_)) => "error",
        Err(_) => "refused",
    };
    app.metrics.call(&call.plugin, outcome, started.elapsed());
    match result {
        Ok(out) => Ok(CallAnswer {
            call_id: out.call_id,
            function: call.function.clone(),
            output: Output::new(&out.output),
            patient: None,
            plugin: call.plugin.clone(),
            version: out.version,
        }),
        Err(e) => {
            let msg = e.to_string();
            Err(match e {
                CallError::NotInstalled(_) => Reply::error(404, "not-found", &msg),
                CallError::Quarantined { .. } => Reply::error(503, "suppressed", &msg),
                CallError::Busy(_) => Reply::error(503, "throttled", &msg).retry_after(1),
                CallError::NotExported { .. } => Reply::error(404, "not-found", &msg),
                CallError::Internal(_) => {
                    log::error!("api: {msg}");
                    Reply::error(500, "exception", &msg)
                }
                CallError::FailClosed(_) => Reply::error(503, "transient", &msg),
                CallError::Unrecorded(_) => {
                    log::error!("api: {msg}");
                    Reply::error(503, "transient", &msg).retry_after(RETRY_LATER_SECS)
                }
                CallError::Refused(_) => Reply::error(403, "forbidden", &msg),
                CallError::Failed { .. } => Reply::error(422, "processing", &msg),
            })
        }
    }
}

/// Why a FHIR read or search got no data.
enum Refusal {
    /// The search itself refused (not found, not granted, invalid).
    Search(SearchError),
    /// The audit backlog is over its budget.
    FailClosed(String),
}

fn fhir(app: &App, who: &Principal, segs: &[&str], query: Option<&str>) -> Reply {
    let env = app.rt.env();
    let grants = if who.role == Role::Admin && who.scopes.is_empty() {
        Grants::All
    } else {
        Grants::Scopes(&who.scopes)
    };
    let ctx = SearchContext {
        tenant: &who.tenant,
        patient: None,
        grants,
    };
    let (action, text) = match segs {
        [_, "Observation", "$lastn"] => (
            "search",
            format!("Observation/$lastn?{}", query.unwrap_or_default()),
        ),
        [_, ty, id] => ("read", format!("{ty}/{id}")),
        [_, ty] => (
            "search",
            match query {
                Some(q) => format!("{ty}?{q}"),
                None => (*ty).to_owned(),
            },
        ),
        _ => return Reply::error(404, "not-found", "no such FHIR route"),
    };
    // The search parser decodes each parameter itself; decoding the whole
    // query first would turn an encoded `&` or `=` into a separator.
    let result: anyhow::Result<Result<Vec<u8>, Refusal>> = (|| {
        if let Some(reason) = conns::with(&env.dir, Db::Audit, |a| {
            crate::audit::over_budget(a, &env.limits)
        })? {
            return Ok(Err(Refusal::FailClosed(reason)));
        }
        conns::with(&env.dir, Db::Fhir, |conn| {
            Ok(if action == "read" {
                search::read(conn, &ctx, &text).map(String::into_bytes)
            } else {
                search::parse(&text, &env.limits)
                    .and_then(|q| search::search(conn, &ctx, &q))
                    .and_then(|b| {
                        serde_json::to_vec(&b).map_err(|e| SearchError::Invalid(e.to_string()))
                    })
            }
            .map_err(Refusal::Search))
        })
    })();
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            log::error!("api: fhir {action}: {e:#}");
            return Reply::error(
                500,
                "exception",
                "the FHIR cache failed; see the daemon log",
            );
        }
    };
    let (ok, detail) = match &result {
        Ok(_) => (true, "ok".to_owned()),
        Err(Refusal::Search(e)) => (false, e.to_string()),
        Err(Refusal::FailClosed(reason)) => (false, reason.clone()),
    };
    let record = json!({
        "action": action,
        "host_fn": if action == "read" { "fhir_read" } else { "fhir_search" },
        "requester": requester(who),
        "token": who.id,
        "tenant": who.tenant,
        "patient": Value::Null,
        "query": text,
        "outcome": if ok { "ok" } else { "denied" },
        "detail": detail,
    });
    if let Err(e) = env.audit.append(Entry::new("fhir.access", &record)) {
        log::error!("api: cannot record a FHIR access: {e:#}");
        return Reply::error(
            503,
            "transient",
            "the access could not be recorded, so it is refused",
        );
    }
    match result {
        Ok(body) => Reply::fhir(200, body),
        Err(Refusal::FailClosed(reason)) => Reply::error(503, "transient", &reason),
        Err(Refusal::Search(SearchError::NotFound(r))) => {
            Reply::error(404, "not-found", &format!("{r}: not found or not granted"))
        }
        Err(Refusal::Search(SearchError::NotGranted(t))) => Reply::error(
            403,
            "forbidden",
            &format!("{t}: not granted to token {}", who.id),
        ),
        Err(Refusal::Search(e @ (SearchError::Invalid(_) | SearchError::OtherPatient { .. }))) => {
            Reply::error(400, "invalid", &e.to_string())
        }
        Err(Refusal::Search(SearchError::Db(e))) => {
            log::error!("api: fhir {action}: {e}");
            Reply::error(
                500,
                "exception",
                "the FHIR cache failed; see the daemon log",
            )
        }
    }
}

fn metrics(app: &App) -> Reply {
    let env = app.rt.env();
    let mut gauges: Vec<(&str, &str, f64)> = vec![];
    let durable = (|| -> anyhow::Result<()> {
        let s = sync_status(app)?;
        gauges.push((
            "clinicbox_audit_backlog_records",
            "Audit records not yet acknowledged upstream.",
            s.backlog_records as f64,
        ));
        gauges.push((
            "clinicbox_audit_backlog_bytes",
            "Body bytes of the audit backlog.",
            s.backlog_bytes as f64,
        ));
        gauges.push((
            "clinicbox_audit_fail_closed",
            "1 while PHI requests are refused for the backlog.",
            f64::from(u8::from(s.fail_closed)),
        ));
        let (installed, quarantined): (i64, i64) = conns::with(&env.dir, Db::State, |s| {
            Ok(s.query_row(
                "SELECT (SELECT count(*) FROM plugins), (SELECT count(*) FROM plugin_health WHERE quarantined_at IS NOT NULL)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?)
        })?;
        gauges.push((
            "clinicbox_plugins_installed",
            "Installed plugins.",
            installed as f64,
        ));
        gauges.push((
            "clinicbox_plugins_quarantined",
            "Quarantined plugins.",
            quarantined as f64,
        ));
        let ts = s
            .last_success
            .and_then(|t| crate::bundle::manifest::parse_time(&t).ok())
            .map_or(0.0, |t| t.unix_timestamp() as f64);
        gauges.push((
            "clinicbox_sync_last_success_timestamp_seconds",
            "Last successful upstream sync (0: never).",
            ts,
        ));
        Ok(())
    })();
    if let Err(e) = durable {
        log::error!("api: metrics: {e:#}");
    }
    match super::disk::Usage::of(&env.dir) {
        Ok(u) => {
            gauges.push((
                "clinicbox_data_disk_available_bytes",
                "Bytes still writable on the file system of the data directory.",
                u.available_bytes as f64,
            ));
            gauges.push((
                "clinicbox_data_disk_size_bytes",
                "Size of the file system of the data directory.",
                u.size_bytes as f64,
            ));
            gauges.push((
                "clinicbox_fhir_db_bytes",
                "fhir.db with its WAL (nothing is pruned).",
                u.fhir_db_bytes as f64,
            ));
            gauges.push((
                "clinicbox_audit_db_bytes",
                "audit.db with its WAL (append-only).",
                u.audit_db_bytes as f64,
            ));
        }
        Err(e) => log::error!("api: metrics: {e:#}"),
    }
    if let Some(rate) = app.disk.lock().unwrap_or_else(|p| p.into_inner()).rate() {
        gauges.push((
            "clinicbox_data_disk_fill_bytes_per_second",
            "Bytes per second by which available space shrank between the daemon's last two disk readings, a minute apart; negative when it grew.",
            rate,
        ));
    }
    gauges.push((
        "clinicbox_idle_instance_bytes",
        "Memory held by idle plugin instances (bounded by limits.idle_instances_mib).",
        app.rt.idle_bytes() as f64,
    ));
    gauges.push(("clinicbox_up", "1 while the daemon serves.", 1.0));
    Reply {
        status: 200,
        content_type: "text/plain; version=0.0.4",
        headers: vec![],
        body: app.metrics.render(&gauges).into_bytes(),
    }
}

/// `/status`'s `disk`: the data disk now, the last fill rate and when it
/// would be full at that rate.
fn disk_status(app: &App) -> Value {
    let dir = &app.rt.env().dir;
    let u = match super::disk::Usage::of(dir) {
        Ok(u) => u,
        Err(e) => return json!({"error": format!("{e:#}")}),
    };
    let path = std::path::absolute(dir.root()).unwrap_or_else(|_| dir.root().to_path_buf());
    let watch = app.disk.lock().unwrap_or_else(|p| p.into_inner());
    json!({
        "path": path.display().to_string(),
        "available_bytes": u.available_bytes,
        "size_bytes": u.size_bytes,
        "available_percent": (u.available_percent() * 10.0).round() / 10.0,
        "warn_under_percent": app.config().daemon.disk_warn_percent,
        "fhir_db_bytes": u.fhir_db_bytes,
        "audit_db_bytes": u.audit_db_bytes,
        "fill_bytes_per_second": watch.rate(),
        "full_in_hours": watch.full_in_hours(&u).map(|h| (h * 100.0).round() / 100.0),
    })
}

/// The audit backlog and sync state, on this thread's audit.db connection.
fn sync_status(app: &App) -> anyhow::Result<crate::sync::upload::Status> {
    let env = app.rt.env();
    let config = app.config();
    conns::with(&env.dir, Db::Audit, |a| {
        crate::sync::upload::status(a, config.upstream.as_ref(), &env.limits)
    })
}

fn status(app: &App) -> Reply {
    let env = app.rt.env();
    let config = app.config();
    let plugins = conns::with(&env.dir, Db::State, |s| {
        let mut stmt = s.prepare_cached(
            "SELECT p.name, v.version, h.quarantined_at, h.reason FROM plugins p JOIN plugin_versions v ON v.digest = p.current LEFT JOIN plugin_health h ON h.plugin = p.name ORDER BY p.name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(json!({"name": r.get::<_, String>(0)?, "version": r.get::<_, String>(1)?, "quarantined_at": r.get::<_, Option<String>>(2)?, "quarantine_reason": r.get::<_, Option<String>>(3)?}))
        })?;
        Ok(rows.collect::<Result<Vec<_>, _>>()?)
    });
    let sync = sync_status(app);
    let body = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": app.started.elapsed().as_secs(),
        "listen": config.daemon.listen,
        "ready": app.ready.load(Ordering::Relaxed),
        "draining": app.draining.load(Ordering::Relaxed),
        "inbox": app.inbox.display().to_string(),
        "plugins": plugins.map_err(|e| format!("{e:#}")).unwrap_or_else(|e| vec![json!({"error": e})]),
        "audit": sync.map(|s| serde_json::to_value(s).unwrap_or(Value::Null)).unwrap_or_else(|e| json!({"error": format!("{e:#}")})),
        "updates": config.updates.as_ref().map(|u| &u.url),
        "inflight_requests": app.metrics.inflight.load(Ordering::Relaxed),
        "disk": disk_status(app),
    });
    Reply::json(200, &body)
}

#[cfg(test)]
mod tests {
    use super::Output;

    fn kind(bytes: &[u8]) -> &'static str {
        match Output::new(bytes) {
            Output::Json(_) => "json",
            Output::Text(_) => "text",
        }
    }

    #[test]
    fn plugin_output_passes_as_json_only_if_a_strict_parser_takes_it() {
        assert_eq!(kind(br#" {"a":[1,2.5,"\u00e9",null,true]} "#), "json");
        assert_eq!(kind(br#"{"a":1,"a":2}"#), "json");
        // Syntax alone would pass these; serde_json::Value refuses them.
        assert_eq!(kind(br#"{"a":"\ud800"}"#), "text");
        assert_eq!(kind(br#"{"a":1e400}"#), "text");
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert_eq!(kind(deep.as_bytes()), "text");
        // Nothing may follow the value (it cannot add fields to the answer).
        assert_eq!(kind(br#"{"a":1}, "patient":"x""#), "text");
        assert_eq!(kind(b"not json"), "text");
        assert_eq!(kind(b"\xff\xfe"), "text");
        match Output::new(br#"{"b": 1}"#) {
            Output::Json(raw) => assert_eq!(raw.get(), r#"{"b": 1}"#),
            Output::Text(t) => panic!("taken as text: {t}"),
        }
    }
}
