//! Both services as the node sees them: real processes, frames over stdin and stdout.
//!
//! The Rust `pi-service` and `python/pi_service.py` must answer the same conversation with
//! the same frames, apart from the counts (their generators differ), and exit 0 at the end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use flame_example_pi::wire::{decode_inside, encode_u64, SAMPLES_PER_TASK_MAX};
use flame_protocol::shim::SHIM_FRAME_BYTES_MAX as MAX;
use flame_protocol::shim::{split_frame, AppFrame, NodeFrame, ResultStatus};
use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};

/// A reply with the count of a successful task left out, so the two services compare.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Ready,
    Counted { task_id: u64 },
    Failed { task_id: u64, message: String },
    Error(String),
}

/// Sends the frames, closes stdin, and returns the replies once the program exited 0.
fn converse(mut command: Command, frames: &[NodeFrame<'_>], samples: u64) -> Vec<Reply> {
    let mut input = Vec::new();
    for frame in frames {
        frame.encode(&mut input).unwrap();
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the service");
    let mut stdin = child.stdin.take().unwrap();
    // Small enough for the pipe, so writing everything first cannot deadlock.
    assert!(input.len() < 4096);
    stdin.write_all(&input).unwrap();
    drop(stdin);
    let mut output = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut output)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{command:?} exited with {status}");

    let mut replies = Vec::new();
    let mut rest = &output[..];
    while let Some(raw) = split_frame(rest, MAX).unwrap() {
        let reply = match AppFrame::decode(raw.frame_type, raw.body, MAX).unwrap() {
            AppFrame::Ready => Reply::Ready,
            AppFrame::TaskResult {
                task_id,
                status: ResultStatus::Ok,
                payload,
            } => {
                let inside = decode_inside(payload).unwrap();
                assert!(inside <= samples, "{inside} of {samples}");
                Reply::Counted { task_id }
            }
            AppFrame::TaskResult {
                task_id,
                status: ResultStatus::Error,
                payload,
            } => Reply::Failed {
                task_id,
                message: String::from_utf8(payload.to_vec()).unwrap(),
            },
            AppFrame::Error { message } => Reply::Error(String::from_utf8_lossy(message).into()),
        };
        replies.push(reply);
        rest = &rest[raw.consumed..];
    }
    assert!(rest.is_empty(), "{} bytes after the last frame", rest.len());
    replies
}

#[test]
fn rust_and_python_services_answer_alike() {
    let samples = 1000;
    let good = encode_u64(samples);
    let too_many = encode_u64(SAMPLES_PER_TASK_MAX + 1);
    let seed = encode_u64(42);
    let frames = [
        NodeFrame::SessionEnter {
            session_id: 1,
            common_data: &seed,
        },
        NodeFrame::TaskInvoke {
            task_id: 1,
            input: &good,
        },
        NodeFrame::TaskInvoke {
            task_id: 2,
            input: b"1000",
        },
        NodeFrame::TaskInvoke {
            task_id: 3,
            input: &too_many,
        },
        NodeFrame::SessionLeave,
        NodeFrame::SessionEnter {
            session_id: 2,
            common_data: b"abc",
        },
        NodeFrame::TaskInvoke {
            task_id: 1,
            input: &good,
        },
        NodeFrame::SessionLeave,
    ];
    let expected = [
        Reply::Ready,
        Reply::Ready,
        Reply::Counted { task_id: 1 },
        Reply::Failed {
            task_id: 2,
            message: "task input must be the sample count as 8 bytes (a little-endian u64), got 4 bytes".into(),
        },
        Reply::Failed {
            task_id: 3,
            message: "1000000001 samples is over the limit of 1000000000 per task; use more tasks with fewer samples each".into(),
        },
        Reply::Ready,
        Reply::Ready,
        Reply::Failed {
            task_id: 1,
            message: "session common data must be empty or the seed as 8 bytes (a little-endian u64), got 3 bytes".into(),
        },
        Reply::Ready,
    ];

    let rust = Command::new(env!("CARGO_BIN_EXE_pi-service"));
    assert_eq!(converse(rust, &frames, samples), expected);

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/pi_service.py");
    let mut python = Command::new("python3");
    python.arg(&script);
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("note: no python3 on PATH; the Python service is not checked");
        return;
    }
    assert_eq!(converse(python, &frames, samples), expected);
}
