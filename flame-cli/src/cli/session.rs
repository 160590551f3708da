//! `flame session ...`

use super::GlobalArgs;
use crate::render::outln;
use crate::render::{self, number, text, OutputArgs, OutputFormat};
use clap::Subcommand;
use flame_protocol::model::{SessionInfo, SessionState, TaskInfo, TaskState};
use flame_protocol::{SessionId, TaskId};

/// Failed tasks `session view` shows, with their messages.
pub const VIEW_FAILED_TASKS_MAX: u32 = 10;
/// Tasks `session tasks` asks the head for per request while paging.
const TASKS_PAGE: u32 = 1000;

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
    /// Cancel a session: close it and end its pending and running tasks as Cancelled
    Cancel { id: SessionId },
    /// List a session's tasks, optionally only those in some states
    Tasks {
        id: SessionId,
        /// Only tasks in this state (repeatable)
        #[arg(long = "state", value_enum)]
        states: Vec<StateArg>,
        /// Most tasks to list; a note on stderr says when there are more
        #[arg(long, default_value_t = 100, conflicts_with = "all")]
        limit: u64,
        /// List every task, however many
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Show one task: its state, attempt, error message and output
    Task(super::task::TaskArgs),
}

/// A task state on the command line.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum StateArg {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl From<StateArg> for TaskState {
    fn from(s: StateArg) -> TaskState {
        match s {
            StateArg::Pending => TaskState::Pending,
            StateArg::Running => TaskState::Running,
            StateArg::Succeeded => TaskState::Succeeded,
            StateArg::Failed => TaskState::Failed,
            StateArg::Cancelled => TaskState::Cancelled,
        }
    }
}

pub async fn run(global: &GlobalArgs, cmd: SessionCommand) -> anyhow::Result<()> {
    match cmd {
        SessionCommand::Task(args) => super::task::view(global, args).await,
        SessionCommand::List(out) => {
            let sessions =
                super::with_client(
                    global,
                    |client| async move { Ok(client.list_sessions().await?) },
                )
                .await?;
            match out.output {
                OutputFormat::Json => {
                    render::print_json(&sessions.iter().map(session_json).collect::<Vec<_>>())
                }
                OutputFormat::Table if sessions.is_empty() => {
                    outln!("No sessions.")?;
                    Ok(())
                }
                OutputFormat::Table => {
                    print_list(&sessions)?;
                    Ok(())
                }
            }
        }
        SessionCommand::View { id, output } => {
            let (info, failed) = super::with_client(global, |client| async move {
                let info = client.get_session(id).await?;
                let failed = if info.counts.failed > 0 {
                    client
                        .list_tasks(
                            id,
                            vec![TaskState::Failed],
                            TaskId(0),
                            VIEW_FAILED_TASKS_MAX,
                        )
                        .await?
                } else {
                    Vec::new()
                };
                Ok((info, failed))
            })
            .await?;
            match output.output {
                OutputFormat::Json => render::print_json(&session_json(&info)),
                OutputFormat::Table => {
                    print_one(&info)?;
                    print_usage(&info)?;
                    print_failed(&info, &failed)?;
                    Ok(())
                }
            }
        }
        SessionCommand::Cancel { id } => {
            super::with_client(global, |client| async move {
                Ok(client.cancel_session(id).await?)
            })
            .await?;
            outln!("Session {id} cancelled.")?;
            Ok(())
        }
        SessionCommand::Tasks {
            id,
            states,
            limit,
            all,
            output,
        } => {
            let states: Vec<TaskState> = states.into_iter().map(TaskState::from).collect();
            let limit = if all { u64::MAX } else { limit };
            let (tasks, more) = super::with_client(global, |client| async move {
                let mut tasks: Vec<TaskInfo> = Vec::new();
                let mut after = TaskId(0);
                while (tasks.len() as u64) < limit {
                    let want = (limit - tasks.len() as u64).min(u64::from(TASKS_PAGE)) as u32;
                    let page = client.list_tasks(id, states.clone(), after, want).await?;
                    let Some(last) = page.last() else {
                        return Ok((tasks, false));
                    };
                    after = last.task;
                    tasks.extend(page);
                }
                // Stopped at the limit: say so only when a task was left out.
                let more = !client.list_tasks(id, states, after, 1).await?.is_empty();
                Ok((tasks, more))
            })
            .await?;
            if more {
                eprintln!(
                    "flame: showing the first {} tasks; --limit N shows more, --all every one",
                    render::group(limit)
                );
            }
            match output.output {
                OutputFormat::Json => render::print_json(&tasks),
                OutputFormat::Table if tasks.is_empty() => {
                    outln!("No tasks.")?;
                    Ok(())
                }
                OutputFormat::Table => {
                    print_tasks(&tasks)?;
                    Ok(())
                }
            }
        }
        SessionCommand::Close { id } => {
            super::with_client(global, |client| async move {
                Ok(client.close_session(id).await?)
            })
            .await?;
            outln!("Session {id} closed.")?;
            Ok(())
        }
    }
}

/// A session as `--output json` prints it: the protocol's [`SessionInfo`] (so scripts and
/// the client library can read it back as one), plus `status`, the table's Status column
/// (`Open`, `Closed`, or `Finished` once closed with nothing left to run), and for a job
/// its `exit_code` once it has ended (what `flame submit` exits with).
pub fn session_json(info: &SessionInfo) -> serde_json::Value {
    let mut value = serde_json::to_value(info).unwrap_or(serde_json::Value::Null);
    if let Some(fields) = value.as_object_mut() {
        fields.insert("status".to_string(), state(info).into());
        if let (Some(job), Some(serde_json::Value::Object(job_fields))) =
            (&info.job, fields.get_mut("job"))
        {
            job_fields.insert("exit_code".to_string(), job.exit_code().into());
        }
    }
    value
}

fn state(info: &SessionInfo) -> &'static str {
    match info.state {
        SessionState::Open => "Open",
        SessionState::Closed if info.is_finished() => "Finished",
        SessionState::Closed => "Closed",
    }
}

fn print_list(sessions: &[SessionInfo]) -> anyhow::Result<()> {
    let now = render::now_ms();
    let columns = [
        number("ID"),
        text("Status"),
        text("App"),
        text("Owner"),
        number("Priority"),
        number("Executors"),
        number("Pending"),
        number("Running"),
        number("Succeeded"),
        number("Failed"),
        number("Cancelled"),
        text("Created"),
    ];
    let rows = sessions
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                state(s).to_string(),
                render::application(&s.application),
                s.owner.clone(),
                s.priority.to_string(),
                render::group(u64::from(s.executors)),
                render::group(s.counts.pending),
                render::group(s.counts.running),
                render::group(s.counts.succeeded),
                render::group(s.counts.failed),
                render::group(s.counts.cancelled),
                render::local_time(s.created_ms, now),
            ]
        })
        .collect();
    render::print_table(&columns, rows)?;
    Ok(())
}

fn print_one(info: &SessionInfo) -> anyhow::Result<()> {
    let now = render::now_ms();
    render::print_fields(vec![
        ("ID", info.id.to_string()),
        ("Status", state(info).to_string()),
        ("App", render::application(&info.application)),
        ("Owner", info.owner.clone()),
        ("Priority", info.priority.to_string()),
        (
            "Ephemeral",
            if info.ephemeral { "yes" } else { "no" }.to_string(),
        ),
        ("Executors", render::group(u64::from(info.executors))),
        (
            "Waiting",
            info.waiting.clone().unwrap_or_else(|| "-".into()),
        ),
        ("Pending", render::group(info.counts.pending)),
        ("Running", render::group(info.counts.running)),
        ("Succeeded", render::group(info.counts.succeeded)),
        ("Failed", render::group(info.counts.failed)),
        ("Cancelled", render::group(info.counts.cancelled)),
        ("Total", render::group(info.counts.total())),
        ("Object inputs", data_line(&info.data)),
        ("Created", render::local_time(info.created_ms, now)),
        (
            "Closed",
            info.closed_ms
                .map_or_else(|| "-".to_string(), |ms| render::local_time(ms, now)),
        ),
    ])?;
    Ok(())
}

/// How the session's object inputs reached their executors: the locality hit rate and the
/// bytes moved between nodes.
fn data_line(d: &flame_protocol::model::DataStats) -> String {
    if d.object_tasks == 0 {
        return "-".to_string();
    }
    let permille = d.local_tasks.saturating_mul(1000) / d.object_tasks;
    format!(
        "{} tasks, {}.{}% where their input was; {} fetched between nodes, {} read in place",
        render::group(d.object_tasks),
        permille / 10,
        permille % 10,
        render::bytes(d.fetched_bytes),
        render::bytes(d.local_bytes)
    )
}

/// What each executor that served the session used, from its node's cgroup.
fn print_usage(info: &SessionInfo) -> anyhow::Result<()> {
    if info.usage.is_empty() {
        return Ok(());
    }
    outln!()?;
    outln!("Executors that served it:")?;
    let columns = [
        number("Executor"),
        text("Node"),
        number("Bound"),
        number("CPU time"),
        number("Peak memory"),
        number("Throttled"),
        text("Ended"),
    ];
    let rows = info
        .usage
        .iter()
        .map(|u| {
            vec![
                u.executor.to_string(),
                u.node.clone(),
                humantime::format_duration(std::time::Duration::from_millis(u.bound_ms))
                    .to_string(),
                humantime::format_duration(std::time::Duration::from_millis(u.cpu_ms)).to_string(),
                render::bytes(u.memory_peak_bytes),
                humantime::format_duration(std::time::Duration::from_millis(u.throttled_ms))
                    .to_string(),
                u.ended
                    .as_deref()
                    .and_then(|m| m.lines().next())
                    .unwrap_or("-")
                    .to_string(),
            ]
        })
        .collect();
    render::print_table(&columns, rows)?;
    Ok(())
}

fn task_state(state: TaskState) -> &'static str {
    match state {
        TaskState::Pending => "Pending",
        TaskState::Running => "Running",
        TaskState::Succeeded => "Succeeded",
        TaskState::Failed => "Failed",
        TaskState::Cancelled => "Cancelled",
    }
}

/// The failed tasks of `session view`, each with its message (the application's error, or
/// why its executor died with the end of its stderr).
fn print_failed(info: &SessionInfo, failed: &[TaskInfo]) -> anyhow::Result<()> {
    if failed.is_empty() {
        return Ok(());
    }
    outln!()?;
    let shown = failed.len() as u64;
    if info.counts.failed > shown {
        outln!(
            "Failed tasks (first {shown} of {}; `flame session tasks {} --state failed` lists them all):",
            render::group(info.counts.failed),
            info.id
        )?;
    } else {
        outln!("Failed tasks:")?;
    }
    for t in failed {
        outln!("  task {} (attempt {}):", t.task, t.attempt)?;
        for line in t.message.as_deref().unwrap_or("(no message)").lines() {
            outln!("    {line}")?;
        }
    }
    Ok(())
}

fn print_tasks(tasks: &[TaskInfo]) -> anyhow::Result<()> {
    let columns = [
        number("Task"),
        text("State"),
        number("Attempt"),
        text("Message"),
    ];
    let rows = tasks
        .iter()
        .map(|t| {
            vec![
                t.task.to_string(),
                task_state(t.state).to_string(),
                t.attempt.to_string(),
                t.message
                    .as_deref()
                    .and_then(|m| m.lines().next())
                    .unwrap_or("")
                    .to_string(),
            ]
        })
        .collect();
    render::print_table(&columns, rows)?;
    Ok(())
}
