//! The load generator behind `tether bench` (SPEC section 11). Every run is bounded
//! in count and time and prints one JSON object of figures.
//!
//! `idle` and `fanout` target Tether (`--target tether`, the default) or Nchan
//! (`--target nchan`: subscribers at `{url}/{channel}` with `url` = `ws://HOST/sub`,
//! publishes by `POST {api}/pub/{channel}` with the payload as the body), over
//! WebSocket or SSE (`--transport ws|sse`). Subscribers are lean: a raw socket, a
//! hand-written request and a frame/line parser over one reusable buffer (see `lean`),
//! so the receivers cost little next to the server under test. `--procs N` spreads the
//! subscribers over N child processes of this binary; `--pid` takes several PIDs
//! (e.g. nginx's master and workers) whose CPU time and memory are summed.
//!
//! `idle`: opens N connections (spread over source addresses in 127.0.0.0/8, bounded
//! concurrency), holds them, and reads the server's memory from `/proc/PID/status`
//! (RSS) and `/proc/PID/smaps_rollup` (PSS) before and after.
//!
//! `fanout --poll-stats-ms N` also times Tether's `GET /api/stats` during the burst
//! (see `statspoll`); `chat` is a chat-like load of many small channels and several
//! API publishers (see `chat`).
#![warn(missing_docs)]

mod bare;
mod chat;
mod churn;
mod fanout;
mod hist;
mod idle;
mod lean;
mod procs;
mod proxy;
mod statspoll;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use hist::{Hist, SparseHist};
use lean::{Conn, Endpoint};
use procs::Children;

/// `tether bench …`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

/// The server under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Tether: `/ws?client=…` plus a subscribe frame, or `/sse?channel=…`;
    /// publishes through `POST {api}/api/publish`.
    Tether,
    /// Nchan: subscribers at `{url}/{channel}`, publishes by `POST {api}/pub/{channel}`.
    Nchan,
}

/// How subscribers connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// WebSocket.
    Ws,
    /// Server-sent events.
    Sse,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// N idle connections; server memory per connection.
    Idle(IdleArgs),
    /// N subscribers on one channel, M publishes of B bytes; deliveries/s and latency.
    Fanout(FanoutArgs),
    /// Relay throughput and linked-close latency through a proxy route (Tether only).
    Proxy(proxy::ProxyArgs),
    /// Connect + subscribe + close cycles per second; then (Tether) the registry must
    /// be empty.
    Churn(ChurnArgs),
    /// A chat-like load: N connections over C channels, P publishers posting to random
    /// channels for a bounded time; publishes/s accepted, deliveries/s and latency.
    Chat(chat::ChatArgs),
    /// A bare coalescing fan-out server with Nchan's URLs, to measure this load
    /// generator's own ceiling (`fanout --target nchan` against it).
    BareServer(bare::BareArgs),
}

#[derive(Args, Debug)]
struct ChurnArgs {
    /// WebSocket URL of the server [default: tether ws://127.0.0.1:7700/ws,
    /// nchan ws://127.0.0.1:80/sub].
    #[arg(long)]
    url: Option<String>,
    /// Server API base URL (Tether: to check the registry is back to zero).
    #[arg(long, default_value = "http://127.0.0.1:7701")]
    api: String,
    /// The server under test.
    #[arg(long, value_enum, default_value_t = Target::Tether)]
    target: Target,
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
    /// Subscriber URL [default: tether ws://127.0.0.1:7700/ws, nchan
    /// ws://127.0.0.1:80/sub]. Tether SSE uses `/sse` on the same address (or the path
    /// of an http:// URL); Nchan subscribers go to `{url}/{channel}`. Several,
    /// comma-separated (a cluster's nodes): subscriber process K connects to the K-th,
    /// round-robin (`--procs` a multiple of their number).
    #[arg(long)]
    url: Option<String>,
    #[command(flatten)]
    server: ServerArgs,
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
    /// Back-to-back: publishes in flight at once (each publisher sends its next one
    /// when the server has answered the previous).
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Channel name.
    #[arg(long, default_value = "bench")]
    channel: String,
    #[command(flatten)]
    spread: SpreadArgs,
    /// Pause between every subscriber being ready and the first publish.
    #[arg(long, default_value_t = 200)]
    settle_ms: u64,
    /// After the last publish, stop waiting once no delivery arrived for this long.
    #[arg(long, default_value_t = 5)]
    drain_secs: u64,
    /// Read buffer per subscriber, KiB.
    #[arg(long, default_value_t = 16)]
    buf_kib: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Tether: poll `GET {api}/api/stats` every this many ms from the first publish
    /// until the last receiver is done, and report its latency (`stats_poll`); 0 = off.
    /// Nchan has no such endpoint: the output says so and the burst runs alone.
    #[arg(long, default_value_t = 0)]
    poll_stats_ms: u64,
    /// Internal: this process is child K of `--procs`.
    #[arg(long, hide = true)]
    child: Option<usize>,
}

/// The server side of `fanout` and `chat` (the same flags in both): where to publish,
/// which server, how subscribers connect.
#[derive(Args, Debug)]
pub(crate) struct ServerArgs {
    /// Publish base URL: Tether `{api}/api/publish` [default http://127.0.0.1:7701],
    /// Nchan `{api}/pub/{channel}` [default: the url's address].
    #[arg(long)]
    pub(crate) api: Option<String>,
    /// The server under test.
    #[arg(long, value_enum, default_value_t = Target::Tether)]
    pub(crate) target: Target,
    /// Subscriber transport.
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    pub(crate) transport: Transport,
}

impl ServerArgs {
    /// The publish base URL: `--api`, else Tether's default or (Nchan) the
    /// subscribers' own address `host`; it must be plain http:// on loopback.
    pub(crate) async fn api(&self, host: &str) -> Result<String, String> {
        let api = match (&self.api, self.target) {
            (Some(api), _) => api.clone(),
            (None, Target::Tether) => "http://127.0.0.1:7701".into(),
            (None, Target::Nchan) => format!("http://{host}"),
        };
        check_loopback(&api, "http://").await?;
        Ok(api)
    }
}

/// The bounds of a run with subscribers (`fanout`, `chat`), from its flags.
pub(crate) struct Bounds {
    /// `--timeout-secs` from now.
    pub(crate) deadline: tokio::time::Instant,
    /// `--drain-secs`.
    pub(crate) drain: Duration,
    /// `--procs`, at least 1.
    pub(crate) procs: usize,
    /// `--buf-kib` in bytes, at least 4 KiB.
    pub(crate) buf: usize,
}

impl Bounds {
    pub(crate) fn new(timeout_secs: u64, drain_secs: u64, procs: usize, buf_kib: usize) -> Bounds {
        Bounds {
            deadline: tokio::time::Instant::now() + Duration::from_secs(timeout_secs),
            drain: Duration::from_secs(drain_secs),
            procs: procs.max(1),
            buf: buf_kib.max(4) * 1024,
        }
    }
}

/// The subscriber processes of `fanout` and `chat` (the same flags in both), and the
/// server's processes measured.
#[derive(Args, Debug)]
pub(crate) struct SpreadArgs {
    /// The server's PIDs (comma-separated), for their summed CPU time and memory.
    #[arg(long, value_delimiter = ',')]
    pub(crate) pid: Vec<u32>,
    /// Source addresses (comma-separated, loopback only).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    pub(crate) sources: Vec<IpAddr>,
    /// Subscriber processes (children of this one; only this one publishes).
    #[arg(long, default_value_t = 1)]
    pub(crate) procs: usize,
    /// Connects in flight at once (per process).
    #[arg(long, default_value_t = 256)]
    pub(crate) concurrency: usize,
}

#[derive(Args, Debug)]
struct IdleArgs {
    /// Subscriber URL [default: tether ws://127.0.0.1:7700/ws, nchan
    /// ws://127.0.0.1:80/sub]; as for `fanout` (several, comma-separated: spread over
    /// a cluster's nodes by process).
    #[arg(long)]
    url: Option<String>,
    /// The server under test.
    #[arg(long, value_enum, default_value_t = Target::Tether)]
    target: Target,
    /// Connection transport.
    #[arg(long, value_enum, default_value_t = Transport::Ws)]
    transport: Transport,
    /// Channel each connection subscribes to. Tether WebSocket without it: welcome
    /// only; Nchan and SSE always subscribe [default there: idle].
    #[arg(long)]
    channel: Option<String>,
    /// Connections to open (one process holds at most ~19.9k sockets here).
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// The server's PIDs (comma-separated), for their summed memory.
    #[arg(long, value_delimiter = ',')]
    pid: Vec<u32>,
    /// Source addresses to spread connections over (comma-separated, loopback only).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<IpAddr>,
    /// Client processes (children of this one).
    #[arg(long, default_value_t = 1)]
    procs: usize,
    /// Connects in flight at once (per process).
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Seconds to hold the connections before measuring.
    #[arg(long, default_value_t = 3)]
    hold_secs: u64,
    /// Give up connecting after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Internal: this process is child K of `--procs`.
    #[arg(long, hide = true)]
    child: Option<usize>,
}

/// Runs a scenario and prints its JSON.
pub async fn run(args: BenchArgs) -> Result<(), String> {
    match args.scenario {
        Scenario::Idle(a) => idle::run(a).await,
        Scenario::Fanout(a) => fanout::run(a).await,
        Scenario::Proxy(a) => proxy::run(a).await,
        Scenario::Churn(a) => churn::run(a).await,
        Scenario::Chat(a) => chat::run(a).await,
        Scenario::BareServer(a) => bare::run(a).await,
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

/// Summed (RSS, PSS) in KiB of several processes; None without PIDs.
pub fn processes_memory(pids: &[u32]) -> Result<Option<(u64, u64)>, String> {
    if pids.is_empty() {
        return Ok(None);
    }
    let mut sum = (0, 0);
    for &p in pids {
        let (r, s) = process_memory(p)?;
        sum = (sum.0 + r, sum.1 + s);
    }
    Ok(Some(sum))
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

/// Summed CPU seconds of several processes; None without PIDs.
pub fn processes_cpu_secs(pids: &[u32]) -> Result<Option<f64>, String> {
    if pids.is_empty() {
        return Ok(None);
    }
    pids.iter()
        .map(|&p| process_cpu_secs(p))
        .sum::<Result<f64, String>>()
        .map(Some)
}

fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

async fn check_loopback(url: &str, scheme: &str) -> Result<SocketAddr, String> {
    let rest = url
        .strip_prefix(scheme)
        .ok_or(format!("only {scheme} URLs"))?;
    let authority = rest.split('/').next().unwrap_or(rest);
    loopback_addr(authority).await
}

/// The first address of `authority` (`host:port`), which must be on loopback.
async fn loopback_addr(authority: &str) -> Result<SocketAddr, String> {
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

fn default_url(target: Target) -> &'static str {
    match target {
        Target::Tether => "ws://127.0.0.1:7700/ws",
        Target::Nchan => "ws://127.0.0.1:80/sub",
    }
}

/// `(scheme, authority, path)` of a plain ws:// or http:// URL.
fn split_url(url: &str) -> Result<(&str, &str, &str), String> {
    let (scheme, rest) = url.split_once("://").ok_or(format!("{url}: no scheme"))?;
    if !matches!(scheme, "ws" | "http") {
        return Err(format!("{url}: only ws:// or http:// (plain, loopback)"));
    }
    Ok(match rest.find('/') {
        Some(i) => (scheme, &rest[..i], &rest[i..]),
        None => (scheme, rest, ""),
    })
}

/// The subscriber URL of subscriber process `child`: with several comma-separated
/// URLs (the nodes of a cluster), process K takes the K-th (round-robin), so the
/// subscribers are spread evenly over the nodes (`--procs` a multiple of their number).
fn node_url(urls: &str, child: Option<usize>, procs: usize) -> Result<&str, String> {
    let all: Vec<&str> = urls.split(',').map(str::trim).collect();
    if all.len() > 1 && (procs < all.len() || !procs.is_multiple_of(all.len())) {
        return Err(format!(
            "{} subscriber URLs need --procs a multiple of {} (one process per node or more)",
            all.len(),
            all.len()
        ));
    }
    Ok(all[child.unwrap_or(0) % all.len()])
}

/// Where and how subscribers connect.
async fn endpoint(
    target: Target,
    transport: Transport,
    url: &str,
    channel: Option<String>,
) -> Result<Endpoint, String> {
    let (scheme, authority, path) = split_url(url)?;
    let addr = loopback_addr(authority).await?;
    let path = match (target, transport) {
        (Target::Tether, Transport::Ws) if path.is_empty() => "/ws",
        (Target::Tether, Transport::Sse) if scheme == "ws" || path.is_empty() => "/sse",
        (Target::Nchan, _) if path.is_empty() || path == "/" => "/sub",
        _ => path,
    };
    if let Some(c) = &channel {
        if c.is_empty()
            || !c
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(format!("channel {c:?}: use A-Z a-z 0-9 _ - ."));
        }
    }
    Ok(Endpoint {
        target,
        transport,
        addr,
        host: authority.to_owned(),
        path: path.to_owned(),
        channel,
    })
}

fn check_sources(sources: &[IpAddr]) -> Result<(), String> {
    if sources.is_empty() || sources.iter().any(|s| !s.is_loopback()) {
        return Err("sources must be loopback addresses".into());
    }
    Ok(())
}

/// Opens the subscribers `indices` (client ids `{prefix}-{i}`, endpoint
/// `eps[i % eps.len()]`, source address `sources[i % len]`), `concurrency` at a time,
/// until each is ready or `deadline`; maps each opened one through `f(i, conn)`.
#[allow(clippy::too_many_arguments)]
async fn open_all<T>(
    eps: &[Arc<Endpoint>],
    indices: Vec<usize>,
    prefix: &str,
    sources: &[IpAddr],
    concurrency: usize,
    buf: usize,
    want: usize,
    deadline: tokio::time::Instant,
    f: impl Fn(usize, Conn) -> T,
) -> (Vec<T>, BTreeMap<String, usize>) {
    if eps.is_empty() {
        return (Vec::new(), BTreeMap::new());
    }
    let results: Vec<(usize, Result<Conn, String>)> = futures_util::stream::iter(indices)
        .map(|i| {
            let ep = eps[i % eps.len()].clone();
            let src = sources[i % sources.len()];
            let seq = i / sources.len();
            let client = format!("{prefix}-{i}");
            async move {
                let r = match tokio::time::timeout_at(
                    deadline,
                    Conn::open(&ep, &client, src, seq, buf, want),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err("deadline".into()),
                };
                (i, r)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut out = Vec::new();
    let mut errors = BTreeMap::<String, usize>::new();
    for (i, r) in results {
        match r {
            Ok(c) => out.push(f(i, c)),
            Err(e) => *errors.entry(e).or_default() += 1,
        }
    }
    (out, errors)
}

fn merge_counts(into: &mut BTreeMap<String, usize>, from: &serde_json::Value) {
    if let Some(m) = from.as_object() {
        for (k, v) in m {
            *into.entry(k.clone()).or_default() += v.as_u64().unwrap_or(0) as usize;
        }
    }
}

/// What one process's subscribers saw (a child prints it as `RESULT {…}`).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Part {
    delivered: u64,
    hist: SparseHist,
    /// The last delivery, µs since the epoch.
    last_us: u64,
    /// Receivers that did not get every message, by how they ended.
    ends: BTreeMap<String, usize>,
    incomplete: usize,
}

/// This process's running subscribers.
struct Local {
    tasks: Vec<tokio::task::JoinHandle<lean::Received>>,
    stop: watch::Sender<bool>,
    progress: Arc<AtomicU64>,
}

#[allow(clippy::too_many_arguments)]
async fn start_local(
    ep: &Arc<Endpoint>,
    indices: Vec<usize>,
    sources: &[IpAddr],
    concurrency: usize,
    buf: usize,
    messages: usize,
    deadline: tokio::time::Instant,
) -> (Local, usize, BTreeMap<String, usize>) {
    let (stop, stop_rx) = watch::channel(false);
    let progress = Arc::new(AtomicU64::new(0));
    let (tasks, errors) = open_all(
        std::slice::from_ref(ep),
        indices,
        "fan",
        sources,
        concurrency,
        buf,
        messages,
        deadline,
        |_, c| {
            let (rx, p) = (stop_rx.clone(), progress.clone());
            tokio::spawn(c.receive(messages, rx, p))
        },
    )
    .await;
    let opened = tasks.len();
    (
        Local {
            tasks,
            stop,
            progress,
        },
        opened,
        errors,
    )
}

impl Local {
    /// Waits for every receiver to finish, stopping them once no delivery arrived for
    /// `drain` or at `deadline`.
    async fn finish(self, drain: Duration, deadline: tokio::time::Instant) -> Part {
        let mut last = self.progress.load(Ordering::Relaxed);
        let mut last_change = tokio::time::Instant::now();
        loop {
            if self.tasks.iter().all(|t| t.is_finished()) {
                break;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline || now.duration_since(last_change) >= drain {
                let _ = self.stop.send(true);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let p = self.progress.load(Ordering::Relaxed);
            if p != last {
                last = p;
                last_change = tokio::time::Instant::now();
            }
        }
        let mut part = Part::default();
        let mut hist = Hist::default();
        // The sockets of receivers that got everything close together, once all are
        // done (dropped with `held` after this loop).
        let mut held = Vec::with_capacity(self.tasks.len());
        for t in self.tasks {
            match t.await {
                Ok((stats, end, socket)) => {
                    held.extend(socket);
                    part.delivered += stats.got as u64;
                    part.last_us = part.last_us.max(stats.last_us);
                    for l in stats.lat {
                        hist.record(u64::from(l));
                    }
                    if let Some(e) = end {
                        part.incomplete += 1;
                        *part.ends.entry(e).or_default() += 1;
                    }
                }
                Err(e) => {
                    part.incomplete += 1;
                    *part.ends.entry(format!("task: {e}")).or_default() += 1;
                }
            }
        }
        part.hist = hist.sparse();
        drop(held);
        part
    }
}

/// Publishes one message to Tether's API or Nchan's publisher location.
struct Publisher {
    http: reqwest::Client,
    /// The API's base URL, without a trailing `/`.
    api: String,
    target: Target,
    channel: String,
}

impl Publisher {
    fn new(target: Target, api: &str, channel: &str) -> Result<Publisher, String> {
        Ok(Publisher {
            http: reqwest::Client::new(),
            api: api.trim_end_matches('/').to_owned(),
            target,
            channel: channel.to_owned(),
        })
    }

    /// True when the server accepted it (to the channel given to `new`).
    async fn publish(&self, t: u64, pad: &str) -> bool {
        self.publish_to(&self.channel, t, pad).await.is_ok()
    }

    /// Publishes `{"t":t,"p":pad}` to `channel` (a name `endpoint` accepts: nothing to
    /// escape). Ok when the server answered 2xx; else the status or the error's kind.
    async fn publish_to(&self, channel: &str, t: u64, pad: &str) -> Result<(), String> {
        let data = format!(r#"{{"t":{t},"p":"{pad}"}}"#);
        let req = match self.target {
            Target::Tether => self
                .http
                .post(format!("{}/api/publish", self.api))
                .header("content-type", "application/json")
                .body(format!(r#"{{"channel":"{channel}","data":{data}}}"#)),
            Target::Nchan => self
                .http
                .post(format!("{}/pub/{channel}", self.api))
                .body(data),
        };
        match req.send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("status {}", r.status().as_u16())),
            Err(e) if e.is_timeout() => Err("timeout".into()),
            Err(e) if e.is_connect() => Err("connect".into()),
            Err(_) => Err("request".into()),
        }
    }
}

/// The subscribers of a parent process: in `--procs` children or in this process.
pub(crate) struct Subscribers<L> {
    /// This process's, with one process.
    local: Option<L>,
    /// The children, with several.
    children: Option<Children>,
    /// Subscribers ready, over every process.
    opened: usize,
    /// Connect errors by reason, over every process.
    errors: BTreeMap<String, usize>,
}

/// With `procs` > 1 spawns the children and adds up their `READY` lines; else opens
/// the subscribers here through `here` (`(local, opened, errors)`).
pub(crate) async fn open_subscribers<L, F>(
    procs: usize,
    deadline: tokio::time::Instant,
    here: impl FnOnce() -> F,
) -> Result<Subscribers<L>, String>
where
    F: std::future::Future<Output = (L, usize, BTreeMap<String, usize>)>,
{
    if procs > 1 {
        let mut kids = Children::spawn(procs)?;
        let mut opened = 0;
        let mut errors = BTreeMap::<String, usize>::new();
        for r in kids
            .collect("READY", deadline + Duration::from_secs(10))
            .await?
        {
            opened += r["opened"].as_u64().unwrap_or(0) as usize;
            merge_counts(&mut errors, &r["errors"]);
        }
        return Ok(Subscribers {
            local: None,
            children: Some(kids),
            opened,
            errors,
        });
    }
    let (local, opened, errors) = here().await;
    Ok(Subscribers {
        local: Some(local),
        children: None,
        opened,
        errors,
    })
}

/// Seconds from the first publish (`started_us` µs since the epoch, `started`) to the
/// last delivery (`last_us`); the time elapsed when nothing was delivered after it.
pub(crate) fn secs_to_last_delivery(last_us: u64, started_us: u64, started: Instant) -> f64 {
    if last_us > started_us {
        (last_us - started_us) as f64 / 1e6
    } else {
        started.elapsed().as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::node_url;

    #[test]
    fn subscriber_processes_are_spread_round_robin_over_the_nodes() {
        let urls = "ws://127.0.0.1:1/ws,ws://127.0.0.1:2/ws,ws://127.0.0.1:3/ws";
        let got: Vec<_> = (0..6).map(|k| node_url(urls, Some(k), 6).ok()).collect();
        assert_eq!(got[0], got[3]);
        assert_eq!(got[1], Some("ws://127.0.0.1:2/ws"));
        assert_eq!(node_url("ws://a/ws", None, 1), Ok("ws://a/ws"));
        assert!(
            node_url(urls, Some(0), 1).is_err(),
            "one process cannot cover three nodes"
        );
        assert!(
            node_url(urls, Some(0), 4).is_err(),
            "4 processes over 3 nodes is uneven"
        );
    }
}
