//! Why a connection ended, and the one table from that to what is recorded and
//! what each leg is told (SPEC sections 4 and 9). A transport never picks a close
//! code itself: it reports an [`End`], and [`settle`] decides per [`Family`].

use tether_core::Metrics;
use tether_protocol::{CloseCode, Closing};

use super::Leg;

/// Which vocabulary a connection's client speaks when it is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    /// Tether's own protocol (`/ws`, `/sse`): a `closing` announcement, then the
    /// close with Tether's code.
    Tether,
    /// A proxied leg pair: standard codes only (1001 drain and kicks, 1008 limits and
    /// token expiry, 1011 internal errors, 1014 upstream failures); nothing injected.
    Proxied,
}

/// Why the connection loop ended.
#[derive(Debug)]
pub(crate) enum End {
    /// A close asked for through the registry: replace, kick, sweep, drain.
    Requested(Closing),
    /// A leg did not answer a ping within `heartbeat.timeout_ms`.
    Silent(Leg),
    /// The upstream sent nothing for the route's `upstream_idle_timeout_ms`.
    UpstreamIdle,
    /// `limits.max_connection_lifetime_ms`.
    Lifetime,
    /// The token (plus leeway) expired.
    TokenExpired,
    /// More than `limits.max_inbound_per_sec` frames from the client.
    RateLimited,
    /// The outbound queue overflowed its bounds.
    QueueFull,
    /// A catching-up subscription fell out of the channel's history.
    FellBehind,
    /// A write to this leg blocked past `heartbeat.timeout_ms`: it does not read.
    Stalled(Leg),
    /// A client frame over `limits.max_message_bytes`.
    TooBig,
    /// A client text frame that is not UTF-8.
    InvalidUtf8,
    /// Another RFC 6455 violation by the client.
    Protocol(String),
    /// A `refresh` token for another subject.
    SessionError,
    /// Something failed inside Tether.
    Internal(String),
    /// This leg sent a close frame with this code and reason.
    Closed(Leg, u16, String),
    /// This leg failed or ended without a close frame.
    Lost(Leg, String),
    /// The client kept sending on an event stream.
    UnexpectedInput,
    /// An SSE upstream ended its stream.
    UpstreamEnded,
    /// The shutdown deadline passed.
    Hard,
}

impl End {
    /// Counts the ends that have a metric of their own (beyond the close code, which
    /// a peer's close frame can carry too): a client leg silent past the heartbeat
    /// timeout, and a client that does not read its queue.
    pub(crate) fn count(&self, metrics: &Metrics) {
        match self {
            End::Silent(Leg::Client) => metrics.heartbeat_timeout(),
            End::QueueFull | End::FellBehind | End::Stalled(Leg::Client) => {
                metrics.slow_consumer_close()
            }
            _ => {}
        }
    }
}

/// What the client leg gets.
#[derive(Debug, PartialEq)]
pub(crate) enum ToClient {
    /// Nothing: the socket is dropped (it is gone, or does not read).
    Nothing,
    /// Tether family: the `closing` announcement, then the close with its code.
    Announce(Closing),
    /// Proxied family: a close frame with this code and reason (`None`: an empty one).
    Close(Option<(u16, String)>),
    /// The client closed first: finish its closing handshake.
    Answer,
}

/// What the upstream leg gets (proxied connections only).
#[derive(Debug, PartialEq)]
pub(crate) enum ToUpstream {
    /// Nothing: it is gone, or there is none.
    Nothing,
    /// A close frame with this code and reason (`None`: an empty one).
    Close(Option<(u16, String)>),
    /// The upstream closed first: finish its closing handshake.
    Answer,
}

/// How a connection ends: what the registry records (`connection.closed`'s code and
/// reason) and what each leg is told.
#[derive(Debug)]
pub(crate) struct Ending {
    /// The code recorded.
    pub(crate) code: u16,
    /// The reason recorded.
    pub(crate) reason: String,
    /// What the client leg gets.
    pub(crate) client: ToClient,
    /// What the upstream leg gets.
    pub(crate) upstream: ToUpstream,
}

impl Ending {
    fn new(
        code: CloseCode,
        reason: impl Into<String>,
        client: ToClient,
        upstream: ToUpstream,
    ) -> Self {
        Self {
            code: code.0,
            reason: reason.into(),
            client,
            upstream,
        }
    }
}

/// The table: `end` for a connection of `family`.
pub(crate) fn settle(end: End, family: Family) -> Ending {
    match family {
        Family::Tether => tether(end),
        Family::Proxied => proxied(end),
    }
}

/// A server-made close of Tether's protocol: recorded and announced with `code`.
fn announced(code: CloseCode, reason: &str) -> Ending {
    let closing = Closing::new(code, reason);
    Ending::new(
        code,
        reason,
        ToClient::Announce(closing),
        ToUpstream::Nothing,
    )
}

/// A close of Tether's protocol that nobody is told about.
fn unannounced(code: CloseCode, reason: String) -> Ending {
    Ending::new(code, reason, ToClient::Nothing, ToUpstream::Nothing)
}

fn tether(end: End) -> Ending {
    match end {
        End::Requested(closing) => Ending::new(
            closing.code,
            closing.reason.clone(),
            ToClient::Announce(closing),
            ToUpstream::Nothing,
        ),
        End::Silent(_) => announced(CloseCode::HEARTBEAT_TIMEOUT, "no heartbeat from the peer"),
        End::Lifetime => announced(
            CloseCode::MAX_LIFETIME,
            "maximum connection lifetime reached",
        ),
        End::TokenExpired => announced(CloseCode::TOKEN_EXPIRED, "token expired"),
        End::RateLimited => announced(CloseCode::RATE_LIMITED, "too many frames per second"),
        End::QueueFull => announced(CloseCode::SLOW_CONSUMER, "outbound queue full"),
        End::FellBehind => announced(CloseCode::SLOW_CONSUMER, "fell behind the channel history"),
        End::TooBig => announced(CloseCode::MESSAGE_TOO_BIG, "message too big"),
        End::InvalidUtf8 => announced(CloseCode::INVALID_PAYLOAD, "text frame is not valid UTF-8"),
        End::Protocol(why) => {
            announced(CloseCode::PROTOCOL_ERROR, &format!("protocol error: {why}"))
        }
        End::SessionError => announced(
            CloseCode::SESSION_ERROR,
            "refresh token is for another subject",
        ),
        End::Internal(why) => {
            announced(CloseCode::INTERNAL_ERROR, &format!("internal error: {why}"))
        }
        End::Closed(_, code, reason) => Ending {
            code,
            reason,
            client: ToClient::Answer,
            upstream: ToUpstream::Nothing,
        },
        End::Stalled(_) => unannounced(CloseCode::SLOW_CONSUMER, "peer stopped reading".into()),
        End::Lost(_, why) => unannounced(CloseCode::ABNORMAL, why),
        End::UnexpectedInput => unannounced(
            CloseCode::POLICY,
            "client sent data on an event stream".into(),
        ),
        End::Hard => unannounced(CloseCode::GOING_AWAY, "shutdown deadline".into()),
        // No upstream in Tether's protocol.
        End::UpstreamIdle | End::UpstreamEnded => {
            announced(CloseCode::INTERNAL_ERROR, "internal error: no upstream")
        }
    }
}

/// A close frame's code and reason.
fn frame(code: CloseCode, reason: &str) -> Option<(u16, String)> {
    Some((code.0, reason.to_owned()))
}

/// Both legs closed with the same standard `wire` code; `code` is recorded.
fn both(code: CloseCode, wire: CloseCode, reason: &str) -> Ending {
    Ending::new(
        code,
        reason,
        ToClient::Close(frame(wire, reason)),
        ToUpstream::Close(frame(wire, reason)),
    )
}

/// The upstream failed: the client gets 1014 (bad gateway).
fn bad_gateway(reason: &str) -> Ending {
    Ending::new(
        CloseCode::BAD_GATEWAY,
        reason,
        ToClient::Close(frame(CloseCode::BAD_GATEWAY, reason)),
        ToUpstream::Nothing,
    )
}

/// Codes that exist only in events, never on the wire.
fn passable(code: u16) -> bool {
    !matches!(code, 1005 | 1006 | 1015)
}

fn proxied(end: End) -> Ending {
    use CloseCode as C;
    match end {
        End::Requested(c) if matches!(c.code, C::GOING_AWAY | C::REPLACED | C::KICKED) => {
            both(c.code, C::GOING_AWAY, &c.reason)
        }
        End::Requested(c) => both(c.code, C::POLICY, &c.reason),
        End::Silent(Leg::Client) => Ending::new(
            C::HEARTBEAT_TIMEOUT,
            "client heartbeat timeout",
            ToClient::Close(frame(C::POLICY, "heartbeat timeout")),
            ToUpstream::Close(frame(C::GOING_AWAY, "client heartbeat timeout")),
        ),
        End::Silent(Leg::Upstream) => bad_gateway("upstream heartbeat timeout"),
        End::UpstreamIdle => bad_gateway("upstream idle"),
        End::Lifetime => both(C::MAX_LIFETIME, C::POLICY, "maximum connection lifetime"),
        End::TokenExpired => both(C::TOKEN_EXPIRED, C::POLICY, "token expired"),
        End::RateLimited => both(C::RATE_LIMITED, C::POLICY, "too many frames per second"),
        End::SessionError => both(C::SESSION_ERROR, C::POLICY, "session error"),
        End::QueueFull | End::FellBehind | End::Stalled(Leg::Client) => Ending::new(
            C::SLOW_CONSUMER,
            "slow consumer",
            ToClient::Close(frame(C::POLICY, "slow consumer")),
            ToUpstream::Close(frame(C::GOING_AWAY, "client is not reading")),
        ),
        End::Stalled(Leg::Upstream) => bad_gateway("upstream is not reading"),
        End::TooBig => client_violation(C::MESSAGE_TOO_BIG),
        End::InvalidUtf8 => client_violation(C::INVALID_PAYLOAD),
        End::Protocol(_) => client_violation(C::PROTOCOL_ERROR),
        End::Internal(why) => both(
            C::INTERNAL_ERROR,
            C::INTERNAL_ERROR,
            &format!("internal error: {why}"),
        ),
        End::Closed(Leg::Client, code, reason) => {
            let onward = if passable(code) {
                Some((code, reason.clone()))
            } else {
                frame(C::GOING_AWAY, "client closed")
            };
            Ending {
                code,
                reason,
                client: ToClient::Answer,
                upstream: ToUpstream::Close(onward),
            }
        }
        End::Closed(Leg::Upstream, code, reason) => {
            let onward = passable(code).then(|| (code, reason.clone()));
            Ending {
                code,
                reason,
                client: ToClient::Close(onward),
                upstream: ToUpstream::Answer,
            }
        }
        End::Lost(Leg::Client, why) => Ending {
            code: C::ABNORMAL.0,
            reason: why,
            client: ToClient::Nothing,
            upstream: ToUpstream::Close(frame(C::GOING_AWAY, "client went away")),
        },
        End::UnexpectedInput => Ending::new(
            C::POLICY,
            "client sent data on an event stream",
            ToClient::Nothing,
            ToUpstream::Close(frame(C::GOING_AWAY, "client went away")),
        ),
        End::Lost(Leg::Upstream, why) => bad_gateway(&why),
        End::UpstreamEnded => Ending::new(
            C::NORMAL,
            "upstream ended the stream",
            ToClient::Close(frame(C::NORMAL, "upstream ended the stream")),
            ToUpstream::Nothing,
        ),
        End::Hard => both(C::GOING_AWAY, C::GOING_AWAY, "shutdown deadline"),
    }
}

/// The client broke RFC 6455: it gets its code, the upstream 1008.
fn client_violation(code: CloseCode) -> Ending {
    Ending::new(
        code,
        "client protocol error",
        ToClient::Close(frame(code, "protocol error")),
        ToUpstream::Close(frame(CloseCode::POLICY, "client protocol error")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(e: &Ending) -> (u16, Option<u16>, Option<u16>) {
        let client = match &e.client {
            ToClient::Announce(c) => Some(c.code.0),
            ToClient::Close(f) => f.as_ref().map(|f| f.0),
            ToClient::Nothing | ToClient::Answer => None,
        };
        let upstream = match &e.upstream {
            ToUpstream::Close(f) => f.as_ref().map(|f| f.0),
            ToUpstream::Nothing | ToUpstream::Answer => None,
        };
        (e.code, client, upstream)
    }

    #[test]
    fn tether_closes_are_announced_with_their_own_code() {
        for (end, want) in [
            (End::Silent(Leg::Client), 4000),
            (End::Lifetime, 4005),
            (End::TokenExpired, 4003),
            (End::RateLimited, 4029),
            (End::QueueFull, 4008),
            (End::FellBehind, 4008),
            (End::TooBig, 1009),
            (End::InvalidUtf8, 1007),
            (End::Protocol("x".into()), 1002),
            (End::SessionError, 4004),
            (End::Internal("x".into()), 1011),
            (End::Requested(Closing::new(CloseCode::REPLACED, "r")), 4001),
        ] {
            let e = settle(end, Family::Tether);
            assert_eq!(code(&e), (want, Some(want), None));
        }
        for (end, want) in [
            (End::Stalled(Leg::Client), 4008),
            (End::Lost(Leg::Client, "x".into()), 1006),
            (End::Hard, 1001),
            (End::UnexpectedInput, 1008),
        ] {
            let e = settle(end, Family::Tether);
            assert_eq!(e.client, ToClient::Nothing);
            assert_eq!(e.code, want);
        }
    }

    #[test]
    fn proxied_closes_use_standard_codes_on_both_legs() {
        for (end, want) in [
            (End::Silent(Leg::Client), (4000, Some(1008), Some(1001))),
            (End::Lifetime, (4005, Some(1008), Some(1008))),
            (End::TokenExpired, (4003, Some(1008), Some(1008))),
            (End::RateLimited, (4029, Some(1008), Some(1008))),
            (End::QueueFull, (4008, Some(1008), Some(1001))),
            (End::Stalled(Leg::Client), (4008, Some(1008), Some(1001))),
            (End::Stalled(Leg::Upstream), (1014, Some(1014), None)),
            (End::Silent(Leg::Upstream), (1014, Some(1014), None)),
            (End::UpstreamIdle, (1014, Some(1014), None)),
            (
                End::Lost(Leg::Upstream, "x".into()),
                (1014, Some(1014), None),
            ),
            (End::Lost(Leg::Client, "x".into()), (1006, None, Some(1001))),
            (End::TooBig, (1009, Some(1009), Some(1008))),
            (End::Internal("x".into()), (1011, Some(1011), Some(1011))),
            (End::Hard, (1001, Some(1001), Some(1001))),
            (
                End::Requested(Closing::new(CloseCode::KICKED, "k")),
                (4002, Some(1001), Some(1001)),
            ),
            (
                End::Requested(Closing::new(CloseCode::GOING_AWAY, "d")),
                (1001, Some(1001), Some(1001)),
            ),
            (
                End::Requested(Closing::new(CloseCode::HEARTBEAT_TIMEOUT, "s")),
                (4000, Some(1008), Some(1008)),
            ),
            (
                End::Closed(Leg::Upstream, 4100, "bye".into()),
                (4100, Some(4100), None),
            ),
            (
                End::Closed(Leg::Client, 1000, "bye".into()),
                (1000, None, Some(1000)),
            ),
            (
                End::Closed(Leg::Client, 1005, String::new()),
                (1005, None, Some(1001)),
            ),
        ] {
            assert_eq!(code(&settle(end, Family::Proxied)), want);
        }
    }
}
