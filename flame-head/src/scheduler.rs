//! The scheduler: a pure function from a snapshot of the cluster to a list of decisions.
//!
//! It performs no I/O and reads no clock: time is the `now_ms` field of the snapshot. The
//! core applies the decisions; tests assert on them directly.
//!
//! Maps are ordered (`BTreeMap`), so the same snapshot always gives the same decisions.
//!
//! Policy, in order:
//! 1. **Targets.** The executor slots of Ready nodes are shared between sessions with work
//!    in proportion to their pending plus running tasks (water-filling, so no session gets
//!    more executors than it has tasks), then capped by each application's
//!    `max_instances`.
//! 2. **Reuse first.** A session under its target takes Idle executors of its application,
//!    then executors of its application still starting, and only then launches new ones on
//!    the node with the most free slots.
//! 3. **Give back.** A session over its target while another is under its own unbinds the
//!    excess; a session with no work unbinds once it is closed, once someone else waits, or
//!    after the application's `delay_release`. An Idle executor is released after
//!    `delay_release`, or at once when its slot is needed for another application.

use flame_protocol::{ExecutorId, SessionId};
use std::collections::BTreeMap;

/// What the scheduler sees of a node.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub name: String,
    pub ready: bool,
    /// Executor slots (one per cpu for now).
    pub slots: u32,
}

/// What the scheduler sees of an application.
#[derive(Debug, Clone)]
pub struct AppView {
    pub name: String,
    pub max_instances: u32,
    pub delay_release_ms: u64,
    /// False while launches of this application back off after failures.
    pub launchable: bool,
}

/// What the scheduler sees of a session.
#[derive(Debug, Clone)]
pub struct SessionView {
    pub id: SessionId,
    pub application: String,
    pub open: bool,
    /// Pending plus running tasks.
    pub demand: u64,
}

/// Executor lifecycle as the head tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExecutorPhase {
    /// Launch sent; the application has not said ready yet (Void).
    Launching,
    Idle,
    Binding,
    Bound,
    Unbinding,
    Releasing,
}

/// What the scheduler sees of an executor.
#[derive(Debug, Clone)]
pub struct ExecutorView {
    pub id: ExecutorId,
    pub node: String,
    pub application: String,
    pub phase: ExecutorPhase,
    pub session: Option<SessionId>,
    /// When it last became Idle, or last finished a task while bound with none outstanding.
    pub quiet_since_ms: u64,
    /// Tasks handed to it and not yet answered.
    pub outstanding: u32,
}

/// Everything the scheduler decides from.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub now_ms: u64,
    pub nodes: Vec<NodeView>,
    pub applications: Vec<AppView>,
    pub sessions: Vec<SessionView>,
    pub executors: Vec<ExecutorView>,
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Launch {
        node: String,
        application: String,
    },
    Bind {
        executor: ExecutorId,
        session: SessionId,
    },
    Unbind {
        executor: ExecutorId,
    },
    Release {
        executor: ExecutorId,
    },
}

/// Splits `capacity` between demands: one each first, then in proportion, never giving one
/// more than it asks.
/// Integer water-filling with largest remainders, so the sum never exceeds `capacity`.
pub fn proportional_targets(capacity: u64, demands: &[u64]) -> Vec<u64> {
    let mut targets = vec![0u64; demands.len()];
    let mut remaining = capacity;
    let mut open: Vec<usize> = (0..demands.len()).filter(|&i| demands[i] > 0).collect();
    // Everyone with work gets one slot first (in order), so a small session is never
    // starved by a large one; the rest is shared in proportion.
    for &i in &open {
        if remaining == 0 {
            break;
        }
        targets[i] = 1;
        remaining -= 1;
    }
    open.retain(|&i| targets[i] < demands[i]);
    while remaining > 0 && !open.is_empty() {
        let total: u128 = open
            .iter()
            .map(|&i| u128::from(demands[i] - targets[i]))
            .sum();
        let mut given = 0u64;
        let mut remainders: Vec<(u128, usize)> = Vec::with_capacity(open.len());
        for &i in &open {
            let want = demands[i] - targets[i];
            let exact = u128::from(remaining) * u128::from(want);
            let share = ((exact / total) as u64).min(want);
            remainders.push((exact % total, i));
            targets[i] += share;
            given += share;
        }
        if given == 0 {
            // Fewer slots than sessions: the largest remainders (ties: lowest index) get one.
            remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            for (_, i) in remainders.into_iter().take(remaining as usize) {
                targets[i] += 1;
                given += 1;
            }
        }
        remaining -= given;
        open.retain(|&i| targets[i] < demands[i]);
    }
    targets
}

/// Computes the decisions for one snapshot.
pub fn schedule(snap: &Snapshot) -> Vec<Decision> {
    let mut decisions = Vec::new();
    let apps: BTreeMap<&str, &AppView> = snap
        .applications
        .iter()
        .map(|a| (a.name.as_str(), a))
        .collect();
    let ready: BTreeMap<&str, &NodeView> = snap
        .nodes
        .iter()
        .filter(|n| n.ready)
        .map(|n| (n.name.as_str(), n))
        .collect();

    // Slots in use per node, and live executors per application.
    let mut used: BTreeMap<&str, u32> = BTreeMap::new();
    let mut live_per_app: BTreeMap<&str, u32> = BTreeMap::new();
    for e in &snap.executors {
        *used.entry(e.node.as_str()).or_default() += 1;
        *live_per_app.entry(e.application.as_str()).or_default() += 1;
    }
    let capacity: u64 = ready.values().map(|n| u64::from(n.slots)).sum();

    // 1. Targets, proportional to demand, then capped per application. A session whose
    // application cannot launch now (backing off after failures) claims no more than the
    // executors it could use today, so its share does not sit idle while others wait.
    let mut usable_per_app: BTreeMap<&str, u64> = BTreeMap::new();
    for e in &snap.executors {
        if matches!(
            e.phase,
            ExecutorPhase::Idle
                | ExecutorPhase::Binding
                | ExecutorPhase::Bound
                | ExecutorPhase::Launching
        ) {
            *usable_per_app.entry(e.application.as_str()).or_default() += 1;
        }
    }
    let active: Vec<&SessionView> = snap.sessions.iter().filter(|s| s.demand > 0).collect();
    let demands: Vec<u64> = active
        .iter()
        .map(|s| match apps.get(s.application.as_str()) {
            Some(a) if !a.launchable => s.demand.min(
                usable_per_app
                    .get(s.application.as_str())
                    .copied()
                    .unwrap_or(0),
            ),
            _ => s.demand,
        })
        .collect();
    let mut targets = proportional_targets(capacity, &demands);
    let mut by_app: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, s) in active.iter().enumerate() {
        by_app.entry(s.application.as_str()).or_default().push(i);
    }
    for (app, idx) in &by_app {
        let cap = apps.get(app).map_or(0, |a| u64::from(a.max_instances));
        let sum: u64 = idx.iter().map(|&i| targets[i]).sum();
        if sum > cap {
            let sub: Vec<u64> = idx.iter().map(|&i| targets[i]).collect();
            for (k, t) in proportional_targets(cap, &sub).into_iter().enumerate() {
                targets[idx[k]] = t;
            }
        }
    }
    let target_of: BTreeMap<SessionId, u64> = active
        .iter()
        .zip(&targets)
        .map(|(s, &t)| (s.id, t))
        .collect();

    // Executors held per session (Binding or Bound; Unbinding ones are on their way out).
    let mut held: BTreeMap<SessionId, Vec<&ExecutorView>> = BTreeMap::new();
    for e in &snap.executors {
        if let (Some(s), ExecutorPhase::Binding | ExecutorPhase::Bound) = (e.session, e.phase) {
            held.entry(s).or_default().push(e);
        }
    }
    let under: Vec<(&SessionView, u64)> = active
        .iter()
        .filter_map(|s| {
            let have = held.get(&s.id).map_or(0, Vec::len) as u64;
            let t = target_of.get(&s.id).copied().unwrap_or(0);
            (have < t).then(|| (*s, t - have))
        })
        .collect();
    let someone_waits = !under.is_empty();

    // 3a. Sessions over their target, or with nothing left to do, give executors back.
    for s in &snap.sessions {
        let Some(list) = held.get(&s.id) else {
            continue;
        };
        let target = target_of.get(&s.id).copied().unwrap_or(0);
        let have = list.len() as u64;
        if have <= target {
            continue;
        }
        let delay = apps
            .get(s.application.as_str())
            .map_or(0, |a| a.delay_release_ms);
        // Prefer giving back the executors with the least work outstanding.
        let mut order: Vec<&&ExecutorView> = list.iter().collect();
        order.sort_by_key(|e| (e.outstanding, e.id));
        let mut excess = have - target;
        for e in order {
            if excess == 0 {
                break;
            }
            let quiet_long =
                e.outstanding == 0 && snap.now_ms.saturating_sub(e.quiet_since_ms) >= delay;
            let give_back = if s.demand == 0 {
                !s.open || someone_waits || quiet_long
            } else {
                someone_waits
            };
            if give_back {
                decisions.push(Decision::Unbind { executor: e.id });
                excess -= 1;
            }
        }
    }

    // 2. Sessions under their target: reuse Idle executors, count launches in flight, launch.
    let mut idle_by_app: BTreeMap<&str, Vec<&ExecutorView>> = BTreeMap::new();
    let mut launching_by_app: BTreeMap<&str, u64> = BTreeMap::new();
    for e in &snap.executors {
        match e.phase {
            ExecutorPhase::Idle => idle_by_app
                .entry(e.application.as_str())
                .or_default()
                .push(e),
            ExecutorPhase::Launching => {
                *launching_by_app.entry(e.application.as_str()).or_default() += 1
            }
            _ => {}
        }
    }
    for list in idle_by_app.values_mut() {
        list.sort_by_key(|e| e.id);
        list.reverse(); // pop() takes the lowest id first
    }
    let mut free: BTreeMap<&str, u32> = ready
        .iter()
        .map(|(name, n)| {
            (
                *name,
                n.slots.saturating_sub(used.get(name).copied().unwrap_or(0)),
            )
        })
        .collect();
    let mut released: Vec<ExecutorId> = Vec::new();
    for (s, mut need) in under {
        let app_name = s.application.as_str();
        let Some(app) = apps.get(app_name) else {
            continue;
        };
        while need > 0 {
            let Some(e) = idle_by_app.get_mut(app_name).and_then(Vec::pop) else {
                break;
            };
            decisions.push(Decision::Bind {
                executor: e.id,
                session: s.id,
            });
            need -= 1;
        }
        let in_flight = launching_by_app.entry(app_name).or_default();
        let absorbed = need.min(*in_flight);
        *in_flight -= absorbed;
        need -= absorbed;
        let live = live_per_app.entry(app_name).or_default();
        while need > 0 && app.launchable && *live < app.max_instances {
            // The node with the most free slots; ties broken by name for determinism.
            let best = free
                .iter()
                .filter(|(_, f)| **f > 0)
                .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
                .map(|(n, _)| *n);
            let node = match best {
                Some(n) => n,
                None => {
                    // No free slot: release an Idle executor of another application.
                    let victim = idle_by_app
                        .iter_mut()
                        .filter(|(a, _)| **a != app_name)
                        .find_map(|(_, l)| l.pop());
                    if let Some(v) = victim {
                        released.push(v.id);
                        decisions.push(Decision::Release { executor: v.id });
                    }
                    // The slot frees when the release completes; launch on a later pass.
                    break;
                }
            };
            if let Some(f) = free.get_mut(node) {
                *f -= 1;
            }
            decisions.push(Decision::Launch {
                node: node.to_string(),
                application: app_name.to_string(),
            });
            *live += 1;
            need -= 1;
        }
    }

    // 3b. Idle executors past their application's delay_release are released.
    for list in idle_by_app.values() {
        for e in list {
            if released.contains(&e.id) {
                continue;
            }
            let delay = apps
                .get(e.application.as_str())
                .map_or(0, |a| a.delay_release_ms);
            if snap.now_ms.saturating_sub(e.quiet_since_ms) >= delay {
                decisions.push(Decision::Release { executor: e.id });
            }
        }
    }
    decisions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, slots: u32) -> NodeView {
        NodeView {
            name: name.into(),
            ready: true,
            slots,
        }
    }

    fn app(name: &str, max: u32) -> AppView {
        AppView {
            name: name.into(),
            max_instances: max,
            delay_release_ms: 1000,
            launchable: true,
        }
    }

    fn session(id: u64, app: &str, demand: u64) -> SessionView {
        SessionView {
            id: SessionId(id),
            application: app.into(),
            open: true,
            demand,
        }
    }

    fn exec(id: u64, app: &str, phase: ExecutorPhase, session: Option<u64>) -> ExecutorView {
        ExecutorView {
            id: ExecutorId(id),
            node: "n1".into(),
            application: app.into(),
            phase,
            session: session.map(SessionId),
            quiet_since_ms: 0,
            outstanding: 0,
        }
    }

    #[test]
    fn proportional_never_exceeds_capacity_or_demand() {
        assert_eq!(proportional_targets(4, &[100, 100]), vec![2, 2]);
        assert_eq!(proportional_targets(4, &[1, 100]), vec![1, 3]);
        assert_eq!(proportional_targets(3, &[0, 5, 5]), vec![0, 2, 1]);
        assert_eq!(proportional_targets(1, &[5, 5]), vec![1, 0]);
        assert_eq!(proportional_targets(10, &[2, 3]), vec![2, 3]);
        assert_eq!(proportional_targets(0, &[2, 3]), vec![0, 0]);
    }

    #[test]
    fn launches_up_to_capacity_and_max_instances() {
        let snap = Snapshot {
            now_ms: 0,
            nodes: vec![node("n1", 4)],
            applications: vec![app("ping", 3)],
            sessions: vec![session(1, "ping", 100)],
            executors: vec![],
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
        a.launchable = false;
        let snap = Snapshot {
            now_ms: 0,
            nodes: vec![node("n1", 4)],
            applications: vec![a],
            sessions: vec![session(1, "ping", 100)],
            executors: vec![],
        };
        assert!(schedule(&snap).is_empty());
    }

    #[test]
    fn backing_off_app_does_not_starve_others() {
        let mut broken = app("broken", 3);
        broken.launchable = false;
        let snap = Snapshot {
            now_ms: 0,
            nodes: vec![node("n1", 1)],
            applications: vec![broken, app("ping", 3)],
            sessions: vec![session(1, "broken", 100), session(2, "ping", 100)],
            executors: vec![],
        };
        assert_eq!(
            schedule(&snap),
            vec![Decision::Launch {
                node: "n1".into(),
                application: "ping".into()
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
        };
        assert_eq!(
            schedule(&snap),
            vec![Decision::Unbind {
                executor: ExecutorId(1)
            }]
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
        };
        assert_eq!(
            schedule(&snap),
            vec![Decision::Release {
                executor: ExecutorId(1)
            }]
        );
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn arb_snapshot() -> impl Strategy<Value = Snapshot> {
        (
            prop::collection::vec((1u32..8, any::<bool>()), 1..5),
            prop::collection::vec((0usize..3, 0u64..200, any::<bool>()), 0..6),
            prop::collection::vec((0usize..3, 0usize..6, 0u8..6, 0usize..5), 0..12),
            1u32..6,
            0u64..5_000,
        )
            .prop_map(|(nodes, sessions, execs, max_instances, now_ms)| {
                let apps = ["a", "b", "c"];
                let nodes: Vec<NodeView> = nodes
                    .into_iter()
                    .enumerate()
                    .map(|(i, (slots, ready))| NodeView {
                        name: format!("n{i}"),
                        ready,
                        slots,
                    })
                    .collect();
                let sessions: Vec<SessionView> = sessions
                    .into_iter()
                    .enumerate()
                    .map(|(i, (app, demand, open))| SessionView {
                        id: SessionId(i as u64 + 1),
                        application: apps[app].into(),
                        open,
                        demand,
                    })
                    .collect();
                let phases = [
                    ExecutorPhase::Launching,
                    ExecutorPhase::Idle,
                    ExecutorPhase::Binding,
                    ExecutorPhase::Bound,
                    ExecutorPhase::Unbinding,
                    ExecutorPhase::Releasing,
                ];
                let executors = execs
                    .into_iter()
                    .enumerate()
                    .map(|(i, (app, sess, phase, node))| {
                        let phase = phases[phase as usize];
                        let session = matches!(
                            phase,
                            ExecutorPhase::Binding
                                | ExecutorPhase::Bound
                                | ExecutorPhase::Unbinding
                        )
                        .then(|| sessions.get(sess).map(|s| s.id))
                        .flatten();
                        let app = session
                            .and_then(|id| sessions.iter().find(|s| s.id == id))
                            .map_or(apps[app].to_string(), |s| s.application.clone());
                        ExecutorView {
                            id: ExecutorId(i as u64 + 1),
                            node: format!("n{}", node % nodes.len()),
                            application: app,
                            phase,
                            session,
                            quiet_since_ms: 0,
                            outstanding: 0,
                        }
                    })
                    .collect();
                Snapshot {
                    now_ms,
                    nodes,
                    applications: apps
                        .iter()
                        .map(|a| AppView {
                            name: (*a).into(),
                            max_instances,
                            delay_release_ms: 1000,
                            launchable: true,
                        })
                        .collect(),
                    sessions,
                    executors,
                }
            })
    }

    proptest! {
        #[test]
        fn decisions_respect_capacity_apps_and_states(snap in arb_snapshot()) {
            let decisions = schedule(&snap);
            let mut used: HashMap<&str, u32> = HashMap::new();
            let mut live: HashMap<&str, u32> = HashMap::new();
            for e in &snap.executors {
                *used.entry(e.node.as_str()).or_default() += 1;
                *live.entry(e.application.as_str()).or_default() += 1;
            }
            let mut touched = std::collections::HashSet::new();
            for d in &decisions {
                match d {
                    Decision::Launch { node, application } => {
                        let n = snap.nodes.iter().find(|n| &n.name == node).unwrap();
                        prop_assert!(n.ready, "launch on a node that is not ready");
                        let u = used.entry(node.as_str()).or_default();
                        *u += 1;
                        prop_assert!(*u <= n.slots, "node {} over its slots", node);
                        let l = live.entry(application.as_str()).or_default();
                        *l += 1;
                        let max = snap.applications.iter().find(|a| &a.name == application).unwrap().max_instances;
                        prop_assert!(*l <= max, "{} over max_instances", application);
                    }
                    Decision::Bind { executor, session } => {
                        let e = snap.executors.iter().find(|e| e.id == *executor).unwrap();
                        let s = snap.sessions.iter().find(|s| s.id == *session).unwrap();
                        prop_assert_eq!(e.phase, ExecutorPhase::Idle);
                        prop_assert_eq!(&e.application, &s.application);
                        prop_assert!(s.demand > 0);
                        prop_assert!(touched.insert(*executor), "executor decided twice");
                    }
                    Decision::Unbind { executor } => {
                        let e = snap.executors.iter().find(|e| e.id == *executor).unwrap();
                        prop_assert!(matches!(e.phase, ExecutorPhase::Binding | ExecutorPhase::Bound));
                        prop_assert!(touched.insert(*executor), "executor decided twice");
                    }
                    Decision::Release { executor } => {
                        let e = snap.executors.iter().find(|e| e.id == *executor).unwrap();
                        prop_assert_eq!(e.phase, ExecutorPhase::Idle);
                        prop_assert!(touched.insert(*executor), "executor decided twice");
                    }
                }
            }
        }

        #[test]
        fn targets_never_exceed_capacity_or_demand(
            capacity in 0u64..64,
            demands in prop::collection::vec(0u64..100, 0..10),
        ) {
            let t = proportional_targets(capacity, &demands);
            prop_assert!(t.iter().sum::<u64>() <= capacity);
            for (t, d) in t.iter().zip(&demands) {
                prop_assert!(t <= d);
            }
            // Work-conserving: slots stay unused only when every demand is met.
            if t.iter().sum::<u64>() < capacity {
                prop_assert_eq!(&t, &demands);
            }
        }
    }
}
