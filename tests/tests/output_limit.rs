//! The head's bound on task outputs (issue 21, item 9): `flame-head --task-output-bytes-max`
//! reaches the node when it registers; an output within it comes back (inline, or as an
//! object past the inline threshold), a larger one fails its task, saying so, and the
//! session goes on.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_tests::test_service::{self, ServiceSession};
use flame_tests::{Cluster, ClusterOptions};

/// The bound set on the head in this test, in bytes.
const OUTPUT_MAX: usize = 4096;

#[tokio::test(flavor = "multi_thread")]
async fn an_output_over_the_heads_limit_fails_its_task() {
    let cluster = Cluster::start(ClusterOptions::default().head_args([
        "--task-output-bytes-max".to_string(),
        OUTPUT_MAX.to_string(),
        "--object-inline-max".to_string(),
        "1KiB".to_string(),
    ]))
    .await;
    let client = cluster.client().await;
    client
        .register_application(test_service::spec("echo"))
        .await
        .unwrap();
    let mut session = ServiceSession::open(&client, "echo").await;
    // At the bound, past the inline threshold: kept as an object, read back whole.
    let at = "x".repeat(OUTPUT_MAX);
    assert_eq!(session.output(&format!("echo {at}")).await, at);
    let over = "y".repeat(OUTPUT_MAX + 1);
    let message = session.failure(&format!("echo {over}")).await;
    assert!(
        message.contains(&format!("output is {} bytes", OUTPUT_MAX + 1))
            && message.contains(&format!("at most {OUTPUT_MAX} bytes")),
        "{message}"
    );
    // The session goes on.
    assert_eq!(session.output("echo after").await, "after");
    session.finish().await;
    client.close().await;
}
