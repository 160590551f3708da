//! `flame cluster up | status | down` over real SSH to three hosts, each a network
//! namespace running a real sshd on port 22 of its own address (`flame_tests::sshd`), with
//! keys made for the test. `flame` itself runs in a fourth namespace, the operator's
//! machine, and so does the `flame ping` that uses the cluster.
//!
//! The hosts share this machine's file system, so each has its own install, data and log
//! folders in the cluster file; the test finds what they run by those folders.
//!
//! 1. `up` starts a head and a node; with a second node added to the file, `up` starts
//!    (and joins) it alone; `flame ping -t 10000` from outside uses both nodes.
//! 2. `up` again changes nothing and copies nothing; `status` shows both nodes Ready. A
//!    node agent killed with SIGKILL is restarted by its supervisor. A binary changed on
//!    one host is copied there again and only that host's daemon restarts.
//! 3. With one host's sshd stopped, `up` (after a `down`) brings up the rest, names that
//!    host and the step, and exits with 3; once its sshd is back, `up` starts it alone.
//! 4. `down` leaves no process of the cluster on any host.
//!
//! Needs root, `ip`, `nft` and openssh-server; under CI=true their absence fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_tests::netns::{self, Network};
use flame_tests::sshd::{self, processes_under, SshKeys, Sshd};
use flame_tests::{binary, prerequisites, run_command, CmdOutput};
use std::path::{Path, PathBuf};
use std::time::Duration;

const TEST: &str = "ssh_cluster_up_ping_repeat_unreachable_down";
/// The namespace `flame` runs in: node 2 of the network (the hosts are the head's
/// namespace and nodes 0 and 1).
const OPERATOR: usize = 2;
/// Bound on one `flame` command.
const FLAME_TIMEOUT: Duration = Duration::from_secs(240);
/// Bound on a supervisor starting its killed daemon again (its first backoff is 1 s).
const RESTART_TIMEOUT: Duration = Duration::from_secs(20);

/// Three SSH hosts and the operator's namespace, in a folder of the test's own. Dropping it
/// kills whatever still runs from the hosts' folders (a failed test's daemons), then the
/// sshds, then the namespaces.
struct Hosts {
    sshds: Vec<Sshd>,
    network: Network,
    root: tempfile::TempDir,
    file: PathBuf,
    keys: SshKeys,
}

impl Hosts {
    fn create() -> Hosts {
        let network = Network::create(3);
        let root = tempfile::Builder::new()
            .prefix("flame-ssh-")
            .tempdir()
            .unwrap();
        // The nodes run executors as each owner's own uid, which must reach the installed
        // binaries (flame-ping) below this folder.
        std::fs::set_permissions(
            root.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let keys = SshKeys::create(&root.path().join("ssh"));
        let sshds = vec![
            Sshd::start(&keys, network.head()),
            Sshd::start(&keys, network.node(0)),
            Sshd::start(&keys, network.node(1)),
        ];
        let file = root.path().join("cluster.toml");
        let hosts = Hosts {
            sshds,
            network,
            root,
            file,
            keys,
        };
        hosts.write_file(3);
        hosts
    }

    /// Writes the cluster file with the head and the first `hosts - 1` nodes.
    fn write_file(&self, hosts: usize) {
        let text = cluster_file(self.root.path(), &self.keys, &self.sshds[..hosts]);
        std::fs::write(&self.file, text).unwrap();
    }

    /// Runs `flame ARGS` in the operator's namespace, with `env` and no FLAME_* variable
    /// of the test's own environment. The `flame` of [`bench_bin_dir`] when set, else the
    /// workspace's.
    async fn flame(&self, args: &[&str], env: &[(String, String)]) -> CmdOutput {
        let flame = bench_bin_dir().map_or_else(|| binary("flame"), |d| d.join("flame"));
        let mut command = tokio::process::Command::new(flame);
        command.args(args);
        for var in flame_tests::cluster::FOREIGN_ENV {
            command.env_remove(var);
        }
        command.envs(env.iter().map(|(k, v)| (k, v)));
        self.network.node(OPERATOR).enter_in_child(&mut command);
        run_command(command, FLAME_TIMEOUT).await
    }

    async fn cluster(&self, verb: &str) -> CmdOutput {
        let file = self.file.to_string_lossy().into_owned();
        self.flame(&["cluster", verb, "-f", &file], &[]).await
    }

    /// The processes running one of the hosts' binaries.
    fn processes(&self) -> Vec<(i32, PathBuf)> {
        processes_under(&self.root.path().join("hosts"))
    }

    fn logs(&self) -> String {
        let mut text = String::new();
        for host in ["head", "node-a", "node-b"] {
            for role in ["head", "node"] {
                let log = self
                    .root
                    .path()
                    .join(format!("hosts/{host}/log/flame-{role}.log"));
                if let Ok(t) = std::fs::read_to_string(&log) {
                    let tail: Vec<&str> = t.lines().rev().take(30).collect();
                    text.push_str(&format!("--- {} ---\n", log.display()));
                    for l in tail.iter().rev() {
                        text.push_str(l);
                        text.push('\n');
                    }
                }
            }
        }
        text
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        sshd::kill_under(&self.root.path().join("hosts"));
    }
}

fn cluster_file(root: &Path, keys: &SshKeys, sshds: &[Sshd]) -> String {
    let dirs = |host: &str| {
        let base = root.join("hosts").join(host);
        format!(
            "install_dir = \"{b}/bin\"\ndata_dir = \"{b}/data\"\nlog_dir = \"{b}/log\"\n",
            b = base.display()
        )
    };
    let node = |i: usize, name: &str| {
        format!(
            "[[nodes]]\nhost = \"{addr}\"\nname = \"{name}\"\ncpus = 1\n\
             labels = {{ rack = \"r{i}\" }}\n\
             args = [\"--cgroup-root\", \"flame-ssh-{pid}-{name}\"]\n{dirs}",
            addr = sshds[i + 1].addr(),
            pid = std::process::id(),
            dirs = dirs(name),
        )
    };
    let nodes: Vec<String> = [(0, "node-a"), (1, "node-b")]
        .into_iter()
        .filter(|(i, _)| i + 1 < sshds.len())
        .map(|(i, name)| node(i, name))
        .collect();
    format!(
        "name = \"e2e\"\nstate_dir = \"{state}\"\n\n[ssh]\nuser = \"root\"\nidentity_file = \"{key}\"\n\
         known_hosts_file = \"{known}\"\nconnect_timeout = \"5s\"\ncommand_timeout = \"60s\"\n\
         options = [{options}]\n\n\
         [head]\nhost = \"{head}\"\n{head_dirs}\n{nodes}",
        state = root.join("client").display(),
        options = ssh_options(),
        key = keys.client_key.display(),
        known = keys.known_hosts.display(),
        head = sshds[0].addr(),
        head_dirs = dirs("head"),
        nodes = nodes.join("\n"),
    )
}

/// `ssh.options` of the cluster file: one that changes nothing (so that the generated ssh
/// configuration, which includes the user's, is used), and `FLAME_SSH_BENCH_OPTIONS`
/// (comma-separated `Key=Value`) for the measurement.
fn ssh_options() -> String {
    let mut options = vec!["ServerAliveCountMax=3".to_string()];
    if let Ok(extra) = std::env::var("FLAME_SSH_BENCH_OPTIONS") {
        options.extend(
            extra
                .split(',')
                .filter(|o| !o.is_empty())
                .map(str::to_string),
        );
    }
    options
        .iter()
        .map(|o| format!("\"{o}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `FLAME_SSH_BENCH_BIN_DIR`: the folder of the `flame` (and so of the binaries copied)
/// that the measurement runs, e.g. `target/release`.
fn bench_bin_dir() -> Option<PathBuf> {
    std::env::var_os("FLAME_SSH_BENCH_BIN_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
}

/// The `export A=x B=y ...; unset ...` line `up` prints, as variables.
fn exports(stdout: &str) -> Vec<(String, String)> {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("export FLAME_HEAD="))
        .unwrap_or_else(|| panic!("no export line in:\n{stdout}"));
    let assignments = line
        .trim_start_matches("export ")
        .split(';')
        .next()
        .unwrap();
    assignments
        .split_whitespace()
        .map(|a| {
            let (k, v) = a.split_once('=').unwrap();
            (k.to_string(), v.trim_matches('\'').to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn ssh_cluster_up_ping_repeat_unreachable_down() {
    if !netns::available(TEST) || !prerequisites::require(TEST, sshd::missing_prerequisite()) {
        return;
    }
    let mut hosts = Hosts::create();

    // 1. Up with the head and one node; then a node added to the file is the only host
    //    started (and joined); then work from outside uses both nodes.
    hosts.write_file(2);
    let first = hosts.cluster("up").await;
    assert!(first.success(), "{first}\n{}", hosts.logs());
    assert!(
        first
            .stdout
            .contains("2 hosts: 2 started, 0 restarted, 0 unchanged, 0 failed"),
        "{first}"
    );
    eprintln!("first `flame cluster up` of 2 hosts: {:?}", first.elapsed);
    hosts.write_file(3);
    let up = hosts.cluster("up").await;
    assert!(up.success(), "{up}\n{}", hosts.logs());
    assert!(
        up.stdout
            .contains("3 hosts: 1 started, 0 restarted, 2 unchanged, 0 failed"),
        "{up}"
    );
    eprintln!(
        "`flame cluster up` with a host added: {:?}\n{up}",
        up.elapsed
    );
    // Its join token was revoked once used.
    assert!(!up.stderr.contains("could not be revoked"), "{up}");
    let env = exports(&up.stdout);
    let ping = hosts.flame(&["ping", "-t", "10000"], &env).await;
    assert!(ping.success(), "{ping}\n{}", hosts.logs());
    assert!(
        ping.stdout.contains("10,000 tasks completed") && ping.stdout.contains("on 2 hosts"),
        "{ping}"
    );

    // 2. Again: nothing changes, nothing is copied.
    let head_binary = hosts.root.path().join("hosts/head/bin/flame-head");
    let copied_at = std::fs::metadata(&head_binary).unwrap().modified().unwrap();
    let again = hosts.cluster("up").await;
    again.assert_success();
    assert!(
        again
            .stdout
            .contains("3 hosts: 0 started, 0 restarted, 3 unchanged, 0 failed"),
        "{again}"
    );
    eprintln!("repeated `flame cluster up`: {:?}", again.elapsed);
    assert_eq!(
        std::fs::metadata(&head_binary).unwrap().modified().unwrap(),
        copied_at,
        "{} was copied again",
        head_binary.display()
    );
    let status = hosts.cluster("status").await;
    status.assert_success();
    assert_eq!(status.stdout.matches("Ready").count(), 2, "{status}");
    let file = hosts.file.to_string_lossy().into_owned();
    let json = hosts
        .flame(&["cluster", "status", "-f", &file, "--output", "json"], &[])
        .await;
    json.assert_success();
    let members: Vec<serde_json::Value> = serde_json::from_str(&json.stdout).unwrap();
    let summary: Vec<(&str, &str, bool)> = members
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap(),
                m["state"].as_str().unwrap(),
                m["running"].is_string(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("head", "serving", true),
            ("node-a", "Ready", true),
            ("node-b", "Ready", true)
        ],
        "{json}"
    );

    // Supervision: a node agent killed with SIGKILL is started again by its supervisor,
    // registers again, and `up` still finds everything as it should be.
    let agent = hosts.root.path().join("hosts/node-a/bin/flame-node");
    let pid_of = |exe: &Path| {
        hosts
            .processes()
            .into_iter()
            .find(|(_, e)| e == exe)
            .map(|(pid, _)| pid)
    };
    let killed = pid_of(&agent).unwrap_or_else(|| panic!("no {} runs", agent.display()));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(killed),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + RESTART_TIMEOUT;
    let restarted = loop {
        match pid_of(&agent) {
            Some(pid) if pid != killed => break pid,
            _ if std::time::Instant::now() > deadline => {
                panic!(
                    "node-a's agent was not restarted within {RESTART_TIMEOUT:?}\n{}",
                    hosts.logs()
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    eprintln!("node-a's agent {killed} was killed; its supervisor started {restarted}");
    let after_restart = hosts.cluster("up").await;
    assert!(after_restart.success(), "{after_restart}\n{}", hosts.logs());
    assert!(
        after_restart
            .stdout
            .contains("3 hosts: 0 started, 0 restarted, 3 unchanged, 0 failed"),
        "{after_restart}"
    );

    // A binary that differs on one host (by checksum) is copied again there, and that
    // host's daemon alone is restarted on it.
    let shell = hosts.root.path().join("hosts/node-b/bin/flame-shell");
    let mut bytes = std::fs::read(&shell).unwrap();
    bytes.push(0);
    std::fs::write(&shell, &bytes).unwrap();
    let recopied = hosts.cluster("up").await;
    assert!(recopied.success(), "{recopied}\n{}", hosts.logs());
    assert!(
        recopied
            .stdout
            .contains("3 hosts: 0 started, 1 restarted, 2 unchanged, 0 failed"),
        "{recopied}"
    );
    assert_eq!(
        std::fs::read(&shell).unwrap(),
        std::fs::read(binary("flame-shell")).unwrap(),
        "{} was not copied again",
        shell.display()
    );

    // 3. One host unreachable: the rest come up, the host and the step are named.
    hosts.cluster("down").await.assert_success();
    assert!(hosts.processes().is_empty(), "{:?}", hosts.processes());
    // A dry run says what would be done, and does nothing.
    let file = hosts.file.to_string_lossy().into_owned();
    let dry = hosts
        .flame(&["cluster", "up", "--dry-run", "-f", &file], &[])
        .await;
    dry.assert_success();
    assert_eq!(
        dry.stdout.matches("start (supervised process)").count(),
        3,
        "{dry}"
    );
    assert!(hosts.processes().is_empty(), "{:?}", hosts.processes());
    let unreachable = hosts.sshds[2].addr();
    hosts.sshds[2].stop();
    let partial = hosts.cluster("up").await;
    assert_eq!(
        partial.status.code(),
        Some(3),
        "{partial}\n{}",
        hosts.logs()
    );
    assert!(
        partial
            .stdout
            .contains("3 hosts: 2 started, 0 restarted, 0 unchanged, 1 failed"),
        "{partial}"
    );
    let named = format!("error: node-b ({unreachable}): connect: ssh: connect to host {unreachable} port 22: Connection refused");
    assert!(partial.stderr.contains(&named), "{partial}");
    eprintln!("{partial}");
    let status = hosts.cluster("status").await;
    assert_eq!(status.status.code(), Some(3), "{status}");
    assert_eq!(status.stdout.matches("Ready").count(), 1, "{status}");
    // Back: it alone is started.
    hosts.sshds[2].restart();
    let back = hosts.cluster("up").await;
    back.assert_success();
    assert!(
        back.stdout
            .contains("3 hosts: 1 started, 0 restarted, 2 unchanged, 0 failed"),
        "{back}"
    );

    // 4. Down, draining the nodes first: nothing of the cluster runs anywhere.
    let down = hosts
        .flame(&["cluster", "down", "--drain", "-f", &file], &[])
        .await;
    down.assert_success();
    eprintln!("{down}");
    assert!(
        down.stdout
            .contains("3 members: 3 stopped, 0 not running, 0 failed"),
        "{down}"
    );
    let left = hosts.processes();
    assert!(left.is_empty(), "still running after down: {left:?}");
    for host in ["head", "node-a", "node-b"] {
        let role = if host == "head" { "head" } else { "node" };
        let pid_file = hosts
            .root
            .path()
            .join(format!("hosts/{host}/data/{role}/supervisor.pid"));
        assert!(!pid_file.exists(), "{} is left", pid_file.display());
    }
}

/// How long `flame cluster up` takes for three fresh hosts (binaries copied, the head
/// initialised and started, two nodes joined, started and Ready), three times, each on new
/// hosts; prints the times and their median for BENCHMARKS.md. A measurement, not a check:
///
/// ```sh
/// CI=true FLAME_SSH_BENCH_BIN_DIR=$PWD/target/release \
///   cargo test -p flame-tests --test ssh_cluster -- --ignored --nocapture
/// ```
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement for BENCHMARKS.md: run with --ignored"]
async fn ssh_cluster_up_wall_time() {
    const TEST: &str = "ssh_cluster_up_wall_time";
    if !netns::available(TEST) || !prerequisites::require(TEST, sshd::missing_prerequisite()) {
        return;
    }
    let mut times = Vec::new();
    for _ in 0..3 {
        let hosts = Hosts::create();
        let up = hosts.cluster("up").await;
        assert!(up.success(), "{up}\n{}", hosts.logs());
        assert!(up.stdout.contains("3 hosts: 3 started"), "{up}");
        times.push(up.elapsed);
        // Empty, unless RUST_LOG asks `flame` for its step timings (`flame=debug`).
        eprint!("{}", up.stderr);
        hosts.cluster("down").await.assert_success();
    }
    let mut sorted = times.clone();
    sorted.sort();
    eprintln!(
        "{TEST}: binaries from {}; runs {times:?}; median {:?}",
        bench_bin_dir()
            .map_or_else(|| binary("flame"), |d| d.join("flame"))
            .display(),
        sorted[1]
    );
}
