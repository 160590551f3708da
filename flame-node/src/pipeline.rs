//! One executor's pipelining window, as pure code: which of the head's tasks may be written
//! to the application ahead of their results, the results taken in order, the binds,
//! unbinds and releases that wait until every task sent before them is answered, and when
//! the oldest task runs past its timeout.
//!
//! Sans-IO, like [`crate::lifecycle`] (whose checks it applies to every command it takes):
//! the driver (`executor::shim`) feeds it the head's commands, the application's answers
//! and the clock, asks it what to wait for next ([`Pipeline::step`]), and does the I/O; it
//! never touches a process, so it is tested without one.
//!
//! ```text
//!   head ──Command──► take ─Run──► in flight (written) ──answered──► result, in order
//!                       └─Bind/Unbind/Release──► held ──(nothing in flight)──► Apply
//! ```
//!
//! Invariants (asserted where cheap):
//! - Answers come in the order the tasks were written (the shim's protocol): the oldest
//!   task in flight is the one running, and its timeout counts from when it became the
//!   oldest (written to an idle application, or the one before it answered).
//! - At most [`PIPELINE_TASKS_MAX`] tasks are in flight, and a task joins only while fewer
//!   than [`PIPELINE_BYTES_MAX`] input bytes are (one task of any size always may).
//! - A held command stops the intake: nothing after it is taken until it is applied, and
//!   it is applied only once no task is in flight, so an unbind takes effect after the tasks
//!   sent before it and never before.
//! - Every command passes the lifecycle check when it is taken, before the driver writes
//!   anything to the process: a confused head cannot make it run a task outside a session.

use crate::lifecycle::{Input, InvalidTransition, Phase};
use bytes::Bytes;
use flame_protocol::model::TaskAssignment;
use flame_protocol::SessionId;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Most tasks written to an application ahead of their results (the shim's pipelining
/// window). The head's credit bounds what waits on the node; this bounds what the
/// application's input holds.
pub const PIPELINE_TASKS_MAX: usize = 64;
/// Input bytes after which no further task joins the window; one task of any size always
/// may.
pub const PIPELINE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// A command for one executor, in head order.
#[derive(Debug)]
pub enum Command {
    Bind {
        session: SessionId,
        common_data: Bytes,
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
        common_data: Bytes,
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
    /// Apply this held command now: every task sent before it is answered.
    Apply(Held),
    Wait(Wait),
}

/// The window of one executor; see the module doc.
#[derive(Debug)]
pub struct Pipeline {
    phase: Phase,
    /// Tasks written to the application and not answered yet, oldest first.
    in_flight: VecDeque<TaskAssignment>,
    /// Input bytes of `in_flight`.
    in_flight_bytes: usize,
    /// When the oldest task in flight became the oldest.
    oldest_since: Instant,
    /// A command taken after the tasks in flight, waiting for them to be answered.
    held: Option<Held>,
    /// How long the oldest task may run; `None`: no limit.
    task_timeout: Option<Duration>,
}

impl Pipeline {
    /// The window of an executor whose application has not said ready yet.
    pub fn new(task_timeout: Option<Duration>, now: Instant) -> Pipeline {
        Pipeline {
            phase: Phase::Void,
            in_flight: VecDeque::new(),
            in_flight_bytes: 0,
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
            && self.in_flight.len() < PIPELINE_TASKS_MAX
            && self.in_flight_bytes < PIPELINE_BYTES_MAX
    }

    /// What to do next: apply the held command once nothing is in flight, else wait.
    pub fn step(&mut self) -> Step {
        if self.in_flight.is_empty() {
            if let Some(held) = self.held.take() {
                return Step::Apply(held);
            }
        }
        let busy = !self.in_flight.is_empty();
        Step::Wait(Wait {
            commands: self.has_room(),
            answers: busy,
            exit: !busy,
            deadline: match self.task_timeout {
                Some(t) if busy => self.oldest_since.checked_add(t),
                _ => None,
            },
        })
    }

    /// Takes the head's next command (only when [`Step::Wait`] asked for commands). A run
    /// joins the window and is returned for the driver to write; any other command is held.
    /// A command the executor's phase does not allow is refused and changes nothing: the
    /// head and this node disagree, and the driver ends the executor.
    pub fn command(
        &mut self,
        command: Command,
        now: Instant,
    ) -> Result<Option<&TaskAssignment>, InvalidTransition> {
        assert!(
            self.has_room(),
            "a command was taken while the window was full or a command held"
        );
        self.phase = self.phase.next(command.input())?;
        let held = match command {
            Command::Run(a) => {
                if self.in_flight.is_empty() {
                    self.oldest_since = now;
                }
                self.in_flight_bytes += a.input.held_bytes();
                self.in_flight.push_back(a);
                assert!(self.in_flight.len() <= PIPELINE_TASKS_MAX);
                return Ok(self.in_flight.back());
            }
            Command::Bind {
                session,
                common_data,
            } => Held::Bind {
                session,
                common_data,
            },
            Command::Unbind => Held::Unbind,
            Command::Release => Held::Release,
        };
        self.held = Some(held);
        Ok(None)
    }

    /// The application answered: the oldest task in flight is done, and the next one (if
    /// any) starts its timeout now. `None` if nothing was in flight (the driver reads
    /// answers only while something is).
    pub fn answered(&mut self, now: Instant) -> Option<TaskAssignment> {
        let done = self.in_flight.pop_front()?;
        self.in_flight_bytes -= done.input.held_bytes();
        debug_assert_eq!(
            self.in_flight_bytes,
            self.in_flight.iter().map(|a| a.input.held_bytes()).sum::<usize>()
        );
        self.oldest_since = now;
        Some(done)
    }
}

#[cfg(test)]
mod tests;
