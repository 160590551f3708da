//! Phase 7 of a plan ([`Planner::place_units`]): executors one at a time to the elastic
//! sessions under their target, by reuse, launch, reclaim, or room being freed or made.

use super::owners::{pool_of, session_pool, take_reclaimable, UnitQueue};
use super::planner::{Phase, Planner};
use super::reasons::backing_off;
use super::room::{
    fits_beside_gpus, Free, NodeHeaps, MAKE_ROOM_NODES_PER_PLAN, MAKE_ROOM_PER_PLAN,
};
use super::{selector_matches, AppView, Decision, ExecutorPhase, ExecutorView, SessionView};
use flame_protocol::SessionId;
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

/// What the searches for room carry from one unit to the next within a plan. Free room,
/// what is on its way and what is reclaimable only shrink while a plan is made, so a node
/// passed over for an application stays passed over: each application's search resumes
/// where its last one stopped.
struct Search<'a> {
    /// Ready nodes by free cpu, GPU nodes apart.
    heaps: NodeHeaps,
    /// Applications that found no free room: they find none later in the same plan.
    no_room_for: HashSet<&'a str>,
    /// Per application: where its search for room being freed resumes.
    soon_cursor: HashMap<&'a str, usize>,
    /// Per application: where its search for room to make resumes.
    room_cursor: HashMap<&'a str, usize>,
    /// Make-room searches left in this plan.
    make_room_left: usize,
    /// Nodes that make-room searches may still look at, in all, in this plan.
    room_nodes_left: usize,
    /// Owners with a session over its target, whose other sessions may reclaim from it.
    owners_with_excess: HashSet<&'a str>,
}

impl<'a> Planner<'a> {
    /// Phase 7: **Units**, one executor at a time, to the owner holding the least for its
    /// weight and within it to the session first in its fair-share order (priority, then
    /// the smallest held fraction of its target; [`UnitQueue`]): when not every target can
    /// be met at once (room in pieces, executors in transit), what can be placed goes where
    /// the fair share wants it. Each unit is served by [`Planner::serve_unit`].
    ///
    /// On entry: gangs are placed, and `free` is what is left after their launches. On
    /// exit: each session under its target was given units until one could not be placed;
    /// launches used only free room on nodes not reserved, and an executor taken is in
    /// `taken`.
    pub(super) fn place_units(&mut self) {
        self.enter(Phase::Units);
        let owner_of = &self.owner_of;
        let mut search = Search {
            heaps: NodeHeaps::new(&self.free, &self.nodes),
            no_room_for: HashSet::default(),
            soon_cursor: HashMap::default(),
            room_cursor: HashMap::default(),
            make_room_left: MAKE_ROOM_PER_PLAN,
            room_nodes_left: MAKE_ROOM_NODES_PER_PLAN,
            owners_with_excess: self
                .excess
                .keys()
                .filter_map(|id| owner_of.get(id).copied())
                .collect(),
        };
        let (apps, totals) = (&self.apps, self.totals);
        let mut queue = UnitQueue::new(&self.under, &self.used, &self.snap.owner_weights, |s| {
            apps.get(s.application.as_str())
                .map_or(0.0, |a| totals.dominant_share(&a.resources))
        });
        while let Some(s) = queue.next() {
            let placed = self.serve_unit(s, &mut search);
            queue.served(placed);
            if placed {
                if let Some(a) = self.apps.get(s.application.as_str()) {
                    if let Some(o) = self.holdings.ix(&s.owner) {
                        self.holdings
                            .gained(o, self.totals.dominant_share(&a.resources));
                    }
                }
            }
        }
    }

    /// One unit for session `s`: an Idle executor of its pool, else one on its way (a
    /// launch in flight, or an executor of its pool being given back by another session
    /// of its owner), else [`Planner::one_more_unit`]. Returns whether it got one.
    fn serve_unit(&mut self, s: &'a SessionView, search: &mut Search<'a>) -> bool {
        let mut need = 1u64;
        let pool = session_pool(s);
        let Some(&app) = self.apps.get(s.application.as_str()) else {
            return false;
        };
        while need > 0 {
            let Some(e) = self.idle_by_pool.get_mut(&pool).and_then(Vec::pop) else {
                break;
            };
            if !self.taken.insert(e.id) {
                continue;
            }
            self.decisions.push(Decision::Bind {
                executor: e.id,
                session: s.id,
            });
            if let Some(&i) = self.node_index.get(e.node.as_str()) {
                self.idle_room[i].take(&e.resources);
            }
            need -= 1;
        }
        // Launches in flight, and executors of its pool being given back by other
        // sessions of its owner, arrive Idle soon: count them as coming.
        let in_flight = self.launching_by_pool.entry(pool).or_default();
        let absorbed = need.min(*in_flight);
        *in_flight -= absorbed;
        need -= absorbed;
        while need > 0 {
            let Some(e) = self.unbinding_by_pool.get_mut(&pool).and_then(Vec::pop) else {
                break;
            };
            if let Some(&i) = self.node_index.get(e.node.as_str()) {
                self.incoming[i].take(&e.resources);
            }
            need -= 1;
        }
        let launchable = app.launchable(&s.owner);
        if need > 0 && !launchable {
            self.waiting
                .entry(s.id)
                .or_insert_with(|| backing_off(app, &s.owner));
        }
        while need > 0 {
            if app.probing.contains(&s.owner) && self.launched.contains(&pool) {
                self.waiting.entry(s.id).or_insert_with(|| {
                    format!(
                        "waiting for an executor of `{}` to say ready (one is launched at a \
                         time until one does)",
                        app.name
                    )
                });
                break;
            }
            if !self.one_more_unit(s, app, launchable, search) {
                break;
            }
            need -= 1;
        }
        need == 0
    }

    /// One more executor for `s`, by the first of these that works: a launch where one
    /// fits now; an executor of its pool that a session of its owner over its target gives
    /// back (another owner's executors never change hands: they make room); room on a node
    /// that is being freed; room made on a node. Returns false, with the reason in
    /// `waiting` where there is one, when none works.
    fn one_more_unit(
        &mut self,
        s: &'a SessionView,
        app: &'a AppView,
        launchable: bool,
        search: &mut Search<'a>,
    ) -> bool {
        let app_name = s.application.as_str();
        let live = self.live_per_app.get(app_name).copied().unwrap_or(0);
        if launchable && live < app.max_instances && self.launch_unit(s, app, search) {
            return true;
        }
        if self.reclaim_unit(s) {
            return true;
        }
        if !launchable {
            return false;
        }
        if live >= app.max_instances {
            self.waiting.entry(s.id).or_insert_with(|| {
                format!(
                    "application `{app_name}` has reached its max_instances ({})",
                    app.max_instances
                )
            });
            return false;
        }
        // Room on a node that is being freed, or that can be freed by releasing Idle
        // executors of other applications and reclaiming executors of sessions over their
        // target (for GPU work, also executors that need no GPU: they can run elsewhere).
        if search.make_room_left == 0 {
            self.waiting.entry(s.id).or_insert_with(|| {
                format!(
                    "waiting for room on a node for an executor of `{app_name}` ({})",
                    app.resources
                )
            });
            return false;
        }
        search.make_room_left -= 1;
        let order: Vec<usize> = search
            .heaps
            .class_order(app.resources.gpus > 0)
            .iter()
            .flat_map(|c| c.iter().copied())
            .collect();
        self.wait_for_room(s, app, &order, search) || self.make_room(s, app, &order, search)
    }

    /// Launches an executor for `s` where one fits now (none reserved): on the node holding
    /// the most of its session's data ([`Planner::data_node_for`]), else on the one with the
    /// most free cpu (nodes without GPUs first). Returns whether it did.
    fn launch_unit(
        &mut self,
        s: &'a SessionView,
        app: &'a AppView,
        search: &mut Search<'a>,
    ) -> bool {
        let app_name = s.application.as_str();
        let (nodes, reserved) = (&self.nodes, &self.reserved);
        let fits = |n: usize, f: &Free| {
            !reserved[n]
                && fits_beside_gpus(nodes[n], f, &app.resources)
                && selector_matches(&app.selector, &nodes[n].labels)
        };
        // Free room only shrinks while a plan is made: an application that found none
        // finds none later in the same plan (nor on its session's data nodes). Where the
        // session's data is, if one fits there; else as without data.
        let found = if search.no_room_for.contains(app_name) {
            None
        } else {
            self.data_node_for(s, fits)
                .or_else(|| search.heaps.best(&self.free, app.resources.gpus > 0, fits))
        };
        let Some(node) = found else {
            search.no_room_for.insert(app_name);
            return false;
        };
        assert!(!self.reserved[node], "launch on a reserved node");
        self.free[node].take(&app.resources);
        search.heaps.update(node, &self.free[node], &self.nodes);
        self.decisions.push(Decision::Launch {
            node: self.nodes[node].name.clone(),
            application: app_name.to_string(),
            owner: s.owner.clone(),
        });
        *self.live_per_app.entry(app_name).or_default() += 1;
        self.launched.insert(session_pool(s));
        true
    }

    /// Unbinds for `s` an executor of its pool from a session of its owner over its
    /// target. Returns whether it did.
    fn reclaim_unit(&mut self, s: &'a SessionView) -> bool {
        let Some(e) = take_reclaimable(
            self.reclaim_by_app.get_mut(s.application.as_str()),
            &s.owner,
            &mut self.excess,
            &mut self.taken,
        ) else {
            return false;
        };
        self.decisions.push(Decision::Unbind { executor: e.id });
        self.reclaimed_for.insert(e.id, s.id);
        if let Some(&i) = self.node_index.get(e.node.as_str()) {
            self.reclaimable[i].take(&e.resources);
        }
        true
    }

    /// Whether node `n` may take an executor of `app`: not reserved, and carrying the
    /// labels it selects.
    fn suits(&self, n: usize, app: &AppView) -> bool {
        !self.reserved[n] && selector_matches(&app.selector, &self.nodes[n].labels)
    }

    /// Sets aside for `s` room on the first node in `order` (from where the last search
    /// for its application stopped) where free room and room on its way fit an executor.
    /// Returns whether it found one; the unit then waits for that room.
    fn wait_for_room(
        &mut self,
        s: &'a SessionView,
        app: &'a AppView,
        order: &[usize],
        search: &mut Search<'a>,
    ) -> bool {
        let app_name = s.application.as_str();
        let cursor = search.soon_cursor.entry(app_name).or_default();
        while let Some(&n) = order.get(*cursor) {
            let mut room = self.free[n];
            room.add(&self.incoming[n]);
            if self.suits(n, app) && fits_beside_gpus(self.nodes[n], &room, &app.resources) {
                break;
            }
            *cursor += 1;
        }
        let Some(&n) = order.get(*cursor) else {
            return false;
        };
        let rest = self.free[n].take_up_to(Free::of(&app.resources));
        self.incoming[n].take_up_to(rest);
        search.heaps.update(n, &self.free[n], &self.nodes);
        self.waiting.entry(s.id).or_insert_with(|| {
            format!(
                "waiting for executors of other sessions on {} to finish their tasks \
                 and make room for `{app_name}` ({})",
                self.nodes[n].name, app.resources
            )
        });
        true
    }

    /// Makes room for `s` on the first node in `order` (from where the last search for its
    /// application stopped) where releasing Idle executors and reclaiming Bound ones can
    /// ([`Planner::find_room`]), and sets that room aside for it. Returns whether it did;
    /// if not, the session waits for room.
    fn make_room(
        &mut self,
        s: &'a SessionView,
        app: &'a AppView,
        order: &[usize],
        search: &mut Search<'a>,
    ) -> bool {
        let app_name = s.application.as_str();
        let Some((n, victims)) = self.find_room(s, app, order, search) else {
            if !self.unplaceable.get(app_name).is_some_and(Option::is_some) {
                self.waiting.entry(s.id).or_insert_with(|| {
                    format!(
                        "waiting for room on a node for an executor of `{app_name}` ({})",
                        app.resources
                    )
                });
            }
            return false;
        };
        let taker = self.holdings.ix(&s.owner).unwrap_or(usize::MAX);
        for e in &victims {
            self.taken.insert(e.id);
            if e.phase == ExecutorPhase::Idle {
                self.decisions.push(Decision::Release { executor: e.id });
                self.idle_room[n].take(&e.resources);
            } else {
                self.decisions.push(Decision::Unbind { executor: e.id });
                self.reclaimed_for.insert(e.id, s.id);
                let owner = e.session.and_then(|id| self.owner_ix_of.get(&id)).copied();
                if let Some(o) = owner.filter(|o| *o != taker) {
                    self.holdings
                        .moved(o, self.totals.dominant_share(&e.resources));
                }
                if let Some(left) = e.session.and_then(|id| self.excess.get_mut(&id)) {
                    *left = left.saturating_sub(1);
                }
                self.reclaimable[n].take(&e.resources);
            }
        }
        // What it took from the node's free room and what is on its way; the room arrives
        // over the next rounds.
        let rest = self.free[n].take_up_to(Free::of(&app.resources));
        self.incoming[n].take_up_to(rest);
        search.heaps.update(n, &self.free[n], &self.nodes);
        self.waiting.entry(s.id).or_insert_with(|| {
            format!(
                "making room on {} for `{app_name}` ({}): executors of sessions over \
                 their share finish their tasks and are given back",
                self.nodes[n].name, app.resources
            )
        });
        true
    }

    /// The first node in `order`, from where the last search for the application stopped,
    /// where free room, room on its way, and what Idle executors of other pools and
    /// reclaimable executors hold fit an executor of `app`; with the executors to release
    /// or unbind there. Looks at no more nodes than the plan has left to look at.
    fn find_room(
        &self,
        s: &'a SessionView,
        app: &'a AppView,
        order: &[usize],
        search: &mut Search<'a>,
    ) -> Option<(usize, Vec<&'a ExecutorView>)> {
        let unit_share = self.totals.dominant_share(&app.resources);
        let cursor = search
            .room_cursor
            .entry(s.application.as_str())
            .or_default();
        // Nobody to take Bound executors from: no other owner holds enough more for its
        // weight, and no session of its own owner is over its target (Idle executors of
        // other applications can still be released).
        let taker = self.holdings.ix(&s.owner).unwrap_or(usize::MAX);
        let hopeless = !(search.owners_with_excess.contains(s.owner.as_str())
            || taker != usize::MAX && self.holdings.may_take_from_someone(taker, unit_share));
        while let Some(&n) = order.get(*cursor) {
            if search.room_nodes_left == 0 {
                break;
            }
            search.room_nodes_left -= 1;
            let mut room = self.free[n];
            room.add(&self.incoming[n]);
            let mut could = room;
            could.add(&self.idle_room[n]);
            if !hopeless {
                could.add(&self.reclaimable[n]);
            }
            if !self.suits(n, app) || !fits_beside_gpus(self.nodes[n], &could, &app.resources) {
                *cursor += 1;
                continue;
            }
            if let Some(victims) = self.victims_on(n, s, app, taker, room) {
                return Some((n, victims));
            }
            *cursor += 1;
        }
        None
    }

    /// What making room for an executor of `app` on node `n`, which has `room` free or on
    /// its way, takes: Idle executors of other pools (other applications, or other owners'
    /// executors of this one) first, then reclaimable executors: other owners' first, as
    /// far as [`Holdings::may_take`](super::owners::Holdings::may_take) allows (an owner
    /// that makes room for itself holds less until the room is used), its own owner's only
    /// from sessions over their target; each part in giving order. `None` when all of it
    /// would not make room.
    fn victims_on(
        &self,
        n: usize,
        s: &'a SessionView,
        app: &'a AppView,
        taker: usize,
        mut room: Free,
    ) -> Option<Vec<&'a ExecutorView>> {
        let pool = session_pool(s);
        let unit_share = self.totals.dominant_share(&app.resources);
        let mut victims: Vec<&ExecutorView> = Vec::new();
        let mut over_left: HashMap<SessionId, u64> = HashMap::default();
        let idle = self.idle_on_node[n]
            .iter()
            .filter(|e| pool_of(e) != pool && !self.taken.contains(&e.id));
        let owner_of_executor =
            |e: &ExecutorView| e.session.and_then(|id| self.owner_ix_of.get(&id)).copied();
        let mut candidates: Vec<&ExecutorView> = self.reclaim_on_node[n]
            .iter()
            .filter(|e| {
                !self.taken.contains(&e.id)
                    && owner_of_executor(e).is_some_and(|o| {
                        self.holdings.may_take(
                            o,
                            self.totals.dominant_share(&e.resources),
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
                .or_insert_with(|| self.excess.get(&id).copied().unwrap_or(0));
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
            if fits_beside_gpus(self.nodes[n], &room, &app.resources) {
                break;
            }
            victims.push(e);
            room.give(&e.resources);
        }
        fits_beside_gpus(self.nodes[n], &room, &app.resources).then_some(victims)
    }
}
