//! The writing side of a log: the copy tasks that take an executor's pipes line by line,
//! rotation, the tail kept for failure messages, and session spans.

use super::*;

/// A sink's mutable state, behind its mutex. Rotation and the readers' lookups of file
/// names take the same lock, so a name always means the segment the reader computed.
pub(super) struct SinkState {
    /// Oldest first; the last is the current file. Never empty.
    pub(super) segments: VecDeque<Segment>,
    /// The current file; `None` after it could not be opened (retried on the next write).
    pub(super) file: Option<Box<dyn Write + Send>>,
    pub(super) opener: Opener,
    /// The source whose last write ended mid-line, if any.
    pub(super) mid_line: Option<u32>,
    pub(super) dropped_bytes: u64,
    pub(super) warned: bool,
}

impl SinkState {
    pub(super) fn end(&self) -> u64 {
        self.segments.back().map_or(0, Segment::end)
    }

    /// Writes one source's bytes, rotating at the cap.
    pub(super) fn write(&mut self, cfg: &LogConfig, executor: u64, source: u32, data: &[u8]) {
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
    pub(super) fn write_capped(&mut self, cfg: &LogConfig, executor: u64, data: &[u8]) {
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
    pub(super) fn write_raw(&mut self, cfg: &LogConfig, executor: u64, mut data: &[u8]) {
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

    pub(super) fn drop_bytes(
        &mut self,
        cfg: &LogConfig,
        executor: u64,
        len: usize,
        error: &io::Error,
    ) {
        self.dropped_bytes += len as u64;
        self.warn_once(cfg, executor, error);
    }

    pub(super) fn warn_once(&mut self, cfg: &LogConfig, executor: u64, error: &io::Error) {
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
    pub(super) fn rotate(&mut self, cfg: &LogConfig, executor: u64) -> bool {
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
    pub(super) fn resync(&mut self, cfg: &LogConfig, executor: u64) {
        let end = self.end();
        self.segments = segments_on_disk(cfg, executor)
            .unwrap_or_else(|_| VecDeque::from([Segment { start: end, len: 0 }]));
        self.file = (self.opener)(&cfg.file_path(executor, 0)).ok();
    }
}

/// What a sink's clones, copy tasks and weak registry entries share.
pub(super) struct Shared {
    pub(super) executor: u64,
    pub(super) cfg: LogConfig,
    pub(super) state: Mutex<SinkState>,
    pub(super) tail: Mutex<VecDeque<String>>,
    /// The logical end after each write; followers wait on it. Dropped with the sink, which
    /// tells them the log is closed.
    pub(super) written: watch::Sender<u64>,
    /// Ids for copy tasks, so that the mid-line newline knows who wrote last.
    pub(super) next_source: AtomicU32,
    /// The session spans; session readers wait on it. Changed under the state lock, so a
    /// byte at or past a recorded end was written after the end was published.
    pub(super) spans: watch::Sender<Vec<Span>>,
    /// One channel per copy task, on which [`LogSink::settle`] asks it to write what its
    /// pipe holds now and to say when it has.
    pub(super) flushers: Mutex<Vec<mpsc::Sender<oneshot::Sender<()>>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("executor", &self.executor)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// Writes on the blocking pool; a write that cannot be run counts as dropped.
    pub(super) async fn write(self: &Arc<Self>, source: u32, data: Vec<u8>) {
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
    pub(super) fn mark(&self, session: Option<u64>) {
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

    pub(super) fn push_tail(&self, lines: impl IntoIterator<Item = String>) {
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
pub(super) struct TailLine {
    pub(super) line: Vec<u8>,
}

impl TailLine {
    pub(super) fn feed(&mut self, shared: &Shared, data: &[u8]) {
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
    pub(super) fn flush(&mut self, shared: &Shared) {
        if !self.line.is_empty() {
            shared.push_tail([self.take()]);
        }
    }

    pub(super) fn take(&mut self) -> String {
        let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
        let text = String::from_utf8_lossy(line).into_owned();
        self.line.clear();
        text
    }
}

/// What a copy task does next.
pub(super) enum Next {
    Read(io::Result<usize>),
    /// Write what the pipe holds now, then answer.
    Flush(oneshot::Sender<()>),
    /// A partial line waited [`PARTIAL_LINE_FLUSH`] without more output.
    Quiet,
}

/// Copies one source into the sink until it ends; see the module docs for the line rules.
pub(super) async fn copy<R: AsyncRead + Unpin>(
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
pub(super) async fn take_lines(
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
    pub(super) shared: Arc<Shared>,
}

impl LogSink {
    /// Opens (creating `cfg.dir` if needed) the log of `executor`, appending to any files it
    /// already has. The sink is not registered: use [`LogRegistry::open_sink`] for logs that
    /// readers should find.
    pub fn open(cfg: &LogConfig, executor: u64) -> Result<Self, LogError> {
        Self::open_with(cfg, executor, open_for_append)
    }

    pub(super) fn open_with(
        cfg: &LogConfig,
        executor: u64,
        opener: Opener,
    ) -> Result<Self, LogError> {
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

    pub(super) async fn mark(&self, session: Option<u64>) {
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
