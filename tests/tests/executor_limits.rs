//! Executors held to their application's resources by the node's cgroups: a memory limit
//! that kills the executor out of memory, a cpu quota that throttles it, and a release that
//! kills every process the executor started, even those that left its session.
//!
//! The tests read the executor's cgroup files themselves, from the node's own cgroup in
//! each hierarchy (`/proc/<node pid>/cgroup`), not through the node. They need a node with
//! cgroup isolation (root, and cgroup v1 or v2): under CI its absence fails them,
//! elsewhere they are skipped with a message.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_protocol::model::{ApplicationSpec, ExecutorUsage, Resources, TaskState};
use flame_protocol::TaskId;
use flame_tests::cgroup::{self, NodeCgroups};
use flame_tests::test_service::{self, wait_session, ServiceSession, FINISH_TIMEOUT};
use flame_tests::{prerequisites, procfs, Cluster, ClusterOptions};
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
/// Bound on an executor's cgroup appearing after its launch, or going after its release.
const CGROUP_TIMEOUT: Duration = Duration::from_secs(20);
/// `delay_release` of applications whose executor must serve several tasks of a session:
/// with 0 an executor is released as soon as it has no task, even in an open session.
const KEEP_MS: u64 = 60_000;
/// Pause between two reads of a cgroup file while waiting for a counter to move.
const COUNTER_POLL_PAUSE: Duration = Duration::from_millis(100);

/// A one-node cluster and its node's cgroups, or `None` (after the prerequisite check has
/// said why) when the node has no cgroup isolation.
async fn cluster_with_cgroups(test: &str) -> Option<(Cluster, NodeCgroups)> {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let node = cluster
        .node_list()
        .await
        .into_iter()
        .next()
        .expect("the cluster has a node");
    if !prerequisites::cgroups(test, &node) {
        return None;
    }
    let cgroups = cluster
        .node_cgroups(0)
        .await
        .expect("the node reports cgroup isolation");
    Some((cluster, cgroups))
}

/// The session's usage entry whose `ended` satisfies `ended`, if any.
fn usage_ended(usage: &[ExecutorUsage], ended: impl Fn(&str) -> bool) -> Option<&ExecutorUsage> {
    usage
        .iter()
        .find(|u| u.ended.as_deref().is_some_and(&ended))
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_limit_kills_the_executor_out_of_memory() {
    let test = "memory_limit_kills_the_executor_out_of_memory";
    let Some((cluster, cgroups)) = cluster_with_cgroups(test).await else {
        return;
    };
    let client = cluster.client().await;
    let limit = 64 * MIB;
    client
        .register_application(ApplicationSpec {
            resources: Resources {
                memory_bytes: Some(limit),
                ..Resources::default()
            },
            max_attempts: 1,
            // Kept between tasks, so both run on one executor.
            delay_release_ms: KEEP_MS,
            ..test_service::spec("hog")
        })
        .await
        .unwrap();
    let mut session = ServiceSession::open(&client, "hog").await;
    let id = session.session.id();

    // Within the limit all is well, and the limit is in the executor's cgroup.
    assert_eq!(session.output("alloc 16").await, "allocated 16 MiB");
    let name = cgroups.wait_executor(CGROUP_TIMEOUT).await.unwrap();
    let dir = cgroups.memory_root().join(&name);
    let file = if cgroups.is_v2() {
        "memory.max"
    } else {
        "memory.limit_in_bytes"
    };
    assert_eq!(
        cgroup::read_value(&dir.join(file)).unwrap(),
        limit.to_string(),
        "{}",
        dir.display()
    );

    // Beyond it the kernel kills the executor; with one attempt the task fails, saying so.
    let message = session.failure("alloc 256").await;
    assert!(
        message.contains("out of memory"),
        "the task's message does not say `out of memory`: {message}\n{}",
        cluster.logs()
    );
    let info = session.finish().await;
    assert_eq!(
        (info.counts.succeeded, info.counts.failed),
        (1, 1),
        "{info:#?}"
    );
    let failed = client
        .list_tasks(id, vec![TaskState::Failed], TaskId(0), 10)
        .await
        .unwrap();
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert_eq!(failed[0].attempt, 1, "{failed:#?}");
    assert!(
        failed[0]
            .message
            .as_deref()
            .is_some_and(|m| m.contains("out of memory")),
        "{failed:#?}"
    );

    // The session's usage names the executor and why it ended.
    let info = wait_session(
        &client,
        id,
        "showing an executor ended out of memory",
        FINISH_TIMEOUT,
        |i| usage_ended(&i.usage, |e| e.contains("out of memory")).is_some(),
    )
    .await;
    let usage = usage_ended(&info.usage, |e| e.contains("out of memory")).unwrap();
    assert_eq!(format!("exec-{}", usage.executor), name, "{info:#?}");
    assert_eq!(usage.node, Cluster::node_name(0), "{info:#?}");
    assert!(
        usage.memory_peak_bytes >= 16 * MIB && usage.memory_peak_bytes <= limit,
        "peak memory {} is not between 16 MiB and the limit: {info:#?}",
        usage.memory_peak_bytes
    );

    // `flame session view` shows it to people.
    let view = cluster.flame(&["session", "view", &id.to_string()]).await;
    view.assert_success();
    assert!(view.stdout.contains("out of memory"), "{view}");

    // The dead executor's cgroup is removed.
    if let Err(e) = cgroups.wait_executor_gone(&name, CGROUP_TIMEOUT).await {
        panic!(
            "the OOM-killed executor's cgroup stays: {e}\n{}",
            cluster.logs()
        );
    }
    client.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cpu_quota_throttles_the_executor() {
    let test = "cpu_quota_throttles_the_executor";
    let Some((cluster, cgroups)) = cluster_with_cgroups(test).await else {
        return;
    };
    let client = cluster.client().await;
    client
        .register_application(ApplicationSpec {
            resources: Resources {
                cpu_millis: 500,
                ..Resources::default()
            },
            // Kept between tasks, so both run on one executor.
            delay_release_ms: KEEP_MS,
            ..test_service::spec("spinner")
        })
        .await
        .unwrap();
    let mut session = ServiceSession::open(&client, "spinner").await;
    let id = session.session.id();
    assert_eq!(session.output("echo up").await, "up");
    let name = cgroups.wait_executor(CGROUP_TIMEOUT).await.unwrap();
    let dir = cgroups.cpu_root().join(&name);
    if cgroups.is_v2() {
        assert_eq!(
            cgroup::read_value(&dir.join("cpu.max")).unwrap(),
            "50000 100000"
        );
    } else {
        assert_eq!(
            cgroup::read_value(&dir.join("cpu.cfs_quota_us")).unwrap(),
            "50000"
        );
        assert_eq!(
            cgroup::read_value(&dir.join("cpu.cfs_period_us")).unwrap(),
            "100000"
        );
    }

    // Half a cpu, spinning for seconds: the quota runs out in period after period.
    let spin = session.submit(&["spin 3000"]).await;
    let stat = dir.join("cpu.stat");
    let deadline = Instant::now() + test_service::TASK_TIMEOUT;
    loop {
        let throttled = cgroup::keyed(&stat, "nr_throttled").unwrap();
        if throttled > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nr_throttled in {} is still 0 after {:?}\n{}",
            stat.display(),
            test_service::TASK_TIMEOUT,
            cluster.logs()
        );
        tokio::time::sleep(COUNTER_POLL_PAUSE).await;
    }
    let results = session.wait(&spin).await;
    assert!(
        matches!(&results[0].outcome, flame_protocol::model::TaskOutcome::Succeeded(o) if o.as_ref() == b"spun 3000 ms"),
        "{results:?}"
    );
    session.finish().await;

    // Unbound from the finished session, the executor reports what it used while bound.
    let info = wait_session(
        &client,
        id,
        "showing the executor's cpu time and throttling",
        FINISH_TIMEOUT,
        |i| i.usage.iter().any(|u| u.cpu_ms > 0 && u.throttled_ms > 0),
    )
    .await;
    let usage = info
        .usage
        .iter()
        .find(|u| u.cpu_ms > 0)
        .expect("a usage entry");
    assert_eq!(format!("exec-{}", usage.executor), name, "{info:#?}");
    assert_eq!(usage.ended, None, "unbound, not dead: {info:#?}");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn release_kills_processes_that_left_the_session() {
    let test = "release_kills_processes_that_left_the_session";
    let Some((cluster, cgroups)) = cluster_with_cgroups(test).await else {
        return;
    };
    let client = cluster.client().await;
    client
        .register_application(ApplicationSpec {
            delay_release_ms: 0,
            ..test_service::spec("forker")
        })
        .await
        .unwrap();
    let mut session = ServiceSession::open(&client, "forker").await;
    let id = session.session.id();
    let out = session.output("fork 3").await;
    let pids: Vec<i32> = out
        .strip_prefix("pids ")
        .unwrap_or_else(|| panic!("`fork 3` answered {out:?}"))
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 3, "{out}");

    // With delay_release 0, the executor is released once it has no task; closing the
    // session makes sure. Its usage names it, and its cgroup goes with everything in it.
    session.finish().await;
    let info = wait_session(
        &client,
        id,
        "showing the executor that served it",
        FINISH_TIMEOUT,
        |i| !i.usage.is_empty(),
    )
    .await;
    assert_eq!(info.usage.len(), 1, "{info:#?}");
    let name = format!("exec-{}", info.usage[0].executor);
    if let Err(e) = cgroups.wait_executor_gone(&name, CGROUP_TIMEOUT).await {
        panic!(
            "the released executor's cgroup stays: {e}\n{}",
            cluster.logs()
        );
    }
    let alive: Vec<i32> = pids
        .iter()
        .copied()
        .filter(|&p| procfs::is_alive(p))
        .collect();
    assert!(
        alive.is_empty(),
        "processes started by the executor outlived its release: {alive:?}\n{}",
        cluster.logs()
    );
    client.close().await;
}

/// A batch job's rank killed by the kernel at its memory limit says so (issue 21, item 10),
/// as a session's executor does, rather than only "exited with status 137".
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_rank_killed_at_its_memory_limit_says_out_of_memory() {
    let test = "a_batch_rank_killed_at_its_memory_limit_says_out_of_memory";
    let Some((cluster, _cgroups)) = cluster_with_cgroups(test).await else {
        return;
    };
    let out = cluster
        .flame(&[
            "submit",
            "-n",
            "1",
            "--mem-per-rank",
            "64MiB",
            "--",
            "python3",
            "-c",
            "x = b'x' * (512 << 20)",
        ])
        .await;
    out.assert_failure();
    assert!(
        out.stderr.contains("out of memory (limit 64 MiB)"),
        "{out}\n{}",
        cluster.logs()
    );
}
