//! The server API (SPEC section 8) on its own listener: one small module per call,
//! each handler parsing its input, asking the registry or the broker, and encoding
//! the answer. What every handler may use is [`Api`], not the whole server.
//!
//! Doors ([`doors`]): with `[api] key`, every call needs `Authorization: Bearer KEY`;
//! with no key, only `Host` localhost/127.0.0.1/[::1] is served and POSTs must be
//! `application/json`. `/api/events` streams end when `stop` says so (after the
//! drain's last event, see `lib.rs`), or with the API.

mod body;
mod channels;
mod clients;
mod connections;
mod disconnect;
mod doors;
mod events;
mod publish;
mod scrape;
mod send;
mod stats;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use tether_core::{Broker, Drain, Metrics, Registry};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::Login;
use crate::app::App;
use crate::pending::PendingCounter;
use crate::respond::error_response;
use crate::sessions::Sessions;

/// What the API's handlers use of the server.
#[derive(Debug)]
pub(crate) struct Api {
    /// Clients and connections.
    pub(crate) registry: Registry,
    /// Channels: publish, history, presence.
    pub(crate) broker: Arc<dyn Broker>,
    /// Shutdown state (`/api/stats`, the events stream's end).
    pub(crate) drain: Drain,
    /// `/metrics`.
    pub(crate) metrics: Metrics,
    /// Per-connection tasks (`/api/stats` counts them).
    pub(crate) tasks: TaskTracker,
    /// Sockets accepted and not yet admitted (`/api/stats`).
    pub(crate) pending: PendingCounter,
    /// The effective connection ceiling (`/api/stats`).
    pub(crate) max_connections: usize,
    /// `limits.max_publish_bytes` (publish and send).
    pub(crate) max_publish_bytes: u64,
    /// `[api] key`; empty = none (the doors, the dashboard's login).
    pub(crate) key: String,
    /// Whether the API is served over TLS (the session cookie is then `Secure`).
    pub(crate) tls: bool,
    /// Whether the API shares the client listener (the events stream then ends when
    /// the drain begins, instead of holding it).
    pub(crate) shares_client_listener: bool,
    /// Dashboard sessions.
    pub(crate) sessions: Arc<Sessions>,
    /// Ends the `/api/events` streams (after the drain's last event).
    pub(crate) stop: CancellationToken,
    /// Cluster mode: the registry that sees every node.
    pub(crate) cluster: Option<Arc<tether_redis::ClusterRegistry>>,
    /// `GET /api/webhooks`.
    pub(crate) webhooks: Arc<crate::webhooks::Webhooks>,
}

impl Api {
    /// The API's view of `app`, stopped by `stop`.
    pub(crate) fn of(app: &App, stop: CancellationToken) -> Arc<Api> {
        Arc::new(Api {
            registry: app.registry.clone(),
            broker: app.broker.clone(),
            drain: app.drain.clone(),
            metrics: app.metrics.clone(),
            tasks: app.tasks.clone(),
            pending: app.pending.clone(),
            max_connections: app.max_connections,
            max_publish_bytes: app.cfg.limits.max_publish_bytes.get(),
            key: app.cfg.api.key.clone(),
            tls: !app.cfg.tls.cert_file.is_empty(),
            // Port 0 twice is two listeners, as `Server::start` binds them.
            shares_client_listener: app.cfg.listen == app.cfg.api.listen
                && app.cfg.listen.port() != 0,
            sessions: app.admin_sessions.clone(),
            stop,
            cluster: app.cluster.clone(),
            webhooks: app.webhooks.clone(),
        })
    }
}

/// The API listener's router: the API calls, `/metrics`, `/admin`, and a JSON 404
/// for anything else (behind the same key and Host checks).
pub(crate) fn router(api: Arc<Api>) -> Router {
    guarded(routes(api.clone()).fallback(not_found), api)
}

/// The API's routes for a client listener that also serves the API (`[api] listen`
/// equal to `listen`): no fallback of their own, the client router has one.
pub(crate) fn shared(api: Arc<Api>) -> Router {
    guarded(routes(api.clone()), api)
}

fn guarded(routes: Router, api: Arc<Api>) -> Router {
    routes
        .layer(middleware::from_fn_with_state(api, doors::doors))
        .layer(middleware::from_fn(json_errors))
}

fn routes(api: Arc<Api>) -> Router {
    let login = Arc::new(Login {
        key: api.key.clone(),
        tls: api.tls,
        sessions: api.sessions.clone(),
    });
    Router::new()
        .route("/api/stats", get(stats::stats))
        .route("/api/clients", get(clients::list))
        .route("/api/clients/{id}", get(clients::client))
        .route("/api/connections", get(connections::connections))
        .route("/api/disconnect", post(disconnect::disconnect))
        .route("/api/publish", post(publish::publish))
        .route("/api/send", post(send::send))
        .route("/api/channels", get(channels::channels))
        .route("/api/channels/{name}/presence", get(channels::presence))
        .route("/api/channels/{name}/history", get(channels::history))
        .route("/api/events", get(events::events))
        .route(
            "/api/webhooks",
            get(crate::webhooks::status).with_state(api.webhooks.clone()),
        )
        .route("/api/openapi.json", get(openapi))
        .route("/metrics", get(stats::metrics))
        .with_state(api)
        .merge(crate::admin::router(login))
}

/// The answer when the cluster registry cannot reach Redis: 503 `broker_unavailable`.
fn cluster_error(e: &tether_redis::RegistryError) -> Response {
    tracing::warn!(error = %e, "cluster registry unavailable");
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "broker_unavailable",
        "the cluster's registry is unreachable; try again shortly",
    )
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "not_found", "no such API call")
}

/// `GET /api/openapi.json`: this API described in OpenAPI 3.
async fn openapi() -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(include_str!("../openapi.json")))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// Every API error is `{"error","message"}` JSON, including the ones the framework
/// produces itself (a path that is not UTF-8, a body over the size limit, an
/// unsupported method): those arrive as plain text or empty and are rewritten here.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let text = axum::body::to_bytes(resp.into_body(), 4096)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let code = match status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        _ => "error",
    };
    let message = if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text.into_owned()
    };
    error_response(status, code, &message)
}
