//! The same-host endpoint driven by hand: frames and descriptors over a Unix socket.

use super::*;
use crate::objects::store::CacheConfig;
use flame_protocol::ids::SessionId;
use flame_protocol::object::{
    chunk_hashes, Grant, GrantAccess, GrantBody, ObjectId, ObjectRef, ObjectScope,
};
use flame_protocol::object_grant::GrantSigner;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use tokio::net::UnixStream;

const NODE: &str = "n1";

struct Harness {
    socket: std::path::PathBuf,
    signer: GrantSigner,
    store: ObjectStore,
    _dir: tempfile::TempDir,
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let (tx, _events) = tokio::sync::mpsc::channel(64);
    let store = ObjectStore::open(
        CacheConfig {
            memory_bytes: 1 << 20,
            disk_bytes: 1 << 20,
            spill_dir: dir.path().join("spill"),
        },
        tx,
    )
    .unwrap();
    let socket = dir.path().join("objects.sock");
    let listener = bind_unix(&socket).unwrap();
    let signer = GrantSigner::generate().unwrap();
    let cell = GrantKeyCell::default();
    cell.set(signer.public_key());
    tokio::spawn(serve_unix(listener, store.clone(), NODE.into(), cell));
    Harness {
        socket,
        signer,
        store,
        _dir: dir,
    }
}

fn far() -> u64 {
    u64::MAX
}

impl Harness {
    fn write_grant(&self, owner: &str) -> Grant {
        self.signer.sign(GrantBody {
            owner: owner.into(),
            access: GrantAccess::Write {
                node: NODE.into(),
                scope: ObjectScope::Session(SessionId(1)),
                bytes_max: 1 << 30,
            },
            expires_unix_ms: far(),
        })
    }

    fn read_grant(&self, owner: &str, id: ObjectId) -> Grant {
        self.signer.sign(GrantBody {
            owner: owner.into(),
            access: GrantAccess::Read { ids: vec![id] },
            expires_unix_ms: far(),
        })
    }

    async fn connect(&self) -> FdStream {
        FdStream::new(UnixStream::connect(&self.socket).await.unwrap())
    }
}

/// A memfd holding `data`, sealed with `seals` when given.
fn memfd(data: &[u8], sealed: bool) -> OwnedFd {
    let fd = nix::sys::memfd::memfd_create(
        "test",
        nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING | nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
    )
    .unwrap();
    let file = File::from(fd);
    file.write_all_at(data, 0).unwrap();
    if sealed {
        use nix::fcntl::{FcntlArg, SealFlag};
        nix::fcntl::fcntl(
            file.as_fd(),
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_WRITE,
            ),
        )
        .unwrap();
    }
    OwnedFd::from(file)
}

fn put_request(grant: Grant, data: &[u8]) -> ObjectRequest {
    ObjectRequest::Put {
        grant,
        object: ObjectRef::of(data),
        chunks: chunk_hashes(data),
    }
}

fn error_text(response: &ObjectResponse) -> String {
    match response {
        ObjectResponse::Error(e) => e.message.clone(),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_sealed_memfd_is_stored_and_read_back_as_a_read_only_descriptor() {
    let h = harness().await;
    let mode = std::fs::metadata(&h.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666);
    let data: Vec<u8> = (0..5000u32).map(|i| (i % 7) as u8).collect();
    let object = ObjectRef::of(&data);
    let mut conn = h.connect().await;
    let fd = memfd(&data, true);
    conn.write_frame(&put_request(h.write_grant("alice"), &data), Some(&fd))
        .await
        .unwrap();
    let response: ObjectResponse = conn.read_frame().await.unwrap().unwrap();
    assert_eq!(response, ObjectResponse::Stored);
    assert!(h.store.contains("alice", &object.id));

    // The same connection carries the next request.
    let get = ObjectRequest::Get {
        grant: Some(h.read_grant("alice", object.id)),
        owner: "alice".into(),
        id: object.id,
        offset: 0,
        len: 0,
    };
    conn.write_frame(&get, None).await.unwrap();
    let response: ObjectResponse = conn.read_frame().await.unwrap().unwrap();
    assert_eq!(
        response,
        ObjectResponse::Found {
            object,
            chunks: chunk_hashes(&data),
            offset: 0,
            len: object.size
        }
    );
    let file = File::from(conn.fds.pop_front().unwrap());
    let mut back = vec![0; data.len()];
    file.read_exact_at(&mut back, 0).unwrap();
    assert_eq!(back, data);
    assert!(file.write_at(b"x", 0).is_err());
}

#[tokio::test]
async fn unsealed_or_missing_descriptors_and_other_owners_are_refused() {
    let h = harness().await;
    let data = vec![1u8; 100];
    let mut conn = h.connect().await;
    conn.write_frame(
        &put_request(h.write_grant("alice"), &data),
        Some(&memfd(&data, false)),
    )
    .await
    .unwrap();
    let text = error_text(&conn.read_frame().await.unwrap().unwrap());
    assert!(text.contains("not a sealed memfd"), "{text}");
    conn.write_frame(&put_request(h.write_grant("alice"), &data), None)
        .await
        .unwrap();
    let text = error_text(&conn.read_frame().await.unwrap().unwrap());
    assert!(text.contains("sealed memfd (SCM_RIGHTS)"), "{text}");
    // Bytes that are not the object.
    conn.write_frame(
        &put_request(h.write_grant("alice"), &data),
        Some(&memfd(&[2u8; 100], true)),
    )
    .await
    .unwrap();
    let text = error_text(&conn.read_frame().await.unwrap().unwrap());
    assert!(text.contains("not object"), "{text}");
    assert_eq!(h.store.usage().objects, 0);

    conn.write_frame(
        &put_request(h.write_grant("alice"), &data),
        Some(&memfd(&data, true)),
    )
    .await
    .unwrap();
    let _: ObjectResponse = conn.read_frame().await.unwrap().unwrap();
    let id = ObjectRef::of(&data).id;
    let get = ObjectRequest::Get {
        grant: Some(h.read_grant("bob", id)),
        owner: "alice".into(),
        id,
        offset: 0,
        len: 0,
    };
    conn.write_frame(&get, None).await.unwrap();
    let text = error_text(&conn.read_frame().await.unwrap().unwrap());
    assert!(text.contains("for owner `bob`"), "{text}");
    assert!(conn.fds.is_empty());
}

#[tokio::test]
async fn a_hostile_frame_is_answered_and_the_connection_closed() {
    let h = harness().await;
    let mut conn = h.connect().await;
    use tokio::io::AsyncWriteExt;
    conn.socket_mut()
        .write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let text = error_text(&conn.read_frame().await.unwrap().unwrap());
    assert!(text.contains("bad object request"), "{text}");
    assert!(conn.read_frame::<ObjectResponse>().await.unwrap().is_none());
}
