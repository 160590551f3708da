//! One SSH connection to a host, through the system's OpenSSH client (the `openssh` crate:
//! a ControlMaster per host, each command a multiplexed `ssh` over it), so that
//! `~/.ssh/config`, the ssh-agent, known hosts, jump hosts and keys work as they do for
//! `ssh` itself. Every call has a bound: connecting ([`SshSettings::connect_timeout`]),
//! each command (its own timeout), and dead peers (keep-alives every
//! [`SERVER_ALIVE_INTERVAL`]).
//!
//! Commands are POSIX `sh` scripts sent as one single-quoted argument of `sh -c`, so the
//! remote login shell undoes exactly one level of quoting whatever it is.

use super::spec::{SshSettings, SshTarget};
use openssh::{ControlPersist, KnownHosts, SessionBuilder, Stdio};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt as _;

/// Keep-alive interval on every connection; ssh gives a silent peer up after three.
pub const SERVER_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// How long an idle master connection outlives its last command, should this process die
/// without closing it.
pub const MASTER_IDLE_SECS: usize = 120;
/// Margin on top of `ConnectTimeout` for the whole connection set-up (key exchange and
/// authentication come after the TCP connect that `ConnectTimeout` bounds).
pub const CONNECT_MARGIN: Duration = Duration::from_secs(10);
/// Bytes of a failed command's stderr quoted in its error.
pub const STDERR_QUOTED_BYTES_MAX: usize = 4096;

/// A failure on a host.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// No connection: ssh's own message, e.g. `connect to host 10.0.0.2 port 22:
    /// Connection refused`.
    #[error("ssh: {0}")]
    Connect(String),
    /// The connection broke, or the local ssh client failed, during a command.
    #[error("ssh: {0}")]
    Transport(String),
    /// A step ran past its bound.
    #[error("no answer within {}", humantime::format_duration(*timeout))]
    Timeout {
        /// The bound.
        timeout: Duration,
    },
    /// The remote command failed.
    #[error("{}", failed_message(*code, stderr))]
    Failed {
        /// Its exit code, if it exited.
        code: Option<i32>,
        /// The end of its stderr.
        stderr: String,
    },
    /// A local file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Local {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The host answered something this program does not understand.
    #[error("{0}")]
    Unexpected(String),
}

fn failed_message(code: Option<i32>, stderr: &str) -> String {
    let how = code.map_or_else(|| "was killed".to_string(), |c| format!("exited with {c}"));
    let stderr = stderr.trim();
    if stderr.is_empty() {
        format!("the remote command {how}")
    } else {
        format!("{stderr} (the remote command {how})")
    }
}

/// What a remote command printed on stdout (its stderr is quoted only when it fails).
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
}

/// A connected host.
#[derive(Debug)]
pub struct Remote {
    session: openssh::Session,
}

/// Local files every connection shares: the folder of the control sockets and, when the
/// cluster file has `ssh.options`, the ssh configuration that carries them.
#[derive(Debug)]
pub struct SshContext {
    dir: tempfile::TempDir,
    config_file: Option<PathBuf>,
}

impl SshContext {
    /// Makes the control folder (short, under the temporary folder: a Unix socket path has
    /// at most 107 bytes) and the ssh configuration for `settings.options`: those options,
    /// then `Include` of the configuration ssh would read otherwise, since ssh takes the
    /// first value it finds for each option.
    pub fn new(settings: &SshSettings, home: Option<&Path>) -> Result<SshContext, RemoteError> {
        let dir = tempfile::Builder::new()
            .prefix("flame-ssh-")
            .tempdir()
            .map_err(|source| RemoteError::Local {
                path: std::env::temp_dir(),
                source,
            })?;
        let config_file = if settings.options.is_empty() {
            settings.config_file.clone()
        } else {
            let mut text = String::from("# Written by flame cluster for one run.\n");
            for option in &settings.options {
                text.push_str(option);
                text.push('\n');
            }
            let user = settings
                .config_file
                .clone()
                .or_else(|| home.map(|h| h.join(".ssh/config")));
            if let Some(user) = user {
                text.push_str(&format!("Include \"{}\"\n", user.display()));
            }
            if settings.config_file.is_none() {
                text.push_str("Include /etc/ssh/ssh_config\n");
            }
            let path = dir.path().join("ssh_config");
            std::fs::write(&path, text).map_err(|source| RemoteError::Local {
                path: path.clone(),
                source,
            })?;
            Some(path)
        };
        Ok(SshContext { dir, config_file })
    }

    /// Connects to `target`.
    pub async fn connect(
        &self,
        target: &SshTarget,
        settings: &SshSettings,
    ) -> Result<Remote, RemoteError> {
        let mut builder = SessionBuilder::default();
        if let Some(user) = &target.user {
            builder.user(user.clone());
        }
        if let Some(port) = target.port {
            builder.port(port);
        }
        if let Some(key) = &target.identity_file {
            builder.keyfile(key);
        }
        builder
            .known_hosts_check(match settings.strict_host_key_checking.as_str() {
                "yes" => KnownHosts::Strict,
                "no" => KnownHosts::Accept,
                _ => KnownHosts::Add,
            })
            .connect_timeout(settings.connect_timeout.max(Duration::from_secs(1)))
            .server_alive_interval(SERVER_ALIVE_INTERVAL)
            .control_directory(self.dir.path())
            .control_persist(ControlPersist::IdleFor(
                NonZeroUsize::new(MASTER_IDLE_SECS).unwrap_or(NonZeroUsize::MIN),
            ));
        if let Some(file) = &self.config_file {
            builder.config_file(file);
        }
        if let Some(file) = &settings.known_hosts_file {
            builder.user_known_hosts_file(file);
        }
        let bound = settings.connect_timeout + CONNECT_MARGIN;
        match tokio::time::timeout(bound, builder.connect(&target.host)).await {
            Err(_) => Err(RemoteError::Timeout { timeout: bound }),
            Ok(Err(e)) => Err(RemoteError::Connect(ssh_message(&e))),
            Ok(Ok(session)) => Ok(Remote { session }),
        }
    }
}

impl Remote {
    /// Runs `script` with `sh -c`, `stdin` fed to it (then closed), bounded by `timeout`.
    /// A non-zero exit is [`RemoteError::Failed`] with the end of its stderr.
    pub async fn run(
        &self,
        script: &str,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Output, RemoteError> {
        let run = async {
            let mut command = self.session.raw_command(sh_c(script));
            command
                .stdin(if stdin.is_some() {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = command.spawn().await.map_err(transport)?;
            if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin().take()) {
                // A command that exits without reading its stdin is reported by its status.
                let _ = pipe.write_all(bytes).await;
                let _ = pipe.shutdown().await;
            }
            child.wait_with_output().await.map_err(transport)
        };
        let output = tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| RemoteError::Timeout { timeout })??;
        finish(output)
    }

    /// Streams the local file `from` into `script`'s stdin (which writes it somewhere and
    /// checks it), bounded by `timeout`.
    pub async fn run_with_file(
        &self,
        script: &str,
        from: &Path,
        timeout: Duration,
    ) -> Result<Output, RemoteError> {
        let local = |source| RemoteError::Local {
            path: from.to_path_buf(),
            source,
        };
        let mut file = tokio::fs::File::open(from).await.map_err(local)?;
        let run = async {
            let mut command = self.session.raw_command(sh_c(script));
            command
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let mut child = command.spawn().await.map_err(transport)?;
            if let Some(mut pipe) = child.stdin().take() {
                // A write error means the remote side stopped reading: its exit status and
                // stderr say why, below.
                let copied = tokio::io::copy(&mut file, &mut pipe).await;
                let _ = pipe.shutdown().await;
                drop(pipe);
                if let Err(e) = copied {
                    if e.kind() != std::io::ErrorKind::BrokenPipe {
                        tracing::debug!("copy of {} stopped: {e}", from.display());
                    }
                }
            }
            child.wait_with_output().await.map_err(transport)
        };
        let output = tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| RemoteError::Timeout { timeout })??;
        finish(output)
    }

    /// Closes the master connection.
    pub async fn close(self) {
        // A master that is already gone has nothing left to close.
        let _ = self.session.close().await;
    }
}

fn finish(output: std::process::Output) -> Result<Output, RemoteError> {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        return Ok(Output { stdout });
    }
    let code = output.status.code();
    if code == Some(255) && stderr.trim_start().starts_with("ssh:") {
        return Err(RemoteError::Transport(
            stderr.trim().trim_start_matches("ssh:").trim().to_string(),
        ));
    }
    Err(RemoteError::Failed {
        code,
        stderr: tail(&stderr, STDERR_QUOTED_BYTES_MAX),
    })
}

fn transport(e: openssh::Error) -> RemoteError {
    RemoteError::Transport(ssh_message(&e))
}

/// ssh's own words where the error carries them (the master's log), else the chain.
fn ssh_message(e: &openssh::Error) -> String {
    use std::error::Error as _;
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    match e {
        // The io error holds ssh's message, e.g. `connect to host ... Connection refused`.
        openssh::Error::Connect(io) | openssh::Error::Master(io) => {
            let text = io.to_string();
            text.trim().trim_start_matches("ssh: ").to_string()
        }
        _ => parts.join(": "),
    }
}

/// The last `max` bytes of `text` (on a character boundary), trimmed.
pub fn tail(text: &str, max: usize) -> String {
    let text = text.trim();
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

/// `sh -c 'SCRIPT'`, quoted for the remote login shell.
fn sh_c(script: &str) -> String {
    format!("sh -c {}", quote(script))
}

/// Single-quotes `s` for a POSIX shell when it holds anything but safe characters.
pub use flame_client::local::shell_quote as quote;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_one_shell() {
        for s in ["plain", "a b", "it's", "$HOME `x` \"q\"", "", "a\nb"] {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", quote(s)))
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), s);
        }
    }

    #[test]
    fn failures_quote_stderr_and_code() {
        let e = RemoteError::Failed {
            code: Some(3),
            stderr: "  no space left\n".to_string(),
        };
        assert_eq!(
            e.to_string(),
            "no space left (the remote command exited with 3)"
        );
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("aé", 1), "");
    }

    #[test]
    fn options_go_before_the_included_configuration() {
        let home = tempfile::tempdir().unwrap();
        let settings = SshSettings {
            config_file: None,
            known_hosts_file: None,
            strict_host_key_checking: "accept-new".to_string(),
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(1),
            options: vec!["ProxyJump=bastion".to_string()],
            parallel: 1,
        };
        let context = SshContext::new(&settings, Some(home.path())).unwrap();
        let text = std::fs::read_to_string(context.config_file.as_ref().unwrap()).unwrap();
        let lines: Vec<&str> = text.lines().skip(1).collect();
        assert_eq!(lines[0], "ProxyJump=bastion");
        assert!(lines[1].starts_with("Include \"") && lines[1].ends_with(".ssh/config\""));
        assert_eq!(lines[2], "Include /etc/ssh/ssh_config");
    }
}
