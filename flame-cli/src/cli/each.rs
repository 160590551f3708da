//! `flame submit --each FILE -- COMMAND ARGS...`: a task array.
//!
//! Each line of FILE (`-` for stdin) becomes one task of a single session of the built-in
//! `shell` application ([`flame_protocol::shell`]), which runs COMMAND for it on a warm
//! executor: `{}` in the arguments is the line (or, when no argument holds `{}`, the line
//! is appended as the last argument, as GNU parallel does), and the line is also the
//! command's stdin. The commands' stdout and stderr are printed in input order, or as they
//! arrive with `--unordered`; nothing else goes to stdout.
//!
//! Line `N` is task `N`: the session is fresh and one submit stream sends the lines in
//! order, so the head numbers them densely from 1 (checked against its acks).
//!
//! Memory is bounded whatever the file's size. A thread reads the file in chunks a few
//! ahead; lines are submitted only while fewer than the window are unfinished (`-j`, or
//! [`HELD_LINES_MAX`]) and fewer than the window are held for printing, and while the
//! lines and outputs held stay under [`HELD_BYTES_MAX`]. In input order, a slow line
//! therefore holds back at most a window of lines behind it.

use super::ping::AbortOnDrop;
use super::signals::StopSignals;
use super::submit::SubmitArgs;
use super::GlobalArgs;
use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use flame_client::report::{group, HintExt as _};
use flame_client::{BatchAck, Client, Session};
use flame_protocol::limits;
use flame_protocol::model::{ErrorKind, SessionSpec, TaskOutcome, TaskResult};
use flame_protocol::shell::{ShellCommand, ShellOutput, APPLICATION, CAPTURE_BYTES_MAX};
use std::collections::{BTreeMap, VecDeque};
use std::io::{self, BufRead, BufReader, Read, Seek as _, Write};
use std::path::Path;
use tokio::sync::mpsc::{self, error::TrySendError};

/// Lines read and not yet printed, at most, unless `-j` asks for more to run at once; also
/// the lines unfinished at once without `-j`.
pub const HELD_LINES_MAX: usize = 10_000;

/// Bytes of lines and outputs held at most (a single larger line or output still passes):
/// past this no new line is submitted until output has been printed.
pub const HELD_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Longest line, without its newline: the head's default task input limit.
pub const LINE_BYTES_MAX: usize = limits::TASK_INPUT_BYTES_MAX;

use limits::EACH_READ_AHEAD_CHUNKS as READ_AHEAD_CHUNKS;

/// Most lines in one chunk handed from the reading thread.
const CHUNK_LINES_MAX: usize = 1_024;

/// Bytes of lines after which a chunk is handed on (a single longer line still passes).
const CHUNK_BYTES_TARGET: usize = 1024 * 1024;

/// Read buffer of the input file.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// Characters of a line quoted in a failure message; longer lines are cut.
const QUOTED_LINE_CHARS_MAX: usize = 120;

/// What the reading thread hands on: lines in input order, or why reading stopped.
type Chunk = anyhow::Result<Vec<Bytes>>;

/// Runs `args.command` once per line of `args.each`; see the module documentation. Exits
/// with [`super::Exit`]`(1)` after the outputs when a line failed.
pub async fn run(global: &GlobalArgs, args: SubmitArgs) -> anyhow::Result<()> {
    let path = args
        .each
        .clone()
        .context("flame submit --each needs a file")?;
    let command = ShellCommand::with_line_appended(args.command.clone())
        .context("cannot run this command for each line")?;
    let common_data = Bytes::from(command.encode().context("cannot encode the command")?);
    // Installed first, so that Ctrl-C at any point cancels what was started instead of
    // killing the process mid-way.
    let mut signals = StopSignals::install()?;
    let input = Input::open(&path)?;
    let name = input.name.clone();
    let mut chunks = spawn_reader(input)?;
    // The first chunk, before anything is created: a missing, unreadable or empty file, or
    // an over-long line in a regular file, is reported with nothing run.
    let first = tokio::select! {
        first = chunks.recv() => first,
        signal = signals.recv() => return Err(signal.stopped().context("nothing was run")),
    };
    let first = match first {
        None => {
            eprintln!("flame: {name} has no lines; nothing to run");
            return Ok(());
        }
        Some(chunk) => chunk?,
    };
    let config = super::config(global)?;
    let client = tokio::select! {
        client = super::connect_to(&config) => client?,
        signal = signals.recv() => return Err(signal.stopped().context("nothing was run")),
    };
    let options = Options {
        unordered: args.unordered,
        running_max: args.jobs.map_or(HELD_LINES_MAX, |j| j as usize),
        held_max: args
            .jobs
            .map_or(HELD_LINES_MAX, |j| (j as usize).max(HELD_LINES_MAX)),
    };
    let spec = SessionSpec {
        application: APPLICATION.to_string(),
        common_data: common_data.into(),
        // Empty: the client's owner (--owner, FLAME_OWNER, the config files), else the
        // authenticated user, as the head decides.
        owner: String::new(),
        priority: args.priority,
        ..SessionSpec::new(APPLICATION)
    };
    let result = run_array(&client, spec, first, chunks, options, &mut signals).await;
    client.close().await;
    result
}

/// How a run is bounded and printed.
#[derive(Debug, Clone, Copy)]
struct Options {
    unordered: bool,
    /// Lines submitted and unfinished, at most.
    running_max: usize,
    /// Lines submitted and not yet printed, at most.
    held_max: usize,
}

/// Creates the session, runs every line, and cancels the session if the run stops short.
async fn run_array(
    client: &Client,
    spec: SessionSpec,
    first: Vec<Bytes>,
    chunks: mpsc::Receiver<Chunk>,
    options: Options,
    signals: &mut StopSignals,
) -> anyhow::Result<()> {
    let session = tokio::select! {
        session = client.create_session(spec) => session,
        signal = signals.recv() => return Err(signal.stopped().context("no line was submitted")),
    };
    let session = match session {
        Err(e) if e.kind() == Some(ErrorKind::NotFound) => Err(e).hint(format!(
            "the head registers the built-in `{APPLICATION}` application (flame-shell) at \
             start-up; an older head does not: upgrade it, or register an application \
             named `{APPLICATION}` whose command is flame-shell (`flame app list` shows \
             what is registered)"
        )),
        other => other.context("cannot create a session for the lines"),
    }?;
    let result = tokio::select! {
        result = drive(&session, first, chunks, options) => result,
        signal = signals.recv() => Err(signal.stopped()),
    };
    let failed = match result {
        Ok(failed) => failed,
        Err(e) => {
            // Nothing more is wanted from it: end its pending and running tasks, which
            // kills their commands. A second signal gives up on waiting for the head.
            let cancelled = tokio::select! {
                cancelled = session.client().cancel_session(session.id()) => cancelled,
                _ = signals.recv() => return Err(e),
            };
            return match cancelled {
                Ok(()) => Err(e.context(format!("session {} was cancelled", session.id()))),
                Err(cancel) => Err(e.context(format!(
                    "session {} could not be cancelled ({cancel}); `flame session cancel {}` ends it",
                    session.id(),
                    session.id()
                ))),
            };
        }
    };
    if failed.failed > 0 {
        eprintln!(
            "error: {} of {} lines failed (session {})",
            group(failed.failed),
            group(failed.lines),
            session.id()
        );
        return Err(super::Exit(1).into());
    }
    Ok(())
}

/// Lines run and lines failed.
#[derive(Debug, Clone, Copy)]
struct Tally {
    lines: u64,
    failed: u64,
}

/// Submits the lines as the window allows, prints the results, and returns when the session
/// has finished with every line printed.
async fn drive(
    session: &Session,
    first: Vec<Bytes>,
    mut chunks: mpsc::Receiver<Chunk>,
    options: Options,
) -> anyhow::Result<Tally> {
    // The watch opens before any task exists, so no result is missed.
    let mut watch = session.watch().await.context("cannot watch the session")?;
    let (submit_tx, submit_rx) = mpsc::channel(limits::EACH_SUBMIT_QUEUE_MAX);
    let mut submit = AbortOnDrop(tokio::spawn(submit_all(
        session.clone(),
        submit_rx,
        "line",
        "lines",
    )));
    // Dropped once every line is handed on: the submitter then closes the session.
    let mut submit_tx = Some(submit_tx);
    let mut submit_done = false;
    let mut input_open = true;
    let mut waiting: VecDeque<Bytes> = first.into();
    // Admitted lines not yet queued for the submitter (its queue was full): they go in
    // the next message, so this loop never waits on the queue and keeps reading results.
    let mut unsent: Vec<Bytes> = Vec::new();
    let mut array = Array::new(options, Printer::new());

    loop {
        // Lines go out as the window allows: what is queued or unsent is at most a window.
        unsent.extend(array.admit(&mut waiting));
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
                    for result in batch.context("watching the results failed")? {
                        array.record(result)?;
                    }
                    array.printer.flush()?;
                }
            },
        }
    }
    if !watch.is_finished() {
        bail!(
            "the result stream ended before the session finished: {} of {} lines unfinished",
            group(array.running as u64),
            group(array.next_task - 1)
        );
    }
    if !submit_done {
        // The session finished, so the submitter closed it and is done or about to be.
        (&mut submit.0)
            .await
            .context("the submitting task failed")??;
    }
    if input_open || !waiting.is_empty() || !array.slots.is_empty() {
        bail!(
            "the session finished with lines unprinted: {} held, {} not submitted",
            group(array.slots.len() as u64),
            group(waiting.len() as u64)
        );
    }
    array.printer.flush()?;
    Ok(Tally {
        lines: array.next_task - 1,
        failed: array.failed,
    })
}

/// Sends every chunk of inputs on one submit stream, checks that the head numbered them
/// densely from 1, and closes the session after the last. `one`/`many` name the inputs in
/// messages ("line"/"lines" here, "input"/"inputs" for `flame run`).
pub(super) async fn submit_all(
    session: Session,
    mut lines: mpsc::Receiver<Vec<Bytes>>,
    one: &'static str,
    many: &'static str,
) -> anyhow::Result<()> {
    let mut submitter = session
        .submitter()
        .await
        .context("cannot open a submit stream")?;
    let mut next_task = 1;
    let mut checked = 0;
    while let Some(mut inputs) = lines.recv().await {
        // Whatever else is ready goes in the same send, as few batches as possible.
        while let Ok(more) = lines.try_recv() {
            inputs.extend(more);
        }
        submitter
            .send(inputs)
            .await
            .with_context(|| format!("cannot submit the {many}"))?;
        let acks = submitter.acks();
        next_task = check_acks(&acks[checked..], next_task, many)?;
        checked = acks.len();
    }
    let acks = submitter
        .finish()
        .await
        .with_context(|| format!("cannot submit the {many}"))?;
    check_acks(&acks[checked..], next_task, many)?;
    session
        .close()
        .await
        .with_context(|| format!("cannot close the session after the last {one}"))?;
    Ok(())
}

/// Room for one message on the submitter's queue; `None` when there is no queue or the
/// submitting task has gone.
pub(super) async fn reserve(
    tx: Option<&mpsc::Sender<Vec<Bytes>>>,
) -> Option<mpsc::Permit<'_, Vec<Bytes>>> {
    tx?.reserve().await.ok()
}

/// Checks that `acks` number their tasks on from `next_task`; returns the id after them.
/// `many` names the inputs in the error.
pub(super) fn check_acks(acks: &[BatchAck], mut next_task: u64, many: &str) -> anyhow::Result<u64> {
    for ack in acks {
        if ack.first_task.0 != next_task {
            bail!(
                "the head gave batch {} the task ids from {}, expected {next_task}: {many} could not be told apart",
                ack.batch_id,
                ack.first_task
            );
        }
        next_task += u64::from(ack.count);
    }
    Ok(next_task)
}

/// One line submitted and not yet printed.
#[derive(Debug)]
struct Slot {
    line: Bytes,
    /// Its result, once it came and while it waits for the lines before it.
    outcome: Option<TaskOutcome>,
}

/// The lines in flight and the order they are printed in.
#[derive(Debug)]
struct Array {
    options: Options,
    /// Submitted and not yet printed, by task id (= line number).
    slots: BTreeMap<u64, Slot>,
    /// The task id of the next line submitted.
    next_task: u64,
    /// Submitted lines without a result.
    running: usize,
    /// Bytes of the lines and outputs in `slots`.
    held_bytes: usize,
    failed: u64,
    printer: Printer,
}

impl Array {
    fn new(options: Options, printer: Printer) -> Self {
        Array {
            options,
            slots: BTreeMap::new(),
            next_task: 1,
            running: 0,
            held_bytes: 0,
            failed: 0,
            printer,
        }
    }

    fn has_room(&self) -> bool {
        self.running < self.options.running_max
            && self.slots.len() < self.options.held_max
            && self.held_bytes < HELD_BYTES_MAX
    }

    /// Takes lines from the front of `waiting` while the window has room; returns them,
    /// in order, to be submitted.
    fn admit(&mut self, waiting: &mut VecDeque<Bytes>) -> Vec<Bytes> {
        let mut admitted = Vec::new();
        while self.has_room() {
            let Some(line) = waiting.pop_front() else {
                break;
            };
            self.held_bytes += line.len();
            self.running += 1;
            self.slots.insert(
                self.next_task,
                Slot {
                    line: line.clone(),
                    outcome: None,
                },
            );
            self.next_task += 1;
            admitted.push(line);
        }
        admitted
    }

    /// Takes one result: prints it now (unordered), or keeps it until the lines before it
    /// are printed.
    fn record(&mut self, result: TaskResult) -> anyhow::Result<()> {
        let task = result.task.0;
        let Some(slot) = self.slots.get_mut(&task) else {
            bail!("the head sent a result for task {task}, which is not a line waiting for one");
        };
        if slot.outcome.is_some() {
            bail!("the head sent a second result for task {task}");
        }
        self.running -= 1;
        if self.options.unordered {
            if let Some(slot) = self.slots.remove(&task) {
                self.held_bytes -= slot.line.len();
                self.failed += u64::from(!self.printer.print(task, &slot.line, &result.outcome)?);
            }
            return Ok(());
        }
        self.held_bytes += outcome_bytes(&result.outcome);
        slot.outcome = Some(result.outcome);
        while let Some(entry) = self.slots.first_entry() {
            let Some(outcome) = &entry.get().outcome else {
                break;
            };
            let ok = self
                .printer
                .print(*entry.key(), &entry.get().line, outcome)?;
            self.failed += u64::from(!ok);
            let slot = entry.remove();
            self.held_bytes -= slot.line.len() + slot.outcome.as_ref().map_or(0, outcome_bytes);
        }
        Ok(())
    }
}

fn outcome_bytes(outcome: &TaskOutcome) -> usize {
    match outcome {
        TaskOutcome::Succeeded(output) => output.len(),
        TaskOutcome::Failed(message) => message.len(),
        TaskOutcome::Cancelled => 0,
        TaskOutcome::Object(o) => usize::try_from(o.size).unwrap_or(usize::MAX),
    }
}

/// Writes the commands' output to stdout and stderr, and failures to stderr.
#[derive(Debug)]
struct Printer {
    stdout: io::BufWriter<io::Stdout>,
}

impl Printer {
    fn new() -> Self {
        Printer {
            stdout: io::BufWriter::with_capacity(READ_BUFFER_BYTES, io::stdout()),
        }
    }

    /// Prints what line `task` did; returns whether it succeeded.
    fn print(&mut self, task: u64, line: &[u8], outcome: &TaskOutcome) -> anyhow::Result<bool> {
        let failure = match outcome {
            TaskOutcome::Succeeded(bytes) => match ShellOutput::decode(bytes) {
                Ok(output) => {
                    self.stdout
                        .write_all(&output.stdout)
                        .map_err(crate::render::stdout_error)?;
                    if !output.stderr.is_empty() {
                        // Flushed first, so that a terminal shows both in the order written.
                        self.flush()?;
                        io::stderr()
                            .write_all(&output.stderr)
                            .context("cannot write to stderr")?;
                    }
                    if output.truncated {
                        Some(format!(
                            "its output was cut to {} bytes (the most kept per line)",
                            group(CAPTURE_BYTES_MAX as u64)
                        ))
                    } else if output.exit.success() {
                        None
                    } else {
                        Some(format!("failed with {}", output.exit))
                    }
                }
                Err(e) => Some(format!("gave an unreadable output: {e}")),
            },
            TaskOutcome::Failed(message) => Some(format!("failed: {message}")),
            TaskOutcome::Cancelled => Some("was cancelled".to_string()),
            // The result stream fetches outputs kept as objects before it hands them on.
            TaskOutcome::Object(o) => Some(format!(
                "gave an output kept as object {} that was not fetched",
                o.id
            )),
        };
        let Some(failure) = failure else {
            return Ok(true);
        };
        self.flush()?;
        eprintln!("error: line {task} {failure}: {}", quote(line));
        Ok(false)
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        self.stdout.flush().map_err(crate::render::stdout_error)
    }
}

/// A line for a message: as a quoted string with escapes, cut after
/// [`QUOTED_LINE_CHARS_MAX`] characters.
fn quote(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(QUOTED_LINE_CHARS_MAX).collect();
    if chars.next().is_some() {
        format!("{head:?}...")
    } else {
        format!("{head:?}")
    }
}

/// The file the lines come from.
#[derive(Debug)]
struct Input {
    /// For messages: the path, or `stdin`.
    name: String,
    source: Source,
}

#[derive(Debug)]
enum Source {
    Stdin,
    /// `regular`: a regular file, read twice: first to check every line, so that an
    /// over-long line is reported before anything runs.
    File {
        file: std::fs::File,
        regular: bool,
    },
}

impl Input {
    fn open(path: &Path) -> anyhow::Result<Self> {
        if path == Path::new("-") {
            return Ok(Input {
                name: "stdin".to_string(),
                source: Source::Stdin,
            });
        }
        let name = path.display().to_string();
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open {name}"))
            .hint("--each takes a file with one line per task, or `-` for stdin")?;
        let meta = file
            .metadata()
            .with_context(|| format!("cannot read the metadata of {name}"))?;
        if meta.is_dir() {
            bail!("{name} is a directory, not a file of lines");
        }
        Ok(Input {
            name,
            source: Source::File {
                file,
                regular: meta.is_file(),
            },
        })
    }
}

/// Starts the thread that reads the lines and hands them on in chunks. A plain thread, not
/// a runtime's blocking task: a read from a terminal may never return, and must not keep
/// the process from exiting.
fn spawn_reader(input: Input) -> anyhow::Result<mpsc::Receiver<Chunk>> {
    let (tx, rx) = mpsc::channel(READ_AHEAD_CHUNKS);
    std::thread::Builder::new()
        .name("flame-each-reader".to_string())
        .spawn(move || read_chunks(input, &tx))
        .context("cannot start the thread that reads the lines")?;
    Ok(rx)
}

/// Reads `input` into chunks of lines on `tx` until its end, an error, or until nobody
/// listens. A regular file is checked whole first.
fn read_chunks(input: Input, tx: &mpsc::Sender<Chunk>) {
    let name = input.name;
    let reader: Box<dyn Read + Send> = match input.source {
        Source::Stdin => Box::new(io::stdin()),
        Source::File { mut file, regular } => {
            if regular {
                let checked = check_lines(
                    &mut BufReader::with_capacity(READ_BUFFER_BYTES, &file),
                    &name,
                )
                .and_then(|()| {
                    file.rewind()
                        .with_context(|| format!("cannot rewind {name}"))
                });
                if let Err(e) = checked {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
            Box::new(file)
        }
    };
    let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
    let mut chunk = Vec::new();
    let mut chunk_bytes = 0;
    let mut line = Vec::new();
    let mut number: u64 = 0;
    loop {
        number += 1;
        match read_line(&mut reader, &mut line, LINE_BYTES_MAX) {
            Ok(Line::End) => break,
            Ok(Line::Read) => {}
            Ok(Line::TooLong) => {
                let _ = tx.blocking_send(Err(too_long(&name, number)));
                return;
            }
            Err(e) => {
                let _ = tx
                    .blocking_send(Err(anyhow::Error::new(e)
                        .context(format!("cannot read line {number} of {name}"))));
                return;
            }
        }
        chunk_bytes += line.len();
        chunk.push(Bytes::from(std::mem::take(&mut line)));
        // Handed on when full, or when the next read may wait (a pipe, a terminal), so
        // that slow input does not hold back the lines already read.
        if chunk.len() >= CHUNK_LINES_MAX
            || chunk_bytes >= CHUNK_BYTES_TARGET
            || reader.buffer().is_empty()
        {
            chunk_bytes = 0;
            if tx.blocking_send(Ok(std::mem::take(&mut chunk))).is_err() {
                return;
            }
        }
    }
    if !chunk.is_empty() {
        let _ = tx.blocking_send(Ok(chunk));
    }
}

/// Reads every line of a regular file, failing at the first one over [`LINE_BYTES_MAX`].
fn check_lines<R: BufRead>(reader: &mut R, name: &str) -> anyhow::Result<()> {
    let mut line = Vec::new();
    let mut number: u64 = 0;
    loop {
        number += 1;
        match read_line(reader, &mut line, LINE_BYTES_MAX)
            .with_context(|| format!("cannot read line {number} of {name}"))?
        {
            Line::End => return Ok(()),
            Line::Read => {}
            Line::TooLong => return Err(too_long(name, number)),
        }
    }
}

fn too_long(name: &str, number: u64) -> anyhow::Error {
    anyhow!(
        "line {number} of {name} is longer than {} bytes, the most a task's input may hold",
        group(LINE_BYTES_MAX as u64)
    )
}

/// What [`read_line`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// A line, possibly the last one without a newline.
    Read,
    /// A line longer than the bound; the reader is left inside it.
    TooLong,
    /// The end of the input.
    End,
}

/// Reads the next line into `line`, without its `\n`, never holding more than `max` bytes
/// of it.
fn read_line<R: BufRead>(reader: &mut R, line: &mut Vec<u8>, max: usize) -> io::Result<Line> {
    line.clear();
    let mut started = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(if started { Line::Read } else { Line::End });
        }
        started = true;
        let newline = buf.iter().position(|&b| b == b'\n');
        let take = newline.unwrap_or(buf.len());
        if line.len() + take > max {
            return Ok(Line::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        reader.consume(take + usize::from(newline.is_some()));
        if newline.is_some() {
            return Ok(Line::Read);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use flame_protocol::shell::ShellExit;
    use flame_protocol::TaskId;

    fn lines(input: &[u8], max: usize) -> Vec<Result<Vec<u8>, Line>> {
        let mut reader = BufReader::with_capacity(4, input);
        let mut line = Vec::new();
        let mut out = Vec::new();
        loop {
            match read_line(&mut reader, &mut line, max).unwrap() {
                Line::End => return out,
                Line::Read => out.push(Ok(line.clone())),
                Line::TooLong => {
                    out.push(Err(Line::TooLong));
                    return out;
                }
            }
        }
    }

    #[test]
    fn lines_are_split_on_newlines_only() {
        assert_eq!(lines(b"", 10), vec![]);
        assert_eq!(lines(b"\n", 10), vec![Ok(vec![])]);
        assert_eq!(
            lines(b"ab\r\n\xff\n\nlast", 10),
            vec![
                Ok(b"ab\r".to_vec()),
                Ok(b"\xff".to_vec()),
                Ok(vec![]),
                Ok(b"last".to_vec())
            ]
        );
        assert_eq!(
            lines(b"0123456789\n01234567890\n", 10),
            vec![Ok(b"0123456789".to_vec()), Err(Line::TooLong)]
        );
    }

    fn output(code: i32, stdout: &str) -> TaskOutcome {
        let out = ShellOutput {
            exit: ShellExit::Code(code),
            stdout: Bytes::from(stdout.to_owned()),
            stderr: Bytes::new(),
            truncated: false,
        };
        TaskOutcome::Succeeded(Bytes::from(out.encode().unwrap()))
    }

    fn result(task: u64, outcome: TaskOutcome) -> TaskResult {
        TaskResult {
            task: TaskId(task),
            attempt: 1,
            outcome,
        }
    }

    fn options(unordered: bool, running_max: usize, held_max: usize) -> Options {
        Options {
            unordered,
            running_max,
            held_max,
        }
    }

    #[test]
    fn the_window_bounds_running_and_held_lines() {
        let mut array = Array::new(options(false, 2, 3), Printer::new());
        let mut waiting: VecDeque<Bytes> = (0..6).map(|i| Bytes::from(format!("{i}"))).collect();
        assert_eq!(array.admit(&mut waiting).len(), 2);
        assert!(array.admit(&mut waiting).is_empty());
        // Line 2 finishes first: it is held for line 1, and one more line may run.
        array.record(result(2, output(0, ""))).unwrap();
        assert_eq!((array.running, array.slots.len()), (1, 2));
        assert_eq!(array.admit(&mut waiting).len(), 1);
        array.record(result(3, output(0, ""))).unwrap();
        // Three held: nothing more until line 1 is printed, though one runs.
        assert!(array.admit(&mut waiting).is_empty());
        array.record(result(1, output(4, ""))).unwrap();
        assert!(array.slots.is_empty());
        assert_eq!((array.held_bytes, array.failed), (0, 1));
        assert_eq!(array.admit(&mut waiting).len(), 2);
        // Unknown and repeated results are refused.
        assert!(array.record(result(9, output(0, ""))).is_err());
        array.record(result(4, output(0, ""))).unwrap();
        assert!(array.record(result(4, output(0, ""))).is_err());
    }

    #[test]
    fn unordered_results_free_their_slot_at_once() {
        let mut array = Array::new(options(true, 2, 2), Printer::new());
        let mut waiting: VecDeque<Bytes> = (0..4).map(|i| Bytes::from(format!("{i}"))).collect();
        assert_eq!(array.admit(&mut waiting).len(), 2);
        array.record(result(2, output(0, ""))).unwrap();
        assert_eq!(array.admit(&mut waiting).len(), 1);
        array
            .record(result(1, TaskOutcome::Failed("crashed".into())))
            .unwrap();
        array.record(result(3, TaskOutcome::Cancelled)).unwrap();
        assert_eq!(array.failed, 2);
        assert_eq!(array.held_bytes, 0);
    }

    #[test]
    fn acks_must_number_lines_densely() {
        let ack = |batch_id, first, count| BatchAck {
            batch_id,
            first_task: TaskId(first),
            count,
        };
        assert_eq!(
            check_acks(&[ack(1, 1, 3), ack(2, 4, 2)], 1, "lines").unwrap(),
            6
        );
        assert_eq!(check_acks(&[], 6, "lines").unwrap(), 6);
        assert!(check_acks(&[ack(3, 7, 1)], 6, "lines").is_err());
    }

    #[test]
    fn long_lines_are_cut_in_messages() {
        assert_eq!(quote(b"a\tb"), "\"a\\tb\"");
        let long = quote(&[b'x'; 500]);
        assert!(long.ends_with("\"...") && long.len() < 200, "{long}");
    }
}
