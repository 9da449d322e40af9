//! The per-node control channel (`node_control(<node>)`, plain pub/sub): another
//! node asks this one to close some of its connections (a replace, a kick, an API
//! disconnect) or to list them (`/api/connections`, `/api/clients/{id}`), and gets a
//! reply on its own control channel, matched by request id. A request that gets no
//! reply within the timeout is an error for the asker; nothing is retried.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tether_core::{Filter, Selector};
use tether_protocol::{CloseCode, Closing};
use tokio::sync::{broadcast, oneshot};

use super::{ClusterRegistry, RegistryError};
use crate::link::Link;

/// What goes over a control channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Wire {
    Request(Request),
    Reply(Reply),
}

/// A request to a node.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Request {
    #[serde(default)]
    req: u64,
    #[serde(default)]
    from: String,
    ask: Ask,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Ask {
    /// Close the selected connections with this code and reason.
    Close {
        client_id: Option<String>,
        conn_id: Option<String>,
        filter: Filter,
        all: bool,
        code: u16,
        reason: String,
        reconnect: bool,
    },
    /// Queue a direct message for every connection of a client (`/api/send`).
    Send { client_id: String, data: String },
    /// List connections (as `Registry::list`).
    List {
        client_id: Option<String>,
        filter: Filter,
        after: u64,
        limit: usize,
    },
}

/// A node's answer.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Reply {
    req: u64,
    /// How many connections it asked to close.
    #[serde(default)]
    pub(crate) closed: usize,
    /// How many connections took a direct message.
    #[serde(default)]
    pub(crate) sent: usize,
    /// The connections listed.
    #[serde(default)]
    pub(crate) connections: Vec<serde_json::Value>,
    /// Where its listing continues.
    #[serde(default)]
    pub(crate) next: Option<u64>,
}

/// Requests waiting for their reply.
#[derive(Clone, Debug, Default)]
pub(crate) struct Pending {
    next: Arc<AtomicU64>,
    waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>,
}

impl Pending {
    /// A close request for `selector`.
    pub(crate) fn close_request(&self, from: &str, selector: &Selector, c: &Closing) -> Request {
        Request {
            req: 0,
            from: from.to_owned(),
            ask: Ask::Close {
                client_id: selector.client_id.clone(),
                conn_id: selector.conn_id.clone(),
                filter: selector.filter.clone(),
                all: selector.all,
                code: c.code.0,
                reason: c.reason.clone(),
                reconnect: c.reconnect,
            },
        }
    }

    /// A direct-message request for `client_id`.
    pub(crate) fn send_request(&self, from: &str, client_id: &str, data: &str) -> Request {
        Request {
            req: 0,
            from: from.to_owned(),
            ask: Ask::Send {
                client_id: client_id.to_owned(),
                data: data.to_owned(),
            },
        }
    }

    /// A listing request.
    pub(crate) fn list_request(
        &self,
        from: &str,
        client_id: Option<String>,
        filter: Filter,
        after: u64,
        limit: usize,
    ) -> Request {
        Request {
            req: 0,
            from: from.to_owned(),
            ask: Ask::List {
                client_id,
                filter,
                after,
                limit,
            },
        }
    }

    /// Sends `request` to `node` and waits up to `wait` for its reply.
    pub(crate) async fn ask(
        &self,
        link: &Link,
        node: &str,
        mut request: Request,
        wait: Duration,
    ) -> Result<Reply, RegistryError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        request.req = id;
        let text = serde_json::to_string(&Wire::Request(request))?;
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().insert(id, tx);
        let to = link.keys().node_control(node);
        let sent: Result<i64, _> = link.commands_for(&to).publish(&to, text).await;
        let answer = match sent {
            // No subscriber: the node is not listening. (In a Redis Cluster the count
            // covers only the shard that took the PUBLISH, so it proves nothing.)
            Ok(0) if !link.is_cluster() => Err(RegistryError::NoReply(node.to_owned())),
            Ok(_) => match tokio::time::timeout(wait, rx).await {
                Ok(Ok(reply)) => Ok(reply),
                _ => Err(RegistryError::NoReply(node.to_owned())),
            },
            Err(e) => Err(RegistryError::Redis(e)),
        };
        self.waiting.lock().remove(&id);
        answer
    }

    fn answered(&self, reply: Reply) {
        if let Some(tx) = self.waiting.lock().remove(&reply.req) {
            let _ = tx.send(reply);
        }
    }
}

/// Listens on this node's control channel until the registry stops, on a subscriber
/// connection of its own: a blip on it does not make the node's link (and so its
/// broker) look down, and the broker's channel traffic does not queue control
/// messages behind it. On a Redis Cluster the connection is to the primary that owns
/// the channel's slot (the node's own record's shard), and is made again when that
/// owner changes (a failover): a dead shard elsewhere does not stall it.
pub(super) async fn listen(cluster: Arc<ClusterRegistry>) {
    let channel = cluster.link.keys().node_control(&cluster.node_id);
    while !cluster.stop.is_cancelled() {
        let Some((sub, owner)) = cluster.link.own_subscriber_for(&channel) else {
            tokio::select! {
                _ = cluster.stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
            }
        };
        let connection = sub.connect();
        let resubscribe = sub.manage_subscriptions();
        let mut rx = sub.message_rx();
        if subscribe(&cluster, &sub, &channel).await {
            serve(&cluster, &mut rx, &channel, owner.as_deref()).await;
        }
        let _ = sub.quit().await;
        resubscribe.abort();
        let _ = connection.await;
    }
}

/// Subscribes `channel` alone (the clone may carry the broker's channels), retrying
/// until it takes; false when the registry stopped first.
async fn subscribe(cluster: &ClusterRegistry, sub: &SubscriberClient, channel: &str) -> bool {
    loop {
        let attempt = async {
            sub.wait_for_connect().await?;
            sub.unsubscribe_all().await?;
            sub.subscribe(channel.to_owned()).await
        };
        tokio::select! {
            _ = cluster.stop.cancelled() => return false,
            r = attempt => match r {
                Ok(()) => return true,
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            },
        }
    }
}

/// Answers requests and takes replies until the registry stops, or (on a Redis
/// Cluster) until the channel's slot has another owner than `owner`.
async fn serve(
    cluster: &ClusterRegistry,
    rx: &mut broadcast::Receiver<fred::types::Message>,
    channel: &str,
    owner: Option<&str>,
) {
    let mut check = tokio::time::interval(Duration::from_secs(1));
    loop {
        let msg = tokio::select! {
            _ = cluster.stop.cancelled() => return,
            _ = check.tick() => {
                let now = cluster.link.owner_of(channel);
                if owner.is_some() && now.is_some() && now.as_deref() != owner {
                    tracing::info!(channel, "control channel moved: subscribing on its new primary");
                    return;
                }
                continue;
            }
            m = rx.recv() => m,
        };
        match msg {
            Ok(m) if *m.channel == *channel => {
                if let Some(text) = m.value.as_string() {
                    on_message(cluster, &text).await;
                }
            }
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn on_message(cluster: &ClusterRegistry, text: &str) {
    match serde_json::from_str::<Wire>(text) {
        Ok(Wire::Reply(reply)) => cluster.control.answered(reply),
        Ok(Wire::Request(request)) => {
            let reply = answer(cluster, request.ask, request.req);
            let Ok(text) = serde_json::to_string(&Wire::Reply(reply)) else {
                return;
            };
            let to = cluster.link.keys().node_control(&request.from);
            let sent: Result<i64, _> = cluster.on(&to).publish(&to, text).await;
            if let Err(e) = sent {
                tracing::warn!(error = %e, "control reply not sent");
            }
        }
        Err(e) => tracing::warn!(error = %e, "bad control message"),
    }
}

/// Carries out a request on this node's registry.
fn answer(cluster: &ClusterRegistry, ask: Ask, req: u64) -> Reply {
    match ask {
        Ask::Close {
            client_id,
            conn_id,
            filter,
            all,
            code,
            reason,
            reconnect,
        } => {
            let selector = Selector {
                client_id,
                conn_id,
                filter,
                all,
            };
            let closing = Closing {
                code: CloseCode(code),
                reason,
                reconnect,
                retry_ms: None,
            };
            Reply {
                req,
                closed: cluster.registry.disconnect(&selector, &closing),
                ..Default::default()
            }
        }
        Ask::Send { client_id, data } => Reply {
            req,
            sent: cluster.registry.send(&client_id, &data),
            ..Default::default()
        },
        Ask::List {
            client_id,
            filter,
            after,
            limit,
        } => {
            let (connections, next) =
                cluster
                    .registry
                    .list(client_id.as_deref(), &filter, after, limit);
            Reply {
                req,
                connections: connections.iter().map(|c| serde_json::json!(c)).collect(),
                next,
                ..Default::default()
            }
        }
    }
}
