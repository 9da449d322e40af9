//! The lifecycle engine, independent of any transport.
//!
//! Owns who is connected ([`Registry`]), how a connection is admitted
//! ([`Reservation`] → [`ConnectionGuard`]), how it is released (dropping the guard,
//! the one release path), the lifecycle [`EventBus`], per-address limits
//! ([`IpLimits`]), the [`Metrics`] and the node's shutdown state ([`Drain`]).
//! Transports (WebSocket, SSE, proxy) live in `tether-server` and only talk to
//! these handles.
#![warn(missing_docs)]

pub mod broker;
pub mod connection;
pub mod drain;
pub mod events;
pub mod hub;
pub mod ids;
pub mod ip_limits;
pub mod message;
pub mod metrics;
pub mod outbox;
pub mod registry;
pub mod select;

pub use broker::{Broker, BrokerError, MemoryBroker};
pub use connection::{ConnSnapshot, ConnSpec, Connection, Transport};
pub use drain::{Drain, Phase};
pub use events::{EventBus, EventSink};
pub use hub::{
    CatchUp, Delivery, Followed, Head, Hub, HubError, HubSettings, Incoming, PublishResult,
    Published, Subscribed,
};
pub use ids::{parse_conn_id, ConnIdGen};
pub use ip_limits::{IpLimits, IpSlot};
pub use metrics::{Metrics, WebhookMetrics};
pub use outbox::{DirectSink, Offered, Outbox, Outgoing};
pub use registry::{
    ClientLimitPolicy, ClientSnapshot, ClientSummary, ClusterSeam, ConnectionGuard, Registry,
    RegistrySettings, Reservation,
};
pub use select::{Filter, Selector};

/// The current time as RFC 3339 UTC with milliseconds (`2026-11-21T20:00:00.123Z`).
pub fn rfc3339_now() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// A time as RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
