//! The head's state machine: sessions, tasks, executors and nodes, driven by events.
//!
//! The core is sans-IO: it performs no I/O, reads no clock and holds no channel. Each
//! event comes with `now_ms`; what the core wants done collects in its [`Outputs`] (an
//! answer under the [`ReplyId`] the server gave the request, a frame for a node
//! connection, a request for the store writer, a message for a session's watchers) and is
//! taken by the server with [`Core::take_outputs`] after [`Core::end_batch`]. That is
//! where batching happens: one `Commands` frame per node, one store request per batch, one
//! results message per session. Tests and the simulation read the same [`Outputs`].
//!
//! The state is in rooms, each a field of [`Core`] with its own file for the code that
//! works in it: `tasks` (sessions, task slots, the quota ledger), `pool` (executors and
//! their ids), `cluster` (nodes and their connections), `commits` (store requests and
//! what waits on them), `jobs` (batch jobs), `objects` (the object book: which nodes hold
//! which owner's objects, and the grants to store and read them). By event: client requests in `requests`,
//! node messages in `cluster`, commits in `commits`, ticks and the end of a batch here,
//! the scheduler's decisions in `schedule`, a restart's recovery in `recovery`, storage
//! faults in `storage`.
//!
//! Invariants:
//! * a task id is acked to a client only after its batch is durable (or at once for an
//!   ephemeral session);
//! * a result is accepted only from the executor the task runs on and for its current
//!   attempt (fencing); anything else is dropped;
//! * a result becomes final, and reaches watchers, only after it is durable;
//! * every acked task ends in exactly one final state;
//! * every [`ReplyId`] the core is given is answered once (`LogTargets::WhenStarted`: once
//!   more, with [`Reply::JobLogTargets`]) or named in [`Outputs::unanswered`].

use crate::names::{AppName, NodeName, OwnerName};
use crate::quotas::{Held, Ledger, QuotaBook};
use crate::scheduler::{self, Decision, ExecutorPhase, Snapshot};
use crate::storage_fault::CommitError;
use crate::store::{StoreOp, StoreRequest, StoredSession, StoredTask, USAGE_RECORDS_MAX};
use bytes::Bytes;
use flame_protocol::limits;
use flame_protocol::messages::{
    ClientRequest, ClientResponse, ExecutorEvent, ExecutorReport, HeadToNode, NodeCommand,
    NodeRegistration, NodeTaskResult, NodeToHead, SubmitReply, Usage,
};
use flame_protocol::model::{
    job_of_application, ApiError, ApplicationInfo, ApplicationSpec, DataStats, ErrorKind,
    ExecutorIdentity, ExecutorOwner, ExecutorUsage, JobFailure, JobInfo, JobState, NodeInfo,
    NodeState, OwnerQueue, QueueReport, RankInfo, RankLaunch, Resources, SessionInfo, SessionQueue,
    SessionSpec, SessionState, ShimKind, TaskAssignment, TaskCounts, TaskInfo, TaskOutcome,
    TaskResult, TaskState, JOB_APPLICATION_PREFIX,
};
use flame_protocol::object::Payload;
use flame_protocol::{ExecutorId, SessionId, TaskId};
use lineage::Rebuilds;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

mod cluster;
mod commits;
mod jobs;
mod lineage;
mod locality;
mod objects;
mod pool;
mod recovery;
mod requests;
mod schedule;
mod storage;
mod tasks;

use cluster::*;
use commits::*;
use jobs::*;
use objects::*;
use pool::*;
use requests::*;
use tasks::*;

pub use requests::{served_targets, unknown_session};
#[cfg(test)]
pub use tasks::EPHEMERAL_KEPT_MS;

/// Identifies one node connection, so messages from a replaced connection are ignored.
pub type ConnId = u64;

/// Names one request the server waits on the answer to; the server picks it (unique among
/// its open requests) and maps it back to its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplyId(pub u64);

/// What a watcher stream receives.
#[derive(Debug, Clone)]
pub enum WatchMsg {
    Results(Vec<TaskResult>),
    Finished,
}

/// Where a new watcher finds the results that were final before it attached.
#[derive(Debug)]
pub enum Backfill {
    /// Read them from the store (durable sessions). Results may arrive both ways; the
    /// watcher drops the duplicates.
    Store,
    /// Here they are (ephemeral sessions).
    Memory(Vec<TaskResult>),
}

/// Answer to a watch request.
#[derive(Debug)]
pub struct WatchStart {
    pub backfill: Backfill,
    /// The session had already finished: nothing more will come after the backfill.
    /// Otherwise the watcher gets the session's [`Outputs::watch`] messages from now on,
    /// up to and including `Finished`.
    pub finished: bool,
}

/// Node names, each with the executors on it whose logs to read (`Request::LogTargets`).
pub type NodeExecutors = Vec<(String, Vec<ExecutorId>)>;

/// The answer to `Request::LogTargets`.
#[derive(Debug)]
pub enum LogTargets {
    Now(NodeExecutors),
    /// A batch job that has not started: its ranks are known when it does (or it ends),
    /// and come then under the same [`ReplyId`] as [`Reply::JobLogTargets`].
    WhenStarted,
}

/// A question the server asks for a caller; answered in [`Outputs::replies`].
// Client requests are the common case and the largest: each is moved once, into the core;
// a box would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Request {
    Client(ClientRequest),
    Submit {
        session: SessionId,
        batch_id: u64,
        inputs: Vec<Payload>,
    },
    Watch {
        session: SessionId,
    },
    /// `ClientRequest::ListTasks`, answered from memory, or `None` when the session has
    /// finished and its tasks must be read from the store.
    ListTasks {
        session: SessionId,
        states: Vec<TaskState>,
        after: TaskId,
        limit: u32,
    },
    /// `ClientRequest::Logs`: the executors whose logs make up a session's (or only
    /// `executor`, which must have served it), grouped by node, each group in id order.
    /// NotFound for an unknown session, or an executor that never served it.
    LogTargets {
        session: SessionId,
        executor: Option<ExecutorId>,
    },
    /// `ClientRequest::JobExec`: the rank of a running job on a node whose allocation a
    /// command starts in (the one with the lowest executor id there).
    ExecTarget {
        job: SessionId,
        node: String,
    },
    /// Who owns a session (`None`: no such session), for the server's access checks.
    SessionOwner {
        session: SessionId,
    },
}

/// An answer, one kind per [`Request`] kind.
// Client responses are the common case and the largest: each is moved once, to its caller;
// a box would cost an allocation per answer.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Reply {
    Client(ClientResponse),
    Submit(SubmitReply),
    Watch(Result<WatchStart, ApiError>),
    ListTasks(Result<Option<Vec<TaskInfo>>, ApiError>),
    LogTargets(Result<LogTargets, ApiError>),
    /// The second answer to a `LogTargets` answered `WhenStarted`: the job started (or
    /// ended before it did).
    JobLogTargets(Result<NodeExecutors, ApiError>),
    ExecTarget(Result<ExecutorId, ApiError>),
    SessionOwner(Option<String>),
}

/// `From` each answer type into [`Reply`], and back with `TryFrom` (the server's callers
/// know which kind they asked for).
macro_rules! reply_kinds {
    ($($variant:ident($ty:ty)),* $(,)?) => {$(
        impl From<$ty> for Reply {
            fn from(answer: $ty) -> Reply {
                Reply::$variant(answer)
            }
        }
        impl TryFrom<Reply> for $ty {
            type Error = Reply;
            fn try_from(reply: Reply) -> Result<$ty, Reply> {
                match reply {
                    Reply::$variant(answer) => Ok(answer),
                    other => Err(other),
                }
            }
        }
    )*};
}

reply_kinds!(
    Client(ClientResponse),
    Submit(SubmitReply),
    Watch(Result<WatchStart, ApiError>),
    ListTasks(Result<Option<Vec<TaskInfo>>, ApiError>),
    LogTargets(Result<LogTargets, ApiError>),
    JobLogTargets(Result<NodeExecutors, ApiError>),
    ExecTarget(Result<ExecutorId, ApiError>),
    SessionOwner(Option<String>),
);

/// Everything that drives the core.
#[derive(Debug)]
pub enum Event {
    /// A request, answered under `reply`.
    Request {
        reply: ReplyId,
        request: Request,
    },
    /// The callers of these replies went away before their answer (a `flame logs` waiting
    /// for a job to start): the core forgets them.
    CallersGone {
        replies: Vec<ReplyId>,
    },
    NodeConnected {
        conn: ConnId,
        /// The address the node connects from: its ranks' `MASTER_ADDR`.
        address: String,
        registration: NodeRegistration,
    },
    NodeMessage {
        conn: ConnId,
        message: NodeToHead,
    },
    NodeDisconnected {
        conn: ConnId,
        reason: String,
    },
    /// The store writer finished a group commit.
    Committed {
        tokens: Vec<u64>,
        result: Result<(), CommitError>,
    },
    /// Periodic: heartbeat timeouts and `delay_release`.
    Tick,
    /// The head itself did not run for `stalled_ms` (stopped by a signal, a frozen VM, a
    /// starved host, or a wall clock stepped forward): the event loop measured that gap
    /// against its own cadence. Silence during it is the head's, not the nodes', so every
    /// connected node gets a fresh heartbeat window and recovery its lost time back.
    Stalled {
        stalled_ms: u64,
    },
    /// The store writer's commit or probe failed: the head takes no writes until
    /// `StorageRecovered` (see `storage_fault`).
    StorageFaulted {
        fault: crate::storage_fault::StorageFault,
    },
    /// A probe write succeeded after a fault.
    StorageRecovered,
    /// The data directory's free space, measured periodically.
    DiskSpace(crate::storage_fault::DiskSpace),
}

/// What happens to a node connection.
#[derive(Debug)]
pub enum LinkOutput {
    /// A frame for it.
    Send(HeadToNode),
    /// The core let go of it (the node was declared lost): the server closes it, after the
    /// frames before, so the node registers afresh.
    Close,
}

/// What the core wants done, in the order it decided it; taken by [`Core::take_outputs`].
/// The order within each list is the order the server must keep; across lists the server
/// routes `replies` before `watch` (a watcher attaches with its answer, before the
/// session's next messages).
#[derive(Debug, Default)]
pub struct Outputs {
    /// Answers to requests.
    pub replies: Vec<(ReplyId, Reply)>,
    /// Requests the core will never answer (their session went away meanwhile): their
    /// callers are let go, as a dropped answer channel would.
    pub unanswered: Vec<ReplyId>,
    /// Frames and closes for node connections.
    pub links: Vec<(ConnId, LinkOutput)>,
    /// Requests for the store writer: at most one per batch (see
    /// [`limits::HEAD_STORE_REQUESTS_MAX`] for how many may be in flight).
    pub store: Vec<StoreRequest>,
    /// Messages for each session's watchers.
    pub watch: Vec<(SessionId, WatchMsg)>,
}

impl Outputs {
    /// Answers `reply`.
    pub(super) fn reply(&mut self, reply: ReplyId, answer: impl Into<Reply>) {
        self.replies.push((reply, answer.into()));
    }

    /// A frame for a node connection.
    pub(super) fn send(&mut self, conn: ConnId, frame: HeadToNode) {
        self.links.push((conn, LinkOutput::Send(frame)));
    }

    /// Whether nothing is waiting to be taken.
    pub fn is_empty(&self) -> bool {
        self.replies.is_empty()
            && self.unanswered.is_empty()
            && self.links.is_empty()
            && self.store.is_empty()
            && self.watch.is_empty()
    }
}

/// An owner as stored, with the default for none.
pub fn owner_name(owner: &str) -> &str {
    if owner.is_empty() {
        flame_protocol::model::DEFAULT_OWNER
    } else {
        owner
    }
}

/// Settings of the core.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub task_input_bytes_max: usize,
    /// Attempts before a task whose executor keeps getting lost is failed.
    pub max_attempts: u32,
    pub heartbeat_timeout_ms: u64,
    /// Fair-share weight per owner; owners not listed weigh 1.
    pub owner_weights: BTreeMap<String, u32>,
    /// How long an executor told to unbind (reclaimed for another session) may keep
    /// running its task before it is killed and the task goes back to pending, uncharged.
    /// `None`: never killed, the task always finishes.
    pub preemption_grace_ms: Option<u64>,
    /// Makes the credential MPI jobs' ranks get in [`JOB_TOKEN_ENV`]; `None` (unit tests):
    /// none is given.
    pub job_credentials: Option<crate::auth::JobCredentials>,
    /// Per-owner quotas on what the core holds (sessions, tasks, bytes).
    pub quotas: QuotaBook,
    /// The uids owners get (see `owner_uids.rs`).
    pub owner_uid_range: crate::owner_uids::UidRange,
    /// Group name → members, for applications' `groups`.
    pub groups: BTreeMap<String, Vec<String>>,
    /// Signs object grants (the server makes a fresh one at each start); `None`: the head
    /// grants nothing, so no object can be stored or read.
    pub grant_signer: Option<std::sync::Arc<flame_protocol::object_grant::GrantSigner>>,
    /// Task outputs above this many bytes stay in the node's object cache (told to nodes
    /// when they register).
    pub object_inline_max: u64,
    /// Task outputs above this many bytes fail their task (told to nodes when they
    /// register, checked again here).
    pub task_output_bytes_max: u64,
    /// How long a pending task waits for an executor on a node holding its input object
    /// before any executor may take it ([`locality::LocalityQueue`]).
    pub locality_wait_ms: u64,
    /// How long an ended session's objects stay ([`limits::SESSION_OBJECTS_RETENTION`]).
    pub object_retention_ms: u64,
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            task_input_bytes_max: limits::TASK_INPUT_BYTES_MAX,
            max_attempts: 3,
            heartbeat_timeout_ms: limits::HEARTBEAT_TIMEOUT.as_millis() as u64,
            owner_weights: BTreeMap::new(),
            preemption_grace_ms: None,
            job_credentials: None,
            quotas: QuotaBook::default(),
            owner_uid_range: crate::owner_uids::UID_RANGE_DEFAULT,
            groups: BTreeMap::new(),
            grant_signer: flame_protocol::object_grant::GrantSigner::generate()
                .ok()
                .map(std::sync::Arc::new),
            object_inline_max: limits::OBJECT_INLINE_BYTES_DEFAULT,
            task_output_bytes_max: limits::TASK_OUTPUT_BYTES_MAX,
            locality_wait_ms: limits::LOCALITY_WAIT.as_millis() as u64,
            object_retention_ms: limits::SESSION_OBJECTS_RETENTION.as_millis() as u64,
        }
    }
}

/// The head's state, in rooms: each sub-struct holds one concern's tables, so that code
/// working in one room borrows it alone while it reads or writes another.
#[derive(Debug)]
pub struct Core {
    config: CoreConfig,
    /// What the batch produced so far, until the server takes it.
    out: Outputs,
    /// Commands for each node, collected during a batch and sent at its end as one frame
    /// (or a few) per node.
    commands: BTreeMap<NodeName, Vec<NodeCommand>>,
    apps: BTreeMap<AppName, ApplicationSpec>,
    /// Sessions, their tasks, and what owners hold against their quotas.
    tasks: Tasks,
    /// Executors, their ids, and the launch backoff.
    pool: Pool,
    /// Nodes and their connections.
    cluster: Cluster,
    /// Writes on their way to the store, and what waits on them.
    commits: Commits,
    /// Batch jobs' work left for the end of the batch or the next tick.
    jobs: JobFlags,
    /// Which nodes hold which owners' objects.
    objects: ObjectBook,
    /// Lost task outputs being rebuilt by re-running their tasks.
    rebuilds: Rebuilds,
    /// After a restart, the time until which nothing is dispatched or launched, so that
    /// reconnecting nodes can report the tasks they still run; `None` once recovered.
    recovering_until_ms: Option<u64>,
    /// Something changed that the scheduler should look at, at the end of the batch.
    reschedule: bool,
    /// The time of the event being handled.
    now_ms: u64,
}

fn api(kind: ErrorKind, message: impl Into<String>) -> ApiError {
    ApiError::new(kind, message)
}

impl Core {
    /// A core with the state loaded from the store.
    pub fn new(config: CoreConfig, mut loaded: crate::store::Loaded) -> Core {
        let owner_uids = crate::owner_uids::OwnerUids::new(
            config.owner_uid_range,
            std::mem::take(&mut loaded.owner_uids),
        );
        let mut core = Core {
            config,
            out: Outputs::default(),
            commands: BTreeMap::new(),
            apps: BTreeMap::new(),
            tasks: Tasks::new(loaded.next_session.max(1)),
            pool: Pool::new(loaded.next_executor.max(1), owner_uids),
            cluster: Cluster::default(),
            commits: Commits {
                next_token: 1,
                ..Commits::default()
            },
            jobs: JobFlags {
                apps_ended: false,
                may_start: true,
            },
            objects: ObjectBook::default(),
            rebuilds: Rebuilds::default(),
            recovering_until_ms: None,
            reschedule: true,
            now_ms: 0,
        };
        for spec in loaded.applications {
            core.apps.insert(AppName::from(spec.name.as_str()), spec);
        }
        for stored in loaded.sessions {
            core.tasks.next_session = core.tasks.next_session.max(stored.id.0 + 1);
            core.tasks
                .sessions
                .insert(stored.id, SessionEntry::new(stored, false));
        }
        core.load_tasks(loaded.tasks);
        for (sid, batch, first, count) in loaded.batches {
            if let Some(s) = core.tasks.sessions.get_mut(&sid) {
                s.batches.insert(batch, (first, count));
            }
        }
        core.settle_loaded_sessions();
        core.load_nodes(loaded.nodes);
        for s in core.tasks.sessions.values() {
            core.tasks
                .ledger
                .charge(owner_name(&s.stored.owner), held_of(s));
            if s.finished {
                // Finished before the store kept finished sessions apart: it goes now.
                core.tasks.evict_pending.insert(s.stored.id, 0);
                core.tasks.evict_due = true;
            }
        }
        core
    }

    /// Registers an application at start-up if none of that name exists (the built-in
    /// ping application). Durable like any other registration.
    pub fn ensure_application(&mut self, spec: ApplicationSpec) {
        match self.apps.get_mut(spec.name.as_str()) {
            None => {
                self.commits.ops.push(StoreOp::PutApplication(spec.clone()));
                self.apps.insert(AppName::from(spec.name.as_str()), spec);
            }
            // A built-in stored by an older head with `allow_root`: built-ins never run as
            // root.
            Some(stored) if stored.allow_root && !spec.allow_root => {
                stored.allow_root = false;
                self.commits
                    .ops
                    .push(StoreOp::PutApplication(stored.clone()));
            }
            Some(_) => {}
        }
    }

    /// Applies one event.
    pub fn handle(&mut self, event: Event, now_ms: u64) {
        self.now_ms = now_ms;
        self.objects.life_started(now_ms, self.tasks.next_session);
        match event {
            Event::Request { reply, request } => self.on_request(reply, request, now_ms),
            Event::CallersGone { replies } => {
                for s in self.tasks.sessions.values_mut() {
                    s.job_log_waiters.retain(|(_, r)| !replies.contains(r));
                }
            }
            Event::NodeConnected {
                conn,
                address,
                registration,
            } => self.on_node_connected(conn, address, registration, now_ms),
            Event::NodeMessage { conn, message } => self.on_node_message(conn, message, now_ms),
            Event::NodeDisconnected { conn, reason } => {
                if let Some(name) = self.cluster.conns.get(&conn).cloned() {
                    self.node_lost(&name, &reason);
                }
            }
            Event::Committed { tokens, result } => {
                for token in tokens {
                    for after in self.commits.in_flight.remove(&token).unwrap_or_default() {
                        self.after_commit(after, &result, now_ms);
                    }
                }
            }
            Event::Stalled { stalled_ms } => self.on_stalled(stalled_ms, now_ms),
            Event::Tick => {
                self.reschedule = true;
                self.tasks.evict_due |= !self.tasks.evict_pending.is_empty();
                let timeout = self.config.heartbeat_timeout_ms;
                let silent: Vec<NodeName> = self
                    .cluster
                    .nodes
                    .iter()
                    .filter(|(_, n)| {
                        n.conn.is_some() && now_ms.saturating_sub(n.last_seen_ms) > timeout
                    })
                    .map(|(name, _)| name.clone())
                    .collect();
                for name in silent {
                    self.node_lost(&name, &format!("no heartbeat for {timeout} ms"));
                }
                if let Some(grace) = self.config.preemption_grace_ms {
                    self.preempt_overdue(now_ms, grace);
                }
                self.expire_objects(now_ms);
                self.enforce_job_deadlines(now_ms);
                let held = self.commits.finish_retry.values().map(Vec::len).sum();
                self.commits.storage.tick(held, now_ms);
                if !self.commits.storage.is_faulted() {
                    self.write_held_results();
                }
            }
            Event::StorageFaulted { fault } => self.commits.storage.enter(fault, now_ms),
            Event::StorageRecovered => self.on_storage_recovered(now_ms),
            Event::DiskSpace(space) => self.commits.storage.measured(space),
        }
    }

    /// What the core produced since it was last asked, to be drained (the server routes
    /// it after every event, so that an answer does not wait for the rest of its batch).
    pub fn outputs(&mut self) -> &mut Outputs {
        &mut self.out
    }

    /// What the core produced since it was last asked (tests and the simulation).
    #[cfg(test)]
    pub fn take_outputs(&mut self) -> Outputs {
        std::mem::take(&mut self.out)
    }

    /// Runs the scheduler and dispatch, then flushes everything collected in the batch.
    pub fn end_batch(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
        self.check_recovered(now_ms);
        // A faulted store: nothing new starts (its results could not be kept), and results
        // that came in are held until the store takes writes again.
        if self.commits.storage.is_faulted() {
            for (session, results) in std::mem::take(&mut self.commits.finish) {
                self.commits
                    .finish_retry
                    .entry(session)
                    .or_default()
                    .extend(results);
            }
        }
        if self.recovering_until_ms.is_none() && !self.commits.storage.is_faulted() {
            if self.reschedule {
                self.reschedule = false;
                self.schedule(now_ms);
            }
            self.start_jobs(now_ms);
            self.dispatch(now_ms);
        }
        if std::mem::take(&mut self.tasks.evict_due) {
            self.evict_finished(now_ms);
        }
        for id in std::mem::take(&mut self.commits.dirty_sessions) {
            if let Some(s) = self.tasks.sessions.get(&id).filter(|s| !s.ephemeral) {
                self.commits.ops.push(StoreOp::PutSession(s.stored.clone()));
            }
        }
        for (session, results) in std::mem::take(&mut self.commits.finish) {
            self.commits.ops.push(StoreOp::FinishTasks {
                session,
                results: results.clone(),
            });
            self.commits
                .after
                .push(AfterCommit::FinishResults { session, results });
        }
        for (node, commands) in std::mem::take(&mut self.commands) {
            let Some(conn) = self.cluster.nodes.get(&node).and_then(|n| n.conn) else {
                continue;
            };
            let mut commands = commands;
            while !commands.is_empty() {
                let rest = commands.split_off(commands.len().min(limits::MESSAGE_BATCH_MAX));
                let frame = HeadToNode::Commands(std::mem::replace(&mut commands, rest));
                self.out.send(conn, frame);
            }
        }
        for (session, results) in std::mem::take(&mut self.tasks.watch_out) {
            if self.tasks.sessions.contains_key(&session) {
                self.out.watch.push((session, WatchMsg::Results(results)));
            }
        }
        // At most `HEAD_STORE_REQUESTS_MAX` requests in flight: past that, what this batch
        // wrote waits here and goes with a later batch's request once a commit is known, so
        // the store channel (that size) always has room and the core never waits on it.
        let room = self.commits.in_flight.len() < limits::HEAD_STORE_REQUESTS_MAX;
        debug_assert!(self.commits.in_flight.len() <= limits::HEAD_STORE_REQUESTS_MAX);
        if room && (!self.commits.ops.is_empty() || !self.commits.after.is_empty()) {
            let token = self.commits.next_token;
            self.commits.next_token += 1;
            let ops = std::mem::take(&mut self.commits.ops);
            let after = std::mem::take(&mut self.commits.after);
            self.out.store.push(StoreRequest { ops, token });
            self.commits.in_flight.insert(token, after);
        }
    }
}

#[cfg(test)]
mod tests;
