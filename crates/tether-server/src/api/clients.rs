//! `GET /api/clients` (paged by client id) and `GET /api/clients/{id}`: this
//! node's clients, or in cluster mode every node's (SPEC sections 8 and 10).

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

use super::body::{bad, page_size};
use super::Api;
use crate::respond::{error_response, json_response};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClientsQuery {
    limit: Option<usize>,
    page: Option<String>,
}

/// `GET /api/clients`: `{"clients":[{"client_id","state","connections"}],"next_page"}`.
pub(super) async fn clients(
    State(api): State<Arc<Api>>,
    query: Result<Query<ClientsQuery>, QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return bad(e.body_text()),
    };
    let limit = match page_size(q.limit) {
        Ok(l) => l,
        Err(e) => return bad(e.to_string()),
    };
    let after = q.page.as_deref();
    let (rows, next) = match &api.cluster {
        Some(c) => match c.clients(after, limit).await {
            Ok((rows, next)) => (json!(rows), next),
            Err(e) => return super::cluster_error(&e),
        },
        None => {
            let (rows, next) = api.registry.client_page(after, limit);
            let rows: Vec<_> = rows
                .into_iter()
                .map(|(id, state, n)| json!({"client_id": id, "state": state, "connections": n}))
                .collect();
            (json!(rows), next)
        }
    };
    json_response(StatusCode::OK, json!({"clients": rows, "next_page": next}))
}

/// `GET /api/clients/{id}`.
pub(super) async fn client(State(api): State<Arc<Api>>, Path(id): Path<String>) -> Response {
    let found = match &api.cluster {
        Some(c) => match c.client(&id).await {
            Ok(v) => v,
            Err(e) => return super::cluster_error(&e),
        },
        None => api.registry.client(&id).map(|c| json!(c)),
    };
    match found {
        Some(c) => json_response(StatusCode::OK, c),
        None => error_response(StatusCode::NOT_FOUND, "not_found", "no such client"),
    }
}
