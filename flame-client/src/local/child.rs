//! The children of a [`LocalCluster`](super::LocalCluster): how each is started (its own
//! process group, `SIGKILL` when this process dies), how its ready line is waited for, how
//! it is stopped, and how a failure quotes the end of its log.

use super::{LocalError, LOG_TAIL_BYTES_MAX, LOG_TAIL_LINES_MAX, READY_LINE_BYTES_MAX, STOP_GRACE};
use flame_protocol::ready::Daemon;
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

/// One child process and its log.
#[derive(Debug)]
pub(super) struct Managed {
    pub(super) name: &'static str,
    pub(super) child: Child,
    pub(super) log: PathBuf,
}

/// A command for a child of the cluster: in a process group of its own, killed when
/// dropped and when this process dies.
pub(super) fn child_command(program: &Path, args: &[OsString]) -> Command {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        // A group of its own: a terminal's Ctrl-C goes to `flame` alone, which stops the
        // children in order instead of racing them.
        .process_group(0);
    die_with_parent(&mut command);
    command
}

/// Makes the child of `command` get `SIGKILL` when the thread that forked it dies, i.e. a
/// tokio worker, which lives as long as the runtime and so as the process; a child whose
/// parent died before this took effect refuses to start.
pub fn die_with_parent(command: &mut Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and only makes two
    // async-signal-safe system calls (prctl, getppid); it allocates nothing on success.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The parent may have died between fork and prctl; then nothing would
            // deliver the signal, so refuse to start.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from(nix::errno::Errno::ESRCH));
            }
            Ok(())
        });
    }
}

impl Managed {
    pub(super) fn spawn(
        name: &'static str,
        program: &Path,
        args: &[OsString],
        log: &Path,
    ) -> Result<Managed, LocalError> {
        let log_file = std::fs::File::create(log).map_err(|source| LocalError::Io {
            what: "cannot create",
            path: log.to_path_buf(),
            source,
        })?;
        let mut command = child_command(program, args);
        command.stdout(Stdio::piped()).stderr(Stdio::from(log_file));
        let child = command.spawn().map_err(|source| LocalError::Spawn {
            path: program.to_path_buf(),
            source,
        })?;
        Ok(Managed {
            name,
            child,
            log: log.to_path_buf(),
        })
    }

    /// Reads stdout until `daemon`'s ready line (see [`flame_protocol::ready`]) and returns
    /// its detail. Stdout after the ready line is appended to the log, so the child never
    /// blocks on a full pipe.
    pub(super) async fn wait_ready(
        &mut self,
        daemon: Daemon,
        timeout: Duration,
    ) -> Result<String, LocalError> {
        let Some(stdout) = self.child.stdout.take() else {
            return Err(LocalError::Io {
                what: "no stdout pipe for",
                path: self.log.clone(),
                source: std::io::Error::from(std::io::ErrorKind::BrokenPipe),
            });
        };
        let mut reader = BufReader::new(stdout);
        let found = tokio::time::timeout(timeout, read_ready_line(&mut reader, daemon)).await;
        match found {
            Ok(Ok(Some(rest))) => {
                self.forward_stdout(reader);
                Ok(rest)
            }
            // Stdout closed or broke: the child is exiting. Give it the grace period to do so.
            Ok(Ok(None)) | Ok(Err(_)) => {
                let status = match tokio::time::timeout(STOP_GRACE, self.child.wait()).await {
                    Ok(Ok(s)) => describe_status(s),
                    Ok(Err(e)) => format!("an unknown status ({e})"),
                    Err(_) => "its stdout closed".to_string(),
                };
                Err(LocalError::Exited {
                    name: self.name,
                    status,
                    log: self.log.clone(),
                    tail: log_tail(&self.log),
                })
            }
            Err(_) => Err(LocalError::NotReady {
                name: self.name,
                timeout,
                log: self.log.clone(),
                tail: log_tail(&self.log),
            }),
        }
    }

    fn forward_stdout(&self, mut reader: BufReader<ChildStdout>) {
        let log = self.log.clone();
        tokio::spawn(async move {
            let file = tokio::fs::OpenOptions::new().append(true).open(&log).await;
            let result = match file {
                Ok(mut file) => tokio::io::copy_buf(&mut reader, &mut file).await.map(drop),
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                tracing::debug!("copying stdout to {}: {e}", log.display());
            }
        });
    }

    /// `SIGTERM`, then `SIGKILL` after `grace`. The error describes what went wrong.
    pub(super) async fn stop(&mut self, grace: Duration) -> Result<(), String> {
        let name = self.name;
        match self.child.try_wait() {
            Ok(Some(status)) => {
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "{name} had already exited with {}",
                        describe_status(status)
                    ))
                };
            }
            Ok(None) => {}
            Err(e) => return Err(format!("{name}: cannot check its status: {e}")),
        }
        let pid = self
            .child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);
        if let Some(pid) = pid {
            if let Err(e) = signal::kill(pid, Signal::SIGTERM) {
                tracing::debug!("SIGTERM to {name}: {e}");
            }
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) if stopped_cleanly(status) => Ok(()),
            Ok(Ok(status)) => Err(format!(
                "{name} exited with {} (see {})",
                describe_status(status),
                self.log.display()
            )),
            Ok(Err(e)) => Err(format!("{name}: cannot wait for it: {e}")),
            Err(_) => {
                let killed = tokio::time::timeout(grace, self.child.kill()).await;
                let how = match killed {
                    Ok(Ok(())) => "killed it",
                    Ok(Err(_)) | Err(_) => "and could not kill it",
                };
                Err(format!(
                    "{name} did not stop within {} of SIGTERM; {how}",
                    humantime::format_duration(grace)
                ))
            }
        }
    }
}

async fn read_ready_line(
    reader: &mut BufReader<ChildStdout>,
    daemon: Daemon,
) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut *reader)
            .take(READY_LINE_BYTES_MAX)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&line);
        if let Some(detail) = daemon.parse_ready(&text) {
            return Ok(Some(detail.to_string()));
        }
    }
}

/// Exited 0, or died of the `SIGTERM` it was sent.
fn stopped_cleanly(status: ExitStatus) -> bool {
    status.success() || status.signal() == Some(Signal::SIGTERM as i32)
}

pub(super) fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("signal {sig} ({})", s.as_str()),
            Err(_) => format!("signal {sig}"),
        },
        (None, None) => status.to_string(),
    }
}

/// The last [`LOG_TAIL_LINES_MAX`] lines of at most [`LOG_TAIL_BYTES_MAX`] bytes of `log`,
/// indented; a note when it cannot be read. Blocking, but only on a small local read.
pub(super) fn log_tail(log: &Path) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = std::fs::File::open(log)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES_MAX)))?;
        let mut bytes = Vec::new();
        file.take(LOG_TAIL_BYTES_MAX).read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) if text.trim().is_empty() => "    (the log is empty)".to_string(),
        Ok(text) => last_lines(&text),
        Err(e) => format!("    (cannot read the log: {e})"),
    }
}

/// The last [`LOG_TAIL_LINES_MAX`] lines of the last [`LOG_TAIL_BYTES_MAX`] bytes of a
/// child's captured output, indented.
pub(super) fn text_tail(bytes: &[u8]) -> String {
    let max = usize::try_from(LOG_TAIL_BYTES_MAX).unwrap_or(usize::MAX);
    let text = String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(max)..]);
    if text.trim().is_empty() {
        return "    (nothing)".to_string();
    }
    last_lines(&text)
}

/// The last [`LOG_TAIL_LINES_MAX`] lines of `text`, indented.
fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(LOG_TAIL_LINES_MAX);
    lines[start..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::local::HEAD_BINARY;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        let text: String = (0..100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text).unwrap();
        let tail = log_tail(&log);
        assert_eq!(tail.lines().count(), LOG_TAIL_LINES_MAX);
        assert!(tail.ends_with("    line 99"), "{tail}");
        assert!(log_tail(&dir.path().join("absent")).contains("cannot read"));
    }

    /// A fake head that prints its ready line is started, found ready, and stopped by
    /// SIGTERM; one that exits early is reported with its status and log.
    #[tokio::test]
    async fn fake_children_start_and_stop() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("ready.sh");
        std::fs::write(
            &script,
            "#!/bin/sh\necho starting >&2\necho 'flame-head listening on 127.0.0.1:9'\nexec sleep 60\n",
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let log = dir.path().join("head.log");
        let mut m = Managed::spawn(HEAD_BINARY, &script, &[], &log).unwrap();
        let rest = m
            .wait_ready(Daemon::Head, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(rest, "127.0.0.1:9");
        m.stop(Duration::from_secs(5)).await.unwrap();

        let failing = dir.path().join("fail.sh");
        std::fs::write(&failing, "#!/bin/sh\necho 'bad config' >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&failing, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut m = Managed::spawn(HEAD_BINARY, &failing, &[], &log).unwrap();
        let err = m
            .wait_ready(Daemon::Head, Duration::from_secs(10))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("exit code 3"), "{text}");
        assert!(text.contains("bad config"), "{text}");
    }
}
