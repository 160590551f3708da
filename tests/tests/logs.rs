//! `flame logs`: executors' stderr, captured on the node, read back through the head by the
//! `flame` command: a finished session's whole logs, one executor's alone, following a
//! running session until its executors are released, and the errors for an unknown session
//! or executor.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_protocol::model::{
    ApplicationSpec, EnvValue, NodeState, SessionSpec, ShimKind, TaskOutcome,
};
use flame_protocol::ExecutorId;
use flame_tests::cluster::flame_command;
use flame_tests::command::describe;
use flame_tests::results::run_tasks;
use flame_tests::test_service::{wait_session, ServiceSession};
use flame_tests::{prerequisites, Cluster, ClusterOptions};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::mpsc;

/// A Python service whose task `log:TEXT` writes `TEXT from EXECUTOR` to stderr (after
/// `sleep:SECONDS`, if the input starts with it) and returns the same line. `argv[1]` is
/// the folder of the one-file helper.
const SERVICE: &str = r#"
import os, sys, time
sys.path.insert(0, sys.argv[1])
import flame_service

class Logging(flame_service.Service):
    def invoke(self, session_id, task_id, input):
        text = input.decode("utf-8")
        if text.startswith("sleep:"):
            seconds, text = text[len("sleep:"):].split(" ", 1)
            time.sleep(float(seconds))
        line = text[len("log:"):] + " from " + os.environ["FLAME_EXECUTOR_ID"]
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        return line.encode("utf-8")

flame_service.run(Logging())
"#;

/// Bound on a line showing up in `flame logs --follow`.
const LINE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on `flame logs --follow` ending once the session's executors are released.
const FOLLOW_END_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the head noticing a killed node (its heartbeat timeout is 10 s).
const LOST_NODE_TIMEOUT: Duration = Duration::from_secs(30);

fn spec(name: &str) -> ApplicationSpec {
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shims/python");
    assert!(
        helper.join("flame_service.py").is_file(),
        "{} is missing",
        helper.display()
    );
    let mut spec = ApplicationSpec::new(name, "python3");
    spec.shim = ShimKind::Stdio;
    spec.args = vec![
        "-c".into(),
        SERVICE.into(),
        helper.canonicalize().unwrap().display().to_string(),
    ];
    spec.env = BTreeMap::from([("PYTHONDONTWRITEBYTECODE".into(), EnvValue::plain("1"))]);
    spec.max_instances = 2;
    // Released soon after their session ends, so that a follow ends soon too.
    spec.delay_release_ms = 200;
    spec
}

/// The executor a task's output names (`TEXT from ID`).
fn executor_of(output: &str) -> ExecutorId {
    output
        .rsplit_once(" from ")
        .and_then(|(_, id)| id.parse().ok())
        .unwrap_or_else(|| panic!("no executor id in `{output}`"))
}

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

/// `flame logs --follow` running as a child, its stdout lines passed on as they come.
struct Follower {
    child: tokio::process::Child,
    command: String,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
}

impl Follower {
    fn start(cluster: &Cluster, session: &str) -> Follower {
        let mut command = flame_command();
        command
            .arg("--head")
            .arg(cluster.head_addr())
            .arg("--ca-file")
            .arg(cluster.ca_file())
            .arg("--token-file")
            .arg(cluster.admin_token_file())
            .args(["logs", session, "--follow"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let line = describe(&command);
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Follower {
            child,
            command: line,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits, at most [`LINE_TIMEOUT`], for a line ending with `suffix`; returns it.
    async fn wait_line(&mut self, suffix: &str, cluster: &Cluster) -> String {
        let deadline = tokio::time::Instant::now() + LINE_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => {
                    self.seen.push(line.clone());
                    if line.ends_with(suffix) {
                        return line;
                    }
                }
                Ok(None) => panic!(
                    "`{}` ended before printing `…{suffix}`; it printed {:?}\n{}",
                    self.command,
                    self.seen,
                    cluster.logs()
                ),
                Err(_) => panic!(
                    "`{}` did not print `…{suffix}` within {LINE_TIMEOUT:?}; it printed {:?}\n{}",
                    self.command,
                    self.seen,
                    cluster.logs()
                ),
            }
        }
    }

    /// Sends the command `SIGINT`, as Ctrl-C does.
    fn interrupt(&self) {
        let pid = self.child.id().expect("the follower already exited");
        signal::kill(Pid::from_raw(pid as i32), Signal::SIGINT).unwrap();
    }

    /// Waits, at most [`FOLLOW_END_TIMEOUT`], for the command to exit 0.
    async fn wait_success(mut self, cluster: &Cluster) {
        let status = match tokio::time::timeout(FOLLOW_END_TIMEOUT, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!(
                "`{}` still follows {FOLLOW_END_TIMEOUT:?} after the session ended; it printed {:?}\n{}",
                self.command,
                self.seen,
                cluster.logs()
            ),
        };
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr).await;
        }
        assert!(
            status.success(),
            "`{}` exited with {status}; stderr:\n{stderr}",
            self.command
        );
    }
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
