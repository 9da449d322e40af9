//! The cluster's client registry on Redis (SPEC sections 2, 3 and 10): the
//! per-client limit and duplicate policy across nodes, cluster-wide
//! `client.online`/`client.offline`, node liveness and the removal of dead nodes,
//! a control channel per node for closes and listings, and the API's cluster views.
//!
//! - [`scripts`]: the Lua scripts on a client's keys (admit, commit, release, expire).
//! - [`flow`]: one connection's way through them (admit, commit, release, grace).
//! - [`control`]: the per-node control channel (requests, replies, their timeout).
//! - [`liveness`]: the heartbeat, the reaper of dead nodes, re-registration.
//! - [`outage`]: what a node owes after Redis was unreachable (releases run again,
//!   ghosts after a data loss, announcements of clients admitted during it).
//! - [`turns`]: one client's transitions at a time on a node (events in order).
//! - [`views`]: what the API asks (stats, clients, connections, disconnect).
//!
//! Lifetimes: [`ClusterRegistry::new`] puts the node's [`Registry`] in cluster mode
//! (a [`ClusterSeam`] holding only a weak reference back, so no cycle);
//! [`ClusterRegistry::start`] spawns the liveness and control tasks, and
//! [`ClusterRegistry::stop`] ends the graces (firing their offlines) and waits for
//! every task it spawned. No lock is held across an await.

mod control;
mod flow;
mod liveness;
mod outage;
mod scripts;
mod turns;
mod views;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tether_core::{ClusterSeam, Registry};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::link::Link;

pub use turns::ClientTurn;
pub use views::{ClientRow, ClusterStats, ConnPage};

/// What the cluster registry needs to know.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// `clients.max_connections_per_client`.
    pub max_connections_per_client: usize,
    /// `clients.on_client_limit = "replace_oldest"`.
    pub replace_oldest: bool,
    /// `clients.offline_grace_ms`.
    pub offline_grace: Duration,
    /// `broker.node_ttl_ms`.
    pub node_ttl: Duration,
    /// `broker.on_unavailable = "admit_local"`.
    pub admit_local: bool,
    /// How long a control request waits for its reply.
    pub reply_timeout: Duration,
}

/// What the reaper calls once it has removed a dead node's connections: the broker
/// forgets the node's presence (`RedisBroker::forget_node`, wired by the server).
pub trait ForgetNode: Send + Sync + std::fmt::Debug {
    /// Forget everything `node_id` held.
    fn forget_node(&self, node_id: String) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// Why a registry operation on Redis failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Redis answered with an error, or not in time.
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    /// Redis is unreachable now (nothing was tried).
    #[error("redis is unreachable")]
    Unreachable,
    /// A control request got no reply in time.
    #[error("node {0} did not answer in time")]
    NoReply(String),
    /// A `page` token that no page of `/api/connections` gave.
    #[error("page is not a page token from next_page")]
    BadPage,
    /// A control message could not be encoded.
    #[error("control message: {0}")]
    Encode(#[from] serde_json::Error),
}

/// The cluster registry of one node.
#[derive(Debug)]
pub struct ClusterRegistry {
    link: Arc<Link>,
    registry: Registry,
    node_id: String,
    settings: ClusterSettings,
    control: control::Pending,
    forget: OnceLock<Arc<dyn ForgetNode>>,
    /// Long-lived tasks (liveness, control), grace timers, evictions.
    tasks: TaskTracker,
    /// Releases in flight (waited for at stop, before the graces end).
    releases: TaskTracker,
    stop: CancellationToken,
    /// Since when Redis has been reachable without a break (`None` while it is not).
    connected_since: Mutex<Option<Instant>>,
    /// Something could not reach Redis: re-register at the next chance.
    dirty: AtomicBool,
    /// Re-registered since the link last changed: until then the node admits as
    /// if Redis were unreachable (it may not know yet that Redis lost its data).
    synced: AtomicBool,
    /// The last heartbeat reached this node's own keys (on a Redis Cluster, the
    /// shard holding `{n:<id>}`, which every admission writes first).
    record_ok: AtomicBool,
    /// Whether a heartbeat has been written yet.
    beaten: AtomicBool,
    /// Per-client turns: a client's transitions are decided one at a time.
    turns: turns::Turns,
    /// Running offline graces: client id → token.
    lingers: Mutex<HashMap<Arc<str>, String>>,
    /// Releases Redis has not answered yet: conn id → record.
    unsettled: Mutex<HashMap<String, outage::Unsettled>>,
    /// The connection being registered again now: its release waits for it.
    registering: Mutex<Option<String>>,
    /// Wakes the releases waiting for `registering`.
    registered: tokio::sync::Notify,
    /// Connections committed while Redis was unreachable, not registered yet.
    local_only: Mutex<HashSet<String>>,
    /// What re-registration left owed (ghosts, announcements).
    owed: Mutex<outage::Owed>,
    /// The registry epoch Redis had when this node last looked.
    epoch: Mutex<Option<String>>,
    /// The last `/api/stats` cluster figures and when they were read.
    stats: Mutex<Option<(Instant, ClusterStats)>>,
}

/// The registry's seam: releases go to the cluster registry's tasks.
#[derive(Debug)]
struct Seam(Weak<ClusterRegistry>);

impl ClusterSeam for Seam {
    fn released(&self, client_id: &Arc<str>, conn_id: &str, committed: bool) {
        if let Some(cluster) = self.0.upgrade() {
            cluster.begin_release(client_id.clone(), conn_id.to_owned(), committed);
        }
    }
}

impl ClusterRegistry {
    /// Puts `registry` in cluster mode on `link`. Nothing runs until [`Self::start`].
    pub fn new(link: Arc<Link>, registry: Registry, settings: ClusterSettings) -> Arc<Self> {
        let node_id = registry.node_id().to_owned();
        let cluster = Arc::new(ClusterRegistry {
            link,
            registry: registry.clone(),
            node_id,
            settings,
            control: control::Pending::default(),
            forget: OnceLock::new(),
            tasks: TaskTracker::new(),
            releases: TaskTracker::new(),
            stop: CancellationToken::new(),
            connected_since: Mutex::new(None),
            dirty: AtomicBool::new(false),
            synced: AtomicBool::new(false),
            record_ok: AtomicBool::new(true),
            beaten: AtomicBool::new(false),
            turns: turns::Turns::default(),
            lingers: Mutex::new(HashMap::new()),
            unsettled: Mutex::new(HashMap::new()),
            registering: Mutex::new(None),
            registered: tokio::sync::Notify::new(),
            local_only: Mutex::new(HashSet::new()),
            owed: Mutex::new(outage::Owed::default()),
            epoch: Mutex::new(None),
            stats: Mutex::new(None),
        });
        registry.set_cluster(Arc::new(Seam(Arc::downgrade(&cluster))));
        cluster
    }

    /// Sets what the reaper calls for a dead node (once).
    pub fn on_node_dead(&self, forget: Arc<dyn ForgetNode>) {
        let _ = self.forget.set(forget);
    }

    /// Spawns the liveness task (heartbeat, reaper, re-registration) and the control
    /// channel's listener.
    pub fn start(self: &Arc<Self>) {
        self.tasks.spawn(liveness::run(self.clone()));
        self.tasks.spawn(control::listen(self.clone()));
    }

    /// At shutdown, once the connections are drained: waits for their releases,
    /// settles what is owed, and ends the running offline graces now, so that every
    /// offline fires before the webhooks are flushed (none is lost at shutdown).
    /// Call it while the link is up; calling it again does nothing more.
    pub async fn settle(self: &Arc<Self>) {
        self.releases.close();
        self.releases.wait().await;
        if self.link.is_up() {
            if let Err(e) = self.settle_unsettled().await {
                tracing::warn!(error = %e, "stopping: releases left unsettled");
            }
            self.pay_owed(true).await;
        }
        let lingering: Vec<(Arc<str>, String)> = self.lingers.lock().drain().collect();
        for (client, token) in lingering {
            self.expire(&client, &token).await;
        }
    }

    /// [`Self::settle`], then leaves the cluster, stops the tasks and waits for them.
    pub async fn stop(self: &Arc<Self>) {
        self.settle().await;
        self.leave().await;
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Whether the registry is reachable now: Redis is, this node has re-registered
    /// since it last became so, and its last heartbeat reached its own keys.
    pub fn is_up(&self) -> bool {
        self.link.is_up()
            && self.synced.load(Ordering::Acquire)
            && self.record_ok.load(Ordering::Acquire)
    }

    /// Whether handshakes are admitted while Redis is unreachable.
    pub fn admits_local(&self) -> bool {
        self.settings.admit_local
    }

    /// The client for `key` and the keys sharing its hash tag: on a Redis Cluster
    /// the one of the primary that owns it, so a dead shard fails only its keys.
    fn on(&self, key: &str) -> fred::clients::Client {
        self.link.commands_for(key)
    }

    /// The client for `client_id`'s keys (`{c:<id>}`).
    fn on_client(&self, client_id: &str) -> fred::clients::Client {
        self.on(&self.link.keys().client_key(client_id, "conns"))
    }

    /// This node's heartbeat key.
    fn alive_key(&self) -> String {
        self.link.keys().node_key(&self.node_id, "alive")
    }

    /// The client for this node's keys (`{n:<id>}`).
    fn on_node(&self) -> fred::clients::Client {
        self.on(&self.link.keys().node_key(&self.node_id, "conns"))
    }

    /// `Err(Unreachable)` while Redis is unreachable: the API answers at once.
    fn reachable(&self) -> Result<(), RegistryError> {
        if self.link.is_up() {
            Ok(())
        } else {
            Err(RegistryError::Unreachable)
        }
    }

    /// Whether this node has been connected to Redis without a break for `node_ttl`
    /// (only then may it declare other nodes dead).
    fn connected_for_ttl(&self) -> bool {
        self.connected_since
            .lock()
            .is_some_and(|t| t.elapsed() >= self.settings.node_ttl)
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
