//! The broker on Redis (SPEC section 10; data model and failure modes in
//! docs/cluster.md). Positions, history and idempotency keys live in Redis and are
//! changed by one Lua script per publish ([`scripts`]); every node delivers to its
//! own subscribers through its hub, from the channel's pub/sub, which it follows
//! only while it has local subscribers ([`follow`]); messages that pub/sub lost are
//! read back from the channel's stream, in order ([`delivery`]); presence and the
//! channel list are kept per node in Redis ([`presence`]).
//!
//! Lifetimes: [`RedisBroker::new`] takes over the hub's watcher;
//! [`RedisBroker::start`] spawns the delivery and presence tasks, which end when
//! the token given is cancelled.

pub mod delivery;
pub mod follow;
pub mod presence;
pub mod scripts;
mod subscribe;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tether_core::broker::{BoxFuture, HistoryPage};
use tether_core::hub::one_line;
use tether_core::{Broker, BrokerError, CatchUp, Connection, Hub, PublishResult, Subscribed};
use tether_protocol::Position;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::link::Link;
use follow::Follower;
use scripts::{PublishArgs, Want};

/// The broker's shared state (the tasks' too).
#[derive(Debug)]
pub(crate) struct Shared {
    link: Arc<Link>,
    hub: Hub,
    node_id: Arc<str>,
    follower: Follower,
    history_size: usize,
    history_ttl: Duration,
    /// The hub's changes, until [`RedisBroker::start`] hands them to the presence task.
    changes: Mutex<Option<mpsc::UnboundedReceiver<Arc<str>>>>,
}

/// Channels, history and presence on Redis.
#[derive(Clone, Debug)]
pub struct RedisBroker {
    shared: Arc<Shared>,
}

impl RedisBroker {
    /// A broker over `link` delivering through `hub` (whose watcher it becomes),
    /// as node `node_id`.
    pub fn new(link: Arc<Link>, hub: Hub, node_id: &str) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        if !hub.watch(tx.clone()) {
            tracing::warn!("the hub already had a watcher; presence will not follow it");
        }
        let settings = hub.settings().clone();
        Self {
            shared: Arc::new(Shared {
                follower: Follower::new(link.clone(), tx),
                link,
                hub,
                node_id: node_id.into(),
                history_size: settings.history_size,
                history_ttl: settings.history_ttl,
                changes: Mutex::new(Some(rx)),
            }),
        }
    }

    /// Spawns the delivery and presence tasks (once); they end with `stop`.
    pub fn start(&self, stop: CancellationToken) -> Vec<JoinHandle<()>> {
        let Some(changes) = self.shared.changes.lock().take() else {
            return Vec::new();
        };
        vec![
            tokio::spawn(delivery::run(self.shared.clone(), stop.clone())),
            tokio::spawn(presence::run(self.shared.clone(), changes, stop)),
        ]
    }

    /// Removes a dead node's presence from every channel (the registry's reaper
    /// calls it once the node's heartbeat expired); returns how many channels it
    /// was in.
    pub async fn forget_node(&self, node_id: &str) -> Result<usize, BrokerError> {
        presence::forget_node(&self.shared, node_id)
            .await
            .map_err(|e| unavailable("forget_node", e))
    }

    /// Whether this node follows `channel`'s pub/sub now.
    pub fn follows(&self, channel: &str) -> bool {
        self.shared.follower.is_followed(channel)
    }

    /// The link it uses.
    pub fn link(&self) -> &Arc<Link> {
        &self.shared.link
    }
}

/// Logs why a Redis call failed and answers `broker_unavailable`.
pub(crate) fn unavailable(what: &str, e: impl std::fmt::Display) -> BrokerError {
    tracing::warn!(error = %e, "redis broker: {what} failed");
    BrokerError::Unavailable
}

impl Shared {
    async fn publish(
        &self,
        channel: &str,
        data: &str,
        idempotency_key: Option<&str>,
    ) -> Result<PublishResult, BrokerError> {
        if !self.link.is_up() {
            return Err(BrokerError::Unavailable);
        }
        let data = one_line(data);
        let args = PublishArgs {
            data: &data,
            idempotency_key,
            history_size: self.history_size,
            history_ttl: self.history_ttl,
            sharded: self.link.is_cluster(),
        };
        let p = scripts::publish(
            &self.link.channel_commands(channel),
            self.link.keys(),
            channel,
            args,
        )
        .await
        .map_err(|e| unavailable("publish", e))?;
        if !p.duplicate {
            self.hub.metrics().published();
        }
        Ok(PublishResult {
            id: p.id,
            position: p.position,
            subscribers: p.subscribers,
            duplicate: p.duplicate,
        })
    }

    async fn history(
        &self,
        channel: &str,
        since: Option<&Position>,
        limit: usize,
    ) -> Result<Option<HistoryPage>, BrokerError> {
        let want = Want {
            epoch: since.map_or("", |p| p.epoch.as_str()),
            first: since.map_or(0, |p| p.offset + 1),
            count: limit,
            ..Want::default()
        };
        let Some(range) = scripts::range(
            &self.link.channel_commands(channel),
            self.link.keys(),
            channel,
            want,
        )
        .await
        .map_err(|e| unavailable("history", e))?
        else {
            return Ok(None);
        };
        let msgs = delivery::incoming(&range, self.history_ttl)
            .iter()
            .map(|m| Arc::new(tether_core::hub::published(channel, m)))
            .collect();
        Ok(Some((range.epoch, msgs)))
    }
}

impl Broker for RedisBroker {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        data: &'a str,
        idempotency_key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<PublishResult, BrokerError>> {
        Box::pin(self.shared.publish(channel, data, idempotency_key))
    }

    fn history<'a>(
        &'a self,
        channel: &'a str,
        since: Option<&'a Position>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Option<HistoryPage>, BrokerError>> {
        Box::pin(self.shared.history(channel, since, limit))
    }

    fn subscribe<'a>(
        &'a self,
        conn: &'a Arc<Connection>,
        channel: &'a str,
        since: Option<&'a Position>,
        announce: Option<Option<u64>>,
    ) -> BoxFuture<'a, Result<Subscribed, BrokerError>> {
        Box::pin(subscribe::subscribe(
            &self.shared,
            conn,
            channel,
            since,
            announce,
        ))
    }

    fn unsubscribe<'a>(
        &'a self,
        conn: &'a Arc<Connection>,
        channel: &'a str,
    ) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let done = match self.shared.hub.try_unsubscribe(conn, channel) {
                Some(done) => done,
                None => {
                    let hub = self.shared.hub.clone();
                    let (conn, channel) = (conn.clone(), channel.to_owned());
                    tokio::task::spawn_blocking(move || hub.unsubscribe(&conn, &channel))
                        .await
                        .map_err(|_| BrokerError::Internal)?
                }
            };
            done.map_err(BrokerError::Hub)
        })
    }

    fn catch_up<'a>(&'a self, conn: &'a Arc<Connection>) -> BoxFuture<'a, CatchUp> {
        Box::pin(async move { self.shared.hub.catch_up(conn) })
    }

    fn presence<'a>(&'a self, channel: &'a str) -> BoxFuture<'a, Vec<(String, u32)>> {
        Box::pin(presence::presence(&self.shared, channel))
    }

    fn channels(&self) -> BoxFuture<'_, Vec<(String, usize, usize)>> {
        Box::pin(presence::channels(&self.shared))
    }

    fn is_up(&self) -> bool {
        self.shared.link.is_up()
    }
}
