//! Hostile bytes against every decoder a peer can reach: random bytes, and valid encodings
//! damaged (a byte changed, cut short, a byte inserted), for every wire message type, the
//! frame layer, both sides of the shim codec and the rank launch a node decodes. Each
//! decoder must return a value or an error: never panic, never allocate what the input
//! only claims (postcard and serde bound preallocation by the bytes present).
//!
//! The three properties run 350,000 cases each, 1,050,000 in all, and each case feeds its
//! bytes to every decoder of its property: some 15 million decodes per run.
#![allow(clippy::unwrap_used)] // Test code: a panic is the report.

use bytes::Bytes;
use flame_protocol::auth::{JoinReply, JoinRequest, ParsedToken, Secret, TokenKind};
use flame_protocol::messages::{
    ClientRequest, ClientResponse, ExecEvent, HeadToNode, Hello, HelloReply, HelloVersion,
    LogEvent, NodeCommand, NodeExecRequest, NodeLogRequest, NodeStreamRequest, NodeToHead, Role,
    SubmitBatch, SubmitReply, WatchEvent,
};
use flame_protocol::model::{JobSpec, RankLaunch, SessionSpec, TaskAssignment};
use flame_protocol::shim::{split_frame, AppFrame, NodeFrame};
use flame_protocol::{frame, ExecutorId, SessionId, TaskId};
use proptest::prelude::*;

/// Cases per property: three properties, over a million cases in all.
const CASES: u32 = 350_000;
/// Largest frame the shim decoders accept here.
const SHIM_MAX: usize = 64 * 1024;

/// Tries every wire message type on `bytes` (17 decoders), and the token parser.
fn decode_all(bytes: &[u8]) {
    let _ = postcard::take_from_bytes::<HelloVersion>(bytes);
    let _ = postcard::from_bytes::<Hello>(bytes);
    let _ = postcard::from_bytes::<JoinRequest>(bytes);
    let _ = postcard::from_bytes::<JoinReply>(bytes);
    let _ = ParsedToken::parse(&String::from_utf8_lossy(bytes));
    let _ = postcard::from_bytes::<HelloReply>(bytes);
    let _ = postcard::from_bytes::<ClientRequest>(bytes);
    let _ = postcard::from_bytes::<ClientResponse>(bytes);
    let _ = postcard::from_bytes::<SubmitBatch>(bytes);
    let _ = postcard::from_bytes::<SubmitReply>(bytes);
    let _ = postcard::from_bytes::<WatchEvent>(bytes);
    let _ = postcard::from_bytes::<NodeToHead>(bytes);
    let _ = postcard::from_bytes::<HeadToNode>(bytes);
    let _ = postcard::from_bytes::<LogEvent>(bytes);
    let _ = postcard::from_bytes::<NodeStreamRequest>(bytes);
    let _ = postcard::from_bytes::<ExecEvent>(bytes);
    let _ = frame::decode::<ClientRequest>(bytes);
    let _ = RankLaunch::decode(bytes);
}

/// Tries both sides of the shim codec on `bytes` as a stream, and on every type byte.
fn decode_shim(bytes: &[u8]) {
    if let Ok(Some(raw)) = split_frame(bytes, SHIM_MAX) {
        let _ = NodeFrame::decode(raw.frame_type, raw.body, SHIM_MAX);
        let _ = AppFrame::decode(raw.frame_type, raw.body, SHIM_MAX);
    }
    if let Some((&t, body)) = bytes.split_first() {
        let _ = NodeFrame::decode(t, body, SHIM_MAX);
        let _ = AppFrame::decode(t, body, SHIM_MAX);
    }
}

/// Valid encodings of messages of each kind, to damage.
fn samples() -> Vec<Vec<u8>> {
    let mut job = JobSpec::new("/bin/train", 4);
    job.args = vec!["--epochs".into(), "3".into()];
    let messages: Vec<Vec<u8>> = vec![
        postcard::to_allocvec(&Hello {
            protocol_version: flame_protocol::PROTOCOL_VERSION,
            role: Role::Client,
            agent: "flame-cli".into(),
            token: Some(Secret::new(format!(
                "flame1.{}.{}.{}",
                "ab".repeat(8),
                "cd".repeat(32),
                "ef".repeat(32)
            ))),
        })
        .unwrap(),
        postcard::to_allocvec(&JoinRequest {
            name: "node-1".into(),
            csr_pem:
                "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n-----END CERTIFICATE REQUEST-----\n"
                    .into(),
        })
        .unwrap(),
        postcard::to_allocvec(&ClientRequest::CreateToken {
            kind: TokenKind::User {
                name: "alice".into(),
                admin: true,
            },
            ttl_ms: Some(3_600_000),
            uses_max: Some(1),
            replace: None,
        })
        .unwrap(),
        postcard::to_allocvec(&ClientRequest::CreateSession(SessionSpec {
            job: Some(job),
            ..SessionSpec::new("")
        }))
        .unwrap(),
        postcard::to_allocvec(&ClientRequest::JobExec {
            job: SessionId(3),
            node: "node-1".into(),
            argv: vec!["/bin/sh".into(), "-c".into(), "orted".into()],
        })
        .unwrap(),
        postcard::to_allocvec(&SubmitBatch {
            batch_id: 9,
            inputs: vec![
                Bytes::from_static(b"input").into(),
                flame_protocol::object::Payload::Object(flame_protocol::object::ObjectRef::of(
                    b"big",
                )),
            ],
        })
        .unwrap(),
        postcard::to_allocvec(&HeadToNode::Commands(vec![NodeCommand::Run(
            TaskAssignment {
                executor: ExecutorId(7),
                session: SessionId(2),
                task: TaskId(5),
                attempt: 1,
                input: Bytes::from_static(b"abc").into(),
                sources: None,
            },
        )]))
        .unwrap(),
        postcard::to_allocvec(&NodeStreamRequest::Exec(NodeExecRequest {
            executor: ExecutorId(4),
            argv: vec!["orted".into()],
            env: vec![("A".into(), "b".into())],
        }))
        .unwrap(),
        postcard::to_allocvec(&NodeStreamRequest::Logs(NodeLogRequest {
            session: SessionId(7),
            executors: vec![ExecutorId(1), ExecutorId(2)],
            follow: true,
        }))
        .unwrap(),
        postcard::to_allocvec(&ExecEvent::Stderr(Bytes::from_static(b"err"))).unwrap(),
        RankLaunch {
            env: vec![("FLAME_RANK".into(), "0".into())],
            hostfile: "n1 slots=2\n".into(),
            argv: None,
            hold: false,
        }
        .encode()
        .to_vec(),
    ];
    let mut shim = Vec::new();
    NodeFrame::TaskInvoke {
        task_id: 3,
        input: b"in",
    }
    .encode(&mut shim)
    .unwrap();
    let mut out = messages;
    out.push(shim);
    out
}

/// A damaged copy of `sample`: `how` picks the damage, `at` where, `byte` what.
fn damage(sample: &[u8], how: u8, at: usize, byte: u8) -> Vec<u8> {
    let mut bytes = sample.to_vec();
    if bytes.is_empty() {
        return vec![byte];
    }
    let at = at % bytes.len();
    match how % 3 {
        0 => bytes[at] ^= byte | 1,
        1 => bytes.truncate(at),
        _ => bytes.insert(at, byte),
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    // × 14 decoders.
    #[test]
    fn random_bytes_never_panic_a_message_decoder(
        bytes in proptest::collection::vec(any::<u8>(), 0..256)
    ) {
        decode_all(&bytes);
    }

    // × (14 decoders + 4 shim decodes), on damaged valid encodings.
    #[test]
    fn damaged_encodings_never_panic_a_decoder(
        pick in any::<usize>(),
        damages in proptest::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..4),
    ) {
        let samples = samples();
        let mut bytes = samples[pick % samples.len()].clone();
        for (how, at, byte) in damages {
            bytes = damage(&bytes, how, at, byte);
        }
        decode_all(&bytes);
        decode_shim(&bytes);
    }

    // × 8 shim decodes, with lengths that claim more than is there.
    #[test]
    fn random_bytes_never_panic_the_shim_codec(
        len in any::<u32>(),
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(&body);
        decode_shim(&bytes);
        decode_shim(&body);
    }
}

#[tokio::test]
async fn a_frame_that_claims_more_than_the_limit_is_refused_before_it_is_read() {
    // A 4 GiB claim with nothing behind it: refused from the prefix alone.
    let bytes = u32::MAX.to_le_bytes();
    let mut reader = frame::FrameReader::new(&bytes[..], 1024);
    assert!(reader.read::<ClientRequest>().await.is_err());
}
