//! The broker: the only door to channels. Publishes get their id and position there,
//! history lives there, and every subscribe, unsubscribe, catch-up page and presence
//! read goes through it, so a broker that spans nodes (Redis) sees all of them.
//! Cluster mode will add how a node starts and stops receiving a channel (driven by
//! the hub's `channel.occupied` / `channel.vacated` transitions).
//!
//! # The contract every broker keeps
//! - **Positions.** A channel's messages carry `"<epoch>:<offset>"`; offsets rise by
//!   exactly 1 per message, in the order subscribers receive them.
//! - **Epochs.** The epoch names one unbroken history of a channel. It changes only
//!   when that history is lost (the channel's state was dropped, or the store behind
//!   it came back empty); a position of another epoch is never resumed from.
//! - **Recovered.** `subscribe` with `since` answers `recovered: true` only when every
//!   message after `since` is still in history: those are then delivered first, in
//!   order, followed by live messages with no gap and no repeat. Otherwise it answers
//!   `recovered: false` and delivers from the channel's current position on; a
//!   broker never silently skips.
//!
//! The node-local [`Hub`] stays the delivery seam for every broker: whatever assigns
//! positions, messages reach this node's connections through the hub's per-channel
//! critical section, in offset order, so resume has no gap and no duplicate. The
//! in-memory broker is the hub itself (one node: its history is the history).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tether_protocol::Position;

use crate::connection::Connection;
use crate::hub::{CatchUp, Hub, HubError, PublishResult, Published, Subscribed};

/// A boxed, sendable future (the trait stays object-safe for `Arc<dyn Broker>`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Fan-outs to more subscribers than this run on a blocking thread instead of the
/// caller's runtime worker: the API's own runtime stays responsive (`/api/stats`,
/// health checks) while a large channel is written to, and a worker never waits on
/// a channel's publishing lock for long.
pub const INLINE_FANOUT: usize = 64;

/// Why a broker call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BrokerError {
    /// The broker cannot be reached (`broker_unavailable`, 503; never a silent drop).
    Unavailable,
    /// A channel limit refused it.
    Hub(HubError),
    /// The work failed inside this node (its thread panicked or was cancelled at
    /// shutdown); nothing is known to have been published.
    Internal,
}

impl BrokerError {
    /// The API's `error` code.
    pub fn code(self) -> &'static str {
        match self {
            BrokerError::Unavailable => "broker_unavailable",
            BrokerError::Hub(e) => e.code(),
            BrokerError::Internal => "internal",
        }
    }
    /// A human sentence.
    pub fn message(self) -> &'static str {
        match self {
            BrokerError::Unavailable => "the broker is unreachable; nothing was published",
            BrokerError::Hub(e) => e.message(),
            BrokerError::Internal => "the call failed inside the server",
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

    /// Subscribes `conn` to `channel`, resuming after `since` (see the contract
    /// above). With `announce`, the `subscribed` frame (echoing that `ref`) is queued
    /// ahead of every message of the channel.
    fn subscribe<'a>(
        &'a self,
        conn: &'a Arc<Connection>,
        channel: &'a str,
        since: Option<&'a Position>,
        announce: Option<Option<u64>>,
    ) -> BoxFuture<'a, Result<Subscribed, BrokerError>>;

    /// Ends `conn`'s subscription to `channel`: no message of it reaches `conn`'s
    /// outbox after this resolves.
    fn unsubscribe<'a>(
        &'a self,
        conn: &'a Arc<Connection>,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// Moves the next page of history into the outbox of a connection whose
    /// subscriptions are catching up (called as its outbox drains).
    fn catch_up<'a>(&'a self, conn: &'a Arc<Connection>) -> BoxFuture<'a, CatchUp>;

    /// A channel's clients and how many connections each has subscribed.
    fn presence<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Vec<(String, u32)>>;

    /// Every channel with state: name, subscribers, distinct clients.
    fn channels(&self) -> BoxFuture<'_, Vec<(String, usize, usize)>>;

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
            if self.hub.fanout_size(channel) <= INLINE_FANOUT {
                return self
                    .hub
                    .publish(channel, data, idempotency_key)
                    .map_err(BrokerError::Hub);
            }
            let hub = self.hub.clone();
            let (channel, data) = (channel.to_owned(), data.to_owned());
            let key = idempotency_key.map(str::to_owned);
            tokio::task::spawn_blocking(move || hub.publish(&channel, &data, key.as_deref()))
                .await
                .map_err(|_| BrokerError::Internal)?
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

    fn subscribe<'a>(
        &'a self,
        conn: &'a Arc<Connection>,
        channel: &'a str,
        since: Option<&'a Position>,
        announce: Option<Option<u64>>,
    ) -> BoxFuture<'a, Result<Subscribed, BrokerError>> {
        Box::pin(async move {
            self.hub
                .subscribe(conn, channel, since, announce)
                .map_err(BrokerError::Hub)
        })
    }

    fn unsubscribe<'a>(
        &'a self,
        conn: &'a Arc<Connection>,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            // A channel being fanned out to holds its publishing lock for the whole
            // write: wait for it on a blocking thread, not on this runtime worker.
            let done = match self.hub.try_unsubscribe(conn, channel) {
                Some(done) => done,
                None => {
                    let (hub, conn, channel) = (self.hub.clone(), conn.clone(), channel.to_owned());
                    tokio::task::spawn_blocking(move || hub.unsubscribe(&conn, &channel))
                        .await
                        .map_err(|_| BrokerError::Internal)?
                }
            };
            done.map_err(BrokerError::Hub)
        })
    }

    fn catch_up<'a>(&'a self, conn: &'a Arc<Connection>) -> BoxFuture<'a, CatchUp> {
        Box::pin(async move { self.hub.catch_up(conn) })
    }

    fn presence<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Vec<(String, u32)>> {
        Box::pin(async move { self.hub.presence(channel) })
    }

    fn channels(&self) -> BoxFuture<'_, Vec<(String, usize, usize)>> {
        Box::pin(async move { self.hub.channels() })
    }
}
