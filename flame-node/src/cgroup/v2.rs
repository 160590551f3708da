//! The cgroup v2 driver: the unified hierarchy (Documentation/admin-guide/cgroup-v2.rst).

use super::{
    keyed_value, kill_pids, read_keyed, read_pids, read_to_string, write_value, Backoff,
    CgroupError, Limits, Usage, CPU_PERIOD_US, FREEZE_WAIT_MAX,
};
use std::io;
use std::path::Path;
use std::time::Instant;

/// The v2 controllers the node needs in its own cgroup.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// Controllers the node needs that a `cgroup.controllers` text does not list.
pub(super) fn missing_controllers(controllers: &str) -> Vec<String> {
    let have: Vec<&str> = controllers.split_whitespace().collect();
    CONTROLLERS
        .iter()
        .filter(|c| !have.contains(c))
        .map(|c| c.to_string())
        .collect()
}

/// Makes `cpu`, `memory` and `pids` available to the children of `dir`: checks `dir` has
/// them (`cgroup.controllers`) and enables the missing ones in `cgroup.subtree_control`.
/// The kernel refuses that (`EBUSY`) while `dir` holds processes, the "no internal
/// processes" rule; the error then says so.
pub(super) fn enable_controllers(dir: &Path) -> Result<(), CgroupError> {
    let missing = missing_controllers(&read_to_string(&dir.join("cgroup.controllers"))?);
    if !missing.is_empty() {
        return Err(CgroupError::ControllersUnavailable {
            path: dir.to_path_buf(),
            missing,
        });
    }
    let control = dir.join("cgroup.subtree_control");
    let enabled = read_to_string(&control)?;
    let value = missing_controllers(&enabled)
        .iter()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    if value.is_empty() {
        return Ok(());
    }
    match std::fs::write(&control, &value) {
        Ok(()) => Ok(()),
        Err(source) if source.raw_os_error() == Some(libc::EBUSY) => {
            Err(CgroupError::OwnCgroupBusy {
                processes: read_pids(&dir.join("cgroup.procs")).map_or(0, |p| p.len()),
                path: control,
                source,
            })
        }
        Err(source) => Err(CgroupError::Write {
            path: control,
            value,
            source,
        }),
    }
}

/// Writes `limits` into a new cgroup's files.
pub(super) fn write_limits(dir: &Path, limits: &Limits) -> Result<(), CgroupError> {
    if let Some(quota_us) = limits.cpu_quota_us() {
        write_value(&dir.join("cpu.max"), &format!("{quota_us} {CPU_PERIOD_US}"))?;
    }
    if let Some(bytes) = limits.memory_bytes {
        write_value(&dir.join("memory.max"), &bytes.to_string())?;
        // Swap would let the executor exceed its memory bound; the file exists only when
        // the kernel has swap accounting.
        let swap = dir.join("memory.swap.max");
        if swap.exists() {
            write_value(&swap, "0")?;
        }
    }
    if let Some(max) = limits.pids_max {
        write_value(&dir.join("pids.max"), &max.to_string())?;
    }
    Ok(())
}

/// Reads what the cgroup has used.
pub(super) fn usage(dir: &Path) -> Result<Usage, CgroupError> {
    let cpu_stat = dir.join("cpu.stat");
    let cpu_text = read_to_string(&cpu_stat)?;
    let cpu = |key: &str| {
        keyed_value(&cpu_text, key).ok_or_else(|| CgroupError::Parse {
            path: cpu_stat.clone(),
            detail: format!("no `{key}` line"),
        })
    };
    // `usage_usec` is there even without the cpu controller; the throttling counters only
    // with it.
    let cpu_ns = cpu("usage_usec")?.saturating_mul(1000);
    let throttled_periods = cpu("nr_throttled")?;
    let throttled_ns = cpu("throttled_usec")?.saturating_mul(1000);
    // memory.peak arrived in Linux 5.19; before it only the current use is known.
    let peak = dir.join("memory.peak");
    let memory_peak_bytes = match std::fs::read_to_string(&peak) {
        Ok(text) => parse_memory_value(&peak, &text)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let current = dir.join("memory.current");
            parse_memory_value(&current, &read_to_string(&current)?)?
        }
        Err(source) => return Err(CgroupError::Read { path: peak, source }),
    };
    Ok(Usage {
        cpu_ns,
        memory_peak_bytes,
        oom_kills: read_keyed(&dir.join("memory.events"), "oom_kill")?,
        throttled_periods,
        throttled_ns,
    })
}

fn parse_memory_value(path: &Path, text: &str) -> Result<u64, CgroupError> {
    text.trim().parse().map_err(|_| CgroupError::Parse {
        path: path.to_path_buf(),
        detail: format!("`{}` is not a number", text.trim()),
    })
}

/// One kill round: `cgroup.kill` (Linux 5.14+) kills every process in the cgroup and its
/// descendants atomically with respect to forks. Without it: freeze, SIGKILL each process,
/// thaw (a frozen v2 task does die of SIGKILL; the freeze only stops forks meanwhile).
pub(super) fn kill_round(dir: &Path) -> Result<(), CgroupError> {
    let kill = dir.join("cgroup.kill");
    if kill.exists() {
        return write_value(&kill, "1");
    }
    freeze_kill_thaw(dir)
}

/// The kill round of kernels before `cgroup.kill`. The thaw is done even when the kills
/// fail, so no error leaves the executor frozen.
fn freeze_kill_thaw(dir: &Path) -> Result<(), CgroupError> {
    let freeze = dir.join("cgroup.freeze");
    let freezable = freeze.exists();
    if freezable {
        write_value(&freeze, "1")?;
        wait_frozen(dir)?;
    }
    let killed = read_pids(&dir.join("cgroup.procs")).and_then(|pids| kill_pids(dir, &pids));
    if freezable {
        write_value(&freeze, "0")?;
    }
    killed
}

/// Waits, at most [`FREEZE_WAIT_MAX`], for `cgroup.events` to say `frozen 1`. Re-checks
/// with a short pause instead of watching the file: the wait is normally a few
/// milliseconds, and a freeze that does not complete is no error (the round goes on).
fn wait_frozen(dir: &Path) -> Result<(), CgroupError> {
    let events = dir.join("cgroup.events");
    let start = Instant::now();
    let mut backoff = Backoff::new();
    while keyed_value(&read_to_string(&events)?, "frozen") != Some(1)
        && start.elapsed() < FREEZE_WAIT_MAX
    {
        backoff.sleep();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use std::path::Path;
    use std::time::{Duration, Instant};

    fn read(p: impl AsRef<Path>) -> String {
        std::fs::read_to_string(p.as_ref()).unwrap_or_else(|e| panic!("{:?}: {e}", p.as_ref()))
    }

    fn write(p: impl AsRef<Path>, text: &str) {
        std::fs::write(p.as_ref(), text).unwrap_or_else(|e| panic!("{:?}: {e}", p.as_ref()));
    }

    /// A node's own cgroup as the kernel shows it: controllers delegated, none enabled
    /// for children yet.
    fn fake_own(dir: &Path) {
        write(
            dir.join("cgroup.controllers"),
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        );
        write(dir.join("cgroup.subtree_control"), "\n");
        write(dir.join("cgroup.procs"), "");
    }

    /// The tree's root as the kernel makes it on mkdir.
    fn fake_root(own: &Path, name: &str) {
        std::fs::create_dir(own.join(name)).unwrap();
        write(
            own.join(name).join("cgroup.controllers"),
            "cpu memory pids\n",
        );
        write(
            own.join(name).join("cgroup.subtree_control"),
            "cpu memory pids\n",
        );
    }

    fn limits() -> Limits {
        Limits {
            cpu_millis: Some(500),
            memory_bytes: Some(64 << 20),
            pids_max: Some(64),
        }
    }

    #[test]
    fn controllers_are_enabled_in_own_and_root() {
        let tmp = tempfile::tempdir().unwrap();
        let own = tmp.path();
        fake_own(own);
        // The root exists from an earlier run, with its controllers listed by the kernel.
        std::fs::create_dir(own.join("flame-node-a")).unwrap();
        write(
            own.join("flame-node-a/cgroup.controllers"),
            "cpu memory pids\n",
        );
        write(own.join("flame-node-a/cgroup.subtree_control"), "memory\n");
        let tree = CgroupTree::at(CgroupDirs::V2(own.to_path_buf()), "flame-node-a").unwrap();
        assert_eq!(tree.version(), Version::V2);
        assert_eq!(tree.paths(), vec![own.join("flame-node-a")]);
        assert_eq!(
            read(own.join("cgroup.subtree_control")),
            "+cpu +memory +pids"
        );
        assert_eq!(
            read(own.join("flame-node-a/cgroup.subtree_control")),
            "+cpu +pids"
        );
    }

    #[test]
    fn the_agent_moves_into_a_leaf_before_delegating() {
        let tmp = tempfile::tempdir().unwrap();
        let own = tmp.path();
        fake_own(own);
        // The agent is in its own cgroup, as systemd's Delegate=yes leaves it.
        write(
            own.join("cgroup.procs"),
            &format!("{}\n", std::process::id()),
        );
        fake_root(own, "flame-node-a");
        CgroupTree::at(CgroupDirs::V2(own.to_path_buf()), "flame-node-a").unwrap();
        assert_eq!(
            read(own.join("flame-node-a-agent/cgroup.procs")),
            std::process::id().to_string()
        );
        assert_eq!(
            read(own.join("cgroup.subtree_control")),
            "+cpu +memory +pids"
        );
    }

    #[test]
    fn missing_controllers_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let own = tmp.path();
        fake_own(own);
        write(own.join("cgroup.controllers"), "memory pids\n");
        let e = CgroupTree::at(CgroupDirs::V2(own.to_path_buf()), "r").unwrap_err();
        assert!(
            matches!(&e, CgroupError::ControllersUnavailable { missing, .. } if missing == &["cpu"]),
            "{e}"
        );
        assert!(e.to_string().contains("Delegate=yes"), "{e}");
        assert!(!own.join("r").exists());
    }

    #[test]
    fn limits_usage_kill_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let own = tmp.path();
        fake_own(own);
        fake_root(own, "root");
        let tree = CgroupTree::at(CgroupDirs::V2(own.to_path_buf()), "root").unwrap();
        let exec = tree.create("e1", &limits()).unwrap();
        let dir = own.join("root/e1");
        assert_eq!(exec.paths(), vec![dir.clone()]);
        assert_eq!(read(dir.join("cpu.max")), "50000 100000");
        assert_eq!(read(dir.join("memory.max")), "67108864");
        assert_eq!(read(dir.join("pids.max")), "64");
        // No swap accounting in this fake kernel: memory.swap.max is not created.
        assert!(!dir.join("memory.swap.max").exists());

        write(
            dir.join("cpu.stat"),
            "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n\
             core_sched.force_idle_usec 0\nnr_periods 40\nnr_throttled 12\n\
             throttled_usec 600000\nnr_bursts 0\nburst_usec 0\n",
        );
        write(dir.join("memory.peak"), "52428800\n");
        write(dir.join("memory.current"), "4096\n");
        write(
            dir.join("memory.events"),
            "low 0\nhigh 0\nmax 17\noom 1\noom_kill 1\noom_group_kill 0\n",
        );
        assert_eq!(
            exec.usage().unwrap(),
            Usage {
                cpu_ns: 2_500_000_000,
                memory_peak_bytes: 52_428_800,
                oom_kills: 1,
                throttled_periods: 12,
                throttled_ns: 600_000_000,
            }
        );
        // Kernels before 5.19 have no memory.peak: the current use stands in.
        std::fs::remove_file(dir.join("memory.peak")).unwrap();
        assert_eq!(exec.usage().unwrap().memory_peak_bytes, 4096);

        write(dir.join("cgroup.kill"), "");
        write(dir.join("cgroup.procs"), "");
        exec.kill_all().unwrap();
        assert_eq!(read(dir.join("cgroup.kill")), "1");

        // Without cgroup.kill: freeze, kill, thaw.
        std::fs::remove_file(dir.join("cgroup.kill")).unwrap();
        write(dir.join("cgroup.freeze"), "0\n");
        write(dir.join("cgroup.events"), "populated 0\nfrozen 1\n");
        exec.kill_all().unwrap();
        assert_eq!(read(dir.join("cgroup.freeze")), "0");

        assert_eq!(tree.executor_count(), 1);
        for f in std::fs::read_dir(&dir).unwrap() {
            std::fs::remove_file(f.unwrap().path()).unwrap();
        }
        exec.remove().unwrap();
        assert!(!dir.exists());
        assert_eq!(tree.executor_count(), 0);
    }

    #[test]
    fn swap_is_held_at_zero_when_accounted() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path().join("memory.swap.max"), "max\n");
        super::write_limits(
            tmp.path(),
            &Limits {
                memory_bytes: Some(1 << 30),
                ..Limits::default()
            },
        )
        .unwrap();
        assert_eq!(read(tmp.path().join("memory.max")), "1073741824");
        assert_eq!(read(tmp.path().join("memory.swap.max")), "0");
        assert!(!tmp.path().join("cpu.max").exists());
        assert!(!tmp.path().join("pids.max").exists());
    }

    #[test]
    fn a_fake_process_left_times_out_naming_it() {
        // Only in a fake directory can a "process" ignore SIGKILL: pid 0x7fff_fff0 does
        // not exist, so the kill is a no-op and cgroup.procs never empties.
        let tmp = tempfile::tempdir().unwrap();
        let own = tmp.path();
        fake_own(own);
        fake_root(own, "root");
        let tree = CgroupTree::at(CgroupDirs::V2(own.to_path_buf()), "root").unwrap();
        let exec = tree.create("e1", &Limits::default()).unwrap();
        let dir = own.join("root/e1");
        write(dir.join("cgroup.kill"), "");
        write(dir.join("cgroup.procs"), "2147483632\n");
        let e = exec.kill_all_within(Duration::from_millis(50)).unwrap_err();
        assert!(
            matches!(&e, CgroupError::KillTimeout { pids, .. } if pids == &[2_147_483_632]),
            "{e}"
        );
        assert!(e.to_string().contains("root/e1"), "{e}");
    }

    /// A real v2 cgroup without controllers (the kill interface needs none), below the
    /// test's own v2 cgroup: on a v1 host with a hybrid `unified` mount too.
    fn real_v2_cgroup(test: &str) -> Option<ExecutorCgroup> {
        let own = read_own_cgroups().ok().and_then(|o| o.v2);
        let why = match (nix::unistd::geteuid().is_root(), own) {
            (false, _) => "not running as root".to_string(),
            (true, None) => "no cgroup2 mount".to_string(),
            (true, Some(own)) => {
                let dir = own
                    .dir
                    .join(format!("flame-test-{}-{test}", std::process::id()));
                match std::fs::create_dir(&dir) {
                    Ok(()) => {
                        return Some(ExecutorCgroup {
                            dirs: CgroupDirs::V2(dir.clone()),
                            made: vec![dir],
                        })
                    }
                    Err(e) => format!("cannot create {}: {e}", dir.display()),
                }
            }
        };
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test} needs root and cgroup v2 on CI: {why}");
        }
        eprintln!("skipping {test}: {why}");
        None
    }

    /// Removes the test cgroup even when the test fails.
    struct Removed(Option<ExecutorCgroup>);

    impl Drop for Removed {
        fn drop(&mut self) {
            if let Some(cg) = self.0.take() {
                if let Err(e) = cg.remove() {
                    eprintln!("cannot remove test cgroup: {e}");
                }
            }
        }
    }

    fn real_kill(test: &str, freeze_path: bool) {
        let Some(cg) = real_v2_cgroup(test) else {
            return;
        };
        let guard = Removed(Some(cg));
        let cg = guard.0.as_ref().unwrap();
        let (mut child, pids) = tests::spawn_tree_in(cg);
        if freeze_path {
            let start = Instant::now();
            let mut backoff = Backoff::new();
            while !cg.pids().unwrap().is_empty() && start.elapsed() < KILL_WAIT_MAX {
                super::freeze_kill_thaw(&cg.paths()[0]).unwrap();
                backoff.sleep();
            }
            assert_eq!(read(cg.paths()[0].join("cgroup.freeze")).trim(), "0");
        } else {
            cg.kill_all().unwrap();
        }
        assert_eq!(cg.pids().unwrap(), Vec::<i32>::new());
        tests::wait_for(&mut child, Duration::from_secs(5)).unwrap();
        for pid in &pids {
            assert!(!tests::alive(*pid), "{pid} survived");
        }
        let paths = cg.paths();
        drop(guard);
        assert!(!paths[0].exists());
    }

    #[test]
    fn real_kill_file_reaches_escaped_grandchildren() {
        real_kill("v2kill", false);
    }

    #[test]
    fn real_freeze_kill_thaw_reaches_escaped_grandchildren() {
        real_kill("v2freeze", true);
    }
}
