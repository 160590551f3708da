//! `flame cluster supervise`: what runs a daemon on a host without systemd. Hidden from
//! the help: `flame cluster up` starts it there, detached (`setsid -f`, output appended
//! to the daemon's log).
//!
//! - It takes an exclusive lock on its pid file and writes its pid there, so that two
//!   supervisors of one daemon cannot run, and `up` can tell a running one from a stale
//!   file (the pid is alive *and* its command line names that pid file).
//! - It runs the daemon as its child, which gets `SIGKILL` if the supervisor dies, and
//!   copies the daemon's stdout to its own; the first line starting with `--ready-prefix`
//!   is written to the state file as `ready LINE`.
//! - A daemon that exits before it was ever ready is a configuration error, not a crash:
//!   the state file says `failed ...` and the supervisor exits. One that exits after is
//!   restarted after a backoff of 1 s, doubling up to [`BACKOFF_MAX`], at most
//!   `--restarts-max` times within `--restart-window`; then it gives up (`failed gave
//!   up ...`). With `--no-restart` (under systemd, which restarts) it exits instead.
//! - `SIGTERM` or `SIGINT` stops it: the daemon gets `SIGTERM`, then `SIGKILL` after
//!   `--stop-grace`; the pid and state files are removed.

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
use tokio::process::Command;
use tokio::signal::unix::{signal as unix_signal, SignalKind};

/// Longest wait between two restarts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long the daemon's remaining output is read after it exited (a grandchild may hold
/// its stdout open).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// What to supervise and how (the flags of `flame cluster supervise`, which
/// `scripts::supervise_line` writes).
#[derive(Debug)]
pub struct Supervision {
    /// The pid file, locked while this supervisor runs.
    pub pid_file: PathBuf,
    /// Where `ready LINE` or `failed HOW` is written.
    pub state_file: PathBuf,
    /// The start of the daemon's stdout line that says it serves (its ready prefix, see
    /// `flame_protocol::ready`, without the trailing space).
    pub ready_prefix: String,
    /// Exit when the daemon exits, rather than restarting it (systemd restarts).
    pub no_restart: bool,
    /// Most restarts within `restart_window` before giving up.
    pub restarts_max: usize,
    /// The window `restarts_max` counts in.
    pub restart_window: Duration,
    /// How long the daemon has to exit after SIGTERM before SIGKILL.
    pub stop_grace: Duration,
    /// The daemon and its arguments.
    pub command: Vec<OsString>,
}

/// Why supervision could not go on.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is locked: another supervisor (pid {pid}) runs this daemon", path.display())]
    AlreadyRunning { path: PathBuf, pid: String },
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("cannot handle signals: {0}")]
    Signals(std::io::Error),
    /// The daemon exited and is not restarted; the state file says why.
    #[error("{0}")]
    Ended(String),
}

/// Runs the supervisor until it is told to stop (`Ok`) or gives up (`Err`).
pub async fn run(args: Supervision) -> Result<(), SuperviseError> {
    let lock = lock_pid_file(&args.pid_file)?;
    let mut term = unix_signal(SignalKind::terminate()).map_err(SuperviseError::Signals)?;
    let mut int = unix_signal(SignalKind::interrupt()).map_err(SuperviseError::Signals)?;
    // No terminal after setsid; a stray SIGHUP must not end supervision.
    let _hup = unix_signal(SignalKind::hangup()).map_err(SuperviseError::Signals)?;
    let program = args.command[0].to_string_lossy().into_owned();
    let mut ever_ready = false;
    let mut restarts: VecDeque<Instant> = VecDeque::new();
    let result = loop {
        remove(&args.state_file);
        let mut child = match spawn(&args.command) {
            Ok(child) => child,
            Err(source) => {
                let message = format!("failed cannot start {program}: {source}");
                write_state(&args.state_file, &message);
                break Err(SuperviseError::Spawn { program, source });
            }
        };
        let pid = child.id();
        say(&format!("started {program} (pid {})", pid.unwrap_or(0)));
        let (ready_tx, mut ready_rx) = tokio::sync::watch::channel(false);
        let reader = child.stdout.take().map(|stdout| {
            let prefix = args.ready_prefix.clone();
            let state = args.state_file.clone();
            tokio::spawn(async move {
                // Bytes, not text: output that is not UTF-8 is passed on, not a reason
                // to stop reading (the daemon would then die of a closed pipe). A line is
                // cut at LINE_BYTES_MAX so a missing newline cannot grow it without bound.
                let mut reader = BufReader::new(stdout);
                let mut buf = Vec::new();
                let mut ready = false;
                loop {
                    buf.clear();
                    let mut limited = (&mut reader).take(LINE_BYTES_MAX);
                    match limited.read_until(b'\n', &mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let text = String::from_utf8_lossy(&buf);
                    let line = text.trim_end_matches(['\n', '\r']);
                    let mut out = std::io::stdout().lock();
                    // The log is what we write to; nowhere else to report a failure.
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                    if !ready && line.starts_with(&prefix) {
                        ready = true;
                        write_state(&state, &format!("ready {line}"));
                        ready_tx.send_replace(true);
                    }
                }
            })
        });
        let stop = tokio::select! {
            status = child.wait() => Err(status),
            _ = term.recv() => Ok("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
        };
        match stop {
            Ok(signal_name) => {
                say(&format!("{signal_name}: stopping {program}"));
                stop_child(&mut child, pid, args.stop_grace).await;
                break Ok(());
            }
            Err(status) => {
                if let Some(reader) = reader {
                    let _ = tokio::time::timeout(DRAIN_TIMEOUT, reader).await;
                }
                ever_ready |= *ready_rx.borrow_and_update();
                let how = match status {
                    Ok(s) => describe(s),
                    Err(e) => format!("an unknown status ({e})"),
                };
                say(&format!("{program} exited with {how}"));
                if !ever_ready {
                    let message = format!("exited with {how} before it was ready");
                    write_state(&args.state_file, &format!("failed {message}"));
                    break Err(SuperviseError::Ended(format!("{program} {message}")));
                }
                if args.no_restart {
                    write_state(&args.state_file, &format!("failed exited with {how}"));
                    break Err(SuperviseError::Ended(format!(
                        "{program} exited with {how}"
                    )));
                }
                let now = Instant::now();
                while restarts
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > args.restart_window)
                {
                    restarts.pop_front();
                }
                if restarts.len() >= args.restarts_max {
                    let message = format!(
                        "gave up after {} restarts within {}",
                        restarts.len(),
                        humantime::format_duration(args.restart_window)
                    );
                    say(&message);
                    write_state(&args.state_file, &format!("failed {message}"));
                    break Err(SuperviseError::Ended(format!("{program}: {message}")));
                }
                let exp = u32::try_from(restarts.len()).unwrap_or(u32::MAX).min(5);
                let backoff = Duration::from_secs(1u64 << exp).min(BACKOFF_MAX);
                say(&format!(
                    "restarting {program} in {}",
                    humantime::format_duration(backoff)
                ));
                restarts.push_back(now);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = term.recv() => break Ok(()),
                    _ = int.recv() => break Ok(()),
                }
            }
        }
    };
    // A failure stays in the state file, for `up` (which waits on it) and `status`; a
    // stop asked for by a signal leaves nothing behind.
    if result.is_ok() {
        remove(&args.state_file);
    }
    remove(&args.pid_file);
    drop(lock);
    result
}

/// Longest line of the daemon's output passed on as one; longer ones are split.
const LINE_BYTES_MAX: u64 = 64 * 1024;

/// Times [`lock_pid_file`] opens the pid file again when it was replaced while locking.
const PID_FILE_ATTEMPTS: u32 = 5;

/// Opens, locks and fills the pid file; refuses when another supervisor holds it.
fn lock_pid_file(path: &Path) -> Result<Flock<std::fs::File>, SuperviseError> {
    let io = |what, source| SuperviseError::Io {
        what,
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("cannot create the folder of", e))?;
    }
    // A supervisor that is ending removes its pid file before it unlocks it; one that
    // opened the file just before then would lock a file no longer there. So the file
    // locked must still be the one at the path, or it is opened again.
    let mut attempts = 0;
    let mut lock = loop {
        attempts += 1;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| io("cannot open", e))?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, _errno)) => {
                let pid = std::fs::read_to_string(path).unwrap_or_default();
                return Err(SuperviseError::AlreadyRunning {
                    path: path.to_path_buf(),
                    pid: pid.trim().to_string(),
                });
            }
        };
        let locked = lock.metadata().map_err(|e| io("cannot stat", e))?;
        let same = std::fs::metadata(path)
            .is_ok_and(|now| (now.dev(), now.ino()) == (locked.dev(), locked.ino()));
        if same {
            break lock;
        }
        if attempts >= PID_FILE_ATTEMPTS {
            return Err(io(
                "cannot lock (it keeps being replaced)",
                std::io::Error::other("the pid file was removed while it was being locked"),
            ));
        }
    };
    lock.set_len(0).map_err(|e| io("cannot truncate", e))?;
    writeln!(&mut *lock, "{}", std::process::id()).map_err(|e| io("cannot write", e))?;
    Ok(lock)
}

/// Starts the daemon: stdout piped here, stderr shared (the log), killed if we die.
fn spawn(command: &[OsString]) -> std::io::Result<tokio::process::Child> {
    let mut cmd = Command::new(&command[0]);
    cmd.args(&command[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    flame_client::local::die_with_parent(&mut cmd);
    cmd.spawn()
}

/// `SIGTERM`, then `SIGKILL` after `grace`.
async fn stop_child(child: &mut tokio::process::Child, pid: Option<u32>, grace: Duration) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // Already gone is fine: wait() below reaps it.
        let _ = signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => say(&format!(
            "stopped ({})",
            status.map_or_else(|e| e.to_string(), describe)
        )),
        Err(_) => {
            say(&format!(
                "not stopped within {}: SIGKILL",
                humantime::format_duration(grace)
            ));
            let _ = child.kill().await;
        }
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => Signal::try_from(sig)
            .map_or_else(|_| format!("signal {sig}"), |s| format!("signal {s}")),
        _ => status.to_string(),
    }
}

/// Writes the state file atomically (a reader never sees half a line).
fn write_state(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    let written =
        std::fs::write(&tmp, format!("{text}\n")).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        say(&format!("cannot write {}: {e}", path.display()));
    }
}

fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            say(&format!("cannot remove {}: {e}", path.display()));
        }
    }
}

/// A line of the supervisor's own, on stderr (the daemon's log), with the time.
fn say(message: &str) {
    eprintln!(
        "{} flame cluster supervise: {message}",
        humantime::format_rfc3339_seconds(SystemTime::now())
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn args(dir: &Path, script: &str) -> Supervision {
        Supervision {
            pid_file: dir.join("s.pid"),
            state_file: dir.join("state"),
            ready_prefix: "serving on".to_string(),
            no_restart: false,
            restarts_max: 2,
            restart_window: Duration::from_secs(600),
            stop_grace: Duration::from_secs(5),
            command: vec!["sh".into(), "-c".into(), script.into()],
        }
    }

    #[tokio::test]
    async fn a_daemon_that_never_gets_ready_is_not_restarted() {
        let dir = tempfile::tempdir().unwrap();
        let err = run(args(dir.path(), "echo bad flag >&2; exit 2"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("before it was ready"), "{err}");
        // The failure stays in the state file for `up` and `status`; the pid file goes.
        let state = std::fs::read_to_string(dir.path().join("state")).unwrap();
        assert!(state.starts_with("failed exited with"), "{state}");
        assert!(!dir.path().join("s.pid").exists());
    }

    #[tokio::test]
    async fn a_crashing_daemon_is_restarted_then_given_up() {
        let dir = tempfile::tempdir().unwrap();
        let count = dir.path().join("count");
        let script = format!("echo x >> {}; echo 'serving on 1'; exit 3", count.display());
        let started = Instant::now();
        let err = run(args(dir.path(), &script)).await.unwrap_err();
        assert!(
            err.to_string().contains("gave up after 2 restarts"),
            "{err}"
        );
        // The first run and two restarts, after 1 s and 2 s of backoff.
        assert_eq!(std::fs::read_to_string(&count).unwrap().lines().count(), 3);
        assert!(started.elapsed() >= Duration::from_secs(3));
    }

    #[test]
    fn a_second_supervisor_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.pid");
        let _held = lock_pid_file(&path).unwrap();
        let err = lock_pid_file(&path).unwrap_err();
        assert!(
            matches!(err, SuperviseError::AlreadyRunning { .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains(&std::process::id().to_string()),
            "{err}"
        );
    }
}
