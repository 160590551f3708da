//! The I/O shell of an executor whose application speaks the shim protocol (stdio or a
//! Unix socket): it starts the process, waits for it to say ready, and then does what the
//! pure window ([`Pipeline`]) says: takes the head's commands, writes tasks ahead, reads
//! answers in order, applies binds, unbinds and releases once the tasks before them are
//! answered, and ends the executor when a task runs past its timeout.
//!
//! Cancel safety: the loop waits on several things at once; every branch is cancel-safe
//! (a command not taken stays queued, the shim's read keeps a partial frame, the process's
//! wait and the deadline can be asked again), so whichever wins, nothing is lost.

use super::objects::NodeObjects;
use super::prepared::{environment, tail_text, Prepared};
use super::{LaunchSpec, Report, Reports, Settings, ENTER_LEAVE_TIMEOUT, EXIT_GRACE};
use crate::cgroup::ExecutorCgroup;
use crate::launcher::{ProcessSpec, StdioMode};
use crate::lifecycle::Phase;
use crate::logs::LogSink;
use crate::pipeline::{Command, Held, Pipeline, Step};
use bytes::Bytes;
use flame_protocol::messages::ExecutorEvent;
use flame_protocol::model::{ShimKind, TaskAssignment, TaskOutcome};
use flame_protocol::object::{ObjectSources, Payload};
use flame_protocol::{limits, ExecutorId, SessionId, TaskId};
use flame_shims::node::{AppMessage, Invocation, NodeShim};
use flame_shims::unix::connect_when_listening;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

/// The application's end of the shim: its stdio pipes, or the socket it listens on.
type ShimReader = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
type ShimWriter = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

/// What ended one wait of an executor's loop.
enum Event {
    Command(Command),
    Message(Result<AppMessage, flame_shims::ShimError>),
    /// An object input was resolved (its task's session, id and attempt, and its bytes or
    /// why not).
    Resolved(Result<Resolved, tokio::task::JoinError>),
    /// The application's process ended while it had no task in flight (idle, or bound
    /// between tasks): noticed at once, so its capacity is freed and no task is sent to it.
    Exited(std::io::Result<std::process::ExitStatus>),
    /// The oldest task in flight ran past its timeout.
    TimedOut,
}

/// A resolved task input: the task's session, id and attempt, and its bytes or why not.
type Resolved = (SessionId, TaskId, u32, Result<Bytes, String>);

/// What one executor's loop keeps besides its process and window.
struct Run<'a> {
    id: ExecutorId,
    /// The owner whose objects its tasks read and write.
    owner: &'a str,
    objects: Option<&'a Arc<NodeObjects>>,
    reports: &'a Reports,
    /// Object inputs being resolved, concurrently with the tasks before them; dropped
    /// (aborted) with the executor.
    resolving: JoinSet<Resolved>,
}

/// Runs the executor's process to the end; returns why it ended.
pub(super) async fn drive(
    settings: &Settings,
    spec: &LaunchSpec,
    prepared: &mut Prepared,
    mut commands: mpsc::Receiver<Command>,
    mut kill: oneshot::Receiver<()>,
    reports: &Reports,
) -> String {
    let id = spec.executor;
    let mut app = match App::start(settings, spec, prepared, &mut kill).await {
        Ok(app) => app,
        Err(reason) => return reason,
    };
    let task_timeout = spec.application.task_timeout_ms.map(Duration::from_millis);
    let mut pipeline = Pipeline::new(task_timeout, Instant::now());
    pipeline.ready();
    reports
        .send(Report::Event(ExecutorEvent::Ready {
            executor: id,
            credit: settings.credit,
        }))
        .await;
    let mut run = Run {
        id,
        owner: &spec.owner.name,
        objects: settings.objects.as_ref(),
        reports,
        resolving: JoinSet::new(),
    };
    loop {
        let wait = match pipeline.step(Instant::now()) {
            Step::Write {
                session,
                task,
                input,
            } => {
                if let Err(e) = app.shim.queue_invoke(task.0, &input) {
                    let why = format!("task {task} of session {session} broke the executor: {e}");
                    return app.fail(why).await;
                }
                continue;
            }
            // Not the executor's failure: the task's input is not to be had.
            Step::Fail(a, why) => {
                reports.result(id, &a, TaskOutcome::Failed(why), None).await;
                continue;
            }
            Step::Apply(Held::Release) => return app.release().await,
            Step::Apply(held) => {
                if let Err(reason) = run
                    .apply(held, &mut app, &mut pipeline, prepared, &mut kill)
                    .await
                {
                    return reason;
                }
                continue;
            }
            Step::Wait(wait) => wait,
        };
        let deadline = async {
            match wait.deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        // Commands first: every task that is ready joins the window before the shim
        // writes, so a window goes out in one write.
        let event = tokio::select! {
            biased;
            _ = &mut kill => return app.fail("killed by the node".into()).await,
            c = commands.recv(), if wait.commands => match c {
                Some(c) => Event::Command(c),
                None => return app.fail("the node lost its head connection".into()).await,
            },
            Some(r) = run.resolving.join_next(), if wait.inputs => Event::Resolved(r),
            m = app.shim.next_message(), if wait.answers => Event::Message(m),
            status = app.child.wait(), if wait.exit => Event::Exited(status),
            () = deadline => Event::TimedOut,
        };
        if let Err(reason) = run
            .handle(event, &mut app, &mut pipeline, task_timeout)
            .await
        {
            return reason;
        }
    }
}

impl Run<'_> {
    /// Applies a held bind or unbind (a release ends the loop instead); `Err`: the
    /// executor ended, and why.
    async fn apply(
        &mut self,
        held: Held,
        app: &mut App,
        pipeline: &mut Pipeline,
        prepared: &mut Prepared,
        kill: &mut oneshot::Receiver<()>,
    ) -> Result<(), String> {
        match held {
            Held::Bind {
                session,
                common_data,
                sources,
            } => {
                // Nothing runs while the common data is resolved: the bind holds the intake.
                let resolved = tokio::select! {
                    r = self.common_data(session, &common_data, sources.as_deref()) => r,
                    _ = kill => return Err(app.fail("killed by the node".into()).await),
                };
                let data = match resolved {
                    Ok(data) => data,
                    Err(why) => {
                        let why = format!("cannot enter session {session}: {why}");
                        return Err(app.fail(why).await);
                    }
                };
                app.enter(session, &data).await?;
                pipeline.entered();
                prepared.enter_session();
                let bound = ExecutorEvent::Bound {
                    executor: self.id,
                    session,
                };
                self.reports.send(Report::Event(bound)).await;
            }
            Held::Unbind => {
                app.leave().await?;
                pipeline.left();
                let usage = prepared.leave_session();
                let unbound = ExecutorEvent::Unbound {
                    executor: self.id,
                    usage,
                };
                self.reports.send(Report::Event(unbound)).await;
            }
            Held::Release => {}
        }
        Ok(())
    }

    /// A session's common data, resolved like a task's input.
    async fn common_data(
        &self,
        session: SessionId,
        common_data: &Payload,
        sources: Option<&ObjectSources>,
    ) -> Result<Bytes, String> {
        match (common_data, self.objects) {
            (Payload::Inline(bytes), _) => Ok(bytes.clone()),
            (Payload::Object(object), None) => Err(format!(
                "its common data is object {}, and this node's object service is off",
                object.id
            )),
            (payload, Some(objects)) => {
                objects.resolve(self.owner, session, payload, sources).await
            }
        }
    }

    /// Starts resolving a taken task's object input, concurrently; inline inputs need
    /// nothing.
    fn start_resolving(&mut self, a: &TaskAssignment) {
        let Some(object) = a.input.object() else {
            return;
        };
        let key = (a.session, a.task, a.attempt);
        let Some(objects) = self.objects.cloned() else {
            let why = format!(
                "its input is object {}, and this node's object service is off",
                object.id
            );
            self.resolving
                .spawn(async move { (key.0, key.1, key.2, Err(why)) });
            return;
        };
        let owner = self.owner.to_string();
        let input = a.input.clone();
        let sources = a.sources.clone();
        self.resolving.spawn(async move {
            let bytes = objects
                .resolve(&owner, key.0, &input, sources.as_ref())
                .await;
            (key.0, key.1, key.2, bytes)
        });
    }

    /// Handles what ended a wait; `Err`: the executor ended, and why.
    async fn handle(
        &mut self,
        event: Event,
        app: &mut App,
        pipeline: &mut Pipeline,
        task_timeout: Option<Duration>,
    ) -> Result<(), String> {
        match event {
            Event::Command(c) => match pipeline.command(c, Instant::now()) {
                Ok(None) => {}
                Ok(Some(a)) => self.start_resolving(a),
                // The head and this node disagree; the head re-queues what ran here.
                Err(e) => return Err(app.fail(format!("protocol error: {e}")).await),
            },
            Event::Resolved(Ok((session, task, attempt, input))) => {
                pipeline.resolved(session, task, attempt, input);
            }
            Event::Resolved(Err(e)) => {
                let why = format!("resolving a task's object input failed: {e}");
                return Err(app.fail(why).await);
            }
            Event::Message(m) => {
                let Some(a) = pipeline.answered(Instant::now()) else {
                    return Ok(());
                };
                let outcome = match m.and_then(|m| app.shim.expect_result(a.task.0, m)) {
                    Ok(Invocation::Succeeded(out)) => match self.objects {
                        Some(objects) => objects.output(self.owner, a.session, out).await,
                        None => TaskOutcome::Succeeded(out),
                    },
                    Ok(Invocation::Failed(msg)) => TaskOutcome::Failed(msg),
                    Err(e) => {
                        let why = format!(
                            "task {} of session {} broke the executor: {e}",
                            a.task, a.session
                        );
                        return Err(app.fail(why).await);
                    }
                };
                self.reports.result(self.id, &a, outcome, None).await;
            }
            Event::Exited(status) => {
                // Give the stderr reader a moment to take the last lines.
                tokio::task::yield_now().await;
                let status = match status {
                    Ok(s) => s.to_string(),
                    Err(e) => format!("its status could not be read: {e}"),
                };
                let when = match pipeline.phase() {
                    Phase::Bound(_) => "between tasks",
                    _ => "while idle",
                };
                return Err(format!(
                    "the application exited {when} ({status}){}",
                    tail_text(&app.log)
                ));
            }
            Event::TimedOut => {
                let task = pipeline.oldest().map_or_else(String::new, |a| {
                    format!("task {} of session {} ", a.task, a.session)
                });
                let why = format!(
                    "{task}ran past its timeout of {:?}",
                    task_timeout.unwrap_or_default()
                );
                return Err(app.fail(why).await);
            }
        }
        Ok(())
    }
}

/// The application's process and its end of the shim, once it said ready.
struct App {
    child: Child,
    shim: NodeShim<ShimReader, ShimWriter>,
    log: LogSink,
}

impl App {
    /// Starts the process in the executor's cgroup, as its user, connects the shim (its
    /// stdio, or the socket it listens on) and waits for it to say ready; or why not.
    async fn start(
        settings: &Settings,
        spec: &LaunchSpec,
        prepared: &Prepared,
        kill: &mut oneshot::Receiver<()>,
    ) -> Result<App, String> {
        let app = &spec.application;
        let unix = app.shim == ShimKind::Unix;
        let process = ProcessSpec {
            program: app.command.clone(),
            args: app.args.clone(),
            env: environment(settings, spec, prepared),
            working_dir: app
                .working_dir
                .as_ref()
                .map_or_else(|| prepared.work_dir.path().to_path_buf(), PathBuf::from),
            credentials: prepared.credentials.clone(),
            cgroup: match prepared.cgroup.as_ref().map(ExecutorCgroup::procs_files) {
                None => None,
                Some(Ok(join)) => Some(join),
                Some(Err(e)) => return Err(format!("cannot join the executor's cgroup: {e}")),
            },
            stdin: if unix {
                StdioMode::Null
            } else {
                StdioMode::Piped
            },
            stdout: StdioMode::Piped,
            stderr: StdioMode::Piped,
        };
        let mut child = settings
            .launcher
            .launch(process)
            .map_err(|e| e.to_string())?;
        let log = prepared.log.clone();
        if let Some(stderr) = child.stderr.take() {
            log.spawn_copy(stderr, "stderr");
        }
        let (reader, writer): (ShimReader, ShimWriter) = if unix {
            if let Some(stdout) = child.stdout.take() {
                log.spawn_copy(stdout, "stdout");
            }
            let Some(socket) = prepared
                .socket_dir
                .as_ref()
                .map(|d| d.socket_path().to_path_buf())
            else {
                return Err("the unix shim has no socket directory".to_string());
            };
            let connected = tokio::select! {
                c = connect_when_listening(&socket, settings.start_timeout, child.wait()) => c.map_err(|e| e.to_string()),
                _ = kill => Err("killed by the node".to_string()),
            };
            match connected {
                Ok(stream) => {
                    let (r, w) = stream.into_split();
                    (Box::new(r), Box::new(w))
                }
                Err(e) => {
                    let why = format!("the application failed to start: {e}");
                    return Err(kill_and_explain(&mut child, &log, why).await);
                }
            }
        } else {
            match (child.stdin.take(), child.stdout.take()) {
                (Some(stdin), Some(stdout)) => (Box::new(stdout), Box::new(stdin)),
                _ => return Err("the process has no stdio pipes".to_string()),
            }
        };
        let mut app = App {
            child,
            shim: NodeShim::new(reader, writer, limits::FRAME_BYTES_MAX),
            log,
        };
        let start_timeout = settings.start_timeout;
        let why = match tokio::time::timeout(start_timeout, app.shim.wait_ready()).await {
            Ok(Ok(())) => return Ok(app),
            Ok(Err(e)) => format!("the application failed to start: {e}"),
            Err(_) => format!(
                "the application did not say ready within {} (flame-node --start-timeout)",
                humantime::format_duration(start_timeout)
            ),
        };
        Err(app.fail(why).await)
    }

    /// Ends the application (killed, after [`EXIT_GRACE`] at most) and says why, with its
    /// exit status and last lines.
    async fn fail(&mut self, why: String) -> String {
        kill_and_explain(&mut self.child, &self.log, why).await
    }

    /// Enters `session` (a held bind); `Err`: the executor ended, and why.
    async fn enter(&mut self, session: SessionId, common_data: &[u8]) -> Result<(), String> {
        // What it writes from here on is this session's (`flame logs`).
        self.log.enter(session.0).await;
        let entered = self.shim.enter(session.0, common_data);
        let why = match tokio::time::timeout(ENTER_LEAVE_TIMEOUT, entered).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => format!("entering session {session} failed: {e}"),
            Err(_) => format!("entering session {session} took over {ENTER_LEAVE_TIMEOUT:?}"),
        };
        Err(self.fail(why).await)
    }

    /// Leaves the session (a held unbind); `Err`: the executor ended, and why.
    async fn leave(&mut self) -> Result<(), String> {
        let why = match tokio::time::timeout(ENTER_LEAVE_TIMEOUT, self.shim.leave()).await {
            Ok(Ok(())) => {
                // Its output until the next session is nobody's.
                self.log.leave().await;
                return Ok(());
            }
            Ok(Err(e)) => format!("leaving the session failed: {e}"),
            Err(_) => format!("leaving the session took over {ENTER_LEAVE_TIMEOUT:?}"),
        };
        Err(self.fail(why).await)
    }

    /// Closes the application's input and gives it [`EXIT_GRACE`] to exit; says how it
    /// ended.
    async fn release(self) -> String {
        let App {
            mut child,
            shim,
            log,
        } = self;
        shim.shutdown().await;
        match tokio::time::timeout(EXIT_GRACE, child.wait()).await {
            Ok(Ok(status)) if status.success() => "released".to_string(),
            Ok(Ok(status)) => format!("released; exited with {status}{}", tail_text(&log)),
            Ok(Err(e)) => format!("released; wait failed: {e}"),
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                format!("released; killed after not exiting within {EXIT_GRACE:?}")
            }
        }
    }
}

/// Kills the process (waiting [`EXIT_GRACE`] at most for it to go) and returns `why` with
/// its exit status and last output lines.
async fn kill_and_explain(child: &mut Child, log: &LogSink, why: String) -> String {
    let _ = child.start_kill();
    let _ = tokio::time::timeout(EXIT_GRACE, child.wait()).await;
    let status = child.try_wait().ok().flatten();
    // Give the stderr reader a moment to take the last lines.
    tokio::task::yield_now().await;
    let status = status.map_or(String::new(), |s| format!(" ({s})"));
    format!("{why}{status}{}", tail_text(log))
}
