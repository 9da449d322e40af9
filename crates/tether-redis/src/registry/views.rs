//! What the API asks of the cluster: `/api/stats`'s `cluster` figures (cached for
//! two seconds), `/api/clients` (paged by client id from the global `clients`
//! index), `/api/clients/{id}` and `/api/connections` (live fields from the owning
//! nodes over their control channels), and `/api/disconnect` on every node.
//!
//! A node that does not answer within the reply timeout: its connections appear in
//! `/api/clients/{id}` with what Redis knows (`conn_id`, `client_id`, `node_id`,
//! `transport`, `opened_at`) and `"state":"unknown"`; `/api/connections` skips it and
//! names it in `unreachable`; `/api/disconnect` counts only what was acknowledged.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use fred::interfaces::SortedSetsInterface;
use fred::interfaces::{HashesInterface, KeysInterface, LuaInterface, SetsInterface};
use serde::Serialize;
use serde_json::{json, Value};
use tether_core::{Filter, Selector};
use tether_protocol::Closing;

use super::{ClusterRegistry, RegistryError};

/// How long `/api/stats`'s cluster figures are reused.
const STATS_MAX_AGE: Duration = Duration::from_secs(2);

/// `/api/stats`'s `cluster` object.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct ClusterStats {
    /// Live nodes.
    pub nodes: usize,
    /// Connections on every node.
    pub connections: usize,
    /// Clients online or lingering.
    pub clients: usize,
}

/// One row of `/api/clients`.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct ClientRow {
    /// Client id.
    pub client_id: String,
    /// `online` or `lingering`.
    pub state: &'static str,
    /// Its connections on every node.
    pub connections: usize,
}

/// A page of `/api/connections`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ConnPage {
    /// The connections.
    pub connections: Vec<Value>,
    /// The token of the next page.
    pub next_page: Option<String>,
    /// Nodes that did not answer in time (absent when every node answered).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<String>,
}

/// One page of the global clients index, with each client's state and count.
const CLIENTS_PAGE: &str = r#"
local ids = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], '+', 'LIMIT', 0, tonumber(ARGV[2]))
return ids
"#;

impl ClusterRegistry {
    /// The cluster's figures, at most two seconds old.
    pub async fn stats(&self) -> Result<ClusterStats, RegistryError> {
        if let Some((at, s)) = *self.stats.lock() {
            if at.elapsed() < STATS_MAX_AGE {
                return Ok(s);
            }
        }
        self.reachable()?;
        let keys = self.link.keys();
        let members = keys.global("nodes");
        let nodes: Vec<String> = self.on(&members).smembers(&members).await?;
        let mut connections = 0;
        for node in &nodes {
            let record = keys.node_key(node, "conns");
            let n: usize = self.on(&record).hlen(&record).await?;
            connections += n;
        }
        let index = keys.global("clients");
        let clients: usize = self.on(&index).zcard(&index).await?;
        let s = ClusterStats {
            nodes: nodes.len(),
            connections,
            clients,
        };
        *self.stats.lock() = Some((Instant::now(), s));
        Ok(s)
    }

    /// Clients after `after` (by id), at most `limit`, and where the next page starts.
    pub async fn clients(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<ClientRow>, Option<String>), RegistryError> {
        self.reachable()?;
        let keys = self.link.keys();
        let min = after.map_or_else(|| "-".to_owned(), |a| format!("({a}"));
        let ids: Vec<String> = self
            .on(&keys.global("clients"))
            .eval(
                CLIENTS_PAGE,
                vec![keys.global("clients")],
                vec![min, (limit + 1).to_string()],
            )
            .await?;
        let mut rows = Vec::new();
        for id in ids.iter().take(limit) {
            let c = self.on_client(id);
            let state: Option<String> = c.get(keys.client_key(id, "state")).await?;
            let Some(state) = state else {
                // Offline since (the index is tidied lazily).
                let index = keys.global("clients");
                let _: () = self.on(&index).zrem(&index, id).await?;
                continue;
            };
            let n: usize = c.zcard(keys.client_key(id, "conns")).await?;
            rows.push(ClientRow {
                client_id: id.clone(),
                state: api_state(&state),
                connections: n,
            });
        }
        let next = (ids.len() > limit).then(|| ids[limit - 1].clone());
        Ok((rows, next))
    }

    /// One client: its state and every connection, or `None` when it is offline.
    pub async fn client(&self, id: &str) -> Result<Option<Value>, RegistryError> {
        self.reachable()?;
        let c = self.on_client(id);
        let keys = self.link.keys();
        let state: Option<String> = c.get(keys.client_key(id, "state")).await?;
        let Some(state) = state else { return Ok(None) };
        let info: HashMap<String, String> = c.hgetall(keys.client_key(id, "info")).await?;
        let mut by_node: BTreeMap<String, Vec<(String, Vec<String>)>> = BTreeMap::new();
        for (conn, v) in info.into_iter().filter(|(k, _)| !k.starts_with('_')) {
            let parts: Vec<String> = v.split(' ').map(str::to_owned).collect();
            let node = parts.get(1).cloned().unwrap_or_default();
            by_node.entry(node).or_default().push((conn, parts));
        }
        let mut conns = Vec::new();
        for (node, held) in by_node {
            let listed = self
                .list_on(&node, Some(id), &Filter::default(), 0, usize::MAX / 2)
                .await;
            match listed {
                Ok((list, _)) => conns.extend(list),
                Err(e) => {
                    tracing::debug!(node, error = %e, "node did not list its connections");
                    conns.extend(
                        held.into_iter()
                            .map(|(conn, p)| unknown(id, &node, &conn, &p)),
                    );
                }
            }
        }
        let state = api_state(&state);
        Ok(Some(
            json!({"client_id": id, "state": state, "connections": conns}),
        ))
    }

    /// A page of connections across nodes (in node id order, then each node's own
    /// order). The page token is `<node>~<seq>`.
    pub async fn connections(
        &self,
        client_id: Option<&str>,
        filter: &Filter,
        page: Option<&str>,
        limit: usize,
    ) -> Result<ConnPage, RegistryError> {
        self.reachable()?;
        let (start, mut after) = match page.map(|p| p.rsplit_once('~')) {
            None => (None, 0),
            Some(Some((node, seq))) if !node.is_empty() => {
                let seq = seq.parse().map_err(|_| RegistryError::BadPage)?;
                (Some(node.to_owned()), seq)
            }
            Some(_) => return Err(RegistryError::BadPage),
        };
        let members = self.link.keys().global("nodes");
        let mut nodes: Vec<String> = self.on(&members).smembers(&members).await?;
        nodes.sort();
        let mut out = ConnPage::default();
        for node in nodes
            .iter()
            .filter(|n| start.as_ref().is_none_or(|s| *n >= s))
        {
            if start.as_ref().is_some_and(|s| s != node) {
                after = 0;
            }
            let want = limit - out.connections.len();
            match self.list_on(node, client_id, filter, after, want).await {
                Ok((list, next)) => {
                    out.connections.extend(list);
                    if let Some(n) = next {
                        out.next_page = Some(format!("{node}~{n}"));
                        return Ok(out);
                    }
                }
                Err(_) => out.unreachable.push(node.clone()),
            }
            if out.connections.len() >= limit {
                out.next_page = Some(format!("{node}~{}", u64::MAX));
                return Ok(out);
            }
        }
        Ok(out)
    }

    /// `node`'s connections: read here for this node, asked for over its channel.
    async fn list_on(
        &self,
        node: &str,
        client_id: Option<&str>,
        filter: &Filter,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<Value>, Option<u64>), RegistryError> {
        if node == self.node_id {
            let (list, next) = self.registry.list(client_id, filter, after, limit);
            return Ok((list.iter().map(|c| json!(c)).collect(), next));
        }
        let req = self.control.list_request(
            &self.node_id,
            client_id.map(str::to_owned),
            filter.clone(),
            after,
            limit,
        );
        let reply = self
            .control
            .ask(&self.link, node, req, self.settings.reply_timeout)
            .await?;
        Ok((reply.connections, reply.next))
    }

    /// Closes the selected connections on every node (a `conn_id` goes to its own
    /// node only); returns how many were closed, counting only acknowledged nodes.
    pub async fn disconnect(&self, selector: &Selector, closing: &Closing) -> usize {
        let target = selector
            .conn_id
            .as_deref()
            .and_then(tether_core::parse_conn_id)
            .map(|(node, _, _)| node.to_owned());
        let mut closed = 0;
        if target.as_ref().is_none_or(|n| *n == self.node_id) {
            closed += self.registry.disconnect(selector, closing);
        }
        let nodes = match target {
            Some(n) if n == self.node_id => Vec::new(),
            Some(n) => vec![n],
            None => self.other_nodes("disconnect").await,
        };
        let replies = self
            .ask_each(&nodes, || {
                self.control.close_request(&self.node_id, selector, closing)
            })
            .await;
        closed + replies.iter().map(|r| r.closed).sum::<usize>()
    }

    /// Queues a direct message for every connection of `client_id` on every node;
    /// returns how many took it, counting only acknowledged nodes.
    pub async fn send(&self, client_id: &str, data: &str) -> usize {
        let local = self.registry.send(client_id, data);
        let nodes = self.other_nodes("send").await;
        let replies = self
            .ask_each(&nodes, || {
                self.control.send_request(&self.node_id, client_id, data)
            })
            .await;
        local + replies.iter().map(|r| r.sent).sum::<usize>()
    }

    /// Every node but this one (empty, and logged, when Redis cannot say).
    async fn other_nodes(&self, what: &str) -> Vec<String> {
        let members = self.link.keys().global("nodes");
        let nodes: Result<Vec<String>, _> = self.on(&members).smembers(&members).await;
        match nodes {
            Ok(n) => n.into_iter().filter(|n| *n != self.node_id).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "{what}: node list unavailable");
                Vec::new()
            }
        }
    }

    /// Asks each of `nodes` (a request made by `request` each), concurrently; the
    /// replies of those that answered in time (the others are logged).
    async fn ask_each(
        &self,
        nodes: &[String],
        request: impl Fn() -> super::control::Request,
    ) -> Vec<super::control::Reply> {
        let asks = nodes.iter().map(|node| {
            self.control
                .ask(&self.link, node, request(), self.settings.reply_timeout)
        });
        let mut replies = Vec::new();
        for (node, reply) in nodes.iter().zip(futures_util::future::join_all(asks).await) {
            match reply {
                Ok(r) => replies.push(r),
                Err(e) => tracing::warn!(%node, error = %e, "a node did not answer"),
            }
        }
        replies
    }
}

/// A connection whose node did not answer: what Redis knows of it.
fn unknown(client: &str, node: &str, conn: &str, parts: &[String]) -> Value {
    let opened_ms: u64 = parts.get(3).and_then(|p| p.parse().ok()).unwrap_or(0);
    let opened = std::time::UNIX_EPOCH + Duration::from_millis(opened_ms);
    json!({
        "conn_id": conn,
        "client_id": client,
        "node_id": node,
        "transport": parts.get(2),
        "state": "unknown",
        "opened_at": tether_core::rfc3339(opened),
    })
}

/// A client's state as the API shows it: `linger:<token>` is `lingering`; `online`
/// and `pending` (connected, its announcement owed after an outage) are `online`.
fn api_state(state: &str) -> &'static str {
    if state.starts_with("linger:") {
        "lingering"
    } else {
        "online"
    }
}
