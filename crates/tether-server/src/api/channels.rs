//! `GET /api/channels`, `/api/channels/{name}/presence` and `/history`: what the
//! broker knows of channels.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use tether_protocol::Position;

use super::body::{bad, bad_channel, broker_error, paged_query};
use super::Api;
use crate::respond::{error_response, json_response};

/// `GET /api/channels`.
pub(super) async fn channels(State(api): State<Arc<Api>>) -> Response {
    let list: Vec<_> = api
        .broker
        .channels()
        .await
        .into_iter()
        .map(|(name, subscribers, clients)| {
            json!({"name": name, "subscribers": subscribers, "clients": clients})
        })
        .collect();
    json_response(StatusCode::OK, json!({"channels": list}))
}

/// `GET /api/channels/{name}/presence`.
pub(super) async fn presence(State(api): State<Arc<Api>>, Path(name): Path<String>) -> Response {
    if let Some(r) = bad_channel(&name) {
        return r;
    }
    let clients: Vec<_> = api
        .broker
        .presence(&name)
        .await
        .into_iter()
        .map(|(client_id, connections)| json!({"client_id": client_id, "connections": connections}))
        .collect();
    json_response(StatusCode::OK, json!({"clients": clients}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HistoryQuery {
    since: Option<String>,
    limit: Option<usize>,
}

/// `GET /api/channels/{name}/history`.
pub(super) async fn history(
    State(api): State<Arc<Api>>,
    Path(name): Path<String>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Response {
    if let Some(r) = bad_channel(&name) {
        return r;
    }
    let (q, limit) = match paged_query(query, |q| q.limit) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let since = match q.since.as_deref().map(Position::parse) {
        None => None,
        Some(Some(p)) => Some(p),
        Some(None) => return bad("since must be a position \"<epoch>:<offset>\""),
    };
    let (epoch, messages) = match api.broker.history(&name, since.as_ref(), limit).await {
        Ok(page) => page.unwrap_or_default(),
        Err(e) => return broker_error(e),
    };
    let page = HistoryPage {
        epoch: (!epoch.is_empty()).then_some(epoch.as_str()),
        messages: messages
            .iter()
            .map(|p| HistoryMessage {
                channel: &p.channel,
                id: &p.id,
                position: &p.position,
                // Validated when published; this borrows it (a scan, no depth limit).
                data: serde_json::from_str(&p.data).ok(),
            })
            .collect(),
    };
    match serde_json::to_vec(&page) {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &format!("history: {e}"),
        ),
    }
}

/// A history page. `data` is served as the raw JSON text that was published, not
/// re-parsed: what publish accepted (at any nesting depth) is what history serves.
#[derive(Serialize)]
struct HistoryPage<'a> {
    epoch: Option<&'a str>,
    messages: Vec<HistoryMessage<'a>>,
}

#[derive(Serialize)]
struct HistoryMessage<'a> {
    channel: &'a str,
    id: &'a str,
    position: &'a str,
    data: Option<&'a RawValue>,
}
