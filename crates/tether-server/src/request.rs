//! A malformed handshake request: what is wrong with it, named (400 `bad_request`).
//! Not a refusal (it is not counted as one). A leaf shared by admission, the
//! transports' query parsing and token verification (a `sub` is a client id).

use axum::http::StatusCode;
use axum::response::Response;

/// Longest client id accepted from `?client=`.
pub const MAX_CLIENT_ID: usize = 200;

/// A malformed handshake request (400 `bad_request`, naming what is wrong). Not a
/// refusal: it is not counted as one.
#[derive(Debug, thiserror::Error)]
pub enum BadRequest {
    /// `?client=` is not 1–200 printable ASCII without spaces.
    #[error("client must be 1 to {MAX_CLIENT_ID} printable ASCII characters without spaces")]
    ClientId,
    /// A `channel` that is not a valid channel name.
    #[error("bad channel {0:?}: names are 1-200 of A-Z a-z 0-9 _ . : / -")]
    Channel(String),
    /// More channels than one SSE stream may carry.
    #[error("at most {max} channels per stream")]
    TooManyChannels {
        /// The bound.
        max: usize,
    },
    /// A parameter with a value outside its set.
    #[error("{name} must be {allowed}, not {value:?}")]
    Value {
        /// The parameter.
        name: &'static str,
        /// What it may be.
        allowed: &'static str,
        /// What it was.
        value: String,
    },
    /// A query string that does not parse.
    #[error("bad query: {0}")]
    Query(String),
}

/// Client ids: 1–200 bytes of printable ASCII without spaces.
pub fn validate_client_id(id: &str) -> Result<(), BadRequest> {
    if id.is_empty() || id.len() > MAX_CLIENT_ID || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(BadRequest::ClientId);
    }
    Ok(())
}

/// The answer for a malformed request.
pub fn bad_request(message: impl std::fmt::Display) -> Response {
    crate::respond::error_response(StatusCode::BAD_REQUEST, "bad_request", &message.to_string())
}
