//! Waiting for the user to ask us to stop.

use anyhow::Context as _;
use tokio::signal::unix::{signal, SignalKind};

/// Listeners for Ctrl-C (`SIGINT`) and `SIGTERM`, installed up front so that a signal that
/// arrives before anyone waits is not lost to the default handler.
#[derive(Debug)]
pub struct StopSignals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Installs the listeners.
    pub fn install() -> anyhow::Result<Self> {
        Ok(StopSignals {
            interrupt: signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?,
            terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
        })
    }

    /// Waits for either signal and names it. Cancel-safe.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "interrupt",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}
