//! Tests of the server's own parts: handshake accounting, the stall meter, frame deadlines.

use super::core_loop::StallMeter;
use super::*;
use tokio::io::AsyncWriteExt;

const STALL: Duration = Duration::from_millis(200);

fn framed(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

#[test]
fn handshakes_are_counted_per_ipv4_address_and_per_ipv6_64() {
    let a: std::net::IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
    let b: std::net::IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
    let c: std::net::IpAddr = "2001:db8:1:3::1".parse().unwrap();
    assert_eq!(handshake_source(a), handshake_source(b));
    assert_ne!(handshake_source(a), handshake_source(c));
    let v4: std::net::IpAddr = "10.1.2.3".parse().unwrap();
    let mapped: std::net::IpAddr = "::ffff:10.1.2.3".parse().unwrap();
    assert_eq!(handshake_source(v4), v4);
    assert_eq!(handshake_source(mapped), v4);
}

#[test]
fn stall_meter_tells_a_stall_from_the_loop_cadence() {
    let start = std::time::Instant::now();
    let mut meter = StallMeter::new(start, 1_000_000);
    // Ordinary turns: a tick period apart, or faster while busy.
    assert_eq!(meter.turn(start + TICK, 1_000_200), None);
    assert_eq!(meter.turn(start + TICK * 2, 1_000_400), None);
    // Stopped for 15 s: both clocks moved.
    let woke = start + TICK * 2 + Duration::from_secs(15);
    assert_eq!(meter.turn(woke, 1_015_400), Some(15_000 - 200));
    // A frozen VM: the monotonic clock stood still, the wall clock moved 20 s.
    assert_eq!(meter.turn(woke, 1_035_400), Some(20_000 - 200));
    // A wall clock stepped back is no stall.
    assert_eq!(meter.turn(woke + TICK, 1_000_000), None);
}

#[tokio::test]
async fn a_peer_stalled_mid_frame_is_cut_off_and_a_slow_or_idle_one_is_not() {
    // Half a frame, then nothing: cut off after the stall bound.
    let (mut peer, head) = tokio::io::duplex(1024);
    let mut reader = FrameReader::new(head, 1024);
    let frame = framed(&postcard::to_allocvec(&"hello").unwrap());
    peer.write_all(&frame[..frame.len() - 2]).await.unwrap();
    let started = tokio::time::Instant::now();
    let got = read_within::<String, _>(&mut reader, None, STALL).await;
    assert!(
        matches!(got, Err(ConnError::Timeout(what)) if what.contains("stalled")),
        "{got:?}"
    );
    assert!(started.elapsed() >= STALL);

    // A frame trickled a byte at a time, each within the bound: read whole.
    let (mut peer, head) = tokio::io::duplex(1024);
    let mut reader = FrameReader::new(head, 1024);
    let body = postcard::to_allocvec(&"a slow but steady frame").unwrap();
    let frame = framed(&body);
    let trickle = tokio::spawn(async move {
        for b in frame {
            peer.write_all(&[b]).await.unwrap();
            tokio::time::sleep(STALL / 4).await;
        }
        peer
    });
    let got = read_within::<String, _>(&mut reader, None, STALL).await;
    assert_eq!(got.unwrap().as_deref(), Some("a slow but steady frame"));
    let _peer = trickle.await.unwrap();

    // Silence between frames: allowed without an idle bound, refused past one.
    let (_peer, head) = tokio::io::duplex(1024);
    let mut reader = FrameReader::new(head, 1024);
    let waited = tokio::time::timeout(
        STALL * 3,
        read_within::<String, _>(&mut reader, None, STALL),
    )
    .await;
    assert!(waited.is_err(), "an idle stream was cut off: {waited:?}");
    let got = read_within::<String, _>(&mut reader, Some(STALL * 2), STALL).await;
    assert!(
        matches!(got, Err(ConnError::Timeout("the next frame"))),
        "{got:?}"
    );
}

#[test]
fn object_requests_act_for_the_caller_unless_an_admin_names_another_owner() {
    use flame_protocol::auth::Principal;
    let locate = |owner: &str| ClientRequest::LocateObjects {
        owner: owner.into(),
        ids: Vec::new(),
    };
    let alice = Principal {
        name: "alice".into(),
        admin: false,
    };
    // An empty owner is the caller.
    assert_eq!(
        super::client::object_owner(&alice, locate("")),
        Ok(locate("alice"))
    );
    // Another owner's name is refused on the name alone: nothing about bob's objects.
    let refused = super::client::object_owner(&alice, locate("bob")).unwrap_err();
    assert_eq!(refused.kind, ErrorKind::PermissionDenied);
    assert!(
        refused.message.contains("only admins act for others"),
        "{refused}"
    );
    let admin = Principal {
        name: "root".into(),
        admin: true,
    };
    assert_eq!(
        super::client::object_owner(&admin, locate("bob")),
        Ok(locate("bob"))
    );
}
