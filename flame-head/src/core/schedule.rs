//! Scheduling: the snapshot the planner reads, its decisions applied, and pending tasks
//! handed to bound executors.

use super::*;

impl Core {
    /// `flame queue`: each owner's weight, deserved and allocated share, and its sessions'
    /// targets, holdings and waiting reasons, from the plan the scheduler would make now.
    pub(super) fn queue_report(&self, now_ms: u64) -> QueueReport {
        let snapshot = self.snapshot(now_ms);
        let plan = scheduler::plan(&snapshot);
        let totals = scheduler::Totals::schedulable(&snapshot.nodes);
        // Executors held per session, found in one pass.
        let mut held_by: HashMap<SessionId, Vec<&ExecutorEntry>> = HashMap::new();
        for e in self.pool.executors.values() {
            if let (Some(sid), ExecutorPhase::Binding | ExecutorPhase::Bound) = (e.session, e.phase)
            {
                held_by.entry(sid).or_default().push(e);
            }
        }
        let mut owners: BTreeMap<String, OwnerQueue> = BTreeMap::new();
        let mut held_share: BTreeMap<String, f64> = BTreeMap::new();
        for s in self.tasks.sessions.values().filter(|s| !s.finished) {
            let owner = s.stored.owner.clone();
            let held = held_by.remove(&s.stored.id).unwrap_or_default();
            let share: f64 = held
                .iter()
                .map(|e| totals.dominant_share(&e.resources))
                .filter(|x| x.is_finite())
                .sum();
            *held_share.entry(owner.clone()).or_default() += share;
            let entry = owners.entry(owner.clone()).or_insert_with(|| OwnerQueue {
                weight: self.config.owner_weights.get(&owner).copied().unwrap_or(1),
                owner: owner.clone(),
                deserved_permille: plan
                    .owner_targets_permille
                    .get(&owner)
                    .copied()
                    .unwrap_or(0),
                allocated_permille: 0,
                executors: 0,
                pending_tasks: 0,
                sessions: Vec::new(),
            });
            entry.executors += held.len() as u32;
            entry.pending_tasks += s.counts.pending;
            entry.sessions.push(SessionQueue {
                id: s.stored.id,
                application: s.stored.application.clone(),
                priority: s.stored.priority,
                deserved_executors: plan.targets.get(&s.stored.id).copied().unwrap_or(0) as u32,
                executors: held.len() as u32,
                pending_tasks: s.counts.pending,
                running_tasks: s.counts.running,
                waiting: plan.waiting.get(&s.stored.id).cloned(),
            });
        }
        for (owner, q) in owners.iter_mut() {
            let share = held_share.get(owner).copied().unwrap_or(0.0);
            q.allocated_permille = (share * 1000.0).round().min(1000.0) as u32;
            q.sessions
                .sort_by(|a, b| b.priority.cmp(&a.priority).then(a.id.cmp(&b.id)));
        }
        QueueReport {
            capacity: Resources {
                cpu_millis: u32::try_from(totals.cpu_millis).unwrap_or(u32::MAX),
                memory_bytes: Some(totals.memory_bytes),
                gpus: u32::try_from(totals.gpus).unwrap_or(u32::MAX),
            },
            owners: owners.into_values().collect(),
            head: self.commits.storage.report(),
        }
    }

    pub(super) fn schedule(&mut self, now_ms: u64) {
        let snapshot = self.snapshot(now_ms);
        let plan = scheduler::plan(&snapshot);
        for s in self.tasks.sessions.values_mut() {
            s.waiting = plan.waiting.get(&s.stored.id).cloned();
        }
        for decision in plan.decisions {
            self.apply(decision, now_ms);
        }
    }

    /// What the scheduler decides from.
    pub(super) fn snapshot(&self, now_ms: u64) -> Snapshot {
        // Sessions holding an executor, found in one pass rather than once per session.
        let held: std::collections::HashSet<SessionId> = self
            .pool
            .executors
            .values()
            .filter(|e| matches!(e.phase, ExecutorPhase::Binding | ExecutorPhase::Bound))
            .filter_map(|e| e.session)
            .collect();
        // Per application, the owners whose launches of it back off now, and why.
        let mut backing_off: BTreeMap<&str, BTreeMap<String, Option<String>>> = BTreeMap::new();
        for (pool, &(_, not_before)) in &self.pool.launch_backoff {
            if now_ms < not_before {
                backing_off.entry(pool.0.as_str()).or_default().insert(
                    pool.1.to_string(),
                    self.pool.launch_errors.get(pool).cloned(),
                );
            }
        }
        Snapshot {
            now_ms,
            nodes: self
                .cluster
                .nodes
                .iter()
                .map(|(name, n)| scheduler::NodeView {
                    name: name.to_string(),
                    ready: n.conn.is_some(),
                    cpu_millis: n.registration.allocatable.cpu_millis,
                    memory_bytes: n.registration.allocatable.memory_bytes,
                    gpus: n.registration.allocatable.gpus.len() as u32,
                    labels: n.registration.labels.clone(),
                    draining: n.draining,
                })
                .collect(),
            applications: self
                .apps
                .values()
                .map(|a| scheduler::AppView {
                    name: a.name.clone(),
                    max_instances: a.max_instances,
                    delay_release_ms: a.delay_release_ms,
                    resources: a.resources,
                    selector: a.selector.clone(),
                    backing_off: backing_off.remove(a.name.as_str()).unwrap_or_default(),
                })
                .collect(),
            sessions: self
                .tasks
                .sessions
                .values()
                .filter(|s| !s.finished || held.contains(&s.stored.id))
                .map(|s| scheduler::SessionView {
                    id: s.stored.id,
                    application: s.stored.application.clone(),
                    open: s.stored.state == SessionState::Open,
                    demand: s.counts.unfinished(),
                    owner: owner_name(&s.stored.owner).to_string(),
                    priority: s.stored.priority,
                    gang: s.stored.job.as_ref().map(|j| scheduler::Gang {
                        ranks: j.spec.ranks,
                        ranks_per_node: j.spec.ranks_per_node,
                    }),
                })
                .collect(),
            executors: self
                .pool
                .executors
                .iter()
                .map(|(id, e)| scheduler::ExecutorView {
                    id: *id,
                    node: e.node.to_string(),
                    application: e.application.to_string(),
                    owner: e.owner.to_string(),
                    phase: e.phase,
                    session: e.session,
                    quiet_since_ms: e.quiet_since_ms,
                    outstanding: e.outstanding.len() as u32,
                    resources: e.resources,
                })
                .collect(),
            owner_weights: self.config.owner_weights.clone(),
        }
    }

    pub(super) fn apply(&mut self, decision: Decision, now_ms: u64) {
        match decision {
            Decision::Launch {
                node,
                application,
                owner,
            } => {
                let Some(spec) = self.apps.get(application.as_str()).cloned() else {
                    return;
                };
                // Sessions are checked against the application's users and groups when
                // they open; an admin may have narrowed them since (or a store upgrade did):
                // no executor is launched for an owner the application no longer allows.
                let groups = &self.config.groups;
                let in_group = |g: &str| groups.get(g).is_some_and(|m| m.contains(&owner));
                if !spec.allows(&owner, in_group) {
                    tracing::warn!(app = %spec.name, %owner, "launch skipped: the application no longer allows this owner");
                    return;
                }
                // The owner's uid must be durable before a launch uses it.
                let Some(uid) = self.owner_uid(&owner) else {
                    return;
                };
                if self.pool.next_executor + EXECUTOR_ID_BLOCK / 2 >= self.pool.ids_reserved {
                    self.reserve_executor_ids();
                }
                if self.pool.next_executor >= self.pool.ids_reserved {
                    // Launched once the next block of ids is durable (reschedules then).
                    return;
                }
                // GPU indices of the node that no executor holds, lowest first.
                let Some(gpus) = self.free_gpus(&node, spec.resources.gpus) else {
                    tracing::warn!(node = %node, app = %spec.name, "no free gpu indices for a planned launch; skipped");
                    return;
                };
                let id = ExecutorId(self.pool.next_executor);
                // Below the durable reservation (checked above), and new: a restarted head
                // never hands out an id again.
                assert!(
                    id.0 < self.pool.ids_reserved && !self.pool.executors.contains_key(&id),
                    "executor id {id} is not reserved or is in use"
                );
                self.pool.next_executor += 1;
                self.pool.executors.insert(
                    id,
                    ExecutorEntry {
                        node: NodeName::from(node.as_str()),
                        application: AppName::from(application),
                        owner: OwnerName::from(owner.clone()),
                        phase: ExecutorPhase::Launching,
                        session: None,
                        resources: spec.resources,
                        gpus: gpus.clone(),
                        stale: false,
                        credit: 1,
                        task_us_avg: TASK_US_INITIAL,
                        last_result_ms: now_ms,
                        outstanding: VecDeque::new(),
                        quiet_since_ms: now_ms,
                        unbinding_since_ms: 0,
                    },
                );
                self.commands
                    .entry(NodeName::from(node))
                    .or_default()
                    .push(NodeCommand::Launch {
                        executor: id,
                        application: Box::new(spec),
                        owner: ExecutorOwner { name: owner, uid },
                        gpus,
                    });
            }
            Decision::Bind { executor, session } => {
                let Some((common_data, owner)) = self
                    .tasks
                    .sessions
                    .get(&session)
                    .map(|s| (s.stored.common_data.clone(), owner_name(&s.stored.owner)))
                else {
                    return;
                };
                let Some(e) = self.pool.executors.get_mut(&executor) else {
                    return;
                };
                // The scheduler pools executors per owner; this holds it where it matters,
                // whatever a future planner does: an executor never enters another owner's
                // session.
                if e.owner != owner {
                    tracing::error!(%executor, %session, executor_owner = %e.owner, %owner, "refused a bind across owners");
                    debug_assert!(false, "the planner bound an executor across owners");
                    return;
                }
                // Only an idle executor enters a session, and it serves one at a time.
                debug_assert!(
                    e.phase == ExecutorPhase::Idle && e.session.is_none(),
                    "the planner bound executor {executor} in phase {:?} of session {:?}",
                    e.phase,
                    e.session
                );
                e.phase = ExecutorPhase::Binding;
                e.session = Some(session);
                self.commands
                    .entry(e.node.clone())
                    .or_default()
                    .push(NodeCommand::Bind {
                        executor,
                        session,
                        common_data,
                    });
            }
            Decision::Unbind { executor } => {
                let Some(e) = self.pool.executors.get_mut(&executor) else {
                    return;
                };
                e.phase = ExecutorPhase::Unbinding;
                e.unbinding_since_ms = now_ms;
                self.commands
                    .entry(e.node.clone())
                    .or_default()
                    .push(NodeCommand::Unbind { executor });
            }
            Decision::Release { executor } => {
                let Some(e) = self.pool.executors.get_mut(&executor) else {
                    return;
                };
                e.phase = ExecutorPhase::Releasing;
                self.commands
                    .entry(e.node.clone())
                    .or_default()
                    .push(NodeCommand::Release { executor });
            }
        }
    }

    /// Hands pending tasks to bound executors up to their outstanding limit.
    pub(super) fn dispatch(&mut self, now_ms: u64) {
        for (id, e) in self.pool.executors.iter_mut() {
            if !matches!(e.phase, ExecutorPhase::Binding | ExecutorPhase::Bound) {
                continue;
            }
            let Some(sid) = e.session else { continue };
            let Some(s) = self.tasks.sessions.get_mut(&sid) else {
                continue;
            };
            if s.stored.job.is_some() {
                continue; // a job's ranks are started together by `start_jobs`
            }
            let limit = outstanding_max(e.task_us_avg, e.credit);
            if e.outstanding.is_empty() {
                // Idle until now: the next gap measures work, not idleness.
                e.last_result_ms = now_ms;
            }
            while (e.outstanding.len() as u32) < limit {
                let Some(tid) = s.pending.pop_front() else {
                    break;
                };
                let Some(slot) = slot_of(&mut s.tasks, tid) else {
                    continue;
                };
                if slot.slot != Slot::Pending {
                    continue;
                }
                slot.slot = Slot::Running(*id);
                s.counts.pending = take_one(s.counts.pending, "pending");
                s.counts.running += 1;
                e.outstanding.push_back((sid, tid));
                let assignment = TaskAssignment {
                    executor: *id,
                    session: sid,
                    task: tid,
                    attempt: slot.attempt,
                    input: slot.input.clone(),
                };
                self.commands
                    .entry(e.node.clone())
                    .or_default()
                    .push(NodeCommand::Run(assignment));
            }
        }
    }
}
