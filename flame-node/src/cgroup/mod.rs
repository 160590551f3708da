//! Per-executor cgroups: the node's cgroup tree and one cgroup per executor, with drivers
//! for cgroup v1 (one hierarchy per controller) and v2 (the unified hierarchy).
//!
//! The tree is one directory, `<root_name>`, created below the node's *own* cgroup in each
//! hierarchy it needs, with executors below it:
//!
//! ```text
//! v2: <own>/<root_name>/<executor>
//! v1: <cpu own>/<root_name>/<executor>, <memory own>/<root_name>/<executor>, ... for
//!     cpu, cpuacct, memory, pids and freezer
//! ```
//!
//! Everything here is synchronous `std::fs` work that may block (a kill waits, bounded, for
//! the cgroup to empty): async callers run it in `tokio::task::spawn_blocking`.
//!
//! Invariants:
//! - Nothing here moves a process between cgroups except through [`CgroupJoin`], which a
//!   child uses on itself between fork and exec, so it is inside before it runs any code.
//! - Every wait is bounded by a named limit; a cgroup that does not empty in time is an
//!   error naming its path and the pids left, never a hang.

mod own;
#[cfg(test)]
pub(crate) mod tests;
mod v1;
mod v2;

pub(crate) use own::*;

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest [`ExecutorCgroup::kill_all`] waits for the cgroup to empty.
pub const KILL_WAIT_MAX: Duration = Duration::from_secs(5);
/// Longest a kill round waits for a freeze to take effect before signalling anyway (a task
/// in uninterruptible sleep can hold a freeze in `FREEZING` for as long as it sleeps).
pub const FREEZE_WAIT_MAX: Duration = Duration::from_millis(500);
/// Longest [`ExecutorCgroup::remove`] retries a directory the kernel reports busy.
pub const REMOVE_WAIT_MAX: Duration = Duration::from_secs(2);
/// Ceiling of the doubling pause between re-checks while waiting.
const BACKOFF_MAX: Duration = Duration::from_millis(50);
/// First pause between re-checks while waiting.
const BACKOFF_MIN: Duration = Duration::from_millis(1);
/// CFS period written for every cpu limit, in microseconds (the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;
/// Smallest CFS quota the kernel accepts, in microseconds; smaller cpu limits are raised to
/// it (1 ms per 100 ms period, i.e. 10 millicpus).
pub const CPU_QUOTA_MIN_US: u64 = 1_000;
/// Longest cgroup name accepted, in bytes.
pub const NAME_BYTES_MAX: usize = 128;

/// Resource limits of one executor cgroup; `None` leaves the resource unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Cpu time in thousandths of a cpu (500 = half a cpu), enforced as a CFS quota per
    /// [`CPU_PERIOD_US`].
    pub cpu_millis: Option<u32>,
    /// Memory in bytes; swap is held to the same bound where the kernel lets us.
    pub memory_bytes: Option<u64>,
    /// Most processes (threads count too) in the cgroup.
    pub pids_max: Option<u32>,
}

impl Limits {
    /// The CFS quota in microseconds per [`CPU_PERIOD_US`], if cpu is limited.
    pub fn cpu_quota_us(&self) -> Option<u64> {
        self.cpu_millis
            .map(|m| (u64::from(m) * CPU_PERIOD_US / 1000).max(CPU_QUOTA_MIN_US))
    }
}

/// What an executor cgroup has used so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Cpu time consumed, in nanoseconds.
    pub cpu_ns: u64,
    /// Highest memory use seen, in bytes (v2 kernels without `memory.peak`: current use).
    pub memory_peak_bytes: u64,
    /// Processes the kernel killed for running out of memory in the cgroup.
    pub oom_kills: u64,
    /// CFS periods in which the cgroup was throttled.
    pub throttled_periods: u64,
    /// Time spent throttled, in nanoseconds.
    pub throttled_ns: u64,
}

/// The cgroup interface in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// One hierarchy per controller (or group of co-mounted controllers).
    V1,
    /// The unified hierarchy.
    V2,
}

/// Why a cgroup operation failed; each names the file or directory involved.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A value could not be written to a cgroup file.
    #[error("cannot write `{value}` to {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// The cause.
        source: io::Error,
    },
    /// A cgroup file held something other than the kernel's documented format.
    #[error("cannot parse {}: {detail}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// A cgroup directory could not be created.
    #[error("cannot create cgroup {}: {source}", path.display())]
    Create {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A cgroup with this name already exists (a leftover [`CgroupTree::cleanup_stale`]
    /// would remove, or a name used twice).
    #[error("cgroup {} already exists", path.display())]
    Exists {
        /// The directory.
        path: PathBuf,
    },
    /// A cgroup directory could not be listed.
    #[error("cannot list cgroup {}: {source}", path.display())]
    List {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A cgroup directory could not be removed.
    #[error("cannot remove cgroup {}: {source}", path.display())]
    Remove {
        /// The directory.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A process of the cgroup could not be signalled.
    #[error("cannot kill process {pid} of cgroup {}: {source}", path.display())]
    Signal {
        /// The cgroup directory.
        path: PathBuf,
        /// The process.
        pid: i32,
        /// The cause.
        source: nix::Error,
    },
    /// Processes were still in the cgroup when the kill's wait ran out.
    #[error(
        "cgroup {} still holds processes {pids:?} after {} ms of killing",
        path.display(),
        waited.as_millis()
    )]
    KillTimeout {
        /// The cgroup directory.
        path: PathBuf,
        /// The processes left.
        pids: Vec<i32>,
        /// How long the kill tried.
        waited: Duration,
    },
    /// The name is not usable as a single cgroup directory name.
    #[error("invalid cgroup name `{name}`: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The v2 controllers the node needs are not delegated to its cgroup.
    #[error(
        "cgroup v2 controllers {missing:?} are not available in {} (cgroup.controllers); \
         the parent cgroup must delegate them (systemd: Delegate=yes)",
        path.display()
    )]
    ControllersUnavailable {
        /// The node's own cgroup.
        path: PathBuf,
        /// Controllers it lacks.
        missing: Vec<String>,
    },
    /// The node's own v2 cgroup holds processes, so by v2's "no internal processes" rule
    /// it cannot give controllers to child cgroups.
    #[error(
        "cannot enable controllers in {}: that cgroup holds {processes} process(es), the node \
         among them, and cgroup v2 lets only a cgroup without processes (or the root cgroup) \
         give controllers to its children, so executor cgroups cannot go below the node's \
         own cgroup; run flame-node in the root cgroup ({source})",
        path.display()
    )]
    OwnCgroupBusy {
        /// The `cgroup.subtree_control` file written.
        path: PathBuf,
        /// Processes in that cgroup.
        processes: usize,
        /// The kernel's answer.
        source: io::Error,
    },
    /// Neither a usable v2 hierarchy nor the v1 hierarchies the node needs.
    #[error("no usable cgroup hierarchy: {detail}")]
    Unsupported {
        /// What was found and what is missing.
        detail: String,
    },
}

/// Directories of one cgroup (the tree's root or an executor) in every hierarchy in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupDirs {
    /// One directory per v1 controller (the same path twice where controllers are
    /// co-mounted, e.g. `cpu,cpuacct`).
    V1(V1Dirs),
    /// The directory in the unified hierarchy.
    V2(PathBuf),
}

/// A cgroup's directory in each v1 hierarchy the node uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Dirs {
    /// In the `cpu` hierarchy.
    pub cpu: PathBuf,
    /// In the `cpuacct` hierarchy.
    pub cpuacct: PathBuf,
    /// In the `memory` hierarchy.
    pub memory: PathBuf,
    /// In the `pids` hierarchy.
    pub pids: PathBuf,
    /// In the `freezer` hierarchy.
    pub freezer: PathBuf,
}

impl CgroupDirs {
    /// The interface these directories belong to.
    pub fn version(&self) -> Version {
        match self {
            CgroupDirs::V1(_) => Version::V1,
            CgroupDirs::V2(_) => Version::V2,
        }
    }

    /// The same cgroup's child `name` in every hierarchy.
    fn join(&self, name: &str) -> CgroupDirs {
        match self {
            CgroupDirs::V1(d) => CgroupDirs::V1(V1Dirs {
                cpu: d.cpu.join(name),
                cpuacct: d.cpuacct.join(name),
                memory: d.memory.join(name),
                pids: d.pids.join(name),
                freezer: d.freezer.join(name),
            }),
            CgroupDirs::V2(d) => CgroupDirs::V2(d.join(name)),
        }
    }

    /// Each directory once, in a fixed order (co-mounted hierarchies share one).
    fn distinct(&self) -> Vec<PathBuf> {
        match self {
            CgroupDirs::V1(d) => {
                let mut out: Vec<PathBuf> = Vec::with_capacity(5);
                for p in [&d.cpu, &d.cpuacct, &d.memory, &d.pids, &d.freezer] {
                    if !out.contains(p) {
                        out.push(p.clone());
                    }
                }
                out
            }
            CgroupDirs::V2(d) => vec![d.clone()],
        }
    }
}

/// The node's cgroup tree: `<root_name>` below the node's own cgroup in each hierarchy,
/// with one cgroup per executor below it.
#[derive(Debug)]
pub struct CgroupTree {
    /// `<own>/<root_name>` in each hierarchy.
    root: CgroupDirs,
}

impl CgroupTree {
    /// Finds the node's own cgroups (`/proc/self/cgroup` through `/proc/self/mountinfo`)
    /// and builds the tree below them. Uses v2 when the node's own v2 cgroup offers the
    /// `cpu`, `memory` and `pids` controllers, else v1 when the `cpu`, `cpuacct`, `memory`,
    /// `pids` and `freezer` hierarchies are all mounted; the error says what is missing.
    pub fn detect(root_name: &str) -> Result<CgroupTree, CgroupError> {
        let own = read_own_cgroups()?;
        let mut why_not_v2 = "no cgroup2 mount holds the node's cgroup".to_string();
        if let Some(v2) = &own.v2 {
            let path = v2.dir.join("cgroup.controllers");
            let missing = match read_to_string(&path) {
                Ok(text) => v2::missing_controllers(&text),
                Err(e) => return Err(e),
            };
            if missing.is_empty() {
                return CgroupTree::at(CgroupDirs::V2(v2.dir.clone()), root_name);
            }
            why_not_v2 = format!(
                "cgroup v2 at {} lacks controllers {missing:?}",
                v2.dir.display()
            );
            // A pure v2 host: say which controllers to delegate rather than talk about v1.
            if own.v1.is_empty() {
                return Err(CgroupError::ControllersUnavailable {
                    path: v2.dir.clone(),
                    missing,
                });
            }
        }
        let dir = |c: &str| {
            own.v1
                .iter()
                .find(|(n, _)| n == c)
                .map(|(_, d)| d.dir.clone())
        };
        match (
            dir("cpu"),
            dir("cpuacct"),
            dir("memory"),
            dir("pids"),
            dir("freezer"),
        ) {
            (Some(cpu), Some(cpuacct), Some(memory), Some(pids), Some(freezer)) => CgroupTree::at(
                CgroupDirs::V1(V1Dirs {
                    cpu,
                    cpuacct,
                    memory,
                    pids,
                    freezer,
                }),
                root_name,
            ),
            _ => {
                let missing: Vec<&str> = v1::CONTROLLERS
                    .iter()
                    .copied()
                    .filter(|c| dir(c).is_none())
                    .collect();
                Err(CgroupError::Unsupported {
                    detail: format!(
                        "{why_not_v2}; cgroup v1 hierarchies {missing:?} are not mounted \
                         (or do not hold the node's cgroup)"
                    ),
                })
            }
        }
    }

    /// Builds the tree below `own`, the node's own cgroup directories, which may be any
    /// directories laid out like cgroupfs (tests use temporary ones). Creates
    /// `<own>/<root_name>` where missing; on v2 first enables `cpu`, `memory` and `pids`
    /// for the children of `own` and of the new root.
    pub fn at(own: CgroupDirs, root_name: &str) -> Result<CgroupTree, CgroupError> {
        validate_name(root_name)?;
        if let CgroupDirs::V2(dir) = &own {
            leave_for_leaf(dir, root_name)?;
            v2::enable_controllers(dir)?;
        }
        let root = own.join(root_name);
        for dir in root.distinct() {
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(source) => return Err(CgroupError::Create { path: dir, source }),
            }
        }
        if let CgroupDirs::V2(dir) = &root {
            v2::enable_controllers(dir)?;
        }
        Ok(CgroupTree { root })
    }

    /// The interface in use.
    pub fn version(&self) -> Version {
        self.root.version()
    }

    /// The tree's root directories, `<own>/<root_name>`, once each.
    #[cfg_attr(not(test), allow(dead_code))] // for tests and messages; unused by the node yet
    pub fn paths(&self) -> Vec<PathBuf> {
        self.root.distinct()
    }

    /// Creates the cgroup `name` for an executor in every hierarchy and writes `limits`.
    /// On failure nothing is left behind.
    pub fn create(&self, name: &str, limits: &Limits) -> Result<ExecutorCgroup, CgroupError> {
        validate_name(name)?;
        let dirs = self.root.join(name);
        let mut made = ExecutorCgroup {
            dirs: dirs.clone(),
            made: Vec::new(),
        };
        for dir in dirs.distinct() {
            match std::fs::create_dir(&dir) {
                Ok(()) => made.made.push(dir),
                Err(e) => {
                    made.discard();
                    return Err(if e.kind() == io::ErrorKind::AlreadyExists {
                        CgroupError::Exists { path: dir }
                    } else {
                        CgroupError::Create {
                            path: dir,
                            source: e,
                        }
                    });
                }
            }
        }
        let written = match &dirs {
            CgroupDirs::V1(d) => v1::write_limits(d, limits),
            CgroupDirs::V2(d) => v2::write_limits(d, limits),
        };
        if let Err(e) = written {
            made.discard();
            return Err(e);
        }
        Ok(made)
    }

    /// Names of the cgroups below the root in any hierarchy, sorted.
    pub fn executor_names(&self) -> Result<Vec<String>, CgroupError> {
        let mut names = BTreeSet::new();
        for dir in self.root.distinct() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(source) => return Err(CgroupError::List { path: dir, source }),
            };
            for entry in entries {
                let entry = entry.map_err(|source| CgroupError::List {
                    path: dir.clone(),
                    source,
                })?;
                let is_dir = entry
                    .file_type()
                    .map_err(|source| CgroupError::List {
                        path: entry.path(),
                        source,
                    })?
                    .is_dir();
                if let (true, Some(name)) = (is_dir, entry.file_name().to_str()) {
                    names.insert(name.to_string());
                }
            }
        }
        Ok(names.into_iter().collect())
    }

    /// How many cgroups are below the root now (0 when the root cannot be listed).
    #[cfg_attr(not(test), allow(dead_code))] // for leak checks; unused by the node yet
    pub fn executor_count(&self) -> usize {
        self.executor_names().map_or(0, |n| n.len())
    }

    /// The executor cgroup `name` below the root, whether or not it exists, for taking
    /// over one created by an earlier run (its limits are left as they are).
    pub fn open(&self, name: &str) -> Result<ExecutorCgroup, CgroupError> {
        validate_name(name)?;
        let dirs = self.root.join(name);
        let made = dirs.distinct().into_iter().filter(|d| d.is_dir()).collect();
        Ok(ExecutorCgroup { dirs, made })
    }

    /// Kills and removes every cgroup below the root: at node start, the executors a
    /// previous run left. Tries them all; returns how many were removed, or the first
    /// error.
    pub fn cleanup_stale(&self) -> Result<usize, CgroupError> {
        let mut removed = 0;
        let mut first_error = None;
        for name in self.executor_names()? {
            match self.open(&name).and_then(ExecutorCgroup::remove) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!("cannot remove stale cgroup: {e}");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(removed),
        }
    }

    /// Removes every executor cgroup ([`CgroupTree::cleanup_stale`]) and then the root
    /// itself: at a clean shutdown, once the executors are gone.
    pub fn destroy(&self) -> Result<(), CgroupError> {
        self.cleanup_stale()?;
        for dir in self.root.distinct() {
            remove_dir_bounded(&dir)?;
        }
        Ok(())
    }
}

/// One executor's cgroup. Dropping it leaves the cgroup in place: call
/// [`ExecutorCgroup::remove`], which blocks, from a blocking context.
#[derive(Debug)]
pub struct ExecutorCgroup {
    dirs: CgroupDirs,
    /// Directories known to exist, for undoing a half-made cgroup.
    made: Vec<PathBuf>,
}

/// The open `cgroup.procs` files of an executor cgroup, one per hierarchy. A child writes
/// `0` into each between fork and exec to move itself in (see the launcher), so it and
/// everything it starts are inside before it runs any code of its own.
#[derive(Debug)]
pub struct CgroupJoin {
    files: Vec<File>,
}

impl CgroupJoin {
    /// The raw descriptors to write `0` into, valid while `self` lives. The files are
    /// opened close-on-exec, so the child's program does not inherit them.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.files.iter().map(AsRawFd::as_raw_fd).collect()
    }
}

impl ExecutorCgroup {
    /// The cgroup's directories, once each.
    #[cfg_attr(not(test), allow(dead_code))] // for tests and messages; unused by the node yet
    pub fn paths(&self) -> Vec<PathBuf> {
        self.dirs.distinct()
    }

    /// Opens the `cgroup.procs` files a child writes `0` into to join this cgroup.
    /// Raises the cpu and memory limits to `limits`, which must be no lower than the
    /// ones written at creation (the node widens an MPI daemon's rank to hold its node's
    /// share of the job).
    pub fn raise_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        let cpu_and_memory = Limits {
            pids_max: None,
            ..*limits
        };
        match &self.dirs {
            CgroupDirs::V1(d) => v1::raise_limits(d, &cpu_and_memory),
            CgroupDirs::V2(d) => v2::write_limits(d, &cpu_and_memory),
        }
    }

    pub fn procs_files(&self) -> Result<CgroupJoin, CgroupError> {
        let mut files = Vec::new();
        for dir in self.dirs.distinct() {
            let path = dir.join("cgroup.procs");
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|source| CgroupError::Write {
                    path,
                    value: "0".to_string(),
                    source,
                })?;
            files.push(file);
        }
        Ok(CgroupJoin { files })
    }

    /// What the cgroup has used so far.
    pub fn usage(&self) -> Result<Usage, CgroupError> {
        match &self.dirs {
            CgroupDirs::V1(d) => v1::usage(d),
            CgroupDirs::V2(d) => v2::usage(d),
        }
    }

    /// The processes in the cgroup, sorted (v1: in any of its hierarchies).
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let mut all = BTreeSet::new();
        for dir in self.dirs.distinct() {
            all.extend(read_pids(&dir.join("cgroup.procs"))?);
        }
        Ok(all.into_iter().collect())
    }

    /// Kills every process in the cgroup, those that left the executor's process group or
    /// session included, and waits, at most [`KILL_WAIT_MAX`], until it is empty.
    ///
    /// v2 writes `1` to `cgroup.kill` where the kernel has it (5.14+), else freezes the
    /// cgroup, SIGKILLs each process and thaws it. v1 does the freeze, kill, thaw round
    /// through the freezer hierarchy. The freeze keeps anyone from forking between the
    /// read of `cgroup.procs` and the kills.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        self.kill_all_within(KILL_WAIT_MAX)
    }

    fn kill_all_within(&self, wait_max: Duration) -> Result<(), CgroupError> {
        let start = Instant::now();
        let mut backoff = Backoff::new();
        loop {
            match &self.dirs {
                CgroupDirs::V1(d) => v1::kill_round(d)?,
                CgroupDirs::V2(d) => v2::kill_round(d)?,
            }
            // Neither version has an event we could block on for every case: v1 has no
            // notification of a cgroup emptying short of the release agent (a system-wide
            // helper program), and v2's `cgroup.events` needs inotify plumbing for a wait
            // that is normally over within milliseconds. So re-check with a short doubling
            // pause, and signal again each round (harmless to the dying, and it catches
            // anything that slipped in).
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            let waited = start.elapsed();
            if waited >= wait_max {
                return Err(CgroupError::KillTimeout {
                    path: self.primary_dir(),
                    pids,
                    waited,
                });
            }
            backoff.sleep();
        }
    }

    /// Kills anything left inside ([`ExecutorCgroup::kill_all`]) and removes the cgroup's
    /// directories, retrying a busy one for at most [`REMOVE_WAIT_MAX`]. A directory that
    /// is already gone counts as removed.
    pub fn remove(self) -> Result<(), CgroupError> {
        if !self.pids()?.is_empty() {
            self.kill_all()?;
        }
        for dir in self.dirs.distinct() {
            remove_dir_bounded(&dir)?;
        }
        Ok(())
    }

    /// Best-effort undo of a half-made cgroup (nothing was started in it).
    fn discard(&mut self) {
        for dir in self.made.drain(..) {
            if let Err(e) = std::fs::remove_dir(&dir) {
                tracing::warn!("cannot remove half-made cgroup {}: {e}", dir.display());
            }
        }
    }

    /// The directory named in errors about the cgroup as a whole.
    fn primary_dir(&self) -> PathBuf {
        match &self.dirs {
            CgroupDirs::V1(d) => d.freezer.clone(),
            CgroupDirs::V2(d) => d.clone(),
        }
    }
}

/// Refuses names that are not one plain directory name.
fn validate_name(name: &str) -> Result<(), CgroupError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > NAME_BYTES_MAX {
        Some("longer than 128 bytes")
    } else if name.starts_with('.') {
        Some("starts with a dot")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        Some("only ASCII letters, digits, `-`, `_` and `.` are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(CgroupError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// A doubling pause from [`BACKOFF_MIN`] to [`BACKOFF_MAX`].
struct Backoff(Duration);

impl Backoff {
    fn new() -> Backoff {
        Backoff(BACKOFF_MIN)
    }

    fn sleep(&mut self) {
        std::thread::sleep(self.0);
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
    }
}

/// `rmdir`, retrying `EBUSY` (the kernel can hold a just-emptied cgroup briefly) for at most
/// [`REMOVE_WAIT_MAX`]; a missing directory is fine.
fn remove_dir_bounded(dir: &Path) -> Result<(), CgroupError> {
    let start = Instant::now();
    let mut backoff = Backoff::new();
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY) && start.elapsed() < REMOVE_WAIT_MAX =>
            {
                backoff.sleep();
            }
            Err(source) => {
                return Err(CgroupError::Remove {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
    }
}

fn read_to_string(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `value` with one `write(2)`, as cgroupfs expects.
fn write_value(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

/// The pids in a `cgroup.procs` file; a missing file (its cgroup is gone) holds none.
/// Suffix of the leaf cgroup the agent moves itself into on v2 (`<root_name>-agent`).
pub const AGENT_LEAF_SUFFIX: &str = "-agent";

/// v2's rule: a cgroup that gives controllers to its children holds no process itself. A
/// node started by systemd with `Delegate=yes` sits alone in its own cgroup, so it moves
/// itself into a leaf `<own>/<root_name>-agent`, beside the executors' root, and the own
/// cgroup can then delegate. Other processes in the own cgroup are not ours to move:
/// enabling the controllers then fails and says so.
fn leave_for_leaf(own: &Path, root_name: &str) -> Result<(), CgroupError> {
    let me = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    if !read_pids(&own.join("cgroup.procs"))?.contains(&me) {
        return Ok(());
    }
    let leaf = own.join(format!("{root_name}{AGENT_LEAF_SUFFIX}"));
    match std::fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(source) => return Err(CgroupError::Create { path: leaf, source }),
    }
    let procs = leaf.join("cgroup.procs");
    std::fs::write(&procs, me.to_string()).map_err(|source| CgroupError::Write {
        path: procs,
        value: me.to_string(),
        source,
    })
}

fn read_pids(path: &Path) -> Result<Vec<i32>, CgroupError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CgroupError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    parse_pids(&text).map_err(|detail| CgroupError::Parse {
        path: path.to_path_buf(),
        detail,
    })
}

/// Parses `cgroup.procs`: one pid per line (v1 may repeat and does not sort).
fn parse_pids(text: &str) -> Result<Vec<i32>, String> {
    let mut pids: Vec<i32> = text
        .split_whitespace()
        .map(|w| w.parse().map_err(|_| format!("`{w}` is not a pid")))
        .collect::<Result<_, _>>()?;
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}

/// SIGKILLs each pid; one already gone is fine.
fn kill_pids(dir: &Path, pids: &[i32]) -> Result<(), CgroupError> {
    use nix::sys::signal::{kill, Signal};
    for &pid in pids {
        match kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL) {
            Ok(()) | Err(nix::Error::ESRCH) => {}
            Err(source) => {
                return Err(CgroupError::Signal {
                    path: dir.to_path_buf(),
                    pid,
                    source,
                })
            }
        }
    }
    Ok(())
}

/// The value of `key` in a flat-keyed file (`key value` per line, e.g. `cpu.stat`).
fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        if words.next()? == key {
            words.next()?.parse().ok()
        } else {
            None
        }
    })
}

/// Reads `key` from a flat-keyed file; a missing key is an error naming the file.
fn read_keyed(path: &Path, key: &str) -> Result<u64, CgroupError> {
    let text = read_to_string(path)?;
    keyed_value(&text, key).ok_or_else(|| CgroupError::Parse {
        path: path.to_path_buf(),
        detail: format!("no `{key}` line"),
    })
}

/// Reads a file holding a single number.
fn read_number(path: &Path) -> Result<u64, CgroupError> {
    let text = read_to_string(path)?;
    text.trim().parse().map_err(|_| CgroupError::Parse {
        path: path.to_path_buf(),
        detail: format!("`{}` is not a number", text.trim()),
    })
}
