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

use crate::auth::FINGERPRINT_BYTES;
use crate::endpoint::{load_certs, ClientIdentity, EndpointError, Trust};
use crate::frame::{self, FrameError, LENGTH_PREFIX_BYTES};
use crate::limits;
use crate::model::ApiError;
use crate::object::{
    chunk_hashes, Grant, ObjectEndpoint, ObjectId, ObjectRef, ObjectRequest, ObjectResponse,
    ObjectTarget, OBJECT_ALPN, OBJECT_CHUNK_BYTES, OBJECT_ID_BYTES,
};
use crate::pki::PeerIdentity;
use bytes::{Bytes, BytesMut};
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::UnixStream;

/// Connections an [`ObjectClient`] keeps open to nodes' object endpoints; past it the one
/// used longest ago is dropped (closed once no transfer uses it).
pub const OBJECT_CLIENT_CONNECTIONS_MAX: usize = 64;

/// The TLS server name sent to nodes. Not checked: [`NodeCertVerifier`] checks the
/// certificate's node URI instead, as node certificates have no DNS name.
pub const NODE_SERVER_NAME: &str = "flame-node";

/// Bytes of one QUIC write of an object's raw bytes: each write is bounded by the stall
/// timeout on its own, so a large object is not bounded as a whole.
const WRITE_PIECE_BYTES: usize = 1024 * 1024;

/// Bytes of one `recvmsg` when reading a frame from a Unix socket.
const UNIX_READ_BYTES: usize = 64 * 1024;

/// Descriptors a received frame may carry at most; more are an error (one is expected).
const UNIX_FDS_MAX: usize = 4;

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

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What a node's certificate must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterCa {
    /// The cluster CA certificate(s), from the CA file.
    Certs(Vec<CertificateDer<'static>>),
    /// The CA with this SHA-256 fingerprint (from a token), taken from the chain the node
    /// presents.
    Pinned([u8; FINGERPRINT_BYTES]),
}

impl ClusterCa {
    /// The CA `trust` names (reads the CA file).
    pub fn from_trust(trust: &Trust) -> Result<ClusterCa, TransferError> {
        match trust {
            Trust::CaFile(path) => Ok(ClusterCa::Certs(load_certs(path)?)),
            Trust::Pinned(fingerprint) => Ok(ClusterCa::Pinned(*fingerprint)),
        }
    }
}

/// Verifies a node's object endpoint: its chain leads to the cluster CA (validity,
/// signatures, key usage; node certificates are issued for client authentication, and
/// are checked as such), and its identity URI names the node dialled.
#[derive(Debug)]
pub struct NodeCertVerifier {
    ca: ClusterCa,
    node: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

/// The verifier for the certificate of node `node`'s object endpoint.
pub fn node_server_verifier(
    ca: &ClusterCa,
    node: &str,
) -> Result<Arc<NodeCertVerifier>, TransferError> {
    crate::pki::node_uri(node).map_err(|e| TransferError::Setup(e.to_string()))?;
    Ok(Arc::new(NodeCertVerifier {
        ca: ca.clone(),
        node: node.to_string(),
        provider: provider(),
    }))
}

/// A certificate that is valid but names someone else.
struct WrongPeer {
    expected: String,
    found: String,
}

/// The same as `Display`: rustls shows [`rustls::OtherError`] by its `Debug`.
impl std::fmt::Debug for WrongPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for WrongPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the certificate names {}, not node {}: the address the head gave for the node is another's",
            self.found, self.expected
        )
    }
}

impl std::error::Error for WrongPeer {}

fn other_error(e: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(e),
    )))
}

impl rustls::client::danger::ServerCertVerifier for NodeCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        let rest: Vec<CertificateDer<'_>> = match &self.ca {
            ClusterCa::Certs(certs) => {
                for cert in certs {
                    roots.add(cert.clone())?;
                }
                intermediates.to_vec()
            }
            ClusterCa::Pinned(fingerprint) => {
                let pinned = intermediates
                    .iter()
                    .find(|cert| crate::pki::fingerprint(cert) == *fingerprint)
                    .ok_or_else(|| {
                        rustls::Error::General(format!(
                            "node {}'s certificate chain does not hold the cluster CA (fingerprint {}...)",
                            self.node,
                            crate::pki::short_fingerprint(fingerprint)
                        ))
                    })?;
                roots.add(pinned.clone().into_owned())?;
                intermediates
                    .iter()
                    .filter(|cert| *cert != pinned)
                    .cloned()
                    .collect()
            }
        };
        let chain = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(format!("cannot trust the cluster CA: {e}")))?;
        chain.verify_client_cert(end_entity, &rest, now)?;
        match crate::pki::identity_of(end_entity) {
            Ok(PeerIdentity::Node(name)) if name == self.node => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            Ok(other) => Err(other_error(WrongPeer {
                expected: self.node.clone(),
                found: other.to_string(),
            })),
            Err(e) => Err(other_error(e)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// This host, as [`ObjectEndpoint::host`] names hosts: `/etc/machine-id` (else the boot
/// id), `:`, and the inode of this process's network namespace, so that a node in
/// another network namespace counts as another host. `unknown:...` when neither id can
/// be read; such a host never matches (see [`same_host`]).
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
    frame::encode_into(msg, &mut buf, limits::FRAME_BYTES_MAX)
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
        let builder = rustls::ClientConfig::builder_with_provider(provider())
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
        let mut reader = frame::FrameReader::new(recv, limits::FRAME_BYTES_MAX);
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
        let mut reader = frame::FrameReader::new(recv, limits::FRAME_BYTES_MAX);
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

/// A connected Unix socket, or `None` when it cannot be connected (the caller falls back
/// to QUIC).
async fn unix_connect(path: &str) -> Option<UnixStream> {
    match tokio::time::timeout(limits::CONNECT_TIMEOUT, UnixStream::connect(path)).await {
        Ok(Ok(stream)) => Some(stream),
        _ => None,
    }
}

async fn unix_put(
    stream: UnixStream,
    node: &str,
    request: &ObjectRequest,
    object: ObjectRef,
    bytes: Bytes,
) -> Result<(), TransferError> {
    let what = "putting an object over the node's socket";
    let fd = maybe_blocking(bytes.len(), move || sealed_memfd(&bytes))
        .await?
        .map_err(|e| io_err(node, what, format!("cannot make a memfd: {e}")))?;
    stall(
        node,
        what,
        send_frame_with_fd(&stream, request, Some(fd.as_fd())),
    )
    .await?
    .map_err(|e| io_err(node, what, e))?;
    drop(fd);
    let (response, extra) = stall(node, what, recv_frame_with_fd::<ObjectResponse>(&stream))
        .await?
        .map_err(|e| io_err(node, what, e))?;
    if extra.is_some() {
        return Err(protocol_err(
            node,
            what,
            "it sent a descriptor with its answer to a put",
        ));
    }
    put_outcome(node, object, response)
}

async fn unix_get(
    stream: UnixStream,
    node: &str,
    owner: &str,
    object: ObjectRef,
    grant: &Grant,
) -> Result<Bytes, TransferError> {
    let what = "getting an object over the node's socket";
    let request = ObjectRequest::Get {
        grant: Some(grant.clone()),
        owner: owner.to_string(),
        id: object.id,
        offset: 0,
        len: object.size,
    };
    stall(node, what, send_frame_with_fd(&stream, &request, None))
        .await?
        .map_err(|e| io_err(node, what, e))?;
    let (response, fd) = stall(node, what, recv_frame_with_fd::<ObjectResponse>(&stream))
        .await?
        .map_err(|e| io_err(node, what, e))?;
    let chunks = found_chunks(node, object, 0, object.size, response)?;
    let fd = fd.ok_or_else(|| protocol_err(node, what, "its Found came without a descriptor"))?;
    let size = usize::try_from(object.size).map_err(|_| TransferError::TooLarge {
        id: object.id,
        size: object.size,
    })?;
    let read = maybe_blocking(size, move || {
        let bytes = read_fd_range(fd.as_fd(), 0, size)?;
        let bad = (ObjectId::of(&bytes) != object.id).then(|| first_bad_chunk(&bytes, &chunks));
        Ok::<_, std::io::Error>((bytes, bad))
    })
    .await?
    .map_err(|e| {
        io_err(
            node,
            what,
            format!("cannot read the object's descriptor: {e}"),
        )
    })?;
    match read {
        (bytes, None) => Ok(Bytes::from(bytes)),
        (_, Some(chunk)) => Err(TransferError::Corrupt {
            node: node.to_string(),
            id: object.id,
            chunk,
        }),
    }
}

/// A memfd holding `bytes`, sealed against any change (`F_SEAL_SHRINK | F_SEAL_GROW |
/// F_SEAL_WRITE | F_SEAL_SEAL`): what a same-host writer passes a node, which may keep
/// it as its cache copy without copying.
pub fn sealed_memfd(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    use nix::sys::memfd::{memfd_create, MFdFlags};
    use std::io::Write as _;
    let fd = memfd_create(
        "flame-object",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )?;
    let mut file = std::fs::File::from(fd);
    file.set_len(bytes.len() as u64)?;
    file.write_all(bytes)?;
    let fd = OwnedFd::from(file);
    fcntl(
        &fd,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(fd)
}

/// Whether `fd` is a memfd sealed against shrinking, growing and writing (what a node
/// checks before it trusts a passed descriptor to stay as it was hashed).
pub fn is_sealed(fd: BorrowedFd<'_>) -> bool {
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};
    let needed = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE;
    fcntl(fd, FcntlArg::F_GET_SEALS)
        .map(|bits| SealFlag::from_bits_truncate(bits).contains(needed))
        .unwrap_or(false)
}

/// Reads `len` bytes at `offset` of `fd` (a memfd or a file) into a new buffer: the one
/// copy a same-host reader makes.
pub fn read_fd_range(fd: BorrowedFd<'_>, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::File::from(fd.try_clone_to_owned()?);
    let available = file.metadata()?.len();
    if available < offset.saturating_add(len as u64) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the descriptor holds {available} bytes, not {len} from {offset}"),
        ));
    }
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Writes `msg` as one frame to `stream`, with `fd` as `SCM_RIGHTS` on the `sendmsg`
/// that carries the frame's first bytes.
pub async fn send_frame_with_fd<T: Serialize>(
    stream: &UnixStream,
    msg: &T,
    fd: Option<BorrowedFd<'_>>,
) -> Result<(), FrameError> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let mut bytes = Vec::new();
    frame::encode_into(msg, &mut bytes, limits::FRAME_BYTES_MAX)?;
    let fds: Vec<i32> = fd.iter().map(AsRawFd::as_raw_fd).collect();
    let mut sent = 0;
    while sent < bytes.len() {
        stream.writable().await?;
        let cmsgs: Vec<ControlMessage<'_>> = if sent == 0 && !fds.is_empty() {
            vec![ControlMessage::ScmRights(&fds)]
        } else {
            Vec::new()
        };
        let result = stream.try_io(Interest::WRITABLE, || {
            let iov = [std::io::IoSlice::new(&bytes[sent..])];
            sendmsg::<UnixAddr>(
                stream.as_raw_fd(),
                &iov,
                &cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        });
        match result {
            Ok(n) => sent += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads one frame from `stream` and the descriptor that came with it, if any. More than
/// one descriptor is an error. Reads no byte past the frame.
pub async fn recv_frame_with_fd<T: DeserializeOwned>(
    stream: &UnixStream,
) -> Result<(T, Option<OwnedFd>), FrameError> {
    let mut buf: Vec<u8> = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut want = LENGTH_PREFIX_BYTES;
    while buf.len() < want {
        stream.readable().await?;
        let mut chunk = vec![0u8; (want - buf.len()).min(UNIX_READ_BYTES)];
        let result = stream.try_io(Interest::READABLE, || {
            recv_some(stream, &mut chunk, &mut fds)
        });
        let n = match result {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            return Err(FrameError::Truncated);
        }
        buf.extend_from_slice(&chunk[..n]);
        if want == LENGTH_PREFIX_BYTES && buf.len() == LENGTH_PREFIX_BYTES {
            let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
            prefix.copy_from_slice(&buf);
            let len = u32::from_le_bytes(prefix) as usize;
            if len > limits::FRAME_BYTES_MAX {
                return Err(FrameError::TooLarge {
                    len,
                    max: limits::FRAME_BYTES_MAX,
                });
            }
            want += len;
        }
    }
    if fds.len() > 1 {
        return Err(FrameError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} descriptors came with one frame; one at most is allowed",
                fds.len()
            ),
        )));
    }
    let msg = frame::decode(&buf[LENGTH_PREFIX_BYTES..])?;
    Ok((msg, fds.pop()))
}

/// One `recvmsg` into `chunk`; descriptors that came with it are added to `fds`.
fn recv_some(
    stream: &UnixStream,
    chunk: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<usize> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; UNIX_FDS_MAX]);
    let mut iov = [std::io::IoSliceMut::new(chunk)];
    let msg = recvmsg::<UnixAddr>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let cmsgs = msg.cmsgs().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("more than {UNIX_FDS_MAX} descriptors came with one frame"),
        )
    })?;
    for cmsg in cmsgs {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            for fd in raw {
                // SAFETY: the kernel installed this descriptor in our table for this
                // message; nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok(msg.bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::frame::{FrameReader, FrameWriter};
    use crate::model::ErrorKind;
    use crate::object::{GrantAccess, GrantBody, ObjectScope};
    use rustls::client::danger::ServerCertVerifier as _;
    use rustls::pki_types::PrivateKeyDer;

    /// A cluster CA as the head makes it, and a certificate it issued for a node as
    /// `flame-head/src/tls.rs` (`sign_node`) does: client authentication only, one
    /// `urn:flame:node:NAME` URI, no DNS name.
    struct Pki {
        ca: CertificateDer<'static>,
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    }

    fn pki() -> Pki {
        let key = rcgen::KeyPair::generate_for(crate::pki::KEY_ALGORITHM).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca = params.self_signed(&key).unwrap();
        Pki {
            ca: ca.der().clone(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    impl Pki {
        /// A node certificate and its key.
        fn node(&self, name: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
            let key = rcgen::KeyPair::generate_for(crate::pki::KEY_ALGORITHM).unwrap();
            let mut params = rcgen::CertificateParams::default();
            let uri = crate::pki::node_uri(name).unwrap();
            params.subject_alt_names = vec![rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from(uri).unwrap(),
            )];
            params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            params.use_authority_key_identifier_extension = true;
            let cert = params.signed_by(&key, &self.issuer).unwrap();
            (
                cert.der().clone(),
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
        }
    }

    fn verify(
        ca: &ClusterCa,
        dialled: &str,
        chain: &[CertificateDer<'static>],
    ) -> Result<(), rustls::Error> {
        let verifier = node_server_verifier(ca, dialled).unwrap();
        let name = ServerName::try_from(NODE_SERVER_NAME).unwrap();
        verifier
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn a_node_certificate_is_accepted_for_its_name_only_and_under_its_ca_only() {
        let pki = pki();
        let (n1, _) = pki.node("n1");
        let ca = ClusterCa::Certs(vec![pki.ca.clone()]);
        verify(&ca, "n1", std::slice::from_ref(&n1)).unwrap();
        let err = verify(&ca, "n2", std::slice::from_ref(&n1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("names node n1, not node n2"), "{err}");

        let other = super::tests::pki();
        let (stranger, _) = other.node("n1");
        assert!(verify(&ca, "n1", std::slice::from_ref(&stranger)).is_err());

        // Pinned by fingerprint: the CA must come in the chain the node presents.
        let pinned = ClusterCa::Pinned(crate::pki::fingerprint(&pki.ca));
        verify(&pinned, "n1", &[n1.clone(), pki.ca.clone()]).unwrap();
        let err = verify(&pinned, "n1", &[n1]).unwrap_err().to_string();
        assert!(err.contains("does not hold the cluster CA"), "{err}");
        assert!(verify(&pinned, "n1", &[stranger, other.ca.clone()]).is_err());
    }

    #[test]
    fn a_user_certificate_is_not_a_node() {
        let pki = pki();
        let key = rcgen::KeyPair::generate_for(crate::pki::KEY_ALGORITHM).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from("urn:flame:user:n1").unwrap(),
        )];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &pki.issuer).unwrap();
        let ca = ClusterCa::Certs(vec![pki.ca.clone()]);
        let err = verify(&ca, "n1", &[cert.der().clone()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("user n1"), "{err}");
    }

    #[test]
    fn ranges_are_whole_chunks_and_cover_the_object() {
        let c = OBJECT_CHUNK_BYTES;
        assert!(plan_ranges(0, limits::OBJECT_RANGE_BYTES).is_empty());
        assert_eq!(plan_ranges(5, limits::OBJECT_RANGE_BYTES), vec![(0, 5)]);
        assert_eq!(
            plan_ranges(5 * c + 1, 2 * c),
            vec![(0, 2 * c), (2 * c, 2 * c), (4 * c, c + 1)]
        );
        // A range smaller than a chunk is a chunk.
        assert_eq!(plan_ranges(c + 1, 1), vec![(0, c), (c, 1)]);
    }

    /// A node's object endpoint in miniature: keeps what is put (checked against its id)
    /// and serves ranges, corrupting one chunk of what it sends when told to.
    struct TestNode {
        addr: SocketAddr,
        _task: tokio::task::JoinHandle<()>,
    }

    type Store = Arc<Mutex<HashMap<ObjectId, Bytes>>>;

    fn test_node(pki: &Pki, name: &str, corrupt: Option<u64>) -> TestNode {
        let (cert, key) = pki.node(name);
        let mut tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert, pki.ca.clone()], key)
            .unwrap();
        tls.alpn_protocols = vec![OBJECT_ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
        let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let server = quinn::Endpoint::server(config, ([127, 0, 0, 1], 0).into()).unwrap();
        let addr = server.local_addr().unwrap();
        let store = Store::default();
        let task = tokio::spawn(async move {
            while let Some(incoming) = server.accept().await {
                let Ok(conn) = incoming.await else { continue };
                let store = store.clone();
                tokio::spawn(async move {
                    while let Ok((send, recv)) = conn.accept_bi().await {
                        tokio::spawn(serve_stream(store.clone(), corrupt, send, recv));
                    }
                });
            }
        });
        TestNode { addr, _task: task }
    }

    async fn serve_stream(
        store: Store,
        corrupt: Option<u64>,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        let mut reader = FrameReader::new(recv, limits::FRAME_BYTES_MAX);
        let mut writer = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
        let request: ObjectRequest = reader.read_required().await.unwrap();
        match request {
            ObjectRequest::Put { object, chunks, .. } => {
                let bytes = reader.into_inner().read_to_end(1 << 30).await.unwrap();
                assert_eq!(chunk_hashes(&bytes), chunks);
                assert_eq!(ObjectRef::of(&bytes), object);
                store.lock().unwrap().insert(object.id, bytes.into());
                writer.write(&ObjectResponse::Stored).await.unwrap();
            }
            ObjectRequest::Get {
                id, offset, len, ..
            } => {
                let found = store.lock().unwrap().get(&id).cloned();
                let Some(bytes) = found else {
                    let error = ApiError::new(ErrorKind::NotFound, "no such object here");
                    writer.write(&ObjectResponse::Error(error)).await.unwrap();
                    writer.into_inner().finish().unwrap();
                    return;
                };
                let len = if len == 0 {
                    bytes.len() as u64 - offset
                } else {
                    len
                };
                let found = ObjectResponse::Found {
                    object: ObjectRef::of(&bytes),
                    chunks: chunk_hashes(&bytes),
                    offset,
                    len,
                };
                writer.write(&found).await.unwrap();
                let mut range = bytes[offset as usize..(offset + len) as usize].to_vec();
                if let Some(chunk) = corrupt {
                    let at = chunk * OBJECT_CHUNK_BYTES;
                    if (offset..offset + len).contains(&at) {
                        range[(at - offset) as usize] ^= 0xff;
                    }
                }
                let mut send = writer.into_inner();
                // The reader may stop at a corrupt chunk.
                let _ = send.write_all(&range).await;
                let _ = send.finish();
            }
        }
    }

    fn endpoint(name: &str, addr: SocketAddr) -> ObjectEndpoint {
        ObjectEndpoint {
            node: name.into(),
            addr,
            host: "another host".into(),
            socket: None,
        }
    }

    fn grant(access: GrantAccess) -> Grant {
        Grant {
            body: GrantBody {
                owner: "alice".into(),
                access,
                expires_unix_ms: u64::MAX,
            },
            signature: Vec::new(),
        }
    }

    fn write_grant(node: &str) -> Grant {
        grant(GrantAccess::Write {
            node: node.into(),
            scope: ObjectScope::Kept,
            bytes_max: u64::MAX,
        })
    }

    /// Bytes of `chunks` whole chunks and a bit, each byte telling its place.
    fn object_bytes(chunks: u64) -> Bytes {
        (0..chunks * OBJECT_CHUNK_BYTES + 1000)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>()
            .into()
    }

    #[tokio::test]
    async fn a_put_then_a_ranged_get_round_trip_and_a_corrupt_chunk_is_named() {
        let pki = pki();
        let good = test_node(&pki, "good", None);
        let bad = test_node(&pki, "bad", Some(3));
        let mut client =
            ObjectClient::with_ca(ClusterCa::Certs(vec![pki.ca.clone()]), None).unwrap();
        // Ranges of two chunks: 5 chunks and a bit are three ranges, two streams at once
        // at least.
        client.range_bytes = 2 * OBJECT_CHUNK_BYTES;
        let bytes = object_bytes(5);
        let object = ObjectRef::of(&bytes);
        for (name, node) in [("good", &good), ("bad", &bad)] {
            let target = ObjectTarget {
                endpoint: endpoint(name, node.addr),
                grant: write_grant(name),
            };
            client.put(&target, object, bytes.clone()).await.unwrap();
        }
        let read = grant(GrantAccess::Read {
            ids: vec![object.id],
        });
        let got = client
            .get("alice", object, &[endpoint("good", good.addr)], &read)
            .await
            .unwrap();
        assert_eq!(got, bytes);

        let err = client
            .get("alice", object, &[endpoint("bad", bad.addr)], &read)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, TransferError::Corrupt { chunk: Some(3), id, node } if *id == object.id && node == "bad"),
            "{err}"
        );
        assert!(err.to_string().contains("chunk 3"), "{err}");

        // The next node is tried after a corrupt one.
        let endpoints = [endpoint("bad", bad.addr), endpoint("good", good.addr)];
        let got = client
            .get("alice", object, &endpoints, &read)
            .await
            .unwrap();
        assert_eq!(got, bytes);

        // A node that lacks the object refuses, and the error says so.
        let other = ObjectRef::of(b"not there");
        let err = client
            .get("alice", other, &[endpoint("good", good.addr)], &read)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, TransferError::Refused { error, .. } if error.kind == ErrorKind::NotFound),
            "{err}"
        );

        // A node answering for another name is refused at the handshake.
        let err = client
            .get("alice", object, &[endpoint("someone", good.addr)], &read)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, TransferError::Connect { reason, .. } if reason.contains("not node someone")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_sealed_memfd_crosses_a_socketpair_with_its_frame() {
        let (a, b) = UnixStream::pair().unwrap();
        let bytes = b"the object's bytes".to_vec();
        let fd = sealed_memfd(&bytes).unwrap();
        assert!(is_sealed(fd.as_fd()));
        let object = ObjectRef::of(&bytes);
        let frame = ObjectResponse::Found {
            object,
            chunks: chunk_hashes(&bytes),
            offset: 0,
            len: bytes.len() as u64,
        };
        send_frame_with_fd(&a, &frame, Some(fd.as_fd()))
            .await
            .unwrap();
        drop(fd);
        send_frame_with_fd(&a, &ObjectResponse::Stored, None)
            .await
            .unwrap();
        let (got, passed) = recv_frame_with_fd::<ObjectResponse>(&b).await.unwrap();
        assert_eq!(got, frame);
        let passed = passed.expect("the descriptor came with the frame");
        assert!(is_sealed(passed.as_fd()));
        assert_eq!(
            read_fd_range(passed.as_fd(), 0, bytes.len()).unwrap(),
            bytes
        );
        assert_eq!(read_fd_range(passed.as_fd(), 4, 3).unwrap(), &bytes[4..7]);
        assert!(read_fd_range(passed.as_fd(), 4, bytes.len()).is_err());
        // The seals hold for the receiver: the bytes cannot change under it.
        let mut file = std::fs::File::from(passed);
        use std::io::Write as _;
        assert!(file.write_all(b"x").is_err());
        assert!(file.set_len(1).is_err());
        // The next frame comes alone.
        let (got, passed) = recv_frame_with_fd::<ObjectResponse>(&b).await.unwrap();
        assert_eq!(got, ObjectResponse::Stored);
        assert!(passed.is_none());
        // An unsealed descriptor is told apart.
        let plain = tempfile::tempfile().unwrap();
        assert!(!is_sealed(plain.as_fd()));
    }

    /// A node's Unix socket in miniature: takes sealed memfds and hands them out again.
    fn test_socket(dir: &std::path::Path, corrupt: bool) -> String {
        let path = dir.join("objects.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let held: Arc<Mutex<HashMap<ObjectId, Arc<OwnedFd>>>> = Arc::default();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let held = held.clone();
                tokio::spawn(async move {
                    let (request, fd) = recv_frame_with_fd::<ObjectRequest>(&stream).await.unwrap();
                    match request {
                        ObjectRequest::Put { object, .. } => {
                            let fd = fd.unwrap();
                            assert!(is_sealed(fd.as_fd()));
                            let bytes = read_fd_range(fd.as_fd(), 0, object.size as usize).unwrap();
                            assert_eq!(ObjectRef::of(&bytes), object);
                            held.lock().unwrap().insert(object.id, Arc::new(fd));
                            send_frame_with_fd(&stream, &ObjectResponse::Stored, None)
                                .await
                                .unwrap();
                        }
                        ObjectRequest::Get { id, .. } => {
                            let fd = held.lock().unwrap().get(&id).cloned().unwrap();
                            let size = std::fs::File::from(fd.try_clone().unwrap())
                                .metadata()
                                .unwrap()
                                .len();
                            let mut content = read_fd_range(fd.as_fd(), 0, size as usize).unwrap();
                            let object = ObjectRef::of(&content);
                            let chunks = chunk_hashes(&content);
                            let sent = if corrupt {
                                content[0] ^= 1;
                                sealed_memfd(&content).unwrap()
                            } else {
                                fd.try_clone().unwrap()
                            };
                            let found = ObjectResponse::Found {
                                object,
                                chunks,
                                offset: 0,
                                len: size,
                            };
                            send_frame_with_fd(&stream, &found, Some(sent.as_fd()))
                                .await
                                .unwrap();
                        }
                    }
                });
            }
        });
        path.display().to_string()
    }

    #[tokio::test]
    async fn same_host_transfers_pass_descriptors_and_fall_back_to_quic() {
        let pki = pki();
        let dir = tempfile::tempdir().unwrap();
        let client = ObjectClient::with_ca(ClusterCa::Certs(vec![pki.ca.clone()]), None).unwrap();
        let bytes = object_bytes(1);
        let object = ObjectRef::of(&bytes);
        let read = grant(GrantAccess::Read {
            ids: vec![object.id],
        });
        // No QUIC endpoint answers at this address: only the socket can serve.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let local = ObjectEndpoint {
            node: "local".into(),
            addr: silent.local_addr().unwrap(),
            host: host_id(),
            socket: Some(test_socket(dir.path(), false)),
        };
        assert!(same_host(&local));
        let target = ObjectTarget {
            endpoint: local.clone(),
            grant: write_grant("local"),
        };
        client.put(&target, object, bytes.clone()).await.unwrap();
        let got = client.get("alice", object, &[local], &read).await.unwrap();
        assert_eq!(got, bytes);

        // A descriptor whose bytes are not the object's is found out.
        let corrupt_dir = tempfile::tempdir().unwrap();
        let corrupt = ObjectEndpoint {
            node: "corrupt".into(),
            addr: silent.local_addr().unwrap(),
            host: host_id(),
            socket: Some(test_socket(corrupt_dir.path(), true)),
        };
        let target = ObjectTarget {
            endpoint: corrupt.clone(),
            grant: write_grant("corrupt"),
        };
        client.put(&target, object, bytes.clone()).await.unwrap();
        let err = client
            .get("alice", object, &[corrupt], &read)
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransferError::Corrupt { chunk: Some(0), .. }),
            "{err}"
        );

        // A socket that cannot be connected: QUIC instead.
        let node = test_node(&pki, "remote", None);
        let fallback = ObjectEndpoint {
            node: "remote".into(),
            addr: node.addr,
            host: host_id(),
            socket: Some(dir.path().join("absent.sock").display().to_string()),
        };
        let target = ObjectTarget {
            endpoint: fallback.clone(),
            grant: write_grant("remote"),
        };
        client.put(&target, object, bytes.clone()).await.unwrap();
        let got = client
            .get("alice", object, &[fallback], &read)
            .await
            .unwrap();
        assert_eq!(got, bytes);
    }

    #[test]
    fn the_host_id_names_the_machine_and_the_network_namespace() {
        let id = host_id();
        let (machine, netns) = id.rsplit_once(':').unwrap();
        assert!(!machine.is_empty());
        assert!(netns.parse::<u64>().unwrap() > 0);
        assert_eq!(host_id(), id);
    }
}
