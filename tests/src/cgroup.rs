//! Where a node's executor cgroups are, found the way an operator would: the node's own
//! cgroup in each hierarchy from `/proc/<pid>/cgroup`, and each hierarchy's mount point from
//! `/proc/self/mountinfo`. Written independently of `flame-node`'s own code on purpose, so a
//! wrong path in the node shows up as a failed test rather than agreeing with itself.
//!
//! The node makes one directory, its cgroup root (`--cgroup-root`), below its own cgroup in
//! every hierarchy it uses, and one directory `exec-<id>` per executor below that:
//!
//! ```text
//! v1: <mount of cpu>/<node's cpu path>/<root>/exec-<id>, the same for cpuacct, memory,
//!     pids and freezer
//! v2: <mount of cgroup2>/<node's path>/<root>/exec-<id>, the node itself moving into
//!     <mount of cgroup2>/<node's path>/<root>-agent
//! ```

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The v1 controllers a node puts every executor in.
pub const V1_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "freezer"];
/// Prefix of an executor's cgroup directory name; the executor id follows.
pub const EXECUTOR_PREFIX: &str = "exec-";
/// Suffix of the v2 leaf cgroup a node moves itself into, beside its root
/// (`<own>/<root>-agent`).
pub const AGENT_LEAF_SUFFIX: &str = "-agent";
/// Pause between two looks at a cgroup folder while waiting for it to change; the kernel
/// announces neither a new cgroup nor a removed one.
pub const CGROUP_POLL_PAUSE: Duration = Duration::from_millis(50);

/// A cgroup filesystem mount from `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// The cgroup of the hierarchy this mount shows at its mount point (`/` for a whole
    /// hierarchy).
    pub root: String,
    pub mount_point: PathBuf,
    /// `true` for the unified (v2) hierarchy.
    pub v2: bool,
    /// v1 only: the controllers of the hierarchy (`cpu`, `cpuacct`, ...; `name=` options
    /// are left out).
    pub controllers: Vec<String>,
}

/// The cgroup mounts in a mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        // `id parent major:minor root mount-point options [optional...] - fstype source super-options`
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = before.split(' ').collect();
        let mut rest = after.split(' ');
        let (Some(fstype), Some(_source), Some(super_options)) =
            (rest.next(), rest.next(), rest.next())
        else {
            continue;
        };
        if fields.len() < 5 || !matches!(fstype, "cgroup" | "cgroup2") {
            continue;
        }
        let v2 = fstype == "cgroup2";
        let controllers = if v2 {
            Vec::new()
        } else {
            super_options
                .split(',')
                .filter(|o| !o.contains('=') && !matches!(*o, "rw" | "ro"))
                .map(str::to_string)
                .collect()
        };
        mounts.push(CgroupMount {
            root: unescape(fields[3]),
            mount_point: PathBuf::from(unescape(fields[4])),
            v2,
            controllers,
        });
    }
    mounts
}

/// Undoes mountinfo's octal escapes (`\040` is a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            std::str::from_utf8(d)
                .ok()
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        });
        match (bytes[i], octal) {
            (b'\\', Some(b)) => {
                out.push(b);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of `/proc/<pid>/cgroup`: `hierarchy-id:controllers:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// Empty for the unified hierarchy (`0::/path`).
    pub controllers: Vec<String>,
    pub path: String,
}

/// The lines of a `/proc/<pid>/cgroup` text.
pub fn parse_proc_cgroup(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            Some(Membership {
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

/// `mount_point` + the part of `path` below the mount's root.
fn on_disk(mount: &CgroupMount, path: &str) -> Option<PathBuf> {
    let root = mount.root.trim_end_matches('/');
    let below = path.strip_prefix(root)?;
    if !below.is_empty() && !below.starts_with('/') {
        return None;
    }
    Some(mount.mount_point.join(below.trim_start_matches('/')))
}

/// A node's cgroup root in each hierarchy it uses, and the executor cgroups below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCgroups {
    /// `(controller, <node's own cgroup>/<root name>)`; for v2 one entry named `unified`.
    /// Co-mounted v1 controllers (`cpu,cpuacct`) share a directory.
    pub roots: Vec<(String, PathBuf)>,
    /// v2 only: the leaf `<own>/<root>-agent` the node moves itself into.
    pub agent_leaf: Option<PathBuf>,
}

impl NodeCgroups {
    /// The roots named `root_name` below the cgroups of the process whose
    /// `/proc/<pid>/cgroup` is `proc_cgroup`, with the mounts of `mountinfo`; `v2` picks
    /// the unified hierarchy over the v1 controllers. `Err` says what is missing.
    pub fn locate(
        proc_cgroup: &str,
        mountinfo: &str,
        root_name: &str,
        v2: bool,
    ) -> Result<NodeCgroups, String> {
        let mounts = parse_mountinfo(mountinfo);
        let members = parse_proc_cgroup(proc_cgroup);
        let mut roots = Vec::new();
        let mut agent_leaf = None;
        if v2 {
            let mount = mounts
                .iter()
                .find(|m| m.v2)
                .ok_or("no cgroup2 filesystem is mounted")?;
            let member = members
                .iter()
                .find(|m| m.controllers.is_empty())
                .ok_or("the process has no `0::` line in /proc/<pid>/cgroup")?;
            // On v2 the node moves itself into a leaf beside its root, so that its own
            // cgroup may hand controllers down; the root is below the leaf's parent.
            let leaf = format!("/{root_name}{AGENT_LEAF_SUFFIX}");
            let path = member.path.strip_suffix(&leaf).unwrap_or(&member.path);
            let own = on_disk(mount, path).ok_or_else(|| {
                format!(
                    "its cgroup {} is outside the cgroup2 mount {}",
                    member.path,
                    mount.mount_point.display()
                )
            })?;
            roots.push(("unified".to_string(), own.join(root_name)));
            agent_leaf = Some(own.join(&leaf[1..]));
        } else {
            for controller in V1_CONTROLLERS {
                let has = |c: &Vec<String>| c.iter().any(|x| x == controller);
                let mount = mounts
                    .iter()
                    .find(|m| !m.v2 && has(&m.controllers))
                    .ok_or_else(|| {
                        format!("no cgroup v1 hierarchy has the {controller} controller")
                    })?;
                let member = members
                    .iter()
                    .find(|m| has(&m.controllers))
                    .ok_or_else(|| format!("the process is in no {controller} cgroup"))?;
                let own = on_disk(mount, &member.path).ok_or_else(|| {
                    format!(
                        "its {controller} cgroup {} is outside the mount {}",
                        member.path,
                        mount.mount_point.display()
                    )
                })?;
                roots.push((controller.to_string(), own.join(root_name)));
            }
        }
        Ok(NodeCgroups { roots, agent_leaf })
    }

    /// [`Self::locate`] for the live process `pid`.
    pub fn of_process(pid: u32, root_name: &str, v2: bool) -> Result<NodeCgroups, String> {
        let read =
            |p: &str| std::fs::read_to_string(p).map_err(|e| format!("cannot read {p}: {e}"));
        Self::locate(
            &read(&format!("/proc/{pid}/cgroup"))?,
            &read("/proc/self/mountinfo")?,
            root_name,
            v2,
        )
    }

    /// The root directory in `controller`'s hierarchy (`unified` for v2).
    pub fn root(&self, controller: &str) -> &Path {
        self.roots
            .iter()
            .find(|(c, _)| c == controller)
            .map(|(_, p)| p.as_path())
            .unwrap_or_else(|| panic!("no `{controller}` hierarchy in {self:?}"))
    }

    /// Whether these are v2 roots.
    pub fn is_v2(&self) -> bool {
        self.roots.iter().any(|(c, _)| c == "unified")
    }

    /// The root directory that holds cpu files (`cpu.stat`, the quota).
    pub fn cpu_root(&self) -> &Path {
        self.root(if self.is_v2() { "unified" } else { "cpu" })
    }

    /// The root directory that holds memory files.
    pub fn memory_root(&self) -> &Path {
        self.root(if self.is_v2() { "unified" } else { "memory" })
    }

    /// The distinct root directories.
    pub fn distinct_roots(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = self.roots.iter().map(|(_, p)| p.clone()).collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// `exec-*` cgroups below each root, as `(root, names sorted)`. A root that does not
    /// exist has none.
    pub fn executors(&self) -> Vec<(PathBuf, Vec<String>)> {
        self.distinct_roots()
            .into_iter()
            .map(|root| {
                let names = executor_dirs(&root);
                (root, names)
            })
            .collect()
    }

    /// How many `exec-*` cgroups there are, over every hierarchy.
    pub fn executor_count(&self) -> usize {
        self.executors().iter().map(|(_, n)| n.len()).sum()
    }

    /// Waits until an executor cgroup exists below the cpu root and returns its name; with
    /// several, the one with the highest id.
    pub async fn wait_executor(&self, timeout: Duration) -> Result<String, String> {
        let root = self.cpu_root().to_path_buf();
        let deadline = Instant::now() + timeout;
        loop {
            let mut names = executor_dirs(&root);
            names.sort_by_key(|n| executor_id(n));
            if let Some(last) = names.pop() {
                return Ok(last);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no {EXECUTOR_PREFIX}* cgroup in {} after {timeout:?}",
                    root.display()
                ));
            }
            tokio::time::sleep(CGROUP_POLL_PAUSE).await;
        }
    }

    /// Waits until the executor cgroup `name` is gone from every hierarchy.
    pub async fn wait_executor_gone(&self, name: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left: Vec<PathBuf> = self
                .distinct_roots()
                .into_iter()
                .map(|r| r.join(name))
                .filter(|d| d.exists())
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("still there after {timeout:?}: {left:?}"));
            }
            tokio::time::sleep(CGROUP_POLL_PAUSE).await;
        }
    }

    /// Best-effort removal for a cluster being torn down: kills what is left in the
    /// executor cgroups (escaped grandchildren of a failed test), then removes them and
    /// the roots, for at most `timeout`. Errors are ignored: the node is already gone and
    /// a leftover empty cgroup harms nobody but is untidy.
    pub fn remove_all(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for root in self.distinct_roots() {
            for name in executor_dirs(&root) {
                remove_cgroup(&root.join(name), deadline);
            }
            remove_cgroup(&root, deadline);
        }
        if let Some(leaf) = &self.agent_leaf {
            remove_cgroup(leaf, deadline);
        }
    }
}

/// The executor id in an `exec-<id>` name (0 when it has none).
pub fn executor_id(name: &str) -> u64 {
    name.strip_prefix(EXECUTOR_PREFIX)
        .and_then(|id| id.parse().ok())
        .unwrap_or(0)
}

/// Names of the `exec-*` directories in `root`; none when it cannot be listed.
pub fn executor_dirs(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(EXECUTOR_PREFIX))
        .collect();
    names.sort();
    names
}

/// The pids in a cgroup directory's `cgroup.procs`.
pub fn procs(dir: &Path) -> io::Result<Vec<i32>> {
    Ok(std::fs::read_to_string(dir.join("cgroup.procs"))?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// Reads a `key value` line of a flat-keyed cgroup file such as `cpu.stat`.
pub fn keyed(path: &Path, key: &str) -> Result<u64, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
        .ok_or_else(|| format!("no `{key}` in {}:\n{text}", path.display()))
}

/// A cgroup file's whole content, trimmed.
pub fn read_value(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_string())
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// SIGKILLs what is in `dir` and removes it, retrying until `deadline`.
fn remove_cgroup(dir: &Path, deadline: Instant) {
    loop {
        if !dir.exists() {
            return;
        }
        for pid in procs(dir).unwrap_or_default() {
            // Gone already is fine.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        // A v1 freezer cgroup left FROZEN would hold its tasks against the kill.
        let state = dir.join("freezer.state");
        if state.exists() {
            let _ = std::fs::write(&state, "THAWED");
        }
        if std::fs::remove_dir(dir).is_ok() || Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 /process_api /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime shared:5 - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/uni\\040fied rw,relatime - cgroup2 cgroup2 rw
";
    const PROC_CGROUP: &str = "\
9:name=systemd:/
8:pids:/a
6:freezer:/
4:memory:/process_api/b71b
1:cpu,cpuacct:/
0::/svc
";

    #[test]
    fn v1_roots_follow_each_hierarchy() {
        let found = NodeCgroups::locate(PROC_CGROUP, MOUNTINFO, "r", false).unwrap();
        assert_eq!(found.root("cpu"), Path::new("/sys/fs/cgroup/cpu,cpuacct/r"));
        assert_eq!(
            found.root("cpuacct"),
            Path::new("/sys/fs/cgroup/cpu,cpuacct/r")
        );
        // The mount shows /process_api at its mount point.
        assert_eq!(
            found.root("memory"),
            Path::new("/sys/fs/cgroup/memory/b71b/r")
        );
        assert_eq!(found.root("pids"), Path::new("/sys/fs/cgroup/pids/a/r"));
        assert_eq!(found.distinct_roots().len(), 4);
        assert!(!found.is_v2());
    }

    #[test]
    fn v2_root_is_below_the_unified_mount() {
        let found = NodeCgroups::locate(PROC_CGROUP, MOUNTINFO, "r", true).unwrap();
        assert_eq!(found.cpu_root(), Path::new("/sys/fs/cgroup/uni fied/svc/r"));
        assert_eq!(found.memory_root(), found.cpu_root());
        // Seen from inside the leaf the node moved into, the root is the same.
        let moved = PROC_CGROUP.replace("0::/svc", "0::/svc/r-agent");
        let found = NodeCgroups::locate(&moved, MOUNTINFO, "r", true).unwrap();
        assert_eq!(found.cpu_root(), Path::new("/sys/fs/cgroup/uni fied/svc/r"));
        assert_eq!(
            found.agent_leaf.as_deref(),
            Some(Path::new("/sys/fs/cgroup/uni fied/svc/r-agent"))
        );
    }

    #[test]
    fn a_missing_controller_is_named() {
        let err = NodeCgroups::locate("1:cpu:/\n", MOUNTINFO, "r", false).unwrap_err();
        assert!(err.contains("memory") || err.contains("cpuacct"), "{err}");
    }

    #[test]
    fn executor_names_sort_by_id() {
        assert_eq!(executor_id("exec-12"), 12);
        assert_eq!(executor_id("other"), 0);
    }
}
