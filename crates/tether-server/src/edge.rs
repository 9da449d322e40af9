//! What the client listener's handlers use of the server: admission's [`Gate`], the
//! driver's [`Ctx`], the task tracker connections run in, the client protocol's settings,
//! and for the proxy routes their upstream clients. Built once by `App::new`; every
//! `/ws`, `/sse` and proxy handler receives this, not the whole server.

use std::sync::Arc;

use tokio_util::task::TaskTracker;

use crate::admission::Gate;
use crate::config::{Config, ProxyRoute};
use crate::driver::Ctx;

/// The client listener's view of the server.
#[derive(Debug)]
pub(crate) struct Edge {
    /// Admission's checks.
    pub(crate) gate: Gate,
    /// What each connection's driver uses.
    pub(crate) driving: Arc<Ctx>,
    /// Per-connection tasks (the drain waits for them).
    pub(crate) tasks: TaskTracker,
    /// `limits.max_message_bytes`: the largest frame a client may send.
    pub(crate) max_message_bytes: usize,
    /// `sse.retry_ms`: the reconnect delay an SSE stream advertises.
    pub(crate) sse_retry_ms: u64,
    /// `[[proxy.routes]]`, by index.
    pub(crate) routes: Vec<ProxyRoute>,
    /// Clients for the proxy routes' upstreams.
    pub(crate) upstreams: Upstreams,
}

/// The proxy routes' upstream clients.
#[derive(Debug)]
pub(crate) struct Upstreams {
    /// HTTP client for SSE upstreams (`http://`, `https://`).
    pub(crate) http: reqwest::Client,
    /// TLS client config for `wss://` upstreams (loaded only when a route needs it).
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
}

impl Upstreams {
    /// The clients `cfg`'s routes need.
    pub(crate) fn new(cfg: &Config) -> Self {
        Self {
            http: reqwest::Client::builder()
                .use_rustls_tls()
                .build()
                .unwrap_or_default(),
            tls: cfg
                .proxy
                .routes
                .iter()
                .any(|r| r.upstream.starts_with("wss://"))
                .then(crate::upstream::upstream_client_config)
                .flatten(),
        }
    }
}

impl Edge {
    /// The client listener's view of a server configured by `cfg`.
    pub(crate) fn new(cfg: &Config, gate: Gate, driving: Arc<Ctx>, tasks: TaskTracker) -> Self {
        Self {
            gate,
            driving,
            tasks,
            max_message_bytes: cfg.limits.max_message_bytes.get() as usize,
            sse_retry_ms: cfg.sse.retry_ms,
            routes: cfg.proxy.routes.clone(),
            upstreams: Upstreams::new(cfg),
        }
    }
}
