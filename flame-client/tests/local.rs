//! `LocalCluster` against stand-in binaries: shell scripts that do what the real
//! `flame-head` and `flame-node` do for it (`init`, `token create --node`, `join`) and print
//! the ready lines they print.

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

/// The admin token the stand-in `flame-head init` writes (valid in form only).
const ADMIN_TOKEN: &str = "flame1.0101010101010101.\
    0101010101010101010101010101010101010101010101010101010101010101.\
    5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c";

/// The join token the stand-in `flame-head token create --node` prints.
const JOIN_TOKEN: &str = "flame1.0202020202020202.\
    0202020202020202020202020202020202020202020202020202020202020202.\
    5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c5c";

/// What a stand-in head does for the one-shot commands, with the data folder (`--data-dir`,
/// its second argument) in `$D`: `init` makes the CA file and the admin token, `token
/// create --node` prints a join token. Anything else falls through to the script's rest.
fn head_commands() -> String {
    format!(
        r#"D="$2"
case "$5" in
init)
    [ -f "$D/tls/ca.crt" ] && {{ echo "already initialised" >&2; exit 5; }}
    mkdir -p "$D/tls" && echo cert > "$D/tls/ca.crt"
    (umask 077; echo "{ADMIN_TOKEN}" > "$D/admin.token")
    echo "initialised"; exit 0;;
token)
    [ "$6 $7" = "create --node" ] || {{ echo "bad token command $6 $7" >&2; exit 9; }}
    echo "{JOIN_TOKEN}"; exit 0;;
esac
"#
    )
}

/// A head that does `init` and `token create`, and otherwise records its pid, says it
/// listens, and waits to be stopped.
fn head() -> String {
    head_commands()
        + r#"echo $$ > "$D/head.pid"
echo "head starting" >&2
echo "flame-head listening on 0.0.0.0:7470"
exec sleep 600
"#
}

/// What a stand-in node does for `flame-node join --token-file F --head ADDR --name N
/// --tls-dir DIR`: checks the token and makes its certificate in `DIR`.
fn node_join() -> String {
    format!(
        r#"if [ "$1" = join ]; then
    [ "$(cat "$3")" = "{JOIN_TOKEN}" ] || {{ echo "wrong join token" >&2; exit 9; }}
    mkdir -p "$9" && echo crt > "$9/node.crt"; exit 0
fi
"#
    )
}

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
    script(bin.path(), "flame-head", &head());
    // The node checks that it was given the head's address, the CA file and its
    // certificate from `join` before it says so.
    script(
        bin.path(),
        "flame-node",
        &(node_join()
            + r#"[ "$2" = "127.0.0.1:7470" ] || { echo "bad --head $2" >&2; exit 9; }
[ -f "$4" ] || { echo "no CA file $4" >&2; exit 9; }
[ "$7" = "--tls-dir" ] && [ -f "$8/node.crt" ] || { echo "no node certificate" >&2; exit 9; }
echo "flame-node registered as $6"
exec sleep 600
"#),
    );
    let cluster = LocalCluster::start(options(bin.path(), data.path()))
        .await
        .unwrap();
    // The head listened on the unspecified address; clients reach it through loopback.
    assert_eq!(cluster.head_addr(), "127.0.0.1:7470");
    assert_eq!(cluster.ca_file(), data.path().join("tls/ca.crt"));
    assert_eq!(cluster.token_file(), data.path().join("admin.token"));
    assert_eq!(cluster.token().expose(), ADMIN_TOKEN);
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

/// `node_cpus` reaches the node as `--cpus`; the pids and node name are the children's.
#[tokio::test]
async fn node_cpus_pids_and_name() {
    let bin = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    script(bin.path(), "flame-head", &head());
    script(
        bin.path(),
        "flame-node",
        &(node_join()
            + r#"echo $$ > "$(dirname "$4")/../node.pid"
echo "$@" > "$(dirname "$4")/../node.args"
echo "flame-node registered as $6"
exec sleep 600
"#),
    );
    let cluster = LocalCluster::start(LocalOptions {
        node_cpus: Some(3),
        ..options(bin.path(), data.path())
    })
    .await
    .unwrap();
    let pid = |name: &str| -> u32 {
        std::fs::read_to_string(data.path().join(name))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(cluster.head_pid(), Some(pid("head.pid")));
    assert_eq!(cluster.node_pid(), Some(pid("node.pid")));
    assert_eq!(cluster.node_name(), "local");
    let args = std::fs::read_to_string(data.path().join("node.args")).unwrap();
    assert!(args.contains(" --cpus 3"), "{args}");
    cluster.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_node_that_exits_early_is_reported_and_the_head_is_stopped() {
    let bin = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    script(bin.path(), "flame-head", &head());
    // It joins, then fails to start.
    script(
        bin.path(),
        "flame-node",
        &(node_join() + "echo 'cannot reach the head' >&2\nexit 4\n"),
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
    // `init` works; the head itself never says it listens.
    script(
        bin.path(),
        "flame-head",
        &(head_commands() + "echo 'still thinking' >&2\nexec sleep 600\n"),
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
    script(bin.path(), "flame-head", &head());
    script(
        bin.path(),
        "flame-node",
        &(node_join() + "echo \"flame-node registered as $6\"\nexec sleep 600\n"),
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
    assert!(dir.join("tls/ca.crt").is_file());
    assert!(dir.join("admin.token").is_file());
    assert!(dir.join("node/tls/node.crt").is_file());
    cluster.shutdown().await.unwrap();
    assert!(!dir.exists());
}
