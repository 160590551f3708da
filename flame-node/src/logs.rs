//! Executor logs on the node: capped, rotated files, and readers that stream them.
//!
//! An executor's stderr (and, under the Unix shim, its stdout) is copied into
//! `<dir>/executor-<id>.log` by a [`LogSink`]. When the next write would take that file past
//! [`LogConfig::file_bytes_max`], the files rotate: `.log` becomes `.log.1`, `.log.1`
//! becomes `.log.2` and so on, and files past [`LogConfig::files_kept`] are deleted. An
//! executor therefore never holds more than `files_kept + 1` files of at most
//! `file_bytes_max` bytes each.
//!
//! # Offsets
//!
//! A log is one byte stream; an offset counts bytes from the first byte the executor ever
//! logged, so it stays valid across rotations. Rotation deletes the oldest bytes: the
//! retained log is the range [`LogExtent::start`]`..`[`LogExtent::end`]. The start is kept
//! on disk (`executor-<id>.base`) so that a finished log reads with the same offsets as it
//! had while live. A reader asked for an offset that was rotated away starts at the oldest
//! retained byte and counts the gap ([`LogReader::skipped_bytes`]).
//!
//! # Lines
//!
//! Several sources (stdout and stderr) feed one log, each through its own copy task
//! ([`LogSink::spawn_copy`]). A copy task writes whole lines when it can, so lines from the
//! two streams interleave but do not mix. A line longer than [`LINE_BYTES_MAX`] is written in
//! pieces of that size, and a partial line is written after [`PARTIAL_LINE_FLUSH`] without
//! more output (a prompt, a progress bar), so that followers see it. When a source writes
//! after another source left a line unfinished, a newline is inserted first; that is the
//! only change to the bytes.
//!
//! # Failures
//!
//! Writing the log never holds up the application: a write that fails (a full disk, say)
//! drops those bytes, counts them ([`LogSink::dropped_bytes`]), warns once, and the copy
//! task goes on draining the pipe. Writes and reads run on tokio's blocking pool, so a slow
//! disk slows the copy (the pipe fills and the application waits on it, as with any pipe)
//! but never stalls the runtime.
//!
//! # Sessions
//!
//! An executor serves one session after another, and its log is one stream, so the log
//! also records **spans**: for each time the executor was bound to a session, the session
//! and the offsets where the binding began and ended ([`LogSink::enter`],
//! [`LogSink::leave`]), kept in `executor-<id>.spans` beside the log. `flame logs SESSION`
//! reads only those ranges ([`LogRegistry::session_reader`]): what the executor wrote
//! while launching, between sessions, or for another session is never shown. At each
//! boundary the copy tasks first write what the pipes hold ([`SETTLE_TIMEOUT`]), so bytes
//! the application wrote before it answered the enter or leave land on the right side; the
//! tail kept for failure messages starts afresh at each boundary too.
//!
//! # Followers
//!
//! The reader runs in the same process as the sink, so each live sink carries a
//! [`watch`] channel of its logical end: a following reader sleeps on it and wakes on the
//! next write. The log is closed when every [`LogSink`] clone and every copy task is gone
//! (the executor ended and its pipes reached end of file); followers then read what is left
//! and end. [`LogRegistry`] maps executor ids to live sinks so that a reader finds and
//! follows a live log, and falls back to the files of a finished one.

// Offsets, extents and drop counts are part of the reader API that tests use and the
// node does not need yet.
#![allow(dead_code)]

use bytes::Bytes;
use flame_protocol::limits;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, oneshot, watch};

/// The log id of a batch rank's separate stderr log: its executor id with the top bit set
/// (executor ids never reach it).
pub fn stderr_log_id(executor: u64) -> u64 {
    executor | 1 << 63
}

/// Default bound on one log file: 8 MiB.
pub const FILE_BYTES_MAX_DEFAULT: u64 = 8 * 1024 * 1024;

/// Default number of rotated files kept besides the current one.
pub const FILES_KEPT_DEFAULT: u32 = 3;

/// Most rotated files kept, whatever the configuration says.
pub const FILES_KEPT_MAX: u32 = 100;

/// Lines kept in memory for failure messages ([`LogSink::tail_lines`]).
pub const TAIL_LINES: usize = 20;

/// Longest line kept in the tail; longer lines are cut.
pub const TAIL_LINE_BYTES_MAX: usize = 4 * 1024;

/// Longest piece of one line written at once; longer lines are split into pieces this size.
pub const LINE_BYTES_MAX: usize = 64 * 1024;

/// A partial line is written after this long without more output from its source.
pub const PARTIAL_LINE_FLUSH: Duration = Duration::from_millis(200);

/// Largest chunk [`LogReader::read_chunk`] returns, whatever it is asked for.
pub const CHUNK_BYTES_MAX: usize = 1024 * 1024;

/// Bytes asked of a source pipe per read.
const READ_BYTES: usize = 64 * 1024;

/// Most session spans kept per log; the oldest are forgotten first (their bytes are
/// rotated away long before, unless the sessions wrote nothing).
pub const SPANS_MAX: usize = 4096;

/// How long a session boundary waits for the copy tasks to write what the pipes hold.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(1);

/// One binding of the executor to a session, as offsets of its log: `end` is `None` while
/// it lasts (or when the executor ended bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub session: u64,
    pub start: u64,
    pub end: Option<u64>,
}

/// Where executor logs go and how much of each is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// The directory holding every executor's log files.
    pub dir: PathBuf,
    /// Bound on one log file, in bytes (at least 1).
    pub file_bytes_max: u64,
    /// Rotated files kept besides the current one (at most [`FILES_KEPT_MAX`]).
    pub files_kept: u32,
}

impl LogConfig {
    /// Logs in `dir` with the default bounds: 8 MiB files, 3 rotated files kept.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        LogConfig {
            dir: dir.into(),
            file_bytes_max: FILE_BYTES_MAX_DEFAULT,
            files_kept: FILES_KEPT_DEFAULT,
        }
    }

    /// The path of one of an executor's files: `rotated` 0 is the current file
    /// (`executor-<id>.log`), `n` the n-th newest rotated one (`executor-<id>.log.<n>`).
    pub fn file_path(&self, executor: u64, rotated: u32) -> PathBuf {
        if rotated == 0 {
            self.dir.join(format!("executor-{executor}.log"))
        } else {
            self.dir.join(format!("executor-{executor}.log.{rotated}"))
        }
    }

    /// Bound on the bytes one executor's log holds on disk.
    pub fn executor_bytes_max(&self) -> u64 {
        self.file_bytes_max
            .saturating_mul(u64::from(self.files_kept) + 1)
    }

    /// The file holding the offset of the oldest retained byte.
    fn base_path(&self, executor: u64) -> PathBuf {
        self.dir.join(format!("executor-{executor}.base"))
    }

    /// The file holding the log's session spans.
    fn spans_path(&self, executor: u64) -> PathBuf {
        self.dir.join(format!("executor-{executor}.spans"))
    }

    fn validate(&self) -> Result<(), LogError> {
        if self.file_bytes_max == 0 {
            return Err(LogError::Config("file_bytes_max must be at least 1"));
        }
        if self.files_kept > FILES_KEPT_MAX {
            return Err(LogError::Config("files_kept must be at most 100"));
        }
        Ok(())
    }
}

/// What can go wrong with executor logs.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The configuration is out of bounds.
    #[error("invalid log configuration: {0}")]
    Config(&'static str),
    /// A log file or the log directory could not be created, read or listed.
    #[error("executor log {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the operating system said.
        source: io::Error,
    },
    /// The executor has no log, live or on disk.
    #[error("no log for executor {0}")]
    NotFound(u64),
    /// A blocking log operation could not run to its end (the runtime is shutting down).
    #[error("a log operation was interrupted: {0}")]
    Interrupted(String),
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The retained part of an executor's log, as offsets (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogExtent {
    /// Offset of the oldest retained byte.
    pub start: u64,
    /// Offset just past the newest byte.
    pub end: u64,
    /// Whether the log is still being written.
    pub live: bool,
}

/// One file of a log: where it starts in the stream and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    start: u64,
    len: u64,
}

impl Segment {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// The rotated number (0: current) of segment `index` of `count`, oldest first.
fn rotated_number(count: usize, index: usize) -> u32 {
    u32::try_from(count - 1 - index).unwrap_or(u32::MAX)
}

/// The segments of an executor's log on disk, oldest first; `NotFound` when it has no
/// files at all.
fn segments_on_disk(cfg: &LogConfig, executor: u64) -> Result<VecDeque<Segment>, LogError> {
    let len_of = |path: &Path| match std::fs::metadata(path) {
        Ok(meta) => Ok(Some(meta.len())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(path)(e)),
    };
    // Newest first: the current file, then .1, .2, … while they exist.
    let mut lens = Vec::new();
    let current = len_of(&cfg.file_path(executor, 0))?;
    for rotated in 1..=FILES_KEPT_MAX {
        match len_of(&cfg.file_path(executor, rotated))? {
            Some(len) => lens.push(len),
            None => break,
        }
    }
    if current.is_none() && lens.is_empty() {
        return Err(LogError::NotFound(executor));
    }
    lens.reverse();
    lens.push(current.unwrap_or(0));
    let mut start = read_base(cfg, executor);
    let mut segments = VecDeque::with_capacity(lens.len());
    for len in lens {
        segments.push_back(Segment { start, len });
        start += len;
    }
    Ok(segments)
}

/// The offset of the oldest retained byte; 0 when nothing was ever rotated away (or the
/// file is unreadable: offsets then restart at 0, and nothing worse happens).
fn read_base(cfg: &LogConfig, executor: u64) -> u64 {
    std::fs::read_to_string(cfg.base_path(executor))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// Records the offset of the oldest retained byte, atomically (write, then rename).
fn write_base(cfg: &LogConfig, executor: u64, base: u64) -> io::Result<()> {
    let path = cfg.base_path(executor);
    let tmp = path.with_extension("base.tmp");
    std::fs::write(&tmp, format!("{base}\n"))?;
    std::fs::rename(&tmp, &path)
}

/// The spans recorded for a log; none when it has no spans file. A file that cannot be
/// read or parsed gives none (and a warning): nothing of that log is then shown to anyone.
fn read_spans(cfg: &LogConfig, executor: u64) -> Vec<Span> {
    let path = cfg.spans_path(executor);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), "cannot read the log's session spans: {e}");
            return Vec::new();
        }
    };
    let parse = |line: &str| -> Option<Span> {
        let mut fields = line.split(' ');
        let session = fields.next()?.parse().ok()?;
        let start = fields.next()?.parse().ok()?;
        let end = match fields.next()? {
            "-" => None,
            end => Some(end.parse().ok()?),
        };
        fields.next().is_none().then_some(Span {
            session,
            start,
            end,
        })
    };
    match text.lines().map(parse).collect::<Option<Vec<Span>>>() {
        Some(spans) => spans,
        None => {
            tracing::warn!(path = %path.display(), "the log's session spans are damaged; none of it is shown");
            Vec::new()
        }
    }
}

/// Records a log's session spans, atomically (write, then rename).
fn write_spans(cfg: &LogConfig, executor: u64, spans: &[Span]) -> io::Result<()> {
    let path = cfg.spans_path(executor);
    let tmp = path.with_extension("spans.tmp");
    let mut text = String::with_capacity(spans.len() * 32);
    for span in spans {
        let end = span.end.map_or_else(|| "-".to_string(), |e| e.to_string());
        text.push_str(&format!("{} {} {end}\n", span.session, span.start));
    }
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)
}

/// Opens a log file for appending; replaced in tests to make writes fail.
type Opener = fn(&Path) -> io::Result<Box<dyn Write + Send>>;

fn open_for_append(path: &Path) -> io::Result<Box<dyn Write + Send>> {
    Ok(Box::new(
        OpenOptions::new().create(true).append(true).open(path)?,
    ))
}

/// A sink's mutable state, behind its mutex. Rotation and the readers' lookups of file
/// names take the same lock, so a name always means the segment the reader computed.
struct SinkState {
    /// Oldest first; the last is the current file. Never empty.
    segments: VecDeque<Segment>,
    /// The current file; `None` after it could not be opened (retried on the next write).
    file: Option<Box<dyn Write + Send>>,
    opener: Opener,
    /// The source whose last write ended mid-line, if any.
    mid_line: Option<u32>,
    dropped_bytes: u64,
    warned: bool,
}

impl SinkState {
    fn end(&self) -> u64 {
        self.segments.back().map_or(0, Segment::end)
    }

    /// Writes one source's bytes, rotating at the cap.
    fn write(&mut self, cfg: &LogConfig, executor: u64, source: u32, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if matches!(self.mid_line, Some(other) if other != source) {
            self.write_capped(cfg, executor, b"\n");
        }
        self.write_capped(cfg, executor, data);
        self.mid_line = if data.ends_with(b"\n") {
            None
        } else {
            Some(source)
        };
    }

    /// Writes `data`, rotating first whenever the current file would pass the cap. Splits
    /// at the last newline that fits, and mid-line only when one line alone passes the cap.
    fn write_capped(&mut self, cfg: &LogConfig, executor: u64, data: &[u8]) {
        let mut rest = data;
        while !rest.is_empty() {
            let len = self.segments.back().map_or(0, |s| s.len);
            let room =
                usize::try_from(cfg.file_bytes_max.saturating_sub(len)).unwrap_or(usize::MAX);
            if rest.len() <= room {
                self.write_raw(cfg, executor, rest);
                return;
            }
            let cut = match rest[..room].iter().rposition(|&b| b == b'\n') {
                Some(newline) => newline + 1,
                None if len == 0 => room,
                None => 0,
            };
            let (now, later) = rest.split_at(cut);
            self.write_raw(cfg, executor, now);
            rest = later;
            if !self.rotate(cfg, executor) {
                // The files cannot be moved: drop the rest rather than pass the cap (or try
                // again forever). The next write tries to rotate again.
                let error = io::Error::other("log rotation failed");
                self.drop_bytes(cfg, executor, rest.len(), &error);
                return;
            }
        }
    }

    /// Appends to the current file, counting what fails as dropped.
    fn write_raw(&mut self, cfg: &LogConfig, executor: u64, mut data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if self.file.is_none() {
            match (self.opener)(&cfg.file_path(executor, 0)) {
                Ok(file) => self.file = Some(file),
                Err(e) => {
                    self.drop_bytes(cfg, executor, data.len(), &e);
                    return;
                }
            }
        }
        let failure = match self.file.as_mut() {
            Some(file) => loop {
                if data.is_empty() {
                    break None;
                }
                match file.write(data) {
                    Ok(0) => break Some(io::Error::from(io::ErrorKind::WriteZero)),
                    Ok(n) => {
                        if let Some(current) = self.segments.back_mut() {
                            current.len += n as u64;
                        }
                        data = &data[n..];
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Some(e),
                }
            },
            None => Some(io::Error::from(io::ErrorKind::NotFound)),
        };
        if let Some(e) = failure {
            self.drop_bytes(cfg, executor, data.len(), &e);
        }
    }

    fn drop_bytes(&mut self, cfg: &LogConfig, executor: u64, len: usize, error: &io::Error) {
        self.dropped_bytes += len as u64;
        self.warn_once(cfg, executor, error);
    }

    fn warn_once(&mut self, cfg: &LogConfig, executor: u64, error: &io::Error) {
        if !self.warned {
            self.warned = true;
            tracing::warn!(
                executor,
                dir = %cfg.dir.display(),
                "cannot write the executor's log, dropping its output until it can ({error}); \
                 warned once per executor"
            );
        }
    }

    /// Moves every file up one number, deleting those past `files_kept`, and starts a new
    /// current file. On a failure the state is read back from the disk and this returns
    /// false.
    fn rotate(&mut self, cfg: &LogConfig, executor: u64) -> bool {
        self.file = None;
        let kept = cfg.files_kept as usize;
        let count = self.segments.len();
        // After this rotation there are count + 1 segments; the oldest beyond kept + 1 go.
        let dropped = (count + 1).saturating_sub(kept + 1);
        let new_base = self
            .segments
            .get(dropped)
            .map_or_else(|| self.end(), |s| s.start);
        if dropped > 0 {
            // Before deleting: a crash in between leaves a base slightly ahead, not behind.
            if let Err(e) = write_base(cfg, executor, new_base) {
                self.warn_once(cfg, executor, &e);
            }
        }
        let mut failed = None;
        // Oldest first, so nothing is overwritten.
        for index in 0..count {
            let from_number = rotated_number(count, index);
            let from = cfg.file_path(executor, from_number);
            let to_number = from_number + 1;
            let moved = if to_number as usize > kept {
                std::fs::remove_file(&from)
            } else {
                std::fs::rename(&from, cfg.file_path(executor, to_number))
            };
            match moved {
                Ok(()) => {}
                // Nothing was ever written there (every write failed): nothing to move.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            self.warn_once(cfg, executor, &e);
            self.resync(cfg, executor);
            return false;
        }
        let start = self.end();
        self.segments.push_back(Segment { start, len: 0 });
        for _ in 0..dropped {
            self.segments.pop_front();
        }
        // A file that cannot be opened now is opened again at the next write.
        match (self.opener)(&cfg.file_path(executor, 0)) {
            Ok(file) => self.file = Some(file),
            Err(e) => self.warn_once(cfg, executor, &e),
        }
        true
    }

    /// Rebuilds the segments from the files after a failed rotation.
    fn resync(&mut self, cfg: &LogConfig, executor: u64) {
        let end = self.end();
        self.segments = segments_on_disk(cfg, executor)
            .unwrap_or_else(|_| VecDeque::from([Segment { start: end, len: 0 }]));
        self.file = (self.opener)(&cfg.file_path(executor, 0)).ok();
    }
}

/// What a sink's clones, copy tasks and weak registry entries share.
struct Shared {
    executor: u64,
    cfg: LogConfig,
    state: Mutex<SinkState>,
    tail: Mutex<VecDeque<String>>,
    /// The logical end after each write; followers wait on it. Dropped with the sink, which
    /// tells them the log is closed.
    written: watch::Sender<u64>,
    /// Ids for copy tasks, so that the mid-line newline knows who wrote last.
    next_source: AtomicU32,
    /// The session spans; session readers wait on it. Changed under the state lock, so a
    /// byte at or past a recorded end was written after the end was published.
    spans: watch::Sender<Vec<Span>>,
    /// One channel per copy task, on which [`LogSink::settle`] asks it to write what its
    /// pipe holds now and to say when it has.
    flushers: Mutex<Vec<mpsc::Sender<oneshot::Sender<()>>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("executor", &self.executor)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a log lock leaves at worst a miscounted length; keep going.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Writes on the blocking pool; a write that cannot be run counts as dropped.
    async fn write(self: &Arc<Self>, source: u32, data: Vec<u8>) {
        let shared = Arc::clone(self);
        let len = data.len();
        let written = tokio::task::spawn_blocking(move || {
            let end = {
                let mut state = lock(&shared.state);
                state.write(&shared.cfg, shared.executor, source, &data);
                state.end()
            };
            shared.written.send_replace(end);
        })
        .await;
        if let Err(e) = written {
            let mut state = lock(&self.state);
            state.drop_bytes(&self.cfg, self.executor, len, &io::Error::other(e));
        }
    }

    /// Closes the open span at the log's end now and, with `session`, opens one there;
    /// starts the tail afresh. Runs on the blocking pool (it writes the spans file).
    fn mark(&self, session: Option<u64>) {
        let mut state = lock(&self.state);
        let end = state.end();
        let mut spans = self.spans.borrow().clone();
        if let Some(open) = spans.last_mut().filter(|s| s.end.is_none()) {
            open.end = Some(end);
        }
        if let Some(session) = session {
            spans.push(Span {
                session,
                start: end,
                end: None,
            });
        }
        let excess = spans.len().saturating_sub(SPANS_MAX);
        spans.drain(..excess);
        if let Err(e) = write_spans(&self.cfg, self.executor, &spans) {
            // The spans still hold in memory while the log is live. A stale file could
            // stretch an old span over later sessions once the log is finished, so it goes:
            // a finished log without spans shows nothing.
            let _ = std::fs::remove_file(self.cfg.spans_path(self.executor));
            state.warn_once(&self.cfg, self.executor, &e);
        }
        self.spans.send_replace(spans);
        lock(&self.tail).clear();
    }

    fn push_tail(&self, lines: impl IntoIterator<Item = String>) {
        let mut tail = lock(&self.tail);
        for line in lines {
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
}

/// The lines a copy task has seen, for the tail: splits on newlines and cuts long lines.
#[derive(Default)]
struct TailLine {
    line: Vec<u8>,
}

impl TailLine {
    fn feed(&mut self, shared: &Shared, data: &[u8]) {
        let mut done = Vec::new();
        for piece in data.split_inclusive(|&b| b == b'\n') {
            let (body, ends) = match piece.strip_suffix(b"\n") {
                Some(body) => (body, true),
                None => (piece, false),
            };
            let room = TAIL_LINE_BYTES_MAX.saturating_sub(self.line.len());
            self.line.extend_from_slice(&body[..body.len().min(room)]);
            if ends {
                done.push(self.take());
            }
        }
        if !done.is_empty() {
            // Only the last TAIL_LINES of a large read matter.
            let skip = done.len().saturating_sub(TAIL_LINES);
            shared.push_tail(done.into_iter().skip(skip));
        }
    }

    /// Ends the line being gathered as it is: at a session boundary, and at the end.
    fn flush(&mut self, shared: &Shared) {
        if !self.line.is_empty() {
            shared.push_tail([self.take()]);
        }
    }

    fn take(&mut self) -> String {
        let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
        let text = String::from_utf8_lossy(line).into_owned();
        self.line.clear();
        text
    }
}

/// What a copy task does next.
enum Next {
    Read(io::Result<usize>),
    /// Write what the pipe holds now, then answer.
    Flush(oneshot::Sender<()>),
    /// A partial line waited [`PARTIAL_LINE_FLUSH`] without more output.
    Quiet,
}

/// Copies one source into the sink until it ends; see the module docs for the line rules.
async fn copy<R: AsyncRead + Unpin>(
    shared: Arc<Shared>,
    mut source: R,
    id: u32,
    stream_name: &'static str,
    mut flushes: mpsc::Receiver<oneshot::Sender<()>>,
) {
    let mut buf = vec![0u8; READ_BYTES];
    let mut pending: Vec<u8> = Vec::new();
    let mut tail = TailLine::default();
    let warn = |e: &io::Error| {
        tracing::warn!(
            executor = shared.executor,
            stream = stream_name,
            "cannot read the executor's {stream_name}: {e}"
        )
    };
    loop {
        let partial = !pending.is_empty();
        let quiet = async {
            if partial {
                tokio::time::sleep(PARTIAL_LINE_FLUSH).await
            } else {
                std::future::pending().await
            }
        };
        // `read` is cancel-safe: a flush or the quiet timer loses no bytes.
        let next = tokio::select! {
            biased;
            Some(ack) = flushes.recv() => Next::Flush(ack),
            read = source.read(&mut buf) => Next::Read(read),
            () = quiet => Next::Quiet,
        };
        match next {
            Next::Quiet => shared.write(id, std::mem::take(&mut pending)).await,
            Next::Read(Ok(0)) => break,
            Next::Read(Ok(n)) => take_lines(&shared, id, &mut tail, &mut pending, &buf[..n]).await,
            Next::Read(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Next::Read(Err(e)) => {
                warn(&e);
                break;
            }
            Next::Flush(ack) => {
                // Whatever the pipe holds now, without waiting for more.
                let mut ended = false;
                loop {
                    match tokio::time::timeout(Duration::ZERO, source.read(&mut buf)).await {
                        Ok(Ok(0)) => {
                            ended = true;
                            break;
                        }
                        Ok(Ok(n)) => {
                            take_lines(&shared, id, &mut tail, &mut pending, &buf[..n]).await
                        }
                        Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                        Ok(Err(e)) => {
                            warn(&e);
                            ended = true;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if !pending.is_empty() {
                    shared.write(id, std::mem::take(&mut pending)).await;
                }
                tail.flush(&shared);
                let _ = ack.send(());
                if ended {
                    break;
                }
            }
        }
    }
    if !pending.is_empty() {
        shared.write(id, pending).await;
    }
    tail.flush(&shared);
}

/// Takes `data` read from a source: into the tail, and whole lines (or pieces of
/// [`LINE_BYTES_MAX`]) into the log; a partial line stays in `pending`.
async fn take_lines(
    shared: &Arc<Shared>,
    id: u32,
    tail: &mut TailLine,
    pending: &mut Vec<u8>,
    data: &[u8],
) {
    tail.feed(shared, data);
    pending.extend_from_slice(data);
    if let Some(newline) = pending.iter().rposition(|&b| b == b'\n') {
        let rest = pending.split_off(newline + 1);
        let lines = std::mem::replace(pending, rest);
        shared.write(id, lines).await;
    }
    while pending.len() >= LINE_BYTES_MAX {
        let rest = pending.split_off(LINE_BYTES_MAX);
        let piece = std::mem::replace(pending, rest);
        shared.write(id, piece).await;
    }
}

/// One executor's log, being written. Clones share it; the log closes when every clone and
/// every copy task is gone.
#[derive(Debug, Clone)]
pub struct LogSink {
    shared: Arc<Shared>,
}

impl LogSink {
    /// Opens (creating `cfg.dir` if needed) the log of `executor`, appending to any files it
    /// already has. The sink is not registered: use [`LogRegistry::open_sink`] for logs that
    /// readers should find.
    pub fn open(cfg: &LogConfig, executor: u64) -> Result<Self, LogError> {
        Self::open_with(cfg, executor, open_for_append)
    }

    fn open_with(cfg: &LogConfig, executor: u64, opener: Opener) -> Result<Self, LogError> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.dir).map_err(io_error(&cfg.dir))?;
        let segments = match segments_on_disk(cfg, executor) {
            Ok(segments) => segments,
            Err(LogError::NotFound(_)) => VecDeque::from([Segment { start: 0, len: 0 }]),
            Err(e) => return Err(e),
        };
        let path = cfg.file_path(executor, 0);
        let file = opener(&path).map_err(io_error(&path))?;
        let end = segments.back().map_or(0, Segment::end);
        Ok(LogSink {
            shared: Arc::new(Shared {
                executor,
                cfg: cfg.clone(),
                state: Mutex::new(SinkState {
                    segments,
                    file: Some(file),
                    opener,
                    mid_line: None,
                    dropped_bytes: 0,
                    warned: false,
                }),
                tail: Mutex::new(VecDeque::with_capacity(TAIL_LINES)),
                written: watch::Sender::new(end),
                next_source: AtomicU32::new(0),
                spans: watch::Sender::new(read_spans(cfg, executor)),
                flushers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The executor this log belongs to.
    pub fn executor(&self) -> u64 {
        self.shared.executor
    }

    /// Starts a task copying everything read from `source` (a child's stderr or stdout pipe)
    /// into the log until it ends; `stream_name` names it in warnings. The task never stops
    /// reading early because of the log: failed writes are dropped and counted.
    pub fn spawn_copy<R: AsyncRead + Unpin + Send + 'static>(
        &self,
        source: R,
        stream_name: &'static str,
    ) -> tokio::task::JoinHandle<()> {
        let id = self.shared.next_source.fetch_add(1, Ordering::Relaxed);
        let (flush_tx, flush_rx) = mpsc::channel(limits::LOG_FLUSH_REQUESTS_MAX);
        {
            let mut flushers = lock(&self.shared.flushers);
            flushers.retain(|tx| !tx.is_closed());
            flushers.push(flush_tx);
        }
        tokio::spawn(copy(
            Arc::clone(&self.shared),
            source,
            id,
            stream_name,
            flush_rx,
        ))
    }

    /// Waits (at most [`SETTLE_TIMEOUT`]) until every copy task has written what its pipe
    /// holds now: what the application wrote before this call is in the log after it.
    pub async fn settle(&self) {
        let answers: Vec<oneshot::Receiver<()>> = lock(&self.shared.flushers)
            .iter()
            .filter_map(|tx| {
                let (ack, answer) = oneshot::channel();
                // Full: that many settles wait on this copy task already, and this one
                // goes on without it (as for a copy task that ended).
                tx.try_send(ack).ok().map(|()| answer)
            })
            .collect();
        let all = async {
            for answer in answers {
                // An error: that copy task ended, having written all it had.
                let _ = answer.await;
            }
        };
        if tokio::time::timeout(SETTLE_TIMEOUT, all).await.is_err() {
            tracing::warn!(
                executor = self.shared.executor,
                "the executor's output was not all written within {SETTLE_TIMEOUT:?} of a \
                 session boundary; some may count on the other side of it"
            );
        }
    }

    /// The executor is about to enter `session`: what it writes from here on (until
    /// [`Self::leave`]) is that session's.
    pub async fn enter(&self, session: u64) {
        self.mark(Some(session)).await;
    }

    /// The executor left its session: what it writes from here on is no session's.
    pub async fn leave(&self) {
        self.mark(None).await;
    }

    async fn mark(&self, session: Option<u64>) {
        self.settle().await;
        let shared = Arc::clone(&self.shared);
        if let Err(e) = tokio::task::spawn_blocking(move || shared.mark(session)).await {
            tracing::warn!(
                executor = self.shared.executor,
                "cannot record a session boundary in the log: {e}"
            );
        }
    }

    /// The session spans so far.
    pub fn spans(&self) -> Vec<Span> {
        self.shared.spans.borrow().clone()
    }

    /// The last [`TAIL_LINES`] lines seen from every source, oldest first, each cut to
    /// [`TAIL_LINE_BYTES_MAX`] bytes (invalid UTF-8 replaced), for failure messages. Lines
    /// are kept even when writing them to disk failed.
    pub fn tail_lines(&self) -> Vec<String> {
        lock(&self.shared.tail).iter().cloned().collect()
    }

    /// Bytes that could not be written to disk so far.
    pub fn dropped_bytes(&self) -> u64 {
        lock(&self.shared.state).dropped_bytes
    }

    /// The retained part of the log.
    pub fn extent(&self) -> LogExtent {
        let state = lock(&self.shared.state);
        LogExtent {
            start: state.segments.front().map_or(0, |s| s.start),
            end: state.end(),
            live: true,
        }
    }

    /// A reader of this log from `offset`, which can follow it.
    pub fn reader(&self, offset: u64) -> LogReader {
        LogReader {
            cfg: self.shared.cfg.clone(),
            executor: self.shared.executor,
            live: Some(Live {
                sink: Arc::downgrade(&self.shared),
                written: self.shared.written.subscribe(),
            }),
            position: offset,
            skipped_bytes: 0,
        }
    }
}

/// A reader's hold on a live log: weak, so that it does not keep the log open.
#[derive(Debug)]
struct Live {
    sink: Weak<Shared>,
    written: watch::Receiver<u64>,
}

/// What one blocking read step found.
enum Step {
    /// Bytes read from `from`.
    Data { from: u64, bytes: Bytes },
    /// Nothing after `at` for now; `live` says whether more may come.
    End { at: u64, live: bool },
}

/// The file of the segment holding `position` (clamped to the retained range), opened and
/// positioned there.
struct Located {
    file: File,
    /// The clamped position.
    at: u64,
    /// Bytes readable before the segment ends; `None` for the newest segment, which may
    /// grow.
    limit: Option<u64>,
}

/// Finds and opens the segment holding `position`; `None` when the log has no bytes at or
/// after it yet.
fn locate(
    cfg: &LogConfig,
    executor: u64,
    segments: &VecDeque<Segment>,
    position: u64,
) -> Result<Option<Located>, LogError> {
    let (Some(first), Some(last)) = (segments.front(), segments.back()) else {
        return Ok(None);
    };
    let at = position.clamp(first.start, last.end());
    let Some(index) = segments.iter().position(|s| at < s.end()) else {
        return Ok(None);
    };
    let segment = segments[index];
    let newest = index + 1 == segments.len();
    let path = cfg.file_path(executor, rotated_number(segments.len(), index));
    let mut file = match File::open(&path) {
        Ok(file) => file,
        // Removed meanwhile (remove_old, or every write to it failed): nothing to read.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(&path)(e)),
    };
    file.seek(SeekFrom::Start(at - segment.start))
        .map_err(io_error(&path))?;
    Ok(Some(Located {
        file,
        at,
        limit: (!newest).then(|| segment.end() - at),
    }))
}

/// One read: from the live sink's segments under its lock, or from the files once it is
/// gone. Runs on the blocking pool.
fn read_step(
    cfg: &LogConfig,
    executor: u64,
    sink: Option<&Weak<Shared>>,
    position: u64,
    max: usize,
) -> Result<Step, LogError> {
    let shared = sink.and_then(Weak::upgrade);
    let live = shared.is_some();
    let (segments, located) = match &shared {
        Some(shared) => {
            let state = lock(&shared.state);
            let located = locate(cfg, executor, &state.segments, position)?;
            (state.segments.clone(), located)
        }
        None => {
            let segments = match segments_on_disk(cfg, executor) {
                Ok(segments) => segments,
                Err(LogError::NotFound(_)) => VecDeque::new(),
                Err(e) => return Err(e),
            };
            let located = locate(cfg, executor, &segments, position)?;
            (segments, located)
        }
    };
    drop(shared);
    let Some(mut located) = located else {
        let end = segments.back().map_or(position, Segment::end);
        return Ok(Step::End {
            at: position
                .min(end)
                .max(segments.front().map_or(0, |s| s.start)),
            live,
        });
    };
    let want = located.limit.map_or(max, |limit| {
        usize::try_from(limit).unwrap_or(usize::MAX).min(max)
    });
    let mut bytes = vec![0u8; want];
    let mut filled = 0;
    while filled < want {
        match located.file.read(&mut bytes[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(LogError::Io {
                    path: cfg.file_path(executor, 0),
                    source: e,
                })
            }
        }
    }
    bytes.truncate(filled);
    if filled == 0 {
        if located.limit.is_some() {
            // A rotated file shorter than recorded (changed behind our back): skip the rest
            // of it rather than stop.
            return Ok(Step::Data {
                from: located.at + located.limit.unwrap_or(0),
                bytes: Bytes::new(),
            });
        }
        return Ok(Step::End {
            at: located.at,
            live,
        });
    }
    Ok(Step::Data {
        from: located.at,
        bytes: Bytes::from(bytes),
    })
}

/// Reads one executor's log in chunks from an offset, across its rotated files, oldest
/// first; for `flame logs`.
///
/// A reader of a live log ([`LogRegistry::reader`], [`LogSink::reader`]) can follow it; it
/// holds the log only weakly, so it never keeps it open.
#[derive(Debug)]
pub struct LogReader {
    cfg: LogConfig,
    executor: u64,
    /// Set while the log may be live.
    live: Option<Live>,
    position: u64,
    skipped_bytes: u64,
}

impl LogReader {
    /// A reader of a finished log, from the files alone, starting at `offset`.
    pub fn open(cfg: &LogConfig, executor: u64, offset: u64) -> Result<Self, LogError> {
        segments_on_disk(cfg, executor)?;
        Ok(LogReader {
            cfg: cfg.clone(),
            executor,
            live: None,
            position: offset,
            skipped_bytes: 0,
        })
    }

    /// The next chunk of at most `max` bytes (at most [`CHUNK_BYTES_MAX`], at least 1).
    ///
    /// `Ok(None)` is the end: of the log, when it is closed; of what is there now, when it
    /// is live and `follow` is false. With `follow`, at the end of a live log this waits for
    /// more and returns `None` only once the log is closed and read to its end. The wait has
    /// no timeout of its own: stop following by dropping the future (this is cancel-safe;
    /// nothing is lost, and the next call resumes at the same offset).
    pub async fn read_chunk(
        &mut self,
        max: usize,
        follow: bool,
    ) -> Result<Option<Bytes>, LogError> {
        let max = max.clamp(1, CHUNK_BYTES_MAX);
        loop {
            if let Some(live) = &mut self.live {
                // Anything written from here on wakes the wait below.
                live.written.borrow_and_update();
            }
            let cfg = self.cfg.clone();
            let executor = self.executor;
            let sink = self.live.as_ref().map(|live| live.sink.clone());
            let position = self.position;
            let step = tokio::task::spawn_blocking(move || {
                read_step(&cfg, executor, sink.as_ref(), position, max)
            })
            .await
            .map_err(|e| LogError::Interrupted(e.to_string()))??;
            match step {
                Step::Data { from, bytes } => {
                    self.advance_to(from);
                    self.position = from + bytes.len() as u64;
                    if bytes.is_empty() {
                        continue;
                    }
                    return Ok(Some(bytes));
                }
                Step::End { at, live } => {
                    self.advance_to(at);
                    if !live {
                        self.live = None;
                        return Ok(None);
                    }
                    if !follow {
                        return Ok(None);
                    }
                    let Some(live) = &mut self.live else {
                        return Ok(None);
                    };
                    // An error means the sink is gone: the next step reads the files.
                    let _ = live.written.changed().await;
                }
            }
        }
    }

    /// Moves the reader to `offset`.
    pub fn seek(&mut self, offset: u64) {
        self.position = offset;
    }

    /// The offset of the next byte to read.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Bytes passed over because they had been rotated away before they were read.
    pub fn skipped_bytes(&self) -> u64 {
        self.skipped_bytes
    }

    fn advance_to(&mut self, at: u64) {
        if at > self.position {
            self.skipped_bytes += at - self.position;
        }
        self.position = at;
    }
}

/// Where a session reader finds the spans: the live sink's, which change, or the spans
/// file of a finished log.
#[derive(Debug)]
enum Spans {
    Live(watch::Receiver<Vec<Span>>),
    Finished(Vec<Span>),
}

/// Reads what an executor wrote while bound to one session: the ranges of that session's
/// spans, in order, and nothing else (see the module docs).
#[derive(Debug)]
pub struct SessionReader {
    reader: LogReader,
    session: u64,
    spans: Spans,
    /// The offset of the next byte to read.
    position: u64,
}

impl SessionReader {
    /// This session's spans as they are now.
    fn mine(&self) -> Vec<Span> {
        let all = match &self.spans {
            Spans::Live(rx) => rx.borrow().clone(),
            Spans::Finished(spans) => spans.clone(),
        };
        all.into_iter()
            .filter(|s| s.session == self.session)
            .collect()
    }

    /// Waits until the spans change; false when they never will again (the log closed).
    async fn spans_changed(spans: &mut Spans) -> bool {
        let Spans::Live(rx) = spans else {
            return false;
        };
        if rx.changed().await.is_ok() {
            return true;
        }
        let last = rx.borrow().clone();
        *spans = Spans::Finished(last);
        false
    }

    /// The next chunk of at most `max` bytes of the session's output (at most
    /// [`CHUNK_BYTES_MAX`]). `Ok(None)` is the end: of what there is now without `follow`;
    /// with `follow`, once the executor has left the session (or ended) and everything it
    /// wrote for it was read. Without a span yet, a follower waits for the executor to
    /// enter the session. Cancel-safe, like [`LogReader::read_chunk`].
    pub async fn read_chunk(
        &mut self,
        max: usize,
        follow: bool,
    ) -> Result<Option<Bytes>, LogError> {
        loop {
            let mine = self.mine();
            let Some(span) = mine
                .iter()
                .copied()
                .find(|s| s.end.is_none_or(|end| end > self.position))
            else {
                // Nothing (more) of this session: a follower waits for a first entry only.
                if follow && mine.is_empty() && Self::spans_changed(&mut self.spans).await {
                    continue;
                }
                return Ok(None);
            };
            self.position = self.position.max(span.start);
            self.reader.seek(self.position);
            let room = span.end.map_or(max, |end| {
                usize::try_from(end - self.position)
                    .unwrap_or(usize::MAX)
                    .min(max)
            });
            let following = follow && span.end.is_none() && matches!(self.spans, Spans::Live(_));
            let chunk = if following {
                let SessionReader { reader, spans, .. } = self;
                tokio::select! {
                    chunk = reader.read_chunk(room, true) => chunk?,
                    // The span may have closed: look again.
                    _ = Self::spans_changed(spans) => continue,
                }
            } else {
                self.reader.read_chunk(room, false).await?
            };
            let Some(mut bytes) = chunk else {
                match span.end {
                    // Bytes of the span that are not there (dropped, or removed): on to
                    // the next span.
                    Some(end) => {
                        self.position = end;
                        continue;
                    }
                    None => return Ok(None),
                }
            };
            // Rotation may have moved the reader past bytes; and the span may have closed
            // while the bytes were read, with bytes past its end written since.
            let from = self.reader.position() - bytes.len() as u64;
            let end = self
                .mine()
                .iter()
                .find(|s| s.start == span.start)
                .and_then(|s| s.end);
            if let Some(end) = end {
                if from >= end {
                    self.position = end;
                    continue;
                }
                bytes.truncate(usize::try_from(end - from).unwrap_or(usize::MAX));
            }
            self.position = from + bytes.len() as u64;
            if !bytes.is_empty() {
                return Ok(Some(bytes));
            }
        }
    }
}

/// The node's executor logs: live sinks by executor id, and the files of finished ones.
#[derive(Debug)]
pub struct LogRegistry {
    cfg: LogConfig,
    live: Mutex<HashMap<u64, Weak<Shared>>>,
}

impl LogRegistry {
    /// A registry of logs under `cfg.dir`, which is created if missing.
    pub fn new(cfg: LogConfig) -> Result<Self, LogError> {
        cfg.validate()?;
        std::fs::create_dir_all(&cfg.dir).map_err(io_error(&cfg.dir))?;
        Ok(LogRegistry {
            cfg,
            live: Mutex::new(HashMap::new()),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &LogConfig {
        &self.cfg
    }

    /// Opens and registers the log of a starting executor.
    pub fn open_sink(&self, executor: u64) -> Result<LogSink, LogError> {
        let sink = LogSink::open(&self.cfg, executor)?;
        let mut live = lock(&self.live);
        // Entries of closed logs go here, so the map stays as small as the live set.
        live.retain(|_, sink| sink.strong_count() > 0);
        live.insert(executor, Arc::downgrade(&sink.shared));
        Ok(sink)
    }

    fn live_sink(&self, executor: u64) -> Option<LogSink> {
        lock(&self.live)
            .get(&executor)
            .and_then(Weak::upgrade)
            .map(|shared| LogSink { shared })
    }

    /// Whether the executor's log is still being written.
    pub fn is_live(&self, executor: u64) -> bool {
        self.live_sink(executor).is_some()
    }

    /// A reader of the executor's log from `offset`: following the live sink when there is
    /// one, else from the files. `u64::MAX` starts at the current end (only new output).
    pub fn reader(&self, executor: u64, offset: u64) -> Result<LogReader, LogError> {
        match self.live_sink(executor) {
            Some(sink) => Ok(sink.reader(offset)),
            None => LogReader::open(&self.cfg, executor, offset),
        }
    }

    /// A reader of what the executor wrote while bound to `session` (see
    /// [`SessionReader`]).
    pub fn session_reader(&self, executor: u64, session: u64) -> Result<SessionReader, LogError> {
        let (reader, spans) = match self.live_sink(executor) {
            Some(sink) => (sink.reader(0), Spans::Live(sink.shared.spans.subscribe())),
            None => (
                LogReader::open(&self.cfg, executor, 0)?,
                Spans::Finished(read_spans(&self.cfg, executor)),
            ),
        };
        Ok(SessionReader {
            reader,
            session,
            spans,
            position: 0,
        })
    }

    /// The retained part of the executor's log, for choosing an offset (say, the last
    /// 64 KiB: `end.saturating_sub(64 << 10)`).
    pub fn extent(&self, executor: u64) -> Result<LogExtent, LogError> {
        if let Some(sink) = self.live_sink(executor) {
            return Ok(sink.extent());
        }
        let segments = segments_on_disk(&self.cfg, executor)?;
        Ok(LogExtent {
            start: segments.front().map_or(0, |s| s.start),
            end: segments.back().map_or(0, Segment::end),
            live: false,
        })
    }

    /// [`remove_old`] that never removes a live log.
    pub fn remove_old(&self, keep_newest: usize) -> Result<usize, LogError> {
        let live: HashSet<u64> = lock(&self.live)
            .iter()
            .filter(|(_, sink)| sink.strong_count() > 0)
            .map(|(id, _)| *id)
            .collect();
        remove_old_except(&self.cfg, keep_newest, &live)
    }
}

/// Bounds the number of executor logs on disk: keeps the logs of the `keep_newest`
/// executors most recently written to (by file modification time, ties by id) and deletes
/// every file of the others. Returns how many executors' logs were deleted.
///
/// Together with the per-executor bound this bounds the directory at about
/// `keep_newest * cfg.executor_bytes_max()` bytes. Call it when an executor ends, or
/// periodically. This function knows nothing of live logs, so `keep_newest` must exceed the
/// number of executors running; [`LogRegistry::remove_old`] skips live logs itself.
pub fn remove_old(cfg: &LogConfig, keep_newest: usize) -> Result<usize, LogError> {
    remove_old_except(cfg, keep_newest, &HashSet::new())
}

/// The executor id a log directory entry belongs to: `executor-<id>.log`,
/// `executor-<id>.log.<n>`, `executor-<id>.base`, `executor-<id>.spans` or their
/// temporary files.
fn log_file_executor(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("executor-")?;
    let (id, suffix) = rest.split_once('.')?;
    let known = suffix == "log"
        || suffix == "base"
        || suffix == "base.tmp"
        || suffix == "spans"
        || suffix == "spans.tmp"
        || suffix
            .strip_prefix("log.")
            .is_some_and(|n| n.parse::<u32>().is_ok());
    if known {
        id.parse().ok()
    } else {
        None
    }
}

fn remove_old_except(
    cfg: &LogConfig,
    keep_newest: usize,
    live: &HashSet<u64>,
) -> Result<usize, LogError> {
    let entries = std::fs::read_dir(&cfg.dir).map_err(io_error(&cfg.dir))?;
    let mut logs: HashMap<u64, (SystemTime, Vec<PathBuf>)> = HashMap::new();
    for entry in entries {
        let entry = entry.map_err(io_error(&cfg.dir))?;
        let name = entry.file_name();
        let Some(executor) = name.to_str().and_then(log_file_executor) else {
            continue;
        };
        let modified = entry
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let log = logs
            .entry(executor)
            .or_insert((SystemTime::UNIX_EPOCH, Vec::new()));
        log.0 = log.0.max(modified);
        log.1.push(entry.path());
    }
    let mut by_age: Vec<(SystemTime, u64)> = logs
        .iter()
        .map(|(executor, (modified, _))| (*modified, *executor))
        .collect();
    // Newest first.
    by_age.sort_unstable_by(|a, b| b.cmp(a));
    let mut removed = 0;
    for (_, executor) in by_age.into_iter().skip(keep_newest) {
        if live.contains(&executor) {
            continue;
        }
        let Some((_, files)) = logs.remove(&executor) else {
            continue;
        };
        for path in files {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&path)(e)),
            }
        }
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Bound on every wait in these tests.
    const WAIT: Duration = Duration::from_secs(10);

    async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(WAIT, f)
            .await
            .unwrap_or_else(|_| panic!("{what} did not finish within {WAIT:?}"))
    }

    fn small(dir: &Path, file_bytes_max: u64, files_kept: u32) -> LogConfig {
        LogConfig {
            dir: dir.to_path_buf(),
            file_bytes_max,
            files_kept,
        }
    }

    /// `count` numbered lines of about 50 bytes.
    fn lines(count: usize) -> Vec<u8> {
        (0..count)
            .map(|i| format!("line {i:06} of the executor's output, padded to size\n"))
            .collect::<String>()
            .into_bytes()
    }

    /// Everything from `offset` without following.
    async fn read_all(reader: &mut LogReader, max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(chunk) = within("read", reader.read_chunk(max, false)).await.unwrap() {
            out.extend_from_slice(&chunk);
        }
        out
    }

    fn log_files(dir: &Path, executor: u64) -> Vec<(String, u64)> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter_map(|e| {
                let name = e.file_name().into_string().unwrap();
                name.starts_with(&format!("executor-{executor}.log"))
                    .then(|| (name, e.metadata().unwrap().len()))
            })
            .collect();
        files.sort();
        files
    }

    #[tokio::test]
    async fn rotation_keeps_files_kept_plus_one_files_under_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small(dir.path(), 1000, 2);
        let registry = LogRegistry::new(cfg.clone()).unwrap();
        let sink = registry.open_sink(7).unwrap();
        let input = lines(400);
        within(
            "copy",
            sink.spawn_copy(std::io::Cursor::new(input.clone()), "stderr"),
        )
        .await
        .unwrap();

        let files = log_files(dir.path(), 7);
        let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["executor-7.log", "executor-7.log.1", "executor-7.log.2"]
        );
        let total: u64 = files.iter().map(|(_, len)| len).sum();
        assert!(files.iter().all(|(_, len)| *len <= 1000), "{files:?}");
        assert!(total <= cfg.executor_bytes_max());
        // Whole lines only: every file starts a line and ends one.
        for (name, _) in &files {
            let text = std::fs::read(dir.path().join(name)).unwrap();
            assert!(
                text.starts_with(b"line ") && text.ends_with(b"\n"),
                "{name}"
            );
        }

        // Reading from 0 gives the retained bytes in order, across the rotated files, even
        // in chunks that straddle file boundaries.
        let extent = sink.extent();
        assert_eq!(extent.end, input.len() as u64);
        assert_eq!(extent.end - extent.start, total);
        let mut reader = registry.reader(7, 0).unwrap();
        let read = read_all(&mut reader, 77).await;
        assert_eq!(read.len() as u64, total);
        assert!(input.ends_with(&read));
        assert_eq!(reader.skipped_bytes(), extent.start);
        assert_eq!(reader.position(), extent.end);

        // Once the log is closed, the files give the same bytes at the same offsets.
        drop(sink);
        assert!(!registry.is_live(7));
        assert_eq!(
            registry.extent(7).unwrap(),
            LogExtent {
                live: false,
                ..extent
            }
        );
        let mut reader = registry.reader(7, extent.start + 10).unwrap();
        assert_eq!(
            read_all(&mut reader, 4096).await,
            &input[input.len() - total as usize + 10..]
        );
    }

    #[tokio::test]
    async fn a_line_longer_than_the_cap_is_split_and_no_file_passes_it() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small(dir.path(), 100, 1);
        let sink = LogSink::open(&cfg, 1).unwrap();
        let mut input = vec![b'x'; 250];
        input.push(b'\n');
        input.extend_from_slice(b"short\n");
        within(
            "copy",
            sink.spawn_copy(std::io::Cursor::new(input.clone()), "stdout"),
        )
        .await
        .unwrap();
        let files = log_files(dir.path(), 1);
        assert!(
            files.len() <= 2 && files.iter().all(|(_, len)| *len <= 100),
            "{files:?}"
        );
        let mut reader = sink.reader(0);
        let read = read_all(&mut reader, 1000).await;
        assert!(
            input.ends_with(&read) && read.ends_with(b"x\nshort\n"),
            "{read:?}"
        );
    }

    #[tokio::test]
    async fn long_lines_are_written_in_pieces_and_bytes_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig::new(dir.path());
        let sink = LogSink::open(&cfg, 2).unwrap();
        let mut input = vec![b'y'; 3 * LINE_BYTES_MAX / 2];
        input.extend_from_slice(b"\nafter\n");
        within(
            "copy",
            sink.spawn_copy(std::io::Cursor::new(input.clone()), "stdout"),
        )
        .await
        .unwrap();
        assert_eq!(std::fs::read(cfg.file_path(2, 0)).unwrap(), input);
        let tail = sink.tail_lines();
        assert_eq!(tail.len(), 2);
        assert_eq!(tail[0].len(), TAIL_LINE_BYTES_MAX);
        assert_eq!(tail[1], "after");
    }

    #[tokio::test]
    async fn two_sources_do_not_mix_within_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig::new(dir.path());
        let sink = LogSink::open(&cfg, 3).unwrap();
        // stdout ends without a newline; stderr's line must not be glued onto it.
        within(
            "copy",
            sink.spawn_copy(std::io::Cursor::new(b"out 1\nout 2".to_vec()), "stdout"),
        )
        .await
        .unwrap();
        within(
            "copy",
            sink.spawn_copy(std::io::Cursor::new(b"err 1\n".to_vec()), "stderr"),
        )
        .await
        .unwrap();
        assert_eq!(
            std::fs::read(cfg.file_path(3, 0)).unwrap(),
            b"out 1\nout 2\nerr 1\n"
        );
        assert_eq!(sink.tail_lines(), ["out 1", "out 2", "err 1"]);
    }

    #[tokio::test]
    async fn the_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LogSink::open(&LogConfig::new(dir.path()), 4).unwrap();
        let input: String = (0..50).map(|i| format!("l{i}\r\n")).collect();
        within(
            "copy",
            sink.spawn_copy(std::io::Cursor::new(input.into_bytes()), "stderr"),
        )
        .await
        .unwrap();
        let expected: Vec<String> = (30..50).map(|i| format!("l{i}")).collect();
        assert_eq!(sink.tail_lines(), expected);
    }

    /// Everything a session reader gives without following.
    async fn session_all(registry: &LogRegistry, executor: u64, session: u64) -> Vec<u8> {
        let mut reader = registry.session_reader(executor, session).unwrap();
        let mut out = Vec::new();
        while let Some(chunk) = within("read", reader.read_chunk(4, false)).await.unwrap() {
            out.extend_from_slice(&chunk);
        }
        out
    }

    #[tokio::test]
    async fn a_session_reader_sees_only_what_was_written_for_its_session() {
        let dir = tempfile::tempdir().unwrap();
        // Small files: the spans hold across rotations.
        let registry = LogRegistry::new(small(dir.path(), 16, 20)).unwrap();
        let sink = registry.open_sink(7).unwrap();
        let (mut app, pipe) = tokio::io::duplex(1024);
        let copy = sink.spawn_copy(pipe, "stderr");

        app.write_all(b"launching\n").await.unwrap();
        sink.enter(1).await;
        // A partial line is the session's too: the boundary writes what the pipe holds.
        app.write_all(b"s1 a\ns1 partial").await.unwrap();
        sink.leave().await;
        assert_eq!(sink.tail_lines(), Vec::<String>::new());
        app.write_all(b"idle\n").await.unwrap();
        sink.enter(2).await;
        app.write_all(b"secret of s2\n").await.unwrap();
        sink.settle().await;
        // The tail of failure messages holds the current session's lines only.
        assert_eq!(sink.tail_lines(), vec!["secret of s2".to_string()]);
        sink.leave().await;
        sink.enter(1).await;
        app.write_all(b"s1 b\n").await.unwrap();
        sink.leave().await;
        app.write_all(b"after\n").await.unwrap();
        sink.settle().await;

        let s1 = b"s1 a\ns1 partials1 b\n".to_vec();
        assert_eq!(session_all(&registry, 7, 1).await, s1);
        assert_eq!(
            session_all(&registry, 7, 2).await,
            b"secret of s2\n".to_vec()
        );
        assert_eq!(session_all(&registry, 7, 3).await, Vec::<u8>::new());
        assert_eq!(sink.spans().len(), 3);

        // Once the log is finished, the files say the same.
        drop(app);
        within("copy", copy).await.unwrap();
        drop(sink);
        assert!(!registry.is_live(7));
        assert_eq!(session_all(&registry, 7, 1).await, s1);
        assert_eq!(
            session_all(&registry, 7, 2).await,
            b"secret of s2\n".to_vec()
        );
        // The spans file goes with the log.
        assert!(dir.path().join("executor-7.spans").is_file());
        assert_eq!(log_file_executor("executor-7.spans"), Some(7));
        assert_eq!(registry.remove_old(0).unwrap(), 1);
        assert!(!dir.path().join("executor-7.spans").exists());
    }

    #[tokio::test]
    async fn a_session_follower_ends_when_the_executor_leaves_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let registry = LogRegistry::new(small(dir.path(), 1024, 1)).unwrap();
        let sink = registry.open_sink(8).unwrap();
        let (mut app, pipe) = tokio::io::duplex(1024);
        let _copy = sink.spawn_copy(pipe, "stderr");
        let follow = |session: u64| {
            let mut reader = registry.session_reader(8, session).unwrap();
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Some(chunk) = reader.read_chunk(1024, true).await.unwrap() {
                    got.extend_from_slice(&chunk);
                }
                got
            })
        };
        app.write_all(b"idle before\n").await.unwrap();
        // A follower of a session not entered yet waits for it.
        let later = follow(2);
        sink.enter(1).await;
        app.write_all(b"one\n").await.unwrap();
        let first = follow(1);
        sink.settle().await;
        app.write_all(b"two\n").await.unwrap();
        sink.leave().await;
        app.write_all(b"idle\n").await.unwrap();
        sink.enter(2).await;
        app.write_all(b"other owner\n").await.unwrap();
        // The log is still open: the first follower ended because the executor left.
        assert_eq!(within("follower of 1", first).await.unwrap(), b"one\ntwo\n");
        assert!(!later.is_finished());
        sink.leave().await;
        assert_eq!(
            within("follower of 2", later).await.unwrap(),
            b"other owner\n"
        );
    }

    #[tokio::test]
    async fn follow_wakes_on_new_data_and_ends_when_the_sink_closes() {
        let dir = tempfile::tempdir().unwrap();
        let registry = LogRegistry::new(small(dir.path(), 64, 1)).unwrap();
        let sink = registry.open_sink(5).unwrap();
        let (mut app, pipe) = tokio::io::duplex(1024);
        let copy = sink.spawn_copy(pipe, "stderr");
        let mut reader = registry.reader(5, 0).unwrap();

        app.write_all(b"first\n").await.unwrap();
        let chunk = within("first", reader.read_chunk(1024, true))
            .await
            .unwrap();
        assert_eq!(chunk.as_deref(), Some(&b"first\n"[..]));
        // Nothing more for now: a non-following read ends, a following one waits.
        assert_eq!(
            within("now", reader.read_chunk(1024, false)).await.unwrap(),
            None
        );
        let waiting = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(chunk) = reader.read_chunk(16, true).await.unwrap() {
                got.extend_from_slice(&chunk);
            }
            (got, reader)
        });
        // Enough to rotate a few times under a reader that is following.
        let more: Vec<u8> = (0..6)
            .flat_map(|i| format!("more {i:02} ...\n").into_bytes())
            .collect();
        app.write_all(&more).await.unwrap();
        // A partial line still reaches followers, after PARTIAL_LINE_FLUSH.
        app.write_all(b"prompt> ").await.unwrap();
        drop(app);
        within("copy", copy).await.unwrap();
        assert!(
            !waiting.is_finished(),
            "the follower ended while the sink was open"
        );
        drop(sink);
        let (got, reader) = within("follower end", waiting).await.unwrap();
        let mut all = b"first\n".to_vec();
        all.extend_from_slice(&more);
        all.extend_from_slice(b"prompt> ");
        // Rotation at 64 bytes with one file kept may have dropped some before it was read.
        assert!(all.ends_with(&got) && got.ends_with(b"prompt> "), "{got:?}");
        assert_eq!(reader.position(), all.len() as u64);
        assert_eq!(
            reader.skipped_bytes() + 6 + got.len() as u64,
            all.len() as u64
        );
    }

    #[tokio::test]
    async fn follow_from_the_end_sees_only_new_output() {
        let dir = tempfile::tempdir().unwrap();
        let registry = LogRegistry::new(LogConfig::new(dir.path())).unwrap();
        let sink = registry.open_sink(6).unwrap();
        let (mut app, pipe) = tokio::io::duplex(1024);
        let copy = sink.spawn_copy(pipe, "stderr");
        app.write_all(b"old\n").await.unwrap();
        // Wait for the old line to land, by reading it.
        let mut first = registry.reader(6, 0).unwrap();
        within("old", first.read_chunk(1024, true)).await.unwrap();
        let mut reader = registry.reader(6, u64::MAX).unwrap();
        assert_eq!(
            within("none", reader.read_chunk(1024, false))
                .await
                .unwrap(),
            None
        );
        app.write_all(b"new\n").await.unwrap();
        let chunk = within("new", reader.read_chunk(1024, true)).await.unwrap();
        assert_eq!(chunk.as_deref(), Some(&b"new\n"[..]));
        drop(app);
        within("copy", copy).await.unwrap();
    }

    #[tokio::test]
    async fn a_partial_line_reaches_followers_without_a_newline() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig::new(dir.path());
        let sink = LogSink::open(&cfg, 9).unwrap();
        let (mut app, pipe) = tokio::io::duplex(1024);
        let copy = sink.spawn_copy(pipe, "stdout");
        let mut reader = sink.reader(0);
        app.write_all(b"prompt> ").await.unwrap();
        let chunk = within("partial", reader.read_chunk(1024, true))
            .await
            .unwrap();
        assert_eq!(chunk.as_deref(), Some(&b"prompt> "[..]));
        // The same source finishing its line adds no newline.
        app.write_all(b"answer\n").await.unwrap();
        drop(app);
        within("copy", copy).await.unwrap();
        assert_eq!(
            std::fs::read(cfg.file_path(9, 0)).unwrap(),
            b"prompt> answer\n"
        );
        assert_eq!(sink.tail_lines(), ["prompt> answer"]);
    }

    fn failing_opener(_: &Path) -> io::Result<Box<dyn Write + Send>> {
        struct DiskFull;
        impl Write for DiskFull {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from_raw_os_error(28)) // ENOSPC
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        Ok(Box::new(DiskFull))
    }

    #[tokio::test]
    async fn write_errors_drop_bytes_but_keep_draining() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small(dir.path(), 4096, 1);
        let sink = LogSink::open_with(&cfg, 8, failing_opener).unwrap();
        // A small pipe: the application would block at once if the copy stopped reading.
        let (mut app, pipe) = tokio::io::duplex(256);
        let copy = sink.spawn_copy(pipe, "stderr");
        let input = lines(20_000); // about 1 MiB
        within("the application's writes", app.write_all(&input))
            .await
            .unwrap();
        drop(app);
        within("copy", copy).await.unwrap();
        assert_eq!(sink.dropped_bytes(), input.len() as u64);
        assert_eq!(
            sink.tail_lines().last().map(String::as_str),
            Some("line 019999 of the executor's output, padded to size")
        );
        let mut reader = sink.reader(0);
        assert!(read_all(&mut reader, 1024).await.is_empty());
    }

    #[tokio::test]
    async fn a_failed_rotation_drops_output_instead_of_passing_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small(dir.path(), 100, 1);
        let sink = LogSink::open(&cfg, 10).unwrap();
        // A non-empty directory where `.log` must be renamed to: every rotation fails.
        std::fs::create_dir(cfg.file_path(10, 1)).unwrap();
        std::fs::write(cfg.file_path(10, 1).join("blocker"), b"x").unwrap();
        let input = lines(10);
        within(
            "copy",
            sink.spawn_copy(std::io::Cursor::new(input.clone()), "stderr"),
        )
        .await
        .unwrap();
        let current = std::fs::metadata(cfg.file_path(10, 0)).unwrap().len();
        assert!(current <= 100, "{current}");
        assert_eq!(current + sink.dropped_bytes(), input.len() as u64);
        assert_eq!(sink.tail_lines().len(), 10);
    }

    #[tokio::test]
    async fn remove_old_keeps_the_newest_and_the_live() {
        let dir = tempfile::tempdir().unwrap();
        let registry = LogRegistry::new(small(dir.path(), 100, 1)).unwrap();
        for executor in 1..=4 {
            let sink = registry.open_sink(executor).unwrap();
            within(
                "copy",
                sink.spawn_copy(std::io::Cursor::new(lines(5)), "stderr"),
            )
            .await
            .unwrap();
        }
        // Executor 1 is live again (an unlikely reuse, but it must survive).
        let live = registry.open_sink(1).unwrap();
        std::fs::write(dir.path().join("unrelated.txt"), b"keep").unwrap();
        let removed = registry.remove_old(1).unwrap();
        assert_eq!(removed, 2);
        assert!(registry.extent(1).is_ok());
        assert_eq!((2..=4).filter(|e| registry.extent(*e).is_ok()).count(), 1);
        assert!(dir.path().join("unrelated.txt").exists());
        drop(live);
        assert!(matches!(
            LogReader::open(registry.config(), 99, 0),
            Err(LogError::NotFound(99))
        ));
    }

    #[test]
    fn log_file_names_are_recognised() {
        assert_eq!(log_file_executor("executor-12.log"), Some(12));
        assert_eq!(log_file_executor("executor-12.log.3"), Some(12));
        assert_eq!(log_file_executor("executor-12.base"), Some(12));
        assert_eq!(log_file_executor("executor-12.base.tmp"), Some(12));
        assert_eq!(log_file_executor("executor-12.log.x"), None);
        assert_eq!(log_file_executor("executor-x.log"), None);
        assert_eq!(log_file_executor("other-12.log"), None);
    }

    #[test]
    fn bad_configurations_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            LogRegistry::new(small(dir.path(), 0, 1)),
            Err(LogError::Config(_))
        ));
        assert!(matches!(
            LogSink::open(&small(dir.path(), 10, FILES_KEPT_MAX + 1), 1),
            Err(LogError::Config(_))
        ));
    }
}
