//! What a proxied request says, read once before admission, and what both proxy
//! families (WebSocket and SSE routes) derive from it: the credentials, the
//! admission call, the upstream's headers, and what the registry records.

use std::net::IpAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, Request};
use tether_core::{ConnSpec, Transport as Kind};
use tokio::time::Instant;

use crate::admission::{self, AdmitError, Admitted, Credentials};
use crate::config::ProxyRoute;
use crate::edge::Edge;
use crate::socket_info::SocketInfo;

/// A proxied request, read before admission.
pub(crate) struct ProxyRequest {
    /// The client's headers (forwarded as a reverse proxy does).
    pub(crate) headers: HeaderMap,
    /// The client's query string (forwarded, less `token`).
    pub(crate) query: Option<String>,
    /// The client's address (through trusted proxies).
    pub(crate) ip: IpAddr,
    /// Whether its `Origin` is allowed.
    pub(crate) origin_ok: bool,
    /// `?client=` (auth `none`).
    client: Option<String>,
    /// `?token=` (jwt mode).
    token: Option<String>,
    /// `?refusal=close`.
    pub(crate) refusal_close: bool,
}

impl ProxyRequest {
    /// Reads what admission and the upstream need from `req`.
    pub(crate) fn read(edge: &Edge, req: &Request<Body>, info: &SocketInfo) -> Self {
        let headers = req.headers().clone();
        let query = req.uri().query().map(str::to_owned);
        let param = |name: &str| {
            form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        };
        let (client, token) = (param("client"), param("token"));
        let refusal_close = param("refusal").as_deref() == Some("close");
        let ip = edge.gate.client_ip(info.peer.ip(), &headers);
        let origin_ok = !edge.gate.origins.refused(&headers);
        ProxyRequest {
            headers,
            query,
            ip,
            origin_ok,
            client,
            token,
            refusal_close,
        }
    }

    fn creds(&self, edge: &Edge) -> Credentials<'_> {
        if edge.gate.auth.is_jwt() {
            Credentials::Token(admission::request_token(
                &self.headers,
                self.token.as_deref(),
            ))
        } else {
            Credentials::Client(self.client.as_deref())
        }
    }

    /// Runs admission (SPEC section 2) for a proxied connection.
    pub(crate) async fn admit(&self, edge: &Edge) -> Result<Admitted, AdmitError> {
        let creds = self.creds(edge);
        admission::admit(&edge.gate, creds, self.ip, Kind::Proxy, self.origin_ok, &[]).await
    }

    /// The headers the upstream gets (SPEC section 9).
    pub(crate) fn upstream_headers(&self, admitted: &Admitted) -> HeaderMap {
        crate::upstream::upstream_headers(
            &self.headers,
            &admitted.client_id,
            admitted.reservation.conn_id(),
            self.ip,
        )
    }

    /// What the registry records about the connection.
    pub(crate) fn spec(&self, route: &ProxyRoute, admitted: &Admitted) -> ConnSpec {
        ConnSpec {
            transport: Kind::Proxy,
            remote_addr: self.ip,
            user_agent: self
                .headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            meta: admitted
                .identity
                .as_ref()
                .map(|i| i.meta.clone())
                .unwrap_or_default(),
            upstream: Some(route.upstream.clone()),
        }
    }

    /// When the admitted connection's token (if any) runs out.
    pub(crate) fn expires_at(&self, edge: &Edge, admitted: &Admitted) -> Option<Instant> {
        admitted
            .identity
            .as_ref()
            .map(|i| edge.gate.auth.expires_at(i))
    }
}

/// An SSE route's idle limit for its upstream (`upstream_idle_timeout_ms`, 0 = off).
pub(crate) fn upstream_idle(route: &ProxyRoute) -> Option<Duration> {
    (route.upstream_idle_timeout_ms > 0)
        .then(|| Duration::from_millis(route.upstream_idle_timeout_ms))
}
