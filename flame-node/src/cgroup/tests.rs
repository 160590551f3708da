//! Parsing of the kernel's cgroup files, and real cgroups where the test runs as root
//! (limits, usage, kill, clean-up); helpers the drivers' tests share.

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
    let mounts =
        parse_mountinfo("29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n");
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
