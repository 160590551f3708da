//! Sessions: submitting tasks and watching their results.
//!
//! This module builds on `client` and not the reverse: the [`Client`] calls that hand out a
//! [`Session`] ([`Client::create_session`], [`Client::session`]) are defined here.

use crate::batch::BatchLimits;
use crate::client::Client;
use crate::error::{io_error, ClientError};
use crate::objects::{batch_payloads, split_submit};
use bytes::Bytes;
use flame_protocol::frame::{FrameReader, FrameWriter};
use flame_protocol::messages::{
    task_range, ClientRequest, ClientResponse, SubmitBatch, SubmitReply, WatchEvent,
};
use flame_protocol::model::{SessionInfo, SessionSpec, TaskOutcome, TaskResult};
use flame_protocol::object::{ObjectRef, Payload};
use flame_protocol::{SessionId, TaskId};
use std::collections::VecDeque;
use tokio::sync::mpsc;

/// Unacknowledged batches a [`Submitter`] keeps in flight before it waits for the oldest
/// ack. Enough to hide a round trip and a group commit; small enough to bound the memory
/// the head holds for one client.
pub const SUBMIT_WINDOW_BATCHES: usize = 16;

pub use flame_protocol::limits::WATCH_BUFFER_FRAMES;

/// Times in a row a [`Submitter`] or a [`ResultStream`] reconnects and starts over after
/// losing the head before it reports the loss (each reconnection is itself bounded by
/// [`crate::client::RECONNECT_TIMEOUT`]).
pub const RECOVERIES_MAX: u32 = 10;

/// A per-submitter starting point for batch ids, so that the batches of two submitters of
/// one session never share an id: the head remembers ids to drop resent batches.
fn batch_id_base() -> u64 {
    use std::hash::BuildHasher;
    use std::sync::atomic::{AtomicU64, Ordering};
    static SUBMITTERS: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded from the OS's random source once per process.
    let state = std::collections::hash_map::RandomState::new();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = SUBMITTERS.fetch_add(1, Ordering::Relaxed);
    // Leave room below 2^64 for the submitter's own sequence.
    state.hash_one((std::process::id(), now, n)) >> 1
}

/// The calls of [`Client`] that hand out a [`Session`].
impl Client {
    /// Opens a session. A spec with an empty `owner` gets [`Client::owner`], which may be
    /// empty too: the head then makes the authenticated user the owner. Naming another
    /// user than oneself takes an admin; others get
    /// [`ErrorKind::PermissionDenied`](flame_protocol::model::ErrorKind).
    ///
    /// Inline common data larger than [`ClientConfig::object_inline_max`] is put to a
    /// node's cache first and the session created with a reference to it. The session
    /// does not exist yet when it is put, so it is put as a kept object; the head moves a
    /// kept object named as a session's common data into that session's scope, so it
    /// goes when the session does.
    ///
    /// [`ClientConfig::object_inline_max`]: crate::ClientConfig::object_inline_max
    pub async fn create_session(&self, mut spec: SessionSpec) -> Result<Session, ClientError> {
        if spec.owner.is_empty() {
            spec.owner = self.owner().to_string();
        }
        let common = std::mem::take(&mut spec.common_data);
        spec.common_data = self.offload(&spec.owner, None, common).await?;
        match self.request(ClientRequest::CreateSession(spec)).await? {
            ClientResponse::Session(info) => Ok(Session::new(self.clone(), info)),
            other => Err(self.unexpected("request CreateSession", &other)),
        }
    }

    /// A handle on an existing session.
    pub async fn session(&self, id: SessionId) -> Result<Session, ClientError> {
        let info = self.get_session(id).await?;
        Ok(Session::new(self.clone(), info))
    }
}

/// A handle on one session. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Session {
    client: Client,
    id: SessionId,
    /// The session's owner: its objects are this owner's.
    owner: String,
}

impl Session {
    pub(crate) fn new(client: Client, info: SessionInfo) -> Self {
        Session {
            client,
            id: info.id,
            owner: info.owner,
        }
    }

    /// The session's owner.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Puts `bytes` as an object of the session's owner that lives as long as the
    /// session; a task input or common data may then name it
    /// ([`Payload::Object`]).
    pub async fn put(&self, bytes: Bytes) -> Result<ObjectRef, ClientError> {
        self.client
            .put_object(Some(&self.owner), Some(self.id), bytes, 1)
            .await
    }

    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The client this session talks through.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The session's current state, asked of the head.
    pub async fn info(&self) -> Result<SessionInfo, ClientError> {
        self.client.get_session(self.id).await
    }

    /// Closes the session: it takes no more tasks and finishes when its tasks do.
    pub async fn close(&self) -> Result<(), ClientError> {
        self.client.close_session(self.id).await
    }

    /// Submits `inputs` on a stream of its own and waits until the head has acknowledged
    /// them; returns their task ids in input order. Inputs beyond one batch's bounds are
    /// sent as several batches on that stream.
    pub async fn submit(&self, inputs: Vec<Bytes>) -> Result<Vec<TaskId>, ClientError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let mut submitter = self.submitter().await?;
        submitter.send(inputs).await?;
        let acks = submitter.finish().await?;
        Ok(acks.iter().flat_map(BatchAck::task_ids).collect())
    }

    /// Submits every input on one pipelined stream, then closes the session, so that a
    /// watch ends when the last task does. Returns the acks in batch order.
    pub async fn submit_and_close(&self, inputs: Vec<Bytes>) -> Result<Vec<BatchAck>, ClientError> {
        let mut submitter = self.submitter().await?;
        submitter.send(inputs).await?;
        let acks = submitter.finish().await?;
        self.close().await?;
        Ok(acks)
    }

    /// Opens a pipelined submit stream.
    pub async fn submitter(&self) -> Result<Submitter, ClientError> {
        let (conn, (send, recv)) = self
            .client
            .open_stream(ClientRequest::OpenSubmitStream { session: self.id })
            .await?;
        Ok(Submitter {
            client: self.client.clone(),
            session: self.id,
            owner: self.owner.clone(),
            inline_max: self.client.config().object_inline_max,
            conn,
            send,
            recv,
            limits: BatchLimits::default(),
            window: SUBMIT_WINDOW_BATCHES,
            next_batch_id: batch_id_base(),
            in_flight: VecDeque::with_capacity(SUBMIT_WINDOW_BATCHES),
            acks: Vec::new(),
            broken: false,
        })
    }

    /// Watches the session's results: every result exactly once, including those that
    /// finished before the watch began. Open the watch before submitting when every result
    /// matters to you and the session is ephemeral.
    pub async fn watch(&self) -> Result<ResultStream, ClientError> {
        let (conn, (send, recv)) = self
            .client
            .open_stream(ClientRequest::WatchResults { session: self.id })
            .await?;
        let (tx, rx) = mpsc::channel(WATCH_BUFFER_FRAMES);
        tokio::spawn(pump_watch(
            self.client.clone(),
            self.id,
            conn,
            send.into_inner(),
            recv,
            tx,
        ));
        Ok(ResultStream {
            session: self.id,
            client: self.client.clone(),
            owner: self.owner.clone(),
            rx,
            finished: false,
            keep_refs: false,
            pending: None,
        })
    }
}

/// The head's acknowledgement of one submitted batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchAck {
    /// The batch's id, chosen by the submitter and unique within the session.
    pub batch_id: u64,
    /// The id of the batch's first input; the others follow in input order.
    pub first_task: TaskId,
    /// Inputs in the batch.
    pub count: u32,
}

impl BatchAck {
    /// The batch's task ids, in input order.
    pub fn task_ids(&self) -> impl Iterator<Item = TaskId> {
        task_range(self.first_task, self.count)
    }
}

/// A pipelined submit stream: batches are sent without waiting for their acks, with at
/// most [`SUBMIT_WINDOW_BATCHES`] unacknowledged at once.
///
/// It survives the loss of the head (a restart, a network blip): it reconnects and sends
/// the unacknowledged batches again, and the head, which remembers batch ids, creates no
/// task twice. Unacknowledged inputs are kept for that, so memory is bounded by the
/// window.
///
/// Its calls are not cancel-safe: if one fails, or its future is dropped before it
/// completes, the stream's state is unknown and later calls return
/// [`ClientError::SubmitterBroken`].
#[derive(Debug)]
pub struct Submitter {
    client: Client,
    session: SessionId,
    /// The session's owner, whose objects large inputs become.
    owner: String,
    /// Inputs larger than this are put as objects first.
    inline_max: u64,
    /// The connection the stream is on, to tell a lost head from other failures.
    conn: quinn::Connection,
    send: FrameWriter<quinn::SendStream>,
    recv: FrameReader<quinn::RecvStream>,
    limits: BatchLimits,
    window: usize,
    next_batch_id: u64,
    /// Sent, unacknowledged batches, oldest first, with their inputs for a resend.
    in_flight: VecDeque<SubmitBatch>,
    acks: Vec<BatchAck>,
    broken: bool,
}

impl Submitter {
    /// The session this stream submits to.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// Acknowledgements received so far, in batch order.
    pub fn acks(&self) -> &[BatchAck] {
        &self.acks
    }

    /// Batches sent and not yet acknowledged.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Sends `inputs`, split into batches within [`flame_protocol::limits::SUBMIT_BATCH_BYTES_TARGET`] and
    /// [`flame_protocol::limits::SUBMIT_BATCH_TASKS_MAX`]. Returns once every batch is written; waits for
    /// acks only to keep the window bounded. A rejected batch is
    /// [`ClientError::BatchRejected`].
    ///
    /// Inputs larger than [`ClientConfig::object_inline_max`] are put to the nodes' caches
    /// first, as objects of the session (one `PutObjects` request per batch, the
    /// transfers run concurrently), and the batch carries their references.
    ///
    /// [`ClientConfig::object_inline_max`]: crate::ClientConfig::object_inline_max
    pub async fn send(&mut self, inputs: Vec<Bytes>) -> Result<(), ClientError> {
        self.guard()?;
        for batch in split_submit(inputs, self.limits, self.inline_max) {
            while self.in_flight.len() >= self.window {
                self.await_ack().await?;
            }
            let payloads = batch_payloads(&self.client, &self.owner, self.session, batch).await?;
            self.send_batch(payloads).await?;
        }
        self.broken = false;
        Ok(())
    }

    /// Waits for every outstanding ack, ends the stream, and returns all acks in batch order.
    pub async fn finish(mut self) -> Result<Vec<BatchAck>, ClientError> {
        self.guard()?;
        while !self.in_flight.is_empty() {
            self.await_ack().await?;
        }
        // Every batch is acknowledged, so ending our side loses nothing; it tells the head
        // that no more batches follow.
        self.send
            .into_inner()
            .finish()
            .map_err(|e| self.client.stream_error("submit stream", io_error(e)))?;
        Ok(self.acks)
    }

    /// Fails when an earlier call broke off; otherwise marks the stream as busy until the
    /// caller clears the mark on success.
    fn guard(&mut self) -> Result<(), ClientError> {
        if self.broken {
            return Err(ClientError::SubmitterBroken {
                session: self.session,
            });
        }
        self.broken = true;
        Ok(())
    }

    async fn send_batch(&mut self, inputs: Vec<Payload>) -> Result<(), ClientError> {
        let batch_id = self.next_batch_id;
        if u32::try_from(inputs.len()).is_err() {
            return Err(self.client.protocol_error(
                "submit stream",
                format!("a batch of {} inputs does not fit a u32", inputs.len()),
            ));
        }
        self.next_batch_id = self.next_batch_id.wrapping_add(1);
        self.in_flight.push_back(SubmitBatch { batch_id, inputs });
        let what = format!("submitting batch {batch_id}");
        let client = self.client.clone();
        let writer = &mut self.send;
        let Some(batch) = self.in_flight.back() else {
            return Ok(());
        };
        let written = client
            .bounded(&what, async {
                writer
                    .write(batch)
                    .await
                    .map_err(|e| client.stream_error(&what, e))
            })
            .await;
        match written {
            Err(e) if Client::is_lost(&self.conn) => self.recover(e).await,
            other => other,
        }
    }

    /// After losing the head: reconnects, opens a new submit stream and sends every
    /// unacknowledged batch again, in order. The head acks a batch it already has with the
    /// tasks it created the first time.
    async fn recover(&mut self, cause: ClientError) -> Result<(), ClientError> {
        let mut last = cause;
        for attempt in 1..=RECOVERIES_MAX {
            tracing::info!(session = %self.session, attempt, batches = self.in_flight.len(), error = %last, "the head was lost; resubmitting unacknowledged batches");
            self.client.reconnect(&self.conn).await?;
            let (conn, (send, recv)) = self
                .client
                .open_stream(ClientRequest::OpenSubmitStream {
                    session: self.session,
                })
                .await?;
            self.conn = conn;
            self.send = send;
            self.recv = recv;
            let what = "resubmitting unacknowledged batches";
            let client = self.client.clone();
            let writer = &mut self.send;
            let batches = &self.in_flight;
            let resent = client
                .bounded(what, async {
                    for batch in batches {
                        writer
                            .write(batch)
                            .await
                            .map_err(|e| client.stream_error(what, e))?;
                    }
                    Ok(())
                })
                .await;
            match resent {
                Ok(()) => return Ok(()),
                Err(e) if Client::is_lost(&self.conn) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    /// Reads the reply to the oldest batch in flight.
    async fn await_ack(&mut self) -> Result<(), ClientError> {
        let Some(front) = self.in_flight.front() else {
            return Ok(());
        };
        let (expected_id, expected_count) = (front.batch_id, front.inputs.len() as u32);
        let what = format!("waiting for the ack of batch {expected_id}");
        let mut recoveries = 0;
        let reply = loop {
            let client = self.client.clone();
            let reader = &mut self.recv;
            let read = client
                .bounded(&what, async {
                    reader
                        .read::<SubmitReply>()
                        .await
                        .map_err(|e| client.stream_error(&what, e))
                })
                .await;
            match read {
                // A stream that ends or fails because the head went away: start over on a
                // new connection; the ack comes on the new stream.
                Ok(None) | Err(_) if Client::is_lost(&self.conn) && recoveries < RECOVERIES_MAX => {
                    recoveries += 1;
                    let cause = match read {
                        Err(e) => e,
                        _ => client.protocol_error(&what, "the stream ended".into()),
                    };
                    self.recover(cause).await?;
                }
                other => break other?,
            }
        };
        let client = self.client.clone();
        let protocol = |detail: String| client.protocol_error(&what, detail);
        match reply {
            None => Err(protocol(format!(
                "the stream ended with {} batches unacknowledged",
                self.in_flight.len()
            ))),
            Some(SubmitReply::Rejected { batch_id, error }) => {
                Err(ClientError::BatchRejected { batch_id, error })
            }
            Some(SubmitReply::Accepted {
                batch_id,
                first_task,
                count,
            }) => {
                if batch_id != expected_id || count != expected_count {
                    return Err(protocol(format!(
                        "expected the ack of batch {expected_id} ({expected_count} tasks), got batch {batch_id} ({count} tasks)"
                    )));
                }
                if first_task.0.checked_add(u64::from(count)).is_none() {
                    return Err(protocol(format!(
                        "task ids from {first_task} for {count} tasks overflow"
                    )));
                }
                self.in_flight.pop_front();
                self.acks.push(BatchAck {
                    batch_id,
                    first_task,
                    count,
                });
                Ok(())
            }
        }
    }
}

/// What the watch pump hands to [`ResultStream::next`].
#[derive(Debug)]
enum WatchItem {
    Results(Vec<TaskResult>),
    Finished,
    Failed(ClientError),
}

/// A session's results, as the head pushes them.
///
/// [`ResultStream::next`] is cancel-safe: a task reads the stream and buffers up to
/// [`WATCH_BUFFER_FRAMES`] frames, so `next` may be raced in `select!` or wrapped in a
/// timeout. There is no per-result bound by design: a live head with slow tasks may send
/// nothing for hours, while a dead head or link is detected by the connection's idle timeout
/// ([`flame_protocol::limits::IDLE_TIMEOUT`]). Dropping the stream stops the watch.
///
/// A reader slower than the session's results does not make the head hold them: the head
/// drops a watch that falls behind its bound and says so (`WatchEvent::Lagged`); the stream
/// then watches again, gets the results from the store, and drops those already handed on,
/// so a slow reader still sees every result exactly once.
///
/// Outputs the nodes kept as objects ([`TaskOutcome::Object`]) are fetched before `next`
/// hands the batch on, as [`TaskOutcome::Succeeded`] with the bytes: one `LocateObjects`
/// request per batch, the transfers run concurrently. [`ResultStream::keep_refs`] turns
/// that off for readers that want the references (to fetch later, or never). When a
/// fetch fails, `next` returns the error and keeps the batch: the next call tries it
/// again, so a reader that stops on errors loses nothing, and one that goes on may set
/// `keep_refs` to get past an output that is lost.
#[derive(Debug)]
pub struct ResultStream {
    session: SessionId,
    client: Client,
    /// The session's owner, whose objects its outputs are.
    owner: String,
    rx: mpsc::Receiver<WatchItem>,
    finished: bool,
    keep_refs: bool,
    /// A batch taken from the pump whose outputs are being, or failed to be, fetched.
    pending: Option<Vec<TaskResult>>,
}

impl ResultStream {
    /// The session watched.
    pub fn session(&self) -> SessionId {
        self.session
    }

    /// Whether to hand on outputs kept as objects as their references
    /// ([`TaskOutcome::Object`]) rather than fetch them (the default, `false`).
    pub fn keep_refs(mut self, keep: bool) -> Self {
        self.keep_refs = keep;
        self
    }

    /// Changes [`ResultStream::keep_refs`] on a stream being read.
    pub fn set_keep_refs(&mut self, keep: bool) {
        self.keep_refs = keep;
    }

    /// The next batch of results; `None` once the head has said the session is finished,
    /// or when the stream ended without saying so (see [`ResultStream::is_finished`]).
    /// Outputs kept as objects are fetched first unless [`ResultStream::keep_refs`]; a
    /// batch whose fetch is cancelled or fails is tried again at the next call.
    pub async fn next(&mut self) -> Option<Result<Vec<TaskResult>, ClientError>> {
        let results = match self.pending.take() {
            Some(results) => results,
            None => match self.rx.recv().await? {
                WatchItem::Results(results) => results,
                WatchItem::Finished => {
                    self.finished = true;
                    return None;
                }
                WatchItem::Failed(e) => return Some(Err(e)),
            },
        };
        let has_objects = results
            .iter()
            .any(|r| matches!(r.outcome, TaskOutcome::Object(_)));
        if self.keep_refs || !has_objects {
            return Some(Ok(results));
        }
        // Kept here while fetching: a cancelled call loses nothing.
        self.pending = Some(results.clone());
        match resolve_outputs(&self.client, &self.owner, results).await {
            Ok(resolved) => {
                self.pending = None;
                Some(Ok(resolved))
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// Whether the head said the session is finished (closed, every task final).
    pub fn is_finished(&self) -> bool {
        self.finished
    }
}

/// `results` with every [`TaskOutcome::Object`] replaced by the object's bytes, read
/// from the nodes (each object once, however many results name it).
async fn resolve_outputs(
    client: &Client,
    owner: &str,
    mut results: Vec<TaskResult>,
) -> Result<Vec<TaskResult>, ClientError> {
    let mut ids = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for result in &results {
        if let TaskOutcome::Object(r) = &result.outcome {
            if seen.insert(r.id) {
                ids.push(r.id);
            }
        }
    }
    let fetched = client.get_objects(Some(owner), &ids).await?;
    let by_id: std::collections::HashMap<_, _> = ids.into_iter().zip(fetched).collect();
    for result in &mut results {
        if let TaskOutcome::Object(r) = &result.outcome {
            if let Some(bytes) = by_id.get(&r.id) {
                result.outcome = TaskOutcome::Succeeded(bytes.clone());
            }
        }
    }
    Ok(results)
}

/// Reads watch frames into `tx` until the session finishes, the stream ends or fails, or
/// the [`ResultStream`] is dropped. When the head is lost it reconnects and watches again:
/// the head then sends every final result from the start, and those already handed on are
/// dropped here, so the reader sees each result once.
async fn pump_watch(
    client: Client,
    session: SessionId,
    mut conn: quinn::Connection,
    // Held open, not finished: ending our side would end the watch.
    mut send: quinn::SendStream,
    mut recv: FrameReader<quinn::RecvStream>,
    tx: mpsc::Sender<WatchItem>,
) {
    let what = format!("watching session {session}");
    let mut seen = flame_protocol::TaskIdSet::default();
    let mut recoveries = 0;
    loop {
        let event = tokio::select! {
            event = recv.read::<WatchEvent>() => event,
            // The reader went away: stop reading, and drop the stream to tell the head.
            () = tx.closed() => break,
        };
        let item = match event {
            Ok(Some(WatchEvent::Results(mut results))) => {
                results.retain(|r| seen.insert(r.task));
                if results.is_empty() {
                    continue;
                }
                recoveries = 0;
                WatchItem::Results(results)
            }
            Ok(Some(WatchEvent::Finished)) => WatchItem::Finished,
            // The head dropped this watch because the reader fell behind: watch again. The
            // new watch sends every final result from the store, in pages; those already
            // handed on are dropped above, so each result still comes once. `recoveries`
            // resets on every fresh result, so a reader that keeps lagging but keeps
            // receiving goes on, and one that gets nothing new between lags gives up.
            Ok(Some(WatchEvent::Lagged { reason })) if recoveries < RECOVERIES_MAX => {
                recoveries += 1;
                tracing::info!(%session, %reason, "the watch lagged; watching again");
                match client
                    .open_stream(ClientRequest::WatchResults { session })
                    .await
                {
                    Ok((c, (s, r))) => {
                        conn = c;
                        send = s.into_inner();
                        recv = r;
                        continue;
                    }
                    Err(e) => WatchItem::Failed(e),
                }
            }
            Ok(Some(WatchEvent::Lagged { reason })) => WatchItem::Failed(ClientError::Protocol {
                addr: client.head_addr().to_string(),
                what: what.clone(),
                detail: format!("the head stopped the watch {RECOVERIES_MAX} times in a row without a new result: {reason}"),
            }),
            Ok(None) | Err(_) if Client::is_lost(&conn) && recoveries < RECOVERIES_MAX => {
                recoveries += 1;
                tracing::info!(%session, attempt = recoveries, "the head was lost; watching again");
                match client
                    .open_stream(ClientRequest::WatchResults { session })
                    .await
                {
                    Ok((c, (s, r))) => {
                        conn = c;
                        send = s.into_inner();
                        recv = r;
                        continue;
                    }
                    Err(e) => WatchItem::Failed(e),
                }
            }
            Ok(None) => break,
            Err(e) => WatchItem::Failed(client.stream_error(&what, e)),
        };
        let last = !matches!(item, WatchItem::Results(_));
        if tx.send(item).await.is_err() || last {
            break;
        }
    }
    drop(send);
}
