//! The webhook sender's counters: what `GET /api/webhooks` shows, kept in step with
//! the `tether_webhook_*` metrics (each method updates both).

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tether_core::WebhookMetrics;

/// Counters shared by the queue (drops), the sender (outcomes) and the status call.
#[derive(Debug)]
pub(crate) struct Stats {
    /// The Prometheus side of the same counts.
    metrics: WebhookMetrics,
    /// POSTs answered 2xx.
    delivered: AtomicU64,
    /// Batches given up after `max_attempts`.
    failed: AtomicU64,
    /// POSTs that failed and were sent again.
    retries: AtomicU64,
    /// Events that never reached the receiver.
    dropped: AtomicU64,
    /// The last failure, `None` until one happens.
    last_error: Mutex<Option<String>>,
}

/// A copy of the counters, for the status call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub delivered: u64,
    pub failed: u64,
    pub retries: u64,
    pub dropped: u64,
    pub last_error: Option<String>,
}

impl Stats {
    pub(crate) fn new(metrics: WebhookMetrics) -> Self {
        Self {
            metrics,
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// A batch was acknowledged.
    pub(crate) fn delivered(&self) {
        self.delivered.fetch_add(1, Ordering::Relaxed);
        self.metrics.delivery("ok");
    }

    /// A POST failed and will be sent again.
    pub(crate) fn retried(&self, error: String) {
        self.retries.fetch_add(1, Ordering::Relaxed);
        self.metrics.delivery("retried");
        *self.last_error.lock() = Some(error);
    }

    /// A batch of `events` failed for the last time and is dropped.
    pub(crate) fn failed(&self, events: u64, error: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.metrics.delivery("failed");
        *self.last_error.lock() = Some(error);
        self.dropped(events);
    }

    /// `n` events will never be delivered.
    pub(crate) fn dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
        self.metrics.dropped(n);
    }

    /// Sets the queue gauge.
    pub(crate) fn set_pending(&self, n: usize) {
        self.metrics.set_queue(n as u64);
    }

    pub(crate) fn snapshot(&self) -> Snapshot {
        Snapshot {
            delivered: self.delivered.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            last_error: self.last_error.lock().clone(),
        }
    }
}
