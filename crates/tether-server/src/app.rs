//! `App`: the state of one server, built once by `Server::start`. It is the
//! composition root: its parts come from leaf modules (registry and broker from
//! core; pending sockets, tombstones, sessions, auth), and each kind of handler is
//! handed only its view of them ([`Edge`], [`Ctx`], [`Health`], the API's `Api`).

use std::sync::Arc;
use std::time::Duration;

use tether_core::{
    Broker, ConnIdGen, Drain, EventBus, Hub, HubSettings, IpLimits, MemoryBroker, Metrics,
    Registry, RegistrySettings,
};
use tether_redis::{ClusterRegistry, Link, RedisBroker};
use tokio_util::task::TaskTracker;

use crate::admission::Gate;
use crate::auth::Auth;
use crate::config::Config;
use crate::cors::Origins;
use crate::driver::Ctx;
use crate::edge::Edge;
use crate::pending::PendingCounter;
use crate::sessions::Sessions;
use crate::tombstones::Tombstones;
use crate::webhooks::Webhooks;

/// State shared by the server's own tasks (accept loops, drain, sweeps), and the
/// root the handlers' views are cut from: [`Edge`] for the client listener's
/// handlers, [`Ctx`] for every connection's driver, `api::Api` for the API's.
#[derive(Debug)]
pub struct App {
    /// The configuration it was started with.
    pub cfg: Config,
    /// Clients and connections.
    pub registry: Registry,
    /// Where publishes get their position and history lives.
    pub broker: Arc<dyn Broker>,
    /// Shutdown state.
    pub drain: Drain,
    /// Metrics.
    pub metrics: Metrics,
    /// Per-socket and per-connection tasks.
    pub tasks: TaskTracker,
    /// Sockets accepted and not yet admitted.
    pub pending: PendingCounter,
    /// The effective connection ceiling.
    pub max_connections: usize,
    /// What every connection's driver uses of the server (and nothing else).
    pub(crate) driving: Arc<Ctx>,
    /// What the client listener's handlers use.
    pub(crate) edge: Arc<Edge>,
    /// Dashboard sessions.
    pub admin_sessions: Arc<Sessions>,
    /// Cluster mode's connections to Redis (`None` with the in-memory broker).
    pub link: Option<Arc<Link>>,
    /// Cluster mode's client registry (`None` with the in-memory broker).
    pub cluster: Option<Arc<ClusterRegistry>>,
    /// The webhook queue and counters (the sender task is the run task's).
    pub webhooks: Arc<Webhooks>,
    /// Cluster mode's broker (the same as `broker`), for what only it does.
    pub redis_broker: Option<RedisBroker>,
}

impl App {
    pub(crate) fn new(cfg: Config, nofile: u64, auth: Auth, link: Option<Arc<Link>>) -> Arc<App> {
        let max_connections = cfg.max_connections(nofile);
        let ids = ConnIdGen::new(&cfg.node_id);
        let metrics = Metrics::new();
        let webhooks = Webhooks::new(&cfg.webhooks, metrics.webhooks().clone());
        let mut events = EventBus::new(ids.node_id().clone());
        if let Some(sink) = webhooks.sink() {
            events = events.with_sink(sink);
        }
        let node_id = ids.node_id().clone();
        let hub = Hub::new(hub_settings(&cfg), events.clone(), metrics.clone());
        let registry = Registry::new(
            registry_settings(&cfg, max_connections),
            ids,
            events,
            metrics.clone(),
            hub.clone(),
        );
        let redis_broker = link
            .as_ref()
            .map(|l| RedisBroker::new(l.clone(), hub.clone(), &node_id));
        let broker: Arc<dyn Broker> = match &redis_broker {
            Some(b) => Arc::new(b.clone()),
            None => Arc::new(MemoryBroker::new(hub)),
        };
        let cluster = link
            .as_ref()
            .map(|l| crate::cluster::registry(&cfg, l, &registry, redis_broker.as_ref()));
        let drain = Drain::new();
        let auth = Arc::new(auth);
        let tombstones = Arc::new(Tombstones::new(Duration::from_millis(
            cfg.clients.tombstone_ms,
        )));
        let driving = Arc::new(Ctx::new(
            &cfg,
            broker.clone(),
            drain.hard_stop().clone(),
            auth.clone(),
            tombstones,
            node_id,
        ));
        let gate = Gate {
            drain: drain.clone(),
            ip_limits: IpLimits::new(
                cfg.limits.max_connections_per_ip,
                cfg.limits.handshakes_per_ip_per_sec,
            ),
            origins: Origins::new(cfg.limits.allowed_origins.clone()),
            auth,
            registry: registry.clone(),
            cluster: cluster.clone(),
            metrics: metrics.clone(),
            trusted_proxies: cfg.server.trusted_proxies.clone(),
        };
        let tasks = TaskTracker::new();
        let edge = Arc::new(Edge::new(&cfg, gate, driving.clone(), tasks.clone()));
        Arc::new(App {
            broker,
            registry,
            drain,
            pending: PendingCounter::new(metrics.clone()),
            metrics,
            tasks,
            max_connections,
            admin_sessions: Arc::default(),
            webhooks,
            driving,
            edge,
            link,
            cluster,
            redis_broker,
            cfg,
        })
    }

    /// The per-address tables (the tests' leak check reads them).
    pub fn ip_limits(&self) -> &tether_core::IpLimits {
        &self.edge.gate.ip_limits
    }

    /// What `/healthz` and `/readyz` use.
    pub(crate) fn health(&self) -> Arc<Health> {
        Arc::new(Health {
            drain: self.drain.clone(),
            registry: self.registry.clone(),
            broker: self.broker.clone(),
            cluster: self.cluster.clone(),
        })
    }

    /// Whether a handshake would be admitted now (`/readyz`).
    pub fn ready(&self) -> bool {
        readiness(
            &self.drain,
            &self.registry,
            &*self.broker,
            self.cluster.as_deref(),
        )
        .is_ok()
    }
}

/// What `/healthz` and `/readyz` use of the server.
#[derive(Debug)]
pub(crate) struct Health {
    pub(crate) drain: Drain,
    pub(crate) registry: Registry,
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) cluster: Option<Arc<ClusterRegistry>>,
}

impl Health {
    /// `Ok` when a handshake would be admitted now, else why not.
    pub(crate) fn ready(&self) -> Result<(), &'static str> {
        readiness(
            &self.drain,
            &self.registry,
            &*self.broker,
            self.cluster.as_deref(),
        )
    }
}

/// Whether a handshake would be admitted now: not draining, not full, broker up
/// (in cluster mode: Redis reachable, unless `on_unavailable = "admit_local"`).
fn readiness(
    drain: &Drain,
    registry: &Registry,
    broker: &dyn Broker,
    cluster: Option<&ClusterRegistry>,
) -> Result<(), &'static str> {
    // Cluster mode under `on_unavailable = "admit_local"` stays ready without Redis.
    let redis_down = !broker.is_up() || cluster.is_some_and(|c| !c.is_up());
    let admit_local = cluster.is_some_and(ClusterRegistry::admits_local);
    if drain.phase() != tether_core::Phase::Running {
        Err("draining")
    } else if redis_down && !admit_local {
        Err("broker_unavailable")
    } else if registry.is_full() {
        Err("server_full")
    } else {
        Ok(())
    }
}

fn hub_settings(cfg: &Config) -> HubSettings {
    HubSettings {
        history_size: cfg.history.size.get() as usize,
        history_ttl: Duration::from_millis(cfg.history.ttl_ms.get()),
        max_channels: cfg.limits.max_channels.get() as usize,
        max_channels_per_connection: cfg.limits.max_channels_per_connection.get() as usize,
    }
}

fn registry_settings(cfg: &Config, max_connections: usize) -> RegistrySettings {
    RegistrySettings {
        max_connections,
        max_connections_per_client: cfg.clients.max_connections_per_client.get() as usize,
        on_client_limit: cfg.clients.on_client_limit,
        offline_grace: Duration::from_millis(cfg.clients.offline_grace_ms),
        max_queue_messages: cfg.delivery.max_queue_messages.get() as usize,
        max_queue_bytes: cfg.delivery.max_queue_bytes.get() as usize,
    }
}
