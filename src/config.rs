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
    /// Optional overrides of [`Limits`].
    pub limits: Option<RawLimits>,
}

/// `[limits]` overrides.
#[derive(Debug, Default, Deserialize)]
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
        let mut limits = Limits::default();
        if let Some(l) = raw.limits {
            const MIB: u64 = 1024 * 1024;
            if let Some(v) = l.max_bundle_mib {
                let max = Limits::CEILING_BUNDLE_BYTES / MIB;
                if v == 0 || v > max {
                    return Err(field(
                        "limits.max_bundle_mib",
                        format!("{v} is outside 1..={max}"),
                    ));
                }
                limits.max_bundle_bytes = v * MIB;
            }
            if let Some(v) = l.max_wasm_mib {
                let max = Limits::CEILING_WASM_BYTES / MIB;
                if v == 0 || v > max {
                    return Err(field(
                        "limits.max_wasm_mib",
                        format!("{v} is outside 1..={max}"),
                    ));
                }
                limits.max_wasm_bytes = v * MIB;
            }
            if let Some(v) = l.max_plugin_memory_mib {
                let max = Limits::default().max_plugin_memory_mib;
                if v == 0 || v > max {
                    return Err(field(
                        "limits.max_plugin_memory_mib",
                        format!("{v} is outside 1..={max}"),
                    ));
                }
                limits.max_plugin_memory_mib = v;
            }
            if let Some(v) = l.max_plugin_timeout_ms {
                let max = Limits::default().max_plugin_timeout_ms;
                if v == 0 || v > max {
                    return Err(field(
                        "limits.max_plugin_timeout_ms",
                        format!("{v} is outside 1..={max}"),
                    ));
                }
                limits.max_plugin_timeout_ms = v;
            }
        }
        Ok(Config {
            source,
            log_level,
            limits,
        })
    }
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
    fn missing_explicit_file_is_an_error() {
        let e = Config::load(Some(Path::new("/nonexistent/clinicbox.toml"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/clinicbox.toml"), "{e}");
    }
}
