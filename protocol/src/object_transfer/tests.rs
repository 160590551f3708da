//! The transfer client's tests: the verifier, QUIC put and ranged get against a
//! test-only server, corrupt chunks, and the Unix socket with sealed memfds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use crate::endpoint::provider;
use crate::frame::{FrameReader, FrameWriter};
use crate::model::ErrorKind;
use crate::object::{GrantAccess, GrantBody, ObjectScope};
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use tokio::net::UnixStream;

/// A cluster CA as the head makes it, and a certificate it issued for a node as
/// `flame-head/src/tls.rs` (`sign_node`) does: client authentication only, one
/// `urn:flame:node:NAME` URI, no DNS name.
struct Pki {
    ca: CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

fn pki() -> Pki {
    let key = rcgen::KeyPair::generate_for(crate::pki::KEY_ALGORITHM).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = params.self_signed(&key).unwrap();
    Pki {
        ca: ca.der().clone(),
        issuer: rcgen::Issuer::new(params, key),
    }
}

impl Pki {
    /// A node certificate and its key.
    fn node(&self, name: &str) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = rcgen::KeyPair::generate_for(crate::pki::KEY_ALGORITHM).unwrap();
        let mut params = rcgen::CertificateParams::default();
        let uri = crate::pki::node_uri(name).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(
            rcgen::string::Ia5String::try_from(uri).unwrap(),
        )];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            cert.der().clone(),
            PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
    }
}

fn verify(
    ca: &ClusterCa,
    dialled: &str,
    chain: &[CertificateDer<'static>],
) -> Result<(), rustls::Error> {
    let verifier = node_server_verifier(ca, dialled).unwrap();
    let name = ServerName::try_from(NODE_SERVER_NAME).unwrap();
    verifier
        .verify_server_cert(&chain[0], &chain[1..], &name, &[], UnixTime::now())
        .map(|_| ())
}

#[test]
fn a_node_certificate_is_accepted_for_its_name_only_and_under_its_ca_only() {
    let pki = pki();
    let (n1, _) = pki.node("n1");
    let ca = ClusterCa::Certs(vec![pki.ca.clone()]);
    verify(&ca, "n1", std::slice::from_ref(&n1)).unwrap();
    let err = verify(&ca, "n2", std::slice::from_ref(&n1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("names node n1, not node n2"), "{err}");

    let other = super::tests::pki();
    let (stranger, _) = other.node("n1");
    assert!(verify(&ca, "n1", std::slice::from_ref(&stranger)).is_err());

    // Pinned by fingerprint: the CA must come in the chain the node presents.
    let pinned = ClusterCa::Pinned(crate::pki::fingerprint(&pki.ca));
    verify(&pinned, "n1", &[n1.clone(), pki.ca.clone()]).unwrap();
    let err = verify(&pinned, "n1", &[n1]).unwrap_err().to_string();
    assert!(err.contains("does not hold the cluster CA"), "{err}");
    assert!(verify(&pinned, "n1", &[stranger, other.ca.clone()]).is_err());
}

#[test]
fn a_user_certificate_is_not_a_node() {
    let pki = pki();
    let key = rcgen::KeyPair::generate_for(crate::pki::KEY_ALGORITHM).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from("urn:flame:user:n1").unwrap(),
    )];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &pki.issuer).unwrap();
    let ca = ClusterCa::Certs(vec![pki.ca.clone()]);
    let err = verify(&ca, "n1", &[cert.der().clone()])
        .unwrap_err()
        .to_string();
    assert!(err.contains("user n1"), "{err}");
}

#[test]
fn ranges_are_whole_chunks_and_cover_the_object() {
    let c = OBJECT_CHUNK_BYTES;
    assert!(plan_ranges(0, limits::OBJECT_RANGE_BYTES).is_empty());
    assert_eq!(plan_ranges(5, limits::OBJECT_RANGE_BYTES), vec![(0, 5)]);
    assert_eq!(
        plan_ranges(5 * c + 1, 2 * c),
        vec![(0, 2 * c), (2 * c, 2 * c), (4 * c, c + 1)]
    );
    // A range smaller than a chunk is a chunk.
    assert_eq!(plan_ranges(c + 1, 1), vec![(0, c), (c, 1)]);
}

/// A node's object endpoint in miniature: keeps what is put (checked against its id)
/// and serves ranges, corrupting one chunk of what it sends when told to.
struct TestNode {
    addr: SocketAddr,
    _task: tokio::task::JoinHandle<()>,
}

type Store = Arc<Mutex<HashMap<ObjectId, Bytes>>>;

fn test_node(pki: &Pki, name: &str, corrupt: Option<u64>) -> TestNode {
    let (cert, key) = pki.node(name);
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert, pki.ca.clone()], key)
        .unwrap();
    tls.alpn_protocols = vec![OBJECT_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let server = quinn::Endpoint::server(config, ([127, 0, 0, 1], 0).into()).unwrap();
    let addr = server.local_addr().unwrap();
    let store = Store::default();
    let task = tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let store = store.clone();
            tokio::spawn(async move {
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(serve_stream(store.clone(), corrupt, send, recv));
                }
            });
        }
    });
    TestNode { addr, _task: task }
}

async fn serve_stream(
    store: Store,
    corrupt: Option<u64>,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
) {
    let mut reader = FrameReader::new(recv, limits::FRAME_BYTES_MAX);
    let mut writer = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
    let request: ObjectRequest = reader.read_required().await.unwrap();
    match request {
        ObjectRequest::Put { object, chunks, .. } => {
            let bytes = reader.into_inner().read_to_end(1 << 30).await.unwrap();
            assert_eq!(chunk_hashes(&bytes), chunks);
            assert_eq!(ObjectRef::of(&bytes), object);
            store.lock().unwrap().insert(object.id, bytes.into());
            writer.write(&ObjectResponse::Stored).await.unwrap();
        }
        ObjectRequest::Get {
            id, offset, len, ..
        } => {
            let found = store.lock().unwrap().get(&id).cloned();
            let Some(bytes) = found else {
                let error = ApiError::new(ErrorKind::NotFound, "no such object here");
                writer.write(&ObjectResponse::Error(error)).await.unwrap();
                writer.into_inner().finish().unwrap();
                return;
            };
            let len = if len == 0 {
                bytes.len() as u64 - offset
            } else {
                len
            };
            let found = ObjectResponse::Found {
                object: ObjectRef::of(&bytes),
                chunks: chunk_hashes(&bytes),
                offset,
                len,
            };
            writer.write(&found).await.unwrap();
            let mut range = bytes[offset as usize..(offset + len) as usize].to_vec();
            if let Some(chunk) = corrupt {
                let at = chunk * OBJECT_CHUNK_BYTES;
                if (offset..offset + len).contains(&at) {
                    range[(at - offset) as usize] ^= 0xff;
                }
            }
            let mut send = writer.into_inner();
            // The reader may stop at a corrupt chunk.
            let _ = send.write_all(&range).await;
            let _ = send.finish();
        }
    }
}

fn endpoint(name: &str, addr: SocketAddr) -> ObjectEndpoint {
    ObjectEndpoint {
        node: name.into(),
        addr,
        host: "another host".into(),
        socket: None,
    }
}

fn grant(access: GrantAccess) -> Grant {
    Grant {
        body: GrantBody {
            owner: "alice".into(),
            access,
            expires_unix_ms: u64::MAX,
        },
        signature: Vec::new(),
    }
}

fn write_grant(node: &str) -> Grant {
    grant(GrantAccess::Write {
        node: node.into(),
        scope: ObjectScope::Kept,
        bytes_max: u64::MAX,
    })
}

/// Bytes of `chunks` whole chunks and a bit, each byte telling its place.
fn object_bytes(chunks: u64) -> Bytes {
    (0..chunks * OBJECT_CHUNK_BYTES + 1000)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

#[tokio::test]
async fn a_put_then_a_ranged_get_round_trip_and_a_corrupt_chunk_is_named() {
    let pki = pki();
    let good = test_node(&pki, "good", None);
    let bad = test_node(&pki, "bad", Some(3));
    let mut client = ObjectClient::with_ca(ClusterCa::Certs(vec![pki.ca.clone()]), None).unwrap();
    // Ranges of two chunks: 5 chunks and a bit are three ranges, two streams at once
    // at least.
    client.range_bytes = 2 * OBJECT_CHUNK_BYTES;
    let bytes = object_bytes(5);
    let object = ObjectRef::of(&bytes);
    for (name, node) in [("good", &good), ("bad", &bad)] {
        let target = ObjectTarget {
            endpoint: endpoint(name, node.addr),
            grant: write_grant(name),
        };
        client.put(&target, object, bytes.clone()).await.unwrap();
    }
    let read = grant(GrantAccess::Read {
        ids: vec![object.id],
    });
    let got = client
        .get("alice", object, &[endpoint("good", good.addr)], &read)
        .await
        .unwrap();
    assert_eq!(got, bytes);

    let err = client
        .get("alice", object, &[endpoint("bad", bad.addr)], &read)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, TransferError::Corrupt { chunk: Some(3), id, node } if *id == object.id && node == "bad"),
        "{err}"
    );
    assert!(err.to_string().contains("chunk 3"), "{err}");

    // The next node is tried after a corrupt one.
    let endpoints = [endpoint("bad", bad.addr), endpoint("good", good.addr)];
    let got = client
        .get("alice", object, &endpoints, &read)
        .await
        .unwrap();
    assert_eq!(got, bytes);

    // A node that lacks the object refuses, and the error says so.
    let other = ObjectRef::of(b"not there");
    let err = client
        .get("alice", other, &[endpoint("good", good.addr)], &read)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, TransferError::Refused { error, .. } if error.kind == ErrorKind::NotFound),
        "{err}"
    );

    // A node answering for another name is refused at the handshake.
    let err = client
        .get("alice", object, &[endpoint("someone", good.addr)], &read)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, TransferError::Connect { reason, .. } if reason.contains("not node someone")),
        "{err}"
    );
}

#[tokio::test]
async fn a_sealed_memfd_crosses_a_socketpair_with_its_frame() {
    let (a, b) = UnixStream::pair().unwrap();
    let (mut a, mut b) = (FdStream::new(a), FdStream::new(b));
    let bytes = b"the object's bytes".to_vec();
    let fd = sealed_memfd(&bytes).unwrap();
    assert!(is_sealed(fd.as_fd()));
    let object = ObjectRef::of(&bytes);
    let frame = ObjectResponse::Found {
        object,
        chunks: chunk_hashes(&bytes),
        offset: 0,
        len: bytes.len() as u64,
    };
    a.write_frame(&frame, Some(&fd)).await.unwrap();
    drop(fd);
    a.write_frame(&ObjectResponse::Stored, None).await.unwrap();
    let got = b.read_frame::<ObjectResponse>().await.unwrap().unwrap();
    let passed = b.fds.pop_front();
    assert_eq!(got, frame);
    let passed = passed.expect("the descriptor came with the frame");
    assert!(is_sealed(passed.as_fd()));
    assert_eq!(
        read_fd_range(passed.as_fd(), 0, bytes.len()).unwrap(),
        bytes
    );
    assert_eq!(read_fd_range(passed.as_fd(), 4, 3).unwrap(), &bytes[4..7]);
    assert!(read_fd_range(passed.as_fd(), 4, bytes.len()).is_err());
    // The seals hold for the receiver: the bytes cannot change under it.
    let mut file = std::fs::File::from(passed);
    use std::io::Write as _;
    assert!(file.write_all(b"x").is_err());
    assert!(file.set_len(1).is_err());
    // The next frame comes alone.
    let got = b.read_frame::<ObjectResponse>().await.unwrap().unwrap();
    let passed = b.fds.pop_front();
    assert_eq!(got, ObjectResponse::Stored);
    assert!(passed.is_none());
    // An unsealed descriptor is told apart.
    let plain = tempfile::tempfile().unwrap();
    assert!(!is_sealed(plain.as_fd()));
}

/// A node's Unix socket in miniature: takes sealed memfds and hands them out again.
fn test_socket(dir: &std::path::Path, corrupt: bool) -> String {
    let path = dir.join("objects.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let held: Arc<Mutex<HashMap<ObjectId, Arc<OwnedFd>>>> = Arc::default();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let held = held.clone();
            tokio::spawn(async move {
                let mut stream = FdStream::new(stream);
                let request = stream.read_frame::<ObjectRequest>().await.unwrap().unwrap();
                let fd = stream.fds.pop_front();
                match request {
                    ObjectRequest::Put { object, .. } => {
                        let fd = fd.unwrap();
                        assert!(is_sealed(fd.as_fd()));
                        let bytes = read_fd_range(fd.as_fd(), 0, object.size as usize).unwrap();
                        assert_eq!(ObjectRef::of(&bytes), object);
                        held.lock().unwrap().insert(object.id, Arc::new(fd));
                        stream
                            .write_frame(&ObjectResponse::Stored, None)
                            .await
                            .unwrap();
                    }
                    ObjectRequest::Get { id, .. } => {
                        let fd = held.lock().unwrap().get(&id).cloned().unwrap();
                        let size = std::fs::File::from(fd.try_clone().unwrap())
                            .metadata()
                            .unwrap()
                            .len();
                        let mut content = read_fd_range(fd.as_fd(), 0, size as usize).unwrap();
                        let object = ObjectRef::of(&content);
                        let chunks = chunk_hashes(&content);
                        let sent = if corrupt {
                            content[0] ^= 1;
                            sealed_memfd(&content).unwrap()
                        } else {
                            fd.try_clone().unwrap()
                        };
                        let found = ObjectResponse::Found {
                            object,
                            chunks,
                            offset: 0,
                            len: size,
                        };
                        stream.write_frame(&found, Some(&sent)).await.unwrap();
                    }
                }
            });
        }
    });
    path.display().to_string()
}

#[tokio::test]
async fn same_host_transfers_pass_descriptors_and_fall_back_to_quic() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let client = ObjectClient::with_ca(ClusterCa::Certs(vec![pki.ca.clone()]), None).unwrap();
    let bytes = object_bytes(1);
    let object = ObjectRef::of(&bytes);
    let read = grant(GrantAccess::Read {
        ids: vec![object.id],
    });
    // No QUIC endpoint answers at this address: only the socket can serve.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let local = ObjectEndpoint {
        node: "local".into(),
        addr: silent.local_addr().unwrap(),
        host: host_id(),
        socket: Some(test_socket(dir.path(), false)),
    };
    assert!(same_host(&local));
    let target = ObjectTarget {
        endpoint: local.clone(),
        grant: write_grant("local"),
    };
    client.put(&target, object, bytes.clone()).await.unwrap();
    let got = client.get("alice", object, &[local], &read).await.unwrap();
    assert_eq!(got, bytes);

    // A descriptor whose bytes are not the object's is found out.
    let corrupt_dir = tempfile::tempdir().unwrap();
    let corrupt = ObjectEndpoint {
        node: "corrupt".into(),
        addr: silent.local_addr().unwrap(),
        host: host_id(),
        socket: Some(test_socket(corrupt_dir.path(), true)),
    };
    let target = ObjectTarget {
        endpoint: corrupt.clone(),
        grant: write_grant("corrupt"),
    };
    client.put(&target, object, bytes.clone()).await.unwrap();
    let err = client
        .get("alice", object, &[corrupt], &read)
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransferError::Corrupt { chunk: Some(0), .. }),
        "{err}"
    );

    // A socket that cannot be connected: QUIC instead.
    let node = test_node(&pki, "remote", None);
    let fallback = ObjectEndpoint {
        node: "remote".into(),
        addr: node.addr,
        host: host_id(),
        socket: Some(dir.path().join("absent.sock").display().to_string()),
    };
    let target = ObjectTarget {
        endpoint: fallback.clone(),
        grant: write_grant("remote"),
    };
    client.put(&target, object, bytes.clone()).await.unwrap();
    let got = client
        .get("alice", object, &[fallback], &read)
        .await
        .unwrap();
    assert_eq!(got, bytes);
}

#[test]
fn the_host_id_names_the_machine_and_the_network_namespace() {
    let id = host_id();
    let (machine, netns) = id.rsplit_once(':').unwrap();
    assert!(!machine.is_empty());
    assert!(netns.parse::<u64>().unwrap() > 0);
    assert_eq!(host_id(), id);
}
