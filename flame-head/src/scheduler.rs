//! The scheduler: a pure function from a snapshot of the cluster to a list of decisions.
//!
//! It performs no I/O and reads no clock: time is the `now_ms` field of the snapshot. The
//! core applies the decisions; tests assert on them directly.
//!
//! Maps are ordered (`BTreeMap`), so the same snapshot always gives the same decisions.
//!
//! Policy, in order:
//! 1. **Targets.** The cpus of Ready nodes are shared between sessions with work: each
//!    first gets one executor's worth (its application's `resources.cpus`), then the rest
//!    in proportion to its pending plus running tasks times that cpu request (so no
//!    session gets more executors than it has tasks); the shares become executor counts,
//!    capped by each application's `max_instances`. A session whose executors fit no
//!    Ready node at all claims nothing and is told why.
//! 2. **Reuse first.** A session under its target takes Idle executors of its application,
//!    then executors of its application still starting, and only then launches new ones on
//!    the matching node (labels ⊇ selector) with room for its cpus, memory and gpus, the
//!    one with the most free cpu first. Sessions that cannot get what they need are given
//!    a reason (see [`Plan::waiting`]).
//! 3. **Give back.** A session over its target while another is under its own unbinds the
//!    excess; a session with no work unbinds once it is closed, once someone else waits, or
//!    after the application's `delay_release`. An Idle executor is released after
//!    `delay_release`, or at once when its slot is needed for another application.

use flame_protocol::model::{format_bytes, format_cpus, Resources};
use flame_protocol::{ExecutorId, SessionId};
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
    /// False while launches of this application back off after failures.
    pub launchable: bool,
    /// What one executor needs.
    pub resources: Resources,
    /// Labels a node must carry.
    pub selector: BTreeMap<String, String>,
    /// Why its last executor failed to start, if none has started since.
    pub launch_error: Option<String>,
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
}

/// Weighted dominant-resource fair share (DRF) by progressive filling: executors go one at
/// a time to the owner whose dominant share divided by its weight is lowest, and within
/// that owner to its highest-priority session with unmet demand, equal priorities taking
/// turns by the fraction of their demand they have (so each gets one before any gets a
/// second). An owner whose next executor no longer fits in what is left, or whose
/// sessions are all served, drops out. Returns executors per request.
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
    /// smaller fraction of its demand already given (compared without division), then
    /// the lower index.
    struct Claim {
        priority: i32,
        given: u64,
        demand: u64,
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
                .then_with(|| {
                    (u128::from(other.given) * u128::from(self.demand))
                        .cmp(&(u128::from(self.given) * u128::from(other.demand)))
                })
                .then_with(|| other.index.cmp(&self.index))
        }
    }
    let mut claims: Vec<BinaryHeap<Claim>> = owners
        .values()
        .map(|list| {
            list.iter()
                .map(|&i| Claim {
                    priority: requests[i].priority,
                    given: 0,
                    demand: requests[i].demand,
                    index: i,
                })
                .collect()
        })
        .collect();
    let weight_of: Vec<f64> = owners
        .keys()
        .map(|o| f64::from(weights.get(*o).copied().unwrap_or(1).max(1)))
        .collect();
    // Min-heap on (share / weight, owner index).
    struct Turn(f64, usize);
    impl PartialEq for Turn {
        fn eq(&self, other: &Self) -> bool {
            self.cmp(other) == Ordering::Equal
        }
    }
    impl Eq for Turn {}
    impl PartialOrd for Turn {
        fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for Turn {
        fn cmp(&self, other: &Self) -> Ordering {
            other
                .0
                .total_cmp(&self.0)
                .then_with(|| other.1.cmp(&self.1))
        }
    }
    let mut share = vec![0.0f64; claims.len()];
    let mut turns: BinaryHeap<Turn> = (0..claims.len()).map(|o| Turn(0.0, o)).collect();
    let fits = |left: &Totals, u: &Resources| {
        left.cpu_millis >= u64::from(u.cpu_millis)
            && left.memory_bytes >= u.memory_bytes.unwrap_or(0)
            && left.gpus >= u64::from(u.gpus)
    };
    while let Some(Turn(_, owner)) = turns.pop() {
        // The owner's best claim that can still be met. A claim that cannot is dropped for
        // good: what is left only shrinks, and so does an application's room.
        let heap = &mut claims[owner];
        let mut picked = None;
        while let Some(claim) = heap.pop() {
            let i = claim.index;
            if app_room[app_of[i]] > 0 && fits(&left, &requests[i].unit) {
                picked = Some(claim);
                break;
            }
        }
        let Some(mut claim) = picked else {
            continue; // nothing more fits or is wanted: the owner drops out
        };
        let i = claim.index;
        let r = &requests[i];
        given[i] += 1;
        app_room[app_of[i]] -= 1;
        left.cpu_millis -= u64::from(r.unit.cpu_millis);
        left.memory_bytes -= r.unit.memory_bytes.unwrap_or(0);
        left.gpus -= u64::from(r.unit.gpus);
        claim.given += 1;
        if claim.given < claim.demand {
            heap.push(claim);
        }
        share[owner] += shares[i];
        turns.push(Turn(share[owner] / weight_of[owner], owner));
    }
    given
}

/// Free resources of one node while a plan is made.
#[derive(Debug, Clone, Copy)]
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

    fn give(&mut self, r: &Resources) {
        self.cpu_millis += u64::from(r.cpu_millis);
        self.memory_bytes = self
            .memory_bytes
            .saturating_add(r.memory_bytes.unwrap_or(0));
        self.gpus += r.gpus;
    }
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
fn backing_off(app: &AppView) -> String {
    match &app.launch_error {
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
    let mut unplaceable: BTreeMap<&str, Option<String>> = BTreeMap::new();
    for (name, app) in &apps {
        unplaceable.insert(*name, never_fits(app, &ready));
    }
    let active: Vec<&SessionView> = snap.sessions.iter().filter(|s| s.demand > 0).collect();
    let demands: Vec<u64> = active
        .iter()
        .map(|s| {
            let usable = usable_per_app
                .get(s.application.as_str())
                .copied()
                .unwrap_or(0);
            match apps.get(s.application.as_str()) {
                None => 0,
                Some(a) if !a.launchable => s.demand.min(usable),
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
                    None if !a.launchable => backing_off(a),
                    None => "every cpu is shared out to other sessions; waiting for its share"
                        .to_string(),
                },
            };
            waiting.insert(s.id, why);
        }
    }
    let mut under: Vec<(&SessionView, u64, u64)> = active
        .iter()
        .filter_map(|s| {
            let have = held.get(&s.id).map_or(0, Vec::len) as u64;
            let t = target_of.get(&s.id).copied().unwrap_or(0);
            (have < t).then(|| (*s, t - have, t))
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
    let under: Vec<(&SessionView, u64)> = under.into_iter().map(|(s, n, _)| (s, n)).collect();
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
        if draining.contains(e.node.as_str()) {
            // A draining node keeps nothing idle and takes nothing new.
            if e.phase == ExecutorPhase::Idle {
                decisions.push(Decision::Release { executor: e.id });
            }
            continue;
        }
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
    let mut released: std::collections::BTreeSet<ExecutorId> = Default::default();
    let mut by_free_cpu: std::collections::BinaryHeap<(u64, std::cmp::Reverse<usize>)> = free
        .iter()
        .enumerate()
        .map(|(i, f)| (f.cpu_millis, std::cmp::Reverse(i)))
        .collect();
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
        if need > 0 && !app.launchable {
            waiting.entry(s.id).or_insert_with(|| backing_off(app));
        }
        let live = live_per_app.entry(app_name).or_default();
        if need > 0 && app.launchable && *live >= app.max_instances {
            waiting.entry(s.id).or_insert_with(|| {
                format!(
                    "application `{app_name}` has reached its max_instances ({})",
                    app.max_instances
                )
            });
        }
        // Nodes looked at for this session that do not suit it, put back afterwards.
        let mut unsuited: Vec<(u64, std::cmp::Reverse<usize>)> = Vec::new();
        while need > 0 && app.launchable && *live < app.max_instances {
            // The matching node with room and the most free cpu; ties broken by name. The
            // heap holds one current entry per node (others are stale: their cpu differs
            // from the node's free cpu now) and is never scanned whole.
            let mut best = None;
            while let Some((cpu, std::cmp::Reverse(n))) = by_free_cpu.pop() {
                let Some(f) = free.get(n) else { continue };
                if f.cpu_millis != cpu {
                    continue; // stale
                }
                let suits = f.fits(&app.resources)
                    && selector_matches(&app.selector, &ready_list[n].labels);
                if suits {
                    best = Some(n);
                    break;
                }
                unsuited.push((cpu, std::cmp::Reverse(n)));
            }
            let node = match best {
                Some(n) => n,
                None => {
                    // No room: release an Idle executor of another application whose
                    // resources make room on a matching node.
                    let victim = idle_by_app
                        .iter_mut()
                        .filter(|(a, _)| **a != app_name)
                        .find_map(|(_, list)| {
                            let pos = list.iter().position(|v| {
                                let Some(&i) = node_index.get(v.node.as_str()) else {
                                    return false;
                                };
                                let (nv, mut f) = (ready_list[i], free[i]);
                                f.give(&v.resources);
                                selector_matches(&app.selector, &nv.labels)
                                    && f.fits(&app.resources)
                            })?;
                            Some(list.remove(pos))
                        });
                    if let Some(v) = victim {
                        released.insert(v.id);
                        decisions.push(Decision::Release { executor: v.id });
                    } else if !unplaceable.get(app_name).is_some_and(Option::is_some) {
                        waiting.entry(s.id).or_insert_with(|| {
                            format!(
                                "waiting for room on a node for an executor of `{app_name}` ({})",
                                app.resources
                            )
                        });
                    }
                    // The room frees when the release completes; launch on a later pass.
                    break;
                }
            };
            if let Some(f) = free.get_mut(node) {
                f.take(&app.resources);
                by_free_cpu.push((f.cpu_millis, std::cmp::Reverse(node)));
            }
            decisions.push(Decision::Launch {
                node: ready_list[node].name.clone(),
                application: app_name.to_string(),
            });
            *live += 1;
            need -= 1;
        }
        by_free_cpu.extend(unsuited);
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
    Plan {
        decisions,
        waiting,
        targets: target_of,
        owner_targets_permille,
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
            launchable: true,
            resources: Resources::default(),
            selector: BTreeMap::new(),
            launch_error: None,
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
        a.launchable = false;
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
        broken.launchable = false;
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
                application: "train".into()
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
            application: "ping".into()
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
                            resources: resources_of(&app),
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
                            resources: resources_of(a),
                            selector: BTreeMap::new(),
                            launch_error: None,
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
            let mut used: HashMap<&str, (u64, u64, u32)> = HashMap::new();
            let mut live: HashMap<&str, u32> = HashMap::new();
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
                    Decision::Launch { node, application } => {
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
                launchable: true,
                resources: Resources {
                    cpu_millis: 500 + (i % 4) * 250,
                    memory_bytes: Some(1 << 30),
                    gpus: 0,
                },
                selector: BTreeMap::new(),
                launch_error: None,
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
