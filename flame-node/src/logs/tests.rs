//! Logs on a temporary folder: rotation, offsets, lines, spans, followers, failures.

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
