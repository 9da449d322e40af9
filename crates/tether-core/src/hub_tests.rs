//! The hub's own tests, through its public API (SPEC sections 5 and 7): positions,
//! resume, history bounds, idempotency keys, limits, presence and events, the
//! cleanup, both fan-out paths, slow consumers and publishers racing a resume.
//!
//! Connections are made the way the server makes them (a [`Registry`] reservation
//! committed into a guard, whose drop is the release), over one [`EventBus`] and one
//! [`Metrics`] shared by the registry and the hub. Time-bound tests run on tokio's
//! paused clock, which is the clock the hub reads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::Value;
use tether_protocol::{wire, Position};

use super::*;
use crate::connection::{ConnSpec, Transport};
use crate::ids::ConnIdGen;
use crate::outbox::DirectSink;
use crate::registry::{ClientLimitPolicy, ConnectionGuard, Registry, RegistrySettings};

/// History 100 messages for 60 s, 100 channels, 10 per connection.
fn settings() -> HubSettings {
    HubSettings {
        history_size: 100,
        history_ttl: Duration::from_secs(60),
        max_channels: 100,
        max_channels_per_connection: 10,
    }
}

/// A node: a registry and its hub over one event bus and one metrics registry;
/// each connection's outbox holds `queue` messages (and 1 MiB).
fn node(hub: HubSettings, queue: usize) -> Registry {
    node_with_bytes(hub, queue, 1 << 20)
}

fn node_with_bytes(hub: HubSettings, queue: usize, queue_bytes: usize) -> Registry {
    let ids = ConnIdGen::new("t");
    let metrics = Metrics::new();
    let events = EventBus::new(ids.node_id().clone());
    Registry::new(
        RegistrySettings {
            max_connections: 10_000,
            max_connections_per_client: 100,
            on_client_limit: ClientLimitPolicy::Reject,
            offline_grace: Duration::ZERO,
            max_queue_messages: queue,
            max_queue_bytes: queue_bytes,
        },
        ids,
        events.clone(),
        metrics.clone(),
        Hub::new(hub, events, metrics),
    )
}

/// A committed WebSocket connection of `client`.
fn connect(r: &Registry, client: &str) -> ConnectionGuard {
    r.reserve(client, Transport::Ws, None)
        .unwrap()
        .commit(ConnSpec {
            transport: Transport::Ws,
            remote_addr: Ipv4Addr::LOCALHOST.into(),
            user_agent: None,
            meta: Value::Null,
            upstream: None,
        })
}

/// The JSON text of a queued item's WebSocket frame.
fn json_of(frame: &[u8]) -> Value {
    serde_json::from_slice(&frame[wire::payload_offset(frame)..]).unwrap()
}

/// The offsets of the channel messages among `items`, in order.
fn offsets(items: &[Outgoing]) -> Vec<u64> {
    items
        .iter()
        .filter_map(|o| match o {
            Outgoing::Message(p) => Some(p.offset),
            _ => None,
        })
        .collect()
}

/// Everything queued for `conn` now (the outbox must not have overflowed).
fn take(conn: &Connection) -> Vec<Outgoing> {
    let mut v = Vec::new();
    assert!(!conn.outbox().take(&mut v), "the outbox overflowed");
    v
}

/// One turn of the connection task: top the queue up from history if a
/// subscription is catching up, then take (and "write") everything queued.
fn task_turn(hub: &Hub, conn: &Arc<Connection>) -> Vec<Outgoing> {
    if conn.is_catching_up() {
        assert_ne!(hub.catch_up(conn), CatchUp::Lost);
    }
    take(conn)
}

/// Runs the connection task until nothing is queued and nothing is catching up.
fn drain(hub: &Hub, conn: &Arc<Connection>) -> Vec<Outgoing> {
    let mut seen = Vec::new();
    for _ in 0..10_000 {
        let batch = task_turn(hub, conn);
        if batch.is_empty() && !conn.is_catching_up() {
            return seen;
        }
        seen.extend(batch);
    }
    panic!("the connection never caught up");
}

/// Publishes `1`, `2`, … `n` to `channel`; the last position.
fn publish_n(hub: &Hub, channel: &str, n: u64) -> String {
    let mut last = String::new();
    for i in 1..=n {
        last = hub.publish(channel, &i.to_string(), None).unwrap().position;
    }
    last
}

fn pos(s: &str) -> Position {
    Position::parse(s).unwrap()
}

/// `epoch:offset` of `channel`'s position `offset`, given one position of it.
fn at(some: &str, offset: u64) -> Position {
    Position {
        epoch: pos(some).epoch,
        offset,
    }
}

/// Lifecycle events about channels and subscriptions received so far.
fn channel_events(
    rx: &mut tokio::sync::broadcast::Receiver<Arc<tether_protocol::LifecycleEvent>>,
) -> Vec<(&'static str, Option<String>)> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        let kind = e.kind.as_str();
        if kind.starts_with("channel.") || kind.starts_with("subscription.") {
            out.push((kind, e.client_id.clone()));
        }
    }
    out
}

/// A channel's position is `<epoch>:<offset>`: `<epoch>:0` while empty, then one
/// more per publish, in one epoch; `subscribed.position` is the latest at subscribe.
#[test]
fn positions_rise_by_one_per_publish_in_one_epoch() {
    let r = node(settings(), 10);
    let hub = r.hub();
    let a = connect(&r, "a");
    let s = hub.subscribe(a.conn(), "news", None, None).unwrap();
    let epoch = pos(&s.position).epoch;
    assert_eq!(s.position, format!("{epoch}:0"));
    assert_eq!((s.recovered, s.missed), (false, 0));
    let results: Vec<PublishResult> = (0..3)
        .map(|i| hub.publish("news", &i.to_string(), None).unwrap())
        .collect();
    for (i, res) in results.iter().enumerate() {
        assert_eq!(res.position, format!("{epoch}:{}", i + 1));
        assert_eq!((res.subscribers, res.duplicate), (1, false));
    }
    assert_ne!(results[0].id, results[1].id, "each message has its own id");
    let got = take(a.conn());
    assert_eq!(offsets(&got), [1, 2, 3]);
    let first = json_of(got[0].ws_frame());
    assert_eq!(first["type"], "message");
    assert_eq!(first["channel"], "news");
    assert_eq!(first["id"], results[0].id.as_str());
    assert_eq!(first["position"], results[0].position.as_str());
    assert_eq!(first["data"], 0);
    let b = connect(&r, "b");
    let s = hub.subscribe(b.conn(), "news", None, None).unwrap();
    assert_eq!(s.position, format!("{epoch}:3"), "the latest at subscribe");
    // Another channel counts on its own.
    let other = hub.publish("other", "1", None).unwrap();
    assert_eq!(pos(&other.position).offset, 1);
}

/// A message is encoded once: the WebSocket frame, its JSON and the SSE body carry
/// the same fields, on one line even when the published JSON had line breaks.
#[test]
fn a_message_is_encoded_once_on_one_line() {
    let r = node(settings(), 10);
    let res = r
        .hub()
        .publish("c", "{\n  \"a\": [1,\n 2]\n}", None)
        .unwrap();
    let (_, h) = r.hub().history("c", None, 10).unwrap();
    let p = &h[0];
    assert_eq!(&*p.data, r#"{"a":[1,2]}"#);
    assert_eq!(
        json_of(&p.frame),
        serde_json::from_slice::<Value>(&p.json).unwrap()
    );
    let sse = std::str::from_utf8(&p.sse).unwrap();
    let data = sse.strip_prefix("event: message\ndata: ").unwrap();
    let data = data.strip_suffix("\n\n").unwrap();
    assert!(!data.contains('\n'));
    let v: Value = serde_json::from_str(data).unwrap();
    assert_eq!(v["position"], res.position.as_str());
    assert_eq!(v["data"]["a"][1], 2);
}

/// A resume inside the history is recovered; the `subscribed` frame comes first,
/// then the missed messages and the ones published during the replay, each once
/// and in order, although the outbox holds fewer than were missed.
#[test]
fn a_resume_replays_then_goes_live_without_gap_or_duplicate() {
    let r = node(settings(), 8);
    let hub = r.hub();
    let mut head = String::new();
    for i in 1..=20 {
        head = hub.publish("news", &i.to_string(), None).unwrap().position;
    }
    let c = connect(&r, "c");
    let s = hub
        .subscribe(c.conn(), "news", Some(&at(&head, 4)), Some(Some(7)))
        .unwrap();
    assert_eq!(s.position, head);
    assert_eq!((s.recovered, s.missed), (true, 16));
    assert!(c.conn().is_catching_up());
    let mut seen = take(c.conn());
    let announced = json_of(seen[0].ws_frame());
    assert_eq!(announced["type"], "subscribed");
    assert_eq!(announced["ref"], 7);
    assert_eq!(announced["position"], head.as_str());
    assert_eq!(
        (announced["recovered"].clone(), announced["missed"].clone()),
        (true.into(), 16.into())
    );
    // Publish between the task's turns, while it replays and after.
    for i in 21..=30 {
        hub.publish("news", &i.to_string(), None).unwrap();
        seen.extend(task_turn(hub, c.conn()));
    }
    seen.extend(drain(hub, c.conn()));
    assert_eq!(offsets(&seen), (5..=30).collect::<Vec<_>>());
    assert_eq!(
        seen.len(),
        1 + 26,
        "the frame and the messages, nothing else"
    );
    // Live now: the next publish is queued straight away.
    hub.publish("news", "31", None).unwrap();
    assert_eq!(offsets(&take(c.conn())), [31]);
}

/// `since` is exclusive: at the head nothing is replayed and the subscription is
/// live at once; `<epoch>:0` replays everything still held.
#[test]
fn since_is_exclusive() {
    let r = node(settings(), 10);
    let hub = r.hub();
    let head = publish_n(hub, "c", 3);
    let a = connect(&r, "a");
    let s = hub
        .subscribe(a.conn(), "c", Some(&pos(&head)), None)
        .unwrap();
    assert_eq!((s.recovered, s.missed), (true, 0));
    assert!(!a.conn().is_catching_up());
    let b = connect(&r, "b");
    let s = hub
        .subscribe(b.conn(), "c", Some(&at(&head, 2)), None)
        .unwrap();
    assert_eq!((s.recovered, s.missed), (true, 1));
    assert_eq!(offsets(&drain(hub, b.conn())), [3]);
    let z = connect(&r, "z");
    let s = hub
        .subscribe(z.conn(), "c", Some(&at(&head, 0)), None)
        .unwrap();
    assert_eq!((s.recovered, s.missed), (true, 3));
    assert_eq!(offsets(&drain(hub, z.conn())), [1, 2, 3]);
    hub.publish("c", "4", None).unwrap();
    for g in [&a, &b, &z] {
        assert_eq!(offsets(&take(g.conn())), [4]);
    }
}

/// `since` in another epoch, before the window, or past the head is not
/// recovered: nothing is replayed and the subscription is live.
#[test]
fn since_outside_the_history_is_not_recovered() {
    let r = node(
        HubSettings {
            history_size: 5,
            ..settings()
        },
        10,
    );
    let hub = r.hub();
    let head = publish_n(hub, "c", 10);
    let epoch = pos(&head).epoch;
    let other = Position {
        epoch: format!("{epoch}x"),
        offset: 8,
    };
    // The window holds 6..=10: since 5 is its edge, since 4 is one before it.
    for (since, recovered, missed) in [
        (other, false, 0),
        (at(&head, 4), false, 0),
        (at(&head, 11), false, 0),
        (at(&head, 5), true, 5),
    ] {
        let g = connect(&r, "a");
        let s = hub.subscribe(g.conn(), "c", Some(&since), None).unwrap();
        assert_eq!(
            (s.recovered, s.missed),
            (recovered, missed),
            "since {since}"
        );
        assert_eq!(s.position, head);
        assert_eq!(g.conn().is_catching_up(), recovered);
        let replayed = offsets(&drain(hub, g.conn()));
        assert_eq!(
            replayed,
            (11 - missed..=10).collect::<Vec<_>>(),
            "since {since}"
        );
    }
}

/// The history keeps the last `history.size` messages; `history()` pages them with
/// an exclusive `since` (of this epoch) and a limit.
#[test]
fn history_keeps_its_size_and_pages() {
    let r = node(
        HubSettings {
            history_size: 5,
            ..settings()
        },
        10,
    );
    let hub = r.hub();
    assert!(hub.history("c", None, 10).is_none(), "no such channel");
    let head = publish_n(hub, "c", 8);
    let epoch = pos(&head).epoch;
    let page = |since: Option<Position>, limit| {
        let (e, msgs) = hub.history("c", since.as_ref(), limit).unwrap();
        assert_eq!(e, epoch);
        msgs.iter().map(|p| p.offset).collect::<Vec<_>>()
    };
    assert_eq!(page(None, 100), [4, 5, 6, 7, 8]);
    assert_eq!(page(None, 2), [4, 5]);
    assert_eq!(page(Some(at(&head, 5)), 2), [6, 7]);
    assert_eq!(page(Some(at(&head, 7)), 2), [8]);
    assert_eq!(page(Some(at(&head, 8)), 2), Vec::<u64>::new());
    assert_eq!(page(Some(at(&head, 1)), 100), [4, 5, 6, 7, 8]);
    let elsewhere = Position {
        epoch: "zzzzzzzzz".into(),
        offset: 6,
    };
    assert_eq!(
        page(Some(elsewhere), 100),
        [4, 5, 6, 7, 8],
        "another epoch: all"
    );
    assert_eq!(page(None, 0), Vec::<u64>::new());
}

/// A message is kept for `history.ttl_ms` (up to and including it) and no longer:
/// `history()` and a resume no longer see it.
#[tokio::test(start_paused = true)]
async fn history_expires_after_its_ttl() {
    let ttl = Duration::from_millis(1000);
    let r = node(
        HubSettings {
            history_ttl: ttl,
            ..settings()
        },
        10,
    );
    let hub = r.hub();
    let first = hub.publish("c", "1", None).unwrap().position;
    tokio::time::advance(Duration::from_millis(600)).await;
    hub.publish("c", "2", None).unwrap();
    tokio::time::advance(Duration::from_millis(400)).await;
    let held = |hub: &Hub| -> Vec<u64> {
        let (_, msgs) = hub.history("c", None, 100).unwrap();
        msgs.iter().map(|p| p.offset).collect()
    };
    assert_eq!(held(hub), [1, 2], "exactly the TTL: still kept");
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(held(hub), [2]);
    let a = connect(&r, "a");
    let s = hub
        .subscribe(a.conn(), "c", Some(&at(&first, 0)), None)
        .unwrap();
    assert_eq!((s.recovered, s.missed), (false, 0), "message 1 is gone");
    let b = connect(&r, "b");
    let s = hub
        .subscribe(b.conn(), "c", Some(&pos(&first)), None)
        .unwrap();
    assert_eq!((s.recovered, s.missed), (true, 1));
    assert_eq!(offsets(&drain(hub, b.conn())), [2]);
    tokio::time::advance(Duration::from_millis(600)).await;
    assert_eq!(held(hub), Vec::<u64>::new());
    assert_eq!(
        hub.publish("c", "3", None).unwrap().position,
        at(&first, 3).to_string()
    );
}

/// A repeated idempotency key answers the first result, marked duplicate, and
/// delivers and stores nothing; keys are per channel.
#[test]
fn a_repeated_idempotency_key_delivers_nothing() {
    let r = node(settings(), 10);
    let hub = r.hub();
    let a = connect(&r, "a");
    hub.subscribe(a.conn(), "c", None, None).unwrap();
    let first = hub.publish("c", "1", Some("k")).unwrap();
    assert!(!first.duplicate);
    let again = hub.publish("c", "2", Some("k")).unwrap();
    assert_eq!(
        again,
        PublishResult {
            duplicate: true,
            ..first.clone()
        }
    );
    assert_eq!(offsets(&take(a.conn())), [1]);
    assert_eq!(hub.history("c", None, 10).unwrap().1.len(), 1);
    let other = hub.publish("c", "3", Some("other")).unwrap();
    assert_eq!((pos(&other.position).offset, other.duplicate), (2, false));
    let elsewhere = hub.publish("d", "1", Some("k")).unwrap();
    assert!(!elsewhere.duplicate, "keys are per channel");
    assert_eq!(offsets(&take(a.conn())), [2]);
}

/// A channel remembers its last `history.size` keys: the oldest is forgotten
/// (publishing it again is new), the others still answer duplicate.
#[test]
fn idempotency_keys_are_bounded_by_the_history_size() {
    let r = node(
        HubSettings {
            history_size: 3,
            ..settings()
        },
        10,
    );
    let hub = r.hub();
    let firsts: Vec<PublishResult> = ["k1", "k2", "k3", "k4"]
        .iter()
        .map(|k| hub.publish("c", "1", Some(k)).unwrap())
        .collect();
    for (k, first) in ["k2", "k3", "k4"].iter().zip(&firsts[1..]) {
        let res = hub.publish("c", "1", Some(k)).unwrap();
        assert!(res.duplicate, "{k} is remembered");
        assert_eq!(res.position, first.position);
    }
    let res = hub.publish("c", "1", Some("k1")).unwrap();
    assert!(!res.duplicate, "k1 was forgotten");
    assert_eq!(pos(&res.position).offset, 5);
}

/// A key is remembered for `history.ttl_ms` (up to and including it), not after.
#[tokio::test(start_paused = true)]
async fn idempotency_keys_expire_with_the_ttl() {
    let ttl = Duration::from_millis(1000);
    let r = node(
        HubSettings {
            history_ttl: ttl,
            ..settings()
        },
        10,
    );
    let hub = r.hub();
    let first = hub.publish("c", "1", Some("k")).unwrap();
    tokio::time::advance(ttl).await;
    assert!(hub.publish("c", "1", Some("k")).unwrap().duplicate);
    tokio::time::advance(Duration::from_millis(1)).await;
    let res = hub.publish("c", "1", Some("k")).unwrap();
    assert!(!res.duplicate, "expired");
    assert_eq!(res.position, at(&first.position, 2).to_string());
    assert!(
        hub.publish("c", "1", Some("k")).unwrap().duplicate,
        "remembered anew"
    );
}

/// `max_channels_per_connection` (`too_many_channels`), a repeated subscribe
/// (`already_subscribed`), `max_channels` per node (`channel_limit`, for publish
/// too) and unsubscribing what is not subscribed (`not_subscribed`); a refusal
/// leaves no state and fires no event.
#[test]
fn limits_refuse_with_their_codes_and_leave_nothing() {
    let r = node(
        HubSettings {
            max_channels: 3,
            max_channels_per_connection: 2,
            ..settings()
        },
        10,
    );
    let hub = r.hub();
    let mut rx = r.events().subscribe();
    let a = connect(&r, "a");
    hub.subscribe(a.conn(), "x", None, None).unwrap();
    hub.subscribe(a.conn(), "y", None, None).unwrap();
    let err = hub.subscribe(a.conn(), "x", None, None).unwrap_err();
    assert_eq!(
        (err, err.code()),
        (HubError::AlreadySubscribed, "already_subscribed")
    );
    let err = hub.subscribe(a.conn(), "z", None, None).unwrap_err();
    assert_eq!(
        (err, err.code()),
        (HubError::TooManyChannels, "too_many_channels")
    );
    assert_eq!(
        hub.channel_count(),
        2,
        "the refused channel was not created"
    );
    hub.publish("z", "1", None).unwrap();
    let err = hub.publish("w", "1", None).unwrap_err();
    assert_eq!((err, err.code()), (HubError::ChannelLimit, "channel_limit"));
    let b = connect(&r, "b");
    let err = hub.subscribe(b.conn(), "w", None, None).unwrap_err();
    assert_eq!(err, HubError::ChannelLimit);
    assert!(b.conn().channels().is_empty());
    let err = hub.unsubscribe(b.conn(), "x").unwrap_err();
    assert_eq!(
        (err, err.code()),
        (HubError::NotSubscribed, "not_subscribed")
    );
    assert_eq!(
        hub.unsubscribe(b.conn(), "nowhere"),
        Err(HubError::NotSubscribed)
    );
    // Existing channels still take subscribers.
    hub.subscribe(b.conn(), "z", None, None).unwrap();
    assert_eq!(hub.channel_count(), 3);
    assert_eq!(a.conn().channels().len(), 2);
    let added = channel_events(&mut rx)
        .iter()
        .filter(|(k, _)| *k == "subscription.added")
        .count();
    assert_eq!(added, 3, "only the accepted subscribes");
}

/// No message reaches a connection after it unsubscribed. Presence counts
/// connections per client: two of one client count 2, and releasing one leaves 1.
#[test]
fn unsubscribe_stops_delivery_and_presence_counts_per_client() {
    let r = node(settings(), 10);
    let hub = r.hub();
    let a1 = connect(&r, "a");
    let a2 = connect(&r, "a");
    let b = connect(&r, "b");
    for g in [&a1, &a2, &b] {
        hub.subscribe(g.conn(), "room", None, None).unwrap();
    }
    let presence = |v: &[(&str, u32)]| -> Vec<(String, u32)> {
        v.iter().map(|(c, n)| (c.to_string(), *n)).collect()
    };
    assert_eq!(hub.presence("room"), presence(&[("a", 2), ("b", 1)]));
    assert_eq!(hub.channels(), [("room".to_string(), 3, 2)]);
    hub.publish("room", "1", None).unwrap();
    hub.unsubscribe(b.conn(), "room").unwrap();
    assert!(!b.conn().has_channel("room"));
    hub.publish("room", "2", None).unwrap();
    assert_eq!(
        offsets(&take(b.conn())),
        [1],
        "nothing after the unsubscribe"
    );
    assert_eq!(
        hub.unsubscribe(b.conn(), "room"),
        Err(HubError::NotSubscribed)
    );
    drop(a2);
    assert_eq!(hub.presence("room"), presence(&[("a", 1)]));
    assert_eq!(hub.channels(), [("room".to_string(), 1, 1)]);
    hub.publish("room", "3", None).unwrap();
    assert_eq!(offsets(&take(a1.conn())), [1, 2, 3]);
    drop(a1);
    assert!(hub.presence("room").is_empty());
    assert!(hub.channels().is_empty());
    assert!(hub.presence("nowhere").is_empty());
}

/// `channel.occupied` fires once for the first subscriber and `channel.vacated`
/// once after the last, with one `subscription.added`/`removed` per subscription,
/// whether it ends by unsubscribe or by release.
#[test]
fn channel_and_subscription_events_fire_once_each() {
    let r = node(settings(), 10);
    let hub = r.hub();
    let mut rx = r.events().subscribe();
    let a = connect(&r, "a");
    let b = connect(&r, "b");
    hub.subscribe(a.conn(), "room", None, None).unwrap();
    hub.subscribe(b.conn(), "room", None, None).unwrap();
    let ev = |k: &'static str, c: Option<&str>| (k, c.map(str::to_owned));
    assert_eq!(
        channel_events(&mut rx),
        [
            ev("channel.occupied", None),
            ev("subscription.added", Some("a")),
            ev("subscription.added", Some("b")),
        ]
    );
    hub.unsubscribe(a.conn(), "room").unwrap();
    assert_eq!(
        channel_events(&mut rx),
        [ev("subscription.removed", Some("a"))]
    );
    drop(a);
    assert_eq!(channel_events(&mut rx), [], "a had nothing left to end");
    drop(b);
    assert_eq!(
        channel_events(&mut rx),
        [
            ev("subscription.removed", Some("b")),
            ev("channel.vacated", None),
        ]
    );
    let c = connect(&r, "c");
    hub.subscribe(c.conn(), "room", None, None).unwrap();
    assert_eq!(
        channel_events(&mut rx),
        [
            ev("channel.occupied", None),
            ev("subscription.added", Some("c"))
        ]
    );
}

/// The cleanup removes a channel with no subscriber and no unexpired history, and
/// only that; the channel made again starts a new epoch, where an old position
/// does not resume.
#[tokio::test(start_paused = true)]
async fn sweep_removes_idle_channels_and_a_new_one_starts_a_new_epoch() {
    let ttl = Duration::from_millis(1000);
    let r = node(
        HubSettings {
            history_ttl: ttl,
            ..settings()
        },
        10,
    );
    let hub = r.hub();
    let old = hub.publish("kept", "1", None).unwrap().position;
    let a = connect(&r, "a");
    hub.subscribe(a.conn(), "watched", None, None).unwrap();
    let b = connect(&r, "b");
    hub.subscribe(b.conn(), "left", None, None).unwrap();
    hub.unsubscribe(b.conn(), "left").unwrap();
    assert_eq!(hub.channel_count(), 3);
    assert_eq!(hub.sweep(), 1, "only the channel left empty");
    assert!(hub.history("left", None, 10).is_none());
    tokio::time::advance(ttl).await;
    assert_eq!(hub.sweep(), 0, "history kept up to its TTL");
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(hub.sweep(), 1, "history expired");
    assert_eq!(hub.channel_count(), 1, "the subscribed channel stays");
    assert!(hub.history("kept", None, 10).is_none());
    let c = connect(&r, "c");
    let s = hub
        .subscribe(c.conn(), "kept", Some(&pos(&old)), None)
        .unwrap();
    let epoch = pos(&s.position).epoch;
    assert_ne!(epoch, pos(&old).epoch, "a new epoch");
    assert_eq!(s.position, format!("{epoch}:0"));
    assert_eq!((s.recovered, s.missed), (false, 0));
    let res = hub.publish("kept", "2", None).unwrap();
    assert_eq!(res.position, format!("{epoch}:1"));
    assert_eq!(offsets(&take(c.conn())), [1]);
}

/// A socket in memory that takes every write whole, logging the frames in the
/// order they reach it, the connection task's writes included (see [`write`]).
#[derive(Debug, Default)]
struct Wire(Mutex<Vec<Bytes>>);

impl DirectSink for Wire {
    fn try_write(&self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().push(Bytes::copy_from_slice(bytes));
        Ok(bytes.len())
    }
}

impl Wire {
    /// The connection task's turn: take what is queued and write it.
    fn write(&self, conn: &Connection) {
        let items = take(conn);
        self.0
            .lock()
            .extend(items.iter().map(|o| o.ws_frame().clone()));
    }

    fn offsets(&self) -> Vec<u64> {
        self.0
            .lock()
            .iter()
            .map(|f| pos(json_of(f)["position"].as_str().unwrap()).offset)
            .collect()
    }
}

/// A quiet channel's publish writes straight to an idle subscriber's socket; one
/// right after it is queued (and written by the task); after a quiet gap, straight
/// again. Either way each subscriber gets each message once, in order, a
/// subscriber with a socket and one without alike, and the deliveries count once.
#[tokio::test(start_paused = true)]
async fn quiet_and_queued_fan_outs_deliver_each_message_once_in_order() {
    let r = node(settings(), 10);
    let hub = r.hub();
    let (a, b) = (connect(&r, "a"), connect(&r, "b"));
    let wa = Arc::new(Wire::default());
    a.conn().outbox().attach(wa.clone());
    wa.write(a.conn()); // The welcome turn: now idle, direct writes may start.
    for g in [&a, &b] {
        hub.subscribe(g.conn(), "c", None, None).unwrap();
    }
    hub.publish("c", "1", None).unwrap();
    assert_eq!(wa.offsets(), [1], "written directly, quiet channel");
    assert_eq!(offsets(&take(b.conn())), [1], "no socket: queued");
    hub.publish("c", "2", None).unwrap();
    hub.publish("c", "3", None).unwrap();
    assert_eq!(wa.offsets(), [1], "a busy channel queues");
    wa.write(a.conn());
    wa.write(a.conn());
    tokio::time::advance(QUIET).await;
    hub.publish("c", "4", None).unwrap();
    wa.write(a.conn());
    assert_eq!(wa.offsets(), [1, 2, 3, 4]);
    assert_eq!(offsets(&take(b.conn())), [2, 3, 4]);
    let direct: usize = [1usize, 4].iter().map(|i| wa.0.lock()[i - 1].len()).sum();
    assert_eq!(a.conn().snapshot("t").bytes_out as usize, direct);
    let text = r.metrics().render();
    assert!(
        text.lines()
            .any(|l| l == "tether_messages_delivered_total 8"),
        "{text}"
    );
}

/// Whatever the page size (the outbox's room) and however far behind, a replay
/// goes live exactly at the head: every missed message once, then the live ones.
#[test]
fn a_replay_goes_live_exactly_at_the_head_whatever_the_page() {
    for queue in 1..=9 {
        for missed in 0..=20u64 {
            let r = node(settings(), queue);
            let hub = r.hub();
            let head = publish_n(hub, "c", 20);
            let g = connect(&r, "a");
            let s = hub
                .subscribe(g.conn(), "c", Some(&at(&head, 20 - missed)), None)
                .unwrap();
            assert_eq!((s.recovered, s.missed), (true, missed));
            let mut seen = offsets(&drain(hub, g.conn()));
            hub.publish("c", "21", None).unwrap();
            seen.extend(offsets(&take(g.conn())));
            let want: Vec<u64> = (21 - missed..=21).collect();
            assert_eq!(seen, want, "queue {queue}, missed {missed}");
        }
    }
}

/// Whether the hub still feeds `conn` live messages of `channel` (a subscriber
/// whose outbox overflowed is fed no more).
fn is_fed(hub: &Hub, channel: &str, conn: &Connection) -> bool {
    let ch = hub.inner.channels.lock().get(channel).cloned().unwrap();
    let st = ch.state.lock();
    st.subs.get(&conn.seq()).is_some_and(|s| s.live)
}

/// A subscriber whose outbox overflows is marked (its task then closes it with
/// 4008) and fed no more, while the others still get every message: on the
/// queued path and on the quiet (direct) one.
#[tokio::test(start_paused = true)]
async fn an_overflowing_subscriber_is_marked_and_the_rest_still_get_it() {
    for quiet in [false, true] {
        let r = node(settings(), 2);
        let hub = r.hub();
        let (slow, fast) = (connect(&r, "slow"), connect(&r, "fast"));
        for g in [&slow, &fast] {
            hub.subscribe(g.conn(), "c", None, None).unwrap();
        }
        for i in 1..=4 {
            if quiet {
                tokio::time::advance(QUIET).await;
            }
            assert_eq!(hub.publish("c", "1", None).unwrap().subscribers, 2);
            assert_eq!(offsets(&take(fast.conn())), [i], "quiet: {quiet}");
            assert_eq!(is_fed(hub, "c", slow.conn()), i < 3, "quiet: {quiet}");
        }
        assert!(slow.conn().outbox().overflowed());
        assert!(
            slow.conn().outbox().take(&mut Vec::new()),
            "its task sees the overflow"
        );
        // The slow one took 1 and 2; the fast one all four.
        let text = r.metrics().render();
        assert!(
            text.lines()
                .any(|l| l == "tether_messages_delivered_total 6"),
            "quiet: {quiet}: {text}"
        );
    }
}

/// A replay that the history outruns (the connection drains more slowly than the
/// channel's history turns over) ends as lost, never as a replay with a gap.
#[test]
fn a_replay_outrun_by_the_history_is_lost_not_gapped() {
    let r = node(
        HubSettings {
            history_size: 5,
            ..settings()
        },
        2,
    );
    let hub = r.hub();
    let first = hub.publish("c", "1", None).unwrap().position;
    for _ in 2..=5 {
        hub.publish("c", "1", None).unwrap();
    }
    let g = connect(&r, "a");
    let s = hub
        .subscribe(g.conn(), "c", Some(&at(&first, 0)), None)
        .unwrap();
    assert_eq!((s.recovered, s.missed), (true, 5));
    assert_eq!(hub.catch_up(g.conn()), CatchUp::More);
    for _ in 6..=10 {
        hub.publish("c", "1", None).unwrap();
    }
    assert_eq!(
        offsets(&take(g.conn())),
        [1, 2],
        "one page, then nothing live"
    );
    assert_eq!(hub.catch_up(g.conn()), CatchUp::Lost, "3 is gone");
    assert!(take(g.conn()).is_empty());
}

/// SPEC section 7: "a long replay never trips the slow-consumer limit". Here the
/// outbox's byte bound (`delivery.max_queue_bytes`) is the tighter one: 20 missed
/// messages of 8 KiB with 64 KiB of queue and 500 message slots.
#[test]
fn a_replay_of_large_messages_stays_within_the_byte_bound() {
    let r = node_with_bytes(settings(), 500, 64 << 10);
    let hub = r.hub();
    let data = format!("\"{}\"", "x".repeat(8 << 10));
    let first = hub.publish("c", &data, None).unwrap().position;
    for _ in 2..=20 {
        hub.publish("c", &data, None).unwrap();
    }
    let g = connect(&r, "a");
    let s = hub
        .subscribe(g.conn(), "c", Some(&at(&first, 0)), None)
        .unwrap();
    assert_eq!((s.recovered, s.missed), (true, 20));
    assert_eq!(offsets(&drain(hub, g.conn())), (1..=20).collect::<Vec<_>>());
}

/// Two publisher threads, a subscriber from the start, and one that resumes again
/// and again while they publish (each time a little behind what it last saw, then
/// unsubscribes once live): the first sees every offset once and in order, each
/// publisher's messages in its order; each resumed stretch of the other is
/// gapless and without repeats from its `since` on, and the last one reaches the
/// final offset.
#[test]
fn publishers_racing_resumes_lose_and_repeat_nothing() {
    for _ in 0..10 {
        racing_round(500);
    }
}

fn racing_round(per: u64) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let r = node(
        HubSettings {
            history_size: 2000,
            ..settings()
        },
        2000,
    );
    let hub = r.hub();
    let early = connect(&r, "early");
    hub.subscribe(early.conn(), "c", None, None).unwrap();
    let (started_tx, started) = std::sync::mpsc::channel();
    let finished = AtomicUsize::new(0);
    let stretches = std::thread::scope(|s| {
        for t in 0..2u64 {
            let (started_tx, finished) = (started_tx.clone(), &finished);
            s.spawn(move || {
                for i in 0..per {
                    hub.publish("c", &format!("[{t},{i}]"), None).unwrap();
                    if i == 10 {
                        started_tx.send(()).unwrap();
                    }
                    // Let the subscriber in between publishes.
                    std::thread::yield_now();
                }
                finished.fetch_add(1, Ordering::SeqCst);
            });
        }
        started.recv().unwrap();
        resume_while(&r, || finished.load(Ordering::SeqCst) < 2)
    });
    let (since, last) = stretches.last().map(|(s, o)| (*s, o.last())).unwrap();
    assert_eq!(last.copied().unwrap_or(since), 2 * per, "the last stretch");
    for (since, got) in &stretches {
        let want: Vec<u64> = (since + 1..=since + got.len() as u64).collect();
        assert_eq!(got, &want, "the stretch after {since}");
    }
    assert!(stretches.len() > 1, "resumed more than once");
    let all = take(early.conn());
    assert_eq!(offsets(&all), (1..=2 * per).collect::<Vec<_>>());
    let mut next = [0u64; 2];
    for item in &all {
        let Outgoing::Message(p) = item else {
            unreachable!()
        };
        let v: Value = serde_json::from_str(&p.data).unwrap();
        let (t, i) = (v[0].as_u64().unwrap() as usize, v[1].as_u64().unwrap());
        assert_eq!(i, next[t], "publisher {t} in order");
        next[t] += 1;
    }
}

/// The connection task of a subscriber that, while `running()`, resumes channel
/// `c` a few messages behind what it last saw, catches up, takes what is queued,
/// unsubscribes, and resumes again; then resumes once more and drains. Returns each
/// stretch: its `since` and the offsets received.
fn resume_while(r: &Registry, running: impl Fn() -> bool) -> Vec<(u64, Vec<u64>)> {
    let hub = r.hub();
    let g = connect(r, "late");
    let (epoch, held) = hub.history("c", None, usize::MAX).unwrap();
    let mut since = held.last().unwrap().offset.saturating_sub(5);
    let mut stretches = Vec::new();
    let mut last_round = false;
    loop {
        let at = Position {
            epoch: epoch.clone(),
            offset: since,
        };
        let s = hub.subscribe(g.conn(), "c", Some(&at), None).unwrap();
        assert!(s.recovered, "since {since}");
        let mut got = Vec::new();
        if last_round {
            got = offsets(&drain(hub, g.conn()));
        } else {
            for turn in 0.. {
                if !g.conn().is_catching_up() && !got.is_empty() {
                    break;
                }
                assert!(turn < 100_000, "no message since {since}");
                got.extend(offsets(&task_turn(hub, g.conn())));
                std::thread::yield_now();
            }
            hub.unsubscribe(g.conn(), "c").unwrap();
            got.extend(offsets(&take(g.conn())));
        }
        let next = got.last().map_or(since, |o| o.saturating_sub(3));
        stretches.push((since, got));
        if last_round {
            return stretches;
        }
        last_round = !running();
        since = next;
    }
}

/// A socket whose first write waits until the test lets it go: it holds a publish
/// in the middle of its direct fan-out (with the channel's publishing lock).
#[derive(Debug)]
struct Gate {
    entered: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    release: Mutex<std::sync::mpsc::Receiver<()>>,
}

impl DirectSink for Gate {
    fn try_write(&self, bytes: &[u8]) -> std::io::Result<usize> {
        if let Some(entered) = self.entered.lock().take() {
            entered.send(()).unwrap();
            // Released, or the test failed and dropped the sender: go on.
            let _ = self.release.lock().recv();
        }
        Ok(bytes.len())
    }
}

/// `try_unsubscribe` steps back (`None`, nothing changed) while a publish is
/// writing to the channel's subscribers, and unsubscribes once it is done;
/// `fanout_size` counts the subscribers a publish would reach.
#[test]
fn try_unsubscribe_steps_back_while_a_fan_out_writes() {
    let r = node(settings(), 10);
    let hub = r.hub();
    let a = connect(&r, "a");
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel();
    a.conn().outbox().attach(Arc::new(Gate {
        entered: Mutex::new(Some(entered_tx)),
        release: Mutex::new(release_rx),
    }));
    take(a.conn()); // The welcome turn: now idle, direct writes may start.
    hub.subscribe(a.conn(), "c", None, None).unwrap();
    assert_eq!((hub.fanout_size("c"), hub.fanout_size("none")), (1, 0));
    std::thread::scope(|s| {
        // Owned here, so that a failed assertion below lets the publish go.
        let release = release;
        let publishing = s.spawn(|| hub.publish("c", "1", None).unwrap());
        entered.recv().unwrap();
        assert_eq!(hub.try_unsubscribe(a.conn(), "c"), None);
        assert!(a.conn().has_channel("c"), "nothing changed");
        assert_eq!(hub.presence("c"), [("a".to_string(), 1)]);
        release.send(()).unwrap();
        assert_eq!(publishing.join().unwrap().subscribers, 1);
    });
    assert_eq!(hub.try_unsubscribe(a.conn(), "c"), Some(Ok(())));
    assert!(!a.conn().has_channel("c"));
    assert_eq!(hub.fanout_size("c"), 0);
    let not = Some(Err(HubError::NotSubscribed));
    assert_eq!(hub.try_unsubscribe(a.conn(), "c"), not);
    assert_eq!(hub.try_unsubscribe(a.conn(), "nowhere"), not);
}

#[path = "hub_external_tests.rs"]
mod external;
