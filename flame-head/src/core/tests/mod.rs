//! The core's unit tests: each drives a [`Core`] with events and reads its [`Outputs`].

mod jobs;
mod objects;
mod storage;

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
        Harness::build(config, None)
    }

    /// A harness whose node `n1` serves objects with `service`.
    fn build(
        config: CoreConfig,
        service: Option<flame_protocol::messages::ObjectService>,
    ) -> Harness {
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
                    objects: service,
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
            inputs: vec![Bytes::from_static(b"x").into()],
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
            inputs: vec![Bytes::from_static(b"a").into(); 3],
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
                objects: None,
            },
        },
        0,
    );
    h.step();
    // The first executor of an application is launched alone; once it says ready, the
    // next follows.
    let mut launched = Vec::new();
    for round in 0..2 {
        let before = launched.len();
        for c in commands_in(h.core.frames(2)) {
            if let NodeCommand::Launch { executor, gpus, .. } = c {
                launched.push((executor, gpus));
            }
        }
        assert_eq!(launched.len(), before + 1, "round {round}: {launched:?}");
        if round == 0 {
            h.core.handle(
                Event::NodeMessage {
                    conn: 2,
                    message: NodeToHead::ExecutorEvents(vec![ExecutorEvent::Ready {
                        executor: launched[0].0,
                        credit: 1,
                    }]),
                },
                0,
            );
            h.step();
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
            inputs: vec![Bytes::from_static(b"x").into()],
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
            inputs: vec![Bytes::from_static(b"x").into()],
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
            inputs: vec![Bytes::from_static(b"x").into()],
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
                inputs: vec![
                    Bytes::from_static(b"a").into(),
                    Bytes::from_static(b"b").into(),
                ],
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
            inputs: vec![
                Bytes::from_static(b"x").into(),
                Bytes::from_static(b"y").into(),
            ],
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
    // The head re-queued them. The one that was running moved to its next attempt, so the
    // report's attempt of it is stale: it is not adopted, and its result is refused. The
    // one queued behind it never started and kept its attempt: the executor the node
    // still runs it on is adopted with it, and its result counts.
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
                objects: None,
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
        rerun
            .iter()
            .map(|a| (a.task, a.attempt))
            .collect::<Vec<_>>(),
        [(runs[0].task, 2)],
        "the task that was running runs again on the adopted executor"
    );
    assert_eq!(runs[1].attempt, 1);
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
            assert_eq!(
                info.counts.succeeded, 1,
                "the stale result was refused, the adopted task's taken"
            );
            assert_eq!(info.counts.running, 1);
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
            common_data: Payload::default(),
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
                    input: Bytes::from_static(b"a").into(),
                },
            ),
            (
                sid,
                TaskId(2),
                StoredTask::Pending {
                    attempt: 1,
                    input: Bytes::from_static(b"b").into(),
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
                objects: None,
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
            inputs: vec![Bytes::from(vec![0u8; limits::TASK_INPUT_BYTES_MAX + 1]).into()],
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

/// The attempts of a session's unfinished tasks, in task order.
fn attempts(h: &mut Harness, session: SessionId) -> Vec<(u32, Option<String>)> {
    let rx = h.core.request(
        Request::ListTasks {
            session,
            states: vec![],
            after: TaskId(0),
            limit: 100,
        },
        h.now,
    );
    h.step();
    match h.core.answer(rx) {
        Some(Ok(Some(list))) => list
            .into_iter()
            .map(|t: flame_protocol::model::TaskInfo| (t.attempt, t.message))
            .collect(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn only_the_task_an_executor_ran_moves_to_its_next_attempt_when_it_crashes() {
    let mut h = Harness::new();
    let sid = session_id(h.client(ClientRequest::CreateSession(SessionSpec::new("ping"))));
    let _ = h.core.request(
        Request::Submit {
            session: sid,
            batch_id: 1,
            inputs: (0..3)
                .map(|_| Bytes::from_static(b"crash").into())
                .collect(),
        },
        h.now,
    );
    h.step();
    // Each executor takes the three tasks in order and crashes in the first: only that
    // one is charged, three times, and fails at attempt 3; the two queued behind it
    // never started and are still at their first attempt.
    for crash in 1..=3 {
        let executor = match &h.commands()[..] {
            [NodeCommand::Launch { executor, .. }] => *executor,
            other => panic!("crash {crash}: {other:?}"),
        };
        h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Ready {
            executor,
            credit: 8,
        }]));
        let runs = runs_sent(&mut h);
        assert_eq!(
            runs.iter()
                .map(|a| (a.task.0, a.attempt))
                .collect::<Vec<_>>(),
            [(1, crash), (2, 1), (3, 1)],
            "crash {crash}"
        );
        h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Exited {
            usage: Default::default(),
            executor,
            reason: "killed by signal 11".into(),
        }]));
        h.now += LAUNCH_BACKOFF_MIN_MS;
        tick(&mut h);
    }
    let tasks = attempts(&mut h, sid);
    assert_eq!(tasks.len(), 3);
    assert_eq!(tasks[0].0, 3);
    assert!(
        tasks[0]
            .1
            .as_deref()
            .is_some_and(|m| m.starts_with("failed 3 time(s), the limit is 3")),
        "{tasks:?}"
    );
    assert_eq!((tasks[1].0, tasks[2].0), (1, 1), "{tasks:?}");
}

#[test]
fn an_output_over_the_heads_limit_fails_its_task() {
    let mut h = Harness::with_config(CoreConfig {
        task_output_bytes_max: 4,
        ..CoreConfig::default()
    });
    let sid = session_id(h.client(ClientRequest::CreateSession(SessionSpec::new("ping"))));
    let _ = h.core.request(
        Request::Submit {
            session: sid,
            batch_id: 1,
            inputs: (0..2).map(|_| Bytes::from_static(b"x").into()).collect(),
        },
        h.now,
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
    let runs = runs_sent(&mut h);
    assert_eq!(runs.len(), 2);
    let outputs: [&'static [u8]; 2] = [b"four", b"five!"];
    h.node(NodeToHead::Results(
        runs.iter()
            .zip(outputs)
            .map(|(a, out)| NodeTaskResult {
                exit_code: None,
                executor,
                session: sid,
                task: a.task,
                attempt: a.attempt,
                outcome: TaskOutcome::Succeeded(Bytes::from_static(out)),
            })
            .collect(),
    ));
    let tasks = attempts(&mut h, sid);
    assert_eq!(tasks[0].1, None, "{tasks:?}");
    assert!(
        tasks[1]
            .1
            .as_deref()
            .is_some_and(|m| m.contains("output is 5 bytes") && m.contains("at most 4 bytes")),
        "{tasks:?}"
    );
}
