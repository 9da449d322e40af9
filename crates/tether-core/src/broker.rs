//! The broker: where publishes get their id and position, where history lives, and
//! how a node learns of messages published anywhere. A narrow trait: publish,
//! history, liveness, plus two optional hooks cluster mode needs (a node starts or
//! stops caring about a channel).
//!
//! The node-local [`Hub`] stays the delivery seam for every broker: whatever assigns
//! positions, messages reach this node's connections through the hub's per-channel
//! critical section, in offset order, so resume has no gap and no duplicate. The
//! in-memory broker is the hub itself (one node: its history is the history).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tether_protocol::Position;

use crate::hub::{Hub, HubError, PublishResult, Published};

/// A boxed, sendable future (the trait stays object-safe for `Arc<dyn Broker>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a broker call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerError {
    /// The broker cannot be reached (`broker_unavailable`, 503; never a silent drop).
    Unavailable,
    /// A channel limit refused it.
    Hub(HubError),
}

impl BrokerError {
    /// The API's `error` code.
    pub fn code(self) -> &'static str {
        match self {
            BrokerError::Unavailable => "broker_unavailable",
            BrokerError::Hub(e) => e.code(),
        }
    }
    /// A human sentence.
    pub fn message(self) -> &'static str {
        match self {
            BrokerError::Unavailable => "the broker is unreachable; nothing was published",
            BrokerError::Hub(e) => e.message(),
        }
    }
}

/// A channel's history page: its epoch and messages.
pub type HistoryPage = (String, Vec<Arc<Published>>);

/// The broker behind publishes and history.
pub trait Broker: Send + Sync + std::fmt::Debug {
    /// Assigns id and position, stores the message in history and delivers it to
    /// every subscriber (through each node's hub). `data` is raw JSON text.
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        data: &'a str,
        idempotency_key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<PublishResult, BrokerError>>;

    /// History after `since` (exclusive), at most `limit`; `None` for a channel with
    /// no state.
    fn history<'a>(
        &'a self,
        channel: &'a str,
        since: Option<&'a Position>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Option<HistoryPage>, BrokerError>>;

    /// Whether the broker is reachable (`/readyz`, `tether_broker_up`).
    fn is_up(&self) -> bool {
        true
    }

    /// This node got its first local subscriber of `channel`.
    fn node_subscribe(&self, _channel: &str) {}

    /// This node lost its last local subscriber of `channel`.
    fn node_unsubscribe(&self, _channel: &str) {}
}

/// The in-memory broker: one node, history in the node's hub.
#[derive(Clone, Debug)]
pub struct MemoryBroker {
    hub: Hub,
}

impl MemoryBroker {
    /// A broker over `hub`.
    pub fn new(hub: Hub) -> Self {
        Self { hub }
    }
}

impl Broker for MemoryBroker {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        data: &'a str,
        idempotency_key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<PublishResult, BrokerError>> {
        Box::pin(async move {
            self.hub
                .publish(channel, data, idempotency_key)
                .map_err(BrokerError::Hub)
        })
    }

    fn history<'a>(
        &'a self,
        channel: &'a str,
        since: Option<&'a Position>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Option<HistoryPage>, BrokerError>> {
        Box::pin(async move { Ok(self.hub.history(channel, since, limit)) })
    }
}
