//! Phase 6 of a plan ([`Planner::place_gangs`]): gangs (batch sessions), launched whole or
//! given a bounded reservation of nodes.

use super::owners::session_pool;
use super::planner::{Phase, Planner};
use super::reasons::{backing_off, no_nodes_hold};
use super::room::{fits_beside_gpus, node_total, place_gang, times, Free, RESERVE_PERMILLE};
use super::{AppView, Decision, ExecutorPhase, Gang, SessionView};

/// What gang reservations hold while a plan is made.
struct Reserve {
    /// What each node offers with nothing on it: a gang that does not fit even so waits
    /// for nodes, not for its share.
    whole: Vec<Free>,
    /// The cpus of the nodes reserved so far.
    cpu: u64,
    /// Most cpus that reservations may hold ([`RESERVE_PERMILLE`] of the cluster's).
    cap: u64,
}

impl<'a> Planner<'a> {
    /// Phase 6: **Gangs**, higher priority then older first: all ranks are launched in one
    /// plan or none are. One that does not fit now, and whose owner's share holds it,
    /// reserves the nodes that can hold it once their elastic executors are gone (each
    /// finishes its task, so the wait is bounded by the longest task there): nothing new
    /// goes on a reserved node, and elastic work goes on elsewhere (backfill) without
    /// delaying the gang. Reservations cover at most [`RESERVE_PERMILLE`] of the cpus (the
    /// last one may cross it). A gang holds nothing until it is placed whole, so two gangs
    /// never deadlock on partial holds. A gang already placed binds its ranks as they come
    /// up, and is never topped up.
    ///
    /// On entry: the executors are sorted. On exit: each gang has launched all its ranks,
    /// or none and says why it waits; `reserved` marks the nodes reserved, each for one
    /// gang, and what was freed there for it is `taken`.
    pub(super) fn place_gangs(&mut self) {
        self.enter(Phase::Gangs);
        let mut reserve = Reserve {
            whole: self.nodes.iter().map(|n| node_total(n)).collect(),
            cpu: 0,
            cap: self.totals.cpu_millis * RESERVE_PERMILLE / 1000,
        };
        let mut gangs: Vec<&SessionView> = self
            .active
            .iter()
            .filter(|s| s.gang.is_some())
            .copied()
            .collect();
        gangs.sort_by_key(|s| (std::cmp::Reverse(s.priority), s.id));
        for g in gangs {
            let (Some(gang), Some(&app)) = (g.gang, self.apps.get(g.application.as_str())) else {
                continue;
            };
            if self.bind_placed_gang(g, gang)
                || self.gang_cannot_start(g, gang, app, &reserve.whole)
                || self.launch_gang(g, gang, app)
            {
                continue;
            }
            if reserve.cpu >= reserve.cap {
                self.waiting.entry(g.id).or_insert_with(|| {
                    "waiting behind the node reservations of other gangs".to_string()
                });
                continue;
            }
            self.reserve_for_gang(g, gang, app, &mut reserve.cpu);
        }
    }

    /// A gang with ranks already (held, launching or Idle in its pool) is placed: it binds
    /// the Idle ones, and is told when it lost some. Returns whether it was placed.
    fn bind_placed_gang(&mut self, g: &'a SessionView, gang: Gang) -> bool {
        let pool = session_pool(g);
        let ranks = u64::from(gang.ranks);
        let have = self.held.get(&g.id).map_or(0, Vec::len) as u64;
        let in_flight = self.launching_by_pool.get(&pool).copied().unwrap_or(0);
        let ready = self.idle_by_pool.get(&pool).map_or(0, Vec::len) as u64;
        if have + in_flight + ready == 0 {
            return false;
        }
        // Placed: bind its ranks as they come up.
        while let Some(e) = self.idle_by_pool.get_mut(&pool).and_then(Vec::pop) {
            if self.taken.insert(e.id) {
                self.decisions.push(Decision::Bind {
                    executor: e.id,
                    session: g.id,
                });
            }
        }
        if have + in_flight + ready < ranks {
            // Never topped up: a gang that lost ranks is the batch job's to fail.
            self.waiting.insert(
                g.id,
                format!(
                    "lost {} of its {} ranks; a gang is not topped up",
                    ranks - (have + in_flight + ready),
                    gang.ranks
                ),
            );
        }
        true
    }

    /// Whether a gang cannot start in this plan whatever room there is: its ranks do not
    /// divide by `ranks_per_node`, no set of nodes could hold it even empty (`whole`), its
    /// owner's share does not hold it, or its launches back off. Says why when so.
    fn gang_cannot_start(
        &mut self,
        g: &'a SessionView,
        gang: Gang,
        app: &'a AppView,
        whole: &[Free],
    ) -> bool {
        let ranks = u64::from(gang.ranks);
        if let Some(k) = gang
            .ranks_per_node
            .filter(|&k| k == 0 || gang.ranks % k != 0)
        {
            self.waiting.insert(
                g.id,
                format!(
                    "{} ranks cannot be spread {k} per node: ranks must be a multiple of ranks_per_node",
                    gang.ranks
                ),
            );
            return true;
        }
        if place_gang(whole, whole, &self.nodes, app, gang, |_| true).is_none() {
            self.waiting.insert(
                g.id,
                format!(
                    "{}, even with nothing else running",
                    no_nodes_hold(gang, app)
                ),
            );
            return true;
        }
        if self.target_of.get(&g.id).copied().unwrap_or(0) < ranks {
            self.waiting.insert(
                g.id,
                format!(
                    "waiting for its owner's share to hold all {} ranks of `{}` ({} each)",
                    gang.ranks, g.application, app.resources
                ),
            );
            return true;
        }
        if !app.launchable(&g.owner) {
            self.waiting
                .entry(g.id)
                .or_insert_with(|| backing_off(app, &g.owner));
            return true;
        }
        false
    }

    /// Launches all ranks of a gang where they fit now, on nodes not reserved. Returns
    /// whether it did.
    fn launch_gang(&mut self, g: &'a SessionView, gang: Gang, app: &'a AppView) -> bool {
        let reserved = &self.reserved;
        let Some(placement) = place_gang(&self.free, &self.free, &self.nodes, app, gang, |n| {
            !reserved[n]
        }) else {
            return false;
        };
        let before = self.decisions.len();
        for (n, k) in placement {
            for _ in 0..k {
                self.free[n].take(&app.resources);
                self.decisions.push(Decision::Launch {
                    node: self.nodes[n].name.clone(),
                    application: g.application.clone(),
                    owner: g.owner.clone(),
                });
            }
        }
        assert_eq!(
            self.decisions.len() - before,
            gang.ranks as usize,
            "a gang is launched whole or not at all"
        );
        *self.live_per_app.entry(g.application.as_str()).or_default() += gang.ranks;
        true
    }

    /// Reserves for a gang the nodes that will hold it once emptied of elastic work
    /// (nodes already being emptied, or with room now, first: the fewest tasks wait), and
    /// starts freeing what its ranks need there: Idle executors first, then elastic ones
    /// in giving order (they finish their task first).
    fn reserve_for_gang(
        &mut self,
        g: &'a SessionView,
        gang: Gang,
        app: &'a AppView,
        reserved_cpu: &mut u64,
    ) {
        // What each node would offer once emptied of elastic work.
        let emptied: Vec<Free> = (0..self.nodes.len())
            .map(|n| {
                let mut room = self.free[n];
                room.add(&self.incoming[n]);
                room.add(&self.idle_room[n]);
                room.add(&self.reclaimable[n]);
                room
            })
            .collect();
        // Nodes already being emptied, or with room now, first: the fewest tasks wait.
        let soon: Vec<Free> = (0..self.nodes.len())
            .map(|n| {
                let mut room = self.free[n];
                room.add(&self.incoming[n]);
                room.add(&self.idle_room[n]);
                room
            })
            .collect();
        let reserved = &self.reserved;
        let Some(placement) = place_gang(&emptied, &soon, &self.nodes, app, gang, |n| !reserved[n])
        else {
            self.waiting
                .entry(g.id)
                .or_insert_with(|| no_nodes_hold(gang, app));
            return;
        };
        let mut names = Vec::new();
        for (n, k) in placement {
            self.reserved[n] = true;
            *reserved_cpu += u64::from(self.nodes[n].cpu_millis);
            names.push(self.nodes[n].name.clone());
            // Free what the ranks need there: Idle executors first, then elastic ones in
            // giving order (they finish their task first).
            let need = times(&app.resources, u64::from(k));
            let mut room = self.free[n];
            room.add(&self.incoming[n]);
            for e in self.idle_on_node[n].iter().chain(&self.reclaim_on_node[n]) {
                if fits_beside_gpus(self.nodes[n], &room, &need) {
                    break;
                }
                if !self.taken.insert(e.id) {
                    continue;
                }
                if e.phase == ExecutorPhase::Idle {
                    self.decisions.push(Decision::Release { executor: e.id });
                    self.idle_room[n].take(&e.resources);
                } else {
                    self.decisions.push(Decision::Unbind { executor: e.id });
                    self.reclaimed_for.insert(e.id, g.id);
                    self.reclaimable[n].take(&e.resources);
                    if let Some(left) = e.session.and_then(|id| self.excess.get_mut(&id)) {
                        *left = left.saturating_sub(1);
                    }
                }
                room.give(&e.resources);
            }
        }
        self.waiting.insert(
            g.id,
            format!(
                "reserved {} for its {} ranks; waiting for the tasks running there to end",
                names.join(","),
                gang.ranks
            ),
        );
        self.reservations.insert(g.id, names);
    }
}
