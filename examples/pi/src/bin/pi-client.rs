//! `pi-client`: estimates Pi by Monte Carlo on a Flame cluster.
//!
//! It opens a session of the `pi` application with the seed as common data, submits
//! `--tasks` tasks of `--samples-per-task` points each on one pipelined stream, sums the
//! counts as results arrive, and prints the estimate. With `--local` it first starts a head
//! and a node on this machine and registers the application itself.

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use clap::Parser;
use flame_client::app_file::load_app_file;
use flame_client::local::{LocalCluster, LocalError, LocalOptions};
use flame_client::report::{group, report, HintExt as _};
use flame_client::{BatchAck, Client, ClientConfig, ConfigFlags, Session};
use flame_example_pi::sampler::estimate;
use flame_example_pi::wire::{decode_inside, encode_u64, SAMPLES_PER_TASK_MAX};
use flame_protocol::model::{ApplicationSpec, ErrorKind, SessionSpec, TaskOutcome};
use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// Most tasks one run may submit: the client keeps one entry per task to spot duplicates.
const TASKS_MAX: u64 = 1_000_000;
/// Failed tasks quoted in the report; the rest are only counted.
const FAILURES_SHOWN_MAX: usize = 5;
/// The application file `--local` registers, next to this crate's manifest.
const RUST_APP_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/pi.toml");
/// The application file `--local --python` registers.
const PYTHON_APP_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/pi-python.toml");
/// The application used without `--local` when `--app` is not given.
const DEFAULT_APP: &str = "pi";

/// Estimate Pi by Monte Carlo on a Flame cluster.
#[derive(Debug, Parser)]
#[command(name = "pi-client", version)]
struct Args {
    /// The registered application to use [default: pi; with --local, the name in the
    /// application file, which this renames]
    #[arg(long, value_name = "NAME")]
    app: Option<String>,
    /// Number of tasks
    #[arg(long, value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u64).range(1..=TASKS_MAX))]
    tasks: u64,
    /// Points each task draws
    #[arg(long, value_name = "S", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..=SAMPLES_PER_TASK_MAX))]
    samples_per_task: u64,
    /// Seed of every task's generator, sent as the session's common data
    #[arg(long, value_name = "X", default_value_t = 0)]
    seed: u64,
    /// Start a head and a node on this machine, register the application, and stop them
    /// afterwards
    #[arg(long)]
    local: bool,
    /// With --local: register the Python service (pi-python.toml) instead of the Rust one
    #[arg(long, requires = "local")]
    python: bool,
    /// With --local: the application file to register [default: pi.toml next to this
    /// example's Cargo.toml, or pi-python.toml with --python]
    #[arg(
        long,
        value_name = "FILE",
        requires = "local",
        conflicts_with = "python"
    )]
    app_file: Option<PathBuf>,
    /// Head address, host:port [else FLAME_HEAD, else the config files]
    #[arg(long, value_name = "ADDR", conflicts_with = "local")]
    head: Option<String>,
    /// The head's CA certificate (PEM) [else FLAME_CA_FILE, else the config files]
    #[arg(long, value_name = "PATH", conflicts_with = "local")]
    ca_file: Option<PathBuf>,
    /// Give up when no result arrives for this long
    #[arg(long, value_name = "DURATION", default_value = "5m",
          value_parser = humantime::parse_duration)]
    stall_timeout: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if !args.local {
        let flags = ConfigFlags {
            head: args.head.clone(),
            ca_file: args.ca_file.clone(),
            // The token and certificate come from FLAME_TOKEN_FILE, FLAME_TOKEN or the
            // configuration files, as `flame local` prints them.
            ..ConfigFlags::default()
        };
        let config = ClientConfig::resolve(&flags).hint(
            "`flame local` starts a cluster and prints the exports to use; `pi-client --local` starts its own",
        )?;
        let app = args.app.clone().unwrap_or_else(|| DEFAULT_APP.to_string());
        return connect_and_estimate(&config, &app, &args).await;
    }

    let file = match (&args.app_file, args.python) {
        (Some(file), _) => file.clone(),
        (None, true) => PathBuf::from(PYTHON_APP_FILE),
        (None, false) => PathBuf::from(RUST_APP_FILE),
    };
    let mut spec = load_app_file(&file)?;
    if let Some(app) = &args.app {
        spec.name.clone_from(app);
    }
    // Checked before anything starts: a missing service would otherwise show up only as
    // failed executors on the node.
    check_command(&spec, &file)?;

    eprintln!("Starting flame-head and flame-node...");
    let mut cluster = match LocalCluster::start(LocalOptions::default()).await {
        Err(e @ LocalError::BinaryNotFound { .. }) => Err(e).hint(
            "cargo build --release -p flame-head -p flame-node (they are looked for next to pi-client, then on PATH)",
        )?,
        other => other.context("cannot start a local cluster")?,
    };
    let config = cluster.client_config();
    let outcome = tokio::select! {
        result = register_and_estimate(&config, spec, &args) => result,
        exit = cluster.exited() => Err(anyhow!(
            "{} exited with {} during the run; the end of {}:\n{}",
            exit.name, exit.status, exit.log.display(), exit.tail
        )),
    };
    // Stopped whatever the outcome; the run's own error matters more than a messy stop.
    let stopped = cluster.shutdown().await;
    outcome?;
    Ok(stopped?)
}

/// Fails when a `command` with a `/` is not an executable file; bare names are left to the
/// node's `PATH`.
fn check_command(spec: &ApplicationSpec, file: &Path) -> anyhow::Result<()> {
    if !spec.command.contains('/') {
        return Ok(());
    }
    let command = Path::new(&spec.command);
    match std::fs::metadata(command) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(anyhow!(
            "{}: `command` {} is not an executable file",
            file.display(),
            command.display()
        ))
        .hint(format!("chmod +x {}", command.display())),
        Err(e) => Err(anyhow!(
            "{}: `command` {}: {e}",
            file.display(),
            command.display()
        ))
        .hint(
            "build the service with `cargo build --release -p flame-example-pi`, or fix `command` in the file",
        ),
    }
}

async fn register_and_estimate(
    config: &ClientConfig,
    spec: ApplicationSpec,
    args: &Args,
) -> anyhow::Result<()> {
    let client = Client::connect(config).await?;
    let result = async {
        let name = spec.name.clone();
        let info = client
            .register_application(spec)
            .await
            .with_context(|| format!("cannot register the application `{name}`"))?;
        let command_line: Vec<&str> = std::iter::once(info.spec.command.as_str())
            .chain(info.spec.args.iter().map(String::as_str))
            .collect();
        eprintln!("Registered `{name}`: {}", command_line.join(" "));
        estimate_with(&client, &name, args).await
    }
    .await;
    client.close().await;
    result
}

async fn connect_and_estimate(config: &ClientConfig, app: &str, args: &Args) -> anyhow::Result<()> {
    let client = Client::connect(config).await?;
    let result = estimate_with(&client, app, args).await;
    client.close().await;
    result
}

async fn estimate_with(client: &Client, app: &str, args: &Args) -> anyhow::Result<()> {
    let session = client
        .create_session(SessionSpec {
            application: app.to_string(),
            common_data: Bytes::copy_from_slice(&encode_u64(args.seed)).into(),
            ephemeral: false,
            owner: Default::default(),
            priority: 0,
            job: None,
        })
        .await;
    let session = match session {
        Err(e) if e.kind() == Some(ErrorKind::NotFound) => Err(e).hint(
            "register it first: `flame app register examples/pi/pi.toml` (`flame app list` shows what is registered), or run `pi-client --local`",
        ),
        other => other.with_context(|| format!("cannot create a session of `{app}`")),
    }?;
    eprintln!(
        "Session {}: {} tasks of {} samples on `{app}`, seed {}.",
        session.id(),
        group(args.tasks),
        group(args.samples_per_task),
        args.seed
    );
    let result = tokio::select! {
        result = run_tasks(&session, args) => result,
        signal = tokio::signal::ctrl_c() => match signal {
            Ok(()) => Err(anyhow!("stopped by Ctrl-C")),
            Err(e) => Err(anyhow!("cannot wait for Ctrl-C: {e}")),
        },
    };
    if result.is_err() {
        // A failed run closes its session too, so that it finishes once its remaining
        // tasks do instead of staying open; the run's error is the one to report.
        if let Err(e) = session.close().await {
            eprintln!("note: closing session {} failed: {e}", session.id());
        }
    }
    result.map_err(|e| e.context(format!("session {}", session.id())))
}

/// Aborts the spawned task when dropped, so an early return leaves nothing running.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the results of one run add up to.
#[derive(Debug, Default)]
struct Tally {
    inside: u64,
    succeeded: u64,
    failed: u64,
    /// The first failures, as `task N: message`.
    shown: Vec<String>,
    /// Task ids with a result, to catch a second result for one task.
    seen: HashSet<u64>,
}

impl Tally {
    fn fail(&mut self, line: String) {
        self.failed += 1;
        if self.shown.len() < FAILURES_SHOWN_MAX {
            self.shown.push(line);
        }
    }
}

/// Watches, submits every task, and sums every result.
async fn run_tasks(session: &Session, args: &Args) -> anyhow::Result<()> {
    let n = usize::try_from(args.tasks).context("too many tasks for this machine")?;
    // The watch opens before any task exists, so no result is missed.
    let mut watch = session.watch().await.context("cannot watch the session")?;
    let started = Instant::now();
    // One buffer shared by every input.
    let input = Bytes::copy_from_slice(&encode_u64(args.samples_per_task));
    let mut submit = AbortOnDrop(tokio::spawn({
        let session = session.clone();
        async move { session.submit_and_close(vec![input; n]).await }
    }));

    let mut tally = Tally::default();
    let mut acks: Option<Vec<BatchAck>> = None;
    loop {
        tokio::select! {
            joined = &mut submit.0, if acks.is_none() => {
                acks = Some(joined.context("the submitting task failed")?.context("cannot submit the tasks")?);
            }
            next = tokio::time::timeout(args.stall_timeout, watch.next()) => match next {
                Err(_) => return Err(anyhow!(
                    "no result for {}: {} of {} tasks finished",
                    humantime::format_duration(args.stall_timeout),
                    group(tally.succeeded + tally.failed),
                    group(args.tasks)
                ))
                .hint(format!(
                    "`flame session view {}` shows where the tasks are; they stay pending while the application's executors cannot start, and the head's log says why",
                    session.id()
                )),
                Ok(None) => break,
                Ok(Some(batch)) => {
                    for result in batch.context("watching the results failed")? {
                        let task = result.task.0;
                        if !tally.seen.insert(task) {
                            tally.fail(format!("task {task}: a second result"));
                            continue;
                        }
                        match result.outcome {
                            TaskOutcome::Succeeded(output) => match decode_inside(&output) {
                                Ok(inside) => {
                                    tally.inside += inside;
                                    tally.succeeded += 1;
                                }
                                Err(e) => tally.fail(format!("task {task}: {e}")),
                            },
                            // The result stream fetches outputs kept as objects first.
                            TaskOutcome::Object(o) => {
                                tally.fail(format!("task {task}: output {} not fetched", o.id));
                            }
                            TaskOutcome::Failed(message) => {
                                tally.fail(format!("task {task}: {message}"));
                            }
                            TaskOutcome::Cancelled => {
                                tally.fail(format!("task {task}: cancelled"));
                            }
                        }
                    }
                }
            },
        }
    }
    let elapsed = started.elapsed();
    let acks = match acks {
        Some(acks) => acks,
        // The watch ended first; the submit side is bounded by its own timeouts.
        None => (&mut submit.0)
            .await
            .context("the submitting task failed")?
            .context("cannot submit the tasks")?,
    };
    let acked: u64 = acks.iter().map(|a| u64::from(a.count)).sum();
    if !watch.is_finished() {
        bail!(
            "the result stream ended before the session finished: {} of {} results",
            group(tally.succeeded + tally.failed),
            group(args.tasks)
        );
    }
    if tally.failed > 0 {
        for line in &tally.shown {
            eprintln!("  {line}");
        }
        return Err(anyhow!(
            "{} of {} tasks failed",
            group(tally.failed),
            group(args.tasks)
        ))
        .hint(format!(
            "the lines above are the service's messages; `flame session view {}` shows the session's counts",
            session.id()
        ));
    }
    if acked != args.tasks || tally.succeeded != args.tasks {
        bail!(
            "submitted {} tasks, the head acknowledged {} and {} succeeded",
            group(args.tasks),
            group(acked),
            group(tally.succeeded)
        );
    }

    // At most TASKS_MAX × SAMPLES_PER_TASK_MAX = 10¹⁵: no overflow.
    let samples = args.tasks * args.samples_per_task;
    let pi = estimate(tally.inside, samples);
    println!(
        "pi ≈ {pi:.8} from {} samples (error {:.1e}) in {} ms",
        group(samples),
        (pi - std::f64::consts::PI).abs(),
        group(u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse_with_their_defaults_and_limits() {
        use clap::CommandFactory as _;
        Args::command().debug_assert();
        let args = Args::try_parse_from(["pi-client"]).map_err(|e| e.to_string());
        let args = args
            .as_ref()
            .map(|a| (a.tasks, a.samples_per_task, a.seed, a.local));
        assert_eq!(args, Ok((100, 1_000_000, 0, false)));
        assert!(Args::try_parse_from(["pi-client", "--tasks", "0"]).is_err());
        assert!(Args::try_parse_from(["pi-client", "--samples-per-task", "1000000001"]).is_err());
        assert!(Args::try_parse_from(["pi-client", "--python"]).is_err());
        assert!(Args::try_parse_from(["pi-client", "--local", "--head", "h:1"]).is_err());
    }
}
