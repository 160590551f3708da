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
//! `hint: <what to do>`; the exit code is 1 for errors and 2 for usage errors.

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
        Err(e) => {
            if let Some(cli::Exit(code)) = e.downcast_ref::<cli::Exit>() {
                return ExitCode::from(*code);
            }
            flame_client::report::report(&e);
            ExitCode::FAILURE
        }
    }
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
