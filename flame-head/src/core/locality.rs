//! One session's pending tasks, queued for data locality (issue 20): [`LocalityQueue`].
//!
//! A task whose input is an object prefers the nodes holding a copy of it (usually one to
//! three). When an executor of the session on node `n` can take a task,
//! [`LocalityQueue::pop_for`] gives it:
//! 1. the oldest task preferring `n`: its input is read from `n`'s cache, no byte moves;
//! 2. otherwise the oldest of the tasks any node may take: those that prefer no node, and
//!    those whose locality wait ([`LocalityQueue::wait_ms`], by default
//!    [`LOCALITY_WAIT`]) has run out although they prefer another node (the executor fetches
//!    the object from a holder);
//! 3. otherwise nothing: the executor idles until a task comes, or until the wait of the
//!    oldest waiting task runs out ([`LocalityQueue::next_deadline`], for the core's wake-up).
//!
//! One refinement of step 1 bounds how far locality may reorder tasks: a task that any node
//! may take goes before `n`'s local task when it had already waited its whole wait before
//! that local task was queued. So locality overtakes a task by at most `wait_ms` of arrival
//! time: a node that always has local work cannot starve the rest of the queue.
//!
//! # Why a bounded wait
//! This is delay scheduling (Zaharia et al., EuroSys 2010): the holder of a task's input
//! is usually busy only for a moment, so a short wait buys nearly all the locality there is,
//! and moving a large object costs far more than an executor idle for a few milliseconds.
//! An unbounded wait would be a queue behind one node: a holder that is slow, overloaded,
//! or has no executor of the session would keep its tasks while every other executor idles
//! (ray-project/ray#54372). With the bound, locality costs at most `wait_ms` of latency per
//! task and never throughput for longer than that: after it, any executor takes the task.
//!
//! # Why FIFO
//! Within each class (tasks local to one node, tasks any node may take) tasks leave in the
//! order they came: the order a client submits in is the order it expects results, and
//! oldest-first is what bounds each task's wait. Retries go to the front
//! ([`LocalityQueue::push_front`]): they waited once already.
//!
//! # Cost
//! Every operation is O(1) amortised, whatever the number of tasks or nodes; nothing scans
//! the queue or the nodes. A task sits in one lane per preferred node (at most
//! [`PREFERRED_NODES_MAX`]) and in one of two global lanes (`free`: no preference;
//! `waiting`: has one, in deadline order). When it leaves by one lane its entries in the
//! others become stale, and are dropped when they reach the front of their lane, or by a
//! compaction once stale entries outnumber live ones (and [`COMPACT_STALE_MIN`]), so memory
//! stays within a constant factor of the tasks queued, even for lanes of nodes that never
//! ask. [`LocalityQueue::steps`] counts the entries visited, for the tests that prove it.
//!
//! Pure: no clock (time is an argument), no I/O, no allocation per operation beyond the
//! lanes' growth and a node's first lane.

// Not every method is called until the core's dispatch uses the queue (issue 20).

use flame_protocol::limits::LOCALITY_WAIT;
use rustc_hash::FxHashMap as HashMap;
use std::collections::VecDeque;
use std::hash::Hash;

/// Most preferred nodes a task is queued for: the first ones given (callers pass the
/// holders best first), duplicates dropped. It bounds the work per task; more holders than
/// this add little locality.
pub const PREFERRED_NODES_MAX: usize = 4;

/// Stale entries tolerated before a compaction, at least (it runs once stale entries
/// outnumber both this and the live ones): small queues never compact.
pub const COMPACT_STALE_MIN: usize = 1024;

/// What the queue knows of a queued task.
#[derive(Debug, Clone, Copy)]
struct Queued {
    /// Its place in the order tasks leave in (lower first); lane entries naming the task
    /// with another order are stale.
    order: i64,
    /// When its locality wait runs out. Non-decreasing in `order` across all tasks.
    deadline_ms: u64,
    /// Lane entries naming it: one per preferred node, plus one in `free` or `waiting`.
    entries: usize,
}

/// A lane: `(order, task)` in increasing order.
type Lane<T> = VecDeque<(i64, T)>;

/// The lane a task is taken from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TakenFrom {
    Local,
    Free,
    Waiting,
}

/// One session's pending tasks, handed to executors by where their input lies (see the
/// module doc for the policy). `T` is the task's key (the head's `TaskId`), `N` a node's
/// (`NodeName`).
#[derive(Debug)]
// Retries and requeues still go through the session's plain queue, and waiting tasks are
// served on the core's tick: `push_front`, `remove`, `next_deadline` and the rest are
// the queue's full API, proven by its tests, and not all of it is called yet.
#[cfg_attr(not(test), allow(dead_code))]
pub struct LocalityQueue<T, N> {
    wait_ms: u64,
    /// The tasks queued, by key.
    tasks: HashMap<T, Queued>,
    /// Per node, the tasks preferring it.
    local: HashMap<N, Lane<T>>,
    /// Tasks preferring no node.
    free: Lane<T>,
    /// Tasks preferring some node, by deadline.
    waiting: Lane<T>,
    /// The order the next [`LocalityQueue::push`] gets (increasing).
    next_back: i64,
    /// The order the next [`LocalityQueue::push_front`] gets (decreasing).
    next_front: i64,
    /// The latest deadline given: a later push never gets an earlier one.
    last_deadline_ms: u64,
    /// Entries in all lanes, stale ones included.
    entries: usize,
    /// Entries of the tasks queued.
    live_entries: usize,
    /// Lane entries visited so far (see [`LocalityQueue::steps`]).
    steps: u64,
}

impl<T: Copy + Eq + Hash, N: Clone + Eq + Hash> Default for LocalityQueue<T, N> {
    /// A queue with the default wait, [`LOCALITY_WAIT`].
    fn default() -> Self {
        LocalityQueue::new(u64::try_from(LOCALITY_WAIT.as_millis()).unwrap_or(u64::MAX))
    }
}

#[allow(dead_code)]
impl<T: Copy + Eq + Hash, N: Clone + Eq + Hash> LocalityQueue<T, N> {
    /// An empty queue whose tasks wait at most `wait_ms` for an executor on a node they
    /// prefer (`flame-head --locality-wait`; 0 turns locality off but for ties).
    pub fn new(wait_ms: u64) -> Self {
        LocalityQueue {
            wait_ms,
            tasks: HashMap::default(),
            local: HashMap::default(),
            free: VecDeque::new(),
            waiting: VecDeque::new(),
            next_back: 0,
            next_front: -1,
            last_deadline_ms: 0,
            entries: 0,
            live_entries: 0,
            steps: 0,
        }
    }

    /// How long a task waits at most for an executor on a node it prefers.
    pub fn wait_ms(&self) -> u64 {
        self.wait_ms
    }

    /// Tasks queued.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether no task is queued.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Whether `task` is queued.
    pub fn contains(&self, task: &T) -> bool {
        self.tasks.contains_key(task)
    }

    /// Queues `task` last, preferring the nodes in `preferred` (the holders of its input,
    /// best first; empty when its input is inline or nobody holds it). Its wait runs out
    /// at `now_ms + wait_ms` (or at the last deadline given, if later: deadlines follow
    /// the queue's order). A task already queued is moved.
    pub fn push(&mut self, task: T, preferred: &[N], now_ms: u64) {
        self.forget(&task);
        let deadline_ms = now_ms
            .saturating_add(self.wait_ms)
            .max(self.last_deadline_ms);
        self.last_deadline_ms = deadline_ms;
        let order = self.next_back;
        self.next_back += 1;
        self.enqueue(task, preferred, order, deadline_ms, false);
        self.settle();
    }

    /// Queues `task` first (a retry: it waited once already), preferring `preferred`. Its
    /// wait runs out at `now_ms + wait_ms`, or sooner: not after any task queued now. A
    /// task already queued is moved.
    pub fn push_front(&mut self, task: T, preferred: &[N], now_ms: u64) {
        self.forget(&task);
        self.settle();
        let mut deadline_ms = now_ms.saturating_add(self.wait_ms);
        for lane in [&self.free, &self.waiting] {
            if let Some(q) = lane.front().and_then(|(_, t)| self.tasks.get(t)) {
                deadline_ms = deadline_ms.min(q.deadline_ms);
            }
        }
        self.last_deadline_ms = self.last_deadline_ms.max(deadline_ms);
        let order = self.next_front;
        self.next_front -= 1;
        self.enqueue(task, preferred, order, deadline_ms, true);
        self.settle();
    }

    /// The task an executor on `node` should run next, taken out of the queue: the oldest
    /// preferring `node`; else the oldest that any node may take (preferring none, or
    /// whose wait ran out by `now_ms`); else `None`, and the executor idles. A task any
    /// node may take goes before the local one when its wait ran out before the local one
    /// was queued (see the module doc).
    ///
    /// Never returns a task preferring other nodes before its deadline; returns `None`
    /// only when no task prefers `node`, none prefers no node, and no wait has run out.
    pub fn pop_for(&mut self, node: &N, now_ms: u64) -> Option<T> {
        let local = self.local_front(node);
        // The oldest task any node may take: preferring none, or whose wait ran out.
        let free = front(&self.free, &self.tasks).map(|(task, q)| (TakenFrom::Free, task, q));
        let late = front(&self.waiting, &self.tasks)
            .filter(|(_, q)| q.deadline_ms <= now_ms)
            .map(|(task, q)| (TakenFrom::Waiting, task, q));
        let other = match (free, late) {
            (Some(f), Some(l)) => Some(if l.2.order < f.2.order { l } else { f }),
            (f, l) => f.or(l),
        };
        // The local task first, unless the other had waited its whole wait before the
        // local one was queued.
        let (from, task) = match (local, other) {
            (Some((_, l)), Some((from, task, o)))
                if o.deadline_ms.saturating_add(self.wait_ms) < l.deadline_ms =>
            {
                (from, task)
            }
            (Some((task, _)), _) => (TakenFrom::Local, task),
            (None, Some((from, task, _))) => (from, task),
            (None, None) => return None,
        };
        let lane = match from {
            TakenFrom::Local => self.local.get_mut(node),
            TakenFrom::Free => Some(&mut self.free),
            TakenFrom::Waiting => Some(&mut self.waiting),
        };
        if let Some(lane) = lane {
            debug_assert!(lane.front().is_some_and(|(_, t)| *t == task));
            lane.pop_front();
            self.entries = self.entries.saturating_sub(1);
            if from == TakenFrom::Local && lane.is_empty() {
                self.local.remove(node);
            }
        }
        self.forget(&task);
        self.settle();
        Some(task)
    }

    /// Takes `task` out of the queue (cancelled, or finished elsewhere). Returns whether it
    /// was queued. Its entries go lazily.
    pub fn remove(&mut self, task: &T) -> bool {
        let was = self.forget(task);
        self.settle();
        was
    }

    /// Takes every task out of the queue.
    pub fn clear(&mut self) {
        self.tasks.clear();
        self.local = HashMap::default();
        self.free = VecDeque::new();
        self.waiting = VecDeque::new();
        self.entries = 0;
        self.live_entries = 0;
    }

    /// When the wait of the oldest task preferring some node runs out: from then on any
    /// executor may take it. `None` when no task prefers a node. After a `pop_for` that
    /// returned `None` while tasks are queued, this is later than its `now_ms`, and is when
    /// the core should try again (a wake-up, not a poll).
    pub fn next_deadline(&self) -> Option<u64> {
        // `settle` keeps the front live.
        front(&self.waiting, &self.tasks).map(|(_, q)| q.deadline_ms)
    }

    /// Lane entries visited so far, stale ones and compactions included: the queue's
    /// work, counted (tests show it constant per operation from 1,000 to 1,000,000 tasks).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Puts `task`'s entries in its lanes, at the back or the front.
    fn enqueue(&mut self, task: T, preferred: &[N], order: i64, deadline_ms: u64, first: bool) {
        let put = |lane: &mut Lane<T>| {
            if first {
                lane.push_front((order, task));
            } else {
                lane.push_back((order, task));
            }
        };
        let mut entries = 1;
        for (i, node) in preferred.iter().take(PREFERRED_NODES_MAX).enumerate() {
            self.steps += 1;
            if preferred.iter().take(i).any(|n| n == node) {
                continue;
            }
            // The node's name is cloned only for its first lane.
            match self.local.get_mut(node) {
                Some(lane) => put(lane),
                None => {
                    let mut lane = VecDeque::new();
                    put(&mut lane);
                    self.local.insert(node.clone(), lane);
                }
            }
            entries += 1;
        }
        put(if entries == 1 {
            &mut self.free
        } else {
            &mut self.waiting
        });
        self.entries += entries;
        self.live_entries += entries;
        self.tasks.insert(
            task,
            Queued {
                order,
                deadline_ms,
                entries,
            },
        );
    }

    /// Drops `task` from the tasks queued (its lane entries turn stale). Returns whether
    /// it was queued.
    fn forget(&mut self, task: &T) -> bool {
        match self.tasks.remove(task) {
            Some(q) => {
                self.live_entries = self.live_entries.saturating_sub(q.entries);
                true
            }
            None => false,
        }
    }

    /// The live front of `node`'s lane, stale entries before it dropped (the lane too, once
    /// empty).
    fn local_front(&mut self, node: &N) -> Option<(T, Queued)> {
        let lane = self.local.get_mut(node)?;
        let found = drop_stale(lane, &self.tasks, &mut self.entries, &mut self.steps);
        if lane.is_empty() {
            self.local.remove(node);
        }
        found
    }

    /// Restores what every operation leaves true: the fronts of `free` and `waiting` are
    /// live (so `next_deadline` needs no `&mut`), stale entries are at most a constant
    /// factor of the live ones, and an empty queue holds no entry.
    fn settle(&mut self) {
        if self.tasks.is_empty() {
            self.steps += self.entries as u64;
            self.clear();
            return;
        }
        drop_stale(
            &mut self.free,
            &self.tasks,
            &mut self.entries,
            &mut self.steps,
        );
        drop_stale(
            &mut self.waiting,
            &self.tasks,
            &mut self.entries,
            &mut self.steps,
        );
        debug_assert!(self.entries >= self.live_entries);
        let stale = self.entries.saturating_sub(self.live_entries);
        if stale > COMPACT_STALE_MIN.max(self.live_entries) {
            self.compact();
        }
    }

    /// Drops every stale entry: O(entries), run once stale entries outnumber live ones, so
    /// O(1) amortised over the operations that made them stale.
    fn compact(&mut self) {
        self.steps += self.entries as u64;
        let tasks = &self.tasks;
        let live = |(order, task): &(i64, T)| tasks.get(task).is_some_and(|q| q.order == *order);
        self.free.retain(live);
        self.waiting.retain(live);
        self.local.retain(|_, lane| {
            lane.retain(live);
            !lane.is_empty()
        });
        self.entries = self.free.len()
            + self.waiting.len()
            + self.local.values().map(VecDeque::len).sum::<usize>();
        debug_assert_eq!(self.entries, self.live_entries);
    }
}

/// The front of `lane`, when it is live (its task queued with that order).
fn front<T: Copy + Eq + Hash>(lane: &Lane<T>, tasks: &HashMap<T, Queued>) -> Option<(T, Queued)> {
    let &(order, task) = lane.front()?;
    tasks
        .get(&task)
        .filter(|q| q.order == order)
        .map(|q| (task, *q))
}

/// Pops `lane`'s stale entries off its front; returns the live front, if any.
fn drop_stale<T: Copy + Eq + Hash>(
    lane: &mut Lane<T>,
    tasks: &HashMap<T, Queued>,
    entries: &mut usize,
    steps: &mut u64,
) -> Option<(T, Queued)> {
    loop {
        *steps += 1;
        if let Some(found) = front(lane, tasks) {
            return Some(found);
        }
        lane.pop_front()?;
        *entries = entries.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    type Queue = LocalityQueue<u64, &'static str>;

    fn drain(q: &mut Queue, node: &'static str, now_ms: u64) -> Vec<u64> {
        std::iter::from_fn(|| q.pop_for(&node, now_ms)).collect()
    }

    #[test]
    fn local_tasks_first_then_free_then_expired() {
        let mut q = Queue::new(100);
        q.push(1, &["b"], 0);
        q.push(2, &[], 0);
        q.push(3, &["a"], 0);
        q.push(4, &["a", "c"], 0);
        assert_eq!(q.len(), 4);
        // Local first, FIFO; then the free task; task 1 prefers b and still waits.
        assert_eq!(drain(&mut q, "a", 10), vec![3, 4, 2]);
        assert_eq!(q.pop_for(&"a", 99), None, "b's task waits for b");
        assert_eq!(q.next_deadline(), Some(100));
        assert_eq!(
            q.pop_for(&"a", 100),
            Some(1),
            "its wait ran out: anyone takes it"
        );
        assert!(q.is_empty());
        assert_eq!(q.next_deadline(), None);
    }

    #[test]
    fn the_holder_takes_its_task_before_the_wait_ends() {
        let mut q = Queue::new(100);
        q.push(1, &["b"], 0);
        assert_eq!(q.pop_for(&"a", 50), None);
        assert_eq!(q.pop_for(&"b", 60), Some(1));
        assert_eq!(q.pop_for(&"a", 500), None);
    }

    #[test]
    fn a_task_taken_by_one_holder_is_gone_from_the_others() {
        let mut q = Queue::new(100);
        q.push(1, &["a", "b", "a"], 0);
        q.push(2, &["b"], 0);
        assert_eq!(q.pop_for(&"a", 0), Some(1));
        assert_eq!(drain(&mut q, "b", 0), vec![2]);
        assert!(q.is_empty());
        assert_eq!(q.entries, 0, "an empty queue holds no entry");
    }

    #[test]
    fn removed_tasks_are_never_handed_out() {
        let mut q = Queue::new(100);
        q.push(1, &["a"], 0);
        q.push(2, &[], 0);
        q.push(3, &["b"], 0);
        assert!(q.remove(&1));
        assert!(!q.remove(&1));
        assert!(q.remove(&2));
        assert_eq!(q.len(), 1);
        assert_eq!(q.pop_for(&"a", 0), None);
        assert_eq!(q.next_deadline(), Some(100));
        assert!(q.remove(&3));
        assert_eq!(q.next_deadline(), None);
        assert_eq!(q.pop_for(&"a", 1000), None);
    }

    #[test]
    fn a_retry_goes_first_and_waits_no_longer_than_the_tasks_queued() {
        let mut q = Queue::new(100);
        q.push(1, &[], 0);
        q.push(2, &["b"], 50);
        q.push_front(3, &["b"], 80);
        // Its deadline is not after task 1's (100): it waited once already.
        assert_eq!(q.next_deadline(), Some(100));
        assert_eq!(q.pop_for(&"b", 80), Some(3));
        q.push_front(4, &[], 90);
        assert_eq!(drain(&mut q, "a", 90), vec![4, 1]);
        assert_eq!(q.pop_for(&"a", 149), None);
        assert_eq!(q.pop_for(&"a", 150), Some(2));
    }

    #[test]
    fn pushing_a_queued_task_again_moves_it() {
        let mut q = Queue::new(100);
        q.push(1, &["a"], 0);
        q.push(2, &[], 0);
        q.push(1, &[], 5);
        assert_eq!(q.len(), 2);
        assert_eq!(drain(&mut q, "a", 5), vec![2, 1]);
    }

    #[test]
    fn only_the_first_preferred_nodes_count() {
        let mut q = Queue::new(100);
        q.push(1, &["a", "b", "c", "d", "e"], 0);
        assert_eq!(q.pop_for(&"e", 0), None, "past PREFERRED_NODES_MAX");
        assert_eq!(q.pop_for(&"d", 0), Some(1));
    }

    #[test]
    fn deadlines_follow_the_queue_order_when_time_goes_back() {
        let mut q = Queue::new(100);
        q.push(1, &["b"], 500);
        q.push(2, &["b"], 100);
        assert_eq!(q.pop_for(&"a", 599), None);
        assert_eq!(drain(&mut q, "a", 600), vec![1, 2]);
    }

    #[test]
    fn a_task_no_executor_prefers_is_not_starved_by_local_work() {
        // Node b never asks (ray#54372: a queue behind one node). Node a always has a
        // local task and free ones keep coming: b's task still leaves once it had waited
        // its whole wait before a's local task was queued.
        let wait = 100;
        let mut q = Queue::new(wait);
        q.push(0, &["b"], 0);
        let mut served_at = None;
        for t in 0..1_000u64 {
            q.push(2 * t + 1, &["a"], t);
            q.push(2 * t + 2, &[], t);
            if q.pop_for(&"a", t) == Some(0) {
                served_at = Some(t);
                break;
            }
        }
        assert_eq!(served_at, Some(wait + 1));
    }

    #[test]
    fn wait_zero_is_first_come_first_served() {
        let mut q = Queue::new(0);
        q.push(1, &["b"], 0);
        q.push(2, &["a"], 1);
        assert_eq!(drain(&mut q, "a", 1), vec![1, 2]);
    }

    #[test]
    fn stale_entries_stay_bounded_when_a_node_never_asks() {
        let mut q = Queue::new(0);
        for t in 0..100_000u64 {
            q.push(t, &["never", "a"], t);
            assert_eq!(q.pop_for(&"a", t), Some(t));
            q.push(1_000_000 + t, &["never"], t);
            assert_eq!(q.pop_for(&"other", t), Some(1_000_000 + t));
            assert!(q.entries <= 2 * q.live_entries + COMPACT_STALE_MIN + 2);
        }
    }

    /// SplitMix64, for the scale tests.
    pub(super) struct Rng(pub(super) u64);

    impl Rng {
        pub(super) fn below(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) % n.max(1)
        }
    }

    /// Nodes of the scale tests.
    pub(super) const SCALE_NODES: u64 = 1_000;

    /// A task's preferred nodes in the scale tests: none for 3 in 10, else 1 to 3.
    pub(super) fn scale_prefs(rng: &mut Rng) -> Vec<u64> {
        match rng.below(10) {
            0..=2 => Vec::new(),
            k => (0..1 + k % 3).map(|_| rng.below(SCALE_NODES)).collect(),
        }
    }

    /// Entries the queue visits per operation (a push, a `pop_for` by a random node, and
    /// a remove every 8th) at steady state with `n` tasks queued over 1,000 nodes.
    fn steps_per_op(n: u64) -> f64 {
        let mut rng = Rng(n);
        let mut q: LocalityQueue<u64, u64> = LocalityQueue::new(100);
        let mut now = 0;
        for t in 0..n {
            q.push(t, &scale_prefs(&mut rng), now);
        }
        let before = q.steps();
        let ops = 200_000u64;
        for i in 0..ops {
            now += u64::from(i % 4 == 0);
            let prefs = scale_prefs(&mut rng);
            q.push(n + i, &prefs, now);
            let _ = q.pop_for(&rng.below(SCALE_NODES), now);
            if i % 8 == 0 {
                q.remove(&rng.below(n + i));
            }
        }
        (q.steps() - before) as f64 / ops as f64
    }

    /// Entries visited per operation at each size: printed, and checked constant (a few
    /// per operation at any size, within 2x of each other). Counts, not time.
    fn check_flat(sizes: &[u64]) {
        let per_op: Vec<f64> = sizes.iter().map(|&n| steps_per_op(n)).collect();
        for (n, s) in sizes.iter().zip(&per_op) {
            eprintln!("{n:>9} tasks queued: {s:.2} entries visited per operation");
        }
        let (lo, hi) = per_op
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), &s| (lo.min(s), hi.max(s)));
        assert!(hi <= 16.0 && hi <= 2.0 * lo, "{per_op:?}");
    }

    #[test]
    fn work_per_operation_is_flat_from_a_thousand_to_a_hundred_thousand_tasks() {
        check_flat(&[1_000, 10_000, 100_000]);
    }

    /// The same up to a million tasks: `cargo test -p flame-head locality_work -- --ignored
    /// --nocapture` (about 25 s in a debug build).
    #[test]
    #[ignore = "slow in debug builds: run with -- --ignored"]
    fn locality_work_is_flat_up_to_a_million_tasks() {
        check_flat(&[1_000, 10_000, 100_000, 1_000_000]);
    }

    /// What the model knows of a task: the same policy by scanning every task.
    #[derive(Debug, Clone)]
    struct Model {
        preferred: Vec<u8>,
        order: i64,
        deadline_ms: u64,
        pushed_ms: u64,
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u64, Vec<u8>),
        PushFront(u64, Vec<u8>),
        Pop(u8),
        Remove(u64),
    }

    fn op() -> impl Strategy<Value = (Op, u64)> {
        let prefs = prop::collection::vec(0u8..5, 0..4);
        let op = prop_oneof![
            4 => (0u64..24, prefs.clone()).prop_map(|(t, p)| Op::Push(t, p)),
            1 => (0u64..24, prefs).prop_map(|(t, p)| Op::PushFront(t, p)),
            // Node 4 is preferred but never asks.
            5 => (0u8..4).prop_map(Op::Pop),
            1 => (0u64..24).prop_map(Op::Remove),
        ];
        (op, 0u64..60)
    }

    const NODES: [&str; 5] = ["n0", "n1", "n2", "n3", "n4"];

    fn kept(preferred: &[u8]) -> Vec<u8> {
        let mut out: Vec<u8> = Vec::new();
        for &p in preferred.iter().take(PREFERRED_NODES_MAX) {
            if !out.contains(&p) {
                out.push(p);
            }
        }
        out
    }

    /// The model's choice for node `n` at `now`: the policy of the module doc, by scan.
    fn model_pick(tasks: &BTreeMap<u64, Model>, n: u8, now: u64, wait: u64) -> Option<u64> {
        let oldest = |f: &dyn Fn(&Model) -> bool| {
            tasks
                .iter()
                .filter(|(_, m)| f(m))
                .min_by_key(|(_, m)| m.order)
                .map(|(t, m)| (*t, m.clone()))
        };
        let local = oldest(&|m| m.preferred.contains(&n));
        let other = oldest(&|m| m.preferred.is_empty() || m.deadline_ms <= now);
        match (local, other) {
            (Some(_), Some(o)) if o.1.deadline_ms + wait < local_deadline(tasks, n) => Some(o.0),
            (Some(l), _) => Some(l.0),
            (None, Some(o)) => Some(o.0),
            (None, None) => None,
        }
    }

    fn local_deadline(tasks: &BTreeMap<u64, Model>, n: u8) -> u64 {
        tasks
            .values()
            .filter(|m| m.preferred.contains(&n))
            .min_by_key(|m| m.order)
            .map_or(u64::MAX, |m| m.deadline_ms)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The queue against a model that scans every task, and the properties the policy
        /// promises, checked on the model's state independently of how the queue keeps it:
        /// - every task pushed (and not removed or pushed again) is handed out exactly once;
        /// - a task preferring other nodes than the asking one `n` is handed to `n` only at
        ///   or after its deadline, and its deadline is at most `wait` after it was queued;
        /// - `None` only when no task prefers `n`, none prefers no node, no wait ran out;
        /// - FIFO in each class: a task handed to its preferred node is the oldest
        ///   preferring it, a task preferring no node the oldest such;
        /// - bounded overtaking: a task any node may take is passed over only by a task
        ///   ahead of it, or by one whose deadline is at most `wait` after its own;
        /// - `next_deadline` is the earliest deadline of the tasks preferring a node.
        #[test]
        fn queue_keeps_its_promises(ops in prop::collection::vec(op(), 1..200), wait in 0u64..150) {
            let mut q: LocalityQueue<u64, &str> = LocalityQueue::new(wait);
            let mut model: BTreeMap<u64, Model> = BTreeMap::new();
            let (mut next_back, mut next_front, mut last) = (0i64, -1i64, 0u64);
            let mut now = 0u64;
            let mut handed_out = 0usize;
            let mut queued = 0usize;
            for (op, dt) in ops {
                now += dt;
                match op {
                    Op::Push(t, p) => {
                        let nodes: Vec<&str> = p.iter().map(|&i| NODES[i as usize]).collect();
                        q.push(t, &nodes, now);
                        queued += usize::from(model.remove(&t).is_none());
                        let deadline_ms = (now + wait).max(last);
                        last = deadline_ms;
                        model.insert(t, Model { preferred: kept(&p), order: next_back, deadline_ms, pushed_ms: now });
                        next_back += 1;
                    }
                    Op::PushFront(t, p) => {
                        let nodes: Vec<&str> = p.iter().map(|&i| NODES[i as usize]).collect();
                        q.push_front(t, &nodes, now);
                        queued += usize::from(model.remove(&t).is_none());
                        let first = model.values().map(|m| m.deadline_ms).min().unwrap_or(u64::MAX);
                        let deadline_ms = (now + wait).min(first);
                        last = last.max(deadline_ms);
                        model.insert(t, Model { preferred: kept(&p), order: next_front, deadline_ms, pushed_ms: now });
                        next_front -= 1;
                    }
                    Op::Remove(t) => {
                        let was = model.remove(&t).is_some();
                        prop_assert_eq!(q.remove(&t), was);
                        queued -= usize::from(was);
                    }
                    Op::Pop(n) => {
                        let got = q.pop_for(&NODES[n as usize], now);
                        prop_assert_eq!(got, model_pick(&model, n, now, wait));
                        let eligible = |m: &Model| m.preferred.is_empty() || m.deadline_ms <= now;
                        match got {
                            None => prop_assert!(model.values().all(|m| !m.preferred.contains(&n) && !eligible(m))),
                            Some(t) => {
                                let m = model.remove(&t);
                                prop_assert!(m.is_some(), "task {} handed out but not queued", t);
                                let Some(m) = m else { unreachable!() };
                                handed_out += 1;
                                queued -= 1;
                                let local = m.preferred.contains(&n);
                                if !local && !m.preferred.is_empty() {
                                    prop_assert!(now >= m.deadline_ms && m.deadline_ms <= m.pushed_ms + wait);
                                }
                                if local {
                                    prop_assert!(model.values().all(|o| !o.preferred.contains(&n) || o.order > m.order));
                                }
                                if m.preferred.is_empty() {
                                    prop_assert!(model.values().all(|o| !o.preferred.is_empty() || o.order > m.order));
                                }
                                for o in model.values().filter(|o| eligible(o)) {
                                    prop_assert!(m.order < o.order || m.deadline_ms <= o.deadline_ms + wait,
                                        "{:?} overtook {:?}", m, o);
                                }
                            }
                        }
                    }
                }
                prop_assert_eq!(q.len(), model.len());
                prop_assert_eq!(q.len(), queued);
                let want = model.values().filter(|m| !m.preferred.is_empty()).map(|m| m.deadline_ms).min();
                prop_assert_eq!(q.next_deadline(), want);
            }
            // Whatever is left leaves exactly once, to any node, once every wait ran out.
            let mut left: Vec<u64> = std::iter::from_fn(|| q.pop_for(&"n0", u64::MAX)).collect();
            left.sort_unstable();
            let want: Vec<u64> = model.keys().copied().collect();
            prop_assert_eq!(left, want);
            prop_assert!(q.is_empty());
            let _ = handed_out;
        }
    }
}

/// Location lookups and placement at scale: `cargo test --release -p flame-head
/// locality_lookup_time -- --ignored --nocapture` prints the time of one location lookup,
/// and of one lookup + `push` + `pop_for`, with 1,000 to 1,000,000 live objects (and as
/// many tasks queued) over 1,000 nodes. It asserts nothing on time; the work per operation
/// is checked constant by the tests above, which count it.
#[cfg(test)]
mod bench {
    use super::tests::{Rng, SCALE_NODES};
    use super::LocalityQueue;
    use flame_protocol::object::ObjectId;
    use rustc_hash::FxHashMap as HashMap;
    use std::time::Instant;

    /// The head's object locations as modelled here: per owner, per object, the nodes
    /// holding a copy. Keyed by owner first, so a lookup borrows the session's owner name
    /// (a `(String, ObjectId)` key would need an owned `String` per lookup).
    type Index = HashMap<String, HashMap<ObjectId, Vec<String>>>;

    const OWNERS: u64 = 10;

    fn object_id(rng: &mut Rng) -> ObjectId {
        let mut bytes = [0u8; 32];
        for chunk in bytes.chunks_mut(8) {
            chunk.copy_from_slice(&rng.below(u64::MAX).to_le_bytes());
        }
        ObjectId(bytes)
    }

    /// `(lookup ns, lookup + push + pop_for ns)` with `n` objects and `n` tasks queued.
    fn measure(n: u64, nodes: &[String], owners: &[String]) -> (f64, f64) {
        let mut rng = Rng(n ^ 0x5eed);
        let mut index = Index::default();
        let mut objects: Vec<(usize, ObjectId)> = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let owner = rng.below(OWNERS) as usize;
            let id = object_id(&mut rng);
            let holders = (0..1 + rng.below(2))
                .map(|_| nodes[rng.below(SCALE_NODES) as usize].clone())
                .collect();
            index
                .entry(owners[owner].clone())
                .or_default()
                .insert(id, holders);
            objects.push((owner, id));
        }
        let holders_of = |index: &Index, (owner, id): (usize, ObjectId)| -> usize {
            index
                .get(owners[owner].as_str())
                .and_then(|m| m.get(&id))
                .map_or(0, Vec::len)
        };
        let mut q: LocalityQueue<u64, String> = LocalityQueue::new(100);
        let mut now = 0u64;
        for t in 0..n {
            let (owner, id) = objects[rng.below(n) as usize];
            let preferred = index
                .get(owners[owner].as_str())
                .and_then(|m| m.get(&id))
                .map_or(&[][..], Vec::as_slice);
            q.push(t, preferred, now);
        }
        let ops = 1_000_000u64;
        let picks: Vec<(usize, ObjectId)> =
            (0..ops).map(|_| objects[rng.below(n) as usize]).collect();
        let askers: Vec<usize> = (0..ops).map(|_| rng.below(SCALE_NODES) as usize).collect();
        let start = Instant::now();
        let mut found = 0usize;
        for &pick in &picks {
            found += holders_of(&index, pick);
        }
        let lookup_ns = start.elapsed().as_nanos() as f64 / ops as f64;
        let start = Instant::now();
        for (i, (&(owner, id), &asker)) in picks.iter().zip(&askers).enumerate() {
            now += u64::from(i % 4 == 0);
            let preferred = index
                .get(owners[owner].as_str())
                .and_then(|m| m.get(&id))
                .map_or(&[][..], Vec::as_slice);
            q.push(n + i as u64, preferred, now);
            found += usize::from(q.pop_for(&nodes[asker], now).is_some());
        }
        let placed_ns = start.elapsed().as_nanos() as f64 / ops as f64;
        assert!(found > 0);
        (lookup_ns, placed_ns)
    }

    #[test]
    #[ignore = "benchmark: run with --release -- --ignored --nocapture"]
    fn locality_lookup_time() {
        let nodes: Vec<String> = (0..SCALE_NODES).map(|i| format!("node-{i:04}")).collect();
        let owners: Vec<String> = (0..OWNERS).map(|i| format!("owner-{i}")).collect();
        for n in [1_000, 10_000, 100_000, 1_000_000] {
            let (lookup_ns, placed_ns) = measure(n, &nodes, &owners);
            println!(
                "locality: {n:>9} live objects, {n:>9} tasks queued, {SCALE_NODES} nodes: \
                 lookup {lookup_ns:.0} ns, lookup + push + pop_for {placed_ns:.0} ns"
            );
        }
    }
}
