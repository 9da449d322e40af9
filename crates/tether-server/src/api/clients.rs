//! `GET /api/clients/{id}`: one client and its connections.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::json;

use super::Api;
use crate::respond::{error_response, json_response};

pub(super) async fn client(State(api): State<Arc<Api>>, Path(id): Path<String>) -> Response {
    match api.registry.client(&id) {
        Some(c) => json_response(StatusCode::OK, json!(c)),
        None => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such client on this node",
        ),
    }
}
