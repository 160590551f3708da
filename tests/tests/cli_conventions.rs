//! The conventions every `flame` command keeps (issue 21): a closed stdout is not a crash
//! (`flame app list | head -1` exits 0), Ctrl-C cancels what the command started and exits
//! 130, and a usage error exits 2 with a message a person can act on.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_tests::cluster::flame_command;
use flame_tests::command::{describe, COMMAND_TIMEOUT};
use flame_tests::{run_command, Cluster, ClusterOptions};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt as _;
use tokio::process::Command;

/// `flame ARGS... | true` under `pipefail`: the reader is gone before flame writes, so its
/// first write meets a closed pipe, and the pipeline's status is flame's.
async fn into_closed_pipe(cluster: &Cluster, args: &str) -> flame_tests::CmdOutput {
    let flame = flame_tests::binary("flame");
    let script = format!(
        "set -o pipefail; '{}' --head '{}' --ca-file '{}' --token-file '{}' {args} | true",
        flame.display(),
        cluster.head_addr(),
        cluster.ca_file().display(),
        cluster.admin_token_file().display(),
    );
    let mut command = Command::new("bash");
    command.args(["-c", &script]);
    run_command(command, COMMAND_TIMEOUT).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_closed_stdout_ends_the_command_quietly_with_0() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    cluster.flame(&["ping", "-t", "10"]).await.assert_success();
    let sessions = cluster.client().await.list_sessions().await.unwrap();
    let id = sessions[0].id.to_string();
    for args in [
        "app list".to_string(),
        "app list --output json".to_string(),
        format!("session view {id}"),
        format!("session tasks {id}"),
        "node list".to_string(),
    ] {
        let out = into_closed_pipe(&cluster, &args).await;
        assert!(out.success(), "flame {args} | true:\n{out}");
        assert!(
            !out.stderr.contains("panicked"),
            "flame {args} | true:\n{out}"
        );
        assert!(out.stderr.trim().is_empty(), "flame {args} | true:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_in_ping_cancels_its_session_and_exits_130() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let mut command = flame_command();
    command
        .arg("--head")
        .arg(cluster.head_addr())
        .arg("--ca-file")
        .arg(cluster.ca_file())
        .arg("--token-file")
        .arg(cluster.admin_token_file())
        .args(["ping", "-t", "200000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let line = describe(&command);
    let mut child = command.spawn().unwrap();
    let client = cluster.client().await;
    // Interrupted while tasks are being run: some have finished, most have not.
    let deadline = tokio::time::Instant::now() + COMMAND_TIMEOUT;
    loop {
        let sessions = client.list_sessions().await.unwrap();
        if sessions.first().is_some_and(|s| s.counts.succeeded > 0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ping task finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = child.id().expect("flame ping exited early");
    signal::kill(Pid::from_raw(i32::try_from(pid).unwrap()), Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(COMMAND_TIMEOUT, child.wait())
        .await
        .unwrap_or_else(|_| panic!("`{line}` did not exit after Ctrl-C"))
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "`{line}`: {status}; stderr:\n{stderr}"
    );
    assert!(stderr.contains("was cancelled"), "{stderr}");
    // Cancelled: nothing of it is left pending or running. (The head ends the tasks already
    // sent to executors as their cancellations are confirmed, so this may take a moment.)
    let deadline = tokio::time::Instant::now() + COMMAND_TIMEOUT;
    loop {
        let sessions = client.list_sessions().await.unwrap();
        assert_eq!(sessions.len(), 1, "{sessions:?}");
        let counts = &sessions[0].counts;
        if counts.unfinished() == 0 {
            assert!(counts.cancelled > 0, "{counts:?}");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "tasks still unfinished after the cancel: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_errors_exit_2_and_say_what_is_expected() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    for (args, expected) in [
        (
            &["submit", "--mem-per-rank", "lots", "--", "true"][..],
            "is not a size",
        ),
        (
            &["submit", "--cpus-per-rank", "none", "--", "true"][..],
            "--cpus-per-rank",
        ),
        (&["submit", "--time", "soon", "--", "true"][..], "HH:MM:SS"),
        (&["ping", "-t", "0"][..], "-t"),
    ] {
        let out = cluster.flame(args).await;
        assert_eq!(out.status.code(), Some(2), "{out}");
        assert!(out.stderr.contains(expected), "{out}");
        assert!(!out.stderr.contains("float"), "{out}");
    }
    // Slurm's time format is a time, and the command needs no `--`: the job is submitted.
    let out = cluster
        .flame(&["submit", "--detach", "--time", "1:00:00", "hostname"])
        .await;
    out.assert_success();
    let jobs = cluster.client().await.list_sessions().await.unwrap();
    let job = jobs[0].job.as_ref().expect("not a job");
    assert_eq!(job.spec.time_limit_ms, Some(3_600_000), "{job:?}");
    assert_eq!(job.spec.command, "hostname", "{job:?}");
}
