//! Cluster mode's link to Redis, made from `[broker]` (SPEC section 10). With the
//! default `kind = "memory"` there is none and nothing here runs.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tether_core::{ClientLimitPolicy, Registry};
use tether_redis::{
    ClusterRegistry, ClusterSettings, ForgetNode, Link, LinkConfig, LinkError, RedisBroker,
    Topology,
};

use crate::config::{BrokerKind, BrokerSection, Config, OnUnavailable};

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

/// The cluster registry over `link`: puts `registry` in cluster mode; a dead node's
/// presence is forgotten by `broker`.
pub(crate) fn registry(
    cfg: &Config,
    link: &Arc<Link>,
    registry: &Registry,
    broker: Option<&RedisBroker>,
) -> Arc<ClusterRegistry> {
    let command_timeout = Duration::from_millis(cfg.broker.command_timeout_ms.get());
    let cluster = ClusterRegistry::new(
        link.clone(),
        registry.clone(),
        ClusterSettings {
            max_connections_per_client: cfg.clients.max_connections_per_client.get() as usize,
            replace_oldest: cfg.clients.on_client_limit == ClientLimitPolicy::ReplaceOldest,
            offline_grace: Duration::from_millis(cfg.clients.offline_grace_ms),
            node_ttl: Duration::from_millis(cfg.broker.node_ttl_ms.get()),
            admit_local: cfg.broker.on_unavailable == OnUnavailable::AdmitLocal,
            reply_timeout: command_timeout * 2,
        },
    );
    if let Some(b) = broker {
        cluster.on_node_dead(Arc::new(BrokerForgets(b.clone())));
    }
    cluster
}

/// The reaper's hook: the broker removes a dead node's presence.
#[derive(Debug)]
struct BrokerForgets(RedisBroker);

impl ForgetNode for BrokerForgets {
    fn forget_node(&self, node_id: String) -> Pin<Box<dyn Future<Output = ()> + Send>> {
        let broker = self.0.clone();
        Box::pin(async move {
            match broker.forget_node(&node_id).await {
                Ok(n) => tracing::info!(node_id, presence = n, "dead node's presence removed"),
                Err(e) => tracing::warn!(
                    node_id,
                    error = e.message(),
                    "dead node's presence not removed"
                ),
            }
        })
    }
}
