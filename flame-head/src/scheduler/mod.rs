//! The scheduler: a pure function from a snapshot of the cluster to a list of decisions.
//!
//! It performs no I/O and reads no clock: time is the `now_ms` field of the snapshot. The
//! core applies the decisions; tests assert on them directly.
//!
//! Every map is ordered or hashed with a fixed hasher (`rustc-hash`), so the same snapshot
//! always gives the same decisions (the simulation checks it).
//!
//! [`plan`] makes a [`Planner`] and runs its phases, one method each, in this order; each
//! method's doc states what holds on entry and on exit, and the plan's invariants (no
//! executor decided on twice, executors only for their own pool, no node over-committed,
//! a gang launched whole or not at all) are asserted as it is made (the O(n) checks in
//! debug builds only):
//! 1. **Index** the snapshot: applications by name, Ready non-draining nodes by index in
//!    name order, the room free on each, and the executors each session holds.
//! 2. **Targets** ([`fair_shares`]): weighted DRF by progressive filling over the cpus,
//!    memory and GPUs of Ready, non-draining nodes; owners by their dominant share per
//!    weight, within an owner by priority, then by the dominant share each session holds;
//!    a gang all at once, within its owner's share. A session whose executors fit no node
//!    claims nothing and is told why.
//! 3. **Holdings**: the dominant share each owner holds ([`Holdings`]), and the elastic
//!    sessions under their target, the most deprived first.
//! 4. **Give back what is not used.** A session with no work unbinds once it is closed,
//!    once someone else waits, or after `delay_release`; one over its target unbinds the
//!    executors that ran out of tasks.
//! 5. **Sort the executors** by what they can do: Idle, launching, on their way out, and
//!    reclaimable, per node and per pool. A draining node's Idle executors are released.
//! 6. **Gangs** (`gangs.rs`), higher priority and older first: all ranks launched at once,
//!    or a bounded reservation of the nodes that can hold them once emptied.
//! 7. **Units** (`units.rs`), one executor at a time, to the owner holding the least for
//!    its weight ([`UnitQueue`]): reuse an Idle executor of its pool, count one on its way,
//!    launch where it fits (nodes without GPUs first), take over one from a session of the
//!    same owner over its target, wait for room being freed, or make room. Executors are
//!    pooled per (application, owner) and never serve another owner's session: they run as
//!    their owner's Unix identity. Between owners, room (not an executor) changes hands,
//!    and only while the giver still holds more for its weight than the taker
//!    ([`Holdings`]). An unbound executor finishes its task first. Sessions that cannot get
//!    what they need are given a reason (see [`Plan::waiting`]).
//! 8. **Idle executors** are released after `delay_release` (or, in phase 7, at once when
//!    their room is needed for another application).
//!
//! The rooms: `planner.rs` holds the [`Planner`] (phases 1 to 5 and 8, and the check of a
//! finished plan); `gangs.rs` and `units.rs` phases 6 and 7; `fair_share.rs` the targets;
//! `room.rs` the room per node ([`Free`](room::Free), GPU room kept, gang placement, nodes
//! by free cpu); `owners.rs` who is served next and who may give to whom; `reasons.rs` why
//! a session waits; `admission.rs` whether a new session's request could ever be placed
//! ([`never_fits_cluster`], asked when it opens); `locality.rs` the node a new executor prefers by where its session's
//! data lies ([`DataNodes`], given beside the snapshot to [`plan_with_data`]).
//!
//! [`Planner`]: planner::Planner
//! [`Holdings`]: owners::Holdings
//! [`UnitQueue`]: owners::UnitQueue

mod admission;
mod fair_share;
mod gangs;
mod locality;
mod owners;
mod planner;
mod reasons;
mod room;
mod units;

#[cfg(test)]
mod bench;
#[cfg(test)]
mod properties;
#[cfg(test)]
mod tests;

pub use admission::never_fits_cluster;
pub use fair_share::{fair_shares, ShareRequest};
use flame_protocol::model::Resources;
use flame_protocol::{ExecutorId, SessionId};
use planner::Planner;
use std::collections::BTreeMap;

pub use locality::{DataNodes, DATA_NODES_MAX};

/// What the scheduler sees of a node.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub name: String,
    pub ready: bool,
    /// What it offers to executors.
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    pub gpus: u32,
    pub labels: BTreeMap<String, String>,
    /// Nothing new is placed on it; its idle executors are released.
    pub draining: bool,
}

/// What the scheduler sees of an application.
#[derive(Debug, Clone)]
pub struct AppView {
    pub name: String,
    pub max_instances: u32,
    pub delay_release_ms: u64,
    /// What one executor needs.
    pub resources: Resources,
    /// Labels a node must carry.
    pub selector: BTreeMap<String, String>,
    /// Owners whose launches of it back off after failures (each owner's executors are
    /// its own, and may fail for reasons of its own: a missing account, its tasks
    /// crashing the application), with why their last executor failed to start, if none
    /// has started since.
    pub backing_off: BTreeMap<String, Option<String>>,
    /// Owners for whom no executor of it is known to start (none said ready since it was
    /// registered or updated, or the last launch failed): one is launched at a time until
    /// one says ready, so an application that never starts holds one executor's room at a
    /// time, not the room its sessions' demand would take.
    pub probing: std::collections::BTreeSet<String>,
}

impl AppView {
    /// Whether executors of it may be launched for `owner` now.
    pub fn launchable(&self, owner: &str) -> bool {
        !self.backing_off.contains_key(owner)
    }
}

/// What the scheduler sees of a session.
#[derive(Debug, Clone)]
pub struct SessionView {
    pub id: SessionId,
    pub application: String,
    pub open: bool,
    /// Pending plus running tasks.
    pub demand: u64,
    /// The tenant it is accounted to.
    pub owner: String,
    /// Served first among its owner's sessions when higher.
    pub priority: i32,
    /// A batch session whose executors (ranks) are placed all together or not at all.
    pub gang: Option<Gang>,
}

/// What a gang (batch) session asks for: `ranks` executors of its application, placed
/// together or not at all, and kept until the session ends (a rank is never reclaimed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gang {
    pub ranks: u32,
    /// Exactly this many ranks on each node used, when set.
    pub ranks_per_node: Option<u32>,
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
    /// The owner it was launched for: it serves only that owner's sessions (it runs as that
    /// owner's Unix identity on its node).
    pub owner: String,
    pub phase: ExecutorPhase,
    pub session: Option<SessionId>,
    /// When it last became Idle, or last finished a task while bound with none outstanding.
    pub quiet_since_ms: u64,
    /// Tasks handed to it and not yet answered.
    pub outstanding: u32,
    /// What it holds on its node.
    pub resources: Resources,
}

/// Everything the scheduler decides from.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub now_ms: u64,
    pub nodes: Vec<NodeView>,
    pub applications: Vec<AppView>,
    pub sessions: Vec<SessionView>,
    pub executors: Vec<ExecutorView>,
    /// Fair-share weight per owner; owners not listed weigh 1.
    pub owner_weights: BTreeMap<String, u32>,
}

/// One thing to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A new executor of `application` for sessions of `owner`.
    Launch {
        node: String,
        application: String,
        owner: String,
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

/// The scheduler's answer: what to do, and why sessions wait.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub decisions: Vec<Decision>,
    /// Sessions with pending work that get fewer executors than their share, and why.
    pub waiting: BTreeMap<SessionId, String>,
    /// Executors each session with work is meant to have.
    pub targets: BTreeMap<SessionId, u64>,
    /// Per owner with work: the dominant share its targets add up to, in thousandths of
    /// the cluster.
    pub owner_targets_permille: BTreeMap<String, u32>,
    /// Gangs waiting for the nodes reserved for them (nothing new goes there).
    pub reservations: BTreeMap<SessionId, Vec<String>>,
    /// Executors unbound for another session, and that session (a reclaim; executors
    /// given back for want of work are not listed).
    pub reclaimed_for: BTreeMap<ExecutorId, SessionId>,
}

/// The cluster's schedulable totals (Ready nodes that are not draining).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpus: u64,
}

impl Totals {
    /// What the nodes that take new work (Ready, not draining) offer in all.
    pub fn schedulable(nodes: &[NodeView]) -> Totals {
        let mut t = Totals::default();
        for n in nodes.iter().filter(|n| n.ready && !n.draining) {
            t.cpu_millis += u64::from(n.cpu_millis);
            t.memory_bytes = t.memory_bytes.saturating_add(n.memory_bytes);
            t.gpus += u64::from(n.gpus);
        }
        t
    }

    /// The largest fraction of any total that `r` takes: its dominant share. Infinite when
    /// it needs a resource the cluster has none of.
    pub fn dominant_share(&self, r: &Resources) -> f64 {
        let part = |need: u64, total: u64| -> f64 {
            if need == 0 {
                0.0
            } else if total == 0 {
                f64::INFINITY
            } else {
                need as f64 / total as f64
            }
        };
        part(u64::from(r.cpu_millis), self.cpu_millis)
            .max(part(r.memory_bytes.unwrap_or(0), self.memory_bytes))
            .max(part(u64::from(r.gpus), self.gpus))
    }
}

/// The node carries every label of the selector.
pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Computes the decisions for one snapshot.
#[cfg(test)]
pub fn schedule(snap: &Snapshot) -> Vec<Decision> {
    plan(snap).decisions
}

/// Computes the decisions for one snapshot, and why sessions wait: the phases of a
/// [`Planner`], in order.
pub fn plan(snap: &Snapshot) -> Plan {
    Planner::new(snap).run()
}

/// [`plan`], with new executors placed by where their sessions' data lies ([`DataNodes`],
/// `locality.rs`): where one fits, on the node holding the most of its session's bytes.
/// With no data listed the plan is exactly [`plan`]'s.
pub fn plan_with_data(snap: &Snapshot, data: &DataNodes) -> Plan {
    Planner::new(snap).with_data(data).run()
}
