//! The link against a real `redis-server`: up when Redis answers, down at once when
//! it is killed, up again when it comes back, with no restart of the node.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use fred::interfaces::KeysInterface;
use tether_redis::testing::RedisServer;
use tether_redis::{Link, LinkConfig, Topology};
use tokio_util::sync::CancellationToken;

async fn until(rx: &mut tokio::sync::watch::Receiver<bool>, want: bool) {
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|up| *up == want))
        .await
        .expect("in time")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_link_follows_redis_down_and_back_up() {
    let mut redis = RedisServer::start().unwrap();
    let link = Link::new(&LinkConfig {
        topology: Topology::Single(redis.url()),
        command_timeout: Duration::from_millis(300),
        prefix: "t".into(),
    })
    .unwrap();
    let stop = CancellationToken::new();
    let tasks = link.start(stop.clone());
    let mut up = link.watch_up();
    until(&mut up, true).await;
    let _: () = link
        .commands()
        .set("k", "v", None, None, false)
        .await
        .unwrap();
    redis.kill();
    until(&mut up, false).await;
    // A command while Redis is away fails within its timeout, it does not hang.
    let started = tokio::time::Instant::now();
    let r: Result<Option<String>, _> = link.commands().get("k").await;
    assert!(r.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    redis.restart_empty().unwrap();
    until(&mut up, true).await;
    let v: Option<String> = link.commands().get("k").await.unwrap();
    assert_eq!(v, None, "a Redis that came back empty");
    stop.cancel();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("every link task ends after stop")
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_link_reaches_every_shard() {
    let cluster = tether_redis::testing::RedisCluster::start(3).unwrap();
    let link = Link::new(&LinkConfig {
        topology: Topology::Cluster(vec![cluster.shards[0].url()]),
        command_timeout: Duration::from_millis(500),
        prefix: "t".into(),
    })
    .unwrap();
    assert!(link.is_cluster());
    let stop = CancellationToken::new();
    let _tasks = link.start(stop.clone());
    until(&mut link.watch_up(), true).await;
    // Keys with different hash tags land on different shards; all are reachable.
    for ch in ["a", "b", "c", "d", "e", "f"] {
        let key = link.keys().channel_key(ch, "meta");
        let _: () = link
            .commands()
            .set(&key, ch, None, None, false)
            .await
            .unwrap();
        let v: Option<String> = link.commands().get(&key).await.unwrap();
        assert_eq!(v.as_deref(), Some(ch));
    }
    let used = cluster
        .shards
        .iter()
        .filter(|s| s.cli(&["dbsize"]).unwrap() != "0")
        .count();
    assert!(used >= 2, "keys spread over the shards ({used} used)");
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cluster_link_stays_up_with_one_shard_down_and_serves_the_others() {
    let mut cluster = tether_redis::testing::RedisCluster::start(3).unwrap();
    let link = Link::new(&LinkConfig {
        topology: Topology::Cluster(vec![cluster.shards[0].url()]),
        command_timeout: Duration::from_millis(300),
        prefix: "t".into(),
    })
    .unwrap();
    let stop = CancellationToken::new();
    let tasks = link.start(stop.clone());
    let mut up = link.watch_up();
    until(&mut up, true).await;
    let victim = 1;
    let key_on = |on: bool| {
        (0..100)
            .map(|i| link.keys().channel_key(&format!("ch{i}"), "meta"))
            .find(|k| (cluster.shard_of(k) == Some(victim)) == on)
            .unwrap()
    };
    let (live, dead) = (key_on(false), key_on(true));
    // The slot map reached the link (the seed was shard 0 only).
    let set = |key: String| {
        let c = link.commands_for(&key);
        async move { c.set::<(), _, _>(&key, "v", None, None, false).await }
    };
    set(dead.clone()).await.unwrap();
    assert_eq!(cluster.shards[victim].cli(&["GET", &dead]).unwrap(), "v");

    cluster.shards[victim].kill();
    cluster.wait_marked_failed(victim, true).unwrap();
    assert!(set(live.clone()).await.is_ok(), "a live shard's key");
    assert!(set(dead.clone()).await.is_err(), "the dead shard's key");
    // fred's clustered client waits for the dead primary, whatever the key: why the
    // broker routes through the shards' own clients.
    assert!(link
        .commands()
        .set::<(), _, _>(&live, "v", None, None, false)
        .await
        .is_err());
    // Most primaries still serve: the link never went down.
    assert!(!up.has_changed().unwrap() && *up.borrow());

    // One more down: a minority left, the link is down.
    cluster.shards[(victim + 1) % 3].kill();
    until(&mut up, false).await;
    stop.cancel();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .expect("every link task ends after stop")
            .unwrap();
    }
}
