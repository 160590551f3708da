//! A log's files on disk: its rotated segments, the base offset and the session spans kept
//! beside them, and the removal of old executors' logs.

use super::*;

/// One file of a log: where it starts in the stream and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Segment {
    pub(super) start: u64,
    pub(super) len: u64,
}

impl Segment {
    pub(super) fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// The rotated number (0: current) of segment `index` of `count`, oldest first.
pub(super) fn rotated_number(count: usize, index: usize) -> u32 {
    u32::try_from(count - 1 - index).unwrap_or(u32::MAX)
}

/// The segments of an executor's log on disk, oldest first; `NotFound` when it has no
/// files at all.
pub(super) fn segments_on_disk(
    cfg: &LogConfig,
    executor: u64,
) -> Result<VecDeque<Segment>, LogError> {
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
pub(super) fn read_base(cfg: &LogConfig, executor: u64) -> u64 {
    std::fs::read_to_string(cfg.base_path(executor))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// Records the offset of the oldest retained byte, atomically (write, then rename).
pub(super) fn write_base(cfg: &LogConfig, executor: u64, base: u64) -> io::Result<()> {
    let path = cfg.base_path(executor);
    let tmp = path.with_extension("base.tmp");
    std::fs::write(&tmp, format!("{base}\n"))?;
    std::fs::rename(&tmp, &path)
}

/// The spans recorded for a log; none when it has no spans file. A file that cannot be
/// read or parsed gives none (and a warning): nothing of that log is then shown to anyone.
pub(super) fn read_spans(cfg: &LogConfig, executor: u64) -> Vec<Span> {
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
pub(super) fn write_spans(cfg: &LogConfig, executor: u64, spans: &[Span]) -> io::Result<()> {
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
pub(super) type Opener = fn(&Path) -> io::Result<Box<dyn Write + Send>>;

pub(super) fn open_for_append(path: &Path) -> io::Result<Box<dyn Write + Send>> {
    Ok(Box::new(
        OpenOptions::new().create(true).append(true).open(path)?,
    ))
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
pub(super) fn log_file_executor(name: &str) -> Option<u64> {
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

pub(super) fn remove_old_except(
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
