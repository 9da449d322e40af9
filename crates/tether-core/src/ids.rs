//! Connection ids: `<node_id>-<boot id>-<n>`, unique in the cluster (node ids are
//! unique) and across restarts (the boot id is random per process start).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Hands out connection ids and their sequence numbers. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ConnIdGen {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// This node's id, from config.
    node_id: Arc<str>,
    /// Random per process start.
    boot_id: String,
    /// The next sequence number; also the order of `/api/connections`.
    next: AtomicU64,
}

impl ConnIdGen {
    /// A generator for `node_id` with a fresh boot id.
    pub fn new(node_id: &str) -> Self {
        Self {
            inner: Arc::new(Inner {
                node_id: node_id.into(),
                boot_id: format!("{:08x}", fastrand::u32(..)),
                next: AtomicU64::new(1),
            }),
        }
    }

    /// The node id.
    pub fn node_id(&self) -> &Arc<str> {
        &self.inner.node_id
    }

    /// The next id and its sequence number.
    pub fn next(&self) -> (String, u64) {
        let n = self.inner.next.fetch_add(1, Ordering::Relaxed);
        (
            format!("{}-{}-{}", self.inner.node_id, self.inner.boot_id, n),
            n,
        )
    }
}
