//! A Redis Cluster seen shard by shard: one command client and one subscriber
//! client per primary, each a plain (centralized) fred client with its own
//! reconnect loop, and the slot map (`CLUSTER SLOTS`) that says which primary owns
//! a key. fred's clustered client cannot be used for this: while any primary in its
//! slot map refuses connections it re-syncs the whole cluster in a loop and every
//! command, on every shard, waits (and times out) until that primary is back. Here
//! a dead shard only fails what lives on it.
//!
//! The slot map is read again on every health tick (see [`super::health`]); a
//! primary that appears gets its clients then. A command routed by a stale map
//! gets `MOVED` from Redis and fails (503); the next tick has the new map.

use std::collections::HashMap;
use std::time::Duration;

use fred::clients::{Client, SubscriberClient};
use fred::interfaces::{ClientLike, ClusterInterface};

use fred::types::cluster::ClusterRouting;
use fred::types::config::{Config, Server, ServerConfig};
use fred::types::{Builder, Value};
use parking_lot::RwLock;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::pubsub::{self, Event};
use super::LinkError;

/// One primary's clients.
#[derive(Clone, Debug)]
pub struct Shard {
    /// Commands and scripts on this shard's keys.
    pub commands: Client,
    /// SSUBSCRIBE to this shard's channels.
    pub subscriber: SubscriberClient,
}

/// Which primary owns which slots, and every primary's clients.
#[derive(Debug)]
struct Map {
    routing: ClusterRouting,
    shards: HashMap<Server, Shard>,
}

/// The shards of a Redis Cluster.
#[derive(Debug)]
pub(super) struct Shards {
    /// Everything but the server: what every shard's clients are built from.
    base: Config,
    /// Applies the link's timeouts and policy to a shard's builder.
    tune: fn(&mut Builder, Duration),
    timeout: Duration,
    map: RwLock<Map>,
    /// Where the shards' subscribers' messages go (see [`pubsub`]).
    events: broadcast::Sender<Event>,
    /// Ends the forwarding tasks ([`Shards::quit`]).
    stop: CancellationToken,
}

impl Shards {
    /// Clients for each seed (not connected yet); the slot map comes with the first
    /// health tick.
    pub(super) fn new(
        base: Config,
        seeds: Vec<Server>,
        tune: fn(&mut Builder, Duration),
        timeout: Duration,
        events: broadcast::Sender<Event>,
    ) -> Result<Self, LinkError> {
        let shards = Shards {
            base,
            tune,
            timeout,
            map: RwLock::new(Map {
                routing: ClusterRouting::new(),
                shards: HashMap::new(),
            }),
            events,
            stop: CancellationToken::new(),
        };
        for server in seeds {
            let shard = shards.build(&server)?;
            shards.map.write().shards.insert(server, shard);
        }
        Ok(shards)
    }

    fn build(&self, server: &Server) -> Result<Shard, LinkError> {
        let mut config = self.base.clone();
        config.server = ServerConfig::Centralized {
            server: server.clone(),
        };
        let mut builder = Builder::from_config(config);
        (self.tune)(&mut builder, self.timeout);
        Ok(Shard {
            commands: builder.build().map_err(LinkError::Client)?,
            subscriber: builder
                .build_subscriber_client()
                .map_err(LinkError::Client)?,
        })
    }

    /// Connects a shard's clients and forwards its pub/sub to the link's events.
    fn connect(&self, shard: &Shard) {
        drop(super::drive(shard.commands.connect()));
        drop(super::drive(shard.subscriber.connect()));
        tokio::spawn(pubsub::forward(
            shard.subscriber.clone(),
            self.events.clone(),
            self.stop.clone(),
        ));
    }

    /// Connects the seeds' clients (once, from [`super::Link::start`]).
    pub(super) fn connect_all(&self) {
        let shards: Vec<Shard> = self.map.read().shards.values().cloned().collect();
        for shard in &shards {
            self.connect(shard);
        }
    }

    /// Every shard's clients.
    pub(super) fn all(&self) -> Vec<Shard> {
        self.map.read().shards.values().cloned().collect()
    }

    /// The clients of the primary that owns `key`'s hash slot (`None` before the
    /// slot map is known).
    pub(super) fn owner(&self, key: &str) -> Option<Shard> {
        let slot = fred::util::redis_keyslot(key.as_bytes());
        let map = self.map.read();
        let server = map.routing.get_server(slot)?;
        map.shards.get(server).cloned()
    }

    /// The primary that owns `key`'s hash slot (`None` before the slot map is known).
    pub(super) fn owner_server(&self, key: &str) -> Option<Server> {
        let slot = fred::util::redis_keyslot(key.as_bytes());
        self.map.read().routing.get_server(slot).cloned()
    }

    /// A subscriber client of its own (not connected) to the primary that owns
    /// `key`'s hash slot, and that primary.
    pub(super) fn own_subscriber(&self, key: &str) -> Option<(SubscriberClient, Server)> {
        let server = self.owner_server(key)?;
        match self.build(&server) {
            Ok(shard) => Some((shard.subscriber, server)),
            Err(e) => {
                tracing::warn!(error = %e, %server, "redis shard subscriber");
                None
            }
        }
    }

    /// The primaries of the slot map and their command clients (empty before the
    /// slot map is known).
    pub(super) fn primaries(&self) -> Vec<(Server, Option<Client>)> {
        let map = self.map.read();
        map.routing
            .unique_primary_nodes()
            .into_iter()
            .map(|s| {
                let c = map.shards.get(&s).map(|sh| sh.commands.clone());
                (s, c)
            })
            .collect()
    }

    /// Reads the slot map from the first shard that answers and builds clients for
    /// primaries it did not know. `None` if no shard answered, else whether a slot
    /// changed owner (a failover, a resharding).
    pub(super) async fn refresh(&self) -> Option<bool> {
        let all = self.all();
        if all.is_empty() {
            return None;
        }
        let asks = all.into_iter().map(|shard| {
            Box::pin(async move {
                let reply: Value = shard.commands.cluster_slots().await?;
                ClusterRouting::from_cluster_slots(reply, "127.0.0.1")
            })
        });
        let routing = match futures_util::future::select_ok(asks).await {
            Ok((routing, _)) => Some(routing),
            Err(e) => {
                tracing::debug!(error = %e, "no shard answered CLUSTER SLOTS");
                None
            }
        };
        let routing = routing?;
        let mut added = Vec::new();
        for server in routing.unique_primary_nodes() {
            if self.map.read().shards.contains_key(&server) {
                continue;
            }
            match self.build(&server) {
                Ok(shard) => added.push((server, shard)),
                Err(e) => tracing::warn!(error = %e, %server, "redis shard client"),
            }
        }
        for (_, shard) in &added {
            self.connect(shard);
        }
        let mut map = self.map.write();
        map.shards.extend(added);
        let moved = !map.routing.slots().is_empty() && map.routing.slots() != routing.slots();
        map.routing = routing;
        Some(moved)
    }

    /// Quits every shard's clients (ends their tasks).
    pub(super) async fn quit(&self) {
        self.stop.cancel();
        for shard in self.all() {
            let _ = shard.subscriber.quit().await;
            let _ = shard.commands.quit().await;
        }
    }
}

/// The servers of a clustered config's seeds.
pub(super) fn seeds(config: &Config) -> Vec<Server> {
    match &config.server {
        ServerConfig::Clustered { hosts, .. } => hosts.clone(),
        _ => Vec::new(),
    }
}
