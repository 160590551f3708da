//! The node side ([`NodeShim`]) against the Rust application side ([`run_with`]) in memory,
//! and against applications that misbehave.

// Helpers outside #[test] functions unwrap too: a failure there is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use flame_protocol::shim::{ShimFrameError, SHIM_FRAME_BYTES_MAX};
use flame_shims::node::{Invocation, NodeShim};
use flame_shims::service::{run_with, Service, SessionContext, TaskContext};
use flame_shims::ShimError;
use proptest::prelude::*;
use std::io::{self, Read, Write};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::runtime::Handle;

/// Bound on every wait in these tests; generous, since nothing here should take long.
const WAIT: Duration = Duration::from_secs(10);

/// Blocking std I/O over an async stream, for running the synchronous service side on a
/// blocking thread against an in-memory pipe.
struct SyncBridge<T> {
    inner: T,
    handle: Handle,
}

impl<T: AsyncRead + Unpin> Read for SyncBridge<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.handle.block_on(self.inner.read(buf))
    }
}

impl<T: AsyncWrite + Unpin> Write for SyncBridge<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.handle.block_on(self.inner.write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.handle.block_on(self.inner.flush())
    }
}

/// Answers `"<session>:<common data>:<task>:<input>"`; fails inputs starting with `!`;
/// refuses sessions whose common data is `refuse`.
struct Tagger {
    common_data: Vec<u8>,
}

impl Service for Tagger {
    fn enter_session(&mut self, ctx: &SessionContext) -> Result<(), String> {
        if &ctx.common_data[..] == b"refuse" {
            return Err("refused".into());
        }
        self.common_data = ctx.common_data.to_vec();
        Ok(())
    }

    fn invoke(&mut self, ctx: &TaskContext, input: &[u8]) -> Result<Vec<u8>, String> {
        if input.starts_with(b"!") {
            return Err("bang".into());
        }
        let mut out = format!("{}:", ctx.session_id).into_bytes();
        out.extend_from_slice(&self.common_data);
        out.extend_from_slice(format!(":{}:", ctx.task_id).as_bytes());
        out.extend_from_slice(input);
        Ok(out)
    }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {WAIT:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_shim_drives_the_rust_service_in_memory() {
    // Small pipe buffers, so the 1 MiB task exercises back-pressure in both directions.
    let (stdin_node, stdin_app) = tokio::io::duplex(4096);
    let (stdout_app, stdout_node) = tokio::io::duplex(4096);
    let handle = Handle::current();
    let app = tokio::task::spawn_blocking(move || {
        run_with(
            Tagger {
                common_data: Vec::new(),
            },
            io::BufReader::new(SyncBridge {
                inner: stdin_app,
                handle: handle.clone(),
            }),
            SyncBridge {
                inner: stdout_app,
                handle,
            },
        )
    });

    let mut shim = NodeShim::new(stdout_node, stdin_node, SHIM_FRAME_BYTES_MAX);
    within("ready", shim.wait_ready()).await.unwrap();
    within("enter", shim.enter(5, b"cd")).await.unwrap();
    assert_eq!(
        within("invoke", shim.invoke(1, b"a")).await.unwrap(),
        Invocation::Succeeded("5:cd:1:a".into())
    );
    assert_eq!(
        within("invoke", shim.invoke(2, b"!")).await.unwrap(),
        Invocation::Failed("bang".into())
    );
    let large = vec![7u8; 1 << 20];
    match within("invoke", shim.invoke(3, &large)).await.unwrap() {
        Invocation::Succeeded(out) => {
            assert!(out.starts_with(b"5:cd:3:") && out.ends_with(&large));
        }
        other => panic!("unexpected {other:?}"),
    }
    within("leave", shim.leave()).await.unwrap();
    match within("enter", shim.enter(6, b"refuse")).await {
        Err(ShimError::App(message)) => assert_eq!(message, "refused"),
        other => panic!("unexpected {other:?}"),
    }
    shim.shutdown().await;
    within("app exit", app).await.unwrap().unwrap();
}

/// Drives a whole conversation against whatever bytes `stdout` holds and returns the first
/// error. A finite stdout always ends in an error (at worst `Exited`), so this cannot hang.
async fn converse(stdout: &[u8]) -> ShimError {
    let mut shim = NodeShim::new(stdout, tokio::io::sink(), 1024);
    let result = async {
        shim.wait_ready().await?;
        shim.enter(1, b"").await?;
        for task in 1..4 {
            shim.invoke(task, b"x").await?;
        }
        shim.leave().await
    }
    .await;
    match result {
        Err(e) => e,
        Ok(()) => shim.wait_ready().await.unwrap_err(),
    }
}

#[tokio::test]
async fn garbage_from_the_app_is_a_typed_error() {
    type Expect = fn(&ShimError) -> bool;
    let cases: [(&[u8], Expect); 5] = [
        (
            b"hello world\n",
            |e| matches!(e, ShimError::NotFrames { shown, .. } if shown == "\"hello world\\n\""),
        ),
        (b"\x01\x00\x00\x00\x7f", |e| {
            matches!(e, ShimError::Frame(ShimFrameError::UnknownType(0x7f)))
        }),
        (b"\x00\x00\x00\x00", |e| {
            matches!(e, ShimError::Frame(ShimFrameError::Empty))
        }),
        (b"\x02\x00\x00\x00\x81\x00", |e| {
            matches!(e, ShimError::Frame(ShimFrameError::TrailingBytes { .. }))
        }),
        (b"\x0e\0\0\0\x82\x01\0\0\0\0\0\0\0\0\0\0\0\0", |e| {
            matches!(
                e,
                ShimError::Unexpected {
                    expected: "Ready",
                    got: "TaskResult"
                }
            )
        }),
    ];
    for (stdout, expected) in cases {
        let error = converse(stdout).await;
        assert!(expected(&error), "{stdout:?} gave {error:?}");
    }
}

#[tokio::test]
async fn misbehaving_processes_give_typed_errors() {
    async fn first_error(script: &str) -> ShimError {
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut shim = NodeShim::new(
            child.stdout.take().unwrap(),
            child.stdin.take().unwrap(),
            SHIM_FRAME_BYTES_MAX,
        );
        let error = within(script, shim.wait_ready()).await.unwrap_err();
        child.kill().await.unwrap();
        error
    }
    // Log lines on stdout instead of stderr: the classic mistake.
    assert!(matches!(
        first_error("echo starting up; exec sleep 30").await,
        ShimError::NotFrames { .. }
    ));
    assert!(matches!(
        first_error(r"printf '\001\000\000\000\177'; exec sleep 30").await,
        ShimError::Frame(ShimFrameError::UnknownType(0x7f))
    ));
    assert!(matches!(first_error("exit 3").await, ShimError::Exited));
    assert!(matches!(
        first_error(r"printf '\001\000'").await,
        ShimError::ExitedMidFrame { have: 2 }
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_app_output_gives_a_result_not_a_panic(stdout in prop::collection::vec(any::<u8>(), 0..128)) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let _ = runtime.block_on(converse(&stdout));
    }
}
