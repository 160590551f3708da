//! The node's connection to the head: register, heartbeat, apply commands, batch reports.

use crate::executor::{self, Command, Handle, LaunchSpec, Report};
use flame_protocol::endpoint::{self, EndpointError};
use flame_protocol::frame::{FrameError, FrameWriter};
use flame_protocol::limits;
use flame_protocol::messages::{
    ExecutorEvent, HeadToNode, NodeCommand, NodeRegistration, NodeToHead, Role,
};
use flame_protocol::ExecutorId;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;

/// First wait before reconnecting; doubles up to [`RECONNECT_BACKOFF_MAX`].
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(200);
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Settings of the agent.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub head: String,
    pub ca_file: PathBuf,
    pub name: String,
    pub cpus: u32,
    pub memory_bytes: u64,
    pub work_dir: PathBuf,
    /// Tasks the head may have outstanding per executor.
    pub credit: u32,
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
}

/// Serves the head until `shutdown` resolves, reconnecting with backoff after a loss.
/// A refusal by the head is final.
pub async fn run(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), LinkError> {
    let endpoint = endpoint::client(&config.ca_file)?;
    tokio::pin!(shutdown);
    let mut backoff = RECONNECT_BACKOFF_MIN;
    loop {
        let session = serve_once(&endpoint, &config);
        tokio::select! {
            r = session => match r {
                Err(LinkError::Refused(reason)) => return Err(LinkError::Refused(reason)),
                Err(e) => {
                    tracing::warn!(head = %config.head, error = %e, retry_in = ?backoff, "head connection failed");
                }
                Ok(()) => {
                    backoff = RECONNECT_BACKOFF_MIN;
                    tracing::warn!(head = %config.head, "head connection ended; reconnecting");
                }
            },
            _ = &mut shutdown => {
                endpoint.close(quinn::VarInt::from_u32(0), b"node shutting down");
                return Ok(());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = &mut shutdown => return Ok(()),
        }
        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
    }
}

async fn serve_once(endpoint: &quinn::Endpoint, config: &NodeConfig) -> Result<(), LinkError> {
    let agent = format!("flame-node {}", env!("CARGO_PKG_VERSION"));
    let greeted = endpoint::connect(
        endpoint,
        &config.head,
        Role::Node,
        &agent,
        limits::CONNECT_TIMEOUT,
    )
    .await?;
    let mut send = greeted.send;
    let mut recv = greeted.recv;
    send.write(&NodeToHead::Register(NodeRegistration {
        name: config.name.clone(),
        cpus: config.cpus,
        memory_bytes: config.memory_bytes,
        executors: Vec::new(),
    }))
    .await?;
    let heartbeat =
        match tokio::time::timeout(limits::CONNECT_TIMEOUT, recv.read_required::<HeadToNode>())
            .await
        {
            Err(_) => return Err(LinkError::Lost("no answer to the registration".into())),
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(HeadToNode::Registered {
                heartbeat_interval_ms,
            })) => Duration::from_millis(heartbeat_interval_ms.clamp(100, 60_000)),
            Ok(Ok(HeadToNode::Refused { reason })) => return Err(LinkError::Refused(reason)),
            Ok(Ok(other)) => {
                return Err(LinkError::Lost(format!(
                    "expected a registration answer, got {other:?}"
                )))
            }
        };
    // Launchers (`flame local`, tests) wait for this line.
    println!("flame-node registered as {}", config.name);
    tracing::info!(name = %config.name, head = %config.head, "registered with the head");

    let (reports_tx, reports_rx) = mpsc::unbounded_channel::<Report>();
    let writer = tokio::spawn(write_reports(send, reports_rx, heartbeat));
    let (gone_tx, mut gone_rx) = mpsc::unbounded_channel::<ExecutorId>();
    let mut executors: HashMap<ExecutorId, Handle> = HashMap::new();
    let result = loop {
        tokio::select! {
            frame = recv.read::<HeadToNode>() => match frame {
                Ok(Some(HeadToNode::Commands(commands))) => {
                    for c in commands {
                        apply(c, config, &mut executors, &reports_tx, &gone_tx);
                    }
                }
                Ok(Some(other)) => tracing::warn!(message = ?other, "unexpected message ignored"),
                Ok(None) => break Ok(()),
                Err(e) => break Err(LinkError::Frame(e)),
            },
            Some(id) = gone_rx.recv() => {
                executors.remove(&id);
            }
        }
    };
    // Without the head nobody can use the executors' results: stop them all.
    let count = executors.len();
    executors.clear();
    if count > 0 {
        tracing::warn!(count, "stopped executors after losing the head");
    }
    writer.abort();
    result
}

fn apply(
    command: NodeCommand,
    config: &NodeConfig,
    executors: &mut HashMap<ExecutorId, Handle>,
    reports: &mpsc::UnboundedSender<Report>,
    gone: &mpsc::UnboundedSender<ExecutorId>,
) {
    let (id, command) = match command {
        NodeCommand::Launch {
            executor,
            application,
        } => {
            if executors.contains_key(&executor) {
                tracing::warn!(%executor, "launch of an existing executor ignored");
                return;
            }
            tracing::debug!(%executor, app = %application.name, "launching executor");
            let handle = executor::spawn(
                LaunchSpec {
                    executor,
                    application,
                    node_name: config.name.clone(),
                    work_dir: config.work_dir.clone(),
                    credit: config.credit,
                },
                reports.clone(),
                gone.clone(),
            );
            executors.insert(executor, handle);
            return;
        }
        NodeCommand::Bind {
            executor,
            session,
            common_data,
        } => (
            executor,
            Command::Bind {
                session,
                common_data,
            },
        ),
        NodeCommand::Run(a) => (a.executor, Command::Run(a)),
        NodeCommand::Unbind { executor } => (executor, Command::Unbind),
        NodeCommand::Release { executor } => (executor, Command::Release),
        NodeCommand::Kill { executor } => {
            // Dropping the handle fires its kill switch; the executor reports Exited.
            if executors.remove(&executor).is_none() {
                let _ = reports.send(Report::Event(ExecutorEvent::Exited {
                    executor,
                    reason: "unknown on this node".into(),
                }));
            }
            return;
        }
    };
    let delivered = executors
        .get(&id)
        .is_some_and(|h| h.commands.send(command).is_ok());
    if !delivered {
        // The head believes in an executor this node does not have: tell it it is gone.
        executors.remove(&id);
        let _ = reports.send(Report::Event(ExecutorEvent::Exited {
            executor: id,
            reason: "unknown on this node".into(),
        }));
    }
}

/// Merges executor reports into batched frames, in arrival order, and heartbeats.
async fn write_reports(
    mut send: FrameWriter<quinn::SendStream>,
    mut reports: mpsc::UnboundedReceiver<Report>,
    heartbeat: Duration,
) {
    let mut ticker = tokio::time::interval(heartbeat);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            r = reports.recv() => match r {
                Some(r) => r,
                None => return,
            },
            _ = ticker.tick() => {
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
        // Consecutive reports of one kind share a frame; order across kinds is kept.
        let mut events = Vec::new();
        let mut results = Vec::new();
        for r in batch {
            match r {
                Report::Event(e) => {
                    if !results.is_empty() {
                        let frame = NodeToHead::Results(std::mem::take(&mut results));
                        if send.write(&frame).await.is_err() {
                            return;
                        }
                    }
                    events.push(e);
                }
                Report::Result(r) => {
                    if !events.is_empty() {
                        let frame = NodeToHead::ExecutorEvents(std::mem::take(&mut events));
                        if send.write(&frame).await.is_err() {
                            return;
                        }
                    }
                    results.push(r);
                }
            }
        }
        let tail = if !events.is_empty() {
            NodeToHead::ExecutorEvents(events)
        } else {
            NodeToHead::Results(results)
        };
        if send.write(&tail).await.is_err() {
            return;
        }
    }
}
