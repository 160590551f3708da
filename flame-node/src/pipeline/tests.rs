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

/// A run whose input is an object of `bytes` bytes, which the driver must resolve.
fn run_object(session: u64, task: u64, bytes: u64) -> Command {
    Command::Run(TaskAssignment {
        executor: ExecutorId(1),
        session: SessionId(session),
        task: TaskId(task),
        attempt: 1,
        input: Payload::Object(flame_protocol::object::ObjectRef {
            id: flame_protocol::object::ObjectId([task as u8; 32]),
            size: bytes,
        }),
        sources: None,
    })
}

fn bind(session: u64) -> Command {
    Command::Bind {
        session: SessionId(session),
        common_data: Payload::default(),
        sources: None,
    }
}

/// Writes what is ready (the tasks' ids, in order) and returns the wait after it.
fn settle(p: &mut Pipeline, now: Instant) -> (Vec<TaskId>, Wait) {
    let mut written = Vec::new();
    loop {
        match p.step(now) {
            Step::Write { task, .. } => written.push(task),
            Step::Wait(w) => return (written, w),
            other => panic!("expected a write or a wait, got {other:?}"),
        }
    }
}

fn wait(p: &mut Pipeline) -> Wait {
    settle(p, Instant::now()).1
}

/// A pipeline bound to session 1.
fn bound(now: Instant, timeout: Option<Duration>) -> Pipeline {
    let mut p = Pipeline::new(timeout, now);
    p.ready();
    assert!(wait(&mut p).commands);
    assert_eq!(p.command(bind(1), now).unwrap(), None);
    assert_eq!(
        p.step(now),
        Step::Apply(Held::Bind {
            session: SessionId(1),
            common_data: Payload::default(),
            sources: None,
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
        p.step(now),
        Step::Wait(Wait {
            commands: true,
            answers: false,
            inputs: false,
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
    assert_eq!(settle(&mut p, t0).0, [TaskId(1)]);
    let t1 = t0 + Duration::from_secs(3);
    p.command(run(1, 2, 1), t1).unwrap();
    assert_eq!(settle(&mut p, t1).0, [TaskId(2)]);
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
    assert_eq!(p.step(now), Step::Apply(Held::Unbind));
    p.left();
    assert_eq!(p.phase(), Phase::Idle);
    assert!(wait(&mut p).commands);
    assert_eq!(p.command(Command::Release, now).unwrap(), None);
    assert_eq!(p.step(now), Step::Apply(Held::Release));
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

#[test]
fn tasks_are_written_in_the_order_taken_whatever_order_their_inputs_come_in() {
    let t0 = Instant::now();
    let timeout = Duration::from_secs(10);
    let mut p = bound(t0, Some(timeout));
    p.command(run_object(1, 1, 10), t0).unwrap();
    p.command(run(1, 2, 1), t0).unwrap();
    p.command(run_object(1, 3, 10), t0).unwrap();
    p.command(run_object(1, 4, 10), t0).unwrap();
    let (written, w) = settle(&mut p, t0);
    assert!(written.is_empty(), "task 2 waits behind task 1's input");
    assert!(w.inputs && w.commands && w.exit && !w.answers);
    assert_eq!(w.deadline, None, "no timeout runs for an unwritten task");
    // Task 3's input comes first: still nothing is written.
    assert!(p.resolved(SessionId(1), TaskId(3), 1, Ok(Bytes::from_static(b"three"))));
    assert!(settle(&mut p, t0).0.is_empty());
    let t1 = t0 + Duration::from_secs(2);
    assert!(p.resolved(SessionId(1), TaskId(1), 1, Ok(Bytes::from_static(b"one"))));
    assert_eq!(
        p.step(t1),
        Step::Write {
            session: SessionId(1),
            task: TaskId(1),
            input: Bytes::from_static(b"one")
        }
    );
    let (written, w) = settle(&mut p, t1);
    assert_eq!(
        written,
        [TaskId(2), TaskId(3)],
        "then in order, up to task 4"
    );
    assert!(w.inputs && w.answers && !w.exit);
    assert_eq!(
        w.deadline,
        Some(t1 + timeout),
        "task 1 runs since it was written"
    );
    // A task whose input cannot be had fails in its turn, unwritten.
    assert!(p.resolved(SessionId(1), TaskId(4), 1, Err("gone".into())));
    assert!(
        !p.resolved(SessionId(1), TaskId(4), 1, Ok(Bytes::new())),
        "once only"
    );
    match p.step(t1) {
        Step::Fail(a, why) => assert_eq!((a.task, why.as_str()), (TaskId(4), "gone")),
        other => panic!("expected task 4 to fail, got {other:?}"),
    }
    assert_eq!(p.command(Command::Unbind, t1).unwrap(), None);
    for task in 1..=3 {
        assert!(!matches!(p.step(t1), Step::Apply(_)));
        assert_eq!(p.answered(t1).unwrap().task, TaskId(task));
    }
    assert_eq!(p.step(t1), Step::Apply(Held::Unbind));
}

#[test]
fn an_unresolved_input_holds_the_unbind_and_counts_in_the_window() {
    let now = Instant::now();
    let mut p = bound(now, None);
    p.command(run_object(1, 1, PIPELINE_BYTES_MAX as u64), now)
        .unwrap();
    let w = wait(&mut p);
    assert!(!w.commands, "the object's size fills the window");
    assert!(w.inputs && w.exit && !w.answers);
    assert!(p.resolved(SessionId(1), TaskId(1), 1, Err("lost".into())));
    assert!(matches!(p.step(now), Step::Fail(..)));
    assert!(wait(&mut p).commands, "a failed task leaves the window");
    p.command(run_object(1, 2, 1), now).unwrap();
    p.command(Command::Unbind, now).unwrap();
    assert!(!matches!(p.step(now), Step::Apply(_)), "task 2 still waits");
    assert!(p.resolved(SessionId(1), TaskId(2), 1, Ok(Bytes::from_static(b"x"))));
    assert!(matches!(p.step(now), Step::Write { .. }));
    assert!(
        !matches!(p.step(now), Step::Apply(_)),
        "task 2 is in flight"
    );
    p.answered(now).unwrap();
    assert_eq!(p.step(now), Step::Apply(Held::Unbind));
}

/// What a head (well-behaved or not), the input resolver and an application do next.
#[derive(Debug, Clone)]
enum Op {
    Bind(u64),
    /// A session, input bytes, and whether the input is an object.
    Run(u64, usize, bool),
    /// Resolve the n-th unresolved input (modulo their count), with success or not.
    Resolve(usize, bool),
    Unbind,
    Release,
    Answer,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (1u64..3).prop_map(Op::Bind),
        8 => ((1u64..3), prop_oneof![0usize..64, Just(PIPELINE_BYTES_MAX / 2)], any::<bool>())
            .prop_map(|(s, b, o)| Op::Run(s, b, o)),
        4 => ((0usize..8), prop_oneof![4 => Just(true), 1 => Just(false)])
            .prop_map(|(i, ok)| Op::Resolve(i, ok)),
        1 => Just(Op::Unbind),
        1 => Just(Op::Release),
        6 => Just(Op::Answer),
    ]
}

/// The window as the test sees it: tasks taken and not written (id, bytes, resolved?,
/// session), and tasks written (id, bytes).
#[derive(Default)]
struct Model {
    taken: VecDeque<(u64, u64, Option<bool>, u64)>,
    written: VecDeque<(u64, u64)>,
    held: bool,
}

impl Model {
    /// Checks every step until a wait against the model; `Ok(None)`: released.
    fn settle(&mut self, p: &mut Pipeline, now: Instant) -> Result<Option<Wait>, TestCaseError> {
        loop {
            match p.step(now) {
                Step::Write { task, input, .. } => {
                    let (id, bytes, ok, _) =
                        self.taken.pop_front().expect("a write of nothing taken");
                    prop_assert_eq!((task, ok), (TaskId(id), Some(true)), "writes in order");
                    prop_assert!(input.len() as u64 == bytes);
                    self.written.push_back((id, bytes));
                }
                Step::Fail(a, _) => {
                    let (id, _, ok, _) =
                        self.taken.pop_front().expect("a failure of nothing taken");
                    prop_assert_eq!((a.task, ok), (TaskId(id), Some(false)), "failures in order");
                }
                Step::Apply(h) => {
                    prop_assert!(
                        self.taken.is_empty() && self.written.is_empty(),
                        "{h:?} early"
                    );
                    prop_assert!(std::mem::take(&mut self.held));
                    match h {
                        Held::Bind { .. } => p.entered(),
                        Held::Unbind => p.left(),
                        Held::Release => return Ok(None),
                    }
                }
                Step::Wait(w) => {
                    prop_assert!(
                        self.taken.front().is_none_or(|t| t.2.is_none()),
                        "a ready task waits"
                    );
                    return Ok(Some(w));
                }
            }
        }
    }
}

proptest! {
    /// Whatever comes: tasks written in the order taken, answers in the order written,
    /// never more in the window than it allows, nothing taken while a command is held, and
    /// a held command applied only after every task taken before it was answered.
    #[test]
    fn the_window_keeps_its_invariants(ops in proptest::collection::vec(op(), 0..400)) {
        let t0 = Instant::now();
        let mut p = Pipeline::new(Some(Duration::from_secs(1)), t0);
        p.ready();
        let mut next_task = 0u64;
        let mut m = Model::default();
        for (i, op) in ops.into_iter().enumerate() {
            let now = t0 + Duration::from_millis(i as u64);
            let Some(w) = m.settle(&mut p, now)? else { break };
            prop_assert_eq!(w.answers, !m.written.is_empty());
            prop_assert_eq!(w.exit, m.written.is_empty());
            prop_assert_eq!(w.deadline.is_some(), !m.written.is_empty());
            prop_assert_eq!(w.inputs, m.taken.iter().any(|t| t.2.is_none()));
            let count = m.taken.len() + m.written.len();
            let bytes: u64 = m.taken.iter().map(|t| t.1).chain(m.written.iter().map(|t| t.1)).sum();
            prop_assert_eq!(
                w.commands,
                !m.held && count < PIPELINE_TASKS_MAX && bytes < PIPELINE_BYTES_MAX as u64
            );
            let command = match op {
                Op::Answer if w.answers => {
                    let done = p.answered(now).unwrap();
                    let (task, _) = m.written.pop_front().unwrap();
                    prop_assert_eq!(done.task, TaskId(task), "answers in order");
                    continue;
                }
                Op::Resolve(n, ok) => {
                    let count = m.taken.iter().filter(|t| t.2.is_none()).count();
                    let mut open = m.taken.iter_mut().filter(|t| t.2.is_none());
                    if let Some(t) = (count > 0).then(|| open.nth(n % count)).flatten() {
                        t.2 = Some(ok);
                        let input = if ok { Ok(Bytes::from(vec![0; t.1 as usize])) } else { Err("no".into()) };
                        prop_assert!(p.resolved(SessionId(t.3), TaskId(t.0), 1, input));
                    }
                    continue;
                }
                Op::Answer => continue,
                _ if !w.commands => continue,
                Op::Bind(s) => bind(s),
                Op::Run(s, b, object) => {
                    next_task += 1;
                    if object { run_object(s, next_task, b as u64) } else { run(s, next_task, b) }
                }
                Op::Unbind => Command::Unbind,
                Op::Release => Command::Release,
            };
            let before = p.phase();
            let is_run = matches!(command, Command::Run(_));
            match p.command(command, now) {
                Ok(Some(a)) => {
                    prop_assert!(is_run);
                    let object = a.input.object().is_some();
                    m.taken.push_back((a.task.0, a.input.size(), (!object).then_some(true), a.session.0));
                }
                Ok(None) => {
                    prop_assert!(!is_run);
                    m.held = true;
                }
                Err(_) => prop_assert_eq!(p.phase(), before),
            }
            prop_assert!(p.in_flight() <= PIPELINE_TASKS_MAX);
        }
    }
}
