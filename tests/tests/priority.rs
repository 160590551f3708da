//! Priority among one owner's sessions: a high-priority session that arrives while a
//! low-priority one holds every executor gets executors, and finishes, while the low one
//! still has work; the low one loses no task to the reclaim (an executor leaves its
//! session after the tasks already queued on it, never by a kill). Also where a session's
//! owner and priority come from: the library's default owner is the authenticated user, and the
//! CLI takes `--owner`, `FLAME_OWNER` and `ping --priority`. With the head's
//! `--preemption-grace`, a reclaimed executor still busy when it runs out is killed and its
//! task requeued, uncharged.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_protocol::model::{SessionSpec, TaskOutcome};
use flame_protocol::SessionId;
use flame_tests::cluster::flame_command;
use flame_tests::command::COMMAND_TIMEOUT;
use flame_tests::results::{ping_session_id, spawn_collector, wait_results};
use flame_tests::test_service::{self, wait_session};
use flame_tests::{run_command, Cluster, ClusterOptions, CmdOutput};
use serde_json::Value;
use std::time::Duration;

const APP: &str = "sleeper";
/// Two executors of one cpu.
const CPUS: u32 = 2;
const OWNER: &str = "team";
const LOW_PRIORITY: i32 = 0;
const HIGH_PRIORITY: i32 = 10;
/// The low session's work: about 15 s of both executors, far longer than the high
/// session needs to be served.
const LOW_TASKS: usize = 100;
const LOW_TASK_MS: u64 = 300;
const HIGH_TASKS: usize = 4;
const HIGH_TASK_MS: u64 = 100;
/// Bound on the low session holding both executors (their launch included).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the high session getting executors, and on its results.
const RECLAIM_TIMEOUT: Duration = Duration::from_secs(30);

fn spec(priority: i32) -> SessionSpec {
    SessionSpec {
        owner: OWNER.to_string(),
        priority,
        ..SessionSpec::new(APP)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_higher_priority_session_reclaims_executors_without_killing_tasks() {
    let cluster = Cluster::start(ClusterOptions::default().cpus(CPUS)).await;
    let client = cluster.client().await;
    client
        .register_application(test_service::spec(APP))
        .await
        .unwrap();

    let low = client.create_session(spec(LOW_PRIORITY)).await.unwrap();
    let (collect_low, _) = spawn_collector(&low).await;
    low.submit(test_service::sleeps(LOW_TASKS, LOW_TASK_MS))
        .await
        .unwrap();
    wait_session(
        &client,
        low.id(),
        "holding both executors",
        START_TIMEOUT,
        |i| i.executors == CPUS && i.counts.running > 0,
    )
    .await;

    let high = client.create_session(spec(HIGH_PRIORITY)).await.unwrap();
    let info = high.info().await.unwrap();
    assert_eq!(
        (info.owner.as_str(), info.priority),
        (OWNER, HIGH_PRIORITY),
        "{info:#?}"
    );
    let mut watch = high.watch().await.unwrap();
    let ids = high
        .submit(test_service::sleeps(HIGH_TASKS, HIGH_TASK_MS))
        .await
        .unwrap();
    wait_session(
        &client,
        high.id(),
        "given an executor",
        RECLAIM_TIMEOUT,
        |i| i.executors > 0,
    )
    .await;
    for result in wait_results(&mut watch, &ids, RECLAIM_TIMEOUT).await {
        assert!(
            matches!(result.outcome, TaskOutcome::Succeeded(_)),
            "{result:?}"
        );
    }
    // Served before the low session's work ran out: it was not merely next in line.
    let low_info = low.info().await.unwrap();
    assert!(
        low_info.counts.pending > 0,
        "the low-priority session ran out of work before the high one was served: {low_info:#?}"
    );
    high.close().await.unwrap();

    // Every low task ran once, to success: the reclaim killed nothing.
    low.close().await.unwrap();
    let results = collect_low.await.unwrap();
    assert_eq!(results.len(), LOW_TASKS);
    for result in &results {
        assert!(
            matches!(result.outcome, TaskOutcome::Succeeded(_)) && result.attempt == 1,
            "a low-priority task was not run once to success: {result:?}"
        );
    }
    let low_info = low.info().await.unwrap();
    assert!(low_info.is_finished(), "{low_info:#?}");
    assert_eq!(low_info.counts.succeeded, LOW_TASKS as u64, "{low_info:#?}");
    client.close().await;
}

/// With `--preemption-grace`, a reclaimed executor that is still running its task when the
/// grace runs out is killed; the task goes back to pending without counting as a failed
/// attempt, and runs again (attempt 2) once an executor is free.
#[tokio::test(flavor = "multi_thread")]
async fn past_the_preemption_grace_a_reclaimed_executor_is_killed_and_its_task_requeued() {
    /// The low task outlasts the grace many times over.
    const LONG_TASK_MS: u64 = 6_000;
    let cluster = Cluster::start(
        ClusterOptions::default()
            .cpus(1)
            .head_args(["--preemption-grace", "500ms"]),
    )
    .await;
    let client = cluster.client().await;
    client
        .register_application(test_service::spec(APP))
        .await
        .unwrap();
    let low = client.create_session(spec(LOW_PRIORITY)).await.unwrap();
    let (collect_low, _) = spawn_collector(&low).await;
    low.submit(test_service::sleeps(1, LONG_TASK_MS))
        .await
        .unwrap();
    wait_session(&client, low.id(), "running its task", START_TIMEOUT, |i| {
        i.counts.running == 1
    })
    .await;

    let high = client.create_session(spec(HIGH_PRIORITY)).await.unwrap();
    let mut watch = high.watch().await.unwrap();
    let ids = high
        .submit(test_service::sleeps(HIGH_TASKS, HIGH_TASK_MS))
        .await
        .unwrap();
    for result in wait_results(&mut watch, &ids, RECLAIM_TIMEOUT).await {
        assert!(
            matches!(result.outcome, TaskOutcome::Succeeded(_)),
            "{result:?}"
        );
    }
    // The high session was served while the low task had not finished: it was killed and
    // waits again, uncharged.
    let low_info = low.info().await.unwrap();
    assert_eq!(
        (low_info.counts.succeeded, low_info.counts.failed),
        (0, 0),
        "{low_info:#?}"
    );
    high.close().await.unwrap();

    low.close().await.unwrap();
    let results = collect_low.await.unwrap();
    assert_eq!(results.len(), 1);
    assert!(
        matches!(results[0].outcome, TaskOutcome::Succeeded(_)) && results[0].attempt == 2,
        "the killed task should have run again, as attempt 2: {:?}",
        results[0]
    );
    client.close().await;
}

fn json(out: &CmdOutput) -> Value {
    out.assert_success();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

/// `flame session view ID --output json`.
async fn view(cluster: &Cluster, id: SessionId) -> Value {
    json(
        &cluster
            .flame(&["session", "view", &id.to_string(), "--output", "json"])
            .await,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn owner_and_priority_from_the_library_and_the_cli() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let client = cluster.client().await;

    // The library: no owner in the spec and none configured is the authenticated user
    // (the harness's client is the admin `flame-head init` made).
    assert_eq!(client.owner(), "");
    let session = client
        .create_session(SessionSpec::new("ping"))
        .await
        .unwrap();
    let info = session.info().await.unwrap();
    assert_eq!((info.owner.as_str(), info.priority), ("admin", 0));
    session.close().await.unwrap();

    // `--owner` and `ping --priority`.
    let ping = cluster
        .flame(&[
            "--owner",
            "cli-owner",
            "ping",
            "-t",
            "10",
            "--priority",
            "5",
        ])
        .await;
    ping.assert_success();
    let by_flag = ping_session_id(&ping.stdout);
    let v = view(&cluster, by_flag).await;
    assert_eq!(v["owner"], "cli-owner", "{v:#}");
    assert_eq!(v["priority"], 5, "{v:#}");

    // FLAME_OWNER, and a negative priority.
    let mut command = flame_command();
    command
        .env("FLAME_OWNER", "env-owner")
        .arg("--head")
        .arg(cluster.head_addr())
        .arg("--ca-file")
        .arg(cluster.ca_file())
        .arg("--token-file")
        .arg(cluster.admin_token_file())
        .args(["ping", "-t", "10", "--priority", "-3"]);
    let ping = run_command(command, COMMAND_TIMEOUT).await;
    ping.assert_success();
    let by_env = ping_session_id(&ping.stdout);
    let v = view(&cluster, by_env).await;
    assert_eq!(v["owner"], "env-owner", "{v:#}");
    assert_eq!(v["priority"], -3, "{v:#}");

    // The tables show both.
    let list = cluster.flame(&["session", "list"]).await;
    list.assert_success();
    let row = |id: SessionId| {
        list.stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&id.to_string()))
            .unwrap_or_else(|| panic!("session {id} is not listed:\n{list}"))
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert!(row(by_flag).contains(&"cli-owner"), "{list}");
    assert!(row(by_env).contains(&"-3"), "{list}");
    let shown = cluster
        .flame(&["session", "view", &by_flag.to_string()])
        .await;
    shown.assert_success();
    let field = |name: &str| {
        shown
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no `{name}:` in:\n{shown}"))
            .to_string()
    };
    assert_eq!(field("Owner"), "cli-owner");
    assert_eq!(field("Priority"), "5");
    client.close().await;
}
