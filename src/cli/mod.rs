//! The command line: global options, subcommands (one file each), output
//! in human or `--json` form, and the mapping from errors to exit codes.
//!
//! Options are parsed in two stages: clap gives the raw [`Cli`]; [`run`]
//! resolves it (config file, data dir) before dispatching. Exit codes are
//! documented in `docs/operations.md` and listed in [`ExitStatus`].

mod audit;
mod bundle;
mod call;
mod demo;
mod fhir;
mod init;
mod key;
mod plugin;
mod run;
mod sync;
mod token;
mod trust;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::config::Config;
use crate::datadir::DataDir;

/// A named thing (plugin, key) does not exist.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotFound(pub String);

/// clinicbox: run signed, sandboxed FHIR plugins on a clinic's edge box.
#[derive(Debug, Parser)]
#[command(name = "clinicbox", version, about, max_term_width = 100)]
pub struct Cli {
    /// The appliance's data directory.
    #[arg(
        long,
        global = true,
        env = "CLINICBOX_DATA_DIR",
        default_value = "/var/lib/clinicbox",
        value_name = "DIR"
    )]
    pub data_dir: PathBuf,
    /// Config file (TOML). If not given and the default is missing, built-in
    /// defaults apply. [default: /etc/clinicbox/clinicbox.toml]
    #[arg(long, global = true, env = "CLINICBOX_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where compiled plugin code is cached (systemd: CacheDirectory).
    /// [default: the config's cache_dir, else <data-dir>/cache]
    #[arg(long, global = true, env = "CLINICBOX_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create (or complete) the data dir, databases and appliance identity key.
    Init,
    /// Run the demo on embedded defaults: init a data dir under ./, trust the
    /// dev vendor key, install and list the example bundle.
    Demo(demo::Args),
    /// Manage ed25519 signing keys (vendors).
    #[command(subcommand)]
    Key(key::Cmd),
    /// Pack, sign, verify and inspect plugin bundles (vendors).
    #[command(subcommand)]
    Bundle(bundle::Cmd),
    /// Manage which vendor keys may sign which plugin namespaces.
    #[command(subcommand)]
    Trust(trust::Cmd),
    /// Install, list, roll back and remove plugins.
    #[command(subcommand)]
    Plugin(plugin::Cmd),
    /// Run one plugin function for one tenant and patient, and print its output.
    Call(call::Args),
    /// Read, export and verify the tamper-evident audit log.
    #[command(subcommand)]
    Audit(audit::Cmd),
    /// Upload audit records to upstream and refresh the FHIR cache from it.
    Sync(sync::Args),
    /// The local FHIR cache: import, read, search, stats.
    #[command(subcommand)]
    Fhir(fhir::Cmd),
    /// Run the appliance: local API, inbox, sync, update channel (systemd).
    Run,
    /// Manage the local API's bearer tokens (device, app, admin).
    #[command(subcommand)]
    Token(token::Cmd),
    /// Poll the vendor update channel once (`[updates]` in the config).
    Update,
}

/// Process exit statuses (see docs/operations.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitStatus {
    /// Success.
    Ok = 0,
    /// Any other failure (I/O, database, bad input file).
    Failure = 1,
    /// Command-line usage error (clap).
    Usage = 2,
    /// A bundle was refused by verification or the version floor, or a
    /// plugin call was refused (quarantine, grant, unknown function).
    Refused = 3,
    /// A named plugin or key does not exist.
    NotFound = 4,
    /// The config file is invalid.
    Config = 5,
    /// The data dir is not initialised.
    NotInitialised = 6,
    /// A plugin call failed (the plugin's error, a trap or a limit).
    PluginFailed = 7,
    /// `audit verify` found a tampered, deleted, reordered or truncated log.
    Tampered = 8,
}

/// The exit status for an error, from the first typed cause in its chain.
pub fn exit_status(err: &anyhow::Error) -> ExitStatus {
    for cause in err.chain() {
        if cause.is::<crate::bundle::VerifyError>()
            || cause.is::<crate::bundle::store::FloorError>()
        {
            return ExitStatus::Refused;
        }
        if let Some(e) = cause.downcast_ref::<crate::runtime::CallError>() {
            return match e {
                crate::runtime::CallError::NotInstalled(_) => ExitStatus::NotFound,
                crate::runtime::CallError::Failed { .. } => ExitStatus::PluginFailed,
                crate::runtime::CallError::Internal(_)
                | crate::runtime::CallError::Unrecorded(_) => ExitStatus::Failure,
                _ => ExitStatus::Refused,
            };
        }
        if cause.is::<crate::audit::verify::Tampered>() {
            return ExitStatus::Tampered;
        }
        if cause.is::<NotFound>()
            || matches!(
                cause.downcast_ref(),
                Some(crate::fhir::search::SearchError::NotFound(_))
            )
        {
            return ExitStatus::NotFound;
        }
        if cause.is::<crate::config::ConfigError>() {
            return ExitStatus::Config;
        }
        if cause.is::<crate::datadir::NotInitialised>() {
            return ExitStatus::NotInitialised;
        }
    }
    ExitStatus::Failure
}

/// Resolved global context handed to every subcommand.
pub struct Ctx {
    /// The data dir.
    pub dir: DataDir,
    /// Validated config.
    pub config: Config,
    /// Output mode.
    pub out: Output,
}

impl Ctx {
    /// True when `--json` was given.
    pub fn out_json(&self) -> bool {
        self.out.json
    }
}

/// Prints results as text or JSON.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    json: bool,
}

impl Output {
    /// Prints a document as it is (a resource, a plugin's output), with the
    /// same closed-stdout handling as [`Output::emit`].
    pub fn raw(&self, text: &str) -> Result<()> {
        write_stdout(text)
    }

    /// Prints `value` as JSON, or `text()` for humans. A closed stdout
    /// (`clinicbox … | head`) ends the process quietly with status 0: every
    /// state change was committed before anything is printed.
    pub fn emit<T: Serialize>(&self, value: &T, text: impl FnOnce() -> String) -> Result<()> {
        let body = if self.json {
            serde_json::to_string_pretty(value)?
        } else {
            text().trim_end().to_owned()
        };
        if body.is_empty() {
            return Ok(());
        }
        write_stdout(&body)
    }
}

/// Writes `body` and a newline to stdout. A closed stdout (`clinicbox … |
/// head`) ends the process quietly with status 0: every state change was
/// committed before anything is printed.
fn write_stdout(body: &str) -> Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{body}").and_then(|()| stdout.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(anyhow::Error::new(e).context("cannot write to stdout")),
    }
}

/// Loads the config (for logging before anything else runs).
pub fn load_config(cli: &Cli) -> Result<Config> {
    Ok(Config::load(cli.config.as_deref())?)
}

/// Runs a parsed command line with its loaded config.
pub fn run(cli: Cli, config: Config) -> Result<()> {
    let ctx = Ctx {
        dir: DataDir::new(&cli.data_dir)
            .with_cache(cli.cache_dir.clone().or_else(|| config.cache_dir.clone())),
        config,
        out: Output { json: cli.json },
    };
    match cli.command {
        Command::Init => init::run(&ctx),
        Command::Demo(args) => demo::run(&ctx, args),
        Command::Key(cmd) => key::run(&ctx, cmd),
        Command::Bundle(cmd) => bundle::run(&ctx, cmd),
        Command::Trust(cmd) => trust::run(&ctx, cmd),
        Command::Plugin(cmd) => plugin::run(&ctx, cmd),
        Command::Fhir(cmd) => fhir::run(&ctx, cmd),
        Command::Call(args) => call::run(&ctx, args),
        Command::Audit(cmd) => audit::run(&ctx, cmd),
        Command::Sync(args) => sync::run(&ctx, args),
        Command::Run => run::run(&ctx, cli.config.clone(), cli.cache_dir.clone()),
        Command::Token(cmd) => token::run(&ctx, cmd),
        Command::Update => run::update(&ctx),
    }
}
