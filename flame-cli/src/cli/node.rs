//! `flame node ...`

use super::render::{self, number, text, OutputArgs, OutputFormat};
use super::GlobalArgs;
use clap::Subcommand;
use flame_protocol::model::{format_cpus, NodeInfo, NodeState};

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List nodes
    List(OutputArgs),
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
                    println!("No nodes have registered.");
                    Ok(())
                }
                OutputFormat::Table => {
                    print_list(&nodes);
                    Ok(())
                }
            }
        }
    }
}

fn print_list(nodes: &[NodeInfo]) {
    let now = render::now_ms();
    let columns = [
        text("Name"),
        text("State"),
        text("CPUs (used/offered)"),
        text("Memory (used/offered)"),
        text("GPUs"),
        text("Labels"),
        text("Isolation"),
        number("Executors"),
        text("Last seen"),
    ];
    let rows = nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                match n.state {
                    NodeState::Ready => "Ready",
                    NodeState::NotReady => "NotReady",
                }
                .to_string(),
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
                n.isolation.clone(),
                render::group(u64::from(n.executors)),
                render::ago(n.last_seen_ms, now),
            ]
        })
        .collect();
    render::print_table(&columns, rows);
}
