//! `GET /api/clients/{id}`: one client and its connections. `GET /api/clients`:
//! the clients online or lingering (every node's in cluster mode), paged like `/api/connections` (same `limit`
//! bounds, 400s naming the field), in client-id order; `next_page` is the last id of
//! the page, hex-encoded, so a token is plain ASCII in a query string and a made-up
//! one is refused.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

use super::body::{bad, paged_query};
use super::Api;
use crate::respond::{error_response, json_response};

pub(super) async fn client(State(api): State<Arc<Api>>, Path(id): Path<String>) -> Response {
    // In cluster mode, the client on every node.
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClientsQuery {
    limit: Option<usize>,
    page: Option<String>,
}

pub(super) async fn list(
    State(api): State<Arc<Api>>,
    query: Result<Query<ClientsQuery>, QueryRejection>,
) -> Response {
    let (q, limit) = match paged_query(query, |q| q.limit) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let after = match q.page.as_deref().map(decode_token) {
        None => None,
        Some(Some(id)) => Some(id),
        Some(None) => return bad("page is not a page token from next_page"),
    };
    let (clients, next) = match &api.cluster {
        // In cluster mode, every node's clients.
        Some(c) => match c.clients(after.as_deref(), limit).await {
            Ok((rows, next)) => (json!(rows), next),
            Err(e) => return super::cluster_error(&e),
        },
        None => {
            let (rows, next) = api.registry.clients_page(after.as_deref(), limit);
            (json!(rows), next)
        }
    };
    json_response(
        StatusCode::OK,
        json!({"clients": clients, "next_page": next.as_deref().map(encode_token)}),
    )
}

/// A client id as a page token: lowercase hex of its bytes.
fn encode_token(id: &str) -> String {
    id.bytes().map(|b| format!("{b:02x}")).collect()
}

/// The client id a token names; `None` for anything `encode_token` does not make.
fn decode_token(token: &str) -> Option<String> {
    let hex = token.as_bytes();
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return None;
    }
    let bytes = hex
        .chunks(2)
        .map(|pair| {
            let s = std::str::from_utf8(pair).ok()?;
            if !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return None;
            }
            u8::from_str_radix(s, 16).ok()
        })
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_junk_is_refused() {
        for id in ["a", "client-7", "é/ü x", "anon-0123"] {
            assert_eq!(decode_token(&encode_token(id)).as_deref(), Some(id));
        }
        for junk in ["", "zz", "abc", "0G", "AB", "ff", "+1"] {
            assert_eq!(decode_token(junk), None, "{junk}");
        }
    }
}
