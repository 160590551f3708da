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
//! Invariants:
//! * a task id is acked to a client only after its batch is durable (or at once for an
//!   ephemeral session);
//! * a result is accepted only from the executor the task runs on and for its current
//!   attempt (fencing); anything else is dropped;
//! * a result becomes final, and reaches watchers, only after it is durable;
//! * every acked task ends in exactly one final state;
//! * every [`ReplyId`] the core is given is answered once (`LogTargets::WhenStarted`: once
//!   more, with [`Reply::JobLogTargets`]) or named in [`Outputs::unanswered`].

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
    job_of_application, ApiError, ApplicationInfo, ApplicationSpec, ErrorKind, ExecutorIdentity,
    ExecutorOwner, ExecutorUsage, JobFailure, JobInfo, JobState, NodeInfo, NodeState, OwnerQueue,
    QueueReport, RankInfo, RankLaunch, Resources, SessionInfo, SessionQueue, SessionSpec,
    SessionState, ShimKind, TaskAssignment, TaskCounts, TaskInfo, TaskOutcome, TaskResult,
    TaskState, JOB_APPLICATION_PREFIX,
};
use flame_protocol::{ExecutorId, SessionId, TaskId};
use std::collections::{BTreeMap, HashMap, VecDeque};

mod storage;

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
        inputs: Vec<Bytes>,
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
    fn reply(&mut self, reply: ReplyId, answer: impl Into<Reply>) {
        self.replies.push((reply, answer.into()));
    }

    /// A frame for a node connection.
    fn send(&mut self, conn: ConnId, frame: HeadToNode) {
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

/// When one rank of a job fails, the others get this long to end by themselves before they
/// are killed.
pub const JOB_FAIL_GRACE_MS: u64 = 2_000;

/// `MASTER_PORT` of a job is this plus its id modulo [`JOB_MASTER_PORT_SPAN`], so jobs
/// sharing a node rarely pick the same port.
pub const JOB_MASTER_PORT_BASE: u64 = 29_500;
/// See [`JOB_MASTER_PORT_BASE`].
pub const JOB_MASTER_PORT_SPAN: u64 = 10_000;

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
}

/// How long a finished ephemeral session stays in memory (and counts against its owner's
/// quotas) before it goes: it has no store, so a watcher that reconnects within the client
/// library's reconnect window still gets its results.
pub const EPHEMERAL_KEPT_MS: u64 = 60_000;

/// The variable that carries an MPI job's credential to its ranks (for `flame-mpi-agent`).
pub const JOB_TOKEN_ENV: &str = "FLAME_JOB_TOKEN";

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
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
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
    fn is_final(self) -> bool {
        matches!(self, Slot::Succeeded | Slot::Failed | Slot::Cancelled)
    }

    fn state(self) -> TaskState {
        match self {
            Slot::Unacked | Slot::Rejected | Slot::Pending => TaskState::Pending,
            Slot::Running(_) | Slot::Completing => TaskState::Running,
            Slot::Succeeded => TaskState::Succeeded,
            Slot::Failed => TaskState::Failed,
            Slot::Cancelled => TaskState::Cancelled,
        }
    }
}

fn final_slot(outcome: &TaskOutcome) -> Slot {
    match outcome {
        TaskOutcome::Succeeded(_) => Slot::Succeeded,
        TaskOutcome::Failed(_) => Slot::Failed,
        TaskOutcome::Cancelled => Slot::Cancelled,
    }
}

fn count_final(counts: &mut TaskCounts, outcome: &TaskOutcome) {
    match outcome {
        TaskOutcome::Succeeded(_) => counts.succeeded += 1,
        TaskOutcome::Failed(_) => counts.failed += 1,
        TaskOutcome::Cancelled => counts.cancelled += 1,
    }
}

#[derive(Debug)]
struct TaskSlot {
    slot: Slot,
    /// Attempt number, from 1; bumped whenever the task goes back to pending, so results
    /// of an earlier attempt are refused.
    attempt: u32,
    /// Attempts that ran and failed: its executor died while running it, or (with
    /// `retry_on_error`) the application reported an error. Bounded by `max_attempts`.
    runs_failed: u32,
    input: Bytes,
    /// Kept for ephemeral sessions, which have no store to read it back from, and for
    /// failures, whose messages `ListTasks` shows.
    outcome: Option<TaskOutcome>,
}

#[derive(Debug)]
struct SessionEntry {
    stored: StoredSession,
    ephemeral: bool,
    /// Index = task id - 1. Emptied once the session has finished.
    tasks: Vec<TaskSlot>,
    pending: VecDeque<TaskId>,
    counts: TaskCounts,
    /// Batches assigned ids but not yet durable; the session cannot finish meanwhile.
    unacked_batches: u32,
    /// Closes written but not yet durable; the session cannot finish meanwhile.
    unacked_closes: u32,
    /// Watchers attached while it was unfinished. The server holds them (one may have
    /// lagged out since); results are queued for watchers only while there are any.
    watchers: u32,
    finished: bool,
    /// Cancelled: batches acked from now on end as Cancelled at once.
    cancelled: bool,
    /// Client batch ids seen, with the tasks each created, so a batch sent again after a
    /// lost ack creates nothing new.
    batches: HashMap<u64, (TaskId, u32)>,
    /// Why its pending tasks get no executor, from the last scheduling pass.
    waiting: Option<String>,
    /// A job: when its remaining ranks are stopped (a rank failed, or its `mpirun` ended).
    job_stop_at_ms: Option<u64>,
    /// A job stopped at its time limit.
    job_timed_out: bool,
    /// `flame logs` requests for a job that has not started, answered when it does.
    job_log_waiters: Vec<(Option<ExecutorId>, ReplyId)>,
}

impl TaskSlot {
    /// The slot of an id handed out to a batch that was never stored.
    fn hole() -> TaskSlot {
        TaskSlot {
            slot: Slot::Rejected,
            attempt: 0,
            runs_failed: 0,
            input: Bytes::new(),
            outcome: None,
        }
    }
}

/// The slot of a task id; ids are dense from 1.
fn slot_of(tasks: &mut [TaskSlot], task: TaskId) -> Option<&mut TaskSlot> {
    let idx = usize::try_from(task.0.checked_sub(1)?).ok()?;
    tasks.get_mut(idx)
}

/// Bytes of an outcome's payload.
fn outcome_bytes(o: &TaskOutcome) -> u64 {
    match o {
        TaskOutcome::Succeeded(b) => b.len() as u64,
        TaskOutcome::Failed(m) => m.len() as u64,
        TaskOutcome::Cancelled => 0,
    }
}

/// What a task slot holds against its owner's quotas: whether it counts as a task (not
/// final, or kept by an ephemeral session, which has no store), and its bytes in memory.
fn slot_held(t: &TaskSlot, ephemeral: bool) -> (u64, u64) {
    let task = match t.slot {
        Slot::Rejected => false,
        slot if slot.is_final() => ephemeral,
        _ => true,
    };
    let bytes = t.input.len() as u64 + t.outcome.as_ref().map_or(0, outcome_bytes);
    (u64::from(task), bytes)
}

/// Moves `owner`'s holdings from what a slot held (`before`) to what it holds (`after`).
fn reheld(ledger: &mut Ledger, owner: &str, before: (u64, u64), after: (u64, u64)) {
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
fn held_of(s: &SessionEntry) -> Held {
    let mut held = Held {
        sessions: 1,
        tasks: 0,
        bytes: s.stored.common_data.len() as u64,
    };
    for t in &s.tasks {
        let (task, bytes) = slot_held(t, s.ephemeral);
        held.tasks += task;
        held.bytes += bytes;
    }
    held
}

impl SessionEntry {
    fn info(&self, executors: u32) -> SessionInfo {
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
        }
    }

    /// Adds what an executor used while bound to this session; one record per executor.
    fn record_usage(
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

#[derive(Debug)]
struct ExecutorEntry {
    node: String,
    application: String,
    /// The owner it was launched for: it serves only that owner's sessions.
    owner: String,
    phase: ExecutorPhase,
    session: Option<SessionId>,
    /// What it holds on its node.
    resources: Resources,
    /// GPU indices it holds on its node.
    gpus: Vec<u32>,
    /// Launched with a spec that has since been updated: released instead of reused.
    stale: bool,
    /// Most tasks the node accepts outstanding on this executor.
    credit: u32,
    /// Smoothed time one task takes on this executor, in microseconds, measured between
    /// consecutive results while it stayed busy. Sizes how deep its queue may be.
    task_us_avg: f64,
    last_result_ms: u64,
    /// Tasks sent and not yet answered.
    /// In dispatch order: the node runs them in this order, so the front one is the task
    /// running now and the rest wait on the node.
    outstanding: VecDeque<(SessionId, TaskId)>,
    quiet_since_ms: u64,
    /// When it was told to unbind, while it is Unbinding.
    unbinding_since_ms: u64,
}

#[derive(Debug)]
struct NodeEntry {
    registration: NodeRegistration,
    /// The address it connects from; empty while it is not connected.
    address: String,
    /// Drained by an operator (durable): nothing new is placed there.
    draining: bool,
    /// Its connection while it is connected; `conns` maps it back.
    conn: Option<ConnId>,
    last_seen_ms: u64,
    /// Who it runs executors as, from its registration; `None` until it registers with
    /// this head process.
    identity: Option<ExecutorIdentity>,
}

impl NodeEntry {
    /// The record the store keeps of it.
    fn stored(&self) -> crate::store::StoredNode {
        crate::store::StoredNode {
            name: self.registration.name.clone(),
            allocatable: self.registration.allocatable.clone(),
            labels: self.registration.labels.clone(),
            isolation: self.registration.isolation.clone(),
            last_seen_ms: self.last_seen_ms,
            draining: self.draining,
        }
    }
}

/// What to do once a store request is durable.
#[derive(Debug)]
enum AfterCommit {
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

/// The head's state.
#[derive(Debug)]
pub struct Core {
    config: CoreConfig,
    /// What the batch produced so far, until the server takes it.
    out: Outputs,
    apps: BTreeMap<String, ApplicationSpec>,
    sessions: BTreeMap<SessionId, SessionEntry>,
    nodes: BTreeMap<String, NodeEntry>,
    conns: HashMap<ConnId, String>,
    executors: BTreeMap<ExecutorId, ExecutorEntry>,
    next_session: u64,
    next_executor: u64,
    next_token: u64,
    commits: HashMap<u64, Vec<AfterCommit>>,
    // Collected during a batch, flushed by end_batch.
    batch_ops: Vec<StoreOp>,
    batch_after: Vec<AfterCommit>,
    batch_finish: BTreeMap<SessionId, Vec<(TaskId, u32, TaskOutcome)>>,
    node_out: BTreeMap<String, Vec<NodeCommand>>,
    watch_out: BTreeMap<SessionId, Vec<TaskResult>>,
    reschedule: bool,
    /// Per application: executors in a row that died before saying ready, and the time
    /// before which no new one is launched. Keeps a broken command from a hot loop.
    launch_backoff: HashMap<(String, String), (u32, u64)>,
    /// Per application: why its last executor failed to start, until one starts; shown to
    /// users as the reason their session waits.
    launch_errors: HashMap<(String, String), String>,
    /// After a restart, the time until which nothing is dispatched or launched, so that
    /// reconnecting nodes can report the tasks they still run; `None` once recovered.
    recovering_until_ms: Option<u64>,
    /// Executor ids below this are reserved durably; launches stop at the bound until the
    /// next block is durable, so a restarted head never reuses an id.
    executor_ids_reserved: u64,
    reservation_pending: bool,
    /// The time of the event being handled.
    now_ms: u64,
    /// A job ended: its application goes once its executors are gone.
    job_apps_ended: bool,
    /// Sessions whose record changed in this batch: each is written once, at its end, however
    /// many of its ranks or executors changed it.
    dirty_sessions: std::collections::BTreeSet<SessionId>,
    /// An executor of a queued job was bound in this batch: `start_jobs` looks.
    jobs_may_start: bool,
    /// Outcomes whose commit failed, held (never shown, never run again) and written
    /// again at the next tick, or once a storage fault has cleared.
    finish_retry: BTreeMap<SessionId, Vec<(TaskId, u32, TaskOutcome)>>,
    /// Whether the store takes writes, and the data directory's free space.
    storage: crate::storage_fault::StorageHealth,
    /// What each owner holds against its quotas.
    ledger: Ledger,
    /// Finished sessions to take out of memory, each not before the time given: durable
    /// ones once their final record is durable and no executor is bound to them (its usage
    /// must be in that record), ephemeral ones after [`EPHEMERAL_KEPT_MS`].
    evict_pending: BTreeMap<SessionId, u64>,
    /// Set when `evict_pending` may have a session due: checked at the end of the batch.
    evict_due: bool,
    /// Owners' uids, durable before any launch uses one.
    owner_uids: crate::owner_uids::OwnerUids,
}

/// Executor ids reserved per store write.
pub const EXECUTOR_ID_BLOCK: u64 = 1024;

/// How much queued work, in microseconds, the head keeps on an executor beyond the task it
/// runs. Short tasks get deep queues (throughput); long ones get one queued task, so that
/// an unbind or a new session waits for little work already handed out (fairness).
pub const QUEUE_TARGET_US: f64 = 20_000.0;
/// Assumed task time before anything is measured: start shallow, deepen as results show
/// the tasks are short.
pub const TASK_US_INITIAL: f64 = 10_000.0;
/// Weight of a new sample in the smoothed task time.
const TASK_US_ALPHA: f64 = 0.2;

/// Tasks to keep outstanding on an executor: the one running plus a queue sized by
/// [`QUEUE_TARGET_US`] (at least one queued task, for pipelining), within what the node
/// allows.
pub fn outstanding_max(task_us_avg: f64, credit: u32) -> u32 {
    let queued = (QUEUE_TARGET_US / task_us_avg.max(1.0)).ceil();
    let wanted = if queued.is_finite() {
        queued as u64 + 1
    } else {
        u64::MAX
    };
    wanted.max(2).min(u64::from(credit.max(1))) as u32
}

/// First pause after an executor dies before it is ready; doubles per failure in a row.
pub const LAUNCH_BACKOFF_MIN_MS: u64 = 200;
/// Longest pause between launches of a failing application.
pub const LAUNCH_BACKOFF_MAX_MS: u64 = 30_000;

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
            apps: BTreeMap::new(),
            sessions: BTreeMap::new(),
            nodes: BTreeMap::new(),
            conns: HashMap::new(),
            executors: BTreeMap::new(),
            next_session: loaded.next_session.max(1),
            next_executor: loaded.next_executor.max(1),
            next_token: 1,
            commits: HashMap::new(),
            batch_ops: Vec::new(),
            batch_after: Vec::new(),
            batch_finish: BTreeMap::new(),
            node_out: BTreeMap::new(),
            watch_out: BTreeMap::new(),
            reschedule: true,
            launch_backoff: HashMap::new(),
            launch_errors: HashMap::new(),
            recovering_until_ms: None,
            executor_ids_reserved: loaded.next_executor.max(1),
            reservation_pending: false,
            now_ms: 0,
            job_apps_ended: false,
            dirty_sessions: Default::default(),
            jobs_may_start: true,
            finish_retry: BTreeMap::new(),
            storage: Default::default(),
            ledger: Ledger::default(),
            evict_pending: BTreeMap::new(),
            evict_due: false,
            owner_uids,
        };
        for spec in loaded.applications {
            core.apps.insert(spec.name.clone(), spec);
        }
        for stored in loaded.sessions {
            core.next_session = core.next_session.max(stored.id.0 + 1);
            core.sessions.insert(
                stored.id,
                SessionEntry {
                    stored,
                    ephemeral: false,
                    tasks: Vec::new(),
                    pending: VecDeque::new(),
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
                },
            );
        }
        for (sid, tid, task) in loaded.tasks {
            let Some(s) = core.sessions.get_mut(&sid) else {
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
                        input: Bytes::new(),
                        outcome: matches!(outcome, TaskOutcome::Failed(_)).then_some(outcome),
                    }
                }
            };
            s.tasks.push(slot);
        }
        // Ids up to `last_task` were handed out; those with no stored task belong to
        // batches whose commit failed. Keep them as holes so slots stay indexed by id.
        for s in core.sessions.values_mut() {
            let last = usize::try_from(s.stored.last_task).unwrap_or(usize::MAX);
            while s.tasks.len() < last {
                s.tasks.push(TaskSlot::hole());
            }
        }
        for (sid, batch, first, count) in loaded.batches {
            if let Some(s) = core.sessions.get_mut(&sid) {
                s.batches.insert(batch, (first, count));
            }
        }
        for s in core.sessions.values_mut() {
            if let Some(job) = &s.stored.job {
                // Ranks are started by the job, never from the pending queue.
                s.pending.clear();
                if !job.state.is_final() {
                    let app = job.spec.application(s.stored.id);
                    core.apps.insert(app.name.clone(), app);
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
                    core.dirty_sessions.insert(s.stored.id);
                }
            }
        }
        for n in loaded.nodes {
            core.nodes.insert(
                n.name.clone(),
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
                    },
                    address: String::new(),
                    conn: None,
                    last_seen_ms: n.last_seen_ms,
                    identity: None,
                },
            );
        }
        for s in core.sessions.values() {
            core.ledger.charge(owner_name(&s.stored.owner), held_of(s));
            if s.finished {
                // Finished before the store kept finished sessions apart: it goes now.
                core.evict_pending.insert(s.stored.id, 0);
                core.evict_due = true;
            }
        }
        core
    }

    /// After a restart with known nodes: hold dispatch and launches for up to `grace_ms`
    /// while nodes reconnect and report what they still run.
    pub fn start_recovery(&mut self, now_ms: u64, grace_ms: u64) {
        if !self.nodes.is_empty() && grace_ms > 0 {
            self.recovering_until_ms = Some(now_ms + grace_ms);
            tracing::info!(
                grace_ms,
                nodes = self.nodes.len(),
                "recovering: waiting for nodes to report"
            );
        } else {
            self.fail_orphaned_jobs(now_ms);
        }
    }

    /// An executor of `application` is gone. If it was a rank of a job that has not
    /// started, the job fails: a gang is never topped up, and the ranks it still holds go
    /// back.
    fn job_rank_lost(&mut self, application: &str, why: &str, now_ms: u64) {
        let Some(id) = job_of_application(application) else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if s.finished || s.cancelled {
            return;
        }
        let Some(job) = s.stored.job.as_mut() else {
            return;
        };
        if job.state != JobState::Queued {
            return;
        }
        let message = format!("a rank was lost before the job started: {why}");
        tracing::warn!(job = %id, %why, "a rank of a job was lost before it started; the job fails");
        job.failure.get_or_insert(JobFailure {
            rank: None,
            exit_code: None,
            message: message.clone(),
        });
        self.end_unfinished(id, TaskOutcome::Failed(message), None, now_ms);
    }

    /// After a restart: a running job whose rank nobody reported lost it for good (a rank
    /// never runs twice), so the job fails and its other ranks are stopped.
    fn fail_orphaned_jobs(&mut self, now_ms: u64) {
        let mut orphaned = Vec::new();
        for (id, s) in self.sessions.iter_mut() {
            let Some(job) = s.stored.job.as_mut() else {
                continue;
            };
            if job.state != JobState::Running || s.finished {
                continue;
            }
            let lost = s.tasks.iter().position(|t| t.slot == Slot::Pending);
            let Some(rank) = lost else {
                // A rank had failed before the restart: the others stop now.
                if let Some(f) = &job.failure {
                    orphaned.push((*id, f.message.clone()));
                }
                continue;
            };
            let message = "its rank was lost while the head restarted".to_string();
            if job.failure.is_none() {
                job.failure = Some(JobFailure {
                    rank: Some(rank as u32),
                    exit_code: None,
                    message: message.clone(),
                });
            }
            orphaned.push((*id, message));
        }
        for (id, message) in orphaned {
            tracing::warn!(job = %id, "a rank of a running job was lost in a head restart");
            self.end_unfinished(id, TaskOutcome::Failed(message), None, now_ms);
        }
    }

    /// After the head was not running for `stalled_ms`: only silence that happened while
    /// the head ran counts against a node, so every connected node's heartbeat window
    /// starts again now, and a recovery in progress is extended by the stall.
    fn on_stalled(&mut self, stalled_ms: u64, now_ms: u64) {
        let mut refreshed = 0usize;
        for n in self.nodes.values_mut().filter(|n| n.conn.is_some()) {
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
    fn check_recovered(&mut self, now_ms: u64) {
        let Some(until) = self.recovering_until_ms else {
            return;
        };
        let all_back = self.nodes.values().all(|n| n.conn.is_some());
        if !all_back && now_ms < until {
            return;
        }
        self.recovering_until_ms = None;
        let mut bumped = 0u64;
        for s in self.sessions.values_mut() {
            for t in s.tasks.iter_mut().filter(|t| t.slot == Slot::Pending) {
                t.attempt += 1;
                bumped += 1;
            }
        }
        self.reschedule = true;
        tracing::info!(all_back, pending = bumped, "recovered; dispatching again");
        self.fail_orphaned_jobs(now_ms);
    }

    /// Registers an application at start-up if none of that name exists (the built-in
    /// ping application). Durable like any other registration.
    pub fn ensure_application(&mut self, spec: ApplicationSpec) {
        match self.apps.get_mut(&spec.name) {
            None => {
                self.batch_ops.push(StoreOp::PutApplication(spec.clone()));
                self.apps.insert(spec.name.clone(), spec);
            }
            // A built-in stored by an older head with `allow_root`: built-ins never run as
            // root.
            Some(stored) if stored.allow_root && !spec.allow_root => {
                stored.allow_root = false;
                self.batch_ops.push(StoreOp::PutApplication(stored.clone()));
            }
            Some(_) => {}
        }
    }

    /// Applies one event.
    pub fn handle(&mut self, event: Event, now_ms: u64) {
        self.now_ms = now_ms;
        match event {
            Event::Request { reply, request } => self.on_request(reply, request, now_ms),
            Event::CallersGone { replies } => {
                for s in self.sessions.values_mut() {
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
                if let Some(name) = self.conns.get(&conn).cloned() {
                    self.node_lost(&name, &reason);
                }
            }
            Event::Committed { tokens, result } => {
                for token in tokens {
                    for after in self.commits.remove(&token).unwrap_or_default() {
                        self.after_commit(after, &result, now_ms);
                    }
                }
            }
            Event::Stalled { stalled_ms } => self.on_stalled(stalled_ms, now_ms),
            Event::Tick => {
                self.reschedule = true;
                self.evict_due |= !self.evict_pending.is_empty();
                let timeout = self.config.heartbeat_timeout_ms;
                let silent: Vec<String> = self
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
                self.enforce_job_deadlines(now_ms);
                let held = self.finish_retry.values().map(Vec::len).sum();
                self.storage.tick(held, now_ms);
                if !self.storage.is_faulted() {
                    self.write_held_results();
                }
            }
            Event::StorageFaulted { fault } => self.storage.enter(fault, now_ms),
            Event::StorageRecovered => self.on_storage_recovered(now_ms),
            Event::DiskSpace(space) => self.storage.measured(space),
        }
    }

    /// Answers a request, now or (for changes) once they are durable.
    fn on_request(&mut self, reply: ReplyId, request: Request, now_ms: u64) {
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
                if let Some(s) = self.sessions.get_mut(&session) {
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
        if self.storage.is_faulted() {
            for (session, results) in std::mem::take(&mut self.batch_finish) {
                self.finish_retry
                    .entry(session)
                    .or_default()
                    .extend(results);
            }
        }
        if self.recovering_until_ms.is_none() && !self.storage.is_faulted() {
            if self.reschedule {
                self.reschedule = false;
                self.schedule(now_ms);
            }
            self.start_jobs(now_ms);
            self.dispatch(now_ms);
        }
        if std::mem::take(&mut self.evict_due) {
            self.evict_finished(now_ms);
        }
        for id in std::mem::take(&mut self.dirty_sessions) {
            if let Some(s) = self.sessions.get(&id).filter(|s| !s.ephemeral) {
                self.batch_ops.push(StoreOp::PutSession(s.stored.clone()));
            }
        }
        for (session, results) in std::mem::take(&mut self.batch_finish) {
            self.batch_ops.push(StoreOp::FinishTasks {
                session,
                results: results.clone(),
            });
            self.batch_after
                .push(AfterCommit::FinishResults { session, results });
        }
        for (node, commands) in std::mem::take(&mut self.node_out) {
            let Some(conn) = self.nodes.get(&node).and_then(|n| n.conn) else {
                continue;
            };
            let mut commands = commands;
            while !commands.is_empty() {
                let rest = commands.split_off(commands.len().min(limits::MESSAGE_BATCH_MAX));
                let frame = HeadToNode::Commands(std::mem::replace(&mut commands, rest));
                self.out.send(conn, frame);
            }
        }
        for (session, results) in std::mem::take(&mut self.watch_out) {
            if self.sessions.contains_key(&session) {
                self.out.watch.push((session, WatchMsg::Results(results)));
            }
        }
        // At most `HEAD_STORE_REQUESTS_MAX` requests in flight: past that, what this batch
        // wrote waits here and goes with a later batch's request once a commit is known, so
        // the store channel (that size) always has room and the core never waits on it.
        let room = self.commits.len() < limits::HEAD_STORE_REQUESTS_MAX;
        if room && (!self.batch_ops.is_empty() || !self.batch_after.is_empty()) {
            let token = self.next_token;
            self.next_token += 1;
            let ops = std::mem::take(&mut self.batch_ops);
            let after = std::mem::take(&mut self.batch_after);
            self.out.store.push(StoreRequest { ops, token });
            self.commits.insert(token, after);
        }
    }

    /// Starts or ends a node's drain, durably.
    fn set_draining(&mut self, name: &str, draining: bool, reply: ReplyId) {
        let Some(n) = self.nodes.get_mut(name) else {
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
        self.batch_ops.push(StoreOp::PutNode(n.stored()));
        self.batch_after.push(AfterCommit::Respond { reply });
        self.reschedule = true;
    }

    /// `flame queue`: each owner's weight, deserved and allocated share, and its sessions'
    /// targets, holdings and waiting reasons, from the plan the scheduler would make now.
    fn queue_report(&self, now_ms: u64) -> QueueReport {
        let snapshot = self.snapshot(now_ms);
        let plan = scheduler::plan(&snapshot);
        let totals = scheduler::Totals::schedulable(&snapshot.nodes);
        // Executors held per session, found in one pass.
        let mut held_by: HashMap<SessionId, Vec<&ExecutorEntry>> = HashMap::new();
        for e in self.executors.values() {
            if let (Some(sid), ExecutorPhase::Binding | ExecutorPhase::Bound) = (e.session, e.phase)
            {
                held_by.entry(sid).or_default().push(e);
            }
        }
        let mut owners: BTreeMap<String, OwnerQueue> = BTreeMap::new();
        let mut held_share: BTreeMap<String, f64> = BTreeMap::new();
        for s in self.sessions.values().filter(|s| !s.finished) {
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
            head: self.storage.report(),
        }
    }

    /// What the executors alive on `node` hold.
    fn allocated_on(&self, node: &str) -> Resources {
        let mut total = Resources {
            cpu_millis: 0,
            memory_bytes: None,
            gpus: 0,
        };
        for e in self.executors.values().filter(|e| e.node == node) {
            total.cpu_millis = total.cpu_millis.saturating_add(e.resources.cpu_millis);
            if let Some(m) = e.resources.memory_bytes {
                total.memory_bytes = Some(total.memory_bytes.unwrap_or(0).saturating_add(m));
            }
            total.gpus = total.gpus.saturating_add(e.resources.gpus);
        }
        total
    }

    fn executors_of(&self, session: SessionId) -> u32 {
        self.executors
            .values()
            .filter(|e| {
                e.session == Some(session)
                    && matches!(e.phase, ExecutorPhase::Binding | ExecutorPhase::Bound)
            })
            .count() as u32
    }

    fn on_client(&mut self, request: ClientRequest, reply: ReplyId, now_ms: u64) {
        let error = |kind, msg: String| ClientResponse::Error(api(kind, msg));
        match request {
            ClientRequest::RegisterApplication(spec) => {
                if let Err(e) = spec.validate() {
                    return self
                        .out
                        .reply(reply, error(ErrorKind::InvalidArgument, e.to_string()));
                }
                if self.apps.contains_key(&spec.name) {
                    return self.out.reply(
                        reply,
                        error(
                            ErrorKind::AlreadyExists,
                            format!("application `{}` is already registered", spec.name),
                        ),
                    );
                }
                self.batch_ops.push(StoreOp::PutApplication(spec.clone()));
                self.batch_after.push(AfterCommit::AddApplication {
                    spec: Box::new(spec),
                    replace: false,
                    reply,
                });
            }
            ClientRequest::UpdateApplication(spec) => {
                if let Err(e) = spec.validate() {
                    return self
                        .out
                        .reply(reply, error(ErrorKind::InvalidArgument, e.to_string()));
                }
                if !self.apps.contains_key(&spec.name) {
                    return self
                        .out
                        .reply(reply, error(ErrorKind::NotFound, unknown_app(&spec.name)));
                }
                self.batch_ops.push(StoreOp::PutApplication(spec.clone()));
                self.batch_after.push(AfterCommit::AddApplication {
                    spec: Box::new(spec),
                    replace: true,
                    reply,
                });
            }
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
            ClientRequest::RemoveApplication { name } => {
                let Some(info) = self.application_info(&name) else {
                    return self
                        .out
                        .reply(reply, error(ErrorKind::NotFound, unknown_app(&name)));
                };
                if info.open_sessions > 0 {
                    return self.out.reply(
                        reply,
                        error(
                            ErrorKind::FailedPrecondition,
                            format!(
                                "application `{name}` has {} unfinished session(s); close them and let them finish first",
                                info.open_sessions
                            ),
                        ),
                    );
                }
                self.apps.remove(&name);
                self.reschedule = true;
                self.batch_ops.push(StoreOp::RemoveApplication(name));
                self.batch_after.push(AfterCommit::Respond { reply });
            }
            ClientRequest::CreateSession(spec) => self.create_session(spec, reply, now_ms),
            ClientRequest::ListSessions => {
                let list = self
                    .sessions
                    .values()
                    .map(|s| s.info(self.executors_of(s.stored.id)))
                    .collect();
                self.out.reply(reply, ClientResponse::Sessions(list));
            }
            ClientRequest::GetSession { id } => match self.sessions.get(&id) {
                Some(s) => self.out.reply(
                    reply,
                    ClientResponse::Session(s.info(self.executors_of(id))),
                ),
                None => self
                    .out
                    .reply(reply, error(ErrorKind::NotFound, unknown_session(id))),
            },
            ClientRequest::CloseSession { id } => {
                if self.left_memory(id) {
                    // Finished: closed durably before it left.
                    return self.out.reply(reply, ClientResponse::Ok);
                }
                let Some(s) = self.sessions.get_mut(&id) else {
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
                    self.batch_ops.push(StoreOp::PutSession(s.stored.clone()));
                    self.batch_after.push(AfterCommit::CloseSession {
                        session: id,
                        was_open,
                        reply,
                    });
                }
                self.reschedule = true;
                self.check_finished(id);
            }
            ClientRequest::CancelSession { id } => {
                if self.left_memory(id) {
                    return self.out.reply(reply, ClientResponse::Ok);
                }
                if !self.sessions.contains_key(&id) {
                    return self
                        .out
                        .reply(reply, error(ErrorKind::NotFound, unknown_session(id)));
                }
                self.cancel_session(id, reply, now_ms);
            }
            ClientRequest::ListNodes => {
                let list = self
                    .nodes
                    .iter()
                    .map(|(name, n)| NodeInfo {
                        name: name.clone(),
                        state: match (n.conn.is_some(), n.draining) {
                            (false, _) => NodeState::NotReady,
                            (true, true) => NodeState::Draining,
                            (true, false) => NodeState::Ready,
                        },
                        allocatable: n.registration.allocatable.clone(),
                        allocated: self.allocated_on(name),
                        labels: n.registration.labels.clone(),
                        isolation: n.registration.isolation.clone(),
                        identity: n.identity.clone(),
                        executors: self.executors.values().filter(|e| &e.node == name).count()
                            as u32,
                        last_seen_ms: n.last_seen_ms,
                    })
                    .collect();
                self.out.reply(reply, ClientResponse::Nodes(list));
            }
            ClientRequest::DrainNode { name } => self.set_draining(&name, true, reply),
            ClientRequest::UndrainNode { name } => self.set_draining(&name, false, reply),
            ClientRequest::Queue => {
                let report = self.queue_report(now_ms);
                self.out.reply(reply, ClientResponse::Queue(report));
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

    /// Closes a session and ends its unfinished tasks as Cancelled, durably. Executors with
    /// its tasks in hand are killed, so the tasks stop; its idle executors unbind as usual.
    fn cancel_session(&mut self, id: SessionId, reply: ReplyId, now_ms: u64) {
        let Some(s) = self.sessions.get_mut(&id) else {
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
    fn end_unfinished(
        &mut self,
        id: SessionId,
        outcome: TaskOutcome,
        reply: Option<ReplyId>,
        now_ms: u64,
    ) {
        let Some(s) = self.sessions.get_mut(&id) else {
            self.out.unanswered.extend(reply);
            return;
        };
        if s.stored.state == SessionState::Open {
            s.stored.state = SessionState::Closed;
            s.stored.closed_ms = Some(now_ms);
        }
        s.job_stop_at_ms = None;
        s.pending.clear();
        let mut cancelled = Vec::new();
        for (i, t) in s.tasks.iter_mut().enumerate() {
            if matches!(t.slot, Slot::Pending | Slot::Running(_)) {
                if t.slot == Slot::Pending {
                    // Counted as in flight until the cancellation is durable.
                    s.counts.pending = s.counts.pending.saturating_sub(1);
                    s.counts.running += 1;
                }
                cancelled.push((TaskId(i as u64 + 1), t.attempt));
                t.slot = Slot::Completing;
            }
        }
        let mut killed = Vec::new();
        // A job's ranks all go, busy or not: none may outlive it.
        let is_job = s.stored.job.is_some();
        for (eid, e) in self.executors.iter_mut() {
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
            self.node_out
                .entry(node)
                .or_default()
                .push(NodeCommand::Kill { executor });
        }
        tracing::info!(session = %id, tasks = cancelled.len(), ?outcome, "session's unfinished tasks ended");
        if s.ephemeral {
            for (task, attempt) in cancelled {
                Self::finalize(
                    s,
                    task,
                    attempt,
                    outcome.clone(),
                    &mut self.watch_out,
                    &mut self.ledger,
                );
            }
            if let Some(reply) = reply {
                self.out.reply(reply, ClientResponse::Ok);
            }
        } else {
            self.batch_finish.entry(id).or_default().extend(
                cancelled
                    .into_iter()
                    .map(|(task, attempt)| (task, attempt, outcome.clone())),
            );
            self.batch_ops.push(StoreOp::PutSession(s.stored.clone()));
            if let Some(reply) = reply {
                self.batch_after.push(AfterCommit::Respond { reply });
            }
        }
        self.reschedule = true;
        self.check_finished(id);
    }

    fn application_info(&self, name: &str) -> Option<ApplicationInfo> {
        let spec = self.apps.get(name)?;
        Some(ApplicationInfo {
            spec: spec.redacted(),
            executors: self
                .executors
                .values()
                .filter(|e| e.application == name)
                .count() as u32,
            open_sessions: self
                .sessions
                .values()
                .filter(|s| s.stored.application == name && !s.finished)
                .count() as u32,
        })
    }

    fn create_session(&mut self, spec: SessionSpec, reply: ReplyId, now_ms: u64) {
        if let Some(job) = &spec.job {
            if let Err(e) = job.validate() {
                self.out.reply(
                    reply,
                    ClientResponse::Error(api(
                        ErrorKind::InvalidArgument,
                        format!("job spec: {e}"),
                    )),
                );
                return;
            }
            if spec.ephemeral {
                self.out.reply(
                    reply,
                    ClientResponse::Error(api(
                        ErrorKind::InvalidArgument,
                        "a batch job cannot be ephemeral: its ranks' outcomes are kept durably",
                    )),
                );
                return;
            }
        } else if self
            .apps
            .get(&spec.application)
            .is_some_and(|a| a.shim == ShimKind::Batch)
        {
            self.out.reply(
                reply,
                ClientResponse::Error(api(
                    ErrorKind::InvalidArgument,
                    format!(
                        "`{}` runs the ranks of a batch job; it takes no other session",
                        spec.application
                    ),
                )),
            );
            return;
        } else if !self.apps.contains_key(&spec.application) {
            self.out.reply(
                reply,
                ClientResponse::Error(api(ErrorKind::NotFound, unknown_app(&spec.application))),
            );
            return;
        }
        if let Err(e) = validate_owner(&spec.owner) {
            self.out.reply(
                reply,
                ClientResponse::Error(api(ErrorKind::InvalidArgument, e.to_string())),
            );
            return;
        }
        if let Some(app) = self
            .apps
            .get(&spec.application)
            .filter(|_| spec.job.is_none())
        {
            let owner = spec.owner_or_default();
            let groups = &self.config.groups;
            let in_group = |g: &str| groups.get(g).is_some_and(|m| m.iter().any(|u| u == owner));
            if !app.allows(owner, in_group) {
                self.out.reply(
                    reply,
                    ClientResponse::Error(api(
                        ErrorKind::PermissionDenied,
                        format!(
                            "user `{owner}` may not use application `{}`: it is restricted to {}",
                            app.name,
                            describe_access(app)
                        ),
                    )),
                );
                return;
            }
        }
        if spec.common_data.len() > self.config.task_input_bytes_max {
            self.out.reply(
                reply,
                ClientResponse::Error(api(
                    ErrorKind::LimitExceeded,
                    format!(
                        "common data of {} bytes exceeds the limit of {} bytes",
                        spec.common_data.len(),
                        self.config.task_input_bytes_max
                    ),
                )),
            );
            return;
        }
        let id = SessionId(self.next_session);
        self.next_session += 1;
        let owner = spec.owner_or_default().to_string();
        let (application, job) = match spec.job {
            Some(job) => (job.application(id).name, Some(JobInfo::queued(job))),
            None => (spec.application, None),
        };
        let mut entry = SessionEntry {
            stored: StoredSession {
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
            ephemeral: spec.ephemeral,
            tasks: Vec::new(),
            pending: VecDeque::new(),
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
        };
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
                    input: Bytes::new(),
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
            .ledger
            .check(self.config.quotas.of(&owner), &owner, held)
        {
            self.next_session -= 1;
            self.out.reply(reply, ClientResponse::Error(e.into()));
            return;
        }
        self.ledger.charge(&owner, held);
        self.batch_ops.push(StoreOp::PutCounters {
            next_session: Some(self.next_session),
            next_executor: None,
        });
        if !entry.ephemeral {
            self.batch_ops
                .push(StoreOp::PutSession(entry.stored.clone()));
        }
        if ranks > 0 {
            self.batch_ops.push(StoreOp::AddTasks {
                session: id,
                batch_id: 0,
                first: TaskId(1),
                inputs: vec![Bytes::new(); ranks as usize],
            });
        }
        self.batch_after.push(AfterCommit::AddSession {
            entry: Box::new(entry),
            reply,
        });
    }

    fn on_submit(&mut self, session: SessionId, batch_id: u64, inputs: Vec<Bytes>, reply: ReplyId) {
        let reject = |kind, message: String| SubmitReply::Rejected {
            batch_id,
            error: api(kind, message),
        };
        let limit = self.config.task_input_bytes_max;
        let Some(s) = self.sessions.get_mut(&session) else {
            self.out.reply(
                reply,
                if session.0 < self.next_session {
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
                self.batch_after.push(AfterCommit::AckDuplicate {
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
        if let Some(error) = self.storage.refusal() {
            self.out
                .reply(reply, SubmitReply::Rejected { batch_id, error });
            return;
        }
        if s.stored.state != SessionState::Open {
            self.out.reply(
                reply,
                reject(
                    ErrorKind::FailedPrecondition,
                    format!("session {session} is closed and accepts no more tasks"),
                ),
            );
            return;
        }
        if inputs.len() > limits::SUBMIT_BATCH_TASKS_MAX {
            self.out.reply(
                reply,
                reject(
                    ErrorKind::LimitExceeded,
                    format!(
                        "a batch of {} tasks exceeds the limit of {} tasks",
                        inputs.len(),
                        limits::SUBMIT_BATCH_TASKS_MAX
                    ),
                ),
            );
            return;
        }
        if let Some((i, big)) = inputs.iter().enumerate().find(|(_, b)| b.len() > limit) {
            self.out.reply(
                reply,
                reject(
                    ErrorKind::LimitExceeded,
                    format!(
                    "task input #{i} of batch {batch_id} is {} bytes; the limit is {limit} bytes",
                    big.len()
                ),
                ),
            );
            return;
        }
        if inputs.is_empty() {
            self.out.reply(
                reply,
                SubmitReply::Accepted {
                    batch_id,
                    first_task: TaskId(s.stored.last_task + 1),
                    count: 0,
                },
            );
            return;
        }
        let adding = Held {
            sessions: 0,
            tasks: inputs.len() as u64,
            bytes: inputs.iter().map(|b| b.len() as u64).sum(),
        };
        let owner = owner_name(&s.stored.owner);
        if let Err(e) = self
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
        self.ledger.charge(owner, adding);
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
        self.batch_ops.push(StoreOp::AddTasks {
            session,
            batch_id,
            first,
            inputs,
        });
        self.batch_after.push(AfterCommit::AckSubmit {
            session,
            first,
            count,
            batch_id,
            reply,
        });
    }

    fn list_tasks(
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
    fn log_targets(
        &self,
        session: SessionId,
        executor: Option<ExecutorId>,
    ) -> Result<NodeExecutors, ApiError> {
        let s = self
            .sessions
            .get(&session)
            .ok_or_else(|| api(ErrorKind::NotFound, unknown_session(session)))?;
        let mut served: BTreeMap<ExecutorId, &str> = s
            .stored
            .usage
            .iter()
            .map(|u| (u.executor, u.node.as_str()))
            .collect();
        for (id, e) in &self.executors {
            if e.session == Some(session) {
                served.insert(*id, e.node.as_str());
            }
        }
        served_targets(session, served, executor)
    }

    fn on_watch(&mut self, session: SessionId) -> Result<WatchStart, ApiError> {
        if self.left_memory(session) {
            return Ok(WatchStart {
                backfill: Backfill::Store,
                finished: true,
            });
        }
        let s = self
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

    fn on_node_connected(
        &mut self,
        conn: ConnId,
        address: String,
        registration: NodeRegistration,
        now_ms: u64,
    ) {
        let name = registration.name.clone();
        if self.nodes.get(&name).is_some_and(|n| n.conn.is_some()) {
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
            self.node_out.entry(name.clone()).or_default().extend(kill);
        }
        self.out.send(
            conn,
            HeadToNode::Registered {
                heartbeat_interval_ms: limits::HEARTBEAT_INTERVAL.as_millis() as u64,
            },
        );
        // A drain outlives reconnections and head restarts.
        let draining = self.nodes.get(&name).is_some_and(|n| n.draining);
        let entry = NodeEntry {
            draining,
            address,
            registration,
            conn: Some(conn),
            last_seen_ms: now_ms,
            identity,
        };
        self.batch_ops.push(StoreOp::PutNode(entry.stored()));
        self.conns.insert(conn, name.clone());
        self.nodes.insert(name.clone(), entry);
        tracing::info!(node = %name, conn, "node registered");
        self.reschedule = true;
    }

    /// Takes over an executor a reconnecting node still runs, with the tasks it holds that
    /// are still pending here at the same attempt (after a head restart, every unfinished
    /// task is pending). Its other tasks were re-queued meanwhile; their results will be
    /// refused.
    fn adopt(&mut self, node: &str, report: ExecutorReport) -> Result<(), &'static str> {
        if self.executors.contains_key(&report.executor) {
            return Err("its id is in use");
        }
        if !self.apps.contains_key(&report.application) {
            return Err("its application is no longer registered");
        }
        if let Some(sid) = report.session {
            let usable = self.sessions.get(&sid).is_some_and(|s| {
                !s.finished && !s.cancelled && s.stored.application == report.application
            });
            if !usable {
                return Err("its session is gone, finished or cancelled");
            }
            let same_owner = self
                .sessions
                .get(&sid)
                .is_some_and(|s| owner_name(&s.stored.owner) == report.owner);
            if !same_owner {
                return Err("it was launched for another owner than its session's");
            }
        }
        if self.owner_uids.durable(&report.owner).is_none() {
            return Err("its owner has no uid in this head's state");
        }
        let mut outstanding = VecDeque::new();
        for (sid, tid, attempt) in report.tasks {
            let Some(s) = self.sessions.get_mut(&sid) else {
                continue;
            };
            let Some(slot) = slot_of(&mut s.tasks, tid) else {
                continue;
            };
            if slot.slot == Slot::Pending && slot.attempt == attempt {
                // Left in the pending queue; dispatch skips tasks that are not pending.
                slot.slot = Slot::Running(report.executor);
                s.counts.pending = s.counts.pending.saturating_sub(1);
                s.counts.running += 1;
                outstanding.push_back((sid, tid));
            }
        }
        let job_started = report
            .session
            .and_then(|sid| self.sessions.get(&sid))
            .and_then(|s| s.stored.job.as_ref())
            .is_some_and(|j| j.state != JobState::Queued);
        if job_started && outstanding.is_empty() {
            // Its rank ended, or was given up meanwhile: it must not outlive its job.
            return Err("its rank of the job is over");
        }
        tracing::info!(node, executor = %report.executor, tasks = outstanding.len(), "adopted an executor");
        self.next_executor = self.next_executor.max(report.executor.0 + 1);
        self.executors.insert(
            report.executor,
            ExecutorEntry {
                node: node.to_string(),
                application: report.application,
                owner: report.owner,
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

    fn on_node_message(&mut self, conn: ConnId, message: NodeToHead, now_ms: u64) {
        let Some(name) = self.conns.get(&conn).cloned() else {
            return; // a replaced or lost connection: fenced off
        };
        if let Some(n) = self.nodes.get_mut(&name) {
            n.last_seen_ms = now_ms;
        }
        match message {
            NodeToHead::Register(_) => {
                tracing::warn!(node = %name, "duplicate registration ignored");
            }
            NodeToHead::Heartbeat => {
                if let Some(conn) = self.nodes.get(&name).and_then(|n| n.conn) {
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
        }
    }

    fn on_executor_event(&mut self, node: &str, event: ExecutorEvent, now_ms: u64) {
        let id = match &event {
            ExecutorEvent::Ready { executor, .. }
            | ExecutorEvent::Bound { executor, .. }
            | ExecutorEvent::Unbound { executor, .. }
            | ExecutorEvent::Exited { executor, .. } => *executor,
        };
        let Some(e) = self.executors.get_mut(&id) else {
            return;
        };
        if e.node != node {
            tracing::warn!(executor = %id, node, "event about another node's executor ignored");
            return;
        }
        match event {
            ExecutorEvent::Ready { credit, .. } if e.phase == ExecutorPhase::Launching => {
                let pool = (e.application.clone(), e.owner.clone());
                self.launch_backoff.remove(&pool);
                self.launch_errors.remove(&pool);
                e.phase = ExecutorPhase::Idle;
                e.credit = credit.clamp(1, 1024);
                e.quiet_since_ms = now_ms;
            }
            ExecutorEvent::Bound { session, .. }
                if e.phase == ExecutorPhase::Binding && e.session == Some(session) =>
            {
                e.phase = ExecutorPhase::Bound;
                if e.application.starts_with(JOB_APPLICATION_PREFIX) {
                    self.jobs_may_start = true;
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
                if let Some(e) = self.executors.remove(&id) {
                    if e.phase == ExecutorPhase::Launching {
                        let pause = self.back_off(&e.application, &e.owner, now_ms);
                        tracing::warn!(executor = %id, node, app = %e.application, owner = %e.owner,
                            %reason, retry_in_ms = pause, "executor failed to start");
                        self.launch_errors.insert(
                            (e.application.clone(), e.owner.clone()),
                            format!("on node {node}: {reason}"),
                        );
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
    fn record_usage(
        &mut self,
        session: Option<SessionId>,
        executor: ExecutorId,
        node: &str,
        usage: Usage,
        ended: Option<&str>,
    ) {
        let Some(s) = session.and_then(|id| self.sessions.get_mut(&id)) else {
            return;
        };
        s.record_usage(executor, node, usage, ended);
        if !s.ephemeral {
            self.dirty_sessions.insert(s.stored.id);
        }
    }

    fn on_result(&mut self, node: &str, r: NodeTaskResult, now_ms: u64) {
        let Some(e) = self.executors.get_mut(&r.executor) else {
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
        let Some(s) = self.sessions.get_mut(&r.session) else {
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
        let app = self.apps.get(&s.stored.application);
        let max_attempts = app.map_or(self.config.max_attempts, |a| a.max_attempts);
        if let TaskOutcome::Failed(message) = &r.outcome {
            if app.is_some_and(|a| a.retry_on_error) && slot.runs_failed + 1 < max_attempts {
                slot.runs_failed += 1;
                tracing::debug!(task = %r.task, attempt = slot.attempt, %message, "retrying a task the application failed");
                slot.slot = Slot::Pending;
                slot.attempt += 1;
                s.counts.running = s.counts.running.saturating_sub(1);
                s.counts.pending += 1;
                s.pending.push_front(r.task);
                self.reschedule = true;
                return;
            }
        } else if !self.launch_backoff.is_empty() {
            // The application works again for this owner: forget its crashes.
            self.launch_backoff
                .remove(&(e.application.clone(), e.owner.clone()));
        }
        if s.ephemeral {
            Self::finalize(
                s,
                r.task,
                r.attempt,
                r.outcome,
                &mut self.watch_out,
                &mut self.ledger,
            );
            if s.counts.unfinished() == 0 {
                self.reschedule = true;
            }
            self.check_finished(r.session);
        } else {
            slot.slot = Slot::Completing;
            self.batch_finish
                .entry(r.session)
                .or_default()
                .push((r.task, r.attempt, r.outcome));
            crate::failpoints::crash_point!("after-result-before-commit");
        }
        if let (Some(failure), Some(s)) = (rank_end, self.sessions.get_mut(&r.session)) {
            Self::note_rank_end(
                s,
                r.task,
                r.exit_code,
                failure.as_deref(),
                now_ms,
                &mut self.dirty_sessions,
            );
        }
    }

    /// Records one more failure in a row of `application`'s executors of `owner` and
    /// returns the pause, in ms, before the next launch for that owner.
    fn back_off(&mut self, application: &str, owner: &str, now_ms: u64) -> u64 {
        let (failures, not_before) = self
            .launch_backoff
            .entry((application.to_string(), owner.to_string()))
            .or_default();
        *failures += 1;
        let pause = LAUNCH_BACKOFF_MIN_MS
            .saturating_mul(1 << (*failures - 1).min(16))
            .min(LAUNCH_BACKOFF_MAX_MS);
        *not_before = now_ms + pause;
        pause
    }

    /// Moves a task from running to its final state and queues it for the watchers.
    /// Makes a task final: counters, the slot (its input dropped; its outcome kept for an
    /// ephemeral session, or when it failed), the owner's quota holdings, and the
    /// session's watchers.
    fn finalize(
        s: &mut SessionEntry,
        task: TaskId,
        attempt: u32,
        outcome: TaskOutcome,
        watch_out: &mut BTreeMap<SessionId, Vec<TaskResult>>,
        ledger: &mut Ledger,
    ) {
        let Some(slot) = slot_of(&mut s.tasks, task) else {
            return;
        };
        if slot.slot.is_final() {
            return;
        }
        let before = slot_held(slot, s.ephemeral);
        if slot.slot == Slot::Pending {
            s.counts.pending = s.counts.pending.saturating_sub(1);
        } else {
            s.counts.running = s.counts.running.saturating_sub(1);
        }
        slot.slot = final_slot(&outcome);
        slot.input = Bytes::new();
        count_final(&mut s.counts, &outcome);
        if s.ephemeral || matches!(outcome, TaskOutcome::Failed(_)) {
            slot.outcome = Some(outcome.clone());
        }
        let after = slot_held(slot, s.ephemeral);
        reheld(ledger, owner_name(&s.stored.owner), before, after);
        if s.watchers > 0 {
            watch_out.entry(s.stored.id).or_default().push(TaskResult {
                task,
                attempt,
                outcome,
            });
        }
    }

    fn after_commit(&mut self, after: AfterCommit, result: &Result<(), CommitError>, now_ms: u64) {
        match after {
            AfterCommit::AckSubmit {
                session,
                first,
                count,
                batch_id,
                reply,
            } => {
                let Some(s) = self.sessions.get_mut(&session) else {
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
                            slot.input = Bytes::new();
                            let after = slot_held(slot, s.ephemeral);
                            reheld(&mut self.ledger, owner_name(&s.stored.owner), before, after);
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
                    let list = self.batch_finish.entry(session).or_default();
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
            AfterCommit::FinishResults { session, results } => {
                let Some(s) = self.sessions.get_mut(&session) else {
                    return;
                };
                match result {
                    Ok(()) => {
                        for (task, attempt, outcome) in results {
                            Self::finalize(
                                s,
                                task,
                                attempt,
                                outcome,
                                &mut self.watch_out,
                                &mut self.ledger,
                            );
                        }
                        if s.counts.unfinished() == 0 {
                            self.reschedule = true;
                        }
                        self.check_finished(session);
                    }
                    Err(e) => {
                        // Computed, accepted, not durable: never shown and never run again.
                        // Held and written again at the next tick, or once a storage fault
                        // has cleared (the fault itself is logged, once).
                        if !self.storage.is_faulted() {
                            tracing::error!(%session, error = %e, "results could not be persisted; holding them to write again");
                        }
                        self.finish_retry
                            .entry(session)
                            .or_default()
                            .extend(results);
                    }
                }
            }
            AfterCommit::AddApplication {
                spec,
                replace,
                reply,
            } => {
                let r = match result {
                    Ok(()) => {
                        let name = spec.name.clone();
                        self.apps.insert(name.clone(), *spec);
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
            AfterCommit::AddSession { entry, reply } => {
                let r = match result {
                    Ok(()) => {
                        if let Some(job) = &entry.stored.job {
                            let app = job.spec.application(entry.stored.id);
                            self.apps.insert(app.name.clone(), app);
                            self.reschedule = true;
                        }
                        let info = entry.info(0);
                        self.sessions.insert(entry.stored.id, *entry);
                        ClientResponse::Session(info)
                    }
                    Err(e) => {
                        self.ledger
                            .release(owner_name(&entry.stored.owner), held_of(&entry));
                        persist_error(e)
                    }
                };
                self.out.reply(reply, r);
            }
            AfterCommit::AckDuplicate {
                session,
                batch_id,
                first,
                count,
                reply,
            } => {
                let durable = self
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
            AfterCommit::Evict { session } => match result {
                Ok(()) => {
                    if self.sessions.get(&session).is_some_and(|s| s.finished) {
                        self.evict(session);
                    }
                }
                // Kept, and tried again at the next tick.
                Err(_) => {
                    self.evict_pending.insert(session, now_ms);
                }
            },
            AfterCommit::OwnerUid { owner } => {
                self.owner_uids.committed(&owner, result.is_ok());
                self.reschedule = true;
            }
            AfterCommit::ReserveExecutorIds { upto } => {
                self.reservation_pending = false;
                if result.is_ok() {
                    self.executor_ids_reserved = self.executor_ids_reserved.max(upto);
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
        let _ = now_ms;
    }

    /// Takes the finished sessions that are due out of memory: an ephemeral one at once, a
    /// durable one once its final record (and its view, in the store's `finished` table) is
    /// durable. A session still bound to an executor waits: that executor's usage goes in
    /// its record when it unbinds.
    fn evict_finished(&mut self, now_ms: u64) {
        if self.evict_pending.is_empty() {
            return;
        }
        let bound: std::collections::HashSet<SessionId> =
            self.executors.values().filter_map(|e| e.session).collect();
        let due: Vec<SessionId> = self
            .evict_pending
            .iter()
            .filter(|(id, at)| **at <= now_ms && !bound.contains(id))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.evict_pending.remove(&id);
            let Some(s) = self.sessions.get(&id).filter(|s| s.finished) else {
                continue;
            };
            if s.ephemeral {
                self.evict(id);
                continue;
            }
            self.dirty_sessions.remove(&id);
            self.batch_ops.push(StoreOp::PutSession(s.stored.clone()));
            self.batch_ops
                .push(StoreOp::PutFinished(Box::new(s.info(0))));
            self.batch_after.push(AfterCommit::Evict { session: id });
        }
    }

    /// A finished session leaves memory; what it held goes back to its owner's quotas.
    fn evict(&mut self, id: SessionId) {
        if let Some(s) = self.sessions.remove(&id) {
            self.ledger
                .release(owner_name(&s.stored.owner), held_of(&s));
            tracing::debug!(session = %id, "a finished session left the head's memory");
        }
    }

    /// A session id that was handed out but is not in memory: a finished session that
    /// left it (the server checks the store before asking about one).
    fn left_memory(&self, id: SessionId) -> bool {
        !self.sessions.contains_key(&id) && id.0 < self.next_session
    }

    /// Whether a session is in the head's memory (tests: eviction).
    #[cfg(test)]
    pub(crate) fn holds_session(&self, id: SessionId) -> bool {
        self.sessions.contains_key(&id)
    }

    /// Finished sessions still in memory (tests: eviction).
    #[cfg(test)]
    pub(crate) fn finished_in_memory(&self) -> Vec<SessionId> {
        self.sessions
            .values()
            .filter(|s| s.finished)
            .map(|s| s.stored.id)
            .collect()
    }

    /// What `owner` holds against its quotas.
    #[cfg(test)]
    pub(crate) fn held(&self, owner: &str) -> Held {
        self.ledger.held(owner)
    }

    /// The quota ledger against what the sessions in memory (and those being created)
    /// hold, recomputed: a description of the difference, if any (tests: the simulation
    /// checks it after every step).
    #[cfg(test)]
    pub(crate) fn ledger_mismatch(&self) -> Option<String> {
        let mut expect = Ledger::default();
        for s in self.sessions.values() {
            expect.charge(owner_name(&s.stored.owner), held_of(s));
        }
        for after in self.commits.values().flatten().chain(&self.batch_after) {
            if let AfterCommit::AddSession { entry, .. } = after {
                expect.charge(owner_name(&entry.stored.owner), held_of(entry));
            }
        }
        (expect != self.ledger).then(|| {
            format!(
                "the quota ledger says {:?}, the sessions hold {:?}",
                self.ledger.all(),
                expect.all()
            )
        })
    }

    /// A closed session whose tasks are all final is finished: watchers are told, and its
    /// per-task memory is dropped.
    fn check_finished(&mut self, session: SessionId) {
        let Some(s) = self.sessions.get_mut(&session) else {
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
            self.dirty_sessions.insert(session);
            self.job_apps_ended = true;
        }
        // `flame logs` of a job that ended before it started: whatever there is (nothing).
        let log_waiters = std::mem::take(&mut s.job_log_waiters);
        // Results finalized in this batch must reach watchers before Finished.
        if let Some(results) = self.watch_out.remove(&session) {
            self.out.watch.push((session, WatchMsg::Results(results)));
        }
        if std::mem::take(&mut s.watchers) > 0 {
            // A watcher that cannot take it lags, and learns the end from the store.
            self.out.watch.push((session, WatchMsg::Finished));
        }
        if !s.ephemeral {
            // Only final tasks are left; what they hold (failure messages) goes with them.
            let bytes: u64 = s.tasks.iter().map(|t| slot_held(t, false).1).sum();
            self.ledger.release(
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
        let keep_ms = if s.ephemeral { EPHEMERAL_KEPT_MS } else { 0 };
        self.evict_pending
            .insert(session, self.now_ms.saturating_add(keep_ms));
        self.evict_due = true;
        self.reschedule = true;
        for (executor, reply) in log_waiters {
            let targets = self.log_targets(session, executor);
            self.out.reply(reply, Reply::JobLogTargets(targets));
        }
    }

    fn node_lost(&mut self, name: &str, reason: &str) {
        let Some(n) = self.nodes.get_mut(name) else {
            return;
        };
        if let Some(conn) = n.conn.take() {
            self.conns.remove(&conn);
            self.out.links.push((conn, LinkOutput::Close));
        }
        tracing::warn!(node = %name, %reason, "node lost");
        let lost: Vec<ExecutorId> = self
            .executors
            .iter()
            .filter(|(_, e)| e.node == name)
            .map(|(id, _)| *id)
            .collect();
        for id in lost {
            if let Some(e) = self.executors.remove(&id) {
                let why = format!("node {name} lost: {reason}");
                // Kept in the session's record, so `flame logs` still finds the executor.
                self.record_usage(e.session, id, name, Usage::default(), Some(&why));
                self.requeue(e.outstanding, &why);
            }
        }
        self.node_out.remove(name);
        self.reschedule = true;
    }

    /// Executors told to unbind that still run a task `grace` ms later are killed; their
    /// tasks go back to pending without being charged an attempt (the scheduler took the
    /// executor, the task did nothing wrong).
    fn preempt_overdue(&mut self, now_ms: u64, grace: u64) {
        let overdue: Vec<ExecutorId> = self
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
            let Some(e) = self.executors.get_mut(&id) else {
                continue;
            };
            e.phase = ExecutorPhase::Releasing;
            let tasks = std::mem::take(&mut e.outstanding);
            let node = e.node.clone();
            tracing::info!(executor = %id, tasks = tasks.len(), grace_ms = grace, "preemption grace ran out; killing the executor");
            self.node_out
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

    /// Tasks whose executor is gone go back to pending with the next attempt. Only the
    /// task it was running (the front) is charged for the loss: the ones queued behind it
    /// never started. A task charged `max_attempts` times fails with `reason`.
    fn requeue(&mut self, tasks: VecDeque<(SessionId, TaskId)>, reason: &str) {
        self.requeue_as(tasks, reason, true);
    }

    /// [`Core::requeue`], charging the running task only when `charge` is set.
    fn requeue_as(&mut self, tasks: VecDeque<(SessionId, TaskId)>, reason: &str, charge: bool) {
        for (i, (sid, tid)) in tasks.into_iter().enumerate().rev() {
            let charged = charge && i == 0;
            let Some(s) = self.sessions.get_mut(&sid) else {
                continue;
            };
            let max = self
                .apps
                .get(&s.stored.application)
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
                if is_job {
                    Self::note_rank_end(
                        s,
                        tid,
                        None,
                        Some(reason),
                        self.now_ms,
                        &mut self.dirty_sessions,
                    );
                }
                let Some(slot) = slot_of(&mut s.tasks, tid) else {
                    continue;
                };
                if s.ephemeral {
                    Self::finalize(
                        s,
                        tid,
                        attempt,
                        outcome,
                        &mut self.watch_out,
                        &mut self.ledger,
                    );
                    self.check_finished(sid);
                } else {
                    slot.slot = Slot::Completing;
                    self.batch_finish
                        .entry(sid)
                        .or_default()
                        .push((tid, attempt, outcome));
                }
            } else {
                slot.slot = Slot::Pending;
                slot.attempt += 1;
                s.counts.running = s.counts.running.saturating_sub(1);
                s.counts.pending += 1;
                s.pending.push_front(tid);
            }
        }
        self.reschedule = true;
    }

    /// Records how a job's rank ended: its exit code, the job's first failure, and when the
    /// other ranks are stopped (a short grace after a failure; at once when an `--mpi`
    /// job's `mpirun`, rank 0, ends, since the other ranks only hold its daemons' room).
    fn note_rank_end(
        s: &mut SessionEntry,
        task: TaskId,
        exit_code: Option<i32>,
        failure: Option<&str>,
        now_ms: u64,
        dirty: &mut std::collections::BTreeSet<SessionId>,
    ) {
        let Some(job) = s.stored.job.as_mut() else {
            return;
        };
        let Some(rank) = task.0.checked_sub(1).and_then(|r| u32::try_from(r).ok()) else {
            return;
        };
        if let Some(r) = job.ranks.get_mut(rank as usize) {
            r.exit_code = exit_code;
        }
        if let Some(message) = failure {
            if job.failure.is_none() && !s.cancelled && !s.job_timed_out {
                job.failure = Some(JobFailure {
                    rank: Some(rank),
                    exit_code,
                    message: message.to_string(),
                });
            }
            s.job_stop_at_ms.get_or_insert(now_ms + JOB_FAIL_GRACE_MS);
        }
        if job.spec.mpi && rank == 0 {
            s.job_stop_at_ms = Some(now_ms);
        }
        dirty.insert(s.stored.id);
    }

    /// Stops jobs whose ranks must go: after a failed rank's grace, at the end of an
    /// `--mpi` job's `mpirun`, or at the time limit. Forgets the applications of ended
    /// jobs once their executors are gone.
    fn enforce_job_deadlines(&mut self, now_ms: u64) {
        let mut stops = Vec::new();
        for (id, s) in self.sessions.iter_mut() {
            let Some(job) = &s.stored.job else { continue };
            if s.finished || s.cancelled {
                continue;
            }
            if let Some(at) = s.job_stop_at_ms {
                if now_ms >= at {
                    let outcome = match &job.failure {
                        Some(f) => TaskOutcome::Failed(match f.rank {
                            Some(rank) => format!("stopped because rank {rank} failed"),
                            None => format!("stopped: {}", f.message),
                        }),
                        // `mpirun` ended well: the ranks that held its daemons are done.
                        None => TaskOutcome::Succeeded(Bytes::new()),
                    };
                    stops.push((*id, outcome));
                }
                continue;
            }
            let (Some(limit), Some(started)) = (job.spec.time_limit_ms, job.started_ms) else {
                continue;
            };
            if job.state == JobState::Running && now_ms >= started.saturating_add(limit) {
                s.job_timed_out = true;
                stops.push((
                    *id,
                    TaskOutcome::Failed(format!(
                        "stopped at the job's time limit of {}",
                        humantime::format_duration(std::time::Duration::from_millis(limit))
                    )),
                ));
            }
        }
        for (id, outcome) in stops {
            tracing::info!(job = %id, ?outcome, "stopping a job's ranks");
            self.end_unfinished(id, outcome, None, now_ms);
        }
        if std::mem::take(&mut self.job_apps_ended) {
            let alive: std::collections::HashSet<&str> = self
                .executors
                .values()
                .map(|e| e.application.as_str())
                .collect();
            let sessions = &self.sessions;
            let before = self.apps.len();
            let mut kept_any = false;
            self.apps.retain(|name, a| {
                if a.shim != ShimKind::Batch || alive.contains(name.as_str()) {
                    kept_any |= a.shim == ShimKind::Batch;
                    return true;
                }
                let id = job_of_application(name);
                let keep = id
                    .and_then(|id| sessions.get(&id))
                    .is_some_and(|s| !s.finished);
                kept_any |= keep;
                keep
            });
            if self.apps.len() != before || kept_any {
                // Check again at the next tick while some are still in use.
                self.job_apps_ended = kept_any;
            }
        }
    }

    /// Starts each queued job whose ranks are all placed and bound: numbers them (by node,
    /// then executor id, so a node's ranks are consecutive), and hands every rank its task
    /// with its environment and the job's hostfile, all in this batch's frames.
    fn start_jobs(&mut self, now_ms: u64) {
        if !std::mem::take(&mut self.jobs_may_start) {
            return;
        }
        let queued: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                !s.finished
                    && !s.cancelled
                    && s.stored
                        .job
                        .as_ref()
                        .is_some_and(|j| j.state == JobState::Queued)
            })
            .map(|(id, _)| *id)
            .collect();
        for sid in queued {
            let Some(s) = self.sessions.get_mut(&sid) else {
                continue;
            };
            let Some(job) = s.stored.job.as_mut() else {
                continue;
            };
            let ranks = job.spec.ranks as usize;
            let mut bound: Vec<(String, ExecutorId)> = self
                .executors
                .iter()
                .filter(|(_, e)| e.session == Some(sid) && e.phase == ExecutorPhase::Bound)
                .map(|(id, e)| (e.node.clone(), *id))
                .collect();
            if bound.len() < ranks {
                continue;
            }
            bound.sort_unstable();
            bound.truncate(ranks);
            let mut per_node: Vec<(&str, u32)> = Vec::new();
            for (node, _) in &bound {
                match per_node.last_mut() {
                    Some((n, k)) if *n == node.as_str() => *k += 1,
                    _ => per_node.push((node.as_str(), 1)),
                }
            }
            let nodelist = per_node
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(",");
            let hostfile: String = per_node
                .iter()
                .map(|(n, k)| format!("{n} slots={k}\n"))
                .collect();
            let first_node = bound[0].0.as_str();
            // Rank 0's node as the head sees it; a loopback address is no use to ranks on
            // other machines, which get the node's name to resolve instead.
            let address_of = |name: &str| {
                self.nodes
                    .get(name)
                    .map(|n| n.address.clone())
                    .filter(|a| !a.is_empty())
            };
            let is_loopback = |a: &str| {
                a.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
            };
            let master_addr = match address_of(first_node) {
                Some(a)
                    if !is_loopback(&a)
                        || per_node
                            .iter()
                            .all(|(n, _)| address_of(n).is_some_and(|b| is_loopback(&b))) =>
                {
                    a
                }
                _ => first_node.to_string(),
            };
            let master_port = JOB_MASTER_PORT_BASE + sid.0 % JOB_MASTER_PORT_SPAN;
            let mut infos = Vec::with_capacity(ranks);
            let mut node_index = 0;
            let mut local = 0u32;
            for (rank, (node, executor)) in bound.iter().enumerate() {
                if rank > 0 && bound[rank - 1].0 != *node {
                    node_index += 1;
                    local = 0;
                }
                let local_world = per_node[node_index].1;
                let mut env = Vec::with_capacity(12);
                for (keys, value) in [
                    (&["FLAME_JOB_ID"][..], sid.0.to_string()),
                    (&["FLAME_RANK", "RANK"], rank.to_string()),
                    (&["FLAME_WORLD_SIZE", "WORLD_SIZE"], ranks.to_string()),
                    (&["FLAME_LOCAL_RANK", "LOCAL_RANK"], local.to_string()),
                    (
                        &["FLAME_LOCAL_WORLD_SIZE", "LOCAL_WORLD_SIZE"],
                        local_world.to_string(),
                    ),
                    (&["FLAME_NODELIST"], nodelist.clone()),
                    (&["MASTER_ADDR"], master_addr.clone()),
                    (&["MASTER_PORT"], master_port.to_string()),
                ] {
                    for key in keys {
                        env.push(((*key).to_string(), value.clone()));
                    }
                }
                // `flame-mpi-agent` needs it to ask for Open MPI's daemons on other nodes.
                if let (true, Some(jobs)) = (job.spec.mpi, &self.config.job_credentials) {
                    env.push((
                        JOB_TOKEN_ENV.to_string(),
                        jobs.for_job(sid).expose().to_string(),
                    ));
                }
                let argv = (job.spec.mpi && rank == 0).then(|| {
                    let mut argv: Vec<String> = vec![
                        "mpirun".into(),
                        "-np".into(),
                        ranks.to_string(),
                        "--mca".into(),
                        "plm_rsh_no_tree_spawn".into(),
                        "1".into(),
                        job.spec.command.clone(),
                    ];
                    argv.extend(job.spec.args.iter().cloned());
                    argv
                });
                let input = RankLaunch {
                    env,
                    hostfile: hostfile.clone(),
                    argv,
                    hold: job.spec.mpi && rank != 0,
                }
                .encode();
                let task = TaskId(rank as u64 + 1);
                infos.push(RankInfo {
                    rank: rank as u32,
                    node: node.clone(),
                    executor: *executor,
                    local_rank: local,
                    exit_code: None,
                });
                local += 1;
                let Some(slot) = slot_of(&mut s.tasks, task) else {
                    continue;
                };
                if slot.slot != Slot::Pending {
                    // Already running: adopted after a head restart before the start was
                    // stored. The numbering is the same: the same executors, sorted alike.
                    continue;
                }
                slot.slot = Slot::Running(*executor);
                let before = slot_held(slot, false);
                slot.input = input.clone();
                let after = slot_held(slot, false);
                reheld(&mut self.ledger, owner_name(&s.stored.owner), before, after);
                s.counts.pending = s.counts.pending.saturating_sub(1);
                s.counts.running += 1;
                if let Some(e) = self.executors.get_mut(executor) {
                    e.outstanding.push_back((sid, task));
                }
                self.node_out
                    .entry(node.clone())
                    .or_default()
                    .push(NodeCommand::Run(TaskAssignment {
                        executor: *executor,
                        session: sid,
                        task,
                        attempt: slot.attempt,
                        input,
                    }));
            }
            job.ranks = infos;
            job.state = JobState::Running;
            job.started_ms = Some(now_ms);
            tracing::info!(job = %sid, ranks, nodes = %nodelist, "job started");
            self.dirty_sessions.insert(sid);
            for (executor, reply) in std::mem::take(&mut s.job_log_waiters) {
                let targets = self.log_targets(sid, executor);
                self.out.reply(reply, Reply::JobLogTargets(targets));
            }
        }
    }

    /// The rank of running job `job` on `node` whose allocation an exec request starts in:
    /// one that holds its room for Open MPI's daemon (lowest executor id), else any.
    fn exec_target(&self, job: SessionId, node: &str) -> Result<ExecutorId, ApiError> {
        let s = self
            .sessions
            .get(&job)
            .ok_or_else(|| api(ErrorKind::NotFound, unknown_session(job)))?;
        let info = s.stored.job.as_ref().ok_or_else(|| {
            api(
                ErrorKind::InvalidArgument,
                format!("session {job} is not a batch job"),
            )
        })?;
        if info.state != JobState::Running || s.finished || s.job_stop_at_ms.is_some() {
            return Err(api(
                ErrorKind::FailedPrecondition,
                format!("job {job} is not running (it is {})", info.state),
            ));
        }
        let on_node: Vec<&RankInfo> = info
            .ranks
            .iter()
            .filter(|r| r.node == node && self.executors.contains_key(&r.executor))
            .collect();
        let pick = on_node
            .iter()
            .filter(|r| !(info.spec.mpi && r.rank == 0))
            .map(|r| r.executor)
            .min()
            .or_else(|| on_node.iter().map(|r| r.executor).min());
        pick.ok_or_else(|| {
            let nodes: std::collections::BTreeSet<&str> =
                info.ranks.iter().map(|r| r.node.as_str()).collect();
            api(
                ErrorKind::NotFound,
                format!(
                    "job {job} has no live rank on node `{node}`; its nodes: {}",
                    nodes.into_iter().collect::<Vec<_>>().join(",")
                ),
            )
        })
    }

    fn schedule(&mut self, now_ms: u64) {
        let snapshot = self.snapshot(now_ms);
        let plan = scheduler::plan(&snapshot);
        for s in self.sessions.values_mut() {
            s.waiting = plan.waiting.get(&s.stored.id).cloned();
        }
        for decision in plan.decisions {
            self.apply(decision, now_ms);
        }
    }

    /// What the scheduler decides from.
    fn snapshot(&self, now_ms: u64) -> Snapshot {
        // Sessions holding an executor, found in one pass rather than once per session.
        let held: std::collections::HashSet<SessionId> = self
            .executors
            .values()
            .filter(|e| matches!(e.phase, ExecutorPhase::Binding | ExecutorPhase::Bound))
            .filter_map(|e| e.session)
            .collect();
        // Per application, the owners whose launches of it back off now, and why.
        let mut backing_off: BTreeMap<&str, BTreeMap<String, Option<String>>> = BTreeMap::new();
        for (pool, &(_, not_before)) in &self.launch_backoff {
            if now_ms < not_before {
                backing_off
                    .entry(pool.0.as_str())
                    .or_default()
                    .insert(pool.1.clone(), self.launch_errors.get(pool).cloned());
            }
        }
        Snapshot {
            now_ms,
            nodes: self
                .nodes
                .iter()
                .map(|(name, n)| scheduler::NodeView {
                    name: name.clone(),
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
                .executors
                .iter()
                .map(|(id, e)| scheduler::ExecutorView {
                    id: *id,
                    node: e.node.clone(),
                    application: e.application.clone(),
                    owner: e.owner.clone(),
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

    fn apply(&mut self, decision: Decision, now_ms: u64) {
        match decision {
            Decision::Launch {
                node,
                application,
                owner,
            } => {
                let Some(spec) = self.apps.get(&application).cloned() else {
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
                if self.next_executor + EXECUTOR_ID_BLOCK / 2 >= self.executor_ids_reserved {
                    self.reserve_executor_ids();
                }
                if self.next_executor >= self.executor_ids_reserved {
                    // Launched once the next block of ids is durable (reschedules then).
                    return;
                }
                // GPU indices of the node that no executor holds, lowest first.
                let Some(gpus) = self.free_gpus(&node, spec.resources.gpus) else {
                    tracing::warn!(node = %node, app = %spec.name, "no free gpu indices for a planned launch; skipped");
                    return;
                };
                let id = ExecutorId(self.next_executor);
                self.next_executor += 1;
                self.executors.insert(
                    id,
                    ExecutorEntry {
                        node: node.clone(),
                        application,
                        owner: owner.clone(),
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
                self.node_out
                    .entry(node)
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
                    .sessions
                    .get(&session)
                    .map(|s| (s.stored.common_data.clone(), owner_name(&s.stored.owner)))
                else {
                    return;
                };
                let Some(e) = self.executors.get_mut(&executor) else {
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
                e.phase = ExecutorPhase::Binding;
                e.session = Some(session);
                self.node_out
                    .entry(e.node.clone())
                    .or_default()
                    .push(NodeCommand::Bind {
                        executor,
                        session,
                        common_data,
                    });
            }
            Decision::Unbind { executor } => {
                let Some(e) = self.executors.get_mut(&executor) else {
                    return;
                };
                e.phase = ExecutorPhase::Unbinding;
                e.unbinding_since_ms = now_ms;
                self.node_out
                    .entry(e.node.clone())
                    .or_default()
                    .push(NodeCommand::Unbind { executor });
            }
            Decision::Release { executor } => {
                let Some(e) = self.executors.get_mut(&executor) else {
                    return;
                };
                e.phase = ExecutorPhase::Releasing;
                self.node_out
                    .entry(e.node.clone())
                    .or_default()
                    .push(NodeCommand::Release { executor });
            }
        }
    }

    /// `owner`'s durable uid; `None` while a new one is being written (its commit
    /// reschedules), or when the range has none left (its sessions are told why).
    fn owner_uid(&mut self, owner: &str) -> Option<u32> {
        use crate::owner_uids::UidLookup;
        match self.owner_uids.uid(owner) {
            Ok(UidLookup::Ready(uid)) => Some(uid),
            Ok(UidLookup::Pending) => None,
            Ok(UidLookup::Reserved(uid)) => {
                tracing::info!(owner, uid, "assigning a uid to a new owner");
                self.batch_ops.push(StoreOp::PutOwnerUid {
                    owner: owner.to_string(),
                    uid,
                });
                self.batch_after.push(AfterCommit::OwnerUid {
                    owner: owner.to_string(),
                });
                None
            }
            Err(e) => {
                tracing::error!("{e}");
                let why = e.to_string();
                for s in self.sessions.values_mut() {
                    if owner_name(&s.stored.owner) == owner {
                        s.waiting = Some(why.clone());
                    }
                }
                None
            }
        }
    }

    /// After an application's spec changed: its Idle executors are released now, the others
    /// when they leave their session, so new work runs on the new spec.
    fn retire_executors_of(&mut self, application: &str, now_ms: u64) {
        let mut idle = Vec::new();
        for (id, e) in self.executors.iter_mut() {
            if e.application == application {
                e.stale = true;
                if e.phase == ExecutorPhase::Idle {
                    idle.push(*id);
                }
            }
        }
        for executor in idle {
            self.apply(Decision::Release { executor }, now_ms);
        }
        self.reschedule = true;
    }

    /// `count` GPU indices of `node` that no executor holds, or `None` if it has fewer.
    fn free_gpus(&self, node: &str, count: u32) -> Option<Vec<u32>> {
        if count == 0 {
            return Some(Vec::new());
        }
        let n = self.nodes.get(node)?;
        let held: std::collections::HashSet<u32> = self
            .executors
            .values()
            .filter(|e| e.node == node)
            .flat_map(|e| e.gpus.iter().copied())
            .collect();
        let free: Vec<u32> = n
            .registration
            .allocatable
            .gpus
            .iter()
            .map(|g| g.index)
            .filter(|i| !held.contains(i))
            .take(count as usize)
            .collect();
        (free.len() == count as usize).then_some(free)
    }

    /// Asks the store to reserve the next block of executor ids.
    fn reserve_executor_ids(&mut self) {
        if self.reservation_pending {
            return;
        }
        self.reservation_pending = true;
        let upto = self.executor_ids_reserved.max(self.next_executor) + EXECUTOR_ID_BLOCK;
        self.batch_ops.push(StoreOp::PutCounters {
            next_session: None,
            next_executor: Some(upto),
        });
        self.batch_after
            .push(AfterCommit::ReserveExecutorIds { upto });
    }

    /// Hands pending tasks to bound executors up to their outstanding limit.
    fn dispatch(&mut self, now_ms: u64) {
        for (id, e) in self.executors.iter_mut() {
            if !matches!(e.phase, ExecutorPhase::Binding | ExecutorPhase::Bound) {
                continue;
            }
            let Some(sid) = e.session else { continue };
            let Some(s) = self.sessions.get_mut(&sid) else {
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
                s.counts.pending = s.counts.pending.saturating_sub(1);
                s.counts.running += 1;
                e.outstanding.push_back((sid, tid));
                let assignment = TaskAssignment {
                    executor: *id,
                    session: sid,
                    task: tid,
                    attempt: slot.attempt,
                    input: slot.input.clone(),
                };
                self.node_out
                    .entry(e.node.clone())
                    .or_default()
                    .push(NodeCommand::Run(assignment));
            }
        }
    }
}

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

fn validate_owner(owner: &str) -> Result<(), flame_protocol::model::SpecError> {
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
fn describe_access(app: &ApplicationSpec) -> String {
    let mut parts = Vec::new();
    if !app.users.is_empty() {
        parts.push(format!("users {}", app.users.join(", ")));
    }
    if !app.groups.is_empty() {
        parts.push(format!("groups {}", app.groups.join(", ")));
    }
    parts.join(" and ")
}

fn unknown_app(name: &str) -> String {
    format!("application `{name}` is not registered (see `flame app list`)")
}

pub fn unknown_session(id: SessionId) -> String {
    format!("session {id} does not exist (see `flame session list`)")
}

fn persist_error(e: &CommitError) -> ClientResponse {
    ClientResponse::Error(api(
        ErrorKind::Unavailable,
        format!("the change could not be made durable: {e}"),
    ))
}

#[cfg(test)]
mod tests;
