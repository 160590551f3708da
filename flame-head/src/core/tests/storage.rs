//! Storage faults, quotas and memory: writes refused while the store is faulted,
//! owners' quotas, and sessions leaving memory.

use super::*;
#[test]
fn a_storage_fault_refuses_writes_at_once_and_holds_results_until_it_clears() {
    let mut h = Harness::new();
    let sid = session_id(h.client(ClientRequest::CreateSession(SessionSpec::new("ping"))));
    let (_, mut watch) = h.core.watch(sid, h.now);
    let inputs: Vec<Payload> = vec![Bytes::from_static(b"x").into()];
    let ack = h.core.request(
        Request::Submit {
            session: sid,
            batch_id: 1,
            inputs,
        },
        h.now,
    );
    h.step();
    assert!(matches!(
        h.core.answer(ack),
        Some(SubmitReply::Accepted { .. })
    ));
    let executor = match &h.commands()[..] {
        [NodeCommand::Launch { executor, .. }] => *executor,
        other => panic!("expected one launch, got {other:?}"),
    };
    h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Ready {
        executor,
        credit: 2,
    }]));
    let cmds = h.commands();
    let Some(NodeCommand::Run(run)) = cmds.get(1).cloned() else {
        panic!("expected a run, got {cmds:?}")
    };

    let fault = crate::storage_fault::StorageFault {
        kind: crate::storage_fault::FaultKind::DiskFull,
        detail: "No space left on device (os error 28)".into(),
        data_dir: "/var/lib/flame".into(),
    };
    h.core.handle(Event::StorageFaulted { fault }, h.now);
    // Writes are answered at once, with the cause and what to do.
    for request in [
        ClientRequest::CreateSession(SessionSpec::new("ping")),
        ClientRequest::CloseSession { id: sid },
        ClientRequest::DrainNode { name: "n1".into() },
    ] {
        match h.client(request) {
            ClientResponse::Error(e) => {
                assert_eq!(e.kind, ErrorKind::Unavailable);
                assert!(e.message.contains("disk is full"), "{}", e.message);
                assert!(e.message.contains("/var/lib/flame"), "{}", e.message);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let inputs: Vec<Payload> = vec![Bytes::from_static(b"y").into()];
    let refused = h.core.request(
        Request::Submit {
            session: sid,
            batch_id: 2,
            inputs,
        },
        h.now,
    );
    assert!(
        matches!(h.core.answer(refused), Some(SubmitReply::Rejected { error, .. }) if error.message.contains("disk is full"))
    );
    // Reads still work, and the refused close left the session open.
    match h.client(ClientRequest::GetSession { id: sid }) {
        ClientResponse::Session(info) => assert_eq!(info.state, SessionState::Open),
        other => panic!("unexpected {other:?}"),
    }
    // The running task's result is held: not shown, not written, not run again.
    h.node(NodeToHead::Results(vec![NodeTaskResult {
        exit_code: Some(0),
        executor,
        session: sid,
        task: run.task,
        attempt: run.attempt,
        outcome: TaskOutcome::Succeeded(Bytes::from_static(b"X")),
    }]));
    for _ in 0..5 {
        h.now += 200;
        tick(&mut h);
    }
    assert!(
        h.core.watched(&mut watch).is_err(),
        "a result was shown before it was durable"
    );
    assert!(
        !h.commands()
            .iter()
            .any(|c| matches!(c, NodeCommand::Run(_))),
        "a task was run again"
    );
    assert_eq!(counts(&mut h, sid).running, 1);

    // The probe succeeded: the held result is written, then shown once, attempt 1.
    h.core.handle(Event::StorageRecovered, h.now);
    h.step();
    match h.core.watched(&mut watch) {
        Ok(WatchMsg::Results(r)) => {
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].attempt, run.attempt);
            assert_eq!(
                r[0].outcome,
                TaskOutcome::Succeeded(Bytes::from_static(b"X"))
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(
        h.client(ClientRequest::CloseSession { id: sid }),
        ClientResponse::Ok
    ));
    assert!(matches!(h.core.watched(&mut watch), Ok(WatchMsg::Finished)));
}

#[test]
fn a_close_that_fails_to_persist_leaves_the_session_open_never_finished() {
    let mut h = Harness::new();
    let sid = session_id(h.client(ClientRequest::CreateSession(SessionSpec::new("ping"))));
    let (_, mut watch) = h.core.watch(sid, h.now);
    let closed = h.core.request(
        Request::Client(ClientRequest::CloseSession { id: sid }),
        h.now,
    );
    h.core.end_batch(h.now);
    // Not finished before the close is durable, and not after it failed.
    assert!(h.core.watched(&mut watch).is_err());
    while let Some(req) = h.core.next_store_request() {
        h.core.commit(&req, Err(injected_failure()), h.now);
        h.core.end_batch(h.now);
    }
    assert!(matches!(
        h.core.answer(closed),
        Some(ClientResponse::Error(_))
    ));
    assert!(
        h.core.watched(&mut watch).is_err(),
        "Finished shown for a close that failed"
    );
    match h.client(ClientRequest::GetSession { id: sid }) {
        ClientResponse::Session(info) => assert_eq!(info.state, SessionState::Open),
        other => panic!("unexpected {other:?}"),
    }
    // Sent again, it holds.
    assert!(matches!(
        h.client(ClientRequest::CloseSession { id: sid }),
        ClientResponse::Ok
    ));
    assert!(matches!(h.core.watched(&mut watch), Ok(WatchMsg::Finished)));
}

#[test]
fn a_close_whose_commit_lands_after_the_session_left_memory_is_answered() {
    // Simulation seed 157: a cancelled session finished at once, its final record was on
    // its way to the store; a close sent then wrote the record again and waited for
    // that commit, which landed after the session had left memory, and the close was
    // never answered. The session's closed record is durable either way (a session
    // leaves memory only once it is), so the close is answered Ok even when its own
    // commit failed.
    for close_commit in [Ok(()), Err(injected_failure())] {
        let mut h = Harness::new();
        let sid = session_id(h.client(ClientRequest::CreateSession(SessionSpec::new("ping"))));
        let cancel = h.core.request(
            Request::Client(ClientRequest::CancelSession { id: sid }),
            h.now,
        );
        h.core.end_batch(h.now);
        // Everything is durable but the finished session's way out of memory (with the
        // cancel, in the same batch).
        let mut evict = None;
        while let Some(req) = h.core.next_store_request() {
            if req
                .ops
                .iter()
                .any(|op| matches!(op, StoreOp::PutFinished(_)))
            {
                evict = Some(req);
                continue;
            }
            h.core.commit(&req, Ok(()), h.now);
            h.core.end_batch(h.now);
        }
        let evict = evict.expect("the finished session is written on its way out");
        let close = h.core.request(
            Request::Client(ClientRequest::CloseSession { id: sid }),
            h.now,
        );
        h.core.end_batch(h.now);
        let close_req = h.core.next_store_request().expect("the close is written");
        h.core.commit(&evict, Ok(()), h.now);
        h.core.end_batch(h.now);
        assert!(!h.core.holds_session(sid), "the session left memory");
        assert!(matches!(h.core.answer(cancel), Some(ClientResponse::Ok)));
        let failed = close_commit.is_err();
        h.core.commit(&close_req, close_commit, h.now);
        h.core.end_batch(h.now);
        let answer = h.core.answer::<ClientResponse>(close);
        assert!(
            matches!(answer, Some(ClientResponse::Ok)),
            "close (its commit failed: {failed}) answered {answer:?}, dropped: {}",
            h.core.unanswered.contains(&close)
        );
    }
}

fn spec_of(owner: &str, ephemeral: bool, common: &'static [u8]) -> SessionSpec {
    SessionSpec {
        owner: owner.into(),
        ephemeral,
        common_data: Bytes::from_static(common).into(),
        ..SessionSpec::new("ping")
    }
}

fn submit(
    h: &mut Harness,
    session: SessionId,
    batch_id: u64,
    inputs: &[&'static [u8]],
) -> SubmitReply {
    let rx = h.core.request(
        Request::Submit {
            session,
            batch_id,
            inputs: inputs
                .iter()
                .map(|b| Bytes::from_static(b).into())
                .collect(),
        },
        h.now,
    );
    h.step();
    h.core.answer(rx).expect("a submit reply")
}

fn quota_error(r: ClientResponse) -> ApiError {
    match r {
        ClientResponse::Error(e) if e.kind == ErrorKind::QuotaExceeded => e,
        other => panic!("expected a quota refusal, got {other:?}"),
    }
}

fn rejected_for_quota(r: SubmitReply) -> ApiError {
    match r {
        SubmitReply::Rejected { error, .. } if error.kind == ErrorKind::QuotaExceeded => error,
        other => panic!("expected a quota refusal, got {other:?}"),
    }
}

#[test]
fn quotas_refuse_sessions_tasks_and_bytes_by_name_and_come_back_when_released() {
    let quotas = crate::quotas::Quotas {
        open_sessions: 2,
        pending_tasks: 3,
        input_bytes: 100,
        ..Default::default()
    };
    let mut h = Harness::with_config(CoreConfig {
        quotas: QuotaBook::uniform(quotas),
        ..CoreConfig::default()
    });
    let bob1 = session_id(h.client(ClientRequest::CreateSession(spec_of("bob", false, b"c"))));
    let _bob2 = session_id(h.client(ClientRequest::CreateSession(spec_of("bob", false, b""))));
    let e = quota_error(h.client(ClientRequest::CreateSession(spec_of("bob", false, b""))));
    assert!(
        e.message
            .starts_with("quota exceeded: open sessions 2 of 2 for owner bob;")
            && e.message.ends_with("quotas.open_sessions"),
        "{e}"
    );
    // Another owner is not held back by bob.
    let alice = session_id(h.client(ClientRequest::CreateSession(spec_of("alice", false, b""))));
    // Tasks: three fit, a fourth does not, and a refused batch holds nothing.
    assert!(matches!(
        submit(&mut h, bob1, 1, &[b"aa", b"bb", b"cc"]),
        SubmitReply::Accepted { count: 3, .. }
    ));
    let e = rejected_for_quota(submit(&mut h, bob1, 2, &[b"dd"]));
    assert!(
        e.message.contains("pending tasks 3 of 3 for owner bob"),
        "{e}"
    );
    assert_eq!(
        h.core.held("bob"),
        crate::quotas::Held {
            sessions: 2,
            tasks: 3,
            bytes: 7
        }
    );
    // Bytes: alice's one task of 101 bytes is over her 100.
    let e = rejected_for_quota(submit(&mut h, alice, 1, &[&[b'x'; 101]]));
    assert!(
        e.message.contains(
            "bytes held in the head's memory 0 of 100 for owner alice (this request adds 101)"
        ),
        "{e}"
    );
    assert_eq!(h.core.ledger_mismatch(), None);
    // Cancelled, bob's session finishes, leaves memory, and gives everything back.
    assert!(matches!(
        h.client(ClientRequest::CancelSession { id: bob1 }),
        ClientResponse::Ok
    ));
    h.step();
    assert!(!h.core.holds_session(bob1));
    assert_eq!(
        h.core.held("bob"),
        crate::quotas::Held {
            sessions: 1,
            tasks: 0,
            bytes: 0
        }
    );
    session_id(h.client(ClientRequest::CreateSession(spec_of("bob", false, b""))));
    assert_eq!(h.core.ledger_mismatch(), None);
}

#[test]
fn an_ephemeral_session_holds_its_tasks_until_it_leaves_memory() {
    let quotas = crate::quotas::Quotas {
        pending_tasks: 2,
        ..Default::default()
    };
    let mut h = Harness::with_config(CoreConfig {
        quotas: QuotaBook::uniform(quotas),
        ..CoreConfig::default()
    });
    let eph = session_id(h.client(ClientRequest::CreateSession(spec_of("eve", true, b""))));
    assert!(matches!(
        submit(&mut h, eph, 1, &[b"a", b"b"]),
        SubmitReply::Accepted { count: 2, .. }
    ));
    let e = rejected_for_quota(submit(&mut h, eph, 2, &[b"c"]));
    assert!(
        e.message.contains("pending tasks 2 of 2 for owner eve"),
        "{e}"
    );
    // Final, its results stay in memory with it (it has no store), so they still count.
    assert!(matches!(
        h.client(ClientRequest::CancelSession { id: eph }),
        ClientResponse::Ok
    ));
    h.step();
    assert!(h.core.holds_session(eph));
    assert_eq!(h.core.held("eve").tasks, 2);
    let eph2 = session_id(h.client(ClientRequest::CreateSession(spec_of("eve", true, b""))));
    let e = rejected_for_quota(submit(&mut h, eph2, 1, &[b"c"]));
    assert!(
        e.message.contains("pending tasks 2 of 2 for owner eve"),
        "{e}"
    );
    // `EPHEMERAL_KEPT_MS` later it is gone, and so is what it held.
    h.now += EPHEMERAL_KEPT_MS + 1;
    h.core.handle(Event::Tick, h.now);
    h.step();
    assert!(!h.core.holds_session(eph));
    // Only the second, open and empty, is left.
    assert_eq!(
        h.core.held("eve"),
        crate::quotas::Held {
            sessions: 1,
            tasks: 0,
            bytes: 0
        }
    );
    assert_eq!(h.core.ledger_mismatch(), None);
}

#[test]
fn a_finished_session_leaves_memory_and_is_served_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::Store::open(dir.path()).unwrap();
    let mut core = Driver::new(Core::new(CoreConfig::default(), store.load().unwrap()));
    core.ensure_application(ApplicationSpec::new("ping", "flame-ping"));
    // The writer, for real: every request committed to redb, then reported.
    let commit = |core: &mut Driver| {
        core.end_batch(1);
        while let Some(req) = core.next_store_request() {
            let result = store.commit(&req.ops).map_err(|e| {
                CommitError::Faulted(crate::storage_fault::classify(&e, dir.path(), None))
            });
            core.commit(&req, result, 1);
            core.end_batch(1);
        }
    };
    let ask = |core: &mut Driver, request: ClientRequest| core.request(Request::Client(request), 1);
    let created = ask(
        &mut core,
        ClientRequest::CreateSession(spec_of("bob", false, b"common")),
    );
    commit(&mut core);
    let id = session_id(core.answer(created).unwrap());
    let inputs = (0..20_000)
        .map(|i| Bytes::from(format!("task {i}")).into())
        .collect();
    let acked = core.request(
        Request::Submit {
            session: id,
            batch_id: 1,
            inputs,
        },
        1,
    );
    commit(&mut core);
    assert!(matches!(
        core.answer(acked),
        Some(SubmitReply::Accepted { count: 20_000, .. })
    ));
    let before = core.tasks.sessions.len();
    assert_eq!(core.held("bob").tasks, 20_000);
    let cancelled = ask(&mut core, ClientRequest::CancelSession { id });
    commit(&mut core);
    assert!(matches!(core.answer(cancelled), Some(ClientResponse::Ok)));
    // Out of memory: the session table shrank, and the owner holds nothing.
    assert!(!core.holds_session(id));
    assert_eq!(core.tasks.sessions.len(), before - 1);
    assert!(core.held("bob").is_zero());
    // Its view, owner, tasks and results are served from the store.
    let info = store.finished_session(id).unwrap().expect("its final view");
    assert!(info.is_finished(), "{info:?}");
    assert_eq!(info.owner, "bob");
    assert_eq!(info.counts.cancelled, 20_000);
    let page = store
        .final_results_page(id, TaskId(0), 8_192, usize::MAX)
        .unwrap();
    assert_eq!(page.len(), 8_192);
    assert_eq!(page[0].task, TaskId(1));
    let next = store
        .final_results_page(id, TaskId(8_192), 8_192, 64)
        .unwrap();
    assert_eq!(next.first().map(|r| r.task), Some(TaskId(8_193)));
    assert!(next.len() < 8_192, "a page stops at its byte bound");
    // The core sends the server to the store for it, and refuses nothing it should not.
    let rx = core.request(
        Request::ListTasks {
            session: id,
            states: vec![],
            after: TaskId(0),
            limit: 10,
        },
        1,
    );
    assert!(matches!(core.answer(rx), Some(Ok(None))));
    let (rx, _source) = core.watch(id, 1);
    assert!(matches!(
        core.answer(rx),
        Some(Ok(WatchStart {
            backfill: Backfill::Store,
            finished: true
        }))
    ));
    let closed = ask(&mut core, ClientRequest::CloseSession { id });
    assert!(matches!(core.answer(closed), Some(ClientResponse::Ok)));
    // A resend of its batch is acked from the store, as it was.
    let resent = core.request(
        Request::Submit {
            session: id,
            batch_id: 1,
            inputs: vec![Bytes::from_static(b"task 0").into()],
        },
        1,
    );
    let resent = store.settle_refused(id, core.answer(resent).unwrap());
    assert!(
        matches!(resent, SubmitReply::Accepted { count: 20_000, .. }),
        "{resent:?}"
    );
    // After a restart the finished session is not loaded again.
    drop(core);
    let loaded = store.load().unwrap();
    assert!(loaded.sessions.iter().all(|s| s.id != id));
    assert!(loaded.tasks.is_empty());
}
