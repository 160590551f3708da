//! The core's unit tests: each drives a [`Core`] with events and reads its [`Outputs`].

use super::*;
use flame_protocol::model::ShimKind;

/// A core and what it produced, read from its [`Outputs`] as the server would route them:
/// answers by id, frames per connection, store requests in order, and watchers attached
/// with their answer. Derefs to the core for everything else.
struct Driver {
    core: Core,
    next_reply: u64,
    answers: HashMap<ReplyId, Reply>,
    unanswered: Vec<ReplyId>,
    frames: BTreeMap<ConnId, VecDeque<HeadToNode>>,
    closed: Vec<ConnId>,
    store: VecDeque<StoreRequest>,
    watchers: crate::watch::Watchers,
    sinks: HashMap<ReplyId, (SessionId, crate::watch::WatchSink)>,
}

impl std::ops::Deref for Driver {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

impl std::ops::DerefMut for Driver {
    fn deref_mut(&mut self) -> &mut Core {
        &mut self.core
    }
}

impl Driver {
    fn new(core: Core) -> Driver {
        Driver {
            core,
            next_reply: 1,
            answers: HashMap::new(),
            unanswered: Vec::new(),
            frames: BTreeMap::new(),
            closed: Vec::new(),
            store: VecDeque::new(),
            watchers: Default::default(),
            sinks: HashMap::new(),
        }
    }

    /// Hands the core `request`; its answer is read with [`Driver::answer`].
    fn request(&mut self, request: Request, now: u64) -> ReplyId {
        let reply = ReplyId(self.next_reply);
        self.next_reply += 1;
        self.core.handle(Event::Request { reply, request }, now);
        reply
    }

    /// Watches `session`: the queue gets its messages once the answer attaches it.
    fn watch(&mut self, session: SessionId, now: u64) -> (ReplyId, crate::watch::WatchSource) {
        let (sink, source) = crate::watch::watch_queue();
        let reply = ReplyId(self.next_reply);
        self.sinks.insert(reply, (session, sink));
        (self.request(Request::Watch { session }, now), source)
    }

    /// Routes what the core produced so far.
    fn absorb(&mut self) {
        let out = self.core.take_outputs();
        for (id, reply) in out.replies {
            if let Reply::Watch(Ok(start)) = &reply {
                if let Some((session, sink)) = self.sinks.remove(&id) {
                    if !start.finished {
                        self.watchers.attach(session, sink);
                    }
                }
            }
            self.answers.insert(id, reply);
        }
        self.unanswered.extend(out.unanswered);
        for (session, msg) in out.watch {
            self.watchers.route(session, msg);
        }
        for (conn, link) in out.links {
            match link {
                LinkOutput::Send(frame) => self.frames.entry(conn).or_default().push_back(frame),
                LinkOutput::Close => self.closed.push(conn),
            }
        }
        self.store.extend(out.store);
    }

    /// The next message on a watcher's queue, with everything the core produced routed.
    fn watched(
        &mut self,
        source: &mut crate::watch::WatchSource,
    ) -> Result<WatchMsg, tokio::sync::mpsc::error::TryRecvError> {
        self.absorb();
        source.try_recv()
    }

    /// The answer to `reply` whatever its kind, if it came (taken).
    fn reply_to(&mut self, reply: ReplyId) -> Option<Reply> {
        self.absorb();
        self.answers.remove(&reply)
    }

    /// The answer to `reply`, if it came (taken).
    fn answer<T: TryFrom<Reply, Error = Reply>>(&mut self, reply: ReplyId) -> Option<T> {
        self.absorb();
        let answer = self.answers.remove(&reply)?;
        match T::try_from(answer) {
            Ok(answer) => Some(answer),
            Err(other) => panic!("an answer of another kind: {other:?}"),
        }
    }

    /// Frames sent to `conn` since last asked.
    fn frames(&mut self, conn: ConnId) -> Vec<HeadToNode> {
        self.absorb();
        self.frames
            .get_mut(&conn)
            .map(|q| q.drain(..).collect())
            .unwrap_or_default()
    }

    /// The next store request, in order.
    fn next_store_request(&mut self) -> Option<StoreRequest> {
        self.absorb();
        self.store.pop_front()
    }

    /// Reports `req` committed with `result`.
    fn commit(&mut self, req: &StoreRequest, result: Result<(), CommitError>, now: u64) {
        self.core.handle(
            Event::Committed {
                tokens: vec![req.token],
                result,
            },
            now,
        );
    }

    /// Ends the core's batch and makes every store request durable, as the writer would.
    fn settle(&mut self, now: u64) {
        self.settle_ops(now);
    }

    /// [`Driver::settle`], returning every op committed.
    fn settle_ops(&mut self, now: u64) -> Vec<StoreOp> {
        let mut ops = Vec::new();
        self.core.end_batch(now);
        while let Some(req) = self.next_store_request() {
            self.commit(&req, Ok(()), now);
            ops.extend(req.ops);
            self.core.end_batch(now);
        }
        ops
    }
}

struct Harness {
    core: Driver,
    now: u64,
    /// Node `n1`'s connection, whose commands [`Harness::commands`] reads.
    conn: ConnId,
}

impl Harness {
    fn new() -> Harness {
        Harness::with_config(CoreConfig::default())
    }

    fn with_config(config: CoreConfig) -> Harness {
        let mut core = Driver::new(Core::new(config, Default::default()));
        core.ensure_application(ApplicationSpec {
            name: "ping".into(),
            shim: ShimKind::Stdio,
            command: "flame-ping".into(),
            args: vec![],
            env: Default::default(),
            working_dir: None,
            user: None,
            group: None,
            users: Vec::new(),
            groups: Vec::new(),
            resources: Default::default(),
            selector: Default::default(),
            max_instances: 10,
            delay_release_ms: 1000,
            max_attempts: 3,
            retry_on_error: false,
            task_timeout_ms: None,
            allow_root: false,
        });
        core.handle(
            Event::NodeConnected {
                address: "127.0.0.1".into(),
                conn: 1,
                registration: NodeRegistration {
                    name: "n1".into(),
                    allocatable: flame_protocol::model::NodeResources {
                        cpu_millis: 1000,
                        memory_bytes: 1 << 30,
                        gpus: Vec::new(),
                    },
                    labels: Default::default(),
                    isolation: flame_protocol::model::Isolation::None,
                    identity: flame_protocol::model::ExecutorIdentity::OwnerUid,
                    executors: vec![],
                },
            },
            0,
        );
        let mut h = Harness {
            core,
            now: 0,
            conn: 1,
        };
        h.step();
        h
    }

    /// Ends the batch and makes every store request durable, as the writer would.
    fn step(&mut self) {
        self.core.settle(self.now);
    }

    /// The commands node `n1` got on its connection since last asked.
    fn commands(&mut self) -> Vec<NodeCommand> {
        commands_in(self.core.frames(self.conn))
    }

    fn client(&mut self, request: ClientRequest) -> ClientResponse {
        let reply = self.core.request(Request::Client(request), self.now);
        self.step();
        self.core.answer(reply).expect("a response")
    }

    fn node(&mut self, message: NodeToHead) {
        self.core
            .handle(Event::NodeMessage { conn: 1, message }, self.now);
        self.step();
    }
}

/// A commit failure, as the writer reports a full disk.
fn injected_failure() -> CommitError {
    CommitError::Faulted(crate::storage_fault::StorageFault {
        kind: crate::storage_fault::FaultKind::DiskFull,
        detail: "injected".into(),
        data_dir: "/var/lib/flame".into(),
    })
}

/// The commands in `frames`.
fn commands_in(frames: Vec<HeadToNode>) -> Vec<NodeCommand> {
    let mut out = Vec::new();
    for frame in frames {
        if let HeadToNode::Commands(c) = frame {
            out.extend(c);
        }
    }
    out
}

#[test]
fn executors_are_launched_per_owner_with_a_durable_uid_and_apps_admit_their_users() {
    let mut h = Harness::with_config(CoreConfig {
        owner_uid_range: crate::owner_uids::UidRange::new(70_000, 70_009).unwrap(),
        groups: BTreeMap::from([("lab".to_string(), vec!["carol".to_string()])]),
        ..CoreConfig::default()
    });
    let restricted = ApplicationSpec {
        users: vec!["alice".into()],
        groups: vec!["lab".into()],
        ..ApplicationSpec::new("lab-only", "flame-ping")
    };
    assert!(matches!(
        h.client(ClientRequest::RegisterApplication(restricted)),
        ClientResponse::Application(_)
    ));
    let open_as = |h: &mut Harness, owner: &str, app: &str| {
        h.client(ClientRequest::CreateSession(SessionSpec {
            owner: owner.into(),
            ..SessionSpec::new(app)
        }))
    };
    match open_as(&mut h, "bob", "lab-only") {
        ClientResponse::Error(e) => {
            assert_eq!(e.kind, ErrorKind::PermissionDenied);
            assert!(
                e.message
                    .contains("user `bob` may not use application `lab-only`")
                    && e.message.contains("users alice and groups lab"),
                "{e}"
            );
        }
        other => panic!("bob was let in: {other:?}"),
    }
    session_id(open_as(&mut h, "alice", "lab-only"));
    session_id(open_as(&mut h, "carol", "lab-only"));

    // A session of a new owner: its uid is written before its executor is launched.
    let sid = session_id(open_as(&mut h, "dave", "ping"));
    let _rx = h.core.request(
        Request::Submit {
            session: sid,
            batch_id: 1,
            inputs: vec![Bytes::from_static(b"x")],
        },
        h.now,
    );
    h.core.end_batch(h.now);
    let mut uid_written = false;
    let mut launched = None;
    while let Some(req) = h.core.next_store_request() {
        if req
            .ops
            .iter()
            .any(|op| matches!(op, StoreOp::PutOwnerUid { owner, .. } if owner == "dave"))
        {
            uid_written = true;
            assert!(
                h.commands().is_empty(),
                "launched before the uid was durable"
            );
        }
        h.core.handle(
            Event::Committed {
                tokens: vec![req.token],
                result: Ok(()),
            },
            h.now,
        );
        h.core.end_batch(h.now);
        for c in h.commands() {
            if let NodeCommand::Launch { owner, .. } = c {
                launched = Some(owner);
            }
        }
    }
    assert!(uid_written);
    let owner = launched.expect("no launch for dave");
    assert_eq!(owner.name, "dave");
    assert!((70_000..=70_009).contains(&owner.uid), "{owner:?}");
}

fn session_id(r: ClientResponse) -> SessionId {
    match r {
        ClientResponse::Session(info) => info.id,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn gpus_selectors_secrets_usage_and_updates() {
    use flame_protocol::model::{EnvValue, GpuInfo, NodeResources, Resources};
    let mut h = Harness::new();
    let mut spec = ApplicationSpec::new("train", "/bin/train");
    spec.resources = Resources {
        cpu_millis: 500,
        memory_bytes: Some(1 << 20 << 4),
        gpus: 1,
    };
    spec.selector.insert("kind".into(), "gpu".into());
    spec.env.insert(
        "TOKEN".into(),
        EnvValue {
            value: "s3cret".into(),
            secret: true,
        },
    );
    assert!(matches!(
        h.client(ClientRequest::RegisterApplication(spec.clone())),
        ClientResponse::Application(_)
    ));
    // Clients never see a secret value.
    match h.client(ClientRequest::GetApplication {
        name: "train".into(),
    }) {
        ClientResponse::Application(info) => {
            assert_eq!(info.spec.env["TOKEN"].value, "");
            assert!(info.spec.env["TOKEN"].secret);
        }
        other => panic!("unexpected {other:?}"),
    }
    let sid = session_id(h.client(ClientRequest::CreateSession(SessionSpec::new("train"))));
    let _ack = h.core.request(
        Request::Submit {
            session: sid,
            batch_id: 1,
            inputs: vec![Bytes::from_static(b"a"); 3],
        },
        0,
    );
    h.step();
    // n1 has no gpu and no label: nothing launches, and the session says why.
    assert!(h.commands().is_empty());
    match h.client(ClientRequest::GetSession { id: sid }) {
        ClientResponse::Session(info) => {
            let why = info.waiting.unwrap_or_default();
            assert!(why.contains("kind=gpu"), "{why}");
        }
        other => panic!("unexpected {other:?}"),
    }
    // A labelled node with two GPUs: two executors, each with its own GPU index.
    h.core.handle(
        Event::NodeConnected {
            address: "127.0.0.1".into(),
            conn: 2,
            registration: NodeRegistration {
                name: "g1".into(),
                allocatable: NodeResources {
                    cpu_millis: 8000,
                    memory_bytes: 1 << 34,
                    gpus: (0..2)
                        .map(|index| GpuInfo {
                            index,
                            name: "H200".into(),
                            uuid: format!("GPU-{index}"),
                            memory_bytes: 1 << 37,
                        })
                        .collect(),
                },
                labels: [("kind".to_string(), "gpu".to_string())].into(),
                isolation: flame_protocol::model::Isolation::CgroupV2,
                identity: flame_protocol::model::ExecutorIdentity::OwnerUid,
                executors: vec![],
            },
        },
        0,
    );
    h.step();
    let mut launched = Vec::new();
    for c in commands_in(h.core.frames(2)) {
        if let NodeCommand::Launch { executor, gpus, .. } = c {
            launched.push((executor, gpus));
        }
    }
    let mut gpus: Vec<Vec<u32>> = launched.iter().map(|(_, g)| g.clone()).collect();
    gpus.sort();
    assert_eq!(gpus, vec![vec![0], vec![1]]);
    match h.client(ClientRequest::ListNodes) {
        ClientResponse::Nodes(nodes) => {
            let g1 = nodes.iter().find(|n| n.name == "g1").unwrap();
            assert_eq!(g1.allocated.gpus, 2);
            assert_eq!(g1.allocated.cpu_millis, 1000);
            assert_eq!(g1.allocated.memory_bytes, Some(2 << 24));
        }
        other => panic!("unexpected {other:?}"),
    }
    // Usage reported at unbind is kept per executor of the session.
    let (e1, _) = launched[0].clone();
    h.core.handle(
        Event::NodeMessage {
            conn: 2,
            message: NodeToHead::ExecutorEvents(vec![
                ExecutorEvent::Ready {
                    executor: e1,
                    credit: 1,
                },
                ExecutorEvent::Bound {
                    executor: e1,
                    session: sid,
                },
            ]),
        },
        0,
    );
    h.step();
    h.core.handle(
        Event::NodeMessage {
            conn: 2,
            message: NodeToHead::ExecutorEvents(vec![ExecutorEvent::Exited {
                executor: e1,
                reason: "out of memory: killed".into(),
                usage: Usage {
                    bound_ms: 2000,
                    cpu_ms: 1500,
                    memory_peak_bytes: 1 << 24,
                    throttled_ms: 20,
                },
            }]),
        },
        0,
    );
    h.step();
    match h.client(ClientRequest::GetSession { id: sid }) {
        ClientResponse::Session(info) => {
            assert_eq!(info.usage.len(), 1);
            assert_eq!(info.usage[0].executor, e1);
            assert_eq!(info.usage[0].node, "g1");
            assert_eq!(info.usage[0].cpu_ms, 1500);
            assert!(info.usage[0]
                .ended
                .as_deref()
                .unwrap_or_default()
                .contains("out of memory"));
        }
        other => panic!("unexpected {other:?}"),
    }
    // An update of an unknown application is refused; of a known one, accepted.
    let mut other = spec.clone();
    other.name = "nope".into();
    assert!(matches!(
        h.client(ClientRequest::UpdateApplication(other)),
        ClientResponse::Error(ApiError {
            kind: ErrorKind::NotFound,
            ..
        })
    ));
    let mut bad = spec.clone();
    bad.resources.cpu_millis = 1;
    match h.client(ClientRequest::UpdateApplication(bad)) {
        ClientResponse::Error(e) => assert!(e.message.contains("resources.cpus"), "{e:?}"),
        other => panic!("unexpected {other:?}"),
    }
    spec.max_instances = 1;
    assert!(matches!(
        h.client(ClientRequest::UpdateApplication(spec)),
        ClientResponse::Application(info) if info.spec.max_instances == 1
    ));
}

#[test]
fn task_runs_end_to_end_and_watcher_sees_it_once() {
    let mut h = Harness::new();
    let sid = session_id(h.client(ClientRequest::CreateSession(SessionSpec::new("ping"))));
    let (_, mut watch) = h.core.watch(sid, 0);
    let ack = h.core.request(
        Request::Submit {
            session: sid,
            batch_id: 9,
            inputs: vec![Bytes::from_static(b"x")],
        },
        0,
    );
    h.core.end_batch(0);
    // Not acked before the commit.
    assert!(h.core.answer::<SubmitReply>(ack).is_none());
    h.step();
    assert!(matches!(
        h.core.answer(ack),
        Some(SubmitReply::Accepted {
            batch_id: 9,
            count: 1,
            ..
        })
    ));
    let launch = h.commands();
    let executor = match &launch[..] {
        [NodeCommand::Launch { executor, .. }] => *executor,
        other => panic!("expected one launch, got {other:?}"),
    };
    h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Ready {
        executor,
        credit: 2,
    }]));
    let cmds = h.commands();
    assert!(matches!(cmds[0], NodeCommand::Bind { .. }), "{cmds:?}");
    let NodeCommand::Run(a) = &cmds[1] else {
        panic!("expected a run, got {cmds:?}")
    };
    // A result from a stale attempt is fenced off.
    h.node(NodeToHead::Results(vec![NodeTaskResult {
        exit_code: None,
        executor,
        session: sid,
        task: a.task,
        attempt: a.attempt + 1,
        outcome: TaskOutcome::Succeeded(Bytes::from_static(b"stale")),
    }]));
    assert!(h.core.watched(&mut watch).is_err());
    h.node(NodeToHead::Results(vec![NodeTaskResult {
        exit_code: None,
        executor,
        session: sid,
        task: a.task,
        attempt: a.attempt,
        outcome: TaskOutcome::Succeeded(Bytes::from_static(b"ok")),
    }]));
    match h.core.watched(&mut watch) {
        Ok(WatchMsg::Results(r)) => {
            assert_eq!(r.len(), 1);
            assert_eq!(
                r[0].outcome,
                TaskOutcome::Succeeded(Bytes::from_static(b"ok"))
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    // A duplicate of the accepted result changes nothing.
    h.node(NodeToHead::Results(vec![NodeTaskResult {
        exit_code: None,
        executor,
        session: sid,
        task: a.task,
        attempt: a.attempt,
        outcome: TaskOutcome::Succeeded(Bytes::from_static(b"again")),
    }]));
    assert!(h.core.watched(&mut watch).is_err());
    assert!(matches!(
        h.client(ClientRequest::CloseSession { id: sid }),
        ClientResponse::Ok
    ));
    assert!(matches!(h.core.watched(&mut watch), Ok(WatchMsg::Finished)));
    match h.client(ClientRequest::GetSession { id: sid }) {
        ClientResponse::Session(info) => {
            assert!(info.is_finished());
            assert_eq!(info.counts.succeeded, 1);
            assert_eq!(info.counts.total(), 1);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn lost_node_requeues_running_tasks() {
    let mut h = Harness::new();
    let sid = session_with_a_task(&mut h, 0, 1);
    launched_and_ready(&mut h);
    assert_eq!(h.commands().len(), 2);
    h.now = 60_000;
    h.core.handle(Event::Tick, h.now);
    h.step();
    match h.client(ClientRequest::GetSession { id: sid }) {
        ClientResponse::Session(info) => {
            assert_eq!(info.counts.pending, 1);
            assert_eq!(info.counts.running, 0);
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// Opens a session at `priority`, submits one task and returns the session.
fn session_with_a_task(h: &mut Harness, priority: i32, batch_id: u64) -> SessionId {
    let sid = session_id(h.client(ClientRequest::CreateSession(SessionSpec {
        ephemeral: true,
        priority,
        ..SessionSpec::new("ping")
    })));
    let _ = h.core.request(
        Request::Submit {
            session: sid,
            batch_id,
            inputs: vec![Bytes::from_static(b"x")],
        },
        h.now,
    );
    h.step();
    sid
}

/// The executor the last plan launched, now ready (and bound, with its task sent).
fn launched_and_ready(h: &mut Harness) -> ExecutorId {
    let executor = match &h.commands()[..] {
        [NodeCommand::Launch { executor, .. }] => *executor,
        other => panic!("{other:?}"),
    };
    h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Ready {
        executor,
        credit: 1,
    }]));
    executor
}

fn counts(h: &mut Harness, id: SessionId) -> flame_protocol::model::TaskCounts {
    match h.client(ClientRequest::GetSession { id }) {
        ClientResponse::Session(info) => info.counts,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_reclaimed_executor_is_killed_only_after_the_grace_period() {
    let mut h = Harness::with_config(CoreConfig {
        preemption_grace_ms: Some(5_000),
        ..CoreConfig::default()
    });
    // The node has room for one executor: the low-priority session gets it.
    let low = session_with_a_task(&mut h, 0, 1);
    let executor = launched_and_ready(&mut h);
    assert_eq!(h.commands().len(), 2, "bind and run");
    // A higher priority session of the same owner reclaims it: unbind, no kill.
    let high = session_with_a_task(&mut h, 5, 1);
    let commands = h.commands();
    assert!(
        matches!(&commands[..], [NodeCommand::Unbind { executor: e }] if *e == executor),
        "{commands:?}"
    );
    // Within the grace period the task keeps running.
    h.now = 4_000;
    h.core.handle(Event::Tick, h.now);
    h.step();
    assert!(h.commands().is_empty());
    assert_eq!(counts(&mut h, low).running, 1);
    // Past it, the executor is killed and the task goes back to pending, uncharged.
    h.now = 5_000;
    h.core.handle(Event::Tick, h.now);
    h.step();
    let commands = h.commands();
    assert!(
        commands
            .iter()
            .any(|c| matches!(c, NodeCommand::Kill { executor: e } if *e == executor)),
        "{commands:?}"
    );
    let c = counts(&mut h, low);
    assert_eq!((c.pending, c.running, c.failed), (1, 0, 0));
    assert_eq!(counts(&mut h, high).pending, 1);
}

/// The node's state as `ListNodes` shows it.
fn node_state(h: &mut Harness) -> NodeState {
    match h.client(ClientRequest::ListNodes) {
        ClientResponse::Nodes(nodes) => nodes[0].state,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_stalled_head_gives_nodes_a_fresh_heartbeat_window() {
    let mut h = Harness::new();
    let timeout = h.core.config.heartbeat_timeout_ms;
    let session = session_with_a_task(&mut h, 0, 1);
    launched_and_ready(&mut h);
    h.commands();
    assert_eq!(counts(&mut h, session).running, 1);
    // The head did not run for longer than the heartbeat timeout; the node's last
    // heartbeat is that old when it wakes, but the silence was the head's.
    h.now += timeout + 5_000;
    h.core.handle(
        Event::Stalled {
            stalled_ms: timeout + 5_000,
        },
        h.now,
    );
    h.core.handle(Event::Tick, h.now);
    h.step();
    assert_eq!(node_state(&mut h), NodeState::Ready);
    assert_eq!(counts(&mut h, session).running, 1, "no task went back");
    // Silence while the head runs still counts: a node that stays silent for a whole
    // heartbeat timeout after the stall is lost, and its task goes to a second attempt.
    h.now += timeout + 1;
    h.core.handle(Event::Tick, h.now);
    h.step();
    assert_ne!(node_state(&mut h), NodeState::Ready);
    assert_eq!(counts(&mut h, session).running, 0);
}

#[test]
fn without_a_grace_period_a_reclaimed_executor_finishes_its_task() {
    // (The node stays known for the hour this test lets pass.)
    let mut h = Harness::with_config(CoreConfig {
        heartbeat_timeout_ms: 10 * 3_600_000,
        ..CoreConfig::default()
    });
    let low = session_with_a_task(&mut h, 0, 1);
    launched_and_ready(&mut h);
    h.commands();
    session_with_a_task(&mut h, 5, 1);
    h.commands();
    h.now = 3_600_000;
    h.core.handle(Event::Tick, h.now);
    h.step();
    assert!(!h
        .commands()
        .iter()
        .any(|c| matches!(c, NodeCommand::Kill { .. })));
    assert_eq!(counts(&mut h, low).running, 1);
}

#[test]
fn failing_launches_back_off() {
    let mut h = Harness::new();
    let sid = session_id(h.client(ClientRequest::CreateSession(SessionSpec {
        ephemeral: true,
        ..SessionSpec::new("ping")
    })));
    let _ = h.core.request(
        Request::Submit {
            session: sid,
            batch_id: 1,
            inputs: vec![Bytes::from_static(b"x")],
        },
        0,
    );
    h.step();
    let executor = match &h.commands()[..] {
        [NodeCommand::Launch { executor, .. }] => *executor,
        other => panic!("{other:?}"),
    };
    h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Exited {
        usage: Default::default(),
        executor,
        reason: "no such file".into(),
    }]));
    // Within the backoff nothing is launched, however often the scheduler runs.
    h.now = LAUNCH_BACKOFF_MIN_MS - 1;
    h.core.handle(Event::Tick, h.now);
    h.step();
    assert!(h.commands().is_empty());
    h.now = LAUNCH_BACKOFF_MIN_MS;
    h.core.handle(Event::Tick, h.now);
    h.step();
    assert!(matches!(&h.commands()[..], [NodeCommand::Launch { .. }]));
}

#[test]
fn queue_depth_follows_task_time() {
    // Long tasks: one running, one queued.
    assert_eq!(outstanding_max(1_000_000.0, 256), 2);
    // Unknown yet: shallow.
    assert_eq!(outstanding_max(TASK_US_INITIAL, 256), 3);
    // 20 µs tasks: as deep as the node allows.
    assert_eq!(outstanding_max(20.0, 256), 256);
    assert_eq!(outstanding_max(0.0, 64), 64);
    // Never more than the node allows.
    assert_eq!(outstanding_max(20.0, 1), 1);
}

#[test]
fn a_resent_batch_creates_nothing_new() {
    let mut h = Harness::new();
    let sid = session_id(h.client(ClientRequest::CreateSession(SessionSpec::new("ping"))));
    let submit = |h: &mut Harness, batch_id: u64| {
        h.core.request(
            Request::Submit {
                session: sid,
                batch_id,
                inputs: vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")],
            },
            0,
        )
    };
    // The copy arrives while the first is still being committed, and once after.
    let first = submit(&mut h, 41);
    let copy = submit(&mut h, 41);
    h.step();
    let late = submit(&mut h, 41);
    h.step();
    for rx in [first, copy, late] {
        assert_eq!(
            h.core.answer::<SubmitReply>(rx).unwrap(),
            SubmitReply::Accepted {
                batch_id: 41,
                first_task: TaskId(1),
                count: 2
            }
        );
    }
    let other = submit(&mut h, 42);
    h.step();
    assert!(matches!(
        h.core.answer(other),
        Some(SubmitReply::Accepted {
            first_task: TaskId(3),
            ..
        })
    ));
    match h.client(ClientRequest::GetSession { id: sid }) {
        ClientResponse::Session(info) => assert_eq!(info.counts.total(), 4),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_node_back_after_a_blip_cannot_complete_requeued_tasks() {
    let mut h = Harness::new();
    let sid = session_id(h.client(ClientRequest::CreateSession(SessionSpec::new("ping"))));
    let _ = h.core.request(
        Request::Submit {
            session: sid,
            batch_id: 1,
            inputs: vec![Bytes::from_static(b"x"), Bytes::from_static(b"y")],
        },
        0,
    );
    h.step();
    let executor = match &h.commands()[..] {
        [NodeCommand::Launch { executor, .. }] => *executor,
        other => panic!("{other:?}"),
    };
    h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Ready {
        executor,
        credit: 8,
    }]));
    let runs: Vec<TaskAssignment> = runs_sent(&mut h);
    assert_eq!(runs.len(), 2);
    // The connection drops and the node comes back at once, reporting the executor,
    // still bound and running both tasks, with a new connection.
    h.core.handle(
        Event::NodeDisconnected {
            conn: 1,
            reason: "blip".into(),
        },
        0,
    );
    h.step();
    // The head re-queued them with the next attempt, so the report's attempts are stale:
    // nothing is adopted as running, and the stale results are refused.
    h.conn = 2;
    h.core.handle(
        Event::NodeConnected {
            address: "127.0.0.1".into(),
            conn: 2,
            registration: NodeRegistration {
                name: "n1".into(),
                allocatable: flame_protocol::model::NodeResources {
                    cpu_millis: 1000,
                    memory_bytes: 1 << 30,
                    gpus: Vec::new(),
                },
                labels: Default::default(),
                isolation: flame_protocol::model::Isolation::None,
                identity: flame_protocol::model::ExecutorIdentity::OwnerUid,
                executors: vec![ExecutorReport {
                    resources: Default::default(),
                    gpus: Vec::new(),
                    executor,
                    application: "ping".into(),
                    owner: "default".into(),
                    ready: true,
                    session: Some(sid),
                    tasks: runs
                        .iter()
                        .map(|a| (a.session, a.task, a.attempt))
                        .collect(),
                    credit: 8,
                }],
            },
        },
        0,
    );
    h.step();
    let rerun: Vec<TaskAssignment> = runs_sent(&mut h);
    assert_eq!(
        rerun.len(),
        2,
        "the tasks run again on the adopted executor"
    );
    assert!(rerun.iter().all(|a| a.attempt == 2));
    h.core.handle(
        Event::NodeMessage {
            conn: 2,
            message: NodeToHead::Results(
                runs.iter()
                    .map(|a| NodeTaskResult {
                        exit_code: None,
                        executor,
                        session: sid,
                        task: a.task,
                        attempt: a.attempt,
                        outcome: TaskOutcome::Succeeded(Bytes::from_static(b"stale")),
                    })
                    .collect(),
            ),
        },
        0,
    );
    h.step();
    match h.client(ClientRequest::GetSession { id: sid }) {
        ClientResponse::Session(info) => {
            assert_eq!(info.counts.succeeded, 0, "stale results were refused");
            assert_eq!(info.counts.running, 2);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn after_a_head_restart_running_tasks_are_adopted_not_rerun() {
    use crate::store::{Loaded, StoredNode};
    let sid = SessionId(3);
    let app = ApplicationSpec {
        name: "ping".into(),
        shim: ShimKind::Stdio,
        command: "flame-ping".into(),
        args: vec![],
        env: Default::default(),
        working_dir: None,
        user: None,
        group: None,
        users: Vec::new(),
        groups: Vec::new(),
        resources: Default::default(),
        selector: Default::default(),
        max_instances: 10,
        delay_release_ms: 1000,
        max_attempts: 3,
        retry_on_error: false,
        task_timeout_ms: None,
        allow_root: false,
    };
    let loaded = Loaded {
        applications: vec![app],
        sessions: vec![StoredSession {
            id: sid,
            owner: "default".into(),
            priority: 0,
            job: None,
            application: "ping".into(),
            common_data: Bytes::new(),
            state: SessionState::Open,
            created_ms: 0,
            closed_ms: None,
            last_task: 0,
            usage: Vec::new(),
        }],
        tasks: vec![
            (
                sid,
                TaskId(1),
                StoredTask::Pending {
                    attempt: 1,
                    input: Bytes::from_static(b"a"),
                },
            ),
            (
                sid,
                TaskId(2),
                StoredTask::Pending {
                    attempt: 1,
                    input: Bytes::from_static(b"b"),
                },
            ),
        ],
        nodes: vec![StoredNode {
            name: "n1".into(),
            allocatable: flame_protocol::model::NodeResources {
                cpu_millis: 1000,
                memory_bytes: 1 << 30,
                gpus: Vec::new(),
            },
            labels: Default::default(),
            isolation: flame_protocol::model::Isolation::None,
            last_seen_ms: 0,
            draining: false,
        }],
        batches: vec![],
        next_session: 4,
        next_executor: 1024,
        owner_uids: vec![("default".into(), 1_900_000_000)],
    };
    let mut core = Driver::new(Core::new(CoreConfig::default(), loaded));
    core.start_recovery(0, 10_000);
    core.end_batch(0);
    core.handle(
        Event::NodeConnected {
            address: "127.0.0.1".into(),
            conn: 7,
            registration: NodeRegistration {
                name: "n1".into(),
                allocatable: flame_protocol::model::NodeResources {
                    cpu_millis: 1000,
                    memory_bytes: 1 << 30,
                    gpus: Vec::new(),
                },
                labels: Default::default(),
                isolation: flame_protocol::model::Isolation::None,
                identity: flame_protocol::model::ExecutorIdentity::OwnerUid,
                executors: vec![ExecutorReport {
                    resources: Default::default(),
                    gpus: Vec::new(),
                    executor: ExecutorId(900),
                    application: "ping".into(),
                    owner: "default".into(),
                    ready: true,
                    session: Some(sid),
                    tasks: vec![(sid, TaskId(1), 1)],
                    credit: 1,
                }],
            },
        },
        100,
    );
    core.end_batch(100);
    // Task 1 keeps running where it was; task 2, which nobody reported, runs again
    // with its next attempt once the node can take it.
    core.handle(
        Event::NodeMessage {
            conn: 7,
            message: NodeToHead::Results(vec![NodeTaskResult {
                exit_code: None,
                executor: ExecutorId(900),
                session: sid,
                task: TaskId(1),
                attempt: 1,
                outcome: TaskOutcome::Succeeded(Bytes::from_static(b"A")),
            }]),
        },
        200,
    );
    core.settle(200);
    let runs: Vec<(TaskId, u32)> = commands_in(core.frames(7))
        .into_iter()
        .filter_map(|c| match c {
            NodeCommand::Run(a) => Some((a.task, a.attempt)),
            _ => None,
        })
        .collect();
    assert_eq!(runs, vec![(TaskId(2), 2)]);
    let rx = core.request(Request::Client(ClientRequest::GetSession { id: sid }), 200);
    match core.answer(rx) {
        Some(ClientResponse::Session(info)) => {
            assert_eq!(info.counts.succeeded, 1);
            assert_eq!(info.counts.running, 1);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_requests_get_named_errors() {
    let mut h = Harness::new();
    match h.client(ClientRequest::CreateSession(SessionSpec::new("nope"))) {
        ClientResponse::Error(e) => {
            assert_eq!(e.kind, ErrorKind::NotFound);
            assert!(e.message.contains("nope"));
        }
        other => panic!("unexpected {other:?}"),
    }
    let sid = session_id(h.client(ClientRequest::CreateSession(SessionSpec::new("ping"))));
    let rx = h.core.request(
        Request::Submit {
            session: sid,
            batch_id: 3,
            inputs: vec![Bytes::from(vec![0u8; limits::TASK_INPUT_BYTES_MAX + 1])],
        },
        0,
    );
    match h.core.answer(rx) {
        Some(SubmitReply::Rejected { error, .. }) => {
            assert_eq!(error.kind, ErrorKind::LimitExceeded)
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// Submits a 2-rank job of half-cpu ranks on the harness's 1-cpu node: returns its id
/// and its executors, all launched in one plan.
fn submit_job(h: &mut Harness, time_limit_ms: Option<u64>) -> (SessionId, Vec<ExecutorId>) {
    use flame_protocol::model::JobSpec;
    let mut job = JobSpec::new("/bin/work", 2);
    job.resources.cpu_millis = 500;
    // Within the node's 1 GiB: a job's default is a GiB per rank.
    job.resources.memory_bytes = Some(256 << 20);
    job.time_limit_ms = time_limit_ms;
    let id = session_id(h.client(ClientRequest::CreateSession(SessionSpec {
        job: Some(job),
        ..SessionSpec::new("")
    })));
    let launched: Vec<ExecutorId> = h
        .commands()
        .into_iter()
        .filter_map(|c| match c {
            NodeCommand::Launch {
                executor,
                application,
                ..
            } => {
                assert_eq!(application.shim, ShimKind::Batch);
                assert_eq!(application.name, format!("job.{}", id.0));
                Some(executor)
            }
            _ => None,
        })
        .collect();
    assert_eq!(launched.len(), 2, "all ranks are launched in one plan");
    (id, launched)
}

/// Starts a 2-rank job of half-cpu ranks on the harness's 1-cpu node: returns its id,
/// its executors in launch order, and the rank tasks it runs once every rank is bound.
fn started_job(h: &mut Harness, time_limit_ms: Option<u64>) -> (SessionId, Vec<TaskAssignment>) {
    let (id, launched) = submit_job(h, time_limit_ms);
    let mut runs = Vec::new();
    for (i, &executor) in launched.iter().enumerate() {
        h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Ready {
            executor,
            credit: 1,
        }]));
        assert!(
            h.commands()
                .iter()
                .any(|c| matches!(c, NodeCommand::Bind { executor: e, .. } if *e == executor)),
            "a ready rank is bound"
        );
        h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Bound {
            executor,
            session: id,
        }]));
        runs = runs_sent(h);
        if i == 0 {
            assert!(
                runs.is_empty(),
                "a rank started before every rank was bound"
            );
        }
    }
    assert_eq!(runs.len(), 2, "every rank starts once all are bound");
    (id, runs)
}

#[test]
fn logs_of_a_job_not_started_are_answered_when_it_starts_under_the_same_id() {
    let mut h = Harness::new();
    let (id, launched) = submit_job(&mut h, None);
    let logs = |h: &mut Harness| {
        h.core.request(
            Request::LogTargets {
                session: id,
                executor: None,
            },
            h.now,
        )
    };
    let waiting = logs(&mut h);
    let gone = logs(&mut h);
    for reply in [waiting, gone] {
        assert!(matches!(
            h.core.reply_to(reply),
            Some(Reply::LogTargets(Ok(LogTargets::WhenStarted)))
        ));
    }
    // The second caller went away: forgotten, never answered again.
    h.core.handle(
        Event::CallersGone {
            replies: vec![gone],
        },
        h.now,
    );
    for (i, &executor) in launched.iter().enumerate() {
        h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Ready {
            executor,
            credit: 1,
        }]));
        h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Bound {
            executor,
            session: id,
        }]));
        if i == 0 {
            assert!(
                h.core.reply_to(waiting).is_none(),
                "answered before it started"
            );
        }
    }
    match h.core.reply_to(waiting) {
        Some(Reply::JobLogTargets(Ok(targets))) => {
            assert_eq!(targets, vec![("n1".to_string(), launched.clone())]);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(h.core.reply_to(gone).is_none());
    assert!(h.core.unanswered.is_empty());
}

fn job_of(h: &mut Harness, id: SessionId) -> JobInfo {
    match h.client(ClientRequest::GetSession { id }) {
        ClientResponse::Session(info) => info.job.expect("a job"),
        other => panic!("unexpected {other:?}"),
    }
}

fn tick(h: &mut Harness) {
    h.core.handle(Event::Tick, h.now);
    h.step();
}

/// The tasks sent to nodes since the last look.
fn runs_sent(h: &mut Harness) -> Vec<TaskAssignment> {
    h.commands()
        .into_iter()
        .filter_map(|c| match c {
            NodeCommand::Run(a) => Some(a),
            _ => None,
        })
        .collect()
}

fn kills(h: &mut Harness) -> Vec<ExecutorId> {
    h.commands()
        .into_iter()
        .filter_map(|c| match c {
            NodeCommand::Kill { executor } => Some(executor),
            _ => None,
        })
        .collect()
}

fn exited(h: &mut Harness, executor: ExecutorId) {
    h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Exited {
        executor,
        reason: "killed by the node".into(),
        usage: Usage::default(),
    }]));
}

#[test]
fn a_job_starts_whole_and_its_first_failed_rank_stops_the_rest_after_a_grace() {
    let mut h = Harness::new();
    let (id, runs) = started_job(&mut h, None);
    // Each rank's task carries its rank, the world and the hostfile.
    for (rank, run) in runs.iter().enumerate() {
        assert_eq!(run.task, TaskId(rank as u64 + 1));
        let launch = RankLaunch::decode(&run.input).unwrap();
        let env: BTreeMap<String, String> = launch.env.into_iter().collect();
        assert_eq!(env["FLAME_RANK"], rank.to_string());
        assert_eq!(env["RANK"], rank.to_string());
        assert_eq!(env["WORLD_SIZE"], "2");
        assert_eq!(env["FLAME_LOCAL_RANK"], rank.to_string());
        assert_eq!(env["FLAME_NODELIST"], "n1");
        assert_eq!(env["MASTER_ADDR"], "127.0.0.1");
        assert_eq!(launch.hostfile, "n1 slots=2\n");
        assert!(!launch.hold && launch.argv.is_none());
    }
    let job = job_of(&mut h, id);
    assert_eq!(job.state, JobState::Running);
    assert_eq!(job.ranks.len(), 2);

    // Rank 1 exits with 3; rank 0 gets the grace, then is killed.
    h.node(NodeToHead::Results(vec![NodeTaskResult {
        executor: runs[1].executor,
        session: id,
        task: runs[1].task,
        attempt: runs[1].attempt,
        outcome: TaskOutcome::Failed("rank exited with status 3".into()),
        exit_code: Some(3),
    }]));
    h.now += JOB_FAIL_GRACE_MS - 1;
    tick(&mut h);
    assert!(kills(&mut h).is_empty(), "killed before the grace ran out");
    h.now += 1;
    tick(&mut h);
    // Every rank goes, the one still running and the one whose process ended.
    let mut killed = kills(&mut h);
    killed.sort();
    assert_eq!(killed, vec![runs[0].executor, runs[1].executor]);
    for run in &runs {
        exited(&mut h, run.executor);
    }

    let job = job_of(&mut h, id);
    assert_eq!(job.state, JobState::Failed);
    let failure = job.failure.clone().unwrap();
    assert_eq!((failure.rank, failure.exit_code), (Some(1), Some(3)));
    assert_eq!(job.exit_code(), Some(3));
    assert_eq!(job.ranks[1].exit_code, Some(3));
}

#[test]
fn a_job_past_its_time_limit_is_stopped_and_says_so() {
    let mut h = Harness::new();
    let (id, runs) = started_job(&mut h, Some(1_000));
    h.now += 999;
    tick(&mut h);
    assert!(kills(&mut h).is_empty());
    h.now += 1;
    tick(&mut h);
    let mut killed = kills(&mut h);
    killed.sort();
    let mut ranks: Vec<ExecutorId> = runs.iter().map(|r| r.executor).collect();
    ranks.sort();
    assert_eq!(killed, ranks);
    for executor in ranks {
        exited(&mut h, executor);
    }
    let job = job_of(&mut h, id);
    assert_eq!(job.state, JobState::TimedOut);
    assert_eq!(job.exit_code(), Some(124));
}

#[test]
fn a_job_spec_is_checked_and_cannot_be_ephemeral() {
    use flame_protocol::model::JobSpec;
    let mut h = Harness::new();
    let mut job = JobSpec::new("/bin/work", 3);
    job.ranks_per_node = Some(2);
    match h.client(ClientRequest::CreateSession(SessionSpec {
        job: Some(job),
        ..SessionSpec::new("")
    })) {
        ClientResponse::Error(e) => assert!(e.message.contains("ranks_per_node"), "{e}"),
        other => panic!("unexpected {other:?}"),
    }
    match h.client(ClientRequest::CreateSession(SessionSpec {
        job: Some(JobSpec::new("/bin/work", 1)),
        ephemeral: true,
        ..SessionSpec::new("")
    })) {
        ClientResponse::Error(e) => assert!(e.message.contains("ephemeral"), "{e}"),
        other => panic!("unexpected {other:?}"),
    }
    // Job applications are not listed.
    match h.client(ClientRequest::ListApplications) {
        ClientResponse::Applications(list) => {
            assert!(list.iter().all(|a| a.spec.shim != ShimKind::Batch))
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_running_job_that_lost_a_rank_in_a_restart_fails() {
    use crate::store::Loaded;
    use flame_protocol::model::JobSpec;
    let id = SessionId(7);
    let mut job = JobInfo::queued(JobSpec::new("/bin/work", 2));
    job.state = JobState::Running;
    job.started_ms = Some(1);
    let loaded = Loaded {
        sessions: vec![StoredSession {
            id,
            application: "job.7".into(),
            owner: "o".into(),
            priority: 0,
            common_data: Bytes::new(),
            state: SessionState::Closed,
            created_ms: 0,
            closed_ms: Some(0),
            last_task: 2,
            usage: Vec::new(),
            job: Some(job),
        }],
        tasks: (1..=2)
            .map(|t| {
                let task = StoredTask::Pending {
                    attempt: 1,
                    input: Bytes::new(),
                };
                (id, TaskId(t), task)
            })
            .collect(),
        ..Default::default()
    };
    let mut core = Driver::new(Core::new(CoreConfig::default(), loaded));
    // No node is known, so nothing can come back to report the ranks.
    core.start_recovery(5, 10_000);
    let ops = core.settle_ops(5);
    // It finished and left memory; its view is what the store serves from now on.
    assert!(!core.holds_session(id));
    let info = ops
        .into_iter()
        .find_map(|op| match op {
            StoreOp::PutFinished(info) if info.id == id => Some(info),
            _ => None,
        })
        .expect("the finished job's view is stored as it leaves memory");
    assert!(info.is_finished(), "{info:#?}");
    let job = info.job.unwrap();
    assert_eq!(job.state, JobState::Failed, "{job:#?}");
    assert!(job.failure.unwrap().message.contains("restarted"));
}

#[test]
fn a_job_that_loses_a_rank_before_it_starts_fails_and_gives_the_rest_back() {
    let mut h = Harness::new();
    let (id, launched) = submit_job(&mut h, None);
    h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Ready {
        executor: launched[0],
        credit: 1,
    }]));
    h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Bound {
        executor: launched[0],
        session: id,
    }]));
    h.commands();
    // The other rank never comes up.
    h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Exited {
        executor: launched[1],
        reason: "cannot create the executor's cgroup".into(),
        usage: Usage::default(),
    }]));
    assert_eq!(kills(&mut h), vec![launched[0]], "the rank it held goes");
    exited(&mut h, launched[0]);
    let job = job_of(&mut h, id);
    assert_eq!(job.state, JobState::Failed, "{job:#?}");
    let failure = job.failure.unwrap();
    assert_eq!(failure.rank, None);
    assert!(failure.message.contains("cgroup"), "{failure:?}");
    assert!(job.ranks.is_empty(), "it never started");
    // Its application is no place for other sessions.
    match h.client(ClientRequest::CreateSession(SessionSpec::new(format!(
        "job.{}",
        id.0
    )))) {
        ClientResponse::Error(e) => assert_eq!(e.kind, ErrorKind::InvalidArgument),
        ClientResponse::Session(_) => panic!("a session on a job's application"),
        _ => {} // the application may already be forgotten
    }
}

#[test]
fn a_rank_outcome_that_fails_to_persist_is_written_again_never_rerun() {
    let mut h = Harness::new();
    let (id, runs) = started_job(&mut h, None);
    h.core.handle(
        Event::NodeMessage {
            conn: 1,
            message: NodeToHead::Results(vec![NodeTaskResult {
                executor: runs[0].executor,
                session: id,
                task: runs[0].task,
                attempt: runs[0].attempt,
                outcome: TaskOutcome::Succeeded(Bytes::new()),
                exit_code: Some(0),
            }]),
        },
        h.now,
    );
    h.core.end_batch(h.now);
    // The disk is full: that commit fails.
    while let Some(req) = h.core.next_store_request() {
        h.core.commit(&req, Err(injected_failure()), h.now);
        h.core.end_batch(h.now);
    }
    assert!(
        !h.commands()
            .iter()
            .any(|c| matches!(c, NodeCommand::Run(_))),
        "a rank was run again"
    );
    // The next tick writes it again, and this time it holds.
    h.now += 200;
    tick(&mut h);
    match h.client(ClientRequest::GetSession { id }) {
        ClientResponse::Session(info) => {
            assert_eq!(info.counts.succeeded, 1, "{info:#?}");
            assert_eq!(info.counts.pending, 0, "{info:#?}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_storage_fault_refuses_writes_at_once_and_holds_results_until_it_clears() {
    let mut h = Harness::new();
    let sid = session_id(h.client(ClientRequest::CreateSession(SessionSpec::new("ping"))));
    let (_, mut watch) = h.core.watch(sid, h.now);
    let inputs = vec![Bytes::from_static(b"x")];
    let ack = h.core.request(
        Request::Submit {
            session: sid,
            batch_id: 1,
            inputs,
        },
        h.now,
    );
    h.step();
    assert!(matches!(
        h.core.answer(ack),
        Some(SubmitReply::Accepted { .. })
    ));
    let executor = match &h.commands()[..] {
        [NodeCommand::Launch { executor, .. }] => *executor,
        other => panic!("expected one launch, got {other:?}"),
    };
    h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Ready {
        executor,
        credit: 2,
    }]));
    let cmds = h.commands();
    let Some(NodeCommand::Run(run)) = cmds.get(1).cloned() else {
        panic!("expected a run, got {cmds:?}")
    };

    let fault = crate::storage_fault::StorageFault {
        kind: crate::storage_fault::FaultKind::DiskFull,
        detail: "No space left on device (os error 28)".into(),
        data_dir: "/var/lib/flame".into(),
    };
    h.core.handle(Event::StorageFaulted { fault }, h.now);
    // Writes are answered at once, with the cause and what to do.
    for request in [
        ClientRequest::CreateSession(SessionSpec::new("ping")),
        ClientRequest::CloseSession { id: sid },
        ClientRequest::DrainNode { name: "n1".into() },
    ] {
        match h.client(request) {
            ClientResponse::Error(e) => {
                assert_eq!(e.kind, ErrorKind::Unavailable);
                assert!(e.message.contains("disk is full"), "{}", e.message);
                assert!(e.message.contains("/var/lib/flame"), "{}", e.message);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let inputs = vec![Bytes::from_static(b"y")];
    let refused = h.core.request(
        Request::Submit {
            session: sid,
            batch_id: 2,
            inputs,
        },
        h.now,
    );
    assert!(
        matches!(h.core.answer(refused), Some(SubmitReply::Rejected { error, .. }) if error.message.contains("disk is full"))
    );
    // Reads still work, and the refused close left the session open.
    match h.client(ClientRequest::GetSession { id: sid }) {
        ClientResponse::Session(info) => assert_eq!(info.state, SessionState::Open),
        other => panic!("unexpected {other:?}"),
    }
    // The running task's result is held: not shown, not written, not run again.
    h.node(NodeToHead::Results(vec![NodeTaskResult {
        exit_code: Some(0),
        executor,
        session: sid,
        task: run.task,
        attempt: run.attempt,
        outcome: TaskOutcome::Succeeded(Bytes::from_static(b"X")),
    }]));
    for _ in 0..5 {
        h.now += 200;
        tick(&mut h);
    }
    assert!(
        h.core.watched(&mut watch).is_err(),
        "a result was shown before it was durable"
    );
    assert!(
        !h.commands()
            .iter()
            .any(|c| matches!(c, NodeCommand::Run(_))),
        "a task was run again"
    );
    assert_eq!(counts(&mut h, sid).running, 1);

    // The probe succeeded: the held result is written, then shown once, attempt 1.
    h.core.handle(Event::StorageRecovered, h.now);
    h.step();
    match h.core.watched(&mut watch) {
        Ok(WatchMsg::Results(r)) => {
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].attempt, run.attempt);
            assert_eq!(
                r[0].outcome,
                TaskOutcome::Succeeded(Bytes::from_static(b"X"))
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        h.client(ClientRequest::CloseSession { id: sid }),
        ClientResponse::Ok
    ));
    assert!(matches!(h.core.watched(&mut watch), Ok(WatchMsg::Finished)));
}

#[test]
fn a_close_that_fails_to_persist_leaves_the_session_open_never_finished() {
    let mut h = Harness::new();
    let sid = session_id(h.client(ClientRequest::CreateSession(SessionSpec::new("ping"))));
    let (_, mut watch) = h.core.watch(sid, h.now);
    let closed = h.core.request(
        Request::Client(ClientRequest::CloseSession { id: sid }),
        h.now,
    );
    h.core.end_batch(h.now);
    // Not finished before the close is durable, and not after it failed.
    assert!(h.core.watched(&mut watch).is_err());
    while let Some(req) = h.core.next_store_request() {
        h.core.commit(&req, Err(injected_failure()), h.now);
        h.core.end_batch(h.now);
    }
    assert!(matches!(
        h.core.answer(closed),
        Some(ClientResponse::Error(_))
    ));
    assert!(
        h.core.watched(&mut watch).is_err(),
        "Finished shown for a close that failed"
    );
    match h.client(ClientRequest::GetSession { id: sid }) {
        ClientResponse::Session(info) => assert_eq!(info.state, SessionState::Open),
        other => panic!("unexpected {other:?}"),
    }
    // Sent again, it holds.
    assert!(matches!(
        h.client(ClientRequest::CloseSession { id: sid }),
        ClientResponse::Ok
    ));
    assert!(matches!(h.core.watched(&mut watch), Ok(WatchMsg::Finished)));
}

fn spec_of(owner: &str, ephemeral: bool, common: &'static [u8]) -> SessionSpec {
    SessionSpec {
        owner: owner.into(),
        ephemeral,
        common_data: Bytes::from_static(common),
        ..SessionSpec::new("ping")
    }
}

fn submit(
    h: &mut Harness,
    session: SessionId,
    batch_id: u64,
    inputs: &[&'static [u8]],
) -> SubmitReply {
    let rx = h.core.request(
        Request::Submit {
            session,
            batch_id,
            inputs: inputs.iter().map(|b| Bytes::from_static(b)).collect(),
        },
        h.now,
    );
    h.step();
    h.core.answer(rx).expect("a submit reply")
}

fn quota_error(r: ClientResponse) -> ApiError {
    match r {
        ClientResponse::Error(e) if e.kind == ErrorKind::QuotaExceeded => e,
        other => panic!("expected a quota refusal, got {other:?}"),
    }
}

fn rejected_for_quota(r: SubmitReply) -> ApiError {
    match r {
        SubmitReply::Rejected { error, .. } if error.kind == ErrorKind::QuotaExceeded => error,
        other => panic!("expected a quota refusal, got {other:?}"),
    }
}

#[test]
fn quotas_refuse_sessions_tasks_and_bytes_by_name_and_come_back_when_released() {
    let quotas = crate::quotas::Quotas {
        open_sessions: 2,
        pending_tasks: 3,
        input_bytes: 100,
        ..Default::default()
    };
    let mut h = Harness::with_config(CoreConfig {
        quotas: QuotaBook::uniform(quotas),
        ..CoreConfig::default()
    });
    let bob1 = session_id(h.client(ClientRequest::CreateSession(spec_of("bob", false, b"c"))));
    let _bob2 = session_id(h.client(ClientRequest::CreateSession(spec_of("bob", false, b""))));
    let e = quota_error(h.client(ClientRequest::CreateSession(spec_of("bob", false, b""))));
    assert!(
        e.message
            .starts_with("quota exceeded: open sessions 2 of 2 for owner bob;")
            && e.message.ends_with("quotas.open_sessions"),
        "{e}"
    );
    // Another owner is not held back by bob.
    let alice = session_id(h.client(ClientRequest::CreateSession(spec_of("alice", false, b""))));
    // Tasks: three fit, a fourth does not, and a refused batch holds nothing.
    assert!(matches!(
        submit(&mut h, bob1, 1, &[b"aa", b"bb", b"cc"]),
        SubmitReply::Accepted { count: 3, .. }
    ));
    let e = rejected_for_quota(submit(&mut h, bob1, 2, &[b"dd"]));
    assert!(
        e.message.contains("pending tasks 3 of 3 for owner bob"),
        "{e}"
    );
    assert_eq!(
        h.core.held("bob"),
        crate::quotas::Held {
            sessions: 2,
            tasks: 3,
            bytes: 7
        }
    );
    // Bytes: alice's one task of 101 bytes is over her 100.
    let e = rejected_for_quota(submit(&mut h, alice, 1, &[&[b'x'; 101]]));
    assert!(
        e.message.contains(
            "bytes held in the head's memory 0 of 100 for owner alice (this request adds 101)"
        ),
        "{e}"
    );
    assert_eq!(h.core.ledger_mismatch(), None);
    // Cancelled, bob's session finishes, leaves memory, and gives everything back.
    assert!(matches!(
        h.client(ClientRequest::CancelSession { id: bob1 }),
        ClientResponse::Ok
    ));
    h.step();
    assert!(!h.core.holds_session(bob1));
    assert_eq!(
        h.core.held("bob"),
        crate::quotas::Held {
            sessions: 1,
            tasks: 0,
            bytes: 0
        }
    );
    session_id(h.client(ClientRequest::CreateSession(spec_of("bob", false, b""))));
    assert_eq!(h.core.ledger_mismatch(), None);
}

#[test]
fn an_ephemeral_session_holds_its_tasks_until_it_leaves_memory() {
    let quotas = crate::quotas::Quotas {
        pending_tasks: 2,
        ..Default::default()
    };
    let mut h = Harness::with_config(CoreConfig {
        quotas: QuotaBook::uniform(quotas),
        ..CoreConfig::default()
    });
    let eph = session_id(h.client(ClientRequest::CreateSession(spec_of("eve", true, b""))));
    assert!(matches!(
        submit(&mut h, eph, 1, &[b"a", b"b"]),
        SubmitReply::Accepted { count: 2, .. }
    ));
    let e = rejected_for_quota(submit(&mut h, eph, 2, &[b"c"]));
    assert!(
        e.message.contains("pending tasks 2 of 2 for owner eve"),
        "{e}"
    );
    // Final, its results stay in memory with it (it has no store), so they still count.
    assert!(matches!(
        h.client(ClientRequest::CancelSession { id: eph }),
        ClientResponse::Ok
    ));
    h.step();
    assert!(h.core.holds_session(eph));
    assert_eq!(h.core.held("eve").tasks, 2);
    let eph2 = session_id(h.client(ClientRequest::CreateSession(spec_of("eve", true, b""))));
    let e = rejected_for_quota(submit(&mut h, eph2, 1, &[b"c"]));
    assert!(
        e.message.contains("pending tasks 2 of 2 for owner eve"),
        "{e}"
    );
    // `EPHEMERAL_KEPT_MS` later it is gone, and so is what it held.
    h.now += EPHEMERAL_KEPT_MS + 1;
    h.core.handle(Event::Tick, h.now);
    h.step();
    assert!(!h.core.holds_session(eph));
    // Only the second, open and empty, is left.
    assert_eq!(
        h.core.held("eve"),
        crate::quotas::Held {
            sessions: 1,
            tasks: 0,
            bytes: 0
        }
    );
    assert_eq!(h.core.ledger_mismatch(), None);
}

#[test]
fn a_finished_session_leaves_memory_and_is_served_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::Store::open(dir.path()).unwrap();
    let mut core = Driver::new(Core::new(CoreConfig::default(), store.load().unwrap()));
    core.ensure_application(ApplicationSpec::new("ping", "flame-ping"));
    // The writer, for real: every request committed to redb, then reported.
    let commit = |core: &mut Driver| {
        core.end_batch(1);
        while let Some(req) = core.next_store_request() {
            let result = store.commit(&req.ops).map_err(|e| {
                CommitError::Faulted(crate::storage_fault::classify(&e, dir.path(), None))
            });
            core.commit(&req, result, 1);
            core.end_batch(1);
        }
    };
    let ask = |core: &mut Driver, request: ClientRequest| core.request(Request::Client(request), 1);
    let created = ask(
        &mut core,
        ClientRequest::CreateSession(spec_of("bob", false, b"common")),
    );
    commit(&mut core);
    let id = session_id(core.answer(created).unwrap());
    let inputs = (0..20_000)
        .map(|i| Bytes::from(format!("task {i}")))
        .collect();
    let acked = core.request(
        Request::Submit {
            session: id,
            batch_id: 1,
            inputs,
        },
        1,
    );
    commit(&mut core);
    assert!(matches!(
        core.answer(acked),
        Some(SubmitReply::Accepted { count: 20_000, .. })
    ));
    let before = core.tasks.sessions.len();
    assert_eq!(core.held("bob").tasks, 20_000);
    let cancelled = ask(&mut core, ClientRequest::CancelSession { id });
    commit(&mut core);
    assert!(matches!(core.answer(cancelled), Some(ClientResponse::Ok)));
    // Out of memory: the session table shrank, and the owner holds nothing.
    assert!(!core.holds_session(id));
    assert_eq!(core.tasks.sessions.len(), before - 1);
    assert!(core.held("bob").is_zero());
    // Its view, owner, tasks and results are served from the store.
    let info = store.finished_session(id).unwrap().expect("its final view");
    assert!(info.is_finished(), "{info:?}");
    assert_eq!(info.owner, "bob");
    assert_eq!(info.counts.cancelled, 20_000);
    let page = store
        .final_results_page(id, TaskId(0), 8_192, usize::MAX)
        .unwrap();
    assert_eq!(page.len(), 8_192);
    assert_eq!(page[0].task, TaskId(1));
    let next = store
        .final_results_page(id, TaskId(8_192), 8_192, 64)
        .unwrap();
    assert_eq!(next.first().map(|r| r.task), Some(TaskId(8_193)));
    assert!(next.len() < 8_192, "a page stops at its byte bound");
    // The core sends the server to the store for it, and refuses nothing it should not.
    let rx = core.request(
        Request::ListTasks {
            session: id,
            states: vec![],
            after: TaskId(0),
            limit: 10,
        },
        1,
    );
    assert!(matches!(core.answer(rx), Some(Ok(None))));
    let (rx, _source) = core.watch(id, 1);
    assert!(matches!(
        core.answer(rx),
        Some(Ok(WatchStart {
            backfill: Backfill::Store,
            finished: true
        }))
    ));
    let closed = ask(&mut core, ClientRequest::CloseSession { id });
    assert!(matches!(core.answer(closed), Some(ClientResponse::Ok)));
    // A resend of its batch is acked from the store, as it was.
    let resent = core.request(
        Request::Submit {
            session: id,
            batch_id: 1,
            inputs: vec![Bytes::from_static(b"task 0")],
        },
        1,
    );
    let resent = store.settle_refused(id, core.answer(resent).unwrap());
    assert!(
        matches!(resent, SubmitReply::Accepted { count: 20_000, .. }),
        "{resent:?}"
    );
    // After a restart the finished session is not loaded again.
    drop(core);
    let loaded = store.load().unwrap();
    assert!(loaded.sessions.iter().all(|s| s.id != id));
    assert!(loaded.tasks.is_empty());
}
