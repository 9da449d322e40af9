//! The webhook sender: one task, one batch in flight at a time (which keeps every
//! client's events in order across retries). A POST that fails (non-2xx, a
//! connection error, or no answer within `timeout_ms`) is sent again, the same batch
//! with the same id and bytes, after a full-jitter exponential backoff (500 ms
//! doubling to a 30 s cap), up to `max_attempts` POSTs; then the batch is dropped,
//! counted and logged. `stop` ends the task at once (the shutdown deadline).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::batch::Batch;
use super::queue::Queue;
use super::stats::Stats;

/// First retry's backoff cap; doubles per attempt.
const BACKOFF_BASE_MS: u64 = 500;
/// Largest backoff cap.
const BACKOFF_CAP_MS: u64 = 30_000;
/// Most response body read (and thrown away) so the connection can be reused.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Why one POST failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// The receiver answered, but not 2xx.
    #[error("receiver answered {0}")]
    Status(u16),
    /// No answer within `webhooks.timeout_ms`.
    #[error("no answer within webhooks.timeout_ms")]
    Timeout(#[source] reqwest::Error),
    /// No answer: connection refused or reset, TLS.
    #[error("POST failed: {0}")]
    Http(#[source] reqwest::Error),
}

impl From<reqwest::Error> for SendError {
    fn from(e: reqwest::Error) -> Self {
        if e.is_timeout() {
            SendError::Timeout(e)
        } else {
            SendError::Http(e)
        }
    }
}

/// How a batch ended.
enum Outcome {
    Delivered,
    GaveUp,
    Stopped,
}

/// Everything the sender task owns.
#[derive(Debug)]
pub(crate) struct Sender {
    pub queue: Arc<Queue>,
    pub stats: Arc<Stats>,
    pub http: reqwest::Client,
    pub url: String,
    /// The URL without userinfo, for logs.
    pub public_url: String,
    pub secret: Vec<u8>,
    pub batch_max: usize,
    pub batch_wait: Duration,
    pub max_attempts: u64,
}

impl Sender {
    /// Sends batches until the queue is closed and empty, or `stop`. What is left
    /// then is counted as dropped and logged.
    pub(crate) async fn run(self, stop: CancellationToken) {
        while let Some(events) = self
            .queue
            .next_batch(self.batch_max, self.batch_wait, &stop)
            .await
        {
            let batch = Batch::new(&events, &self.secret);
            drop(events);
            match self.deliver(&batch, &stop).await {
                Outcome::Delivered => self.stats.delivered(),
                Outcome::GaveUp => {}
                Outcome::Stopped => break,
            }
            self.queue.done();
        }
        let left = self.queue.abandon();
        if left > 0 {
            self.stats.dropped(left as u64);
            tracing::warn!(
                events = left,
                url = %self.public_url,
                "webhooks: events not delivered before the shutdown deadline"
            );
        }
    }

    /// POSTs `batch` until it is acknowledged, attempts run out, or `stop`.
    async fn deliver(&self, batch: &Batch, stop: &CancellationToken) -> Outcome {
        for attempt in 1..=self.max_attempts {
            let result = tokio::select! {
                r = self.post(batch) => r,
                _ = stop.cancelled() => return Outcome::Stopped,
            };
            let Err(e) = result else {
                return Outcome::Delivered;
            };
            if attempt == self.max_attempts {
                tracing::warn!(
                    batch_id = %batch.id, events = batch.events, attempts = attempt,
                    url = %self.public_url, error = %e, "webhook batch dropped"
                );
                self.stats.failed(batch.events as u64, e.to_string());
                return Outcome::GaveUp;
            }
            let delay = backoff(attempt);
            tracing::debug!(
                batch_id = %batch.id, attempt, delay_ms = delay.as_millis() as u64,
                error = %e, "webhook POST failed; retrying"
            );
            self.stats.retried(e.to_string());
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return Outcome::Stopped,
            }
        }
        Outcome::GaveUp
    }

    /// One POST of `batch` (the client's timeout bounds the whole exchange).
    async fn post(&self, batch: &Batch) -> Result<(), SendError> {
        let mut resp = self
            .http
            .post(&self.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("x-tether-signature", &batch.signature)
            .header("x-tether-batch-id", &batch.id)
            .body(batch.body.clone())
            .send()
            .await?;
        // Read a bounded answer so the connection goes back to the pool.
        let mut read = 0;
        while read < MAX_ANSWER_BYTES {
            match resp.chunk().await? {
                Some(c) => read += c.len(),
                None => break,
            }
        }
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(SendError::Status(status.as_u16()))
        }
    }
}

/// The wait before retry number `attempt` (1 = after the first POST): uniform in
/// `0..=min(30 s, 500 ms × 2^(attempt-1))` (full jitter).
fn backoff(attempt: u64) -> Duration {
    let shift = attempt.saturating_sub(1).min(16) as u32;
    let cap = BACKOFF_BASE_MS
        .saturating_mul(1 << shift)
        .min(BACKOFF_CAP_MS);
    Duration::from_millis(fastrand::u64(0..=cap))
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_to_the_cap() {
        for (attempt, cap) in [(1, 500), (2, 1000), (3, 2000), (7, 30_000), (60, 30_000)] {
            for _ in 0..200 {
                assert!(backoff(attempt) <= Duration::from_millis(cap), "{attempt}");
            }
        }
        // Full jitter: the whole range, not only near the cap.
        assert!((0..200).any(|_| backoff(7) < Duration::from_millis(15_000)));
    }
}
