//! `kill -9` of the head at random instants while a session of 50,000 tasks runs, over
//! several seeds and several kills per run. After each restart everything completes: each
//! task has exactly one output, equal to what the application computes for its input, and
//! the client saw each result once. A raw watcher (`flame_tests::recorder`) records every
//! result frame the head sends, across the restarts, without the client library's
//! de-duplication: no stream carries a task twice, and every re-delivery after a re-watch
//! is the same result.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_protocol::model::TaskOutcome;
use flame_protocol::ping::check_reply;
use flame_tests::recorder::ResultRecorder;
use flame_tests::results::{ping_spec, run_tasks};
use flame_tests::{Cluster, ClusterOptions};
use std::time::Duration;

const TASKS: usize = 50_000;
const SEEDS: [u64; 5] = [11, 23, 37, 41, 59];
const KILLS_PER_RUN: usize = 3;
/// Bounds of the pause before each kill, from the start of the run or the last restart.
const KILL_AFTER_MIN_MS: u64 = 30;
const KILL_AFTER_MAX_MS: u64 = 400;
/// Longest a whole run may take, kills and recoveries included.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// SplitMix64: a seeded, reproducible choice of kill instants.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn acked_tasks_survive_head_kills() {
    // FLAME_HEAD_KILL_SEED=N replays one seed.
    let seeds: Vec<u64> = match std::env::var("FLAME_HEAD_KILL_SEED") {
        Ok(seed) => vec![seed.parse().expect("FLAME_HEAD_KILL_SEED is a number")],
        Err(_) => SEEDS.to_vec(),
    };
    for seed in seeds {
        run_seed(seed).await;
    }
}

async fn run_seed(seed: u64) {
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let client = cluster.client().await;
    let session = client.create_session(ping_spec()).await.unwrap();
    let inputs: Vec<Bytes> = (0..TASKS)
        .map(|i| Bytes::from(format!("seed {seed} task {i:06}")))
        .collect();
    let recorder = ResultRecorder::spawn(
        cluster.head_addr().to_string(),
        cluster.ca_file().to_path_buf(),
        cluster.admin_token(),
        session.id(),
        RUN_TIMEOUT,
    );
    let run = tokio::spawn({
        let session = session.clone();
        async move { run_tasks(&session, inputs).await }
    });
    let mut rng = Rng(seed);
    let mut kills = 0;
    for _ in 0..KILLS_PER_RUN {
        // A random instant of the run: the point is where the kill lands, not a wait. A run
        // between restarts takes well under a second (the head acks and finishes tens of
        // thousands of tasks a second), so the instants are drawn from its first 400 ms;
        // drawn from 2.5 s, most runs had ended before the first kill.
        tokio::time::sleep(Duration::from_millis(
            rng.between(KILL_AFTER_MIN_MS, KILL_AFTER_MAX_MS),
        ))
        .await;
        if run.is_finished() {
            break;
        }
        cluster.kill_head().await;
        kills += 1;
        cluster.start_head_again().await;
    }
    let done = match tokio::time::timeout(RUN_TIMEOUT, run).await {
        Ok(Ok(done)) => done,
        Ok(Err(e)) if e.is_panic() => {
            let state = diagnose(&cluster, session.id()).await;
            panic!(
                "seed {seed}: the run failed after {kills} kills: {e}\n{state}\n{}",
                cluster.logs()
            )
        }
        Ok(Err(e)) => panic!(
            "seed {seed}: the run failed after {kills} kills: {e}\n{}",
            cluster.logs()
        ),
        Err(_) => panic!(
            "seed {seed}: the run did not finish within {RUN_TIMEOUT:?} after {kills} kills\n{}",
            cluster.logs()
        ),
    };
    assert_eq!(done.len(), TASKS, "seed {seed}");
    for (input, result) in &done {
        match &result.outcome {
            TaskOutcome::Succeeded(output) => {
                check_reply(input, output)
                    .unwrap_or_else(|e| panic!("seed {seed}, task {}: {e}", result.task));
            }
            other => panic!("seed {seed}, task {} ended as {other:?}", result.task),
        }
    }
    // The head's record agrees: every task once, every one succeeded.
    let client = cluster.client().await;
    let info = client.get_session(session.id()).await.unwrap();
    assert_eq!(info.counts.succeeded, TASKS as u64, "seed {seed}: {info:?}");
    assert_eq!(info.counts.total(), TASKS as u64, "seed {seed}: {info:?}");
    assert!(info.is_finished(), "seed {seed}: {info:?}");
    let recording = recorder.finish().await.unwrap_or_else(|e| {
        panic!(
            "seed {seed}: the result recorder failed: {e}\n{}",
            cluster.logs()
        )
    });
    let summary = recording
        .check()
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    assert_eq!(
        summary.tasks, TASKS,
        "seed {seed}: the recorder saw {summary:?}"
    );
    eprintln!(
        "seed {seed}: {TASKS} tasks, {kills} head kills, every result once; the recorder read \
         {} results in {} frames on {} streams, no task twice on a stream, every re-delivery identical",
        summary.deliveries, summary.frames, summary.streams
    );
}

/// What the head says about a stuck session: its counters and its unfinished tasks.
async fn diagnose(cluster: &Cluster, session: flame_protocol::SessionId) -> String {
    use flame_protocol::model::TaskState;
    let client = cluster.client().await;
    let info = client.get_session(session).await;
    let stuck = client
        .list_tasks(
            session,
            vec![TaskState::Pending, TaskState::Running],
            flame_protocol::TaskId(0),
            20,
        )
        .await;
    let nodes = client.list_nodes().await;
    format!("session: {info:?}\nunfinished tasks (first 20): {stuck:?}\nnodes: {nodes:?}")
}
