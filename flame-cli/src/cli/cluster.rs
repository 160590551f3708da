//! `flame cluster up | down | status` and the hidden `flame cluster supervise`: their flags,
//! and the call into the SSH deployer ([`crate::deploy`]), which does the work.
//!
//! Exit codes: 0 when every member is as asked; [`EXIT_PARTIAL`] (3) when some member
//! failed and the others are up (or stopped); 1 when the cluster is not up at all (the head
//! failed, or the file is unusable); 2 for usage errors.

use super::Exit;
use crate::deploy::spec::ClusterSpec;
use crate::deploy::{down, supervise, up, Outcome};
use anyhow::Context as _;
use clap::{Args, Subcommand};
use flame_client::report::HintExt as _;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The exit code of a cluster that is partly as asked: some member failed, the others
/// are up.
pub const EXIT_PARTIAL: u8 = 3;

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Start the cluster a cluster file describes, over SSH: copy binaries where they
    /// differ, initialise and start the head, join and start the nodes, wait until they are
    /// Ready. Safe to repeat: what runs and is up to date is left alone
    Up(UpArgs),
    /// Stop the nodes (draining them first with --drain), then the head
    Down(DownArgs),
    /// Per host: reachable or not, the version, whether the daemon runs, the node's state
    Status(StatusArgs),
    /// Run a daemon, restarting it when it dies (used by `up` on hosts without systemd)
    #[command(hide = true)]
    Supervise(SuperviseArgs),
}

#[derive(Debug, Clone, Args)]
pub struct FileArgs {
    /// The cluster file
    #[arg(
        short = 'f',
        long = "file",
        value_name = "PATH",
        default_value = "cluster.toml"
    )]
    pub file: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub file: FileArgs,
    #[command(flatten)]
    pub output: crate::render::OutputArgs,
}

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub file: FileArgs,
    /// Print what would be done (after connecting and looking), and change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Bound on each daemon saying it serves after it is started
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub start_timeout: Duration,
    /// Bound on every node being Ready at the head once all are started
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub ready_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct DownArgs {
    #[command(flatten)]
    pub file: FileArgs,
    /// Drain the nodes first: nothing new is placed on them, and they are stopped once
    /// their executors have finished (or --drain-timeout passed: then they are left running)
    #[arg(long)]
    pub drain: bool,
    /// Bound on the drain
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
}

/// Runs a daemon, restarting it when it dies (hidden: `flame cluster up` uses it, with
/// the command line `deploy::scripts::supervise_line` writes).
#[derive(Debug, Args)]
pub struct SuperviseArgs {
    /// The pid file, locked while this supervisor runs
    #[arg(long, value_name = "PATH")]
    pub pid_file: PathBuf,
    /// Where `ready LINE` or `failed HOW` is written
    #[arg(long, value_name = "PATH")]
    pub state_file: PathBuf,
    /// The start of the daemon's stdout line that says it serves
    #[arg(long, value_name = "TEXT")]
    pub ready_prefix: String,
    /// Exit when the daemon exits, rather than restarting it (systemd restarts)
    #[arg(long)]
    pub no_restart: bool,
    /// Most restarts within --restart-window before giving up
    #[arg(long, default_value_t = 5)]
    pub restarts_max: usize,
    /// The window --restarts-max counts in
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub restart_window: Duration,
    /// How long the daemon has to exit after SIGTERM before SIGKILL
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub stop_grace: Duration,
    /// The daemon and its arguments
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

impl From<SuperviseArgs> for supervise::Supervision {
    fn from(args: SuperviseArgs) -> Self {
        supervise::Supervision {
            pid_file: args.pid_file,
            state_file: args.state_file,
            ready_prefix: args.ready_prefix,
            no_restart: args.no_restart,
            restarts_max: args.restarts_max,
            restart_window: args.restart_window,
            stop_grace: args.stop_grace,
            command: args.command,
        }
    }
}

/// Runs a `flame cluster` command.
pub async fn run(cmd: ClusterCommand) -> anyhow::Result<()> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from);
    let home = home.as_deref();
    let outcome = match cmd {
        ClusterCommand::Up(args) => {
            let spec = load(&args.file.file, home)?;
            let options = up::UpOptions {
                dry_run: args.dry_run,
                start_timeout: args.start_timeout,
                ready_timeout: args.ready_timeout,
            };
            up::run(spec, options, home).await?
        }
        ClusterCommand::Down(args) => {
            let spec = load(&args.file.file, home)?;
            down::down(spec, args.drain, args.drain_timeout, home).await?
        }
        ClusterCommand::Status(args) => {
            let spec = load(&args.file.file, home)?;
            down::status(spec, args.output.output, home).await?
        }
        ClusterCommand::Supervise(args) => return Ok(supervise::run(args.into()).await?),
    };
    match outcome {
        Outcome::Complete => Ok(()),
        Outcome::Partial => Err(Exit(EXIT_PARTIAL).into()),
    }
}

fn load(file: &Path, home: Option<&Path>) -> anyhow::Result<ClusterSpec> {
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    ClusterSpec::load(file, bin_dir.as_deref(), home)
        .context("cannot use the cluster file")
        .hint("see packaging/cluster.example.toml for every field")
}
