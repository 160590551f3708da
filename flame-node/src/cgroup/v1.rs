//! The cgroup v1 driver: one hierarchy per controller (Documentation/admin-guide/cgroup-v1/).

use super::{
    kill_pids, read_keyed, read_number, read_pids, read_to_string, write_value, Backoff,
    CgroupError, Limits, Usage, V1Dirs, CPU_PERIOD_US, FREEZE_WAIT_MAX,
};
use std::path::Path;
use std::time::Instant;

/// The v1 controllers the node needs, each in a mounted hierarchy.
pub(super) const CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "freezer"];

/// Writes `limits` into a new cgroup's files.
pub(super) fn write_limits(d: &V1Dirs, limits: &Limits) -> Result<(), CgroupError> {
    if let Some(quota_us) = limits.cpu_quota_us() {
        write_value(&d.cpu.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
        write_value(&d.cpu.join("cpu.cfs_quota_us"), &quota_us.to_string())?;
    }
    if let Some(bytes) = limits.memory_bytes {
        let bytes = bytes.to_string();
        write_value(&d.memory.join("memory.limit_in_bytes"), &bytes)?;
        // memory+swap gets the same bound so swap cannot stretch the limit. It exists only
        // with swap accounting on, and must stay >= the memory limit, hence second.
        let memsw = d.memory.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            write_value(&memsw, &bytes)?;
        }
    }
    if let Some(max) = limits.pids_max {
        write_value(&d.pids.join("pids.max"), &max.to_string())?;
    }
    Ok(())
}

/// Raises a cgroup's limits to `limits` (which must not be lower): memory+swap first, since
/// it must stay >= the memory limit.
pub(super) fn raise_limits(d: &V1Dirs, limits: &Limits) -> Result<(), CgroupError> {
    if let Some(quota_us) = limits.cpu_quota_us() {
        write_value(&d.cpu.join("cpu.cfs_quota_us"), &quota_us.to_string())?;
    }
    if let Some(bytes) = limits.memory_bytes {
        let bytes = bytes.to_string();
        let memsw = d.memory.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            write_value(&memsw, &bytes)?;
        }
        write_value(&d.memory.join("memory.limit_in_bytes"), &bytes)?;
    }
    Ok(())
}

/// Reads what the cgroup has used.
pub(super) fn usage(d: &V1Dirs) -> Result<Usage, CgroupError> {
    let cpu_stat = d.cpu.join("cpu.stat");
    let oom_control = d.memory.join("memory.oom_control");
    // `oom_kill` joined memory.oom_control in Linux 4.13; older kernels report no count.
    let oom_kills = super::keyed_value(&read_to_string(&oom_control)?, "oom_kill").unwrap_or(0);
    Ok(Usage {
        cpu_ns: read_number(&d.cpuacct.join("cpuacct.usage"))?,
        memory_peak_bytes: read_number(&d.memory.join("memory.max_usage_in_bytes"))?,
        oom_kills,
        throttled_periods: read_keyed(&cpu_stat, "nr_throttled")?,
        throttled_ns: read_keyed(&cpu_stat, "throttled_time")?,
    })
}

/// One kill round: freeze, SIGKILL everything in the cgroup, thaw. v1's freezer holds a
/// frozen task even against SIGKILL, so the thaw is what lets the kills land; it is done
/// even when the kills fail, so no error leaves the executor frozen.
pub(super) fn kill_round(d: &V1Dirs) -> Result<(), CgroupError> {
    let state = d.freezer.join("freezer.state");
    let freezable = state.exists();
    if freezable {
        write_value(&state, "FROZEN")?;
        wait_frozen(&state)?;
    }
    let killed = kill_members(d);
    if freezable {
        write_value(&state, "THAWED")?;
    }
    killed
}

/// SIGKILLs every process in any of the cgroup's hierarchies.
fn kill_members(d: &V1Dirs) -> Result<(), CgroupError> {
    let mut pids = Vec::new();
    for dir in super::CgroupDirs::V1(d.clone()).distinct() {
        pids.extend(read_pids(&dir.join("cgroup.procs"))?);
    }
    pids.sort_unstable();
    pids.dedup();
    kill_pids(&d.freezer, &pids)
}

/// Waits, at most [`FREEZE_WAIT_MAX`], for `freezer.state` to leave `FREEZING`. The state
/// has no change notification, so this re-checks with a short pause; a freeze that does
/// not complete (a task in uninterruptible sleep) is not an error, the round goes on.
fn wait_frozen(state: &Path) -> Result<(), CgroupError> {
    let start = Instant::now();
    let mut backoff = Backoff::new();
    while read_to_string(state)?.trim() != "FROZEN" && start.elapsed() < FREEZE_WAIT_MAX {
        backoff.sleep();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::{write_limits, CONTROLLERS};

    fn fake(base: &Path) -> V1Dirs {
        V1Dirs {
            cpu: base.join("cpu"),
            cpuacct: base.join("cpuacct"),
            memory: base.join("memory"),
            pids: base.join("pids"),
            freezer: base.join("freezer"),
        }
    }

    fn read(p: impl AsRef<Path>) -> String {
        std::fs::read_to_string(p.as_ref()).unwrap_or_else(|e| panic!("{:?}: {e}", p.as_ref()))
    }

    fn write(p: impl AsRef<Path>, text: &str) {
        std::fs::write(p.as_ref(), text).unwrap_or_else(|e| panic!("{:?}: {e}", p.as_ref()));
    }

    fn limits() -> Limits {
        Limits {
            cpu_millis: Some(500),
            memory_bytes: Some(64 << 20),
            pids_max: Some(64),
        }
    }

    fn fake_own(base: &Path) -> V1Dirs {
        for c in CONTROLLERS {
            std::fs::create_dir(base.join(c)).unwrap();
        }
        fake(base)
    }

    /// Removes the files a test wrote: cgroupfs lets rmdir remove a cgroup with its
    /// interface files, a plain directory needs them gone first.
    fn remove_files(dir: &Path) {
        for f in std::fs::read_dir(dir).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
    }

    #[test]
    fn fake_tree_limits_usage_kill_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let tree = CgroupTree::at(CgroupDirs::V1(fake_own(tmp.path())), "flame-node-a").unwrap();
        assert_eq!(tree.version(), Version::V1);
        assert_eq!(tree.paths().len(), 5);
        let exec = tree.create("e1", &limits()).unwrap();
        let dir = |c: &str| tmp.path().join(c).join("flame-node-a/e1");
        assert_eq!(exec.paths().len(), 5);
        assert_eq!(read(dir("cpu").join("cpu.cfs_period_us")), "100000");
        assert_eq!(read(dir("cpu").join("cpu.cfs_quota_us")), "50000");
        assert_eq!(
            read(dir("memory").join("memory.limit_in_bytes")),
            "67108864"
        );
        // No swap accounting in this fake kernel: memsw is not created.
        assert!(!dir("memory").join("memory.memsw.limit_in_bytes").exists());
        assert_eq!(read(dir("pids").join("pids.max")), "64");
        assert_eq!(tree.executor_count(), 1);

        write(dir("cpuacct").join("cpuacct.usage"), "123456789\n");
        write(dir("memory").join("memory.max_usage_in_bytes"), "4096\n");
        write(
            dir("memory").join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        );
        write(
            dir("cpu").join("cpu.stat"),
            "nr_periods 20\nnr_throttled 7\nthrottled_time 350000000\nnr_bursts 0\nburst_time 0\n",
        );
        assert_eq!(
            exec.usage().unwrap(),
            Usage {
                cpu_ns: 123_456_789,
                memory_peak_bytes: 4096,
                oom_kills: 2,
                throttled_periods: 7,
                throttled_ns: 350_000_000,
            }
        );
        // Kernels before 4.13 have no oom_kill line.
        write(
            dir("memory").join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\n",
        );
        assert_eq!(exec.usage().unwrap().oom_kills, 0);
        write(dir("cpu").join("cpu.stat"), "garbage\n");
        let e = exec.usage().unwrap_err().to_string();
        assert!(e.contains("cpu.stat") && e.contains("nr_throttled"), "{e}");

        write(dir("freezer").join("freezer.state"), "THAWED\n");
        for c in CONTROLLERS {
            write(dir(c).join("cgroup.procs"), "");
        }
        exec.kill_all().unwrap();
        // Frozen, nothing to kill, thawed.
        assert_eq!(read(dir("freezer").join("freezer.state")), "THAWED");

        for c in CONTROLLERS {
            remove_files(&dir(c));
        }
        exec.remove().unwrap();
        assert_eq!(tree.executor_count(), 0);
        for c in CONTROLLERS {
            assert!(!dir(c).exists(), "{c}");
        }
        tree.destroy().unwrap();
        assert!(!tmp.path().join("memory/flame-node-a").exists());
    }

    #[test]
    fn fake_tree_comounted_existing_and_half_made() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path();
        // cpu and cpuacct co-mounted: one directory serves both.
        let own = V1Dirs {
            cpu: base.join("cpu,cpuacct"),
            cpuacct: base.join("cpu,cpuacct"),
            memory: base.join("memory"),
            pids: base.join("pids"),
            freezer: base.join("freezer"),
        };
        let tree = {
            for d in ["cpu,cpuacct", "memory", "pids", "freezer"] {
                std::fs::create_dir(base.join(d)).unwrap();
            }
            CgroupTree::at(CgroupDirs::V1(own), "root").unwrap()
        };
        assert_eq!(tree.paths().len(), 4);
        let exec = tree.create("e1", &limits()).unwrap();
        assert_eq!(
            read(base.join("cpu,cpuacct/root/e1/cpu.cfs_quota_us")),
            "50000"
        );
        assert_eq!(exec.paths().len(), 4);
        // Twice the same name: refused, and the first is left alone.
        assert!(matches!(
            tree.create("e1", &Limits::default()),
            Err(CgroupError::Exists { .. })
        ));
        assert!(base.join("memory/root/e1").exists());
        // A name taken in one hierarchy only (a leftover): nothing else is left behind.
        std::fs::create_dir(base.join("pids/root/e2")).unwrap();
        assert!(tree.create("e2", &Limits::default()).is_err());
        assert!(!base.join("cpu,cpuacct/root/e2").exists());
        assert!(!base.join("memory/root/e2").exists());
        assert!(base.join("pids/root/e2").exists(), "not ours, left alone");
        assert_eq!(tree.executor_names().unwrap(), vec!["e1", "e2"]);
        assert!(tree.create("../x", &Limits::default()).is_err());
    }

    #[test]
    fn memsw_is_written_after_memory_when_present() {
        let tmp = tempfile::tempdir().unwrap();
        let d = fake_own(tmp.path());
        write(
            d.memory.join("memory.memsw.limit_in_bytes"),
            "9223372036854771712\n",
        );
        write_limits(
            &d,
            &Limits {
                memory_bytes: Some(1 << 20),
                ..Limits::default()
            },
        )
        .unwrap();
        assert_eq!(read(d.memory.join("memory.limit_in_bytes")), "1048576");
        assert_eq!(
            read(d.memory.join("memory.memsw.limit_in_bytes")),
            "1048576"
        );
        // Nothing asked, nothing written.
        assert!(!d.cpu.join("cpu.cfs_quota_us").exists());
        assert!(!d.pids.join("pids.max").exists());
    }
}
