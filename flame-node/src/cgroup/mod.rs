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

mod v1;
mod v2;

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

/// A cgroup filesystem mount, from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupMount {
    /// The cgroup path the mount shows at its mount point (field 4), e.g. `/`.
    pub root: String,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// `None` for cgroup2; the v1 controllers (and `name=` options) otherwise.
    pub controllers: Option<Vec<String>>,
}

/// One line of `/proc/self/cgroup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcCgroup {
    /// The hierarchy's controllers; empty for the v2 line (`0::/path`).
    pub controllers: Vec<String>,
    /// The process's cgroup in that hierarchy.
    pub path: String,
}

/// The node's own cgroup directory in one hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OwnDir {
    /// The hierarchy's mount point: ancestors are walked up to here and no further.
    pub mount_point: PathBuf,
    /// The node's cgroup in it.
    pub dir: PathBuf,
}

/// The node's own cgroups in every mounted hierarchy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct OwnCgroups {
    /// In the unified hierarchy, if mounted.
    pub v2: Option<OwnDir>,
    /// Per v1 controller name (`cpu`, `memory`, ...), in mountinfo order.
    pub v1: Vec<(String, OwnDir)>,
}

impl OwnCgroups {
    /// The node's cgroup in the v1 hierarchy of `controller`.
    pub fn v1_dir(&self, controller: &str) -> Option<&OwnDir> {
        self.v1
            .iter()
            .find(|(c, _)| c == controller)
            .map(|(_, d)| d)
    }
}

/// Reads and resolves the node's own cgroups.
pub(crate) fn read_own_cgroups() -> Result<OwnCgroups, CgroupError> {
    let mountinfo = read_to_string(Path::new("/proc/self/mountinfo"))?;
    let proc_cgroup = read_to_string(Path::new("/proc/self/cgroup"))?;
    Ok(own_cgroups(
        &parse_mountinfo(&mountinfo),
        &parse_proc_cgroup(&proc_cgroup),
    ))
}

/// Parses the cgroup and cgroup2 mounts out of `/proc/<pid>/mountinfo`.
pub(crate) fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        // id parent major:minor root mount-point options [optional...] - fstype source super
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(dash) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(root), Some(mount_point), Some(fstype), Some(super_options)) = (
            fields.get(3),
            fields.get(4),
            fields.get(dash + 1),
            fields.get(dash + 3),
        ) else {
            continue;
        };
        let controllers = match *fstype {
            "cgroup2" => None,
            "cgroup" => Some(super_options.split(',').map(str::to_string).collect()),
            _ => continue,
        };
        mounts.push(CgroupMount {
            root: unescape_mount_field(root),
            mount_point: PathBuf::from(unescape_mount_field(mount_point)),
            controllers,
        });
    }
    mounts
}

/// Undoes mountinfo's octal escapes (`\040` for a space, and so on).
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)))
            .map(|d| d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0')));
        match escaped.and_then(|v| u8::try_from(v).ok()) {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses `/proc/<pid>/cgroup` (`hierarchy-id:controllers:path` per line).
pub(crate) fn parse_proc_cgroup(text: &str) -> Vec<ProcCgroup> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            Some(ProcCgroup {
                controllers: controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect(),
                path: path.to_string(),
            })
        })
        .collect()
}

/// Joins the process's cgroups to the mounts that show them. A mount whose root is not an
/// ancestor of the process's cgroup (a bind mount of some other subtree) cannot show it and
/// is passed over.
pub(crate) fn own_cgroups(mounts: &[CgroupMount], procs: &[ProcCgroup]) -> OwnCgroups {
    let mut own = OwnCgroups::default();
    for proc_line in procs {
        let v2 = proc_line.controllers.is_empty();
        let found = mounts.iter().find_map(|m| {
            let matches = match &m.controllers {
                None => v2,
                Some(opts) => {
                    !v2 && proc_line
                        .controllers
                        .iter()
                        .all(|c| opts.iter().any(|o| o == c))
                }
            };
            if !matches {
                return None;
            }
            let rel = relative_to(&proc_line.path, &m.root)?;
            Some(OwnDir {
                mount_point: m.mount_point.clone(),
                dir: m.mount_point.join(rel),
            })
        });
        let Some(dir) = found else { continue };
        if v2 {
            own.v2.get_or_insert(dir);
        } else {
            for c in &proc_line.controllers {
                if own.v1_dir(c).is_none() {
                    own.v1.push((c.clone(), dir.clone()));
                }
            }
        }
    }
    own
}

/// `path` below `root`, both absolute cgroup paths, as a relative path (`""` when equal).
fn relative_to<'a>(path: &'a str, root: &str) -> Option<&'a str> {
    let root = root.trim_end_matches('/');
    let rest = path.strip_prefix(root)?;
    if rest.is_empty() {
        Some("")
    } else {
        rest.strip_prefix('/')
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    /// Lets a real-cgroup test run only where it can: as root with cgroups. Elsewhere it
    /// prints a skip line, or under `CI=true` fails so a CI machine cannot skip silently.
    pub(crate) fn real_tree(test: &str) -> Option<TreeGuard> {
        let name = format!("flame-test-{}-{test}", std::process::id());
        let why = if !nix::unistd::geteuid().is_root() {
            "not running as root".to_string()
        } else {
            match CgroupTree::detect(&name) {
                Ok(tree) => return Some(TreeGuard(Some(tree))),
                Err(e) => e.to_string(),
            }
        };
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test} needs root and cgroups on CI: {why}");
        }
        eprintln!("skipping {test}: {why}");
        None
    }

    /// Removes a test's tree, with anything left in it, even when the test fails.
    #[derive(Debug)]
    pub(crate) struct TreeGuard(Option<CgroupTree>);

    impl std::ops::Deref for TreeGuard {
        type Target = CgroupTree;
        fn deref(&self) -> &CgroupTree {
            // Only Drop takes the tree out.
            self.0.as_ref().unwrap_or_else(|| unreachable!())
        }
    }

    impl Drop for TreeGuard {
        fn drop(&mut self) {
            if let Some(tree) = self.0.take() {
                let paths = tree.paths();
                if let Err(e) = tree.destroy() {
                    eprintln!("cannot clean up test cgroups {paths:?}: {e}");
                }
            }
        }
    }

    #[test]
    fn mountinfo_v1_and_v2_are_parsed() {
        let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:7 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 /docker/abc /mnt/my\\040cg rw - cgroup cgroup rw,pids
";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 4);
        assert_eq!(
            mounts[0].mount_point,
            Path::new("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert_eq!(
            mounts[0].controllers.as_deref(),
            Some(&["rw".to_string(), "cpu".to_string(), "cpuacct".to_string()][..])
        );
        assert_eq!(mounts[2].controllers, None);
        assert_eq!(mounts[3].mount_point, Path::new("/mnt/my cg"));
        assert_eq!(mounts[3].root, "/docker/abc");
    }

    #[test]
    fn own_cgroups_v1_with_comounted_cpu_and_nested_memory() {
        let mounts = parse_mountinfo(
            "\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
36 31 0:33 /outer /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
37 31 0:34 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer
40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
",
        );
        let procs = parse_proc_cgroup(
            "\
9:name=systemd:/
8:pids:/outer/inner
6:freezer:/
4:memory:/process_api/12aa
2:cpu,cpuacct:/
0::/
",
        );
        let own = own_cgroups(&mounts, &procs);
        let dir = |c: &str| own.v1_dir(c).map(|d| d.dir.clone());
        assert_eq!(
            dir("cpu"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"))
        );
        assert_eq!(dir("cpuacct"), dir("cpu"));
        assert_eq!(
            dir("memory"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/process_api/12aa"))
        );
        assert_eq!(
            dir("pids"),
            Some(PathBuf::from("/sys/fs/cgroup/pids/inner"))
        );
        assert_eq!(
            dir("freezer"),
            Some(PathBuf::from("/sys/fs/cgroup/freezer"))
        );
        assert_eq!(
            own.v2.map(|d| d.dir),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn own_cgroups_pure_v2() {
        let mounts = parse_mountinfo(
            "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
        );
        let procs = parse_proc_cgroup("0::/system.slice/flame-node.service\n");
        let own = own_cgroups(&mounts, &procs);
        assert_eq!(
            own.v2,
            Some(OwnDir {
                mount_point: PathBuf::from("/sys/fs/cgroup"),
                dir: PathBuf::from("/sys/fs/cgroup/system.slice/flame-node.service"),
            })
        );
        assert!(own.v1.is_empty());
        // A bind mount of another subtree does not show our cgroup.
        let mounts = parse_mountinfo("29 23 0:26 /other /mnt rw - cgroup2 cgroup2 rw\n");
        assert_eq!(own_cgroups(&mounts, &procs).v2, None);
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("exec-12_a.b").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", ".hidden"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_name(&"x".repeat(NAME_BYTES_MAX + 1)).is_err());
    }

    #[test]
    fn pids_and_keyed_files_parse() {
        assert_eq!(parse_pids("12\n3\n12\n"), Ok(vec![3, 12]));
        assert_eq!(parse_pids(""), Ok(vec![]));
        assert!(parse_pids("x\n").is_err());
        let text = "usage_usec 10\nnr_throttled 3\nthrottled_usec 7\n";
        assert_eq!(keyed_value(text, "nr_throttled"), Some(3));
        assert_eq!(keyed_value(text, "throttled"), None);
    }

    #[test]
    fn cpu_quota_follows_millis() {
        let l = |m| Limits {
            cpu_millis: Some(m),
            ..Limits::default()
        };
        assert_eq!(l(500).cpu_quota_us(), Some(50_000));
        assert_eq!(l(2000).cpu_quota_us(), Some(200_000));
        assert_eq!(l(1).cpu_quota_us(), Some(CPU_QUOTA_MIN_US));
        assert_eq!(Limits::default().cpu_quota_us(), None);
    }

    /// Spawns `sh -c script` inside `exec`, joining it between fork and exec.
    fn spawn_in(exec: &ExecutorCgroup, script: &str) -> std::process::Child {
        let join = exec
            .procs_files()
            .unwrap_or_else(|e| panic!("procs files: {e}"));
        let fds = join.raw_fds();
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c").arg(script).process_group(0);
        // SAFETY: the closure only calls write(2), which is async-signal-safe, on
        // descriptors opened before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &fds {
                    if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn: {e}"));
        drop(join);
        child
    }

    /// Waits at most `limit` for the child to exit.
    pub(crate) fn wait_for(
        child: &mut std::process::Child,
        limit: Duration,
    ) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        let mut backoff = Backoff::new();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if start.elapsed() > limit {
                return None;
            }
            backoff.sleep();
        }
    }

    /// Whether `pid` is a live process (neither gone nor a zombie).
    pub(crate) fn alive(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => false,
            // The state follows the `(comm)` field, which may itself hold spaces.
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z" && state != "X"),
        }
    }

    fn limits() -> Limits {
        Limits {
            cpu_millis: Some(500),
            memory_bytes: Some(64 << 20),
            pids_max: Some(64),
        }
    }

    #[test]
    fn real_memory_limit_oom_kills() {
        let Some(tree) = real_tree("oom") else {
            return;
        };
        let exec = tree.create("oom", &limits()).unwrap();
        let mut child = spawn_in(&exec, "exec tail /dev/zero");
        let status = wait_for(&mut child, Duration::from_secs(20));
        let usage = exec.usage().unwrap();
        eprintln!("oom: {status:?} {usage:?}");
        exec.remove().unwrap();
        let status = status.unwrap_or_else(|| panic!("tail did not die"));
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        assert!(usage.oom_kills >= 1, "{usage:?}");
        assert!(usage.memory_peak_bytes <= 64 << 20, "{usage:?}");
        assert!(usage.memory_peak_bytes >= 32 << 20, "{usage:?}");
    }

    #[test]
    fn real_cpu_limit_throttles() {
        let Some(tree) = real_tree("cpu") else {
            return;
        };
        let exec = tree.create("cpu", &limits()).unwrap();
        let start = Instant::now();
        let mut child = spawn_in(&exec, "while :; do :; done");
        // At least 1.5 s, and on a machine busy with other work (which may keep the loop
        // under its quota for a while), until the kernel has throttled it, up to 20 s.
        std::thread::sleep(Duration::from_millis(1500));
        let mut usage = exec.usage().unwrap();
        while usage.throttled_periods == 0 && start.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(200));
            usage = exec.usage().unwrap();
        }
        let wall = start.elapsed();
        exec.kill_all().unwrap();
        let status = wait_for(&mut child, Duration::from_secs(5));
        exec.remove().unwrap();
        eprintln!("cpu: {usage:?} over {wall:?}");
        assert!(status.is_some());
        assert!(usage.throttled_periods > 0, "{usage:?}");
        assert!(
            (usage.cpu_ns as f64) <= 0.6 * wall.as_nanos() as f64,
            "{usage:?} over {wall:?}"
        );
        assert!(usage.cpu_ns > 0);
    }

    /// Starts `sh` in `cg` with one `sleep` that left for a session of its own and one
    /// that did not; waits (bounded) until both run. Returns the child and the pids.
    pub(crate) fn spawn_tree_in(cg: &ExecutorCgroup) -> (std::process::Child, Vec<i32>) {
        let child = spawn_in(cg, "setsid sleep 1000 & sleep 1000");
        let start = Instant::now();
        let mut backoff = Backoff::new();
        let pids = loop {
            let pids = cg.pids().unwrap();
            let sessions: BTreeSet<String> = pids
                .iter()
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|c| c.trim() == "sleep")
                })
                .filter_map(|p| {
                    // After `(comm)`: state ppid pgrp session.
                    let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                    Some(
                        stat.rsplit_once(')')?
                            .1
                            .split_whitespace()
                            .nth(3)?
                            .to_string(),
                    )
                })
                .collect();
            if sessions.len() == 2 {
                break pids;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "sleeps not started: {pids:?} {sessions:?}"
            );
            backoff.sleep();
        };
        (child, pids)
    }

    #[test]
    fn real_kill_all_reaches_escaped_grandchildren() {
        let Some(tree) = real_tree("tree") else {
            return;
        };
        let exec = tree.create("tree", &limits()).unwrap();
        let (mut child, pids) = spawn_tree_in(&exec);
        exec.kill_all().unwrap();
        assert_eq!(exec.pids().unwrap(), Vec::<i32>::new());
        assert!(wait_for(&mut child, Duration::from_secs(5)).is_some());
        for pid in &pids {
            assert!(!alive(*pid), "{pid} survived");
        }
        let paths = exec.paths();
        exec.remove().unwrap();
        for p in paths {
            assert!(!p.exists(), "{p:?}");
        }
        assert_eq!(tree.executor_count(), 0);
    }

    #[test]
    fn real_cleanup_stale_removes_leftovers() {
        let Some(tree) = real_tree("stale") else {
            return;
        };
        let exec = tree.create("left", &limits()).unwrap();
        let mut child = spawn_in(&exec, "sleep 1000");
        let _second = tree.create("left2", &Limits::default()).unwrap();
        assert_eq!(tree.executor_count(), 2);
        // As a restarted node would: it only knows the root.
        assert_eq!(tree.cleanup_stale().unwrap(), 2);
        assert_eq!(tree.executor_count(), 0);
        assert!(wait_for(&mut child, Duration::from_secs(5)).is_some());
    }
}
