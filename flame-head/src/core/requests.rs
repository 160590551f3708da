//! Client requests: what the core answers from memory, and the changes it makes durable
//! before it answers.

use super::*;

/// An owner is empty (the default) or a name of at most 64 printable bytes without spaces.
/// The executors that served `session` (id → node), or only `executor` among them,
/// grouped by node, each group in id order. Also used for finished sessions, from the
/// usage in their stored view.
pub fn served_targets(
    session: SessionId,
    mut served: BTreeMap<ExecutorId, &str>,
    executor: Option<ExecutorId>,
) -> Result<NodeExecutors, ApiError> {
    if let Some(wanted) = executor {
        served.retain(|id, _| *id == wanted);
        if served.is_empty() {
            return Err(api(
                ErrorKind::NotFound,
                format!(
                    "executor {wanted} did not serve session {session} \
                     (`flame session view {session}` lists its executors)"
                ),
            ));
        }
    }
    let mut by_node: BTreeMap<&str, Vec<ExecutorId>> = BTreeMap::new();
    for (id, node) in served {
        by_node.entry(node).or_default().push(id);
    }
    Ok(by_node
        .into_iter()
        .map(|(node, ids)| (node.to_string(), ids))
        .collect())
}

/// The answer to a new batch of `s` that adds no task, if it adds none: refused (the store
/// takes no writes, the session is closed, the batch is past a limit) or empty.
fn batch_answer(
    s: &SessionEntry,
    storage: &crate::storage_fault::StorageHealth,
    batch_id: u64,
    inputs: &[Payload],
    limit: usize,
) -> Option<SubmitReply> {
    let reject = |kind, message: String| SubmitReply::Rejected {
        batch_id,
        error: api(kind, message),
    };
    let session = s.stored.id;
    if let Some(error) = storage.refusal() {
        return Some(SubmitReply::Rejected { batch_id, error });
    }
    if s.stored.state != SessionState::Open {
        return Some(reject(
            ErrorKind::FailedPrecondition,
            format!("session {session} is closed and accepts no more tasks"),
        ));
    }
    if inputs.len() > limits::SUBMIT_BATCH_TASKS_MAX {
        return Some(reject(
            ErrorKind::LimitExceeded,
            format!(
                "a batch of {} tasks exceeds the limit of {} tasks",
                inputs.len(),
                limits::SUBMIT_BATCH_TASKS_MAX
            ),
        ));
    }
    if let Some((i, error)) = inputs
        .iter()
        .enumerate()
        .find_map(|(i, p)| payload_refusal(p, limit).map(|e| (i, e)))
    {
        return Some(reject(
            ErrorKind::LimitExceeded,
            format!("task input #{i} of batch {batch_id} is {error}"),
        ));
    }
    inputs.is_empty().then(|| SubmitReply::Accepted {
        batch_id,
        first_task: TaskId(s.stored.last_task + 1),
        count: 0,
    })
}

/// Why a task input or common data is refused for its size, if it is: inline bytes above
/// `limit` (larger ones go as objects), an object above [`limits::OBJECT_BYTES_MAX`].
pub(super) fn payload_refusal(payload: &Payload, limit: usize) -> Option<String> {
    match payload {
        Payload::Inline(b) if b.len() > limit => Some(format!(
            "{} bytes inline; the limit is {limit} bytes (put larger data as an object)",
            b.len()
        )),
        Payload::Object(o) if o.size > limits::OBJECT_BYTES_MAX => Some(format!(
            "an object of {} bytes; the limit is {} bytes",
            o.size,
            limits::OBJECT_BYTES_MAX
        )),
        _ => None,
    }
}

pub(super) fn validate_owner(owner: &str) -> Result<(), flame_protocol::model::SpecError> {
    let ok = owner.len() <= flame_protocol::model::APP_NAME_BYTES_MAX
        && owner.chars().all(|c| !c.is_whitespace() && !c.is_control());
    if ok {
        Ok(())
    } else {
        Err(flame_protocol::model::SpecError {
            field: "owner",
            reason: format!(
                "must be at most {} bytes without spaces or control characters",
                flame_protocol::model::APP_NAME_BYTES_MAX
            ),
        })
    }
}

/// Who an application is restricted to, for the error a refused user sees.
pub(super) fn describe_access(app: &ApplicationSpec) -> String {
    let mut parts = Vec::new();
    if !app.users.is_empty() {
        parts.push(format!("users {}", app.users.join(", ")));
    }
    if !app.groups.is_empty() {
        parts.push(format!("groups {}", app.groups.join(", ")));
    }
    parts.join(" and ")
}

pub(super) fn unknown_app(name: &str) -> String {
    format!("application `{name}` is not registered (see `flame app list`)")
}

pub fn unknown_session(id: SessionId) -> String {
    format!("session {id} does not exist (see `flame session list`)")
}

pub(super) fn persist_error(e: &CommitError) -> ClientResponse {
    ClientResponse::Error(api(
        ErrorKind::Unavailable,
        format!("the change could not be made durable: {e}"),
    ))
}

impl Core {
    /// Answers a request, now or (for changes) once they are durable.
    pub(super) fn on_request(&mut self, reply: ReplyId, request: Request, now_ms: u64) {
        match request {
            Request::Client(request) => {
                if let Some(error) = self.storage_refusal(&request) {
                    self.out.reply(reply, ClientResponse::Error(error));
                    return;
                }
                self.on_client(request, reply, now_ms)
            }
            Request::Submit {
                session,
                batch_id,
                inputs,
            } => self.on_submit(session, batch_id, inputs, reply),
            Request::Watch { session } => {
                let start = self.on_watch(session);
                self.out.reply(reply, start);
            }
            Request::ListTasks {
                session,
                states,
                after,
                limit,
            } => {
                let list = self.list_tasks(session, &states, after, limit);
                self.out.reply(reply, list);
            }
            Request::LogTargets { session, executor } => {
                // A job's ranks are not known before it starts: answered when it does.
                if let Some(s) = self.tasks.sessions.get_mut(&session) {
                    if !s.finished
                        && s.stored
                            .job
                            .as_ref()
                            .is_some_and(|j| j.state == JobState::Queued)
                    {
                        s.job_log_waiters.push((executor, reply));
                        self.out
                            .reply(reply, Reply::LogTargets(Ok(LogTargets::WhenStarted)));
                        return;
                    }
                }
                let targets = self.log_targets(session, executor).map(LogTargets::Now);
                self.out.reply(reply, targets);
            }
            Request::SessionOwner { session } => {
                let owner = self
                    .tasks
                    .sessions
                    .get(&session)
                    .map(|s| owner_name(&s.stored.owner).to_string());
                self.out.reply(reply, owner);
            }
            Request::ExecTarget { job, node } => {
                let target = self.exec_target(job, &node);
                self.out.reply(reply, target);
            }
        }
    }

    pub(super) fn on_client(&mut self, request: ClientRequest, reply: ReplyId, now_ms: u64) {
        let error = |kind, msg: String| ClientResponse::Error(api(kind, msg));
        match request {
            ClientRequest::RegisterApplication(spec) => self.put_application(spec, false, reply),
            ClientRequest::UpdateApplication(spec) => self.put_application(spec, true, reply),
            ClientRequest::ListApplications => {
                let list = self
                    .apps
                    .values()
                    .filter(|a| a.shim != ShimKind::Batch)
                    .filter_map(|a| self.application_info(&a.name))
                    .collect();
                self.out.reply(reply, ClientResponse::Applications(list));
            }
            ClientRequest::GetApplication { name } => match self.application_info(&name) {
                Some(info) => self.out.reply(reply, ClientResponse::Application(info)),
                None => self
                    .out
                    .reply(reply, error(ErrorKind::NotFound, unknown_app(&name))),
            },
            ClientRequest::RemoveApplication { name } => self.remove_application(name, reply),
            ClientRequest::CreateSession(spec) => self.create_session(spec, reply, now_ms),
            ClientRequest::ListSessions => {
                let list = self
                    .tasks
                    .sessions
                    .values()
                    .map(|s| s.info(self.executors_of(s.stored.id)))
                    .collect();
                self.out.reply(reply, ClientResponse::Sessions(list));
            }
            ClientRequest::GetSession { id } => match self.tasks.sessions.get(&id) {
                Some(s) => self.out.reply(
                    reply,
                    ClientResponse::Session(s.info(self.executors_of(id))),
                ),
                None => self
                    .out
                    .reply(reply, error(ErrorKind::NotFound, unknown_session(id))),
            },
            ClientRequest::CloseSession { id } => self.close_session(id, reply, now_ms),
            ClientRequest::CancelSession { id } => {
                if self.left_memory(id) {
                    return self.out.reply(reply, ClientResponse::Ok);
                }
                if !self.tasks.sessions.contains_key(&id) {
                    return self
                        .out
                        .reply(reply, error(ErrorKind::NotFound, unknown_session(id)));
                }
                self.cancel_session(id, reply, now_ms);
            }
            ClientRequest::ListNodes => {
                let list = self.node_list();
                self.out.reply(reply, ClientResponse::Nodes(list));
            }
            ClientRequest::DrainNode { name } => self.set_draining(&name, true, reply),
            ClientRequest::UndrainNode { name } => self.set_draining(&name, false, reply),
            ClientRequest::Queue => {
                let report = self.queue_report(now_ms);
                self.out.reply(reply, ClientResponse::Queue(report));
            }
            ClientRequest::PutObjects {
                owner,
                session,
                objects,
                replicas,
            } => self.put_objects(owner_name(&owner), session, objects, replicas, reply),
            ClientRequest::LocateObjects { owner, ids } => {
                let answer = self.locate_objects(owner_name(&owner), &ids);
                self.out.reply(reply, answer);
            }
            ClientRequest::ListObjects { owner, session } => {
                let answer = self.list_objects(owner_name(&owner), session);
                self.out.reply(reply, answer);
            }
            ClientRequest::RemoveObjects { owner, ids } => {
                let answer = self.remove_objects(owner_name(&owner), &ids);
                self.out.reply(reply, answer);
            }
            ClientRequest::OpenSubmitStream { .. }
            | ClientRequest::WatchResults { .. }
            | ClientRequest::Logs { .. }
            | ClientRequest::JobExec { .. }
            | ClientRequest::ListTasks { .. }
            | ClientRequest::CreateToken { .. }
            | ClientRequest::ListTokens
            | ClientRequest::RevokeToken { .. }
            | ClientRequest::RevokeCert { .. }
            | ClientRequest::ListCerts
            | ClientRequest::WhoAmI => self.out.reply(
                reply,
                error(
                    ErrorKind::InvalidArgument,
                    "streaming, token and identity requests are answered by the server".into(),
                ),
            ),
        }
    }

    /// Registers an application (`replace`: updates one), durably.
    fn put_application(&mut self, spec: ApplicationSpec, replace: bool, reply: ReplyId) {
        let error = |kind, msg: String| ClientResponse::Error(api(kind, msg));
        if let Err(e) = spec.validate() {
            return self
                .out
                .reply(reply, error(ErrorKind::InvalidArgument, e.to_string()));
        }
        match (replace, self.apps.contains_key(spec.name.as_str())) {
            (false, true) => {
                return self.out.reply(
                    reply,
                    error(
                        ErrorKind::AlreadyExists,
                        format!("application `{}` is already registered", spec.name),
                    ),
                );
            }
            (true, false) => {
                return self
                    .out
                    .reply(reply, error(ErrorKind::NotFound, unknown_app(&spec.name)));
            }
            _ => {}
        }
        self.commits.ops.push(StoreOp::PutApplication(spec.clone()));
        self.commits.after.push(AfterCommit::AddApplication {
            spec: Box::new(spec),
            replace,
            reply,
        });
    }

    /// Why application `name` cannot go: its unfinished sessions (the first few by id),
    /// and how to end them: when its executors fail to start, their tasks cannot finish,
    /// so only a cancel ends them.
    fn busy_application(&self, name: &str) -> String {
        const SHOWN: usize = 8;
        let ids: Vec<String> = self
            .tasks
            .sessions
            .values()
            .filter(|s| s.stored.application == name && !s.finished)
            .map(|s| s.stored.id.to_string())
            .collect();
        let mut listed = ids
            .iter()
            .take(SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if ids.len() > SHOWN {
            listed.push_str(&format!(" and {} more", ids.len() - SHOWN));
        }
        let failing = self
            .pool
            .launch_errors
            .iter()
            .find(|((app, _), _)| app.as_str() == name)
            .map(|(_, why)| why.as_str());
        match failing {
            Some(why) => format!(
                "application `{name}` has {} unfinished session(s) ({listed}); its executors \
                 fail to start (the last {why}), so their tasks cannot finish: cancel them \
                 (`flame session cancel ID`)",
                ids.len()
            ),
            None => format!(
                "application `{name}` has {} unfinished session(s) ({listed}); cancel them \
                 (`flame session cancel ID`), or close them (`flame session close ID`) and \
                 wait until their tasks finish",
                ids.len()
            ),
        }
    }

    /// Removes an application that has no unfinished session, durably.
    fn remove_application(&mut self, name: String, reply: ReplyId) {
        let error = |kind, msg: String| ClientResponse::Error(api(kind, msg));
        let Some(info) = self.application_info(&name) else {
            return self
                .out
                .reply(reply, error(ErrorKind::NotFound, unknown_app(&name)));
        };
        if info.open_sessions > 0 {
            return self.out.reply(
                reply,
                error(ErrorKind::FailedPrecondition, self.busy_application(&name)),
            );
        }
        self.apps.remove(name.as_str());
        self.reschedule = true;
        self.commits.ops.push(StoreOp::RemoveApplication(name));
        self.commits.after.push(AfterCommit::Respond { reply });
    }

    /// Closes a session: it accepts no more tasks and finishes once they are final. A
    /// durable session's close takes effect once durable.
    fn close_session(&mut self, id: SessionId, reply: ReplyId, now_ms: u64) {
        let error = |kind, msg: String| ClientResponse::Error(api(kind, msg));
        if self.left_memory(id) {
            // Finished: closed durably before it left.
            return self.out.reply(reply, ClientResponse::Ok);
        }
        let Some(s) = self.tasks.sessions.get_mut(&id) else {
            return self
                .out
                .reply(reply, error(ErrorKind::NotFound, unknown_session(id)));
        };
        if s.stored.state == SessionState::Closed && s.ephemeral {
            return self.out.reply(reply, ClientResponse::Ok);
        }
        // A durable session's close is written (again) even when it looks closed:
        // a close whose commit failed must not be answered Ok by the next try.
        let was_open = s.stored.state == SessionState::Open;
        s.stored.state = SessionState::Closed;
        s.stored.closed_ms.get_or_insert(now_ms);
        if s.ephemeral {
            self.out.reply(reply, ClientResponse::Ok);
        } else {
            // Finished only once the close is durable: see `after_close`.
            s.unacked_closes += 1;
            self.commits.ops.push(StoreOp::PutSession(s.stored.clone()));
            self.commits.after.push(AfterCommit::CloseSession {
                session: id,
                was_open,
                reply,
            });
        }
        self.reschedule = true;
        self.check_finished(id);
    }

    /// `flame node list`.
    fn node_list(&self) -> Vec<NodeInfo> {
        self.cluster
            .nodes
            .iter()
            .map(|(name, n)| NodeInfo {
                name: name.to_string(),
                state: match (n.conn.is_some(), n.draining) {
                    (false, _) => NodeState::NotReady,
                    (true, true) => NodeState::Draining,
                    (true, false) => NodeState::Ready,
                },
                allocatable: n.registration.allocatable.clone(),
                allocated: self.allocated_on(name),
                labels: n.registration.labels.clone(),
                isolation: n.registration.isolation,
                identity: n.identity.clone(),
                executors: self
                    .pool
                    .executors
                    .values()
                    .filter(|e| &e.node == name)
                    .count() as u32,
                last_seen_ms: n.last_seen_ms,
                cache: n.cache,
            })
            .collect()
    }

    /// Closes a session and ends its unfinished tasks as Cancelled, durably. Executors with
    /// its tasks in hand are killed, so the tasks stop; its idle executors unbind as usual.
    pub(super) fn cancel_session(&mut self, id: SessionId, reply: ReplyId, now_ms: u64) {
        let Some(s) = self.tasks.sessions.get_mut(&id) else {
            self.out.unanswered.push(reply);
            return;
        };
        if s.finished {
            self.out.reply(reply, ClientResponse::Ok);
            return;
        }
        s.cancelled = true;
        self.end_unfinished(id, TaskOutcome::Cancelled, Some(reply), now_ms);
    }

    /// Closes a session and ends its unfinished tasks with `outcome`, durably; executors
    /// with its tasks in hand are killed. Answers `reply` once that is durable.
    pub(super) fn end_unfinished(
        &mut self,
        id: SessionId,
        outcome: TaskOutcome,
        reply: Option<ReplyId>,
        now_ms: u64,
    ) {
        let Some(s) = self.tasks.sessions.get_mut(&id) else {
            self.out.unanswered.extend(reply);
            return;
        };
        if s.stored.state == SessionState::Open {
            s.stored.state = SessionState::Closed;
            s.stored.closed_ms = Some(now_ms);
        }
        s.job_stop_at_ms = None;
        s.pending.clear();
        s.located = None;
        let mut cancelled = Vec::new();
        for (i, t) in s.tasks.iter_mut().enumerate() {
            if matches!(t.slot, Slot::Pending | Slot::Running(_)) {
                if t.slot == Slot::Pending {
                    // Counted as in flight until the cancellation is durable.
                    s.counts.pending = take_one(s.counts.pending, "pending");
                    s.counts.running += 1;
                }
                cancelled.push((TaskId(i as u64 + 1), t.attempt));
                t.slot = Slot::Completing;
            }
        }
        let mut killed = Vec::new();
        // A job's ranks all go, busy or not: none may outlive it.
        let is_job = s.stored.job.is_some();
        for (eid, e) in self.pool.executors.iter_mut() {
            if e.session == Some(id)
                && (!e.outstanding.is_empty() || is_job)
                && e.phase != ExecutorPhase::Releasing
            {
                e.outstanding.clear();
                e.phase = ExecutorPhase::Releasing;
                killed.push((e.node.clone(), *eid));
            }
        }
        for (node, executor) in killed {
            self.commands
                .entry(node)
                .or_default()
                .push(NodeCommand::Kill { executor });
        }
        tracing::info!(session = %id, tasks = cancelled.len(), ?outcome, "session's unfinished tasks ended");
        if s.ephemeral {
            for (task, attempt) in cancelled {
                self.tasks.finalize(id, task, attempt, outcome.clone());
            }
            if let Some(reply) = reply {
                self.out.reply(reply, ClientResponse::Ok);
            }
        } else {
            self.commits.finish.entry(id).or_default().extend(
                cancelled
                    .into_iter()
                    .map(|(task, attempt)| (task, attempt, outcome.clone())),
            );
            self.commits.ops.push(StoreOp::PutSession(s.stored.clone()));
            if let Some(reply) = reply {
                self.commits.after.push(AfterCommit::Respond { reply });
            }
        }
        self.reschedule = true;
        self.check_finished(id);
    }

    pub(super) fn application_info(&self, name: &str) -> Option<ApplicationInfo> {
        let spec = self.apps.get(name)?;
        Some(ApplicationInfo {
            spec: spec.redacted(),
            executors: self
                .pool
                .executors
                .values()
                .filter(|e| e.application == name)
                .count() as u32,
            open_sessions: self
                .tasks
                .sessions
                .values()
                .filter(|s| s.stored.application == name && !s.finished)
                .count() as u32,
        })
    }

    /// Opens a session, durably (an ephemeral one's id durably): answered once it is.
    pub(super) fn create_session(&mut self, spec: SessionSpec, reply: ReplyId, now_ms: u64) {
        if let Err(e) = self.check_session_spec(&spec) {
            self.out.reply(reply, ClientResponse::Error(e));
            return;
        }
        let id = SessionId(self.tasks.next_session);
        if let Some(why) = self.never_fits(&spec, id) {
            self.out.reply(
                reply,
                ClientResponse::Error(api(ErrorKind::FailedPrecondition, why)),
            );
            return;
        }
        // Ids only grow, and one is never handed out twice (the counter is durable
        // before the id reaches anyone).
        assert!(
            !self.tasks.sessions.contains_key(&id),
            "session id {id} handed out twice"
        );
        self.tasks.next_session += 1;
        let owner = spec.owner_or_default().to_string();
        let (application, job) = match spec.job {
            Some(job) => (job.application(id).name, Some(JobInfo::queued(job))),
            None => (spec.application, None),
        };
        let mut entry = SessionEntry::new(
            StoredSession {
                id,
                owner,
                priority: spec.priority,
                application,
                common_data: spec.common_data,
                state: SessionState::Open,
                created_ms: now_ms,
                closed_ms: None,
                last_task: 0,
                usage: Vec::new(),
                job,
            },
            spec.ephemeral,
        );
        // A job's ranks are its tasks, 1 to N (rank = task - 1), made with the session; it
        // takes no others. They run once its ranks are all placed (`start_jobs`).
        let ranks = entry.stored.job.as_ref().map_or(0, |j| j.spec.ranks);
        if ranks > 0 {
            entry.stored.state = SessionState::Closed;
            entry.stored.closed_ms = Some(now_ms);
            entry.stored.last_task = u64::from(ranks);
            entry.tasks = (0..ranks)
                .map(|_| TaskSlot {
                    slot: Slot::Pending,
                    attempt: 1,
                    runs_failed: 0,
                    input: Payload::default(),
                    outcome: None,
                })
                .collect();
            entry.counts.pending = u64::from(ranks);
        }
        // Held from now: sessions being created count, so a burst of creates cannot pass
        // the quota before the first commit.
        let held = held_of(&entry);
        let owner = owner_name(&entry.stored.owner).to_string();
        if let Err(e) = self
            .tasks
            .ledger
            .check(self.config.quotas.of(&owner), &owner, held)
        {
            self.tasks.next_session -= 1;
            self.out.reply(reply, ClientResponse::Error(e.into()));
            return;
        }
        self.tasks.ledger.charge(&owner, held);
        self.commits.ops.push(StoreOp::PutCounters {
            next_session: Some(self.tasks.next_session),
            next_executor: None,
        });
        if !entry.ephemeral {
            self.commits
                .ops
                .push(StoreOp::PutSession(entry.stored.clone()));
        }
        if ranks > 0 {
            self.commits.ops.push(StoreOp::AddTasks {
                session: id,
                batch_id: 0,
                first: TaskId(1),
                inputs: vec![Payload::default(); ranks as usize],
            });
        }
        self.commits.after.push(AfterCommit::AddSession {
            entry: Box::new(entry),
            reply,
        });
    }

    /// Why the executors `spec` asks for (a job's ranks all together) could never be
    /// placed on the nodes this head knows, if so (`scheduler::never_fits_cluster`).
    fn never_fits(&self, spec: &SessionSpec, id: SessionId) -> Option<String> {
        let (app, gang) = match &spec.job {
            Some(job) => (
                super::schedule::app_view(&job.application(id), BTreeMap::new()),
                Some(scheduler::Gang {
                    ranks: job.ranks,
                    ranks_per_node: job.ranks_per_node,
                }),
            ),
            None => (
                super::schedule::app_view(
                    self.apps.get(spec.application.as_str())?,
                    BTreeMap::new(),
                ),
                None,
            ),
        };
        scheduler::never_fits_cluster(&self.node_views(), &app, gang)
    }

    /// Whether `spec` may open a session: a valid job, or a registered application that
    /// admits its owner; a valid owner; common data within bounds.
    fn check_session_spec(&self, spec: &SessionSpec) -> Result<(), ApiError> {
        if let Some(job) = &spec.job {
            if let Err(e) = job.validate() {
                return Err(api(ErrorKind::InvalidArgument, format!("job spec: {e}")));
            }
            if spec.ephemeral {
                return Err(api(
                    ErrorKind::InvalidArgument,
                    "a batch job cannot be ephemeral: its ranks' outcomes are kept durably",
                ));
            }
        } else if self
            .apps
            .get(spec.application.as_str())
            .is_some_and(|a| a.shim == ShimKind::Batch)
        {
            return Err(api(
                ErrorKind::InvalidArgument,
                format!(
                    "`{}` runs the ranks of a batch job; it takes no other session",
                    spec.application
                ),
            ));
        } else if !self.apps.contains_key(spec.application.as_str()) {
            return Err(api(ErrorKind::NotFound, unknown_app(&spec.application)));
        }
        if let Err(e) = validate_owner(&spec.owner) {
            return Err(api(ErrorKind::InvalidArgument, e.to_string()));
        }
        if let Some(app) = self
            .apps
            .get(spec.application.as_str())
            .filter(|_| spec.job.is_none())
        {
            let owner = spec.owner_or_default();
            let groups = &self.config.groups;
            let in_group = |g: &str| groups.get(g).is_some_and(|m| m.iter().any(|u| u == owner));
            if !app.allows(owner, in_group) {
                return Err(api(
                    ErrorKind::PermissionDenied,
                    format!(
                        "user `{owner}` may not use application `{}`: it is restricted to {}",
                        app.name,
                        describe_access(app)
                    ),
                ));
            }
        }
        if let Some(error) = payload_refusal(&spec.common_data, self.config.task_input_bytes_max) {
            return Err(api(
                ErrorKind::LimitExceeded,
                format!("the common data is {error}"),
            ));
        }
        Ok(())
    }

    pub(super) fn on_submit(
        &mut self,
        session: SessionId,
        batch_id: u64,
        inputs: Vec<Payload>,
        reply: ReplyId,
    ) {
        let reject = |kind, message: String| SubmitReply::Rejected {
            batch_id,
            error: api(kind, message),
        };
        let limit = self.config.task_input_bytes_max;
        let Some(s) = self.tasks.sessions.get_mut(&session) else {
            self.out.reply(
                reply,
                if session.0 < self.tasks.next_session {
                    reject(
                        ErrorKind::FailedPrecondition,
                        format!("session {session} has finished and accepts no more tasks"),
                    )
                } else {
                    reject(ErrorKind::NotFound, unknown_session(session))
                },
            );
            return;
        };
        if let Some(&(first, count)) = s.batches.get(&batch_id) {
            // A batch sent again (its ack was lost with a connection): the same tasks,
            // never new ones. If the first copy is not durable yet, answer after it is.
            let in_flight = slot_of(&mut s.tasks, first).is_some_and(|t| t.slot == Slot::Unacked);
            if in_flight {
                self.commits.after.push(AfterCommit::AckDuplicate {
                    session,
                    batch_id,
                    first,
                    count,
                    reply,
                });
            } else {
                self.out.reply(
                    reply,
                    SubmitReply::Accepted {
                        batch_id,
                        first_task: first,
                        count,
                    },
                );
            }
            return;
        }
        if let Some(answer) = batch_answer(s, &self.commits.storage, batch_id, &inputs, limit) {
            self.out.reply(reply, answer);
            return;
        }
        let adding = Held {
            sessions: 0,
            tasks: inputs.len() as u64,
            bytes: inputs.iter().map(|p| p.held_bytes() as u64).sum(),
        };
        let owner = owner_name(&s.stored.owner);
        if let Err(e) = self
            .tasks
            .ledger
            .check(self.config.quotas.of(owner), owner, adding)
        {
            self.out.reply(
                reply,
                SubmitReply::Rejected {
                    batch_id,
                    error: e.into(),
                },
            );
            return;
        }
        self.tasks.ledger.charge(owner, adding);
        let first = TaskId(s.stored.last_task + 1);
        let count = inputs.len() as u32;
        s.stored.last_task += u64::from(count);
        s.batches.insert(batch_id, (first, count));
        if s.ephemeral {
            for (i, input) in inputs.into_iter().enumerate() {
                s.tasks.push(TaskSlot {
                    slot: Slot::Pending,
                    attempt: 1,
                    runs_failed: 0,
                    input,
                    outcome: None,
                });
                s.pending.push_back(TaskId(first.0 + i as u64));
            }
            s.counts.pending += u64::from(count);
            self.reschedule = true;
            self.out.reply(
                reply,
                SubmitReply::Accepted {
                    batch_id,
                    first_task: first,
                    count,
                },
            );
            return;
        }
        for input in &inputs {
            s.tasks.push(TaskSlot {
                slot: Slot::Unacked,
                attempt: 1,
                runs_failed: 0,
                input: input.clone(),
                outcome: None,
            });
        }
        s.unacked_batches += 1;
        self.commits.ops.push(StoreOp::AddTasks {
            session,
            batch_id,
            first,
            inputs,
        });
        self.commits.after.push(AfterCommit::AckSubmit {
            session,
            first,
            count,
            batch_id,
            reply,
        });
    }

    pub(super) fn list_tasks(
        &self,
        session: SessionId,
        states: &[TaskState],
        after: TaskId,
        limit: u32,
    ) -> Result<Option<Vec<TaskInfo>>, ApiError> {
        if self.left_memory(session) {
            return Ok(None);
        }
        let s = self
            .tasks
            .sessions
            .get(&session)
            .ok_or_else(|| api(ErrorKind::NotFound, unknown_session(session)))?;
        if s.finished && !s.ephemeral {
            return Ok(None);
        }
        let limit = (limit as usize).min(limits::MESSAGE_BATCH_MAX);
        let start = usize::try_from(after.0).unwrap_or(usize::MAX);
        let list = s
            .tasks
            .iter()
            .enumerate()
            .skip(start)
            .filter(|(_, t)| !matches!(t.slot, Slot::Unacked | Slot::Rejected))
            .filter(|(_, t)| states.is_empty() || states.contains(&t.slot.state()))
            .take(limit)
            .map(|(i, t)| TaskInfo {
                task: TaskId(i as u64 + 1),
                state: t.slot.state(),
                attempt: t.attempt,
                message: match &t.outcome {
                    Some(TaskOutcome::Failed(m)) => Some(m.clone()),
                    _ => None,
                },
            })
            .collect();
        Ok(Some(list))
    }

    /// Every executor that served `session`: those recorded in its usage (written when
    /// one unbinds or exits; past `USAGE_RECORDS_MAX` records, later executors are folded
    /// into the last one and not found here) and those bound to it now.
    pub(super) fn log_targets(
        &self,
        session: SessionId,
        executor: Option<ExecutorId>,
    ) -> Result<NodeExecutors, ApiError> {
        let s = self
            .tasks
            .sessions
            .get(&session)
            .ok_or_else(|| api(ErrorKind::NotFound, unknown_session(session)))?;
        let mut served: BTreeMap<ExecutorId, &str> = s
            .stored
            .usage
            .iter()
            .map(|u| (u.executor, u.node.as_str()))
            .collect();
        for (id, e) in &self.pool.executors {
            if e.session == Some(session) {
                served.insert(*id, e.node.as_str());
            }
        }
        served_targets(session, served, executor)
    }

    pub(super) fn on_watch(&mut self, session: SessionId) -> Result<WatchStart, ApiError> {
        if self.left_memory(session) {
            return Ok(WatchStart {
                backfill: Backfill::Store,
                finished: true,
            });
        }
        let s = self
            .tasks
            .sessions
            .get_mut(&session)
            .ok_or_else(|| api(ErrorKind::NotFound, unknown_session(session)))?;
        let backfill = if s.ephemeral {
            Backfill::Memory(
                s.tasks
                    .iter()
                    .enumerate()
                    .filter_map(|(i, t)| {
                        t.outcome.clone().map(|outcome| TaskResult {
                            task: TaskId(i as u64 + 1),
                            attempt: t.attempt,
                            outcome,
                        })
                    })
                    .collect(),
            )
        } else {
            Backfill::Store
        };
        if !s.finished {
            // The server attaches the watcher with this answer.
            s.watchers += 1;
        }
        Ok(WatchStart {
            backfill,
            finished: s.finished,
        })
    }
}
