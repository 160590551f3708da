//! `kill -9` of one of two nodes in the middle of a session: the head declares it NotReady,
//! puts the tasks it held back in the queue, and every task completes on the other node,
//! with exactly one result each.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_protocol::limits::HEARTBEAT_TIMEOUT;
use flame_protocol::model::{NodeState, TaskOutcome};
use flame_protocol::ping::check_reply;
use flame_tests::results::{match_results, ping_spec, spawn_collector, RESULT_STALL_TIMEOUT};
use flame_tests::{Cluster, ClusterOptions};
use std::collections::BTreeMap;
use std::time::Duration;

const TASKS: usize = 20_000;
/// Tasks submitted before results flow; the rest go in one batch just before the kill.
/// The watcher sees results only after the head has made them durable, so it lags the
/// executors, and by the first result the nodes may have run all they were given. Tasks
/// acknowledged just before the kill are another matter: the head hands them out as it
/// acknowledges them, so the victim dies holding some.
const BEFORE_RESULTS: usize = 5_000;
/// The node that is killed.
const VICTIM: usize = 1;
/// Bound on the head noticing the silence, beyond its heartbeat timeout.
const NOT_READY_MARGIN: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread")]
async fn node_kill_mid_session_loses_no_task() {
    let mut cluster = Cluster::start(ClusterOptions::default().nodes(2).cpus(2)).await;
    let client = cluster.client().await;
    let session = client.create_session(ping_spec()).await.unwrap();
    let inputs: Vec<Bytes> = (0..TASKS)
        .map(|i| Bytes::from(format!("kill-{i:05}")))
        .collect();
    let (collecting, mut seen) = spawn_collector(&session).await;
    let mut ids = session
        .submit(inputs[..BEFORE_RESULTS].to_vec())
        .await
        .unwrap();

    let flowing = tokio::time::timeout(RESULT_STALL_TIMEOUT, seen.wait_for(|n| *n > 0))
        .await
        .map(|seen| seen.map(|n| *n));
    let Ok(Ok(seen_at_kill)) = flowing else {
        panic!(
            "no result came within {RESULT_STALL_TIMEOUT:?}\n{}",
            cluster.logs()
        );
    };
    ids.extend(
        session
            .submit(inputs[BEFORE_RESULTS..].to_vec())
            .await
            .unwrap(),
    );
    cluster.kill_node(VICTIM).await;
    session.close().await.unwrap();

    // Waited for while the rest of the session runs on node 0.
    let nodes = cluster
        .wait_node_state(
            VICTIM,
            NodeState::NotReady,
            HEARTBEAT_TIMEOUT + NOT_READY_MARGIN,
        )
        .await;
    let survivor = Cluster::node_name(1 - VICTIM);
    assert!(
        nodes
            .iter()
            .any(|n| n.name == survivor && n.state == NodeState::Ready),
        "{survivor} is not Ready: {nodes:#?}"
    );

    // Every id exactly once, every input with a result.
    let results = collecting.await.expect("collecting the results panicked");
    let done = match_results(inputs, &ids, results);
    let victim = Cluster::node_name(VICTIM);
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    let mut retried = 0;
    for (input, result) in &done {
        let TaskOutcome::Succeeded(output) = &result.outcome else {
            panic!("task {} did not succeed: {:?}", result.task, result.outcome);
        };
        let reply = check_reply(input, output)
            .unwrap_or_else(|e| panic!("task {}: {e}; output {output:?}", result.task));
        if result.attempt > 1 {
            retried += 1;
            assert_eq!(
                reply.host, survivor,
                "task {} was retried (attempt {}) on the dead node",
                result.task, result.attempt
            );
        }
        *per_host.entry(reply.host).or_default() += 1;
    }
    assert!(
        retried > 0,
        "no task was retried: {victim} held none when it was killed, so nothing was tested \
         ({per_host:?}, {seen_at_kill} results before the kill)\n{}",
        cluster.logs()
    );

    let info = session.info().await.unwrap();
    assert!(info.is_finished(), "{info:?}");
    assert_eq!(
        (info.counts.succeeded, info.counts.failed),
        (TASKS as u64, 0),
        "{info:?}"
    );
    eprintln!(
        "node_kill: {per_host:?}, {retried} tasks retried, killed after {seen_at_kill} results"
    );
    client.close().await;
}
