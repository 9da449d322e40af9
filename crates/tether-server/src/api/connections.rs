//! `GET /api/connections`: the registry's connections, filtered and paged.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;
use tether_core::{Filter, Transport};

use super::body::{bad, paged_query};
use super::Api;
use crate::respond::json_response;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ConnectionsQuery {
    client_id: Option<String>,
    transport: Option<Transport>,
    channel: Option<String>,
    idle_ms_gt: Option<u64>,
    limit: Option<usize>,
    page: Option<String>,
}

pub(super) async fn connections(
    State(api): State<Arc<Api>>,
    query: Result<Query<ConnectionsQuery>, QueryRejection>,
) -> Response {
    let (q, limit) = match paged_query(query, |q| q.limit) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let filter = Filter {
        idle_ms_gt: q.idle_ms_gt,
        channel: q.channel.clone(),
        transport: q.transport,
        meta: None,
    };
    if let Some(c) = &api.cluster {
        let page = c
            .connections(q.client_id.as_deref(), &filter, q.page.as_deref(), limit)
            .await;
        return match page {
            Ok(p) => json_response(StatusCode::OK, json!(p)),
            Err(tether_redis::RegistryError::BadPage) => {
                bad("page is not a page token from next_page")
            }
            Err(e) => super::cluster_error(&e),
        };
    }
    let after = match q.page.as_deref().map(str::parse::<u64>) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return bad("page is not a page token from next_page"),
    };
    let (conns, next) = api
        .registry
        .list(q.client_id.as_deref(), &filter, after, limit);
    json_response(
        StatusCode::OK,
        json!({"connections": conns, "next_page": next.map(|n| n.to_string())}),
    )
}
