//! Admission (SPEC section 2): the checks in their order, and the three forms a
//! refusal takes (HTTP status + JSON, `?refusal=close` WebSocket close, SSE `200`
//! stream for transient refusals). A refusal leaves no state and fires no event: the
//! IP slot and the reservation are RAII values dropped with the error.

use std::net::IpAddr;

use axum::http::StatusCode;
use axum::response::Response;
use tether_core::{IpSlot, Phase, Reservation, Transport};
use tether_protocol::Refusal;

use crate::auth::Identity;
use crate::App;

/// Longest client id accepted from `?client=`.
pub const MAX_CLIENT_ID: usize = 200;

/// Why a handshake did not get a reservation.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// One of SPEC section 2's refusals.
    #[error("refused: {}", .0.error())]
    Refused(Refusal),
    /// The request itself is malformed (400).
    #[error(transparent)]
    BadRequest(#[from] BadRequest),
}

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
            validate_client_id(c)?;
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
        validate_client_id(c)?;
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
pub fn validate_client_id(id: &str) -> Result<(), BadRequest> {
    if id.is_empty() || id.len() > MAX_CLIENT_ID || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(BadRequest::ClientId);
    }
    Ok(())
}

/// The answer for a malformed request.
pub fn bad_request(message: impl std::fmt::Display) -> Response {
    crate::net::error_response(StatusCode::BAD_REQUEST, "bad_request", &message.to_string())
}

/// The HTTP form of a refusal (see [`Refused`](crate::refusal::Refused)).
pub(crate) fn http_refusal(refusal: Refusal) -> Response {
    crate::refusal::Refused::new(refusal).http()
}
