//! An application that never says ready (issue 21, item 3).
//!
//! Its node kills each executor at the start timeout (here `--start-timeout 2s`), and
//! after `limits::APP_LAUNCH_FAILURES_MAX` launches in a row fail, the head ends the
//! sessions waiting for it: their tasks fail, naming the application and the last
//! failure. Meanwhile its launches go one at a time, so a `flame ping` beside it gets the
//! other cpu and completes. `flame app remove` then points to `flame session cancel`
//! (closing cannot end tasks that never start), and `flame app update` with a working
//! command forgets the failures: the next session starts at once.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_protocol::limits::APP_LAUNCH_FAILURES_MAX;
use flame_protocol::model::{ApplicationSpec, SessionSpec, ShimKind, TaskOutcome};
use flame_tests::results::{crashy_service, run_tasks};
use flame_tests::{Cluster, ClusterOptions};
use std::time::Duration;

/// The node's start timeout in this test.
const START_TIMEOUT: &str = "2s";
/// Bound on the session failing: by design `APP_LAUNCH_FAILURES_MAX` start timeouts plus
/// the backoff between them (about 7 s here); this only keeps a loaded machine from
/// failing the test, the point is that it ends at all.
const FAIL_TIMEOUT: Duration = Duration::from_secs(180);

/// A stdio application that never writes its Ready frame.
fn never_ready() -> ApplicationSpec {
    ApplicationSpec {
        shim: ShimKind::Stdio,
        args: vec!["-c".into(), "exec sleep 600".into()],
        max_instances: 4,
        ..ApplicationSpec::new("never-ready", "/bin/sh")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_never_ready_application_fails_its_session_and_starves_nobody() {
    let cluster = Cluster::start(
        ClusterOptions::default()
            .cpus(2)
            .node_args(["--start-timeout", START_TIMEOUT]),
    )
    .await;
    let client = cluster.client().await;
    client.register_application(never_ready()).await.unwrap();
    let session = client
        .create_session(SessionSpec::new("never-ready"))
        .await
        .unwrap();
    let inputs: Vec<Bytes> = (0..4).map(|i| Bytes::from(format!("t{i}"))).collect();
    let failing = tokio::spawn(async move { run_tasks(&session, inputs).await });

    // A ping beside it gets a cpu while the broken application holds at most one.
    let ping = cluster.flame(&["ping", "-t", "1000"]).await;
    ping.assert_success();

    let results = tokio::time::timeout(FAIL_TIMEOUT, failing)
        .await
        .unwrap_or_else(|_| panic!("the session did not fail\n{}", cluster.logs()))
        .expect("the session's task panicked");
    assert_eq!(results.len(), 4);
    for (_, result) in &results {
        let TaskOutcome::Failed(message) = &result.outcome else {
            panic!("task {}: {:?}", result.task, result.outcome);
        };
        assert!(
            message.contains(&format!(
                "application `never-ready` failed to start {APP_LAUNCH_FAILURES_MAX} times in a row"
            )),
            "{message}"
        );
        assert!(message.contains("did not say ready within 2s"), "{message}");
    }

    // A session of it still waiting: removing the application names the way out.
    let waiting = client
        .create_session(SessionSpec::new("never-ready"))
        .await
        .unwrap();
    let out = cluster.flame(&["app", "remove", "never-ready"]).await;
    out.assert_failure();
    assert!(out.stderr.contains("flame session cancel"), "{out}");
    assert!(!out.stderr.contains("let them finish first"), "{out}");
    cluster
        .flame(&["session", "cancel", &waiting.id().to_string()])
        .await
        .assert_success();

    // Fixed: the failures are forgotten, and the next session's tasks run at once.
    client
        .update_application(ApplicationSpec {
            name: "never-ready".into(),
            ..crashy_service("never-ready")
        })
        .await
        .unwrap();
    let session = client
        .create_session(SessionSpec::new("never-ready"))
        .await
        .unwrap();
    for (input, result) in run_tasks(&session, vec![Bytes::from_static(b"abc")]).await {
        assert_eq!(
            result.outcome,
            TaskOutcome::Succeeded(input.iter().rev().copied().collect::<Vec<u8>>().into()),
            "{}",
            cluster.logs()
        );
    }
}
