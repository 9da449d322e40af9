//! Admission (SPEC section 2): the checks in their order, and the three forms a
//! refusal takes (HTTP status + JSON, `?refusal=close` WebSocket close, SSE `200`
//! stream for transient refusals). A refusal leaves no state and fires no event: the
//! IP slot and the reservation are RAII values dropped with the error.

use std::net::IpAddr;

use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use tether_core::{IpSlot, Phase, Reservation, Transport};
use tether_protocol::{CloseCode, Refusal};

use crate::auth::Identity;
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

/// Who the client says it is.
#[derive(Clone, Copy, Debug)]
pub enum Credentials<'a> {
    /// `auth.mode = "none"`: `?client=ID`, or a generated id.
    Client(Option<&'a str>),
    /// `auth.mode = "jwt"`: the token, if one came with the request.
    Token(Option<&'a str>),
}

/// An admitted handshake: its reservation and identity.
#[derive(Debug)]
pub struct Admitted {
    /// The reserved slot; commit it once the transport is up.
    pub reservation: Reservation,
    /// The client id.
    pub client_id: String,
    /// The token's identity (jwt mode).
    pub identity: Option<Identity>,
}

/// Counts and logs a refusal.
pub fn refused(app: &App, refusal: Refusal, ip: IpAddr) -> AdmitError {
    app.metrics.refused(refusal.error());
    tracing::debug!(%ip, reason = refusal.error(), "handshake refused");
    AdmitError::Refused(refusal)
}

/// The node and address checks, in order: draining, handshake rate, connections per
/// address, `Origin`. Returns the address slot the connection will hold.
pub fn precheck(app: &App, ip: IpAddr, origin_ok: bool) -> Result<IpSlot, Refusal> {
    if app.drain.phase() >= Phase::Draining {
        return Err(Refusal::Draining);
    }
    app.ip_limits.check_rate(ip)?;
    let slot = app.ip_limits.acquire(ip)?;
    if !origin_ok {
        return Err(Refusal::OriginNotAllowed);
    }
    Ok(slot)
}

/// The client id (and token identity) from the credentials.
pub fn identify(
    app: &App,
    creds: Credentials<'_>,
) -> Result<(String, Option<Identity>), AdmitError> {
    match creds {
        Credentials::Client(Some(c)) => {
            validate_client_id(c).map_err(AdmitError::BadRequest)?;
            Ok((c.to_owned(), None))
        }
        Credentials::Client(None) => Ok((format!("anon-{:016x}", fastrand::u64(..)), None)),
        Credentials::Token(None) => Err(AdmitError::Refused(Refusal::Unauthorized)),
        Credentials::Token(Some(t)) => match app.auth.verify(t) {
            Ok(id) => Ok((id.client_id.clone(), Some(id))),
            Err(e) => {
                tracing::debug!(error = %e, "token refused");
                Err(AdmitError::Refused(Refusal::Unauthorized))
            }
        },
    }
}

/// Runs every admission check in SPEC section 2's order and reserves the slot.
/// `channels` are the SSE stream's channels, checked against the token.
pub fn admit(
    app: &App,
    creds: Credentials<'_>,
    ip: IpAddr,
    transport: Transport,
    origin_ok: bool,
    channels: &[String],
) -> Result<Admitted, AdmitError> {
    if let Credentials::Client(Some(c)) = creds {
        validate_client_id(c).map_err(AdmitError::BadRequest)?;
    }
    let slot = precheck(app, ip, origin_ok).map_err(|r| refused(app, r, ip))?;
    let (client_id, identity) = match identify(app, creds) {
        Ok(v) => v,
        Err(AdmitError::Refused(r)) => return Err(refused(app, r, ip)),
        Err(e) => return Err(e),
    };
    if let Some(id) = &identity {
        if channels.iter().any(|c| !id.may_subscribe(c)) {
            return Err(refused(app, Refusal::ForbiddenChannel, ip));
        }
    }
    let reservation = app
        .registry
        .reserve(&client_id, transport, Some(slot))
        .map_err(|r| refused(app, r, ip))?;
    Ok(Admitted {
        reservation,
        client_id,
        identity,
    })
}

/// The token a request carries: `Authorization: Bearer` (the scheme in any case),
/// else `?token=`.
pub fn request_token<'a>(
    headers: &'a http::HeaderMap,
    query_token: Option<&'a str>,
) -> Option<&'a str> {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer)
        .or(query_token)
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
