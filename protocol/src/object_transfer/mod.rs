//! Moving object bytes between clients and nodes' object endpoints (the reading and
//! writing side; the nodes' server is in `flame-node`).
//!
//! An [`ObjectClient`] puts an object to a node ([`ObjectClient::put`]) and reads one from
//! the first of several nodes that answers ([`ObjectClient::get`]), on one of two
//! transports, both speaking [`ObjectRequest`] / [`ObjectResponse`] frames
//! ([`crate::frame`]: `u32` little-endian length, then postcard):
//!
//! * **QUIC**, ALPN [`OBJECT_ALPN`], to [`ObjectEndpoint::addr`]. The node presents its
//!   cluster certificate; [`NodeCertVerifier`] checks that it chains to the cluster CA
//!   and names the node dialled (`urn:flame:node:NAME`): node certificates carry no DNS
//!   name, and are issued for client authentication, so the verifier checks the chain as
//!   a client certificate's. Clients present no certificate (the grant is the
//!   credential); nodes present theirs. One stream is one request: a `Put` frame and the
//!   raw bytes, answered by `Stored`; a `Get` frame answered by `Found` and the raw range.
//!   Objects larger than [`limits::OBJECT_RANGE_BYTES`] are read in ranges on up to
//!   [`limits::OBJECT_STREAMS_PER_GET`] parallel streams, straight into one buffer.
//!   Connections are kept per endpoint (at most [`OBJECT_CLIENT_CONNECTIONS_MAX`]).
//! * **Unix socket**, when the node is on this host ([`host_id`] equals
//!   [`ObjectEndpoint::host`]) and has one ([`ObjectEndpoint::socket`]). One connection is
//!   one request. A `Put` frame carries a sealed memfd ([`sealed_memfd`]) as `SCM_RIGHTS`
//!   on the `sendmsg` of the frame's bytes, and no bytes follow; a `Get` is answered by a
//!   `Found` frame carrying a read-only descriptor of the object, which the reader reads
//!   once ([`read_fd_range`]). A socket that cannot be connected falls back to QUIC.
//!
//! Every chunk ([`OBJECT_CHUNK_BYTES`]) a reader receives over QUIC is checked against
//! its hash as it completes, and the whole object against its id at the end; a mismatch
//! is [`TransferError::Corrupt`] naming the object and the chunk. Every read and write
//! is bounded by [`limits::OBJECT_TRANSFER_STALL_TIMEOUT`].

use crate::endpoint::{ClientIdentity, EndpointError, Trust};
use crate::frame;
use crate::limits;
use crate::model::ApiError;
use crate::object::{
    chunk_hashes, Grant, ObjectEndpoint, ObjectId, ObjectRef, ObjectRequest, ObjectResponse,
    ObjectTarget, OBJECT_ALPN, OBJECT_CHUNK_BYTES, OBJECT_ID_BYTES,
};
use bytes::{Bytes, BytesMut};
use quinn::crypto::rustls::QuicClientConfig;
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Connections an [`ObjectClient`] keeps open to nodes' object endpoints; past it the one
/// used longest ago is dropped (closed once no transfer uses it).
pub const OBJECT_CLIENT_CONNECTIONS_MAX: usize = 64;

/// The TLS server name sent to nodes. Not checked: [`NodeCertVerifier`] checks the
/// certificate's node URI instead, as node certificates have no DNS name.
pub const NODE_SERVER_NAME: &str = "flame-node";

/// Bytes of one QUIC write of an object's raw bytes: each write is bounded by the stall
/// timeout on its own, so a large object is not bounded as a whole.
const WRITE_PIECE_BYTES: usize = 1024 * 1024;

/// Objects at least this large are hashed and copied on a blocking thread, so that a
/// transfer does not hold up other tasks of the runtime.
const BLOCKING_BYTES_MIN: usize = OBJECT_CHUNK_BYTES as usize;

/// Why a transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The client could not be set up (CA file, TLS configuration, socket).
    #[error("cannot set up object transfers: {0}")]
    Setup(String),
    /// The arguments do not describe a transfer (bytes that are not the object's size).
    #[error("invalid object transfer: {0}")]
    Invalid(String),
    /// The node refused the request (grant, quota, cache full, not found).
    #[error("node `{node}` refused to {what} object {id}: {error}")]
    Refused {
        node: String,
        what: &'static str,
        id: ObjectId,
        error: ApiError,
    },
    /// Bytes that do not match their hash: `chunk` is the first chunk found wrong, `None`
    /// when every chunk matched the node's list and the whole did not match the id.
    #[error("object {id} from node `{node}` is corrupt: {}", match chunk {
        Some(c) => format!("chunk {c} does not match its hash"),
        None => "its bytes do not hash to its id".to_string(),
    })]
    Corrupt {
        node: String,
        id: ObjectId,
        chunk: Option<u64>,
    },
    /// No byte moved for [`limits::OBJECT_TRANSFER_STALL_TIMEOUT`].
    #[error("{what} with node `{node}` made no progress for {}", humantime::format_duration(*timeout))]
    Stalled {
        node: String,
        what: String,
        timeout: Duration,
    },
    /// The node's object endpoint could not be reached, or its certificate was refused.
    #[error("cannot reach the object endpoint of node `{node}` at {addr}: {reason}")]
    Connect {
        node: String,
        addr: String,
        reason: String,
    },
    /// A stream or socket failed.
    #[error("{what} with node `{node}` failed: {reason}")]
    Io {
        node: String,
        what: String,
        reason: String,
    },
    /// The node answered something the protocol does not allow.
    #[error("node `{node}` broke the object protocol during {what}: {detail}")]
    Protocol {
        node: String,
        what: String,
        detail: String,
    },
    /// More bytes than [`limits::OBJECT_BYTES_MAX`].
    #[error(
        "object {id} is {size} bytes; objects may be at most {} bytes",
        limits::OBJECT_BYTES_MAX
    )]
    TooLarge { id: ObjectId, size: u64 },
    /// No node to read from was given.
    #[error("object {id} has no copy to read (no node holds it)")]
    NoEndpoint { id: ObjectId },
    /// Every node tried failed; each attempt's error, in the order tried.
    #[error("object {id} could not be read from any of {} nodes: {}", attempts.len(),
        attempts.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Unavailable {
        id: ObjectId,
        attempts: Vec<TransferError>,
    },
}

impl From<EndpointError> for TransferError {
    fn from(e: EndpointError) -> Self {
        TransferError::Setup(e.to_string())
    }
}

/// be read; such a host never matches (see [`same_host`]).
/// This host, as [`ObjectEndpoint::host`] names hosts: `/etc/machine-id` (else the boot
/// id), `:`, and the inode of this process's network namespace, so that a node in
/// another network namespace counts as another host. `unknown:...` when neither id can
pub fn host_id() -> String {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        use std::os::unix::fs::MetadataExt as _;
        let machine = ["/etc/machine-id", "/proc/sys/kernel/random/boot_id"]
            .iter()
            .find_map(|path| {
                let text = std::fs::read_to_string(path).ok()?;
                let id = text.trim().to_string();
                (!id.is_empty()).then_some(id)
            })
            .unwrap_or_else(|| "unknown".to_string());
        let netns = std::fs::metadata("/proc/self/ns/net").map_or(0, |m| m.ino());
        format!("{machine}:{netns}")
    })
    .clone()
}

/// Whether `endpoint` is on this host and takes same-host transfers.
pub fn same_host(endpoint: &ObjectEndpoint) -> bool {
    let here = host_id();
    endpoint.socket.is_some() && !here.starts_with("unknown:") && endpoint.host == here
}

/// Runs `fut` within the stall timeout.
async fn stall<T>(
    node: &str,
    what: &str,
    fut: impl Future<Output = T>,
) -> Result<T, TransferError> {
    tokio::time::timeout(limits::OBJECT_TRANSFER_STALL_TIMEOUT, fut)
        .await
        .map_err(|_| TransferError::Stalled {
            node: node.to_string(),
            what: what.to_string(),
            timeout: limits::OBJECT_TRANSFER_STALL_TIMEOUT,
        })
}

fn io_err(node: &str, what: &str, e: impl std::fmt::Display) -> TransferError {
    TransferError::Io {
        node: node.to_string(),
        what: what.to_string(),
        reason: e.to_string(),
    }
}

fn protocol_err(node: &str, what: &str, detail: impl Into<String>) -> TransferError {
    TransferError::Protocol {
        node: node.to_string(),
        what: what.to_string(),
        detail: detail.into(),
    }
}

/// The frame of `msg`, length prefix included.
fn encode_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, TransferError> {
    let mut buf = Vec::new();
    frame::encode_into(msg, &mut buf, crate::object::OBJECT_FRAME_BYTES_MAX)
        .map_err(|e| TransferError::Invalid(format!("the request does not fit a frame: {e}")))?;
    Ok(buf)
}

/// Runs `f` on a blocking thread when `bytes` is large, inline otherwise.
async fn maybe_blocking<T: Send + 'static>(
    bytes: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, TransferError> {
    if bytes < BLOCKING_BYTES_MIN {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TransferError::Setup(format!("a hashing thread failed: {e}")))
}

/// The byte ranges a reader asks for: `(offset, len)` pieces of `range_bytes` (a whole
/// number of chunks, at least one), the last shorter.
pub fn plan_ranges(size: u64, range_bytes: u64) -> Vec<(u64, u64)> {
    let step = range_bytes.div_ceil(OBJECT_CHUNK_BYTES).max(1) * OBJECT_CHUNK_BYTES;
    let mut ranges = Vec::with_capacity(size.div_ceil(step) as usize);
    let mut offset = 0;
    while offset < size {
        let len = step.min(size - offset);
        ranges.push((offset, len));
        offset += len;
    }
    ranges
}

/// The first chunk of `bytes` that does not match `chunks`, if any.
fn first_bad_chunk(bytes: &[u8], chunks: &[[u8; OBJECT_ID_BYTES]]) -> Option<u64> {
    bytes
        .chunks(OBJECT_CHUNK_BYTES as usize)
        .zip(chunks.iter().map(Some).chain(std::iter::repeat(None)))
        .position(|(piece, expected)| expected != Some(blake3::hash(piece).as_bytes()))
        .map(|i| i as u64)
}

/// One cached connection, shared by transfers to the same endpoint; the async lock is
/// held while connecting, so concurrent transfers make one connection, not many.
type Slot = Arc<tokio::sync::Mutex<Option<quinn::Connection>>>;

#[derive(Debug, Default)]
struct ConnCache {
    slots: HashMap<(String, SocketAddr), (Slot, u64)>,
    tick: u64,
}

impl ConnCache {
    fn slot(&mut self, key: (String, SocketAddr)) -> Slot {
        self.tick += 1;
        let tick = self.tick;
        if let Some((slot, used)) = self.slots.get_mut(&key) {
            *used = tick;
            return slot.clone();
        }
        while self.slots.len() >= OBJECT_CLIENT_CONNECTIONS_MAX {
            let Some(oldest) = self
                .slots
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            self.slots.remove(&oldest);
        }
        let slot = Slot::default();
        self.slots.insert(key, (slot.clone(), tick));
        slot
    }
}

/// Puts and gets objects at nodes' object endpoints. Cheap to share (`Arc`); every
/// method may run concurrently.
#[derive(Debug)]
pub struct ObjectClient {
    endpoint: quinn::Endpoint,
    ca: ClusterCa,
    identity: Option<ClientIdentity>,
    transport: Arc<quinn::TransportConfig>,
    conns: Mutex<ConnCache>,
    /// Bytes per ranged `Get` ([`limits::OBJECT_RANGE_BYTES`]; smaller in tests).
    range_bytes: u64,
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    if let Ok(idle) = quinn::IdleTimeout::try_from(limits::IDLE_TIMEOUT) {
        t.max_idle_timeout(Some(idle));
    }
    t.keep_alive_interval(Some(limits::KEEP_ALIVE_INTERVAL));
    // Nodes open no streams to readers and writers.
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(0));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    // A ranged get has OBJECT_STREAMS_PER_GET streams of this window in flight.
    t.stream_receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(64 * 1024 * 1024));
    t.send_window(64 * 1024 * 1024);
    Arc::new(t)
}

impl ObjectClient {
    /// A client that trusts nodes whose certificates chain to the CA `trust` names, and
    /// presents `identity` when given (nodes; clients give none).
    pub fn new(
        trust: &Trust,
        identity: Option<ClientIdentity>,
    ) -> Result<ObjectClient, TransferError> {
        ObjectClient::with_ca(ClusterCa::from_trust(trust)?, identity)
    }

    /// As [`ObjectClient::new`], with the CA already loaded.
    pub fn with_ca(
        ca: ClusterCa,
        identity: Option<ClientIdentity>,
    ) -> Result<ObjectClient, TransferError> {
        let bind: SocketAddr = ([0, 0, 0, 0, 0, 0, 0, 0], 0).into();
        let endpoint = match quinn::Endpoint::client(bind) {
            Ok(e) => e,
            // Hosts without IPv6 fall back to an IPv4 socket.
            Err(_) => quinn::Endpoint::client(([0, 0, 0, 0], 0).into())
                .map_err(|e| TransferError::Setup(format!("cannot bind a UDP socket: {e}")))?,
        };
        Ok(ObjectClient {
            endpoint,
            ca,
            identity,
            transport: transport(),
            conns: Mutex::new(ConnCache::default()),
            range_bytes: limits::OBJECT_RANGE_BYTES,
        })
    }

    /// Puts `bytes`, the object `object`, to the target's node: over its Unix socket with
    /// a sealed memfd when it is on this host, else over QUIC. Returns once the node has
    /// checked and stored them.
    pub async fn put(
        &self,
        target: &ObjectTarget,
        object: ObjectRef,
        bytes: Bytes,
    ) -> Result<(), TransferError> {
        if bytes.len() as u64 != object.size {
            return Err(TransferError::Invalid(format!(
                "object {} is {} bytes, but {} bytes were given",
                object.id,
                object.size,
                bytes.len()
            )));
        }
        if object.size > limits::OBJECT_BYTES_MAX {
            return Err(TransferError::TooLarge {
                id: object.id,
                size: object.size,
            });
        }
        let hashed = bytes.clone();
        let chunks = maybe_blocking(bytes.len(), move || chunk_hashes(&hashed)).await?;
        let request = ObjectRequest::Put {
            grant: target.grant.clone(),
            object,
            chunks,
        };
        let ep = &target.endpoint;
        if let (true, Some(socket)) = (same_host(ep), &ep.socket) {
            if let Some(stream) = unix_connect(socket).await {
                return unix_put(stream, &ep.node, &request, object, bytes).await;
            }
        }
        self.quic_put(ep, &request, object, bytes).await
    }

    /// Reads `owner`'s object `object` from the first of `endpoints` that serves it
    /// (same-host endpoints first, then in the order given), under `grant`. Every chunk
    /// is checked against its hash, and the whole against the id.
    pub async fn get(
        &self,
        owner: &str,
        object: ObjectRef,
        endpoints: &[ObjectEndpoint],
        grant: &Grant,
    ) -> Result<Bytes, TransferError> {
        if object.size > limits::OBJECT_BYTES_MAX {
            return Err(TransferError::TooLarge {
                id: object.id,
                size: object.size,
            });
        }
        if object.size == 0 && object.id == ObjectId::of(&[]) {
            return Ok(Bytes::new());
        }
        let mut ordered: Vec<&ObjectEndpoint> = endpoints.iter().filter(|e| same_host(e)).collect();
        ordered.extend(endpoints.iter().filter(|e| !same_host(e)));
        let mut attempts = Vec::new();
        for ep in ordered {
            match self.get_from(owner, object, ep, grant).await {
                Ok(bytes) => return Ok(bytes),
                Err(e) => attempts.push(e),
            }
        }
        match attempts.len() {
            0 => Err(TransferError::NoEndpoint { id: object.id }),
            1 => Err(attempts.remove(0)),
            _ => Err(TransferError::Unavailable {
                id: object.id,
                attempts,
            }),
        }
    }

    async fn get_from(
        &self,
        owner: &str,
        object: ObjectRef,
        ep: &ObjectEndpoint,
        grant: &Grant,
    ) -> Result<Bytes, TransferError> {
        if let (true, Some(socket)) = (same_host(ep), &ep.socket) {
            if let Some(stream) = unix_connect(socket).await {
                return unix_get(stream, &ep.node, owner, object, grant).await;
            }
        }
        self.quic_get(owner, object, ep, grant).await
    }

    /// A connection to `ep`, cached.
    async fn connection(&self, ep: &ObjectEndpoint) -> Result<quinn::Connection, TransferError> {
        let slot = match self.conns.lock() {
            Ok(mut cache) => cache.slot((ep.node.clone(), ep.addr)),
            Err(poisoned) => poisoned.into_inner().slot((ep.node.clone(), ep.addr)),
        };
        let mut held = slot.lock().await;
        if let Some(conn) = held.as_ref() {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        let conn = self.connect(ep).await?;
        *held = Some(conn.clone());
        Ok(conn)
    }

    async fn connect(&self, ep: &ObjectEndpoint) -> Result<quinn::Connection, TransferError> {
        let connect_err = |reason: String| TransferError::Connect {
            node: ep.node.clone(),
            addr: ep.addr.to_string(),
            reason,
        };
        let verifier = node_server_verifier(&self.ca, &ep.node)?;
        let builder = rustls::ClientConfig::builder_with_provider(crate::endpoint::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TransferError::Setup(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut tls = match &self.identity {
            Some(identity) => {
                let (certs, key) = identity.to_parts();
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| TransferError::Setup(e.to_string()))?
            }
            None => builder.with_no_client_auth(),
        };
        tls.alpn_protocols = vec![OBJECT_ALPN.to_vec()];
        let crypto =
            QuicClientConfig::try_from(tls).map_err(|e| TransferError::Setup(e.to_string()))?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(self.transport.clone());
        // An IPv4 node is reached through the dual-stack socket as a mapped address.
        let target = match (ep.addr, self.endpoint.local_addr()) {
            (SocketAddr::V4(v4), Ok(SocketAddr::V6(_))) => {
                SocketAddr::new(std::net::IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            (other, _) => other,
        };
        let connecting = self
            .endpoint
            .connect_with(config, target, NODE_SERVER_NAME)
            .map_err(|e| connect_err(e.to_string()))?;
        match tokio::time::timeout(limits::CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(connect_err(e.to_string())),
            Err(_) => Err(connect_err(format!(
                "no answer within {}",
                humantime::format_duration(limits::CONNECT_TIMEOUT)
            ))),
        }
    }

    /// A new stream to `ep`; a cached connection found dead is replaced once.
    async fn open_stream(
        &self,
        ep: &ObjectEndpoint,
        what: &str,
    ) -> Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream), TransferError> {
        let mut retried = false;
        loop {
            let conn = self.connection(ep).await?;
            match stall(&ep.node, what, conn.open_bi()).await? {
                Ok((send, recv)) => return Ok((conn, send, recv)),
                // The connection is closed now, so the next `connection` makes a new one.
                Err(_) if !retried => retried = true,
                Err(e) => return Err(io_err(&ep.node, what, e)),
            }
        }
    }

    async fn quic_put(
        &self,
        ep: &ObjectEndpoint,
        request: &ObjectRequest,
        object: ObjectRef,
        bytes: Bytes,
    ) -> Result<(), TransferError> {
        let node = ep.node.as_str();
        let what = "putting an object";
        let (_conn, mut send, recv) = self.open_stream(ep, what).await?;
        let frame = encode_frame(request)?;
        stall(node, what, send.write_all(&frame))
            .await?
            .map_err(|e| io_err(node, what, e))?;
        let mut rest = bytes;
        while !rest.is_empty() {
            let piece = rest.split_to(rest.len().min(WRITE_PIECE_BYTES));
            stall(node, what, send.write_chunk(piece))
                .await?
                .map_err(|e| io_err(node, what, e))?;
        }
        send.finish().map_err(|e| io_err(node, what, e))?;
        let mut reader = frame::FrameReader::new(recv, crate::object::OBJECT_FRAME_BYTES_MAX);
        let response = stall(node, what, reader.read_required::<ObjectResponse>())
            .await?
            .map_err(|e| io_err(node, what, e))?;
        put_outcome(node, object, response)
    }

    async fn quic_get(
        &self,
        owner: &str,
        object: ObjectRef,
        ep: &ObjectEndpoint,
        grant: &Grant,
    ) -> Result<Bytes, TransferError> {
        let node = ep.node.as_str();
        let what = "getting an object";
        let size = usize::try_from(object.size).map_err(|_| TransferError::TooLarge {
            id: object.id,
            size: object.size,
        })?;
        let conn = self.connection(ep).await?;
        // One buffer for the whole object, split into a piece per range; the pieces are
        // filled in parallel and joined again without copying.
        let mut buffer = BytesMut::zeroed(size);
        let mut pending: Vec<(u64, BytesMut)> = plan_ranges(object.size, self.range_bytes)
            .into_iter()
            .map(|(offset, len)| (offset, buffer.split_to(len as usize)))
            .collect();
        pending.reverse();
        let mut done: Vec<(u64, BytesMut)> = Vec::with_capacity(pending.len());
        let mut running = tokio::task::JoinSet::new();
        loop {
            while running.len() < limits::OBJECT_STREAMS_PER_GET {
                let Some((offset, piece)) = pending.pop() else {
                    break;
                };
                let range = RangeFetch {
                    conn: conn.clone(),
                    node: node.to_string(),
                    request: ObjectRequest::Get {
                        grant: Some(grant.clone()),
                        owner: owner.to_string(),
                        id: object.id,
                        offset,
                        len: piece.len() as u64,
                    },
                    object,
                    offset,
                };
                running.spawn(range.run(piece));
            }
            let Some(joined) = running.join_next().await else {
                break;
            };
            let fetched = joined.map_err(|e| io_err(node, what, e))??;
            done.push(fetched);
        }
        done.sort_by_key(|(offset, _)| *offset);
        let mut whole = BytesMut::new();
        for (_, piece) in done {
            // Contiguous pieces of one allocation: joined without a copy.
            whole.unsplit(piece);
        }
        let whole = whole.freeze();
        let hashed = whole.clone();
        let id = maybe_blocking(size, move || ObjectId::of(&hashed)).await?;
        if id != object.id {
            return Err(TransferError::Corrupt {
                node: node.to_string(),
                id: object.id,
                chunk: None,
            });
        }
        Ok(whole)
    }
}

/// What a `Put`'s answer means.
fn put_outcome(
    node: &str,
    object: ObjectRef,
    response: ObjectResponse,
) -> Result<(), TransferError> {
    match response {
        ObjectResponse::Stored => Ok(()),
        ObjectResponse::Error(error) => Err(TransferError::Refused {
            node: node.to_string(),
            what: "store",
            id: object.id,
            error,
        }),
        ObjectResponse::Found { .. } => Err(protocol_err(
            node,
            "putting an object",
            "it answered a put with Found",
        )),
    }
}

/// Checks a `Found` answer to a `Get` of `(offset, len)` of `object`; returns its chunk
/// hashes.
fn found_chunks(
    node: &str,
    object: ObjectRef,
    offset: u64,
    len: u64,
    response: ObjectResponse,
) -> Result<Vec<[u8; OBJECT_ID_BYTES]>, TransferError> {
    let what = "getting an object";
    match response {
        ObjectResponse::Found {
            object: found,
            chunks,
            offset: found_offset,
            len: found_len,
        } => {
            if found != object {
                return Err(protocol_err(
                    node,
                    what,
                    format!("asked for {object:?}, it sent {found:?}"),
                ));
            }
            if (found_offset, found_len) != (offset, len) {
                return Err(protocol_err(
                    node,
                    what,
                    format!(
                        "asked for {len} bytes at {offset}, it sent {found_len} at {found_offset}"
                    ),
                ));
            }
            if chunks.len() as u64 != object.chunks() {
                return Err(protocol_err(
                    node,
                    what,
                    format!(
                        "{} chunk hashes for {} chunks",
                        chunks.len(),
                        object.chunks()
                    ),
                ));
            }
            Ok(chunks)
        }
        ObjectResponse::Error(error) => Err(TransferError::Refused {
            node: node.to_string(),
            what: "read",
            id: object.id,
            error,
        }),
        ObjectResponse::Stored => Err(protocol_err(node, what, "it answered a get with Stored")),
    }
}

/// One ranged `Get` on a stream of its own.
struct RangeFetch {
    conn: quinn::Connection,
    node: String,
    request: ObjectRequest,
    object: ObjectRef,
    offset: u64,
}

impl RangeFetch {
    /// Fills `piece` with the range, checking each chunk as it completes.
    async fn run(self, mut piece: BytesMut) -> Result<(u64, BytesMut), TransferError> {
        let node = self.node.as_str();
        let what = "getting an object";
        let (mut send, recv) = stall(node, what, self.conn.open_bi())
            .await?
            .map_err(|e| io_err(node, what, e))?;
        let frame = encode_frame(&self.request)?;
        stall(node, what, send.write_all(&frame))
            .await?
            .map_err(|e| io_err(node, what, e))?;
        send.finish().map_err(|e| io_err(node, what, e))?;
        let mut reader = frame::FrameReader::new(recv, crate::object::OBJECT_FRAME_BYTES_MAX);
        let response = stall(node, what, reader.read_required::<ObjectResponse>())
            .await?
            .map_err(|e| io_err(node, what, e))?;
        let len = piece.len();
        let chunks = found_chunks(node, self.object, self.offset, len as u64, response)?;
        // The frame reader never reads past its frame: the raw range follows.
        let mut recv = reader.into_inner();
        let (mut filled, mut checked) = (0usize, 0usize);
        while filled < len {
            let chunk = stall(node, what, recv.read_chunk(len - filled, true))
                .await?
                .map_err(|e| io_err(node, what, e))?
                .ok_or_else(|| {
                    protocol_err(
                        node,
                        what,
                        format!("the stream ended after {filled} of {len} bytes"),
                    )
                })?;
            let n = chunk.bytes.len();
            if n > len - filled {
                return Err(protocol_err(node, what, "more bytes than asked for"));
            }
            piece[filled..filled + n].copy_from_slice(&chunk.bytes);
            filled += n;
            while checked < filled
                && (checked + OBJECT_CHUNK_BYTES as usize <= filled || filled == len)
            {
                let end = (checked + OBJECT_CHUNK_BYTES as usize).min(len);
                let index = (self.offset + checked as u64) / OBJECT_CHUNK_BYTES;
                let expected = chunks.get(index as usize);
                if expected != Some(blake3::hash(&piece[checked..end]).as_bytes()) {
                    return Err(TransferError::Corrupt {
                        node: self.node.clone(),
                        id: self.object.id,
                        chunk: Some(index),
                    });
                }
                checked = end;
            }
        }
        Ok((self.offset, piece))
    }
}

mod unix;
mod verify;

pub use unix::{is_sealed, read_fd_range, sealed_memfd, FdStream, FdStreamError};
use unix::{unix_connect, unix_get, unix_put};
pub use verify::{node_server_verifier, ClusterCa, NodeCertVerifier};

#[cfg(test)]
mod tests;
