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
//!
//! Here: the flags, the cases and their measuring; `figures.rs`: the output lines and their
//! medians; `peers.rs`: the peers' script, its lines and the ratios.

mod figures;
mod peers;

use super::local::{run_then_stop, start_unless_stopped};
use super::ping::{
    check_acks, check_outcome, collect_checked, create_ping_session, make_inputs, progress_bar,
    run_checked, Checked, ClearOnDrop,
};
use super::signals::StopSignals;
use crate::render::outln;
use crate::render::print_json;
use anyhow::{anyhow, bail, Context as _};
use clap::{Args, ValueEnum};
use figures::{medians, peak_rss_kib, percentiles, Measurement, Rss};
use flame_client::local::{LocalCluster, LocalOptions};
use flame_client::report::HintExt as _;
use flame_client::{Client, ClientConfig, ResultStream};
use flame_protocol::model::TaskOutcome;
use flame_protocol::TaskId;
use indicatif::ProgressBar;
use peers::{peer_medians, ratios, run_peers, PeerResult, PeersOutput, PeersReport};
use serde::Serialize;
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
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
    /// Put a 1 GiB object into the node's cache and get it back, checked (two lines:
    /// object_put_1GiB, object_get_1GiB, with mib_per_s)
    #[value(name = "object_1GiB", alias = "object_1gib")]
    Object1Gib,
    /// One 48 MiB object as the common data of a session whose tasks run on 4 nodes of
    /// this machine: each node fetches it once (two lines: broadcast_one_copy, one read of
    /// it by the client, and broadcast, to the first result from the 4th node)
    #[value(name = "broadcast")]
    Broadcast,
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
            Case::Object1Gib => "object_1GiB",
            Case::Broadcast => "broadcast",
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
                    outln!("{m}")?;
                }
                runs.push(m);
            }
        }
        let medians = medians(&runs);
        if text && args.repeat > 1 {
            for m in &medians {
                outln!("stat=median {m}")?;
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
                outln!("stat=median {m}")?;
            }
        }
        let peers = PeersOutput {
            results: medians,
            notes,
        };
        let ratios = ratios(&report.medians, &peers.results);
        if text {
            if ratios.is_empty() {
                outln!("# no peer result matches a case that ran")?;
            } else {
                outln!(
                    "# flame_vs_peer: how many times faster flame is (above 1: flame is faster)"
                )?;
            }
            for r in &ratios {
                outln!("{r}")?;
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
    let opts = match case {
        // One executor on each of four nodes, so the session's tasks need every node.
        Case::Broadcast => LocalOptions {
            node_cpus: Some(1),
            extra_nodes: BROADCAST_NODES - 1,
            ..LocalOptions::default()
        },
        _ => LocalOptions {
            node_cpus: Some(plan.executors),
            ..LocalOptions::default()
        },
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
        Case::Object1Gib => object_1gib(client, plan, target).await,
        Case::Broadcast => broadcast(client, plan, target).await,
    }
}

/// `size` pseudo-random bytes (xorshift: cheap, reproducible, incompressible enough).
fn blob(size: u64) -> anyhow::Result<bytes::Bytes> {
    let len = usize::try_from(size).context("the object does not fit this machine's memory")?;
    let mut data = vec![0u8; len];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for word in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let bytes = state.to_le_bytes();
        word.copy_from_slice(&bytes[..word.len()]);
    }
    Ok(data.into())
}

/// Nodes of the `broadcast` case.
const BROADCAST_NODES: u32 = 4;
/// Bytes of the `broadcast` case's object (scaled by `--scale`, at least 4 MiB). The
/// issue asks for 256 MiB; an application gets its session's common data in one shim
/// frame, at most `limits::FRAME_BYTES_MAX` (64 MiB), so the case uses what fits until
/// executors can map objects instead.
const BROADCAST_BYTES: u64 = 48 << 20;
/// Tiny tasks submitted at a time until every node has run one.
const BROADCAST_WAVE_TASKS: usize = 2_000;
/// Waves before the case gives up on reaching every node.
const BROADCAST_WAVES_MAX: usize = 50;

/// One object as the common data of a ping session on [`BROADCAST_NODES`] nodes of one
/// executor each: tiny tasks in waves until every node has answered one. Each node fetches
/// the object once (from the node it was put on, or a node that has it), before its
/// executor enters the session. Measured beside one read of the object by the client.
async fn broadcast(
    client: &Client,
    plan: Plan,
    target: &Target,
) -> anyhow::Result<Vec<Measurement>> {
    use flame_protocol::model::SessionSpec;
    use flame_protocol::object::Payload;
    let size = ((BROADCAST_BYTES as f64 * plan.scale.min(1.0)) as u64).max(4 << 20);
    let data = blob(size)?;
    let object = client
        .put_object(None, None, data.clone(), 1)
        .await
        .context("cannot put the object")?;
    let started = Instant::now();
    let back = client
        .get_object(None, object.id)
        .await
        .context("cannot read the object back")?;
    let one =
        Measurement::new("broadcast_one_copy", 1, started.elapsed(), target.rss()).moved(size);
    if back != data {
        bail!("object {} came back different", object.id);
    }
    drop(back);
    let started = Instant::now();
    let session = client
        .create_session(SessionSpec {
            common_data: Payload::Object(object),
            ..SessionSpec::new(super::ping::PING_APPLICATION)
        })
        .await
        .context("cannot create the session")?;
    let mut watch = session.watch().await.context("cannot watch the session")?;
    let mut hosts = std::collections::BTreeSet::new();
    let mut tasks = 0u64;
    for _ in 0..BROADCAST_WAVES_MAX {
        let inputs = make_inputs(BROADCAST_WAVE_TASKS as u64, TINY_INPUT_BYTES)?;
        let ids = session
            .submit(inputs.clone())
            .await
            .context("cannot submit")?;
        tasks += ids.len() as u64;
        let mut left = ids.len();
        while left > 0 {
            let batch = tokio::time::timeout(plan.stall_timeout, watch.next())
                .await
                .map_err(|_| anyhow!("no result for {:?}", plan.stall_timeout))?
                .ok_or_else(|| anyhow!("the result stream ended"))?
                .context("the result stream failed")?;
            for r in batch {
                let i = usize::try_from(r.task.0.saturating_sub(ids[0].0))
                    .ok()
                    .filter(|&i| i < inputs.len())
                    .ok_or_else(|| anyhow!("a result for task {} of no wave", r.task))?;
                let reply =
                    check_outcome(i, &inputs[i], Some(&r.outcome)).map_err(|(_, e)| anyhow!(e))?;
                hosts.insert(reply.host);
                left = left.saturating_sub(1);
            }
        }
        if hosts.len() >= BROADCAST_NODES as usize {
            break;
        }
    }
    let elapsed = started.elapsed();
    session.close().await.context("cannot close the session")?;
    if hosts.len() < BROADCAST_NODES as usize {
        bail!(
            "after {tasks} tasks only {} of {BROADCAST_NODES} nodes ran one: {hosts:?}",
            hosts.len()
        );
    }
    let info = session.info().await.context("cannot read the session")?;
    let copies = client
        .list_objects(None, None)
        .await
        .context("cannot list the objects")?
        .into_iter()
        .find(|o| o.object.id == object.id)
        .map_or(0, |o| o.nodes.len());
    eprintln!(
        "broadcast: {copies} copies of {} MiB after {tasks} tasks; {} MiB fetched between \
         nodes ({} fetches' worth)",
        size >> 20,
        info.data.fetched_bytes >> 20,
        info.data.fetched_bytes / size.max(1)
    );
    client
        .remove_objects(None, &[object.id])
        .await
        .context("cannot remove the object")?;
    let all = Measurement::new("broadcast", tasks, elapsed, target.rss())
        .moved(size * u64::from(BROADCAST_NODES - 1));
    Ok(vec![one, all])
}

/// Bytes of the `object_1GiB` case's object (scaled by `--scale`, at least 1 MiB).
const OBJECT_CASE_BYTES: u64 = 1 << 30;

/// Puts one object of 1 GiB (made before the clock starts, not all one value so that no
/// layer can shortcut it) through the client's object path to the node, then gets it back
/// and compares every byte. Same host: the Unix socket and a memory file descriptor.
async fn object_1gib(
    client: &Client,
    plan: Plan,
    target: &Target,
) -> anyhow::Result<Vec<Measurement>> {
    let size = ((OBJECT_CASE_BYTES as f64 * plan.scale.min(1.0)) as u64).max(1 << 20);
    let data = blob(size)?;
    let started = Instant::now();
    let object = client
        .put_object(None, None, data.clone(), 1)
        .await
        .context("cannot put the object")?;
    let put = Measurement::new("object_put_1GiB", 1, started.elapsed(), target.rss()).moved(size);
    let started = Instant::now();
    let back = client
        .get_object(None, object.id)
        .await
        .context("cannot get the object back")?;
    let get = Measurement::new("object_get_1GiB", 1, started.elapsed(), target.rss()).moved(size);
    if back != data {
        bail!(
            "object {} came back different ({} bytes, {} put)",
            object.id,
            back.len(),
            data.len()
        );
    }
    client
        .remove_objects(None, &[object.id])
        .await
        .context("cannot remove the object")?;
    Ok(vec![put, get])
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

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
