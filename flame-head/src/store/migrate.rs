//! Migrations of older stores, run at open inside the open's write transaction, and the
//! records of older schemas that they read.
//!
//! Each older record keeps its schema in its name (`…V5`) and is never changed again: it
//! describes bytes already on disks. Where an older schema shares a part with the current
//! one (a shim, an environment variable, resources, a token's kind), the current record
//! ([`super::records`]) is used; a schema that changes such a part copies the old one
//! here first.

use super::records::{
    ApplicationRecord, CountsRecord, DataStatsRecord, EnvRecord, FinishedRecord, JobRecord,
    PayloadRecord, ResourcesRecord, SessionRecord, SessionStateRecord, ShimRecord, TokenKindRecord,
    TokenRecord, UsageRecord,
};
use super::{
    decode, encode, StoreError, APPS, CERTS, FINISHED, MIGRATION_ROWS_PER_PASS, OWNER_UIDS,
    SESSIONS, TOKENS,
};
use bytes::Bytes;
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `users` a schema 5 application with a fixed identity gets: a name no session owner
/// can have (owners have no spaces), so it admits no one until an admin updates it.
pub const MIGRATED_FIXED_IDENTITY_USER: &str = "(migrated: name its one user)";

/// An application as schema 5 stored it: without `users` and `groups`.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct ApplicationRecordV5 {
    pub(super) name: String,
    pub(super) shim: ShimRecord,
    pub(super) command: String,
    pub(super) args: Vec<String>,
    pub(super) env: BTreeMap<String, EnvRecord>,
    pub(super) working_dir: Option<String>,
    pub(super) user: Option<String>,
    pub(super) group: Option<String>,
    pub(super) resources: ResourcesRecord,
    pub(super) selector: BTreeMap<String, String>,
    pub(super) max_instances: u32,
    pub(super) delay_release_ms: u64,
    pub(super) max_attempts: u32,
    pub(super) retry_on_error: bool,
    pub(super) task_timeout_ms: Option<u64>,
    pub(super) allow_root: bool,
}

/// A token record as schema 5 stored it.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct TokenRecordV5 {
    pub(super) kind: TokenKindRecord,
    pub(super) secret_sha256: [u8; 32],
    pub(super) created_ms: u64,
    pub(super) expires_ms: Option<u64>,
    pub(super) revoked: bool,
}

/// A session as schema 6 stored it: its common data inline bytes only.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct SessionRecordV6 {
    pub(super) id: u64,
    pub(super) application: String,
    pub(super) owner: String,
    pub(super) priority: i32,
    pub(super) common_data: Bytes,
    pub(super) state: SessionStateRecord,
    pub(super) created_ms: u64,
    pub(super) closed_ms: Option<u64>,
    pub(super) last_task: u64,
    pub(super) usage: Vec<UsageRecord>,
    pub(super) job: Option<JobRecord>,
}

impl From<SessionRecordV6> for SessionRecord {
    fn from(v: SessionRecordV6) -> Self {
        let SessionRecordV6 {
            id,
            application,
            owner,
            priority,
            common_data,
            state,
            created_ms,
            closed_ms,
            last_task,
            usage,
            job,
        } = v;
        SessionRecord {
            id,
            application,
            owner,
            priority,
            common_data: PayloadRecord::Inline(common_data),
            state,
            created_ms,
            closed_ms,
            last_task,
            usage,
            job,
        }
    }
}

/// A finished session's view as schemas 6 and 7 stored it: without what its object
/// inputs did.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub(super) struct FinishedRecordV7 {
    pub(super) id: u64,
    pub(super) application: String,
    pub(super) owner: String,
    pub(super) priority: i32,
    pub(super) state: SessionStateRecord,
    pub(super) ephemeral: bool,
    pub(super) counts: CountsRecord,
    pub(super) executors: u32,
    pub(super) created_ms: u64,
    pub(super) closed_ms: Option<u64>,
    pub(super) waiting: Option<String>,
    pub(super) usage: Vec<UsageRecord>,
    pub(super) job: Option<JobRecord>,
}

impl From<FinishedRecordV7> for FinishedRecord {
    fn from(v: FinishedRecordV7) -> Self {
        let FinishedRecordV7 {
            id,
            application,
            owner,
            priority,
            state,
            ephemeral,
            counts,
            executors,
            created_ms,
            closed_ms,
            waiting,
            usage,
            job,
        } = v;
        FinishedRecord {
            id,
            application,
            owner,
            priority,
            state,
            ephemeral,
            counts,
            executors,
            created_ms,
            closed_ms,
            waiting,
            usage,
            job,
            // Never stored before schema 8: the session's objects are not known any more.
            data: DataStatsRecord::default(),
        }
    }
}

/// Schema 7 → 8, inside the open transaction: every finished session's view gains empty
/// object statistics (schema 7 kept them in memory only).
pub(super) fn migrate_7_to_8(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    rewrite_records::<FinishedRecordV7, FinishedRecord>(txn, FINISHED, "finished")
}

/// Schema 6 → 7, inside the open transaction: every session's common data becomes an
/// inline payload (objects did not exist before). Tasks need nothing: schema 7 only
/// appended variants to their records.
pub(super) fn migrate_6_to_7(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    rewrite_records::<SessionRecordV6, SessionRecord>(txn, SESSIONS, "sessions")
}

/// Rewrites every row of a table keyed by id from its old record `Old` to `New`, in key
/// order and in passes of at most [`MIGRATION_ROWS_PER_PASS`] rows: a migration holds a
/// bounded number of records in memory however many the table has (the `finished` table
/// keeps every session the head ever ended).
fn rewrite_records<Old, New>(
    txn: &redb::WriteTransaction,
    table: TableDefinition<u64, &[u8]>,
    name: &'static str,
) -> Result<(), StoreError>
where
    Old: for<'a> Deserialize<'a>,
    New: Serialize + From<Old>,
{
    let mut table = txn.open_table(table)?;
    let mut from = 0u64;
    loop {
        let mut pass = Vec::new();
        for row in table.range(from..)?.take(MIGRATION_ROWS_PER_PASS) {
            let (k, v) = row?;
            let old: Old = decode(name, v.value())?;
            pass.push((k.value(), encode(name, &New::from(old))?));
        }
        for (id, bytes) in &pass {
            table.insert(*id, bytes.as_slice())?;
        }
        match pass.last() {
            Some((last, _)) if pass.len() == MIGRATION_ROWS_PER_PASS => match last.checked_add(1) {
                Some(next) => from = next,
                None => return Ok(()),
            },
            _ => return Ok(()),
        }
    }
}

/// Schema 5 → 6, inside the open transaction: applications gain empty `users` and
/// `groups` (everyone may use them, as before), except that one with a fixed `user` or
/// `group` is kept as it was only for the owner it can serve: none, so it is restricted
/// to nobody's sessions until an admin names its one user (the fixed identity would
/// otherwise be shared between owners). The `owner_uids` table starts empty; owners get
/// their uid at their next launch.
pub(super) fn migrate_5_to_6(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut apps = txn.open_table(APPS)?;
    let mut rewritten = Vec::new();
    for row in apps.iter()? {
        let (k, v) = row?;
        let old: ApplicationRecordV5 = decode("applications", v.value())?;
        let fixed = old.user.is_some() || old.group.is_some();
        let app = ApplicationRecord {
            name: old.name,
            shim: old.shim,
            command: old.command,
            args: old.args,
            env: old.env,
            working_dir: old.working_dir,
            user: old.user,
            group: old.group,
            // A fixed identity serves one owner only (`ApplicationSpec::validate`): until
            // an admin says which, no one's sessions are let in.
            users: if fixed {
                vec![MIGRATED_FIXED_IDENTITY_USER.to_string()]
            } else {
                Vec::new()
            },
            groups: Vec::new(),
            resources: old.resources,
            selector: old.selector,
            max_instances: old.max_instances,
            delay_release_ms: old.delay_release_ms,
            max_attempts: old.max_attempts,
            retry_on_error: old.retry_on_error,
            task_timeout_ms: old.task_timeout_ms,
            allow_root: old.allow_root,
        };
        if fixed {
            tracing::warn!(
                app = %app.name,
                "application with a fixed user or group: restricted to no one until an admin \
                 names its one user (`users = [\"NAME\"]`, flame app update)"
            );
        }
        rewritten.push((k.value().to_string(), encode("applications", &app)?));
    }
    for (name, bytes) in rewritten {
        apps.insert(name.as_str(), bytes.as_slice())?;
    }
    txn.open_table(OWNER_UIDS)?;
    // Tokens gained their uses and the name a join may replace: existing ones keep what
    // they allowed (no limit on uses, no name to replace).
    let mut tokens = txn.open_table(TOKENS)?;
    let mut rewritten = Vec::new();
    for row in tokens.iter()? {
        let (k, v) = row?;
        let old: TokenRecordV5 = decode("tokens", v.value())?;
        let token = TokenRecord {
            kind: old.kind,
            secret_sha256: old.secret_sha256,
            created_ms: old.created_ms,
            expires_ms: old.expires_ms,
            revoked: old.revoked,
            uses_max: None,
            uses: 0,
            replace: None,
        };
        rewritten.push((k.value().to_string(), encode("tokens", &token)?));
    }
    for (id, bytes) in rewritten {
        tokens.insert(id.as_str(), bytes.as_slice())?;
    }
    txn.open_table(CERTS)?;
    Ok(())
}
