//! An application written in Python with the one-file helper in `shims/python`, run by a
//! real node: outputs, common data, and an exception that fails one task.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_protocol::model::{ApplicationSpec, SessionSpec, ShimKind, TaskOutcome};
use flame_tests::results::run_tasks;
use flame_tests::{Cluster, ClusterOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const TASKS: usize = 200;
/// The index, among the inputs, of the task that raises.
const FAILING: usize = 100;
const COMMON_DATA: &[u8] = b"common>";
const ERROR_TEXT: &str = "deliberate failure from task 100";

/// `python3` on `PATH`; a missing interpreter fails the test rather than skipping it.
fn require_python3() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .map(|dir| dir.join("python3"))
        .find(|p| p.is_file());
    match found {
        Some(p) => p,
        None => panic!(
            "python3 is not on PATH ({}): this test needs it{}",
            path.to_string_lossy(),
            if std::env::var("CI").as_deref() == Ok("true") {
                " and CI must provide it"
            } else {
                "; install python3"
            }
        ),
    }
}

fn service_file() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/upper_service.py");
    assert!(path.is_file(), "{} is missing", path.display());
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn python_service_runs_tasks_and_reports_exceptions() {
    require_python3();
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let client = cluster.client().await;
    let spec = ApplicationSpec {
        name: "py-upper".into(),
        shim: ShimKind::Stdio,
        command: "python3".into(),
        args: vec![service_file().display().to_string()],
        // No __pycache__ written into the repository's shims/python.
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
        max_attempts: 3,
        retry_on_error: false,
        task_timeout_ms: None,
        allow_root: false,
    };
    client.register_application(spec).await.unwrap();
    let session = client
        .create_session(SessionSpec {
            application: "py-upper".into(),
            common_data: Bytes::from_static(COMMON_DATA).into(),
            ephemeral: false,
            owner: Default::default(),
            priority: 0,
            job: None,
        })
        .await
        .unwrap();

    // The failing task sits among the others: the executor must survive the exception and
    // run the tasks after it.
    let inputs: Vec<Bytes> = (0..=TASKS)
        .map(|i| {
            if i == FAILING {
                Bytes::from(format!("raise:{ERROR_TEXT}"))
            } else {
                Bytes::from(format!("hello python {i}"))
            }
        })
        .collect();
    let done = run_tasks(&session, inputs).await;

    let mut succeeded = 0;
    for (i, (input, result)) in done.iter().enumerate() {
        match (&result.outcome, i == FAILING) {
            (TaskOutcome::Succeeded(output), false) => {
                let mut expected = COMMON_DATA.to_vec();
                expected.extend(input.to_ascii_uppercase());
                assert_eq!(
                    output.as_ref(),
                    expected.as_slice(),
                    "task {} (input {input:?})",
                    result.task
                );
                succeeded += 1;
            }
            (TaskOutcome::Failed(message), true) => {
                assert!(
                    message.contains(ERROR_TEXT),
                    "task {}: {message}",
                    result.task
                );
            }
            (outcome, _) => panic!(
                "task {} (input {input:?}) ended unexpectedly: {outcome:?}\n{}",
                result.task,
                cluster.logs()
            ),
        }
    }
    assert_eq!(succeeded, TASKS);
    let info = session.info().await.unwrap();
    assert!(info.is_finished(), "{info:?}");
    assert_eq!(
        (info.counts.succeeded, info.counts.failed),
        (TASKS as u64, 1),
        "{info:?}"
    );
    client.close().await;
}
