//! Node liveness: the heartbeat (`node_key(id, "alive")`, `PX node_ttl`, renewed every
//! `node_ttl / 3`, and membership of the global `nodes` set), the reaper (a node whose
//! alive key is gone is claimed with `SET NX` by one survivor — one that has itself
//! been connected for `node_ttl` — which removes its connections from their clients,
//! fires `client.offline` for clients left with none, and has the broker forget the
//! node), and re-registration of this node's live connections after every reconnect
//! or failed write.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use fred::interfaces::{HashesInterface, KeysInterface, SetsInterface, SortedSetsInterface};
use fred::types::{Expiration, SetOptions};
use tether_core::{Connection, Selector};
use tether_protocol::{CloseCode, Closing};

use super::outage::Unsettled;
use super::scripts::{self, Mode, Released};
use super::{ClusterRegistry, RegistryError};

/// Runs until the registry stops: follows the link's state, beats, reaps, resyncs.
pub(super) async fn run(cluster: Arc<ClusterRegistry>) {
    let mut up = cluster.link.watch_up();
    let every = cluster.settings.node_ttl / 3;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Up already (before this task subscribed): no change will announce it.
    if *up.borrow_and_update() {
        *cluster.connected_since.lock() = Some(Instant::now());
        cluster.dirty.store(true, Ordering::Release);
    }
    loop {
        tokio::select! {
            _ = cluster.stop.cancelled() => return,
            changed = up.changed() => {
                if changed.is_err() {
                    return;
                }
                let is_up = *up.borrow_and_update();
                *cluster.connected_since.lock() = is_up.then(Instant::now);
                cluster.synced.store(false, Ordering::Release);
                if is_up {
                    // Back (or first connected): beat at once, then re-register.
                    cluster.dirty.store(true, Ordering::Release);
                    tick.reset_immediately();
                }
            }
            _ = tick.tick() => cluster.beat_and_reap().await,
        }
    }
}

impl ClusterRegistry {
    async fn beat_and_reap(self: &Arc<Self>) {
        if !self.link.is_up() {
            return;
        }
        if let Err(e) = self.beat().await {
            tracing::warn!(error = %e, "heartbeat failed");
            return;
        }
        if self.dirty.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.resync().await {
                tracing::warn!(error = %e, "re-registration failed; retrying");
                self.dirty.store(true, Ordering::Release);
                return;
            }
            self.synced.store(true, Ordering::Release);
        }
        self.pay_owed(false).await;
        if self.connected_for_ttl() {
            if let Err(e) = self.reap().await {
                tracing::warn!(error = %e, "reaper failed");
            }
        }
    }

    /// A node that stops on purpose leaves the cluster at once (its connections
    /// are released by then) instead of waiting to be declared dead.
    pub(crate) async fn leave(&self) {
        let nodes = self.link.keys().global("nodes");
        let alive: Result<(), _> = self.on_node().del(self.alive_key()).await;
        let member: Result<(), _> = self.on(&nodes).srem(&nodes, &self.node_id).await;
        if let Err(e) = alive.and(member) {
            tracing::warn!(error = %e, "leaving the cluster: redis unreachable");
        }
    }

    async fn beat(&self) -> Result<(), RegistryError> {
        let ttl = self.settings.node_ttl.as_millis() as i64;
        let alive: Result<Option<String>, _> = self
            .on_node()
            .set(self.alive_key(), "1", Some(Expiration::PX(ttl)), None, true)
            .await;
        // Whether this node's own keys (which every admission writes) are reachable.
        self.record_ok.store(alive.is_ok(), Ordering::Release);
        let before = alive?;
        let nodes = self.link.keys().global("nodes");
        let _: () = self.on(&nodes).sadd(&nodes, &self.node_id).await?;
        // Our alive key had lapsed although the link stayed up (a stalled process, a
        // Redis that lost its data): another node may have removed our connections.
        if before.is_none() && self.beaten.swap(true, Ordering::AcqRel) {
            tracing::warn!("heartbeat had lapsed: re-registering");
            self.dirty.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Finds the nodes whose alive key is gone and removes the ones it claims.
    async fn reap(self: &Arc<Self>) -> Result<(), RegistryError> {
        let keys = self.link.keys();
        let members = keys.global("nodes");
        let nodes: Vec<String> = self.on(&members).smembers(&members).await?;
        for node in nodes.into_iter().filter(|n| *n != self.node_id) {
            let c = self.on(&keys.node_key(&node, "alive"));
            let alive: i64 = c.exists(keys.node_key(&node, "alive")).await?;
            if alive > 0 {
                continue;
            }
            let ttl = self.settings.node_ttl.as_millis() as i64;
            let claimed: Option<String> = c
                .set(
                    keys.node_key(&node, "reaper"),
                    &self.node_id,
                    Some(Expiration::PX(ttl)),
                    Some(SetOptions::NX),
                    false,
                )
                .await?;
            if claimed.is_some() {
                tracing::warn!(node, "node is gone: removing its connections");
                self.remove_node(&node).await?;
            }
        }
        Ok(())
    }

    /// Removes a dead node's connections (its clients left with none go offline
    /// here, at once), the node itself, and its presence in the broker.
    async fn remove_node(&self, node: &str) -> Result<(), RegistryError> {
        let keys = self.link.keys();
        let conns_key = keys.node_key(node, "conns");
        let c = self.on(&conns_key);
        let conns: HashMap<String, String> = c.hgetall(&conns_key).await?;
        for (conn_id, client) in &conns {
            let on = self.on_client(client);
            let turn = self.turns.take(&Arc::from(client.as_str())).await;
            let r = scripts::release(&on, keys, client, conn_id, 0, "reaper").await?;
            if r == Released::Offline {
                self.went_offline(client);
                drop(turn);
                scripts::acknowledge(&on, keys, client, conn_id).await;
            }
            let _: () = c.hdel(&conns_key, conn_id).await?;
        }
        let _: () = c.del(&conns_key).await?;
        // Graces that were running on the dead node end now.
        let lingering_key = keys.node_key(node, "lingering");
        let lingering: HashMap<String, String> = c.hgetall(&lingering_key).await?;
        for (client, token) in &lingering {
            let _turn = self.turns.take(&Arc::from(client.as_str())).await;
            if scripts::expire(&self.on_client(client), keys, client, token).await? {
                self.went_offline(client);
            }
        }
        let _: () = c.del(&lingering_key).await?;
        let members = keys.global("nodes");
        let _: () = self.on(&members).srem(&members, node).await?;
        if let Some(forget) = self.forget.get() {
            forget.forget_node(node.to_owned()).await;
        }
        tracing::info!(node, connections = conns.len(), "dead node removed");
        Ok(())
    }

    /// Makes Redis agree with this node. Every live connection is registered again
    /// (a client then over its limit is settled by its policy: the newest closed 4409
    /// under `reject`, the oldest 4001 under `replace_oldest`); connections Redis
    /// holds for it that are no longer live are released (their clients' offline
    /// fire here); releases Redis never answered are run again (see `outage`).
    pub(crate) async fn resync(self: &Arc<Self>) -> Result<(), RegistryError> {
        let lost = self.data_lost().await?;
        if lost {
            tracing::warn!("redis lost its data: registering everything again");
            self.relinger().await?;
        }
        let live = self.registry.connections();
        for conn in &live {
            self.register(conn, lost).await?;
        }
        self.release_gone(&live).await?;
        self.settle_unsettled().await?;
        self.owe(None, lost);
        self.note_epoch().await?;
        tracing::info!(connections = live.len(), "live connections registered");
        Ok(())
    }

    /// Registers one live connection again, unless it is closing or its release is
    /// under way (its release, if it comes now, waits for the registration).
    async fn register(&self, conn: &Connection, lost: bool) -> Result<(), RegistryError> {
        if conn.is_closing() {
            return Ok(());
        }
        let _registering = {
            let unsettled = self.unsettled.lock();
            if unsettled.contains_key(conn.id()) {
                return Ok(());
            }
            Registering::new(self, conn.id())
        };
        self.register_now(conn, lost).await
    }

    async fn register_now(&self, conn: &Connection, lost: bool) -> Result<(), RegistryError> {
        let keys = self.link.keys();
        let conns_key = keys.node_key(&self.node_id, "conns");
        let _: () = self
            .on_node()
            .hset(&conns_key, (conn.id(), conn.client_id()))
            .await?;
        let (index_key, index) = (keys.global("clients"), (0.0, conn.client_id()));
        let _: () = self
            .on(&index_key)
            .zadd(&index_key, None, None, false, false, index)
            .await?;
        let local = self.local_only.lock().contains(conn.id());
        let mode = match (local, lost) {
            (true, _) => Mode::Local,
            (false, true) => Mode::Lost,
            (false, false) => Mode::Kept,
        };
        let opened = (super::now_ms() - conn.age().as_millis() as u64).to_string();
        let limit = self.settings.max_connections_per_client.to_string();
        let policy = scripts::policy_arg(self.settings.replace_oldest);
        let args = [
            conn.id(),
            &self.node_id,
            conn.transport().as_str(),
            &opened,
            &limit,
            policy,
        ];
        let c = self.on_client(conn.client_id());
        let client: Arc<str> = Arc::from(conn.client_id());
        let turn = self.turns.take(&client).await;
        let done = scripts::commit(&c, keys, conn.client_id(), args, mode).await?;
        self.local_only.lock().remove(conn.id());
        if done.over {
            let sel = Selector {
                conn_id: Some(conn.id().to_owned()),
                ..Default::default()
            };
            let closing = Closing::new(CloseCode(4409), "client_limit");
            self.registry.disconnect(&sel, &closing);
        }
        if done.first {
            self.went_online(client.clone());
        }
        drop(turn);
        if done.pending {
            self.owe(Some(Arc::from(conn.client_id())), false);
        }
        if let Some((victim, node)) = done.victim {
            self.evict(victim, node, super::flow::replaced());
        }
        Ok(())
    }

    /// Releases the connections Redis holds for this node that are gone, and whose
    /// release is not already under way.
    async fn release_gone(self: &Arc<Self>, live: &[Arc<Connection>]) -> Result<(), RegistryError> {
        let conns_key = self.link.keys().node_key(&self.node_id, "conns");
        let held: HashMap<String, String> = self.on_node().hgetall(&conns_key).await?;
        let live_ids: HashSet<&str> = live.iter().map(|c| c.id()).collect();
        for (conn_id, client) in held {
            if live_ids.contains(conn_id.as_str()) || self.unsettled.lock().contains_key(&conn_id) {
                continue;
            }
            let entry = Unsettled::new(Arc::from(client.as_str()), true);
            self.unsettled.lock().insert(conn_id.clone(), entry);
            if self.run_release(&conn_id).await.is_none() {
                return Err(RegistryError::Unreachable);
            }
        }
        Ok(())
    }
}

/// The connection being registered again, cleared (and its waiting release woken)
/// when this drops: on every way out of the registration, a cancelled one too.
struct Registering<'a>(&'a ClusterRegistry);

impl<'a> Registering<'a> {
    fn new(cluster: &'a ClusterRegistry, conn_id: &str) -> Self {
        *cluster.registering.lock() = Some(conn_id.to_owned());
        Registering(cluster)
    }
}

impl Drop for Registering<'_> {
    fn drop(&mut self) {
        *self.0.registering.lock() = None;
        self.0.registered.notify_waiters();
    }
}
