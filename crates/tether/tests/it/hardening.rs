//! The server API against hostile or unusual input: the `Authorization` scheme in any
//! case, 400s that name the offending field, and history that serves what publish
//! accepted, however deeply nested.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use support::*;
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "api-key-api-key-api-key-api-key";

/// The API key's scheme is case-insensitive (RFC 7235 2.1); the key itself is not.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_key_bearer_scheme_is_case_insensitive() {
    let s = start(|c| c.api.key = KEY.into()).await;
    let status = |auth: String| {
        let req = s
            .http
            .get(s.api_url("/api/stats"))
            .header("authorization", auth);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        assert_eq!(status(format!("{scheme} {KEY}")).await, 200, "{scheme}");
    }
    assert_eq!(status(format!("Bearer {}", KEY.to_uppercase())).await, 401);
    assert_eq!(status(format!("Basic {KEY}")).await, 401);
    assert_eq!(status(format!("Bearer{KEY}")).await, 401);
    assert_eq!(status(KEY.to_owned()).await, 401);
    s.assert_clean().await;
}

#[derive(Deserialize)]
struct HistoryPage {
    messages: Vec<HistoryMessage>,
}

/// `data` kept raw: the test's own parser must not hit serde_json's depth limit.
#[derive(Deserialize)]
struct HistoryMessage {
    data: Box<RawValue>,
}

/// Data nested 200 levels deep (past serde_json's default limit of 128), with the
/// publisher's own spacing: history serves it byte for byte, as it was delivered.
#[tokio::test(flavor = "multi_thread")]
async fn history_serves_deeply_nested_data_byte_identical() {
    let s = start(|_| {}).await;
    let (mut ws, _) = s.ws("?client=deep").await;
    ws.send(Message::text(
        json!({"type": "subscribe", "ref": 1, "channel": "deep"}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "subscribed");
    // 100 objects each holding an array: 200 levels.
    let data = format!("{}1{}", "{\"a\": [".repeat(100), " ]}".repeat(100));
    let body = format!(r#"{{"channel": "deep", "data": {data}}}"#);
    let r = s
        .http
        .post(s.api_url("/api/publish"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let delivered = tokio::time::timeout(std::time::Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let delivered = delivered.into_text().unwrap();
    assert!(delivered.as_str().contains(&data), "delivered whole");

    let r = s
        .http
        .get(s.api_url("/api/channels/deep/history"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let page: HistoryPage = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(page.messages.len(), 1);
    assert_eq!(
        page.messages[0].data.get(),
        data,
        "history keeps the data whole"
    );
    client_close(ws).await;
    s.assert_clean().await;
}
