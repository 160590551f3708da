//! `flame node ...`

use super::GlobalArgs;
use crate::render::outln;
use crate::render::{self, number, text, OutputArgs, OutputFormat};
use anyhow::Context as _;
use clap::Subcommand;
use flame_client::report::HintExt as _;
use flame_client::ClientError;
use flame_protocol::model::{format_cpus, ErrorKind, ExecutorIdentity, NodeInfo, NodeState};

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List nodes
    List(OutputArgs),
    /// Place nothing new on a node: its idle executors are released, and its busy ones
    /// finish their sessions' work first; for maintenance or removal
    Drain {
        /// The node's name, as `flame node list` shows it
        name: String,
    },
    /// End a node's drain: it takes new executors again
    Undrain {
        /// The node's name, as `flame node list` shows it
        name: String,
    },
}

/// The hint for a node name the head does not know.
const UNKNOWN_NODE_HINT: &str = "`flame node list` shows the nodes the head knows";

/// Adds what was tried to a drain or undrain error, and a hint when the node is unknown.
fn node_error(result: Result<(), ClientError>, what: &str, name: &str) -> anyhow::Result<()> {
    match result {
        Err(e) if e.kind() == Some(ErrorKind::NotFound) => Err(e)
            .with_context(|| format!("cannot {what} node `{name}`"))
            .hint(UNKNOWN_NODE_HINT),
        other => other.with_context(|| format!("cannot {what} node `{name}`")),
    }
}

pub async fn run(global: &GlobalArgs, cmd: NodeCommand) -> anyhow::Result<()> {
    match cmd {
        NodeCommand::List(out) => {
            let nodes =
                super::with_client(
                    global,
                    |client| async move { Ok(client.list_nodes().await?) },
                )
                .await?;
            match out.output {
                OutputFormat::Json => render::print_json(&nodes),
                OutputFormat::Table if nodes.is_empty() => {
                    outln!("No nodes have registered.")?;
                    Ok(())
                }
                OutputFormat::Table => {
                    print_list(&nodes)?;
                    Ok(())
                }
            }
        }
        NodeCommand::Drain { name } => {
            super::with_client(global, |client| async move {
                node_error(client.drain_node(&name).await, "drain", &name)?;
                outln!(
                    "Node {name} is draining: nothing new is placed on it, and its executors \
                     are released once their sessions let them go."
                )?;
                outln!("`flame node list` shows its executors; `flame node undrain {name}` ends the drain.")?;
                Ok(())
            })
            .await
        }
        NodeCommand::Undrain { name } => {
            super::with_client(global, |client| async move {
                node_error(client.undrain_node(&name).await, "undrain", &name)?;
                outln!("Node {name} takes new executors again.")?;
                Ok(())
            })
            .await
        }
    }
}

fn state(state: NodeState) -> &'static str {
    match state {
        NodeState::Ready => "Ready",
        NodeState::NotReady => "NotReady",
        NodeState::Draining => "Draining",
    }
}

fn print_list(nodes: &[NodeInfo]) -> anyhow::Result<()> {
    let now = render::now_ms();
    let columns = [
        text("Name"),
        text("State"),
        text("CPUs (used/offered)"),
        text("Memory (used/offered)"),
        text("GPUs"),
        text("Labels"),
        text("Isolation"),
        text("Identity"),
        number("Executors"),
        text("Object cache (memory, disk)"),
        text("Last seen"),
    ];
    let rows = nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                state(n.state).to_string(),
                format!(
                    "{}/{}",
                    format_cpus(n.allocated.cpu_millis),
                    format_cpus(n.allocatable.cpu_millis)
                ),
                format!(
                    "{}/{}",
                    render::bytes(n.allocated.memory_bytes.unwrap_or(0)),
                    render::bytes(n.allocatable.memory_bytes)
                ),
                format!("{}/{}", n.allocated.gpus, n.allocatable.gpus.len()),
                if n.labels.is_empty() {
                    "-".to_string()
                } else {
                    n.labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(",")
                },
                n.isolation.to_string(),
                match &n.identity {
                    None => "-".to_string(),
                    Some(i) if i.shared() => format!("{i} (SHARED)"),
                    Some(i) => i.to_string(),
                },
                render::group(u64::from(n.executors)),
                match &n.cache {
                    None => "-".to_string(),
                    Some(c) => format!(
                        "{}/{}, {}/{}",
                        render::bytes(c.memory_used),
                        render::bytes(c.memory_capacity),
                        render::bytes(c.disk_used),
                        render::bytes(c.disk_capacity)
                    ),
                },
                render::ago(n.last_seen_ms, now),
            ]
        })
        .collect();
    render::print_table(&columns, rows)?;
    for n in nodes {
        if let Some(i) = n.identity.as_ref().filter(|i| i.shared()) {
            eprintln!("{}", shared_identity_warning(&n.name, i));
        }
    }
    Ok(())
}

/// What `flame node list` says of a node whose executors of every owner share one user.
fn shared_identity_warning(node: &str, identity: &ExecutorIdentity) -> String {
    let why = match identity {
        ExecutorIdentity::Unprivileged { user } => {
            format!("its agent is not root, so every executor runs as `{user}`")
        }
        ExecutorIdentity::Fixed { user } => {
            format!("it runs every owner's executors as `{user}` (--executor-identity fixed)")
        }
        ExecutorIdentity::OwnerUid | ExecutorIdentity::SiteUser => return String::new(),
    };
    format!(
        "warning: node {node}: {why}: users' executors there can read and signal each other's\n\
         hint: run flame-node as root with --executor-identity owner-uid (the default) or site-user"
    )
}
