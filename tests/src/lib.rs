//! The end-to-end harness: real `flame-head` and `flame-node` processes on loopback or in
//! network namespaces, driven by the `flame` binary and the client library.
//!
//! * [`Cluster`] starts a head and its nodes in a temporary folder, waits for each to say it
//!   is ready (a stdout line, never a sleep), and kills them all when dropped. It can kill
//!   a node, and (in namespaces) partition one from the head and heal it.
//! * [`netns`] makes the namespaces and links, and the firewall drops of a partition.
//! * [`half_open`] floods a head with QUIC handshakes that pass its address validation and
//!   then go silent.
//! * [`client_thread`] runs client code on a thread that can reach a head in a namespace.
//! * [`command`] runs a binary of the workspace with a bound and captures its output.
//! * [`results`] drains a session's results and checks them; [`recorder`] records every
//!   result frame the head sends, across reconnections, to find any sent twice.
//! * [`logging_service`] is the application of the `flame logs` tests, and a follower.
//! * [`cgroup`] finds a node's executor cgroups on disk; [`procfs`] looks at processes.
//! * [`test_service`] runs `flame-test-service` (`src/bin`), the application the executor
//!   tests drive with text commands.
//! * [`sshd`] runs a real sshd in each namespace, with keys made for the test, for the
//!   `flame cluster` tests.
//! * [`prerequisites`] fails a test under CI, or skips it loudly elsewhere, when the
//!   machine lacks what it needs (root, cgroups, python3).
//!
//! The binaries come from the cargo target folder of the running test (`target/debug`); they
//! must be built first. `cargo test --workspace` builds every binary of the workspace before
//! it runs integration tests; `cargo test -p flame-tests` builds only this package, so run
//! `cargo build --workspace --bins` before it, or it runs against stale binaries.
//!
//! Every wait is bounded and panics with the tail of the logs when it runs out: this is test
//! support, so a clear panic is the error report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod cgroup;
pub mod client_thread;
pub mod cluster;
pub mod command;
pub mod half_open;
pub mod logging_service;
pub mod netns;
pub mod prerequisites;
pub mod procfs;
pub mod recorder;
pub mod results;
pub mod sshd;
pub mod test_service;

pub use cluster::{Cluster, ClusterOptions};
pub use command::{binary, run_command, CmdOutput};
