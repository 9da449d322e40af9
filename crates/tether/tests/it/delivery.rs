//! Channels, delivery, history and recovery over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::*;
use tether_protocol::EventType;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

async fn subscribe(ws: &mut Ws, channel: &str, since: Option<&str>) -> Value {
    let frame = json!({"type": "subscribe", "ref": 1, "channel": channel, "since": since});
    ws.send(Message::text(frame.to_string())).await.unwrap();
    next_json(ws).await
}

async fn publish(s: &TestServer, channel: &str, data: Value) -> Value {
    let (st, body) = s
        .post("/api/publish", json!({"channel": channel, "data": data}))
        .await;
    assert_eq!(st, 200, "{body}");
    body
}

fn offset(position: &Value) -> u64 {
    position
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribe_publish_receive() {
    let s = start(|_| {}).await;
    let mut rx = s.app.registry.events().subscribe();
    let (mut ws, _) = s.ws("?client=sub").await;
    let sub = subscribe(&mut ws, "news", None).await;
    assert_eq!(sub["type"], "subscribed");
    assert_eq!(
        (sub["ref"].as_u64(), sub["channel"].as_str()),
        (Some(1), Some("news"))
    );
    assert!(sub["position"].as_str().unwrap().ends_with(":0"));
    assert_eq!(
        (sub["recovered"].as_bool(), sub["missed"].as_u64()),
        (Some(false), Some(0))
    );
    let r = publish(&s, "news", json!({"headline": "hi"})).await;
    assert_eq!(
        (r["subscribers"].as_u64(), r["duplicate"].as_bool()),
        (Some(1), Some(false))
    );
    let m = next_json(&mut ws).await;
    assert_eq!(
        m,
        json!({"type": "message", "channel": "news", "id": r["id"], "position": r["position"], "data": {"headline": "hi"}})
    );
    assert_eq!(offset(&m["position"]), 1);
    ws.send(Message::text(
        r#"{"type":"unsubscribe","ref":2,"channel":"news"}"#,
    ))
    .await
    .unwrap();
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "unsubscribed", "ref": 2, "channel": "news"})
    );
    publish(&s, "news", json!(2)).await;
    assert_alive(&mut ws).await; // no message arrived before the pong
    client_close(ws).await;
    s.assert_clean().await;
    let ev = collect_events(&mut rx, Duration::from_millis(100)).await;
    let k = kinds(&ev);
    let pos = |t: &str| k.iter().position(|x| x == t).unwrap();
    assert!(pos("channel.occupied") < pos("subscription.added"));
    assert!(pos("subscription.removed") < pos("channel.vacated"));
    assert!(pos("channel.vacated") < pos("connection.closed"));
    assert_eq!(
        ev.iter()
            .find(|e| e.kind == EventType::SubscriptionAdded)
            .unwrap()
            .channel
            .as_deref(),
        Some("news")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn subscribe_errors_keep_the_connection_open() {
    let s = start(|c| {
        c.limits.max_channels_per_connection = 2.try_into().unwrap();
        c.limits.max_channels = 3.try_into().unwrap();
    })
    .await;
    let (mut ws, _) = s.ws("?client=e").await;
    let err = |v: Value| v["code"].as_str().unwrap().to_owned();
    assert_eq!(
        err(subscribe(&mut ws, "bad name", None).await),
        "bad_channel"
    );
    assert_eq!(subscribe(&mut ws, "a", None).await["type"], "subscribed");
    assert_eq!(
        err(subscribe(&mut ws, "a", None).await),
        "already_subscribed"
    );
    assert_eq!(subscribe(&mut ws, "b", None).await["type"], "subscribed");
    assert_eq!(
        err(subscribe(&mut ws, "c", None).await),
        "too_many_channels"
    );
    ws.send(Message::text(
        r#"{"type":"unsubscribe","ref":5,"channel":"zzz"}"#,
    ))
    .await
    .unwrap();
    let e = next_json(&mut ws).await;
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_u64()),
        (Some("not_subscribed"), Some(5))
    );
    let (mut other, _) = s.ws("?client=f").await;
    assert_eq!(subscribe(&mut other, "c", None).await["type"], "subscribed");
    assert_eq!(err(subscribe(&mut other, "d", None).await), "channel_limit");
    let (st, body) = s
        .post("/api/publish", json!({"channel": "d", "data": 1}))
        .await;
    assert_eq!((st, body["error"].as_str()), (503, Some("channel_limit")));
    assert_alive(&mut ws).await;
    client_close(ws).await;
    client_close(other).await;
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_inside_and_outside_the_history_window() {
    let s = start(|c| {
        c.history.size = 5.try_into().unwrap();
        c.delivery.max_queue_messages = 4.try_into().unwrap();
    })
    .await;
    let mut last = Value::Null;
    for i in 1..=8 {
        last = publish(&s, "h", json!(i)).await;
    }
    let epoch = last["position"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .0
        .to_owned();
    // Inside: after 5 → 6, 7, 8 in order, then live.
    let (mut ws, _) = s.ws("?client=r").await;
    let sub = subscribe(&mut ws, "h", Some(&format!("{epoch}:5"))).await;
    assert_eq!(
        (sub["recovered"].as_bool(), sub["missed"].as_u64()),
        (Some(true), Some(3))
    );
    assert_eq!(sub["position"], format!("{epoch}:8"));
    for want in 6..=8 {
        let m = next_json(&mut ws).await;
        assert_eq!(
            (offset(&m["position"]), m["data"].as_u64()),
            (want, Some(want))
        );
    }
    publish(&s, "h", json!(9)).await;
    assert_eq!(next_json(&mut ws).await["data"], 9);
    // Outside: offset 2 is gone (history keeps 5); a foreign epoch; junk.
    for since in [
        format!("{epoch}:2"),
        "zzzz:5".to_owned(),
        "junk".to_owned(),
        format!("{epoch}:99"),
    ] {
        let (mut ws2, _) = s.ws("?client=r2").await;
        let sub = subscribe(&mut ws2, "h", Some(&since)).await;
        assert_eq!(
            (sub["recovered"].as_bool(), sub["missed"].as_u64()),
            (Some(false), Some(0)),
            "{since}"
        );
        client_close(ws2).await;
    }
    // Exactly at the head: recovered, nothing missed.
    let (mut ws3, _) = s.ws("?client=r3").await;
    let sub = subscribe(&mut ws3, "h", Some(&format!("{epoch}:9"))).await;
    assert_eq!(
        (sub["recovered"].as_bool(), sub["missed"].as_u64()),
        (Some(true), Some(0))
    );
    client_close(ws3).await;
    client_close(ws).await;
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resuming_900_behind_gets_all_without_4008() {
    let s = start(|_| {}).await;
    let first = publish(&s, "big", json!(1)).await;
    let epoch = first["position"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .0
        .to_owned();
    for i in 2..=900 {
        s.app
            .registry
            .hub()
            .publish("big", &i.to_string(), None)
            .unwrap();
    }
    let (mut ws, _) = s.ws("?client=late").await;
    let sub = subscribe(&mut ws, "big", Some(&format!("{epoch}:0"))).await;
    assert_eq!(
        (sub["recovered"].as_bool(), sub["missed"].as_u64()),
        (Some(true), Some(900))
    );
    for want in 1..=900u64 {
        let m = next_json(&mut ws).await;
        assert_eq!(offset(&m["position"]), want);
    }
    assert_alive(&mut ws).await;
    client_close(ws).await;
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_offset_exactly_once_across_abrupt_drops_and_resumes() {
    const TOTAL: u64 = 400;
    const CLIENTS: u64 = 5;
    let s = start(|_| {}).await;
    let head = publish(&s, "live", json!("setup")).await;
    let epoch = head["position"]
        .as_str()
        .unwrap()
        .rsplit_once(':')
        .unwrap()
        .0
        .to_owned();
    let url = s.ws_url("");
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (url, epoch) = (url.clone(), epoch.clone());
        clients.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(c + 1);
            let mut got: Vec<u64> = Vec::new();
            let mut last = 1u64; // the setup message is not counted
            while last <= TOTAL {
                let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}?client=x{c}"))
                    .await
                    .unwrap();
                let _welcome = next_json(&mut ws).await;
                let sub = subscribe(&mut ws, "live", Some(&format!("{epoch}:{last}"))).await;
                assert_eq!(sub["recovered"], true, "{sub}");
                let take = rng.u64(5..80);
                for _ in 0..take {
                    if last > TOTAL {
                        break;
                    }
                    let m = next_json(&mut ws).await;
                    let o = offset(&m["position"]);
                    got.push(o);
                    last = o;
                }
                // Abrupt: drop the TCP connection without a close frame.
                drop(ws);
            }
            got
        }));
    }
    for i in 0..TOTAL {
        s.app
            .registry
            .hub()
            .publish("live", &i.to_string(), None)
            .unwrap();
        if i % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    for c in clients {
        let got = c.await.unwrap();
        let want: Vec<u64> = (2..=TOTAL + 1).collect();
        assert_eq!(got, want);
    }
    s.assert_clean().await;
}

/// A server whose outboxes overflow soon: 100 messages or 256 KiB.
async fn start_with_short_queues() -> TestServer {
    start(|c| {
        c.delivery.max_queue_messages = 100.try_into().unwrap();
        c.delivery.max_queue_bytes = (256 * 1024).try_into().unwrap();
    })
    .await
}

/// Publishes `n` copies of `payload` to `firehose`, pausing 4 ms every 40.
async fn firehose(s: &TestServer, payload: &str, n: u64) {
    let hub = s.app.registry.hub();
    for i in 0..n {
        hub.publish("firehose", payload, None).unwrap();
        if i % 40 == 0 {
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
    }
}

/// The `connection.closed` events among `ev`.
fn closed_events(
    ev: &[std::sync::Arc<tether_protocol::LifecycleEvent>],
) -> Vec<&std::sync::Arc<tether_protocol::LifecycleEvent>> {
    ev.iter()
        .filter(|e| e.kind == EventType::ConnectionClosed)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_consumer_is_closed_with_4008_while_a_fast_one_keeps_up() {
    let s = start_with_short_queues().await;
    let mut rx = s.app.registry.events().subscribe();
    let (mut fast, _) = s.ws("?client=fast").await;
    assert_eq!(
        subscribe(&mut fast, "firehose", None).await["type"],
        "subscribed"
    );
    let mut slow = raw_ws(s.client, "/ws?client=slow").await;
    let sub = br#"{"type":"subscribe","channel":"firehose"}"#;
    let mask = [7u8, 7, 7, 7];
    let mut frame = vec![0x81u8, 0x80 | sub.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(sub.iter().map(|b| b ^ 7));
    slow.write_all(&frame).await.unwrap();
    // Wait until both are subscribed.
    while s.app.registry.hub().presence("firehose").len() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    const N: u64 = 6000;
    let payload = format!("\"{}\"", "x".repeat(2000));
    let reader = tokio::spawn(async move {
        let mut last = 0;
        while last < N {
            let m = next_json(&mut fast).await;
            let o = offset(&m["position"]);
            assert_eq!(o, last + 1);
            last = o;
        }
        fast
    });
    firehose(&s, &payload, N).await;
    let fast = tokio::time::timeout(Duration::from_secs(30), reader)
        .await
        .unwrap()
        .unwrap();
    let ev = collect_events(&mut rx, Duration::from_millis(300)).await;
    let closed = closed_events(&ev);
    assert_eq!(closed.len(), 1, "only the slow one closed");
    assert_eq!(closed[0].client_id.as_deref(), Some("slow"));
    assert_eq!(closed[0].code, Some(4008));
    drop(slow);
    client_close(fast).await;
    s.assert_clean().await;
}

/// An SSE stream on a taken-over socket whose write is cut off by an overflow
/// finishes that chunk before the `closing` event, so a reader that reads again
/// sees a well-formed chunked stream: whole events, `closing` with 4008, the last
/// chunk. And nothing is left behind.
#[tokio::test(flavor = "multi_thread")]
async fn an_sse_chunk_cut_off_by_overflow_is_finished_before_the_close() {
    use tokio::io::AsyncReadExt;
    let s = start(|c| {
        c.delivery.max_queue_messages = 8.try_into().unwrap();
    })
    .await;
    let mut rx = s.app.registry.events().subscribe();
    let mut slow = tokio::net::TcpStream::connect(s.client).await.unwrap();
    slow.write_all(b"GET /sse?client=slow&channel=big HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut bytes = raw_read_until(&mut slow, b"event: welcome", Duration::from_secs(5)).await;
    assert!(bytes.starts_with(b"HTTP/1.1 200 OK\r\n"));
    overflow_slow_on_big(&s).await;
    // Read again at once, within the server's wait for a peer that stopped reading,
    // until the server closes the socket.
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut bytes))
        .await
        .expect("the server closes the socket")
        .unwrap();
    let body_at = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let (body, ended) = dechunk(&bytes[body_at..]);
    assert!(ended, "the stream ends with the last chunk");
    let body = String::from_utf8(body).unwrap();
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    let closing = events.last().unwrap();
    assert!(closing.contains("event: closing"), "{closing}");
    assert!(closing.contains("\"code\":4008"), "{closing}");
    let messages = events
        .iter()
        .filter(|e| e.contains("event: message"))
        .inspect(|e| {
            let data = e.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
            serde_json::from_str::<Value>(data).expect("every event is whole JSON");
        })
        .count();
    assert!(messages > 2, "messages came before the overflow");
    drop(slow);
    s.assert_clean().await;
    let ev = collect_events(&mut rx, Duration::from_millis(100)).await;
    assert_eq!(closed_events(&ev)[0].code, Some(4008));
}

/// Publishes 30 KB messages to `big` until client `slow`'s outbox overflows: the
/// socket buffers fill partway through one of them.
async fn overflow_slow_on_big(s: &TestServer) {
    let conn = s
        .app
        .registry
        .connections()
        .into_iter()
        .find(|c| c.client_id() == "slow")
        .unwrap();
    let payload = format!("\"{}\"", "y".repeat(30_000));
    let mut published = 0;
    while !conn.outbox().overflowed() {
        assert!(published < 5_000, "the queue never overflowed");
        s.app.registry.hub().publish("big", &payload, None).unwrap();
        published += 1;
        if published % 8 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Splits what a server sent into frames: (opcode byte, payload) for every whole
/// frame, and whether bytes were left over (a frame cut short at the end).
fn server_frames(bytes: &[u8]) -> (Vec<(u8, &[u8])>, bool) {
    let (mut at, mut out) = (0, Vec::new());
    while at < bytes.len() {
        let Some(&b1) = bytes.get(at + 1) else { break };
        assert_eq!(b1 & 0x80, 0, "server frames are unmasked");
        let (len, hdr) = match b1 & 0x7f {
            126 if bytes.len() >= at + 4 => (
                u16::from_be_bytes([bytes[at + 2], bytes[at + 3]]) as usize,
                4,
            ),
            127 if bytes.len() >= at + 10 => (
                u64::from_be_bytes(bytes[at + 2..at + 10].try_into().unwrap()) as usize,
                10,
            ),
            126 | 127 => break,
            n => (n as usize, 2),
        };
        let Some(payload) = bytes.get(at + hdr..at + hdr + len) else {
            break;
        };
        out.push((bytes[at], payload));
        at += hdr + len;
    }
    (out, at < bytes.len())
}

fn is_message(payload: &[u8]) -> bool {
    payload.starts_with(br#"{"type":"message""#)
}

/// Reads a raw WebSocket peer's socket into `buf` until it holds `n` whole `message`
/// frames and no cut-off frame, within `limit`.
async fn read_messages(
    sock: &mut tokio::net::TcpStream,
    buf: &mut Vec<u8>,
    n: usize,
    limit: Duration,
) {
    use tokio::io::AsyncReadExt;
    let read_all = async {
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            let (frames, cut) = server_frames(buf);
            if !cut && frames.iter().filter(|(_, p)| is_message(p)).count() >= n {
                return;
            }
            let got = sock.read(&mut chunk).await.unwrap();
            assert!(got > 0, "closed early");
            buf.extend_from_slice(&chunk[..got]);
        }
    };
    tokio::time::timeout(limit, read_all)
        .await
        .expect("every message arrives");
}

/// Frames are written straight to the socket, many per `writev`; when the queue
/// overflows while a write is stuck halfway through a frame, the rest of that frame
/// goes out before `closing` and the close frame, so a peer that reads again sees a
/// well-formed stream ending with 4008.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_cut_off_by_overflow_is_finished_before_the_close() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = start(|c| {
        c.delivery.max_queue_messages = 8.try_into().unwrap();
    })
    .await;
    let mut slow = raw_ws(s.client, "/ws?client=slow").await;
    slow.write_all(&masked_text(br#"{"type":"subscribe","channel":"big"}"#))
        .await
        .unwrap();
    while s.app.registry.hub().presence("big").is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    overflow_slow_on_big(&s).await;
    // Read again at once, within the server's wait for a peer that stopped reading,
    // until the server closes the socket.
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut bytes))
        .await
        .expect("the server closes the socket")
        .unwrap();
    let (frames, cut) = server_frames(&bytes);
    assert!(!cut, "the stream ends on a frame boundary");
    let (last, rest) = frames.split_last().unwrap();
    assert_eq!(last.0, 0x88, "the stream ends with a close frame");
    assert_eq!(u16::from_be_bytes([last.1[0], last.1[1]]), 4008);
    let texts: Vec<Value> = rest
        .iter()
        .filter(|f| f.0 != 0x89)
        .map(|f| {
            assert_eq!(f.0, 0x81, "only text frames before the close");
            serde_json::from_slice(f.1).expect("every text frame is whole JSON")
        })
        .collect();
    assert_eq!(texts.last().unwrap()["type"], "closing");
    assert_eq!(texts.last().unwrap()["code"], 4008);
    assert!(texts.len() > 2, "messages came before the overflow");
    drop(slow);
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotent_publish_delivers_once() {
    let s = start(|_| {}).await;
    let (mut ws, _) = s.ws("?client=i").await;
    subscribe(&mut ws, "idem", None).await;
    let body = json!({"channel": "idem", "data": "once", "idempotency_key": "k1"});
    let (_, a) = s.post("/api/publish", body.clone()).await;
    let (_, b) = s.post("/api/publish", body).await;
    assert_eq!(
        (a["duplicate"].as_bool(), b["duplicate"].as_bool()),
        (Some(false), Some(true))
    );
    assert_eq!((&a["id"], &a["position"]), (&b["id"], &b["position"]));
    assert_eq!(next_json(&mut ws).await["data"], "once");
    assert_alive(&mut ws).await;
    client_close(ws).await;
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn channels_presence_and_history_api() {
    let s = start(|_| {}).await;
    let (mut a1, _) = s.ws("?client=a").await;
    let (mut a2, _) = s.ws("?client=a").await;
    let (mut b, _) = s.ws("?client=b").await;
    for ws in [&mut a1, &mut a2, &mut b] {
        subscribe(ws, "room", None).await;
    }
    let (_, ch) = s.get("/api/channels").await;
    assert_eq!(
        ch,
        json!({"channels": [{"name": "room", "subscribers": 3, "clients": 2}]})
    );
    let (_, p) = s.get("/api/channels/room/presence").await;
    assert_eq!(
        p,
        json!({"clients": [{"client_id": "a", "connections": 2}, {"client_id": "b", "connections": 1}]})
    );
    let mut positions = Vec::new();
    for i in 0..5 {
        positions.push(
            publish(&s, "room", json!({"n": i})).await["position"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let (_, h) = s
        .get(&format!(
            "/api/channels/room/history?since={}&limit=2",
            positions[1]
        ))
        .await;
    let msgs = h["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(
        (msgs[0]["position"].as_str(), &msgs[0]["data"]),
        (Some(positions[2].as_str()), &json!({"n": 2}))
    );
    assert_eq!(h["epoch"].as_str(), positions[0].split(':').next());
    let (_, none) = s.get("/api/channels/empty/history").await;
    assert_eq!(none, json!({"epoch": null, "messages": []}));
    assert_eq!(s.get("/api/channels/room/history?since=nope").await.0, 400);
    assert_eq!(s.get("/api/channels/bad%20name/presence").await.0, 400);
    for ws in [a1, a2, b] {
        client_close(ws).await;
    }
    s.assert_clean().await;
    assert_eq!(s.get("/api/channels").await.1, json!({"channels": []}));
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_and_send_validate_their_input() {
    let s = start(|c| c.limits.max_publish_bytes = 100.try_into().unwrap()).await;
    let (st, b) = s
        .post(
            "/api/publish",
            json!({"channel": "c", "data": "x".repeat(200)}),
        )
        .await;
    assert_eq!((st, b["error"].as_str()), (413, Some("payload_too_large")));
    for bad in [
        json!({"channel": "c"}),
        json!({"channel": "bad name", "data": 1}),
        json!({"data": 1}),
        json!({"channel": "c", "data": 1, "x": 2}),
    ] {
        let (st, b) = s.post("/api/publish", bad.clone()).await;
        assert_eq!(
            (st, b["error"].as_str()),
            (400, Some("bad_request")),
            "{bad}"
        );
    }
    let (st, _) = s.post("/api/send", json!({"client_id": "nobody"})).await;
    assert_eq!(st, 400);
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn direct_send_reaches_every_connection_of_the_client() {
    let s = start(|_| {}).await;
    let (mut a, _) = s.ws("?client=d").await;
    let (mut b, _) = s.ws("?client=d").await;
    let mut sse = s
        .http
        .get(format!("http://{}/sse?client=d", s.client))
        .send()
        .await
        .unwrap();
    let (st, r) = s
        .post("/api/send", json!({"client_id": "d", "data": {"hello": 1}}))
        .await;
    assert_eq!((st, r), (200, json!({"connections": 3})));
    for ws in [&mut a, &mut b] {
        let m = next_json(ws).await;
        assert_eq!(
            (m["type"].as_str(), &m["data"]),
            (Some("direct"), &json!({"hello": 1}))
        );
        assert!(m["id"].as_str().is_some());
    }
    let text = read_sse_until(&mut sse, |t| t.contains("event: direct")).await;
    assert!(text.contains("event: direct\ndata: {\"id\":"), "{text}");
    assert_eq!(
        s.post("/api/send", json!({"client_id": "nobody", "data": 1}))
            .await
            .1,
        json!({"connections": 0})
    );
    drop(sse);
    client_close(a).await;
    client_close(b).await;
    s.assert_clean().await;
}

/// Parses SSE text into (id, event, data) triples.
fn sse_events(text: &str) -> Vec<(Option<String>, String, String)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut id = None;
            let mut event = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("event: ") {
                    event = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            event.map(|e| (id, e, data))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_resumes_every_channel_from_last_event_id_and_tombstones_stop_it() {
    let s = start(|_| {}).await;
    let url = format!("http://{}/sse?client=s&channel=b&channel=a", s.client);
    let mut r1 = s.http.get(&url).send().await.unwrap();
    publish(&s, "a", json!("a1")).await;
    publish(&s, "b", json!("b1")).await;
    let text = read_sse_until(&mut r1, |t| t.matches("event: message").count() == 2).await;
    let evs = sse_events(&text);
    assert_eq!(evs[0].1, "welcome");
    assert!(
        evs.iter().all(|e| e.0.is_some()),
        "every event carries an id"
    );
    let last_id = evs.last().unwrap().0.clone().unwrap();
    // Kicked with reconnect: the browser would come back with Last-Event-ID.
    s.post(
        "/api/disconnect",
        json!({"client_id": "s", "reconnect": true}),
    )
    .await;
    let text = read_sse_until(&mut r1, |t| t.contains("event: closing")).await;
    assert!(text.contains("\"code\":4002"));
    drop(r1);
    publish(&s, "a", json!("a2")).await;
    publish(&s, "b", json!("b2")).await;
    publish(&s, "a", json!("a3")).await;
    let mut r2 = s
        .http
        .get(&url)
        .header("last-event-id", &last_id)
        .send()
        .await
        .unwrap();
    assert_eq!(r2.status(), 200);
    let text = read_sse_until(&mut r2, |t| t.matches("event: message").count() == 3).await;
    let evs = sse_events(&text);
    let welcome: Value = serde_json::from_str(&evs[0].2).unwrap();
    assert_eq!(welcome["recovered"], json!({"a": true, "b": true}));
    let data: Vec<String> = evs
        .iter()
        .filter(|e| e.1 == "message")
        .map(|e| {
            let v: Value = serde_json::from_str(&e.2).unwrap();
            assert!(v.get("type").is_none());
            v["data"].as_str().unwrap().to_owned()
        })
        .collect();
    let mut sorted = data.clone();
    sorted.sort();
    assert_eq!(sorted, ["a2", "a3", "b2"]);
    assert!(data.iter().position(|d| d == "a2") < data.iter().position(|d| d == "a3"));
    let last_id = evs.last().unwrap().0.clone().unwrap();
    // Kicked for good: the cursor's connection is tombstoned, and the answer is 204.
    s.post("/api/disconnect", json!({"client_id": "s"})).await;
    let _ = read_sse_until(&mut r2, |t| t.contains("event: closing")).await;
    drop(r2);
    let r3 = s
        .http
        .get(&url)
        .header("last-event-id", &last_id)
        .send()
        .await
        .unwrap();
    assert_eq!(r3.status(), 204);
    assert_eq!(r3.headers()["access-control-allow-origin"], "*");
    // An unparsable cursor counts as absent.
    let mut r4 = s
        .http
        .get(&url)
        .header("last-event-id", "v1.garbage.x")
        .send()
        .await
        .unwrap();
    let text = read_sse_until(&mut r4, |t| t.contains("event: welcome")).await;
    assert!(
        text.contains("\"recovered\":{\"a\":false,\"b\":false}"),
        "{text}"
    );
    drop(r4);
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_cors_and_preflight_with_allowed_origins() {
    let s = start(|c| c.limits.allowed_origins = vec!["https://app.example".into()]).await;
    let url = format!("http://{}/sse?client=o", s.client);
    let r = s
        .http
        .get(&url)
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(r.headers()["access-control-allow-credentials"], "true");
    assert_eq!(r.headers()["vary"], "Origin");
    drop(r);
    let r = s
        .http
        .get(&url)
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "origin_not_allowed");
    let r = s
        .http
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let allow = r.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(allow.contains("authorization") && allow.contains("last-event-id"));
    // No Origin: not checked.
    let r = s.http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    drop(r);
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn closing_follows_queued_messages() {
    let s = start(|_| {}).await;
    let (mut ws, _) = s.ws("?client=q").await;
    subscribe(&mut ws, "q", None).await;
    for i in 0..50 {
        s.app
            .registry
            .hub()
            .publish("q", &i.to_string(), None)
            .unwrap();
    }
    s.post("/api/disconnect", json!({"client_id": "q"})).await;
    let mut seen = 0;
    loop {
        if let Message::Text(t) = ws.next().await.unwrap().unwrap() {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["type"] == "closing" {
                break;
            }
            assert_eq!(v["data"], seen);
            seen += 1;
        }
    }
    assert_eq!(seen, 50);
    drop(ws);
    s.assert_clean().await;
}

/// `[api] listen` equal to `listen`: one listener serves clients and the API. The
/// API's routes keep their key check there; the client routes need no key; anything
/// else is the JSON 404. (This configuration used to panic on merging the routers.)
#[tokio::test(flavor = "multi_thread")]
async fn one_listener_serves_clients_and_the_api() {
    let addr: std::net::SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let mut s = start(|c| {
        c.listen = addr;
        c.api.listen = addr;
        c.api.key = "secret".into();
    })
    .await;
    // No idle keep-alive connections: on this listener each would be a task.
    s.http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    assert_eq!((s.client, s.api), (addr, addr));
    let (mut ws, _) = s.ws("?client=shared").await;
    assert_eq!(subscribe(&mut ws, "news", None).await["type"], "subscribed");
    let r = publish(&s, "news", json!({"n": 1})).await;
    assert_eq!(r["subscribers"], 1, "{r}");
    let m = next_json(&mut ws).await;
    assert_eq!(
        (m["type"].as_str(), &m["data"]),
        (Some("message"), &json!({"n": 1}))
    );

    let base = format!("http://{addr}");
    let unkeyed = s
        .http
        .get(format!("{base}/api/stats"))
        .send()
        .await
        .unwrap();
    assert_eq!(unkeyed.status(), 401);
    let missing = s.http.get(format!("{base}/nope")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["error"], "not_found", "{body}");
    let health = s.http.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);

    client_close(ws).await;
    s.assert_clean().await;
    s.stop().await;
}

/// A masked client ping frame written by hand.
fn masked_ping(payload: &[u8]) -> Vec<u8> {
    let mut f = masked_text(payload);
    f[0] = 0x89;
    f
}

/// A publish to a quiet channel is written straight to each idle subscriber's socket
/// by the publisher. When the peer stops reading, such a write is cut off part-way:
/// the connection task must finish that frame before anything else, the pongs it
/// owes included, and later messages queue behind it. The peer then reads every
/// message once, in order, in whole frames.
#[tokio::test(flavor = "multi_thread")]
async fn direct_writes_stay_whole_and_in_order_when_the_peer_stalls() {
    const N: u64 = 60;
    let s = start(|c| {
        c.delivery.max_queue_bytes = std::num::NonZeroU64::new(64 << 20).unwrap();
        c.delivery.max_queue_messages = std::num::NonZeroU64::new(10_000).unwrap();
        c.limits.max_publish_bytes = std::num::NonZeroU64::new(1 << 20).unwrap();
    })
    .await;
    let mut sock = raw_ws(s.client, "/ws?client=stalled").await;
    sock.write_all(&masked_text(
        br#"{"type":"subscribe","ref":1,"channel":"bulk"}"#,
    ))
    .await
    .unwrap();
    let mut buf = raw_read_until(&mut sock, b"\"subscribed\"", Duration::from_secs(5)).await;
    let pad = "x".repeat(100_000);
    for n in 0..N {
        publish(&s, "bulk", json!({"n": n, "pad": pad})).await;
        if n % 7 == 3 {
            sock.write_all(&masked_ping(b"p")).await.unwrap();
        }
        // A quiet gap: each publish is offered to the socket directly.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    read_messages(&mut sock, &mut buf, N as usize, Duration::from_secs(30)).await;
    let (frames, cut) = server_frames(&buf);
    assert!(!cut);
    let (mut seen, mut pongs) = (Vec::new(), 0);
    for (op, payload) in frames {
        match op {
            0x81 => {
                let v: Value = serde_json::from_slice(payload).expect("whole JSON frames");
                if v["type"] == "message" {
                    assert_eq!(v["data"]["pad"].as_str().map(str::len), Some(pad.len()));
                    seen.push(v["data"]["n"].as_u64().unwrap());
                }
            }
            0x8a => pongs += 1,
            other => panic!("unexpected frame {other:#x}"),
        }
    }
    assert_eq!(seen, (0..N).collect::<Vec<_>>(), "once each, in order");
    // Pongs answer pings read while the peer was not reading; some may still be owed.
    assert!(pongs <= (N / 7 + 1), "{pongs} pongs");
    let conn_bytes: u64 = s.get("/api/connections").await.1["connections"][0]["bytes_out"]
        .as_u64()
        .unwrap_or(0);
    assert!(conn_bytes >= N * pad.len() as u64, "bytes_out {conn_bytes}");
    drop(sock);
    s.assert_clean().await;
    s.stop().await;
}

/// `n` raw WebSocket peers (clients `{prefix}{i}`), each subscribed to `many`, with
/// what each has read so far (up to its `subscribed` reply).
async fn raw_subscribers(
    addr: std::net::SocketAddr,
    prefix: &str,
    n: usize,
) -> Vec<(tokio::net::TcpStream, Vec<u8>)> {
    use futures_util::stream::{self, StreamExt as _};
    stream::iter(0..n)
        .map(|i| async move {
            let mut sock = raw_ws(addr, &format!("/ws?client={prefix}{i}")).await;
            sock.write_all(&masked_text(
                br#"{"type":"subscribe","ref":1,"channel":"many"}"#,
            ))
            .await
            .unwrap();
            let buf = raw_read_until(&mut sock, b"\"subscribed\"", Duration::from_secs(10)).await;
            assert!(
                buf.windows(12).any(|w| w == b"\"subscribed\""),
                "subscriber {prefix}{i}: {}",
                String::from_utf8_lossy(&buf)
            );
            (sock, buf)
        })
        .buffer_unordered(64)
        .collect()
        .await
}

/// A publish to a quiet channel with more subscribers than one thread writes to
/// (2 × 1,024 on two cores) is written by the publisher and helper threads together,
/// after the channel's state lock is let go: every subscriber still gets every
/// message once, in order, in whole frames, and the publish reports them all. A
/// connection that unsubscribes while such a publish is writing gets nothing from
/// the channel after its `unsubscribed` reply.
#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_publish_to_thousands_reaches_each_once_in_order() {
    use futures_util::stream::{self, StreamExt as _};
    const SUBSCRIBERS: usize = 2_300;
    const MESSAGES: u64 = 3;
    // Two sockets per subscriber in this one process.
    let _ = rlimit::increase_nofile_limit(4 * SUBSCRIBERS as u64 + 1024);
    let s = start(|_| {}).await;
    let addr = s.client;
    let peers = raw_subscribers(addr, "many", SUBSCRIBERS).await;
    for n in 0..MESSAGES {
        // More than the hub's quiet gap (100 ms): each publish writes directly.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let body = publish(&s, "many", json!({"n": n})).await;
        assert_eq!(body["subscribers"], SUBSCRIBERS, "{body}");
    }
    stream::iter(peers)
        .for_each_concurrent(256, |(mut sock, mut buf)| async move {
            read_messages(
                &mut sock,
                &mut buf,
                MESSAGES as usize,
                Duration::from_secs(20),
            )
            .await;
            let seen: Vec<u64> = server_frames(&buf)
                .0
                .into_iter()
                .filter(|(op, p)| *op == 0x81 && is_message(p))
                .map(|(_, p)| {
                    let v: Value = serde_json::from_slice(p).expect("whole JSON frames");
                    v["data"]["n"].as_u64().unwrap()
                })
                .collect();
            assert_eq!(
                seen,
                (0..MESSAGES).collect::<Vec<_>>(),
                "once each, in order"
            );
        })
        .await;

    // Unsubscribing while a direct fan-out is being written: the message comes before
    // the reply or not at all. (The raw peers above are gone; these 2,300 are not read.)
    let quiet = raw_subscribers(addr, "quiet", SUBSCRIBERS).await;
    let (mut ws, _) = s.ws("?client=leaver").await;
    for round in 0..8 {
        assert_eq!(subscribe(&mut ws, "many", None).await["type"], "subscribed");
        tokio::time::sleep(Duration::from_millis(150)).await;
        let publishing = publish(&s, "many", json!({"round": round}));
        let leaving = async {
            // Into the fan-out's writes (~20-60 ms for 2,300 here).
            tokio::time::sleep(Duration::from_millis(5)).await;
            let frame = json!({"type": "unsubscribe", "ref": 2, "channel": "many"});
            ws.send(Message::text(frame.to_string())).await.unwrap();
            let mut before = 0;
            loop {
                let v = next_json(&mut ws).await;
                match v["type"].as_str() {
                    Some("message") => before += 1,
                    Some("unsubscribed") => break before,
                    _ => panic!("unexpected {v}"),
                }
            }
        };
        let (_, before) = tokio::join!(publishing, leaving);
        assert!(before <= 1, "round {round}: {before} messages");
        let after = tokio::time::timeout(Duration::from_millis(300), next_json(&mut ws)).await;
        assert!(
            after.is_err(),
            "round {round}: after unsubscribed: {after:?}"
        );
    }
    drop(quiet);
    client_close(ws).await;
    s.assert_clean().await;
    s.stop().await;
}
