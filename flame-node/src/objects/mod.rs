//! The node's object cache (issue 20): objects held in memory (sealed memfds) and in a
//! spill folder, and the endpoints that store and serve them.
//!
//! - [`cache`]: the pure bookkeeping (budgets, pins, LRU, what to spill or drop).
//! - [`store`]: the shell that holds the bytes (memfds, spill files) and reports events.
//! - `files`: the memfds and spill files under the store (no path a user can change is followed).
//! - [`server`]: the QUIC object endpoint (put and get, checked by the head's grants).
//! - [`unix`]: the same-host endpoint (descriptors passed on a Unix socket).

pub mod cache;
mod files;
pub mod server;
pub mod store;
pub mod unix;

// The names the link, the executors and the endpoints use.
pub use server::GrantKeyCell;
pub use store::{CacheConfig, ObjectStore};
