//! One webhook batch, built once and sent as is on every attempt: the same id, the
//! same bytes, the same signature.

use bytes::Bytes;

use super::queue::Event;
use super::sign::signature;

/// A batch ready to POST.
#[derive(Debug, Clone)]
pub(crate) struct Batch {
    /// `X-Tether-Batch-Id`: a UUID.
    pub id: String,
    /// `{"events":[…]}`, each event the JSON `/api/events` shows.
    pub body: Bytes,
    /// `X-Tether-Signature`.
    pub signature: String,
    /// How many events it carries.
    pub events: usize,
}

impl Batch {
    pub(crate) fn new(events: &[Event], secret: &[u8]) -> Self {
        let mut body = String::from("{\"events\":[");
        for (i, ev) in events.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&ev.to_json());
        }
        body.push_str("]}");
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            signature: signature(secret, body.as_bytes()),
            body: Bytes::from(body),
            events: events.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tether_protocol::{EventType, LifecycleEvent};

    use super::*;

    #[test]
    fn body_is_the_events_in_order() {
        let ev = |client: &str| {
            Arc::new(LifecycleEvent {
                id: format!("id-{client}"),
                kind: EventType::ClientOnline,
                at: "t".into(),
                node_id: "n1".into(),
                client_id: Some(client.into()),
                conn_id: None,
                channel: None,
                code: None,
                reason: None,
                duration_ms: None,
                upstream: None,
            })
        };
        let events = [ev("a"), ev("b")];
        let b = Batch::new(&events, b"k");
        let v: serde_json::Value = serde_json::from_slice(&b.body).unwrap_or_default();
        assert_eq!(v["events"][0]["client_id"], "a");
        assert_eq!(v["events"][1]["client_id"], "b");
        assert_eq!(v["events"][1]["type"], "client.online");
        assert_eq!(b.events, 2);
        assert_eq!(b.signature, signature(b"k", &b.body));
    }
}
