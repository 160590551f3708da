//! The core's side of storage faults (`crate::storage_fault`): which requests a faulted
//! store refuses, a close that takes effect only once durable, and what happens when the
//! store takes writes again. A child module of `core`, kept apart to keep it small.

use super::{persist_error, CommitError, Core, ReplyId, SessionState, StoreOp};
use flame_protocol::messages::{ClientRequest, ClientResponse};
use flame_protocol::model::ApiError;
use flame_protocol::SessionId;

impl Core {
    /// While the store is faulted, the answer to a request that needs a commit: the
    /// fault's cause and what to do, at once, instead of a wait behind a failing disk.
    pub(super) fn storage_refusal(&self, request: &ClientRequest) -> Option<ApiError> {
        let writes = match request {
            ClientRequest::RegisterApplication(_)
            | ClientRequest::UpdateApplication(_)
            | ClientRequest::RemoveApplication { .. }
            | ClientRequest::CreateSession(_)
            | ClientRequest::CancelSession { .. }
            | ClientRequest::DrainNode { .. }
            | ClientRequest::UndrainNode { .. } => true,
            ClientRequest::CloseSession { id } => {
                self.tasks.sessions.get(id).is_some_and(|s| !s.ephemeral)
            }
            _ => false,
        };
        if writes {
            self.commits.storage.refusal()
        } else {
            None
        }
    }

    /// A durable session's close is known durable (or not): only now may the session
    /// finish. A close that failed leaves the session open, as it is on disk.
    ///
    /// A close of a finished session (cancelled, say) may land after the session left
    /// memory: a session leaves only once its final, closed record is durable, so the
    /// close holds whatever its own commit did, and is answered `Ok`.
    pub(super) fn after_close(
        &mut self,
        session: SessionId,
        was_open: bool,
        reply: ReplyId,
        error: Option<&CommitError>,
    ) {
        let Some(s) = self.tasks.sessions.get_mut(&session) else {
            if self.left_memory(session) {
                self.out.reply(reply, ClientResponse::Ok);
            } else {
                self.out.unanswered.push(reply);
            }
            return;
        };
        s.unacked_closes = s.unacked_closes.saturating_sub(1);
        match error {
            None => {
                self.out.reply(reply, ClientResponse::Ok);
            }
            Some(e) => {
                if was_open && s.unacked_closes == 0 && !s.finished && !s.cancelled {
                    s.stored.state = SessionState::Open;
                    s.stored.closed_ms = None;
                }
                self.out.reply(reply, persist_error(e));
            }
        }
        self.check_finished(session);
    }

    /// The store takes writes again: held results are written (and shown once durable),
    /// and every durable session and node record is written again, since changes to them
    /// may have been lost with the failed commits.
    pub(super) fn on_storage_recovered(&mut self, now_ms: u64) {
        if !self.commits.storage.recover(now_ms) {
            return;
        }
        self.write_held_results();
        let durable = self.tasks.sessions.iter().filter(|(_, s)| !s.ephemeral);
        self.commits
            .dirty_sessions
            .extend(durable.map(|(id, _)| *id));
        for n in self.cluster.nodes.values() {
            self.commits.ops.push(StoreOp::PutNode(n.stored()));
        }
        self.reschedule = true;
    }

    /// Results whose commit failed go into this batch's commit.
    pub(super) fn write_held_results(&mut self) {
        for (session, results) in std::mem::take(&mut self.commits.finish_retry) {
            self.commits
                .finish
                .entry(session)
                .or_default()
                .extend(results);
        }
    }
}
