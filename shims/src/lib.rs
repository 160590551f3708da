//! Flame shims: both ends of the stdio shim protocol.
//!
//! - [`node`]: the node's side. `flame-node` wraps an application process's stdout and stdin
//!   in a [`node::NodeShim`] and drives it: wait for ready, enter a session, invoke tasks,
//!   leave, shut down. Async (tokio).
//! - [`service`]: the application's side. A Rust application implements [`service::Service`]
//!   and calls [`service::run`] from `main`. Synchronous std I/O; no runtime needed.
//!
//! The byte layout itself lives in [`flame_protocol::shim`] and is described normatively in
//! `docs/shim-protocol.md`. `shims/python/flame_service.py` is the same application side in
//! plain Python, and the `flame-shim-check` binary checks any implementation for conformance.
//!
//! Architecture invariant: neither side owns a timeout. The node decides how long an
//! application may take and wraps calls in `tokio::time::timeout`; the application side
//! waits for the node for as long as the node keeps its stdin open.

pub mod node;
pub mod service;

use flame_protocol::shim::ShimFrameError;

/// What can go wrong speaking the shim protocol, on either side.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The peer closed its end of the stream (for the node: the application exited or closed
    /// its stdout, possibly in the middle of a frame).
    #[error("the application exited or closed its stdout")]
    Exited,
    /// The node closed the application's stdin in the middle of a frame.
    #[error("stdin ended in the middle of a shim frame")]
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
}
