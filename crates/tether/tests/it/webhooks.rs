//! Webhooks (SPEC section 3) against a real HTTP receiver on loopback that records
//! every POST's raw body and headers: signing, batching, retries with the same batch,
//! a receiver that is down, overflow, the flush at shutdown, and `/api/events`
//! during a drain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use futures_util::SinkExt;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use support::*;
use tether_server::Config;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "webhook-test-secret";

/// One POST as the receiver saw it.
#[derive(Clone, Debug)]
struct Hit {
    batch_id: String,
    signature: String,
    content_type: String,
    body: Bytes,
    /// What the receiver answered.
    status: u16,
}

#[derive(Clone)]
struct Shared {
    hits: Arc<Mutex<Vec<Hit>>>,
    /// Statuses to answer first (then 200).
    answers: Arc<Mutex<VecDeque<u16>>>,
    /// While `true`, every POST waits (a stalled receiver).
    stalled: Arc<watch::Sender<bool>>,
}

/// The test's webhook receiver: an axum server on 127.0.0.1.
struct Receiver {
    addr: SocketAddr,
    shared: Shared,
    stop: CancellationToken,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        // Frees a stalled handler too.
        self.shared.stalled.send_replace(false);
        self.stop.cancel();
    }
}

async fn hook(State(r): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let mut stalled = r.stalled.subscribe();
    let _ = stalled.wait_for(|s| !*s).await;
    let status = r.answers.lock().unwrap().pop_front().unwrap_or(200);
    let header = |name: &str| {
        headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    r.hits.lock().unwrap().push(Hit {
        batch_id: header("x-tether-batch-id"),
        signature: header("x-tether-signature"),
        content_type: header("content-type"),
        body,
        status,
    });
    StatusCode::from_u16(status).unwrap()
}

impl Receiver {
    async fn start() -> Self {
        Self::on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    fn on(listener: TcpListener) -> Self {
        let shared = Shared {
            hits: Arc::default(),
            answers: Arc::default(),
            stalled: Arc::new(watch::channel(false).0),
        };
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(shared.clone());
        let stop = CancellationToken::new();
        let until = stop.clone().cancelled_owned();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(until)
                .await;
        });
        Self { addr, shared, stop }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn answer_first(&self, statuses: &[u16]) {
        self.shared.answers.lock().unwrap().extend(statuses);
    }

    fn set_stalled(&self, stalled: bool) {
        self.shared.stalled.send_replace(stalled);
    }

    fn hits(&self) -> Vec<Hit> {
        self.shared.hits.lock().unwrap().clone()
    }

    /// The events of every acknowledged (2xx) POST, in arrival order.
    fn delivered(&self) -> Vec<Value> {
        self.hits()
            .iter()
            .filter(|h| (200..300).contains(&h.status))
            .flat_map(|h| {
                let v: Value = serde_json::from_slice(&h.body).unwrap();
                v["events"].as_array().unwrap().clone()
            })
            .collect()
    }

    /// Waits until `n` events were acknowledged (fails after `within`); returns them.
    async fn wait_events(&self, n: usize, within: Duration) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let got = self.delivered();
            if got.len() >= n {
                return got;
            }
            assert!(
                start.elapsed() < within,
                "{} of {n} events within {within:?}: {got:?}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn sign(body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

fn hooks(c: &mut Config, url: &str) {
    c.webhooks.url = url.to_owned();
    c.webhooks.secret = SECRET.to_owned();
}

/// `(type, client_id)` of events.
fn brief(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap().to_owned(),
                e["client_id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Each client's event types, in order.
fn per_client(events: &[Value]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (kind, client) in brief(events) {
        out.entry(client).or_default().push(kind);
    }
    out
}

/// The `data:` JSON of every `client.*` event in an `/api/events` text.
fn sse_client_events(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter(|v| v["type"].as_str().unwrap().starts_with("client."))
        .collect()
}

/// A client connects (subscribing to a channel) and closes.
async fn visit(s: &TestServer, client: &str) {
    let (mut ws, _) = s.ws(&format!("?client={client}")).await;
    let sub = json!({"type": "subscribe", "ref": 1, "channel": "room"});
    ws.send(Message::text(sub.to_string())).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "subscribed");
    client_close(ws).await;
}

async fn status(s: &TestServer) -> Value {
    let (st, v) = s.get("/api/webhooks").await;
    assert_eq!(st, 200, "{v}");
    v
}

async fn metrics(s: &TestServer) -> String {
    s.http
        .get(s.api_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_are_signed_and_carry_only_the_configured_types() {
    let r = Receiver::start().await;
    let with_userinfo = format!("http://hook:pw@{}/hook", r.addr);
    let s = start(|c| hooks(c, &with_userinfo)).await;
    let mut sse = s.http.get(s.api_url("/api/events")).send().await.unwrap();
    let _ = read_sse_until(&mut sse, |t| t.contains(": events")).await;

    visit(&s, "alice").await;
    visit(&s, "bob").await;
    let got = r.wait_events(4, Duration::from_secs(10)).await;
    // Only the configured types, each client's in order. (Anything else alice caused,
    // subscriptions and connections, came before bob's events in the one queue.)
    assert_eq!(got.len(), 4, "{got:?}");
    for (client, kinds) in per_client(&got) {
        assert_eq!(kinds, ["client.online", "client.offline"], "{client}");
    }
    // The same JSON as /api/events shows.
    let text = read_sse_until(&mut sse, |t| sse_client_events(t).len() == 4).await;
    let shown = sse_client_events(&text);
    for ev in &got {
        assert!(
            shown.contains(ev),
            "{ev} not as /api/events shows it: {shown:?}"
        );
    }

    let hits = r.hits();
    let mut ids = HashSet::new();
    for h in &hits {
        assert_eq!(h.content_type, "application/json");
        assert_eq!(h.signature, sign(&h.body), "{h:?}");
        let id = h.batch_id.as_bytes();
        assert!(
            id.len() == 36 && [8, 13, 18, 23].iter().all(|&i| id[i] == b'-'),
            "{h:?}"
        );
        assert!(ids.insert(h.batch_id.clone()), "batch id reused: {h:?}");
    }

    let st = status(&s).await;
    assert_eq!(st["enabled"], true);
    assert_eq!(st["url"], r.url(), "no userinfo: {st}");
    assert_eq!(st["events"], json!(["client.online", "client.offline"]));
    assert_eq!(st["delivered"], hits.len());
    assert_eq!(
        (&st["failed"], &st["retries"], &st["dropped"]),
        (&json!(0), &json!(0), &json!(0))
    );
    assert_eq!((&st["queued"], &st["in_flight"]), (&json!(0), &json!(0)));
    assert!(!st.to_string().contains(SECRET) && !st.to_string().contains("pw"));
    let m = metrics(&s).await;
    assert!(
        m.contains(&format!(
            "tether_webhook_deliveries_total{{result=\"ok\"}} {}",
            hits.len()
        )),
        "{m}"
    );
    drop(sse);
    s.assert_clean().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhooks_off_by_default_with_metrics_present() {
    let s = start(|_| {}).await;
    let st = status(&s).await;
    assert_eq!(st["enabled"], false);
    assert_eq!(st["url"], Value::Null);
    assert_eq!(st["last_error"], Value::Null);
    let m = metrics(&s).await;
    // HELP and TYPE (named with `_total` or without, by the text format served).
    for family in ["tether_webhook_deliveries", "tether_webhook_events_dropped"] {
        for kind in ["HELP", "TYPE"] {
            let head = format!("# {kind} {family}");
            assert!(
                m.lines().any(|l| l.starts_with(&head)),
                "{head} missing:\n{m}"
            );
        }
    }
    for line in [
        "tether_webhook_deliveries_total{result=\"ok\"} 0",
        "tether_webhook_deliveries_total{result=\"failed\"} 0",
        "tether_webhook_deliveries_total{result=\"retried\"} 0",
        "tether_webhook_events_dropped_total 0",
        "# TYPE tether_webhook_queue_events gauge",
        "tether_webhook_queue_events 0",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} missing:\n{m}");
    }
    s.assert_clean().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_receiver_gets_the_same_batch_again_then_everything_in_order() {
    let r = Receiver::start().await;
    r.answer_first(&[500, 500]);
    let s = start(|c| {
        hooks(c, &r.url());
        c.webhooks.batch_ms = 100;
    })
    .await;
    let clients = ["c0", "c1", "c2", "c3"];
    for _round in 0..2 {
        let mut open = Vec::new();
        for c in clients {
            open.push(s.ws(&format!("?client={c}")).await.0);
        }
        for ws in open {
            client_close(ws).await;
        }
        // The round's offlines are out before the next round's onlines.
        let mut n = 0;
        while s.stats().await["clients"] != 0 && n < 100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            n += 1;
        }
    }
    let got = r.wait_events(16, Duration::from_secs(20)).await;
    let hits = r.hits();
    assert_eq!(
        hits[..3].iter().map(|h| h.status).collect::<Vec<_>>(),
        [500, 500, 200]
    );
    assert!(
        hits[..3]
            .iter()
            .all(|h| h.batch_id == hits[0].batch_id && h.body == hits[0].body),
        "{hits:?}"
    );
    assert_ne!(hits.get(3).map(|h| &h.batch_id), Some(&hits[0].batch_id));
    // Nothing lost, nothing twice, every client's events in order.
    assert_eq!(got.len(), 16, "{got:?}");
    let ids: HashSet<_> = got.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 16);
    let order = [
        "client.online",
        "client.offline",
        "client.online",
        "client.offline",
    ];
    let by_client = per_client(&got);
    assert_eq!(by_client.len(), 4);
    for (client, kinds) in &by_client {
        assert_eq!(kinds, &order, "{client}");
    }
    let st = status(&s).await;
    assert_eq!((&st["retries"], &st["failed"]), (&json!(2), &json!(0)));
    assert_eq!(st["dropped"], 0);
    assert!(st["last_error"].as_str().unwrap().contains("500"), "{st}");
    let m = metrics(&s).await;
    assert!(
        m.contains("tether_webhook_deliveries_total{result=\"retried\"} 2"),
        "{m}"
    );
    s.assert_clean().await;
    s.stop().await;
}

/// `batch_max`: no POST carries more events than it, and together they carry all.
#[tokio::test(flavor = "multi_thread")]
async fn no_batch_is_larger_than_batch_max() {
    let r = Receiver::start().await;
    let s = start(|c| {
        hooks(c, &r.url());
        c.webhooks.batch_max = std::num::NonZeroU64::new(3).unwrap();
        c.webhooks.batch_ms = 500;
    })
    .await;
    for i in 0..5 {
        visit(&s, &format!("b{i}")).await;
    }
    let got = r.wait_events(10, Duration::from_secs(10)).await;
    assert_eq!(got.len(), 10);
    let sizes: Vec<usize> = r
        .hits()
        .iter()
        .map(|h| {
            let v: Value = serde_json::from_slice(&h.body).unwrap();
            v["events"].as_array().unwrap().len()
        })
        .collect();
    assert!(sizes.iter().all(|&n| (1..=3).contains(&n)), "{sizes:?}");
    assert!(
        sizes.contains(&3),
        "a full batch goes at batch_max: {sizes:?}"
    );
    s.assert_clean().await;
    s.stop().await;
}

/// `timeout_ms`: a receiver that does not answer in time is a failed attempt; the
/// same batch (same id, same bytes) goes again, and once it answers in time it is
/// delivered once acknowledged.
#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_slower_than_timeout_ms_gets_the_same_batch_again() {
    let r = Receiver::start().await;
    r.set_stalled(true);
    let s = start(|c| {
        hooks(c, &r.url());
        c.webhooks.timeout_ms = std::num::NonZeroU64::new(300).unwrap();
        c.webhooks.batch_ms = 0;
    })
    .await;
    visit(&s, "slowhook").await;
    // Two attempts time out while the receiver stalls (it records a POST only when
    // it answers, so the attempts are counted by the server).
    let start_wait = Instant::now();
    while status(&s).await["retries"].as_u64().unwrap() < 2 {
        assert!(
            start_wait.elapsed() < Duration::from_secs(10),
            "{}",
            status(&s).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        status(&s).await["last_error"]
            .as_str()
            .unwrap()
            .contains("timeout_ms"),
        "{}",
        status(&s).await
    );
    r.set_stalled(false);
    let got = r.wait_events(2, Duration::from_secs(40)).await;
    assert_eq!(
        brief(&got),
        [
            ("client.online".to_owned(), "slowhook".to_owned()),
            ("client.offline".to_owned(), "slowhook".to_owned())
        ]
    );
    // Whatever reached the receiver: one batch id is always the same bytes, and the
    // first batch (the one that timed out) is the one delivered first.
    let hits = r.hits();
    for h in &hits {
        let same_id: Vec<_> = hits.iter().filter(|o| o.batch_id == h.batch_id).collect();
        assert!(same_id.iter().all(|o| o.body == h.body), "{hits:?}");
    }
    let first: Value = serde_json::from_slice(&hits[0].body).unwrap();
    assert_eq!(first["events"][0]["type"], "client.online");
    s.assert_clean().await;
    s.stop().await;
}

/// `max_attempts`: a batch that fails that many times is given up, counted as
/// dropped events and failed deliveries, and the queue moves on.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_is_given_up_after_max_attempts() {
    let r = Receiver::start().await;
    r.answer_first(&[500, 500]);
    let s = start(|c| {
        hooks(c, &r.url());
        c.webhooks.max_attempts = std::num::NonZeroU64::new(2).unwrap();
        c.webhooks.batch_ms = 0;
    })
    .await;
    let (ws, _) = s.ws("?client=doomed").await;
    let start_wait = Instant::now();
    while status(&s).await["dropped"] != 1 {
        assert!(
            start_wait.elapsed() < Duration::from_secs(10),
            "{}",
            status(&s).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hits = r.hits();
    assert_eq!(
        hits.iter().map(|h| h.status).collect::<Vec<_>>(),
        [500, 500]
    );
    assert_eq!(status(&s).await["failed"], 1);
    // The next event is sent (the receiver now answers 200).
    client_close(ws).await;
    let got = r.wait_events(1, Duration::from_secs(10)).await;
    assert_eq!(
        brief(&got),
        [("client.offline".to_owned(), "doomed".to_owned())]
    );
    let m = metrics(&s).await;
    assert!(m.contains("tether_webhook_events_dropped_total 1"), "{m}");
    s.assert_clean().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_receiver_down_for_five_seconds_gets_everything_once_up() {
    // A port with nothing listening: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let s = start(|c| {
        hooks(c, &format!("http://127.0.0.1:{port}/hook"));
        // The default 8 attempts could, with full jitter, all fall within 5 s.
        c.webhooks.max_attempts = std::num::NonZeroU64::new(20).unwrap();
    })
    .await;
    let down_since = Instant::now();
    for c in ["d0", "d1", "d2"] {
        visit(&s, c).await;
    }
    let mut n = 0;
    while status(&s).await["retries"] == 0 && n < 250 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        n += 1;
    }
    let st = status(&s).await;
    assert!(st["retries"].as_u64().unwrap() >= 1, "{st}");
    assert!(st["last_error"].is_string(), "{st}");
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(down_since.elapsed())).await;
    let r = Receiver::on(TcpListener::bind(("127.0.0.1", port)).await.unwrap());
    // The longest backoff before the 7th retry is 30 s.
    let got = r.wait_events(6, Duration::from_secs(45)).await;
    assert_eq!(got.len(), 6, "{got:?}");
    for (client, kinds) in per_client(&got) {
        assert_eq!(kinds, ["client.online", "client.offline"], "{client}");
    }
    let st = status(&s).await;
    assert_eq!((&st["dropped"], &st["failed"]), (&json!(0), &json!(0)));
    s.assert_clean().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn overflow_beyond_max_pending_is_counted_exactly() {
    const MAX_PENDING: u64 = 5;
    const CLIENTS: usize = 5;
    let r = Receiver::start().await;
    r.set_stalled(true);
    let s = start(|c| {
        hooks(c, &r.url());
        c.webhooks.max_pending = std::num::NonZeroU64::new(MAX_PENDING).unwrap();
        c.webhooks.batch_max = std::num::NonZeroU64::new(MAX_PENDING).unwrap();
        c.webhooks.batch_ms = 0;
        c.webhooks.timeout_ms = std::num::NonZeroU64::new(30_000).unwrap();
    })
    .await;
    let mut sse = s.http.get(s.api_url("/api/events")).send().await.unwrap();
    let _ = read_sse_until(&mut sse, |t| t.contains(": events")).await;
    for i in 0..CLIENTS {
        visit(&s, &format!("o{i}")).await;
    }
    let generated = 2 * CLIENTS as u64;
    let text = read_sse_until(&mut sse, |t| sse_client_events(t).len() == 2 * CLIENTS).await;
    let emitted = sse_client_events(&text);
    assert_eq!(emitted.len() as u64, generated);
    let st = status(&s).await;
    let held = st["queued"].as_u64().unwrap() + st["in_flight"].as_u64().unwrap();
    assert_eq!(held, MAX_PENDING, "{st}");
    assert_eq!(st["dropped"], generated - MAX_PENDING, "{st}");
    let m = metrics(&s).await;
    for line in [
        format!(
            "tether_webhook_events_dropped_total {}",
            generated - MAX_PENDING
        ),
        format!("tether_webhook_queue_events {MAX_PENDING}"),
    ] {
        assert!(m.lines().any(|l| l == line), "{line} missing:\n{m}");
    }
    // Released, the receiver gets the events that fit, each client's in order.
    r.set_stalled(false);
    let got = r
        .wait_events(MAX_PENDING as usize, Duration::from_secs(10))
        .await;
    assert!(got.iter().all(|e| emitted.contains(e)), "{got:?}");
    for (client, kinds) in per_client(&got) {
        let order = ["client.online", "client.offline"];
        assert_eq!(kinds, order[..kinds.len()], "{client}");
    }
    let mut n = 0;
    while status(&s).await["in_flight"] != 0 && n < 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        n += 1;
    }
    let st = status(&s).await;
    assert_eq!(
        (&st["queued"], &st["in_flight"], &st["dropped"]),
        (&json!(0), &json!(0), &json!(generated - MAX_PENDING))
    );
    assert_eq!(r.delivered().len() as u64, MAX_PENDING);
    drop(sse);
    s.assert_clean().await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_flushes_webhooks_and_api_events_sees_the_whole_drain() {
    let r = Receiver::start().await;
    let mut s = start(|c| {
        hooks(c, &r.url());
        // Held in the queue until the flush sends them.
        c.webhooks.batch_ms = 60_000;
        // `client.offline` fires at the very end of the drain (the grace is cut).
        c.clients.offline_grace_ms = 60_000;
    })
    .await;
    let mut sse = s.http.get(s.api_url("/api/events")).send().await.unwrap();
    let _ = read_sse_until(&mut sse, |t| t.contains(": events")).await;
    let (mut d, _) = s.ws("?client=d").await;
    let (mut e, _) = s.ws("?client=e").await;
    let mut n = 0;
    while status(&s).await["queued"] != 2 && n < 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        n += 1;
    }
    assert_eq!(status(&s).await["queued"], 2);
    assert!(r.hits().is_empty());

    let app = s.app.clone();
    let running = s.running.take().unwrap();
    running.begin_drain();
    // The whole stream, until the server ends it.
    let reader = tokio::spawn(async move {
        let mut text = String::new();
        let ended = tokio::time::timeout(Duration::from_secs(15), async {
            while let Ok(Some(chunk)) = sse.chunk().await {
                text.push_str(&String::from_utf8_lossy(&chunk));
            }
        })
        .await
        .is_ok();
        (text, ended)
    });
    assert_eq!(expect_close(&mut d).await.1, 1001);
    assert_eq!(expect_close(&mut e).await.1, 1001);
    tokio::time::timeout(Duration::from_secs(15), running.wait())
        .await
        .expect("server stops");

    // Flushed before the server stopped.
    let got = r.delivered();
    assert_eq!(got.len(), 4, "{got:?}");
    for (client, kinds) in per_client(&got) {
        assert_eq!(kinds, ["client.online", "client.offline"], "{client}");
    }
    let (text, ended) = reader.await.unwrap();
    assert!(ended, "the stream ended: {text}");
    let tail: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter(|v| ["connection.closed", "client.offline"].contains(&v["type"].as_str().unwrap()))
        .map(|v| {
            (
                v["type"].as_str().unwrap().to_owned(),
                v["client_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for client in ["d", "e"] {
        for kind in ["connection.closed", "client.offline"] {
            assert!(
                tail.contains(&(kind.to_owned(), client.to_owned())),
                "{kind} of {client} missing: {text}"
            );
        }
    }
    assert_eq!(app.registry.entries(), 0);
    assert_eq!(app.tasks.len(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn what_the_flush_cannot_deliver_by_the_deadline_is_counted() {
    let r = Receiver::start().await;
    r.set_stalled(true);
    let mut s = start(|c| {
        hooks(c, &r.url());
        c.webhooks.timeout_ms = std::num::NonZeroU64::new(30_000).unwrap();
        c.shutdown.timeout_ms = std::num::NonZeroU64::new(1000).unwrap();
    })
    .await;
    for c in ["s0", "s1"] {
        visit(&s, c).await;
    }
    let held = |st: &Value| st["queued"].as_u64().unwrap() + st["in_flight"].as_u64().unwrap();
    let mut n = 0;
    while held(&status(&s).await) < 4 && n < 100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        n += 1;
    }
    assert_eq!(held(&status(&s).await), 4);
    s.assert_clean().await;
    let app = s.app.clone();
    let running = s.running.take().unwrap();
    running.begin_drain();
    tokio::time::timeout(Duration::from_secs(10), running.wait())
        .await
        .expect("server stops at its deadline");
    let m = app.metrics.render();
    for line in [
        "tether_webhook_events_dropped_total 4",
        "tether_webhook_queue_events 0",
    ] {
        assert!(m.lines().any(|l| l == line), "{line} missing:\n{m}");
    }
    assert!(r.delivered().is_empty());
}

#[test]
fn bad_webhook_config_is_a_startup_error_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("tether-webhooks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let check = |name: &str, text: &str| {
        let file = dir.join(name);
        std::fs::write(&file, text).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["config", "check", file.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = check(
        "scheme.toml",
        "[webhooks]\nurl = \"ftp://x\"\nsecret = \"s\"\n",
    );
    assert!(
        err.contains("webhooks.url") && err.contains("ftp://x"),
        "{err}"
    );
    let err = check(
        "type.toml",
        "[webhooks]\nurl = \"http://127.0.0.1:9/h\"\nsecret = \"s\"\nevents = [\"client.online\", \"client.gone\"]\n",
    );
    assert!(
        err.contains("client.gone") && err.contains("line 4") && err.contains("events"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
