//! The node runs as root, and the folders it hands to executors belong to their user: any
//! program of that user may put a link under a name the node is about to use. These tests
//! plant one, as the executor's user, for every file the node touches in such a folder,
//! and check that the file the link points to is untouched (content, owner, mode) and the
//! launch fails saying why:
//!
//! - a batch rank's `exec-<id>/hostfile`, which the node writes when the rank's task
//!   comes (the race is made certain: the job's other rank is on a node held stopped
//!   until the link is in place, so the head cannot start the job before);
//! - a unix-shim executor's socket `run/exec-<id>/shim.sock`, which the node connects to
//!   and makes private: the application itself plants a link to a root daemon's socket.
//!
//! Everything else the node writes is in folders the executor's user cannot write (the
//! work and runtime folders themselves, the logs, the cgroups): the last test checks that.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_protocol::model::{ApplicationSpec, ShimKind};
use flame_tests::test_service::{wait_session, FINISH_TIMEOUT};
use flame_tests::{prerequisites, run_command, Cluster, ClusterOptions};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The executor's user in these tests: an unprivileged account every system has.
const EXECUTOR_USER: &str = "nobody";
/// Bound on the node making an executor's folder.
const FOLDER_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between two looks for the executor's folder: the node announces none.
const FOLDER_POLL_PAUSE: Duration = Duration::from_millis(20);
/// What the victim holds, and its mode, before and (it must be) after.
const VICTIM_TEXT: &str = "precious: root's and nobody else's\n";
const VICTIM_MODE: u32 = 0o644;

fn options(nodes: usize) -> ClusterOptions {
    ClusterOptions::default()
        .nodes(nodes)
        .executor_user(EXECUTOR_USER)
        .allow_root_executors(false)
}

/// A root-owned file outside every executor folder.
fn victim_file(dir: &Path) -> PathBuf {
    let victim = dir.join("victim");
    std::fs::write(&victim, VICTIM_TEXT).unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(VICTIM_MODE)).unwrap();
    victim
}

fn assert_victim_untouched(victim: &Path, cluster: &Cluster) {
    let meta = std::fs::symlink_metadata(victim).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (0, 0, VICTIM_MODE),
        "the victim's owner or mode changed\n{}",
        cluster.logs()
    );
    if meta.is_file() {
        assert_eq!(std::fs::read_to_string(victim).unwrap(), VICTIM_TEXT);
    }
}

/// Waits for a folder `exec-<id>` in `parent` that belongs to the executor's user.
async fn wait_executor_folder(parent: &Path) -> PathBuf {
    let nobody = nix::unistd::User::from_name(EXECUTOR_USER)
        .unwrap()
        .expect("the executor user exists");
    let deadline = Instant::now() + FOLDER_TIMEOUT;
    loop {
        let found = std::fs::read_dir(parent).unwrap().flatten().find(|e| {
            e.file_name().to_string_lossy().starts_with("exec-")
                && e.metadata().is_ok_and(|m| m.uid() == nobody.uid.as_raw())
        });
        if let Some(e) = found {
            return e.path();
        }
        assert!(
            Instant::now() < deadline,
            "no executor folder of {EXECUTOR_USER} in {} after {FOLDER_TIMEOUT:?}",
            parent.display()
        );
        tokio::time::sleep(FOLDER_POLL_PAUSE).await;
    }
}

/// `ln -s target link`, run as the executor's user: what any of its programs can do.
async fn plant_as_executor_user(target: &Path, link: &Path) {
    let mut ln = tokio::process::Command::new("setpriv");
    ln.args([
        "--reuid",
        EXECUTOR_USER,
        "--regid",
        "nogroup",
        "--clear-groups",
        "ln",
        "-s",
    ])
    .arg(target)
    .arg(link);
    run_command(ln, Duration::from_secs(10))
        .await
        .assert_success();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_planted_hostfile_link_is_refused_and_its_target_untouched() {
    let test = "a_planted_hostfile_link_is_refused_and_its_target_untouched";
    if !prerequisites::root(test) || !prerequisites::on_path(test, "setpriv", "util-linux") {
        return;
    }
    let cluster = Cluster::start(options(2)).await;
    let victim = victim_file(cluster.dir());
    // Node 1 is stopped before the job comes: its rank cannot say ready, so the head
    // does not start the job, and node 0's rank waits for its task (and its hostfile)
    // with its folder already made and handed over.
    let node_1 = Pid::from_raw(cluster.node_pid(1));
    kill(node_1, Signal::SIGSTOP).unwrap();
    let submit = cluster.flame(&["submit", "-n", "2", "--ranks-per-node", "1", "--", "true"]);
    let plant = async {
        let folder = wait_executor_folder(&cluster.node_work_dir(0)).await;
        plant_as_executor_user(&victim, &folder.join("hostfile")).await;
        kill(node_1, Signal::SIGCONT).unwrap();
    };
    let (out, ()) = tokio::join!(submit, plant);
    assert_victim_untouched(&victim, &cluster);
    out.assert_failure();
    assert!(
        out.stderr.contains("cannot write the job's hostfile")
            && out.stderr.contains("exists already")
            && out.stderr.contains("refusing to write through it"),
        "the job's failure does not say the hostfile was refused: {out}\n{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_planted_socket_link_is_refused_and_its_target_untouched() {
    let test = "a_planted_socket_link_is_refused_and_its_target_untouched";
    if !prerequisites::root(test) {
        return;
    }
    let cluster = Cluster::start(options(1)).await;
    // A root daemon's socket that only root may connect to (mode 0644: connecting needs
    // write permission).
    let victim = cluster.dir().join("daemon.sock");
    let daemon = std::os::unix::net::UnixListener::bind(&victim).unwrap();
    daemon.set_nonblocking(true).unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(VICTIM_MODE)).unwrap();
    // The application links its socket name to the daemon's socket instead of listening.
    let client = cluster.client().await;
    client
        .register_application(ApplicationSpec {
            shim: ShimKind::Unix,
            args: vec![
                "-c".into(),
                format!(
                    "ln -s {} \"$FLAME_SHIM_SOCKET\" && exec sleep 60",
                    victim.display()
                ),
            ],
            max_instances: 1,
            ..ApplicationSpec::new("planter", "sh")
        })
        .await
        .unwrap();
    let session = client
        .create_session(flame_protocol::model::SessionSpec::new("planter"))
        .await
        .unwrap();
    session
        .submit(vec![bytes::Bytes::from_static(b"x")])
        .await
        .unwrap();
    let info = wait_session(
        &client,
        session.id(),
        "waiting on an executor that refused the planted socket",
        FINISH_TIMEOUT,
        |i| {
            i.waiting
                .as_deref()
                .is_some_and(|w| w.contains("is a symbolic link, not a socket"))
        },
    )
    .await;
    let waiting = info.waiting.unwrap();
    assert!(waiting.contains("shim.sock"), "{waiting}");
    // The daemon was never connected to, and its socket keeps its owner and mode.
    match daemon.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the node connected to the daemon's socket: {other:?}"),
    }
    assert_victim_untouched(&victim, &cluster);
    client.cancel_session(session.id()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_else_the_node_writes_is_in_a_folder_the_executor_user_can_write() {
    let test = "nothing_else_the_node_writes_is_in_a_folder_the_executor_user_can_write";
    if !prerequisites::root(test) {
        return;
    }
    let cluster = Cluster::start(options(1)).await;
    // A job whose rank stays, so that its folders, log and cgroups exist while looked at.
    let client = cluster.client().await;
    let submit = cluster.flame(&["submit", "-n", "1", "--", "sleep", "600"]);
    let look = async {
        let folder = wait_executor_folder(&cluster.node_work_dir(0)).await;
        let mut roots = vec![
            cluster.node_work_dir(0),
            cluster.node_run_dir(0),
            cluster.node_log_dir(0),
        ];
        if let Some(cgroups) = cluster.node_cgroups(0).await {
            for (dir, _) in cgroups.executors() {
                roots.push(dir);
            }
            roots.extend(cgroups.distinct_roots());
        }
        // The node's own folders and the executors' cgroups: root's, not group- or
        // world-writable, so no name in them is the executor user's to change.
        for dir in &roots {
            let meta = std::fs::symlink_metadata(dir).unwrap();
            assert!(meta.is_dir(), "{}", dir.display());
            assert_eq!(meta.uid(), 0, "{} is not root's", dir.display());
            assert_eq!(
                meta.mode() & 0o022,
                0,
                "{} is writable by others: mode {:o}",
                dir.display(),
                meta.mode() & 0o7777
            );
        }
        // Log files and cgroup files are root's too.
        for dir in roots.iter().skip(2) {
            for entry in std::fs::read_dir(dir).unwrap().flatten() {
                let meta = entry.metadata().unwrap();
                assert_eq!(meta.uid(), 0, "{} is not root's", entry.path().display());
            }
        }
        // The executor's folder is its user's, private, and holds only what the rank made.
        let meta = std::fs::metadata(&folder).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o700, "{}", folder.display());
        let sessions = client.list_sessions().await.unwrap();
        for s in sessions {
            client.cancel_session(s.id).await.unwrap();
        }
    };
    let (out, ()) = tokio::join!(submit, look);
    out.assert_failure();
}
