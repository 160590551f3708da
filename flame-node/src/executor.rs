//! One executor: an application process driven through the stdio shim.
//!
//! Each executor is a task that owns its process and applies commands in the order the
//! head sent them, so a task queued behind the one running waits here on the node
//! (pipelining), and an unbind takes effect after the tasks sent before it.

use crate::lifecycle::{Input, Phase};
use bytes::Bytes;
use flame_protocol::messages::{ExecutorEvent, NodeTaskResult};
use flame_protocol::model::{ApplicationSpec, TaskAssignment, TaskOutcome};
use flame_protocol::{limits, ExecutorId, SessionId};
use flame_shims::node::{Invocation, NodeShim};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, oneshot};

/// How long an application may take to say ready after it starts.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an application may take to enter or leave a session.
pub const ENTER_LEAVE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a released application has to exit after its stdin closes.
pub const EXIT_GRACE: Duration = Duration::from_secs(5);
/// Lines of an application's stderr kept to explain its failure.
pub const STDERR_TAIL_LINES: usize = 20;

/// A command for one executor, in head order.
#[derive(Debug)]
pub enum Command {
    Bind {
        session: SessionId,
        common_data: Bytes,
    },
    Run(TaskAssignment),
    Unbind,
    Release,
}

/// What executors report, merged by the link into batched frames.
#[derive(Debug)]
pub enum Report {
    Event(ExecutorEvent),
    Result(NodeTaskResult),
}

/// Everything an executor needs to start.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub executor: ExecutorId,
    pub application: ApplicationSpec,
    pub node_name: String,
    pub work_dir: PathBuf,
    pub credit: u32,
}

/// The node's handle on a running executor.
#[derive(Debug)]
pub struct Handle {
    pub commands: mpsc::UnboundedSender<Command>,
    /// Held, never fired: dropping the handle kills the process at once.
    pub _kill: oneshot::Sender<()>,
}

/// Starts an executor task. It reports `Ready`, results and finally `Exited` on `reports`,
/// and sends its id on `gone` when it has finished.
pub fn spawn(
    spec: LaunchSpec,
    reports: mpsc::UnboundedSender<Report>,
    gone: mpsc::UnboundedSender<ExecutorId>,
) -> Handle {
    let (commands, rx) = mpsc::unbounded_channel();
    let (kill, kill_rx) = oneshot::channel();
    tokio::spawn(async move {
        let id = spec.executor;
        let reason = drive(spec, rx, kill_rx, &reports).await;
        let _ = reports.send(Report::Event(ExecutorEvent::Exited {
            executor: id,
            reason,
        }));
        let _ = gone.send(id);
    });
    Handle {
        commands,
        _kill: kill,
    }
}

type Tail = Arc<Mutex<VecDeque<String>>>;

fn tail_text(tail: &Tail) -> String {
    let lines = tail
        .lock()
        .map(|t| t.iter().cloned().collect::<Vec<_>>())
        .unwrap_or_default();
    if lines.is_empty() {
        String::new()
    } else {
        format!("; last stderr lines:\n{}", lines.join("\n"))
    }
}

/// Runs the executor to the end; returns why it ended.
async fn drive(
    spec: LaunchSpec,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut kill: oneshot::Receiver<()>,
    reports: &mpsc::UnboundedSender<Report>,
) -> String {
    let id = spec.executor;
    let app = &spec.application;
    let mut cmd = tokio::process::Command::new(&app.command);
    cmd.args(&app.args)
        .envs(&app.env)
        .env("FLAME_EXECUTOR_ID", id.to_string())
        .env("FLAME_NODE", &spec.node_name)
        .env("FLAME_APPLICATION", &app.name)
        .current_dir(
            app.working_dir
                .as_ref()
                .map_or(spec.work_dir.clone(), PathBuf::from),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl,
    // which is async-signal-safe; it allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(|| {
            // Die with the node agent, so no executor outlives it.
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return format!("cannot start `{}`: {e}", app.command),
    };
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return "the process has no stdio pipes".to_string();
    };
    let tail: Tail = Arc::new(Mutex::new(VecDeque::with_capacity(STDERR_TAIL_LINES)));
    let tail_writer = tail.clone();
    let app_name = app.name.clone();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            tracing::debug!(executor = %id, app = %app_name, "{line}");
            if let Ok(mut t) = tail_writer.lock() {
                if t.len() == STDERR_TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(line);
            }
        }
    });
    let mut shim = NodeShim::new(stdout, stdin, limits::FRAME_BYTES_MAX);
    let task_timeout = app.task_timeout_ms.map(Duration::from_millis);
    let mut phase = Phase::Void;

    macro_rules! fail {
        ($($arg:tt)*) => {{
            let _ = child.start_kill();
            let _ = tokio::time::timeout(EXIT_GRACE, child.wait()).await;
            let status = child.try_wait().ok().flatten();
            // Give the stderr reader a moment to take the last lines.
            tokio::task::yield_now().await;
            let status = status.map_or(String::new(), |s| format!(" ({s})"));
            return format!("{}{}{}", format!($($arg)*), status, tail_text(&tail));
        }};
    }

    match tokio::time::timeout(START_TIMEOUT, shim.wait_ready()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => fail!("the application failed to start: {e}"),
        Err(_) => fail!("the application did not say ready within {START_TIMEOUT:?}"),
    }
    phase = phase.next(Input::AppReady).unwrap_or(phase);
    let _ = reports.send(Report::Event(ExecutorEvent::Ready {
        executor: id,
        credit: spec.credit,
    }));

    loop {
        let command = tokio::select! {
            c = commands.recv() => match c {
                Some(c) => c,
                None => fail!("the node lost its head connection"),
            },
            _ = &mut kill => fail!("killed by the node"),
        };
        let input = match &command {
            Command::Bind { session, .. } => Input::Bind(*session),
            Command::Run(a) => Input::Run(a.session),
            Command::Unbind => Input::Unbind,
            Command::Release => Input::Release,
        };
        phase = match phase.next(input) {
            Ok(p) => p,
            Err(e) => {
                // The head and this node disagree; the head re-queues what ran here.
                fail!("protocol error: {e}")
            }
        };
        match command {
            Command::Bind {
                session,
                common_data,
            } => {
                match tokio::time::timeout(ENTER_LEAVE_TIMEOUT, shim.enter(session.0, &common_data))
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => fail!("entering session {session} failed: {e}"),
                    Err(_) => fail!("entering session {session} took over {ENTER_LEAVE_TIMEOUT:?}"),
                }
                phase = phase.next(Input::Entered).unwrap_or(phase);
                let _ = reports.send(Report::Event(ExecutorEvent::Bound {
                    executor: id,
                    session,
                }));
            }
            Command::Run(a) => {
                // A task past the application's timeout means a hung executor: killed, and
                // the head retries the task like after a crash.
                let deadline = async {
                    match task_timeout {
                        Some(t) => tokio::time::sleep(t).await,
                        None => std::future::pending().await,
                    }
                };
                let outcome = tokio::select! {
                    r = shim.invoke(a.task.0, &a.input) => match r {
                        Ok(Invocation::Succeeded(out)) => TaskOutcome::Succeeded(out),
                        Ok(Invocation::Failed(msg)) => TaskOutcome::Failed(msg),
                        Err(e) => fail!("task {} of session {} broke the executor: {e}", a.task, a.session),
                    },
                    _ = &mut kill => fail!("killed by the node"),
                    () = deadline => fail!(
                        "task {} of session {} ran past its timeout of {:?}",
                        a.task, a.session, task_timeout.unwrap_or_default()
                    ),
                };
                let _ = reports.send(Report::Result(NodeTaskResult {
                    executor: id,
                    session: a.session,
                    task: a.task,
                    attempt: a.attempt,
                    outcome,
                }));
            }
            Command::Unbind => {
                match tokio::time::timeout(ENTER_LEAVE_TIMEOUT, shim.leave()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => fail!("leaving the session failed: {e}"),
                    Err(_) => fail!("leaving the session took over {ENTER_LEAVE_TIMEOUT:?}"),
                }
                phase = phase.next(Input::Left).unwrap_or(phase);
                let _ = reports.send(Report::Event(ExecutorEvent::Unbound { executor: id }));
            }
            Command::Release => {
                shim.shutdown().await;
                return match tokio::time::timeout(EXIT_GRACE, child.wait()).await {
                    Ok(Ok(status)) if status.success() => "released".to_string(),
                    Ok(Ok(status)) => format!("released; exited with {status}{}", tail_text(&tail)),
                    Ok(Err(e)) => format!("released; wait failed: {e}"),
                    Err(_) => {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                        format!("released; killed after not exiting within {EXIT_GRACE:?}")
                    }
                };
            }
        }
    }
}
