//! Cluster mode (SPEC section 10): Tether's broker and client registry on Redis or a
//! Redis Cluster, so that several `tether serve` nodes act as one gateway.
//!
//! - [`link`]: the node's connections to Redis (a command client with per-command
//!   timeouts and a reconnect policy, a subscriber client that re-subscribes after a
//!   reconnect) and whether Redis is reachable now.
//! - [`keys`]: every key and pub/sub channel name, with the hash tags that keep a
//!   channel's keys (and a client's) on one Redis Cluster shard.
//! - [`registry`]: the cluster's client registry (limits, duplicate policy,
//!   online/offline, node liveness, control channel, the API's cluster views).

pub mod broker;
pub mod keys;
pub mod link;
pub mod registry;
#[cfg(feature = "testing")]
pub mod testing;

pub use broker::RedisBroker;
pub use keys::Keys;
pub use link::{Link, LinkConfig, LinkError, Topology};
pub use registry::{ClusterRegistry, ClusterSettings, ForgetNode, RegistryError};
