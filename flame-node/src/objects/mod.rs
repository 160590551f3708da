//! The node's object cache (issue 20): objects held in memory (sealed memfds) and in a
//! spill folder, and the endpoints that store and serve them.
//!
//! - [`cache`]: the pure bookkeeping (budgets, pins, LRU, what to spill or drop).

// The link and executor integration (another change) calls this API; until it lands,
// only the tests do.
#![allow(dead_code)]

pub mod cache;
