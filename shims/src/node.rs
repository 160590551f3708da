//! The node's side of the stdio shim: drives one application process over its stdout (read)
//! and stdin (write).
//!
//! A [`NodeShim`] is a thin async shell around the pure codec in [`flame_protocol::shim`]: it
//! reads one whole frame at a time through a buffered reader, and writes each frame with one
//! `write_all` and one `flush`.
//!
//! # Timeouts
//!
//! No method here has a timeout: how long an application may take to start, to enter a
//! session or to run a task is the node's policy, not the protocol's. Wrap each call in
//! `tokio::time::timeout`. A call cancelled that way may leave a frame half read or half
//! written, so the shim marks itself out of step and every later call returns
//! [`ShimError::Broken`]; the only thing left to do is [`NodeShim::shutdown`] and stop the
//! process.

use crate::ShimError;
use bytes::Bytes;
use flame_protocol::shim::{
    parse_length, AppFrame, NodeFrame, ResultStatus, ShimFrameError, LENGTH_PREFIX_BYTES,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

/// Capacity kept in the read and write buffers between frames. One large frame may grow a
/// buffer up to the frame limit; past this size it is released afterwards, so an idle
/// executor does not pin tens of MiB.
const BUFFER_KEEP_BYTES_MAX: usize = 1024 * 1024;

/// The outcome of one task, as the application reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invocation {
    /// The task succeeded with this output.
    Succeeded(Bytes),
    /// The task failed with this message (invalid UTF-8 is replaced, not refused).
    Failed(String),
}

/// The node's end of one application's stdio shim.
///
/// Calls must follow the protocol's order: [`wait_ready`](Self::wait_ready) once, then for
/// each session [`enter`](Self::enter), any number of [`invoke`](Self::invoke),
/// [`leave`](Self::leave); finally [`shutdown`](Self::shutdown). After any error the stream
/// cannot be trusted: stop the executor.
#[derive(Debug)]
pub struct NodeShim<R, W> {
    /// The application's stdout.
    reader: BufReader<R>,
    /// The application's stdin.
    writer: W,
    /// Bound on type byte + body, in both directions.
    frame_bytes_max: usize,
    /// Reused encode buffer.
    out: Vec<u8>,
    /// Reused read buffer: type byte + body of the last frame.
    frame: Vec<u8>,
    /// Set while a call is in progress and left set if it fails or is cancelled.
    broken: bool,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> NodeShim<R, W> {
    /// Wraps an application's stdout and stdin. Frames (type byte + body) over
    /// `frame_bytes_max` are refused in both directions;
    /// [`SHIM_FRAME_BYTES_MAX`](flame_protocol::shim::SHIM_FRAME_BYTES_MAX) is the
    /// default every implementation accepts.
    pub fn new(app_stdout: R, app_stdin: W, frame_bytes_max: usize) -> Self {
        NodeShim {
            reader: BufReader::new(app_stdout),
            writer: app_stdin,
            frame_bytes_max,
            out: Vec::new(),
            frame: Vec::new(),
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
        self.send(&frame).await?;
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
        self.send(&frame).await?;
        let invocation = match self.recv().await? {
            AppFrame::TaskResult {
                task_id: got,
                status,
                payload,
            } => {
                if got != task_id {
                    return Err(ShimError::TaskIdMismatch {
                        expected: task_id,
                        got,
                    });
                }
                match status {
                    ResultStatus::Ok => Invocation::Succeeded(Bytes::copy_from_slice(payload)),
                    ResultStatus::Error => {
                        Invocation::Failed(String::from_utf8_lossy(payload).into_owned())
                    }
                }
            }
            AppFrame::Error { message } => {
                return Err(ShimError::App(
                    String::from_utf8_lossy(message).into_owned(),
                ))
            }
            other @ AppFrame::Ready => {
                return Err(ShimError::Unexpected {
                    expected: "TaskResult",
                    got: other.name(),
                })
            }
        };
        self.release_buffers();
        self.broken = false;
        Ok(invocation)
    }

    /// Unbinds the application from its session: sends `SessionLeave` and waits for `Ready`.
    ///
    /// An `Error` frame in reply becomes [`ShimError::App`].
    pub async fn leave(&mut self) -> Result<(), ShimError> {
        self.begin()?;
        self.send(&NodeFrame::SessionLeave).await?;
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
        // Flush anything a cancelled call left behind and shut the writer down so that
        // wrappers that buffer or signal EOF explicitly (e.g. a duplex stream) see it; the
        // errors are moot because the drop below closes the pipe regardless.
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

    async fn send(&mut self, frame: &NodeFrame<'_>) -> Result<(), ShimError> {
        self.out.clear();
        frame.encode(&mut self.out)?;
        self.writer
            .write_all(&self.out)
            .await
            .map_err(write_error)?;
        self.writer.flush().await.map_err(write_error)?;
        if self.out.capacity() > BUFFER_KEEP_BYTES_MAX {
            self.out = Vec::new();
        }
        Ok(())
    }

    /// Reads the next frame; it borrows the read buffer until the next read.
    async fn recv(&mut self) -> Result<AppFrame<'_>, ShimError> {
        let mut prefix = [0u8; LENGTH_PREFIX_BYTES];
        read_exact(&mut self.reader, &mut prefix).await?;
        let len = parse_length(prefix, self.frame_bytes_max)?;
        self.frame.clear();
        self.frame.resize(len, 0);
        read_exact(&mut self.reader, &mut self.frame).await?;
        let Some((&frame_type, body)) = self.frame.split_first() else {
            return Err(ShimFrameError::Empty.into());
        };
        Ok(AppFrame::decode(frame_type, body, self.frame_bytes_max)?)
    }

    /// Reads the next frame, which must be `Ready` or an `Error` carrying the app's reason.
    async fn recv_ready(&mut self, expected: &'static str) -> Result<(), ShimError> {
        let result = match self.recv().await? {
            AppFrame::Ready => Ok(()),
            AppFrame::Error { message } => Err(ShimError::App(
                String::from_utf8_lossy(message).into_owned(),
            )),
            other @ AppFrame::TaskResult { .. } => Err(ShimError::Unexpected {
                expected,
                got: other.name(),
            }),
        };
        self.release_buffers();
        result
    }

    fn release_buffers(&mut self) {
        if self.frame.capacity() > BUFFER_KEEP_BYTES_MAX {
            self.frame = Vec::new();
        }
    }
}

/// `read_exact` where running out of input means the application is gone.
async fn read_exact<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    buf: &mut [u8],
) -> Result<(), ShimError> {
    match reader.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ShimError::Exited),
        Err(e) => Err(ShimError::Io(e)),
    }
}

/// A closed pipe on write means the application is gone, the same as EOF on read.
fn write_error(e: std::io::Error) -> ShimError {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        ShimError::Exited
    } else {
        ShimError::Io(e)
    }
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
    async fn eof_anywhere_is_exited() {
        let full = frames(&[AppFrame::Ready]);
        for cut in 0..full.len() {
            let mut shim = NodeShim::new(&full[..cut], Vec::new(), SHIM_FRAME_BYTES_MAX);
            assert!(matches!(shim.wait_ready().await, Err(ShimError::Exited)));
        }
    }
}
