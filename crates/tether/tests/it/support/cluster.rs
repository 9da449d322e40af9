//! Helpers for the cluster-mode tests (cluster_channels.rs, cluster_shard.rs): nodes
//! on a Redis or a Redis Cluster, readiness, subscribe and publish over real
//! sockets, and who follows a channel's pub/sub in Redis.

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{json, Value};
use tether_redis::testing::RedisServer;
use tether_server::config::BrokerKind;
use tether_server::Config;
use tokio_tungstenite::tungstenite::Message;

use super::{next_json, start, TestServer, Ws};

/// A node on `url`, ready (its link to Redis is up).
pub async fn node(kind: BrokerKind, url: &str, name: &str) -> TestServer {
    node_with(kind, url, name, |_| {}).await
}

/// As [`node`], with `f` applied to its configuration last.
pub async fn node_with(
    kind: BrokerKind,
    url: &str,
    name: &str,
    f: impl FnOnce(&mut Config),
) -> TestServer {
    let (url, name) = (url.to_owned(), name.to_owned());
    let s = start(move |c| {
        c.broker.kind = kind;
        c.broker.url = url;
        c.node_id = name;
        f(c);
    })
    .await;
    assert!(ready_within(&s, true).await, "node ready");
    s
}

/// Whether `/readyz` answers `want` (200 or 503) within 10 s.
pub async fn ready_within(s: &TestServer, want: bool) -> bool {
    let url = format!("http://{}/readyz", s.client);
    for _ in 0..200 {
        let ok = s
            .http
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status().as_u16() == 200);
        if ok == want {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

pub async fn subscribe(ws: &mut Ws, channel: &str, since: Option<&str>) -> Value {
    let frame = json!({"type": "subscribe", "ref": 1, "channel": channel, "since": since});
    ws.send(Message::text(frame.to_string())).await.unwrap();
    next_json(ws).await
}

pub async fn publish(
    s: &TestServer,
    channel: &str,
    data: Value,
    key: Option<&str>,
) -> (u16, Value) {
    let mut body = json!({"channel": channel, "data": data});
    if let Some(k) = key {
        body["idempotency_key"] = json!(k);
    }
    s.post("/api/publish", body).await
}

pub async fn published(s: &TestServer, channel: &str, data: Value) -> Value {
    let (st, body) = publish(s, channel, data, None).await;
    assert_eq!(st, 200, "{body}");
    body
}

pub fn split(position: &Value) -> (String, u64) {
    let (e, o) = position.as_str().unwrap().rsplit_once(':').unwrap();
    (e.to_owned(), o.parse().unwrap())
}

/// The next `message` frame, checked to be `channel`'s.
pub async fn message(ws: &mut Ws, channel: &str) -> Value {
    let m = next_json(ws).await;
    assert_eq!(
        (m["type"].as_str(), m["channel"].as_str()),
        (Some("message"), Some(channel)),
        "{m}"
    );
    m
}

/// A counter or gauge from `s`'s `/metrics` (0 if absent).
pub async fn metric(s: &TestServer, name: &str) -> u64 {
    let text = s
        .http
        .get(s.api_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Subscribers of `channel`'s pub/sub across `servers` (NUMSUB on one Redis,
/// SHARDNUMSUB summed over a cluster's shards; a shard that does not own the
/// channel answers MOVED, which counts nothing).
pub fn followers(servers: &[&RedisServer], channel: &str, sharded: bool) -> u64 {
    let name = format!("tether:{{{channel}}}:pub");
    let cmd = if sharded { "SHARDNUMSUB" } else { "NUMSUB" };
    servers
        .iter()
        .map(|r| {
            let out = r.cli(&["PUBSUB", cmd, &name]).unwrap();
            out.lines()
                .last()
                .and_then(|l| l.trim().parse().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Waits (≤ 10 s) until `channel`'s pub/sub has `n` followers.
pub async fn followers_become(servers: &[&RedisServer], channel: &str, sharded: bool, n: u64) {
    for _ in 0..200 {
        if followers(servers, channel, sharded) == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "{channel}: {} followers, not {n}",
        followers(servers, channel, sharded)
    );
}

/// A handshake that must be refused: its HTTP status and JSON body.
pub async fn refused(srv: &TestServer, query: &str) -> (u16, Value) {
    match tokio_tungstenite::connect_async(srv.ws_url(query)).await {
        Ok(_) => panic!("{query} was admitted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            (resp.status().as_u16(), body)
        }
        Err(e) => panic!("{query}: {e}"),
    }
}
