//! The long-lived client streams: submit, watch, logs and exec.

use super::*;

/// A submit stream: batches in, replies out in batch order from a second task, so many
/// batches can be in flight and the reader never waits for a commit. What the stream holds
/// is bounded by what the head admits: before taking a batch's body it takes that many
/// bytes of its owner's `submit_bytes_in_flight` budget, given back once the core has
/// answered (the tasks are then in the core's quota ledger, or refused); while the budget
/// is spent the stream is not read, and QUIC flow control holds the peer back.
pub(super) async fn submit_stream(
    _conn: &quinn::Connection,
    shared: Arc<Shared>,
    session: flame_protocol::SessionId,
    slot: &UserSlot,
    mut writer: Writer,
    mut reader: Reader,
) -> Result<(), ConnError> {
    type Pending = (
        u64,
        oneshot::Receiver<Reply>,
        tokio::sync::OwnedSemaphorePermit,
    );
    let (acks_tx, mut acks_rx) = mpsc::channel::<Pending>(SUBMIT_BATCHES_IN_FLIGHT_MAX);
    let store = shared.store.clone();
    let replier = tokio::spawn(async move {
        while let Some((batch_id, rx, permit)) = acks_rx.recv().await {
            let reply = rx
                .await
                .ok()
                .and_then(|r| SubmitReply::try_from(r).ok())
                .unwrap_or(SubmitReply::Rejected {
                    batch_id,
                    error: ApiError::new(ErrorKind::Unavailable, "the head is shutting down"),
                });
            drop(permit);
            let reply = settle_refused(&store, session, reply).await;
            if writer.write(&reply).await.is_err() {
                break;
            }
        }
        let _ = writer.get_mut().finish();
    });
    let budget = slot.submit_budget.clone();
    let budget_units =
        shared.quotas.of(&slot.user).submit_bytes_in_flight / SUBMIT_BUDGET_UNIT_BYTES;
    let result = loop {
        let len = match next_len_bounded(&mut reader).await {
            Ok(Some(len)) => len,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        // A frame larger than the whole budget takes all of it, and goes alone.
        let units = (len as u64 / SUBMIT_BUDGET_UNIT_BYTES + 1).clamp(1, budget_units.max(1));
        let permit = match budget
            .clone()
            .acquire_many_owned(u32::try_from(units).unwrap_or(u32::MAX))
            .await
        {
            Ok(permit) => permit,
            Err(_) => break Err(ConnError::CoreGone),
        };
        let batch = match read_bounded::<SubmitBatch>(&mut reader, None).await {
            Ok(Some(b)) => b,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        };
        let (tx, rx) = oneshot::channel();
        let batch_id = batch.batch_id;
        if shared
            .events
            .send(Inbound::Ask {
                request: Request::Submit {
                    session,
                    batch_id,
                    inputs: batch.inputs,
                },
                reply: tx,
            })
            .await
            .is_err()
        {
            break Err(ConnError::CoreGone);
        }
        if acks_tx.send((batch_id, rx, permit)).await.is_err() {
            break Ok(());
        }
    };
    drop(acks_tx);
    let _ = replier.await;
    result
}

/// A watch: the results already final (from the core's memory for an ephemeral session,
/// else from the store, a page at a time), then the live ones from the core's bounded
/// queue, each task once, then `Finished`. A watcher that falls behind is dropped by the
/// core and told `Lagged`; the client watches again.
pub(super) async fn watch_stream(
    shared: Arc<Shared>,
    session: flame_protocol::SessionId,
    mut writer: Writer,
) -> Result<(), ConnError> {
    let (sink, mut live): (_, WatchSource) = watch_queue();
    let (tx, rx) = oneshot::channel();
    shared
        .events
        .send(Inbound::Watch {
            session,
            sink,
            reply: tx,
        })
        .await
        .map_err(|_| ConnError::CoreGone)?;
    let start: Result<WatchStart, ApiError> = answer(rx).await?;
    let start = match start {
        Ok(s) => s,
        Err(e) => {
            writer.write(&ClientResponse::Error(e)).await?;
            let _ = writer.get_mut().finish();
            return Ok(());
        }
    };
    writer.write(&ClientResponse::Ok).await?;
    // Results that were already durable may also arrive live; each goes out once.
    let mut sent = TaskIdSet::default();
    // How the live queue ended, if it did during the backfill: `Some(true)` Finished,
    // `Some(false)` dropped for lagging.
    let mut ended = None;
    match start.backfill {
        Backfill::Memory(backfill) => {
            for r in &backfill {
                sent.insert(r.task);
            }
            for chunk in backfill.chunks(limits::MESSAGE_BATCH_MAX) {
                writer.write(&WatchEvent::Results(chunk.to_vec())).await?;
            }
        }
        Backfill::Store => {
            let mut after = TaskId(0);
            loop {
                let page = read_store(&shared, move |store| {
                    store.final_results_page(
                        session,
                        after,
                        WATCH_BACKFILL_PAGE_RESULTS,
                        WATCH_BACKFILL_PAGE_BYTES,
                    )
                })
                .await?;
                let mut page = match page {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::error!(%session, error = %e, "cannot read results for a watcher");
                        return Ok(());
                    }
                };
                let Some(last) = page.last() else { break };
                after = last.task;
                page.retain(|r| sent.insert(r.task));
                if !page.is_empty() {
                    writer.write(&WatchEvent::Results(page)).await?;
                }
                // Live results go out between pages, so that a long backfill of a busy
                // session does not make its own watch lag.
                if ended.is_none() && !start.finished {
                    ended = forward_queued(&mut live, &mut sent, &mut writer).await?;
                }
            }
        }
    }
    if ended.is_none() && !start.finished {
        loop {
            let msg = tokio::select! {
                msg = live.recv() => msg,
                // The client went away: stop watching instead of waiting for results.
                _ = writer.get_mut().stopped() => return Ok(()),
            };
            match msg {
                Some(WatchMsg::Results(results)) => {
                    write_new_results(results, &mut sent, &mut writer).await?;
                }
                Some(WatchMsg::Finished) => break,
                None => {
                    ended = Some(false);
                    break;
                }
            }
        }
    }
    if ended == Some(false) {
        // The core dropped this watcher without `Finished`: it fell behind.
        writer
            .write(&WatchEvent::Lagged {
                reason: format!(
                    "this watch fell more than {} messages or {} bytes behind the \
                     session's results; watch again to get the rest from the store",
                    crate::watch::WATCH_QUEUE_MESSAGES_MAX,
                    crate::watch::WATCH_QUEUE_BYTES_MAX
                ),
            })
            .await?;
        let _ = writer.get_mut().finish();
        return Ok(());
    }
    writer.write(&WatchEvent::Finished).await?;
    let _ = writer.get_mut().finish();
    Ok(())
}

/// Writes the results not sent yet on this watch.
pub(super) async fn write_new_results(
    mut results: Vec<TaskResult>,
    sent: &mut TaskIdSet,
    writer: &mut Writer,
) -> Result<(), ConnError> {
    results.retain(|r| sent.insert(r.task));
    for chunk in results.chunks(limits::MESSAGE_BATCH_MAX) {
        writer.write(&WatchEvent::Results(chunk.to_vec())).await?;
    }
    Ok(())
}

/// Forwards what the watcher's queue holds now, without waiting; how the queue ended, if
/// it did (`Some(true)`: Finished, `Some(false)`: dropped for lagging).
pub(super) async fn forward_queued(
    live: &mut WatchSource,
    sent: &mut TaskIdSet,
    writer: &mut Writer,
) -> Result<Option<bool>, ConnError> {
    loop {
        match live.try_recv() {
            Ok(WatchMsg::Results(results)) => write_new_results(results, sent, writer).await?,
            Ok(WatchMsg::Finished) => return Ok(Some(true)),
            Err(mpsc::error::TryRecvError::Empty) => return Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => return Ok(Some(false)),
        }
    }
}

/// Whom the streams a caller opens to nodes count against: its user, or for a job's
/// credential the job's owner.
pub(super) async fn stream_user(shared: &Shared, caller: &Caller) -> Result<String, ConnError> {
    Ok(match caller {
        Caller::User(p) => p.name.clone(),
        Caller::Job(job) => {
            let job = *job;
            ask::<Option<String>>(shared, Request::SessionOwner { session: job })
                .await?
                .unwrap_or_else(|| format!("job {job}"))
        }
    })
}

/// `ClientRequest::Logs`: asks each node involved for its executors' logs on a stream of
/// its own and forwards their frames as they come, several nodes at once; then `End`.
/// A node that is not connected, or whose stream fails, becomes one
/// `LogEvent::Unavailable` and the others go on. When the client goes away the node
/// streams are dropped, which stops them on the nodes.
///
/// The executors are those that served the session when the request arrived; with
/// `follow`, one bound to it later is not added.
pub(super) async fn logs_stream(
    shared: Arc<Shared>,
    user: &str,
    session: SessionId,
    executor: Option<ExecutorId>,
    follow: bool,
    mut writer: Writer,
) -> Result<(), ConnError> {
    let (tx, rx) = oneshot::channel();
    let (later, later_rx) = oneshot::channel();
    shared
        .events
        .send(Inbound::LogTargets {
            session,
            executor,
            reply: tx,
            later,
        })
        .await
        .map_err(|_| ConnError::CoreGone)?;
    let targets: Result<LogTargets, ApiError> = answer(rx).await?;
    // A finished session that left memory: the executors its stored view names.
    let targets = match targets {
        Err(e) if e.kind == ErrorKind::NotFound => {
            match read_store(&shared, move |store| store.finished_session(session)).await? {
                Ok(Some(info)) => crate::core::served_targets(
                    session,
                    info.usage
                        .iter()
                        .map(|u| (u.executor, u.node.as_str()))
                        .collect(),
                    executor,
                )
                .map(LogTargets::Now),
                Ok(None) => Err(e),
                Err(e) => Err(e),
            }
        }
        other => other,
    };
    // One per target node, in order, once granted.
    let mut permits = Vec::new();
    let targets = match targets {
        Ok(LogTargets::Now(targets)) => {
            // Refused whole, before anything is opened, when a node is at the user's bound.
            match shared
                .node_streams
                .acquire_all(user, targets.iter().map(|(node, _)| node.as_str()))
            {
                Ok(all) => permits = all,
                Err(e) => {
                    writer.write(&ClientResponse::Error(e)).await?;
                    let _ = writer.get_mut().finish();
                    return Ok(());
                }
            }
            writer.write(&ClientResponse::Ok).await?;
            targets
        }
        Ok(LogTargets::WhenStarted) => {
            writer.write(&ClientResponse::Ok).await?;
            // As long as the job waits for room, or until the client goes away.
            let answer = tokio::select! {
                answer = later_rx => answer,
                _ = writer.get_mut().stopped() => return Ok(()),
            };
            match answer.map(Result::<NodeExecutors, ApiError>::try_from) {
                Ok(Ok(Ok(targets))) => targets,
                Ok(Err(_)) => return Err(ConnError::UnexpectedAnswer("job log targets")),
                Ok(Ok(Err(e))) => {
                    writer
                        .write(&LogEvent::Unavailable {
                            node: String::new(),
                            reason: e.message,
                        })
                        .await?;
                    Vec::new()
                }
                Err(_) => return Err(ConnError::CoreGone),
            }
        }
        Err(e) => {
            writer.write(&ClientResponse::Error(e)).await?;
            let _ = writer.get_mut().finish();
            return Ok(());
        }
    };
    let (tx, mut rx) = mpsc::channel::<LogEvent>(LOG_EVENTS_BUFFERED_MAX);
    // Dropped on every return: aborts the readers, whose dropped streams stop the nodes.
    let mut readers = JoinSet::new();
    let mut permits = permits.into_iter();
    for (node, executors) in targets {
        // Each reader holds its node's permit until it ends. A node at the user's bound
        // (possible for a job that started meanwhile) is unavailable, saying why.
        let permit = match permits
            .next()
            .map_or_else(|| shared.node_streams.acquire(user, &node), Ok)
        {
            Ok(permit) => permit,
            Err(e) => {
                writer
                    .write(&LogEvent::Unavailable {
                        node,
                        reason: e.message,
                    })
                    .await?;
                continue;
            }
        };
        let conn = shared.node_connection(&node);
        let request = NodeLogRequest {
            session,
            executors,
            follow,
        };
        let tx = tx.clone();
        readers.spawn(async move {
            node_logs(node, conn, request, tx).await;
            drop(permit);
        });
    }
    drop(tx);
    // Until every reader is done, or the other side stops reading; dropping `readers`
    // then stops them.
    flame_protocol::endpoint::relay_log_events(&mut writer, &mut rx).await?;
    Ok(())
}

/// Reads one node's part of a `flame logs` into `tx`; a failure ends as one
/// `LogEvent::Unavailable` naming the node.
pub(super) async fn node_logs(
    node: String,
    conn: Option<quinn::Connection>,
    request: NodeLogRequest,
    tx: mpsc::Sender<LogEvent>,
) {
    let reason = match conn {
        None => "the node is not connected to the head".to_string(),
        Some(conn) => match read_node_logs(&node, &conn, request, &tx).await {
            Ok(()) => return,
            Err(reason) => reason,
        },
    };
    // A closed channel means the client is gone; nobody is left to tell.
    let _ = tx.send(LogEvent::Unavailable { node, reason }).await;
}

/// Opens a log stream to the node, sends the request, and forwards the node's frames until
/// its `End`. `Ok` also when the client went away meanwhile; `Err` says why the node's logs
/// could not be read to their end.
pub(super) async fn read_node_logs(
    node: &str,
    conn: &quinn::Connection,
    request: NodeLogRequest,
    tx: &mpsc::Sender<LogEvent>,
) -> Result<(), String> {
    let asked: HashSet<ExecutorId> = request.executors.iter().copied().collect();
    let follow = request.follow;
    let request = NodeStreamRequest::Logs(request);
    let open = async {
        let (send, recv) = conn.open_bi().await?;
        let mut writer = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
        writer.write(&request).await?;
        Ok::<_, ConnError>((writer, recv))
    };
    let (writer, recv) = match tokio::time::timeout(NODE_LOG_OPEN_TIMEOUT, open).await {
        Err(_) => {
            return Err(format!(
                "the node did not take the log request within {NODE_LOG_OPEN_TIMEOUT:?}"
            ))
        }
        Ok(Err(e)) => return Err(format!("cannot ask the node for logs: {e}")),
        Ok(Ok(opened)) => opened,
    };
    // The request is all the head sends. Dropping `reader` early (the client left) stops
    // the node's side.
    let _ = writer.into_inner().finish();
    let mut reader = FrameReader::new(recv, NODE_LOG_FRAME_BYTES_MAX);
    loop {
        // Following, a log may stay quiet for as long as its executor does.
        let idle = (!follow).then_some(NODE_LOG_SILENCE_MAX);
        let frame = read_bounded::<LogEvent>(&mut reader, idle).await;
        let event = match frame {
            Ok(Some(LogEvent::Chunk {
                executor,
                data,
                stderr,
                ..
            })) => {
                if !asked.contains(&executor) {
                    return Err(format!(
                        "the node sent the log of executor {executor}, which was not asked for"
                    ));
                }
                // Named by the connection it came on, whatever the node put there.
                LogEvent::Chunk {
                    executor,
                    node: node.to_string(),
                    data,
                    stderr,
                }
            }
            Ok(Some(LogEvent::Unavailable { reason, .. })) => LogEvent::Unavailable {
                node: node.to_string(),
                reason,
            },
            Ok(Some(LogEvent::End)) => return Ok(()),
            Ok(None) => return Err("the node ended its log stream early".to_string()),
            Err(ConnError::Timeout("the next frame")) => {
                return Err(format!(
                    "the node sent nothing for {NODE_LOG_SILENCE_MAX:?}"
                ))
            }
            Err(e) => return Err(format!("reading the node's logs failed: {e}")),
        };
        if tx.send(event).await.is_err() {
            return Ok(());
        }
    }
}

/// Longest command line of a `JobExec`, in bytes: within what a node reads as a stream
/// request (1 MiB), with room for the rest of the request.
pub const EXEC_ARGV_BYTES_MAX: usize = 512 * 1024;

/// `ClientRequest::JobExec`: finds the rank of the job on the node (the core), opens a
/// stream to that node with the command, and relays the node's `ExecEvent` frames to the
/// client until the process ends. When the client goes away the node stream is dropped,
/// which kills the process on the node.
pub(super) async fn exec_stream(
    shared: Arc<Shared>,
    user: &str,
    job: SessionId,
    node: String,
    argv: Vec<String>,
    mut writer: Writer,
) -> Result<(), ConnError> {
    let refuse =
        |message: String| ClientResponse::Error(ApiError::new(ErrorKind::InvalidArgument, message));
    let bytes: usize = argv.iter().map(String::len).sum();
    if argv.iter().any(|a| a.contains('\0')) || bytes > EXEC_ARGV_BYTES_MAX {
        writer
            .write(&refuse(format!(
                "the command must be at most {EXEC_ARGV_BYTES_MAX} bytes without NUL bytes"
            )))
            .await?;
        let _ = writer.get_mut().finish();
        return Ok(());
    }
    if argv.is_empty() || argv.len() > flame_protocol::messages::EXEC_ARGS_MAX {
        writer
            .write(&refuse(format!(
                "the command must have 1 to {} arguments",
                flame_protocol::messages::EXEC_ARGS_MAX
            )))
            .await?;
        let _ = writer.get_mut().finish();
        return Ok(());
    }
    let target: Result<ExecutorId, ApiError> = ask(
        &shared,
        Request::ExecTarget {
            job,
            node: node.clone(),
        },
    )
    .await?;
    let executor = match target {
        Ok(executor) => executor,
        Err(e) => {
            writer.write(&ClientResponse::Error(e)).await?;
            let _ = writer.get_mut().finish();
            return Ok(());
        }
    };
    let Some(conn) = shared.node_connection(&node) else {
        writer
            .write(&ClientResponse::Error(ApiError::new(
                ErrorKind::Unavailable,
                format!("node `{node}` is not connected to the head"),
            )))
            .await?;
        let _ = writer.get_mut().finish();
        return Ok(());
    };
    // Held until the process ends or the client leaves (dropped on return).
    let _permit = match shared.node_streams.acquire(user, &node) {
        Ok(permit) => permit,
        Err(e) => {
            writer.write(&ClientResponse::Error(e)).await?;
            let _ = writer.get_mut().finish();
            return Ok(());
        }
    };
    let request = NodeStreamRequest::Exec(NodeExecRequest {
        executor,
        argv,
        env: Vec::new(),
    });
    let open = async {
        let (send, recv) = conn.open_bi().await?;
        let mut node_writer = FrameWriter::new(send, limits::FRAME_BYTES_MAX);
        node_writer.write(&request).await?;
        Ok::<_, ConnError>((node_writer, recv))
    };
    let (node_writer, recv) = match tokio::time::timeout(NODE_LOG_OPEN_TIMEOUT, open).await {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => {
            writer
                .write(&ClientResponse::Error(ApiError::new(
                    ErrorKind::Unavailable,
                    format!("cannot reach node `{node}`: {e}"),
                )))
                .await?;
            let _ = writer.get_mut().finish();
            return Ok(());
        }
        Err(_) => {
            writer
                .write(&ClientResponse::Error(ApiError::new(
                    ErrorKind::Unavailable,
                    format!(
                        "node `{node}` did not take the request within {NODE_LOG_OPEN_TIMEOUT:?}"
                    ),
                )))
                .await?;
            let _ = writer.get_mut().finish();
            return Ok(());
        }
    };
    // Kept open (not finished): the node takes a finished or reset stream as a request to
    // stop; dropped on return.
    let _node_send = node_writer.into_inner();
    writer.write(&ClientResponse::Ok).await?;
    let mut reader = FrameReader::new(recv, limits::FRAME_BYTES_MAX);
    loop {
        let frame = tokio::select! {
            frame = read_bounded::<ExecEvent>(&mut reader, None) => frame,
            _ = writer.get_mut().stopped() => return Ok(()),
        };
        let event = match frame {
            Ok(Some(event)) => event,
            Ok(None) => ExecEvent::Failed {
                reason: format!("node `{node}` ended the stream early"),
            },
            Err(e) => ExecEvent::Failed {
                reason: format!("reading from node `{node}` failed: {e}"),
            },
        };
        let last = matches!(event, ExecEvent::Exited { .. } | ExecEvent::Failed { .. });
        writer.write(&event).await?;
        if last {
            let _ = writer.get_mut().finish();
            return Ok(());
        }
    }
}
