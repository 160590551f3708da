//! The node's side of `flame logs`: the head opens a stream on the node's connection, sends
//! one [`NodeStreamRequest::Logs`] (an `Exec` goes to [`crate::exec_server`]), and this answers with the executors' logs as [`LogEvent`]
//! frames, then [`LogEvent::End`], and finishes the stream.
//!
//! * Only what each executor wrote while bound to the request's session is sent
//!   ([`crate::logs::SessionReader`]): never its output for another session, between
//!   sessions, or while launching.
//! * Without `follow`, the executors' logs go one after the other, in the order asked,
//!   each from its oldest retained byte of the session to its end now.
//! * With `follow`, they are read at once, each until the executor leaves the session (or
//!   its log closes); chunks of different executors interleave, each executor's in
//!   order.
//! * An executor with no log on this node (it never ran here, or its log was removed) is
//!   one [`LogEvent::Unavailable`] naming it, and the others go on; so is a log that fails
//!   to read midway.
//!
//! The head stops a stream by dropping its end (`STOP_SENDING`), or by losing the
//! connection: the readers are dropped then, which leaves the logs as they were. How many
//! streams are served at once is bounded by the connection's stream limit
//! ([`limits::STREAMS_PER_CONNECTION_MAX`]).

use crate::executor::Settings;
use crate::logs::LogError;
use flame_protocol::frame::{FrameError, FrameReader, FrameWriter};
use flame_protocol::limits;
use flame_protocol::messages::{LogEvent, NodeStreamRequest};
use flame_protocol::{ExecutorId, SessionId};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Bytes of log per [`LogEvent::Chunk`]: large enough for throughput, small enough that
/// one executor's burst does not hold up the others' for long.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Largest request frame accepted: some 100,000 executor ids.
pub const REQUEST_FRAME_BYTES_MAX: usize = 1024 * 1024;
/// How long the head has to send its request once it opened the stream.
pub const REQUEST_WAIT: Duration = limits::CONNECT_TIMEOUT;
use limits::NODE_LOG_EVENTS_BUFFERED_MAX as EVENTS_BUFFERED_MAX;

#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error("the head sent no request within {0:?}")]
    NoRequest(Duration),
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Serves one log stream the head opened; errors only end the stream.
pub async fn serve(send: quinn::SendStream, recv: quinn::RecvStream, settings: Arc<Settings>) {
    if let Err(e) = serve_stream(send, recv, settings).await {
        tracing::debug!(error = %e, "log stream ended");
    }
}

async fn serve_stream(
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    settings: Arc<Settings>,
) -> Result<(), ServeError> {
    let mut reader = FrameReader::new(recv, REQUEST_FRAME_BYTES_MAX);
    let request = tokio::time::timeout(REQUEST_WAIT, reader.read_required::<NodeStreamRequest>())
        .await
        .map_err(|_| ServeError::NoRequest(REQUEST_WAIT))??;
    let mut writer = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
    let request = match request {
        NodeStreamRequest::Logs(request) => request,
        NodeStreamRequest::Exec(request) => {
            crate::exec_server::serve(&mut writer, request, &settings).await?;
            return Ok(());
        }
    };
    let (tx, mut rx) = mpsc::channel::<LogEvent>(EVENTS_BUFFERED_MAX);
    // Dropped on every return, which stops the readers.
    let mut readers = JoinSet::new();
    let session = request.session;
    if request.follow {
        for executor in request.executors {
            for stderr in [false, true] {
                let target = LogTarget {
                    session,
                    executor,
                    stderr,
                };
                readers.spawn(send_log(settings.clone(), target, true, tx.clone()));
            }
        }
    } else {
        let tx = tx.clone();
        readers.spawn(async move {
            for executor in request.executors {
                for stderr in [false, true] {
                    let target = LogTarget {
                        session,
                        executor,
                        stderr,
                    };
                    if !send_log(settings.clone(), target, false, tx.clone()).await {
                        return false;
                    }
                }
            }
            true
        });
    }
    drop(tx);
    // Until every reader is done, or the other side stops reading; dropping `readers`
    // then stops them.
    flame_protocol::endpoint::relay_log_events(&mut writer, &mut rx).await?;
    Ok(())
}

/// Which log to send: an executor's (or with `stderr`, its separate stderr log, which only
/// ranks of batch jobs have), as far as it was bound to `session`.
struct LogTarget {
    session: SessionId,
    executor: ExecutorId,
    stderr: bool,
}

/// Sends one executor's output for the session into `tx`, from its oldest retained byte;
/// with `follow`, until the executor leaves the session or its log closes. A missing
/// stderr log sends nothing. Returns false when nobody reads `tx` any more.
async fn send_log(
    settings: Arc<Settings>,
    target: LogTarget,
    follow: bool,
    tx: mpsc::Sender<LogEvent>,
) -> bool {
    let LogTarget {
        session,
        executor,
        stderr,
    } = target;
    let node = &settings.node_name;
    let unavailable = |e: LogError| LogEvent::Unavailable {
        node: node.clone(),
        reason: match e {
            LogError::NotFound(_) => format!(
                "no log for executor {executor} on this node (it never ran here, or its log \
                 was removed)"
            ),
            e => format!("cannot read the log of executor {executor}: {e}"),
        },
    };
    let id = if stderr {
        crate::logs::stderr_log_id(executor.0)
    } else {
        executor.0
    };
    let mut reader = match settings.logs.session_reader(id, session.0) {
        Ok(reader) => reader,
        Err(LogError::NotFound(_)) if stderr => return true,
        Err(e) => return tx.send(unavailable(e)).await.is_ok(),
    };
    loop {
        let event = match reader.read_chunk(CHUNK_BYTES, follow).await {
            Ok(Some(data)) => LogEvent::Chunk {
                executor,
                node: node.clone(),
                data,
                stderr,
            },
            Ok(None) => return true,
            Err(e) => return tx.send(unavailable(e)).await.is_ok(),
        };
        if tx.send(event).await.is_err() {
            return false;
        }
    }
}
