//! `flame ping`: stream many tiny tasks through the built-in `ping` application and check
//! every output, like Flame's `flmping`.

use super::signals::StopSignals;
use super::GlobalArgs;
use crate::render::group;
use crate::render::outln;
use anyhow::{anyhow, bail, Context as _};
use bytes::{Bytes, BytesMut};
use clap::Args;
use flame_client::local::LocalOptions;
use flame_client::report::HintExt as _;
use flame_client::{BatchAck, Client, ClientConfig, ResultStream, Session};
use flame_protocol::limits;
use flame_protocol::model::{ErrorKind, SessionSpec, TaskOutcome, TaskResult};
use flame_protocol::ping::{check_reply, PingReply};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::HashSet;
use std::future::Future;
use std::io::IsTerminal as _;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// The application the head registers by default.
pub const PING_APPLICATION: &str = "ping";
/// Most tasks one run may ask for.
pub const PING_TASKS_MAX: u64 = 10_000_000;
/// Most input bytes one run holds: every input is kept to check its output.
pub const PING_INPUT_BYTES_TOTAL_MAX: u64 = 1 << 30;
/// How long Ctrl-C waits for the head to confirm that the session is cancelled (a debug
/// head took 5 s for a million tasks).
pub const CANCEL_WAIT_MAX: Duration = Duration::from_secs(30);
/// Failures quoted in the report; the rest are only counted.
pub const PING_PROBLEMS_SHOWN_MAX: usize = 5;

#[derive(Debug, Args)]
pub struct PingArgs {
    /// Number of tasks
    #[arg(short = 't', long = "tasks", value_name = "N", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..=PING_TASKS_MAX))]
    pub tasks: u64,
    /// Bytes of each task's input (the task's index, zero-padded)
    #[arg(long, value_name = "BYTES", default_value_t = 16)]
    pub size: usize,
    /// Use an ephemeral session: tasks and results are kept in memory only
    #[arg(long)]
    pub ephemeral: bool,
    /// The session's priority among its owner's sessions (you, or the global --owner):
    /// higher is served first and may take executors from lower ones
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub priority: i32,
    /// Start a head and a node on this machine first, and stop them afterwards
    #[arg(long)]
    pub local: bool,
    /// Give up when no result arrives for this long
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,
}

pub async fn run(global: &GlobalArgs, args: PingArgs) -> anyhow::Result<()> {
    let inputs = make_inputs(args.tasks, args.size)?;
    // Installed first, so that Ctrl-C at any point closes the session (and stops a local
    // cluster) rather than killing the process mid-way.
    let mut signals = StopSignals::install()?;
    if !args.local {
        let config = super::config(global)?;
        return ping(&config, &args, inputs, &mut signals).await;
    }
    let cluster = super::local::start_unless_stopped(LocalOptions::default(), &mut signals).await?;
    let mut config = cluster.client_config();
    // The local head is this run's own, and the client its admin; of the client settings
    // only the owner applies.
    config.owner = global.owner.clone().or_else(|| {
        std::env::var(flame_client::config::ENV_OWNER)
            .ok()
            .filter(|o| !o.is_empty())
    });
    super::local::run_then_stop(cluster, ping(&config, &args, inputs, &mut signals)).await
}

/// Inputs `0..n` in decimal, zero-padded to `size` bytes, sharing one buffer.
pub(super) fn make_inputs(n: u64, size: usize) -> anyhow::Result<Vec<Bytes>> {
    let digits = (n - 1).to_string().len();
    if size < digits {
        bail!(
            "--size {size} is too small to make {} inputs unique: it must be at least {digits}",
            group(n)
        );
    }
    if size > limits::TASK_INPUT_BYTES_MAX {
        bail!(
            "--size {size} exceeds the head's task input limit of {} bytes",
            group(limits::TASK_INPUT_BYTES_MAX as u64)
        );
    }
    let total = n.saturating_mul(size as u64);
    if total > PING_INPUT_BYTES_TOTAL_MAX {
        return Err(anyhow!(
            "{} tasks of {size} bytes need {} bytes of inputs, more than the {} that ping keeps in memory",
            group(n),
            group(total),
            group(PING_INPUT_BYTES_TOTAL_MAX)
        ))
        .hint("use fewer tasks (-t) or smaller inputs (--size)");
    }
    let count = usize::try_from(n).context("too many tasks for this machine")?;
    let total = usize::try_from(total).context("too many input bytes for this machine")?;
    let mut buf = BytesMut::with_capacity(total);
    for i in 0..n {
        // Padded by hand: `format!`'s width stops at 65,535, far below the input limit.
        let digits = i.to_string();
        buf.resize(buf.len() + (size - digits.len()), b'0');
        buf.extend_from_slice(digits.as_bytes());
    }
    let all = buf.freeze();
    Ok((0..count)
        .map(|i| all.slice(i * size..(i + 1) * size))
        .collect())
}

/// Aborts the spawned task when dropped, so an early return leaves nothing running.
pub(super) struct AbortOnDrop<T>(pub(super) JoinHandle<T>);

impl<T> AbortOnDrop<T> {
    /// Waits for the task to end; the handle still aborts it if this future is dropped.
    pub(super) async fn join(mut self) -> Result<T, tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Clears the progress bar however the run ends, so that messages are not drawn over it.
pub(super) struct ClearOnDrop(pub(super) ProgressBar);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

async fn ping(
    config: &ClientConfig,
    args: &PingArgs,
    inputs: Vec<Bytes>,
    signals: &mut StopSignals,
) -> anyhow::Result<()> {
    let client = super::connect_to(config).await?;
    let result = ping_with(&client, args, inputs, signals).await;
    client.close().await;
    result
}

async fn ping_with(
    client: &Client,
    args: &PingArgs,
    inputs: Vec<Bytes>,
    signals: &mut StopSignals,
) -> anyhow::Result<()> {
    let n = inputs.len();
    let created_at = Instant::now();
    let session = create_ping_session(client, args.ephemeral, args.priority).await?;
    outln!(
        "Session {} was created in {} ms; running {} tasks of {} bytes.",
        session.id(),
        group(millis(created_at.elapsed())),
        group(n as u64),
        group(args.size as u64),
    )?;

    let signal = tokio::select! {
        result = run_tasks(&session, args, inputs) => {
            if result.is_err() {
                // A failed run closes its session too, so that it finishes once its
                // remaining tasks do instead of staying open; the run's error is the one
                // to report.
                if let Err(e) = session.close().await {
                    tracing::debug!("closing session {} after a failed run: {e}", session.id());
                }
            }
            return result;
        }
        signal = signals.recv() => signal,
    };
    Err(cancel_after_stop(&session, signal, signals).await)
}

/// Ctrl-C or `SIGTERM` during a run: cancels the session, so that none of its tasks is left
/// pending or running, and returns the error that exits with the signal's code. A second
/// signal, or a head that does not answer within [`CANCEL_WAIT_MAX`], gives up waiting and
/// says how to cancel it by hand.
pub(super) async fn cancel_after_stop(
    session: &Session,
    signal: super::signals::Stop,
    signals: &mut StopSignals,
) -> anyhow::Error {
    let id = session.id();
    eprintln!("flame: {signal}: cancelling session {id}");
    let cancel = tokio::time::timeout(CANCEL_WAIT_MAX, session.client().cancel_session(id));
    let cancelled = tokio::select! {
        cancelled = cancel => cancelled,
        _ = signals.recv() => {
            return signal.stopped().context(format!(
                "session {id} may still run; `flame session cancel {id}` ends it"
            ));
        }
    };
    match cancelled {
        Ok(Ok(())) => signal.stopped().context(format!("session {id} was cancelled")),
        Ok(Err(e)) => signal.stopped().context(format!(
            "session {id} could not be cancelled ({e}); `flame session cancel {id}` ends it"
        )),
        Err(_elapsed) => signal.stopped().context(format!(
            "the head did not confirm cancelling session {id} within {}; `flame session cancel {id}` ends it",
            humantime::format_duration(CANCEL_WAIT_MAX)
        )),
    }
}

/// Creates a session of the built-in `ping` application for the client's owner.
pub(super) async fn create_ping_session(
    client: &Client,
    ephemeral: bool,
    priority: i32,
) -> anyhow::Result<Session> {
    let session = client
        .create_session(SessionSpec {
            application: PING_APPLICATION.to_string(),
            common_data: flame_protocol::object::Payload::default(),
            ephemeral,
            // Empty: the client's owner (--owner, FLAME_OWNER, the config files), else the
            // authenticated user, as the head decides.
            owner: String::new(),
            priority,
            job: None,
        })
        .await;
    match session {
        Err(e) if e.kind() == Some(ErrorKind::NotFound) => Err(e).hint(
            "the head registers `ping` unless told not to; `flame app list` shows what is registered",
        ),
        other => other.context("cannot create a ping session"),
    }
}

/// Watches, submits every input, collects every result, and checks every output.
async fn run_tasks(session: &Session, args: &PingArgs, inputs: Vec<Bytes>) -> anyhow::Result<()> {
    let n = inputs.len();
    let progress = ClearOnDrop(progress_bar(n as u64));
    let checked = run_checked(session, inputs, args.stall_timeout, &progress.0).await?;
    drop(progress);
    let elapsed = checked.elapsed();
    let secs = elapsed.as_secs_f64().max(1e-9);
    outln!(
        "{} tasks completed in {} ms: {} tasks/s (every output checked).",
        group(n as u64),
        group(millis(elapsed)),
        group((n as f64 / secs).round() as u64),
    )?;
    outln!(
        "Outputs came from {} executor{} on {} host{}.",
        group(checked.executors.len() as u64),
        plural(checked.executors.len()),
        group(checked.hosts.len() as u64),
        plural(checked.hosts.len()),
    )?;
    Ok(())
}

/// A run of ping tasks whose acks, results and outputs were all checked, and when things
/// happened.
#[derive(Debug)]
pub(super) struct Checked {
    /// When the clock started: the first submit, or whatever the caller chose.
    pub started: Instant,
    /// When the first result arrived; `None` for a run of no tasks.
    pub first_result: Option<Instant>,
    /// When the watch said the session finished.
    pub finished: Instant,
    /// The executors the outputs name.
    pub executors: HashSet<String>,
    /// The hosts the outputs name.
    pub hosts: HashSet<String>,
}

impl Checked {
    /// From the start to the session's end.
    pub fn elapsed(&self) -> Duration {
        self.finished.saturating_duration_since(self.started)
    }
}

/// Watches `session`, submits every input and closes it, collects every result, and
/// checks every ack, result and output; a wrong or missing one is the error. No result for
/// `stall_timeout` is an error too. The clock starts at the first submit, after the watch
/// opened.
pub(super) async fn run_checked(
    session: &Session,
    inputs: Vec<Bytes>,
    stall_timeout: Duration,
    progress: &ProgressBar,
) -> anyhow::Result<Checked> {
    // The watch opens before any task exists, so even an ephemeral session loses nothing.
    let mut watch = session.watch().await.context("cannot watch the session")?;
    let started = Instant::now();
    let submit = AbortOnDrop(tokio::spawn({
        let session = session.clone();
        let inputs = inputs.clone();
        async move { session.submit_and_close(inputs).await }
    }));
    let acks = async move {
        submit
            .join()
            .await
            .context("the submitting task failed")?
            .context("cannot submit the tasks")
    };
    // The bar counts what the head has finished, which runs ahead of the results this
    // client has read and checked; only a bar on a terminal asks.
    let _head_counts = (!progress.is_hidden()).then(|| {
        AbortOnDrop(tokio::spawn(follow_head_counts(
            session.clone(),
            progress.clone(),
        )))
    });
    let checked =
        collect_checked(&mut watch, &inputs, acks, started, stall_timeout, progress).await;
    match checked {
        Err(e) => Err(match head_storage_fault(session.client()).await {
            Some(fault) => e.context(fault),
            None => e,
        }),
        ok => ok,
    }
}

/// How long a failed run waits for the head to say whether its storage is faulted.
const HEAD_STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the head takes no writes, when that is so: a run that failed (results stopped
/// coming, say) names a full disk on the head instead of only the symptom.
async fn head_storage_fault(client: &Client) -> Option<String> {
    let report = tokio::time::timeout(HEAD_STATUS_TIMEOUT, client.queue())
        .await
        .ok()?
        .ok()?;
    report.head?.fault
}

/// Reads `watch` until the session finishes while `acks` brings the submitter's acks, then
/// checks that the acks number `inputs` densely from 1, that every task has exactly one
/// result, and that every output is the ping reply to its input. Times are from `started`.
pub(super) async fn collect_checked<F>(
    watch: &mut ResultStream,
    inputs: &[Bytes],
    acks: F,
    started: Instant,
    stall_timeout: Duration,
    progress: &ProgressBar,
) -> anyhow::Result<Checked>
where
    F: Future<Output = anyhow::Result<Vec<BatchAck>>>,
{
    let n = inputs.len();
    let mut acks = std::pin::pin!(acks);
    let mut outcomes: Vec<Option<TaskOutcome>> = vec![None; n];
    let mut problems = Problems::default();
    let mut acked: Option<Vec<BatchAck>> = None;
    let mut received = 0usize;
    let mut first_result = None;
    loop {
        tokio::select! {
            joined = &mut acks, if acked.is_none() => acked = Some(joined?),
            next = tokio::time::timeout(stall_timeout, watch.next()) => match next {
                Err(_) => bail!(
                    "no result for {}: {} of {} tasks finished",
                    humantime::format_duration(stall_timeout),
                    group(received as u64),
                    group(n as u64)
                ),
                Ok(None) => break,
                Ok(Some(batch)) => {
                    let batch = batch.context("watching the results failed")?;
                    if first_result.is_none() && !batch.is_empty() {
                        first_result = Some(Instant::now());
                    }
                    received += batch.len();
                    // Never below what the head reported (see `follow_head_counts`).
                    progress.set_position(progress.position().max(received as u64));
                    record(&mut outcomes, &mut problems, batch);
                }
            },
        }
    }
    let finished = Instant::now();
    let acked = match acked {
        Some(acked) => acked,
        // The watch ended first; the submit side is bounded by its own timeouts.
        None => acks.await?,
    };
    if !watch.is_finished() {
        bail!(
            "the result stream ended before the session finished: {} of {} results",
            group(received as u64),
            group(n as u64)
        );
    }
    check_acks(&acked, n)?;

    // Task id `i + 1` is input `i`: `check_acks` proved the ids dense from 1 in input order.
    let mut executors = HashSet::new();
    let mut hosts = HashSet::new();
    for (i, outcome) in outcomes.iter().enumerate() {
        match check_outcome(i + 1, &inputs[i], outcome.as_ref()) {
            Ok(reply) => {
                executors.insert(reply.executor);
                hosts.insert(reply.host);
            }
            Err((problem, line)) => problems.note(problem, line),
        }
    }

    if problems.total() > 0 {
        for line in &problems.shown {
            eprintln!("  {line}");
        }
        bail!(
            "{} of {} tasks went wrong: {} failed, {} outputs did not match their input, {} results missing, {} unexpected results",
            group(problems.total() as u64),
            group(n as u64),
            group(problems.failed as u64),
            group(problems.mismatched as u64),
            group(problems.missing as u64),
            group(problems.unexpected as u64),
        );
    }
    Ok(Checked {
        started,
        first_result,
        finished,
        executors,
        hosts,
    })
}

/// Checks the outcome of task `task`, whose input was `input`: it must have succeeded with
/// the ping reply to that input. The error is the kind of problem and a line describing it.
pub(super) fn check_outcome(
    task: usize,
    input: &[u8],
    outcome: Option<&TaskOutcome>,
) -> Result<PingReply, (Problem, String)> {
    match outcome {
        None => Err((Problem::Missing, format!("task {task}: no result"))),
        Some(TaskOutcome::Failed(message)) => {
            Err((Problem::Failed, format!("task {task} failed: {message}")))
        }
        Some(TaskOutcome::Cancelled) => {
            Err((Problem::Failed, format!("task {task} was cancelled")))
        }
        // The result stream fetches outputs kept as objects before it hands them on.
        Some(TaskOutcome::Object(o)) => Err((
            Problem::Mismatched,
            format!("task {task}: its output, object {}, was not fetched", o.id),
        )),
        Some(TaskOutcome::Succeeded(output)) => check_reply(input, output)
            .map_err(|e| (Problem::Mismatched, format!("task {task}: {e}"))),
    }
}

/// The acks must give the ids `1..=n` in input order, as the head numbers a fresh
/// session's tasks; anything else would make outputs unattributable.
pub(super) fn check_acks(acks: &[BatchAck], n: usize) -> anyhow::Result<()> {
    let mut next: u64 = 1;
    for ack in acks {
        if ack.first_task.0 != next {
            bail!(
                "the head gave batch {} the ids from {}, expected {next}: ids must be dense from 1",
                ack.batch_id,
                ack.first_task
            );
        }
        next += u64::from(ack.count);
    }
    if next - 1 != n as u64 {
        bail!(
            "the head acknowledged {} tasks of {}",
            group(next - 1),
            group(n as u64)
        );
    }
    Ok(())
}

/// What can go wrong with one task.
#[derive(Debug, Clone, Copy)]
pub(super) enum Problem {
    Failed,
    Mismatched,
    Missing,
    Unexpected,
}

/// Counts of problems, and the first few described.
#[derive(Debug, Default)]
struct Problems {
    failed: usize,
    mismatched: usize,
    missing: usize,
    unexpected: usize,
    shown: Vec<String>,
}

impl Problems {
    fn note(&mut self, problem: Problem, line: String) {
        let counter = match problem {
            Problem::Failed => &mut self.failed,
            Problem::Mismatched => &mut self.mismatched,
            Problem::Missing => &mut self.missing,
            Problem::Unexpected => &mut self.unexpected,
        };
        *counter += 1;
        if self.shown.len() < PING_PROBLEMS_SHOWN_MAX {
            self.shown.push(line);
        }
    }

    fn total(&self) -> usize {
        self.failed + self.mismatched + self.missing + self.unexpected
    }
}

/// Stores each result at index `task - 1`; out-of-range and repeated results are problems.
fn record(outcomes: &mut [Option<TaskOutcome>], problems: &mut Problems, batch: Vec<TaskResult>) {
    for result in batch {
        let index = usize::try_from(result.task.0)
            .ok()
            .and_then(|t| t.checked_sub(1))
            .filter(|&i| i < outcomes.len());
        match index {
            None => problems.note(
                Problem::Unexpected,
                format!(
                    "task {}: a result for a task this run did not submit",
                    result.task
                ),
            ),
            Some(i) if outcomes[i].is_some() => problems.note(
                Problem::Unexpected,
                format!("task {}: a second result", result.task),
            ),
            Some(i) => outcomes[i] = Some(result.outcome),
        }
    }
}

/// A progress bar of `len` tasks on stderr, hidden unless stderr is a terminal.
pub(super) fn progress_bar(len: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    // Whole tasks per second with thousands separators, and the time left at that rate.
    let style = ProgressStyle::with_template(
        "[{percent:>3}%] {wide_bar} {human_pos}/{human_len} {rate} ETA {eta}",
    )
    .map(|s| {
        s.with_key(
            "rate",
            |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = w.write_str(&rate(state.per_sec()));
            },
        )
    })
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::new(len).with_style(style)
}

/// How often the progress bar asks the head how many tasks have finished.
const PROGRESS_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Moves `progress` to the number of tasks the head has finished, every
/// [`PROGRESS_POLL_INTERVAL`], until aborted. A failed request only skips one update: the
/// results themselves still move the bar.
async fn follow_head_counts(session: Session, progress: ProgressBar) {
    let mut tick = tokio::time::interval(PROGRESS_POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match session.info().await {
            Ok(info) => {
                let c = &info.counts;
                let finished = c.succeeded + c.failed + c.cancelled;
                progress.set_position(progress.position().max(finished));
            }
            Err(e) => tracing::debug!("progress: cannot read the session's counts: {e}"),
        }
    }
}

/// A rate for the progress bar: whole tasks per second, grouped (`4,969/s`).
fn rate(per_sec: f64) -> String {
    let whole = if per_sec.is_finite() && per_sec > 0.0 {
        per_sec.round() as u64
    } else {
        0
    };
    format!("{}/s", group(whole))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use flame_protocol::TaskId;

    #[test]
    fn rates_are_whole_and_grouped() {
        assert_eq!(rate(4_968.625_4), "4,969/s");
        assert_eq!(rate(0.2), "0/s");
        assert_eq!(rate(f64::NAN), "0/s");
    }

    #[test]
    fn inputs_are_unique_padded_and_sized() {
        let inputs = make_inputs(1000, 4).unwrap();
        assert_eq!(inputs.len(), 1000);
        assert_eq!(&inputs[0][..], b"0000");
        assert_eq!(&inputs[999][..], b"0999");
        assert!(inputs.iter().all(|i| i.len() == 4));
        let distinct: HashSet<&Bytes> = inputs.iter().collect();
        assert_eq!(distinct.len(), 1000);
        assert!(make_inputs(1001, 3).is_err());
        assert!(make_inputs(1000, 3).is_ok());
        assert!(make_inputs(10, limits::TASK_INPUT_BYTES_MAX + 1).is_err());
        // Wider than `format!` can pad.
        let big = make_inputs(3, 1 << 20).unwrap();
        assert!(big.iter().all(|i| i.len() == 1 << 20));
        assert!(big[2].ends_with(b"02") && big[2][..(1 << 20) - 1].iter().all(|&b| b == b'0'));
    }

    #[test]
    fn acks_must_be_dense_from_one() {
        let ack = |batch_id, first, count| BatchAck {
            batch_id,
            first_task: TaskId(first),
            count,
        };
        assert!(check_acks(&[ack(1, 1, 3), ack(2, 4, 2)], 5).is_ok());
        assert!(check_acks(&[ack(1, 1, 3), ack(2, 5, 2)], 6).is_err());
        assert!(check_acks(&[ack(1, 0, 3)], 3).is_err());
        assert!(check_acks(&[ack(1, 1, 3)], 4).is_err());
    }

    #[test]
    fn results_are_recorded_by_task_id() {
        let mut outcomes = vec![None; 2];
        let mut problems = Problems::default();
        let result = |task, out: &'static [u8]| TaskResult {
            task: TaskId(task),
            attempt: 1,
            outcome: TaskOutcome::Succeeded(Bytes::from_static(out)),
        };
        record(
            &mut outcomes,
            &mut problems,
            vec![
                result(2, b"b"),
                result(0, b"x"),
                result(3, b"x"),
                result(2, b"again"),
            ],
        );
        assert_eq!(outcomes[0], None);
        assert_eq!(
            outcomes[1],
            Some(TaskOutcome::Succeeded(Bytes::from_static(b"b")))
        );
        assert_eq!(problems.unexpected, 3);
    }
}
