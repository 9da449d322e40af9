//! Cluster mode's link to Redis, made from `[broker]` (SPEC section 10). With the
//! default `kind = "memory"` there is none and nothing here runs.

use std::sync::Arc;
use std::time::Duration;

use tether_redis::{Link, LinkConfig, LinkError, Topology};

use crate::config::{BrokerKind, BrokerSection};

/// The link `[broker]` asks for: `None` for the in-memory broker. Built, not yet
/// connected (the server starts it, and it connects in the background).
pub(crate) fn link(cfg: &BrokerSection) -> Result<Option<Arc<Link>>, LinkError> {
    let urls = || {
        cfg.urls()
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let topology = match cfg.kind {
        BrokerKind::Memory => return Ok(None),
        BrokerKind::Redis => Topology::Single(urls().into_iter().next().unwrap_or_default()),
        BrokerKind::RedisCluster => Topology::Cluster(urls()),
    };
    Link::new(&LinkConfig {
        topology,
        command_timeout: Duration::from_millis(cfg.command_timeout_ms.get()),
        prefix: cfg.prefix.clone(),
    })
    .map(Some)
}
