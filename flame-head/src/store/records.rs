//! The records the store writes: the on-disk format of schema
//! [`super::SCHEMA_VERSION`] (8), kept apart from the wire types.
//!
//! The head's in-memory and wire types ([`ApplicationSpec`], [`SessionInfo`], the store's
//! own [`StoredSession`], …) are converted into these records on the way to the disk and
//! back on the way out, inside the store. A change to a wire type therefore no longer
//! changes the file: the conversions (`records/convert.rs`) stop compiling (they
//! destructure every field) and whoever changes the wire type decides there what the store
//! keeps.
//!
//! **Changing a record is a schema change.** Postcard writes fields in declaration order
//! with no names or tags, and enum variants by their index: adding, removing, reordering or
//! retyping a field, or reordering variants, makes every existing store unreadable. Such a
//! change needs [`super::SCHEMA_VERSION`] bumped, the old record kept (renamed with its
//! version, as [`super::migrate`] keeps schema 5's) and a migration at open. The test
//! `records_keep_the_schema_6_layout` pins the bytes of a sample of every record.
//!
//! Schema 6 wrote the wire types themselves; each record here reproduces the layout of the
//! type it replaces exactly (the test `records_read_and_write_what_schema_6_stored` checks
//! this both ways), so stores written before the records existed read without a migration.
//!
//! Schema 7 (objects, issue 20): a session's common data became a [`PayloadRecord`]
//! (inline bytes or an object), so [`SessionRecord`] changed and schema 6's is kept as
//! `SessionRecordV6` in [`super::migrate`], whose `migrate_6_to_7` rewrites the sessions
//! table. Tasks did not need a migration: [`TaskRecord::PendingObject`] and
//! [`OutcomeRecord::Object`] are variants appended at the end of their enums, and postcard
//! writes a variant by its index, so every schema 6 task record reads as it was (the test
//! `records_keep_the_schema_6_layout` still pins those bytes).
//!
//! Schema 8: a finished session's view keeps what its object inputs did
//! ([`DataStatsRecord`]); before, `flame session info` on a closed session said no task
//! had an object input. Schema 7's view is kept as `FinishedRecordV7` in
//! [`super::migrate`], whose `migrate_7_to_8` rewrites the `finished` table with empty
//! statistics (they were never stored).
//!
//! | table          | record                   | in memory / on the wire            |
//! |----------------|--------------------------|------------------------------------|
//! | `applications` | [`ApplicationRecord`]    | [`ApplicationSpec`]                |
//! | `sessions`     | [`SessionRecord`]        | [`StoredSession`]                  |
//! | `tasks`        | [`TaskRecord`]           | [`StoredTask`]                     |
//! | `nodes`        | [`NodeRecord`]           | [`StoredNode`]                     |
//! | `finished`     | [`FinishedRecord`]       | [`SessionInfo`]                    |
//! | `tokens`       | [`TokenRecord`]          | [`StoredToken`]                    |
//! | `certificates` | [`CertificateRecord`]    | [`StoredCert`]                     |
//!
//! The other tables hold plain integers and strings in redb's own encoding.
//!
//! [`ApplicationSpec`]: flame_protocol::model::ApplicationSpec
//! [`SessionInfo`]: flame_protocol::model::SessionInfo
//! [`StoredSession`]: super::StoredSession
//! [`StoredTask`]: super::StoredTask
//! [`StoredNode`]: super::StoredNode
//! [`StoredToken`]: crate::auth::StoredToken
//! [`StoredCert`]: crate::certs::StoredCert

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A registered application (table `applications`, keyed by its name); from
/// `ApplicationSpec`. Schema 6 layout: changing it needs a schema bump and a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplicationRecord {
    pub name: String,
    pub shim: ShimRecord,
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, EnvRecord>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub users: Vec<String>,
    pub groups: Vec<String>,
    pub resources: ResourcesRecord,
    pub selector: BTreeMap<String, String>,
    pub max_instances: u32,
    pub delay_release_ms: u64,
    pub max_attempts: u32,
    pub retry_on_error: bool,
    pub task_timeout_ms: Option<u64>,
    pub allow_root: bool,
}

/// An application's shim; from `ShimKind`. Schema 6 layout (variants by index): changing
/// it needs a schema bump and a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShimRecord {
    Stdio,
    Unix,
    Batch,
}

/// One environment variable of an application; from `EnvValue`. Schema 6 layout:
/// changing it needs a schema bump and a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvRecord {
    pub value: String,
    pub secret: bool,
}

/// What one executor needs; from `Resources`. Schema 6 layout: changing it needs a
/// schema bump and a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourcesRecord {
    pub cpu_millis: u32,
    pub memory_bytes: Option<u64>,
    pub gpus: u32,
}

/// A session the head holds (table `sessions`, keyed by its id); from `StoredSession`.
/// Schema 7 layout (schema 6's, `SessionRecordV6`, had `common_data: Bytes`): changing it
/// needs a schema bump and a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: u64,
    pub application: String,
    pub owner: String,
    pub priority: i32,
    pub common_data: PayloadRecord,
    pub state: SessionStateRecord,
    pub created_ms: u64,
    pub closed_ms: Option<u64>,
    pub last_task: u64,
    pub usage: Vec<UsageRecord>,
    pub job: Option<JobRecord>,
}

/// Bytes inline or an object's reference; from `Payload`. Schema 7 layout (variants by
/// index): changing it needs a schema bump and a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayloadRecord {
    Inline(Bytes),
    Object(ObjectRefRecord),
}

/// An object's id (the BLAKE3 hash of its bytes) and size; from `ObjectRef`. Schema 7
/// layout: changing it needs a schema bump and a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRefRecord {
    pub id: [u8; 32],
    pub size: u64,
}

/// Open or closed; from `SessionState`. Schema 6 layout (variants by index): changing it
/// needs a schema bump and a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionStateRecord {
    Open,
    Closed,
}

/// What one executor used while bound to a session; from `ExecutorUsage`. Schema 6
/// layout: changing it needs a schema bump and a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub executor: u64,
    pub node: String,
    pub bound_ms: u64,
    pub cpu_ms: u64,
    pub memory_peak_bytes: u64,
    pub throttled_ms: u64,
    pub ended: Option<String>,
}

/// A batch job's spec and progress; from `JobInfo`. Schema 6 layout: changing it needs a
/// schema bump and a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub spec: JobSpecRecord,
    pub state: JobStateRecord,
    pub started_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    pub ranks: Vec<RankRecord>,
    pub failure: Option<JobFailureRecord>,
}

/// What a batch job runs; from `JobSpec`. Schema 6 layout: changing it needs a schema
/// bump and a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpecRecord {
    pub name: String,
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<String>,
    pub ranks: u32,
    pub ranks_per_node: Option<u32>,
    pub resources: ResourcesRecord,
    pub time_limit_ms: Option<u64>,
    pub mpi: bool,
}

/// A batch job's state; from `JobState`. Schema 6 layout (variants by index): changing it
/// needs a schema bump and a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobStateRecord {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
}

/// Where one rank of a job ran; from `RankInfo`. Schema 6 layout: changing it needs a
/// schema bump and a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankRecord {
    pub rank: u32,
    pub node: String,
    pub executor: u64,
    pub local_rank: u32,
    pub exit_code: Option<i32>,
}

/// The first rank that failed; from `JobFailure`. Schema 6 layout: changing it needs a
/// schema bump and a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFailureRecord {
    pub rank: Option<u32>,
    pub exit_code: Option<i32>,
    pub message: String,
}

/// A task (table `tasks`, keyed by session and task id); from `StoredTask`. Schema 6
/// layout, with `PendingObject` appended in schema 7 (old records read unchanged):
/// changing or reordering a variant needs a schema bump and a migration; a new one goes
/// at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskRecord {
    /// A pending task whose input is inline.
    Pending { attempt: u32, input: Bytes },
    Final {
        attempt: u32,
        outcome: OutcomeRecord,
    },
    /// A pending task whose input is an object (schema 7).
    PendingObject {
        attempt: u32,
        input: ObjectRefRecord,
    },
}

/// A task's final outcome; from `TaskOutcome`. Schema 6 layout (variants by index), with
/// `Object` appended in schema 7: changing or reordering a variant needs a schema bump
/// and a migration; a new one goes at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutcomeRecord {
    Succeeded(Bytes),
    Failed(String),
    Cancelled,
    /// The output is an object a node kept (schema 7).
    Object(ObjectRefRecord),
}

/// A node that registered (table `nodes`, keyed by its name); from `StoredNode`. Schema 6
/// layout: changing it needs a schema bump and a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub allocatable: NodeResourcesRecord,
    pub labels: BTreeMap<String, String>,
    pub isolation: flame_protocol::model::Isolation,
    pub last_seen_ms: u64,
    pub draining: bool,
}

/// What a node offers; from `NodeResources`. Schema 6 layout: changing it needs a schema
/// bump and a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeResourcesRecord {
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    pub gpus: Vec<GpuRecord>,
}

/// One GPU of a node; from `GpuInfo`. Schema 6 layout: changing it needs a schema bump
/// and a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuRecord {
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub memory_bytes: u64,
}

/// A finished session's final view (table `finished`, keyed by its id); from
/// `SessionInfo`. Schema 8 layout (schema 7's, [`super::migrate::FinishedRecordV7`], had
/// no `data`): changing it needs a schema bump and a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FinishedRecord {
    pub id: u64,
    pub application: String,
    pub owner: String,
    pub priority: i32,
    pub state: SessionStateRecord,
    pub ephemeral: bool,
    pub counts: CountsRecord,
    pub executors: u32,
    pub created_ms: u64,
    pub closed_ms: Option<u64>,
    pub waiting: Option<String>,
    pub usage: Vec<UsageRecord>,
    pub job: Option<JobRecord>,
    pub data: DataStatsRecord,
}

/// What a session's object inputs did (locality hits, bytes fetched and read in place);
/// from `DataStats`. Schema 8 layout: changing it needs a schema bump and a migration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataStatsRecord {
    pub object_tasks: u64,
    pub local_tasks: u64,
    pub fetched_bytes: u64,
    pub local_bytes: u64,
}

/// A session's task counters; from `TaskCounts`. Schema 6 layout: changing it needs a
/// schema bump and a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountsRecord {
    pub pending: u64,
    pub running: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
}

/// A token (table `tokens`, keyed by its id): the digest of its secret, never the secret;
/// from `StoredToken`. Schema 6 layout: changing it needs a schema bump and a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub kind: TokenKindRecord,
    pub secret_sha256: [u8; 32],
    pub created_ms: u64,
    pub expires_ms: Option<u64>,
    pub revoked: bool,
    pub uses_max: Option<u32>,
    pub uses: u32,
    pub replace: Option<String>,
}

/// What a token lets its holder be; from `TokenKind`. Schema 6 layout (variants by
/// index): changing it needs a schema bump and a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenKindRecord {
    Node,
    User { name: String, admin: bool },
}

/// A revoked certificate or a node's certificate (table `certificates`, keyed as
/// [`crate::certs::record_key`] says); from `StoredCert`. Schema 6 layout: changing it
/// needs a schema bump and a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CertificateRecord {
    Revoked {
        serial: Option<String>,
        fingerprint: Option<String>,
        holder: Option<String>,
        revoked_ms: u64,
    },
    Node {
        fingerprint: String,
        issued_ms: u64,
        revoked_ms: Option<u64>,
    },
}

mod convert;

#[cfg(test)]
mod tests;
