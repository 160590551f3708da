//! The same-host transport: a node's Unix socket, where a put passes a sealed memfd and a
//! get receives a read-only descriptor ([`FdStream`]: frames and `SCM_RIGHTS`, used by
//! the node's server too), so no object byte crosses the socket.

use super::{
    first_bad_chunk, found_chunks, io_err, maybe_blocking, protocol_err, put_outcome, stall,
    TransferError,
};
use crate::frame::{decode, encode_into, LENGTH_PREFIX_BYTES};
use crate::limits;
use crate::object::{
    Grant, ObjectId, ObjectRef, ObjectRequest, ObjectResponse, OBJECT_FRAME_BYTES_MAX,
};
use bytes::Bytes;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::VecDeque;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// Descriptors one message may carry before the reader stops taking them (a put or a
/// found carries one).
const FDS_PER_MESSAGE_MAX: usize = 4;

/// Bytes taken from the socket per read.
const READ_BYTES: usize = 64 * 1024;

/// A connected Unix socket, or `None` when it cannot be connected (the caller falls back
/// to QUIC).
pub(super) async fn unix_connect(path: &str) -> Option<UnixStream> {
    match tokio::time::timeout(limits::CONNECT_TIMEOUT, UnixStream::connect(path)).await {
        Ok(Ok(stream)) => Some(stream),
        _ => None,
    }
}

pub(super) async fn unix_put(
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
    let mut stream = FdStream::new(stream);
    stall(node, what, stream.write_frame(request, Some(&fd)))
        .await?
        .map_err(|e| io_err(node, what, e))?;
    drop(fd);
    let (response, extra) = read_answer(&mut stream, node, what).await?;
    if extra.is_some() {
        return Err(protocol_err(
            node,
            what,
            "it sent a descriptor with its answer to a put",
        ));
    }
    put_outcome(node, object, response)
}

pub(super) async fn unix_get(
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
    let mut stream = FdStream::new(stream);
    stall(node, what, stream.write_frame(&request, None))
        .await?
        .map_err(|e| io_err(node, what, e))?;
    let (response, fd) = read_answer(&mut stream, node, what).await?;
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

/// The node's one answer and the descriptor that came with it (more than one is an error).
async fn read_answer(
    stream: &mut FdStream,
    node: &str,
    what: &str,
) -> Result<(ObjectResponse, Option<OwnedFd>), TransferError> {
    let response = stall(node, what, stream.read_frame::<ObjectResponse>())
        .await?
        .map_err(|e| io_err(node, what, e))?
        .ok_or_else(|| protocol_err(node, what, "it closed the socket without an answer"))?;
    if stream.fds.len() > 1 {
        return Err(protocol_err(
            node,
            what,
            format!("{} descriptors came with one answer", stream.fds.len()),
        ));
    }
    Ok((response, stream.fds.pop_front()))
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

/// A Unix stream carrying frames and descriptors (`SCM_RIGHTS`): both sides of a node's
/// object socket. Frames are bounded by [`OBJECT_FRAME_BYTES_MAX`] before a byte of the
/// body is kept; a message with more than [`FDS_PER_MESSAGE_MAX`] descriptors is refused.
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

    /// The socket itself, for writing bytes that are not a frame (hostile-input tests).
    pub fn socket_mut(&mut self) -> &mut UnixStream {
        &mut self.stream
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
            crate::frame::FrameError::TooLarge { len, max } => FdStreamError::TooLarge { len, max },
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
