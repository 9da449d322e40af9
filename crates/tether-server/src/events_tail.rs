//! `/api/events` framing and its end: each lifecycle event as one SSE frame, and the
//! tail a stream sends when told to close, so that the events the drain emitted
//! (every `connection.closed` and `client.offline`) reach the operator before the
//! stream ends.

use axum::body::Bytes;
use tether_protocol::LifecycleEvent;
use tokio::sync::broadcast::error::TryRecvError;
use tokio::sync::broadcast::Receiver;

/// One event as an SSE frame: `id: <event id>`, `event: <type>`, `data: <JSON>`.
pub(crate) fn frame(ev: &LifecycleEvent) -> String {
    format!(
        "id: {}\nevent: {}\ndata: {}\n\n",
        ev.id,
        ev.kind.as_str(),
        ev.to_json()
    )
}

/// Every event already on the bus for `rx`, as one chunk; `None` when there is none
/// left (the stream may end).
pub(crate) fn tail(rx: &mut Receiver<std::sync::Arc<LifecycleEvent>>) -> Option<Bytes> {
    let mut out = String::new();
    loop {
        match rx.try_recv() {
            Ok(ev) => out.push_str(&frame(&ev)),
            Err(TryRecvError::Lagged(n)) => out.push_str(&format!(": lagged {n}\n\n")),
            Err(TryRecvError::Empty | TryRecvError::Closed) => break,
        }
    }
    (!out.is_empty()).then(|| Bytes::from(out))
}
