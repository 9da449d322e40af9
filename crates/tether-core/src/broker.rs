//! The broker: where publishes get their id and position and where history lives.
//! A narrow trait: publish, history, liveness. Cluster mode will add how a node
//! starts and stops receiving a channel (driven by the hub's `channel.occupied` /
//! `channel.vacated` transitions); the in-memory broker needs neither.
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
