//! SIGSTOP of one of two nodes in the middle of a session, past the head's heartbeat
//! timeout, then SIGCONT: the head declares the silent node lost and runs what it held on
//! the other node; when the paused node wakes, whatever it still reports for the old
//! attempts is refused (fencing), it registers again, and every task has exactly one
//! result. A raw result recorder (`flame_tests::recorder`) checks that the head never sent
//! a result twice on a stream or two different results for one task.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_protocol::model::{NodeState, TaskOutcome};
use flame_protocol::ping::check_reply;
use flame_tests::recorder::ResultRecorder;
use flame_tests::results::{match_results, ping_spec, spawn_collector, RESULT_STALL_TIMEOUT};
use flame_tests::{Cluster, ClusterOptions};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::time::Duration;

const TASKS: usize = 20_000;
/// Tasks submitted before results flow; the rest go in one batch just before the pause, so
/// the paused node holds some of them (see node_kill.rs).
const BEFORE_RESULTS: usize = 5_000;
/// The node that is paused.
const VICTIM: usize = 1;
/// The head's heartbeat timeout in this test (`--heartbeat-timeout`).
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the node is stopped: well past the heartbeat timeout.
const PAUSE: Duration = Duration::from_secs(8);
/// Bound on the head noticing the silence, beyond its heartbeat timeout.
const NOT_READY_MARGIN: Duration = Duration::from_secs(20);
/// Bound on the woken node registering again.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the whole session, for the recorder.
const RUN_TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_node_is_replaced_and_its_stale_results_are_refused() {
    let mut cluster = Cluster::start(
        ClusterOptions::default()
            .nodes(2)
            .cpus(2)
            .head_args(["--heartbeat-timeout", "3s"]),
    )
    .await;
    let client = cluster.client().await;
    let session = client.create_session(ping_spec()).await.unwrap();
    let recorder = ResultRecorder::spawn(
        cluster.head_addr().to_string(),
        cluster.ca_file().to_path_buf(),
        cluster.admin_token(),
        session.id(),
        RUN_TIMEOUT,
    );
    let inputs: Vec<Bytes> = (0..TASKS)
        .map(|i| Bytes::from(format!("pause-{i:05}")))
        .collect();
    let (collecting, mut seen) = spawn_collector(&session).await;
    let mut ids = session
        .submit(inputs[..BEFORE_RESULTS].to_vec())
        .await
        .unwrap();
    // The count is copied out: a `watch::Ref` held here would block the collector's next
    // update (it takes the channel's lock).
    let flowing = tokio::time::timeout(RESULT_STALL_TIMEOUT, seen.wait_for(|n| *n > 0))
        .await
        .map(|r| r.map(|n| *n));
    assert!(
        matches!(flowing, Ok(Ok(_))),
        "no result came within {RESULT_STALL_TIMEOUT:?}\n{}",
        cluster.logs()
    );
    ids.extend(
        session
            .submit(inputs[BEFORE_RESULTS..].to_vec())
            .await
            .unwrap(),
    );
    let registered = cluster.node_registrations(VICTIM);
    let victim = Pid::from_raw(cluster.node_pid(VICTIM));
    kill(victim, Signal::SIGSTOP).unwrap();
    session.close().await.unwrap();
    cluster
        .wait_node_state(
            VICTIM,
            NodeState::NotReady,
            HEARTBEAT_TIMEOUT + NOT_READY_MARGIN,
        )
        .await;
    tokio::time::sleep(PAUSE.saturating_sub(HEARTBEAT_TIMEOUT)).await;
    kill(victim, Signal::SIGCONT).unwrap();
    cluster
        .wait_node_registered(VICTIM, registered, REGISTER_TIMEOUT)
        .await;

    // Every id exactly once, every input with its own correct reply.
    let results = collecting.await.expect("collecting the results panicked");
    let done = match_results(inputs, &ids, results);
    let mut retried = 0;
    for (input, result) in &done {
        match &result.outcome {
            TaskOutcome::Succeeded(output) => {
                if let Err(e) = check_reply(input, output) {
                    panic!("task {}: {e}", result.task);
                }
            }
            other => panic!("task {} ended as {other:?}", result.task),
        }
        if result.attempt > 1 {
            retried += 1;
        }
    }
    let recording = recorder
        .finish()
        .await
        .unwrap_or_else(|e| panic!("the result recorder failed: {e}\n{}", cluster.logs()));
    let summary = recording.check().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(summary.tasks, TASKS, "the recorder saw {summary:?}");
    eprintln!(
        "{TASKS} tasks, node {VICTIM} stopped for {PAUSE:?}: {retried} ran again elsewhere; \
         the recorder read {} results in {} frames on {} streams, none twice",
        summary.deliveries, summary.frames, summary.streams
    );
}
