//! A raw watcher that records every result frame the head sends for one session, across
//! reconnections, without the client library's de-duplication (a `ResultStream` drops a
//! task it has already delivered, so `flame ping` and `run_tasks` alone cannot see a result
//! the head sent twice).
//!
//! [`ResultRecorder::spawn`] speaks the protocol by hand: hello, `WatchResults`, then
//! `WatchEvent` frames until `Finished`; when the connection is lost (a head killed and
//! restarted) it connects and watches again, starting a new stream. [`Recording::check`]
//! then holds the head to its promise: on one stream every result at most once, and across
//! streams every delivery of a task identical (one final state, one attempt).

use crate::cluster::dial;
use flame_protocol::auth::Secret;
use flame_protocol::frame::{FrameReader, FrameWriter};
use flame_protocol::limits;
use flame_protocol::messages::{
    ClientRequest, ClientResponse, Hello, HelloReply, Role, WatchEvent,
};
use flame_protocol::model::TaskResult;
use flame_protocol::{SessionId, TaskId, PROTOCOL_VERSION};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Pause between attempts to reach a head that is down (it is being restarted).
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// What the recorder saw: the results of each watch stream, in the order they came.
#[derive(Debug, Default)]
pub struct Recording {
    pub streams: Vec<Vec<TaskResult>>,
    /// Result frames (`WatchEvent::Results`) read, over all streams.
    pub frames: u64,
}

/// The figures of a recording that passed [`Recording::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordingSummary {
    pub streams: usize,
    pub frames: u64,
    /// Results read, over all streams (a re-watch replays what the session has finished).
    pub deliveries: u64,
    /// Distinct tasks among them.
    pub tasks: usize,
}

impl Recording {
    /// Checks that no stream carried a task twice and that every delivery of a task, on
    /// any stream, is the same result; returns the figures, or what was wrong.
    pub fn check(&self) -> Result<RecordingSummary, String> {
        let mut first: HashMap<TaskId, &TaskResult> = HashMap::new();
        let mut deliveries = 0u64;
        for (n, stream) in self.streams.iter().enumerate() {
            let mut on_stream: HashMap<TaskId, usize> = HashMap::with_capacity(stream.len());
            for (i, result) in stream.iter().enumerate() {
                deliveries += 1;
                if let Some(before) = on_stream.insert(result.task, i) {
                    return Err(format!(
                        "stream {n} carried task {} twice (results {before} and {i})",
                        result.task
                    ));
                }
                match first.get(&result.task) {
                    Some(earlier) if *earlier != result => {
                        return Err(format!(
                            "task {} was delivered as two different results: {earlier:?}, then on stream {n} {result:?}",
                            result.task
                        ))
                    }
                    Some(_) => {}
                    None => {
                        first.insert(result.task, result);
                    }
                }
            }
        }
        Ok(RecordingSummary {
            streams: self.streams.len(),
            frames: self.frames,
            deliveries,
            tasks: first.len(),
        })
    }
}

/// A recorder running on its own task; [`ResultRecorder::finish`] waits for the session's
/// `Finished` and returns what it saw.
#[derive(Debug)]
pub struct ResultRecorder {
    task: tokio::task::JoinHandle<Result<Recording, String>>,
}

impl ResultRecorder {
    /// Watches `session` on the head at `head_addr` (trusting `ca_file`, as the holder of
    /// `token`) until it finishes; gives up after `timeout` in all.
    pub fn spawn(
        head_addr: String,
        ca_file: PathBuf,
        token: Secret,
        session: SessionId,
        timeout: Duration,
    ) -> ResultRecorder {
        let task = tokio::spawn(async move {
            let deadline = Instant::now() + timeout;
            let mut recording = Recording::default();
            loop {
                if Instant::now() >= deadline {
                    return Err(format!(
                        "session {session} did not finish within {timeout:?} ({} streams)",
                        recording.streams.len()
                    ));
                }
                let remaining = deadline.saturating_duration_since(Instant::now());
                let watched = tokio::time::timeout(
                    remaining,
                    watch_once(&head_addr, &ca_file, &token, session, &mut recording),
                )
                .await;
                match watched {
                    Ok(Ok(true)) => return Ok(recording),
                    // Lost the head (or never reached it): watch again on a new stream.
                    Ok(Ok(false)) | Ok(Err(_)) => tokio::time::sleep(RECONNECT_PAUSE).await,
                    Err(_) => {} // the deadline check above reports it
                }
            }
        });
        ResultRecorder { task }
    }

    /// The recording, once the session finished.
    pub async fn finish(self) -> Result<Recording, String> {
        self.task
            .await
            .map_err(|e| format!("the recorder panicked: {e}"))?
    }
}

/// One connection and one watch stream. `Ok(true)`: the session finished; `Ok(false)`: the
/// stream or connection ended first (results read so far are recorded); `Err`: the head
/// could not be reached or refused.
async fn watch_once(
    head_addr: &str,
    ca_file: &std::path::Path,
    token: &Secret,
    session: SessionId,
    recording: &mut Recording,
) -> Result<bool, String> {
    use flame_protocol::endpoint::{client, Trust};
    let endpoint =
        client(&Trust::CaFile(ca_file.to_path_buf()), None).map_err(|e| e.to_string())?;
    let addr = head_addr
        .parse()
        .map_err(|e| format!("{head_addr} is no socket address: {e}"))?;
    let connection = dial(&endpoint, addr).await?;
    let (send, recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    let mut writer = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
    let mut reader = FrameReader::new(recv, limits::FRAME_BYTES_MAX);
    writer
        .write(&Hello {
            protocol_version: PROTOCOL_VERSION,
            role: Role::Client,
            agent: "flame-tests result recorder".into(),
            token: Some(token.clone()),
        })
        .await
        .map_err(|e| e.to_string())?;
    match reader.read_required::<HelloReply>().await {
        Ok(HelloReply::Welcome { .. }) => {}
        Ok(HelloReply::Refused { reason }) => return Err(format!("refused: {reason}")),
        Err(e) => return Err(e.to_string()),
    }
    let _ = writer.into_inner().finish();
    let (send, recv) = connection.open_bi().await.map_err(|e| e.to_string())?;
    let mut writer = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
    let mut reader = FrameReader::new(recv, limits::FRAME_BYTES_MAX);
    writer
        .write(&ClientRequest::WatchResults { session })
        .await
        .map_err(|e| e.to_string())?;
    match reader.read_required::<ClientResponse>().await {
        Ok(ClientResponse::Ok) => {}
        Ok(other) => return Err(format!("watch refused: {other:?}")),
        Err(e) => return Err(e.to_string()),
    }
    recording.streams.push(Vec::new());
    loop {
        match reader.read::<WatchEvent>().await {
            Ok(Some(WatchEvent::Results(results))) => {
                recording.frames += 1;
                if let Some(stream) = recording.streams.last_mut() {
                    stream.extend(results);
                }
            }
            Ok(Some(WatchEvent::Finished)) => return Ok(true),
            // The head dropped this watch for falling behind: watch again, as the client
            // library does.
            Ok(Some(WatchEvent::Lagged { .. })) => return Ok(false),
            Ok(None) | Err(_) => return Ok(false),
        }
    }
}
