//! The [`Planner`]: one plan, made in phases that share its state. [`Planner::run`] calls
//! them in this order, and each checks on entry that the one before it ran:
//!
//! 1. [`Planner::new`] indexes the snapshot: ready nodes and the room free on each.
//! 2. [`Planner::set_targets`]: each session's fair share of executors.
//! 3. [`Planner::measure_holdings`]: what each owner holds, who is under its target.
//! 4. [`Planner::give_back`]: executors that sessions no longer use are unbound.
//! 5. [`Planner::sort_executors`]: what could be reused, reclaimed or is on its way out.
//! 6. [`Planner::place_gangs`] (in `gangs.rs`): gangs launched whole, or nodes reserved.
//! 7. [`Planner::place_units`] (in `units.rs`): one executor at a time to sessions under
//!    their target.
//! 8. [`Planner::release_idle`]: Idle executors past their `delay_release`.
//!
//! [`Planner::finish`] then checks the plan's invariants (in debug builds) and returns it.
//!
//! What holds through all phases: free room per node only shrinks (and, once phase 5 has
//! filled them, so do room on its way, Idle room and reclaimable room); each executor is
//! decided on at most once (`taken`); decisions are only appended, so their order is the
//! order the phases run in.

use super::locality::{DataNodes, NO_DATA};
use super::owners::{pool_of, session_pool, Holdings, Pool};
use super::reasons::{backing_off, never_fits};
use super::room::{node_total, Free};
use super::{
    fair_shares, AppView, Decision, ExecutorPhase, ExecutorView, NodeView, Plan, SessionView,
    ShareRequest, Snapshot, Totals,
};
use flame_protocol::model::Resources;
use flame_protocol::{ExecutorId, SessionId};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::collections::{BTreeMap, BTreeSet};

/// The phases of a plan, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Indexed,
    Targets,
    Holdings,
    GaveBack,
    Sorted,
    Gangs,
    Units,
    IdleReleased,
}

/// One plan being made. Its fields are grouped by the phase that fills them; later phases
/// read them and change only what they say they change.
pub(super) struct Planner<'a> {
    pub(super) snap: &'a Snapshot,
    /// Where sessions' data lies (none unless [`Planner::with_data`]): phase 7 launches
    /// where it is, when it fits.
    pub(super) data: &'a DataNodes,
    /// The phase that ran last.
    phase: Phase,

    // 1. Index (`new`).
    pub(super) apps: BTreeMap<&'a str, &'a AppView>,
    /// Nodes that take new work: Ready and not draining.
    ready: BTreeMap<&'a str, &'a NodeView>,
    draining: BTreeSet<&'a str>,
    /// The ready nodes by index in name order (so index order breaks ties as names would);
    /// the hot loops look nodes up by index, not by name. Every per-node `Vec` below is
    /// indexed like it.
    pub(super) nodes: Vec<&'a NodeView>,
    pub(super) node_index: std::collections::HashMap<&'a str, usize>,
    /// Room free per node: what it offers less what its executors hold, less what this
    /// plan has launched there or set aside for an executor to come.
    pub(super) free: Vec<Free>,
    /// Live executors per application, counting those this plan launches.
    pub(super) live_per_app: BTreeMap<&'a str, u32>,
    /// Executors held per session (Binding or Bound; Unbinding ones are on their way out).
    pub(super) held: BTreeMap<SessionId, Vec<&'a ExecutorView>>,
    pub(super) totals: Totals,

    // 2. Targets.
    /// Per application: why no ready node could ever hold one of its executors, if so.
    pub(super) unplaceable: BTreeMap<&'a str, Option<String>>,
    /// Sessions with work (pending or running tasks).
    pub(super) active: Vec<&'a SessionView>,
    /// Executors each session with work is meant to have.
    pub(super) target_of: BTreeMap<SessionId, u64>,
    owner_targets_permille: BTreeMap<String, u32>,

    // 3. Holdings.
    /// The dominant share each owner holds now.
    pub(super) used: HashMap<&'a str, f64>,
    /// The same, kept up to date as executors change hands, for preemption between owners.
    pub(super) holdings: Holdings<'a>,
    pub(super) owner_of: HashMap<SessionId, &'a str>,
    pub(super) owner_ix_of: HashMap<SessionId, usize>,
    /// Elastic sessions under their target, with what they need and their target, the
    /// most deprived first.
    pub(super) under: Vec<(&'a SessionView, u64, u64)>,

    // 4. Give back.
    /// Executors decided on in this plan (each is decided on at most once).
    pub(super) taken: HashSet<ExecutorId>,
    /// Per session with work: how many of its executors beyond its target it still holds
    /// (reclaimed only when another session needs them).
    pub(super) excess: HashMap<SessionId, u64>,

    // 5. Sort executors.
    /// Bound executors that could be reclaimed, per application and owner, the first to
    /// give last (`pop` takes it).
    pub(super) reclaim_by_app: BTreeMap<&'a str, BTreeMap<&'a str, Vec<&'a ExecutorView>>>,
    /// The same per node, the first to give first.
    pub(super) reclaim_on_node: Vec<Vec<&'a ExecutorView>>,
    pub(super) idle_on_node: Vec<Vec<&'a ExecutorView>>,
    /// Per node: what executors on their way out will free (Unbinding ones turn Idle and
    /// are then released if nobody of their application needs them).
    pub(super) incoming: Vec<Free>,
    /// Per node: what reclaimable executors hold.
    pub(super) reclaimable: Vec<Free>,
    /// Per node: what Idle executors hold.
    pub(super) idle_room: Vec<Free>,
    /// Unbinding executors per pool, the lowest id last.
    pub(super) unbinding_by_pool: BTreeMap<Pool<'a>, Vec<&'a ExecutorView>>,
    /// Idle executors per pool on nodes that are not draining, the lowest id last.
    pub(super) idle_by_pool: BTreeMap<Pool<'a>, Vec<&'a ExecutorView>>,
    /// Launches in flight per pool, less those already counted for a session.
    pub(super) launching_by_pool: BTreeMap<Pool<'a>, u64>,
    /// Pools with a launch in flight or made in this plan: a pool whose owner its
    /// application is `probing` for launches no more until one says ready.
    pub(super) launched: std::collections::BTreeSet<Pool<'a>>,

    // 6. Gangs.
    /// Nodes reserved for a gang: nothing new goes there.
    pub(super) reserved: Vec<bool>,

    // What the plan says, filled by the phases in order.
    pub(super) decisions: Vec<Decision>,
    pub(super) waiting: BTreeMap<SessionId, String>,
    pub(super) reservations: BTreeMap<SessionId, Vec<String>>,
    pub(super) reclaimed_for: BTreeMap<ExecutorId, SessionId>,
}

impl<'a> Planner<'a> {
    /// Runs the phases in order and returns the plan.
    pub(super) fn run(mut self) -> Plan {
        self.set_targets();
        self.measure_holdings();
        self.give_back();
        self.sort_executors();
        self.place_gangs();
        self.place_units();
        self.release_idle();
        self.finish()
    }

    /// The same planner, placing new executors by where sessions' data lies
    /// (`locality.rs`). Called before the phases run.
    pub(super) fn with_data(mut self, data: &'a DataNodes) -> Planner<'a> {
        assert_eq!(
            self.phase,
            Phase::Indexed,
            "data given after the plan began"
        );
        self.data = data;
        self
    }

    /// Moves to `phase`, which must come right after the phase that ran last.
    pub(super) fn enter(&mut self, phase: Phase) {
        assert_eq!(
            self.phase as u8 + 1,
            phase as u8,
            "plan phase {phase:?} entered after {:?}",
            self.phase
        );
        self.phase = phase;
    }

    /// Phase 1: **Index** the snapshot: applications by name, the ready (Ready, not
    /// draining) nodes by index in name order, the room free on each after what every
    /// executor of the snapshot holds, live executors per application, and the executors
    /// each session holds.
    ///
    /// On exit: `free[n] <= node_total(nodes[n])`; no decision is made yet.
    pub(super) fn new(snap: &'a Snapshot) -> Planner<'a> {
        let apps: BTreeMap<&str, &AppView> = snap
            .applications
            .iter()
            .map(|a| (a.name.as_str(), a))
            .collect();
        let ready: BTreeMap<&str, &NodeView> = snap
            .nodes
            .iter()
            .filter(|n| n.ready && !n.draining)
            .map(|n| (n.name.as_str(), n))
            .collect();
        let draining: BTreeSet<&str> = snap
            .nodes
            .iter()
            .filter(|n| n.draining)
            .map(|n| n.name.as_str())
            .collect();
        let nodes: Vec<&NodeView> = ready.values().copied().collect();
        let node_index: std::collections::HashMap<&str, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.as_str(), i))
            .collect();
        let mut free: Vec<Free> = nodes.iter().map(|n| node_total(n)).collect();
        let mut live_per_app: BTreeMap<&str, u32> = BTreeMap::new();
        for e in &snap.executors {
            if let Some(&i) = node_index.get(e.node.as_str()) {
                free[i].take(&e.resources);
            }
            *live_per_app.entry(e.application.as_str()).or_default() += 1;
        }
        let mut held: BTreeMap<SessionId, Vec<&ExecutorView>> = BTreeMap::new();
        for e in &snap.executors {
            if let (Some(s), ExecutorPhase::Binding | ExecutorPhase::Bound) = (e.session, e.phase) {
                held.entry(s).or_default().push(e);
            }
        }
        let per_node = nodes.len();
        Planner {
            snap,
            data: &NO_DATA,
            phase: Phase::Indexed,
            apps,
            ready,
            draining,
            nodes,
            node_index,
            free,
            live_per_app,
            held,
            totals: Totals::schedulable(&snap.nodes),
            unplaceable: BTreeMap::new(),
            active: Vec::new(),
            target_of: BTreeMap::new(),
            owner_targets_permille: BTreeMap::new(),
            used: HashMap::default(),
            holdings: Holdings::default(),
            owner_of: HashMap::default(),
            owner_ix_of: HashMap::default(),
            under: Vec::new(),
            taken: HashSet::default(),
            excess: HashMap::default(),
            reclaim_by_app: BTreeMap::new(),
            reclaim_on_node: vec![Vec::new(); per_node],
            idle_on_node: vec![Vec::new(); per_node],
            incoming: vec![Free::default(); per_node],
            reclaimable: vec![Free::default(); per_node],
            idle_room: vec![Free::default(); per_node],
            unbinding_by_pool: BTreeMap::new(),
            idle_by_pool: BTreeMap::new(),
            launching_by_pool: BTreeMap::new(),
            launched: Default::default(),
            reserved: vec![false; per_node],
            decisions: Vec::new(),
            waiting: BTreeMap::new(),
            reservations: BTreeMap::new(),
            reclaimed_for: BTreeMap::new(),
        }
    }

    /// Phase 2: **Targets** ([`fair_shares`]). A session whose application cannot launch
    /// now (backing off after failures) claims no more than the executors it could use
    /// today, so its share does not sit idle while others wait; one whose executors fit no
    /// node claims nothing. Executors serve only their owner's sessions: they are pooled
    /// per (application, owner), and a session uses only its own pool's.
    ///
    /// On entry: the snapshot is indexed. On exit: `active` lists the sessions with work,
    /// `target_of` has a target for each, a gang's all of its demand or nothing;
    /// `unplaceable` has an entry per application; `waiting` says why each
    /// session with work that holds nothing and is given nothing waits. No decision is
    /// made.
    pub(super) fn set_targets(&mut self) {
        self.enter(Phase::Targets);
        let snap = self.snap;
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
        for (name, app) in &self.apps {
            self.unplaceable.insert(*name, never_fits(app, &self.ready));
        }
        self.active = snap.sessions.iter().filter(|s| s.demand > 0).collect();
        let (apps, unplaceable) = (&self.apps, &self.unplaceable);
        let demands: Vec<u64> = self
            .active
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
        let requests: Vec<ShareRequest> = self
            .active
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
        let targets = fair_shares(self.totals, &requests, &snap.owner_weights, &app_caps);
        debug_assert!(
            requests
                .iter()
                .zip(&targets)
                .all(|(r, &t)| !r.atomic || t == 0 || t == r.demand),
            "a gang's target is all of its demand or nothing"
        );
        self.target_of = self
            .active
            .iter()
            .zip(&targets)
            .map(|(s, &t)| (s.id, t))
            .collect();
        let mut owner_targets: BTreeMap<String, f64> = BTreeMap::new();
        for (r, &t) in requests.iter().zip(&targets) {
            let share = self.totals.dominant_share(&r.unit);
            if share.is_finite() {
                *owner_targets.entry(r.owner.clone()).or_default() += share * t as f64;
            }
        }
        self.owner_targets_permille = owner_targets
            .into_iter()
            .map(|(o, s)| (o, (s * 1000.0).round().min(1000.0) as u32))
            .collect();
        for s in &self.active {
            let have = self.held.get(&s.id).map_or(0, Vec::len) as u64;
            let target = self.target_of.get(&s.id).copied().unwrap_or(0);
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
                self.waiting.insert(s.id, why);
            }
        }
    }

    /// Phase 3: **Holdings**: the dominant share each owner holds ([`Holdings`]: only what
    /// an owner holds beyond its weighted share goes to other owners), and the elastic
    /// sessions under their target, the most deprived first (smallest held fraction of its
    /// target), so what cannot be placed this round does not always fall on the same
    /// (newest) sessions.
    ///
    /// On entry: targets are set. On exit: `under` holds `(session, need, target)` with
    /// `0 < need <= target`, for sessions without a gang only. No decision is made.
    pub(super) fn measure_holdings(&mut self) {
        self.enter(Phase::Holdings);
        let snap = self.snap;
        for s in &snap.sessions {
            for e in self.held.get(&s.id).into_iter().flatten() {
                let share = self.totals.dominant_share(&e.resources);
                if share.is_finite() {
                    *self.used.entry(s.owner.as_str()).or_default() += share;
                }
            }
        }
        self.holdings = Holdings::new(&snap.sessions, &snap.owner_weights, &self.used);
        self.owner_of = snap
            .sessions
            .iter()
            .map(|s| (s.id, s.owner.as_str()))
            .collect();
        let holdings = &self.holdings;
        self.owner_ix_of = snap
            .sessions
            .iter()
            .filter_map(|s| Some((s.id, holdings.ix(&s.owner)?)))
            .collect();
        let (held, target_of) = (&self.held, &self.target_of);
        let mut under: Vec<(&SessionView, u64, u64)> = self
            .active
            .iter()
            .filter_map(|s| {
                let have = held.get(&s.id).map_or(0, Vec::len) as u64;
                let t = target_of.get(&s.id).copied().unwrap_or(0);
                (have < t && s.gang.is_none()).then(|| (*s, t - have, t))
            })
            .collect();
        under.sort_by(|a, b| {
            let (have_a, have_b) = (a.2 - a.1, b.2 - b.1);
            (u128::from(have_a) * u128::from(b.2))
                .cmp(&(u128::from(have_b) * u128::from(a.2)))
                .then(a.0.id.cmp(&b.0.id))
        });
        self.under = under;
    }

    /// Phase 4: **Give back what is not used.** Sessions with nothing left to do give their
    /// executors back (once closed, once someone else waits, or after `delay_release`);
    /// sessions with work give back the executors beyond their target that have run out of
    /// tasks, the least busy first. The rest of an excess is reclaimed only when another
    /// session needs it (phases 6 and 7), so executors change hands no faster than they can
    /// be used. A gang keeps its ranks while it runs.
    ///
    /// On entry: no decision is made. On exit: the decisions are `Unbind`s of Binding or
    /// Bound executors, each in `taken`; `excess` holds what each session with work still
    /// holds beyond its target.
    pub(super) fn give_back(&mut self) {
        self.enter(Phase::GaveBack);
        debug_assert!(self.decisions.is_empty() && self.taken.is_empty());
        let snap = self.snap;
        let someone_waits = !self.under.is_empty();
        for s in &snap.sessions {
            if s.gang.is_some() && s.demand > 0 {
                continue; // a gang keeps its ranks while it runs
            }
            let Some(list) = self.held.get(&s.id) else {
                continue;
            };
            let target = self.target_of.get(&s.id).copied().unwrap_or(0);
            let have = list.len() as u64;
            if have <= target {
                continue;
            }
            let delay = self
                .apps
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
                    self.decisions.push(Decision::Unbind { executor: e.id });
                    self.taken.insert(e.id);
                    over -= 1;
                }
            }
            if over > 0 && s.demand > 0 {
                self.excess.insert(s.id, over);
            }
        }
    }

    /// Phase 5: **Sort the executors** by what they can do for the phases that place: Idle
    /// ones per node and per pool, launches in flight per pool, what executors on their way
    /// out free per node, and what can be reclaimed for sessions under their target: Bound
    /// executors not taken and not a gang's (a gang's ranks are never reclaimed); of other
    /// owners as far as [`Holdings::may_take`] allows, of the session's own owner from
    /// sessions over their target (a higher priority reclaiming). Sessions over their
    /// target give first, then lower priorities, then the executors with the least work
    /// outstanding. A draining node keeps nothing idle: its Idle executors are released.
    ///
    /// On entry: give-back is done. On exit: the executor lists and per-node room are
    /// filled; the decisions added are `Release`s of Idle executors on draining nodes,
    /// each in `taken`, none of them in `idle_by_pool`.
    pub(super) fn sort_executors(&mut self) {
        self.enter(Phase::Sorted);
        let snap = self.snap;
        let gang_sessions: HashSet<SessionId> = snap
            .sessions
            .iter()
            .filter(|s| s.gang.is_some())
            .map(|s| s.id)
            .collect();
        for e in &snap.executors {
            let Some(&i) = self.node_index.get(e.node.as_str()) else {
                continue;
            };
            match e.phase {
                ExecutorPhase::Releasing => self.incoming[i].give(&e.resources),
                ExecutorPhase::Unbinding => {
                    self.incoming[i].give(&e.resources);
                    self.unbinding_by_pool
                        .entry(pool_of(e))
                        .or_default()
                        .push(e);
                }
                ExecutorPhase::Idle => {
                    self.idle_on_node[i].push(e);
                    self.idle_room[i].give(&e.resources);
                }
                ExecutorPhase::Bound | ExecutorPhase::Binding
                    if !self.taken.contains(&e.id)
                        && e.session.is_some_and(|s| !gang_sessions.contains(&s)) =>
                {
                    let owner = e
                        .session
                        .and_then(|s| self.owner_of.get(&s))
                        .copied()
                        .unwrap_or("");
                    self.reclaim_by_app
                        .entry(e.application.as_str())
                        .or_default()
                        .entry(owner)
                        .or_default()
                        .push(e);
                    self.reclaim_on_node[i].push(e);
                    self.reclaimable[i].give(&e.resources);
                }
                _ => {}
            }
        }
        let priority_of: HashMap<SessionId, i32> =
            snap.sessions.iter().map(|s| (s.id, s.priority)).collect();
        let excess = &self.excess;
        let give_order = |e: &&ExecutorView| {
            let session = e.session.unwrap_or(SessionId(0));
            (
                !excess.contains_key(&session),
                priority_of.get(&session).copied().unwrap_or(0),
                e.outstanding,
                e.id,
            )
        };
        for list in self
            .reclaim_by_app
            .values_mut()
            .flat_map(|m| m.values_mut())
        {
            // pop() takes the first in giving order.
            list.sort_by_key(|e| std::cmp::Reverse(give_order(e)));
        }
        for list in &mut self.reclaim_on_node {
            list.sort_by_key(give_order);
        }
        for list in self.unbinding_by_pool.values_mut() {
            list.sort_by_key(|e| std::cmp::Reverse(e.id));
        }
        for e in &snap.executors {
            if self.draining.contains(e.node.as_str()) {
                // A draining node keeps nothing idle and takes nothing new.
                if e.phase == ExecutorPhase::Idle {
                    self.decisions.push(Decision::Release { executor: e.id });
                    self.taken.insert(e.id);
                }
                continue;
            }
            match e.phase {
                ExecutorPhase::Idle => self.idle_by_pool.entry(pool_of(e)).or_default().push(e),
                ExecutorPhase::Launching => {
                    *self.launching_by_pool.entry(pool_of(e)).or_default() += 1;
                    self.launched.insert(pool_of(e));
                }
                _ => {}
            }
        }
        for list in self.idle_by_pool.values_mut() {
            list.sort_by_key(|e| e.id);
            list.reverse(); // pop() takes the lowest id first
        }
    }

    /// Phase 8: **Idle executors** past their application's `delay_release` are released
    /// (those taken this plan, to bind or to make room, are not).
    ///
    /// On entry: units are placed. On exit: every Idle executor not taken and quiet for
    /// its application's delay has a `Release`; `taken` is no longer kept up to date.
    pub(super) fn release_idle(&mut self) {
        self.enter(Phase::IdleReleased);
        for list in self.idle_by_pool.values() {
            for e in list {
                if self.taken.contains(&e.id) {
                    continue;
                }
                let delay = self
                    .apps
                    .get(e.application.as_str())
                    .map_or(0, |a| a.delay_release_ms);
                if self.snap.now_ms.saturating_sub(e.quiet_since_ms) >= delay {
                    self.decisions.push(Decision::Release { executor: e.id });
                }
            }
        }
    }

    /// The plan, once every phase has run; its invariants are checked in debug builds
    /// ([`check_plan`]).
    pub(super) fn finish(self) -> Plan {
        assert_eq!(self.phase, Phase::IdleReleased, "a plan finished early");
        let plan = Plan {
            decisions: self.decisions,
            waiting: self.waiting,
            targets: self.target_of,
            owner_targets_permille: self.owner_targets_permille,
            reservations: self.reservations,
            reclaimed_for: self.reclaimed_for,
        };
        if cfg!(debug_assertions) {
            check_plan(self.snap, &plan);
        }
        plan
    }
}

/// Panics unless `plan` keeps the invariants every plan keeps, whatever the snapshot:
/// - each executor is decided on at most once;
/// - a `Bind` takes an Idle executor of the session's own pool (same application and
///   owner: executors never serve another owner), an `Unbind` a Binding or Bound one, a
///   `Release` an Idle one;
/// - launches go to Ready nodes that are not draining, and never over-commit one: what
///   the executors launched on a node need fits in what it offered free before the plan;
/// - reservations name Ready nodes that are not draining, each reserved for one gang.
///
/// It is O(nodes + executors + decisions), so it runs in debug builds only.
pub(super) fn check_plan(snap: &Snapshot, plan: &Plan) {
    let executors: HashMap<ExecutorId, &ExecutorView> =
        snap.executors.iter().map(|e| (e.id, e)).collect();
    let sessions: HashMap<SessionId, &SessionView> =
        snap.sessions.iter().map(|s| (s.id, s)).collect();
    let apps: HashMap<&str, &AppView> = snap
        .applications
        .iter()
        .map(|a| (a.name.as_str(), a))
        .collect();
    let mut free: BTreeMap<&str, Free> = snap
        .nodes
        .iter()
        .filter(|n| n.ready && !n.draining)
        .map(|n| (n.name.as_str(), node_total(n)))
        .collect();
    for e in &snap.executors {
        if let Some(room) = free.get_mut(e.node.as_str()) {
            room.take(&e.resources);
        }
    }
    let mut launched: BTreeMap<&str, Free> = BTreeMap::new();
    let mut decided: HashSet<ExecutorId> = HashSet::default();
    for d in &plan.decisions {
        let executor = match d {
            Decision::Launch {
                node, application, ..
            } => {
                assert!(
                    free.contains_key(node.as_str()),
                    "launch on {node}, which takes no new work"
                );
                let need = apps.get(application.as_str()).map(|a| a.resources);
                launched
                    .entry(node.as_str())
                    .or_default()
                    .give(&need.unwrap_or_default());
                continue;
            }
            Decision::Bind { executor, .. }
            | Decision::Unbind { executor }
            | Decision::Release { executor } => *executor,
        };
        assert!(decided.insert(executor), "{executor:?} decided on twice");
        let e = executors
            .get(&executor)
            .unwrap_or_else(|| panic!("{executor:?} is not in the snapshot"));
        match d {
            Decision::Bind { session, .. } => {
                assert_eq!(e.phase, ExecutorPhase::Idle, "bound {executor:?}");
                let s = sessions
                    .get(session)
                    .unwrap_or_else(|| panic!("{session:?} is not in the snapshot"));
                assert_eq!(
                    pool_of(e),
                    session_pool(s),
                    "{executor:?} bound to a session of another pool"
                );
            }
            Decision::Unbind { .. } => assert!(
                matches!(e.phase, ExecutorPhase::Binding | ExecutorPhase::Bound),
                "unbound {executor:?} in phase {:?}",
                e.phase
            ),
            Decision::Release { .. } => {
                assert_eq!(e.phase, ExecutorPhase::Idle, "released {executor:?}");
            }
            Decision::Launch { .. } => {}
        }
    }
    for (node, used) in &launched {
        let room = free[node];
        assert!(
            used.cpu_millis <= room.cpu_millis
                && used.memory_bytes <= room.memory_bytes
                && used.gpus <= room.gpus,
            "launches over-commit {node}: {used:?} in {room:?}"
        );
    }
    let mut reserved: HashSet<&str> = HashSet::default();
    for names in plan.reservations.values() {
        for name in names {
            assert!(
                free.contains_key(name.as_str()),
                "{name} reserved, which takes no new work"
            );
            assert!(reserved.insert(name), "{name} reserved twice");
        }
    }
}
