//! The durable state: one redb file in the data directory.
//!
//! The tables are the state; start-up replays nothing, it reads the tables and rebuilds the
//! in-memory indexes from them. Only this module opens the redb file.
//!
//! Writes go through one writer thread that **group-commits**: it takes every request that
//! arrived while the previous commit was running and applies them all in one write
//! transaction with `Durability::Immediate`, so the cost of an fsync is shared by everything
//! that arrived meanwhile. The group size is set by arrival, not by a timer.
//!
//! What the tables hold are **records** ([`records`]), the on-disk format, apart from the
//! wire types: the store's API takes and returns the head's own types ([`ApplicationSpec`],
//! [`StoredSession`], [`SessionInfo`], …) and converts them on the way in and out, so a
//! change to the wire format is not a change to the file. Older schemas' records and their
//! migrations are in [`migrate`]. A record that cannot be encoded fails its whole write
//! transaction ([`StoreError::Encode`]); nothing is written for it.

mod migrate;
pub mod records;

use crate::storage_fault::{
    classify, free_space, next_backoff_ms, FaultKind, StorageFault, PROBE_BACKOFF_MIN_MS,
    PROBE_FREE_BYTES_MIN,
};
use flame_protocol::model::{
    ApplicationSpec, ExecutorUsage, JobInfo, NodeResources, SessionInfo, SessionState, TaskInfo,
    TaskOutcome, TaskResult, TaskState,
};
use flame_protocol::object::Payload;
use flame_protocol::{SessionId, TaskId};
use records::{
    ApplicationRecord, CertificateRecord, FinishedRecord, NodeRecord, OutcomeRecord, SessionRecord,
    TaskRecord, TokenRecord,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

/// Version of the table layout below. A mismatch stops the head; there is no silent reset.
/// Version 2: application resources, users, selectors and secret env; node resources and
/// labels; per-session executor usage. Version 1 stores (pre-release) are refused.
/// Version 3: session owners and priorities, node drains. Version 4: batch jobs.
/// Version 5: applications' `allow_root`. Version 6: applications' `users` and `groups`,
/// the `owner_uids` table, token uses and `replace`, and the certificates table
/// (revocations and nodes' certificates); a version 5 store is migrated at open
/// ([`migrate::migrate_5_to_6`]). Version 7: objects (issue 20): a session's common data
/// may be an object (the sessions table is rewritten, [`migrate::migrate_6_to_7`]); a
/// pending task's input and a final task's outcome may be objects (variants appended to
/// the task records, so the tasks table reads as it was). The records of each table are
/// in [`records`]: changing one changes the schema.
pub const SCHEMA_VERSION: u64 = 8;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const APPS: TableDefinition<&str, &[u8]> = TableDefinition::new("applications");
const SESSIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("sessions");
const TASKS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("tasks");
const NODES: TableDefinition<&str, &[u8]> = TableDefinition::new("nodes");
/// (session, client batch id) → (first task id, task count).
const BATCHES: TableDefinition<(u64, u64), (u64, u32)> = TableDefinition::new("batches");
/// Token id → [`TokenRecord`] (the digest of its secret, never the secret). Added in
/// schema 5.
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("tokens");
/// `serial:<hex>`, `sha256:<hex>` or `node:<name>` → [`CertificateRecord`]: revoked
/// certificates, and the certificate each joined node connects with. Added in schema 6.
const CERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("certificates");
/// Session id → its final view ([`FinishedRecord`], from [`SessionInfo`]), written when a finished session leaves the
/// head's memory. Views, owners and log targets of finished sessions are read here, and
/// start-up does not load them. Added without a schema change: a store of an earlier
/// release gets the table at open, and its finished sessions are moved out at the first
/// start (`Core::new` evicts them).
const FINISHED: TableDefinition<u64, &[u8]> = TableDefinition::new("finished");
/// Owner → the Unix uid its executors run as on nodes in owner-uid mode, assigned once.
/// Added in schema 6.
const OWNER_UIDS: TableDefinition<&str, u32> = TableDefinition::new("owner_uids");

const META_SCHEMA: &str = "schema_version";
const META_NEXT_SESSION: &str = "next_session_id";
const META_NEXT_EXECUTOR: &str = "next_executor_id";
/// Probe writes made after storage faults (a count, so each probe changes a record).
const META_PROBES: &str = "storage_probes";

/// Finished sessions a listing looks through, newest first.
pub const FINISHED_SCANNED_MAX: usize = 100_000;

/// Most records a migration at open reads before it writes them back: it rewrites a
/// table in passes of this many rows, so its memory is bounded whatever the table holds.
pub const MIGRATION_ROWS_PER_PASS: usize = 4096;

/// Most requests one group commit takes; more wait for the next commit.
pub const GROUP_COMMIT_REQUESTS_MAX: usize = 4096;
/// Payload bytes after which a group commit stops taking more requests.
pub const GROUP_COMMIT_BYTES_MAX: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the data directory {dir} is in use by another flame-head (the redb file is locked)")]
    Locked { dir: PathBuf },
    #[error(
        "cannot open the state file {path}: {cause}\n\
         hint: restore the data directory from a backup, or move it aside to start with an empty state"
    )]
    Open {
        path: PathBuf,
        cause: redb::DatabaseError,
    },
    #[error(
        "the state in {path} has schema version {found}, this flame-head expects {expected}; \
         refusing to start rather than reset it"
    )]
    SchemaMismatch {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("storage error: {0}")]
    Redb(#[from] redb::Error),
    #[error(
        "the state file {path} is damaged ({detail})\n\
         hint: restore the data directory from a backup, or move it aside to start with an empty state"
    )]
    Damaged { path: PathBuf, detail: String },
    #[error("corrupt record in table {table}: {cause}")]
    Corrupt {
        table: &'static str,
        #[source]
        cause: postcard::Error,
    },
    /// A record could not be encoded: its write transaction is abandoned, nothing of it is
    /// written. Not a fault of the disk.
    #[error(
        "a record for table {table} could not be encoded ({cause}); nothing of this write was \
         stored"
    )]
    Encode {
        table: &'static str,
        #[source]
        cause: postcard::Error,
    },
    #[error(
        "the state file in {dir} is closed after a storage fault; the head reopens it once \
         its disk works"
    )]
    Closed { dir: PathBuf },
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Redb(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// A session as the store keeps it, as the core holds it; written as a
/// [`records::SessionRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    pub id: SessionId,
    pub application: String,
    pub owner: String,
    pub priority: i32,
    /// Inline bytes, or an object in the nodes' caches.
    pub common_data: Payload,
    pub state: SessionState,
    pub created_ms: u64,
    pub closed_ms: Option<u64>,
    /// Highest task id handed out; the next one is this plus one.
    pub last_task: u64,
    /// What the executors that served it used, one entry per executor, at most
    /// [`USAGE_RECORDS_MAX`].
    pub usage: Vec<ExecutorUsage>,
    /// A batch job's spec and progress; `None` for an elastic session.
    pub job: Option<JobInfo>,
}

/// Most executor usage records kept per session; later executors are added up into the
/// last record.
pub const USAGE_RECORDS_MAX: usize = 1024;

/// A task as stored. Pending tasks hold their input; final ones hold their outcome and drop
/// the input, which is no longer needed to run them. Written as a [`records::TaskRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoredTask {
    Pending { attempt: u32, input: Payload },
    Final { attempt: u32, outcome: TaskOutcome },
}

/// A node as stored: what it registered with, so `flame node list` knows it after a restart.
/// Written as a [`records::NodeRecord`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(test, derive(Serialize, Deserialize))]
pub struct StoredNode {
    pub name: String,
    pub allocatable: NodeResources,
    pub labels: BTreeMap<String, String>,
    pub isolation: flame_protocol::model::Isolation,
    pub last_seen_ms: u64,
    /// Drained by an operator: nothing new is placed there.
    pub draining: bool,
}

/// One change to the state.
#[derive(Debug, Clone)]
pub enum StoreOp {
    PutApplication(ApplicationSpec),
    RemoveApplication(String),
    PutSession(StoredSession),
    /// New pending tasks `first ..` of a session, attempt 1.
    AddTasks {
        session: SessionId,
        /// The client's id of the batch, remembered so a resend creates nothing.
        batch_id: u64,
        first: TaskId,
        inputs: Vec<Payload>,
    },
    FinishTasks {
        session: SessionId,
        results: Vec<(TaskId, u32, TaskOutcome)>,
    },
    PutNode(StoredNode),
    /// A finished session's final view (the `finished` table).
    PutFinished(Box<SessionInfo>),
    /// An owner's uid, assigned once (see `owner_uids.rs`).
    PutOwnerUid {
        owner: String,
        uid: u32,
    },
    /// Id counters, so ids are never reused after a restart. `None` leaves one as it is.
    PutCounters {
        next_session: Option<u64>,
        next_executor: Option<u64>,
    },
}

impl StoreOp {
    fn payload_bytes(&self) -> usize {
        match self {
            StoreOp::AddTasks { inputs, .. } => inputs.iter().map(Payload::held_bytes).sum(),
            StoreOp::FinishTasks { results, .. } => results
                .iter()
                .map(|(_, _, o)| match o {
                    TaskOutcome::Succeeded(b) => b.len(),
                    TaskOutcome::Failed(m) => m.len(),
                    TaskOutcome::Cancelled => 0,
                    TaskOutcome::Object(_) => flame_protocol::object::OBJECT_ID_BYTES + 8,
                })
                .sum(),
            _ => 64,
        }
    }
}

/// Everything read back at start-up.
#[derive(Debug, Default)]
pub struct Loaded {
    pub applications: Vec<ApplicationSpec>,
    pub sessions: Vec<StoredSession>,
    /// Per session, its tasks in id order.
    pub tasks: Vec<(SessionId, TaskId, StoredTask)>,
    pub nodes: Vec<StoredNode>,
    /// `(session, client batch id, first task, count)`.
    pub batches: Vec<(SessionId, u64, TaskId, u32)>,
    pub next_session: u64,
    pub next_executor: u64,
    /// Owner → uid.
    pub owner_uids: Vec<(String, u32)>,
}

/// The redb database. It sits behind a lock so that the store writer can reopen it in
/// place after a storage fault (redb refuses every operation after an I/O error until
/// then) while other threads hold the same `Store`; `None` while a reopen failed.
#[derive(Debug, Clone)]
pub struct Store {
    db: Arc<RwLock<Option<Database>>>,
    dir: PathBuf,
}

/// A record of `table` as its bytes. Postcard into a Vec fails only for what serde cannot
/// describe (a sequence of unknown length); the records are plain data, but a failure is
/// still an error of the write, never an empty record.
fn encode<T: Serialize>(table: &'static str, record: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_allocvec(record).map_err(|cause| StoreError::Encode { table, cause })
}

/// Like [`encode`], into `buf` (cleared first), so a batch of records reuses one buffer.
fn encode_into<T: Serialize>(
    table: &'static str,
    record: &T,
    buf: &mut Vec<u8>,
) -> Result<(), StoreError> {
    buf.clear();
    *buf = postcard::to_extend(record, std::mem::take(buf))
        .map_err(|cause| StoreError::Encode { table, cause })?;
    Ok(())
}

fn decode<T: for<'a> Deserialize<'a>>(table: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|cause| StoreError::Corrupt { table, cause })
}

impl Store {
    /// Opens (or creates) `dir/state.redb` and checks the schema version.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Ok(Store {
            db: Arc::new(RwLock::new(Some(Store::open_db(dir)?))),
            dir: dir.to_path_buf(),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Closes the database and opens it again, with the checks of [`Store::open`]: what
    /// redb needs after an I/O error. Readers wait for the reopen; a transaction begun
    /// before it keeps the old file open, and the reopen then fails and is tried again.
    pub fn reopen(&self) -> Result<(), StoreError> {
        let mut db = self.db.write().unwrap_or_else(PoisonError::into_inner);
        *db = None;
        *db = Some(Store::open_db(&self.dir)?);
        Ok(())
    }

    /// After a storage fault: reopens the database and writes a probe record durably.
    /// Ok means the store takes writes again.
    pub fn probe(&self) -> Result<(), StoreError> {
        self.reopen()?;
        let txn = self.write_txn()?;
        {
            let mut meta = txn.open_table(META)?;
            let probes = meta.get(META_PROBES)?.map_or(0, |v| v.value());
            meta.insert(META_PROBES, probes.wrapping_add(1))?;
        }
        txn.commit()?;
        Ok(())
    }

    fn read_txn(&self) -> Result<redb::ReadTransaction, StoreError> {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let db = db.as_ref().ok_or_else(|| StoreError::Closed {
            dir: self.dir.clone(),
        })?;
        Ok(db.begin_read()?)
    }

    fn write_txn(&self) -> Result<redb::WriteTransaction, StoreError> {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let db = db.as_ref().ok_or_else(|| StoreError::Closed {
            dir: self.dir.clone(),
        })?;
        Ok(db.begin_write()?)
    }

    fn open_db(dir: &Path) -> Result<Database, StoreError> {
        let path = dir.join("state.redb");
        let db = match Database::create(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(StoreError::Locked {
                    dir: dir.to_path_buf(),
                })
            }
            Err(cause) => return Err(StoreError::Open { path, cause }),
        };
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta.get(META_SCHEMA)?.map(|v| v.value());
            match found {
                None => {
                    meta.insert(META_SCHEMA, SCHEMA_VERSION)?;
                }
                Some(v) if v == SCHEMA_VERSION => {}
                // Each older schema runs every migration after it, in order.
                Some(old @ 5..=7) => {
                    if old <= 5 {
                        migrate::migrate_5_to_6(&txn)?;
                    }
                    if old <= 6 {
                        migrate::migrate_6_to_7(&txn)?;
                    }
                    migrate::migrate_7_to_8(&txn)?;
                    meta.insert(META_SCHEMA, SCHEMA_VERSION)?;
                }
                Some(found) => {
                    return Err(StoreError::SchemaMismatch {
                        path,
                        found,
                        expected: SCHEMA_VERSION,
                    })
                }
            }
            txn.open_table(APPS)?;
            txn.open_table(SESSIONS)?;
            txn.open_table(TASKS)?;
            txn.open_table(NODES)?;
            txn.open_table(BATCHES)?;
            txn.open_table(TOKENS)?;
            txn.open_table(CERTS)?;
            txn.open_table(FINISHED)?;
            txn.open_table(OWNER_UIDS)?;
        }
        txn.commit()?;
        Ok(db)
    }

    /// Opens the store and reads the whole state. redb panics on some kinds of damage
    /// instead of returning an error; that panic is caught here and reported as a damaged
    /// file, so the head stops with a readable message and leaves the file as it is.
    pub fn open_and_load(dir: &Path) -> Result<(Store, Loaded), StoreError> {
        let message = Arc::new(std::sync::Mutex::new(String::new()));
        let previous = std::panic::take_hook();
        let captured = message.clone();
        std::panic::set_hook(Box::new(move |info| {
            if let Ok(mut m) = captured.lock() {
                *m = info.to_string();
            }
        }));
        let result = std::panic::catch_unwind(|| {
            let store = Store::open(dir)?;
            let loaded = store.load()?;
            Ok((store, loaded))
        });
        std::panic::set_hook(previous);
        match result {
            Ok(r) => r,
            Err(_) => Err(StoreError::Damaged {
                path: dir.join("state.redb"),
                // The hook only stores the text: a poisoned lock still holds it.
                detail: message
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
            }),
        }
    }

    /// Reads the whole state.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let txn = self.read_txn()?;
        let mut loaded = Loaded::default();
        let meta = txn.open_table(META)?;
        loaded.next_session = meta.get(META_NEXT_SESSION)?.map_or(1, |v| v.value());
        loaded.next_executor = meta.get(META_NEXT_EXECUTOR)?.map_or(1, |v| v.value());
        for row in txn.open_table(APPS)?.iter()? {
            let (_, v) = row?;
            let app: ApplicationRecord = decode("applications", v.value())?;
            loaded.applications.push(app.into());
        }
        // Finished sessions stay in the store: neither they nor their tasks are loaded.
        let mut finished = std::collections::HashSet::new();
        for row in txn.open_table(FINISHED)?.iter()? {
            finished.insert(row?.0.value());
        }
        for row in txn.open_table(SESSIONS)?.iter()? {
            let (k, v) = row?;
            if !finished.contains(&k.value()) {
                let session: SessionRecord = decode("sessions", v.value())?;
                loaded.sessions.push(session.into());
            }
        }
        let tasks = txn.open_table(TASKS)?;
        for session in &loaded.sessions {
            let id = session.id.0;
            for row in tasks.range((id, 0)..=(id, u64::MAX))? {
                let (k, v) = row?;
                let (s, t) = k.value();
                let task: TaskRecord = decode("tasks", v.value())?;
                loaded.tasks.push((SessionId(s), TaskId(t), task.into()));
            }
        }
        for row in txn.open_table(NODES)?.iter()? {
            let (_, v) = row?;
            let node: NodeRecord = decode("nodes", v.value())?;
            loaded.nodes.push(node.into());
        }
        for row in txn.open_table(BATCHES)?.iter()? {
            let (k, v) = row?;
            let (session, batch) = k.value();
            if finished.contains(&session) {
                continue;
            }
            let (first, count) = v.value();
            loaded
                .batches
                .push((SessionId(session), batch, TaskId(first), count));
        }
        for row in txn.open_table(OWNER_UIDS)?.iter()? {
            let (k, v) = row?;
            loaded.owner_uids.push((k.value().to_string(), v.value()));
        }
        Ok(loaded)
    }

    /// Every token record, by id.
    pub fn load_tokens(&self) -> Result<Vec<(String, crate::auth::StoredToken)>, StoreError> {
        let txn = self.read_txn()?;
        let mut out = Vec::new();
        for row in txn.open_table(TOKENS)?.iter()? {
            let (k, v) = row?;
            let token: TokenRecord = decode("tokens", v.value())?;
            out.push((k.value().to_string(), token.into()));
        }
        Ok(out)
    }

    /// Writes one token record durably, in a transaction of its own (tokens change
    /// rarely; the group-commit writer is not involved).
    pub fn put_token(&self, id: &str, token: &crate::auth::StoredToken) -> Result<(), StoreError> {
        let txn = self.write_txn()?;
        let bytes = encode("tokens", &TokenRecord::from(token))?;
        txn.open_table(TOKENS)?.insert(id, bytes.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Every certificate record, by key (see [`crate::certs`]).
    pub fn load_certs(&self) -> Result<Vec<(String, crate::certs::StoredCert)>, StoreError> {
        let txn = self.read_txn()?;
        let mut out = Vec::new();
        for row in txn.open_table(CERTS)?.iter()? {
            let (k, v) = row?;
            let cert: CertificateRecord = decode("certificates", v.value())?;
            out.push((k.value().to_string(), cert.into()));
        }
        Ok(out)
    }

    /// A finished session's final view, if it has left the head's memory.
    pub fn finished_session(&self, session: SessionId) -> Result<Option<SessionInfo>, StoreError> {
        let txn = self.read_txn()?;
        let table = txn.open_table(FINISHED)?;
        let Some(row) = table.get(session.0)? else {
            return Ok(None);
        };
        let info: FinishedRecord = decode("finished", row.value())?;
        Ok(Some(info.into()))
    }

    /// Finished sessions that left memory, newest first, at most `max`, only `owner`'s
    /// when given; among the newest [`FINISHED_SCANNED_MAX`] only, so that one listing
    /// costs the head a bounded read however many sessions others finished.
    pub fn finished_sessions(
        &self,
        owner: Option<&str>,
        max: usize,
    ) -> Result<Vec<SessionInfo>, StoreError> {
        let txn = self.read_txn()?;
        let table = txn.open_table(FINISHED)?;
        let mut out = Vec::new();
        for row in table.iter()?.rev().take(FINISHED_SCANNED_MAX) {
            if out.len() >= max {
                break;
            }
            let info: FinishedRecord = decode("finished", row?.1.value())?;
            if owner.is_none_or(|o| crate::core::owner_name(&info.owner) == o) {
                out.push(info.into());
            }
        }
        Ok(out)
    }

    /// Writes one certificate record durably, in a transaction of its own.
    pub fn put_cert_record(
        &self,
        key: &str,
        record: &crate::certs::StoredCert,
    ) -> Result<(), StoreError> {
        let txn = self.write_txn()?;
        let bytes = encode("certificates", &CertificateRecord::from(record))?;
        txn.open_table(CERTS)?.insert(key, bytes.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    /// Whether a node of this name ever registered with the head.
    pub fn node_registered(&self, name: &str) -> Result<bool, StoreError> {
        let txn = self.read_txn()?;
        Ok(txn.open_table(NODES)?.get(name)?.is_some())
    }

    /// The tasks a client batch created, if the store has it (`(first task, count)`): a
    /// batch sent again after its session finished is acked from here.
    pub fn batch(
        &self,
        session: SessionId,
        batch_id: u64,
    ) -> Result<Option<(TaskId, u32)>, StoreError> {
        let txn = self.read_txn()?;
        let table = txn.open_table(BATCHES)?;
        let row = table.get((session.0, batch_id))?;
        Ok(row.map(|v| {
            let (first, count) = v.value();
            (TaskId(first), count)
        }))
    }

    /// A batch the core refused as submitted to a closed or finished session may be a
    /// resend of one the store already has (its ack was lost, and the session finished
    /// meanwhile): then it is acked as it was, else the refusal stands.
    pub fn settle_refused(
        &self,
        session: SessionId,
        reply: flame_protocol::messages::SubmitReply,
    ) -> flame_protocol::messages::SubmitReply {
        use flame_protocol::messages::SubmitReply;
        match reply {
            SubmitReply::Rejected { batch_id, error }
                if error.kind == flame_protocol::model::ErrorKind::FailedPrecondition =>
            {
                match self.batch(session, batch_id) {
                    Ok(Some((first_task, count))) => SubmitReply::Accepted {
                        batch_id,
                        first_task,
                        count,
                    },
                    _ => SubmitReply::Rejected { batch_id, error },
                }
            }
            other => other,
        }
    }

    /// One page of a session's final results, after task `after`, in id order: at most
    /// `max_results`, and no more once `max_bytes` of outputs are in (at least one).
    pub fn final_results_page(
        &self,
        session: SessionId,
        after: TaskId,
        max_results: usize,
        max_bytes: usize,
    ) -> Result<Vec<TaskResult>, StoreError> {
        let txn = self.read_txn()?;
        let tasks = txn.open_table(TASKS)?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let start = after.0.saturating_add(1);
        for row in tasks.range((session.0, start)..=(session.0, u64::MAX))? {
            if out.len() >= max_results || bytes >= max_bytes {
                break;
            }
            let (k, v) = row?;
            if let TaskRecord::Final { attempt, outcome } = decode("tasks", v.value())? {
                bytes += v.value().len();
                out.push(TaskResult {
                    task: TaskId(k.value().1),
                    attempt,
                    outcome: outcome.into(),
                });
            }
        }
        Ok(out)
    }

    /// Final results of a session's tasks, in id order (tests; the server reads them a page
    /// at a time, [`Store::final_results_page`]).
    #[cfg(test)]
    pub fn final_results(&self, session: SessionId) -> Result<Vec<TaskResult>, StoreError> {
        let txn = self.read_txn()?;
        let tasks = txn.open_table(TASKS)?;
        let mut out = Vec::new();
        for row in tasks.range((session.0, 0)..=(session.0, u64::MAX))? {
            let (k, v) = row?;
            if let TaskRecord::Final { attempt, outcome } = decode("tasks", v.value())? {
                out.push(TaskResult {
                    task: TaskId(k.value().1),
                    attempt,
                    outcome: outcome.into(),
                });
            }
        }
        Ok(out)
    }

    /// Tasks of a session after `after`, in id order, at most `limit`, only those in
    /// `states` when it is not empty. Used for sessions whose tasks left memory.
    pub fn list_tasks(
        &self,
        session: SessionId,
        states: &[TaskState],
        after: TaskId,
        limit: usize,
    ) -> Result<Vec<TaskInfo>, StoreError> {
        let txn = self.read_txn()?;
        let tasks = txn.open_table(TASKS)?;
        let mut out = Vec::new();
        let start = after.0.saturating_add(1);
        for row in tasks.range((session.0, start)..=(session.0, u64::MAX))? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = row?;
            let (state, attempt, message) = match decode("tasks", v.value())? {
                TaskRecord::Pending { attempt, .. } | TaskRecord::PendingObject { attempt, .. } => {
                    (TaskState::Pending, attempt, None)
                }
                TaskRecord::Final { attempt, outcome } => match outcome {
                    OutcomeRecord::Succeeded(_) | OutcomeRecord::Object(_) => {
                        (TaskState::Succeeded, attempt, None)
                    }
                    OutcomeRecord::Failed(m) => (TaskState::Failed, attempt, Some(m)),
                    OutcomeRecord::Cancelled => (TaskState::Cancelled, attempt, None),
                },
            };
            if states.is_empty() || states.contains(&state) {
                out.push(TaskInfo {
                    task: TaskId(k.value().1),
                    state,
                    attempt,
                    message,
                });
            }
        }
        Ok(out)
    }

    /// Applies `ops` in one durable write transaction. A record that cannot be encoded
    /// abandons the whole transaction ([`StoreError::Encode`]).
    pub fn commit(&self, ops: &[StoreOp]) -> Result<(), StoreError> {
        let txn = self.write_txn()?;
        {
            let mut apps = txn.open_table(APPS)?;
            let mut sessions = txn.open_table(SESSIONS)?;
            let mut tasks = txn.open_table(TASKS)?;
            let mut nodes = txn.open_table(NODES)?;
            let mut batches = txn.open_table(BATCHES)?;
            let mut owner_uids = txn.open_table(OWNER_UIDS)?;
            let mut meta = txn.open_table(META)?;
            let mut finished = txn.open_table(FINISHED)?;
            let mut buf = Vec::new();
            for (i, op) in ops.iter().enumerate() {
                if i == ops.len() / 2 {
                    crash_mid_batch();
                }
                match op {
                    StoreOp::PutApplication(spec) => {
                        encode_into("applications", &ApplicationRecord::from(spec), &mut buf)?;
                        apps.insert(spec.name.as_str(), buf.as_slice())?;
                    }
                    StoreOp::RemoveApplication(name) => {
                        apps.remove(name.as_str())?;
                    }
                    StoreOp::PutSession(s) => {
                        encode_into("sessions", &SessionRecord::from(s), &mut buf)?;
                        sessions.insert(s.id.0, buf.as_slice())?;
                    }
                    StoreOp::AddTasks {
                        session,
                        batch_id,
                        first,
                        inputs,
                    } => {
                        batches.insert((session.0, *batch_id), (first.0, inputs.len() as u32))?;
                        for (i, input) in inputs.iter().enumerate() {
                            let rec = TaskRecord::pending(1, input);
                            encode_into("tasks", &rec, &mut buf)?;
                            tasks.insert((session.0, first.0 + i as u64), buf.as_slice())?;
                        }
                    }
                    StoreOp::FinishTasks { session, results } => {
                        for (task, attempt, outcome) in results {
                            let rec = TaskRecord::Final {
                                attempt: *attempt,
                                outcome: outcome.into(),
                            };
                            encode_into("tasks", &rec, &mut buf)?;
                            tasks.insert((session.0, task.0), buf.as_slice())?;
                        }
                    }
                    StoreOp::PutNode(n) => {
                        encode_into("nodes", &NodeRecord::from(n), &mut buf)?;
                        nodes.insert(n.name.as_str(), buf.as_slice())?;
                    }
                    StoreOp::PutFinished(info) => {
                        encode_into("finished", &FinishedRecord::from(info.as_ref()), &mut buf)?;
                        finished.insert(info.id.0, buf.as_slice())?;
                    }
                    StoreOp::PutOwnerUid { owner, uid } => {
                        owner_uids.insert(owner.as_str(), *uid)?;
                    }
                    StoreOp::PutCounters {
                        next_session,
                        next_executor,
                    } => {
                        if let Some(v) = next_session {
                            meta.insert(META_NEXT_SESSION, *v)?;
                        }
                        if let Some(v) = next_executor {
                            meta.insert(META_NEXT_EXECUTOR, *v)?;
                        }
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

/// Half-way through applying a group commit's ops, before the commit.
fn crash_mid_batch() {
    crate::failpoints::crash_point!("mid-batch");
}

/// A batch of ops and the token the core uses to continue once they are durable.
#[derive(Debug)]
pub struct StoreRequest {
    pub ops: Vec<StoreOp>,
    pub token: u64,
}

/// What the store writer reports to the core.
#[derive(Debug)]
pub enum WriterEvent {
    /// A group commit ended: the tokens it covered and its outcome.
    Committed {
        tokens: Vec<u64>,
        result: Result<(), crate::storage_fault::CommitError>,
    },
    /// A commit or a probe failed: the store takes no writes until a probe succeeds. Sent
    /// when the fault starts and when its kind changes, before the failed commit's
    /// `Committed`.
    Faulted(StorageFault),
    /// A probe write succeeded after a fault: the store takes writes again.
    Recovered,
}

/// Runs the group-commit loop on its own thread until `requests` closes, reporting each
/// commit and each change of the store's health to `report`.
///
/// After a failed commit the store is faulted: requests that arrive are failed at once
/// with the fault (the disk is not touched for them), and the writer probes the store
/// ([`Store::probe`]: reopen, then a durable write) after [`PROBE_BACKOFF_MIN_MS`],
/// doubling to [`crate::storage_fault::PROBE_BACKOFF_MAX_MS`], until one succeeds.
pub fn spawn_writer(
    store: Store,
    requests: tokio::sync::mpsc::Receiver<StoreRequest>,
    report: impl Fn(WriterEvent) + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // Only for the probe's timer while a fault lasts.
    let timer = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    std::thread::Builder::new()
        .name("store-writer".into())
        .spawn(move || writer_loop(&store, requests, &timer, &report))
}

fn writer_loop(
    store: &Store,
    mut requests: tokio::sync::mpsc::Receiver<StoreRequest>,
    timer: &tokio::runtime::Runtime,
    report: &dyn Fn(WriterEvent),
) {
    let mut fault: Option<StorageFault> = None;
    let mut backoff_ms = PROBE_BACKOFF_MIN_MS;
    let mut next_probe = std::time::Instant::now();
    loop {
        let first = if fault.is_some() {
            let wait = next_probe.saturating_duration_since(std::time::Instant::now());
            // The timer is made inside the runtime: it needs the runtime's clock.
            let next = timer.block_on(async { tokio::time::timeout(wait, requests.recv()).await });
            match next {
                Ok(Some(first)) => Some(first),
                Ok(None) => return,
                Err(_) => None,
            }
        } else {
            match requests.blocking_recv() {
                Some(first) => Some(first),
                None => return,
            }
        };
        let Some(first) = first else {
            // Time to probe; not while the disk has no room to speak of, where a write
            // inside the file's free pages could succeed and the next fail again.
            let probed = match free_space(store.dir()) {
                Ok((free, _)) if free < PROBE_FREE_BYTES_MIN => Err(StorageFault {
                    kind: FaultKind::DiskFull,
                    detail: format!("{free} bytes free, a probe needs {PROBE_FREE_BYTES_MIN}"),
                    data_dir: store.dir().to_path_buf(),
                }),
                _ => store.probe().map_err(|e| classify_now(store, &e)),
            };
            match probed {
                Ok(()) => {
                    fault = None;
                    backoff_ms = PROBE_BACKOFF_MIN_MS;
                    report(WriterEvent::Recovered);
                }
                Err(now) => {
                    tracing::debug!(error = %now.detail, backoff_ms, "storage probe failed");
                    if fault.as_ref().is_none_or(|f| f.kind != now.kind) {
                        report(WriterEvent::Faulted(now.clone()));
                        fault = Some(now);
                    }
                    backoff_ms = next_backoff_ms(backoff_ms);
                    next_probe =
                        std::time::Instant::now() + std::time::Duration::from_millis(backoff_ms);
                }
            }
            continue;
        };
        let mut bytes: usize = first.ops.iter().map(StoreOp::payload_bytes).sum();
        let mut ops = first.ops;
        let mut tokens = vec![first.token];
        while tokens.len() < GROUP_COMMIT_REQUESTS_MAX && bytes < GROUP_COMMIT_BYTES_MAX {
            match requests.try_recv() {
                Ok(next) => {
                    bytes += next.ops.iter().map(StoreOp::payload_bytes).sum::<usize>();
                    ops.extend(next.ops);
                    tokens.push(next.token);
                }
                Err(_) => break,
            }
        }
        if let Some(f) = &fault {
            report(WriterEvent::Committed {
                tokens,
                result: Err(crate::storage_fault::CommitError::Faulted(f.clone())),
            });
            continue;
        }
        let result = match store.commit(&ops) {
            Ok(()) => Ok(()),
            // The transaction was abandoned before anything reached the disk, which works:
            // this commit fails, and the store is not faulted.
            Err(e @ StoreError::Encode { .. }) => {
                tracing::error!(error = %e, ops = ops.len(), "group commit refused");
                Err(crate::storage_fault::CommitError::Refused(e.to_string()))
            }
            Err(e) => {
                let f = classify_now(store, &e);
                tracing::error!(error = %e, ops = ops.len(), "group commit failed");
                report(WriterEvent::Faulted(f.clone()));
                backoff_ms = PROBE_BACKOFF_MIN_MS;
                next_probe =
                    std::time::Instant::now() + std::time::Duration::from_millis(backoff_ms);
                fault = Some(f.clone());
                Err(crate::storage_fault::CommitError::Faulted(f))
            }
        };
        report(WriterEvent::Committed { tokens, result });
    }
}

/// Classifies `e` with the data directory's free space as it is now.
fn classify_now(store: &Store, e: &StoreError) -> StorageFault {
    let free = free_space(store.dir()).ok().map(|(free, _)| free);
    classify(e, store.dir(), free)
}

#[cfg(test)]
mod tests;
