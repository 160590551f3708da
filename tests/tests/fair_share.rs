//! Fair share between owners: with weights a=1 and b=3 and four one-cpu executors, two
//! sessions that both always have work, one per owner, hold executors 1:3 and get
//! executor time (`bound_ms` of their usage records) in that ratio; `flame queue` shows the
//! owners with their weights and shares, and each session under its owner.
//!
//! The tasks sleep rather than spin: executor time is then wall time, whatever cpu the
//! machine has, so four executors on a two-core machine share exactly as on a big one.
#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code: a panic is the report.

use flame_client::{Client, Session};
use flame_protocol::model::{ApplicationSpec, SessionInfo, SessionSpec, TaskOutcome};
use flame_tests::results::spawn_collector;
use flame_tests::test_service::{self, wait_no_executors, SESSION_POLL_PAUSE};
use flame_tests::{Cluster, ClusterOptions, CmdOutput};
use serde_json::Value;
use std::time::{Duration, Instant};

const APP: &str = "sleeper";
/// The node's cpus: four executors of one cpu.
const CPUS: u32 = 4;
const WEIGHT_A: u32 = 1;
const WEIGHT_B: u32 = 3;
/// Length of every task.
const TASK_MS: u64 = 100;
/// Tasks per session: far more than run before the sessions are cancelled (owner a alone
/// would need 200 s for its share), so both always have work.
const TASKS: usize = 2_000;
/// Results of both sessions together that the measured run lasts once the shares have
/// settled: about 15 s of four executors.
const WINDOW_TASKS: usize = 600;
/// `delay_release` of the application: short, so that the executors are gone soon after
/// the cancel, which is when every usage record is final. A saturated session's executors
/// are never idle, so it does not release them during the run.
const RELEASE_MS: u64 = 500;
/// Bound on the shares settling at 1 and 3 executors (launches included).
const SHARE_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the measured run; it needs about 15 s.
const WINDOW_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on the executors going after the cancel.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Allowed relative distance of the measured ratios from 3.
const TOLERANCE: f64 = 0.10;

async fn open(client: &Client, owner: &str) -> Session {
    let session = client
        .create_session(SessionSpec {
            owner: owner.to_string(),
            ..SessionSpec::new(APP)
        })
        .await
        .unwrap_or_else(|e| panic!("cannot open a session for owner {owner}: {e}"));
    let info = session.info().await.unwrap();
    assert_eq!(info.owner, owner, "{info:#?}");
    assert_eq!(info.priority, 0, "{info:#?}");
    session
}

fn json(out: &CmdOutput) -> Value {
    out.assert_success();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

/// Executor-milliseconds the session's executors were bound to it.
fn bound_ms(info: &SessionInfo) -> u64 {
    info.usage.iter().map(|u| u.bound_ms).sum()
}

fn within_tolerance(ratio: f64, expected: f64) -> bool {
    (ratio / expected - 1.0).abs() <= TOLERANCE
}

/// Checks `flame queue --output json` while the shares are settled.
fn check_queue(queue: &Value, a: &Session, b: &Session) {
    assert_eq!(queue["capacity"]["cpu_millis"], CPUS * 1000, "{queue:#}");
    let owners = queue["owners"]
        .as_array()
        .unwrap_or_else(|| panic!("no owners array: {queue:#}"));
    let owner = |name: &str| {
        owners
            .iter()
            .find(|o| o["owner"] == name)
            .unwrap_or_else(|| panic!("owner {name} is not listed: {queue:#}"))
    };
    let total = f64::from(WEIGHT_A + WEIGHT_B);
    for (name, weight, mine, other, executors) in
        [("a", WEIGHT_A, a, b, 1), ("b", WEIGHT_B, b, a, 3)]
    {
        let o = owner(name);
        assert_eq!(o["weight"], weight, "{queue:#}");
        let deserved = o["deserved_permille"]
            .as_u64()
            .unwrap_or_else(|| panic!("owner {name} has no deserved_permille: {queue:#}"));
        let expected = 1000.0 * f64::from(weight) / total;
        assert!(
            (deserved as f64 - expected).abs() <= 5.0,
            "owner {name} deserves {deserved}‰, not about {expected}‰: {queue:#}"
        );
        assert_eq!(o["executors"], executors, "{queue:#}");
        assert!(
            o["pending_tasks"].as_u64().is_some_and(|p| p > 0),
            "{queue:#}"
        );
        let sessions = o["sessions"]
            .as_array()
            .unwrap_or_else(|| panic!("owner {name} has no sessions array: {queue:#}"));
        let session = sessions
            .iter()
            .find(|s| s["id"] == mine.id().0)
            .unwrap_or_else(|| {
                panic!("session {} is not under owner {name}: {queue:#}", mine.id())
            });
        assert!(
            sessions.iter().all(|s| s["id"] != other.id().0),
            "session {} is under owner {name}: {queue:#}",
            other.id()
        );
        assert_eq!(session["application"], APP, "{queue:#}");
        assert_eq!(session["priority"], 0, "{queue:#}");
        assert_eq!(session["executors"], executors, "{queue:#}");
        assert_eq!(session["deserved_executors"], executors, "{queue:#}");
        assert!(
            session["pending_tasks"].as_u64().is_some_and(|p| p > 0),
            "{queue:#}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn owners_share_executors_by_weight() {
    let cluster = Cluster::start(ClusterOptions::default().cpus(CPUS).head_args([
        "--owner-weight".to_string(),
        format!("a={WEIGHT_A}"),
        "--owner-weight".to_string(),
        format!("b={WEIGHT_B}"),
    ]))
    .await;
    let client = cluster.client().await;
    client
        .register_application(ApplicationSpec {
            delay_release_ms: RELEASE_MS,
            ..test_service::spec(APP)
        })
        .await
        .unwrap();
    // Both sessions exist and are watched before either has a task, and the two floods go
    // in together, so neither starts with the cluster to itself for long.
    let (a, b) = (open(&client, "a").await, open(&client, "b").await);
    let (collect_a, seen_a) = spawn_collector(&a).await;
    let (collect_b, seen_b) = spawn_collector(&b).await;
    let (ids_a, ids_b) = tokio::join!(
        a.submit(test_service::sleeps(TASKS, TASK_MS)),
        b.submit(test_service::sleeps(TASKS, TASK_MS))
    );
    assert_eq!(ids_a.unwrap().len(), TASKS);
    assert_eq!(ids_b.unwrap().len(), TASKS);

    // The shares settle at 1 and 3 executors.
    let deadline = Instant::now() + SHARE_TIMEOUT;
    loop {
        let (info_a, info_b) = (a.info().await.unwrap(), b.info().await.unwrap());
        if info_a.executors == 1 && info_b.executors == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the executors are not shared 1:3 after {SHARE_TIMEOUT:?}: {info_a:#?}\n{info_b:#?}\n{}",
            cluster.logs()
        );
        tokio::time::sleep(SESSION_POLL_PAUSE).await;
    }
    let queue = json(&cluster.flame(&["queue", "--output", "json"]).await);
    check_queue(&queue, &a, &b);
    // The human form names both owners too.
    let table = cluster.flame(&["queue"]).await;
    table.assert_success();
    for needle in ["Owner", "Weight", "Deserved", "Allocated", "25.0%", "75.0%"] {
        assert!(table.stdout.contains(needle), "no `{needle}` in:\n{table}");
    }

    // A measured run while both always have work: tasks completed per owner.
    let done = || (*seen_a.borrow(), *seen_b.borrow());
    let (a0, b0) = done();
    let deadline = Instant::now() + WINDOW_TIMEOUT;
    let (a1, b1) = loop {
        let (a1, b1) = done();
        if a1 + b1 >= a0 + b0 + WINDOW_TASKS {
            break (a1, b1);
        }
        assert!(
            Instant::now() < deadline,
            "only {} tasks completed in {WINDOW_TIMEOUT:?}\n{}",
            a1 + b1 - a0 - b0,
            cluster.logs()
        );
        tokio::time::sleep(SESSION_POLL_PAUSE).await;
    };
    let (info_a, info_b) = (a.info().await.unwrap(), b.info().await.unwrap());
    assert!(
        info_a.counts.pending > 0 && info_b.counts.pending > 0,
        "a session ran out of work during the measured run: {info_a:#?}\n{info_b:#?}"
    );

    // Cancelled together: the executors running tasks are killed, and their bound time is
    // recorded as they exit.
    let (ca, cb) = tokio::join!(client.cancel_session(a.id()), client.cancel_session(b.id()));
    ca.unwrap();
    cb.unwrap();
    for (name, collector) in [("a", collect_a), ("b", collect_b)] {
        let results = collector.await.unwrap();
        assert_eq!(results.len(), TASKS, "owner {name}");
        let failed: Vec<_> = results
            .iter()
            .filter(|r| matches!(r.outcome, TaskOutcome::Failed(_)))
            .collect();
        assert!(failed.is_empty(), "owner {name}: failed tasks {failed:#?}");
    }
    wait_no_executors(&client, APP, SETTLE_TIMEOUT).await;
    let (info_a, info_b) = (a.info().await.unwrap(), b.info().await.unwrap());

    let expected = f64::from(WEIGHT_B) / f64::from(WEIGHT_A);
    let window_ratio = (b1 - b0) as f64 / (a1 - a0).max(1) as f64;
    let bound_ratio = bound_ms(&info_b) as f64 / bound_ms(&info_a).max(1) as f64;
    let summary = format!(
        "executor-ms a {} b {} (ratio {bound_ratio:.3}); tasks completed in the measured run \
         a {} b {} (ratio {window_ratio:.3}); expected {expected} ± {TOLERANCE} relative",
        bound_ms(&info_a),
        bound_ms(&info_b),
        a1 - a0,
        b1 - b0,
    );
    let details = format!("usage a: {:#?}\nusage b: {:#?}", info_a.usage, info_b.usage);
    assert!(
        within_tolerance(bound_ratio, expected),
        "{summary}\n{details}"
    );
    assert!(
        within_tolerance(window_ratio, expected),
        "{summary}\n{details}"
    );
    eprintln!("{summary}");
    client.close().await;
}
