//! The I/O shell around the core: the QUIC server, the core's event loop, and the store
//! writer. Everything here moves bytes; decisions are the core's.

use crate::auth::{Authenticated, TokenBook, TokenLimits};
use crate::certs::{CertBook, Presented};
use crate::core::{Backfill, ConnId, Core, Event, LogTargets, WatchMsg};
use crate::counted::{Counted, Permit};
use crate::quotas::{Quota, QuotaBook, QuotaExceeded};
use crate::store::{Store, StoreRequest, WriterEvent};
use crate::tls::HeadIdentity;
use crate::watch::{watch_queue, WatchSource};
use flame_protocol::auth::{
    CertTarget, JoinReply, JoinRequest, Principal, Secret, CSR_PEM_BYTES_MAX,
};
use flame_protocol::endpoint::{check_hello, check_version};
use flame_protocol::frame::{FrameError, FrameReader, FrameWriter};
use flame_protocol::limits;
use flame_protocol::messages::{
    ClientRequest, ClientResponse, ExecEvent, Hello, HelloReply, HelloVersion, LogEvent,
    NodeExecRequest, NodeLogRequest, NodeStreamRequest, NodeToHead, Role, SubmitBatch, SubmitReply,
    WatchEvent,
};
use flame_protocol::model::{ApiError, ErrorKind, TaskResult};
use flame_protocol::pki::{identity_of, PeerIdentity};
use flame_protocol::{ExecutorId, SessionId, TaskId, TaskIdSet};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

/// Events queued for the core before senders wait (backpressure on clients and nodes).
pub const CORE_EVENTS_QUEUE_MAX: usize = 65_536;
/// Events the core applies before it flushes one batch of output.
pub const CORE_EVENTS_PER_BATCH_MAX: usize = 4_096;
/// Submit batches of one stream whose replies are still outstanding.
pub const SUBMIT_BATCHES_IN_FLIGHT_MAX: usize = 256;
/// Period of the core's tick (heartbeat timeouts, `delay_release`).
pub const TICK: Duration = Duration::from_millis(200);
/// A gap between two turns of the core's loop this much longer than [`TICK`] means the
/// head itself did not run (a stop signal, a frozen VM, a starved host): the core is told
/// (`Event::Stalled`) and does not blame the nodes for the silence. Well above a busy
/// turn (a batch of at most [`CORE_EVENTS_PER_BATCH_MAX`] events takes milliseconds) and
/// well below the shortest heartbeat timeout accepted.
pub const HEAD_STALL_MIN: Duration = Duration::from_secs(1);
/// Log frames buffered between the node streams of one `flame logs` and its client; past
/// this, the node streams wait (and QUIC flow control holds the nodes back).
pub const LOG_EVENTS_BUFFERED_MAX: usize = 16;
/// Largest frame accepted on a node's log stream: one chunk of at most 1 MiB (the node's
/// `logs::CHUNK_BYTES_MAX`) with the names around it.
pub const NODE_LOG_FRAME_BYTES_MAX: usize = 1024 * 1024 + 64 * 1024;
/// Bound on opening a log stream to a node and sending it the request.
pub const NODE_LOG_OPEN_TIMEOUT: Duration = limits::CONNECT_TIMEOUT;
/// Without `follow`, the longest a node may stay silent on its log stream: it only reads
/// files, so silence this long means it is stuck.
pub const NODE_LOG_SILENCE_MAX: Duration = limits::REQUEST_TIMEOUT;

/// Largest hello frame: a version, a role, an agent name and a token fit in far less.
pub const HELLO_BYTES_MAX: usize = 8 * 1024;
/// Largest frame on a join stream: a CSR of at most `CSR_PEM_BYTES_MAX` and a name.
pub const JOIN_FRAME_BYTES_MAX: usize = CSR_PEM_BYTES_MAX + 1024;
/// Connections open at once (clients and nodes together); more are refused at once, before
/// their handshake, so a flood costs the head no TLS work.
pub const CONNECTIONS_MAX: usize = 4_096;
/// Connections between their first packet and their admission (TLS handshake and hello);
/// more are refused, so a flood of slow handshakes cannot take every slot.
pub const UNAUTHENTICATED_MAX: usize = 256;
/// How often connections whose token was revoked or has expired are looked for and closed.
pub const TOKEN_SWEEP_INTERVAL: Duration = Duration::from_secs(2);
/// Bytes an authenticated connection may have in flight towards the head (its QUIC
/// receive window). Until the hello is authenticated, a connection gets only
/// [`limits::UNAUTHENTICATED_RECEIVE_WINDOW`], and one stream.
pub const AUTHENTICATED_RECEIVE_WINDOW: u32 = 64 * 1024 * 1024;
/// The receive window of a client connection once authenticated: what a client's
/// connection may make the head buffer (a user's `connections` quota times this bounds
/// it). Four of the client library's 4 MiB submit batches fit; a larger frame still flows,
/// at the pace the head reads it.
pub const CLIENT_RECEIVE_WINDOW: u32 = 16 * 1024 * 1024;
/// Streams a connection may open past its owner's `streams_per_connection` quota, each
/// answered at once with the quota's error: a client over its quota gets told so instead
/// of waiting for QUIC flow control. Beyond these QUIC holds the peer back.
pub const STREAMS_REFUSED_AT_ONCE_MAX: u32 = 8;
/// A frame begun on any stream must make progress at least this often: a peer stalled
/// mid-frame holds memory, and its stream (a submit stream: its connection) is dropped.
pub const FRAME_STALL_TIMEOUT: Duration = limits::REQUEST_TIMEOUT;
/// Results per page of a watch's backfill from the store.
pub const WATCH_BACKFILL_PAGE_RESULTS: usize = limits::MESSAGE_BATCH_MAX;
/// Bytes of outputs per page of a watch's backfill from the store.
pub const WATCH_BACKFILL_PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Finished sessions (read from the store) that `flame session list` shows, newest first.
pub const FINISHED_LISTED_MAX: usize = 1_000;

/// QUIC application close codes.
const CLOSE_PROTOCOL_ERROR: u32 = 1;
const CLOSE_REFUSED: u32 = 2;
const CLOSE_NODE_LOST: u32 = 3;
const CLOSE_SHUTDOWN: u32 = 4;
const CLOSE_REVOKED: u32 = 5;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug)]
struct Shared {
    events: mpsc::Sender<Event>,
    store: Store,
    next_conn: AtomicU64,
    version: String,
    /// The registered nodes' connections by node name, for the streams the head opens to
    /// them (logs). A node that reconnects replaces its entry; an entry goes when its own
    /// connection ends.
    nodes: Mutex<HashMap<String, (ConnId, quinn::Connection)>>,
    /// Tokens; changed by admins' requests, read at every hello.
    tokens: Mutex<TokenBook>,
    /// The live connections each user token opened, closed when it is revoked.
    token_conns: Mutex<HashMap<String, Vec<quinn::Connection>>>,
    /// Revoked certificates and nodes' certificates; read at every hello with one.
    certs: Mutex<CertBook>,
    /// The live connections made with a certificate (clients and nodes), by connection id,
    /// closed when their certificate is revoked or replaced.
    cert_conns: Mutex<HashMap<usize, (quinn::Connection, Presented)>>,
    /// Held by a join from its name check to its record, so that two joins cannot both
    /// take a free name.
    joins: tokio::sync::Mutex<()>,
    /// The head's certificate and the CA key that signs nodes' certificates.
    identity: Arc<HeadIdentity>,
    /// Per-user quotas; connections and streams are counted here, the rest in the core.
    quotas: QuotaBook,
    /// Per user with a connection open: its connections and its submit budget.
    users: Mutex<HashMap<String, UserEntry>>,
    /// Log and exec streams each user holds to each node.
    node_streams: Arc<crate::node_streams::NodeStreams>,
}

/// What the server counts for one user.
#[derive(Debug)]
struct UserEntry {
    connections: u64,
    /// Bytes of submit batches read and not yet acked, over all the user's submit streams
    /// (`Quotas::submit_bytes_in_flight`, in KiB permits).
    submit_budget: Arc<tokio::sync::Semaphore>,
}

/// One of a user's connections; released when dropped.
#[derive(Debug)]
struct UserSlot {
    shared: Arc<Shared>,
    user: String,
    submit_budget: Arc<tokio::sync::Semaphore>,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut users = self.shared.users();
        if let Some(entry) = users.get_mut(&self.user) {
            entry.connections = entry.connections.saturating_sub(1);
            if entry.connections == 0 {
                users.remove(&self.user);
            }
        }
    }
}

/// Bytes per permit of a submit budget.
const SUBMIT_BUDGET_UNIT_BYTES: u64 = 1024;

/// Connections a batch job's credential may hold at once: Open MPI's `mpirun` keeps one
/// (through `flame-mpi-agent`) per remote node of the job for the life of its daemon, so the
/// owners' `connections` quota would cap jobs at 16 nodes. The credential is good only for
/// `JobExec` on its own job, and only while the job runs.
pub const JOB_CONNECTIONS_MAX: u64 = 1_024;

/// Takes one of `caller`'s connections, within its quota.
fn take_user_slot(shared: &Arc<Shared>, caller: &Caller) -> Result<UserSlot, QuotaExceeded> {
    let user = &caller.quota_name();
    let mut quotas = *shared.quotas.of(user);
    if let Caller::Job(_) = caller {
        quotas.connections = JOB_CONNECTIONS_MAX;
    }
    let quotas = &quotas;
    let mut users = shared.users();
    let held = users.get(user).map_or(0, |e| e.connections);
    crate::quotas::check(quotas, Quota::Connections, user, held, 1)?;
    let entry = users.entry(user.to_string()).or_insert_with(|| UserEntry {
        connections: 0,
        submit_budget: Arc::new(tokio::sync::Semaphore::new(
            usize::try_from(quotas.submit_bytes_in_flight / SUBMIT_BUDGET_UNIT_BYTES)
                .unwrap_or(usize::MAX)
                .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
        )),
    });
    entry.connections += 1;
    Ok(UserSlot {
        shared: shared.clone(),
        user: user.to_string(),
        submit_budget: entry.submit_budget.clone(),
    })
}

/// Who a client connection acts for.
#[derive(Debug, Clone)]
enum Caller {
    User(Principal),
    /// A batch job's ranks (`flame-mpi-agent`): `JobExec` on this job only.
    Job(SessionId),
}

impl Caller {
    /// Whose quotas it uses.
    fn quota_name(&self) -> String {
        match self {
            Caller::User(p) => p.name.clone(),
            Caller::Job(job) => format!("job {job}"),
        }
    }
}

impl Shared {
    fn tokens(&self) -> std::sync::MutexGuard<'_, TokenBook> {
        // Every holder leaves the book whole.
        self.tokens.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn token_conns(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<quinn::Connection>>> {
        self.token_conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn certs(&self) -> std::sync::MutexGuard<'_, CertBook> {
        // Every holder leaves the book whole.
        self.certs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn cert_conns(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<usize, (quinn::Connection, Presented)>> {
        self.cert_conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Closes the connections whose certificate is no longer accepted.
    fn close_revoked_certs(&self) {
        let lapsed: Vec<(quinn::Connection, String)> = {
            let book = self.certs();
            let mut conns = self.cert_conns();
            let refused: Vec<(usize, String)> = conns
                .iter()
                .filter_map(|(id, (_, cert))| book.check(cert).err().map(|e| (*id, e.to_string())))
                .collect();
            refused
                .into_iter()
                .filter_map(|(id, reason)| conns.remove(&id).map(|(conn, _)| (conn, reason)))
                .collect()
        };
        for (conn, reason) in lapsed {
            close_with(&conn, CLOSE_REVOKED, &reason);
        }
    }

    fn users(&self) -> std::sync::MutexGuard<'_, HashMap<String, UserEntry>> {
        // Every holder leaves the map whole.
        self.users.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn nodes(&self) -> std::sync::MutexGuard<'_, HashMap<String, (ConnId, quinn::Connection)>> {
        // The map is left whole by every holder of the lock; a panic cannot corrupt it.
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn node_connection(&self, name: &str) -> Option<quinn::Connection> {
        self.nodes().get(name).map(|(_, conn)| conn.clone())
    }
}

/// Starts the core loop and the store writer; returns the sender that feeds the core.
pub fn start_core(
    mut core: Core,
    store: Store,
    store_rx: mpsc::UnboundedReceiver<StoreRequest>,
    low_space_bytes: u64,
) -> std::io::Result<(mpsc::Sender<Event>, tokio::task::JoinHandle<()>)> {
    let (tx, mut rx) = mpsc::channel::<Event>(CORE_EVENTS_QUEUE_MAX);
    tokio::spawn(measure_free_space(
        store.dir().to_path_buf(),
        low_space_bytes,
        tx.clone(),
    ));
    let commit_tx = tx.clone();
    crate::store::spawn_writer(store, store_rx, move |report| {
        let event = match report {
            WriterEvent::Committed { tokens, result } => Event::Committed { tokens, result },
            WriterEvent::Faulted(fault) => Event::StorageFaulted { fault },
            WriterEvent::Recovered => Event::StorageRecovered,
        };
        // The core drains its queue continuously, so this wait is short; if the core is
        // gone the head is shutting down and there is nobody left to tell.
        let _ = commit_tx.blocking_send(event);
    })?;
    let handle = tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut cadence = StallMeter::new(std::time::Instant::now(), now_ms());
        loop {
            let first = tokio::select! {
                ev = rx.recv() => match ev {
                    Some(ev) => ev,
                    None => break,
                },
                _ = tick.tick() => Event::Tick,
            };
            let now = now_ms();
            if let Some(stalled_ms) = cadence.turn(std::time::Instant::now(), now) {
                core.handle(Event::Stalled { stalled_ms }, now);
            }
            core.handle(first, now);
            let mut n = 1;
            while n < CORE_EVENTS_PER_BATCH_MAX {
                match rx.try_recv() {
                    Ok(ev) => core.handle(ev, now),
                    Err(_) => break,
                }
                n += 1;
            }
            core.end_batch(now);
        }
    });
    core_flush_initial(&tx);
    Ok((tx, handle))
}

/// Measures the gaps between turns of the core's loop, which turns at least every
/// [`TICK`] while the head runs. Both clocks are read: the monotonic one sees a stop
/// signal or a starved process, the wall clock (which the core's deadlines use) also a
/// frozen VM, whose monotonic clock stands still, and a clock stepped forward.
#[derive(Debug)]
struct StallMeter {
    last: std::time::Instant,
    last_wall_ms: u64,
}

impl StallMeter {
    fn new(now: std::time::Instant, now_wall_ms: u64) -> StallMeter {
        StallMeter {
            last: now,
            last_wall_ms: now_wall_ms,
        }
    }

    /// A turn of the loop at `now`: how long the head did not run before it, in ms, when
    /// that is at least [`HEAD_STALL_MIN`] beyond the loop's cadence.
    fn turn(&mut self, now: std::time::Instant, now_wall_ms: u64) -> Option<u64> {
        let mono_ms = now.saturating_duration_since(self.last).as_millis() as u64;
        let wall_ms = now_wall_ms.saturating_sub(self.last_wall_ms);
        self.last = now;
        self.last_wall_ms = now_wall_ms;
        let gap_ms = mono_ms.max(wall_ms);
        let cadence_ms = TICK.as_millis() as u64;
        let stalled_ms = gap_ms.saturating_sub(cadence_ms);
        (stalled_ms >= HEAD_STALL_MIN.as_millis() as u64).then_some(stalled_ms)
    }
}

/// Reads the data directory's free space every
/// [`crate::storage_fault::FREE_SPACE_CHECK_INTERVAL_MS`] and tells the core, until the
/// core is gone.
async fn measure_free_space(dir: std::path::PathBuf, low_bytes: u64, events: mpsc::Sender<Event>) {
    use crate::storage_fault::{free_space, DiskSpace, FREE_SPACE_CHECK_INTERVAL_MS};
    let mut every = tokio::time::interval(std::time::Duration::from_millis(
        FREE_SPACE_CHECK_INTERVAL_MS,
    ));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed = false;
    loop {
        every.tick().await;
        match free_space(&dir) {
            Ok((free_bytes, total_bytes)) => {
                failed = false;
                let space = DiskSpace {
                    free_bytes,
                    total_bytes,
                    low_bytes,
                };
                if events.send(Event::DiskSpace(space)).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                if !failed {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot read the data directory's free space");
                }
                failed = true;
            }
        }
    }
}

fn core_flush_initial(tx: &mpsc::Sender<Event>) {
    // A first tick makes the core persist start-up changes (the built-in application).
    let _ = tx.try_send(Event::Tick);
}

/// Whose share of the handshake slots a connection takes: its IPv4 address, or the /64
/// prefix of its IPv6 address (a host commonly holds a whole /64, and could otherwise
/// take every slot from addresses of its own).
fn handshake_source(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        std::net::IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            std::net::IpAddr::V6(std::net::Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// What the server keeps for its connections: the state it checks credentials and quotas
/// against, loaded at start.
#[derive(Debug)]
pub struct ServerState {
    pub store: Store,
    pub tokens: TokenBook,
    pub certs: CertBook,
    pub identity: Arc<HeadIdentity>,
    pub quotas: QuotaBook,
}

/// Accepts connections until `shutdown` resolves.
pub async fn serve(
    endpoint: quinn::Endpoint,
    events: mpsc::Sender<Event>,
    state: ServerState,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let ServerState {
        store,
        tokens,
        certs,
        identity,
        quotas,
    } = state;
    let shared = Arc::new(Shared {
        events,
        store,
        next_conn: AtomicU64::new(1),
        version: format!("flame-head {}", env!("CARGO_PKG_VERSION")),
        nodes: Mutex::new(HashMap::new()),
        tokens: Mutex::new(tokens),
        token_conns: Mutex::new(HashMap::new()),
        certs: Mutex::new(certs),
        cert_conns: Mutex::new(HashMap::new()),
        joins: tokio::sync::Mutex::new(()),
        identity,
        quotas,
        users: Mutex::new(HashMap::new()),
        node_streams: crate::node_streams::NodeStreams::new(),
    });
    let open = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    let unauthenticated = Arc::new(tokio::sync::Semaphore::new(UNAUTHENTICATED_MAX));
    let per_address = Counted::<std::net::IpAddr>::new(limits::HANDSHAKES_PER_ADDRESS_MAX);
    let mut sweep = tokio::time::interval(TOKEN_SWEEP_INTERVAL);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                // A peer proves it owns its address (a QUIC Retry round trip) before the
                // head spends a slot or a TLS handshake on it: spoofed floods cost nothing.
                if !incoming.remote_address_validated() && incoming.may_retry() {
                    let _ = incoming.retry();
                    continue;
                }
                // One address gets a share of the slots for connections being set up,
                // never all of them; the address is validated, so it is the peer's own.
                let remote = handshake_source(incoming.remote_address().ip());
                let Ok(from_address) = per_address.try_acquire(&remote) else {
                    tracing::debug!(%remote, "refusing a connection: {} from this address being set up", limits::HANDSHAKES_PER_ADDRESS_MAX);
                    incoming.refuse();
                    continue;
                };
                let (Ok(permit), Ok(pending)) = (
                    open.clone().try_acquire_owned(),
                    unauthenticated.clone().try_acquire_owned(),
                ) else {
                    tracing::warn!(%remote, "refusing a connection: {CONNECTIONS_MAX} open or {UNAUTHENTICATED_MAX} not yet authenticated");
                    incoming.refuse();
                    continue;
                };
                let pending = Pending { _all: pending, _from_address: from_address };
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle_connection(incoming, shared, pending).await {
                        tracing::debug!(error = %e, "connection ended");
                    }
                    drop(permit);
                });
            }
            _ = sweep.tick() => close_lapsed(&shared),
            _ = &mut shutdown => break,
        }
    }
    endpoint.close(
        quinn::VarInt::from_u32(CLOSE_SHUTDOWN),
        b"head shutting down",
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("the head is shutting down")]
    CoreGone,
}

/// A connection's place among those being set up, in all and from its address; given
/// back when it is admitted or fails.
struct Pending {
    _all: tokio::sync::OwnedSemaphorePermit,
    _from_address: Permit<std::net::IpAddr>,
}

async fn handle_connection(
    incoming: quinn::Incoming,
    shared: Arc<Shared>,
    pending: Pending,
) -> Result<(), ConnError> {
    // The handshake, the hello stream and the hello within one bound: a slow peer is cut
    // off, whatever it trickles.
    let deadline = tokio::time::Instant::now() + limits::CONNECT_TIMEOUT;
    let conn = tokio::time::timeout_at(deadline, incoming)
        .await
        .map_err(|_| ConnError::Timeout("the TLS handshake"))?
        .map_err(|e| ConnError::Handshake(e.to_string()))?;
    let greeting = async {
        let (send, recv) = conn.accept_bi().await?;
        let writer = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
        let mut reader = FrameReader::new(recv, HELLO_BYTES_MAX);
        let bytes = reader.read_bytes_required().await?;
        Ok::<_, ConnError>((writer, reader, bytes))
    };
    let (mut writer, reader, bytes) = match tokio::time::timeout_at(deadline, greeting).await {
        Err(_) => {
            close_with(&conn, CLOSE_PROTOCOL_ERROR, "no hello in time");
            return Err(ConnError::Timeout("the hello"));
        }
        Ok(Err(e)) => {
            close_with(&conn, CLOSE_PROTOCOL_ERROR, &format!("bad hello: {e}"));
            return Err(e);
        }
        Ok(Ok(greeted)) => greeted,
    };
    // The version first: a peer of another release gets told so, not a decoding error.
    let refusal = match postcard::take_from_bytes::<HelloVersion>(&bytes) {
        Ok((v, _)) => check_version(v.protocol_version).err(),
        Err(_) => None,
    };
    if let Some(reason) = refusal {
        refuse(&conn, &mut writer, &reason).await;
        return Ok(());
    }
    let hello: Hello = match postcard::from_bytes(&bytes) {
        Ok(h) => h,
        Err(e) => {
            let reason = format!("bad hello: {e}");
            close_with(&conn, CLOSE_PROTOCOL_ERROR, &reason);
            return Err(ConnError::Handshake(reason));
        }
    };
    if let Err(reason) = check_hello(&hello, &[Role::Client, Role::Node, Role::Join]) {
        refuse(&conn, &mut writer, &reason).await;
        return Ok(());
    }
    let peer_der = flame_protocol::endpoint::peer_certificate(&conn);
    let peer = peer_der.as_ref().map(|der| identity_of(der));
    let admitted = admit(&shared, &hello, peer);
    let admitted = match admitted {
        Ok(a) => a,
        Err(reason) => {
            tracing::warn!(remote = %conn.remote_address(), role = ?hello.role, %reason, "connection refused");
            refuse(&conn, &mut writer, &reason).await;
            return Ok(());
        }
    };
    // A connection admitted on its certificate: that certificate must not be revoked (or,
    // for a node, replaced). Recorded before the welcome and checked once recorded, as
    // tokens are below; the guard forgets it when this connection's handling ends.
    let by_cert = matches!(
        &admitted,
        Admitted::Node { .. }
            | Admitted::Client {
                token: None,
                caller: Caller::User(_)
            }
    );
    let _cert_conn = match peer_der.filter(|_| by_cert) {
        None => None,
        Some(der) => match track_cert_conn(&shared, &conn, &der) {
            Ok(guard) => Some(guard),
            Err(reason) => {
                tracing::warn!(remote = %conn.remote_address(), role = ?hello.role, %reason, "connection refused");
                refuse(&conn, &mut writer, &reason).await;
                return Ok(());
            }
        },
    };
    // Recorded before the welcome, and checked again once recorded: a revocation that
    // lands in between still closes this connection.
    if let Admitted::Client {
        token: Some(token), ..
    } = &admitted
    {
        shared
            .token_conns()
            .entry(token.clone())
            .or_default()
            .push(conn.clone());
        let still = shared.tokens().check_id(token, now_ms());
        if let Err(e) = still {
            forget_token_conn(&shared, token, &conn);
            refuse(&conn, &mut writer, &e.to_string()).await;
            return Ok(());
        }
    }
    // A user's connections count against its quota (a job's credential counts as its own
    // user, `job N`).
    let slot = match &admitted {
        Admitted::Client { caller, .. } => match take_user_slot(&shared, caller) {
            Ok(slot) => Some(slot),
            Err(e) => {
                if let Admitted::Client {
                    token: Some(token), ..
                } = &admitted
                {
                    forget_token_conn(&shared, token, &conn);
                }
                tracing::warn!(remote = %conn.remote_address(), reason = %e, "connection refused");
                refuse(&conn, &mut writer, &e.to_string()).await;
                return Ok(());
            }
        },
        _ => None,
    };
    drop(pending);
    match &slot {
        Some(slot) => {
            let streams = shared.quotas.of(&slot.user).streams_per_connection;
            let streams = u32::try_from(streams)
                .unwrap_or(u32::MAX)
                .saturating_add(STREAMS_REFUSED_AT_ONCE_MAX)
                .min(limits::STREAMS_PER_CONNECTION_MAX);
            conn.set_receive_window(quinn::VarInt::from_u32(CLIENT_RECEIVE_WINDOW));
            conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(streams));
        }
        None => {
            conn.set_receive_window(quinn::VarInt::from_u32(AUTHENTICATED_RECEIVE_WINDOW));
            conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(
                limits::STREAMS_PER_CONNECTION_MAX,
            ));
        }
    }
    writer
        .write(&HelloReply::Welcome {
            head_version: shared.version.clone(),
        })
        .await?;
    match admitted {
        Admitted::Client { caller, token } => {
            let _ = writer.get_mut().finish();
            let Some(slot) = slot else {
                return Err(ConnError::Handshake("a client without a user slot".into()));
            };
            let result = client_connection(conn.clone(), shared.clone(), caller, slot).await;
            if let Some(token) = token {
                forget_token_conn(&shared, &token, &conn);
            }
            result
        }
        Admitted::Node { name } => {
            let reader = FrameReader::new(reader.into_inner(), limits::FRAME_BYTES_MAX);
            node_connection(conn, shared, writer, reader, name).await
        }
        Admitted::Join { token } => {
            let reader = FrameReader::new(reader.into_inner(), JOIN_FRAME_BYTES_MAX);
            join_node(conn, shared, writer, reader, token).await
        }
    }
}

/// Forgets a connection made with a certificate when its handling ends.
struct CertConn {
    shared: Arc<Shared>,
    id: usize,
}

impl Drop for CertConn {
    fn drop(&mut self) {
        self.shared.cert_conns().remove(&self.id);
    }
}

/// Checks the certificate a connection was made with against the revocations, and
/// records the connection so that a later revocation closes it. The error is the reason
/// to refuse it.
fn track_cert_conn(
    shared: &Arc<Shared>,
    conn: &quinn::Connection,
    der: &[u8],
) -> Result<CertConn, String> {
    let cert =
        Presented::of(der).map_err(|e| format!("the certificate presented is not usable: {e}"))?;
    shared.certs().check(&cert).map_err(|e| e.to_string())?;
    let id = conn.stable_id();
    shared.cert_conns().insert(id, (conn.clone(), cert.clone()));
    let guard = CertConn {
        shared: shared.clone(),
        id,
    };
    // A revocation between the check and the record would have missed this connection.
    shared.certs().check(&cert).map_err(|e| e.to_string())?;
    Ok(guard)
}

fn forget_token_conn(shared: &Shared, token: &str, conn: &quinn::Connection) {
    let mut conns = shared.token_conns();
    if let Some(list) = conns.get_mut(token) {
        list.retain(|c| c.stable_id() != conn.stable_id());
        if list.is_empty() {
            conns.remove(token);
        }
    }
}

/// Closes the connections of tokens revoked or expired since they connected.
fn close_lapsed(shared: &Shared) {
    // Certificates too: a revocation whose write failed is held in memory only, and the
    // sweep keeps its connections closed.
    shared.close_revoked_certs();
    let now = now_ms();
    let ids: Vec<String> = shared.token_conns().keys().cloned().collect();
    let lapsed: Vec<(String, String)> = {
        let book = shared.tokens();
        ids.into_iter()
            .filter_map(|id| book.check_id(&id, now).err().map(|e| (id, e.to_string())))
            .collect()
    };
    for (id, reason) in lapsed {
        let conns = shared.token_conns().remove(&id).unwrap_or_default();
        for conn in conns {
            close_with(&conn, CLOSE_REVOKED, &reason);
        }
    }
}

/// What an accepted hello may do.
#[derive(Debug)]
enum Admitted {
    Client {
        caller: Caller,
        /// The user token it came with, if any.
        token: Option<String>,
    },
    /// A node, as its certificate names it.
    Node { name: String },
    /// A node joining with the join token of this id.
    Join { token: String },
}

/// Authenticates a hello: the reason to refuse it otherwise. The reasons name tokens by id
/// at most.
fn admit(
    shared: &Shared,
    hello: &Hello,
    peer: Option<Result<PeerIdentity, flame_protocol::pki::PkiError>>,
) -> Result<Admitted, String> {
    let authenticate = |token: &Secret| {
        shared
            .tokens()
            .authenticate(token, now_ms())
            .map_err(|e| e.to_string())
    };
    match hello.role {
        Role::Client => {
            if let Some(token) = &hello.token {
                return match authenticate(token)? {
                    Authenticated::User { principal, token } => Ok(Admitted::Client {
                        caller: Caller::User(principal),
                        token: Some(token),
                    }),
                    Authenticated::Job(job) => Ok(Admitted::Client {
                        caller: Caller::Job(job),
                        token: None,
                    }),
                    Authenticated::NodeJoin { token } => Err(format!(
                        "token {token} is a node join token: it can only join nodes \
                         (flame-node join); clients need a user token"
                    )),
                };
            }
            match peer {
                Some(Ok(PeerIdentity::User { name, admin })) => Ok(Admitted::Client {
                    caller: Caller::User(Principal { name, admin }),
                    token: None,
                }),
                Some(Ok(PeerIdentity::Node(name))) => Err(format!(
                    "the certificate presented names node `{name}`, not a user; clients need \
                     a user token or a user certificate"
                )),
                Some(Err(e)) => Err(format!("the client certificate is not usable: {e}")),
                None => Err("no credentials: this head accepts no anonymous clients; give a \
                     user token (--token-file, FLAME_TOKEN_FILE, FLAME_TOKEN, or `token_file` in the client \
                     configuration), made by an admin with `flame-head token create --user NAME`"
                    .to_string()),
            }
        }
        Role::Node => match peer {
            Some(Ok(PeerIdentity::Node(name))) => Ok(Admitted::Node { name }),
            Some(Ok(PeerIdentity::User { name, .. })) => Err(format!(
                "the certificate presented names user `{name}`, not a node"
            )),
            Some(Err(e)) => Err(format!("the node certificate is not usable: {e}")),
            None => Err(
                "nodes must present a certificate signed by the cluster CA: \
                 run `flame-node join --token TOKEN --head ADDR` on the node first"
                    .to_string(),
            ),
        },
        Role::Join => match &hello.token {
            None => Err("joining needs a node join token (flame-head token create --node)".into()),
            Some(token) => match authenticate(token)? {
                Authenticated::NodeJoin { token } => Ok(Admitted::Join { token }),
                _ => Err("this token is not a node join token; make one with \
                     `flame-head token create --node`"
                    .to_string()),
            },
        },
    }
}

/// Sends a refusal as the hello's answer, gives the peer a moment to read it, and closes.
async fn refuse(conn: &quinn::Connection, writer: &mut Writer, reason: &str) {
    let _ = writer
        .write(&HelloReply::Refused {
            reason: reason.to_string(),
        })
        .await;
    let _ = writer.get_mut().finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    close_with(conn, CLOSE_REFUSED, reason);
}

/// `Role::Join`: reads the node's CSR, signs a certificate naming the node, answers, and
/// ends the connection.
async fn join_node(
    conn: quinn::Connection,
    shared: Arc<Shared>,
    mut writer: Writer,
    mut reader: Reader,
    token: String,
) -> Result<(), ConnError> {
    let request = tokio::time::timeout(
        limits::CONNECT_TIMEOUT,
        reader.read_required::<JoinRequest>(),
    )
    .await
    .map_err(|_| ConnError::Timeout("the join request"))??;
    let reply = match sign_joining_node(&shared, &request, &token).await {
        Ok(cert_pem) => {
            tracing::info!(node = %request.name, remote = %conn.remote_address(), %token, "signed a node certificate");
            JoinReply::Signed {
                cert_pem,
                ca_pem: shared.identity.ca_pem().to_string(),
            }
        }
        Err(reason) => {
            tracing::warn!(node = %request.name, remote = %conn.remote_address(), %token, %reason, "join refused");
            JoinReply::Refused { reason }
        }
    };
    writer.write(&reply).await?;
    let _ = writer.get_mut().finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    Ok(())
}

/// The checks and records of a join: the name is valid and free (or the token may replace
/// it), the token has a use left (spent here, durably), and the certificate issued becomes
/// the only one that node connects with; a node it replaces is disconnected. The error is
/// the reason to refuse the join.
async fn sign_joining_node(
    shared: &Arc<Shared>,
    request: &JoinRequest,
    token: &str,
) -> Result<String, String> {
    let name = request.name.clone();
    flame_protocol::model::validate_node_name(&name)
        .map_err(|e| format!("invalid node name: {e}"))?;
    // Joins are rare: one at a time.
    let _one_join = tokio::time::timeout(limits::REQUEST_TIMEOUT, shared.joins.lock())
        .await
        .map_err(|_| {
            format!(
                "another join held the head for {:?}; try again",
                limits::REQUEST_TIMEOUT
            )
        })?;
    let replacing = shared.tokens().replaces(token).as_deref() == Some(name.as_str());
    if !replacing {
        let store = shared.store.clone();
        let key = name.clone();
        let registered = tokio::task::spawn_blocking(move || store.node_registered(&key))
            .await
            .map_err(|_| "the head is shutting down".to_string())?
            .map_err(|e| format!("cannot read the node records: {e}"))?;
        if registered || shared.certs().has_node(&name) || shared.node_connection(&name).is_some() {
            return Err(format!(
                "a node named `{name}` exists already: a join cannot take an existing node's \
                 name. Choose another name, or, to replace that node (its certificate stops \
                 working), join with a token made by `flame-head token create --node \
                 --replace {name}`"
            ));
        }
    }
    let spent = shared
        .tokens()
        .spend(token, now_ms())
        .map_err(|e| e.to_string())?;
    let give_back = |shared: &Arc<Shared>, reason: String| {
        if let Some(stored) = shared.tokens().unspend(token) {
            let store = shared.store.clone();
            let id = token.to_string();
            // Best effort: the use stays spent in the store if this fails too.
            tokio::task::spawn_blocking(move || store.put_token(&id, &stored));
        }
        reason
    };
    let store = shared.store.clone();
    let id = token.to_string();
    let written = tokio::task::spawn_blocking(move || store.put_token(&id, &spent)).await;
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(give_back(shared, format!("cannot record the join: {e}"))),
        Err(_) => return Err(give_back(shared, "the head is shutting down".into())),
    }
    let (cert_pem, fingerprint) = shared
        .identity
        .sign_node(&name, &request.csr_pem)
        .map_err(|e| give_back(shared, format!("cannot sign the node's certificate: {e}")))?;
    let previous = shared.certs().node(&name);
    let recorded =
        shared
            .certs()
            .issue_node(&name, flame_protocol::auth::hex(&fingerprint), now_ms());
    let (key, record) = recorded.map_err(|e| give_back(shared, e.to_string()))?;
    let store = shared.store.clone();
    let written = tokio::task::spawn_blocking(move || store.put_cert_record(&key, &record)).await;
    if !matches!(written, Ok(Ok(()))) {
        shared.certs().restore_node(&name, previous);
        let why = match written {
            Ok(Err(e)) => format!("cannot record the node's certificate: {e}"),
            _ => "the head is shutting down".to_string(),
        };
        return Err(give_back(shared, why));
    }
    if replacing {
        tracing::warn!(node = %name, "a join replaced the node; its old certificate no longer connects");
        shared.close_revoked_certs();
    }
    Ok(cert_pem)
}

fn close_with(conn: &quinn::Connection, code: u32, reason: &str) {
    let reason: String = reason.chars().take(200).collect();
    conn.close(quinn::VarInt::from_u32(code), reason.as_bytes());
}

/// One stream of a connection, counted while it lives.
struct StreamSlot(Arc<std::sync::atomic::AtomicU64>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn client_connection(
    conn: quinn::Connection,
    shared: Arc<Shared>,
    caller: Caller,
    slot: UserSlot,
) -> Result<(), ConnError> {
    let slot = Arc::new(slot);
    let open = Arc::new(std::sync::atomic::AtomicU64::new(0));
    loop {
        let (send, recv) = conn.accept_bi().await?;
        let held = open.fetch_add(1, Ordering::Relaxed);
        let stream_slot = StreamSlot(open.clone());
        let shared = shared.clone();
        let conn = conn.clone();
        let caller = caller.clone();
        let slot = slot.clone();
        tokio::spawn(async move {
            let _stream_slot = stream_slot;
            let mut writer = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
            if let Err(e) = crate::quotas::check(
                shared.quotas.of(&slot.user),
                Quota::StreamsPerConnection,
                &slot.user,
                held,
                1,
            ) {
                // Answered without reading the request: the client reads a response first.
                let _ = tokio::time::timeout(
                    limits::REQUEST_TIMEOUT,
                    writer.write(&ClientResponse::Error(e.into())),
                )
                .await;
                let _ = writer.get_mut().finish();
                return;
            }
            let reader = FrameReader::new(recv, limits::FRAME_BYTES_MAX);
            if let Err(e) = client_stream(&conn, shared, &caller, &slot, writer, reader).await {
                if let ConnError::Frame(FrameError::Malformed(_) | FrameError::TooLarge { .. }) = &e
                {
                    // A malformed frame closes the connection, with the reason, and only it.
                    tracing::warn!(remote = %conn.remote_address(), error = %e, "closing connection");
                    close_with(&conn, CLOSE_PROTOCOL_ERROR, &e.to_string());
                } else {
                    tracing::debug!(error = %e, "client stream ended");
                }
            }
        });
    }
}

type Writer = FrameWriter<quinn::SendStream>;
type Reader = FrameReader<quinn::RecvStream>;

async fn ask<T>(
    shared: &Shared,
    make: impl FnOnce(oneshot::Sender<T>) -> Event,
) -> Result<T, ConnError> {
    let (tx, rx) = oneshot::channel();
    shared
        .events
        .send(make(tx))
        .await
        .map_err(|_| ConnError::CoreGone)?;
    tokio::time::timeout(limits::REQUEST_TIMEOUT, rx)
        .await
        .map_err(|_| ConnError::Timeout("the head's core"))?
        .map_err(|_| ConnError::CoreGone)
}

async fn client_stream(
    conn: &quinn::Connection,
    shared: Arc<Shared>,
    caller: &Caller,
    slot: &UserSlot,
    mut writer: Writer,
    mut reader: Reader,
) -> Result<(), ConnError> {
    let request = tokio::time::timeout(
        limits::REQUEST_TIMEOUT,
        reader.read_required::<ClientRequest>(),
    )
    .await
    .map_err(|_| ConnError::Timeout("a request"))??;
    let request = match authorize(&shared, caller, request).await? {
        Ok(request) => request,
        Err(e) => {
            writer.write(&ClientResponse::Error(e)).await?;
            let _ = writer.get_mut().finish();
            return Ok(());
        }
    };
    match request {
        ClientRequest::OpenSubmitStream { session } => {
            writer.write(&ClientResponse::Ok).await?;
            submit_stream(conn, shared, session, slot, writer, reader).await
        }
        ClientRequest::GetSession { id } => {
            let response = ask(&shared, |reply| Event::Client {
                request: ClientRequest::GetSession { id },
                reply,
            })
            .await?;
            let response = match response {
                ClientResponse::Error(e) if e.kind == ErrorKind::NotFound => {
                    match read_store(&shared, move |store| store.finished_session(id)).await? {
                        Ok(Some(info)) => ClientResponse::Session(info),
                        Ok(None) => ClientResponse::Error(e),
                        Err(e) => ClientResponse::Error(e),
                    }
                }
                other => other,
            };
            writer.write(&response).await?;
            let _ = writer.get_mut().finish();
            Ok(())
        }
        ClientRequest::ListSessions => {
            let response = ask(&shared, |reply| Event::Client {
                request: ClientRequest::ListSessions,
                reply,
            })
            .await?;
            // Users see their own sessions; admins see everyone's.
            let only = match caller {
                Caller::User(p) if p.admin => None,
                Caller::User(p) => Some(p.name.clone()),
                Caller::Job(job) => Some(format!("job {job}")),
            };
            let response = match response {
                ClientResponse::Sessions(mut live) => {
                    if let Some(name) = &only {
                        live.retain(|s| crate::core::owner_name(&s.owner) == name);
                    }
                    let owner = only.clone();
                    let done = read_store(&shared, move |store| {
                        store.finished_sessions(owner.as_deref(), FINISHED_LISTED_MAX)
                    })
                    .await?;
                    match done {
                        Ok(mut done) => {
                            done.reverse();
                            // Finished ones first (by id), then the live ones.
                            done.retain(|d| !live.iter().any(|l| l.id == d.id));
                            done.extend(live);
                            done.sort_by_key(|s| s.id);
                            ClientResponse::Sessions(done)
                        }
                        Err(e) => ClientResponse::Error(e),
                    }
                }
                other => other,
            };
            writer.write(&response).await?;
            let _ = writer.get_mut().finish();
            Ok(())
        }
        ClientRequest::WatchResults { session } => watch_stream(shared, session, writer).await,
        ClientRequest::Logs {
            session,
            executor,
            follow,
        } => {
            let user = stream_user(&shared, caller).await?;
            logs_stream(shared, &user, session, executor, follow, writer).await
        }
        ClientRequest::JobExec { job, node, argv } => {
            let user = stream_user(&shared, caller).await?;
            exec_stream(shared, &user, job, node, argv, writer).await
        }
        ClientRequest::ListTasks {
            session,
            states,
            after,
            limit,
        } => {
            let response = list_tasks(&shared, session, states, after, limit).await?;
            writer.write(&response).await?;
            let _ = writer.get_mut().finish();
            Ok(())
        }
        request @ (ClientRequest::CreateToken { .. }
        | ClientRequest::ListTokens
        | ClientRequest::RevokeToken { .. }
        | ClientRequest::RevokeCert { .. }
        | ClientRequest::ListCerts
        | ClientRequest::WhoAmI) => {
            let response = token_request(&shared, caller, request).await;
            writer.write(&response).await?;
            let _ = writer.get_mut().finish();
            Ok(())
        }
        request => {
            let mut response = ask(&shared, |reply| Event::Client { request, reply }).await?;
            // Users see their own sessions; admins see everyone's. Every user sees how the
            // cluster is shared between owners (`flame queue`), not others' sessions.
            if let Caller::User(p) = caller {
                if !p.admin {
                    match &mut response {
                        ClientResponse::Sessions(sessions) => {
                            sessions.retain(|s| crate::core::owner_name(&s.owner) == p.name)
                        }
                        ClientResponse::Queue(report) => {
                            for owner in &mut report.owners {
                                if owner.owner != p.name {
                                    owner.sessions.clear();
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            writer.write(&response).await?;
            let _ = writer.get_mut().finish();
            Ok(())
        }
    }
}

fn denied(message: String) -> ApiError {
    ApiError::new(ErrorKind::PermissionDenied, message)
}

/// Checks that `caller` may make `request` (who may make which: [`crate::auth::access`]),
/// and fills in what the caller decides (a new session's owner). The inner error is the
/// answer to send back.
async fn authorize(
    shared: &Shared,
    caller: &Caller,
    request: ClientRequest,
) -> Result<Result<ClientRequest, ApiError>, ConnError> {
    let principal = match caller {
        Caller::Job(job) => {
            return Ok(match &request {
                ClientRequest::JobExec { job: j, .. } if j == job => Ok(request),
                _ => Err(denied(format!(
                    "the credential of job {job} may only start processes of that job"
                ))),
            })
        }
        Caller::User(p) => p,
    };
    use crate::auth::{access, Access};
    let session = match access(&request) {
        Access::Admin { why } => {
            if !principal.admin {
                return Ok(Err(denied(format!(
                    "{why}; user `{}` is not an admin",
                    principal.name
                ))));
            }
            return Ok(Ok(request));
        }
        Access::SessionOwner(session) => Some(session),
        Access::NamedOwner => None,
        Access::Anyone => return Ok(Ok(request)),
    };
    if let Some(session) = session {
        let mut owner = ask(shared, |reply| Event::SessionOwner { session, reply }).await?;
        if owner.is_none() {
            // A finished session that left memory is in the store's finished table.
            owner = match read_store(shared, move |store| store.finished_session(session)).await? {
                Ok(info) => info.map(|i| crate::core::owner_name(&i.owner).to_string()),
                Err(e) => return Ok(Err(e)),
            };
        }
        if principal.admin && owner.is_some() {
            return Ok(Ok(request));
        }
        return Ok(match owner {
            // Answered here, for every request: a submit stream opened on a session that
            // does not exist yet must not be accepted once another user creates it.
            None => Err(ApiError::new(
                ErrorKind::NotFound,
                crate::core::unknown_session(session),
            )),
            Some(owner) if owner == principal.name => Ok(request),
            Some(_) => Err(denied(format!(
                "session {session} belongs to another user; only its owner or an admin may \
                 see its tasks and logs, or close or cancel it"
            ))),
        });
    }
    if let ClientRequest::CreateSession(mut spec) = request {
        if !spec.owner.is_empty() && spec.owner != principal.name && !principal.admin {
            return Ok(Err(denied(format!(
                "user `{}` cannot create sessions for owner `{}`; only admins act for others",
                principal.name, spec.owner
            ))));
        }
        if spec.owner.is_empty() {
            spec.owner = principal.name.clone();
        }
        return Ok(Ok(ClientRequest::CreateSession(spec)));
    }
    // `access` names an owner to check for session creations only: anything else that
    // gets here is refused, not let through.
    Ok(Err(denied(
        "this request names no owner to check".to_string(),
    )))
}

/// Token management and `WhoAmI`, answered here: tokens live in the server's book, not the
/// core. The caller is an admin (checked by [`authorize`]) except for `WhoAmI`.
async fn token_request(
    shared: &Arc<Shared>,
    caller: &Caller,
    request: ClientRequest,
) -> ClientResponse {
    let unavailable = |e: String| ClientResponse::Error(ApiError::new(ErrorKind::Unavailable, e));
    match request {
        ClientRequest::WhoAmI => match caller {
            Caller::User(p) => ClientResponse::Principal(p.clone()),
            Caller::Job(job) => ClientResponse::Principal(Principal {
                name: format!("job {job}"),
                admin: false,
            }),
        },
        ClientRequest::ListTokens => ClientResponse::Tokens(shared.tokens().list()),
        ClientRequest::CreateToken {
            kind,
            ttl_ms,
            uses_max,
            replace,
        } => {
            let limits = TokenLimits {
                ttl_ms,
                uses_max,
                replace,
            };
            let made = shared.tokens().create(kind, limits, now_ms());
            let (text, info, stored) = match made {
                Ok(made) => made,
                Err(e) => {
                    return ClientResponse::Error(ApiError::new(
                        ErrorKind::InvalidArgument,
                        e.to_string(),
                    ))
                }
            };
            let store = shared.store.clone();
            let id = info.id.clone();
            let written = tokio::task::spawn_blocking(move || store.put_token(&id, &stored)).await;
            match written {
                Ok(Ok(())) => {
                    tracing::info!(token = %info.id, kind = ?info.kind, "token created");
                    ClientResponse::TokenCreated { token: text, info }
                }
                Ok(Err(e)) => {
                    // Not durable: not usable either.
                    shared.tokens().revoke(&info.id);
                    unavailable(format!("cannot store the token: {e}"))
                }
                Err(_) => unavailable("the head is shutting down".into()),
            }
        }
        ClientRequest::RevokeToken { id } => {
            let Some(stored) = shared.tokens().revoke(&id) else {
                return ClientResponse::Error(ApiError::new(
                    ErrorKind::NotFound,
                    format!("no token with id `{id}`; `flame-head token list` shows them"),
                ));
            };
            let store = shared.store.clone();
            let key = id.clone();
            let written = tokio::task::spawn_blocking(move || store.put_token(&key, &stored)).await;
            match written {
                Ok(Ok(())) => {
                    let conns = shared.token_conns().remove(&id).unwrap_or_default();
                    for conn in conns {
                        close_with(
                            &conn,
                            CLOSE_REVOKED,
                            &format!("token {id} has been revoked"),
                        );
                    }
                    tracing::info!(token = %id, "token revoked");
                    ClientResponse::Ok
                }
                Ok(Err(e)) => unavailable(format!(
                    "the token is revoked until the head restarts, but storing that failed: {e}"
                )),
                Err(_) => unavailable("the head is shutting down".into()),
            }
        }
        ClientRequest::ListCerts => ClientResponse::Certs(shared.certs().list()),
        ClientRequest::RevokeCert { target } => revoke_cert(shared, target).await,
        other => ClientResponse::Error(ApiError::new(
            ErrorKind::Internal,
            format!("not a token request: {other:?}"),
        )),
    }
}

/// `flame-head cert revoke`: records the revocation durably, then closes the connections
/// made with what it revokes.
async fn revoke_cert(shared: &Arc<Shared>, target: CertTarget) -> ClientResponse {
    let unavailable = |e: String| ClientResponse::Error(ApiError::new(ErrorKind::Unavailable, e));
    let known_node = match &target {
        CertTarget::Node(name) if !shared.certs().has_node(name) => {
            let store = shared.store.clone();
            let key = name.clone();
            let registered = tokio::task::spawn_blocking(move || store.node_registered(&key)).await;
            match registered {
                Ok(Ok(registered)) => registered || shared.node_connection(name).is_some(),
                Ok(Err(e)) => return unavailable(format!("cannot read the node records: {e}")),
                Err(_) => return unavailable("the head is shutting down".into()),
            }
        }
        _ => false,
    };
    let what = format!("{target:?}");
    let previous = match &target {
        CertTarget::Node(name) => shared.certs().node(name),
        _ => None,
    };
    let node = match &target {
        CertTarget::Node(name) => Some(name.clone()),
        _ => None,
    };
    let revoked = shared.certs().revoke(target, known_node, now_ms());
    let (key, record) = match revoked {
        Ok(r) => r,
        Err(e @ crate::certs::CertError::UnknownNode(_)) => {
            return ClientResponse::Error(ApiError::new(ErrorKind::NotFound, e.to_string()))
        }
        Err(e) => {
            return ClientResponse::Error(ApiError::new(ErrorKind::InvalidArgument, e.to_string()))
        }
    };
    let store = shared.store.clone();
    let written = tokio::task::spawn_blocking(move || store.put_cert_record(&key, &record)).await;
    match written {
        Ok(Ok(())) => {
            shared.close_revoked_certs();
            tracing::warn!(revoked = %what, "certificate revoked");
            ClientResponse::Ok
        }
        Ok(Err(e)) => {
            // Not durable: a node record goes back as it was, so that the head's memory
            // and the store agree; a revoked serial stays refused until the restart.
            if let Some(name) = node {
                shared.certs().restore_node(&name, previous);
            }
            // What is still refused in memory is refused on the open connections too.
            shared.close_revoked_certs();
            unavailable(format!("storing the revocation failed: {e}"))
        }
        Err(_) => unavailable("the head is shutting down".into()),
    }
}

/// Lists tasks from the core's memory, or from the store once the session has finished.
async fn list_tasks(
    shared: &Arc<Shared>,
    session: flame_protocol::SessionId,
    states: Vec<flame_protocol::model::TaskState>,
    after: TaskId,
    limit: u32,
) -> Result<ClientResponse, ConnError> {
    let answer = ask(shared, |reply| Event::ListTasks {
        session,
        states: states.clone(),
        after,
        limit,
        reply,
    })
    .await?;
    Ok(match answer {
        Err(e) => ClientResponse::Error(e),
        Ok(Some(tasks)) => ClientResponse::Tasks(tasks),
        Ok(None) => {
            let store = shared.store.clone();
            let limit = (limit as usize).min(limits::MESSAGE_BATCH_MAX);
            let read = tokio::task::spawn_blocking(move || {
                store.list_tasks(session, &states, after, limit)
            })
            .await
            .map_err(|_| ConnError::CoreGone)?;
            match read {
                Ok(tasks) => ClientResponse::Tasks(tasks),
                Err(e) => ClientResponse::Error(ApiError::new(
                    ErrorKind::Unavailable,
                    format!("cannot read the tasks of session {session}: {e}"),
                )),
            }
        }
    })
}

/// Runs a read of the store on a blocking thread; a store error becomes the answer
/// `Unavailable`.
async fn read_store<T: Send + 'static>(
    shared: &Shared,
    read: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<Result<T, ApiError>, ConnError> {
    let store = shared.store.clone();
    let out = tokio::task::spawn_blocking(move || read(&store))
        .await
        .map_err(|_| ConnError::CoreGone)?;
    Ok(out.map_err(|e| {
        ApiError::new(
            ErrorKind::Unavailable,
            format!("cannot read the head's store: {e}"),
        )
    }))
}

/// Reads the next frame of a stream. Between frames the peer may stay silent for `idle`
/// (`None`: as long as it likes; the connection's keep-alives tell a dead peer); once a
/// frame has begun, a peer that sends nothing more of it for [`FRAME_STALL_TIMEOUT`] is
/// cut off, so a stalled peer cannot hold a half-read frame. Cancel-safe.
async fn read_bounded<T: serde::de::DeserializeOwned>(
    reader: &mut Reader,
    idle: Option<Duration>,
) -> Result<Option<T>, ConnError> {
    read_within(reader, idle, FRAME_STALL_TIMEOUT).await
}

/// [`read_bounded`] over any byte stream, with the stall bound given.
async fn read_within<T: serde::de::DeserializeOwned, R: tokio::io::AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    idle: Option<Duration>,
    stall: Duration,
) -> Result<Option<T>, ConnError> {
    let mut progress = reader.progress();
    let mut idle_left = idle;
    loop {
        let wait = match (progress, idle_left) {
            (0, Some(left)) => left.min(stall),
            _ => stall,
        };
        match tokio::time::timeout(wait, reader.read::<T>()).await {
            Ok(frame) => return Ok(frame?),
            Err(_) => {
                let now = reader.progress();
                if now == 0 {
                    if let Some(left) = idle_left.as_mut() {
                        *left = left.saturating_sub(wait);
                        if left.is_zero() {
                            return Err(ConnError::Timeout("the next frame"));
                        }
                    }
                } else if now == progress {
                    return Err(ConnError::Timeout(
                        "the rest of a frame (the peer stalled in the middle of one)",
                    ));
                }
                progress = now;
            }
        }
    }
}

/// The length of the next frame, like [`read_bounded`] but without its body.
async fn next_len_bounded(reader: &mut Reader) -> Result<Option<usize>, ConnError> {
    loop {
        match tokio::time::timeout(FRAME_STALL_TIMEOUT, reader.next_len()).await {
            Ok(len) => return Ok(len?),
            // Silence between frames is allowed; a stall inside the length prefix is not.
            Err(_) if reader.progress() == 0 => continue,
            Err(_) => return Err(ConnError::Timeout("the rest of a frame's length")),
        }
    }
}

/// [`Store::settle_refused`] on a blocking thread.
async fn settle_refused(store: &Store, session: SessionId, reply: SubmitReply) -> SubmitReply {
    if !matches!(&reply, SubmitReply::Rejected { error, .. } if error.kind == ErrorKind::FailedPrecondition)
    {
        return reply;
    }
    let store = store.clone();
    let fallback = reply.clone();
    tokio::task::spawn_blocking(move || store.settle_refused(session, reply))
        .await
        .unwrap_or(fallback)
}

/// A submit stream: batches in, replies out in batch order from a second task, so many
/// batches can be in flight and the reader never waits for a commit. What the stream holds
/// is bounded by what the head admits: before taking a batch's body it takes that many
/// bytes of its owner's `submit_bytes_in_flight` budget, given back once the core has
/// answered (the tasks are then in the core's quota ledger, or refused); while the budget
/// is spent the stream is not read, and QUIC flow control holds the peer back.
async fn submit_stream(
    _conn: &quinn::Connection,
    shared: Arc<Shared>,
    session: flame_protocol::SessionId,
    slot: &UserSlot,
    mut writer: Writer,
    mut reader: Reader,
) -> Result<(), ConnError> {
    type Pending = (
        u64,
        oneshot::Receiver<SubmitReply>,
        tokio::sync::OwnedSemaphorePermit,
    );
    let (acks_tx, mut acks_rx) = mpsc::channel::<Pending>(SUBMIT_BATCHES_IN_FLIGHT_MAX);
    let store = shared.store.clone();
    let replier = tokio::spawn(async move {
        while let Some((batch_id, rx, permit)) = acks_rx.recv().await {
            let reply = rx.await.unwrap_or(SubmitReply::Rejected {
                batch_id,
                error: ApiError::new(ErrorKind::Unavailable, "the head is shutting down"),
            });
            drop(permit);
            let reply = settle_refused(&store, session, reply).await;
            if writer.write(&reply).await.is_err() {
                break;
            }
        }
        let _ = writer.get_mut().finish();
    });
    let budget = slot.submit_budget.clone();
    let budget_units =
        shared.quotas.of(&slot.user).submit_bytes_in_flight / SUBMIT_BUDGET_UNIT_BYTES;
    let result = loop {
        let len = match next_len_bounded(&mut reader).await {
            Ok(Some(len)) => len,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        // A frame larger than the whole budget takes all of it, and goes alone.
        let units = (len as u64 / SUBMIT_BUDGET_UNIT_BYTES + 1).clamp(1, budget_units.max(1));
        let permit = match budget
            .clone()
            .acquire_many_owned(u32::try_from(units).unwrap_or(u32::MAX))
            .await
        {
            Ok(permit) => permit,
            Err(_) => break Err(ConnError::CoreGone),
        };
        let batch = match read_bounded::<SubmitBatch>(&mut reader, None).await {
            Ok(Some(b)) => b,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let (tx, rx) = oneshot::channel();
        let batch_id = batch.batch_id;
        if shared
            .events
            .send(Event::Submit {
                session,
                batch_id,
                inputs: batch.inputs,
                reply: tx,
            })
            .await
            .is_err()
        {
            break Err(ConnError::CoreGone);
        }
        if acks_tx.send((batch_id, rx, permit)).await.is_err() {
            break Ok(());
        }
    };
    drop(acks_tx);
    let _ = replier.await;
    result
}

/// A watch: the results already final (from the core's memory for an ephemeral session,
/// else from the store, a page at a time), then the live ones from the core's bounded
/// queue, each task once, then `Finished`. A watcher that falls behind is dropped by the
/// core and told `Lagged`; the client watches again.
async fn watch_stream(
    shared: Arc<Shared>,
    session: flame_protocol::SessionId,
    mut writer: Writer,
) -> Result<(), ConnError> {
    let (sink, mut live): (_, WatchSource) = watch_queue();
    let start = ask(&shared, |reply| Event::Watch {
        session,
        sink,
        reply,
    })
    .await?;
    let start = match start {
        Ok(s) => s,
        Err(e) => {
            writer.write(&ClientResponse::Error(e)).await?;
            let _ = writer.get_mut().finish();
            return Ok(());
        }
    };
    writer.write(&ClientResponse::Ok).await?;
    // Results that were already durable may also arrive live; each goes out once.
    let mut sent = TaskIdSet::default();
    // How the live queue ended, if it did during the backfill: `Some(true)` Finished,
    // `Some(false)` dropped for lagging.
    let mut ended = None;
    match start.backfill {
        Backfill::Memory(backfill) => {
            for r in &backfill {
                sent.insert(r.task);
            }
            for chunk in backfill.chunks(limits::MESSAGE_BATCH_MAX) {
                writer.write(&WatchEvent::Results(chunk.to_vec())).await?;
            }
        }
        Backfill::Store => {
            let mut after = TaskId(0);
            loop {
                let page = read_store(&shared, move |store| {
                    store.final_results_page(
                        session,
                        after,
                        WATCH_BACKFILL_PAGE_RESULTS,
                        WATCH_BACKFILL_PAGE_BYTES,
                    )
                })
                .await?;
                let mut page = match page {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::error!(%session, error = %e, "cannot read results for a watcher");
                        return Ok(());
                    }
                };
                let Some(last) = page.last() else { break };
                after = last.task;
                page.retain(|r| sent.insert(r.task));
                if !page.is_empty() {
                    writer.write(&WatchEvent::Results(page)).await?;
                }
                // Live results go out between pages, so that a long backfill of a busy
                // session does not make its own watch lag.
                if ended.is_none() && !start.finished {
                    ended = forward_queued(&mut live, &mut sent, &mut writer).await?;
                }
            }
        }
    }
    if ended.is_none() && !start.finished {
        loop {
            let msg = tokio::select! {
                msg = live.recv() => msg,
                // The client went away: stop watching instead of waiting for results.
                _ = writer.get_mut().stopped() => return Ok(()),
            };
            match msg {
                Some(WatchMsg::Results(results)) => {
                    write_new_results(results, &mut sent, &mut writer).await?;
                }
                Some(WatchMsg::Finished) => break,
                None => {
                    ended = Some(false);
                    break;
                }
            }
        }
    }
    if ended == Some(false) {
        // The core dropped this watcher without `Finished`: it fell behind.
        writer
            .write(&WatchEvent::Lagged {
                reason: format!(
                    "this watch fell more than {} messages or {} bytes behind the \
                     session's results; watch again to get the rest from the store",
                    crate::watch::WATCH_QUEUE_MESSAGES_MAX,
                    crate::watch::WATCH_QUEUE_BYTES_MAX
                ),
            })
            .await?;
        let _ = writer.get_mut().finish();
        return Ok(());
    }
    writer.write(&WatchEvent::Finished).await?;
    let _ = writer.get_mut().finish();
    Ok(())
}

/// Writes the results not sent yet on this watch.
async fn write_new_results(
    mut results: Vec<TaskResult>,
    sent: &mut TaskIdSet,
    writer: &mut Writer,
) -> Result<(), ConnError> {
    results.retain(|r| sent.insert(r.task));
    for chunk in results.chunks(limits::MESSAGE_BATCH_MAX) {
        writer.write(&WatchEvent::Results(chunk.to_vec())).await?;
    }
    Ok(())
}

/// Forwards what the watcher's queue holds now, without waiting; how the queue ended, if
/// it did (`Some(true)`: Finished, `Some(false)`: dropped for lagging).
async fn forward_queued(
    live: &mut WatchSource,
    sent: &mut TaskIdSet,
    writer: &mut Writer,
) -> Result<Option<bool>, ConnError> {
    loop {
        match live.try_recv() {
            Ok(WatchMsg::Results(results)) => write_new_results(results, sent, writer).await?,
            Ok(WatchMsg::Finished) => return Ok(Some(true)),
            Err(mpsc::error::TryRecvError::Empty) => return Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => return Ok(Some(false)),
        }
    }
}

async fn node_connection(
    conn: quinn::Connection,
    shared: Arc<Shared>,
    mut writer: Writer,
    mut reader: Reader,
    certified_name: String,
) -> Result<(), ConnError> {
    let registration = match tokio::time::timeout(
        limits::CONNECT_TIMEOUT,
        reader.read_required::<NodeToHead>(),
    )
    .await
    {
        Err(_) => return Err(ConnError::Timeout("the node registration")),
        Ok(Err(e)) => {
            close_with(
                &conn,
                CLOSE_PROTOCOL_ERROR,
                &format!("bad registration: {e}"),
            );
            return Err(e.into());
        }
        Ok(Ok(NodeToHead::Register(r))) => r,
        Ok(Ok(other)) => {
            let reason = format!("expected a registration, got {other:?}");
            close_with(&conn, CLOSE_PROTOCOL_ERROR, &reason);
            return Err(ConnError::Handshake(reason));
        }
    };
    let invalid = match flame_protocol::model::validate_node_name(&registration.name) {
        Err(e) => Some(format!("invalid node name: {e}")),
        Ok(()) if registration.name != certified_name => Some(format!(
            "this node's certificate names node `{certified_name}`, but it registers as `{}`: \
             a node can only act as the node its certificate names",
            registration.name
        )),
        Ok(()) => None,
    };
    if let Some(reason) = invalid {
        tracing::warn!(remote = %conn.remote_address(), %reason, "node refused");
        let _ = writer
            .write(&flame_protocol::messages::HeadToNode::Refused {
                reason: reason.clone(),
            })
            .await;
        let _ = writer.get_mut().finish();
        // Give the node the chance to read the refusal before the connection closes.
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
        close_with(&conn, CLOSE_REFUSED, &reason);
        return Err(ConnError::Handshake(reason));
    }
    let conn_id: ConnId = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let (link_tx, mut link_rx) = mpsc::unbounded_channel();
    let name = registration.name.clone();
    shared
        .events
        .send(Event::NodeConnected {
            conn: conn_id,
            address: conn.remote_address().ip().to_canonical().to_string(),
            registration,
            link: link_tx,
        })
        .await
        .map_err(|_| ConnError::CoreGone)?;
    shared.nodes().insert(name.clone(), (conn_id, conn.clone()));
    // Frames to the node, in order. When the core drops the link (the node was declared
    // lost), the connection is closed so the node reconnects and registers afresh.
    let writer_conn = conn.clone();
    let writer_task = tokio::spawn(async move {
        while let Some(msg) = link_rx.recv().await {
            if writer.write(&msg).await.is_err() {
                return;
            }
        }
        close_with(
            &writer_conn,
            CLOSE_NODE_LOST,
            "the head declared this node lost",
        );
    });
    let reason = loop {
        // A silent node is the core's to declare lost (heartbeat timeout); one stalled in
        // the middle of a frame is cut off here.
        match read_bounded::<NodeToHead>(&mut reader, None).await {
            Ok(Some(message)) => {
                if shared
                    .events
                    .send(Event::NodeMessage {
                        conn: conn_id,
                        message,
                    })
                    .await
                    .is_err()
                {
                    break "the head is shutting down".to_string();
                }
            }
            Ok(None) => break "the node closed its control stream".to_string(),
            Err(e) => {
                if matches!(
                    e,
                    ConnError::Frame(FrameError::Malformed(_) | FrameError::TooLarge { .. })
                ) {
                    close_with(&conn, CLOSE_PROTOCOL_ERROR, &e.to_string());
                } else if let ConnError::Timeout(_) = e {
                    close_with(&conn, CLOSE_NODE_LOST, &e.to_string());
                }
                break e.to_string();
            }
        }
    };
    {
        let mut nodes = shared.nodes();
        if nodes.get(&name).is_some_and(|(id, _)| *id == conn_id) {
            nodes.remove(&name);
        }
    }
    let _ = shared
        .events
        .send(Event::NodeDisconnected {
            conn: conn_id,
            reason,
        })
        .await;
    writer_task.abort();
    Ok(())
}

/// Whom the streams a caller opens to nodes count against: its user, or for a job's
/// credential the job's owner.
async fn stream_user(shared: &Shared, caller: &Caller) -> Result<String, ConnError> {
    Ok(match caller {
        Caller::User(p) => p.name.clone(),
        Caller::Job(job) => {
            let job = *job;
            ask(shared, |reply| Event::SessionOwner {
                session: job,
                reply,
            })
            .await?
            .unwrap_or_else(|| format!("job {job}"))
        }
    })
}

/// `ClientRequest::Logs`: asks each node involved for its executors' logs on a stream of
/// its own and forwards their frames as they come, several nodes at once; then `End`.
/// A node that is not connected, or whose stream fails, becomes one
/// `LogEvent::Unavailable` and the others go on. When the client goes away the node
/// streams are dropped, which stops them on the nodes.
///
/// The executors are those that served the session when the request arrived; with
/// `follow`, one bound to it later is not added.
async fn logs_stream(
    shared: Arc<Shared>,
    user: &str,
    session: SessionId,
    executor: Option<ExecutorId>,
    follow: bool,
    mut writer: Writer,
) -> Result<(), ConnError> {
    let targets = ask(&shared, |reply| Event::LogTargets {
        session,
        executor,
        reply,
    })
    .await?;
    // A finished session that left memory: the executors its stored view names.
    let targets = match targets {
        Err(e) if e.kind == ErrorKind::NotFound => {
            match read_store(&shared, move |store| store.finished_session(session)).await? {
                Ok(Some(info)) => crate::core::served_targets(
                    session,
                    info.usage
                        .iter()
                        .map(|u| (u.executor, u.node.as_str()))
                        .collect(),
                    executor,
                )
                .map(LogTargets::Now),
                Ok(None) => Err(e),
                Err(e) => Err(e),
            }
        }
        other => other,
    };
    // One per target node, in order, once granted.
    let mut permits = Vec::new();
    let targets = match targets {
        Ok(LogTargets::Now(targets)) => {
            // Refused whole, before anything is opened, when a node is at the user's bound.
            match shared
                .node_streams
                .acquire_all(user, targets.iter().map(|(node, _)| node.as_str()))
            {
                Ok(all) => permits = all,
                Err(e) => {
                    writer.write(&ClientResponse::Error(e)).await?;
                    let _ = writer.get_mut().finish();
                    return Ok(());
                }
            }
            writer.write(&ClientResponse::Ok).await?;
            targets
        }
        Ok(LogTargets::WhenStarted(later)) => {
            writer.write(&ClientResponse::Ok).await?;
            // As long as the job waits for room, or until the client goes away.
            let answer = tokio::select! {
                answer = later => answer,
                _ = writer.get_mut().stopped() => return Ok(()),
            };
            match answer {
                Ok(Ok(targets)) => targets,
                Ok(Err(e)) => {
                    writer
                        .write(&LogEvent::Unavailable {
                            node: String::new(),
                            reason: e.message,
                        })
                        .await?;
                    Vec::new()
                }
                Err(_) => return Err(ConnError::CoreGone),
            }
        }
        Err(e) => {
            writer.write(&ClientResponse::Error(e)).await?;
            let _ = writer.get_mut().finish();
            return Ok(());
        }
    };
    let (tx, mut rx) = mpsc::channel::<LogEvent>(LOG_EVENTS_BUFFERED_MAX);
    // Dropped on every return: aborts the readers, whose dropped streams stop the nodes.
    let mut readers = JoinSet::new();
    let mut permits = permits.into_iter();
    for (node, executors) in targets {
        // Each reader holds its node's permit until it ends. A node at the user's bound
        // (possible for a job that started meanwhile) is unavailable, saying why.
        let permit = match permits
            .next()
            .map_or_else(|| shared.node_streams.acquire(user, &node), Ok)
        {
            Ok(permit) => permit,
            Err(e) => {
                writer
                    .write(&LogEvent::Unavailable {
                        node,
                        reason: e.message,
                    })
                    .await?;
                continue;
            }
        };
        let conn = shared.node_connection(&node);
        let request = NodeLogRequest {
            session,
            executors,
            follow,
        };
        let tx = tx.clone();
        readers.spawn(async move {
            node_logs(node, conn, request, tx).await;
            drop(permit);
        });
    }
    drop(tx);
    // Until every reader is done, or the other side stops reading; dropping `readers`
    // then stops them.
    flame_protocol::endpoint::relay_log_events(&mut writer, &mut rx).await?;
    Ok(())
}

/// Reads one node's part of a `flame logs` into `tx`; a failure ends as one
/// `LogEvent::Unavailable` naming the node.
async fn node_logs(
    node: String,
    conn: Option<quinn::Connection>,
    request: NodeLogRequest,
    tx: mpsc::Sender<LogEvent>,
) {
    let reason = match conn {
        None => "the node is not connected to the head".to_string(),
        Some(conn) => match read_node_logs(&node, &conn, request, &tx).await {
            Ok(()) => return,
            Err(reason) => reason,
        },
    };
    // A closed channel means the client is gone; nobody is left to tell.
    let _ = tx.send(LogEvent::Unavailable { node, reason }).await;
}

/// Opens a log stream to the node, sends the request, and forwards the node's frames until
/// its `End`. `Ok` also when the client went away meanwhile; `Err` says why the node's logs
/// could not be read to their end.
async fn read_node_logs(
    node: &str,
    conn: &quinn::Connection,
    request: NodeLogRequest,
    tx: &mpsc::Sender<LogEvent>,
) -> Result<(), String> {
    let asked: HashSet<ExecutorId> = request.executors.iter().copied().collect();
    let follow = request.follow;
    let request = NodeStreamRequest::Logs(request);
    let open = async {
        let (send, recv) = conn.open_bi().await?;
        let mut writer = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
        writer.write(&request).await?;
        Ok::<_, ConnError>((writer, recv))
    };
    let (writer, recv) = match tokio::time::timeout(NODE_LOG_OPEN_TIMEOUT, open).await {
        Err(_) => {
            return Err(format!(
                "the node did not take the log request within {NODE_LOG_OPEN_TIMEOUT:?}"
            ))
        }
        Ok(Err(e)) => return Err(format!("cannot ask the node for logs: {e}")),
        Ok(Ok(opened)) => opened,
    };
    // The request is all the head sends. Dropping `reader` early (the client left) stops
    // the node's side.
    let _ = writer.into_inner().finish();
    let mut reader = FrameReader::new(recv, NODE_LOG_FRAME_BYTES_MAX);
    loop {
        // Following, a log may stay quiet for as long as its executor does.
        let idle = (!follow).then_some(NODE_LOG_SILENCE_MAX);
        let frame = read_bounded::<LogEvent>(&mut reader, idle).await;
        let event = match frame {
            Ok(Some(LogEvent::Chunk {
                executor,
                data,
                stderr,
                ..
            })) => {
                if !asked.contains(&executor) {
                    return Err(format!(
                        "the node sent the log of executor {executor}, which was not asked for"
                    ));
                }
                // Named by the connection it came on, whatever the node put there.
                LogEvent::Chunk {
                    executor,
                    node: node.to_string(),
                    data,
                    stderr,
                }
            }
            Ok(Some(LogEvent::Unavailable { reason, .. })) => LogEvent::Unavailable {
                node: node.to_string(),
                reason,
            },
            Ok(Some(LogEvent::End)) => return Ok(()),
            Ok(None) => return Err("the node ended its log stream early".to_string()),
            Err(ConnError::Timeout("the next frame")) => {
                return Err(format!(
                    "the node sent nothing for {NODE_LOG_SILENCE_MAX:?}"
                ))
            }
            Err(e) => return Err(format!("reading the node's logs failed: {e}")),
        };
        if tx.send(event).await.is_err() {
            return Ok(());
        }
    }
}

/// Longest command line of a `JobExec`, in bytes: within what a node reads as a stream
/// request (1 MiB), with room for the rest of the request.
pub const EXEC_ARGV_BYTES_MAX: usize = 512 * 1024;

/// `ClientRequest::JobExec`: finds the rank of the job on the node (the core), opens a
/// stream to that node with the command, and relays the node's `ExecEvent` frames to the
/// client until the process ends. When the client goes away the node stream is dropped,
/// which kills the process on the node.
async fn exec_stream(
    shared: Arc<Shared>,
    user: &str,
    job: SessionId,
    node: String,
    argv: Vec<String>,
    mut writer: Writer,
) -> Result<(), ConnError> {
    let refuse =
        |message: String| ClientResponse::Error(ApiError::new(ErrorKind::InvalidArgument, message));
    let bytes: usize = argv.iter().map(String::len).sum();
    if argv.iter().any(|a| a.contains('\0')) || bytes > EXEC_ARGV_BYTES_MAX {
        writer
            .write(&refuse(format!(
                "the command must be at most {EXEC_ARGV_BYTES_MAX} bytes without NUL bytes"
            )))
            .await?;
        let _ = writer.get_mut().finish();
        return Ok(());
    }
    if argv.is_empty() || argv.len() > flame_protocol::messages::EXEC_ARGS_MAX {
        writer
            .write(&refuse(format!(
                "the command must have 1 to {} arguments",
                flame_protocol::messages::EXEC_ARGS_MAX
            )))
            .await?;
        let _ = writer.get_mut().finish();
        return Ok(());
    }
    let target = ask(&shared, |reply| Event::ExecTarget {
        job,
        node: node.clone(),
        reply,
    })
    .await?;
    let executor = match target {
        Ok(executor) => executor,
        Err(e) => {
            writer.write(&ClientResponse::Error(e)).await?;
            let _ = writer.get_mut().finish();
            return Ok(());
        }
    };
    let Some(conn) = shared.node_connection(&node) else {
        writer
            .write(&ClientResponse::Error(ApiError::new(
                ErrorKind::Unavailable,
                format!("node `{node}` is not connected to the head"),
            )))
            .await?;
        let _ = writer.get_mut().finish();
        return Ok(());
    };
    // Held until the process ends or the client leaves (dropped on return).
    let _permit = match shared.node_streams.acquire(user, &node) {
        Ok(permit) => permit,
        Err(e) => {
            writer.write(&ClientResponse::Error(e)).await?;
            let _ = writer.get_mut().finish();
            return Ok(());
        }
    };
    let request = NodeStreamRequest::Exec(NodeExecRequest {
        executor,
        argv,
        env: Vec::new(),
    });
    let open = async {
        let (send, recv) = conn.open_bi().await?;
        let mut node_writer = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
        node_writer.write(&request).await?;
        Ok::<_, ConnError>((node_writer, recv))
    };
    let (node_writer, recv) = match tokio::time::timeout(NODE_LOG_OPEN_TIMEOUT, open).await {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => {
            writer
                .write(&ClientResponse::Error(ApiError::new(
                    ErrorKind::Unavailable,
                    format!("cannot reach node `{node}`: {e}"),
                )))
                .await?;
            let _ = writer.get_mut().finish();
            return Ok(());
        }
        Err(_) => {
            writer
                .write(&ClientResponse::Error(ApiError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "node `{node}` did not take the request within {NODE_LOG_OPEN_TIMEOUT:?}"
                    ),
                )))
                .await?;
            let _ = writer.get_mut().finish();
            return Ok(());
        }
    };
    // Kept open (not finished): the node takes a finished or reset stream as a request to
    // stop; dropped on return.
    let _node_send = node_writer.into_inner();
    writer.write(&ClientResponse::Ok).await?;
    let mut reader = FrameReader::new(recv, limits::FRAME_BYTES_MAX);
    loop {
        let frame = tokio::select! {
            frame = read_bounded::<ExecEvent>(&mut reader, None) => frame,
            _ = writer.get_mut().stopped() => return Ok(()),
        };
        let event = match frame {
            Ok(Some(event)) => event,
            Ok(None) => ExecEvent::Failed {
                reason: format!("node `{node}` ended the stream early"),
            },
            Err(e) => ExecEvent::Failed {
                reason: format!("reading from node `{node}` failed: {e}"),
            },
        };
        let last = matches!(event, ExecEvent::Exited { .. } | ExecEvent::Failed { .. });
        writer.write(&event).await?;
        if last {
            let _ = writer.get_mut().finish();
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    const STALL: Duration = Duration::from_millis(200);

    fn framed(body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn handshakes_are_counted_per_ipv4_address_and_per_ipv6_64() {
        let a: std::net::IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: std::net::IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: std::net::IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(handshake_source(a), handshake_source(b));
        assert_ne!(handshake_source(a), handshake_source(c));
        let v4: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: std::net::IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(handshake_source(v4), v4);
        assert_eq!(handshake_source(mapped), v4);
    }

    #[test]
    fn stall_meter_tells_a_stall_from_the_loop_cadence() {
        let start = std::time::Instant::now();
        let mut meter = StallMeter::new(start, 1_000_000);
        // Ordinary turns: a tick period apart, or faster while busy.
        assert_eq!(meter.turn(start + TICK, 1_000_200), None);
        assert_eq!(meter.turn(start + TICK * 2, 1_000_400), None);
        // Stopped for 15 s: both clocks moved.
        let woke = start + TICK * 2 + Duration::from_secs(15);
        assert_eq!(meter.turn(woke, 1_015_400), Some(15_000 - 200));
        // A frozen VM: the monotonic clock stood still, the wall clock moved 20 s.
        assert_eq!(meter.turn(woke, 1_035_400), Some(20_000 - 200));
        // A wall clock stepped back is no stall.
        assert_eq!(meter.turn(woke + TICK, 1_000_000), None);
    }

    #[tokio::test]
    async fn a_peer_stalled_mid_frame_is_cut_off_and_a_slow_or_idle_one_is_not() {
        // Half a frame, then nothing: cut off after the stall bound.
        let (mut peer, head) = tokio::io::duplex(1024);
        let mut reader = FrameReader::new(head, 1024);
        let frame = framed(&postcard::to_allocvec(&"hello").unwrap());
        peer.write_all(&frame[..frame.len() - 2]).await.unwrap();
        let started = tokio::time::Instant::now();
        let got = read_within::<String, _>(&mut reader, None, STALL).await;
        assert!(
            matches!(got, Err(ConnError::Timeout(what)) if what.contains("stalled")),
            "{got:?}"
        );
        assert!(started.elapsed() >= STALL);

        // A frame trickled a byte at a time, each within the bound: read whole.
        let (mut peer, head) = tokio::io::duplex(1024);
        let mut reader = FrameReader::new(head, 1024);
        let body = postcard::to_allocvec(&"a slow but steady frame").unwrap();
        let frame = framed(&body);
        let trickle = tokio::spawn(async move {
            for b in frame {
                peer.write_all(&[b]).await.unwrap();
                tokio::time::sleep(STALL / 4).await;
            }
            peer
        });
        let got = read_within::<String, _>(&mut reader, None, STALL).await;
        assert_eq!(got.unwrap().as_deref(), Some("a slow but steady frame"));
        let _peer = trickle.await.unwrap();

        // Silence between frames: allowed without an idle bound, refused past one.
        let (_peer, head) = tokio::io::duplex(1024);
        let mut reader = FrameReader::new(head, 1024);
        let waited = tokio::time::timeout(
            STALL * 3,
            read_within::<String, _>(&mut reader, None, STALL),
        )
        .await;
        assert!(waited.is_err(), "an idle stream was cut off: {waited:?}");
        let got = read_within::<String, _>(&mut reader, Some(STALL * 2), STALL).await;
        assert!(
            matches!(got, Err(ConnError::Timeout("the next frame"))),
            "{got:?}"
        );
    }
}
