//! The node's QUIC object endpoint: clients and other nodes put and get objects here.
//!
//! TLS 1.3 with ALPN [`OBJECT_ALPN`] and the node's cluster certificate. Client
//! certificates are optional (nodes present theirs, clients none) and verified against
//! the cluster CA when presented; they grant nothing: the head's [`Grant`] in each
//! request is the credential, checked with [`object_grant::verify`] under the key the
//! head gave at registration ([`GrantKeyCell`]).
//!
//! One stream carries one transfer, as documented on [`ObjectRequest`]: a request frame,
//! then for a put the object's bytes raw, and the node's one [`ObjectResponse`] frame;
//! for a get, a `Found` frame and the range's bytes raw. A bad grant, a hostile frame or
//! bytes that fail their hash get an `Error` response and the stream ends; nothing a peer
//! sends can panic the node. Bounds: [`limits::NODE_OBJECT_CONNECTIONS_MAX`] connections
//! (more are refused at once), [`limits::NODE_OBJECT_STREAMS_MAX`] transfers over all
//! connections (more wait, holding QUIC stream credit), and every read and write gives up
//! after [`limits::OBJECT_TRANSFER_STALL_TIMEOUT`] without progress.

use super::store::{CacheError, ObjectReader, ObjectStore};
use flame_protocol::frame::{FrameReader, FrameWriter};
use flame_protocol::limits;
use flame_protocol::model::{ApiError, ErrorKind};
use flame_protocol::object::{
    Grant, GrantKey, ObjectId, ObjectRef, ObjectRequest, ObjectResponse, ObjectScope, OBJECT_ALPN,
    OBJECT_CHUNK_BYTES, OBJECT_ID_BYTES,
};
use flame_protocol::object_grant::{self, GrantError};
use quinn::crypto::rustls::QuicServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use tokio::sync::Semaphore;

pub use flame_protocol::object::OBJECT_FRAME_BYTES_MAX;

/// Bytes written to a stream per wait (each wait bounded by the stall timeout).
const WRITE_PIECE_BYTES: usize = 256 * 1024;

/// Bytes taken from a stream per read.
const READ_PIECE_BYTES: usize = 1024 * 1024;

/// The head's grant key, filled in by the link when `Registered` arrives (and replaced when
/// the node registers with a restarted head). Until then every grant is refused.
#[derive(Debug, Clone, Default)]
pub struct GrantKeyCell(Arc<RwLock<GrantKey>>);

impl GrantKeyCell {
    /// Sets the key grants are checked with.
    pub fn set(&self, key: GrantKey) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = key;
    }

    /// The key grants are checked with now (empty before registration).
    pub fn get(&self) -> GrantKey {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Why the object endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ObjectEndpointError {
    #[error("object endpoint TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("object endpoint: {0}")]
    Config(String),
    #[error("cannot bind the object endpoint to {addr}: {cause}")]
    Bind {
        addr: SocketAddr,
        cause: std::io::Error,
    },
}

/// A QUIC server for objects on `addr`: TLS 1.3, ALPN [`OBJECT_ALPN`], presenting `certs`
/// (the node's certificate first, then the CA's) and `key`; client certificates optional,
/// verified against `ca` when presented.
pub fn object_endpoint(
    addr: SocketAddr,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    ca: CertificateDer<'static>,
) -> Result<quinn::Endpoint, ObjectEndpointError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca)?;
    let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| ObjectEndpointError::Config(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(certs, key)?;
    tls.alpn_protocols = vec![OBJECT_ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto =
        QuicServerConfig::try_from(tls).map_err(|e| ObjectEndpointError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    if let Ok(idle) = quinn::IdleTimeout::try_from(limits::IDLE_TIMEOUT) {
        transport.max_idle_timeout(Some(idle));
    }
    transport.keep_alive_interval(Some(limits::KEEP_ALIVE_INTERVAL));
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(limits::NODE_OBJECT_STREAMS_MAX));
    transport.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    transport.stream_receive_window(quinn::VarInt::from_u32(16 * 1024 * 1024));
    transport.receive_window(quinn::VarInt::from_u32(64 * 1024 * 1024));
    transport.send_window(64 * 1024 * 1024);
    config.transport_config(Arc::new(transport));
    quinn::Endpoint::server(config, addr).map_err(|cause| ObjectEndpointError::Bind { addr, cause })
}

/// What every transfer needs: the store, who this node is, and the grant key.
#[derive(Debug, Clone)]
pub(super) struct Service {
    pub store: ObjectStore,
    pub node_name: String,
    pub grant_key: GrantKeyCell,
}

/// Serves objects on `endpoint` until it is closed.
pub async fn serve(
    endpoint: quinn::Endpoint,
    store: ObjectStore,
    node_name: String,
    grant_key: GrantKeyCell,
) {
    let service = Arc::new(Service {
        store,
        node_name,
        grant_key,
    });
    let connections = Arc::new(Semaphore::new(limits::NODE_OBJECT_CONNECTIONS_MAX));
    let streams = Arc::new(Semaphore::new(limits::NODE_OBJECT_STREAMS_MAX as usize));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(
                max = limits::NODE_OBJECT_CONNECTIONS_MAX,
                "object endpoint: too many connections; refusing one"
            );
            incoming.refuse();
            continue;
        };
        let (service, streams) = (service.clone(), streams.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let conn = match stalled(incoming.into_future()).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "object endpoint: handshake failed");
                    return;
                }
                Err(_) => return,
            };
            serve_connection(conn, service, streams).await;
        });
    }
}

async fn serve_connection(conn: quinn::Connection, service: Arc<Service>, streams: Arc<Semaphore>) {
    loop {
        let Ok(permit) = streams.clone().acquire_owned().await else {
            return;
        };
        let (send, recv) = match conn.accept_bi().await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "object connection ended");
                return;
            }
        };
        let service = service.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve_stream(send, recv, &service).await;
        });
    }
}

/// Runs `work`, giving up after the stall timeout.
async fn stalled<T>(work: impl Future<Output = T>) -> Result<T, ApiError> {
    tokio::time::timeout(limits::OBJECT_TRANSFER_STALL_TIMEOUT, work)
        .await
        .map_err(|_| {
            ApiError::new(
                ErrorKind::Unavailable,
                format!(
                    "the transfer moved no byte for {:?}; abandoned",
                    limits::OBJECT_TRANSFER_STALL_TIMEOUT
                ),
            )
        })
}

async fn serve_stream(send: quinn::SendStream, recv: quinn::RecvStream, service: &Service) {
    let mut reader = FrameReader::new(recv, OBJECT_FRAME_BYTES_MAX);
    let mut writer = FrameWriter::new(send, OBJECT_FRAME_BYTES_MAX);
    let request = match stalled(reader.read_required::<ObjectRequest>()).await {
        Ok(Ok(request)) => request,
        Ok(Err(e)) => {
            let error = ApiError::new(
                ErrorKind::InvalidArgument,
                format!("bad object request: {e}"),
            );
            refuse(writer, reader.into_inner(), error).await;
            return;
        }
        Err(error) => {
            refuse(writer, reader.into_inner(), error).await;
            return;
        }
    };
    let mut recv = reader.into_inner();
    match request {
        ObjectRequest::Put {
            grant,
            object,
            chunks,
        } => match put(&mut recv, service, &grant, object, chunks).await {
            Ok(()) => {
                let _ = stalled(writer.write(&ObjectResponse::Stored)).await;
                let _ = writer.get_mut().finish();
            }
            Err(error) => refuse(writer, recv, error).await,
        },
        ObjectRequest::Get {
            grant,
            owner,
            id,
            offset,
            len,
        } => {
            let access = GetAccess {
                grant: grant.as_ref(),
                owner: &owner,
                id: &id,
            };
            let _ = recv.stop(quinn::VarInt::from_u32(0));
            match open_get(service, access, offset, len) {
                Ok((reader, offset, len)) => send_range(writer, &reader, offset, len).await,
                Err(error) => refuse(writer, recv, error).await,
            }
        }
    }
}

/// Answers `error` and ends the stream both ways.
async fn refuse(
    mut writer: FrameWriter<quinn::SendStream>,
    mut recv: quinn::RecvStream,
    error: ApiError,
) {
    tracing::debug!(%error, "object request refused");
    let _ = recv.stop(quinn::VarInt::from_u32(0));
    let _ = stalled(writer.write(&ObjectResponse::Error(error))).await;
    let _ = writer.get_mut().finish();
}

/// Checks a put's grant and sizes; the owner and scope the object gets.
pub(super) fn authorize_put(
    service: &Service,
    grant: &Grant,
    object: &ObjectRef,
    chunks: usize,
) -> Result<(String, ObjectScope), ApiError> {
    let key = service.grant_key.get();
    let body = object_grant::verify(&key, grant, now_unix_ms()).map_err(grant_error)?;
    let (scope, bytes_max) =
        object_grant::check_write(body, &service.node_name).map_err(grant_error)?;
    if object.size > bytes_max {
        return Err(ApiError::new(
            ErrorKind::QuotaExceeded,
            format!(
                "object {} has {} bytes; the grant covers {bytes_max}",
                object.id, object.size
            ),
        ));
    }
    if object.size > limits::OBJECT_BYTES_MAX {
        return Err(api_error(&CacheError::TooLarge {
            size: object.size,
            max: limits::OBJECT_BYTES_MAX,
        }));
    }
    if chunks as u64 != object.chunks() {
        return Err(ApiError::new(
            ErrorKind::InvalidArgument,
            format!(
                "{chunks} chunk hashes for {} bytes, which make {} chunks of {OBJECT_CHUNK_BYTES} bytes",
                object.size,
                object.chunks()
            ),
        ));
    }
    Ok((body.owner.clone(), scope))
}

/// What a get asks to read.
#[derive(Debug, Clone, Copy)]
pub(super) struct GetAccess<'a> {
    pub grant: Option<&'a Grant>,
    pub owner: &'a str,
    pub id: &'a ObjectId,
}

/// Checks a get's grant and opens the object; the reader and the range (`len` 0 made
/// explicit).
pub(super) fn open_get(
    service: &Service,
    access: GetAccess<'_>,
    offset: u64,
    len: u64,
) -> Result<(ObjectReader, u64, u64), ApiError> {
    let grant = access.grant.ok_or_else(|| {
        ApiError::new(
            ErrorKind::PermissionDenied,
            "reading an object needs a grant from the head",
        )
    })?;
    let key = service.grant_key.get();
    let body = object_grant::verify(&key, grant, now_unix_ms()).map_err(grant_error)?;
    object_grant::check_read(body, access.owner, access.id).map_err(grant_error)?;
    let reader = service
        .store
        .open_read(access.owner, access.id)
        .map_err(|e| api_error(&e))?;
    let size = reader.object().size;
    let len = if len == 0 {
        size.saturating_sub(offset)
    } else {
        len
    };
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(api_error(&CacheError::Range {
            id: *access.id,
            size,
            offset,
            len,
        }));
    }
    Ok((reader, offset, len))
}

/// Reads a put's bytes into the store.
async fn put(
    recv: &mut quinn::RecvStream,
    service: &Service,
    grant: &Grant,
    object: ObjectRef,
    chunks: Vec<[u8; OBJECT_ID_BYTES]>,
) -> Result<(), ApiError> {
    let (owner, scope) = authorize_put(service, grant, &object, chunks.len())?;
    let mut writer = service
        .store
        .writer(&owner, object, scope, chunks)
        .map_err(|e| api_error(&e))?;
    while writer.written() < object.size {
        let want = READ_PIECE_BYTES.min((object.size - writer.written()) as usize);
        let chunk = stalled(recv.read_chunk(want, true))
            .await?
            .map_err(|e| ApiError::new(ErrorKind::Unavailable, format!("put stream: {e}")))?;
        let Some(chunk) = chunk else {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "the stream ended after {} of {} bytes",
                    writer.written(),
                    object.size
                ),
            ));
        };
        writer.write(&chunk.bytes).map_err(|e| api_error(&e))?;
    }
    writer.finish().await.map_err(|e| api_error(&e))?;
    service.store.announce(&owner, object, scope);
    Ok(())
}

/// Sends `Found` and the range, chunk by chunk (a chunk that fails its hash on the way
/// resets the stream: the reader sees the transfer fail).
async fn send_range(
    mut writer: FrameWriter<quinn::SendStream>,
    reader: &ObjectReader,
    offset: u64,
    len: u64,
) {
    let found = ObjectResponse::Found {
        object: reader.object(),
        chunks: reader.chunks().to_vec(),
        offset,
        len,
    };
    if !matches!(stalled(writer.write(&found)).await, Ok(Ok(()))) {
        return;
    }
    let mut send = writer.into_inner();
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let next = ((at / OBJECT_CHUNK_BYTES) + 1) * OBJECT_CHUNK_BYTES;
        let piece_len = next.min(end) - at;
        let bytes = match reader.read_range(at, piece_len).await {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::warn!(%error, "object read failed mid-transfer");
                let _ = send.reset(quinn::VarInt::from_u32(1));
                return;
            }
        };
        for piece in bytes.chunks(WRITE_PIECE_BYTES) {
            if !matches!(stalled(send.write_all(piece)).await, Ok(Ok(()))) {
                let _ = send.reset(quinn::VarInt::from_u32(1));
                return;
            }
        }
        at += piece_len;
    }
    let _ = send.finish();
    // Keep the stream until the peer has every byte (or the stall timeout), so dropping it
    // does not cut the tail.
    let _ = stalled(send.stopped()).await;
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn grant_error(e: GrantError) -> ApiError {
    let kind = match e {
        GrantError::NoKey | GrantError::Key(_) => ErrorKind::Unavailable,
        _ => ErrorKind::PermissionDenied,
    };
    ApiError::new(kind, e.to_string())
}

/// What a client is told when the store refuses.
pub(super) fn api_error(e: &CacheError) -> ApiError {
    let kind = match e {
        CacheError::Full(_) => ErrorKind::LimitExceeded,
        CacheError::Disk { .. } | CacheError::Corrupt { .. } | CacheError::Busy { .. } => {
            ErrorKind::Unavailable
        }
        CacheError::NotFound { .. } => ErrorKind::NotFound,
        CacheError::TooLarge { .. } => ErrorKind::LimitExceeded,
        CacheError::Mismatch { .. } | CacheError::NotSealed(_) | CacheError::Range { .. } => {
            ErrorKind::InvalidArgument
        }
        CacheError::Gone { .. } => ErrorKind::FailedPrecondition,
        CacheError::Memory(_) => ErrorKind::Internal,
    };
    ApiError::new(kind, e.to_string())
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
