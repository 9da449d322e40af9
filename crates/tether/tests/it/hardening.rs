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

/// SPEC section 8: "Bad JSON or a bad field → 400 naming the field", for every POST
/// body and every GET query parameter.
#[tokio::test(flavor = "multi_thread")]
async fn every_bad_field_is_a_400_naming_it() {
    let s = start(|_| {}).await;
    let posts = [
        ("/api/disconnect", json!({"client_id": 42}), "client_id"),
        ("/api/disconnect", json!({"conn_id": true}), "conn_id"),
        ("/api/disconnect", json!({"all": "yes"}), "all"),
        (
            "/api/disconnect",
            json!({"all": true, "code": "4000"}),
            "code",
        ),
        (
            "/api/disconnect",
            json!({"all": true, "code": 70000}),
            "code",
        ),
        (
            "/api/disconnect",
            json!({"all": true, "reason": 1}),
            "reason",
        ),
        (
            "/api/disconnect",
            json!({"all": true, "reconnect": 1}),
            "reconnect",
        ),
        (
            "/api/disconnect",
            json!({"where": {"idle_ms_gt": "1"}}),
            "where.idle_ms_gt",
        ),
        (
            "/api/disconnect",
            json!({"where": {"transport": "pigeon"}}),
            "where.transport",
        ),
        ("/api/disconnect", json!({"where": []}), "where"),
        ("/api/disconnect", json!({"client": "x"}), "client"),
        ("/api/publish", json!({"channel": 5, "data": 1}), "channel"),
        ("/api/publish", json!({"channel": "a"}), "data"),
        (
            "/api/publish",
            json!({"channel": "a", "data": 1, "idempotency_key": 7}),
            "idempotency_key",
        ),
        (
            "/api/publish",
            json!({"channel": "a", "data": 1, "extra": 1}),
            "extra",
        ),
        (
            "/api/send",
            json!({"client_id": [], "data": 1}),
            "client_id",
        ),
        ("/api/send", json!({"client_id": "a"}), "data"),
        (
            "/api/send",
            json!({"client_id": "a", "data": 1, "to": 1}),
            "to",
        ),
    ];
    for (path, body, field) in posts {
        let (status, v) = s.post(path, body.clone()).await;
        assert_eq!(status, 400, "{path} {body}: {v}");
        assert_eq!(v["error"], "bad_request", "{path} {body}: {v}");
        let message = v["message"].as_str().unwrap();
        assert!(
            message.contains(field),
            "{path} {body}: {message:?} does not name {field}"
        );
    }
    for path in ["/api/disconnect", "/api/publish", "/api/send"] {
        for bad in ["{", "[1,", "not json", "", "{\"channel\": \"a\",}"] {
            let r = s
                .http
                .post(s.api_url(path))
                .header("content-type", "application/json")
                .body(bad)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 400, "{path} {bad:?}");
            let v: serde_json::Value = r.json().await.unwrap();
            assert_eq!(v["error"], "bad_request", "{path} {bad:?}: {v}");
        }
    }
    let gets = [
        ("/api/connections?limit=ten", "limit"),
        ("/api/connections?limit=0", "limit"),
        ("/api/connections?idle_ms_gt=-1", "idle_ms_gt"),
        ("/api/connections?transport=pigeon", "transport"),
        ("/api/connections?page=zz", "page"),
        ("/api/connections?sort=asc", "sort"),
        ("/api/channels/a/history?limit=-1", "limit"),
        ("/api/channels/a/history?limit=5000", "limit"),
        ("/api/channels/a/history?since=yesterday", "since"),
        ("/api/channels/a/history?from=1", "from"),
    ];
    for (path, field) in gets {
        let (status, v) = s.get(path).await;
        assert_eq!(status, 400, "{path}: {v}");
        assert_eq!(v["error"], "bad_request", "{path}: {v}");
        let message = v["message"].as_str().unwrap();
        assert!(
            message.contains(field),
            "{path}: {message:?} does not name {field}"
        );
    }
    s.assert_clean().await;
}
