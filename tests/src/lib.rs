//! The end-to-end harness: real `flame-head` and `flame-node` processes on loopback, driven
//! by the `flame` binary and the client library.
//!
//! * [`Cluster`] starts a head and its nodes in a temporary folder, waits for each to say it
//!   is ready (a stdout line, never a sleep), and kills them all when dropped.
//! * [`command`] runs a binary of the workspace with a bound and captures its output.
//! * [`results`] drains a session's results and checks them.
//!
//! The binaries come from the cargo target folder of the running test (`target/debug`); they
//! must be built first. `cargo test --workspace` builds every binary of the workspace before
//! it runs integration tests; `cargo test -p flame-tests` builds only this package, so run
//! `cargo build --workspace --bins` before it, or it runs against stale binaries.
//!
//! Every wait is bounded and panics with the tail of the logs when it runs out: this is test
//! support, so a clear panic is the error report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod cluster;
pub mod command;
pub mod results;

pub use cluster::{Cluster, ClusterOptions};
pub use command::{binary, run_command, CmdOutput};
