//! Every message between clients, the head and nodes.
//!
//! ## Connection shape
//! A peer connects over QUIC (ALPN `flame/1`) and opens a bidirectional stream whose first
//! frame is a [`Hello`]; the head answers with a [`HelloReply`].
//!
//! * **Clients** then finish that stream. Every request opens a new bidirectional stream
//!   carrying one [`ClientRequest`] frame; the head answers with one [`ClientResponse`]
//!   frame and finishes the stream, except for the two streaming requests:
//!   * [`ClientRequest::OpenSubmitStream`]: after a [`ClientResponse::Ok`], the client
//!     sends [`SubmitBatch`] frames and the head answers each with a [`SubmitReply`], in
//!     order. Many batches may be in flight; a reply means the batch is durable (or, for an
//!     ephemeral session, queued).
//!   * [`ClientRequest::WatchResults`]: after a [`ClientResponse::Ok`], the head sends
//!     [`WatchEvent`] frames: every result of the session exactly once on that stream,
//!     including results finished before the watch began, then [`WatchEvent::Finished`]
//!     once the session is closed and has no unfinished task, or [`WatchEvent::Lagged`]
//!     when the reader fell too far behind (the client watches again).
//! * **Nodes** keep the hello stream as their control stream: the node sends
//!   [`NodeToHead`] frames, the head sends [`HeadToNode`] frames, for the life of the
//!   connection.

use crate::auth::{CertRecord, CertTarget, Principal, Secret, TokenInfo, TokenKind};
use crate::ids::{ExecutorId, SessionId, TaskId};
use crate::model::{
    ApiError, ApplicationInfo, ApplicationSpec, ExecutorIdentity, ExecutorOwner, NodeInfo,
    NodeResources, QueueReport, Resources, SessionInfo, SessionSpec, TaskAssignment, TaskInfo,
    TaskOutcome, TaskResult, TaskState,
};
use crate::object::{
    CacheUsage, GrantKey, ObjectCommand, ObjectEvent, ObjectId, ObjectInfo, ObjectLocations,
    ObjectRef, ObjectSources, ObjectTarget, Payload,
};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A user's client: authenticated by a user token in the hello, or by a user
    /// certificate signed by the cluster CA.
    Client,
    /// A node: authenticated by its certificate, which names it.
    Node,
    /// A node without a certificate yet, with a join token in the hello: it sends one
    /// [`crate::auth::JoinRequest`] and gets a certificate in the
    /// [`crate::auth::JoinReply`].
    Join,
}

/// First frame on every connection.
///
/// `protocol_version` comes first and stays first in every version: the head reads it
/// before the rest, so a peer of another version gets a refusal that says so instead of a
/// decoding error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    pub role: Role,
    /// Free text naming the peer's software, e.g. `flame-cli 0.1.0`, for logs.
    pub agent: String,
    /// A user token for [`Role::Client`] (none when the client presents a user
    /// certificate), a join token for [`Role::Join`], none for [`Role::Node`].
    pub token: Option<Secret>,
}

/// The part of a [`Hello`] every protocol version shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloVersion {
    pub protocol_version: u32,
}

/// The head's answer to a [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    Welcome { head_version: String },
    Refused { reason: String },
}

/// A client's request; one per stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    RegisterApplication(ApplicationSpec),
    /// Replaces a registered application's spec. New executors use the new spec; idle
    /// executors of the old one are released, busy ones finish their session first.
    UpdateApplication(ApplicationSpec),
    ListApplications,
    GetApplication {
        name: String,
    },
    /// Refused while a session of the application is unfinished.
    RemoveApplication {
        name: String,
    },
    CreateSession(SessionSpec),
    ListSessions,
    GetSession {
        id: SessionId,
    },
    /// Allowed while tasks are pending; the session finishes when they do.
    CloseSession {
        id: SessionId,
    },
    /// Closes the session and ends every unfinished task as Cancelled; executors running
    /// its tasks are stopped.
    CancelSession {
        id: SessionId,
    },
    /// Tasks of a session in id order, after `after`, at most `limit` (capped by the head
    /// at [`crate::limits::MESSAGE_BATCH_MAX`]), only those in `states` if it is not empty.
    ListTasks {
        session: SessionId,
        states: Vec<TaskState>,
        after: TaskId,
        limit: u32,
    },
    ListNodes,
    /// Places nothing new on the node; its executors finish their sessions' work and are
    /// released. Survives head restarts.
    DrainNode {
        name: String,
    },
    /// Ends a drain.
    UndrainNode {
        name: String,
    },
    /// How executors are shared, per owner and per session, and why work waits.
    Queue,
    OpenSubmitStream {
        session: SessionId,
    },
    WatchResults {
        session: SessionId,
    },
    /// Streams the logs of the executors that served a session (or one of them): after a
    /// [`ClientResponse::Ok`] the head sends [`LogEvent`] frames, ending with
    /// [`LogEvent::End`]; with `follow`, it keeps sending until the executors end or the
    /// client closes the stream.
    Logs {
        session: SessionId,
        executor: Option<ExecutorId>,
        follow: bool,
    },
    /// Runs a command on one node of a running batch job, inside the job's allocation
    /// there (the cgroup and user of one of its ranks): how Open MPI's `mpirun` starts its
    /// daemons without ssh. After a [`ClientResponse::Ok`] the head sends [`ExecEvent`]
    /// frames, ending with [`ExecEvent::Exited`] or [`ExecEvent::Failed`]. The process is
    /// killed when the client closes the stream or the job ends.
    JobExec {
        job: SessionId,
        node: String,
        argv: Vec<String>,
    },
    /// Admin only: makes a token and answers [`ClientResponse::TokenCreated`], the one
    /// time its text is shown. `ttl_ms`: `None` never expires. `uses_max`: `None`
    /// without limit. `replace`: a node join token that may take that existing node's name.
    CreateToken {
        kind: TokenKind,
        ttl_ms: Option<u64>,
        uses_max: Option<u32>,
        replace: Option<String>,
    },
    /// Admin only: every token, without secrets.
    ListTokens,
    /// Admin only: the token can no longer be used; connections it opened are closed.
    RevokeToken {
        id: String,
    },
    /// Who this connection acts for: [`ClientResponse::Principal`].
    WhoAmI,
    /// Admin only: withdraws certificates; connections made with them are closed.
    RevokeCert {
        target: CertTarget,
    },
    /// Admin only: revoked certificates and the nodes' certificates,
    /// [`ClientResponse::Certs`].
    ListCerts,
    /// Where to put objects of `owner` (empty: the caller): [`ClientResponse::ObjectTargets`],
    /// one target per copy (`replicas`, at least 1, on distinct nodes; the first is where
    /// readers are sent first). With `session`, the objects live as long as it (the
    /// head places them near its executors); without, until removed. The client then
    /// sends the bytes to each target's node, never to the head.
    PutObjects {
        owner: String,
        session: Option<SessionId>,
        objects: Vec<ObjectRef>,
        replicas: u32,
    },
    /// Where `owner`'s objects are, with a grant to read them:
    /// [`ClientResponse::ObjectLocations`].
    LocateObjects {
        owner: String,
        ids: Vec<ObjectId>,
    },
    /// `owner`'s objects (of one session, or all): [`ClientResponse::Objects`].
    ListObjects {
        owner: String,
        session: Option<SessionId>,
    },
    /// Forgets `owner`'s objects; every node drops its copy.
    RemoveObjects {
        owner: String,
        ids: Vec<ObjectId>,
    },
}

/// A frame of a [`ClientRequest::JobExec`] stream (and of the node's answer to a
/// [`NodeExecRequest`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    /// The process exited by itself with this status (128 + signal for a signal).
    Exited {
        code: i32,
    },
    /// It could not be started, or was stopped; nothing more follows.
    Failed {
        reason: String,
    },
}

/// The first frame on a stream the head opens to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeStreamRequest {
    /// Answered with [`LogEvent`] frames.
    Logs(NodeLogRequest),
    /// Answered with [`ExecEvent`] frames.
    Exec(NodeExecRequest),
}

/// Start `argv` in the cgroup, as the user, and with the environment of the rank
/// `executor` (with `env` added), in its working directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeExecRequest {
    pub executor: ExecutorId,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// Most arguments of a [`ClientRequest::JobExec`].
pub const EXEC_ARGS_MAX: usize = 4096;

/// A frame of a log stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogEvent {
    /// Bytes of one executor's log, in order.
    Chunk {
        executor: ExecutorId,
        node: String,
        data: Bytes,
        /// The rank of a batch job keeps its stderr apart: these bytes are from it. Other
        /// executors' logs hold stderr and stdout together, and say `false`.
        stderr: bool,
    },
    /// A node's logs could not be read (e.g. it is not connected); other nodes' go on.
    Unavailable { node: String, reason: String },
    /// Nothing more will come.
    End,
}

/// The head's request on a stream it opens to a node, to read executors' logs. The node
/// answers with [`LogEvent`] frames and finishes the stream after [`LogEvent::End`].
/// Only what the executors wrote while bound to `session` is sent; with `follow`, each
/// executor's part ends when it leaves the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLogRequest {
    pub session: SessionId,
    pub executors: Vec<ExecutorId>,
    pub follow: bool,
}

/// The head's answer to a [`ClientRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientResponse {
    Ok,
    Error(ApiError),
    Application(ApplicationInfo),
    Applications(Vec<ApplicationInfo>),
    Session(SessionInfo),
    Sessions(Vec<SessionInfo>),
    Nodes(Vec<NodeInfo>),
    Tasks(Vec<TaskInfo>),
    Queue(QueueReport),
    /// The token's text, shown once, and what `token list` will show of it.
    TokenCreated {
        token: Secret,
        info: TokenInfo,
    },
    Tokens(Vec<TokenInfo>),
    Certs(Vec<CertRecord>),
    Principal(Principal),
    ObjectTargets(Vec<ObjectTarget>),
    ObjectLocations(ObjectLocations),
    Objects(Vec<ObjectInfo>),
}

/// A batch of task inputs on a submit stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitBatch {
    /// Chosen by the client, echoed in the reply.
    pub batch_id: u64,
    /// Each task's input: inline, or an object the client put first (inputs above the
    /// client's inline threshold go that way without the caller asking).
    pub inputs: Vec<Payload>,
}

/// The head's answer to one [`SubmitBatch`], sent in batch order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SubmitReply {
    /// The batch's tasks got the ids `first_task .. first_task + count`, in input order.
    Accepted {
        batch_id: u64,
        first_task: TaskId,
        count: u32,
    },
    /// Nothing of the batch was accepted.
    Rejected { batch_id: u64, error: ApiError },
}

/// A frame on a watch stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchEvent {
    Results(Vec<TaskResult>),
    /// The session is closed and every task is final; the stream ends after this.
    Finished,
    /// The head stopped this watch because its reader fell behind (the head keeps a bounded
    /// queue per watcher); the stream ends after this. Watch again: the new watch sends
    /// every final result from the store, and a reader that drops the ids it already has
    /// (as `flame_client::ResultStream` does) misses none and sees none twice.
    Lagged {
        reason: String,
    },
}

/// A frame from a node to the head on its control stream.
// `Register` is larger than the rest (about 280 bytes against 64): it is the first frame of
// a connection only, and each value lives for one decode and one hand-off, so boxing it
// would buy nothing but an allocation and churn at every use.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeToHead {
    /// First frame after the hello.
    Register(NodeRegistration),
    Heartbeat,
    ExecutorEvents(Vec<ExecutorEvent>),
    Results(Vec<NodeTaskResult>),
    /// Changes in the node's object cache, and what it holds now. After `Register`, a
    /// node sends a `Stored` event for every object it holds, in frames of at most
    /// [`crate::limits::MESSAGE_BATCH_MAX`] events. A task's output object needs no event:
    /// its result names it, and the head records the copy from that.
    Objects {
        events: Vec<ObjectEvent>,
        usage: CacheUsage,
    },
}

/// What a node tells the head about itself when it connects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRegistration {
    /// Unique node name, normally the host name.
    pub name: String,
    /// What it offers to executors: its capacity (or its own cgroup's limit, when lower)
    /// less what its config reserves.
    pub allocatable: NodeResources,
    /// Labels from its config, matched by application selectors.
    pub labels: BTreeMap<String, String>,
    /// How it enforces executor limits.
    pub isolation: crate::model::Isolation,
    /// Who it runs executors as.
    pub identity: ExecutorIdentity,
    /// Executors the node still runs from an earlier connection (it keeps them for a
    /// grace period when it loses the head). The head adopts those it can use, so a task
    /// running on a live executor keeps running across a head restart, and kills the
    /// others.
    pub executors: Vec<ExecutorReport>,
    /// Its object endpoint and cache, when it serves objects.
    pub objects: Option<ObjectService>,
}

/// A node's object endpoint and cache, as it registers them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectService {
    /// The QUIC port it listens on.
    pub port: u16,
    /// The address others reach it at, when set (`flame-node --object-advertise`); the
    /// head otherwise uses the address the node's own connection comes from, with `port`.
    pub advertise: Option<std::net::SocketAddr>,
    /// See [`crate::object::ObjectEndpoint::host`].
    pub host: String,
    /// Its Unix socket for clients on the same host.
    pub socket: Option<String>,
    pub usage: CacheUsage,
}

/// An executor a reconnecting node still runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorReport {
    pub executor: ExecutorId,
    pub application: String,
    /// The owner it was launched for; it serves no other owner's session.
    pub owner: String,
    /// What it was launched with, so the head accounts for it on this node.
    pub resources: Resources,
    /// GPU indices it was given.
    pub gpus: Vec<u32>,
    /// The application said ready.
    pub ready: bool,
    /// The session it is bound to, if any.
    pub session: Option<SessionId>,
    /// Tasks handed to it without a result sent yet, in the order it runs them:
    /// `(session, task, attempt)`.
    pub tasks: Vec<(SessionId, TaskId, u32)>,
    /// Most tasks it accepts outstanding.
    pub credit: u32,
}

/// A change in an executor's life, reported by its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecutorEvent {
    /// The application started and said it is ready: the executor is Idle. `credit` is how
    /// many tasks the head may have outstanding on it at once (one running, the rest
    /// queued on the node).
    Ready { executor: ExecutorId, credit: u32 },
    /// The executor entered the session: Binding → Bound.
    Bound {
        executor: ExecutorId,
        session: SessionId,
    },
    /// The executor left its session: Unbinding → Idle. `usage` is what it used while
    /// bound.
    Unbound { executor: ExecutorId, usage: Usage },
    /// The process is gone (released, crashed, or never started). Tasks it held that have
    /// no result are lost and must be re-queued by the head. `usage` is what it used since
    /// it was last bound, if it was.
    Exited {
        executor: ExecutorId,
        reason: String,
        usage: Usage,
    },
}

/// What an executor used over a span of its life, from its cgroup (zeros on a node
/// without cgroups).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Wall time the executor was bound (executor-seconds, in ms).
    pub bound_ms: u64,
    pub cpu_ms: u64,
    pub memory_peak_bytes: u64,
    pub throttled_ms: u64,
}

/// One task's result as a node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeTaskResult {
    pub executor: ExecutorId,
    pub session: SessionId,
    pub task: TaskId,
    pub attempt: u32,
    pub outcome: TaskOutcome,
    /// For a rank of a batch job: its process's exit status, when it exited by itself
    /// (128 + the signal number when a signal killed it).
    pub exit_code: Option<i32>,
}

/// A frame from the head to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeadToNode {
    /// Answer to [`NodeToHead::Register`].
    Registered {
        heartbeat_interval_ms: u64,
        /// The key the head signs object grants with; the node accepts no other.
        grant_key: GrantKey,
        /// Task outputs larger than this go into the node's object cache and the result
        /// names the object; smaller ones travel inline.
        inline_max: u64,
        /// Task outputs larger than this fail their task: the node keeps none
        /// (`flame-head --task-output-bytes-max`).
        output_max: u64,
    },
    /// Refusal of the registration; the connection closes after it.
    Refused { reason: String },
    /// Commands in the order they must be applied.
    Commands(Vec<NodeCommand>),
    /// Answer to a node's heartbeat: a node that hears nothing from the head for a
    /// heartbeat timeout drops the connection and connects again.
    Heartbeat,
}

/// One instruction to a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeCommand {
    /// Start a new executor process: Void → Idle once the application says ready. It
    /// serves only sessions of `owner`, and runs as the identity the node's mode gives
    /// that owner.
    Launch {
        executor: ExecutorId,
        application: Box<ApplicationSpec>,
        owner: ExecutorOwner,
        /// GPU indices given to it (its `CUDA_VISIBLE_DEVICES`).
        gpus: Vec<u32>,
    },
    /// Enter a session: Idle → Binding → Bound.
    Bind {
        executor: ExecutorId,
        session: SessionId,
        common_data: Payload,
        /// Where to fetch `common_data` when it is an object the node does not hold.
        sources: Option<ObjectSources>,
    },
    /// Run a task on a bound executor; queued on the node while another one runs.
    Run(TaskAssignment),
    /// Leave the session after the queued tasks: Bound → Unbinding → Idle.
    Unbind { executor: ExecutorId },
    /// Stop the process: Idle → Releasing → Released.
    Release { executor: ExecutorId },
    /// Stop the process at once, dropping the tasks queued on it (a cancelled session).
    Kill { executor: ExecutorId },
    /// Something to do with the node's object cache.
    Objects(ObjectCommand),
}

/// The ids `first .. first + count` of an accepted batch, in input order. Saturates at
/// `u64::MAX` rather than overflowing on a hostile reply.
pub fn task_range(first: TaskId, count: u32) -> impl Iterator<Item = TaskId> {
    (first.0..first.0.saturating_add(u64::from(count))).map(TaskId)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // Random bytes never panic any decoder: they decode or they fail.
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = postcard::from_bytes::<Hello>(&bytes);
            let _ = postcard::from_bytes::<ClientRequest>(&bytes);
            let _ = postcard::from_bytes::<ClientResponse>(&bytes);
            let _ = postcard::from_bytes::<SubmitBatch>(&bytes);
            let _ = postcard::from_bytes::<WatchEvent>(&bytes);
            let _ = postcard::from_bytes::<NodeToHead>(&bytes);
            let _ = postcard::from_bytes::<HeadToNode>(&bytes);
            let _ = postcard::from_bytes::<LogEvent>(&bytes);
            let _ = postcard::from_bytes::<NodeLogRequest>(&bytes);
            let _ = postcard::from_bytes::<NodeStreamRequest>(&bytes);
            let _ = postcard::from_bytes::<ExecEvent>(&bytes);
            let _ = postcard::from_bytes::<HelloVersion>(&bytes);
            let _ = postcard::from_bytes::<crate::object::ObjectRequest>(&bytes);
            let _ = postcard::from_bytes::<crate::object::ObjectResponse>(&bytes);
        }
    }

    #[test]
    fn task_range_never_overflows() {
        assert_eq!(
            task_range(TaskId(3), 2).collect::<Vec<_>>(),
            vec![TaskId(3), TaskId(4)]
        );
        assert_eq!(task_range(TaskId(u64::MAX - 1), 5).count(), 1);
    }

    #[test]
    fn submit_batch_round_trips() {
        let batch = SubmitBatch {
            batch_id: 7,
            inputs: vec![Bytes::from_static(b"a").into(), Payload::default()],
        };
        let bytes = postcard::to_allocvec(&batch).unwrap();
        assert_eq!(postcard::from_bytes::<SubmitBatch>(&bytes).unwrap(), batch);
    }
}

#[cfg(test)]
mod hello_tests {
    use super::*;

    #[test]
    fn every_hello_starts_with_its_version() {
        let hello = Hello {
            protocol_version: 77,
            role: Role::Join,
            agent: "x".into(),
            token: Some(Secret::new("t")),
        };
        let bytes = postcard::to_allocvec(&hello).unwrap();
        let (version, _) = postcard::take_from_bytes::<HelloVersion>(&bytes).unwrap();
        assert_eq!(version.protocol_version, 77);
    }
}
