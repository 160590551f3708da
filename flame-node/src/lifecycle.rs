//! The executor state machine, as pure code.
//!
//! ```text
//! Void ──ready──► Idle ──bind──► Binding ──entered──► Bound ──unbind──► Unbinding ──left──► Idle
//!                  └──release──► Releasing
//! ```
//! Any state ends when the process dies; the driver then reports the executor as exited. The driver asks this module whether a
//! command is allowed before it touches the process, so a confused head cannot make an
//! executor run a task outside a session.

use flame_protocol::SessionId;

/// Where an executor is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Started; the application has not said ready.
    Void,
    Idle,
    Binding(SessionId),
    Bound(SessionId),
    Unbinding(SessionId),
    Releasing,
}

/// What happens to an executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    AppReady,
    Bind(SessionId),
    Entered,
    /// A task for this session may run only while bound to it.
    Run(SessionId),
    Unbind,
    Left,
    Release,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("executor in phase {phase:?} cannot accept {input:?}")]
pub struct InvalidTransition {
    pub phase: Phase,
    pub input: Input,
}

impl Phase {
    /// The phase after `input`, or why it is not allowed.
    pub fn next(self, input: Input) -> Result<Phase, InvalidTransition> {
        use Input as I;
        use Phase as P;
        let next = match (self, input) {
            (P::Void, I::AppReady) => P::Idle,
            (P::Idle, I::Bind(s)) => P::Binding(s),
            (P::Binding(s), I::Entered) => P::Bound(s),
            (P::Bound(s), I::Run(t)) if s == t => P::Bound(s),
            (P::Bound(s), I::Unbind) => P::Unbinding(s),
            (P::Unbinding(_), I::Left) => P::Idle,
            (P::Idle | P::Void, I::Release) => P::Releasing,
            (phase, input) => return Err(InvalidTransition { phase, input }),
        };
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_cycle() {
        let s = SessionId(1);
        let mut p = Phase::Void;
        for input in [
            Input::AppReady,
            Input::Bind(s),
            Input::Entered,
            Input::Run(s),
            Input::Unbind,
            Input::Left,
            Input::Bind(SessionId(2)),
            Input::Entered,
            Input::Unbind,
            Input::Left,
            Input::Release,
        ] {
            p = p.next(input).unwrap();
        }
        assert_eq!(p, Phase::Releasing);
    }

    #[test]
    fn run_outside_its_session_is_refused() {
        let p = Phase::Bound(SessionId(1));
        assert!(p.next(Input::Run(SessionId(2))).is_err());
        assert!(Phase::Idle.next(Input::Run(SessionId(1))).is_err());
        assert!(Phase::Bound(SessionId(1)).next(Input::Release).is_err());
    }
}
