//! The commits room: writes on their way to the store, and what the core does once
//! each is durable (or failed).

use super::*;

/// The commits room.
#[derive(Debug, Default)]
pub(super) struct Commits {
    /// Tokens of the next store request.
    pub(super) next_token: u64,
    /// Store requests in flight (at most [`limits::HEAD_STORE_REQUESTS_MAX`]), by token,
    /// with what to do once each is durable.
    pub(super) in_flight: HashMap<u64, Vec<AfterCommit>>,
    /// This batch's writes, and what waits on them (held back while the store is behind).
    pub(super) ops: Vec<StoreOp>,
    pub(super) after: Vec<AfterCommit>,
    /// Results accepted in this batch, written together per session at its end.
    pub(super) finish: BTreeMap<SessionId, Vec<(TaskId, u32, TaskOutcome)>>,
    /// Outcomes whose commit failed, held (never shown, never run again) and written
    /// again at the next tick, or once a storage fault has cleared.
    pub(super) finish_retry: BTreeMap<SessionId, Vec<(TaskId, u32, TaskOutcome)>>,
    /// Sessions whose record changed in this batch: each is written once, at its end,
    /// however many of its ranks or executors changed it.
    pub(super) dirty_sessions: std::collections::BTreeSet<SessionId>,
    /// Whether the store takes writes, and the data directory's free space.
    pub(super) storage: crate::storage_fault::StorageHealth,
}

/// What to do once a store request is durable.
#[derive(Debug)]
pub(super) enum AfterCommit {
    AckSubmit {
        session: SessionId,
        first: TaskId,
        count: u32,
        batch_id: u64,
        reply: ReplyId,
    },
    FinishResults {
        session: SessionId,
        results: Vec<(TaskId, u32, TaskOutcome)>,
    },
    AddApplication {
        spec: Box<ApplicationSpec>,
        /// An update: executors launched with the old spec are retired.
        replace: bool,
        reply: ReplyId,
    },
    AddSession {
        entry: Box<SessionEntry>,
        reply: ReplyId,
    },
    Respond {
        reply: ReplyId,
    },
    ReserveExecutorIds {
        upto: u64,
    },
    /// A durable session's close: it takes effect (the session may finish) once durable.
    CloseSession {
        session: SessionId,
        /// It was open before: a close that fails leaves it open.
        was_open: bool,
        reply: ReplyId,
    },
    /// A finished session's final record is durable: it leaves memory.
    Evict {
        session: SessionId,
    },
    /// An owner's new uid: usable by launches once durable.
    OwnerUid {
        owner: String,
    },
    /// A resent batch whose first copy was committing: acked once that commit is known.
    AckDuplicate {
        session: SessionId,
        batch_id: u64,
        first: TaskId,
        count: u32,
        reply: ReplyId,
    },
}

impl Core {
    /// What waited on a store request, once its commit is known: `result` says whether it
    /// is durable.
    pub(super) fn after_commit(
        &mut self,
        after: AfterCommit,
        result: &Result<(), CommitError>,
        now_ms: u64,
    ) {
        match after {
            AfterCommit::AckSubmit {
                session,
                first,
                count,
                batch_id,
                reply,
            } => self.ack_submit(session, batch_id, (first, count), reply, result),
            AfterCommit::FinishResults { session, results } => {
                self.finish_results(session, results, result)
            }
            AfterCommit::AddApplication {
                spec,
                replace,
                reply,
            } => {
                let r = match result {
                    Ok(()) => {
                        let name = spec.name.clone();
                        self.apps.insert(AppName::from(name.as_str()), *spec);
                        self.forget_launches_of(&name);
                        if replace {
                            self.retire_executors_of(&name, now_ms);
                        }
                        match self.application_info(&name) {
                            Some(info) => ClientResponse::Application(info),
                            None => ClientResponse::Ok,
                        }
                    }
                    Err(e) => persist_error(e),
                };
                self.out.reply(reply, r);
            }
            AfterCommit::AddSession { entry, reply } => self.add_session(*entry, reply, result),
            AfterCommit::AckDuplicate {
                session,
                batch_id,
                first,
                count,
                reply,
            } => self.ack_duplicate(session, batch_id, (first, count), reply),
            AfterCommit::Evict { session } => match result {
                Ok(()) => {
                    if self
                        .tasks
                        .sessions
                        .get(&session)
                        .is_some_and(|s| s.finished)
                    {
                        self.evict(session);
                    }
                }
                // Kept, and tried again at the next tick.
                Err(_) => {
                    self.tasks.evict_pending.insert(session, now_ms);
                }
            },
            AfterCommit::OwnerUid { owner } => {
                self.pool.owner_uids.committed(&owner, result.is_ok());
                self.reschedule = true;
            }
            AfterCommit::ReserveExecutorIds { upto } => {
                self.pool.reservation_pending = false;
                if result.is_ok() {
                    self.pool.ids_reserved = self.pool.ids_reserved.max(upto);
                    self.reschedule = true;
                }
            }
            AfterCommit::CloseSession {
                session,
                was_open,
                reply,
            } => {
                self.after_close(session, was_open, reply, result.as_ref().err());
            }
            AfterCommit::Respond { reply } => {
                self.out.reply(
                    reply,
                    match result {
                        Ok(()) => ClientResponse::Ok,
                        Err(e) => persist_error(e),
                    },
                );
            }
        }
    }

    /// A batch of tasks is durable (they become pending, and the client gets their ids) or
    /// not (its ids become holes, and the client is told to send it again).
    fn ack_submit(
        &mut self,
        session: SessionId,
        batch_id: u64,
        (first, count): (TaskId, u32),
        reply: ReplyId,
        result: &Result<(), CommitError>,
    ) {
        let Some(s) = self.tasks.sessions.get_mut(&session) else {
            self.out.unanswered.push(reply);
            return;
        };
        s.unacked_batches = s.unacked_batches.saturating_sub(1);
        let ok = result.is_ok();
        if !ok {
            s.batches.remove(&batch_id);
        }
        for i in 0..u64::from(count) {
            let id = TaskId(first.0 + i);
            if let Some(slot) = slot_of(&mut s.tasks, id) {
                if ok {
                    slot.slot = Slot::Pending;
                } else {
                    let before = slot_held(slot, s.ephemeral);
                    slot.slot = Slot::Rejected;
                    slot.input = Payload::default();
                    let after = slot_held(slot, s.ephemeral);
                    reheld(
                        &mut self.tasks.ledger,
                        owner_name(&s.stored.owner),
                        before,
                        after,
                    );
                }
            }
            if ok {
                s.pending.push_back(id);
            }
        }
        if ok && s.cancelled {
            // Acked after a cancel: the tasks end as Cancelled, durably.
            s.pending
                .retain(|t| t.0 < first.0 || t.0 >= first.0 + u64::from(count));
            s.counts.running += u64::from(count);
            let list = self.commits.finish.entry(session).or_default();
            for i in 0..u64::from(count) {
                let id = TaskId(first.0 + i);
                if let Some(slot) = slot_of(&mut s.tasks, id) {
                    slot.slot = Slot::Completing;
                }
                list.push((id, 1, TaskOutcome::Cancelled));
            }
        }
        if ok {
            crate::failpoints::crash_point!("after-commit-before-ack");
        }
        let r = match result {
            Ok(()) if s.cancelled => SubmitReply::Accepted {
                batch_id,
                first_task: first,
                count,
            },
            Ok(()) => {
                s.counts.pending += u64::from(count);
                self.reschedule = true;
                SubmitReply::Accepted {
                    batch_id,
                    first_task: first,
                    count,
                }
            }
            Err(e) => SubmitReply::Rejected {
                batch_id,
                error: api(
                    ErrorKind::Unavailable,
                    format!("the batch could not be made durable: {e}"),
                ),
            },
        };
        self.out.reply(reply, r);
        self.check_finished(session);
    }

    /// Results are durable: they become final and reach watchers. If not, they are held
    /// and written again.
    fn finish_results(
        &mut self,
        session: SessionId,
        results: Vec<(TaskId, u32, TaskOutcome)>,
        result: &Result<(), CommitError>,
    ) {
        if !self.tasks.sessions.contains_key(&session) {
            return;
        }
        match result {
            Ok(()) => {
                for (task, attempt, outcome) in results {
                    self.tasks.finalize(session, task, attempt, outcome);
                }
                let unfinished = self
                    .tasks
                    .sessions
                    .get(&session)
                    .map(|s| s.counts.unfinished());
                if unfinished == Some(0) {
                    self.reschedule = true;
                }
                self.check_finished(session);
            }
            Err(e) => {
                // Computed, accepted, not durable: never shown and never run again.
                // Held and written again at the next tick, or once a storage fault
                // has cleared (the fault itself is logged, once).
                if !self.commits.storage.is_faulted() {
                    tracing::error!(%session, error = %e, "results could not be persisted; holding them to write again");
                }
                self.commits
                    .finish_retry
                    .entry(session)
                    .or_default()
                    .extend(results);
            }
        }
    }

    /// A new session is durable: it enters memory (a job's application with it), and the
    /// client gets its view. If not, what it held goes back to its owner.
    fn add_session(
        &mut self,
        entry: SessionEntry,
        reply: ReplyId,
        result: &Result<(), CommitError>,
    ) {
        let r = match result {
            Ok(()) => {
                if let Some(job) = &entry.stored.job {
                    let app = job.spec.application(entry.stored.id);
                    self.apps.insert(AppName::from(app.name.as_str()), app);
                    self.reschedule = true;
                }
                let info = entry.info(0);
                self.tasks.sessions.insert(entry.stored.id, entry);
                ClientResponse::Session(info)
            }
            Err(e) => {
                self.tasks
                    .ledger
                    .release(owner_name(&entry.stored.owner), held_of(&entry));
                persist_error(e)
            }
        };
        self.out.reply(reply, r);
    }

    /// A resent batch whose first copy was committing: acked as that copy was.
    fn ack_duplicate(
        &mut self,
        session: SessionId,
        batch_id: u64,
        (first, count): (TaskId, u32),
        reply: ReplyId,
    ) {
        let durable = self
            .tasks
            .sessions
            .get(&session)
            .is_some_and(|s| s.batches.get(&batch_id) == Some(&(first, count)));
        self.out.reply(
            reply,
            if durable {
                SubmitReply::Accepted {
                    batch_id,
                    first_task: first,
                    count,
                }
            } else {
                SubmitReply::Rejected {
                    batch_id,
                    error: api(
                        ErrorKind::Unavailable,
                        "the batch could not be made durable; send it again",
                    ),
                }
            },
        );
    }
}
