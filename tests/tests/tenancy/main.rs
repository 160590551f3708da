//! Tenants on one cluster: what one user cannot see or do to another, or to the limits the
//! head set for them. Each module runs a real head and node as root here.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

mod rank_limits;
