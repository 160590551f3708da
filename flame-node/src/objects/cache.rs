//! The object cache's bookkeeping: which objects a node holds, in which tier, how much of
//! each budget they use, and what to spill or drop to admit one more. No I/O and no clock:
//! the caller passes a tick (any number that grows with use) and carries out the moves this
//! returns ([`super::store`] is the shell that does).
//!
//! # Tiers, pins and the eviction policy
//!
//! An object is in memory (a sealed memfd) or on disk (a file in the spill folder), and
//! each tier has a budget in bytes. An object is *pinned* while something may still need
//! it: a `Session(s)` object until the head ends `s`, a `Kept` object until its owner
//! removes it. Pinned objects may move from memory to disk but are never dropped; only
//! unpinned ones are (a copy fetched as a spare, or one whose scope ended while a reader
//! still held it).
//!
//! To admit an object of `size` bytes the cache tries, in order:
//!
//! 1. **Memory**, when `size` fits the memory budget at all: it moves memory objects to
//!    disk, least recently used first, unpinned ones before pinned ones, until `size` fits.
//!    A moved object needs room on disk: unpinned disk objects are dropped for it, least
//!    recently used first; an unpinned object that still finds no room is dropped instead
//!    of moved, and a pinned one stays where it is (the next candidate is tried).
//! 2. **Disk**, when memory cannot take it: unpinned disk objects are dropped, least
//!    recently used first, until it fits.
//! 3. Else the admission fails with [`CacheFull`], which names both budgets and what holds
//!    them, and nothing has moved.
//!
//! Why LRU among unpinned first: what the head still needs (pinned) must survive, so the
//! only question is the order among what may go. Objects here are task inputs, common
//! data and outputs; a session reads its common data on every task and an input once or a
//! few times soon after it is put, so recency predicts the next read well, and LRU costs
//! O(log n) per touch with no tuning (frequency-based policies need decay constants and
//! protect stale hot objects of finished phases). Spilling before dropping keeps a copy
//! that costs a disk read instead of a network fetch or a re-run. Unpinned goes before
//! pinned even when older because dropping or moving an unpinned copy costs at most a
//! refetch, while a pinned object is the head's reason to route tasks to this node.
//!
//! An object held by an open reader (or being filled) is never moved or dropped: a
//! removal or an ended session marks it, and it goes when its last reader closes.
//!
//! Invariants, checked by [`Cache::check`] and the property test: each tier's use equals
//! the sum of its entries' sizes and never exceeds its budget; every entry is in exactly
//! one LRU index and in its session's index when it has a session.

use flame_protocol::ids::SessionId;
use flame_protocol::object::{CacheUsage, ObjectId, ObjectScope};
use std::collections::{BTreeMap, HashMap, HashSet};

/// A number that grows with use: the cache's notion of recency (the shell counts calls).
pub type Tick = u64;

/// One object as the cache knows it: `(owner, id)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub owner: String,
    pub id: ObjectId,
}

impl ObjectKey {
    /// The key of `owner`'s object `id`.
    pub fn new(owner: &str, id: ObjectId) -> ObjectKey {
        ObjectKey {
            owner: owner.to_string(),
            id,
        }
    }
}

/// Where an object's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tier {
    Memory,
    Disk,
}

/// How many bytes each tier may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

/// Why an object left the cache (the text of `ObjectEvent::Dropped`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropReason {
    /// Unpinned and least recently used when room was needed.
    Evicted,
    /// Its session ended.
    SessionEnded,
    /// Its owner removed it.
    Removed,
    /// A chunk failed its hash when read back.
    Corrupt { chunk: u64 },
    /// Its bytes could not be kept (a spill that failed, a fill that was abandoned).
    Failed(String),
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DropReason::Evicted => f.write_str("evicted: least recently used, to make room"),
            DropReason::SessionEnded => f.write_str("its session ended"),
            DropReason::Removed => f.write_str("removed by its owner"),
            DropReason::Corrupt { chunk } => write!(f, "corrupt: chunk {chunk} failed its hash"),
            DropReason::Failed(why) => write!(f, "could not be kept: {why}"),
        }
    }
}

/// One object the cache holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub size: u64,
    pub tier: Tier,
    pub scope: ObjectScope,
    pub pinned: bool,
    /// Open readers, and the filler while the object is being written.
    pub readers: u32,
    pub last_used: Tick,
    /// Tells this entry from an earlier or later one under the same key.
    pub generation: u64,
    /// Set when it was removed while held: it goes when its last reader closes.
    pub doomed: Option<DropReason>,
}

/// An object that left the cache; the shell deletes its bytes and reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    pub key: ObjectKey,
    pub tier: Tier,
    pub size: u64,
    pub generation: u64,
    pub reason: DropReason,
}

/// What admitting an object decided. The accounting already reflects it: the shell must
/// copy each of `spill` to disk and delete each of `dropped`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The new object's tier.
    pub tier: Tier,
    /// The new entry's generation (for [`Cache::release`] and [`Cache::discard`]).
    pub generation: u64,
    /// Objects moved from memory to disk, with their generations.
    pub spill: Vec<(ObjectKey, u64)>,
    /// Objects dropped to make room.
    pub dropped: Vec<Dropped>,
}

/// An object did not fit: both budgets are held by pinned objects or open readers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cache full: an object of {size} bytes does not fit; memory holds {memory_used} of \
     {memory_bytes} bytes and disk {disk_used} of {disk_bytes} bytes, in objects that are \
     pinned (their session is open or they are kept) or being read; end sessions, remove \
     kept objects, or give the node more room (--object-memory, --object-disk)"
)]
pub struct CacheFull {
    pub size: u64,
    pub memory_used: u64,
    pub memory_bytes: u64,
    pub disk_used: u64,
    pub disk_bytes: u64,
}

/// Why [`Cache::admit`] admitted nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    #[error(transparent)]
    Full(#[from] CacheFull),
    #[error("the object is already held")]
    Present,
}

/// The LRU index an entry sits in: tier × pinned.
fn class(tier: Tier, pinned: bool) -> usize {
    match (tier, pinned) {
        (Tier::Memory, false) => 0,
        (Tier::Memory, true) => 1,
        (Tier::Disk, false) => 2,
        (Tier::Disk, true) => 3,
    }
}

/// The cache's state: entries, their LRU order per class, and the tiers' use.
#[derive(Debug)]
pub struct Cache {
    budgets: Budgets,
    entries: HashMap<ObjectKey, Entry>,
    /// Per [`class`]: (last used, generation) -> key, least recent first.
    lru: [BTreeMap<(Tick, u64), ObjectKey>; 4],
    sessions: HashMap<(String, SessionId), HashSet<ObjectId>>,
    memory_used: u64,
    disk_used: u64,
    next_generation: u64,
}

impl Cache {
    /// An empty cache with these budgets.
    pub fn new(budgets: Budgets) -> Cache {
        Cache {
            budgets,
            entries: HashMap::new(),
            lru: Default::default(),
            sessions: HashMap::new(),
            memory_used: 0,
            disk_used: 0,
            next_generation: 1,
        }
    }

    /// The entry under `key`.
    pub fn get(&self, key: &ObjectKey) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// What the tiers hold and may hold.
    pub fn usage(&self) -> CacheUsage {
        CacheUsage {
            memory_used: self.memory_used,
            memory_capacity: self.budgets.memory_bytes,
            disk_used: self.disk_used,
            disk_capacity: self.budgets.disk_bytes,
            objects: self.entries.len() as u64,
        }
    }

    /// Admits `key` with `size` bytes: decides its tier, moves and drops what must go, and
    /// records it with one reader (its filler), which [`Cache::release`] ends once its
    /// bytes are in place (or [`Cache::discard`] if they never arrive).
    pub fn admit(
        &mut self,
        key: ObjectKey,
        size: u64,
        scope: ObjectScope,
        pinned: bool,
        now: Tick,
    ) -> Result<Admission, AdmitError> {
        if self.entries.contains_key(&key) {
            return Err(AdmitError::Present);
        }
        let plan = self.plan(size)?;
        let generation = self.next_generation;
        self.next_generation += 1;
        let mut dropped = Vec::with_capacity(plan.drop.len());
        for victim in &plan.drop {
            if let Some(d) = self.take(victim, DropReason::Evicted) {
                dropped.push(d);
            }
        }
        let mut spill = Vec::with_capacity(plan.spill.len());
        for victim in &plan.spill {
            if let Some(generation) = self.move_to_disk(victim) {
                spill.push((victim.clone(), generation));
            }
        }
        let entry = Entry {
            size,
            tier: plan.tier,
            scope,
            pinned,
            readers: 1,
            last_used: now,
            generation,
            doomed: None,
        };
        self.insert_entry(key, entry);
        Ok(Admission {
            tier: plan.tier,
            generation,
            spill,
            dropped,
        })
    }

    /// What admitting `size` bytes would take, without doing it.
    pub fn plan(&self, size: u64) -> Result<Plan, CacheFull> {
        if size <= self.budgets.memory_bytes {
            if let Some(plan) = self.plan_memory(size) {
                return Ok(plan);
            }
        }
        if size <= self.budgets.disk_bytes {
            if let Some(plan) = self.plan_disk(size) {
                return Ok(plan);
            }
        }
        Err(CacheFull {
            size,
            memory_used: self.memory_used,
            memory_bytes: self.budgets.memory_bytes,
            disk_used: self.disk_used,
            disk_bytes: self.budgets.disk_bytes,
        })
    }

    /// Candidates in `class`, least recently used first, that nobody holds.
    fn movable(&self, class: usize) -> impl Iterator<Item = (&ObjectKey, &Entry)> {
        self.lru[class].values().filter_map(|key| {
            let entry = self.entries.get(key)?;
            (entry.readers == 0).then_some((key, entry))
        })
    }

    fn plan_memory(&self, size: u64) -> Option<Plan> {
        let mut memory_free = self.budgets.memory_bytes.saturating_sub(self.memory_used);
        let mut disk_free = self.budgets.disk_bytes.saturating_sub(self.disk_used);
        let mut disk_victims = self.movable(class(Tier::Disk, false));
        let mut plan = Plan {
            tier: Tier::Memory,
            spill: Vec::new(),
            drop: Vec::new(),
        };
        let candidates = self
            .movable(class(Tier::Memory, false))
            .chain(self.movable(class(Tier::Memory, true)));
        for (key, entry) in candidates {
            if memory_free >= size {
                break;
            }
            while disk_free < entry.size {
                let Some((victim, v)) = disk_victims.next() else {
                    break;
                };
                plan.drop.push(victim.clone());
                disk_free += v.size;
            }
            if disk_free >= entry.size {
                disk_free -= entry.size;
                plan.spill.push(key.clone());
            } else if entry.pinned {
                continue;
            } else {
                plan.drop.push(key.clone());
            }
            memory_free += entry.size;
        }
        (memory_free >= size).then_some(plan)
    }

    fn plan_disk(&self, size: u64) -> Option<Plan> {
        let mut disk_free = self.budgets.disk_bytes.saturating_sub(self.disk_used);
        let mut plan = Plan {
            tier: Tier::Disk,
            spill: Vec::new(),
            drop: Vec::new(),
        };
        for (key, entry) in self.movable(class(Tier::Disk, false)) {
            if disk_free >= size {
                break;
            }
            plan.drop.push(key.clone());
            disk_free += entry.size;
        }
        (disk_free >= size).then_some(plan)
    }

    /// Opens a reader of `key`: it is not moved or dropped until [`Cache::release`].
    /// Returns the entry's generation.
    pub fn open(&mut self, key: &ObjectKey, now: Tick) -> Option<u64> {
        let entry = self.entries.get(key)?;
        if entry.doomed.is_some() {
            return None;
        }
        let generation = entry.generation;
        self.touch(key, now);
        let entry = self.entries.get_mut(key)?;
        entry.readers += 1;
        Some(generation)
    }

    /// Marks `key` used at `now` (LRU order).
    pub fn touch(&mut self, key: &ObjectKey, now: Tick) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        let c = class(entry.tier, entry.pinned);
        self.lru[c].remove(&(entry.last_used, entry.generation));
        entry.last_used = now;
        self.lru[c].insert((now, entry.generation), key.clone());
    }

    /// Ends one reader (or the filler) of generation `generation` of `key`; the entry, if
    /// that was its last reader and it was removed meanwhile.
    pub fn release(&mut self, key: &ObjectKey, generation: u64) -> Option<Dropped> {
        let entry = self.entries.get_mut(key)?;
        if entry.generation != generation {
            return None;
        }
        entry.readers = entry.readers.saturating_sub(1);
        if entry.readers > 0 {
            return None;
        }
        let reason = entry.doomed.clone()?;
        self.take(key, reason)
    }

    /// Drops generation `generation` of `key` now, readers or not (its bytes are bad or
    /// never arrived).
    pub fn discard(
        &mut self,
        key: &ObjectKey,
        generation: u64,
        reason: DropReason,
    ) -> Option<Dropped> {
        if self.entries.get(key)?.generation != generation {
            return None;
        }
        self.take(key, reason)
    }

    /// Removes `key`: now when nobody holds it, else when its last reader closes.
    pub fn remove(&mut self, key: &ObjectKey, reason: DropReason) -> Option<Dropped> {
        let entry = self.entries.get(key)?;
        if entry.readers == 0 {
            return self.take(key, reason);
        }
        self.unpin(key);
        if let Some(entry) = self.entries.get_mut(key) {
            entry.doomed = Some(reason);
        }
        None
    }

    /// The session ended: its objects go (those being read, when their readers close).
    pub fn end_session(&mut self, owner: &str, session: SessionId) -> Vec<Dropped> {
        let Some(ids) = self.sessions.remove(&(owner.to_string(), session)) else {
            return Vec::new();
        };
        ids.into_iter()
            .filter_map(|id| self.remove(&ObjectKey::new(owner, id), DropReason::SessionEnded))
            .collect()
    }

    /// Gives `key` the scope `Kept` (an object put to keep that a session also made): it
    /// then outlives the session.
    pub fn keep(&mut self, key: &ObjectKey) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        if let ObjectScope::Session(session) = entry.scope {
            entry.scope = ObjectScope::Kept;
            if let Some(ids) = self.sessions.get_mut(&(key.owner.clone(), session)) {
                ids.remove(&key.id);
            }
        }
    }

    fn unpin(&mut self, key: &ObjectKey) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        if entry.pinned {
            let idx = (entry.last_used, entry.generation);
            self.lru[class(entry.tier, true)].remove(&idx);
            self.lru[class(entry.tier, false)].insert(idx, key.clone());
            entry.pinned = false;
        }
    }

    fn move_to_disk(&mut self, key: &ObjectKey) -> Option<u64> {
        let entry = self.entries.get_mut(key)?;
        if entry.tier != Tier::Memory {
            return None;
        }
        let idx = (entry.last_used, entry.generation);
        self.lru[class(Tier::Memory, entry.pinned)].remove(&idx);
        self.lru[class(Tier::Disk, entry.pinned)].insert(idx, key.clone());
        entry.tier = Tier::Disk;
        self.memory_used -= entry.size;
        self.disk_used += entry.size;
        Some(entry.generation)
    }

    fn insert_entry(&mut self, key: ObjectKey, entry: Entry) {
        match entry.tier {
            Tier::Memory => self.memory_used += entry.size,
            Tier::Disk => self.disk_used += entry.size,
        }
        self.lru[class(entry.tier, entry.pinned)]
            .insert((entry.last_used, entry.generation), key.clone());
        if let ObjectScope::Session(session) = entry.scope {
            self.sessions
                .entry((key.owner.clone(), session))
                .or_default()
                .insert(key.id);
        }
        self.entries.insert(key, entry);
    }

    fn take(&mut self, key: &ObjectKey, reason: DropReason) -> Option<Dropped> {
        let entry = self.entries.remove(key)?;
        self.lru[class(entry.tier, entry.pinned)].remove(&(entry.last_used, entry.generation));
        match entry.tier {
            Tier::Memory => self.memory_used -= entry.size,
            Tier::Disk => self.disk_used -= entry.size,
        }
        if let ObjectScope::Session(session) = entry.scope {
            let session_key = (key.owner.clone(), session);
            if let Some(ids) = self.sessions.get_mut(&session_key) {
                ids.remove(&key.id);
                if ids.is_empty() {
                    self.sessions.remove(&session_key);
                }
            }
        }
        Some(Dropped {
            key: key.clone(),
            tier: entry.tier,
            size: entry.size,
            generation: entry.generation,
            reason,
        })
    }

    /// Checks the invariants (see the module doc); the first broken one.
    #[cfg(test)]
    pub fn check(&self) -> Result<(), String> {
        let sum = |tier| -> u64 {
            self.entries
                .values()
                .filter(|e| e.tier == tier)
                .map(|e| e.size)
                .sum()
        };
        if sum(Tier::Memory) != self.memory_used || sum(Tier::Disk) != self.disk_used {
            return Err(format!(
                "use {}/{} is not the entries' sums {}/{}",
                self.memory_used,
                self.disk_used,
                sum(Tier::Memory),
                sum(Tier::Disk)
            ));
        }
        if self.memory_used > self.budgets.memory_bytes || self.disk_used > self.budgets.disk_bytes
        {
            return Err(format!(
                "use {}/{} exceeds budgets {:?}",
                self.memory_used, self.disk_used, self.budgets
            ));
        }
        let indexed: usize = self.lru.iter().map(BTreeMap::len).sum();
        if indexed != self.entries.len() {
            return Err(format!(
                "{indexed} LRU entries for {} objects",
                self.entries.len()
            ));
        }
        for (key, e) in &self.entries {
            if self.lru[class(e.tier, e.pinned)].get(&(e.last_used, e.generation)) != Some(key) {
                return Err(format!("{key:?} is not in its LRU index"));
            }
        }
        Ok(())
    }
}

/// What [`Cache::plan`] decided: the new object's tier, what moves to disk for it, and
/// what is dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub tier: Tier,
    pub spill: Vec<ObjectKey>,
    pub drop: Vec<ObjectKey>,
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
