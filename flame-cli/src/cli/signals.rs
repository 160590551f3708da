//! Waiting for the user to ask us to stop, and the error that says we did.

use anyhow::Context as _;
use std::fmt;
use tokio::signal::unix::{signal, SignalKind};

/// Listeners for Ctrl-C (`SIGINT`) and `SIGTERM`, installed up front so that a signal that
/// arrives before anyone waits is not lost to the default handler.
#[derive(Debug)]
pub struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

/// Which signal asked us to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Ctrl-C (`SIGINT`).
    Interrupt,
    /// `SIGTERM`.
    Terminate,
}

impl Stop {
    /// The exit status of a command stopped by this signal: 128 plus its number, as a
    /// shell reports a process killed by it (130 for Ctrl-C, 143 for `SIGTERM`).
    pub fn exit_code(self) -> u8 {
        match self {
            Stop::Interrupt => 130,
            Stop::Terminate => 143,
        }
    }

    /// The error that ends the command with [`Stop::exit_code`], after `what` was done
    /// about it (e.g. "session 5 was cancelled").
    pub fn stopped(self) -> anyhow::Error {
        anyhow::Error::new(Stopped(self))
    }
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stop::Interrupt => "interrupt",
            Stop::Terminate => "SIGTERM",
        })
    }
}

/// The command stopped because of a signal; `main` exits with [`Stop::exit_code`].
#[derive(Debug, thiserror::Error)]
#[error("stopped by {0}")]
pub struct Stopped(pub Stop);

impl StopSignals {
    /// Installs the listeners.
    pub fn install() -> anyhow::Result<Self> {
        Ok(StopSignals {
            interrupt: signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?,
            terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
        })
    }

    /// Waits for either signal and names it. Cancel-safe.
    pub async fn recv(&mut self) -> Stop {
        tokio::select! {
            _ = self.interrupt.recv() => Stop::Interrupt,
            _ = self.terminate.recv() => Stop::Terminate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_exits_like_a_shell_reports_the_signal() {
        let e = Stop::Interrupt.stopped().context("session 5 was cancelled");
        let stopped = e.chain().find_map(|c| c.downcast_ref::<Stopped>());
        assert_eq!(stopped.map(|s| s.0.exit_code()), Some(130));
        assert_eq!(Stop::Terminate.exit_code(), 143);
        assert_eq!(e.root_cause().to_string(), "stopped by interrupt");
    }
}
