//! One connection's way through the cluster registry: admission (after the local
//! reservation), commit (before the local one, so `client.online` still comes first),
//! release, and the offline grace. Every Redis failure is logged and leaves the node
//! `dirty`: it re-registers its live connections at the next chance.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use fred::interfaces::{HashesInterface, SortedSetsInterface};
use tether_core::events::EventFields;
use tether_core::{Reservation, Selector};
use tether_protocol::{CloseCode, Closing, EventType, Refusal};

use super::outage::{Phase, Unsettled};
use super::scripts::{self, Mode, Released};
use super::{now_ms, ClientTurn, ClusterRegistry, RegistryError};

impl ClusterRegistry {
    /// The cluster's admission check, after the local checks and reservation: the
    /// per-client limit across nodes (`client_limit`), then whether Redis is
    /// reachable (`broker_unavailable`, under `on_unavailable = "reject"`). On a
    /// refusal the caller drops the reservation, whose release clears Redis.
    pub async fn admit(&self, res: &Reservation) -> Result<(), Refusal> {
        if !self.is_up() {
            return self.admit_unreachable(res);
        }
        match self.try_admit(res).await {
            Ok(true) => Ok(()),
            Ok(false) => Err(Refusal::ClientLimit),
            Err(e) => {
                tracing::warn!(error = %e, "cluster admission: redis failed");
                self.admit_unreachable(res)
            }
        }
    }

    async fn try_admit(&self, res: &Reservation) -> Result<bool, RegistryError> {
        let keys = self.link.keys();
        // The node's record first: a node that dies right after leaves nothing the
        // reaper cannot find.
        let _: () = self
            .on_node()
            .hset(
                keys.node_key(&self.node_id, "conns"),
                (res.conn_id(), &**res.client_id()),
            )
            .await?;
        let [conn, node, transport, now, limit, policy] = self.script_args(res);
        let args = [&*conn, &node, &transport, &now, &limit, &policy];
        let c = self.on_client(res.client_id());
        Ok(scripts::admit(&c, keys, res.client_id(), args).await?)
    }

    /// Redis is unreachable: refuse (`reject`), or admit on this node's own view.
    fn admit_unreachable(&self, res: &Reservation) -> Result<(), Refusal> {
        if !self.settings.admit_local {
            return Err(Refusal::BrokerUnavailable);
        }
        self.dirty.store(true, Ordering::Release);
        let (committed, reserved) = self.registry.local_count(res.client_id());
        if !self.settings.replace_oldest
            && committed + reserved > self.settings.max_connections_per_client
        {
            return Err(Refusal::ClientLimit);
        }
        Ok(())
    }

    /// Registers the commit in Redis before the local commit: says whether this is
    /// the client's first connection anywhere (`client.online`), and under
    /// `replace_oldest` closes the connection it evicts, on whichever node holds it.
    /// Redis unreachable (`admit_local`): no `client.online` now — the connection is
    /// registered once Redis is back, and its client announced then if it was
    /// offline (see `outage`).
    ///
    /// The client's turn comes back: hold it until the local commit has fired
    /// `client.online`, so that the client's events leave in the order Redis took
    /// its transitions.
    pub async fn commit(&self, res: &mut Reservation) -> ClientTurn<'_> {
        let turn = self.turns.take(res.client_id()).await;
        let outcome = if self.is_up() {
            self.try_commit(res).await
        } else {
            Err(RegistryError::Unreachable)
        };
        match outcome {
            Ok(done) => {
                res.set_cluster_first(done.first);
                if done.pending {
                    self.owe(Some(res.client_id().clone()), false);
                }
                if let Some((victim, node)) = done.victim {
                    self.evict(victim, node, replaced());
                }
                if done.first {
                    self.index_client(res.client_id().clone());
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cluster commit: redis unreachable, local view");
                self.dirty.store(true, Ordering::Release);
                self.local_only.lock().insert(res.conn_id().to_owned());
                res.set_cluster_first(false);
            }
        }
        turn
    }

    async fn try_commit(&self, res: &Reservation) -> Result<scripts::Committed, RegistryError> {
        let c = self.on_client(res.client_id());
        let keys = self.link.keys();
        let [conn, node, transport, now, limit, policy] = self.script_args(res);
        let args = [&*conn, &node, &transport, &now, &limit, &policy];
        // Until what a data loss left owed is settled, a client that looks offline
        // may only look so (its connections not registered again yet): pending.
        let mode = if self.settling_loss() {
            Mode::Local
        } else {
            Mode::Commit
        };
        Ok(scripts::commit(&c, keys, res.client_id(), args, mode).await?)
    }

    /// What the admission and commit scripts take about a reservation: conn id,
    /// node, transport, now (ms), the per-client limit and the policy.
    fn script_args(&self, res: &Reservation) -> [String; 6] {
        [
            res.conn_id().to_owned(),
            self.node_id.clone(),
            res.transport().as_str().to_owned(),
            now_ms().to_string(),
            self.settings.max_connections_per_client.to_string(),
            scripts::policy_arg(self.settings.replace_oldest).to_owned(),
        ]
    }

    /// Closes a connection the cluster evicted: here, or through its node's control
    /// channel (acknowledged, or logged when no answer comes in time).
    pub(crate) fn evict(&self, conn_id: String, node: String, closing: Closing) {
        let selector = Selector {
            conn_id: Some(conn_id.clone()),
            ..Default::default()
        };
        if node == self.node_id {
            self.registry.disconnect(&selector, &closing);
            return;
        }
        let link = self.link.clone();
        let request = self
            .control
            .close_request(&self.node_id, &selector, &closing);
        let pending = self.control.clone();
        let wait = self.settings.reply_timeout;
        self.tasks.spawn(async move {
            match pending.ask(&link, &node, request, wait).await {
                Ok(reply) if reply.closed > 0 => {}
                Ok(_) => tracing::debug!(conn_id, node, "evicted connection already gone"),
                Err(e) => tracing::warn!(conn_id, node, error = %e, "eviction not acknowledged"),
            }
        });
    }

    /// A connection (or a reservation) left this node: it is recorded as unsettled
    /// and its release runs on the registry's tasks (with no runtime, it waits for
    /// the next re-registration).
    pub(crate) fn begin_release(
        self: &Arc<Self>,
        client: Arc<str>,
        conn_id: String,
        committed: bool,
    ) {
        let registered = committed && !self.local_only.lock().remove(&conn_id);
        let mut entry = Unsettled::new(client, registered);
        let runtime = tokio::runtime::Handle::try_current().is_ok();
        if !runtime {
            entry.phase = Phase::Failed;
            self.dirty.store(true, Ordering::Release);
        }
        self.unsettled.lock().insert(conn_id.clone(), entry);
        if runtime {
            let me = self.clone();
            self.releases
                .spawn(async move { me.run_release(&conn_id).await });
        }
    }

    /// Runs an unsettled release: removes the connection from Redis, and fires
    /// `client.offline` here when it was the client's last one anywhere. Its answer
    /// and record; `None` when Redis gave no answer (it stays unsettled, to be run
    /// again with the same token).
    pub(crate) async fn run_release(
        self: &Arc<Self>,
        conn_id: &str,
    ) -> Option<(Released, Unsettled)> {
        self.not_registering(conn_id).await;
        let client = self.unsettled.lock().get(conn_id)?.client.clone();
        let turn = self.turns.take(&client).await;
        let entry = {
            let mut unsettled = self.unsettled.lock();
            let u = unsettled.get_mut(conn_id)?;
            u.phase = Phase::InFlight;
            u.clone()
        };
        let grace = self.settings.offline_grace.as_millis() as u64;
        let keys = self.link.keys();
        let c = self.on_client(&entry.client);
        let token = &entry.token;
        let answer = match scripts::release(&c, keys, &entry.client, conn_id, grace, token).await {
            Ok(answer) => answer,
            Err(e) => {
                tracing::warn!(conn_id, error = %e, "release: redis unreachable");
                self.set_phase(conn_id, Phase::Failed);
                self.dirty.store(true, Ordering::Release);
                return None;
            }
        };
        // The transition's event at once: a commit elsewhere may follow it closely.
        self.released(entry.client.clone(), answer, entry.token.clone());
        drop(turn);
        if matches!(answer, Released::Offline | Released::Lingering) {
            scripts::acknowledge(&c, keys, &entry.client, conn_id).await;
        }
        let record = keys.node_key(&self.node_id, "conns");
        let node_done: Result<(), _> = self.on_node().hdel(record, conn_id).await;
        self.after_release(conn_id, &entry, answer, node_done)
            .await?;
        Some((answer, entry))
    }

    /// The record of a release Redis answered: gone, `Acted` (the node's record is
    /// still there), the ghost's (Redis lost it), or `Failed` again (`None`).
    async fn after_release(
        &self,
        conn_id: &str,
        entry: &Unsettled,
        answer: Released,
        node_done: Result<(), fred::error::Error>,
    ) -> Option<()> {
        if answer == Released::Unknown {
            let Some(ghosted) = self.unknown(entry, conn_id).await else {
                self.set_phase(conn_id, Phase::Failed);
                self.dirty.store(true, Ordering::Release);
                return None;
            };
            if ghosted {
                return Some(());
            }
        }
        if let Err(e) = node_done {
            tracing::warn!(error = %e, "release: node record not removed");
            self.set_phase(conn_id, Phase::Acted);
            self.dirty.store(true, Ordering::Release);
        } else {
            self.unsettled.lock().remove(conn_id);
        }
        Some(())
    }

    /// Waits while `conn_id` is being registered again, so that its release runs
    /// after the registration and never before it (which would leave it in Redis).
    async fn not_registering(&self, conn_id: &str) {
        loop {
            let notified = self.registered.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.registering.lock().as_deref() != Some(conn_id) {
                return;
            }
            notified.await;
        }
    }

    fn set_phase(&self, conn_id: &str, phase: Phase) {
        if let Some(u) = self.unsettled.lock().get_mut(conn_id) {
            u.phase = phase;
        }
    }

    fn released(self: &Arc<Self>, client: Arc<str>, r: Released, token: String) {
        match r {
            Released::Nothing | Released::Unknown => {}
            Released::Offline => self.went_offline(&client),
            Released::Lingering => self.linger(client, token),
        }
    }

    /// Starts the offline grace's timer (cancelled by a reconnect anywhere: the
    /// token no longer matches when it fires). The grace is also recorded under the
    /// node (`lingering`: client → token), so that if this node dies the reaper ends it.
    fn linger(self: &Arc<Self>, client: Arc<str>, token: String) {
        self.lingers.lock().insert(client.clone(), token.clone());
        let grace = self.settings.offline_grace;
        let stop = self.stop.clone();
        let me = self.clone();
        self.tasks.spawn(async move {
            let key = me.link.keys().node_key(&me.node_id, "lingering");
            let recorded: Result<(), _> = me.on_node().hset(key, (&*client, token.as_str())).await;
            if let Err(e) = recorded {
                tracing::debug!(error = %e, "grace not recorded under the node");
            }
            tokio::select! {
                _ = tokio::time::sleep(grace) => {}
                _ = stop.cancelled() => return,
            }
            let mine = {
                let mut lingers = me.lingers.lock();
                let mine = lingers.get(&client).is_some_and(|t| *t == token);
                if mine {
                    lingers.remove(&client);
                }
                mine
            };
            if mine {
                me.expire(&client, &token).await;
            }
        });
    }

    /// Ends a grace: offline unless the client came back somewhere since.
    pub(crate) async fn expire(&self, client: &str, token: &str) {
        let turn = self.turns.take(&Arc::from(client)).await;
        let c = self.on_client(client);
        match scripts::expire(&c, self.link.keys(), client, token).await {
            Ok(true) => self.went_offline(client),
            Ok(false) => {}
            Err(e) => tracing::warn!(client, error = %e, "offline grace: redis unreachable"),
        }
        drop(turn);
        let key = self.link.keys().node_key(&self.node_id, "lingering");
        let _: Result<(), _> = self.on_node().hdel(key, client).await;
    }

    /// Fires `client.offline` on this node (the one that made the transition).
    pub(crate) fn went_offline(&self, client: &str) {
        self.registry.events().emit(
            EventType::ClientOffline,
            EventFields {
                client_id: Some(client),
                ..Default::default()
            },
        );
        let key = self.link.keys().global("clients");
        let c = self.on(&key);
        let client = client.to_owned();
        self.tasks.spawn(async move {
            let _: Result<(), _> = c.zrem(key, client).await;
        });
    }

    /// Adds an online client to the cluster's index (`/api/clients`).
    pub(crate) fn index_client(&self, client: Arc<str>) {
        let key = self.link.keys().global("clients");
        let c = self.on(&key);
        self.tasks.spawn(async move {
            let _: Result<(), _> = c.zadd(key, None, None, false, false, (0.0, &*client)).await;
        });
    }
}

/// The close an eviction under `replace_oldest` sends.
pub(crate) fn replaced() -> Closing {
    Closing::new(CloseCode::REPLACED, "replaced by a newer connection")
}
