//! `flame session ...`

use super::render::{self, number, text, OutputArgs, OutputFormat};
use super::GlobalArgs;
use clap::Subcommand;
use flame_protocol::model::{SessionInfo, SessionState};
use flame_protocol::SessionId;

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// List sessions
    List(OutputArgs),
    /// Show one session
    View {
        id: SessionId,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Close a session: it takes no more tasks and finishes when its tasks do
    Close { id: SessionId },
}

pub async fn run(global: &GlobalArgs, cmd: SessionCommand) -> anyhow::Result<()> {
    match cmd {
        SessionCommand::List(out) => {
            let sessions =
                super::with_client(
                    global,
                    |client| async move { Ok(client.list_sessions().await?) },
                )
                .await?;
            match out.output {
                OutputFormat::Json => render::print_json(&sessions),
                OutputFormat::Table if sessions.is_empty() => {
                    println!("No sessions.");
                    Ok(())
                }
                OutputFormat::Table => {
                    print_list(&sessions);
                    Ok(())
                }
            }
        }
        SessionCommand::View { id, output } => {
            let info =
                super::with_client(
                    global,
                    |client| async move { Ok(client.get_session(id).await?) },
                )
                .await?;
            match output.output {
                OutputFormat::Json => render::print_json(&info),
                OutputFormat::Table => {
                    print_one(&info);
                    Ok(())
                }
            }
        }
        SessionCommand::Close { id } => {
            super::with_client(global, |client| async move {
                Ok(client.close_session(id).await?)
            })
            .await?;
            println!("Session {id} closed.");
            Ok(())
        }
    }
}

fn state(info: &SessionInfo) -> &'static str {
    match info.state {
        SessionState::Open => "Open",
        SessionState::Closed if info.is_finished() => "Finished",
        SessionState::Closed => "Closed",
    }
}

fn print_list(sessions: &[SessionInfo]) {
    let now = render::now_ms();
    let columns = [
        number("ID"),
        text("State"),
        text("App"),
        number("Executors"),
        number("Pending"),
        number("Running"),
        number("Succeeded"),
        number("Failed"),
        text("Created"),
    ];
    let rows = sessions
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                state(s).to_string(),
                s.application.clone(),
                render::group(u64::from(s.executors)),
                render::group(s.counts.pending),
                render::group(s.counts.running),
                render::group(s.counts.succeeded),
                render::group(s.counts.failed),
                render::local_time(s.created_ms, now),
            ]
        })
        .collect();
    render::print_table(&columns, rows);
}

fn print_one(info: &SessionInfo) {
    let now = render::now_ms();
    render::print_fields(vec![
        ("ID", info.id.to_string()),
        ("State", state(info).to_string()),
        ("App", info.application.clone()),
        (
            "Ephemeral",
            if info.ephemeral { "yes" } else { "no" }.to_string(),
        ),
        ("Executors", render::group(u64::from(info.executors))),
        ("Pending", render::group(info.counts.pending)),
        ("Running", render::group(info.counts.running)),
        ("Succeeded", render::group(info.counts.succeeded)),
        ("Failed", render::group(info.counts.failed)),
        ("Total", render::group(info.counts.total())),
        ("Created", render::local_time(info.created_ms, now)),
        (
            "Closed",
            info.closed_ms
                .map_or_else(|| "-".to_string(), |ms| render::local_time(ms, now)),
        ),
    ]);
}
