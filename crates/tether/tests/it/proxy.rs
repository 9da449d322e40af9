//! Proxy mode against real upstreams: a WebSocket server in the test and an SSE
//! server in the test. Both legs live and die together; nothing is left behind.
// tungstenite's handshake callback returns its large error type by design.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)]

use crate::support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use support::*;
use tether_server::config::ProxyRoute;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// What the upstream saw.
#[derive(Default)]
struct Seen {
    headers: Mutex<Vec<(String, String, String)>>, // (uri, header, value)
    closes: Mutex<Vec<Option<u16>>>,
    open: AtomicUsize,
    accepted: AtomicUsize,
}

/// An upstream WebSocket server: greets with "hello", echoes, and obeys commands:
/// `close:<code>` closes with that code, `reset` drops the TCP connection with RST.
async fn ws_upstream() -> (SocketAddr, Arc<Seen>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = l.accept().await else {
                return;
            };
            let seen = s2.clone();
            tokio::spawn(async move {
                let _ = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO));
                let cb = |req: &Request, mut resp: Response| {
                    let uri = req.uri().to_string();
                    for (k, v) in req.headers() {
                        seen.headers.lock().unwrap().push((
                            uri.clone(),
                            k.to_string(),
                            v.to_str().unwrap_or("").to_owned(),
                        ));
                    }
                    if let Some(p) = req.headers().get("sec-websocket-protocol") {
                        let first = p
                            .to_str()
                            .unwrap()
                            .split(',')
                            .next()
                            .unwrap()
                            .trim()
                            .to_owned();
                        resp.headers_mut()
                            .insert("sec-websocket-protocol", first.parse().unwrap());
                    }
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(sock, cb).await else {
                    return;
                };
                seen.accepted.fetch_add(1, Ordering::SeqCst);
                seen.open.fetch_add(1, Ordering::SeqCst);
                let _ = ws.send(Message::text("hello")).await;
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(t))) if t.as_str().starts_with("close:") => {
                            let code: u16 = t.as_str()[6..].parse().unwrap();
                            let _ = ws
                                .close(Some(CloseFrame {
                                    code: CloseCode::from(code),
                                    reason: "bye".into(),
                                }))
                                .await;
                            while let Some(Ok(_)) = ws.next().await {}
                            break;
                        }
                        Some(Ok(Message::Text(t))) if t.as_str() == "reset" => break, // drop: RST (linger 0)
                        Some(Ok(Message::Text(t))) if t.as_str() == "flood" => {
                            // Push until the proxy stops reading (bounded: 2,000 x 64 KiB).
                            let big = "f".repeat(60 * 1024);
                            for _ in 0..2000 {
                                let sent = tokio::time::timeout(
                                    Duration::from_secs(5),
                                    ws.send(Message::text(big.clone())),
                                )
                                .await;
                                if !matches!(sent, Ok(Ok(()))) {
                                    break;
                                }
                            }
                        }
                        Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                            if ws.send(m).await.is_err() {
                                break;
                            }
                        }
                        Some(Ok(Message::Close(f))) => {
                            seen.closes
                                .lock()
                                .unwrap()
                                .push(f.map(|f| u16::from(f.code)));
                            while let Some(Ok(_)) = ws.next().await {}
                            break;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => {
                            seen.closes.lock().unwrap().push(None);
                            break;
                        }
                    }
                }
                seen.open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, seen)
}

fn route(path: &str, upstream: String) -> ProxyRoute {
    ProxyRoute {
        path: path.into(),
        upstream,
        connect_timeout_ms: 1000.try_into().unwrap(),
        upstream_idle_timeout_ms: 0,
    }
}

async fn proxied(s: &TestServer, q: &str, headers: &[(&'static str, &str)]) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/chat{q}", s.client)
        .into_client_request()
        .unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().unwrap());
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    // The upstream's greeting comes first: Tether injects no welcome.
    let first = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first, Message::text("hello"));
    ws
}

/// A raw client asks the upstream to reset its leg, then reads the close Tether sends.
async fn reset_seen_as_1014(s: &TestServer, client: &str) -> bool {
    use tokio::io::AsyncWriteExt;
    let mut raw = raw_ws(s.client, &format!("/chat?client={client}")).await;
    let _ = raw_read_until(&mut raw, b"hello", Duration::from_secs(5)).await;
    raw.write_all(&masked_text(b"reset")).await.unwrap();
    let got = raw_read_until(&mut raw, &[0x03, 0xf6], Duration::from_secs(5)).await;
    has_close(&got, 1014)
}

async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("closed in time")
        {
            Some(Ok(Message::Close(f))) => {
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.next()).await;
                return f.map(|f| u16::from(f.code));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("error instead of a close frame: {e}"),
            None => panic!("no close frame"),
        }
    }
}

async fn wait_upstream_idle(seen: &Seen) {
    for _ in 0..100 {
        if seen.open.load(Ordering::SeqCst) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!(
        "upstream still has {} open",
        seen.open.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn relays_verbatim_with_clean_headers_and_shows_in_the_registry() {
    let (up, seen) = ws_upstream().await;
    let s = start(|c| c.proxy.routes = vec![route("/chat", format!("ws://{up}/ws?fixed=1"))]).await;
    let mut events = s.app.registry.events().subscribe();
    let mut ws = proxied(
        &s,
        "?client=alice&token=secret&room=5",
        &[
            ("x-tether-client-id", "mallory"),
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6"),
            ("cookie", "session=abc"),
            ("origin", "http://app.example"),
            ("sec-websocket-protocol", "chat.v2"),
        ],
    )
    .await;
    ws.send(Message::text("ping me")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("ping me"));
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap(),
        Message::binary(vec![0u8, 1, 2, 255])
    );
    let (_, c) = s.get("/api/clients/alice").await;
    let conn = &c["connections"][0];
    let opened = collect_events(&mut events, Duration::from_millis(100)).await;
    let opened = opened
        .iter()
        .find(|e| e.kind == tether_protocol::EventType::ConnectionOpened)
        .expect("opened");
    assert_eq!(
        opened.upstream.as_deref(),
        Some(format!("ws://{up}/ws?fixed=1").as_str()),
        "events name the upstream"
    );
    assert_eq!(
        (conn["transport"].as_str(), conn["upstream"].as_str()),
        (
            Some("proxy"),
            Some(format!("ws://{up}/ws?fixed=1").as_str())
        )
    );
    let h = seen.headers.lock().unwrap().clone();
    let get = |name: &str| {
        h.iter()
            .filter(|(_, k, _)| k == name)
            .map(|(_, _, v)| v.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(get("x-tether-client-id"), ["alice"]);
    assert_eq!(get("x-tether-conn-id"), [conn["conn_id"].as_str().unwrap()]);
    assert_eq!(get("x-forwarded-for"), ["127.0.0.1"]);
    assert!(get("forwarded").is_empty());
    assert_eq!(get("cookie"), ["session=abc"]);
    assert_eq!(get("origin"), ["http://app.example"]);
    assert_eq!(get("sec-websocket-protocol"), ["chat.v2"]);
    let uri = &h[0].0;
    assert!(
        uri.contains("room=5") && uri.contains("fixed=1") && !uri.contains("secret"),
        "{uri}"
    );
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4444),
        reason: "done".into(),
    }))
    .await
    .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.next()).await;
    wait_upstream_idle(&seen).await;
    assert_eq!(
        seen.closes.lock().unwrap().clone(),
        [Some(4444)],
        "the client's code reaches the upstream"
    );
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_close_code_and_reset_reach_the_client() {
    let (up, seen) = ws_upstream().await;
    let s = start(|c| c.proxy.routes = vec![route("/chat", format!("ws://{up}/ws"))]).await;
    let mut ws = proxied(&s, "?client=b", &[]).await;
    ws.send(Message::text("close:4123")).await.unwrap();
    assert_eq!(close_code(&mut ws).await, Some(4123));
    // tungstenite clients refuse 1014 (IANA's "bad gateway") as a protocol error, so a
    // raw client reads the close frame.
    assert!(reset_seen_as_1014(&s, "b").await);
    wait_upstream_idle(&seen).await;
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn client_vanishing_and_kicks_close_the_upstream() {
    let (up, seen) = ws_upstream().await;
    let s = start(|c| c.proxy.routes = vec![route("/chat", format!("ws://{up}/ws"))]).await;
    let ws = proxied(&s, "?client=c", &[]).await;
    drop(ws); // abrupt: no close frame
    wait_upstream_idle(&seen).await;
    let mut ws = proxied(&s, "?client=c", &[]).await;
    let (_, r) = s.post("/api/disconnect", json!({"client_id": "c"})).await;
    assert_eq!(r["closed"], 1);
    assert_eq!(close_code(&mut ws).await, Some(1001));
    wait_upstream_idle(&seen).await;
    assert_eq!(
        seen.closes.lock().unwrap().clone(),
        [Some(1001), Some(1001)]
    );
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_upstream_is_a_502_and_leaves_nothing() {
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let s = start(|c| {
        c.proxy.routes = vec![route("/chat", format!("ws://{dead}/ws"))];
        c.clients.max_connections_per_client = 1.try_into().unwrap();
        c.clients.on_client_limit = tether_core::ClientLimitPolicy::ReplaceOldest;
    })
    .await;
    let (mut existing, _) = s.ws("?client=d").await;
    match tokio_tungstenite::connect_async(format!("ws://{}/chat?client=d", s.client)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status().as_u16(), 502);
            let v: serde_json::Value =
                serde_json::from_slice(r.body().as_deref().unwrap()).unwrap();
            assert_eq!(v["error"], "upstream_unavailable");
        }
        other => panic!("expected 502, got {:?}", other.map(|_| ())),
    }
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/chat?client=d&refusal=close", s.client))
            .await
            .unwrap();
    let (closing, code) = expect_close(&mut ws).await;
    assert_eq!(
        (code, closing.unwrap()["error"].as_str()),
        (4502, Some("upstream_unavailable"))
    );
    // The existing connection was not replaced by a connection that never came.
    assert_alive(&mut existing).await;
    client_close(existing).await;
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_cycles_with_random_closing_sides_leave_nothing() {
    let (up, seen) = ws_upstream().await;
    let s = start(|c| c.proxy.routes = vec![route("/chat", format!("ws://{up}/ws"))]).await;
    let mut rng = fastrand::Rng::with_seed(7);
    for i in 0..1000u32 {
        let mut ws = proxied(&s, &format!("?client=cyc{}", i % 50), &[]).await;
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text(format!("m{i}"))
        );
        match rng.u8(0..4) {
            0 => {
                ws.close(None).await.unwrap();
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.next()).await;
            }
            1 => drop(ws),
            2 => {
                ws.send(Message::text("close:4000")).await.unwrap();
                assert_eq!(close_code(&mut ws).await, Some(4000));
            }
            _ => {
                drop(ws);
                assert!(reset_seen_as_1014(&s, &format!("cyc{}", i % 50)).await);
            }
        }
    }
    wait_upstream_idle(&seen).await;
    assert!(seen.accepted.load(Ordering::SeqCst) >= 1000);
    s.assert_clean().await;
}

/// An upstream SSE server: streams `count` events, one every 20 ms, then holds the
/// stream open; counts open streams.
async fn sse_upstream(count: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let o2 = open.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = l.accept().await else {
                return;
            };
            let open = o2.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                open.fetch_add(1, Ordering::SeqCst);
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\r\n";
                let mut ok = sock.write_all(head.as_bytes()).await.is_ok();
                for i in 0..count {
                    if !ok {
                        break;
                    }
                    ok = sock
                        .write_all(
                            format!("id: {i}\nevent: tick\ndata: {{\"n\":{i}}}\n\n").as_bytes(),
                        )
                        .await
                        .is_ok();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // Hold until the proxy goes away.
                if ok {
                    while let Ok(n) = sock.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                }
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open)
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_route_relays_verbatim_and_a_leaving_client_cancels_the_upstream() {
    let (up, open) = sse_upstream(3).await;
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let s = start(|c| {
        c.proxy.routes = vec![
            route("/feed", format!("http://{up}/events")),
            route("/gone", format!("http://{dead}/x")),
        ];
    })
    .await;
    let mut r = s
        .http
        .get(format!("http://{}/feed?client=e", s.client))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = read_sse_until(&mut r, |t| t.contains("data: {\"n\":2}")).await;
    assert_eq!(text, "id: 0\nevent: tick\ndata: {\"n\":0}\n\nid: 1\nevent: tick\ndata: {\"n\":1}\n\nid: 2\nevent: tick\ndata: {\"n\":2}\n\n");
    assert_eq!(s.stats().await["connections"]["proxy"], 1);
    drop(r);
    for _ in 0..100 {
        if open.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        open.load(Ordering::SeqCst),
        0,
        "the upstream request was cancelled"
    );
    let r = s
        .http
        .get(format!("http://{}/gone?client=e", s.client))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    s.assert_clean().await;
}

/// The upstream is another `tether` process; SIGKILL it mid-connection and the
/// client's leg ends with 1014, the registry empty.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_process_killed_closes_the_client_with_1014() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let api = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--api-listen",
            &format!("127.0.0.1:{api}"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let s =
        start(|c| c.proxy.routes = vec![route("/chat", format!("ws://127.0.0.1:{port}/ws"))]).await;
    let mut raw = raw_ws(s.client, "/chat?client=victim").await;
    // The upstream's own welcome arrives through the relay.
    let hello = raw_read_until(&mut raw, b"\"type\":\"welcome\"", Duration::from_secs(5)).await;
    assert!(String::from_utf8_lossy(&hello).contains("\"client_id\":\"victim\""));
    assert_eq!(s.stats().await["connections"]["proxy"], 1);
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    let got = raw_read_until(&mut raw, &[0x03, 0xf6], Duration::from_secs(5)).await;
    assert!(has_close(&got, 1014), "client closed with 1014");
    drop(raw);
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_close_both_legs_with_1008() {
    let (up, seen) = ws_upstream().await;
    let s = start(|c| {
        c.proxy.routes = vec![route("/chat", format!("ws://{up}/ws"))];
        c.limits.max_connection_lifetime_ms = 300;
    })
    .await;
    let mut ws = proxied(&s, "?client=l", &[]).await;
    assert_eq!(close_code(&mut ws).await, Some(1008));
    wait_upstream_idle(&seen).await;
    assert_eq!(seen.closes.lock().unwrap().clone(), [Some(1008)]);
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_sse_upstream_is_closed_after_its_idle_timeout() {
    let (up, open) = sse_upstream(1).await;
    let s = start(|c| {
        let mut r = route("/feed", format!("http://{up}/events"));
        r.upstream_idle_timeout_ms = 300;
        c.proxy.routes = vec![r];
    })
    .await;
    let mut rx = s.app.registry.events().subscribe();
    let mut r = s
        .http
        .get(format!("http://{}/feed?client=quiet", s.client))
        .send()
        .await
        .unwrap();
    let text = read_sse_until(&mut r, |t| t.contains("data: {\"n\":0}")).await;
    assert!(text.contains("event: tick"));
    let started = std::time::Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = r.chunk().await {}
    })
    .await;
    assert!(end.is_ok(), "the stream ended");
    assert!(started.elapsed() < Duration::from_secs(3));
    let ev = collect_events(&mut rx, Duration::from_millis(200)).await;
    let closed = ev
        .iter()
        .find(|e| e.kind == tether_protocol::EventType::ConnectionClosed)
        .unwrap();
    assert_eq!(closed.code, Some(1014));
    for _ in 0..100 {
        if open.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open.load(Ordering::SeqCst), 0);
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_closed_as_a_slow_consumer() {
    use tokio::io::AsyncWriteExt;
    let (up, seen) = ws_upstream().await;
    let s = start(|c| {
        c.proxy.routes = vec![route("/chat", format!("ws://{up}/ws"))];
        c.heartbeat.timeout_ms = 400.try_into().unwrap();
    })
    .await;
    let mut rx = s.app.registry.events().subscribe();
    let mut raw = raw_ws(s.client, "/chat?client=sloth").await;
    raw.write_all(&masked_text(b"flood")).await.unwrap();
    // Never read: the relay's writes to this client stall past the heartbeat timeout.
    assert_eq!(
        closed_code(&mut rx).await,
        Some(4008),
        "closed as a slow consumer"
    );
    wait_upstream_idle(&seen).await;
    assert_eq!(
        seen.closes.lock().unwrap().clone(),
        [Some(1001)],
        "the upstream leg is closed too"
    );
    drop(raw);
    s.assert_clean().await;
}

/// The connection's `connection.closed` code, waited for on the event bus.
async fn closed_code(
    rx: &mut tokio::sync::broadcast::Receiver<Arc<tether_protocol::LifecycleEvent>>,
) -> Option<u16> {
    for _ in 0..100 {
        let ev = collect_events(rx, Duration::from_millis(100)).await;
        if let Some(e) = ev
            .iter()
            .find(|e| e.kind == tether_protocol::EventType::ConnectionClosed)
        {
            return e.code;
        }
    }
    panic!("no connection.closed within 10 s");
}

/// Drift fixed by the one driver: a proxied WebSocket's token expires like a `/ws`
/// one, closing both legs with 1008 (4003 recorded).
#[tokio::test(flavor = "multi_thread")]
async fn a_proxied_token_expiry_closes_both_legs_with_1008() {
    const SECRET: &str = "proxy-secret-proxy-secret-proxy-secret";
    let (up, seen) = ws_upstream().await;
    let s = start(|c| {
        c.proxy.routes = vec![route("/chat", format!("ws://{up}/ws"))];
        c.auth.mode = tether_server::config::AuthMode::Jwt;
        c.auth.hs256_secret = SECRET.into();
        c.auth.leeway_ms = 0;
    })
    .await;
    let mut rx = s.app.registry.events().subscribe();
    let token = tether_server::auth::mint_hs256(SECRET, "exp", &[], 1).unwrap();
    let mut ws = proxied(&s, &format!("?token={token}"), &[]).await;
    assert_eq!(close_code(&mut ws).await, Some(1008));
    assert_eq!(closed_code(&mut rx).await, Some(4003));
    wait_upstream_idle(&seen).await;
    assert_eq!(seen.closes.lock().unwrap().clone(), [Some(1008)]);
    s.assert_clean().await;
}

/// Drift fixed by the one driver: an SSE route obeys
/// `limits.max_connection_lifetime_ms` (4005 recorded; the stream ends).
#[tokio::test(flavor = "multi_thread")]
async fn an_sse_route_obeys_the_connection_lifetime() {
    let (up, open) = sse_upstream(1).await;
    let s = start(|c| {
        c.proxy.routes = vec![route("/feed", format!("http://{up}/events"))];
        c.limits.max_connection_lifetime_ms = 300;
    })
    .await;
    let mut rx = s.app.registry.events().subscribe();
    let mut r = s
        .http
        .get(format!("http://{}/feed?client=old", s.client))
        .send()
        .await
        .unwrap();
    read_sse_until(&mut r, |t| t.contains("data: {\"n\":0}")).await;
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = r.chunk().await {}
    })
    .await;
    assert!(end.is_ok(), "the stream ended");
    assert_eq!(closed_code(&mut rx).await, Some(4005));
    for _ in 0..100 {
        if open.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(open.load(Ordering::SeqCst), 0, "the upstream request ended");
    s.assert_clean().await;
}

/// Attack 3: a proxied client's frames count against `limits.max_inbound_per_sec`;
/// past it both legs are closed with 1008 (4029 recorded).
#[tokio::test(flavor = "multi_thread")]
async fn proxied_frames_over_the_inbound_rate_close_both_legs_with_1008() {
    let (up, seen) = ws_upstream().await;
    let s = start(|c| {
        c.proxy.routes = vec![route("/chat", format!("ws://{up}/ws"))];
        c.limits.max_inbound_per_sec = 5.try_into().unwrap();
    })
    .await;
    let mut rx = s.app.registry.events().subscribe();
    let mut ws = proxied(&s, "?client=chatty", &[]).await;
    for i in 0..30 {
        if ws.send(Message::text(format!("m{i}"))).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut ws).await, Some(1008));
    assert_eq!(closed_code(&mut rx).await, Some(4029));
    wait_upstream_idle(&seen).await;
    assert_eq!(seen.closes.lock().unwrap().clone(), [Some(1008)]);
    s.assert_clean().await;
}

/// Attack 9: a proxied client that answers no ping is sent a close frame (1008),
/// as `/ws` sends `closing` and 4000, instead of a silent drop.
#[tokio::test(flavor = "multi_thread")]
async fn a_proxied_client_that_misses_heartbeats_gets_a_close_frame() {
    let (up, seen) = ws_upstream().await;
    let s = start(|c| {
        c.proxy.routes = vec![route("/chat", format!("ws://{up}/ws"))];
        c.heartbeat.interval_ms = 200.try_into().unwrap();
        c.heartbeat.timeout_ms = 300.try_into().unwrap();
    })
    .await;
    let mut rx = s.app.registry.events().subscribe();
    // A raw socket answers no ping.
    let mut raw = raw_ws(s.client, "/chat?client=mute").await;
    let got = raw_read_until(&mut raw, &[0x03, 0xf0], Duration::from_secs(5)).await;
    assert!(
        has_close(&got, 1008),
        "a 1008 close frame reached the client"
    );
    assert_eq!(closed_code(&mut rx).await, Some(4000));
    drop(raw);
    wait_upstream_idle(&seen).await;
    assert_eq!(seen.closes.lock().unwrap().clone(), [Some(1001)]);
    s.assert_clean().await;
}

/// RFC 9110 7.6.1: a header the client's `Connection` names (in any case, in a list,
/// across several `Connection` headers) is hop-by-hop and does not reach the upstream.
#[tokio::test(flavor = "multi_thread")]
async fn headers_named_in_connection_do_not_reach_the_upstream() {
    let (up, seen) = ws_upstream().await;
    let s = start(|c| c.proxy.routes = vec![route("/chat", format!("ws://{up}/ws"))]).await;
    // By hand: tungstenite sends one `Connection` header only.
    let mut raw = TcpStream::connect(s.client).await.unwrap();
    let req = format!(
        "GET /chat?client=conn HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade, X-Drop-A\r\nConnection: x-drop-b , X-DROP-C\r\n\
         X-Drop-A: 1\r\nX-Drop-B: 2\r\nX-Drop-C: 3\r\nX-Keep: 4\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        s.client
    );
    raw.write_all(req.as_bytes()).await.unwrap();
    let got = raw_read_until(&mut raw, b"hello", Duration::from_secs(5)).await;
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert!(got.ends_with(b"hello"), "the upstream greeted");
    let names: Vec<String> = seen
        .headers
        .lock()
        .unwrap()
        .iter()
        .map(|(_, k, _)| k.clone())
        .collect();
    assert!(names.iter().any(|k| k == "x-keep"), "{names:?}");
    for gone in ["x-drop-a", "x-drop-b", "x-drop-c"] {
        assert!(
            !names.iter().any(|k| k == gone),
            "{gone} reached the upstream: {names:?}"
        );
    }
    drop(raw);
    wait_upstream_idle(&seen).await;
    s.assert_clean().await;
}

/// SPEC section 9: nothing of Tether's is injected into a proxied connection. A
/// direct message to its client reaches none of its proxied connections, and the
/// answer does not count them.
#[tokio::test(flavor = "multi_thread")]
async fn a_direct_message_is_not_injected_into_a_proxied_connection() {
    let (up, seen) = ws_upstream().await;
    let s = start(|c| c.proxy.routes = vec![route("/chat", format!("ws://{up}/ws"))]).await;
    let mut ws = proxied(&s, "?client=relayed", &[]).await;
    let (status, body) = s
        .post(
            "/api/send",
            json!({"client_id": "relayed", "data": {"x": 1}}),
        )
        .await;
    assert_eq!((status, body), (200, json!({"connections": 0})));
    ws.send(Message::text("echo me")).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next, Message::text("echo me"), "only the upstream's frames");
    ws.close(None).await.unwrap();
    wait_upstream_idle(&seen).await;
    s.assert_clean().await;
}
