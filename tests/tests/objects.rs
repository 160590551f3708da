//! Objects through real processes: put, get, list and remove by the CLI and the library;
//! another user refused by id; large task inputs and outputs moving as objects without the
//! head holding their bytes; a small memory budget spilling to disk with every result
//! right; a corrupt spilled chunk caught by its hash; a full cache disk reported.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_client::{Client, ClientError};
use flame_protocol::model::TaskOutcome;
use flame_protocol::object::{ObjectId, ObjectRef};
use flame_protocol::ping::check_reply;
use flame_tests::results::{ping_spec, run_tasks};
use flame_tests::{Cluster, ClusterOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;
/// Bound on the node's report of a dropped copy reaching `flame object list`.
const REPORT_TIMEOUT: Duration = Duration::from_secs(20);

/// `n` bytes that differ from any other call's (`seed`) and within themselves.
fn blob(n: usize, seed: u64) -> Bytes {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// Every regular file below `dir`.
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(p),
                Ok(t) if t.is_file() => out.push(p),
                _ => {}
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn put_get_list_remove_and_another_user_is_refused_by_id() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.bin");
    let data = blob(3 * MIB + 17, 1);
    std::fs::write(&file, &data).unwrap();

    // The CLI: put prints the id, which is the content's BLAKE3 hash.
    let put = cluster
        .flame(&["object", "put", file.to_str().unwrap()])
        .await;
    put.assert_success();
    let id: ObjectId = put.stdout.trim().parse().unwrap();
    assert_eq!(id, ObjectId::of(&data));
    let back = dir.path().join("back.bin");
    cluster
        .flame(&[
            "object",
            "get",
            &id.to_string(),
            "-O",
            back.to_str().unwrap(),
        ])
        .await
        .assert_success();
    assert!(
        std::fs::read(&back).unwrap() == data[..],
        "got other bytes back"
    );
    let list = cluster.flame(&["object", "list", "-o", "json"]).await;
    list.assert_success();
    let json: serde_json::Value = serde_json::from_str(&list.stdout).unwrap();
    let entry = json
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["object"]["id"] == id.to_string())
        .unwrap_or_else(|| panic!("{id} is not listed: {list}"));
    assert_eq!(entry["object"]["size"], data.len() as u64, "{list}");
    assert_eq!(entry["nodes"][0], "node-0", "{list}");
    assert_eq!(entry["scope"], "Kept", "{list}");

    // Another user knows the id and still cannot read it, by the CLI or the library,
    // and does not see it listed.
    let mallory =
        Client::connect(&cluster.client_config_as(cluster.user_token("mallory", false).await))
            .await
            .unwrap();
    let refused = mallory.get_object(None, id).await.unwrap_err();
    let text = refused.to_string();
    assert!(
        text.contains(&id.to_string()) || text.contains(&id.short()),
        "the refusal names the object: {text}"
    );
    assert!(
        mallory.list_objects(None, None).await.unwrap().is_empty(),
        "mallory sees another user's objects"
    );
    // Asking for the owner by name is for admins only.
    let err = mallory.get_object(Some("admin"), id).await.unwrap_err();
    assert!(
        matches!(
            err.kind(),
            Some(flame_protocol::model::ErrorKind::PermissionDenied)
        ),
        "{err}"
    );
    // The same bytes put by mallory are mallory's own object, readable by mallory.
    let own: ObjectRef = mallory
        .put_object(None, None, data.clone(), 1)
        .await
        .unwrap();
    assert_eq!(own.id, id);
    assert_eq!(mallory.get_object(None, id).await.unwrap(), data);
    mallory.close().await;

    // Removed: gone for its owner, with an error that names it.
    cluster
        .flame(&["object", "remove", &id.to_string()])
        .await
        .assert_success();
    let gone = cluster.flame(&["object", "get", &id.to_string()]).await;
    assert!(!gone.status.success(), "{gone}");
    assert!(gone.stderr.contains(&id.to_string()), "{gone}");

    // Bad input: not an id, a missing file.
    let bad = cluster.flame(&["object", "get", "xyz"]).await;
    assert!(!bad.status.success(), "{bad}");
    assert!(bad.stderr.contains("64 hex digits"), "{bad}");
    let missing = cluster.flame(&["object", "put", "/nonexistent/file"]).await;
    assert!(!missing.status.success(), "{missing}");
    assert!(missing.stderr.contains("/nonexistent/file"), "{missing}");
}

/// Tasks of 1 MiB in and out through the automatic object path: every output is the ping
/// reply to its input, the session says its inputs were objects, and neither the head's
/// store nor its memory took the bytes.
#[tokio::test(flavor = "multi_thread")]
async fn large_inputs_and_outputs_move_as_objects_not_through_the_head() {
    const TASKS: usize = 40;
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let client = cluster.client().await;
    let session = client.create_session(ping_spec()).await.unwrap();
    let inputs: Vec<Bytes> = (0..TASKS).map(|i| blob(MIB, 100 + i as u64)).collect();
    let done = run_tasks(&session, inputs).await;
    assert_eq!(done.len(), TASKS);
    for (input, result) in &done {
        match &result.outcome {
            TaskOutcome::Succeeded(output) => {
                check_reply(input, output).unwrap_or_else(|e| panic!("task {}: {e}", result.task));
            }
            other => panic!("task {} did not succeed: {other:?}", result.task),
        }
    }
    let info = session.info().await.unwrap();
    assert_eq!(info.data.object_tasks, TASKS as u64, "{info:#?}");
    assert_eq!(
        info.data.local_tasks, TASKS as u64,
        "one node holds them all: {info:#?}"
    );
    // Inputs and outputs are the session's objects, on the node.
    let objects = client.list_objects(None, Some(session.id())).await.unwrap();
    assert_eq!(objects.len(), 2 * TASKS, "{objects:#?}");
    assert!(
        objects.iter().all(|o| o.nodes == ["node-0"]),
        "{objects:#?}"
    );
    // 80 MiB moved; the head's store holds references only.
    let store_bytes: u64 = files_below(&cluster.data_dir())
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    assert!(
        store_bytes < 16 * MIB as u64,
        "the head's data folder holds {store_bytes} bytes after 80 MiB of objects moved"
    );
    session.close().await.unwrap();
    client.close().await;
}

/// A node whose memory budget holds one input spills the rest to its disk folder; every
/// result is still right.
#[tokio::test(flavor = "multi_thread")]
async fn a_small_memory_budget_spills_and_every_result_is_right() {
    const TASKS: usize = 24;
    let cluster = Cluster::start(
        ClusterOptions::default()
            .node_args(["--object-memory", "2MiB"])
            .head_args(["--object-retention", "1s"]),
    )
    .await;
    let client = cluster.client().await;
    let session = client.create_session(ping_spec()).await.unwrap();
    let inputs: Vec<Bytes> = (0..TASKS).map(|i| blob(MIB, 500 + i as u64)).collect();
    let done = run_tasks(&session, inputs).await;
    for (input, result) in &done {
        match &result.outcome {
            TaskOutcome::Succeeded(output) => {
                check_reply(input, output).unwrap_or_else(|e| panic!("task {}: {e}", result.task));
            }
            other => panic!("task {} did not succeed: {other:?}", result.task),
        }
    }
    // Inputs and outputs: 2 × TASKS objects of about 1 MiB, most of them spilled. The
    // node reports its cache's use with its heartbeat.
    let deadline = Instant::now() + REPORT_TIMEOUT;
    loop {
        let cache = cluster.node_list().await.remove(0).cache;
        let cache = cache.expect("the node reports its cache");
        assert!(cache.memory_used <= 2 * MIB as u64, "{cache:?}");
        if cache.objects == 2 * TASKS as u64 {
            assert!(
                cache.disk_used >= ((2 * TASKS - 2) * MIB) as u64,
                "{cache:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{cache:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !files_below(&cluster.node_object_dir(0)).is_empty(),
        "nothing spilled into the object folder"
    );
    // The session's end frees both tiers, once its objects' retention (1 s here) is over.
    session.close().await.unwrap();
    let deadline = Instant::now() + REPORT_TIMEOUT;
    loop {
        let cache = cluster.node_list().await.remove(0).cache.unwrap();
        if cache.disk_used == 0 && cache.memory_used == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the session ended, its objects stay: {cache:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client.close().await;
}

/// A byte flipped in a spilled object's file: the read fails naming the object and the
/// chunk, and the node drops that copy and says so.
#[tokio::test(flavor = "multi_thread")]
async fn a_corrupt_spilled_chunk_is_caught_by_its_hash() {
    let cluster =
        Cluster::start(ClusterOptions::default().node_args(["--object-memory", "1MiB"])).await;
    let client = cluster.client().await;
    let data = blob(9 * MIB, 7);
    let object = client
        .put_object(None, None, data.clone(), 1)
        .await
        .unwrap();
    let files = files_below(&cluster.node_object_dir(0));
    let file = files
        .iter()
        .find(|p| std::fs::metadata(p).ok().map(|m| m.len()) == Some(data.len() as u64))
        .unwrap_or_else(|| panic!("no spilled file of {} bytes in {files:?}", data.len()));
    // Flip one byte in the second chunk.
    let mut bytes = std::fs::read(file).unwrap();
    bytes[5 * MIB] ^= 0xff;
    std::fs::write(file, &bytes).unwrap();

    let err: ClientError = client.get_object(None, object.id).await.unwrap_err();
    let text = format!("{err:#}");
    assert!(text.contains("chunk 1"), "{text}");
    assert!(
        text.contains(&object.id.short()) || text.contains(&object.id.to_string()),
        "{text}"
    );
    let deadline = Instant::now() + REPORT_TIMEOUT;
    loop {
        let objects = client.list_objects(None, None).await.unwrap();
        let o = objects.iter().find(|o| o.object.id == object.id).unwrap();
        if o.nodes.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the corrupt copy is still listed: {o:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client.close().await;
}

/// The spill folder on a 4 MiB filesystem, a 1 MiB memory budget, a 16 MiB put: the put
/// fails with the system's error and the path, not silently, and the node stays up.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_cache_disk_is_reported() {
    if !flame_tests::prerequisites::root("a_full_cache_disk_is_reported") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spill = dir.path().join("spill");
    std::fs::create_dir(&spill).unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&spill)
        .status()
        .unwrap();
    assert!(status.success(), "mount failed: {status}");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(spill.clone());
    let cluster = Cluster::start(ClusterOptions::default().node_args([
        "--object-memory",
        "1MiB",
        "--object-dir",
        spill.to_str().unwrap(),
    ]))
    .await;
    let file = dir.path().join("big.bin");
    std::fs::write(&file, blob(16 * MIB, 9)).unwrap();
    let put = cluster
        .flame(&["object", "put", file.to_str().unwrap()])
        .await;
    assert!(!put.status.success(), "{put}");
    assert!(
        put.stderr.contains("No space left on device") || put.stderr.contains("cache full"),
        "{put}"
    );
    // The node is still there and still takes objects that fit.
    let small = dir.path().join("small.bin");
    std::fs::write(&small, blob(512 * 1024, 10)).unwrap();
    cluster
        .flame(&["object", "put", small.to_str().unwrap()])
        .await
        .assert_success();
}
