//! Prometheus metrics (SPEC section 8). No label carries a client id or a channel
//! name: labels are transports, close codes and refusal reasons only, so the series
//! count stays bounded.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry as PromRegistry;

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
    pub code: u16,
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
    gaps_filled: Counter,
    epoch_resets: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics, all zero.
    pub fn new() -> Self {
        let mut registry = PromRegistry::with_prefix("tether");
        let connections = Family::<TransportLabel, Gauge>::default();
        let clients_online = Gauge::default();
        let opened = Family::<TransportLabel, Counter>::default();
        let closed = Family::<CodeLabel, Counter>::default();
        let refused = Family::<ReasonLabel, Counter>::default();
        let pending_handshakes = Gauge::default();
        let published = Counter::default();
        let delivered = Counter::default();
        let queue_bytes = Gauge::default();
        let broker_up = Gauge::default();
        let gaps_filled = Counter::default();
        let epoch_resets = Counter::default();
        registry.register(
            "broker_gaps_filled",
            "Messages missed on pub/sub and read back from the broker's history",
            gaps_filled.clone(),
        );
        registry.register(
            "broker_epoch_resets",
            "Channels moved to a new epoch because the broker lost their history",
            epoch_resets.clone(),
        );
        registry.register(
            "broker_up",
            "1 while the broker is reachable",
            broker_up.clone(),
        );
        registry.register(
            "messages_published",
            "Messages published on this node",
            published.clone(),
        );
        registry.register(
            "messages_delivered",
            "Messages queued to connections",
            delivered.clone(),
        );
        registry.register(
            "queue_bytes",
            "Bytes waiting in outbound queues",
            queue_bytes.clone(),
        );
        registry.register("connections", "Open connections", connections.clone());
        registry.register(
            "clients_online",
            "Clients online or lingering",
            clients_online.clone(),
        );
        registry.register(
            "connections_opened",
            "Connections committed",
            opened.clone(),
        );
        registry.register(
            "connections_closed",
            "Connections released, by close code",
            closed.clone(),
        );
        registry.register(
            "admission_refused",
            "Handshakes refused, by reason",
            refused.clone(),
        );
        registry.register(
            "pending_handshakes",
            "Sockets accepted and not yet admitted",
            pending_handshakes.clone(),
        );
        for transport in ["ws", "sse", "proxy"] {
            let _ = connections.get_or_create(&TransportLabel { transport });
            let _ = opened.get_or_create(&TransportLabel { transport });
        }
        Self {
            inner: Arc::new(Inner {
                registry,
                connections,
                clients_online,
                opened,
                closed,
                refused,
                pending_handshakes,
                published,
                delivered,
                queue_bytes,
                broker_up,
                gaps_filled,
                epoch_resets,
            }),
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }

    /// A connection was committed.
    pub fn opened(&self, transport: &'static str) {
        self.inner
            .connections
            .get_or_create(&TransportLabel { transport })
            .inc();
        self.inner
            .opened
            .get_or_create(&TransportLabel { transport })
            .inc();
    }

    /// A connection was released with `code`.
    pub fn closed(&self, transport: &'static str, code: u16) {
        self.inner
            .connections
            .get_or_create(&TransportLabel { transport })
            .dec();
        self.inner.closed.get_or_create(&CodeLabel { code }).inc();
    }

    /// The number of clients online (or lingering) changed by `delta`.
    pub fn clients_delta(&self, delta: i64) {
        self.inner.clients_online.inc_by(delta);
    }

    /// A handshake was refused for `reason`.
    pub fn refused(&self, reason: &'static str) {
        self.inner
            .refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// A message was published.
    pub fn published(&self) {
        self.inner.published.inc();
    }

    /// `n` messages were queued to connections.
    pub fn delivered(&self, n: u64) {
        self.inner.delivered.inc_by(n);
    }

    /// Sets the bytes waiting in every outbound queue (computed at scrape time).
    pub fn set_queue_bytes(&self, n: u64) {
        self.inner.queue_bytes.set(n as i64);
    }

    /// Records whether the broker is reachable.
    pub fn set_broker_up(&self, up: bool) {
        self.inner.broker_up.set(i64::from(up));
    }

    /// `n` messages missed on the broker's pub/sub were read back from its history.
    pub fn gaps_filled(&self, n: u64) {
        self.inner.gaps_filled.inc_by(n);
    }

    /// A channel moved to a new epoch (its history was lost in the broker).
    pub fn epoch_reset(&self) {
        self.inner.epoch_resets.inc();
    }

    /// The number of pending handshakes changed by `delta`.
    pub fn pending_delta(&self, delta: i64) {
        self.inner.pending_handshakes.inc_by(delta);
    }
}
