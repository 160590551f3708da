//! Bad input from clients: each is refused with a clear error (and a non-zero exit for the
//! CLI), and nothing is created or lost because of it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_protocol::frame::{FrameReader, FrameWriter};
use flame_protocol::limits;
use flame_protocol::messages::{Hello, HelloReply, Role};
use flame_protocol::model::{ApplicationSpec, ErrorKind, SessionSpec, ShimKind};
use flame_protocol::PROTOCOL_VERSION;
use flame_tests::cluster::say_hello;
use flame_tests::command::COMMAND_TIMEOUT;
use flame_tests::results::{ping_session_id, ping_spec};
use flame_tests::{binary, run_command, Cluster, ClusterOptions};
use serde_json::Value;
use std::time::Duration;

/// A head alone: these tests need no node.
fn head_only() -> ClusterOptions {
    ClusterOptions::default().nodes(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_application_is_not_found() {
    let cluster = Cluster::start(head_only()).await;
    let client = cluster.client().await;
    let err = client
        .create_session(SessionSpec::new("nope"))
        .await
        .expect_err("a session of an unknown application was created");
    assert_eq!(err.kind(), Some(ErrorKind::NotFound), "{err}");
    assert!(err.to_string().contains("nope"), "{err}");
    assert!(client.list_sessions().await.unwrap().is_empty());
    client.close().await;
}

/// The names in `flame app list --output json`.
async fn app_names(cluster: &Cluster) -> Vec<String> {
    let out = cluster.flame(&["app", "list", "--output", "json"]).await;
    out.assert_success();
    let apps: Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"));
    let mut names: Vec<String> = apps
        .as_array()
        .unwrap_or_else(|| panic!("not an array:\n{out}"))
        .iter()
        .map(|a| {
            a["spec"]["name"]
                .as_str()
                .expect("no spec.name")
                .to_string()
        })
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_application_files_are_refused() {
    let cluster = Cluster::start(head_only()).await;
    let files = tempfile::tempdir().unwrap();
    // (file name, contents, what stderr must name)
    let cases = [
        (
            "missing-command.toml",
            "name = \"bad-missing\"\n",
            "command",
        ),
        (
            "unknown-field.toml",
            "name = \"bad-unknown\"\ncommand = \"/bin/true\"\ncolour = \"red\"\n",
            "colour",
        ),
        (
            "zero-instances.toml",
            "name = \"bad-zero\"\ncommand = \"/bin/true\"\nmax_instances = 0\n",
            "max_instances",
        ),
        (
            "syntax.toml",
            "name = \"bad-syntax\ncommand = \"/bin/true\"\n",
            "line 1",
        ),
    ];
    for (file, text, named) in cases {
        let path = files.path().join(file);
        std::fs::write(&path, text).unwrap();
        let out = cluster
            .flame(&["app", "register", path.to_str().unwrap()])
            .await;
        out.assert_failure();
        assert!(out.stderr.starts_with("error: "), "{out}");
        assert!(
            out.stderr.contains(file),
            "the error does not name the file:\n{out}"
        );
        assert!(
            out.stderr.contains(named),
            "the error does not name `{named}`:\n{out}"
        );
    }
    assert_eq!(app_names(&cluster).await, ["ping", "shell"]);

    // The head checks specs itself too: a client that skips the file checks is refused.
    let client = cluster.client().await;
    let err = client
        .register_application(ApplicationSpec {
            name: "bad-direct".into(),
            shim: ShimKind::Stdio,
            command: "/bin/true".into(),
            args: vec![],
            env: Default::default(),
            working_dir: None,
            user: None,
            group: None,
            users: Vec::new(),
            groups: Vec::new(),
            resources: Default::default(),
            selector: Default::default(),
            max_instances: 0,
            delay_release_ms: 0,
            max_attempts: 3,
            retry_on_error: false,
            task_timeout_ms: None,
            allow_root: true,
        })
        .await
        .expect_err("the head registered max_instances = 0");
    assert_eq!(err.kind(), Some(ErrorKind::InvalidArgument), "{err}");
    assert!(err.to_string().contains("max_instances"), "{err}");
    client.close().await;

    // A good file does register, so the listing above could have shown a bad one.
    let good = files.path().join("good.toml");
    std::fs::write(&good, "name = \"good\"\ncommand = \"/bin/true\"\n").unwrap();
    cluster
        .flame(&["app", "register", good.to_str().unwrap()])
        .await
        .assert_success();
    assert_eq!(app_names(&cluster).await, ["good", "ping", "shell"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_head_fails_fast_naming_the_address() {
    // The head is only here for a valid CA file.
    let cluster = Cluster::start(head_only()).await;
    let port = {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let mut command = flame_tests::cluster::flame_command();
    command
        .arg("--head")
        .arg(&addr)
        .arg("--ca-file")
        .arg(cluster.ca_file())
        .arg("--token-file")
        .arg(cluster.admin_token_file())
        .args(["session", "list"]);
    let out = run_command(command, Duration::from_secs(20)).await;
    out.assert_failure();
    assert!(
        out.stderr.contains(&addr),
        "the error does not name {addr}:\n{out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hello_with_another_version_is_refused() {
    let cluster = Cluster::start(head_only()).await;
    let (_endpoint, connection) = cluster.raw_connection(None).await;
    let (reply, _, _) = say_hello(
        &connection,
        &Hello {
            protocol_version: 999,
            role: Role::Client,
            agent: "flame-tests".into(),
            token: Some(cluster.admin_token()),
        },
    )
    .await;
    match reply {
        HelloReply::Refused { reason } => {
            assert!(reason.contains("version 999"), "{reason}");
            assert!(reason.contains(&PROTOCOL_VERSION.to_string()), "{reason}");
        }
        HelloReply::Welcome { .. } => panic!("the head welcomed protocol version 999"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_frame_closes_that_connection_only() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let bystander = cluster.client().await;

    let (_endpoint, connection) = cluster.raw_connection(None).await;
    let greeted = {
        let (send, recv) = connection.open_bi().await.unwrap();
        let mut writer = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
        let mut reader = FrameReader::new(recv, limits::FRAME_BYTES_MAX);
        writer
            .write(&Hello {
                protocol_version: PROTOCOL_VERSION,
                role: Role::Client,
                agent: "flame-tests".into(),
                token: Some(cluster.admin_token()),
            })
            .await
            .unwrap();
        reader.read_required::<HelloReply>().await.unwrap()
    };
    assert!(matches!(greeted, HelloReply::Welcome { .. }), "{greeted:?}");

    let (mut send, _recv) = connection.open_bi().await.unwrap();
    let len = u32::try_from(limits::FRAME_BYTES_MAX + 1).unwrap();
    send.write_all(&len.to_le_bytes()).await.unwrap();
    send.write_all(&[0u8; 1024]).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), connection.closed())
        .await
        .expect("the head did not close the connection within 10 s");
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason);
            assert!(reason.contains("limit"), "{reason}");
            assert!(
                reason.contains(&limits::FRAME_BYTES_MAX.to_string()),
                "{reason}"
            );
        }
        other => panic!("the connection ended otherwise: {other}"),
    }

    // The head still serves: the client connected before, and a fresh one.
    assert_eq!(bystander.list_nodes().await.unwrap().len(), 1);
    bystander.close().await;
    let out = cluster.flame(&["ping", "-t", "100"]).await;
    out.assert_success();
    assert!(out.stdout.contains("100 tasks completed"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn task_input_over_the_limit_is_refused() {
    let limit = 1024;
    let options = ClusterOptions::default().head_args(["--task-input-bytes-max", "1024"]);
    let cluster = Cluster::start(options).await;
    let client = cluster.client().await;

    let out = cluster.flame(&["ping", "-t", "10", "--size", "2048"]).await;
    out.assert_failure();
    assert!(out.stderr.contains("limit"), "{out}");
    assert!(out.stderr.contains(&limit.to_string()), "{out}");
    let cli_session = ping_session_id(&out.stdout);
    let info = client.get_session(cli_session).await.unwrap();
    assert_eq!(info.counts.total(), 0, "{info:?}");

    let session = client.create_session(ping_spec()).await.unwrap();
    let err = session
        .submit(vec![Bytes::from(vec![b'x'; limit + 1])])
        .await
        .expect_err("an input over the limit was accepted");
    assert_eq!(err.kind(), Some(ErrorKind::LimitExceeded), "{err}");
    assert!(err.to_string().contains(&limit.to_string()), "{err}");
    let info = session.info().await.unwrap();
    assert_eq!(info.counts.total(), 0, "{info:?}");

    // The limit is inclusive, and the refusal did not spoil the session.
    let ids = session
        .submit(vec![Bytes::from(vec![b'y'; limit])])
        .await
        .unwrap();
    assert_eq!(ids.len(), 1);
    assert_eq!(session.info().await.unwrap().counts.total(), 1);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn second_head_on_the_same_data_dir_is_refused() {
    let cluster = Cluster::start(head_only()).await;
    let mut command = tokio::process::Command::new(binary("flame-head"));
    command
        .arg("--data-dir")
        .arg(cluster.data_dir())
        .args(["--listen", "127.0.0.1:0"])
        .env_remove("FLAME_HEAD_CONFIG");
    // A second head that starts would serve until killed: the bound turns that into a
    // failure.
    let out = run_command(command, Duration::from_secs(30).min(COMMAND_TIMEOUT)).await;
    out.assert_failure();
    assert!(out.stderr.contains("in use"), "{out}");
    assert!(
        out.stderr
            .contains(&cluster.data_dir().display().to_string()),
        "{out}"
    );
    // The first head is unharmed.
    let client = cluster.client().await;
    assert_eq!(client.list_applications().await.unwrap().len(), 2);
    client.close().await;
}
