//! The store against real redb files: schema, migrations, group commits, faults.

use super::*;
use bytes::Bytes;

/// Writes a store as schema `schema` left it in `dir`: its version, and the rows `fill`
/// puts in (in that schema's records).
fn write_old_store(dir: &Path, schema: u64, fill: impl FnOnce(&redb::WriteTransaction)) {
    let db = Database::create(dir.join("state.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(META)
        .unwrap()
        .insert(META_SCHEMA, schema)
        .unwrap();
    fill(&txn);
    txn.commit().unwrap();
}

#[test]
fn tasks_survive_reopen_and_second_open_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::Locked { .. })
    ));
    store
        .commit(&[
            StoreOp::PutSession(StoredSession {
                id: SessionId(1),
                application: "a".into(),
                owner: "o".into(),
                priority: 0,
                common_data: Payload::default(),
                state: SessionState::Open,
                created_ms: 0,
                closed_ms: None,
                last_task: 2,
                usage: Vec::new(),
                job: None,
            }),
            StoreOp::AddTasks {
                session: SessionId(1),
                batch_id: 7,
                first: TaskId(1),
                inputs: vec![
                    Bytes::from_static(b"a").into(),
                    Payload::Object(flame_protocol::object::ObjectRef::of(b"b")),
                ],
            },
            StoreOp::FinishTasks {
                session: SessionId(1),
                results: vec![(
                    TaskId(2),
                    1,
                    TaskOutcome::Succeeded(Bytes::from_static(b"B")),
                )],
            },
        ])
        .unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let loaded = store.load().unwrap();
    assert_eq!(loaded.tasks.len(), 2);
    assert!(matches!(loaded.tasks[0].2, StoredTask::Pending { .. }));
    // An object input reads back as the object (schema 7's appended task variant).
    assert_eq!(loaded.tasks.len(), 2);
    assert_eq!(store.final_results(SessionId(1)).unwrap().len(), 1);
}

#[test]
fn a_store_reopens_in_place_while_other_handles_exist_and_probes() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let reader = store.clone();
    store
        .commit(&[StoreOp::AddTasks {
            session: SessionId(1),
            batch_id: 1,
            first: TaskId(1),
            inputs: vec![Bytes::from_static(b"a").into()],
        }])
        .unwrap();
    store.reopen().unwrap();
    // The other handle reads the reopened file; writes go on.
    assert_eq!(reader.batch(SessionId(1), 1).unwrap(), Some((TaskId(1), 1)));
    store.probe().unwrap();
    store.probe().unwrap();
    store
        .commit(&[StoreOp::FinishTasks {
            session: SessionId(1),
            results: vec![(TaskId(1), 1, TaskOutcome::Succeeded(Bytes::new()))],
        }])
        .unwrap();
    assert_eq!(reader.final_results(SessionId(1)).unwrap().len(), 1);
}

#[test]
fn a_reopen_checks_the_schema_again_and_a_failed_one_closes_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // Another schema appears under it (as a restored backup of another version would).
    {
        let txn = store.write_txn().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(META_SCHEMA, 99)
            .unwrap();
        txn.commit().unwrap();
    }
    assert!(matches!(
        store.reopen(),
        Err(StoreError::SchemaMismatch { found: 99, .. })
    ));
    assert!(matches!(store.load(), Err(StoreError::Closed { .. })));
    assert!(matches!(
        store.probe(),
        Err(StoreError::SchemaMismatch { .. })
    ));
}

/// A value serde cannot write.
struct Unencodable;

impl Serialize for Unencodable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("not this one"))
    }
}

#[test]
fn a_record_that_cannot_be_encoded_is_an_error_not_empty_bytes() {
    let e = encode("tasks", &Unencodable).unwrap_err();
    assert!(
        matches!(e, StoreError::Encode { table: "tasks", .. }),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("nothing of this write was stored"),
        "{e}"
    );
    let mut buf = vec![1, 2, 3];
    assert!(matches!(
        encode_into("nodes", &Unencodable, &mut buf),
        Err(StoreError::Encode { table: "nodes", .. })
    ));
}

#[test]
fn schema_mismatch_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_old_store(dir.path(), 99, |_| {});
    assert!(matches!(
        Store::open(dir.path()),
        Err(StoreError::SchemaMismatch { found: 99, .. })
    ));
}

#[test]
fn a_schema_6_store_is_migrated_sessions_keep_inline_common_data_and_tasks_read_as_they_were() {
    let dir = tempfile::tempdir().unwrap();
    let session = migrate::SessionRecordV6 {
        id: 3,
        application: "a".into(),
        owner: "alice".into(),
        priority: 1,
        common_data: Bytes::from_static(b"common"),
        state: records::SessionStateRecord::Open,
        created_ms: 5,
        closed_ms: None,
        last_task: 1,
        usage: Vec::new(),
        job: None,
    };
    write_old_store(dir.path(), 6, |txn| {
        txn.open_table(SESSIONS)
            .unwrap()
            .insert(3, encode("sessions", &session).unwrap().as_slice())
            .unwrap();
        // A schema 6 task record: the first variant, unchanged in schema 7.
        let task = TaskRecord::Pending {
            attempt: 1,
            input: Bytes::from_static(b"in"),
        };
        txn.open_table(TASKS)
            .unwrap()
            .insert((3, 1), encode("tasks", &task).unwrap().as_slice())
            .unwrap();
    });
    let store = Store::open(dir.path()).unwrap();
    let loaded = store.load().unwrap();
    assert_eq!(
        loaded.sessions[0].common_data,
        Payload::Inline(Bytes::from_static(b"common"))
    );
    assert_eq!(loaded.sessions[0].owner, "alice");
    assert_eq!(
        loaded.tasks[0].2,
        StoredTask::Pending {
            attempt: 1,
            input: Payload::Inline(Bytes::from_static(b"in"))
        }
    );
    drop(store);
    // Reopened, it is schema 7 and reads the same.
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.load().unwrap().sessions.len(), 1);
}

#[test]
fn a_schema_5_store_is_migrated_and_owner_uids_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let old = |name: &str, user: Option<&str>| migrate::ApplicationRecordV5 {
        name: name.into(),
        shim: records::ShimRecord::Stdio,
        command: "/bin/cat".into(),
        args: vec!["-u".into()],
        env: BTreeMap::new(),
        working_dir: None,
        user: user.map(str::to_string),
        group: None,
        resources: flame_protocol::model::Resources::default().into(),
        selector: BTreeMap::new(),
        max_instances: 7,
        delay_release_ms: 5,
        max_attempts: 2,
        retry_on_error: true,
        task_timeout_ms: Some(9),
        allow_root: false,
    };
    write_old_store(dir.path(), 5, |txn| {
        let mut apps = txn.open_table(APPS).unwrap();
        for app in [old("open", None), old("svc", Some("nobody"))] {
            apps.insert(
                app.name.as_str(),
                encode("applications", &app).unwrap().as_slice(),
            )
            .unwrap();
        }
        drop(apps);
        let token = migrate::TokenRecordV5 {
            kind: records::TokenKindRecord::User {
                name: "bob".into(),
                admin: false,
            },
            secret_sha256: [9; 32],
            created_ms: 1,
            expires_ms: Some(2),
            revoked: true,
        };
        txn.open_table(TOKENS)
            .unwrap()
            .insert("t1", encode("tokens", &token).unwrap().as_slice())
            .unwrap();
    });
    let store = Store::open(dir.path()).unwrap();
    let tokens = store.load_tokens().unwrap();
    assert_eq!(tokens.len(), 1);
    let (id, token) = &tokens[0];
    assert_eq!(id, "t1");
    assert_eq!(
        (token.secret_sha256, token.expires_ms, token.revoked),
        ([9; 32], Some(2), true)
    );
    assert_eq!(
        (token.uses_max, token.uses, &token.replace),
        (None, 0, &None)
    );
    let loaded = store.load().unwrap();
    let open = loaded
        .applications
        .iter()
        .find(|a| a.name == "open")
        .unwrap();
    assert!(open.users.is_empty() && open.groups.is_empty());
    assert_eq!((open.max_instances, open.task_timeout_ms), (7, Some(9)));
    assert_eq!(open.args, vec!["-u".to_string()]);
    let svc = loaded
        .applications
        .iter()
        .find(|a| a.name == "svc")
        .unwrap();
    assert_eq!(svc.user.as_deref(), Some("nobody"));
    assert_eq!(
        svc.users,
        vec![migrate::MIGRATED_FIXED_IDENTITY_USER.to_string()]
    );
    assert!(!svc.allows("alice", |_| true));
    store
        .commit(&[StoreOp::PutOwnerUid {
            owner: "alice".into(),
            uid: 1_900_000_000,
        }])
        .unwrap();
    drop(store);
    let loaded = Store::open(dir.path()).unwrap().load().unwrap();
    assert_eq!(
        loaded.owner_uids,
        vec![("alice".to_string(), 1_900_000_000)]
    );
}

#[test]
fn a_schema_7_store_is_migrated_and_finished_sessions_read_with_empty_object_statistics() {
    let dir = tempfile::tempdir().unwrap();
    let old = migrate::FinishedRecordV7 {
        id: 4,
        application: "a".into(),
        owner: "alice".into(),
        priority: 2,
        state: records::SessionStateRecord::Closed,
        ephemeral: false,
        counts: records::CountsRecord {
            pending: 0,
            running: 0,
            succeeded: 7,
            failed: 1,
            cancelled: 0,
        },
        executors: 0,
        created_ms: 10,
        closed_ms: Some(20),
        waiting: None,
        usage: Vec::new(),
        job: None,
    };
    // Session 4, and more sessions than one migration pass rewrites, after a gap.
    let many = 100..100 + 2 * MIGRATION_ROWS_PER_PASS as u64 + 1;
    write_old_store(dir.path(), 7, |txn| {
        let mut finished = txn.open_table(FINISHED).unwrap();
        let bytes = encode("finished", &old).unwrap();
        for id in std::iter::once(4).chain(many.clone()) {
            finished.insert(id, bytes.as_slice()).unwrap();
        }
    });
    let store = Store::open(dir.path()).unwrap();
    for id in [many.start, many.end - 1] {
        let last = store.finished_session(SessionId(id)).unwrap().unwrap();
        assert_eq!(last.data, Default::default(), "session {id}");
    }
    let info = store.finished_session(SessionId(4)).unwrap().unwrap();
    assert_eq!((info.owner.as_str(), info.counts.succeeded), ("alice", 7));
    assert_eq!(info.data, Default::default());
    // A finished view written now keeps its statistics across a reopen.
    let data = flame_protocol::model::DataStats {
        object_tasks: 3,
        local_tasks: 2,
        fetched_bytes: 5,
        local_bytes: 6,
    };
    let mut newer = info.clone();
    newer.id = SessionId(5);
    newer.data = data;
    store
        .commit(&[StoreOp::PutFinished(Box::new(newer))])
        .unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.finished_session(SessionId(5)).unwrap().unwrap().data,
        data
    );
    assert_eq!(store.finished_session(SessionId(4)).unwrap().unwrap(), info);
}
