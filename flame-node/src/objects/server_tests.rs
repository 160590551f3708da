//! The QUIC endpoint driven by hand with quinn: what a client sends and what it is told.

use super::*;
use crate::objects::store::CacheConfig;
use bytes::Bytes;
use flame_protocol::ids::SessionId;
use flame_protocol::object::{chunk_hashes, GrantAccess, GrantBody, ObjectEvent};
use flame_protocol::object_grant::GrantSigner;
use flame_protocol::pki;
use quinn::crypto::rustls::QuicClientConfig;
use tokio::sync::mpsc;

const NODE: &str = "n1";

struct Harness {
    addr: SocketAddr,
    client: quinn::Endpoint,
    signer: GrantSigner,
    store: ObjectStore,
    events: mpsc::Receiver<ObjectEvent>,
    _dir: tempfile::TempDir,
}

fn certificates() -> (
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
    CertificateDer<'static>,
) {
    let ca_key = rcgen::KeyPair::generate_for(pki::KEY_ALGORITHM).unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let node_key = rcgen::KeyPair::generate_for(pki::KEY_ALGORITHM).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    params.subject_alt_names.push(rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from(pki::node_uri(NODE).unwrap()).unwrap(),
    ));
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let node = params.signed_by(&node_key, &issuer).unwrap();
    let ca_der = ca.der().clone();
    (
        vec![node.der().clone(), ca_der.clone()],
        PrivateKeyDer::try_from(node_key.serialize_der()).unwrap(),
        ca_der,
    )
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let (tx, events) = mpsc::channel(64);
    let store = ObjectStore::open(
        CacheConfig {
            memory_bytes: 64 * 1024 * 1024,
            disk_bytes: 64 * 1024 * 1024,
            spill_dir: dir.path().join("spill"),
        },
        tx,
    )
    .unwrap();
    let (certs, key, ca) = certificates();
    let endpoint = object_endpoint(([127, 0, 0, 1], 0).into(), certs, key, ca.clone()).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let signer = GrantSigner::generate().unwrap();
    let cell = GrantKeyCell::default();
    cell.set(signer.public_key());
    tokio::spawn(serve(endpoint, store.clone(), NODE.into(), cell));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![OBJECT_ALPN.to_vec()];
    let mut client = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).unwrap();
    client.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).unwrap(),
    )));
    Harness {
        addr,
        client,
        signer,
        store,
        events,
        _dir: dir,
    }
}

fn far() -> u64 {
    now_unix_ms() + 60_000
}

impl Harness {
    fn write_grant(&self, owner: &str, expires_unix_ms: u64) -> Grant {
        self.signer.sign(GrantBody {
            owner: owner.into(),
            access: GrantAccess::Write {
                node: NODE.into(),
                scope: ObjectScope::Session(SessionId(1)),
                bytes_max: 1 << 30,
            },
            expires_unix_ms,
        })
    }

    fn read_grant(&self, owner: &str, id: ObjectId) -> Grant {
        self.signer.sign(GrantBody {
            owner: owner.into(),
            access: GrantAccess::Read { ids: vec![id] },
            expires_unix_ms: far(),
        })
    }

    async fn stream(&self) -> (quinn::SendStream, quinn::RecvStream) {
        let conn = self
            .client
            .connect(self.addr, "localhost")
            .unwrap()
            .await
            .unwrap();
        conn.open_bi().await.unwrap()
    }

    /// Sends a request frame and `body`, and reads the response frame and what follows.
    async fn exchange(&self, request: &ObjectRequest, body: &[u8]) -> (ObjectResponse, Vec<u8>) {
        let (send, recv) = self.stream().await;
        let mut writer = FrameWriter::new(send, OBJECT_FRAME_BYTES_MAX);
        writer.write(request).await.unwrap();
        let mut send = writer.into_inner();
        // A refused put stops the stream: the rest of the bytes may not go.
        let _ = send.write_all(body).await;
        let _ = send.finish();
        let mut reader = FrameReader::new(recv, OBJECT_FRAME_BYTES_MAX);
        let response: ObjectResponse = reader.read_required().await.unwrap();
        let rest = reader
            .into_inner()
            .read_to_end(1 << 30)
            .await
            .unwrap_or_default();
        (response, rest)
    }

    async fn put(&self, grant: Grant, data: &[u8]) -> ObjectResponse {
        let request = ObjectRequest::Put {
            grant,
            object: ObjectRef::of(data),
            chunks: chunk_hashes(data),
        };
        self.exchange(&request, data).await.0
    }

    async fn get(
        &self,
        grant: Option<Grant>,
        owner: &str,
        id: ObjectId,
        offset: u64,
        len: u64,
    ) -> (ObjectResponse, Vec<u8>) {
        let request = ObjectRequest::Get {
            grant,
            owner: owner.into(),
            id,
            offset,
            len,
        };
        self.exchange(&request, &[]).await
    }
}

fn data(n: usize) -> Bytes {
    (0..n).map(|i| (i % 251) as u8).collect()
}

fn error_text(response: &ObjectResponse) -> String {
    match response {
        ObjectResponse::Error(e) => e.message.clone(),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_put_is_stored_and_reported_and_a_get_reads_it_back() {
    let mut h = harness().await;
    let bytes = data(OBJECT_CHUNK_BYTES as usize + 1234);
    let object = ObjectRef::of(&bytes);
    let response = h.put(h.write_grant("alice", far()), &bytes).await;
    assert_eq!(response, ObjectResponse::Stored);
    assert!(h.store.contains("alice", &object.id));
    assert!(
        matches!(h.events.try_recv(), Ok(ObjectEvent::Stored { owner, object: o, .. })
        if owner == "alice" && o == object)
    );

    let grant = h.read_grant("alice", object.id);
    let (found, body) = h.get(Some(grant.clone()), "alice", object.id, 0, 0).await;
    assert_eq!(
        found,
        ObjectResponse::Found {
            object,
            chunks: chunk_hashes(&bytes),
            offset: 0,
            len: object.size
        }
    );
    assert_eq!(body, bytes);
    // A ranged get: the second chunk.
    let (found, body) = h
        .get(Some(grant), "alice", object.id, OBJECT_CHUNK_BYTES, 0)
        .await;
    assert!(matches!(found, ObjectResponse::Found { len: 1234, .. }));
    assert_eq!(body, bytes[OBJECT_CHUNK_BYTES as usize..]);
}

#[tokio::test]
async fn a_corrupt_chunk_is_refused() {
    let h = harness().await;
    let bytes = data(OBJECT_CHUNK_BYTES as usize + 10);
    let mut bad = bytes.to_vec();
    bad[OBJECT_CHUNK_BYTES as usize + 3] ^= 0xff;
    let request = ObjectRequest::Put {
        grant: h.write_grant("alice", far()),
        object: ObjectRef::of(&bytes),
        chunks: chunk_hashes(&bytes),
    };
    let (response, _) = h.exchange(&request, &bad).await;
    let text = error_text(&response);
    assert!(text.contains("chunk 1 does not match its hash"), "{text}");
    assert!(!h.store.contains("alice", &ObjectRef::of(&bytes).id));
    assert_eq!(h.store.usage().objects, 0);
}

#[tokio::test]
async fn another_owners_grant_reads_nothing() {
    let h = harness().await;
    let bytes = data(1000);
    let id = ObjectRef::of(&bytes).id;
    assert_eq!(
        h.put(h.write_grant("alice", far()), &bytes).await,
        ObjectResponse::Stored
    );
    // Bob's grant for the same id, asking for Alice's object.
    let (response, body) = h
        .get(Some(h.read_grant("bob", id)), "alice", id, 0, 0)
        .await;
    let text = error_text(&response);
    assert!(text.contains("for owner `bob`, not `alice`"), "{text}");
    assert!(body.is_empty());
    // Bob's grant for his own (absent) object of that id.
    let (response, _) = h.get(Some(h.read_grant("bob", id)), "bob", id, 0, 0).await;
    assert!(matches!(
        response,
        ObjectResponse::Error(ApiError {
            kind: ErrorKind::NotFound,
            ..
        })
    ));
    // No grant at all.
    let (response, _) = h.get(None, "alice", id, 0, 0).await;
    assert!(matches!(
        response,
        ObjectResponse::Error(ApiError {
            kind: ErrorKind::PermissionDenied,
            ..
        })
    ));
}

#[tokio::test]
async fn an_expired_or_foreign_grant_is_refused() {
    let h = harness().await;
    let bytes = data(100);
    let text = error_text(
        &h.put(h.write_grant("alice", now_unix_ms() - 1_000), &bytes)
            .await,
    );
    assert!(text.contains("expired"), "{text}");
    let other = GrantSigner::generate().unwrap();
    let forged = other.sign(h.write_grant("alice", far()).body);
    let text = error_text(&h.put(forged, &bytes).await);
    assert!(text.contains("signature"), "{text}");
    // A read grant does not store.
    let text = error_text(
        &h.put(h.read_grant("alice", ObjectRef::of(&bytes).id), &bytes)
            .await,
    );
    assert!(text.contains("for reading"), "{text}");
    assert_eq!(h.store.usage().objects, 0);
}

#[tokio::test]
async fn a_hostile_frame_gets_an_error_and_the_endpoint_keeps_serving() {
    let h = harness().await;
    let (mut send, recv) = h.stream().await;
    send.write_all(&[3, 0, 0, 0, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let _ = send.finish();
    let mut reader = FrameReader::new(recv, OBJECT_FRAME_BYTES_MAX);
    let response: ObjectResponse = reader.read_required().await.unwrap();
    assert!(error_text(&response).contains("bad object request"));
    // A frame that claims too much is refused before it is read.
    let (mut send, recv) = h.stream().await;
    send.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    let mut reader = FrameReader::new(recv, OBJECT_FRAME_BYTES_MAX);
    let response: ObjectResponse = reader.read_required().await.unwrap();
    assert!(error_text(&response).contains("exceeds the limit"));
    let bytes = data(10);
    assert_eq!(
        h.put(h.write_grant("alice", far()), &bytes).await,
        ObjectResponse::Stored
    );
}
