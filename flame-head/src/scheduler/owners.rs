//! Owners while a plan is made: whose turn it is for the next unit ([`UnitQueue`]), what
//! each holds and may give another ([`Holdings`]), and the executor pools.

use super::{ExecutorView, SessionView};
use flame_protocol::{ExecutorId, SessionId};
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::collections::BTreeMap;

/// How much more, relatively, an owner must hold for its weight than another before it
/// gives that one an executor: small differences are not worth a task's wait and a launch.
const PREEMPTION_MARGIN: f64 = 0.05;

/// Sessions under their target, handed out one unit (executor) at a time: to the owner
/// with the smallest dominant share held for its weight, and within it to its session
/// first in fair-share order (higher priority, then the smaller held fraction of its
/// target, then the lower id). A session that could not be given a unit is done for the
/// round.
pub(super) struct UnitQueue<'a> {
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
pub(super) struct Turn(pub(super) f64, pub(super) usize);
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
    pub(super) fn new(
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
    pub(super) fn next(&mut self) -> Option<&'a SessionView> {
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
    pub(super) fn served(&mut self, placed: bool) {
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
pub(super) fn take_reclaimable<'a>(
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
pub(super) type Pool<'a> = (&'a str, &'a str);

pub(super) fn pool_of(e: &ExecutorView) -> Pool<'_> {
    (e.application.as_str(), e.owner.as_str())
}

pub(super) fn session_pool(s: &SessionView) -> Pool<'_> {
    (s.application.as_str(), s.owner.as_str())
}

/// The dominant share each owner holds while a plan is made, for preemption between
/// owners: an executor goes from one owner to another only while the giver, after giving,
/// still holds more for its weight than the taker after taking. Levels compare what is
/// held, not the targets: when not every target can be met at once (room in pieces,
/// executors in transit), the owners still converge on their weighted shares of what is.
#[derive(Default)]
pub(super) struct Holdings<'a> {
    /// Owners by index, for the hot loops.
    index: HashMap<&'a str, usize>,
    used: Vec<f64>,
    weight: Vec<f64>,
}

impl<'a> Holdings<'a> {
    /// The owners of `sessions`, holding `used`, weighing `weights` (1 when not listed).
    pub(super) fn new(
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

    pub(super) fn ix(&self, owner: &str) -> Option<usize> {
        self.index.get(owner).copied()
    }

    /// Whether owner `taker` may have an executor of dominant share `share` from owner
    /// `giver` for one of its own of share `unit`.
    pub(super) fn may_take(&self, giver: usize, share: f64, taker: usize, unit: f64) -> bool {
        giver == taker
            || (self.used[giver] - share) / self.weight[giver]
                > (self.used[taker] + unit) / self.weight[taker] * (1.0 + PREEMPTION_MARGIN)
    }

    /// Whether some other owner may give `taker` an executor of share `unit` now (giving
    /// one of the same share).
    pub(super) fn may_take_from_someone(&self, taker: usize, unit: f64) -> bool {
        (0..self.used.len()).any(|giver| giver != taker && self.may_take(giver, unit, taker, unit))
    }

    /// `giver` gives up an executor of dominant share `share`.
    pub(super) fn moved(&mut self, giver: usize, share: f64) {
        self.used[giver] -= share;
    }

    /// `owner` gets an executor of dominant share `unit`.
    pub(super) fn gained(&mut self, owner: usize, unit: f64) {
        self.used[owner] += unit;
    }
}

/// The next executor of a list not taken yet, from a session over its target when
/// `only_excess`.
pub(super) fn take_from<'a>(
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
