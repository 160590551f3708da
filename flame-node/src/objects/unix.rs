//! The node's same-host object endpoint: a Unix socket that passes descriptors, not bytes.
//!
//! A client on the same host (same machine id and network namespace) puts an object by
//! sending the [`ObjectRequest::Put`] frame with a sealed memfd as `SCM_RIGHTS`; the node
//! checks the seals (`F_SEAL_WRITE|SHRINK|GROW`: nobody can change the bytes any more),
//! hashes it against the id, and keeps the descriptor itself when the object goes to
//! memory. A get's [`ObjectResponse::Found`] frame comes with a read-only descriptor of the
//! object (the memfd reopened read-only, or the spill file) and no bytes; the reader maps
//! or reads it and checks the chunk hashes as on QUIC.
//!
//! The socket is mode 0666 in the node's runtime folder (root-owned): anyone on the host
//! may connect, and the grant is the credential, checked exactly as on QUIC
//! ([`super::server`]). A connection carries requests one after another; each waits at
//! most [`limits::OBJECT_TRANSFER_STALL_TIMEOUT`] for its frame, frames are bounded by
//! [`flame_protocol::object::OBJECT_FRAME_BYTES_MAX`] before a byte of the body is kept, and a descriptor that
//! arrives where none is expected is closed.

use super::server::{api_error, authorize_put, open_get, GetAccess, GrantKeyCell, Service};
use super::store::ObjectStore;
use flame_protocol::limits;
use flame_protocol::model::{ApiError, ErrorKind};
use flame_protocol::object::{ObjectRequest, ObjectResponse};
pub use flame_protocol::object_transfer::FdStream;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

/// Binds the object socket at `path`, replacing a stale socket from an earlier run (and
/// refusing anything else there), and makes it connectable by every user (mode 0666).
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::other(format!(
                "{} exists and is not a socket; the node will not replace it",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

/// Serves objects on `listener` until it fails.
pub async fn serve_unix(
    listener: UnixListener,
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
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and the like pass; wait a little instead of spinning.
                tracing::warn!(error = %e, "object socket: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!("object socket: too many connections; closing one");
            continue;
        };
        let service = service.clone();
        tokio::spawn(async move {
            let _permit = permit;
            serve_connection(FdStream::new(stream), &service).await;
        });
    }
}

async fn serve_connection(mut conn: FdStream, service: &Service) {
    loop {
        let request = match stalled(conn.read_frame::<ObjectRequest>()).await {
            Ok(Ok(Some(request))) => request,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                let error = ApiError::new(
                    ErrorKind::InvalidArgument,
                    format!("bad object request: {e}"),
                );
                let _ = stalled(conn.write_frame(&ObjectResponse::Error(error), None)).await;
                return;
            }
            Err(_) => return,
        };
        let fd = conn.fds.pop_front();
        conn.fds.clear();
        let (response, fd) = handle(request, fd, service).await;
        let sent = stalled(conn.write_frame(&response, fd.as_ref())).await;
        if !matches!(sent, Ok(Ok(()))) {
            return;
        }
    }
}

/// One request; the answer and the descriptor that goes with it.
async fn handle(
    request: ObjectRequest,
    fd: Option<OwnedFd>,
    service: &Service,
) -> (ObjectResponse, Option<OwnedFd>) {
    match request {
        ObjectRequest::Put {
            grant,
            object,
            chunks,
        } => {
            let stored = async {
                let (owner, scope) = authorize_put(service, &grant, &object, chunks.len())?;
                let fd = fd.ok_or_else(|| {
                    ApiError::new(
                        ErrorKind::InvalidArgument,
                        "a put on the object socket carries the object as a sealed memfd (SCM_RIGHTS)",
                    )
                })?;
                service
                    .store
                    .insert_fd(&owner, object, scope, fd)
                    .await
                    .map_err(|e| api_error(&e))?;
                service.store.announce(&owner, object, scope);
                Ok::<(), ApiError>(())
            };
            match stored.await {
                Ok(()) => (ObjectResponse::Stored, None),
                Err(e) => (ObjectResponse::Error(e), None),
            }
        }
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
            let opened = match open_get(service, access, offset, len) {
                Ok((reader, offset, len)) => match reader.verify().await {
                    Ok(()) => Ok((reader, offset, len)),
                    Err(e) => Err(api_error(&e)),
                },
                Err(e) => Err(e),
            };
            let opened = opened.and_then(|(reader, offset, len)| {
                let fd = reader.fd().map_err(|e| api_error(&e))?;
                let found = ObjectResponse::Found {
                    object: reader.object(),
                    chunks: reader.chunks().to_vec(),
                    offset,
                    len,
                };
                Ok((found, fd))
            });
            match opened {
                Ok((found, fd)) => (found, Some(fd)),
                Err(e) => (ObjectResponse::Error(e), None),
            }
        }
    }
}

async fn stalled<T>(work: impl std::future::Future<Output = T>) -> Result<T, ()> {
    tokio::time::timeout(limits::OBJECT_TRANSFER_STALL_TIMEOUT, work)
        .await
        .map_err(|_| ())
}

#[cfg(test)]
#[path = "unix_tests.rs"]
mod tests;
