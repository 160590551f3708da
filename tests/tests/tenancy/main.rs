//! Tenants on one cluster: what one user (bob) cannot see or do to another (alice), each
//! with the error bob sees. A real head and node as root; users act through tokens the
//! head's admin makes. Each module is one concern; this file holds what they share.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

mod identity;
mod logs;
mod rank_limits;

use flame_client::Client;
use flame_tests::Cluster;

/// A client acting as the Flame user `name` (a user token made by the head's admin).
pub async fn user_client(cluster: &Cluster, name: &str) -> Client {
    let token = cluster.user_token(name, false).await;
    match Client::connect(&cluster.client_config_as(token)).await {
        Ok(client) => client,
        Err(e) => panic!("cannot connect as {name}: {e}\n{}", cluster.logs()),
    }
}
