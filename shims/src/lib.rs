//! Flame shims: both ends of the shim protocol, over either transport.
//!
//! - [`node`]: the node's side. `flame-node` wraps an application's frame stream (its
//!   stdout and stdin, or a Unix socket connection) in a [`node::NodeShim`] and drives it:
//!   wait for ready, enter a session, invoke tasks, leave, shut down. Async (tokio).
//! - [`unix`]: the Unix-socket transport: the per-executor private directory
//!   ([`unix::SocketDir`]), the node's connect ([`unix::connect_when_listening`]) and the
//!   variable that names the socket ([`unix::ENV_SHIM_SOCKET`]).
//! - [`service`]: the application's side. A Rust application implements [`service::Service`]
//!   and calls [`service::run`] from `main`, which serves over the socket when the node set
//!   [`unix::ENV_SHIM_SOCKET`] and over stdin/stdout otherwise. Synchronous std I/O; no
//!   runtime needed.
//!
//! The byte layout itself lives in [`flame_protocol::shim`] and is described normatively in
//! `docs/shim-protocol.md`. `shims/python/flame_service.py` is the same application side in
//! plain Python, and the `flame-shim-check` binary checks any implementation for conformance.
//!
//! Architecture invariant: once frames flow, neither side owns a timeout. The node decides
//! how long an application may take and wraps calls in `tokio::time::timeout`; the
//! application side waits for the node for as long as the node keeps the stream open. The
//! only waits bounded here are the Unix transport's setup: the node waiting for the
//! application to listen, and the application waiting for the node to connect.

pub mod node;
pub mod private_dir;
pub mod service;
pub mod unix;

use flame_protocol::shim::ShimFrameError;
use std::path::PathBuf;
use std::time::Duration;

/// What can go wrong speaking the shim protocol, on either side.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The peer closed its end of the stream (for the node: the application exited or closed
    /// its stdout or its socket connection, possibly in the middle of a frame).
    #[error("the application exited or closed its end of the shim stream")]
    Exited,
    /// The application exited or closed its stream with part of a frame sent.
    #[error(
        "the application exited or closed its end of the shim stream in the middle of a frame \
         ({have} bytes of it had arrived)"
    )]
    ExitedMidFrame {
        /// Bytes of the unfinished frame (length prefix included) that had arrived.
        have: usize,
    },
    /// The application wrote something that is not a shim frame: its first bytes, read
    /// as a length prefix, claim a frame over the limit.
    #[error(
        "the application wrote bytes that are not shim frames to its stream: they begin \
         {shown} (read as a length prefix: {len} bytes, over the {max}-byte limit); under the \
         stdio shim stdout carries only frames, and logs belong on stderr"
    )]
    NotFrames {
        /// The first bytes, escaped for display (printable ASCII as is).
        shown: String,
        /// The length they claim.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The node closed the application's stdin (or the socket connection) in the middle of a
    /// frame.
    #[error("the shim stream from the node ended in the middle of a frame")]
    Truncated,
    /// The application answered a session enter or leave with an error frame.
    #[error("the application reported an error: {0}")]
    App(String),
    /// A frame was malformed, of an unknown type or over the size limit.
    #[error("bad shim frame: {0}")]
    Frame(#[from] ShimFrameError),
    /// A well-formed frame arrived where the protocol does not allow it.
    #[error("shim protocol violation: expected {expected}, got {got}")]
    Unexpected {
        /// What the protocol allows at this point.
        expected: &'static str,
        /// The frame that arrived.
        got: &'static str,
    },
    /// A task result named a different task from the one invoked.
    #[error("shim protocol violation: invoked task {expected}, got a result for task {got}")]
    TaskIdMismatch {
        /// The task that was invoked.
        expected: u64,
        /// The task the result names.
        got: u64,
    },
    /// An earlier call on this shim failed or was cancelled (for example by a timeout), so
    /// the stream may stop mid-frame; the executor must be shut down.
    #[error("the shim is out of step after an earlier failed or cancelled call")]
    Broken,
    /// Reading or writing the pipe failed.
    #[error("shim i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// Setting up the Unix-socket transport failed at this path: creating the private
    /// directory, binding, accepting, connecting or setting permissions.
    #[error("shim socket {}: {source}", path.display())]
    Socket {
        /// The socket file or its directory.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The executor's private socket folder, or the socket in it, is not what the node
    /// made or expects (a link planted in its place, a socket of someone else), or a step
    /// on it failed; nothing outside the folder was touched.
    #[error("shim socket folder: {0}")]
    PrivateDir(#[from] private_dir::PrivateDirError),
    /// A socket path does not fit in `sockaddr_un` (see
    /// [`unix::SOCKET_PATH_BYTES_MAX`]).
    #[error("shim socket path {} is {len} bytes, over the limit of {max}", path.display())]
    SocketPathTooLong {
        /// The path that does not fit.
        path: PathBuf,
        /// Its length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The node's side: the application did not listen on its socket in time.
    #[error("the application did not listen on {} within {timeout:?}", path.display())]
    NotListening {
        /// The socket the node waited for.
        path: PathBuf,
        /// How long it waited.
        timeout: Duration,
    },
    /// The node's side: the application exited before it listened on its socket.
    #[error("the application exited before listening on {}", path.display())]
    ExitedBeforeListening {
        /// The socket the node waited for.
        path: PathBuf,
    },
    /// The application's side: the node did not connect to the socket in time.
    #[error("the node did not connect to {} within {timeout:?}", path.display())]
    NotConnected {
        /// The socket the application listened on.
        path: PathBuf,
        /// How long it waited.
        timeout: Duration,
    },
}
