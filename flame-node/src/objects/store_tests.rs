use super::*;
use flame_protocol::object::chunk_hashes;
use std::os::unix::fs::PermissionsExt;

const S1: ObjectScope = ObjectScope::Session(SessionId(1));

struct Fixture {
    store: ObjectStore,
    events: mpsc::Receiver<ObjectEvent>,
    dir: tempfile::TempDir,
}

fn fixture(memory_bytes: u64, disk_bytes: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let (tx, events) = mpsc::channel(64);
    let store = ObjectStore::open(
        CacheConfig {
            memory_bytes,
            disk_bytes,
            spill_dir: dir.path().join("spill"),
        },
        tx,
    )
    .unwrap();
    Fixture { store, events, dir }
}

fn bytes(n: usize, seed: u8) -> Bytes {
    (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
}

fn drain(events: &mut mpsc::Receiver<ObjectEvent>) -> Vec<ObjectEvent> {
    let mut out = Vec::new();
    while let Ok(e) = events.try_recv() {
        out.push(e);
    }
    out
}

/// Every spill file (not folders) under the spill folder.
fn spill_files(f: &Fixture) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in std::fs::read_dir(f.dir.path().join("spill")).unwrap() {
        for file in std::fs::read_dir(dir.unwrap().path()).unwrap() {
            out.push(file.unwrap().path());
        }
    }
    out
}

#[tokio::test]
async fn objects_spill_to_disk_under_a_small_memory_budget_and_read_back() {
    let mut f = fixture(100, 1000);
    let (a, b) = (bytes(60, 1), bytes(60, 2));
    let (ra, rb) = (ObjectRef::of(&a), ObjectRef::of(&b));
    f.store.insert("alice", ra, S1, a.clone()).await.unwrap();
    f.store.insert("alice", rb, S1, b.clone()).await.unwrap();
    let usage = f.store.usage();
    assert_eq!(
        (usage.memory_used, usage.disk_used, usage.objects),
        (60, 60, 2)
    );
    let reader = f.store.open_read("alice", &ra.id).unwrap();
    assert!(reader.on_disk());
    assert_eq!(reader.read_all().await.unwrap(), a);
    assert_eq!(reader.read_range(10, 5).await.unwrap(), a.slice(10..15));
    assert!(matches!(
        reader.read_range(50, 20).await,
        Err(CacheError::Range { .. })
    ));
    let rb_reader = f.store.open_read("alice", &rb.id).unwrap();
    assert!(!rb_reader.on_disk());
    assert_eq!(rb_reader.read_all().await.unwrap(), b);
    // The folder is the node's alone, and so is the file.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&f.dir.path().join("spill")), 0o700);
    let files = spill_files(&f);
    assert_eq!(files.len(), 1);
    assert_eq!(mode(&files[0]), 0o600);
    assert_eq!(mode(files[0].parent().unwrap()), 0o700);
    assert!(drain(&mut f.events).is_empty());
}

#[tokio::test]
async fn spares_drop_under_a_small_disk_budget_and_pinned_objects_fill_it() {
    let mut f = fixture(10, 100);
    let (a, b, c) = (bytes(60, 1), bytes(40, 2), bytes(30, 3));
    let (ra, rb, rc) = (ObjectRef::of(&a), ObjectRef::of(&b), ObjectRef::of(&c));
    f.store.insert("alice", ra, S1, a).await.unwrap();
    f.store.insert_spare("alice", rb, S1, b).await.unwrap();
    f.store.insert("alice", rc, S1, c.clone()).await.unwrap();
    assert!(!f.store.contains("alice", &rb.id));
    let events = drain(&mut f.events);
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(matches!(&events[0], ObjectEvent::Dropped { id, reason, .. }
        if *id == rb.id && reason.starts_with("evicted")));
    assert_eq!(spill_files(&f).len(), 2);
    // Only pinned objects left: the next one is refused, and reported.
    let d = bytes(20, 4);
    let err = f
        .store
        .insert("alice", ObjectRef::of(&d), S1, d)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("cache full") && text.contains("of 100 bytes"),
        "{text}"
    );
    assert!(matches!(
        &drain(&mut f.events)[..],
        [ObjectEvent::Full { .. }]
    ));
    assert_eq!(f.store.usage().disk_used, 90);
    let reader = f.store.open_read("alice", &rc.id).unwrap();
    assert_eq!(reader.read_all().await.unwrap(), c);
}

#[tokio::test]
async fn a_corrupt_spilled_chunk_is_found_and_the_copy_dropped() {
    let mut f = fixture(10, u64::MAX);
    let size = OBJECT_CHUNK_BYTES as usize + 1000;
    let data = bytes(size, 9);
    let r = ObjectRef::of(&data);
    f.store.insert("alice", r, S1, data.clone()).await.unwrap();
    let files = spill_files(&f);
    assert_eq!(files.len(), 1);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&files[0])
        .unwrap();
    file.write_all_at(b"!", OBJECT_CHUNK_BYTES + 10).unwrap();
    let reader = f.store.open_read("alice", &r.id).unwrap();
    // Chunk 0 is intact.
    assert_eq!(reader.read_range(0, 100).await.unwrap(), data.slice(0..100));
    match reader.read_all().await {
        Err(CacheError::Corrupt { chunk: 1, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(!f.store.contains("alice", &r.id));
    let events = drain(&mut f.events);
    assert!(
        matches!(&events[..], [ObjectEvent::Dropped { reason, .. }]
            if reason == "corrupt: chunk 1 failed its hash"),
        "{events:?}"
    );
    drop(reader);
    assert!(spill_files(&f).is_empty());
    assert_eq!(
        f.store.usage(),
        CacheUsage {
            memory_capacity: 10,
            disk_capacity: u64::MAX,
            ..CacheUsage::default()
        }
    );
}

#[tokio::test]
async fn an_owner_cannot_open_another_owners_object() {
    let f = fixture(1000, 1000);
    let data = bytes(10, 1);
    let r = ObjectRef::of(&data);
    f.store.insert("alice", r, S1, data).await.unwrap();
    assert!(f.store.contains("alice", &r.id));
    assert!(!f.store.contains("bob", &r.id));
    assert!(matches!(
        f.store.open_read("bob", &r.id),
        Err(CacheError::NotFound { .. })
    ));
}

#[tokio::test]
async fn ending_a_session_frees_its_objects_and_keeps_the_rest() {
    let mut f = fixture(100, 1000);
    let (a, b, k) = (bytes(60, 1), bytes(60, 2), bytes(30, 3));
    for (data, scope) in [(&a, S1), (&b, S1), (&k, ObjectScope::Kept)] {
        f.store
            .insert("alice", ObjectRef::of(data), scope, data.clone())
            .await
            .unwrap();
    }
    assert_eq!(spill_files(&f).len(), 1);
    // A reader keeps its object until it closes.
    let reader = f.store.open_read("alice", &ObjectRef::of(&b).id).unwrap();
    f.store.end_session("alice", SessionId(1));
    assert_eq!(drain(&mut f.events).len(), 1);
    assert!(!f.store.contains("alice", &ObjectRef::of(&a).id));
    assert_eq!(reader.read_all().await.unwrap(), b);
    drop(reader);
    assert_eq!(drain(&mut f.events).len(), 1);
    let usage = f.store.usage();
    assert_eq!(
        (usage.memory_used, usage.disk_used, usage.objects),
        (30, 0, 1)
    );
    assert!(spill_files(&f).is_empty());
    let inventory = f.store.inventory();
    assert_eq!(inventory.len(), 1);
    assert_eq!(inventory[0].2, ObjectScope::Kept);
    f.store.remove("alice", &[ObjectRef::of(&k).id]);
    assert_eq!(f.store.usage().objects, 0);
}

#[tokio::test]
async fn a_writer_checks_each_chunk_and_the_whole() {
    let f = fixture(u64::MAX, u64::MAX);
    let data = bytes(OBJECT_CHUNK_BYTES as usize * 2 + 7, 5);
    let r = ObjectRef::of(&data);
    let chunks = chunk_hashes(&data);
    let mut w = f.store.writer("alice", r, S1, chunks.clone()).unwrap();
    for piece in data.chunks(100_000) {
        w.write(piece).unwrap();
    }
    w.finish().await.unwrap();
    assert_eq!(
        f.store
            .open_read("alice", &r.id)
            .unwrap()
            .read_all()
            .await
            .unwrap(),
        data
    );
    // A bad second chunk is refused as it arrives; the room goes back.
    let other = bytes(OBJECT_CHUNK_BYTES as usize + 3, 6);
    let ro = ObjectRef::of(&other);
    let mut w = f.store.writer("bob", ro, S1, chunk_hashes(&other)).unwrap();
    let mut bad = other.to_vec();
    bad[OBJECT_CHUNK_BYTES as usize + 1] ^= 1;
    w.write(&bad[..OBJECT_CHUNK_BYTES as usize]).unwrap();
    let err = w.write(&bad[OBJECT_CHUNK_BYTES as usize..]).unwrap_err();
    assert!(err.to_string().contains("chunk 1 does not match"), "{err}");
    drop(w);
    assert!(!f.store.contains("bob", &ro.id));
    assert_eq!(f.store.usage().objects, 1);
    // Chunk hashes that do not merge into the id are refused before a byte is taken:
    // checking each chunk against them would prove nothing about the whole.
    let mut lying = chunk_hashes(&other);
    lying[1] = chunk_hashes(&bad)[1];
    let err = f.store.writer("bob", ro, S1, lying).err().unwrap();
    assert!(err.to_string().contains("not those of the object"), "{err}");
    // Too few hashes are refused up front.
    assert!(matches!(
        f.store.writer("bob", ro, S1, vec![]),
        Err(CacheError::Mismatch { .. })
    ));
    // Storing what is already held checks the bytes and keeps one copy.
    let mut w = f.store.writer("alice", r, S1, chunks).unwrap();
    w.write(&data).unwrap();
    w.finish().await.unwrap();
    assert_eq!(f.store.usage().objects, 1);
}

#[tokio::test]
async fn a_sealed_memfd_is_taken_and_an_unsealed_one_refused() {
    let f = fixture(1000, 1000);
    let data = bytes(100, 7);
    let r = ObjectRef::of(&data);
    let file = new_memfd(&r.id).unwrap();
    file.write_all_at(&data, 0).unwrap();
    let unsealed = file.try_clone().unwrap();
    assert!(matches!(
        f.store
            .insert_fd("alice", r, S1, OwnedFd::from(unsealed))
            .await,
        Err(CacheError::NotSealed(_))
    ));
    seal(&file).unwrap();
    f.store
        .insert_fd("alice", r, S1, OwnedFd::from(file))
        .await
        .unwrap();
    let reader = f.store.open_read("alice", &r.id).unwrap();
    let fd = File::from(reader.fd().unwrap());
    let mut back = vec![0; 100];
    fd.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(back, data);
    // The descriptor handed out is read-only.
    assert!(fd.write_at(b"x", 0).is_err());
    // Wrong bytes for the reference are refused.
    let other = new_memfd(&r.id).unwrap();
    other.write_all_at(&bytes(100, 8), 0).unwrap();
    seal(&other).unwrap();
    assert!(matches!(
        f.store.insert_fd("bob", r, S1, OwnedFd::from(other)).await,
        Err(CacheError::Mismatch { .. })
    ));
}

#[tokio::test]
async fn a_spill_folder_that_is_a_link_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("elsewhere");
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::symlink(&target, dir.path().join("spill")).unwrap();
    let (tx, _rx) = mpsc::channel(1);
    let err = ObjectStore::open(
        CacheConfig {
            memory_bytes: 1,
            disk_bytes: 1,
            spill_dir: dir.path().join("spill"),
        },
        tx,
    )
    .unwrap_err();
    assert!(err.to_string().contains("not a folder"), "{err}");
}
