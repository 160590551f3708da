//! `flame-shim-check`: checks that a program speaks the Flame shim protocol.
//!
//! ```text
//! flame-shim-check [--ping] [--shim stdio|unix] [--timeout-secs N] -- COMMAND [ARGS...]
//! ```
//!
//! With `--shim stdio` (the default) it starts COMMAND with piped stdin and stdout (stderr
//! passes through). With `--shim unix` it makes a private temporary directory, names a
//! socket in it through `FLAME_SHIM_SOCKET`, starts COMMAND with stdin from `/dev/null` and
//! its stdout and stderr passed through to this program's stderr, and connects with the same
//! [`connect_when_listening`] the node uses (check `listen`). Either way it plays the node's
//! part through the same [`NodeShim`] that `flame-node` uses, and prints one line per check:
//! `ok <name>` or `FAIL <name>: <why>`. It stops at the first failure, because later checks
//! depend on the stream being in step, and exits 1; it exits 0 when every check passes and 2
//! on a usage error.
//!
//! Outputs are not judged, since any application may answer anything, or fail a task, and
//! still be conformant; only the framing, the task ids and the order are. With `--ping` the
//! program must be a ping application and every output must pass
//! [`flame_protocol::ping::check_reply`].

use flame_protocol::ping::check_reply;
use flame_protocol::shim::SHIM_FRAME_BYTES_MAX;
use flame_shims::node::{Invocation, NodeShim};
use flame_shims::unix::{connect_when_listening, ENV_SHIM_SOCKET, SOCKET_FILE_NAME};
use std::ffi::OsString;
use std::fmt;
use std::future::Future;
use std::io::Write;
use std::os::fd::AsFd;
use std::process::{ExitCode, Stdio};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::process::{Child, Command};

const USAGE: &str =
    "usage: flame-shim-check [--ping] [--shim stdio|unix] [--timeout-secs N] -- COMMAND [ARGS...]";

/// What `--help` prints.
const HELP: &str = "\
Checks that a program speaks the Flame shim protocol, playing the node's part.

usage: flame-shim-check [--ping] [--shim stdio|unix] [--timeout-secs N] -- COMMAND [ARGS...]

Options:
      --ping              the program is a ping application: check every output too
      --shim stdio|unix   the transport: frames on the program's stdin and stdout (stdio,
                          the default) or on the Unix socket named by FLAME_SHIM_SOCKET
      --timeout-secs N    how long each check waits for the program [default: 10]
  -h, --help              print this help

Prints `ok <check>` or `FAIL <check>: <why>` per check and stops at the first failure.
Exits 0 when every check passes, 1 when one fails, 2 on a usage error.
See docs/shim-protocol.md for the protocol.";

/// How long each check waits for the program unless `--timeout-secs` says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Size of the large-input check: big enough to need many pipe buffers in each direction.
const LARGE_INPUT_BYTES: usize = 1024 * 1024;

/// Tasks in the pipelined check's window.
const PIPELINED_TASKS: usize = 4;

/// Common data of the first session; binary on purpose, so text-only handling shows up.
const COMMON_DATA: &[u8] = b"flame-shim-check common data \x00\x01\xfe\xff";

/// Input of the small-input check; binary for the same reason.
const SMALL_INPUT: &[u8] = b"hello \x00\x01\xfe\xff flame";

/// Prints one report line. A failed write (say, stdout piped into `head`) is ignored: the
/// checks still run to the end and the exit status still tells the outcome.
fn say(line: fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// The transport under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shim {
    /// Frames on the program's stdin and stdout.
    Stdio,
    /// Frames on a Unix socket the program listens on.
    Unix,
}

/// What the command line asks for.
#[derive(Debug)]
enum Request {
    /// `--help` or `-h`: print [`HELP`] and exit 0.
    Help,
    /// Run the checks.
    Check(Options),
}

#[derive(Debug)]
struct Options {
    ping: bool,
    shim: Shim,
    timeout: Duration,
    command: Vec<OsString>,
}

fn parse_args(mut args: impl Iterator<Item = OsString>) -> Result<Request, String> {
    let mut ping = false;
    let mut shim = Shim::Stdio;
    let mut timeout = DEFAULT_TIMEOUT;
    loop {
        let Some(arg) = args.next() else {
            return Err("missing `--` before the command".into());
        };
        match arg.to_str() {
            Some("--") => break,
            Some("--help" | "-h") => return Ok(Request::Help),
            Some("--ping") => ping = true,
            Some("--shim") => {
                shim = match args.next().as_ref().and_then(|s| s.to_str()) {
                    Some("stdio") => Shim::Stdio,
                    Some("unix") => Shim::Unix,
                    _ => return Err("--shim needs `stdio` or `unix`".into()),
                }
            }
            Some("--timeout-secs") => {
                let secs = args
                    .next()
                    .and_then(|s| s.to_str().and_then(|s| s.parse::<u64>().ok()))
                    .filter(|secs| *secs > 0)
                    .ok_or("--timeout-secs needs a whole number of seconds above 0")?;
                timeout = Duration::from_secs(secs);
            }
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    let command: Vec<OsString> = args.collect();
    if command.is_empty() {
        return Err("no command after `--`".into());
    }
    Ok(Request::Check(Options {
        ping,
        shim,
        timeout,
        command,
    }))
}

/// Runs the checks in order, each under the timeout, and prints one line per check.
struct Checker {
    timeout: Duration,
    ping: bool,
}

impl Checker {
    /// Runs one check under the timeout and prints its line. `Err(())` means it failed and
    /// the line has been printed.
    async fn check<F>(&self, name: &str, check: F) -> Result<(), ()>
    where
        F: Future<Output = Result<String, String>>,
    {
        self.check_within(self.timeout, name, check).await
    }

    /// [`check`](Self::check) with another timeout.
    async fn check_within<F>(&self, timeout: Duration, name: &str, check: F) -> Result<(), ()>
    where
        F: Future<Output = Result<String, String>>,
    {
        match tokio::time::timeout(timeout, check).await {
            Ok(Ok(detail)) if detail.is_empty() => {
                say(format_args!("ok {name}"));
                Ok(())
            }
            Ok(Ok(detail)) => {
                say(format_args!("ok {name} ({detail})"));
                Ok(())
            }
            Ok(Err(why)) => {
                say(format_args!("FAIL {name}: {why}"));
                Err(())
            }
            Err(_) => {
                say(format_args!(
                    "FAIL {name}: no answer within {} s",
                    timeout.as_secs()
                ));
                Err(())
            }
        }
    }

    /// One task: the result must name the task (NodeShim checks that); with `--ping` it
    /// must also be the ping reply to this input.
    async fn invoke<R, W>(
        &self,
        shim: &mut NodeShim<R, W>,
        task_id: u64,
        input: &[u8],
    ) -> Result<String, String>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let invocation = shim
            .invoke(task_id, input)
            .await
            .map_err(|e| e.to_string())?;
        self.judge(input, invocation)
    }

    /// A task's outcome as a line, or why it fails the check.
    fn judge(&self, input: &[u8], invocation: Invocation) -> Result<String, String> {
        match invocation {
            Invocation::Succeeded(output) if self.ping => {
                let reply = check_reply(input, &output)
                    .map_err(|e| format!("not the ping reply to its input: {e}"))?;
                Ok(format!(
                    "{} bytes from host {} executor {}",
                    output.len(),
                    reply.host,
                    reply.executor
                ))
            }
            Invocation::Succeeded(output) => Ok(format!("succeeded, {} bytes", output.len())),
            Invocation::Failed(message) if self.ping => {
                Err(format!("a ping task failed: {message}"))
            }
            Invocation::Failed(message) => Ok(format!("task failed: {message}")),
        }
    }

    /// A window of tasks written at once, as the node sends them: one result each, in
    /// order (NodeShim checks the ids), each checked like a single task's.
    async fn pipelined<R, W>(
        &self,
        shim: &mut NodeShim<R, W>,
        first_task: u64,
        large: &[u8],
    ) -> Result<String, String>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let inputs: [&[u8]; PIPELINED_TASKS] = [SMALL_INPUT, b"", large, SMALL_INPUT];
        let tasks = (first_task..).zip(inputs);
        for (task, input) in tasks.clone() {
            shim.queue_invoke(task, input).map_err(|e| e.to_string())?;
        }
        let mut answers = Vec::new();
        for (task, input) in tasks {
            let message = shim.next_message().await.map_err(|e| e.to_string())?;
            let invocation = shim
                .expect_result(task, message)
                .map_err(|e| e.to_string())?;
            answers.push(self.judge(input, invocation)?);
        }
        Ok(format!(
            "{PIPELINED_TASKS} results in order: {}",
            answers.join("; ")
        ))
    }

    /// Everything between start-up and closing the stream.
    async fn conversation<R, W>(&self, shim: &mut NodeShim<R, W>) -> Result<(), ()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let large: Vec<u8> = (0..LARGE_INPUT_BYTES).map(|i| (i % 251) as u8).collect();
        let text = |r: Result<(), flame_shims::ShimError>| {
            r.map(|()| String::new()).map_err(|e| e.to_string())
        };
        self.check("ready", async { text(shim.wait_ready().await) })
            .await?;
        self.check("enter-session-1", async {
            text(shim.enter(1, COMMON_DATA).await)
        })
        .await?;
        self.check("invoke-empty", self.invoke(shim, 1, b""))
            .await?;
        self.check("invoke-small", self.invoke(shim, 2, SMALL_INPUT))
            .await?;
        self.check("invoke-1mib", self.invoke(shim, 3, &large))
            .await?;
        self.check("invoke-pipelined", self.pipelined(shim, 4, &large))
            .await?;
        self.check("leave-session-1", async { text(shim.leave().await) })
            .await?;
        self.check("enter-session-2", async { text(shim.enter(2, b"").await) })
            .await?;
        self.check("invoke-session-2", self.invoke(shim, 1, SMALL_INPUT))
            .await?;
        self.check("leave-session-2", async { text(shim.leave().await) })
            .await
    }
}

/// Starts the program, runs every check, and says whether all passed.
async fn run_checks(options: &Options) -> bool {
    let Some((program, args)) = options.command.split_first() else {
        say(format_args!("FAIL start: no command"));
        return false;
    };
    let checker = Checker {
        timeout: options.timeout,
        ping: options.ping,
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .stderr(Stdio::inherit())
        // Its own process group, so that a failed check can kill the program together with
        // anything it started (a shell's children would otherwise hold the pipes open).
        .process_group(0)
        .kill_on_drop(true);
    match options.shim {
        Shim::Stdio => {
            command.stdin(Stdio::piped()).stdout(Stdio::piped());
            let Some(mut child) = spawn(&mut command, program) else {
                return false;
            };
            let (Some(stdout), Some(stdin)) = (child.stdout.take(), child.stdin.take()) else {
                say(format_args!("FAIL start: the child's pipes are missing"));
                return false;
            };
            let shim = NodeShim::new(stdout, stdin, SHIM_FRAME_BYTES_MAX);
            converse_and_close(&checker, shim, &mut child).await
        }
        Shim::Unix => {
            // Private (0700) like the node's per-executor directory; removed on return.
            let dir = match tempfile::Builder::new()
                .prefix("flame-shim-check-")
                .tempdir()
            {
                Ok(dir) => dir,
                Err(e) => {
                    say(format_args!(
                        "FAIL start: cannot make a directory for the socket: {e}"
                    ));
                    return false;
                }
            };
            let socket = dir.path().join(SOCKET_FILE_NAME);
            // The program's stdout is free under this transport; it goes to our stderr so
            // that our stdout stays the report.
            let stdout = match std::io::stderr().as_fd().try_clone_to_owned() {
                Ok(fd) => Stdio::from(fd),
                Err(e) => {
                    say(format_args!("FAIL start: cannot pass stderr on: {e}"));
                    return false;
                }
            };
            command
                .env(ENV_SHIM_SOCKET, &socket)
                .stdin(Stdio::null())
                .stdout(stdout);
            let Some(mut child) = spawn(&mut command, program) else {
                return false;
            };
            let mut stream = None;
            // connect_when_listening bounds the wait itself and names the socket when it
            // gives up; the check's own timeout is only a backstop behind it.
            let listened = checker
                .check_within(options.timeout + Duration::from_secs(1), "listen", async {
                    let connected = connect_when_listening(&socket, options.timeout, child.wait())
                        .await
                        .map_err(|e| e.to_string())?;
                    stream = Some(connected);
                    Ok(String::new())
                })
                .await;
            let (Ok(()), Some(stream)) = (listened, stream) else {
                kill(&mut child).await;
                return false;
            };
            let (read, write) = stream.into_split();
            let shim = NodeShim::new(read, write, SHIM_FRAME_BYTES_MAX);
            converse_and_close(&checker, shim, &mut child).await
        }
    }
}

/// Starts the program, or prints why it could not be started.
fn spawn(command: &mut Command, program: &OsString) -> Option<Child> {
    match command.spawn() {
        Ok(child) => Some(child),
        Err(e) => {
            say(format_args!("FAIL start: cannot run {program:?}: {e}"));
            None
        }
    }
}

/// Runs the conversation, ends the stream, and checks that the program exits 0.
async fn converse_and_close<R, W>(
    checker: &Checker,
    mut shim: NodeShim<R, W>,
    child: &mut Child,
) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if checker.conversation(&mut shim).await.is_err() {
        kill(child).await;
        return false;
    }
    shim.shutdown().await;
    let exited = checker
        .check("exit-on-eof", async {
            let status = child.wait().await.map_err(|e| e.to_string())?;
            if status.success() {
                Ok(String::new())
            } else {
                Err(format!(
                    "ending the shim stream ended the program with {status}, not 0"
                ))
            }
        })
        .await;
    if exited.is_err() {
        kill(child).await;
        return false;
    }
    true
}

/// Kills the program's process group and reaps the program.
async fn kill(child: &mut Child) {
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;

    // The group id is the child's pid (process_group(0)); no id means it was already reaped.
    if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
        if let Err(e) = killpg(Pid::from_raw(pid), Signal::SIGKILL) {
            eprintln!("flame-shim-check: could not kill the program's process group: {e}");
        }
    }
    if let Err(e) = child.kill().await {
        eprintln!("flame-shim-check: could not kill the program: {e}");
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let options = match parse_args(std::env::args_os().skip(1)) {
        Ok(Request::Check(options)) => options,
        Ok(Request::Help) => {
            say(format_args!("{HELP}"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if run_checks(&options).await {
        say(format_args!("all checks passed"));
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
