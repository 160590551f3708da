//! Lineage, one level: a task output left with no copy while its session is unfinished
//! is rebuilt by running the task that made it once more, as a hidden run ([`Rebuild`]):
//! its own attempt number (past the task's), sent to one of the session's executors
//! before its pending tasks, fenced like any run, and never a result: the task's final
//! state and the result its watchers got do not change ("one final state per acked
//! task"). If the rebuilt output has the same id (the same bytes), the node that made it
//! holds the object again; if not, the object stays lost with "rebuilt output differs
//! (non-deterministic task)". Tasks whose input is the object wait for the rebuild
//! instead of failing. To re-run a task the head keeps the input of a task whose output
//! is an object while its session lives (in memory only, counted in the owner's
//! `input_bytes`): after a head restart, outputs are not rebuilt (the book is rebuilt
//! from what nodes report, with origin `Put`).

use super::objects::ObjectKey;
use super::*;
use flame_protocol::object::ObjectRef;

/// A lost task output being made again by running its task once more, hidden (one level
/// of lineage). The task's final state and result do not change: the run's result only
/// restores where the object is, when its bytes hash the same.
#[derive(Debug, Clone)]
pub(super) struct Rebuild {
    pub(super) owner: OwnerName,
    pub(super) object: ObjectRef,
    /// The task's input, kept with its slot while its output is an object.
    pub(super) input: Payload,
    /// The executor running it, once sent.
    pub(super) running: Option<ExecutorId>,
    /// The attempt number its result must echo (past the task's own attempts).
    pub(super) attempt: u32,
    /// Runs lost with their executor; bounded by the application's `max_attempts`.
    pub(super) tries: u32,
    /// How the copies went, for the text if the rebuild fails.
    pub(super) lost: String,
    /// Tasks held because their input is this object (of any of the owner's sessions),
    /// until it is back or given up.
    pub(super) waiting: Vec<(SessionId, TaskId)>,
}

/// Rebuilds in progress: the lineage room.
#[derive(Debug, Default)]
pub(super) struct Rebuilds {
    pub(super) by_task: HashMap<(SessionId, TaskId), Rebuild>,
    /// Per session, rebuilds waiting for one of its executors, in order.
    pub(super) queue: BTreeMap<SessionId, VecDeque<TaskId>>,
    pub(super) by_object: HashMap<ObjectKey, (SessionId, TaskId)>,
}

impl Rebuilds {
    /// Rebuilds of `session` waiting for an executor (the scheduler's demand).
    pub(super) fn queued(&self, session: SessionId) -> u64 {
        self.queue.get(&session).map_or(0, |q| q.len() as u64)
    }

    /// The next rebuild of `session` to send to `executor`: its task, attempt and input.
    pub(super) fn next(
        &mut self,
        session: SessionId,
        executor: ExecutorId,
    ) -> Option<(TaskId, u32, &Rebuild)> {
        let queue = self.queue.get_mut(&session)?;
        let task = queue.pop_front()?;
        if queue.is_empty() {
            self.queue.remove(&session);
        }
        let rebuild = self.by_task.get_mut(&(session, task))?;
        rebuild.running = Some(executor);
        Some((task, rebuild.attempt, rebuild))
    }

    /// Holds `task` of `session` until the object `key` is rebuilt; false when no
    /// rebuild of it is under way.
    pub(super) fn hold(&mut self, key: &ObjectKey, session: SessionId, task: TaskId) -> bool {
        let Some(at) = self.by_object.get(key) else {
            return false;
        };
        match self.by_task.get_mut(at) {
            Some(r) => {
                r.waiting.push((session, task));
                true
            }
            None => false,
        }
    }
}

impl Core {
    /// Starts re-running `task` of `session`, whose output `key` lost its last copy
    /// (`why`); `Err` says why it cannot be.
    pub(super) fn start_rebuild(
        &mut self,
        key: &ObjectKey,
        size: u64,
        (session, task): (SessionId, TaskId),
        why: &str,
    ) -> Result<(), String> {
        let s = self
            .tasks
            .sessions
            .get_mut(&session)
            .filter(|s| !s.finished && !s.cancelled && s.stored.job.is_none())
            .ok_or("its session has ended")?;
        let slot = slot_of(&mut s.tasks, task).ok_or("the task is not in memory")?;
        if slot.slot != Slot::Succeeded {
            return Err("the task is not final".into());
        }
        let attempt = slot.attempt + 1;
        let rebuild = Rebuild {
            owner: key.0.clone(),
            object: ObjectRef { id: key.1, size },
            input: slot.input.clone(),
            running: None,
            attempt,
            tries: 0,
            lost: why.to_string(),
            waiting: Vec::new(),
        };
        self.rebuilds.by_task.insert((session, task), rebuild);
        self.rebuilds
            .queue
            .entry(session)
            .or_default()
            .push_back(task);
        self.rebuilds.by_object.insert(key.clone(), (session, task));
        self.reschedule = true;
        tracing::info!(owner = %key.0, object = %key.1, %session, %task, "re-running a task to rebuild its lost output");
        Ok(())
    }

    /// A rebuild's result from `node`: the same bytes (same id) restore the object there;
    /// other bytes, a failure or a cancel leave it lost, saying why. The task's own final
    /// state is untouched. Tasks held for the object go back to pending.
    pub(super) fn rebuild_done(&mut self, node: &str, r: NodeTaskResult) {
        let Some(rb) = self.rebuilds.by_task.remove(&(r.session, r.task)) else {
            return;
        };
        let key = (rb.owner.clone(), rb.object.id);
        self.rebuilds.by_object.remove(&key);
        let failed = match &r.outcome {
            TaskOutcome::Object(o) if o.id == rb.object.id => None,
            TaskOutcome::Object(_) | TaskOutcome::Succeeded(_) => Some(format!(
                "{}; rebuilt output differs (non-deterministic task)",
                rb.lost
            )),
            TaskOutcome::Failed(m) => Some(format!(
                "{}; re-running task {} of session {} failed: {m}",
                rb.lost, r.task, r.session
            )),
            TaskOutcome::Cancelled => Some(format!("{}; its re-run was cancelled", rb.lost)),
        };
        match failed {
            None => {
                self.objects.confirm(&key.0, key.1, &NodeName::from(node));
                tracing::info!(owner = %key.0, object = %key.1, node, "lost output rebuilt");
            }
            Some(why) => {
                tracing::warn!(owner = %key.0, object = %key.1, %why, "lost output not rebuilt");
                if let Some(e) = self.objects.get_mut(&key.0, &key.1) {
                    e.missing = Some(why);
                }
            }
        }
        self.release_waiting(rb.waiting);
    }

    /// Tasks held for a rebuild go back to the front of their session's queue.
    fn release_waiting(&mut self, waiting: Vec<(SessionId, TaskId)>) {
        for (session, task) in waiting.into_iter().rev() {
            if let Some(s) = self.tasks.sessions.get_mut(&session) {
                s.pending.push_front(task);
            }
        }
        self.reschedule = true;
    }

    /// A rebuild whose executor went goes back in the queue, or is given up after the
    /// application's `max_attempts` runs. Returns whether `task` of `session` was one.
    pub(super) fn requeue_rebuild(&mut self, session: SessionId, task: TaskId, why: &str) -> bool {
        let max = self
            .tasks
            .sessions
            .get(&session)
            .and_then(|s| self.apps.get(s.stored.application.as_str()))
            .map_or(self.config.max_attempts, |a| a.max_attempts);
        let Some(rb) = self.rebuilds.by_task.get_mut(&(session, task)) else {
            return false;
        };
        if rb.running.is_none() {
            return false;
        }
        rb.running = None;
        rb.tries += 1;
        rb.attempt += 1;
        if rb.tries < max {
            self.rebuilds
                .queue
                .entry(session)
                .or_default()
                .push_front(task);
            return true;
        }
        let result = NodeTaskResult {
            executor: ExecutorId(0),
            session,
            task,
            attempt: rb.attempt,
            outcome: TaskOutcome::Failed(format!(
                "its executor was lost {max} time(s); last: {why}"
            )),
            exit_code: None,
        };
        self.rebuild_done("", result);
        true
    }

    /// Session `sid` ended: its rebuilds go (their objects went with it).
    pub(super) fn drop_rebuilds(&mut self, sid: SessionId) {
        self.rebuilds.queue.remove(&sid);
        let tasks: Vec<(SessionId, TaskId)> = self
            .rebuilds
            .by_task
            .keys()
            .filter(|(s, _)| *s == sid)
            .copied()
            .collect();
        for k in tasks {
            if let Some(rb) = self.rebuilds.by_task.remove(&k) {
                self.rebuilds.by_object.remove(&(rb.owner, rb.object.id));
                // Tasks of other sessions held for it: back to pending (they fail then,
                // naming the object, which left with its session).
                self.release_waiting(rb.waiting);
            }
        }
    }
}
