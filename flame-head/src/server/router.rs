//! Where the core's [`Outputs`] go: answers to the tasks that asked (by [`ReplyId`]),
//! frames to node connections, messages to watchers, requests to the store writer. The
//! core holds no channel; this is the only place its outputs meet one, and none of them
//! is ever waited on: a full node queue drops that node's connection, a lagging watcher is
//! dropped (see `watch`), and the store channel has room by construction
//! ([`limits::HEAD_STORE_REQUESTS_MAX`]).

use super::*;
use crate::core::{LinkOutput, Outputs, Reply, ReplyId, Request};
use crate::watch::{WatchSink, Watchers};
use flame_protocol::messages::HeadToNode;

/// What a connection task hands the core loop.
#[derive(Debug)]
pub enum Inbound {
    /// A request, answered on `reply`.
    Ask {
        request: Request,
        reply: oneshot::Sender<Reply>,
    },
    /// `Request::Watch`: `sink` gets the session's results from the answer on, unless the
    /// answer says the session has finished.
    Watch {
        session: SessionId,
        sink: WatchSink,
        reply: oneshot::Sender<Reply>,
    },
    /// `Request::LogTargets`: a job that has not started answers `WhenStarted` on `reply`,
    /// and its targets later on `later`.
    LogTargets {
        session: SessionId,
        executor: Option<ExecutorId>,
        reply: oneshot::Sender<Reply>,
        later: oneshot::Sender<Reply>,
    },
    /// A node registered on a new connection; `link` takes the core's frames to it.
    NodeConnected {
        conn: ConnId,
        address: String,
        registration: NodeRegistration,
        link: NodeLink,
    },
    /// Anything else: node messages and disconnects, the free space.
    Event(Event),
}

/// The core's way to one node connection.
pub struct NodeLink {
    /// Frames for the connection's writer, at most [`limits::HEAD_NODE_LINK_FRAMES_MAX`].
    pub frames: mpsc::Sender<HeadToNode>,
    /// Closes the connection at once: its queue is full.
    pub on_overflow: Box<dyn FnOnce() + Send>,
}

impl std::fmt::Debug for NodeLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeLink")
            .field("frames", &self.frames)
            .finish_non_exhaustive()
    }
}

/// A caller waiting on an answer.
#[derive(Debug)]
struct Waiting {
    reply: oneshot::Sender<Reply>,
    /// A watch request's session and queue, attached once the answer says so.
    sink: Option<(SessionId, WatchSink)>,
    /// A log request's second answer, if the first is `WhenStarted`.
    later: Option<oneshot::Sender<Reply>>,
}

/// The server's side of the core's outputs.
#[derive(Debug)]
pub struct Router {
    next_reply: u64,
    waiting: HashMap<ReplyId, Waiting>,
    /// Log requests answered `WhenStarted`, waiting for the job to start.
    later: HashMap<ReplyId, oneshot::Sender<Reply>>,
    links: HashMap<ConnId, NodeLink>,
    watchers: Watchers,
    store: mpsc::Sender<StoreRequest>,
    /// Commits the writer cannot report, because it has stopped: the loop feeds them to
    /// the core first, as failed.
    unsent_commits: std::collections::VecDeque<Event>,
}

impl Router {
    /// A router whose store requests go to `store` (a channel of
    /// [`limits::HEAD_STORE_REQUESTS_MAX`]).
    pub fn new(store: mpsc::Sender<StoreRequest>) -> Router {
        Router {
            next_reply: 1,
            waiting: HashMap::new(),
            later: HashMap::new(),
            links: HashMap::new(),
            watchers: Watchers::default(),
            store,
            unsent_commits: Default::default(),
        }
    }

    /// Turns what a connection task sent into core events (at most two: callers gone
    /// first), keeping what the answers need.
    pub fn take(&mut self, inbound: Inbound, events: &mut Vec<Event>) {
        let (request, waiting) = match inbound {
            Inbound::Ask { request, reply } => (
                request,
                Waiting {
                    reply,
                    sink: None,
                    later: None,
                },
            ),
            Inbound::Watch {
                session,
                sink,
                reply,
            } => (
                Request::Watch { session },
                Waiting {
                    reply,
                    sink: Some((session, sink)),
                    later: None,
                },
            ),
            Inbound::LogTargets {
                session,
                executor,
                reply,
                later,
            } => {
                // Waiters whose client went away are forgotten as a new one comes, so
                // their number stays that of the clients still waiting.
                let gone: Vec<ReplyId> = self
                    .later
                    .iter()
                    .filter(|(_, tx)| tx.is_closed())
                    .map(|(id, _)| *id)
                    .collect();
                if !gone.is_empty() {
                    for id in &gone {
                        self.later.remove(id);
                    }
                    events.push(Event::CallersGone { replies: gone });
                }
                (
                    Request::LogTargets { session, executor },
                    Waiting {
                        reply,
                        sink: None,
                        later: Some(later),
                    },
                )
            }
            Inbound::NodeConnected {
                conn,
                address,
                registration,
                link,
            } => {
                self.links.insert(conn, link);
                events.push(Event::NodeConnected {
                    conn,
                    address,
                    registration,
                });
                return;
            }
            Inbound::Event(event) => {
                if let Event::NodeDisconnected { conn, .. } = &event {
                    // Its writer is gone; the core lets go of it too (or already had).
                    self.links.remove(conn);
                }
                events.push(event);
                return;
            }
        };
        let reply = ReplyId(self.next_reply);
        self.next_reply += 1;
        self.waiting.insert(reply, waiting);
        events.push(Event::Request { reply, request });
    }

    /// A commit report the core must see before anything else, if any.
    pub fn unsent_commit(&mut self) -> Option<Event> {
        self.unsent_commits.pop_front()
    }

    /// Routes everything in `out`, leaving it empty.
    pub fn route(&mut self, out: &mut Outputs) {
        if out.is_empty() {
            return;
        }
        for (id, reply) in out.replies.drain(..) {
            self.answer(id, reply);
        }
        for id in out.unanswered.drain(..) {
            // Dropped: the caller learns the core will not answer.
            self.waiting.remove(&id);
            self.later.remove(&id);
        }
        for (session, msg) in out.watch.drain(..) {
            self.watchers.route(session, msg);
        }
        for (conn, output) in out.links.drain(..) {
            match output {
                LinkOutput::Send(frame) => self.send(conn, frame),
                // Dropping the sender ends the writer once it has written what is queued,
                // and it closes the connection.
                LinkOutput::Close => drop(self.links.remove(&conn)),
            }
        }
        for request in out.store.drain(..) {
            if let Err(e) = self.store.try_send(request) {
                let (request, why) = match e {
                    mpsc::error::TrySendError::Closed(r) => (r, "it has stopped"),
                    // The core keeps at most the channel's size in flight.
                    mpsc::error::TrySendError::Full(r) => (r, "its queue is full (a bug)"),
                };
                tracing::error!(
                    token = request.token,
                    "cannot reach the store writer: {why}"
                );
                self.unsent_commits.push_back(Event::Committed {
                    tokens: vec![request.token],
                    result: Err(crate::storage_fault::CommitError::WriterStopped),
                });
            }
        }
    }

    fn answer(&mut self, id: ReplyId, reply: Reply) {
        if let Reply::JobLogTargets(_) = reply {
            if let Some(later) = self.later.remove(&id) {
                let _ = later.send(reply);
            }
            return;
        }
        let Some(waiting) = self.waiting.remove(&id) else {
            return;
        };
        match &reply {
            Reply::LogTargets(Ok(crate::core::LogTargets::WhenStarted)) => {
                if let Some(later) = waiting.later {
                    self.later.insert(id, later);
                }
            }
            Reply::Watch(Ok(start)) if !start.finished => {
                if let Some((session, sink)) = waiting.sink {
                    self.watchers.attach(session, sink);
                }
            }
            _ => {}
        }
        // A caller that gave up (its request timed out) is gone; nothing to do.
        let _ = waiting.reply.send(reply);
    }

    /// Queues a frame for a node connection; a connection whose queue is full is closed:
    /// the core must never wait on a slow node, and the node registers again on a new
    /// connection, where its executors are adopted.
    fn send(&mut self, conn: ConnId, frame: HeadToNode) {
        let Some(link) = self.links.get(&conn) else {
            return; // gone: its disconnect reaches the core
        };
        match link.frames.try_send(frame) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(
                    conn,
                    frames = limits::HEAD_NODE_LINK_FRAMES_MAX,
                    "a node does not keep up with the head's frames; dropping its connection"
                );
                if let Some(link) = self.links.remove(&conn) {
                    (link.on_overflow)();
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.links.remove(&conn);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{Backfill, LogTargets, WatchStart};
    use std::sync::atomic::AtomicBool;

    fn router() -> (Router, mpsc::Receiver<StoreRequest>) {
        let (tx, rx) = mpsc::channel(2);
        (Router::new(tx), rx)
    }

    fn ask(router: &mut Router, inbound: Inbound) -> ReplyId {
        let mut events = Vec::new();
        router.take(inbound, &mut events);
        match events.pop() {
            Some(Event::Request { reply, .. }) => reply,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    #[test]
    fn a_node_that_does_not_keep_up_loses_its_connection_and_nothing_waits() {
        let (mut router, _store) = router();
        let (frames, mut rx) = mpsc::channel(limits::HEAD_NODE_LINK_FRAMES_MAX);
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        let mut events = Vec::new();
        router.take(
            Inbound::NodeConnected {
                conn: 7,
                address: "127.0.0.1".into(),
                registration: NodeRegistration {
                    name: "n1".into(),
                    allocatable: Default::default(),
                    labels: Default::default(),
                    isolation: flame_protocol::model::Isolation::None,
                    identity: flame_protocol::model::ExecutorIdentity::OwnerUid,
                    executors: Vec::new(),
                    objects: None,
                },
                link: NodeLink {
                    frames,
                    on_overflow: Box::new(move || flag.store(true, Ordering::SeqCst)),
                },
            },
            &mut events,
        );
        assert!(matches!(events[..], [Event::NodeConnected { conn: 7, .. }]));
        let mut out = Outputs::default();
        for _ in 0..=limits::HEAD_NODE_LINK_FRAMES_MAX {
            out.links.push((7, LinkOutput::Send(HeadToNode::Heartbeat)));
        }
        router.route(&mut out);
        assert!(
            closed.load(Ordering::SeqCst),
            "a full queue closes the connection"
        );
        // What was queued before stays; later frames for that connection go nowhere.
        out.links.push((7, LinkOutput::Send(HeadToNode::Heartbeat)));
        router.route(&mut out);
        let mut queued = 0;
        while rx.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, limits::HEAD_NODE_LINK_FRAMES_MAX);
    }

    #[test]
    fn answers_reach_their_callers_and_watchers_attach_with_theirs() {
        let (mut router, _store) = router();
        let (tx, mut rx) = oneshot::channel();
        let id = ask(
            &mut router,
            Inbound::Ask {
                request: Request::SessionOwner {
                    session: SessionId(1),
                },
                reply: tx,
            },
        );
        let (dropped_tx, mut dropped_rx) = oneshot::channel();
        let dropped = ask(
            &mut router,
            Inbound::Ask {
                request: Request::SessionOwner {
                    session: SessionId(2),
                },
                reply: dropped_tx,
            },
        );
        let (sink, mut source) = crate::watch::watch_queue();
        let (watch_tx, mut watch_rx) = oneshot::channel();
        let watch = ask(
            &mut router,
            Inbound::Watch {
                session: SessionId(3),
                sink,
                reply: watch_tx,
            },
        );
        let mut out = Outputs::default();
        out.replies
            .push((id, Reply::SessionOwner(Some("alice".into()))));
        out.unanswered.push(dropped);
        out.replies.push((
            watch,
            Reply::Watch(Ok(WatchStart {
                backfill: Backfill::Store,
                finished: false,
            })),
        ));
        out.watch.push((SessionId(3), WatchMsg::Finished));
        router.route(&mut out);
        assert!(matches!(rx.try_recv(), Ok(Reply::SessionOwner(Some(o))) if o == "alice"));
        assert!(matches!(
            dropped_rx.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(matches!(watch_rx.try_recv(), Ok(Reply::Watch(Ok(_)))));
        assert!(matches!(source.try_recv(), Ok(WatchMsg::Finished)));

        // A log request for a job not started: `WhenStarted` now, the targets later; a
        // waiter whose client left is forgotten when the next one comes.
        let (tx, _rx) = oneshot::channel();
        let (later, later_rx) = oneshot::channel();
        let first = ask(
            &mut router,
            Inbound::LogTargets {
                session: SessionId(4),
                executor: None,
                reply: tx,
                later,
            },
        );
        out.replies
            .push((first, Reply::LogTargets(Ok(LogTargets::WhenStarted))));
        router.route(&mut out);
        drop(later_rx);
        let (tx, _rx) = oneshot::channel();
        let (later, mut later_rx) = oneshot::channel();
        let mut events = Vec::new();
        router.take(
            Inbound::LogTargets {
                session: SessionId(4),
                executor: None,
                reply: tx,
                later,
            },
            &mut events,
        );
        assert!(
            matches!(&events[..], [Event::CallersGone { replies }, Event::Request { .. }] if replies == &[first])
        );
        let Some(Event::Request { reply: second, .. }) = events.pop() else {
            unreachable!()
        };
        out.replies
            .push((second, Reply::LogTargets(Ok(LogTargets::WhenStarted))));
        out.replies
            .push((second, Reply::JobLogTargets(Ok(Vec::new()))));
        router.route(&mut out);
        assert!(matches!(
            later_rx.try_recv(),
            Ok(Reply::JobLogTargets(Ok(_)))
        ));
    }

    #[test]
    fn a_store_request_the_writer_cannot_take_fails_its_commit() {
        let (mut router, store) = router();
        drop(store);
        let mut out = Outputs::default();
        out.store.push(StoreRequest {
            ops: Vec::new(),
            token: 9,
        });
        router.route(&mut out);
        assert!(matches!(
            router.unsent_commit(),
            Some(Event::Committed { tokens, result: Err(_) }) if tokens == [9]
        ));
        assert!(router.unsent_commit().is_none());
    }
}
