//! One executor's pipelining window, as pure code: which of the head's tasks may be written
//! to the application ahead of their results, in the order the head sent them once their
//! inputs are at hand, the results taken in order, the binds, unbinds and releases that
//! wait until every task sent before them is answered, and when the oldest task runs past
//! its timeout.
//!
//! Sans-IO, like [`crate::lifecycle`] (whose checks it applies to every command it takes):
//! the driver (`executor::shim`) feeds it the head's commands, the inputs it resolved, the
//! application's answers and the clock, asks it what to do next ([`Pipeline::step`]), and
//! does the I/O; it never touches a process, so it is tested without one.
//!
//! ```text
//!   head ──Command──► take ─Run──► waiting ──input at hand, oldest──► in flight (written)
//!                       │            └──input not to be had, oldest──► failed, reported
//!                       │                                  in flight ──answered──► result
//!                       └─Bind/Unbind/Release──► held ──(nothing waiting or in flight)──► Apply
//! ```
//!
//! A task's input is inline (at hand when taken) or an object the driver resolves (from
//! the node's cache, or fetched) concurrently, while the tasks before it run; a task is
//! written only once every task taken before it was written or failed, so the application
//! sees the head's order whatever order the fetches end in.
//!
//! Invariants (asserted where cheap):
//! - Tasks are written, or failed for want of their input, in the order they were taken;
//!   answers come in the order the tasks were written (the shim's protocol): the oldest
//!   task in flight is the one running, and its timeout counts from when it became the
//!   oldest (written to an idle application, or the one before it answered).
//! - At most [`PIPELINE_TASKS_MAX`] tasks are waiting or in flight, and a task joins only
//!   while their inputs ([`Payload::size`]) are fewer than [`PIPELINE_BYTES_MAX`] bytes (one
//!   task of any size always may): this bounds the resolved inputs the node holds too.
//! - A held command stops the intake: nothing after it is taken until it is applied, and
//!   it is applied only once no task is waiting or in flight, so an unbind takes effect
//!   after the tasks sent before it and never before.
//! - Every command passes the lifecycle check when it is taken, before the driver writes
//!   anything to the process: a confused head cannot make it run a task outside a session.

use crate::lifecycle::{Input, InvalidTransition, Phase};
use bytes::Bytes;
use flame_protocol::model::TaskAssignment;
use flame_protocol::object::{ObjectSources, Payload};
use flame_protocol::{SessionId, TaskId};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Most tasks written to an application ahead of their results, or waiting for their
/// inputs to be written (the shim's pipelining window). The head's credit bounds what
/// waits on the node; this bounds what the application's input holds.
pub const PIPELINE_TASKS_MAX: usize = 64;
/// Input bytes after which no further task joins the window; one task of any size always
/// may.
pub const PIPELINE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// A command for one executor, in head order.
#[derive(Debug)]
pub enum Command {
    Bind {
        session: SessionId,
        common_data: Payload,
        /// Where to fetch `common_data` when it is an object the node does not hold.
        sources: Option<ObjectSources>,
    },
    Run(TaskAssignment),
    Unbind,
    Release,
}

impl Command {
    /// The lifecycle input it is.
    pub fn input(&self) -> Input {
        match self {
            Command::Bind { session, .. } => Input::Bind(*session),
            Command::Run(a) => Input::Run(a.session),
            Command::Unbind => Input::Unbind,
            Command::Release => Input::Release,
        }
    }
}

/// A command that waits until every task sent before it is answered: everything but a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    Bind {
        session: SessionId,
        common_data: Payload,
        /// Boxed: a held unbind or release need not carry its room.
        sources: Option<Box<ObjectSources>>,
    },
    Unbind,
    Release,
}

/// What the driver waits for next, whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// The next command from the head: the window has room and nothing is held.
    pub commands: bool,
    /// The application's answer to the oldest task in flight.
    pub answers: bool,
    /// An input being resolved ([`Pipeline::resolved`]).
    pub inputs: bool,
    /// The end of the application's process: with nothing in flight, nothing else would
    /// notice it (with tasks in flight, the read of the answer sees the end first, and the
    /// results already written are kept).
    pub exit: bool,
    /// When the oldest task in flight runs past its timeout.
    pub deadline: Option<Instant>,
}

/// What the driver does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Write this task to the application now: its input is at hand, and every task taken
    /// before it was written or failed. It is in flight from now.
    Write {
        session: SessionId,
        task: TaskId,
        input: Bytes,
    },
    /// Report this task failed, unwritten: its input could not be had (the reason).
    Fail(Box<TaskAssignment>, String),
    /// Apply this held command now: every task sent before it is answered.
    Apply(Held),
    Wait(Wait),
}

/// Where a taken task's input is.
#[derive(Debug)]
enum Resolution {
    /// The driver is resolving it.
    Pending,
    Ready(Bytes),
    /// Not to be had; the reason.
    Failed(String),
}

/// The window of one executor; see the module doc.
#[derive(Debug)]
pub struct Pipeline {
    phase: Phase,
    /// Tasks taken and not written yet, in the order taken, with their inputs.
    waiting: VecDeque<(TaskAssignment, Resolution)>,
    /// Tasks written to the application and not answered yet, oldest first.
    in_flight: VecDeque<TaskAssignment>,
    /// Input bytes ([`Payload::size`]) of `waiting` and `in_flight`.
    window_bytes: u64,
    /// When the oldest task in flight became the oldest.
    oldest_since: Instant,
    /// A command taken after the tasks in the window, waiting for them to be answered.
    held: Option<Held>,
    /// How long the oldest task may run; `None`: no limit.
    task_timeout: Option<Duration>,
}

impl Pipeline {
    /// The window of an executor whose application has not said ready yet.
    pub fn new(task_timeout: Option<Duration>, now: Instant) -> Pipeline {
        Pipeline {
            phase: Phase::Void,
            waiting: VecDeque::new(),
            in_flight: VecDeque::new(),
            window_bytes: 0,
            oldest_since: now,
            held: None,
            task_timeout,
        }
    }

    /// Where the executor is in its life.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The application said ready.
    pub fn ready(&mut self) {
        self.advance(Input::AppReady);
    }

    /// The held bind was applied: the application entered its session.
    pub fn entered(&mut self) {
        self.advance(Input::Entered);
    }

    /// The held unbind was applied: the application left its session.
    pub fn left(&mut self) {
        self.advance(Input::Left);
    }

    /// Moves on where the driver reports what it did; the transitions it reports follow
    /// from the commands taken (a bind leads to `Entered`), so a refused one changes
    /// nothing, as before this module existed.
    fn advance(&mut self, input: Input) {
        self.phase = self.phase.next(input).unwrap_or(self.phase);
    }

    /// Tasks in flight: written and not answered.
    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The oldest task in flight: the one the application runs now.
    pub fn oldest(&self) -> Option<&TaskAssignment> {
        self.in_flight.front()
    }

    /// May another command be taken: nothing is held and the window has room.
    fn has_room(&self) -> bool {
        self.held.is_none()
            && self.waiting.len() + self.in_flight.len() < PIPELINE_TASKS_MAX
            && self.window_bytes < PIPELINE_BYTES_MAX as u64
    }

    /// What to do next: write (or fail) the oldest waiting task once its input is
    /// resolved, apply the held command once nothing is waiting or in flight, else wait.
    pub fn step(&mut self, now: Instant) -> Step {
        if let Some(step) = self.next_written(now) {
            return step;
        }
        if self.in_flight.is_empty() && self.waiting.is_empty() {
            if let Some(held) = self.held.take() {
                return Step::Apply(held);
            }
        }
        let busy = !self.in_flight.is_empty();
        Step::Wait(Wait {
            commands: self.has_room(),
            answers: busy,
            inputs: self
                .waiting
                .iter()
                .any(|(_, r)| matches!(r, Resolution::Pending)),
            exit: !busy,
            deadline: match self.task_timeout {
                Some(t) if busy => self.oldest_since.checked_add(t),
                _ => None,
            },
        })
    }

    /// The oldest waiting task, once its input is resolved: into flight, or failed.
    fn next_written(&mut self, now: Instant) -> Option<Step> {
        if matches!(self.waiting.front(), None | Some((_, Resolution::Pending))) {
            return None;
        }
        let (a, resolution) = self.waiting.pop_front()?;
        match resolution {
            Resolution::Pending => None,
            Resolution::Ready(input) => {
                if self.in_flight.is_empty() {
                    self.oldest_since = now;
                }
                let step = Step::Write {
                    session: a.session,
                    task: a.task,
                    input,
                };
                self.in_flight.push_back(a);
                assert!(self.in_flight.len() <= PIPELINE_TASKS_MAX);
                Some(step)
            }
            Resolution::Failed(why) => {
                self.window_bytes -= a.input.size();
                Some(Step::Fail(Box::new(a), why))
            }
        }
    }

    /// Takes the head's next command (only when [`Step::Wait`] asked for commands). A run
    /// joins the window and is returned: its input is at hand when inline, else the
    /// driver resolves it and says so with [`Pipeline::resolved`]; either way it is written
    /// when [`Pipeline::step`] says. Any other command is held. A command the executor's
    /// phase does not allow is refused and changes nothing: the head and this node
    /// disagree, and the driver ends the executor.
    pub fn command(
        &mut self,
        command: Command,
        _now: Instant,
    ) -> Result<Option<&TaskAssignment>, InvalidTransition> {
        assert!(
            self.has_room(),
            "a command was taken while the window was full or a command held"
        );
        self.phase = self.phase.next(command.input())?;
        let held = match command {
            Command::Run(a) => {
                self.window_bytes += a.input.size();
                let resolution = match &a.input {
                    Payload::Inline(bytes) => Resolution::Ready(bytes.clone()),
                    Payload::Object(_) => Resolution::Pending,
                };
                self.waiting.push_back((a, resolution));
                return Ok(self.waiting.back().map(|(a, _)| a));
            }
            Command::Bind {
                session,
                common_data,
                sources,
            } => Held::Bind {
                session,
                common_data,
                sources: sources.map(Box::new),
            },
            Command::Unbind => Held::Unbind,
            Command::Release => Held::Release,
        };
        self.held = Some(held);
        Ok(None)
    }

    /// The driver resolved the input of a waiting task: its bytes, or why they cannot be
    /// had. `false` when no such task waits for its input (already resolved, or never
    /// taken): the driver's mistake, ignored.
    pub fn resolved(
        &mut self,
        session: SessionId,
        task: TaskId,
        attempt: u32,
        input: Result<Bytes, String>,
    ) -> bool {
        let Some((_, resolution)) = self.waiting.iter_mut().find(|(a, r)| {
            a.session == session
                && a.task == task
                && a.attempt == attempt
                && matches!(r, Resolution::Pending)
        }) else {
            return false;
        };
        *resolution = match input {
            Ok(bytes) => Resolution::Ready(bytes),
            Err(why) => Resolution::Failed(why),
        };
        true
    }

    /// The application answered: the oldest task in flight is done, and the next one (if
    /// any) starts its timeout now. `None` if nothing was in flight (the driver reads
    /// answers only while something is).
    pub fn answered(&mut self, now: Instant) -> Option<TaskAssignment> {
        let done = self.in_flight.pop_front()?;
        self.window_bytes -= done.input.size();
        debug_assert_eq!(
            self.window_bytes,
            self.in_flight
                .iter()
                .chain(self.waiting.iter().map(|(a, _)| a))
                .map(|a| a.input.size())
                .sum::<u64>()
        );
        self.oldest_since = now;
        Some(done)
    }
}

#[cfg(test)]
mod tests;
