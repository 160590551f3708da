//! Named bounds. Every frame, batch and wait in Flame has one; these are the defaults that
//! the binaries start from and that configuration may lower or raise.

use std::time::Duration;

/// Largest frame any peer accepts, checked before a byte of the body is allocated.
pub const FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Largest task input or output the head accepts by default.
pub const TASK_INPUT_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Executors of one application for one owner that may end in a row before saying
/// ready (none saying ready in between). At this many, that owner's sessions of the
/// application that hold no executor end, their unfinished tasks failed with the last
/// failure, instead of waiting for a start that does not come. One executor of such an
/// application is launched at a time, so the bound on how long a session waits is this
/// many times the node's start timeout (`flame-node --start-timeout`, 30 s by default)
/// plus the launch backoff between them (0.2 s doubling): about 91 s by default.
pub const APP_LAUNCH_FAILURES_MAX: u32 = 3;

/// Largest task output the head accepts by default, inline or kept as an object on its
/// node (`flame-head --task-output-bytes-max`). The node checks it before it keeps an
/// output, and the head again when the result arrives; a larger output fails its task,
/// saying so. The shim frame (64 MiB) is the most it may be set to.
pub const TASK_OUTPUT_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// Most tasks one `SubmitBatch` may carry.
pub const SUBMIT_BATCH_TASKS_MAX: usize = 65_536;

/// Payload bytes a client packs into one `SubmitBatch` before starting the next.
pub const SUBMIT_BATCH_BYTES_TARGET: usize = 4 * 1024 * 1024;

/// Most entries in one node or watcher batch frame (results, commands).
pub const MESSAGE_BATCH_MAX: usize = 8_192;

/// How long a client or node waits for the QUIC + TLS handshake and the hello.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection with no traffic for this long is closed (keep-alives keep live ones open).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Interval of QUIC keep-alive packets. Short, so that a peer of a restarted head sends a
/// packet soon and gets the stateless reset that tells it to reconnect.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// How long one request/response exchange may take before the caller gives up.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Concurrent bidirectional streams a peer may open on one connection: a node's from the
/// head (log follows and exec streams of every user), and the most a client's quota may
/// allow. Streams cost little until data arrives, and the connection's receive window
/// bounds that.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 1_024;

/// Interval between node heartbeats.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);

/// A node silent for this long is NotReady and its running tasks are re-queued (the
/// head's default; `flame-head --heartbeat-timeout` sets it).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

/// A node that hears nothing from the head for this long (the head answers every
/// heartbeat) drops the connection and connects again. Three default heartbeat timeouts:
/// a head that was stopped or frozen for less finds its nodes still connected and gives
/// them a fresh heartbeat window, so their tasks keep running (a reconnect would send them
/// to a second attempt).
pub const HEAD_SILENCE_MAX: Duration = Duration::from_secs(30);

/// A server connection's QUIC receive window until its hello is authenticated: room for
/// the hello, so that a flood of unauthenticated connections holds little memory. The head
/// raises it once the peer is known.
pub const UNAUTHENTICATED_RECEIVE_WINDOW: u32 = 64 * 1024;

/// Streams one user may hold open from the head to one node at once: `flame logs` (one
/// per node it reads) and `JobExec` (one per process it runs). A node takes at most
/// [`STREAMS_PER_CONNECTION_MAX`] from the head for everyone, so no one user may take
/// them all; more are refused, naming this bound.
pub const NODE_STREAMS_PER_USER_MAX: u32 = 16;

/// Connections from one source address that the head sets up at once (between their
/// address validation and their admission: TLS handshake and hello). More from that
/// address are refused before any TLS work, so one address cannot take the head's slots
/// for connections being set up (256) from everyone else; refused clients try again
/// within their connect timeout.
pub const HANDSHAKES_PER_ADDRESS_MAX: u32 = 32;

/// Flush requests (`LogSink::settle`, at each enter and leave of a session) queued for one
/// log copy task: one is usual, since an executor enters or leaves one session at a time.
/// Past it a settle does not wait for that copy task.
pub const LOG_FLUSH_REQUESTS_MAX: usize = 8;

// Node channels (issue 19)

/// Commands an executor's queue on a node holds beyond the node's credit (the runs a head
/// may have outstanding per executor): a bind and an unbind, and the few a reconnect may
/// leave queued. A head that keeps its credit never fills the queue; one that does drops
/// its link (a protocol error), and the node registers again.
pub const NODE_EXECUTOR_COMMANDS_SLACK: usize = 16;

/// Reports (results and executor events) queued from a node's executors to its link. Past
/// it an executor waits at its next report, holding its application's answers in the
/// application's pipe: backpressure that reaches the head through its credit.
pub const NODE_REPORTS_MAX: usize = 4 * MESSAGE_BATCH_MAX;

/// Reports a node's link hands its connection's writer ahead of the wire: one full frame's
/// worth. Past it the link takes no more reports (they wait in [`NODE_REPORTS_MAX`]) but
/// goes on reading the head.
pub const NODE_REPORTS_WRITER_MAX: usize = MESSAGE_BATCH_MAX;

/// Reports a node's link makes itself (an executor the head named is not on this node)
/// waiting for room in [`NODE_REPORTS_MAX`]. More means the head keeps naming executors
/// this node does not have while not reading its reports: a protocol error that drops the
/// link.
pub const NODE_OWN_REPORTS_MAX: usize = MESSAGE_BATCH_MAX;

/// Executors ended on a node and not yet counted by its agent. Past it an ended executor's
/// task (which holds nothing any more) waits to be counted.
pub const NODE_EXECUTORS_GONE_MAX: usize = 1_024;

/// Exec requests (Open MPI's daemons) waiting for one holding rank of a batch job.
pub const RANK_EXEC_REQUESTS_MAX: usize = 64;

// Client channels (issue 19)

/// Messages queued from `flame submit --each`'s driver to its submitting task, each a run
/// of admitted lines. The driver never waits on this queue: lines admitted while it is full
/// are held and go in the next message once there is room, so it keeps reading results
/// (the lines themselves are bounded by the window of unfinished lines, not by this). The
/// submitting task takes every queued message into one send, so a few keep it busy.
pub const EACH_SUBMIT_QUEUE_MAX: usize = 16;

// Head channels (issue 19)

/// Store requests the head's core has in flight to its store writer (sent, their commit
/// not yet known). The core sends at most one per batch of events and holds later writes
/// back while this many are in flight (they go with a later request, as one group commit
/// would take them), so the channel of this size always has room: the core never waits
/// on the store. The writer takes up to 4,096 requests per group commit; past a few dozen
/// in flight the disk is the bottleneck, and bigger requests cost nothing more.
pub const HEAD_STORE_REQUESTS_MAX: usize = 1_024;

/// Reports of the store writer (commits done, faults, recoveries) queued for the head's
/// core, which reads them before any other event. A commit report covers at least one
/// request in flight ([`HEAD_STORE_REQUESTS_MAX`]), and fault and recovery reports come
/// one per change of the store's health, so this many is never reached in practice; if it
/// were, the writer (its own thread) would wait for the core, never the reverse.
pub const HEAD_WRITER_REPORTS_MAX: usize = 2 * HEAD_STORE_REQUESTS_MAX;

/// Frames the head queues for one node connection before it drops that connection. The
/// core produces a few per batch of events for a node (its commands, at most
/// [`MESSAGE_BATCH_MAX`] per frame, and heartbeat answers) and never waits on a node: a
/// node this far behind is too slow or stuck, and registers afresh on a new connection,
/// where the head adopts its executors and the tasks they still hold.
pub const HEAD_NODE_LINK_FRAMES_MAX: usize = 1_024;

// Queues whose bounds lived beside them until issue 19: every channel's bound is named here.

/// Events queued for the head's core before senders wait (backpressure on clients and
/// nodes). Commit reports do not wait behind them: they have their own queue.
pub const CORE_EVENTS_QUEUE_MAX: usize = 65_536;

/// Submit batches of one stream whose replies are still outstanding at the head; past it
/// the stream's reader waits, and QUIC flow control holds the client back.
pub const SUBMIT_BATCHES_IN_FLIGHT_MAX: usize = 256;

/// Log frames buffered between the node streams of one `flame logs` and its client; past
/// this, the node streams wait (and QUIC flow control holds the nodes back).
pub const LOG_EVENTS_BUFFERED_MAX: usize = 16;

/// Messages queued for one watcher before it counts as lagging: its watch ends with
/// `WatchEvent::Lagged`, and the client watches again, getting the rest from the store.
/// The head sends one per batch of events that finalized results of the session.
pub const WATCH_QUEUE_MESSAGES_MAX: usize = 64;

/// Frames buffered on a node between the log readers of one stream and the stream; past
/// it the readers wait.
pub const NODE_LOG_EVENTS_BUFFERED_MAX: usize = 16;

/// Watch frames a client buffers between the stream and `ResultStream::next`; past it the
/// stream is not read, and QUIC flow control holds the head back.
pub const WATCH_BUFFER_FRAMES: usize = 16;

/// Chunks of lines `flame submit --each`'s reading thread keeps ready ahead of the
/// submitter; past it the thread waits.
pub const EACH_READ_AHEAD_CHUNKS: usize = 2;

/// Messages of admitted inputs queued for `flame run`'s submitting task; as
/// [`EACH_SUBMIT_QUEUE_MAX`], the driver never waits on it.
pub const RUN_SUBMIT_QUEUE_MAX: usize = 16;

/// Chunks of inputs `flame run`'s reading thread keeps ready ahead of the submitter; past
/// it the thread waits.
pub const RUN_READ_AHEAD_CHUNKS: usize = 2;

// Objects (issue 20): the object cache, its transfers, and the head's object book.

/// Inputs, common data and outputs larger than this travel as objects (put to a node's
/// cache, the task carrying a reference); smaller ones inline. Clients take it from
/// `--object-inline-max`/`FLAME_OBJECT_INLINE_MAX`, nodes from the head (`flame-head
/// --object-inline-max`). Ray's threshold is 100 KiB too.
pub const OBJECT_INLINE_BYTES_DEFAULT: u64 = 100 * 1024;

/// Largest object anyone may put or a task may output.
pub const OBJECT_BYTES_MAX: u64 = 64 * 1024 * 1024 * 1024;

/// How long an object grant is good for after the head signs it.
pub const OBJECT_GRANT_TTL: Duration = Duration::from_secs(600);

/// Most objects one `PutObjects`, `LocateObjects` or `RemoveObjects` (and so one read
/// grant) may name.
pub const OBJECT_REQUEST_IDS_MAX: usize = 8_192;

/// Most copies of one object a client may ask for (`--replicas`).
pub const OBJECT_REPLICAS_MAX: u32 = 8;

/// A node's object cache in memory unless `flame-node --object-memory` says otherwise.
pub const NODE_OBJECT_MEMORY_DEFAULT: u64 = 2 * 1024 * 1024 * 1024;

/// A node's object spill folder's budget unless `flame-node --object-disk` says otherwise.
pub const NODE_OBJECT_DISK_DEFAULT: u64 = 16 * 1024 * 1024 * 1024;

/// Transfers a node's object endpoint serves at once (streams, over every connection);
/// more wait for QUIC stream credit.
pub const NODE_OBJECT_STREAMS_MAX: u32 = 256;

/// Connections a node's object endpoint holds at once (clients and other nodes).
pub const NODE_OBJECT_CONNECTIONS_MAX: usize = 512;

/// A transfer that moves no byte for this long is abandoned with an error.
pub const OBJECT_TRANSFER_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Parallel streams one reader uses for one large object: each fetches a range of
/// [`OBJECT_RANGE_BYTES`].
pub const OBJECT_STREAMS_PER_GET: usize = 4;

/// Bytes of one ranged `Get` when a reader splits a large object over streams (a whole
/// number of chunks).
pub const OBJECT_RANGE_BYTES: u64 = 64 * 1024 * 1024;

/// Object fetches one node runs at once for its executors (inputs and common data it
/// does not hold); more wait.
pub const NODE_OBJECT_FETCHES_MAX: usize = 64;

/// How long a pending task whose input an object on a busy node holds waits for an
/// executor there before any executor may take it (and fetch the object): locality is a
/// preference, never a queue behind one node (`flame-head --locality-wait`).
pub const LOCALITY_WAIT: Duration = Duration::from_millis(100);

/// Objects the head keeps for one owner (its quota's default).
pub const OWNER_OBJECTS_MAX: u64 = 1_000_000;

/// Object bytes one owner may hold in the cluster's caches (one copy counted per object;
/// its quota's default).
pub const OWNER_OBJECT_BYTES_MAX: u64 = 1024 * 1024 * 1024 * 1024;

/// How long a session's objects (its outputs, and the inputs put for it) stay after the
/// session ends: a watcher reading the last results after the end still finds their
/// bytes. Then the head forgets them and the nodes drop them.
pub const SESSION_OBJECTS_RETENTION: Duration = Duration::from_secs(600);

/// Object events the node queues for its link to the head; past it the cache's users wait.
pub const NODE_OBJECT_EVENTS_MAX: usize = 4_096;
