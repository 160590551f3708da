//! The window without processes: commands, answers and a clock in, steps out.

use super::*;
use flame_protocol::{ExecutorId, TaskId};
use proptest::prelude::*;

fn run(session: u64, task: u64, bytes: usize) -> Command {
    Command::Run(TaskAssignment {
        executor: ExecutorId(1),
        session: SessionId(session),
        task: TaskId(task),
        attempt: 1,
        input: Bytes::from(vec![0u8; bytes]).into(),
        sources: None,
    })
}

fn bind(session: u64) -> Command {
    Command::Bind {
        session: SessionId(session),
        common_data: Bytes::new(),
    }
}

fn wait(p: &mut Pipeline) -> Wait {
    match p.step() {
        Step::Wait(w) => w,
        Step::Apply(h) => panic!("expected a wait, got {h:?}"),
    }
}

/// A pipeline bound to session 1.
fn bound(now: Instant, timeout: Option<Duration>) -> Pipeline {
    let mut p = Pipeline::new(timeout, now);
    p.ready();
    assert!(wait(&mut p).commands);
    assert_eq!(p.command(bind(1), now).unwrap(), None);
    assert_eq!(
        p.step(),
        Step::Apply(Held::Bind {
            session: SessionId(1),
            common_data: Bytes::new()
        })
    );
    p.entered();
    assert_eq!(p.phase(), Phase::Bound(SessionId(1)));
    p
}

#[test]
fn an_idle_executor_takes_commands_and_watches_its_process() {
    let now = Instant::now();
    let mut p = Pipeline::new(Some(Duration::from_secs(1)), now);
    p.ready();
    assert_eq!(
        p.step(),
        Step::Wait(Wait {
            commands: true,
            answers: false,
            exit: true,
            deadline: None
        })
    );
}

#[test]
fn the_window_stops_at_its_task_count() {
    let now = Instant::now();
    let mut p = bound(now, None);
    for task in 0..PIPELINE_TASKS_MAX as u64 {
        assert!(wait(&mut p).commands, "room for task {task}");
        let written = p.command(run(1, task, 10), now).unwrap().unwrap();
        assert_eq!(written.task, TaskId(task));
    }
    let w = wait(&mut p);
    assert!(!w.commands && w.answers && !w.exit);
    assert_eq!(p.answered(now).unwrap().task, TaskId(0));
    assert!(wait(&mut p).commands);
}

#[test]
fn the_window_stops_at_its_bytes_but_one_task_of_any_size_goes() {
    let now = Instant::now();
    let mut p = bound(now, None);
    p.command(run(1, 1, PIPELINE_BYTES_MAX * 2), now).unwrap();
    assert!(!wait(&mut p).commands, "past the byte bound");
    p.answered(now).unwrap();
    p.command(run(1, 2, PIPELINE_BYTES_MAX - 1), now).unwrap();
    assert!(wait(&mut p).commands, "one byte of room left");
    p.command(run(1, 3, 1), now).unwrap();
    assert!(!wait(&mut p).commands);
}

#[test]
fn answers_come_in_order_and_the_timeout_counts_from_the_oldest() {
    let t0 = Instant::now();
    let timeout = Duration::from_secs(10);
    let mut p = bound(t0, Some(timeout));
    p.command(run(1, 1, 1), t0).unwrap();
    let t1 = t0 + Duration::from_secs(3);
    p.command(run(1, 2, 1), t1).unwrap();
    assert_eq!(
        wait(&mut p).deadline,
        Some(t0 + timeout),
        "task 1 runs since t0"
    );
    assert_eq!(p.oldest().unwrap().task, TaskId(1));
    let t2 = t0 + Duration::from_secs(5);
    assert_eq!(p.answered(t2).unwrap().task, TaskId(1));
    assert_eq!(
        wait(&mut p).deadline,
        Some(t2 + timeout),
        "task 2 runs since t2"
    );
    assert_eq!(p.answered(t2).unwrap().task, TaskId(2));
    assert_eq!(wait(&mut p).deadline, None, "nothing in flight");
    assert_eq!(p.answered(t2), None);
}

#[test]
fn an_unbind_waits_for_the_tasks_sent_before_it_and_holds_the_intake() {
    let now = Instant::now();
    let mut p = bound(now, None);
    p.command(run(1, 1, 1), now).unwrap();
    p.command(run(1, 2, 1), now).unwrap();
    assert_eq!(p.command(Command::Unbind, now).unwrap(), None);
    let w = wait(&mut p);
    assert!(!w.commands, "nothing is taken after a held command");
    assert!(w.answers && !w.exit);
    p.answered(now).unwrap();
    assert!(!wait(&mut p).commands);
    p.answered(now).unwrap();
    assert_eq!(p.step(), Step::Apply(Held::Unbind));
    p.left();
    assert_eq!(p.phase(), Phase::Idle);
    assert!(wait(&mut p).commands);
    assert_eq!(p.command(Command::Release, now).unwrap(), None);
    assert_eq!(p.step(), Step::Apply(Held::Release));
}

#[test]
fn a_command_the_phase_refuses_changes_nothing() {
    let now = Instant::now();
    let mut p = bound(now, None);
    let e = p.command(run(2, 1, 1), now).unwrap_err();
    assert_eq!(e.phase, Phase::Bound(SessionId(1)));
    assert_eq!(p.in_flight(), 0);
    assert!(p.command(Command::Release, now).is_err());
    assert!(wait(&mut p).commands);
    let mut idle = Pipeline::new(None, now);
    idle.ready();
    assert!(idle.command(run(1, 1, 1), now).is_err());
}

/// What a head (well-behaved or not) and an application do next.
#[derive(Debug, Clone)]
enum Op {
    Bind(u64),
    Run(u64, usize),
    Unbind,
    Release,
    Answer,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (1u64..3).prop_map(Op::Bind),
        8 => ((1u64..3), prop_oneof![0usize..64, Just(PIPELINE_BYTES_MAX / 2)])
            .prop_map(|(s, b)| Op::Run(s, b)),
        1 => Just(Op::Unbind),
        1 => Just(Op::Release),
        6 => Just(Op::Answer),
    ]
}

proptest! {
    /// Whatever comes: answers in the order the tasks were written, never more in flight
    /// than the window allows, nothing taken while a command is held, and a held command
    /// applied only after every task taken before it was answered.
    #[test]
    fn the_window_keeps_its_invariants(ops in proptest::collection::vec(op(), 0..400)) {
        let t0 = Instant::now();
        let mut p = Pipeline::new(Some(Duration::from_secs(1)), t0);
        p.ready();
        let mut next_task = 0u64;
        let mut written: VecDeque<(u64, usize)> = VecDeque::new();
        let mut held_after: Option<usize> = None; // tasks in flight when it was held
        for (i, op) in ops.into_iter().enumerate() {
            let now = t0 + Duration::from_millis(i as u64);
            let w = match p.step() {
                Step::Apply(h) => {
                    prop_assert!(written.is_empty(), "{h:?} applied with tasks in flight");
                    prop_assert!(held_after.take().is_some());
                    match h {
                        Held::Bind { .. } => p.entered(),
                        Held::Unbind => p.left(),
                        Held::Release => break,
                    }
                    continue;
                }
                Step::Wait(w) => w,
            };
            prop_assert_eq!(w.answers, !written.is_empty());
            prop_assert_eq!(w.exit, written.is_empty());
            prop_assert_eq!(w.deadline.is_some(), !written.is_empty());
            let bytes: usize = written.iter().map(|(_, b)| b).sum();
            prop_assert_eq!(
                w.commands,
                held_after.is_none() && written.len() < PIPELINE_TASKS_MAX && bytes < PIPELINE_BYTES_MAX
            );
            let command = match op {
                Op::Answer if w.answers => {
                    let done = p.answered(now).unwrap();
                    let (task, _) = written.pop_front().unwrap();
                    prop_assert_eq!(done.task, TaskId(task), "answers in order");
                    continue;
                }
                Op::Answer => continue,
                _ if !w.commands => continue,
                Op::Bind(s) => bind(s),
                Op::Run(s, b) => {
                    next_task += 1;
                    run(s, next_task, b)
                }
                Op::Unbind => Command::Unbind,
                Op::Release => Command::Release,
            };
            let before = p.phase();
            let is_run = matches!(command, Command::Run(_));
            match p.command(command, now) {
                Ok(Some(a)) => {
                    prop_assert!(is_run);
                    written.push_back((a.task.0, a.input.held_bytes()));
                }
                Ok(None) => {
                    prop_assert!(!is_run);
                    held_after = Some(written.len());
                }
                Err(_) => prop_assert_eq!(p.phase(), before),
            }
            prop_assert!(p.in_flight() <= PIPELINE_TASKS_MAX);
            prop_assert_eq!(p.in_flight(), written.len());
        }
    }
}
