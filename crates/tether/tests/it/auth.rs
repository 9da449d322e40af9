//! `[auth] mode = "jwt"` over real sockets: token sources, first-frame connect,
//! channel permissions, expiry and refresh.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{json, Value};
use support::*;
use tether_server::config::AuthMode;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "test-secret-test-secret-test-secret";

fn token(sub: &str, ttl: u64, channels: &[&str]) -> String {
    let channels: Vec<String> = channels.iter().map(|c| c.to_string()).collect();
    tether_server::auth::mint_hs256(SECRET, sub, &channels, ttl).unwrap()
}

fn token_with(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn jwt_server(f: impl FnOnce(&mut tether_server::Config)) -> TestServer {
    start(|c| {
        c.auth.mode = AuthMode::Jwt;
        c.auth.hs256_secret = SECRET.into();
        c.auth.leeway_ms = 0;
        c.limits.handshake_timeout_ms = 800.try_into().unwrap();
        f(c);
    })
    .await
}

async fn subscribe(ws: &mut Ws, channel: &str) -> Value {
    ws.send(Message::text(
        json!({"type": "subscribe", "channel": channel}).to_string(),
    ))
    .await
    .unwrap();
    next_json(ws).await
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_and_query_tokens_name_the_client_and_gate_channels() {
    let s = jwt_server(|_| {}).await;
    let t = token("alice", 60, &["chat:*", "news"]);
    let mut ws = s
        .ws_with("", &[("authorization", &format!("Bearer {t}"))])
        .await
        .unwrap();
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["client_id"], "alice");
    assert_eq!(subscribe(&mut ws, "chat:room1").await["type"], "subscribed");
    assert_eq!(subscribe(&mut ws, "news").await["type"], "subscribed");
    let e = subscribe(&mut ws, "chat:room1:deep").await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("forbidden_channel"))
    );
    assert_eq!(
        subscribe(&mut ws, "admin").await["code"],
        "forbidden_channel"
    );
    let (mut ws2, w2) = s.ws(&format!("?token={t}")).await;
    assert_eq!(w2["client_id"], "alice");
    // `?client=` means nothing in jwt mode.
    let (mut ws3, w3) = s.ws(&format!("?token={t}&client=mallory")).await;
    assert_eq!(w3["client_id"], "alice");
    assert_alive(&mut ws2).await;
    assert_alive(&mut ws3).await;
    client_close(ws).await;
    client_close(ws2).await;
    client_close(ws3).await;
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_tokens_are_refused_in_each_form() {
    let s = jwt_server(|_| {}).await;
    let expired = token("bob", 1, &[]);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let wrong_key = {
        let channels: Vec<String> = Vec::new();
        tether_server::auth::mint_hs256("another-secret-another-secret-xxx", "bob", &channels, 60)
            .unwrap()
    };
    for bad in [
        expired.as_str(),
        wrong_key.as_str(),
        "not.a.token",
        "e30.e30.e30",
    ] {
        match s
            .ws_with("", &[("authorization", &format!("Bearer {bad}"))])
            .await
        {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status().as_u16(), 401, "{bad}");
                let v: Value = serde_json::from_slice(r.body().as_deref().unwrap()).unwrap();
                assert_eq!(v["error"], "unauthorized");
            }
            other => panic!("expected 401, got {:?}", other.map(|_| ())),
        }
        let mut ws = s
            .ws_with(&format!("?token={bad}&refusal=close"), &[])
            .await
            .unwrap();
        let (closing, code) = expect_close(&mut ws).await;
        assert_eq!(
            (code, closing.unwrap()["error"].as_str()),
            (4401, Some("unauthorized"))
        );
    }
    let r = s
        .http
        .get(format!("http://{}/sse?channel=x", s.client))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn first_frame_connect_admits_after_the_upgrade() {
    let s = jwt_server(|_| {}).await;
    let mut rx = s.app.registry.events().subscribe();
    let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_url(""))
        .await
        .unwrap();
    // Upgraded but not admitted: nothing is registered yet.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.stats().await["connections"]["ws"], 0);
    let t = token("carol", 60, &["**"]);
    ws.send(Message::text(
        json!({"type": "connect", "token": t}).to_string(),
    ))
    .await
    .unwrap();
    let welcome = next_json(&mut ws).await;
    assert_eq!(
        (welcome["type"].as_str(), welcome["client_id"].as_str()),
        (Some("welcome"), Some("carol"))
    );
    assert_eq!(
        subscribe(&mut ws, "any/thing:at/all").await["type"],
        "subscribed"
    );
    // A second connect frame is an error, not a re-authentication.
    ws.send(Message::text(
        json!({"type": "connect", "token": t}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await["code"], "unexpected_connect");
    client_close(ws).await;
    let ev = collect_events(&mut rx, Duration::from_millis(200)).await;
    assert_eq!(
        ev.iter()
            .filter(|e| e.kind == tether_protocol::EventType::ClientOnline)
            .count(),
        1
    );
    // A bad first frame, and silence past the handshake timeout: 4401, nothing left.
    for first in [
        Some(json!({"type": "connect", "token": "junk"}).to_string()),
        Some("{}".to_owned()),
        None,
    ] {
        let (mut ws, _) = tokio_tungstenite::connect_async(s.ws_url(""))
            .await
            .unwrap();
        if let Some(f) = first {
            ws.send(Message::text(f)).await.unwrap();
        }
        let (closing, code) = expect_close(&mut ws).await;
        assert_eq!(code, 4401);
        assert_eq!(closing.unwrap()["error"], "unauthorized");
    }
    s.assert_clean().await;
}

/// One handshake deadline, counted from the socket's accept: the request, the
/// upgrade and the first-frame token share `limits.handshake_timeout_ms` (1000 ms
/// here). Headers finished at ~700 ms and a valid token at ~1300 ms is too late;
/// the upgrade used to start a fresh timer (the token was then in time until
/// ~1700 ms and the client was welcomed).
#[tokio::test(flavor = "multi_thread")]
async fn the_handshake_deadline_counts_from_the_accept_not_from_the_upgrade() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = jwt_server(|c| c.limits.handshake_timeout_ms = 1000.try_into().unwrap()).await;
    let mut raw = tokio::net::TcpStream::connect(s.client).await.unwrap();
    raw.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    raw.write_all(
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let head = raw_read_until(&mut raw, b"\r\n\r\n", Duration::from_secs(2)).await;
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    let t = token("late", 60, &["**"]);
    let connect = json!({"type": "connect", "token": t}).to_string();
    // The server may have closed already: a failed write is the point, not an error.
    let _ = raw.write_all(&masked_text_long(connect.as_bytes())).await;
    let mut rest = head[head.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..].to_vec();
    let _ = tokio::time::timeout(Duration::from_secs(3), raw.read_to_end(&mut rest)).await;
    assert!(has_close(&rest, 4401), "{}", String::from_utf8_lossy(&rest));
    assert!(!String::from_utf8_lossy(&rest).contains("welcome"));
    s.assert_clean().await;
}

/// A masked client text frame with a 16-bit length (126 to 65535 bytes).
fn masked_text_long(payload: &[u8]) -> Vec<u8> {
    let mask = [0x5au8, 0xa5, 0x3c, 0xc3];
    let mut f = vec![0x81u8, 0x80 | 126];
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_checks_channels_against_the_token() {
    let s = jwt_server(|_| {}).await;
    let t = token("dora", 60, &["feed:*"]);
    let ok = s
        .http
        .get(format!("http://{}/sse?channel=feed:a&token={t}", s.client))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let r = s
        .http
        .get(format!(
            "http://{}/sse?channel=feed:a&channel=secret",
            s.client
        ))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "forbidden_channel");
    drop(ok);
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn expiry_closes_with_4003_unless_refreshed() {
    let s = jwt_server(|_| {}).await;
    let t = token("erin", 2, &[]);
    let (mut ws, _) = s.ws(&format!("?token={t}")).await;
    let (closing, code) = expect_close(&mut ws).await;
    assert_eq!(code, 4003);
    assert_eq!(closing.unwrap()["reconnect"], true);

    let (mut ws, _) = s.ws(&format!("?token={}", token("erin", 2, &[]))).await;
    ws.send(Message::text(
        json!({"type": "refresh", "ref": 1, "token": token("erin", 60, &[])}).to_string(),
    ))
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_alive(&mut ws).await;
    // A refresh for someone else ends the session.
    ws.send(Message::text(
        json!({"type": "refresh", "token": token("mallory", 60, &[])}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(expect_close(&mut ws).await.1, 4004);
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn token_meta_is_kept_on_the_connection_and_the_token_is_not_shown() {
    let s = jwt_server(|_| {}).await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 60;
    let t = token_with(json!({"sub": "fred", "exp": exp, "meta": {"plan": "pro"}}));
    let (ws, _) = s.ws(&format!("?token={t}")).await;
    let (_, c) = s.get("/api/clients/fred").await;
    assert_eq!(c["connections"][0]["meta"], json!({"plan": "pro"}));
    assert!(!c.to_string().contains(&t));
    let (_, body) = s
        .post(
            "/api/disconnect",
            json!({"where": {"meta": {"plan": "pro"}}}),
        )
        .await;
    assert_eq!(body["closed"], 1);
    drop(ws);
    s.assert_clean().await;
}

/// `exp` values at the edge of `u64`: a far-future token is admitted and lives, and
/// a `refresh` with one keeps the connection open (it once overflowed an `Instant`).
#[tokio::test(flavor = "multi_thread")]
async fn far_future_exp_is_admitted_and_refreshes_without_killing_the_connection() {
    let s = jwt_server(|c| c.auth.leeway_ms = 5000).await;
    let far = |exp: u64| token_with(json!({"sub": "gus", "exp": exp, "channels": ["**"]}));
    for exp in [u64::MAX, i64::MAX as u64, 1u64 << 63] {
        let (mut ws, welcome) = s.ws(&format!("?token={}", far(exp))).await;
        assert_eq!(welcome["client_id"], "gus", "exp {exp}");
        assert_alive(&mut ws).await;
        client_close(ws).await;
    }
    let (mut ws, _) = s.ws(&format!("?token={}", token("gus", 60, &[]))).await;
    for exp in [u64::MAX, i64::MAX as u64, 1u64 << 63] {
        ws.send(Message::text(
            json!({"type": "refresh", "ref": 1, "token": far(exp)}).to_string(),
        ))
        .await
        .unwrap();
        assert_alive(&mut ws).await;
    }
    client_close(ws).await;
    s.assert_clean().await;
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The status a WebSocket handshake with `Authorization: Bearer <t>` gets (101 = admitted).
async fn handshake_status(s: &TestServer, t: &str) -> u16 {
    match s
        .ws_with("", &[("authorization", &format!("Bearer {t}"))])
        .await
    {
        Ok(ws) => {
            client_close(ws).await;
            101
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            let v: Value = serde_json::from_slice(r.body().as_deref().unwrap()).unwrap();
            assert_eq!(v["error"], "unauthorized");
            r.status().as_u16()
        }
        Err(e) => panic!("handshake failed: {e}"),
    }
}

/// `nbf` (RFC 7519 4.1.5): a token not valid yet is refused, with the same leeway as
/// `exp`.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_not_valid_yet_is_refused() {
    let s = jwt_server(|c| c.auth.leeway_ms = 5000).await;
    let with_nbf = |nbf: u64| {
        token_with(json!({"sub": "hal", "exp": now_secs() + 3600, "nbf": nbf, "channels": ["x"]}))
    };
    let tomorrow = with_nbf(now_secs() + 86_400);
    assert_eq!(handshake_status(&s, &tomorrow).await, 401);
    // Past the leeway (5 s) too.
    assert_eq!(handshake_status(&s, &with_nbf(now_secs() + 60)).await, 401);
    // Within the leeway, and in the past: admitted.
    assert_eq!(handshake_status(&s, &with_nbf(now_secs() + 2)).await, 101);
    assert_eq!(handshake_status(&s, &with_nbf(now_secs() - 60)).await, 101);
    // The other token sources and a refresh check it too.
    let r = s
        .http
        .get(format!(
            "http://{}/sse?channel=x&token={tomorrow}",
            s.client
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (mut ws, _) = s.ws(&format!("?token={}", with_nbf(now_secs()))).await;
    ws.send(Message::text(
        json!({"type": "refresh", "ref": 7, "token": tomorrow}).to_string(),
    ))
    .await
    .unwrap();
    let e = next_json(&mut ws).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("unauthorized")),
        "{e}"
    );
    client_close(ws).await;
    s.assert_clean().await;
}

/// The `Authorization` scheme is case-insensitive (RFC 7235 2.1).
#[tokio::test(flavor = "multi_thread")]
async fn the_bearer_scheme_is_case_insensitive() {
    let s = jwt_server(|_| {}).await;
    let t = token("ivy", 60, &["x"]);
    for scheme in ["bearer", "BEARER", "BeArEr"] {
        let mut ws = s
            .ws_with("", &[("authorization", &format!("{scheme} {t}"))])
            .await
            .unwrap_or_else(|e| panic!("{scheme}: {e}"));
        let welcome = next_json(&mut ws).await;
        assert_eq!(welcome["client_id"], "ivy", "{scheme}");
        client_close(ws).await;
        let mut r = s
            .http
            .get(format!("http://{}/sse?channel=x", s.client))
            .header("authorization", format!("{scheme}  {t}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
        let text = read_sse_until(&mut r, |t| t.contains("welcome")).await;
        assert!(text.contains("\"client_id\":\"ivy\""), "{text}");
        drop(r);
    }
    // Another scheme is no token.
    let r = s
        .http
        .get(format!("http://{}/sse?channel=x", s.client))
        .header("authorization", format!("Basic {t}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    s.assert_clean().await;
}
