//! `POST /api/publish`: a message to a channel, through the broker.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::body::{bad, bad_channel, broker_error, parse_body};
use super::Api;
use crate::respond::{error_response, json_response};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    channel: String,
    data: Box<RawValue>,
    idempotency_key: Option<String>,
}

pub(super) async fn publish(State(api): State<Arc<Api>>, body: Bytes) -> Response {
    let started = Instant::now();
    let b: PublishBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return bad(e.to_string()),
    };
    if let Some(r) = bad_channel(&b.channel) {
        return r;
    }
    if let Some(r) = too_large(&api, &b.data) {
        return r;
    }
    if b.idempotency_key
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.len() > 200)
    {
        return bad("idempotency_key must be 1 to 200 bytes");
    }
    match api
        .broker
        .publish(&b.channel, b.data.get(), b.idempotency_key.as_deref())
        .await
    {
        Ok(r) => {
            // The broker answers once the frame is queued for the last local subscriber.
            if !r.duplicate {
                api.metrics.publish_fanout(started.elapsed());
            }
            json_response(StatusCode::OK, json!(r))
        }
        Err(e) => broker_error(e),
    }
}

/// A 413 for `data` over `limits.max_publish_bytes` (publish and send).
pub(super) fn too_large(api: &Api, data: &RawValue) -> Option<Response> {
    (data.get().len() as u64 > api.max_publish_bytes).then(|| {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            &format!(
                "data is over limits.max_publish_bytes ({})",
                api.max_publish_bytes
            ),
        )
    })
}
