//! `flame-shell`: the built-in application behind `flame submit --each`. Each session
//! carries a command ([`flame_protocol::shell::ShellCommand`]); each task runs it once for
//! its line and answers with how it ended and what it printed
//! ([`flame_protocol::shell::ShellOutput`]).
//!
//! The program is executed directly, not through a shell: the user writes `sh -c '...'`
//! when they want one. Its stdin gets the line and a newline; its stdout and stderr are
//! captured (at most [`CAPTURE_BYTES_MAX`] bytes together, the rest is read and dropped so
//! that the command never blocks on a full pipe). This process's own stdout carries the
//! shim's frames, so the command never inherits it.
//!
//! A command still running when the executor is stopped dies with it: the node kills the
//! executor's whole cgroup, so nothing here tracks process groups. A command that leaves a
//! background process holding its stdout or stderr open keeps its task running until that
//! process exits or closes them, as with a shell's `$(...)`.

use bytes::Bytes;
use flame_protocol::shell::{
    ShellCommand, ShellExit, ShellOutput, CAPTURE_BYTES_MAX, EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND,
};
use flame_shims::service::{run, Service, SessionContext, TaskContext};
use std::ffi::OsStr;
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes read from the command's stdout or stderr at a time.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// The runner: the command of the session it is bound to, if any.
#[derive(Debug, Default)]
struct Shell {
    command: Option<ShellCommand>,
}

impl Service for Shell {
    fn enter_session(&mut self, ctx: &SessionContext) -> Result<(), String> {
        let command = ShellCommand::decode(&ctx.common_data)
            .map_err(|e| format!("session {}: {e}", ctx.session_id))?;
        self.command = Some(command);
        Ok(())
    }

    fn invoke(&mut self, ctx: &TaskContext, input: &[u8]) -> Result<Vec<u8>, String> {
        let command = self
            .command
            .as_ref()
            .ok_or_else(|| format!("task {}: no session command", ctx.task_id))?;
        run_line(command, input)?
            .encode()
            .map_err(|e| format!("task {}: {e}", ctx.task_id))
    }

    fn leave_session(&mut self) -> Result<(), String> {
        self.command = None;
        Ok(())
    }
}

/// Runs `command` for one line. `Err` only when this process cannot do its part (no thread
/// to read a pipe); whatever the command does is an `Ok` output.
fn run_line(command: &ShellCommand, line: &[u8]) -> Result<ShellOutput, String> {
    let argv = command.argv_for(line);
    let Some((program, args)) = argv.split_first() else {
        // ShellCommand refuses an empty argv; answer like a shell would anyway.
        return Ok(not_started(b"", &io::Error::from(ErrorKind::NotFound)));
    };
    let spawned = Command::new(OsStr::from_bytes(program))
        .args(args.iter().map(|a| OsStr::from_bytes(a)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => return Ok(not_started(program, &e)),
    };
    let captured = capture(&mut child, line);
    // Waited for even when capturing failed, so that no zombie is left.
    let status = match captured {
        Ok(_) => child.wait(),
        Err(_) => child.kill().and_then(|()| child.wait()),
    };
    let (stdout, stderr, truncated) = captured?;
    let status = status.map_err(|e| format!("cannot wait for the command: {e}"))?;
    let exit = match (status.code(), status.signal()) {
        (Some(code), _) => ShellExit::Code(code),
        (None, Some(signal)) => ShellExit::Signal(signal),
        // wait() reports only ended processes, which have one or the other.
        (None, None) => ShellExit::Code(-1),
    };
    Ok(ShellOutput {
        exit,
        stdout: Bytes::from(stdout),
        stderr: Bytes::from(stderr),
        truncated,
    })
}

/// Feeds the line to the child's stdin and reads its stdout and stderr to the end, each on
/// its own thread so that no pipe can fill up while another is waited on. Returns stdout,
/// stderr and whether anything was dropped.
fn capture(child: &mut Child, line: &[u8]) -> Result<(Vec<u8>, Vec<u8>, bool), String> {
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let budget = AtomicUsize::new(CAPTURE_BYTES_MAX);
    std::thread::scope(|scope| {
        let thread = |name: &str| std::thread::Builder::new().name(name.to_owned());
        let budget = &budget;
        let started = thread("stdin")
            .spawn_scoped(scope, move || feed(stdin, line))
            .and_then(|feeder| {
                thread("stderr")
                    .spawn_scoped(scope, move || drain(stderr, budget))
                    .map(|errors| (feeder, errors))
            });
        let (feeder, errors) = match started {
            Ok(threads) => threads,
            Err(e) => {
                // A thread already started ends once the command is gone and its pipes
                // are closed; the scope waits for it.
                let _ = child.kill();
                return Err(format!("cannot start a thread to run the command: {e}"));
            }
        };
        let (out, out_cut) = drain(stdout, budget);
        let (err, err_cut) = errors
            .join()
            .map_err(|_| "the stderr reader panicked".to_owned())?;
        feeder
            .join()
            .map_err(|_| "the stdin writer panicked".to_owned())?;
        Ok((out, err, out_cut || err_cut))
    })
}

/// Writes the line and a newline, then closes stdin. A command that does not read its
/// stdin closes the pipe early; that is its right, not an error.
fn feed(stdin: Option<std::process::ChildStdin>, line: &[u8]) {
    if let Some(mut stdin) = stdin {
        let _ignored = stdin.write_all(line).and_then(|()| stdin.write_all(b"\n"));
    }
}

/// Reads `pipe` to its end, keeping what `budget` (shared by stdout and stderr) allows.
/// Returns the bytes kept and whether any were dropped. A read error ends the stream like
/// an end of file.
fn drain<R: Read>(pipe: Option<R>, budget: &AtomicUsize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut dropped = false;
    let Some(mut pipe) = pipe else {
        return (kept, dropped);
    };
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    loop {
        let n = match pipe.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut granted = 0;
        // Claims up to n bytes of what is left; fetch_update retries on a race.
        let _ = budget.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
            granted = left.min(n);
            Some(left - granted)
        });
        kept.extend_from_slice(&chunk[..granted]);
        dropped |= granted < n;
    }
    (kept, dropped)
}

/// Whether `name` is a file this process can see in a folder of its `PATH`.
fn visible_in_path(name: &OsStr) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| std::fs::metadata(dir.join(name)).is_ok())
    })
}

/// The output of a command that could not be started, in a shell's words and codes.
fn not_started(program: &[u8], error: &io::Error) -> ShellOutput {
    let name = String::from_utf8_lossy(program);
    // A bare name refused while searching PATH may lie only in folders this user cannot
    // search (the node's PATH is not this user's): for it, the command is not there.
    let unseen = error.kind() == ErrorKind::PermissionDenied
        && !program.contains(&b'/')
        && !visible_in_path(OsStr::from_bytes(program));
    let (code, message) = match error.kind() {
        _ if unseen => (EXIT_NOT_FOUND, format!("{name}: command not found")),
        ErrorKind::NotFound => (EXIT_NOT_FOUND, format!("{name}: command not found")),
        ErrorKind::PermissionDenied => (EXIT_CANNOT_EXECUTE, format!("{name}: permission denied")),
        _ => (
            EXIT_CANNOT_EXECUTE,
            format!("{name}: cannot execute: {error}"),
        ),
    };
    ShellOutput {
        exit: ShellExit::Code(code),
        stdout: Bytes::new(),
        stderr: Bytes::from(format!("flame-shell: {message}\n")),
        truncated: false,
    }
}

fn main() {
    flame_shims::service::exit_if_help(
        "flame-shell: the built-in `shell` application behind `flame submit --each`; runs the session's command once per line.",
    );
    if let Err(e) = run(Shell::default()) {
        eprintln!("flame-shell: error: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn command(words: &[&str]) -> ShellCommand {
        ShellCommand::new(words.iter().map(|w| (*w).to_owned()).collect()).unwrap()
    }

    #[test]
    fn the_line_is_an_argument_and_stdin() {
        let out = run_line(
            &command(&["sh", "-c", "echo arg={}; cat; echo err >&2; exit 3"]),
            b"a b",
        )
        .unwrap();
        assert_eq!(out.exit, ShellExit::Code(3));
        assert_eq!(&out.stdout[..], b"arg=a b\na b\n");
        assert_eq!(&out.stderr[..], b"err\n");
        assert!(!out.truncated);
    }

    #[test]
    fn signals_are_reported() {
        let out = run_line(&command(&["sh", "-c", "kill -9 $$"]), b"").unwrap();
        assert_eq!(out.exit, ShellExit::Signal(9));
    }

    #[test]
    fn a_missing_program_is_127() {
        let out = run_line(&command(&["flame-no-such-program-{}"]), b"x").unwrap();
        assert_eq!(out.exit, ShellExit::Code(EXIT_NOT_FOUND));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("flame-no-such-program-x: command not found"),
            "{err}"
        );
        // A NUL byte in an argument cannot be passed to exec.
        let out = run_line(&command(&["echo", "{}"]), b"a\0b").unwrap();
        assert_eq!(out.exit, ShellExit::Code(EXIT_CANNOT_EXECUTE)); // Refused while searching a PATH folder this user cannot enter: not found, as a
                                                                    // shell of that user would say; a path, or a name it can see, stays refused.
        let denied = io::Error::from(ErrorKind::PermissionDenied);
        let out = not_started(b"flame-no-such-program", &denied);
        assert_eq!(out.exit, ShellExit::Code(EXIT_NOT_FOUND));
        let out = not_started(b"/no/such/dir/prog", &denied);
        assert_eq!(out.exit, ShellExit::Code(EXIT_CANNOT_EXECUTE));
        let out = not_started(b"sh", &denied);
        assert_eq!(out.exit, ShellExit::Code(EXIT_CANNOT_EXECUTE));
    }

    #[test]
    fn a_command_ignoring_stdin_is_fine() {
        let big = vec![b'x'; 4 * 1024 * 1024];
        let out = run_line(&command(&["true"]), &big).unwrap();
        assert_eq!(out.exit, ShellExit::Code(0));
    }

    #[test]
    fn output_past_the_bound_is_dropped_and_marked() {
        let budget = AtomicUsize::new(10);
        let (kept, dropped) = drain(Some(&b"0123456789abc"[..]), &budget);
        assert_eq!(kept, b"0123456789");
        assert!(dropped);
        let (kept, dropped) = drain(Some(&b"more"[..]), &budget);
        assert!(kept.is_empty() && dropped);
        let (kept, dropped) = drain(Some(&b""[..]), &budget);
        assert!(kept.is_empty() && !dropped);
    }

    #[test]
    fn sessions_carry_their_command() {
        let mut shell = Shell::default();
        let ctx = TaskContext {
            session_id: 1,
            task_id: 1,
        };
        assert!(shell.invoke(&ctx, b"x").is_err());
        let bad = SessionContext {
            session_id: 1,
            common_data: Bytes::from_static(b"\xff\xff"),
        };
        assert!(shell.enter_session(&bad).is_err());
        let good = SessionContext {
            session_id: 1,
            common_data: Bytes::from(command(&["echo"]).encode().unwrap()),
        };
        shell.enter_session(&good).unwrap();
        let out = ShellOutput::decode(&shell.invoke(&ctx, b"hi").unwrap()).unwrap();
        assert_eq!(&out.stdout[..], b"\n");
        shell.leave_session().unwrap();
        assert!(shell.invoke(&ctx, b"x").is_err());
    }
}
