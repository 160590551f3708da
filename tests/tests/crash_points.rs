//! The head dies at each named crash point (after a commit before its ack, after a result
//! before its commit, in the middle of a group commit) while a session runs; restarted, it
//! finishes every task exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_protocol::model::TaskOutcome;
use flame_protocol::ping::check_reply;
use flame_tests::results::{ping_spec, run_tasks};
use flame_tests::{Cluster, ClusterOptions};
use std::time::Duration;

const TASKS: usize = 5_000;

async fn crash_at(point: &str) {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    // A few passes first, so the crash lands in the middle of the run.
    cluster
        .restart_head_with_crash_points(&format!("{point}=3*off->return"))
        .await;
    let client = cluster.client().await;
    let session = client.create_session(ping_spec()).await.unwrap();
    let inputs: Vec<Bytes> = (0..TASKS)
        .map(|i| Bytes::from(format!("{point} {i:05}")))
        .collect();
    let run = tokio::spawn({
        let session = session.clone();
        async move { run_tasks(&session, inputs).await }
    });
    let status = cluster.wait_head_exit(Duration::from_secs(60)).await;
    assert!(
        !status.success(),
        "{point}: the head exited cleanly: {status}"
    );
    assert!(
        cluster
            .logs()
            .contains(&format!("crash point `{point}` reached")),
        "{point}: the head died elsewhere\n{}",
        cluster.logs()
    );
    cluster.start_head_again().await;
    let done = tokio::time::timeout(Duration::from_secs(180), run)
        .await
        .unwrap_or_else(|_| panic!("{point}: the run did not finish\n{}", cluster.logs()))
        .unwrap_or_else(|e| panic!("{point}: the run failed: {e}\n{}", cluster.logs()));
    for (input, result) in &done {
        match &result.outcome {
            TaskOutcome::Succeeded(output) => {
                check_reply(input, output)
                    .unwrap_or_else(|e| panic!("{point}, task {}: {e}", result.task));
            }
            other => panic!("{point}, task {} ended as {other:?}", result.task),
        }
    }
    let info = cluster
        .client()
        .await
        .get_session(session.id())
        .await
        .unwrap();
    assert_eq!(info.counts.succeeded, TASKS as u64, "{point}: {info:?}");
    assert_eq!(info.counts.total(), TASKS as u64, "{point}: {info:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_commit_before_ack() {
    crash_at("after-commit-before-ack").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_after_result_before_commit() {
    crash_at("after-result-before-commit").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn crash_mid_group_commit() {
    crash_at("mid-batch").await;
}
