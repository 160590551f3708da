//! The records against the layout schema 6 wrote before they existed (the wire and store
//! types serialized directly), and the records' own bytes pinned.

use super::*;
use crate::auth::StoredToken;
use crate::certs::StoredCert;
use crate::store::{StoredNode, StoredSession, StoredTask};
use flame_protocol::auth::TokenKind;
use flame_protocol::model::{
    ApplicationSpec, EnvValue, ExecutorUsage, GpuInfo, Isolation, JobFailure, JobInfo, JobSpec,
    JobState, NodeResources, RankInfo, Resources, SessionInfo, SessionState, ShimKind, TaskCounts,
    TaskOutcome,
};
use flame_protocol::object::{ObjectRef, Payload};
use flame_protocol::{ExecutorId, SessionId};
use serde::de::DeserializeOwned;
use std::fmt::Debug;

/// `wire` written the old way reads as the record `R`, the record writes the same bytes,
/// and the record converts back to `wire`. Returns the bytes.
fn same_layout<W, R>(wire: &W) -> Vec<u8>
where
    W: Serialize + PartialEq + Debug + From<R>,
    R: Serialize + DeserializeOwned + Debug + for<'a> From<&'a W>,
{
    let old = postcard::to_allocvec(wire).unwrap();
    let record = R::from(wire);
    assert_eq!(postcard::to_allocvec(&record).unwrap(), old, "{record:?}");
    let read: R = postcard::from_bytes(&old).unwrap();
    assert_eq!(W::from(read), *wire);
    old
}

/// `wire` written as its record `R` reads back as `wire`. Returns the bytes. For the
/// types that changed on the wire since schema 6 (sessions' common data, the sessions'
/// finished view, tasks' inputs): their bytes are still pinned by the digest below.
fn round_trip<W, R>(wire: &W) -> Vec<u8>
where
    W: PartialEq + Debug + From<R>,
    R: Serialize + DeserializeOwned + Debug + for<'a> From<&'a W>,
{
    let bytes = postcard::to_allocvec(&R::from(wire)).unwrap();
    let read: R = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(W::from(read), *wire);
    bytes
}

/// A session as schema 6 wrote it reads as the same session through the migration, and
/// the schema 7 record of an inline session converts back. Returns the schema 6 bytes.
fn session_v6_layout(session: &StoredSession) -> Vec<u8> {
    let Payload::Inline(common) = &session.common_data else {
        panic!("schema 6 had inline common data only");
    };
    let v6 = crate::store::migrate::SessionRecordV6 {
        id: session.id.0,
        application: session.application.clone(),
        owner: session.owner.clone(),
        priority: session.priority,
        common_data: common.clone(),
        state: session.state.into(),
        created_ms: session.created_ms,
        closed_ms: session.closed_ms,
        last_task: session.last_task,
        usage: session.usage.iter().map(UsageRecord::from).collect(),
        job: session.job.as_ref().map(JobRecord::from),
    };
    let bytes = postcard::to_allocvec(&v6).unwrap();
    let read: crate::store::migrate::SessionRecordV6 = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(StoredSession::from(SessionRecord::from(read)), *session);
    round_trip::<_, SessionRecord>(session);
    bytes
}

fn resources(full: bool) -> Resources {
    Resources {
        cpu_millis: 1500,
        memory_bytes: full.then_some(1 << 30),
        gpus: u32::from(full) * 2,
    }
}

fn applications() -> Vec<ApplicationSpec> {
    let mut full = ApplicationSpec::new("svc", "/usr/bin/svc");
    full.shim = ShimKind::Unix;
    full.args = vec!["-v".into(), "--port=9".into()];
    full.env = BTreeMap::from([
        ("A".to_string(), EnvValue::plain("1")),
        (
            "KEY".to_string(),
            EnvValue {
                value: "s3cret".into(),
                secret: true,
            },
        ),
    ]);
    full.working_dir = Some("/srv".into());
    full.user = Some("svc".into());
    full.group = Some("svc".into());
    full.users = vec!["alice".into()];
    full.groups = vec!["ops".into(), "dev".into()];
    full.resources = resources(true);
    full.selector = BTreeMap::from([("zone".to_string(), "a".to_string())]);
    full.max_instances = 300;
    full.delay_release_ms = 70_000;
    full.max_attempts = 3;
    full.retry_on_error = true;
    full.task_timeout_ms = Some(1 << 40);
    full.allow_root = true;
    let mut batch = ApplicationSpec::new("job.9", "true");
    batch.shim = ShimKind::Batch;
    vec![ApplicationSpec::new("plain", "cat"), full, batch]
}

fn usage() -> Vec<ExecutorUsage> {
    vec![
        ExecutorUsage {
            executor: ExecutorId(3),
            node: "n1".into(),
            bound_ms: 1,
            cpu_ms: 2,
            memory_peak_bytes: 3 << 33,
            throttled_ms: 4,
            ended: Some("out of memory".into()),
        },
        ExecutorUsage {
            executor: ExecutorId(u64::MAX),
            node: String::new(),
            bound_ms: 0,
            cpu_ms: 0,
            memory_peak_bytes: 0,
            throttled_ms: 0,
            ended: None,
        },
    ]
}

/// A job in each state; the later ones with every field set.
fn jobs() -> Vec<JobInfo> {
    let states = [
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::TimedOut,
    ];
    states
        .into_iter()
        .enumerate()
        .map(|(i, state)| {
            let full = i > 0;
            let mut spec = JobSpec::new("train", 4);
            if full {
                spec.name = "nightly".into();
                spec.args = vec!["--epochs".into(), "3".into()];
                spec.env = BTreeMap::from([("SEED".to_string(), "1".to_string())]);
                spec.working_dir = Some("/data".into());
                spec.ranks_per_node = Some(2);
                spec.resources = resources(true);
                spec.time_limit_ms = Some(3_600_000);
                spec.mpi = true;
            }
            JobInfo {
                spec,
                state,
                started_ms: full.then_some(10),
                ended_ms: full.then_some(20 + i as u64),
                ranks: (0..u32::from(full) * 2)
                    .map(|rank| RankInfo {
                        rank,
                        node: format!("n{rank}"),
                        executor: ExecutorId(100 + u64::from(rank)),
                        local_rank: 0,
                        exit_code: (rank == 1).then_some(-9),
                    })
                    .collect(),
                failure: full.then(|| JobFailure {
                    rank: Some(1),
                    exit_code: None,
                    message: "node lost".into(),
                }),
            }
        })
        .collect()
}

fn sessions() -> Vec<StoredSession> {
    let plain = StoredSession {
        id: SessionId(1),
        application: "plain".into(),
        owner: String::new(),
        priority: 0,
        common_data: Payload::default(),
        state: SessionState::Open,
        created_ms: 5,
        closed_ms: None,
        last_task: 0,
        usage: Vec::new(),
        job: None,
    };
    let mut out = vec![plain.clone()];
    for (i, job) in jobs().into_iter().enumerate() {
        out.push(StoredSession {
            id: SessionId(1 << (i * 9)),
            owner: "alice".into(),
            priority: -3 + i as i32,
            common_data: Bytes::from_static(b"\x00common\xff").into(),
            state: SessionState::Closed,
            closed_ms: Some(99),
            last_task: 1 << 33,
            usage: usage(),
            job: Some(job),
            ..plain.clone()
        });
    }
    out
}

fn tasks() -> Vec<StoredTask> {
    vec![
        StoredTask::Pending {
            attempt: 1,
            input: Bytes::from_static(b"input").into(),
        },
        StoredTask::Pending {
            attempt: 300,
            input: Payload::default(),
        },
        StoredTask::Final {
            attempt: 2,
            outcome: TaskOutcome::Succeeded(Bytes::from(vec![7; 200])),
        },
        StoredTask::Final {
            attempt: 1,
            outcome: TaskOutcome::Failed("exit status 3".into()),
        },
        StoredTask::Final {
            attempt: 4,
            outcome: TaskOutcome::Cancelled,
        },
    ]
}

fn nodes() -> Vec<StoredNode> {
    let plain = StoredNode {
        name: "n1".into(),
        allocatable: NodeResources::default(),
        labels: BTreeMap::new(),
        isolation: Isolation::None,
        last_seen_ms: 0,
        draining: false,
    };
    let full = StoredNode {
        name: "gpu-7".into(),
        allocatable: NodeResources {
            cpu_millis: 64_000,
            memory_bytes: 1 << 38,
            gpus: (0..2)
                .map(|index| GpuInfo {
                    index,
                    name: "H100".into(),
                    uuid: format!("GPU-{index}"),
                    memory_bytes: 80 << 30,
                })
                .collect(),
        },
        labels: BTreeMap::from([
            ("rack".to_string(), "r2".to_string()),
            ("zone".to_string(), "b".to_string()),
        ]),
        isolation: Isolation::CgroupV2,
        last_seen_ms: 1_700_000_000_000,
        draining: true,
    };
    vec![plain, full]
}

fn finished() -> Vec<SessionInfo> {
    sessions()
        .into_iter()
        .enumerate()
        .map(|(i, s)| SessionInfo {
            id: s.id,
            application: s.application,
            owner: s.owner,
            priority: s.priority,
            state: s.state,
            ephemeral: i % 2 == 1,
            counts: TaskCounts {
                pending: i as u64,
                running: 1,
                succeeded: 1 << 20,
                failed: 3,
                cancelled: 4,
            },
            executors: i as u32,
            created_ms: s.created_ms,
            closed_ms: s.closed_ms,
            waiting: (i % 2 == 0).then(|| "no node fits".to_string()),
            usage: s.usage,
            job: s.job,
            data: Default::default(),
        })
        .collect()
}

fn tokens() -> Vec<StoredToken> {
    let node = StoredToken {
        kind: TokenKind::Node,
        secret_sha256: [0xab; 32],
        created_ms: 1,
        expires_ms: None,
        revoked: false,
        uses_max: None,
        uses: 0,
        replace: None,
    };
    let user = StoredToken {
        kind: TokenKind::User {
            name: "alice".into(),
            admin: true,
        },
        secret_sha256: std::array::from_fn(|i| i as u8),
        created_ms: 2,
        expires_ms: Some(3),
        revoked: true,
        uses_max: Some(5),
        uses: 4,
        replace: Some("n1".into()),
    };
    vec![node, user]
}

fn certs() -> Vec<StoredCert> {
    vec![
        StoredCert::Revoked {
            serial: Some("0a1b".into()),
            fingerprint: None,
            holder: Some("alice".into()),
            revoked_ms: 7,
        },
        StoredCert::Revoked {
            serial: None,
            fingerprint: Some("ff".into()),
            holder: None,
            revoked_ms: 8,
        },
        StoredCert::Node {
            fingerprint: "00ff".into(),
            issued_ms: 9,
            revoked_ms: None,
        },
        StoredCert::Node {
            fingerprint: "11ee".into(),
            issued_ms: 10,
            revoked_ms: Some(11),
        },
    ]
}

/// A finished view as schemas 6 and 7 wrote it reads, through the migration, as the same
/// view with empty object statistics. Returns the old bytes.
fn finished_v7_layout(info: &SessionInfo) -> Vec<u8> {
    assert_eq!(
        info.data,
        Default::default(),
        "schema 7 kept no object statistics"
    );
    let r = FinishedRecord::from(info);
    let v7 = crate::store::migrate::FinishedRecordV7 {
        id: r.id,
        application: r.application,
        owner: r.owner,
        priority: r.priority,
        state: r.state,
        ephemeral: r.ephemeral,
        counts: r.counts,
        executors: r.executors,
        created_ms: r.created_ms,
        closed_ms: r.closed_ms,
        waiting: r.waiting,
        usage: r.usage,
        job: r.job,
    };
    let bytes = postcard::to_allocvec(&v7).unwrap();
    let read: crate::store::migrate::FinishedRecordV7 = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(SessionInfo::from(FinishedRecord::from(read)), *info);
    round_trip::<_, FinishedRecord>(info);
    bytes
}

/// Every sample, as the bytes schema 6 stored for it (checked against its record).
fn schema_6_bytes() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    out.extend(
        applications()
            .iter()
            .map(same_layout::<_, ApplicationRecord>),
    );
    out.extend(sessions().iter().map(session_v6_layout));
    out.extend(tasks().iter().map(round_trip::<_, TaskRecord>));
    out.extend(nodes().iter().map(same_layout::<_, NodeRecord>));
    out.extend(finished().iter().map(finished_v7_layout));
    out.extend(tokens().iter().map(same_layout::<_, TokenRecord>));
    out.extend(certs().iter().map(same_layout::<_, CertificateRecord>));
    out
}

#[test]
fn records_read_and_write_what_schema_6_stored() {
    // Every shim, session state, job state, outcome, token kind and certificate kind, and
    // every optional field both empty and set, is among the samples.
    assert_eq!(schema_6_bytes().len(), 3 + 7 + 5 + 2 + 7 + 2 + 4);
}

/// The bytes of the samples, pinned: a change to a record fails here. Such a change is a
/// schema change (see the module doc); update the digest only together with a schema bump
/// and a migration.
#[test]
fn records_keep_the_schema_6_layout() {
    let mut all = Vec::new();
    for bytes in schema_6_bytes() {
        all.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        all.extend_from_slice(&bytes);
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &all);
    assert_eq!(
        flame_protocol::auth::hex(digest.as_ref()),
        "30243890e00ec2461a8b65e37ece6d099f85d9e6cad934ac763bcd4b6c67f30a",
        "the records' layout changed: that needs a schema bump and a migration"
    );
}

/// Schema 7's records: a session whose common data is an object, a pending task whose
/// input is one, a final task whose output is one. Their bytes are pinned.
#[test]
fn records_keep_the_schema_7_layout() {
    let object = ObjectRef::of(b"an object");
    let session = StoredSession {
        common_data: Payload::Object(object),
        ..sessions()[1].clone()
    };
    let mut all = Vec::new();
    let mut samples = vec![round_trip::<_, SessionRecord>(&session)];
    for task in [
        StoredTask::Pending {
            attempt: 2,
            input: Payload::Object(object),
        },
        StoredTask::Final {
            attempt: 3,
            outcome: TaskOutcome::Object(object),
        },
    ] {
        samples.push(round_trip::<_, TaskRecord>(&task));
    }
    // Schema 6's task variants keep their index: the appended ones come after them.
    assert_eq!(
        samples[1][0], 2,
        "PendingObject is TaskRecord's third variant"
    );
    assert_eq!(samples[2][0], 1);
    for bytes in samples {
        all.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        all.extend_from_slice(&bytes);
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &all);
    assert_eq!(
        flame_protocol::auth::hex(digest.as_ref()),
        "ec1c7c53b24ac815ec5d09ef2a431559bcf61874e57ee9745c31a0bfe0f9c947",
        "the records' layout changed: that needs a schema bump and a migration"
    );
}

/// Schema 8's record: a finished view that keeps what its object inputs did. Its bytes
/// are pinned.
#[test]
fn records_keep_the_schema_8_layout() {
    let info = SessionInfo {
        data: flame_protocol::model::DataStats {
            object_tasks: 40,
            local_tasks: 39,
            fetched_bytes: 1 << 20,
            local_bytes: 40 << 20,
        },
        ..finished()[1].clone()
    };
    let bytes = round_trip::<_, FinishedRecord>(&info);
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    assert_eq!(
        flame_protocol::auth::hex(digest.as_ref()),
        "4a80d35cd69aafc5aef9de214236cc27718050f73e4d90f029361742a13b2348",
        "the records' layout changed: that needs a schema bump and a migration"
    );
}
