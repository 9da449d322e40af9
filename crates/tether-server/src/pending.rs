//! Sockets accepted and not yet admitted (`limits.max_pending_handshakes`): a
//! counter, and the slot each such socket holds. The accept loop takes a slot per
//! socket; the transport that admits (or refuses) the socket drops it once the
//! socket is committed or gone. A leaf.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tether_core::Metrics;

/// Counts sockets accepted and not yet admitted: a cheap clone handle.
#[derive(Clone, Debug)]
pub struct PendingCounter {
    n: Arc<AtomicUsize>,
    metrics: Metrics,
}

impl PendingCounter {
    pub(crate) fn new(metrics: Metrics) -> Self {
        Self {
            n: Arc::new(AtomicUsize::new(0)),
            metrics,
        }
    }
    /// Sockets pending now.
    pub fn get(&self) -> usize {
        self.n.load(Ordering::Acquire)
    }
    pub(crate) fn try_take(&self, max: usize) -> Option<PendingSlot> {
        self.n
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.metrics.pending_delta(1);
        Some(PendingSlot {
            n: self.n.clone(),
            metrics: self.metrics.clone(),
        })
    }
}

/// One pending socket; dropping it un-counts it.
#[derive(Debug)]
pub(crate) struct PendingSlot {
    n: Arc<AtomicUsize>,
    metrics: Metrics,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.n.fetch_sub(1, Ordering::AcqRel);
        self.metrics.pending_delta(-1);
    }
}
