//! `flame node drain` / `undrain`: a draining node shows as Draining, takes no new
//! executors and releases its idle ones, while the executors already serving a session
//! there finish its work (no task is killed or retried); after the undrain it takes work
//! again. Draining a node the head does not know fails and names it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_client::{Client, Session};
use flame_protocol::model::{
    NodeInfo, NodeState, SessionInfo, SessionSpec, TaskOutcome, TaskResult,
};
use flame_protocol::SessionId;
use flame_tests::results::spawn_collector;
use flame_tests::test_service::{self, wait_session};
use flame_tests::{Cluster, ClusterOptions};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::task::JoinHandle;

const APP: &str = "sleeper";
/// Per node: two executors of one cpu, four in the cluster.
const CPUS: u32 = 2;
const NODES: usize = 2;
/// Work for all four executors for a few seconds.
const TASKS: usize = 40;
const TASK_MS: u64 = 200;
/// Bound on a session spreading over both nodes, launches included.
const SPREAD_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the head's view of the nodes changing (a state, executors released).
const NODES_TIMEOUT: Duration = Duration::from_secs(30);

fn executors_on(nodes: &[NodeInfo], name: &str) -> u32 {
    nodes
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("{name} is not in the node list: {nodes:#?}"))
        .executors
}

fn state_of(nodes: &[NodeInfo], name: &str) -> NodeState {
    nodes
        .iter()
        .find(|n| n.name == name)
        .unwrap_or_else(|| panic!("{name} is not in the node list: {nodes:#?}"))
        .state
}

/// Opens a session, watches it and submits `TASKS` sleeps.
async fn start(client: &Client) -> (Session, JoinHandle<Vec<TaskResult>>) {
    let session = client.create_session(SessionSpec::new(APP)).await.unwrap();
    let (collector, _) = spawn_collector(&session).await;
    session
        .submit(test_service::sleeps(TASKS, TASK_MS))
        .await
        .unwrap();
    (session, collector)
}

/// Closes the session and waits for it to finish; checks that every task ran once, to
/// success.
async fn finish(session: Session, collector: JoinHandle<Vec<TaskResult>>) {
    session.close().await.unwrap();
    let results = collector.await.unwrap();
    assert_eq!(results.len(), TASKS);
    for result in &results {
        assert!(
            matches!(result.outcome, TaskOutcome::Succeeded(_)) && result.attempt == 1,
            "session {}: a task was not run once to success: {result:?}",
            session.id()
        );
    }
}

fn nodes_served(info: &SessionInfo) -> BTreeSet<&str> {
    info.usage.iter().map(|u| u.node.as_str()).collect()
}

/// Waits until the session's usage records (written as its executors leave it) name
/// `node`.
async fn wait_served_by(client: &Client, session: SessionId, node: &str) -> SessionInfo {
    wait_session(
        client,
        session,
        &format!("recorded as served by {node}"),
        NODES_TIMEOUT,
        |i| nodes_served(i).contains(node),
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_drained_node_finishes_its_work_and_takes_none_until_undrained() {
    let cluster = Cluster::start(ClusterOptions::default().nodes(NODES).cpus(CPUS)).await;
    let (node0, node1) = (Cluster::node_name(0), Cluster::node_name(1));
    let client = cluster.client().await;
    client
        .register_application(test_service::spec(APP))
        .await
        .unwrap();

    // A session busy on both nodes.
    let (first, first_results) = start(&client).await;
    wait_session(
        &client,
        first.id(),
        "on four executors",
        SPREAD_TIMEOUT,
        |i| i.executors == CPUS * NODES as u32 && i.counts.running > 0,
    )
    .await;
    cluster
        .wait_nodes("both busy", NODES_TIMEOUT, |n| {
            executors_on(n, &node0) > 0 && executors_on(n, &node1) > 0
        })
        .await;

    let drain = cluster.flame(&["node", "drain", &node0]).await;
    drain.assert_success();
    assert!(drain.stdout.contains(&node0), "{drain}");
    cluster
        .wait_node_state(0, NodeState::Draining, NODES_TIMEOUT)
        .await;
    // Its executors finish the session's work: nothing is killed or retried.
    let first_id = first.id();
    finish(first, first_results).await;
    wait_served_by(&client, first_id, &node0).await;
    // Once the session lets them go, they are released; node-1 keeps its idle ones for
    // reuse (the application's delay_release).
    let nodes = cluster
        .wait_nodes(
            "without executors on the drained node",
            NODES_TIMEOUT,
            |n| executors_on(n, &node0) == 0,
        )
        .await;
    assert_eq!(state_of(&nodes, &node0), NodeState::Draining, "{nodes:#?}");

    // A new session runs on node-1 alone. An executor it had on node-0 would be released
    // when it finished, and its usage recorded by then: so once node-0 has no executor,
    // its records are complete for node-0.
    let (second, second_results) = start(&client).await;
    let second_id = second.id();
    finish(second, second_results).await;
    wait_served_by(&client, second_id, &node1).await;
    cluster
        .wait_nodes(
            "without executors on the drained node",
            NODES_TIMEOUT,
            |n| executors_on(n, &node0) == 0,
        )
        .await;
    let info = client.get_session(second_id).await.unwrap();
    assert_eq!(
        nodes_served(&info),
        BTreeSet::from([node1.as_str()]),
        "{info:#?}"
    );

    // Undrained, node-0 is Ready and takes work again: a session wanting four executors
    // gets two there.
    let undrain = cluster.flame(&["node", "undrain", &node0]).await;
    undrain.assert_success();
    assert!(undrain.stdout.contains(&node0), "{undrain}");
    cluster
        .wait_node_state(0, NodeState::Ready, NODES_TIMEOUT)
        .await;
    let (third, third_results) = start(&client).await;
    cluster
        .wait_nodes("busy again on the undrained node", SPREAD_TIMEOUT, |n| {
            executors_on(n, &node0) > 0
        })
        .await;
    let third_id = third.id();
    finish(third, third_results).await;
    wait_served_by(&client, third_id, &node0).await;

    // An unknown node: a clean failure that names it, with a hint.
    for verb in ["drain", "undrain"] {
        let out = cluster.flame(&["node", verb, "no-such-node"]).await;
        out.assert_failure();
        assert!(out.stderr.contains("no-such-node"), "{out}");
        assert!(out.stderr.contains("hint:"), "{out}");
    }
    client.close().await;
}
