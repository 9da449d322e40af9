//! A node's connections to Redis: one command client and one subscriber client,
//! each driven by fred's own task with a reconnect policy (exponential backoff with
//! jitter, forever), every command bounded by `broker.command_timeout_ms` so a hung
//! Redis never freezes a node. [`Link::is_up`] says whether Redis answered lately:
//! a health task pings it and follows the clients' connection events.
//!
//! Lifetimes: [`Link::start`] spawns the clients' connection tasks and the health
//! task; cancelling the token it was given stops the health task and quits both
//! clients (which ends their connection tasks).

use std::sync::Arc;
use std::time::Duration;

use fred::clients::{Client, SubscriberClient};
use fred::interfaces::{ClientLike, EventInterface};
use fred::types::config::{Config, ReconnectPolicy, ServerConfig};
use fred::types::Builder;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::keys::Keys;

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
    commands: Client,
    subscriber: SubscriberClient,
    keys: Keys,
    cluster: bool,
    up: watch::Sender<bool>,
}

impl Link {
    /// Builds the clients; nothing connects until [`Link::start`].
    pub fn new(cfg: &LinkConfig) -> Result<Arc<Link>, LinkError> {
        let config = fred_config(&cfg.topology)?;
        let mut builder = Builder::from_config(config);
        builder
            .with_config(|c| c.fail_fast = false)
            .with_performance_config(|p| {
                p.default_command_timeout = cfg.command_timeout;
                // Pub/sub messages wait here for the broker's delivery task; one that
                // falls further behind re-reads what it missed from the streams.
                p.broadcast_channel_capacity = PUBSUB_BUFFER;
            })
            .with_connection_config(|c| {
                c.connection_timeout = cfg.command_timeout;
                c.internal_command_timeout = cfg.command_timeout;
                // A command is sent once more after a reconnect, then fails (503).
                c.max_command_attempts = 2;
            })
            .set_policy(ReconnectPolicy::new_exponential(
                0,
                RECONNECT_MIN_MS,
                RECONNECT_MAX_MS,
                2,
            ));
        let commands = builder.build().map_err(LinkError::Client)?;
        let subscriber = builder
            .build_subscriber_client()
            .map_err(LinkError::Client)?;
        Ok(Arc::new(Link {
            commands,
            subscriber,
            keys: Keys::new(&cfg.prefix),
            cluster: matches!(cfg.topology, Topology::Cluster(_)),
            up: watch::Sender::new(false),
        }))
    }

    /// Connects both clients in the background (retrying with backoff for as long
    /// as it takes) and starts the health task. Everything stops with `stop`.
    pub fn start(self: &Arc<Self>, stop: CancellationToken) -> Vec<JoinHandle<()>> {
        let drive = |h: JoinHandle<Result<(), fred::error::Error>>| {
            tokio::spawn(async move {
                if let Ok(Err(e)) = h.await {
                    tracing::warn!(error = %e, "redis connection task ended");
                }
            })
        };
        vec![
            drive(self.commands.connect()),
            drive(self.subscriber.connect()),
            tokio::spawn(self.subscriber.manage_subscriptions().map_or_log()),
            tokio::spawn(health(self.clone(), stop)),
        ]
    }

    /// Whether Redis answered the last health ping and no connection error came since.
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Follows [`Link::is_up`]: a receiver that sees every change.
    pub fn watch_up(&self) -> watch::Receiver<bool> {
        self.up.subscribe()
    }

    /// The client for commands and scripts.
    pub fn commands(&self) -> &Client {
        &self.commands
    }

    /// The client for (sharded) pub/sub; it re-subscribes by itself after a reconnect.
    pub fn subscriber(&self) -> &SubscriberClient {
        &self.subscriber
    }

    /// Key names.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Whether this is a Redis Cluster (sharded pub/sub) rather than one Redis.
    pub fn is_cluster(&self) -> bool {
        self.cluster
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

/// Keeps [`Link::is_up`] true: a connection error or a failed ping makes it false at
/// once; a ping answered makes it true.
async fn health(link: Arc<Link>, stop: CancellationToken) {
    let mut errors = link.commands.error_rx();
    let mut sub_errors = link.subscriber.error_rx();
    let mut tick = tokio::time::interval(HEALTH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Ok(_) = errors.recv() => set_up(&link, false),
            Ok(_) = sub_errors.recv() => set_up(&link, false),
            _ = tick.tick() => {
                let ok = link.commands.ping::<()>(None).await.is_ok()
                    && link.subscriber.is_connected();
                set_up(&link, ok);
            }
        }
    }
    let _ = link.subscriber.quit().await;
    let _ = link.commands.quit().await;
}

fn set_up(link: &Link, up: bool) {
    link.up.send_if_modified(|was| {
        let changed = *was != up;
        if changed {
            if up {
                tracing::info!("redis reachable");
            } else {
                tracing::warn!("redis unreachable");
            }
        }
        *was = up;
        changed
    });
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
