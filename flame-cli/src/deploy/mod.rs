//! The SSH deployer behind `flame cluster up | down | status`: a Flame cluster on hosts
//! reachable by SSH, from a cluster file (see `packaging/cluster.example.toml`), and the
//! supervisor (`flame cluster supervise`) that runs a daemon on a host without systemd.
//!
//! This is a room of its own, apart from argument parsing: the clap definitions of
//! `flame cluster` are in `cli/cluster.rs`, which resolves the file and calls [`up::run`],
//! [`down::down`], [`down::status`] or [`supervise::run`]. Arrows go one way: `cli` calls
//! `deploy`, and `deploy` uses only `render` (tables, JSON) from the rest of the binary,
//! never `cli`. It reaches the head with `flame_client` and waits for the daemons' ready
//! lines as `flame_protocol::ready` defines them.
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
//! The commands print their progress, tables and failures themselves, and return an
//! [`Outcome`]: whether every member is as asked, or only some (the CLI turns that into
//! exit code 3). An error means the cluster is not up at all (or not reachable to stop).

pub mod down;
pub mod ops;
pub mod remote;
pub mod scripts;
pub mod spec;
pub mod supervise;
pub mod up;

use ops::StepError;
use spec::Member;
use std::collections::BTreeMap;

/// How a command that reached the cluster ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Outcome {
    /// Every member is as asked.
    Complete,
    /// Some member failed (it was reported on stderr); the others are as asked.
    Partial,
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
