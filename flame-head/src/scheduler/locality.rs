//! Data-aware placement (issue 20): a session's new executors go, where one fits, to the
//! node holding the most of its data (its common data and its pending tasks' input
//! objects), so its tasks read their inputs from the local cache instead of fetching them.
//!
//! What the planner reads is [`DataNodes`], given beside the snapshot
//! ([`plan_with_data`](super::plan_with_data)); the order is [`rank_nodes_by_data`]. Only the
//! launch of a unit ([`Planner::launch_unit`](super::planner::Planner)) uses it, and only
//! among nodes where an executor fits now under the same rules as today (not reserved,
//! selector, GPU room kept): data never makes room, never waits for room, and never moves a
//! gang. When none of a session's data nodes fits, or it has none listed, the node is the
//! one chosen today (most free cpu, nodes without GPUs first), so with no data listed every
//! decision is the same as without this module (the pinned simulation traces show it).
//!
//! Cost: per unit launched, O(k log k) for the session's k data nodes, k at most
//! [`DATA_NODES_MAX`]; nothing per node of the cluster.

use super::planner::Planner;
use super::room::Free;
use super::SessionView;
use flame_protocol::SessionId;
use rustc_hash::FxHashMap as HashMap;
use std::collections::BTreeMap;

/// Most data nodes looked at per session (the first ones listed): the core lists a
/// session's nodes by bytes held, most first.
pub const DATA_NODES_MAX: usize = 16;

/// Where sessions' data lies, for the planner's choice of a node for their new executors:
/// per session, `(node name, bytes of the session's data it holds)`, most first (its common
/// data and its pending tasks' input objects; the core builds it from its object locations).
/// Sessions not listed, and nodes with 0 bytes, count as holding nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DataNodes {
    /// Per session, the nodes holding its data and how many bytes of it each holds.
    pub sessions: BTreeMap<SessionId, Vec<(String, u64)>>,
}

/// What [`Planner::new`] starts with: no session's data listed anywhere.
pub(super) static NO_DATA: DataNodes = DataNodes {
    sessions: BTreeMap::new(),
};

/// The order to try `candidates` in for a new executor of a session whose data lies on
/// `data_nodes`: indexes into `candidates`, those holding more of the session's bytes first
/// (a node listed twice counts its bytes once per listing); nodes holding equally much,
/// and nodes holding nothing, keep the order of `candidates` (today's order). O(c + d).
pub fn rank_nodes_by_data(candidates: &[&str], data_nodes: &[(String, u64)]) -> Vec<usize> {
    let mut bytes: HashMap<&str, u64> = HashMap::default();
    for (node, b) in data_nodes {
        let held = bytes.entry(node.as_str()).or_default();
        *held = held.saturating_add(*b);
    }
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    // Stable: ties keep the candidates' order.
    order.sort_by_key(|&i| {
        std::cmp::Reverse(
            candidates
                .get(i)
                .and_then(|c| bytes.get(c))
                .copied()
                .unwrap_or(0),
        )
    });
    order
}

impl<'a> Planner<'a> {
    /// The node for a new executor of `s` by where its data lies: of the session's data
    /// nodes (the first [`DATA_NODES_MAX`] listed) that are ready and where `fits` says one
    /// fits now, the one holding the most of its bytes, ties in today's order (nodes without
    /// GPUs first, then the most free cpu, then name). `None` when the session lists no data
    /// node or none fits: the caller then chooses as today.
    pub(super) fn data_node_for(
        &self,
        s: &SessionView,
        fits: impl Fn(usize, &Free) -> bool,
    ) -> Option<usize> {
        let listed = self.data.sessions.get(&s.id)?;
        let listed = listed.get(..DATA_NODES_MAX).unwrap_or(listed);
        let mut fit: Vec<usize> = listed
            .iter()
            .filter(|(_, bytes)| *bytes > 0)
            .filter_map(|(name, _)| self.node_index.get(name.as_str()).copied())
            .filter(|&n| self.free.get(n).is_some_and(|f| fits(n, f)))
            .collect();
        if fit.is_empty() {
            return None;
        }
        fit.sort_by_key(|&n| {
            let gpus = self.nodes.get(n).map_or(0, |v| v.gpus);
            let cpu = self.free.get(n).map_or(0, |f| f.cpu_millis);
            (gpus > 0, std::cmp::Reverse(cpu), n)
        });
        fit.dedup();
        let names: Vec<&str> = fit
            .iter()
            .filter_map(|&n| self.nodes.get(n).map(|v| v.name.as_str()))
            .collect();
        let best = *rank_nodes_by_data(&names, listed).first()?;
        fit.get(best).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;

    fn owned(list: &[(&str, u64)]) -> Vec<(String, u64)> {
        list.iter().map(|(n, b)| (n.to_string(), *b)).collect()
    }

    #[test]
    fn more_bytes_first_ties_in_the_given_order() {
        let candidates = ["a", "b", "c", "d"];
        let data = owned(&[("c", 10), ("b", 30), ("d", 10)]);
        assert_eq!(rank_nodes_by_data(&candidates, &data), vec![1, 2, 3, 0]);
    }

    #[test]
    fn no_data_keeps_the_given_order() {
        let candidates = ["z", "a", "m"];
        assert_eq!(rank_nodes_by_data(&candidates, &[]), vec![0, 1, 2]);
        let elsewhere = owned(&[("q", 5)]);
        assert_eq!(rank_nodes_by_data(&candidates, &elsewhere), vec![0, 1, 2]);
    }

    #[test]
    fn a_node_listed_twice_adds_up() {
        let candidates = ["a", "b"];
        let data = owned(&[("a", 10), ("b", 15), ("a", 10)]);
        assert_eq!(rank_nodes_by_data(&candidates, &data), vec![0, 1]);
        let huge = owned(&[("a", u64::MAX), ("a", u64::MAX), ("b", 1)]);
        assert_eq!(rank_nodes_by_data(&candidates, &huge), vec![0, 1]);
    }

    fn node(name: &str, cpus: u32, gpus: u32) -> NodeView {
        NodeView {
            name: name.into(),
            ready: true,
            cpu_millis: cpus * 1000,
            memory_bytes: 64 << 30,
            gpus,
            labels: BTreeMap::new(),
            draining: false,
        }
    }

    /// Three nodes with room for executors of one cpu: `big` has the most free cpu of the
    /// nodes without GPUs (today's choice), `small` less, `gpu` more but has GPUs; one
    /// session wanting `demand` executors.
    fn snapshot(demand: u64) -> Snapshot {
        Snapshot {
            now_ms: 0,
            nodes: vec![node("big", 16, 0), node("small", 4, 0), node("gpu", 32, 4)],
            applications: vec![AppView {
                name: "app".into(),
                max_instances: 100,
                delay_release_ms: 1000,
                resources: Resources {
                    cpu_millis: 1000,
                    memory_bytes: Some(1 << 30),
                    gpus: 0,
                },
                selector: BTreeMap::new(),
                backing_off: BTreeMap::new(),
                probing: Default::default(),
            }],
            sessions: vec![SessionView {
                id: SessionId(1),
                application: "app".into(),
                open: true,
                demand,
                owner: "o".into(),
                priority: 0,
                gang: None,
            }],
            // All of `gpu`'s GPUs are taken: work without GPUs fits beside them.
            executors: vec![ExecutorView {
                id: ExecutorId(1),
                node: "gpu".into(),
                application: "trainer".into(),
                owner: "o2".into(),
                phase: ExecutorPhase::Launching,
                session: None,
                quiet_since_ms: 0,
                outstanding: 0,
                resources: Resources {
                    cpu_millis: 0,
                    memory_bytes: None,
                    gpus: 4,
                },
            }],
            owner_weights: BTreeMap::new(),
        }
    }

    fn launched_on(plan: &Plan) -> Vec<String> {
        plan.decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Launch { node, .. } => Some(node.clone()),
                _ => None,
            })
            .collect()
    }

    fn data(list: &[(&str, u64)]) -> DataNodes {
        DataNodes {
            sessions: [(SessionId(1), owned(list))].into(),
        }
    }

    #[test]
    fn new_executors_go_where_the_data_is_while_it_fits() {
        let snap = snapshot(6);
        assert_eq!(
            launched_on(&plan(&snap))[0],
            "big",
            "today: the most free cpu"
        );
        let placed = launched_on(&plan_with_data(&snap, &data(&[("small", 1 << 30)])));
        // Four fit on `small`; then the rest go where they go today.
        assert_eq!(placed, ["small", "small", "small", "small", "big", "big"]);
    }

    #[test]
    fn more_bytes_win_and_ties_go_as_today() {
        let snap = snapshot(1);
        let d = data(&[("small", 10), ("big", 20)]);
        assert_eq!(launched_on(&plan_with_data(&snap, &d)), ["big"]);
        let d = data(&[("small", 10), ("big", 10)]);
        assert_eq!(launched_on(&plan_with_data(&snap, &d)), ["big"]);
        // Equal bytes on a GPU node and one without: the one without, as today.
        let d = data(&[("gpu", 10), ("small", 10)]);
        assert_eq!(launched_on(&plan_with_data(&snap, &d)), ["small"]);
        // A GPU node holding more wins; its GPUs keep their share of cpu and memory.
        let d = data(&[("gpu", 20), ("small", 10)]);
        assert_eq!(launched_on(&plan_with_data(&snap, &d)), ["gpu"]);
    }

    #[test]
    fn data_on_nodes_that_take_nothing_new_is_ignored() {
        let mut snap = snapshot(1);
        snap.nodes[1].draining = true;
        let d = data(&[("small", 10), ("gone", 99)]);
        assert_eq!(launched_on(&plan_with_data(&snap, &d)), ["big"]);
        snap.nodes[1].draining = false;
        snap.nodes[1].ready = false;
        assert_eq!(launched_on(&plan_with_data(&snap, &d)), ["big"]);
        let zero = data(&[("small", 0)]);
        snap.nodes[1].ready = true;
        assert_eq!(launched_on(&plan_with_data(&snap, &zero)), ["big"]);
    }

    #[test]
    fn no_data_listed_plans_exactly_as_today() {
        let snap = snapshot(40);
        let today = plan(&snap);
        assert_eq!(plan_with_data(&snap, &DataNodes::default()), today);
        let other_session = DataNodes {
            sessions: [(SessionId(7), owned(&[("small", 10)]))].into(),
        };
        assert_eq!(plan_with_data(&snap, &other_session), today);
    }
}
