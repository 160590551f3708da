//! Starting executor processes: the [`Launcher`] trait and [`ProcessLauncher`], which
//! starts a local process inside its cgroup, as its user, with nothing inherited but the
//! environment and standard streams it is given.
//!
//! Invariants:
//! - Everything the child does between fork and exec is prepared before the fork; the
//!   child only makes async-signal-safe system calls and allocates nothing.
//! - The child enters its cgroup before it changes user or runs any code of its own, so it
//!   and all its descendants are accounted and killable from the start.

use crate::cgroup::CgroupJoin;
use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// Most descriptors the fallback of the close-on-exec sweep visits, for kernels without
/// `close_range(2)` (before 5.11 for `CLOSE_RANGE_CLOEXEC`) and a huge `RLIMIT_NOFILE`.
pub const FD_SWEEP_MAX: libc::c_int = 65_536;

/// Why a process could not be started, naming the program (and user) or the name that
/// could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// No such user.
    #[error("unknown user `{user}`")]
    UnknownUser {
        /// The name asked for.
        user: String,
    },
    /// No such group.
    #[error("unknown group `{group}`")]
    UnknownGroup {
        /// The name asked for.
        group: String,
    },
    /// The user or group database could not be read.
    #[error("cannot look up `{name}` in the user or group database: {source}")]
    Lookup {
        /// The user or group name.
        name: String,
        /// The cause.
        source: nix::Error,
    },
    /// A path or string handed to the kernel holds a NUL byte.
    #[error("cannot start `{program}`: its {what} contains a NUL byte")]
    Nul {
        /// The program.
        program: String,
        /// Which value.
        what: &'static str,
    },
    /// The process could not be started: fork, a step between fork and exec (joining the
    /// cgroup, changing user, changing directory) or exec failed.
    #[error(
        "cannot start `{program}`{}: {source}",
        user.as_ref().map(|u| format!(" as user `{u}`")).unwrap_or_default()
    )]
    Spawn {
        /// The program.
        program: String,
        /// The user it was to run as, when not the node's.
        user: Option<String>,
        /// The cause (between fork and exec only the errno survives).
        source: io::Error,
    },
}

/// Who a process runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids (the primary one included, as `getgrouplist(3)` gives them).
    pub groups: Vec<u32>,
    /// User name.
    pub user: String,
    /// Home directory, for the environment the caller builds (`HOME`).
    pub home: PathBuf,
}

/// Resolves `user` and optional `group` (default: the user's primary group) through the
/// system's user and group databases, supplementary groups included.
pub fn resolve_credentials(user: &str, group: Option<&str>) -> Result<Credentials, LaunchError> {
    use nix::unistd::{getgrouplist, Group, User};
    fn lookup(name: &str) -> impl FnOnce(nix::Error) -> LaunchError + '_ {
        move |source| LaunchError::Lookup {
            name: name.to_string(),
            source,
        }
    }
    let found = User::from_name(user)
        .map_err(lookup(user))?
        .ok_or_else(|| LaunchError::UnknownUser {
            user: user.to_string(),
        })?;
    let gid = match group {
        None => found.gid,
        Some(g) => {
            Group::from_name(g)
                .map_err(lookup(g))?
                .ok_or_else(|| LaunchError::UnknownGroup {
                    group: g.to_string(),
                })?
                .gid
        }
    };
    let name = CString::new(found.name.as_bytes()).map_err(|_| LaunchError::UnknownUser {
        user: user.to_string(),
    })?;
    let groups = getgrouplist(&name, gid)
        .map_err(lookup(user))?
        .into_iter()
        .map(|g| g.as_raw())
        .collect();
    Ok(Credentials {
        uid: found.uid.as_raw(),
        gid: gid.as_raw(),
        groups,
        user: found.name,
        home: found.dir,
    })
}

/// Where one of the child's standard streams goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdioMode {
    /// A pipe to the node (taken from the returned child).
    Piped,
    /// `/dev/null`.
    Null,
}

impl StdioMode {
    fn to_stdio(self) -> std::process::Stdio {
        match self {
            StdioMode::Piped => std::process::Stdio::piped(),
            StdioMode::Null => std::process::Stdio::null(),
        }
    }
}

/// Everything needed to start one process.
#[derive(Debug)]
pub struct ProcessSpec {
    /// The program: a path, or a name looked up in `PATH`.
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its whole environment: nothing of the node's is inherited.
    pub env: Vec<(String, String)>,
    /// Its working directory, entered after the user change, so it must be reachable by
    /// that user.
    pub working_dir: PathBuf,
    /// Who it runs as; `None` keeps the node's user.
    pub credentials: Option<Credentials>,
    /// The cgroup it starts in; `None` leaves it in the node's.
    pub cgroup: Option<CgroupJoin>,
    /// Standard input.
    pub stdin: StdioMode,
    /// Standard output.
    pub stdout: StdioMode,
    /// Standard error.
    pub stderr: StdioMode,
}

/// Starts executor processes.
pub trait Launcher: Send + Sync + std::fmt::Debug {
    /// Starts `spec`. The returned child is killed when dropped.
    ///
    /// Call it inside a tokio runtime, on a thread that lives as long as the child should:
    /// the child gets SIGKILL when the *thread* that forked it ends (`PR_SET_PDEATHSIG`
    /// follows the thread, not the process). A runtime worker thread is fine; a
    /// `spawn_blocking` thread is not, as the blocking pool ends idle threads after 10 s.
    fn launch(&self, spec: ProcessSpec) -> Result<tokio::process::Child, LaunchError>;
}

/// Starts a local process: cleared environment, own process group, in its cgroup, as its
/// user, with no new privileges, no inherited descriptors beyond 0, 1 and 2, and dying
/// with the node.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessLauncher;

impl Launcher for ProcessLauncher {
    fn launch(&self, mut spec: ProcessSpec) -> Result<tokio::process::Child, LaunchError> {
        let join = spec.cgroup.take();
        let setup = ChildSetup::prepare(&spec, join)?;
        let mut cmd = tokio::process::Command::new(&spec.program);
        cmd.args(&spec.args)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(spec.stdin.to_stdio())
            .stdout(spec.stdout.to_stdio())
            .stderr(spec.stderr.to_stdio())
            .kill_on_drop(true)
            .process_group(0);
        // SAFETY: `ChildSetup::run` runs in the child between fork and exec. It only makes
        // async-signal-safe system calls on data prepared before the fork, allocates
        // nothing and takes no locks.
        unsafe {
            cmd.pre_exec(move || setup.run());
        }
        let spawned = cmd.spawn();
        // The closure, holding the cgroup's procs files open, goes with `cmd`.
        drop(cmd);
        spawned.map_err(|source| LaunchError::Spawn {
            program: spec.program,
            user: spec.credentials.map(|c| c.user),
            source,
        })
    }
}

/// What the child does between fork and exec, prepared in the parent.
#[derive(Debug)]
struct ChildSetup {
    /// Keeps the descriptors in `procs_fds` open until the fork.
    _join: Option<CgroupJoin>,
    procs_fds: Vec<RawFd>,
    ids: Option<Ids>,
    working_dir: CString,
    parent_pid: libc::pid_t,
    /// Upper bound of the fallback close-on-exec sweep.
    fd_end: libc::c_int,
}

#[derive(Debug)]
struct Ids {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

impl ChildSetup {
    fn prepare(spec: &ProcessSpec, join: Option<CgroupJoin>) -> Result<ChildSetup, LaunchError> {
        let working_dir =
            CString::new(OsStr::as_bytes(spec.working_dir.as_os_str())).map_err(|_| {
                LaunchError::Nul {
                    program: spec.program.clone(),
                    what: "working directory",
                }
            })?;
        let procs_fds = join.as_ref().map(CgroupJoin::raw_fds).unwrap_or_default();
        // SAFETY: sysconf only reads a limit.
        let open_max = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) };
        let fd_end = libc::c_int::try_from(open_max)
            .unwrap_or(FD_SWEEP_MAX)
            .clamp(3, FD_SWEEP_MAX);
        Ok(ChildSetup {
            _join: join,
            procs_fds,
            ids: spec.credentials.as_ref().map(|c| Ids {
                uid: c.uid,
                gid: c.gid,
                groups: c.groups.clone(),
            }),
            working_dir,
            // SAFETY: getpid has no preconditions.
            parent_pid: unsafe { libc::getpid() },
            fd_end,
        })
    }

    /// Runs in the child between fork and exec: async-signal-safe calls only.
    fn run(&self) -> io::Result<()> {
        // 1. Into the cgroup first, so everything the child will be or start is inside.
        for &fd in &self.procs_fds {
            // SAFETY: writes one byte from a static buffer to a descriptor the parent
            // opened and keeps open until after the fork.
            if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        // 2. The user, groups first while we may still change them.
        if let Some(ids) = &self.ids {
            // SAFETY: plain system calls on prepared values; `groups` outlives the call.
            unsafe {
                check(libc::setgroups(ids.groups.len(), ids.groups.as_ptr()))?;
                check(libc::setgid(ids.gid))?;
                check(libc::setuid(ids.uid))?;
                if libc::getuid() != ids.uid
                    || libc::geteuid() != ids.uid
                    || libc::getgid() != ids.gid
                    || libc::getegid() != ids.gid
                {
                    return Err(io::Error::from_raw_os_error(libc::EPERM));
                }
            }
        }
        // 3. Die with the node. After the user change, which clears the parent-death
        // signal; then make sure the parent did not die before it was set.
        // SAFETY: prctl and getppid with constant arguments.
        unsafe {
            check(libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ))?;
            if libc::getppid() != self.parent_pid {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            // 4. No setuid binary or file capability can give the child more than it has.
            check(libc::prctl(
                libc::PR_SET_NO_NEW_PRIVS,
                1 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ))?;
            // 5. The working directory, with the user's own permissions.
            check(libc::chdir(self.working_dir.as_ptr()))?;
        }
        // 6. No inherited descriptor beyond the standard streams survives exec. Marked
        // close-on-exec rather than closed: std's exec-error pipe must live until exec.
        self.cloexec_from_3()
    }

    fn cloexec_from_3(&self) -> io::Result<()> {
        // SAFETY: close_range only changes descriptor flags.
        let done = unsafe {
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            )
        };
        if done == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        // ENOSYS: no close_range (before 5.9); EINVAL: no CLOSE_RANGE_CLOEXEC (before 5.11).
        if !matches!(err.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) {
            return Err(err);
        }
        for fd in 3..self.fd_end {
            // SAFETY: fcntl on a descriptor number; a closed one gives EBADF.
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                    check(libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC))?;
                }
            }
        }
        Ok(())
    }
}

/// A system call's `-1` as the errno it left.
fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::tests::real_tree;
    use crate::cgroup::Limits;
    use std::time::{Duration, Instant};

    /// Root is needed to change user; elsewhere skip, or fail under `CI=true`.
    fn need_root(test: &str) -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test} needs root on CI");
        }
        eprintln!("skipping {test}: not running as root");
        false
    }

    fn nobody() -> Credentials {
        resolve_credentials("nobody", None).unwrap()
    }

    fn spec(program: &str, args: &[&str]) -> ProcessSpec {
        ProcessSpec {
            program: program.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            env: vec![("PATH".to_string(), "/usr/bin:/bin".to_string())],
            working_dir: PathBuf::from("/"),
            credentials: None,
            cgroup: None,
            stdin: StdioMode::Null,
            stdout: StdioMode::Piped,
            stderr: StdioMode::Piped,
        }
    }

    /// Runs `spec` to its end (at most 10 s): exit code, stdout, stderr.
    async fn output(spec: ProcessSpec) -> (Option<i32>, String, String) {
        let child = ProcessLauncher.launch(spec).unwrap();
        let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    #[test]
    fn credentials_resolve_and_errors_name_the_name() {
        let c = nobody();
        assert_eq!(c.uid, 65534);
        assert_eq!(c.user, "nobody");
        assert!(c.groups.contains(&c.gid));
        let root = resolve_credentials("root", Some("nogroup")).unwrap();
        assert_eq!((root.uid, root.gid), (0, 65534));
        let e = resolve_credentials("no-such-user-x", None).unwrap_err();
        assert_eq!(e.to_string(), "unknown user `no-such-user-x`");
        let e = resolve_credentials("nobody", Some("no-such-group-x")).unwrap_err();
        assert_eq!(e.to_string(), "unknown group `no-such-group-x`");
    }

    #[tokio::test]
    async fn environment_is_exactly_the_spec() {
        let mut s = spec("/usr/bin/env", &[]);
        s.env.push(("FLAME_X".to_string(), "1".to_string()));
        let (code, out, _) = output(s).await;
        assert_eq!(code, Some(0));
        assert_eq!(out, "FLAME_X=1\nPATH=/usr/bin:/bin\n");
    }

    #[tokio::test]
    async fn runs_as_the_user_without_new_privileges() {
        if !need_root("runs_as_the_user") {
            return;
        }
        let mut s = spec(
            "sh",
            &["-c", "id -u; id -g; grep NoNewPrivs /proc/self/status"],
        );
        s.credentials = Some(nobody());
        let (code, out, err) = output(s).await;
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(out, "65534\n65534\nNoNewPrivs:\t1\n");
    }

    #[tokio::test]
    async fn the_user_cannot_read_a_private_root_directory() {
        if !need_root("private_root_directory") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        std::fs::write(dir.path().join("secret"), "x").unwrap();
        let path = dir.path().to_str().unwrap();
        let mut s = spec("ls", &[path]);
        s.credentials = Some(nobody());
        let (code, _, err) = output(s).await;
        assert_ne!(code, Some(0));
        assert!(err.contains("Permission denied"), "{err}");
        // Nor start a program there, nor work in it; the error names program and user.
        let program = dir.path().join("prog");
        std::fs::copy("/bin/true", &program).unwrap();
        let mut s = spec(program.to_str().unwrap(), &[]);
        s.credentials = Some(nobody());
        let e = ProcessLauncher.launch(s).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "cannot start `{}` as user `nobody`: Permission denied",
                program.display()
            )),
            "{e}"
        );
        let mut s = spec("true", &[]);
        s.credentials = Some(nobody());
        s.working_dir = dir.path().to_path_buf();
        let e = ProcessLauncher.launch(s).unwrap_err().to_string();
        assert!(e.contains("Permission denied"), "{e}");
    }

    #[tokio::test]
    async fn no_descriptor_is_inherited_beyond_0_1_2() {
        use nix::fcntl::{open, OFlag};
        use nix::sys::stat::Mode;
        // Opened without O_CLOEXEC, as a careless library would.
        let leak = open("/dev/null", OFlag::O_RDONLY, Mode::empty()).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&leak);
        let flags = nix::fcntl::fcntl(&leak, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_eq!(flags & libc::FD_CLOEXEC, 0);
        // `ls` lists the shell's descriptors, not its own.
        let (code, out, err) = output(spec("sh", &["-c", "ls /proc/$$/fd"])).await;
        assert_eq!(code, Some(0), "{err}");
        let fds: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(fds, ["0", "1", "2"], "leaked fd was {fd}");
        drop(leak);
    }

    #[tokio::test]
    async fn the_child_starts_in_its_cgroup() {
        let Some(tree) = real_tree("launcher") else {
            return;
        };
        let exec = tree.create("e1", &Limits::default()).unwrap();
        let mut s = spec("sleep", &["1000"]);
        s.cgroup = Some(exec.procs_files().unwrap());
        s.credentials = Some(nobody());
        let mut child = ProcessLauncher.launch(s).unwrap();
        let pid = child.id().unwrap() as i32;
        assert_eq!(exec.pids().unwrap(), vec![pid]);
        exec.kill_all().unwrap();
        let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        exec.remove().unwrap();
    }

    #[test]
    fn the_child_dies_with_the_thread_that_started_it() {
        if !need_root("dies_with_parent") {
            return;
        }
        // A thread with its own runtime starts the child as another user (the user change
        // must not lose the parent-death signal), hands over the pid and ends.
        let pid = std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut s = spec("sleep", &["1000"]);
                s.credentials = Some(nobody());
                let child = ProcessLauncher.launch(s).unwrap();
                let pid = child.id().unwrap() as i32;
                // Not dropped: kill_on_drop would kill it, and only the death signal may.
                std::mem::forget(child);
                pid
            })
        })
        .join()
        .unwrap();
        let start = Instant::now();
        let status = loop {
            use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
            let status =
                waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)).unwrap();
            if status != WaitStatus::StillAlive || start.elapsed() > Duration::from_secs(5) {
                break status;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(
            matches!(
                status,
                nix::sys::wait::WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGKILL, _)
            ),
            "{status:?}"
        );
    }
}
