//! Room on nodes while a plan is made: what is free ([`Free`]), what fits beside a node's
//! free GPUs, where a gang's ranks go, and the nodes by free cpu ([`NodeHeaps`]).

use super::{selector_matches, AppView, Gang, NodeView};
use flame_protocol::model::Resources;

/// Free resources of one node while a plan is made.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Free {
    pub(super) cpu_millis: u64,
    pub(super) memory_bytes: u64,
    pub(super) gpus: u32,
}

impl Free {
    pub(super) fn fits(&self, r: &Resources) -> bool {
        self.cpu_millis >= u64::from(r.cpu_millis)
            && r.memory_bytes.is_none_or(|m| self.memory_bytes >= m)
            && self.gpus >= r.gpus
    }

    pub(super) fn take(&mut self, r: &Resources) {
        self.cpu_millis = self.cpu_millis.saturating_sub(u64::from(r.cpu_millis));
        self.memory_bytes = self
            .memory_bytes
            .saturating_sub(r.memory_bytes.unwrap_or(0));
        self.gpus = self.gpus.saturating_sub(r.gpus);
    }

    pub(super) fn of(r: &Resources) -> Free {
        Free {
            cpu_millis: u64::from(r.cpu_millis),
            memory_bytes: r.memory_bytes.unwrap_or(0),
            gpus: r.gpus,
        }
    }

    pub(super) fn add(&mut self, o: &Free) {
        self.cpu_millis += o.cpu_millis;
        self.memory_bytes = self.memory_bytes.saturating_add(o.memory_bytes);
        self.gpus += o.gpus;
    }

    /// Takes as much of `want` as there is; returns what is still wanting.
    pub(super) fn take_up_to(&mut self, want: Free) -> Free {
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

    pub(super) fn give(&mut self, r: &Resources) {
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
pub(super) fn fits_beside_gpus(n: &NodeView, room: &Free, r: &Resources) -> bool {
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
pub(super) const MAKE_ROOM_NODES_PER_PLAN: usize = 20_000;

/// Most of the cluster's cpus that gang reservations hold at once, in thousandths: the
/// rest keeps serving elastic work.
pub(super) const RESERVE_PERMILLE: u64 = 250;

/// Most make-room searches in one plan: each scans the nodes, and the rounds after it
/// continue what it started.
pub(super) const MAKE_ROOM_PER_PLAN: usize = 4096;

/// `r` taken `k` times (saturating).
pub(super) fn times(r: &Resources, k: u64) -> Resources {
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

/// Where the ranks of a gang go, given the room per node: exactly `ranks_per_node` on each
/// node used when set, otherwise as many as fit on the roomiest nodes first. `None` when
/// they do not all fit.
/// Among nodes that hold as many, those with more room in `prefer` come first.
pub(super) fn place_gang(
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

/// Ready nodes by free cpu, in two classes: without GPUs and with them. Work that needs no
/// GPU goes to the first class first, so GPU nodes keep room for the work that needs them.
/// Each heap holds one current entry per node, and stale ones (whose cpu differs from the
/// node's free cpu now) that are skipped; it is never scanned whole.
pub(super) struct NodeHeaps {
    heaps: [std::collections::BinaryHeap<(u64, std::cmp::Reverse<usize>)>; 2],
    /// Node indexes of each class, in index (name) order.
    members: [Vec<usize>; 2],
}

impl NodeHeaps {
    fn class(n: &NodeView) -> usize {
        usize::from(n.gpus > 0)
    }

    pub(super) fn new(free: &[Free], nodes: &[&NodeView]) -> NodeHeaps {
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
    pub(super) fn class_order(&self, wants_gpu: bool) -> Vec<&[usize]> {
        Self::classes(wants_gpu)
            .iter()
            .map(|&c| self.members[c].as_slice())
            .collect()
    }

    /// The node that suits with the most free cpu, ties broken by name.
    pub(super) fn best(
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
    pub(super) fn update(&mut self, n: usize, free: &Free, nodes: &[&NodeView]) {
        self.heaps[Self::class(nodes[n])].push((free.cpu_millis, std::cmp::Reverse(n)));
    }
}

pub(super) fn node_total(n: &NodeView) -> Free {
    Free {
        cpu_millis: u64::from(n.cpu_millis),
        memory_bytes: n.memory_bytes,
        gpus: n.gpus,
    }
}
