//! The Flame wire protocol.
//!
//! Everything that crosses a process boundary between `flame`, `flame-head` and `flame-node`
//! is defined here: ids and model types ([`ids`], [`model`]), every message ([`messages`]),
//! the length-prefixed framing ([`frame`]), the limits ([`limits`]) and the QUIC + TLS 1.3
//! endpoint setup ([`endpoint`]). The byte layout that applications speak to the node lives
//! in [`shim`].
//!
//! Message definitions hold no tokio or quinn types: they are plain serde data encoded with
//! postcard, so they can be fuzzed and tested without a runtime.

pub mod auth;
pub mod endpoint;
pub mod frame;
pub mod ids;
pub mod limits;
pub mod messages;
pub mod model;
pub mod ping;
pub mod pki;
pub mod ready;
pub mod shell;
pub mod shim;

pub use ids::{ExecutorId, SessionId, TaskId, TaskIdSet};

/// Version of the head/node/client protocol carried in every [`messages::Hello`].
pub const PROTOCOL_VERSION: u32 = 4;

/// The TLS application protocol name every Flame endpoint negotiates.
pub const ALPN: &[u8] = b"flame/1";

/// The port `flame-head` listens on unless told otherwise.
pub const DEFAULT_HEAD_PORT: u16 = 7470;
