//! Model types shared by the head, the nodes and clients.

use crate::ids::{ExecutorId, SessionId, TaskId};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How the node talks to an application process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ShimKind {
    /// Frames over the process's stdin and stdout (see `docs/shim-protocol.md`).
    #[default]
    Stdio,
    /// Frames over a Unix stream socket the application listens on, at the path the node
    /// gives it in `FLAME_SHIM_SOCKET`; stdout and stderr go to the executor's log.
    Unix,
    /// No shim: the executor is one rank of a batch job and runs the job's command once,
    /// to completion, with the rank's environment; stdout and stderr go to the executor's
    /// log. Only the head makes such executors (`flame submit`); an application cannot be
    /// registered with it.
    Batch,
}

impl std::fmt::Display for ShimKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ShimKind::Stdio => "stdio",
            ShimKind::Unix => "unix",
            ShimKind::Batch => "batch",
        })
    }
}

/// One environment variable of an application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvValue {
    pub value: String,
    /// Stored by the head and handed to nodes, but never shown to clients: the head
    /// blanks the value in every answer.
    pub secret: bool,
}

impl EnvValue {
    /// A variable that may be shown.
    pub fn plain(value: impl Into<String>) -> Self {
        EnvValue {
            value: value.into(),
            secret: false,
        }
    }
}

/// What one executor of an application needs from its node; the node enforces it with a
/// cgroup (cpu quota, memory limit) and the scheduler places by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Thousandths of a cpu: 500 is half a cpu.
    pub cpu_millis: u32,
    /// Memory limit; `None`: no limit, and none reserved on the node.
    pub memory_bytes: Option<u64>,
    /// Whole GPUs, given to the executor through `CUDA_VISIBLE_DEVICES`.
    pub gpus: u32,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            cpu_millis: 1000,
            memory_bytes: None,
            gpus: 0,
        }
    }
}

impl std::fmt::Display for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cpus {}", format_cpus(self.cpu_millis))?;
        if let Some(m) = self.memory_bytes {
            write!(f, ", memory {}", format_bytes(m))?;
        }
        if self.gpus > 0 {
            write!(f, ", gpus {}", self.gpus)?;
        }
        Ok(())
    }
}

/// `1500` → `1.5`.
pub fn format_cpus(cpu_millis: u32) -> String {
    if cpu_millis % 1000 == 0 {
        (cpu_millis / 1000).to_string()
    } else {
        let s = format!("{}.{:03}", cpu_millis / 1000, cpu_millis % 1000);
        s.trim_end_matches('0').to_string()
    }
}

/// Bytes in binary units, e.g. `64 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Smallest cpu share an executor may ask for (a 1 ms quota per 100 ms period).
pub const APP_CPU_MILLIS_MIN: u32 = 10;
/// Largest cpu count an executor may ask for.
pub const APP_CPU_MILLIS_MAX: u32 = 1024 * 1000;
/// Smallest memory limit accepted (below this an application cannot start).
pub const APP_MEMORY_BYTES_MIN: u64 = 4 * 1024 * 1024;
/// Most GPUs one executor may ask for.
pub const APP_GPUS_MAX: u32 = 64;
/// Most selector labels in a spec, and most labels on a node.
pub const LABELS_MAX: usize = 64;
/// Longest label key or value.
pub const LABEL_BYTES_MAX: usize = 63;

/// A registered program: what the node starts as an executor, and the limits the scheduler
/// applies to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplicationSpec {
    /// Unique name, `[a-z0-9][a-z0-9_-]*`, at most [`APP_NAME_BYTES_MAX`] bytes.
    pub name: String,
    pub shim: ShimKind,
    /// Program to execute. A bare name is looked up in the node's `PATH`.
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, EnvValue>,
    pub working_dir: Option<String>,
    /// Unix user the executor runs as; `None`: the identity the node's mode gives the
    /// session's owner (see [`ExecutorIdentity`]). Accepted only with `users` naming exactly
    /// one owner and no `groups`, so that two owners never share a Unix identity through it.
    pub user: Option<String>,
    /// Unix group; `None`: the user's primary group. Same rule as `user`.
    pub group: Option<String>,
    /// Flame users who may open sessions of it; with `groups`, empty for everyone.
    pub users: Vec<String>,
    /// Groups (the head's `[groups]` table) whose members may open sessions of it.
    pub groups: Vec<String>,
    /// What each executor needs and is limited to.
    pub resources: Resources,
    /// Only nodes carrying all these labels run executors of this application.
    pub selector: BTreeMap<String, String>,
    /// Most executors of this application alive at once, cluster-wide.
    pub max_instances: u32,
    /// How long an idle executor is kept for reuse before it is released.
    pub delay_release_ms: u64,
    /// Attempts a task gets when its executor crashes or is lost (and, with
    /// `retry_on_error`, when the application reports an error) before it is Failed.
    pub max_attempts: u32,
    /// Retry a task the application reported an error for, like a crash.
    pub retry_on_error: bool,
    /// A task running longer is treated as a hung executor: the node kills it, and the
    /// task is retried like after a crash. `None`: no limit.
    pub task_timeout_ms: Option<u64>,
    /// The executors may run as root. Both this and the node's configuration
    /// (`--allow-root-executors`) must allow it; otherwise a node refuses to start an
    /// executor whose user is root.
    pub allow_root: bool,
}

/// Most names in an application's `users`, and in its `groups`.
pub const APP_ACCESS_NAMES_MAX: usize = 1024;

/// A user or group name in an access list: what a session owner may be (at most
/// [`APP_NAME_BYTES_MAX`] printable bytes without spaces).
pub fn validate_principal_name(field: &'static str, name: &str) -> Result<(), SpecError> {
    if name.is_empty()
        || name.len() > APP_NAME_BYTES_MAX
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(SpecError::new(
            field,
            format!("`{name}` must be 1 to {APP_NAME_BYTES_MAX} printable bytes without spaces"),
        ));
    }
    Ok(())
}

/// Who a node runs its executors as, as it reports at registration and `flame node list`
/// shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecutorIdentity {
    /// Each owner's executors run as the owner's uid (and gid) from the head's reserved
    /// range, the same on every node, with no passwd entry (the default).
    OwnerUid,
    /// Each owner's executors run as the Unix user of the owner's name; a launch fails
    /// when there is none.
    SiteUser,
    /// Every owner's executors run as this one user: owners are not isolated from each
    /// other on the node. Chosen explicitly by the node's admin.
    Fixed { user: String },
    /// The agent is not root, so every executor runs as the agent's user: owners are not
    /// isolated from each other (nor from the agent's key).
    Unprivileged { user: String },
}

impl ExecutorIdentity {
    /// Whether executors of different owners share one Unix identity on the node.
    pub fn shared(&self) -> bool {
        matches!(
            self,
            ExecutorIdentity::Fixed { .. } | ExecutorIdentity::Unprivileged { .. }
        )
    }
}

impl std::fmt::Display for ExecutorIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExecutorIdentity::OwnerUid => f.write_str("owner-uid"),
            ExecutorIdentity::SiteUser => f.write_str("site-user"),
            ExecutorIdentity::Fixed { user } => write!(f, "fixed:{user}"),
            ExecutorIdentity::Unprivileged { user } => write!(f, "unprivileged:{user}"),
        }
    }
}

/// Whose executor a launch is, and the uid the head assigned that owner (for nodes in
/// [`ExecutorIdentity::OwnerUid`] mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorOwner {
    pub name: String,
    pub uid: u32,
}

/// Longest `task_timeout` accepted (one week).
pub const APP_TASK_TIMEOUT_MS_MAX: u64 = 7 * 24 * 3600 * 1000;

/// `max_attempts` when a spec does not say.
pub const APP_MAX_ATTEMPTS_DEFAULT: u32 = 3;
/// Largest `max_attempts` accepted.
pub const APP_MAX_ATTEMPTS_MAX: u32 = 100;

/// Longest application name.
pub const APP_NAME_BYTES_MAX: usize = 64;
/// Most `args` plus `env` entries in a spec.
pub const APP_ARGS_MAX: usize = 1024;
/// Largest `max_instances` accepted.
pub const APP_INSTANCES_MAX: u32 = 100_000;
/// `max_instances` when a spec does not say.
pub const APP_INSTANCES_DEFAULT: u32 = 100;
/// `delay_release` when a spec does not say (one minute).
pub const APP_DELAY_RELEASE_MS_DEFAULT: u64 = 60_000;
/// Longest `delay_release` accepted (one day).
pub const APP_DELAY_RELEASE_MS_MAX: u64 = 24 * 3600 * 1000;

/// A spec field that failed validation, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("field `{field}`: {reason}")]
pub struct SpecError {
    pub field: &'static str,
    pub reason: String,
}

impl SpecError {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        SpecError {
            field,
            reason: reason.into(),
        }
    }
}

/// Checks an application or session name: `[a-z0-9][a-z0-9_-]*`, bounded length.
pub fn validate_name(field: &'static str, name: &str) -> Result<(), SpecError> {
    if name.is_empty() {
        return Err(SpecError::new(field, "must not be empty"));
    }
    if name.len() > APP_NAME_BYTES_MAX {
        return Err(SpecError::new(
            field,
            format!("is {} bytes; the limit is {APP_NAME_BYTES_MAX}", name.len()),
        ));
    }
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let rest_ok =
        chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !first_ok || !rest_ok {
        return Err(SpecError::new(
            field,
            format!("`{name}` must match [a-z0-9][a-z0-9_-]*"),
        ));
    }
    Ok(())
}

/// Checks a node name: `[a-z0-9][a-z0-9._-]*` (host names, lower-cased), bounded length.
pub fn validate_node_name(name: &str) -> Result<(), SpecError> {
    let field = "name";
    if name.is_empty() || name.len() > APP_NAME_BYTES_MAX {
        return Err(SpecError::new(
            field,
            format!("must be 1 to {APP_NAME_BYTES_MAX} bytes"),
        ));
    }
    let ok = name.chars().enumerate().all(|(i, c)| {
        c.is_ascii_lowercase() || c.is_ascii_digit() || (i > 0 && matches!(c, '.' | '-' | '_'))
    });
    if !ok {
        return Err(SpecError::new(
            field,
            format!("`{name}` must match [a-z0-9][a-z0-9._-]*"),
        ));
    }
    Ok(())
}

/// Checks a Unix user or group name as `useradd` accepts it.
fn validate_account(field: &'static str, name: &str) -> Result<(), SpecError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name.chars().enumerate().all(|(i, c)| {
            c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || c == '_'
                || c == '-'
                || (c == '$' && i == name.len() - 1)
        });
    if ok {
        Ok(())
    } else {
        Err(SpecError::new(
            field,
            format!("`{name}` is not a valid name: [a-z_][a-z0-9_-]*, at most 32 bytes"),
        ))
    }
}

/// Checks a label map (node labels or a selector): keys `[a-z0-9][a-z0-9._/-]*`, values
/// of printable characters without spaces, both at most [`LABEL_BYTES_MAX`] bytes.
pub fn validate_labels(
    field: &'static str,
    labels: &BTreeMap<String, String>,
) -> Result<(), SpecError> {
    if labels.len() > LABELS_MAX {
        return Err(SpecError::new(
            field,
            format!("has {} labels; the limit is {LABELS_MAX}", labels.len()),
        ));
    }
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.len() <= LABEL_BYTES_MAX
            && key.chars().enumerate().all(|(i, c)| {
                c.is_ascii_lowercase()
                    || c.is_ascii_digit()
                    || (i > 0 && matches!(c, '.' | '_' | '/' | '-'))
            });
        if !key_ok {
            return Err(SpecError::new(
                field,
                format!("label key `{key}` must match [a-z0-9][a-z0-9._/-]*, at most {LABEL_BYTES_MAX} bytes"),
            ));
        }
        if value.len() > LABEL_BYTES_MAX
            || value.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(SpecError::new(
                field,
                format!("label `{key}`: the value must be at most {LABEL_BYTES_MAX} bytes without spaces"),
            ));
        }
    }
    Ok(())
}

impl ApplicationSpec {
    /// A spec with every optional field at its default.
    pub fn new(name: impl Into<String>, command: impl Into<String>) -> Self {
        ApplicationSpec {
            name: name.into(),
            shim: ShimKind::Stdio,
            command: command.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            working_dir: None,
            user: None,
            group: None,
            users: Vec::new(),
            groups: Vec::new(),
            resources: Resources::default(),
            selector: BTreeMap::new(),
            max_instances: APP_INSTANCES_DEFAULT,
            delay_release_ms: APP_DELAY_RELEASE_MS_DEFAULT,
            max_attempts: APP_MAX_ATTEMPTS_DEFAULT,
            retry_on_error: false,
            task_timeout_ms: None,
            allow_root: false,
        }
    }

    /// The same spec with secret environment values blanked, for answers to clients.
    pub fn redacted(&self) -> Self {
        let mut spec = self.clone();
        for v in spec.env.values_mut() {
            if v.secret {
                v.value.clear();
            }
        }
        spec
    }

    /// Checks every field; the error names the first field that is wrong.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_name("name", &self.name)?;
        if self.shim == ShimKind::Batch {
            return Err(SpecError::new(
                "shim",
                "`batch` is reserved for the ranks of batch jobs (`flame submit`); use `stdio` or `unix`",
            ));
        }
        self.validate_access()?;
        self.validate_process()
    }

    /// `users` and `groups` are lists of names; a fixed `user` or `group` serves one owner
    /// only, since executors of two owners must never share a Unix identity.
    fn validate_access(&self) -> Result<(), SpecError> {
        for (field, list) in [("users", &self.users), ("groups", &self.groups)] {
            if list.len() > APP_ACCESS_NAMES_MAX {
                return Err(SpecError::new(
                    field,
                    format!("names more than {APP_ACCESS_NAMES_MAX} entries"),
                ));
            }
            for name in list {
                validate_principal_name(field, name)?;
            }
        }
        let fixed = match (&self.user, &self.group) {
            (Some(_), _) => Some("user"),
            (None, Some(_)) => Some("group"),
            (None, None) => None,
        };
        if let Some(field) = fixed {
            if self.users.len() != 1 || !self.groups.is_empty() {
                return Err(SpecError::new(
                    field,
                    "a fixed Unix identity is allowed only for an application restricted to one                      Flame user (`users = [\"NAME\"]`, no `groups`): executors of two users never                      share an identity; leave it out to run each user's executors as their own",
                ));
            }
        }
        Ok(())
    }

    /// Whether `owner` may open sessions of it: `users` and `groups` both empty, or `owner`
    /// named in `users`, or in a group of `groups` (`in_group(group)` says whether `owner`
    /// is a member).
    pub fn allows(&self, owner: &str, in_group: impl Fn(&str) -> bool) -> bool {
        if self.users.is_empty() && self.groups.is_empty() {
            return true;
        }
        self.users.iter().any(|u| u == owner) || self.groups.iter().any(|g| in_group(g))
    }

    /// Checks everything but the name and the shim: what a batch job's ranks share with
    /// applications.
    fn validate_process(&self) -> Result<(), SpecError> {
        if self.command.trim().is_empty() {
            return Err(SpecError::new("command", "must not be empty"));
        }
        if self.command.contains('\0') || self.args.iter().any(|a| a.contains('\0')) {
            return Err(SpecError::new("command", "must not contain NUL bytes"));
        }
        if self.args.len() + self.env.len() > APP_ARGS_MAX {
            return Err(SpecError::new(
                "args",
                format!("args and env together hold more than {APP_ARGS_MAX} entries"),
            ));
        }
        for key in self.env.keys() {
            if key.is_empty() || key.contains('=') || key.contains('\0') {
                return Err(SpecError::new(
                    "env",
                    format!("`{key}` is not a valid variable name"),
                ));
            }
        }
        for value in self.env.values() {
            if value.value.contains('\0') {
                return Err(SpecError::new("env", "values must not contain NUL bytes"));
            }
        }
        if let Some(dir) = &self.working_dir {
            if !dir.starts_with('/') || dir.contains('\0') {
                return Err(SpecError::new(
                    "working_dir",
                    format!("`{dir}` must be an absolute path"),
                ));
            }
        }
        if let Some(user) = &self.user {
            validate_account("user", user)?;
        }
        if let Some(group) = &self.group {
            validate_account("group", group)?;
        }
        let r = &self.resources;
        if r.cpu_millis < APP_CPU_MILLIS_MIN || r.cpu_millis > APP_CPU_MILLIS_MAX {
            return Err(SpecError::new(
                "resources.cpus",
                format!(
                    "is {}; it must be between {} and {}",
                    format_cpus(r.cpu_millis),
                    format_cpus(APP_CPU_MILLIS_MIN),
                    format_cpus(APP_CPU_MILLIS_MAX)
                ),
            ));
        }
        if let Some(m) = r.memory_bytes {
            if m < APP_MEMORY_BYTES_MIN {
                return Err(SpecError::new(
                    "resources.memory",
                    format!(
                        "is {}; it must be at least {}",
                        format_bytes(m),
                        format_bytes(APP_MEMORY_BYTES_MIN)
                    ),
                ));
            }
        }
        if r.gpus > APP_GPUS_MAX {
            return Err(SpecError::new(
                "resources.gpus",
                format!("is {}; the limit is {APP_GPUS_MAX}", r.gpus),
            ));
        }
        validate_labels("selector", &self.selector)?;
        if self.max_instances == 0 || self.max_instances > APP_INSTANCES_MAX {
            return Err(SpecError::new(
                "max_instances",
                format!("must be between 1 and {APP_INSTANCES_MAX}"),
            ));
        }
        if self.delay_release_ms > APP_DELAY_RELEASE_MS_MAX {
            return Err(SpecError::new("delay_release", "must be at most 24h"));
        }
        if let Some(t) = self.task_timeout_ms {
            if t == 0 || t > APP_TASK_TIMEOUT_MS_MAX {
                return Err(SpecError::new(
                    "task_timeout",
                    "must be more than 0 and at most a week",
                ));
            }
        }
        if self.max_attempts == 0 || self.max_attempts > APP_MAX_ATTEMPTS_MAX {
            return Err(SpecError::new(
                "max_attempts",
                format!("must be between 1 and {APP_MAX_ATTEMPTS_MAX}"),
            ));
        }
        Ok(())
    }
}

/// What a client asks for when it opens a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSpec {
    /// Name of a registered application.
    pub application: String,
    /// Bytes handed to every executor when it enters the session: inline, or an object
    /// (the client puts common data above its inline threshold first).
    pub common_data: crate::object::Payload,
    /// Opt out of durability: tasks and results are kept in memory only, and acked at once.
    pub ephemeral: bool,
    /// The tenant the session's executors are accounted to; executors are shared between
    /// owners by their configured weights. Empty: [`DEFAULT_OWNER`].
    pub owner: String,
    /// Among one owner's sessions, a higher priority is served first and may reclaim
    /// executors from lower ones.
    pub priority: i32,
    /// A batch job rather than an elastic session: its executors are ranks running the
    /// job's command, started together once all are placed. `application` is not used.
    pub job: Option<JobSpec>,
}

/// The application of a batch job's ranks is named this plus the job's id (a dot: no
/// registered application can have such a name).
pub const JOB_APPLICATION_PREFIX: &str = "job.";

/// The job whose ranks run as application `name`, if it is one.
pub fn job_of_application(name: &str) -> Option<SessionId> {
    name.strip_prefix(JOB_APPLICATION_PREFIX)?
        .parse::<u64>()
        .ok()
        .map(SessionId)
}

/// Memory limit of each rank of a job that names none (`flame submit --mem-per-rank`
/// raises or lowers it): a rank is never without a memory limit, and its node's memory
/// is booked for it.
pub const JOB_MEMORY_PER_RANK_DEFAULT_BYTES: u64 = 1 << 30;

/// Most ranks one batch job may have.
pub const JOB_RANKS_MAX: u32 = 65_536;
/// Longest time limit a job may ask for (30 days).
pub const JOB_TIME_LIMIT_MS_MAX: u64 = 30 * 24 * 3600 * 1000;
/// Longest job name.
pub const JOB_NAME_BYTES_MAX: usize = 128;

/// A batch job (`flame submit`): `ranks` processes of one command, placed all together or
/// not at all, started together once placed, each running to completion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Free text shown by `flame job list`; may be empty.
    pub name: String,
    /// Program each rank runs (with `mpi`: the program `mpirun` starts). A bare name is
    /// looked up in the node's `PATH`.
    pub command: String,
    pub args: Vec<String>,
    /// Added to each rank's environment.
    pub env: BTreeMap<String, String>,
    /// Where the ranks start; `None`: a private directory of each rank's own.
    pub working_dir: Option<String>,
    pub ranks: u32,
    /// Exactly this many ranks on each node used, when set.
    pub ranks_per_node: Option<u32>,
    /// What each rank needs and is limited to; memory, when not given, is
    /// [`JOB_MEMORY_PER_RANK_DEFAULT_BYTES`].
    pub resources: Resources,
    /// The job is stopped when its ranks run longer than this.
    pub time_limit_ms: Option<u64>,
    /// Run `mpirun` on the first node with the job's hostfile; Open MPI starts its
    /// daemons on the other nodes through Flame (`flame-mpi-agent`), inside the job.
    pub mpi: bool,
}

impl JobSpec {
    /// A job of `ranks` ranks of `command`, 1 cpu each.
    pub fn new(command: impl Into<String>, ranks: u32) -> Self {
        JobSpec {
            name: String::new(),
            command: command.into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            working_dir: None,
            ranks,
            ranks_per_node: None,
            resources: Resources::default(),
            time_limit_ms: None,
            mpi: false,
        }
    }

    /// The application its ranks run as: `job.<id>` (a name no registered application can
    /// have), shim `batch`, one instance per rank, released as soon as the job ends.
    pub fn application(&self, job: SessionId) -> ApplicationSpec {
        ApplicationSpec {
            args: self.args.clone(),
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), EnvValue::plain(v.clone())))
                .collect(),
            working_dir: self.working_dir.clone(),
            resources: Resources {
                memory_bytes: Some(
                    self.resources
                        .memory_bytes
                        .unwrap_or(JOB_MEMORY_PER_RANK_DEFAULT_BYTES),
                ),
                ..self.resources
            },
            max_instances: self.ranks,
            delay_release_ms: 0,
            max_attempts: 1,
            shim: ShimKind::Batch,
            // A job's command runs as its owner's identity on the node, never as root.
            allow_root: false,
            ..ApplicationSpec::new(
                format!("{JOB_APPLICATION_PREFIX}{}", job.0),
                self.command.clone(),
            )
        }
    }

    /// Checks every field; the error names the first field that is wrong.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.name.len() > JOB_NAME_BYTES_MAX || self.name.chars().any(char::is_control) {
            return Err(SpecError::new(
                "name",
                format!("must be at most {JOB_NAME_BYTES_MAX} bytes without control characters"),
            ));
        }
        if self.ranks == 0 || self.ranks > JOB_RANKS_MAX {
            return Err(SpecError::new(
                "ranks",
                format!(
                    "is {}; it must be between 1 and {JOB_RANKS_MAX}",
                    self.ranks
                ),
            ));
        }
        if let Some(k) = self.ranks_per_node {
            if k == 0 || self.ranks % k != 0 {
                return Err(SpecError::new(
                    "ranks_per_node",
                    format!(
                        "is {k}; it must divide the {} ranks (each node used gets exactly that many)",
                        self.ranks
                    ),
                ));
            }
        }
        if let Some(t) = self.time_limit_ms {
            if t == 0 || t > JOB_TIME_LIMIT_MS_MAX {
                return Err(SpecError::new(
                    "time_limit",
                    "must be more than 0 and at most 30 days",
                ));
            }
        }
        self.application(SessionId(0)).validate_process()
    }
}

/// A batch job's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    /// Waiting for room for all its ranks.
    Queued,
    /// Its ranks were started.
    Running,
    /// Every rank exited with status 0.
    Succeeded,
    /// A rank failed (non-zero exit, crash, lost node); the others were stopped.
    Failed,
    Cancelled,
    /// Stopped at its time limit.
    TimedOut,
}

impl JobState {
    /// The job has ended; the state never changes again.
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JobState::Queued => "Queued",
            JobState::Running => "Running",
            JobState::Succeeded => "Succeeded",
            JobState::Failed => "Failed",
            JobState::Cancelled => "Cancelled",
            JobState::TimedOut => "TimedOut",
        })
    }
}

/// Where one rank of a job runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankInfo {
    pub rank: u32,
    pub node: String,
    pub executor: ExecutorId,
    /// Its index among the job's ranks on its node.
    pub local_rank: u32,
    /// Its process's exit status once it exited by itself (128 + the signal number for a
    /// process killed by a signal, as shells report it).
    pub exit_code: Option<i32>,
}

/// The first rank that failed, which decides the job's exit code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFailure {
    /// `None` for a rank lost before the job started (ranks are numbered at the start).
    pub rank: Option<u32>,
    /// `None` when the rank did not exit by itself (its node was lost, it could not start).
    pub exit_code: Option<i32>,
    pub message: String,
}

/// A batch job as the head reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobInfo {
    pub spec: JobSpec,
    pub state: JobState,
    /// Unix time in milliseconds when its ranks were started.
    pub started_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    /// Empty until the job starts; then one per rank, in rank order.
    pub ranks: Vec<RankInfo>,
    pub failure: Option<JobFailure>,
}

impl JobInfo {
    /// A job that has not started.
    pub fn queued(spec: JobSpec) -> Self {
        JobInfo {
            spec,
            state: JobState::Queued,
            started_ms: None,
            ended_ms: None,
            ranks: Vec::new(),
            failure: None,
        }
    }

    /// The exit code `flame submit` ends with: 0 for success, the first failed rank's exit
    /// code (1 when it has none), 124 for a time limit (as `timeout` does), 130 for a
    /// cancelled job (as for Ctrl-C); `None` while the job runs.
    pub fn exit_code(&self) -> Option<u8> {
        match self.state {
            JobState::Queued | JobState::Running => None,
            JobState::Succeeded => Some(0),
            JobState::Failed => {
                let code = self.failure.as_ref().and_then(|f| f.exit_code).unwrap_or(1);
                Some(u8::try_from(code).ok().filter(|&c| c != 0).unwrap_or(1))
            }
            JobState::TimedOut => Some(124),
            JobState::Cancelled => Some(130),
        }
    }
}

/// What a rank of a batch job is started with: the task input of its rank task. The node
/// writes `hostfile` into the rank's working directory and names it in `FLAME_HOSTFILE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankLaunch {
    /// `FLAME_RANK`, `MASTER_ADDR` and the rest, in order.
    pub env: Vec<(String, String)>,
    /// Open MPI hostfile: one `NODE slots=K` line per node, in rank order.
    pub hostfile: String,
    /// With `--mpi`, rank 0 runs this instead of the job's command (`mpirun ...`), and
    /// the other ranks run nothing: Open MPI starts its daemons in their allocation.
    pub argv: Option<Vec<String>>,
    /// Runs no process: holds the rank's allocation for Open MPI's daemon until the job
    /// ends.
    pub hold: bool,
}

impl RankLaunch {
    /// The task input carrying it.
    pub fn encode(&self) -> Bytes {
        // Serializing plain data into a Vec cannot fail.
        Bytes::from(postcard::to_allocvec(self).unwrap_or_default())
    }

    /// Reads a task input; never panics.
    pub fn decode(bytes: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

/// The owner of sessions that name none.
pub const DEFAULT_OWNER: &str = "default";

impl SessionSpec {
    /// A durable session of `application` for the default owner, priority 0.
    pub fn new(application: impl Into<String>) -> Self {
        SessionSpec {
            application: application.into(),
            common_data: crate::object::Payload::default(),
            ephemeral: false,
            owner: String::new(),
            priority: 0,
            job: None,
        }
    }

    /// The owner, with the default for none.
    pub fn owner_or_default(&self) -> &str {
        if self.owner.is_empty() {
            DEFAULT_OWNER
        } else {
            &self.owner
        }
    }
}

/// Session lifecycle. A closed session accepts no more tasks and finishes when its pending
/// and running tasks have reached a final state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionState {
    Open,
    Closed,
}

/// Task counters of a session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCounts {
    pub pending: u64,
    pub running: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
}

impl TaskCounts {
    pub fn total(&self) -> u64 {
        self.pending + self.running + self.succeeded + self.failed + self.cancelled
    }

    /// Tasks not yet in a final state.
    pub fn unfinished(&self) -> u64 {
        self.pending + self.running
    }
}

/// A session as the head reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: SessionId,
    pub application: String,
    pub owner: String,
    pub priority: i32,
    pub state: SessionState,
    pub ephemeral: bool,
    pub counts: TaskCounts,
    /// Executors bound to the session now.
    pub executors: u32,
    /// Unix time in milliseconds.
    pub created_ms: u64,
    pub closed_ms: Option<u64>,
    /// Why pending tasks are not getting executors, when they are not: e.g. no node can
    /// fit the application's resources, or `max_instances` is reached.
    pub waiting: Option<String>,
    /// Every executor that served the session, with what it used while bound to it.
    pub usage: Vec<ExecutorUsage>,
    /// Set for a batch job.
    pub job: Option<JobInfo>,
    /// How its tasks' objects moved.
    pub data: DataStats,
}

/// How a session's task inputs that are objects reached their executors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataStats {
    /// Tasks dispatched whose input is an object.
    pub object_tasks: u64,
    /// Of those, tasks sent to a node that held the input already (a locality hit).
    pub local_tasks: u64,
    /// Bytes of object inputs and common data nodes had to fetch from another node.
    pub fetched_bytes: u64,
    /// Bytes of object inputs and common data read where they were.
    pub local_bytes: u64,
}

/// What one executor used while bound to one session, as its node's cgroup measured it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorUsage {
    pub executor: ExecutorId,
    pub node: String,
    /// Wall time it was bound to the session.
    pub bound_ms: u64,
    /// cpu time (user + system) of the executor's processes while bound to the session.
    pub cpu_ms: u64,
    /// Highest memory use of the executor's processes over its life so far.
    pub memory_peak_bytes: u64,
    /// Time the cpu quota held the executor back while bound to the session.
    pub throttled_ms: u64,
    /// Set when the executor ended while bound: why (e.g. "out of memory").
    pub ended: Option<String>,
}

impl SessionInfo {
    /// Closed, with every task in a final state.
    pub fn is_finished(&self) -> bool {
        self.state == SessionState::Closed && self.counts.unfinished() == 0
    }
}

/// An application as the head reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplicationInfo {
    pub spec: ApplicationSpec,
    /// Executors of this application alive now.
    pub executors: u32,
    /// Sessions of this application that are not finished.
    pub open_sessions: u32,
}

/// `flame queue`: how executors are shared, per owner and per session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueReport {
    /// What Ready nodes offer in all.
    pub capacity: Resources,
    pub owners: Vec<OwnerQueue>,
    /// The head's own storage, once measured.
    pub head: Option<HeadStorage>,
}

/// The head's data directory: its free space and whether the head can write its state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadStorage {
    pub free_bytes: u64,
    pub total_bytes: u64,
    /// Below this the head warns (`--low-space-bytes`).
    pub low_bytes: u64,
    /// Why the head takes no writes now, and what to do; `None` while it does.
    pub fault: Option<String>,
}

/// One owner's part of the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerQueue {
    pub owner: String,
    pub weight: u32,
    /// Its weighted fair share of the dominant resource, in thousandths of the cluster.
    pub deserved_permille: u32,
    /// Its dominant share now, in thousandths of the cluster.
    pub allocated_permille: u32,
    /// Executors its sessions hold now.
    pub executors: u32,
    pub pending_tasks: u64,
    pub sessions: Vec<SessionQueue>,
}

/// One session's part of its owner's share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionQueue {
    pub id: SessionId,
    pub application: String,
    pub priority: i32,
    /// Executors the scheduler aims to give it.
    pub deserved_executors: u32,
    /// Executors bound to it now.
    pub executors: u32,
    pub pending_tasks: u64,
    pub running_tasks: u64,
    /// Why its pending tasks wait, if they do.
    pub waiting: Option<String>,
}

/// One GPU of a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// The index `CUDA_VISIBLE_DEVICES` names it by.
    pub index: u32,
    pub name: String,
    pub uuid: String,
    pub memory_bytes: u64,
}

/// What a node offers to executors.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeResources {
    pub cpu_millis: u32,
    pub memory_bytes: u64,
    pub gpus: Vec<GpuInfo>,
}

/// The final outcome of one task attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskOutcome {
    /// The application returned output bytes.
    Succeeded(Bytes),
    /// The application, or Flame on its behalf, reported an error message.
    Failed(String),
    /// The session was cancelled before the task finished.
    Cancelled,
    /// The application returned output bytes larger than the inline threshold: they are
    /// an object in the node's cache, and this names it. `flame_client` fetches it for
    /// callers, who see [`TaskOutcome::Succeeded`]. The task succeeded.
    Object(crate::object::ObjectRef),
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl TaskState {
    /// Succeeded, Failed or Cancelled: the state never changes again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled
        )
    }
}

/// One task as `ListTasks` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInfo {
    pub task: TaskId,
    pub state: TaskState,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// The error of a Failed task: the application's message, or why its executor died
    /// (exit status or signal, and the last lines of its stderr).
    pub message: Option<String>,
}

/// A task's final result as watchers receive it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    pub task: TaskId,
    pub attempt: u32,
    pub outcome: TaskOutcome,
}

/// One task handed to an executor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskAssignment {
    pub executor: ExecutorId,
    pub session: SessionId,
    pub task: TaskId,
    /// Attempt number, from 1; a result must echo it to be accepted.
    pub attempt: u32,
    pub input: crate::object::Payload,
    /// Where to fetch `input` when it is an object the node does not hold.
    pub sources: Option<crate::object::ObjectSources>,
}

/// What kind of failure an [`ApiError`] is, for programs that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    LimitExceeded,
    FailedPrecondition,
    Unavailable,
    Internal,
    /// The connection's principal may not do this (not the owner, not an admin).
    PermissionDenied,
    /// The owner holds as much of a per-user quota as the head allows (open sessions, tasks
    /// or bytes held, connections, streams); the message names the quota, its limit and
    /// what the owner holds.
    QuotaExceeded,
}

/// How every message about a storage fault of the head begins (a full or failing disk):
/// the head takes no writes until it is fixed; clients name it in their hint.
pub const STORAGE_FAULT_MARK: &str = "the head cannot write its state";

/// An error the head returns to a client, with a message meant for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            message: message.into(),
        }
    }
}

mod node;
pub use node::*;

#[cfg(test)]
mod tests;
