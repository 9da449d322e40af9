//! `tether bench proxy`: relay throughput and linked-close latency of a proxy route.
//!
//! The bench runs its own upstream (an echo server that closes a connection when told
//! `close`) on `--upstream-listen`, which the Tether under test must route to, e.g.
//! `[[proxy.routes]] path = "/echo" upstream = "ws://127.0.0.1:9100/"`. With `--bare`
//! it also runs a bare tokio-tungstenite relay in-process and measures it the same way,
//! so one run gives both figures. Everything is loopback, bounded in count and time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

/// Arguments of `tether bench proxy`.
#[derive(Args, Debug)]
pub struct ProxyArgs {
    /// The proxy route's URL on Tether.
    #[arg(long, default_value = "ws://127.0.0.1:7700/echo")]
    url: String,
    /// Where the bench's own echo upstream listens (Tether's route must point here).
    #[arg(long, default_value = "127.0.0.1:9100")]
    upstream_listen: SocketAddr,
    /// Concurrent connections for the throughput run.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Round trips per connection.
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 100)]
    bytes: usize,
    /// Upstream-initiated closes to time.
    #[arg(long, default_value_t = 500)]
    closes: usize,
    /// Also measure a bare tokio-tungstenite relay in this process.
    #[arg(long)]
    bare: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
}

/// The instant the upstream sent each close, by connection (set by the upstream).
type CloseTimes = Arc<Mutex<Vec<Instant>>>;

async fn echo_upstream(listener: TcpListener, closes: CloseTimes) {
    while let Ok((sock, _)) = listener.accept().await {
        let closes = closes.clone();
        tokio::spawn(async move {
            let _ = sock.set_nodelay(true);
            let Ok(mut ws) = tokio_tungstenite::accept_async(sock).await else {
                return;
            };
            while let Some(Ok(m)) = ws.next().await {
                match m {
                    Message::Text(t) if t.as_str() == "close" => {
                        closes.lock().await.push(Instant::now());
                        let _ = ws.close(None).await;
                        while let Some(Ok(_)) = ws.next().await {}
                        return;
                    }
                    m @ (Message::Text(_) | Message::Binary(_)) => {
                        let sent = ws.send(m).await;
                        if sent.is_err() {
                            return;
                        }
                    }
                    _ => {}
                }
            }
        });
    }
}

/// A bare relay: accept, connect the upstream, forward both ways until either ends.
async fn bare_relay(listener: TcpListener, upstream: String) {
    while let Ok((sock, _)) = listener.accept().await {
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let _ = sock.set_nodelay(true);
            let Ok(client) = tokio_tungstenite::accept_async(sock).await else {
                return;
            };
            let Ok((up, _)) = tokio_tungstenite::connect_async(&upstream).await else {
                return;
            };
            let (mut c_tx, mut c_rx) = client.split();
            let (mut u_tx, mut u_rx) = up.split();
            loop {
                tokio::select! {
                    m = c_rx.next() => match m {
                        Some(Ok(m)) if m.is_text() || m.is_binary() => if u_tx.send(m).await.is_err() { break },
                        Some(Ok(_)) => {}
                        _ => { let _ = u_tx.close().await; break }
                    },
                    m = u_rx.next() => match m {
                        Some(Ok(m)) if m.is_text() || m.is_binary() => if c_tx.send(m).await.is_err() { break },
                        Some(Ok(Message::Close(f))) => { let _ = c_tx.send(Message::Close(f)).await; break }
                        Some(Ok(_)) => {}
                        _ => { let _ = c_tx.close().await; break }
                    },
                }
            }
        });
    }
}

fn pct(sorted: &[f64], p: f64) -> Option<f64> {
    (!sorted.is_empty()).then(|| sorted[(((sorted.len() - 1) as f64) * p).round() as usize])
}

/// Throughput (round trips/s) and close-latency percentiles (ms) through `url`.
async fn measure(
    a: &ProxyArgs,
    url: &str,
    closes: &CloseTimes,
) -> Result<serde_json::Value, String> {
    let payload = "x".repeat(a.bytes);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..a.connections {
        let (url, payload, n) = (url.to_owned(), payload.clone(), a.messages);
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(&url)
                .await
                .map_err(|e| e.to_string())?;
            // Keep a window of 16 messages in flight.
            let (mut sent, mut got) = (0usize, 0usize);
            while got < n {
                while sent < n && sent - got < 16 {
                    ws.send(Message::text(payload.clone()))
                        .await
                        .map_err(|e| e.to_string())?;
                    sent += 1;
                }
                match ws.next().await {
                    Some(Ok(Message::Text(_))) => got += 1,
                    Some(Ok(_)) => {}
                    other => return Err(format!("relay ended: {other:?}")),
                }
            }
            let _ = ws.close(None).await;
            Ok::<usize, String>(got)
        }));
    }
    let mut round_trips = 0;
    let mut errors = 0;
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(a.timeout_secs), t).await {
            Ok(Ok(Ok(n))) => round_trips += n,
            _ => errors += 1,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    // Linked-close latency: the upstream closes, the client sees its close.
    closes.lock().await.clear();
    let mut lat = Vec::with_capacity(a.closes);
    for _ in 0..a.closes {
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .map_err(|e| e.to_string())?;
        ws.send(Message::text("close"))
            .await
            .map_err(|e| e.to_string())?;
        let seen = loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => {
                    break Instant::now()
                }
                Ok(Some(Ok(_))) => continue,
                Err(_) => return Err("no close within 10 s".into()),
            }
        };
        let sent = closes
            .lock()
            .await
            .pop()
            .ok_or("the upstream did not record its close")?;
        lat.push(seen.saturating_duration_since(sent).as_secs_f64() * 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    Ok(json!({
        "round_trips": round_trips,
        "errors": errors,
        "round_trips_per_sec": round_trips as f64 / secs,
        "relayed_messages_per_sec": 2.0 * round_trips as f64 / secs,
        "close_latency_ms_p50": pct(&lat, 0.5),
        "close_latency_ms_p99": pct(&lat, 0.99),
        "close_latency_ms_max": lat.last(),
    }))
}

/// Runs `tether bench proxy`.
pub async fn run(a: ProxyArgs) -> Result<(), String> {
    if !a.upstream_listen.ip().is_loopback() {
        return Err("--upstream-listen must be a loopback address".into());
    }
    crate::check_loopback(&a.url, "ws://").await?;
    let closes: CloseTimes = Arc::new(Mutex::new(Vec::new()));
    let listener = TcpListener::bind(a.upstream_listen)
        .await
        .map_err(|e| format!("{}: {e}", a.upstream_listen))?;
    let upstream = tokio::spawn(echo_upstream(listener, closes.clone()));
    let tether = measure(&a, &a.url, &closes).await?;
    let bare = if a.bare {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = l.local_addr().map_err(|e| e.to_string())?;
        let relay = tokio::spawn(bare_relay(l, format!("ws://{}/", a.upstream_listen)));
        let r = measure(&a, &format!("ws://{addr}/"), &closes).await;
        relay.abort();
        Some(r?)
    } else {
        None
    };
    upstream.abort();
    let ratio = bare.as_ref().and_then(|b| {
        let t = tether["round_trips_per_sec"].as_f64()?;
        let b = b["round_trips_per_sec"].as_f64()?;
        (b > 0.0).then(|| t / b)
    });
    println!(
        "{}",
        json!({
            "scenario": "proxy",
            "connections": a.connections,
            "messages": a.messages,
            "bytes": a.bytes,
            "closes": a.closes,
            "tether": tether,
            "bare_relay": bare,
            "tether_vs_bare_throughput": ratio,
        })
    );
    Ok(())
}
