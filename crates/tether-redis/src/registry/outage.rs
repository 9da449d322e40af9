//! What a node owes the cluster after Redis was unreachable, so that every client
//! session still gets exactly one `client.online` and one `client.offline`
//! (SPEC sections 3 and 10):
//!
//! - **Unsettled releases.** A release is recorded (with its token) until Redis has
//!   answered it. One that failed, or whose answer was lost, is run again with the
//!   same token at the next re-registration; the release script's receipt replays
//!   the first answer if it had run.
//! - **Redis' epoch.** `{global}:registry-epoch` holds a random value set once; a
//!   different (or new) value after a reconnect means Redis lost its data.
//! - **Ghosts.** After such a loss, a connection whose release reached a Redis
//!   that no longer knew it is registered again as it was (a ghost) and released
//!   only once this node has been connected for `node_ttl` — by then every live node
//!   has re-registered its connections, so the release sees whether the client still
//!   has one anywhere, and the offline fires once.
//! - **Announcements.** A connection admitted during an outage (`admit_local`) fires
//!   no `client.online` then: its registration leaves an offline client `pending`,
//!   and the node announces it afterwards, once cluster-wide (at once when Redis kept
//!   its data, after `node_ttl` when it lost it). So does a handshake committed after
//!   a data loss until it is settled: a client that looks offline then may only look
//!   so (another node has not registered its connections, or its ghosts, yet).
//! - **No admission before re-registration.** After the link changes, the node is
//!   not up (`ClusterRegistry::is_up`, so `/readyz` and admission) until it has
//!   re-registered, so it never admits before it knows whether Redis lost its data.
//! - **Graces** running here when Redis lost its data are written again.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use fred::interfaces::{HashesInterface, KeysInterface, LuaInterface};
use fred::types::SetOptions;
use tether_core::events::EventFields;
use tether_protocol::EventType;

use super::scripts::{self, Mode};
use super::{ClusterRegistry, RegistryError};

/// A grace that Redis lost is written again, unless the client came back: a client
/// `pending` (admitted elsewhere during the outage) is online again, its session
/// continuing. ARGV: token, grace ms. Returns nothing.
const RELINGER: &str = r#"
if redis.call('ZCARD', KEYS[1]) > 0 then
  if redis.call('GET', KEYS[3]) == 'pending' then redis.call('SET', KEYS[3], 'online') end
  return 0
end
if not redis.call('GET', KEYS[3]) then
  redis.call('SET', KEYS[3], 'linger:' .. ARGV[1], 'PX', tonumber(ARGV[2]) + 60000)
end
return 0
"#;

/// A release not yet answered by Redis.
#[derive(Clone, Debug)]
pub(crate) struct Unsettled {
    pub(crate) client: Arc<str>,
    /// The release's token (and its grace's), the same every time it is run.
    pub(crate) token: String,
    /// The connection had been registered committed in Redis (so its client's
    /// session was announced): after a data loss it comes back as a ghost.
    pub(crate) registered: bool,
    pub(crate) phase: Phase,
}

/// Where an unsettled release is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Being run now.
    InFlight,
    /// Redis gave no answer: run it again at the next re-registration.
    Failed,
    /// Answered and acted on, but the node's record (`{n:…}:conns`) was not removed.
    Acted,
    /// Registered again after a data loss, to be released once settled.
    Ghost,
}

impl Unsettled {
    pub(crate) fn new(client: Arc<str>, registered: bool) -> Self {
        Unsettled {
            client,
            token: format!("{:016x}", fastrand::u64(..)),
            registered,
            phase: Phase::InFlight,
        }
    }
}

/// What this node still owes after an outage (besides its ghosts, which are
/// unsettled releases).
#[derive(Debug, Default)]
pub(crate) struct Owed {
    /// Clients left `pending` by this node's registrations.
    announce: HashSet<Arc<str>>,
    /// Redis lost its data: wait until connected for `node_ttl`.
    after_ttl: bool,
}

impl ClusterRegistry {
    /// Takes note of Redis' epoch (starting one if it has none), at the end of a
    /// re-registration: until then [`Self::data_lost`] keeps answering yes.
    pub(crate) async fn note_epoch(&self) -> Result<(), RegistryError> {
        let key = self.link.keys().global("registry-epoch");
        let c = self.on(&key);
        let fresh = format!("{:016x}", fastrand::u64(..));
        let _: Option<String> = c
            .set(&key, fresh, None, Some(SetOptions::NX), false)
            .await?;
        let now: Option<String> = c.get(&key).await?;
        *self.epoch.lock() = now;
        Ok(())
    }

    /// Whether Redis lost its data since this node last took note of its epoch
    /// (a different epoch, or none).
    pub(crate) async fn data_lost(&self) -> Result<bool, RegistryError> {
        let key = self.link.keys().global("registry-epoch");
        let now: Option<String> = self.on(&key).get(&key).await?;
        let known = self.epoch.lock().clone();
        Ok(known.is_some_and(|k| now.is_none_or(|n| n != k)))
    }

    /// Runs the unsettled releases again (same token) and removes the records of
    /// those already answered.
    pub(crate) async fn settle_unsettled(self: &Arc<Self>) -> Result<(), RegistryError> {
        let waiting: Vec<(String, Phase)> = self
            .unsettled
            .lock()
            .iter()
            .filter(|(_, u)| matches!(u.phase, Phase::Failed | Phase::Acted))
            .map(|(id, u)| (id.clone(), u.phase))
            .collect();
        let c = self.on_node();
        let node_conns = self.link.keys().node_key(&self.node_id, "conns");
        for (conn_id, phase) in waiting {
            if phase == Phase::Acted {
                let _: () = c.hdel(&node_conns, &conn_id).await?;
                self.unsettled.lock().remove(&conn_id);
            } else if self.run_release(&conn_id).await.is_none() {
                return Err(RegistryError::Unreachable);
            }
        }
        Ok(())
    }

    /// A registered connection Redis no longer knows: if Redis lost its data, it
    /// comes back as a ghost. Whether it did: `None` when Redis did not answer.
    pub(crate) async fn unknown(&self, entry: &Unsettled, conn_id: &str) -> Option<bool> {
        if !entry.registered {
            return Some(false);
        }
        let lost = match self.data_lost().await {
            Ok(lost) => lost,
            Err(e) => {
                tracing::warn!(error = %e, "release: redis epoch unreadable");
                return None;
            }
        };
        if lost {
            if let Err(e) = self.ghost(entry.client.clone(), conn_id.to_owned()).await {
                tracing::warn!(error = %e, "release: ghost not registered");
                return None;
            }
        }
        Some(lost)
    }

    /// Registers a closed connection again, as it was, to be released later. Under
    /// every policy it is refused when the client is at its limit (then it has
    /// connections elsewhere and owes no offline from here), and it evicts nobody.
    async fn ghost(&self, client: Arc<str>, conn_id: String) -> Result<(), RegistryError> {
        let keys = self.link.keys();
        let record = keys.node_key(&self.node_id, "conns");
        let _: () = self.on_node().hset(&record, (&*conn_id, &*client)).await?;
        let now = super::now_ms().to_string();
        let limit = self.settings.max_connections_per_client.to_string();
        let args = [&*conn_id, &self.node_id, "closed", &now, &limit, "reject"];
        let done =
            scripts::commit(&self.on_client(&client), keys, &client, args, Mode::Lost).await?;
        if done.over {
            let _: () = self.on_node().hdel(&record, &conn_id).await?;
            return Ok(());
        }
        tracing::info!(%client, conn_id, "a release redis lost: registered again until settled");
        let mut ghost = Unsettled::new(client, true);
        ghost.phase = Phase::Ghost;
        // Under the owed lock (then the records'), as `pay_owed` takes them: a ghost
        // is never seen without the wait it comes with.
        let mut owed = self.owed.lock();
        owed.after_ttl = true;
        self.unsettled.lock().insert(conn_id, ghost);
        Ok(())
    }

    /// Writes again the graces running here, which Redis lost with its data.
    pub(crate) async fn relinger(&self) -> Result<(), RegistryError> {
        let graces: Vec<(Arc<str>, String)> = self
            .lingers
            .lock()
            .iter()
            .map(|(c, t)| (c.clone(), t.clone()))
            .collect();
        let keys = self.link.keys();
        let grace = self.settings.offline_grace.as_millis().to_string();
        for (client, token) in graces {
            let ks = scripts::client_keys(keys, &client);
            let _: i64 = self
                .on_client(&client)
                .eval(RELINGER, ks, vec![token.clone(), grace.clone()])
                .await?;
            let _: () = self
                .on_node()
                .hset(
                    keys.node_key(&self.node_id, "lingering"),
                    (&*client, &*token),
                )
                .await?;
        }
        Ok(())
    }

    /// Whether what a data loss left owed is still unsettled (a commit then leaves
    /// an offline-looking client `pending`, announced once settled).
    pub(crate) fn settling_loss(&self) -> bool {
        self.owed.lock().after_ttl
    }

    /// Records what a re-registration left owed.
    pub(crate) fn owe(&self, pending: Option<Arc<str>>, lost: bool) {
        let mut owed = self.owed.lock();
        if let Some(client) = pending {
            owed.announce.insert(client);
        }
        owed.after_ttl |= lost;
    }

    /// Pays what is owed once it may: releases the ghosts and announces the pending
    /// clients. Whatever Redis does not answer stays owed (a ghost's release that
    /// fails is an unsettled release like any other).
    pub(crate) async fn pay_owed(self: &Arc<Self>, now: bool) {
        let (announce, ghosts) = {
            let mut owed = self.owed.lock();
            if owed.after_ttl && !now && !self.connected_for_ttl() {
                return;
            }
            owed.after_ttl = false;
            let ghosts: Vec<String> = self
                .unsettled
                .lock()
                .iter()
                .filter(|(_, u)| u.phase == Phase::Ghost)
                .map(|(id, _)| id.clone())
                .collect();
            (std::mem::take(&mut owed.announce), ghosts)
        };
        for conn_id in ghosts {
            self.run_release(&conn_id).await;
        }
        for client in announce {
            let c = self.on_client(&client);
            let _turn = self.turns.take(&client).await;
            match scripts::announce(&c, self.link.keys(), &client).await {
                Ok(true) => self.went_online(client),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(%client, error = %e, "announcement: redis unreachable");
                    self.owed.lock().announce.insert(client);
                    self.dirty.store(true, Ordering::Release);
                }
            }
        }
    }

    /// Fires `client.online` on this node for a client the cluster announced here
    /// after the fact (its connection is already open), and indexes it.
    pub(crate) fn went_online(&self, client: Arc<str>) {
        self.registry.events().emit(
            EventType::ClientOnline,
            EventFields {
                client_id: Some(&client),
                ..Default::default()
            },
        );
        self.index_client(client);
    }
}
