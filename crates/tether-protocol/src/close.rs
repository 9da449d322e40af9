//! Close codes (SPEC section 4) and the `closing` announcement that precedes every
//! server-initiated close.

use serde::{Deserialize, Serialize};

/// A WebSocket close code with the meaning Tether gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// Normal closure.
    pub const NORMAL: Self = Self(1000);
    /// Shutdown or drain.
    pub const GOING_AWAY: Self = Self(1001);
    /// RFC 6455 protocol error.
    pub const PROTOCOL_ERROR: Self = Self(1002);
    /// No close frame was received (never sent on the wire; used in events).
    pub const ABNORMAL: Self = Self(1006);
    /// Invalid payload (text that is not UTF-8).
    pub const INVALID_PAYLOAD: Self = Self(1007);
    /// Policy violation (proxy legs: limits, token expiry).
    pub const POLICY: Self = Self(1008);
    /// A message over `limits.max_message_bytes`.
    pub const MESSAGE_TOO_BIG: Self = Self(1009);
    /// An internal error.
    pub const INTERNAL_ERROR: Self = Self(1011);
    /// Bad gateway (proxy upstream failed).
    pub const BAD_GATEWAY: Self = Self(1014);
    /// No frame from the peer within the heartbeat timeout.
    pub const HEARTBEAT_TIMEOUT: Self = Self(4000);
    /// Replaced by a newer connection of the same client.
    pub const REPLACED: Self = Self(4001);
    /// Kicked through the API or a sweep.
    pub const KICKED: Self = Self(4002);
    /// The connection's token expired.
    pub const TOKEN_EXPIRED: Self = Self(4003);
    /// Session error (a `refresh` for another subject).
    pub const SESSION_ERROR: Self = Self(4004);
    /// `limits.max_connection_lifetime_ms` reached.
    pub const MAX_LIFETIME: Self = Self(4005);
    /// The outbound queue overflowed.
    pub const SLOW_CONSUMER: Self = Self(4008);
    /// More inbound frames per second than allowed.
    pub const RATE_LIMITED: Self = Self(4029);

    /// Every code Tether gives a meaning to: the ones it records or sends (SPEC section
    /// 4's table, plus 1005/1006/1008/1014, which a connection can end with) and the
    /// refusal codes. `tether_connections_closed_total` exports each from the start.
    pub const KNOWN: [CloseCode; 24] = [
        Self(1000),
        Self(1001),
        Self(1002),
        Self(1005),
        Self(1006),
        Self(1007),
        Self(1008),
        Self(1009),
        Self(1011),
        Self(1014),
        Self(4000),
        Self(4001),
        Self(4002),
        Self(4003),
        Self(4004),
        Self(4005),
        Self(4008),
        Self(4029),
        Self(4401),
        Self(4403),
        Self(4409),
        Self(4429),
        Self(4502),
        Self(4503),
    ];

    /// The code's short name, as used in metrics labels and logs.
    pub fn name(self) -> &'static str {
        match self.0 {
            1000 => "normal",
            1001 => "going_away",
            1002 => "protocol_error",
            1005 => "no_status",
            1006 => "abnormal",
            1007 => "invalid_payload",
            1008 => "policy_violation",
            1009 => "message_too_big",
            1011 => "internal_error",
            1014 => "bad_gateway",
            4000 => "heartbeat_timeout",
            4001 => "replaced",
            4002 => "kicked",
            4003 => "token_expired",
            4004 => "session_error",
            4005 => "max_lifetime",
            4008 => "slow_consumer",
            4029 => "rate_limited",
            4401 => "unauthorized",
            4403 => "forbidden",
            4409 => "client_limit",
            4429 => "ip_or_rate_limit",
            4502 => "upstream_unavailable",
            4503 => "unavailable",
            _ => "other",
        }
    }

    /// Whether a client should reconnect after this code (SPEC section 4's table).
    /// `4002` is decided by the kick itself; this returns its default (`false`).
    pub fn reconnect(self) -> bool {
        matches!(
            self.0,
            1001 | 1006 | 1011 | 1014 | 4000 | 4003 | 4005 | 4008 | 4029 | 4429 | 4502 | 4503
        )
    }

    /// Whether the announcement may skip the queued messages (SPEC section 4: the queue
    /// is dropped for 4000, 4008 and 1009).
    pub fn drops_queue(self) -> bool {
        matches!(self.0, 1009 | 4000 | 4008)
    }
}

/// The `closing` announcement: `{"type":"closing","code","reason","reconnect","retry_ms"}`
/// on WebSocket, `event: closing` on SSE. Refusals add `error` and `message`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closing {
    /// The close code that follows.
    pub code: CloseCode,
    /// A human-readable reason (also the close frame's reason, truncated to 123 bytes).
    pub reason: String,
    /// Whether the client should reconnect.
    pub reconnect: bool,
    /// How long to wait before reconnecting, when the server has an opinion.
    pub retry_ms: Option<u64>,
}

impl Closing {
    /// A closing announcement whose `reconnect` follows the code's rule.
    pub fn new(code: CloseCode, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
            reconnect: code.reconnect(),
            retry_ms: None,
        }
    }

    /// The reason trimmed to what fits a close frame (123 bytes, on a char boundary).
    pub fn frame_reason(&self) -> &str {
        let mut end = self.reason.len().min(123);
        while !self.reason.is_char_boundary(end) {
            end -= 1;
        }
        &self.reason[..end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_rule_matches_the_spec_table() {
        for c in [1000, 1002, 1007, 1009, 4001, 4002, 4004, 4401, 4403, 4409] {
            assert!(!CloseCode(c).reconnect(), "{c}");
        }
        for c in [1001, 1011, 4000, 4003, 4005, 4008, 4029, 4429, 4502, 4503] {
            assert!(CloseCode(c).reconnect(), "{c}");
        }
    }

    #[test]
    fn every_known_code_has_a_name() {
        for c in CloseCode::KNOWN {
            assert_ne!(c.name(), "other", "{}", c.0);
        }
        assert_eq!(CloseCode(3000).name(), "other");
    }

    #[test]
    fn frame_reason_is_cut_on_a_char_boundary() {
        let c = Closing::new(CloseCode::KICKED, "é".repeat(100));
        assert!(c.frame_reason().len() <= 123);
        assert_eq!(c.frame_reason().len() % 2, 0);
    }
}
