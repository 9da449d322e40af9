//! The broker's Lua scripts against a real `redis-server` (Debian's, started on a
//! free loopback port, persistence off): positions, idempotency, `MAXLEN`, a new
//! epoch after Redis lost its data, and the range reads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use tether_redis::broker::scripts::{self, PublishArgs, Want};
use tether_redis::testing::RedisServer;
use tether_redis::{Link, LinkConfig, Topology};
use tokio_util::sync::CancellationToken;

async fn link(redis: &RedisServer) -> (Arc<Link>, CancellationToken) {
    let link = Link::new(&LinkConfig {
        topology: Topology::Single(redis.url()),
        command_timeout: Duration::from_secs(2),
        prefix: "t".into(),
    })
    .unwrap();
    let stop = CancellationToken::new();
    link.start(stop.clone());
    let mut up = link.watch_up();
    tokio::time::timeout(Duration::from_secs(10), up.wait_for(|u| *u))
        .await
        .expect("redis up in time")
        .unwrap();
    (link, stop)
}

fn args<'a>(data: &'a str, key: Option<&'a str>, size: usize) -> PublishArgs<'a> {
    PublishArgs {
        data,
        idempotency_key: key,
        history_size: size,
        history_ttl: Duration::from_secs(60),
        sharded: false,
    }
}

fn split(position: &str) -> (String, u64) {
    let (e, o) = position.split_once(':').unwrap();
    (e.to_owned(), o.parse().unwrap())
}

#[tokio::test]
async fn positions_rise_by_one_in_one_epoch_and_the_stream_keeps_them() {
    let redis = RedisServer::start().unwrap();
    let (link, stop) = link(&redis).await;
    let (c, k) = (link.commands(), link.keys());
    let mut epochs = Vec::new();
    for i in 1..=3u64 {
        let p = scripts::publish(c, k, "room", args(&format!("{{\"n\":{i}}}"), None, 10))
            .await
            .unwrap();
        let (epoch, offset) = split(&p.position);
        assert_eq!(offset, i);
        assert!(!p.duplicate);
        assert_eq!(p.id.len(), 32);
        epochs.push(epoch);
    }
    assert!(epochs.iter().all(|e| *e == epochs[0]), "{epochs:?}");
    let want = Want {
        count: 10,
        ..Want::default()
    };
    let r = scripts::range(c, k, "room", want).await.unwrap().unwrap();
    assert_eq!(r.epoch, epochs[0]);
    assert_eq!(r.last, 3);
    let got: Vec<(u64, &str)> = r.entries.iter().map(|e| (e.offset, &*e.data)).collect();
    assert_eq!(got, [(1, "{\"n\":1}"), (2, "{\"n\":2}"), (3, "{\"n\":3}")]);
    // From a known position: only what follows it.
    let want = Want {
        epoch: &r.epoch,
        first: 3,
        count: 10,
        ..Want::default()
    };
    let after = scripts::range(c, k, "room", want).await.unwrap().unwrap();
    assert_eq!(after.entries.len(), 1);
    assert_eq!(after.entries[0].offset, 3);
    stop.cancel();
}

#[tokio::test]
async fn an_idempotency_key_repeated_returns_the_first_result_and_adds_nothing() {
    let redis = RedisServer::start().unwrap();
    let (link, stop) = link(&redis).await;
    let (c, k) = (link.commands(), link.keys());
    let first = scripts::publish(c, k, "room", args("1", Some("k1"), 10))
        .await
        .unwrap();
    let again = scripts::publish(c, k, "room", args("2", Some("k1"), 10))
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(again.duplicate);
    assert_eq!((&again.position, &again.id), (&first.position, &first.id));
    let other = scripts::publish(c, k, "room", args("3", Some("k2"), 10))
        .await
        .unwrap();
    assert_eq!(split(&other.position).1, 2);
    assert_eq!(
        redis
            .cli(&["XLEN", &k.channel_key("room", "stream")])
            .unwrap(),
        "2"
    );
    stop.cancel();
}

#[tokio::test]
async fn the_stream_keeps_history_size_messages_and_expires() {
    let redis = RedisServer::start().unwrap();
    let (link, stop) = link(&redis).await;
    let (c, k) = (link.commands(), link.keys());
    for i in 1..=8 {
        scripts::publish(c, k, "room", args(&i.to_string(), None, 5))
            .await
            .unwrap();
    }
    let want = Want {
        count: 100,
        ..Want::default()
    };
    let r = scripts::range(c, k, "room", want).await.unwrap().unwrap();
    let offsets: Vec<u64> = r.entries.iter().map(|e| e.offset).collect();
    assert_eq!(offsets, [4, 5, 6, 7, 8]);
    let stream_ttl: i64 = redis
        .cli(&["PTTL", &k.channel_key("room", "stream")])
        .unwrap()
        .parse()
        .unwrap();
    let meta_ttl: i64 = redis
        .cli(&["PTTL", &k.channel_key("room", "meta")])
        .unwrap()
        .parse()
        .unwrap();
    assert!(stream_ttl > 0 && stream_ttl <= 60_000, "{stream_ttl}");
    assert!(
        meta_ttl > 60_000,
        "the meta outlives the stream: {meta_ttl}"
    );
    stop.cancel();
}

#[tokio::test]
async fn a_redis_that_lost_its_data_starts_a_new_epoch_at_offset_one() {
    let mut redis = RedisServer::start().unwrap();
    let (link, stop) = link(&redis).await;
    let (c, k) = (link.commands(), link.keys());
    for i in 1..=3 {
        scripts::publish(c, k, "room", args(&i.to_string(), None, 10))
            .await
            .unwrap();
    }
    let before = scripts::range(c, k, "room", Want::default())
        .await
        .unwrap()
        .unwrap();
    redis.restart_empty().unwrap();
    let mut up = link.watch_up();
    let p = loop {
        // The link reconnects with backoff; the script is loaded again (NOSCRIPT).
        match scripts::publish(c, k, "room", args("4", None, 10)).await {
            Ok(p) => break p,
            Err(_) => {
                let _ = tokio::time::timeout(Duration::from_millis(200), up.changed()).await;
            }
        }
    };
    let (epoch, offset) = split(&p.position);
    assert_ne!(epoch, before.epoch);
    assert_eq!(offset, 1);
    stop.cancel();
}

#[tokio::test]
async fn range_of_a_channel_without_history_is_none_unless_asked_to_start_it() {
    let redis = RedisServer::start().unwrap();
    let (link, stop) = link(&redis).await;
    let (c, k) = (link.commands(), link.keys());
    assert_eq!(
        scripts::range(c, k, "new", Want::default()).await.unwrap(),
        None
    );
    let start = Want {
        create: Some(Duration::from_secs(3600)),
        ..Want::default()
    };
    let r = scripts::range(c, k, "new", start).await.unwrap().unwrap();
    assert_eq!(r.last, 0);
    let p = scripts::publish(c, k, "new", args("1", None, 10))
        .await
        .unwrap();
    assert_eq!(p.position, format!("{}:1", r.epoch));
    stop.cancel();
}
