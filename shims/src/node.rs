//! The node's side of the stdio shim: drives one application process over its stdout (read)
//! and stdin (write).
//!
//! A [`NodeShim`] is a thin async shell around the pure codec in [`flame_protocol::shim`]. It
//! keeps its own read buffer and parses whole frames out of it, and it keeps the encoded
//! frames it has not written yet; [`NodeShim::next_message`] writes those and reads at the
//! same time, so neither side can block the other however large the frames are.
//!
//! # Pipelining
//!
//! The protocol lets the node send further `TaskInvoke` frames before earlier results have
//! come back; the application answers them in the order they came (see
//! `docs/shim-protocol.md`, "Sequence"). [`NodeShim::queue_invoke`] adds one to the frames
//! waiting to be written and returns at once; [`NodeShim::next_message`] returns the
//! application's frames one by one. A window of tasks in flight turns a write, a read and two
//! context switches per task on each side into a few per window. The request-and-answer
//! calls ([`NodeShim::enter`], [`NodeShim::invoke`], [`NodeShim::leave`]) are the same
//! primitives with a window of one.
//!
//! # Cancellation and timeouts
//!
//! [`NodeShim::next_message`] is cancel-safe: bytes read stay in the read buffer and bytes
//! not yet written stay queued, so it can sit in a `tokio::select!` next to other events
//! and be called again. No method here has a timeout: how long an application may take to
//! start, to enter a session or to run a task is the node's policy, not the protocol's.
//! A request-and-answer call cancelled half-way leaves its answer unread, so the shim marks
//! itself out of step until that call completes, and later calls return
//! [`ShimError::Broken`]; the only thing left to do then is [`NodeShim::shutdown`] and stop
//! the process.

use crate::ShimError;
use bytes::{Bytes, BytesMut};
use flame_protocol::shim::{split_frame, AppFrame, NodeFrame, ResultStatus, ShimFrameError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Capacity kept in the read and write buffers between frames. One large frame may grow a
/// buffer up to the frame limit; past this size it is released once empty, so an idle
/// executor does not pin tens of MiB.
const BUFFER_KEEP_BYTES_MAX: usize = 1024 * 1024;

/// Bytes asked of each read: a window of small results arrives in one read.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// How long an application whose input closed may still write results before it counts
/// as gone, when it does not end its output itself.
const WRITE_CLOSED_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Outputs at least this large share the read buffer's memory; smaller ones are copied.
const SHARE_PAYLOAD_BYTES_MIN: usize = 16 * 1024;

/// The outcome of one task, as the application reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// The task succeeded with this output.
    Succeeded(Bytes),
    /// The task failed with this message (invalid UTF-8 is replaced, not refused).
    Failed(String),
}

/// One frame from the application, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppMessage {
    /// `Ready`: at start-up, or after a session enter or leave.
    Ready,
    /// `TaskResult`: the outcome of the task with this id.
    Result {
        /// The task it answers.
        task_id: u64,
        /// Its outcome.
        invocation: Invocation,
    },
    /// `Error`: a session enter or leave failed, with the application's reason.
    Error(String),
}

impl AppMessage {
    fn name(&self) -> &'static str {
        match self {
            AppMessage::Ready => "Ready",
            AppMessage::Result { .. } => "TaskResult",
            AppMessage::Error(_) => "Error",
        }
    }
}

/// The node's end of one application's shim stream.
///
/// Calls must follow the protocol's order: [`wait_ready`](Self::wait_ready) once, then for
/// each session [`enter`](Self::enter), any number of tasks ([`invoke`](Self::invoke), or
/// [`queue_invoke`](Self::queue_invoke) and [`next_message`](Self::next_message) for a
/// window of them), [`leave`](Self::leave) once every result is in; finally
/// [`shutdown`](Self::shutdown). After any error the stream cannot be trusted: stop the
/// executor.
///
/// The writer is written to directly (pipes and sockets do not buffer); a writer that
/// buffers is flushed only by [`shutdown`](Self::shutdown).
#[derive(Debug)]
pub struct NodeShim<R, W> {
    /// The application's stdout.
    reader: R,
    /// The application's stdin.
    writer: W,
    /// Bound on type byte + body, in both directions.
    frame_bytes_max: usize,
    /// Bytes read and not yet parsed into frames.
    inbuf: BytesMut,
    /// Encoded frames not yet written; `written` bytes of it are.
    out: Vec<u8>,
    written: usize,
    /// The application's input is closed (a write failed with a broken pipe): nothing more
    /// is written, and its output is read to the end.
    write_closed: bool,
    /// Set while a request-and-answer call is in progress and left set if it fails or is
    /// cancelled; set for good by a broken stream.
    broken: bool,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> NodeShim<R, W> {
    /// Wraps an application's stdout and stdin. Frames (type byte + body) over
    /// `frame_bytes_max` are refused in both directions;
    /// [`SHIM_FRAME_BYTES_MAX`](flame_protocol::shim::SHIM_FRAME_BYTES_MAX) is the
    /// default every implementation accepts.
    pub fn new(app_stdout: R, app_stdin: W, frame_bytes_max: usize) -> Self {
        NodeShim {
            reader: app_stdout,
            writer: app_stdin,
            frame_bytes_max,
            inbuf: BytesMut::new(),
            out: Vec::new(),
            written: 0,
            write_closed: false,
            broken: false,
        }
    }

    /// The frame limit in force.
    pub fn frame_bytes_max(&self) -> usize {
        self.frame_bytes_max
    }

    /// Waits for the application's start-up `Ready`.
    pub async fn wait_ready(&mut self) -> Result<(), ShimError> {
        self.begin()?;
        self.recv_ready("Ready").await?;
        self.broken = false;
        Ok(())
    }

    /// Binds the application to a session: sends `SessionEnter` and waits for `Ready`.
    ///
    /// An `Error` frame in reply becomes [`ShimError::App`].
    pub async fn enter(&mut self, session_id: u64, common_data: &[u8]) -> Result<(), ShimError> {
        let frame = NodeFrame::SessionEnter {
            session_id,
            common_data,
        };
        self.check_size(&frame)?;
        self.begin()?;
        self.queue(&frame)?;
        self.recv_ready("Ready or Error after SessionEnter").await?;
        self.broken = false;
        Ok(())
    }

    /// Runs one task: sends `TaskInvoke` and waits for its `TaskResult`.
    ///
    /// A result for another task id is [`ShimError::TaskIdMismatch`]. The protocol allows
    /// `Error` only after enter and leave, but one received here still becomes
    /// [`ShimError::App`], because its message is the best account of what went wrong.
    ///
    /// An input too large for the frame limit fails with [`ShimError::Frame`] before anything
    /// is sent, and leaves the shim usable.
    pub async fn invoke(&mut self, task_id: u64, input: &[u8]) -> Result<Invocation, ShimError> {
        let frame = NodeFrame::TaskInvoke { task_id, input };
        self.check_size(&frame)?;
        self.begin()?;
        self.queue(&frame)?;
        let message = self.next_message().await?;
        let invocation = self.expect_result(task_id, message)?;
        self.broken = false;
        Ok(invocation)
    }

    /// Queues a `TaskInvoke` to be written by the next calls of
    /// [`next_message`](Self::next_message), without waiting for anything. Its
    /// `TaskResult` comes after those of the tasks queued before it.
    ///
    /// An input too large for the frame limit fails with [`ShimError::Frame`] and queues
    /// nothing, leaving the shim usable.
    pub fn queue_invoke(&mut self, task_id: u64, input: &[u8]) -> Result<(), ShimError> {
        let frame = NodeFrame::TaskInvoke { task_id, input };
        self.check_size(&frame)?;
        if self.broken {
            return Err(ShimError::Broken);
        }
        self.queue(&frame)
    }

    /// Checks that `message` is the result of `task_id`, the task whose result is due, and
    /// returns it. Anything else breaks the shim: the stream is out of step.
    pub fn expect_result(
        &mut self,
        task_id: u64,
        message: AppMessage,
    ) -> Result<Invocation, ShimError> {
        let error = match message {
            AppMessage::Result {
                task_id: got,
                invocation,
            } => {
                if got == task_id {
                    return Ok(invocation);
                }
                ShimError::TaskIdMismatch {
                    expected: task_id,
                    got,
                }
            }
            AppMessage::Error(message) => ShimError::App(message),
            other @ AppMessage::Ready => ShimError::Unexpected {
                expected: "TaskResult",
                got: other.name(),
            },
        };
        self.broken = true;
        Err(error)
    }

    /// Writes what is queued and returns the application's next frame. Cancel-safe; see
    /// the module's documentation.
    ///
    /// End of the application's stream (at a frame boundary or not) is
    /// [`ShimError::Exited`]. A closed pipe on write is not an error by itself: the results
    /// the application wrote before it stopped reading are returned first, then
    /// [`ShimError::Exited`] at the end of its output (or after [`WRITE_CLOSED_GRACE`] of
    /// silence).
    pub async fn next_message(&mut self) -> Result<AppMessage, ShimError> {
        loop {
            if let Some(message) = self.parse()? {
                return Ok(message);
            }
            if self.inbuf.capacity() - self.inbuf.len() < READ_CHUNK_BYTES {
                self.inbuf.reserve(READ_CHUNK_BYTES);
            }
            let pending = &self.out[self.written..];
            let write_closed = self.write_closed;
            // Built only when its input closed: select! evaluates every branch's future,
            // and a timer needs a runtime with time enabled.
            let grace = async move {
                if write_closed {
                    tokio::time::sleep(WRITE_CLOSED_GRACE).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            // Writing first: what is queued goes out before anything else is waited for.
            let step = tokio::select! {
                biased;
                wrote = self.writer.write(pending), if !pending.is_empty() && !self.write_closed => {
                    Step::Wrote(wrote)
                }
                read = self.reader.read_buf(&mut self.inbuf) => Step::Read(read),
                () = grace, if write_closed => Step::Read(Ok(0)),
            };
            match step {
                Step::Read(Ok(0)) if self.inbuf.is_empty() => {
                    return Err(self.fail(ShimError::Exited))
                }
                Step::Read(Ok(0)) => {
                    let have = self.inbuf.len();
                    return Err(self.fail(ShimError::ExitedMidFrame { have }));
                }
                Step::Read(Ok(_)) => {}
                Step::Read(Err(e)) => return Err(self.fail(ShimError::Io(e))),
                Step::Wrote(Ok(n)) if n > 0 => self.wrote(n),
                // The application stopped reading (it exited, or closed its input): what
                // is queued can never be delivered, but the results it wrote before are
                // still in its output. They are read and returned first; its end of
                // output then says it has gone.
                Step::Wrote(Ok(_)) => self.close_writes(),
                Step::Wrote(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    self.close_writes()
                }
                Step::Wrote(Err(e)) => return Err(self.fail(ShimError::Io(e))),
            }
        }
    }

    /// Unbinds the application from its session: sends `SessionLeave` and waits for `Ready`.
    ///
    /// An `Error` frame in reply becomes [`ShimError::App`].
    pub async fn leave(&mut self) -> Result<(), ShimError> {
        self.begin()?;
        self.queue(&NodeFrame::SessionLeave)?;
        self.recv_ready("Ready or Error after SessionLeave").await?;
        self.broken = false;
        Ok(())
    }

    /// Closes the application's stdin, which tells it to exit (with status 0).
    ///
    /// Waiting for the process to exit, and killing it if it does not, is the caller's job.
    /// Nothing is reported because nothing can usefully be done about a failure here: the
    /// pipe is closed when the writer is dropped at the end of this call either way.
    pub async fn shutdown(mut self) {
        // Frames still queued were never answered and are moot; flush and shut the writer
        // down so that wrappers that buffer or signal EOF explicitly (e.g. a duplex stream)
        // see it; the errors are moot because the drop below closes the pipe regardless.
        let _ = self.writer.flush().await;
        let _ = self.writer.shutdown().await;
    }

    /// Refuses frames over the limit before anything is sent, so that an oversized input is
    /// an error for that call alone and the stream stays in step.
    fn check_size(&self, frame: &NodeFrame<'_>) -> Result<(), ShimError> {
        let len = frame.frame_len();
        if len > self.frame_bytes_max {
            return Err(ShimFrameError::TooLarge {
                len,
                max: self.frame_bytes_max,
            }
            .into());
        }
        Ok(())
    }

    fn begin(&mut self) -> Result<(), ShimError> {
        if self.broken {
            return Err(ShimError::Broken);
        }
        self.broken = true;
        Ok(())
    }

    /// A broken stream stays broken.
    fn fail(&mut self, error: ShimError) -> ShimError {
        self.broken = true;
        error
    }

    fn queue(&mut self, frame: &NodeFrame<'_>) -> Result<(), ShimError> {
        frame.encode(&mut self.out)?;
        Ok(())
    }

    /// Drops what is queued and writes nothing more; reading goes on.
    fn close_writes(&mut self) {
        self.write_closed = true;
        self.out = Vec::new();
        self.written = 0;
    }

    fn wrote(&mut self, n: usize) {
        self.written += n;
        if self.written >= self.out.len() {
            self.out.clear();
            self.written = 0;
            if self.out.capacity() > BUFFER_KEEP_BYTES_MAX {
                self.out = Vec::new();
            }
        }
    }

    /// The first whole frame in the read buffer, taken out of it. The payload of a result
    /// shares the read buffer's memory instead of being copied.
    fn parse(&mut self) -> Result<Option<AppMessage>, ShimError> {
        let (frame_type, body_at, consumed) = match split_frame(&self.inbuf, self.frame_bytes_max) {
            Ok(Some(raw)) => (raw.frame_type, raw.consumed - raw.body.len(), raw.consumed),
            Ok(None) => return Ok(None),
            Err(ShimFrameError::TooLarge { len, max }) => {
                let shown = shown_bytes(&self.inbuf[..self.inbuf.len().min(SHOWN_BYTES_MAX)]);
                return Err(self.fail(ShimError::NotFrames { shown, len, max }));
            }
            Err(e) => return Err(self.fail(e.into())),
        };
        let frame = self.inbuf.split_to(consumed).freeze();
        if self.inbuf.is_empty() && self.inbuf.capacity() > BUFFER_KEEP_BYTES_MAX {
            self.inbuf = BytesMut::new();
        }
        let body = frame.slice(body_at..);
        let message = match AppFrame::decode(frame_type, &body, self.frame_bytes_max) {
            Ok(AppFrame::Ready) => AppMessage::Ready,
            Ok(AppFrame::Error { message }) => {
                AppMessage::Error(String::from_utf8_lossy(message).into_owned())
            }
            Ok(AppFrame::TaskResult {
                task_id,
                status,
                payload,
            }) => AppMessage::Result {
                task_id,
                invocation: match status {
                    // A large output shares the read buffer; a small one is copied, so it
                    // does not keep a whole read chunk alive while it waits to be sent.
                    ResultStatus::Ok if payload.len() >= SHARE_PAYLOAD_BYTES_MIN => {
                        Invocation::Succeeded(body.slice_ref(payload))
                    }
                    ResultStatus::Ok => Invocation::Succeeded(Bytes::copy_from_slice(payload)),
                    ResultStatus::Error => {
                        Invocation::Failed(String::from_utf8_lossy(payload).into_owned())
                    }
                },
            },
            Err(e) => return Err(self.fail(e.into())),
        };
        Ok(Some(message))
    }

    /// Reads the next frame, which must be `Ready` or an `Error` carrying the app's reason.
    async fn recv_ready(&mut self, expected: &'static str) -> Result<(), ShimError> {
        match self.next_message().await? {
            AppMessage::Ready => Ok(()),
            AppMessage::Error(message) => Err(ShimError::App(message)),
            other @ AppMessage::Result { .. } => Err(ShimError::Unexpected {
                expected,
                got: other.name(),
            }),
        }
    }
}

/// How many of a stream's first bytes a [`ShimError::NotFrames`] shows.
const SHOWN_BYTES_MAX: usize = 16;

/// `bytes` quoted for a message: printable ASCII as is, anything else escaped, so that an
/// application's stray `print("Hello")` reads as `"Hello"`.
fn shown_bytes(bytes: &[u8]) -> String {
    let mut out = String::from("\"");
    out.extend(
        bytes
            .iter()
            .flat_map(|b| std::ascii::escape_default(*b).map(char::from)),
    );
    out.push('"');
    out
}

/// What one turn of [`NodeShim::next_message`] did.
enum Step {
    Wrote(std::io::Result<usize>),
    Read(std::io::Result<usize>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use flame_protocol::shim::SHIM_FRAME_BYTES_MAX;

    fn frames(app: &[AppFrame<'_>]) -> Vec<u8> {
        let mut buf = Vec::new();
        for f in app {
            f.encode(&mut buf).unwrap();
        }
        buf
    }

    #[tokio::test]
    async fn enter_error_is_the_apps_message() {
        let stdout = frames(&[
            AppFrame::Ready,
            AppFrame::Error {
                message: b"no model",
            },
        ]);
        let mut shim = NodeShim::new(&stdout[..], Vec::new(), SHIM_FRAME_BYTES_MAX);
        shim.wait_ready().await.unwrap();
        match shim.enter(1, b"").await {
            Err(ShimError::App(m)) => assert_eq!(m, "no model"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(shim.leave().await, Err(ShimError::Broken)));
    }

    #[tokio::test]
    async fn mismatched_task_id_is_a_protocol_error() {
        let stdout = frames(&[AppFrame::TaskResult {
            task_id: 9,
            status: ResultStatus::Ok,
            payload: b"",
        }]);
        let mut shim = NodeShim::new(&stdout[..], Vec::new(), SHIM_FRAME_BYTES_MAX);
        assert!(matches!(
            shim.invoke(8, b"x").await,
            Err(ShimError::TaskIdMismatch {
                expected: 8,
                got: 9
            })
        ));
    }

    #[tokio::test]
    async fn failed_results_and_lossy_messages() {
        let stdout = frames(&[AppFrame::TaskResult {
            task_id: 1,
            status: ResultStatus::Error,
            payload: b"bad \xff input",
        }]);
        let mut shim = NodeShim::new(&stdout[..], Vec::new(), SHIM_FRAME_BYTES_MAX);
        assert_eq!(
            shim.invoke(1, b"").await.unwrap(),
            Invocation::Failed("bad \u{fffd} input".into())
        );
    }

    #[tokio::test]
    async fn oversized_input_is_refused_before_sending_and_keeps_the_shim() {
        let stdout = frames(&[AppFrame::Ready]);
        let mut stdin = Vec::new();
        let mut shim = NodeShim::new(&stdout[..], &mut stdin, 32);
        assert!(matches!(
            shim.invoke(1, &[0; 32]).await,
            Err(ShimError::Frame(ShimFrameError::TooLarge {
                len: 45,
                max: 32
            }))
        ));
        shim.wait_ready().await.unwrap();
        shim.shutdown().await;
        assert!(stdin.is_empty());
    }

    #[tokio::test]
    async fn frames_are_written_as_documented() {
        let stdout = frames(&[AppFrame::Ready]);
        let mut stdin = Vec::new();
        let mut shim = NodeShim::new(&stdout[..], &mut stdin, SHIM_FRAME_BYTES_MAX);
        shim.leave().await.unwrap();
        shim.shutdown().await;
        assert_eq!(stdin, [1, 0, 0, 0, 0x03]);
    }

    #[tokio::test]
    async fn a_window_of_invokes_is_answered_in_order() {
        let stdout = frames(&[
            AppFrame::TaskResult {
                task_id: 1,
                status: ResultStatus::Ok,
                payload: b"one",
            },
            AppFrame::TaskResult {
                task_id: 2,
                status: ResultStatus::Error,
                payload: b"two",
            },
            AppFrame::TaskResult {
                task_id: 3,
                status: ResultStatus::Ok,
                payload: b"",
            },
        ]);
        let mut stdin = Vec::new();
        let mut shim = NodeShim::new(&stdout[..], &mut stdin, SHIM_FRAME_BYTES_MAX);
        for task in 1..=3 {
            shim.queue_invoke(task, b"in").unwrap();
        }
        let mut got = Vec::new();
        for task in 1..=3 {
            let message = shim.next_message().await.unwrap();
            got.push(shim.expect_result(task, message).unwrap());
        }
        assert_eq!(
            got,
            [
                Invocation::Succeeded(Bytes::from_static(b"one")),
                Invocation::Failed("two".into()),
                Invocation::Succeeded(Bytes::new()),
            ]
        );
        shim.shutdown().await;
        let mut expected = Vec::new();
        for task in 1..=3 {
            NodeFrame::TaskInvoke {
                task_id: task,
                input: b"in",
            }
            .encode(&mut expected)
            .unwrap();
        }
        assert_eq!(stdin, expected);
    }

    #[tokio::test]
    async fn a_result_out_of_order_breaks_the_shim() {
        let stdout = frames(&[AppFrame::TaskResult {
            task_id: 2,
            status: ResultStatus::Ok,
            payload: b"",
        }]);
        let mut shim = NodeShim::new(&stdout[..], Vec::new(), SHIM_FRAME_BYTES_MAX);
        shim.queue_invoke(1, b"").unwrap();
        shim.queue_invoke(2, b"").unwrap();
        let message = shim.next_message().await.unwrap();
        assert!(matches!(
            shim.expect_result(1, message),
            Err(ShimError::TaskIdMismatch {
                expected: 1,
                got: 2
            })
        ));
        assert!(matches!(shim.queue_invoke(3, b""), Err(ShimError::Broken)));
    }

    /// A slow reader on both sides: the node must keep reading results while its window of
    /// large inputs is still being written, or both pipes fill and neither side moves.
    #[tokio::test]
    async fn large_frames_both_ways_do_not_deadlock() {
        let (node_end, app_end) = tokio::io::duplex(4096);
        let (app_read, mut app_write) = tokio::io::split(app_end);
        let (node_read, node_write) = tokio::io::split(node_end);
        let tasks = 8u64;
        let size = 256 * 1024;
        let app = tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(app_read);
            let mut out = Vec::new();
            for _ in 0..tasks {
                let mut prefix = [0u8; 4];
                reader.read_exact(&mut prefix).await.unwrap();
                let mut frame = vec![0u8; u32::from_le_bytes(prefix) as usize];
                reader.read_exact(&mut frame).await.unwrap();
                let NodeFrame::TaskInvoke { task_id, input } =
                    NodeFrame::decode(frame[0], &frame[1..], SHIM_FRAME_BYTES_MAX).unwrap()
                else {
                    panic!("not an invoke");
                };
                out.clear();
                AppFrame::TaskResult {
                    task_id,
                    status: ResultStatus::Ok,
                    payload: input,
                }
                .encode(&mut out)
                .unwrap();
                app_write.write_all(&out).await.unwrap();
            }
        });
        let mut shim = NodeShim::new(node_read, node_write, SHIM_FRAME_BYTES_MAX);
        let input = vec![7u8; size];
        for task in 1..=tasks {
            shim.queue_invoke(task, &input).unwrap();
        }
        for task in 1..=tasks {
            let message = shim.next_message().await.unwrap();
            match shim.expect_result(task, message).unwrap() {
                Invocation::Succeeded(out) => assert_eq!(out.len(), size),
                other => panic!("unexpected {other:?}"),
            }
        }
        app.await.unwrap();
    }

    /// The application answers the first task and exits while the node is still writing the
    /// rest of its window: the answer it gave is returned, then Exited, never a lost result
    /// blamed on the wrong task.
    #[tokio::test]
    async fn results_written_before_the_app_stopped_reading_are_kept() {
        let (node_end, app_end) = tokio::io::duplex(4096);
        let (app_read, mut app_write) = tokio::io::split(app_end);
        let (node_read, node_write) = tokio::io::split(node_end);
        let app = tokio::spawn(async move {
            let mut reader = tokio::io::BufReader::new(app_read);
            let mut prefix = [0u8; 4];
            reader.read_exact(&mut prefix).await.unwrap();
            let mut frame = vec![0u8; u32::from_le_bytes(prefix) as usize];
            reader.read_exact(&mut frame).await.unwrap();
            let mut out = Vec::new();
            AppFrame::TaskResult {
                task_id: 1,
                status: ResultStatus::Ok,
                payload: b"done",
            }
            .encode(&mut out)
            .unwrap();
            app_write.write_all(&out).await.unwrap();
            // Exits: both directions close.
        });
        let mut shim = NodeShim::new(node_read, node_write, SHIM_FRAME_BYTES_MAX);
        let input = vec![1u8; 256 * 1024];
        for task in 1..=3 {
            shim.queue_invoke(task, &input).unwrap();
        }
        let message = shim.next_message().await.unwrap();
        assert_eq!(
            shim.expect_result(1, message).unwrap(),
            Invocation::Succeeded(Bytes::from_static(b"done"))
        );
        assert!(matches!(shim.next_message().await, Err(ShimError::Exited)));
        app.await.unwrap();
    }

    #[tokio::test]
    async fn a_stray_print_and_an_exit_mid_frame_are_named() {
        let mut shim = NodeShim::new(&b"Hello, world\n"[..], Vec::new(), SHIM_FRAME_BYTES_MAX);
        let err = shim.wait_ready().await.unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, ShimError::NotFrames { .. }), "{text}");
        assert!(text.contains("\"Hello, world\\n\""), "{text}");
        assert!(text.contains("stderr"), "{text}");
    }

    #[tokio::test]
    async fn eof_anywhere_is_exited() {
        let full = frames(&[AppFrame::Ready]);
        for cut in 0..full.len() {
            let mut shim = NodeShim::new(&full[..cut], Vec::new(), SHIM_FRAME_BYTES_MAX);
            match shim.wait_ready().await {
                Err(ShimError::Exited) => assert_eq!(cut, 0),
                Err(ShimError::ExitedMidFrame { have }) => assert_eq!(have, cut),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }
}
