//! SSE tombstones (SPEC section 6): the conn ids of streams closed with
//! `reconnect: false`, each kept `clients.tombstone_ms`, so a browser's automatic
//! reconnect with that stream's cursor is answered `204` and stops. Bounded in
//! number; pruned once a second by the server's cleanup. A leaf.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Most tombstones kept; the oldest go first beyond it.
const MAX_TOMBSTONES: usize = 100_000;

/// Conn ids of SSE streams closed with `reconnect: false`, each until its expiry.
#[derive(Debug)]
pub struct Tombstones {
    ttl: Duration,
    map: Mutex<HashMap<String, Instant>>,
}

impl Tombstones {
    pub(crate) fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }
    pub(crate) fn add(&self, conn_id: &str) {
        if self.ttl.is_zero() {
            return;
        }
        let mut map = self.map.lock();
        if map.len() >= MAX_TOMBSTONES {
            let now = Instant::now();
            map.retain(|_, exp| *exp > now);
            if map.len() >= MAX_TOMBSTONES {
                if let Some(k) = map.iter().min_by_key(|(_, e)| **e).map(|(k, _)| k.clone()) {
                    map.remove(&k);
                }
            }
        }
        map.insert(conn_id.to_owned(), Instant::now() + self.ttl);
    }
    pub(crate) fn contains(&self, conn_id: &str) -> bool {
        self.map
            .lock()
            .get(conn_id)
            .is_some_and(|exp| *exp > Instant::now())
    }
    /// Drops expired tombstones.
    pub(crate) fn prune(&self) {
        let now = Instant::now();
        self.map.lock().retain(|_, exp| *exp > now);
    }
}
