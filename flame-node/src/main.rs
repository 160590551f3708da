//! `flame-node`: the Flame node agent. It registers with the head, reports its capacity,
//! and runs the executors the head asks for as local processes.

mod executor;
mod lifecycle;
mod link;
mod resources;

use clap::Parser;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "flame-node", version, about = "The Flame node agent")]
struct Args {
    /// Address of the head, `host:port`.
    #[arg(long, env = "FLAME_HEAD")]
    head: String,
    /// PEM file with the certificate(s) to trust for the head.
    #[arg(long, env = "FLAME_CA_FILE")]
    ca_file: PathBuf,
    /// Name of this node (default: the host name, lower-cased).
    #[arg(long, env = "FLAME_NODE_NAME")]
    name: Option<String>,
    /// Executor slots to offer (default: the number of cpus).
    #[arg(long)]
    cpus: Option<u32>,
    /// Working directory for executors without their own.
    #[arg(long, default_value = "/var/lib/flame/node")]
    work_dir: PathBuf,
    /// Most tasks the head may have outstanding per executor (the head sizes the queue by
    /// measured task time within this bound).
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1024))]
    credit: u32,
    /// How long executors keep running after the head is lost, waiting for it to return
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    head_loss_grace: std::time::Duration,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLAME_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = std::fs::create_dir_all(&args.work_dir) {
        eprintln!(
            "error: cannot create the work directory {}: {e}",
            args.work_dir.display()
        );
        return std::process::ExitCode::FAILURE;
    }
    let cpus = args.cpus.unwrap_or_else(resources::cpus);
    if cpus == 0 {
        eprintln!("error: --cpus must be at least 1");
        return std::process::ExitCode::FAILURE;
    }
    let config = link::NodeConfig {
        head: args.head,
        ca_file: args.ca_file,
        name: args
            .name
            .unwrap_or_else(|| resources::hostname().to_lowercase()),
        cpus,
        memory_bytes: resources::memory_bytes(),
        work_dir: args.work_dir,
        credit: args.credit,
        head_loss_grace: args.head_loss_grace,
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(link::run(config, shutdown_signal())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}
