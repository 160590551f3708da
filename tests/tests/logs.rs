//! `flame logs`: executors' stderr, captured on the node, read back through the head by the
//! `flame` command: a finished session's whole logs, one executor's alone, following a
//! running session until its executors leave it, only the session's own part of an
//! executor that served several, and the errors for an unknown session or executor.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_protocol::model::{NodeState, SessionSpec, TaskOutcome};
use flame_protocol::ExecutorId;
use flame_tests::logging_service::{executor_of, spec, Follower, LOST_NODE_TIMEOUT};
use flame_tests::results::run_tasks;
use flame_tests::test_service::{wait_session, ServiceSession};
use flame_tests::{prerequisites, Cluster, ClusterOptions};
use std::collections::{BTreeMap, BTreeSet};

#[tokio::test(flavor = "multi_thread")]
async fn logs_show_what_executors_wrote_and_filter_by_executor() {
    if !prerequisites::python3("logs_show_what_executors_wrote_and_filter_by_executor") {
        return;
    }
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let client = cluster.client().await;
    client.register_application(spec("py-logs")).await.unwrap();
    let session = client
        .create_session(SessionSpec::new("py-logs"))
        .await
        .unwrap();
    // Slow enough that both executors get tasks.
    let inputs: Vec<Bytes> = (0..8)
        .map(|i| Bytes::from(format!("sleep:0.3 log:line-{i:02}")))
        .collect();
    let done = run_tasks(&session, inputs).await;
    let mut by_executor: BTreeMap<ExecutorId, Vec<String>> = BTreeMap::new();
    for (input, result) in &done {
        match &result.outcome {
            TaskOutcome::Succeeded(out) => {
                let line = String::from_utf8_lossy(out).into_owned();
                by_executor
                    .entry(executor_of(&line))
                    .or_default()
                    .push(line);
            }
            other => panic!("{input:?} did not succeed: {other:?}\n{}", cluster.logs()),
        }
    }
    let id = session.id().to_string();
    let node = Cluster::node_name(0);

    // Every line, under a header per executor.
    let all = cluster.flame(&["logs", &id]).await;
    all.assert_success();
    for (executor, lines) in &by_executor {
        let header = format!("==> {node}/exec-{executor} <==");
        assert!(all.stdout.contains(&header), "no `{header}`:\n{all}");
        for line in lines {
            assert!(
                all.stdout.lines().any(|l| l == line),
                "`{line}` missing:\n{all}"
            );
        }
    }

    // One executor's alone: its lines, and nobody else's.
    for (executor, lines) in &by_executor {
        let one = cluster
            .flame(&["logs", &id, "--executor", &executor.to_string()])
            .await;
        one.assert_success();
        let shown: BTreeSet<&str> = one
            .stdout
            .lines()
            .filter(|l| l.starts_with("line-"))
            .collect();
        let expected: BTreeSet<&str> = lines.iter().map(String::as_str).collect();
        assert_eq!(shown, expected, "executor {executor}:\n{one}");
        let headers: Vec<&str> = one
            .stdout
            .lines()
            .filter(|l| l.starts_with("==> "))
            .collect();
        assert_eq!(
            headers,
            [format!("==> {node}/exec-{executor} <==")],
            "{one}"
        );
    }
    assert_eq!(
        by_executor.len(),
        2,
        "expected both executors to run tasks, so that the filter is tested: {by_executor:?}"
    );

    // An executor that never served the session, and a session that does not exist.
    let stranger = cluster.flame(&["logs", &id, "--executor", "999999"]).await;
    stranger.assert_failure();
    assert!(
        stranger.stderr.contains("executor 999999") && stranger.stderr.contains("error:"),
        "{stranger}"
    );
    let unknown = cluster.flame(&["logs", "999999"]).await;
    unknown.assert_failure();
    assert!(
        unknown.stderr.contains("error:") && unknown.stderr.contains("session 999999"),
        "{unknown}"
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn follow_streams_new_lines_and_ends_with_the_executors() {
    if !prerequisites::python3("follow_streams_new_lines_and_ends_with_the_executors") {
        return;
    }
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let client = cluster.client().await;
    let mut spec = spec("py-follow");
    spec.max_instances = 1;
    client.register_application(spec).await.unwrap();
    let mut session = ServiceSession::open(&client, "py-follow").await;
    let before = session.output("log:before-follow").await;
    let executor = executor_of(&before);
    let id = session.session.id().to_string();
    let prefix = format!("[{}/exec-{executor}] ", Cluster::node_name(0));

    let mut follower = Follower::start(&cluster, &id);
    // What was there already comes first, then what is written while it follows.
    let old = follower
        .wait_line(&format!("before-follow from {executor}"), &cluster)
        .await;
    assert_eq!(old, format!("{prefix}before-follow from {executor}"));
    let after = session.output("log:after-follow").await;
    assert_eq!(executor_of(&after), executor);
    let new = follower
        .wait_line(&format!("after-follow from {executor}"), &cluster)
        .await;
    assert_eq!(new, format!("{prefix}after-follow from {executor}"));

    // Ctrl-C ends another follower cleanly, the first one following on.
    let mut interrupted = Follower::start(&cluster, &id);
    interrupted
        .wait_line(&format!("after-follow from {executor}"), &cluster)
        .await;
    interrupted.interrupt();
    interrupted.wait_success(&cluster).await;

    // The session ends, its executor is released, its log closes: the follow ends.
    session.finish().await;
    follower.wait_success(&cluster).await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_node_is_a_warning_not_a_failure() {
    if !prerequisites::python3("a_lost_node_is_a_warning_not_a_failure") {
        return;
    }
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let client = cluster.client().await;
    client.register_application(spec("py-lost")).await.unwrap();
    let mut session = ServiceSession::open(&client, "py-lost").await;
    session.output("log:before-the-loss").await;
    let sid = session.session.id();
    let id = sid.to_string();
    // The head remembers an executor that served a session once it unbinds (one lost with
    // its node is forgotten), so the session ends first.
    session.finish().await;
    wait_session(
        &client,
        sid,
        "with its executor's usage",
        LOST_NODE_TIMEOUT,
        |info| !info.usage.is_empty(),
    )
    .await;
    cluster.kill_node(0).await;
    cluster
        .wait_node_state(0, NodeState::NotReady, LOST_NODE_TIMEOUT)
        .await;

    let out = cluster.flame(&["logs", &id]).await;
    out.assert_success();
    let node = Cluster::node_name(0);
    assert!(
        out.stderr
            .contains(&format!("warning: logs on node {node} are unavailable")),
        "{out}"
    );
    client.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rebound_executor_shows_each_session_only_its_own_lines() {
    if !prerequisites::python3("a_rebound_executor_shows_each_session_only_its_own_lines") {
        return;
    }
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let client = cluster.client().await;
    let mut spec = spec("py-rebind");
    // One executor: it must serve the second session after the first. One attempt: a
    // crash is reported from the executor it happened on.
    spec.max_instances = 1;
    spec.max_attempts = 1;
    client.register_application(spec).await.unwrap();
    let mut first = ServiceSession::open(&client, "py-rebind").await;
    let executor = executor_of(&first.output("log:first-session").await);
    let first_id = first.session.id().to_string();
    let mut follower = Follower::start(&cluster, &first_id);
    follower
        .wait_line(&format!("first-session from {executor}"), &cluster)
        .await;

    // The second session waits for the one executor; the first ends and hands it over.
    let mut second = ServiceSession::open(&client, "py-rebind").await;
    let waiting = second.submit(&["log:second-session"]).await;
    first.finish().await;
    let done = second.wait(&waiting).await;
    let line = match &done[0].outcome {
        TaskOutcome::Succeeded(out) => String::from_utf8_lossy(out).into_owned(),
        other => panic!("the second session's task did not succeed: {other:?}"),
    };
    assert_eq!(
        executor_of(&line),
        executor,
        "the second session got another executor, so no rebind was tested\n{}",
        cluster.logs()
    );
    // The follow of the first session ended when the executor left it, and showed
    // nothing of the second.
    let seen = follower.wait_success(&cluster).await;
    assert!(
        !seen.iter().any(|l| l.contains("second-session")),
        "the first session's follow showed the second's output: {seen:?}"
    );

    // Followed across more work: only the second session's lines.
    let second_id = second.session.id().to_string();
    let mut follower = Follower::start(&cluster, &second_id);
    follower
        .wait_line(&format!("second-session from {executor}"), &cluster)
        .await;
    second.output("log:second-again").await;
    follower
        .wait_line(&format!("second-again from {executor}"), &cluster)
        .await;
    // A crash's message carries the end of the executor's output: this session's only.
    let crash = second.failure("crash:second-crash").await;
    assert!(crash.contains("second-crash"), "{crash}");
    assert!(crash.contains("second-again from"), "{crash}");
    assert!(!crash.contains("first-session"), "{crash}");
    second.finish().await;
    let seen = follower.wait_success(&cluster).await;
    assert!(
        !seen.iter().any(|l| l.contains("first-session")),
        "the second session's follow showed the first's output: {seen:?}"
    );

    // And without following.
    let one = cluster.flame(&["logs", &first_id]).await;
    one.assert_success();
    assert!(one.stdout.contains("first-session from"), "{one}");
    assert!(!one.stdout.contains("second-"), "{one}");
    let two = cluster.flame(&["logs", &second_id]).await;
    two.assert_success();
    assert!(two.stdout.contains("second-session from"), "{two}");
    assert!(two.stdout.contains("second-again from"), "{two}");
    assert!(!two.stdout.contains("first-session"), "{two}");
    client.close().await;
}
