//! Tether's HTTP edge: the accept loop, the WebSocket and SSE transports, the
//! server API, metrics, sweeps and drain, on top of `tether-core`.
//!
//! Ownership: [`Server::start`] builds one [`App`] (shared state behind an `Arc`),
//! binds both listeners and spawns their accept loops, the sweeps and the drain
//! coordinator. Every per-socket task and every connection task is spawned on the
//! app's [`TaskTracker`] (`tasks` in `/api/stats`), so drain can wait for them.
//! [`Running::begin_drain`] starts the shutdown; [`Running::wait`] resolves once
//! every connection is closed and the listeners are gone. The shutdown runs in this
//! order: drain the connections, flush the webhooks, close the `/api/events`
//! streams (after the drain's last event), stop the API.
#![warn(missing_docs)]

mod admin;
pub mod admission;
mod api;
mod api_listener;
mod app;
pub mod auth;
mod client_assets;
mod cluster;
mod commands;
pub mod config;
mod conn_io;
mod cors;
mod drain;
mod driver;
mod edge;
mod events_tail;
mod forwarded;
mod net;
mod pending;
mod proxy;
mod proxy_request;
mod proxy_sse;
mod refusal;
mod request;
mod respond;
mod routes;
mod sessions;
mod socket_info;
pub mod sse;
mod sweeps;
pub mod tls;
mod tombstones;
mod upstream;
pub mod webhooks;
mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use app::App;
pub use config::Config;

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
    /// `[broker]` names a Redis that cannot be used (a bad URL).
    #[error(transparent)]
    Broker(#[from] tether_redis::LinkError),
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
        let link = cluster::link(&cfg.broker)?;
        let app = App::new(cfg, nofile, auth, link);
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
    // Ends the `/api/events` streams: after the drain's last event, before the API
    // (and with it, however the API stops).
    let events_stop = api_stop.child_token();
    // One listener for both (`[api] listen` equal to `listen`): the client router
    // serves the API's routes too, behind the API's own key and Host checks.
    let shared_api = api
        .is_none()
        .then(|| api::shared(api::Api::of(&app, events_stop.clone())));
    let client_router = routes::client_router(&app, shared_api);
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
            api::router(api::Api::of(&app, events_stop.clone())).merge(routes::health_router(&app));
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
    let link = LinkRun::start(&app);
    let webhooks = app.webhooks.start();
    begin.cancelled().await;
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(app.cfg.shutdown.timeout_ms.get());
    drain_connections(&app).await;
    link.settle().await;
    sweeps_stop.cancel();
    stop_accepting.cancel();
    flush_webhooks(&app, webhooks, deadline).await;
    close_event_streams(&events_stop);
    stop_api(&api_stop, background).await;
    link.stop().await;
}

/// Shutdown, step 1: the drain (SPEC section 4): every connection closed, spread,
/// and the lingering clients' `client.offline` fired. The API keeps answering.
async fn drain_connections(app: &Arc<App>) {
    drain::run(app).await;
}

/// Shutdown, step 2: the webhook queue is delivered until `deadline` (the signal
/// plus `shutdown.timeout_ms`) or a hard stop; what is left is counted and logged.
async fn flush_webhooks(
    app: &App,
    sender: Option<webhooks::SenderTask>,
    deadline: tokio::time::Instant,
) {
    if let Some(sender) = sender {
        sender.flush(deadline, app.drain.hard_stop()).await;
    }
}

/// Shutdown, step 3: `/api/events` streams send what the drain emitted, then end.
fn close_event_streams(events_stop: &CancellationToken) {
    events_stop.cancel();
}

/// Shutdown, step 4: the API listener stops (its open requests finish) and every
/// background task is awaited.
async fn stop_api(api_stop: &CancellationToken, mut background: tokio::task::JoinSet<()>) {
    api_stop.cancel();
    while background.join_next().await.is_some() {}
}

/// Cluster mode's link to Redis while the server runs: it stays up through the
/// drain (the drain's events and releases still reach Redis) and stops last.
struct LinkRun {
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    cluster: Option<Arc<tether_redis::ClusterRegistry>>,
}

impl LinkRun {
    fn start(app: &App) -> Self {
        let stop = CancellationToken::new();
        let mut tasks = app
            .link
            .as_ref()
            .map(|l| l.start(stop.clone()))
            .unwrap_or_default();
        if let Some(b) = &app.redis_broker {
            tasks.extend(b.start(stop.clone()));
        }
        if let Some(c) = &app.cluster {
            c.start();
        }
        Self {
            stop,
            tasks,
            cluster: app.cluster.clone(),
        }
    }

    /// After the drain: the cluster's last releases and graces settle, so their
    /// offlines fire before the webhooks are flushed.
    async fn settle(&self) {
        if let Some(c) = &self.cluster {
            c.settle().await;
        }
    }

    async fn stop(self) {
        // The registry first: its graces end (offlines fire) while Redis is reachable.
        if let Some(c) = &self.cluster {
            c.stop().await;
        }
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Removes channels with neither subscribers nor history, once a second.
async fn hub_cleanup(app: Arc<App>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                app.registry.hub().sweep();
                app.driving.tombstones.prune();
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
