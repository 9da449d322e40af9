//! `GET /api/webhooks`: the webhooks' configuration (never the secret, the URL
//! without userinfo) and counters. `delivered`, `failed` and `retries` count POSTs
//! (as `tether_webhook_deliveries_total{result}` does); `queued`, `in_flight` and
//! `dropped` count events.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

use super::config::public_url;
use super::Webhooks;
use crate::respond::json_response;

/// The handler (its state is the webhooks handle alone).
pub(crate) async fn status(State(hooks): State<Arc<Webhooks>>) -> Response {
    json_response(StatusCode::OK, hooks.status_json())
}

impl Webhooks {
    fn status_json(&self) -> serde_json::Value {
        let (queued, in_flight) = self.queue.pending();
        let s = self.stats.snapshot();
        let enabled = self.cfg.enabled();
        json!({
            "enabled": enabled,
            "url": enabled.then(|| public_url(&self.cfg.url)),
            "events": self.cfg.events,
            "queued": queued,
            "in_flight": in_flight,
            "delivered": s.delivered,
            "failed": s.failed,
            "retries": s.retries,
            "dropped": s.dropped,
            "last_error": s.last_error,
        })
    }
}
