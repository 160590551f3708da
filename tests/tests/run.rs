//! `flame run APP FILE`: inputs from a file through a registered application, on a real
//! head and node: every output in input order, a failing input named with a non-zero
//! exit, common data, `--output json`, `--unordered`, and reading a task back with
//! `flame session task`. Ctrl-C cancels the session and exits 130.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_protocol::model::{ApplicationSpec, EnvValue, SessionInfo};
use flame_tests::command::{describe, COMMAND_TIMEOUT};
use flame_tests::{prerequisites, test_service, Cluster, ClusterOptions};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt as _;

/// Inputs of the main run.
const INPUTS: usize = 60;
/// The input number (from 1) that fails.
const FAILING: usize = 25;
const ERROR_TEXT: &str = "deliberate failure of input 25";
const COMMON_DATA: &str = "common>";

/// How long the Ctrl-C test waits for something it caused (a task starting, the session
/// ending).
const EVENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between two looks at the session, which announces no change of counts.
const POLL_PAUSE: Duration = Duration::from_millis(50);

/// The Python application of `tests/python/upper_service.py`: each output is the common
/// data followed by the input upper-cased; `raise:TEXT` fails with TEXT.
fn upper_spec(name: &str) -> ApplicationSpec {
    let service = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/upper_service.py");
    assert!(service.is_file(), "{} is missing", service.display());
    let mut spec = ApplicationSpec::new(name, "python3");
    spec.args = vec![service.display().to_string()];
    // No __pycache__ written into the repository's shims/python.
    spec.env
        .insert("PYTHONDONTWRITEBYTECODE".into(), EnvValue::plain("1"));
    spec.max_instances = 2;
    spec
}

fn input(i: usize) -> String {
    if i == FAILING {
        format!("raise:{ERROR_TEXT}")
    } else {
        format!("hello run {i}")
    }
}

fn expected_output(i: usize) -> String {
    format!("{COMMON_DATA}{}", input(i).to_uppercase())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn lines(range: impl Iterator<Item = usize>) -> String {
    range.map(|i| input(i) + "\n").collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn run_prints_outputs_names_a_failed_input_and_speaks_json() {
    if !prerequisites::python3("run_prints_outputs_names_a_failed_input_and_speaks_json") {
        return;
    }
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let client = cluster.client().await;
    client
        .register_application(upper_spec("py-upper"))
        .await
        .unwrap();
    client.close().await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "inputs", &lines(1..=INPUTS));
    let common = write(dir.path(), "common", COMMON_DATA);
    let file = file.to_str().unwrap();
    let common = common.to_str().unwrap();

    // Text: every other output in input order on stdout, the failed input named on
    // stderr with its message, exit 1.
    let out = cluster
        .flame(&["run", "py-upper", file, "--common-data", common])
        .await;
    assert_eq!(out.status.code(), Some(1), "{out}");
    let expected: Vec<String> = (1..=INPUTS)
        .filter(|&i| i != FAILING)
        .map(expected_output)
        .collect();
    let printed: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(printed, expected, "{out}");
    assert!(
        out.stderr.contains(&format!(
            "error: line {FAILING} \"raise:{ERROR_TEXT}\" (task {FAILING}) failed: "
        )) && out.stderr.contains(ERROR_TEXT),
        "{out}"
    );
    assert!(
        out.stderr.contains(&format!("1 of {INPUTS} inputs failed")),
        "{out}"
    );

    // JSON: one document, every result by task id (= input number).
    let out = cluster
        .flame(&[
            "run",
            "py-upper",
            file,
            "--common-data",
            common,
            "--output",
            "json",
        ])
        .await;
    assert_eq!(out.status.code(), Some(1), "{out}");
    let doc: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("not one JSON document ({e}):\n{out}"));
    assert_eq!(doc["application"], "py-upper", "{out}");
    assert_eq!(
        (doc["succeeded"].as_u64(), doc["failed"].as_u64()),
        (Some(INPUTS as u64 - 1), Some(1)),
        "{out}"
    );
    let results = doc["results"].as_array().unwrap();
    assert_eq!(results.len(), INPUTS, "{out}");
    for (n, result) in results.iter().enumerate() {
        let i = n + 1;
        assert_eq!(result["task"].as_u64(), Some(i as u64), "{result}");
        if i == FAILING {
            assert_eq!(result["state"], "failed", "{result}");
            assert!(
                result["error"].as_str().unwrap().contains(ERROR_TEXT),
                "{result}"
            );
        } else {
            assert_eq!(result["state"], "succeeded", "{result}");
            assert_eq!(
                result["output"].as_str(),
                Some(expected_output(i).as_str()),
                "{result}"
            );
        }
    }

    // The session keeps what its tasks gave: read two of them back.
    let session = doc["session"].as_u64().unwrap().to_string();
    let out = cluster
        .flame(&["session", "task", &session, "3", "--raw"])
        .await;
    out.assert_success();
    assert_eq!(out.stdout, expected_output(3), "{out}");
    let out = cluster
        .flame(&[
            "session",
            "task",
            &session,
            &FAILING.to_string(),
            "--output",
            "json",
        ])
        .await;
    out.assert_success();
    let task: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(task["state"], "Failed", "{out}");
    assert!(
        task["message"].as_str().unwrap().contains(ERROR_TEXT),
        "{out}"
    );
    let out = cluster
        .flame(&["session", "task", &session, &FAILING.to_string(), "--raw"])
        .await;
    out.assert_failure();
    let out = cluster
        .flame(&["session", "task", &session, "100000"])
        .await;
    out.assert_failure();
    assert!(out.stderr.contains("has no task 100000"), "{out}");

    // Without the failing input, unordered: every output once, exit 0.
    let good = write(
        dir.path(),
        "good",
        &lines((1..=INPUTS).filter(|&i| i != FAILING)),
    );
    let out = cluster
        .flame(&[
            "run",
            "py-upper",
            good.to_str().unwrap(),
            "--common-data",
            common,
            "--unordered",
        ])
        .await;
    out.assert_success();
    let printed: BTreeSet<&str> = out.stdout.lines().collect();
    let expected: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
    assert_eq!(printed, expected, "{out}");
    assert_eq!(out.stdout.lines().count(), INPUTS - 1, "{out}");

    // Binary inputs: one file each, outputs to files named after them; and the same
    // bytes length-framed through one file, with the outputs framed the same way.
    let inputs_dir = dir.path().join("in");
    std::fs::create_dir(&inputs_dir).unwrap();
    let binary: Vec<(String, Vec<u8>)> = (0..5)
        .map(|i| (format!("f{i}"), vec![b'a', b'\n', 0, b'b' + i as u8]))
        .collect();
    let mut framed = Vec::new();
    for (name, bytes) in &binary {
        std::fs::write(inputs_dir.join(name), bytes).unwrap();
        framed.extend((bytes.len() as u32).to_le_bytes());
        framed.extend(bytes);
    }
    let outputs_dir = dir.path().join("out");
    let out = cluster
        .flame(&[
            "run",
            "py-upper",
            "--input-dir",
            inputs_dir.to_str().unwrap(),
            "--output-dir",
            outputs_dir.to_str().unwrap(),
        ])
        .await;
    out.assert_success();
    let mut expected_framed = Vec::new();
    for (name, bytes) in &binary {
        let output = std::fs::read(outputs_dir.join(name)).unwrap();
        assert_eq!(output, bytes.to_ascii_uppercase(), "{name}");
        expected_framed.extend((output.len() as u32).to_le_bytes());
        expected_framed.extend(output);
    }
    let framed_file = dir.path().join("framed");
    std::fs::write(&framed_file, &framed).unwrap();
    let mut command = flame_tests::cluster::flame_command();
    command
        .arg("--head")
        .arg(cluster.head_addr())
        .arg("--ca-file")
        .arg(cluster.ca_file())
        .arg("--token-file")
        .arg(cluster.admin_token_file())
        .args(["run", "py-upper", "--framing", "length"])
        .arg(&framed_file);
    let output = tokio::time::timeout(COMMAND_TIMEOUT, command.output())
        .await
        .unwrap()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(output.stdout, expected_framed);

    // An application that is not registered: a clear error, nothing run.
    let out = cluster.flame(&["run", "no-such-app", file]).await;
    out.assert_failure();
    assert!(out.stderr.contains("flame app list"), "{out}");
}

/// Ctrl-C cancels the session: the command exits 130 and no task of its session is left
/// pending or running.
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_cancels_the_run_and_exits_130() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let client = cluster.client().await;
    client
        .register_application(test_service::spec("sleeper"))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "inputs", &"sleep 300000\n".repeat(3));
    let mut command = flame_tests::cluster::flame_command();
    command
        .arg("--head")
        .arg(cluster.head_addr())
        .arg("--ca-file")
        .arg(cluster.ca_file())
        .arg("--token-file")
        .arg(cluster.admin_token_file())
        .args(["run", "sleeper"])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let line = describe(&command);
    let mut child = command.spawn().unwrap();

    // Wait until a task of the run's session runs.
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    let session: SessionInfo = loop {
        let sessions = client.list_sessions().await.unwrap();
        if let Some(s) = sessions
            .into_iter()
            .find(|s| s.application == "sleeper" && s.counts.running > 0)
        {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no task of `{line}` ran within {EVENT_TIMEOUT:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(POLL_PAUSE).await;
    };
    let pid = child.id().expect("flame exited early");
    signal::kill(Pid::from_raw(pid as i32), Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(COMMAND_TIMEOUT, child.wait())
        .await
        .unwrap_or_else(|_| panic!("`{line}` did not exit after Ctrl-C"))
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "`{line}` exited with {status}; stderr:\n{stderr}"
    );
    assert!(stderr.contains("stopped by interrupt"), "{stderr}");
    assert!(
        stderr.contains(&format!("session {} was cancelled", session.id)),
        "{stderr}"
    );

    // The cancel answered once it was made; every task is final.
    let info = client.get_session(session.id).await.unwrap();
    assert_eq!(info.counts.unfinished(), 0, "{info:?}");
    assert_eq!(info.counts.cancelled, 3, "{info:?}");
    assert!(info.is_finished(), "{info:?}");
    client.close().await;
}
