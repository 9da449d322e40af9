//! The node's shutdown state. A latch that only moves forward:
//! `Running → PreDrain → Draining`, plus a hard-stop token that every connection
//! task selects on for the final deadline.

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Where the node is in its shutdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Serving normally.
    Running,
    /// Shutdown began: `/readyz` is 503, handshakes are still admitted.
    PreDrain,
    /// Handshakes are refused (`draining`) and connections are being closed.
    Draining,
    /// Every connection is closed; the listeners are stopping.
    Stopped,
}

/// A cheap clone handle on the shutdown state.
#[derive(Clone, Debug)]
pub struct Drain {
    phase: watch::Sender<Phase>,
    hard: CancellationToken,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// A node that is running.
    pub fn new() -> Self {
        let (phase, _) = watch::channel(Phase::Running);
        Self {
            phase,
            hard: CancellationToken::new(),
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    /// Moves forward to `next` (never back). Returns whether it moved.
    pub fn advance(&self, next: Phase) -> bool {
        self.phase.send_if_modified(|p| {
            if next > *p {
                *p = next;
                true
            } else {
                false
            }
        })
    }

    /// Resolves once the phase is at least `phase`.
    pub async fn reached(&self, phase: Phase) {
        let mut rx = self.phase.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|p| *p >= phase).await;
    }

    /// The token cancelled at the shutdown deadline: every task still running ends.
    pub fn hard_stop(&self) -> &CancellationToken {
        &self.hard
    }
}
