//! Where `flame run` reads its inputs: a stream of framed inputs (lines, NUL-separated, or
//! length-prefixed) from a file or stdin, or one input per file of a folder.
//!
//! A plain thread reads a few chunks ahead ([`limits::RUN_READ_AHEAD_CHUNKS`]) and waits
//! for the run to take them, so memory stays bounded whatever the input's size. It is not
//! a runtime's blocking task: a read from a terminal may never return, and must not keep
//! the process from exiting.

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use clap::ValueEnum;
use flame_client::report::{group, HintExt as _};
use flame_protocol::limits;
use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, IsTerminal as _, Read};
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;

/// Bytes of one input, at most: inputs larger than the client's inline bound travel as
/// objects, so this is well above the head's inline task input limit.
pub const INPUT_BYTES_MAX: u64 = 1024 * 1024 * 1024;

/// Files of an `--input-dir`, at most: their names are listed and sorted up front.
pub const INPUT_FILES_MAX: usize = 1_000_000;

/// Most inputs in one chunk handed from the reading thread.
const CHUNK_INPUTS_MAX: usize = 1_024;

/// Bytes of inputs after which a chunk is handed on (a single larger input still passes).
const CHUNK_BYTES_TARGET: usize = 1024 * 1024;

/// Read buffer of a stream of inputs.
const READ_BUFFER_BYTES: usize = 64 * 1024;

/// How inputs are told apart in a stream, and outputs on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Framing {
    /// One input per line; the newline is not part of it (a `\r` before it is). Each
    /// output is printed followed by a newline, unless it ends with one.
    Lines,
    /// Inputs separated by NUL bytes (as `find -print0` writes); each output is printed
    /// followed by a NUL.
    Nul,
    /// Each input is its length as 4 bytes, unsigned little-endian, then that many bytes;
    /// each output is printed the same way. Any bytes at all, newlines and NULs included.
    Length,
}

impl Framing {
    /// What one input is called in messages.
    fn unit(self) -> &'static str {
        match self {
            Framing::Lines => "line",
            Framing::Nul | Framing::Length => "input",
        }
    }
}

/// One input, in input order.
#[derive(Debug, Clone)]
pub struct Input {
    pub bytes: Bytes,
    /// The file it came from, with `--input-dir`; its output file takes the same name.
    pub file: Option<OsString>,
}

/// What the reading thread hands on: inputs in order, or why reading stopped.
pub type Chunk = anyhow::Result<Vec<Input>>;

/// Where the inputs come from.
#[derive(Debug)]
pub enum Source {
    /// A stream of framed inputs.
    Stream {
        /// For messages: the path, or `stdin`.
        name: String,
        reader: StreamReader,
        framing: Framing,
    },
    /// One input per file, in the order of their names.
    Dir { dir: PathBuf, files: Vec<OsString> },
}

/// The reader under a [`Source::Stream`].
#[derive(Debug)]
pub enum StreamReader {
    Stdin,
    File(std::fs::File),
}

impl Source {
    /// A stream of inputs: the file at `path`, or stdin for `None` or `-`.
    pub fn stream(path: Option<&Path>, framing: Framing) -> anyhow::Result<Self> {
        let Some(path) = path.filter(|p| *p != Path::new("-")) else {
            return Ok(Source::Stream {
                name: "stdin".to_string(),
                reader: StreamReader::Stdin,
                framing,
            });
        };
        let name = path.display().to_string();
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open {name}"))
            .hint(
                "give a file of inputs, `-` for stdin, or --input-dir DIR for one file per input",
            )?;
        let meta = file
            .metadata()
            .with_context(|| format!("cannot read the metadata of {name}"))?;
        if meta.is_dir() {
            return Err(anyhow!("{name} is a directory, not a file of inputs")).hint(format!(
                "--input-dir {name} makes each of its files an input"
            ));
        }
        Ok(Source::Stream {
            name,
            reader: StreamReader::File(file),
            framing,
        })
    }

    /// Every regular file of `dir`, sorted by name; anything else in it is an error, so
    /// that no input is skipped silently.
    pub fn dir(dir: &Path) -> anyhow::Result<Self> {
        let name = dir.display();
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read the folder {name}"))
            .hint("--input-dir takes a folder holding one file per input")?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot read the folder {name}"))?;
            let path = entry.path();
            // Followed: a link to a file is an input like the file.
            let meta = std::fs::metadata(&path)
                .with_context(|| format!("cannot read the metadata of {}", path.display()))?;
            if !meta.is_file() {
                return Err(anyhow!("{} is not a regular file", path.display()))
                    .hint("every entry of --input-dir is an input: move the others out");
            }
            if meta.len() > INPUT_BYTES_MAX {
                bail!(
                    "{} holds {} bytes, more than the {} an input may",
                    path.display(),
                    group(meta.len()),
                    group(INPUT_BYTES_MAX)
                );
            }
            if files.len() >= INPUT_FILES_MAX {
                bail!(
                    "{name} holds more than {} files, the most --input-dir takes",
                    group(INPUT_FILES_MAX as u64)
                );
            }
            files.push(entry.file_name());
        }
        files.sort();
        Ok(Source::Dir {
            dir: dir.to_path_buf(),
            files,
        })
    }

    /// What input number `n` (from 1) is called in messages, e.g. `line 3`.
    pub fn describe(&self) -> Describe {
        match self {
            Source::Stream { framing, .. } => Describe::Numbered(framing.unit()),
            Source::Dir { .. } => Describe::File,
        }
    }
}

/// How an input is named in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Describe {
    /// `line N` or `input N`, with the input quoted.
    Numbered(&'static str),
    /// `file NAME`.
    File,
}

/// Starts the thread that reads `source` and hands its inputs on in chunks.
pub fn spawn_reader(source: Source) -> anyhow::Result<mpsc::Receiver<Chunk>> {
    let (tx, rx) = mpsc::channel(limits::RUN_READ_AHEAD_CHUNKS);
    std::thread::Builder::new()
        .name("flame-run-reader".to_string())
        .spawn(move || match source {
            Source::Stream {
                name,
                reader,
                framing,
            } => {
                let reader: Box<dyn Read + Send> = match reader {
                    StreamReader::Stdin => {
                        if io::stdin().is_terminal() {
                            eprintln!(
                                "flame: reading inputs from the terminal; end them with Ctrl-D"
                            );
                        }
                        Box::new(io::stdin())
                    }
                    StreamReader::File(file) => Box::new(file),
                };
                let reader = BufReader::with_capacity(READ_BUFFER_BYTES, reader);
                read_stream(reader, framing, &name, &tx);
            }
            Source::Dir { dir, files } => read_dir_files(&dir, files, &tx),
        })
        .context("cannot start the thread that reads the inputs")?;
    Ok(rx)
}

/// Collects inputs into chunks: hands one on when it is full, or when `flush` says the
/// next read may wait. Returns `false` once nobody listens.
#[derive(Debug)]
struct Chunker<'a> {
    tx: &'a mpsc::Sender<Chunk>,
    chunk: Vec<Input>,
    bytes: usize,
}

impl Chunker<'_> {
    fn push(&mut self, input: Input, flush: bool) -> bool {
        self.bytes += input.bytes.len();
        self.chunk.push(input);
        if flush || self.chunk.len() >= CHUNK_INPUTS_MAX || self.bytes >= CHUNK_BYTES_TARGET {
            self.bytes = 0;
            return self
                .tx
                .blocking_send(Ok(std::mem::take(&mut self.chunk)))
                .is_ok();
        }
        true
    }

    /// Hands on what is left, then `error` if any.
    fn end(self, error: Option<anyhow::Error>) {
        if !self.chunk.is_empty() && self.tx.blocking_send(Ok(self.chunk)).is_err() {
            return;
        }
        if let Some(e) = error {
            let _ = self.tx.blocking_send(Err(e));
        }
    }
}

/// Reads framed inputs from `reader` until its end, an error, or until nobody listens.
fn read_stream<R: Read>(
    mut reader: BufReader<R>,
    framing: Framing,
    name: &str,
    tx: &mpsc::Sender<Chunk>,
) {
    let mut chunker = Chunker {
        tx,
        chunk: Vec::new(),
        bytes: 0,
    };
    let mut number: u64 = 0;
    loop {
        number += 1;
        let read = read_framed(&mut reader, framing, INPUT_BYTES_MAX);
        let bytes = match read {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return chunker.end(None),
            Err(e) => {
                let e = anyhow::Error::new(e)
                    .context(format!("cannot read {} {number} of {name}", framing.unit()));
                return chunker.end(Some(e));
            }
        };
        // Handed on when the next read may wait (a pipe, a terminal), so that slow input
        // does not hold back the inputs already read.
        let flush = reader.buffer().is_empty();
        let input = Input {
            bytes: Bytes::from(bytes),
            file: None,
        };
        if !chunker.push(input, flush) {
            return;
        }
    }
}

/// Reads each file of `files` in `dir` as one input.
fn read_dir_files(dir: &Path, files: Vec<OsString>, tx: &mpsc::Sender<Chunk>) {
    let mut chunker = Chunker {
        tx,
        chunk: Vec::new(),
        bytes: 0,
    };
    for file in files {
        let path = dir.join(&file);
        match read_bounded_file(&path, INPUT_BYTES_MAX) {
            Ok(bytes) => {
                let input = Input {
                    bytes: Bytes::from(bytes),
                    file: Some(file),
                };
                if !chunker.push(input, false) {
                    return;
                }
            }
            Err(e) => return chunker.end(Some(e)),
        }
    }
    chunker.end(None);
}

/// The bytes of the file at `path`, failing when it holds more than `max`.
pub fn read_bounded_file(path: &Path, max: u64) -> anyhow::Result<Vec<u8>> {
    let name = path.display();
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {name}"))?;
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {name}"))?;
    if bytes.len() as u64 > max {
        bail!(
            "{name} holds more than {} bytes, the most it may",
            group(max)
        );
    }
    Ok(bytes)
}

/// Reads the next input of `reader`; `None` at the end of the stream. An input over `max`
/// bytes, or a stream that ends inside a length-prefixed input, is an error.
pub fn read_framed<R: BufRead>(
    reader: &mut R,
    framing: Framing,
    max: u64,
) -> io::Result<Option<Vec<u8>>> {
    match framing {
        Framing::Lines => read_until(reader, b'\n', max),
        Framing::Nul => read_until(reader, 0, max),
        Framing::Length => read_length_prefixed(reader, max),
    }
}

/// Reads up to the next `separator` (dropped), never holding more than `max` bytes. The
/// last input needs no separator after it.
fn read_until<R: BufRead>(reader: &mut R, separator: u8, max: u64) -> io::Result<Option<Vec<u8>>> {
    let mut input = Vec::new();
    let mut started = false;
    loop {
        let buf = match reader.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(started.then_some(input));
        }
        started = true;
        let end = buf.iter().position(|&b| b == separator);
        let take = end.unwrap_or(buf.len());
        if (input.len() + take) as u64 > max {
            return Err(too_long(max));
        }
        input.extend_from_slice(&buf[..take]);
        reader.consume(take + usize::from(end.is_some()));
        if end.is_some() {
            return Ok(Some(input));
        }
    }
}

/// Reads a 4-byte little-endian length and that many bytes, checking the length against
/// `max` before allocating.
fn read_length_prefixed<R: BufRead>(reader: &mut R, max: u64) -> io::Result<Option<Vec<u8>>> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < prefix.len() {
        match reader.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the stream ends inside a length prefix ({got} of 4 bytes)"),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = u64::from(u32::from_le_bytes(prefix));
    if len > max {
        return Err(too_long(max));
    }
    let mut input = Vec::new();
    let read = reader.take(len).read_to_end(&mut input)?;
    if read as u64 != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the stream ends inside an input: {read} of its {len} bytes"),
        ));
    }
    Ok(Some(input))
}

fn too_long(max: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "longer than {} bytes, the most an input may hold",
            group(max)
        ),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn all(input: &[u8], framing: Framing, max: u64) -> io::Result<Vec<Vec<u8>>> {
        // A tiny buffer, so that inputs straddle reads.
        let mut reader = BufReader::with_capacity(3, input);
        let mut out = Vec::new();
        while let Some(one) = read_framed(&mut reader, framing, max)? {
            out.push(one);
        }
        Ok(out)
    }

    #[test]
    fn lines_split_on_newlines_only() {
        assert!(all(b"", Framing::Lines, 10).unwrap().is_empty());
        assert_eq!(all(b"\n", Framing::Lines, 10).unwrap(), vec![b"".to_vec()]);
        assert_eq!(
            all(b"ab\r\n\0x\n\nlast", Framing::Lines, 10).unwrap(),
            vec![
                b"ab\r".to_vec(),
                b"\0x".to_vec(),
                b"".to_vec(),
                b"last".to_vec()
            ]
        );
        assert!(all(b"0123456789\n01234567890\n", Framing::Lines, 10).is_err());
    }

    #[test]
    fn nul_framing_keeps_newlines() {
        assert_eq!(
            all(b"a\nb\0c\0", Framing::Nul, 10).unwrap(),
            vec![b"a\nb".to_vec(), b"c".to_vec()]
        );
    }

    #[test]
    fn length_framing_takes_any_bytes_and_refuses_short_or_long_ones() {
        let mut stream = Vec::new();
        for input in [&b"a\nb\0"[..], b"", b"xyz"] {
            stream.extend((input.len() as u32).to_le_bytes());
            stream.extend(input);
        }
        assert_eq!(
            all(&stream, Framing::Length, 10).unwrap(),
            vec![b"a\nb\0".to_vec(), b"".to_vec(), b"xyz".to_vec()]
        );
        // Cut inside the last input, and inside a prefix.
        assert!(all(&stream[..stream.len() - 1], Framing::Length, 10).is_err());
        assert!(all(&[1, 0], Framing::Length, 10).is_err());
        // Over the bound: refused before anything is allocated.
        assert!(all(&u32::MAX.to_le_bytes(), Framing::Length, 10).is_err());
    }

    #[test]
    fn a_folder_gives_its_files_in_name_order_and_refuses_others() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("b"), b"2").unwrap();
        std::fs::write(dir.path().join("a"), b"1").unwrap();
        let source = Source::dir(dir.path()).unwrap();
        let Source::Dir { files, .. } = &source else {
            panic!("{source:?}");
        };
        assert_eq!(files, &[OsString::from("a"), OsString::from("b")]);
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        assert!(Source::dir(dir.path()).is_err());
    }
}
