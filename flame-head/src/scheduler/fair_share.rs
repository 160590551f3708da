//! Phase 2's arithmetic: each session's fair share of executors, by weighted dominant
//! resource fairness (DRF) with progressive filling ([`fair_shares`]).

use super::owners::Turn;
use super::room::times;
use super::Totals;
use flame_protocol::model::Resources;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap};

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
    let (mut filling, owners) = Filling::new(totals, requests, weights, app_caps);
    let placed_first = filling.gangs_first(&owners);
    let deferred = filling.take_turns(&owners, &placed_first);
    filling.place_deferred(deferred);
    filling.given
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

/// Whether `u` fits in what is `left`.
fn fits(left: &Totals, u: &Resources) -> bool {
    left.cpu_millis >= u64::from(u.cpu_millis)
        && left.memory_bytes >= u.memory_bytes.unwrap_or(0)
        && left.gpus >= u64::from(u.gpus)
}

/// Progressive filling under way: what each request has been given, and what is left.
/// Applications and owners go by index, so the hot loop compares integers, not names;
/// owners are indexed in name order (the tie-break).
struct Filling<'r> {
    requests: &'r [ShareRequest],
    /// Executors given per request.
    given: Vec<u64>,
    /// What is left of the cluster.
    left: Totals,
    /// Each request's application.
    app_of: Vec<usize>,
    /// Executors each application may still have (`max_instances` less those given).
    app_room: Vec<u64>,
    /// Dominant share of one executor of each request.
    shares: Vec<f64>,
    /// Each owner's weight.
    weight_of: Vec<f64>,
    /// Each owner's weighted share of the cluster.
    cap: Vec<f64>,
    /// Dominant share given to each owner so far.
    share: Vec<f64>,
}

impl<'r> Filling<'r> {
    /// Nothing given yet; with each owner's requests that want something that can be
    /// given (demand, and a finite dominant share), owners in name order.
    fn new(
        totals: Totals,
        requests: &'r [ShareRequest],
        weights: &BTreeMap<String, u32>,
        app_caps: &BTreeMap<String, u64>,
    ) -> (Filling<'r>, Vec<Vec<usize>>) {
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
        // Owners in name order (the tie-break), each with its sessions.
        let mut owners: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, r) in requests.iter().enumerate() {
            if r.demand > 0 && shares[i].is_finite() {
                owners.entry(r.owner.as_str()).or_default().push(i);
            }
        }
        let weight_of: Vec<f64> = owners
            .keys()
            .map(|o| f64::from(weights.get(*o).copied().unwrap_or(1).max(1)))
            .collect();
        let weight_sum: f64 = weight_of.iter().sum();
        let cap: Vec<f64> = weight_of.iter().map(|w| w / weight_sum).collect();
        let filling = Filling {
            requests,
            given: vec![0u64; requests.len()],
            left: totals,
            app_of,
            app_room,
            shares,
            share: vec![0.0f64; owners.len()],
            weight_of,
            cap,
        };
        (filling, owners.into_values().collect())
    }

    /// Gangs first, each whole, within its owner's weighted share, ahead of that owner's
    /// elastic sessions of no higher priority: a gang cannot grow an executor at a time,
    /// so taking turns with them would starve it behind any busy elastic session. Returns
    /// which requests were placed so.
    fn gangs_first(&mut self, owners: &[Vec<usize>]) -> Vec<bool> {
        let requests = self.requests;
        let mut gangs_first: Vec<(usize, usize)> = Vec::new();
        for (o, list) in owners.iter().enumerate() {
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
            if self.app_room[self.app_of[i]] < r.demand
                || !fits(&self.left, &all)
                || self.share[o] + self.shares[i] * r.demand as f64 > self.cap[o] + 1e-9
            {
                continue; // left to the turns below, then to what nobody claims
            }
            self.given[i] = r.demand;
            placed_first[i] = true;
            self.app_room[self.app_of[i]] -= r.demand;
            self.left.cpu_millis -= u64::from(all.cpu_millis);
            self.left.memory_bytes -= all.memory_bytes.unwrap_or(0);
            self.left.gpus -= u64::from(all.gpus);
            self.share[o] += self.shares[i] * r.demand as f64;
        }
        placed_first
    }

    /// The turns: the owner with the lowest dominant share for its weight gives its best
    /// claim that can still be met one executor (a gang all of its ranks, within its
    /// owner's weighted share), until no owner can be given more. Returns the gangs
    /// larger than their owner's share, for [`Filling::place_deferred`].
    fn take_turns(&mut self, owners: &[Vec<usize>], placed_first: &[bool]) -> Vec<Claim> {
        let requests = self.requests;
        let mut claims: Vec<BinaryHeap<Claim>> = owners
            .iter()
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
            .map(|o| Turn(self.share[o] / self.weight_of[o], o))
            .collect();
        let mut deferred: Vec<Claim> = Vec::new();
        while let Some(Turn(_, owner)) = turns.pop() {
            // The owner's best claim that can still be met. A claim that cannot is dropped
            // for good: what is left only shrinks, and so does an application's room.
            let heap = &mut claims[owner];
            let mut picked = None;
            while let Some(claim) = heap.pop() {
                let i = claim.index;
                let r = &requests[i];
                let count = if r.atomic { r.demand } else { 1 };
                let all = times(&r.unit, count);
                if self.app_room[self.app_of[i]] < count || !fits(&self.left, &all) {
                    continue;
                }
                // A gang goes in one piece: only within its owner's weighted share of the
                // cluster, or (below) into what nobody else claims.
                if r.atomic
                    && self.share[owner] + self.shares[i] * count as f64 > self.cap[owner] + 1e-9
                {
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
            self.given[i] += count;
            self.app_room[self.app_of[i]] -= count;
            self.left.cpu_millis -= u64::from(r.unit.cpu_millis) * count;
            self.left.memory_bytes -= r.unit.memory_bytes.unwrap_or(0) * count;
            self.left.gpus -= u64::from(r.unit.gpus) * count;
            claim.given += count;
            claim.held += self.shares[i] * count as f64;
            if claim.given < claim.demand {
                heap.push(claim);
            }
            self.share[owner] += self.shares[i] * count as f64;
            turns.push(Turn(self.share[owner] / self.weight_of[owner], owner));
        }
        deferred
    }

    /// Gangs larger than their owner's share take what is left, if it holds them.
    fn place_deferred(&mut self, mut deferred: Vec<Claim>) {
        deferred.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.index.cmp(&b.index)));
        for claim in deferred {
            let i = claim.index;
            let r = &self.requests[i];
            let all = times(&r.unit, r.demand);
            if self.app_room[self.app_of[i]] >= r.demand && fits(&self.left, &all) {
                self.given[i] = r.demand;
                self.app_room[self.app_of[i]] -= r.demand;
                self.left.cpu_millis -= u64::from(all.cpu_millis);
                self.left.memory_bytes -= all.memory_bytes.unwrap_or(0);
                self.left.gpus -= u64::from(all.gpus);
            }
        }
    }
}
