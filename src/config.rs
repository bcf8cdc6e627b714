//! The appliance's configuration file (TOML), in two stages.
//!
//! [`RawConfig`] is exactly what the file may contain (`deny_unknown_fields`,
//! so a typo is an error, not a silently ignored setting). [`Config`] holds
//! validated values. Every field is documented in `docs/configuration.md`.
//!
//! Invariants: a missing file at the *default* path means all defaults; a
//! missing file the admin named explicitly is an error; a value outside its
//! allowed range is refused with the field named; config can lower the
//! bundle caps in [`Limits`] but never raise them past the hard ceilings.

use std::path::{Path, PathBuf};

use log::LevelFilter;
use serde::Deserialize;
use thiserror::Error;

use crate::fsutil;
use crate::limits::Limits;

/// Where the config lives unless `--config` / `CLINICBOX_CONFIG` says.
pub const DEFAULT_PATH: &str = "/etc/clinicbox/clinicbox.toml";

/// The config file, exactly as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `error`, `warn`, `info` (default), `debug` or `trace`.
    pub log_level: Option<String>,
    /// Where compiled plugin code is cached (default `<data-dir>/cache`);
    /// `--cache-dir` / `CLINICBOX_CACHE_DIR` win over it.
    pub cache_dir: Option<PathBuf>,
    /// Optional overrides of [`Limits`].
    pub limits: Option<RawLimits>,
    /// The upstream FHIR server (audit upload, cache refresh).
    pub upstream: Option<RawUpstream>,
    /// The local HTTP API (`clinicbox run`).
    pub api: Option<RawApi>,
    /// The daemon's inbox and shutdown.
    pub daemon: Option<RawDaemon>,
    /// The vendor update channel.
    pub updates: Option<RawUpdates>,
}

/// `[api]`: where the local API listens.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    /// `host:port` (default `127.0.0.1:8787`). A LAN address exposes the
    /// API to the clinic network; every request still needs a token.
    pub listen: Option<String>,
    /// PEM certificate chain for TLS on the API (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS on the API (with `tls_cert`).
    pub tls_key: Option<PathBuf>,
}

/// `[daemon]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    /// Directory watched for dropped `.cbx` bundles (default
    /// `<data-dir>/inbox`).
    pub inbox: Option<PathBuf>,
    /// How often the inbox is scanned, ms (default 1,000).
    pub inbox_poll_ms: Option<u64>,
    /// On SIGTERM, how long in-flight requests may finish, s (default 10).
    pub drain_secs: Option<u64>,
    /// Warn in the log while the data disk has less than this percent of
    /// its size available (default 10).
    pub disk_warn_percent: Option<u64>,
    /// Nice levels by which the pipeline threads (api, fhir-writer,
    /// audit-writer) run ahead of the daemon's others (default 10).
    pub pipeline_priority_boost: Option<u64>,
}

/// `[updates]`: the vendor update channel (a static HTTPS directory with
/// a signed `index.json` and the bundles it lists).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpdates {
    /// Base URL of the channel, `https://…/` (its `index.json` is fetched).
    pub url: String,
    /// PEM CA file to trust for it (default: the Mozilla roots).
    pub ca_file: Option<PathBuf>,
    /// Seconds between polls (default 3,600).
    pub interval_secs: Option<u64>,
    /// Allow an `http://` URL (a lab only; the index is signed either way).
    pub allow_plain_http: Option<bool>,
}

/// Validated `[api]` + `[daemon]`.
#[derive(Debug, Clone)]
pub struct Daemon {
    /// Listen address.
    pub listen: String,
    /// TLS certificate chain and key files (None: plain HTTP).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Inbox directory (None: `<data-dir>/inbox`).
    pub inbox: Option<PathBuf>,
    /// Inbox scan period.
    pub inbox_poll: std::time::Duration,
    /// Drain time on SIGTERM.
    pub drain: std::time::Duration,
    /// Low-disk warning threshold, percent of the data file system.
    pub disk_warn_percent: u8,
    /// Nice levels by which the pipeline threads run ahead of the others
    /// (`crate::priority`); read at start only.
    pub pipeline_priority_boost: u8,
}

impl Default for Daemon {
    fn default() -> Self {
        Daemon {
            listen: "127.0.0.1:8787".into(),
            tls: None,
            inbox: None,
            inbox_poll: std::time::Duration::from_secs(1),
            drain: std::time::Duration::from_secs(10),
            disk_warn_percent: 10,
            pipeline_priority_boost: 10,
        }
    }
}

/// `[upstream]`: where audit records go and FHIR data comes from.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// FHIR base URL, `https://…` (or `http://` with `allow_plain_http`).
    pub url: String,
    /// PEM file of CA certificates to trust (default: the Mozilla roots).
    pub ca_file: Option<PathBuf>,
    /// PEM file with the one server certificate to trust (pinning); not
    /// together with `ca_file`.
    pub pinned_cert: Option<PathBuf>,
    /// File holding a bearer token.
    pub token_file: Option<PathBuf>,
    /// PEM client certificate chain for mTLS (with `client_key`).
    pub client_cert: Option<PathBuf>,
    /// PEM private key for mTLS (with `client_cert`).
    pub client_key: Option<PathBuf>,
    /// Allow an `http://` URL (a lab without TLS). Default false.
    pub allow_plain_http: Option<bool>,
    /// Connect timeout, ms (default 5,000).
    pub connect_timeout_ms: Option<u64>,
    /// Timeout for sending a request or reading a response, ms (default 30,000).
    pub io_timeout_ms: Option<u64>,
    /// Tries per pass before giving up until the next pass (default 5).
    pub attempts: Option<u32>,
    /// First backoff delay, ms (default 1,000); doubles per try, with jitter.
    pub backoff_ms: Option<u64>,
    /// Longest backoff delay, ms (default 60,000).
    pub backoff_max_ms: Option<u64>,
    /// Disk budget for audit records not yet upstream, KiB of record
    /// bodies (default 1,048,576 = 1 GiB).
    pub audit_budget_kib: Option<u64>,
    /// Seconds between passes of `clinicbox sync` (default 60).
    pub interval_secs: Option<u64>,
    /// Tenant whose cache `sync` refreshes from upstream (sync down).
    pub pull_tenant: Option<String>,
    /// Resource types to refresh (default: none, no sync down).
    pub pull_types: Option<Vec<String>>,
}

/// Validated `[upstream]`.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// FHIR base URL, without a trailing slash.
    pub url: String,
    /// CA file.
    pub ca_file: Option<PathBuf>,
    /// Pinned server certificate.
    pub pinned_cert: Option<PathBuf>,
    /// Bearer token file.
    pub token_file: Option<PathBuf>,
    /// mTLS client certificate and key.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Plain HTTP allowed (and used).
    pub plain_http: bool,
    /// Connect timeout.
    pub connect_timeout: std::time::Duration,
    /// Send/receive timeout.
    pub io_timeout: std::time::Duration,
    /// Tries per pass.
    pub attempts: u32,
    /// First backoff delay.
    pub backoff: std::time::Duration,
    /// Longest backoff delay.
    pub backoff_max: std::time::Duration,
    /// Between passes.
    pub interval: std::time::Duration,
    /// Sync-down tenant and types.
    pub pull: Option<(String, Vec<String>)>,
}

/// `[limits]` overrides.
#[derive(Debug, Default, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Largest bundle file, MiB.
    pub max_bundle_mib: Option<u64>,
    /// Largest wasm module, MiB.
    pub max_wasm_mib: Option<u64>,
    /// Ceiling on a plugin's requested memory, MiB.
    pub max_plugin_memory_mib: Option<u32>,
    /// Ceiling on a plugin's requested timeout, ms.
    pub max_plugin_timeout_ms: Option<u32>,
    /// Floor under a plugin's signed timeout, ms (default 0: none).
    pub min_plugin_timeout_ms: Option<u32>,
    /// Largest local API request body, KiB (default 1,024).
    pub max_request_body_kib: Option<u64>,
    /// Time to send a request head to the local API, ms (default 5,000).
    pub request_head_timeout_ms: Option<u64>,
    /// Time to send a request body to the local API, ms (default 10,000).
    pub request_body_timeout_ms: Option<u64>,
    /// Requests worked on at once by the local API (default 256).
    pub max_inflight_requests: Option<usize>,
    /// Threads that run the local API's handlers (default: 16 per core).
    pub api_workers: Option<usize>,
    /// Memory idle plugin instances may hold, box-wide, MiB (default 512).
    pub idle_instances_mib: Option<u32>,
    /// A writer's wait for more requests to share a commit, µs (default 500).
    pub group_commit_wait_us: Option<u64>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from (None: defaults, no file).
    pub source: Option<PathBuf>,
    /// Log level.
    pub log_level: LevelFilter,
    /// Effective limits.
    pub limits: Limits,
    /// The `[limits]` section as written (what [`Config::restart_needed`]
    /// compares, key by key).
    limits_set: RawLimits,
    /// The upstream server, if configured.
    pub upstream: Option<Upstream>,
    /// Compiled-code cache directory, if set.
    pub cache_dir: Option<PathBuf>,
    /// The daemon and its API.
    pub daemon: Daemon,
    /// The update channel, if configured (same client settings as an
    /// upstream: url, trust, timeouts).
    pub updates: Option<Upstream>,
}

/// The config file is unusable.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// Unreadable or too large.
    #[error("config {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Not valid TOML of the expected shape.
    #[error("config {path}: {reason}")]
    Syntax {
        /// The file.
        path: String,
        /// The TOML parser's message (it names the line and field).
        reason: String,
    },
    /// A value is out of range.
    #[error("config {path}: field `{field}`: {reason}")]
    Field {
        /// The file.
        path: String,
        /// The dotted field name.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

impl Config {
    /// Loads the config from `explicit` or the default path.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let (path, must_exist) = match explicit {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        if !must_exist && !path.exists() {
            return Config::from_raw(RawConfig::default(), None);
        }
        let bytes =
            fsutil::read_bounded(&path, Limits::default().max_config_bytes).map_err(|e| {
                ConfigError::Read {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                }
            })?;
        let text = String::from_utf8(bytes).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: format!("not UTF-8: {e}"),
        })?;
        Config::parse(&text, &path)
    }

    /// The settings read at start only that differ in `new`, named as in
    /// the file (`limits.api_workers`, `api.listen`, …): what a reload to
    /// `new` leaves waiting for the next restart. Empty when none. A
    /// `[limits]` key is named (sorted) when its change changes what is in
    /// force, so a default only written out, or removed, is not, even
    /// beside a key that did change.
    pub fn restart_needed(&self, new: &Config) -> Vec<String> {
        let keys = |l: &RawLimits| match serde_json::to_value(l) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        let (old_keys, new_keys) = (keys(&self.limits_set), keys(&new.limits_set));
        // What one written key (null or absent: its default) puts in force
        // on this machine; None if it cannot be read alone, and then a
        // change of it is named.
        let in_force = |k: &str, v: Option<&serde_json::Value>| -> Option<Limits> {
            let one = serde_json::Map::from_iter(v.map(|v| (k.to_owned(), v.clone())));
            let raw: RawLimits = serde_json::from_value(serde_json::Value::Object(one)).ok()?;
            let mut limits = limits_of(&raw, "(reload)").ok()?;
            limits.api_workers = limits.api_workers_in_force();
            Some(limits)
        };
        let all: std::collections::BTreeSet<&String> =
            old_keys.keys().chain(new_keys.keys()).collect();
        let mut changed: Vec<String> = all
            .into_iter()
            .filter(|k| {
                let (was, is) = (old_keys.get(*k), new_keys.get(*k));
                was != is && {
                    let (a, b) = (in_force(k, was), in_force(k, is));
                    a.is_none() || a != b
                }
            })
            .map(|k| format!("limits.{k}"))
            .collect();
        let (a, b) = (&self.daemon, &new.daemon);
        let cert = |d: &Daemon| d.tls.as_ref().map(|t| t.0.clone());
        let key = |d: &Daemon| d.tls.as_ref().map(|t| t.1.clone());
        for (name, differs) in [
            (
                "upstream.audit_budget_kib",
                self.limits.audit_budget_bytes != new.limits.audit_budget_bytes,
            ),
            ("api.listen", a.listen != b.listen),
            ("api.tls_cert", cert(a) != cert(b)),
            ("api.tls_key", key(a) != key(b)),
            ("daemon.inbox", a.inbox != b.inbox),
            (
                "daemon.pipeline_priority_boost",
                a.pipeline_priority_boost != b.pipeline_priority_boost,
            ),
            ("log_level", self.log_level != new.log_level),
            ("cache_dir", self.cache_dir != new.cache_dir),
        ] {
            if differs {
                changed.push(name.to_owned());
            }
        }
        changed
    }

    /// Parses config text read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Config::from_raw(raw, Some(path.to_path_buf()))
    }

    fn from_raw(raw: RawConfig, source: Option<PathBuf>) -> Result<Config, ConfigError> {
        let path = source
            .as_ref()
            .map_or_else(|| "(defaults)".to_owned(), |p| p.display().to_string());
        let field = |field: &'static str, reason: String| ConfigError::Field {
            path: path.clone(),
            field,
            reason,
        };
        // A small whole number within `range`, or the field's error.
        let small = |f: &'static str, v: u64, range: std::ops::RangeInclusive<u8>| {
            u8::try_from(v)
                .ok()
                .filter(|v| range.contains(v))
                .ok_or_else(|| {
                    field(
                        f,
                        format!("{v} is outside {}..={}", range.start(), range.end()),
                    )
                })
        };
        let log_level = match raw.log_level.as_deref().unwrap_or("info") {
            "error" => LevelFilter::Error,
            "warn" => LevelFilter::Warn,
            "info" => LevelFilter::Info,
            "debug" => LevelFilter::Debug,
            "trace" => LevelFilter::Trace,
            other => {
                return Err(field(
                    "log_level",
                    format!("{other:?} is not one of error, warn, info, debug, trace"),
                ));
            }
        };
        let limits_set = raw.limits.clone().unwrap_or_default();
        let mut limits = limits_of(&limits_set, &path)?;
        let upstream = match raw.upstream {
            None => None,
            Some(u) => Some(upstream(u, &mut limits).map_err(|(f, r)| field(f, r))?),
        };
        let mut daemon = Daemon::default();
        if let Some(a) = raw.api {
            if let Some(listen) = a.listen {
                if listen.parse::<std::net::SocketAddr>().is_err() {
                    return Err(field(
                        "api.listen",
                        format!("{listen:?} is not an IP:port address (e.g. 127.0.0.1:8787)"),
                    ));
                }
                daemon.listen = listen;
            }
            daemon.tls = match (a.tls_cert, a.tls_key) {
                (Some(c), Some(k)) => Some((c, k)),
                (None, None) => None,
                (Some(_), None) => {
                    return Err(field("api.tls_key", "tls_cert needs tls_key".into()));
                }
                (None, Some(_)) => {
                    return Err(field("api.tls_cert", "tls_key needs tls_cert".into()));
                }
            };
        }
        if let Some(d) = raw.daemon {
            daemon.inbox = d.inbox;
            if let Some(ms) = d.inbox_poll_ms {
                if !(50..=3_600_000).contains(&ms) {
                    return Err(field(
                        "daemon.inbox_poll_ms",
                        format!("{ms} is outside 50..=3600000"),
                    ));
                }
                daemon.inbox_poll = std::time::Duration::from_millis(ms);
            }
            if let Some(s) = d.drain_secs {
                if s > 600 {
                    return Err(field(
                        "daemon.drain_secs",
                        format!("{s} is outside 0..=600"),
                    ));
                }
                daemon.drain = std::time::Duration::from_secs(s);
            }
            if let Some(p) = d.disk_warn_percent {
                daemon.disk_warn_percent = small("daemon.disk_warn_percent", p, 1..=50)?;
            }
            if let Some(b) = d.pipeline_priority_boost {
                daemon.pipeline_priority_boost =
                    small("daemon.pipeline_priority_boost", b, 0..=20)?;
            }
        }
        let updates = match raw.updates {
            None => None,
            Some(u) => {
                let secs = u.interval_secs.unwrap_or(3600);
                let as_upstream = RawUpstream {
                    url: u.url,
                    ca_file: u.ca_file,
                    allow_plain_http: u.allow_plain_http,
                    interval_secs: Some(secs),
                    attempts: Some(1),
                    ..RawUpstream::default()
                };
                let mut scratch = limits.clone();
                let mut up = self::upstream(as_upstream, &mut scratch).map_err(|(f, r)| {
                    let r = r.replace("upstream.", "updates.");
                    field(
                        match f {
                            "upstream.url" => "updates.url",
                            "upstream.allow_plain_http" => "updates.allow_plain_http",
                            "upstream.interval_secs" => "updates.interval_secs",
                            other => other,
                        },
                        r,
                    )
                })?;
                up.pull = None;
                Some(up)
            }
        };
        if let Some(c) = &raw.cache_dir
            && !c.is_absolute()
        {
            return Err(field(
                "cache_dir",
                format!("{} is not an absolute path", c.display()),
            ));
        }
        Ok(Config {
            source,
            log_level,
            limits,
            limits_set,
            upstream,
            cache_dir: raw.cache_dir,
            daemon,
            updates,
        })
    }
}

/// Validates `[upstream]`; sets the audit budget in `limits`.
fn upstream(u: RawUpstream, limits: &mut Limits) -> Result<Upstream, (&'static str, String)> {
    let url = u.url.trim_end_matches('/').to_owned();
    let plain = u.allow_plain_http.unwrap_or(false);
    if let Some(rest) = url.strip_prefix("http://") {
        if !plain {
            return Err((
                "upstream.url",
                format!(
                    "{url:?} is plain http; use https, or set upstream.allow_plain_http = true (a lab only)"
                ),
            ));
        }
        if rest.is_empty() {
            return Err(("upstream.url", "has no host".into()));
        }
    } else if let Some(rest) = url.strip_prefix("https://") {
        if plain {
            return Err((
                "upstream.allow_plain_http",
                "is set but the url is https; remove it".into(),
            ));
        }
        if rest.is_empty() {
            return Err(("upstream.url", "has no host".into()));
        }
    } else {
        return Err(("upstream.url", format!("{url:?} is not an https:// URL")));
    }
    if u.ca_file.is_some() && u.pinned_cert.is_some() {
        return Err((
            "upstream.pinned_cert",
            "give either ca_file or pinned_cert, not both".into(),
        ));
    }
    let client_cert = match (u.client_cert, u.client_key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        (Some(_), None) => {
            return Err(("upstream.client_key", "client_cert needs client_key".into()));
        }
        (None, Some(_)) => {
            return Err((
                "upstream.client_cert",
                "client_key needs client_cert".into(),
            ));
        }
    };
    let ms = |v: Option<u64>,
              d: u64,
              f: &'static str|
     -> Result<std::time::Duration, (&'static str, String)> {
        let v = v.unwrap_or(d);
        if v == 0 || v > 3_600_000 {
            return Err((f, format!("{v} is outside 1..=3600000")));
        }
        Ok(std::time::Duration::from_millis(v))
    };
    let attempts = u.attempts.unwrap_or(5);
    if !(1..=100).contains(&attempts) {
        return Err((
            "upstream.attempts",
            format!("{attempts} is outside 1..=100"),
        ));
    }
    let budget = u.audit_budget_kib.unwrap_or(1024 * 1024);
    if budget == 0 || budget > 1 << 40 {
        return Err((
            "upstream.audit_budget_kib",
            format!("{budget} is outside 1..=2^40"),
        ));
    }
    limits.audit_budget_bytes = Some(budget * 1024);
    let pull = match (u.pull_tenant, u.pull_types) {
        (Some(t), Some(types)) if !types.is_empty() => {
            if !crate::fhir::is_valid_tenant(&t) {
                return Err((
                    "upstream.pull_tenant",
                    format!("{t:?} is not a valid tenant id"),
                ));
            }
            for ty in &types {
                if !ty.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                    || !ty.chars().all(|c| c.is_ascii_alphanumeric())
                {
                    return Err((
                        "upstream.pull_types",
                        format!("{ty:?} is not a FHIR resource type"),
                    ));
                }
            }
            Some((t, types))
        }
        (None, None) => None,
        (Some(_), _) => {
            return Err((
                "upstream.pull_types",
                "pull_tenant needs a non-empty pull_types".into(),
            ));
        }
        (None, Some(_)) => {
            return Err((
                "upstream.pull_tenant",
                "pull_types needs pull_tenant".into(),
            ));
        }
    };
    Ok(Upstream {
        url,
        ca_file: u.ca_file,
        pinned_cert: u.pinned_cert,
        token_file: u.token_file,
        client_cert,
        plain_http: plain,
        connect_timeout: ms(u.connect_timeout_ms, 5_000, "upstream.connect_timeout_ms")?,
        io_timeout: ms(u.io_timeout_ms, 30_000, "upstream.io_timeout_ms")?,
        attempts,
        backoff: ms(u.backoff_ms, 1_000, "upstream.backoff_ms")?,
        backoff_max: ms(u.backoff_max_ms, 60_000, "upstream.backoff_max_ms")?,
        interval: match u.interval_secs.unwrap_or(60) {
            s @ 1..=86_400 => std::time::Duration::from_secs(s),
            s => {
                return Err((
                    "upstream.interval_secs",
                    format!("{s} is outside 1..=86400"),
                ));
            }
        },
        pull,
    })
}

/// The limits in force under a `[limits]` section as written (`path`
/// names the file in errors): the defaults, with each written key checked
/// against its bounds and applied. Not the audit budget, which
/// `[upstream]` sets.
fn limits_of(l: &RawLimits, path: &str) -> Result<Limits, ConfigError> {
    let field = |field: &'static str, reason: String| ConfigError::Field {
        path: path.to_owned(),
        field,
        reason,
    };
    let mut limits = Limits::default();
    const MIB: u64 = 1024 * 1024;
    let bounded = |v: u64, lo: u64, hi: u64, f: &'static str| {
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(field(f, format!("{v} is outside {lo}..={hi}")))
        }
    };
    // The bundle caps may only be lowered, never raised.
    let ceiling = Limits::default();
    if let Some(v) = l.max_bundle_mib {
        let max = Limits::CEILING_BUNDLE_BYTES / MIB;
        limits.max_bundle_bytes = bounded(v, 1, max, "limits.max_bundle_mib")? * MIB;
    }
    if let Some(v) = l.max_wasm_mib {
        let max = Limits::CEILING_WASM_BYTES / MIB;
        limits.max_wasm_bytes = bounded(v, 1, max, "limits.max_wasm_mib")? * MIB;
    }
    if let Some(v) = l.max_plugin_memory_mib {
        let max = u64::from(ceiling.max_plugin_memory_mib);
        limits.max_plugin_memory_mib =
            bounded(u64::from(v), 1, max, "limits.max_plugin_memory_mib")? as u32;
    }
    if let Some(v) = l.max_plugin_timeout_ms {
        let max = u64::from(ceiling.max_plugin_timeout_ms);
        limits.max_plugin_timeout_ms =
            bounded(u64::from(v), 1, max, "limits.max_plugin_timeout_ms")? as u32;
    }
    if let Some(v) = l.min_plugin_timeout_ms {
        let max = u64::from(limits.max_plugin_timeout_ms);
        limits.min_plugin_timeout_ms =
            bounded(u64::from(v), 0, max, "limits.min_plugin_timeout_ms")? as u32;
    }
    if let Some(v) = l.max_request_body_kib {
        limits.max_request_body_bytes =
            bounded(v, 1, 64 * 1024, "limits.max_request_body_kib")? as usize * 1024;
    }
    if let Some(v) = l.request_head_timeout_ms {
        limits.request_head_timeout_ms =
            bounded(v, 100, 600_000, "limits.request_head_timeout_ms")?;
    }
    if let Some(v) = l.request_body_timeout_ms {
        limits.request_body_timeout_ms =
            bounded(v, 100, 600_000, "limits.request_body_timeout_ms")?;
    }
    if let Some(v) = l.group_commit_wait_us {
        limits.group_commit_wait_us = bounded(v, 0, 100_000, "limits.group_commit_wait_us")?;
    }
    if let Some(v) = l.idle_instances_mib {
        limits.idle_instances_mib =
            bounded(v as u64, 0, 65_536, "limits.idle_instances_mib")? as u32;
    }
    if let Some(v) = l.api_workers {
        limits.api_workers = bounded(v as u64, 1, 1024, "limits.api_workers")? as usize;
    }
    if let Some(v) = l.max_inflight_requests {
        limits.max_inflight_requests =
            bounded(v as u64, 1, 100_000, "limits.max_inflight_requests")? as usize;
    }
    Ok(limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("c.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_overrides() {
        let c = parse("").unwrap();
        assert_eq!(c.limits, Limits::default());
        let c = parse("log_level = \"debug\"\n[limits]\nmax_bundle_mib = 8\n").unwrap();
        assert_eq!(c.limits.max_bundle_bytes, 8 * 1024 * 1024);
        assert_eq!(c.log_level, LevelFilter::Debug);
    }

    /// A reload names each changed start-only setting as written in the
    /// file, and nothing for settings applied at once.
    #[test]
    fn restart_needed_names_each_changed_start_only_setting() {
        let old = parse("[limits]\napi_workers = 8\nmax_bundle_mib = 8\n").unwrap();
        let same = parse("[limits]\napi_workers = 8\nmax_bundle_mib = 8\n[daemon]\ndrain_secs = 3\ninbox_poll_ms = 250\n")
            .unwrap();
        assert_eq!(old.restart_needed(&same), Vec::<String>::new());
        // A default written out (or removed) changes nothing in force.
        let spelled =
            parse("[limits]\napi_workers = 8\nmax_bundle_mib = 8\nidle_instances_mib = 512\n")
                .unwrap();
        assert_eq!(old.restart_needed(&spelled), Vec::<String>::new());
        assert_eq!(spelled.restart_needed(&old), Vec::<String>::new());
        // Beside a change in force, a spelled-out default is still not one.
        let mixed =
            parse("[limits]\napi_workers = 6\nmax_bundle_mib = 8\nidle_instances_mib = 512\n")
                .unwrap();
        assert_eq!(old.restart_needed(&mixed), ["limits.api_workers"]);
        // The audit budget lives among the limits in force, but is named
        // as written, and alone.
        let with_budget = |kib: u32, more: &str| {
            parse(&format!(
                "[limits]\napi_workers = 8\nmax_bundle_mib = 8\n{more}\
                 [upstream]\nurl = \"https://fhir.example.org/r4\"\naudit_budget_kib = {kib}\n"
            ))
            .unwrap()
        };
        assert_eq!(
            with_budget(2048, "").restart_needed(&with_budget(4096, "idle_instances_mib = 512\n")),
            ["upstream.audit_budget_kib"]
        );
        // The default worker count, written out as this machine's number.
        let workers = Limits::default().api_workers_in_force();
        let written = parse(&format!(
            "[limits]\napi_workers = {workers}\nmax_bundle_mib = 8\n"
        ))
        .unwrap();
        let unset = parse("[limits]\nmax_bundle_mib = 8\n").unwrap();
        assert_eq!(unset.restart_needed(&written), Vec::<String>::new());
        assert_eq!(old.restart_needed(&unset), ["limits.api_workers"]);
        let new = parse(
            "log_level = \"debug\"\n[limits]\napi_workers = 4\n\
             [api]\nlisten = \"0.0.0.0:8787\"\n[daemon]\npipeline_priority_boost = 5\n",
        )
        .unwrap();
        assert_eq!(
            old.restart_needed(&new),
            [
                "limits.api_workers",
                "limits.max_bundle_mib",
                "api.listen",
                "daemon.pipeline_priority_boost",
                "log_level"
            ]
        );
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse("[limits]\nmax_bundle_mib = 100000\n").unwrap_err();
        assert!(e.contains("field `limits.max_bundle_mib`"), "{e}");
        let e = parse("log_level = \"loud\"\n").unwrap_err();
        assert!(e.contains("`log_level`"), "{e}");
        let e = parse("[limits]\nmax_bundel_mib = 1\n").unwrap_err();
        assert!(
            e.contains("unknown field `max_bundel_mib`") && e.contains("line 2"),
            "{e}"
        );
    }

    #[test]
    fn min_plugin_timeout_is_a_floor_no_higher_than_the_ceiling() {
        assert_eq!(parse("").unwrap().limits.min_plugin_timeout_ms, 0);
        let c = parse("[limits]\nmin_plugin_timeout_ms = 5000\n").unwrap();
        assert_eq!(c.limits.min_plugin_timeout_ms, 5000);
        let e = parse("[limits]\nmax_plugin_timeout_ms = 1000\nmin_plugin_timeout_ms = 5000\n")
            .unwrap_err();
        assert!(
            e.contains("field `limits.min_plugin_timeout_ms`: 5000 is outside 0..=1000"),
            "{e}"
        );
    }

    #[test]
    fn missing_explicit_file_is_an_error() {
        let e = Config::load(Some(Path::new("/nonexistent/clinicbox.toml"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/clinicbox.toml"), "{e}");
    }

    #[test]
    fn daemon_sections_are_validated_by_field() {
        let c = parse(
            "[api]\nlisten = \"0.0.0.0:9000\"\n[daemon]\ndrain_secs = 3\ndisk_warn_percent = 5\n",
        )
        .unwrap();
        assert_eq!(c.daemon.listen, "0.0.0.0:9000");
        assert_eq!(c.daemon.drain, std::time::Duration::from_secs(3));
        assert_eq!(c.daemon.disk_warn_percent, 5);
        assert_eq!(parse("").unwrap().daemon.disk_warn_percent, 10);
        assert_eq!(parse("").unwrap().daemon.pipeline_priority_boost, 10);
        assert_eq!(
            parse("[daemon]\npipeline_priority_boost = 0\n")
                .unwrap()
                .daemon
                .pipeline_priority_boost,
            0
        );
        for (text, want) in [
            ("[api]\nlisten = \"localhost\"\n", "field `api.listen`"),
            (
                "[api]\ntls_cert = \"/x\"\n",
                "field `api.tls_key`: tls_cert needs tls_key",
            ),
            (
                "[daemon]\ninbox_poll_ms = 1\n",
                "field `daemon.inbox_poll_ms`",
            ),
            (
                "[updates]\nurl = \"http://u\"\n",
                "set updates.allow_plain_http",
            ),
            (
                "[updates]\nurl = \"https://u\"\ninterval_secs = 100000\n",
                "field `updates.interval_secs`: 100000 is outside 1..=86400",
            ),
            (
                "[daemon]\ndisk_warn_percent = 0\n",
                "field `daemon.disk_warn_percent`: 0 is outside 1..=50",
            ),
            (
                "[daemon]\ndisk_warn_percent = 300\n",
                "field `daemon.disk_warn_percent`: 300 is outside 1..=50",
            ),
            (
                "[daemon]\npipeline_priority_boost = 21\n",
                "field `daemon.pipeline_priority_boost`: 21 is outside 0..=20",
            ),
            ("cache_dir = \"rel\"\n", "field `cache_dir`"),
            (
                "[limits]\nmax_request_body_kib = 0\n",
                "field `limits.max_request_body_kib`",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
