//! The contract of `flame-shell`, the built-in application that runs a command per task
//! (`flame submit --each`, the role of Flame's `flmexec`).
//!
//! A session of the [`APPLICATION`] carries a [`ShellCommand`] as its common data; each
//! task's input is one line of the user's file, without its newline. For each task the
//! runner builds the argument vector with [`ShellCommand::argv_for`] (every [`PLACEHOLDER`]
//! in every argument replaced by the line), executes `argv[0]` directly (no shell), writes
//! the line and a newline to the command's stdin, and answers with a [`ShellOutput`]: how
//! the command ended and what it printed, whatever its exit code. A non-zero exit is a
//! result for the user, not a failed task.
//!
//! Both values are encoded as `version:varint || postcard body`, so an incompatible peer
//! is told which version it met instead of seeing garbage ([`ShellError::Version`]). The
//! decoders check the length before decoding and never panic on any input.
//!
//! Both ends use this module, so the meaning of `{}` and the bounds cannot drift apart.

use crate::limits::TASK_INPUT_BYTES_MAX;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::fmt;

/// The name under which the head registers `flame-shell`.
pub const APPLICATION: &str = "shell";

/// Memory limit of each executor of the built-in [`APPLICATION`] as the head registers
/// it: a line's command is never without one. An admin raises it by registering
/// `shell` again with more (`flame app register`).
pub const MEMORY_DEFAULT_BYTES: u64 = 1 << 30;

/// Version of the encoding of [`ShellCommand`] and [`ShellOutput`].
pub const FORMAT_VERSION: u32 = 1;

/// Stands for the task's line in the arguments of a [`ShellCommand`].
pub const PLACEHOLDER: &str = "{}";

/// Most entries in a command's argument vector, program included.
pub const ARGV_ENTRIES_MAX: usize = 4_096;

/// Largest encoded [`ShellCommand`]. Linux refuses an `execve` whose arguments and
/// environment pass a few MiB anyway; this bound is checked before decoding.
pub const COMMAND_BYTES_MAX: usize = 1024 * 1024;

/// Bytes kept free in a task output for the encoding around the captured output (version,
/// exit status, two length prefixes, the truncation flag), with room to spare.
pub const OUTPUT_HEADROOM_BYTES: usize = 64 * 1024;

/// Most bytes of stdout and stderr, together, that the runner captures per task; the rest
/// is read and dropped, and [`ShellOutput::truncated`] is set.
pub const CAPTURE_BYTES_MAX: usize = TASK_INPUT_BYTES_MAX - OUTPUT_HEADROOM_BYTES;

/// Largest encoded [`ShellOutput`]: a task output the head accepts by default.
pub const OUTPUT_BYTES_MAX: usize = TASK_INPUT_BYTES_MAX;

/// Exit code the runner reports when the program is not found, as a shell does.
pub const EXIT_NOT_FOUND: i32 = 127;

/// Exit code the runner reports when the program is found but cannot be started (not
/// executable, bad arguments), as a shell does.
pub const EXIT_CANNOT_EXECUTE: i32 = 126;

/// Why a shell command or output was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShellError {
    /// The encoded value is over its bound.
    #[error("{what} of {len} bytes is over the limit of {max} bytes")]
    TooLarge {
        /// `"shell command"` or `"shell output"`.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The value was encoded by a peer speaking another version of this format.
    #[error("{what} is in format version {found}, this program speaks version {FORMAT_VERSION}: flame-shell and flame are from different releases")]
    Version {
        /// `"shell command"` or `"shell output"`.
        what: &'static str,
        /// The version found.
        found: u32,
    },
    /// The bytes are not a value of this format.
    #[error("{what} is malformed: {detail}")]
    Malformed {
        /// `"shell command"` or `"shell output"`.
        what: &'static str,
        /// What the decoder said.
        detail: String,
    },
    /// The command has no program.
    #[error("the command is empty")]
    EmptyCommand,
    /// The command has more than [`ARGV_ENTRIES_MAX`] entries.
    #[error("the command has {count} arguments, more than the {ARGV_ENTRIES_MAX} allowed")]
    TooManyArguments {
        /// Entries in the argument vector.
        count: usize,
    },
    /// An argument holds a NUL byte, which no program can be given.
    #[error("argument {index} of the command holds a NUL byte")]
    NulInArgument {
        /// Index in the argument vector (0 is the program).
        index: usize,
    },
}

const COMMAND: &str = "shell command";
const OUTPUT: &str = "shell output";

/// The command a task array runs: the session's common data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShellCommand {
    /// The program and its arguments; [`PLACEHOLDER`] stands for the task's line. The
    /// program is looked up in the executor's `PATH` when it has no `/`.
    argv: Vec<String>,
}

impl ShellCommand {
    /// A command of `argv` as given. Refuses an empty vector, one over
    /// [`ARGV_ENTRIES_MAX`] and arguments holding NUL bytes.
    pub fn new(argv: Vec<String>) -> Result<Self, ShellError> {
        let command = ShellCommand { argv };
        command.check()?;
        Ok(command)
    }

    /// Like [`ShellCommand::new`], but when no argument holds a [`PLACEHOLDER`], appends
    /// one, so that the line becomes the last argument (as GNU parallel does).
    pub fn with_line_appended(mut argv: Vec<String>) -> Result<Self, ShellError> {
        if !argv.iter().any(|a| a.contains(PLACEHOLDER)) {
            argv.push(PLACEHOLDER.to_owned());
        }
        Self::new(argv)
    }

    /// The program and its arguments, placeholders unreplaced.
    pub fn argv(&self) -> &[String] {
        &self.argv
    }

    /// The argument vector for one line: every [`PLACEHOLDER`] in every entry replaced by
    /// `line`. The line is bytes, so an argument may not be UTF-8; a line with a NUL byte
    /// makes an argument no program can be given, which the runner reports as the task's
    /// failure to start.
    pub fn argv_for(&self, line: &[u8]) -> Vec<Vec<u8>> {
        self.argv.iter().map(|arg| substitute(arg, line)).collect()
    }

    /// Encodes the command, checking it first.
    pub fn encode(&self) -> Result<Vec<u8>, ShellError> {
        self.check()?;
        let bytes = encode(COMMAND, self)?;
        if bytes.len() > COMMAND_BYTES_MAX {
            return Err(ShellError::TooLarge {
                what: COMMAND,
                len: bytes.len(),
                max: COMMAND_BYTES_MAX,
            });
        }
        Ok(bytes)
    }

    /// Decodes and checks a command.
    pub fn decode(bytes: &[u8]) -> Result<Self, ShellError> {
        let command: ShellCommand = decode(COMMAND, bytes, COMMAND_BYTES_MAX)?;
        command.check()?;
        Ok(command)
    }

    fn check(&self) -> Result<(), ShellError> {
        if self.argv.is_empty() {
            return Err(ShellError::EmptyCommand);
        }
        if self.argv.len() > ARGV_ENTRIES_MAX {
            return Err(ShellError::TooManyArguments {
                count: self.argv.len(),
            });
        }
        if let Some(index) = self.argv.iter().position(|a| a.contains('\0')) {
            return Err(ShellError::NulInArgument { index });
        }
        Ok(())
    }
}

/// `arg` with every [`PLACEHOLDER`] replaced by `line`.
pub fn substitute(arg: &str, line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(arg.len() + line.len());
    let mut pieces = arg.split(PLACEHOLDER);
    if let Some(first) = pieces.next() {
        out.extend_from_slice(first.as_bytes());
    }
    for piece in pieces {
        out.extend_from_slice(line);
        out.extend_from_slice(piece.as_bytes());
    }
    out
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShellExit {
    /// It exited with this code (0 is success). The runner uses [`EXIT_NOT_FOUND`] and
    /// [`EXIT_CANNOT_EXECUTE`] for a command it could not start.
    Code(i32),
    /// A signal ended it.
    Signal(i32),
}

impl ShellExit {
    /// Exited with code 0.
    pub fn success(self) -> bool {
        self == ShellExit::Code(0)
    }
}

impl fmt::Display for ShellExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ShellExit::Code(code) => write!(f, "exit code {code}"),
            ShellExit::Signal(signal) => match signal_name(signal) {
                Some(name) => write!(f, "signal {signal} ({name})"),
                None => write!(f, "signal {signal}"),
            },
        }
    }
}

/// The usual name of a Linux signal number, for messages.
fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        _ => return None,
    })
}

/// What one task's command did: its output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShellOutput {
    /// How the command ended.
    pub exit: ShellExit,
    /// What it wrote to stdout, at most [`CAPTURE_BYTES_MAX`] bytes with `stderr`.
    pub stdout: Bytes,
    /// What it wrote to stderr (and, for a command that could not start, why).
    pub stderr: Bytes,
    /// Some output was dropped to stay within [`CAPTURE_BYTES_MAX`].
    pub truncated: bool,
}

impl ShellOutput {
    /// Exited with code 0 and nothing was dropped.
    pub fn success(&self) -> bool {
        self.exit.success() && !self.truncated
    }

    /// Encodes the output. Fails only when the captured bytes are over
    /// [`OUTPUT_BYTES_MAX`], which a runner within [`CAPTURE_BYTES_MAX`] never is.
    pub fn encode(&self) -> Result<Vec<u8>, ShellError> {
        let bytes = encode(OUTPUT, self)?;
        if bytes.len() > OUTPUT_BYTES_MAX {
            return Err(ShellError::TooLarge {
                what: OUTPUT,
                len: bytes.len(),
                max: OUTPUT_BYTES_MAX,
            });
        }
        Ok(bytes)
    }

    /// Decodes an output.
    pub fn decode(bytes: &[u8]) -> Result<Self, ShellError> {
        decode(OUTPUT, bytes, OUTPUT_BYTES_MAX)
    }
}

fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, ShellError> {
    postcard::to_allocvec(&(FORMAT_VERSION, value)).map_err(|e| ShellError::Malformed {
        what,
        detail: e.to_string(),
    })
}

fn decode<T: for<'de> Deserialize<'de>>(
    what: &'static str,
    bytes: &[u8],
    max: usize,
) -> Result<T, ShellError> {
    if bytes.len() > max {
        return Err(ShellError::TooLarge {
            what,
            len: bytes.len(),
            max,
        });
    }
    let malformed = |e: postcard::Error| ShellError::Malformed {
        what,
        detail: e.to_string(),
    };
    // The version first, so that a value from another release is named as such.
    let (found, body) = postcard::take_from_bytes::<u32>(bytes).map_err(malformed)?;
    if found != FORMAT_VERSION {
        return Err(ShellError::Version { what, found });
    }
    let (value, rest) = postcard::take_from_bytes::<T>(body).map_err(malformed)?;
    if !rest.is_empty() {
        return Err(ShellError::Malformed {
            what,
            detail: format!("{} bytes after the end", rest.len()),
        });
    }
    Ok(value)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    #[test]
    fn placeholders_are_replaced_everywhere() {
        let c = ShellCommand::new(argv(&["sh", "-c", "echo {}-{}", "{}"])).unwrap();
        assert_eq!(
            c.argv_for(b"x\xff"),
            vec![
                b"sh".to_vec(),
                b"-c".to_vec(),
                b"echo x\xff-x\xff".to_vec(),
                b"x\xff".to_vec()
            ]
        );
        assert_eq!(substitute("{}", b""), b"");
        assert_eq!(substitute("{{}}", b"a"), b"{a}");
        assert_eq!(substitute("none", b"a"), b"none");
    }

    #[test]
    fn the_line_is_appended_only_without_a_placeholder() {
        let c = ShellCommand::with_line_appended(argv(&["echo", "hi"])).unwrap();
        assert_eq!(c.argv(), argv(&["echo", "hi", "{}"]));
        let c = ShellCommand::with_line_appended(argv(&["echo", "a{}b"])).unwrap();
        assert_eq!(c.argv(), argv(&["echo", "a{}b"]));
    }

    #[test]
    fn bad_commands_are_refused() {
        assert_eq!(ShellCommand::new(vec![]), Err(ShellError::EmptyCommand));
        assert_eq!(
            ShellCommand::new(argv(&["echo", "a\0b"])),
            Err(ShellError::NulInArgument { index: 1 })
        );
        assert_eq!(
            ShellCommand::new(vec!["x".to_owned(); ARGV_ENTRIES_MAX + 1]),
            Err(ShellError::TooManyArguments {
                count: ARGV_ENTRIES_MAX + 1
            })
        );
        let huge = ShellCommand {
            argv: vec!["x".repeat(COMMAND_BYTES_MAX)],
        };
        assert!(matches!(
            huge.encode(),
            Err(ShellError::TooLarge { what: COMMAND, .. })
        ));
        // A decoded command is checked like a new one.
        let empty = encode(COMMAND, &ShellCommand { argv: vec![] }).unwrap();
        assert_eq!(ShellCommand::decode(&empty), Err(ShellError::EmptyCommand));
    }

    #[test]
    fn versions_and_trailing_bytes_are_checked() {
        let c = ShellCommand::new(argv(&["true"])).unwrap();
        let mut bytes = c.encode().unwrap();
        assert_eq!(ShellCommand::decode(&bytes).unwrap(), c);
        bytes.push(0);
        assert!(matches!(
            ShellCommand::decode(&bytes),
            Err(ShellError::Malformed { .. })
        ));
        let other = postcard::to_allocvec(&(FORMAT_VERSION + 1, &c)).unwrap();
        assert_eq!(
            ShellCommand::decode(&other),
            Err(ShellError::Version {
                what: COMMAND,
                found: FORMAT_VERSION + 1
            })
        );
        assert!(ShellOutput::decode(&[]).is_err());
        assert!(matches!(
            ShellOutput::decode(&vec![0u8; OUTPUT_BYTES_MAX + 1]),
            Err(ShellError::TooLarge { what: OUTPUT, .. })
        ));
    }

    #[test]
    fn a_full_capture_fits_the_output_bound() {
        let out = ShellOutput {
            exit: ShellExit::Signal(i32::MIN),
            stdout: Bytes::from(vec![b'o'; CAPTURE_BYTES_MAX / 2]),
            stderr: Bytes::from(vec![b'e'; CAPTURE_BYTES_MAX - CAPTURE_BYTES_MAX / 2]),
            truncated: true,
        };
        let bytes = out.encode().unwrap();
        assert!(bytes.len() <= OUTPUT_BYTES_MAX);
        assert_eq!(ShellOutput::decode(&bytes).unwrap(), out);
    }

    #[test]
    fn exits_read_well() {
        assert_eq!(ShellExit::Code(3).to_string(), "exit code 3");
        assert_eq!(ShellExit::Signal(9).to_string(), "signal 9 (SIGKILL)");
        assert_eq!(ShellExit::Signal(64).to_string(), "signal 64");
        assert!(ShellExit::Code(0).success());
        assert!(!ShellExit::Signal(0).success());
    }

    fn exit() -> impl Strategy<Value = ShellExit> {
        prop_oneof![
            any::<i32>().prop_map(ShellExit::Code),
            any::<i32>().prop_map(ShellExit::Signal)
        ]
    }

    proptest! {
        // Random bytes never panic the decoders: they decode or they fail.
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = ShellCommand::decode(&bytes);
            let _ = ShellOutput::decode(&bytes);
        }

        // Nor do valid encodings with random damage.
        #[test]
        fn damaged_encodings_never_panic(words in proptest::collection::vec("[^\0]{0,12}", 1..8),
                                         at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut bytes = ShellCommand::new(words).unwrap().encode().unwrap();
            let i = at.index(bytes.len());
            bytes[i] = byte;
            let _ = ShellCommand::decode(&bytes);
            bytes.truncate(i);
            let _ = ShellCommand::decode(&bytes);
        }

        #[test]
        fn commands_round_trip(words in proptest::collection::vec("[^\0]{0,12}", 1..8)) {
            let c = ShellCommand::new(words).unwrap();
            prop_assert_eq!(ShellCommand::decode(&c.encode().unwrap()).unwrap(), c);
        }

        #[test]
        fn outputs_round_trip(exit in exit(),
                              stdout in proptest::collection::vec(any::<u8>(), 0..64),
                              stderr in proptest::collection::vec(any::<u8>(), 0..64),
                              truncated in any::<bool>()) {
            let out = ShellOutput { exit, stdout: stdout.into(), stderr: stderr.into(), truncated };
            prop_assert_eq!(ShellOutput::decode(&out.encode().unwrap()).unwrap(), out);
        }
    }
}
