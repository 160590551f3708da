//! The scheduler at scale: `cargo test --release -p flame-head scheduler_decision_time --
//! --ignored --nocapture` prints the time of one decision round (p50, p99) and the memory
//! of the snapshot, for 1,000 nodes, 64,000 executors and 1,000,000 pending tasks.

use super::*;
use std::time::Instant;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn big_snapshot() -> Snapshot {
    let nodes: Vec<NodeView> = (0..1000u32)
        .map(|i| NodeView {
            name: format!("node-{i:04}"),
            ready: true,
            cpu_millis: (32 + (i * 37) % 97) * 1000,
            memory_bytes: u64::from(32 + (i * 37) % 97) << 32,
            gpus: if i % 10 == 0 { 8 } else { 0 },
            labels: BTreeMap::new(),
            draining: false,
        })
        .collect();
    let applications: Vec<AppView> = (0..50u32)
        .map(|i| AppView {
            name: format!("app-{i}"),
            max_instances: 100_000,
            delay_release_ms: 60_000,
            backing_off: BTreeMap::new(),
            probing: Default::default(),
            resources: Resources {
                cpu_millis: 500 + (i % 4) * 250,
                memory_bytes: Some(1 << 30),
                gpus: 0,
            },
            selector: BTreeMap::new(),
        })
        .collect();
    // 1,000 sessions from 20 owners: 1,000 pending tasks each, plus what runs.
    let sessions: Vec<SessionView> = (0..1000u64)
        .map(|i| SessionView {
            id: SessionId(i + 1),
            application: format!("app-{}", i % 50),
            open: true,
            demand: 1000 + 64,
            owner: format!("owner-{}", i % 20),
            priority: (i % 4) as i32,
            gang: None,
        })
        .collect();
    // 64,000 executors, 64 bound to each session, spread over the nodes.
    let mut executors = Vec::with_capacity(64_000);
    for i in 0..64_000u64 {
        let s = &sessions[(i % 1000) as usize];
        let app = &applications[(i % 1000 % 50) as usize];
        executors.push(ExecutorView {
            id: ExecutorId(i + 1),
            node: nodes[(i % 1000) as usize].name.clone(),
            application: app.name.clone(),
            owner: s.owner.clone(),
            phase: ExecutorPhase::Bound,
            session: Some(s.id),
            quiet_since_ms: 0,
            outstanding: 4,
            resources: app.resources,
        });
    }
    Snapshot {
        now_ms: 1_000_000,
        nodes,
        applications,
        sessions,
        executors,
        owner_weights: (0..20).map(|o| (format!("owner-{o}"), 1 + o % 5)).collect(),
    }
}

#[test]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
fn scheduler_decision_time() {
    let before = rss_kib();
    let snap = big_snapshot();
    let with_snapshot = rss_kib();
    let pending: u64 = snap.sessions.iter().map(|s| s.demand).sum::<u64>() - 64_000;
    let mut times = Vec::new();
    let mut decisions = 0;
    for _ in 0..30 {
        let start = Instant::now();
        let plan = plan(&snap);
        times.push(start.elapsed());
        decisions = plan.decisions.len();
    }
    times.sort();
    let p = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!(
        "scheduler: {} nodes, {} executors, {} pending tasks, {} sessions, {} owners: \
         decision round p50 {:?}, p99 {:?} ({} rounds, {} decisions each); \
         snapshot {} MiB resident, process {} MiB",
        snap.nodes.len(),
        snap.executors.len(),
        pending,
        snap.sessions.len(),
        snap.owner_weights.len(),
        p(0.5),
        p(0.99),
        times.len(),
        decisions,
        with_snapshot.saturating_sub(before) / 1024,
        rss_kib() / 1024,
    );
}
