//! Registry and connection lifecycle, end to end over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::json;
use support::*;
use tether_core::ClientLimitPolicy;
use tether_protocol::EventType;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread")]
async fn three_tabs_then_exactly_one_offline_after_the_last_close() {
    let s = start(|_| {}).await;
    let mut rx = s.app.registry.events().subscribe();
    let (a, wa) = s.ws("?client=alice").await;
    let (b, _) = s.ws("?client=alice").await;
    let (c, _) = s.ws("?client=alice").await;
    assert_eq!(wa["client_id"], "alice");
    let (_, client) = s.get("/api/clients/alice").await;
    assert_eq!(client["state"], "online");
    assert_eq!(client["connections"].as_array().unwrap().len(), 3);
    client_close(a).await;
    client_close(b).await;
    let ev = collect_events(&mut rx, Duration::from_millis(300)).await;
    assert!(
        !kinds(&ev).contains(&"client.offline".to_string()),
        "{:?}",
        kinds(&ev)
    );
    client_close(c).await;
    let ev2 = collect_events(&mut rx, Duration::from_millis(300)).await;
    let all: Vec<_> = ev.into_iter().chain(ev2).collect();
    assert_eq!(
        kinds(&all),
        [
            "client.online",
            "connection.opened",
            "connection.opened",
            "connection.opened",
            "connection.closed",
            "connection.closed",
            "connection.closed",
            "client.offline"
        ]
    );
    assert!(all
        .iter()
        .filter(|e| e.kind == EventType::ConnectionClosed)
        .all(|e| e.code == Some(1000) || e.code == Some(1005)));
    assert_eq!(s.get("/api/clients/alice").await.0, 404);
    s.assert_clean().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reject_policy_refuses_over_the_limit_in_both_forms() {
    let s = start(|c| c.clients.max_connections_per_client = 2.try_into().unwrap()).await;
    let (a, _) = s.ws("?client=bob").await;
    let (b, _) = s.ws("?client=bob").await;
    match s.ws_with("?client=bob", &[]).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 409);
            let body: serde_json::Value =
                serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
            assert_eq!(body["error"], "client_limit");
            assert!(body["message"].as_str().unwrap().len() > 5);
        }
        other => panic!("expected 409, got {:?}", other.map(|_| ())),
    }
    let mut refused = s
        .ws_with("?client=bob&refusal=close", &[])
        .await
        .expect("upgraded");
    let (closing, code) = expect_close(&mut refused).await;
    assert_eq!(code, 4409);
    let closing = closing.expect("closing frame");
    assert_eq!(closing["error"], "client_limit");
    assert_eq!(closing["code"], 4409);
    assert_eq!(closing["reconnect"], false);
    client_close(a).await;
    client_close(b).await;
    s.assert_clean().await;
    let metrics = s
        .http
        .get(s.api_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tether_admission_refused_total{reason=\"client_limit\"} 2"),
        "{metrics}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replace_oldest_closes_the_old_one_with_4001_after_commit() {
    let s = start(|c| {
        c.clients.max_connections_per_client = 1.try_into().unwrap();
        c.clients.on_client_limit = ClientLimitPolicy::ReplaceOldest;
    })
    .await;
    let mut rx = s.app.registry.events().subscribe();
    let (mut old, w_old) = s.ws("?client=carol").await;
    let (mut new, w_new) = s.ws("?client=carol").await;
    let (closing, code) = expect_close(&mut old).await;
    assert_eq!(code, 4001);
    let closing = closing.unwrap();
    assert_eq!(closing["code"], 4001);
    assert_eq!(closing["reconnect"], false);
    assert_alive(&mut new).await;
    let ev = collect_events(&mut rx, Duration::from_millis(300)).await;
    let opened_new = ev.iter().position(|e| {
        e.kind == EventType::ConnectionOpened && e.conn_id.as_deref() == w_new["conn_id"].as_str()
    });
    let closed_old = ev.iter().position(|e| {
        e.kind == EventType::ConnectionClosed && e.conn_id.as_deref() == w_old["conn_id"].as_str()
    });
    assert!(
        opened_new.unwrap() < closed_old.unwrap(),
        "the new one is committed before the old one closes"
    );
    assert_eq!(
        ev.iter()
            .filter(|e| e.kind == EventType::ClientOnline)
            .count(),
        1
    );
    assert_eq!(
        ev.iter()
            .filter(|e| e.kind == EventType::ClientOffline)
            .count(),
        0
    );
    client_close(new).await;
    s.assert_clean().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_handshakes_never_over_admit() {
    let s = start(|c| c.clients.max_connections_per_client = 3.try_into().unwrap()).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let url = s.ws_url("?client=dave");
        tasks.push(tokio::spawn(async move {
            tokio_tungstenite::connect_async(url)
                .await
                .map(|(ws, _)| ws)
        }));
    }
    let mut ok = Vec::new();
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(ws) => ok.push(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status().as_u16() == 409 => {
                refused += 1
            }
            Err(e) => panic!("unexpected: {e}"),
        }
    }
    assert_eq!(ok.len(), 3);
    assert_eq!(refused, 47);
    assert_eq!(s.stats().await["connections"]["ws"], 3);
    for ws in ok {
        client_close(ws).await;
    }
    s.assert_clean().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_handshakes_under_replace_oldest_leave_three() {
    let s = start(|c| {
        c.clients.max_connections_per_client = 3.try_into().unwrap();
        c.clients.on_client_limit = ClientLimitPolicy::ReplaceOldest;
    })
    .await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let url = s.ws_url("?client=erin");
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            let _welcome = next_json(&mut ws).await;
            ws
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.unwrap());
    }
    // Everyone but three is told 4001.
    let mut replaced = 0;
    let mut alive = Vec::new();
    for mut ws in all {
        match tokio::time::timeout(Duration::from_millis(1500), expect_close(&mut ws)).await {
            Ok((_, 4001)) => replaced += 1,
            Ok((_, other)) => panic!("unexpected close {other}"),
            Err(_) => alive.push(ws),
        }
    }
    assert_eq!(replaced, 47);
    assert_eq!(alive.len(), 3);
    assert_eq!(s.stats().await["connections"]["ws"], 3);
    for mut ws in alive {
        assert_alive(&mut ws).await;
        client_close(ws).await;
    }
    s.assert_clean().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_peer_that_never_answers_pings_is_closed_with_4000() {
    let s = start(|c| {
        c.heartbeat.interval_ms = 200.try_into().unwrap();
        c.heartbeat.timeout_ms = 300.try_into().unwrap();
    })
    .await;
    let mut rx = s.app.registry.events().subscribe();
    let started = std::time::Instant::now();
    let mut raw = raw_ws(s.client, "/ws?client=frank").await;
    let got = raw_read_until(&mut raw, b"\"code\":4000", Duration::from_secs(5)).await;
    let waited = started.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.contains("\"type\":\"closing\",\"code\":4000"),
        "{text}"
    );
    // interval + timeout = 500 ms; allow scheduling slack, far below a second interval.
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_millis(1500),
        "{waited:?}"
    );
    // Then the close frame with 4000 (0x0fa0) follows.
    let rest = raw_read_until(&mut raw, &[0x0f, 0xa0], Duration::from_secs(5)).await;
    assert!(
        got.windows(2)
            .chain(rest.windows(2))
            .any(|w| w == [0x0f, 0xa0]),
        "close frame with 4000"
    );
    drop(raw);
    let ev = collect_events(&mut rx, Duration::from_millis(500)).await;
    let closed = ev
        .iter()
        .find(|e| e.kind == EventType::ConnectionClosed)
        .expect("closed");
    assert_eq!(closed.code, Some(4000));
    s.assert_clean().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_that_answers_pings_stays() {
    let s = start(|c| {
        c.heartbeat.interval_ms = 100.try_into().unwrap();
        c.heartbeat.timeout_ms = 150.try_into().unwrap();
    })
    .await;
    let (mut ws, _) = s.ws("?client=gina").await;
    // Reading answers pings (tungstenite pongs automatically).
    let _ = tokio::time::timeout(Duration::from_millis(800), async {
        use futures_util::StreamExt;
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert_alive(&mut ws).await;
    client_close(ws).await;
    s.assert_clean().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_grace_hides_a_quick_reconnect() {
    let s = start(|c| c.clients.offline_grace_ms = 600).await;
    let mut rx = s.app.registry.events().subscribe();
    let (a, _) = s.ws("?client=hank").await;
    client_close(a).await;
    let (_, c) = s.get("/api/clients/hank").await;
    assert_eq!(c["state"], "lingering");
    let (b, _) = s.ws("?client=hank").await;
    client_close(b).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let ev = collect_events(&mut rx, Duration::from_millis(100)).await;
    assert_eq!(
        kinds(&ev),
        [
            "client.online",
            "connection.opened",
            "connection.closed",
            "connection.opened",
            "connection.closed",
            "client.offline"
        ]
    );
    s.assert_clean().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kick_by_client_conn_and_where() {
    let s = start(|_| {}).await;
    let (mut a, _) = s.ws("?client=ivy").await;
    let (mut b, wb) = s.ws("?client=jon").await;
    let (mut c, _) = s.ws("?client=kim").await;
    let (st, body) = s
        .post(
            "/api/disconnect",
            json!({"client_id": "ivy", "reconnect": true, "reason": "bye"}),
        )
        .await;
    assert_eq!((st, body), (200, json!({"closed": 1})));
    let (closing, code) = expect_close(&mut a).await;
    assert_eq!(code, 4002);
    let closing = closing.unwrap();
    assert_eq!(closing["reconnect"], true);
    assert_eq!(closing["reason"], "bye");
    let (st, body) = s
        .post("/api/disconnect", json!({"conn_id": wb["conn_id"]}))
        .await;
    assert_eq!((st, body), (200, json!({"closed": 1})));
    let (closing, code) = expect_close(&mut b).await;
    assert_eq!(
        (code, closing.unwrap()["reconnect"].clone()),
        (4002, json!(false))
    );
    let (st, body) = s
        .post(
            "/api/disconnect",
            json!({"where": {"transport": "ws"}, "code": 4005}),
        )
        .await;
    assert_eq!((st, body), (200, json!({"closed": 1})));
    assert_eq!(expect_close(&mut c).await.1, 4005);
    // No selector, an empty where, a bad field, bad JSON: 400 naming the problem.
    for bad in [
        json!({}),
        json!({"where": {}}),
        json!({"client": "x"}),
        json!({"all": true, "code": 99}),
    ] {
        let (st, body) = s.post("/api/disconnect", bad.clone()).await;
        assert_eq!(st, 400, "{bad}");
        assert_eq!(body["error"], "bad_request");
    }
    let r = s
        .http
        .post(s.api_url("/api/disconnect"))
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    s.assert_clean().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sweeps_close_matching_connections_only() {
    let s = start(|c| {
        c.sweeps = vec![tether_server::config::Sweep {
            every_ms: 100.try_into().unwrap(),
            filter: tether_core::Filter {
                idle_ms_gt: Some(300),
                transport: Some(tether_core::Transport::Ws),
                ..Default::default()
            },
            code: 4002,
            reason: "idle".into(),
            reconnect: true,
        }];
    })
    .await;
    let (mut idle, _) = s.ws("?client=lee").await;
    let sse = s
        .http
        .get(format!("http://{}/sse?client=mia", s.client))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status().as_u16(), 200);
    let (closing, code) = expect_close(&mut idle).await;
    assert_eq!(code, 4002);
    let closing = closing.unwrap();
    assert_eq!(
        (closing["reason"].as_str(), closing["reconnect"].as_bool()),
        (Some("idle"), Some(true))
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        s.stats().await["connections"]["sse"],
        1,
        "the SSE stream is not swept"
    );
    drop(sse);
    s.assert_clean().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn active_connection_is_not_idle() {
    let s = start(|_| {}).await;
    let (mut ws, _) = s.ws("?client=ned").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    ws.send(Message::text(r#"{"type":"subscribe","channel":"x"}"#))
        .await
        .unwrap();
    let _ = next_json(&mut ws).await;
    let (_, page) = s.get("/api/connections?idle_ms_gt=250").await;
    assert_eq!(page["connections"].as_array().unwrap().len(), 0, "{page}");
    // A ping keeps a connection alive but does not make it active.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_alive(&mut ws).await;
    let (_, page) = s.get("/api/connections?idle_ms_gt=250").await;
    assert_eq!(page["connections"].as_array().unwrap().len(), 1, "{page}");
    client_close(ws).await;
    s.assert_clean().await;
    s.stop().await;
}
