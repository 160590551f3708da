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
}

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
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<String>,
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

impl ApplicationSpec {
    /// Checks every field; the error names the first field that is wrong.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_name("name", &self.name)?;
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
        if let Some(dir) = &self.working_dir {
            if !dir.starts_with('/') {
                return Err(SpecError::new(
                    "working_dir",
                    format!("`{dir}` must be an absolute path"),
                ));
            }
        }
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
    /// Bytes handed to every executor when it enters the session.
    pub common_data: Bytes,
    /// Opt out of durability: tasks and results are kept in memory only, and acked at once.
    pub ephemeral: bool,
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
    pub state: SessionState,
    pub ephemeral: bool,
    pub counts: TaskCounts,
    /// Executors bound to the session now.
    pub executors: u32,
    /// Unix time in milliseconds.
    pub created_ms: u64,
    pub closed_ms: Option<u64>,
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

/// Node readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    Ready,
    NotReady,
}

/// A node as the head reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub state: NodeState,
    pub cpus: u32,
    pub memory_bytes: u64,
    /// Executors alive on the node.
    pub executors: u32,
    /// Unix time in milliseconds of the last message from the node.
    pub last_seen_ms: u64,
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
    pub input: Bytes,
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
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ApplicationSpec {
        ApplicationSpec {
            name: "pi".into(),
            shim: ShimKind::Stdio,
            command: "/bin/pi".into(),
            args: vec![],
            env: BTreeMap::new(),
            working_dir: None,
            max_instances: 4,
            delay_release_ms: 1000,
            max_attempts: 3,
            retry_on_error: false,
            task_timeout_ms: None,
        }
    }

    #[test]
    fn valid_spec_passes() {
        assert_eq!(spec().validate(), Ok(()));
    }

    #[test]
    fn errors_name_the_field() {
        let mut s = spec();
        s.name = "Bad Name".into();
        assert_eq!(s.validate().unwrap_err().field, "name");
        let mut s = spec();
        s.command = " ".into();
        assert_eq!(s.validate().unwrap_err().field, "command");
        let mut s = spec();
        s.max_instances = 0;
        assert_eq!(s.validate().unwrap_err().field, "max_instances");
        let mut s = spec();
        s.working_dir = Some("relative".into());
        assert_eq!(s.validate().unwrap_err().field, "working_dir");
        let mut s = spec();
        s.env.insert("A=B".into(), "x".into());
        assert_eq!(s.validate().unwrap_err().field, "env");
        let mut s = spec();
        s.max_attempts = 0;
        assert_eq!(s.validate().unwrap_err().field, "max_attempts");
    }
}
