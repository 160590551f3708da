//! The tasks room: sessions, the slots of their tasks, and what owners hold against
//! their quotas; a task's way to its final state and a session's out of memory.

use super::*;

/// The tasks room.
#[derive(Debug)]
pub(super) struct Tasks {
    pub(super) sessions: BTreeMap<SessionId, SessionEntry>,
    /// The next session id; ids below it were handed out (durably: see `create_session`).
    pub(super) next_session: u64,
    /// What each owner holds against its quotas.
    pub(super) ledger: Ledger,
    /// Results made final in this batch, per session, for its watchers.
    pub(super) watch_out: BTreeMap<SessionId, Vec<TaskResult>>,
    /// Finished sessions to take out of memory, each not before the time given: durable
    /// ones once their final record is durable and no executor is bound to them (its usage
    /// must be in that record), ephemeral ones after [`EPHEMERAL_KEPT_MS`].
    pub(super) evict_pending: BTreeMap<SessionId, u64>,
    /// Set when `evict_pending` may have a session due: checked at the end of the batch.
    pub(super) evict_due: bool,
}

impl Tasks {
    pub(super) fn new(next_session: u64) -> Tasks {
        Tasks {
            sessions: BTreeMap::new(),
            next_session,
            ledger: Ledger::default(),
            watch_out: BTreeMap::new(),
            evict_pending: BTreeMap::new(),
            evict_due: false,
        }
    }

    /// Makes task `task` of `session` final: counters, the slot (its input dropped; its
    /// outcome kept for an ephemeral session, or when it failed), the owner's quota
    /// holdings, and the session's watchers.
    pub(super) fn finalize(
        &mut self,
        session: SessionId,
        task: TaskId,
        attempt: u32,
        outcome: TaskOutcome,
    ) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(slot) = slot_of(&mut s.tasks, task) else {
            return;
        };
        if slot.slot.is_final() {
            return;
        }
        debug_assert!(
            !matches!(slot.slot, Slot::Unacked | Slot::Rejected),
            "task {task} of session {session} made final before it was acked"
        );
        let before = slot_held(slot, s.ephemeral);
        if slot.slot == Slot::Pending {
            s.counts.pending = take_one(s.counts.pending, "pending");
        } else {
            s.counts.running = take_one(s.counts.running, "running");
        }
        slot.slot = final_slot(&outcome);
        // A task whose output is an object keeps its input while its session lives: the
        // output is rebuilt from it if its last copy is lost (lineage, `objects.rs`).
        if !matches!(outcome, TaskOutcome::Object(_)) {
            slot.input = Payload::default();
        }
        count_final(&mut s.counts, &outcome);
        if s.ephemeral || matches!(outcome, TaskOutcome::Failed(_)) {
            slot.outcome = Some(outcome.clone());
        }
        let after = slot_held(slot, s.ephemeral);
        reheld(&mut self.ledger, owner_name(&s.stored.owner), before, after);
        if s.watchers > 0 {
            self.watch_out.entry(session).or_default().push(TaskResult {
                task,
                attempt,
                outcome,
            });
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    /// Assigned an id; its batch is not durable yet.
    Unacked,
    /// Its batch failed to persist; it never existed for the client.
    Rejected,
    Pending,
    Running(ExecutorId),
    /// A result was accepted and is being made durable.
    Completing,
    Succeeded,
    Failed,
    Cancelled,
}

impl Slot {
    pub(super) fn is_final(self) -> bool {
        matches!(self, Slot::Succeeded | Slot::Failed | Slot::Cancelled)
    }

    pub(super) fn state(self) -> TaskState {
        match self {
            Slot::Unacked | Slot::Rejected | Slot::Pending => TaskState::Pending,
            Slot::Running(_) | Slot::Completing => TaskState::Running,
            Slot::Succeeded => TaskState::Succeeded,
            Slot::Failed => TaskState::Failed,
            Slot::Cancelled => TaskState::Cancelled,
        }
    }
}

pub(super) fn final_slot(outcome: &TaskOutcome) -> Slot {
    match outcome {
        TaskOutcome::Succeeded(_) | TaskOutcome::Object(_) => Slot::Succeeded,
        TaskOutcome::Failed(_) => Slot::Failed,
        TaskOutcome::Cancelled => Slot::Cancelled,
    }
}

pub(super) fn count_final(counts: &mut TaskCounts, outcome: &TaskOutcome) {
    match outcome {
        TaskOutcome::Succeeded(_) | TaskOutcome::Object(_) => counts.succeeded += 1,
        TaskOutcome::Failed(_) => counts.failed += 1,
        TaskOutcome::Cancelled => counts.cancelled += 1,
    }
}

#[derive(Debug)]
pub(super) struct TaskSlot {
    pub(super) slot: Slot,
    /// Attempt number, from 1; bumped whenever the task goes back to pending, so results
    /// of an earlier attempt are refused.
    pub(super) attempt: u32,
    /// Attempts that ran and failed: its executor died while running it, or (with
    /// `retry_on_error`) the application reported an error. Bounded by `max_attempts`.
    pub(super) runs_failed: u32,
    /// Inline bytes, or a reference to an object in the nodes' caches (which the quota
    /// ledger counts at [`Payload::held_bytes`]: the head holds the reference only).
    pub(super) input: Payload,
    /// Kept for ephemeral sessions, which have no store to read it back from, and for
    /// failures, whose messages `ListTasks` shows.
    pub(super) outcome: Option<TaskOutcome>,
}

#[derive(Debug)]
pub(super) struct SessionEntry {
    pub(super) stored: StoredSession,
    pub(super) ephemeral: bool,
    /// Index = task id - 1. Emptied once the session has finished.
    pub(super) tasks: Vec<TaskSlot>,
    pub(super) pending: VecDeque<TaskId>,
    /// Pending tasks an executor elsewhere passed over because a node holding their input
    /// object may take them soon (made at the first such task): handed out by node, each
    /// waiting at most the locality wait (`dispatch`).
    pub(super) located: Option<super::locality::LocalityQueue<TaskId, NodeName>>,
    pub(super) counts: TaskCounts,
    /// Batches assigned ids but not yet durable; the session cannot finish meanwhile.
    pub(super) unacked_batches: u32,
    /// Closes written but not yet durable; the session cannot finish meanwhile.
    pub(super) unacked_closes: u32,
    /// Watchers attached while it was unfinished. The server holds them (one may have
    /// lagged out since); results are queued for watchers only while there are any.
    pub(super) watchers: u32,
    pub(super) finished: bool,
    /// Cancelled: batches acked from now on end as Cancelled at once.
    pub(super) cancelled: bool,
    /// Client batch ids seen, with the tasks each created, so a batch sent again after a
    /// lost ack creates nothing new.
    pub(super) batches: HashMap<u64, (TaskId, u32)>,
    /// Why its pending tasks get no executor, from the last scheduling pass.
    pub(super) waiting: Option<String>,
    /// A job: when its remaining ranks are stopped (a rank failed, or its `mpirun` ended).
    pub(super) job_stop_at_ms: Option<u64>,
    /// A job stopped at its time limit.
    pub(super) job_timed_out: bool,
    /// `flame logs` requests for a job that has not started, answered when it does.
    pub(super) job_log_waiters: Vec<(Option<ExecutorId>, ReplyId)>,
    /// How its object inputs and common data reached executors (counted at dispatch).
    /// In memory only, durable sessions included: the store's records do not keep it, so
    /// it starts at zero after a head restart and a finished view read from the store
    /// shows zeros.
    pub(super) data: DataStats,
}

impl TaskSlot {
    /// The slot of an id handed out to a batch that was never stored.
    pub(super) fn hole() -> TaskSlot {
        TaskSlot {
            slot: Slot::Rejected,
            attempt: 0,
            runs_failed: 0,
            input: Payload::default(),
            outcome: None,
        }
    }
}

/// `count` less the one task leaving it. A count that is already zero means the counts and
/// the slots disagree: a bug, caught in debug builds (the simulation checks every step),
/// and kept at zero in release.
pub(super) fn take_one(count: u64, what: &str) -> u64 {
    debug_assert!(count > 0, "a session's {what} count went below zero");
    count.saturating_sub(1)
}

/// The slot of a task id; ids are dense from 1.
pub(super) fn slot_of(tasks: &mut [TaskSlot], task: TaskId) -> Option<&mut TaskSlot> {
    let idx = usize::try_from(task.0.checked_sub(1)?).ok()?;
    tasks.get_mut(idx)
}

/// What a reference to an object costs in the head's memory, as [`Payload::held_bytes`]
/// counts it.
pub(super) const OBJECT_REF_HELD_BYTES: u64 = flame_protocol::object::OBJECT_ID_BYTES as u64 + 8;

/// Bytes of an outcome's payload.
pub(super) fn outcome_bytes(o: &TaskOutcome) -> u64 {
    match o {
        TaskOutcome::Succeeded(b) => b.len() as u64,
        TaskOutcome::Failed(m) => m.len() as u64,
        TaskOutcome::Cancelled => 0,
        TaskOutcome::Object(_) => OBJECT_REF_HELD_BYTES,
    }
}

/// What a task slot holds against its owner's quotas: whether it counts as a task (not
/// final, or kept by an ephemeral session, which has no store), and its bytes in memory.
pub(super) fn slot_held(t: &TaskSlot, ephemeral: bool) -> (u64, u64) {
    let task = match t.slot {
        Slot::Rejected => false,
        slot if slot.is_final() => ephemeral,
        _ => true,
    };
    let bytes = t.input.held_bytes() as u64 + t.outcome.as_ref().map_or(0, outcome_bytes);
    (u64::from(task), bytes)
}

/// Moves `owner`'s holdings from what a slot held (`before`) to what it holds (`after`).
pub(super) fn reheld(ledger: &mut Ledger, owner: &str, before: (u64, u64), after: (u64, u64)) {
    ledger.release(
        owner,
        Held {
            sessions: 0,
            tasks: before.0.saturating_sub(after.0),
            bytes: before.1.saturating_sub(after.1),
        },
    );
    ledger.charge(
        owner,
        Held {
            sessions: 0,
            tasks: after.0.saturating_sub(before.0),
            bytes: after.1.saturating_sub(before.1),
        },
    );
}

/// Everything a session holds against its owner's quotas, recomputed from its state.
pub(super) fn held_of(s: &SessionEntry) -> Held {
    let mut held = Held {
        sessions: 1,
        tasks: 0,
        bytes: s.stored.common_data.held_bytes() as u64,
    };
    for t in &s.tasks {
        let (task, bytes) = slot_held(t, s.ephemeral);
        held.tasks += task;
        held.bytes += bytes;
    }
    held
}

impl SessionEntry {
    /// How the counters differ from the slots they count, if they do: they are kept in
    /// step as tasks move. (A finished durable session's slots are gone: nothing to
    /// compare.)
    pub(super) fn count_mismatch(&self) -> Option<String> {
        if self.finished && self.tasks.is_empty() {
            return None;
        }
        let mut c = TaskCounts::default();
        for t in &self.tasks {
            match t.slot {
                Slot::Unacked | Slot::Rejected => {}
                Slot::Pending => c.pending += 1,
                Slot::Running(_) | Slot::Completing => c.running += 1,
                Slot::Succeeded => c.succeeded += 1,
                Slot::Failed => c.failed += 1,
                Slot::Cancelled => c.cancelled += 1,
            }
        }
        (c != self.counts).then(|| format!("counters {:?}, slots {c:?}", self.counts))
    }

    /// A session as stored, with nothing in memory yet.
    pub(super) fn new(stored: StoredSession, ephemeral: bool) -> SessionEntry {
        SessionEntry {
            stored,
            ephemeral,
            tasks: Vec::new(),
            pending: VecDeque::new(),
            located: None,
            counts: TaskCounts::default(),
            unacked_batches: 0,
            unacked_closes: 0,
            watchers: 0,
            finished: false,
            cancelled: false,
            batches: HashMap::new(),
            waiting: None,
            job_stop_at_ms: None,
            job_timed_out: false,
            job_log_waiters: Vec::new(),
            data: DataStats::default(),
        }
    }

    pub(super) fn info(&self, executors: u32) -> SessionInfo {
        SessionInfo {
            id: self.stored.id,
            application: self.stored.application.clone(),
            owner: self.stored.owner.clone(),
            priority: self.stored.priority,
            state: self.stored.state,
            ephemeral: self.ephemeral,
            counts: self.counts,
            executors,
            created_ms: self.stored.created_ms,
            closed_ms: self.stored.closed_ms,
            waiting: if self.counts.pending > 0 {
                self.waiting.clone()
            } else {
                None
            },
            usage: self.stored.usage.clone(),
            job: self.stored.job.clone(),
            data: self.data,
        }
    }

    /// Adds what an executor used while bound to this session; one record per executor.
    pub(super) fn record_usage(
        &mut self,
        executor: ExecutorId,
        node: &str,
        usage: Usage,
        ended: Option<&str>,
    ) {
        let list = &mut self.stored.usage;
        let pos = match list.iter().position(|u| u.executor == executor) {
            Some(pos) => pos,
            None if list.len() < USAGE_RECORDS_MAX => {
                list.push(ExecutorUsage {
                    executor,
                    node: node.to_string(),
                    bound_ms: 0,
                    cpu_ms: 0,
                    memory_peak_bytes: 0,
                    throttled_ms: 0,
                    ended: None,
                });
                list.len() - 1
            }
            // Past the cap, later executors are added into the last record.
            None => list.len() - 1,
        };
        let Some(r) = list.get_mut(pos) else {
            return;
        };
        r.bound_ms = r.bound_ms.saturating_add(usage.bound_ms);
        r.cpu_ms = r.cpu_ms.saturating_add(usage.cpu_ms);
        r.throttled_ms = r.throttled_ms.saturating_add(usage.throttled_ms);
        r.memory_peak_bytes = r.memory_peak_bytes.max(usage.memory_peak_bytes);
        if let Some(why) = ended {
            r.ended = Some(why.to_string());
        }
    }
}

/// How long a finished ephemeral session stays in memory (and counts against its owner's
/// quotas) before it goes: it has no store, so a watcher that reconnects within the client
/// library's reconnect window still gets its results.
pub const EPHEMERAL_KEPT_MS: u64 = 60_000;

impl Core {
    /// Takes the finished sessions that are due out of memory: an ephemeral one at once, a
    /// durable one once its final record (and its view, in the store's `finished` table) is
    /// durable. A session still bound to an executor waits: that executor's usage goes in
    /// its record when it unbinds.
    pub(super) fn evict_finished(&mut self, now_ms: u64) {
        if self.tasks.evict_pending.is_empty() {
            return;
        }
        let bound: std::collections::HashSet<SessionId> = self
            .pool
            .executors
            .values()
            .filter_map(|e| e.session)
            .collect();
        let due: Vec<SessionId> = self
            .tasks
            .evict_pending
            .iter()
            .filter(|(id, at)| **at <= now_ms && !bound.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.tasks.evict_pending.remove(&id);
            let Some(s) = self.tasks.sessions.get(&id).filter(|s| s.finished) else {
                continue;
            };
            if s.ephemeral {
                self.evict(id);
                continue;
            }
            self.commits.dirty_sessions.remove(&id);
            self.commits.ops.push(StoreOp::PutSession(s.stored.clone()));
            self.commits
                .ops
                .push(StoreOp::PutFinished(Box::new(s.info(0))));
            self.commits.after.push(AfterCommit::Evict { session: id });
        }
    }

    /// A finished session leaves memory; what it held goes back to its owner's quotas.
    pub(super) fn evict(&mut self, id: SessionId) {
        if let Some(s) = self.tasks.sessions.remove(&id) {
            self.tasks
                .ledger
                .release(owner_name(&s.stored.owner), held_of(&s));
            tracing::debug!(session = %id, "a finished session left the head's memory");
        }
    }

    /// A session id that was handed out but is not in memory: a finished session that
    /// left it (the server checks the store before asking about one).
    pub(super) fn left_memory(&self, id: SessionId) -> bool {
        !self.tasks.sessions.contains_key(&id) && id.0 < self.tasks.next_session
    }

    /// Whether a session is in the head's memory (tests: eviction).
    #[cfg(test)]
    pub(crate) fn holds_session(&self, id: SessionId) -> bool {
        self.tasks.sessions.contains_key(&id)
    }

    /// The first session whose counters disagree with its slots (tests: the simulation
    /// checks every session after every step).
    #[cfg(test)]
    pub(crate) fn count_mismatch(&self) -> Option<String> {
        self.tasks.sessions.values().find_map(|s| {
            s.count_mismatch()
                .map(|m| format!("session {}: {m}", s.stored.id))
        })
    }

    /// Finished sessions still in memory (tests: eviction).
    #[cfg(test)]
    pub(crate) fn finished_in_memory(&self) -> Vec<SessionId> {
        self.tasks
            .sessions
            .values()
            .filter(|s| s.finished)
            .map(|s| s.stored.id)
            .collect()
    }

    /// What `owner` holds against its quotas.
    #[cfg(test)]
    pub(crate) fn held(&self, owner: &str) -> Held {
        self.tasks.ledger.held(owner)
    }

    /// The quota ledger against what the sessions in memory (and those being created)
    /// hold, recomputed: a description of the difference, if any (tests: the simulation
    /// checks it after every step).
    #[cfg(test)]
    pub(crate) fn ledger_mismatch(&self) -> Option<String> {
        let mut expect = Ledger::default();
        for s in self.tasks.sessions.values() {
            expect.charge(owner_name(&s.stored.owner), held_of(s));
        }
        for after in self
            .commits
            .in_flight
            .values()
            .flatten()
            .chain(&self.commits.after)
        {
            if let AfterCommit::AddSession { entry, .. } = after {
                expect.charge(owner_name(&entry.stored.owner), held_of(entry));
            }
        }
        (expect != self.tasks.ledger).then(|| {
            format!(
                "the quota ledger says {:?}, the sessions hold {:?}",
                self.tasks.ledger.all(),
                expect.all()
            )
        })
    }

    /// A closed session whose tasks are all final is finished: watchers are told, and its
    /// per-task memory is dropped.
    pub(super) fn check_finished(&mut self, session: SessionId) {
        let Some(s) = self.tasks.sessions.get_mut(&session) else {
            return;
        };
        if s.finished
            || s.stored.state != SessionState::Closed
            || s.counts.unfinished() > 0
            || s.unacked_batches > 0
            || s.unacked_closes > 0
        {
            return;
        }
        // Once per session, before its slots go: the counters it finished on are its
        // slots'. A difference is a bug: fatal in debug builds, logged in release.
        if let Some(mismatch) = s.count_mismatch() {
            tracing::error!(%session, %mismatch, "a finished session's counters disagree with its tasks");
            debug_assert!(false, "session {session}: {mismatch}");
        }
        s.finished = true;
        if let Some(job) = s.stored.job.as_mut() {
            job.state = if s.cancelled {
                JobState::Cancelled
            } else if s.job_timed_out {
                JobState::TimedOut
            } else if job.failure.is_some() || s.counts.failed > 0 {
                JobState::Failed
            } else {
                JobState::Succeeded
            };
            job.ended_ms = Some(self.now_ms);
            tracing::info!(job = %session, state = %job.state, "job ended");
            self.commits.dirty_sessions.insert(session);
            self.jobs.apps_ended = true;
        }
        // `flame logs` of a job that ended before it started: whatever there is (nothing).
        let log_waiters = std::mem::take(&mut s.job_log_waiters);
        // Results finalized in this batch must reach watchers before Finished.
        if let Some(results) = self.tasks.watch_out.remove(&session) {
            self.out.watch.push((session, WatchMsg::Results(results)));
        }
        if std::mem::take(&mut s.watchers) > 0 {
            // A watcher that cannot take it lags, and learns the end from the store.
            self.out.watch.push((session, WatchMsg::Finished));
        }
        if !s.ephemeral {
            // Only final tasks are left; what they hold (failure messages) goes with them.
            let bytes: u64 = s.tasks.iter().map(|t| slot_held(t, false).1).sum();
            self.tasks.ledger.release(
                owner_name(&s.stored.owner),
                Held {
                    sessions: 0,
                    tasks: 0,
                    bytes,
                },
            );
            s.tasks = Vec::new();
        }
        s.pending = VecDeque::new();
        s.located = None;
        let keep_ms = if s.ephemeral { EPHEMERAL_KEPT_MS } else { 0 };
        self.tasks
            .evict_pending
            .insert(session, self.now_ms.saturating_add(keep_ms));
        self.tasks.evict_due = true;
        self.reschedule = true;
        for (executor, reply) in log_waiters {
            let targets = self.log_targets(session, executor);
            self.out.reply(reply, Reply::JobLogTargets(targets));
        }
        self.objects_session_ended(session);
    }
}
