//! `App`: the state every task of one server shares, built once by
//! `Server::start` and handed out as an `Arc`. Its parts come from leaf modules
//! (registry and broker from core; pending sockets, tombstones, sessions, auth), so
//! nothing it holds depends on the handlers that use it.

use std::sync::Arc;
use std::time::Duration;

use tether_core::{
    Broker, ConnIdGen, Drain, EventBus, Hub, HubSettings, IpLimits, MemoryBroker, Metrics,
    Registry, RegistrySettings,
};
use tokio_util::task::TaskTracker;

use crate::auth::Auth;
use crate::config::Config;
use crate::driver::Ctx;
use crate::pending::PendingCounter;
use crate::sessions::Sessions;
use crate::tombstones::Tombstones;

/// State shared by every task of one server.
#[derive(Debug)]
pub struct App {
    /// The configuration it was started with.
    pub cfg: Config,
    /// Clients and connections.
    pub registry: Registry,
    /// Where publishes get their position and history lives.
    pub broker: Arc<dyn Broker>,
    /// Per-address limits.
    pub ip_limits: IpLimits,
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
    /// SSE connections closed for good, by conn id.
    pub tombstones: Arc<Tombstones>,
    /// Token verification.
    pub auth: Arc<Auth>,
    /// What every connection's driver uses of the server (and nothing else).
    pub(crate) driving: Arc<Ctx>,
    /// Dashboard sessions.
    pub admin_sessions: Sessions,
    /// HTTP client for SSE proxy upstreams (`http://` and `https://`).
    pub http: reqwest::Client,
    /// TLS client config for `wss://` proxy upstreams (loaded only when a route needs it).
    pub upstream_tls: Option<Arc<rustls::ClientConfig>>,
}

impl App {
    pub(crate) fn new(cfg: Config, nofile: u64, auth: Auth) -> Arc<App> {
        let max_connections = cfg.max_connections(nofile);
        let ids = ConnIdGen::new(&cfg.node_id);
        let metrics = Metrics::new();
        let events = EventBus::new(ids.node_id().clone());
        let node_id = ids.node_id().clone();
        let hub = Hub::new(
            HubSettings {
                history_size: cfg.history.size.get() as usize,
                history_ttl: Duration::from_millis(cfg.history.ttl_ms.get()),
                max_channels: cfg.limits.max_channels.get() as usize,
                max_channels_per_connection: cfg.limits.max_channels_per_connection.get() as usize,
            },
            events.clone(),
            metrics.clone(),
        );
        let registry = Registry::new(
            RegistrySettings {
                max_connections,
                max_connections_per_client: cfg.clients.max_connections_per_client.get() as usize,
                on_client_limit: cfg.clients.on_client_limit,
                offline_grace: Duration::from_millis(cfg.clients.offline_grace_ms),
                max_queue_messages: cfg.delivery.max_queue_messages.get() as usize,
                max_queue_bytes: cfg.delivery.max_queue_bytes.get() as usize,
            },
            ids,
            events,
            metrics.clone(),
            hub.clone(),
        );
        let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new(hub));
        let drain = Drain::new();
        let auth = Arc::new(auth);
        let tombstones = Arc::new(Tombstones::new(Duration::from_millis(
            cfg.clients.tombstone_ms,
        )));
        let driving = Ctx::new(
            &cfg,
            broker.clone(),
            drain.hard_stop().clone(),
            auth.clone(),
            tombstones.clone(),
            node_id,
        );
        Arc::new(App {
            broker: broker.clone(),
            ip_limits: IpLimits::new(
                cfg.limits.max_connections_per_ip,
                cfg.limits.handshakes_per_ip_per_sec,
            ),
            registry,
            drain,
            pending: PendingCounter::new(metrics.clone()),
            metrics,
            tasks: TaskTracker::new(),
            max_connections,
            auth,
            admin_sessions: Sessions::default(),
            http: reqwest::Client::builder()
                .use_rustls_tls()
                .build()
                .unwrap_or_default(),
            upstream_tls: cfg
                .proxy
                .routes
                .iter()
                .any(|r| r.upstream.starts_with("wss://"))
                .then(crate::upstream::upstream_client_config)
                .flatten(),
            tombstones,
            driving: Arc::new(driving),
            cfg,
        })
    }

    /// Whether a handshake would be admitted now (`/readyz`).
    pub fn ready(&self) -> bool {
        self.drain.phase() == tether_core::Phase::Running
            && !self.registry.is_full()
            && self.broker.is_up()
    }
}
