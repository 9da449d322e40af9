//! What a connection's driver uses of the server, and nothing else: its timing
//! settings, the broker (the door to channels), the hard-stop token, token
//! verification (for `refresh`), the SSE tombstones and the node's id. Built once
//! by `App::new` and shared by every connection as one `Arc`.

use std::sync::Arc;
use std::time::Duration;

use tether_core::Broker;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::config::Config;
use crate::tombstones::Tombstones;

use super::{Deadlines, Transport};

/// The driver's view of the server.
#[derive(Debug)]
pub(crate) struct Ctx {
    /// `heartbeat.interval_ms`.
    pub(crate) interval: Duration,
    /// `heartbeat.timeout_ms`.
    pub(crate) timeout: Duration,
    /// `limits.max_connection_lifetime_ms` (0 = off).
    pub(crate) lifetime_ms: u64,
    /// `limits.max_inbound_per_sec`.
    pub(crate) max_inbound_per_sec: u64,
    /// Publish, subscribe, catch-up: every channel access.
    pub(crate) broker: Arc<dyn Broker>,
    /// The shutdown deadline: everything still open is closed at once.
    pub(crate) hard_stop: CancellationToken,
    /// Token verification (`refresh`) and expiry.
    pub(crate) auth: Arc<Auth>,
    /// SSE streams closed for good.
    pub(crate) tombstones: Arc<Tombstones>,
    /// This node's id (`welcome`).
    pub(crate) node_id: Arc<str>,
}

impl Ctx {
    /// The deadlines of a connection carried by `T` whose handshake must be done by
    /// `handshake_until` (`limits.handshake_timeout_ms` after its socket's accept).
    pub(crate) fn deadlines<T: Transport>(&self, handshake_until: Instant) -> Deadlines {
        Deadlines::handshake(
            handshake_until,
            self.interval,
            self.timeout,
            T::ANSWERS_PINGS,
        )
    }

    /// The driver's view of a server configured by `cfg`.
    pub(crate) fn new(
        cfg: &Config,
        broker: Arc<dyn Broker>,
        hard_stop: CancellationToken,
        auth: Arc<Auth>,
        tombstones: Arc<Tombstones>,
        node_id: Arc<str>,
    ) -> Self {
        Self {
            interval: Duration::from_millis(cfg.heartbeat.interval_ms.get()),
            timeout: Duration::from_millis(cfg.heartbeat.timeout_ms.get()),
            lifetime_ms: cfg.limits.max_connection_lifetime_ms,
            max_inbound_per_sec: cfg.limits.max_inbound_per_sec.get(),
            broker,
            hard_stop,
            auth,
            tombstones,
            node_id,
        }
    }
}
