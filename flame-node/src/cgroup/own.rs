//! Where this process's own cgroups are: the cgroup mounts (`/proc/self/mountinfo`) and
//! the process's place in each hierarchy (`/proc/self/cgroup`), read and parsed.

use super::*;

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
pub(super) fn unescape_mount_field(field: &str) -> String {
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
pub(super) fn relative_to<'a>(path: &'a str, root: &str) -> Option<&'a str> {
    let root = root.trim_end_matches('/');
    let rest = path.strip_prefix(root)?;
    if rest.is_empty() {
        Some("")
    } else {
        rest.strip_prefix('/')
    }
}
