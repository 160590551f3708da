//! `LocalCluster` against stand-in binaries: shell scripts that print the ready lines the
//! real `flame-head` and `flame-node` print.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use flame_client::local::{LocalCluster, LocalError, LocalOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

fn script(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A head that makes its CA file under `--data-dir` (its second argument), records its pid,
/// says it listens, and waits to be stopped.
const HEAD: &str = r#"mkdir -p "$2/tls" && echo cert > "$2/tls/head.crt"
echo $$ > "$2/head.pid"
echo "head starting" >&2
echo "flame-head listening on 0.0.0.0:7470"
exec sleep 600
"#;

fn options(bin: &Path, data: &Path) -> LocalOptions {
    LocalOptions {
        data_dir: Some(data.to_path_buf()),
        bin_dir: Some(bin.to_path_buf()),
        ready_timeout: Duration::from_secs(20),
        stop_grace: Duration::from_secs(5),
        ..LocalOptions::default()
    }
}

fn alive(pid_file: &Path) -> bool {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

#[tokio::test]
async fn starts_reports_and_stops_both_children() {
    let bin = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    script(bin.path(), "flame-head", HEAD);
    // The node checks that it was given the head's address and CA file before it says so.
    script(
        bin.path(),
        "flame-node",
        r#"[ "$2" = "127.0.0.1:7470" ] || { echo "bad --head $2" >&2; exit 9; }
[ -f "$4" ] || { echo "no CA file $4" >&2; exit 9; }
echo "flame-node registered as $6"
exec sleep 600
"#,
    );
    let cluster = LocalCluster::start(options(bin.path(), data.path()))
        .await
        .unwrap();
    // The head listened on the unspecified address; clients reach it through loopback.
    assert_eq!(cluster.head_addr(), "127.0.0.1:7470");
    assert_eq!(cluster.ca_file(), data.path().join("tls/head.crt"));
    assert!(!cluster.is_temporary());
    assert!(cluster
        .exports()
        .starts_with("export FLAME_HEAD=127.0.0.1:7470 FLAME_CA_FILE="));
    assert_eq!(cluster.client_config().head, "127.0.0.1:7470");
    let head_log = std::fs::read_to_string(data.path().join("head.log")).unwrap();
    assert!(head_log.contains("head starting"), "{head_log}");
    let pid_file = data.path().join("head.pid");
    assert!(alive(&pid_file));
    cluster.shutdown().await.unwrap();
    assert!(!alive(&pid_file));
}

#[tokio::test]
async fn a_node_that_exits_early_is_reported_and_the_head_is_stopped() {
    let bin = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    script(bin.path(), "flame-head", HEAD);
    script(
        bin.path(),
        "flame-node",
        "echo 'cannot reach the head' >&2\nexit 4\n",
    );
    let err = LocalCluster::start(options(bin.path(), data.path()))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            LocalError::Exited {
                name: "flame-node",
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains("exit code 4"), "{text}");
    assert!(text.contains("cannot reach the head"), "{text}");
    assert!(!alive(&data.path().join("head.pid")));
}

#[tokio::test]
async fn a_silent_head_times_out() {
    let bin = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    script(
        bin.path(),
        "flame-head",
        "echo 'still thinking' >&2\nexec sleep 600\n",
    );
    script(bin.path(), "flame-node", "exit 0\n");
    let opts = LocalOptions {
        ready_timeout: Duration::from_millis(500),
        ..options(bin.path(), data.path())
    };
    let err = LocalCluster::start(opts).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            LocalError::NotReady {
                name: "flame-head",
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains("still thinking"), "{text}");
}

#[tokio::test]
async fn missing_binaries_are_named() {
    let bin = tempfile::tempdir().unwrap();
    let err = LocalCluster::start(LocalOptions {
        bin_dir: Some(bin.path().to_path_buf()),
        ..LocalOptions::default()
    })
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            LocalError::BinaryNotFound {
                name: "flame-head",
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn a_temporary_data_dir_is_removed_on_drop() {
    let bin = tempfile::tempdir().unwrap();
    script(bin.path(), "flame-head", HEAD);
    script(
        bin.path(),
        "flame-node",
        "echo \"flame-node registered as $6\"\nexec sleep 600\n",
    );
    let cluster = LocalCluster::start(LocalOptions {
        bin_dir: Some(bin.path().to_path_buf()),
        stop_grace: Duration::from_secs(5),
        ..LocalOptions::default()
    })
    .await
    .unwrap();
    assert!(cluster.is_temporary());
    let dir = cluster.data_dir().to_path_buf();
    assert!(dir.join("tls/head.crt").is_file());
    cluster.shutdown().await.unwrap();
    assert!(!dir.exists());
}
