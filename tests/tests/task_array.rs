//! `flame submit --each FILE -- COMMAND`: a command per line, as tasks of one session of the
//! built-in `shell` application, through a real head and node.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_tests::command::{describe, COMMAND_TIMEOUT};
use flame_tests::{procfs, Cluster, ClusterOptions};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt as _;

/// How long a test waits for something it caused (a task starting, a process ending).
const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Pause between two looks at something that gives no event to wait on (files, /proc).
const POLL_PAUSE: Duration = Duration::from_millis(50);

/// Writes `lines` to `name` in `dir`, one per line; returns the path.
fn write_lines(dir: &Path, name: &str, lines: impl IntoIterator<Item = String>) -> PathBuf {
    let path = dir.join(name);
    let mut text = String::new();
    for line in lines {
        text.push_str(&line);
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    path
}

/// Every line runs, gets its line both as `{}` and on stdin, and the outputs come out in
/// input order, exactly, although lines finish out of order on several executors.
#[tokio::test(flavor = "multi_thread")]
async fn every_line_runs_and_prints_in_input_order() {
    let cluster = Cluster::start(ClusterOptions::default().cpus(4)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_lines(dir.path(), "lines", (0..1000).map(|i| i.to_string()));
    let out = cluster
        .flame(&[
            "submit",
            "--each",
            file.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            // Some lines take longer, so that later ones finish first.
            "read -r x; case {} in *7) sleep 0.01;; esac; echo \"out-{}-$x\"",
        ])
        .await;
    out.assert_success();
    let expected: String = (0..1000).map(|i| format!("out-{i}-{i}\n")).collect();
    assert!(
        out.stdout == expected,
        "stdout is not every line in order:\n{out}"
    );
    assert!(out.stderr.is_empty(), "{out}");

    // One session of the shell application, every task succeeded.
    let client = cluster.client().await;
    let sessions = client.list_sessions().await.unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let info = &sessions[0];
    assert_eq!(info.application, "shell", "{info:?}");
    assert!(info.is_finished(), "{info:?}");
    assert_eq!(
        (info.counts.succeeded, info.counts.failed),
        (1000, 0),
        "{info:?}"
    );
    client.close().await;
}

/// Without `{}` the line is the last argument; a command's stderr goes to stderr.
#[tokio::test(flavor = "multi_thread")]
async fn the_line_is_appended_without_a_placeholder() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_lines(dir.path(), "words", ["a b".to_string(), "c".to_string()]);
    let out = cluster
        .flame(&[
            "submit",
            "--each",
            file.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "echo \"[$1]\"; echo \"e[$1]\" >&2",
            "name",
        ])
        .await;
    out.assert_success();
    assert_eq!(out.stdout, "[a b]\n[c]\n", "{out}");
    assert_eq!(out.stderr, "e[a b]\ne[c]\n", "{out}");
}

/// A line whose command exits 3 is reported with its number, its text and the code; the
/// other lines' outputs are all there and the command exits non-zero.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_line_is_named_with_its_exit_code() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_lines(dir.path(), "lines", (1..=20).map(|i| format!("item{i}")));
    let out = cluster
        .flame(&[
            "submit",
            "--each",
            file.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "echo line-{}; [ {} != item7 ] || exit 3",
        ])
        .await;
    out.assert_failure();
    let expected: String = (1..=20).map(|i| format!("line-item{i}\n")).collect();
    assert_eq!(out.stdout, expected, "{out}");
    assert!(
        out.stderr
            .contains("error: line 7 failed with exit code 3: \"item7\""),
        "{out}"
    );
    assert!(out.stderr.contains("1 of 20 lines failed"), "{out}");
    assert_eq!(
        out.stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .count(),
        2,
        "only the failed line and the summary are reported:\n{out}"
    );

    // A command that does not exist fails every line with 127, like a shell.
    let out = cluster
        .flame(&[
            "submit",
            "--each",
            file.to_str().unwrap(),
            "--",
            "flame-no-such-command",
        ])
        .await;
    out.assert_failure();
    assert!(out.stdout.is_empty(), "{out}");
    assert!(
        out.stderr
            .contains("flame-no-such-command: command not found"),
        "{out}"
    );
    assert!(
        out.stderr
            .contains("error: line 1 failed with exit code 127: \"item1\""),
        "{out}"
    );
    assert!(out.stderr.contains("20 of 20 lines failed"), "{out}");
}

/// `-j 2 --unordered`: every output is there, and never more than two lines run at once,
/// although the node could run eight.
#[tokio::test(flavor = "multi_thread")]
async fn jobs_bound_the_lines_running_at_once() {
    let cluster = Cluster::start(ClusterOptions::default().cpus(8)).await;
    let dir = shared_dir();
    let running = dir.path().join("running");
    std::fs::create_dir(&running).unwrap();
    open_to_all(&running);
    let seen = dir.path().join("seen");
    let file = write_lines(dir.path(), "lines", (0..40).map(|i| i.to_string()));
    // Each line marks itself running, records how many are, and unmarks itself.
    let script = format!(
        "touch {r}/{{}}; ls {r} | wc -l >> {s}; sleep 0.05; rm {r}/{{}}; echo u-{{}}",
        r = running.display(),
        s = seen.display()
    );
    let out = cluster
        .flame(&[
            "submit",
            "--each",
            file.to_str().unwrap(),
            "-j",
            "2",
            "--unordered",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .await;
    out.assert_success();
    let got: BTreeSet<&str> = out.stdout.lines().collect();
    let expected: Vec<String> = (0..40).map(|i| format!("u-{i}")).collect();
    let expected: BTreeSet<&str> = expected.iter().map(String::as_str).collect();
    assert_eq!(got, expected, "{out}");
    assert_eq!(out.stdout.lines().count(), 40, "{out}");
    let counts = std::fs::read_to_string(&seen).unwrap();
    let most = counts
        .lines()
        .map(|c| c.trim().parse::<u32>().unwrap())
        .max()
        .unwrap();
    assert!(
        (1..=2).contains(&most),
        "{most} lines ran at once under -j 2"
    );
}

/// Bad input is refused with a clear message and nothing created; an empty file runs
/// nothing and succeeds.
#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_before_anything_runs() {
    let cluster = Cluster::start(ClusterOptions::default().nodes(0)).await;
    let dir = tempfile::tempdir().unwrap();

    let missing = dir.path().join("no-such-file");
    let out = cluster
        .flame(&["submit", "--each", missing.to_str().unwrap(), "--", "echo"])
        .await;
    out.assert_failure();
    assert!(
        out.stderr.starts_with("error: cannot open ")
            && out.stderr.contains(missing.to_str().unwrap()),
        "{out}"
    );
    assert!(out.stdout.is_empty(), "{out}");

    let empty = dir.path().join("empty");
    std::fs::write(&empty, "").unwrap();
    let out = cluster
        .flame(&["submit", "--each", empty.to_str().unwrap(), "--", "echo"])
        .await;
    out.assert_success();
    assert!(out.stdout.is_empty(), "{out}");
    assert!(out.stderr.contains("no lines"), "{out}");

    // The second line is over the task input limit (16 MiB).
    let long = dir.path().join("long");
    let mut text = b"short\n".to_vec();
    text.extend(std::iter::repeat_n(b'x', 16 * 1024 * 1024 + 1));
    text.extend_from_slice(b"\nafter\n");
    std::fs::write(&long, text).unwrap();
    let out = cluster
        .flame(&["submit", "--each", long.to_str().unwrap(), "--", "echo"])
        .await;
    out.assert_failure();
    assert!(out.stderr.contains("line 2 of "), "{out}");
    assert!(out.stderr.contains("longer than"), "{out}");

    let client = cluster.client().await;
    assert!(client.list_sessions().await.unwrap().is_empty());
    client.close().await;
}

/// Ctrl-C cancels the session: the command exits non-zero, the session ends with both lines
/// cancelled, and the running line's process is gone.
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_cancels_the_session_and_its_processes() {
    let cluster = Cluster::start(ClusterOptions::default()).await;
    let dir = shared_dir();
    let started = dir.path().join("started");
    std::fs::create_dir(&started).unwrap();
    open_to_all(&started);
    let file = write_lines(dir.path(), "lines", (1..=2).map(|i| i.to_string()));
    // A sleep whose command line is unique to this test, to find its processes.
    let marker = format!("31415.{}", std::process::id());
    let script = format!("touch {}/{{}}; exec sleep {marker}{{}}", started.display());
    let mut command = flame_tests::cluster::flame_command();
    command
        .arg("--head")
        .arg(cluster.head_addr())
        .arg("--ca-file")
        .arg(cluster.ca_file())
        .arg("--token-file")
        .arg(cluster.admin_token_file())
        .args(["submit", "--each"])
        .arg(&file)
        .args(["--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let line = describe(&command);
    let mut child = command.spawn().unwrap();

    // The sleeps' command lines; flame's own holds `{marker}{}`, not these.
    let sleeps = [format!("sleep {marker}1"), format!("sleep {marker}2")];
    let running = || {
        sleeps
            .iter()
            .map(|s| procfs::with_cmdline_containing(s).len())
            .sum::<usize>()
    };
    // A line runs (the other may wait queued behind it on the same executor).
    wait_for(&cluster, "a line to start", || {
        std::fs::read_dir(&started).unwrap().count() > 0 && running() > 0
    })
    .await;
    let pid = child.id().expect("flame exited early");
    signal::kill(Pid::from_raw(pid as i32), Signal::SIGINT).unwrap();
    let status = tokio::time::timeout(COMMAND_TIMEOUT, child.wait())
        .await
        .unwrap_or_else(|_| panic!("`{line}` did not exit after Ctrl-C"))
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();
    // 130: stopped by Ctrl-C, as a shell reports it, the same for every command.
    assert_eq!(
        status.code(),
        Some(130),
        "`{line}` exited with {status}; stderr:\n{stderr}"
    );
    assert!(stderr.contains("stopped by interrupt"), "{stderr}");
    assert!(stderr.contains("cancelled"), "{stderr}");

    wait_for(&cluster, "the lines' processes to end", || running() == 0).await;
    let client = cluster.client().await;
    let sessions = client.list_sessions().await.unwrap();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let counts = &sessions[0].counts;
    assert_eq!(
        (counts.unfinished(), counts.cancelled),
        (0, 2),
        "{counts:?}"
    );
    client.close().await;
}

/// A folder the lines' commands may write in: they run as the submitter's own uid on the
/// node, not as the user running the tests.
fn shared_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    open_to_all(dir.path());
    dir
}

fn open_to_all(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
}

/// Waits, at most [`EVENT_TIMEOUT`], until `done` holds.
async fn wait_for(cluster: &Cluster, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gave up waiting for {what} after {EVENT_TIMEOUT:?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(POLL_PAUSE).await;
    }
}
