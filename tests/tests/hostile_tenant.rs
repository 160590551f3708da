//! One authenticated user, mallory, tries to exhaust the head: sessions until refused,
//! batches far past her bytes quota on several submit streams at once, tasks until refused,
//! watchers that stop reading while her results flow, streams and connections until
//! refused. Every refusal must name the quota, its limit and what she holds; the head's
//! memory must stay under a stated bound; and alice's 10,000-task session, running all the
//! while, must complete. A slow consumer of mallory's own results still gets every result
//! exactly once (the client library watches again after the head drops a lagging watch).

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_client::{Client, ClientError};
use flame_protocol::auth::Secret;
use flame_protocol::endpoint::{self, Trust};
use flame_protocol::frame::{FrameReader, FrameWriter};
use flame_protocol::messages::{
    ClientRequest, ClientResponse, Hello, HelloReply, Role, SubmitBatch, SubmitReply, WatchEvent,
};
use flame_protocol::model::{ApplicationSpec, ErrorKind, SessionSpec, TaskOutcome};
use flame_protocol::{SessionId, PROTOCOL_VERSION};
use flame_tests::cluster::{dial, say_hello, Cluster, ClusterOptions};
use flame_tests::results::{collect_results, ping_spec, run_tasks, RESULT_STALL_TIMEOUT};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Mallory's quotas (head.toml `[quotas.owners.mallory]`), small so that the test floods
/// far past them in seconds. Everyone else keeps the defaults.
const OPEN_SESSIONS: u64 = 8;
const PENDING_TASKS: u64 = 20_000;
const INPUT_BYTES: u64 = 32 * 1024 * 1024;
const CONNECTIONS: u64 = 6;
const STREAMS_PER_CONNECTION: u64 = 24;
const SUBMIT_BYTES_IN_FLIGHT: u64 = 32 * 1024 * 1024;

/// The bound on the head's RSS growth while mallory floods, in KiB. What her quotas let
/// the head hold: 32 MiB of task inputs, 32 MiB of submit batches read and not yet
/// answered, and QUIC receive windows of 16 MiB on each of her (at most 6) connections,
/// 96 MiB; 20,000 tasks' bookkeeping is a few MiB, and her watchers' queues (1 MiB each)
/// are dropped when they lag. Beside that the head legitimately holds redb's cache of what
/// was written (her inputs, her running session's 25 MiB of inputs and outputs, alice's
/// session) and QUIC send buffers towards watchers that do not read (about 10 MiB per
/// connection), and the allocator keeps some of what was freed: measured peaks are 250 to
/// 340 MiB. She attempts far more: 640 MiB of batches alone, beside the other floods,
/// which a head without quotas would take in.
const RSS_GROWTH_MAX_KIB: u64 = 384 * 1024;

/// Batches of 4 MiB mallory sends on each of her submit streams, regardless of replies.
const FLOOD_BATCHES_PER_STREAM: usize = 40;
const FLOOD_STREAMS: usize = 4;
const FLOOD_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Tasks of mallory's running session, each echoing 64 KiB: 25 MiB of results, more than a
/// stream's 16 MiB flow-control window, so a watcher that stops reading falls behind.
const RUNNING_TASKS: usize = 400;
const RUNNING_INPUT_BYTES: usize = 64 * 1024;
/// Raw watchers of that session that never read past their first answer.
const DEAF_WATCHERS: usize = 6;

fn head_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("head.toml");
    std::fs::write(
        &path,
        format!(
            "[quotas.owners.mallory]\n\
             open_sessions = {OPEN_SESSIONS}\n\
             pending_tasks = {PENDING_TASKS}\n\
             input_bytes = {INPUT_BYTES}\n\
             connections = {CONNECTIONS}\n\
             streams_per_connection = {STREAMS_PER_CONNECTION}\n\
             submit_bytes_in_flight = {SUBMIT_BYTES_IN_FLIGHT}\n"
        ),
    )
    .unwrap();
    path
}

/// A refusal must be typed and name the quota, its limit, what mallory holds, and the key
/// an admin raises.
fn check_refusal(message: &str, what: &str, limit: u64, key: &str) {
    assert!(
        message.starts_with(&format!("quota exceeded: {what} "))
            && message.contains(&format!(" of {limit} for owner mallory"))
            && message.contains(&format!("quotas.{key}")),
        "a refusal that does not name quota {key} (limit {limit}): {message}"
    );
}

/// A raw authenticated connection as mallory, or the head's refusal of its hello.
async fn connect_raw(
    addr: SocketAddr,
    ca: &std::path::Path,
    token: &Secret,
) -> Result<quinn::Connection, String> {
    let endpoint = endpoint::client(&Trust::CaFile(ca.to_path_buf()), None).unwrap();
    let conn = dial(&endpoint, addr).await?;
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        role: Role::Client,
        agent: "hostile-tenant".into(),
        token: Some(token.clone()),
    };
    match say_hello(&conn, &hello).await.0 {
        HelloReply::Welcome { .. } => Ok(conn),
        HelloReply::Refused { reason } => Err(reason),
    }
}

type Stream = (
    FrameWriter<quinn::SendStream>,
    FrameReader<quinn::RecvStream>,
);

/// Opens a stream with `request` and reads the head's first answer.
async fn request(conn: &quinn::Connection, request: &ClientRequest) -> (Stream, ClientResponse) {
    let (send, recv) = conn.open_bi().await.expect("cannot open a stream");
    let mut writer = FrameWriter::new(send, flame_protocol::limits::FRAME_BYTES_MAX);
    let mut reader = FrameReader::new(recv, flame_protocol::limits::FRAME_BYTES_MAX);
    writer.write(request).await.expect("cannot send a request");
    let answer = tokio::time::timeout(
        Duration::from_secs(30),
        reader.read_required::<ClientResponse>(),
    )
    .await
    .expect("no answer to a request in 30 s")
    .expect("cannot read the answer");
    ((writer, reader), answer)
}

/// Floods one submit stream with 4 MiB batches without waiting, then reads every reply:
/// (accepted bytes, refusal messages).
async fn flood_batches(
    conn: quinn::Connection,
    session: SessionId,
    base: u64,
) -> (u64, Vec<String>) {
    let ((mut writer, mut reader), answer) =
        request(&conn, &ClientRequest::OpenSubmitStream { session }).await;
    assert!(matches!(answer, ClientResponse::Ok), "{answer:?}");
    let payload = Bytes::from(vec![b'm'; FLOOD_BATCH_BYTES]);
    let sending = tokio::spawn(async move {
        for i in 0..FLOOD_BATCHES_PER_STREAM {
            let batch = SubmitBatch {
                batch_id: base + i as u64,
                inputs: vec![payload.clone().into()],
            };
            writer
                .write(&batch)
                .await
                .expect("the head stopped taking batches");
        }
        writer
    });
    let (mut accepted, mut refusals) = (0u64, Vec::new());
    for _ in 0..FLOOD_BATCHES_PER_STREAM {
        let reply = tokio::time::timeout(
            Duration::from_secs(120),
            reader.read_required::<SubmitReply>(),
        )
        .await
        .expect("no submit reply in 120 s")
        .expect("cannot read a submit reply");
        match reply {
            SubmitReply::Accepted { count, .. } => {
                accepted += u64::from(count) * FLOOD_BATCH_BYTES as u64
            }
            SubmitReply::Rejected { error, .. } => {
                assert_eq!(error.kind, ErrorKind::QuotaExceeded, "{error}");
                refusals.push(error.message);
            }
        }
    }
    drop(sending.await.unwrap());
    (accepted, refusals)
}

/// Samples the head's RSS every 100 ms until stopped; the highest seen, in KiB.
fn watch_rss(pid: i32, stop: Arc<AtomicU64>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut max = 0;
        while stop.load(Ordering::Relaxed) == 0 {
            if let Some((rss, _)) = flame_tests::procfs::rss_kib(pid) {
                max = max.max(rss);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        max
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn one_tenant_cannot_exhaust_the_head_and_another_completes_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let config = head_config(dir.path());
    let cluster = Cluster::start(
        ClusterOptions::default().head_args(["--config".to_string(), config.display().to_string()]),
    )
    .await;
    let head = cluster.head_pid();
    let addr: SocketAddr = cluster.head_addr().parse().unwrap();
    let ca = cluster.ca_file().to_path_buf();
    // An application whose tasks wait for a node that never comes: what mallory submits to
    // it stays in the head.
    let admin = Client::connect(&cluster.client_config()).await.unwrap();
    let mut stuck = ApplicationSpec::new("stuck", "flame-ping");
    stuck.selector.insert("zone".into(), "nowhere".into());
    admin.register_application(stuck).await.unwrap();
    let mallory_token = cluster.user_token("mallory", false).await;
    let alice =
        Client::connect(&cluster.client_config_as(cluster.user_token("alice", false).await))
            .await
            .unwrap();
    let (rss_before, _) =
        flame_tests::procfs::rss_kib(head).expect("cannot read the head's memory");
    let stop = Arc::new(AtomicU64::new(0));
    let rss = watch_rss(head, stop.clone());

    // Alice's session runs through everything that follows.
    let alice_session = alice.create_session(ping_spec()).await.unwrap();
    let alice_run = tokio::spawn(async move {
        let inputs: Vec<Bytes> = (0..10_000)
            .map(|i| Bytes::from(format!("alice-{i}")))
            .collect();
        run_tasks(&alice_session, inputs).await
    });

    let mallory = Client::connect(&cluster.client_config_as(mallory_token.clone()))
        .await
        .unwrap();
    // Sessions: her quota's worth, then a refusal. Durable and ephemeral ones count alike.
    let stuck_spec = |ephemeral| SessionSpec {
        ephemeral,
        ..SessionSpec::new("stuck")
    };
    let running = mallory.create_session(ping_spec()).await.unwrap();
    let flooded = mallory.create_session(stuck_spec(false)).await.unwrap();
    let ephemeral = mallory.create_session(stuck_spec(true)).await.unwrap();
    for i in 3..OPEN_SESSIONS {
        mallory
            .create_session(stuck_spec(i % 2 == 0))
            .await
            .unwrap();
    }
    match mallory.create_session(stuck_spec(true)).await {
        Err(e @ ClientError::Api(_)) => {
            assert_eq!(e.kind(), Some(ErrorKind::QuotaExceeded), "{e}");
            check_refusal(
                &e.to_string(),
                "open sessions",
                OPEN_SESSIONS,
                "open_sessions",
            );
        }
        other => panic!(
            "session {} of mallory was not refused: {other:?}",
            OPEN_SESSIONS + 1
        ),
    }
    // The CLI says the same, with a hint, and fails.
    let token_file = dir.path().join("mallory.token");
    flame_tests::cluster::write_private(&token_file, mallory_token.expose().as_bytes());
    let mut command = flame_tests::cluster::flame_command();
    command
        .arg("--head")
        .arg(cluster.head_addr())
        .arg("--ca-file")
        .arg(&ca)
        .arg("--token-file")
        .arg(&token_file)
        .args(["ping", "-t", "1"]);
    let out =
        flame_tests::command::run_command(command, flame_tests::command::COMMAND_TIMEOUT).await;
    out.assert_failure();
    assert!(
        out.stderr
            .contains("quota exceeded: open sessions 8 of 8 for owner mallory")
            && out.stderr.starts_with("error: ")
            && out.stderr.contains("hint: "),
        "{out}"
    );

    // Results that flow while watchers stop reading: raw watchers that never read, and a
    // slow consumer through the client library.
    let watch_conn = connect_raw(addr, &ca, &mallory_token).await.unwrap();
    let mut deaf = Vec::new();
    for _ in 0..DEAF_WATCHERS {
        let (stream, answer) = request(
            &watch_conn,
            &ClientRequest::WatchResults {
                session: running.id(),
            },
        )
        .await;
        assert!(matches!(answer, ClientResponse::Ok), "{answer:?}");
        deaf.push(stream);
    }
    let mut slow = running.watch().await.unwrap();
    let inputs: Vec<Bytes> = (0..RUNNING_TASKS)
        .map(|i| {
            let mut input = format!("running-{i:05}-").into_bytes();
            input.resize(RUNNING_INPUT_BYTES, b'r');
            Bytes::from(input)
        })
        .collect();
    let mut submitter = running.submitter().await.unwrap();
    for chunk in inputs.chunks(50) {
        submitter.send(chunk.to_vec()).await.unwrap();
    }
    submitter.finish().await.unwrap();
    running.close().await.unwrap();
    let slow_reader = tokio::spawn(async move {
        let mut got = Vec::new();
        loop {
            match tokio::time::timeout(RESULT_STALL_TIMEOUT, slow.next()).await {
                Err(_) => panic!("the slow consumer got nothing for {RESULT_STALL_TIMEOUT:?}"),
                Ok(None) => break,
                Ok(Some(Err(e))) => panic!("the slow consumer's watch failed: {e}"),
                Ok(Some(Ok(results))) => {
                    got.extend(results);
                    // Slower than the head produces: its watch falls behind.
                    tokio::time::sleep(Duration::from_millis(150)).await;
                }
            }
        }
        assert!(slow.is_finished());
        got
    });

    // Batches: several submit streams on several connections, far past her bytes quota.
    let mut floods = Vec::new();
    for s in 0..FLOOD_STREAMS {
        let conn = connect_raw(addr, &ca, &mallory_token).await.unwrap();
        floods.push(tokio::spawn(flood_batches(
            conn,
            flooded.id(),
            1_000_000 * (s as u64 + 1),
        )));
    }
    let mut accepted_bytes = 0;
    let mut refusals = Vec::new();
    for flood in floods {
        let (bytes, refused) = flood.await.unwrap();
        accepted_bytes += bytes;
        refusals.extend(refused);
    }
    assert!(
        accepted_bytes <= INPUT_BYTES,
        "{accepted_bytes} bytes accepted, over the quota"
    );
    assert!(!refusals.is_empty(), "no batch was refused");
    for r in &refusals {
        check_refusal(
            r,
            "bytes held in the head's memory",
            INPUT_BYTES,
            "input_bytes",
        );
    }
    eprintln!(
        "batches: {} MiB accepted, {} refused",
        accepted_bytes >> 20,
        refusals.len()
    );

    // Tasks: empty inputs, so only the task count binds, until refused.
    let mut submitter = ephemeral.submitter().await.unwrap();
    let mut task_refusal = None;
    for _ in 0..(PENDING_TASKS / 5_000 + 2) {
        if let Err(e) = submitter.send(vec![Bytes::new(); 5_000]).await {
            task_refusal = Some(e);
            break;
        }
    }
    if task_refusal.is_none() {
        task_refusal = submitter.finish().await.err();
    }
    match task_refusal {
        Some(ClientError::BatchRejected { error, .. }) => {
            assert_eq!(error.kind, ErrorKind::QuotaExceeded, "{error}");
            check_refusal(
                &error.message,
                "pending tasks",
                PENDING_TASKS,
                "pending_tasks",
            );
        }
        other => panic!("mallory's tasks past {PENDING_TASKS} were not refused: {other:?}"),
    }

    // Streams: one connection, more streams than its quota, each held open.
    let stream_conn = connect_raw(addr, &ca, &mallory_token).await.unwrap();
    let mut held = Vec::new();
    let mut stream_refusals = Vec::new();
    for _ in 0..(STREAMS_PER_CONNECTION + 4) {
        let (stream, answer) = request(
            &stream_conn,
            &ClientRequest::OpenSubmitStream {
                session: flooded.id(),
            },
        )
        .await;
        match answer {
            ClientResponse::Ok => held.push(stream),
            ClientResponse::Error(e) => {
                assert_eq!(e.kind, ErrorKind::QuotaExceeded, "{e}");
                stream_refusals.push(e.message);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(
        !stream_refusals.is_empty(),
        "{} streams held on one connection",
        held.len()
    );
    assert!(held.len() as u64 <= STREAMS_PER_CONNECTION);
    for r in &stream_refusals {
        check_refusal(
            r,
            "streams on this connection",
            STREAMS_PER_CONNECTION,
            "streams_per_connection",
        );
    }

    // Connections: more than her quota, each held.
    let mut conns = Vec::new();
    let mut conn_refusal = None;
    for _ in 0..CONNECTIONS + 2 {
        match connect_raw(addr, &ca, &mallory_token).await {
            Ok(conn) => conns.push(conn),
            Err(reason) => {
                conn_refusal = Some(reason);
                break;
            }
        }
    }
    let reason = conn_refusal.expect("mallory's connections past her quota were not refused");
    check_refusal(&reason, "connections", CONNECTIONS, "connections");
    // The library shows the same refusal, typed, to a new client.
    match Client::connect(&cluster.client_config_as(mallory_token.clone())).await {
        Err(e) => assert!(e.to_string().contains("quota exceeded: connections"), "{e}"),
        Ok(_) => panic!("a client past mallory's connections quota was let in"),
    }

    // The slow consumer got every result of her running session exactly once.
    let got = slow_reader.await.unwrap();
    let ids: BTreeSet<u64> = got.iter().map(|r| r.task.0).collect();
    assert_eq!(got.len(), RUNNING_TASKS, "results twice or missing");
    assert_eq!(ids.len(), RUNNING_TASKS);
    for r in &got {
        let TaskOutcome::Succeeded(out) = &r.outcome else {
            panic!("task {} failed: {:?}", r.task, r.outcome)
        };
        let echoed = format!("running-{:05}-", r.task.0 - 1);
        assert!(
            out.starts_with(echoed.as_bytes()),
            "task {} got another's output",
            r.task
        );
    }
    // Each watcher that stopped reading ends either with every result and `Finished` (it
    // fell behind no further than QUIC's windows hold) or, once the head dropped it, with
    // `Lagged` and the reason; with 25 MiB of results against windows of 16 MiB per stream
    // and 64 MiB per connection, some must have lagged.
    // They share a connection, whose flow-control window unread streams fill: read them all
    // at once, as a client must.
    let mut readers = tokio::task::JoinSet::new();
    for (_, mut reader) in deaf.drain(..) {
        readers.spawn(async move {
            let mut end = None;
            let mut results = 0;
            loop {
                let event =
                    tokio::time::timeout(Duration::from_secs(30), reader.read::<WatchEvent>())
                        .await;
                match event {
                    Ok(Ok(Some(WatchEvent::Results(r)))) => results += r.len(),
                    Ok(Ok(Some(WatchEvent::Finished))) => end = Some("finished".to_string()),
                    Ok(Ok(Some(WatchEvent::Lagged { reason }))) => end = Some(reason),
                    Ok(Ok(None)) => break,
                    other => {
                        panic!("a deaf watcher's stream broke after {results} results: {other:?}")
                    }
                }
            }
            end
        });
    }
    let mut lagged = 0;
    while let Some(end) = readers.join_next().await {
        match end.unwrap() {
            Some(reason) if reason == "finished" => {}
            Some(reason) => {
                assert!(reason.contains("behind"), "{reason}");
                lagged += 1;
            }
            None => panic!("a watch stream ended without Finished or Lagged"),
        }
    }
    assert!(
        lagged > 0,
        "no watcher that stopped reading was dropped for lagging"
    );
    eprintln!("{lagged} of {DEAF_WATCHERS} deaf watchers lagged");

    // Alice's session completed meanwhile.
    let done = alice_run.await.unwrap();
    assert_eq!(done.len(), 10_000);
    for (_, result) in &done {
        assert!(
            matches!(result.outcome, TaskOutcome::Succeeded(_)),
            "{result:?}"
        );
    }
    stop.store(1, Ordering::Relaxed);
    let rss_max = rss.await.unwrap();
    eprintln!("head RSS: {rss_before} KiB before, at most {rss_max} KiB during the flood");
    assert!(
        rss_max < rss_before + RSS_GROWTH_MAX_KIB,
        "the head grew from {rss_before} KiB to {rss_max} KiB, more than {RSS_GROWTH_MAX_KIB} KiB\n{}",
        cluster.logs()
    );
    drop((held, conns, watch_conn, stream_conn));
    // Mallory's completed results are still readable from the store.
    let again = mallory.session(running.id()).await.unwrap();
    let again = collect_results(&mut again.watch().await.unwrap(), RESULT_STALL_TIMEOUT).await;
    assert_eq!(again.len(), RUNNING_TASKS);
    // Finished sessions left the head's memory; their owners still see them, and only they.
    let info = mallory.get_session(running.id()).await.unwrap();
    assert!(info.is_finished(), "{info:?}");
    assert_eq!(info.counts.succeeded, RUNNING_TASKS as u64);
    let listed = mallory.list_sessions().await.unwrap();
    assert!(listed.iter().any(|s| s.id == running.id()), "{listed:?}");
    assert!(listed.iter().all(|s| s.owner == "mallory"), "{listed:?}");
    match alice.get_session(running.id()).await {
        Err(e) => assert_eq!(e.kind(), Some(ErrorKind::PermissionDenied), "{e}"),
        Ok(info) => panic!("alice sees mallory's finished session: {info:?}"),
    }
    let alice_list = alice.list_sessions().await.unwrap();
    assert!(
        alice_list.iter().all(|s| s.owner == "alice"),
        "{alice_list:?}"
    );
    alice.close().await;
    admin.close().await;
}
