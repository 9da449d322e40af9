//! The frames this client reads and writes (SPEC section 5), from the client's side.
//!
//! `tether-protocol` owns the server's encoders; this module owns decoding what the
//! server sends (tolerantly: unknown fields are ignored, a missing
//! `heartbeat_timeout_ms` falls back to the server default) and encoding the few
//! frames the client sends.

use serde::Deserialize;
use serde_json::{json, Value};
use tether_protocol::Closing;

/// The server's default `heartbeat.timeout_ms`, used when a `welcome` does not carry one.
pub const DEFAULT_HEARTBEAT_TIMEOUT_MS: u64 = 10_000;

/// A frame the server sent, as the client needs it.
#[derive(Clone, Debug, PartialEq)]
pub enum Incoming {
    /// The first frame of every connection.
    Welcome {
        /// This connection's id.
        conn_id: String,
        /// The client it belongs to.
        client_id: String,
        /// The server's ping interval.
        heartbeat_ms: u64,
        /// How long the server waits for a frame after a ping.
        heartbeat_timeout_ms: u64,
    },
    /// Reply to `subscribe`.
    Subscribed {
        /// The client's `ref`.
        reference: Option<u64>,
        /// The channel.
        channel: String,
        /// The channel's latest position when subscribing.
        position: String,
        /// Whether `since` was inside the history.
        recovered: bool,
        /// How many messages are replayed.
        missed: u64,
    },
    /// A channel message.
    Message {
        /// The channel.
        channel: String,
        /// The message id.
        id: String,
        /// Its position, `"<epoch>:<offset>"`.
        position: String,
        /// The payload.
        data: Value,
    },
    /// A direct message (no position, not replayed).
    Direct {
        /// The message id.
        id: String,
        /// The payload.
        data: Value,
    },
    /// An `error` reply; the connection stays open.
    Error {
        /// The `ref` of the request it answers.
        reference: Option<u64>,
        /// Machine-readable code.
        code: String,
        /// Human sentence.
        message: String,
    },
    /// The announcement before a server-initiated close.
    Closing(Closing),
    /// Replies the client has no use for (`pong`, `unsubscribed`).
    Ignored,
    /// Text that is not a frame this client understands.
    Invalid(String),
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Wire {
    Welcome {
        conn_id: String,
        client_id: String,
        heartbeat_ms: u64,
        #[serde(default)]
        heartbeat_timeout_ms: Option<u64>,
    },
    Subscribed {
        #[serde(rename = "ref", default)]
        reference: Option<u64>,
        channel: String,
        position: String,
        recovered: bool,
        missed: u64,
    },
    Message {
        channel: String,
        id: String,
        position: String,
        #[serde(default)]
        data: Value,
    },
    Direct {
        id: String,
        #[serde(default)]
        data: Value,
    },
    Error {
        #[serde(rename = "ref", default)]
        reference: Option<u64>,
        code: String,
        #[serde(default)]
        message: String,
    },
    Closing(Closing),
    Pong {},
    Unsubscribed {},
}

impl Incoming {
    /// Decodes one text frame. Never panics, whatever the input.
    pub fn decode(text: &str) -> Incoming {
        match serde_json::from_str::<Wire>(text) {
            Ok(w) => w.into(),
            Err(e) => Incoming::Invalid(format!("cannot read a server frame: {e}")),
        }
    }
}

impl From<Wire> for Incoming {
    fn from(w: Wire) -> Self {
        match w {
            Wire::Welcome {
                conn_id,
                client_id,
                heartbeat_ms,
                heartbeat_timeout_ms,
            } => Incoming::Welcome {
                conn_id,
                client_id,
                heartbeat_ms,
                heartbeat_timeout_ms: heartbeat_timeout_ms.unwrap_or(DEFAULT_HEARTBEAT_TIMEOUT_MS),
            },
            Wire::Subscribed {
                reference,
                channel,
                position,
                recovered,
                missed,
            } => Incoming::Subscribed {
                reference,
                channel,
                position,
                recovered,
                missed,
            },
            Wire::Message {
                channel,
                id,
                position,
                data,
            } => Incoming::Message {
                channel,
                id,
                position,
                data,
            },
            Wire::Direct { id, data } => Incoming::Direct { id, data },
            Wire::Error {
                reference,
                code,
                message,
            } => Incoming::Error {
                reference,
                code,
                message,
            },
            Wire::Closing(c) => Incoming::Closing(c),
            Wire::Pong {} | Wire::Unsubscribed {} => Incoming::Ignored,
        }
    }
}

/// `{"type":"connect","token":…}`: first-frame authentication (keeps the token out of URLs).
pub fn connect(token: &str) -> String {
    json!({"type": "connect", "token": token}).to_string()
}

/// `{"type":"subscribe","ref":…,"channel":…,"since":…}` (`since` only when resuming).
pub fn subscribe(reference: u64, channel: &str, since: Option<&str>) -> String {
    let mut v = json!({"type": "subscribe", "ref": reference, "channel": channel});
    if let Some(s) = since {
        v["since"] = Value::from(s);
    }
    v.to_string()
}

/// `{"type":"unsubscribe","ref":…,"channel":…}`.
pub fn unsubscribe(reference: u64, channel: &str) -> String {
    json!({"type": "unsubscribe", "ref": reference, "channel": channel}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_what_the_server_sends() {
        let w = Incoming::decode(
            r#"{"type":"welcome","conn_id":"n1-a-1","client_id":"c","node_id":"n1","heartbeat_ms":500,"heartbeat_timeout_ms":300}"#,
        );
        assert!(matches!(
            w,
            Incoming::Welcome {
                heartbeat_ms: 500,
                heartbeat_timeout_ms: 300,
                ..
            }
        ));
        let old = Incoming::decode(
            r#"{"type":"welcome","conn_id":"x","client_id":"c","node_id":"n1","heartbeat_ms":25000}"#,
        );
        assert!(matches!(
            old,
            Incoming::Welcome {
                heartbeat_timeout_ms: DEFAULT_HEARTBEAT_TIMEOUT_MS,
                ..
            }
        ));
        let c = Incoming::decode(
            r#"{"type":"closing","code":4002,"reason":"kicked","reconnect":true,"retry_ms":null}"#,
        );
        assert!(matches!(
            c,
            Incoming::Closing(Closing {
                reconnect: true,
                retry_ms: None,
                ..
            })
        ));
        assert_eq!(
            Incoming::decode(r#"{"type":"pong","ref":3}"#),
            Incoming::Ignored
        );
        assert_eq!(
            Incoming::decode(r#"{"type":"unsubscribed","ref":2,"channel":"a"}"#),
            Incoming::Ignored
        );
    }

    #[test]
    fn junk_is_invalid_never_a_panic() {
        for junk in [
            "",
            "{",
            "[1]",
            r#"{"type":"dance"}"#,
            r#"{"type":"message"}"#,
            "null",
        ] {
            assert!(
                matches!(Incoming::decode(junk), Incoming::Invalid(_)),
                "{junk}"
            );
        }
    }

    #[test]
    fn encodes_client_frames() {
        let v = |s: String| serde_json::from_str::<Value>(&s).unwrap_or(Value::Null);
        assert_eq!(
            v(subscribe(1, "news", Some("e:3"))),
            json!({"type": "subscribe", "ref": 1, "channel": "news", "since": "e:3"})
        );
        assert_eq!(
            v(subscribe(2, "news", None)),
            json!({"type": "subscribe", "ref": 2, "channel": "news"})
        );
        assert_eq!(
            v(unsubscribe(3, "a")),
            json!({"type": "unsubscribe", "ref": 3, "channel": "a"})
        );
        assert_eq!(v(connect("t")), json!({"type": "connect", "token": "t"}));
    }
}
