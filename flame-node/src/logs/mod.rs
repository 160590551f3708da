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

mod files;
mod reader;
mod sink;
#[cfg(test)]
mod tests;

use files::*;
use reader::*;
pub use reader::{LogReader, SessionReader};
pub use sink::LogSink;
use sink::*;

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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a log lock leaves at worst a miscounted length; keep going.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
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
