//! Admission refusals (SPEC section 2): one enum, each with its `error` code, HTTP
//! status, WebSocket close code and whether it is transient.

use crate::close::CloseCode;

/// Why a handshake was refused. The order of the variants is the order in which
/// admission checks them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The node is draining (after `pre_drain_ms`).
    Draining,
    /// `limits.handshakes_per_ip_per_sec` exceeded.
    RateLimited,
    /// `limits.max_connections_per_ip` reached.
    IpLimit,
    /// `Origin` present and not allowed.
    OriginNotAllowed,
    /// Missing, invalid or expired token.
    Unauthorized,
    /// SSE channel not permitted by the token.
    ForbiddenChannel,
    /// The client is at its connection limit under `on_client_limit = "reject"`.
    ClientLimit,
    /// `limits.max_connections` reached.
    ServerFull,
    /// Cluster mode: Redis unreachable and `broker.on_unavailable = "reject"`.
    BrokerUnavailable,
    /// The proxy upstream could not be reached in time.
    UpstreamUnavailable,
}

impl Refusal {
    /// Every refusal, in admission order.
    pub const ALL: [Refusal; 10] = [
        Refusal::Draining,
        Refusal::RateLimited,
        Refusal::IpLimit,
        Refusal::OriginNotAllowed,
        Refusal::Unauthorized,
        Refusal::ForbiddenChannel,
        Refusal::ClientLimit,
        Refusal::ServerFull,
        Refusal::BrokerUnavailable,
        Refusal::UpstreamUnavailable,
    ];

    /// The `error` field of the JSON body and the metrics label.
    pub fn error(self) -> &'static str {
        match self {
            Refusal::Draining => "draining",
            Refusal::RateLimited => "rate_limited",
            Refusal::IpLimit => "ip_limit",
            Refusal::OriginNotAllowed => "origin_not_allowed",
            Refusal::Unauthorized => "unauthorized",
            Refusal::ForbiddenChannel => "forbidden_channel",
            Refusal::ClientLimit => "client_limit",
            Refusal::ServerFull => "server_full",
            Refusal::BrokerUnavailable => "broker_unavailable",
            Refusal::UpstreamUnavailable => "upstream_unavailable",
        }
    }

    /// A human sentence for the `message` field.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Draining => "this node is shutting down; reconnect to another node",
            Refusal::RateLimited => "too many handshakes from this address; slow down",
            Refusal::IpLimit => "too many connections from this address",
            Refusal::OriginNotAllowed => "this Origin is not allowed",
            Refusal::Unauthorized => "missing, invalid or expired token",
            Refusal::ForbiddenChannel => "the token does not permit this channel",
            Refusal::ClientLimit => "this client already holds its maximum number of connections",
            Refusal::ServerFull => "the server is at its connection limit",
            Refusal::BrokerUnavailable => "the cluster's broker is unreachable; try again shortly",
            Refusal::UpstreamUnavailable => "the upstream service could not be reached",
        }
    }

    /// The HTTP status of the refusal.
    pub fn http_status(self) -> u16 {
        match self {
            Refusal::Draining | Refusal::ServerFull | Refusal::BrokerUnavailable => 503,
            Refusal::RateLimited | Refusal::IpLimit => 429,
            Refusal::OriginNotAllowed | Refusal::ForbiddenChannel => 403,
            Refusal::Unauthorized => 401,
            Refusal::ClientLimit => 409,
            Refusal::UpstreamUnavailable => 502,
        }
    }

    /// The WebSocket close code of the `?refusal=close` form.
    pub fn close_code(self) -> CloseCode {
        CloseCode(match self {
            Refusal::Draining | Refusal::ServerFull | Refusal::BrokerUnavailable => 4503,
            Refusal::RateLimited | Refusal::IpLimit => 4429,
            Refusal::OriginNotAllowed | Refusal::ForbiddenChannel => 4403,
            Refusal::Unauthorized => 4401,
            Refusal::ClientLimit => 4409,
            Refusal::UpstreamUnavailable => 4502,
        })
    }

    /// The transient refusals that SSE answers as a `200` stream with `retry:` and
    /// `event: closing` (SPEC section 2), so a native `EventSource` tries again.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Refusal::Draining
                | Refusal::RateLimited
                | Refusal::IpLimit
                | Refusal::ServerFull
                | Refusal::BrokerUnavailable
        )
    }

    /// Whether the HTTP answer carries `Retry-After`.
    pub fn has_retry_after(self) -> bool {
        matches!(
            self,
            Refusal::Draining
                | Refusal::RateLimited
                | Refusal::ServerFull
                | Refusal::BrokerUnavailable
        )
    }
}
