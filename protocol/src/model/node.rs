//! A node as the head lists it: its readiness, how it isolates executors, and what it
//! offers and holds.

use super::{ExecutorIdentity, NodeResources, Resources};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How a node enforces executor limits. On the wire and on disk it is the text
/// [`Isolation::as_str`] gives (`cgroup v1`, `cgroup v2`, `none`), as it was when this was a
/// bare string, so older peers and stores read it unchanged; any other text is refused
/// when decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Isolation {
    /// cgroup v1 hierarchies (cpu, memory, pids) hold each executor.
    CgroupV1,
    /// A cgroup v2 subtree holds each executor.
    CgroupV2,
    /// No cgroups: no limits and no accounting.
    None,
}

impl Isolation {
    /// The text shown to people and written on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::CgroupV1 => "cgroup v1",
            Isolation::CgroupV2 => "cgroup v2",
            Isolation::None => "none",
        }
    }
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A text that names no [`Isolation`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown isolation `{0}` (expected `cgroup v1`, `cgroup v2` or `none`)")]
pub struct UnknownIsolation(pub String);

impl std::str::FromStr for Isolation {
    type Err = UnknownIsolation;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cgroup v1" => Ok(Isolation::CgroupV1),
            "cgroup v2" => Ok(Isolation::CgroupV2),
            "none" => Ok(Isolation::None),
            other => Err(UnknownIsolation(other.to_string())),
        }
    }
}

impl TryFrom<String> for Isolation {
    type Error = UnknownIsolation;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Isolation> for String {
    fn from(i: Isolation) -> String {
        i.as_str().to_string()
    }
}

/// Node readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    Ready,
    NotReady,
    /// Connected, but nothing new is placed there; its executors finish their work.
    Draining,
}

/// A node as the head reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub state: NodeState,
    /// What the node offers to executors (its capacity less what its config reserves).
    pub allocatable: NodeResources,
    /// What the executors alive on it hold.
    pub allocated: Resources,
    pub labels: BTreeMap<String, String>,
    /// How the node enforces executor limits.
    pub isolation: Isolation,
    /// Who it runs executors as; `None` until it registers with this head process.
    pub identity: Option<ExecutorIdentity>,
    /// Executors alive on the node.
    pub executors: u32,
    /// Unix time in milliseconds of the last message from the node.
    pub last_seen_ms: u64,
    /// Its object cache, when it serves objects.
    pub cache: Option<crate::object::CacheUsage>,
}
