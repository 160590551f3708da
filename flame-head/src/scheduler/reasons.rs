//! Why a session waits: the texts of [`Plan::waiting`](super::Plan::waiting) that more
//! than one phase gives.

use super::room::node_total;
use super::{selector_matches, AppView, Gang, NodeView};
use flame_protocol::model::{format_bytes, format_cpus};
use std::collections::BTreeMap;

fn describe_selector(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The waiting reason of a session whose application's launches back off.
pub(super) fn backing_off(app: &AppView, owner: &str) -> String {
    match app.backing_off.get(owner).and_then(Option::as_ref) {
        Some(why) => format!(
            "executors of `{}` fail to start, so launches back off; the last one {why}",
            app.name
        ),
        None => format!("executors of `{}` failed; launches back off", app.name),
    }
}

/// Why no Ready node could ever hold an executor of `app`, or `None` if one could.
pub(super) fn never_fits(app: &AppView, ready: &BTreeMap<&str, &NodeView>) -> Option<String> {
    let matching: Vec<&&NodeView> = ready
        .values()
        .filter(|n| selector_matches(&app.selector, &n.labels))
        .collect();
    if ready.is_empty() {
        return Some("no node is ready".to_string());
    }
    if matching.is_empty() {
        return Some(format!(
            "no ready node has the labels {} that application `{}` selects",
            describe_selector(&app.selector),
            app.name
        ));
    }
    if matching.iter().any(|n| node_total(n).fits(&app.resources)) {
        return None;
    }
    let largest = |f: fn(&NodeView) -> u64| matching.iter().map(|n| f(n)).max().unwrap_or(0);
    Some(format!(
        "no ready node can fit an executor of `{}` ({}); the largest offer cpus {}, memory {}, gpus {}",
        app.name,
        app.resources,
        format_cpus(u32::try_from(largest(|n| u64::from(n.cpu_millis))).unwrap_or(u32::MAX)),
        format_bytes(largest(|n| n.memory_bytes)),
        largest(|n| u64::from(n.gpus)),
    ))
}

/// Why a gang waits when no set of nodes can hold it.
pub(super) fn no_nodes_hold(gang: Gang, app: &AppView) -> String {
    format!(
        "no set of ready nodes can hold its {} ranks of `{}` ({} each{})",
        gang.ranks,
        app.name,
        app.resources,
        gang.ranks_per_node
            .map(|k| format!(", {k} per node"))
            .unwrap_or_default()
    )
}
