//! The webhook queue: the one coupling between the event bus and the sender.
//!
//! The bus offers events synchronously, under the registry's locks: `offer` takes a
//! short lock, pushes or drops, and notifies; it never waits. The queue holds at most
//! `max_pending` events, counting the batch in flight, so a stalled receiver holds
//! exactly that many and every event beyond it is dropped, counted and logged (a
//! warning at most once a second, with the count since the last one). The sender
//! takes one batch at a time (`next_batch`) and returns it (`done`) once it has been
//! delivered or given up, so events leave in the order they came.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tether_core::EventSink;
use tether_protocol::{EventType, LifecycleEvent};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::stats::Stats;

/// How often the overflow warning may be logged.
const WARN_EVERY: Duration = Duration::from_secs(1);

/// One event waiting.
pub(crate) type Event = Arc<LifecycleEvent>;

#[derive(Debug, Default)]
struct State {
    /// Events not yet taken by the sender, oldest first.
    queued: VecDeque<Event>,
    /// Events of the batch the sender holds.
    in_flight: usize,
    /// Drops not yet reported in a warning.
    unwarned: u64,
    /// When the last overflow warning was logged.
    last_warn: Option<Instant>,
    /// Shutdown: the sender stops waiting for more and ends once empty.
    closing: bool,
    /// The sender is gone: every event offered from now on is dropped and counted.
    abandoned: bool,
}

/// The bounded queue (see the module docs).
#[derive(Debug)]
pub(crate) struct Queue {
    state: Mutex<State>,
    notify: Notify,
    wanted: Vec<EventType>,
    max_pending: usize,
    stats: Arc<Stats>,
}

impl Queue {
    pub(crate) fn new(wanted: Vec<EventType>, max_pending: usize, stats: Arc<Stats>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            wanted,
            max_pending,
            stats,
        }
    }

    /// `(queued, in_flight)`.
    pub(crate) fn pending(&self) -> (usize, usize) {
        let s = self.state.lock();
        (s.queued.len(), s.in_flight)
    }

    /// Waits for the next batch: the first event, then up to `max` events or `wait`
    /// after the first, whichever comes first (at once while closing). `None` once
    /// closing with nothing left, or on `stop`.
    pub(crate) async fn next_batch(
        &self,
        max: usize,
        wait: Duration,
        stop: &CancellationToken,
    ) -> Option<Vec<Event>> {
        loop {
            {
                let s = self.state.lock();
                if !s.queued.is_empty() {
                    break;
                }
                if s.closing {
                    return None;
                }
            }
            // An offer between the check and here leaves a permit: no lost wakeup.
            tokio::select! {
                _ = self.notify.notified() => {}
                _ = stop.cancelled() => return None,
            }
        }
        let until = Instant::now() + wait;
        loop {
            {
                let s = self.state.lock();
                if s.queued.len() >= max || s.closing {
                    break;
                }
            }
            tokio::select! {
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep_until(until) => break,
                _ = stop.cancelled() => return None,
            }
        }
        let mut s = self.state.lock();
        let n = s.queued.len().min(max);
        s.in_flight = n;
        Some(s.queued.drain(..n).collect())
    }

    /// The batch in flight is over (delivered or given up).
    pub(crate) fn done(&self) {
        let mut s = self.state.lock();
        s.in_flight = 0;
        self.stats.set_pending(s.queued.len());
        self.warn_overflow(&mut s, false);
    }

    /// Shutdown begins: no more waiting for a batch to fill; the sender ends once the
    /// queue is empty.
    pub(crate) fn close(&self) {
        self.state.lock().closing = true;
        self.notify.notify_one();
    }

    /// Empties the queue (the sender is gone): how many events were left, the batch
    /// in flight included.
    pub(crate) fn abandon(&self) -> usize {
        let mut s = self.state.lock();
        let n = s.queued.len() + s.in_flight;
        s.queued.clear();
        s.in_flight = 0;
        s.abandoned = true;
        self.stats.set_pending(0);
        self.warn_overflow(&mut s, true);
        n
    }

    /// Logs the drops not yet reported, at most once per [`WARN_EVERY`] unless `now`.
    fn warn_overflow(&self, s: &mut State, now: bool) {
        let due = now || s.last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY);
        if s.unwarned > 0 && due {
            tracing::warn!(
                dropped = s.unwarned,
                max_pending = self.max_pending,
                "webhook queue full: events dropped"
            );
            s.unwarned = 0;
            s.last_warn = Some(Instant::now());
        }
    }
}

impl EventSink for Queue {
    fn wants(&self, kind: EventType) -> bool {
        self.wanted.contains(&kind)
    }

    fn offer(&self, event: Event) {
        let mut s = self.state.lock();
        if s.abandoned || s.queued.len() + s.in_flight >= self.max_pending {
            s.unwarned += 1;
            self.stats.dropped(1);
            self.warn_overflow(&mut s, false);
            return;
        }
        s.queued.push_back(event);
        self.stats.set_pending(s.queued.len() + s.in_flight);
        drop(s);
        self.notify.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_core::Metrics;

    fn event(n: usize) -> Event {
        Arc::new(LifecycleEvent {
            id: n.to_string(),
            kind: EventType::ClientOnline,
            at: String::new(),
            node_id: "n1".into(),
            client_id: Some(format!("c{n}")),
            conn_id: None,
            channel: None,
            code: None,
            reason: None,
            duration_ms: None,
            upstream: None,
        })
    }

    fn queue(max_pending: usize) -> (Queue, Arc<Stats>) {
        let stats = Arc::new(Stats::new(Metrics::new().webhooks().clone()));
        let q = Queue::new(vec![EventType::ClientOnline], max_pending, stats.clone());
        (q, stats)
    }

    #[tokio::test(start_paused = true)]
    async fn batches_keep_order_and_the_batch_in_flight_counts_against_the_bound() {
        let (q, stats) = queue(3);
        let stop = CancellationToken::new();
        for n in 0..2 {
            q.offer(event(n));
        }
        let first = q.next_batch(2, Duration::from_millis(50), &stop).await;
        let ids: Vec<_> = first.iter().flatten().map(|e| e.id.clone()).collect();
        assert_eq!(ids, ["0", "1"]);
        // Two in flight, one slot left.
        for n in 2..5 {
            q.offer(event(n));
        }
        assert_eq!(q.pending(), (1, 2));
        assert_eq!(stats.snapshot().dropped, 2);
        q.done();
        let next = q.next_batch(2, Duration::from_millis(50), &stop).await;
        assert_eq!(next.map(|b| b[0].id.clone()), Some("2".into()));
    }

    #[tokio::test(start_paused = true)]
    async fn closed_and_empty_ends_and_abandoned_drops_what_comes_after() {
        let (q, stats) = queue(10);
        let stop = CancellationToken::new();
        q.offer(event(0));
        q.close();
        // Closing: no waiting for `batch_ms` (an hour here).
        let b = q.next_batch(5, Duration::from_secs(3600), &stop).await;
        assert_eq!(b.map(|b| b.len()), Some(1));
        q.done();
        assert!(q
            .next_batch(5, Duration::from_secs(1), &stop)
            .await
            .is_none());
        assert_eq!(q.abandon(), 0);
        q.offer(event(1));
        assert_eq!((q.pending(), stats.snapshot().dropped), ((0, 0), 1));
    }
}
