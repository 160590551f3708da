//! Tenants are isolated: two users, alice and bob, on a real head and node; each module
//! checks one thing bob cannot see or do to alice, with the error he sees.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

mod logs;
