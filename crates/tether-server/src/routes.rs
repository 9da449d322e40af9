//! The client listener's routes: `/ws`, `/sse`, the proxy routes, `/client/*`
//! assets, `/healthz` and `/readyz`, and a JSON 404. The one module that knows every
//! transport's handler; the transports know nothing of it.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use axum::Router;

use crate::app::{App, Health};
use crate::respond::{error_response, json_response};

/// `/ws`, `/sse`, `/healthz`, `/readyz`, the proxy routes, plus `extra` (the API's
/// routes when both listeners are one), and a JSON 404 for anything else.
pub(crate) fn client_router(app: &App, extra: Option<Router>) -> Router {
    let router = Router::new()
        .route("/ws", get(crate::ws::handler))
        .route(
            "/sse",
            get(crate::sse::handler).options(crate::sse::preflight),
        )
        .with_state(app.edge.clone())
        .merge(crate::proxy::router(app.edge.clone()))
        .merge(crate::client_assets::router(app.edge.clone()))
        .merge(health_router(app));
    match extra {
        Some(extra) => router.merge(extra),
        None => router,
    }
    .fallback(not_found)
}

/// `/healthz` and `/readyz`, on both listeners.
pub(crate) fn health_router(app: &App) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(app.health())
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, serde_json::json!({"status": "ok"}))
}

async fn readyz(State(health): State<Arc<Health>>) -> Response {
    match health.ready() {
        Ok(()) => json_response(StatusCode::OK, serde_json::json!({"status": "ready"})),
        Err(why) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "unavailable", "reason": why}),
        ),
    }
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}
