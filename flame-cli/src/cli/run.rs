//! `flame run APP [FILE]`: send inputs to any registered application and print its
//! outputs, as `srun`, GNU parallel or `ray.get(f.remote(x))` would.
//!
//! The inputs come from FILE or stdin, framed by `--framing` (one per line by default,
//! NUL-separated, or length-prefixed), or from `--input-dir`, one per file. They become
//! the tasks of one new session of APP, with `--common-data` as its common data; inputs
//! larger than the client's inline bound go to a node's object cache first, as the client
//! library does for every submitter. Outputs print in input order (or as they finish with
//! `--unordered`), framed like the inputs, or go to one file each with `--output-dir`;
//! `--output json` prints one JSON document instead.
//!
//! Input `N` is task `N`: the session is fresh and one submit stream sends the inputs in
//! order, so the head numbers them densely from 1 (checked against its acks).
//!
//! A failed task is named on stderr with its message; the others still print, and the
//! command then exits 1. Ctrl-C (or SIGTERM) cancels the session, so that no task of it
//! is left pending or running, and exits 130 (143).
//!
//! Memory is bounded whatever the inputs' size: the reading thread stays a few chunks
//! ahead, and inputs are submitted only while fewer than
//! [`output::HELD_INPUTS_MAX`] are unprinted and their bytes stay under
//! [`output::HELD_BYTES_MAX`].

mod input;
mod output;

use super::each::{reserve, submit_all};
use super::ping::{progress_bar, AbortOnDrop, ClearOnDrop};
use super::signals::StopSignals;
use super::GlobalArgs;
use crate::render::{OutputArgs, OutputFormat};
use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use clap::Args;
use flame_client::report::{group, HintExt as _};
use flame_client::{Client, Session};
use flame_protocol::limits;
use flame_protocol::model::{ErrorKind, SessionSpec};
use indicatif::ProgressBar;
use input::{Chunk, Framing, Input, Source};
use output::{Options, Sink, Window};

pub(super) use output::base64;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use tokio::sync::mpsc::{self, error::TrySendError};

/// Bytes of `--common-data`, at most; more than the client's inline bound travels as an
/// object.
pub const COMMON_DATA_BYTES_MAX: u64 = 1024 * 1024 * 1024;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The registered application to run (`flame app list` shows them)
    #[arg(value_name = "APP")]
    pub app: String,
    /// File of inputs, split as --framing says; `-` or none: stdin
    #[arg(value_name = "FILE", conflicts_with = "input_dir")]
    pub file: Option<PathBuf>,
    /// How inputs are split in FILE or stdin, and outputs on stdout: `lines` (one per
    /// line), `nul` (NUL-separated) or `length` (each a 4-byte little-endian length, then
    /// its bytes)
    #[arg(long, value_enum, default_value_t = Framing::Lines)]
    pub framing: Framing,
    /// One input per regular file of DIR, in the order of their names (for binary inputs)
    #[arg(long, value_name = "DIR")]
    pub input_dir: Option<PathBuf>,
    /// Write each output to a file of DIR instead of stdout, named after its input's file
    /// (with --input-dir) or its number from 1; DIR is created, or must be empty
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// The session's common data, read from FILE: each executor gets it once, before its
    /// first task of the session
    #[arg(long, value_name = "FILE")]
    pub common_data: Option<PathBuf>,
    /// Print outputs as their tasks finish, instead of in input order
    #[arg(long)]
    pub unordered: bool,
    /// Use an ephemeral session: tasks and results are kept in memory only
    #[arg(long)]
    pub ephemeral: bool,
    /// The session's priority among its owner's sessions: higher is served first
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub priority: i32,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Runs every input through `args.app`; see the module documentation.
pub async fn run(global: &GlobalArgs, args: RunArgs) -> anyhow::Result<()> {
    // Installed first, so that Ctrl-C at any point cancels what was started instead of
    // killing the process mid-way.
    let mut signals = StopSignals::install()?;
    let source = match &args.input_dir {
        Some(dir) => Source::dir(dir)?,
        None => Source::stream(args.file.as_deref(), args.framing)?,
    };
    let common_data = match &args.common_data {
        Some(path) => Bytes::from(
            input::read_bounded_file(path, COMMON_DATA_BYTES_MAX)
                .context("cannot read the common data")?,
        ),
        None => Bytes::new(),
    };
    if let Some(dir) = &args.output_dir {
        prepare_output_dir(dir)?;
    }
    let options = Options {
        unordered: args.unordered,
        json: args.output.output == OutputFormat::Json,
        sink: match &args.output_dir {
            Some(dir) => Sink::Dir(dir.clone()),
            None => Sink::Stdout(args.framing),
        },
        describe: source.describe(),
    };
    let mut window = Window::new(options);
    let mut chunks = input::spawn_reader(source)?;
    // The first chunk, before anything is created: a missing or empty input is reported
    // with nothing run.
    let first = tokio::select! {
        first = chunks.recv() => first,
        signal = signals.recv() => return interrupted(signal, None),
    };
    let first = match first {
        Some(chunk) => chunk?,
        None => Vec::new(),
    };
    if first.is_empty() {
        eprintln!("flame: no inputs; nothing to run");
        if window.is_json() {
            window.json_begin(None, &args.app)?;
            window.json_end()?;
            window.flush()?;
        }
        return Ok(());
    }
    let config = super::config(global)?;
    let client = tokio::select! {
        client = super::connect_to(&config) => client?,
        signal = signals.recv() => return interrupted(signal, None),
    };
    let spec = SessionSpec {
        common_data: common_data.into(),
        ephemeral: args.ephemeral,
        priority: args.priority,
        // Empty owner: the client's (--owner, FLAME_OWNER, the config files), else the
        // authenticated user, as the head decides.
        ..SessionSpec::new(args.app.clone())
    };
    let result = run_session(&client, spec, window, first, chunks, &mut signals).await;
    client.close().await;
    result
}

/// A new folder for the outputs, or an empty one: an output never replaces a file.
fn prepare_output_dir(dir: &Path) -> anyhow::Result<()> {
    let name = dir.display();
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(anyhow!("{name} is not empty"))
                    .hint("--output-dir takes a new or empty folder, so that no file is replaced");
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create the folder {name}"))
        }
        Err(e) => Err(e).with_context(|| format!("cannot read the folder {name}")),
    }
}

/// The end of a run stopped by `signal`: what was done about its session (when there is
/// one), and the exit code of a process killed by the signal (`main` reads [`Stopped`]).
///
/// [`Stopped`]: super::signals::Stopped
fn interrupted(signal: super::signals::Stop, session: Option<String>) -> anyhow::Result<()> {
    let stopped = signal.stopped();
    Err(match session {
        Some(what) => stopped.context(what),
        None => stopped,
    })
}

/// Creates the session, runs every input, and cancels the session if the run stops short.
async fn run_session(
    client: &Client,
    spec: SessionSpec,
    mut window: Window,
    first: Vec<Input>,
    chunks: mpsc::Receiver<Chunk>,
    signals: &mut StopSignals,
) -> anyhow::Result<()> {
    let app = spec.application.clone();
    let session = tokio::select! {
        session = client.create_session(spec) => session,
        signal = signals.recv() => return interrupted(signal, None),
    };
    let session = match session {
        Err(e) if e.kind() == Some(ErrorKind::NotFound) => Err(e).hint(format!(
            "`flame app list` shows the registered applications; `flame app register FILE` \
             registers `{app}`"
        )),
        other => other.with_context(|| format!("cannot create a session of {app}")),
    }?;
    if window.is_json() {
        window.json_begin(Some(session.id().0), &app)?;
    }
    let progress = ClearOnDrop(progress_bar(0));
    let stopped = tokio::select! {
        result = drive(&session, &mut window, first, chunks, &progress.0) => result.err().map(RunStop::Failed),
        signal = signals.recv() => Some(RunStop::Signal(signal)),
    };
    drop(progress);
    if let Some(stop) = stopped {
        // Whatever was printed stays printed; the rest of the session is not wanted.
        let _ = window.flush();
        return cancel_after(&session, stop, signals).await;
    }
    if window.is_json() {
        window.json_end()?;
    }
    window.flush()?;
    let tally = window.tally;
    if tally.failed + tally.cancelled > 0 {
        eprintln!(
            "error: {} of {} inputs failed (session {}; `flame session tasks {} --state failed` lists them)",
            group(tally.failed + tally.cancelled),
            group(tally.total()),
            session.id(),
            session.id()
        );
        return Err(super::Exit(1).into());
    }
    Ok(())
}

/// Why a run stopped short.
#[derive(Debug)]
enum RunStop {
    Signal(super::signals::Stop),
    Failed(anyhow::Error),
}

/// Cancels `session` after the run stopped short, and reports why. A second signal gives
/// up on waiting for the head.
async fn cancel_after(
    session: &Session,
    stop: RunStop,
    signals: &mut StopSignals,
) -> anyhow::Result<()> {
    let id = session.id();
    let cancelled = tokio::select! {
        cancelled = session.client().cancel_session(id) => cancelled.map_err(|e| e.to_string()),
        _ = signals.recv() => Err("a second signal stopped the wait for the head".to_string()),
    };
    let what = match cancelled {
        Ok(()) => format!("session {id} was cancelled"),
        Err(e) => format!(
            "session {id} could not be cancelled ({e}); `flame session cancel {id}` ends it"
        ),
    };
    match stop {
        RunStop::Signal(signal) => interrupted(signal, Some(what)),
        RunStop::Failed(e) => Err(e.context(what)),
    }
}

/// Submits the inputs as the window allows, prints the results, and returns when the
/// session has finished with every input printed.
async fn drive(
    session: &Session,
    window: &mut Window,
    first: Vec<Input>,
    mut chunks: mpsc::Receiver<Chunk>,
    progress: &ProgressBar,
) -> anyhow::Result<()> {
    // The watch opens before any task exists, so no result is missed.
    let mut watch = session.watch().await.context("cannot watch the session")?;
    let (submit_tx, submit_rx) = mpsc::channel(limits::RUN_SUBMIT_QUEUE_MAX);
    let mut submit = AbortOnDrop(tokio::spawn(submit_all(
        session.clone(),
        submit_rx,
        "input",
        "inputs",
    )));
    // Dropped once every input is handed on: the submitter then closes the session.
    let mut submit_tx = Some(submit_tx);
    let mut submit_done = false;
    let mut input_open = true;
    let mut waiting: VecDeque<Input> = first.into();
    // Admitted inputs not yet queued for the submitter (its queue was full): they go in
    // the next message, so this loop never waits on the queue and keeps reading results.
    let mut unsent: Vec<Bytes> = Vec::new();
    loop {
        let admitted = window.admit(&mut waiting);
        progress.inc_length(admitted.len() as u64);
        unsent.extend(admitted);
        if !unsent.is_empty() {
            if let Some(tx) = &submit_tx {
                match tx.try_send(std::mem::take(&mut unsent)) {
                    Ok(()) => {}
                    Err(TrySendError::Full(back)) => unsent = back,
                    Err(TrySendError::Closed(_)) => bail!("the submitting task stopped"),
                }
            }
        }
        if !input_open && waiting.is_empty() && unsent.is_empty() {
            submit_tx = None;
        }
        tokio::select! {
            permit = reserve(submit_tx.as_ref()), if !unsent.is_empty() => {
                permit
                    .ok_or_else(|| anyhow!("the submitting task stopped"))?
                    .send(std::mem::take(&mut unsent));
            }
            chunk = chunks.recv(), if input_open && waiting.is_empty() => match chunk {
                Some(chunk) => waiting.extend(chunk?),
                None => input_open = false,
            },
            joined = &mut submit.0, if !submit_done => {
                joined.context("the submitting task failed")??;
                submit_done = true;
            }
            batch = watch.next() => match batch {
                None => break,
                Some(batch) => {
                    let batch = batch.context("watching the results failed")?;
                    progress.inc(batch.len() as u64);
                    for result in batch {
                        window.record(result.task.0, result.outcome)?;
                    }
                    progress.suspend(|| window.flush())?;
                }
            },
        }
    }
    if !watch.is_finished() {
        bail!(
            "the result stream ended before the session finished: {} of {} inputs unfinished",
            group(window.running as u64),
            group(window.submitted())
        );
    }
    if !submit_done {
        // The session finished, so the submitter closed it and is done or about to be.
        (&mut submit.0)
            .await
            .context("the submitting task failed")??;
    }
    if input_open || !waiting.is_empty() || window.held() > 0 {
        bail!(
            "the session finished with inputs unprinted: {} held, {} not submitted",
            group(window.held() as u64),
            group(waiting.len() as u64)
        );
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::super::each::check_acks;
    use super::*;
    use flame_client::BatchAck;
    use flame_protocol::TaskId;

    #[test]
    fn acks_must_number_inputs_densely() {
        let ack = |batch_id, first, count| BatchAck {
            batch_id,
            first_task: TaskId(first),
            count,
        };
        assert_eq!(
            check_acks(&[ack(1, 1, 3), ack(2, 4, 2)], 1, "inputs").unwrap(),
            6
        );
        assert!(check_acks(&[ack(3, 7, 1)], 6, "inputs").is_err());
    }

    #[test]
    fn the_output_folder_must_be_new_or_empty() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("new");
        prepare_output_dir(&new).unwrap();
        assert!(new.is_dir());
        prepare_output_dir(&new).unwrap();
        std::fs::write(new.join("1"), b"x").unwrap();
        assert!(prepare_output_dir(&new).is_err());
    }
}
