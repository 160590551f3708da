//! The node's connection to the head: register, heartbeat, apply commands, batch reports
//! and the object cache's events.

use crate::executor::{self, Command, Handle, LaunchSpec, Report};
use crate::log_server;
use flame_protocol::endpoint::{self, ClientIdentity, EndpointError, Trust};
use flame_protocol::frame::{FrameError, FrameWriter};
use flame_protocol::limits;
use flame_protocol::messages::{
    ExecutorEvent, ExecutorReport, HeadToNode, NodeCommand, NodeRegistration, NodeTaskResult,
    NodeToHead, ObjectService, Role,
};
use flame_protocol::model::{NodeResources, Resources};
use flame_protocol::object::{CacheUsage, ObjectCommand, ObjectEvent};
use flame_protocol::{ExecutorId, SessionId, TaskId};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// First wait before reconnecting; doubles up to [`RECONNECT_BACKOFF_MAX`].
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(200);
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// At a clean shutdown, how long the agent waits for its executors to kill their processes
/// and remove their cgroups and folders (each kill is bounded on its own).
pub const SHUTDOWN_EXECUTORS_TIMEOUT: Duration = Duration::from_secs(15);

/// Settings of the agent.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub head: String,
    /// The cluster CA, which the head's certificate must chain to.
    pub ca_file: PathBuf,
    /// The node's certificate and key, presented to the head (mutual TLS); the
    /// certificate names the node.
    pub identity: ClientIdentity,
    pub name: String,
    /// What the node offers to executors.
    pub allocatable: NodeResources,
    pub labels: BTreeMap<String, String>,
    /// `cgroup v1`, `cgroup v2` or `none`.
    pub isolation: flame_protocol::model::Isolation,
    /// How long executors keep running while the head is away, so that a restarted head
    /// can adopt them and the tasks they run.
    pub head_loss_grace: Duration,
    /// What every executor shares.
    pub executors: Arc<executor::Settings>,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Connect(#[from] EndpointError),
    #[error("the head refused this node: {0}")]
    Refused(String),
    #[error("lost the head: {0}")]
    Lost(String),
    #[error("frame error: {0}")]
    Frame(#[from] FrameError),
    /// The head broke the protocol in a way that needs a fresh start: the node drops the
    /// connection and registers again, telling the head what it really holds.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// What the agent knows of one executor, enough to tell a new head about it.
#[derive(Debug)]
struct Tracked {
    handle: Handle,
    application: String,
    /// The owner it was launched for.
    owner: String,
    resources: Resources,
    gpus: Vec<u32>,
    ready: bool,
    session: Option<SessionId>,
    /// Tasks handed to it whose result has not been sent to the head, in run order.
    tasks: VecDeque<(SessionId, TaskId, u32)>,
}

/// The agent's state, which outlives any one connection to the head: executors keep
/// running for [`NodeConfig::head_loss_grace`] while the head is away, and a new head is
/// told about them when the node registers again.
#[derive(Debug)]
struct Agent {
    config: NodeConfig,
    executors: HashMap<ExecutorId, Tracked>,
    /// Executors' reports, [`limits::NODE_REPORTS_MAX`] at most (see `executor::Reports`
    /// for what a full queue does). The agent reads it while connected and while shutting
    /// down, and never waits to send on it: its own reports go through `own_reports`.
    reports_tx: mpsc::Sender<Report>,
    reports_rx: mpsc::Receiver<Report>,
    /// The agent's own reports (executors the head named that are not here) that found the
    /// reports queue full, in order, each moved into it as room appears; at most
    /// [`limits::NODE_OWN_REPORTS_MAX`] (more is the head's protocol error).
    own_reports: VecDeque<Report>,
    /// Ids of executors that ended and hold nothing any more, for `live`; at most
    /// [`limits::NODE_EXECUTORS_GONE_MAX`], and an ended executor's empty task waits for
    /// room.
    gone_tx: mpsc::Sender<ExecutorId>,
    gone_rx: mpsc::Receiver<ExecutorId>,
    /// The object cache's events ([`limits::NODE_OBJECT_EVENTS_MAX`]), forwarded to the
    /// head while connected and dropped while not (the inventory sent at the next
    /// registration says what the node holds). Closed when the object service is off.
    object_events: mpsc::Receiver<ObjectEvent>,
    /// Successful registrations so far.
    registrations: u64,
    /// Executor tasks started and not yet gone (whatever they held is removed only then):
    /// a clean shutdown waits for them, also for those `stop_all` forgot.
    live: usize,
}

/// Serves the head until `shutdown` resolves, reconnecting with backoff after a loss.
/// A refusal by the head is final. `object_events`: the object cache's (see
/// [`crate::executor::objects::NodeObjects::open_store`]).
pub async fn run(
    config: NodeConfig,
    object_events: mpsc::Receiver<ObjectEvent>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), LinkError> {
    let endpoint = endpoint::client(
        &Trust::CaFile(config.ca_file.clone()),
        Some(config.identity.clone()),
    )?;
    let (reports_tx, reports_rx) = mpsc::channel(limits::NODE_REPORTS_MAX);
    let (gone_tx, gone_rx) = mpsc::channel(limits::NODE_EXECUTORS_GONE_MAX);
    let mut agent = Agent {
        config,
        executors: HashMap::new(),
        reports_tx,
        reports_rx,
        own_reports: VecDeque::new(),
        gone_tx,
        gone_rx,
        object_events,
        registrations: 0,
        live: 0,
    };
    tokio::pin!(shutdown);
    let mut backoff = RECONNECT_BACKOFF_MIN;
    let mut lost_since: Option<Instant> = None;
    loop {
        let registrations = agent.registrations;
        tokio::select! {
            r = agent.serve_once(&endpoint) => match r {
                Err(LinkError::Refused(reason)) => return Err(LinkError::Refused(reason)),
                Err(e) => {
                    tracing::warn!(head = %agent.config.head, error = %e, retry_in = ?backoff, "head connection failed");
                }
                Ok(()) => {
                    tracing::warn!(head = %agent.config.head, "head connection ended; reconnecting");
                }
            },
            _ = &mut shutdown => {
                endpoint.close(quinn::VarInt::from_u32(0), b"node shutting down");
                agent.stop_for_shutdown().await;
                return Ok(());
            }
        }
        if agent.registrations != registrations {
            // It was connected: the loss starts now, and reconnecting starts quick.
            lost_since = Some(Instant::now());
            backoff = RECONNECT_BACKOFF_MIN;
        }
        let grace = agent.config.head_loss_grace;
        if lost_since.is_some_and(|t| t.elapsed() >= grace) && !agent.executors.is_empty() {
            tracing::warn!(
                count = agent.executors.len(),
                ?grace,
                "the head has been away longer than the grace period; stopping executors"
            );
            agent.stop_all();
        }
        let sleep = tokio::time::sleep(backoff);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                // Nobody to tell; the next registration's inventory says what is held.
                Some(_) = agent.object_events.recv() => {}
                _ = &mut shutdown => {
                    agent.stop_for_shutdown().await;
                    return Ok(());
                }
            }
        }
        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
    }
}

impl Agent {
    /// The registration, with every executor still alive and the tasks it holds.
    fn registration(&self) -> NodeRegistration {
        NodeRegistration {
            name: self.config.name.clone(),
            allocatable: self.config.allocatable.clone(),
            labels: self.config.labels.clone(),
            isolation: self.config.isolation,
            identity: self.config.executors.identity.reported(),
            objects: self
                .config
                .executors
                .objects
                .as_ref()
                .map(|o| ObjectService {
                    port: o.port,
                    advertise: o.advertise,
                    host: o.host.clone(),
                    socket: o.socket.clone(),
                    usage: o.store.usage(),
                }),
            executors: self
                .executors
                .iter()
                .map(|(id, t)| ExecutorReport {
                    resources: t.resources,
                    gpus: t.gpus.clone(),
                    executor: *id,
                    application: t.application.clone(),
                    owner: t.owner.clone(),
                    ready: t.ready,
                    session: t.session,
                    tasks: t.tasks.iter().copied().collect(),
                    credit: self.config.executors.credit,
                })
                .collect(),
        }
    }

    /// Stops every executor (dropping a handle kills its process) and forgets reports
    /// nobody will read.
    fn stop_all(&mut self) {
        self.executors.clear();
        while self.reports_rx.try_recv().is_ok() {}
        self.own_reports.clear();
    }

    /// At a clean shutdown: stops every executor and waits, up to
    /// [`SHUTDOWN_EXECUTORS_TIMEOUT`], until each has removed its processes, cgroup and
    /// folders, so the node leaves nothing behind (its cgroup root goes after this).
    async fn stop_for_shutdown(&mut self) {
        self.stop_all();
        let deadline = tokio::time::sleep(SHUTDOWN_EXECUTORS_TIMEOUT);
        tokio::pin!(deadline);
        while self.live > 0 {
            tokio::select! {
                gone = self.gone_rx.recv() => match gone {
                    Some(_) => self.live -= 1,
                    None => break,
                },
                // Nobody reads them now; taken so that no executor waits to report while
                // it should be cleaning up.
                Some(_) = self.reports_rx.recv() => {}
                () = &mut deadline => {
                    tracing::warn!(
                        left = self.live,
                        timeout = ?SHUTDOWN_EXECUTORS_TIMEOUT,
                        "executors did not finish cleaning up before the shutdown; the next start removes what they left"
                    );
                    break;
                }
            }
        }
    }

    /// Updates what the agent knows from a report on its way to the head.
    ///
    /// Why the agent keeps this copy of state the executors hold, instead of asking them at
    /// registration: a registration must describe the node exactly as of the reports
    /// handed to the head before it, and only the one place every report passes through,
    /// in order, sees that cut. An executor's own state runs ahead of it (results it has
    /// queued but the head has not been sent: reported as held, the head would count them
    /// twice; left out, it would run them again) and behind the commands (runs still in
    /// its queue, which `apply` counts here as they are handed over). Asking would also
    /// wait on executors that are busy for up to a minute (entering a session) or gone
    /// (cleaning up), and reports made while the head is away must wait somewhere until a
    /// connection exists, which is this queue. So reports go through the agent, and the
    /// copy is what that cut is made of.
    fn track(&mut self, report: &Report) {
        match report {
            Report::Event(ExecutorEvent::Ready { executor, .. }) => {
                if let Some(t) = self.executors.get_mut(executor) {
                    t.ready = true;
                }
            }
            Report::Event(ExecutorEvent::Bound { executor, session }) => {
                if let Some(t) = self.executors.get_mut(executor) {
                    t.session = Some(*session);
                }
            }
            Report::Event(ExecutorEvent::Unbound { executor, .. }) => {
                if let Some(t) = self.executors.get_mut(executor) {
                    t.session = None;
                }
            }
            Report::Event(ExecutorEvent::Exited { executor, .. }) => {
                self.executors.remove(executor);
            }
            Report::Object(_) => {}
            Report::Result(r) => {
                if let Some(t) = self.executors.get_mut(&r.executor) {
                    if let Some(pos) = t
                        .tasks
                        .iter()
                        .position(|&(s, task, _)| s == r.session && task == r.task)
                    {
                        t.tasks.remove(pos);
                    }
                }
            }
        }
    }

    async fn serve_once(&mut self, endpoint: &quinn::Endpoint) -> Result<(), LinkError> {
        let config = &self.config;
        let agent = format!("flame-node {}", env!("CARGO_PKG_VERSION"));
        let greeted = endpoint::connect(
            endpoint,
            &config.head,
            Role::Node,
            &agent,
            None,
            limits::CONNECT_TIMEOUT,
        )
        .await?;
        // Besides the control stream, the head opens streams of its own (logs).
        let conn = greeted.connection;
        let mut send = greeted.send;
        let mut recv = greeted.recv;
        // What the cache holds goes after the registration; the events queued before it
        // are in that inventory, or about copies no longer there.
        while self.object_events.try_recv().is_ok() {}
        let inventory = self.inventory();
        let registration = self.registration();
        let kept = registration.executors.len();
        send.write(&NodeToHead::Register(registration)).await?;
        let heartbeat =
            match tokio::time::timeout(limits::CONNECT_TIMEOUT, recv.read_required::<HeadToNode>())
                .await
            {
                Err(_) => return Err(LinkError::Lost("no answer to the registration".into())),
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(HeadToNode::Registered {
                    heartbeat_interval_ms,
                    grant_key,
                    inline_max,
                    output_max,
                })) => {
                    if let Some(objects) = &config.executors.objects {
                        objects.grant_key.set(grant_key);
                        objects.set_inline_max(inline_max);
                        objects.set_output_max(output_max);
                    }
                    Duration::from_millis(heartbeat_interval_ms.clamp(100, 60_000))
                }
                Ok(Ok(HeadToNode::Refused { reason })) => return Err(LinkError::Refused(reason)),
                Ok(Ok(other)) => {
                    return Err(LinkError::Lost(format!(
                        "expected a registration answer, got {other:?}"
                    )))
                }
            };
        self.registrations += 1;
        // Launchers (`flame local`, tests) wait for this line.
        println!(
            "{}",
            flame_protocol::ready::Daemon::Node.ready_line(&self.config.name)
        );
        tracing::info!(name = %self.config.name, head = %self.config.head, executors_kept = kept, "registered with the head");

        // The writer's queue: while it is full the agent takes no reports (they wait in
        // `reports_rx`, and executors behind them) but goes on reading the head, so a
        // slow connection never stops the commands and heartbeats from the head.
        let (out_tx, out_rx) = mpsc::channel::<Report>(limits::NODE_REPORTS_WRITER_MAX);
        let usage = Usage(self.config.executors.objects.clone());
        let writer = tokio::spawn(write_reports(send, out_rx, heartbeat, inventory, usage));
        // The head answers every heartbeat; silence this long means a dead head or a cut
        // link, however long QUIC would go on retransmitting. It is longer than the head's
        // heartbeat timeout, so a head that was only paused finds the node still here.
        let silence_max = limits::HEAD_SILENCE_MAX;
        let mut heard = tokio::time::Instant::now();
        let result = loop {
            tokio::select! {
                frame = recv.read::<HeadToNode>() => match frame {
                    Ok(Some(HeadToNode::Commands(commands))) => {
                        heard = tokio::time::Instant::now();
                        if let Err(e) = commands.into_iter().try_for_each(|c| self.apply(c)) {
                            break Err(e);
                        }
                    }
                    Ok(Some(HeadToNode::Heartbeat)) => heard = tokio::time::Instant::now(),
                    Ok(Some(other)) => tracing::warn!(message = ?other, "unexpected message ignored"),
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(LinkError::Frame(e)),
                },
                Some((room, report)) = next_report(&out_tx, &mut self.reports_rx) => {
                    self.track(&report);
                    let Some(room) = room else {
                        break Err(LinkError::Lost("the report writer stopped".into()));
                    };
                    room.send(report);
                    // Whatever else is queued moves on in the same wakeup while the writer
                    // has room: one pass of this loop per report would cost a select of
                    // every branch per result.
                    for _ in 1..limits::NODE_REPORTS_WRITER_MAX {
                        let Ok(room) = out_tx.try_reserve() else { break };
                        let Ok(report) = self.reports_rx.try_recv() else { break };
                        self.track(&report);
                        room.send(report);
                    }
                }
                Some((room, event)) = next_report(&out_tx, &mut self.object_events) => {
                    let Some(room) = room else {
                        break Err(LinkError::Lost("the report writer stopped".into()));
                    };
                    room.send(Report::Object(event));
                    for _ in 1..limits::MESSAGE_BATCH_MAX {
                        let Ok(room) = out_tx.try_reserve() else { break };
                        let Ok(event) = self.object_events.try_recv() else { break };
                        room.send(Report::Object(event));
                    }
                }
                () = queue_own(&self.reports_tx, &mut self.own_reports), if !self.own_reports.is_empty() => {}
                Some(_) = self.gone_rx.recv() => {
                    // Only the count: the executor's entry goes when its `Exited` report,
                    // queued before it said gone, passes `track`. Until then the head has
                    // not heard of the exit and may still name it; its commands go to a
                    // closed queue and are dropped (`apply`), instead of each making an
                    // "unknown" report the head did not provoke, and the registration cut
                    // keeps it until the report that ends it.
                    self.live = self.live.saturating_sub(1);
                }
                incoming = conn.accept_bi() => match incoming {
                    // Each ends by itself when the head stops it or the connection goes.
                    Ok((send, recv)) => {
                        tokio::spawn(log_server::serve(send, recv, self.config.executors.clone()));
                    }
                    Err(e) => break Err(LinkError::Lost(format!("the connection ended: {e}"))),
                },
                () = tokio::time::sleep_until(heard + silence_max) => {
                    break Err(LinkError::Lost(format!("no word from the head for {silence_max:?}")));
                }
            }
        };
        writer.abort();
        result
    }

    /// Applies one command of the head; `Err`: the head broke the protocol, and the link
    /// is dropped (the commands after it in its frame are not applied).
    fn apply(&mut self, command: NodeCommand) -> Result<(), LinkError> {
        let (id, command) = match command {
            NodeCommand::Launch {
                executor,
                application,
                owner,
                gpus,
            } => {
                if self.executors.contains_key(&executor) {
                    tracing::warn!(%executor, "launch of an existing executor ignored");
                    return Ok(());
                }
                tracing::debug!(%executor, app = %application.name, "launching executor");
                let name = application.name.clone();
                let owner_name = owner.name.clone();
                let resources = application.resources;
                let handle = executor::spawn(
                    self.config.executors.clone(),
                    LaunchSpec {
                        executor,
                        application: *application,
                        owner,
                        gpus: gpus.clone(),
                    },
                    self.reports_tx.clone(),
                    self.gone_tx.clone(),
                );
                self.live += 1;
                self.executors.insert(
                    executor,
                    Tracked {
                        handle,
                        application: name,
                        owner: owner_name,
                        resources,
                        gpus,
                        ready: false,
                        session: None,
                        tasks: VecDeque::new(),
                    },
                );
                return Ok(());
            }
            NodeCommand::Bind {
                executor,
                session,
                common_data,
                sources,
            } => (
                executor,
                Command::Bind {
                    session,
                    common_data,
                    sources,
                },
            ),
            NodeCommand::Run(a) => (a.executor, Command::Run(a)),
            NodeCommand::Unbind { executor } => (executor, Command::Unbind),
            NodeCommand::Release { executor } => (executor, Command::Release),
            NodeCommand::Objects(command) => {
                self.apply_objects(command);
                return Ok(());
            }
            NodeCommand::Kill { executor } => {
                // Dropping the handle fires its kill switch; the executor reports Exited.
                if self.executors.remove(&executor).is_none() {
                    return self.report_unknown(executor);
                }
                return Ok(());
            }
        };
        let Some(t) = self.executors.get_mut(&id) else {
            // The head believes in an executor this node does not have: tell it so.
            return self.report_unknown(id);
        };
        let task = match &command {
            Command::Run(a) => Some((a.session, a.task, a.attempt)),
            _ => None,
        };
        match t.handle.commands.try_send(command) {
            Ok(()) => t.tasks.extend(task),
            // It is exiting (cleaning up after its process): its own `Exited`, with the real
            // reason, follows. Reporting it unknown now would race that.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                t.tasks.extend(task);
                tracing::debug!(executor = %id, "command for an exiting executor dropped");
            }
            // See `executor::spawn`: a head that keeps its credit never gets here.
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(LinkError::Protocol(format!(
                    "the head sent executor {id} more than its {} queued commands (its credit \
                     and {} more)",
                    executor::commands_max(&self.config.executors),
                    limits::NODE_EXECUTOR_COMMANDS_SLACK
                )));
            }
        }
        Ok(())
    }

    /// What the object cache holds, as the `Stored` events sent after registering.
    fn inventory(&self) -> Vec<ObjectEvent> {
        let Some(objects) = &self.config.executors.objects else {
            return Vec::new();
        };
        objects
            .store
            .inventory()
            .into_iter()
            .map(|(owner, object, scope)| ObjectEvent::Stored {
                owner,
                object,
                scope,
            })
            .collect()
    }

    /// Applies a command for the object cache (ignored when the object service is off:
    /// such a node holds nothing). A replication runs on its own, one of the node's
    /// fetches; with every fetch slot taken it is skipped, and the head, hearing of no
    /// new copy, may ask again.
    fn apply_objects(&self, command: ObjectCommand) {
        let Some(objects) = &self.config.executors.objects else {
            return;
        };
        match command {
            ObjectCommand::EndSession { owner, session } => {
                objects.store.end_session(&owner, session);
            }
            ObjectCommand::Remove { owner, ids } => objects.store.remove(&owner, &ids),
            ObjectCommand::Replicate {
                owner,
                scope,
                sources,
            } => {
                if let Err(why) = objects.clone().start_replicate(owner, scope, sources) {
                    tracing::warn!("{why}");
                }
            }
        }
    }

    /// Tells the head that `executor` is not on this node, after the reports queued before.
    fn report_unknown(&mut self, executor: ExecutorId) -> Result<(), LinkError> {
        let mut report = Report::Event(ExecutorEvent::Exited {
            executor,
            reason: "unknown on this node".into(),
            usage: Default::default(),
        });
        if self.own_reports.is_empty() {
            match self.reports_tx.try_send(report) {
                // Closed cannot be: the agent holds the receiver.
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(r)) => report = r,
            }
        }
        if self.own_reports.len() >= limits::NODE_OWN_REPORTS_MAX {
            return Err(LinkError::Protocol(format!(
                "the head named more than {} executors this node does not have while not \
                 reading its reports",
                limits::NODE_OWN_REPORTS_MAX
            )));
        }
        self.own_reports.push_back(report);
        Ok(())
    }
}

/// Merges executor reports into batched frames, in arrival order, and heartbeats.
/// Output bytes of results sent in one frame, at most (a single larger one goes alone).
pub const RESULTS_FRAME_BYTES_TARGET: usize = 16 * 1024 * 1024;

/// The payload of a result: its output or message.
fn result_bytes(r: &flame_protocol::messages::NodeTaskResult) -> usize {
    match &r.outcome {
        flame_protocol::model::TaskOutcome::Succeeded(b) => b.len(),
        flame_protocol::model::TaskOutcome::Failed(m) => m.len(),
        flame_protocol::model::TaskOutcome::Cancelled
        | flame_protocol::model::TaskOutcome::Object(_) => 0,
    }
}

/// Room in the writer's queue and the next report (or object event) to fill it; `None` for
/// the room when the writer stopped. Cancel-safe: a reservation dropped unused frees its
/// room, and a report not received stays queued.
async fn next_report<'a, T>(
    out: &'a mpsc::Sender<Report>,
    reports: &mut mpsc::Receiver<T>,
) -> Option<(Option<mpsc::Permit<'a, Report>>, T)> {
    let room = out.reserve().await.ok();
    let report = reports.recv().await?;
    Some((room, report))
}

/// Moves the oldest of the agent's own reports into the reports queue once it has room.
/// Cancel-safe: the report leaves `own` only with the room to put it in. (The queue is
/// never closed: the agent holds its receiver.)
async fn queue_own(reports: &mpsc::Sender<Report>, own: &mut VecDeque<Report>) {
    if let Ok(room) = reports.reserve().await {
        if let Some(report) = own.pop_front() {
            room.send(report);
        }
    }
}

/// The object cache's usage, sent with its events (zeros when the service is off).
struct Usage(Option<Arc<executor::objects::NodeObjects>>);

impl Usage {
    fn now(&self) -> CacheUsage {
        self.0
            .as_ref()
            .map_or_else(CacheUsage::default, |o| o.store.usage())
    }
}

/// Reports gathered into frames: consecutive reports of one kind share a frame, order
/// across kinds is kept, and a frame of results stays near [`RESULTS_FRAME_BYTES_TARGET`].
#[derive(Default)]
struct Frames {
    events: Vec<ExecutorEvent>,
    results: Vec<NodeTaskResult>,
    results_bytes: usize,
    objects: Vec<ObjectEvent>,
}

impl Frames {
    /// Adds `report`; returns the frame it could not join, to be sent before it.
    fn push(&mut self, report: Report, usage: &Usage) -> Option<NodeToHead> {
        let full = match &report {
            Report::Event(_) => self.events.is_empty(),
            Report::Result(r) => {
                // A frame of results stays well under the frame limit however big each
                // output is (up to the task output limit).
                self.results.is_empty()
                    || self.results_bytes + result_bytes(r) > RESULTS_FRAME_BYTES_TARGET
            }
            Report::Object(_) => self.objects.is_empty(),
        };
        let before = if full { self.take(usage) } else { None };
        match report {
            Report::Event(e) => self.events.push(e),
            Report::Result(r) => {
                self.results_bytes += result_bytes(&r);
                self.results.push(r);
            }
            Report::Object(o) => self.objects.push(o),
        }
        before
    }

    /// The frame gathered so far, if any.
    fn take(&mut self, usage: &Usage) -> Option<NodeToHead> {
        if !self.events.is_empty() {
            return Some(NodeToHead::ExecutorEvents(std::mem::take(&mut self.events)));
        }
        if !self.results.is_empty() {
            self.results_bytes = 0;
            return Some(NodeToHead::Results(std::mem::take(&mut self.results)));
        }
        if !self.objects.is_empty() {
            return Some(NodeToHead::Objects {
                events: std::mem::take(&mut self.objects),
                usage: usage.now(),
            });
        }
        None
    }
}

/// Writes the cache's inventory (in frames of [`limits::MESSAGE_BATCH_MAX`] events), then
/// merges reports into batched frames, in arrival order, and heartbeats.
async fn write_reports(
    mut send: FrameWriter<quinn::SendStream>,
    mut reports: mpsc::Receiver<Report>,
    heartbeat: Duration,
    mut inventory: Vec<ObjectEvent>,
    usage: Usage,
) {
    while !inventory.is_empty() {
        let rest = inventory.split_off(inventory.len().min(limits::MESSAGE_BATCH_MAX));
        let events = std::mem::replace(&mut inventory, rest);
        let frame = NodeToHead::Objects {
            events,
            usage: usage.now(),
        };
        if send.write(&frame).await.is_err() {
            return;
        }
    }
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The cache's use changes without events too (task outputs, spills): sent with the
    // heartbeat when it differs from what the head last heard.
    let mut usage_sent = usage.now();
    loop {
        let first = tokio::select! {
            r = reports.recv() => match r {
                Some(r) => r,
                None => return,
            },
            _ = ticker.tick() => {
                let now = usage.now();
                if now != usage_sent {
                    usage_sent = now;
                    let frame = NodeToHead::Objects { events: Vec::new(), usage: now };
                    if send.write(&frame).await.is_err() {
                        return;
                    }
                }
                if send.write(&NodeToHead::Heartbeat).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let mut batch = vec![first];
        while batch.len() < limits::MESSAGE_BATCH_MAX {
            match reports.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut frames = Frames::default();
        for r in batch {
            if let Some(frame) = frames.push(r, &usage) {
                if send.write(&frame).await.is_err() {
                    return;
                }
            }
        }
        if let Some(frame) = frames.take(&usage) {
            if send.write(&frame).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flame_protocol::model::TaskOutcome;
    use flame_protocol::object::{ObjectRef, ObjectScope};

    fn result(task: u64, bytes: usize) -> Report {
        Report::Result(NodeTaskResult {
            executor: ExecutorId(1),
            session: SessionId(1),
            task: TaskId(task),
            attempt: 1,
            outcome: TaskOutcome::Succeeded(vec![0u8; bytes].into()),
            exit_code: None,
        })
    }

    fn stored(n: u8) -> Report {
        Report::Object(ObjectEvent::Stored {
            owner: "a".into(),
            object: ObjectRef::of(&[n]),
            scope: ObjectScope::Kept,
        })
    }

    /// The kinds and sizes of the frames a batch of reports makes.
    fn frames(reports: Vec<Report>) -> Vec<String> {
        let usage = Usage(None);
        let mut frames = Frames::default();
        let mut out: Vec<NodeToHead> = reports
            .into_iter()
            .filter_map(|r| frames.push(r, &usage))
            .collect();
        out.extend(frames.take(&usage));
        out.iter()
            .map(|f| match f {
                NodeToHead::ExecutorEvents(e) => format!("events {}", e.len()),
                NodeToHead::Results(r) => format!("results {}", r.len()),
                NodeToHead::Objects { events, .. } => format!("objects {}", events.len()),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn object_events_share_frames_between_reports_in_order() {
        let ready = || {
            Report::Event(ExecutorEvent::Ready {
                executor: ExecutorId(1),
                credit: 1,
            })
        };
        assert_eq!(
            frames(vec![
                stored(1),
                stored(2),
                result(1, 1),
                result(2, 1),
                stored(3),
                ready(),
                ready(),
            ]),
            ["objects 2", "results 2", "objects 1", "events 2"]
        );
        assert!(frames(Vec::new()).is_empty());
    }

    #[test]
    fn a_frame_of_results_stays_near_its_byte_target() {
        let half = RESULTS_FRAME_BYTES_TARGET / 2;
        assert_eq!(
            frames(vec![result(1, half), result(2, half), result(3, 1)]),
            ["results 2", "results 1"]
        );
    }
}
