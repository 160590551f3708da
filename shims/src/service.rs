//! The application's side of the shim protocol, for applications written in Rust.
//!
//! Implement [`Service`] and hand it to [`run`] from `main`:
//!
//! ```no_run
//! use flame_shims::service::{run, Service, TaskContext};
//!
//! struct Upper;
//!
//! impl Service for Upper {
//!     fn invoke(&mut self, _ctx: &TaskContext, input: &[u8]) -> Result<Vec<u8>, String> {
//!         Ok(input.to_ascii_uppercase())
//!     }
//! }
//!
//! fn main() {
//!     if let Err(e) = run(Upper) {
//!         eprintln!("error: {e}");
//!         std::process::exit(1);
//!     }
//! }
//! ```
//!
//! [`run`] picks the transport the node chose: the Unix socket named by
//! [`ENV_SHIM_SOCKET`] when it is set ([`run_unix`]), else stdin and stdout ([`run_stdio`]).
//!
//! Everything here is synchronous std I/O: the application needs no async runtime, and one
//! task runs at a time. The node may send a window of tasks ahead (pipelining, see
//! `docs/shim-protocol.md`); they wait in the read buffer, are run in order, and each answer
//! is flushed as soon as it is made, so a quick task's result never waits behind a slow one.
//! Once connected there is no timeout either: the application waits for the node for as
//! long as the node keeps the stream open, and the node bounds how long it waits for the
//! application. The one bounded wait is [`run_unix`]'s accept ([`ACCEPT_TIMEOUT`]).

use crate::unix::{ENV_SHIM_SOCKET, SOCKET_FILE_MODE};
use crate::ShimError;
use bytes::Bytes;
use flame_protocol::shim::{
    parse_length, AppFrame, NodeFrame, ResultStatus, ShimFrameError, ENV_APPLICATION,
    ENV_EXECUTOR_ID, ENV_NODE, LENGTH_PREFIX_BYTES, SHIM_FRAME_BYTES_MAX,
};
use std::io::{self, BufRead, BufReader, BufWriter, ErrorKind, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest error message sent to the node; longer ones are cut at a character boundary.
/// Messages are for people and logs, and the bound keeps an error from outgrowing the frame.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 64 * 1024;

/// Capacity kept in the read and write buffers between frames; past this a buffer grown by
/// one large frame is released.
const BUFFER_KEEP_BYTES_MAX: usize = 1024 * 1024;

/// How long [`run`] waits for the node to connect to the Unix socket. The node connects as
/// soon as the socket appears, so this only runs out when the node is gone; it keeps an
/// orphaned application from waiting forever.
pub const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

/// The session an executor has been bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionContext {
    /// The session's id.
    pub session_id: u64,
    /// The session's common data, given once at enter (empty if the session has none).
    pub common_data: Bytes,
}

/// The task being invoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskContext {
    /// The session the task belongs to.
    pub session_id: u64,
    /// The task's id, unique within its session.
    pub task_id: u64,
}

/// An application, as the node sees it. One value serves every session the executor is
/// bound to, one after another, so state kept in `self` outlives a session on purpose
/// (loaded models, warm caches).
pub trait Service {
    /// Called when the executor is bound to a session. An `Err` is reported to the node,
    /// which then stops this executor.
    fn enter_session(&mut self, _ctx: &SessionContext) -> Result<(), String> {
        Ok(())
    }

    /// Runs one task. `Ok` is the task's output; `Err` fails the task with that message and
    /// keeps the executor.
    fn invoke(&mut self, ctx: &TaskContext, input: &[u8]) -> Result<Vec<u8>, String>;

    /// Called when the executor is unbound from its session. An `Err` is reported to the
    /// node, which then stops this executor.
    fn leave_session(&mut self) -> Result<(), String> {
        Ok(())
    }
}

/// What the node told this process about itself through the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecutorInfo {
    /// `FLAME_EXECUTOR_ID`: this executor's id.
    pub executor_id: Option<String>,
    /// `FLAME_NODE`: the name of the node running this executor.
    pub node: Option<String>,
    /// `FLAME_APPLICATION`: the registered application name.
    pub application: Option<String>,
}

/// Reads the variables the node sets for every executor. Each is `None` when unset or not
/// UTF-8, for example when the application runs outside Flame.
pub fn executor_info() -> ExecutorInfo {
    let var = |name: &str| std::env::var(name).ok();
    ExecutorInfo {
        executor_id: var(ENV_EXECUTOR_ID),
        node: var(ENV_NODE),
        application: var(ENV_APPLICATION),
    }
}

/// For the `main` of an application program: when its only argument is `--help` or `-h`,
/// prints `about` and how the program is run (under a node, or checked by
/// `flame-shim-check`), then exits 0. Otherwise returns, and the program serves as usual.
///
/// Only a lone `--help` counts, so an application registered with arguments of its own
/// is not changed by this; a program that takes `--help` as its argument does not call it.
pub fn exit_if_help(about: &str) {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if let [only] = args.as_slice() {
        if only == "--help" || only == "-h" {
            println!("{}", help_text(about));
            std::process::exit(0);
        }
    }
}

/// What [`exit_if_help`] prints.
fn help_text(about: &str) -> String {
    format!(
        "{about}\n\n\
         A Flame application: it serves tasks over the shim protocol (docs/shim-protocol.md), \
         on stdin and stdout, or on the Unix socket named by {ENV_SHIM_SOCKET}. Register it \
         with `flame app register` and a node starts it; `flame-shim-check -- PROGRAM` checks \
         it by hand."
    )
}

/// Serves the node until it ends the stream, over the transport the node chose.
///
/// When [`ENV_SHIM_SOCKET`] names a socket (it is set and not empty), this is
/// [`run_unix`] with [`ACCEPT_TIMEOUT`]; stdout and stderr are then left alone and both are
/// free for logs. Otherwise it is [`run_stdio`], which reserves stdout for frames.
///
/// Returns `Ok(())` on end of input at a frame boundary, which is the node's way of saying
/// "exit now"; exit with status 0 then. An `Err` is a broken stream, a protocol violation or
/// a failure to set up the socket; report it on stderr and exit non-zero.
pub fn run<S: Service>(service: S) -> Result<(), ShimError> {
    match std::env::var_os(ENV_SHIM_SOCKET) {
        Some(socket) if !socket.is_empty() => run_unix(service, Path::new(&socket), ACCEPT_TIMEOUT),
        _ => run_stdio(service),
    }
}

/// Serves the node over this process's stdin and stdout until the node closes stdin.
///
/// Stdout must carry nothing but frames, so before serving, this points file descriptor 1 at
/// stderr and keeps a private duplicate of the real stdout for frames. A stray `println!` in
/// the service, in a library it uses or in a child process it starts then lands in the log
/// instead of corrupting the stream.
pub fn run_stdio<S: Service>(service: S) -> Result<(), ShimError> {
    use std::os::fd::AsFd;

    let stdout = io::stdout();
    // Bytes printed before run() are flushed to the real stdout first; by then the node has
    // not read anything, so they would be a protocol error either way, but not a silent one.
    stdout.lock().flush()?;
    // try_clone_to_owned sets close-on-exec, so children the service starts do not hold the
    // frame pipe open after this process exits.
    let frames = stdout.as_fd().try_clone_to_owned()?;
    nix::unistd::dup2_stdout(io::stderr()).map_err(io::Error::from)?;
    run_with(
        service,
        io::stdin().lock(),
        BufWriter::new(std::fs::File::from(frames)),
    )
}

/// Serves the node over a Unix socket: binds and listens on `socket`, restricts the socket
/// file to its owner (mode 0600), accepts one connection within `accept_timeout`, closes the
/// listener, and serves frames on the connection until the node ends it.
///
/// Stdin, stdout and stderr are untouched: the node gives the application `/dev/null` for
/// stdin and captures stdout and stderr as logs. The socket file is left in place for the
/// node, which removes the executor's directory.
///
/// Fails with [`ShimError::Socket`] when the socket cannot be bound (say, a file is already
/// there) or accepted on, and with [`ShimError::NotConnected`] naming the path when nobody
/// connects in time.
pub fn run_unix<S: Service>(
    service: S,
    socket: &Path,
    accept_timeout: Duration,
) -> Result<(), ShimError> {
    let stream = accept_one(socket, accept_timeout)?;
    let at = |source| ShimError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    let reader = stream.try_clone().map_err(at)?;
    run_with(service, BufReader::new(reader), BufWriter::new(stream))
}

/// Binds `socket`, sets its mode, and accepts one connection within `timeout`.
fn accept_one(socket: &Path, timeout: Duration) -> Result<UnixStream, ShimError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;

    let at = |source| ShimError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    let deadline = Instant::now() + timeout;
    // std binds and listens in one call; the node retries the brief refusal before that.
    let listener = UnixListener::bind(socket).map_err(at)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(SOCKET_FILE_MODE))
        .map_err(at)?;
    listener.set_nonblocking(true).map_err(at)?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                // Accepted sockets do not inherit O_NONBLOCK on Linux; make sure anyway,
                // since the frame loop is blocking I/O.
                stream.set_nonblocking(false).map_err(at)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(at(e)),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ShimError::NotConnected {
                path: PathBuf::from(socket),
                timeout,
            });
        }
        // Rounded up to a whole millisecond, so the last wait does not spin at 0 ms.
        let left_ms = left.as_millis().saturating_add(1);
        let wait = PollTimeout::try_from(left_ms).unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, wait) {
            Ok(_) | Err(nix::Error::EINTR) => {}
            Err(e) => return Err(at(io::Error::from(e))),
        }
    }
}

/// Serves the node over any reader and writer; [`run_stdio`] calls this with stdin and
/// stdout, [`run_unix`] with the two directions of the accepted connection.
///
/// Frames are limited to [`SHIM_FRAME_BYTES_MAX`]. The writer is flushed after every frame.
pub fn run_with<S, R, W>(mut service: S, mut reader: R, mut writer: W) -> Result<(), ShimError>
where
    S: Service,
    R: BufRead,
    W: Write,
{
    let max = SHIM_FRAME_BYTES_MAX;
    let mut frame = Vec::new();
    let mut out = Vec::new();
    // Some(id) while bound to a session.
    let mut session: Option<u64> = None;

    send(&mut writer, &mut out, &AppFrame::Ready)?;
    while read_frame(&mut reader, &mut frame, max)? {
        let Some((&frame_type, body)) = frame.split_first() else {
            return Err(ShimFrameError::Empty.into());
        };
        let reply = match (NodeFrame::decode(frame_type, body, max)?, session) {
            (
                NodeFrame::SessionEnter {
                    session_id,
                    common_data,
                },
                None,
            ) => {
                let ctx = SessionContext {
                    session_id,
                    common_data: Bytes::copy_from_slice(common_data),
                };
                match service.enter_session(&ctx) {
                    Ok(()) => {
                        session = Some(session_id);
                        Reply::Ready
                    }
                    Err(message) => Reply::Error(message),
                }
            }
            (NodeFrame::TaskInvoke { task_id, input }, Some(session_id)) => {
                let ctx = TaskContext {
                    session_id,
                    task_id,
                };
                match service.invoke(&ctx, input) {
                    Ok(output) if Reply::succeeded_fits(&output, max) => {
                        Reply::Succeeded { task_id, output }
                    }
                    // An output the node would refuse fails the task, not the executor.
                    Ok(output) => Reply::Failed {
                        task_id,
                        message: format!(
                            "task output of {} bytes does not fit the shim frame limit of {max} bytes",
                            output.len()
                        ),
                    },
                    Err(message) => Reply::Failed { task_id, message },
                }
            }
            (NodeFrame::SessionLeave, Some(_)) => {
                // Unbound whatever the service says: after a failed leave the node stops
                // this executor anyway.
                session = None;
                match service.leave_session() {
                    Ok(()) => Reply::Ready,
                    Err(message) => Reply::Error(message),
                }
            }
            (unexpected, bound) => {
                return Err(ShimError::Unexpected {
                    expected: if bound.is_some() {
                        "TaskInvoke or SessionLeave"
                    } else {
                        "SessionEnter"
                    },
                    got: unexpected.name(),
                })
            }
        };
        send(&mut writer, &mut out, &reply.frame())?;
        if frame.capacity() > BUFFER_KEEP_BYTES_MAX {
            frame = Vec::new();
        }
    }
    Ok(())
}

/// An owned answer to one node frame; [`Reply::frame`] borrows it for encoding.
enum Reply {
    Ready,
    Error(String),
    Succeeded { task_id: u64, output: Vec<u8> },
    Failed { task_id: u64, message: String },
}

impl Reply {
    fn frame(&self) -> AppFrame<'_> {
        match self {
            Reply::Ready => AppFrame::Ready,
            Reply::Error(message) => AppFrame::Error {
                message: bounded_message(message).as_bytes(),
            },
            Reply::Succeeded { task_id, output } => AppFrame::TaskResult {
                task_id: *task_id,
                status: ResultStatus::Ok,
                payload: output,
            },
            Reply::Failed { task_id, message } => AppFrame::TaskResult {
                task_id: *task_id,
                status: ResultStatus::Error,
                payload: bounded_message(message).as_bytes(),
            },
        }
    }

    fn succeeded_fits(output: &[u8], max: usize) -> bool {
        let frame = AppFrame::TaskResult {
            task_id: 0,
            status: ResultStatus::Ok,
            payload: output,
        };
        frame.frame_len() <= max
    }
}

/// Reads one frame (type byte + body) into `frame`. `Ok(false)` is end of input at a frame
/// boundary; end of input anywhere else is [`ShimError::Truncated`].
fn read_frame<R: BufRead>(
    reader: &mut R,
    frame: &mut Vec<u8>,
    max: usize,
) -> Result<bool, ShimError> {
    let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
    let mut filled = 0;
    while filled < prefix.len() {
        match reader.read(&mut prefix[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(ShimError::Truncated),
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = parse_length(prefix, max)?;
    frame.clear();
    frame.resize(len, 0);
    match reader.read_exact(frame) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::UnexpectedEof => Err(ShimError::Truncated),
        Err(e) => Err(e.into()),
    }
}

/// Encodes, writes and flushes one frame: the node is waiting for it.
fn send<W: Write>(
    writer: &mut W,
    out: &mut Vec<u8>,
    frame: &AppFrame<'_>,
) -> Result<(), ShimError> {
    out.clear();
    frame.encode(out)?;
    writer.write_all(out)?;
    writer.flush()?;
    if out.capacity() > BUFFER_KEEP_BYTES_MAX {
        *out = Vec::new();
    }
    Ok(())
}

/// The longest prefix of `message` within [`ERROR_MESSAGE_BYTES_MAX`] bytes that ends at a
/// character boundary.
fn bounded_message(message: &str) -> &str {
    let mut end = message.len().min(ERROR_MESSAGE_BYTES_MAX);
    // Index 0 is always a boundary, so this stops.
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.get(..end).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers `"<session>/<task>:<input>"`, fails inputs starting with `!`, and fails enter
    /// when the common data is `"refuse"`.
    #[derive(Default)]
    struct Tagger {
        leaves: usize,
    }

    impl Service for Tagger {
        fn enter_session(&mut self, ctx: &SessionContext) -> Result<(), String> {
            if &ctx.common_data[..] == b"refuse" {
                return Err("refused".into());
            }
            Ok(())
        }

        fn invoke(&mut self, ctx: &TaskContext, input: &[u8]) -> Result<Vec<u8>, String> {
            if input.starts_with(b"!") {
                return Err("bang".into());
            }
            let mut out = format!("{}/{}:", ctx.session_id, ctx.task_id).into_bytes();
            out.extend_from_slice(input);
            Ok(out)
        }

        fn leave_session(&mut self) -> Result<(), String> {
            self.leaves += 1;
            Ok(())
        }
    }

    fn node_stream(frames: &[NodeFrame<'_>]) -> Vec<u8> {
        let mut buf = Vec::new();
        for f in frames {
            f.encode(&mut buf).unwrap();
        }
        buf
    }

    fn replies(mut out: &[u8]) -> Vec<AppFrame<'_>> {
        let mut frames = Vec::new();
        while let Some(raw) = flame_protocol::shim::split_frame(out, SHIM_FRAME_BYTES_MAX).unwrap()
        {
            frames.push(AppFrame::decode(raw.frame_type, raw.body, SHIM_FRAME_BYTES_MAX).unwrap());
            out = &out[raw.consumed..];
        }
        frames
    }

    #[test]
    fn a_whole_conversation() {
        let input = node_stream(&[
            NodeFrame::SessionEnter {
                session_id: 5,
                common_data: b"",
            },
            NodeFrame::TaskInvoke {
                task_id: 1,
                input: b"a",
            },
            NodeFrame::TaskInvoke {
                task_id: 2,
                input: b"!",
            },
            NodeFrame::SessionLeave,
            NodeFrame::SessionEnter {
                session_id: 6,
                common_data: b"refuse",
            },
        ]);
        let mut out = Vec::new();
        run_with(Tagger::default(), &input[..], &mut out).unwrap();
        assert_eq!(
            replies(&out),
            [
                AppFrame::Ready,
                AppFrame::Ready,
                AppFrame::TaskResult {
                    task_id: 1,
                    status: ResultStatus::Ok,
                    payload: b"5/1:a"
                },
                AppFrame::TaskResult {
                    task_id: 2,
                    status: ResultStatus::Error,
                    payload: b"bang"
                },
                AppFrame::Ready,
                AppFrame::Error {
                    message: b"refused"
                },
            ]
        );
    }

    #[test]
    fn frames_out_of_order_are_protocol_errors() {
        let invoke_first = node_stream(&[NodeFrame::TaskInvoke {
            task_id: 1,
            input: b"",
        }]);
        assert!(matches!(
            run_with(Tagger::default(), &invoke_first[..], Vec::new()),
            Err(ShimError::Unexpected {
                expected: "SessionEnter",
                got: "TaskInvoke"
            })
        ));
        let enter_twice = node_stream(&[
            NodeFrame::SessionEnter {
                session_id: 1,
                common_data: b"",
            },
            NodeFrame::SessionEnter {
                session_id: 2,
                common_data: b"",
            },
        ]);
        assert!(matches!(
            run_with(Tagger::default(), &enter_twice[..], Vec::new()),
            Err(ShimError::Unexpected {
                got: "SessionEnter",
                ..
            })
        ));
    }

    #[test]
    fn end_of_input_mid_frame_is_truncated() {
        let stream = node_stream(&[NodeFrame::SessionLeave]);
        for cut in 1..stream.len() {
            assert!(matches!(
                run_with(Tagger::default(), &stream[..cut], Vec::new()),
                Err(ShimError::Truncated)
            ));
        }
        let mut out = Vec::new();
        run_with(Tagger::default(), &[][..], &mut out).unwrap();
        assert_eq!(replies(&out), [AppFrame::Ready]);
    }

    #[test]
    fn garbage_from_the_node_is_a_typed_error() {
        assert!(matches!(
            run_with(Tagger::default(), &b"\x01\x00\x00\x00\x7f"[..], Vec::new()),
            Err(ShimError::Frame(ShimFrameError::UnknownType(0x7f)))
        ));
        assert!(matches!(
            run_with(Tagger::default(), &b"GET / HTTP/1.1\r\n"[..], Vec::new()),
            Err(ShimError::Frame(ShimFrameError::TooLarge { .. }))
        ));
    }

    #[test]
    fn long_messages_are_cut_at_a_char_boundary() {
        let message = "é".repeat(ERROR_MESSAGE_BYTES_MAX);
        let cut = bounded_message(&message);
        assert!(cut.len() <= ERROR_MESSAGE_BYTES_MAX);
        assert!(cut.len() > ERROR_MESSAGE_BYTES_MAX - 2);
        assert_eq!(bounded_message("short"), "short");
    }
}
