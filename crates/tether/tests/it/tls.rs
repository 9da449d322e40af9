//! TLS (`[tls] cert_file`, `key_file`): wss:// and https:// on the client listener,
//! https:// on the API, HTTP/2 by ALPN for SSE (many streams on one connection),
//! WebSocket on HTTP/1.1, reload without dropping open connections, clear startup
//! errors, and the handshake deadline covering the TLS handshake.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// One self-signed certificate for 127.0.0.1 and localhost.
struct Cert {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

fn new_cert() -> Cert {
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("rcgen");
    Cert {
        cert_pem: ck.cert.pem(),
        key_pem: ck.key_pair.serialize_pem(),
        der: ck.cert.der().to_vec(),
    }
}

/// A fresh directory for one test's PEM files.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tether-tls-{name}-{}-{}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `cert` as `cert.pem` and `key.pem` in `dir`; returns both paths.
fn write_cert(dir: &Path, cert: &Cert) -> (String, String) {
    let c = dir.join("cert.pem");
    let k = dir.join("key.pem");
    std::fs::write(&c, &cert.cert_pem).unwrap();
    std::fs::write(&k, &cert.key_pem).unwrap();
    (c.display().to_string(), k.display().to_string())
}

/// A server with TLS from `cert` whose `http` client (used for the API and
/// `assert_clean`) trusts it.
async fn start_tls(
    dir: &Path,
    cert: &Cert,
    f: impl FnOnce(&mut tether_server::Config),
) -> TestServer {
    let (c, k) = write_cert(dir, cert);
    let mut s = start(|cfg| {
        cfg.tls.cert_file = c;
        cfg.tls.key_file = k;
        f(cfg);
    })
    .await;
    s.http = https_client(cert);
    s
}

/// A reqwest client trusting only `cert`, offering h2 and http/1.1 by ALPN.
fn https_client(cert: &Cert) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert_pem.as_bytes()).unwrap())
        .build()
        .unwrap()
}

/// A TLS connection to `addr` trusting only `trust`, offering `alpn`.
async fn tls_connect(
    addr: SocketAddr,
    trust: &Cert,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(trust.der.clone()))
        .expect("a usable root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    connector.connect(name, tcp).await
}

/// The certificate the server presented.
fn peer_cert(stream: &TlsStream<TcpStream>) -> Vec<u8> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .expect("the server presented a certificate")
}

type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// A wss:// connection (ALPN http/1.1, as a browser opening a WebSocket does) and
/// its welcome; also returns the certificate the server presented.
async fn wss(addr: SocketAddr, trust: &Cert, query: &str) -> (Wss, Value, Vec<u8>) {
    let tls = tls_connect(addr, trust, &[b"http/1.1"])
        .await
        .expect("TLS handshake");
    let presented = peer_cert(&tls);
    let url = format!("wss://{addr}/ws{query}");
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("WebSocket handshake over TLS");
    assert_eq!(resp.status(), 101);
    let welcome = next_json_of(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome, presented)
}

async fn next_json_of<S: AsyncRead + AsyncWrite + Unpin>(ws: &mut WebSocketStream<S>) -> Value {
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

async fn close_wss(mut ws: Wss) {
    let _ = ws.close(None).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

#[tokio::test]
async fn wss_and_https_sse_over_http2() {
    let dir = temp_dir("basic");
    let cert = new_cert();
    let s = start_tls(&dir, &cert, |_| {}).await;

    // WebSocket over TLS: HTTP/1.1, welcome, ping/pong.
    let (mut ws, welcome, presented) = wss(s.client, &cert, "?client=alice").await;
    assert_eq!(welcome["client_id"], "alice");
    assert_eq!(presented, cert.der);
    ws.send(Message::text(r#"{"type":"ping","ref":7}"#))
        .await
        .unwrap();
    assert_eq!(next_json_of(&mut ws).await, json!({"type":"pong","ref":7}));

    // SSE over https: ALPN picks HTTP/2.
    let http = https_client(&cert);
    let mut resp = http
        .get(format!("https://{}/sse?client=bob&channel=news", s.client))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let text = read_sse_until(&mut resp, |t| t.contains("event: welcome")).await;
    assert!(text.contains("event: welcome"), "{text}");
    assert!(text.contains("\"client_id\":\"bob\""), "{text}");

    // A publish through the https API reaches both.
    let (status, body) = s
        .post("/api/publish", json!({"channel":"news","data":{"n":1}}))
        .await;
    assert_eq!(status, 200, "{body}");
    let text = read_sse_until(&mut resp, |t| t.contains("event: message")).await;
    assert!(text.contains("{\"n\":1}"), "{text}");

    // The API answers over HTTP/2 too (its Host check reads :authority).
    let r = s.http.get(s.api_url("/api/stats")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    drop(r.bytes().await);

    // A WebSocket request arriving on an h2 connection is not upgraded.
    let r = http
        .get(format!("https://{}/ws?client=carol", s.client))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 426);
    drop(r.bytes().await);

    // HTTP/1.1 over TLS keeps the one-request-per-socket rule.
    let h1 = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert_pem.as_bytes()).unwrap())
        .http1_only()
        .build()
        .unwrap();
    let r = h1
        .get(format!("https://{}/healthz", s.client))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["connection"], "close");
    drop(r.bytes().await);

    drop(resp);
    drop(http);
    drop(h1);
    close_wss(ws).await;
    s.assert_clean().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn several_sse_streams_share_one_http2_connection() {
    let dir = temp_dir("multi");
    let cert = new_cert();
    // A short deadline so the idle connection is sent GOAWAY quickly at the end.
    let s = start_tls(&dir, &cert, |cfg| {
        cfg.limits.handshake_timeout_ms = std::num::NonZeroU64::new(300).unwrap()
    })
    .await;
    let http = https_client(&cert);
    let mut streams = Vec::new();
    for i in 0..3 {
        let mut resp = http
            .get(format!("https://{}/sse?client=u{i}&channel=room", s.client))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        let text = read_sse_until(&mut resp, |t| t.contains("event: welcome")).await;
        assert!(text.contains("event: welcome"), "{text}");
        streams.push(resp);
    }
    let stats = s.stats().await;
    assert_eq!(stats["connections"]["sse"], 3, "{stats}");
    // Three SSE connection tasks and one socket task: the streams share a socket.
    assert_eq!(stats["tasks"], 4, "{stats}");
    assert_eq!(stats["pending_handshakes"], 0, "{stats}");

    let (status, body) = s
        .post("/api/publish", json!({"channel":"room","data":"hi"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["subscribers"], 3, "{body}");
    for resp in &mut streams {
        let text = read_sse_until(resp, |t| t.contains("event: message")).await;
        assert!(text.contains("\"hi\""), "{text}");
    }

    // The streams end; the connection stays with the client but, idle, is sent
    // GOAWAY and closes, so nothing is left even with the client still alive.
    drop(streams);
    s.assert_clean().await;
    drop(http);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn reload_keeps_open_connections_and_presents_the_new_certificate() {
    let dir = temp_dir("reload");
    let old = new_cert();
    let mut s = start_tls(&dir, &old, |_| {}).await;
    let (mut before, _, presented) = wss(s.client, &old, "?client=early").await;
    assert_eq!(presented, old.der);

    let new = new_cert();
    assert_ne!(new.der, old.der);
    let (_, key_file) = write_cert(&dir, &new);
    let reloaded = s.running.as_ref().unwrap().reload_tls();
    assert!(matches!(reloaded, Ok(true)), "{reloaded:?}");
    s.http = https_client(&new);

    // The connection opened before the reload is alive.
    before
        .send(Message::text(r#"{"type":"ping","ref":1}"#))
        .await
        .unwrap();
    assert_eq!(
        next_json_of(&mut before).await,
        json!({"type":"pong","ref":1})
    );

    // A new handshake presents the new certificate...
    let (after, _, presented) = wss(s.client, &new, "?client=late").await;
    assert_eq!(presented, new.der);
    assert_ne!(presented, old.der);
    // ...and a client trusting only the old one is refused.
    assert!(tls_connect(s.client, &old, &[b"http/1.1"]).await.is_err());
    // The API listener too.
    assert!(tls_connect(s.api, &new, &[b"h2"]).await.is_ok());

    // A reload from a bad key file fails naming it and changes nothing.
    std::fs::write(&key_file, "not a key\n").unwrap();
    let err = s.running.as_ref().unwrap().reload_tls().unwrap_err();
    assert!(
        matches!(&err, tether_server::tls::TlsError::NoKey(f) if *f == key_file),
        "{err:?}"
    );
    assert!(err.to_string().contains(&key_file), "{err}");
    let tls = tls_connect(s.client, &new, &[b"http/1.1"]).await.unwrap();
    assert_eq!(peer_cert(&tls), new.der);
    drop(tls);

    close_wss(before).await;
    close_wss(after).await;
    s.assert_clean().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn bad_certificate_files_are_startup_errors_naming_the_file() {
    let dir = temp_dir("bad");
    let cert = new_cert();
    let other = new_cert();
    let (cert_file, key_file) = write_cert(&dir, &cert);
    let start_err = |cert_file: String, key_file: String| async move {
        let mut cfg = base_config();
        cfg.tls.cert_file = cert_file;
        cfg.tls.key_file = key_file;
        tether_server::Server::start(cfg, 20_000)
            .await
            .err()
            .map(|e| e.to_string())
            .expect("startup refused")
    };

    // A key file with no key in it.
    std::fs::write(
        &key_file,
        "-----BEGIN NOTHING-----\n-----END NOTHING-----\n",
    )
    .unwrap();
    let err = start_err(cert_file.clone(), key_file.clone()).await;
    assert!(
        err.contains(&key_file) && err.contains("tls.key_file"),
        "{err}"
    );

    // A missing key file.
    let missing = dir.join("missing.pem").display().to_string();
    let err = start_err(cert_file.clone(), missing.clone()).await;
    assert!(err.contains(&missing), "{err}");

    // A key that is not the certificate's.
    std::fs::write(&key_file, &other.key_pem).unwrap();
    let err = start_err(cert_file.clone(), key_file.clone()).await;
    assert!(err.contains(&key_file), "{err}");

    // A certificate file with no certificate in it.
    std::fs::write(&key_file, &cert.key_pem).unwrap();
    std::fs::write(&cert_file, "garbage\n").unwrap();
    let err = start_err(cert_file.clone(), key_file.clone()).await;
    assert!(
        err.contains(&cert_file) && err.contains("tls.cert_file"),
        "{err}"
    );

    // One file without the other is a configuration error.
    let mut cfg = base_config();
    cfg.tls.cert_file = cert_file.clone();
    let err = cfg
        .validate()
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("tls.key_file"), "{err}");

    // Nothing was left listening: a good start on the same files still works.
    write_cert(&dir, &cert);
    let s = start_tls(&dir, &cert, |_| {}).await;
    s.assert_clean().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_tls_handshake_counts_inside_the_handshake_deadline() {
    let dir = temp_dir("slow");
    let cert = new_cert();
    let s = start_tls(&dir, &cert, |cfg| {
        cfg.limits.handshake_timeout_ms = std::num::NonZeroU64::new(300).unwrap()
    })
    .await;

    // A socket that never starts TLS is pending, then dropped at the deadline.
    let mut raw = TcpStream::connect(s.client).await.unwrap();
    let mut pending = Value::Null;
    for _ in 0..50 {
        pending = s.stats().await["pending_handshakes"].clone();
        if pending == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pending, 1);
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3), raw.read(&mut buf))
        .await
        .expect("dropped within the deadline");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");

    // One that finishes TLS but sends no request is dropped too (HTTP/1.1 and h2).
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let mut tls = tls_connect(s.client, &cert, &[alpn]).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(3), async {
            let mut all = Vec::new();
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return all,
                    Ok(n) => all.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await
        .expect("dropped within the deadline");
        if alpn == b"http/1.1" {
            assert!(got.is_empty(), "HTTP/1.1: closed without a word: {got:?}");
        } else {
            // h2: the server's preface (SETTINGS, perhaps WINDOW_UPDATE or GOAWAY)
            // and nothing else, then the connection is cut at the deadline.
            let kinds = h2_frame_types(&got);
            assert_eq!(kinds.first(), Some(&0x4), "h2: SETTINGS first: {kinds:?}");
            assert!(
                kinds.iter().all(|k| [0x4, 0x7, 0x8].contains(k)),
                "{kinds:?}"
            );
        }
    }

    s.assert_clean().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Proxy routes to TLS upstreams: `wss://` and `https://`, verified against the
/// system trust store (here `SSL_CERT_FILE`, holding the upstream's certificate); an
/// upstream whose certificate is not trusted is `upstream_unavailable`.
#[tokio::test(flavor = "multi_thread")]
async fn proxy_routes_reach_wss_and_https_upstreams() {
    let dir = temp_dir("upstream");
    let trusted = new_cert();
    // The proxy's HTTP client pools its idle HTTP/2 connection to the upstream; a short
    // handshake timeout makes the upstream send GOAWAY soon, so the check below ends.
    let upstream = start_tls(&dir, &trusted, |c| {
        c.limits.handshake_timeout_ms = 1000.try_into().unwrap()
    })
    .await;
    let other_dir = temp_dir("untrusted");
    let untrusted = start_tls(&other_dir, &new_cert(), |_| {}).await;
    let roots = dir.join("roots.pem");
    std::fs::write(&roots, &trusted.cert_pem).unwrap();
    // Read once, when the proxy starts; this test process runs no other test.
    std::env::set_var("SSL_CERT_FILE", &roots);
    let route = |path: &str, upstream: String| tether_server::config::ProxyRoute {
        path: path.into(),
        upstream,
        connect_timeout_ms: 3000.try_into().unwrap(),
        upstream_idle_timeout_ms: 0,
    };
    let proxy = start(|c| {
        c.proxy.routes = vec![
            route(
                "/chat",
                format!("wss://127.0.0.1:{}/ws", upstream.client.port()),
            ),
            route(
                "/feed",
                format!(
                    "https://127.0.0.1:{}/sse?channel=news",
                    upstream.client.port()
                ),
            ),
            route(
                "/bad",
                format!("wss://127.0.0.1:{}/ws", untrusted.client.port()),
            ),
        ];
    })
    .await;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/chat?client=zed", proxy.client))
            .await
            .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let welcome: Value = serde_json::from_str(first.to_text().unwrap()).unwrap();
    assert_eq!(
        (welcome["type"].as_str(), welcome["client_id"].as_str()),
        (Some("welcome"), Some("zed"))
    );
    ws.send(Message::text(r#"{"type":"ping","ref":5}"#))
        .await
        .unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(pong.to_text().unwrap()).unwrap(),
        json!({"type":"pong","ref":5})
    );
    let mut sse = proxy
        .http
        .get(format!("http://{}/feed?client=yan", proxy.client))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let text = read_sse_until(&mut sse, |t| t.contains("event: welcome")).await;
    assert!(text.contains("\"client_id\":\"yan\""), "{text}");
    match tokio_tungstenite::connect_async(format!("ws://{}/bad?client=x", proxy.client)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status().as_u16(), 502),
        other => panic!("expected 502, got {:?}", other.map(|_| ())),
    }
    drop(sse);
    let _ = ws.close(None).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    proxy.assert_clean().await;
    upstream.assert_clean().await;
    untrusted.assert_clean().await;
}

/// The types of the whole HTTP/2 frames in `bytes` (each: 3-byte length, type,
/// flags, 4-byte stream id, payload); panics on a torn frame.
fn h2_frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut kinds = Vec::new();
    while !bytes.is_empty() {
        assert!(bytes.len() >= 9, "torn frame header: {bytes:?}");
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        kinds.push(bytes[3]);
        assert!(bytes.len() >= 9 + len, "torn frame: {bytes:?}");
        bytes = &bytes[9 + len..];
    }
    kinds
}
