//! `POST /api/send`: a direct message to every connection of one client (on every
//! node, in cluster mode).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::body::{bad, parse_body};
use super::publish::too_large;
use super::Api;
use crate::respond::json_response;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    client_id: String,
    data: Box<RawValue>,
}

pub(super) async fn send(State(api): State<Arc<Api>>, body: Bytes) -> Response {
    let b: SendBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return bad(e.to_string()),
    };
    if let Some(r) = too_large(&api, &b.data) {
        return r;
    }
    let n = match &api.cluster {
        Some(c) => c.send(&b.client_id, b.data.get()).await,
        None => api.registry.send(&b.client_id, b.data.get()),
    };
    json_response(StatusCode::OK, json!({"connections": n}))
}
