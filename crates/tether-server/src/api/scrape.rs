//! `GET /metrics`: the scrape-time gauges (queued bytes, broker up) are set, then the
//! metrics rendered, on a blocking thread (a walk over every connection and reads of
//! `/proc/self`, one entry per open socket). OpenMetrics text to a scraper that
//! accepts it (Prometheus asks for it), the classic Prometheus text format otherwise.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;

use super::Api;
use crate::respond::error_response;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The answer to a scrape with these request headers.
pub(super) async fn answer(api: Arc<Api>, headers: &HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let rendered = tokio::task::spawn_blocking(move || {
        let queued: usize = api
            .registry
            .connections()
            .iter()
            .map(|c| c.outbox().queued_bytes())
            .sum();
        api.metrics.set_queue_bytes(queued as u64);
        api.metrics.set_broker_up(api.broker.is_up());
        if openmetrics {
            api.metrics.render()
        } else {
            api.metrics.render_classic()
        }
    })
    .await;
    let Ok(text) = rendered else {
        return error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the scrape failed inside the server",
        );
    };
    let content_type = if openmetrics { OPENMETRICS } else { CLASSIC };
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .body(Body::from(text))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}
