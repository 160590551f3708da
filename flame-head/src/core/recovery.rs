//! Recovery after a head restart: dispatch and launches wait while nodes reconnect and
//! report what they still run; and a head that did not run for a while (`Stalled`).

use super::*;

impl Core {
    /// After a restart with known nodes: hold dispatch and launches for up to `grace_ms`
    /// while nodes reconnect and report what they still run.
    pub fn start_recovery(&mut self, now_ms: u64, grace_ms: u64) {
        if !self.cluster.nodes.is_empty() && grace_ms > 0 {
            self.recovering_until_ms = Some(now_ms + grace_ms);
            tracing::info!(
                grace_ms,
                nodes = self.cluster.nodes.len(),
                "recovering: waiting for nodes to report"
            );
        } else {
            self.fail_orphaned_jobs(now_ms);
        }
    }

    /// After the head was not running for `stalled_ms`: only silence that happened while
    /// the head ran counts against a node, so every connected node's heartbeat window
    /// starts again now, and a recovery in progress is extended by the stall.
    pub(super) fn on_stalled(&mut self, stalled_ms: u64, now_ms: u64) {
        let mut refreshed = 0usize;
        for n in self.cluster.nodes.values_mut().filter(|n| n.conn.is_some()) {
            n.last_seen_ms = n.last_seen_ms.max(now_ms);
            refreshed += 1;
        }
        if let Some(until) = self.recovering_until_ms.as_mut() {
            *until = until.saturating_add(stalled_ms);
        }
        tracing::warn!(
            stalled_ms,
            nodes = refreshed,
            "the head did not run for {stalled_ms} ms (stopped, frozen or starved); \
             every node gets a fresh heartbeat window"
        );
    }

    /// Ends recovery when every known node is back or the grace has passed. Tasks no
    /// node reported move to their next attempt, so a late result of the run before the
    /// restart is refused.
    pub(super) fn check_recovered(&mut self, now_ms: u64) {
        let Some(until) = self.recovering_until_ms else {
            return;
        };
        let all_back = self.cluster.nodes.values().all(|n| n.conn.is_some());
        if !all_back && now_ms < until {
            return;
        }
        self.recovering_until_ms = None;
        let mut bumped = 0u64;
        for s in self.tasks.sessions.values_mut() {
            for t in s.tasks.iter_mut().filter(|t| t.slot == Slot::Pending) {
                t.attempt += 1;
                bumped += 1;
            }
        }
        self.reschedule = true;
        tracing::info!(all_back, pending = bumped, "recovered; dispatching again");
        self.fail_orphaned_jobs(now_ms);
    }

    /// Loads the stored tasks into their sessions' slots.
    pub(super) fn load_tasks(&mut self, tasks: Vec<(SessionId, TaskId, StoredTask)>) {
        for (sid, tid, task) in tasks {
            let Some(s) = self.tasks.sessions.get_mut(&sid) else {
                tracing::warn!(session = %sid, task = %tid, "task of an unknown session ignored");
                continue;
            };
            // Tasks are stored densely from 1; fill any hole left by a rejected batch.
            let idx = (tid.0.saturating_sub(1)) as usize;
            while s.tasks.len() < idx {
                s.tasks.push(TaskSlot::hole());
            }
            s.stored.last_task = s.stored.last_task.max(tid.0);
            let slot = match task {
                StoredTask::Pending { attempt, input } => {
                    s.pending.push_back(tid);
                    s.counts.pending += 1;
                    TaskSlot {
                        slot: Slot::Pending,
                        attempt,
                        runs_failed: 0,
                        input,
                        outcome: None,
                    }
                }
                StoredTask::Final { attempt, outcome } => {
                    count_final(&mut s.counts, &outcome);
                    TaskSlot {
                        slot: final_slot(&outcome),
                        attempt,
                        runs_failed: 0,
                        input: Payload::default(),
                        outcome: matches!(outcome, TaskOutcome::Failed(_)).then_some(outcome),
                    }
                }
            };
            s.tasks.push(slot);
        }
        // Ids up to `last_task` were handed out; those with no stored task belong to
        // batches whose commit failed. Keep them as holes so slots stay indexed by id.
        for s in self.tasks.sessions.values_mut() {
            let last = usize::try_from(s.stored.last_task).unwrap_or(usize::MAX);
            while s.tasks.len() < last {
                s.tasks.push(TaskSlot::hole());
            }
        }
    }

    /// Sessions as loaded: a job's ranks are never in the pending queue, and a closed
    /// session with no unfinished task is finished (a job's end written if a crash came
    /// between its ranks' outcomes and its end).
    pub(super) fn settle_loaded_sessions(&mut self) {
        for s in self.tasks.sessions.values_mut() {
            if let Some(job) = &s.stored.job {
                // Ranks are started by the job, never from the pending queue.
                s.pending.clear();
                s.located = None;
                if !job.state.is_final() {
                    let app = job.spec.application(s.stored.id);
                    self.apps.insert(AppName::from(app.name.as_str()), app);
                }
            }
            if s.stored.state == SessionState::Closed && s.counts.unfinished() == 0 {
                s.finished = true;
                s.tasks = Vec::new();
                // Its ranks' outcomes were stored, its end was not (a crash between).
                if let Some(job) = s.stored.job.as_mut().filter(|j| !j.state.is_final()) {
                    job.state = if job.failure.is_some() || s.counts.failed > 0 {
                        JobState::Failed
                    } else if s.counts.cancelled > 0 {
                        JobState::Cancelled
                    } else {
                        JobState::Succeeded
                    };
                    self.commits.dirty_sessions.insert(s.stored.id);
                }
            }
        }
    }

    /// The nodes known before the restart, not connected until they register again.
    pub(super) fn load_nodes(&mut self, nodes: Vec<crate::store::StoredNode>) {
        for n in nodes {
            self.cluster.nodes.insert(
                NodeName::from(n.name.as_str()),
                NodeEntry {
                    draining: n.draining,
                    registration: NodeRegistration {
                        name: n.name,
                        allocatable: n.allocatable,
                        labels: n.labels,
                        isolation: n.isolation,
                        // Not read: `identity` below is `None` until the node registers.
                        identity: ExecutorIdentity::OwnerUid,
                        executors: Vec::new(),
                        objects: None,
                    },
                    address: String::new(),
                    conn: None,
                    last_seen_ms: n.last_seen_ms,
                    identity: None,
                    endpoint: None,
                    cache: None,
                },
            );
        }
    }
}
