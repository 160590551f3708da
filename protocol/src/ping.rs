//! The contract of `flame-ping`, the built-in application that echoes its input and says
//! where it ran.
//!
//! A ping output is the task's input, byte for byte, followed by a trailer:
//!
//! ```text
//! input || "\n--flame-ping host=" || host || " executor=" || executor
//! ```
//!
//! The application builds it with [`reply`]; the CLI checks every output with
//! [`check_reply`], which proves that the output belongs to that input (no mix-up between
//! tasks) and reports which host and executor produced it. Both live here, in one place, so
//! the two ends cannot drift apart.

/// Separates the echoed input from the trailer and introduces the host.
pub const MARKER: &str = "\n--flame-ping host=";

/// Separates the host from the executor in the trailer.
pub const EXECUTOR_FIELD: &str = " executor=";

/// Builds the output of a ping task.
///
/// [`check_reply`] accepts the result only if `host` and `executor` are non-empty, hold no
/// control characters, and `host` does not contain `" executor="`. Node names, host names and
/// executor ids all qualify.
pub fn reply(input: &[u8], host: &str, executor: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        input.len() + MARKER.len() + host.len() + EXECUTOR_FIELD.len() + executor.len(),
    );
    out.extend_from_slice(input);
    out.extend_from_slice(MARKER.as_bytes());
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(EXECUTOR_FIELD.as_bytes());
    out.extend_from_slice(executor.as_bytes());
    out
}

/// Where a ping task ran, as its output says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PingReply {
    /// The `FLAME_NODE` (or host name) of the node that ran the task.
    pub host: String,
    /// The `FLAME_EXECUTOR_ID` of the executor that ran the task.
    pub executor: String,
}

/// Why an output is not the ping reply to an input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PingError {
    /// The output does not begin with the input.
    #[error("output does not echo the input: first difference at byte {offset}")]
    InputMismatch {
        /// Offset of the first byte that differs, or the output's length if it is shorter.
        offset: usize,
    },
    /// The echoed input is not followed by the ping marker.
    #[error("echoed input is not followed by the flame-ping marker")]
    MissingMarker,
    /// The trailer has no `" executor="` field.
    #[error("flame-ping trailer has no executor field")]
    MissingExecutor,
    /// The trailer is not UTF-8.
    #[error("flame-ping trailer is not UTF-8")]
    NotUtf8,
    /// The host or executor field is empty or holds a control character.
    #[error("flame-ping {field} field {value:?} is empty or holds a control character")]
    BadField {
        /// `"host"` or `"executor"`.
        field: &'static str,
        /// The field as found.
        value: String,
    },
}

/// Checks that `output` is the ping reply to `input` and says where it ran.
///
/// The input is matched by length and bytes, not by searching for the marker, so an input
/// that itself contains the marker text is checked correctly. Refusing newlines in the fields
/// makes the check exact: the marker holds the output's last newline, so the reply to a
/// longer input that merely starts with `input` is never accepted.
pub fn check_reply(input: &[u8], output: &[u8]) -> Result<PingReply, PingError> {
    let Some(trailer) = output.strip_prefix(input) else {
        let offset = input
            .iter()
            .zip(output)
            .position(|(a, b)| a != b)
            .unwrap_or(output.len());
        return Err(PingError::InputMismatch { offset });
    };
    let fields = trailer
        .strip_prefix(MARKER.as_bytes())
        .ok_or(PingError::MissingMarker)?;
    let fields = std::str::from_utf8(fields).map_err(|_| PingError::NotUtf8)?;
    let (host, executor) = fields
        .split_once(EXECUTOR_FIELD)
        .ok_or(PingError::MissingExecutor)?;
    for (field, value) in [("host", host), ("executor", executor)] {
        if value.is_empty() || value.chars().any(char::is_control) {
            return Err(PingError::BadField {
                field,
                value: value.to_owned(),
            });
        }
    }
    Ok(PingReply {
        host: host.to_owned(),
        executor: executor.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(host: &str, executor: &str) -> Result<PingReply, PingError> {
        Ok(PingReply {
            host: host.into(),
            executor: executor.into(),
        })
    }

    #[test]
    fn reply_layout() {
        assert_eq!(
            reply(b"abc", "n1", "42"),
            b"abc\n--flame-ping host=n1 executor=42".to_vec()
        );
        assert_eq!(
            reply(b"", "n1", "42"),
            b"\n--flame-ping host=n1 executor=42".to_vec()
        );
    }

    #[test]
    fn check_accepts_its_own_replies() {
        assert_eq!(
            check_reply(b"abc", &reply(b"abc", "n1", "42")),
            ok("n1", "42")
        );
        assert_eq!(check_reply(b"", &reply(b"", "n1", "42")), ok("n1", "42"));
        let big = vec![0xffu8; 1 << 20];
        assert_eq!(check_reply(&big, &reply(&big, "h", "e")), ok("h", "e"));
    }

    #[test]
    fn input_containing_the_marker_is_not_confused() {
        let input = b"x\n--flame-ping host=evil executor=666\ny";
        let out = reply(input, "n1", "42");
        assert_eq!(check_reply(input, &out), ok("n1", "42"));
        // The reply to a shorter input is not accepted for the longer one, even though it
        // parses.
        assert!(
            matches!(
                check_reply(b"x", &out),
                Err(PingError::BadField {
                    field: "executor",
                    ..
                })
            ),
            "trailer must follow the exact input"
        );
    }

    #[test]
    fn wrong_outputs_are_refused() {
        assert_eq!(
            check_reply(b"abc", &reply(b"abd", "n", "1")),
            Err(PingError::InputMismatch { offset: 2 })
        );
        assert_eq!(
            check_reply(b"abc", b"ab"),
            Err(PingError::InputMismatch { offset: 2 })
        );
        assert_eq!(check_reply(b"abc", b"abc"), Err(PingError::MissingMarker));
        assert_eq!(
            check_reply(b"abc", b"abc\n--flame-ping host=n1"),
            Err(PingError::MissingExecutor)
        );
        assert_eq!(
            check_reply(b"", b"\n--flame-ping host=\xff executor=1"),
            Err(PingError::NotUtf8)
        );
        assert!(matches!(
            check_reply(b"", b"\n--flame-ping host= executor=1"),
            Err(PingError::BadField { field: "host", .. })
        ));
    }

    proptest! {
        #[test]
        fn round_trip(input in prop::collection::vec(any::<u8>(), 0..128),
                      host in "[a-z0-9.-]{1,20}", executor in "[ -~]{1,20}") {
            prop_assert_eq!(check_reply(&input, &reply(&input, &host, &executor)), ok(&host, &executor));
        }

        #[test]
        fn random_outputs_never_panic(input in prop::collection::vec(any::<u8>(), 0..16),
                                      output in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = check_reply(&input, &output);
        }

        #[test]
        fn only_the_exact_input_is_accepted(input in prop::collection::vec(any::<u8>(), 0..32),
                                            extra in prop::collection::vec(any::<u8>(), 1..32)) {
            // The reply to a longer input is never taken for the reply to its prefix.
            let mut longer = input.clone();
            longer.extend_from_slice(&extra);
            prop_assert!(check_reply(&input, &reply(&longer, "n1", "7")).is_err());
        }
    }
}
