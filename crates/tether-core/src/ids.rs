//! Connection ids: `<node_id>-<boot id>-<n>`, unique in the cluster (node ids are
//! unique) and across restarts (the boot id is random per process start). A node id
//! may hold `-` (a pod's hostname); the boot id and `n` never do, so an id is read
//! from the right ([`parse_conn_id`]).

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

/// The parts of a connection id, read from the right: node id, boot id, `n`.
/// `None` for anything that is not one.
pub fn parse_conn_id(id: &str) -> Option<(&str, &str, u64)> {
    let mut parts = id.rsplitn(3, '-');
    let n = parts.next()?.parse().ok()?;
    let boot = parts.next().filter(|b| !b.is_empty())?;
    let node = parts.next().filter(|n| !n.is_empty())?;
    Some((node, boot, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_read_from_the_right_so_node_ids_may_hold_hyphens() {
        for node in ["n1", "tether-0", "web-7f9c-abcde.pod"] {
            let g = ConnIdGen::new(node);
            let (id, n) = g.next();
            let (got_node, boot, got_n) = parse_conn_id(&id).unwrap();
            assert_eq!((got_node, got_n), (node, n));
            assert_eq!(boot.len(), 8);
        }
        for bad in ["", "x", "a-b", "-b-1", "a--1", "a-b-x", "a-b-"] {
            assert_eq!(parse_conn_id(bad), None, "{bad}");
        }
    }
}
