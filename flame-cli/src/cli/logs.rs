//! `flame logs SESSION [--executor ID] [--follow]`
//!
//! Without `--follow`, each executor's log is printed as it is, after a header line
//! `==> NODE/exec-ID <==`; a header comes again when the output switches executors (logs
//! of several nodes arrive interleaved). With `--follow`, whole lines are printed as they
//! come, each prefixed `[NODE/exec-ID] `. Warnings about nodes whose logs cannot be read go
//! to stderr; the exit code is 0 once the head says the logs are complete, or on Ctrl-C.

use super::signals::StopSignals;
use super::GlobalArgs;
use anyhow::Context as _;
use clap::Args;
use flame_protocol::messages::LogEvent;
use flame_protocol::model::SessionInfo;
use flame_protocol::{ExecutorId, SessionId};
use std::collections::BTreeMap;
use std::io::{self, Write};

/// With `--follow`, a line without its newline yet is printed anyway once it is this long,
/// so one executor printing without newlines cannot grow the buffer without bound.
pub const PARTIAL_LINE_BYTES_MAX: usize = 64 * 1024;

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The session whose executors' logs to show
    pub session: SessionId,
    /// Only this executor's log (`flame session view SESSION` lists its executors)
    #[arg(long, value_name = "ID")]
    pub executor: Option<ExecutorId>,
    /// Keep printing new output, line by line, until the executors end (Ctrl-C stops)
    #[arg(long, short = 'f')]
    pub follow: bool,
}

pub async fn run(global: &GlobalArgs, args: LogsArgs) -> anyhow::Result<()> {
    let mut signals = StopSignals::install()?;
    let session = args.session;
    super::with_client(global, |client| async move {
        let mut stream = tokio::select! {
            stream = client.logs(session, args.executor, args.follow) => stream?,
            _ = signals.recv() => return Ok(()),
        };
        let mut out = Printer::new(args.follow);
        let mut seen_any = false;
        loop {
            let item = tokio::select! {
                item = stream.next() => item,
                // Ctrl-C or SIGTERM: a clean end, keeping what was printed.
                _ = signals.recv() => break,
            };
            match item {
                None => break,
                Some(Ok(LogEvent::Chunk {
                    executor,
                    node,
                    data,
                    ..
                })) => {
                    seen_any = true;
                    out.chunk(&node, executor, &data)?;
                }
                Some(Ok(LogEvent::Unavailable { node, reason })) => {
                    seen_any = true;
                    out.flush()?;
                    eprintln!("warning: logs on node {node} are unavailable: {reason}");
                }
                Some(Ok(LogEvent::End)) => break,
                Some(Err(e)) => {
                    out.finish()?;
                    return Err(e.into());
                }
            }
            if out.closed {
                // Whoever read our output (`| head`) has had enough.
                return Ok(());
            }
        }
        out.finish()?;
        if !seen_any && stream.is_ended() {
            let info = client.get_session(session).await?;
            eprintln!("{}", no_output_note(&info, args.executor));
        }
        Ok(())
    })
    .await
}

/// Why a session's logs showed nothing, from what the head knows of it.
fn no_output_note(info: &SessionInfo, executor: Option<ExecutorId>) -> String {
    let id = info.id;
    let of = match executor {
        Some(e) => format!("executor {e} of session {id}"),
        None => format!("the executors of session {id}"),
    };
    if info.usage.is_empty() {
        if info.counts.unfinished() > 0 {
            format!("No log output: no executor has started for session {id} yet.")
        } else {
            format!("No log output: no executor ran for session {id}.")
        }
    } else {
        format!(
            "No log output from {of}: they wrote nothing to stderr (nor to stdout under the \
             unix shim), or their nodes no longer keep the logs."
        )
    }
}

/// How one executor's output is labelled.
fn label(node: &str, executor: ExecutorId) -> String {
    format!("{node}/exec-{executor}")
}

/// Writes log chunks to stdout in the command's format.
#[derive(Debug)]
struct Printer {
    stdout: io::Stdout,
    follow: bool,
    /// Without follow: the executor printed last, and whether its output ended a line.
    current: Option<(String, ExecutorId)>,
    at_line_start: bool,
    /// With follow: each executor's line so far, without its newline.
    partial: BTreeMap<(String, ExecutorId), Vec<u8>>,
    /// Stdout is a closed pipe: nothing more can be shown.
    closed: bool,
}

impl Printer {
    fn new(follow: bool) -> Self {
        Printer {
            stdout: io::stdout(),
            follow,
            current: None,
            at_line_start: true,
            partial: BTreeMap::new(),
            closed: false,
        }
    }

    fn chunk(&mut self, node: &str, executor: ExecutorId, data: &[u8]) -> anyhow::Result<()> {
        let text = self.render(node, executor, data);
        self.write(&text)
    }

    /// What a chunk prints as.
    fn render(&mut self, node: &str, executor: ExecutorId, data: &[u8]) -> Vec<u8> {
        let mut text = Vec::with_capacity(data.len() + 64);
        if self.follow {
            let key = (node.to_string(), executor);
            let prefix = format!("[{}] ", label(node, executor));
            let pending = self.partial.entry(key).or_default();
            pending.extend_from_slice(data);
            let mut start = 0;
            while let Some(newline) = pending[start..].iter().position(|&b| b == b'\n') {
                let end = start + newline + 1;
                text.extend_from_slice(prefix.as_bytes());
                text.extend_from_slice(&pending[start..end]);
                start = end;
            }
            pending.drain(..start);
            if pending.len() >= PARTIAL_LINE_BYTES_MAX {
                text.extend_from_slice(prefix.as_bytes());
                text.append(pending);
                text.push(b'\n');
            }
        } else {
            let same = self
                .current
                .as_ref()
                .is_some_and(|(n, e)| n == node && *e == executor);
            if !same {
                if !self.at_line_start {
                    text.push(b'\n');
                }
                if self.current.is_some() {
                    text.push(b'\n');
                }
                text.extend_from_slice(format!("==> {} <==\n", label(node, executor)).as_bytes());
                self.current = Some((node.to_string(), executor));
            }
            text.extend_from_slice(data);
            if let Some(&last) = data.last() {
                self.at_line_start = last == b'\n';
            }
        }
        text
    }

    /// With follow, prints the lines still missing their newline.
    fn finish(&mut self) -> anyhow::Result<()> {
        let text = self.render_rest();
        self.write(&text)
    }

    fn render_rest(&mut self) -> Vec<u8> {
        let mut text = Vec::new();
        for ((node, executor), pending) in std::mem::take(&mut self.partial) {
            if !pending.is_empty() {
                text.extend_from_slice(format!("[{}] ", label(&node, executor)).as_bytes());
                text.extend_from_slice(&pending);
                text.push(b'\n');
            }
        }
        text
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        self.write(&[])
    }

    /// Writes and flushes, so that followed output shows at once. A closed pipe is not an
    /// error: it sets `closed`.
    fn write(&mut self, text: &[u8]) -> anyhow::Result<()> {
        if self.closed {
            return Ok(());
        }
        let mut lock = self.stdout.lock();
        match lock.write_all(text).and_then(|()| lock.flush()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            Err(e) => Err(e).context("cannot write the logs to stdout"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(printer: &mut Printer, chunks: &[(&str, u64, &str)]) -> String {
        let mut out = Vec::new();
        for (node, executor, data) in chunks {
            out.extend(printer.render(node, ExecutorId(*executor), data.as_bytes()));
        }
        out.extend(printer.render_rest());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn without_follow_a_header_starts_each_executor() {
        let mut printer = Printer::new(false);
        let out = shown(
            &mut printer,
            &[
                ("n1", 1, "a\nb"),
                ("n1", 1, "c\n"),
                ("n2", 7, "x\n"),
                ("n1", 1, "d"),
            ],
        );
        assert_eq!(
            out,
            "==> n1/exec-1 <==\na\nbc\n\n==> n2/exec-7 <==\nx\n\n==> n1/exec-1 <==\nd"
        );
    }

    #[test]
    fn with_follow_whole_lines_are_prefixed_and_partial_ones_wait() {
        let mut printer = Printer::new(true);
        let out = shown(
            &mut printer,
            &[("n1", 1, "a\nb"), ("n2", 7, "x\n"), ("n1", 1, "c\nd")],
        );
        assert_eq!(
            out,
            "[n1/exec-1] a\n[n2/exec-7] x\n[n1/exec-1] bc\n[n1/exec-1] d\n"
        );
    }

    #[test]
    fn with_follow_a_long_partial_line_is_printed_anyway() {
        let mut printer = Printer::new(true);
        let long = "z".repeat(PARTIAL_LINE_BYTES_MAX);
        let out = printer.render("n", ExecutorId(3), long.as_bytes());
        assert_eq!(out.len(), "[n/exec-3] ".len() + PARTIAL_LINE_BYTES_MAX + 1);
        assert!(printer.render_rest().is_empty());
    }
}
