//! The shim wire format: what the node and an application process say to each other over
//! the application's stdin and stdout.
//!
//! The format is deliberately tiny so that it can be implemented in any language in a page,
//! without a library. `docs/shim-protocol.md` is the normative description; this module is
//! its reference implementation, and the tests below pin the byte layout it documents.
//!
//! ```text
//! frame       = length:u32le  type:u8  body          length counts type + body
//! byte string = length:u32le  bytes
//!
//! node -> app  0x01 SessionEnter  session_id:u64le  common_data:byte string
//!              0x02 TaskInvoke    task_id:u64le     input:byte string
//!              0x03 SessionLeave  (empty body)
//! app -> node  0x81 Ready         (empty body)
//!              0x82 TaskResult    task_id:u64le  status:u8 (0 ok, 1 error)  payload:byte string
//!              0x83 Error         message:byte string
//! ```
//!
//! This module is pure and synchronous: it turns frames into bytes and bytes into frames, and
//! never reads, writes or waits. The node side (`flame-shims::node`) and the application side
//! (`flame-shims::service`) wrap it in their own I/O.

/// Largest frame (type byte + body) either side accepts by default.
///
/// Equal to [`crate::limits::FRAME_BYTES_MAX`]; it bounds one task input or output plus a few
/// bytes of header, and is checked before a byte of the body is allocated.
pub const SHIM_FRAME_BYTES_MAX: usize = crate::limits::FRAME_BYTES_MAX;

/// Bytes of the length prefix in front of every frame.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Environment variable the node sets to the executor's id (decimal).
pub const ENV_EXECUTOR_ID: &str = "FLAME_EXECUTOR_ID";

/// Environment variable the node sets to its own name.
pub const ENV_NODE: &str = "FLAME_NODE";

/// Environment variable the node sets to the application's registered name.
pub const ENV_APPLICATION: &str = "FLAME_APPLICATION";

/// Frame type bytes, one constant per frame. Node → app types have the high bit clear,
/// app → node types have it set, so a frame sent the wrong way is always an unknown type.
pub mod frame_type {
    /// Node → app: bind the executor to a session.
    pub const SESSION_ENTER: u8 = 0x01;
    /// Node → app: run one task.
    pub const TASK_INVOKE: u8 = 0x02;
    /// Node → app: unbind the executor from its session.
    pub const SESSION_LEAVE: u8 = 0x03;
    /// App → node: ready for the next command.
    pub const READY: u8 = 0x81;
    /// App → node: the outcome of one task.
    pub const TASK_RESULT: u8 = 0x82;
    /// App → node: a session enter or leave failed.
    pub const ERROR: u8 = 0x83;
}

/// Status byte of a [`AppFrame::TaskResult`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResultStatus {
    /// `0`: the payload is the task's output.
    Ok,
    /// `1`: the payload is a UTF-8 error message.
    Error,
}

impl ResultStatus {
    /// The byte this status is encoded as.
    pub fn as_byte(self) -> u8 {
        match self {
            ResultStatus::Ok => 0,
            ResultStatus::Error => 1,
        }
    }

    /// The status a byte stands for, if any.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(ResultStatus::Ok),
            1 => Some(ResultStatus::Error),
            _ => None,
        }
    }
}

/// Everything that can be wrong with a shim frame. Decoding never panics; it returns one of
/// these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShimFrameError {
    /// The length prefix, or an encoded frame, is over the limit.
    #[error("shim frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Bytes of type + body the frame claims or needs.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// A length prefix of zero: the frame has no type byte.
    #[error("shim frame with a length of zero has no type byte")]
    Empty,
    /// The type byte is not one this direction knows.
    #[error("unknown shim frame type {0:#04x}")]
    UnknownType(u8),
    /// The body ended before a field it must hold.
    #[error(
        "shim frame {frame_type:#04x} is truncated: {field} needs {needed} bytes, {available} left"
    )]
    Truncated {
        /// Type byte of the frame.
        frame_type: u8,
        /// The field that did not fit.
        field: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes left in the body.
        available: usize,
    },
    /// The body holds bytes after its last field.
    #[error("shim frame {frame_type:#04x} has {extra} trailing bytes")]
    TrailingBytes {
        /// Type byte of the frame.
        frame_type: u8,
        /// Bytes after the last field.
        extra: usize,
    },
    /// A task result status other than 0 or 1.
    #[error("task result status {0} is neither 0 (ok) nor 1 (error)")]
    InvalidStatus(u8),
}

/// A frame the node sends to the application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeFrame<'a> {
    /// `0x01`: bind to a session; the application answers [`AppFrame::Ready`] or
    /// [`AppFrame::Error`].
    SessionEnter {
        /// The session being entered.
        session_id: u64,
        /// The session's common data (may be empty).
        common_data: &'a [u8],
    },
    /// `0x02`: run one task; the application answers [`AppFrame::TaskResult`].
    TaskInvoke {
        /// The task, echoed in the result.
        task_id: u64,
        /// The task's input.
        input: &'a [u8],
    },
    /// `0x03`: unbind from the session; the application answers [`AppFrame::Ready`] or
    /// [`AppFrame::Error`].
    SessionLeave,
}

/// A frame the application sends to the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppFrame<'a> {
    /// `0x81`: sent once after start-up and after each completed enter or leave.
    Ready,
    /// `0x82`: the outcome of a [`NodeFrame::TaskInvoke`].
    TaskResult {
        /// The invoked task's id.
        task_id: u64,
        /// Whether the payload is output or an error message.
        status: ResultStatus,
        /// The output, or a UTF-8 error message.
        payload: &'a [u8],
    },
    /// `0x83`: a session enter or leave failed; the node then stops the executor.
    Error {
        /// A UTF-8 message saying why.
        message: &'a [u8],
    },
}

impl<'a> NodeFrame<'a> {
    /// The frame's type byte.
    pub fn frame_type(&self) -> u8 {
        match self {
            NodeFrame::SessionEnter { .. } => frame_type::SESSION_ENTER,
            NodeFrame::TaskInvoke { .. } => frame_type::TASK_INVOKE,
            NodeFrame::SessionLeave => frame_type::SESSION_LEAVE,
        }
    }

    /// The frame's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            NodeFrame::SessionEnter { .. } => "SessionEnter",
            NodeFrame::TaskInvoke { .. } => "TaskInvoke",
            NodeFrame::SessionLeave => "SessionLeave",
        }
    }

    /// The value of the frame's length prefix: type byte plus body. Compare it with a limit
    /// before encoding.
    pub fn frame_len(&self) -> usize {
        1 + match self {
            NodeFrame::SessionEnter { common_data, .. } => 8 + byte_string_len(common_data),
            NodeFrame::TaskInvoke { input, .. } => 8 + byte_string_len(input),
            NodeFrame::SessionLeave => 0,
        }
    }

    /// Appends the whole frame, length prefix included, to `buf`.
    ///
    /// Fails only if the frame cannot be described by a `u32` length, in which case `buf` is
    /// left as it was.
    pub fn encode(&self, buf: &mut Vec<u8>) -> Result<(), ShimFrameError> {
        put_header(buf, self.frame_len(), self.frame_type())?;
        match self {
            NodeFrame::SessionEnter {
                session_id,
                common_data,
            } => {
                buf.extend_from_slice(&session_id.to_le_bytes());
                put_byte_string(buf, common_data);
            }
            NodeFrame::TaskInvoke { task_id, input } => {
                buf.extend_from_slice(&task_id.to_le_bytes());
                put_byte_string(buf, input);
            }
            NodeFrame::SessionLeave => {}
        }
        Ok(())
    }

    /// Decodes the body of a frame of type `frame_type` (the bytes after the type byte).
    ///
    /// `max` bounds type byte + body, as the length prefix does.
    pub fn decode(frame_type: u8, body: &'a [u8], max: usize) -> Result<Self, ShimFrameError> {
        check_len(body, max)?;
        let mut r = BodyReader::new(frame_type, body);
        let frame = match frame_type {
            frame_type::SESSION_ENTER => NodeFrame::SessionEnter {
                session_id: r.u64("session_id")?,
                common_data: r.byte_string("common_data")?,
            },
            frame_type::TASK_INVOKE => NodeFrame::TaskInvoke {
                task_id: r.u64("task_id")?,
                input: r.byte_string("input")?,
            },
            frame_type::SESSION_LEAVE => NodeFrame::SessionLeave,
            other => return Err(ShimFrameError::UnknownType(other)),
        };
        r.finish()?;
        Ok(frame)
    }
}

impl<'a> AppFrame<'a> {
    /// The frame's type byte.
    pub fn frame_type(&self) -> u8 {
        match self {
            AppFrame::Ready => frame_type::READY,
            AppFrame::TaskResult { .. } => frame_type::TASK_RESULT,
            AppFrame::Error { .. } => frame_type::ERROR,
        }
    }

    /// The frame's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            AppFrame::Ready => "Ready",
            AppFrame::TaskResult { .. } => "TaskResult",
            AppFrame::Error { .. } => "Error",
        }
    }

    /// The value of the frame's length prefix: type byte plus body. Compare it with a limit
    /// before encoding.
    pub fn frame_len(&self) -> usize {
        1 + match self {
            AppFrame::Ready => 0,
            AppFrame::TaskResult { payload, .. } => 8 + 1 + byte_string_len(payload),
            AppFrame::Error { message } => byte_string_len(message),
        }
    }

    /// Appends the whole frame, length prefix included, to `buf`.
    ///
    /// Fails only if the frame cannot be described by a `u32` length, in which case `buf` is
    /// left as it was.
    pub fn encode(&self, buf: &mut Vec<u8>) -> Result<(), ShimFrameError> {
        put_header(buf, self.frame_len(), self.frame_type())?;
        match self {
            AppFrame::Ready => {}
            AppFrame::TaskResult {
                task_id,
                status,
                payload,
            } => {
                buf.extend_from_slice(&task_id.to_le_bytes());
                buf.push(status.as_byte());
                put_byte_string(buf, payload);
            }
            AppFrame::Error { message } => put_byte_string(buf, message),
        }
        Ok(())
    }

    /// Decodes the body of a frame of type `frame_type` (the bytes after the type byte).
    ///
    /// `max` bounds type byte + body, as the length prefix does.
    pub fn decode(frame_type: u8, body: &'a [u8], max: usize) -> Result<Self, ShimFrameError> {
        check_len(body, max)?;
        let mut r = BodyReader::new(frame_type, body);
        let frame = match frame_type {
            frame_type::READY => AppFrame::Ready,
            frame_type::TASK_RESULT => {
                let task_id = r.u64("task_id")?;
                let status_byte = r.u8("status")?;
                let status = ResultStatus::from_byte(status_byte)
                    .ok_or(ShimFrameError::InvalidStatus(status_byte))?;
                AppFrame::TaskResult {
                    task_id,
                    status,
                    payload: r.byte_string("payload")?,
                }
            }
            frame_type::ERROR => AppFrame::Error {
                message: r.byte_string("message")?,
            },
            other => return Err(ShimFrameError::UnknownType(other)),
        };
        r.finish()?;
        Ok(frame)
    }
}

/// Checks a frame's length prefix against `max` and returns how many bytes follow it (type
/// byte + body), so a reader can refuse a hostile length before allocating.
pub fn parse_length(
    prefix: [u8; LENGTH_PREFIX_BYTES],
    max: usize,
) -> Result<usize, ShimFrameError> {
    // u32 always fits usize on the 32- and 64-bit targets Flame builds for; saturating keeps
    // a hypothetical 16-bit target from wrapping into a small, accepted length.
    let len = usize::try_from(u32::from_le_bytes(prefix)).unwrap_or(usize::MAX);
    if len == 0 {
        return Err(ShimFrameError::Empty);
    }
    if len > max {
        return Err(ShimFrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// One frame found at the front of a buffer by [`split_frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawFrame<'a> {
    /// The type byte.
    pub frame_type: u8,
    /// The body, to pass to [`NodeFrame::decode`] or [`AppFrame::decode`].
    pub body: &'a [u8],
    /// Bytes of `buf` the frame occupies, length prefix included.
    pub consumed: usize,
}

/// Finds the first frame in `buf`, for readers that keep their own buffer.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame. A length over `max` is an
/// error as soon as the prefix is complete, so the caller never buffers more than `max` +
/// [`LENGTH_PREFIX_BYTES`] bytes for one frame.
pub fn split_frame(buf: &[u8], max: usize) -> Result<Option<RawFrame<'_>>, ShimFrameError> {
    let Some((prefix, rest)) = buf.split_first_chunk::<LENGTH_PREFIX_BYTES>() else {
        return Ok(None);
    };
    let len = parse_length(*prefix, max)?;
    let Some(frame) = rest.get(..len) else {
        return Ok(None);
    };
    let Some((&frame_type, body)) = frame.split_first() else {
        // parse_length refused zero, so a frame of `len` bytes has a type byte.
        return Err(ShimFrameError::Empty);
    };
    Ok(Some(RawFrame {
        frame_type,
        body,
        consumed: LENGTH_PREFIX_BYTES + len,
    }))
}

/// Encoded size of a byte string: its `u32` length plus its bytes.
fn byte_string_len(bytes: &[u8]) -> usize {
    4usize.saturating_add(bytes.len())
}

fn put_header(buf: &mut Vec<u8>, frame_len: usize, frame_type: u8) -> Result<(), ShimFrameError> {
    // Checking the whole frame against u32 also covers every byte string inside it, so
    // `put_byte_string` cannot truncate a length.
    let len = u32::try_from(frame_len).map_err(|_| ShimFrameError::TooLarge {
        len: frame_len,
        max: u32::MAX as usize,
    })?;
    buf.reserve(LENGTH_PREFIX_BYTES + frame_len);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.push(frame_type);
    Ok(())
}

fn put_byte_string(buf: &mut Vec<u8>, bytes: &[u8]) {
    // The caller's put_header proved the enclosing frame, and so this string, fits a u32.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(bytes);
}

fn check_len(body: &[u8], max: usize) -> Result<(), ShimFrameError> {
    let len = body.len().saturating_add(1);
    if len > max {
        return Err(ShimFrameError::TooLarge { len, max });
    }
    Ok(())
}

/// A cursor over one frame body; every read is bounds-checked.
struct BodyReader<'a> {
    frame_type: u8,
    rest: &'a [u8],
}

impl<'a> BodyReader<'a> {
    fn new(frame_type: u8, body: &'a [u8]) -> Self {
        BodyReader {
            frame_type,
            rest: body,
        }
    }

    fn take(&mut self, field: &'static str, needed: usize) -> Result<&'a [u8], ShimFrameError> {
        if needed > self.rest.len() {
            return Err(ShimFrameError::Truncated {
                frame_type: self.frame_type,
                field,
                needed,
                available: self.rest.len(),
            });
        }
        let (head, tail) = self.rest.split_at(needed);
        self.rest = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], ShimFrameError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(field, N)?);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, ShimFrameError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, ShimFrameError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn byte_string(&mut self, field: &'static str) -> Result<&'a [u8], ShimFrameError> {
        let len = u32::from_le_bytes(self.array(field)?);
        self.take(field, usize::try_from(len).unwrap_or(usize::MAX))
    }

    fn finish(self) -> Result<(), ShimFrameError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(ShimFrameError::TrailingBytes {
                frame_type: self.frame_type,
                extra: self.rest.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encoded_node(frame: &NodeFrame) -> Vec<u8> {
        let mut buf = Vec::new();
        frame.encode(&mut buf).unwrap();
        assert_eq!(buf.len(), LENGTH_PREFIX_BYTES + frame.frame_len());
        buf
    }

    fn encoded_app(frame: &AppFrame) -> Vec<u8> {
        let mut buf = Vec::new();
        frame.encode(&mut buf).unwrap();
        assert_eq!(buf.len(), LENGTH_PREFIX_BYTES + frame.frame_len());
        buf
    }

    // These two byte strings are the hex dumps in docs/shim-protocol.md; if this test fails,
    // the document is wrong too.
    #[test]
    fn layout_matches_the_documented_hex_dumps() {
        let invoke = NodeFrame::TaskInvoke {
            task_id: 7,
            input: b"hi",
        };
        assert_eq!(
            encoded_node(&invoke),
            [
                0x0f, 0x00, 0x00, 0x00, // length 15
                0x02, // TaskInvoke
                0x07, 0, 0, 0, 0, 0, 0, 0, // task_id 7
                0x02, 0x00, 0x00, 0x00, b'h', b'i', // input "hi"
            ]
        );
        let result = AppFrame::TaskResult {
            task_id: 7,
            status: ResultStatus::Ok,
            payload: b"HI!",
        };
        assert_eq!(
            encoded_app(&result),
            [
                0x11, 0x00, 0x00, 0x00, // length 17
                0x82, // TaskResult
                0x07, 0, 0, 0, 0, 0, 0, 0,    // task_id 7
                0x00, // status ok
                0x03, 0x00, 0x00, 0x00, b'H', b'I', b'!', // payload "HI!"
            ]
        );
        assert_eq!(encoded_node(&NodeFrame::SessionLeave), [1, 0, 0, 0, 0x03]);
        assert_eq!(encoded_app(&AppFrame::Ready), [1, 0, 0, 0, 0x81]);
    }

    #[test]
    fn unknown_types_are_refused_in_each_direction() {
        // A frame sent the wrong way is an unknown type, never a misread.
        assert_eq!(
            NodeFrame::decode(frame_type::READY, &[], 64),
            Err(ShimFrameError::UnknownType(0x81))
        );
        assert_eq!(
            AppFrame::decode(frame_type::SESSION_LEAVE, &[], 64),
            Err(ShimFrameError::UnknownType(0x03))
        );
        assert_eq!(
            AppFrame::decode(0x00, &[], 64),
            Err(ShimFrameError::UnknownType(0x00))
        );
    }

    #[test]
    fn truncated_and_trailing_bodies_are_refused() {
        let full = encoded_node(&NodeFrame::SessionEnter {
            session_id: 3,
            common_data: b"abc",
        });
        let body = &full[LENGTH_PREFIX_BYTES + 1..];
        for cut in 0..body.len() {
            assert!(matches!(
                NodeFrame::decode(frame_type::SESSION_ENTER, &body[..cut], 1024),
                Err(ShimFrameError::Truncated {
                    frame_type: 0x01,
                    ..
                })
            ));
        }
        let mut longer = body.to_vec();
        longer.push(0);
        assert_eq!(
            NodeFrame::decode(frame_type::SESSION_ENTER, &longer, 1024),
            Err(ShimFrameError::TrailingBytes {
                frame_type: 0x01,
                extra: 1
            })
        );
        assert_eq!(
            AppFrame::decode(frame_type::READY, &[0], 1024),
            Err(ShimFrameError::TrailingBytes {
                frame_type: 0x81,
                extra: 1
            })
        );
    }

    #[test]
    fn byte_string_longer_than_the_body_is_truncated_not_allocated() {
        let mut body = 1u64.to_le_bytes().to_vec();
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            NodeFrame::decode(frame_type::TASK_INVOKE, &body, 1024),
            Err(ShimFrameError::Truncated {
                frame_type: 0x02,
                field: "input",
                needed: u32::MAX as usize,
                available: 0
            })
        );
    }

    #[test]
    fn bad_status_is_refused() {
        let mut body = 1u64.to_le_bytes().to_vec();
        body.push(2);
        body.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(
            AppFrame::decode(frame_type::TASK_RESULT, &body, 1024),
            Err(ShimFrameError::InvalidStatus(2))
        );
    }

    #[test]
    fn limits_apply_to_length_prefix_and_body() {
        assert_eq!(parse_length([0, 0, 0, 0], 10), Err(ShimFrameError::Empty));
        assert_eq!(parse_length([10, 0, 0, 0], 10), Ok(10));
        assert_eq!(
            parse_length([11, 0, 0, 0], 10),
            Err(ShimFrameError::TooLarge { len: 11, max: 10 })
        );
        assert_eq!(
            parse_length(u32::MAX.to_le_bytes(), SHIM_FRAME_BYTES_MAX),
            Err(ShimFrameError::TooLarge {
                len: u32::MAX as usize,
                max: SHIM_FRAME_BYTES_MAX
            })
        );
        assert_eq!(
            AppFrame::decode(frame_type::READY, &[0; 10], 10),
            Err(ShimFrameError::TooLarge { len: 11, max: 10 })
        );
    }

    #[test]
    fn split_frame_waits_for_whole_frames() {
        let mut stream = encoded_app(&AppFrame::Ready);
        stream.extend(encoded_app(&AppFrame::Error { message: b"no" }));
        for cut in 0..5 {
            assert_eq!(split_frame(&stream[..cut], 64), Ok(None));
        }
        let first = split_frame(&stream, 64).unwrap().unwrap();
        assert_eq!(
            (first.frame_type, first.body, first.consumed),
            (0x81, &[][..], 5)
        );
        let rest = &stream[first.consumed..];
        assert_eq!(split_frame(&rest[..rest.len() - 1], 64), Ok(None));
        let second = split_frame(rest, 64).unwrap().unwrap();
        assert_eq!(
            AppFrame::decode(second.frame_type, second.body, 64),
            Ok(AppFrame::Error { message: b"no" })
        );
        assert_eq!(second.consumed, rest.len());
    }

    /// Owned frames for proptest to generate; the codec's frames borrow from these.
    #[derive(Debug, Clone)]
    enum Owned {
        Enter(u64, Vec<u8>),
        Invoke(u64, Vec<u8>),
        Leave,
        Ready,
        Result(u64, bool, Vec<u8>),
        Error(Vec<u8>),
    }

    impl Owned {
        fn node(&self) -> Option<NodeFrame<'_>> {
            match self {
                Owned::Enter(session_id, common_data) => Some(NodeFrame::SessionEnter {
                    session_id: *session_id,
                    common_data,
                }),
                Owned::Invoke(task_id, input) => Some(NodeFrame::TaskInvoke {
                    task_id: *task_id,
                    input,
                }),
                Owned::Leave => Some(NodeFrame::SessionLeave),
                _ => None,
            }
        }

        fn app(&self) -> Option<AppFrame<'_>> {
            match self {
                Owned::Ready => Some(AppFrame::Ready),
                Owned::Result(task_id, ok, payload) => Some(AppFrame::TaskResult {
                    task_id: *task_id,
                    status: if *ok {
                        ResultStatus::Ok
                    } else {
                        ResultStatus::Error
                    },
                    payload,
                }),
                Owned::Error(message) => Some(AppFrame::Error { message }),
                _ => None,
            }
        }
    }

    fn bytes_strategy() -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(any::<u8>(), 0..256)
    }

    fn node_frame_strategy() -> impl Strategy<Value = Owned> {
        prop_oneof![
            (any::<u64>(), bytes_strategy()).prop_map(|(id, data)| Owned::Enter(id, data)),
            (any::<u64>(), bytes_strategy()).prop_map(|(id, input)| Owned::Invoke(id, input)),
            Just(Owned::Leave),
        ]
    }

    fn app_frame_strategy() -> impl Strategy<Value = Owned> {
        prop_oneof![
            Just(Owned::Ready),
            (any::<u64>(), any::<bool>(), bytes_strategy())
                .prop_map(|(id, ok, payload)| Owned::Result(id, ok, payload)),
            bytes_strategy().prop_map(Owned::Error),
        ]
    }

    proptest! {
        #[test]
        fn node_frames_round_trip(frames in prop::collection::vec(node_frame_strategy(), 0..8)) {
            let frames: Vec<NodeFrame<'_>> = frames.iter().filter_map(Owned::node).collect();
            let mut stream = Vec::new();
            for f in &frames {
                f.encode(&mut stream).unwrap();
            }
            let mut rest = &stream[..];
            for f in &frames {
                let raw = split_frame(rest, SHIM_FRAME_BYTES_MAX).unwrap().unwrap();
                prop_assert_eq!(&NodeFrame::decode(raw.frame_type, raw.body, SHIM_FRAME_BYTES_MAX).unwrap(), f);
                rest = &rest[raw.consumed..];
            }
            prop_assert!(rest.is_empty());
        }

        #[test]
        fn app_frames_round_trip(frames in prop::collection::vec(app_frame_strategy(), 0..8)) {
            let frames: Vec<AppFrame<'_>> = frames.iter().filter_map(Owned::app).collect();
            let mut stream = Vec::new();
            for f in &frames {
                f.encode(&mut stream).unwrap();
            }
            let mut rest = &stream[..];
            for f in &frames {
                let raw = split_frame(rest, SHIM_FRAME_BYTES_MAX).unwrap().unwrap();
                prop_assert_eq!(&AppFrame::decode(raw.frame_type, raw.body, SHIM_FRAME_BYTES_MAX).unwrap(), f);
                rest = &rest[raw.consumed..];
            }
            prop_assert!(rest.is_empty());
        }

        #[test]
        fn random_bodies_never_panic(frame_type in any::<u8>(), body in prop::collection::vec(any::<u8>(), 0..64), max in 0usize..128) {
            let _ = NodeFrame::decode(frame_type, &body, max);
            let _ = AppFrame::decode(frame_type, &body, max);
        }

        #[test]
        fn random_streams_never_panic(stream in prop::collection::vec(any::<u8>(), 0..256), max in 0usize..128) {
            let mut rest = &stream[..];
            while let Ok(Some(raw)) = split_frame(rest, max) {
                let _ = NodeFrame::decode(raw.frame_type, raw.body, max);
                let _ = AppFrame::decode(raw.frame_type, raw.body, max);
                prop_assert!(raw.consumed > 0 && raw.consumed <= rest.len());
                rest = &rest[raw.consumed..];
            }
        }

        #[test]
        fn mutated_valid_frames_never_panic(frame in app_frame_strategy(), flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4)) {
            // Random bytes rarely look like a frame; flipping bytes of a real one reaches the
            // field decoders far more often.
            let mut buf = Vec::new();
            frame.app().unwrap().encode(&mut buf).unwrap();
            for (at, byte) in flips {
                let i = at.index(buf.len());
                buf[i] = byte;
            }
            if let Ok(Some(raw)) = split_frame(&buf, 1024) {
                let _ = AppFrame::decode(raw.frame_type, raw.body, 1024);
            }
        }
    }
}
