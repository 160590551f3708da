//! The object book: puts and their grants, locations, tenancy, lost nodes, task outputs,
//! the end of a session, quotas, and object inputs at dispatch.

use super::*;
use flame_protocol::messages::ObjectService;
use flame_protocol::object::{
    CacheUsage, GrantAccess, ObjectCommand, ObjectEvent, ObjectId, ObjectLocations, ObjectOrigin,
    ObjectRef, ObjectScope, ObjectTarget,
};
use flame_protocol::object_grant::{check_read, check_write, verify, GrantError};

/// An object service with `free` bytes of cache.
fn service(port: u16, free: u64) -> ObjectService {
    ObjectService {
        port,
        advertise: None,
        host: "host-a".into(),
        socket: None,
        usage: CacheUsage {
            memory_used: 0,
            memory_capacity: free,
            disk_used: 0,
            disk_capacity: 0,
            objects: 0,
        },
    }
}

/// A harness whose `n1` serves objects, and `n2` (conn 2) too with more free cache.
fn two_object_nodes() -> Harness {
    let mut h = Harness::build(CoreConfig::default(), Some(service(7001, 1 << 20)));
    connect(&mut h, "n2", 2, Some(service(7002, 1 << 30)));
    h
}

fn connect(h: &mut Harness, name: &str, conn: ConnId, objects: Option<ObjectService>) {
    h.core.handle(
        Event::NodeConnected {
            address: "10.0.0.2".into(),
            conn,
            registration: NodeRegistration {
                name: name.into(),
                allocatable: flame_protocol::model::NodeResources {
                    cpu_millis: 1000,
                    memory_bytes: 1 << 30,
                    gpus: Vec::new(),
                },
                labels: Default::default(),
                isolation: flame_protocol::model::Isolation::None,
                identity: flame_protocol::model::ExecutorIdentity::OwnerUid,
                executors: vec![],
                objects,
            },
        },
        h.now,
    );
    h.step();
}

fn put(h: &mut Harness, owner: &str, objects: Vec<ObjectRef>, replicas: u32) -> ClientResponse {
    h.client(ClientRequest::PutObjects {
        owner: owner.into(),
        session: None,
        objects,
        replicas,
    })
}

fn targets(r: ClientResponse) -> Vec<ObjectTarget> {
    match r {
        ClientResponse::ObjectTargets(t) => t,
        other => panic!("unexpected {other:?}"),
    }
}

fn locate(h: &mut Harness, owner: &str, ids: Vec<ObjectId>) -> ObjectLocations {
    match h.client(ClientRequest::LocateObjects {
        owner: owner.into(),
        ids,
    }) {
        ClientResponse::ObjectLocations(l) => l,
        other => panic!("unexpected {other:?}"),
    }
}

/// `node` (on `conn`) reports it stored `owner`'s object.
fn stored(h: &mut Harness, conn: ConnId, owner: &str, object: ObjectRef, scope: ObjectScope) {
    h.core.handle(
        Event::NodeMessage {
            conn,
            message: NodeToHead::Objects {
                events: vec![ObjectEvent::Stored {
                    owner: owner.into(),
                    object,
                    scope,
                }],
                usage: CacheUsage::default(),
            },
        },
        h.now,
    );
    h.step();
}

/// The object commands `conn`'s node got since last asked.
fn object_commands(h: &mut Harness, conn: ConnId) -> Vec<ObjectCommand> {
    commands_in(h.core.frames(conn))
        .into_iter()
        .filter_map(|c| match c {
            NodeCommand::Objects(o) => Some(o),
            _ => None,
        })
        .collect()
}

#[test]
fn a_put_gets_targets_with_a_write_grant_nodes_verify() {
    let mut h = two_object_nodes();
    // Nodes get the key grants are checked with when they register.
    let key = h.core.grant_key();
    assert_eq!(key.0.len(), 32);
    let registered = h.core.frames(2);
    assert!(
        registered.iter().any(|f| matches!(f,
            HeadToNode::Registered { grant_key, inline_max, .. }
                if *grant_key == key && *inline_max == limits::OBJECT_INLINE_BYTES_DEFAULT)),
        "{registered:?}"
    );
    let object = ObjectRef::of(b"some bytes");
    let t = targets(put(&mut h, "alice", vec![object], 1));
    // One copy: on the node with the most free cache, at the address it connects from.
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].endpoint.node, "n2");
    assert_eq!(t[0].endpoint.addr, "10.0.0.2:7002".parse().unwrap());
    let body = verify(&key, &t[0].grant, h.now).unwrap();
    assert_eq!(body.owner, "alice");
    assert_eq!(
        check_write(body, "n2"),
        Ok((ObjectScope::Kept, object.size))
    );
    assert!(matches!(
        check_write(body, "n1"),
        Err(GrantError::WrongNode { .. })
    ));
    // Two copies: two distinct nodes.
    let t = targets(put(&mut h, "alice", vec![ObjectRef::of(b"other")], 2));
    let mut nodes: Vec<&str> = t.iter().map(|t| t.endpoint.node.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, ["n1", "n2"]);
    // More copies than nodes serving objects: refused, not fewer copies in silence.
    match put(&mut h, "alice", vec![ObjectRef::of(b"x")], 3) {
        ClientResponse::Error(e) => assert_eq!(e.kind, ErrorKind::Unavailable, "{e}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn objects_are_located_with_a_read_grant_and_other_owners_see_nothing() {
    let mut h = two_object_nodes();
    let key = h.core.grant_key();
    let object = ObjectRef::of(b"alice's");
    targets(put(&mut h, "alice", vec![object], 1));
    // Before the node confirms: the node it was put on is where to look.
    let l = locate(&mut h, "alice", vec![object.id]);
    assert_eq!(l.objects[0].nodes, vec![0]);
    assert_eq!(l.endpoints[0].node, "n2");
    stored(&mut h, 2, "alice", object, ObjectScope::Kept);
    let never = ObjectId::of(b"never put");
    let l = locate(&mut h, "alice", vec![object.id, never]);
    assert_eq!(l.objects[0].object, object);
    assert_eq!(l.endpoints[l.objects[0].nodes[0] as usize].node, "n2");
    assert_eq!(l.objects[1].missing.as_deref(), Some("never stored"));
    let body = verify(&key, &l.grant, h.now).unwrap();
    check_read(body, "alice", &object.id).unwrap();
    assert!(check_read(body, "alice", &never).is_err());
    assert!(check_read(body, "bob", &object.id).is_err());
    // Bob asking for alice's id under his own name finds nothing and gets no access:
    // keys are (owner, id), so the answer is the same as for an id never stored, and
    // says nothing about alice. (Naming owner `alice` is refused by the server's
    // `authorize` with PermissionDenied on the name alone, before the core is asked.)
    let l = locate(&mut h, "bob", vec![object.id]);
    assert!(l.objects[0].nodes.is_empty());
    assert_eq!(l.objects[0].missing.as_deref(), Some("never stored"));
    let body = verify(&key, &l.grant, h.now).unwrap();
    assert!(check_read(body, "bob", &object.id).is_err());
    match h.client(ClientRequest::RemoveObjects {
        owner: "bob".into(),
        ids: vec![object.id],
    }) {
        ClientResponse::Error(e) => assert_eq!(e.kind, ErrorKind::NotFound, "{e}"),
        other => panic!("unexpected {other:?}"),
    }
    match h.client(ClientRequest::ListObjects {
        owner: "bob".into(),
        session: None,
    }) {
        ClientResponse::Objects(list) => assert!(list.is_empty()),
        other => panic!("unexpected {other:?}"),
    }
    // Alice's listing shows it; her removal tells its holder to drop it.
    match h.client(ClientRequest::ListObjects {
        owner: "alice".into(),
        session: None,
    }) {
        ClientResponse::Objects(list) => {
            assert_eq!(list.len(), 1);
            assert_eq!(list[0].nodes, vec!["n2".to_string()]);
            assert_eq!(list[0].origin, ObjectOrigin::Put);
        }
        other => panic!("unexpected {other:?}"),
    }
    object_commands(&mut h, 2);
    assert!(matches!(
        h.client(ClientRequest::RemoveObjects {
            owner: "alice".into(),
            ids: vec![object.id],
        }),
        ClientResponse::Ok
    ));
    assert_eq!(
        object_commands(&mut h, 2),
        vec![ObjectCommand::Remove {
            owner: "alice".into(),
            ids: vec![object.id],
        }]
    );
}

#[test]
fn a_lost_node_takes_its_copies_and_replicas_are_made_again() {
    let mut h = two_object_nodes();
    connect(&mut h, "n3", 3, Some(service(7003, 1 << 10)));
    let single = ObjectRef::of(b"one copy");
    let double = ObjectRef::of(b"two copies");
    targets(put(&mut h, "alice", vec![single], 1));
    let t = targets(put(&mut h, "alice", vec![double], 2));
    let nodes: Vec<&str> = t.iter().map(|t| t.endpoint.node.as_str()).collect();
    assert_eq!(nodes, ["n2", "n1"], "most free cache first");
    stored(&mut h, 2, "alice", single, ObjectScope::Kept);
    stored(&mut h, 2, "alice", double, ObjectScope::Kept);
    stored(&mut h, 1, "alice", double, ObjectScope::Kept);
    h.core.handle(
        Event::NodeDisconnected {
            conn: 2,
            reason: "gone".into(),
        },
        h.now,
    );
    h.step();
    let l = locate(&mut h, "alice", vec![single.id, double.id]);
    assert!(l.objects[0].nodes.is_empty());
    assert_eq!(l.objects[0].missing.as_deref(), Some("lost with node n2"));
    // n1 holds it; n3 is told to copy it (expected there until it confirms).
    let nodes: Vec<&str> = l.objects[1]
        .nodes
        .iter()
        .map(|&i| l.endpoints[i as usize].node.as_str())
        .collect();
    assert_eq!(nodes, ["n1", "n3"]);
    // The object put with two copies gets its second copy again, on n3, from n1.
    match &object_commands(&mut h, 3)[..] {
        [ObjectCommand::Replicate {
            owner,
            scope,
            sources,
        }] => {
            assert_eq!(owner, "alice");
            assert_eq!(*scope, ObjectScope::Kept);
            assert_eq!(sources.object, double);
            assert_eq!(sources.endpoints[0].node, "n1");
            let body = verify(&h.core.grant_key(), &sources.grant, h.now).unwrap();
            check_read(body, "alice", &double.id).unwrap();
        }
        other => panic!("expected a replicate, got {other:?}"),
    }

    // A task whose input is the lost object fails, naming it, instead of running (n3
    // drained, so its executor goes to n1).
    assert!(matches!(
        h.client(ClientRequest::DrainNode { name: "n3".into() }),
        ClientResponse::Ok
    ));
    let sid = session_id(h.client(ClientRequest::CreateSession(SessionSpec {
        owner: "alice".into(),
        ephemeral: true,
        ..SessionSpec::new("ping")
    })));
    let (_, mut watch) = h.core.watch(sid, h.now);
    let _ = h.core.request(
        Request::Submit {
            session: sid,
            batch_id: 1,
            inputs: vec![Payload::Object(single)],
        },
        h.now,
    );
    h.step();
    launched_and_ready(&mut h);
    let failed = loop {
        match h.core.watched(&mut watch) {
            Ok(WatchMsg::Results(r)) => break r,
            Ok(_) => continue,
            Err(e) => panic!("no result: {e:?}"),
        }
    };
    match &failed[0].outcome {
        TaskOutcome::Failed(m) => assert_eq!(
            *m,
            format!(
                "input object {} of owner alice has no copy left (lost with node n2)",
                single.id
            )
        ),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn object_inputs_carry_sources_and_are_counted_and_outputs_record_their_node() {
    let mut h = Harness::build(
        CoreConfig {
            // The nodes stay while the clock passes the objects' retention.
            heartbeat_timeout_ms: 10 * limits::SESSION_OBJECTS_RETENTION.as_millis() as u64,
            ..CoreConfig::default()
        },
        Some(service(7001, 1 << 20)),
    );
    connect(&mut h, "n2", 2, Some(service(7002, 1 << 30)));
    let sid = session_id(h.client(ClientRequest::CreateSession(SessionSpec {
        owner: "alice".into(),
        ..SessionSpec::new("ping")
    })));
    let here = ObjectRef::of(b"on n1");
    let there = ObjectRef::of(b"on n2");
    // Both are put on n2 (the most free cache); n1 reports a copy of `here` too.
    targets(put(&mut h, "alice", vec![here, there], 1));
    stored(&mut h, 1, "alice", here, ObjectScope::Kept);
    stored(&mut h, 2, "alice", there, ObjectScope::Kept);
    // Executors go to n1 only.
    assert!(matches!(
        h.client(ClientRequest::DrainNode { name: "n2".into() }),
        ClientResponse::Ok
    ));
    let _ = h.core.request(
        Request::Submit {
            session: sid,
            batch_id: 1,
            inputs: vec![Payload::Object(here), Payload::Object(there)],
        },
        h.now,
    );
    h.step();
    let launches: Vec<(ConnId, ExecutorId)> = [1, 2]
        .into_iter()
        .flat_map(|conn| {
            commands_in(h.core.frames(conn))
                .into_iter()
                .filter_map(move |c| match c {
                    NodeCommand::Launch { executor, .. } => Some((conn, executor)),
                    _ => None,
                })
        })
        .collect();
    let (conn, executor) = *launches
        .iter()
        .find(|(conn, _)| *conn == 1)
        .expect("an executor on n1");
    h.core.handle(
        Event::NodeMessage {
            conn,
            message: NodeToHead::ExecutorEvents(vec![ExecutorEvent::Ready {
                executor,
                credit: 2,
            }]),
        },
        h.now,
    );
    h.step();
    let runs: Vec<TaskAssignment> = commands_in(h.core.frames(1))
        .into_iter()
        .filter_map(|c| match c {
            NodeCommand::Run(a) => Some(a),
            _ => None,
        })
        .collect();
    assert_eq!(runs.len(), 2, "{runs:?}");
    // n1 holds `here`: no sources. `there` is on n2: fetched from there with a grant.
    assert_eq!(runs[0].input, Payload::Object(here));
    assert!(runs[0].sources.is_none());
    let sources = runs[1]
        .sources
        .as_ref()
        .expect("sources for an object n1 lacks");
    assert_eq!(sources.object, there);
    assert_eq!(sources.endpoints[0].node, "n2");
    let body = verify(&h.core.grant_key(), &sources.grant, h.now).unwrap();
    check_read(body, "alice", &there.id).unwrap();
    assert!(matches!(&body.access, GrantAccess::Read { ids } if ids == &vec![there.id]));
    match h.client(ClientRequest::GetSession { id: sid }) {
        ClientResponse::Session(info) => {
            assert_eq!(info.data.object_tasks, 2);
            assert_eq!(info.data.local_tasks, 1);
            assert_eq!(info.data.local_bytes, here.size);
            assert_eq!(info.data.fetched_bytes, there.size);
        }
        other => panic!("unexpected {other:?}"),
    }
    // An output kept on n1: the head records n1 as its holder, scoped to the session.
    let output = ObjectRef::of(b"a large output");
    h.node(NodeToHead::Results(vec![NodeTaskResult {
        exit_code: None,
        executor,
        session: sid,
        task: runs[0].task,
        attempt: runs[0].attempt,
        outcome: TaskOutcome::Object(output),
    }]));
    match h.client(ClientRequest::ListObjects {
        owner: "alice".into(),
        session: Some(sid),
    }) {
        ClientResponse::Objects(list) => {
            assert_eq!(list.len(), 1, "{list:?}");
            assert_eq!(list[0].object, output);
            assert_eq!(list[0].nodes, vec!["n1".to_string()]);
            assert_eq!(list[0].scope, ObjectScope::Session(sid));
            assert_eq!(
                list[0].origin,
                ObjectOrigin::Output {
                    session: sid,
                    task: runs[0].task
                }
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    let l = locate(&mut h, "alice", vec![output.id]);
    assert_eq!(l.endpoints[0].node, "n1");
    // The session ends: its objects leave the book and the nodes are told.
    h.node(NodeToHead::Results(vec![NodeTaskResult {
        exit_code: None,
        executor,
        session: sid,
        task: runs[1].task,
        attempt: runs[1].attempt,
        outcome: TaskOutcome::Succeeded(Bytes::from_static(b"small")),
    }]));
    object_commands(&mut h, 1);
    assert!(matches!(
        h.client(ClientRequest::CloseSession { id: sid }),
        ClientResponse::Ok
    ));
    // Its outputs stay readable for a while after the end, for late readers.
    assert_eq!(object_commands(&mut h, 1), vec![]);
    let l = locate(&mut h, "alice", vec![output.id]);
    assert_eq!(l.endpoints[0].node, "n1");
    h.now += limits::SESSION_OBJECTS_RETENTION.as_millis() as u64 + 1;
    tick(&mut h);
    assert_eq!(
        object_commands(&mut h, 1),
        vec![ObjectCommand::EndSession {
            owner: "alice".into(),
            session: sid,
        }]
    );
    let l = locate(&mut h, "alice", vec![output.id, here.id]);
    assert_eq!(l.objects[0].missing.as_deref(), Some("never stored"));
    // A kept object a session used stays.
    assert!(!l.objects[1].nodes.is_empty());
}

#[test]
fn object_quotas_refuse_puts_past_them() {
    let quotas = crate::quotas::Quotas {
        objects: 2,
        object_bytes: 100,
        ..crate::quotas::Quotas::default()
    };
    let mut h = Harness::build(
        CoreConfig {
            quotas: crate::quotas::QuotaBook::uniform(quotas),
            // The node stays while the clock passes a grant's life.
            heartbeat_timeout_ms: 10 * limits::OBJECT_GRANT_TTL.as_millis() as u64,
            ..CoreConfig::default()
        },
        Some(service(7001, 1 << 20)),
    );
    let a = ObjectRef {
        id: ObjectId::of(b"a"),
        size: 40,
    };
    let b = ObjectRef {
        id: ObjectId::of(b"b"),
        size: 40,
    };
    targets(put(&mut h, "alice", vec![a, b], 1));
    // Putting the same objects again adds nothing to count.
    targets(put(&mut h, "alice", vec![a], 1));
    match put(&mut h, "alice", vec![ObjectRef::of(b"c")], 1) {
        ClientResponse::Error(e) => {
            assert_eq!(e.kind, ErrorKind::QuotaExceeded);
            assert!(e.message.contains("objects 2 of 2"), "{e}");
        }
        other => panic!("unexpected {other:?}"),
    }
    // Another owner has quotas of its own; bytes count too.
    let big = ObjectRef {
        id: ObjectId::of(b"big"),
        size: 101,
    };
    match put(&mut h, "bob", vec![big], 1) {
        ClientResponse::Error(e) => {
            assert_eq!(e.kind, ErrorKind::QuotaExceeded);
            assert!(e.message.contains("object_bytes"), "{e}");
        }
        other => panic!("unexpected {other:?}"),
    }
    targets(put(
        &mut h,
        "bob",
        vec![ObjectRef {
            id: ObjectId::of(b"ok"),
            size: 100,
        }],
        1,
    ));
    // A put never confirmed is given up after the grant's life, and its quota freed.
    h.now += limits::OBJECT_GRANT_TTL.as_millis() as u64 + 1;
    tick(&mut h);
    assert_eq!(h.core.objects.len(), 0);
    targets(put(&mut h, "alice", vec![ObjectRef::of(b"c")], 1));
}

#[test]
fn puts_for_a_session_must_be_the_owners_and_for_a_live_session() {
    let mut h = Harness::build(CoreConfig::default(), Some(service(7001, 1 << 20)));
    let sid = session_id(h.client(ClientRequest::CreateSession(SessionSpec {
        owner: "alice".into(),
        ..SessionSpec::new("ping")
    })));
    let put_for = |h: &mut Harness, owner: &str, session| {
        h.client(ClientRequest::PutObjects {
            owner: owner.into(),
            session: Some(session),
            objects: vec![ObjectRef::of(b"x")],
            replicas: 1,
        })
    };
    match put_for(&mut h, "bob", sid) {
        ClientResponse::Error(e) => assert_eq!(e.kind, ErrorKind::PermissionDenied, "{e}"),
        other => panic!("unexpected {other:?}"),
    }
    let t = targets(put_for(&mut h, "alice", sid));
    let body = verify(&h.core.grant_key(), &t[0].grant, h.now).unwrap();
    assert_eq!(check_write(body, "n1"), Ok((ObjectScope::Session(sid), 1)));
    match put_for(&mut h, "alice", SessionId(999)) {
        ClientResponse::Error(e) => assert_eq!(e.kind, ErrorKind::NotFound, "{e}"),
        other => panic!("unexpected {other:?}"),
    }
}

/// A session of alice's whose task 1 made `output` on n1, then n1 was lost and n2 (conn
/// 2) joined; task 2's input is `output`. Returns the session, its watcher, and the runs
/// n2 got (its executor's id first).
fn output_lost_with_its_node(
    output: ObjectRef,
) -> (
    Harness,
    SessionId,
    crate::watch::WatchSource,
    ExecutorId,
    Vec<TaskAssignment>,
) {
    let mut h = Harness::build(CoreConfig::default(), Some(service(7001, 1 << 20)));
    let sid = session_id(h.client(ClientRequest::CreateSession(SessionSpec {
        owner: "alice".into(),
        ephemeral: true,
        ..SessionSpec::new("ping")
    })));
    let (_, mut watch) = h.core.watch(sid, h.now);
    let _ = h.core.request(
        Request::Submit {
            session: sid,
            batch_id: 1,
            inputs: vec![Bytes::from_static(b"make it").into()],
        },
        h.now,
    );
    h.step();
    let executor = launched_and_ready(&mut h);
    let run = runs_sent(&mut h).remove(0);
    h.node(NodeToHead::Results(vec![NodeTaskResult {
        exit_code: None,
        executor,
        session: sid,
        task: run.task,
        attempt: run.attempt,
        outcome: TaskOutcome::Object(output),
    }]));
    assert!(matches!(h.core.watched(&mut watch), Ok(WatchMsg::Results(r)) if r.len() == 1));
    h.core.handle(
        Event::NodeDisconnected {
            conn: 1,
            reason: "gone".into(),
        },
        h.now,
    );
    h.step();
    let l = locate(&mut h, "alice", vec![output.id]);
    assert_eq!(
        l.objects[0].missing.as_deref(),
        Some(
            format!(
                "being rebuilt by re-running task {} of session {sid}",
                run.task
            )
            .as_str()
        )
    );
    connect(&mut h, "n2", 2, Some(service(7002, 1 << 20)));
    let _ = h.core.request(
        Request::Submit {
            session: sid,
            batch_id: 2,
            inputs: vec![Payload::Object(output)],
        },
        h.now,
    );
    h.step();
    // The first executor launched there takes the work (a second may be launched).
    let executor = commands_in(h.core.frames(2))
        .into_iter()
        .find_map(|c| match c {
            NodeCommand::Launch { executor, .. } => Some(executor),
            _ => None,
        })
        .expect("a launch on n2");
    h.core.handle(
        Event::NodeMessage {
            conn: 2,
            message: NodeToHead::ExecutorEvents(vec![ExecutorEvent::Ready {
                executor,
                credit: 2,
            }]),
        },
        h.now,
    );
    h.step();
    let runs: Vec<TaskAssignment> = commands_in(h.core.frames(2))
        .into_iter()
        .filter_map(|c| match c {
            NodeCommand::Run(a) => Some(a),
            _ => None,
        })
        .collect();
    // The hidden re-run of task 1, with its input, at an attempt past its own; task 2
    // waits for the object.
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].task, run.task);
    assert_eq!(runs[0].attempt, run.attempt + 1);
    assert_eq!(runs[0].input, Payload::from(Bytes::from_static(b"make it")));
    (h, sid, watch, executor, runs)
}

fn rerun_result(
    h: &mut Harness,
    sid: SessionId,
    executor: ExecutorId,
    run: &TaskAssignment,
    outcome: TaskOutcome,
) {
    h.core.handle(
        Event::NodeMessage {
            conn: 2,
            message: NodeToHead::Results(vec![NodeTaskResult {
                exit_code: None,
                executor,
                session: sid,
                task: run.task,
                attempt: run.attempt,
                outcome,
            }]),
        },
        h.now,
    );
    h.step();
}

#[test]
fn a_lost_output_is_rebuilt_by_a_hidden_rerun_and_its_task_keeps_its_result() {
    let output = ObjectRef::of(b"deterministic output");
    let (mut h, sid, mut watch, executor, runs) = output_lost_with_its_node(output);
    rerun_result(&mut h, sid, executor, &runs[0], TaskOutcome::Object(output));
    // The object is on n2 now; task 2 runs there without fetching.
    let l = locate(&mut h, "alice", vec![output.id]);
    assert_eq!(l.endpoints[l.objects[0].nodes[0] as usize].node, "n2");
    let next: Vec<TaskAssignment> = commands_in(h.core.frames(2))
        .into_iter()
        .filter_map(|c| match c {
            NodeCommand::Run(a) => Some(a),
            _ => None,
        })
        .collect();
    assert_eq!(next.len(), 1, "{next:?}");
    assert_eq!(next[0].input, Payload::Object(output));
    assert!(next[0].sources.is_none());
    // Task 1's result was given once; the re-run is no second result.
    assert!(h.core.watched(&mut watch).is_err());
    let c = counts(&mut h, sid);
    assert_eq!((c.succeeded, c.running, c.pending), (1, 1, 0));
}

#[test]
fn a_rerun_with_other_bytes_leaves_the_output_lost_and_its_readers_fail() {
    let output = ObjectRef::of(b"first bytes");
    let (mut h, sid, mut watch, executor, runs) = output_lost_with_its_node(output);
    rerun_result(
        &mut h,
        sid,
        executor,
        &runs[0],
        TaskOutcome::Object(ObjectRef::of(b"other bytes")),
    );
    let l = locate(&mut h, "alice", vec![output.id]);
    let missing = l.objects[0].missing.clone().unwrap_or_default();
    assert!(
        missing.starts_with("lost with node n1")
            && missing.ends_with("rebuilt output differs (non-deterministic task)"),
        "{missing}"
    );
    // Task 2, held for the object, fails naming it; task 1 keeps its result.
    let results = match h.core.watched(&mut watch) {
        Ok(WatchMsg::Results(r)) => r,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(results.len(), 1);
    assert!(
        matches!(&results[0].outcome, TaskOutcome::Failed(m)
            if m.contains(&output.id.to_string()) && m.contains("non-deterministic")),
        "{results:?}"
    );
    let c = counts(&mut h, sid);
    assert_eq!((c.succeeded, c.failed), (1, 1));
}

#[test]
fn after_a_head_restart_copies_of_a_session_that_ended_just_before_stay_a_retention() {
    // A head restarted; sessions 1 to 3 had ended and left memory before it. A node's
    // inventory names a copy of session 3's object: late readers of its last results may
    // still read it, so it is kept (a retention from the start), not dropped at once.
    let loaded = crate::store::Loaded {
        next_session: 4,
        ..Default::default()
    };
    let mut h = Harness {
        core: Driver::new(Core::new(
            CoreConfig {
                // The node stays while the clock passes the objects' retention.
                heartbeat_timeout_ms: 10 * limits::SESSION_OBJECTS_RETENTION.as_millis() as u64,
                ..CoreConfig::default()
            },
            loaded,
        )),
        now: 1_000,
        conn: 1,
    };
    connect(&mut h, "n1", 1, Some(service(7001, 1 << 20)));
    let object = ObjectRef::of(b"the last result of session 3");
    let sid = SessionId(3);
    h.now += 500;
    stored(&mut h, 1, "alice", object, ObjectScope::Session(sid));
    assert_eq!(
        object_commands(&mut h, 1),
        vec![],
        "dropped in its retention"
    );
    let l = locate(&mut h, "alice", vec![object.id]);
    assert_eq!(l.objects[0].nodes.len(), 1, "{l:?}");
    assert_eq!(l.endpoints[0].node, "n1");
    // Another owner naming that session keeps nothing.
    let other = ObjectRef::of(b"bob's");
    stored(&mut h, 1, "bob", other, ObjectScope::Session(sid));
    assert_eq!(
        object_commands(&mut h, 1),
        vec![ObjectCommand::EndSession {
            owner: "bob".into(),
            session: sid,
        }]
    );
    // A retention from the start, it goes.
    h.now = 1_000 + limits::SESSION_OBJECTS_RETENTION.as_millis() as u64;
    tick(&mut h);
    assert_eq!(
        object_commands(&mut h, 1),
        vec![ObjectCommand::EndSession {
            owner: "alice".into(),
            session: sid,
        }]
    );
    let l = locate(&mut h, "alice", vec![object.id]);
    assert_eq!(l.objects[0].missing.as_deref(), Some("never stored"));
    // A copy reported after that is dropped at once.
    stored(&mut h, 1, "alice", object, ObjectScope::Session(sid));
    assert_eq!(
        object_commands(&mut h, 1),
        vec![ObjectCommand::EndSession {
            owner: "alice".into(),
            session: sid,
        }]
    );
    let l = locate(&mut h, "alice", vec![object.id]);
    assert_eq!(l.objects[0].missing.as_deref(), Some("never stored"));
}
