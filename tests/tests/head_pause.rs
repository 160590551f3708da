//! A head that was paused (SIGSTOP, a frozen VM, a starved host) past the heartbeat timeout
//! blames no node for the silence: its event loop measures its own stall and gives every
//! node a fresh heartbeat window, and the nodes, whose patience with a silent head is
//! longer than the head's heartbeat timeout, keep their connection. So no node is declared
//! lost, none registers again, and no task goes to a second attempt.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_protocol::model::{ApplicationSpec, SessionSpec, TaskOutcome};
use flame_tests::results::run_tasks;
use flame_tests::{Cluster, ClusterOptions};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// The head's heartbeat timeout in this test (`--heartbeat-timeout`).
const HEARTBEAT_TIMEOUT: &str = "5s";
/// How long the head is stopped: more than twice its heartbeat timeout, and more than the
/// 10 s after which nodes used to give up on a silent head, yet under their patience now
/// (`limits::HEAD_SILENCE_MAX`, 30 s).
const PAUSE: Duration = Duration::from_secs(12);
/// Tasks, each sleeping [`TASK_SLEEP`] in the application: about 5 s of work on the two
/// executors, so the pause falls in the middle of it.
const TASKS: usize = 20;
/// The digits after it make each input its own (0.50000, 0.50001, ...).
const TASK_SLEEP: &str = "0.5";
/// Bound on the first task starting.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two looks at the session while waiting for a task to run.
const POLL_PAUSE: Duration = Duration::from_millis(50);

fn sleepy_app() -> ApplicationSpec {
    flame_tests::results::crashy_service("sleepy")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_head_loses_no_node_and_retries_no_task() {
    let cluster = Cluster::start(
        ClusterOptions::default()
            .cpus(2)
            .head_args(["--heartbeat-timeout", HEARTBEAT_TIMEOUT]),
    )
    .await;
    let client = cluster.client().await;
    client.register_application(sleepy_app()).await.unwrap();
    let session = client
        .create_session(SessionSpec::new("sleepy"))
        .await
        .unwrap();
    let inputs: Vec<Bytes> = (0..TASKS)
        .map(|i| Bytes::from(format!("sleep:{TASK_SLEEP}{i:04}")))
        .collect();
    let running = tokio::spawn({
        let session = session.clone();
        let inputs = inputs.clone();
        async move { run_tasks(&session, inputs).await }
    });

    // Stop the head while tasks run.
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let info = session.info().await.unwrap();
        if info.counts.running > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no task ran within {START_TIMEOUT:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(POLL_PAUSE).await;
    }
    let head = Pid::from_raw(cluster.head_pid());
    kill(head, Signal::SIGSTOP).unwrap();
    tokio::time::sleep(PAUSE).await;
    kill(head, Signal::SIGCONT).unwrap();

    let done = running.await.expect("the session's client panicked");
    for (input, result) in &done {
        let expected: Vec<u8> = input.iter().rev().copied().collect();
        match &result.outcome {
            TaskOutcome::Succeeded(out) => assert_eq!(out.as_ref(), expected.as_slice()),
            other => panic!("task {}: {other:?}\n{}", result.task, cluster.logs()),
        }
        assert_eq!(
            result.attempt,
            1,
            "task {} went to a second attempt after the pause\n{}",
            result.task,
            cluster.logs()
        );
    }
    assert_eq!(
        cluster.node_registrations(0),
        1,
        "the node registered again: the head or the node gave up on the other\n{}",
        cluster.logs()
    );
    let head_log = std::fs::read_to_string(cluster.dir().join("head.log")).unwrap();
    assert!(
        !head_log.contains("node lost"),
        "the head declared a node lost for its own pause\n{}",
        cluster.logs()
    );
    assert!(
        head_log.contains("did not run for"),
        "the head did not notice its own stall\n{}",
        cluster.logs()
    );
}
