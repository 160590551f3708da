//! `flame local`: a head and a node in the foreground.

use super::signals::StopSignals;
use crate::render::outln;
use anyhow::anyhow;
use clap::Args;
use flame_client::local::{LocalCluster, LocalOptions};
use std::future::Future;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct LocalArgs {
    /// Keep state and logs here (created if missing) instead of a temporary folder removed on exit
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The head's listen address; port 0 picks a free one
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:0")]
    pub listen: String,
}

/// Starts a local cluster with `opts`, reporting progress on stderr.
pub async fn start(opts: LocalOptions) -> anyhow::Result<LocalCluster> {
    eprintln!("Starting flame-head and flame-node (and joining the node)...");
    Ok(LocalCluster::start(opts).await?)
}

/// [`start`], given up (and whatever already runs killed) at Ctrl-C or `SIGTERM`.
pub async fn start_unless_stopped(
    opts: LocalOptions,
    signals: &mut StopSignals,
) -> anyhow::Result<LocalCluster> {
    tokio::select! {
        started = start(opts) => started,
        // Dropping the half-started cluster kills whatever was already running.
        signal = signals.recv() => Err(signal.stopped().context("the local cluster was stopped while starting")),
    }
}

/// Runs `work` against `cluster`, then stops the cluster whatever the outcome. The head or
/// the node exiting during the work is the error; the work's own error matters more than a
/// messy stop.
pub async fn run_then_stop<T>(
    mut cluster: LocalCluster,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let outcome = tokio::select! {
        result = work => result,
        exit = cluster.exited() => Err(anyhow!(
            "{} exited with {} during the run; the end of {}:\n{}",
            exit.name, exit.status, exit.log.display(), exit.tail
        )),
    };
    let stopped = cluster.shutdown().await;
    let value = outcome?;
    stopped?;
    Ok(value)
}

pub async fn run(args: LocalArgs) -> anyhow::Result<()> {
    super::check_listen(&args.listen)?;
    // Installed before the children start, so an early Ctrl-C still stops them in order.
    let mut signals = StopSignals::install()?;
    let opts = LocalOptions {
        data_dir: args.data_dir,
        listen: args.listen,
        ..LocalOptions::default()
    };
    let mut cluster = start_unless_stopped(opts, &mut signals).await?;
    let data = cluster.data_dir().display().to_string();
    outln!(
        "Flame is running: head at {}, node `local`.",
        cluster.head_addr()
    )?;
    if cluster.is_temporary() {
        outln!("State and logs: {data} (removed on exit)")?;
    } else {
        outln!("State and logs: {data}")?;
    }
    outln!(
        "Clients act as its admin, with the token in {} (keep it private).",
        cluster.token_file().display()
    )?;
    outln!("To use it from another shell:")?;
    outln!()?;
    outln!("    {}", cluster.exports())?;
    outln!()?;
    outln!("Press Ctrl-C to stop.")?;

    let outcome = tokio::select! {
        signal = signals.recv() => Ok(signal),
        exit = cluster.exited() => Err(exit),
    };
    eprintln!("Stopping...");
    let stopped = cluster.shutdown().await;
    match outcome {
        Ok(_) => {
            stopped?;
            eprintln!("Stopped.");
            Ok(())
        }
        Err(exit) => Err(anyhow!(
            "{} exited with {}; the end of {}:\n{}",
            exit.name,
            exit.status,
            exit.log.display(),
            exit.tail
        )),
    }
}
