//! `flame submit -n RANKS -- COMMAND` and `flame job list | view | cancel | logs`.
//!
//! A batch job is a session whose executors are its ranks: placed all together or not at
//! all, started together once placed, each running COMMAND to completion. Attached (the
//! default), `flame submit` prints the ranks' output (stdout and stderr, as their node
//! logged them) as it comes, and exits with the job's exit code: 0, the code of the first
//! rank that failed, 124 at the time limit, 130 when cancelled. Ctrl-C cancels the job.

use super::signals::StopSignals;
use super::submit::SubmitArgs;
use super::{Exit, GlobalArgs, Usage};
use crate::render::outln;
use crate::render::{self, number, text, OutputArgs, OutputFormat};
use anyhow::{anyhow, bail, Context as _};
use clap::{Args, Subcommand};
use flame_client::report::HintExt as _;
use flame_client::{Client, LogStream};
use flame_protocol::messages::LogEvent;
use flame_protocol::model::{
    format_bytes, format_cpus, JobInfo, JobSpec, JobState, Resources, SessionInfo, SessionSpec,
};
use flame_protocol::{ExecutorId, SessionId};
use std::collections::HashMap;
use std::time::Duration;

/// After the job ended, how long its ranks' last output may take to arrive (the logs of
/// its ranks close as their executors go, normally within milliseconds).
pub const OUTPUT_DRAIN_MAX: Duration = Duration::from_secs(10);
/// After Ctrl-C, how long the job may take to end before `flame submit` gives up waiting.
pub const CANCEL_WAIT_MAX: Duration = Duration::from_secs(30);
/// While a job waits for room, why it waits is printed this often when it changes.
pub const WAITING_REPORT_EVERY: Duration = Duration::from_secs(5);
/// A line without its newline yet is printed anyway once it is this long.
pub const PARTIAL_LINE_BYTES_MAX: usize = 64 * 1024;

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// List batch jobs
    List(OutputArgs),
    /// Show a job: its state, ranks, nodes and exit codes
    View {
        id: SessionId,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Cancel a job: its ranks are killed, on every node
    Cancel { id: SessionId },
    /// Print a job's output (its ranks' stdout and stderr)
    Logs(JobLogsArgs),
}

#[derive(Debug, Args)]
pub struct JobLogsArgs {
    pub id: SessionId,
    /// Keep printing until the job ends (Ctrl-C stops)
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Prefix each line with its rank
    #[arg(long)]
    pub label: bool,
}

/// The job `flame submit` asks for, from its flags.
pub fn job_spec(args: &SubmitArgs) -> anyhow::Result<JobSpec> {
    let (command, rest) = args
        .command
        .split_first()
        .ok_or_else(|| anyhow!("no command given: flame submit -n 4 -- COMMAND ARGS..."))?;
    let mut resources = Resources {
        gpus: args.gpus_per_rank,
        ..Resources::default()
    };
    if let Some(cpus) = &args.cpus_per_rank {
        let value: f64 = cpus
            .parse()
            .ok()
            .filter(|c: &f64| c.is_finite() && *c > 0.0)
            .ok_or_else(|| {
                Usage::new(format!(
                    "--cpus-per-rank `{cpus}` is not a positive number such as 0.5 or 2"
                ))
            })?;
        resources.cpu_millis = (value * 1000.0).round().min(f64::from(u32::MAX)) as u32;
    }
    if let Some(mem) = &args.mem_per_rank {
        let bytes = flame_client::units::parse_size(mem)
            .map_err(|e| Usage::new(format!("--mem-per-rank: {e}")))?;
        resources.memory_bytes = Some(bytes);
    }
    // Like srun, ranks start in the directory `flame submit` runs in (which must exist on
    // every node used: a shared file system, or the local machine).
    let working_dir = std::env::current_dir()
        .ok()
        .map(|d| d.display().to_string())
        .filter(|d| d.starts_with('/'));
    let spec = JobSpec {
        name: args.name.clone().unwrap_or_default(),
        command: command.clone(),
        args: rest.to_vec(),
        env: Default::default(),
        working_dir,
        ranks: args.ranks,
        ranks_per_node: args.ranks_per_node,
        resources,
        time_limit_ms: args
            .time_limit
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
        mpi: args.mpi,
    };
    spec.validate().map_err(|e| {
        let flag = match e.field {
            "ranks" => "-n",
            "ranks_per_node" => "--ranks-per-node",
            "time_limit" => "--time",
            "resources.cpus" => "--cpus-per-rank",
            "resources.memory" => "--mem-per-rank",
            "resources.gpus" => "--gpus-per-rank",
            "name" => "--name",
            _ => "COMMAND",
        };
        Usage::new(format!("{flag}: {}", e.reason))
    })?;
    Ok(spec)
}

pub async fn submit(global: &GlobalArgs, args: SubmitArgs) -> anyhow::Result<()> {
    let spec = job_spec(&args)?;
    // Installed first, so that Ctrl-C at any point cancels the job rather than leaving it.
    let mut signals = StopSignals::install()?;
    let client = super::connect(global).await?;
    let result = submit_with(&client, &args, spec, &mut signals).await;
    client.close().await;
    result
}

async fn submit_with(
    client: &Client,
    args: &SubmitArgs,
    spec: JobSpec,
    signals: &mut StopSignals,
) -> anyhow::Result<()> {
    let ranks = spec.ranks;
    let session = tokio::select! {
        s = client.create_session(SessionSpec {
            job: Some(spec),
            priority: args.priority,
            ..SessionSpec::new(String::new())
        }) => s.context("cannot submit the job")?,
        signal = signals.recv() => return Err(signal.stopped().context("the job was not submitted")),
    };
    let id = session.id();
    if args.detach {
        outln!("{id}")?;
        return Ok(());
    }
    eprintln!(
        "flame: job {id} submitted ({ranks} rank{}); Ctrl-C cancels it",
        if ranks == 1 { "" } else { "s" }
    );
    let mut watch = session.watch().await?;
    let mut output = Output::new(client.clone(), id, args.label);
    let mut logs = Some(client.logs(id, None, true).await?);
    let mut cancelled_by: Option<super::signals::Stop> = None;
    let cancel_deadline = tokio::time::sleep(Duration::MAX);
    tokio::pin!(cancel_deadline);
    // Until the job starts: say why it waits, when that changes.
    let mut waiting_report = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(2),
        WAITING_REPORT_EVERY,
    );
    let mut queued = true;
    let mut said_waiting: Option<String> = None;
    // Until the job has ended; its output follows until the ranks' logs close.
    loop {
        tokio::select! {
            event = next_log(&mut logs) => match event {
                Some(event) => output.event(event).await?,
                None => logs = None,
            },
            results = watch.next() => match results {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => break,
            },
            signal = signals.recv(), if cancelled_by.is_none() => {
                eprintln!("flame: {signal}: cancelling job {id}");
                cancelled_by = Some(signal);
                client.cancel_session(id).await.context("cannot cancel the job")?;
                cancel_deadline.as_mut().reset(tokio::time::Instant::now() + CANCEL_WAIT_MAX);
            }
            _ = waiting_report.tick(), if queued && cancelled_by.is_none() => {
                let info = client.get_session(id).await?;
                queued = info.job.as_ref().is_some_and(|j| j.state == JobState::Queued);
                if queued && info.waiting.is_some() && info.waiting != said_waiting {
                    if let Some(why) = &info.waiting {
                        eprintln!("flame: job {id} is waiting: {why}");
                    }
                    said_waiting = info.waiting;
                }
            }
            () = &mut cancel_deadline => {
                bail!("job {id} was cancelled but did not end within {CANCEL_WAIT_MAX:?}; `flame job view {id}` shows it");
            }
        }
        if watch.is_finished() {
            break;
        }
    }
    // The ranks' last lines: their logs close when their executors have gone.
    // (The logs may have ended before the job's end was seen: then there is nothing left.)
    let drain = async {
        if let Some(stream) = logs.as_mut() {
            while let Some(event) = stream.next().await {
                output.event(event.map_err(anyhow::Error::from)).await?;
            }
        }
        anyhow::Ok(())
    };
    if tokio::time::timeout(OUTPUT_DRAIN_MAX, drain).await.is_err() {
        eprintln!(
            "flame: warning: the ranks' last output did not arrive within {OUTPUT_DRAIN_MAX:?}"
        );
    }
    output.finish()?;
    let info = client.get_session(id).await?;
    let job = info
        .job
        .as_ref()
        .ok_or_else(|| anyhow!("session {id} is not a batch job"))?;
    report_end(id, job);
    match job.exit_code() {
        Some(0) => Ok(()),
        Some(code) => Err(Exit(code).into()),
        None => bail!("job {id} is still {} after its session finished", job.state),
    }
}

/// Says on stderr how a job ended, when it did not succeed.
fn report_end(id: SessionId, job: &JobInfo) {
    match job.state {
        JobState::Failed => match &job.failure {
            Some(f) => {
                let first_line = f.message.lines().next().unwrap_or_default();
                // The node's own message for a rank that exited says no more than the code,
                // unless the kernel killed it at its memory limit.
                let why = match first_line.strip_prefix("rank exited with status") {
                    Some(rest) => rest
                        .split_once(": out of memory")
                        .map(|(_, oom)| format!(": out of memory{oom}"))
                        .unwrap_or_default(),
                    None => format!(": {first_line}"),
                };
                let who = f
                    .rank
                    .map_or_else(|| "a rank".to_string(), |r| format!("rank {r}"));
                match f.exit_code {
                    Some(code) => {
                        eprintln!("flame: job {id} failed: {who} exited with status {code}{why}")
                    }
                    None => eprintln!("flame: job {id} failed: {who}{why}"),
                }
            }
            None => eprintln!("flame: job {id} failed"),
        },
        JobState::TimedOut => {
            let limit = job
                .spec
                .time_limit_ms
                .map(|t| humantime::format_duration(Duration::from_millis(t)).to_string())
                .unwrap_or_default();
            eprintln!("flame: job {id} was stopped at its time limit of {limit}");
        }
        JobState::Cancelled => eprintln!("flame: job {id} was cancelled"),
        JobState::Queued | JobState::Running | JobState::Succeeded => {}
    }
}

async fn next_log(logs: &mut Option<LogStream>) -> Option<anyhow::Result<LogEvent>> {
    match logs {
        Some(stream) => stream.next().await.map(|r| r.map_err(anyhow::Error::from)),
        None => std::future::pending().await,
    }
}

/// Prints ranks' output line by line, each rank's lines whole, optionally labelled.
struct Output {
    client: Client,
    job: SessionId,
    label: bool,
    ranks: HashMap<ExecutorId, u32>,
    /// Executors whose rank was looked up, so an unknown one costs one request, not one
    /// per chunk.
    asked: std::collections::HashSet<ExecutorId>,
    /// Unfinished lines per rank and stream (`true`: stderr).
    partial: HashMap<(ExecutorId, bool), Vec<u8>>,
}

impl Output {
    fn new(client: Client, job: SessionId, label: bool) -> Self {
        Output {
            client,
            job,
            label,
            ranks: HashMap::new(),
            asked: Default::default(),
            partial: HashMap::new(),
        }
    }

    async fn event(&mut self, event: anyhow::Result<LogEvent>) -> anyhow::Result<()> {
        match event? {
            LogEvent::Chunk {
                executor,
                data,
                stderr,
                ..
            } => {
                // Asked once per executor: the job's ranks are known once it has started.
                if self.label && !self.ranks.contains_key(&executor) && self.asked.insert(executor)
                {
                    self.learn_ranks().await?;
                }
                let buf = self.partial.entry((executor, stderr)).or_default();
                buf.extend_from_slice(&data);
                let cut = match buf.iter().rposition(|&b| b == b'\n') {
                    Some(i) => i + 1,
                    None if buf.len() >= PARTIAL_LINE_BYTES_MAX => buf.len(),
                    None => return Ok(()),
                };
                let lines: Vec<u8> = buf.drain(..cut).collect();
                self.print(executor, stderr, &lines)?;
            }
            LogEvent::Unavailable { node, reason } => {
                eprintln!("flame: warning: output on node {node} is unavailable: {reason}");
            }
            LogEvent::End => {}
        }
        Ok(())
    }

    /// Which executor runs which rank, once the job has started.
    async fn learn_ranks(&mut self) -> anyhow::Result<()> {
        let info = self.client.get_session(self.job).await?;
        if let Some(job) = info.job {
            self.ranks = job.ranks.iter().map(|r| (r.executor, r.rank)).collect();
        }
        Ok(())
    }

    /// Prints whole lines of a rank's stdout, or stderr, to ours.
    fn print(&mut self, executor: ExecutorId, stderr: bool, bytes: &[u8]) -> anyhow::Result<()> {
        let (mut stdout, mut stderr_out);
        let out: &mut dyn std::io::Write = if stderr {
            stderr_out = std::io::stderr().lock();
            &mut stderr_out
        } else {
            stdout = std::io::stdout().lock();
            &mut stdout
        };
        let label = self.label.then(|| {
            self.ranks
                .get(&executor)
                .map_or_else(|| format!("exec-{executor}"), u32::to_string)
        });
        let written = (|| {
            match &label {
                Some(label) => {
                    for line in bytes.split_inclusive(|&b| b == b'\n') {
                        write!(out, "{label}: ")?;
                        out.write_all(line)?;
                    }
                }
                None => out.write_all(bytes)?,
            }
            if !bytes.ends_with(b"\n") {
                out.write_all(b"\n")?;
            }
            out.flush()
        })();
        match written {
            // A reader that went away (`| head`) ends the output, not the job: its exit
            // status is still the command's.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            r => r.context("cannot write the job's output"),
        }
    }

    /// Prints what is left of unfinished lines.
    fn finish(&mut self) -> anyhow::Result<()> {
        let left: Vec<((ExecutorId, bool), Vec<u8>)> = self.partial.drain().collect();
        for ((executor, stderr), bytes) in left {
            if !bytes.is_empty() {
                self.print(executor, stderr, &bytes)?;
            }
        }
        Ok(())
    }
}

/// The session of job `id`, with an unknown id reported as a job's, not a session's.
async fn job_session(client: &Client, id: SessionId) -> anyhow::Result<SessionInfo> {
    match client.get_session(id).await {
        Err(e) if e.kind() == Some(flame_protocol::model::ErrorKind::NotFound) => {
            Err(anyhow!("job {id} does not exist")).hint("`flame job list` lists the jobs")
        }
        other => Ok(other?),
    }
}

pub async fn run(global: &GlobalArgs, cmd: JobCommand) -> anyhow::Result<()> {
    match cmd {
        JobCommand::List(out) => {
            let jobs: Vec<SessionInfo> =
                super::with_client(
                    global,
                    |client| async move { Ok(client.list_sessions().await?) },
                )
                .await?
                .into_iter()
                .filter(|s| s.job.is_some())
                .collect();
            match out.output {
                OutputFormat::Json => render::print_json(
                    &jobs
                        .iter()
                        .map(super::session::session_json)
                        .collect::<Vec<_>>(),
                ),
                OutputFormat::Table if jobs.is_empty() => {
                    outln!("No jobs.")?;
                    Ok(())
                }
                OutputFormat::Table => {
                    print_list(&jobs)?;
                    Ok(())
                }
            }
        }
        JobCommand::View { id, output } => {
            let info =
                super::with_client(
                    global,
                    |client| async move { job_session(&client, id).await },
                )
                .await?;
            let Some(job) = &info.job else {
                return Err(anyhow!("session {id} is not a batch job"))
                    .hint("`flame session view` shows sessions");
            };
            match output.output {
                OutputFormat::Json => render::print_json(&super::session::session_json(&info)),
                OutputFormat::Table => {
                    print_view(&info, job)?;
                    Ok(())
                }
            }
        }
        JobCommand::Cancel { id } => {
            super::with_client(global, |client| async move {
                let info = job_session(&client, id).await?;
                if info.job.is_none() {
                    return Err(anyhow!("session {id} is not a batch job"))
                        .hint("`flame session cancel` cancels sessions");
                }
                client.cancel_session(id).await?;
                Ok(())
            })
            .await?;
            outln!("Job {id} cancelled.")?;
            Ok(())
        }
        JobCommand::Logs(args) => logs(global, args).await,
    }
}

async fn logs(global: &GlobalArgs, args: JobLogsArgs) -> anyhow::Result<()> {
    let mut signals = StopSignals::install()?;
    super::with_client(global, |client| async move {
        let info = job_session(&client, args.id).await?;
        if info.job.is_none() {
            return Err(anyhow!("session {} is not a batch job", args.id))
                .hint("`flame logs SESSION` shows a session's logs");
        }
        let mut output = Output::new(client.clone(), args.id, args.label);
        let mut stream = Some(client.logs(args.id, None, args.follow).await?);
        loop {
            tokio::select! {
                event = next_log(&mut stream) => match event {
                    Some(event) => output.event(event).await?,
                    None => break,
                },
                _ = signals.recv() => break,
            }
        }
        output.finish()
    })
    .await
}

fn elapsed(job: &JobInfo, now: u64) -> String {
    match (job.started_ms, job.ended_ms) {
        (Some(start), Some(end)) => {
            humantime::format_duration(Duration::from_secs(end.saturating_sub(start) / 1000))
                .to_string()
        }
        (Some(start), None) => {
            humantime::format_duration(Duration::from_secs(now.saturating_sub(start) / 1000))
                .to_string()
        }
        _ => "-".to_string(),
    }
}

fn nodes(job: &JobInfo) -> String {
    let mut nodes: Vec<&str> = job.ranks.iter().map(|r| r.node.as_str()).collect();
    nodes.dedup();
    if nodes.is_empty() {
        "-".into()
    } else {
        nodes.join(",")
    }
}

fn exit_text(job: &JobInfo) -> String {
    job.exit_code()
        .map_or_else(|| "-".into(), |c| c.to_string())
}

fn print_list(jobs: &[SessionInfo]) -> anyhow::Result<()> {
    let now = render::now_ms();
    let columns = [
        number("ID"),
        text("Name"),
        text("State"),
        number("Ranks"),
        text("Nodes"),
        text("Owner"),
        number("Exit"),
        text("Elapsed"),
        text("Submitted"),
    ];
    let rows = jobs
        .iter()
        .filter_map(|s| s.job.as_ref().map(|j| (s, j)))
        .map(|(s, j)| {
            vec![
                s.id.to_string(),
                if j.spec.name.is_empty() {
                    j.spec.command.clone()
                } else {
                    j.spec.name.clone()
                },
                j.state.to_string(),
                j.spec.ranks.to_string(),
                nodes(j),
                s.owner.clone(),
                exit_text(j),
                elapsed(j, now),
                render::ago(s.created_ms, now),
            ]
        })
        .collect();
    render::print_table(&columns, rows)?;
    Ok(())
}

fn print_view(info: &SessionInfo, job: &JobInfo) -> anyhow::Result<()> {
    let now = render::now_ms();
    let spec = &job.spec;
    let mut command = vec![spec.command.clone()];
    command.extend(spec.args.iter().cloned());
    let mut fields = vec![
        ("Job", info.id.to_string()),
        ("Name", spec.name.clone()),
        ("State", job.state.to_string()),
        ("Owner", info.owner.clone()),
        ("Priority", info.priority.to_string()),
        ("Command", command.join(" ")),
        ("MPI", if spec.mpi { "yes" } else { "no" }.to_string()),
        (
            "Ranks",
            match spec.ranks_per_node {
                Some(k) => format!("{} ({k} per node)", spec.ranks),
                None => spec.ranks.to_string(),
            },
        ),
        (
            "Per rank",
            format!(
                "cpus {}{}{}",
                format_cpus(spec.resources.cpu_millis),
                spec.resources
                    .memory_bytes
                    .map(|m| format!(", memory {}", format_bytes(m)))
                    .unwrap_or_default(),
                if spec.resources.gpus > 0 {
                    format!(", gpus {}", spec.resources.gpus)
                } else {
                    String::new()
                }
            ),
        ),
        (
            "Time limit",
            spec.time_limit_ms.map_or_else(
                || "none".into(),
                |t| humantime::format_duration(Duration::from_millis(t)).to_string(),
            ),
        ),
        ("Submitted", render::local_time(info.created_ms, now)),
        ("Elapsed", elapsed(job, now)),
        ("Exit code", exit_text(job)),
    ];
    if let Some(why) = &info.waiting {
        fields.push(("Waiting", why.clone()));
    }
    if let Some(f) = &job.failure {
        fields.push((
            "First failure",
            format!(
                "{}: {}",
                f.rank
                    .map_or_else(|| "a rank".to_string(), |r| format!("rank {r}")),
                f.message.lines().next().unwrap_or_default()
            ),
        ));
    }
    render::print_fields(fields)?;
    if !job.ranks.is_empty() {
        outln!()?;
        let columns = [
            number("Rank"),
            text("Node"),
            number("Local"),
            number("Executor"),
            number("Exit"),
        ];
        let rows = job
            .ranks
            .iter()
            .map(|r| {
                vec![
                    r.rank.to_string(),
                    r.node.clone(),
                    r.local_rank.to_string(),
                    r.executor.to_string(),
                    r.exit_code.map_or_else(|| "-".into(), |c| c.to_string()),
                ]
            })
            .collect();
        render::print_table(&columns, rows)?;
    }
    Ok(())
}
