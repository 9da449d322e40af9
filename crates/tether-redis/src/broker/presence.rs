//! Presence and the channel list across nodes. Each node writes its own part, and
//! only its own, so nodes never race on a field:
//! - `{<ch>}:presence`, hash `<node>/<client>` → that client's connections
//!   subscribed to the channel on that node;
//! - `{<ch>}:nodes`, hash `<node>` → the channel's subscribers on that node (the
//!   publish script sums it: `subscribers`);
//! - `{n:<node>}:channels`, set: the channels where the node has subscribers;
//! - `{global}:channel-nodes`, set: the nodes that keep such a set.
//!
//! The hub tells the presence task which channels changed; the task writes the
//! difference from what Redis last confirmed, a few milliseconds later (presence
//! is eventually consistent), and lets go of channels left without local
//! subscribers ([`Follower::release_if`](super::follow::Follower::release_if)).
//! While Redis is unreachable the changes wait; once it is back every channel is
//! written again in full (it may have come back empty). A dead node's part is
//! removed by [`forget_node`], and a node clears its own before it first writes (a
//! restart under the same id).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use fred::interfaces::{HashesInterface, KeysInterface, SetsInterface};
use fred::types::Value;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

use super::Shared;

/// How often changes that could not be written are tried again.
const RETRY: Duration = Duration::from_secs(1);

/// What Redis confirmed of this node's part of a channel: connections per client,
/// and subscribers.
type Written = HashMap<Arc<str>, (HashMap<String, u32>, usize)>;

/// The presence task: runs until `stop`.
pub(super) async fn run(
    s: Arc<Shared>,
    mut changes: UnboundedReceiver<Arc<str>>,
    stop: CancellationToken,
) {
    let mut dirty: HashSet<Arc<str>> = HashSet::new();
    let mut written = Written::new();
    let mut up = s.link.watch_up();
    let mut retry = tokio::time::interval(RETRY);
    let mut full = false;
    let mut cleared = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            ch = changes.recv() => {
                let Some(ch) = ch else { return };
                dirty.insert(ch);
                while let Ok(ch) = changes.try_recv() {
                    dirty.insert(ch);
                }
            }
            c = up.changed() => {
                if c.is_err() {
                    return;
                }
                if !*up.borrow_and_update() {
                    continue;
                }
                full = true;
                dirty.extend(written.keys().cloned());
                dirty.extend(s.follower.followed());
            }
            _ = retry.tick() => {
                if dirty.is_empty() {
                    continue;
                }
            }
        }
        // A node that restarts under the same id left its previous life's part
        // behind: cleared before this life writes anything.
        if !cleared && s.link.is_up() {
            match forget_node(&s, &s.node_id).await {
                Ok(_) => cleared = true,
                Err(e) => tracing::debug!(error = %e, "stale presence not cleared; retried"),
            }
        }
        if !cleared {
            continue;
        }
        let batch: Vec<Arc<str>> = dirty.drain().collect();
        for ch in batch {
            if !settle(&s, &ch, &mut written, full).await {
                dirty.insert(ch);
            }
        }
        full = !dirty.is_empty() && full;
    }
}

/// Writes this node's part of `ch` and lets go of it when it has no local
/// subscriber; `false` if something must be tried again.
async fn settle(s: &Shared, ch: &Arc<str>, written: &mut Written, full: bool) -> bool {
    let wrote = match write(s, ch, written, full).await {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!(error = %e, channel = &**ch, "presence not written; retried");
            false
        }
    };
    let idle = || s.hub.fanout_size(ch) == 0;
    if !idle() {
        return wrote;
    }
    match s.follower.release_if(ch, idle).await {
        Ok(true) => {
            s.hub.forget(ch);
            wrote
        }
        Ok(false) => wrote,
        Err(e) => {
            tracing::debug!(error = %e, channel = &**ch, "unsubscribe failed; retried");
            false
        }
    }
}

async fn write(
    s: &Shared,
    ch: &Arc<str>,
    written: &mut Written,
    full: bool,
) -> Result<(), fred::error::Error> {
    let local: HashMap<String, u32> = s.hub.presence(ch).into_iter().collect();
    let subs = s.hub.fanout_size(ch);
    let none = (HashMap::new(), 0);
    let prev = written.get(ch).unwrap_or(&none);
    if !full && prev.0 == local && prev.1 == subs {
        return Ok(());
    }
    let keys = s.link.keys();
    let node = &*s.node_id;
    let field = |client: &str| format!("{node}/{client}");
    let (pkey, nkey) = (
        keys.channel_key(ch, "presence"),
        keys.channel_key(ch, "nodes"),
    );
    let set = keys.node_key(node, "channels");
    // The channel's keys on its shard; the node's set and the global one may be on
    // others (a Redis Cluster), so they are written apart.
    let pipe = s.link.channel_commands(ch).pipeline();
    let gone: Vec<String> = prev
        .0
        .keys()
        .filter(|c| !local.contains_key(*c))
        .map(|c| field(c))
        .collect();
    if !gone.is_empty() {
        let _: () = pipe.hdel(&pkey, gone).await?;
    }
    let fields: Vec<(String, i64)> = local
        .iter()
        .filter(|(c, n)| full || prev.0.get(*c) != Some(n))
        .map(|(c, n)| (field(c), i64::from(*n)))
        .collect();
    if !fields.is_empty() {
        let _: () = pipe.hset(&pkey, fields).await?;
    }
    if subs > 0 {
        let _: () = pipe.hset(&nkey, (node, subs as i64)).await?;
    } else {
        let _: () = pipe.hdel(&nkey, node).await?;
    }
    let everyone = keys.global("channel-nodes");
    if !s.link.is_cluster() {
        // One Redis: one round trip.
        if subs > 0 {
            let _: () = pipe.sadd(&set, &**ch).await?;
            let _: () = pipe.sadd(&everyone, node).await?;
        } else {
            let _: () = pipe.srem(&set, &**ch).await?;
        }
        let _: Vec<Value> = pipe.all().await?;
    } else {
        let _: Vec<Value> = pipe.all().await?;
        let mine = s.link.commands_for(&set);
        if subs > 0 {
            let _: () = mine.sadd(&set, &**ch).await?;
            let _: () = s.link.commands_for(&everyone).sadd(&everyone, node).await?;
        } else {
            let _: () = mine.srem(&set, &**ch).await?;
        }
    }
    if subs == 0 {
        written.remove(ch);
    } else {
        written.insert(ch.clone(), (local, subs));
    }
    Ok(())
}

/// Sums a presence hash by client (fields are `<node>/<client>`).
fn by_client(fields: HashMap<String, u64>) -> HashMap<String, u32> {
    let mut out: HashMap<String, u32> = HashMap::new();
    for (f, n) in fields {
        if let Some((_, client)) = f.split_once('/') {
            *out.entry(client.to_owned()).or_insert(0) += n as u32;
        }
    }
    out
}

/// A channel's clients on every node (this node's own view if Redis fails).
pub(super) async fn presence(s: &Shared, ch: &str) -> Vec<(String, u32)> {
    let key = s.link.keys().channel_key(ch, "presence");
    let fields: HashMap<String, u64> = match s.link.channel_commands(ch).hgetall(key).await {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(error = %e, "presence from this node only");
            return s.hub.presence(ch);
        }
    };
    let mut v: Vec<(String, u32)> = by_client(fields).into_iter().collect();
    v.sort();
    v
}

/// Every channel with subscribers on any node: name, subscribers, clients (this
/// node's own view if Redis fails).
pub(super) async fn channels(s: &Shared) -> Vec<(String, usize, usize)> {
    match all_channels(s).await {
        Ok(v) => v,
        Err(e) => {
            tracing::debug!(error = %e, "channels from this node only");
            s.hub.channels()
        }
    }
}

async fn all_channels(s: &Shared) -> Result<Vec<(String, usize, usize)>, fred::error::Error> {
    let keys = s.link.keys();
    let everyone = keys.global("channel-nodes");
    let nodes: Vec<String> = s.link.commands_for(&everyone).smembers(&everyone).await?;
    let mut names: HashSet<String> = HashSet::new();
    for node in nodes {
        let set = keys.node_key(&node, "channels");
        let mine: Vec<String> = s.link.commands_for(&set).smembers(&set).await?;
        names.extend(mine);
    }
    let mut out = Vec::new();
    for name in names {
        let c = s.link.channel_commands(&name);
        let fields: HashMap<String, u64> = c.hgetall(keys.channel_key(&name, "presence")).await?;
        let clients = by_client(fields);
        let subs: usize = clients.values().map(|n| *n as usize).sum();
        if subs > 0 {
            out.push((name, subs, clients.len()));
        }
    }
    out.sort();
    Ok(out)
}

/// Removes `node`'s part of every channel; returns how many channels it had.
pub(super) async fn forget_node(s: &Shared, node: &str) -> Result<usize, fred::error::Error> {
    let keys = s.link.keys();
    let set = keys.node_key(node, "channels");
    let chans: Vec<String> = s.link.commands_for(&set).smembers(&set).await?;
    let prefix = format!("{node}/");
    for ch in &chans {
        let c = s.link.channel_commands(ch);
        let pkey = keys.channel_key(ch, "presence");
        let fields: HashMap<String, u64> = c.hgetall(&pkey).await?;
        let theirs: Vec<String> = fields
            .into_keys()
            .filter(|f| f.starts_with(&prefix))
            .collect();
        if !theirs.is_empty() {
            let _: () = c.hdel(&pkey, theirs).await?;
        }
        let _: () = c.hdel(keys.channel_key(ch, "nodes"), node).await?;
    }
    let _: () = s.link.commands_for(&set).del(&set).await?;
    let everyone = keys.global("channel-nodes");
    let _: () = s.link.commands_for(&everyone).srem(&everyone, node).await?;
    Ok(chans.len())
}
