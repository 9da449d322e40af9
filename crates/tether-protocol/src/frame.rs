//! Client and server frames of the WebSocket protocol (SPEC section 5).
//!
//! Client frames are decoded from JSON text with errors that say what was wrong;
//! server frames encode to JSON text with every documented field present (`null`
//! where it does not apply).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::close::Closing;

/// A frame a client sends.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum ClientFrame {
    /// First-frame authentication in jwt mode.
    Connect {
        /// The JWT.
        token: String,
    },
    /// Subscribe to a channel, optionally resuming after `since`.
    Subscribe {
        /// Echoed in the reply.
        #[serde(rename = "ref", default)]
        reference: Option<u64>,
        /// The channel name.
        channel: String,
        /// Resume after this position (exclusive).
        #[serde(default)]
        since: Option<String>,
    },
    /// Leave a channel.
    Unsubscribe {
        /// Echoed in the reply.
        #[serde(rename = "ref", default)]
        reference: Option<u64>,
        /// The channel name.
        channel: String,
    },
    /// Application-level ping (browsers cannot send WebSocket pings).
    Ping {
        /// Echoed in the reply.
        #[serde(rename = "ref", default)]
        reference: Option<u64>,
    },
    /// Replace the connection's token before it expires.
    Refresh {
        /// Echoed in the reply.
        #[serde(rename = "ref", default)]
        reference: Option<u64>,
        /// The new JWT.
        token: String,
    },
}

/// Why a client frame could not be decoded; becomes an `error` reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameError {
    /// The `ref` of the frame, when one could be read.
    pub reference: Option<u64>,
    /// The machine-readable code (`bad_frame`, `unknown_type`).
    pub code: &'static str,
    /// A human sentence.
    pub message: String,
}

impl ClientFrame {
    /// Decodes one text frame. Never panics, whatever the input.
    pub fn decode(text: &str) -> Result<ClientFrame, FrameError> {
        let value: Value = serde_json::from_str(text).map_err(|e| FrameError {
            reference: None,
            code: "bad_frame",
            message: format!("malformed JSON: {e}"),
        })?;
        let reference = value.get("ref").and_then(Value::as_u64);
        let Some(kind) = value.get("type").and_then(Value::as_str).map(str::to_owned) else {
            return Err(FrameError {
                reference,
                code: "bad_frame",
                message: "a frame must be a JSON object with a string \"type\"".into(),
            });
        };
        if !matches!(
            kind.as_str(),
            "connect" | "subscribe" | "unsubscribe" | "ping" | "refresh"
        ) {
            return Err(FrameError {
                reference,
                code: "unknown_type",
                message: format!("unknown frame type {kind:?}"),
            });
        }
        serde_json::from_value(value).map_err(|e| FrameError {
            reference,
            code: "bad_frame",
            message: format!("bad {kind} frame: {e}"),
        })
    }
}

/// A frame the server sends.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame<'a> {
    /// The first frame of every connection.
    Welcome {
        /// This connection's id.
        conn_id: &'a str,
        /// The client it belongs to.
        client_id: &'a str,
        /// The node that holds it.
        node_id: &'a str,
        /// The heartbeat interval.
        heartbeat_ms: u64,
        /// How long after a ping the server waits for any frame (the client's
        /// dead-connection check is `heartbeat_ms` + this).
        heartbeat_timeout_ms: u64,
    },
    /// Reply to `subscribe`.
    Subscribed {
        /// The client's `ref`.
        #[serde(rename = "ref")]
        reference: Option<u64>,
        /// The channel.
        channel: &'a str,
        /// The channel's latest position when subscribing.
        position: &'a str,
        /// Whether `since` was inside the history.
        recovered: bool,
        /// How many messages will be replayed.
        missed: u64,
    },
    /// Reply to `unsubscribe`.
    Unsubscribed {
        /// The client's `ref`.
        #[serde(rename = "ref")]
        reference: Option<u64>,
        /// The channel.
        channel: &'a str,
    },
    /// Reply to a client `ping`.
    Pong {
        /// The client's `ref`.
        #[serde(rename = "ref")]
        reference: Option<u64>,
    },
    /// A request could not be served; the connection stays open.
    Error {
        /// The client's `ref`.
        #[serde(rename = "ref")]
        reference: Option<u64>,
        /// Machine-readable code.
        code: &'a str,
        /// Human sentence.
        message: &'a str,
    },
    /// The server is about to close the connection.
    Closing(&'a Closing),
}

impl ServerFrame<'_> {
    /// The frame as JSON text.
    pub fn encode(&self) -> String {
        // Serializing these types cannot fail: every field is a string, number, bool
        // or null, and no map has non-string keys.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::close::CloseCode;

    #[test]
    fn decodes_each_client_frame() {
        assert_eq!(
            ClientFrame::decode(r#"{"type":"ping","ref":3}"#),
            Ok(ClientFrame::Ping { reference: Some(3) })
        );
        assert_eq!(
            ClientFrame::decode(r#"{"type":"subscribe","ref":1,"channel":"news","since":"a:1"}"#),
            Ok(ClientFrame::Subscribe {
                reference: Some(1),
                channel: "news".into(),
                since: Some("a:1".into())
            })
        );
        assert_eq!(
            ClientFrame::decode(r#"{"type":"connect","token":"t"}"#),
            Ok(ClientFrame::Connect { token: "t".into() })
        );
    }

    #[test]
    fn bad_frames_say_why() {
        let e = ClientFrame::decode("{nope").err().map(|e| e.code);
        assert_eq!(e, Some("bad_frame"));
        let e = ClientFrame::decode(r#"{"type":"dance","ref":9}"#).err();
        assert_eq!(e.as_ref().map(|e| e.code), Some("unknown_type"));
        assert_eq!(e.and_then(|e| e.reference), Some(9));
        let e = ClientFrame::decode(r#"{"type":"subscribe","ref":2}"#).err();
        assert_eq!(
            e.map(|e| (e.code, e.reference)),
            Some(("bad_frame", Some(2)))
        );
        assert!(ClientFrame::decode("[1,2]").is_err());
        assert!(ClientFrame::decode("").is_err());
    }

    #[test]
    fn golden_server_frames() {
        assert_eq!(
            ServerFrame::Welcome {
                conn_id: "n1-a-1",
                client_id: "c",
                node_id: "n1",
                heartbeat_ms: 25000,
                heartbeat_timeout_ms: 10000,
            }
            .encode(),
            r#"{"type":"welcome","conn_id":"n1-a-1","client_id":"c","node_id":"n1","heartbeat_ms":25000,"heartbeat_timeout_ms":10000}"#
        );
        assert_eq!(
            ServerFrame::Pong { reference: None }.encode(),
            r#"{"type":"pong","ref":null}"#
        );
        let closing = Closing::new(CloseCode::REPLACED, "replaced by a newer connection");
        assert_eq!(
            ServerFrame::Closing(&closing).encode(),
            r#"{"type":"closing","code":4001,"reason":"replaced by a newer connection","reconnect":false,"retry_ms":null}"#
        );
    }
}
