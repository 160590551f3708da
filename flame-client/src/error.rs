//! The client library's error type.

use flame_protocol::auth::TokenFormatError;
use flame_protocol::endpoint::EndpointError;
use flame_protocol::frame::FrameError;
use flame_protocol::model::{ApiError, ErrorKind};
use flame_protocol::object::ObjectId;
use flame_protocol::object_transfer::TransferError;
use std::time::Duration;

/// Anything that can go wrong between a client and the head.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection could not be set up: CA file, address, handshake or hello. The
    /// message names the address tried.
    #[error(transparent)]
    Connect(#[from] EndpointError),
    /// The configured token is not in the text form `flame-head token create` prints. The
    /// message never quotes it.
    #[error("the configured token is not valid: {0}")]
    Token(TokenFormatError),
    /// The configuration names neither a CA file nor a token whose CA fingerprint could
    /// verify the head.
    #[error("nothing to verify the head at {addr} with: configure its CA file or a token")]
    NoTrust {
        /// The head's address as configured.
        addr: String,
    },
    /// The established connection was lost.
    #[error("connection to the head at {addr} lost: {source}")]
    Connection {
        /// The head's address as configured.
        addr: String,
        /// What QUIC reported.
        source: quinn::ConnectionError,
    },
    /// A stream broke, or carried a frame that could not be read or written.
    #[error("{what} with the head at {addr} failed: {source}")]
    Stream {
        /// The head's address as configured.
        addr: String,
        /// The exchange, e.g. `request ListSessions`.
        what: String,
        /// The framing or I/O error.
        source: FrameError,
    },
    /// The head did not answer within the bound.
    #[error("the head at {addr} did not complete {what} within {}", humantime::format_duration(*timeout))]
    Timeout {
        /// The head's address as configured.
        addr: String,
        /// The exchange, e.g. `request ListSessions`.
        what: String,
        /// The bound that ran out.
        timeout: Duration,
    },
    /// The head refused the request; [`ClientError::kind`] tells which way.
    #[error("{0}")]
    Api(ApiError),
    /// The head refused one batch of a submit stream; nothing of that batch was accepted.
    #[error("batch {batch_id} was rejected: {error}")]
    BatchRejected {
        /// The batch's id on its stream.
        batch_id: u64,
        /// The head's reason.
        error: ApiError,
    },
    /// The head answered something this client does not expect, or ended a stream early.
    #[error("the head at {addr} broke the protocol during {what}: {detail}")]
    Protocol {
        /// The head's address as configured.
        addr: String,
        /// The exchange.
        what: String,
        /// What was wrong.
        detail: String,
    },
    /// An object's bytes could not be moved to or from a node's cache (or the transfer
    /// client could not be set up).
    #[error("{what}: {source}")]
    ObjectTransfer {
        /// What was being done, e.g. `putting object 1a2b3c4d5e6f to node n1`.
        what: String,
        /// Why it failed.
        source: Box<TransferError>,
    },
    /// No node holds a copy of the object: the head's reason (lost with a node, being
    /// rebuilt, removed).
    #[error("object {id} cannot be read: {reason}")]
    ObjectMissing {
        /// The object.
        id: ObjectId,
        /// The head's reason.
        reason: String,
    },
    /// Bytes that cannot be an object (larger than
    /// [`flame_protocol::limits::OBJECT_BYTES_MAX`]), or a request with too many.
    #[error("{0}")]
    ObjectInvalid(String),
    /// A submit stream was used again after one of its calls failed; its state is unknown.
    #[error("the submit stream of session {session} already failed; open a new one")]
    SubmitterBroken {
        /// The session the stream submits to.
        session: flame_protocol::SessionId,
    },
}

impl ClientError {
    /// The head's classification of a refusal, for programs that branch on it; `None` for
    /// transport and protocol failures.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Api(e) | ClientError::BatchRejected { error: e, .. } => Some(e.kind),
            _ => None,
        }
    }
}

/// A quinn stream-state error as the I/O error the framing layer reports.
pub(crate) fn io_error(e: quinn::ClosedStream) -> FrameError {
    FrameError::Io(std::io::Error::new(std::io::ErrorKind::BrokenPipe, e))
}
