//! `GET /metrics` (SPEC section 8): every family present from the start with HELP and
//! TYPE and every known label at 0; exact counts after scripted scenarios; no client
//! id or channel name in any label. `GET /api/clients`: paging, states, bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures_util::SinkExt;
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
use tokio_tungstenite::tungstenite::Message;

/// Every family SPEC section 8 names (webhooks aside), plus the brief's extras, with
/// its OpenMetrics type (counters are declared without `_total`).
const FAMILIES: &[(&str, &str)] = &[
    ("tether_connections", "gauge"),
    ("tether_clients_online", "gauge"),
    ("tether_connections_opened", "counter"),
    ("tether_connections_closed", "counter"),
    ("tether_admission_refused", "counter"),
    ("tether_messages_published", "counter"),
    ("tether_messages_delivered", "counter"),
    ("tether_queue_bytes", "gauge"),
    ("tether_publish_fanout_seconds", "histogram"),
    ("tether_heartbeat_timeouts", "counter"),
    ("tether_slow_consumer_closes", "counter"),
    ("tether_sweeps_closed", "counter"),
    ("tether_sweeps_fired", "counter"),
    ("tether_broker_up", "gauge"),
    ("tether_pending_handshakes", "gauge"),
    ("process_open_fds", "gauge"),
    ("process_max_fds", "gauge"),
    ("process_resident_memory_bytes", "gauge"),
];

/// The close codes of SPEC section 4's table.
const SPEC_CODES: &[u16] = &[
    1000, 1001, 1002, 1007, 1009, 1011, 4000, 4001, 4002, 4003, 4004, 4005, 4008, 4029, 4401, 4403,
    4409, 4429, 4502, 4503,
];

/// The refusal reasons of SPEC section 2's table, and sockets reset at accept.
const SPEC_REASONS: &[&str] = &[
    "draining",
    "rate_limited",
    "ip_limit",
    "origin_not_allowed",
    "unauthorized",
    "forbidden_channel",
    "client_limit",
    "server_full",
    "broker_unavailable",
    "upstream_unavailable",
    "pending_handshakes",
];

/// A scrape: samples by `name{labels}`, and the HELP and TYPE lines by family.
struct Scrape {
    text: String,
    samples: BTreeMap<String, f64>,
    help: BTreeSet<String>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    fn parse(text: String) -> Self {
        let (mut samples, mut help, mut types) =
            (BTreeMap::new(), BTreeSet::new(), BTreeMap::new());
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                help.insert(rest.split(' ').next().unwrap().to_owned());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                types.insert(name.to_owned(), kind.to_owned());
            } else if !line.starts_with('#') && !line.is_empty() {
                let (key, value) = line.rsplit_once(' ').unwrap();
                let value: f64 = value.parse().unwrap_or_else(|_| panic!("a number: {line}"));
                samples.insert(key.to_owned(), value);
            }
        }
        Self {
            text,
            samples,
            help,
            types,
        }
    }

    /// The sample named exactly `key` (`name` or `name{label="v"}`).
    fn get(&self, key: &str) -> f64 {
        *self
            .samples
            .get(key)
            .unwrap_or_else(|| panic!("no sample {key} in:\n{}", self.text))
    }

    fn closed(&self, code: &str) -> f64 {
        self.get(&format!(
            "tether_connections_closed_total{{code=\"{code}\"}}"
        ))
    }

    fn refused(&self, reason: &str) -> f64 {
        self.get(&format!(
            "tether_admission_refused_total{{reason=\"{reason}\"}}"
        ))
    }

    /// The `code` labels of `tether_connections_closed_total` with a non-zero count.
    fn nonzero_codes(&self) -> BTreeMap<String, f64> {
        self.samples
            .iter()
            .filter_map(|(k, v)| {
                let code = k
                    .strip_prefix("tether_connections_closed_total{code=\"")?
                    .strip_suffix("\"}")?;
                (*v != 0.0).then(|| (code.to_owned(), *v))
            })
            .collect()
    }
}

/// An OpenMetrics scrape, asked for as Prometheus asks.
async fn scrape(s: &TestServer) -> Scrape {
    let r = s
        .http
        .get(s.api_url("/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    Scrape::parse(r.text().await.unwrap())
}

/// A scrape with no `Accept` header: the classic text format.
async fn scrape_classic(s: &TestServer) -> String {
    let r = s.http.get(s.api_url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    r.text().await.unwrap()
}

/// A scrape taken once the server is back to nothing open, so every close is counted.
async fn scrape_clean(s: &TestServer) -> Scrape {
    s.assert_clean().await;
    scrape(s).await
}

#[tokio::test(flavor = "multi_thread")]
async fn every_family_and_label_is_there_from_the_start() {
    let s = start(|_| {}).await;
    let m = scrape(&s).await;
    for (family, kind) in FAMILIES {
        assert!(
            m.help.contains(*family),
            "no HELP for {family}:\n{}",
            m.text
        );
        assert_eq!(
            m.types.get(*family).map(String::as_str),
            Some(*kind),
            "TYPE of {family}:\n{}",
            m.text
        );
    }
    for code in SPEC_CODES {
        assert_eq!(m.closed(&code.to_string()), 0.0, "{code}");
    }
    for reason in SPEC_REASONS {
        assert_eq!(m.refused(reason), 0.0, "{reason}");
    }
    for transport in ["ws", "sse", "proxy"] {
        let key = format!("tether_connections_opened_total{{transport=\"{transport}\"}}");
        assert_eq!(m.get(&key), 0.0);
    }
    for key in [
        "tether_heartbeat_timeouts_total",
        "tether_slow_consumer_closes_total",
        "tether_sweeps_closed_total",
        "tether_sweeps_fired_total",
        "tether_publish_fanout_seconds_count",
        "tether_publish_fanout_seconds_bucket{le=\"+Inf\"}",
        "tether_messages_published_total",
    ] {
        assert_eq!(m.get(key), 0.0, "{key}");
    }
    assert_eq!(m.get("tether_broker_up"), 1.0);
    // The process metrics are read from /proc/self: this process, alive.
    let (open, max) = (m.get("process_open_fds"), m.get("process_max_fds"));
    assert!(open >= 3.0 && open < max, "open {open}, max {max}");
    assert!(m.get("process_resident_memory_bytes") > 1e6);
    assert!(m.text.ends_with("# EOF\n"), "{}", m.text);
    // The classic format: the same samples; a counter family is named like them.
    let classic = scrape_classic(&s).await;
    assert!(!classic.contains("# EOF"), "{classic}");
    for (family, kind) in FAMILIES {
        let name = match *kind {
            "counter" => format!("{family}_total"),
            _ => (*family).to_owned(),
        };
        let type_line = format!("# TYPE {name} {kind}");
        assert!(classic.lines().any(|l| l == type_line), "{name}: {classic}");
        let help = format!("# HELP {name} ");
        assert!(classic.lines().any(|l| l.starts_with(&help)), "{classic}");
    }
    s.stop().await;
}

/// `promtool check metrics` accepts a scrape after traffic. Runs where `promtool` is
/// installed; `scripts/test.sh alerts` installs it and sets TETHER_REQUIRE_PROMTOOL.
#[tokio::test(flavor = "multi_thread")]
async fn promtool_accepts_a_scrape() {
    let found = std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("TETHER_REQUIRE_PROMTOOL").is_none(),
            "promtool is required but not on PATH"
        );
        eprintln!("promtool not installed: skipped");
        return;
    }
    let s = start(|_| {}).await;
    let (ws, _) = s.ws("?client=p").await;
    let (st, _) = s
        .post("/api/publish", json!({"channel": "c", "data": 1}))
        .await;
    assert_eq!(st, 200);
    client_close(ws).await;
    s.assert_clean().await;
    let text = scrape_classic(&s).await;
    let input = text.clone();
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // promtool reads all of its input before it writes anything.
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        text
    );
    s.stop().await;
}

/// One observation per publish that is fanned out, on the inline path and on the
/// blocking-thread path of a channel with more than 64 subscribers; a repeated
/// idempotency key and a refused publish are not observed.
#[tokio::test(flavor = "multi_thread")]
async fn each_publish_is_one_fanout_observation() {
    let s = start(|_| {}).await;
    let mut wide = Vec::new();
    for i in 0..66 {
        let (mut ws, _) = s.ws(&format!("?client=w{i}")).await;
        ws.send(Message::text(r#"{"type":"subscribe","channel":"wide"}"#))
            .await
            .unwrap();
        assert_eq!(next_json(&mut ws).await["type"], "subscribed");
        wide.push(ws);
    }
    const NARROW: usize = 5;
    const WIDE: usize = 3;
    for i in 0..NARROW {
        let (st, body) = s
            .post("/api/publish", json!({"channel": "narrow", "data": i}))
            .await;
        assert_eq!(st, 200, "{body}");
    }
    for i in 0..WIDE {
        let body = json!({"channel": "wide", "data": i, "idempotency_key": format!("k{i}")});
        let (st, r) = s.post("/api/publish", body.clone()).await;
        assert_eq!((st, r["subscribers"].as_u64()), (200, Some(66)), "{r}");
        let (st, r) = s.post("/api/publish", body).await;
        assert_eq!((st, r["duplicate"].as_bool()), (200, Some(true)), "{r}");
    }
    let (st, _) = s
        .post("/api/publish", json!({"channel": "bad name!", "data": 1}))
        .await;
    assert_eq!(st, 400);
    for ws in &mut wide {
        for _ in 0..WIDE {
            assert_eq!(next_json(ws).await["type"], "message");
        }
    }
    for ws in wide {
        client_close(ws).await;
    }
    let m = scrape_clean(&s).await;
    let n = (NARROW + WIDE) as f64;
    assert_eq!(m.get("tether_publish_fanout_seconds_count"), n);
    assert_eq!(
        m.get("tether_publish_fanout_seconds_bucket{le=\"+Inf\"}"),
        n
    );
    assert_eq!(m.get("tether_messages_published_total"), n);
    assert!(m.get("tether_publish_fanout_seconds_sum") > 0.0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_limit_refusals_are_counted_under_their_reason_only() {
    let s = start(|c| c.clients.max_connections_per_client = 1.try_into().unwrap()).await;
    let (a, _) = s.ws("?client=bob").await;
    const K: usize = 3;
    for i in 0..K {
        let query = if i == 0 {
            "?client=bob&refusal=close"
        } else {
            "?client=bob"
        };
        match s.ws_with(query, &[]).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 409)
            }
            Ok(mut ws) => assert_eq!(expect_close(&mut ws).await.1, 4409),
            Err(e) => panic!("{e}"),
        }
    }
    client_close(a).await;
    let m = scrape_clean(&s).await;
    for reason in SPEC_REASONS {
        let want = if *reason == "client_limit" { K } else { 0 };
        assert_eq!(m.refused(reason), want as f64, "{reason}");
    }
    // A refused handshake is not a connection: nothing opened or closed for it.
    assert_eq!(
        m.get("tether_connections_opened_total{transport=\"ws\"}"),
        1.0
    );
    assert_eq!(m.nonzero_codes(), BTreeMap::from([("1005".into(), 1.0)]));
    s.stop().await;
}

/// A peer that never answers a ping is one heartbeat timeout; a peer that closes
/// with 4000 itself is a 4000 close but no heartbeat timeout.
#[tokio::test(flavor = "multi_thread")]
async fn a_silent_peer_is_one_heartbeat_timeout() {
    let s = start(|c| {
        c.heartbeat.interval_ms = 200.try_into().unwrap();
        c.heartbeat.timeout_ms = 300.try_into().unwrap();
    })
    .await;
    let mut raw = raw_ws(s.client, "/ws?client=frank").await;
    let got = raw_read_until(&mut raw, &[0x0f, 0xa0], Duration::from_secs(5)).await;
    assert!(has_close(&got, 4000), "{}", String::from_utf8_lossy(&got));
    drop(raw);
    let (mut ws, _) = s.ws("?client=gina").await;
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4000),
        reason: "mine".into(),
    }))
    .await
    .unwrap();
    client_close(ws).await;
    let m = scrape_clean(&s).await;
    assert_eq!(m.get("tether_heartbeat_timeouts_total"), 1.0);
    assert_eq!(m.nonzero_codes(), BTreeMap::from([("4000".into(), 2.0)]));
    assert_eq!(m.get("tether_slow_consumer_closes_total"), 0.0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_consumer_close_is_counted() {
    let s = start(|c| c.delivery.max_queue_messages = 8.try_into().unwrap()).await;
    let mut slow = raw_ws(s.client, "/ws?client=slow").await;
    slow.write_all(&masked_text(br#"{"type":"subscribe","channel":"big"}"#))
        .await
        .unwrap();
    while s.app.registry.hub().presence("big").is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let conn = s.app.registry.connections().pop().unwrap();
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
    drop(conn);
    // Read again at once, until the server closes the socket: the last frame is
    // the close with 4008.
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut got))
        .await
        .expect("the server closes the socket")
        .unwrap();
    assert!(has_close(&got[got.len().saturating_sub(200)..], 4008));
    drop(slow);
    let m = scrape_clean(&s).await;
    assert_eq!(m.get("tether_slow_consumer_closes_total"), 1.0);
    assert_eq!(m.nonzero_codes(), BTreeMap::from([("4008".into(), 1.0)]));
    assert_eq!(m.get("tether_heartbeat_timeouts_total"), 0.0);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sweep_closing_two_connections_counts_two() {
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
            reconnect: false,
        }];
    })
    .await;
    let (mut a, _) = s.ws("?client=lee").await;
    let (mut b, _) = s.ws("?client=mia").await;
    assert_eq!(expect_close(&mut a).await.1, 4002);
    assert_eq!(expect_close(&mut b).await.1, 4002);
    drop((a, b));
    let m = scrape_clean(&s).await;
    assert_eq!(m.get("tether_sweeps_closed_total"), 2.0);
    // Both in one evaluation or one each: every evaluation that closed any counts.
    let fired = m.get("tether_sweeps_fired_total");
    assert!(fired == 1.0 || fired == 2.0, "{fired}");
    assert_eq!(m.nonzero_codes(), BTreeMap::from([("4002".into(), 2.0)]));
    s.stop().await;
}

/// Replaced (4001), kicked (4002), a normal close (1000) and a code a peer made up,
/// which is counted as `other` rather than as a series of its own.
#[tokio::test(flavor = "multi_thread")]
async fn closes_are_counted_by_code() {
    let s = start(|c| {
        c.clients.max_connections_per_client = 1.try_into().unwrap();
        c.clients.on_client_limit = tether_core::ClientLimitPolicy::ReplaceOldest;
    })
    .await;
    let (mut old, _) = s.ws("?client=ann").await;
    let (new, _) = s.ws("?client=ann").await;
    assert_eq!(expect_close(&mut old).await.1, 4001);
    let (mut kicked, _) = s.ws("?client=ben").await;
    let (st, r) = s.post("/api/disconnect", json!({"client_id": "ben"})).await;
    assert_eq!((st, r["closed"].as_u64()), (200, Some(1)), "{r}");
    assert_eq!(expect_close(&mut kicked).await.1, 4002);
    let (mut odd, _) = s.ws("?client=cat").await;
    odd.close(Some(CloseFrame {
        code: CloseCode::from(3123),
        reason: "app".into(),
    }))
    .await
    .unwrap();
    client_close(odd).await;
    client_close(new).await;
    drop((old, kicked));
    let m = scrape_clean(&s).await;
    assert_eq!(
        m.nonzero_codes(),
        BTreeMap::from([
            ("1005".into(), 1.0),
            ("4001".into(), 1.0),
            ("4002".into(), 1.0),
            ("other".into(), 1.0),
        ])
    );
    assert!(!m.text.contains("3123"), "{}", m.text);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_client_id_or_channel_name_reaches_the_metrics() {
    let s = start(|c| c.clients.max_connections_per_client = 1.try_into().unwrap()).await;
    let (mut ws, _) = s.ws("?client=zqxclient7731").await;
    ws.send(Message::text(
        r#"{"type":"subscribe","channel":"zqxchan4410"}"#,
    ))
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "subscribed");
    let (st, _) = s
        .post(
            "/api/publish",
            json!({"channel": "zqxchan4410", "data": "zqxdata"}),
        )
        .await;
    assert_eq!(st, 200);
    assert_eq!(next_json(&mut ws).await["type"], "message");
    assert!(s.ws_with("?client=zqxclient7731", &[]).await.is_err());
    let sse = s
        .http
        .get(format!(
            "http://{}/sse?client=zqxsse99&channel=zqxchan4410",
            s.client
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let during = scrape(&s).await;
    drop(sse);
    client_close(ws).await;
    let after = scrape_clean(&s).await;
    for m in [during, after] {
        assert!(m.get("tether_messages_delivered_total") >= 1.0);
        assert!(!m.text.contains("zqx"), "{}", m.text);
    }
    s.stop().await;
}

fn ids(page: &Value) -> Vec<String> {
    page["clients"]
        .as_array()
        .unwrap_or_else(|| panic!("{page}"))
        .iter()
        .map(|c| c["client_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_are_paged_in_id_order_each_once() {
    let s = start(|_| {}).await;
    let mut held = Vec::new();
    for id in ["e5", "a1", "c3", "b2", "d4", "c3"] {
        held.push(s.ws(&format!("?client={id}")).await.0);
    }
    let (mut seen, mut pages, mut next) = (Vec::new(), 0, None::<String>);
    loop {
        let path = match &next {
            Some(t) => format!("/api/clients?limit=2&page={t}"),
            None => "/api/clients?limit=2".to_owned(),
        };
        let (st, page) = s.get(&path).await;
        assert_eq!(st, 200, "{page}");
        assert!(ids(&page).len() <= 2, "{page}");
        for c in page["clients"].as_array().unwrap() {
            let want = if c["client_id"] == "c3" { 2 } else { 1 };
            assert_eq!(c["connections"], want, "{c}");
            assert_eq!(c["state"], "online", "{c}");
        }
        seen.extend(ids(&page));
        pages += 1;
        assert!(pages <= 5, "paging does not end");
        match page["next_page"].as_str() {
            Some(t) => next = Some(t.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, ["a1", "b2", "c3", "d4", "e5"]);
    assert_eq!(pages, 3);
    let (_, all) = s.get("/api/clients").await;
    assert_eq!(ids(&all), seen);
    assert!(all["next_page"].is_null(), "{all}");
    for ws in held {
        client_close(ws).await;
    }
    s.assert_clean().await;
    let (_, none) = s.get("/api/clients").await;
    assert_eq!(none, json!({"clients": [], "next_page": null}));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_in_offline_grace_is_listed_as_lingering() {
    let s = start(|c| c.clients.offline_grace_ms = 800).await;
    let (gone, _) = s.ws("?client=hank").await;
    let (here, _) = s.ws("?client=ivy").await;
    client_close(gone).await;
    let (st, page) = s.get("/api/clients").await;
    assert_eq!(st, 200);
    assert_eq!(
        page["clients"],
        json!([
            {"client_id": "hank", "state": "lingering", "connections": 0},
            {"client_id": "ivy", "state": "online", "connections": 1},
        ])
    );
    client_close(here).await;
    s.assert_clean().await;
    let (_, page) = s.get("/api/clients").await;
    assert_eq!(page["clients"], json!([]));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_paging_is_a_400_naming_the_field() {
    let s = start(|_| {}).await;
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("limit=-1", "limit"),
        ("page=zz", "page"),
        ("page=abc", "page"),
        ("page=ff", "page"),
        ("page=", "page"),
        ("sort=id", "sort"),
    ] {
        let (st, body) = s.get(&format!("/api/clients?{query}")).await;
        assert_eq!(st, 400, "{query}: {body}");
        assert_eq!(body["error"], "bad_request", "{query}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains(field), "{query}: {message}");
    }
    s.stop().await;
}
