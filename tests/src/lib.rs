//! The end-to-end harness: real `flame-head` and `flame-node` processes on loopback or in
//! network namespaces, driven by the `flame` binary and the client library.
//!
//! * [`Cluster`] starts a head and its nodes in a temporary folder, waits for each to say it
//!   is ready (a stdout line, never a sleep), and kills them all when dropped. It can kill
//!   a node, and (in namespaces) partition one from the head and heal it.
//! * [`netns`] makes the namespaces and links, and the firewall drops of a partition.
//! * [`client_thread`] runs client code on a thread that can reach a head in a namespace.
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

pub mod client_thread;
pub mod cluster;
pub mod command;
pub mod netns;
pub mod results;

pub use cluster::{Cluster, ClusterOptions};
pub use command::{binary, run_command, CmdOutput};
