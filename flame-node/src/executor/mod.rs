//! One executor: an application process driven through its shim (stdio or a Unix socket),
//! in its own cgroup, as its application's user.
//!
//! Each executor is a task that owns its process and applies commands in the order the
//! head sent them, so a task queued behind the one running waits here on the node
//! (pipelining), and an unbind takes effect after the tasks sent before it. When it ends,
//! for whatever reason, its whole cgroup is killed and removed with its directories, so no
//! process, socket or file of it outlives it.
//!
//! Rooms: this file starts an executor and ends it ([`spawn`]); [`identity`] picks who it
//! runs as; [`prepared`] sets up and tears down what it holds besides its process; [`shim`]
//! drives an application through its shim, over the pure window of [`crate::pipeline`];
//! [`rank`] drives a rank of a batch job instead; [`objects`] resolves object inputs and
//! keeps large outputs in the node's object cache.

mod identity;
pub mod objects;
mod prepared;
mod rank;
mod shim;

pub use crate::pipeline::Command;
pub use identity::IdentityMode;
pub use rank::status_code;

use crate::cgroup::CgroupTree;
use crate::launcher::Launcher;
use crate::logs::LogRegistry;
use flame_protocol::messages::{ExecutorEvent, NodeTaskResult, Usage};
use flame_protocol::model::{
    ApplicationSpec, ExecutorOwner, ShimKind, TaskAssignment, TaskOutcome,
};
use flame_protocol::{limits, ExecutorId};
use prepared::Prepared;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long an application may take to say ready after it starts, by default
/// (`flame-node --start-timeout`). An application that does not is killed and the launch
/// counts as failed (`limits::APP_LAUNCH_FAILURES_MAX`).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Bounds of `flame-node --start-timeout`.
pub const START_TIMEOUT_MIN: Duration = Duration::from_secs(1);
/// See [`START_TIMEOUT_MIN`].
pub const START_TIMEOUT_MAX: Duration = Duration::from_secs(600);
/// How long an application may take to enter or leave a session.
pub const ENTER_LEAVE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a released application has to exit after its stdin closes.
pub const EXIT_GRACE: Duration = Duration::from_secs(5);

/// Mode of an executor's working folder `exec-<id>`: only its user (and root) may enter.
pub const WORK_DIR_MODE: u32 = 0o700;

/// What executors report, merged by the link into batched frames; and the object cache's
/// events, which the link forwards in the same order of frames.
#[derive(Debug)]
pub enum Report {
    Event(ExecutorEvent),
    Result(NodeTaskResult),
    Object(flame_protocol::object::ObjectEvent),
}

/// What every executor of this node shares: where its files go, who it runs as, and how
/// it is started and confined.
#[derive(Debug)]
pub struct Settings {
    pub node_name: String,
    /// Parent of each executor's own working directory `exec-<id>`.
    pub work_dir: PathBuf,
    /// Parent of each executor's private socket directory `exec-<id>` (unix shim).
    pub runtime_dir: PathBuf,
    /// Who executors of applications that name no `user` run as.
    pub identity: IdentityMode,
    /// Executors may run as root.
    pub allow_root: bool,
    /// The agent runs as root, so it can run executors as other users.
    pub node_is_root: bool,
    /// Executor cgroups; `None`: no limits and no accounting.
    pub cgroups: Option<CgroupTree>,
    /// Most processes in one executor's cgroup.
    pub pids_max: u32,
    pub launcher: Box<dyn Launcher>,
    pub logs: LogRegistry,
    /// Most tasks the head may have outstanding per executor.
    pub credit: u32,
    /// Executors ended so far, to pace the pruning of old logs.
    pub executors_ended: std::sync::atomic::AtomicU64,
    /// Ranks of batch jobs that hold their allocation for Open MPI's daemons, by executor:
    /// where the head's exec requests are started.
    pub rank_holds: std::sync::Mutex<HashMap<ExecutorId, mpsc::Sender<ExecStart>>>,
    /// Woken when a rank registers in `rank_holds`, for exec requests that came first.
    pub rank_holds_changed: tokio::sync::Notify,
    /// Added to the environment of every rank of a batch job (`FLAME_HEAD`, Open MPI's
    /// launcher).
    pub job_env: Vec<(String, String)>,
    /// The node's object cache; `None` when its object service is off (`--object-listen
    /// off`): object inputs then fail, and outputs stay inline.
    pub objects: Option<Arc<objects::NodeObjects>>,
    /// How long an application may take to say ready ([`START_TIMEOUT`] by default).
    pub start_timeout: Duration,
}

/// A command to start inside a rank's allocation ([`Settings::rank_holds`]).
#[derive(Debug)]
pub struct ExecStart {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The started process (stdio piped, stdin null), or why it could not start.
    pub started: oneshot::Sender<Result<tokio::process::Child, String>>,
}

/// What one executor is started with.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub executor: ExecutorId,
    pub application: ApplicationSpec,
    /// The owner whose sessions it serves, and the uid the head gave that owner.
    pub owner: ExecutorOwner,
    /// GPU indices given to it.
    pub gpus: Vec<u32>,
}

/// The node's handle on a running executor.
#[derive(Debug)]
pub struct Handle {
    /// Bounded by [`commands_max`]: see [`spawn`].
    pub commands: mpsc::Sender<Command>,
    /// Held, never fired: dropping the handle kills the process at once.
    pub _kill: oneshot::Sender<()>,
}

/// Starts an executor task. It reports `Ready`, results and finally `Exited` on `reports`,
/// and sends its id on `gone` when it has finished and everything it held (process tree,
/// cgroup, directories) is gone.
///
/// Its command queue holds [`Settings::credit`] + [`limits::NODE_EXECUTOR_COMMANDS_SLACK`]
/// commands. A head that keeps its credit never fills it: the executor's runs outstanding
/// are at most its credit whether or not the executor is taking commands (its results may
/// wait in the reports queue, but then the head's credit is spent), besides at most a bind
/// and an unbind (the head binds again only after the executor reported `Unbound`), with
/// the slack for the few a reconnect may leave queued. A full queue is the head's protocol
/// error: the link sees it at `try_send` and drops the connection (see `link::Agent::apply`).
pub fn spawn(
    settings: Arc<Settings>,
    spec: LaunchSpec,
    reports: mpsc::Sender<Report>,
    gone: mpsc::Sender<ExecutorId>,
) -> Handle {
    let queue = commands_max(&settings);
    let (commands, rx) = mpsc::channel(queue);
    let (kill, kill_rx) = oneshot::channel();
    let reports = Reports(reports);
    tokio::spawn(async move {
        let id = spec.executor;
        let (reason, usage) = match Prepared::new(&settings, &spec) {
            Ok(mut prepared) => {
                let reason = match spec.application.shim {
                    ShimKind::Batch => {
                        rank::drive(&settings, &spec, &mut prepared, rx, kill_rx, &reports).await
                    }
                    ShimKind::Stdio | ShimKind::Unix => {
                        shim::drive(&settings, &spec, &mut prepared, rx, kill_rx, &reports).await
                    }
                };
                prepared.finish(reason).await
            }
            Err(reason) => (reason, Usage::default()),
        };
        prune_logs(settings).await;
        reports
            .send(Report::Event(ExecutorEvent::Exited {
                executor: id,
                reason,
                usage,
            }))
            .await;
        // Everything it held is gone: a full queue only makes this (empty) task wait for the
        // agent, which reads it while connected and while shutting down.
        let _ = gone.send(id).await;
    });
    Handle {
        commands,
        _kill: kill,
    }
}

/// The size of an executor's command queue (see [`spawn`]).
pub fn commands_max(settings: &Settings) -> usize {
    usize::try_from(settings.credit)
        .unwrap_or(usize::MAX)
        .saturating_add(limits::NODE_EXECUTOR_COMMANDS_SLACK)
}

/// Where an executor's reports go: the agent's queue of
/// [`limits::NODE_REPORTS_MAX`]. A full queue makes the executor wait at its next report,
/// with its application's answers left in the application's pipe: backpressure onto the
/// application, and through the head's credit onto the head. It cannot deadlock: the agent
/// takes reports whenever it is connected and while shutting down, and never waits on this
/// queue itself (its own reports wait in its outbox, see `link::Agent`).
#[derive(Debug, Clone)]
struct Reports(mpsc::Sender<Report>);

impl Reports {
    /// Sends a report; a closed queue means the node is going away, and the head re-queues
    /// what it had sent.
    async fn send(&self, report: Report) {
        // Room is the usual case: taken without a trip through the scheduler. A full queue
        // waits (backpressure); a closed one drops the report.
        match self.0.try_send(report) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(report)) => {
                let _ = self.0.send(report).await;
            }
        }
    }

    /// Reports how task `a` ended on executor `id`.
    async fn result(
        &self,
        id: ExecutorId,
        a: &TaskAssignment,
        outcome: TaskOutcome,
        exit_code: Option<i32>,
    ) {
        self.send(Report::Result(NodeTaskResult {
            executor: id,
            session: a.session,
            task: a.task,
            attempt: a.attempt,
            outcome,
            exit_code,
        }))
        .await;
    }
}

/// Logs of this many executors are kept on disk (live ones always); older ones are
/// removed as executors end.
pub const EXECUTOR_LOGS_KEPT: usize = 1000;

/// Old logs are looked for once per this many executors ended, not after every one: each
/// look lists the log directory.
pub const EXECUTOR_LOGS_PRUNE_EVERY: u64 = 64;

/// Bounds the logs on disk (to [`EXECUTOR_LOGS_KEPT`] plus at most
/// [`EXECUTOR_LOGS_PRUNE_EVERY`]) after executors end, off the runtime thread.
async fn prune_logs(settings: Arc<Settings>) {
    let ended = settings
        .executors_ended
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if ended % EXECUTOR_LOGS_PRUNE_EVERY != 0 {
        return;
    }
    let pruned =
        tokio::task::spawn_blocking(move || settings.logs.remove_old(EXECUTOR_LOGS_KEPT)).await;
    match pruned {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!("cannot remove old executor logs: {e}"),
        Err(e) => tracing::warn!("the log clean-up task failed: {e}"),
    }
}
