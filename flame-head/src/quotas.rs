//! Per-owner quotas: how much of the head one user may hold, so that no authenticated user
//! can exhaust it for the others.
//!
//! [`Quotas`] names every per-user bound and its default; head.toml sets them for everyone
//! (`[quotas]`) and per owner (`[quotas.owners.NAME]`), and `--quota` / `--owner-quota` on
//! the command line win over the file. [`Ledger`] is the core's account of what each owner
//! holds in the head's memory (sessions, tasks and bytes); the server counts connections
//! and streams itself. A refusal is a [`QuotaExceeded`], which names the quota, its limit
//! and what the owner holds, and travels as `ErrorKind::QuotaExceeded`.
//!
//! The defaults are sized for a 2-core head with a few GiB of memory shared by tens of
//! users. What one owner can make the head hold is at most about
//! `input_bytes` (task inputs, kept outputs, common data)
//! + `pending_tasks` × ~100 bytes (the core's per-task bookkeeping)
//! + `connections` × `server::CLIENT_RECEIVE_WINDOW` (QUIC buffers)
//! + `submit_bytes_in_flight` (submit batches read and not yet acked)
//!
//! about 0.75 GiB with the defaults, only with the bytes really sent; plus the watch queues,
//! `watch::WATCH_QUEUE_BYTES_MAX` each at most, whose result bytes are shared by every
//! watcher of a session.

use flame_protocol::model::{ApiError, ErrorKind};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};

/// Default of [`Quotas::open_sessions`]. An open session without tasks costs the head a
/// few KiB (its tasks and bytes count against their own quotas), and real workloads open
/// many at once (`flame bench`'s `sessions` case opens 100), so this bounds the count, not
/// the memory.
pub const OPEN_SESSIONS_DEFAULT: u64 = 1_024;
/// Default of [`Quotas::pending_tasks`]: ~100 MB of the core's bookkeeping at most.
pub const PENDING_TASKS_DEFAULT: u64 = 1_000_000;
/// Default of [`Quotas::input_bytes`].
pub const INPUT_BYTES_DEFAULT: u64 = 256 * 1024 * 1024;
/// Default of [`Quotas::connections`].
pub const CONNECTIONS_DEFAULT: u64 = 16;
/// Default of [`Quotas::streams_per_connection`]: a `flame` command uses a handful; a
/// program of the client library one per session it submits to or watches, plus one per
/// request in flight (`flame bench`'s `sessions` case holds 200 on one connection: a
/// submit stream and a watch for each of 100 sessions). The connection's 16 MiB receive
/// window bounds what they hold.
pub const STREAMS_PER_CONNECTION_DEFAULT: u64 = 512;
/// Default of [`Quotas::submit_bytes_in_flight`]: two of the largest frames.
pub const SUBMIT_BYTES_IN_FLIGHT_DEFAULT: u64 = 128 * 1024 * 1024;

/// Largest value any quota may be set to (the config's sanity bound, not a default).
pub const QUOTA_VALUE_MAX: u64 = 1 << 50;

/// One owner's quotas. Every field is a count or a size of what the owner holds at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Sessions created and not yet out of the head's memory: open ones, closed ones with
    /// unfinished tasks, and finished ephemeral ones for [`crate::core::EPHEMERAL_KEPT_MS`].
    pub open_sessions: u64,
    /// Tasks held in memory: every task not yet final, and every task of an ephemeral
    /// session (it has no store; its results stay in memory with it).
    pub pending_tasks: u64,
    /// Bytes held in memory: inputs of tasks not yet final, sessions' common data, the
    /// kept outcomes of ephemeral sessions and failure messages of live sessions.
    pub input_bytes: u64,
    /// Connections open at once (every `flame` command and client program holds one).
    pub connections: u64,
    /// Streams open at once on one connection (requests, submit streams, watches, logs).
    pub streams_per_connection: u64,
    /// Bytes of submit batches read by the head and not yet acknowledged, over all the
    /// owner's submit streams; past it the head reads no more (backpressure), so what a
    /// submit stream holds is what the head admits, not what the peer sends.
    pub submit_bytes_in_flight: u64,
    /// Objects the head's object book keeps for the owner (put, outputs of its tasks, and
    /// copies nodes report), lost ones included until they are removed or their session
    /// ends.
    pub objects: u64,
    /// Bytes of those objects in the nodes' caches, one copy counted per object.
    pub object_bytes: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            open_sessions: OPEN_SESSIONS_DEFAULT,
            pending_tasks: PENDING_TASKS_DEFAULT,
            input_bytes: INPUT_BYTES_DEFAULT,
            connections: CONNECTIONS_DEFAULT,
            streams_per_connection: STREAMS_PER_CONNECTION_DEFAULT,
            submit_bytes_in_flight: SUBMIT_BYTES_IN_FLIGHT_DEFAULT,
            objects: flame_protocol::limits::OWNER_OBJECTS_MAX,
            object_bytes: flame_protocol::limits::OWNER_OBJECT_BYTES_MAX,
        }
    }
}

/// A quota, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quota {
    OpenSessions,
    PendingTasks,
    InputBytes,
    Connections,
    StreamsPerConnection,
    SubmitBytesInFlight,
    Objects,
    ObjectBytes,
}

impl Quota {
    /// Every quota, in the order the docs list them.
    pub const ALL: [Quota; 8] = [
        Quota::OpenSessions,
        Quota::PendingTasks,
        Quota::InputBytes,
        Quota::Connections,
        Quota::StreamsPerConnection,
        Quota::SubmitBytesInFlight,
        Quota::Objects,
        Quota::ObjectBytes,
    ];

    /// Its key in head.toml and on the command line.
    pub fn key(self) -> &'static str {
        match self {
            Quota::OpenSessions => "open_sessions",
            Quota::PendingTasks => "pending_tasks",
            Quota::InputBytes => "input_bytes",
            Quota::Connections => "connections",
            Quota::StreamsPerConnection => "streams_per_connection",
            Quota::SubmitBytesInFlight => "submit_bytes_in_flight",
            Quota::Objects => "objects",
            Quota::ObjectBytes => "object_bytes",
        }
    }

    /// What it counts, for messages.
    fn what(self) -> &'static str {
        match self {
            Quota::OpenSessions => "open sessions",
            Quota::PendingTasks => "pending tasks",
            Quota::InputBytes => "bytes held in the head's memory",
            Quota::Connections => "connections",
            Quota::StreamsPerConnection => "streams on this connection",
            Quota::SubmitBytesInFlight => "unacknowledged submit bytes",
            Quota::Objects => "objects",
            Quota::ObjectBytes => "object bytes in the nodes' caches",
        }
    }

    /// What the owner can do about it, for messages.
    fn remedy(self) -> &'static str {
        match self {
            Quota::OpenSessions => "close sessions and let them finish",
            Quota::PendingTasks | Quota::InputBytes => {
                "wait for tasks to finish, close finished ephemeral sessions, cancel sessions"
            }
            Quota::Connections => "close connections",
            Quota::StreamsPerConnection => "wait for requests on this connection to end",
            Quota::SubmitBytesInFlight => "wait for acknowledgements",
            Quota::Objects | Quota::ObjectBytes => {
                "remove objects (`flame object remove`) or let their sessions end"
            }
        }
    }

    fn get(self, q: &Quotas) -> u64 {
        match self {
            Quota::OpenSessions => q.open_sessions,
            Quota::PendingTasks => q.pending_tasks,
            Quota::InputBytes => q.input_bytes,
            Quota::Connections => q.connections,
            Quota::StreamsPerConnection => q.streams_per_connection,
            Quota::SubmitBytesInFlight => q.submit_bytes_in_flight,
            Quota::Objects => q.objects,
            Quota::ObjectBytes => q.object_bytes,
        }
    }

    fn set(self, q: &mut Quotas, value: u64) {
        let field = match self {
            Quota::OpenSessions => &mut q.open_sessions,
            Quota::PendingTasks => &mut q.pending_tasks,
            Quota::InputBytes => &mut q.input_bytes,
            Quota::Connections => &mut q.connections,
            Quota::StreamsPerConnection => &mut q.streams_per_connection,
            Quota::SubmitBytesInFlight => &mut q.submit_bytes_in_flight,
            Quota::Objects => &mut q.objects,
            Quota::ObjectBytes => &mut q.object_bytes,
        };
        *field = value;
    }

    fn from_key(key: &str) -> Option<Quota> {
        Quota::ALL.into_iter().find(|q| q.key() == key)
    }
}

/// A refusal: `owner` holds `held` of `quota`, whose limit is `limit`, and the request
/// would add `adding`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "quota exceeded: {what} {held} of {limit} for owner {owner}{adds}; {remedy}, or ask an \
     admin to raise quotas.{key}",
    what = quota.what(),
    adds = if *adding > 1 { format!(" (this request adds {adding})") } else { String::new() },
    remedy = quota.remedy(),
    key = quota.key()
)]
pub struct QuotaExceeded {
    pub quota: Quota,
    pub owner: String,
    pub limit: u64,
    pub held: u64,
    pub adding: u64,
}

impl From<QuotaExceeded> for ApiError {
    fn from(e: QuotaExceeded) -> ApiError {
        ApiError::new(ErrorKind::QuotaExceeded, e.to_string())
    }
}

/// Checks that `owner`, holding `held` of `quota`, may take `adding` more.
pub fn check(
    quotas: &Quotas,
    quota: Quota,
    owner: &str,
    held: u64,
    adding: u64,
) -> Result<(), QuotaExceeded> {
    let limit = quota.get(quotas);
    if held.saturating_add(adding) > limit {
        return Err(QuotaExceeded {
            quota,
            owner: owner.to_string(),
            limit,
            held,
            adding,
        });
    }
    Ok(())
}

/// Quotas of every owner: the defaults and the owners that differ.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QuotaBook {
    default: Quotas,
    owners: BTreeMap<String, Quotas>,
}

impl QuotaBook {
    /// Everyone gets `default` (tests).
    #[cfg(test)]
    pub fn uniform(default: Quotas) -> QuotaBook {
        QuotaBook {
            default,
            owners: BTreeMap::new(),
        }
    }

    /// `owner`'s quotas.
    pub fn of(&self, owner: &str) -> &Quotas {
        self.owners.get(owner).unwrap_or(&self.default)
    }

    /// Builds the book from the file's `[quotas]` section and the flags: `--quota
    /// KEY=VALUE` over the file's defaults, `--owner-quota OWNER.KEY=VALUE` over the
    /// file's `[quotas.owners.OWNER]`; an owner's unset keys come from the defaults.
    pub fn resolve(
        file: &FileQuotas,
        flags: &[(String, u64)],
        owner_flags: &[(String, String, u64)],
    ) -> Result<QuotaBook, String> {
        let mut default = Quotas::default();
        apply(&mut default, &file.defaults, "[quotas]")?;
        for (key, value) in flags {
            set_named(&mut default, key, *value, "--quota")?;
        }
        let mut owners = BTreeMap::new();
        for (owner, partial) in &file.owners {
            let mut q = default;
            apply(&mut q, partial, &format!("[quotas.owners.{owner}]"))?;
            owners.insert(owner.clone(), q);
        }
        for (owner, key, value) in owner_flags {
            let q = owners.entry(owner.clone()).or_insert(default);
            set_named(q, key, *value, "--owner-quota")?;
        }
        Ok(QuotaBook { default, owners })
    }
}

fn apply(q: &mut Quotas, partial: &BTreeMap<String, u64>, place: &str) -> Result<(), String> {
    for (key, value) in partial {
        set_named(q, key, *value, place)?;
    }
    Ok(())
}

fn set_named(q: &mut Quotas, key: &str, value: u64, place: &str) -> Result<(), String> {
    let quota = Quota::from_key(key).ok_or_else(|| {
        let known: Vec<&str> = Quota::ALL.iter().map(|q| q.key()).collect();
        format!(
            "{place}: unknown quota `{key}`; the quotas are {}",
            known.join(", ")
        )
    })?;
    if value == 0 || value > QUOTA_VALUE_MAX {
        return Err(format!(
            "{place}: quota {key} = {value} must be between 1 and {QUOTA_VALUE_MAX}"
        ));
    }
    quota.set(q, value);
    Ok(())
}

/// The `[quotas]` section of head.toml: the defaults' keys, and `[quotas.owners.NAME]`
/// tables with the keys that differ for that owner.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct FileQuotas {
    #[serde(default)]
    pub owners: BTreeMap<String, BTreeMap<String, u64>>,
    #[serde(flatten)]
    pub defaults: BTreeMap<String, u64>,
}

/// Parses `KEY=VALUE` (`--quota`).
pub fn parse_quota_flag(text: &str) -> Result<(String, u64), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}` is not KEY=VALUE, e.g. open_sessions=128"))?;
    let value = value.parse::<u64>().map_err(|e| format!("`{text}`: {e}"))?;
    Ok((key.to_string(), value))
}

/// Parses `OWNER.KEY=VALUE` (`--owner-quota`).
pub fn parse_owner_quota_flag(text: &str) -> Result<(String, String, u64), String> {
    let (name, value) = parse_quota_flag(text)?;
    let (owner, key) = name
        .rsplit_once('.')
        .ok_or_else(|| format!("`{text}` is not OWNER.KEY=VALUE, e.g. bob.open_sessions=128"))?;
    if owner.is_empty() {
        return Err(format!("`{text}`: the owner name is empty"));
    }
    Ok((owner.to_string(), key.to_string(), value))
}

/// What one owner holds in the core's memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    pub sessions: u64,
    pub tasks: u64,
    pub bytes: u64,
}

impl Held {
    pub fn is_zero(&self) -> bool {
        *self == Held::default()
    }
}

/// The core's account of what each owner holds. Owners holding nothing have no entry, so
/// it is as large as the set of active owners.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    owners: HashMap<String, Held>,
}

impl Ledger {
    pub fn held(&self, owner: &str) -> Held {
        self.owners.get(owner).copied().unwrap_or_default()
    }

    /// Whether `owner` may take `adding` more under `quotas`: sessions, tasks, then bytes.
    pub fn check(&self, quotas: &Quotas, owner: &str, adding: Held) -> Result<(), QuotaExceeded> {
        let held = self.held(owner);
        if adding.sessions > 0 {
            check(
                quotas,
                Quota::OpenSessions,
                owner,
                held.sessions,
                adding.sessions,
            )?;
        }
        if adding.tasks > 0 {
            check(quotas, Quota::PendingTasks, owner, held.tasks, adding.tasks)?;
        }
        if adding.bytes > 0 {
            check(quotas, Quota::InputBytes, owner, held.bytes, adding.bytes)?;
        }
        Ok(())
    }

    pub fn charge(&mut self, owner: &str, add: Held) {
        if add.is_zero() {
            return;
        }
        let h = self.owners.entry(owner.to_string()).or_default();
        h.sessions = h.sessions.saturating_add(add.sessions);
        h.tasks = h.tasks.saturating_add(add.tasks);
        h.bytes = h.bytes.saturating_add(add.bytes);
    }

    pub fn release(&mut self, owner: &str, sub: Held) {
        if sub.is_zero() {
            return;
        }
        let Some(h) = self.owners.get_mut(owner) else {
            return;
        };
        h.sessions = h.sessions.saturating_sub(sub.sessions);
        h.tasks = h.tasks.saturating_sub(sub.tasks);
        h.bytes = h.bytes.saturating_sub(sub.bytes);
        if h.is_zero() {
            self.owners.remove(owner);
        }
    }

    /// Every owner's holdings, sorted, for checks.
    #[cfg(test)]
    pub fn all(&self) -> BTreeMap<String, Held> {
        self.owners.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_the_quota_the_limit_and_what_is_held() {
        let quotas = Quotas {
            open_sessions: 2,
            ..Quotas::default()
        };
        let mut ledger = Ledger::default();
        let one = Held {
            sessions: 1,
            ..Held::default()
        };
        ledger.check(&quotas, "bob", one).unwrap();
        ledger.charge("bob", one);
        ledger.charge("bob", one);
        let err = ledger.check(&quotas, "bob", one).unwrap_err();
        assert_eq!(
            err.to_string(),
            "quota exceeded: open sessions 2 of 2 for owner bob; close sessions and let them \
             finish, or ask an admin to raise quotas.open_sessions"
        );
        assert_eq!(ApiError::from(err).kind, ErrorKind::QuotaExceeded);
        // Another owner is not affected.
        ledger.check(&quotas, "alice", one).unwrap();
        ledger.release("bob", one);
        ledger.check(&quotas, "bob", one).unwrap();
    }

    #[test]
    fn tasks_and_bytes_are_checked_with_what_a_request_adds() {
        let quotas = Quotas {
            pending_tasks: 100,
            input_bytes: 1000,
            ..Quotas::default()
        };
        let mut ledger = Ledger::default();
        ledger.charge(
            "bob",
            Held {
                sessions: 1,
                tasks: 90,
                bytes: 900,
            },
        );
        let batch = |tasks, bytes| Held {
            sessions: 0,
            tasks,
            bytes,
        };
        ledger.check(&quotas, "bob", batch(10, 100)).unwrap();
        let err = ledger.check(&quotas, "bob", batch(11, 1)).unwrap_err();
        assert_eq!(err.quota, Quota::PendingTasks);
        assert!(
            err.to_string()
                .contains("pending tasks 90 of 100 for owner bob (this request adds 11)"),
            "{err}"
        );
        let err = ledger.check(&quotas, "bob", batch(1, 101)).unwrap_err();
        assert_eq!(err.quota, Quota::InputBytes);
        assert!(err.to_string().contains("quotas.input_bytes"), "{err}");
        // Released to nothing, the owner's entry goes.
        ledger.release(
            "bob",
            Held {
                sessions: 1,
                tasks: 90,
                bytes: 900,
            },
        );
        assert!(ledger.all().is_empty());
    }

    #[test]
    fn the_packaged_head_toml_shows_the_defaults() {
        // Its `[quotas]` section lists every quota, commented out, with its default.
        let text = include_str!("../../packaging/head.toml");
        let section = text
            .split_once("\n[quotas]\n")
            .map(|(_, rest)| rest)
            .expect("head.toml has a [quotas] section");
        let mut shown = BTreeMap::new();
        for line in section
            .lines()
            .take_while(|l| !l.contains("[quotas.owners."))
        {
            if let Some((key, value)) = line.trim_start_matches("# ").split_once(" = ") {
                shown.insert(key.to_string(), value.parse::<u64>().unwrap());
            }
        }
        assert_eq!(shown.len(), Quota::ALL.len(), "{shown:?}");
        let file = FileQuotas {
            owners: BTreeMap::new(),
            defaults: shown,
        };
        assert_eq!(
            QuotaBook::resolve(&file, &[], &[]).unwrap(),
            QuotaBook::uniform(Quotas::default())
        );
    }

    #[test]
    fn the_book_takes_defaults_owners_and_flags_in_that_order() {
        let file: FileQuotas = toml::from_str(
            "open_sessions = 10\npending_tasks = 500\n[owners.bob]\nopen_sessions = 3\n",
        )
        .unwrap();
        let book = QuotaBook::resolve(
            &file,
            &[("pending_tasks".into(), 700)],
            &[("carol".into(), "connections".into(), 2)],
        )
        .unwrap();
        assert_eq!(book.of("alice").open_sessions, 10);
        assert_eq!(book.of("alice").pending_tasks, 700);
        assert_eq!(book.of("alice").connections, CONNECTIONS_DEFAULT);
        assert_eq!(book.of("bob").open_sessions, 3);
        assert_eq!(book.of("bob").pending_tasks, 700);
        assert_eq!(book.of("carol").connections, 2);
        assert_eq!(book.of("carol").open_sessions, 10);
        let bad: FileQuotas = toml::from_str("open_sesions = 1\n").unwrap();
        let err = QuotaBook::resolve(&bad, &[], &[]).unwrap_err();
        assert!(err.contains("unknown quota `open_sesions`"), "{err}");
        let zero: FileQuotas = toml::from_str("[owners.bob]\nconnections = 0\n").unwrap();
        let err = QuotaBook::resolve(&zero, &[], &[]).unwrap_err();
        assert!(err.contains("[quotas.owners.bob]"), "{err}");
        assert_eq!(
            parse_owner_quota_flag("a.b.open_sessions=4").unwrap(),
            ("a.b".into(), "open_sessions".into(), 4)
        );
        assert!(parse_owner_quota_flag("open_sessions=4").is_err());
        assert!(parse_quota_flag("open_sessions").is_err());
    }
}
