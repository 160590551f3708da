//! `flame-test-service`: the application the executor tests run. Each task's input is a
//! text command and its output is text; an unknown command or a failed one fails the task
//! (an application error, so the executor lives on).
//!
//! | input         | does                                                                      |
//! |---------------|---------------------------------------------------------------------------|
//! | `echo TEXT`   | returns `TEXT`                                                            |
//! | `log TEXT`    | writes `TEXT` and a newline to stderr (the executor's log), returns `TEXT` |
//! | `alloc MIB`   | allocates and touches MIB MiB and keeps it until the process exits        |
//! | `spin MS`     | busy-loops for MS ms of wall-clock time                                   |
//! | `sleep MS`    | sleeps MS ms: a task whose length does not depend on the cpu it gets      |
//! | `fork N`      | starts N `sleep 3600` in sessions of their own; returns `pids P1 P2 ...`  |
//! | `read PATH`   | returns a file's bytes, or a folder's sorted entry names one a line       |
//! | `write PATH`  | creates PATH (or truncates it) and writes `probe` into it                 |
//! | `unlink PATH` | removes the file (or socket) PATH                                         |
//! | `connect PATH`| connects to the Unix socket PATH and closes the connection                |
//! | `signal PID`  | sends SIGTERM to process PID                                              |
//! | `whoami`      | `key=value` lines: ids, cwd, NoNewPrivs, inherited fds, env ([`whoami`])   |
//!
//! The probes (`read`, `write`, `unlink`, `connect`, `signal`) fail with the system's
//! error text (`Permission denied (os error 13)`, `Operation not permitted (os error 1)`),
//! which the tenancy tests look for.
//!
//! It serves over whichever shim the node chose ([`flame_shims::service::run`]): stdio, or
//! the Unix socket named by `FLAME_SHIM_SOCKET`. Arguments are ignored, so a test can tag
//! its executors' command lines with a marker and find them in `/proc`.

use flame_shims::service::{run, Service, TaskContext};
use std::fmt::Write as _;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable set on the processes `fork` starts, so they can be told apart.
const GRANDCHILD_MARKER: &str = "FLAME_TEST_GRANDCHILD";
/// Most MiB one `alloc` takes, most processes one `fork` starts, longest `spin` or `sleep`:
/// a typo in a test must not take the machine down.
const ALLOC_MIB_MAX: usize = 64 * 1024;
const FORK_MAX: usize = 64;
const SPIN_MS_MAX: u64 = 10 * 60 * 1000;
const SLEEP_MS_MAX: u64 = 10 * 60 * 1000;
const MIB: usize = 1024 * 1024;

#[derive(Debug)]
struct TestService {
    /// Descriptors open when `main` started, before the shim opened any: what the node
    /// handed down.
    inherited_fds: Vec<String>,
    /// Memory taken by `alloc`, held until the process exits.
    held: Vec<Vec<u8>>,
}

impl Service for TestService {
    fn invoke(&mut self, _ctx: &TaskContext, input: &[u8]) -> Result<Vec<u8>, String> {
        let input = std::str::from_utf8(input).map_err(|e| format!("input is not UTF-8: {e}"))?;
        let (command, arg) = input.split_once(' ').unwrap_or((input, ""));
        let output = match command {
            "echo" => arg.to_string(),
            "log" => {
                use std::io::Write as _;
                let mut stderr = std::io::stderr().lock();
                writeln!(stderr, "{arg}")
                    .and_then(|()| stderr.flush())
                    .map_err(|e| format!("cannot write to stderr: {e}"))?;
                arg.to_string()
            }
            "alloc" => {
                let mib = number(arg, ALLOC_MIB_MAX as u64)? as usize;
                for _ in 0..mib {
                    // Filled with a non-zero byte, so every page is written and resident.
                    self.held.push(vec![0x5a; MIB]);
                }
                format!("allocated {mib} MiB")
            }
            "spin" => {
                let ms = number(arg, SPIN_MS_MAX)?;
                let end = Instant::now() + Duration::from_millis(ms);
                let mut x = 0u64;
                while Instant::now() < end {
                    for i in 0..10_000u64 {
                        x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
                    }
                }
                format!("spun {ms} ms")
            }
            "sleep" => {
                let ms = number(arg, SLEEP_MS_MAX)?;
                std::thread::sleep(Duration::from_millis(ms));
                format!("slept {ms} ms")
            }
            "fork" => fork(number(arg, FORK_MAX as u64)? as usize)?,
            "read" => read(arg)?,
            "write" => std::fs::write(arg, b"probe")
                .map(|()| format!("wrote {arg}"))
                .map_err(|e| format!("cannot write {arg}: {e}"))?,
            "unlink" => std::fs::remove_file(arg)
                .map(|()| format!("removed {arg}"))
                .map_err(|e| format!("cannot remove {arg}: {e}"))?,
            "connect" => std::os::unix::net::UnixStream::connect(arg)
                .map(|_| format!("connected to {arg}"))
                .map_err(|e| format!("cannot connect to {arg}: {e}"))?,
            "signal" => {
                let pid = number(arg, i32::MAX as u64)? as i32;
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                )
                .map(|()| format!("signalled {pid}"))
                .map_err(|e| format!("cannot signal {pid}: {}", std::io::Error::from(e)))?
            }
            "whoami" => whoami(&self.inherited_fds)?,
            other => return Err(format!("unknown command `{other}`")),
        };
        Ok(output.into_bytes())
    }
}

fn number(arg: &str, max: u64) -> Result<u64, String> {
    match arg.trim().parse::<u64>() {
        Ok(n) if n <= max => Ok(n),
        Ok(n) => Err(format!("{n} is over the limit of {max}")),
        Err(e) => Err(format!("`{arg}` is not a number: {e}")),
    }
}

/// Starts `n` processes that leave this one's session and process group, as a daemon
/// would, so only a kill of the whole cgroup reaches them. They keep stderr, like a careless
/// daemon does.
fn fork(n: usize) -> Result<String, String> {
    let mut pids = Vec::with_capacity(n);
    for _ in 0..n {
        let mut command = Command::new("sleep");
        command
            .arg("3600")
            .env(GRANDCHILD_MARKER, "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: setsid is async-signal-safe and the closure allocates nothing.
        unsafe {
            command.pre_exec(|| {
                nix::unistd::setsid()?;
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start `sleep 3600`: {e}"))?;
        // Never waited for: it is meant to outlive this process.
        pids.push(child.id().to_string());
    }
    Ok(format!("pids {}", pids.join(" ")))
}

/// A file's bytes (as lossy UTF-8), or a folder's sorted entry names.
fn read(path: &str) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    if meta.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| format!("cannot list {path}: {e}"))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot list {path}: {e}"))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names.join("\n"))
    } else {
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// The descriptors open now, as `fd:target`, leaving out the one listing them.
fn open_fds() -> Result<Vec<String>, String> {
    let list = |e: std::io::Error| format!("cannot list /proc/self/fd: {e}");
    let mut fds = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").map_err(list)? {
        let entry = entry.map_err(list)?;
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|f| f.parse::<i32>().ok())
        else {
            continue;
        };
        let target = match std::fs::read_link(entry.path()) {
            Ok(t) => t.display().to_string(),
            // Closed between the listing and the look: the listing's own descriptor.
            Err(_) => continue,
        };
        // The folder being listed shows as /proc/<pid>/fd.
        if target.starts_with("/proc/") && target.ends_with("/fd") {
            continue;
        }
        fds.push((fd, target));
    }
    fds.sort();
    Ok(fds.into_iter().map(|(fd, t)| format!("{fd}:{t}")).collect())
}

/// `key=value` lines: `uid`, `gid`, `groups`, `cwd`, `no_new_privs`, `inherited_fds` (at
/// start-up, before the shim opened any), `fds` (now), `executor_id`,
/// `cuda_visible_devices`, `shim_socket` (its path), `env` (the variable names); an unset
/// variable reads `unset`.
fn whoami(inherited_fds: &[String]) -> Result<String, String> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
    let no_new_privs = status
        .lines()
        .find_map(|l| l.strip_prefix("NoNewPrivs:"))
        .map_or("unknown", str::trim)
        .to_string();
    let groups = nix::unistd::getgroups()
        .map_err(|e| format!("getgroups: {e}"))?
        .iter()
        .map(|g| g.as_raw().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let cwd = std::env::current_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|e| format!("(unknown: {e})"));
    let var = |name: &str| std::env::var(name).unwrap_or_else(|_| "unset".into());
    let mut env: Vec<String> = std::env::vars_os()
        .map(|(k, _)| k.to_string_lossy().into_owned())
        .collect();
    env.sort();
    let mut out = String::new();
    let mut line = |key: &str, value: &str| {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{key}={value}");
    };
    line("pid", &std::process::id().to_string());
    line("uid", &nix::unistd::getuid().to_string());
    line("gid", &nix::unistd::getgid().to_string());
    line("groups", &groups);
    line("cwd", &cwd);
    line("no_new_privs", &no_new_privs);
    line("inherited_fds", &inherited_fds.join(" "));
    line("fds", &open_fds()?.join(" "));
    line("executor_id", &var("FLAME_EXECUTOR_ID"));
    line("cuda_visible_devices", &var("CUDA_VISIBLE_DEVICES"));
    line("shim_socket", &var("FLAME_SHIM_SOCKET"));
    line("home", &var("HOME"));
    line("user", &var("USER"));
    line("logname", &var("LOGNAME"));
    line("env", &env.join(","));
    Ok(out)
}

fn main() {
    flame_shims::service::exit_if_help(
        "flame-test-service: the test suite's application, whose inputs say what to do (fail, sleep, leak, ...).",
    );
    let inherited_fds = match open_fds() {
        Ok(fds) => fds,
        Err(e) => {
            eprintln!("flame-test-service: error: {e}");
            std::process::exit(1);
        }
    };
    let service = TestService {
        inherited_fds,
        held: Vec::new(),
    };
    if let Err(e) = run(service) {
        eprintln!("flame-test-service: error: {e}");
        std::process::exit(1);
    }
}
