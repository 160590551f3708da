//! The bounded queues between the core and the watch streams.
//!
//! The core says which results of a session became final (`Outputs::watch`); the server
//! holds each session's watchers ([`Watchers`]) and offers them each message, and each
//! watch stream writes them to its client as fast as the client reads. A client that
//! stops reading must not make the head queue without end, so each watcher's queue is
//! bounded in messages and in bytes. Nothing waits on it: a push that does not fit drops
//! the watcher ([`WatchSink::offer`] says so), the stream then ends its queue without
//! `Finished`, and the server tells the client `WatchEvent::Lagged`. The client watches
//! again and gets everything from the store (see `flame_client::ResultStream`).

use crate::core::WatchMsg;
use flame_protocol::model::{TaskOutcome, TaskResult};
use flame_protocol::SessionId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

pub use flame_protocol::limits::WATCH_QUEUE_MESSAGES_MAX;
/// Bytes of results (outputs and messages) queued for one watcher before it counts as
/// lagging; a single message larger than this still goes through an empty queue.
pub const WATCH_QUEUE_BYTES_MAX: usize = 1024 * 1024;

/// The head's end of a watcher's queue.
#[derive(Debug, Clone)]
pub struct WatchSink {
    tx: mpsc::Sender<WatchMsg>,
    queued_bytes: Arc<AtomicUsize>,
}

/// The watch stream's end of the queue.
#[derive(Debug)]
pub struct WatchSource {
    rx: mpsc::Receiver<WatchMsg>,
    queued_bytes: Arc<AtomicUsize>,
}

/// A new bounded watcher queue.
pub fn watch_queue() -> (WatchSink, WatchSource) {
    let (tx, rx) = mpsc::channel(WATCH_QUEUE_MESSAGES_MAX);
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    (
        WatchSink {
            tx,
            queued_bytes: queued_bytes.clone(),
        },
        WatchSource { rx, queued_bytes },
    )
}

fn result_bytes(r: &TaskResult) -> usize {
    // The entry itself, plus what its outcome carries.
    std::mem::size_of::<TaskResult>()
        + match &r.outcome {
            TaskOutcome::Succeeded(b) => b.len(),
            TaskOutcome::Failed(m) => m.len(),
            TaskOutcome::Cancelled => 0,
            TaskOutcome::Object(_) => 0,
        }
}

fn message_bytes(msg: &WatchMsg) -> usize {
    match msg {
        WatchMsg::Results(results) => results.iter().map(result_bytes).sum(),
        WatchMsg::Finished => 0,
    }
}

impl WatchSink {
    /// Queues `msg`; false when the watcher is gone or lagging (its queue is full in
    /// messages, or holds more than [`WATCH_QUEUE_BYTES_MAX`]): the caller drops the sink,
    /// which ends the watch.
    pub fn offer(&self, msg: WatchMsg) -> bool {
        let bytes = message_bytes(&msg);
        let queued = self.queued_bytes.load(Ordering::Relaxed);
        if queued > 0 && queued.saturating_add(bytes) > WATCH_QUEUE_BYTES_MAX {
            return false;
        }
        self.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        if self.tx.try_send(msg).is_err() {
            self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        true
    }
}

/// Each session's watchers, as the server holds them for the core: attached with their
/// watch answer, sent the session's messages in order, let go after `Finished`.
#[derive(Debug, Default)]
pub struct Watchers {
    by_session: HashMap<SessionId, Vec<WatchSink>>,
}

impl Watchers {
    /// `sink` gets `session`'s messages from now on.
    pub fn attach(&mut self, session: SessionId, sink: WatchSink) {
        self.by_session.entry(session).or_default().push(sink);
    }

    /// Offers `msg` to `session`'s watchers; a watcher that cannot take it lags and is
    /// dropped. After `Finished` the session has none left.
    pub fn route(&mut self, session: SessionId, msg: WatchMsg) {
        match msg {
            WatchMsg::Results(results) => {
                let Some(sinks) = self.by_session.get_mut(&session) else {
                    return;
                };
                sinks.retain(|w| w.offer(WatchMsg::Results(results.clone())));
            }
            WatchMsg::Finished => {
                for w in self.by_session.remove(&session).unwrap_or_default() {
                    // A watcher that cannot take it lags, and learns the end from the store.
                    w.offer(WatchMsg::Finished);
                }
            }
        }
    }
}

impl WatchSource {
    /// The next message; `None` once the head dropped the sink (finished after
    /// `Finished`, or lagging without it).
    pub async fn recv(&mut self) -> Option<WatchMsg> {
        let msg = self.rx.recv().await?;
        self.taken(&msg);
        Some(msg)
    }

    /// [`WatchSource::recv`] without waiting.
    pub fn try_recv(&mut self) -> Result<WatchMsg, mpsc::error::TryRecvError> {
        let msg = self.rx.try_recv()?;
        self.taken(&msg);
        Ok(msg)
    }

    fn taken(&self, msg: &WatchMsg) {
        self.queued_bytes
            .fetch_sub(message_bytes(msg), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use flame_protocol::TaskId;

    fn results(n: usize, bytes: usize) -> WatchMsg {
        WatchMsg::Results(
            (1..=n as u64)
                .map(|t| TaskResult {
                    task: TaskId(t),
                    attempt: 1,
                    outcome: TaskOutcome::Succeeded(Bytes::from(vec![0u8; bytes])),
                })
                .collect(),
        )
    }

    #[test]
    fn a_reader_that_stops_is_dropped_at_the_bound_and_one_that_reads_is_not() {
        let (sink, mut source) = watch_queue();
        let mut offered = 0;
        while sink.offer(results(1, 10)) {
            offered += 1;
            assert!(
                offered <= WATCH_QUEUE_MESSAGES_MAX,
                "the queue has no bound"
            );
        }
        assert_eq!(offered, WATCH_QUEUE_MESSAGES_MAX);
        // Reading makes room again.
        assert!(source.try_recv().is_ok());
        assert!(sink.offer(results(1, 10)));

        let (sink, mut source) = watch_queue();
        // One message larger than the byte bound goes through an empty queue ...
        assert!(sink.offer(results(1, WATCH_QUEUE_BYTES_MAX * 2)));
        // ... but nothing more until it is read.
        assert!(!sink.offer(results(1, 10)));
        assert!(matches!(source.try_recv(), Ok(WatchMsg::Results(_))));
        assert!(sink.offer(results(1, 10)));
        // A sink whose stream went away says so.
        drop(source);
        assert!(!sink.offer(WatchMsg::Finished));
    }
}
