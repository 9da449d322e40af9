//! Webhooks (SPEC section 3): lifecycle events POSTed to `[webhooks] url` in signed
//! batches.
//!
//! Ownership and lifetime: [`Webhooks`] is built with the `App` and owns the bounded
//! [`queue`] (the event bus's sink: the bus pushes into it, never waits on it) and
//! the counters. `Server::start`'s run task spawns the one sender task
//! ([`Webhooks::start`]) and owns its [`SenderTask`]; at shutdown, once the
//! connections are drained, [`SenderTask::flush`] lets it empty the queue until
//! `shutdown.timeout_ms` after the signal, then stops it and logs what is left. The
//! queue is the only coupling between the server and the receiver: a slow receiver
//! fills it, it never slows admission or delivery.

pub mod config;

mod batch;
mod queue;
mod send;
mod sign;
mod stats;
mod status;

use std::sync::Arc;
use std::time::Duration;

use tether_core::{EventSink, WebhookMetrics};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::config::{public_url, WebhooksSection};
use self::queue::Queue;
use self::stats::Stats;

pub(crate) use self::status::status;

/// Most idle connections kept to the receiver.
const POOL_IDLE: usize = 2;

/// The node's webhooks: configuration, queue and counters.
#[derive(Debug)]
pub struct Webhooks {
    /// `[webhooks]` as configured.
    cfg: WebhooksSection,
    /// Events waiting (the bus's sink).
    queue: Arc<Queue>,
    /// What `GET /api/webhooks` and the metrics show.
    stats: Arc<Stats>,
}

/// The running sender, owned by the server's run task.
#[derive(Debug)]
pub(crate) struct SenderTask {
    queue: Arc<Queue>,
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl Webhooks {
    pub(crate) fn new(cfg: &WebhooksSection, metrics: WebhookMetrics) -> Arc<Self> {
        let stats = Arc::new(Stats::new(metrics));
        let queue = Arc::new(Queue::new(
            cfg.events.clone(),
            cfg.max_pending.get() as usize,
            stats.clone(),
        ));
        Arc::new(Self {
            cfg: cfg.clone(),
            queue,
            stats,
        })
    }

    /// The event bus's sink, when webhooks are on.
    pub(crate) fn sink(&self) -> Option<Arc<dyn EventSink>> {
        self.cfg
            .enabled()
            .then(|| self.queue.clone() as Arc<dyn EventSink>)
    }

    /// Spawns the sender (nothing when webhooks are off).
    pub(crate) fn start(&self) -> Option<SenderTask> {
        if !self.cfg.enabled() {
            return None;
        }
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(Duration::from_millis(self.cfg.timeout_ms.get()))
            .connect_timeout(Duration::from_millis(self.cfg.timeout_ms.get()))
            .pool_max_idle_per_host(POOL_IDLE)
            .tcp_nodelay(true)
            // A redirect is an answer that is not 2xx: retried, never followed (a
            // followed 302 would turn the POST into a GET elsewhere).
            .redirect(reqwest::redirect::Policy::none())
            .build();
        let http = match http {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "webhooks: cannot build the HTTP client; webhooks off");
                return None;
            }
        };
        let sender = send::Sender {
            queue: self.queue.clone(),
            stats: self.stats.clone(),
            http,
            url: self.cfg.url.clone(),
            public_url: public_url(&self.cfg.url),
            secret: self.cfg.secret.as_bytes().to_vec(),
            batch_max: self.cfg.batch_max.get() as usize,
            batch_wait: Duration::from_millis(self.cfg.batch_ms),
            max_attempts: self.cfg.max_attempts.get(),
        };
        let stop = CancellationToken::new();
        let handle = tokio::spawn(sender.run(stop.clone()));
        Some(SenderTask {
            queue: self.queue.clone(),
            stop,
            handle,
        })
    }
}

impl SenderTask {
    /// Lets the sender deliver what is queued until `deadline` (or `hard`, a second
    /// signal), then stops it; what could not be delivered is counted as dropped and
    /// logged by the sender.
    pub(crate) async fn flush(self, deadline: Instant, hard: &CancellationToken) {
        let (queued, in_flight) = self.queue.pending();
        tracing::info!(events = queued + in_flight, "shutdown: flushing webhooks");
        self.queue.close();
        let mut handle = self.handle;
        let finished = tokio::select! {
            r = &mut handle => Some(r),
            _ = tokio::time::sleep_until(deadline) => None,
            _ = hard.cancelled() => None,
        };
        let result = match finished {
            Some(r) => r,
            None => {
                self.stop.cancel();
                handle.await
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "webhook sender failed");
        }
    }
}
