//! Cluster mode's channels (SPEC sections 7 and 10) over real sockets: two or three
//! in-process nodes sharing a real `redis-server` (or a 3-shard Redis Cluster):
//! cross-node publish and idempotency, resume on another node, Redis killed,
//! restarted empty, paused, pub/sub connections cut, and no node following a
//! channel it has no subscriber of.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::time::Duration;

use serde_json::{json, Value};
use support::cluster::*;
use support::*;
use tether_redis::testing::{RedisCluster, RedisServer};
use tether_server::config::BrokerKind;

/// Waits (≤ 10 s) until `s`'s `/api/channels` lists `channel` with `subs`.
async fn channel_listed(s: &TestServer, channel: &str, subs: u64) {
    let mut last = Value::Null;
    for _ in 0..200 {
        last = s.get("/api/channels").await.1;
        let found = last["channels"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["name"] == channel && c["subscribers"] == subs);
        if found {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{channel} with {subs} subscribers not listed: {last}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publish_on_one_node_reaches_subscribers_on_another_once() {
    let redis = RedisServer::start().unwrap();
    let a = node(BrokerKind::Redis, &redis.url(), "node-a").await;
    let b = node(BrokerKind::Redis, &redis.url(), "node-b").await;
    let (mut ws, _) = b.ws("?client=bob").await;
    let sub = subscribe(&mut ws, "room", None).await;
    assert_eq!(sub["type"], "subscribed", "{sub}");
    assert_eq!(split(&sub["position"]).1, 0);
    // Presence and the channel list are cluster-wide (written a moment later).
    channel_listed(&a, "room", 1).await;
    let presence = a.get("/api/channels/room/presence").await.1;
    assert_eq!(
        presence,
        json!({"clients": [{"client_id": "bob", "connections": 1}]})
    );

    let (st, first) = publish(&a, "room", json!({"n": 1}), Some("k1")).await;
    assert_eq!(st, 200, "{first}");
    assert_eq!(
        (first["duplicate"].as_bool(), first["subscribers"].as_u64()),
        (Some(false), Some(1))
    );
    let m = message(&mut ws, "room").await;
    assert_eq!(
        (&m["position"], &m["id"], &m["data"]),
        (&first["position"], &first["id"], &json!({"n": 1}))
    );
    assert_eq!(
        split(&first["position"]).0,
        split(&sub["position"]).0,
        "one epoch"
    );

    // The same key on the other node: the first result, nothing delivered.
    let (st, again) = publish(&b, "room", json!({"n": 2}), Some("k1")).await;
    assert_eq!(st, 200, "{again}");
    assert_eq!(again["duplicate"], true);
    assert_eq!(
        (&again["position"], &again["id"]),
        (&first["position"], &first["id"])
    );
    assert_alive(&mut ws).await; // no message came before the pong
    let next = published(&a, "room", json!({"n": 3})).await;
    assert_eq!(split(&next["position"]).1, 2);
    assert_eq!(message(&mut ws, "room").await["position"], next["position"]);

    // Only B follows the channel, and not once its subscriber is gone.
    followers_become(&[&redis], "room", false, 1).await;
    client_close(ws).await;
    followers_become(&[&redis], "room", false, 0).await;
    for s in [&a, &b] {
        s.assert_clean().await;
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resume_on_another_node_recovers_exactly_what_was_missed() {
    let redis = RedisServer::start().unwrap();
    let a = node(BrokerKind::Redis, &redis.url(), "node-a").await;
    let b = node(BrokerKind::Redis, &redis.url(), "node-b").await;
    let (mut ws, _) = a.ws("?client=r").await;
    subscribe(&mut ws, "feed", None).await;
    let mut last = Value::Null;
    for i in 1..=3 {
        published(&a, "feed", json!(i)).await;
        last = message(&mut ws, "feed").await["position"].clone();
    }
    client_close(ws).await;
    followers_become(&[&redis], "feed", false, 0).await;
    let mut missed = Vec::new();
    for i in 4..=8 {
        missed.push(published(&a, "feed", json!(i)).await);
    }
    let (mut ws, _) = b.ws("?client=r").await;
    let sub = subscribe(&mut ws, "feed", last.as_str()).await;
    assert_eq!(
        (sub["recovered"].as_bool(), sub["missed"].as_u64()),
        (Some(true), Some(5)),
        "{sub}"
    );
    for p in &missed {
        let m = message(&mut ws, "feed").await;
        assert_eq!((&m["position"], &m["id"]), (&p["position"], &p["id"]));
    }
    let live = published(&a, "feed", json!(9)).await;
    assert_eq!(message(&mut ws, "feed").await["position"], live["position"]);
    assert_alive(&mut ws).await; // nothing twice
                                 // History reads the stream on any node.
    let h = a.get("/api/channels/feed/history?limit=100").await.1;
    let offsets: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| split(&m["position"]).1)
        .collect();
    assert_eq!(offsets, (1..=9).collect::<Vec<_>>(), "{h}");
    client_close(ws).await;
    followers_become(&[&redis], "feed", false, 0).await;
    for s in [&a, &b] {
        s.assert_clean().await;
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_killed_then_restarted_empty_starts_a_new_epoch() {
    let mut redis = RedisServer::start().unwrap();
    let a = node(BrokerKind::Redis, &redis.url(), "node-a").await;
    let b = node(BrokerKind::Redis, &redis.url(), "node-b").await;
    let (mut ws, _) = b.ws("?client=k").await;
    subscribe(&mut ws, "live", None).await;
    let before = published(&a, "live", json!(1)).await;
    assert_eq!(
        message(&mut ws, "live").await["position"],
        before["position"]
    );

    redis.kill();
    assert!(
        ready_within(&a, false).await,
        "/readyz 503 while Redis is down"
    );
    let (st, body) = publish(&a, "live", json!(2), None).await;
    assert_eq!(
        (st, body["error"].as_str()),
        (503, Some("broker_unavailable")),
        "{body}"
    );
    assert_alive(&mut ws).await; // the connection stays open
    let err = subscribe(&mut ws, "other", None).await;
    assert_eq!(
        (err["type"].as_str(), err["code"].as_str()),
        (Some("error"), Some("broker_unavailable")),
        "{err}"
    );

    redis.restart_empty().unwrap();
    assert!(
        ready_within(&a, true).await && ready_within(&b, true).await,
        "ready again"
    );
    let after = published(&a, "live", json!(3)).await;
    let (old, new) = (split(&before["position"]), split(&after["position"]));
    assert_ne!(old.0, new.0, "a new epoch");
    assert_eq!(new.1, 1);
    // The subscriber that stayed connected gets it, in the new epoch.
    let m = message(&mut ws, "live").await;
    assert_eq!(m["position"], after["position"]);
    assert!(metric(&b, "tether_broker_epoch_resets_total").await >= 1);
    assert_eq!(metric(&a, "tether_broker_up").await, 1);
    // A resume from the old epoch cannot recover.
    let (mut ws2, _) = a.ws("?client=k2").await;
    let sub = subscribe(&mut ws2, "live", before["position"].as_str()).await;
    assert_eq!(
        (sub["recovered"].as_bool(), split(&sub["position"])),
        (Some(false), new.clone()),
        "{sub}"
    );
    client_close(ws).await;
    client_close(ws2).await;
    followers_become(&[&redis], "live", false, 0).await;
    for s in [&a, &b] {
        s.assert_clean().await;
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_pubsub_lost_are_filled_from_history_and_a_pause_loses_nothing() {
    let redis = RedisServer::start().unwrap();
    let a = node(BrokerKind::Redis, &redis.url(), "node-a").await;
    let b = node(BrokerKind::Redis, &redis.url(), "node-b").await;
    let (mut ws, _) = b.ws("?client=g").await;
    subscribe(&mut ws, "gap", None).await;
    let first = published(&a, "gap", json!(0)).await;
    assert_eq!(message(&mut ws, "gap").await["position"], first["position"]);

    // Cut every pub/sub connection: B's subscriber reconnects after its backoff,
    // and what is published meanwhile never reaches it on pub/sub.
    let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).unwrap();
    assert_ne!(killed, "0", "a pub/sub connection was cut");
    let mut sent = Vec::new();
    for i in 1..=5 {
        sent.push(published(&a, "gap", json!(i)).await);
    }
    for p in &sent {
        let m = message(&mut ws, "gap").await;
        assert_eq!((&m["position"], &m["id"]), (&p["position"], &p["id"]));
    }
    // They came back from the stream, not from pub/sub.
    assert!(metric(&b, "tether_broker_gaps_filled_total").await >= 1);

    // Paused, then continued with its data: same epoch, positions continue.
    let pid = redis.pid().unwrap().to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap();
        assert!(ok.success());
    };
    signal("-STOP");
    let (st, body) = publish(&a, "gap", json!("paused"), None).await;
    signal("-CONT");
    assert_eq!(
        (st, body["error"].as_str()),
        (503, Some("broker_unavailable")),
        "{body}"
    );
    assert!(ready_within(&a, true).await, "ready after the pause");
    let after = published(&a, "gap", json!(6)).await;
    let (e0, o0) = split(&sent[4]["position"]);
    let (e1, o1) = split(&after["position"]);
    assert_eq!(e1, e0, "same epoch");
    // The publish during the pause may have been applied (its reply timed out)
    // or not; either way the subscriber gets every position, in order.
    assert!(o1 == o0 + 1 || o1 == o0 + 2, "{o0} -> {o1}");
    for o in o0 + 1..=o1 {
        let m = message(&mut ws, "gap").await;
        assert_eq!(split(&m["position"]), (e0.clone(), o));
    }
    assert_alive(&mut ws).await;
    client_close(ws).await;
    followers_become(&[&redis], "gap", false, 0).await;
    for s in [&a, &b] {
        s.assert_clean().await;
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_cluster_carries_channels_on_every_shard() {
    let cluster = RedisCluster::start(3).unwrap();
    let shards: Vec<&RedisServer> = cluster.shards.iter().collect();
    let url = cluster.url();
    let a = node(BrokerKind::RedisCluster, &url, "node-a").await;
    let b = node(BrokerKind::RedisCluster, &url, "node-b").await;
    let channels: Vec<String> = (0..6).map(|i| format!("c{i}")).collect();
    // The channels' hash slots fall on more than one shard.
    let owners: std::collections::HashSet<usize> = channels
        .iter()
        .map(|c| {
            let key = format!("tether:{{{c}}}:meta");
            let slot = shards[0].cli(&["CLUSTER", "KEYSLOT", &key]).unwrap();
            let slot: u64 = slot.parse().unwrap();
            slot * 3 / 16384
        })
        .map(|s| s as usize)
        .collect();
    assert!(owners.len() > 1, "channels on several shards");

    let (mut ws, _) = b.ws("?client=cl").await;
    for c in &channels {
        subscribe(&mut ws, c, None).await;
    }
    let mut lasts = Vec::new();
    for c in &channels {
        let p = published(&a, c, json!(c)).await;
        let m = message(&mut ws, c).await;
        assert_eq!((&m["position"], &m["id"]), (&p["position"], &p["id"]));
        lasts.push(p["position"].clone());
    }
    for c in &channels {
        followers_become(&shards, c, true, 1).await;
    }
    client_close(ws).await;
    // Missed while away, recovered on the other node.
    for c in &channels {
        published(&b, c, json!(2)).await;
    }
    let (mut ws, _) = a.ws("?client=cl").await;
    for (c, last) in channels.iter().zip(&lasts) {
        let sub = subscribe(&mut ws, c, last.as_str()).await;
        assert_eq!(
            (sub["recovered"].as_bool(), sub["missed"].as_u64()),
            (Some(true), Some(1)),
            "{sub}"
        );
        let m = message(&mut ws, c).await;
        assert_eq!(split(&m["position"]).1, 2);
    }
    client_close(ws).await;
    for c in &channels {
        followers_become(&shards, c, true, 0).await;
    }
    for s in [&a, &b] {
        s.assert_clean().await;
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_restarted_under_its_id_clears_what_its_previous_life_left() {
    let redis = RedisServer::start().unwrap();
    // What a node that died without cleaning up leaves behind.
    redis
        .cli(&["HSET", "tether:{room}:presence", "node-a/ghost", "1"])
        .unwrap();
    redis
        .cli(&["HSET", "tether:{room}:nodes", "node-a", "1"])
        .unwrap();
    redis
        .cli(&["SADD", "tether:{n:node-a}:channels", "room"])
        .unwrap();
    redis
        .cli(&["SADD", "tether:{global}:channel-nodes", "node-a"])
        .unwrap();
    let a = node(BrokerKind::Redis, &redis.url(), "node-a").await;
    let (mut ws, _) = a.ws("?client=real").await;
    subscribe(&mut ws, "room", None).await;
    channel_listed(&a, "room", 1).await;
    let presence = a.get("/api/channels/room/presence").await.1;
    assert_eq!(
        presence,
        json!({"clients": [{"client_id": "real", "connections": 1}]})
    );
    let r = published(&a, "room", json!(1)).await;
    assert_eq!(r["subscribers"], 1);
    client_close(ws).await;
    followers_become(&[&redis], "room", false, 0).await;
    // Nothing of node-a is left once its last subscriber went.
    assert_eq!(redis.cli(&["HLEN", "tether:{room}:presence"]).unwrap(), "0");
    assert_eq!(redis.cli(&["HLEN", "tether:{room}:nodes"]).unwrap(), "0");
    a.assert_clean().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn forget_node_removes_a_nodes_presence_from_every_channel() {
    let redis = RedisServer::start().unwrap();
    let a = node(BrokerKind::Redis, &redis.url(), "node-a").await;
    let b = node(BrokerKind::Redis, &redis.url(), "node-b").await;
    let (mut wa, _) = a.ws("?client=ann").await;
    let (mut wb, _) = b.ws("?client=ben").await;
    for ch in ["x", "y"] {
        subscribe(&mut wa, ch, None).await;
        subscribe(&mut wb, ch, None).await;
    }
    channel_listed(&a, "x", 2).await;
    channel_listed(&a, "y", 2).await;
    // What the registry's reaper does once node-b's heartbeat expired.
    let broker = a.app.redis_broker.clone().unwrap();
    assert_eq!(broker.forget_node("node-b").await, Ok(2));
    for ch in ["x", "y"] {
        let p = a.get(&format!("/api/channels/{ch}/presence")).await.1;
        assert_eq!(
            p,
            json!({"clients": [{"client_id": "ann", "connections": 1}]})
        );
    }
    assert_eq!(published(&a, "x", json!(1)).await["subscribers"], 1);
    assert_eq!(broker.forget_node("node-b").await, Ok(0), "nothing left");
    client_close(wa).await;
    client_close(wb).await;
    for ch in ["x", "y"] {
        followers_become(&[&redis], ch, false, 0).await;
    }
    for s in [&a, &b] {
        s.assert_clean().await;
    }
    a.stop().await;
    b.stop().await;
}
