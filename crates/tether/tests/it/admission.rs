//! Every refusal in each of its forms, client addresses, slowloris, idle floods.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::time::Duration;

use serde_json::Value;
use support::*;
use tether_core::{ClientLimitPolicy, Phase};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The HTTP form of a refused WebSocket handshake: (status, Retry-After, body).
async fn ws_refused(
    s: &TestServer,
    query: &str,
    headers: &[(&'static str, &str)],
) -> (u16, Option<String>, Value) {
    match s.ws_with(query, headers).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let retry = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned());
            let body = serde_json::from_slice(resp.body().as_deref().unwrap_or(b"null")).unwrap();
            (resp.status().as_u16(), retry, body)
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}

/// The `?refusal=close` form: (closing, close code).
async fn ws_refused_close(s: &TestServer, query: &str) -> (Value, u16) {
    let mut ws = s
        .ws_with(&format!("{query}&refusal=close"), &[])
        .await
        .expect("upgraded");
    let (closing, code) = expect_close(&mut ws).await;
    (closing.expect("closing announced"), code)
}

/// The SSE form: (status, body text).
async fn sse_refused(s: &TestServer, query: &str) -> (u16, String) {
    let r = s
        .http
        .get(format!("http://{}/sse{query}", s.client))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = tokio::time::timeout(Duration::from_secs(5), r.text())
        .await
        .expect("the refusal stream ends")
        .unwrap();
    (status, text)
}

fn assert_sse_transient(text: &str, error: &str, code: u16) {
    assert!(text.starts_with("retry: "), "{text}");
    let data = text
        .split("event: closing\ndata: ")
        .nth(1)
        .expect("event: closing")
        .lines()
        .next()
        .unwrap();
    let v: Value = serde_json::from_str(data).unwrap();
    assert_eq!(v["error"], error);
    assert_eq!(v["code"], code);
    assert_eq!(v["reconnect"], true);
    assert!(v["retry_ms"].as_u64().is_some(), "{v}");
    assert!(v["message"].as_str().is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn draining_refuses_in_every_form() {
    let s = start(|_| {}).await;
    assert_eq!(
        s.http
            .get(format!("http://{}/readyz", s.client))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    s.app.drain.advance(Phase::Draining);
    assert_eq!(
        s.http
            .get(format!("http://{}/readyz", s.client))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(
        s.http
            .get(s.api_url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    assert_eq!(
        s.http
            .get(s.api_url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let (status, retry, body) = ws_refused(&s, "?client=a", &[]).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("draining")));
    assert!(retry.unwrap().parse::<u64>().unwrap() >= 1);
    let (closing, code) = ws_refused_close(&s, "?client=a").await;
    assert_eq!(
        (
            code,
            closing["error"].as_str(),
            closing["reconnect"].as_bool()
        ),
        (4503, Some("draining"), Some(true))
    );
    let (status, text) = sse_refused(&s, "?client=a").await;
    assert_eq!(status, 200);
    assert_sse_transient(&text, "draining", 4503);
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn handshake_rate_per_ip() {
    let s = start(|c| c.limits.handshakes_per_ip_per_sec = 2).await;
    let (a, _) = s.ws("?client=a").await;
    let (b, _) = s.ws("?client=b").await;
    let (status, retry, body) = ws_refused(&s, "?client=c", &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (429, Some("rate_limited"))
    );
    assert!(retry.is_some());
    let (closing, code) = ws_refused_close(&s, "?client=c").await;
    assert_eq!(
        (code, closing["error"].as_str()),
        (4429, Some("rate_limited"))
    );
    let (status, text) = sse_refused(&s, "?client=c").await;
    assert_eq!(status, 200);
    assert_sse_transient(&text, "rate_limited", 4429);
    client_close(a).await;
    client_close(b).await;
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connections_per_ip() {
    let s = start(|c| c.limits.max_connections_per_ip = 1).await;
    let (a, _) = s.ws("?client=a").await;
    let (status, _, body) = ws_refused(&s, "?client=b", &[]).await;
    assert_eq!((status, body["error"].as_str()), (429, Some("ip_limit")));
    let (closing, code) = ws_refused_close(&s, "?client=b").await;
    assert_eq!((code, closing["error"].as_str()), (4429, Some("ip_limit")));
    let (status, text) = sse_refused(&s, "?client=b").await;
    assert_eq!(status, 200);
    assert_sse_transient(&text, "ip_limit", 4429);
    client_close(a).await;
    // Once the server has let the connection go (its close answered, then its
    // guard dropped), the slot is back: a new connection is admitted.
    for _ in 0..200 {
        let st = s.stats().await;
        if st["connections"]["ws"] == 0 && st["pending_handshakes"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (b, _) = s.ws("?client=b").await;
    client_close(b).await;
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn server_full_except_for_replacements() {
    let s = start(|c| {
        c.limits.max_connections = 2;
        c.clients.max_connections_per_client = 1.try_into().unwrap();
        c.clients.on_client_limit = ClientLimitPolicy::ReplaceOldest;
    })
    .await;
    let (mut a, _) = s.ws("?client=a").await;
    let (b, _) = s.ws("?client=b").await;
    assert_eq!(
        s.http
            .get(s.api_url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );
    let (status, retry, body) = ws_refused(&s, "?client=c", &[]).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("server_full")));
    assert!(retry.is_some());
    let (closing, code) = ws_refused_close(&s, "?client=c").await;
    assert_eq!(
        (code, closing["error"].as_str()),
        (4503, Some("server_full"))
    );
    let (status, text) = sse_refused(&s, "?client=c").await;
    assert_eq!(status, 200);
    assert_sse_transient(&text, "server_full", 4503);
    // A replacement is not counted against the ceiling.
    let (a2, _) = s.ws("?client=a").await;
    assert_eq!(expect_close(&mut a).await.1, 4001);
    client_close(a2).await;
    client_close(b).await;
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_permanent_refusal_keeps_its_status() {
    let s = start(|c| c.clients.max_connections_per_client = 1.try_into().unwrap()).await;
    let first = s
        .http
        .get(format!("http://{}/sse?client=z", s.client))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let (status, text) = sse_refused(&s, "?client=z").await;
    assert_eq!(status, 409);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["error"], "client_limit");
    drop(first);
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn refusal_order_draining_before_ip_limit() {
    let s = start(|c| c.limits.max_connections_per_ip = 1).await;
    let (a, _) = s.ws("?client=a").await;
    s.app.drain.advance(Phase::Draining);
    let (status, _, body) = ws_refused(&s, "?client=b", &[]).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("draining")));
    client_close(a).await;
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_client_ids_and_non_upgrades_are_400s() {
    let s = start(|_| {}).await;
    let long = "x".repeat(201);
    for q in ["?client=", "?client=a%20b", &format!("?client={long}")] {
        let (status, _, body) = ws_refused(&s, q, &[]).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("bad_request")),
            "{q}"
        );
    }
    let r = s
        .http
        .get(format!("http://{}/ws", s.client))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 426);
    let r = s
        .http
        .get(format!("http://{}/nope", s.client))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let (status, _, _) = ws_refused(&s, "?refusal=maybe", &[]).await;
    assert_eq!(status, 400);
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_clients_get_generated_ids() {
    let s = start(|_| {}).await;
    let (ws, welcome) = s.ws("").await;
    assert!(welcome["client_id"].as_str().unwrap().starts_with("anon-"));
    client_close(ws).await;
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_proxies_set_the_client_address() {
    let s = start(|c| {
        c.server.trusted_proxies = vec!["127.0.0.0/8".parse().unwrap()];
        c.limits.max_connections_per_ip = 1;
    })
    .await;
    let a = s
        .ws_with(
            "?client=a",
            &[("x-forwarded-for", "198.51.100.1, 203.0.113.5")],
        )
        .await
        .unwrap();
    let b = s
        .ws_with("?client=b", &[("x-forwarded-for", "203.0.113.6")])
        .await
        .unwrap();
    let (status, _, body) =
        ws_refused(&s, "?client=c", &[("x-forwarded-for", "203.0.113.5")]).await;
    assert_eq!((status, body["error"].as_str()), (429, Some("ip_limit")));
    let (_, c) = s.get("/api/clients/a").await;
    assert_eq!(c["connections"][0]["remote_addr"], "203.0.113.5");
    client_close(a).await;
    client_close(b).await;
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn untrusted_peers_cannot_forge_their_address() {
    let s = start(|c| c.limits.max_connections_per_ip = 1).await;
    let a = s
        .ws_with(
            "?client=a",
            &[
                ("x-forwarded-for", "203.0.113.5"),
                ("forwarded", "for=203.0.113.7"),
            ],
        )
        .await
        .unwrap();
    let (_, c) = s.get("/api/clients/a").await;
    assert_eq!(c["connections"][0]["remote_addr"], "127.0.0.1");
    let (status, _, _) = ws_refused(&s, "?client=b", &[("x-forwarded-for", "203.0.113.9")]).await;
    assert_eq!(status, 429);
    client_close(a).await;
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slowloris_is_dropped_at_the_handshake_timeout() {
    let s = start(|c| c.limits.handshake_timeout_ms = 300.try_into().unwrap()).await;
    let mut slow = TcpStream::connect(s.client).await.unwrap();
    slow.write_all(b"GET /ws?client=slow HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert_eq!(s.stats().await["pending_handshakes"], 1);
    let started = std::time::Instant::now();
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf))
        .await
        .expect("dropped");
    assert!(matches!(n, Ok(_) | Err(_)));
    assert!(started.elapsed() < Duration::from_secs(3));
    // A silent socket is dropped too.
    let mut silent = TcpStream::connect(s.client).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("dropped");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connect_flood_is_cut_at_max_pending_handshakes() {
    let s = start(|c| {
        c.limits.max_pending_handshakes = 5.try_into().unwrap();
        c.limits.handshake_timeout_ms = 1500.try_into().unwrap();
    })
    .await;
    let mut socks = Vec::new();
    let mut closed_at_once = 0;
    for _ in 0..20 {
        // The reset of a shed socket may already reach connect().
        match TcpStream::connect(s.client).await {
            Ok(sock) => socks.push(sock),
            Err(_) => closed_at_once += 1,
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.stats().await["pending_handshakes"], 5);
    // The other 15 were closed at once: a read ends immediately.
    for sock in socks.iter_mut() {
        let mut b = [0u8; 16];
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(100), sock.read(&mut b)).await {
            assert!(matches!(r, Ok(0) | Err(_)));
            closed_at_once += 1;
        }
    }
    assert_eq!(closed_at_once, 15);
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
        metrics.contains("tether_admission_refused_total{reason=\"pending_handshakes\"} 15"),
        "{metrics}"
    );
    // A real client still gets in once the flood times out.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (ws, _) = s.ws("?client=ok").await;
    client_close(ws).await;
    drop(socks);
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_and_healthz_on_both_listeners() {
    let s = start(|_| {}).await;
    for base in [s.client, s.api] {
        for p in ["/healthz", "/readyz"] {
            let r = s
                .http
                .get(format!("http://{base}{p}"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{base}{p}");
        }
    }
    s.assert_clean().await;
}
