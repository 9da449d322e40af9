//! Prometheus metrics (SPEC section 8). No label carries a client id or a channel
//! name: labels are transports, close codes and refusal reasons only, each from a
//! fixed set exported at 0 from the start, so the series count stays bounded (a
//! close code a peer made up is counted as `code="other"`).

mod classic;
mod fanout;
mod process;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;
use tether_protocol::{CloseCode, Refusal};

use self::fanout::DurationHistogram;
use self::process::ProcessCollector;

/// The refusal reasons besides SPEC section 2's table ([`Refusal::ALL`]):
/// `broker_unavailable` (cluster mode's refusal), `pending_handshakes` (client
/// sockets reset at accept) and `api_sockets` (API sockets reset at accept).
pub const EXTRA_REFUSAL_REASONS: [&str; 3] =
    ["broker_unavailable", "pending_handshakes", "api_sockets"];

/// `transport` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    /// `ws`, `sse` or `proxy`.
    pub transport: &'static str,
}

/// `code` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// The close code.
    pub code: CodeValue,
}

/// A close code as a label value: one of [`CloseCode::KNOWN`], or `other`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct CodeValue(Option<u16>);

impl CodeValue {
    /// `code` if it is known, else `other`.
    pub fn of(code: u16) -> Self {
        Self(CloseCode::KNOWN.contains(&CloseCode(code)).then_some(code))
    }
}

impl EncodeLabelValue for CodeValue {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        match self.0 {
            Some(code) => EncodeLabelValue::encode(&code, encoder),
            None => EncodeLabelValue::encode(&"other", encoder),
        }
    }
}

/// `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// A refusal's `error` code, or `pending_handshakes` for sockets cut at accept.
    pub reason: &'static str,
}

/// The node's metrics: a cheap clone handle. Updated where things happen (the
/// registry, the accept loop), rendered by `GET /metrics`.
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: PromRegistry,
    core: Core,
    ops: Ops,
    webhooks: WebhookMetrics,
    cluster: ClusterMetrics,
}

/// Cluster mode's broker: what pub/sub lost and history gave back, and epochs.
#[derive(Debug)]
struct ClusterMetrics {
    gaps_filled: Counter,
    epoch_resets: Counter,
}

impl ClusterMetrics {
    fn register(registry: &mut PromRegistry) -> Self {
        let m = Self {
            gaps_filled: Counter::default(),
            epoch_resets: Counter::default(),
        };
        registry.register(
            "broker_gaps_filled",
            "Messages missed on pub/sub and read back from the broker's history",
            m.gaps_filled.clone(),
        );
        registry.register(
            "broker_epoch_resets",
            "Channels moved to a new epoch because the broker lost their history",
            m.epoch_resets.clone(),
        );
        m
    }
}

/// Heartbeats, slow consumers, sweeps and publish latency.
#[derive(Debug)]
struct Ops {
    heartbeat_timeouts: Counter,
    slow_consumer_closes: Counter,
    sweeps_closed: Counter,
    sweeps_fired: Counter,
    fanout: DurationHistogram,
}

impl Ops {
    fn register(registry: &mut PromRegistry) -> Self {
        let ops = Self {
            heartbeat_timeouts: Counter::default(),
            slow_consumer_closes: Counter::default(),
            sweeps_closed: Counter::default(),
            sweeps_fired: Counter::default(),
            fanout: DurationHistogram::default(),
        };
        registry.register(
            "heartbeat_timeouts",
            "WebSocket connections closed because the peer did not answer a ping (4000)",
            ops.heartbeat_timeouts.clone(),
        );
        registry.register(
            "slow_consumer_closes",
            "Connections closed because they did not read their queue (4008)",
            ops.slow_consumer_closes.clone(),
        );
        registry.register(
            "sweeps_closed",
            "Connections closed by [[sweeps]] rules",
            ops.sweeps_closed.clone(),
        );
        registry.register(
            "sweeps_fired",
            "Sweep evaluations that closed at least one connection",
            ops.sweeps_fired.clone(),
        );
        registry.register(
            "publish_fanout_seconds",
            "From a publish API call to its frame queued for the last local subscriber",
            ops.fanout.clone(),
        );
        ops
    }
}

/// The families every node has: connections, clients, admission, messages, queues.
#[derive(Debug)]
struct Core {
    connections: Family<TransportLabel, Gauge>,
    clients_online: Gauge,
    opened: Family<TransportLabel, Counter>,
    closed: Family<CodeLabel, Counter>,
    refused: Family<ReasonLabel, Counter>,
    pending_handshakes: Gauge,
    published: Counter,
    delivered: Counter,
    queue_bytes: Gauge,
    broker_up: Gauge,
}

impl Core {
    fn register(r: &mut PromRegistry) -> Self {
        Self {
            broker_up: registered(
                r,
                "broker_up",
                "1 while the broker is reachable",
                Gauge::default(),
            ),
            published: registered(
                r,
                "messages_published",
                "Messages published on this node",
                Counter::default(),
            ),
            delivered: registered(
                r,
                "messages_delivered",
                "Messages queued to connections",
                Counter::default(),
            ),
            queue_bytes: registered(
                r,
                "queue_bytes",
                "Bytes waiting in outbound queues",
                Gauge::default(),
            ),
            connections: registered(r, "connections", "Open connections", Family::default()),
            clients_online: registered(
                r,
                "clients_online",
                "Clients online or lingering",
                Gauge::default(),
            ),
            opened: registered(
                r,
                "connections_opened",
                "Connections committed",
                Family::default(),
            ),
            closed: registered(
                r,
                "connections_closed",
                "Connections released, by close code",
                Family::default(),
            ),
            refused: registered(
                r,
                "admission_refused",
                "Handshakes refused, by reason",
                Family::default(),
            ),
            pending_handshakes: registered(
                r,
                "pending_handshakes",
                "Sockets accepted and not yet admitted",
                Gauge::default(),
            ),
        }
    }
}

/// Registers `metric` under `name` (with `help`) and returns it.
fn registered<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut PromRegistry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics, all zero.
    pub fn new() -> Self {
        let mut root = PromRegistry::default();
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("tether");
        let core = Core::register(registry);
        let ops = Ops::register(registry);
        let webhooks = WebhookMetrics::register(registry);
        let cluster = ClusterMetrics::register(registry);
        prefill(&core.connections, &core.opened, &core.closed, &core.refused);
        Self {
            inner: Arc::new(Inner {
                registry: root,
                core,
                ops,
                webhooks,
                cluster,
            }),
        }
    }

    /// The OpenMetrics text exposition (ends with `# EOF`).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }

    /// The classic Prometheus text exposition (format 0.0.4), for scrapers that do
    /// not accept OpenMetrics.
    pub fn render_classic(&self) -> String {
        classic::to_classic(&self.render())
    }

    /// A connection was committed.
    pub fn opened(&self, transport: &'static str) {
        self.inner
            .core
            .connections
            .get_or_create(&TransportLabel { transport })
            .inc();
        self.inner
            .core
            .opened
            .get_or_create(&TransportLabel { transport })
            .inc();
    }

    /// A connection was released with `code`.
    pub fn closed(&self, transport: &'static str, code: u16) {
        self.inner
            .core
            .connections
            .get_or_create(&TransportLabel { transport })
            .dec();
        self.inner
            .core
            .closed
            .get_or_create(&CodeLabel {
                code: CodeValue::of(code),
            })
            .inc();
    }

    /// A WebSocket peer did not answer a ping in time (it is closed with 4000).
    pub fn heartbeat_timeout(&self) {
        self.inner.ops.heartbeat_timeouts.inc();
    }

    /// A connection is closed as a slow consumer (4008).
    pub fn slow_consumer_close(&self) {
        self.inner.ops.slow_consumer_closes.inc();
    }

    /// A sweep evaluation closed `n` connections.
    pub fn swept(&self, n: usize) {
        if n > 0 {
            self.inner.ops.sweeps_fired.inc();
            self.inner.ops.sweeps_closed.inc_by(n as u64);
        }
    }

    /// A publish took `elapsed` from its API call to its frame queued for the last
    /// local subscriber.
    pub fn publish_fanout(&self, elapsed: Duration) {
        self.inner.ops.fanout.observe(elapsed);
    }

    /// The number of clients online (or lingering) changed by `delta`.
    pub fn clients_delta(&self, delta: i64) {
        self.inner.core.clients_online.inc_by(delta);
    }

    /// A handshake was refused for `reason`.
    pub fn refused(&self, reason: &'static str) {
        self.inner
            .core
            .refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// A message was published.
    pub fn published(&self) {
        self.inner.core.published.inc();
    }

    /// `n` messages were queued to connections.
    pub fn delivered(&self, n: u64) {
        self.inner.core.delivered.inc_by(n);
    }

    /// Sets the bytes waiting in every outbound queue (computed at scrape time).
    pub fn set_queue_bytes(&self, n: u64) {
        self.inner.core.queue_bytes.set(n as i64);
    }

    /// Records whether the broker is reachable.
    pub fn set_broker_up(&self, up: bool) {
        self.inner.core.broker_up.set(i64::from(up));
    }

    /// `n` messages missed on the broker's pub/sub were read back from its history.
    pub fn gaps_filled(&self, n: u64) {
        self.inner.cluster.gaps_filled.inc_by(n);
    }

    /// A channel moved to a new epoch (its history was lost in the broker).
    pub fn epoch_reset(&self) {
        self.inner.cluster.epoch_resets.inc();
    }

    /// The number of pending handshakes changed by `delta`.
    pub fn pending_delta(&self, delta: i64) {
        self.inner.core.pending_handshakes.inc_by(delta);
    }
}

/// Every labelled series at 0: transports, known close codes (and `other`), refusal
/// reasons. Dashboards and alerts see them before the first occurrence.
fn prefill(
    connections: &Family<TransportLabel, Gauge>,
    opened: &Family<TransportLabel, Counter>,
    closed: &Family<CodeLabel, Counter>,
    refused: &Family<ReasonLabel, Counter>,
) {
    for transport in ["ws", "sse", "proxy"] {
        let _ = connections.get_or_create(&TransportLabel { transport });
        let _ = opened.get_or_create(&TransportLabel { transport });
    }
    for code in CloseCode::KNOWN {
        let _ = closed.get_or_create(&CodeLabel {
            code: CodeValue::of(code.0),
        });
    }
    let _ = closed.get_or_create(&CodeLabel {
        code: CodeValue(None),
    });
    let reasons = Refusal::ALL.iter().map(|r| r.error());
    for reason in reasons.chain(EXTRA_REFUSAL_REASONS) {
        let _ = refused.get_or_create(&ReasonLabel { reason });
    }
}

// --- Webhooks -------------------------------------------------------------------

/// `result` label of `tether_webhook_deliveries_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok`, `failed` or `retried`.
    pub result: &'static str,
}

/// The webhook sender's metrics (registered even when webhooks are off, so HELP
/// and TYPE are there from the start): a cheap clone handle.
#[derive(Clone, Debug, Default)]
pub struct WebhookMetrics {
    /// POSTs by outcome: `ok` (2xx), `retried` (failed, will be sent again),
    /// `failed` (failed for the last time: the batch is dropped).
    deliveries: Family<ResultLabel, Counter>,
    /// Events that never reached the receiver (overflow, given up, shutdown).
    dropped: Counter,
    /// Events waiting for delivery, the batch in flight included.
    queue: Gauge,
}

impl WebhookMetrics {
    fn register(registry: &mut PromRegistry) -> Self {
        let m = Self::default();
        registry.register(
            "webhook_deliveries",
            "Webhook POSTs, by result (ok, retried, failed)",
            m.deliveries.clone(),
        );
        registry.register(
            "webhook_events_dropped",
            "Events never delivered to the webhook: queue overflow, attempts exhausted, shutdown",
            m.dropped.clone(),
        );
        registry.register(
            "webhook_queue_events",
            "Events waiting for webhook delivery (the batch in flight included)",
            m.queue.clone(),
        );
        for result in ["ok", "failed", "retried"] {
            let _ = m.deliveries.get_or_create(&ResultLabel { result });
        }
        m
    }

    /// One POST ended with `result` (`ok`, `failed` or `retried`).
    pub fn delivery(&self, result: &'static str) {
        self.deliveries.get_or_create(&ResultLabel { result }).inc();
    }

    /// `n` events were dropped.
    pub fn dropped(&self, n: u64) {
        self.dropped.inc_by(n);
    }

    /// Sets the number of events waiting (the batch in flight included).
    pub fn set_queue(&self, n: u64) {
        self.queue.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

impl Metrics {
    /// The webhook sender's metrics.
    pub fn webhooks(&self) -> &WebhookMetrics {
        &self.inner.webhooks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has(text: &str, line: &str) -> bool {
        text.lines().any(|l| l == line)
    }

    #[test]
    fn a_sweep_that_closed_nothing_did_not_fire() {
        let m = Metrics::new();
        m.swept(0);
        m.swept(2);
        m.swept(0);
        m.swept(1);
        let text = m.render();
        assert!(has(&text, "tether_sweeps_fired_total 2"), "{text}");
        assert!(has(&text, "tether_sweeps_closed_total 3"), "{text}");
    }

    #[test]
    fn made_up_close_codes_share_one_series() {
        let m = Metrics::new();
        m.opened("ws");
        m.opened("ws");
        m.opened("ws");
        m.closed("ws", 3123);
        m.closed("ws", 4999);
        m.closed("ws", 4001);
        let text = m.render();
        assert!(
            has(&text, "tether_connections_closed_total{code=\"other\"} 2"),
            "{text}"
        );
        assert!(
            has(&text, "tether_connections_closed_total{code=\"4001\"} 1"),
            "{text}"
        );
        assert!(!text.contains("3123") && !text.contains("4999"), "{text}");
        let codes = text
            .lines()
            .filter(|l| l.starts_with("tether_connections_closed_total{"))
            .count();
        assert_eq!(codes, CloseCode::KNOWN.len() + 1);
    }
}
