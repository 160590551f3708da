//! The node's side of `flame-mpi-agent`: the head opens a stream with a
//! [`NodeStreamRequest::Exec`](flame_protocol::messages::NodeStreamRequest) naming a rank
//! of a running batch job on this node; the command starts in that rank's cgroup, as its
//! user, with its environment (see `executor::rank`), and its stdout and stderr come
//! back as [`ExecEvent`] frames, then its exit status.
//!
//! The process is killed when the head stops reading (the requester went away), and with
//! the rank's whole cgroup when the job ends.

use crate::executor::{ExecStart, Settings};
use flame_protocol::frame::{FrameError, FrameWriter};
use flame_protocol::messages::{ExecEvent, NodeExecRequest};
use std::time::Duration;
use tokio::io::AsyncReadExt as _;
use tokio::sync::oneshot;

/// How long a holding rank may take to start the process.
pub const START_WAIT: Duration = Duration::from_secs(10);
/// Bytes of output per frame at most.
pub const CHUNK_BYTES: usize = 64 * 1024;

/// Runs one exec request to its end; errors only end the stream.
pub async fn serve(
    writer: &mut FrameWriter<quinn::SendStream>,
    request: NodeExecRequest,
    settings: &Settings,
) -> Result<(), FrameError> {
    let event = match run(writer, request, settings).await? {
        Ok(code) => ExecEvent::Exited { code },
        Err(reason) => ExecEvent::Failed { reason },
    };
    writer.write(&event).await?;
    let _ = writer.get_mut().finish();
    Ok(())
}

/// Starts the process and relays its output; `Ok(Err(reason))` when it could not start
/// or was stopped.
async fn run(
    writer: &mut FrameWriter<quinn::SendStream>,
    request: NodeExecRequest,
    settings: &Settings,
) -> Result<Result<i32, String>, FrameError> {
    // The head may ask before this node has started the rank's task: wait for it.
    let deadline = tokio::time::Instant::now() + START_WAIT;
    let hold = loop {
        let changed = settings.rank_holds_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let hold = settings
            .rank_holds
            .lock()
            .ok()
            .and_then(|holds| holds.get(&request.executor).cloned());
        if let Some(hold) = hold {
            break hold;
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            return Ok(Err(format!(
                "executor {} holds no rank of a running job on node {} (waited {START_WAIT:?})",
                request.executor, settings.node_name
            )));
        }
    };
    let (started_tx, started_rx) = oneshot::channel();
    let start = ExecStart {
        argv: request.argv,
        env: request.env,
        started: started_tx,
    };
    if hold.send(start).await.is_err() {
        return Ok(Err("the rank ended".into()));
    }
    let mut child = match tokio::time::timeout(START_WAIT, started_rx).await {
        Ok(Ok(Ok(child))) => child,
        Ok(Ok(Err(reason))) => return Ok(Err(reason)),
        Ok(Err(_)) => return Ok(Err("the rank ended".into())),
        Err(_) => {
            return Ok(Err(format!(
                "the rank did not start it within {START_WAIT:?}"
            )))
        }
    };
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut out_buf = vec![0u8; CHUNK_BYTES];
    let mut err_buf = vec![0u8; CHUNK_BYTES];
    loop {
        if stdout.is_none() && stderr.is_none() {
            break;
        }
        tokio::select! {
            n = read_some(&mut stdout, &mut out_buf) => match n {
                Some(n) => writer.write(&ExecEvent::Stdout(bytes::Bytes::copy_from_slice(&out_buf[..n]))).await?,
                None => stdout = None,
            },
            n = read_some(&mut stderr, &mut err_buf) => match n {
                Some(n) => writer.write(&ExecEvent::Stderr(bytes::Bytes::copy_from_slice(&err_buf[..n]))).await?,
                None => stderr = None,
            },
            _ = writer.get_mut().stopped() => {
                // Nobody reads any more: the process goes (kill_on_drop) with the child.
                return Ok(Err("the requester went away".into()));
            }
        }
    }
    tokio::select! {
        status = child.wait() => Ok(match status {
            Ok(status) => Ok(crate::executor::status_code(status)),
            Err(e) => Err(format!("waiting for the process failed: {e}")),
        }),
        _ = writer.get_mut().stopped() => Ok(Err("the requester went away".into())),
    }
}

/// Reads what a pipe has; `None` at its end (or when there is no pipe: never ready).
async fn read_some<R: tokio::io::AsyncRead + Unpin>(
    pipe: &mut Option<R>,
    buf: &mut [u8],
) -> Option<usize> {
    match pipe {
        Some(p) => match p.read(buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(n),
        },
        None => std::future::pending().await,
    }
}
