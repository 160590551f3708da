//! Batch jobs: a job's ranks start together once all are placed, end together, and are
//! never run twice.

use super::*;

/// What batch jobs leave for later in the batch, or the next tick.
#[derive(Debug)]
pub(super) struct JobFlags {
    /// A job ended: its application goes once its executors are gone.
    pub(super) apps_ended: bool,
    /// An executor of a queued job was bound in this batch: `start_jobs` looks.
    pub(super) may_start: bool,
}

/// When one rank of a job fails, the others get this long to end by themselves before they
/// are killed.
pub const JOB_FAIL_GRACE_MS: u64 = 2_000;

/// `MASTER_PORT` of a job is this plus its id modulo [`JOB_MASTER_PORT_SPAN`], so jobs
/// sharing a node rarely pick the same port.
pub const JOB_MASTER_PORT_BASE: u64 = 29_500;

/// See [`JOB_MASTER_PORT_BASE`].
pub const JOB_MASTER_PORT_SPAN: u64 = 10_000;

/// The variable that carries an MPI job's credential to its ranks (for `flame-mpi-agent`).
pub const JOB_TOKEN_ENV: &str = "FLAME_JOB_TOKEN";

impl Core {
    /// An executor of `application` is gone. If it was a rank of a job that has not
    /// started, the job fails: a gang is never topped up, and the ranks it still holds go
    /// back.
    pub(super) fn job_rank_lost(&mut self, application: &str, why: &str, now_ms: u64) {
        let Some(id) = job_of_application(application) else {
            return;
        };
        let Some(s) = self.tasks.sessions.get_mut(&id) else {
            return;
        };
        if s.finished || s.cancelled {
            return;
        }
        let Some(job) = s.stored.job.as_mut() else {
            return;
        };
        if job.state != JobState::Queued {
            return;
        }
        let message = format!("a rank was lost before the job started: {why}");
        tracing::warn!(job = %id, %why, "a rank of a job was lost before it started; the job fails");
        job.failure.get_or_insert(JobFailure {
            rank: None,
            exit_code: None,
            message: message.clone(),
        });
        self.end_unfinished(id, TaskOutcome::Failed(message), None, now_ms);
    }

    /// After a restart: a running job whose rank nobody reported lost it for good (a rank
    /// never runs twice), so the job fails and its other ranks are stopped.
    pub(super) fn fail_orphaned_jobs(&mut self, now_ms: u64) {
        let mut orphaned = Vec::new();
        for (id, s) in self.tasks.sessions.iter_mut() {
            let Some(job) = s.stored.job.as_mut() else {
                continue;
            };
            if job.state != JobState::Running || s.finished {
                continue;
            }
            let lost = s.tasks.iter().position(|t| t.slot == Slot::Pending);
            let Some(rank) = lost else {
                // A rank had failed before the restart: the others stop now.
                if let Some(f) = &job.failure {
                    orphaned.push((*id, f.message.clone()));
                }
                continue;
            };
            let message = "its rank was lost while the head restarted".to_string();
            if job.failure.is_none() {
                job.failure = Some(JobFailure {
                    rank: Some(rank as u32),
                    exit_code: None,
                    message: message.clone(),
                });
            }
            orphaned.push((*id, message));
        }
        for (id, message) in orphaned {
            tracing::warn!(job = %id, "a rank of a running job was lost in a head restart");
            self.end_unfinished(id, TaskOutcome::Failed(message), None, now_ms);
        }
    }

    /// Stops jobs whose ranks must go: after a failed rank's grace, at the end of an
    /// `--mpi` job's `mpirun`, or at the time limit. Forgets the applications of ended
    /// jobs once their executors are gone.
    pub(super) fn enforce_job_deadlines(&mut self, now_ms: u64) {
        let mut stops = Vec::new();
        for (id, s) in self.tasks.sessions.iter_mut() {
            let Some(job) = &s.stored.job else { continue };
            if s.finished || s.cancelled {
                continue;
            }
            if let Some(at) = s.job_stop_at_ms {
                if now_ms >= at {
                    let outcome = match &job.failure {
                        Some(f) => TaskOutcome::Failed(match f.rank {
                            Some(rank) => format!("stopped because rank {rank} failed"),
                            None => format!("stopped: {}", f.message),
                        }),
                        // `mpirun` ended well: the ranks that held its daemons are done.
                        None => TaskOutcome::Succeeded(Bytes::new()),
                    };
                    stops.push((*id, outcome));
                }
                continue;
            }
            let (Some(limit), Some(started)) = (job.spec.time_limit_ms, job.started_ms) else {
                continue;
            };
            if job.state == JobState::Running && now_ms >= started.saturating_add(limit) {
                s.job_timed_out = true;
                stops.push((
                    *id,
                    TaskOutcome::Failed(format!(
                        "stopped at the job's time limit of {}",
                        humantime::format_duration(std::time::Duration::from_millis(limit))
                    )),
                ));
            }
        }
        for (id, outcome) in stops {
            tracing::info!(job = %id, ?outcome, "stopping a job's ranks");
            self.end_unfinished(id, outcome, None, now_ms);
        }
        if std::mem::take(&mut self.jobs.apps_ended) {
            let alive: std::collections::HashSet<&str> = self
                .pool
                .executors
                .values()
                .map(|e| e.application.as_str())
                .collect();
            let sessions = &self.tasks.sessions;
            let before = self.apps.len();
            let mut kept_any = false;
            self.apps.retain(|name, a| {
                if a.shim != ShimKind::Batch || alive.contains(name.as_str()) {
                    kept_any |= a.shim == ShimKind::Batch;
                    return true;
                }
                let id = job_of_application(name);
                let keep = id
                    .and_then(|id| sessions.get(&id))
                    .is_some_and(|s| !s.finished);
                kept_any |= keep;
                keep
            });
            if self.apps.len() != before || kept_any {
                // Check again at the next tick while some are still in use.
                self.jobs.apps_ended = kept_any;
            }
        }
    }

    /// Starts each queued job whose ranks are all placed and bound (see `start_job`).
    pub(super) fn start_jobs(&mut self, now_ms: u64) {
        if !std::mem::take(&mut self.jobs.may_start) {
            return;
        }
        let queued: Vec<SessionId> = self
            .tasks
            .sessions
            .iter()
            .filter(|(_, s)| {
                !s.finished
                    && !s.cancelled
                    && s.stored
                        .job
                        .as_ref()
                        .is_some_and(|j| j.state == JobState::Queued)
            })
            .map(|(id, _)| *id)
            .collect();
        for sid in queued {
            self.start_job(sid, now_ms);
        }
    }

    /// Starts job `sid` if its ranks are all placed and bound: numbers them (by node, then
    /// executor id, so a node's ranks are consecutive), and hands every rank its task with
    /// its environment and the job's hostfile, all in this batch's frames.
    fn start_job(&mut self, sid: SessionId, now_ms: u64) {
        let Some(ranks) = self
            .tasks
            .sessions
            .get(&sid)
            .and_then(|s| s.stored.job.as_ref())
            .map(|j| j.spec.ranks as usize)
        else {
            return;
        };
        let mut bound: Vec<(NodeName, ExecutorId)> = self
            .pool
            .executors
            .iter()
            .filter(|(_, e)| e.session == Some(sid) && e.phase == ExecutorPhase::Bound)
            .map(|(id, e)| (e.node.clone(), *id))
            .collect();
        if bound.len() < ranks {
            return;
        }
        bound.sort_unstable();
        bound.truncate(ranks);
        let layout = self.job_layout(sid, &bound);
        let Some(s) = self.tasks.sessions.get_mut(&sid) else {
            return;
        };
        let Some(job) = s.stored.job.as_mut() else {
            return;
        };
        let mut infos = Vec::with_capacity(ranks);
        let mut node_index = 0;
        let mut local = 0u32;
        for (rank, (node, executor)) in bound.iter().enumerate() {
            if rank > 0 && bound[rank - 1].0 != *node {
                node_index += 1;
                local = 0;
            }
            let local_world = layout.per_node[node_index].1;
            let credentials = self.config.job_credentials.as_ref();
            let input = rank_input(
                sid,
                &job.spec,
                &layout,
                (rank, local, local_world),
                credentials,
            );
            let task = TaskId(rank as u64 + 1);
            infos.push(RankInfo {
                rank: rank as u32,
                node: node.to_string(),
                executor: *executor,
                local_rank: local,
                exit_code: None,
            });
            local += 1;
            let Some(slot) = slot_of(&mut s.tasks, task) else {
                continue;
            };
            if slot.slot != Slot::Pending {
                // Already running: adopted after a head restart before the start was
                // stored. The numbering is the same: the same executors, sorted alike.
                continue;
            }
            slot.slot = Slot::Running(*executor);
            let before = slot_held(slot, false);
            slot.input = Payload::Inline(input.clone());
            let after = slot_held(slot, false);
            reheld(
                &mut self.tasks.ledger,
                owner_name(&s.stored.owner),
                before,
                after,
            );
            s.counts.pending = take_one(s.counts.pending, "pending");
            s.counts.running += 1;
            if let Some(e) = self.pool.executors.get_mut(executor) {
                e.outstanding.push_back((sid, task));
            }
            self.commands
                .entry(node.clone())
                .or_default()
                .push(NodeCommand::Run(TaskAssignment {
                    executor: *executor,
                    session: sid,
                    task,
                    attempt: slot.attempt,
                    input: Payload::Inline(input),
                    sources: None,
                }));
        }
        job.ranks = infos;
        job.state = JobState::Running;
        job.started_ms = Some(now_ms);
        tracing::info!(job = %sid, ranks, nodes = %layout.nodelist, "job started");
        self.commits.dirty_sessions.insert(sid);
        for (executor, reply) in std::mem::take(&mut s.job_log_waiters) {
            let targets = self.log_targets(sid, executor);
            self.out.reply(reply, Reply::JobLogTargets(targets));
        }
    }

    /// Where the ranks of job `sid` run (`bound`: node and executor of each, in rank
    /// order) and how they find rank 0.
    fn job_layout(&self, sid: SessionId, bound: &[(NodeName, ExecutorId)]) -> JobLayout {
        let mut per_node: Vec<(String, u32)> = Vec::new();
        for (node, _) in bound {
            match per_node.last_mut() {
                Some((n, k)) if *node == *n => *k += 1,
                _ => per_node.push((node.to_string(), 1)),
            }
        }
        let nodelist = per_node
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let hostfile: String = per_node
            .iter()
            .map(|(n, k)| format!("{n} slots={k}\n"))
            .collect();
        let first_node = bound[0].0.as_str();
        // Rank 0's node as the head sees it; a loopback address is no use to ranks on
        // other machines, which get the node's name to resolve instead.
        let address_of = |name: &str| {
            self.cluster
                .nodes
                .get(name)
                .map(|n| n.address.clone())
                .filter(|a| !a.is_empty())
        };
        let is_loopback = |a: &str| {
            a.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
        };
        let master_addr = match address_of(first_node) {
            Some(a)
                if !is_loopback(&a)
                    || per_node
                        .iter()
                        .all(|(n, _)| address_of(n).is_some_and(|b| is_loopback(&b))) =>
            {
                a
            }
            _ => first_node.to_string(),
        };
        JobLayout {
            nodelist,
            hostfile,
            master_addr,
            master_port: JOB_MASTER_PORT_BASE + sid.0 % JOB_MASTER_PORT_SPAN,
            per_node,
        }
    }

    /// The rank of running job `job` on `node` whose allocation an exec request starts in:
    /// one that holds its room for Open MPI's daemon (lowest executor id), else any.
    pub(super) fn exec_target(&self, job: SessionId, node: &str) -> Result<ExecutorId, ApiError> {
        let s = self
            .tasks
            .sessions
            .get(&job)
            .ok_or_else(|| api(ErrorKind::NotFound, unknown_session(job)))?;
        let info = s.stored.job.as_ref().ok_or_else(|| {
            api(
                ErrorKind::InvalidArgument,
                format!("session {job} is not a batch job"),
            )
        })?;
        if info.state != JobState::Running || s.finished || s.job_stop_at_ms.is_some() {
            return Err(api(
                ErrorKind::FailedPrecondition,
                format!("job {job} is not running (it is {})", info.state),
            ));
        }
        let on_node: Vec<&RankInfo> = info
            .ranks
            .iter()
            .filter(|r| r.node == node && self.pool.executors.contains_key(&r.executor))
            .collect();
        let pick = on_node
            .iter()
            .filter(|r| !(info.spec.mpi && r.rank == 0))
            .map(|r| r.executor)
            .min()
            .or_else(|| on_node.iter().map(|r| r.executor).min());
        pick.ok_or_else(|| {
            let nodes: std::collections::BTreeSet<&str> =
                info.ranks.iter().map(|r| r.node.as_str()).collect();
            api(
                ErrorKind::NotFound,
                format!(
                    "job {job} has no live rank on node `{node}`; its nodes: {}",
                    nodes.into_iter().collect::<Vec<_>>().join(",")
                ),
            )
        })
    }
}

impl SessionEntry {
    /// Records how a job's rank ended: its exit code, the job's first failure, and when the
    /// other ranks are stopped (a short grace after a failure; at once when an `--mpi`
    /// job's `mpirun`, rank 0, ends, since the other ranks only hold its daemons' room).
    /// Says whether its record changed (to be written with the batch).
    pub(super) fn note_rank_end(
        &mut self,
        task: TaskId,
        exit_code: Option<i32>,
        failure: Option<&str>,
        now_ms: u64,
    ) -> bool {
        let s = self;
        let Some(job) = s.stored.job.as_mut() else {
            return false;
        };
        let Some(rank) = task.0.checked_sub(1).and_then(|r| u32::try_from(r).ok()) else {
            return false;
        };
        if let Some(r) = job.ranks.get_mut(rank as usize) {
            r.exit_code = exit_code;
        }
        if let Some(message) = failure {
            if job.failure.is_none() && !s.cancelled && !s.job_timed_out {
                job.failure = Some(JobFailure {
                    rank: Some(rank),
                    exit_code,
                    message: message.to_string(),
                });
            }
            s.job_stop_at_ms.get_or_insert(now_ms + JOB_FAIL_GRACE_MS);
        }
        if job.spec.mpi && rank == 0 {
            s.job_stop_at_ms = Some(now_ms);
        }
        true
    }
}

/// What every rank of a starting job shares: where they run and how they find rank 0.
pub(super) struct JobLayout {
    /// Each node with its number of ranks, in rank order.
    pub(super) per_node: Vec<(String, u32)>,
    pub(super) nodelist: String,
    pub(super) hostfile: String,
    pub(super) master_addr: String,
    pub(super) master_port: u64,
}

/// The task input of one rank (`rank`, `local` rank on its node, `local_world` ranks on
/// its node) of job `sid`: its environment, the hostfile, and for an `--mpi` job's rank 0
/// the `mpirun` command line.
pub(super) fn rank_input(
    sid: SessionId,
    spec: &flame_protocol::model::JobSpec,
    layout: &JobLayout,
    (rank, local, local_world): (usize, u32, u32),
    credentials: Option<&crate::auth::JobCredentials>,
) -> Bytes {
    let ranks = spec.ranks as usize;
    let mut env = Vec::with_capacity(12);
    for (keys, value) in [
        (&["FLAME_JOB_ID"][..], sid.0.to_string()),
        (&["FLAME_RANK", "RANK"], rank.to_string()),
        (&["FLAME_WORLD_SIZE", "WORLD_SIZE"], ranks.to_string()),
        (&["FLAME_LOCAL_RANK", "LOCAL_RANK"], local.to_string()),
        (
            &["FLAME_LOCAL_WORLD_SIZE", "LOCAL_WORLD_SIZE"],
            local_world.to_string(),
        ),
        (&["FLAME_NODELIST"], layout.nodelist.clone()),
        (&["MASTER_ADDR"], layout.master_addr.clone()),
        (&["MASTER_PORT"], layout.master_port.to_string()),
    ] {
        for key in keys {
            env.push(((*key).to_string(), value.clone()));
        }
    }
    // `flame-mpi-agent` needs it to ask for Open MPI's daemons on other nodes.
    if let (true, Some(jobs)) = (spec.mpi, credentials) {
        env.push((
            JOB_TOKEN_ENV.to_string(),
            jobs.for_job(sid).expose().to_string(),
        ));
    }
    let argv = (spec.mpi && rank == 0).then(|| {
        let mut argv: Vec<String> = vec![
            "mpirun".into(),
            "-np".into(),
            ranks.to_string(),
            "--mca".into(),
            "plm_rsh_no_tree_spawn".into(),
            "1".into(),
            spec.command.clone(),
        ];
        argv.extend(spec.args.iter().cloned());
        argv
    });
    RankLaunch {
        env,
        hostfile: layout.hostfile.clone(),
        argv,
        hold: spec.mpi && rank != 0,
    }
    .encode()
}
