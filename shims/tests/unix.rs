//! The Unix-socket shim end to end, with real processes: the node's
//! [`connect_when_listening`] and [`NodeShim`] against the Rust service side
//! ([`flame_shims::service::run`], in a child process) and the Python helper, directly and
//! through `flame-shim-check --shim unix`; and the ways setting up the socket fails.

// Helpers outside #[test] functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flame_protocol::shim::SHIM_FRAME_BYTES_MAX;
use flame_shims::node::{Invocation, NodeShim};
use flame_shims::service::{run, run_unix, Service, SessionContext, TaskContext};
use flame_shims::unix::{connect_when_listening, SocketDir, ENV_SHIM_SOCKET};
use flame_shims::ShimError;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const CHECK: &str = env!("CARGO_BIN_EXE_flame-shim-check");
const PING: &str = env!("CARGO_BIN_EXE_flame-ping");

/// Bound on every wait in these tests; generous, since nothing here should take long.
const WAIT: Duration = Duration::from_secs(10);

/// Set in the environment of this test binary when it is re-run as a service process.
const ENV_SERVICE_PROCESS: &str = "FLAME_SHIMS_TEST_SERVICE_PROCESS";

/// Answers `"<session>:<common data>:<task>:<input>"` and prints a line on stdout per task
/// (stdout is free under the Unix shim); fails inputs starting with `!`; refuses sessions
/// whose common data is `refuse`.
struct Tagger {
    common_data: Vec<u8>,
}

impl Service for Tagger {
    fn enter_session(&mut self, ctx: &SessionContext) -> Result<(), String> {
        if &ctx.common_data[..] == b"refuse" {
            return Err("refused".into());
        }
        self.common_data = ctx.common_data.to_vec();
        Ok(())
    }

    fn invoke(&mut self, ctx: &TaskContext, input: &[u8]) -> Result<Vec<u8>, String> {
        println!("stdout is free: task {}", ctx.task_id);
        if input.starts_with(b"!") {
            return Err("bang".into());
        }
        let mut out = format!("{}:", ctx.session_id).into_bytes();
        out.extend_from_slice(&self.common_data);
        out.extend_from_slice(format!(":{}:", ctx.task_id).as_bytes());
        out.extend_from_slice(input);
        Ok(out)
    }
}

/// Not a test of its own: when this binary is started with [`ENV_SERVICE_PROCESS`] set, this
/// is the service process's `main` (a Rust application on `flame_shims::service::run`, which
/// picks the socket from `FLAME_SHIM_SOCKET`). Run normally, it does nothing.
#[test]
fn service_process() {
    if std::env::var_os(ENV_SERVICE_PROCESS).is_none() {
        return;
    }
    let code = match run(Tagger {
        common_data: Vec::new(),
    }) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("service process: error: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// This test binary, re-run as the [`service_process`] Rust application.
fn rust_service(socket: &Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "service_process",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(ENV_SERVICE_PROCESS, "1")
        .env(ENV_SHIM_SOCKET, socket);
    command
}

/// The Python interpreter, or `None` (with a loud note) where there is none. Under CI=true a
/// missing interpreter fails the test instead: the Python helper must be tested there.
fn python3() -> Option<&'static str> {
    match Command::new("python3").arg("--version").output() {
        Ok(out) if out.status.success() => Some("python3"),
        other => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "python3 is required when CI=true, but running it gave {other:?}"
            );
            eprintln!("SKIPPED: python3 not found; set CI=true to make this a failure");
            None
        }
    }
}

fn python_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// A Python service like [`Tagger`], on the helper, written into `dir`.
fn python_tagger(dir: &Path) -> PathBuf {
    let script = dir.join("tagger.py");
    std::fs::write(
        &script,
        format!(
            r#"
import sys
sys.path.insert(0, {helper:?})
import flame_service

class Tagger(flame_service.Service):
    def enter_session(self, session_id, common_data):
        if common_data == b"refuse":
            raise RuntimeError("refused")
        self.common_data = common_data

    def invoke(self, session_id, task_id, input):
        print("stdout is free: task %d" % task_id, flush=True)
        if input.startswith(b"!"):
            raise ValueError("bang")
        return b"%d:%s:%d:%s" % (session_id, self.common_data, task_id, input)

flame_service.run(Tagger())
"#,
            helper = python_dir().to_str().unwrap()
        ),
    )
    .unwrap();
    script
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {WAIT:?}"))
}

/// Plays the node against `command` over the Unix shim: ready, a session with several tasks
/// (one of them failing), leave, a refused session, and the end of the stream. Returns the
/// application's stdout.
async fn drive_over_unix(mut command: tokio::process::Command, dir: &SocketDir) -> String {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stream = connect_when_listening(dir.socket_path(), WAIT, child.wait())
        .await
        .unwrap();
    let socket_mode = std::fs::metadata(dir.socket_path()).unwrap().mode() & 0o7777;
    assert_eq!(socket_mode, 0o600);
    let (read, write) = stream.into_split();
    let mut shim = NodeShim::new(read, write, SHIM_FRAME_BYTES_MAX);
    within("ready", shim.wait_ready()).await.unwrap();
    within("enter", shim.enter(5, b"cd")).await.unwrap();
    assert_eq!(
        within("invoke", shim.invoke(1, b"a")).await.unwrap(),
        Invocation::Succeeded("5:cd:1:a".into())
    );
    assert_eq!(
        within("invoke", shim.invoke(2, b"!")).await.unwrap(),
        Invocation::Failed("bang".into())
    );
    let large = vec![7u8; 1 << 20];
    match within("invoke", shim.invoke(3, &large)).await.unwrap() {
        Invocation::Succeeded(out) => {
            assert!(out.starts_with(b"5:cd:3:") && out.ends_with(&large));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        within("invoke", shim.invoke(4, b"")).await.unwrap(),
        Invocation::Succeeded("5:cd:4:".into())
    );
    within("leave", shim.leave()).await.unwrap();
    match within("enter", shim.enter(6, b"refuse")).await {
        Err(ShimError::App(message)) => assert_eq!(message, "refused"),
        other => panic!("unexpected {other:?}"),
    }
    shim.shutdown().await;
    let output = within("exit", child.wait_with_output()).await.unwrap();
    assert!(output.status.success(), "{:?}", output.status);
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn rust_service_process_over_unix() {
    let runtime = tempfile::tempdir().unwrap();
    let dir = SocketDir::create(runtime.path(), 1, None).unwrap();
    assert_eq!(std::fs::metadata(dir.dir()).unwrap().mode() & 0o7777, 0o700);
    let stdout = drive_over_unix(rust_service(dir.socket_path()), &dir).await;
    for task in 1..=4 {
        assert!(
            stdout.contains(&format!("stdout is free: task {task}")),
            "{stdout}"
        );
    }
}

#[tokio::test]
async fn python_service_over_unix() {
    let Some(python) = python3() else { return };
    let scripts = tempfile::tempdir().unwrap();
    let script = python_tagger(scripts.path());
    let runtime = tempfile::tempdir().unwrap();
    let dir = SocketDir::create(runtime.path(), 2, None).unwrap();
    let mut command = tokio::process::Command::new(python);
    command.arg(&script).env(ENV_SHIM_SOCKET, dir.socket_path());
    let stdout = drive_over_unix(command, &dir).await;
    for task in 1..=4 {
        assert!(
            stdout.contains(&format!("stdout is free: task {task}")),
            "{stdout}"
        );
    }
}

fn check(args: &[&str]) -> Output {
    Command::new(CHECK).args(args).output().unwrap()
}

fn assert_all_passed(output: &Output) -> String {
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success()
            && !report.contains("FAIL")
            && report.starts_with("ok listen\n")
            && report.contains("ok exit-on-eof"),
        "checker failed: {:?}\nstdout:\n{report}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    report
}

#[test]
fn flame_ping_is_conformant_over_unix() {
    assert_all_passed(&check(&["--shim", "unix", "--ping", "--", PING]));
}

#[test]
fn python_helper_is_conformant_over_unix() {
    let Some(python) = python3() else { return };
    let scripts = tempfile::tempdir().unwrap();
    let script = python_tagger(scripts.path());
    let output = check(&["--shim", "unix", "--", python, script.to_str().unwrap()]);
    let report = assert_all_passed(&output);
    // Tagger's output names the session and task, so the checks ran over the socket.
    assert!(
        report.contains("ok invoke-session-2 (succeeded, 21 bytes)"),
        "{report}"
    );
    // The program's stdout went to the checker's stderr, not into its report.
    assert!(String::from_utf8_lossy(&output.stderr).contains("stdout is free: task 1"));
    // And the helper itself, run as a script, is the echo application.
    let echo = python_dir().join("flame_service.py");
    assert_all_passed(&check(&[
        "--shim",
        "unix",
        "--",
        python,
        echo.to_str().unwrap(),
    ]));
}

#[test]
fn checker_reports_a_program_that_exits_before_listening_at_once() {
    let started = Instant::now();
    let output = check(&[
        "--shim",
        "unix",
        "--timeout-secs",
        "30",
        "--",
        "sh",
        "-c",
        "exit 3",
    ]);
    let report = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        report.starts_with("FAIL listen: the application exited before listening on /"),
        "{report}"
    );
    assert!(started.elapsed() < WAIT, "took {:?}", started.elapsed());
}

#[test]
fn checker_names_the_socket_nobody_listened_on() {
    let output = check(&["--shim", "unix", "--timeout-secs", "1", "--", "sleep", "30"]);
    let report = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        report.starts_with("FAIL listen: the application did not listen on /")
            && report.contains("/shim.sock within 1s"),
        "{report}"
    );
}

#[tokio::test]
async fn an_app_that_exits_before_listening_fails_fast() {
    let runtime = tempfile::tempdir().unwrap();
    let dir = SocketDir::create(runtime.path(), 3, None).unwrap();
    let mut child = tokio::process::Command::new("sh")
        .args(["-c", "exit 3"])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let started = Instant::now();
    let error = connect_when_listening(dir.socket_path(), Duration::from_secs(60), child.wait())
        .await
        .unwrap_err();
    assert!(started.elapsed() < WAIT, "took {:?}", started.elapsed());
    match &error {
        ShimError::ExitedBeforeListening { path } => assert_eq!(path, dir.socket_path()),
        other => panic!("unexpected {other:?}"),
    }
    assert!(error
        .to_string()
        .contains(&dir.socket_path().display().to_string()));
}

#[tokio::test]
async fn an_app_that_never_listens_times_out_naming_the_path() {
    let runtime = tempfile::tempdir().unwrap();
    let dir = SocketDir::create(runtime.path(), 4, None).unwrap();
    let mut child = tokio::process::Command::new("sleep")
        .arg("30")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let error = connect_when_listening(dir.socket_path(), timeout, child.wait())
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert!(waited >= timeout && waited < WAIT, "waited {waited:?}");
    assert!(
        matches!(&error, ShimError::NotListening { path, timeout: t } if path == dir.socket_path() && *t == timeout),
        "{error:?}"
    );
    assert_eq!(
        error.to_string(),
        format!(
            "the application did not listen on {} within 300ms",
            dir.socket_path().display()
        )
    );
}

#[tokio::test]
async fn a_socket_bound_but_not_yet_listening_is_retried() {
    let Some(python) = python3() else { return };
    let runtime = tempfile::tempdir().unwrap();
    let dir = SocketDir::create(runtime.path(), 5, None).unwrap();
    // bind, then listen a while later: connections in between are refused (ECONNREFUSED).
    // The sleep stands in for a slow start-up; the test waits on the connection, not on it.
    let script = r#"
import os, socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(os.environ["FLAME_SHIM_SOCKET"])
time.sleep(0.3)
s.listen(1)
c, _ = s.accept()
c.sendall(b"\x01\x00\x00\x00\x81")
c.recv(1)
"#;
    let mut child = tokio::process::Command::new(python)
        .args(["-c", script])
        .env(ENV_SHIM_SOCKET, dir.socket_path())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stream = connect_when_listening(dir.socket_path(), WAIT, child.wait())
        .await
        .unwrap();
    let (read, write) = stream.into_split();
    let mut shim = NodeShim::new(read, write, SHIM_FRAME_BYTES_MAX);
    within("ready", shim.wait_ready()).await.unwrap();
    shim.shutdown().await;
    assert!(within("exit", child.wait()).await.unwrap().success());
}

#[test]
fn the_python_helper_gives_up_when_nobody_connects() {
    let Some(python) = python3() else { return };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("shim.sock");
    let script = format!(
        "import sys; sys.path.insert(0, {helper:?}); import flame_service; \
         flame_service.run_unix(flame_service._Echo(), {socket:?}, accept_timeout=0.2)",
        helper = python_dir().to_str().unwrap(),
        socket = socket.to_str().unwrap(),
    );
    let output = Command::new(python).args(["-c", &script]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("the node did not connect to {}", socket.display())),
        "{stderr}"
    );
    assert_eq!(std::fs::metadata(&socket).unwrap().mode() & 0o7777, 0o600);
}

#[test]
fn the_service_side_gives_up_when_nobody_connects() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("shim.sock");
    let started = Instant::now();
    let error = run_unix(
        Tagger {
            common_data: Vec::new(),
        },
        &socket,
        Duration::from_millis(200),
    )
    .unwrap_err();
    assert!(started.elapsed() < WAIT);
    assert!(
        matches!(&error, ShimError::NotConnected { path, .. } if path == &socket),
        "{error:?}"
    );
    assert!(error.to_string().contains(&socket.display().to_string()));
    // The socket was private while it waited.
    assert_eq!(std::fs::metadata(&socket).unwrap().mode() & 0o7777, 0o600);
    // A path already taken is a bind error naming it, not a hang.
    let error = run_unix(
        Tagger {
            common_data: Vec::new(),
        },
        &socket,
        WAIT,
    )
    .unwrap_err();
    assert!(
        matches!(&error, ShimError::Socket { path, .. } if path == &socket),
        "{error:?}"
    );
}
