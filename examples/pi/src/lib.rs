//! A Monte Carlo estimate of Pi on Flame, the classic first Flame application.
//!
//! Every task draws points in the unit square and counts those inside the quarter circle;
//! the client sums the counts, and `4 · inside / samples` tends to Pi.
//!
//! - [`wire`]: the bytes the client and the service exchange (the Python service in
//!   `python/pi_service.py` speaks exactly the same format and errors).
//! - [`sampler`]: the deterministic PRNG and the counting loop.
//! - [`service`]: the [`flame_shims::service::Service`] that `pi-service` runs.
//!
//! Architecture invariant: this crate's library does no I/O; the binaries own stdin,
//! stdout and the network.

pub mod sampler;
pub mod service;
pub mod wire;
