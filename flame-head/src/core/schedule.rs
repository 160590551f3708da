//! Scheduling: the snapshot the planner reads, its decisions applied, and pending tasks
//! handed to bound executors.

use super::*;
use flame_protocol::object::{ObjectRef, ObjectSources};

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
        let plan = scheduler::plan_with_data(&snapshot, &self.data_nodes());
        for s in self.tasks.sessions.values_mut() {
            s.waiting = plan.waiting.get(&s.stored.id).cloned();
        }
        for decision in plan.decisions {
            self.apply(decision, now_ms);
        }
    }

    /// Where each unfinished session's data lies, for placing its new executors: the
    /// nodes holding its common data when that is an object (one lookup per session).
    /// Task inputs are placed where the session's executors are (`PutObjects`), and
    /// pending tasks wait for those nodes ([`super::locality::LocalityQueue`]), so they
    /// need no entry here.
    fn data_nodes(&self) -> scheduler::DataNodes {
        let mut data = scheduler::DataNodes::default();
        for s in self.tasks.sessions.values() {
            if s.finished || s.counts.pending == 0 {
                continue;
            }
            let Some(object) = s.stored.common_data.object() else {
                continue;
            };
            let Some(entry) = self.objects.get(owner_name(&s.stored.owner), &object.id) else {
                continue;
            };
            let nodes: Vec<(String, u64)> = entry
                .nodes()
                .take(scheduler::DATA_NODES_MAX)
                .map(|n| (n.to_string(), object.size))
                .collect();
            if !nodes.is_empty() {
                data.sessions.insert(s.stored.id, nodes);
            }
        }
        data
    }

    /// Every node the head knows, as the scheduler sees it (Ready or not).
    pub(super) fn node_views(&self) -> Vec<scheduler::NodeView> {
        self.cluster
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
            .collect()
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
        // Per application, the owners with work whose executors are not known to start.
        let mut probing: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        for s in self.tasks.sessions.values() {
            if s.finished || s.counts.unfinished() == 0 {
                continue;
            }
            let owner = owner_name(&s.stored.owner);
            let pool = (
                AppName::from(s.stored.application.as_str()),
                OwnerName::of(owner),
            );
            if !self.pool.proven.contains(&pool) {
                probing
                    .entry(s.stored.application.as_str())
                    .or_default()
                    .insert(owner.to_string());
            }
        }
        Snapshot {
            now_ms,
            nodes: self.node_views(),
            applications: self
                .apps
                .values()
                .map(|a| scheduler::AppView {
                    probing: probing.remove(a.name.as_str()).unwrap_or_default(),
                    ..app_view(a, backing_off.remove(a.name.as_str()).unwrap_or_default())
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
                    // Lost outputs being rebuilt need an executor of the session too.
                    demand: s.counts.unfinished() + self.rebuilds.queued(s.stored.id),
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
                let Some(common_data) = self
                    .tasks
                    .sessions
                    .get(&session)
                    .map(|s| s.stored.common_data.clone())
                else {
                    return;
                };
                let Some(node) = self.pool.executors.get(&executor).map(|e| e.node.clone()) else {
                    return;
                };
                let sources = match self.common_data_sources(session, &common_data, &node) {
                    Ok(sources) => sources,
                    Err(why) => {
                        // No copy of the common data is left: the session cannot run.
                        let outcome = TaskOutcome::Failed(why);
                        self.end_unfinished(session, outcome, None, now_ms);
                        return;
                    }
                };
                let (Some(s), Some(e)) = (
                    self.tasks.sessions.get(&session),
                    self.pool.executors.get_mut(&executor),
                ) else {
                    return;
                };
                let owner = owner_name(&s.stored.owner);
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
                        sources,
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

    /// Where the node of an executor entering `session` finds its common data, counted in
    /// the session's [`DataStats`]; `Err` names the object when no copy is left.
    fn common_data_sources(
        &mut self,
        session: SessionId,
        common_data: &Payload,
        node: &str,
    ) -> Result<Option<ObjectSources>, String> {
        let Payload::Object(object) = common_data else {
            return Ok(None);
        };
        let owner = self
            .tasks
            .sessions
            .get(&session)
            .map(|s| owner_name(&s.stored.owner).to_string())
            .unwrap_or_default();
        let fetch = self.object_view().fetch(&owner, object, node);
        let Some(s) = self.tasks.sessions.get_mut(&session) else {
            return Ok(None);
        };
        match fetch {
            Fetch::Local => {
                s.data.local_bytes = s.data.local_bytes.saturating_add(object.size);
                Ok(None)
            }
            Fetch::From(sources) => {
                s.data.fetched_bytes = s.data.fetched_bytes.saturating_add(object.size);
                Ok(Some(sources))
            }
            Fetch::Missing(why) => Err(format!(
                "common data object {} of owner {owner} has no copy left ({why})",
                object.id
            )),
        }
    }

    /// Hands pending tasks to bound executors up to their outstanding limit. A task whose
    /// input is an object its executor's node does not hold gets where to fetch it
    /// (`sources`); one whose input has no copy left fails, naming it.
    pub(super) fn dispatch(&mut self, now_ms: u64) {
        let view = ObjectView {
            book: &self.objects,
            nodes: &self.cluster.nodes,
            signer: self.config.grant_signer.as_deref(),
            now_ms,
        };
        let mut lost_inputs = Vec::new();
        let locality_wait_ms = self.config.locality_wait_ms;
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
            // Rebuilds of lost outputs first: tasks may be waiting for them.
            while (e.outstanding.len() as u32) < limit {
                let Some((tid, attempt, rb)) = self.rebuilds.next(sid, *id) else {
                    break;
                };
                let sources = match rb.input.object() {
                    Some(object) => match view.fetch(&rb.owner, object, &e.node) {
                        Fetch::From(sources) => Some(sources),
                        Fetch::Local | Fetch::Missing(_) => None,
                    },
                    None => None,
                };
                e.outstanding.push_back((sid, tid));
                let assignment = TaskAssignment {
                    executor: *id,
                    session: sid,
                    task: tid,
                    attempt,
                    input: rb.input.clone(),
                    sources,
                };
                self.commands
                    .entry(e.node.clone())
                    .or_default()
                    .push(NodeCommand::Run(assignment));
            }
            while (e.outstanding.len() as u32) < limit {
                // First the tasks whose input this node holds, or that waited long enough
                // for the node that does; then the rest in order.
                let located = s.located.as_mut().and_then(|q| q.pop_for(&e.node, now_ms));
                let (tid, waited) = match located {
                    Some(tid) => (tid, true),
                    None => match s.pending.pop_front() {
                        Some(tid) => (tid, false),
                        None => break,
                    },
                };
                let Some(slot) = slot_of(&mut s.tasks, tid) else {
                    continue;
                };
                if slot.slot != Slot::Pending {
                    continue;
                }
                let sources = match slot.input.object() {
                    None => None,
                    Some(object) => {
                        let owner = owner_name(&s.stored.owner);
                        match view.fetch(owner, object, &e.node) {
                            Fetch::Local => {
                                count_input(&mut s.data, object, true);
                                None
                            }
                            // Another node holds it: the task waits a while for an
                            // executor there, unless it has waited already or no holder
                            // can run one (draining or disconnected).
                            Fetch::From(sources)
                                if !waited
                                    && locality_wait_ms > 0
                                    && sources.endpoints.iter().any(|ep| {
                                        view.nodes
                                            .get(ep.node.as_str())
                                            .is_some_and(|n| n.conn.is_some() && !n.draining)
                                    }) =>
                            {
                                let holders: Vec<NodeName> = sources
                                    .endpoints
                                    .iter()
                                    .map(|ep| NodeName::from(ep.node.as_str()))
                                    .collect();
                                s.located
                                    .get_or_insert_with(|| {
                                        super::locality::LocalityQueue::new(locality_wait_ms)
                                    })
                                    .push(tid, &holders, now_ms);
                                continue;
                            }
                            Fetch::From(sources) => {
                                count_input(&mut s.data, object, false);
                                Some(sources)
                            }
                            Fetch::Missing(_)
                                if self.rebuilds.hold(
                                    &(OwnerName::from(owner.to_string()), object.id),
                                    sid,
                                    tid,
                                ) =>
                            {
                                // Its input is being rebuilt: it waits, still pending.
                                continue;
                            }
                            Fetch::Missing(why) => {
                                lost_inputs.push((
                                    sid,
                                    tid,
                                    format!(
                                        "input object {} of owner {owner} has no copy left ({why})",
                                        object.id
                                    ),
                                ));
                                continue;
                            }
                        }
                    }
                };
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
                    sources,
                };
                self.commands
                    .entry(e.node.clone())
                    .or_default()
                    .push(NodeCommand::Run(assignment));
            }
        }
        for (sid, tid, why) in lost_inputs {
            self.fail_pending(sid, tid, why);
        }
    }

    /// A pending task fails without running (its input object has no copy left): final
    /// at once for an ephemeral session, once durable for another.
    fn fail_pending(&mut self, sid: SessionId, tid: TaskId, why: String) {
        let Some(s) = self.tasks.sessions.get_mut(&sid) else {
            return;
        };
        let Some(slot) = slot_of(&mut s.tasks, tid) else {
            return;
        };
        if slot.slot != Slot::Pending {
            return;
        }
        tracing::warn!(session = %sid, task = %tid, %why, "task failed: its input is lost");
        let attempt = slot.attempt;
        if s.ephemeral {
            self.tasks
                .finalize(sid, tid, attempt, TaskOutcome::Failed(why));
            self.check_finished(sid);
        } else {
            // Counted as in flight until the failure is durable.
            slot.slot = Slot::Completing;
            s.counts.pending = take_one(s.counts.pending, "pending");
            s.counts.running += 1;
            self.commits.finish.entry(sid).or_default().push((
                tid,
                attempt,
                TaskOutcome::Failed(why),
            ));
        }
        self.reschedule = true;
    }
}

/// Counts a dispatched task's object input in its session's [`DataStats`]: a locality
/// hit (`local`) or bytes the node fetches.
fn count_input(data: &mut DataStats, object: &ObjectRef, local: bool) {
    data.object_tasks += 1;
    if local {
        data.local_tasks += 1;
        data.local_bytes = data.local_bytes.saturating_add(object.size);
    } else {
        data.fetched_bytes = data.fetched_bytes.saturating_add(object.size);
    }
}

/// What the scheduler sees of `spec`, whose launches for the owners in `backing_off` back
/// off now.
pub(super) fn app_view(
    spec: &ApplicationSpec,
    backing_off: BTreeMap<String, Option<String>>,
) -> scheduler::AppView {
    scheduler::AppView {
        name: spec.name.clone(),
        max_instances: spec.max_instances,
        delay_release_ms: spec.delay_release_ms,
        resources: spec.resources,
        selector: spec.selector.clone(),
        backing_off,
        probing: BTreeSet::new(),
    }
}
