//! The nodes room: nodes and their connections, what they report (executor events and
//! results), and what happens to the tasks of a node or executor that is lost.

use super::*;

/// The nodes room.
#[derive(Debug, Default)]
pub(super) struct Cluster {
    pub(super) nodes: BTreeMap<NodeName, NodeEntry>,
    /// The node of each live connection; a connection not here was replaced or lost, and
    /// what it says is ignored.
    pub(super) conns: HashMap<ConnId, String>,
}

#[derive(Debug)]
pub(super) struct NodeEntry {
    pub(super) registration: NodeRegistration,
    /// The address it connects from; empty while it is not connected.
    pub(super) address: String,
    /// Drained by an operator (durable): nothing new is placed there.
    pub(super) draining: bool,
    /// Its connection while it is connected; `conns` maps it back.
    pub(super) conn: Option<ConnId>,
    pub(super) last_seen_ms: u64,
    /// Who it runs executors as, from its registration; `None` until it registers with
    /// this head process.
    pub(super) identity: Option<ExecutorIdentity>,
    /// Where it serves objects, while connected and serving them.
    pub(super) endpoint: Option<flame_protocol::object::ObjectEndpoint>,
    /// Its object cache's usage, last reported.
    pub(super) cache: Option<flame_protocol::object::CacheUsage>,
}

impl NodeEntry {
    /// The record the store keeps of it.
    pub(super) fn stored(&self) -> crate::store::StoredNode {
        crate::store::StoredNode {
            name: self.registration.name.clone(),
            allocatable: self.registration.allocatable.clone(),
            labels: self.registration.labels.clone(),
            isolation: self.registration.isolation,
            last_seen_ms: self.last_seen_ms,
            draining: self.draining,
        }
    }
}

impl Core {
    /// Starts or ends a node's drain, durably.
    pub(super) fn set_draining(&mut self, name: &str, draining: bool, reply: ReplyId) {
        let Some(n) = self.cluster.nodes.get_mut(name) else {
            self.out.reply(
                reply,
                ClientResponse::Error(api(
                    ErrorKind::NotFound,
                    format!("node `{name}` is not known"),
                )),
            );
            return;
        };
        n.draining = draining;
        self.commits.ops.push(StoreOp::PutNode(n.stored()));
        self.commits.after.push(AfterCommit::Respond { reply });
        self.reschedule = true;
    }

    pub(super) fn on_node_connected(
        &mut self,
        conn: ConnId,
        address: String,
        registration: NodeRegistration,
        now_ms: u64,
    ) {
        let name = registration.name.clone();
        if self
            .cluster
            .nodes
            .get(name.as_str())
            .is_some_and(|n| n.conn.is_some())
        {
            // A node that reconnects replaces its old connection, whose executors are gone.
            self.node_lost(&name, "replaced by a new connection from the same node");
        }
        let mut registration = registration;
        let identity = Some(registration.identity.clone());
        let reports = std::mem::take(&mut registration.executors);
        let mut kill = Vec::new();
        for report in reports {
            if let Err(why) = self.adopt(&name, report.clone()) {
                tracing::info!(node = %name, executor = %report.executor, why, "killing an executor the head cannot adopt");
                kill.push(NodeCommand::Kill {
                    executor: report.executor,
                });
            }
        }
        if !kill.is_empty() {
            self.commands
                .entry(NodeName::from(name.as_str()))
                .or_default()
                .extend(kill);
        }
        self.out.send(
            conn,
            HeadToNode::Registered {
                heartbeat_interval_ms: limits::HEARTBEAT_INTERVAL.as_millis() as u64,
                grant_key: self.grant_key(),
                inline_max: self.config.object_inline_max,
                output_max: self.config.task_output_bytes_max,
            },
        );
        // A drain outlives reconnections and head restarts.
        let draining = self
            .cluster
            .nodes
            .get(name.as_str())
            .is_some_and(|n| n.draining);
        let endpoint = endpoint_of(&registration, &address);
        if registration.objects.is_some() && endpoint.is_none() {
            tracing::warn!(node = %name, %address, "the node's object endpoint has no usable address; it holds no objects");
        }
        let entry = NodeEntry {
            draining,
            cache: registration.objects.as_ref().map(|o| o.usage),
            endpoint,
            address,
            registration,
            conn: Some(conn),
            last_seen_ms: now_ms,
            identity,
        };
        self.commits.ops.push(StoreOp::PutNode(entry.stored()));
        self.cluster.conns.insert(conn, name.clone());
        self.cluster
            .nodes
            .insert(NodeName::from(name.as_str()), entry);
        tracing::info!(node = %name, conn, "node registered");
        self.reschedule = true;
    }

    /// Takes over an executor a reconnecting node still runs, with the tasks it holds that
    /// are still pending here at the same attempt (after a head restart, every unfinished
    /// task is pending). Its other tasks were re-queued meanwhile; their results will be
    /// refused.
    pub(super) fn adopt(&mut self, node: &str, report: ExecutorReport) -> Result<(), &'static str> {
        if self.pool.executors.contains_key(&report.executor) {
            return Err("its id is in use");
        }
        if !self.apps.contains_key(report.application.as_str()) {
            return Err("its application is no longer registered");
        }
        if let Some(sid) = report.session {
            let usable = self.tasks.sessions.get(&sid).is_some_and(|s| {
                !s.finished && !s.cancelled && s.stored.application == report.application
            });
            if !usable {
                return Err("its session is gone, finished or cancelled");
            }
            let same_owner = self
                .tasks
                .sessions
                .get(&sid)
                .is_some_and(|s| owner_name(&s.stored.owner) == report.owner);
            if !same_owner {
                return Err("it was launched for another owner than its session's");
            }
        }
        if self.pool.owner_uids.durable(&report.owner).is_none() {
            return Err("its owner has no uid in this head's state");
        }
        let mut outstanding = VecDeque::new();
        for (sid, tid, attempt) in report.tasks {
            let Some(s) = self.tasks.sessions.get_mut(&sid) else {
                continue;
            };
            let Some(slot) = slot_of(&mut s.tasks, tid) else {
                continue;
            };
            if slot.slot == Slot::Pending && slot.attempt == attempt {
                // Left in the pending queue; dispatch skips tasks that are not pending.
                slot.slot = Slot::Running(report.executor);
                s.counts.pending = take_one(s.counts.pending, "pending");
                s.counts.running += 1;
                outstanding.push_back((sid, tid));
            }
        }
        let job_started = report
            .session
            .and_then(|sid| self.tasks.sessions.get(&sid))
            .and_then(|s| s.stored.job.as_ref())
            .is_some_and(|j| j.state != JobState::Queued);
        if job_started && outstanding.is_empty() {
            // Its rank ended, or was given up meanwhile: it must not outlive its job.
            return Err("its rank of the job is over");
        }
        tracing::info!(node, executor = %report.executor, tasks = outstanding.len(), "adopted an executor");
        self.pool.next_executor = self.pool.next_executor.max(report.executor.0 + 1);
        if report.ready {
            self.pool.proven.insert((
                AppName::from(report.application.as_str()),
                OwnerName::from(report.owner.clone()),
            ));
        }
        self.pool.executors.insert(
            report.executor,
            ExecutorEntry {
                node: NodeName::from(node),
                application: AppName::from(report.application),
                owner: OwnerName::from(report.owner),
                phase: match (report.session, report.ready) {
                    (Some(_), _) => ExecutorPhase::Bound,
                    (None, true) => ExecutorPhase::Idle,
                    (None, false) => ExecutorPhase::Launching,
                },
                session: report.session,
                resources: report.resources,
                gpus: report.gpus,
                stale: false,
                credit: report.credit.clamp(1, 1024),
                task_us_avg: TASK_US_INITIAL,
                last_result_ms: 0,
                outstanding,
                quiet_since_ms: 0,
                unbinding_since_ms: 0,
            },
        );
        Ok(())
    }

    pub(super) fn on_node_message(&mut self, conn: ConnId, message: NodeToHead, now_ms: u64) {
        let Some(name) = self.cluster.conns.get(&conn).cloned() else {
            return; // a replaced or lost connection: fenced off
        };
        if let Some(n) = self.cluster.nodes.get_mut(name.as_str()) {
            n.last_seen_ms = now_ms;
        }
        match message {
            NodeToHead::Register(_) => {
                tracing::warn!(node = %name, "duplicate registration ignored");
            }
            NodeToHead::Heartbeat => {
                if let Some(conn) = self.cluster.nodes.get(name.as_str()).and_then(|n| n.conn) {
                    self.out.send(conn, HeadToNode::Heartbeat);
                }
            }
            NodeToHead::ExecutorEvents(events) => {
                for event in events {
                    self.on_executor_event(&name, event, now_ms);
                }
                self.reschedule = true;
            }
            NodeToHead::Results(results) => {
                for r in results {
                    self.on_result(&name, r, now_ms);
                }
            }
            NodeToHead::Objects { events, usage } => self.on_object_events(&name, events, usage),
        }
    }

    pub(super) fn on_executor_event(&mut self, node: &str, event: ExecutorEvent, now_ms: u64) {
        let id = match &event {
            ExecutorEvent::Ready { executor, .. }
            | ExecutorEvent::Bound { executor, .. }
            | ExecutorEvent::Unbound { executor, .. }
            | ExecutorEvent::Exited { executor, .. } => *executor,
        };
        let Some(e) = self.pool.executors.get_mut(&id) else {
            return;
        };
        if e.node != node {
            tracing::warn!(executor = %id, node, "event about another node's executor ignored");
            return;
        }
        match event {
            ExecutorEvent::Ready { credit, .. } if e.phase == ExecutorPhase::Launching => {
                let pool = (e.application.clone(), e.owner.clone());
                self.pool.launch_backoff.remove(&pool);
                self.pool.launch_errors.remove(&pool);
                self.pool.proven.insert(pool);
                e.phase = ExecutorPhase::Idle;
                e.credit = credit.clamp(1, 1024);
                e.quiet_since_ms = now_ms;
            }
            ExecutorEvent::Bound { session, .. }
                if e.phase == ExecutorPhase::Binding && e.session == Some(session) =>
            {
                e.phase = ExecutorPhase::Bound;
                if e.application.starts_with(JOB_APPLICATION_PREFIX) {
                    self.jobs.may_start = true;
                }
            }
            ExecutorEvent::Unbound { usage, .. } if e.phase == ExecutorPhase::Unbinding => {
                e.phase = ExecutorPhase::Idle;
                let session = e.session.take();
                e.quiet_since_ms = now_ms;
                let stale = e.stale;
                self.record_usage(session, id, node, usage, None);
                if stale {
                    self.apply(Decision::Release { executor: id }, now_ms);
                }
            }
            ExecutorEvent::Exited { reason, usage, .. } => {
                let session = e.session;
                let ended = (e.phase != ExecutorPhase::Releasing).then_some(reason.as_str());
                self.record_usage(session, id, node, usage, ended);
                if let Some(e) = self.pool.executors.remove(&id) {
                    if e.phase == ExecutorPhase::Launching {
                        let pause =
                            self.launch_failed(&e.application, &e.owner, node, &reason, now_ms);
                        tracing::warn!(executor = %id, node, app = %e.application, owner = %e.owner,
                            %reason, retry_in_ms = pause, "executor failed to start");
                    } else if e.phase != ExecutorPhase::Releasing {
                        // A crash: relaunches of this application back off too, so a
                        // crashing application never runs in a hot loop.
                        let pause = self.back_off(&e.application, &e.owner, now_ms);
                        tracing::warn!(executor = %id, node, app = %e.application, owner = %e.owner,
                            %reason, retry_in_ms = pause, "executor exited");
                    }
                    let why = format!("executor {id} on node {node} exited: {reason}");
                    self.requeue(e.outstanding, &why);
                    self.job_rank_lost(&e.application, &why, self.now_ms);
                    if e.phase != ExecutorPhase::Releasing {
                        self.job_rank_lost(&e.application, &why, now_ms);
                    }
                }
            }
            other => {
                tracing::warn!(executor = %id, phase = ?e.phase, event = ?other, "unexpected executor event ignored");
            }
        }
    }

    /// Adds what an executor used to the session it was bound to, durably for durable
    /// sessions (written with the next group commit).
    pub(super) fn record_usage(
        &mut self,
        session: Option<SessionId>,
        executor: ExecutorId,
        node: &str,
        usage: Usage,
        ended: Option<&str>,
    ) {
        let Some(s) = session.and_then(|id| self.tasks.sessions.get_mut(&id)) else {
            return;
        };
        s.record_usage(executor, node, usage, ended);
        if !s.ephemeral {
            self.commits.dirty_sessions.insert(s.stored.id);
        }
    }

    pub(super) fn on_result(&mut self, node: &str, mut r: NodeTaskResult, now_ms: u64) {
        // The node keeps no output over the limit; checked again for a node that did not.
        let size = match &r.outcome {
            TaskOutcome::Succeeded(b) => b.len() as u64,
            TaskOutcome::Object(o) => o.size,
            _ => 0,
        };
        if size > self.config.task_output_bytes_max {
            r.outcome = TaskOutcome::Failed(format!(
                "the task's output is {size} bytes; the head takes at most {} bytes per output \
                 (flame-head --task-output-bytes-max): put larger results somewhere else and \
                 return where",
                self.config.task_output_bytes_max
            ));
        }
        let Some(e) = self.pool.executors.get_mut(&r.executor) else {
            return;
        };
        if e.node != node {
            return;
        }
        let Some(pos) = e
            .outstanding
            .iter()
            .position(|&(s, t)| s == r.session && t == r.task)
        else {
            return;
        };
        if self
            .rebuilds
            .by_task
            .get(&(r.session, r.task))
            .is_some_and(|b| b.running == Some(r.executor) && b.attempt == r.attempt)
        {
            // A hidden re-run for a lost output: it restores the object, nothing else.
            e.outstanding.remove(pos);
            if e.outstanding.is_empty() {
                e.quiet_since_ms = now_ms;
            }
            e.last_result_ms = now_ms;
            return self.rebuild_done(node, r);
        }
        let Some(s) = self.tasks.sessions.get_mut(&r.session) else {
            return;
        };
        let Some(slot) = slot_of(&mut s.tasks, r.task) else {
            return;
        };
        // Fencing: only the executor the task runs on, for its current attempt.
        if slot.slot != Slot::Running(r.executor) || slot.attempt != r.attempt {
            tracing::debug!(task = %r.task, "stale result dropped");
            return;
        }
        // An output kept on the node: it holds a copy from now (recorded once taken).
        let output = match &r.outcome {
            TaskOutcome::Object(object) => Some(*object),
            _ => None,
        };
        // A job's rank: how it ended is noted once the result is taken.
        let rank_end = s.stored.job.is_some().then(|| match &r.outcome {
            TaskOutcome::Failed(m) => Some(m.clone()),
            _ => None,
        });
        // Results come back in dispatch order, so this is the front in practice.
        e.outstanding.remove(pos);
        if e.outstanding.is_empty() {
            e.quiet_since_ms = now_ms;
        } else {
            // Busy since its last result: the gap is one task's time on this executor.
            let sample_us = now_ms.saturating_sub(e.last_result_ms) as f64 * 1000.0;
            e.task_us_avg += TASK_US_ALPHA * (sample_us - e.task_us_avg);
        }
        e.last_result_ms = now_ms;
        let app = self.apps.get(s.stored.application.as_str());
        let max_attempts = app.map_or(self.config.max_attempts, |a| a.max_attempts);
        if let TaskOutcome::Failed(message) = &r.outcome {
            if app.is_some_and(|a| a.retry_on_error) && slot.runs_failed + 1 < max_attempts {
                slot.runs_failed += 1;
                tracing::debug!(task = %r.task, attempt = slot.attempt, %message, "retrying a task the application failed");
                slot.slot = Slot::Pending;
                slot.attempt += 1;
                s.counts.running = take_one(s.counts.running, "running");
                s.counts.pending += 1;
                s.pending.push_front(r.task);
                self.reschedule = true;
                return;
            }
        } else if !self.pool.launch_backoff.is_empty() {
            // The application works again for this owner: forget its crashes.
            self.pool
                .launch_backoff
                .remove(&(e.application.clone(), e.owner.clone()));
        }
        let ephemeral = s.ephemeral;
        if !ephemeral {
            slot.slot = Slot::Completing;
            self.commits.finish.entry(r.session).or_default().push((
                r.task,
                r.attempt,
                r.outcome.clone(),
            ));
            crate::failpoints::crash_point!("after-result-before-commit");
        }
        if let Some(object) = output {
            // Recorded before an ephemeral task is final: the session may end with it.
            self.object_output(node, r.session, r.task, object);
        }
        if ephemeral {
            self.tasks.finalize(r.session, r.task, r.attempt, r.outcome);
            if self
                .tasks
                .sessions
                .get(&r.session)
                .is_some_and(|s| s.counts.unfinished() == 0)
            {
                self.reschedule = true;
            }
            self.check_finished(r.session);
        }
        if let (Some(failure), Some(s)) = (rank_end, self.tasks.sessions.get_mut(&r.session)) {
            if s.note_rank_end(r.task, r.exit_code, failure.as_deref(), now_ms) {
                self.commits.dirty_sessions.insert(r.session);
            }
        }
    }

    pub(super) fn node_lost(&mut self, name: &str, reason: &str) {
        let Some(n) = self.cluster.nodes.get_mut(name) else {
            return;
        };
        if let Some(conn) = n.conn.take() {
            self.cluster.conns.remove(&conn);
            self.out.links.push((conn, LinkOutput::Close));
        }
        tracing::warn!(node = %name, %reason, "node lost");
        let lost: Vec<ExecutorId> = self
            .pool
            .executors
            .iter()
            .filter(|(_, e)| e.node == name)
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            if let Some(e) = self.pool.executors.remove(&id) {
                let why = format!("node {name} lost: {reason}");
                // Kept in the session's record, so `flame logs` still finds the executor.
                self.record_usage(e.session, id, name, Usage::default(), Some(&why));
                self.requeue(e.outstanding, &why);
            }
        }
        self.commands.remove(name);
        if let Some(n) = self.cluster.nodes.get_mut(name) {
            n.endpoint = None;
        }
        self.objects_node_lost(name);
        self.reschedule = true;
    }

    /// Executors told to unbind that still run a task `grace` ms later are killed; their
    /// tasks go back to pending without being charged an attempt (the scheduler took the
    /// executor, the task did nothing wrong).
    pub(super) fn preempt_overdue(&mut self, now_ms: u64, grace: u64) {
        let overdue: Vec<ExecutorId> = self
            .pool
            .executors
            .iter()
            .filter(|(_, e)| {
                e.phase == ExecutorPhase::Unbinding
                    && !e.outstanding.is_empty()
                    && now_ms.saturating_sub(e.unbinding_since_ms) >= grace
            })
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            let Some(e) = self.pool.executors.get_mut(&id) else {
                continue;
            };
            e.phase = ExecutorPhase::Releasing;
            let tasks = std::mem::take(&mut e.outstanding);
            let node = e.node.clone();
            tracing::info!(executor = %id, tasks = tasks.len(), grace_ms = grace, "preemption grace ran out; killing the executor");
            self.commands
                .entry(node)
                .or_default()
                .push(NodeCommand::Kill { executor: id });
            self.requeue_as(
                tasks,
                &format!("executor {id} preempted after a grace period of {grace} ms"),
                false,
            );
        }
    }

    /// Tasks whose executor is gone go back to pending. Only the task it was running (the
    /// front) moves to its next attempt and is charged for the loss: the ones queued
    /// behind it never started, so they keep their attempt (a late result of theirs is
    /// still refused: it must come from the executor they run on, and executor ids are
    /// never reused). A task charged `max_attempts` times fails with `reason`.
    pub(super) fn requeue(&mut self, tasks: VecDeque<(SessionId, TaskId)>, reason: &str) {
        self.requeue_as(tasks, reason, true);
    }

    /// [`Core::requeue`], charging the running task only when `charge` is set.
    pub(super) fn requeue_as(
        &mut self,
        tasks: VecDeque<(SessionId, TaskId)>,
        reason: &str,
        charge: bool,
    ) {
        for (i, (sid, tid)) in tasks.into_iter().enumerate().rev() {
            // Results come back in dispatch order, so only the front had started.
            let started = i == 0;
            let charged = charge && started;
            if self.requeue_rebuild(sid, tid, reason) {
                continue;
            }
            let Some(s) = self.tasks.sessions.get_mut(&sid) else {
                continue;
            };
            let max = self
                .apps
                .get(s.stored.application.as_str())
                .map_or(self.config.max_attempts, |a| a.max_attempts);
            let Some(slot) = slot_of(&mut s.tasks, tid) else {
                continue;
            };
            if !matches!(slot.slot, Slot::Running(_)) {
                continue;
            }
            let is_job = s.stored.job.is_some();
            if charged || is_job {
                // A job's rank is never run again: the job fails.
                slot.runs_failed += 1;
            }
            if slot.runs_failed >= max || is_job {
                let outcome = TaskOutcome::Failed(if is_job {
                    reason.to_string()
                } else {
                    format!(
                        "failed {} time(s), the limit is {max}; last: {reason}",
                        slot.runs_failed
                    )
                });
                let attempt = slot.attempt;
                if is_job && s.note_rank_end(tid, None, Some(reason), self.now_ms) {
                    self.commits.dirty_sessions.insert(sid);
                }
                let Some(slot) = slot_of(&mut s.tasks, tid) else {
                    continue;
                };
                if s.ephemeral {
                    self.tasks.finalize(sid, tid, attempt, outcome);
                    self.check_finished(sid);
                } else {
                    slot.slot = Slot::Completing;
                    self.commits
                        .finish
                        .entry(sid)
                        .or_default()
                        .push((tid, attempt, outcome));
                }
            } else {
                slot.slot = Slot::Pending;
                if started {
                    slot.attempt += 1;
                }
                s.counts.running = take_one(s.counts.running, "running");
                s.counts.pending += 1;
                s.pending.push_front(tid);
            }
        }
        self.reschedule = true;
    }
}
