//! `GET /api/stats` and `GET /metrics`: the node at a glance.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
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

/// `GET /metrics`: the gauges read at scrape time, then the text.
pub(super) async fn metrics(State(api): State<Arc<Api>>) -> Response {
    let queued: usize = api
        .registry
        .connections()
        .iter()
        .map(|c| c.outbox().queued_bytes())
        .sum();
    api.metrics.set_queue_bytes(queued as u64);
    api.metrics.set_broker_up(api.broker.is_up());
    Response::builder()
        .header(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
        .body(Body::from(api.metrics.render()))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}
