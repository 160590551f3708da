//! The head's disk fills mid-session (issue 18, done-when 1). Its data directory is moved
//! onto a small tmpfs, a session runs tasks, and a filler file takes every free byte. Then:
//! a client's write is refused naming the disk within [`DISK_NAMED_WITHIN`]; the head's log
//! grows by a few lines a second at most while the fault lasts (no re-run loop); nothing is
//! shown that was not committed (no result reaches the watcher, the session is not shown
//! Finished, a close is refused and the session stays Open). Once the filler is deleted the
//! head recovers by itself within [`RECOVERY_WITHIN`], without a restart: the refused
//! inputs are submitted again to the same session, and every task ends once, correct, the
//! tasks that were running with their first attempt's result.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_client::ClientError;
use flame_protocol::model::{ApplicationSpec, SessionSpec, SessionState, TaskOutcome, TaskResult};
use flame_protocol::TaskId;
use flame_tests::{prerequisites, procfs, Cluster, ClusterOptions};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Size of the tmpfs that holds the head's data directory.
const TMPFS_SIZE: &str = "32m";
/// Tasks running when the disk fills: each sleeps [`TASK_SLEEP`] s, two at a time.
const RUNNING_TASKS: usize = 12;
const TASK_SLEEP: &str = "0.4";
/// Inputs submitted while the disk is full (each [`BIG_INPUT_BYTES`]): more than the
/// state file's free pages can take, so the commit must grow the file.
const BIG_INPUTS: usize = 40;
const BIG_INPUT_BYTES: usize = 64 * 1024;
/// A client's write is refused with the disk's name within this after the disk fills.
const DISK_NAMED_WITHIN: Duration = Duration::from_secs(10);
/// How long the disk stays full once the head has said so.
const FAULT_HOLD: Duration = Duration::from_secs(8);
/// The head's log may grow by this many lines per second of fault, plus [`LOG_LINES_SLACK`]
/// (the fault's first report and the client requests it refused).
const LOG_LINES_PER_SEC_MAX: u64 = 3;
const LOG_LINES_SLACK: u64 = 20;
/// The head's CPU use while the fault lasts, in percent of one core, at most: a head that
/// re-ran tasks in a loop used about 40 %, an idle one about 1 %.
const FAULT_CPU_PERCENT_MAX: u64 = 20;
/// After the filler is deleted, the head takes writes again within this (its probe backs
/// off to 5 s at most).
const RECOVERY_WITHIN: Duration = Duration::from_secs(30);
/// Bound on the first results, and on the session finishing after recovery.
const RESULTS_WITHIN: Duration = Duration::from_secs(60);
/// Pause between two tries of a request that waits for a state.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// The tmpfs under the head's data directory; unmounted (lazily, so a head still holding
/// files cannot stop it) when dropped, on success and on panic alike.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path) -> Tmpfs {
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={TMPFS_SIZE},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .status()
            .expect("cannot run mount");
        assert!(
            status.success(),
            "mounting a tmpfs on {} failed",
            path.display()
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

fn sleepy_app() -> ApplicationSpec {
    ApplicationSpec {
        delay_release_ms: 60_000,
        ..flame_tests::results::crashy_service("sleepy")
    }
}

/// Fills the file system of `dir` with `dir/filler` until no byte is left.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).expect("cannot create the filler");
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => panic!("filling {} failed: {e}", path.display()),
        }
    }
    // The last partial block.
    for _ in 0..64 {
        if file.write(&[0u8; 512]).is_err() {
            break;
        }
    }
    path
}

fn log_lines(path: &Path) -> u64 {
    std::fs::read(path)
        .map(|b| b.iter().filter(|&&c| c == b'\n').count() as u64)
        .unwrap_or(0)
}

fn reversed(input: &Bytes) -> Bytes {
    input.iter().rev().copied().collect::<Vec<u8>>().into()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_refuses_writes_at_once_then_recovers_without_a_restart() {
    let test = "disk_full";
    if !prerequisites::root(test) || !prerequisites::python3(test) {
        return;
    }
    if !prerequisites::on_path(test, "mount", "mount") {
        return;
    }
    let mut cluster = Cluster::start(ClusterOptions::default().cpus(2)).await;
    // Move the head's data directory onto a small tmpfs: stop the head, mount, copy back.
    cluster.kill_head().await;
    let data = cluster.data_dir();
    let aside = cluster.dir().join("head.aside");
    std::fs::rename(&data, &aside).unwrap();
    std::fs::create_dir(&data).unwrap();
    let tmpfs = Tmpfs::mount(&data);
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(aside.join("."))
        .arg(&data)
        .status()
        .unwrap();
    assert!(copied.success(), "copying the data directory failed");
    cluster.start_head_again().await;
    let head_log = cluster.dir().join("head.log");

    let client = cluster.client().await;
    client.register_application(sleepy_app()).await.unwrap();
    let session = client
        .create_session(SessionSpec::new("sleepy"))
        .await
        .unwrap();
    let mut watch = session.watch().await.unwrap();
    let mut inputs: HashMap<TaskId, Bytes> = HashMap::new();
    let running: Vec<Bytes> = (0..RUNNING_TASKS)
        .map(|i| Bytes::from(format!("sleep:{TASK_SLEEP}{i:04}")))
        .collect();
    let ids = session.submit(running.clone()).await.unwrap();
    inputs.extend(ids.iter().copied().zip(running));
    let running_ids = ids;

    // Results flow: wait for the first one, then fill the disk.
    let mut results: Vec<(Instant, TaskResult)> = Vec::new();
    let first = tokio::time::timeout(RESULTS_WITHIN, watch.next())
        .await
        .expect("no first result")
        .expect("the watch ended")
        .expect("watching failed");
    results.extend(first.into_iter().map(|r| (Instant::now(), r)));
    let filler = fill(&data);
    let filled_at = Instant::now();

    // A write that must grow the state file is refused, naming the disk.
    let big: Vec<Bytes> = (0..BIG_INPUTS)
        .map(|i| {
            let mut b = format!("big{i:04}").into_bytes();
            b.resize(BIG_INPUT_BYTES, b'a' + (i % 26) as u8);
            Bytes::from(b)
        })
        .collect();
    let refused = loop {
        match session.submit(big.clone()).await {
            Err(e @ ClientError::BatchRejected { .. }) => break e,
            Err(e) => panic!("unexpected error while the disk fills: {e}"),
            Ok(ids) => inputs.extend(ids.into_iter().zip(big.iter().cloned())),
        }
        assert!(
            filled_at.elapsed() < DISK_NAMED_WITHIN,
            "no write was refused within {DISK_NAMED_WITHIN:?} of the disk filling\n{}",
            cluster.logs()
        );
        tokio::time::sleep(RETRY_PAUSE).await;
    };
    let message = refused.to_string();
    assert!(
        message.contains("disk is full") && message.contains(&data.display().to_string()),
        "the refusal does not name the disk and its directory: {message}"
    );
    let named_after = filled_at.elapsed();
    assert!(named_after < DISK_NAMED_WITHIN);

    // The fault lasts: measure the log, and see that nothing new is shown.
    let lines_before = log_lines(&head_log);
    let head_pid = cluster.head_pid();
    let cpu_before = procfs::cpu_ticks(head_pid).expect("the head's /proc/PID/stat");
    let fault_start = Instant::now();
    let shown_before = drain_ready(&mut watch, &mut results).await;
    // The CLI says what is wrong and what to do, and fails; the close is not made.
    let close = cluster
        .flame(&["session", "close", &session.id().to_string()])
        .await;
    assert!(
        !close.status.success(),
        "a close succeeded on a full disk: {close:?}"
    );
    assert!(
        close.stderr.contains("disk is full") && close.stderr.contains("hint:"),
        "the CLI does not name the disk with a hint: {}",
        close.stderr
    );
    tokio::time::sleep(FAULT_HOLD).await;
    let shown_during = drain_ready(&mut watch, &mut results).await;
    assert_eq!(
        shown_during, 0,
        "{shown_during} results were shown while no commit could succeed ({shown_before} came just before)\n{}",
        cluster.logs()
    );
    let info = session.info().await.unwrap();
    assert_eq!(
        info.state,
        SessionState::Open,
        "a close that was refused shows: {info:?}"
    );
    let cpu_ticks = procfs::cpu_ticks(head_pid)
        .expect("the head's /proc/PID/stat")
        .saturating_sub(cpu_before);
    let held_ms = fault_start.elapsed().as_millis() as u64;
    let cpu_percent = cpu_ticks * 1000 / procfs::USER_HZ * 100 / held_ms.max(1);
    assert!(
        cpu_percent <= FAULT_CPU_PERCENT_MAX,
        "the head used {cpu_percent}% of a core while its disk was full (at most {FAULT_CPU_PERCENT_MAX}%)\n{}",
        cluster.logs()
    );
    let grown = log_lines(&head_log).saturating_sub(lines_before);
    let allowed = LOG_LINES_PER_SEC_MAX * fault_start.elapsed().as_secs() + LOG_LINES_SLACK;
    assert!(
        grown <= allowed,
        "the head's log grew by {grown} lines in {:?} of fault (at most {allowed})\n{}",
        fault_start.elapsed(),
        cluster.logs()
    );
    let log = std::fs::read_to_string(&head_log).unwrap_or_default();
    assert!(
        log.contains("storage fault"),
        "the fault was not logged\n{}",
        cluster.logs()
    );

    // Space comes back: the head takes writes again by itself, and the refused inputs go
    // to the same session.
    std::fs::remove_file(&filler).unwrap();
    let freed_at = Instant::now();
    let ids = loop {
        match session.submit(big.clone()).await {
            Ok(ids) => break ids,
            Err(e) => assert!(
                freed_at.elapsed() < RECOVERY_WITHIN,
                "the head did not take writes within {RECOVERY_WITHIN:?} of space returning: {e}\n{}",
                cluster.logs()
            ),
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    };
    let recovered_after = freed_at.elapsed();
    inputs.extend(ids.into_iter().zip(big.iter().cloned()));
    session.close().await.unwrap();
    loop {
        match tokio::time::timeout(RESULTS_WITHIN, watch.next()).await {
            Err(_) => panic!("no result for {RESULTS_WITHIN:?}\n{}", cluster.logs()),
            Ok(None) => break,
            Ok(Some(batch)) => {
                let batch = batch.expect("watching failed");
                results.extend(batch.into_iter().map(|r| (Instant::now(), r)));
            }
        }
    }
    assert!(
        watch.is_finished(),
        "the watch ended before the session finished"
    );

    // Every task once, correct; the running ones kept their first attempt.
    let mut seen: HashMap<TaskId, TaskResult> = HashMap::new();
    for (_, r) in results {
        let task = r.task;
        assert!(seen.insert(task, r).is_none(), "task {task} shown twice");
    }
    assert_eq!(
        seen.len(),
        inputs.len(),
        "results for {} of {} tasks",
        seen.len(),
        inputs.len()
    );
    for (task, input) in &inputs {
        let r = &seen[task];
        assert_eq!(
            r.outcome,
            TaskOutcome::Succeeded(reversed(input)),
            "task {task} has a wrong result"
        );
    }
    for task in &running_ids {
        assert_eq!(seen[task].attempt, 1, "task {task} was run again");
    }
    eprintln!(
        "disk_full: the disk was named {named_after:?} after it filled; the head's log grew \
         {grown} lines and the head used {cpu_percent}% of a core in {:?} of fault; writes were taken again {recovered_after:?} after \
         space returned; {} tasks, each once",
        FAULT_HOLD,
        seen.len()
    );
    drop(tmpfs);
    drop(cluster);
}

/// Takes the results already waiting on the stream (without waiting for more than a
/// moment); returns how many.
async fn drain_ready(
    watch: &mut flame_client::ResultStream,
    results: &mut Vec<(Instant, TaskResult)>,
) -> usize {
    let mut n = 0;
    while let Ok(Some(batch)) = tokio::time::timeout(Duration::from_millis(300), watch.next()).await
    {
        let batch = batch.expect("watching failed");
        n += batch.len();
        results.extend(batch.into_iter().map(|r| (Instant::now(), r)));
    }
    n
}
