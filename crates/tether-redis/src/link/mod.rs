//! A node's connections to Redis: a command client and a subscriber client, each
//! driven by fred's own task with a reconnect policy (exponential backoff with
//! jitter, forever), every command bounded by `broker.command_timeout_ms` so a hung
//! Redis never freezes a node. On a Redis Cluster there are also a command and a
//! subscriber client per primary ([`shards`]), so that a shard that is down fails
//! only what lives on it; the broker routes through them ([`Link::commands_for`],
//! [`Link::subscriber_for`]) and hears all of them as one stream ([`pubsub`]).
//! [`Link::is_up`] says whether Redis answered lately ([`health`]).
//!
//! Lifetimes: [`Link::start`] spawns the clients' connection tasks and the health
//! task; cancelling the token it was given stops the health task, which quits every
//! client (ending their connection and forwarding tasks).

mod health;
pub mod pubsub;
pub mod shards;

use std::sync::Arc;
use std::time::Duration;

use fred::clients::{Client, SubscriberClient};
use fred::interfaces::{ClientLike, EventInterface};
use fred::types::config::{Config, ReconnectPolicy, ServerConfig};
use fred::types::Builder;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::keys::Keys;
use pubsub::{Event, Events};
use shards::Shards;

/// How often the health task pings Redis.
const HEALTH_EVERY: Duration = Duration::from_millis(500);

/// Pub/sub messages (and connection events) buffered for a slow reader.
const PUBSUB_BUFFER: usize = 4096;

/// Reconnect backoff: from this …
const RECONNECT_MIN_MS: u32 = 100;
/// … doubling up to this (plus fred's jitter).
const RECONNECT_MAX_MS: u32 = 5_000;

/// Where Redis is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topology {
    /// One Redis (`redis://host:port[/db]`).
    Single(String),
    /// A Redis Cluster, by one or more seed URLs.
    Cluster(Vec<String>),
}

/// What a [`Link`] needs to know.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    /// Where Redis is.
    pub topology: Topology,
    /// Every command's timeout.
    pub command_timeout: Duration,
    /// The key prefix.
    pub prefix: String,
}

/// Why a link could not be made (a configuration error: reaching Redis is retried
/// forever and never an error here).
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A URL fred does not accept.
    #[error("broker.url {url:?}: {source}")]
    Url {
        url: String,
        #[source]
        source: fred::error::Error,
    },
    /// The client could not be built from the configuration.
    #[error("redis client: {0}")]
    Client(#[source] fred::error::Error),
}

/// A node's connections to Redis.
#[derive(Debug)]
pub struct Link {
    /// On a Redis Cluster, fred's clustered client (the registry's): it waits for
    /// every primary, so a dead shard stalls it (see [`shards`]).
    commands: Client,
    subscriber: SubscriberClient,
    keys: Keys,
    /// The primaries' own clients, on a Redis Cluster.
    shards: Option<Shards>,
    /// The shards' pub/sub, merged (a Redis Cluster only).
    events: broadcast::Sender<Event>,
    up: watch::Sender<bool>,
}

impl Link {
    /// Builds the clients; nothing connects until [`Link::start`].
    pub fn new(cfg: &LinkConfig) -> Result<Arc<Link>, LinkError> {
        let config = fred_config(&cfg.topology)?;
        let mut builder = Builder::from_config(config.clone());
        tune(&mut builder, cfg.command_timeout);
        let commands = builder.build().map_err(LinkError::Client)?;
        let subscriber = builder
            .build_subscriber_client()
            .map_err(LinkError::Client)?;
        let (events, _) = broadcast::channel(PUBSUB_BUFFER);
        let shards = match cfg.topology {
            Topology::Single(_) => None,
            Topology::Cluster(_) => Some(Shards::new(
                config.clone(),
                shards::seeds(&config),
                tune,
                cfg.command_timeout,
                events.clone(),
            )?),
        };
        Ok(Arc::new(Link {
            commands,
            subscriber,
            keys: Keys::new(&cfg.prefix),
            shards,
            events,
            up: watch::Sender::new(false),
        }))
    }

    /// Connects both clients in the background (retrying with backoff for as long
    /// as it takes) and starts the health task. Everything stops with `stop`.
    pub fn start(self: &Arc<Self>, stop: CancellationToken) -> Vec<JoinHandle<()>> {
        if let Some(shards) = &self.shards {
            shards.connect_all();
        }
        vec![
            drive(self.commands.connect()),
            drive(self.subscriber.connect()),
            tokio::spawn(self.subscriber.manage_subscriptions().map_or_log()),
            tokio::spawn(health::run(self.clone(), stop)),
        ]
    }

    /// Whether Redis answered the last health ping and no connection error came
    /// since; on a Redis Cluster, whether most primaries answered that they serve (see
    /// [`health`]).
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Follows [`Link::is_up`]: a receiver that sees every change.
    pub fn watch_up(&self) -> watch::Receiver<bool> {
        self.up.subscribe()
    }

    /// The client for commands and scripts. On a Redis Cluster this is fred's
    /// clustered client, which stalls while any primary is down: prefer
    /// [`Link::commands_for`].
    pub fn commands(&self) -> &Client {
        &self.commands
    }

    /// The client for commands on `key` (and keys with its hash tag): on a Redis
    /// Cluster the client of the primary that owns its slot, so a dead shard fails
    /// only its own keys (fred's clustered client until the slot map is known).
    pub fn commands_for(&self, key: &str) -> Client {
        self.shards
            .as_ref()
            .and_then(|s| s.owner(key))
            .map_or_else(|| self.commands.clone(), |s| s.commands)
    }

    /// The client for `channel`'s keys (they share its hash tag).
    pub fn channel_commands(&self, channel: &str) -> Client {
        match &self.shards {
            None => self.commands.clone(),
            Some(_) => self.commands_for(&self.keys.channel_key(channel, "meta")),
        }
    }

    /// Every shard's subscriber (a Redis Cluster; none on one Redis).
    pub fn shard_subscribers(&self) -> Vec<SubscriberClient> {
        self.shards.as_ref().map_or_else(Vec::new, |s| {
            s.all().into_iter().map(|s| s.subscriber).collect()
        })
    }

    /// The subscriber for the pub/sub channel `name`: on a Redis Cluster the one of
    /// the primary that owns its slot (SSUBSCRIBE goes there); `None` before the
    /// slot map is known.
    pub fn subscriber_for(&self, name: &str) -> Option<SubscriberClient> {
        match &self.shards {
            None => Some(self.subscriber.clone()),
            Some(s) => s.owner(name).map(|s| s.subscriber),
        }
    }

    /// A subscriber connection of its own for the pub/sub channel `name` (not
    /// connected yet), and the primary it is to: on one Redis a new connection like
    /// the link's subscriber (no primary); on a Redis Cluster a plain connection to
    /// the primary that owns `name`'s slot (`None` before the slot map is known), so
    /// that a dead shard elsewhere does not stall it.
    pub fn own_subscriber_for(&self, name: &str) -> Option<(SubscriberClient, Option<String>)> {
        match &self.shards {
            None => Some((self.subscriber.clone_new(), None)),
            Some(s) => s
                .own_subscriber(name)
                .map(|(sub, server)| (sub, Some(server.to_string()))),
        }
    }

    /// On a Redis Cluster, the primary that owns `name`'s slot now (`None` on one
    /// Redis, or before the slot map is known).
    pub fn owner_of(&self, name: &str) -> Option<String> {
        self.shards
            .as_ref()
            .and_then(|s| s.owner_server(name))
            .map(|s| s.to_string())
    }

    /// The node's pub/sub messages, from every shard (see [`pubsub`]).
    pub fn events(&self) -> Events {
        match &self.shards {
            None => Events::Single {
                sub: self.subscriber.clone(),
                messages: self.subscriber.message_rx(),
                reconnects: self.subscriber.reconnect_rx(),
            },
            Some(_) => Events::Merged(self.events.subscribe()),
        }
    }

    /// Key names.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Whether this is a Redis Cluster (sharded pub/sub) rather than one Redis.
    pub fn is_cluster(&self) -> bool {
        self.shards.is_some()
    }
}

/// fred's configuration for a topology.
fn fred_config(topology: &Topology) -> Result<Config, LinkError> {
    let parse = |url: &str, f: fn(&str) -> Result<Config, fred::error::Error>| {
        f(url).map_err(|source| LinkError::Url {
            url: url.to_owned(),
            source,
        })
    };
    match topology {
        Topology::Single(url) => parse(url, Config::from_url_centralized),
        Topology::Cluster(seeds) => {
            let first = seeds.first().map(String::as_str).unwrap_or_default();
            let mut config = parse(first, Config::from_url_clustered)?;
            let mut hosts = Vec::new();
            for url in seeds {
                if let ServerConfig::Clustered { hosts: h, .. } =
                    parse(url, Config::from_url_clustered)?.server
                {
                    hosts.extend(h);
                }
            }
            if let ServerConfig::Clustered { hosts: h, .. } = &mut config.server {
                *h = hosts;
            }
            Ok(config)
        }
    }
}

/// The link's settings on a client builder: timeouts, buffer, reconnect policy.
fn tune(builder: &mut Builder, command_timeout: Duration) {
    builder
        .with_config(|c| c.fail_fast = false)
        .with_performance_config(|p| {
            p.default_command_timeout = command_timeout;
            // Pub/sub messages wait here for the broker's delivery task; one that
            // falls further behind re-reads what it missed from the streams.
            p.broadcast_channel_capacity = PUBSUB_BUFFER;
        })
        .with_connection_config(|c| {
            c.connection_timeout = command_timeout;
            c.internal_command_timeout = command_timeout;
            // A command is sent once more after a reconnect, then fails (503).
            c.max_command_attempts = 2;
        })
        .set_policy(ReconnectPolicy::new_exponential(
            0,
            RECONNECT_MIN_MS,
            RECONNECT_MAX_MS,
            2,
        ));
}

/// Logs how a client's connection task ended instead of dropping its result.
fn drive(h: JoinHandle<Result<(), fred::error::Error>>) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Ok(Err(e)) = h.await {
            tracing::warn!(error = %e, "redis connection task ended");
        }
    })
}

/// Logs how a spawned fred task ended instead of dropping its result.
trait MapOrLog {
    fn map_or_log(self) -> impl std::future::Future<Output = ()> + Send;
}

impl MapOrLog for JoinHandle<()> {
    async fn map_or_log(self) {
        if let Err(e) = self.await {
            tracing::warn!(error = %e, "redis subscription task ended");
        }
    }
}
