//! A head stopped with SIGTERM and started again on its data folder still knows a finished
//! session, and serves its node again.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_tests::results::ping_session_id;
use flame_tests::{Cluster, ClusterOptions};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_state() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let ping = cluster.flame(&["ping", "-t", "500"]).await;
    ping.assert_success();
    let id = ping_session_id(&ping.stdout).0;

    let status = cluster.stop_head().await;
    assert!(
        status.success(),
        "the head exited with {status} on SIGTERM\n{}",
        cluster.logs()
    );
    // Same folder, same address; the node reconnects by itself.
    cluster.start_head_again().await;

    let out = cluster
        .flame(&["session", "list", "--output", "json"])
        .await;
    out.assert_success();
    let list: Value = serde_json::from_str(&out.stdout).unwrap();
    let sessions = list
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {out}"));
    assert_eq!(sessions.len(), 1, "{list:#}");
    let s = &sessions[0];
    assert_eq!(s["id"], id, "{s:#}");
    assert_eq!(s["state"], "Closed", "{s:#}");
    assert_eq!(s["counts"]["succeeded"], 500, "{s:#}");
    assert_eq!(s["counts"]["failed"], 0, "{s:#}");
    assert_eq!(s["counts"]["pending"], 0, "{s:#}");
    assert_eq!(s["counts"]["running"], 0, "{s:#}");

    // The restarted head runs work again, and numbers the new session after the old one.
    let again = cluster.flame(&["ping", "-t", "100"]).await;
    again.assert_success();
    assert!(ping_session_id(&again.stdout).0 > id, "{again}");
}
