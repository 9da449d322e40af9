//! One connection as the engine knows it: identity, counters, its close request, its
//! channel lists and its outbox. A leaf: it knows nothing of the registry or the hub
//! that hold it. The registry creates it at commit and lets go of it when the
//! connection's guard drops; the hub keeps it in the subscriber maps of its channels;
//! the connection task holds it for its whole life. It lives until the last `Arc`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tether_protocol::Closing;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::outbox::Outbox;

/// How a connection reaches the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// WebSocket on `/ws`.
    Ws,
    /// Server-Sent Events on `/sse`.
    Sse,
    /// A proxied connection (two sockets).
    Proxy,
}

impl Transport {
    /// The transport's name in the API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Ws => "ws",
            Transport::Sse => "sse",
            Transport::Proxy => "proxy",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// Sockets the connection uses, counted against `limits.max_connections`.
    pub(crate) fn weight(self) -> usize {
        match self {
            Transport::Proxy => 2,
            _ => 1,
        }
    }
}

/// What the transport knows about a connection at commit time.
#[derive(Clone, Debug)]
pub struct ConnSpec {
    /// The transport.
    pub transport: Transport,
    /// The client's address (resolved through trusted proxies).
    pub remote_addr: IpAddr,
    /// The `User-Agent` header.
    pub user_agent: Option<String>,
    /// Claims kept on the connection (`meta` of the token), or `null`.
    pub meta: Value,
    /// The upstream URL of a proxied connection.
    pub upstream: Option<String>,
}

/// One registered connection, shared by the registry and the connection's task.
#[derive(Debug)]
pub struct Connection {
    /// `<node>-<boot>-<n>`.
    id: String,
    /// `n`: the order of `/api/connections`.
    seq: u64,
    /// The owning client.
    client_id: Arc<str>,
    /// What the transport reported at commit.
    spec: ConnSpec,
    /// Wall-clock open time (for the API).
    opened_at: SystemTime,
    /// Monotonic open time (for idle and duration).
    started: Instant,
    /// Milliseconds after `started` of the last application frame.
    last_seen_ms: AtomicU64,
    /// Bytes received from the peer.
    bytes_in: AtomicU64,
    /// Bytes sent to the peer.
    bytes_out: AtomicU64,
    /// Set once a close was asked for (replace, kick, drain, ...).
    closing: AtomicBool,
    /// The first close asked for; the connection task announces it.
    close: Mutex<Option<Closing>>,
    /// Wakes the connection task when `close` is set.
    notify: Notify,
    /// Channels the connection is subscribed to (kept by the hub).
    pub(crate) channels: Mutex<Vec<Arc<str>>>,
    /// Channels whose subscription is still replaying history (kept by the hub).
    pub(crate) catching: Mutex<Vec<Arc<str>>>,
    /// The outbound queue.
    outbox: Outbox,
}

impl Connection {
    /// A connection just committed: open now, nothing seen, nothing subscribed.
    pub(crate) fn new(
        id: String,
        seq: u64,
        client_id: Arc<str>,
        spec: ConnSpec,
        outbox: Outbox,
    ) -> Self {
        Self {
            id,
            seq,
            client_id,
            spec,
            opened_at: SystemTime::now(),
            started: Instant::now(),
            last_seen_ms: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            close: Mutex::new(None),
            notify: Notify::new(),
            channels: Mutex::new(Vec::new()),
            catching: Mutex::new(Vec::new()),
            outbox,
        }
    }
    /// The connection id.
    pub fn id(&self) -> &str {
        &self.id
    }
    /// The client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }
    pub(crate) fn client_id_arc(&self) -> &Arc<str> {
        &self.client_id
    }
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }
    /// The outbound queue.
    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }
    pub(crate) fn outbox_capacity(&self) -> usize {
        self.outbox.capacity()
    }
    /// Whether some subscription is still replaying history.
    pub fn is_catching_up(&self) -> bool {
        !self.catching.lock().is_empty()
    }
    /// Subscribed channels.
    pub fn channels(&self) -> Vec<Arc<str>> {
        self.channels.lock().clone()
    }
    /// The transport.
    pub fn transport(&self) -> Transport {
        self.spec.transport
    }
    /// The client's address.
    pub fn remote_addr(&self) -> IpAddr {
        self.spec.remote_addr
    }
    /// The `meta` kept on the connection.
    pub fn meta(&self) -> &Value {
        &self.spec.meta
    }
    /// Whether a close was asked for.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }
    /// Whether the connection is subscribed to `channel`.
    pub fn has_channel(&self, channel: &str) -> bool {
        self.channels.lock().iter().any(|c| &**c == channel)
    }
    /// Milliseconds since the last application frame (or since open).
    pub fn idle_ms(&self) -> u64 {
        let now = self.started.elapsed().as_millis() as u64;
        now.saturating_sub(self.last_seen_ms.load(Ordering::Relaxed))
    }
    /// How long the connection has been open.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }
    /// Records an application frame from the peer (not a heartbeat).
    pub fn touch(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last_seen_ms.store(now, Ordering::Relaxed);
    }
    /// Counts bytes received.
    pub fn add_bytes_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }
    /// Counts bytes sent.
    pub fn add_bytes_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Asks the connection to close with `closing`. The first request wins; returns
    /// whether this one was taken.
    pub fn request_close(&self, closing: Closing) -> bool {
        {
            let mut slot = self.close.lock();
            if slot.is_some() {
                return false;
            }
            *slot = Some(closing);
        }
        self.closing.store(true, Ordering::Release);
        self.notify.notify_one();
        true
    }

    /// Marks the connection closing (it no longer counts as live) ahead of its close
    /// request ([`close_marked`](Self::close_marked)), inside the admission that
    /// replaces it.
    pub(crate) fn mark_closing(&self) {
        self.closing.store(true, Ordering::Release);
    }

    /// Asks a connection [marked closing](Self::mark_closing) to close with
    /// `closing`, unless another close was asked first; wakes its task either way.
    pub(crate) fn close_marked(&self, closing: Closing) {
        let mut slot = self.close.lock();
        if slot.is_none() {
            *slot = Some(closing);
        }
        drop(slot);
        self.notify.notify_one();
    }

    /// The upstream URL of a proxied connection.
    pub fn upstream(&self) -> Option<&str> {
        self.spec.upstream.as_deref()
    }

    /// Resolves with the close that was asked for. Only the connection's own task
    /// waits on this; it may be polled again after being dropped.
    pub async fn close_requested(&self) -> Closing {
        loop {
            if let Some(c) = self.close.lock().clone() {
                return c;
            }
            self.notify.notified().await;
        }
    }

    /// The connection as the API shows it.
    pub fn snapshot(&self, node_id: &str) -> ConnSnapshot {
        let last_seen = self.last_seen_ms.load(Ordering::Relaxed);
        ConnSnapshot {
            conn_id: self.id.clone(),
            client_id: self.client_id.to_string(),
            node_id: node_id.to_owned(),
            transport: self.spec.transport,
            state: if self.is_closing() { "closing" } else { "open" },
            remote_addr: self.spec.remote_addr.to_string(),
            user_agent: self.spec.user_agent.clone(),
            opened_at: crate::rfc3339(self.opened_at),
            last_seen_at: crate::rfc3339(self.opened_at + Duration::from_millis(last_seen)),
            idle_ms: self.idle_ms(),
            channels: self.channels.lock().iter().map(|c| c.to_string()).collect(),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            queued_bytes: self.outbox.queued_bytes() as u64,
            meta: self.spec.meta.clone(),
            upstream: self.spec.upstream.clone(),
        }
    }
}

/// A connection as `GET /api/connections` shows it (SPEC section 8's `conn`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ConnSnapshot {
    /// Connection id.
    pub conn_id: String,
    /// Client id.
    pub client_id: String,
    /// Node id.
    pub node_id: String,
    /// Transport.
    pub transport: Transport,
    /// `open` or `closing`.
    pub state: &'static str,
    /// The client's address.
    pub remote_addr: String,
    /// `User-Agent`.
    pub user_agent: Option<String>,
    /// When it opened.
    pub opened_at: String,
    /// Its last application frame.
    pub last_seen_at: String,
    /// Milliseconds since then.
    pub idle_ms: u64,
    /// Subscribed channels.
    pub channels: Vec<String>,
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Bytes queued.
    pub queued_bytes: u64,
    /// Token `meta`.
    pub meta: Value,
    /// Proxy upstream.
    pub upstream: Option<String>,
}
