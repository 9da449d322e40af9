//! Which channels this node follows on Redis pub/sub: a channel is followed while
//! it has local subscribers or a subscribe to it is in progress (a [`Hold`]), and
//! let go once neither is left. Following starts with a (S)SUBSCRIBE that has been
//! acknowledged, before the subscribe reads the channel's position, so that no
//! message falls between the two. A channel's (un)subscribes take its own async
//! lock, so a let-go never overtakes a new follow of the same channel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use fred::clients::SubscriberClient;
use fred::interfaces::{ClientLike, PubsubInterface};
use parking_lot::Mutex;
use tokio::sync::mpsc::UnboundedSender;

use crate::link::Link;

#[derive(Debug, Default)]
struct Entry {
    /// Subscribes in progress (changed under the table's lock).
    holds: AtomicUsize,
    /// Whether Redis acknowledged the (S)SUBSCRIBE and no UNSUBSCRIBE followed.
    subscribed: tokio::sync::Mutex<bool>,
}

/// The followed channels.
#[derive(Debug)]
pub struct Follower {
    link: Arc<Link>,
    table: Mutex<HashMap<Arc<str>, Arc<Entry>>>,
    /// Told a channel's name when a hold ends (it may have no subscriber left).
    changed: UnboundedSender<Arc<str>>,
}

/// Keeps a channel followed while a subscribe to it runs.
#[derive(Debug)]
pub struct Hold<'a> {
    follower: &'a Follower,
    channel: Arc<str>,
    entry: Arc<Entry>,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        {
            let _table = self.follower.table.lock();
            self.entry.holds.fetch_sub(1, Ordering::AcqRel);
        }
        let _ = self.follower.changed.send(self.channel.clone());
    }
}

impl Follower {
    /// Nothing followed yet.
    pub fn new(link: Arc<Link>, changed: UnboundedSender<Arc<str>>) -> Self {
        Self {
            link,
            table: Mutex::new(HashMap::new()),
            changed,
        }
    }

    /// Follows `channel` (subscribing on Redis if it is not yet) and holds it
    /// followed until the [`Hold`] drops.
    pub async fn acquire(&self, channel: &str) -> Result<Hold<'_>, fred::error::Error> {
        let (channel, entry) = {
            let mut table = self.table.lock();
            let (name, entry) = match table.get_key_value(channel) {
                Some((k, e)) => (k.clone(), e.clone()),
                None => {
                    let name: Arc<str> = channel.into();
                    let entry = Arc::new(Entry::default());
                    table.insert(name.clone(), entry.clone());
                    (name, entry)
                }
            };
            entry.holds.fetch_add(1, Ordering::AcqRel);
            (name, entry)
        };
        let hold = Hold {
            follower: self,
            channel,
            entry,
        };
        let mut subscribed = hold.entry.subscribed.lock().await;
        if !*subscribed {
            self.pubsub(&hold.channel, true).await?;
            *subscribed = true;
        }
        drop(subscribed);
        Ok(hold)
    }

    /// Stops following `channel` if no subscribe holds it and `idle()` (no local
    /// subscriber) still holds once its lock is taken. `Ok(true)` if it was let go;
    /// a failed UNSUBSCRIBE leaves it followed (the caller tries again later).
    pub async fn release_if(
        &self,
        channel: &str,
        idle: impl Fn() -> bool,
    ) -> Result<bool, fred::error::Error> {
        let Some(entry) = self.table.lock().get(channel).cloned() else {
            return Ok(false);
        };
        let mut subscribed = entry.subscribed.lock().await;
        if entry.holds.load(Ordering::Acquire) > 0 || !idle() {
            return Ok(false);
        }
        if *subscribed {
            self.pubsub(channel, false).await?;
            *subscribed = false;
        }
        let mut table = self.table.lock();
        let ours = table.get(channel).is_some_and(|e| Arc::ptr_eq(e, &entry));
        if ours && entry.holds.load(Ordering::Acquire) == 0 {
            table.remove(channel);
        }
        Ok(true)
    }

    /// A Redis Cluster's slot map changed: every followed channel whose shard
    /// subscriber is no longer the one of the primary that owns its slot is
    /// subscribed on the new owner (before the caller reads the heads again), and
    /// let go on the old one when that one is connected.
    pub async fn refollow(&self) {
        let holders: Vec<_> = self
            .link
            .shard_subscribers()
            .into_iter()
            .map(|s| {
                let tracked = s.tracked_shard_channels();
                (s, tracked)
            })
            .collect();
        for channel in self.followed() {
            let Some(entry) = self.table.lock().get(&*channel).cloned() else {
                continue;
            };
            let subscribed = entry.subscribed.lock().await;
            let name = self.link.keys().channel_pubsub(&channel);
            let Some(owner) = self.link.subscriber_for(&name) else {
                return;
            };
            let held = |s: &SubscriberClient| {
                holders
                    .iter()
                    .any(|(h, t)| h.id() == s.id() && t.contains(name.as_str()))
            };
            if !*subscribed || held(&owner) {
                continue;
            }
            if let Err(e) = owner.ssubscribe(&name).await {
                tracing::warn!(error = %e, channel = &*channel, "redis broker: following a moved channel failed");
                continue;
            }
            for (old, tracked) in &holders {
                if old.id() != owner.id() && old.is_connected() && tracked.contains(name.as_str()) {
                    let _ = old.sunsubscribe(&name).await;
                }
            }
            drop(subscribed);
        }
    }

    /// Whether `channel` is followed (or being followed) now.
    pub fn is_followed(&self, channel: &str) -> bool {
        self.table.lock().contains_key(channel)
    }

    /// Every followed channel.
    pub fn followed(&self) -> Vec<Arc<str>> {
        self.table.lock().keys().cloned().collect()
    }

    async fn pubsub(&self, channel: &str, on: bool) -> Result<(), fred::error::Error> {
        let name = self.link.keys().channel_pubsub(channel);
        let Some(sub) = self.link.subscriber_for(&name) else {
            return Err(fred::error::Error::new(
                fred::error::ErrorKind::Cluster,
                "the cluster's slot map is not known yet",
            ));
        };
        match (self.link.is_cluster(), on) {
            (true, true) => sub.ssubscribe(name).await,
            (true, false) => sub.sunsubscribe(name).await,
            (false, true) => sub.subscribe(name).await,
            (false, false) => sub.unsubscribe(name).await,
        }
    }
}
