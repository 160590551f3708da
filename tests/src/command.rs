//! Finding the workspace's binaries and running one to completion, with a bound.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::process::Command;

/// How long a `flame` command may run before it is killed and the test fails.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// The folder holding the workspace's binaries: the parent of the running test binary, or
/// of its `deps/` folder.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("cannot locate the running test binary");
    let dir = exe
        .parent()
        .expect("the test binary has no parent folder")
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent()
            .expect("the deps folder has no parent")
            .to_path_buf()
    } else {
        dir
    }
}

/// The path of the workspace binary `name`; panics, saying how to build it, when it is
/// missing.
pub fn binary(name: &str) -> PathBuf {
    let dir = bin_dir();
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "`{name}` is not in {}: run `cargo build --workspace --bins` first \
         (`cargo test --workspace` builds it; `cargo test -p flame-tests` does not)",
        dir.display()
    );
    path
}

/// A finished command: how it exited and what it printed.
#[derive(Debug)]
pub struct CmdOutput {
    /// The command line, for messages.
    pub command: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// How long it ran.
    pub elapsed: Duration,
}

impl CmdOutput {
    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panics, showing everything, unless the command exited 0.
    pub fn assert_success(&self) -> &Self {
        assert!(self.success(), "expected success:\n{self}");
        self
    }

    /// Panics, showing everything, unless the command exited on its own with a non-zero
    /// code (a crash by signal is not a clean failure).
    pub fn assert_failure(&self) -> &Self {
        assert!(
            matches!(self.status.code(), Some(code) if code != 0),
            "expected a non-zero exit code:\n{self}"
        );
        self
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "$ {}\n[{} after {:?}]",
            self.command, self.status, self.elapsed
        )?;
        writeln!(f, "--- stdout ---\n{}", self.stdout.trim_end())?;
        write!(f, "--- stderr ---\n{}", self.stderr.trim_end())
    }
}

/// Runs `command` to completion with stdin closed and its output captured. Panics when it
/// cannot start or runs longer than `timeout`; it is killed then.
pub async fn run_command(mut command: Command, timeout: Duration) -> CmdOutput {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let line = describe(&command);
    let started = Instant::now();
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
    // On a timeout the future is dropped with the child, and `kill_on_drop` kills it.
    let output = match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(e)) => panic!("cannot wait for `{line}`: {e}"),
        Err(_) => panic!("`{line}` did not finish within {timeout:?}; it was killed"),
    };
    CmdOutput {
        command: line,
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        elapsed: started.elapsed(),
    }
}

/// A command line for messages: the program's file name and its arguments.
pub fn describe(command: &Command) -> String {
    let std = command.as_std();
    let program = Path::new(std.get_program())
        .file_name()
        .map_or_else(|| std.get_program().to_os_string(), |n| n.to_os_string());
    std::iter::once(program.as_os_str())
        .chain(std.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
