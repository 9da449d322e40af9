//! `POST /admin/session`: the exchange of the API key for a session cookie
//! (`SameSite=Strict`, `HttpOnly`) that the dashboard's calls and its `/api/events`
//! stream then use. Sessions live in memory, bounded in number and time.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::respond::{error_response, json_response};
use crate::sessions::{Sessions, COOKIE, SESSION_TTL};

/// What the dashboard's login uses: the API key, whether the API is on TLS (the
/// cookie is then `Secure`) and the sessions.
#[derive(Debug)]
pub(crate) struct Login {
    pub(crate) key: String,
    pub(crate) tls: bool,
    pub(crate) sessions: Arc<Sessions>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    key: String,
}

/// `POST /admin/session` `{"key"}` → the session cookie.
pub(crate) async fn session(State(login): State<Arc<Login>>, body: Bytes) -> Response {
    let key = login.key.as_bytes();
    if key.is_empty() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "no_key",
            "the API has no key: no session is needed",
        );
    }
    let Ok(given) = serde_json::from_slice::<Credentials>(&body) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "body must be {\"key\": \"...\"}",
        );
    };
    if !bool::from(given.key.as_bytes().ct_eq(key)) {
        return error_response(StatusCode::UNAUTHORIZED, "unauthorized", "wrong key");
    }
    let token = login.sessions.create();
    let mut r = json_response(StatusCode::OK, serde_json::json!({"session": "created"}));
    // Over TLS the cookie is also `Secure`: it never travels in clear text.
    let secure = if login.tls { "; Secure" } else { "" };
    let cookie = format!(
        "{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
        SESSION_TTL.as_secs()
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}
