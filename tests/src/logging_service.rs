//! What the `flame logs` tests share: a Python service that writes each task's text to
//! its stderr, and `flame logs --follow` run as a child whose lines the test reads as they
//! come.

use crate::cluster::flame_command;
use crate::command::describe;
use crate::Cluster;
use flame_protocol::model::{ApplicationSpec, EnvValue, ShimKind};
use flame_protocol::ExecutorId;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::sync::mpsc;

/// A Python service whose task `log:TEXT` writes `TEXT from EXECUTOR` to stderr (after
/// `sleep:SECONDS`, if the input starts with it) and returns the same line; `crash:TEXT`
/// writes `TEXT` to stderr and exits with status 3. `argv[1]` is the folder of the
/// one-file helper.
pub const SERVICE: &str = r#"
import os, sys, time
sys.path.insert(0, sys.argv[1])
import flame_service

class Logging(flame_service.Service):
    def invoke(self, session_id, task_id, input):
        text = input.decode("utf-8")
        if text.startswith("crash:"):
            sys.stderr.write(text[len("crash:"):] + "\n")
            sys.stderr.flush()
            os._exit(3)
        if text.startswith("sleep:"):
            seconds, text = text[len("sleep:"):].split(" ", 1)
            time.sleep(float(seconds))
        line = text[len("log:"):] + " from " + os.environ["FLAME_EXECUTOR_ID"]
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
        return line.encode("utf-8")

flame_service.run(Logging())
"#;

/// Lines of `flame logs --follow` read ahead of the test; past it the reader waits (and the
/// pipe holds `flame` back).
pub const FOLLOW_LINES_BUFFERED_MAX: usize = 1024;
/// Bound on a line showing up in `flame logs --follow`.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on `flame logs --follow` ending once the session's executors are released.
pub const FOLLOW_END_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the head noticing a killed node (its heartbeat timeout is 10 s).
pub const LOST_NODE_TIMEOUT: Duration = Duration::from_secs(30);

pub fn spec(name: &str) -> ApplicationSpec {
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
pub fn executor_of(output: &str) -> ExecutorId {
    output
        .rsplit_once(" from ")
        .and_then(|(_, id)| id.parse().ok())
        .unwrap_or_else(|| panic!("no executor id in `{output}`"))
}

/// `flame logs --follow` running as a child, its stdout lines passed on as they come.
#[derive(Debug)]
pub struct Follower {
    child: tokio::process::Child,
    command: String,
    lines: mpsc::Receiver<String>,
    /// Every line it printed so far.
    pub seen: Vec<String>,
}

impl Follower {
    /// `flame logs SESSION --follow` as the admin.
    pub fn start(cluster: &Cluster, session: &str) -> Follower {
        Follower::start_as(cluster, session, &cluster.admin_token_file())
    }

    /// `flame logs SESSION --follow` as the user whose token is in `token_file`.
    pub fn start_as(cluster: &Cluster, session: &str, token_file: &Path) -> Follower {
        let mut command = flame_command();
        command
            .arg("--head")
            .arg(cluster.head_addr())
            .arg("--ca-file")
            .arg(cluster.ca_file())
            .arg("--token-file")
            .arg(token_file)
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
        let (tx, lines) = mpsc::channel(FOLLOW_LINES_BUFFERED_MAX);
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if tx.send(line).await.is_err() {
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
    pub async fn wait_line(&mut self, suffix: &str, cluster: &Cluster) -> String {
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
    pub fn interrupt(&self) {
        let pid = self.child.id().expect("the follower already exited");
        signal::kill(Pid::from_raw(pid as i32), Signal::SIGINT).unwrap();
    }

    /// Waits, at most [`FOLLOW_END_TIMEOUT`], for the command to exit 0; returns every line
    /// it printed.
    pub async fn wait_success(mut self, cluster: &Cluster) -> Vec<String> {
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
        // Its stdout ended with it: the rest of the lines are there already.
        while let Ok(Some(line)) = tokio::time::timeout(LINE_TIMEOUT, self.lines.recv()).await {
            self.seen.push(line);
        }
        self.seen
    }
}
