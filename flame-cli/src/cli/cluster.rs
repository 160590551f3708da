//! `flame cluster up | down | status`: a Flame cluster on hosts reachable by SSH, from a
//! cluster file (see `packaging/cluster.example.toml`), and the hidden `flame cluster
//! supervise` that runs a daemon on a host without systemd.
//!
//! | module      | what                                                                    |
//! |-------------|-------------------------------------------------------------------------|
//! | `spec`      | the cluster file, resolved into members (a role on a host)              |
//! | `remote`    | one SSH connection (the system's OpenSSH, through `openssh`), bounded   |
//! | `scripts`   | the `sh` scripts run on the hosts and the reading of their output       |
//! | `ops`       | connect and probe every member at once, copy binaries, progress         |
//! | `up`/`down` | the commands                                                            |
//! | `supervise` | the supervisor of a daemon without systemd                              |
//!
//! Exit codes: 0 when every member is as asked; [`EXIT_PARTIAL`] (3) when some member
//! failed and the others are up (or stopped); 1 when the cluster is not up at all (the head
//! failed, or the file is unusable); 2 for usage errors.

pub mod down;
pub mod ops;
pub mod remote;
pub mod scripts;
pub mod spec;
pub mod supervise;
pub mod up;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use flame_client::report::HintExt as _;
use ops::StepError;
use spec::{ClusterSpec, Member};
use std::collections::BTreeMap;
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
    Supervise(supervise::SuperviseArgs),
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
    pub output: crate::cli::render::OutputArgs,
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

/// Runs a `flame cluster` command.
pub async fn run(cmd: ClusterCommand) -> anyhow::Result<()> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from);
    let home = home.as_deref();
    match cmd {
        ClusterCommand::Up(args) => {
            let spec = load(&args.file.file, home)?;
            let options = up::UpOptions {
                dry_run: args.dry_run,
                start_timeout: args.start_timeout,
                ready_timeout: args.ready_timeout,
            };
            up::run(spec, options, home).await
        }
        ClusterCommand::Down(args) => {
            let spec = load(&args.file.file, home)?;
            down::down(spec, args.drain, args.drain_timeout, home).await
        }
        ClusterCommand::Status(args) => {
            let spec = load(&args.file.file, home)?;
            down::status(spec, args.output.output, home).await
        }
        ClusterCommand::Supervise(args) => Ok(supervise::run(args).await?),
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

/// What `up` did to a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Started,
    Restarted,
    Unchanged,
}

impl Change {
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Started => "started",
            Change::Restarted => "restarted",
            Change::Unchanged => "unchanged",
        }
    }
}

/// A member's line in `up`'s table.
#[derive(Debug, Clone)]
pub struct Row {
    pub member: Member,
    pub version: String,
    pub state: String,
    pub change: Result<Change, StepError>,
}

/// `N hosts: S started, R restarted, U unchanged, F failed`, counting hosts: a host is
/// failed if any of its members failed, else started (restarted) if any was, else
/// unchanged.
pub fn summary(rows: &[Row]) -> String {
    #[derive(PartialEq, Eq, PartialOrd, Ord, Clone, Copy)]
    enum Worst {
        Unchanged,
        Restarted,
        Started,
        Failed,
    }
    let mut hosts: BTreeMap<&str, Worst> = BTreeMap::new();
    for r in rows {
        let w = match &r.change {
            Err(_) => Worst::Failed,
            Ok(Change::Started) => Worst::Started,
            Ok(Change::Restarted) => Worst::Restarted,
            Ok(Change::Unchanged) => Worst::Unchanged,
        };
        let e = hosts.entry(r.member.ssh.host.as_str()).or_insert(w);
        *e = (*e).max(w);
    }
    let count = |w| hosts.values().filter(|v| **v == w).count();
    format!(
        "{} host{}: {} started, {} restarted, {} unchanged, {} failed",
        hosts.len(),
        if hosts.len() == 1 { "" } else { "s" },
        count(Worst::Started),
        count(Worst::Restarted),
        count(Worst::Unchanged),
        count(Worst::Failed),
    )
}

/// `error: NAME (HOST): STEP: WHY` on stderr for each failed member.
pub fn print_failures(rows: &[Row]) {
    for r in rows {
        if let Err(e) = &r.change {
            eprintln!("error: {}: {e}", r.member.label());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use spec::{Role, SshTarget};

    fn row(host: &str, role: Role, change: Result<Change, StepError>) -> Row {
        Row {
            member: Member {
                role,
                name: format!("{host}-{}", role.as_str()),
                ssh: SshTarget {
                    host: host.to_string(),
                    user: None,
                    port: None,
                    identity_file: None,
                },
                install_dir: "/b".to_string(),
                data_dir: "/d".to_string(),
                log_dir: "/l".to_string(),
                args: Vec::new(),
            },
            version: "-".to_string(),
            state: "-".to_string(),
            change,
        }
    }

    /// Hosts are counted once, by what happened to the most affected of their members.
    #[test]
    fn the_summary_counts_hosts() {
        let rows = [
            row("a", Role::Head, Ok(Change::Unchanged)),
            row("a", Role::Node, Ok(Change::Started)),
            row("b", Role::Node, Ok(Change::Unchanged)),
            row("c", Role::Node, Err(ops::fail("connect", "refused"))),
            row("d", Role::Node, Ok(Change::Restarted)),
        ];
        assert_eq!(
            summary(&rows),
            "4 hosts: 1 started, 1 restarted, 1 unchanged, 1 failed"
        );
        assert_eq!(
            summary(&rows[2..3]),
            "1 host: 0 started, 0 restarted, 1 unchanged, 0 failed"
        );
    }
}
