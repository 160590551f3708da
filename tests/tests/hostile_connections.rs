//! Many hostile connections at a running head: oversized, truncated, mutated and slow
//! frames, before and after authentication, and a connection that opens streams without
//! end. The head closes each offending connection with a reason and goes on serving: a
//! normal 10,000-task session by a valid user completes afterwards, and the head's memory
//! stays bounded.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_client::Client;
use flame_protocol::auth::Secret;
use flame_protocol::endpoint::{self, Trust};
use flame_protocol::frame::FrameReader;
use flame_protocol::messages::{ClientRequest, Hello, HelloReply, Role};
use flame_protocol::model::TaskOutcome;
use flame_protocol::{limits, PROTOCOL_VERSION};
use flame_tests::cluster::{Cluster, ClusterOptions};
use flame_tests::results::{ping_spec, run_tasks};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;

/// Connections of each hostile kind.
const PER_KIND: usize = 40;
/// How long an attack refused at the handshake tries again: past the head's hello timeout,
/// so the slots the slow attacks hold come free at least once.
const DIAL_PATIENCE: Duration = Duration::from_secs(30);
/// Pause between two tries of a refused attack.
const DIAL_RETRY: Duration = Duration::from_millis(100);
/// How long the head may take to close an offending connection: its handshake bound plus
/// slack for a loaded machine.
const CLOSE_WITHIN: Duration = Duration::from_secs(20);
/// Growth of the head's resident memory the attack may cause, in KiB.
const RSS_GROWTH_MAX_KIB: u64 = 256 * 1024;

fn hello_bytes(token: Option<Secret>) -> Vec<u8> {
    let body = postcard::to_allocvec(&Hello {
        protocol_version: PROTOCOL_VERSION,
        role: Role::Client,
        agent: "hostile".into(),
        token,
    })
    .unwrap();
    frame(&body)
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// Deterministic pseudo-random bytes (xorshift), so a failure can be replayed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// What one hostile connection does.
#[derive(Debug, Clone, Copy)]
enum Attack {
    /// A hello frame whose length claims more than the hello limit.
    OversizedHello,
    /// Half a hello, then the stream ends.
    TruncatedHello,
    /// A valid hello with bytes changed.
    MutatedHello,
    /// A hello trickled one byte at a time, slower than the handshake bound allows.
    SlowHello,
    /// A handshake and then nothing at all.
    Silent,
    /// Authenticated, then a request frame of random bytes.
    GarbageRequest,
    /// Authenticated, then a frame claiming more than the frame limit.
    OversizedRequest,
    /// Authenticated, then stream after stream, each left open with half a frame.
    StreamFlood,
}

/// Runs one attack; returns why the head closed the connection, or what went wrong.
async fn attack(
    kind: Attack,
    seed: u64,
    addr: SocketAddr,
    ca: std::path::PathBuf,
    token: Secret,
) -> Result<String, String> {
    let endpoint = endpoint::client(&Trust::CaFile(ca), None).map_err(|e| e.to_string())?;
    // Refused before the handshake (the per-address handshake slots, held meanwhile by the
    // slow and silent attacks until their hello times out) is also a defence, but the
    // attack is retried until DIAL_PATIENCE: every kind must reach the head for the test to
    // see how the head ends it, however slowly a loaded machine runs the others.
    let patience = tokio::time::Instant::now() + DIAL_PATIENCE;
    let conn = loop {
        match flame_tests::cluster::dial(&endpoint, addr).await {
            Ok(conn) => break conn,
            Err(_) if tokio::time::Instant::now() < patience => {
                tokio::time::sleep(DIAL_RETRY).await;
            }
            Err(_) => return Ok("refused at the handshake".into()),
        }
    };
    let io = async {
        let (mut send, _recv) = conn.open_bi().await?;
        match kind {
            Attack::OversizedHello => {
                send.write_all(&(u32::MAX).to_le_bytes()).await?;
                send.write_all(&noise(seed, 4096)).await?;
            }
            Attack::TruncatedHello => {
                let hello = hello_bytes(Some(token.clone()));
                send.write_all(&hello[..hello.len() / 2]).await?;
                let _ = send.finish();
            }
            Attack::MutatedHello => {
                let mut hello = hello_bytes(Some(token.clone()));
                let n = hello.len();
                for (i, b) in noise(seed, 6).iter().enumerate() {
                    let at = 4 + (*b as usize * 7 + i * 13) % (n - 4);
                    hello[at] ^= b | 1;
                }
                send.write_all(&hello).await?;
            }
            Attack::SlowHello => {
                for b in hello_bytes(Some(token.clone())) {
                    send.write_all(&[b]).await?;
                    tokio::time::sleep(Duration::from_millis(400)).await;
                }
            }
            Attack::Silent => {
                // The stream stays open, and empty, past the head's hello bound.
                tokio::time::sleep(limits::CONNECT_TIMEOUT + Duration::from_secs(2)).await;
            }
            Attack::GarbageRequest | Attack::OversizedRequest | Attack::StreamFlood => {
                send.write_all(&hello_bytes(Some(token.clone()))).await?;
                let mut reader = FrameReader::new(_recv, 64 * 1024);
                match reader.read_required::<HelloReply>().await {
                    Ok(HelloReply::Welcome { .. }) => {}
                    other => return Err(std::io::Error::other(format!("not welcomed: {other:?}"))),
                }
                match kind {
                    Attack::GarbageRequest => {
                        let (mut s, _r) = conn.open_bi().await?;
                        let mut body = noise(seed, 300);
                        // An enum tag no request has: surely malformed.
                        body[0] = 0xff;
                        body[1] = 0x7f;
                        s.write_all(&frame(&body)).await?;
                    }
                    Attack::OversizedRequest => {
                        let (mut s, _r) = conn.open_bi().await?;
                        let len = u32::try_from(limits::FRAME_BYTES_MAX + 1).unwrap_or(u32::MAX);
                        s.write_all(&len.to_le_bytes()).await?;
                        s.write_all(&noise(seed, 64 * 1024)).await?;
                    }
                    _ => {
                        // Streams beyond the per-connection limit wait for credit the head
                        // does not give; each open one holds half a request.
                        let mut held = Vec::new();
                        for _ in 0..(limits::STREAMS_PER_CONNECTION_MAX as usize + 64) {
                            let opened =
                                tokio::time::timeout(Duration::from_millis(200), conn.open_bi())
                                    .await;
                            let Ok(Ok((mut s, r))) = opened else { break };
                            let request = postcard::to_allocvec(&ClientRequest::ListNodes).unwrap();
                            let framed = frame(&request);
                            s.write_all(&framed[..framed.len() - 1]).await?;
                            held.push((s, r));
                        }
                        if held.len() > limits::STREAMS_PER_CONNECTION_MAX as usize {
                            return Err(std::io::Error::other(format!(
                                "the head let one connection open {} streams",
                                held.len()
                            )));
                        }
                        // Held until the head times the requests out and the connection
                        // goes idle; dropping them here ends the attack.
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        conn.close(0u32.into(), b"done");
                        return Ok(());
                    }
                }
            }
        }
        Ok::<_, std::io::Error>(())
    };
    if let Err(e) = io.await {
        // A write fails once the head has closed the connection; what matters is below.
        if let std::io::ErrorKind::Other = e.kind() {
            return Err(format!("{kind:?}: {e}"));
        }
    }
    if matches!(kind, Attack::StreamFlood) {
        return Ok("stream flood bounded".into());
    }
    match tokio::time::timeout(CLOSE_WITHIN, conn.closed()).await {
        Err(_) => Err(format!(
            "{kind:?}: the head kept the connection open for {CLOSE_WITHIN:?}"
        )),
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
            Ok(String::from_utf8_lossy(&close.reason).into_owned())
        }
        Ok(other) => Ok(other.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_connections_leave_the_head_serving_with_bounded_memory() {
    // Malformed frames are what this test is about: mallory may hold all these connections
    // and streams at once (her quotas' refusals are `hostile_tenant.rs`'s subject).
    let cluster = Cluster::start(ClusterOptions::default().head_args([
        "--owner-quota",
        "mallory.connections=1000",
        "--owner-quota",
        "mallory.streams_per_connection=256",
    ]))
    .await;
    let head = cluster.head_pid();
    let (rss_before, _) =
        flame_tests::procfs::rss_kib(head).expect("cannot read the head's memory");
    let addr: SocketAddr = cluster.head_addr().parse().unwrap();
    let token = cluster.user_token("mallory", false).await;
    let kinds = [
        Attack::OversizedHello,
        Attack::TruncatedHello,
        Attack::MutatedHello,
        Attack::SlowHello,
        Attack::Silent,
        Attack::GarbageRequest,
        Attack::OversizedRequest,
        Attack::StreamFlood,
    ];
    let ca = Arc::new(cluster.ca_file().to_path_buf());
    let mut attacks = JoinSet::new();
    for (k, kind) in kinds.iter().enumerate() {
        for i in 0..PER_KIND {
            let (ca, token) = (ca.to_path_buf(), token.clone());
            let seed = (k * 1000 + i) as u64;
            let kind = *kind;
            attacks.spawn(async move { (kind, seed, attack(kind, seed, addr, ca, token).await) });
        }
    }
    let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
    let mut failures = Vec::new();
    while let Some(done) = attacks.join_next().await {
        let (kind, seed, result) = done.expect("an attack panicked");
        match result {
            Ok(reason) => *reasons.entry(format!("{kind:?}: {reason}")).or_default() += 1,
            Err(e) => failures.push(format!("seed {seed}: {e}")),
        }
    }
    eprintln!("how the head ended the hostile connections:");
    for (reason, n) in &reasons {
        eprintln!("  {n:>4} × {reason}");
    }
    assert!(failures.is_empty(), "{failures:#?}\n{}", cluster.logs());
    // Oversized frames are named as such.
    assert!(
        reasons
            .keys()
            .any(|r| r.starts_with("OversizedRequest") && r.contains("limit")),
        "{reasons:#?}"
    );
    for slow in ["SlowHello", "Silent"] {
        assert!(
            reasons
                .keys()
                .any(|r| r.starts_with(slow) && r.contains("no hello in time")),
            "{reasons:#?}"
        );
    }

    // A valid user's normal session completes.
    let client =
        Client::connect(&cluster.client_config_as(cluster.user_token("alice", false).await))
            .await
            .unwrap();
    let session = client.create_session(ping_spec()).await.unwrap();
    let inputs: Vec<Bytes> = (0..10_000)
        .map(|i| Bytes::from(format!("after-{i}")))
        .collect();
    let done = run_tasks(&session, inputs).await;
    assert_eq!(done.len(), 10_000);
    for (_, result) in &done {
        assert!(
            matches!(result.outcome, TaskOutcome::Succeeded(_)),
            "task {}: {:?}",
            result.task,
            result.outcome
        );
    }
    let (rss_after, peak) = flame_tests::procfs::rss_kib(head).expect("the head is gone");
    eprintln!("head RSS: {rss_before} KiB before, {rss_after} KiB after, peak {peak} KiB");
    assert!(
        rss_after < rss_before + RSS_GROWTH_MAX_KIB,
        "the head grew from {rss_before} KiB to {rss_after} KiB"
    );
    client.close().await;
}
