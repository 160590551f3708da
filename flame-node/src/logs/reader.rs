//! The reading side of a log: readers that locate an offset across rotated files, follow a
//! live log, and read one session's spans.

use super::*;

/// A reader's hold on a live log: weak, so that it does not keep the log open.
#[derive(Debug)]
pub(super) struct Live {
    pub(super) sink: Weak<Shared>,
    pub(super) written: watch::Receiver<u64>,
}

/// What one blocking read step found.
pub(super) enum Step {
    /// Bytes read from `from`.
    Data { from: u64, bytes: Bytes },
    /// Nothing after `at` for now; `live` says whether more may come.
    End { at: u64, live: bool },
}

/// The file of the segment holding `position` (clamped to the retained range), opened and
/// positioned there.
pub(super) struct Located {
    pub(super) file: File,
    /// The clamped position.
    pub(super) at: u64,
    /// Bytes readable before the segment ends; `None` for the newest segment, which may
    /// grow.
    pub(super) limit: Option<u64>,
}

/// Finds and opens the segment holding `position`; `None` when the log has no bytes at or
/// after it yet.
pub(super) fn locate(
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
pub(super) fn read_step(
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
    pub(super) cfg: LogConfig,
    pub(super) executor: u64,
    /// Set while the log may be live.
    pub(super) live: Option<Live>,
    pub(super) position: u64,
    pub(super) skipped_bytes: u64,
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

    pub(super) fn advance_to(&mut self, at: u64) {
        if at > self.position {
            self.skipped_bytes += at - self.position;
        }
        self.position = at;
    }
}

/// Where a session reader finds the spans: the live sink's, which change, or the spans
/// file of a finished log.
#[derive(Debug)]
pub(super) enum Spans {
    Live(watch::Receiver<Vec<Span>>),
    Finished(Vec<Span>),
}

/// Reads what an executor wrote while bound to one session: the ranges of that session's
/// spans, in order, and nothing else (see the module docs).
#[derive(Debug)]
pub struct SessionReader {
    pub(super) reader: LogReader,
    pub(super) session: u64,
    pub(super) spans: Spans,
    /// The offset of the next byte to read.
    pub(super) position: u64,
}

impl SessionReader {
    /// This session's spans as they are now.
    pub(super) fn mine(&self) -> Vec<Span> {
        let all = match &self.spans {
            Spans::Live(rx) => rx.borrow().clone(),
            Spans::Finished(spans) => spans.clone(),
        };
        all.into_iter()
            .filter(|s| s.session == self.session)
            .collect()
    }

    /// Waits until the spans change; false when they never will again (the log closed).
    pub(super) async fn spans_changed(spans: &mut Spans) -> bool {
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
