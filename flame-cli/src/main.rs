//! `flame`: run and inspect work on a Flame cluster.
//!
//! The binary over the client library `flame_client` (crate `flame-client`), in three rooms:
//!
//! - `cli`: the command tree (clap) and one module per command; it parses, calls the
//!   library or `deploy`, and prints.
//! - `deploy`: the SSH deployer and supervisor behind `flame cluster` (no clap).
//! - `render`: tables, JSON and the number formats, used by both.
//!
//! Arrows go one way: `cli` → `deploy` → `render`, and `cli` → `render`.
//!
//! Errors go to stderr as `error: <what>` and, where there is something to do about them,
//! `hint: <what to do>`. Exit codes, the same for every command: 0 for success (also when
//! stdout is a pipe closed early, as in `flame app list | head -1`), 1 for errors, 2 for
//! usage errors, 130 when Ctrl-C stopped the command (143 for `SIGTERM`), and a batch
//! job's own code when `flame submit` waited for it.

mod cli;
mod deploy;
mod render;

use anyhow::Context as _;
use clap::Parser;
use cli::Cli;
use std::process::ExitCode;

fn main() -> ExitCode {
    // Usage errors exit here with code 2, before anything else happens.
    let args = Cli::parse();
    init_tracing();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime");
    let result = match runtime {
        Ok(rt) => rt.block_on(cli::run(args)),
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit_for(&e),
    }
}

/// How a failed command ends: quietly with its own code ([`cli::Exit`]), quietly with 0
/// when stdout was closed under it ([`render::StdoutClosed`]), with the signal's code when a
/// signal stopped it ([`cli::signals::Stopped`]: 130 for Ctrl-C), with 2 for a usage error
/// found after parsing ([`cli::Usage`]), else with 1; the last three report the error first.
fn exit_for(e: &anyhow::Error) -> ExitCode {
    for cause in e.chain() {
        if let Some(cli::Exit(code)) = cause.downcast_ref::<cli::Exit>() {
            return ExitCode::from(*code);
        }
        if cause.is::<render::StdoutClosed>() {
            return ExitCode::SUCCESS;
        }
    }
    flame_client::report::report(e);
    for cause in e.chain() {
        if let Some(stopped) = cause.downcast_ref::<cli::signals::Stopped>() {
            return ExitCode::from(stopped.0.exit_code());
        }
        if cause.is::<cli::Usage>() {
            return ExitCode::from(2);
        }
    }
    ExitCode::FAILURE
}

/// Logs go to stderr, quiet unless `RUST_LOG` asks for more.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // `try_init` fails only when a subscriber is already installed, which then serves.
    let _already_installed = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
