//! The load generator behind `tether bench` (SPEC section 11). Every run is bounded
//! in count and time and prints one JSON object of figures.
//!
//! `idle`: opens N WebSocket connections (spread over source addresses in
//! 127.0.0.0/8, bounded concurrency), holds them, and reads the server's memory from
//! `/proc/PID/status` (RSS) and `/proc/PID/smaps_rollup` (PSS) before and after.
#![warn(missing_docs)]

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
            let url = format!(
                "{url}{}client=bench-{i}",
                if url.contains('?') { '&' } else { '?' }
            );
            let src = sources[i % sources.len()];
            async move {
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
                let (mut ws, _) = tokio_tungstenite::client_async(url, stream)
                    .await
                    .map_err(|e| e.to_string())?;
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
