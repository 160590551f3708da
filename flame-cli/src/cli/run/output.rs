//! What `flame run` does with results: the window of inputs in flight, the order they are
//! printed in, and the printing itself (framed outputs on stdout, one file per output, or
//! one JSON document written as results come).
//!
//! Everything printed is gathered in buffers and written by [`Window::flush`], once per
//! batch of results, so that a progress bar can be suspended around it.

use super::input::{Describe, Framing, Input};
use anyhow::{bail, Context as _};
use bytes::Bytes;
use flame_client::report::group;
use flame_protocol::model::TaskOutcome;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::io::Write as _;
use std::path::PathBuf;

/// Inputs submitted and not yet printed, at most: in input order, a slow task holds back
/// at most this many behind it.
pub const HELD_INPUTS_MAX: usize = 10_000;

/// Bytes of inputs and outputs held at most (a single larger one still passes): past this
/// no new input is submitted until outputs have been printed.
pub const HELD_BYTES_MAX: usize = 256 * 1024 * 1024;

/// Characters of an input quoted in a failure message; longer ones are cut.
const QUOTED_INPUT_CHARS_MAX: usize = 120;

/// Where outputs go.
#[derive(Debug, Clone)]
pub enum Sink {
    /// Each output on stdout, framed.
    Stdout(Framing),
    /// Each output in a file of this folder (new or empty, checked before the run).
    Dir(PathBuf),
}

/// How results are printed.
#[derive(Debug, Clone)]
pub struct Options {
    pub unordered: bool,
    pub json: bool,
    pub sink: Sink,
    pub describe: Describe,
}

/// How many inputs ended how.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub succeeded: u64,
    pub failed: u64,
    pub cancelled: u64,
}

impl Tally {
    pub fn total(&self) -> u64 {
        self.succeeded + self.failed + self.cancelled
    }
}

/// One input submitted and not yet printed.
#[derive(Debug)]
struct Slot {
    input: Input,
    /// Its result, once it came and while it waits for the inputs before it.
    outcome: Option<TaskOutcome>,
}

/// The inputs in flight and what has been printed of them.
#[derive(Debug)]
pub struct Window {
    options: Options,
    /// Submitted and not yet printed, by task id (= input number, from 1).
    slots: BTreeMap<u64, Slot>,
    /// The task id of the next input submitted.
    next_task: u64,
    /// Submitted inputs without a result.
    pub running: usize,
    /// Bytes of the inputs and outputs in `slots`.
    held_bytes: usize,
    pub tally: Tally,
    /// Whether a JSON result was written yet (for the commas between them).
    json_started: bool,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// How one input ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum State {
    Succeeded,
    Failed,
    Cancelled,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }
}

/// One result in the JSON document.
#[derive(Debug, Serialize)]
struct JsonResult<'a> {
    /// The task's id, which is the input's number from 1.
    task: u64,
    /// The input's file, with `--input-dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<String>,
    state: State,
    /// The output when it is UTF-8 text.
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<&'a str>,
    /// The output in base64 when it is not UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    output_base64: Option<String>,
    /// Where the output was written, with `--output-dir`.
    #[serde(skip_serializing_if = "Option::is_none")]
    output_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
}

impl Window {
    pub fn new(options: Options) -> Self {
        Window {
            options,
            slots: BTreeMap::new(),
            next_task: 1,
            running: 0,
            held_bytes: 0,
            tally: Tally::default(),
            json_started: false,
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }

    /// Whether results print as one JSON document.
    pub fn is_json(&self) -> bool {
        self.options.json
    }

    /// Inputs submitted so far.
    pub fn submitted(&self) -> u64 {
        self.next_task - 1
    }

    /// Inputs submitted and not yet printed.
    pub fn held(&self) -> usize {
        self.slots.len()
    }

    fn has_room(&self) -> bool {
        self.slots.len() < HELD_INPUTS_MAX && self.held_bytes < HELD_BYTES_MAX
    }

    /// Takes inputs from the front of `waiting` while the window has room; returns their
    /// bytes, in order, to be submitted.
    pub fn admit(&mut self, waiting: &mut VecDeque<Input>) -> Vec<Bytes> {
        let mut admitted = Vec::new();
        while self.has_room() {
            let Some(input) = waiting.pop_front() else {
                break;
            };
            self.held_bytes += input.bytes.len();
            self.running += 1;
            admitted.push(input.bytes.clone());
            self.slots.insert(
                self.next_task,
                Slot {
                    input,
                    outcome: None,
                },
            );
            self.next_task += 1;
        }
        admitted
    }

    /// Takes one result: prints it now (unordered), or keeps it until the inputs before it
    /// are printed.
    pub fn record(&mut self, task: u64, outcome: TaskOutcome) -> anyhow::Result<()> {
        let Some(slot) = self.slots.get_mut(&task) else {
            bail!("the head sent a result for task {task}, which is not an input waiting for one");
        };
        if slot.outcome.is_some() {
            bail!("the head sent a second result for task {task}");
        }
        self.running -= 1;
        if self.options.unordered {
            if let Some(slot) = self.slots.remove(&task) {
                self.held_bytes -= slot.input.bytes.len();
                self.print(task, &slot.input, &outcome)?;
            }
            return Ok(());
        }
        self.held_bytes += outcome_bytes(&outcome);
        slot.outcome = Some(outcome);
        while let Some(entry) = self.slots.first_entry() {
            if entry.get().outcome.is_none() {
                break;
            }
            let task = *entry.key();
            let slot = entry.remove();
            let outcome = slot.outcome.unwrap_or(TaskOutcome::Cancelled);
            self.held_bytes -= slot.input.bytes.len() + outcome_bytes(&outcome);
            self.print(task, &slot.input, &outcome)?;
        }
        Ok(())
    }

    /// Prints what input `task` gave.
    fn print(&mut self, task: u64, input: &Input, outcome: &TaskOutcome) -> anyhow::Result<()> {
        let (state, error) = match outcome {
            TaskOutcome::Succeeded(_) => (State::Succeeded, None),
            TaskOutcome::Failed(message) => (State::Failed, Some(message.as_str())),
            TaskOutcome::Cancelled => (State::Cancelled, Some("the task was cancelled")),
            // The result stream fetches outputs kept as objects before it hands them on.
            TaskOutcome::Object(_) => (
                State::Failed,
                Some("its output, an object, was not fetched"),
            ),
        };
        let output = match outcome {
            TaskOutcome::Succeeded(bytes) => Some(bytes),
            _ => None,
        };
        match state {
            State::Succeeded => self.tally.succeeded += 1,
            State::Failed => self.tally.failed += 1,
            State::Cancelled => self.tally.cancelled += 1,
        }
        if let Some(error) = error {
            self.name_failure(task, input, state.as_str(), error);
        }
        let output_file = match (&self.options.sink, output) {
            (Sink::Dir(dir), Some(bytes)) => {
                let path = dir.join(output_name(task, input.file.as_ref()));
                write_new(&path, bytes)?;
                Some(path.display().to_string())
            }
            _ => None,
        };
        if self.options.json {
            let text = output.filter(|_| output_file.is_none());
            let utf8 = text.and_then(|b| std::str::from_utf8(b).ok());
            let result = JsonResult {
                task,
                file: input
                    .file
                    .as_ref()
                    .map(|f| f.to_string_lossy().into_owned()),
                state,
                output: utf8,
                output_base64: text.filter(|_| utf8.is_none()).map(|b| base64(b)),
                output_file,
                error,
            };
            let line = serde_json::to_string(&result).context("cannot encode a result as JSON")?;
            let sep = if self.json_started {
                ",\n    "
            } else {
                "\n    "
            };
            self.json_started = true;
            self.stdout.extend_from_slice(sep.as_bytes());
            self.stdout.extend_from_slice(line.as_bytes());
            return Ok(());
        }
        if let (Sink::Stdout(framing), Some(bytes)) = (&self.options.sink, output) {
            frame_output(&mut self.stdout, *framing, bytes)?;
        }
        Ok(())
    }

    /// `error: line 3 "raise:x" failed: MESSAGE` on stderr, the message's further lines
    /// indented under it.
    fn name_failure(&mut self, task: u64, input: &Input, state: &str, error: &str) {
        let what = match (self.options.describe, &input.file) {
            (Describe::File, Some(file)) => format!("file {:?}", file.to_string_lossy()),
            (Describe::Numbered(unit), _) => format!("{unit} {task} {}", quote(&input.bytes)),
            (Describe::File, None) => format!("input {task}"),
        };
        let mut lines = error.lines();
        let first = lines.next().unwrap_or("(no message)");
        let _ = writeln!(self.stderr, "error: {what} (task {task}) {state}: {first}");
        for line in lines {
            let _ = writeln!(self.stderr, "    {line}");
        }
    }

    /// Starts the JSON document.
    pub fn json_begin(&mut self, session: Option<u64>, application: &str) -> anyhow::Result<()> {
        let session = serde_json::to_string(&session).context("cannot encode JSON")?;
        let application = serde_json::to_string(application).context("cannot encode JSON")?;
        let head = format!(
            "{{\n  \"session\": {session},\n  \"application\": {application},\n  \"results\": ["
        );
        self.stdout.extend_from_slice(head.as_bytes());
        Ok(())
    }

    /// Ends the JSON document with the tally.
    pub fn json_end(&mut self) -> anyhow::Result<()> {
        let tally = &self.tally;
        let close = if self.json_started { "\n  ]" } else { "]" };
        let tail = format!(
            "{close},\n  \"succeeded\": {},\n  \"failed\": {},\n  \"cancelled\": {}\n}}\n",
            tally.succeeded, tally.failed, tally.cancelled
        );
        self.stdout.extend_from_slice(tail.as_bytes());
        Ok(())
    }

    /// Writes what was printed since the last flush: stdout first, then stderr.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        if !self.stdout.is_empty() {
            let mut out = std::io::stdout().lock();
            out.write_all(&self.stdout)
                .and_then(|()| out.flush())
                .map_err(crate::render::stdout_error)?;
            self.stdout.clear();
        }
        if !self.stderr.is_empty() {
            // Nothing to do if stderr is gone: there is nowhere left to say so.
            let _ = std::io::stderr().lock().write_all(&self.stderr);
            self.stderr.clear();
        }
        Ok(())
    }
}

/// The name of input `task`'s output file: its input's file name, or its number.
fn output_name(task: u64, file: Option<&OsString>) -> OsString {
    file.cloned().unwrap_or_else(|| task.to_string().into())
}

/// Writes `bytes` to a new file at `path`; an existing file is an error, never replaced.
fn write_new(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Appends `output` to `out` as `framing` prints it.
fn frame_output(out: &mut Vec<u8>, framing: Framing, output: &[u8]) -> anyhow::Result<()> {
    match framing {
        Framing::Lines => {
            out.extend_from_slice(output);
            if output.last() != Some(&b'\n') {
                out.push(b'\n');
            }
        }
        Framing::Nul => {
            out.extend_from_slice(output);
            out.push(0);
        }
        Framing::Length => {
            let Ok(len) = u32::try_from(output.len()) else {
                bail!(
                    "an output of {} bytes does not fit a 4-byte length prefix; use --output-dir",
                    group(output.len() as u64)
                );
            };
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(output);
        }
    }
    Ok(())
}

fn outcome_bytes(outcome: &TaskOutcome) -> usize {
    match outcome {
        TaskOutcome::Succeeded(output) => output.len(),
        TaskOutcome::Failed(message) => message.len(),
        TaskOutcome::Cancelled => 0,
        TaskOutcome::Object(o) => usize::try_from(o.size).unwrap_or(usize::MAX),
    }
}

/// An input for a message: as a quoted string with escapes, cut after
/// [`QUOTED_INPUT_CHARS_MAX`] characters.
pub fn quote(input: &[u8]) -> String {
    let text = String::from_utf8_lossy(input);
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(QUOTED_INPUT_CHARS_MAX).collect();
    if chars.next().is_some() {
        format!("{head:?}...")
    } else {
        format!("{head:?}")
    }
}

/// Standard base64 with padding (RFC 4648), for outputs that are not text in JSON.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            group.get(1).copied().unwrap_or(0),
            group.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn input(text: &str) -> Input {
        Input {
            bytes: Bytes::from(text.to_owned()),
            file: None,
        }
    }

    fn window(unordered: bool, json: bool) -> Window {
        Window::new(Options {
            unordered,
            json,
            sink: Sink::Stdout(Framing::Lines),
            describe: Describe::Numbered("line"),
        })
    }

    fn ok(text: &str) -> TaskOutcome {
        TaskOutcome::Succeeded(Bytes::from(text.to_owned()))
    }

    #[test]
    fn outputs_print_in_input_order() {
        let mut w = window(false, false);
        let mut waiting: VecDeque<Input> = ["a", "b", "c"].into_iter().map(input).collect();
        assert_eq!(w.admit(&mut waiting).len(), 3);
        w.record(3, ok("C")).unwrap();
        w.record(2, TaskOutcome::Failed("boom\nat line 2".into()))
            .unwrap();
        assert!(w.stdout.is_empty() && w.stderr.is_empty());
        w.record(1, ok("A\n")).unwrap();
        assert_eq!(w.stdout, b"A\nC\n");
        let stderr = String::from_utf8(w.stderr.clone()).unwrap();
        assert_eq!(
            stderr,
            "error: line 2 \"b\" (task 2) failed: boom\n    at line 2\n"
        );
        assert_eq!((w.tally.succeeded, w.tally.failed), (2, 1));
        assert_eq!((w.held(), w.held_bytes, w.running), (0, 0, 0));
        // Unknown and repeated results are refused.
        assert!(w.record(9, ok("x")).is_err());
        assert!(w.record(1, ok("x")).is_err());
    }

    #[test]
    fn unordered_outputs_print_at_once() {
        let mut w = window(true, false);
        let mut waiting: VecDeque<Input> = ["a", "b"].into_iter().map(input).collect();
        w.admit(&mut waiting);
        w.record(2, ok("B")).unwrap();
        assert_eq!(w.stdout, b"B\n");
        w.record(1, TaskOutcome::Cancelled).unwrap();
        assert_eq!(w.tally.cancelled, 1);
        assert_eq!(w.held_bytes, 0);
    }

    #[test]
    fn the_window_bounds_inputs_held() {
        let mut w = window(false, false);
        let mut waiting: VecDeque<Input> = (0..HELD_INPUTS_MAX + 5)
            .map(|i| input(&i.to_string()))
            .collect();
        assert_eq!(w.admit(&mut waiting).len(), HELD_INPUTS_MAX);
        // A later result frees nothing while the first is unprinted.
        w.record(2, ok("x")).unwrap();
        assert!(w.admit(&mut waiting).is_empty());
        w.record(1, ok("x")).unwrap();
        assert_eq!(w.admit(&mut waiting).len(), 2);
    }

    #[test]
    fn json_is_one_document_with_text_or_base64_outputs() {
        let mut w = window(false, true);
        w.json_begin(Some(7), "app").unwrap();
        let mut waiting: VecDeque<Input> = ["a", "b", "c"].into_iter().map(input).collect();
        w.admit(&mut waiting);
        w.record(1, ok("A")).unwrap();
        w.record(2, TaskOutcome::Succeeded(Bytes::from_static(b"\xff\x00")))
            .unwrap();
        w.record(3, TaskOutcome::Failed("no".into())).unwrap();
        w.json_end().unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&w.stdout).unwrap();
        assert_eq!(doc["session"], 7);
        assert_eq!(doc["results"][0]["output"], "A");
        assert_eq!(doc["results"][1]["output_base64"], "/wA=");
        assert_eq!(doc["results"][2]["state"], "failed");
        assert_eq!(doc["results"][2]["error"], "no");
        assert_eq!(
            (doc["succeeded"].clone(), doc["failed"].clone()),
            (2.into(), 1.into())
        );
        let mut empty = window(false, true);
        empty.json_begin(None, "app").unwrap();
        empty.json_end().unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&empty.stdout).unwrap();
        assert_eq!(doc["results"], serde_json::json!([]));
    }

    #[test]
    fn framings_of_outputs() {
        let mut out = Vec::new();
        frame_output(&mut out, Framing::Nul, b"a\nb").unwrap();
        frame_output(&mut out, Framing::Length, b"xy").unwrap();
        assert_eq!(out, b"a\nb\0\x02\0\0\0xy");
    }

    #[test]
    fn base64_matches_rfc_4648() {
        for (raw, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), encoded);
        }
    }

    #[test]
    fn long_inputs_are_cut_in_messages() {
        assert_eq!(quote(b"a\tb"), "\"a\\tb\"");
        let long = quote(&[b'x'; 500]);
        assert!(long.ends_with("\"...") && long.len() < 200, "{long}");
    }
}
