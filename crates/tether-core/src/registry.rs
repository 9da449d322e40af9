//! The registry: clients → connections, admission, and release.
//!
//! Lifetimes:
//! - A handshake calls [`Registry::reserve`], which checks the client's limit and the
//!   node's ceiling and takes a slot atomically under the client's shard lock. The
//!   [`Reservation`] holds the slot; dropping it uncommitted gives the slot back.
//! - Once the upgrade is done, [`Reservation::commit`] registers the [`Connection`],
//!   fires `client.online` (first connection) and `connection.opened`, and under
//!   `replace_oldest` marks the oldest connection closing and asks it to close (4001)
//!   after the lock is released. It returns the [`ConnectionGuard`].
//! - The connection task owns the guard. Dropping the guard is the one release path:
//!   it removes the connection, fires `connection.closed`, and when it was the
//!   client's last one either fires `client.offline` or starts the offline grace
//!   (a timer task tracked by the registry). Drop never blocks or awaits.
//!
//! Locks: one `parking_lot` mutex per client shard, and one for the connection index
//! (always taken after a shard lock, never the other way). No lock is held across an
//! `.await`. Events are emitted under the shard lock, which is what orders
//! `client.online` before the first `connection.opened` and `client.offline` after the
//! last `connection.closed` for each client; emitting is synchronous and non-blocking.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tether_protocol::{CloseCode, Closing, EventType, Refusal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection::{ConnSnapshot, ConnSpec, Connection, Transport};
use crate::events::{EventBus, EventFields};
use crate::hub::Hub;
use crate::ids::ConnIdGen;
use crate::ip_limits::IpSlot;
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Outgoing};
use crate::select::{Filter, Selector};

mod clients_page;

pub use clients_page::ClientSummary;

const SHARDS: usize = 64;

/// Cluster mode's hold on the registry (SPEC section 10). With a seam set, the
/// cluster, not this node, decides the per-client limit, the duplicate policy and
/// the client's `client.online`/`client.offline`: [`Registry::reserve`] checks only
/// the node's ceiling, [`Reservation::commit`] fires `client.online` only when
/// [`Reservation::set_cluster_first`] said so, and a release tells the seam instead of
/// firing `client.offline` or lingering. Memory mode has no seam and is unchanged.
pub trait ClusterSeam: Send + Sync + std::fmt::Debug {
    /// A connection of `client_id` left this node: `committed` is false for a
    /// reservation dropped before its commit. Called under no lock; must not block.
    fn released(&self, client_id: &Arc<str>, conn_id: &str, committed: bool);
}

/// One shard of the client table.
type Shard = Mutex<HashMap<Arc<str>, ClientEntry>>;

/// What to do when a client is at `clients.max_connections_per_client`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientLimitPolicy {
    /// Refuse the new connection (`client_limit`, 409).
    #[default]
    Reject,
    /// Admit it and close the client's oldest connection with 4001.
    ReplaceOldest,
}

/// The registry's settings.
#[derive(Clone, Debug)]
pub struct RegistrySettings {
    /// `limits.max_connections`, in sockets (a proxied connection counts 2).
    pub max_connections: usize,
    /// `clients.max_connections_per_client`.
    pub max_connections_per_client: usize,
    /// `clients.on_client_limit`.
    pub on_client_limit: ClientLimitPolicy,
    /// `clients.offline_grace_ms`.
    pub offline_grace: Duration,
    /// `delivery.max_queue_messages`.
    pub max_queue_messages: usize,
    /// `delivery.max_queue_bytes`.
    pub max_queue_bytes: usize,
}

/// A client as `GET /api/clients/{id}` shows it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ClientSnapshot {
    /// Client id.
    pub client_id: String,
    /// `online` or `lingering`.
    pub state: &'static str,
    /// Its connections.
    pub connections: Vec<ConnSnapshot>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientState {
    /// Reserved but never committed: no event fired yet.
    Fresh,
    /// `client.online` fired.
    Online,
    /// Last connection gone, inside the offline grace.
    Lingering,
}

#[derive(Debug)]
struct ClientEntry {
    /// Committed connections, oldest first.
    conns: Vec<Arc<Connection>>,
    /// Reservations not yet committed or dropped.
    reserved: u32,
    /// Which events have fired.
    state: ClientState,
    /// Bumped whenever lingering starts or ends, so a stale grace timer does nothing.
    epoch: u64,
}

/// The registry: a cheap clone handle.
#[derive(Clone, Debug)]
pub struct Registry {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: RegistrySettings,
    /// Channels; a released connection's subscriptions end there.
    hub: Hub,
    ids: ConnIdGen,
    events: EventBus,
    metrics: Metrics,
    /// Clients by id, sharded by hash.
    shards: Box<[Shard]>,
    /// Every committed connection by sequence number.
    index: Mutex<BTreeMap<u64, Arc<Connection>>>,
    /// Sockets reserved or committed, against `max_connections`.
    admitted: AtomicUsize,
    /// Committed connections per transport.
    by_transport: [AtomicUsize; 3],
    /// Clients online or lingering.
    clients: AtomicUsize,
    /// Offline-grace timers.
    lingers: TaskTracker,
    /// Cancels the grace timers at shutdown.
    lingers_cancel: CancellationToken,
    /// Cluster mode's seam (set once, before the first handshake).
    cluster: OnceLock<Arc<dyn ClusterSeam>>,
}

/// A reserved slot for one client's connection. Commit it once the upgrade is done;
/// drop it to give the slot back.
#[derive(Debug)]
pub struct Reservation {
    registry: Registry,
    client_id: Arc<str>,
    transport: Transport,
    /// The id the connection will have (known before commit, e.g. for proxy headers).
    id: String,
    /// Its sequence number.
    seq: u64,
    ip_slot: Option<IpSlot>,
    committed: bool,
    /// Cluster mode: whether this commit is the client's first connection cluster-wide.
    cluster_first: bool,
}

/// The committed connection's hold on the registry. Dropping it releases the
/// connection; it is the only release path.
#[derive(Debug)]
pub struct ConnectionGuard {
    registry: Registry,
    conn: Arc<Connection>,
    _ip_slot: Option<IpSlot>,
    /// The close code and reason, recorded by the connection task before it ends.
    closed_with: Option<(u16, String)>,
}

impl ConnectionGuard {
    /// The connection.
    pub fn conn(&self) -> &Arc<Connection> {
        &self.conn
    }
    /// The node's metrics.
    pub fn metrics(&self) -> &Metrics {
        self.registry.metrics()
    }
    /// Records how the connection ended, for `connection.closed` and the metrics.
    /// The first record wins.
    pub fn set_close(&mut self, code: u16, reason: impl Into<String>) {
        if self.closed_with.is_none() {
            self.closed_with = Some((code, reason.into()));
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let (code, reason) = self
            .closed_with
            .take()
            .unwrap_or((CloseCode::ABNORMAL.0, "connection lost".to_owned()));
        self.registry.release(&self.conn, code, &reason);
    }
}

impl Registry {
    /// An empty registry.
    pub fn new(
        settings: RegistrySettings,
        ids: ConnIdGen,
        events: EventBus,
        metrics: Metrics,
        hub: Hub,
    ) -> Self {
        let shards = (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect();
        Self {
            inner: Arc::new(Inner {
                settings,
                hub,
                ids,
                events,
                metrics,
                shards,
                index: Mutex::new(BTreeMap::new()),
                admitted: AtomicUsize::new(0),
                by_transport: Default::default(),
                clients: AtomicUsize::new(0),
                lingers: TaskTracker::new(),
                lingers_cancel: CancellationToken::new(),
                cluster: OnceLock::new(),
            }),
        }
    }

    /// Puts the registry in cluster mode (see [`ClusterSeam`]); only the first call
    /// counts. Call it before the first handshake.
    pub fn set_cluster(&self, seam: Arc<dyn ClusterSeam>) {
        let _ = self.inner.cluster.set(seam);
    }

    fn cluster(&self) -> Option<&Arc<dyn ClusterSeam>> {
        self.inner.cluster.get()
    }

    /// The node id.
    pub fn node_id(&self) -> &str {
        self.inner.ids.node_id()
    }
    /// The event bus.
    pub fn events(&self) -> &EventBus {
        &self.inner.events
    }
    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }
    /// The hub.
    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }
    /// The settings.
    pub fn settings(&self) -> &RegistrySettings {
        &self.inner.settings
    }

    fn shard(&self, client_id: &str) -> &Shard {
        let mut h = DefaultHasher::new();
        client_id.hash(&mut h);
        &self.inner.shards[(h.finish() as usize) % SHARDS]
    }

    /// Reserves a slot for a connection of `client_id`: checks the per-client limit
    /// (`client_limit` under `reject`) and the node's ceiling (`server_full`, not
    /// checked when the connection will replace an older one), atomically.
    pub fn reserve(
        &self,
        client_id: &str,
        transport: Transport,
        ip_slot: Option<IpSlot>,
    ) -> Result<Reservation, Refusal> {
        let s = &self.inner.settings;
        let weight = transport.weight();
        let mut map = self.shard(client_id).lock();
        let key: Arc<str> = match map.get_key_value(client_id) {
            Some((k, _)) => k.clone(),
            None => Arc::from(client_id),
        };
        let entry = map.entry(key.clone()).or_insert_with(|| ClientEntry {
            conns: Vec::new(),
            reserved: 0,
            state: ClientState::Fresh,
            epoch: 0,
        });
        let live = entry.conns.iter().filter(|c| !c.is_closing()).count() + entry.reserved as usize;
        // In cluster mode the cluster checks the client's limit.
        let replacing = live >= s.max_connections_per_client && self.cluster().is_none();
        let refusal = if replacing && s.on_client_limit == ClientLimitPolicy::Reject {
            Some(Refusal::ClientLimit)
        } else if replacing {
            self.inner.admitted.fetch_add(weight, Ordering::AcqRel);
            None
        } else {
            let admitted =
                self.inner
                    .admitted
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n + weight <= s.max_connections).then_some(n + weight)
                    });
            admitted.err().map(|_| Refusal::ServerFull)
        };
        if let Some(r) = refusal {
            if entry.conns.is_empty() && entry.reserved == 0 && entry.state == ClientState::Fresh {
                map.remove(client_id);
            }
            return Err(r);
        }
        entry.reserved += 1;
        drop(map);
        let (id, seq) = self.inner.ids.next();
        Ok(Reservation {
            registry: self.clone(),
            client_id: key,
            transport,
            id,
            seq,
            ip_slot,
            committed: false,
            cluster_first: false,
        })
    }

    /// Takes the last reference a reservation or guard had: if the client has no
    /// connection and no reservation left, it goes offline (or lingers).
    fn settle(&self, map: &mut HashMap<Arc<str>, ClientEntry>, client_id: &Arc<str>) {
        let Some(entry) = map.get_mut(client_id) else {
            return;
        };
        if !entry.conns.is_empty() || entry.reserved > 0 {
            return;
        }
        if self.cluster().is_some() {
            // The cluster decides the offline; locally the client is simply gone.
            if map
                .remove(client_id)
                .is_some_and(|e| e.state != ClientState::Fresh)
            {
                self.inner.clients.fetch_sub(1, Ordering::AcqRel);
                self.inner.metrics.clients_delta(-1);
            }
            return;
        }
        match entry.state {
            ClientState::Fresh => {
                map.remove(client_id);
            }
            ClientState::Lingering => {}
            ClientState::Online => {
                let grace = self.inner.settings.offline_grace;
                let handle = tokio::runtime::Handle::try_current();
                match handle {
                    Ok(handle) if !grace.is_zero() && !self.inner.lingers_cancel.is_cancelled() => {
                        entry.state = ClientState::Lingering;
                        entry.epoch += 1;
                        let epoch = entry.epoch;
                        let weak = Arc::downgrade(&self.inner);
                        let id = client_id.clone();
                        let cancel = self.inner.lingers_cancel.clone();
                        self.inner.lingers.spawn_on(
                            async move {
                                tokio::select! {
                                    _ = tokio::time::sleep(grace) => expire(weak, &id, epoch),
                                    _ = cancel.cancelled() => {}
                                }
                            },
                            &handle,
                        );
                    }
                    _ => {
                        map.remove(client_id);
                        self.went_offline(client_id);
                    }
                }
            }
        }
    }

    /// A commit makes its client online: counted when it was new, its grace ended
    /// when it lingered, and `client.online` fired when this is its first connection
    /// (in cluster mode, `cluster_first`: the cluster decided). Under the shard lock.
    fn enter_online(&self, entry: &mut ClientEntry, client_id: &str, cluster_first: Option<bool>) {
        let inner = &self.inner;
        let was = entry.state;
        entry.state = ClientState::Online;
        match was {
            ClientState::Fresh => {
                inner.clients.fetch_add(1, Ordering::AcqRel);
                inner.metrics.clients_delta(1);
            }
            ClientState::Lingering => entry.epoch += 1,
            ClientState::Online => {}
        }
        if cluster_first.unwrap_or(was == ClientState::Fresh) {
            inner.events.emit(
                EventType::ClientOnline,
                EventFields {
                    client_id: Some(client_id),
                    ..Default::default()
                },
            );
        }
    }

    fn went_offline(&self, client_id: &str) {
        self.inner.clients.fetch_sub(1, Ordering::AcqRel);
        self.inner.metrics.clients_delta(-1);
        self.inner.events.emit(
            EventType::ClientOffline,
            EventFields {
                client_id: Some(client_id),
                ..Default::default()
            },
        );
    }

    fn release(&self, conn: &Arc<Connection>, code: u16, reason: &str) {
        let transport = conn.transport();
        self.inner.hub.remove_connection(conn);
        {
            let mut map = self.shard(conn.client_id_arc()).lock();
            if let Some(entry) = map.get_mut(conn.client_id()) {
                entry.conns.retain(|c| !Arc::ptr_eq(c, conn));
            }
            self.inner.index.lock().remove(&conn.seq());
            self.inner.by_transport[transport.index()].fetch_sub(1, Ordering::AcqRel);
            self.inner.metrics.closed(transport.as_str(), code);
            self.inner.events.emit(
                EventType::ConnectionClosed,
                EventFields {
                    client_id: Some(conn.client_id_arc()),
                    conn_id: Some(conn.id()),
                    code: Some(code),
                    reason: Some(reason),
                    duration_ms: Some(conn.age().as_millis() as u64),
                    upstream: conn.upstream(),
                    ..Default::default()
                },
            );
            self.settle(&mut map, conn.client_id_arc());
        }
        self.inner
            .admitted
            .fetch_sub(transport.weight(), Ordering::AcqRel);
        if let Some(seam) = self.cluster() {
            seam.released(conn.client_id_arc(), conn.id(), true);
        }
    }

    /// The client as the API shows it.
    pub fn client(&self, client_id: &str) -> Option<ClientSnapshot> {
        let map = self.shard(client_id).lock();
        let entry = map.get(client_id)?;
        let state = match entry.state {
            ClientState::Fresh => return None,
            ClientState::Online => "online",
            ClientState::Lingering => "lingering",
        };
        let node = self.node_id();
        Some(ClientSnapshot {
            client_id: client_id.to_owned(),
            state,
            connections: entry.conns.iter().map(|c| c.snapshot(node)).collect(),
        })
    }

    /// Connections matching `filter` (and `client_id`), after sequence number `after`,
    /// at most `limit`; with the sequence number to continue from when more remain.
    pub fn list(
        &self,
        client_id: Option<&str>,
        filter: &Filter,
        after: u64,
        limit: usize,
    ) -> (Vec<ConnSnapshot>, Option<u64>) {
        let matched: Vec<Arc<Connection>> = {
            let index = self.inner.index.lock();
            index
                .range(after.saturating_add(1)..)
                .map(|(_, c)| c)
                .filter(|c| client_id.is_none_or(|id| c.client_id() == id) && filter.matches(c))
                .take(limit.saturating_add(1))
                .cloned()
                .collect()
        };
        let next = (matched.len() > limit).then(|| matched[limit - 1].seq());
        let node = self.node_id();
        (
            matched
                .iter()
                .take(limit)
                .map(|c| c.snapshot(node))
                .collect(),
            next,
        )
    }

    /// Every connection the selector means.
    pub fn select(&self, selector: &Selector) -> Vec<Arc<Connection>> {
        if selector.is_empty() {
            return Vec::new();
        }
        if let Some(client) = &selector.client_id {
            let map = self.shard(client).lock();
            return map
                .get(client.as_str())
                .map(|e| {
                    e.conns
                        .iter()
                        .filter(|c| selector.matches(c))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
        }
        self.inner
            .index
            .lock()
            .values()
            .filter(|c| selector.matches(c))
            .cloned()
            .collect()
    }

    /// Asks every selected connection that is not already closing to close with
    /// `closing`; returns how many were asked.
    pub fn disconnect(&self, selector: &Selector, closing: &Closing) -> usize {
        self.select(selector)
            .iter()
            .filter(|c| c.request_close(closing.clone()))
            .count()
    }

    /// Queues a direct message (raw JSON `data`) for every connection of `client_id`
    /// on this node; returns how many took it. A proxied connection carries its
    /// upstream's protocol: nothing of Tether's is injected into it, so it is neither
    /// sent to nor counted.
    pub fn send(&self, client_id: &str, data: &str) -> usize {
        let selector = Selector {
            client_id: Some(client_id.to_owned()),
            ..Default::default()
        };
        let direct = Arc::new(crate::hub::encode_direct(data));
        self.select(&selector)
            .iter()
            .filter(|c| c.transport() != Transport::Proxy)
            .filter(|c| c.outbox().push(Outgoing::Direct(direct.clone())))
            .count()
    }

    /// Every committed connection, oldest first.
    pub fn connections(&self) -> Vec<Arc<Connection>> {
        self.inner.index.lock().values().cloned().collect()
    }

    /// Committed connections per transport: `[ws, sse, proxy]`.
    pub fn counts(&self) -> [usize; 3] {
        let t = &self.inner.by_transport;
        [0, 1, 2].map(|i| t[i].load(Ordering::Acquire))
    }

    /// A client's committed connections (not closing) and reservations on this node.
    pub fn local_count(&self, client_id: &str) -> (usize, usize) {
        let map = self.shard(client_id).lock();
        map.get(client_id).map_or((0, 0), |e| {
            let live = e.conns.iter().filter(|c| !c.is_closing()).count();
            (live, e.reserved as usize)
        })
    }

    /// Clients online or lingering.
    pub fn clients(&self) -> usize {
        self.inner.clients.load(Ordering::Acquire)
    }

    /// Sockets reserved or committed.
    pub fn admitted(&self) -> usize {
        self.inner.admitted.load(Ordering::Acquire)
    }

    /// Whether a new (non-replacing) WebSocket would be refused `server_full`.
    pub fn is_full(&self) -> bool {
        self.admitted() >= self.inner.settings.max_connections
    }

    /// Client entries of any state (for leak checks: 0 when nothing is connected,
    /// reserved or lingering).
    pub fn entries(&self) -> usize {
        self.inner.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Ends every offline grace now, firing the pending `client.offline` events
    /// (at shutdown, so no offline is lost). Later releases go offline at once.
    pub fn flush_lingering(&self) {
        self.inner.lingers_cancel.cancel();
        for shard in self.inner.shards.iter() {
            let mut map = shard.lock();
            let ids: Vec<Arc<str>> = map
                .iter()
                .filter(|(_, e)| e.state == ClientState::Lingering)
                .map(|(k, _)| k.clone())
                .collect();
            for id in ids {
                map.remove(&id);
                self.went_offline(&id);
            }
        }
    }
}

fn expire(weak: Weak<Inner>, client_id: &Arc<str>, epoch: u64) {
    let Some(inner) = weak.upgrade() else { return };
    let registry = Registry { inner };
    let mut map = registry.shard(client_id).lock();
    let lingering = map.get(&**client_id).is_some_and(|e| {
        e.state == ClientState::Lingering
            && e.epoch == epoch
            && e.conns.is_empty()
            && e.reserved == 0
    });
    if lingering {
        map.remove(&**client_id);
        registry.went_offline(client_id);
    }
}

impl Reservation {
    /// The id the connection will have once committed.
    pub fn conn_id(&self) -> &str {
        &self.id
    }

    /// The client id.
    pub fn client_id(&self) -> &Arc<str> {
        &self.client_id
    }

    /// The transport.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// Cluster mode: the cluster decided this commit is the client's first
    /// connection anywhere, so [`Reservation::commit`] fires `client.online`.
    pub fn set_cluster_first(&mut self, first: bool) {
        self.cluster_first = first;
    }

    /// Registers the connection: fires `client.online` (first connection) and
    /// `connection.opened`, and under `replace_oldest` closes the oldest connection
    /// with 4001 once this one is in.
    pub fn commit(mut self, spec: ConnSpec) -> ConnectionGuard {
        self.committed = true;
        let reg = self.registry.clone();
        let inner = &reg.inner;
        let (id, seq) = (std::mem::take(&mut self.id), self.seq);
        let transport = spec.transport;
        let conn = Arc::new(Connection::new(
            id,
            seq,
            self.client_id.clone(),
            spec,
            Outbox::new(
                inner.settings.max_queue_messages,
                inner.settings.max_queue_bytes,
            ),
        ));
        let victim = {
            let mut map = reg.shard(&self.client_id).lock();
            let entry = map
                .entry(self.client_id.clone())
                .or_insert_with(|| ClientEntry {
                    conns: Vec::new(),
                    reserved: 1,
                    state: ClientState::Fresh,
                    epoch: 0,
                });
            entry.reserved = entry.reserved.saturating_sub(1);
            let clustered = reg.cluster().is_some();
            reg.enter_online(
                entry,
                &self.client_id,
                clustered.then_some(self.cluster_first),
            );
            let live: Vec<&Arc<Connection>> =
                entry.conns.iter().filter(|c| !c.is_closing()).collect();
            let victim = (live.len() >= inner.settings.max_connections_per_client
                && inner.settings.on_client_limit == ClientLimitPolicy::ReplaceOldest
                && !clustered)
                .then(|| live.first().map(|c| (*c).clone()))
                .flatten();
            if let Some(v) = &victim {
                v.mark_closing();
            }
            entry.conns.push(conn.clone());
            inner.index.lock().insert(seq, conn.clone());
            inner.by_transport[transport.index()].fetch_add(1, Ordering::AcqRel);
            inner.metrics.opened(transport.as_str());
            inner.events.emit(
                EventType::ConnectionOpened,
                EventFields {
                    client_id: Some(conn.client_id_arc()),
                    conn_id: Some(conn.id()),
                    upstream: conn.upstream(),
                    ..Default::default()
                },
            );
            victim
        };
        if let Some(v) = victim {
            // `closing` is already set, so `request_close` sees no earlier request
            // only if nobody else asked first; either way the victim closes.
            v.close_marked(Closing::new(
                CloseCode::REPLACED,
                "replaced by a newer connection",
            ));
        }
        ConnectionGuard {
            registry: reg.clone(),
            conn,
            _ip_slot: self.ip_slot.take(),
            closed_with: None,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let reg = &self.registry;
        {
            let mut map = reg.shard(&self.client_id).lock();
            if let Some(entry) = map.get_mut(&*self.client_id) {
                entry.reserved = entry.reserved.saturating_sub(1);
            }
            reg.settle(&mut map, &self.client_id);
        }
        reg.inner
            .admitted
            .fetch_sub(self.transport.weight(), Ordering::AcqRel);
        if let Some(seam) = reg.cluster() {
            seam.released(&self.client_id, &self.id, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn registry(
        max: usize,
        per_client: usize,
        policy: ClientLimitPolicy,
        grace_ms: u64,
    ) -> Registry {
        let ids = ConnIdGen::new("t");
        let metrics = Metrics::new();
        Registry::new(
            RegistrySettings {
                max_connections: max,
                max_connections_per_client: per_client,
                on_client_limit: policy,
                offline_grace: Duration::from_millis(grace_ms),
                max_queue_messages: 10,
                max_queue_bytes: 1 << 20,
            },
            ids.clone(),
            EventBus::new(ids.node_id().clone()),
            metrics.clone(),
            Hub::new(
                crate::hub::HubSettings {
                    history_size: 100,
                    history_ttl: Duration::from_secs(60),
                    max_channels: 100,
                    max_channels_per_connection: 10,
                },
                EventBus::new(ids.node_id().clone()),
                metrics,
            ),
        )
    }

    fn spec() -> ConnSpec {
        ConnSpec {
            transport: Transport::Ws,
            remote_addr: Ipv4Addr::LOCALHOST.into(),
            user_agent: None,
            meta: serde_json::Value::Null,
            upstream: None,
        }
    }

    fn drain_kinds(
        rx: &mut tokio::sync::broadcast::Receiver<Arc<tether_protocol::LifecycleEvent>>,
    ) -> Vec<&'static str> {
        let mut out = Vec::new();
        while let Ok(e) = rx.try_recv() {
            out.push(e.kind.as_str());
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn grace_expires_into_one_offline() {
        let r = registry(10, 4, ClientLimitPolicy::Reject, 1000);
        let mut rx = r.events().subscribe();
        let g = r.reserve("a", Transport::Ws, None).unwrap().commit(spec());
        drop(g);
        assert_eq!(r.client("a").map(|c| c.state), Some("lingering"));
        tokio::time::sleep(Duration::from_millis(999)).await;
        assert_eq!(
            drain_kinds(&mut rx),
            ["client.online", "connection.opened", "connection.closed"]
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(drain_kinds(&mut rx), ["client.offline"]);
        assert_eq!((r.entries(), r.clients(), r.admitted()), (0, 0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn reconnect_within_grace_cancels_the_timer() {
        let r = registry(10, 4, ClientLimitPolicy::Reject, 1000);
        let mut rx = r.events().subscribe();
        drop(r.reserve("a", Transport::Ws, None).unwrap().commit(spec()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        let g = r.reserve("a", Transport::Ws, None).unwrap().commit(spec());
        tokio::time::sleep(Duration::from_millis(2000)).await;
        assert_eq!(
            drain_kinds(&mut rx),
            [
                "client.online",
                "connection.opened",
                "connection.closed",
                "connection.opened"
            ]
        );
        drop(g);
        tokio::time::sleep(Duration::from_millis(1001)).await;
        assert_eq!(
            drain_kinds(&mut rx),
            ["connection.closed", "client.offline"]
        );
        assert_eq!(r.entries(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn flush_fires_pending_offlines_at_shutdown() {
        let r = registry(10, 4, ClientLimitPolicy::Reject, 60_000);
        let mut rx = r.events().subscribe();
        drop(r.reserve("a", Transport::Ws, None).unwrap().commit(spec()));
        r.flush_lingering();
        assert_eq!(drain_kinds(&mut rx).last(), Some(&"client.offline"));
        assert_eq!(r.entries(), 0);
    }

    #[test]
    fn uncommitted_reservation_leaves_nothing_and_fires_nothing() {
        let r = registry(1, 1, ClientLimitPolicy::Reject, 0);
        let mut rx = r.events().subscribe();
        let res = r.reserve("a", Transport::Ws, None).unwrap();
        assert_eq!(
            r.reserve("b", Transport::Ws, None).err(),
            Some(Refusal::ServerFull)
        );
        assert_eq!(
            r.reserve("a", Transport::Ws, None).err(),
            Some(Refusal::ClientLimit)
        );
        drop(res);
        assert_eq!((r.entries(), r.admitted()), (0, 0));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn proxy_counts_two_sockets() {
        let r = registry(3, 4, ClientLimitPolicy::Reject, 0);
        let a = r.reserve("a", Transport::Proxy, None).unwrap();
        assert_eq!(
            r.reserve("b", Transport::Proxy, None).err(),
            Some(Refusal::ServerFull)
        );
        let b = r.reserve("b", Transport::Ws, None).unwrap();
        drop((a, b));
        assert_eq!(r.admitted(), 0);
    }

    #[test]
    fn concurrent_reservations_never_over_admit() {
        let r = registry(1000, 3, ClientLimitPolicy::Reject, 0);
        let admitted = std::sync::atomic::AtomicUsize::new(0);
        let held = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..50 {
                        if let Ok(res) = r.reserve("same", Transport::Ws, None) {
                            admitted.fetch_add(1, Ordering::SeqCst);
                            held.lock().push(res);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::SeqCst), 3);
        held.lock().clear();
        assert_eq!((r.entries(), r.admitted()), (0, 0));
    }

    /// A quiet publish to twice `PART_MIN` subscribers or more splits its fan-out
    /// over two threads: every subscriber still gets each message once, in order, and
    /// the count of deliveries is whole.
    #[tokio::test(start_paused = true)]
    async fn a_fan_out_split_over_two_threads_reaches_everyone_once() {
        use crate::outbox::Outgoing;
        let n = 3_000;
        let r = registry(n, 1, ClientLimitPolicy::Reject, 0);
        let guards: Vec<_> = (0..n)
            .map(|i| {
                let g = r
                    .reserve(&format!("c{i}"), Transport::Ws, None)
                    .unwrap()
                    .commit(spec());
                r.hub().subscribe(g.conn(), "big", None, None).unwrap();
                g
            })
            .collect();
        // The first publish finds the channel quiet; so does the second, 200 ms on.
        r.hub().publish("big", "1", None).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        r.hub().publish("big", "2", None).unwrap();
        let mut got = Vec::new();
        for g in &guards {
            got.clear();
            assert!(!g.conn().outbox().take(&mut got));
            let offsets: Vec<u64> = got
                .iter()
                .filter_map(|o| match o {
                    Outgoing::Message(p) => Some(p.offset),
                    _ => None,
                })
                .collect();
            assert_eq!(offsets, [1, 2], "connection {}", g.conn().id());
        }
        let text = r.metrics().render();
        assert!(
            text.lines()
                .any(|l| l == "tether_messages_delivered_total 6000"),
            "{text}"
        );
        drop(guards);
        assert_eq!((r.entries(), r.admitted()), (0, 0));
    }
}
