//! One user cannot block `flame logs` (or Open MPI's daemons, `JobExec`) for everyone on a
//! node by holding its streams. A node takes a bounded number of streams from the head;
//! mallory asks for 300 `flame logs --follow`s of her session on two connections. She
//! gets `NODE_STREAMS_PER_USER_MAX` of them, every other one is refused with an error
//! naming that bound, and while she holds hers bob reads his own session's logs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_client::{Client, LogStream};
use flame_protocol::limits::NODE_STREAMS_PER_USER_MAX;
use flame_protocol::messages::LogEvent;
use flame_protocol::model::{ApplicationSpec, ErrorKind, SessionSpec, TaskOutcome};
use flame_tests::results::RESULT_STALL_TIMEOUT;
use flame_tests::{test_service, Cluster, ClusterOptions};
use std::time::Duration;

/// Follows mallory asks for on each of her two connections: far more than her share of a
/// node's streams.
const FOLLOWS_PER_CONNECTION: usize = 150;
/// How long mallory's second task sleeps: longer than the test, so her follows stay open.
const HOLD_MS: u64 = 600_000;
/// Bound on the head giving back the streams of follows the client dropped; the client
/// sees no event for it, so it asks again after a pause.
const GIVE_BACK_TIMEOUT: Duration = Duration::from_secs(30);
const GIVE_BACK_POLL_PAUSE: Duration = Duration::from_millis(50);
/// What each session's task writes to its executor's log (`flame logs` shows a session
/// only what its executors wrote while bound to it).
const STARTED_LINE: &str = "svc started";

/// `flame-test-service` under a shell.
fn spec() -> ApplicationSpec {
    ApplicationSpec {
        args: vec![
            "-c".into(),
            format!("exec {}", test_service::path().display()),
        ],
        // Kept while their sessions are open, so that a follow stays open.
        delay_release_ms: 600_000,
        // Mallory's two tasks may take two executors; bob's session still gets one.
        max_instances: 3,
        allow_root: true,
        ..ApplicationSpec::new("svc", "sh")
    }
}

/// An open session of `client`'s user whose first task wrote [`STARTED_LINE`] to its
/// executor's log. With `hold`, a second task sleeps far longer than the test, so an
/// executor stays bound to the session and a follow of it stays open (a follow ends when
/// its executors leave the session).
async fn session_with_a_log(client: &Client, hold: bool) -> flame_client::Session {
    let session = client
        .create_session(SessionSpec::new("svc"))
        .await
        .unwrap();
    let mut watch = session.watch().await.unwrap();
    let mut inputs = vec![Bytes::from(format!("log {STARTED_LINE}"))];
    if hold {
        inputs.push(Bytes::from(format!("sleep {HOLD_MS}")));
    }
    session.submit(inputs).await.unwrap();
    let results = collect_first(&mut watch).await;
    assert!(
        matches!(&results.outcome, TaskOutcome::Succeeded(out) if out.as_ref() == STARTED_LINE.as_bytes()),
        "{results:?}"
    );
    session
}

/// The first result on `watch`, within [`RESULT_STALL_TIMEOUT`].
async fn collect_first(
    watch: &mut flame_client::ResultStream,
) -> flame_protocol::model::TaskResult {
    match tokio::time::timeout(RESULT_STALL_TIMEOUT, watch.next()).await {
        Ok(Some(Ok(mut results))) if !results.is_empty() => results.remove(0),
        other => panic!("no result within {RESULT_STALL_TIMEOUT:?}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn one_user_holding_log_follows_leaves_the_node_to_others() {
    // Room for mallory's two executors and bob's one.
    let cluster = Cluster::start(ClusterOptions::default().cpus(4)).await;
    cluster
        .client()
        .await
        .register_application(spec())
        .await
        .unwrap();
    let mallory_token = cluster.user_token("mallory", false).await;
    let mallory = [
        Client::connect(&cluster.client_config_as(mallory_token.clone()))
            .await
            .unwrap(),
        Client::connect(&cluster.client_config_as(mallory_token))
            .await
            .unwrap(),
    ];
    let bob = Client::connect(&cluster.client_config_as(cluster.user_token("bob", false).await))
        .await
        .unwrap();
    let hers = session_with_a_log(&mallory[0], true).await;
    let his = session_with_a_log(&bob, false).await;

    let mut held: Vec<LogStream> = Vec::new();
    let mut refused = 0;
    for client in &mallory {
        for _ in 0..FOLLOWS_PER_CONNECTION {
            match client.logs(hers.id(), None, true).await {
                Ok(stream) => held.push(stream),
                Err(e) => {
                    assert_eq!(e.kind(), Some(ErrorKind::LimitExceeded), "{e}");
                    let message = e.to_string();
                    assert!(
                        message.contains("NODE_STREAMS_PER_USER_MAX")
                            && message.contains("user `mallory`"),
                        "the refusal does not name the quota: {message}"
                    );
                    refused += 1;
                }
            }
        }
    }
    assert_eq!(held.len(), NODE_STREAMS_PER_USER_MAX as usize);
    assert_eq!(refused, 2 * FOLLOWS_PER_CONNECTION - held.len());
    // Hers are real follows: each reads her executor's log.
    for stream in &mut held {
        match stream.next().await {
            Some(Ok(LogEvent::Chunk { data, .. })) => assert!(
                String::from_utf8_lossy(&data).contains(STARTED_LINE),
                "{data:?}"
            ),
            other => panic!("mallory's follow did not read her log: {other:?}"),
        }
    }

    // Meanwhile bob reads his session's logs (what his executor wrote while bound to it)
    // from the same node.
    let mut logs = bob.logs(his.id(), None, false).await.unwrap();
    let mut text = String::new();
    while let Some(event) = logs.next().await {
        match event.unwrap() {
            LogEvent::Chunk { data, .. } => text.push_str(&String::from_utf8_lossy(&data)),
            other => panic!("bob's logs: {other:?}\n{}", cluster.logs()),
        }
    }
    assert!(logs.is_ended());
    assert!(text.contains(STARTED_LINE), "{text}");

    // Once she lets go, she may follow again.
    drop(held);
    let again = tokio::time::timeout(GIVE_BACK_TIMEOUT, async {
        loop {
            match mallory[0].logs(hers.id(), None, true).await {
                Ok(stream) => return stream,
                // Her dropped follows are given back as the head sees them end.
                Err(e) if e.kind() == Some(ErrorKind::LimitExceeded) => {
                    tokio::time::sleep(GIVE_BACK_POLL_PAUSE).await
                }
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert!(again.is_ok(), "mallory's streams were not given back");
}
