//! A node's executors across their ends that nobody asked for, and the node's own stop.
//!
//! An executor that dies while idle is noticed at once: the node watches every executor's
//! process, not only while it has tasks in flight, so the death is reported, its cpus are
//! freed in `flame node list`, and the next session starts no task on it (before, it stayed
//! a defunct child counted as capacity until a session's bind failed on it and sent that
//! session's tasks to a second attempt).
//!
//! A node stopped cleanly (SIGTERM) stops its executors, waits for them to clean up, and
//! removes its cgroup root: it leaves no cgroup folder, process or executor folder behind.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_protocol::model::{ApplicationSpec, Resources, SessionSpec, TaskOutcome};
use flame_tests::procfs;
use flame_tests::results::run_tasks;
use flame_tests::{Cluster, ClusterOptions};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// How long the idle executor is kept: far longer than the test, so only its death can
/// free it.
const KEEP_MS: u64 = 600_000;
/// Bound on the node reporting the death and the head freeing the cpus. The node sees the
/// exit at once (a child's exit wakes it); the figure is printed, and this bound only
/// keeps a loaded machine from failing the test.
const FREED_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the executor showing up after its session.
const EXECUTOR_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two looks at the node list or the process table.
const POLL_PAUSE: Duration = Duration::from_millis(20);
/// Cpus one executor of the application holds.
const CPU_MILLIS: u32 = 1_000;

fn idle_keeper() -> ApplicationSpec {
    ApplicationSpec {
        resources: Resources {
            cpu_millis: CPU_MILLIS,
            ..Default::default()
        },
        max_instances: 1,
        delay_release_ms: KEEP_MS,
        ..flame_tests::results::crashy_service("keeper")
    }
}

/// Runs one session of `inputs` and checks every task succeeded on its first attempt.
async fn run_session(cluster: &Cluster, inputs: &[&str]) {
    let client = cluster.client().await;
    let session = client
        .create_session(SessionSpec::new("keeper"))
        .await
        .unwrap();
    let inputs: Vec<Bytes> = inputs.iter().map(|i| Bytes::from(i.to_string())).collect();
    for (input, result) in run_tasks(&session, inputs).await {
        let expected: Vec<u8> = input.iter().rev().copied().collect();
        match &result.outcome {
            TaskOutcome::Succeeded(out) => assert_eq!(out.as_ref(), expected.as_slice()),
            other => panic!("task {}: {other:?}\n{}", result.task, cluster.logs()),
        }
        assert_eq!(
            result.attempt,
            1,
            "task {} needed a second attempt\n{}",
            result.task,
            cluster.logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_executor_killed_is_noticed_at_once() {
    let cluster = Cluster::start(ClusterOptions::default().cpus(2)).await;
    let client = cluster.client().await;
    client.register_application(idle_keeper()).await.unwrap();
    run_session(&cluster, &["first", "session"]).await;

    // The executor stays, idle, holding its cpu.
    let node = cluster.node_pid(0);
    let deadline = Instant::now() + EXECUTOR_TIMEOUT;
    let executor = loop {
        let idle: Vec<i32> = procfs::children(node)
            .into_iter()
            .filter(|&p| procfs::cmdline(p).is_some_and(|c| c.contains("crashy_service.py")))
            .collect();
        let nodes = cluster.node_list().await;
        if let ([pid], [info]) = (&idle[..], &nodes[..]) {
            if info.allocated.cpu_millis == CPU_MILLIS {
                break *pid;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no idle executor holding {CPU_MILLIS} cpu millis: {idle:?}, {nodes:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(POLL_PAUSE).await;
    };

    kill(Pid::from_raw(executor), Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    loop {
        let nodes = cluster.node_list().await;
        if nodes[0].allocated.cpu_millis == 0 && nodes[0].executors == 0 {
            break;
        }
        assert!(
            killed.elapsed() < FREED_TIMEOUT,
            "the node list still counts the dead executor after {FREED_TIMEOUT:?}: {nodes:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(POLL_PAUSE).await;
    }
    eprintln!(
        "an idle executor killed with SIGKILL was freed in the node list after {:?}",
        killed.elapsed()
    );
    assert!(
        procfs::zombie_children(node).is_empty(),
        "the dead executor is still a defunct child of the node"
    );
    let head_log = std::fs::read_to_string(cluster.dir().join("head.log")).unwrap();
    assert!(
        head_log.contains("exited while idle"),
        "the reason the executor ended was not reported\n{}",
        cluster.logs()
    );

    // The next session gets a fresh executor: no task is sent to the dead one.
    run_session(&cluster, &["second", "session", "runs"]).await;
    let head_log = std::fs::read_to_string(cluster.dir().join("head.log")).unwrap();
    assert!(
        !head_log.contains("entering session"),
        "a session was bound to the dead executor\n{}",
        cluster.logs()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clean_stop_leaves_no_cgroup_behind() {
    let test = "a_clean_stop_leaves_no_cgroup_behind";
    let mut cluster = Cluster::start(ClusterOptions::default().cpus(2)).await;
    let client = cluster.client().await;
    client.register_application(idle_keeper()).await.unwrap();
    let node = cluster.node_list().await.remove(0);
    if !flame_tests::prerequisites::cgroups(test, &node) {
        return; // said why; fails under CI=true
    }
    let cgroups = cluster.node_cgroups(0).await.expect("the node has cgroups");
    // An executor is alive, idle, when the node stops.
    run_session(&cluster, &["before", "the", "stop"]).await;
    let roots = cgroups.distinct_roots();
    assert!(
        !cgroups.executors().is_empty(),
        "no executor cgroup under {roots:?} before the stop"
    );
    let status = cluster.stop_node(0).await;
    assert!(
        status.success(),
        "the node exited with {status}\n{}",
        cluster.logs()
    );
    for root in &roots {
        assert!(
            !root.exists(),
            "{} is left after a clean stop\n{}",
            root.display(),
            cluster.logs()
        );
    }
    let work = cluster.node_work_dir(0);
    let left: Vec<String> = std::fs::read_dir(&work)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with("exec-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "executor folders left in {}: {left:?}",
        work.display()
    );
}
