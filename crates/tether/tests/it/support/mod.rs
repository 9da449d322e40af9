//! Test support: an in-process server on ephemeral ports, real clients over real
//! sockets, and the leak check every test ends with.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod cluster;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tether_server::{App, Config, Running};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct TestServer {
    pub running: Option<Running>,
    pub client: SocketAddr,
    pub api: SocketAddr,
    pub app: Arc<App>,
    pub http: reqwest::Client,
    /// `[api] key`, sent by `get`/`post` when set.
    pub key: String,
}

/// A config on ephemeral loopback ports with short shutdown phases.
pub fn base_config() -> Config {
    let mut cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    cfg.api.listen = "127.0.0.1:0".parse().unwrap();
    cfg.shutdown.pre_drain_ms = 0;
    cfg.shutdown.drain_window_ms = 0;
    cfg
}

pub async fn start(f: impl FnOnce(&mut Config)) -> TestServer {
    // RUST_LOG=debug shows the server's log in a failing test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut cfg = base_config();
    f(&mut cfg);
    let running = tether_server::Server::start(cfg, 20_000)
        .await
        .expect("server starts");
    TestServer {
        client: running.client_addr(),
        api: running.api_addr(),
        app: running.app().clone(),
        key: running.app().cfg.api.key.clone(),
        running: Some(running),
        http: reqwest::Client::new(),
    }
}

impl TestServer {
    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws{}", self.client, query)
    }

    /// Opens a WebSocket and reads its welcome.
    pub async fn ws(&self, query: &str) -> (Ws, Value) {
        let (mut ws, _) = tokio_tungstenite::connect_async(self.ws_url(query))
            .await
            .expect("ws connects");
        let welcome = next_json(&mut ws).await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        (ws, welcome)
    }

    /// Opens a WebSocket with extra request headers, returning the handshake result.
    pub async fn ws_with(
        &self,
        query: &str,
        headers: &[(&'static str, &str)],
    ) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
        let mut req = self.ws_url(query).into_client_request().unwrap();
        for (k, v) in headers {
            req.headers_mut().insert(*k, v.parse().unwrap());
        }
        tokio_tungstenite::connect_async(req)
            .await
            .map(|(ws, _)| ws)
    }

    pub fn api_url(&self, path: &str) -> String {
        // With `[tls]` the API is https: a test sets `http` to a client that trusts its
        // certificate.
        let scheme = if self.app.cfg.tls.enabled() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}{}", self.api, path)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let mut req = self.http.get(self.api_url(path));
        if !self.key.is_empty() {
            req = req.bearer_auth(&self.key);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let mut req = self.http.post(self.api_url(path)).json(&body);
        if !self.key.is_empty() {
            req = req.bearer_auth(&self.key);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn stats(&self) -> Value {
        self.get("/api/stats").await.1
    }

    /// Waits until nothing is left: no connection, client, task, pending socket or
    /// registry entry. Fails the test otherwise.
    pub async fn assert_clean(&self) {
        // On a listener that serves both clients and the API, the stats call is a
        // connection task itself.
        let own_call = u64::from(self.client == self.api);
        let mut last = Value::Null;
        for _ in 0..100 {
            last = self.stats().await;
            let zero = last["connections"]["ws"] == 0
                && last["connections"]["sse"] == 0
                && last["connections"]["proxy"] == 0
                && last["clients"] == 0
                && last["tasks"] == own_call
                && last["pending_handshakes"] == 0
                && self.app.registry.entries() == 0
                && self.app.registry.admitted() == 0
                && self.app.ip_limits().tracked_addresses() == 0;
            if zero {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "not clean: {last} entries={} admitted={} ips={}",
            self.app.registry.entries(),
            self.app.registry.admitted(),
            self.app.ip_limits().tracked_addresses()
        );
    }

    /// Drains and stops the server, then checks nothing is left.
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.begin_drain();
            tokio::time::timeout(Duration::from_secs(10), r.wait())
                .await
                .expect("server stops");
        }
    }
}

/// The next JSON text frame (skipping control frames), within 5 s.
pub async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("a frame within 5 s")
            .expect("stream open")
            .expect("no error");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON text"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Reads until the close frame: returns the `closing` announcement (if any) and the
/// close code.
pub async fn expect_close(ws: &mut Ws) -> (Option<Value>, u16) {
    let mut closing = None;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("closed within 10 s");
        match msg {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "closing" {
                    closing = Some(v);
                }
            }
            Some(Ok(Message::Close(f))) => {
                let code = f.map(|f| u16::from(f.code)).unwrap_or(1005);
                // Let tungstenite answer the close.
                let _ = tokio::time::timeout(Duration::from_secs(2), ws.next()).await;
                return (closing, code);
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("error before close frame: {e}"),
            None => panic!("stream ended without a close frame"),
        }
    }
}

/// Sends a ping frame and expects its pong: the connection is alive.
pub async fn assert_alive(ws: &mut Ws) {
    ws.send(Message::text(r#"{"type":"ping","ref":99}"#))
        .await
        .unwrap();
    let v = next_json(ws).await;
    assert_eq!(v, serde_json::json!({"type":"pong","ref":99}));
}

/// Closes from the client side and waits for the server's reply.
pub async fn client_close(mut ws: Ws) {
    let _ = ws.close(None).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Events collected from the bus until `quiet` passes with none.
pub async fn collect_events(
    rx: &mut tokio::sync::broadcast::Receiver<Arc<tether_protocol::LifecycleEvent>>,
    quiet: Duration,
) -> Vec<Arc<tether_protocol::LifecycleEvent>> {
    let mut out = Vec::new();
    while let Ok(Ok(ev)) = tokio::time::timeout(quiet, rx.recv()).await {
        out.push(ev);
    }
    out
}

/// `type:client` strings of events, for compact assertions.
pub fn kinds(events: &[Arc<tether_protocol::LifecycleEvent>]) -> Vec<String> {
    events.iter().map(|e| e.kind.as_str().to_owned()).collect()
}

/// Reads an SSE response body until `pred` matches the accumulated text or 5 s pass.
pub async fn read_sse_until(resp: &mut reqwest::Response, pred: impl Fn(&str) -> bool) -> String {
    let mut text = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(chunk)) = resp.chunk().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if pred(&text) {
                break;
            }
        }
    })
    .await;
    text
}

/// A raw TCP WebSocket peer: performs the upgrade by hand and then reads bytes
/// without ever answering anything (a peer that vanished or hangs).
pub async fn raw_ws(addr: SocketAddr, path_and_query: &str) -> TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).await.unwrap(),
            1,
            "headers: {}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// Reads from a raw socket until `needle` appears in what was received, or EOF, or
/// `limit` passes. Returns everything received.
pub async fn raw_read_until(s: &mut TcpStream, needle: &[u8], limit: Duration) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if got.windows(needle.len()).any(|w| w == needle) {
                break;
            }
        }
    })
    .await;
    got
}

/// A masked client text frame written by hand (payload under 126 bytes).
pub fn masked_text(payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mask = [0x5au8, 0xa5, 0x3c, 0xc3];
    let mut f = vec![0x81u8, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Whether `bytes` hold a close frame (server → client, unmasked) with `code`.
pub fn has_close(bytes: &[u8], code: u16) -> bool {
    let [hi, lo] = code.to_be_bytes();
    bytes
        .windows(4)
        .any(|w| w[0] == 0x88 && (w[1] & 0x7f) >= 2 && w[2] == hi && w[3] == lo)
}

/// Decodes a chunked body: the chunks' data, and whether the last chunk came.
pub fn dechunk(mut body: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    while let Some(eol) = body.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&body[..eol])
            .ok()
            .and_then(|h| usize::from_str_radix(h, 16).ok())
            .unwrap_or_else(|| panic!("bad chunk size line {:?}", &body[..eol.min(40)]));
        if size == 0 {
            return (out, true);
        }
        let data = &body[eol + 2..];
        if data.len() < size + 2 {
            break;
        }
        assert_eq!(
            &data[size..size + 2],
            b"\r\n",
            "chunk of {size} ends with CRLF"
        );
        out.extend_from_slice(&data[..size]);
        body = &data[size + 2..];
    }
    (out, false)
}
