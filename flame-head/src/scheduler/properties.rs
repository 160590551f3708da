//! Property tests of the scheduler: for random snapshots, plans respect node capacity,
//! `max_instances` and executor states.

use super::*;
use proptest::prelude::*;
use std::collections::HashMap;

/// Three applications with different shapes: a whole cpu, half a cpu with 1 GiB, and
/// one cpu with a gpu.
fn resources_of(app: &str) -> Resources {
    match app {
        "a" => Resources::default(),
        "b" => Resources {
            cpu_millis: 500,
            memory_bytes: Some(1 << 30),
            gpus: 0,
        },
        _ => Resources {
            cpu_millis: 1000,
            memory_bytes: None,
            gpus: 1,
        },
    }
}

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
                    cpu_millis: slots * 1000,
                    memory_bytes: u64::from(slots) << 30,
                    gpus: slots % 3,
                    labels: BTreeMap::new(),
                    draining: i == 1,
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
                    owner: format!("o{}", i % 2),
                    priority: (i % 3) as i32,
                    gang: None,
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
                        ExecutorPhase::Binding | ExecutorPhase::Bound | ExecutorPhase::Unbinding
                    )
                    .then(|| sessions.get(sess).map(|s| s.id))
                    .flatten();
                    let bound_to = session.and_then(|id| sessions.iter().find(|s| s.id == id));
                    let app = bound_to.map_or(apps[app].to_string(), |s| s.application.clone());
                    let owner = bound_to.map_or(format!("o{}", i % 2), |s| s.owner.clone());
                    ExecutorView {
                        id: ExecutorId(i as u64 + 1),
                        node: format!("n{}", node % nodes.len()),
                        resources: resources_of(&app),
                        application: app,
                        owner,
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
                        backing_off: BTreeMap::new(),
                        probing: Default::default(),
                        resources: resources_of(a),
                        selector: BTreeMap::new(),
                    })
                    .collect(),
                sessions,
                executors,
                owner_weights: [("o1".to_string(), 3)].into(),
            }
        })
}

proptest! {
    #[test]
    fn decisions_respect_capacity_apps_and_states(snap in arb_snapshot()) {
        let decisions = schedule(&snap);
        // (cpu millis, memory, gpus) held per node.
        let mut used: HashMap<&str, (u64, u64, u32)> = HashMap::default();
        let mut live: HashMap<&str, u32> = HashMap::default();
        for e in &snap.executors {
            let u = used.entry(e.node.as_str()).or_default();
            u.0 += u64::from(e.resources.cpu_millis);
            u.1 += e.resources.memory_bytes.unwrap_or(0);
            u.2 += e.resources.gpus;
            *live.entry(e.application.as_str()).or_default() += 1;
        }
        let mut touched = std::collections::HashSet::new();
        for d in &decisions {
            match d {
                Decision::Launch { node, application, .. } => {
                    let n = snap.nodes.iter().find(|n| &n.name == node).unwrap();
                    prop_assert!(n.ready, "launch on a node that is not ready");
                    let r = resources_of(application);
                    let u = used.entry(node.as_str()).or_default();
                    let before = *u;
                    u.0 += u64::from(r.cpu_millis);
                    u.1 += r.memory_bytes.unwrap_or(0);
                    u.2 += r.gpus;
                    // A launch never takes more than is free (a node already over,
                    // after a restart adopted more than fits, gets nothing).
                    prop_assert!(before.0 + u64::from(r.cpu_millis) <= u64::from(n.cpu_millis), "node {} over its cpus", node);
                    if let Some(m) = r.memory_bytes {
                        prop_assert!(before.1 + m <= n.memory_bytes, "node {} over its memory", node);
                    }
                    if r.gpus > 0 {
                        prop_assert!(before.2 + r.gpus <= n.gpus, "node {} over its gpus", node);
                    }
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
                    prop_assert_eq!(&e.owner, &s.owner, "an executor bound to another owner's session");
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

}
