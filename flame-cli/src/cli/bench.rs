//! `flame bench`: measures Flame on a one-machine cluster of its own (a head and one node
//! running the built-in `ping` application), checking every result, and optionally runs
//! the peers' benchmark script for a side-by-side comparison.
//!
//! Every measurement is one line on stdout, exactly:
//!
//! ```text
//! case=<name> tasks=<N> seconds=<s> tasks_per_s=<r> [p50_us=<us> p99_us=<us> p999_us=<us>] [rss_head_kib=<KiB> rss_node_kib=<KiB>]
//! ```
//!
//! Each run of a case starts a fresh cluster in a temporary folder, so that no case
//! inherits another's sessions, store or executors, and the RSS fields are that run's own:
//! the peak resident set (`VmHWM` in `/proc/PID/status`) of `flame-head` and `flame-node`
//! from their start to the end of the measurement (executors are processes of their own and
//! not counted). With `--repeat K` (K > 1) each case's runs are followed by one line per
//! measurement, `stat=median case=<name> ...`, the median of each figure.
//!
//! Every output is checked with [`flame_protocol::ping::check_reply`], as `flame ping` does
//! (its pieces are reused from `ping.rs`): a failed, missing, repeated or wrong result
//! makes the whole command fail, never a figure.
//!
//! With `--peers`, the peers' script (`../shared/peers/bench_peers.sh` from the current
//! folder, or `--peers-script PATH`) runs afterwards; its `peer=...` lines are passed
//! through and each of our measurements that has a counterpart gets a `ratio ...` line.

use super::local::{run_then_stop, start_unless_stopped};
use super::ping::{
    check_acks, check_outcome, collect_checked, create_ping_session, make_inputs, progress_bar,
    run_checked, Checked, ClearOnDrop,
};
use super::render::print_json;
use super::signals::StopSignals;
use anyhow::{anyhow, bail, Context as _};
use clap::{Args, ValueEnum};
use flame_client::local::{LocalCluster, LocalOptions};
use flame_client::report::HintExt as _;
use flame_client::{Client, ClientConfig, ResultStream};
use flame_protocol::model::TaskOutcome;
use flame_protocol::TaskId;
use indicatif::ProgressBar;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
use tokio::task::JoinSet;

/// Largest `--scale`: at 10, the queue case holds 10,000,000 tasks (`flame ping`'s bound)
/// and the payload case 2,000 MiB of inputs, which `make_inputs` refuses.
pub const BENCH_SCALE_MAX: f64 = 10.0;
/// Largest `--repeat`.
pub const BENCH_REPEAT_MAX: u32 = 100;
/// Largest `--executors`: the node is told to offer this many cpus.
pub const BENCH_EXECUTORS_MAX: u32 = 256;
/// Where `--peers` looks for the peers' script, relative to the current folder.
pub const PEERS_SCRIPT_DEFAULT: &str = "../shared/peers/bench_peers.sh";
/// Bound on the whole peers' script. It bounds itself to about ten minutes (`BUDGET_S`
/// plus cleanup); past this it is killed.
pub const PEERS_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Longest line read from the peers' script; longer ones are split.
pub const PEERS_LINE_BYTES_MAX: u64 = 4096;

/// Bytes of a tiny task's input, as the peers' `small_inputs`.
const TINY_INPUT_BYTES: usize = 16;
/// Tasks of the `throughput` and `throughput_ephemeral` cases.
const THROUGHPUT_TASKS: u64 = 100_000;
/// Measured round trips of each `latency` session.
const LATENCY_ROUND_TRIPS: u64 = 2_000;
/// Round trips before the measured ones, so that the executor is up and the paths are warm
/// (the peers warm up with 50 sequential calls too).
const LATENCY_WARMUP_ROUND_TRIPS: u64 = 50;
/// Syncs of the `fsync` line of the `latency` case.
const FSYNC_PROBES: u64 = 200;
/// Bytes each sync of the `fsync` line makes durable: one page, as a small commit does.
const FSYNC_PROBE_BYTES: usize = 4096;

/// Tasks of the `payload_1MiB` case.
const PAYLOAD_TASKS: u64 = 200;
/// Bytes of each input of the `payload_1MiB` case; the ping reply carries them back.
const PAYLOAD_BYTES: usize = 1 << 20;
/// Concurrent sessions of the `sessions` case; not scaled.
const SESSIONS: usize = 100;
/// Tasks of each session of the `sessions` case.
const SESSION_TASKS: u64 = 1_000;
/// Tasks of the `queue` case.
const QUEUE_TASKS: u64 = 1_000_000;

/// One benchmark case; some print more than one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Case {
    /// 100,000 tasks of 16 bytes in one session, durable
    #[value(name = "throughput")]
    Throughput,
    /// The same in an ephemeral session (tasks and results kept in memory only)
    #[value(name = "throughput_ephemeral")]
    ThroughputEphemeral,
    /// 2,000 sequential submit-and-wait round trips, durable then ephemeral, and what one
    /// fsync costs (three lines: latency_durable, latency_ephemeral, fsync)
    #[value(name = "latency")]
    Latency,
    /// 200 tasks of 1 MiB in and 1 MiB out, durable then ephemeral (two lines)
    #[value(name = "payload_1MiB", alias = "payload_1mib")]
    Payload1Mib,
    /// 100 concurrent sessions of 1,000 tasks each
    #[value(name = "sessions")]
    Sessions,
    /// 1,000,000 tasks queued on a drained node, then drained (two lines: queue_enqueue,
    /// queue_drain)
    #[value(name = "queue")]
    Queue,
    /// From starting the cluster to the first result of a one-task session
    #[value(name = "cold_start")]
    ColdStart,
}

impl Case {
    /// The name `--case` takes.
    pub fn name(self) -> &'static str {
        match self {
            Case::Throughput => "throughput",
            Case::ThroughputEphemeral => "throughput_ephemeral",
            Case::Latency => "latency",
            Case::Payload1Mib => "payload_1MiB",
            Case::Sessions => "sessions",
            Case::Queue => "queue",
            Case::ColdStart => "cold_start",
        }
    }
}

/// How `flame bench` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchOutput {
    /// One `case=...` line per measurement, as it is made
    Text,
    /// One JSON document at the end: runs, medians, and the peers' results and ratios
    Json,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A case to run (repeatable) [default: all, in the order listed by --help]
    #[arg(long = "case", value_enum, value_name = "NAME")]
    pub cases: Vec<Case>,
    /// Run each case K times, each on a fresh cluster, and add a `stat=median` line per measurement
    #[arg(long, value_name = "K", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(BENCH_REPEAT_MAX)))]
    pub repeat: u32,
    /// Multiply every task count by F (at least 1 task each), e.g. 0.01 for a quick check
    #[arg(long, value_name = "F", default_value_t = 1.0, value_parser = parse_scale)]
    pub scale: f64,
    /// Executors of the local node (it offers this many cpus; a ping executor takes one)
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(BENCH_EXECUTORS_MAX)))]
    pub executors: u32,
    /// Output format
    #[arg(long, short = 'o', value_enum, default_value_t = BenchOutput::Text)]
    pub output: BenchOutput,
    /// Also run the peers' script (Ray, Dask, process pools) and print the ratios; an error if it is missing
    #[arg(long)]
    pub peers: bool,
    /// The peers' script [default: ../shared/peers/bench_peers.sh]; giving it runs the peers when the script exists
    #[arg(long, value_name = "PATH")]
    pub peers_script: Option<PathBuf>,
    /// Give up when no result arrives for this long
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,
}

fn parse_scale(text: &str) -> Result<f64, String> {
    let scale: f64 = text
        .parse()
        .map_err(|_| format!("`{text}` is not a number such as 0.01 or 1"))?;
    if !(scale.is_finite() && scale > 0.0 && scale <= BENCH_SCALE_MAX) {
        return Err(format!(
            "{scale} is out of range: more than 0, at most {BENCH_SCALE_MAX}"
        ));
    }
    Ok(scale)
}

/// The tunable part of every case.
#[derive(Debug, Clone, Copy)]
struct Plan {
    scale: f64,
    executors: u32,
    stall_timeout: Duration,
}

impl Plan {
    /// `n` scaled, at least 1.
    fn tasks(&self, n: u64) -> u64 {
        // `as` saturates; `--scale` is bounded, so the product is far below u64::MAX.
        ((n as f64 * self.scale).round() as u64).max(1)
    }
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median round trip.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
}

/// Peak resident sets of the head and the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rss {
    /// `flame-head`'s `VmHWM`, in KiB.
    pub rss_head_kib: u64,
    /// `flame-node`'s `VmHWM`, in KiB.
    pub rss_node_kib: u64,
}

/// One measurement: one output line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measurement {
    /// The line's name: the case's, or a part of it (`latency_durable`, `queue_drain`).
    pub case: String,
    /// Tasks measured.
    pub tasks: u64,
    /// Wall time of the measurement.
    pub seconds: f64,
    /// `tasks / seconds`.
    pub tasks_per_s: f64,
    /// Round-trip percentiles, for latency lines.
    #[serde(flatten)]
    pub latency: Option<Percentiles>,
    /// Peak memory of the head and node, when `/proc` could be read.
    #[serde(flatten)]
    pub rss: Option<Rss>,
}

impl Measurement {
    fn new(case: &str, tasks: u64, elapsed: Duration, rss: Option<Rss>) -> Measurement {
        let seconds = elapsed.as_secs_f64();
        Measurement {
            case: case.to_string(),
            tasks,
            seconds,
            tasks_per_s: tasks as f64 / seconds.max(1e-9),
            latency: None,
            rss,
        }
    }

    /// The figure named as in the output line, for comparisons.
    fn figure(&self, name: &str) -> Option<f64> {
        match name {
            "seconds" => Some(self.seconds),
            "tasks_per_s" => Some(self.tasks_per_s),
            "p50_us" => self.latency.map(|l| l.p50_us),
            "p99_us" => self.latency.map(|l| l.p99_us),
            "p999_us" => self.latency.map(|l| l.p999_us),
            _ => None,
        }
    }
}

impl fmt::Display for Measurement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "case={} tasks={} seconds={:.6} tasks_per_s={:.1}",
            self.case, self.tasks, self.seconds, self.tasks_per_s
        )?;
        if let Some(l) = &self.latency {
            write!(
                f,
                " p50_us={:.1} p99_us={:.1} p999_us={:.1}",
                l.p50_us, l.p99_us, l.p999_us
            )?;
        }
        if let Some(r) = &self.rss {
            write!(
                f,
                " rss_head_kib={} rss_node_kib={}",
                r.rss_head_kib, r.rss_node_kib
            )?;
        }
        Ok(())
    }
}

/// Everything `--output json` prints.
#[derive(Debug, Default, Serialize)]
struct Report {
    /// Every measurement of every run, in order.
    runs: Vec<Measurement>,
    /// The median of each measurement over the runs (the run itself for one run).
    medians: Vec<Measurement>,
    /// The peers' results and the ratios, when they ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    peers: Option<PeersReport>,
}

/// Runs `flame bench`: the chosen cases, then the peers when asked.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let peers_script = peers_script(&args)?;
    let mut signals = StopSignals::install()?;
    let plan = Plan {
        scale: args.scale,
        executors: args.executors,
        stall_timeout: args.stall_timeout,
    };
    let mut cases: Vec<Case> = Vec::new();
    let chosen = if args.cases.is_empty() {
        Case::value_variants()
    } else {
        &args.cases[..]
    };
    for case in chosen {
        if !cases.contains(case) {
            cases.push(*case);
        }
    }
    let text = args.output == BenchOutput::Text;
    let mut report = Report::default();
    for case in cases {
        let mut runs = Vec::new();
        for k in 1..=args.repeat {
            if std::io::stderr().is_terminal() {
                eprintln!("bench: {} (run {k} of {})", case.name(), args.repeat);
            }
            let measured = run_case(case, plan, &mut signals)
                .await
                .with_context(|| format!("case {} failed", case.name()))?;
            for m in measured {
                if text {
                    println!("{m}");
                }
                runs.push(m);
            }
        }
        let medians = medians(&runs);
        if text && args.repeat > 1 {
            for m in &medians {
                println!("stat=median {m}");
            }
        }
        report.runs.extend(runs);
        report.medians.extend(medians);
    }
    if let Some(script) = peers_script {
        // As many passes as our runs, so both sides' figures are medians of the same count.
        let mut passes: Vec<Vec<PeerResult>> = Vec::new();
        let mut notes = Vec::new();
        let mut failure = None;
        for k in 1..=args.repeat {
            if std::io::stderr().is_terminal() {
                eprintln!("bench: the peers' script (pass {k} of {})", args.repeat);
            }
            let pass = tokio::select! {
                pass = run_peers(&script, text) => pass,
                signal = signals.recv() => Err((
                    PeersOutput::default(),
                    anyhow!("stopped by {signal} while the peers ran"),
                )),
            };
            let (pass, e) = match pass {
                Ok(pass) => (pass, None),
                Err((pass, e)) => (pass, Some(e)),
            };
            passes.push(pass.results);
            notes.extend(pass.notes);
            if let Some(e) = e {
                failure = Some(e.context(format!("peers' pass {k} of {}", args.repeat)));
                break;
            }
        }
        let medians = peer_medians(&passes);
        if text && passes.len() > 1 {
            for m in &medians {
                println!("stat=median {m}");
            }
        }
        let peers = PeersOutput {
            results: medians,
            notes,
        };
        let ratios = ratios(&report.medians, &peers.results);
        if text {
            if ratios.is_empty() {
                println!("# no peer result matches a case that ran");
            } else {
                println!(
                    "# flame_vs_peer: how many times faster flame is (above 1: flame is faster)"
                );
            }
            for r in &ratios {
                println!("{r}");
            }
        }
        report.peers = Some(PeersReport {
            script: script.display().to_string(),
            passes,
            medians: peers.results,
            notes: peers.notes,
            ratios,
        });
        if let Some(e) = failure {
            if !text {
                print_json(&report)?;
            }
            return Err(e);
        }
    }
    if !text {
        print_json(&report)?;
    }
    Ok(())
}

/// The peers' script to run, if any. Missing, it is an error with `--peers` and a note
/// otherwise; checked before any case runs.
fn peers_script(args: &BenchArgs) -> anyhow::Result<Option<PathBuf>> {
    if !args.peers && args.peers_script.is_none() {
        return Ok(None);
    }
    let script = args
        .peers_script
        .clone()
        .unwrap_or_else(|| PathBuf::from(PEERS_SCRIPT_DEFAULT));
    if script.is_file() {
        return Ok(Some(script));
    }
    if args.peers {
        return Err(anyhow!(
            "the peers' script {} is not there",
            script.display()
        ))
        .hint("run from the project root (the script is ../shared/peers/bench_peers.sh from there), or give --peers-script PATH");
    }
    eprintln!(
        "note: the peers' script {} is not there; running Flame's cases only",
        script.display()
    );
    Ok(None)
}

/// What a case needs of its cluster, taken before the cluster is handed to
/// [`run_then_stop`].
#[derive(Debug)]
struct Target {
    config: ClientConfig,
    head_pid: Option<u32>,
    node_pid: Option<u32>,
    node_name: String,
    /// The head's data folder, where the `fsync` line syncs its probe file.
    data_dir: PathBuf,
}

impl Target {
    fn of(cluster: &LocalCluster) -> Target {
        Target {
            config: cluster.client_config(),
            head_pid: cluster.head_pid(),
            node_pid: cluster.node_pid(),
            node_name: cluster.node_name().to_string(),
            data_dir: cluster.data_dir().to_path_buf(),
        }
    }

    /// The peaks so far; `None` when `/proc` does not say (then the line has no RSS fields).
    fn rss(&self) -> Option<Rss> {
        Some(Rss {
            rss_head_kib: peak_rss_kib(self.head_pid?)?,
            rss_node_kib: peak_rss_kib(self.node_pid?)?,
        })
    }
}

/// Runs one case on a fresh cluster and returns its measurements; a signal stops it.
async fn run_case(
    case: Case,
    plan: Plan,
    signals: &mut StopSignals,
) -> anyhow::Result<Vec<Measurement>> {
    let started = Instant::now();
    let opts = LocalOptions {
        node_cpus: Some(plan.executors),
        ..LocalOptions::default()
    };
    let cluster = start_unless_stopped(opts, signals).await?;
    let target = Target::of(&cluster);
    let work = async {
        let client = super::connect_to(&target.config).await?;
        let measured = measure(case, plan, &client, &target, started).await;
        client.close().await;
        measured
    };
    run_then_stop(cluster, async {
        tokio::select! {
            measured = work => measured,
            signal = signals.recv() => Err(anyhow!("stopped by {signal}")),
        }
    })
    .await
}

/// The measurements of one case against a running cluster; `started` is when the cluster
/// began to start.
async fn measure(
    case: Case,
    plan: Plan,
    client: &Client,
    target: &Target,
    started: Instant,
) -> anyhow::Result<Vec<Measurement>> {
    match case {
        Case::Payload1Mib => {
            let n = plan.tasks(PAYLOAD_TASKS);
            let mut lines = Vec::new();
            for (name, ephemeral) in [("payload_1MiB", false), ("payload_1MiB_ephemeral", true)] {
                let checked = session_run(client, plan, n, PAYLOAD_BYTES, ephemeral).await?;
                lines.push(Measurement::new(name, n, checked.elapsed(), target.rss()));
            }
            Ok(lines)
        }
        Case::Throughput | Case::ThroughputEphemeral => {
            let (n, size) = (plan.tasks(THROUGHPUT_TASKS), TINY_INPUT_BYTES);
            let ephemeral = case == Case::ThroughputEphemeral;
            let checked = session_run(client, plan, n, size, ephemeral).await?;
            Ok(vec![Measurement::new(
                case.name(),
                n,
                checked.elapsed(),
                target.rss(),
            )])
        }
        Case::ColdStart => {
            let checked = session_run(client, plan, 1, TINY_INPUT_BYTES, false).await?;
            let first = checked.first_result.unwrap_or(checked.finished);
            Ok(vec![Measurement::new(
                case.name(),
                1,
                first.saturating_duration_since(started),
                target.rss(),
            )])
        }
        Case::Latency => {
            let warmup = plan.tasks(LATENCY_WARMUP_ROUND_TRIPS);
            let rounds = plan.tasks(LATENCY_ROUND_TRIPS);
            let mut lines = Vec::new();
            for (name, ephemeral) in [("latency_durable", false), ("latency_ephemeral", true)] {
                let (elapsed, mut samples) =
                    latency(client, plan, warmup, rounds, ephemeral).await?;
                let mut m = Measurement::new(name, rounds, elapsed, target.rss());
                m.latency = Some(percentiles(&mut samples));
                lines.push(m);
            }
            // What one durable commit costs on this disk right now, next to which
            // latency_durable is judged (its target is one fsync plus 150 µs).
            let dir = target.data_dir.clone();
            let syncs = plan.tasks(FSYNC_PROBES);
            let (elapsed, mut samples) =
                tokio::task::spawn_blocking(move || fsync_probe(&dir, syncs))
                    .await
                    .context("the fsync probe stopped")??;
            let mut m = Measurement::new("fsync", syncs, elapsed, None);
            m.latency = Some(percentiles(&mut samples));
            lines.push(m);
            Ok(lines)
        }
        Case::Sessions => {
            let n = plan.tasks(SESSION_TASKS);
            let elapsed = sessions(client, plan, n).await?;
            let total = n.saturating_mul(SESSIONS as u64);
            Ok(vec![Measurement::new(
                case.name(),
                total,
                elapsed,
                target.rss(),
            )])
        }
        Case::Queue => queue(client, plan, target).await,
    }
}

/// One ping session of `n` inputs of `size` bytes, built before the clock starts.
async fn session_run(
    client: &Client,
    plan: Plan,
    n: u64,
    size: usize,
    ephemeral: bool,
) -> anyhow::Result<Checked> {
    let inputs = make_inputs(n, size)?;
    let session = create_ping_session(client, ephemeral, 0).await?;
    let progress = ClearOnDrop(progress_bar(n));
    run_checked(&session, inputs, plan.stall_timeout, &progress.0).await
}

/// `warmup` then `rounds` round trips in one session, one task at a time: submit it, wait
/// for its result on the watch, check it, next. Returns the measured rounds' wall time and
/// each one's round trip.
async fn latency(
    client: &Client,
    plan: Plan,
    warmup: u64,
    rounds: u64,
    ephemeral: bool,
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let total = warmup.saturating_add(rounds);
    let inputs = make_inputs(total, TINY_INPUT_BYTES)?;
    let session = create_ping_session(client, ephemeral, 0).await?;
    let mut watch = session.watch().await.context("cannot watch the session")?;
    let mut submitter = session
        .submitter()
        .await
        .context("cannot open a submit stream")?;
    let warmup = usize::try_from(warmup).context("too many round trips for this machine")?;
    let mut samples = Vec::with_capacity(inputs.len().saturating_sub(warmup));
    let mut measured_from = Instant::now();
    for (i, input) in inputs.iter().enumerate() {
        if i == warmup {
            measured_from = Instant::now();
        }
        let sent = Instant::now();
        submitter
            .send(vec![input.clone()])
            .await
            .context("cannot submit a task")?;
        let task = i + 1;
        let outcome = sole_result(&mut watch, task, plan.stall_timeout).await?;
        let round_trip = sent.elapsed();
        check_outcome(task, input, Some(&outcome)).map_err(|(_, line)| anyhow!(line))?;
        if i >= warmup {
            samples.push(round_trip);
        }
    }
    let elapsed = measured_from.elapsed();
    let acks = submitter
        .finish()
        .await
        .context("cannot submit the tasks")?;
    check_acks(&acks, inputs.len())?;
    session.close().await.context("cannot close the session")?;
    // Closed with every task final: the watch must end now, with nothing more.
    match tokio::time::timeout(plan.stall_timeout, watch.next()).await {
        Err(_) => bail!(
            "the session did not finish within {} of its last result",
            humantime::format_duration(plan.stall_timeout)
        ),
        Ok(Some(Ok(batch))) => bail!(
            "{} unexpected results after the last round trip",
            batch.len()
        ),
        Ok(Some(Err(e))) => return Err(e).context("watching the results failed"),
        Ok(None) if !watch.is_finished() => {
            bail!("the result stream ended before the session finished")
        }
        Ok(None) => {}
    }
    Ok((elapsed, samples))
}

/// The next result on `watch`, which must be task `task`'s and alone.
async fn sole_result(
    watch: &mut ResultStream,
    task: usize,
    stall_timeout: Duration,
) -> anyhow::Result<TaskOutcome> {
    let expected = TaskId(task as u64);
    loop {
        let batch = match tokio::time::timeout(stall_timeout, watch.next()).await {
            Err(_) => bail!(
                "no result for task {task} within {}",
                humantime::format_duration(stall_timeout)
            ),
            Ok(None) => bail!("the result stream ended before task {task}'s result"),
            Ok(Some(batch)) => batch.context("watching the results failed")?,
        };
        let mut batch = batch;
        if batch.is_empty() {
            continue;
        }
        if batch.len() == 1 && batch[0].task == expected {
            if let Some(result) = batch.pop() {
                return Ok(result.outcome);
            }
        }
        let ids: Vec<String> = batch.iter().take(5).map(|r| r.task.to_string()).collect();
        bail!(
            "expected the result of task {task} alone, got {} results, for tasks {}",
            batch.len(),
            ids.join(", ")
        );
    }
}

/// Writes one page and `fdatasync`s it (what redb's durable commit ends with), `syncs`
/// times, in a probe file of `dir` that is removed afterwards; each sync is timed.
fn fsync_probe(dir: &Path, syncs: u64) -> anyhow::Result<(Duration, Vec<Duration>)> {
    use std::os::unix::fs::FileExt;
    let path = dir.join("fsync-probe");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let page = vec![0x5a_u8; FSYNC_PROBE_BYTES];
    let probe = || -> std::io::Result<(Duration, Vec<Duration>)> {
        // Allocated and synced once first, so the timed syncs do not grow the file.
        for slot in 0..16u64 {
            file.write_all_at(&page, slot * FSYNC_PROBE_BYTES as u64)?;
        }
        file.sync_all()?;
        let mut samples = Vec::new();
        let started = Instant::now();
        for i in 0..syncs {
            file.write_all_at(&page, (i % 16) * FSYNC_PROBE_BYTES as u64)?;
            let t = Instant::now();
            file.sync_data()?;
            samples.push(t.elapsed());
        }
        Ok((started.elapsed(), samples))
    };
    let result = probe().with_context(|| format!("cannot write and sync {}", path.display()));
    let _ = std::fs::remove_file(&path);
    result
}

/// Nearest-rank percentiles of `samples` (as the peers compute theirs), in microseconds;
/// sorts them.
fn percentiles(samples: &mut [Duration]) -> Percentiles {
    samples.sort_unstable();
    let at = |q: f64| -> f64 {
        if samples.is_empty() {
            return 0.0;
        }
        let rank = (q * samples.len() as f64).ceil() as usize;
        let k = rank.saturating_sub(1).min(samples.len() - 1);
        samples[k].as_nanos() as f64 / 1e3
    };
    Percentiles {
        p50_us: at(0.50),
        p99_us: at(0.99),
        p999_us: at(0.999),
    }
}

/// [`SESSIONS`] sessions of `n` tasks each at once, on one connection; the time until the
/// last one finished.
async fn sessions(client: &Client, plan: Plan, n: u64) -> anyhow::Result<Duration> {
    let inputs = make_inputs(n, TINY_INPUT_BYTES)?;
    let started = Instant::now();
    // Dropping the set (on an error) aborts the sessions still running.
    let mut runs = JoinSet::new();
    for _ in 0..SESSIONS {
        let client = client.clone();
        let inputs = inputs.clone();
        let stall_timeout = plan.stall_timeout;
        runs.spawn(async move {
            let session = create_ping_session(&client, false, 0).await?;
            run_checked(&session, inputs, stall_timeout, &ProgressBar::hidden()).await
        });
    }
    while let Some(joined) = runs.join_next().await {
        joined.context("a session's task failed")??;
    }
    Ok(started.elapsed())
}

/// The queue case: with the node drained, submits every task (the ack rate, and the
/// head's peak memory holding them all), then undrains it and times the drain.
async fn queue(client: &Client, plan: Plan, target: &Target) -> anyhow::Result<Vec<Measurement>> {
    let n = plan.tasks(QUEUE_TASKS);
    let inputs = make_inputs(n, TINY_INPUT_BYTES)?;
    client
        .drain_node(&target.node_name)
        .await
        .with_context(|| format!("cannot drain node {}", target.node_name))?;
    let session = create_ping_session(client, false, 0).await?;
    let mut watch = session.watch().await.context("cannot watch the session")?;

    let enqueue_started = Instant::now();
    let mut submitter = session
        .submitter()
        .await
        .context("cannot open a submit stream")?;
    submitter
        .send(inputs.clone())
        .await
        .context("cannot submit the tasks")?;
    let acks = submitter
        .finish()
        .await
        .context("cannot submit the tasks")?;
    let enqueued = Measurement::new("queue_enqueue", n, enqueue_started.elapsed(), target.rss());
    session.close().await.context("cannot close the session")?;
    // The point of the case: all of them wait, none has run.
    let counts = session
        .info()
        .await
        .context("cannot read the session")?
        .counts;
    if counts.pending != n {
        bail!(
            "the drained node ran tasks: {} of {n} pending after the enqueue ({counts:?})",
            counts.pending
        );
    }

    let progress = ClearOnDrop(progress_bar(n));
    let drain_started = Instant::now();
    client
        .undrain_node(&target.node_name)
        .await
        .with_context(|| format!("cannot undrain node {}", target.node_name))?;
    let checked = collect_checked(
        &mut watch,
        &inputs,
        std::future::ready(Ok(acks)),
        drain_started,
        plan.stall_timeout,
        &progress.0,
    )
    .await?;
    let drained = Measurement::new("queue_drain", n, checked.elapsed(), target.rss());
    Ok(vec![enqueued, drained])
}

/// The peak resident set (`VmHWM`) of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_kib(&status, "VmHWM")
}

/// A `NAME:   1234 kB` field of a `/proc/PID/status` text.
fn status_kib(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(':')?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

/// The median of each figure of each measurement name in `runs`, in order of first
/// appearance. A figure some runs lack (RSS) is left out.
fn medians(runs: &[Measurement]) -> Vec<Measurement> {
    let mut names: Vec<&str> = Vec::new();
    for m in runs {
        if !names.contains(&m.case.as_str()) {
            names.push(&m.case);
        }
    }
    names
        .into_iter()
        .filter_map(|name| {
            let of: Vec<&Measurement> = runs.iter().filter(|m| m.case == name).collect();
            let first = of.first()?;
            let latency = of
                .iter()
                .map(|m| m.latency)
                .collect::<Option<Vec<_>>>()
                .map(|l| Percentiles {
                    p50_us: median(l.iter().map(|p| p.p50_us)),
                    p99_us: median(l.iter().map(|p| p.p99_us)),
                    p999_us: median(l.iter().map(|p| p.p999_us)),
                });
            let rss = of
                .iter()
                .map(|m| m.rss)
                .collect::<Option<Vec<_>>>()
                .map(|r| Rss {
                    rss_head_kib: median(r.iter().map(|x| x.rss_head_kib as f64)).round() as u64,
                    rss_node_kib: median(r.iter().map(|x| x.rss_node_kib as f64)).round() as u64,
                });
            Some(Measurement {
                case: first.case.clone(),
                tasks: median(of.iter().map(|m| m.tasks as f64)).round() as u64,
                seconds: median(of.iter().map(|m| m.seconds)),
                tasks_per_s: median(of.iter().map(|m| m.tasks_per_s)),
                latency,
                rss,
            })
        })
        .collect()
}

/// The median of `values`: the middle one, or the mean of the middle two; 0 for none.
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// One result line of the peers' script:
/// `peer=<name> case=<case> tasks=<N> seconds=<s> tasks_per_s=<r> [p50_us=.. p99_us=..]`.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct PeerResult {
    peer: String,
    case: String,
    /// Every numeric field, by name.
    figures: BTreeMap<String, f64>,
}

impl PeerResult {
    /// Parses a result line; anything else (`# ...` comments, `SKIPPED`, `TIMEOUT`,
    /// `FAILED` lines) is `None`.
    fn parse(line: &str) -> Option<PeerResult> {
        let mut peer = None;
        let mut case = None;
        let mut figures = BTreeMap::new();
        for field in line.split_whitespace() {
            let (key, value) = field.split_once('=')?;
            match key {
                "peer" => peer = Some(value.to_string()),
                "case" => case = Some(value.to_string()),
                _ => {
                    figures.insert(key.to_string(), value.parse::<f64>().ok()?);
                }
            }
        }
        Some(PeerResult {
            peer: peer?,
            case: case?,
            figures,
        })
    }

    fn figure(&self, name: &str) -> Option<f64> {
        self.figures.get(name).copied()
    }
}

impl std::fmt::Display for PeerResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "peer={} case={}", self.peer, self.case)?;
        for (name, value) in &self.figures {
            write!(f, " {name}={value}")?;
        }
        Ok(())
    }
}

/// Per peer and case (in first-seen order), the median of each figure over the passes
/// that gave it.
fn peer_medians(passes: &[Vec<PeerResult>]) -> Vec<PeerResult> {
    let mut order: Vec<(String, String)> = Vec::new();
    let mut values: BTreeMap<(String, String), BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for result in passes.iter().flatten() {
        let key = (result.peer.clone(), result.case.clone());
        if !order.contains(&key) {
            order.push(key.clone());
        }
        let figures = values.entry(key).or_default();
        for (name, value) in &result.figures {
            figures.entry(name.clone()).or_default().push(*value);
        }
    }
    order
        .into_iter()
        .map(|key| {
            let figures = values
                .remove(&key)
                .unwrap_or_default()
                .into_iter()
                .map(|(name, v)| (name, median(v.into_iter())))
                .collect();
            PeerResult {
                peer: key.0,
                case: key.1,
                figures,
            }
        })
        .collect()
}

/// The peers' script's output: its results, and every other line.
#[derive(Debug, Default)]
struct PeersOutput {
    results: Vec<PeerResult>,
    notes: Vec<String>,
}

/// What the peers' script gave, for `--output json`.
#[derive(Debug, Serialize)]
struct PeersReport {
    script: String,
    /// Each pass's results.
    passes: Vec<Vec<PeerResult>>,
    /// Per peer and case, the median of each figure over the passes that gave it; the
    /// ratios compare these.
    medians: Vec<PeerResult>,
    notes: Vec<String>,
    ratios: Vec<Ratio>,
}

/// Runs the peers' script with `bash`, bounded by [`PEERS_TIMEOUT`], passing its stdout
/// lines through when `echo`. Its stderr (progress, the venv build) goes to ours. On an
/// error, what it printed until then comes with it.
async fn run_peers(script: &Path, echo: bool) -> Result<PeersOutput, (PeersOutput, anyhow::Error)> {
    let mut out = PeersOutput::default();
    let mut child = match tokio::process::Command::new("bash")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            let e = anyhow!(e).context(format!("cannot run bash {}", script.display()));
            return Err((out, e));
        }
    };
    let Some(stdout) = child.stdout.take() else {
        return Err((out, anyhow!("no stdout pipe for the peers' script")));
    };
    let mut reader = BufReader::new(stdout);
    let deadline = tokio::time::Instant::now() + PEERS_TIMEOUT;
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut reader).take(PEERS_LINE_BYTES_MAX);
        let read = limited.read_until(b'\n', &mut line);
        let n = match tokio::time::timeout_at(deadline, read).await {
            Err(_) => {
                let e = anyhow!(
                    "the peers' script ran past {}; it was killed",
                    humantime::format_duration(PEERS_TIMEOUT)
                );
                return Err((out, e));
            }
            Ok(Err(e)) => {
                return Err((out, anyhow!(e).context("cannot read the peers' output")));
            }
            Ok(Ok(n)) => n,
        };
        if n == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if echo {
            println!("{text}");
        }
        match PeerResult::parse(text) {
            Some(result) => out.results.push(result),
            None if !text.is_empty() => out.notes.push(text.to_string()),
            None => {}
        }
    }
    let status = match tokio::time::timeout_at(deadline, child.wait()).await {
        Err(_) => {
            let e = anyhow!(
                "the peers' script ran past {}; it was killed",
                humantime::format_duration(PEERS_TIMEOUT)
            );
            return Err((out, e));
        }
        Ok(Err(e)) => return Err((out, anyhow!(e).context("cannot wait for the peers' script"))),
        Ok(Ok(status)) => status,
    };
    if !status.success() {
        let e = anyhow!(
            "the peers' script {} failed with {status}",
            script.display()
        );
        return Err((out, e));
    }
    Ok(out)
}

/// Which figure is better high (a rate) or low (a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
}

/// Our measurement, the peers' case it compares with, the figure compared, and which way
/// is better. The peers' `startup` is their cluster start alone, without a first result;
/// ours includes one, so that ratio flatters them.
const COMPARED: &[(&str, &str, &str, Better)] = &[
    ("throughput", "throughput", "tasks_per_s", Better::Higher),
    (
        "throughput",
        "throughput_chunk1",
        "tasks_per_s",
        Better::Higher,
    ),
    (
        "throughput_ephemeral",
        "throughput",
        "tasks_per_s",
        Better::Higher,
    ),
    (
        "throughput_ephemeral",
        "throughput_chunk1",
        "tasks_per_s",
        Better::Higher,
    ),
    ("latency_durable", "latency", "p50_us", Better::Lower),
    ("latency_durable", "latency", "p99_us", Better::Lower),
    ("latency_ephemeral", "latency", "p50_us", Better::Lower),
    ("latency_ephemeral", "latency", "p99_us", Better::Lower),
    (
        "payload_1MiB",
        "payload_1MiB",
        "tasks_per_s",
        Better::Higher,
    ),
    (
        "payload_1MiB_ephemeral",
        "payload_1MiB",
        "tasks_per_s",
        Better::Higher,
    ),
    ("cold_start", "startup", "seconds", Better::Lower),
];

/// One comparison: `ratio case=<ours> peer=<name> peer_case=<theirs> metric=<figure>
/// flame=<ours> peer_value=<theirs> flame_vs_peer=<how many times faster flame is>`.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct Ratio {
    case: String,
    peer: String,
    peer_case: String,
    metric: String,
    flame: f64,
    peer_value: f64,
    flame_vs_peer: f64,
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ratio case={} peer={} peer_case={} metric={} flame={:.1} peer_value={:.1} flame_vs_peer={:.3}",
            self.case,
            self.peer,
            self.peer_case,
            self.metric,
            self.flame,
            self.peer_value,
            self.flame_vs_peer
        )
    }
}

/// Every comparison [`COMPARED`] allows between `ours` and the peers' `results`.
fn ratios(ours: &[Measurement], results: &[PeerResult]) -> Vec<Ratio> {
    let mut ratios = Vec::new();
    for &(our_case, their_case, metric, better) in COMPARED {
        let Some(flame) = ours
            .iter()
            .find(|m| m.case == our_case)
            .and_then(|m| m.figure(metric))
        else {
            continue;
        };
        for result in results.iter().filter(|r| r.case == their_case) {
            let Some(peer_value) = result.figure(metric) else {
                continue;
            };
            let flame_vs_peer = match better {
                Better::Higher => flame / peer_value,
                Better::Lower => peer_value / flame,
            };
            if !flame_vs_peer.is_finite() || flame_vs_peer <= 0.0 {
                continue;
            }
            ratios.push(Ratio {
                case: our_case.to_string(),
                peer: result.peer.clone(),
                peer_case: their_case.to_string(),
                metric: metric.to_string(),
                flame,
                peer_value,
                flame_vs_peer,
            });
        }
    }
    ratios
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn line(case: &str, tasks: u64, seconds: f64) -> Measurement {
        Measurement::new(case, tasks, Duration::from_secs_f64(seconds), None)
    }

    #[test]
    fn lines_have_the_documented_form() {
        let mut m = line("latency_durable", 2000, 2.0);
        assert_eq!(
            m.to_string(),
            "case=latency_durable tasks=2000 seconds=2.000000 tasks_per_s=1000.0"
        );
        m.latency = Some(Percentiles {
            p50_us: 900.0,
            p99_us: 1500.26,
            p999_us: 3000.0,
        });
        m.rss = Some(Rss {
            rss_head_kib: 10,
            rss_node_kib: 20,
        });
        assert_eq!(
            m.to_string(),
            "case=latency_durable tasks=2000 seconds=2.000000 tasks_per_s=1000.0 \
             p50_us=900.0 p99_us=1500.3 p999_us=3000.0 rss_head_kib=10 rss_node_kib=20"
        );
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["p99_us"], 1500.26);
        assert_eq!(json["rss_node_kib"], 20);
        let plain = serde_json::to_value(line("x", 1, 1.0)).unwrap();
        assert!(plain.get("p50_us").is_none(), "{plain}");
    }

    #[test]
    fn scale_multiplies_and_keeps_one_task() {
        let plan = |scale| Plan {
            scale,
            executors: 2,
            stall_timeout: Duration::from_secs(1),
        };
        assert_eq!(plan(1.0).tasks(100_000), 100_000);
        assert_eq!(plan(0.01).tasks(100_000), 1_000);
        assert_eq!(plan(0.001).tasks(200), 1);
        assert_eq!(plan(0.0001).tasks(50), 1);
        assert!(parse_scale("0.001").is_ok());
        for bad in ["0", "-1", "nan", "inf", "11", "x"] {
            assert!(parse_scale(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut samples: Vec<Duration> = (1..=1000u64).rev().map(Duration::from_micros).collect();
        let p = percentiles(&mut samples);
        assert_eq!((p.p50_us, p.p99_us, p.p999_us), (500.0, 990.0, 999.0));
        let mut one = vec![Duration::from_micros(7)];
        assert_eq!(percentiles(&mut one).p999_us, 7.0);
    }

    #[test]
    fn peer_medians_per_peer_case_and_figure() {
        let pass = |rate: f64, p50: Option<f64>| {
            let mut v = vec![PeerResult::parse(&format!(
                "peer=ray case=throughput tasks=10 seconds=1 tasks_per_s={rate}"
            ))
            .unwrap()];
            if let Some(p50) = p50 {
                v.push(PeerResult::parse(&format!("peer=dask case=latency p50_us={p50}")).unwrap());
            }
            v
        };
        let medians = peer_medians(&[
            pass(100.0, Some(5.0)),
            pass(300.0, None),
            pass(200.0, Some(9.0)),
        ]);
        assert_eq!(medians.len(), 2);
        assert_eq!(medians[0].peer, "ray");
        assert_eq!(medians[0].figure("tasks_per_s"), Some(200.0));
        assert_eq!(medians[0].figure("tasks"), Some(10.0));
        // Two passes gave it: the mean of the middle two.
        assert_eq!(medians[1].figure("p50_us"), Some(7.0));
        assert_eq!(
            medians[0].to_string(),
            "peer=ray case=throughput seconds=1 tasks=10 tasks_per_s=200"
        );
    }

    #[test]
    fn medians_per_measurement() {
        let runs = vec![
            line("a", 10, 1.0),
            line("b", 5, 9.0),
            line("a", 10, 3.0),
            line("a", 10, 2.0),
            line("b", 5, 1.0),
        ];
        let m = medians(&runs);
        assert_eq!(m.len(), 2);
        assert_eq!((m[0].case.as_str(), m[0].seconds), ("a", 2.0));
        assert_eq!((m[1].case.as_str(), m[1].seconds), ("b", 5.0));
        assert_eq!(m[1].tasks, 5);
        assert_eq!(median([4.0, 1.0, 3.0, 2.0].into_iter()), 2.5);
    }

    #[test]
    fn proc_status_fields() {
        let status =
            "Name:\tflame-head\nVmPeak:\t  9000 kB\nVmHWM:\t    4242 kB\nVmRSS:\t 4000 kB\n";
        assert_eq!(status_kib(status, "VmHWM"), Some(4242));
        assert_eq!(status_kib(status, "VmRSS"), Some(4000));
        assert_eq!(status_kib(status, "VmSwap"), None);
        // This process has one.
        assert!(peak_rss_kib(std::process::id()).is_some_and(|k| k > 0));
    }

    #[test]
    fn peer_lines_are_parsed_and_compared() {
        let ray = PeerResult::parse(
            "peer=ray case=throughput tasks=10000 seconds=2.0000 tasks_per_s=5000.0",
        )
        .unwrap();
        assert_eq!(ray.figure("tasks_per_s"), Some(5000.0));
        let lat = PeerResult::parse(
            "peer=dask case=latency tasks=1000 seconds=1.0 tasks_per_s=1000.0 p50_us=800.0 p99_us=2000.0",
        )
        .unwrap();
        let startup =
            PeerResult::parse("peer=ray case=startup tasks=0 seconds=4.0 tasks_per_s=0.0").unwrap();
        for note in [
            "# versions: python 3.11",
            "peer=ray case=latency TIMEOUT after 90s",
            "peer=mp_pool case=throughput FAILED rc=1 (see /tmp/peers-bench.log)",
            "",
        ] {
            assert_eq!(PeerResult::parse(note), None, "{note}");
        }

        let mut latency = line("latency_durable", 2000, 2.0);
        latency.latency = Some(Percentiles {
            p50_us: 400.0,
            p99_us: 4000.0,
            p999_us: 5000.0,
        });
        let ours = vec![
            line("throughput", 100_000, 10.0),
            latency,
            line("cold_start", 1, 2.0),
            line("sessions", 100, 1.0),
        ];
        let r = ratios(&ours, &[ray, lat, startup]);
        let shown: Vec<String> = r.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "ratio case=throughput peer=ray peer_case=throughput metric=tasks_per_s flame=10000.0 peer_value=5000.0 flame_vs_peer=2.000",
                "ratio case=latency_durable peer=dask peer_case=latency metric=p50_us flame=400.0 peer_value=800.0 flame_vs_peer=2.000",
                "ratio case=latency_durable peer=dask peer_case=latency metric=p99_us flame=4000.0 peer_value=2000.0 flame_vs_peer=0.500",
                "ratio case=cold_start peer=ray peer_case=startup metric=seconds flame=2.0 peer_value=4.0 flame_vs_peer=2.000",
            ]
        );
    }

    #[test]
    fn case_names_round_trip() {
        for case in Case::value_variants() {
            assert_eq!(Case::from_str(case.name(), false).unwrap(), *case);
        }
        assert_eq!(
            Case::from_str("payload_1mib", false).unwrap(),
            Case::Payload1Mib
        );
    }
}
