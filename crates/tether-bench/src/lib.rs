//! The load generator behind `tether bench` (SPEC section 11). Every run is bounded
//! in count and time and prints one JSON object of figures.
//!
//! `idle`: opens N WebSocket connections (spread over source addresses in
//! 127.0.0.0/8, bounded concurrency), holds them, and reads the server's memory from
//! `/proc/PID/status` (RSS) and `/proc/PID/smaps_rollup` (PSS) before and after.
#![warn(missing_docs)]

mod proxy;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use futures_util::StreamExt;
use serde_json::json;
use tokio::net::TcpSocket;

/// `tether bench …`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// N idle WebSocket connections; server memory per connection.
    Idle(IdleArgs),
    /// N subscribers on one channel, M publishes of B bytes; deliveries/s and latency.
    Fanout(FanoutArgs),
    /// Relay throughput and linked-close latency through a proxy route.
    Proxy(proxy::ProxyArgs),
    /// Connect + subscribe + close cycles per second; then the registry must be empty.
    Churn(ChurnArgs),
}

#[derive(Args, Debug)]
struct ChurnArgs {
    /// WebSocket URL of the server.
    #[arg(long, default_value = "ws://127.0.0.1:7700/ws")]
    url: String,
    /// Server API base URL (to check the registry is back to zero).
    #[arg(long, default_value = "http://127.0.0.1:7701")]
    api: String,
    /// Concurrent workers, each running cycles back to back.
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// How long to run.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Channel each cycle subscribes to.
    #[arg(long, default_value = "churn")]
    channel: String,
}

#[derive(Args, Debug)]
struct FanoutArgs {
    /// WebSocket URL of the server.
    #[arg(long, default_value = "ws://127.0.0.1:7700/ws")]
    url: String,
    /// Server API base URL (publishes go to `{api}/api/publish`).
    #[arg(long, default_value = "http://127.0.0.1:7701")]
    api: String,
    /// Subscribers.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Messages to publish.
    #[arg(long, default_value_t = 200)]
    messages: usize,
    /// Payload bytes per message (padding included).
    #[arg(long, default_value_t = 100)]
    bytes: usize,
    /// Publishes per second; 0 = back-to-back.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Channel name.
    #[arg(long, default_value = "bench")]
    channel: String,
    /// The server's PID, for its CPU time and memory.
    #[arg(long)]
    pid: Option<u32>,
    /// Source addresses (comma-separated, loopback only).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<IpAddr>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

#[derive(Args, Debug)]
struct IdleArgs {
    /// WebSocket URL of the server (`ws://127.0.0.1:7700/ws`).
    #[arg(long, default_value = "ws://127.0.0.1:7700/ws")]
    url: String,
    /// Connections to open (one process holds at most ~19.9k sockets here).
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// The server's PID, to read its memory.
    #[arg(long)]
    pid: Option<u32>,
    /// Source addresses to spread connections over (comma-separated, loopback only).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<IpAddr>,
    /// Connects in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Seconds to hold the connections before measuring.
    #[arg(long, default_value_t = 3)]
    hold_secs: u64,
    /// Give up connecting after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

/// Runs a scenario and prints its JSON.
pub async fn run(args: BenchArgs) -> Result<(), String> {
    match args.scenario {
        Scenario::Idle(a) => idle(a).await,
        Scenario::Fanout(a) => fanout(a).await,
        Scenario::Proxy(a) => proxy::run(a).await,
        Scenario::Churn(a) => churn(a).await,
    }
}

/// Memory of a process: (RSS, PSS) in KiB.
pub fn process_memory(pid: u32) -> Result<(u64, u64), String> {
    let field = |text: &str, name: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("pid {pid}: {e}"))?;
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .map_err(|e| format!("pid {pid}: {e}"))?;
    let rss = field(&status, "VmRSS:").ok_or("no VmRSS")?;
    let pss = field(&smaps, "Pss:").ok_or("no Pss")?;
    Ok((rss, pss))
}

type ClientWs =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens connection `i` from source address `src` to `target` as client `{prefix}-{i}`.
async fn connect_ws(
    url: &str,
    prefix: &str,
    i: usize,
    src: IpAddr,
    target: SocketAddr,
) -> Result<ClientWs, String> {
    let url = format!(
        "{url}{}client={prefix}-{i}",
        if url.contains('?') { '&' } else { '?' }
    );
    let socket = if src.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    socket
        .bind(SocketAddr::new(src, 0))
        .map_err(|e| e.to_string())?;
    let stream = socket.connect(target).await.map_err(|e| e.to_string())?;
    let (ws, _) =
        tokio_tungstenite::client_async(url, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .map_err(|e| e.to_string())?;
    Ok(ws)
}

async fn idle(a: IdleArgs) -> Result<(), String> {
    if a.sources.iter().any(|s| !s.is_loopback()) {
        return Err("sources must be loopback addresses".into());
    }
    if a.connections == 0 || a.sources.is_empty() {
        return Err("need at least one connection and one source".into());
    }
    let url = a.url.clone();
    let rest = url.strip_prefix("ws://").ok_or("only ws:// URLs")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let target: SocketAddr = tokio::net::lookup_host(authority)
        .await
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or("no address")?;
    if !target.ip().is_loopback() {
        return Err("the target must be on loopback".into());
    }
    let before = a.pid.map(process_memory).transpose()?;
    let started = Instant::now();
    let deadline = Duration::from_secs(a.timeout_secs);
    let sources = a.sources.clone();
    let results: Vec<Result<_, String>> = futures_util::stream::iter(0..a.connections)
        .map(|i| {
            let (url, src) = (url.clone(), sources[i % sources.len()]);
            async move {
                let mut ws = connect_ws(&url, "bench", i, src, target).await?;
                // The welcome frame proves admission.
                match ws.next().await {
                    Some(Ok(_)) => Ok(ws),
                    other => Err(format!("no welcome: {other:?}")),
                }
            }
        })
        .buffer_unordered(a.concurrency.max(1))
        .take_until(tokio::time::sleep(deadline))
        .collect()
        .await;
    let connect_secs = started.elapsed().as_secs_f64();
    let mut held = Vec::new();
    let mut errors = std::collections::BTreeMap::<String, usize>::new();
    for r in results {
        match r {
            Ok(ws) => held.push(ws),
            Err(e) => *errors.entry(e).or_default() += 1,
        }
    }
    tokio::time::sleep(Duration::from_secs(a.hold_secs)).await;
    let after = a.pid.map(process_memory).transpose()?;
    let n = held.len() as f64;
    let per = |b: Option<(u64, u64)>, f: fn((u64, u64)) -> u64| -> Option<f64> {
        let (b, a) = (b?, after?);
        (n > 0.0).then(|| (f(a) as f64 - f(b) as f64) * 1024.0 / n)
    };
    let out = json!({
        "scenario": "idle",
        "url": a.url,
        "requested": a.connections,
        "opened": held.len(),
        "errors": errors,
        "connect_secs": connect_secs,
        "server_pid": a.pid,
        "server_rss_kib_before": before.map(|m| m.0),
        "server_rss_kib_after": after.map(|m| m.0),
        "server_pss_kib_before": before.map(|m| m.1),
        "server_pss_kib_after": after.map(|m| m.1),
        "rss_bytes_per_connection": per(before, |m| m.0),
        "pss_bytes_per_connection": per(before, |m| m.1),
    });
    println!("{out}");
    drop(held);
    Ok(())
}

/// Server CPU time (user + system) in seconds, from `/proc/PID/stat`.
pub fn process_cpu_secs(pid: u32) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("pid {pid}: {e}"))?;
    let after = stat.rsplit_once(')').ok_or("bad stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11)
        .and_then(|u| u.parse::<f64>().ok())
        .ok_or("no utime")?
        + fields
            .get(12)
            .and_then(|s| s.parse::<f64>().ok())
            .ok_or("no stime")?;
    Ok(ticks / 100.0)
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The publish timestamp a receiver finds in a message (`"t":<micros>`).
fn stamp(text: &str) -> Option<u64> {
    let i = text.find("\"t\":")? + 4;
    let digits: String = text[i..].chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn percentile(sorted: &[u64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[i.min(sorted.len() - 1)] as f64 / 1000.0)
}

async fn check_loopback(url: &str, scheme: &str) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix(scheme)
        .ok_or(format!("only {scheme} URLs"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let addr = tokio::net::lookup_host(authority)
        .await
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or("no address")?;
    if !addr.ip().is_loopback() {
        return Err("the target must be on loopback".into());
    }
    Ok(addr)
}

async fn fanout(a: FanoutArgs) -> Result<(), String> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    if a.sources.iter().any(|s| !s.is_loopback()) || a.sources.is_empty() {
        return Err("sources must be loopback addresses".into());
    }
    let target = check_loopback(&a.url, "ws://").await?;
    check_loopback(&a.api, "http://").await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.timeout_secs);
    let (done_tx, mut done_rx) =
        tokio::sync::mpsc::channel::<(usize, Vec<u64>)>(a.subscribers.max(1));
    let ready = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let url = a.url.clone();
    let sources = a.sources.clone();
    let channel = a.channel.clone();
    let messages = a.messages;
    let connects: Vec<Result<(), String>> = futures_util::stream::iter(0..a.subscribers)
        .map(|i| {
            let (url, src) = (url.clone(), sources[i % sources.len()]);
            let (done_tx, ready, channel) = (done_tx.clone(), ready.clone(), channel.clone());
            async move {
                let mut ws = connect_ws(&url, "fan", i, src, target).await?;
                let sub = format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#);
                ws.send(Message::text(sub))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(messages);
                    let mut got = 0;
                    let until = tokio::time::sleep_until(deadline);
                    tokio::pin!(until);
                    while got < messages {
                        let msg = tokio::select! {
                            _ = &mut until => break,
                            m = ws.next() => m,
                        };
                        let Some(Ok(Message::Text(t))) = msg else {
                            if matches!(msg, Some(Ok(_))) {
                                continue;
                            } else {
                                break;
                            }
                        };
                        if t.as_str().contains(r#""type":"subscribed""#) {
                            ready.add_permits(1);
                        } else if t.as_str().starts_with(r#"{"type":"message""#) {
                            got += 1;
                            if let Some(s) = stamp(t.as_str()) {
                                lat.push(now_micros().saturating_sub(s));
                            }
                        }
                    }
                    let _ = done_tx.send((got, lat)).await;
                    drop(ws);
                });
                Ok(())
            }
        })
        .buffer_unordered(256)
        .collect()
        .await;
    drop(done_tx);
    let opened = connects.iter().filter(|r| r.is_ok()).count();
    let mut errors = std::collections::BTreeMap::<String, usize>::new();
    for e in connects.into_iter().filter_map(Result::err) {
        *errors.entry(e).or_default() += 1;
    }
    let _all_ready = tokio::time::timeout_at(deadline, ready.acquire_many(opened as u32)).await;
    let http = reqwest::Client::new();
    let pad = "x".repeat(a.bytes.saturating_sub(40));
    let cpu_before = a.pid.map(process_cpu_secs).transpose()?;
    let started = Instant::now();
    let interval = (a.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / a.rate));
    let mut publish_errors = 0usize;
    for i in 0..a.messages {
        if let Some(iv) = interval {
            tokio::time::sleep_until(tokio::time::Instant::from_std(
                started + iv.mul_f64(i as f64),
            ))
            .await;
        }
        let body = serde_json::json!({"channel": a.channel, "data": {"t": now_micros(), "p": pad}});
        match http
            .post(format!("{}/api/publish", a.api))
            .json(&body)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {}
            _ => publish_errors += 1,
        }
    }
    let published_secs = started.elapsed().as_secs_f64();
    let mut delivered = 0usize;
    let mut lat = Vec::new();
    while let Some((got, l)) = done_rx.recv().await {
        delivered += got;
        lat.extend(l);
    }
    let total_secs = started.elapsed().as_secs_f64();
    let cpu_after = a.pid.map(process_cpu_secs).transpose()?;
    let mem = a.pid.map(process_memory).transpose()?;
    lat.sort_unstable();
    let cpu = cpu_before.zip(cpu_after).map(|(b, a)| a - b);
    let out = json!({
        "scenario": "fanout",
        "mode": if interval.is_some() { "paced" } else { "back_to_back" },
        "rate": a.rate,
        "subscribers": a.subscribers,
        "opened": opened,
        "errors": errors,
        "messages": a.messages,
        "bytes": a.bytes,
        "publish_errors": publish_errors,
        "expected_deliveries": opened * a.messages,
        "deliveries": delivered,
        "publish_secs": published_secs,
        "total_secs": total_secs,
        "deliveries_per_sec": delivered as f64 / total_secs,
        "latency_ms_p50": percentile(&lat, 0.50),
        "latency_ms_p99": percentile(&lat, 0.99),
        "latency_ms_p999": percentile(&lat, 0.999),
        "latency_ms_max": lat.last().map(|m| *m as f64 / 1000.0),
        "server_cpu_secs": cpu,
        "server_cpu_us_per_delivery": cpu.filter(|_| delivered > 0).map(|c| c * 1e6 / delivered as f64),
        "server_rss_kib": mem.map(|m| m.0),
        "server_pss_kib": mem.map(|m| m.1),
    });
    println!("{out}");
    Ok(())
}

/// One cycle: connect, read the welcome, subscribe, read `subscribed`, close.
async fn churn_cycle(url: &str, i: usize, channel: &str) -> Result<(), String> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{url}?client=churn-{i}"))
        .await
        .map_err(|e| e.to_string())?;
    ws.next()
        .await
        .ok_or("no welcome")?
        .map_err(|e| e.to_string())?;
    let sub = format!(r#"{{"type":"subscribe","channel":"{channel}"}}"#);
    ws.send(Message::text(sub))
        .await
        .map_err(|e| e.to_string())?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.as_str().contains(r#""type":"subscribed""#) => {}
        other => return Err(format!("no subscribed: {other:?}")),
    }
    ws.close(None).await.map_err(|e| e.to_string())?;
    while let Some(Ok(_)) = ws.next().await {}
    Ok(())
}

async fn churn(a: ChurnArgs) -> Result<(), String> {
    check_loopback(&a.url, "ws://").await?;
    check_loopback(&a.api, "http://").await?;
    let until = Instant::now() + Duration::from_secs(a.secs);
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..a.workers.max(1) {
        let (url, channel) = (a.url.clone(), a.channel.clone());
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0usize, 0usize);
            let mut i = w;
            while Instant::now() < until {
                match churn_cycle(&url, i, &channel).await {
                    Ok(()) => ok += 1,
                    Err(_) => failed += 1,
                }
                i += 1_000_000;
            }
            (ok, failed)
        }));
    }
    let (mut ok, mut failed) = (0, 0);
    for w in workers {
        let (o, f) = w.await.map_err(|e| e.to_string())?;
        ok += o;
        failed += f;
    }
    let secs = started.elapsed().as_secs_f64();
    // The registry must return to zero: poll the API for up to 10 s.
    let http = reqwest::Client::new();
    let mut stats = serde_json::Value::Null;
    let mut zero = false;
    for _ in 0..100 {
        stats = http
            .get(format!("{}/api/stats", a.api))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        zero = stats["connections"]["ws"] == 0 && stats["clients"] == 0 && stats["tasks"] == 0;
        if zero {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{}",
        json!({
            "scenario": "churn",
            "workers": a.workers,
            "secs": secs,
            "cycles": ok,
            "failed": failed,
            "cycles_per_sec": ok as f64 / secs,
            "registry_back_to_zero": zero,
            "stats_after": stats,
        })
    );
    if zero {
        Ok(())
    } else {
        Err("the registry did not return to zero".into())
    }
}
