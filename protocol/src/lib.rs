//! The Flame wire protocol.
//!
//! Everything that crosses a process boundary between `flame`, `flame-head` and `flame-node`
//! is defined here: ids and model types ([`ids`], [`model`]), every message ([`messages`]),
//! the length-prefixed framing ([`frame`]) and the limits ([`limits`]). The byte layout that
//! applications speak to the node lives in [`shim`].
//!
//! Message definitions hold no tokio or quinn types: they are plain serde data encoded with
//! postcard, so they can be fuzzed and tested without a runtime.
//!
//! # Wire format and networking
//!
//! The crate is in two parts, split by the cargo feature `net` (off by default):
//!
//! - **Wire only, always built**: [`ids`], [`model`], [`messages`], [`auth`] (the token,
//!   secret and certificate *records* and their text forms), [`frame`], [`limits`],
//!   [`shim`], [`ping`] and [`shell`], and the constants below. They depend on serde,
//!   postcard, bytes and tokio's I/O traits, never on a TLS or QUIC crate. `flame-shims`
//!   links only this part, so an application built on it carries no TLS stack.
//! - **Networking, with `net`**: `endpoint` (the QUIC + TLS 1.3 endpoints, hello exchange,
//!   trust and peer certificates; quinn, rustls, ring) and `pki` (fingerprints, identities
//!   in certificates, key and CSR generation; rcgen, ring, x509-parser). `flame-head`,
//!   `flame-node`, `flame-cli` and the end-to-end tests turn it on.
//!
//! A wire-only module must not depend on a networking one: a helper both need (like
//! [`auth::hex`] or [`auth::FINGERPRINT_BYTES`]) lives on the wire side.
//! `protocol/tests/wire_only.rs` fails if `cargo tree -p flame-shims` shows a networking crate.

pub mod auth;
#[cfg(feature = "net")]
pub mod endpoint;
pub mod frame;
pub mod ids;
pub mod limits;
pub mod messages;
pub mod model;
pub mod object;
#[cfg(feature = "net")]
pub mod object_grant;
#[cfg(feature = "net")]
pub mod object_transfer;
pub mod ping;
#[cfg(feature = "net")]
pub mod pki;
pub mod ready;
pub mod shell;
pub mod shim;

pub use ids::{ExecutorId, SessionId, TaskId, TaskIdSet};

/// Version of the head/node/client protocol carried in every [`messages::Hello`].
/// 6: an object's chunk hashes are BLAKE3 subtree chaining values that merge into its id;
/// nodes learn the head's task output bound (`output_max`) at registration.
pub const PROTOCOL_VERSION: u32 = 6;

/// The TLS application protocol name every Flame endpoint negotiates.
pub const ALPN: &[u8] = b"flame/1";

/// The port `flame-head` listens on unless told otherwise.
pub const DEFAULT_HEAD_PORT: u16 = 7470;
