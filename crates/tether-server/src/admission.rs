//! Admission (SPEC section 2): the checks in their order, and the three forms a
//! refusal takes (HTTP status + JSON, `?refusal=close` WebSocket close, SSE `200`
//! stream for transient refusals). A refusal leaves no state and fires no event: the
//! IP slot and the reservation are RAII values dropped with the error.

use std::net::IpAddr;

use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use tether_core::{Phase, Reservation, Transport};
use tether_protocol::{CloseCode, Refusal};

use crate::App;

/// Longest client id accepted from `?client=`.
pub const MAX_CLIENT_ID: usize = 200;

/// Why a handshake did not get a reservation.
#[derive(Debug)]
pub enum AdmitError {
    /// One of SPEC section 2's refusals.
    Refused(Refusal),
    /// The request itself is malformed (400).
    BadRequest(String),
}

/// Runs the admission checks for a client at `ip` and reserves its slot.
pub fn admit(
    app: &App,
    client: Option<&str>,
    ip: IpAddr,
    transport: Transport,
    origin_ok: bool,
) -> Result<(Reservation, String), AdmitError> {
    let client_id = match client {
        Some(c) => {
            validate_client_id(c).map_err(AdmitError::BadRequest)?;
            c.to_owned()
        }
        None => format!("anon-{:016x}", fastrand::u64(..)),
    };
    let checked = (|| {
        if app.drain.phase() >= Phase::Draining {
            return Err(Refusal::Draining);
        }
        app.ip_limits.check_rate(ip)?;
        let slot = app.ip_limits.acquire(ip)?;
        if !origin_ok {
            return Err(Refusal::OriginNotAllowed);
        }
        app.registry.reserve(&client_id, transport, Some(slot))
    })();
    match checked {
        Ok(r) => Ok((r, client_id)),
        Err(refusal) => {
            app.metrics.refused(refusal.error());
            tracing::debug!(client_id, %ip, reason = refusal.error(), "handshake refused");
            Err(AdmitError::Refused(refusal))
        }
    }
}

/// Client ids: 1–200 bytes of printable ASCII without spaces.
pub fn validate_client_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_CLIENT_ID || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "client must be 1 to {MAX_CLIENT_ID} printable ASCII characters without spaces"
        ));
    }
    Ok(())
}

/// How long a refused client should wait before trying again.
pub fn retry_ms(refusal: Refusal) -> u64 {
    match refusal {
        Refusal::RateLimited => 1000,
        Refusal::IpLimit => 5000,
        Refusal::Draining | Refusal::ServerFull | Refusal::UpstreamUnavailable => {
            1000 + fastrand::u64(..4000)
        }
        _ => 0,
    }
}

/// The JSON of a refusal's `closing` announcement (WebSocket `?refusal=close` and SSE).
pub fn closing_json(refusal: Refusal, retry: u64) -> serde_json::Value {
    let code: CloseCode = refusal.close_code();
    serde_json::json!({
        "type": "closing",
        "code": code.0,
        "reason": refusal.error(),
        "reconnect": code.reconnect(),
        "retry_ms": if code.reconnect() { Some(retry) } else { None },
        "error": refusal.error(),
        "message": refusal.message(),
    })
}

/// The HTTP form: status, JSON body, `Retry-After` where it applies.
pub fn http_refusal(refusal: Refusal) -> Response {
    let status =
        StatusCode::from_u16(refusal.http_status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let mut resp = crate::net::error_response(status, refusal.error(), refusal.message());
    if refusal.has_retry_after() {
        let secs = retry_ms(refusal).div_ceil(1000).max(1);
        if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
            resp.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
    }
    resp
}

/// The answer for a malformed request.
pub fn bad_request(message: &str) -> Response {
    crate::net::error_response(StatusCode::BAD_REQUEST, "bad_request", message)
}
