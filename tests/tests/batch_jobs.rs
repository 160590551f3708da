//! Batch jobs (`flame submit`): ranks placed and started together, their environment, the
//! exit code of the first failed rank with no rank left behind, cancel (Ctrl-C and
//! `flame job cancel`) and the time limit leaving no process, and a gang starting on a
//! cluster busy with an elastic session once the preemption grace has run out.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_protocol::model::{JobState, SessionInfo, SessionSpec, TaskOutcome};
use flame_protocol::SessionId;
use flame_tests::cluster::flame_command;
use flame_tests::command::COMMAND_TIMEOUT;
use flame_tests::procfs;
use flame_tests::results::spawn_collector;
use flame_tests::test_service::{self, wait_session};
use flame_tests::{Cluster, ClusterOptions, CmdOutput};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Bound on a job's processes being gone after it ended.
const GONE_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on a job reaching a state.
const STATE_TIMEOUT: Duration = Duration::from_secs(60);

/// The job id `flame submit` announces on stderr: `flame: job N submitted ...`.
fn announced_job(out: &CmdOutput) -> SessionId {
    let line = out
        .stderr
        .lines()
        .find(|l| l.starts_with("flame: job ") && l.contains(" submitted"))
        .unwrap_or_else(|| panic!("no job announced:\n{out}"));
    line["flame: job ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

async fn job_info(cluster: &Cluster, id: SessionId) -> SessionInfo {
    let out = cluster
        .flame(&["job", "view", &id.to_string(), "--output", "json"])
        .await;
    out.assert_success();
    serde_json::from_str(&out.stdout).unwrap()
}

async fn wait_job(cluster: &Cluster, id: SessionId, state: JobState) -> SessionInfo {
    let client = cluster.client().await;
    let info = wait_session(
        &client,
        id,
        "in the awaited job state",
        STATE_TIMEOUT,
        |i| i.job.as_ref().is_some_and(|j| j.state == state),
    )
    .await;
    client.close().await;
    info
}

/// Waits until no process's command line holds `marker`.
async fn wait_processes_gone(marker: &str) {
    let deadline = tokio::time::Instant::now() + GONE_TIMEOUT;
    loop {
        let left = procfs::with_cmdline_containing(marker);
        if left.is_empty() {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("processes of the job are left after {GONE_TIMEOUT:?}: {left:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A 4-rank job over two nodes prints each rank's environment; every rank has every
/// variable, with values that agree with each other and with `flame job view`.
#[tokio::test(flavor = "multi_thread")]
async fn every_rank_gets_its_environment_and_hostfile() {
    let cluster = Cluster::start(ClusterOptions::default().nodes(2).cpus(2)).await;
    let script = "for v in FLAME_JOB_ID FLAME_RANK FLAME_WORLD_SIZE FLAME_LOCAL_RANK \
                  FLAME_LOCAL_WORLD_SIZE FLAME_NODELIST FLAME_HOSTFILE FLAME_NODE MASTER_ADDR \
                  MASTER_PORT RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE; do \
                  eval echo \"$v=\\${$v-UNSET}\"; done; \
                  sed 's/^/HOSTFILE=/' \"$FLAME_HOSTFILE\"";
    let out = cluster
        .flame(&["submit", "-n", "4", "--label", "--", "sh", "-c", script])
        .await;
    out.assert_success();
    let job = announced_job(&out);

    // rank -> variable -> value, and each rank's hostfile lines.
    let mut env: BTreeMap<u32, BTreeMap<String, String>> = BTreeMap::new();
    let mut hostfiles: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for line in out.stdout.lines() {
        let (rank, rest) = line
            .split_once(": ")
            .unwrap_or_else(|| panic!("unlabelled line `{line}`:\n{out}"));
        let rank: u32 = rank
            .parse()
            .unwrap_or_else(|_| panic!("bad label in `{line}`"));
        let (key, value) = rest.split_once('=').unwrap();
        if key == "HOSTFILE" {
            hostfiles.entry(rank).or_default().push(value.to_string());
        } else {
            env.entry(rank)
                .or_default()
                .insert(key.to_string(), value.to_string());
        }
    }
    assert_eq!(
        env.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2, 3],
        "{out}"
    );

    let info = job_info(&cluster, job).await;
    let job_info = info.job.clone().unwrap();
    assert_eq!(job_info.state, JobState::Succeeded, "{info:#?}");
    assert_eq!(job_info.ranks.len(), 4, "{info:#?}");

    let node_names: BTreeSet<String> = job_info.ranks.iter().map(|r| r.node.clone()).collect();
    let nodelist = node_names.iter().cloned().collect::<Vec<_>>().join(",");
    let mut per_node: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for (rank, vars) in &env {
        for (key, value) in vars {
            assert_ne!(value, "UNSET", "rank {rank} lacks {key}:\n{out}");
        }
        let r = rank.to_string();
        assert_eq!(vars["FLAME_JOB_ID"], job.to_string());
        assert_eq!(vars["FLAME_RANK"], r);
        assert_eq!(vars["RANK"], r);
        assert_eq!(vars["FLAME_WORLD_SIZE"], "4");
        assert_eq!(vars["WORLD_SIZE"], "4");
        assert_eq!(vars["LOCAL_RANK"], vars["FLAME_LOCAL_RANK"]);
        assert_eq!(vars["LOCAL_WORLD_SIZE"], vars["FLAME_LOCAL_WORLD_SIZE"]);
        assert_eq!(vars["FLAME_NODELIST"], nodelist, "rank {rank}");
        assert!(
            vars["FLAME_HOSTFILE"].starts_with('/'),
            "rank {rank}: {vars:?}"
        );
        // The same rendezvous for everyone: rank 0's node.
        assert_eq!(vars["MASTER_ADDR"], env[&0]["MASTER_ADDR"]);
        assert_eq!(vars["MASTER_PORT"], env[&0]["MASTER_PORT"]);
        assert!(vars["MASTER_PORT"].parse::<u16>().is_ok(), "{vars:?}");
        let placed = &job_info.ranks[*rank as usize];
        assert_eq!(placed.rank, *rank);
        assert_eq!(vars["FLAME_NODE"], placed.node, "rank {rank} ran elsewhere");
        assert_eq!(vars["FLAME_LOCAL_RANK"], placed.local_rank.to_string());
        assert_eq!(placed.exit_code, Some(0));
        per_node.entry(placed.node.clone()).or_default().push(*rank);
        // Open MPI style: `NODE slots=K`, one line per node, in rank order.
        let expected: Vec<String> = node_names
            .iter()
            .map(|n| {
                let k = job_info.ranks.iter().filter(|r| &r.node == n).count();
                format!("{n} slots={k}")
            })
            .collect();
        assert_eq!(hostfiles[rank], expected, "rank {rank}'s hostfile");
    }
    // A node's ranks are consecutive, numbered 0.. locally, and know how many they are.
    for (node, ranks) in &per_node {
        for (local, rank) in ranks.iter().enumerate() {
            assert_eq!(env[rank]["FLAME_LOCAL_RANK"], local.to_string(), "{node}");
            assert_eq!(
                env[rank]["FLAME_LOCAL_WORLD_SIZE"],
                ranks.len().to_string(),
                "{node}"
            );
        }
        assert!(ranks.windows(2).all(|w| w[1] == w[0] + 1), "{per_node:?}");
    }
    // Two cpus per node, one per rank: the job needed both nodes.
    assert_eq!(node_names.len(), 2, "{info:#?}");

    // `flame job list` shows it.
    let list = cluster.flame(&["job", "list"]).await;
    list.assert_success();
    assert!(list.stdout.contains("Succeeded"), "{list}");
}

/// When one rank exits with 3, `flame submit` exits with 3, and the other ranks, which
/// would sleep for minutes, are stopped: none of their processes is left.
#[tokio::test(flavor = "multi_thread")]
async fn the_first_failed_rank_decides_the_exit_code_and_no_rank_survives() {
    let cluster = Cluster::start(ClusterOptions::default().nodes(2).cpus(2)).await;
    let marker = "301.0125";
    let script = format!(
        "if [ \"$FLAME_RANK\" = 2 ]; then echo failing >&2; exit 3; fi; exec sleep {marker}"
    );
    let out = cluster
        .flame(&["submit", "-n", "4", "--", "sh", "-c", &script])
        .await;
    assert_eq!(out.status.code(), Some(3), "{out}");
    assert!(
        out.stderr.contains("rank 2 exited with status 3"),
        "the failure is not named:\n{out}"
    );
    // A rank's stderr comes out on ours, not on stdout.
    assert!(out.stderr.lines().any(|l| l == "failing"), "{out}");
    assert!(!out.stdout.contains("failing"), "{out}");
    wait_processes_gone(marker).await;
    let info = job_info(&cluster, announced_job(&out)).await;
    let job = info.job.unwrap();
    assert_eq!(job.state, JobState::Failed);
    let failure = job.failure.unwrap();
    assert_eq!((failure.rank, failure.exit_code), (Some(2), Some(3)));
    assert_eq!(job.ranks[2].exit_code, Some(3));
}

/// A rank whose command does not exist fails the job with 127, as a shell would; a job
/// too big for every node known, even empty, is refused at once; bad flags are refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_missing_command_fails_with_127_and_a_bad_flag_is_refused() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let out = cluster
        .flame(&[
            "submit",
            "-n",
            "2",
            "--",
            "/nonexistent/flame-no-such-program",
        ])
        .await;
    assert_eq!(out.status.code(), Some(127), "{out}");
    assert!(out.stderr.contains("flame-no-such-program"), "{out}");

    // A job that can never fit, even on an empty cluster, is refused at once, naming the
    // largest node; so is one asking for GPUs no node has. Nothing is queued.
    for args in [
        vec!["submit", "-n", "3", "--cpus-per-rank", "2", "--", "true"],
        vec!["submit", "-n", "4", "--label", "--", "hostname"],
        vec!["submit", "-n", "1", "--gpus-per-rank", "1", "--", "true"],
    ] {
        let out = cluster.flame(&args).await;
        out.assert_failure();
        assert!(
            out.stderr.contains("no node can ever hold"),
            "{args:?}:\n{out}"
        );
        assert!(
            out.stderr.contains("`node-0`, offers cpus 2"),
            "{args:?}:\n{out}"
        );
    }
    for (args, needle) in [
        (
            vec!["submit", "-n", "3", "--ranks-per-node", "2", "--", "true"],
            "--ranks-per-node",
        ),
        (
            vec!["submit", "-n", "2", "--cpus-per-rank", "many", "--", "true"],
            "--cpus-per-rank",
        ),
        (
            vec!["submit", "-n", "2", "--mem-per-rank", "1KiB", "--", "true"],
            "--mem-per-rank",
        ),
        (vec!["submit", "-n", "0", "--", "true"], "--ranks"),
    ] {
        let out = cluster.flame(&args).await;
        out.assert_failure();
        assert!(out.stderr.contains(needle), "{args:?}:\n{out}");
    }
}

/// Ctrl-C on `flame submit` cancels the job (exit 130); `flame job cancel` cancels a
/// detached one; `--time` stops a job at its limit (exit 124). None leaves a process.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_and_the_time_limit_leave_no_process() {
    let cluster = Cluster::start(ClusterOptions::default().nodes(2).cpus(2)).await;

    // Ctrl-C.
    let marker = "302.0125";
    let mut command = flame_command();
    command
        .arg("--head")
        .arg(cluster.head_addr())
        .arg("--ca-file")
        .arg(cluster.ca_file())
        .arg("--token-file")
        .arg(cluster.admin_token_file())
        .args(["submit", "-n", "3", "--", "sleep", marker])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let child = command.spawn().unwrap();
    let pid = child.id().unwrap() as i32;
    // Running once every rank's process is up.
    let deadline = tokio::time::Instant::now() + STATE_TIMEOUT;
    while procfs::with_cmdline_containing(marker).len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job's ranks did not start:\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .expect("flame submit did not end after Ctrl-C")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("cancelled"), "{stderr}");
    wait_processes_gone(marker).await;

    // `flame job cancel` of a detached job.
    let marker = "303.0125";
    let out = cluster
        .flame(&["submit", "--detach", "-n", "2", "--", "sleep", marker])
        .await;
    out.assert_success();
    let job: SessionId = out.stdout.trim().parse().unwrap();
    wait_job(&cluster, job, JobState::Running).await;
    cluster
        .flame(&["job", "cancel", &job.to_string()])
        .await
        .assert_success();
    wait_job(&cluster, job, JobState::Cancelled).await;
    wait_processes_gone(marker).await;

    // The time limit.
    let marker = "304.0125";
    let out = cluster
        .flame(&["submit", "-n", "2", "--time", "2s", "--", "sleep", marker])
        .await;
    assert_eq!(out.status.code(), Some(124), "{out}");
    assert!(out.stderr.contains("time limit"), "{out}");
    wait_processes_gone(marker).await;
    let info = job_info(&cluster, announced_job(&out)).await;
    assert_eq!(info.job.unwrap().state, JobState::TimedOut);
}

/// A 4-rank job arriving while an elastic session holds every cpu with long tasks starts
/// once the preemption grace has run out (its reserved node's executors are killed and
/// their tasks requeued, uncharged), with all 4 ranks at once; the elastic session then
/// finishes every task.
#[tokio::test(flavor = "multi_thread")]
async fn a_gang_starts_whole_beside_elastic_work_within_the_preemption_grace() {
    const GRACE_S: u64 = 2;
    let cluster = Cluster::start(
        ClusterOptions::default()
            .nodes(1)
            .cpus(4)
            .head_args(["--preemption-grace", "2s"]),
    )
    .await;
    let client = cluster.client().await;
    client
        .register_application(test_service::spec("sleeper"))
        .await
        .unwrap();
    let elastic = client
        .create_session(SessionSpec::new("sleeper"))
        .await
        .unwrap();
    let (collector, _) = spawn_collector(&elastic).await;
    // 30 s tasks: far longer than the grace, so only preemption frees room in time.
    elastic
        .submit(test_service::sleeps(8, 30_000))
        .await
        .unwrap();
    wait_session(
        &client,
        elastic.id(),
        "holding every cpu",
        STATE_TIMEOUT,
        |i| i.executors == 4 && i.counts.running >= 4,
    )
    .await;

    let out = cluster
        .flame(&["submit", "-n", "4", "--detach", "--", "true"])
        .await;
    out.assert_success();
    let job: SessionId = out.stdout.trim().parse().unwrap();
    // While it waits, it holds nothing: no rank started alone.
    let queued = job_info(&cluster, job).await;
    let queued_job = queued.job.unwrap();
    assert!(
        queued_job.ranks.is_empty() || queued_job.ranks.len() == 4,
        "{queued_job:#?}"
    );
    let done = wait_job(&cluster, job, JobState::Succeeded).await;
    let ran = done.job.unwrap();
    assert_eq!(ran.ranks.len(), 4, "{ran:#?}");
    assert!(ran.ranks.iter().all(|r| r.exit_code == Some(0)), "{ran:#?}");
    let waited_ms = ran.started_ms.unwrap() - done.created_ms;
    eprintln!("the 4-rank job started {waited_ms} ms after it was submitted (grace {GRACE_S} s)");
    // The grace, plus launching 4 executors and a few scheduling ticks on a loaded
    // 2-core machine: generous, since tests do not measure speed; a job that waited for
    // the 30 s tasks to end would take longer.
    assert!(
        waited_ms < GRACE_S * 1000 + 20_000,
        "the job waited {waited_ms} ms for its ranks"
    );

    elastic.close().await.unwrap();
    let results = tokio::time::timeout(Duration::from_secs(180), collector)
        .await
        .expect("the elastic session did not finish")
        .unwrap();
    assert_eq!(results.len(), 8);
    for r in &results {
        assert!(matches!(r.outcome, TaskOutcome::Succeeded(_)), "{r:?}");
    }
    client.close().await;
}
