//! Placement by resources and labels: a session whose application no known node could
//! hold is refused when it opens, naming the largest node; one whose labels no node has
//! stays pending and says why; a selector picks nodes by their labels.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_client::Client;
use flame_protocol::model::{
    ApplicationSpec, ErrorKind, Resources, SessionInfo, SessionSpec, TaskState,
};
use flame_protocol::{SessionId, TaskId};
use flame_tests::test_service::{self, wait_session, ServiceSession};
use flame_tests::{Cluster, ClusterOptions};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

/// Bound on the head saying why a session waits.
const WAITING_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a session that cannot be placed is watched for a placement that must not
/// come. Not a wait for an event: the assertion is that nothing happens in this time.
const STAYS_PENDING: Duration = Duration::from_secs(2);
/// What the head answers to a session whose executor no known node could hold.
const NEVER_FITS: &str = "no node can ever hold an executor of `huge`";
/// What the head says of a session whose application selects labels no node has.
const NO_LABELS: &str = "no ready node has the labels zone=b";

/// Opens a session of `app` with one task and returns its id.
async fn session_with_one_task(client: &Client, app: &str) -> SessionId {
    let session = client
        .create_session(SessionSpec::new(app.to_string()))
        .await
        .unwrap();
    session
        .submit(vec![Bytes::from_static(b"echo placed")])
        .await
        .unwrap();
    session.id()
}

/// Waits until the head says why `id` waits, then checks that it stays pending for
/// [`STAYS_PENDING`]; returns the info after that.
async fn check_stays_pending(client: &Client, id: SessionId, app: &str) -> SessionInfo {
    wait_session(client, id, "saying why it waits", WAITING_TIMEOUT, |i| {
        i.waiting.is_some()
    })
    .await;
    tokio::time::sleep(STAYS_PENDING).await;
    let info = client.get_session(id).await.unwrap();
    assert_eq!(info.counts.pending, 1, "{info:#?}");
    assert_eq!(info.counts.running, 0, "{info:#?}");
    assert_eq!(info.executors, 0, "{info:#?}");
    assert!(info.waiting.is_some(), "{info:#?}");
    let app_info = client.get_application(app).await.unwrap();
    assert_eq!(app_info.executors, 0, "{app_info:#?}");
    info
}

#[tokio::test(flavor = "multi_thread")]
async fn session_that_no_node_could_hold_is_refused_at_once() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let client = cluster.client().await;
    client
        .register_application(ApplicationSpec {
            resources: Resources {
                memory_bytes: Some(1 << 40),
                ..Resources::default()
            },
            ..test_service::spec("huge")
        })
        .await
        .unwrap();
    let err = client
        .create_session(SessionSpec::new("huge".to_string()))
        .await
        .map(|s| s.id())
        .expect_err("a session no node could hold was opened");
    assert_eq!(err.kind(), Some(ErrorKind::FailedPrecondition), "{err}");
    let message = err.to_string();
    assert!(message.contains(NEVER_FITS), "{message}");
    assert!(message.contains("`node-0`, offers cpus 2"), "{message}");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn selector_picks_nodes_by_label() {
    let cluster = Cluster::start(ClusterOptions::default().node_args(["--label", "zone=a"])).await;
    let nodes = cluster.node_list().await;
    assert_eq!(
        nodes[0].labels,
        BTreeMap::from([("zone".to_string(), "a".to_string())]),
        "{nodes:#?}"
    );
    let client = cluster.client().await;
    for zone in ["a", "b"] {
        client
            .register_application(ApplicationSpec {
                selector: BTreeMap::from([("zone".to_string(), zone.to_string())]),
                delay_release_ms: 0,
                ..test_service::spec(&format!("in-zone-{zone}"))
            })
            .await
            .unwrap();
    }
    let mut session = ServiceSession::open(&client, "in-zone-a").await;
    assert_eq!(session.output("echo placed").await, "placed");
    session.finish().await;

    // No node has its labels (yet): it waits, and says why, to people and scripts.
    let id = session_with_one_task(&client, "in-zone-b").await;
    let info = check_stays_pending(&client, id, "in-zone-b").await;
    let waiting = info.waiting.as_deref().unwrap();
    assert!(waiting.contains(NO_LABELS), "{info:#?}");
    let view = cluster.flame(&["session", "view", &id.to_string()]).await;
    view.assert_success();
    assert!(view.stdout.contains(NO_LABELS), "{view}");
    let json = cluster
        .flame(&["session", "view", &id.to_string(), "--output", "json"])
        .await;
    json.assert_success();
    let value: Value =
        serde_json::from_str(&json.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{json}"));
    assert!(
        value["waiting"]
            .as_str()
            .is_some_and(|w| w.contains(NO_LABELS)),
        "{value:#}"
    );

    // Cancelled, it ends without ever running.
    client.cancel_session(id).await.unwrap();
    let tasks = client
        .list_tasks(id, Vec::new(), TaskId(0), 10)
        .await
        .unwrap();
    assert_eq!(tasks.len(), 1, "{tasks:#?}");
    assert_eq!(tasks[0].state, TaskState::Cancelled, "{tasks:#?}");
    client.close().await;
}
