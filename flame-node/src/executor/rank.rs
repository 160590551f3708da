//! One rank of a batch job: no shim and no process until its task comes, then the job's
//! command (or, for a holding rank of an `--mpi` job, Open MPI's daemons on request) in the
//! rank's allocation, until it exits or the node kills it.

use super::prepared::{environment, tail_text, Prepared};
use super::{Command, ExecStart, LaunchSpec, Report, Reports, Settings};
use crate::cgroup::{ExecutorCgroup, Limits};
use crate::launcher::{ProcessSpec, StdioMode};
use crate::lifecycle::{Input, Phase};
use bytes::Bytes;
use flame_protocol::messages::ExecutorEvent;
use flame_protocol::model::TaskOutcome;
use flame_protocol::{limits, ExecutorId};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tokio::sync::{mpsc, oneshot};

/// A batch rank's Open MPI hostfile in its working folder (`FLAME_HOSTFILE`).
pub const HOSTFILE_NAME: &str = "hostfile";
/// Mode of the hostfile, which belongs to the rank's user.
pub const HOSTFILE_MODE: u32 = 0o600;

/// Drives one rank of a batch job: no shim and no process until its task comes. The rank
/// says ready at once (so the head can start the job once every rank is placed), enters
/// its session at once, and its one task runs the job's command to completion with the
/// rank's environment; the process's exit status is the task's result. A holding rank
/// (`--mpi`, not the first) runs nothing itself and starts Open MPI's daemon when asked.
pub(super) async fn drive(
    settings: &Settings,
    spec: &LaunchSpec,
    prepared: &mut Prepared,
    mut commands: mpsc::Receiver<Command>,
    mut kill: oneshot::Receiver<()>,
    reports: &Reports,
) -> String {
    let id = spec.executor;
    let mut phase = Phase::Void.next(Input::AppReady).unwrap_or(Phase::Void);
    reports
        .send(Report::Event(ExecutorEvent::Ready {
            executor: id,
            credit: 1,
        }))
        .await;
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
                prepared.enter_session();
                reports
                    .send(Report::Event(ExecutorEvent::Bound {
                        executor: id,
                        session,
                    }))
                    .await;
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
                                "rank exited with status {code}{}{}",
                                out_of_memory(prepared, spec),
                                tail_text(prepared.err_log.as_ref().unwrap_or(&prepared.log))
                            )),
                            Some(code),
                        ),
                        RankEnd::NotStarted(why, code) => (TaskOutcome::Failed(why), code),
                        RankEnd::Killed => return "killed by the node".to_string(),
                    };
                reports.result(id, &a, outcome, exit_code).await;
            }
            Command::Unbind => {
                for log in std::iter::once(&prepared.log).chain(prepared.err_log.as_ref()) {
                    log.leave().await;
                }
                phase = phase.next(Input::Left).unwrap_or(phase);
                let usage = prepared.leave_session();
                reports
                    .send(Report::Event(ExecutorEvent::Unbound {
                        executor: id,
                        usage,
                    }))
                    .await;
            }
            Command::Release => return "released".to_string(),
        }
    }
}

/// `": out of memory (limit X) …"` when the kernel killed a process of the rank's cgroup
/// at its memory limit (the cgroup's OOM-kill counter, v1 or v2, as sessions' executors
/// report it), else nothing: a status such as 137 alone does not say why.
fn out_of_memory(prepared: &Prepared, spec: &LaunchSpec) -> String {
    let oom_kills = prepared.usage_now().map_or(0, |u| u.oom_kills);
    if oom_kills == 0 {
        return String::new();
    }
    let limit = spec.application.resources.memory_bytes.map_or_else(
        || "none set".to_string(),
        flame_protocol::model::format_bytes,
    );
    format!(
        ": out of memory (limit {limit}): the kernel killed it at the rank's memory limit \
         (raise --mem-per-rank)"
    )
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
    let launch = match flame_protocol::model::RankLaunch::decode(
        task.input.inline().map(|b| &b[..]).unwrap_or_default(),
    ) {
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
    let (tx, mut rx) = mpsc::channel::<ExecStart>(limits::RANK_EXEC_REQUESTS_MAX);
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
