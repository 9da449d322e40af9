//! `GET /api/openapi.json`: the server API described in OpenAPI 3, naming every call
//! the API serves, and every call it names served on a live server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{json, Value};
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// Every call the API listener serves, as the document spells it, with the status a
/// live no-key server answers in [`every_documented_call_is_served`].
const CALLS: &[(&str, &str, u16)] = &[
    ("get", "/api/stats", 200),
    ("get", "/api/clients", 200),
    ("get", "/api/clients/{id}", 200),
    ("get", "/api/connections", 200),
    ("post", "/api/disconnect", 200),
    ("post", "/api/publish", 200),
    ("post", "/api/send", 200),
    ("get", "/api/channels", 200),
    ("get", "/api/channels/{name}/presence", 200),
    ("get", "/api/channels/{name}/history", 200),
    ("get", "/api/events", 200),
    ("get", "/api/webhooks", 200),
    ("get", "/api/openapi.json", 200),
    ("get", "/metrics", 200),
    ("get", "/healthz", 200),
    ("get", "/readyz", 200),
    ("get", "/admin", 200),
    // With no `[api] key` there is no session to buy: `no_key`.
    ("post", "/admin/session", 400),
];

const CLIENT: &str = "alice";
const CHANNEL: &str = "room:1";

async fn document(s: &TestServer) -> Value {
    let r = s
        .http
        .get(s.api_url("/api/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let text = r.text().await.unwrap();
    serde_json::from_str(&text).expect("the document is JSON")
}

/// `(method, path)` of every operation in the document.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut ops = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("path item").keys() {
            if ["get", "post", "put", "patch", "delete", "head", "options"]
                .contains(&method.as_str())
            {
                ops.insert((method.clone(), path.clone()));
            }
        }
    }
    ops
}

/// Follows a local `$ref`.
fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v["$ref"].as_str() {
        Some(r) => doc
            .pointer(r.strip_prefix('#').expect("a local $ref"))
            .unwrap_or_else(|| panic!("dangling $ref {r}")),
        None => v,
    }
}

/// The property names of the JSON schema of `method path`'s `status` answer, when
/// that schema is an object with properties (without those marked `x-cluster-only`:
/// a one-node server never answers them).
fn documented_fields(
    doc: &Value,
    method: &str,
    path: &str,
    status: u16,
) -> Option<BTreeSet<String>> {
    let resp = resolve(
        doc,
        &doc["paths"][path][method]["responses"][status.to_string()],
    );
    let schema = resolve(doc, &resp["content"]["application/json"]["schema"]);
    let props = schema["properties"].as_object()?;
    Some(
        props
            .iter()
            .filter(|(_, p)| p["x-cluster-only"] != true)
            .map(|(k, _)| k.clone())
            .collect(),
    )
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_document_is_openapi_3_and_names_every_call() {
    let s = start(|_| {}).await;
    let doc = document(&s).await;
    let version = doc["openapi"].as_str().expect("openapi is a string");
    assert!(version.starts_with("3."), "openapi {version}");
    assert!(doc["info"]["title"].is_string());
    let documented = operations(&doc);
    let served: BTreeSet<(String, String)> = CALLS
        .iter()
        .map(|(m, p, _)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    let missing: Vec<_> = served.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "calls missing from the document: {missing:?}"
    );
    let extra: Vec<_> = documented.difference(&served).collect();
    assert!(
        extra.is_empty(),
        "documented calls this test does not know: {extra:?}"
    );
    // Every operation documents its success and every error schema is the one shape.
    for (method, path) in &documented {
        let responses = doc["paths"][path][method]["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{method} {path} has responses"));
        assert!(
            responses.keys().any(|k| k.starts_with('2')),
            "{method} {path} documents no success"
        );
        for (status, r) in responses {
            if status.starts_with('4') {
                let schema = &resolve(&doc, r)["content"]["application/json"]["schema"];
                assert_eq!(
                    schema["$ref"], "#/components/schemas/Error",
                    "{method} {path} {status}"
                );
            }
        }
    }
    let error = &doc["components"]["schemas"]["Error"];
    assert_eq!(error["required"], json!(["error", "message"]));
    assert_eq!(
        doc["components"]["schemas"]["ChannelName"]["pattern"],
        "^[A-Za-z0-9_.:/-]{1,200}$"
    );
    assert_eq!(
        doc["components"]["securitySchemes"]["bearerAuth"]["scheme"],
        "bearer"
    );
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_documented_call_is_served() {
    let s = start(|_| {}).await;
    let doc = document(&s).await;
    // A client on a channel, and a message in its history, so `{id}` and `{name}`
    // name something real.
    let (mut ws, _) = s.ws(&format!("?client={CLIENT}")).await;
    let sub = json!({"type": "subscribe", "ref": 1, "channel": CHANNEL});
    ws.send(Message::text(sub.to_string())).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "subscribed");
    let (st, body) = s
        .post(
            "/api/publish",
            json!({"channel": CHANNEL, "data": {"n": 1}}),
        )
        .await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(next_json(&mut ws).await["type"], "message");

    for (method, path) in operations(&doc) {
        let expected = CALLS
            .iter()
            .find(|(m, p, _)| *m == method && *p == path)
            .map(|(_, _, st)| *st)
            .unwrap_or_else(|| panic!("{method} {path}: not a call the API serves"));
        let url = s.api_url(
            &path
                .replace("{id}", CLIENT)
                .replace("{name}", &CHANNEL.replace(':', "%3A")),
        );
        let req = match method.as_str() {
            "get" => s.http.get(&url),
            "post" => s.http.post(&url).json(&match path.as_str() {
                "/api/publish" => json!({"channel": CHANNEL, "data": [1, "two", null]}),
                "/api/send" => json!({"client_id": CLIENT, "data": {"direct": true}}),
                "/api/disconnect" => json!({"conn_id": "no-such-conn"}),
                "/admin/session" => json!({"key": "anything"}),
                other => panic!("no body for POST {other}"),
            }),
            other => panic!("unexpected method {other}"),
        };
        let resp = tokio::time::timeout(Duration::from_secs(5), req.send())
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no answer within 5 s"))
            .unwrap();
        let status = resp.status().as_u16();
        assert_ne!(status, 404, "{method} {path} ({url}) is not served");
        assert_eq!(status, expected, "{method} {path} ({url})");
        let content_type = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let documented_types: Vec<String> = resolve(
            &doc,
            &doc["paths"][&path][&method]["responses"][status.to_string()],
        )["content"]
            .as_object()
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default();
        assert!(
            documented_types
                .iter()
                .any(|t| content_type.split(';').next() == Some(t.as_str())),
            "{method} {path}: content-type {content_type:?} is not one of {documented_types:?}"
        );
        if path == "/api/events" {
            // An endless stream: its head is the answer.
            drop(resp);
            continue;
        }
        let text = tokio::time::timeout(Duration::from_secs(5), resp.text())
            .await
            .unwrap_or_else(|_| panic!("{method} {path}: no body within 5 s"))
            .unwrap();
        if let Some(fields) = documented_fields(&doc, &method, &path, status) {
            let body: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
            assert_eq!(keys(&body), fields, "{method} {path}: {body}");
        }
    }

    // The nested objects carry every documented field too.
    let schemas = &doc["components"]["schemas"];
    let prop_keys = |name: &str| keys(&schemas[name]["properties"]);
    let (st, client) = s.get(&format!("/api/clients/{CLIENT}")).await;
    assert_eq!(st, 200, "{client}");
    let conns = client["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 1, "{client}");
    assert_eq!(keys(&conns[0]), prop_keys("Connection"), "{client}");
    let (_, clients) = s.get("/api/clients").await;
    assert_eq!(
        clients["clients"],
        json!([{"client_id": CLIENT, "state": "online", "connections": 1}])
    );
    assert_eq!(keys(&clients["clients"][0]), prop_keys("ClientSummary"));
    let (_, page) = s.get("/api/connections?limit=1").await;
    assert_eq!(keys(&page["connections"][0]), prop_keys("Connection"));
    let stats = s.stats().await;
    assert_eq!(
        keys(&stats["connections"]),
        keys(&schemas["Stats"]["properties"]["connections"]["properties"])
    );
    let (_, presence) = s
        .get(&format!(
            "/api/channels/{}/presence",
            CHANNEL.replace(':', "%3A")
        ))
        .await;
    assert_eq!(
        presence["clients"],
        json!([{"client_id": CLIENT, "connections": 1}])
    );
    let (_, history) = s
        .get(&format!(
            "/api/channels/{}/history",
            CHANNEL.replace(':', "%3A")
        ))
        .await;
    let messages = history["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{history}");
    assert_eq!(keys(&messages[0]), prop_keys("HistoryMessage"));
    let (_, channels) = s.get("/api/channels").await;
    assert_eq!(
        channels["channels"],
        json!([{"name": CHANNEL, "subscribers": 1, "clients": 1}])
    );

    client_close(ws).await;
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn framework_errors_are_json_too() {
    let s = support::start(|_| {}).await;
    for (method, path, body, want) in [
        ("GET", "/api/clients/%FF", None, 400),
        ("GET", "/api/nope", None, 404),
        ("DELETE", "/api/stats", None, 405),
        (
            "POST",
            "/api/publish",
            Some(vec![b'x'; 3 * 1024 * 1024]),
            413,
        ),
    ] {
        let mut req = s.http.request(method.parse().unwrap(), s.api_url(path));
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), want, "{method} {path}");
        assert_eq!(
            r.headers()["content-type"],
            "application/json",
            "{method} {path}"
        );
        let v: serde_json::Value = r.json().await.unwrap();
        assert!(v["error"].is_string() && v["message"].is_string(), "{v}");
    }
    s.assert_clean().await;
}
