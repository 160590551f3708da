//! Every way in is refused without the right credential, with a message that says why:
//! clients without a token or with a revoked or expired one, nodes without a certificate or
//! with another node's, users reaching into other users' sessions, non-admins registering
//! applications, and peers of another protocol version. No token text reaches the head's
//! log.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_client::{Client, ClientConfig};
use flame_protocol::auth::{JoinReply, JoinRequest, Secret};
use flame_protocol::endpoint;
use flame_protocol::frame::{FrameReader, FrameWriter};
use flame_protocol::messages::{
    ClientRequest, ClientResponse, HeadToNode, Hello, HelloReply, NodeRegistration, NodeToHead,
    Role,
};
use flame_protocol::model::{ApplicationSpec, ErrorKind, NodeResources, SessionSpec};
use flame_protocol::{limits, TaskId, PROTOCOL_VERSION};
use flame_tests::cluster::{say_hello, Cluster, ClusterOptions};
use serde::Serialize;
use std::time::Duration;

fn head_only() -> ClusterOptions {
    ClusterOptions {
        nodes: 0,
        ..ClusterOptions::default()
    }
}

fn refusal(reply: HelloReply) -> String {
    match reply {
        HelloReply::Refused { reason } => reason,
        HelloReply::Welcome { .. } => panic!("the head welcomed a peer it should refuse"),
    }
}

fn hello(role: Role, token: Option<Secret>) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        role,
        agent: "flame-tests".into(),
        token,
    }
}

async fn connect_error(config: &ClientConfig) -> String {
    match Client::connect(config).await {
        Ok(_) => panic!("the head accepted a client it should refuse"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_without_a_valid_token_are_refused_with_the_reason() {
    let cluster = Cluster::start(head_only()).await;

    // No token at all.
    let (_ep, connection) = cluster.raw_connection(None).await;
    let (reply, _, _) = say_hello(&connection, &hello(Role::Client, None)).await;
    let reason = refusal(reply);
    assert!(reason.contains("no credentials"), "{reason}");
    assert!(reason.contains("token"), "{reason}");
    // The CLI without a token says so too.
    let mut command = flame_tests::cluster::flame_command();
    command
        .arg("--head")
        .arg(cluster.head_addr())
        .arg("--ca-file")
        .arg(cluster.ca_file())
        .args(["session", "list"]);
    let out = flame_tests::command::run_command(command, Duration::from_secs(30)).await;
    out.assert_failure();
    assert!(out.stderr.contains("no credentials"), "{out}");

    // A revoked token.
    let token = cluster.user_token("carol", false).await;
    let id = token.expose().split('.').nth(1).unwrap().to_string();
    let client = Client::connect(&cluster.client_config_as(token.clone()))
        .await
        .unwrap();
    assert_eq!(client.whoami().await.unwrap().name, "carol");
    cluster
        .head_command(&["token", "revoke", &id])
        .await
        .assert_success();
    let reason = connect_error(&cluster.client_config_as(token.clone())).await;
    assert!(
        reason.contains(&format!("token {id} has been revoked")),
        "{reason}"
    );
    // The connection it had open is closed.
    let closed = tokio::time::timeout(Duration::from_secs(10), client.list_nodes()).await;
    assert!(matches!(closed, Ok(Err(_))), "{closed:?}");

    // An expired token.
    let out = cluster
        .head_command(&["token", "create", "--user", "dave", "--ttl", "1s"])
        .await;
    out.assert_success();
    let expiring = Secret::new(out.stdout.trim());
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let reason = connect_error(&cluster.client_config_as(expiring)).await;
    assert!(reason.contains("expired"), "{reason}");

    // A connection outlives its token by at most the head's sweep interval.
    let out = cluster
        .head_command(&["token", "create", "--user", "frank", "--ttl", "2s"])
        .await;
    out.assert_success();
    let short = Client::connect(&cluster.client_config_as(Secret::new(out.stdout.trim())))
        .await
        .unwrap();
    short.list_nodes().await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        short.list_nodes().await.is_err(),
        "an expired token's connection still works"
    );

    // A forged secret, and a token of another cluster.
    let mut parsed =
        flame_protocol::auth::ParsedToken::parse(cluster.admin_token().expose()).unwrap();
    parsed.secret[0] ^= 1;
    let reason = connect_error(&cluster.client_config_as(parsed.to_secret())).await;
    assert!(reason.contains("does not match"), "{reason}");

    // A node join token is no client token.
    let join = flame_tests::cluster::read_token(&cluster.join_token_file());
    let reason = connect_error(&cluster.client_config_as(join)).await;
    assert!(reason.contains("node join token"), "{reason}");

    // No token text ever reaches the head's log.
    let log = cluster.logs();
    for secret in [token, cluster.admin_token()] {
        let secret_part = secret.expose().split('.').nth(2).unwrap().to_string();
        assert!(
            !log.contains(&secret_part),
            "a token secret is in the head's log"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_need_their_own_certificate() {
    let cluster = Cluster::start(ClusterOptions::default()).await;

    // Without a certificate.
    let (_ep, connection) = cluster.raw_connection(None).await;
    let (reply, _, _) = say_hello(&connection, &hello(Role::Node, None)).await;
    let reason = refusal(reply);
    assert!(
        reason.contains("nodes must present a certificate"),
        "{reason}"
    );
    assert!(reason.contains("flame-node join"), "{reason}");

    // With node-0's certificate, registering as another node.
    let tls = cluster.node_tls_dir(0);
    let identity = endpoint::load_identity(&tls.join("node.crt"), &tls.join("node.key")).unwrap();
    let (_ep, connection) = cluster.raw_connection(Some(identity)).await;
    let (reply, mut writer, mut reader) = say_hello(&connection, &hello(Role::Node, None)).await;
    assert!(matches!(reply, HelloReply::Welcome { .. }), "{reply:?}");
    writer
        .write(&NodeToHead::Register(NodeRegistration {
            name: "impostor".into(),
            allocatable: NodeResources::default(),
            labels: Default::default(),
            isolation: flame_protocol::model::Isolation::None,
            identity: flame_protocol::model::ExecutorIdentity::OwnerUid,
            executors: Vec::new(),
            objects: None,
        }))
        .await
        .unwrap();
    let answer = tokio::time::timeout(limits::CONNECT_TIMEOUT, reader.read::<HeadToNode>())
        .await
        .expect("no answer to the registration in time");
    match answer {
        Ok(Some(HeadToNode::Refused { reason })) => {
            assert!(
                reason.contains("certificate names node `node-0`"),
                "{reason}"
            );
            assert!(reason.contains("impostor"), "{reason}");
        }
        other => panic!("the impostor was not refused: {other:?}"),
    }
    // The real node-0 is still registered and ready.
    let nodes = cluster.node_list().await;
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(nodes[0].name, "node-0");

    // A user token cannot join a node.
    let (_ep, connection) = cluster.raw_connection(None).await;
    let user = cluster.user_token("erin", false).await;
    let (reply, _, _) = say_hello(&connection, &hello(Role::Join, Some(user))).await;
    let reason = refusal(reply);
    assert!(reason.contains("not a node join token"), "{reason}");

    // A join token cannot take the name of a node that is connected.
    let join = flame_tests::cluster::read_token(&cluster.join_token_file());
    let (_ep, connection) = cluster.raw_connection(None).await;
    let (reply, mut writer, mut reader) =
        say_hello(&connection, &hello(Role::Join, Some(join))).await;
    assert!(matches!(reply, HelloReply::Welcome { .. }), "{reply:?}");
    let (csr_pem, _key) = flame_protocol::pki::node_csr("node-0").unwrap();
    writer
        .write(&JoinRequest {
            name: "node-0".into(),
            csr_pem,
        })
        .await
        .unwrap();
    match reader.read_required::<JoinReply>().await.unwrap() {
        JoinReply::Refused { reason } => {
            assert!(reason.contains("`node-0` exists already"), "{reason}")
        }
        JoinReply::Signed { .. } => panic!("a join took the name of a live node"),
    }

    // A join token gets a certificate that names the node it asked for, and only it.
    let join = flame_tests::cluster::read_token(&cluster.join_token_file());
    let (_ep, connection) = cluster.raw_connection(None).await;
    let (reply, mut writer, mut reader) =
        say_hello(&connection, &hello(Role::Join, Some(join))).await;
    assert!(matches!(reply, HelloReply::Welcome { .. }), "{reply:?}");
    let (csr_pem, _key) = flame_protocol::pki::node_csr("node-9").unwrap();
    writer
        .write(&JoinRequest {
            name: "node-9".into(),
            csr_pem,
        })
        .await
        .unwrap();
    match reader.read_required::<JoinReply>().await.unwrap() {
        JoinReply::Signed { cert_pem, .. } => {
            let der = rustls_pem_cert(&cert_pem);
            assert_eq!(
                flame_protocol::pki::identity_of(&der).unwrap(),
                flame_protocol::pki::PeerIdentity::Node("node-9".into())
            );
        }
        JoinReply::Refused { reason } => panic!("join refused: {reason}"),
    }
}

fn rustls_pem_cert(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn users_cannot_reach_into_other_users_sessions() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let alice =
        Client::connect(&cluster.client_config_as(cluster.user_token("alice", false).await))
            .await
            .unwrap();
    let bob_token = cluster.user_token("bob", false).await;
    let bob = Client::connect(&cluster.client_config_as(bob_token.clone()))
        .await
        .unwrap();
    let session = alice
        .create_session(SessionSpec::new("ping"))
        .await
        .unwrap();
    session
        .submit(vec![bytes::Bytes::from_static(b"\x00")])
        .await
        .unwrap();
    let id = session.id();
    assert_eq!(alice.get_session(id).await.unwrap().owner, "alice");

    let denied = |what: &str, r: Result<(), flame_client::ClientError>| {
        let e = r.expect_err(&format!("bob could {what} alice's session"));
        assert_eq!(e.kind(), Some(ErrorKind::PermissionDenied), "{what}: {e}");
        assert!(
            e.to_string().contains("belongs to another user"),
            "{what}: {e}"
        );
    };
    denied("view", bob.get_session(id).await.map(drop));
    denied(
        "list the tasks of",
        bob.list_tasks(id, Vec::new(), TaskId(0), 10)
            .await
            .map(drop),
    );
    denied(
        "read the logs of",
        bob.logs(id, None, false).await.map(drop),
    );
    denied("cancel", bob.cancel_session(id).await);
    denied("close", bob.close_session(id).await);
    // Bob lists only his own sessions; he cannot create one for alice either.
    assert!(bob.list_sessions().await.unwrap().is_empty());
    let e = bob
        .create_session(SessionSpec {
            owner: "alice".into(),
            ..SessionSpec::new("ping")
        })
        .await
        .map(drop)
        .unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::PermissionDenied), "{e}");

    // Bob's view of the queue shows how the cluster is shared, not alice's sessions.
    let queue = bob.queue().await.unwrap();
    assert!(
        queue
            .owners
            .iter()
            .all(|o| o.owner == "bob" || o.sessions.is_empty()),
        "{queue:?}"
    );

    // A submit stream for a session that does not exist yet is refused at once: it cannot
    // lie in wait for the next session someone else creates.
    let (_ep, connection) = cluster.raw_connection(None).await;
    let (reply, _, _) = say_hello(&connection, &hello(Role::Client, Some(bob_token))).await;
    assert!(matches!(reply, HelloReply::Welcome { .. }), "{reply:?}");
    let (send, recv) = connection.open_bi().await.unwrap();
    let mut writer = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
    let mut reader = FrameReader::new(recv, limits::FRAME_BYTES_MAX);
    let next = flame_protocol::SessionId(id.0 + 1);
    writer
        .write(&ClientRequest::OpenSubmitStream { session: next })
        .await
        .unwrap();
    match reader.read_required::<ClientResponse>().await.unwrap() {
        ClientResponse::Error(e) => {
            assert_eq!(e.kind, ErrorKind::NotFound, "{e}");
            assert!(e.message.contains("does not exist"), "{e}");
        }
        other => panic!("a submit stream for no session was opened: {other:?}"),
    }

    // Alice can, and an admin can.
    alice.get_session(id).await.unwrap();
    let admin = cluster.client().await;
    assert_eq!(admin.list_sessions().await.unwrap().len(), 1);
    admin.cancel_session(id).await.unwrap();

    // Registering an application is for admins.
    let spec = ApplicationSpec::new("bobs-app", "/bin/true");
    let e = bob.register_application(spec.clone()).await.unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::PermissionDenied), "{e}");
    assert!(e.to_string().contains("for admins"), "{e}");
    assert!(e.to_string().contains("user `bob` is not an admin"), "{e}");
    let e = bob.drain_node("node-0").await.unwrap_err();
    assert_eq!(e.kind(), Some(ErrorKind::PermissionDenied), "{e}");
    admin.register_application(spec).await.unwrap();
}

/// A hello in the shape of protocol version 2, which had no token field.
#[derive(Serialize)]
struct HelloV2 {
    protocol_version: u32,
    role: Role,
    agent: String,
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_of_another_protocol_version_is_told_so() {
    let cluster = Cluster::start(head_only()).await;
    for (version, hello) in [
        (2, postcard_hello_v2(2)),
        (
            PROTOCOL_VERSION + 1,
            postcard_hello_v2(PROTOCOL_VERSION + 1),
        ),
    ] {
        let (_ep, connection) = cluster.raw_connection(None).await;
        let (reply, _, _) = say_hello(&connection, &hello).await;
        let reason = refusal(reply);
        assert!(
            reason.contains(&format!("protocol version {version} is not supported")),
            "{reason}"
        );
        assert!(
            reason.contains(&format!("speaks version {PROTOCOL_VERSION}")),
            "{reason}"
        );
    }
}

fn postcard_hello_v2(version: u32) -> HelloV2 {
    HelloV2 {
        protocol_version: version,
        role: Role::Client,
        agent: "flame 0.0.1".into(),
    }
}
