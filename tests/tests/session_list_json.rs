//! `--output json` of `flame session list`, `flame session view` and `flame node list`: the
//! machine-readable contract scripts rely on, checked field by field.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_tests::results::{ping_session_id, ping_spec, run_tasks};
use flame_tests::{Cluster, ClusterOptions, CmdOutput};
use serde_json::Value;

const CPUS: u32 = 3;

fn json(out: &CmdOutput) -> Value {
    out.assert_success();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

/// Checks the fields of one session object.
fn check_session(s: &Value, id: u64, state: &str, succeeded: u64) {
    assert_eq!(s["id"], id, "{s:#}");
    assert_eq!(s["application"], "ping", "{s:#}");
    assert_eq!(s["state"], state, "{s:#}");
    assert_eq!(s["ephemeral"], false, "{s:#}");
    let counts = &s["counts"];
    assert_eq!(counts["succeeded"], succeeded, "{s:#}");
    assert_eq!(counts["failed"], 0, "{s:#}");
    assert_eq!(counts["pending"], 0, "{s:#}");
    assert_eq!(counts["running"], 0, "{s:#}");
    assert!(s["created_ms"].as_u64().is_some_and(|ms| ms > 0), "{s:#}");
    match state {
        "Closed" => assert!(s["closed_ms"].as_u64().is_some(), "{s:#}"),
        _ => assert!(s["closed_ms"].is_null(), "{s:#}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn session_and_node_lists_as_json() {
    let cluster = Cluster::start(ClusterOptions::default().cpus(CPUS)).await;

    // A 1,000-task session through the CLI ...
    let ping = cluster.flame(&["ping", "-t", "1000"]).await;
    ping.assert_success();
    let first = ping_session_id(&ping.stdout).0;
    // ... a second one, closed and finished, through the library ...
    let client = cluster.client().await;
    let second = client.create_session(ping_spec()).await.unwrap();
    let inputs = (0..10)
        .map(|i| Bytes::from(format!("second-{i}")))
        .collect();
    run_tasks(&second, inputs).await;
    // ... and a third, left open with nothing in it.
    let third = client.create_session(ping_spec()).await.unwrap();
    let (second, third) = (second.id().0, third.id().0);

    let list = json(
        &cluster
            .flame(&["session", "list", "--output", "json"])
            .await,
    );
    let sessions = list
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {list:#}"));
    let find = |id: u64| {
        sessions
            .iter()
            .find(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("session {id} is not listed: {list:#}"))
    };
    check_session(find(first), first, "Closed", 1000);
    // `status` is the table's Status: closed with nothing left to run is Finished.
    assert_eq!(find(first)["status"], "Finished", "{list:#}");
    assert_eq!(find(third)["status"], "Open", "{list:#}");
    check_session(find(second), second, "Closed", 10);
    check_session(find(third), third, "Open", 0);
    assert_eq!(sessions.len(), 3, "{list:#}");

    let view = json(
        &cluster
            .flame(&["session", "view", &first.to_string(), "--output", "json"])
            .await,
    );
    check_session(&view, first, "Closed", 1000);
    // Bound executors may leave a finished session between the two calls, and report what
    // they used as they go; the rest is fixed.
    let without_executors = |v: &Value| {
        let mut v = v.clone();
        if let Some(o) = v.as_object_mut() {
            o.remove("executors");
            o.remove("usage");
        }
        v
    };
    assert_eq!(
        without_executors(&view),
        without_executors(find(first)),
        "view and list disagree"
    );

    let nodes = json(&cluster.flame(&["node", "list", "--output", "json"]).await);
    let nodes = nodes
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {nodes:#}"));
    assert_eq!(nodes.len(), 1, "{nodes:#?}");
    let node = &nodes[0];
    assert_eq!(node["name"], "node-0", "{node:#}");
    assert_eq!(node["state"], "Ready", "{node:#}");
    assert_eq!(node["allocatable"]["cpu_millis"], CPUS * 1000, "{node:#}");
    assert!(
        node["allocatable"]["memory_bytes"]
            .as_u64()
            .is_some_and(|b| b > 0),
        "{node:#}"
    );
    assert!(node["isolation"].is_string(), "{node:#}");
    assert!(node["labels"].is_object(), "{node:#}");
    client.close().await;
}
