//! The object store: the shell around [`super::cache`] that holds the bytes.
//!
//! An object in memory is a sealed memfd (`F_SEAL_SHRINK|GROW|WRITE|SEAL`): nobody can
//! change it once sealed, so it is read without re-hashing, and the same-host endpoint
//! hands a read-only descriptor of it to clients. An object on disk is a file in the spill
//! folder, named `OWNER-HASH/ID.GENERATION`: the folder is the node's own (created 0700,
//! refused if it is a link or another user's), files are created 0600 with `O_NOFOLLOW`
//! under a temporary name and renamed into place, so no path a user can change is ever
//! followed. The folder is a cache: it is emptied at start (the node reports what it holds
//! when it registers, and an object from a previous run has no scope or owner record), and
//! nothing is fsynced. Every chunk ([`OBJECT_CHUNK_BYTES`]) read back from disk is checked
//! against its hash: a mismatch drops the copy, reports `Dropped` with `corrupt: chunk N
//! failed its hash`, and the read fails with [`CacheError::Corrupt`].
//!
//! Room is reserved before bytes are written ([`Cache::admit`], under the lock, with the
//! entry held by its filler so nothing moves it), then the spills and deletions that
//! admission decided run outside the lock, then the bytes are written, then the object is
//! installed. A writing failure on the spill folder (ENOSPC included) is a
//! [`CacheError::Disk`] naming the path and the OS error, and an `ObjectEvent::Full`.
//!
//! Events (`Dropped`, `Full`) go to the sender given to [`ObjectStore::open`] with
//! `try_send`, after the lock is released: a full queue loses the event with a warning and
//! a count (logged with each loss); the cache never waits on the link. The store
//! does not report `Stored`: a task output is reported by its result, and the endpoints
//! and the fetcher report the copies they make ([`ObjectStore::announce`]).
//!
//! Deliberately not here: recovering the spill folder across restarts, and fsync.

use super::cache::{
    AdmitError, Budgets, Cache, CacheFull, DropReason, Dropped, ObjectKey, Tick, Tier,
};
use super::files::{hash_file, new_memfd, prepare_spill_dir, required_seals, seal, SpillFile};
use bytes::Bytes;
use flame_protocol::ids::SessionId;
use flame_protocol::limits;
use flame_protocol::object::{
    chunk_hash, digest, id_of_chunks, CacheUsage, ChunkHasher, ObjectEvent, ObjectId, ObjectRef,
    ObjectScope, OBJECT_CHUNK_BYTES,
};
use nix::fcntl::{FcntlArg, SealFlag};
use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::mpsc;

/// One chunk's BLAKE3 hash.
pub use flame_protocol::object::ChunkHash;

/// Reads at most this large are done on the runtime's thread; larger ones on a blocking one.
const INLINE_READ_BYTES: u64 = 256 * 1024;

/// The node's cache settings (`flame-node --object-memory`, `--object-disk`, and the
/// spill folder under its work folder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheConfig {
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub spill_dir: PathBuf,
}

/// Why the store could not store or read an object. The text is what a client is told.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Full(#[from] CacheFull),
    #[error("cannot write the object spill folder at {path}: {cause}; the node's disk may be full (see `flame node list`)")]
    Disk {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("object {id} of `{owner}` is corrupt on this node: chunk {chunk} failed its hash; the copy was dropped")]
    Corrupt {
        owner: String,
        id: ObjectId,
        chunk: u64,
    },
    #[error("object {id} of `{owner}` is not in this node's cache")]
    NotFound { owner: String, id: ObjectId },
    #[error("an object of {size} bytes is larger than the most a node stores ({max} bytes)")]
    TooLarge { size: u64, max: u64 },
    #[error("the bytes are not object {id}: {why}")]
    Mismatch { id: ObjectId, why: String },
    #[error("the descriptor is not a sealed memfd: {0}")]
    NotSealed(String),
    #[error("object {id} is being stored by another transfer; try again when it ends")]
    Busy { id: ObjectId },
    #[error("object {id} has {size} bytes: the range {offset}+{len} is outside it")]
    Range {
        id: ObjectId,
        size: u64,
        offset: u64,
        len: u64,
    },
    #[error("object {id} went while it was being stored: {reason}")]
    Gone { id: ObjectId, reason: String },
    #[error("the object cache's memory file: {0}")]
    Memory(std::io::Error),
}

/// Where an object's bytes are.
#[derive(Debug, Clone)]
pub(super) enum Backing {
    /// A sealed memfd.
    Memory(Arc<File>),
    /// A spill file, opened read-only.
    Disk { file: Arc<File>, path: PathBuf },
}

/// An object whose bytes are in place.
#[derive(Debug)]
struct Held {
    object: ObjectRef,
    chunks: Arc<[ChunkHash]>,
    generation: u64,
    backing: Backing,
}

#[derive(Debug)]
struct State {
    core: Cache,
    held: HashMap<ObjectKey, Held>,
    tick: Tick,
}

impl State {
    fn now(&mut self) -> Tick {
        self.tick += 1;
        self.tick
    }
}

#[derive(Debug)]
struct Inner {
    spill_dir: PathBuf,
    state: Mutex<State>,
    events: mpsc::Sender<ObjectEvent>,
    events_lost: AtomicU64,
}

/// The node's object cache. Cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct ObjectStore {
    inner: Arc<Inner>,
}

/// What must happen outside the lock after the cache decided: files to delete, objects
/// to copy to disk, events to send.
#[derive(Debug, Default)]
struct Chores {
    unlink: Vec<PathBuf>,
    spill: Vec<Spill>,
    events: Vec<ObjectEvent>,
}

#[derive(Debug)]
struct Spill {
    key: ObjectKey,
    generation: u64,
    size: u64,
    from: Arc<File>,
}

/// A place reserved in the cache for an object being written.
#[derive(Debug)]
struct Reservation {
    key: ObjectKey,
    generation: u64,
    tier: Tier,
}

impl ObjectStore {
    /// Opens the cache: makes (or empties) the spill folder, and starts with nothing held.
    pub fn open(
        config: CacheConfig,
        events: mpsc::Sender<ObjectEvent>,
    ) -> Result<ObjectStore, CacheError> {
        prepare_spill_dir(&config.spill_dir)?;
        let core = Cache::new(Budgets {
            memory_bytes: config.memory_bytes,
            disk_bytes: config.disk_bytes,
        });
        Ok(ObjectStore {
            inner: Arc::new(Inner {
                spill_dir: config.spill_dir,
                state: Mutex::new(State {
                    core,
                    held: HashMap::new(),
                    tick: 0,
                }),
                events,
                events_lost: AtomicU64::new(0),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.lock()
    }

    /// Stores bytes the caller holds (a task's output, a fetched copy), checking them
    /// against `object`. Storing an object already held only keeps it longer when `scope`
    /// is `Kept`.
    pub async fn insert(
        &self,
        owner: &str,
        object: ObjectRef,
        scope: ObjectScope,
        bytes: Bytes,
    ) -> Result<(), CacheError> {
        self.insert_bytes(owner, object, scope, bytes, true).await
    }

    /// As [`ObjectStore::insert`], for a spare copy (another node holds the object): it is
    /// not pinned, so it may be dropped, least recently used first, when room is needed.
    pub async fn insert_spare(
        &self,
        owner: &str,
        object: ObjectRef,
        scope: ObjectScope,
        bytes: Bytes,
    ) -> Result<(), CacheError> {
        self.insert_bytes(owner, object, scope, bytes, false).await
    }

    async fn insert_bytes(
        &self,
        owner: &str,
        object: ObjectRef,
        scope: ObjectScope,
        bytes: Bytes,
        pinned: bool,
    ) -> Result<(), CacheError> {
        check_size(&object, bytes.len() as u64)?;
        let checked = bytes.clone();
        let chunks = blocking(move || {
            let (found, chunks) = digest(&checked);
            if found != object {
                return Err(CacheError::Mismatch {
                    id: object.id,
                    why: "their hash is another".into(),
                });
            }
            Ok(chunks)
        })
        .await?;
        self.insert_digested(owner, object, scope, chunks, bytes, pinned)
            .await
    }

    /// Stores `bytes`, whose reference and chunk hashes `digest` gave the caller from
    /// these very bytes (the node's own task outputs: hashed once, not again here).
    pub(crate) async fn insert_digested(
        &self,
        owner: &str,
        object: ObjectRef,
        scope: ObjectScope,
        chunks: Vec<ChunkHash>,
        bytes: Bytes,
        pinned: bool,
    ) -> Result<(), CacheError> {
        check_size(&object, bytes.len() as u64)?;
        let Some(reservation) = self.reserve(owner, object, scope, pinned).await? else {
            return Ok(());
        };
        let spill_dir = self.inner.spill_dir.clone();
        let key = reservation.key.clone();
        let (generation, tier) = (reservation.generation, reservation.tier);
        let written = blocking(move || match tier {
            Tier::Memory => {
                let file = new_memfd(&key.id)?;
                file.write_all_at(&bytes, 0).map_err(CacheError::Memory)?;
                seal(&file)?;
                Ok(Backing::Memory(Arc::new(file)))
            }
            Tier::Disk => {
                let mut out = SpillFile::create(&spill_dir, &key, generation)?;
                out.write(&bytes)?;
                out.finish()
            }
        })
        .await;
        self.install(reservation, object, chunks, written)
    }

    /// Stores a sealed memfd a same-host client passed: checks its seals, its size and
    /// its bytes. In memory the descriptor itself is kept (no copy).
    pub async fn insert_fd(
        &self,
        owner: &str,
        object: ObjectRef,
        scope: ObjectScope,
        fd: OwnedFd,
    ) -> Result<(), CacheError> {
        let seals = nix::fcntl::fcntl(fd.as_fd(), FcntlArg::F_GET_SEALS)
            .map_err(|e| CacheError::NotSealed(e.to_string()))?;
        let seals = SealFlag::from_bits_truncate(seals);
        if !seals.contains(required_seals()) {
            return Err(CacheError::NotSealed(format!(
                "its seals are {seals:?}; it needs F_SEAL_SHRINK, F_SEAL_GROW and F_SEAL_WRITE"
            )));
        }
        let file = File::from(fd);
        let len = file.metadata().map_err(CacheError::Memory)?.len();
        check_size(&object, len)?;
        let file = Arc::new(file);
        let hashed = file.clone();
        let chunks = blocking(move || hash_file(&hashed, object)).await?;
        let Some(reservation) = self.reserve(owner, object, scope, true).await? else {
            return Ok(());
        };
        let written = match reservation.tier {
            Tier::Memory => Ok(Backing::Memory(file)),
            Tier::Disk => {
                let spill_dir = self.inner.spill_dir.clone();
                let key = reservation.key.clone();
                let generation = reservation.generation;
                blocking(move || {
                    SpillFile::copy_from(&spill_dir, &key, generation, &file, object.size)
                })
                .await
            }
        };
        self.install(reservation, object, chunks, written)
    }

    /// A writer for bytes that arrive in order (a QUIC put, a fetch): each chunk is checked
    /// against `chunks` as it completes, the whole against the id at
    /// [`ObjectWriter::finish`]. Room is reserved now; dropping the writer unfinished
    /// gives it back. When the object is already held, the writer checks the bytes and
    /// stores nothing.
    pub fn writer(
        &self,
        owner: &str,
        object: ObjectRef,
        scope: ObjectScope,
        chunks: Vec<ChunkHash>,
    ) -> Result<ObjectWriter, CacheError> {
        check_size(&object, object.size)?;
        if chunks.len() as u64 == object.chunks()
            && id_of_chunks(object.size, &chunks) != Some(object.id)
        {
            return Err(CacheError::Mismatch {
                id: object.id,
                why: "the chunk hashes sent are not those of the object".into(),
            });
        }
        if chunks.len() as u64 != object.chunks() {
            return Err(CacheError::Mismatch {
                id: object.id,
                why: format!(
                    "{} chunk hashes for {} bytes, which make {} chunks",
                    chunks.len(),
                    object.size,
                    object.chunks()
                ),
            });
        }
        let reservation = self.reserve_now(owner, object, scope)?;
        let sink = match &reservation {
            None => Sink::Discard,
            Some(r) => match self.open_sink(r) {
                Ok(sink) => sink,
                Err(e) => {
                    self.abandon(r, &e);
                    return Err(e);
                }
            },
        };
        Ok(ObjectWriter {
            store: self.clone(),
            reservation,
            object,
            chunks: chunks.into(),
            sink,
            written: 0,
            chunk: ChunkHasher::new(object.size, 0),
            failed: false,
        })
    }

    fn open_sink(&self, r: &Reservation) -> Result<Sink, CacheError> {
        match r.tier {
            Tier::Memory => Ok(Sink::Memory(new_memfd(&r.key.id)?)),
            Tier::Disk => Ok(Sink::Disk(SpillFile::create(
                &self.inner.spill_dir,
                &r.key,
                r.generation,
            )?)),
        }
    }

    /// Whether `owner`'s object `id` is here (its bytes in place).
    pub fn contains(&self, owner: &str, id: &ObjectId) -> bool {
        self.lock().held.contains_key(&ObjectKey::new(owner, *id))
    }

    /// A reader of `owner`'s object `id`; the object is neither moved nor dropped while
    /// it is open.
    pub fn open_read(&self, owner: &str, id: &ObjectId) -> Result<ObjectReader, CacheError> {
        let key = ObjectKey::new(owner, *id);
        let mut state = self.lock();
        let not_found = || CacheError::NotFound {
            owner: owner.to_string(),
            id: *id,
        };
        let held = state.held.get(&key).ok_or_else(not_found)?;
        let (object, chunks, backing) = (held.object, held.chunks.clone(), held.backing.clone());
        let now = state.now();
        let generation = state.core.open(&key, now).ok_or_else(not_found)?;
        Ok(ObjectReader {
            store: self.clone(),
            key,
            generation,
            object,
            chunks,
            backing,
        })
    }

    /// The session ended: its objects go (those being read, when their readers close).
    pub fn end_session(&self, owner: &str, session: SessionId) {
        let chores = {
            let mut state = self.lock();
            let dropped = state.core.end_session(owner, session);
            forget(&mut state, dropped)
        };
        self.inner.run_quick(chores);
    }

    /// The owner removed these objects.
    pub fn remove(&self, owner: &str, ids: &[ObjectId]) {
        let chores = {
            let mut state = self.lock();
            let dropped = ids
                .iter()
                .filter_map(|id| {
                    state
                        .core
                        .remove(&ObjectKey::new(owner, *id), DropReason::Removed)
                })
                .collect();
            forget(&mut state, dropped)
        };
        self.inner.run_quick(chores);
    }

    /// What the cache holds and may hold.
    pub fn usage(&self) -> CacheUsage {
        self.lock().core.usage()
    }

    /// Every object held: its owner, reference and scope (reported at registration).
    pub fn inventory(&self) -> Vec<(String, ObjectRef, ObjectScope)> {
        let state = self.lock();
        state
            .held
            .iter()
            .filter_map(|(key, held)| {
                let entry = state.core.get(key)?;
                (entry.doomed.is_none()).then(|| (key.owner.clone(), held.object, entry.scope))
            })
            .collect()
    }

    /// Reports a copy this node now holds (`ObjectEvent::Stored`): for the endpoints after
    /// a put and for the fetcher after a fetch. Task outputs are reported by their result.
    pub fn announce(&self, owner: &str, object: ObjectRef, scope: ObjectScope) {
        self.inner.emit(vec![ObjectEvent::Stored {
            owner: owner.to_string(),
            object,
            scope,
        }]);
    }

    /// Reserves room for `object`, and spills and deletes what admission decided before
    /// returning; `None` when the object is already held (then only its scope may grow).
    async fn reserve(
        &self,
        owner: &str,
        object: ObjectRef,
        scope: ObjectScope,
        pinned: bool,
    ) -> Result<Option<Reservation>, CacheError> {
        let (reservation, chores) = self.admit(owner, object, scope, pinned)?;
        if chores.spill.is_empty() {
            self.inner.run_quick(chores);
        } else {
            // The spills end before the bytes are written, or memory would hold both.
            let inner = self.inner.clone();
            blocking(move || {
                inner.run(chores);
                Ok(())
            })
            .await?;
        }
        Ok(reservation)
    }

    /// As [`ObjectStore::reserve`], but the spills run in the background when there is a
    /// runtime (the caller is not async).
    fn reserve_now(
        &self,
        owner: &str,
        object: ObjectRef,
        scope: ObjectScope,
    ) -> Result<Option<Reservation>, CacheError> {
        let (reservation, chores) = self.admit(owner, object, scope, true)?;
        let inner = self.inner.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(move || inner.run(chores));
            }
            Err(_) => inner.run(chores),
        }
        Ok(reservation)
    }

    fn admit(
        &self,
        owner: &str,
        object: ObjectRef,
        scope: ObjectScope,
        pinned: bool,
    ) -> Result<(Option<Reservation>, Chores), CacheError> {
        let key = ObjectKey::new(owner, object.id);
        let mut state = self.lock();
        let now = state.now();
        let admission = match state
            .core
            .admit(key.clone(), object.size, scope, pinned, now)
        {
            Ok(admission) => admission,
            Err(AdmitError::Present) => {
                if !state.held.contains_key(&key) {
                    return Err(CacheError::Busy { id: object.id });
                }
                state.core.touch(&key, now);
                if scope == ObjectScope::Kept {
                    state.core.keep(&key);
                }
                return Ok((None, Chores::default()));
            }
            Err(AdmitError::Full(full)) => {
                drop(state);
                self.inner.emit(vec![ObjectEvent::Full {
                    reason: full.to_string(),
                }]);
                return Err(full.into());
            }
        };
        let mut chores = forget(&mut state, admission.dropped);
        for (victim, generation) in admission.spill {
            if let Some(Held {
                backing: Backing::Memory(file),
                object,
                ..
            }) = state.held.get(&victim)
            {
                chores.spill.push(Spill {
                    key: victim,
                    generation,
                    size: object.size,
                    from: file.clone(),
                });
            }
        }
        let reservation = Reservation {
            key,
            generation: admission.generation,
            tier: admission.tier,
        };
        Ok((Some(reservation), chores))
    }

    /// Puts written bytes in place, or gives the reservation back when writing failed.
    fn install(
        &self,
        r: Reservation,
        object: ObjectRef,
        chunks: Vec<ChunkHash>,
        written: Result<Backing, CacheError>,
    ) -> Result<(), CacheError> {
        let backing = match written {
            Ok(backing) => backing,
            Err(e) => {
                self.abandon(&r, &e);
                return Err(e);
            }
        };
        let mut chores = Chores::default();
        let result = {
            let mut state = self.lock();
            let current = state.core.get(&r.key).map(|e| e.generation) == Some(r.generation);
            if current {
                state.held.insert(
                    r.key.clone(),
                    Held {
                        object,
                        chunks: chunks.into(),
                        generation: r.generation,
                        backing: backing.clone(),
                    },
                );
            }
            match (current, state.core.release(&r.key, r.generation)) {
                (true, None) => Ok(()),
                (_, dropped) => {
                    let reason = dropped
                        .as_ref()
                        .map_or("it was dropped".to_string(), |d| d.reason.to_string());
                    chores = forget(&mut state, dropped.into_iter().collect());
                    if let Backing::Disk { path, .. } = &backing {
                        if !current {
                            chores.unlink.push(path.clone());
                        }
                    }
                    Err(CacheError::Gone {
                        id: object.id,
                        reason,
                    })
                }
            }
        };
        self.inner.run_quick(chores);
        result
    }

    /// Gives a reservation back after `error`, reporting it (a disk error as `Full`).
    fn abandon(&self, r: &Reservation, error: &CacheError) {
        let chores = {
            let mut state = self.lock();
            let dropped =
                state
                    .core
                    .discard(&r.key, r.generation, DropReason::Failed(error.to_string()));
            forget(&mut state, dropped.into_iter().collect())
        };
        if let CacheError::Disk { .. } = error {
            self.inner.emit(vec![ObjectEvent::Full {
                reason: error.to_string(),
            }]);
        }
        self.inner.run_quick(chores);
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent enough state for a cache: the
        // worst case is an entry whose bytes are missing, found when it is read.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends events without waiting: a full queue loses them, with a warning and a count.
    fn emit(&self, events: Vec<ObjectEvent>) {
        for event in events {
            match self.events.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    let lost = self.events_lost.fetch_add(1, Ordering::Relaxed) + 1;
                    tracing::warn!(?event, lost, "object event queue full; event lost");
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    tracing::debug!("object events closed; the node is stopping");
                }
            }
        }
    }

    /// Deletions and events only (no spills): quick enough for any thread.
    fn run_quick(&self, chores: Chores) {
        debug_assert!(chores.spill.is_empty());
        self.run(chores);
    }

    /// Carries out chores: blocking file I/O.
    fn run(&self, chores: Chores) {
        for path in &chores.unlink {
            unlink(path);
        }
        self.emit(chores.events);
        for spill in chores.spill {
            self.spill(spill);
        }
    }

    /// Copies one object from memory to disk and swaps its backing; on failure drops it
    /// and reports both the drop and the disk's state.
    fn spill(&self, spill: Spill) {
        let written = SpillFile::copy_from(
            &self.spill_dir,
            &spill.key,
            spill.generation,
            &spill.from,
            spill.size,
        );
        let mut state = self.lock();
        let current = state
            .held
            .get(&spill.key)
            .is_some_and(|h| h.generation == spill.generation);
        let chores = match written {
            Ok(backing) if current => {
                if let Some(held) = state.held.get_mut(&spill.key) {
                    held.backing = backing;
                }
                Chores::default()
            }
            Ok(Backing::Disk { path, .. }) => Chores {
                unlink: vec![path],
                ..Chores::default()
            },
            Ok(Backing::Memory(_)) => Chores::default(),
            Err(error) => {
                tracing::warn!(%error, object = %spill.key.id, "spilling an object failed; dropping it");
                let dropped = state.core.discard(
                    &spill.key,
                    spill.generation,
                    DropReason::Failed(error.to_string()),
                );
                let mut chores = forget(&mut state, dropped.into_iter().collect());
                chores.events.push(ObjectEvent::Full {
                    reason: error.to_string(),
                });
                chores
            }
        };
        drop(state);
        self.run_quick(chores);
    }

    /// A spilled chunk failed its hash: the copy goes.
    fn corrupt(&self, key: &ObjectKey, generation: u64, chunk: u64) {
        let chores = {
            let mut state = self.lock();
            let dropped = state
                .core
                .discard(key, generation, DropReason::Corrupt { chunk });
            forget(&mut state, dropped.into_iter().collect())
        };
        self.run_quick(chores);
    }
}

/// Removes dropped entries' bytes from `state`; the files to delete and events to send.
fn forget(state: &mut State, dropped: Vec<Dropped>) -> Chores {
    let mut chores = Chores::default();
    for d in dropped {
        let current = state
            .held
            .get(&d.key)
            .is_some_and(|h| h.generation == d.generation);
        if current {
            if let Some(Held {
                backing: Backing::Disk { path, .. },
                ..
            }) = state.held.remove(&d.key)
            {
                chores.unlink.push(path);
            }
        }
        chores.events.push(ObjectEvent::Dropped {
            owner: d.key.owner.clone(),
            id: d.key.id,
            reason: d.reason.to_string(),
        });
    }
    chores
}

pub(super) fn unlink(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete a spilled object")
        }
    }
}

fn check_size(object: &ObjectRef, len: u64) -> Result<(), CacheError> {
    if object.size > limits::OBJECT_BYTES_MAX {
        return Err(CacheError::TooLarge {
            size: object.size,
            max: limits::OBJECT_BYTES_MAX,
        });
    }
    if len != object.size {
        return Err(CacheError::Mismatch {
            id: object.id,
            why: format!("{len} bytes, not {}", object.size),
        });
    }
    Ok(())
}

/// Runs blocking work on a blocking thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, CacheError> + Send + 'static,
) -> Result<T, CacheError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| CacheError::Memory(std::io::Error::other(e.to_string())))?
}

/// Where an [`ObjectWriter`]'s bytes go.
#[derive(Debug)]
enum Sink {
    Memory(File),
    Disk(SpillFile),
    /// The object is already held: the bytes are checked and not kept.
    Discard,
}

/// Bytes of one object arriving in order; see [`ObjectStore::writer`].
#[derive(Debug)]
pub struct ObjectWriter {
    store: ObjectStore,
    reservation: Option<Reservation>,
    object: ObjectRef,
    chunks: Arc<[ChunkHash]>,
    sink: Sink,
    written: u64,
    chunk: ChunkHasher,
    failed: bool,
}

impl ObjectWriter {
    /// Takes the next bytes. A chunk that does not match its hash, or bytes past the
    /// object's size, fail the writer (the copy is abandoned when it is dropped).
    pub fn write(&mut self, mut data: &[u8]) -> Result<(), CacheError> {
        if self.failed {
            return Err(self.mismatch("an earlier write failed".into()));
        }
        if data.len() as u64 > self.object.size - self.written {
            self.failed = true;
            return Err(self.mismatch(format!("more than {} bytes", self.object.size)));
        }
        while !data.is_empty() {
            let in_chunk = self.written % OBJECT_CHUNK_BYTES;
            let take = ((OBJECT_CHUNK_BYTES - in_chunk) as usize).min(data.len());
            let (piece, rest) = data.split_at(take);
            self.chunk.update(piece);
            if let Err(e) = self.put(piece) {
                self.failed = true;
                return Err(e);
            }
            self.written += take as u64;
            if self.written % OBJECT_CHUNK_BYTES == 0 || self.written == self.object.size {
                let index = (self.written - 1) / OBJECT_CHUNK_BYTES;
                let hash = self.chunk.finalize();
                self.chunk = ChunkHasher::new(self.object.size, index + 1);
                if self.chunks.get(index as usize) != Some(&hash) {
                    self.failed = true;
                    return Err(self.mismatch(format!("chunk {index} does not match its hash")));
                }
            }
            data = rest;
        }
        Ok(())
    }

    fn put(&mut self, piece: &[u8]) -> Result<(), CacheError> {
        match &mut self.sink {
            Sink::Memory(file) => file.write_all(piece).map_err(CacheError::Memory),
            Sink::Disk(file) => file.write(piece),
            Sink::Discard => Ok(()),
        }
    }

    fn mismatch(&self, why: String) -> CacheError {
        CacheError::Mismatch {
            id: self.object.id,
            why,
        }
    }

    /// Bytes taken so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Checks that every byte came and that the whole is the object, and puts it in the
    /// cache.
    pub async fn finish(mut self) -> Result<(), CacheError> {
        if self.failed || self.written != self.object.size {
            return Err(self.mismatch(format!(
                "{} of {} bytes arrived",
                self.written, self.object.size
            )));
        }
        // Every chunk matched its hash, and the hashes merge into the id (checked when
        // the writer was made): the whole is the object.
        let Some(reservation) = self.reservation.take() else {
            return Ok(());
        };
        let written = match std::mem::replace(&mut self.sink, Sink::Discard) {
            Sink::Memory(file) => seal(&file).map(|()| Backing::Memory(Arc::new(file))),
            Sink::Disk(file) => blocking(move || file.finish()).await,
            Sink::Discard => Err(CacheError::Memory(std::io::Error::other(
                "the writer lost its file",
            ))),
        };
        let chunks = self.chunks.to_vec();
        self.store
            .install(reservation, self.object, chunks, written)
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        if let Some(r) = self.reservation.take() {
            let error = self.mismatch("the transfer ended before the object was stored".into());
            self.store.abandon(&r, &error);
        }
    }
}

/// An open object: its bytes stay in the cache while this lives.
#[derive(Debug)]
pub struct ObjectReader {
    store: ObjectStore,
    key: ObjectKey,
    generation: u64,
    object: ObjectRef,
    chunks: Arc<[ChunkHash]>,
    backing: Backing,
}

impl ObjectReader {
    /// The object's reference.
    pub fn object(&self) -> ObjectRef {
        self.object
    }

    /// Its chunk hashes, in order.
    pub fn chunks(&self) -> &[ChunkHash] {
        &self.chunks
    }

    /// `len` bytes from `offset` (`len` 0: to the end). Bytes from disk are checked chunk
    /// by chunk; a mismatch drops the copy and fails with [`CacheError::Corrupt`].
    pub async fn read_range(&self, offset: u64, len: u64) -> Result<Bytes, CacheError> {
        let size = self.object.size;
        let len = if len == 0 {
            size.saturating_sub(offset)
        } else {
            len
        };
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(CacheError::Range {
                id: self.object.id,
                size,
                offset,
                len,
            });
        }
        let backing = self.backing.clone();
        let chunks = self.chunks.clone();
        let read = move || read_backing(&backing, &chunks, size, offset, len);
        let result = if len <= INLINE_READ_BYTES {
            read()
        } else {
            tokio::task::spawn_blocking(read)
                .await
                .map_err(|e| ReadError::Io(std::io::Error::other(e.to_string())))
                .and_then(|r| r)
        };
        match result {
            Ok(bytes) => Ok(bytes),
            Err(ReadError::Corrupt(chunk)) => {
                self.store.inner.corrupt(&self.key, self.generation, chunk);
                Err(CacheError::Corrupt {
                    owner: self.key.owner.clone(),
                    id: self.object.id,
                    chunk,
                })
            }
            Err(ReadError::Io(cause)) => Err(match &self.backing {
                Backing::Memory(_) => CacheError::Memory(cause),
                Backing::Disk { path, .. } => CacheError::Disk {
                    path: path.clone(),
                    cause,
                },
            }),
        }
    }

    /// Every byte.
    pub async fn read_all(&self) -> Result<Bytes, CacheError> {
        if self.object.size == 0 {
            return Ok(Bytes::new());
        }
        self.read_range(0, 0).await
    }

    /// A read-only descriptor of the bytes (for the same-host endpoint): the memfd opened
    /// again read-only, or the spill file.
    pub fn fd(&self) -> Result<OwnedFd, CacheError> {
        let (file, on_error): (&File, fn(std::io::Error) -> CacheError) = match &self.backing {
            Backing::Memory(file) => (file, CacheError::Memory),
            Backing::Disk { file, .. } => {
                return file
                    .try_clone()
                    .map(OwnedFd::from)
                    .map_err(CacheError::Memory)
            }
        };
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map(OwnedFd::from)
            .map_err(on_error)
    }

    /// Whether the bytes are on disk now (they may move there while the reader is open;
    /// this reader keeps reading from where it opened them).
    pub fn on_disk(&self) -> bool {
        matches!(self.backing, Backing::Disk { .. })
    }

    /// Re-checks every chunk of a spilled copy against its hash, one chunk in memory at a
    /// time; a mismatch drops the copy and reports it, as [`ObjectReader::read_range`]
    /// does. A copy in memory (a sealed memfd) cannot change and passes at once. For a
    /// reader that gets the descriptor, not the bytes: the node checks before it hands
    /// out a file a disk fault may have changed.
    pub async fn verify(&self) -> Result<(), CacheError> {
        if !self.on_disk() {
            return Ok(());
        }
        let size = self.object.size;
        let mut offset = 0;
        while offset < size {
            let len = OBJECT_CHUNK_BYTES.min(size - offset);
            self.read_range(offset, len).await?;
            offset += len;
        }
        Ok(())
    }
}

impl Drop for ObjectReader {
    fn drop(&mut self) {
        let chores = {
            let mut state = self.store.lock();
            let dropped = state.core.release(&self.key, self.generation);
            forget(&mut state, dropped.into_iter().collect())
        };
        self.store.inner.run_quick(chores);
    }
}

enum ReadError {
    Corrupt(u64),
    Io(std::io::Error),
}

fn read_backing(
    backing: &Backing,
    chunks: &[ChunkHash],
    size: u64,
    offset: u64,
    len: u64,
) -> Result<Bytes, ReadError> {
    let mut out = vec![0u8; len as usize];
    match backing {
        Backing::Memory(file) => {
            file.read_exact_at(&mut out, offset)
                .map_err(ReadError::Io)?;
        }
        Backing::Disk { file, .. } => {
            let end = offset + len;
            let mut chunk = offset / OBJECT_CHUNK_BYTES;
            let mut buf = Vec::new();
            while chunk * OBJECT_CHUNK_BYTES < end {
                let start = chunk * OBJECT_CHUNK_BYTES;
                let chunk_len = OBJECT_CHUNK_BYTES.min(size - start);
                buf.resize(chunk_len as usize, 0);
                file.read_exact_at(&mut buf, start).map_err(ReadError::Io)?;
                if chunks.get(chunk as usize) != Some(&chunk_hash(size, chunk, &buf)) {
                    return Err(ReadError::Corrupt(chunk));
                }
                let from = offset.max(start);
                let to = end.min(start + chunk_len);
                out[(from - offset) as usize..(to - offset) as usize]
                    .copy_from_slice(&buf[(from - start) as usize..(to - start) as usize]);
                chunk += 1;
            }
        }
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
