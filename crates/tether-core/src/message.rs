//! Messages as they travel: encoded once, shared by every recipient (and, for a
//! channel message, by the channel's history). A leaf: the hub makes them, outboxes
//! queue them, transports write their bytes. Each lives until its last `Arc`.

use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;

/// One published message, encoded once and shared by every recipient and history.
#[derive(Debug)]
pub struct Published {
    /// The channel.
    pub channel: Arc<str>,
    /// Message id.
    pub id: String,
    /// Offset in the channel's epoch.
    pub offset: u64,
    /// `"<epoch>:<offset>"`.
    pub position: String,
    /// The raw JSON `data`.
    pub data: Box<str>,
    /// The whole WebSocket text frame (header + `json`), written as is to every
    /// subscriber.
    pub frame: Bytes,
    /// The `message` frame's JSON text (a slice of `frame`, no copy).
    pub json: Bytes,
    /// The SSE event body after the per-connection `id:` line.
    pub sse: Bytes,
    /// When it was published (for `history.ttl_ms`).
    pub at: Instant,
}

/// A direct message (`/api/send`), encoded once for every connection it goes to.
#[derive(Debug)]
pub struct Direct {
    /// The whole WebSocket text frame.
    pub frame: Bytes,
    /// The SSE event body after the per-connection `id:` line.
    pub sse: Bytes,
}
