//! What one executor holds besides its process, set up before the process starts and torn
//! down after it ends: its identity, cgroup, working and socket folders, logs, and the
//! counters its usage is measured from; and the environment its process gets.

use super::identity::credentials_for;
use super::{LaunchSpec, Settings, WORK_DIR_MODE};
use crate::cgroup::{ExecutorCgroup, Limits, Usage as CgroupUsage};
use crate::launcher::Credentials;
use crate::logs::LogSink;
use flame_protocol::messages::Usage;
use flame_protocol::model::ShimKind;
use flame_shims::private_dir::PrivateDir;
use flame_shims::unix::{SocketDir, ENV_SHIM_SOCKET};
use std::collections::BTreeMap;

/// Everything set up for one executor before its process starts, torn down by
/// [`Prepared::finish`]: its cgroup, its directories, its log.
pub(super) struct Prepared {
    pub(super) credentials: Option<Credentials>,
    pub(super) cgroup: Option<ExecutorCgroup>,
    /// `exec-<id>`, the executor user's: root reaches inside only through its handle.
    pub(super) work_dir: PrivateDir,
    pub(super) socket_dir: Option<SocketDir>,
    pub(super) log: LogSink,
    /// A batch rank's stderr, kept apart from its stdout (`log`) so the submitter can print
    /// each where it belongs.
    pub(super) err_log: Option<LogSink>,
    /// cgroup counters when the executor last entered a session.
    bound_at: Option<CgroupUsage>,
    /// When the executor last entered a session, if it is in one.
    bound_since: Option<std::time::Instant>,
    /// The cgroup limits it was created with.
    pub(super) resources: Limits,
}

impl Prepared {
    pub(super) fn new(settings: &Settings, spec: &LaunchSpec) -> Result<Prepared, String> {
        let app = &spec.application;
        let id = spec.executor;
        let work_dir = settings.work_dir.join(format!("exec-{}", id.0));
        let credentials = credentials_for(settings, app, &spec.owner, &work_dir)?;
        let owner = credentials.as_ref().map(|c| (c.uid, c.gid));
        let log = settings
            .logs
            .open_sink(id.0)
            .map_err(|e| format!("cannot open the executor's log: {e}"))?;
        let err_log = match app.shim {
            ShimKind::Batch => Some(
                settings
                    .logs
                    .open_sink(crate::logs::stderr_log_id(id.0))
                    .map_err(|e| format!("cannot open the rank's stderr log: {e}"))?,
            ),
            ShimKind::Stdio | ShimKind::Unix => None,
        };
        let work_dir = PrivateDir::create(
            &settings.work_dir,
            &format!("exec-{}", id.0),
            WORK_DIR_MODE,
            owner,
        )
        .map_err(|e| format!("cannot create the working directory: {e}"))?;
        let socket_dir = match app.shim {
            ShimKind::Stdio | ShimKind::Batch => None,
            ShimKind::Unix => match SocketDir::create(&settings.runtime_dir, id.0, owner) {
                Ok(d) => Some(d),
                Err(e) => {
                    let _ = work_dir.remove();
                    return Err(format!("cannot prepare the shim socket: {e}"));
                }
            },
        };
        let limits = Limits {
            cpu_millis: Some(app.resources.cpu_millis),
            memory_bytes: app.resources.memory_bytes,
            pids_max: Some(settings.pids_max),
        };
        let cgroup = match &settings.cgroups {
            None => None,
            Some(tree) => match tree.create(&format!("exec-{}", id.0), &limits) {
                Ok(c) => Some(c),
                Err(e) => {
                    let _ = work_dir.remove();
                    return Err(format!("cannot create the executor's cgroup: {e}"));
                }
            },
        };
        Ok(Prepared {
            credentials,
            cgroup,
            work_dir,
            socket_dir,
            log,
            err_log,
            bound_at: None,
            bound_since: None,
            resources: limits,
        })
    }

    pub(super) fn usage_now(&self) -> Option<CgroupUsage> {
        let cgroup = self.cgroup.as_ref()?;
        match cgroup.usage() {
            Ok(u) => Some(u),
            Err(e) => {
                tracing::warn!("cannot read an executor's cgroup counters: {e}");
                None
            }
        }
    }

    /// The executor entered a session: its usage counts from now.
    pub(super) fn enter_session(&mut self) {
        // The lifecycle lets a bind in only from Idle: never twice without a leave.
        debug_assert!(self.bound_since.is_none(), "entered a session while in one");
        self.bound_at = self.usage_now();
        self.bound_since = Some(std::time::Instant::now());
    }

    /// The executor left its session: what it used there.
    pub(super) fn leave_session(&mut self) -> Usage {
        debug_assert!(self.bound_since.is_some(), "left a session while in none");
        let usage = self.usage_since_bound_at(self.usage_now());
        self.bound_at = None;
        self.bound_since = None;
        usage
    }

    /// What the executor used since it entered its session, from counters already read.
    fn usage_since_bound_at(&self, now: Option<CgroupUsage>) -> Usage {
        let Some(since) = self.bound_since else {
            return Usage::default();
        };
        let bound_ms = u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX);
        let (Some(then), Some(now)) = (self.bound_at, now) else {
            return Usage {
                bound_ms,
                ..Usage::default()
            };
        };
        Usage {
            bound_ms,
            cpu_ms: now.cpu_ns.saturating_sub(then.cpu_ns) / 1_000_000,
            memory_peak_bytes: now.memory_peak_bytes,
            throttled_ms: now.throttled_ns.saturating_sub(then.throttled_ns) / 1_000_000,
        }
    }

    /// Tears everything down: every process left in the cgroup is killed and the cgroup
    /// removed, the directories removed. Returns the reason the executor ended, naming an
    /// out-of-memory kill, and what it used since it last entered a session.
    pub(super) async fn finish(self, reason: String) -> (String, Usage) {
        // The counters are read once, for the usage and for an OOM kill.
        let now = self.usage_now();
        let usage = self.usage_since_bound_at(now);
        let oom_kills = now.map_or(0, |u| u.oom_kills);
        let Prepared {
            cgroup,
            work_dir,
            socket_dir,
            log,
            ..
        } = self;
        let reason = if oom_kills > 0 {
            format!("out of memory: the executor reached its memory limit and the kernel killed it; {reason}")
        } else {
            reason
        };
        if let Some(cgroup) = cgroup {
            // Killing waits (bounded) for the cgroup to empty: off the runtime thread.
            let done = tokio::task::spawn_blocking(move || {
                cgroup.kill_all()?;
                cgroup.remove()
            })
            .await;
            match done {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("cannot remove an executor's cgroup: {e}"),
                Err(e) => tracing::warn!("the cgroup clean-up task failed: {e}"),
            }
        }
        if let Some(dir) = socket_dir {
            if let Err(e) = dir.remove() {
                tracing::warn!("cannot remove an executor's socket directory: {e}");
            }
        }
        if let Err(e) = work_dir.remove() {
            tracing::warn!(dir = %work_dir.path().display(), "cannot remove an executor's working directory: {e}");
        }
        drop(log);
        (reason, usage)
    }
}

/// The executor's whole environment: a few basics from the node, the application's
/// variables, then Flame's own (which the application cannot override).
pub(super) fn environment(
    settings: &Settings,
    spec: &LaunchSpec,
    prepared: &Prepared,
) -> Vec<(String, String)> {
    let app = &spec.application;
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    env.insert(
        "PATH".into(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
    );
    for key in ["LANG", "LC_ALL", "TZ"] {
        if let Ok(v) = std::env::var(key) {
            env.insert(key.into(), v);
        }
    }
    match &prepared.credentials {
        Some(c) => {
            env.insert("HOME".into(), c.home.display().to_string());
            env.insert("USER".into(), c.user.clone());
            env.insert("LOGNAME".into(), c.user.clone());
        }
        None => {
            for key in ["HOME", "USER", "LOGNAME"] {
                if let Ok(v) = std::env::var(key) {
                    env.insert(key.into(), v);
                }
            }
        }
    }
    for (k, v) in &app.env {
        env.insert(k.clone(), v.value.clone());
    }
    env.insert("FLAME_EXECUTOR_ID".into(), spec.executor.to_string());
    env.insert("FLAME_NODE".into(), settings.node_name.clone());
    env.insert("FLAME_APPLICATION".into(), app.name.clone());
    env.insert(
        "CUDA_VISIBLE_DEVICES".into(),
        spec.gpus
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
    );
    if let Some(dir) = &prepared.socket_dir {
        env.insert(
            ENV_SHIM_SOCKET.into(),
            dir.socket_path().display().to_string(),
        );
    }
    env.into_iter().collect()
}

/// The last lines the executor wrote, for a message that says why it failed.
pub(super) fn tail_text(log: &LogSink) -> String {
    let lines = log.tail_lines();
    if lines.is_empty() {
        String::new()
    } else {
        format!("; last output lines:\n{}", lines.join("\n"))
    }
}
