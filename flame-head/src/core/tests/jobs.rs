//! Batch jobs in the core: a job starts whole, its ranks end together, its deadline,
//! its logs before it starts, and a rank outcome that must be written again.

use super::*;
/// Submits a 2-rank job of half-cpu ranks on the harness's 1-cpu node: returns its id
/// and its executors, all launched in one plan.
fn submit_job(h: &mut Harness, time_limit_ms: Option<u64>) -> (SessionId, Vec<ExecutorId>) {
    use flame_protocol::model::JobSpec;
    let mut job = JobSpec::new("/bin/work", 2);
    job.resources.cpu_millis = 500;
    // Within the node's 1 GiB: a job's default is a GiB per rank.
    job.resources.memory_bytes = Some(256 << 20);
    job.time_limit_ms = time_limit_ms;
    let id = session_id(h.client(ClientRequest::CreateSession(SessionSpec {
        job: Some(job),
        ..SessionSpec::new("")
    })));
    let launched: Vec<ExecutorId> = h
        .commands()
        .into_iter()
        .filter_map(|c| match c {
            NodeCommand::Launch {
                executor,
                application,
                ..
            } => {
                assert_eq!(application.shim, ShimKind::Batch);
                assert_eq!(application.name, format!("job.{}", id.0));
                Some(executor)
            }
            _ => None,
        })
        .collect();
    assert_eq!(launched.len(), 2, "all ranks are launched in one plan");
    (id, launched)
}

/// Starts a 2-rank job of half-cpu ranks on the harness's 1-cpu node: returns its id,
/// its executors in launch order, and the rank tasks it runs once every rank is bound.
fn started_job(h: &mut Harness, time_limit_ms: Option<u64>) -> (SessionId, Vec<TaskAssignment>) {
    let (id, launched) = submit_job(h, time_limit_ms);
    let mut runs = Vec::new();
    for (i, &executor) in launched.iter().enumerate() {
        h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Ready {
            executor,
            credit: 1,
        }]));
        assert!(
            h.commands()
                .iter()
                .any(|c| matches!(c, NodeCommand::Bind { executor: e, .. } if *e == executor)),
            "a ready rank is bound"
        );
        h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Bound {
            executor,
            session: id,
        }]));
        runs = runs_sent(h);
        if i == 0 {
            assert!(
                runs.is_empty(),
                "a rank started before every rank was bound"
            );
        }
    }
    assert_eq!(runs.len(), 2, "every rank starts once all are bound");
    (id, runs)
}

#[test]
fn logs_of_a_job_not_started_are_answered_when_it_starts_under_the_same_id() {
    let mut h = Harness::new();
    let (id, launched) = submit_job(&mut h, None);
    let logs = |h: &mut Harness| {
        h.core.request(
            Request::LogTargets {
                session: id,
                executor: None,
            },
            h.now,
        )
    };
    let waiting = logs(&mut h);
    let gone = logs(&mut h);
    for reply in [waiting, gone] {
        assert!(matches!(
            h.core.reply_to(reply),
            Some(Reply::LogTargets(Ok(LogTargets::WhenStarted)))
        ));
    }
    // The second caller went away: forgotten, never answered again.
    h.core.handle(
        Event::CallersGone {
            replies: vec![gone],
        },
        h.now,
    );
    for (i, &executor) in launched.iter().enumerate() {
        h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Ready {
            executor,
            credit: 1,
        }]));
        h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Bound {
            executor,
            session: id,
        }]));
        if i == 0 {
            assert!(
                h.core.reply_to(waiting).is_none(),
                "answered before it started"
            );
        }
    }
    match h.core.reply_to(waiting) {
        Some(Reply::JobLogTargets(Ok(targets))) => {
            assert_eq!(targets, vec![("n1".to_string(), launched.clone())]);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(h.core.reply_to(gone).is_none());
    assert!(h.core.unanswered.is_empty());
}

fn job_of(h: &mut Harness, id: SessionId) -> JobInfo {
    match h.client(ClientRequest::GetSession { id }) {
        ClientResponse::Session(info) => info.job.expect("a job"),
        other => panic!("unexpected {other:?}"),
    }
}

fn kills(h: &mut Harness) -> Vec<ExecutorId> {
    h.commands()
        .into_iter()
        .filter_map(|c| match c {
            NodeCommand::Kill { executor } => Some(executor),
            _ => None,
        })
        .collect()
}

fn exited(h: &mut Harness, executor: ExecutorId) {
    h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Exited {
        executor,
        reason: "killed by the node".into(),
        usage: Usage::default(),
    }]));
}

#[test]
fn a_job_starts_whole_and_its_first_failed_rank_stops_the_rest_after_a_grace() {
    let mut h = Harness::new();
    let (id, runs) = started_job(&mut h, None);
    // Each rank's task carries its rank, the world and the hostfile.
    for (rank, run) in runs.iter().enumerate() {
        assert_eq!(run.task, TaskId(rank as u64 + 1));
        let launch = RankLaunch::decode(run.input.inline().unwrap()).unwrap();
        let env: BTreeMap<String, String> = launch.env.into_iter().collect();
        assert_eq!(env["FLAME_RANK"], rank.to_string());
        assert_eq!(env["RANK"], rank.to_string());
        assert_eq!(env["WORLD_SIZE"], "2");
        assert_eq!(env["FLAME_LOCAL_RANK"], rank.to_string());
        assert_eq!(env["FLAME_NODELIST"], "n1");
        assert_eq!(env["MASTER_ADDR"], "127.0.0.1");
        assert_eq!(launch.hostfile, "n1 slots=2\n");
        assert!(!launch.hold && launch.argv.is_none());
    }
    let job = job_of(&mut h, id);
    assert_eq!(job.state, JobState::Running);
    assert_eq!(job.ranks.len(), 2);

    // Rank 1 exits with 3; rank 0 gets the grace, then is killed.
    h.node(NodeToHead::Results(vec![NodeTaskResult {
        executor: runs[1].executor,
        session: id,
        task: runs[1].task,
        attempt: runs[1].attempt,
        outcome: TaskOutcome::Failed("rank exited with status 3".into()),
        exit_code: Some(3),
    }]));
    h.now += JOB_FAIL_GRACE_MS - 1;
    tick(&mut h);
    assert!(kills(&mut h).is_empty(), "killed before the grace ran out");
    h.now += 1;
    tick(&mut h);
    // Every rank goes, the one still running and the one whose process ended.
    let mut killed = kills(&mut h);
    killed.sort();
    assert_eq!(killed, vec![runs[0].executor, runs[1].executor]);
    for run in &runs {
        exited(&mut h, run.executor);
    }

    let job = job_of(&mut h, id);
    assert_eq!(job.state, JobState::Failed);
    let failure = job.failure.clone().unwrap();
    assert_eq!((failure.rank, failure.exit_code), (Some(1), Some(3)));
    assert_eq!(job.exit_code(), Some(3));
    assert_eq!(job.ranks[1].exit_code, Some(3));
}

#[test]
fn a_job_past_its_time_limit_is_stopped_and_says_so() {
    let mut h = Harness::new();
    let (id, runs) = started_job(&mut h, Some(1_000));
    h.now += 999;
    tick(&mut h);
    assert!(kills(&mut h).is_empty());
    h.now += 1;
    tick(&mut h);
    let mut killed = kills(&mut h);
    killed.sort();
    let mut ranks: Vec<ExecutorId> = runs.iter().map(|r| r.executor).collect();
    ranks.sort();
    assert_eq!(killed, ranks);
    for executor in ranks {
        exited(&mut h, executor);
    }
    let job = job_of(&mut h, id);
    assert_eq!(job.state, JobState::TimedOut);
    assert_eq!(job.exit_code(), Some(124));
}

#[test]
fn a_job_spec_is_checked_and_cannot_be_ephemeral() {
    use flame_protocol::model::JobSpec;
    let mut h = Harness::new();
    let mut job = JobSpec::new("/bin/work", 3);
    job.ranks_per_node = Some(2);
    match h.client(ClientRequest::CreateSession(SessionSpec {
        job: Some(job),
        ..SessionSpec::new("")
    })) {
        ClientResponse::Error(e) => assert!(e.message.contains("ranks_per_node"), "{e}"),
        other => panic!("unexpected {other:?}"),
    }
    match h.client(ClientRequest::CreateSession(SessionSpec {
        job: Some(JobSpec::new("/bin/work", 1)),
        ephemeral: true,
        ..SessionSpec::new("")
    })) {
        ClientResponse::Error(e) => assert!(e.message.contains("ephemeral"), "{e}"),
        other => panic!("unexpected {other:?}"),
    }
    // Job applications are not listed.
    match h.client(ClientRequest::ListApplications) {
        ClientResponse::Applications(list) => {
            assert!(list.iter().all(|a| a.spec.shim != ShimKind::Batch))
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn a_running_job_that_lost_a_rank_in_a_restart_fails() {
    use crate::store::Loaded;
    use flame_protocol::model::JobSpec;
    let id = SessionId(7);
    let mut job = JobInfo::queued(JobSpec::new("/bin/work", 2));
    job.state = JobState::Running;
    job.started_ms = Some(1);
    let loaded = Loaded {
        sessions: vec![StoredSession {
            id,
            application: "job.7".into(),
            owner: "o".into(),
            priority: 0,
            common_data: Payload::default(),
            state: SessionState::Closed,
            created_ms: 0,
            closed_ms: Some(0),
            last_task: 2,
            usage: Vec::new(),
            job: Some(job),
        }],
        tasks: (1..=2)
            .map(|t| {
                let task = StoredTask::Pending {
                    attempt: 1,
                    input: Payload::default(),
                };
                (id, TaskId(t), task)
            })
            .collect(),
        ..Default::default()
    };
    let mut core = Driver::new(Core::new(CoreConfig::default(), loaded));
    // No node is known, so nothing can come back to report the ranks.
    core.start_recovery(5, 10_000);
    let ops = core.settle_ops(5);
    // It finished and left memory; its view is what the store serves from now on.
    assert!(!core.holds_session(id));
    let info = ops
        .into_iter()
        .find_map(|op| match op {
            StoreOp::PutFinished(info) if info.id == id => Some(info),
            _ => None,
        })
        .expect("the finished job's view is stored as it leaves memory");
    assert!(info.is_finished(), "{info:#?}");
    let job = info.job.unwrap();
    assert_eq!(job.state, JobState::Failed, "{job:#?}");
    assert!(job.failure.unwrap().message.contains("restarted"));
}

#[test]
fn a_job_that_loses_a_rank_before_it_starts_fails_and_gives_the_rest_back() {
    let mut h = Harness::new();
    let (id, launched) = submit_job(&mut h, None);
    h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Ready {
        executor: launched[0],
        credit: 1,
    }]));
    h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Bound {
        executor: launched[0],
        session: id,
    }]));
    h.commands();
    // The other rank never comes up.
    h.node(NodeToHead::ExecutorEvents(vec![ExecutorEvent::Exited {
        executor: launched[1],
        reason: "cannot create the executor's cgroup".into(),
        usage: Usage::default(),
    }]));
    assert_eq!(kills(&mut h), vec![launched[0]], "the rank it held goes");
    exited(&mut h, launched[0]);
    let job = job_of(&mut h, id);
    assert_eq!(job.state, JobState::Failed, "{job:#?}");
    let failure = job.failure.unwrap();
    assert_eq!(failure.rank, None);
    assert!(failure.message.contains("cgroup"), "{failure:?}");
    assert!(job.ranks.is_empty(), "it never started");
    // Its application is no place for other sessions.
    match h.client(ClientRequest::CreateSession(SessionSpec::new(format!(
        "job.{}",
        id.0
    )))) {
        ClientResponse::Error(e) => assert_eq!(e.kind, ErrorKind::InvalidArgument),
        ClientResponse::Session(_) => panic!("a session on a job's application"),
        _ => {} // the application may already be forgotten
    }
}

#[test]
fn a_rank_outcome_that_fails_to_persist_is_written_again_never_rerun() {
    let mut h = Harness::new();
    let (id, runs) = started_job(&mut h, None);
    h.core.handle(
        Event::NodeMessage {
            conn: 1,
            message: NodeToHead::Results(vec![NodeTaskResult {
                executor: runs[0].executor,
                session: id,
                task: runs[0].task,
                attempt: runs[0].attempt,
                outcome: TaskOutcome::Succeeded(Bytes::new()),
                exit_code: Some(0),
            }]),
        },
        h.now,
    );
    h.core.end_batch(h.now);
    // The disk is full: that commit fails.
    while let Some(req) = h.core.next_store_request() {
        h.core.commit(&req, Err(injected_failure()), h.now);
        h.core.end_batch(h.now);
    }
    assert!(
        !h.commands()
            .iter()
            .any(|c| matches!(c, NodeCommand::Run(_))),
        "a rank was run again"
    );
    // The next tick writes it again, and this time it holds.
    h.now += 200;
    tick(&mut h);
    match h.client(ClientRequest::GetSession { id }) {
        ClientResponse::Session(info) => {
            assert_eq!(info.counts.succeeded, 1, "{info:#?}");
            assert_eq!(info.counts.pending, 0, "{info:#?}");
        }
        other => panic!("unexpected {other:?}"),
    }
}
