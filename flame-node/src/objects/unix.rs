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
//! [`OBJECT_FRAME_BYTES_MAX`] before a byte of the body is kept, and a descriptor that
//! arrives where none is expected is closed.

use super::server::OBJECT_FRAME_BYTES_MAX;
use super::server::{api_error, authorize_put, open_get, GetAccess, GrantKeyCell, Service};
use super::store::ObjectStore;
use flame_protocol::frame::{decode, encode_into, LENGTH_PREFIX_BYTES};
use flame_protocol::limits;
use flame_protocol::model::{ApiError, ErrorKind};
use flame_protocol::object::{ObjectRequest, ObjectResponse};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use tokio::io::Interest;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

/// Descriptors one message may carry before the node stops reading them (a put carries
/// one).
const FDS_PER_MESSAGE_MAX: usize = 4;

/// Bytes taken from the socket per read.
const READ_BYTES: usize = 64 * 1024;

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

/// A Unix stream carrying frames and descriptors (`SCM_RIGHTS`): the node's side, and a
/// same-host client's in tests.
#[derive(Debug)]
pub struct FdStream {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Descriptors received and not yet taken, in order.
    pub fds: VecDeque<OwnedFd>,
}

/// Why a frame could not be read or written on the object socket.
#[derive(Debug, thiserror::Error)]
pub enum FdStreamError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("the socket ended in the middle of a frame")]
    Truncated,
    #[error("more descriptors than a message may carry ({FDS_PER_MESSAGE_MAX})")]
    TooManyFds,
    #[error("object socket: {0}")]
    Io(#[from] std::io::Error),
}

impl FdStream {
    /// Wraps a connected stream.
    pub fn new(stream: UnixStream) -> FdStream {
        FdStream {
            stream,
            buf: Vec::new(),
            fds: VecDeque::new(),
        }
    }

    /// The next frame (its descriptors, if any, in [`FdStream::fds`]), or `None` at a clean
    /// end between frames.
    pub async fn read_frame<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FdStreamError> {
        loop {
            if self.buf.len() >= LENGTH_PREFIX_BYTES {
                let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
                prefix.copy_from_slice(&self.buf[..LENGTH_PREFIX_BYTES]);
                let len = u32::from_le_bytes(prefix) as usize;
                if len > OBJECT_FRAME_BYTES_MAX {
                    return Err(FdStreamError::TooLarge {
                        len,
                        max: OBJECT_FRAME_BYTES_MAX,
                    });
                }
                let end = LENGTH_PREFIX_BYTES + len;
                if self.buf.len() >= end {
                    let msg = decode(&self.buf[LENGTH_PREFIX_BYTES..end])
                        .map_err(|e| FdStreamError::Malformed(e.to_string()));
                    self.buf.drain(..end);
                    return msg.map(Some);
                }
            }
            if self.receive().await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FdStreamError::Truncated)
                };
            }
        }
    }

    /// Reads what is there, keeping its descriptors; the bytes read (0 at the end).
    async fn receive(&mut self) -> Result<usize, FdStreamError> {
        let mut chunk = vec![0u8; READ_BYTES];
        let raw = self.stream.as_raw_fd();
        let (n, fds, truncated) = loop {
            self.stream.readable().await?;
            match self
                .stream
                .try_io(Interest::READABLE, || receive_once(raw, &mut chunk))
            {
                Ok(got) => break got,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        };
        self.fds.extend(fds);
        if truncated || self.fds.len() > FDS_PER_MESSAGE_MAX {
            self.fds.clear();
            return Err(FdStreamError::TooManyFds);
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Writes one frame, with `fd` as `SCM_RIGHTS` on its first bytes when given.
    pub async fn write_frame<T: Serialize>(
        &mut self,
        msg: &T,
        fd: Option<&OwnedFd>,
    ) -> Result<(), FdStreamError> {
        let mut frame = Vec::new();
        encode_into(msg, &mut frame, OBJECT_FRAME_BYTES_MAX).map_err(|e| match e {
            flame_protocol::frame::FrameError::TooLarge { len, max } => {
                FdStreamError::TooLarge { len, max }
            }
            other => FdStreamError::Malformed(other.to_string()),
        })?;
        let raw = self.stream.as_raw_fd();
        let mut sent = 0;
        let mut fd = fd.map(AsRawFd::as_raw_fd);
        while sent < frame.len() {
            self.stream.writable().await?;
            let rest = &frame[sent..];
            match self
                .stream
                .try_io(Interest::WRITABLE, || send_once(raw, rest, fd))
            {
                Ok(n) => {
                    sent += n;
                    // The descriptor went with the first bytes.
                    fd = None;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// One `recvmsg`: bytes read, descriptors received, and whether the kernel cut them.
fn receive_once(raw: RawFd, chunk: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>, bool)> {
    let mut space = nix::cmsg_space!([RawFd; FDS_PER_MESSAGE_MAX]);
    let mut iov = [IoSliceMut::new(chunk)];
    let msg = recvmsg::<()>(
        raw,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(std::io::Error::from)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel just gave these descriptors to this process; nothing
            // else owns them.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    Ok((msg.bytes, fds, truncated))
}

/// One `sendmsg` of `bytes`, with `fd` attached when given.
fn send_once(raw: RawFd, bytes: &[u8], fd: Option<RawFd>) -> std::io::Result<usize> {
    let iov = [IoSlice::new(bytes)];
    let fds: Vec<RawFd> = fd.into_iter().collect();
    let rights = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        raw,
        &iov,
        cmsgs,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(std::io::Error::from)
}

#[cfg(test)]
#[path = "unix_tests.rs"]
mod tests;
