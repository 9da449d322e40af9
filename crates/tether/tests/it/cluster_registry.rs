//! The cluster registry (SPEC sections 2, 3 and 10): several nodes on one real
//! Redis share the per-client limit, the duplicate policy, online/offline, and the
//! API's view; a dead node is removed by one survivor; a Redis outage refuses new
//! handshakes and the node re-registers its connections once Redis is back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tether_core::ClientLimitPolicy;
use tether_protocol::LifecycleEvent;
use tether_redis::testing::{RedisCluster, RedisServer};
use tether_server::config::{BrokerKind, Config};
use tokio::sync::broadcast::Receiver;

use crate::support::cluster::refused;
use crate::support::{
    self, assert_alive, client_close, collect_events, expect_close, read_sse_until, TestServer,
};

/// A node called `id` on `redis`.
async fn node(redis: &RedisServer, id: &str, f: impl FnOnce(&mut Config)) -> TestServer {
    let url = redis.url();
    let srv = support::start(|c| {
        c.node_id = id.into();
        c.broker.kind = BrokerKind::Redis;
        c.broker.url = url;
        f(c);
    })
    .await;
    wait_joined(redis, &srv, id).await;
    srv
}

/// A node called `id` on a Redis Cluster.
async fn cluster_node(redis: &RedisCluster, id: &str, f: impl FnOnce(&mut Config)) -> TestServer {
    let url = redis.url();
    let srv = support::start(|c| {
        c.node_id = id.into();
        c.broker.kind = BrokerKind::RedisCluster;
        c.broker.url = url;
        f(c);
    })
    .await;
    let shards: Vec<&RedisServer> = redis.shards.iter().collect();
    wait_joined_on(&shards, &srv, id).await;
    srv
}

/// Waits until the node is ready, linked to Redis and listens on its control channel.
async fn wait_joined(redis: &RedisServer, srv: &TestServer, id: &str) {
    wait_joined_on(&[redis], srv, id).await;
}

/// As [`wait_joined`], the subscription found on any of `shards`.
async fn wait_joined_on(shards: &[&RedisServer], srv: &TestServer, id: &str) {
    let channel = format!("tether:{{n:{id}}}:control");
    for _ in 0..200 {
        let subs = shards
            .iter()
            .filter(|r| {
                r.cli(&["pubsub", "numsub", &channel])
                    .is_ok_and(|s| s.ends_with('1'))
            })
            .count();
        // `cluster` is null while the node's link to Redis is down.
        let linked = !srv.stats().await["cluster"].is_null();
        if readyz(srv).await == 200 && subs == 1 && linked {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("node {id} never joined");
}

async fn readyz(srv: &TestServer) -> u16 {
    match srv.http.get(srv.api_url("/readyz")).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// A shard's client keys but release receipts, each of which must expire (SPEC 3's
/// once-only offline after a lost reply needs them a while).
fn client_keys_left(redis: &RedisServer) -> Vec<String> {
    let keys = redis.cli(&["--scan", "--pattern", "tether:{c:*"]).unwrap();
    for receipt in keys.lines().filter(|k| k.contains(":rel:")) {
        let ttl: i64 = redis.cli(&["pttl", receipt]).unwrap().parse().unwrap();
        assert!((1..=600_000).contains(&ttl), "{receipt} pttl {ttl}");
    }
    keys.lines()
        .filter(|k| !k.is_empty() && !k.contains(":rel:"))
        .map(str::to_owned)
        .collect()
}

/// The client keys left in Redis, eventually none.
async fn assert_no_client_keys(redis: &RedisServer) {
    let mut left = Vec::new();
    for _ in 0..100 {
        left = client_keys_left(redis);
        let index = redis.cli(&["zcard", "tether:{global}:clients"]).unwrap();
        if left.is_empty() && index == "0" {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("client keys left in redis: {left:?}");
}

/// A node's configuration under `on_unavailable = "admit_local"`, with a per-client
/// limit of `limit` under `policy` and commands that time out after 300 ms.
fn admit_local(limit: u64, policy: ClientLimitPolicy) -> impl Fn(&mut Config) + Copy {
    move |c: &mut Config| {
        c.clients.max_connections_per_client = limit.try_into().unwrap();
        c.clients.on_client_limit = policy;
        c.broker.on_unavailable = tether_server::config::OnUnavailable::AdmitLocal;
        c.broker.command_timeout_ms = 300.try_into().unwrap();
    }
}

/// Redis stops answering (`CLIENT PAUSE`, its data kept) for `ms`; returns once
/// `srv` has seen it unreachable.
async fn pause_until_seen(redis: &RedisServer, srv: &TestServer, ms: u64) {
    redis
        .cli(&["client", "pause", &ms.to_string(), "all"])
        .unwrap();
    for _ in 0..100 {
        // `cluster` is null while the node's link to Redis is down.
        if srv.stats().await["cluster"].is_null() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    panic!("the node never saw redis unreachable");
}

/// The end of a test: every node back to zero (registry, tasks, channels), no
/// client keys left in Redis, every node stopped.
async fn finish<const N: usize>(redis: &RedisServer, nodes: [TestServer; N]) {
    for n in &nodes {
        n.assert_clean().await;
    }
    assert_no_client_keys(redis).await;
    for n in nodes {
        n.stop().await;
    }
}

/// How many events of `kind` for `client` are in `events`.
fn count(events: &[Arc<LifecycleEvent>], kind: &str, client: &str) -> usize {
    events
        .iter()
        .filter(|e| e.kind.as_str() == kind && e.client_id.as_deref() == Some(client))
        .count()
}

async fn events_of(
    rxs: &mut [&mut Receiver<Arc<LifecycleEvent>>],
    quiet: Duration,
) -> Vec<Arc<LifecycleEvent>> {
    let mut all = Vec::new();
    for rx in rxs.iter_mut() {
        all.extend(collect_events(rx, quiet).await);
    }
    all
}

#[tokio::test(flavor = "multi_thread")]
async fn client_limit_holds_across_nodes_also_for_concurrent_handshakes() {
    let redis = RedisServer::start().unwrap();
    let limit = |c: &mut Config| {
        c.clients.max_connections_per_client = 2.try_into().unwrap();
    };
    let a = node(&redis, "a", limit).await;
    let b = node(&redis, "b", limit).await;
    let (wa, _) = a.ws("?client=x").await;
    let (wb, _) = b.ws("?client=x").await;
    for srv in [&a, &b] {
        let (status, body) = refused(srv, "?client=x").await;
        assert_eq!(
            (status, body["error"].as_str()),
            (409, Some("client_limit"))
        );
    }
    // Six handshakes at once for one client, three per node: two admitted.
    let tries = (0..6).map(|i| {
        let url = if i % 2 == 0 { &a } else { &b }.ws_url("?client=y");
        tokio::spawn(async move { tokio_tungstenite::connect_async(url).await.ok() })
    });
    let mut admitted = Vec::new();
    for t in tries {
        if let Some((ws, _)) = t.await.unwrap() {
            admitted.push(ws);
        }
    }
    assert_eq!(admitted.len(), 2);
    let (_, y) = a.get("/api/clients/y").await;
    assert_eq!(y["connections"].as_array().map(Vec::len), Some(2), "{y}");
    // `/api/connections` pages through both nodes, with each node's live fields.
    let (_, first) = a.get("/api/connections?limit=3").await;
    let page = first["next_page"].as_str().expect("a next page").to_owned();
    let (_, rest) = a
        .get(&format!("/api/connections?limit=3&page={page}"))
        .await;
    assert_eq!(rest["next_page"], Value::Null, "{rest}");
    let all: Vec<&Value> = first["connections"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest["connections"].as_array().unwrap())
        .collect();
    assert_eq!(all.len(), 4, "{first} {rest}");
    let on_b = all.iter().filter(|c| c["node_id"] == "b").count();
    assert_eq!(on_b, 2, "{first} {rest}");
    assert!(all
        .iter()
        .all(|c| c["state"] == "open" && c["idle_ms"].is_u64()));
    let (status, _) = a.get("/api/connections?page=nonsense").await;
    assert_eq!(status, 400);
    for ws in admitted.into_iter().chain([wa, wb]) {
        client_close(ws).await;
    }
    finish(&redis, [a, b]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replace_oldest_evicts_on_the_other_node_and_a_kick_reaches_every_node() {
    let redis = RedisServer::start().unwrap();
    let replace = |c: &mut Config| {
        c.clients.max_connections_per_client = 2.try_into().unwrap();
        c.clients.on_client_limit = ClientLimitPolicy::ReplaceOldest;
    };
    let a = node(&redis, "a", replace).await;
    let b = node(&redis, "b", replace).await;
    let (mut old, _) = a.ws("?client=r").await;
    let (mut mid, _) = a.ws("?client=r").await;
    let (new, _) = b.ws("?client=r").await;
    let (closing, code) = expect_close(&mut old).await;
    assert_eq!(code, 4001);
    assert_eq!(closing.unwrap()["code"], 4001);
    assert_alive(&mut mid).await;
    let (_, r) = b.get("/api/clients/r").await;
    assert_eq!(r["connections"].as_array().map(Vec::len), Some(2), "{r}");

    // A kick by conn id from b reaches the connection on a.
    let (mut one, welcome) = a.ws("?client=one").await;
    let id = welcome["conn_id"].as_str().unwrap().to_owned();
    let (status, body) = b.post("/api/disconnect", json!({"conn_id": id})).await;
    assert_eq!((status, body), (200, json!({"closed": 1})));
    assert_eq!(expect_close(&mut one).await.1, 4002);
    // `all` from a reaches b's connections too.
    let (mut aa, _) = a.ws("?client=all1").await;
    let (mut ab, _) = b.ws("?client=all2").await;
    let (status, body) = a
        .post("/api/disconnect", json!({"all": true, "code": 4100}))
        .await;
    assert_eq!(status, 200);
    // `mid` and `new` of client r are open too: everything closes.
    assert_eq!(body, json!({"closed": 4}));
    assert_eq!(expect_close(&mut aa).await.1, 4100);
    assert_eq!(expect_close(&mut ab).await.1, 4100);
    // A kick by client id on node b closes its connections on a and b.
    let (mut ka, _) = a.ws("?client=k").await;
    let (mut kb, _) = b.ws("?client=k").await;
    let (status, body) = b.post("/api/disconnect", json!({"client_id": "k"})).await;
    assert_eq!((status, body), (200, json!({"closed": 2})));
    assert_eq!(expect_close(&mut ka).await.1, 4002);
    assert_eq!(expect_close(&mut kb).await.1, 4002);
    client_close(new).await;
    client_close(mid).await;
    finish(&redis, [a, b]).await;
}

/// `/api/send` on any node reaches the client's connections on every node, and
/// counts them.
#[tokio::test(flavor = "multi_thread")]
async fn send_reaches_the_clients_connections_on_every_node() {
    let redis = RedisServer::start().unwrap();
    let a = node(&redis, "a", |_| {}).await;
    let b = node(&redis, "b", |_| {}).await;
    let (mut on_a, _) = a.ws("?client=dm").await;
    let (mut on_b, _) = b.ws("?client=dm").await;
    let (status, body) = a
        .post("/api/send", json!({"client_id": "dm", "data": {"hi": 1}}))
        .await;
    assert_eq!((status, body), (200, json!({"connections": 2})));
    for ws in [&mut on_a, &mut on_b] {
        let v = support::next_json(ws).await;
        assert_eq!(
            (v["type"].as_str(), &v["data"]),
            (Some("direct"), &json!({"hi": 1}))
        );
    }
    // A client with no connection anywhere: 0, not an error.
    let (status, body) = b
        .post("/api/send", json!({"client_id": "nobody", "data": 1}))
        .await;
    assert_eq!((status, body), (200, json!({"connections": 0})));
    client_close(on_a).await;
    client_close(on_b).await;
    finish(&redis, [a, b]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn online_and_offline_fire_once_cluster_wide() {
    let redis = RedisServer::start().unwrap();
    let a = node(&redis, "a", |_| {}).await;
    let b = node(&redis, "b", |_| {}).await;
    let mut ra = a.app.registry.events().subscribe();
    let mut rb = b.app.registry.events().subscribe();
    let (wa, _) = a.ws("?client=o").await;
    let (wb, _) = b.ws("?client=o").await;
    client_close(wa).await;
    client_close(wb).await;
    let events = events_of(&mut [&mut ra, &mut rb], Duration::from_millis(500)).await;
    assert_eq!(count(&events, "client.online", "o"), 1, "{events:?}");
    assert_eq!(count(&events, "client.offline", "o"), 1, "{events:?}");
    assert_eq!(count(&events, "connection.opened", "o"), 2);
    finish(&redis, [a, b]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconnect_on_another_node_within_the_grace_fires_no_pair() {
    let redis = RedisServer::start().unwrap();
    let grace = |c: &mut Config| c.clients.offline_grace_ms = 1500;
    let a = node(&redis, "a", grace).await;
    let b = node(&redis, "b", grace).await;
    let mut ra = a.app.registry.events().subscribe();
    let mut rb = b.app.registry.events().subscribe();
    let (wa, _) = a.ws("?client=g").await;
    client_close(wa).await;
    // The release reaches Redis just after the close.
    let mut g = Value::Null;
    for _ in 0..100 {
        g = b.get("/api/clients/g").await.1;
        if g["state"] == "lingering" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(g["state"], "lingering", "{g}");
    let (wb, _) = b.ws("?client=g").await;
    // Past a's grace: nothing fires, the client is online on b.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let (_, g) = a.get("/api/clients/g").await;
    assert_eq!(g["state"], "online", "{g}");
    client_close(wb).await;
    let events = events_of(&mut [&mut ra, &mut rb], Duration::from_millis(2500)).await;
    assert_eq!(count(&events, "client.online", "g"), 1, "{events:?}");
    assert_eq!(count(&events, "client.offline", "g"), 1, "{events:?}");
    let offline_on_b = collect_kinds_on(&events, "client.offline", "b");
    assert_eq!(
        offline_on_b, 1,
        "the node that made the transition fires it"
    );
    finish(&redis, [a, b]).await;
}

fn collect_kinds_on(events: &[Arc<LifecycleEvent>], kind: &str, node: &str) -> usize {
    events
        .iter()
        .filter(|e| e.kind.as_str() == kind && e.node_id == node)
        .count()
}

/// The real binary as node `id` (so that it can be SIGKILLed).
struct Binary {
    child: std::process::Child,
    listen: String,
    api: String,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn binary(redis: &RedisServer, id: &str, grace_ms: u64) -> Binary {
    let port = || tether_redis::testing::free_port();
    let (listen, api) = (
        format!("127.0.0.1:{}", port()),
        format!("127.0.0.1:{}", port()),
    );
    let child = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["serve", "--listen", &listen, "--api-listen", &api])
        .env("TETHER_NODE_ID", id)
        .env("TETHER_BROKER__KIND", "redis")
        .env("TETHER_BROKER__URL", redis.url())
        .env("TETHER_BROKER__NODE_TTL_MS", "3000")
        .env("TETHER_CLIENTS__OFFLINE_GRACE_MS", grace_ms.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Binary { child, listen, api }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_nodes_clients_go_offline_once_from_one_survivor() {
    let redis = RedisServer::start().unwrap();
    let ttl = |c: &mut Config| c.broker.node_ttl_ms = 3000.try_into().unwrap();
    let b = node(&redis, "b", ttl).await;
    let c = node(&redis, "c", ttl).await;
    // A long grace on the node that dies: a client lingering there (`l`) goes offline
    // when the node is removed, not never.
    let mut dead = binary(&redis, "dead", 60_000);
    let http = reqwest::Client::new();
    for _ in 0..200 {
        let ready = http.get(format!("http://{}/readyz", dead.api)).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut rb = b.app.registry.events().subscribe();
    let mut rc = c.app.registry.events().subscribe();
    let (d, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws?client=d", dead.listen))
        .await
        .unwrap();
    let (e_dead, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws?client=e", dead.listen))
        .await
        .unwrap();
    let (e_live, _) = b.ws("?client=e").await;
    let (l, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws?client=l", dead.listen))
        .await
        .unwrap();
    client_close(l).await;
    let (_, d_seen) = c.get("/api/clients/d").await;
    assert_eq!(d_seen["state"], "online", "{d_seen}");
    let mut l_seen = Value::Null;
    for _ in 0..100 {
        l_seen = c.get("/api/clients/l").await.1;
        if l_seen["state"] == "lingering" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(l_seen["state"], "lingering", "{l_seen}");
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    // Before it is removed, what the API shows of a node that does not answer.
    let (_, d_now) = c.get("/api/clients/d").await;
    assert_eq!(d_now["connections"][0]["state"], "unknown", "{d_now}");
    assert_eq!(d_now["connections"][0]["node_id"], "dead", "{d_now}");
    let (_, conns) = c.get("/api/connections").await;
    assert_eq!(conns["unreachable"], json!(["dead"]), "{conns}");
    // node_ttl_ms, then a reaper tick (node_ttl / 3), then some slack.
    let events = events_of(&mut [&mut rb, &mut rc], Duration::from_millis(6000)).await;
    assert_eq!(count(&events, "client.offline", "d"), 1, "{events:?}");
    assert_eq!(count(&events, "client.offline", "l"), 1, "{events:?}");
    assert_eq!(count(&events, "client.offline", "e"), 0, "{events:?}");
    let firing: std::collections::BTreeSet<&str> = events
        .iter()
        .filter(|e| e.kind.as_str() == "client.offline")
        .map(|e| e.node_id.as_str())
        .collect();
    assert_eq!(firing.len(), 1, "one survivor fires them: {events:?}");
    let (status, _) = b.get("/api/clients/d").await;
    assert_eq!(status, 404);
    let (_, e) = c.get("/api/clients/e").await;
    assert_eq!(e["connections"].as_array().map(Vec::len), Some(1), "{e}");
    let (_, list) = c.get("/api/clients").await;
    let ids: Vec<&str> = list["clients"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["client_id"].as_str())
        .collect();
    assert_eq!(ids, ["e"], "{list}");
    drop((d, e_dead));
    client_close(e_live).await;
    b.assert_clean().await;
    c.assert_clean().await;
    assert_no_client_keys(&redis).await;
    let nodes = redis.cli(&["smembers", "tether:{global}:nodes"]).unwrap();
    assert!(!nodes.contains("dead"), "{nodes}");
    b.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_down_refuses_handshakes_and_a_restarted_redis_gets_every_connection_back() {
    let mut redis = RedisServer::start().unwrap();
    let a = node(&redis, "a", |_| {}).await;
    let b = node(&redis, "b", |_| {}).await;
    let (mut r, _) = a.ws("?client=r").await;
    redis.kill();
    for _ in 0..200 {
        if readyz(&a).await == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(readyz(&a).await, 503);
    let (status, body) = refused(&a, "?client=s").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("broker_unavailable"))
    );
    // SSE: a transient refusal, a `200` stream that says `closing` with 4503.
    let mut sse = a
        .http
        .get(format!("http://{}/sse?channel=x&client=s", a.client))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let text = read_sse_until(&mut sse, |t| t.contains("event: closing")).await;
    assert!(
        text.contains("broker_unavailable") && text.contains("4503"),
        "{text}"
    );
    drop(sse);
    assert_alive(&mut r).await;

    redis.restart_empty().unwrap();
    wait_joined(&redis, &a, "a").await;
    wait_joined(&redis, &b, "b").await;
    let mut seen = Value::Null;
    for _ in 0..100 {
        seen = b.get("/api/clients").await.1;
        if seen["clients"] == json!([{"client_id": "r", "state": "online", "connections": 1}]) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        seen["clients"],
        json!([{"client_id": "r", "state": "online", "connections": 1}])
    );
    // `cluster` is at most two seconds old.
    let want = json!({"nodes": 2, "connections": 1, "clients": 1});
    let mut stats = Value::Null;
    for _ in 0..60 {
        stats = b.stats().await;
        if stats["cluster"] == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(stats["cluster"], want, "{stats}");
    assert_alive(&mut r).await;
    client_close(r).await;
    finish(&redis, [a, b]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn admit_local_admits_during_an_outage_and_settles_the_limit_after_it() {
    let redis = RedisServer::start().unwrap();
    let local = admit_local(1, ClientLimitPolicy::Reject);
    let a = node(&redis, "a", local).await;
    let b = node(&redis, "b", local).await;
    let (mut first, _) = a.ws("?client=x").await;
    pause_until_seen(&redis, &b, 4000).await;
    assert_eq!(readyz(&b).await, 200, "admit_local keeps the node ready");
    // b's own view has no connection of x: admitted.
    let (mut second, _) = b.ws("?client=x").await;
    // Once Redis answers again, b re-registers: x is over its limit of 1, and the
    // connection b admitted on its own view is closed 4409.
    let (closing, code) = expect_close(&mut second).await;
    assert_eq!(code, 4409, "{closing:?}");
    assert_alive(&mut first).await;
    let (_, x) = b.get("/api/clients/x").await;
    assert_eq!(x["connections"].as_array().map(Vec::len), Some(1), "{x}");
    client_close(first).await;
    finish(&redis, [a, b]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_redis_cluster_the_limit_the_replace_and_online_offline_hold() {
    let redis = RedisCluster::start(3).unwrap();
    let replace = |c: &mut Config| {
        c.clients.max_connections_per_client = 2.try_into().unwrap();
        c.clients.on_client_limit = ClientLimitPolicy::ReplaceOldest;
    };
    let a = cluster_node(&redis, "a", replace).await;
    let b = cluster_node(&redis, "b", replace).await;
    let mut ra = a.app.registry.events().subscribe();
    let mut rb = b.app.registry.events().subscribe();
    // Several clients, so that their keys land on different shards.
    let mut kept = Vec::new();
    for id in ["p", "q", "r", "s"] {
        let (mut old, _) = a.ws(&format!("?client={id}")).await;
        let (mid, _) = b.ws(&format!("?client={id}")).await;
        let (new, _) = b.ws(&format!("?client={id}")).await;
        assert_eq!(expect_close(&mut old).await.1, 4001, "{id}");
        kept.extend([mid, new]);
    }
    let (_, list) = a.get("/api/clients").await;
    assert_eq!(list["clients"].as_array().map(Vec::len), Some(4), "{list}");
    let (status, body) = a.post("/api/disconnect", json!({"client_id": "p"})).await;
    assert_eq!((status, body), (200, json!({"closed": 2})));
    for ws in kept {
        client_close(ws).await;
    }
    let events = events_of(&mut [&mut ra, &mut rb], Duration::from_millis(500)).await;
    for id in ["p", "q", "r", "s"] {
        assert_eq!(count(&events, "client.online", id), 1, "{id}: {events:?}");
        assert_eq!(count(&events, "client.offline", id), 1, "{id}: {events:?}");
    }
    a.assert_clean().await;
    b.assert_clean().await;
    for shard in &redis.shards {
        let left = client_keys_left(shard);
        assert!(left.is_empty(), "client keys left on a shard: {left:?}");
    }
    a.stop().await;
    b.stop().await;
}

/// Events from every receiver until `done` holds for them (or `max` passes), then
/// `more` of any that follow (a duplicate would come within it).
async fn events_until(
    rxs: &mut [&mut Receiver<Arc<LifecycleEvent>>],
    done: impl Fn(&[Arc<LifecycleEvent>]) -> bool,
    max: Duration,
    more: Duration,
) -> Vec<Arc<LifecycleEvent>> {
    let mut all = Vec::new();
    let until = tokio::time::Instant::now() + max;
    while !done(&all) && tokio::time::Instant::now() < until {
        all.extend(events_of(rxs, Duration::from_millis(50)).await);
    }
    all.extend(events_of(rxs, more).await);
    all
}

/// A client's connections as Redis knows them, through the API.
async fn connections_of(srv: &TestServer, client: &str) -> usize {
    let (_, c) = srv.get(&format!("/api/clients/{client}")).await;
    c["connections"].as_array().map_or(0, Vec::len)
}

async fn wait_connections(srv: &TestServer, client: &str, n: usize) {
    for _ in 0..200 {
        if connections_of(srv, client).await == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (_, seen) = srv.get(&format!("/api/clients/{client}")).await;
    panic!("{client}: not {n} connections: {seen}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_last_close_during_an_outage_of_a_redis_that_comes_back_empty_goes_offline_once() {
    let mut redis = RedisServer::start().unwrap();
    let ttl = |c: &mut Config| c.broker.node_ttl_ms = 3000.try_into().unwrap();
    let a = node(&redis, "a", ttl).await;
    let b = node(&redis, "b", ttl).await;
    let mut ra = a.app.registry.events().subscribe();
    let mut rb = b.app.registry.events().subscribe();
    let (xa, _) = a.ws("?client=x").await;
    let (xb, _) = b.ws("?client=x").await;
    let (ya, _) = a.ws("?client=y").await;
    redis.kill();
    for _ in 0..200 {
        if readyz(&a).await == 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(readyz(&a).await, 503);
    // x's connection on a and y's only one close while Redis is down: their releases
    // fail, and Redis comes back without any of it.
    client_close(xa).await;
    client_close(ya).await;
    redis.restart_empty().unwrap();
    wait_joined(&redis, &a, "a").await;
    wait_joined(&redis, &b, "b").await;
    // a registers the closed connections again (unlisted: no node holds them) until
    // it has been connected for node_ttl, so y is online with none listed; b
    // registers x's live one. x's last close, on b, is not its last anywhere yet.
    for _ in 0..200 {
        if b.get("/api/clients/y").await.1["state"] == "online" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(connections_of(&b, "y").await, 0);
    wait_connections(&b, "x", 1).await;
    client_close(xb).await;
    let offlines = |e: &[Arc<LifecycleEvent>]| {
        count(e, "client.offline", "x") + count(e, "client.offline", "y") >= 2
    };
    let events = events_until(
        &mut [&mut ra, &mut rb],
        offlines,
        Duration::from_secs(10),
        Duration::from_secs(4),
    )
    .await;
    assert_eq!(count(&events, "client.offline", "x"), 1, "{events:?}");
    assert_eq!(count(&events, "client.offline", "y"), 1, "{events:?}");
    // Only the online before the outage: registering again after it announces none.
    assert_eq!(count(&events, "client.online", "x"), 1, "{events:?}");
    finish(&redis, [a, b]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn admit_local_announces_a_client_once_even_when_it_was_online_elsewhere() {
    let redis = RedisServer::start().unwrap();
    let local = admit_local(2, ClientLimitPolicy::Reject);
    let a = node(&redis, "a", local).await;
    let b = node(&redis, "b", local).await;
    let mut ra = a.app.registry.events().subscribe();
    let mut rb = b.app.registry.events().subscribe();
    let (xb, _) = b.ws("?client=x").await;
    pause_until_seen(&redis, &a, 3000).await;
    // x is online on b; y nowhere. a cannot know: neither is announced now.
    let (xa, _) = a.ws("?client=x").await;
    let (ya, _) = a.ws("?client=y").await;
    let during = events_of(&mut [&mut ra], Duration::from_millis(300)).await;
    assert_eq!(count(&during, "client.online", "y"), 0, "{during:?}");
    assert_eq!(count(&during, "connection.opened", "y"), 1, "{during:?}");
    // Redis answers again: a registers both; y, offline in the cluster, is announced.
    let announced = |e: &[Arc<LifecycleEvent>]| count(e, "client.online", "y") >= 1;
    let mut events = events_until(
        &mut [&mut ra, &mut rb],
        announced,
        Duration::from_secs(10),
        Duration::ZERO,
    )
    .await;
    events.extend(during);
    wait_connections(&b, "x", 2).await;
    client_close(xa).await;
    client_close(xb).await;
    client_close(ya).await;
    let offlines = |e: &[Arc<LifecycleEvent>]| {
        count(e, "client.offline", "x") + count(e, "client.offline", "y") >= 2
    };
    events.extend(
        events_until(
            &mut [&mut ra, &mut rb],
            offlines,
            Duration::from_secs(5),
            Duration::from_millis(500),
        )
        .await,
    );
    // x's only online is b's, before the outage: none from a.
    assert_eq!(count(&events, "client.online", "x"), 1, "{events:?}");
    assert_eq!(
        collect_kinds_on(&events, "client.online", "a"),
        1,
        "{events:?}"
    );
    assert_eq!(count(&events, "client.online", "y"), 1, "{events:?}");
    assert_eq!(count(&events, "client.offline", "x"), 1, "{events:?}");
    assert_eq!(count(&events, "client.offline", "y"), 1, "{events:?}");
    finish(&redis, [a, b]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_release_whose_answer_was_lost_still_fires_its_offline_once() {
    let redis = RedisServer::start().unwrap();
    let quick = |c: &mut Config| c.broker.command_timeout_ms = 300.try_into().unwrap();
    let a = node(&redis, "a", quick).await;
    let mut ra = a.app.registry.events().subscribe();
    let (x, _) = a.ws("?client=x").await;
    // Redis holds every command for 2 s: the release times out on the node, then
    // runs in Redis (its answer lost), as does the node's record removal.
    redis.cli(&["client", "pause", "2000", "all"]).unwrap();
    client_close(x).await;
    let offline = |e: &[Arc<LifecycleEvent>]| count(e, "client.offline", "x") >= 1;
    let events = events_until(
        &mut [&mut ra],
        offline,
        Duration::from_secs(10),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(count(&events, "client.online", "x"), 1, "{events:?}");
    assert_eq!(count(&events, "client.offline", "x"), 1, "{events:?}");
    a.assert_clean().await;
    assert_no_client_keys(&redis).await;
    a.stop().await;
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// SPEC 10: only a survivor that has itself been connected to Redis for
/// `node_ttl_ms` may declare another node dead, "so a Redis failover does not make
/// every node declare every other dead". Redis stops for longer than node_ttl (every
/// alive key lapses, the data is kept); when it answers again, node a is back at once
/// while node b (a process, stopped too) is back 1.5 s later. a must not remove b.
#[tokio::test(flavor = "multi_thread")]
async fn after_an_outage_no_node_declares_another_dead_before_it_has_been_connected_for_node_ttl() {
    let redis = RedisServer::start().unwrap();
    let ttl = |c: &mut Config| c.broker.node_ttl_ms = 3000.try_into().unwrap();
    let a = node(&redis, "a", ttl).await;
    let mut b = binary(&redis, "b", 0);
    let http = reqwest::Client::new();
    for _ in 0..200 {
        let ready = http.get(format!("http://{}/readyz", b.api)).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut ra = a.app.registry.events().subscribe();
    let (mut x, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws?client=x", b.listen))
        .await
        .unwrap();
    assert_eq!(support::next_json(&mut x).await["type"], "welcome");
    wait_connections(&a, "x", 1).await;
    // b stops first (no heartbeat of its can wait in Redis's input buffer), then
    // Redis, for longer than node_ttl.
    let (redis_pid, b_pid) = (redis.pid().unwrap(), b.child.id());
    signal(b_pid, "-STOP");
    signal(redis_pid, "-STOP");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    signal(redis_pid, "-CONT");
    // a reconnects now and finds b's alive key gone; b answers 1.5 s later.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    signal(b_pid, "-CONT");
    let events = events_of(&mut [&mut ra], Duration::from_millis(4000)).await;
    assert_eq!(count(&events, "client.offline", "x"), 0, "{events:?}");
    let nodes = redis.cli(&["smembers", "tether:{global}:nodes"]).unwrap();
    assert!(nodes.contains('b'), "b is still a member: {nodes}");
    assert_eq!(connections_of(&a, "x").await, 1);
    assert_alive(&mut x).await;
    client_close(x).await;
    wait_connections(&a, "x", 0).await;
    b.child.kill().unwrap();
    b.child.wait().unwrap();
    a.assert_clean().await;
    a.stop().await;
}

/// SPEC 10, `admit_local` reconciled under `replace_oldest`: a connection admitted on a
/// node's own view during an outage puts its client over its limit once registered,
/// and the oldest connection (on the other node) is closed 4001.
#[tokio::test(flavor = "multi_thread")]
async fn admit_local_under_replace_oldest_closes_the_oldest_once_redis_is_back() {
    let redis = RedisServer::start().unwrap();
    let local = admit_local(1, ClientLimitPolicy::ReplaceOldest);
    let a = node(&redis, "a", local).await;
    let b = node(&redis, "b", local).await;
    let (mut first, _) = a.ws("?client=x").await;
    pause_until_seen(&redis, &b, 2500).await;
    let (mut second, _) = b.ws("?client=x").await;
    // Once Redis answers, b registers the newer connection: over the limit of 1, the
    // oldest, on a, is replaced.
    let (closing, code) = expect_close(&mut first).await;
    assert_eq!(code, 4001, "{closing:?}");
    assert_alive(&mut second).await;
    wait_connections(&a, "x", 1).await;
    client_close(second).await;
    finish(&redis, [a, b]).await;
}
