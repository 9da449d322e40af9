//! What the client tells the application: one stream of [`Event`]s, and the
//! [`Stats`] it keeps. Both encode to the JSON lines `tether connect` prints
//! (SPEC section 1).

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

/// A state of the connection (SPEC section 13's state machine).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Opening a socket (or waiting for its `welcome`).
    Connecting,
    /// `welcome` received.
    Connected,
    /// A connection or an attempt ended; reported on every drop.
    Disconnected,
    /// Waiting before the next attempt.
    Reconnecting,
    /// Ended for good.
    Closed,
}

impl State {
    /// The state's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Connected => "connected",
            State::Disconnected => "disconnected",
            State::Reconnecting => "reconnecting",
            State::Closed => "closed",
        }
    }
}

/// A state change, with the fields that apply to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateChange {
    /// The new state.
    pub state: State,
    /// The attempt number since the last `connected` (connecting, reconnecting).
    pub attempt: Option<u32>,
    /// How long until the next attempt (reconnecting).
    pub delay_ms: Option<u64>,
    /// The close code (disconnected, closed).
    pub code: Option<u16>,
    /// The close reason (disconnected, closed).
    pub reason: Option<String>,
    /// Whether the client will reconnect (disconnected).
    pub will_reconnect: Option<bool>,
    /// Whether the end is fatal (closed): refused for good, 4004, 1009 or the failure cap.
    pub fatal: bool,
}

impl StateChange {
    pub(crate) fn new(state: State) -> Self {
        Self {
            state,
            attempt: None,
            delay_ms: None,
            code: None,
            reason: None,
            will_reconnect: None,
            fatal: false,
        }
    }
}

/// One thing that happened, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The connection's state changed.
    State(StateChange),
    /// A channel's first subscription was confirmed.
    Subscribed {
        /// The channel.
        channel: String,
        /// Its latest position.
        position: String,
        /// As the server reported it.
        recovered: bool,
        /// As the server reported it.
        missed: u64,
    },
    /// A subscription resumed after a reconnect: `recovered: false` means messages
    /// were lost (outside the history window) and the app must re-fetch its state.
    Recovered {
        /// The channel.
        channel: String,
        /// Its latest position.
        position: String,
        /// Whether every missed message is being replayed.
        recovered: bool,
        /// How many are replayed.
        missed: u64,
    },
    /// A channel message, delivered once and in order.
    Message {
        /// The channel.
        channel: String,
        /// The message id.
        id: String,
        /// Its position.
        position: String,
        /// The payload.
        data: Value,
    },
    /// A direct message.
    Direct {
        /// The message id.
        id: String,
        /// The payload.
        data: Value,
    },
    /// An error: a refused subscription, an unreadable frame, a refresher failure, or
    /// the reason of a fatal close.
    Error {
        /// Machine-readable code.
        code: String,
        /// Human sentence.
        message: String,
    },
}

impl Event {
    /// The event as `tether connect` prints it (SPEC section 1): fields that do not
    /// apply are omitted.
    pub fn to_json(&self) -> Value {
        match self {
            Event::State(s) => {
                let mut m = Map::new();
                m.insert("event".into(), "state".into());
                m.insert("state".into(), s.state.as_str().into());
                if let Some(a) = s.attempt {
                    m.insert("attempt".into(), a.into());
                }
                if let Some(d) = s.delay_ms {
                    m.insert("delay_ms".into(), d.into());
                }
                if let Some(c) = s.code {
                    m.insert("code".into(), c.into());
                }
                if let Some(r) = &s.reason {
                    m.insert("reason".into(), r.as_str().into());
                }
                Value::Object(m)
            }
            Event::Subscribed {
                channel,
                position,
                recovered,
                missed,
            }
            | Event::Recovered {
                channel,
                position,
                recovered,
                missed,
            } => json!({"event": "subscribed", "channel": channel, "position": position,
                        "recovered": recovered, "missed": missed}),
            Event::Message {
                channel,
                id,
                position,
                data,
            } => json!({"event": "message", "channel": channel, "id": id,
                        "position": position, "data": data}),
            Event::Direct { id, data } => json!({"event": "direct", "id": id, "data": data}),
            Event::Error { code, message } => {
                json!({"event": "error", "code": code, "message": message})
            }
        }
    }
}

/// One JSON object as text with its fields in the given order (`event` first, as
/// SPEC section 1 writes the lines), whatever order `serde_json`'s maps keep.
pub fn ordered_line(fields: &[(&str, &Value)]) -> String {
    let mut s = String::from("{");
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&Value::from(*k).to_string());
        s.push(':');
        s.push_str(&v.to_string());
    }
    s.push('}');
    s
}

fn line_in_order(v: &Value, order: &[&str]) -> String {
    let Some(map) = v.as_object() else {
        return v.to_string();
    };
    let mut fields: Vec<(&str, &Value)> = order
        .iter()
        .filter_map(|k| map.get(*k).map(|v| (*k, v)))
        .collect();
    fields.extend(
        map.iter()
            .filter(|(k, _)| !order.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), v)),
    );
    ordered_line(&fields)
}

/// Field order of each line kind, as SPEC section 1 lists them.
const ORDER: &[&str] = &[
    "event",
    "state",
    "attempt",
    "delay_ms",
    "code",
    "reason",
    "channel",
    "id",
    "position",
    "recovered",
    "missed",
    "data",
    "message",
];

/// Field order of the stats line, as SPEC section 13 lists them.
const STATS_ORDER: &[&str] = &[
    "event",
    "attempts",
    "successes",
    "failures",
    "reconnects",
    "messages",
    "duplicates",
    "connected_ms",
];

impl Event {
    /// The `tether connect` line: [`Event::to_json`] with its fields in SPEC order.
    pub fn to_line(&self) -> String {
        line_in_order(&self.to_json(), ORDER)
    }
}

impl Stats {
    /// The `tether connect --stats` line, fields in SPEC order.
    pub fn to_line(&self) -> String {
        line_in_order(&self.to_json(), STATS_ORDER)
    }
}

/// Counters kept as a Broadway-style producer keeps them (SPEC section 13).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connection attempts made.
    pub attempts: u64,
    /// Attempts that reached `welcome`.
    pub successes: u64,
    /// Ends by cause: the close code as text, `"connect"` for an attempt that could not
    /// open a socket, `"silent"` for a connection dropped by the client for silence.
    pub failures: BTreeMap<String, u64>,
    /// Connections after the first.
    pub reconnects: u64,
    /// Messages (channel and direct) delivered to the app.
    pub messages: u64,
    /// Messages dropped because their position was already delivered.
    pub duplicates: u64,
    /// Total time connected.
    pub connected_ms: u64,
}

impl Stats {
    /// `{"event":"stats",…}` as `tether connect --stats` prints it last.
    pub fn to_json(&self) -> Value {
        json!({
            "event": "stats",
            "attempts": self.attempts,
            "successes": self.successes,
            "failures": self.failures,
            "reconnects": self.reconnects,
            "messages": self.messages,
            "duplicates": self.duplicates,
            "connected_ms": self.connected_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_lines_omit_what_does_not_apply() {
        let mut s = StateChange::new(State::Reconnecting);
        s.attempt = Some(2);
        s.delay_ms = Some(340);
        s.will_reconnect = Some(true);
        assert_eq!(
            Event::State(s).to_json(),
            json!({"event": "state", "state": "reconnecting", "attempt": 2, "delay_ms": 340})
        );
        let mut c = StateChange::new(State::Closed);
        c.code = Some(4001);
        c.reason = Some("replaced".into());
        assert_eq!(
            Event::State(c).to_json(),
            json!({"event": "state", "state": "closed", "code": 4001, "reason": "replaced"})
        );
    }

    #[test]
    fn lines_put_event_first_in_spec_order() {
        let e = Event::Message {
            channel: "news".into(),
            id: "m1".into(),
            position: "e:1".into(),
            data: json!({"b": 1, "a": [2]}),
        };
        assert_eq!(
            e.to_line(),
            r#"{"event":"message","channel":"news","id":"m1","position":"e:1","data":{"a":[2],"b":1}}"#
        );
        let line = Stats::default().to_line();
        assert!(
            line.starts_with(r#"{"event":"stats","attempts":0,"successes":0,"failures":{}"#),
            "{line}"
        );
        assert_eq!(
            serde_json::from_str::<Value>(&line).ok(),
            Some(Stats::default().to_json())
        );
    }

    #[test]
    fn resume_reports_print_as_subscribed_lines() {
        let e = Event::Recovered {
            channel: "a".into(),
            position: "e:9".into(),
            recovered: false,
            missed: 0,
        };
        assert_eq!(
            e.to_json(),
            json!({"event": "subscribed", "channel": "a", "position": "e:9",
                   "recovered": false, "missed": 0})
        );
    }

    #[test]
    fn stats_line_has_every_counter() {
        let mut s = Stats::default();
        s.failures.insert("4002".into(), 3);
        s.messages = 5;
        assert_eq!(
            s.to_json(),
            json!({"event": "stats", "attempts": 0, "successes": 0, "failures": {"4002": 3},
                   "reconnects": 0, "messages": 5, "duplicates": 0, "connected_ms": 0})
        );
    }
}
