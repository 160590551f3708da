//! A seeded, deterministic simulation of the head's core (issue 3, item 6).
//!
//! One [`World`] owns a [`Core`], a real [`Store`] (redb in a temporary directory, on
//! `/dev/shm` when there is one), a fake clock, simulated clients and 2–4 simulated nodes,
//! and a SplitMix64 generator seeded from one `u64`. Each step advances the clock by a random
//! amount and feeds the core a random interleaving of what every party has to say (client
//! requests, node frames, store commits, the server's tick), keeping each party's own order,
//! then calls [`Core::end_batch`] and routes what came out: store requests to a FIFO writer
//! that commits them to redb after a random delay (sometimes failing the commit instead),
//! `Commands` frames to the nodes, replies and watch messages to the clients.
//!
//! The nodes behave like `flame-node`: an executor runs its commands in order (Ready after a
//! launch, Bound after a bind, one result per run, Unbound after an unbind, Exited after a
//! release or kill), refuses commands its lifecycle forbids by exiting, keeps running while
//! its node is away from the head and is reported when the node registers again. The
//! application computes `output = input reversed`, and refuses inputs that start with `!`.
//!
//! Faults, while the chaos phase runs: commit failures; storage-fault periods (a full disk:
//! every commit fails until the writer's probe succeeds); executors that fail to start or
//! crash with tasks unanswered; node connections dropped (the server's `NodeDisconnected`
//! may arrive after the node is back); node agents killed with all their executors;
//! partitions longer or shorter than the heartbeat timeout; the head pausing past the
//! timeout (its clock jumps, and the server's `Event::Stalled` reaches the core first, as
//! `server::StallMeter` sends it); clients losing their submit replies and sending the batch again; nodes
//! sending stale results (duplicates, earlier attempts, another executor's or another
//! node's task, with corrupted bytes); and head restarts, which drop the core and the
//! uncommitted writes and rebuild the core from `Store::load` as `flame-head`'s `main` does.
//! Then faults stop, every session is closed and the world runs until everything drains.
//!
//! Properties, checked after every step, on every watch message, and at the end:
//! * every task acked to a client (`SubmitReply::Accepted`) ends in exactly one final
//!   state, recorded in the store for durable sessions, never changing once seen;
//! * a recorded output is what the application computes for that task's input, from an
//!   attempt that an executor really ran; a corrupted stale result is never recorded;
//! * a batch that was refused (`Rejected`) never shows up as tasks;
//! * `GetSession` counters sum to the acked total (within the batches whose reply was lost,
//!   until they are resent) and, every few steps, match the tasks `ListTasks` shows in each
//!   state;
//! * a watcher sees each result at most once on its stream, and a watcher attached when
//!   the session was created sees every acked task exactly once if the head never
//!   restarted during the session's life;
//! * a close or cancel the head answered `Ok` is durable; session and executor ids are
//!   never handed out twice, across restarts too;
//! * an executor only ever serves sessions of its owner: sessions belong to two owners in
//!   turn, and every executor a node holds in a session was launched for that session's
//!   owner (checked on the nodes' side, after every step);
//! * everything finishes once faults stop;
//! * objects (issue 20): every holder the object book names holds a copy (or the node's
//!   `Dropped`, or its wiped cache, has not reached the head yet); an object with no copy
//!   says why; an ended session's objects leave the book within the retention, and none
//!   is left after the drain; one owner never locates another's object; every run of a
//!   task whose input is an object runs where a copy is, or carries sources the book has
//!   with a read grant that verifies; and the head ends a session's objects on a node
//!   (unpinning its copies) only once the session ended. Faults add cache pressure (a
//!   node drops its unpinned spare copies and keeps its pinned ones) and agent kills wipe
//!   caches, so objects are lost and lost outputs are re-run (lineage). A multi-seed run
//!   fails unless runs with located sources, fetches, pins kept and released, losses and
//!   lineage re-runs all happened.
//!
//! Running it:
//! * `cargo test -p flame-head simulation` runs [`SEEDS`] seeds of [`STEPS`] steps plus
//!   [`REGRESSION_SEEDS`], and checks that one seed gives the same trace twice.
//! * `FLAME_SIM_SEED=123 cargo test -p flame-head simulation -- --nocapture` runs one seed
//!   (optionally `FLAME_SIM_STEPS=1000`); a failure prints the seed, the step and the last
//!   events the core saw. `FLAME_SIM_SEEDS=1000..5000` runs a range instead of the default.
//! * To pin a failing seed as a regression test forever, add it to [`REGRESSION_SEEDS`]
//!   (with a comment naming the bug); it then runs with the default step count on every
//!   `cargo test`. A seed is a path through the generator, and the core's decisions steer
//!   that path: after a change to this file or to the core a pinned seed may walk elsewhere,
//!   so name the bug next to it and keep a focused unit test for it in `core::tests` too.

use crate::core::{
    Backfill, ConnId, Core, CoreConfig, Event, LinkOutput, Reply, ReplyId, Request, WatchMsg,
    WatchStart,
};
use crate::storage_fault::CommitError;
use crate::store::{Store, StoreRequest};
use bytes::Bytes;
use flame_protocol::limits;
use flame_protocol::messages::ObjectService;
use flame_protocol::messages::{
    ClientRequest, ClientResponse, ExecutorEvent, ExecutorReport, HeadToNode, NodeCommand,
    NodeRegistration, NodeTaskResult, NodeToHead, SubmitReply,
};
use flame_protocol::model::{
    ApiError, ApplicationSpec, SessionInfo, SessionSpec, SessionState, ShimKind, TaskInfo,
    TaskOutcome, TaskResult, TaskState,
};
use flame_protocol::object::{
    CacheUsage, GrantKey, ObjectCommand, ObjectEvent, ObjectId, ObjectRef, ObjectScope,
    ObjectSources, Payload,
};
use flame_protocol::object_grant;
use flame_protocol::{ExecutorId, SessionId, TaskId};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use tokio::sync::mpsc;
use tokio::sync::oneshot::error::TryRecvError;

/// Seeds the default run covers.
pub const SEEDS: u64 = 200;
/// Chaos steps per seed in the default run; the drain afterwards is not counted.
pub const STEPS: usize = 300;
/// Seeds that once found a bug; they run first on every `cargo test`.
pub const REGRESSION_SEEDS: &[u64] = &[
    // A result whose FinishTasks commit failed was re-queued with its input already
    // dropped: the next attempt ran on empty input and b"" was recorded.
    43,
    // An ephemeral session's id was acked before the counter was durable; after a head
    // restart the id was handed out again.
    120,
    // With objects on: a close of a cancelled session whose commit landed after the
    // session left memory was never answered (core::tests::storage).
    157,
];

/// The server's tick period (`server::TICK`).
const TICK_MS: u64 = 200;
/// How often a node heartbeats (`limits::HEARTBEAT_INTERVAL`).
const HEARTBEAT_MS: u64 = 1_000;
/// `limits::HEARTBEAT_TIMEOUT` in milliseconds.
const HEARTBEAT_TIMEOUT_MS: u64 = limits::HEARTBEAT_TIMEOUT.as_millis() as u64;
/// `limits::HEAD_SILENCE_MAX` in milliseconds: a node that hears nothing from the head
/// this long drops its connection.
const HEAD_SILENCE_MAX_MS: u64 = limits::HEAD_SILENCE_MAX.as_millis() as u64;
/// How long a node keeps its executors while the head is away (flame-node's default is
/// 60 s; shorter here so that the simulation reaches it after long partitions).
const HEAD_LOSS_GRACE_MS: u64 = 20_000;
/// Simulated time the drain may take before the run counts as stuck.
const DRAIN_MS_MAX: u64 = 900_000;
/// Trace lines kept for a failure report.
const TRACE_LINES_KEPT: usize = 150;
/// Steps between two checks of every session's task list against its counters.
const LIST_CHECK_EVERY_STEPS: u64 = 4;
/// Simulated time past the drain (and `EPHEMERAL_KEPT_MS`) within which every finished
/// session must have left the head's memory.
const EVICTION_MS_MAX: u64 = 120_000;
/// Results remembered per node for stale resends.
const SPENT_KEPT: usize = 64;

/// Object activity (issue 20): nodes serve objects and keep a fake cache, clients put
/// objects and submit them as task inputs, outputs above [`SIM_INLINE_MAX`] stay on their
/// node, node losses and cache pressure lose copies and lost outputs are rebuilt. `false`
/// gives the simulation of before issue 20, draw for draw (the traces pinned then); the
/// pinned traces are those with objects on.
const OBJECTS_IN_SIM: bool = true;
/// Task outputs above this many bytes are kept as objects (`CoreConfig::object_inline_max`).
const SIM_INLINE_MAX: u64 = 24;
/// How long an ended session's objects stay (`CoreConfig::object_retention_ms`), short so
/// that runs see them go.
const SIM_OBJECT_RETENTION_MS: u64 = 5_000;
/// Slack past the retention within which an ended session's objects must have left the
/// book (the core expires them on its tick; the sim sees an end a step late at most).
const RETENTION_SLACK_MS: u64 = 2_000;

/// The message of the application's own error, for inputs that start with `!`.
const APP_ERROR: &str = "bad input: refused by the application";
/// First byte of every corrupted (stale) output; task inputs are ASCII, so no honest output
/// starts with it.
const STALE_MARK: u8 = 0xff;

/// Per-mille chances per step while faults are on.
mod rate {
    pub const CREATE_SESSION: u64 = 60;
    pub const SUBMIT: u64 = 450;
    pub const CLOSE_SESSION: u64 = 12;
    pub const CANCEL_SESSION: u64 = 4;
    pub const CLIENT_DROP: u64 = 8;
    pub const RESEND_ACKED: u64 = 10;
    pub const EXECUTOR_CRASH: u64 = 15;
    pub const NODE_DISCONNECT: u64 = 6;
    pub const NODE_AGENT_KILL: u64 = 2;
    pub const PARTITION: u64 = 4;
    pub const HEAD_PAUSE: u64 = 2;
    pub const STALE_RESULT: u64 = 60;
    pub const HEAD_RESTART: u64 = 4;
    /// Per group commit.
    pub const COMMIT_FAILURE: u64 = 50;
    /// Per step with commits waiting: a storage-fault period (a full disk) starts, in
    /// which every commit fails until it ends and the writer's probe succeeds.
    pub const STORAGE_FAULT: u64 = 4;
    /// Per launch.
    pub const LAUNCH_FAILURE: u64 = 40;
    /// Per task input.
    pub const BAD_INPUT: u64 = 60;
    /// Per task input, with objects on: padded past the inline threshold, so that its
    /// output is kept as an object.
    pub const BIG_INPUT: u64 = 300;
    /// Per new batch, with objects on: its inputs are put as objects first.
    pub const OBJECT_BATCH: u64 = 300;
    /// Per step, with objects on: one node's cache is under pressure and drops its
    /// unpinned copies (spares fetched for a task input), keeping its pinned ones.
    pub const CACHE_PRESSURE: u64 = 40;
}

/// SplitMix64: tiny, fast, and good enough to drive a simulation.
#[derive(Debug, Clone)]
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform in `lo..=hi`.
    pub(crate) fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    pub(crate) fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }

    pub(crate) fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }
}

/// FNV-1a over the trace, plus the last lines for a failure report (shared with the
/// scheduler's simulation).
#[derive(Debug)]
pub(crate) struct Tracer {
    pub(crate) hash: u64,
    pub(crate) recent: VecDeque<String>,
    /// Lines kept in `recent`.
    kept: usize,
}

impl Tracer {
    pub(crate) fn new(kept: usize) -> Tracer {
        Tracer {
            hash: 0xCBF2_9CE4_8422_2325,
            recent: VecDeque::new(),
            kept,
        }
    }

    pub(crate) fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.hash ^= u64::from(b);
            self.hash = self.hash.wrapping_mul(0x0000_0100_0000_01B3);
        }
    }

    pub(crate) fn line(&mut self, line: String) {
        self.bytes(line.as_bytes());
        self.bytes(b"\n");
        if self.recent.len() == self.kept {
            self.recent.pop_front();
        }
        self.recent.push_back(line);
    }
}

fn reversed(input: &[u8]) -> Bytes {
    Bytes::from(input.iter().rev().copied().collect::<Vec<u8>>())
}

/// What the application computes.
fn app_outcome(input: &[u8]) -> TaskOutcome {
    if input.first() == Some(&b'!') {
        TaskOutcome::Failed(APP_ERROR.into())
    } else {
        TaskOutcome::Succeeded(reversed(input))
    }
}

/// An output no executor computes: what a buggy or stale node might send.
fn corrupted(input: &[u8]) -> TaskOutcome {
    let mut out = vec![STALE_MARK];
    out.extend_from_slice(b"stale:");
    out.extend_from_slice(input);
    TaskOutcome::Succeeded(Bytes::from(out))
}

fn application(name: &str, max_instances: u32, max_attempts: u32, retry: bool) -> ApplicationSpec {
    ApplicationSpec {
        name: name.into(),
        shim: ShimKind::Stdio,
        command: "rev".into(),
        args: vec![],
        env: Default::default(),
        working_dir: None,
        user: None,
        group: None,
        users: Vec::new(),
        groups: Vec::new(),
        resources: Default::default(),
        selector: Default::default(),
        max_instances,
        delay_release_ms: 1_500,
        max_attempts,
        retry_on_error: retry,
        task_timeout_ms: None,
        allow_root: false,
    }
}

const APPS: [&str; 2] = ["rev", "rev-retry"];

/// The owners sessions belong to, in turn.
const OWNERS: [&str; 2] = ["alice", "bob"];

fn applications() -> [ApplicationSpec; 2] {
    [
        application(APPS[0], 5, 3, false),
        application(APPS[1], 3, 2, true),
    ]
}

fn short_outcome(o: &TaskOutcome) -> &'static str {
    match o {
        TaskOutcome::Succeeded(b) if b.first() == Some(&STALE_MARK) => "STALE",
        TaskOutcome::Succeeded(_) => "ok",
        TaskOutcome::Failed(_) => "failed",
        TaskOutcome::Cancelled => "cancelled",
        TaskOutcome::Object(_) => "object",
    }
}

fn describe_command(c: &NodeCommand) -> String {
    match c {
        NodeCommand::Launch { executor, .. } => format!("launch e{}", executor.0),
        NodeCommand::Bind {
            executor, session, ..
        } => format!("bind e{} s{}", executor.0, session.0),
        NodeCommand::Run(a) => format!(
            "run e{} s{} t{} a{}{}",
            a.executor.0,
            a.session.0,
            a.task.0,
            a.attempt,
            match (&a.input, &a.sources) {
                (Payload::Inline(_), _) => String::new(),
                (Payload::Object(o), None) => format!(" object {}", o.id.short()),
                (Payload::Object(o), Some(src)) => format!(
                    " object {} from {:?}",
                    o.id.short(),
                    src.endpoints.iter().map(|e| &e.node).collect::<Vec<_>>()
                ),
            }
        ),
        NodeCommand::Unbind { executor } => format!("unbind e{}", executor.0),
        NodeCommand::Release { executor } => format!("release e{}", executor.0),
        NodeCommand::Kill { executor } => format!("kill e{}", executor.0),
        NodeCommand::Objects(c) => match c {
            ObjectCommand::EndSession { owner, session } => {
                format!("objects end s{} of {owner}", session.0)
            }
            ObjectCommand::Remove { owner, ids } => {
                format!("objects remove {} of {owner}", ids.len())
            }
            // Not the grant: its signature is made with a key new at each run.
            ObjectCommand::Replicate { owner, sources, .. } => {
                format!("objects replicate {} of {owner}", sources.object.id.short())
            }
        },
    }
}

fn describe(event: &Event) -> String {
    match event {
        Event::Request { request, .. } => match request {
            Request::Client(request) => format!("client {request:?}"),
            Request::Submit {
                session,
                batch_id,
                inputs,
            } => format!("submit s{} batch {batch_id} n={}", session.0, inputs.len()),
            Request::Watch { session } => format!("watch s{}", session.0),
            Request::ExecTarget { job, node } => format!("exec target s{} on {node}", job.0),
            Request::SessionOwner { session } => format!("owner of s{}", session.0),
            Request::ListTasks { session, .. } => format!("list tasks s{}", session.0),
            Request::LogTargets { session, .. } => format!("log targets s{}", session.0),
        },
        Event::CallersGone { replies } => format!("callers gone {replies:?}"),
        Event::NodeConnected {
            conn, registration, ..
        } => {
            let kept: Vec<String> = registration
                .executors
                .iter()
                .map(|e| {
                    format!(
                        "e{}{}{:?}",
                        e.executor.0,
                        e.session.map_or(String::new(), |s| format!("@s{}", s.0)),
                        e.tasks
                            .iter()
                            .map(|(s, t, a)| (s.0, t.0, *a))
                            .collect::<Vec<_>>()
                    )
                })
                .collect();
            format!(
                "node {} connects as conn {conn}, keeps [{}]",
                registration.name,
                kept.join(" ")
            )
        }
        Event::NodeMessage { conn, message } => match message {
            NodeToHead::Heartbeat => format!("conn {conn} heartbeat"),
            NodeToHead::Register(_) => format!("conn {conn} register"),
            NodeToHead::ExecutorEvents(events) => format!("conn {conn} events {events:?}"),
            NodeToHead::Objects { events, .. } => format!("conn {conn} objects {events:?}"),
            NodeToHead::Results(results) => {
                let mut s = format!("conn {conn} results");
                for r in results {
                    let _ = write!(
                        s,
                        " [e{} s{} t{} a{} {}]",
                        r.executor.0,
                        r.session.0,
                        r.task.0,
                        r.attempt,
                        short_outcome(&r.outcome)
                    );
                }
                s
            }
        },
        Event::NodeDisconnected { conn, .. } => format!("conn {conn} disconnected"),
        Event::Committed { tokens, result } => format!(
            "committed {tokens:?} {}",
            if result.is_ok() { "ok" } else { "FAILED" }
        ),
        Event::Tick => "tick".into(),
        Event::Stalled { stalled_ms } => format!("head stalled {stalled_ms} ms"),
        Event::StorageFaulted { fault } => format!("storage faulted: {:?}", fault.kind),
        Event::StorageRecovered => "storage recovered".into(),
        Event::DiskSpace(space) => format!("disk space {} free", space.free_bytes),
    }
}

// ---------------------------------------------------------------------------------------
// Nodes

/// A task as an executor received it, with the head's life (epoch) it came from.
#[derive(Clone)]
struct Assigned {
    executor: ExecutorId,
    session: SessionId,
    task: TaskId,
    attempt: u32,
    input: Bytes,
    /// Its input object could not be had (no copy here, none at the sources): the node
    /// fails the run with this.
    unresolved: Option<String>,
    epoch: u64,
}

// By hand: `unresolved` shows only when set, so that a refused command's text (an
// executor's exit reason, in the trace) reads as before issue 20 when objects are off.
impl std::fmt::Debug for Assigned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Assigned");
        d.field("executor", &self.executor)
            .field("session", &self.session)
            .field("task", &self.task)
            .field("attempt", &self.attempt)
            .field("input", &self.input);
        if let Some(why) = &self.unresolved {
            d.field("unresolved", why);
        }
        d.field("epoch", &self.epoch).finish()
    }
}

#[derive(Debug)]
enum ExecCmd {
    Bind(SessionId),
    Run(Assigned),
    Unbind,
    Release,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Launched, not ready yet.
    Void,
    Idle,
    Bound(SessionId),
}

#[derive(Debug)]
struct SimExec {
    application: String,
    /// The owner the head launched it for.
    owner: String,
    phase: Phase,
    /// Commands applied in order, one at a time.
    queue: VecDeque<ExecCmd>,
    /// When the front command (or the start, while Void) completes.
    next_at: u64,
    credit: u32,
    // What the agent has passed on to a connection, as flame-node's `Tracked`: that is what
    // a registration reports.
    told_ready: bool,
    told_session: Option<SessionId>,
    held: VecDeque<(SessionId, TaskId, u32)>,
}

#[derive(Debug)]
enum Report {
    /// With an `Exited`, the tasks it abandoned.
    Event(ExecutorEvent, Vec<Assigned>),
    /// With the assignment when it is an honest result.
    Result(NodeTaskResult, Option<Assigned>),
    /// Cache events (`NodeToHead::Objects`).
    Objects(Vec<ObjectEvent>),
}

#[derive(Debug)]
struct NodeLink {
    conn: ConnId,
    /// Frames from the head, in order, not read yet.
    inbox: VecDeque<HeadToNode>,
    /// The head let go of this connection: once `inbox` is read, it is closed.
    closed_by_head: bool,
    registered: bool,
    /// Reports handed to this connection's writer, not yet on the wire; lost with it.
    outbox: VecDeque<Report>,
    last_heartbeat_ms: u64,
    /// Last frame from the head: a node that hears nothing for a heartbeat timeout drops
    /// the connection and connects again.
    last_heard_ms: u64,
}

#[derive(Debug)]
struct SimNode {
    name: String,
    cpus: u32,
    link: Option<NodeLink>,
    reconnect_at: u64,
    lost_since: Option<u64>,
    /// Partitioned: nothing in or out until then.
    silent_until: u64,
    executors: BTreeMap<ExecutorId, SimExec>,
    /// The agent's report queue: outlives connections.
    pending: VecDeque<Report>,
    /// Assignments whose result or abandonment reached a connection: `(assignment,
    /// answered)`. Anything sent about them later is stale.
    spent: VecDeque<(Assigned, bool)>,
    /// The object cache: `(owner, id)` → the scope its copy has. Outlives connections
    /// and head restarts; an agent kill empties it.
    cache: BTreeMap<(String, ObjectId), ObjectScope>,
    /// The head's grant key and inline threshold, from its last `Registered`.
    grant_key: Option<GrantKey>,
    inline_max: Option<u64>,
    /// Its cache was emptied (agent killed) and the head has not seen it register since:
    /// the book may still name it as a holder.
    wiped: bool,
    /// Copies dropped whose `Dropped` has not reached the head yet.
    unsent_drops: BTreeSet<(String, ObjectId)>,
    /// The copies in `cache` that are not pinned: fetched as spares for a task input, as
    /// flame-node's cache keeps them, so cache pressure may drop them. Every other copy
    /// (a put, a replica the head asked for, a task's output) is pinned until its session
    /// ends or its owner removes it.
    spares: BTreeSet<(String, ObjectId)>,
}

/// What node code needs from the world.
struct NodeCtx<'a> {
    rng: &'a mut Rng,
    now: u64,
    epoch: u64,
    chaos: bool,
    honest: &'a mut HashSet<(SessionId, TaskId, u32)>,
    launched: &'a mut BTreeSet<ExecutorId>,
    violations: &'a mut Vec<String>,
    tracer: &'a mut Tracer,
    /// Ground truth: which nodes hold each `(owner, id)` now.
    truth: &'a BTreeMap<(String, ObjectId), BTreeSet<String>>,
    /// The bytes of every object a client put, by id.
    object_bytes: &'a HashMap<ObjectId, Bytes>,
    /// Copies fetched from a source the head located (`Stats::object_fetches`).
    fetches: &'a mut u64,
}

impl SimNode {
    fn exit(&mut self, id: ExecutorId, reason: &str) {
        let Some(e) = self.executors.remove(&id) else {
            return;
        };
        let abandoned = e
            .queue
            .into_iter()
            .filter_map(|c| match c {
                ExecCmd::Run(a) => Some(a),
                _ => None,
            })
            .collect();
        self.pending.push_back(Report::Event(
            ExecutorEvent::Exited {
                usage: Default::default(),
                executor: id,
                reason: reason.into(),
            },
            abandoned,
        ));
    }

    fn unknown(&mut self, executor: ExecutorId) {
        self.pending.push_back(Report::Event(
            ExecutorEvent::Exited {
                usage: Default::default(),
                executor,
                reason: "unknown on this node".into(),
            },
            Vec::new(),
        ));
    }

    fn enqueue(&mut self, ctx: &mut NodeCtx<'_>, id: ExecutorId, cmd: ExecCmd) {
        let Some(e) = self.executors.get_mut(&id) else {
            self.unknown(id);
            return;
        };
        if let ExecCmd::Run(a) = &cmd {
            e.held.push_back((a.session, a.task, a.attempt));
        }
        if e.queue.is_empty() && e.phase != Phase::Void {
            e.next_at = e.next_at.max(ctx.now + ctx.rng.between(1, 30));
        }
        e.queue.push_back(cmd);
    }

    fn apply(&mut self, ctx: &mut NodeCtx<'_>, command: NodeCommand) {
        ctx.tracer
            .line(format!("{} <- {}", self.name, describe_command(&command)));
        match command {
            NodeCommand::Launch {
                executor,
                application,
                owner,
                ..
            } => {
                if !ctx.launched.insert(executor) {
                    ctx.violations.push(format!(
                        "executor id {} was launched a second time (on {}): ids must never be reused",
                        executor.0, self.name
                    ));
                }
                if self.executors.contains_key(&executor) {
                    return; // as flame-node: a launch of an existing executor is ignored
                }
                let credit = ctx.rng.between(1, 8) as u32;
                self.executors.insert(
                    executor,
                    SimExec {
                        application: application.name,
                        owner: owner.name,
                        phase: Phase::Void,
                        queue: VecDeque::new(),
                        next_at: ctx.now + ctx.rng.between(5, 300),
                        credit,
                        told_ready: false,
                        told_session: None,
                        held: VecDeque::new(),
                    },
                );
            }
            NodeCommand::Bind {
                executor, session, ..
            } => self.enqueue(ctx, executor, ExecCmd::Bind(session)),
            NodeCommand::Run(a) => {
                let (input, unresolved) = match &a.input {
                    Payload::Inline(bytes) => (bytes.clone(), None),
                    Payload::Object(o) => {
                        match self.resolve(ctx, a.executor, a.session, o, a.sources.as_ref()) {
                            Ok(bytes) => (bytes, None),
                            Err(why) => (Bytes::new(), Some(why)),
                        }
                    }
                };
                let assigned = Assigned {
                    executor: a.executor,
                    session: a.session,
                    task: a.task,
                    attempt: a.attempt,
                    input,
                    unresolved,
                    epoch: ctx.epoch,
                };
                self.enqueue(ctx, a.executor, ExecCmd::Run(assigned));
            }
            NodeCommand::Unbind { executor } => self.enqueue(ctx, executor, ExecCmd::Unbind),
            NodeCommand::Release { executor } => self.enqueue(ctx, executor, ExecCmd::Release),
            NodeCommand::Kill { executor } => {
                if self.executors.contains_key(&executor) {
                    self.exit(executor, "killed by the node");
                } else {
                    self.unknown(executor);
                }
            }
            NodeCommand::Objects(c) => self.object_command(ctx, c),
        }
    }

    /// Executors work through their queues up to `now`.
    fn run_executors(&mut self, ctx: &mut NodeCtx<'_>) {
        let ids: Vec<ExecutorId> = self.executors.keys().copied().collect();
        for id in ids {
            for _ in 0..64 {
                let Some(e) = self.executors.get_mut(&id) else {
                    break;
                };
                if e.next_at > ctx.now {
                    break;
                }
                if e.phase == Phase::Void {
                    if ctx.chaos && ctx.rng.chance(rate::LAUNCH_FAILURE) {
                        self.exit(id, "the application failed to start");
                        break;
                    }
                    e.phase = Phase::Idle;
                    e.next_at += ctx.rng.between(1, 20);
                    let credit = e.credit;
                    self.pending.push_back(Report::Event(
                        ExecutorEvent::Ready {
                            executor: id,
                            credit,
                        },
                        Vec::new(),
                    ));
                    continue;
                }
                let Some(cmd) = e.queue.pop_front() else {
                    break;
                };
                e.next_at += ctx.rng.between(1, 40);
                match (cmd, e.phase) {
                    (ExecCmd::Bind(session), Phase::Idle) => {
                        e.phase = Phase::Bound(session);
                        self.pending.push_back(Report::Event(
                            ExecutorEvent::Bound {
                                executor: id,
                                session,
                            },
                            Vec::new(),
                        ));
                    }
                    (ExecCmd::Run(a), Phase::Bound(s)) if s == a.session => {
                        let outcome = match &a.unresolved {
                            Some(why) => TaskOutcome::Failed(why.clone()),
                            None => app_outcome(&a.input),
                        };
                        let owner = e.owner.clone();
                        let outcome = self.keep_output(&owner, a.session, outcome);
                        ctx.honest.insert((a.session, a.task, a.attempt));
                        self.pending.push_back(Report::Result(
                            NodeTaskResult {
                                exit_code: None,
                                executor: id,
                                session: a.session,
                                task: a.task,
                                attempt: a.attempt,
                                outcome,
                            },
                            Some(a),
                        ));
                    }
                    (ExecCmd::Unbind, Phase::Bound(_)) => {
                        e.phase = Phase::Idle;
                        self.pending.push_back(Report::Event(
                            ExecutorEvent::Unbound {
                                executor: id,
                                usage: Default::default(),
                            },
                            Vec::new(),
                        ));
                    }
                    (ExecCmd::Release, Phase::Idle) => {
                        self.exit(id, "released");
                        break;
                    }
                    (cmd, phase) => {
                        // As flame-node: the lifecycle refuses it and the executor stops.
                        let reason = format!("protocol error: {cmd:?} in phase {phase:?}");
                        if let ExecCmd::Run(a) = cmd {
                            e.queue.push_front(ExecCmd::Run(a));
                        }
                        self.exit(id, &reason);
                        break;
                    }
                }
            }
        }
    }

    /// Hands the agent's queued reports to the connection, updating what a registration
    /// would report (flame-node's `track`).
    fn hand_to_link(&mut self) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        while let Some(report) = self.pending.pop_front() {
            match &report {
                Report::Event(ExecutorEvent::Ready { executor, .. }, _) => {
                    if let Some(e) = self.executors.get_mut(executor) {
                        e.told_ready = true;
                    }
                }
                Report::Event(ExecutorEvent::Bound { executor, session }, _) => {
                    if let Some(e) = self.executors.get_mut(executor) {
                        e.told_session = Some(*session);
                    }
                }
                Report::Event(ExecutorEvent::Unbound { executor, .. }, _) => {
                    if let Some(e) = self.executors.get_mut(executor) {
                        e.told_session = None;
                    }
                }
                Report::Event(ExecutorEvent::Exited { .. }, _) | Report::Objects(_) => {}
                Report::Result(r, _) => {
                    if let Some(e) = self.executors.get_mut(&r.executor) {
                        if let Some(pos) = e
                            .held
                            .iter()
                            .position(|&(s, t, _)| s == r.session && t == r.task)
                        {
                            e.held.remove(pos);
                        }
                    }
                }
            }
            link.outbox.push_back(report);
        }
    }

    /// Puts the connection's outbox on the wire as frames (consecutive reports of one kind
    /// share a frame), and remembers what was answered.
    fn flush(&mut self, out: &mut VecDeque<Event>) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let conn = link.conn;
        let mut events = Vec::new();
        let mut results = Vec::new();
        for report in link.outbox.drain(..) {
            match report {
                Report::Event(e, abandoned) => {
                    if !results.is_empty() {
                        out.push_back(Event::NodeMessage {
                            conn,
                            message: NodeToHead::Results(std::mem::take(&mut results)),
                        });
                    }
                    events.push(e);
                    for a in abandoned {
                        self.spent.push_back((a, false));
                    }
                }
                Report::Objects(objects) => {
                    for o in &objects {
                        if let ObjectEvent::Dropped { owner, id, .. } = o {
                            self.unsent_drops.remove(&(owner.clone(), *id));
                        }
                    }
                    if !events.is_empty() {
                        out.push_back(Event::NodeMessage {
                            conn,
                            message: NodeToHead::ExecutorEvents(std::mem::take(&mut events)),
                        });
                    }
                    if !results.is_empty() {
                        out.push_back(Event::NodeMessage {
                            conn,
                            message: NodeToHead::Results(std::mem::take(&mut results)),
                        });
                    }
                    out.push_back(Event::NodeMessage {
                        conn,
                        message: NodeToHead::Objects {
                            events: objects,
                            usage: cache_usage(&self.cache),
                        },
                    });
                }
                Report::Result(r, honest) => {
                    if !events.is_empty() {
                        out.push_back(Event::NodeMessage {
                            conn,
                            message: NodeToHead::ExecutorEvents(std::mem::take(&mut events)),
                        });
                    }
                    results.push(r);
                    if let Some(a) = honest {
                        self.spent.push_back((a, true));
                    }
                }
            }
        }
        if !events.is_empty() {
            out.push_back(Event::NodeMessage {
                conn,
                message: NodeToHead::ExecutorEvents(events),
            });
        }
        if !results.is_empty() {
            out.push_back(Event::NodeMessage {
                conn,
                message: NodeToHead::Results(results),
            });
        }
        while self.spent.len() > SPENT_KEPT {
            self.spent.pop_front();
        }
    }

    fn registration(&self) -> NodeRegistration {
        NodeRegistration {
            name: self.name.clone(),
            allocatable: flame_protocol::model::NodeResources {
                cpu_millis: self.cpus * 1000,
                memory_bytes: 1 << 34,
                gpus: Vec::new(),
            },
            labels: Default::default(),
            isolation: flame_protocol::model::Isolation::None,
            identity: flame_protocol::model::ExecutorIdentity::OwnerUid,
            objects: OBJECTS_IN_SIM.then(|| ObjectService {
                port: 7471,
                advertise: None,
                host: self.name.clone(),
                socket: None,
                usage: cache_usage(&self.cache),
            }),
            executors: self
                .executors
                .iter()
                .map(|(id, e)| ExecutorReport {
                    resources: Default::default(),
                    gpus: Vec::new(),
                    executor: *id,
                    application: e.application.clone(),
                    owner: e.owner.clone(),
                    ready: e.told_ready,
                    session: e.told_session,
                    tasks: e.held.iter().copied().collect(),
                    credit: e.credit,
                })
                .collect(),
        }
    }

    /// The connection is gone (from the node's side): unsent frames are lost with it.
    fn drop_link(&mut self, now: u64, reconnect_at: u64) -> Option<ConnId> {
        let link = self.link.take()?;
        self.grant_key = None;
        self.lost_since = Some(now);
        self.reconnect_at = reconnect_at;
        Some(link.conn)
    }

    /// Queued runs of live executors received from the current head: `(executor, task)`.
    fn current_runs(&self, epoch: u64) -> Vec<Assigned> {
        self.executors
            .values()
            .flat_map(|e| e.queue.iter())
            .filter_map(|c| match c {
                ExecCmd::Run(a) if a.epoch == epoch => Some(a.clone()),
                _ => None,
            })
            .collect()
    }

    /// The bytes of `executor`'s object input: its own copy, else one fetched from the
    /// first source that holds it (checking the head's grant, as flame-node does), which
    /// the node keeps and reports. `Err` when neither has it.
    fn resolve(
        &mut self,
        ctx: &mut NodeCtx<'_>,
        executor: ExecutorId,
        session: SessionId,
        object: &ObjectRef,
        sources: Option<&ObjectSources>,
    ) -> Result<Bytes, String> {
        let owner = self
            .executors
            .get(&executor)
            .map(|e| e.owner.clone())
            .ok_or("unknown executor")?;
        let bytes = ctx
            .object_bytes
            .get(&object.id)
            .cloned()
            .ok_or("bytes no client put")?;
        if self.cache.contains_key(&(owner.clone(), object.id)) {
            return Ok(bytes);
        }
        let Some(sources) = sources else {
            return Err(format!(
                "input object {} not here, no sources",
                object.id.short()
            ));
        };
        self.fetch(ctx, &owner, ObjectScope::Session(session), sources)?;
        self.spares.insert((owner, object.id));
        Ok(bytes)
    }

    /// Fetches `sources.object` from the first source that holds it (ground truth).
    fn fetch(
        &mut self,
        ctx: &mut NodeCtx<'_>,
        owner: &str,
        scope: ObjectScope,
        sources: &ObjectSources,
    ) -> Result<(), String> {
        let id = sources.object.id;
        let key = self.grant_key.clone().ok_or("no grant key")?;
        let checked = object_grant::verify(&key, &sources.grant, ctx.now)
            .and_then(|body| object_grant::check_read(body, owner, &id));
        if let Err(e) = checked {
            ctx.violations.push(format!(
                "{} got sources for {owner}'s object {} whose grant fails: {e}",
                self.name,
                id.short()
            ));
            return Err(e.to_string());
        }
        let holds = ctx.truth.get(&(owner.to_string(), id));
        let found = sources
            .endpoints
            .iter()
            .any(|ep| ep.node != self.name && holds.is_some_and(|h| h.contains(&ep.node)));
        if !found {
            return Err(format!("no source of object {} holds it", id.short()));
        }
        self.cache.insert((owner.to_string(), id), scope);
        *ctx.fetches += 1;
        self.pending
            .push_back(Report::Objects(vec![ObjectEvent::Stored {
                owner: owner.to_string(),
                object: sources.object,
                scope,
            }]));
        Ok(())
    }

    /// An output above the head's inline threshold stays here, scoped to its session,
    /// recorded before the result is reported; the result names it.
    fn keep_output(
        &mut self,
        owner: &str,
        session: SessionId,
        outcome: TaskOutcome,
    ) -> TaskOutcome {
        let max = self.inline_max.unwrap_or(u64::MAX);
        match outcome {
            TaskOutcome::Succeeded(out) if OBJECTS_IN_SIM && out.len() as u64 > max => {
                let object = ObjectRef::of(&out);
                let key = (owner.to_string(), object.id);
                self.spares.remove(&key);
                self.cache.insert(key, ObjectScope::Session(session));
                TaskOutcome::Object(object)
            }
            other => other,
        }
    }

    fn object_command(&mut self, ctx: &mut NodeCtx<'_>, command: ObjectCommand) {
        let dropped: Vec<(String, ObjectId)> = match command {
            ObjectCommand::EndSession { owner, session } => self
                .cache
                .iter()
                .filter(|((o, _), scope)| *o == owner && **scope == ObjectScope::Session(session))
                .map(|(k, _)| k.clone())
                .collect(),
            ObjectCommand::Remove { owner, ids } => ids
                .into_iter()
                .map(|id| (owner.clone(), id))
                .filter(|k| self.cache.contains_key(k))
                .collect(),
            ObjectCommand::Replicate {
                owner,
                scope,
                sources,
            } => {
                let key = (owner.clone(), sources.object.id);
                if !self.cache.contains_key(&key) {
                    let _ = self.fetch(ctx, &owner, scope, &sources);
                }
                // A replica the head asked for is pinned, a spare copy there too.
                self.spares.remove(&key);
                Vec::new()
            }
        };
        // As flame-node: every copy that goes is reported.
        if dropped.is_empty() {
            return;
        }
        let events = dropped
            .into_iter()
            .map(|key| {
                self.cache.remove(&key);
                self.spares.remove(&key);
                self.unsent_drops.insert(key.clone());
                ObjectEvent::Dropped {
                    owner: key.0,
                    id: key.1,
                    reason: "its scope ended or it was removed".into(),
                }
            })
            .collect();
        self.pending.push_back(Report::Objects(events));
    }

    /// A client's put reaches this node: checked against the grant, stored, reported.
    /// False when the node cannot take it (not registered: it has no key).
    fn store_put(
        &mut self,
        owner: &str,
        objects: &[ObjectRef],
        grant: &flame_protocol::object::Grant,
        now: u64,
        violations: &mut Vec<String>,
    ) -> bool {
        let Some(key) = self.grant_key.clone() else {
            return false;
        };
        let checked = object_grant::verify(&key, grant, now).and_then(|body| {
            Ok((
                body.owner.clone(),
                object_grant::check_write(body, &self.name)?,
            ))
        });
        let (granted, (scope, bytes_max)) = match checked {
            Ok(ok) => ok,
            Err(e) => {
                violations.push(format!("{}: a put grant fails: {e}", self.name));
                return false;
            }
        };
        let total: u64 = objects.iter().map(|o| o.size).sum();
        if granted != owner || total > bytes_max {
            violations.push(format!(
                "{}: a put grant for {granted} of {bytes_max} bytes, for {owner}'s {total}",
                self.name
            ));
            return false;
        }
        let events = objects
            .iter()
            .map(|o| {
                self.spares.remove(&(owner.to_string(), o.id));
                self.cache.insert((owner.to_string(), o.id), scope);
                ObjectEvent::Stored {
                    owner: owner.to_string(),
                    object: *o,
                    scope,
                }
            })
            .collect();
        self.pending.push_back(Report::Objects(events));
        true
    }
}

/// What a registration reports a cache holds.
fn inventory(cache: &BTreeMap<(String, ObjectId), ObjectScope>) -> Vec<ObjectEvent> {
    cache
        .iter()
        .map(|((owner, id), scope)| ObjectEvent::Stored {
            owner: owner.clone(),
            // Sizes are not tracked: the head keeps the size it first saw.
            object: ObjectRef { id: *id, size: 0 },
            scope: *scope,
        })
        .collect()
}

/// Ground truth: the nodes holding each `(owner, id)`.
fn holders_of(nodes: &[SimNode]) -> BTreeMap<(String, ObjectId), BTreeSet<String>> {
    let mut out: BTreeMap<(String, ObjectId), BTreeSet<String>> = BTreeMap::new();
    for n in nodes {
        for key in n.cache.keys() {
            out.entry(key.clone()).or_default().insert(n.name.clone());
        }
    }
    out
}

fn cache_usage(cache: &BTreeMap<(String, ObjectId), ObjectScope>) -> CacheUsage {
    CacheUsage {
        memory_used: cache.len() as u64,
        memory_capacity: 1 << 30,
        disk_used: 0,
        disk_capacity: 1 << 32,
        objects: cache.len() as u64,
    }
}

// ---------------------------------------------------------------------------------------
// Clients

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientView {
    Open,
    /// A close or cancel is in flight.
    Closing,
    /// A close or cancel failed or its answer was lost: closed or not.
    Unsure,
    Closed,
}

#[derive(Debug)]
struct Batch {
    id: u64,
    inputs: Vec<Bytes>,
    reply: Option<ReplyId>,
    epoch: u64,
    /// Its reply was lost once: its tasks may exist without the client knowing their ids.
    maybe: bool,
    /// Its inputs go as objects (put before).
    objects: bool,
}

#[derive(Debug)]
struct Watcher {
    start: Option<ReplyId>,
    live: crate::watch::WatchSource,
    from_start: bool,
    /// Tasks of the backfill: live duplicates of them are dropped, as `server::watch_stream`
    /// does.
    backfilled: HashSet<TaskId>,
    seen: BTreeSet<TaskId>,
    finished: bool,
    /// Cut by a head restart.
    dead: bool,
}

#[derive(Debug)]
struct SimSession {
    id: SessionId,
    ephemeral: bool,
    view: ClientView,
    close_reply: Option<(ReplyId, u64)>,
    cancel_sent: bool,
    /// The head answered Ok to a close or cancel.
    closed_acked: bool,
    /// A head restart happened during its life.
    restarted: bool,
    /// Ephemeral and gone with a head restart.
    lost: bool,
    acked: BTreeMap<TaskId, Bytes>,
    acked_batches: BTreeMap<u64, (TaskId, u32)>,
    in_flight: Vec<Batch>,
    resend: Vec<Batch>,
    rejected: HashSet<Bytes>,
    wants_watch: bool,
    watcher: Option<Watcher>,
    /// Final results seen anywhere (watchers, the store): they never change.
    finals: BTreeMap<TaskId, (u32, TaskOutcome)>,
    finished: bool,
    /// The first step's end at which the core had it finished (its objects' retention
    /// starts then at the latest).
    finished_at: Option<u64>,
    /// Acked batches whose inputs are objects.
    object_batches: BTreeSet<u64>,
}

impl SimSession {
    /// Inputs whose tasks may exist without the client knowing their ids yet.
    fn maybe_inputs(&self) -> usize {
        self.in_flight
            .iter()
            .chain(self.resend.iter())
            .filter(|b| b.maybe)
            .map(|b| b.inputs.len())
            .sum()
    }
}

#[derive(Debug)]
struct Creating {
    reply: ReplyId,
    ephemeral: bool,
    watch: bool,
}

/// Counts over a run, for the summary line.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub steps: u64,
    pub drain_steps: u64,
    pub sessions: u64,
    pub acked: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
    pub rejected_batches: u64,
    pub restarts: u64,
    pub commit_failures: u64,
    pub storage_faults: u64,
    pub crashes: u64,
    pub disconnects: u64,
    pub partitions: u64,
    pub stale_sent: u64,
    pub resends: u64,
    pub object_puts: u64,
    pub object_runs: u64,
    pub object_outputs: u64,
    pub rebuild_runs: u64,
    /// Object runs that carried sources: the head located the input on another node.
    pub located_runs: u64,
    /// Copies a node fetched from a source the head named (inputs and replicas).
    pub object_fetches: u64,
    /// Pinned copies a node kept through cache pressure.
    pub pins_kept: u64,
    /// Unpinned copies cache pressure dropped.
    pub spares_dropped: u64,
    /// Pins the head released: `EndSession` for a session that had ended.
    pub pins_released: u64,
    /// Objects the book said had no copy left (lost with a node, or dropped).
    pub objects_lost: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.steps += o.steps;
        self.drain_steps += o.drain_steps;
        self.sessions += o.sessions;
        self.acked += o.acked;
        self.succeeded += o.succeeded;
        self.failed += o.failed;
        self.cancelled += o.cancelled;
        self.rejected_batches += o.rejected_batches;
        self.restarts += o.restarts;
        self.commit_failures += o.commit_failures;
        self.storage_faults += o.storage_faults;
        self.crashes += o.crashes;
        self.disconnects += o.disconnects;
        self.partitions += o.partitions;
        self.stale_sent += o.stale_sent;
        self.resends += o.resends;
        self.object_puts += o.object_puts;
        self.object_runs += o.object_runs;
        self.object_outputs += o.object_outputs;
        self.rebuild_runs += o.rebuild_runs;
        self.located_runs += o.located_runs;
        self.object_fetches += o.object_fetches;
        self.pins_kept += o.pins_kept;
        self.spares_dropped += o.spares_dropped;
        self.pins_released += o.pins_released;
        self.objects_lost += o.objects_lost;
    }
}

// ---------------------------------------------------------------------------------------
// The world

struct World {
    seed: u64,
    rng: Rng,
    now: u64,
    step: u64,
    chaos: bool,
    dir: tempfile::TempDir,
    store: Option<Store>,
    core: Core,
    /// Answers the core gave, by id, until a client reads them (the server's `Router`).
    answers: HashMap<ReplyId, Reply>,
    /// Requests the core said it will not answer.
    unanswered: HashSet<ReplyId>,
    next_reply: u64,
    /// The first reply id of this head's life: earlier ones not answered are lost with it.
    epoch_first_reply: u64,
    /// Watch queues waiting on their answer, by its id.
    sinks: HashMap<ReplyId, (SessionId, crate::watch::WatchSink)>,
    /// The watchers attached, per session, as the server holds them.
    watchers: crate::watch::Watchers,
    /// Requests the writer has not committed yet (FIFO), lost with the head.
    writer_queue: VecDeque<StoreRequest>,
    /// What the writer reported (commits done, storage faults and recoveries) that has
    /// not reached the core yet, in order.
    writer_done: VecDeque<Event>,
    /// A storage-fault period: until then every commit fails (`Event::StorageFaulted`
    /// first, as `store::spawn_writer` reports it), then `Event::StorageRecovered`.
    fault_until_ms: Option<u64>,
    /// The current head was told of the fault period.
    fault_reported: bool,
    /// Head lives: bumped by each restart.
    epoch: u64,
    next_tick_ms: u64,
    /// The head did not run for this long before this step: the server's loop tells the
    /// core (`Event::Stalled`) before anything else it handles.
    stalled_ms: Option<u64>,
    next_conn: ConnId,
    next_batch: u64,
    next_input: u64,
    nodes: Vec<SimNode>,
    /// `NodeDisconnected` events the server has yet to deliver: `(at, conn)`.
    late_disconnects: Vec<(u64, ConnId)>,
    creating: Vec<Creating>,
    sessions: BTreeMap<SessionId, SimSession>,
    session_ids: BTreeSet<SessionId>,
    /// The owner of each session a client learnt of.
    session_owners: BTreeMap<SessionId, String>,
    /// Sessions asked for so far: they go to [`OWNERS`] in turn.
    creates: usize,
    launched: BTreeSet<ExecutorId>,
    /// `(session, task, attempt)` that some executor computed.
    honest: HashSet<(SessionId, TaskId, u32)>,
    violations: Vec<String>,
    tracer: Tracer,
    stats: Stats,
    /// The bytes of every object a client put, by id (content addressed).
    object_bytes: HashMap<ObjectId, Bytes>,
    /// Puts waiting for the head's targets: `(reply, session, inputs)`.
    puts: Vec<(ReplyId, SessionId, Vec<Bytes>)>,
    /// Object batches whose put landed, to submit.
    put_done: Vec<(SessionId, Vec<Bytes>)>,
    /// The current head's grant key (from its `Registered` frames).
    grant_key: Option<GrantKey>,
    /// Objects seen with no copy left (`Stats::objects_lost`).
    lost_seen: BTreeSet<(String, ObjectId)>,
}

/// Builds a core from the store's contents, as `flame-head`'s `main` does.
fn boot(store: &Store, now: u64) -> Core {
    let loaded = store.load().expect("the store loads");
    let config = if OBJECTS_IN_SIM {
        CoreConfig {
            object_inline_max: SIM_INLINE_MAX,
            object_retention_ms: SIM_OBJECT_RETENTION_MS,
            ..CoreConfig::default()
        }
    } else {
        CoreConfig::default()
    };
    let mut core = Core::new(config, loaded);
    for spec in applications() {
        core.ensure_application(spec);
    }
    core.start_recovery(now, HEARTBEAT_TIMEOUT_MS);
    core
}

fn temp_dir() -> tempfile::TempDir {
    // tmpfs makes redb's fsync free; the simulation tests logic, not disks.
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new()
            .prefix("flame-sim-")
            .tempdir_in(shm)
        {
            return dir;
        }
    }
    tempfile::Builder::new()
        .prefix("flame-sim-")
        .tempdir()
        .expect("a temporary directory")
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = Rng(seed);
        let dir = temp_dir();
        let store = Store::open(dir.path()).expect("the store opens");
        let now = 1_000_000;
        let core = boot(&store, now);
        let nodes = (0..rng.between(2, 4))
            .map(|i| SimNode {
                name: format!("node-{i}"),
                cpus: rng.between(1, 3) as u32,
                link: None,
                reconnect_at: now,
                lost_since: None,
                silent_until: 0,
                executors: BTreeMap::new(),
                pending: VecDeque::new(),
                spent: VecDeque::new(),
                cache: BTreeMap::new(),
                grant_key: None,
                inline_max: None,
                wiped: false,
                unsent_drops: BTreeSet::new(),
                spares: BTreeSet::new(),
            })
            .collect();
        let mut world = World {
            seed,
            rng,
            now,
            step: 0,
            chaos: true,
            dir,
            store: Some(store),
            core,
            answers: HashMap::new(),
            unanswered: HashSet::new(),
            next_reply: 1,
            epoch_first_reply: 1,
            sinks: HashMap::new(),
            watchers: Default::default(),
            writer_queue: VecDeque::new(),
            writer_done: VecDeque::new(),
            fault_until_ms: None,
            fault_reported: false,
            epoch: 1,
            next_tick_ms: now,
            stalled_ms: None,
            next_conn: 1,
            next_batch: 1,
            next_input: 1,
            nodes,
            late_disconnects: Vec::new(),
            creating: Vec::new(),
            sessions: BTreeMap::new(),
            session_ids: BTreeSet::new(),
            session_owners: BTreeMap::new(),
            creates: 0,
            launched: BTreeSet::new(),
            honest: HashSet::new(),
            violations: Vec::new(),
            tracer: Tracer::new(TRACE_LINES_KEPT),
            stats: Stats::default(),
            object_bytes: HashMap::new(),
            puts: Vec::new(),
            put_done: Vec::new(),
            grant_key: None,
            lost_seen: BTreeSet::new(),
        };
        world.core.handle(Event::Tick, now);
        world.core.end_batch(now);
        world.route_outputs();
        world
    }

    fn store(&self) -> &Store {
        self.store.as_ref().expect("the store is open")
    }

    fn trace(&mut self, line: String) {
        self.tracer.line(line);
    }

    /// Stops the run with everything needed to reproduce and understand it.
    fn fail(&self, what: &str) -> ! {
        let mut report = format!(
            "simulation property violated (seed {}, step {}, t={} ms, head life {}):\n  {what}\n\
             last events (oldest first):\n",
            self.seed, self.step, self.now, self.epoch
        );
        for line in &self.tracer.recent {
            let _ = writeln!(report, "    {line}");
        }
        let _ = write!(
            report,
            "rerun: FLAME_SIM_SEED={} cargo test -p flame-head simulation -- --nocapture",
            self.seed
        );
        panic!("{report}");
    }

    fn check_violations(&mut self) {
        if let Some(v) = self.violations.first() {
            let v = v.clone();
            self.fail(&v);
        }
    }

    /// Routes what the core produced, as the server's `Router` does: answers kept for
    /// the clients (a watcher attached with its answer), watch messages to the watchers,
    /// frames to the node connection they are for, store requests to the writer.
    fn route_outputs(&mut self) {
        let out = self.core.take_outputs();
        if OBJECTS_IN_SIM {
            self.check_dispatch(&out.links);
        }
        for (id, reply) in out.replies {
            if let Some((session, sink)) = self.sinks.remove(&id) {
                if matches!(&reply, Reply::Watch(Ok(start)) if !start.finished) {
                    self.watchers.attach(session, sink);
                }
            }
            self.answers.insert(id, reply);
        }
        self.unanswered.extend(out.unanswered);
        for (session, msg) in out.watch {
            self.watchers.route(session, msg);
        }
        for (conn, output) in out.links {
            let link = self
                .nodes
                .iter_mut()
                .filter_map(|n| n.link.as_mut())
                .find(|l| l.conn == conn);
            // A connection the node dropped takes nothing more.
            let Some(link) = link else { continue };
            match output {
                LinkOutput::Send(frame) => link.inbox.push_back(frame),
                LinkOutput::Close => link.closed_by_head = true,
            }
        }
        self.writer_queue.extend(out.store);
    }

    /// A fresh reply id.
    fn reply_id(&mut self) -> ReplyId {
        self.next_reply += 1;
        ReplyId(self.next_reply - 1)
    }

    /// The answer to `id` as a client's receiver would see it: there, not yet, or never
    /// (the core said so, or the head that had it restarted).
    fn try_answer<T: TryFrom<Reply, Error = Reply>>(
        &mut self,
        id: ReplyId,
    ) -> Result<T, TryRecvError> {
        if let Some(reply) = self.answers.remove(&id) {
            return match T::try_from(reply) {
                Ok(answer) => Ok(answer),
                Err(other) => self.fail(&format!("an answer of another kind: {other:?}")),
            };
        }
        if self.unanswered.remove(&id) || id.0 < self.epoch_first_reply {
            Err(TryRecvError::Closed)
        } else {
            Err(TryRecvError::Empty)
        }
    }

    fn dt(&mut self) -> u64 {
        match self.rng.below(100) {
            0..=69 => self.rng.between(0, 20),
            70..=94 => self.rng.between(20, 200),
            _ => self.rng.between(200, 2_000),
        }
    }

    fn run(&mut self, steps: usize) {
        for _ in 0..steps {
            self.step();
        }
        self.drain();
        self.final_checks();
        self.check_eviction();
        if OBJECTS_IN_SIM {
            self.objects_drained();
        }
    }

    /// Once everything finished and a retention passed, no finished session's object is
    /// left in the book.
    fn objects_drained(&mut self) {
        let until = self.now + SIM_OBJECT_RETENTION_MS + RETENTION_SLACK_MS;
        while self.now <= until {
            self.step();
        }
        for row in self.core.object_book() {
            let ObjectScope::Session(sid) = row.scope else {
                continue;
            };
            if self.sessions.get(&sid).is_some_and(|s| s.finished) {
                self.fail(&format!(
                    "{}'s object {} of s{} is in the book after the drain and a retention: {row:?}",
                    row.owner,
                    row.id.short(),
                    sid.0
                ));
            }
        }
    }

    fn step(&mut self) {
        self.step += 1;
        if self.chaos {
            self.stats.steps += 1;
        } else {
            self.stats.drain_steps += 1;
        }
        let dt = self.dt();
        self.now += dt;
        if self.chaos && self.rng.chance(rate::HEAD_RESTART) {
            self.restart_head();
        }
        if self.chaos {
            self.faults();
        }
        let mut sources: Vec<VecDeque<Event>> = Vec::new();
        sources.push(self.client_ops());
        for i in 0..self.nodes.len() {
            sources.push(self.node_step(i));
        }
        sources.push(self.writer_step());
        let mut server = VecDeque::new();
        let now = self.now;
        self.late_disconnects.retain(|&(at, conn)| {
            if at <= now {
                server.push_back(Event::NodeDisconnected {
                    conn,
                    reason: "connection lost".into(),
                });
                false
            } else {
                true
            }
        });
        sources.push(server);
        if self.now >= self.next_tick_ms {
            self.next_tick_ms = self.now + TICK_MS;
            sources.push(VecDeque::from([Event::Tick]));
        }
        self.check_violations();
        if let Some(stalled_ms) = self.stalled_ms.take() {
            let event = Event::Stalled { stalled_ms };
            self.trace(describe(&event));
            self.core.handle(event, self.now);
        }
        loop {
            let open: Vec<usize> = (0..sources.len())
                .filter(|&i| !sources[i].is_empty())
                .collect();
            if open.is_empty() {
                break;
            }
            let k = open[self.rng.index(open.len())];
            let Some(event) = sources[k].pop_front() else {
                break;
            };
            let line = describe(&event);
            self.trace(line);
            self.core.handle(event, self.now);
        }
        self.core.end_batch(self.now);
        self.check_ledger();
        self.route_outputs();
        self.poll_clients();
        self.check_sessions();
        self.check_owners();
        if OBJECTS_IN_SIM {
            self.check_objects();
        }
        self.check_violations();
    }

    /// Every executor a node holds in a session was launched for that session's owner.
    fn check_owners(&mut self) {
        for n in &self.nodes {
            for (id, e) in &n.executors {
                let Phase::Bound(session) = e.phase else {
                    continue;
                };
                match self.session_owners.get(&session) {
                    Some(owner) if *owner != e.owner => self.violations.push(format!(
                        "executor e{} of {} on {} serves s{}, a session of {owner}",
                        id.0, e.owner, n.name, session.0
                    )),
                    _ => {}
                }
            }
        }
    }

    // --- faults ----------------------------------------------------------------------

    fn faults(&mut self) {
        let now = self.now;
        if self.rng.chance(rate::EXECUTOR_CRASH) {
            let candidates: Vec<(usize, ExecutorId)> = self
                .nodes
                .iter()
                .enumerate()
                .flat_map(|(i, n)| n.executors.keys().map(move |e| (i, *e)))
                .collect();
            if !candidates.is_empty() {
                let (i, e) = candidates[self.rng.index(candidates.len())];
                self.trace(format!("FAULT executor e{} on node-{i} crashes", e.0));
                self.nodes[i].exit(e, "crashed: killed by signal 9");
                self.stats.crashes += 1;
            }
        }
        if self.rng.chance(rate::NODE_DISCONNECT) {
            let i = self.rng.index(self.nodes.len());
            let back = now + self.rng.between(100, 3_000);
            let late = now + self.rng.between(0, 500);
            if let Some(conn) = self.nodes[i].drop_link(now, back) {
                self.trace(format!("FAULT node-{i} loses conn {conn}"));
                self.late_disconnects.push((late, conn));
                self.stats.disconnects += 1;
            }
        }
        if self.rng.chance(rate::NODE_AGENT_KILL) {
            let i = self.rng.index(self.nodes.len());
            let back = now + self.rng.between(200, 3_000);
            let late = now + self.rng.between(0, 500);
            self.trace(format!("FAULT node-{i} agent killed with its executors"));
            let node = &mut self.nodes[i];
            node.executors.clear();
            node.pending.clear();
            if !node.cache.is_empty() {
                node.cache.clear();
                node.spares.clear();
                node.wiped = true;
            }
            if let Some(conn) = node.drop_link(now, back) {
                self.late_disconnects.push((late, conn));
            }
            self.stats.disconnects += 1;
        }
        if OBJECTS_IN_SIM && self.rng.chance(rate::CACHE_PRESSURE) {
            let i = self.rng.index(self.nodes.len());
            self.cache_pressure(i);
        }
        if self.rng.chance(rate::PARTITION) {
            let i = self.rng.index(self.nodes.len());
            let until = now + self.rng.between(1_000, 15_000);
            if self.nodes[i].link.is_some() && self.nodes[i].silent_until <= now {
                self.trace(format!("FAULT node-{i} partitioned until t={until}"));
                self.nodes[i].silent_until = until;
                self.stats.partitions += 1;
            }
        }
        if self.rng.chance(rate::HEAD_PAUSE) {
            let pause = self.rng.between(10_001, 14_000);
            self.trace(format!("FAULT the head pauses for {pause} ms"));
            self.now += pause;
            self.next_tick_ms = self.now;
            self.stalled_ms = Some(pause);
        }
        if self.rng.chance(rate::STALE_RESULT) {
            let i = self.rng.index(self.nodes.len());
            self.inject_stale(i);
        }
        if self.rng.chance(rate::CLIENT_DROP) {
            let ids: Vec<SessionId> = self
                .sessions
                .values()
                .filter(|s| !s.lost && !s.in_flight.is_empty())
                .map(|s| s.id)
                .collect();
            if !ids.is_empty() {
                let id = ids[self.rng.index(ids.len())];
                self.trace(format!("FAULT the submit stream of s{} drops", id.0));
                let s = self.sessions.get_mut(&id).expect("a session");
                for mut b in s.in_flight.drain(..) {
                    b.reply = None;
                    b.maybe = true;
                    s.resend.push(b);
                }
            }
        }
    }

    /// A node sends a result the head must refuse; its output is corrupted so that
    /// recording it would be caught.
    /// Node `i`'s cache is under pressure, as flame-node's is when a put needs room: its
    /// unpinned copies go (each reported `Dropped`), its pinned ones stay.
    fn cache_pressure(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let spares = std::mem::take(&mut node.spares);
        let pinned = node.cache.len().saturating_sub(spares.len());
        self.stats.pins_kept += pinned as u64;
        if spares.is_empty() {
            return;
        }
        self.stats.spares_dropped += spares.len() as u64;
        let events = spares
            .into_iter()
            .map(|key| {
                node.cache.remove(&key);
                node.unsent_drops.insert(key.clone());
                ObjectEvent::Dropped {
                    owner: key.0,
                    id: key.1,
                    reason: "evicted: unpinned, room was needed".into(),
                }
            })
            .collect::<Vec<_>>();
        let line = format!(
            "FAULT {} cache pressure: drops {} spare(s), keeps {pinned} pinned",
            node.name,
            events.len()
        );
        node.pending.push_back(Report::Objects(events));
        self.trace(line);
    }

    fn inject_stale(&mut self, i: usize) {
        let epoch = self.epoch;
        let node = &self.nodes[i];
        let usable = node
            .link
            .as_ref()
            .is_some_and(|l| l.registered && self.now >= node.silent_until);
        if !usable {
            return;
        }
        let spent: Vec<(Assigned, bool)> = node
            .spent
            .iter()
            .filter(|(a, _)| a.epoch == epoch)
            .cloned()
            .collect();
        let runs = node.current_runs(epoch);
        let others: Vec<Assigned> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .flat_map(|(_, n)| n.current_runs(epoch))
            .collect();
        let executors: Vec<ExecutorId> = node.executors.keys().copied().collect();
        let pick = |rng: &mut Rng, v: &[Assigned]| v.get(rng.index(v.len())).cloned();
        let (kind, result) = match self.rng.below(5) {
            0 => {
                let answered: Vec<Assigned> = spent
                    .iter()
                    .filter(|(_, answered)| *answered)
                    .map(|(a, _)| a.clone())
                    .collect();
                let Some(a) = pick(&mut self.rng, &answered) else {
                    return;
                };
                let outcome = app_outcome(&a.input);
                ("duplicate", stale(&a, a.executor, a.attempt, outcome))
            }
            1 => {
                let all: Vec<Assigned> = spent.into_iter().map(|(a, _)| a).collect();
                let Some(a) = pick(&mut self.rng, &all) else {
                    return;
                };
                let outcome = corrupted(&a.input);
                ("old run", stale(&a, a.executor, a.attempt, outcome))
            }
            2 => {
                let Some(a) = pick(&mut self.rng, &runs) else {
                    return;
                };
                let foreign: Vec<ExecutorId> = executors
                    .iter()
                    .copied()
                    .filter(|e| *e != a.executor)
                    .collect();
                let Some(&e) = foreign.get(self.rng.index(foreign.len())) else {
                    return;
                };
                let outcome = corrupted(&a.input);
                ("another executor", stale(&a, e, a.attempt, outcome))
            }
            3 => {
                let older: Vec<Assigned> = runs.into_iter().filter(|a| a.attempt > 1).collect();
                let Some(a) = pick(&mut self.rng, &older) else {
                    return;
                };
                let outcome = corrupted(&a.input);
                (
                    "earlier attempt",
                    stale(&a, a.executor, a.attempt - 1, outcome),
                )
            }
            _ => {
                let Some(a) = pick(&mut self.rng, &others) else {
                    return;
                };
                let outcome = corrupted(&a.input);
                (
                    "another node's task",
                    stale(&a, a.executor, a.attempt, outcome),
                )
            }
        };
        self.trace(format!(
            "FAULT node-{i} sends a stale result ({kind}): e{} s{} t{} a{} {}",
            result.executor.0,
            result.session.0,
            result.task.0,
            result.attempt,
            short_outcome(&result.outcome)
        ));
        self.stats.stale_sent += 1;
        if let Some(link) = self.nodes[i].link.as_mut() {
            link.outbox.push_back(Report::Result(result, None));
        }
    }

    fn restart_head(&mut self) {
        self.trace("FAULT head restart".into());
        self.stats.restarts += 1;
        self.epoch += 1;
        // The process dies: what the writer had not committed is lost, and commits it made
        // are never reported.
        self.writer_queue.clear();
        self.writer_done.clear();
        self.fault_reported = false;
        self.late_disconnects.clear();
        let now = self.now;
        for i in 0..self.nodes.len() {
            let back = now + self.rng.between(100, 3_000);
            self.nodes[i].drop_link(now, back);
        }
        for s in self.sessions.values_mut() {
            s.restarted = true;
            // The new head may finish it again later (its end was not durable), and its
            // objects' retention starts from that end.
            s.finished_at = None;
            if s.ephemeral {
                s.lost = true;
            }
            if let Some(w) = s.watcher.as_mut() {
                if !w.finished {
                    w.dead = true;
                    // Clients resume watching; an ephemeral session is gone.
                    s.wants_watch = !s.ephemeral;
                }
            }
        }
        // Reopen the file and rebuild the core from it, as a new process would.
        self.store = None;
        let store = Store::open(self.dir.path()).expect("the store reopens");
        self.core = boot(&store, now);
        self.store = Some(store);
        // The server goes with the head: its answers not given, its watchers.
        self.epoch_first_reply = self.next_reply;
        self.sinks.clear();
        self.watchers = Default::default();
        self.core.handle(Event::Tick, now);
        self.core.end_batch(now);
        self.route_outputs();
    }

    // --- the store writer ------------------------------------------------------------

    fn writer_step(&mut self) -> VecDeque<Event> {
        let mut out = VecDeque::new();
        if self.fault_until_ms.is_some_and(|until| self.now >= until) {
            // The probe write succeeds.
            self.fault_until_ms = None;
            if std::mem::take(&mut self.fault_reported) {
                self.trace("storage recovered".into());
                self.writer_done.push_back(Event::StorageRecovered);
            }
        }
        if self.chaos
            && self.fault_until_ms.is_none()
            && !self.writer_queue.is_empty()
            && self.rng.chance(rate::STORAGE_FAULT)
        {
            let until = self.now + self.rng.between(200, 5_000);
            self.trace(format!("FAULT storage until {until}"));
            self.stats.storage_faults += 1;
            self.fault_until_ms = Some(until);
        }
        if !self.writer_queue.is_empty() && self.rng.chance(500) {
            let mut ops = Vec::new();
            let mut tokens = Vec::new();
            for req in self.writer_queue.drain(..) {
                ops.extend(req.ops);
                tokens.push(req.token);
            }
            let result = if self.fault_until_ms.is_some() {
                let fault = crate::storage_fault::StorageFault {
                    kind: crate::storage_fault::FaultKind::DiskFull,
                    detail: "injected: no space left on device".into(),
                    data_dir: self.dir.path().to_path_buf(),
                };
                if !std::mem::replace(&mut self.fault_reported, true) {
                    self.writer_done.push_back(Event::StorageFaulted {
                        fault: fault.clone(),
                    });
                }
                Err(CommitError::Faulted(fault))
            } else if self.chaos && self.rng.chance(rate::COMMIT_FAILURE) {
                self.stats.commit_failures += 1;
                Err(CommitError::Faulted(crate::storage_fault::StorageFault {
                    kind: crate::storage_fault::FaultKind::DiskFull,
                    detail: "injected: no space left on device".into(),
                    data_dir: self.dir.path().to_path_buf(),
                }))
            } else {
                match self.store().commit(&ops) {
                    Ok(()) => Ok(()),
                    Err(e) => self.fail(&format!("a real commit failed: {e}")),
                }
            };
            self.writer_done
                .push_back(Event::Committed { tokens, result });
        }
        while !self.writer_done.is_empty() && self.rng.chance(700) {
            if let Some(event) = self.writer_done.pop_front() {
                out.push_back(event);
            }
        }
        out
    }

    // --- nodes -----------------------------------------------------------------------

    fn node_step(&mut self, i: usize) -> VecDeque<Event> {
        let mut out = VecDeque::new();
        let now = self.now;
        let World {
            rng,
            nodes,
            honest,
            launched,
            violations,
            tracer,
            epoch,
            chaos,
            next_conn,
            late_disconnects,
            object_bytes,
            stats,
            ..
        } = self;
        let truth = holders_of(nodes);
        let node = &mut nodes[i];
        let mut ctx = NodeCtx {
            rng,
            now,
            epoch: *epoch,
            chaos: *chaos,
            honest,
            launched,
            violations,
            tracer,
            truth: &truth,
            object_bytes,
            fetches: &mut stats.object_fetches,
        };
        if node.link.is_none() {
            let away = node.lost_since.map_or(0, |t| now.saturating_sub(t));
            if away >= HEAD_LOSS_GRACE_MS && !node.executors.is_empty() {
                ctx.tracer
                    .line(format!("{} stops its executors: head away", node.name));
                node.executors.clear();
                node.pending.clear();
            }
            // Connecting needs the network: not while partitioned.
            if now >= node.reconnect_at && now >= node.silent_until {
                let conn = *next_conn;
                *next_conn += 1;
                // The head handles this registration within the step: it forgets what it
                // thought the node held before.
                node.wiped = false;
                node.unsent_drops.clear();
                out.push_back(Event::NodeConnected {
                    address: "127.0.0.1".into(),
                    conn,
                    registration: node.registration(),
                });
                node.link = Some(NodeLink {
                    conn,
                    inbox: VecDeque::new(),
                    closed_by_head: false,
                    registered: false,
                    outbox: VecDeque::new(),
                    last_heartbeat_ms: now,
                    last_heard_ms: now,
                });
            }
        }
        node.run_executors(&mut ctx);
        let deaf = node.link.as_ref().is_some_and(|l| {
            l.registered && now.saturating_sub(l.last_heard_ms) > HEAD_SILENCE_MAX_MS
        });
        if deaf {
            // The head has been silent too long (a partition, most likely): the node drops
            // the connection; the server notices once the network lets it.
            let back = now + ctx.rng.between(200, 2_000);
            let noticed = now.max(node.silent_until) + ctx.rng.between(0, 500);
            if let Some(conn) = node.drop_link(now, back) {
                ctx.tracer.line(format!(
                    "{} hears nothing on conn {conn}, drops it",
                    node.name
                ));
                late_disconnects.push((noticed, conn));
            }
        }
        if node.link.is_none() {
            return out;
        }
        node.hand_to_link();
        if now < node.silent_until {
            return out;
        }
        // Commands from the head, in order.
        let mut closed = false;
        let mut commands = Vec::new();
        if let Some(link) = node.link.as_mut() {
            while let Some(frame) = link.inbox.pop_front() {
                match frame {
                    HeadToNode::Registered {
                        grant_key,
                        inline_max,
                        ..
                    } => {
                        link.registered = true;
                        link.last_heard_ms = now;
                        if OBJECTS_IN_SIM {
                            node.grant_key = Some(grant_key);
                            node.inline_max = Some(inline_max);
                            // What it holds, after Register, as flame-node does.
                            let held = inventory(&node.cache);
                            if !held.is_empty() {
                                node.pending.push_front(Report::Objects(held));
                            }
                        }
                    }
                    HeadToNode::Commands(c) => {
                        link.last_heard_ms = now;
                        commands.extend(c);
                    }
                    HeadToNode::Heartbeat => link.last_heard_ms = now,
                    HeadToNode::Refused { reason } => ctx
                        .violations
                        .push(format!("{} was refused: {reason}", node.name)),
                }
            }
            closed = link.closed_by_head;
        }
        for c in commands {
            node.apply(&mut ctx, c);
        }
        node.run_executors(&mut ctx);
        node.hand_to_link();
        let registered = node.link.as_ref().is_some_and(|l| l.registered);
        if registered && (closed || ctx.rng.chance(800)) {
            node.flush(&mut out);
        }
        if let Some(link) = node.link.as_mut() {
            if registered && now.saturating_sub(link.last_heartbeat_ms) >= HEARTBEAT_MS {
                link.last_heartbeat_ms = now;
                out.push_back(Event::NodeMessage {
                    conn: link.conn,
                    message: NodeToHead::Heartbeat,
                });
            }
        }
        if closed {
            // The head dropped this connection (it declared the node lost); the server
            // reports the end of the connection, and the node comes back.
            let back = now + ctx.rng.between(200, 2_000);
            if let Some(conn) = node.drop_link(now, back) {
                ctx.tracer
                    .line(format!("{} sees conn {conn} closed by the head", node.name));
                late_disconnects.push((now, conn));
            }
        }
        out
    }

    // --- clients ---------------------------------------------------------------------

    /// A watch request for each session whose client wants to watch it.
    fn watch_requests(&mut self, out: &mut VecDeque<Event>) {
        let ids: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| s.wants_watch && !s.lost)
            .map(|s| s.id)
            .collect();
        for id in ids {
            let (sink, live) = crate::watch::watch_queue();
            let reply = self.reply_id();
            self.sinks.insert(reply, (id, sink));
            let s = self.sessions.get_mut(&id).expect("a session");
            let from_start = s.watcher.is_none() && !s.restarted;
            s.wants_watch = false;
            s.watcher = Some(Watcher {
                start: Some(reply),
                live,
                from_start,
                backfilled: HashSet::new(),
                seen: BTreeSet::new(),
                finished: false,
                dead: false,
            });
            out.push_back(Event::Request {
                reply,
                request: Request::Watch { session: id },
            });
        }
    }

    /// Batches whose reply was lost go again, with the same id.
    fn resend_requests(&mut self, out: &mut VecDeque<Event>) {
        let ids: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| !s.resend.is_empty() && !s.lost)
            .map(|s| s.id)
            .collect();
        for id in ids {
            if self.chaos && !self.rng.chance(300) {
                continue;
            }
            let epoch = self.epoch;
            let s = self.sessions.get_mut(&id).expect("a session");
            for mut b in std::mem::take(&mut s.resend) {
                let reply = ReplyId(self.next_reply);
                self.next_reply += 1;
                b.reply = Some(reply);
                b.epoch = epoch;
                out.push_back(Event::Request {
                    reply,
                    request: Request::Submit {
                        session: id,
                        batch_id: b.id,
                        inputs: payloads(&b.inputs, b.objects),
                    },
                });
                s.in_flight.push(b);
                self.stats.resends += 1;
            }
        }
    }

    /// Now and then a new batch for an open session, and a copy of one already acked.
    fn submit_requests(&mut self, open: &[SessionId], out: &mut VecDeque<Event>) {
        if !open.is_empty() && self.rng.chance(rate::SUBMIT) {
            let id = open[self.rng.index(open.len())];
            let n = self.rng.between(1, 6);
            let mut inputs = Vec::new();
            for _ in 0..n {
                let bad = self.rng.chance(rate::BAD_INPUT);
                let noise = self.rng.below(1 << 20);
                let big = OBJECTS_IN_SIM && self.rng.chance(rate::BIG_INPUT);
                let input = format!(
                    "{}s{}-i{}-{noise:x}{}",
                    if bad { "!" } else { "" },
                    id.0,
                    self.next_input,
                    if big { "................" } else { "" }
                );
                self.next_input += 1;
                inputs.push(Bytes::from(input));
            }
            if OBJECTS_IN_SIM && self.rng.chance(rate::OBJECT_BATCH) {
                self.put_objects(id, inputs, out);
            } else {
                self.submit_batch(id, inputs, false, out);
            }
        }
        self.resend_acked(open, out);
    }

    /// A new batch for session `id`.
    fn submit_batch(
        &mut self,
        id: SessionId,
        inputs: Vec<Bytes>,
        objects: bool,
        out: &mut VecDeque<Event>,
    ) {
        {
            let batch_id = self.next_batch;
            self.next_batch += 1;
            let reply = self.reply_id();
            out.push_back(Event::Request {
                reply,
                request: Request::Submit {
                    session: id,
                    batch_id,
                    inputs: payloads(&inputs, objects),
                },
            });
            let epoch = self.epoch;
            self.sessions
                .get_mut(&id)
                .expect("a session")
                .in_flight
                .push(Batch {
                    id: batch_id,
                    inputs,
                    reply: Some(reply),
                    epoch,
                    maybe: false,
                    objects,
                });
        }
    }

    /// The client puts a batch's inputs as objects of session `id` first.
    fn put_objects(&mut self, id: SessionId, inputs: Vec<Bytes>, out: &mut VecDeque<Event>) {
        let Some(owner) = self.session_owners.get(&id).cloned() else {
            return;
        };
        let objects: Vec<ObjectRef> = inputs.iter().map(|b| ObjectRef::of(b)).collect();
        for b in &inputs {
            self.object_bytes.insert(ObjectRef::of(b).id, b.clone());
        }
        let replicas = if self.rng.chance(250) { 2 } else { 1 };
        let reply = self.reply_id();
        out.push_back(Event::Request {
            reply,
            request: Request::Client(ClientRequest::PutObjects {
                owner,
                session: Some(id),
                objects,
                replicas,
            }),
        });
        self.puts.push((reply, id, inputs));
    }

    /// A copy of a batch already acked, sent again.
    fn resend_acked(&mut self, open: &[SessionId], out: &mut VecDeque<Event>) {
        if !open.is_empty() && self.rng.chance(rate::RESEND_ACKED) {
            // A duplicate of a batch already acked must get the same ids, nothing new.
            let id = open[self.rng.index(open.len())];
            let s = &self.sessions[&id];
            if let Some((&batch_id, &(first, count))) = s
                .acked_batches
                .iter()
                .nth(self.rng.index(s.acked_batches.len().max(1)))
            {
                let inputs: Vec<Bytes> = (0..u64::from(count))
                    .map(|k| s.acked[&TaskId(first.0 + k)].clone())
                    .collect();
                let objects = s.object_batches.contains(&batch_id);
                let reply = self.reply_id();
                out.push_back(Event::Request {
                    reply,
                    request: Request::Submit {
                        session: id,
                        batch_id,
                        inputs: payloads(&inputs, objects),
                    },
                });
                let epoch = self.epoch;
                self.sessions
                    .get_mut(&id)
                    .expect("a session")
                    .in_flight
                    .push(Batch {
                        id: batch_id,
                        inputs,
                        reply: Some(reply),
                        epoch,
                        maybe: false,
                        objects,
                    });
            }
        }
    }

    fn client_ops(&mut self) -> VecDeque<Event> {
        let mut out = VecDeque::new();
        // Watchers first, so that they see everything submitted after them.
        self.watch_requests(&mut out);
        self.resend_requests(&mut out);
        if !self.chaos {
            // Draining: close everything that is not known closed.
            for s in self.sessions.values_mut() {
                if s.lost || !matches!(s.view, ClientView::Open | ClientView::Unsure) {
                    continue;
                }
                let reply = ReplyId(self.next_reply);
                self.next_reply += 1;
                s.close_reply = Some((reply, self.epoch));
                s.view = ClientView::Closing;
                out.push_back(Event::Request {
                    reply,
                    request: Request::Client(ClientRequest::CloseSession { id: s.id }),
                });
            }
            return out;
        }
        let open: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| !s.lost && s.view == ClientView::Open)
            .map(|s| s.id)
            .collect();
        if open.len() + self.creating.len() < 4 && self.rng.chance(rate::CREATE_SESSION) {
            let ephemeral = self.rng.chance(250);
            let app = APPS[self.rng.index(APPS.len())];
            let watch = self.rng.chance(750);
            let reply = self.reply_id();
            self.creating.push(Creating {
                reply,
                ephemeral,
                watch,
            });
            let owner = OWNERS[self.creates % OWNERS.len()];
            self.creates += 1;
            out.push_back(Event::Request {
                reply,
                request: Request::Client(ClientRequest::CreateSession(SessionSpec {
                    application: app.into(),
                    common_data: Bytes::from_static(b"common").into(),
                    ephemeral,
                    owner: owner.into(),
                    priority: 0,
                    job: None,
                })),
            });
        }
        for (id, inputs) in std::mem::take(&mut self.put_done) {
            if open.contains(&id) {
                self.submit_batch(id, inputs, true, &mut out);
            }
        }
        self.submit_requests(&open, &mut out);
        let closable: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| !s.lost && matches!(s.view, ClientView::Open | ClientView::Unsure))
            .map(|s| s.id)
            .collect();
        if !closable.is_empty() && self.rng.chance(rate::CLOSE_SESSION) {
            let id = closable[self.rng.index(closable.len())];
            let reply = self.reply_id();
            let s = self.sessions.get_mut(&id).expect("a session");
            s.close_reply = Some((reply, self.epoch));
            s.view = ClientView::Closing;
            out.push_back(Event::Request {
                reply,
                request: Request::Client(ClientRequest::CloseSession { id }),
            });
        }
        let cancellable: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| !s.lost && !s.finished && s.view != ClientView::Closing)
            .map(|s| s.id)
            .collect();
        if !cancellable.is_empty() && self.rng.chance(rate::CANCEL_SESSION) {
            let id = cancellable[self.rng.index(cancellable.len())];
            let reply = self.reply_id();
            let s = self.sessions.get_mut(&id).expect("a session");
            s.close_reply = Some((reply, self.epoch));
            s.view = ClientView::Closing;
            s.cancel_sent = true;
            out.push_back(Event::Request {
                reply,
                request: Request::Client(ClientRequest::CancelSession { id }),
            });
        }
        out
    }

    fn poll_clients(&mut self) {
        let epoch = self.epoch;
        // Session creations.
        let mut still = Vec::new();
        for c in std::mem::take(&mut self.creating) {
            match self.try_answer(c.reply) {
                Ok(ClientResponse::Session(info)) => self.add_session(&info, c.ephemeral, c.watch),
                Ok(ClientResponse::Error(_)) => {}
                Ok(other) => self.fail(&format!("CreateSession answered {other:?}")),
                Err(TryRecvError::Empty) => still.push(c),
                // Lost with a head restart; the session may exist unknown to anyone.
                Err(TryRecvError::Closed) => {}
            }
        }
        self.creating = still;
        self.poll_puts();
        let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
        for id in ids {
            self.poll_session(id, epoch);
        }
    }

    /// Puts the head answered: the client sends the bytes to each target node (which
    /// checks the grant); once one holds them, the batch goes with object inputs.
    fn poll_puts(&mut self) {
        for (reply, id, inputs) in std::mem::take(&mut self.puts) {
            let targets = match self.try_answer::<ClientResponse>(reply) {
                Ok(ClientResponse::ObjectTargets(targets)) => targets,
                Ok(ClientResponse::Error(_)) | Err(TryRecvError::Closed) => continue,
                Ok(other) => self.fail(&format!("PutObjects answered {other:?}")),
                Err(TryRecvError::Empty) => {
                    self.puts.push((reply, id, inputs));
                    continue;
                }
            };
            let Some(owner) = self.session_owners.get(&id).cloned() else {
                continue;
            };
            let objects: Vec<ObjectRef> = inputs.iter().map(|b| ObjectRef::of(b)).collect();
            let mut stored = false;
            let now = self.now;
            for t in targets {
                let Some(node) = self.nodes.iter_mut().find(|n| n.name == t.endpoint.node) else {
                    self.fail(&format!("a put target names no node: {:?}", t.endpoint));
                };
                // The object port needs the network: not while partitioned.
                if now < node.silent_until {
                    continue;
                }
                if node.store_put(&owner, &objects, &t.grant, now, &mut self.violations) {
                    self.tracer.line(format!(
                        "client: put {} object(s) of s{} on {}",
                        objects.len(),
                        id.0,
                        node.name
                    ));
                    stored = true;
                }
            }
            if stored {
                self.stats.object_puts += 1;
                self.put_done.push((id, inputs));
            }
        }
    }

    fn add_session(&mut self, info: &SessionInfo, ephemeral: bool, watch: bool) {
        if !self.session_ids.insert(info.id) {
            self.fail(&format!(
                "session id {} was handed out a second time (ephemeral: {ephemeral}); \
                 a client of the earlier session would now reach this one",
                info.id.0
            ));
        }
        self.trace(format!("client: session s{} created", info.id.0));
        self.session_owners.insert(info.id, info.owner.clone());
        self.stats.sessions += 1;
        self.sessions.insert(
            info.id,
            SimSession {
                id: info.id,
                ephemeral,
                view: ClientView::Open,
                close_reply: None,
                cancel_sent: false,
                closed_acked: false,
                restarted: false,
                lost: false,
                acked: BTreeMap::new(),
                acked_batches: BTreeMap::new(),
                in_flight: Vec::new(),
                resend: Vec::new(),
                rejected: HashSet::new(),
                wants_watch: watch,
                watcher: None,
                finals: BTreeMap::new(),
                finished: false,
                finished_at: None,
                object_batches: BTreeSet::new(),
            },
        );
    }

    fn poll_session(&mut self, id: SessionId, epoch: u64) {
        let store = self.store().clone();
        let mut s = self.sessions.remove(&id).expect("a session");
        let mut problems = Vec::new();
        // Submit replies.
        let mut keep = Vec::new();
        for mut b in std::mem::take(&mut s.in_flight) {
            let Some(rx) = b.reply else {
                continue;
            };
            // As the server does: a refused resend of a batch the store has is acked.
            match self.try_answer(rx).map(|r| store.settle_refused(id, r)) {
                Ok(SubmitReply::Accepted {
                    batch_id,
                    first_task,
                    count,
                }) => {
                    if batch_id != b.id || count as usize != b.inputs.len() {
                        problems.push(format!(
                            "batch {} of {} inputs answered as batch {batch_id} of {count}",
                            b.id,
                            b.inputs.len()
                        ));
                    }
                    if let Some(&prev) = s.acked_batches.get(&b.id) {
                        if prev != (first_task, count) {
                            problems.push(format!(
                                "batch {} acked twice with different ids: {prev:?} then {:?}",
                                b.id,
                                (first_task, count)
                            ));
                        }
                    }
                    for (k, input) in b.inputs.iter().enumerate() {
                        let task = TaskId(first_task.0 + k as u64);
                        if let Some(prev) = s.acked.insert(task, input.clone()) {
                            if prev != input {
                                problems.push(format!(
                                    "task {} acked for two different inputs (batch {})",
                                    task.0, b.id
                                ));
                            }
                        }
                    }
                    if b.objects {
                        s.object_batches.insert(b.id);
                    }
                    if s.acked_batches.insert(b.id, (first_task, count)).is_none() {
                        self.stats.acked += u64::from(count);
                    }
                }
                Ok(SubmitReply::Rejected { .. }) => {
                    if s.acked_batches.contains_key(&b.id) {
                        problems.push(format!("batch {} was acked, then refused", b.id));
                    }
                    self.stats.rejected_batches += 1;
                    s.rejected.extend(b.inputs.iter().cloned());
                }
                Err(TryRecvError::Empty) => keep.push(b),
                Err(TryRecvError::Closed) => {
                    if b.epoch == epoch {
                        problems.push(format!(
                            "the reply to batch {} was dropped without a head restart",
                            b.id
                        ));
                    }
                    b.reply = None;
                    b.maybe = true;
                    s.resend.push(b);
                }
            }
        }
        s.in_flight = keep;
        // Close and cancel replies.
        if let Some((rx, sent_in)) = s.close_reply.take() {
            match self.try_answer(rx) {
                Ok(ClientResponse::Ok) => {
                    s.view = ClientView::Closed;
                    s.closed_acked = true;
                }
                Ok(ClientResponse::Error(_)) => s.view = ClientView::Unsure,
                Ok(other) => problems.push(format!("close answered {other:?}")),
                Err(TryRecvError::Empty) => s.close_reply = Some((rx, sent_in)),
                Err(TryRecvError::Closed) => {
                    if sent_in == epoch {
                        problems.push("a close reply was dropped without a restart".into());
                    }
                    s.view = ClientView::Unsure;
                }
            }
        }
        // Watch stream.
        if let Some(mut w) = s.watcher.take() {
            if !w.dead {
                self.poll_watcher(&mut s, &mut w, &mut problems);
            }
            s.watcher = Some(w);
        }
        self.sessions.insert(id, s);
        if let Some(p) = problems.first() {
            self.fail(&format!("session s{}: {p}", id.0));
        }
    }

    fn poll_watcher(&mut self, s: &mut SimSession, w: &mut Watcher, problems: &mut Vec<String>) {
        if let Some(start) = w.start.take() {
            match self.try_answer::<Result<WatchStart, ApiError>>(start) {
                Ok(Ok(ws)) => {
                    let backfill = match ws.backfill {
                        Backfill::Memory(v) => v,
                        Backfill::Store => match self.store().final_results(s.id) {
                            Ok(rows) => rows,
                            Err(e) => {
                                problems.push(format!("the store cannot list results: {e}"));
                                Vec::new()
                            }
                        },
                    };
                    if w.from_start && !backfill.is_empty() {
                        problems.push(format!(
                            "a watcher attached at creation got a backfill of {} results",
                            backfill.len()
                        ));
                    }
                    for r in backfill {
                        w.backfilled.insert(r.task);
                        self.deliver(s, w, &r, problems);
                    }
                    if ws.finished {
                        w.finished = true;
                    }
                }
                Ok(Err(e)) => problems.push(format!("watching failed: {e:?}")),
                Err(_) => problems.push("a watch request got no answer".into()),
            }
        }
        loop {
            match w.live.try_recv() {
                Ok(WatchMsg::Results(results)) => {
                    if w.finished {
                        problems.push("results after Finished on a watch stream".into());
                    }
                    for r in results {
                        if !w.backfilled.contains(&r.task) {
                            self.deliver(s, w, &r, problems);
                        }
                    }
                }
                Ok(WatchMsg::Finished) => {
                    w.finished = true;
                    // Everything acked must be there: exactly once for a watcher that saw
                    // the whole life of the session, at least once otherwise.
                    let missing: Vec<u64> = s
                        .acked
                        .keys()
                        .filter(|t| !w.seen.contains(t))
                        .map(|t| t.0)
                        .collect();
                    if !missing.is_empty() {
                        problems.push(format!(
                            "the watch stream finished without the results of acked tasks {missing:?}"
                        ));
                    }
                    if w.from_start && !s.restarted && s.maybe_inputs() == 0 {
                        let extra: Vec<u64> = w
                            .seen
                            .iter()
                            .filter(|t| !s.acked.contains_key(t))
                            .map(|t| t.0)
                            .collect();
                        if !extra.is_empty() {
                            problems.push(format!(
                                "the watch stream delivered tasks never acked: {extra:?}"
                            ));
                        }
                    }
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    if !w.finished {
                        problems.push("the watch stream ended without Finished".into());
                    }
                    break;
                }
            }
        }
    }

    fn deliver(
        &mut self,
        s: &mut SimSession,
        w: &mut Watcher,
        r: &TaskResult,
        problems: &mut Vec<String>,
    ) {
        if !w.seen.insert(r.task) {
            problems.push(format!(
                "the watch stream delivered task {} twice",
                r.task.0
            ));
        }
        self.check_final(s, r.task, r.attempt, &r.outcome, "watch stream", problems);
        // Nothing is shown that was not committed.
        if !s.ephemeral {
            let after = TaskId(r.task.0.saturating_sub(1));
            let durable = self.store().list_tasks(s.id, &[], after, 1);
            let final_there = durable.as_ref().is_ok_and(|t| {
                t.first()
                    .is_some_and(|t| t.task == r.task && t.state.is_final())
            });
            if !final_there {
                problems.push(format!(
                    "the watch stream showed task {} before its result was durable ({durable:?})",
                    r.task.0
                ));
            }
        }
    }

    /// A final result, wherever it was seen: it must be what the application computes for
    /// the task's input, from an attempt an executor ran, and never change.
    fn check_final(
        &mut self,
        s: &mut SimSession,
        task: TaskId,
        attempt: u32,
        outcome: &TaskOutcome,
        source: &str,
        problems: &mut Vec<String>,
    ) {
        let input = s.acked.get(&task);
        if input.is_none() && !s.restarted && s.maybe_inputs() == 0 {
            problems.push(format!(
                "{source}: a final result for task {} that was never acked",
                task.0
            ));
        }
        let honest = self.honest.contains(&(s.id, task, attempt));
        match outcome {
            TaskOutcome::Succeeded(out) => {
                if out.first() == Some(&STALE_MARK) {
                    problems.push(format!(
                        "{source}: task {} attempt {attempt} recorded a stale, corrupted result",
                        task.0
                    ));
                }
                let from = reversed(out);
                if s.rejected.contains(&from) {
                    problems.push(format!(
                        "{source}: task {} ran the input of a refused batch",
                        task.0
                    ));
                }
                if let Some(input) = input {
                    if *out != reversed(input) {
                        problems.push(format!(
                            "{source}: task {} recorded {out:?}, not the output of its input {input:?}",
                            task.0
                        ));
                    }
                }
                if from.first() == Some(&b'!') {
                    problems.push(format!(
                        "{source}: task {} succeeded on an input the application refuses",
                        task.0
                    ));
                }
                if !honest {
                    problems.push(format!(
                        "{source}: task {} recorded a result for attempt {attempt}, which no executor ran",
                        task.0
                    ));
                }
            }
            TaskOutcome::Failed(m) if m == APP_ERROR => {
                if input.is_some_and(|i| i.first() != Some(&b'!')) {
                    problems.push(format!(
                        "{source}: task {} failed with the application's error on a good input",
                        task.0
                    ));
                }
                if !honest {
                    problems.push(format!(
                        "{source}: task {} recorded an error for attempt {attempt}, which no executor ran",
                        task.0
                    ));
                }
            }
            TaskOutcome::Failed(_) => {}
            TaskOutcome::Object(o) => {
                if let Some(input) = input {
                    if *o != ObjectRef::of(&reversed(input)) || !OBJECTS_IN_SIM {
                        problems.push(format!(
                            "{source}: task {} recorded object {o:?}, not the output of its input {input:?}",
                            task.0
                        ));
                    }
                }
                if !honest {
                    problems.push(format!(
                        "{source}: task {} recorded an object for attempt {attempt}, which no executor ran",
                        task.0
                    ));
                }
            }
            TaskOutcome::Cancelled => {
                if !s.cancel_sent {
                    problems.push(format!(
                        "{source}: task {} cancelled in a session nobody cancelled",
                        task.0
                    ));
                }
            }
        }
        match s.finals.get(&task) {
            Some((a, o)) if (*a, o) != (attempt, outcome) => problems.push(format!(
                "{source}: task {} has two final results: attempt {a} {} and attempt {attempt} {}",
                task.0,
                short_outcome(o),
                short_outcome(outcome)
            )),
            Some(_) => {}
            None => {
                s.finals.insert(task, (attempt, outcome.clone()));
            }
        }
    }

    // --- properties ------------------------------------------------------------------

    fn ask(&mut self, request: ClientRequest) -> ClientResponse {
        let reply = self.reply_id();
        let request = Request::Client(request);
        self.core
            .handle(Event::Request { reply, request }, self.now);
        self.route_outputs();
        self.try_answer(reply)
            .expect("a read-only request is answered at once")
    }

    fn list_tasks(&mut self, session: SessionId) -> Result<Option<Vec<TaskInfo>>, ApiError> {
        let reply = self.reply_id();
        let request = Request::ListTasks {
            session,
            states: Vec::new(),
            after: TaskId(0),
            limit: u32::MAX,
        };
        self.core
            .handle(Event::Request { reply, request }, self.now);
        self.route_outputs();
        self.try_answer(reply)
            .expect("ListTasks is answered at once")
    }

    /// A session's view as the server serves it: from the core, or from the store once
    /// it finished and left memory. `None` for a finished ephemeral session that left
    /// memory (it has no store), which only a session seen finished may do.
    fn session_info(&mut self, id: SessionId) -> Option<SessionInfo> {
        match self.ask(ClientRequest::GetSession { id }) {
            ClientResponse::Session(info) => Some(info),
            ClientResponse::Error(e) if e.kind == flame_protocol::model::ErrorKind::NotFound => {
                match self.store().finished_session(id) {
                    Ok(Some(info)) => Some(info),
                    Ok(None)
                        if self
                            .sessions
                            .get(&id)
                            .is_some_and(|s| s.ephemeral && s.finished) =>
                    {
                        None
                    }
                    Ok(None) => self.fail(&format!(
                        "s{} is neither in the head's memory nor finished in the store: {e}",
                        id.0
                    )),
                    Err(e) => self.fail(&format!("the store cannot read s{}: {e}", id.0)),
                }
            }
            other => self.fail(&format!("GetSession s{} answered {other:?}", id.0)),
        }
    }

    /// Every `Run` whose input is an object runs where a copy is, or carries sources that
    /// name only nodes the book has for it, with a grant that reads that owner's object.
    fn check_dispatch(&mut self, links: &[(ConnId, LinkOutput)]) {
        for (_, output) in links {
            if let LinkOutput::Send(HeadToNode::Registered { grant_key, .. }) = output {
                self.grant_key = Some(grant_key.clone());
            }
        }
        let mut book = None;
        let mut ends = Vec::new();
        for (conn, output) in links {
            let LinkOutput::Send(HeadToNode::Commands(commands)) = output else {
                continue;
            };
            let Some(node) = self
                .nodes
                .iter()
                .find(|n| n.link.as_ref().is_some_and(|l| l.conn == *conn))
            else {
                continue;
            };
            for c in commands {
                if let NodeCommand::Objects(ObjectCommand::EndSession { owner, session }) = c {
                    ends.push((node.name.clone(), owner.clone(), *session));
                    continue;
                }
                let NodeCommand::Run(a) = c else { continue };
                // A run of a task whose final result was seen: a lineage re-run.
                if self
                    .sessions
                    .get(&a.session)
                    .is_some_and(|s| s.finals.contains_key(&a.task))
                {
                    self.stats.rebuild_runs += 1;
                }
                let Payload::Object(object) = &a.input else {
                    continue;
                };
                let Some(owner) = self.session_owners.get(&a.session) else {
                    continue;
                };
                self.stats.object_runs += 1;
                let book = book.get_or_insert_with(|| self.core.object_book());
                let row = book.iter().find(|r| r.owner == *owner && r.id == object.id);
                let known = |n: &str| {
                    row.is_some_and(|r| r.holders.iter().chain(&r.expected).any(|h| h == n))
                };
                let problem = match &a.sources {
                    None => {
                        let elsewhere = row.is_some_and(|r| {
                            r.holders.iter().chain(&r.expected).any(|h| *h != node.name)
                        });
                        (elsewhere
                            && !known(&node.name)
                            && !node.cache.contains_key(&(owner.clone(), object.id)))
                        .then(|| "no sources, though other nodes hold it".to_string())
                    }
                    Some(src) => {
                        self.stats.located_runs += 1;
                        let grant = self
                            .grant_key
                            .as_ref()
                            .ok_or(object_grant::GrantError::NoKey)
                            .and_then(|k| object_grant::verify(k, &src.grant, self.now))
                            .and_then(|b| object_grant::check_read(b, owner, &object.id));
                        if let Err(e) = grant {
                            Some(format!("a grant that fails: {e}"))
                        } else if src.object != *object {
                            Some(format!("sources for another object {:?}", src.object))
                        } else if src.endpoints.is_empty() {
                            Some("sources naming no node".into())
                        } else {
                            src.endpoints
                                .iter()
                                .find(|ep| ep.node == node.name || !known(&ep.node))
                                .map(|ep| {
                                    format!("a source {} that the book has not for it", ep.node)
                                })
                        }
                    }
                };
                if let Some(p) = problem {
                    self.violations.push(format!(
                        "run of s{} t{} a{} on {} with {owner}'s object {}: {p} (book: {row:?})",
                        a.session.0,
                        a.task.0,
                        a.attempt,
                        node.name,
                        object.id.short()
                    ));
                }
            }
        }
        for (node, owner, session) in ends {
            self.check_end_session(&node, &owner, session);
        }
    }

    /// Pins hold: the head ends a session's objects on a node (unpinning and dropping its
    /// copies) only once the session ended, and only for the session's owner.
    fn check_end_session(&mut self, node: &str, owner: &str, session: SessionId) {
        let live =
            self.core.holds_session(session) && !self.core.finished_in_memory().contains(&session);
        let owners = self.session_owners.get(&session);
        if live && owners.is_some_and(|o| o == owner) {
            self.violations.push(format!(
                "{node} told to end {owner}'s live session s{}: its pinned copies would go",
                session.0
            ));
        } else {
            self.stats.pins_released += 1;
        }
    }

    /// The object book against the nodes' caches, after every step: every holder it
    /// names holds a copy (or lost its cache in a way the head has not heard of yet); an
    /// object with no copy says why; an ended session's objects go within the retention;
    /// and one owner never locates another's object.
    fn check_objects(&mut self) {
        let book = self.core.object_book();
        let now = self.now;
        // A session evicted in the step it finished is not seen here: `objects_drained`
        // checks it at the end.
        for id in self.core.finished_in_memory() {
            if let Some(s) = self.sessions.get_mut(&id) {
                s.finished_at.get_or_insert(now);
            }
        }
        for row in &book {
            let key = (row.owner.clone(), row.id);
            for h in &row.holders {
                let ok = self.nodes.iter().find(|n| n.name == *h).is_some_and(|n| {
                    n.wiped || n.cache.contains_key(&key) || n.unsent_drops.contains(&key)
                });
                if !ok {
                    self.violations.push(format!(
                        "the book has {h} hold {}'s object {} ({:?}), which it does not",
                        row.owner,
                        row.id.short(),
                        row.origin
                    ));
                }
            }
            if row.missing.is_some() && self.lost_seen.insert(key.clone()) {
                self.stats.objects_lost += 1;
            }
            if row.holders.is_empty()
                && row.expected.is_empty()
                && row.missing.as_ref().is_none_or(|m| m.is_empty())
            {
                self.violations.push(format!(
                    "{}'s object {} ({:?}) has no copy and no reason",
                    row.owner,
                    row.id.short(),
                    row.origin
                ));
            }
            if let ObjectScope::Session(sid) = row.scope {
                let ended = self.sessions.get(&sid).and_then(|s| s.finished_at);
                if ended.is_some_and(|t| now > t + SIM_OBJECT_RETENTION_MS + RETENTION_SLACK_MS) {
                    self.violations.push(format!(
                        "{}'s object {} of s{} is in the book {} ms after the session ended",
                        row.owner,
                        row.id.short(),
                        sid.0,
                        now - ended.unwrap_or(now)
                    ));
                }
            }
        }
        if book.is_empty() {
            return;
        }
        let row = &book[self.rng.index(book.len())];
        let Some(other) = OWNERS.iter().find(|o| **o != row.owner) else {
            return;
        };
        let answer = self.ask(ClientRequest::LocateObjects {
            owner: (*other).to_string(),
            ids: vec![row.id],
        });
        let leaked = match &answer {
            ClientResponse::ObjectLocations(l) => {
                l.objects.iter().any(|o| !o.nodes.is_empty())
                    || !matches!(&l.grant.body.access, flame_protocol::object::GrantAccess::Read { ids } if ids.is_empty())
            }
            _ => true,
        };
        if leaked {
            self.violations.push(format!(
                "{other} located {}'s object {}: {answer:?}",
                row.owner,
                row.id.short()
            ));
        }
    }

    /// The core's quota ledger must always equal what its sessions hold.
    fn check_ledger(&mut self) {
        if let Some(problem) = self.core.ledger_mismatch() {
            self.fail(&problem);
        }
        // And every session's counters match its task slots.
        if let Some(problem) = self.core.count_mismatch() {
            self.fail(&problem);
        }
    }

    /// After the drain: every finished session leaves the head's memory (durable ones at
    /// once their record is durable and no executor is bound to them, ephemeral ones after
    /// `EPHEMERAL_KEPT_MS`), what they held goes back to the quota ledger, and the views of
    /// durable ones are still served (from the store).
    fn check_eviction(&mut self) {
        let start = self.now;
        loop {
            // Sessions the clients lost track of count too: finished ones must go as well.
            let held = self.core.finished_in_memory();
            if held.is_empty() {
                break;
            }
            if self.now - start > crate::core::EPHEMERAL_KEPT_MS + EVICTION_MS_MAX {
                self.fail(&format!(
                    "finished sessions {:?} are still in the head's memory {} ms after the drain",
                    held.iter().map(|id| id.0).collect::<Vec<_>>(),
                    self.now - start
                ));
            }
            self.step();
        }
        // What is left in the ledger is what unfinished sessions (ones a client lost
        // before it could close them) hold: `check_ledger` compared them after every step.
        self.check_ledger();
        let ids: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| !s.lost && !s.ephemeral)
            .map(|s| s.id)
            .collect();
        for id in ids {
            match self.session_info(id) {
                Some(info) if info.is_finished() => {}
                other => self.fail(&format!(
                    "s{} left memory but its view is not served finished: {other:?}",
                    id.0
                )),
            }
            match self.list_tasks(id) {
                Ok(None) => {}
                other => self.fail(&format!(
                    "s{} left memory but ListTasks does not send to the store: {other:?}",
                    id.0
                )),
            }
        }
    }

    /// Counters against the task list and the acked total, for every live session.
    fn check_sessions(&mut self) {
        let full = self.step % LIST_CHECK_EVERY_STEPS == 0;
        let ids: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| !s.lost)
            .map(|s| s.id)
            .collect();
        for id in ids {
            let Some(info) = self.session_info(id) else {
                continue;
            };
            // The task list costs a walk over all tasks: every few steps is enough. A
            // finished session changes no more: its counters are checked, its list was.
            let listed = if !full || self.sessions[&id].finished && info.is_finished() {
                None
            } else {
                Some(self.list_tasks(id))
            };
            let s = &self.sessions[&id];
            let acked = s.acked.len() as u64;
            let maybe = s.maybe_inputs() as u64;
            let total = info.counts.total();
            let mut problems = Vec::new();
            if total < acked || total > acked + maybe {
                problems.push(format!(
                    "counters {:?} sum to {total}, but {acked} tasks were acked ({maybe} more may exist)",
                    info.counts
                ));
            }
            if s.closed_acked && info.state != SessionState::Closed {
                problems.push(format!(
                    "its close was answered Ok, yet it is {:?}{}",
                    info.state,
                    if s.restarted {
                        " after a head restart: the close was not durable"
                    } else {
                        ""
                    }
                ));
            }
            match listed {
                Some(Ok(Some(list))) => {
                    let mut by_state = [0u64; 5];
                    for t in &list {
                        by_state[state_index(t.state)] += 1;
                    }
                    let c = info.counts;
                    let counted = [c.pending, c.running, c.succeeded, c.failed, c.cancelled];
                    if by_state != counted {
                        problems.push(format!(
                            "counters {counted:?} (pending, running, succeeded, failed, cancelled) \
                             but ListTasks shows {by_state:?}"
                        ));
                    }
                    // The list is in id order, like `acked` and `finals`: walk them together.
                    let mut acked_ids = s.acked.keys().peekable();
                    let mut finals = s.finals.iter().peekable();
                    let (mut missing, mut extra) = (Vec::new(), Vec::new());
                    for t in &list {
                        while let Some(a) = acked_ids.next_if(|a| **a < t.task) {
                            missing.push(a.0);
                        }
                        if acked_ids.next_if(|a| **a == t.task).is_none() {
                            extra.push(t.task.0);
                        }
                        while finals.next_if(|(f, _)| **f < t.task).is_some() {}
                        if let Some((_, (_, o))) = finals.next_if(|(f, _)| **f == t.task) {
                            if t.state != final_state(o) {
                                problems.push(format!(
                                    "task {} was final ({}) and is now {:?}",
                                    t.task.0,
                                    short_outcome(o),
                                    t.state
                                ));
                            }
                        }
                    }
                    missing.extend(acked_ids.map(|t| t.0));
                    if !missing.is_empty() {
                        problems.push(format!("acked tasks {missing:?} are not listed"));
                    }
                    if maybe == 0 && !extra.is_empty() {
                        problems.push(format!(
                            "tasks {extra:?} are listed but were never acked (a refused or \
                             unanswered batch leaked)"
                        ));
                    }
                }
                Some(Ok(None)) if !info.is_finished() => {
                    problems.push("ListTasks says finished, GetSession does not".into());
                }
                Some(Err(e)) => problems.push(format!("ListTasks failed: {e:?}")),
                Some(Ok(None)) | None => {}
            }
            if info.data.local_tasks > info.data.object_tasks {
                problems.push(format!(
                    "data stats count {} locality hits in {} object tasks",
                    info.data.local_tasks, info.data.object_tasks
                ));
            }
            let finished = info.is_finished();
            if let Some(p) = problems.first() {
                self.fail(&format!("session s{}: {p}", id.0));
            }
            if let Some(s) = self.sessions.get_mut(&id) {
                s.finished = finished;
            }
        }
    }

    // --- the end -----------------------------------------------------------------------

    fn drained(&self) -> bool {
        self.creating.is_empty()
            && self.sessions.values().filter(|s| !s.lost).all(|s| {
                s.closed_acked
                    && s.in_flight.is_empty()
                    && s.resend.is_empty()
                    && s.finished
                    && s.watcher.as_ref().is_none_or(|w| w.finished || w.dead)
                    && !s.wants_watch
            })
    }

    /// Faults stop, every node comes back, every session is closed; everything must finish.
    fn drain(&mut self) {
        self.trace("DRAIN".into());
        self.chaos = false;
        let now = self.now;
        for node in &mut self.nodes {
            node.silent_until = 0;
            if node.link.is_none() {
                node.reconnect_at = now;
            }
        }
        let start = self.now;
        while !self.drained() {
            if self.now - start > DRAIN_MS_MAX {
                let mut report = String::from("the system did not drain once faults stopped:");
                let ids: Vec<SessionId> = self.sessions.keys().copied().collect();
                for id in ids {
                    let s = &self.sessions[&id];
                    if s.lost {
                        continue;
                    }
                    let (view, in_flight, resend) = (s.view, s.in_flight.len(), s.resend.len());
                    let watch = s.watcher.as_ref().map(|w| (w.finished, w.dead));
                    let info = self.session_info(id).map(|i| (i.state, i.counts));
                    let states: Vec<(u64, TaskState)> = match self.list_tasks(id) {
                        Ok(Some(list)) => list
                            .iter()
                            .filter(|t| {
                                !matches!(
                                    t.state,
                                    TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
                                )
                            })
                            .map(|t| (t.task.0, t.state))
                            .collect(),
                        _ => Vec::new(),
                    };
                    let _ = write!(
                        report,
                        "\n  s{}: {:?} {:?} client {view:?}, {in_flight} batches in flight, \
                         {resend} to resend, watcher (finished, dead) {watch:?}, unfinished {states:?}",
                        id.0, info.map(|i| i.0), info.map(|i| i.1)
                    );
                }
                self.fail(&report);
            }
            self.step();
        }
    }

    fn final_checks(&mut self) {
        let ids: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| !s.lost)
            .map(|s| s.id)
            .collect();
        for id in ids {
            let Some(info) = self.session_info(id) else {
                continue;
            };
            let mut s = self.sessions.remove(&id).expect("a session");
            let mut problems = Vec::new();
            if !info.is_finished() {
                problems.push(format!("not finished: {info:?}"));
            }
            if !s.ephemeral {
                let store = self.store();
                let rows = store.final_results(id).expect("the store lists results");
                let pending = store
                    .list_tasks(id, &[TaskState::Pending], TaskId(0), usize::MAX)
                    .expect("the store lists tasks");
                if !pending.is_empty() {
                    problems.push(format!(
                        "{} tasks are still pending in the store of a finished session",
                        pending.len()
                    ));
                }
                if rows.len() as u64 != info.counts.total() {
                    problems.push(format!(
                        "the store holds {} final tasks, the counters say {}",
                        rows.len(),
                        info.counts.total()
                    ));
                }
                let mut outputs = HashSet::new();
                let stored: BTreeSet<TaskId> = rows.iter().map(|r| r.task).collect();
                for TaskResult {
                    task,
                    attempt,
                    outcome,
                } in &rows
                {
                    let out = match outcome {
                        TaskOutcome::Succeeded(out) => Some(out.clone()),
                        TaskOutcome::Object(o) => Some(Bytes::copy_from_slice(&o.id.0)),
                        _ => None,
                    };
                    if let Some(out) = out {
                        if !outputs.insert(out) {
                            problems.push(format!(
                                "the input of task {} ran as two tasks (a batch was duplicated)",
                                task.0
                            ));
                        }
                    }
                    self.check_final(&mut s, *task, *attempt, outcome, "store", &mut problems);
                }
                let missing: Vec<u64> = s
                    .acked
                    .keys()
                    .filter(|t| !stored.contains(t))
                    .map(|t| t.0)
                    .collect();
                if !missing.is_empty() {
                    problems.push(format!(
                        "acked tasks {missing:?} have no final record in the store"
                    ));
                }
                for TaskResult { outcome, .. } in rows {
                    if matches!(outcome, TaskOutcome::Object(_)) {
                        self.stats.object_outputs += 1;
                    }
                    match outcome {
                        TaskOutcome::Succeeded(_) | TaskOutcome::Object(_) => {
                            self.stats.succeeded += 1
                        }
                        TaskOutcome::Failed(_) => self.stats.failed += 1,
                        TaskOutcome::Cancelled => self.stats.cancelled += 1,
                    }
                }
            } else {
                self.stats.succeeded += info.counts.succeeded;
                self.stats.failed += info.counts.failed;
                self.stats.cancelled += info.counts.cancelled;
            }
            if let Some(w) = &s.watcher {
                if !w.dead {
                    let missing: Vec<u64> = s
                        .acked
                        .keys()
                        .filter(|t| !w.seen.contains(t))
                        .map(|t| t.0)
                        .collect();
                    if !w.finished || !missing.is_empty() {
                        problems.push(format!(
                            "its watcher (finished: {}) misses acked tasks {missing:?}",
                            w.finished
                        ));
                    }
                    if w.from_start && !s.restarted && w.seen.len() != s.acked.len() {
                        problems.push(format!(
                            "its watcher saw {} results for {} acked tasks",
                            w.seen.len(),
                            s.acked.len()
                        ));
                    }
                }
            }
            self.sessions.insert(id, s);
            if let Some(p) = problems.first() {
                self.fail(&format!("at the end, session s{}: {p}", id.0));
            }
        }
    }
}

fn stale(a: &Assigned, executor: ExecutorId, attempt: u32, outcome: TaskOutcome) -> NodeTaskResult {
    NodeTaskResult {
        exit_code: None,
        executor,
        session: a.session,
        task: a.task,
        attempt,
        outcome,
    }
}

fn state_index(state: TaskState) -> usize {
    match state {
        TaskState::Pending => 0,
        TaskState::Running => 1,
        TaskState::Succeeded => 2,
        TaskState::Failed => 3,
        TaskState::Cancelled => 4,
    }
}

fn final_state(o: &TaskOutcome) -> TaskState {
    match o {
        TaskOutcome::Succeeded(_) | TaskOutcome::Object(_) => TaskState::Succeeded,
        TaskOutcome::Failed(_) => TaskState::Failed,
        TaskOutcome::Cancelled => TaskState::Cancelled,
    }
}

/// Task inputs as the head takes them: inline, or objects the client put.
fn payloads(inputs: &[Bytes], objects: bool) -> Vec<Payload> {
    inputs
        .iter()
        .map(|b| {
            if objects {
                Payload::Object(ObjectRef::of(b))
            } else {
                Payload::Inline(b.clone())
            }
        })
        .collect()
}

/// What one seed's run leaves behind.
#[derive(Debug)]
pub struct RunOutcome {
    pub trace_hash: u64,
    pub stats: Stats,
}

/// Runs one seed for `steps` chaos steps, then drains and checks. `Err` holds the report of
/// the first property that failed (or of a panic inside the core).
fn try_seed(seed: u64, steps: usize) -> Result<RunOutcome, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut world = World::new(seed);
        world.run(steps);
        RunOutcome {
            trace_hash: world.tracer.hash,
            stats: world.stats.clone(),
        }
    }))
    .map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    })
}

/// [`try_seed`], failing the test with the seed and how to rerun it.
pub fn run_seed(seed: u64, steps: usize) -> RunOutcome {
    match try_seed(seed, steps) {
        Ok(outcome) => outcome,
        Err(message) => panic!(
            "simulation seed {seed} failed ({steps} steps); rerun with \
             FLAME_SIM_SEED={seed} FLAME_SIM_STEPS={steps}:\n{message}"
        ),
    }
}

pub(crate) fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={v:?} is not a number"),
    }
}

/// `A..B` from the environment.
pub(crate) fn env_range(name: &str) -> Option<std::ops::Range<u64>> {
    let v = std::env::var(name).ok()?;
    let parsed = v
        .split_once("..")
        .and_then(|(a, b)| Some(a.trim().parse().ok()?..b.trim().parse().ok()?));
    match parsed {
        Some(r) => Some(r),
        None => panic!("{name}={v:?} is not a range like 1000..2000"),
    }
}

#[test]
fn simulation_keeps_every_acked_task_exactly_once() {
    let steps = env_u64("FLAME_SIM_STEPS").map_or(STEPS, |n| n as usize);
    let seeds: Vec<u64> = match (env_u64("FLAME_SIM_SEED"), env_range("FLAME_SIM_SEEDS")) {
        (Some(seed), _) => vec![seed],
        (None, Some(range)) => range.collect(),
        (None, None) => REGRESSION_SEEDS.iter().copied().chain(0..SEEDS).collect(),
    };
    let pinned = env_u64("FLAME_SIM_STEPS").is_none()
        && env_u64("FLAME_SIM_SEED").is_none()
        && env_range("FLAME_SIM_SEEDS").is_none();
    let started = std::time::Instant::now();
    let mut total = Stats::default();
    let mut hashes = Vec::with_capacity(seeds.len());
    for &seed in &seeds {
        let outcome = run_seed(seed, steps);
        total.add(&outcome.stats);
        hashes.push((seed, outcome.trace_hash));
    }
    if pinned {
        crate::sim_traces::check(crate::sim_traces::CORE, steps, &hashes);
    }
    eprintln!(
        "simulation: {} seeds x {steps} steps in {:.1?}: {total:?}",
        seeds.len(),
        started.elapsed()
    );
    assert!(total.acked > 0, "the simulation acked no task at all");
    if seeds.len() > 1 {
        assert!(
            total.storage_faults > 0,
            "no storage-fault period in {} seeds: the rate is too low to test anything",
            seeds.len()
        );
        // Objects (issue 20): each kind of object activity happened somewhere, so the
        // object properties were not checked on nothing.
        let objects = [
            ("object task inputs", total.object_runs),
            ("runs with located sources", total.located_runs),
            ("copies fetched from a located node", total.object_fetches),
            ("outputs kept as objects", total.object_outputs),
            ("pinned copies kept through cache pressure", total.pins_kept),
            (
                "unpinned copies dropped by cache pressure",
                total.spares_dropped,
            ),
            ("pins released by the end of a session", total.pins_released),
            ("objects lost", total.objects_lost),
            ("lineage re-runs", total.rebuild_runs),
        ];
        for (what, n) in objects {
            assert!(
                !OBJECTS_IN_SIM || n > 0,
                "no {what} in {} seeds: the object properties tested nothing there",
                seeds.len()
            );
        }
    }
}

#[test]
fn simulation_same_seed_same_trace() {
    // Independent of the properties: a run that fails must fail the same way twice (the
    // report holds the step, the clock and the last events).
    let seed = env_u64("FLAME_SIM_SEED").unwrap_or(7);
    let a = try_seed(seed, 150).map(|o| o.trace_hash);
    let b = try_seed(seed, 150).map(|o| o.trace_hash);
    assert!(
        a == b,
        "seed {seed} gave two different traces: the simulation or the core is not \
         deterministic\nfirst: {a:?}\nsecond: {b:?}"
    );
}
