//! Lifecycle events (SPEC section 3): the same JSON goes to webhooks, to
//! `GET /api/events` and to the log.

use serde::{Deserialize, Serialize};

/// The kind of a lifecycle event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventType {
    /// A connection was committed.
    #[serde(rename = "connection.opened")]
    ConnectionOpened,
    /// A connection was released.
    #[serde(rename = "connection.closed")]
    ConnectionClosed,
    /// A client's first connection was committed.
    #[serde(rename = "client.online")]
    ClientOnline,
    /// A client's last connection was released (plus grace).
    #[serde(rename = "client.offline")]
    ClientOffline,
    /// A connection subscribed to a channel.
    #[serde(rename = "subscription.added")]
    SubscriptionAdded,
    /// A subscription ended (also when its connection closed).
    #[serde(rename = "subscription.removed")]
    SubscriptionRemoved,
    /// A channel got its first subscriber on this node.
    #[serde(rename = "channel.occupied")]
    ChannelOccupied,
    /// A channel lost its last subscriber on this node.
    #[serde(rename = "channel.vacated")]
    ChannelVacated,
}

impl EventType {
    /// The type's wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::ConnectionOpened => "connection.opened",
            EventType::ConnectionClosed => "connection.closed",
            EventType::ClientOnline => "client.online",
            EventType::ClientOffline => "client.offline",
            EventType::SubscriptionAdded => "subscription.added",
            EventType::SubscriptionRemoved => "subscription.removed",
            EventType::ChannelOccupied => "channel.occupied",
            EventType::ChannelVacated => "channel.vacated",
        }
    }
}

/// One lifecycle event. Every field is always present (`null` when it does not apply).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LifecycleEvent {
    /// A UUID.
    pub id: String,
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventType,
    /// RFC 3339 time with milliseconds, UTC.
    pub at: String,
    /// The node that fired it.
    pub node_id: String,
    /// The client concerned.
    pub client_id: Option<String>,
    /// The connection concerned.
    pub conn_id: Option<String>,
    /// The channel concerned.
    pub channel: Option<String>,
    /// The close code (`connection.closed`).
    pub code: Option<u16>,
    /// The close reason (`connection.closed`).
    pub reason: Option<String>,
    /// How long the connection lived (`connection.closed`).
    pub duration_ms: Option<u64>,
    /// The upstream of a proxied connection (`connection.*`), else `null`.
    pub upstream: Option<String>,
}

impl LifecycleEvent {
    /// The event as JSON text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}
