//! Tether's HTTP edge: the accept loop, the WebSocket and SSE transports, the
//! server API, metrics, sweeps and drain, on top of `tether-core`.
//!
//! Ownership: [`Server::start`] builds one [`App`] (shared state behind an `Arc`),
//! binds both listeners and spawns their accept loops, the sweeps and the drain
//! coordinator. Every per-socket task and every connection task is spawned on the
//! app's [`TaskTracker`] (`tasks` in `/api/stats`), so drain can wait for them.
//! [`Running::begin_drain`] starts the shutdown; [`Running::wait`] resolves once
//! every connection is closed and the listeners are gone.
#![warn(missing_docs)]

mod admin;
pub mod admission;
mod api;
mod api_listener;
pub mod auth;
mod client_assets;
mod commands;
pub mod config;
mod conn_io;
mod drain;
mod driver;
mod net;
mod proxy;
mod proxy_sse;
mod refusal;
pub mod sse;
mod sweeps;
pub mod tls;
mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tether_core::{
    Broker, ConnIdGen, Drain, EventBus, Hub, HubSettings, IpLimits, MemoryBroker, Metrics,
    Registry, RegistrySettings,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

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
    pub pending: net::PendingCounter,
    /// The effective connection ceiling.
    pub max_connections: usize,
    /// SSE connections closed for good, by conn id.
    pub tombstones: sse::Tombstones,
    /// Token verification.
    pub auth: auth::Auth,
    /// Dashboard sessions.
    pub admin_sessions: admin::Sessions,
    /// HTTP client for SSE proxy upstreams (`http://` and `https://`).
    pub http: reqwest::Client,
    /// TLS client config for `wss://` proxy upstreams (loaded only when a route needs it).
    pub upstream_tls: Option<Arc<rustls::ClientConfig>>,
}

impl App {
    fn new(cfg: Config, nofile: u64, auth: auth::Auth) -> Arc<App> {
        let max_connections = cfg.max_connections(nofile);
        let ids = ConnIdGen::new(&cfg.node_id);
        let metrics = Metrics::new();
        let events = EventBus::new(ids.node_id().clone());
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
        Arc::new(App {
            broker: Arc::new(MemoryBroker::new(hub)),
            ip_limits: IpLimits::new(
                cfg.limits.max_connections_per_ip,
                cfg.limits.handshakes_per_ip_per_sec,
            ),
            registry,
            drain: Drain::new(),
            pending: net::PendingCounter::new(metrics.clone()),
            metrics,
            tasks: TaskTracker::new(),
            max_connections,
            auth,
            admin_sessions: admin::Sessions::default(),
            http: reqwest::Client::builder()
                .use_rustls_tls()
                .build()
                .unwrap_or_default(),
            upstream_tls: cfg
                .proxy
                .routes
                .iter()
                .any(|r| r.upstream.starts_with("wss://"))
                .then(tls::upstream_client_config)
                .flatten(),
            tombstones: sse::Tombstones::new(Duration::from_millis(cfg.clients.tombstone_ms)),
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

/// A started server.
#[derive(Debug)]
pub struct Running {
    app: Arc<App>,
    client_addr: SocketAddr,
    api_addr: SocketAddr,
    tls: Option<Arc<tls::Tls>>,
    begin: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The JWT keys could not be loaded.
    #[error(transparent)]
    Auth(#[from] auth::ConfigError),
    /// `[tls]` could not be loaded.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Auth `none` on a non-loopback client listener without `allow_insecure`.
    #[error(
        "auth mode \"none\" lets anyone pick any client id; refusing to listen on non-loopback {0} \
         (set [auth] allow_insecure = true to accept that)"
    )]
    InsecureListener(SocketAddr),
    /// A non-loopback API listener without a key.
    #[error(
        "the server API on non-loopback {0} has no key: set [api] key (the Host rule alone does not \
         stop a client that connects directly)"
    )]
    KeylessApi(SocketAddr),
}

impl Server {
    /// Validates what needs the environment, binds both listeners and spawns
    /// everything. `nofile` is the open-file limit the ceiling derives from.
    pub async fn start(cfg: Config, nofile: u64) -> Result<Running, StartError> {
        let auth = auth::Auth::load(&cfg.auth)?;
        if !auth.is_jwt() && !cfg.auth.allow_insecure && !cfg.listen.ip().is_loopback() {
            return Err(StartError::InsecureListener(cfg.listen));
        }
        let tls = tls::Tls::from_config(&cfg.tls)?;
        // Port 0 means "any free port": two such listeners are two ports, not one.
        if cfg.api.key.is_empty() && !cfg.api.listen.ip().is_loopback() {
            return Err(StartError::KeylessApi(cfg.api.listen));
        }
        let same = cfg.listen == cfg.api.listen && cfg.listen.port() != 0;
        let app = App::new(cfg, nofile, auth);
        let client = net::bind(app.cfg.listen).map_err(|source| StartError::Bind {
            addr: app.cfg.listen,
            source,
        })?;
        let client_addr = client.local_addr().map_err(|source| StartError::Bind {
            addr: app.cfg.listen,
            source,
        })?;
        let api_listener = if same {
            None
        } else {
            let l = net::bind(app.cfg.api.listen).map_err(|source| StartError::Bind {
                addr: app.cfg.api.listen,
                source,
            })?;
            Some(l)
        };
        let api_addr = match &api_listener {
            Some(l) => l.local_addr().map_err(|source| StartError::Bind {
                addr: app.cfg.api.listen,
                source,
            })?,
            None => client_addr,
        };
        tracing::info!(
            %client_addr, %api_addr, node_id = %app.cfg.node_id, max_connections = app.max_connections,
            tls = tls.is_some(), "tether listening"
        );
        let begin = CancellationToken::new();
        let done = tokio::spawn(run(
            app.clone(),
            client,
            api_listener,
            tls.clone(),
            begin.clone(),
        ));
        Ok(Running {
            app,
            client_addr,
            api_addr,
            tls,
            begin,
            done,
        })
    }
}

/// Namespace for [`Server::start`].
#[derive(Debug)]
pub struct Server;

async fn run(
    app: Arc<App>,
    client: TcpListener,
    api: Option<TcpListener>,
    tls: Option<Arc<tls::Tls>>,
    begin: CancellationToken,
) {
    let stop_accepting = CancellationToken::new();
    let api_stop = CancellationToken::new();
    // One listener for both (`[api] listen` equal to `listen`): the client router
    // serves the API's routes too, behind the API's own key and Host checks.
    let shared_api = api
        .is_none()
        .then(|| api::shared(app.clone(), api_stop.clone()));
    let client_router = net::client_router(app.clone(), shared_api);
    let mut background = tokio::task::JoinSet::new();
    background.spawn(net::accept_loop(
        app.clone(),
        client,
        client_router,
        tls.clone(),
        stop_accepting.clone(),
    ));
    if let Some(api) = api {
        let router =
            api::router(app.clone(), api_stop.clone()).merge(net::health_router(app.clone()));
        let stop = api_stop.clone();
        let api_app = app.clone();
        let serve_api = api_listener::serve(api_app, api, router, tls, stop);
        // The API listener gets a thread and a runtime of its own: publishes, health
        // checks and metrics are not queued behind thousands of connection tasks
        // under load (and a publisher is not slowed down by the fan-out it causes).
        let stop_api = api_stop.clone();
        background.spawn(async move {
            // However this task ends (or is dropped with the runtime), the API stops.
            let _stop_api = stop_api.drop_guard();
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name("tether-api".into())
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt.block_on(serve_api),
                        Err(e) => tracing::error!(error = %e, "cannot start the API runtime"),
                    }
                    let _ = done_tx.send(());
                });
            match thread {
                Ok(_) => {
                    let _ = done_rx.await;
                }
                Err(e) => tracing::error!(error = %e, "cannot start the API thread"),
            }
        });
    }
    let sweeps_stop = CancellationToken::new();
    background.spawn(hub_cleanup(app.clone(), sweeps_stop.clone()));
    for rule in app.cfg.sweeps.clone() {
        background.spawn(sweeps::run(app.clone(), rule, sweeps_stop.clone()));
    }
    begin.cancelled().await;
    drain::run(&app).await;
    sweeps_stop.cancel();
    stop_accepting.cancel();
    api_stop.cancel();
    while background.join_next().await.is_some() {}
}

/// Removes channels with neither subscribers nor history, once a second.
async fn hub_cleanup(app: Arc<App>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                app.registry.hub().sweep();
                app.tombstones.prune();
            }
        }
    }
}

impl Running {
    /// The client listener's address.
    pub fn client_addr(&self) -> SocketAddr {
        self.client_addr
    }
    /// The API listener's address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }
    /// The shared state (for in-process tests and the binary's logging).
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }
    /// Starts the shutdown (what SIGTERM does). Idempotent.
    pub fn begin_drain(&self) {
        self.begin.cancel();
    }
    /// Re-reads `[tls] cert_file` and `key_file` (what SIGHUP does): new handshakes
    /// present the new certificate, open connections stay as they are. `Ok(false)`
    /// when TLS is not configured; on an error the current certificate stays.
    pub fn reload_tls(&self) -> Result<bool, tls::TlsError> {
        match &self.tls {
            Some(tls) => tls.reload().map(|()| true),
            None => Ok(false),
        }
    }
    /// Ends every remaining connection at once (a second signal).
    pub fn hard_stop(&self) {
        self.begin.cancel();
        self.app.drain.hard_stop().cancel();
    }
    /// Resolves once the server has drained and stopped.
    pub async fn wait(self) {
        if let Err(e) = self.done.await {
            tracing::error!(error = %e, "server task failed");
        }
    }
}

/// `ms` with ±10% jitter (lifetimes, so connections opened together do not all
/// close together).
pub(crate) fn jittered(ms: u64) -> Duration {
    let spread = ms / 10;
    Duration::from_millis(ms - spread + fastrand::u64(..=spread * 2))
}

#[cfg(test)]
mod tests {
    use super::jittered;

    #[test]
    fn jitter_stays_within_ten_percent_and_spreads_over_it() {
        let samples: Vec<u128> = (0..2000).map(|_| jittered(400).as_millis()).collect();
        assert!(
            samples.iter().all(|ms| (360..=440).contains(ms)),
            "{samples:?}"
        );
        assert!(samples.iter().any(|ms| *ms < 380), "reaches the low end");
        assert!(samples.iter().any(|ms| *ms > 420), "reaches the high end");
        assert_eq!(
            jittered(5).as_millis(),
            5,
            "below 10 ms there is nothing to spread"
        );
    }
}
