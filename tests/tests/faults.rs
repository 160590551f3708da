//! Executor crashes and cancellation, with a real Python application that crashes or
//! sleeps on chosen inputs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_protocol::model::{ApplicationSpec, SessionSpec, ShimKind, TaskOutcome, TaskState};
use flame_protocol::TaskId;
use flame_tests::results::{collect_results, run_tasks, RESULT_STALL_TIMEOUT};
use flame_tests::{Cluster, ClusterOptions};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

/// `python3` on `PATH`; a missing interpreter fails the test rather than skipping it.
fn require_python3() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|dir| dir.join("python3").is_file());
    assert!(
        found,
        "python3 is not on PATH ({}): these tests need it (CI installs it)",
        path.to_string_lossy()
    );
}

fn crashy_app(name: &str, max_attempts: u32) -> ApplicationSpec {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/crashy_service.py");
    assert!(script.is_file(), "{} is missing", script.display());
    ApplicationSpec {
        name: name.into(),
        shim: ShimKind::Stdio,
        command: "python3".into(),
        args: vec![script.display().to_string()],
        env: BTreeMap::from([(
            "PYTHONDONTWRITEBYTECODE".into(),
            flame_protocol::model::EnvValue::plain("1"),
        )]),
        working_dir: None,
        user: None,
        group: None,
        users: Vec::new(),
        groups: Vec::new(),
        resources: Default::default(),
        selector: Default::default(),
        max_instances: 2,
        delay_release_ms: 1_000,
        max_attempts,
        retry_on_error: false,
        task_timeout_ms: None,
        allow_root: false,
    }
}

fn durable(app: &str) -> SessionSpec {
    SessionSpec::new(app)
}

#[tokio::test(flavor = "multi_thread")]
async fn crashing_tasks_fail_after_max_attempts_and_the_rest_succeed() {
    require_python3();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let client = cluster.client().await;
    client
        .register_application(crashy_app("crashy", 2))
        .await
        .unwrap();
    let session = client.create_session(durable("crashy")).await.unwrap();
    let crashing: HashSet<usize> = [17, 60, 143].into();
    let inputs: Vec<Bytes> = (0..200)
        .map(|i| {
            if crashing.contains(&i) {
                Bytes::from(format!("crash:boom on input {i}"))
            } else {
                Bytes::from(format!("ordinary input {i}"))
            }
        })
        .collect();
    let done = run_tasks(&session, inputs).await;
    for (i, (input, result)) in done.iter().enumerate() {
        match (&result.outcome, crashing.contains(&i)) {
            (TaskOutcome::Succeeded(out), false) => {
                let expected: Vec<u8> = input.iter().rev().copied().collect();
                assert_eq!(out.as_ref(), expected.as_slice(), "task {}", result.task);
            }
            (TaskOutcome::Failed(message), true) => {
                // The reason names the limit, the exit status and the stderr tail.
                assert!(message.contains("limit is 2"), "{message}");
                assert!(message.contains("exit status: 3"), "{message}");
                assert!(message.contains(&format!("boom on input {i}")), "{message}");
            }
            (other, crashes) => panic!(
                "task {} (crashes: {crashes}) ended as {other:?}\n{}",
                result.task,
                cluster.logs()
            ),
        }
    }
    let info = session.info().await.unwrap();
    assert_eq!(info.counts.succeeded, 197);
    assert_eq!(info.counts.failed, 3);

    // `flame session view` shows the failed tasks with the stderr tail.
    let view = cluster
        .flame(&["session", "view", &session.id().to_string()])
        .await;
    view.assert_success();
    assert!(view.stdout.contains("Failed tasks"), "{}", view.stdout);
    for i in &crashing {
        assert!(
            view.stdout.contains(&format!("boom on input {i}")),
            "{}",
            view.stdout
        );
    }
    // And the task listing, from the store now that the session has finished.
    let failed = client
        .list_tasks(session.id(), vec![TaskState::Failed], TaskId(0), 100)
        .await
        .unwrap();
    let ids: Vec<u64> = failed.iter().map(|t| t.task.0).collect();
    assert_eq!(ids, vec![18, 61, 144]);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_running_tasks_and_cancels_the_rest() {
    require_python3();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let client = cluster.client().await;
    client
        .register_application(crashy_app("sleepy", 3))
        .await
        .unwrap();
    let session = client.create_session(durable("sleepy")).await.unwrap();
    let mut watch = session.watch().await.unwrap();
    // Twenty tasks of 30 s each: only cancellation can end this session quickly.
    let inputs: Vec<Bytes> = (0..20).map(|_| Bytes::from_static(b"sleep:30")).collect();
    session.submit(inputs).await.unwrap();

    // Wait until tasks run, so the cancel has running tasks to stop.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = session.info().await.unwrap();
        if info.counts.running > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no task started: {info:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cancelled_at = Instant::now();
    let out = cluster
        .flame(&["session", "cancel", &session.id().to_string()])
        .await;
    out.assert_success();

    let results = collect_results(&mut watch, RESULT_STALL_TIMEOUT).await;
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(20),
        "the cancel did not stop the running tasks: {:?}",
        cancelled_at.elapsed()
    );
    assert_eq!(results.len(), 20);
    assert!(results.iter().all(|r| r.outcome == TaskOutcome::Cancelled));
    let info = session.info().await.unwrap();
    assert!(info.is_finished(), "{info:?}");
    assert_eq!(info.counts.cancelled, 20);
    assert_eq!(info.counts.unfinished(), 0);

    // Cancelled is durable: it survives a head restart.
    let mut cluster = cluster;
    cluster.stop_head().await;
    cluster.start_head_again().await;
    let client = cluster.client().await;
    let info = client.get_session(session.id()).await.unwrap();
    assert_eq!(info.counts.cancelled, 20, "{info:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_past_its_timeout_is_killed_and_retried_then_failed() {
    require_python3();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let client = cluster.client().await;
    let mut app = crashy_app("hangs", 2);
    app.task_timeout_ms = Some(1_500);
    client.register_application(app).await.unwrap();
    let session = client.create_session(durable("hangs")).await.unwrap();
    let inputs: Vec<Bytes> = (0..40)
        .map(|i| {
            if i == 5 {
                Bytes::from_static(b"sleep:600")
            } else {
                Bytes::from(format!("quick {i}"))
            }
        })
        .collect();
    let started = Instant::now();
    let done = run_tasks(&session, inputs).await;
    // Two attempts of 1.5 s each, not ten minutes.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    for (i, (_, result)) in done.iter().enumerate() {
        match (&result.outcome, i == 5) {
            (TaskOutcome::Succeeded(_), false) => {}
            (TaskOutcome::Failed(message), true) => {
                assert!(message.contains("ran past its timeout"), "{message}");
                assert!(message.contains("limit is 2"), "{message}");
            }
            (other, _) => panic!(
                "task {} ended as {other:?}\n{}",
                result.task,
                cluster.logs()
            ),
        }
    }
    let info = session.info().await.unwrap();
    assert_eq!((info.counts.succeeded, info.counts.failed), (39, 1));
}
