//! `flame session task SESSION TASK`: one task's state, attempt, error message and
//! output, read back where the head keeps them.
//!
//! What the head keeps of a task: its state, attempt and a failure's message, which
//! `ListTasks` reads; and a final task's outcome, which the session's result stream
//! replays (from the store for a durable session, from memory for an ephemeral one until
//! it is evicted). The output is read from that stream, stopping at the task's result, so
//! reading task N of a large session streams the results before it; outputs kept as
//! objects are fetched from the nodes as `flame run` fetches them.
//!
//! A task's input is not kept once the task is final (ARCHITECTURE.md, "Final task
//! records drop their input"), and no request reads the input of an unfinished task, so
//! there is nothing to show of it: `flame run` names a failed task's input itself.

use super::run::base64;
use super::GlobalArgs;
use crate::render::{self, outln, OutputArgs, OutputFormat};
use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use clap::Args;
use flame_client::report::HintExt as _;
use flame_client::Client;
use flame_protocol::model::{TaskInfo, TaskOutcome, TaskState};
use flame_protocol::{SessionId, TaskId};
use serde::Serialize;
use std::io::Write as _;
use std::time::Duration;

/// How long the result stream may send nothing before reading a task's output gives up:
/// the task is final, so its result is only waiting behind those before it.
pub const OUTPUT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Args)]
pub struct TaskArgs {
    /// The session's id
    pub session: SessionId,
    /// The task's id: for `flame run` and `flame submit --each`, its input's number from 1
    pub task: TaskId,
    /// Write only the output's bytes to stdout, nothing else (for binary outputs); fails
    /// unless the task succeeded
    #[arg(long, conflicts_with = "output")]
    pub raw: bool,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// One task as `--output json` prints it.
#[derive(Debug, Serialize)]
struct TaskView {
    session: SessionId,
    task: TaskId,
    state: TaskState,
    attempt: u32,
    /// A failed task's error.
    message: Option<String>,
    /// A succeeded task's output, when it is UTF-8 text.
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<String>,
    /// A succeeded task's output in base64, when it is not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    output_base64: Option<String>,
}

/// Shows one task; see the module documentation.
pub async fn view(global: &GlobalArgs, args: TaskArgs) -> anyhow::Result<()> {
    let (session, task) = (args.session, args.task);
    let (info, output) = super::with_client(global, |client| async move {
        let info = task_info(&client, session, task).await?;
        let output = match info.state {
            TaskState::Succeeded => Some(read_output(&client, session, task).await?),
            _ => None,
        };
        Ok((info, output))
    })
    .await?;
    if args.raw {
        let Some(output) = output else {
            return Err(anyhow!(
                "task {task} of session {session} is {}: it has no output",
                state_name(info.state)
            ))
            .hint(format!("`flame session task {session} {task}` shows why"));
        };
        let mut out = std::io::stdout().lock();
        return out
            .write_all(&output)
            .and_then(|()| out.flush())
            .map_err(render::stdout_error);
    }
    match args.output.output {
        OutputFormat::Json => {
            let text = output.as_ref().and_then(|o| std::str::from_utf8(o).ok());
            render::print_json(&TaskView {
                session,
                task,
                state: info.state,
                attempt: info.attempt,
                message: info.message.clone(),
                output: text.map(str::to_string),
                output_base64: output
                    .as_ref()
                    .filter(|_| text.is_none())
                    .map(|o| base64(o)),
            })
        }
        OutputFormat::Table => print_view(session, &info, output.as_ref()),
    }
}

/// The task's row as `ListTasks` gives it.
async fn task_info(client: &Client, session: SessionId, task: TaskId) -> anyhow::Result<TaskInfo> {
    let after = TaskId(task.0.saturating_sub(1));
    let page = client
        .list_tasks(session, Vec::new(), after, 1)
        .await
        .with_context(|| format!("cannot read task {task} of session {session}"))?;
    match page.into_iter().next() {
        Some(info) if info.task == task => Ok(info),
        _ => Err(anyhow!("session {session} has no task {task}"))
            .hint(format!("`flame session tasks {session}` lists its tasks")),
    }
}

/// The output of succeeded task `task`, read from the session's result stream.
async fn read_output(client: &Client, session: SessionId, task: TaskId) -> anyhow::Result<Bytes> {
    let session_handle = client
        .session(session)
        .await
        .with_context(|| format!("cannot read session {session}"))?;
    let mut watch = session_handle
        .watch()
        .await
        .with_context(|| format!("cannot read the results of session {session}"))?;
    loop {
        let next = tokio::time::timeout(OUTPUT_STALL_TIMEOUT, watch.next())
            .await
            .map_err(|_| {
                anyhow!(
                    "the head sent no result for {} while task {task}'s was awaited",
                    humantime::format_duration(OUTPUT_STALL_TIMEOUT)
                )
            })?;
        let Some(batch) = next else {
            bail!("the results of session {session} ended without task {task}'s: the head no longer holds it");
        };
        let batch = batch.context("reading the session's results failed")?;
        for result in batch {
            if result.task != task {
                continue;
            }
            return match result.outcome {
                TaskOutcome::Succeeded(output) => Ok(output),
                other => {
                    bail!("task {task}'s result is {other:?}, where its state said it succeeded")
                }
            };
        }
    }
}

fn state_name(state: TaskState) -> &'static str {
    match state {
        TaskState::Pending => "Pending",
        TaskState::Running => "Running",
        TaskState::Succeeded => "Succeeded",
        TaskState::Failed => "Failed",
        TaskState::Cancelled => "Cancelled",
    }
}

fn print_view(session: SessionId, info: &TaskInfo, output: Option<&Bytes>) -> anyhow::Result<()> {
    let mut fields = vec![
        ("Session", session.to_string()),
        ("Task", info.task.to_string()),
        ("State", state_name(info.state).to_string()),
        ("Attempt", info.attempt.to_string()),
    ];
    if let Some(output) = output {
        fields.push(("Output", render::bytes(output.len() as u64)));
    }
    render::print_fields(fields)?;
    if let Some(message) = &info.message {
        outln!()?;
        outln!("Error:")?;
        for line in message.lines() {
            outln!("  {line}")?;
        }
    }
    match output.map(|o| std::str::from_utf8(o)) {
        Some(Ok(text)) if !text.is_empty() => {
            outln!()?;
            outln!("{}", text.strip_suffix('\n').unwrap_or(text))?;
        }
        Some(Err(_)) => {
            outln!()?;
            outln!(
                "(not text; `flame session task {session} {} --raw` writes its bytes)",
                info.task
            )?;
        }
        _ => {}
    }
    Ok(())
}
