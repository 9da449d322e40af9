//! `GET /api/clients`: the clients online or lingering, one page at a time, in
//! client-id order (bytewise), so a client present for the whole walk is listed
//! exactly once. A page holds each shard's lock in turn, never two at once.

use std::collections::BinaryHeap;
use std::sync::Arc;

use serde::Serialize;

use super::{ClientState, Registry};

/// A client as `GET /api/clients` lists it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ClientSummary {
    /// Client id.
    pub client_id: String,
    /// `online` or `lingering`.
    pub state: &'static str,
    /// Its committed connections on this node.
    pub connections: usize,
}

impl Registry {
    /// The clients online or lingering whose id sorts after `after`, at most `limit`,
    /// in id order; with the id to continue after when more remain.
    pub fn clients_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<ClientSummary>, Option<String>) {
        if limit == 0 {
            return (Vec::new(), None);
        }
        // The `limit + 1` smallest ids seen so far; the largest on top.
        let mut page: BinaryHeap<(Arc<str>, &'static str, usize)> =
            BinaryHeap::with_capacity(limit + 1);
        for shard in self.inner.shards.iter() {
            let map = shard.lock();
            for (id, entry) in map.iter() {
                let state = match entry.state {
                    ClientState::Fresh => continue,
                    ClientState::Online => "online",
                    ClientState::Lingering => "lingering",
                };
                if after.is_some_and(|a| &**id <= a) {
                    continue;
                }
                if page.len() > limit {
                    if page.peek().is_some_and(|top| *id >= top.0) {
                        continue;
                    }
                    page.pop();
                }
                page.push((id.clone(), state, entry.conns.len()));
            }
        }
        let mut sorted = page.into_sorted_vec();
        let next = (sorted.len() > limit).then(|| sorted[limit - 1].0.to_string());
        sorted.truncate(limit);
        let clients = sorted
            .into_iter()
            .map(|(id, state, connections)| ClientSummary {
                client_id: id.to_string(),
                state,
                connections,
            })
            .collect();
        (clients, next)
    }
}
