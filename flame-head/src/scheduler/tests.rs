//! Unit tests of the scheduler: plans for small snapshots, checked decision by decision.

use super::*;

fn node(name: &str, slots: u32) -> NodeView {
    NodeView {
        name: name.into(),
        ready: true,
        cpu_millis: slots * 1000,
        memory_bytes: 8 << 30,
        gpus: 0,
        labels: BTreeMap::new(),
        draining: false,
    }
}

fn app(name: &str, max: u32) -> AppView {
    AppView {
        name: name.into(),
        max_instances: max,
        delay_release_ms: 1000,
        backing_off: BTreeMap::new(),
        probing: Default::default(),
        resources: Resources::default(),
        selector: BTreeMap::new(),
    }
}

fn session(id: u64, app: &str, demand: u64) -> SessionView {
    SessionView {
        id: SessionId(id),
        application: app.into(),
        open: true,
        demand,
        owner: "default".into(),
        priority: 0,
        gang: None,
    }
}

fn exec(id: u64, app: &str, phase: ExecutorPhase, session: Option<u64>) -> ExecutorView {
    ExecutorView {
        id: ExecutorId(id),
        node: "n1".into(),
        application: app.into(),
        owner: "default".into(),
        phase,
        session: session.map(SessionId),
        quiet_since_ms: 0,
        outstanding: 0,
        resources: Resources::default(),
    }
}

#[test]
fn launches_up_to_capacity_and_max_instances() {
    let snap = Snapshot {
        now_ms: 0,
        nodes: vec![node("n1", 4)],
        applications: vec![app("ping", 3)],
        sessions: vec![session(1, "ping", 100)],
        executors: vec![],
        owner_weights: BTreeMap::new(),
    };
    let d = schedule(&snap);
    assert_eq!(
        d.iter()
            .filter(|d| matches!(d, Decision::Launch { .. }))
            .count(),
        3
    );
}

#[test]
fn no_launch_while_backing_off() {
    let mut a = app("ping", 3);
    a.backing_off.insert("default".into(), None);
    let snap = Snapshot {
        now_ms: 0,
        nodes: vec![node("n1", 4)],
        applications: vec![a],
        sessions: vec![session(1, "ping", 100)],
        executors: vec![],
        owner_weights: BTreeMap::new(),
    };
    assert!(schedule(&snap).is_empty());
}

#[test]
fn backing_off_app_does_not_starve_others() {
    let mut broken = app("broken", 3);
    broken.backing_off.insert("default".into(), None);
    let snap = Snapshot {
        now_ms: 0,
        nodes: vec![node("n1", 1)],
        applications: vec![broken, app("ping", 3)],
        sessions: vec![session(1, "broken", 100), session(2, "ping", 100)],
        executors: vec![],
        owner_weights: BTreeMap::new(),
    };
    assert_eq!(
        schedule(&snap),
        vec![Decision::Launch {
            node: "n1".into(),
            application: "ping".into(),
            owner: "default".into()
        }]
    );
}

#[test]
fn reuses_idle_executor_of_same_app_before_launching() {
    let snap = Snapshot {
        now_ms: 0,
        nodes: vec![node("n1", 2)],
        applications: vec![app("ping", 10)],
        sessions: vec![session(1, "ping", 1)],
        executors: vec![exec(7, "ping", ExecutorPhase::Idle, None)],
        owner_weights: BTreeMap::new(),
    };
    assert_eq!(
        schedule(&snap),
        vec![Decision::Bind {
            executor: ExecutorId(7),
            session: SessionId(1)
        }]
    );
}

#[test]
fn an_executor_serves_only_its_owners_sessions() {
    let bobs = SessionView {
        owner: "bob".into(),
        ..session(1, "ping", 1)
    };
    let alices_idle = ExecutorView {
        owner: "alice".into(),
        ..exec(7, "ping", ExecutorPhase::Idle, None)
    };
    let alices_launching = ExecutorView {
        owner: "alice".into(),
        ..exec(8, "ping", ExecutorPhase::Launching, None)
    };
    let snap = Snapshot {
        now_ms: 0,
        nodes: vec![node("n1", 3)],
        applications: vec![app("ping", 10)],
        sessions: vec![bobs.clone()],
        executors: vec![alices_idle.clone(), alices_launching],
        owner_weights: BTreeMap::new(),
    };
    // Neither alice's idle executor nor her launch in flight serves bob: a launch of
    // his own does.
    assert_eq!(
        schedule(&snap),
        vec![Decision::Launch {
            node: "n1".into(),
            application: "ping".into(),
            owner: "bob".into()
        }]
    );
    // On a full node, alice's idle executor is released to make room for bob's.
    let full = Snapshot {
        nodes: vec![node("n1", 1)],
        executors: vec![alices_idle],
        ..snap.clone()
    };
    assert_eq!(
        schedule(&full),
        vec![Decision::Release {
            executor: ExecutorId(7)
        }]
    );
    // Launches backing off for alice do not hold bob's back.
    let mut apps = vec![app("ping", 10)];
    apps[0]
        .backing_off
        .insert("alice".into(), Some("no account".into()));
    let snap = Snapshot {
        applications: apps,
        executors: vec![],
        sessions: vec![
            bobs,
            SessionView {
                owner: "alice".into(),
                ..session(2, "ping", 1)
            },
        ],
        ..snap
    };
    let plan = plan(&snap);
    assert_eq!(
        plan.decisions,
        vec![Decision::Launch {
            node: "n1".into(),
            application: "ping".into(),
            owner: "bob".into()
        }]
    );
    assert!(
        plan.waiting[&SessionId(2)].contains("no account"),
        "{:?}",
        plan.waiting
    );
}

#[test]
fn launches_in_flight_are_not_duplicated() {
    let snap = Snapshot {
        now_ms: 0,
        nodes: vec![node("n1", 2)],
        applications: vec![app("ping", 10)],
        sessions: vec![session(1, "ping", 10)],
        executors: vec![
            exec(1, "ping", ExecutorPhase::Launching, None),
            exec(2, "ping", ExecutorPhase::Launching, None),
        ],
        owner_weights: BTreeMap::new(),
    };
    assert!(schedule(&snap).is_empty());
}

#[test]
fn two_sessions_share_two_slots() {
    let snap = Snapshot {
        now_ms: 0,
        nodes: vec![node("n1", 2)],
        applications: vec![app("ping", 10)],
        sessions: vec![session(1, "ping", 50), session(2, "ping", 50)],
        executors: vec![
            exec(1, "ping", ExecutorPhase::Bound, Some(1)),
            exec(2, "ping", ExecutorPhase::Bound, Some(1)),
        ],
        owner_weights: BTreeMap::new(),
    };
    // Session 1 holds both; it gives one back so session 2 can have it.
    assert_eq!(
        schedule(&snap),
        vec![Decision::Unbind {
            executor: ExecutorId(1)
        }]
    );
}

#[test]
fn idle_executor_released_after_delay_only() {
    let mut snap = Snapshot {
        now_ms: 500,
        nodes: vec![node("n1", 2)],
        applications: vec![app("ping", 10)],
        sessions: vec![],
        executors: vec![exec(1, "ping", ExecutorPhase::Idle, None)],
        owner_weights: BTreeMap::new(),
    };
    assert!(schedule(&snap).is_empty());
    snap.now_ms = 1000;
    assert_eq!(
        schedule(&snap),
        vec![Decision::Release {
            executor: ExecutorId(1)
        }]
    );
}

#[test]
fn closed_session_without_work_unbinds_at_once() {
    let mut s = session(1, "ping", 0);
    s.open = false;
    let snap = Snapshot {
        now_ms: 0,
        nodes: vec![node("n1", 2)],
        applications: vec![app("ping", 10)],
        sessions: vec![s],
        executors: vec![exec(1, "ping", ExecutorPhase::Bound, Some(1))],
        owner_weights: BTreeMap::new(),
    };
    assert_eq!(
        schedule(&snap),
        vec![Decision::Unbind {
            executor: ExecutorId(1)
        }]
    );
}

#[test]
fn half_cpu_executors_pack_two_per_cpu() {
    let mut a = app("half", 100);
    a.resources.cpu_millis = 500;
    let snap = Snapshot {
        now_ms: 0,
        nodes: vec![node("n1", 2)],
        applications: vec![a],
        sessions: vec![session(1, "half", 100)],
        executors: vec![],
        owner_weights: BTreeMap::new(),
    };
    assert_eq!(schedule(&snap).len(), 4);
}

#[test]
fn too_big_for_every_node_waits_and_says_why() {
    let mut big = app("big", 10);
    big.resources.memory_bytes = Some(64 << 30);
    let snap = Snapshot {
        now_ms: 0,
        nodes: vec![node("n1", 2), node("n2", 4)],
        applications: vec![big, app("ping", 10)],
        sessions: vec![session(1, "big", 10), session(2, "ping", 10)],
        executors: vec![],
        owner_weights: BTreeMap::new(),
    };
    let p = plan(&snap);
    // The small session gets every cpu; the big one claims none and is told why.
    assert_eq!(p.decisions.len(), 6);
    assert!(p.decisions.iter().all(|d| matches!(
        d,
        Decision::Launch { application, .. } if application == "ping"
    )));
    let why = &p.waiting[&SessionId(1)];
    assert!(why.contains("no ready node can fit"), "{why}");
    assert!(why.contains("memory 64 GiB"), "{why}");
    assert!(!p.waiting.contains_key(&SessionId(2)));
}

#[test]
fn selector_limits_placement_to_labelled_nodes() {
    let mut gpu_node = node("gpu1", 2);
    gpu_node.labels.insert("kind".into(), "gpu".into());
    gpu_node.gpus = 1;
    let mut a = app("train", 10);
    a.selector.insert("kind".into(), "gpu".into());
    a.resources.gpus = 1;
    let snap = Snapshot {
        now_ms: 0,
        nodes: vec![node("cpu1", 8), gpu_node],
        applications: vec![a.clone()],
        sessions: vec![session(1, "train", 10)],
        executors: vec![],
        owner_weights: BTreeMap::new(),
    };
    let p = plan(&snap);
    // One gpu: one executor, on the labelled node.
    assert_eq!(
        p.decisions,
        vec![Decision::Launch {
            node: "gpu1".into(),
            application: "train".into(),
            owner: "default".into()
        }]
    );
    // The one GPU bounds its share: it holds what it deserves and is not waiting.
    assert_eq!(p.targets[&SessionId(1)], 1);
    assert!(!p.waiting.contains_key(&SessionId(1)));
    let mut other = a;
    other.selector.insert("zone".into(), "b".into());
    let snap = Snapshot {
        applications: vec![other],
        ..snap
    };
    let why = &plan(&snap).waiting[&SessionId(1)];
    assert!(why.contains("kind=gpu,zone=b"), "{why}");
}

fn request(owner: &str, priority: i32, demand: u64, cpu_millis: u32) -> ShareRequest {
    ShareRequest {
        owner: owner.into(),
        priority,
        demand,
        unit: Resources {
            cpu_millis,
            memory_bytes: None,
            gpus: 0,
        },
        atomic: false,
        application: "app".into(),
    }
}

fn cpus(n: u64) -> Totals {
    Totals {
        cpu_millis: n * 1000,
        memory_bytes: 1 << 40,
        gpus: 0,
    }
}

#[test]
fn owners_share_by_weight() {
    let weights = [("b".to_string(), 3)].into();
    let got = fair_shares(
        cpus(8),
        &[request("a", 0, 100, 1000), request("b", 0, 100, 1000)],
        &weights,
        &BTreeMap::new(),
    );
    assert_eq!(got, vec![2, 6]);
    // An owner asking for less than its share leaves the rest to the others.
    let got = fair_shares(
        cpus(8),
        &[request("a", 0, 100, 1000), request("b", 0, 1, 1000)],
        &weights,
        &BTreeMap::new(),
    );
    assert_eq!(got, vec![7, 1]);
}

#[test]
fn shares_are_on_the_dominant_resource() {
    // a's executors are memory-heavy: each takes a quarter of the memory (its dominant
    // share) but only 1/16 of the cpu; b's take 1/8 of the cpu.
    let totals = Totals {
        cpu_millis: 8000,
        memory_bytes: 8 << 30,
        gpus: 0,
    };
    let mut heavy = request("a", 0, 100, 500);
    heavy.unit.memory_bytes = Some(2 << 30);
    let weights = BTreeMap::new();
    let none = BTreeMap::new();
    // Asking for little, b leaves a its fill of memory.
    let got = fair_shares(
        totals,
        &[heavy.clone(), request("b", 0, 2, 1000)],
        &weights,
        &none,
    );
    assert_eq!(got, vec![4, 2]);
    // Both saturated: dominant shares are equalised first (a 2 = half the memory, b 4 =
    // half the cpu), then what still fits is handed out by turns: a 4 (all memory),
    // b 6 (the cpu a leaves).
    let got = fair_shares(
        totals,
        &[heavy, request("b", 0, 100, 1000)],
        &weights,
        &none,
    );
    assert_eq!(got, vec![4, 6]);
}

#[test]
fn higher_priority_first_within_an_owner_and_caps_hold() {
    let got = fair_shares(
        cpus(4),
        &[request("a", 0, 10, 1000), request("a", 5, 3, 1000)],
        &BTreeMap::new(),
        &BTreeMap::new(),
    );
    assert_eq!(got, vec![1, 3]);
    // Equal priorities take turns: one each first.
    let got = fair_shares(
        cpus(3),
        &[
            request("a", 0, 10, 1000),
            request("a", 0, 1, 1000),
            request("a", 0, 10, 1000),
        ],
        &BTreeMap::new(),
        &BTreeMap::new(),
    );
    assert_eq!(got.iter().sum::<u64>(), 3);
    assert!(got.iter().all(|&g| g == 1), "{got:?}");
    // max_instances of the application bounds all its sessions together.
    let caps = [("app".to_string(), 2)].into();
    let got = fair_shares(
        cpus(8),
        &[request("a", 0, 10, 1000), request("b", 0, 10, 1000)],
        &BTreeMap::new(),
        &caps,
    );
    assert_eq!(got, vec![1, 1]);
}

#[test]
fn a_draining_node_takes_nothing_and_releases_idle_executors() {
    let mut drained = node("n1", 4);
    drained.draining = true;
    let snap = Snapshot {
        now_ms: 0,
        nodes: vec![drained, node("n2", 1)],
        applications: vec![app("ping", 10)],
        sessions: vec![session(1, "ping", 10)],
        executors: vec![exec(7, "ping", ExecutorPhase::Idle, None)],
        owner_weights: BTreeMap::new(),
    };
    let d = schedule(&snap);
    assert!(d.contains(&Decision::Release {
        executor: ExecutorId(7)
    }));
    assert!(d.contains(&Decision::Launch {
        node: "n2".into(),
        application: "ping".into(),
        owner: "default".into()
    }));
    assert!(!d
        .iter()
        .any(|d| matches!(d, Decision::Launch { node, .. } if node == "n1")));
    assert!(!d.iter().any(|d| matches!(d, Decision::Bind { .. })));
}

#[test]
fn a_lower_priority_session_gives_back_to_a_higher_one() {
    let mut low = session(1, "ping", 50);
    low.priority = 0;
    let mut high = session(2, "ping", 50);
    high.priority = 9;
    let snap = Snapshot {
        now_ms: 0,
        nodes: vec![node("n1", 2)],
        applications: vec![app("ping", 10)],
        sessions: vec![low, high],
        executors: vec![
            exec(1, "ping", ExecutorPhase::Bound, Some(1)),
            exec(2, "ping", ExecutorPhase::Bound, Some(1)),
        ],
        owner_weights: BTreeMap::new(),
    };
    // The high-priority session deserves both; the low one unbinds them (after the
    // tasks already queued on them: an unbind never kills a task).
    assert_eq!(
        schedule(&snap),
        vec![
            Decision::Unbind {
                executor: ExecutorId(1)
            },
            Decision::Unbind {
                executor: ExecutorId(2)
            }
        ]
    );
}

fn gang_session(id: u64, app: &str, ranks: u32, per_node: Option<u32>) -> SessionView {
    let mut s = session(id, app, u64::from(ranks));
    s.gang = Some(Gang {
        ranks,
        ranks_per_node: per_node,
    });
    s
}

fn launches_per_node(d: &[Decision]) -> BTreeMap<String, u32> {
    let mut per = BTreeMap::new();
    for d in d {
        if let Decision::Launch { node, .. } = d {
            *per.entry(node.clone()).or_default() += 1;
        }
    }
    per
}

#[test]
fn a_gang_is_launched_whole_with_its_ranks_per_node() {
    let snap = Snapshot {
        now_ms: 0,
        nodes: vec![node("n1", 3), node("n2", 2), node("n3", 1)],
        applications: vec![app("job", 4)],
        sessions: vec![gang_session(1, "job", 4, Some(2))],
        executors: vec![],
        owner_weights: BTreeMap::new(),
    };
    let per = launches_per_node(&schedule(&snap));
    assert_eq!(per, [("n1".to_string(), 2), ("n2".to_string(), 2)].into());
}

#[test]
fn a_gang_that_does_not_fit_launches_nothing_and_reserves_nodes() {
    // Two nodes of 2 cpus, both full of another session's executors; a gang of 3.
    let mut execs = Vec::new();
    for (i, n) in [(1, "n1"), (2, "n1"), (3, "n2"), (4, "n2")] {
        let mut e = exec(i, "ping", ExecutorPhase::Bound, Some(1));
        e.node = n.into();
        e.outstanding = 1;
        execs.push(e);
    }
    let mut elastic = session(1, "ping", 1000);
    elastic.owner = "other".into();
    let snap = Snapshot {
        now_ms: 0,
        nodes: vec![node("n1", 2), node("n2", 2)],
        applications: vec![app("ping", 10), app("job", 3)],
        sessions: vec![elastic, gang_session(2, "job", 3, None)],
        executors: execs,
        owner_weights: BTreeMap::new(),
    };
    let plan = plan(&snap);
    assert!(launches_per_node(&plan.decisions).is_empty());
    // Its owner's share holds 2 of 4 cpus: not the 3 it needs at once.
    assert!(
        plan.waiting[&SessionId(2)].contains("share to hold all 3 ranks"),
        "{:?}",
        plan.waiting
    );
    // With a weight that gives it the share, it reserves what it needs: three of the
    // four executors are unbound (after their task), none are killed.
    let mut snap = snap;
    snap.owner_weights.insert("default".into(), 3);
    let plan = super::plan(&snap);
    assert!(launches_per_node(&plan.decisions).is_empty());
    let unbinds = plan
        .decisions
        .iter()
        .filter(|d| matches!(d, Decision::Unbind { .. }))
        .count();
    assert_eq!(unbinds, 3, "{:?}", plan.decisions);
    assert!(plan.waiting[&SessionId(2)].starts_with("reserved n1,n2"));
}

#[test]
fn a_gang_too_big_for_the_cluster_or_badly_shaped_says_why() {
    let snap = Snapshot {
        now_ms: 0,
        nodes: vec![node("n1", 2), node("n2", 2)],
        applications: vec![app("job", 100), app("odd", 100)],
        sessions: vec![
            gang_session(1, "job", 2, Some(2)),
            gang_session(2, "odd", 3, Some(2)),
        ],
        executors: vec![],
        owner_weights: BTreeMap::new(),
    };
    let plan = plan(&snap);
    assert!(plan.waiting[&SessionId(2)].contains("multiple of ranks_per_node"));
    // The well-shaped one fits on one node.
    assert_eq!(launches_per_node(&plan.decisions).values().sum::<u32>(), 2);
    let mut snap = snap;
    snap.sessions = vec![gang_session(3, "job", 5, None)];
    let plan = super::plan(&snap);
    assert!(plan.decisions.is_empty());
    assert!(
        plan.waiting[&SessionId(3)].contains("even with nothing else running"),
        "{:?}",
        plan.waiting
    );
}

#[test]
fn full_node_releases_idle_executor_of_other_app() {
    let snap = Snapshot {
        now_ms: 0,
        nodes: vec![node("n1", 1)],
        applications: vec![app("ping", 10), app("pi", 10)],
        sessions: vec![session(1, "pi", 5)],
        executors: vec![exec(1, "ping", ExecutorPhase::Idle, None)],
        owner_weights: BTreeMap::new(),
    };
    assert_eq!(
        schedule(&snap),
        vec![Decision::Release {
            executor: ExecutorId(1)
        }]
    );
}

/// The check every plan passes in debug builds is not vacuous: it refuses a plan that
/// over-commits a node, decides on an executor twice, or binds another owner's executor.
#[test]
fn the_plan_check_refuses_what_no_plan_may_do() {
    let snap = Snapshot {
        nodes: vec![node("n1", 1)],
        applications: vec![app("a", 10)],
        sessions: vec![session(1, "a", 1)],
        executors: vec![
            exec(1, "a", ExecutorPhase::Bound, Some(1)),
            ExecutorView {
                owner: "other".into(),
                ..exec(2, "a", ExecutorPhase::Idle, None)
            },
        ],
        ..Default::default()
    };
    let refused = |decisions: Vec<Decision>| {
        let plan = Plan {
            decisions,
            ..Default::default()
        };
        std::panic::catch_unwind(|| planner::check_plan(&snap, &plan)).is_err()
    };
    let launch = Decision::Launch {
        node: "n1".into(),
        application: "a".into(),
        owner: "default".into(),
    };
    let unbind = Decision::Unbind {
        executor: ExecutorId(1),
    };
    let bind_other = Decision::Bind {
        executor: ExecutorId(2),
        session: SessionId(1),
    };
    assert!(!refused(vec![unbind.clone()]));
    assert!(
        refused(vec![launch]),
        "the executor there holds its only cpu"
    );
    assert!(refused(vec![unbind.clone(), unbind]));
    assert!(refused(vec![bind_other]));
}
