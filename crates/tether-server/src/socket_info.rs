//! What the accept loop knows about a request's socket, put in the request's
//! extensions for the handler that admits it. A leaf: the listeners (plain and TLS)
//! make it, the transports read it.

use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::conn_io::Hijack;
use crate::pending::PendingSlot;

/// What the accept loop knows about a request's socket, put in its extensions.
#[derive(Clone, Debug)]
pub(crate) struct SocketInfo {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The socket's pending slot, taken by the transport that admits it.
    pub pending: Arc<Mutex<Option<PendingSlot>>>,
    /// Takes a plain HTTP/1 socket over from hyper (SSE); `None` under TLS.
    pub hijack: Option<Arc<Hijack>>,
    /// When the socket's handshake must be done: `limits.handshake_timeout_ms`
    /// after its accept (the request, the upgrade and a first-frame token).
    pub handshake_until: Instant,
}

impl SocketInfo {
    /// Takes the pending slot (the socket is being admitted).
    pub fn take_pending(&self) -> Option<PendingSlot> {
        self.pending.lock().take()
    }
    pub(crate) fn is_pending(&self) -> bool {
        self.pending.lock().is_some()
    }
}
