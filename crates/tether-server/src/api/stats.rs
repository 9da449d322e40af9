//! `GET /api/stats` and `GET /metrics`: the node at a glance.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde_json::json;
use tether_core::Phase;

use super::Api;
use crate::respond::json_response;

/// `GET /api/stats`.
pub(super) async fn stats(State(api): State<Arc<Api>>) -> Response {
    let [ws, sse, proxy] = api.registry.counts();
    let mut body = json!({
            "node_id": api.registry.node_id(),
            "connections": {"ws": ws, "sse": sse, "proxy": proxy},
            "clients": api.registry.clients(),
            "channels": api.registry.hub().channel_count(),
            "draining": api.drain.phase() != Phase::Running,
            "max_connections": api.max_connections,
            "pending_handshakes": api.pending.get(),
            "tasks": api.tasks.len(),
    });
    if let Some(c) = &api.cluster {
        // Unreachable Redis: `null` (the node's own figures still answer).
        body["cluster"] = match c.stats().await {
            Ok(s) => json!(s),
            Err(e) => {
                tracing::debug!(error = %e, "cluster stats unavailable");
                serde_json::Value::Null
            }
        };
    }
    json_response(StatusCode::OK, body)
}

/// `GET /metrics` (see [`super::scrape`]).
pub(super) async fn metrics(State(api): State<Arc<Api>>, headers: HeaderMap) -> Response {
    super::scrape::answer(api, &headers).await
}
