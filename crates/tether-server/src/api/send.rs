//! `POST /api/send`: a direct message to every connection of one client.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use tether_core::{Outgoing, Selector, Transport};

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
    let selector = Selector {
        client_id: Some(b.client_id),
        ..Default::default()
    };
    let direct = Arc::new(tether_core::hub::encode_direct(b.data.get()));
    let n = api
        .registry
        .select(&selector)
        .iter()
        // A proxied connection carries its upstream's protocol: nothing of Tether's
        // is injected into it, so it is neither sent to nor counted.
        .filter(|c| c.transport() != Transport::Proxy)
        .filter(|c| c.outbox().push(Outgoing::Direct(direct.clone())))
        .count();
    json_response(StatusCode::OK, json!({"connections": n}))
}
