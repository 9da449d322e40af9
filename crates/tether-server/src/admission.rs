//! Admission (SPEC section 2): the checks in their order, and the three forms a
//! refusal takes (HTTP status + JSON, `?refusal=close` WebSocket close, SSE `200`
//! stream for transient refusals). A refusal leaves no state and fires no event: the
//! IP slot and the reservation are RAII values dropped with the error.

use std::net::IpAddr;
use std::sync::Arc;

use axum::response::Response;
use ipnet::IpNet;
use tether_core::{
    ConnSpec, ConnectionGuard, Drain, IpLimits, IpSlot, Metrics, Phase, Registry, Reservation,
    Transport,
};
use tether_protocol::Refusal;
use tether_redis::ClusterRegistry;

use crate::auth::{Auth, Identity};
use crate::cors::Origins;
pub use crate::request::{bad_request, validate_client_id, BadRequest, MAX_CLIENT_ID};

/// What admission uses of the server: the checks' state, in SPEC section 2's order.
#[derive(Debug)]
pub(crate) struct Gate {
    /// Shutdown state (`draining`).
    pub(crate) drain: Drain,
    /// Per-address rate and connection limits.
    pub(crate) ip_limits: IpLimits,
    /// `limits.allowed_origins`.
    pub(crate) origins: Origins,
    /// Token verification.
    pub(crate) auth: Arc<Auth>,
    /// Reservations (client limit, duplicate policy, node ceiling).
    pub(crate) registry: Registry,
    /// Cluster mode: the client limit and duplicate policy across nodes.
    pub(crate) cluster: Option<Arc<ClusterRegistry>>,
    /// Refusals are counted by reason.
    pub(crate) metrics: Metrics,
    /// `server.trusted_proxies`: who may name the client's address.
    pub(crate) trusted_proxies: Vec<IpNet>,
}

impl Gate {
    /// The client's address: the TCP peer, or through trusted proxies.
    pub(crate) fn client_ip(&self, peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
        crate::forwarded::client_ip(peer, headers, &self.trusted_proxies)
    }
}

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
pub(crate) fn refused(gate: &Gate, refusal: Refusal, ip: IpAddr) -> AdmitError {
    gate.metrics.refused(refusal.error());
    tracing::debug!(%ip, reason = refusal.error(), "handshake refused");
    AdmitError::Refused(refusal)
}

/// The node and address checks, in order: draining, handshake rate, connections per
/// address, `Origin`. Returns the address slot the connection will hold.
pub(crate) fn precheck(gate: &Gate, ip: IpAddr, origin_ok: bool) -> Result<IpSlot, Refusal> {
    if gate.drain.phase() >= Phase::Draining {
        return Err(Refusal::Draining);
    }
    gate.ip_limits.check_rate(ip)?;
    let slot = gate.ip_limits.acquire(ip)?;
    if !origin_ok {
        return Err(Refusal::OriginNotAllowed);
    }
    Ok(slot)
}

/// The client id (and token identity) from the credentials.
pub(crate) fn identify(
    gate: &Gate,
    creds: Credentials<'_>,
) -> Result<(String, Option<Identity>), AdmitError> {
    match creds {
        Credentials::Client(Some(c)) => {
            validate_client_id(c)?;
            Ok((c.to_owned(), None))
        }
        Credentials::Client(None) => Ok((format!("anon-{:016x}", fastrand::u64(..)), None)),
        Credentials::Token(None) => Err(AdmitError::Refused(Refusal::Unauthorized)),
        Credentials::Token(Some(t)) => match gate.auth.verify(t) {
            Ok(id) => Ok((id.client_id.clone(), Some(id))),
            Err(e) => {
                tracing::debug!(error = %e, "token refused");
                Err(AdmitError::Refused(Refusal::Unauthorized))
            }
        },
    }
}

/// Runs every admission check in SPEC section 2's order and reserves the slot: this
/// node's checks, then in cluster mode the cluster's (the per-client limit across
/// nodes, then Redis reachable). `channels` are the SSE stream's channels, checked
/// against the token. Memory mode never suspends here.
pub(crate) async fn admit(
    gate: &Gate,
    creds: Credentials<'_>,
    ip: IpAddr,
    transport: Transport,
    origin_ok: bool,
    channels: &[String],
) -> Result<Admitted, AdmitError> {
    let admitted = admit_here(gate, creds, ip, transport, origin_ok, channels)?;
    match &gate.cluster {
        None => Ok(admitted),
        Some(c) => admit_cluster(gate, c, admitted, ip).await,
    }
}

/// This node's admission checks, in order, and the local reservation.
fn admit_here(
    gate: &Gate,
    creds: Credentials<'_>,
    ip: IpAddr,
    transport: Transport,
    origin_ok: bool,
    channels: &[String],
) -> Result<Admitted, AdmitError> {
    if let Credentials::Client(Some(c)) = creds {
        validate_client_id(c)?;
    }
    let slot = precheck(gate, ip, origin_ok).map_err(|r| refused(gate, r, ip))?;
    let (client_id, identity) = match identify(gate, creds) {
        Ok(v) => v,
        Err(AdmitError::Refused(r)) => return Err(refused(gate, r, ip)),
        Err(e) => return Err(e),
    };
    if let Some(id) = &identity {
        if channels.iter().any(|c| !id.may_subscribe(c)) {
            return Err(refused(gate, Refusal::ForbiddenChannel, ip));
        }
    }
    let reservation = gate
        .registry
        .reserve(&client_id, transport, Some(slot))
        .map_err(|r| refused(gate, r, ip))?;
    Ok(Admitted {
        reservation,
        client_id,
        identity,
    })
}

/// Cluster mode's part of admission, after [`admit`]: the per-client limit across
/// nodes, then (last) whether Redis is reachable. A refusal drops the reservation.
async fn admit_cluster(
    gate: &Gate,
    cluster: &ClusterRegistry,
    admitted: Admitted,
    ip: IpAddr,
) -> Result<Admitted, AdmitError> {
    match cluster.admit(&admitted.reservation).await {
        Ok(()) => Ok(admitted),
        Err(r) => {
            drop(admitted);
            Err(refused(gate, r, ip))
        }
    }
}

/// Commits a reservation; in cluster mode the cluster registers it first (and
/// decides `client.online` and any eviction). Memory mode never awaits here.
pub(crate) async fn commit(
    gate: &Gate,
    mut reservation: Reservation,
    spec: ConnSpec,
) -> ConnectionGuard {
    // The client's turn is held until the local commit has fired its events.
    let _turn = match &gate.cluster {
        Some(c) => Some(c.commit(&mut reservation).await),
        None => None,
    };
    reservation.commit(spec)
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

/// The HTTP form of a refusal (see [`Refused`](crate::refusal::Refused)).
pub(crate) fn http_refusal(refusal: Refusal) -> Response {
    crate::refusal::Refused::new(refusal).http()
}
