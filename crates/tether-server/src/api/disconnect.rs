//! `POST /api/disconnect`: close the connections a selector names.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use tether_core::{Filter, Selector};
use tether_protocol::{CloseCode, Closing};

use super::body::{bad, parse_body};
use super::Api;
use crate::respond::json_response;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    client_id: Option<String>,
    conn_id: Option<String>,
    #[serde(rename = "where")]
    filter: Option<Filter>,
    #[serde(default)]
    all: bool,
    code: Option<u16>,
    reason: Option<String>,
    #[serde(default)]
    reconnect: bool,
}

pub(super) async fn disconnect(State(api): State<Arc<Api>>, body: Bytes) -> Response {
    let b: DisconnectBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return bad(e.to_string()),
    };
    let code = b.code.unwrap_or(CloseCode::KICKED.0);
    if !(code == 1000 || code == 1001 || (3000..=4999).contains(&code)) {
        return bad("code must be 1000, 1001 or 3000 to 4999");
    }
    let selector = Selector {
        client_id: b.client_id,
        conn_id: b.conn_id,
        filter: b.filter.unwrap_or_default(),
        all: b.all,
    };
    if selector.is_empty() {
        return bad("name a selector: client_id, conn_id, a non-empty where, or all: true");
    }
    let closing = Closing {
        code: CloseCode(code),
        reason: b.reason.unwrap_or_else(|| "kicked".into()),
        reconnect: b.reconnect,
        retry_ms: None,
    };
    let closed = match &api.cluster {
        Some(c) => c.disconnect(&selector, &closing).await,
        None => api.registry.disconnect(&selector, &closing),
    };
    json_response(StatusCode::OK, json!({"closed": closed}))
}
