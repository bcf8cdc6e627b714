//! The `clinicbox` binary: parse the command line, set up logging to
//! stderr, run, and map the outcome to an exit status.
//!
//! Its allocator is mimalloc on every target: the release binaries are
//! static musl, and musl's own malloc made each API request cost about a
//! tenth more CPU (BENCHMARKS.md, stop 16).

use std::process::ExitCode;

use clap::Parser;
use clinicbox::cli::{self, Cli};

/// The process allocator (see the module doc).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = cli::load_config(&cli).and_then(|config| {
        // Extism reports plugin errors through its own log lines; clinicbox
        // reports them once, in its own error and in the audit record.
        let log_config = simplelog::ConfigBuilder::new()
            .add_filter_ignore_str("extism")
            .build();
        let _ = simplelog::TermLogger::init(
            config.log_level,
            log_config,
            simplelog::TerminalMode::Stderr,
            simplelog::ColorChoice::Auto,
        );
        cli::run(cli, config)
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("clinicbox: error: {err:#}");
            ExitCode::from(cli::exit_status(&err) as u8)
        }
    }
}
