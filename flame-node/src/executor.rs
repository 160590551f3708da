//! One executor: an application process driven through its shim (stdio or a Unix socket),
//! in its own cgroup, as its application's user.
//!
//! Each executor is a task that owns its process and applies commands in the order the
//! head sent them, so a task queued behind the one running waits here on the node
//! (pipelining), and an unbind takes effect after the tasks sent before it. When it ends,
//! for whatever reason, its whole cgroup is killed and removed with its directories, so no
//! process, socket or file of it outlives it.

use crate::cgroup::{CgroupTree, ExecutorCgroup, Limits, Usage as CgroupUsage};
use crate::launcher::{resolve_credentials, Credentials, Launcher, ProcessSpec, StdioMode};
use crate::lifecycle::{Input, Phase};
use crate::logs::{LogRegistry, LogSink};
use bytes::Bytes;
use flame_protocol::messages::{ExecutorEvent, NodeTaskResult, Usage};
use flame_protocol::model::{
    ApplicationSpec, ExecutorIdentity, ExecutorOwner, ShimKind, TaskAssignment, TaskOutcome,
};
use flame_protocol::{limits, ExecutorId, SessionId};
use flame_shims::node::{AppMessage, Invocation, NodeShim};
use flame_shims::private_dir::PrivateDir;
use flame_shims::unix::{connect_when_listening, SocketDir, ENV_SHIM_SOCKET};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How long an application may take to say ready after it starts.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an application may take to enter or leave a session.
pub const ENTER_LEAVE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a released application has to exit after its stdin closes.
pub const EXIT_GRACE: Duration = Duration::from_secs(5);

/// Most tasks written to an application ahead of their results (the shim's pipelining
/// window). The head's credit bounds what waits on the node; this bounds what the
/// application's input holds.
pub const PIPELINE_TASKS_MAX: usize = 64;
/// Input bytes after which no further task joins the window; one task of any size always
/// may.
pub const PIPELINE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Mode of an executor's working folder `exec-<id>`: only its user (and root) may enter.
pub const WORK_DIR_MODE: u32 = 0o700;
/// A batch rank's Open MPI hostfile in its working folder (`FLAME_HOSTFILE`).
pub const HOSTFILE_NAME: &str = "hostfile";
/// Mode of the hostfile, which belongs to the rank's user.
pub const HOSTFILE_MODE: u32 = 0o600;

/// What ended one wait of an executor's loop.
enum Event {
    Command(Command),
    Message(Result<AppMessage, flame_shims::ShimError>),
    /// The application's process ended while it had no task in flight (idle, or bound
    /// between tasks): noticed at once, so its capacity is freed and no task is sent to it.
    Exited(std::io::Result<std::process::ExitStatus>),
}

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

impl Command {
    /// The lifecycle input it is.
    fn input(&self) -> Input {
        match self {
            Command::Bind { session, .. } => Input::Bind(*session),
            Command::Run(a) => Input::Run(a.session),
            Command::Unbind => Input::Unbind,
            Command::Release => Input::Release,
        }
    }
}

/// What executors report, merged by the link into batched frames.
#[derive(Debug)]
pub enum Report {
    Event(ExecutorEvent),
    Result(NodeTaskResult),
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
}

/// A command to start inside a rank's allocation ([`Settings::rank_holds`]).
#[derive(Debug)]
pub struct ExecStart {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// The started process (stdio piped, stdin null), or why it could not start.
    pub started: oneshot::Sender<Result<tokio::process::Child, String>>,
}

/// How a node picks the Unix identity of an owner's executors (`--executor-identity`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityMode {
    /// The owner's uid from the head's reserved range, gid the same number, no
    /// supplementary groups (the default).
    OwnerUid,
    /// The Unix user named like the owner (site accounts, as Slurm does).
    SiteUser,
    /// One user for every owner (`--executor-user`): owners are not isolated.
    Fixed(String),
    /// The agent is not root: every executor runs as the agent's own user.
    Unprivileged(String),
}

impl IdentityMode {
    /// What the node tells the head at registration (`flame node list` shows it).
    pub fn reported(&self) -> ExecutorIdentity {
        match self {
            IdentityMode::OwnerUid => ExecutorIdentity::OwnerUid,
            IdentityMode::SiteUser => ExecutorIdentity::SiteUser,
            IdentityMode::Fixed(user) => ExecutorIdentity::Fixed { user: user.clone() },
            IdentityMode::Unprivileged(user) => {
                ExecutorIdentity::Unprivileged { user: user.clone() }
            }
        }
    }
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
    pub commands: mpsc::UnboundedSender<Command>,
    /// Held, never fired: dropping the handle kills the process at once.
    pub _kill: oneshot::Sender<()>,
}

/// Starts an executor task. It reports `Ready`, results and finally `Exited` on `reports`,
/// and sends its id on `gone` when it has finished and everything it held (process tree,
/// cgroup, directories) is gone.
pub fn spawn(
    settings: Arc<Settings>,
    spec: LaunchSpec,
    reports: mpsc::UnboundedSender<Report>,
    gone: mpsc::UnboundedSender<ExecutorId>,
) -> Handle {
    let (commands, rx) = mpsc::unbounded_channel();
    let (kill, kill_rx) = oneshot::channel();
    tokio::spawn(async move {
        let id = spec.executor;
        let (reason, usage) = match Prepared::new(&settings, &spec) {
            Ok(mut prepared) => {
                let reason = drive(&settings, &spec, &mut prepared, rx, kill_rx, &reports).await;
                prepared.finish(reason).await
            }
            Err(reason) => (reason, Usage::default()),
        };
        prune_logs(settings).await;
        let _ = reports.send(Report::Event(ExecutorEvent::Exited {
            executor: id,
            reason,
            usage,
        }));
        let _ = gone.send(id);
    });
    Handle {
        commands,
        _kill: kill,
    }
}

/// Everything set up for one executor before its process starts, torn down by
/// [`Prepared::finish`]: its cgroup, its directories, its log.
struct Prepared {
    credentials: Option<Credentials>,
    cgroup: Option<ExecutorCgroup>,
    /// `exec-<id>`, the executor user's: root reaches inside only through its handle.
    work_dir: PrivateDir,
    socket_dir: Option<SocketDir>,
    log: LogSink,
    /// A batch rank's stderr, kept apart from its stdout (`log`) so the submitter can print
    /// each where it belongs.
    err_log: Option<LogSink>,
    /// cgroup counters when the executor last entered a session.
    bound_at: Option<CgroupUsage>,
    /// When the executor last entered a session, if it is in one.
    bound_since: Option<std::time::Instant>,
    /// The cgroup limits it was created with.
    resources: Limits,
}

impl Prepared {
    fn new(settings: &Settings, spec: &LaunchSpec) -> Result<Prepared, String> {
        let app = &spec.application;
        let id = spec.executor;
        let work_dir = settings.work_dir.join(format!("exec-{}", id.0));
        let credentials = credentials_for(settings, app, &spec.owner, &work_dir)?;
        let owner = credentials.as_ref().map(|c| (c.uid, c.gid));
        let log = settings
            .logs
            .open_sink(id.0)
            .map_err(|e| format!("cannot open the executor's log: {e}"))?;
        let err_log = match app.shim {
            ShimKind::Batch => Some(
                settings
                    .logs
                    .open_sink(crate::logs::stderr_log_id(id.0))
                    .map_err(|e| format!("cannot open the rank's stderr log: {e}"))?,
            ),
            ShimKind::Stdio | ShimKind::Unix => None,
        };
        let work_dir = PrivateDir::create(
            &settings.work_dir,
            &format!("exec-{}", id.0),
            WORK_DIR_MODE,
            owner,
        )
        .map_err(|e| format!("cannot create the working directory: {e}"))?;
        let socket_dir = match app.shim {
            ShimKind::Stdio | ShimKind::Batch => None,
            ShimKind::Unix => match SocketDir::create(&settings.runtime_dir, id.0, owner) {
                Ok(d) => Some(d),
                Err(e) => {
                    let _ = work_dir.remove();
                    return Err(format!("cannot prepare the shim socket: {e}"));
                }
            },
        };
        let limits = Limits {
            cpu_millis: Some(app.resources.cpu_millis),
            memory_bytes: app.resources.memory_bytes,
            pids_max: Some(settings.pids_max),
        };
        let cgroup = match &settings.cgroups {
            None => None,
            Some(tree) => match tree.create(&format!("exec-{}", id.0), &limits) {
                Ok(c) => Some(c),
                Err(e) => {
                    let _ = work_dir.remove();
                    return Err(format!("cannot create the executor's cgroup: {e}"));
                }
            },
        };
        Ok(Prepared {
            credentials,
            cgroup,
            work_dir,
            socket_dir,
            log,
            err_log,
            bound_at: None,
            bound_since: None,
            resources: limits,
        })
    }

    fn usage_now(&self) -> Option<CgroupUsage> {
        let cgroup = self.cgroup.as_ref()?;
        match cgroup.usage() {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!("cannot read an executor's cgroup counters: {e}");
                None
            }
        }
    }

    /// What the executor used since it entered its session, if it is in one.
    fn usage_since_bound(&self) -> Usage {
        self.usage_since_bound_at(self.usage_now())
    }

    /// [`Self::usage_since_bound`] from counters already read.
    fn usage_since_bound_at(&self, now: Option<CgroupUsage>) -> Usage {
        let Some(since) = self.bound_since else {
            return Usage::default();
        };
        let bound_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
        let (Some(then), Some(now)) = (self.bound_at, now) else {
            return Usage {
                bound_ms,
                ..Usage::default()
            };
        };
        Usage {
            bound_ms,
            cpu_ms: now.cpu_ns.saturating_sub(then.cpu_ns) / 1_000_000,
            memory_peak_bytes: now.memory_peak_bytes,
            throttled_ms: now.throttled_ns.saturating_sub(then.throttled_ns) / 1_000_000,
        }
    }

    /// Tears everything down: every process left in the cgroup is killed and the cgroup
    /// removed, the directories removed. Returns the reason the executor ended, naming an
    /// out-of-memory kill, and what it used since it last entered a session.
    async fn finish(self, reason: String) -> (String, Usage) {
        // The counters are read once, for the usage and for an OOM kill.
        let now = self.usage_now();
        let usage = self.usage_since_bound_at(now);
        let oom_kills = now.map_or(0, |u| u.oom_kills);
        let Prepared {
            cgroup,
            work_dir,
            socket_dir,
            log,
            ..
        } = self;
        let reason = if oom_kills > 0 {
            format!("out of memory: the executor reached its memory limit and the kernel killed it; {reason}")
        } else {
            reason
        };
        if let Some(cgroup) = cgroup {
            // Killing waits (bounded) for the cgroup to empty: off the runtime thread.
            let done = tokio::task::spawn_blocking(move || {
                cgroup.kill_all()?;
                cgroup.remove()
            })
            .await;
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("cannot remove an executor's cgroup: {e}"),
                Err(e) => tracing::warn!("the cgroup clean-up task failed: {e}"),
            }
        }
        if let Some(dir) = socket_dir {
            if let Err(e) = dir.remove() {
                tracing::warn!("cannot remove an executor's socket directory: {e}");
            }
        }
        if let Err(e) = work_dir.remove() {
            tracing::warn!(dir = %work_dir.path().display(), "cannot remove an executor's working directory: {e}");
        }
        drop(log);
        (reason, usage)
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

/// Who an executor of `owner` runs as on this node: the application's `user` when it
/// names one (the head accepts that only for an application restricted to one owner),
/// else the identity the node's mode gives the owner. `work_dir` is its private working
/// directory, the `HOME` of an owner uid that has no passwd entry.
fn credentials_for(
    settings: &Settings,
    app: &ApplicationSpec,
    owner: &ExecutorOwner,
    work_dir: &std::path::Path,
) -> Result<Option<Credentials>, String> {
    if !settings.node_is_root {
        // An unprivileged agent runs executors as itself.
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.name);
        return match (&app.user, me) {
            (Some(wanted), Some(me)) if *wanted != me => Err(format!(
                "this node runs as `{me}`, not root, so it cannot run executors as `{wanted}`"
            )),
            _ => Ok(None),
        };
    }
    if app.user.is_some() || app.group.is_some() {
        // A fixed identity may serve one owner only, or every owner on a node that shares
        // one identity by choice: the head checks this at registration and launch, and the
        // node holds it too, since it is what keeps two owners apart here.
        let one_owner = app.users.len() == 1 && app.users[0] == owner.name && app.groups.is_empty();
        if !one_owner && !matches!(settings.identity, IdentityMode::Fixed(_)) {
            return Err(format!(
                "application `{}` names a fixed user or group but is not restricted to `{}` \
                 alone; refusing to run two owners' executors as one identity\n\
                 hint: an admin sets `users = [\"{}\"]` (and no `groups`) on it, or leaves \
                 out `user` and `group`",
                app.name, owner.name, owner.name
            ));
        }
    }
    let (user, credentials) = match (&app.user, &settings.identity) {
        (Some(user), _) => (
            user.clone(),
            resolve_credentials(user, app.group.as_deref())
                .map_err(|e| format!("cannot run as the application's user: {e}"))?,
        ),
        (None, IdentityMode::Fixed(user)) => (
            user.clone(),
            resolve_credentials(user, app.group.as_deref())
                .map_err(|e| format!("cannot run as this node's --executor-user: {e}"))?,
        ),
        (None, IdentityMode::SiteUser) => (
            owner.name.clone(),
            resolve_credentials(&owner.name, app.group.as_deref()).map_err(|e| {
                format!(
                    "this node runs each user's executors as the Unix user of the same name \
                     (--executor-identity site-user), and cannot for `{}`: {e}\n\
                     hint: create the account `{}` on node {}, or run the node with \
                     --executor-identity owner-uid",
                    owner.name, owner.name, settings.node_name
                )
            })?,
        ),
        (None, IdentityMode::OwnerUid) => (
            format!("flame-{}", owner.name),
            owner_uid_credentials(settings, app, owner, work_dir)?,
        ),
        // Handled above: an unprivileged agent runs executors as itself.
        (None, IdentityMode::Unprivileged(user)) => {
            return Err(format!(
                "this node runs as `{user}`, not root; it cannot change identity"
            ))
        }
    };
    if matches!(settings.identity, IdentityMode::SiteUser)
        && app.user.is_none()
        && credentials.uid != 0
        && credentials.uid < SITE_USER_UID_MIN
    {
        return Err(format!(
            "`{user}` is a system account (uid {} below {SITE_USER_UID_MIN}); site-user mode \
             runs only people's accounts\nhint: give the Flame user another name",
            credentials.uid
        ));
    }
    if credentials.uid == 0 && !(settings.allow_root && app.allow_root) {
        let who = match (settings.allow_root, app.allow_root) {
            (false, false) => "neither the application (allow_root = true) nor this node (--allow-root-executors) allows",
            (false, true) => "this node does not allow (see --allow-root-executors)",
            _ => "the application does not allow (allow_root = true in its spec)",
        };
        return Err(format!(
            "`{user}` is root, and executors run as root only when both the application \
             and the node allow it: {who} it"
        ));
    }
    Ok(Some(credentials))
}

/// In site-user mode, the lowest uid an owner's account may have: below it are system
/// accounts (`bin`, `daemon`, ...), which a Flame user of that name must not become
/// (Debian's and most distributions' `UID_MIN`).
pub const SITE_USER_UID_MIN: u32 = 1000;

/// The owner's head-assigned uid, with the gid of the same number (or the application's
/// `group`) and no other group. A uid that is a local account's, or 0, is refused: the
/// head's range must be free on every node.
fn owner_uid_credentials(
    settings: &Settings,
    app: &ApplicationSpec,
    owner: &ExecutorOwner,
    work_dir: &std::path::Path,
) -> Result<Credentials, String> {
    let uid = owner.uid;
    if uid == 0 {
        return Err(format!(
            "the head gave owner `{}` uid 0; refusing",
            owner.name
        ));
    }
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(None) => {}
        Ok(Some(local)) => {
            return Err(format!(
                "uid {uid} of owner `{}` is the local account `{}` on node {}\n\
                 hint: give the head an --owner-uid-range that no account on the nodes uses",
                owner.name, local.name, settings.node_name
            ))
        }
        Err(e) => {
            return Err(format!(
                "cannot look up uid {uid} in the user database: {e}"
            ))
        }
    }
    let gid = match &app.group {
        None => uid,
        Some(g) => nix::unistd::Group::from_name(g)
            .map_err(|e| format!("cannot look up group `{g}`: {e}"))?
            .ok_or_else(|| format!("the application's group `{g}` does not exist on this node"))?
            .gid
            .as_raw(),
    };
    Ok(Credentials {
        uid,
        gid,
        groups: vec![gid],
        user: format!("flame-{}", owner.name),
        home: work_dir.to_path_buf(),
    })
}

/// The executor's whole environment: a few basics from the node, the application's
/// variables, then Flame's own (which the application cannot override).
fn environment(
    settings: &Settings,
    spec: &LaunchSpec,
    prepared: &Prepared,
) -> Vec<(String, String)> {
    let app = &spec.application;
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert(
        "PATH".into(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
    );
    for key in ["LANG", "LC_ALL", "TZ"] {
        if let Ok(v) = std::env::var(key) {
            env.insert(key.into(), v);
        }
    }
    match &prepared.credentials {
        Some(c) => {
            env.insert("HOME".into(), c.home.display().to_string());
            env.insert("USER".into(), c.user.clone());
            env.insert("LOGNAME".into(), c.user.clone());
        }
        None => {
            for key in ["HOME", "USER", "LOGNAME"] {
                if let Ok(v) = std::env::var(key) {
                    env.insert(key.into(), v);
                }
            }
        }
    }
    for (k, v) in &app.env {
        env.insert(k.clone(), v.value.clone());
    }
    env.insert("FLAME_EXECUTOR_ID".into(), spec.executor.to_string());
    env.insert("FLAME_NODE".into(), settings.node_name.clone());
    env.insert("FLAME_APPLICATION".into(), app.name.clone());
    env.insert(
        "CUDA_VISIBLE_DEVICES".into(),
        spec.gpus
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
    );
    if let Some(dir) = &prepared.socket_dir {
        env.insert(
            ENV_SHIM_SOCKET.into(),
            dir.socket_path().display().to_string(),
        );
    }
    env.into_iter().collect()
}

fn tail_text(log: &LogSink) -> String {
    let lines = log.tail_lines();
    if lines.is_empty() {
        String::new()
    } else {
        format!("; last output lines:\n{}", lines.join("\n"))
    }
}

/// The application's end of the shim: its stdio pipes, or the socket it listens on.
type ShimReader = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
type ShimWriter = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

/// Runs the executor's process to the end; returns why it ended.
async fn drive(
    settings: &Settings,
    spec: &LaunchSpec,
    prepared: &mut Prepared,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut kill: oneshot::Receiver<()>,
    reports: &mpsc::UnboundedSender<Report>,
) -> String {
    let id = spec.executor;
    let app = &spec.application;
    if app.shim == ShimKind::Batch {
        return drive_rank(settings, spec, prepared, commands, kill, reports).await;
    }
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
            Some(Err(e)) => return format!("cannot join the executor's cgroup: {e}"),
        },
        stdin: if unix {
            StdioMode::Null
        } else {
            StdioMode::Piped
        },
        stdout: StdioMode::Piped,
        stderr: StdioMode::Piped,
    };
    let mut child = match settings.launcher.launch(process) {
        Ok(c) => c,
        Err(e) => return e.to_string(),
    };
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
            return "the unix shim has no socket directory".to_string();
        };
        let connected = tokio::select! {
            c = connect_when_listening(&socket, START_TIMEOUT, child.wait()) => c.map_err(|e| e.to_string()),
            _ = &mut kill => Err("killed by the node".to_string()),
        };
        match connected {
            Ok(stream) => {
                let (r, w) = stream.into_split();
                (Box::new(r), Box::new(w))
            }
            Err(e) => {
                let _ = child.start_kill();
                let _ = tokio::time::timeout(EXIT_GRACE, child.wait()).await;
                let status = child
                    .try_wait()
                    .ok()
                    .flatten()
                    .map_or(String::new(), |s| format!(" ({s})"));
                tokio::task::yield_now().await;
                return format!(
                    "the application failed to start: {e}{status}{}",
                    tail_text(&log)
                );
            }
        }
    } else {
        match (child.stdin.take(), child.stdout.take()) {
            (Some(stdin), Some(stdout)) => (Box::new(stdout), Box::new(stdin)),
            _ => return "the process has no stdio pipes".to_string(),
        }
    };
    let mut shim = NodeShim::new(reader, writer, limits::FRAME_BYTES_MAX);
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
            return format!("{}{}{}", format!($($arg)*), status, tail_text(&log));
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
        credit: settings.credit,
    }));

    // Tasks written to the application and not answered yet, oldest first; the oldest is
    // the one running, and its timeout counts from when it became the oldest.
    let mut in_flight: VecDeque<TaskAssignment> = VecDeque::new();
    let mut in_flight_bytes: usize = 0;
    let mut oldest_since = Instant::now();
    // A bind, unbind or release that waits for every task sent before it to be answered.
    let mut held: Option<Command> = None;

    loop {
        let command = match held.take() {
            Some(c) if in_flight.is_empty() => c,
            held_back => {
                held = held_back;
                let room = held.is_none()
                    && in_flight.len() < PIPELINE_TASKS_MAX
                    && in_flight_bytes < PIPELINE_BYTES_MAX;
                let deadline = async {
                    match task_timeout {
                        Some(t) if !in_flight.is_empty() => {
                            tokio::time::sleep_until((oldest_since + t).into()).await
                        }
                        _ => std::future::pending().await,
                    }
                };
                // Commands first: every task that is ready joins the window before the
                // shim writes, so a window goes out in one write.
                let event = tokio::select! {
                    biased;
                    _ = &mut kill => fail!("killed by the node"),
                    c = commands.recv(), if room => match c {
                        Some(c) => Event::Command(c),
                        None => fail!("the node lost its head connection"),
                    },
                    m = shim.next_message(), if !in_flight.is_empty() => Event::Message(m),
                    // With tasks in flight, the shim's read sees the end first and the
                    // results already written are kept; without, nothing else would notice.
                    status = child.wait(), if in_flight.is_empty() => Event::Exited(status),
                    () = deadline => {
                        let task = in_flight.front().map_or_else(String::new, |a| {
                            format!("task {} of session {} ", a.task, a.session)
                        });
                        fail!(
                            "{task}ran past its timeout of {:?}",
                            task_timeout.unwrap_or_default()
                        )
                    }
                };
                match event {
                    Event::Command(c) => {
                        phase = match phase.next(c.input()) {
                            Ok(p) => p,
                            // The head and this node disagree; the head re-queues what ran
                            // here.
                            Err(e) => fail!("protocol error: {e}"),
                        };
                        match c {
                            Command::Run(a) => {
                                if let Err(e) = shim.queue_invoke(a.task.0, &a.input) {
                                    fail!(
                                        "task {} of session {} broke the executor: {e}",
                                        a.task,
                                        a.session
                                    )
                                }
                                if in_flight.is_empty() {
                                    oldest_since = Instant::now();
                                }
                                in_flight_bytes += a.input.len();
                                in_flight.push_back(a);
                            }
                            other => held = Some(other),
                        }
                    }
                    Event::Exited(status) => {
                        // Give the stderr reader a moment to take the last lines.
                        tokio::task::yield_now().await;
                        let status = match status {
                            Ok(s) => s.to_string(),
                            Err(e) => format!("its status could not be read: {e}"),
                        };
                        let when = match phase {
                            Phase::Bound(_) => "between tasks",
                            _ => "while idle",
                        };
                        return format!(
                            "the application exited {when} ({status}){}",
                            tail_text(&log)
                        );
                    }
                    Event::Message(m) => {
                        let Some(a) = in_flight.pop_front() else {
                            continue;
                        };
                        in_flight_bytes -= a.input.len();
                        oldest_since = Instant::now();
                        let outcome = match m.and_then(|m| shim.expect_result(a.task.0, m)) {
                            Ok(Invocation::Succeeded(out)) => TaskOutcome::Succeeded(out),
                            Ok(Invocation::Failed(msg)) => TaskOutcome::Failed(msg),
                            Err(e) => fail!(
                                "task {} of session {} broke the executor: {e}",
                                a.task,
                                a.session
                            ),
                        };
                        report_result(reports, id, &a, outcome, None);
                    }
                }
                continue;
            }
        };
        match command {
            Command::Bind {
                session,
                common_data,
            } => {
                // What it writes from here on is this session's (`flame logs`).
                log.enter(session.0).await;
                match tokio::time::timeout(ENTER_LEAVE_TIMEOUT, shim.enter(session.0, &common_data))
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => fail!("entering session {session} failed: {e}"),
                    Err(_) => fail!("entering session {session} took over {ENTER_LEAVE_TIMEOUT:?}"),
                }
                phase = phase.next(Input::Entered).unwrap_or(phase);
                prepared.bound_at = prepared.usage_now();
                prepared.bound_since = Some(std::time::Instant::now());
                let _ = reports.send(Report::Event(ExecutorEvent::Bound {
                    executor: id,
                    session,
                }));
            }
            // Runs joined the window above and never wait here.
            Command::Run(a) => fail!("internal error: task {} was held back", a.task),
            Command::Unbind => {
                match tokio::time::timeout(ENTER_LEAVE_TIMEOUT, shim.leave()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => fail!("leaving the session failed: {e}"),
                    Err(_) => fail!("leaving the session took over {ENTER_LEAVE_TIMEOUT:?}"),
                }
                // Its output until the next session is nobody's.
                log.leave().await;
                phase = phase.next(Input::Left).unwrap_or(phase);
                let usage = prepared.usage_since_bound();
                prepared.bound_at = None;
                prepared.bound_since = None;
                let _ = reports.send(Report::Event(ExecutorEvent::Unbound {
                    executor: id,
                    usage,
                }));
            }
            Command::Release => {
                shim.shutdown().await;
                return match tokio::time::timeout(EXIT_GRACE, child.wait()).await {
                    Ok(Ok(status)) if status.success() => "released".to_string(),
                    Ok(Ok(status)) => format!("released; exited with {status}{}", tail_text(&log)),
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

/// Reports how task `a` ended on executor `id`; a closed channel means the node is going
/// away, and the head re-queues what it had sent.
fn report_result(
    reports: &mpsc::UnboundedSender<Report>,
    id: ExecutorId,
    a: &TaskAssignment,
    outcome: TaskOutcome,
    exit_code: Option<i32>,
) {
    let _ = reports.send(Report::Result(NodeTaskResult {
        executor: id,
        session: a.session,
        task: a.task,
        attempt: a.attempt,
        outcome,
        exit_code,
    }));
}

/// Most exec requests waiting for a holding rank at once.
const RANK_EXEC_QUEUE: usize = 64;

/// Drives one rank of a batch job: no shim and no process until its task comes. The rank
/// says ready at once (so the head can start the job once every rank is placed), enters
/// its session at once, and its one task runs the job's command to completion with the
/// rank's environment; the process's exit status is the task's result. A holding rank
/// (`--mpi`, not the first) runs nothing itself and starts Open MPI's daemon when asked.
async fn drive_rank(
    settings: &Settings,
    spec: &LaunchSpec,
    prepared: &mut Prepared,
    mut commands: mpsc::UnboundedReceiver<Command>,
    mut kill: oneshot::Receiver<()>,
    reports: &mpsc::UnboundedSender<Report>,
) -> String {
    let id = spec.executor;
    let mut phase = Phase::Void.next(Input::AppReady).unwrap_or(Phase::Void);
    let _ = reports.send(Report::Event(ExecutorEvent::Ready {
        executor: id,
        credit: 1,
    }));
    let mut ran = false;
    loop {
        let command = tokio::select! {
            c = commands.recv() => match c {
                Some(c) => c,
                None => return "the node lost its head connection".to_string(),
            },
            _ = &mut kill => return "killed by the node".to_string(),
        };
        phase = match phase.next(command.input()) {
            Ok(p) => p,
            Err(e) => return format!("protocol error: {e}"),
        };
        match command {
            Command::Bind { session, .. } => {
                // A rank is its own session: everything its processes write is the job's.
                for log in std::iter::once(&prepared.log).chain(prepared.err_log.as_ref()) {
                    log.enter(session.0).await;
                }
                phase = phase.next(Input::Entered).unwrap_or(phase);
                prepared.bound_at = prepared.usage_now();
                prepared.bound_since = Some(std::time::Instant::now());
                let _ = reports.send(Report::Event(ExecutorEvent::Bound {
                    executor: id,
                    session,
                }));
            }
            Command::Run(a) => {
                if ran {
                    return "protocol error: a rank runs one task".to_string();
                }
                ran = true;
                let (outcome, exit_code) =
                    match run_rank(settings, spec, prepared, &a, &mut kill).await {
                        RankEnd::Exited(0) => (TaskOutcome::Succeeded(Bytes::new()), Some(0)),
                        RankEnd::Exited(code) => (
                            TaskOutcome::Failed(format!(
                                "rank exited with status {code}{}",
                                tail_text(prepared.err_log.as_ref().unwrap_or(&prepared.log))
                            )),
                            Some(code),
                        ),
                        RankEnd::NotStarted(why, code) => (TaskOutcome::Failed(why), code),
                        RankEnd::Killed => return "killed by the node".to_string(),
                    };
                report_result(reports, id, &a, outcome, exit_code);
            }
            Command::Unbind => {
                for log in std::iter::once(&prepared.log).chain(prepared.err_log.as_ref()) {
                    log.leave().await;
                }
                phase = phase.next(Input::Left).unwrap_or(phase);
                let usage = prepared.usage_since_bound();
                prepared.bound_at = None;
                prepared.bound_since = None;
                let _ = reports.send(Report::Event(ExecutorEvent::Unbound {
                    executor: id,
                    usage,
                }));
            }
            Command::Release => return "released".to_string(),
        }
    }
}

/// How a rank's task ended.
enum RankEnd {
    /// Its process exited with this status (128 + signal when a signal killed it).
    Exited(i32),
    /// It could not start: why, and the status a shell would give (127: not found, 126:
    /// not executable).
    NotStarted(String, Option<i32>),
    /// The node killed the executor (the job was cancelled or ended).
    Killed,
}

/// A process's exit status as a shell reports it.
pub fn status_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// Runs one rank's process (or, holding, waits and starts Open MPI's daemons) until it ends.
async fn run_rank(
    settings: &Settings,
    spec: &LaunchSpec,
    prepared: &Prepared,
    task: &flame_protocol::model::TaskAssignment,
    kill: &mut oneshot::Receiver<()>,
) -> RankEnd {
    let app = &spec.application;
    let launch = match flame_protocol::model::RankLaunch::decode(&task.input) {
        Ok(l) => l,
        Err(e) => return RankEnd::NotStarted(format!("malformed rank launch: {e}"), None),
    };
    // Into the rank's folder, which its user may have filled already: written only as a
    // new file, through the folder's handle, never through a name found there.
    let hostfile = prepared.work_dir.path().join(HOSTFILE_NAME);
    let owner = prepared.credentials.as_ref().map(|c| (c.uid, c.gid));
    if let Err(e) = prepared.work_dir.write_new(
        HOSTFILE_NAME,
        launch.hostfile.as_bytes(),
        HOSTFILE_MODE,
        owner,
    ) {
        return RankEnd::NotStarted(format!("cannot write the job's hostfile: {e}"), None);
    }
    // One value per name, the later source winning: the job's own variables (the
    // submitter's, in `environment`) give way to the node's and then to the head's, so a
    // user-set FLAME_LOCAL_WORLD_SIZE or FLAME_RANK is replaced, not shadowing them.
    let mut env: BTreeMap<String, String> =
        environment(settings, spec, prepared).into_iter().collect();
    env.extend(settings.job_env.iter().cloned());
    env.extend(launch.env.iter().cloned());
    env.insert("FLAME_HOSTFILE".into(), hostfile.display().to_string());
    // Open MPI: `mpirun` takes the job's hostfile, and runs as root only when told so
    // (the node allows root executors only with --allow-root-executors).
    env.insert(
        "OMPI_MCA_orte_default_hostfile".into(),
        hostfile.display().to_string(),
    );
    // Open MPI names its session directory and shared-memory segments by host name: two
    // nodes on one machine (or sharing /tmp) would collide. The rank's private directory
    // keeps them apart, and goes with the rank. Not for `mpirun` itself: it hands its
    // own settings to every daemon, which would share them again.
    if launch.argv.is_none() {
        for key in [
            "OMPI_MCA_orte_tmpdir_base",
            "OMPI_MCA_btl_vader_backing_directory",
        ] {
            env.insert(key.into(), prepared.work_dir.path().display().to_string());
        }
    }
    let as_root = match &prepared.credentials {
        Some(c) => c.uid == 0,
        None => nix::unistd::geteuid().is_root(),
    };
    if as_root {
        env.insert("OMPI_ALLOW_RUN_AS_ROOT".into(), "1".into());
        env.insert("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM".into(), "1".into());
    }
    let env: Vec<(String, String)> = env.into_iter().collect();
    let working_dir = app
        .working_dir
        .as_ref()
        .map_or_else(|| prepared.work_dir.path().to_path_buf(), PathBuf::from);
    // A held rank starts nothing until Open MPI asks; the `mpirun` rank starts it, and
    // Open MPI may start this node's MPI processes as its children or ask for a daemon here
    // too. Either way they run in this rank's allocation, which serve_rank keeps open, and
    // which grows to the node's share of the job before anything starts in it.
    let mpi = launch.hold || launch.argv.is_some();
    if mpi {
        widen_to_local_ranks(prepared, spec.executor, local_ranks(&launch));
    }
    let child = if launch.hold {
        None
    } else {
        let (program, args) = match &launch.argv {
            Some(argv) => match argv.split_first() {
                Some((p, rest)) => (p.clone(), rest.to_vec()),
                None => return RankEnd::NotStarted("an empty command line".into(), None),
            },
            None => (app.command.clone(), app.args.clone()),
        };
        match start_in_rank(
            settings,
            prepared,
            program,
            args,
            env.clone(),
            working_dir.clone(),
        ) {
            Ok(c) => Some(c),
            Err(e) => return e,
        }
    };
    let mut child = match child {
        Some(child) if launch.argv.is_none() => child,
        child => {
            return serve_rank(
                settings,
                spec.executor,
                prepared,
                RankEnv {
                    rank: env,
                    head: &launch.env,
                },
                working_dir,
                child,
                kill,
            )
            .await
        }
    };
    tokio::select! {
        status = child.wait() => rank_exit(status).await,
        _ = kill => RankEnd::Killed,
    }
}

/// How a rank ended, from its process's wait.
async fn rank_exit(status: std::io::Result<std::process::ExitStatus>) -> RankEnd {
    match status {
        Ok(status) => {
            // Give the log copies a moment to take the last lines.
            tokio::task::yield_now().await;
            RankEnd::Exited(status_code(status))
        }
        Err(e) => RankEnd::NotStarted(format!("waiting for the rank's process failed: {e}"), None),
    }
}

/// Starts a process in a rank's cgroup, as its user, with its output in the rank's log.
fn start_in_rank(
    settings: &Settings,
    prepared: &Prepared,
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    working_dir: PathBuf,
) -> Result<tokio::process::Child, RankEnd> {
    match spawn_in_rank(settings, prepared, program, args, env, working_dir) {
        Ok(mut child) => {
            if let Some(out) = child.stdout.take() {
                prepared.log.spawn_copy(out, "stdout");
            }
            if let Some(err) = child.stderr.take() {
                prepared
                    .err_log
                    .as_ref()
                    .unwrap_or(&prepared.log)
                    .spawn_copy(err, "stderr");
            }
            Ok(child)
        }
        Err(SpawnError::Cgroup(why)) => Err(RankEnd::NotStarted(why, None)),
        Err(SpawnError::Launch(e)) => {
            let code = match &e {
                crate::launcher::LaunchError::Spawn { source, .. }
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    Some(127)
                }
                crate::launcher::LaunchError::Spawn { .. } => Some(126),
                _ => None,
            };
            Err(RankEnd::NotStarted(e.to_string(), code))
        }
    }
}

/// Why a process could not start in a rank's allocation.
enum SpawnError {
    Cgroup(String),
    Launch(crate::launcher::LaunchError),
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpawnError::Cgroup(why) => f.write_str(why),
            SpawnError::Launch(e) => write!(f, "{e}"),
        }
    }
}

/// Starts a process in a rank's cgroup, as its user, stdin closed, stdout and stderr piped.
fn spawn_in_rank(
    settings: &Settings,
    prepared: &Prepared,
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    working_dir: PathBuf,
) -> Result<tokio::process::Child, SpawnError> {
    let cgroup = match prepared.cgroup.as_ref().map(ExecutorCgroup::procs_files) {
        None => None,
        Some(Ok(join)) => Some(join),
        Some(Err(e)) => {
            return Err(SpawnError::Cgroup(format!(
                "cannot join the rank's cgroup: {e}"
            )))
        }
    };
    let process = ProcessSpec {
        program,
        args,
        env,
        working_dir,
        credentials: prepared.credentials.clone(),
        cgroup,
        stdin: StdioMode::Null,
        stdout: StdioMode::Piped,
        stderr: StdioMode::Piped,
    };
    settings
        .launcher
        .launch(process)
        .map_err(SpawnError::Launch)
}

/// Ranks of its job on this node, as the head counted them (`FLAME_LOCAL_WORLD_SIZE` of
/// the rank's launch, which the head alone writes; never the environment, where the
/// submitter may have set the same name), at least 1.
fn local_ranks(launch: &flame_protocol::model::RankLaunch) -> u32 {
    launch
        .env
        .iter()
        .find(|(k, _)| k == "FLAME_LOCAL_WORLD_SIZE")
        .and_then(|(_, v)| v.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1)
}

/// Open MPI's daemon on a node starts all of that node's MPI processes as its children, in
/// one rank's cgroup: that rank's limits grow to the node's share of the job (the other
/// ranks here hold their room but run nothing).
fn widen_to_local_ranks(prepared: &Prepared, id: ExecutorId, local_ranks: u32) {
    if let (Some(cgroup), true) = (&prepared.cgroup, local_ranks > 1) {
        let r = &prepared_resources(prepared, local_ranks);
        if let Err(e) = cgroup.raise_limits(r) {
            tracing::warn!(executor = %id, "cannot widen an MPI rank's cgroup: {e}");
        }
    }
}

/// A rank's environment: all of it, and the head's part, which wins over what an exec
/// request brings.
struct RankEnv<'a> {
    rank: Vec<(String, String)>,
    head: &'a [(String, String)],
}

/// A rank of an `--mpi` job: registers itself so the head's exec requests (Open MPI's
/// daemon) start in its allocation (already widened to its node's share of the job), and
/// serves them until `mpirun` (`child`, rank 0) exits or, holding (`None`), until the node
/// kills it at the job's end.
async fn serve_rank(
    settings: &Settings,
    id: ExecutorId,
    prepared: &Prepared,
    env: RankEnv<'_>,
    working_dir: PathBuf,
    mut child: Option<tokio::process::Child>,
    kill: &mut oneshot::Receiver<()>,
) -> RankEnd {
    let (tx, mut rx) = mpsc::channel::<ExecStart>(RANK_EXEC_QUEUE);
    if let Ok(mut holds) = settings.rank_holds.lock() {
        holds.insert(id, tx);
    }
    settings.rank_holds_changed.notify_waiters();
    let end = loop {
        tokio::select! {
            status = wait_some(&mut child) => break rank_exit(status).await,
            request = rx.recv() => {
                let Some(request) = request else { break RankEnd::Killed };
                let Some((program, args)) = request.argv.split_first() else {
                    let _ = request.started.send(Err("an empty command line".into()));
                    continue;
                };
                // The request's variables (Open MPI's, from `mpirun`) over the rank's, and
                // the head's over both: for a name given twice, the last one is used.
                let mut all_env = env.rank.clone();
                all_env.extend(request.env);
                all_env.extend(env.head.iter().cloned());
                let started = spawn_in_rank(
                    settings,
                    prepared,
                    program.clone(),
                    args.to_vec(),
                    all_env,
                    working_dir.clone(),
                )
                .map_err(|e| e.to_string());
                let _ = request.started.send(started);
            }
            _ = &mut *kill => break RankEnd::Killed,
        }
    };
    if let Ok(mut holds) = settings.rank_holds.lock() {
        holds.remove(&id);
    }
    end
}

/// Waits for the process, if there is one; never ready without.
async fn wait_some(
    child: &mut Option<tokio::process::Child>,
) -> std::io::Result<std::process::ExitStatus> {
    match child {
        Some(c) => c.wait().await,
        None => std::future::pending().await,
    }
}

/// A rank's cgroup limits times `ranks`.
fn prepared_resources(prepared: &Prepared, ranks: u32) -> Limits {
    Limits {
        cpu_millis: prepared
            .resources
            .cpu_millis
            .map(|c| c.saturating_mul(ranks)),
        memory_bytes: prepared
            .resources
            .memory_bytes
            .map(|m| m.saturating_mul(u64::from(ranks))),
        pids_max: None,
    }
}
