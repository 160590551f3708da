//! Two sessions at once on one node with two cpus: both finish, no output goes to the wrong
//! session, and the head lends executors to both.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_client::Client;
use flame_protocol::model::TaskOutcome;
use flame_protocol::ping::check_reply;
use flame_tests::results::{ping_spec, run_tasks};
use flame_tests::{Cluster, ClusterOptions};
use std::collections::HashSet;

const TASKS: usize = 3_000;

/// Runs `TASKS` ping tasks whose inputs start with `tag`; returns the executors that ran
/// them, after checking every output against its input.
async fn run_session(client: Client, tag: &'static str) -> HashSet<String> {
    let session = client.create_session(ping_spec()).await.unwrap();
    let inputs = (0..TASKS)
        .map(|i| Bytes::from(format!("{tag}-{i:05}")))
        .collect();
    let done = run_tasks(&session, inputs).await;
    let mut executors = HashSet::new();
    for (input, result) in &done {
        match &result.outcome {
            TaskOutcome::Succeeded(output) => {
                let reply = check_reply(input, output).unwrap_or_else(|e| {
                    panic!("session {tag}, task {}: {e}: {output:?}", result.task)
                });
                executors.insert(reply.executor);
            }
            other => panic!(
                "session {tag}, task {} did not succeed: {other:?}",
                result.task
            ),
        }
    }
    let info = session.info().await.unwrap();
    assert!(info.is_finished(), "{info:?}");
    assert_eq!(info.counts.succeeded, TASKS as u64, "{info:?}");
    executors
}

#[tokio::test(flavor = "multi_thread")]
async fn two_sessions_share_node() {
    let cluster = Cluster::start(ClusterOptions::default().cpus(2)).await;
    // Two connections, as two programs would have.
    let (a, b) = tokio::join!(cluster.client(), cluster.client());
    let (ran_a, ran_b) = tokio::join!(run_session(a.clone(), "a"), run_session(b.clone(), "b"));
    assert!(!ran_a.is_empty(), "session a saw no executor");
    assert!(!ran_b.is_empty(), "session b saw no executor");
    a.close().await;
    b.close().await;
}
