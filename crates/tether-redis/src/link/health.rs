//! Keeps [`Link::is_up`](super::Link::is_up) current.
//!
//! - One Redis: a connection error makes it false at once; a ping answered (with
//!   the subscriber connected) makes it true.
//! - A Redis Cluster: every tick reads the slot map again and asks every primary,
//!   on its own connection, for `CLUSTER INFO`; a primary counts when it answers
//!   `cluster_state:ok` (a PING would not do: it answers PONG even while the shard
//!   refuses every key with CLUSTERDOWN). The link is up while **most primaries**
//!   count. So a dead shard leaves the node ready when the cluster keeps serving the
//!   other slots (`cluster-require-full-coverage no`; its channels answer 503 on
//!   their own), but not under the default `yes`, where every shard refuses every
//!   command once the dead one is marked failed; and a node that reaches no shard,
//!   or only a minority of them, is not ready: Redis itself refuses every command on
//!   the minority side of a partition. One shard's connection errors change nothing
//!   by themselves (the other shards still answer).

use std::collections::BTreeSet;
use std::sync::Arc;

use fred::interfaces::{ClientLike, ClusterInterface, EventInterface};
use tokio_util::sync::CancellationToken;

use super::{Link, HEALTH_EVERY};

/// The health task: runs until `stop`, then quits every client.
pub(super) async fn run(link: Arc<Link>, stop: CancellationToken) {
    let mut errors = link.commands.error_rx();
    let mut sub_errors = link.subscriber.error_rx();
    let mut tick = tokio::time::interval(HEALTH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let cluster = link.shards.is_some();
    let mut down = BTreeSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            Ok(_) = errors.recv(), if !cluster => set_up(&link, false),
            Ok(_) = sub_errors.recv(), if !cluster => set_up(&link, false),
            _ = tick.tick() => {
                let ok = if cluster {
                    most_primaries_answer(&link, &mut down).await
                } else {
                    link.commands.ping::<()>(None).await.is_ok() && link.subscriber.is_connected()
                };
                set_up(&link, ok);
            }
        }
    }
    if let Some(shards) = &link.shards {
        shards.quit().await;
    }
    let _ = link.subscriber.quit().await;
    let _ = link.commands.quit().await;
}

/// Refreshes the slot map and asks every primary at once; `true` when more than
/// half of them answered `cluster_state:ok`. `down` keeps the primaries that did not (logged as they
/// change).
async fn most_primaries_answer(link: &Link, down: &mut BTreeSet<String>) -> bool {
    let Some(shards) = &link.shards else {
        return false;
    };
    if shards.refresh().await == Some(true) {
        // Channels whose slot moved are followed on their new owner by the broker.
        tracing::info!("redis cluster slot map changed");
        let _ = link.events.send(super::pubsub::Event::Moved);
    }
    let primaries = shards.primaries();
    let pings = primaries.iter().map(|(_, client)| async move {
        match client {
            Some(c) => c
                .cluster_info::<String>()
                .await
                .is_ok_and(|i| i.contains("cluster_state:ok")),
            None => false,
        }
    });
    let answers = futures_util::future::join_all(pings).await;
    for ((server, _), ok) in primaries.iter().zip(&answers) {
        let name = server.to_string();
        match (*ok, down.contains(&name)) {
            (false, false) => {
                tracing::warn!(shard = %name, "redis cluster shard unreachable or not serving");
                down.insert(name);
            }
            (true, true) => {
                tracing::info!(shard = %name, "redis cluster shard serving");
                down.remove(&name);
            }
            _ => {}
        }
    }
    let answered = answers.iter().filter(|ok| **ok).count();
    answered * 2 > primaries.len()
}

fn set_up(link: &Link, up: bool) {
    link.up.send_if_modified(|was| {
        let changed = *was != up;
        if changed {
            if up {
                tracing::info!("redis reachable");
            } else {
                tracing::warn!("redis unreachable");
            }
        }
        *was = up;
        changed
    });
}
