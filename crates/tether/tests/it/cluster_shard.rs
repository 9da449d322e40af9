//! One shard of a 3-shard Redis Cluster killed (SIGKILL) under two nodes (SPEC
//! section 10: "a shard that is down affects only what lives on it"): its channels
//! answer 503 `broker_unavailable` while the other shards' channels publish and
//! deliver on the same node, the nodes stay ready, and once the shard is back
//! (restarted without its data, same port and cluster config file) its channels
//! work again, in a new epoch. A node that reaches only a minority of the primaries
//! is not ready. Which shard owns a channel, a client or a node comes from
//! `CLUSTER KEYSLOT` and the cluster's slot ranges, never from a guess.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::time::Duration;

use serde_json::{json, Value};
use support::cluster::*;
use support::*;
use tether_redis::testing::{RedisCluster, RedisServer};
use tether_server::config::BrokerKind;

/// Commands time out after this (the nodes' `broker.command_timeout_ms`).
const TIMEOUT_MS: u64 = 500;

/// The first `<prefix><i>` whose key (`key(name)`) is on shard `victim` (`on`) or
/// on another shard (`!on`).
fn named(
    cluster: &RedisCluster,
    prefix: &str,
    key: impl Fn(&str) -> String,
    victim: usize,
    on: bool,
) -> String {
    (0..200)
        .map(|i| format!("{prefix}{i}"))
        .find(|n| cluster.shard_of(&key(n)).map(|s| s == victim) == Some(on))
        .expect("a name on the wanted shard")
}

/// A client's registry key (its shard is the client's).
fn client_key(client: &str) -> String {
    format!("tether:{{c:{client}}}:conns")
}

/// SIGKILLs shard `victim` and waits until the others have marked it failed.
fn kill_shard(cluster: &mut RedisCluster, victim: usize) {
    cluster.shards[victim].kill();
    cluster.wait_marked_failed(victim, true).unwrap();
}

/// Restarts shard `victim` without its data (same port and cluster config) and
/// waits until the cluster serves every slot again.
fn restart_shard_empty(cluster: &mut RedisCluster, victim: usize) {
    cluster.shards[victim].restart_empty().unwrap();
    cluster.wait_marked_failed(victim, false).unwrap();
    cluster.wait_ok().unwrap();
}

fn channel_key(ch: &str) -> String {
    format!("tether:{{{ch}}}:meta")
}

/// The shard to kill: not the one holding the cluster-wide registry keys.
fn victim(cluster: &RedisCluster) -> usize {
    let global = cluster.shard_of("tether:{global}:nodes").unwrap();
    (global + 1) % cluster.shards.len()
}

/// A node whose own registry keys (`{n:<id>}`) are not on `victim`.
async fn node_off(cluster: &RedisCluster, prefix: &str, victim: usize) -> TestServer {
    let id = named(
        cluster,
        prefix,
        |n| format!("tether:{{n:{n}}}:alive"),
        victim,
        false,
    );
    node_with(BrokerKind::RedisCluster, &cluster.url(), &id, |c| {
        c.broker.command_timeout_ms = TIMEOUT_MS.try_into().unwrap();
    })
    .await
}

/// Publishes until it answers 200 (≤ 10 s): a restarted shard answers
/// CLUSTERDOWN until it has caught up with the cluster.
async fn published_eventually(s: &TestServer, ch: &str, data: Value) -> Value {
    let mut last = Value::Null;
    for _ in 0..100 {
        let (st, body) = publish(s, ch, data.clone(), None).await;
        if st == 200 {
            return body;
        }
        assert_eq!(body["error"], "broker_unavailable", "{body}");
        last = body;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{ch} never published again: {last}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_shard_fails_only_its_own_channels_and_they_come_back() {
    let mut cluster = RedisCluster::start(3).unwrap();
    let victim = victim(&cluster);
    let a = node_off(&cluster, "a", victim).await;
    let b = node_off(&cluster, "b", victim).await;
    let live = named(&cluster, "live", channel_key, victim, false);
    let dead = named(&cluster, "dead", channel_key, victim, true);
    let client = named(&cluster, "u", client_key, victim, false);
    let (mut ws, _) = b.ws(&format!("?client={client}")).await;
    for ch in [&live, &dead] {
        assert_eq!(subscribe(&mut ws, ch, None).await["type"], "subscribed");
    }
    let mut before = Vec::new();
    for ch in [&live, &dead] {
        let p = published(&a, ch, json!("before")).await;
        assert_eq!(message(&mut ws, ch).await["position"], p["position"]);
        before.push(p);
    }

    cluster.shards[victim].kill();
    // The others mark it failed after `cluster-node-timeout`: from then on a cluster
    // with the default `cluster-require-full-coverage yes` refuses every command.
    cluster.wait_marked_failed(victim, true).unwrap();
    for s in [&a, &b] {
        assert!(ready_within(s, true).await, "ready with one shard down");
        assert_eq!(metric(s, "tether_broker_up").await, 1);
    }
    // A channel on a live shard: published and delivered, on the same node.
    let p = published(&a, &live, json!("during")).await;
    let m = message(&mut ws, &live).await;
    assert_eq!(
        (&m["position"], &m["data"]),
        (&p["position"], &json!("during"))
    );
    assert_eq!(split(&p["position"]).1, 2);
    // A channel on the dead shard: 503 after the command timeout, never a hang.
    let (st, body) = publish(&a, &dead, json!("lost"), None).await;
    assert_eq!(
        (st, body["error"].as_str()),
        (503, Some("broker_unavailable")),
        "{body}"
    );
    let (st, body) = b.get(&format!("/api/channels/{dead}/history")).await;
    assert_eq!(
        (st, body["error"].as_str()),
        (503, Some("broker_unavailable")),
        "{body}"
    );
    // A new subscribe: refused on the dead shard, answered on a live one.
    let other_dead = named(&cluster, "dead-new", channel_key, victim, true);
    let err = subscribe(&mut ws, &other_dead, None).await;
    assert_eq!(
        (err["type"].as_str(), err["code"].as_str()),
        (Some("error"), Some("broker_unavailable")),
        "{err}"
    );
    let other_live = named(&cluster, "live-new", channel_key, victim, false);
    assert_eq!(
        subscribe(&mut ws, &other_live, None).await["type"],
        "subscribed"
    );
    assert_alive(&mut ws).await;

    // Back without its data (same port, same cluster config file): its channels
    // publish again, in a new epoch, to the subscriber that stayed connected.
    cluster.shards[victim].restart_empty().unwrap();
    cluster.wait_marked_failed(victim, false).unwrap();
    let after = published_eventually(&a, &dead, json!("after")).await;
    let m = message(&mut ws, &dead).await;
    assert_eq!(
        (&m["position"], &m["data"]),
        (&after["position"], &json!("after"))
    );
    let (old, new) = (split(&before[1]["position"]), split(&after["position"]));
    assert_ne!(old.0, new.0, "the shard lost its data: a new epoch");
    assert_eq!(new.1, 1);
    // The live shard's channel kept its epoch throughout.
    let p = published(&b, &live, json!("still")).await;
    assert_eq!(split(&p["position"]), (split(&before[0]["position"]).0, 3));
    assert_eq!(message(&mut ws, &live).await["position"], p["position"]);
    assert_alive(&mut ws).await;

    client_close(ws).await;
    let shards: Vec<&RedisServer> = cluster.shards.iter().collect();
    for ch in [&live, &dead, &other_live, &other_dead] {
        followers_become(&shards, ch, true, 0).await;
    }
    for s in [&a, &b] {
        s.assert_clean().await;
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_reaches_only_a_minority_of_the_primaries_is_not_ready() {
    let mut cluster = RedisCluster::start(3).unwrap();
    let keep = cluster.shard_of("tether:{global}:nodes").unwrap();
    let a = node_off(&cluster, "a", (keep + 1) % 3).await;
    let gone: Vec<usize> = (0..3).filter(|i| *i != keep).collect();
    // Its own registry keys may be on a shard that goes: that is the point.
    let kept = named(&cluster, "k", channel_key, keep, true);
    published(&a, &kept, json!(1)).await;
    for i in &gone {
        cluster.shards[*i].kill();
    }
    assert!(
        ready_within(&a, false).await,
        "/readyz 503 with 1 of 3 primaries"
    );
    assert_eq!(metric(&a, "tether_broker_up").await, 0);
    // The shard left knows it is on the minority side: it serves nothing either.
    let info = |i: usize| cluster.shards[i].cli(&["CLUSTER", "INFO"]).unwrap();
    for _ in 0..100 {
        if info(keep).contains("cluster_state:fail") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(info(keep).contains("cluster_state:fail"), "{}", info(keep));
    let (st, body) = publish(&a, &kept, json!(2), None).await;
    assert_eq!(
        (st, body["error"].as_str()),
        (503, Some("broker_unavailable")),
        "{body}"
    );

    for i in &gone {
        cluster.shards[*i].restart_empty().unwrap();
    }
    cluster.wait_ok().unwrap();
    assert!(ready_within(&a, true).await, "ready again");
    let p = published_eventually(&a, &kept, json!(3)).await;
    assert_eq!(split(&p["position"]).1, 2, "the kept shard kept its data");
    a.assert_clean().await;
    a.stop().await;
}

/// The registry's commands go to the shard of their keys (`Link::commands_for`): on
/// fred's clustered client every admission waited for the dead shard and was refused
/// 503 after the command timeout, whichever shard its client was on.
#[tokio::test(flavor = "multi_thread")]
async fn admission_fails_only_for_clients_whose_keys_are_on_the_dead_shard() {
    let mut cluster = RedisCluster::start(3).unwrap();
    let victim = victim(&cluster);
    let a = node_off(&cluster, "a", victim).await;
    let on_dead = named(&cluster, "d", client_key, victim, true);
    let on_live = named(&cluster, "l", client_key, victim, false);
    kill_shard(&mut cluster, victim);
    assert!(ready_within(&a, true).await, "ready with one shard down");
    // `on_unavailable = "reject"` (the default): refused 503 broker_unavailable.
    let (status, body) = refused(&a, &format!("?client={on_dead}")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("broker_unavailable")),
        "{body}"
    );
    let (mut ws, _) = a.ws(&format!("?client={on_live}")).await;
    assert_alive(&mut ws).await;
    client_close(ws).await;

    restart_shard_empty(&mut cluster, victim);
    let mut admitted = None;
    for _ in 0..100 {
        if let Ok((ws, _)) =
            tokio_tungstenite::connect_async(a.ws_url(&format!("?client={on_dead}"))).await
        {
            admitted = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut ws = admitted.expect("admitted once its shard is back");
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    assert_alive(&mut ws).await;
    client_close(ws).await;
    a.assert_clean().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_failover_a_channel_is_followed_on_its_new_primary() {
    let mut cluster = RedisCluster::start_with_replicas(3, 1).unwrap();
    let global = cluster.shard_of("tether:{global}:nodes").unwrap();
    let primaries: Vec<usize> = (0..cluster.shards.len())
        .filter(|i| {
            let key = |n: &str| channel_key(n);
            (0..200).any(|j| cluster.shard_of(&key(&format!("p{j}"))) == Some(*i))
        })
        .collect();
    let victim = *primaries.iter().find(|p| **p != global).unwrap();
    let a = node_off(&cluster, "a", victim).await;
    let b = node_off(&cluster, "b", victim).await;
    // A node whose own record and control channel are on the victim.
    let record = |n: &str| format!("tether:{{n:{n}}}:alive");
    let c_id = named(&cluster, "c", record, victim, true);
    let c = node_with(BrokerKind::RedisCluster, &cluster.url(), &c_id, |_| {}).await;
    let (mut kicked, _) = c.ws("?client=kicked").await;
    let ch = named(&cluster, "moved", channel_key, victim, true);
    let (mut ws, _) = b.ws("?client=f").await;
    assert_eq!(subscribe(&mut ws, &ch, None).await["type"], "subscribed");
    let before = published(&a, &ch, json!(1)).await;
    assert_eq!(message(&mut ws, &ch).await["position"], before["position"]);
    cluster.wait_replicated().unwrap();

    cluster.shards[victim].kill();
    let mut owner = Some(victim);
    for _ in 0..100 {
        owner = cluster.shard_of(&channel_key(&ch));
        if owner.is_some_and(|o| o != victim) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(owner.is_some_and(|o| o != victim), "a replica took over");
    // The new primary has the data: positions continue, and the subscriber that
    // stayed connected gets the message from the new primary's pub/sub.
    let after = published_eventually(&a, &ch, json!(2)).await;
    assert_eq!(split(&after["position"]), (split(&before["position"]).0, 2));
    let m = message(&mut ws, &ch).await;
    assert_eq!(m["position"], after["position"]);
    assert_alive(&mut ws).await;
    // c's control channel moved with its slot: c listens on the new primary, and a
    // kick from a reaches it and is acknowledged.
    let mut closed = json!(null);
    for _ in 0..50 {
        let (_, body) = a
            .post("/api/disconnect", json!({"client_id": "kicked"}))
            .await;
        closed = body;
        if closed == json!({"closed": 1}) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(closed, json!({"closed": 1}));
    assert_eq!(expect_close(&mut kicked).await.1, 4002);

    client_close(ws).await;
    let shards: Vec<&RedisServer> = cluster.shards.iter().collect();
    followers_become(&shards, &ch, true, 0).await;
    for s in [&a, &b, &c] {
        s.assert_clean().await;
    }
    a.stop().await;
    b.stop().await;
    c.stop().await;
}

/// SPEC 10: "the node stays ready unless its registry is unreachable". Every
/// admission writes the node's own record (`{n:<id>}`) first: a node whose record is
/// on the dead shard answers `/readyz` 503 (its heartbeat fails) and refuses
/// handshakes, while a node whose record is elsewhere stays ready and admits.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_own_record_is_on_the_dead_shard_is_not_ready() {
    let mut cluster = RedisCluster::start(3).unwrap();
    let victim = victim(&cluster);
    let record = |n: &str| format!("tether:{{n:{n}}}:alive");
    let quick = |c: &mut tether_server::config::Config| {
        c.broker.command_timeout_ms = TIMEOUT_MS.try_into().unwrap();
        c.broker.node_ttl_ms = 3000.try_into().unwrap();
    };
    let on_id = named(&cluster, "on", record, victim, true);
    let off_id = named(&cluster, "off", record, victim, false);
    let on = node_with(BrokerKind::RedisCluster, &cluster.url(), &on_id, quick).await;
    let off = node_with(BrokerKind::RedisCluster, &cluster.url(), &off_id, quick).await;
    let client = named(&cluster, "u", client_key, victim, false);

    kill_shard(&mut cluster, victim);
    assert!(
        ready_within(&on, false).await,
        "its registry is unreachable"
    );
    assert!(ready_within(&off, true).await, "its registry is reachable");
    let (status, body) = refused(&on, &format!("?client={client}")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("broker_unavailable")),
        "{body}"
    );
    let (mut ws, _) = off.ws(&format!("?client={client}")).await;
    assert_alive(&mut ws).await;
    client_close(ws).await;

    restart_shard_empty(&mut cluster, victim);
    assert!(
        ready_within(&on, true).await,
        "ready again once its shard is back"
    );
    on.assert_clean().await;
    off.assert_clean().await;
    on.stop().await;
    off.stop().await;
}

/// The control channel (a kick across nodes, acknowledged) works with a shard down.
#[tokio::test(flavor = "multi_thread")]
async fn a_kick_across_nodes_is_acknowledged_with_a_shard_down() {
    let mut cluster = RedisCluster::start(3).unwrap();
    let victim = victim(&cluster);
    let a = node_off(&cluster, "a", victim).await;
    let b = node_off(&cluster, "b", victim).await;
    let client = named(&cluster, "k", client_key, victim, false);
    let (mut ws, _) = b.ws(&format!("?client={client}")).await;
    kill_shard(&mut cluster, victim);
    let (status, body) = a
        .post("/api/disconnect", json!({"client_id": client}))
        .await;
    assert_eq!((status, &body), (200, &json!({"closed": 1})), "{body}");
    let (_, code) = expect_close(&mut ws).await;
    assert_eq!(code, 4002);
    a.assert_clean().await;
    b.assert_clean().await;
    a.stop().await;
    b.stop().await;
}
