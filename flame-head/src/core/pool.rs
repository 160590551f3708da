//! The executors room: the executors, their ids (reserved durably in blocks), how deep
//! each one's queue runs, and the backoff of applications whose executors keep failing.

use super::*;
use std::collections::HashSet;

/// The executors room.
#[derive(Debug)]
pub(super) struct Pool {
    pub(super) executors: BTreeMap<ExecutorId, ExecutorEntry>,
    /// The next executor id; never below an id in use or handed out before a restart.
    pub(super) next_executor: u64,
    /// Executor ids below this are reserved durably; launches stop at the bound until the
    /// next block is durable, so a restarted head never reuses an id.
    pub(super) ids_reserved: u64,
    pub(super) reservation_pending: bool,
    /// Per application and owner: executors in a row that died before saying ready, and
    /// the time before which no new one is launched. Keeps a broken command from a hot
    /// loop.
    pub(super) launch_backoff: HashMap<PoolKey, (u32, u64)>,
    /// Per application and owner: why its last executor failed to start, until one
    /// starts; shown to users as the reason their session waits.
    pub(super) launch_errors: HashMap<PoolKey, String>,
    /// Per application and owner: an executor said ready since the application was
    /// registered or updated, and no launch failed since. Other pools launch one executor
    /// at a time (the scheduler's `AppView::probing`).
    pub(super) proven: HashSet<PoolKey>,
    /// Owners' uids, durable before any launch uses one.
    pub(super) owner_uids: crate::owner_uids::OwnerUids,
}

impl Pool {
    /// A pool whose ids start at `next_executor` (reserved up to there).
    pub(super) fn new(next_executor: u64, owner_uids: crate::owner_uids::OwnerUids) -> Pool {
        Pool {
            executors: BTreeMap::new(),
            next_executor,
            ids_reserved: next_executor,
            reservation_pending: false,
            launch_backoff: HashMap::new(),
            launch_errors: HashMap::new(),
            proven: HashSet::new(),
            owner_uids,
        }
    }
}

/// Executors are pooled per application and owner: an executor serves only sessions of
/// its application and its owner, and launch failures back off per pool.
pub(super) type PoolKey = (AppName, OwnerName);

#[derive(Debug)]
pub(super) struct ExecutorEntry {
    pub(super) node: NodeName,
    pub(super) application: AppName,
    /// The owner it was launched for: it serves only that owner's sessions.
    pub(super) owner: OwnerName,
    pub(super) phase: ExecutorPhase,
    pub(super) session: Option<SessionId>,
    /// What it holds on its node.
    pub(super) resources: Resources,
    /// GPU indices it holds on its node.
    pub(super) gpus: Vec<u32>,
    /// Launched with a spec that has since been updated: released instead of reused.
    pub(super) stale: bool,
    /// Most tasks the node accepts outstanding on this executor.
    pub(super) credit: u32,
    /// Smoothed time one task takes on this executor, in microseconds, measured between
    /// consecutive results while it stayed busy. Sizes how deep its queue may be.
    pub(super) task_us_avg: f64,
    pub(super) last_result_ms: u64,
    /// Tasks sent and not yet answered.
    /// In dispatch order: the node runs them in this order, so the front one is the task
    /// running now and the rest wait on the node.
    pub(super) outstanding: VecDeque<(SessionId, TaskId)>,
    pub(super) quiet_since_ms: u64,
    /// When it was told to unbind, while it is Unbinding.
    pub(super) unbinding_since_ms: u64,
}

/// Executor ids reserved per store write.
pub const EXECUTOR_ID_BLOCK: u64 = 1024;

/// How much queued work, in microseconds, the head keeps on an executor beyond the task it
/// runs. Short tasks get deep queues (throughput); long ones get one queued task, so that
/// an unbind or a new session waits for little work already handed out (fairness).
pub const QUEUE_TARGET_US: f64 = 20_000.0;

/// Assumed task time before anything is measured: start shallow, deepen as results show
/// the tasks are short.
pub const TASK_US_INITIAL: f64 = 10_000.0;

/// Weight of a new sample in the smoothed task time.
pub(super) const TASK_US_ALPHA: f64 = 0.2;

/// Tasks to keep outstanding on an executor: the one running plus a queue sized by
/// [`QUEUE_TARGET_US`] (at least one queued task, for pipelining), within what the node
/// allows.
pub fn outstanding_max(task_us_avg: f64, credit: u32) -> u32 {
    let queued = (QUEUE_TARGET_US / task_us_avg.max(1.0)).ceil();
    let wanted = if queued.is_finite() {
        queued as u64 + 1
    } else {
        u64::MAX
    };
    wanted.max(2).min(u64::from(credit.max(1))) as u32
}

/// First pause after an executor dies before it is ready; doubles per failure in a row.
pub const LAUNCH_BACKOFF_MIN_MS: u64 = 200;

/// Longest pause between launches of a failing application.
pub const LAUNCH_BACKOFF_MAX_MS: u64 = 30_000;

impl Core {
    /// Records one more failure in a row of `application`'s executors of `owner` and
    /// returns the pause, in ms, before the next launch for that owner.
    pub(super) fn back_off(&mut self, application: &str, owner: &str, now_ms: u64) -> u64 {
        let (failures, not_before) = self
            .pool
            .launch_backoff
            .entry((AppName::from(application), OwnerName::of(owner)))
            .or_default();
        *failures += 1;
        let pause = LAUNCH_BACKOFF_MIN_MS
            .saturating_mul(1 << (*failures - 1).min(16))
            .min(LAUNCH_BACKOFF_MAX_MS);
        *not_before = now_ms + pause;
        pause
    }

    /// An executor of `application` for `owner` died before saying ready, on `node`, for
    /// `reason`: launches back off, and the pool launches one executor at a time again. At
    /// [`limits::APP_LAUNCH_FAILURES_MAX`] such deaths in a row, the sessions of that owner
    /// and application that hold no executor end: their unfinished tasks fail, naming the
    /// application and the last failure, instead of waiting for a start that does not
    /// come. Returns the pause, in ms, before the next launch.
    pub(super) fn launch_failed(
        &mut self,
        application: &AppName,
        owner: &OwnerName,
        node: &str,
        reason: &str,
        now_ms: u64,
    ) -> u64 {
        let pause = self.back_off(application, owner, now_ms);
        let pool = (application.clone(), owner.clone());
        self.pool.proven.remove(&pool);
        let last = format!("on node {node}: {reason}");
        self.pool.launch_errors.insert(pool.clone(), last.clone());
        let failures = self.pool.launch_backoff.get(&pool).map_or(0, |b| b.0);
        if failures < limits::APP_LAUNCH_FAILURES_MAX
            || application.starts_with(JOB_APPLICATION_PREFIX)
        {
            // A job's rank that fails to start fails its job at once (`job_rank_lost`).
            return pause;
        }
        let waiting: Vec<SessionId> = self
            .tasks
            .sessions
            .values()
            .filter(|s| {
                s.stored.application == application.as_str()
                    && owner_name(&s.stored.owner) == owner.as_str()
                    && !s.finished
                    && !s.cancelled
                    && s.counts.unfinished() > 0
            })
            .map(|s| s.stored.id)
            .filter(|&id| self.executors_of(id) == 0)
            .collect();
        let message = format!(
            "application `{application}` failed to start {failures} times in a row (the limit \
             is {}); the last {last}",
            limits::APP_LAUNCH_FAILURES_MAX
        );
        for id in waiting {
            tracing::warn!(session = %id, app = %application, %owner, failures, "ending a session whose application does not start");
            self.end_unfinished(id, TaskOutcome::Failed(message.clone()), None, now_ms);
        }
        pause
    }

    /// `application` was registered or updated: what its earlier executors did says
    /// nothing about the new spec, so launch failures, their backoff and what was proven
    /// are forgotten, for every owner.
    pub(super) fn forget_launches_of(&mut self, application: &str) {
        self.pool
            .launch_backoff
            .retain(|(app, _), _| app.as_str() != application);
        self.pool
            .launch_errors
            .retain(|(app, _), _| app.as_str() != application);
        self.pool
            .proven
            .retain(|(app, _)| app.as_str() != application);
    }

    /// What the executors alive on `node` hold.
    pub(super) fn allocated_on(&self, node: &str) -> Resources {
        let mut total = Resources {
            cpu_millis: 0,
            memory_bytes: None,
            gpus: 0,
        };
        for e in self.pool.executors.values().filter(|e| e.node == node) {
            total.cpu_millis = total.cpu_millis.saturating_add(e.resources.cpu_millis);
            if let Some(m) = e.resources.memory_bytes {
                total.memory_bytes = Some(total.memory_bytes.unwrap_or(0).saturating_add(m));
            }
            total.gpus = total.gpus.saturating_add(e.resources.gpus);
        }
        total
    }

    pub(super) fn executors_of(&self, session: SessionId) -> u32 {
        self.pool
            .executors
            .values()
            .filter(|e| {
                e.session == Some(session)
                    && matches!(e.phase, ExecutorPhase::Binding | ExecutorPhase::Bound)
            })
            .count() as u32
    }

    /// `count` GPU indices of `node` that no executor holds, or `None` if it has fewer.
    pub(super) fn free_gpus(&self, node: &str, count: u32) -> Option<Vec<u32>> {
        if count == 0 {
            return Some(Vec::new());
        }
        let n = self.cluster.nodes.get(node)?;
        let held: std::collections::HashSet<u32> = self
            .pool
            .executors
            .values()
            .filter(|e| e.node == node)
            .flat_map(|e| e.gpus.iter().copied())
            .collect();
        let free: Vec<u32> = n
            .registration
            .allocatable
            .gpus
            .iter()
            .map(|g| g.index)
            .filter(|i| !held.contains(i))
            .take(count as usize)
            .collect();
        (free.len() == count as usize).then_some(free)
    }

    /// Asks the store to reserve the next block of executor ids.
    pub(super) fn reserve_executor_ids(&mut self) {
        if self.pool.reservation_pending {
            return;
        }
        self.pool.reservation_pending = true;
        let upto = self.pool.ids_reserved.max(self.pool.next_executor) + EXECUTOR_ID_BLOCK;
        self.commits.ops.push(StoreOp::PutCounters {
            next_session: None,
            next_executor: Some(upto),
        });
        self.commits
            .after
            .push(AfterCommit::ReserveExecutorIds { upto });
    }

    /// `owner`'s durable uid; `None` while a new one is being written (its commit
    /// reschedules), or when the range has none left (its sessions are told why).
    pub(super) fn owner_uid(&mut self, owner: &str) -> Option<u32> {
        use crate::owner_uids::UidLookup;
        match self.pool.owner_uids.uid(owner) {
            Ok(UidLookup::Ready(uid)) => Some(uid),
            Ok(UidLookup::Pending) => None,
            Ok(UidLookup::Reserved(uid)) => {
                tracing::info!(owner, uid, "assigning a uid to a new owner");
                self.commits.ops.push(StoreOp::PutOwnerUid {
                    owner: owner.to_string(),
                    uid,
                });
                self.commits.after.push(AfterCommit::OwnerUid {
                    owner: owner.to_string(),
                });
                None
            }
            Err(e) => {
                tracing::error!("{e}");
                let why = e.to_string();
                for s in self.tasks.sessions.values_mut() {
                    if owner_name(&s.stored.owner) == owner {
                        s.waiting = Some(why.clone());
                    }
                }
                None
            }
        }
    }

    /// After an application's spec changed: its Idle executors are released now, the others
    /// when they leave their session, so new work runs on the new spec.
    pub(super) fn retire_executors_of(&mut self, application: &str, now_ms: u64) {
        let mut idle = Vec::new();
        for (id, e) in self.pool.executors.iter_mut() {
            if e.application == application {
                e.stale = true;
                if e.phase == ExecutorPhase::Idle {
                    idle.push(*id);
                }
            }
        }
        for executor in idle {
            self.apply(Decision::Release { executor }, now_ms);
        }
        self.reschedule = true;
    }
}
