//! JSON answers: every answer the HTTP edge makes that is not a stream is one of
//! these (`{"error","message"}` for errors). A leaf: it knows no handler.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// A JSON answer.
pub(crate) fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `{"error","message"}` with a status.
pub(crate) fn error_response(status: StatusCode, error: &str, message: &str) -> Response {
    json_response(
        status,
        serde_json::json!({"error": error, "message": message}),
    )
}
