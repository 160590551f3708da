//! Credentials can be withdrawn: revoked user, admin and node certificates are refused,
//! with the reason, and the connections made with them are closed at once; a join token is
//! single-use unless made with `--uses`, and a used-up one is refused saying so; a join
//! cannot take an existing node's name (connected or not) unless its token was made with
//! `--replace NAME`, which shuts the replaced node out. Revocations survive a restart.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_client::{Client, ClientConfig};
use flame_protocol::auth::{CertTarget, JoinReply, JoinRequest, Secret};
use flame_protocol::endpoint;
use flame_protocol::frame::{FrameReader, FrameWriter};
use flame_protocol::messages::{ClientRequest, ClientResponse, Hello, HelloReply, Role};
use flame_protocol::model::ErrorKind;
use flame_protocol::{limits, PROTOCOL_VERSION};
use flame_tests::cluster::{say_hello, Cluster, ClusterOptions};
use std::path::Path;
use std::time::Duration;

/// Bound on a closed connection being noticed by its client.
const CLOSE_NOTICED_MAX: Duration = Duration::from_secs(10);

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

/// `flame-head user-cert NAME [--admin] --out DIR`; returns the serial it printed.
async fn user_cert(cluster: &Cluster, name: &str, admin: bool, out: &Path) -> String {
    let out_dir = out.display().to_string();
    let mut args = vec!["user-cert", name, "--out", out_dir.as_str()];
    if admin {
        args.push("--admin");
    }
    let printed = cluster.head_command(&args).await;
    printed.assert_success();
    assert!(printed.stdout.contains("valid 30 days"), "{printed}");
    printed
        .stdout
        .split("serial ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("user-cert printed no serial:\n{printed}"))
        .to_string()
}

fn cert_config(cluster: &Cluster, dir: &Path, name: &str) -> ClientConfig {
    ClientConfig::new(cluster.head_addr(), cluster.ca_file()).with_identity(
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    )
}

/// The certificate of a connection the head closed no longer answers requests.
async fn assert_closed(client: &Client, who: &str) {
    let closed = tokio::time::timeout(CLOSE_NOTICED_MAX, client.list_nodes()).await;
    assert!(
        matches!(closed, Ok(Err(_))),
        "{who}'s connection still works after its certificate was revoked: {closed:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn revoked_user_and_admin_certificates_are_refused_and_disconnected() {
    let mut cluster = Cluster::start(ClusterOptions {
        nodes: 0,
        ..ClusterOptions::default()
    })
    .await;
    let certs = tempfile::tempdir().unwrap();
    let alice_serial = user_cert(&cluster, "alice", false, certs.path()).await;
    let _ops_serial = user_cert(&cluster, "ops", true, certs.path()).await;
    let alice = Client::connect(&cert_config(&cluster, certs.path(), "alice"))
        .await
        .unwrap();
    assert_eq!(alice.whoami().await.unwrap().name, "alice");
    let ops = Client::connect(&cert_config(&cluster, certs.path(), "ops"))
        .await
        .unwrap();
    assert!(ops.whoami().await.unwrap().admin);

    // A user may neither revoke certificates nor list them.
    let bob = cluster.user_token("bob", false).await;
    for request in [
        ClientRequest::RevokeCert {
            target: CertTarget::Serial(alice_serial.clone()),
        },
        ClientRequest::ListCerts,
    ] {
        let (_ep, connection) = cluster.raw_connection(None).await;
        let (reply, _, _) = say_hello(&connection, &hello(Role::Client, Some(bob.clone()))).await;
        assert!(matches!(reply, HelloReply::Welcome { .. }), "{reply:?}");
        let (send, recv) = connection.open_bi().await.unwrap();
        let mut writer = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
        let mut reader = FrameReader::new(recv, limits::FRAME_BYTES_MAX);
        writer.write(&request).await.unwrap();
        match reader.read_required::<ClientResponse>().await.unwrap() {
            ClientResponse::Error(e) => {
                assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e}");
                assert!(
                    e.message.contains("managing certificates is for admins"),
                    "{e}"
                );
            }
            other => panic!("a user managed certificates: {other:?}"),
        }
    }
    assert_eq!(alice.whoami().await.unwrap().name, "alice");

    // By serial number, written as openssl does (upper case, colons).
    let openssl_style: String = alice_serial
        .to_ascii_uppercase()
        .as_bytes()
        .chunks(2)
        .map(|pair| String::from_utf8_lossy(pair).into_owned())
        .collect::<Vec<_>>()
        .join(":");
    cluster
        .head_command(&["cert", "revoke", &openssl_style])
        .await
        .assert_success();
    assert_closed(&alice, "alice").await;
    let reason = connect_error(&cert_config(&cluster, certs.path(), "alice")).await;
    assert!(
        reason.contains(&format!("serial {alice_serial} has been revoked")),
        "{reason}"
    );
    // The admin still works.
    ops.list_nodes().await.unwrap();

    // An admin certificate, by its file.
    let ops_file = certs.path().join("ops.crt").display().to_string();
    cluster
        .head_command(&["cert", "revoke", "--file", &ops_file])
        .await
        .assert_success();
    assert_closed(&ops, "ops").await;
    let reason = connect_error(&cert_config(&cluster, certs.path(), "ops")).await;
    assert!(reason.contains("has been revoked"), "{reason}");

    // Nonsense is refused with the reason, and nothing is listed for it.
    let out = cluster.head_command(&["cert", "revoke", "not-hex"]).await;
    out.assert_failure();
    assert!(out.stderr.contains("is not a serial number"), "{out}");
    let listed = cluster.head_command(&["cert", "list", "--json"]).await;
    listed.assert_success();
    assert_eq!(listed.stdout.lines().count(), 2, "{listed}");
    assert!(listed.stdout.contains("admin ops"), "{listed}");

    // A new certificate for alice works; the revocations survive a restart.
    let fresh = tempfile::tempdir().unwrap();
    user_cert(&cluster, "alice", false, fresh.path()).await;
    cluster.stop_head().await;
    cluster.start_head_again().await;
    let reason = connect_error(&cert_config(&cluster, certs.path(), "alice")).await;
    assert!(reason.contains("has been revoked"), "{reason}");
    let reason = connect_error(&cert_config(&cluster, certs.path(), "ops")).await;
    assert!(reason.contains("has been revoked"), "{reason}");
    let alice = Client::connect(&cert_config(&cluster, fresh.path(), "alice"))
        .await
        .unwrap();
    assert_eq!(alice.whoami().await.unwrap().name, "alice");
}

/// Joins as `name` with `token` by hand; the certificate signed and its key, or the
/// reason for the refusal.
async fn join(cluster: &Cluster, token: Secret, name: &str) -> Result<(String, Secret), String> {
    let (_ep, connection) = cluster.raw_connection(None).await;
    let (reply, mut writer, mut reader) =
        say_hello(&connection, &hello(Role::Join, Some(token))).await;
    if let HelloReply::Refused { reason } = reply {
        return Err(reason);
    }
    let (csr_pem, key) = flame_protocol::pki::node_csr(name).unwrap();
    writer
        .write(&JoinRequest {
            name: name.into(),
            csr_pem,
        })
        .await
        .unwrap();
    match reader.read_required::<JoinReply>().await.unwrap() {
        JoinReply::Signed { cert_pem, .. } => Ok((cert_pem, key)),
        JoinReply::Refused { reason } => Err(reason),
    }
}

/// A new node join token made with `args` added to `token create --node`.
async fn join_token(cluster: &Cluster, args: &[&str]) -> Secret {
    let mut all = vec!["token", "create", "--node"];
    all.extend_from_slice(args);
    let out = cluster.head_command(&all).await;
    out.assert_success();
    Secret::new(out.stdout.trim())
}

/// The hello answer to a node presenting the certificate `cert` with its key `key`.
async fn node_hello(cluster: &Cluster, cert: &Path, key: &Path) -> HelloReply {
    let identity = endpoint::load_identity(cert, key).unwrap();
    let (_ep, connection) = cluster.raw_connection(Some(identity)).await;
    let (reply, _, _) = say_hello(&connection, &hello(Role::Node, None)).await;
    reply
}

#[tokio::test(flavor = "multi_thread")]
async fn join_tokens_are_single_use_and_node_names_need_replace() {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let node0_cert = cluster.node_tls_dir(0).join("node.crt");
    let node0_key = cluster.node_tls_dir(0).join("node.key");

    // Single use by default.
    let once = join_token(&cluster, &[]).await;
    join(&cluster, once.clone(), "fresh-1").await.unwrap();
    let reason = join(&cluster, once, "fresh-2").await.unwrap_err();
    assert!(reason.contains("has been used up"), "{reason}");
    assert!(reason.contains("--uses"), "{reason}");
    let listed = cluster.head_command(&["token", "list"]).await;
    assert!(listed.stdout.contains("used up"), "{listed}");

    // --uses 2 admits two joins. A join refused for its name spends no use.
    let twice = join_token(&cluster, &["--uses", "2"]).await;
    let reason = join(&cluster, twice.clone(), "node-0").await.unwrap_err();
    assert!(reason.contains("`node-0` exists already"), "{reason}");
    assert!(reason.contains("--replace node-0"), "{reason}");
    // Not even once the node is gone: a disconnected node keeps its name.
    cluster.kill_node(0).await;
    let reason = join(&cluster, twice.clone(), "node-0").await.unwrap_err();
    assert!(reason.contains("exists already"), "{reason}");
    let reason = join(&cluster, twice.clone(), "fresh-1").await.unwrap_err();
    assert!(reason.contains("exists already"), "{reason}");
    join(&cluster, twice.clone(), "fresh-2").await.unwrap();
    join(&cluster, twice.clone(), "fresh-3").await.unwrap();
    let reason = join(&cluster, twice, "fresh-4").await.unwrap_err();
    assert!(reason.contains("used up"), "{reason}");

    // node-0's certificate still connects until a --replace join takes its name.
    assert!(matches!(
        node_hello(&cluster, &node0_cert, &node0_key).await,
        HelloReply::Welcome { .. }
    ));
    let replace = join_token(&cluster, &["--replace", "node-0"]).await;
    let joined = join(&cluster, replace, "node-0").await.unwrap();
    let reply = node_hello(&cluster, &node0_cert, &node0_key).await;
    match reply {
        HelloReply::Refused { reason } => {
            assert!(reason.contains("replaced by a later join"), "{reason}")
        }
        HelloReply::Welcome { .. } => panic!("a replaced node's certificate still connects"),
    }
    // The replacement's certificate connects.
    let dir = tempfile::tempdir().unwrap();
    let (cert_pem, key_pem) = joined;
    std::fs::write(dir.path().join("node.crt"), cert_pem).unwrap();
    std::fs::write(dir.path().join("node.key"), key_pem.expose()).unwrap();
    let (new_cert, new_key) = (dir.path().join("node.crt"), dir.path().join("node.key"));
    assert!(matches!(
        node_hello(&cluster, &new_cert, &new_key).await,
        HelloReply::Welcome { .. }
    ));

    // Revoking the node shuts every certificate of it out, across a restart, until a
    // --replace join gives it a new one.
    cluster
        .head_command(&["cert", "revoke", "--node", "node-0"])
        .await
        .assert_success();
    cluster.stop_head().await;
    cluster.start_head_again().await;
    match node_hello(&cluster, &new_cert, &new_key).await {
        HelloReply::Refused { reason } => {
            assert!(reason.contains("`node-0` have been revoked"), "{reason}");
            assert!(reason.contains("--replace node-0"), "{reason}");
        }
        HelloReply::Welcome { .. } => panic!("a revoked node's certificate still connects"),
    }
    let out = cluster
        .head_command(&["cert", "revoke", "--node", "never-joined"])
        .await;
    out.assert_failure();
    assert!(out.stderr.contains("no node `never-joined`"), "{out}");
    let listed = cluster.head_command(&["cert", "list"]).await;
    assert!(listed.stdout.contains("node-0"), "{listed}");
    assert!(listed.stdout.contains("revoked since"), "{listed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn revoking_a_connected_node_closes_its_connection() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    cluster
        .wait_node_state(
            0,
            flame_protocol::model::NodeState::Ready,
            Duration::from_secs(30),
        )
        .await;
    cluster
        .head_command(&["cert", "revoke", "--node", "node-0"])
        .await
        .assert_success();
    // The head closed its connection, and refuses the certificate from then on.
    cluster
        .wait_nodes("node-0 lost", Duration::from_secs(30), |nodes| {
            nodes
                .iter()
                .any(|n| n.name == "node-0" && n.state != flame_protocol::model::NodeState::Ready)
        })
        .await;
    let tls = cluster.node_tls_dir(0);
    match node_hello(&cluster, &tls.join("node.crt"), &tls.join("node.key")).await {
        HelloReply::Refused { reason } => {
            assert!(reason.contains("`node-0` have been revoked"), "{reason}")
        }
        HelloReply::Welcome { .. } => panic!("a revoked node's certificate still connects"),
    }
}
