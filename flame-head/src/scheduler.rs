//! The scheduler: a pure function from a snapshot of the cluster to a list of decisions.
//!
//! It performs no I/O and reads no clock: time is the `now_ms` field of the snapshot. The
//! core applies the decisions; tests assert on them directly.
//!
//! Every map is ordered or hashed with a fixed hasher (`rustc-hash`), so the same snapshot
//! always gives the same decisions (the simulation checks it).
//!
//! Policy, in order:
//! 1. **Targets** ([`fair_shares`]): weighted DRF by progressive filling over the cpus,
//!    memory and GPUs of Ready, non-draining nodes; owners by their dominant share per
//!    weight, within an owner by priority, then by the dominant share each session holds;
//!    a gang all at once, within its owner's share. A session whose executors fit no node
//!    claims nothing and is told why.
//! 2. **Give back what is not used.** A session with no work unbinds once it is closed,
//!    once someone else waits, or after `delay_release`; one over its target unbinds the
//!    executors that ran out of tasks.
//! 3. **Gangs**, higher priority and older first: all ranks launched at once, or a bounded
//!    reservation of the nodes that can hold them once emptied.
//! 4. **Units**, one executor at a time, to the owner holding the least for its weight
//!    ([`UnitQueue`]): reuse an Idle executor of its pool, count one on its way, launch
//!    where it fits (nodes without GPUs first), take over one from a session of the same
//!    owner over its target, wait for room being freed, or make room. Executors are pooled
//!    per (application, owner) and never serve another owner's session: they run as their
//!    owner's Unix identity. Between owners, room (not an executor) changes hands, and only
//!    while the giver still holds more for its weight than the taker ([`Holdings`]). An unbound
//!    executor finishes its task first. Sessions that cannot get what they need are given
//!    a reason (see [`Plan::waiting`]).
//! 5. **Idle executors** are released after `delay_release`, or at once when their room is
//!    needed for another application.

use flame_protocol::model::{format_bytes, format_cpus, Resources};
use flame_protocol::{ExecutorId, SessionId};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::collections::BTreeMap;

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

/// What one session asks of the fair share.
#[derive(Debug, Clone)]
pub struct ShareRequest {
    pub owner: String,
    pub priority: i32,
    /// Executors it can use.
    pub demand: u64,
    /// What one of its executors needs.
    pub unit: Resources,
    /// Its application, whose `max_instances` bounds all its sessions together.
    pub application: String,
    /// All of its demand at once or nothing (a gang).
    pub atomic: bool,
}

/// Weighted dominant-resource fair share (DRF) by progressive filling: executors go one at
/// a time to the owner whose dominant share divided by its weight is lowest, and within
/// that owner to its highest-priority session with unmet demand, equal priorities taking
/// turns by the dominant share they have (so each gets one before any gets a second, and
/// a backlog that grows does not move executors between them). An atomic request (a gang)
/// gets all of its demand at once or nothing: first, within its owner's weighted share,
/// when no elastic session of its owner has a higher priority; else in its turn. An
/// owner whose next executor no longer fits in what is left, or whose sessions are all
/// served, drops out. Returns executors per request.
pub fn fair_shares(
    totals: Totals,
    requests: &[ShareRequest],
    weights: &BTreeMap<String, u32>,
    app_caps: &BTreeMap<String, u64>,
) -> Vec<u64> {
    use std::cmp::Ordering;
    use std::collections::BinaryHeap;
    let mut given = vec![0u64; requests.len()];
    let mut left = totals;
    // Applications and owners by index, so the hot loop compares integers, not names.
    let mut app_index: BTreeMap<&str, usize> = BTreeMap::new();
    let app_of: Vec<usize> = requests
        .iter()
        .map(|r| {
            let next = app_index.len();
            *app_index.entry(r.application.as_str()).or_insert(next)
        })
        .collect();
    let mut app_room: Vec<u64> = vec![u64::MAX; app_index.len()];
    for (name, &i) in &app_index {
        if let Some(&cap) = app_caps.get(*name) {
            app_room[i] = cap;
        }
    }
    let shares: Vec<f64> = requests
        .iter()
        .map(|r| totals.dominant_share(&r.unit))
        .collect();
    // Owners in name order (the tie-break), each with a heap of its sessions.
    let mut owners: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, r) in requests.iter().enumerate() {
        if r.demand > 0 && shares[i].is_finite() {
            owners.entry(r.owner.as_str()).or_default().push(i);
        }
    }
    /// A session's claim on its owner's next executor: higher priority first, then the
    /// smaller dominant share already given (sessions of one priority share their owner's
    /// share as owners share the cluster, whatever their backlogs), then the lower index.
    struct Claim {
        priority: i32,
        given: u64,
        demand: u64,
        /// Dominant share given so far.
        held: f64,
        index: usize,
    }
    impl PartialEq for Claim {
        fn eq(&self, other: &Self) -> bool {
            self.cmp(other) == Ordering::Equal
        }
    }
    impl Eq for Claim {}
    impl PartialOrd for Claim {
        fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for Claim {
        fn cmp(&self, other: &Self) -> Ordering {
            self.priority
                .cmp(&other.priority)
                .then_with(|| other.held.total_cmp(&self.held))
                .then_with(|| other.index.cmp(&self.index))
        }
    }
    let weight_of: Vec<f64> = owners
        .keys()
        .map(|o| f64::from(weights.get(*o).copied().unwrap_or(1).max(1)))
        .collect();
    let weight_sum: f64 = weight_of.iter().sum();
    let cap: Vec<f64> = weight_of.iter().map(|w| w / weight_sum).collect();
    let mut share = vec![0.0f64; owners.len()];
    let fits = |left: &Totals, u: &Resources| {
        left.cpu_millis >= u64::from(u.cpu_millis)
            && left.memory_bytes >= u.memory_bytes.unwrap_or(0)
            && left.gpus >= u64::from(u.gpus)
    };
    // Gangs first, each whole, within its owner's weighted share, ahead of that owner's
    // elastic sessions of no higher priority: a gang cannot grow an executor at a time,
    // so taking turns with them would starve it behind any busy elastic session.
    let mut gangs_first: Vec<(usize, usize)> = Vec::new();
    for (o, list) in owners.values().enumerate() {
        let top_elastic = list
            .iter()
            .filter(|&&i| !requests[i].atomic)
            .map(|&i| requests[i].priority)
            .max();
        for &i in list {
            if requests[i].atomic && top_elastic.is_none_or(|p| requests[i].priority >= p) {
                gangs_first.push((o, i));
            }
        }
    }
    gangs_first.sort_by(|a, b| {
        requests[b.1]
            .priority
            .cmp(&requests[a.1].priority)
            .then(a.1.cmp(&b.1))
    });
    let mut placed_first = vec![false; requests.len()];
    for (o, i) in gangs_first {
        let r = &requests[i];
        let all = times(&r.unit, r.demand);
        if app_room[app_of[i]] < r.demand
            || !fits(&left, &all)
            || share[o] + shares[i] * r.demand as f64 > cap[o] + 1e-9
        {
            continue; // left to the turns below, then to what nobody claims
        }
        given[i] = r.demand;
        placed_first[i] = true;
        app_room[app_of[i]] -= r.demand;
        left.cpu_millis -= u64::from(all.cpu_millis);
        left.memory_bytes -= all.memory_bytes.unwrap_or(0);
        left.gpus -= u64::from(all.gpus);
        share[o] += shares[i] * r.demand as f64;
    }
    let mut claims: Vec<BinaryHeap<Claim>> = owners
        .values()
        .map(|list| {
            list.iter()
                .filter(|&&i| !placed_first[i])
                .map(|&i| Claim {
                    priority: requests[i].priority,
                    given: 0,
                    demand: requests[i].demand,
                    held: 0.0,
                    index: i,
                })
                .collect()
        })
        .collect();
    let mut turns: BinaryHeap<Turn> = (0..claims.len())
        .map(|o| Turn(share[o] / weight_of[o], o))
        .collect();
    let mut deferred: Vec<Claim> = Vec::new();
    while let Some(Turn(_, owner)) = turns.pop() {
        // The owner's best claim that can still be met. A claim that cannot is dropped for
        // good: what is left only shrinks, and so does an application's room.
        let heap = &mut claims[owner];
        let mut picked = None;
        while let Some(claim) = heap.pop() {
            let i = claim.index;
            let r = &requests[i];
            let count = if r.atomic { r.demand } else { 1 };
            let all = times(&r.unit, count);
            if app_room[app_of[i]] < count || !fits(&left, &all) {
                continue;
            }
            // A gang goes in one piece: only within its owner's weighted share of the
            // cluster, or (below) into what nobody else claims.
            if r.atomic && share[owner] + shares[i] * count as f64 > cap[owner] + 1e-9 {
                deferred.push(claim);
                continue;
            }
            picked = Some(claim);
            break;
        }
        let Some(mut claim) = picked else {
            continue; // nothing more fits or is wanted: the owner drops out
        };
        let i = claim.index;
        let r = &requests[i];
        let count = if r.atomic { r.demand } else { 1 };
        given[i] += count;
        app_room[app_of[i]] -= count;
        left.cpu_millis -= u64::from(r.unit.cpu_millis) * count;
        left.memory_bytes -= r.unit.memory_bytes.unwrap_or(0) * count;
        left.gpus -= u64::from(r.unit.gpus) * count;
        claim.given += count;
        claim.held += shares[i] * count as f64;
        if claim.given < claim.demand {
            heap.push(claim);
        }
        share[owner] += shares[i] * count as f64;
        turns.push(Turn(share[owner] / weight_of[owner], owner));
    }
    // Gangs larger than their owner's share take what is left, if it holds them.
    deferred.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.index.cmp(&b.index)));
    for claim in deferred {
        let i = claim.index;
        let r = &requests[i];
        let all = times(&r.unit, r.demand);
        if app_room[app_of[i]] >= r.demand && fits(&left, &all) {
            given[i] = r.demand;
            app_room[app_of[i]] -= r.demand;
            left.cpu_millis -= u64::from(all.cpu_millis);
            left.memory_bytes -= all.memory_bytes.unwrap_or(0);
            left.gpus -= u64::from(all.gpus);
        }
    }
    given
}

/// Free resources of one node while a plan is made.
#[derive(Debug, Clone, Copy, Default)]
struct Free {
    cpu_millis: u64,
    memory_bytes: u64,
    gpus: u32,
}

impl Free {
    fn fits(&self, r: &Resources) -> bool {
        self.cpu_millis >= u64::from(r.cpu_millis)
            && r.memory_bytes.is_none_or(|m| self.memory_bytes >= m)
            && self.gpus >= r.gpus
    }

    fn take(&mut self, r: &Resources) {
        self.cpu_millis = self.cpu_millis.saturating_sub(u64::from(r.cpu_millis));
        self.memory_bytes = self
            .memory_bytes
            .saturating_sub(r.memory_bytes.unwrap_or(0));
        self.gpus = self.gpus.saturating_sub(r.gpus);
    }

    fn of(r: &Resources) -> Free {
        Free {
            cpu_millis: u64::from(r.cpu_millis),
            memory_bytes: r.memory_bytes.unwrap_or(0),
            gpus: r.gpus,
        }
    }

    fn add(&mut self, o: &Free) {
        self.cpu_millis += o.cpu_millis;
        self.memory_bytes = self.memory_bytes.saturating_add(o.memory_bytes);
        self.gpus += o.gpus;
    }

    /// Takes as much of `want` as there is; returns what is still wanting.
    fn take_up_to(&mut self, want: Free) -> Free {
        let cpu = self.cpu_millis.min(want.cpu_millis);
        let memory = self.memory_bytes.min(want.memory_bytes);
        let gpus = self.gpus.min(want.gpus);
        self.cpu_millis -= cpu;
        self.memory_bytes -= memory;
        self.gpus -= gpus;
        Free {
            cpu_millis: want.cpu_millis - cpu,
            memory_bytes: want.memory_bytes - memory,
            gpus: want.gpus - gpus,
        }
    }

    fn give(&mut self, r: &Resources) {
        self.cpu_millis += u64::from(r.cpu_millis);
        self.memory_bytes = self
            .memory_bytes
            .saturating_add(r.memory_bytes.unwrap_or(0));
        self.gpus += r.gpus;
    }
}

/// Whether `r` fits in `room` on node `n` and, when it needs no GPU, leaves the cpu and
/// memory that the node's free GPUs come with (its cpus and memory per GPU, times the free
/// GPUs): work without GPUs may use a GPU node, but never so that its free GPUs cannot be
/// used.
fn fits_beside_gpus(n: &NodeView, room: &Free, r: &Resources) -> bool {
    if !room.fits(r) {
        return false;
    }
    if r.gpus > 0 || n.gpus == 0 {
        return true;
    }
    let free_gpus = u64::from(room.gpus.min(n.gpus));
    let keep_cpu = u64::from(n.cpu_millis) * free_gpus / u64::from(n.gpus);
    let keep_memory = (u128::from(n.memory_bytes) * u128::from(free_gpus) / u128::from(n.gpus))
        .try_into()
        .unwrap_or(u64::MAX);
    room.cpu_millis - u64::from(r.cpu_millis) >= keep_cpu
        && room.memory_bytes - r.memory_bytes.unwrap_or(0) >= keep_memory
}

/// Most nodes looked at by the make-room searches of one plan: each is a pass over the
/// node's executors.
const MAKE_ROOM_NODES_PER_PLAN: usize = 20_000;

/// Most of the cluster's cpus that gang reservations hold at once, in thousandths: the
/// rest keeps serving elastic work.
const RESERVE_PERMILLE: u64 = 250;

/// `r` taken `k` times (saturating).
fn times(r: &Resources, k: u64) -> Resources {
    let k32 = u32::try_from(k).unwrap_or(u32::MAX);
    Resources {
        cpu_millis: r.cpu_millis.saturating_mul(k32),
        memory_bytes: r.memory_bytes.map(|m| m.saturating_mul(k)),
        gpus: r.gpus.saturating_mul(k32),
    }
}

/// How many executors of `r` fit in `room` on node `n` (GPU room kept, see
/// [`fits_beside_gpus`]).
fn how_many_fit(n: &NodeView, room: &Free, r: &Resources) -> u32 {
    let per = |have: u64, need: u64| have.checked_div(need).unwrap_or(u64::MAX);
    let mut k = per(room.cpu_millis, u64::from(r.cpu_millis))
        .min(per(room.memory_bytes, r.memory_bytes.unwrap_or(0)))
        .min(per(u64::from(room.gpus), u64::from(r.gpus)))
        .min(u64::from(u32::MAX)) as u32;
    if k == u32::MAX {
        return k; // needs nothing
    }
    while k > 0 && !fits_beside_gpus(n, room, &times(r, u64::from(k))) {
        k -= 1;
    }
    k
}

/// Why a gang waits when no set of nodes can hold it.
fn no_nodes_hold(gang: Gang, app: &AppView) -> String {
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

/// Where the ranks of a gang go, given the room per node: exactly `ranks_per_node` on each
/// node used when set, otherwise as many as fit on the roomiest nodes first. `None` when
/// they do not all fit.
/// Among nodes that hold as many, those with more room in `prefer` come first.
fn place_gang(
    room: &[Free],
    prefer: &[Free],
    nodes: &[&NodeView],
    app: &AppView,
    gang: Gang,
    allowed: impl Fn(usize) -> bool,
) -> Option<Vec<(usize, u32)>> {
    let mut fit: Vec<(u32, u32, usize)> = (0..nodes.len())
        .filter(|&n| allowed(n) && selector_matches(&app.selector, &nodes[n].labels))
        .map(|n| {
            let k = how_many_fit(nodes[n], &room[n], &app.resources);
            let now = how_many_fit(nodes[n], &prefer[n], &app.resources).min(k);
            (k, now, n)
        })
        .filter(|(k, _, _)| *k > 0)
        .collect();
    // With ranks per node, any node holding that many will do: the ones that need the
    // least freed first. Otherwise the roomiest first, so the gang spans few nodes.
    match gang.ranks_per_node {
        Some(per) => fit.sort_by_key(|&(k, now, n)| (k < per, std::cmp::Reverse(now.min(per)), n)),
        None => fit.sort_by_key(|&(k, now, n)| (std::cmp::Reverse(k), std::cmp::Reverse(now), n)),
    }
    let mut left = gang.ranks;
    let mut placement = Vec::new();
    for (k, _, n) in fit {
        if left == 0 {
            break;
        }
        let take = match gang.ranks_per_node {
            Some(per) if k >= per => per,
            Some(_) => break, // sorted: no later node fits `per` either
            None => k.min(left),
        };
        placement.push((n, take));
        left -= take;
    }
    (left == 0).then_some(placement)
}

/// How much more, relatively, an owner must hold for its weight than another before it
/// gives that one an executor: small differences are not worth a task's wait and a launch.
const PREEMPTION_MARGIN: f64 = 0.05;

/// Most make-room searches in one plan: each scans the nodes, and the rounds after it
/// continue what it started.
const MAKE_ROOM_PER_PLAN: usize = 4096;

/// Ready nodes by free cpu, in two classes: without GPUs and with them. Work that needs no
/// GPU goes to the first class first, so GPU nodes keep room for the work that needs them.
/// Each heap holds one current entry per node, and stale ones (whose cpu differs from the
/// node's free cpu now) that are skipped; it is never scanned whole.
struct NodeHeaps {
    heaps: [std::collections::BinaryHeap<(u64, std::cmp::Reverse<usize>)>; 2],
    /// Node indexes of each class, in index (name) order.
    members: [Vec<usize>; 2],
}

impl NodeHeaps {
    fn class(n: &NodeView) -> usize {
        usize::from(n.gpus > 0)
    }

    fn new(free: &[Free], nodes: &[&NodeView]) -> NodeHeaps {
        let mut heaps: [std::collections::BinaryHeap<_>; 2] = Default::default();
        let mut members: [Vec<usize>; 2] = Default::default();
        for (i, f) in free.iter().enumerate() {
            let c = Self::class(nodes[i]);
            heaps[c].push((f.cpu_millis, std::cmp::Reverse(i)));
            members[c].push(i);
        }
        NodeHeaps { heaps, members }
    }

    /// The classes to look in, in order.
    fn classes(wants_gpu: bool) -> &'static [usize] {
        if wants_gpu {
            &[1]
        } else {
            &[0, 1]
        }
    }

    /// Node indexes to look through, in the order work of this kind prefers them.
    fn class_order(&self, wants_gpu: bool) -> Vec<&[usize]> {
        Self::classes(wants_gpu)
            .iter()
            .map(|&c| self.members[c].as_slice())
            .collect()
    }

    /// The node that suits with the most free cpu, ties broken by name.
    fn best(
        &mut self,
        free: &[Free],
        wants_gpu: bool,
        suits: impl Fn(usize, &Free) -> bool,
    ) -> Option<usize> {
        for &c in Self::classes(wants_gpu) {
            let heap = &mut self.heaps[c];
            let mut unsuited = Vec::new();
            let mut found = None;
            while let Some((cpu, std::cmp::Reverse(n))) = heap.pop() {
                let Some(f) = free.get(n) else { continue };
                if f.cpu_millis != cpu {
                    continue; // stale
                }
                unsuited.push((cpu, std::cmp::Reverse(n)));
                if suits(n, f) {
                    found = Some(n);
                    break;
                }
            }
            heap.extend(unsuited);
            if found.is_some() {
                return found;
            }
        }
        None
    }

    /// Records a node's new free cpu.
    fn update(&mut self, n: usize, free: &Free, nodes: &[&NodeView]) {
        self.heaps[Self::class(nodes[n])].push((free.cpu_millis, std::cmp::Reverse(n)));
    }
}

/// Sessions under their target, handed out one unit (executor) at a time: to the owner
/// with the smallest dominant share held for its weight, and within it to its session
/// first in fair-share order (higher priority, then the smaller held fraction of its
/// target, then the lower id). A session that could not be given a unit is done for the
/// round.
struct UnitQueue<'a> {
    owners: Vec<QueuedOwner<'a>>,
    turns: std::collections::BinaryHeap<Turn>,
    /// The owner and session handed out last, until [`UnitQueue::served`].
    current: Option<(usize, QueuedSession<'a>)>,
}

struct QueuedOwner<'a> {
    weight: f64,
    used: f64,
    sessions: std::collections::BinaryHeap<QueuedSession<'a>>,
}

struct QueuedSession<'a> {
    session: &'a SessionView,
    have: u64,
    target: u64,
    /// Dominant share of one of its executors.
    unit: f64,
}

impl Ord for QueuedSession<'_> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.session
            .priority
            .cmp(&other.session.priority)
            .then_with(|| {
                (u128::from(other.have) * u128::from(self.target))
                    .cmp(&(u128::from(self.have) * u128::from(other.target)))
            })
            .then_with(|| other.session.id.cmp(&self.session.id))
    }
}
impl PartialOrd for QueuedSession<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for QueuedSession<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for QueuedSession<'_> {}

/// An owner's turn in a `BinaryHeap` used as a min-heap: the lowest level (dominant share
/// per weight) first, ties to the lower owner index.
struct Turn(f64, usize);
impl Ord for Turn {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .0
            .total_cmp(&self.0)
            .then_with(|| other.1.cmp(&self.1))
    }
}
impl PartialOrd for Turn {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Turn {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for Turn {}

impl<'a> UnitQueue<'a> {
    /// `under` holds each session with its need and target; `used` the dominant share each
    /// owner holds now.
    fn new(
        under: &[(&'a SessionView, u64, u64)],
        used: &HashMap<&str, f64>,
        weights: &BTreeMap<String, u32>,
        unit: impl Fn(&SessionView) -> f64,
    ) -> UnitQueue<'a> {
        // Owners by index in name order, so ties between owners go by name.
        let names: std::collections::BTreeSet<&str> =
            under.iter().map(|(s, _, _)| s.owner.as_str()).collect();
        let index: HashMap<&str, usize> = names.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let mut owners: Vec<QueuedOwner<'a>> = names
            .iter()
            .map(|name| QueuedOwner {
                weight: f64::from(weights.get(*name).copied().unwrap_or(1).max(1)),
                used: used.get(name).copied().unwrap_or(0.0),
                sessions: Default::default(),
            })
            .collect();
        for &(s, need, target) in under {
            let unit = unit(s);
            if need == 0 || !unit.is_finite() {
                continue;
            }
            owners[index[s.owner.as_str()]]
                .sessions
                .push(QueuedSession {
                    session: s,
                    have: target - need,
                    target,
                    unit,
                });
        }
        let turns = owners
            .iter()
            .enumerate()
            .filter(|(_, o)| !o.sessions.is_empty())
            .map(|(i, o)| Turn(o.used / o.weight, i))
            .collect();
        UnitQueue {
            owners,
            turns,
            current: None,
        }
    }

    /// The session to give the next unit to.
    fn next(&mut self) -> Option<&'a SessionView> {
        while let Some(Turn(_, o)) = self.turns.pop() {
            if let Some(q) = self.owners[o].sessions.pop() {
                let s = q.session;
                self.current = Some((o, q));
                return Some(s);
            }
        }
        None
    }

    /// Whether the session handed out last got its unit.
    fn served(&mut self, placed: bool) {
        let Some((o, mut q)) = self.current.take() else {
            return;
        };
        let owner = &mut self.owners[o];
        if placed {
            owner.used += q.unit;
            q.have += 1;
            if q.have < q.target {
                owner.sessions.push(q);
            }
        }
        if !owner.sessions.is_empty() {
            self.turns.push(Turn(owner.used / owner.weight, o));
        }
    }
}

/// The next reclaimable executor of its application for a session, marked taken: one
/// bound to a session of the same owner over its target (a higher priority reclaiming).
/// Executors never pass between owners (each runs as its owner's identity); another
/// owner's share is reclaimed by making room (unbind, release, launch anew).
fn take_reclaimable<'a>(
    lists: Option<&mut BTreeMap<&str, Vec<&'a ExecutorView>>>,
    owner: &str,
    excess: &mut HashMap<SessionId, u64>,
    taken: &mut HashSet<ExecutorId>,
) -> Option<&'a ExecutorView> {
    lists?
        .get_mut(owner)
        .and_then(|list| take_from(list, excess, taken, true))
}

/// Executors are pooled per (application, owner): an executor serves only sessions of
/// the owner it was launched for.
type Pool<'a> = (&'a str, &'a str);

fn pool_of(e: &ExecutorView) -> Pool<'_> {
    (e.application.as_str(), e.owner.as_str())
}

fn session_pool(s: &SessionView) -> Pool<'_> {
    (s.application.as_str(), s.owner.as_str())
}

/// The dominant share each owner holds while a plan is made, for preemption between
/// owners: an executor goes from one owner to another only while the giver, after giving,
/// still holds more for its weight than the taker after taking. Levels compare what is
/// held, not the targets: when not every target can be met at once (room in pieces,
/// executors in transit), the owners still converge on their weighted shares of what is.
struct Holdings<'a> {
    /// Owners by index, for the hot loops.
    index: HashMap<&'a str, usize>,
    used: Vec<f64>,
    weight: Vec<f64>,
}

impl<'a> Holdings<'a> {
    /// The owners of `sessions`, holding `used`, weighing `weights` (1 when not listed).
    fn new(
        sessions: &'a [SessionView],
        weights: &BTreeMap<String, u32>,
        used: &HashMap<&str, f64>,
    ) -> Holdings<'a> {
        let mut h = Holdings {
            index: HashMap::default(),
            used: Vec::new(),
            weight: Vec::new(),
        };
        for s in sessions {
            let owner = s.owner.as_str();
            if h.index.contains_key(owner) {
                continue;
            }
            h.index.insert(owner, h.used.len());
            h.used.push(used.get(owner).copied().unwrap_or(0.0));
            h.weight
                .push(f64::from(weights.get(owner).copied().unwrap_or(1).max(1)));
        }
        h
    }

    fn ix(&self, owner: &str) -> Option<usize> {
        self.index.get(owner).copied()
    }

    /// Whether owner `taker` may have an executor of dominant share `share` from owner
    /// `giver` for one of its own of share `unit`.
    fn may_take(&self, giver: usize, share: f64, taker: usize, unit: f64) -> bool {
        giver == taker
            || (self.used[giver] - share) / self.weight[giver]
                > (self.used[taker] + unit) / self.weight[taker] * (1.0 + PREEMPTION_MARGIN)
    }

    /// Whether some other owner may give `taker` an executor of share `unit` now (giving
    /// one of the same share).
    fn may_take_from_someone(&self, taker: usize, unit: f64) -> bool {
        (0..self.used.len()).any(|giver| giver != taker && self.may_take(giver, unit, taker, unit))
    }

    /// `giver` gives up an executor of dominant share `share`.
    fn moved(&mut self, giver: usize, share: f64) {
        self.used[giver] -= share;
    }

    /// `owner` gets an executor of dominant share `unit`.
    fn gained(&mut self, owner: usize, unit: f64) {
        self.used[owner] += unit;
    }
}

/// The next executor of a list not taken yet, from a session over its target when
/// `only_excess`.
fn take_from<'a>(
    list: &mut Vec<&'a ExecutorView>,
    excess: &mut HashMap<SessionId, u64>,
    taken: &mut HashSet<ExecutorId>,
    only_excess: bool,
) -> Option<&'a ExecutorView> {
    while let Some(e) = list.pop() {
        if taken.contains(&e.id) {
            continue;
        }
        let left = e.session.and_then(|s| excess.get_mut(&s));
        match left {
            Some(left) if *left > 0 => *left -= 1,
            _ if only_excess => continue,
            _ => {}
        }
        taken.insert(e.id);
        return Some(e);
    }
    None
}

fn node_total(n: &NodeView) -> Free {
    Free {
        cpu_millis: u64::from(n.cpu_millis),
        memory_bytes: n.memory_bytes,
        gpus: n.gpus,
    }
}

/// The node carries every label of the selector.
pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn describe_selector(selector: &BTreeMap<String, String>) -> String {
    selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The waiting reason of a session whose application's launches back off.
fn backing_off(app: &AppView, owner: &str) -> String {
    match app.backing_off.get(owner).and_then(Option::as_ref) {
        Some(why) => format!(
            "executors of `{}` fail to start, so launches back off; the last one {why}",
            app.name
        ),
        None => format!("executors of `{}` failed; launches back off", app.name),
    }
}

/// Why no Ready node could ever hold an executor of `app`, or `None` if one could.
fn never_fits(app: &AppView, ready: &BTreeMap<&str, &NodeView>) -> Option<String> {
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

/// Computes the decisions for one snapshot.
#[cfg(test)]
pub fn schedule(snap: &Snapshot) -> Vec<Decision> {
    plan(snap).decisions
}

/// Computes the decisions for one snapshot, and why sessions wait.
pub fn plan(snap: &Snapshot) -> Plan {
    let mut decisions = Vec::new();
    let mut waiting: BTreeMap<SessionId, String> = BTreeMap::new();
    let apps: BTreeMap<&str, &AppView> = snap
        .applications
        .iter()
        .map(|a| (a.name.as_str(), a))
        .collect();
    // Nodes that take new work: Ready and not draining.
    let ready: BTreeMap<&str, &NodeView> = snap
        .nodes
        .iter()
        .filter(|n| n.ready && !n.draining)
        .map(|n| (n.name.as_str(), n))
        .collect();
    let draining: std::collections::BTreeSet<&str> = snap
        .nodes
        .iter()
        .filter(|n| n.draining)
        .map(|n| n.name.as_str())
        .collect();

    // Resources free per Ready node, and live executors per application.
    // Ready nodes by index in name order (so index order breaks ties as names would);
    // the hot loops below look nodes up by index, not by name.
    let ready_list: Vec<&NodeView> = ready.values().copied().collect();
    let node_index: std::collections::HashMap<&str, usize> = ready_list
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let mut free: Vec<Free> = ready_list.iter().map(|n| node_total(n)).collect();
    let mut live_per_app: BTreeMap<&str, u32> = BTreeMap::new();
    for e in &snap.executors {
        if let Some(&i) = node_index.get(e.node.as_str()) {
            free[i].take(&e.resources);
        }
        *live_per_app.entry(e.application.as_str()).or_default() += 1;
    }
    let totals = Totals::schedulable(&snap.nodes);

    // 1. Targets. A session whose application cannot launch now (backing off after
    // failures) claims no more than the executors it could use today, so its share does
    // not sit idle while others wait; one whose executors fit no node claims nothing.
    // Executors serve only their owner's sessions: they are pooled per (application,
    // owner), and a session uses only its own pool's.
    let mut usable_per_pool: BTreeMap<Pool, u64> = BTreeMap::new();
    for e in &snap.executors {
        if matches!(
            e.phase,
            ExecutorPhase::Idle
                | ExecutorPhase::Binding
                | ExecutorPhase::Bound
                | ExecutorPhase::Launching
        ) {
            *usable_per_pool.entry(pool_of(e)).or_default() += 1;
        }
    }
    let mut unplaceable: BTreeMap<&str, Option<String>> = BTreeMap::new();
    for (name, app) in &apps {
        unplaceable.insert(*name, never_fits(app, &ready));
    }
    let active: Vec<&SessionView> = snap.sessions.iter().filter(|s| s.demand > 0).collect();
    let demands: Vec<u64> = active
        .iter()
        .map(|s| {
            let usable = usable_per_pool.get(&session_pool(s)).copied().unwrap_or(0);
            match apps.get(s.application.as_str()) {
                None => 0,
                Some(a) if !a.launchable(&s.owner) => s.demand.min(usable),
                Some(a)
                    if unplaceable
                        .get(a.name.as_str())
                        .is_some_and(Option::is_some) =>
                {
                    s.demand.min(usable)
                }
                Some(_) => s.demand,
            }
        })
        .collect();
    let requests: Vec<ShareRequest> = active
        .iter()
        .zip(&demands)
        .map(|(s, &demand)| ShareRequest {
            owner: s.owner.clone(),
            priority: s.priority,
            demand,
            unit: apps
                .get(s.application.as_str())
                .map_or_else(Resources::default, |a| a.resources),
            application: s.application.clone(),
            atomic: s.gang.is_some(),
        })
        .collect();
    let app_caps: BTreeMap<String, u64> = apps
        .iter()
        .map(|(name, a)| (name.to_string(), u64::from(a.max_instances)))
        .collect();
    let targets = fair_shares(totals, &requests, &snap.owner_weights, &app_caps);
    let target_of: BTreeMap<SessionId, u64> = active
        .iter()
        .zip(&targets)
        .map(|(s, &t)| (s.id, t))
        .collect();
    let mut owner_targets: BTreeMap<String, f64> = BTreeMap::new();
    for (r, &t) in requests.iter().zip(&targets) {
        let share = totals.dominant_share(&r.unit);
        if share.is_finite() {
            *owner_targets.entry(r.owner.clone()).or_default() += share * t as f64;
        }
    }
    let owner_targets_permille = owner_targets
        .into_iter()
        .map(|(o, s)| (o, (s * 1000.0).round().min(1000.0) as u32))
        .collect();

    // Executors held per session (Binding or Bound; Unbinding ones are on their way out).
    let mut held: BTreeMap<SessionId, Vec<&ExecutorView>> = BTreeMap::new();
    for e in &snap.executors {
        if let (Some(s), ExecutorPhase::Binding | ExecutorPhase::Bound) = (e.session, e.phase) {
            held.entry(s).or_default().push(e);
        }
    }
    for s in &active {
        let have = held.get(&s.id).map_or(0, Vec::len) as u64;
        let target = target_of.get(&s.id).copied().unwrap_or(0);
        if have == 0 && target == 0 {
            let why = match apps.get(s.application.as_str()) {
                None => format!("application `{}` is not registered", s.application),
                Some(a) => match unplaceable.get(a.name.as_str()).cloned().flatten() {
                    Some(why) => why,
                    None if !a.launchable(&s.owner) => backing_off(a, &s.owner),
                    None => "every cpu is shared out to other sessions; waiting for its share"
                        .to_string(),
                },
            };
            waiting.insert(s.id, why);
        }
    }
    let mut used: HashMap<&str, f64> = HashMap::default();
    for s in &snap.sessions {
        for e in held.get(&s.id).into_iter().flatten() {
            let share = totals.dominant_share(&e.resources);
            if share.is_finite() {
                *used.entry(s.owner.as_str()).or_default() += share;
            }
        }
    }
    // What owners hold beyond the share their targets add up to: only that much of theirs
    // goes to other owners.
    let mut holdings = Holdings::new(&snap.sessions, &snap.owner_weights, &used);
    let owner_of: HashMap<SessionId, &str> = snap
        .sessions
        .iter()
        .map(|s| (s.id, s.owner.as_str()))
        .collect();
    let owner_ix_of: HashMap<SessionId, usize> = snap
        .sessions
        .iter()
        .filter_map(|s| Some((s.id, holdings.ix(&s.owner)?)))
        .collect();
    let mut under: Vec<(&SessionView, u64, u64)> = active
        .iter()
        .filter_map(|s| {
            let have = held.get(&s.id).map_or(0, Vec::len) as u64;
            let t = target_of.get(&s.id).copied().unwrap_or(0);
            (have < t && s.gang.is_none()).then(|| (*s, t - have, t))
        })
        .collect();
    // The most deprived first (smallest held fraction of its target), so what cannot be
    // placed this round does not always fall on the same (newest) sessions.
    under.sort_by(|a, b| {
        let (have_a, have_b) = (a.2 - a.1, b.2 - b.1);
        (u128::from(have_a) * u128::from(b.2))
            .cmp(&(u128::from(have_b) * u128::from(a.2)))
            .then(a.0.id.cmp(&b.0.id))
    });
    let someone_waits = !under.is_empty();

    // Executors decided on this round (each is decided on at most once).
    let mut taken: HashSet<ExecutorId> = HashSet::default();
    // 3a. Sessions with nothing left to do give their executors back; sessions with work
    // give back the executors beyond their target that have run out of tasks. The rest of
    // an excess is reclaimed only when another session needs it (below), so executors
    // change hands no faster than they can be used.
    let mut excess: HashMap<SessionId, u64> = HashMap::default();
    for s in &snap.sessions {
        if s.gang.is_some() && s.demand > 0 {
            continue; // a gang keeps its ranks while it runs
        }
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
        let mut over = have - target;
        for e in order {
            if over == 0 {
                break;
            }
            let quiet_long =
                e.outstanding == 0 && snap.now_ms.saturating_sub(e.quiet_since_ms) >= delay;
            let give_back = if s.demand == 0 {
                !s.open || someone_waits || quiet_long
            } else {
                quiet_long
            };
            if give_back {
                decisions.push(Decision::Unbind { executor: e.id });
                taken.insert(e.id);
                over -= 1;
            }
        }
        if over > 0 && s.demand > 0 {
            excess.insert(s.id, over);
        }
    }

    // What can be reclaimed for sessions under their target: Idle executors, and Bound
    // ones: of other owners as far as [`Holdings::may_take`] allows, of the session's own
    // owner from sessions over their target (a higher priority reclaiming). Sessions over
    // their target give first, then lower priorities, then the executors with the least
    // work outstanding.
    let mut reclaim_by_app: BTreeMap<&str, BTreeMap<&str, Vec<&ExecutorView>>> = BTreeMap::new();
    let mut reclaim_on_node: Vec<Vec<&ExecutorView>> = vec![Vec::new(); ready_list.len()];
    let mut idle_on_node: Vec<Vec<&ExecutorView>> = vec![Vec::new(); ready_list.len()];
    // Per node: what executors on their way out will free (Unbinding ones turn Idle and
    // are then released if nobody of their application needs them), and what Idle and
    // reclaimable executors hold.
    let mut incoming: Vec<Free> = vec![Free::default(); ready_list.len()];
    let mut reclaimable: Vec<Free> = vec![Free::default(); ready_list.len()];
    let mut idle_room: Vec<Free> = vec![Free::default(); ready_list.len()];
    let mut unbinding_by_pool: BTreeMap<Pool, Vec<&ExecutorView>> = BTreeMap::new();
    // A gang's ranks are never reclaimed.
    let gang_sessions: HashSet<SessionId> = snap
        .sessions
        .iter()
        .filter(|s| s.gang.is_some())
        .map(|s| s.id)
        .collect();
    for e in &snap.executors {
        let Some(&i) = node_index.get(e.node.as_str()) else {
            continue;
        };
        match e.phase {
            ExecutorPhase::Releasing => incoming[i].give(&e.resources),
            ExecutorPhase::Unbinding => {
                incoming[i].give(&e.resources);
                unbinding_by_pool.entry(pool_of(e)).or_default().push(e);
            }
            ExecutorPhase::Idle => {
                idle_on_node[i].push(e);
                idle_room[i].give(&e.resources);
            }
            ExecutorPhase::Bound | ExecutorPhase::Binding
                if !taken.contains(&e.id)
                    && e.session.is_some_and(|s| !gang_sessions.contains(&s)) =>
            {
                let owner = e
                    .session
                    .and_then(|s| owner_of.get(&s))
                    .copied()
                    .unwrap_or("");
                reclaim_by_app
                    .entry(e.application.as_str())
                    .or_default()
                    .entry(owner)
                    .or_default()
                    .push(e);
                reclaim_on_node[i].push(e);
                reclaimable[i].give(&e.resources);
            }
            _ => {}
        }
    }
    let priority_of: HashMap<SessionId, i32> =
        snap.sessions.iter().map(|s| (s.id, s.priority)).collect();
    let give_order = |e: &&ExecutorView| {
        let session = e.session.unwrap_or(SessionId(0));
        (
            !excess.contains_key(&session),
            priority_of.get(&session).copied().unwrap_or(0),
            e.outstanding,
            e.id,
        )
    };
    for list in reclaim_by_app.values_mut().flat_map(|m| m.values_mut()) {
        // pop() takes the first in giving order.
        list.sort_by_key(|e| std::cmp::Reverse(give_order(e)));
    }
    for list in &mut reclaim_on_node {
        list.sort_by_key(give_order);
    }
    for list in unbinding_by_pool.values_mut() {
        list.sort_by_key(|e| std::cmp::Reverse(e.id));
    }

    // 2. Sessions under their target: reuse Idle executors, count launches in flight, launch.
    let mut idle_by_pool: BTreeMap<Pool, Vec<&ExecutorView>> = BTreeMap::new();
    let mut launching_by_pool: BTreeMap<Pool, u64> = BTreeMap::new();
    for e in &snap.executors {
        if draining.contains(e.node.as_str()) {
            // A draining node keeps nothing idle and takes nothing new.
            if e.phase == ExecutorPhase::Idle {
                decisions.push(Decision::Release { executor: e.id });
                taken.insert(e.id);
            }
            continue;
        }
        match e.phase {
            ExecutorPhase::Idle => idle_by_pool.entry(pool_of(e)).or_default().push(e),
            ExecutorPhase::Launching => *launching_by_pool.entry(pool_of(e)).or_default() += 1,
            _ => {}
        }
    }
    for list in idle_by_pool.values_mut() {
        list.sort_by_key(|e| e.id);
        list.reverse(); // pop() takes the lowest id first
    }
    // Nodes by free cpu, those without GPUs apart: work that needs no GPU goes there
    // first, so GPU nodes keep room for the work that needs them.
    // 2a. Gangs first, higher priority then older first: all ranks are launched in one
    // plan or none are. One that does not fit now, and whose owner's share holds it,
    // reserves the nodes that can hold it once their elastic executors are gone (each
    // finishes its task, so the wait is bounded by the longest task there): nothing new
    // goes on a reserved node, and elastic work goes on elsewhere (backfill) without
    // delaying the gang. Reservations cover at most RESERVE_PERMILLE of the cpus. A gang
    // holds nothing until it is placed whole, so two gangs never deadlock on partial holds.
    let mut reserved = vec![false; ready_list.len()];
    let mut reservations: BTreeMap<SessionId, Vec<String>> = BTreeMap::new();
    let mut reclaimed_for: BTreeMap<ExecutorId, SessionId> = BTreeMap::new();
    let mut reserved_cpu: u64 = 0;
    let reserve_cap = totals.cpu_millis * RESERVE_PERMILLE / 1000;
    // What each node offers with nothing on it: a gang that does not fit even so waits
    // for nodes, not for its share.
    let whole: Vec<Free> = ready_list.iter().map(|n| node_total(n)).collect();
    let mut gangs: Vec<&SessionView> = active
        .iter()
        .filter(|s| s.gang.is_some())
        .copied()
        .collect();
    gangs.sort_by_key(|s| (std::cmp::Reverse(s.priority), s.id));
    for g in gangs {
        let (Some(gang), Some(app)) = (g.gang, apps.get(g.application.as_str())) else {
            continue;
        };
        let app_name = g.application.as_str();
        let pool = session_pool(g);
        let ranks = u64::from(gang.ranks);
        let have = held.get(&g.id).map_or(0, Vec::len) as u64;
        let in_flight = launching_by_pool.get(&pool).copied().unwrap_or(0);
        let ready = idle_by_pool.get(&pool).map_or(0, Vec::len) as u64;
        if have + in_flight + ready > 0 {
            // Placed: bind its ranks as they come up.
            while let Some(e) = idle_by_pool.get_mut(&pool).and_then(Vec::pop) {
                if taken.insert(e.id) {
                    decisions.push(Decision::Bind {
                        executor: e.id,
                        session: g.id,
                    });
                }
            }
            if have + in_flight + ready < ranks {
                // Never topped up: a gang that lost ranks is the batch job's to fail.
                waiting.insert(
                    g.id,
                    format!(
                        "lost {} of its {} ranks; a gang is not topped up",
                        ranks - (have + in_flight + ready),
                        gang.ranks
                    ),
                );
            }
            continue;
        }
        if let Some(k) = gang
            .ranks_per_node
            .filter(|&k| k == 0 || gang.ranks % k != 0)
        {
            waiting.insert(
                g.id,
                format!(
                    "{} ranks cannot be spread {k} per node: ranks must be a multiple of ranks_per_node",
                    gang.ranks
                ),
            );
            continue;
        }
        if place_gang(&whole, &whole, &ready_list, app, gang, |_| true).is_none() {
            waiting.insert(
                g.id,
                format!(
                    "{}, even with nothing else running",
                    no_nodes_hold(gang, app)
                ),
            );
            continue;
        }
        if target_of.get(&g.id).copied().unwrap_or(0) < ranks {
            waiting.insert(
                g.id,
                format!(
                    "waiting for its owner's share to hold all {} ranks of `{app_name}` ({} each)",
                    gang.ranks, app.resources
                ),
            );
            continue;
        }
        if !app.launchable(&g.owner) {
            waiting
                .entry(g.id)
                .or_insert_with(|| backing_off(app, &g.owner));
            continue;
        }
        let allowed = |n: usize| !reserved[n];
        if let Some(placement) = place_gang(&free, &free, &ready_list, app, gang, allowed) {
            for (n, k) in placement {
                for _ in 0..k {
                    free[n].take(&app.resources);
                    decisions.push(Decision::Launch {
                        node: ready_list[n].name.clone(),
                        application: app_name.to_string(),
                        owner: g.owner.clone(),
                    });
                }
            }
            *live_per_app.entry(app_name).or_default() += gang.ranks;
            continue;
        }
        if reserved_cpu >= reserve_cap {
            waiting.entry(g.id).or_insert_with(|| {
                "waiting behind the node reservations of other gangs".to_string()
            });
            continue;
        }
        // What each node would offer once emptied of elastic work.
        let emptied: Vec<Free> = (0..ready_list.len())
            .map(|n| {
                let mut room = free[n];
                room.add(&incoming[n]);
                room.add(&idle_room[n]);
                room.add(&reclaimable[n]);
                room
            })
            .collect();
        // Nodes already being emptied, or with room now, first: the fewest tasks wait.
        let soon: Vec<Free> = (0..ready_list.len())
            .map(|n| {
                let mut room = free[n];
                room.add(&incoming[n]);
                room.add(&idle_room[n]);
                room
            })
            .collect();
        let Some(placement) = place_gang(&emptied, &soon, &ready_list, app, gang, allowed) else {
            waiting
                .entry(g.id)
                .or_insert_with(|| no_nodes_hold(gang, app));
            continue;
        };
        let mut names = Vec::new();
        for (n, k) in placement {
            reserved[n] = true;
            reserved_cpu += u64::from(ready_list[n].cpu_millis);
            names.push(ready_list[n].name.clone());
            // Free what the ranks need there: Idle executors first, then elastic ones in
            // giving order (they finish their task first).
            let need = times(&app.resources, u64::from(k));
            let mut room = free[n];
            room.add(&incoming[n]);
            for e in idle_on_node[n].iter().chain(&reclaim_on_node[n]) {
                if fits_beside_gpus(ready_list[n], &room, &need) {
                    break;
                }
                if !taken.insert(e.id) {
                    continue;
                }
                if e.phase == ExecutorPhase::Idle {
                    decisions.push(Decision::Release { executor: e.id });
                    idle_room[n].take(&e.resources);
                } else {
                    decisions.push(Decision::Unbind { executor: e.id });
                    reclaimed_for.insert(e.id, g.id);
                    reclaimable[n].take(&e.resources);
                    if let Some(left) = e.session.and_then(|id| excess.get_mut(&id)) {
                        *left = left.saturating_sub(1);
                    }
                }
                room.give(&e.resources);
            }
        }
        waiting.insert(
            g.id,
            format!(
                "reserved {} for its {} ranks; waiting for the tasks running there to end",
                names.join(","),
                gang.ranks
            ),
        );
        reservations.insert(g.id, names);
    }

    let mut heaps = NodeHeaps::new(&free, &ready_list);
    let mut make_room_left = MAKE_ROOM_PER_PLAN;
    let mut soon_cursor: HashMap<&str, usize> = HashMap::default();
    let mut no_room_for: HashSet<&str> = HashSet::default();
    // Nodes looked at by make-room searches, in all, in one plan.
    let mut room_nodes_left = MAKE_ROOM_NODES_PER_PLAN;
    let owners_with_excess: HashSet<&str> = excess
        .keys()
        .filter_map(|id| owner_of.get(id).copied())
        .collect();
    let mut room_cursor: HashMap<&str, usize> = HashMap::default();
    // Units go to the owner that holds the smallest dominant share for its weight, and
    // within it to the session first in its fair-share order (priority, then the smallest
    // held fraction of its target): when not every target can be met at once (room in
    // pieces, executors in transit), what can be placed goes where the fair share wants it.
    let mut queue = UnitQueue::new(&under, &used, &snap.owner_weights, |s| {
        apps.get(s.application.as_str())
            .map_or(0.0, |a| totals.dominant_share(&a.resources))
    });
    while let Some(s) = queue.next() {
        let placed = 'one: {
            let mut need = 1u64;
            let app_name = s.application.as_str();
            let pool = session_pool(s);
            let Some(app) = apps.get(app_name) else {
                break 'one false;
            };
            while need > 0 {
                let Some(e) = idle_by_pool.get_mut(&pool).and_then(Vec::pop) else {
                    break;
                };
                if !taken.insert(e.id) {
                    continue;
                }
                decisions.push(Decision::Bind {
                    executor: e.id,
                    session: s.id,
                });
                if let Some(&i) = node_index.get(e.node.as_str()) {
                    idle_room[i].take(&e.resources);
                }
                need -= 1;
            }
            // Launches in flight, and executors of its pool being given back by other
            // sessions of its owner, arrive Idle soon: count them as coming.
            let in_flight = launching_by_pool.entry(pool).or_default();
            let absorbed = need.min(*in_flight);
            *in_flight -= absorbed;
            need -= absorbed;
            while need > 0 {
                let Some(e) = unbinding_by_pool.get_mut(&pool).and_then(Vec::pop) else {
                    break;
                };
                if let Some(&i) = node_index.get(e.node.as_str()) {
                    incoming[i].take(&e.resources);
                }
                need -= 1;
            }
            let launchable = app.launchable(&s.owner);
            if need > 0 && !launchable {
                waiting
                    .entry(s.id)
                    .or_insert_with(|| backing_off(app, &s.owner));
            }
            let live = live_per_app.entry(app_name).or_default();
            let wants_gpu = app.resources.gpus > 0;
            let unit_share = totals.dominant_share(&app.resources);
            while need > 0 {
                // A new executor where one fits now.
                if launchable && *live < app.max_instances {
                    let fits = |n: usize, f: &Free| {
                        !reserved[n]
                            && fits_beside_gpus(ready_list[n], f, &app.resources)
                            && selector_matches(&app.selector, &ready_list[n].labels)
                    };
                    // Free room only shrinks while a plan is made: an application that found
                    // none finds none later in the same plan.
                    let found = if no_room_for.contains(app_name) {
                        None
                    } else {
                        heaps.best(&free, wants_gpu, fits)
                    };
                    if found.is_none() {
                        no_room_for.insert(app_name);
                    }
                    if let Some(node) = found {
                        free[node].take(&app.resources);
                        heaps.update(node, &free[node], &ready_list);
                        decisions.push(Decision::Launch {
                            node: ready_list[node].name.clone(),
                            application: app_name.to_string(),
                            owner: s.owner.clone(),
                        });
                        *live += 1;
                        need -= 1;
                        continue;
                    }
                }
                // An executor of its pool that a session of its owner over its target gives
                // back. Another owner's executors never change hands: they make room below.
                if let Some(e) = take_reclaimable(
                    reclaim_by_app.get_mut(app_name),
                    &s.owner,
                    &mut excess,
                    &mut taken,
                ) {
                    decisions.push(Decision::Unbind { executor: e.id });
                    reclaimed_for.insert(e.id, s.id);
                    if let Some(&i) = node_index.get(e.node.as_str()) {
                        reclaimable[i].take(&e.resources);
                    }
                    need -= 1;
                    continue;
                }
                if !launchable {
                    break;
                }
                if *live >= app.max_instances {
                    waiting.entry(s.id).or_insert_with(|| {
                        format!(
                            "application `{app_name}` has reached its max_instances ({})",
                            app.max_instances
                        )
                    });
                    break;
                }
                // Room on a node that is being freed, or that can be freed by releasing Idle
                // executors of other applications and reclaiming executors of sessions over
                // their target (for GPU work, also executors that need no GPU: they can run
                // elsewhere). Free room, what is on its way and what is reclaimable only shrink
                // while a plan is made, so a node passed over for an application stays passed
                // over: each application's search resumes where its last one stopped.
                if make_room_left == 0 {
                    waiting.entry(s.id).or_insert_with(|| {
                        format!(
                            "waiting for room on a node for an executor of `{app_name}` ({})",
                            app.resources
                        )
                    });
                    break;
                }
                make_room_left -= 1;
                let suits = |n: usize| {
                    !reserved[n] && selector_matches(&app.selector, &ready_list[n].labels)
                };
                let order: Vec<usize> = heaps
                    .class_order(wants_gpu)
                    .iter()
                    .flat_map(|c| c.iter().copied())
                    .collect();
                let cursor = soon_cursor.entry(app_name).or_default();
                while let Some(&n) = order.get(*cursor) {
                    let mut room = free[n];
                    room.add(&incoming[n]);
                    if suits(n) && fits_beside_gpus(ready_list[n], &room, &app.resources) {
                        break;
                    }
                    *cursor += 1;
                }
                if let Some(&n) = order.get(*cursor) {
                    let rest = free[n].take_up_to(Free::of(&app.resources));
                    incoming[n].take_up_to(rest);
                    heaps.update(n, &free[n], &ready_list);
                    waiting.entry(s.id).or_insert_with(|| {
                        format!(
                            "waiting for executors of other sessions on {} to finish their tasks \
                             and make room for `{app_name}` ({})",
                            ready_list[n].name, app.resources
                        )
                    });
                    need -= 1;
                    continue;
                }
                let cursor = room_cursor.entry(app_name).or_default();
                let mut victims: Vec<&ExecutorView> = Vec::new();
                let mut found = None;
                // Nobody to take Bound executors from: no other owner holds enough more
                // for its weight, and no session of its own owner is over its target (Idle
                // executors of other applications can still be released).
                let taker = holdings.ix(&s.owner).unwrap_or(usize::MAX);
                let hopeless = !(owners_with_excess.contains(s.owner.as_str())
                    || taker != usize::MAX && holdings.may_take_from_someone(taker, unit_share));
                while let Some(&n) = order.get(*cursor) {
                    if room_nodes_left == 0 {
                        break;
                    }
                    room_nodes_left -= 1;
                    let mut room = free[n];
                    room.add(&incoming[n]);
                    let mut could = room;
                    could.add(&idle_room[n]);
                    if !hopeless {
                        could.add(&reclaimable[n]);
                    }
                    if !suits(n) || !fits_beside_gpus(ready_list[n], &could, &app.resources) {
                        *cursor += 1;
                        continue;
                    }
                    // Pick what it takes: Idle executors of other pools (other applications, or
                    // other owners' executors of this one) first, then the reclaimable
                    // executors with the least work outstanding.
                    victims.clear();
                    let mut over_left: HashMap<SessionId, u64> = HashMap::default();
                    let idle = idle_on_node[n]
                        .iter()
                        .filter(|e| pool_of(e) != pool && !taken.contains(&e.id));
                    // Other owners' executors first, as far as `holdings` allows: an owner
                    // that makes room for itself holds less until the room is used. Its own
                    // only from its sessions over their target.
                    let owner_of_executor =
                        |e: &ExecutorView| e.session.and_then(|id| owner_ix_of.get(&id)).copied();
                    let mut candidates: Vec<&ExecutorView> = reclaim_on_node[n]
                        .iter()
                        .filter(|e| {
                            !taken.contains(&e.id)
                                && owner_of_executor(e).is_some_and(|o| {
                                    holdings.may_take(
                                        o,
                                        totals.dominant_share(&e.resources),
                                        taker,
                                        unit_share,
                                    )
                                })
                        })
                        .copied()
                        .collect();
                    // Stable: within each part, the giving order of the list stays.
                    candidates.sort_by_key(|e| owner_of_executor(e) == Some(taker));
                    let reclaim = candidates.into_iter().filter(|e| {
                        let Some(id) = e.session else { return false };
                        let left = over_left
                            .entry(id)
                            .or_insert_with(|| excess.get(&id).copied().unwrap_or(0));
                        if owner_of_executor(e) != Some(taker) {
                            *left = left.saturating_sub(1);
                            return true;
                        }
                        if *left == 0 {
                            return false;
                        }
                        *left -= 1;
                        true
                    });
                    for e in idle.copied().chain(reclaim) {
                        if fits_beside_gpus(ready_list[n], &room, &app.resources) {
                            break;
                        }
                        victims.push(e);
                        room.give(&e.resources);
                    }
                    if fits_beside_gpus(ready_list[n], &room, &app.resources) {
                        found = Some(n);
                        break;
                    }
                    *cursor += 1;
                }
                let Some(n) = found else {
                    if !unplaceable.get(app_name).is_some_and(Option::is_some) {
                        waiting.entry(s.id).or_insert_with(|| {
                            format!(
                                "waiting for room on a node for an executor of `{app_name}` ({})",
                                app.resources
                            )
                        });
                    }
                    break;
                };
                for e in &victims {
                    taken.insert(e.id);
                    if e.phase == ExecutorPhase::Idle {
                        decisions.push(Decision::Release { executor: e.id });
                        idle_room[n].take(&e.resources);
                    } else {
                        decisions.push(Decision::Unbind { executor: e.id });
                        reclaimed_for.insert(e.id, s.id);
                        let owner = e.session.and_then(|id| owner_ix_of.get(&id)).copied();
                        if let Some(o) = owner.filter(|o| *o != taker) {
                            holdings.moved(o, totals.dominant_share(&e.resources));
                        }
                        if let Some(left) = e.session.and_then(|id| excess.get_mut(&id)) {
                            *left = left.saturating_sub(1);
                        }
                        reclaimable[n].take(&e.resources);
                    }
                }
                // What it took from the node's free room and what is on its way; the room
                // arrives over the next rounds.
                let rest = free[n].take_up_to(Free::of(&app.resources));
                incoming[n].take_up_to(rest);
                heaps.update(n, &free[n], &ready_list);
                waiting.entry(s.id).or_insert_with(|| {
                    format!(
                        "making room on {} for `{app_name}` ({}): executors of sessions over \
                         their share finish their tasks and are given back",
                        ready_list[n].name, app.resources
                    )
                });
                need -= 1;
            }
            need == 0
        };
        queue.served(placed);
        if placed {
            if let Some(a) = apps.get(s.application.as_str()) {
                if let Some(o) = holdings.ix(&s.owner) {
                    holdings.gained(o, totals.dominant_share(&a.resources));
                }
            }
        }
    }

    // 3b. Idle executors past their application's delay_release are released.
    for list in idle_by_pool.values() {
        for e in list {
            if taken.contains(&e.id) {
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
    Plan {
        decisions,
        waiting,
        targets: target_of,
        owner_targets_permille,
        reservations,
        reclaimed_for,
    }
}

#[cfg(test)]
mod tests {
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
}

#[cfg(test)]
mod properties {
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
                            ExecutorPhase::Binding
                                | ExecutorPhase::Bound
                                | ExecutorPhase::Unbinding
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
}

/// The scheduler at scale: `cargo test --release -p flame-head scheduler_decision_time --
/// --ignored --nocapture` prints the time of one decision round (p50, p99) and the memory
/// of the snapshot, for 1,000 nodes, 64,000 executors and 1,000,000 pending tasks.
#[cfg(test)]
mod bench {
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
}
