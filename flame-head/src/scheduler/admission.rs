//! Admission: whether what a new session asks for could ever be placed, judged when it is
//! opened, so that a request no node can hold fails at once instead of waiting forever.
//!
//! "Ever" means on the nodes the head knows (every node registered with it, Ready or not,
//! draining or not), each as if it ran nothing: a request that fits none of them would
//! need a bigger node to join, and the user is told so at once, with the largest node,
//! rather than waiting for one that may never come. Two cases are left to wait, with the
//! scheduler's reason ([`Plan::waiting`](super::Plan::waiting)) shown meanwhile:
//! - no node is registered at all: the head of a cluster being brought up starts before
//!   its nodes, so nothing can be judged yet;
//! - no known node carries the labels its application selects: labelled nodes are the
//!   ones an operator adds for a purpose, and may join later.

use super::room::{node_total, place_gang};
use super::{selector_matches, AppView, Gang, NodeView};
use flame_protocol::model::{format_bytes, format_cpus};

/// Why no known node, even empty, could ever hold `app`'s executor (or, for `gang`, all
/// its ranks at once), naming the largest node; `None` when one could, or when it cannot
/// be judged yet (see the module doc).
pub fn never_fits_cluster(nodes: &[NodeView], app: &AppView, gang: Option<Gang>) -> Option<String> {
    let matching: Vec<&NodeView> = nodes
        .iter()
        .filter(|n| selector_matches(&app.selector, &n.labels))
        .collect();
    let largest = largest_node(&matching, app)?;
    let whole: Vec<_> = matching.iter().map(|n| node_total(n)).collect();
    let (what, fits) = match gang {
        Some(gang) => (
            format!(
                "the {} ranks of the job ({} each{})",
                gang.ranks,
                app.resources,
                gang.ranks_per_node
                    .map(|k| format!(", {k} per node"))
                    .unwrap_or_default()
            ),
            place_gang(&whole, &whole, &matching, app, gang, |_| true).is_some(),
        ),
        None => (
            format!("an executor of `{}` ({})", app.name, app.resources),
            whole.iter().any(|w| w.fits(&app.resources)),
        ),
    };
    if fits {
        return None;
    }
    let labels = if app.selector.is_empty() {
        String::new()
    } else {
        " with the labels it selects".to_string()
    };
    Some(format!(
        "no node can ever hold {what}, even with nothing else running: the largest of the {} \
         node(s){labels} known to the head, `{}`, offers cpus {}, memory {}, gpus {}",
        matching.len(),
        largest.name,
        format_cpus(largest.cpu_millis),
        format_bytes(largest.memory_bytes),
        largest.gpus,
    ))
}

/// The node that comes closest to holding `app`'s executor: the most GPUs first when it
/// needs some, then the most cpus, then memory; ties by name. `None` when there is none.
fn largest_node<'a>(nodes: &[&'a NodeView], app: &AppView) -> Option<&'a NodeView> {
    let wants_gpus = app.resources.gpus > 0;
    let key = |n: &NodeView| {
        (
            if wants_gpus { n.gpus } else { 0 },
            n.cpu_millis,
            n.memory_bytes,
            n.gpus,
        )
    };
    nodes
        .iter()
        .copied()
        .max_by(|&a, &b| key(a).cmp(&key(b)).then_with(|| b.name.cmp(&a.name)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flame_protocol::model::Resources;
    use std::collections::BTreeMap;

    fn node(name: &str, cpus: u32, gpus: u32) -> NodeView {
        NodeView {
            name: name.into(),
            ready: false,
            cpu_millis: cpus * 1000,
            memory_bytes: 8 << 30,
            gpus,
            labels: BTreeMap::new(),
            draining: false,
        }
    }

    fn app(cpus: u32, gpus: u32) -> AppView {
        AppView {
            name: "job.7".into(),
            max_instances: 64,
            delay_release_ms: 0,
            resources: Resources {
                cpu_millis: cpus * 1000,
                memory_bytes: Some(1 << 30),
                gpus,
            },
            selector: BTreeMap::new(),
            backing_off: BTreeMap::new(),
            probing: Default::default(),
        }
    }

    const FOUR: Gang = Gang {
        ranks: 4,
        ranks_per_node: None,
    };

    #[test]
    fn a_gang_too_big_for_every_node_together_names_the_largest() {
        let nodes = [node("small", 1, 0), node("big", 2, 0)];
        let why = never_fits_cluster(&nodes, &app(1, 0), Some(FOUR)).unwrap();
        assert!(why.contains("the 4 ranks of the job"), "{why}");
        assert!(why.contains("`big`, offers cpus 2"), "{why}");
        // Nodes not Ready count: they may come back.
        let nodes = [node("a", 2, 0), node("b", 2, 0)];
        assert_eq!(never_fits_cluster(&nodes, &app(1, 0), Some(FOUR)), None);
    }

    #[test]
    fn gpus_no_node_has_are_refused_and_no_nodes_or_labels_wait() {
        let nodes = [node("cpu-only", 64, 0)];
        let why = never_fits_cluster(&nodes, &app(1, 1), None).unwrap();
        assert!(why.contains("an executor of `job.7`"), "{why}");
        assert!(why.contains("gpus 0"), "{why}");
        let nodes = [node("cpu-only", 64, 0), node("gpu", 8, 2)];
        assert_eq!(never_fits_cluster(&nodes, &app(1, 1), None), None);
        // Nothing to judge by: it waits.
        assert_eq!(never_fits_cluster(&[], &app(1_000, 9), None), None);
        let mut labelled = app(1, 0);
        labelled.selector.insert("zone".into(), "b".into());
        assert_eq!(never_fits_cluster(&nodes, &labelled, None), None);
    }
}
