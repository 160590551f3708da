//! A peer with no credentials floods the head with half-open handshakes from one address,
//! 150 a second: each answers the head's Retry (so it holds a slot among the connections
//! being set up) and then goes silent until the head's handshake deadline (5 s). Without a
//! bound per address, 750 of them would hold all 256 slots and every other peer would be
//! refused. With `HANDSHAKES_PER_ADDRESS_MAX`, the flooder holds its share and is refused
//! beyond it, and `flame ping` from another address succeeds all along.
//!
//! The flooder is a host of its own on the cluster's subnet (a network namespace, see
//! `flame_tests::netns`); `flame ping` runs in the head's namespace, from its address.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_protocol::endpoint::{client_config, Trust};
use flame_protocol::limits::{CONNECT_TIMEOUT, HANDSHAKES_PER_ADDRESS_MAX};
use flame_tests::half_open::{self, FloodReport};
use flame_tests::{netns, Cluster, ClusterOptions};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Half-open handshakes a second from the flooder, as in the report of the finding.
const FLOOD_PER_SECOND: u32 = 150;
/// The flood stops after this at the latest (the test stops it once the pings are done).
const FLOOD_MAX: Duration = Duration::from_secs(120);
/// Refusals the flooder must have had before the pings start: by then it holds all it may.
const REFUSALS_BEFORE_PINGS: u64 = 50;
/// Bound on the flooder getting that far.
const FLOOD_RAMP_TIMEOUT: Duration = Duration::from_secs(30);
/// `flame ping`s during the flood at least, one after the other; each must succeed.
const PINGS: usize = 9;
/// The pings go on at least until the flood has lasted this long: twice the head's
/// deadline for a handshake and hello.
const FLOOD_LASTS_AT_LEAST: Duration = CONNECT_TIMEOUT.saturating_mul(2);

#[tokio::test(flavor = "multi_thread")]
async fn a_half_open_flood_from_one_address_leaves_room_for_others() {
    let test = "a_half_open_flood_from_one_address_leaves_room_for_others";
    if !netns::available(test) {
        return;
    }
    let mut cluster = Cluster::start(ClusterOptions::default().network_namespaces()).await;
    let port: u16 = cluster
        .head_addr()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the head's address has a port");
    let head = SocketAddr::from((netns::HEAD_ADDR, port));
    let config = client_config(&Trust::CaFile(cluster.ca_file().to_path_buf()), None).unwrap();
    let flood_ns = cluster.add_network_host("flood").handle();
    let stop = Arc::new(AtomicBool::new(false));
    let (progress, mut seen) = tokio::sync::watch::channel(FloodReport::default());
    let started = Instant::now();
    let flooder = half_open::spawn(
        Some(flood_ns),
        head,
        config,
        FLOOD_PER_SECOND,
        FLOOD_MAX,
        stop.clone(),
        progress,
    );

    // The flood holds what it may and is refused beyond it before anyone else connects.
    let ramp = tokio::time::timeout(
        FLOOD_RAMP_TIMEOUT,
        seen.wait_for(|r| r.refused >= REFUSALS_BEFORE_PINGS),
    )
    .await
    .map(|r| r.is_ok());
    let at_ramp = *seen.borrow();
    let ramp_took = started.elapsed();
    assert!(
        matches!(ramp, Ok(true)),
        "the flooder was not refused {REFUSALS_BEFORE_PINGS} times within \
         {FLOOD_RAMP_TIMEOUT:?}: {at_ramp:?}\n{}",
        cluster.logs()
    );
    // Before any of its half-open connections reached the head's deadline, the flooder
    // held exactly its address's share: no more, whatever it sent.
    assert!(
        ramp_took < CONNECT_TIMEOUT,
        "the flooder took {ramp_took:?} to be refused {REFUSALS_BEFORE_PINGS} times, past \
         the head's handshake deadline: {at_ramp:?}"
    );
    assert_eq!(
        at_ramp.held,
        u64::from(HANDSHAKES_PER_ADDRESS_MAX),
        "one address held other than its share: {at_ramp:?}"
    );

    // At least PINGS, and on until the flood has lasted twice the head's handshake
    // deadline, so that its half-open connections have expired and been replaced.
    let mut i = 0;
    while i < PINGS || started.elapsed() < FLOOD_LASTS_AT_LEAST {
        i += 1;
        let out = cluster.flame(&["ping", "-t", "100"]).await;
        assert!(
            out.success(),
            "ping {i} during the flood failed ({:?}): {out}\n{}",
            *seen.borrow(),
            cluster.logs()
        );
    }
    let during = *seen.borrow();
    stop.store(true, Ordering::Relaxed);
    let report = flooder.join().unwrap().unwrap();
    let elapsed = started.elapsed();
    eprintln!("flood over {elapsed:?}: {report:?}");
    // The flood went on, refused, while the pings ran.
    assert!(during.refused > at_ramp.refused, "{at_ramp:?} {during:?}");
}
