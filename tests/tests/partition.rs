//! A node cut off from the head by a network partition for longer than the heartbeat
//! timeout, then healed: the head declares it NotReady and runs its tasks elsewhere, no
//! task is recorded twice, and the node registers again and gets work.
//!
//! The head and two nodes run in network namespaces of their own (`flame_tests::netns`);
//! the partition is an nftables drop in node 1's namespace. Needs root, `ip` and `nft`, as
//! CI provides; elsewhere the test is skipped with a message.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_client::{Client, Session};
use flame_protocol::limits::{HEARTBEAT_TIMEOUT, IDLE_TIMEOUT};
use flame_protocol::model::{NodeState, SessionInfo, TaskOutcome, TaskResult};
use flame_protocol::ping::check_reply;
use flame_protocol::TaskId;
use flame_tests::results::{
    match_results, ping_spec, run_tasks, spawn_collector, RESULT_STALL_TIMEOUT,
};
use flame_tests::{netns, Cluster, ClusterOptions};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The node that is cut off.
const CUT: usize = 1;
/// How long the partition lasts: past the heartbeat timeout, so the head gives the node
/// up, and short of the QUIC idle timeout, so the node's old connection is still open on
/// its side when the partition heals and must be fenced.
const PARTITION: Duration = Duration::from_secs(15);
/// Inputs the first session is fed at a time, each batch acknowledged before the next. The
/// partition starts right after an acknowledgement: the head hands tasks out as it
/// acknowledges them, so the node it cuts off holds some of this batch.
const FEED_CHUNK: usize = 5_000;
/// Most inputs of the first session without a result seen: the feed waits for results
/// beyond this, so the session's size stays bounded by its duration.
const FEED_WINDOW: usize = 10_000;
/// Bound on the head noticing the silence, beyond its heartbeat timeout.
const NOT_READY_MARGIN: Duration = Duration::from_secs(10);
/// Bound on the node registering again after the heal. Its QUIC stack backed off its
/// probes exponentially while cut off, so its next packet (answered by the head's
/// stateless reset) may come about a partition's length after the heal; at worst the old
/// connection ends at the idle timeout. Then it reconnects with a backoff of at most 5 s.
const REREGISTER_TIMEOUT: Duration = IDLE_TIMEOUT.saturating_add(Duration::from_secs(15));
/// Tasks of the second session, run after the heal; enough to reach both executors.
const SECOND_TASKS: usize = 5_000;

#[tokio::test(flavor = "multi_thread")]
async fn partition_longer_than_heartbeat_timeout_then_heal() {
    if !netns::available("partition_longer_than_heartbeat_timeout_then_heal") {
        return;
    }
    // One cpu each: one executor per node, so the second session must use node 1 to use
    // both slots.
    let options = ClusterOptions::default()
        .nodes(2)
        .cpus(1)
        .network_namespaces();
    let mut cluster = Cluster::start(options).await;
    let cut = Cluster::node_name(CUT);
    let other = Cluster::node_name(1 - CUT);

    // The first session: fed until the test says stop.
    let (fed_tx, mut fed) = watch::channel(Fed::default());
    let (stop_tx, stop) = watch::channel(false);
    let first = cluster.spawn_client("first-session", move |config| async move {
        let client = Client::connect(&config).await.expect("cannot connect");
        let session = client.create_session(ping_spec()).await.unwrap();
        let (collecting, seen) = spawn_collector(&session).await;
        let (inputs, ids) = feed_until_stopped(&session, seen, &fed_tx, stop).await;
        session.close().await.unwrap();
        let results = collecting.await.expect("collecting the results panicked");
        let done = match_results(inputs, &ids, results);
        let info = session.info().await.unwrap();
        client.close().await;
        (done, info)
    });

    // Cut off right after a batch is acknowledged once results flow.
    let flowing = tokio::time::timeout(RESULT_STALL_TIMEOUT, fed.wait_for(|f| f.seen > 0))
        .await
        .map(|fed| fed.map(|f| *f));
    let Ok(Ok(at_cut)) = flowing else {
        panic!(
            "no result came within {RESULT_STALL_TIMEOUT:?}\n{}",
            cluster.logs()
        );
    };
    let registered = cluster.node_registrations(CUT);
    cluster.partition(CUT).await;
    let cut_at = Instant::now();
    let nodes = cluster
        .wait_node_state(
            CUT,
            NodeState::NotReady,
            HEARTBEAT_TIMEOUT + NOT_READY_MARGIN,
        )
        .await;
    let not_ready_after = cut_at.elapsed();
    assert!(
        nodes
            .iter()
            .any(|n| n.name == other && n.state == NodeState::Ready),
        "{other} is not Ready while {cut} is cut off: {nodes:#?}"
    );
    // The partition's length is the fault under test, not a wait for an event.
    tokio::time::sleep_until((cut_at + PARTITION).into()).await;
    let results_before_heal = fed.borrow().seen;
    cluster.heal(CUT).await;
    let healed_at = Instant::now();

    // The node finds its connection gone, reconnects and registers afresh.
    cluster
        .wait_node_registered(CUT, registered, REREGISTER_TIMEOUT)
        .await;
    let registered_after = healed_at.elapsed();
    cluster
        .wait_node_state(CUT, NodeState::Ready, NOT_READY_MARGIN)
        .await;

    stop_tx.send_replace(true);
    let (done, info) = first.join().await;
    let (per_host, retried) = check_session(&done, &info);
    assert!(
        retried > 0,
        "no task was retried: {cut} held none when it was cut off, so nothing was tested \
         ({per_host:?})"
    );
    assert!(
        per_host.get(&cut).is_some_and(|&n| n > 0),
        "{cut} ran nothing in the first session: {per_host:?}"
    );

    // Node 1 gets work again: with one executor per node, a session big enough to use
    // both reaches it.
    let second = cluster.spawn_client("second-session", |config| async move {
        let client = Client::connect(&config).await.expect("cannot connect");
        let session = client.create_session(ping_spec()).await.unwrap();
        let inputs = (0..SECOND_TASKS)
            .map(|i| Bytes::from(format!("after-{i:05}")))
            .collect();
        let done = run_tasks(&session, inputs).await;
        let info = session.info().await.unwrap();
        client.close().await;
        (done, info)
    });
    let (done2, info2) = second.join().await;
    assert_eq!(done2.len(), SECOND_TASKS);
    let (per_host2, _) = check_session(&done2, &info2);
    assert!(
        per_host2.get(&cut).is_some_and(|&n| n > 0),
        "{cut} got no work after it rejoined: {per_host2:?}\n{}",
        cluster.logs()
    );
    eprintln!(
        "partition: first session {} tasks {per_host:?}, {retried} retried, cut after {} \
         acked and {} seen; NotReady after {not_ready_after:?}, {results_before_heal} results \
         before the heal, registered again {registered_after:?} after it; second session \
         {per_host2:?}",
        done.len(),
        at_cut.acked,
        at_cut.seen
    );
}

/// How far the first session's feed has got.
#[derive(Debug, Clone, Copy, Default)]
struct Fed {
    /// Inputs submitted and acknowledged.
    acked: usize,
    /// Results seen when the last batch was acknowledged.
    seen: usize,
}

/// Submits `FEED_CHUNK` inputs at a time, each batch acknowledged before the next (and
/// reported on `fed`), staying at most `FEED_WINDOW` inputs ahead of the results counted on
/// `seen`, until `stop` says so (or the test is gone). Returns the inputs and their ids.
async fn feed_until_stopped(
    session: &Session,
    mut seen: watch::Receiver<usize>,
    fed: &watch::Sender<Fed>,
    mut stop: watch::Receiver<bool>,
) -> (Vec<Bytes>, Vec<TaskId>) {
    let mut inputs: Vec<Bytes> = Vec::new();
    let mut ids = Vec::new();
    while !*stop.borrow() {
        let chunk: Vec<Bytes> = (inputs.len()..inputs.len() + FEED_CHUNK)
            .map(|i| Bytes::from(format!("cut-{i:07}")))
            .collect();
        ids.extend(session.submit(chunk.clone()).await.expect("submit failed"));
        inputs.extend(chunk);
        fed.send_replace(Fed {
            acked: inputs.len(),
            seen: *seen.borrow(),
        });
        let submitted = inputs.len();
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            room = seen.wait_for(|n| submitted <= n + FEED_WINDOW) => {
                if room.is_err() {
                    break; // the collector ended: it failed, and says why
                }
            }
        }
    }
    (inputs, ids)
}

/// Checks that every task of a finished session succeeded with the ping reply to its input,
/// and that the head's counters agree; returns the tasks per host and how many were retried.
fn check_session(
    done: &[(Bytes, TaskResult)],
    info: &SessionInfo,
) -> (BTreeMap<String, usize>, usize) {
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    let mut retried = 0;
    for (input, result) in done {
        let TaskOutcome::Succeeded(output) = &result.outcome else {
            panic!("task {} did not succeed: {:?}", result.task, result.outcome);
        };
        let reply = check_reply(input, output)
            .unwrap_or_else(|e| panic!("task {}: {e}; output {output:?}", result.task));
        *per_host.entry(reply.host).or_default() += 1;
        if result.attempt > 1 {
            retried += 1;
        }
    }
    assert!(info.is_finished(), "{info:?}");
    // A task recorded twice would count twice.
    assert_eq!(
        (info.counts.succeeded, info.counts.failed),
        (done.len() as u64, 0),
        "{info:?}"
    );
    (per_host, retried)
}
