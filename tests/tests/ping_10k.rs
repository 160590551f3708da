//! 10,000 ping tasks through a real head and node, by the CLI and by the client library.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_protocol::model::TaskOutcome;
use flame_protocol::ping::check_reply;
use flame_tests::results::{ping_session_id, ping_spec, run_tasks};
use flame_tests::{Cluster, ClusterOptions};
use std::collections::HashSet;

const TASKS: usize = 10_000;

/// `flame ping -t 10000` submits, collects and checks every output itself; the head's
/// counters must agree with what it printed.
#[tokio::test(flavor = "multi_thread")]
async fn cli_ping_10k_checks_every_output() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let out = cluster.flame(&["ping", "-t", "10000"]).await;
    out.assert_success();
    assert!(
        out.stdout.contains("10,000 tasks completed")
            && out.stdout.contains("(every output checked)"),
        "{out}"
    );
    let id = ping_session_id(&out.stdout);
    let info = cluster.client().await.get_session(id).await.unwrap();
    assert!(info.is_finished(), "{info:?}");
    assert_eq!(
        (info.counts.succeeded, info.counts.failed),
        (TASKS as u64, 0),
        "{info:?}"
    );
}

/// A session of 10,000 tasks through `Submitter` and `watch()`: every task id comes back
/// exactly once (checked by `run_tasks`) and every output is the ping reply to its input.
#[tokio::test(flavor = "multi_thread")]
async fn library_session_of_10k_tasks() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let client = cluster.client().await;
    let session = client.create_session(ping_spec()).await.unwrap();
    // Distinct inputs of varying length, so that a swapped or truncated output shows.
    let inputs: Vec<Bytes> = (0..TASKS)
        .map(|i| Bytes::from(format!("lib-{i}-{}", "x".repeat(i % 7))))
        .collect();
    let done = run_tasks(&session, inputs).await;
    assert_eq!(done.len(), TASKS);
    let mut executors = HashSet::new();
    for (input, result) in &done {
        match &result.outcome {
            TaskOutcome::Succeeded(output) => {
                let reply = check_reply(input, output)
                    .unwrap_or_else(|e| panic!("task {}: {e}; output {:?}", result.task, output));
                assert_eq!(reply.host, "node-0", "task {}", result.task);
                executors.insert(reply.executor);
            }
            other => panic!("task {} did not succeed: {other:?}", result.task),
        }
    }
    assert!(!executors.is_empty());
    let info = session.info().await.unwrap();
    assert!(info.is_finished(), "{info:?}");
    assert_eq!(info.counts.succeeded, TASKS as u64, "{info:?}");
    client.close().await;
}
