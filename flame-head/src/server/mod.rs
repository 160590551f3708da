//! The I/O shell around the core: the QUIC server, the core's event loop, and the store
//! writer. Everything here moves bytes; decisions are the core's.
//!
//! * `connection`: a connection's handshake, hello and admission, and a node's join;
//! * `client`: a client connection's requests and their authorization;
//! * `streams`: the long-lived client streams (submit, watch, logs, exec);
//! * `node`: a node's control connection;
//! * `core_loop`: the core's event loop, the store writer's reports read first;
//! * `router`: where the core's outputs go (answers, node frames, watchers, the store).

use crate::auth::{Authenticated, TokenBook, TokenLimits};
use crate::certs::{CertBook, Presented};
use crate::core::{
    Backfill, ConnId, Core, Event, LogTargets, NodeExecutors, Reply, Request, WatchMsg, WatchStart,
};
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
use flame_protocol::messages::NodeRegistration;
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

mod client;
mod connection;
mod core_loop;
mod node;
mod router;
mod streams;
#[cfg(test)]
mod tests;

use client::*;
use connection::*;
pub use core_loop::start_core;
use node::*;
use router::*;
use streams::*;

pub use flame_protocol::limits::{
    CORE_EVENTS_QUEUE_MAX, LOG_EVENTS_BUFFERED_MAX, SUBMIT_BATCHES_IN_FLIGHT_MAX,
};
/// Events the core applies before it flushes one batch of output.
pub const CORE_EVENTS_PER_BATCH_MAX: usize = 4_096;
/// Period of the core's tick (heartbeat timeouts, `delay_release`).
pub const TICK: Duration = Duration::from_millis(200);
/// A gap between two turns of the core's loop this much longer than [`TICK`] means the
/// head itself did not run (a stop signal, a frozen VM, a starved host): the core is told
/// (`Event::Stalled`) and does not blame the nodes for the silence. Well above a busy
/// turn (a batch of at most [`CORE_EVENTS_PER_BATCH_MAX`] events takes milliseconds) and
/// well below the shortest heartbeat timeout accepted.
pub const HEAD_STALL_MIN: Duration = Duration::from_secs(1);
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
    events: mpsc::Sender<Inbound>,
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
    events: mpsc::Sender<Inbound>,
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
    /// The core answered with another kind of answer than the request gets (a bug).
    #[error("the head's core gave an answer of the wrong kind (expected {0})")]
    UnexpectedAnswer(&'static str),
}

/// A connection's place among those being set up, in all and from its address; given
/// back when it is admitted or fails.
struct Pending {
    _all: tokio::sync::OwnedSemaphorePermit,
    _from_address: Permit<std::net::IpAddr>,
}

type Writer = FrameWriter<quinn::SendStream>;
type Reader = FrameReader<quinn::RecvStream>;
