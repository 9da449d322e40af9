//! `tether bench chat`: a chat-like load. N connections over C channels (connection
//! `i` on channel `i % C`, so C = N / 5 makes rooms of 5), then P publishers posting
//! through the HTTP API (Tether `POST {api}/api/publish`, Nchan
//! `POST {api}/pub/{channel}`) to channels picked at random (a seeded SplitMix64 per
//! publisher), each publisher sending its next publish when the previous is answered
//! (or paced: `--rate` publishes/s over all publishers), for `--secs` seconds or
//! `--messages` publishes, whichever ends first. Every payload carries its send time
//! (`"t":<µs>`), so the receivers (the lean ones of `fanout`) measure
//! publish→deliver latency.
//!
//! What it reports: publishes/s accepted (2xx answers, over the publishing time),
//! deliveries/s (from the first publish to the last delivery), latency p50/p99/p99.9/
//! max, and the deliveries expected from the accepted publishes (for each channel,
//! its accepted publishes × its ready subscribers) against those received.
//!
//! `--procs N` spreads the subscribers over N child processes as `fanout` does (one
//! process holds at most ~19.9k sockets here); only the parent publishes. After the
//! publishing it sends each child `PUBLISHED [accepted per channel…]`, from which the
//! child knows how many deliveries its own receivers are due.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::hist::{Hist, SparseHist};
use crate::lean::{Endpoint, Received};
use crate::procs::{self, Children};
use crate::{
    check_sources, default_url, endpoint, now_micros, open_all, open_subscribers,
    processes_cpu_secs, processes_memory, secs_to_last_delivery, Bounds, Publisher, ServerArgs,
    SpreadArgs, Subscribers,
};

/// `tether bench chat …`.
#[derive(Args, Debug)]
pub struct ChatArgs {
    /// Subscriber URL [default: tether ws://127.0.0.1:7700/ws, nchan
    /// ws://127.0.0.1:80/sub]; as for `fanout` (Nchan: `{url}/{channel}`).
    #[arg(long)]
    url: Option<String>,
    #[command(flatten)]
    server: ServerArgs,
    /// Connections (subscribers), connection i on channel i % channels.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Channels, named `{channel_prefix}_{k}`.
    #[arg(long, default_value_t = 2_000)]
    channels: usize,
    /// Concurrent publishers (each has one publish in flight at a time).
    #[arg(long, default_value_t = 8)]
    publishers: usize,
    /// How long to publish, seconds (0: until --messages).
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    /// Stop after this many publishes (sent, over all publishers); 0 = only --secs.
    #[arg(long, default_value_t = 0)]
    messages: usize,
    /// Publishes per second over all publishers; 0 = each as soon as the previous
    /// one of its publisher is answered.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Payload bytes per message (padding included).
    #[arg(long, default_value_t = 100)]
    bytes: usize,
    /// Channel name prefix (A-Z a-z 0-9 _; Nchan's `/sub/(\w+)` location takes no
    /// `-` or `.`).
    #[arg(long, default_value = "chat")]
    channel_prefix: String,
    /// Seed of the publishers' channel picks (publisher w uses seed + w).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    spread: SpreadArgs,
    /// Pause between every subscriber being ready and the first publish, ms.
    #[arg(long, default_value_t = 200)]
    settle_ms: u64,
    /// After the last publish, stop waiting once no delivery arrived for this long.
    #[arg(long, default_value_t = 5)]
    drain_secs: u64,
    /// Read buffer per subscriber, KiB (grown for a larger frame).
    #[arg(long, default_value_t = 4)]
    buf_kib: usize,
    /// Give up connecting after this many seconds (the run as a whole is bounded by
    /// this, --secs and --drain-secs).
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Internal: this process is child K of `--procs`.
    #[arg(long, hide = true)]
    child: Option<usize>,
}

/// SplitMix64: a small, seedable generator for the channel picks (no dependency).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0; multiply-shift, no modulo bias worth the name).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// The channel of connection `i`.
pub fn channel_of(i: usize, channels: usize) -> usize {
    i % channels.max(1)
}

/// The name of channel `k` (`_`: a word character, as Nchan's `\w+` locations want).
pub fn channel_name(prefix: &str, k: usize) -> String {
    format!("{prefix}_{k}")
}

/// Deliveries due: for each ready receiver, the publishes its channel accepted.
pub fn expected_deliveries(accepted: &[u64], receiver_channels: &[usize]) -> u64 {
    receiver_channels
        .iter()
        .map(|&c| accepted.get(c).copied().unwrap_or(0))
        .sum()
}

/// `count / secs`, None without a positive duration.
pub fn per_sec(count: u64, secs: f64) -> Option<f64> {
    (secs > 0.0 && secs.is_finite()).then(|| count as f64 / secs)
}

/// What one process's receivers saw (a child prints it as `RESULT {…}`).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ChatPart {
    /// Messages received.
    pub delivered: u64,
    /// Messages due to these receivers (from the accepted publishes).
    pub expected: u64,
    /// Publish→deliver latency, µs.
    pub hist: SparseHist,
    /// The last delivery, µs since the epoch.
    pub last_us: u64,
    /// Receivers that ended before being told to stop (the server closed, an error).
    pub ended_early: usize,
    /// Why they ended.
    pub ends: BTreeMap<String, usize>,
}

/// The parts of every process, added up (the histogram merged).
pub fn merge_parts(parts: &[ChatPart]) -> (ChatPart, Hist) {
    let mut total = ChatPart::default();
    let mut hist = Hist::default();
    for p in parts {
        total.delivered += p.delivered;
        total.expected += p.expected;
        total.last_us = total.last_us.max(p.last_us);
        total.ended_early += p.ended_early;
        hist.merge_sparse(&p.hist);
        for (k, v) in &p.ends {
            *total.ends.entry(k.clone()).or_default() += v;
        }
    }
    total.hist = hist.sparse();
    (total, hist)
}

/// What the publishers did.
#[derive(Debug, Default)]
pub struct Published {
    /// Accepted (2xx) publishes per channel.
    pub accepted: Vec<u64>,
    /// Refused or failed publishes, by status or error kind.
    pub errors: BTreeMap<String, usize>,
    /// From the first publish sent to the last one answered, s.
    pub secs: f64,
}

impl Published {
    /// Accepted publishes in all.
    pub fn accepted_total(&self) -> u64 {
        self.accepted.iter().sum()
    }

    /// Failed publishes in all.
    pub fn errors_total(&self) -> u64 {
        self.errors.values().map(|&v| v as u64).sum()
    }
}

/// The figures of a run, for [`report`].
#[derive(Debug)]
pub struct Report<'a> {
    /// The run's arguments.
    pub args: &'a ChatArgs,
    /// The subscriber URL.
    pub url: &'a str,
    /// The publish base URL.
    pub api: &'a str,
    /// Subscribers ready.
    pub opened: usize,
    /// Connect errors by reason.
    pub connect_errors: &'a BTreeMap<String, usize>,
    /// The publishers' side.
    pub published: &'a Published,
    /// The receivers' side, merged.
    pub received: &'a ChatPart,
    /// Its latency histogram.
    pub hist: &'a Hist,
    /// First publish to last delivery, s.
    pub total_secs: f64,
    /// Server CPU seconds over the publishing and draining.
    pub cpu: Option<f64>,
    /// Server (RSS, PSS) KiB after.
    pub mem: Option<(u64, u64)>,
}

/// The scenario's JSON object.
pub fn report(r: &Report<'_>) -> Value {
    let a = r.args;
    let accepted = r.published.accepted_total();
    let delivered = r.received.delivered;
    let connect_errors: usize = r.connect_errors.values().sum();
    json!({
        "scenario": "chat",
        "target": a.server.target,
        "transport": a.server.transport,
        "url": r.url,
        "api": r.api,
        "connections": a.connections,
        "opened": r.opened,
        "channels": a.channels,
        "publishers": a.publishers,
        "rate": a.rate,
        "secs": a.secs,
        "messages": a.messages,
        "bytes": a.bytes,
        "procs": a.spread.procs.max(1),
        "sources": a.spread.sources,
        "errors": {
            "connect": connect_errors,
            "publish": r.published.errors_total(),
            "receivers_ended_early": r.received.ended_early,
            "missing_deliveries": r.received.expected.saturating_sub(delivered),
        },
        "connect_errors": r.connect_errors,
        "publish_errors": r.published.errors,
        "receiver_ends": r.received.ends,
        "publishes_accepted": accepted,
        "publish_secs": r.published.secs,
        "publishes_per_sec": per_sec(accepted, r.published.secs),
        "expected_deliveries": r.received.expected,
        "deliveries": delivered,
        "total_secs": r.total_secs,
        "deliveries_per_sec": per_sec(delivered, r.total_secs),
        "latency_samples": r.hist.len(),
        "latency_ms_p50": r.hist.percentile_ms(0.50),
        "latency_ms_p99": r.hist.percentile_ms(0.99),
        "latency_ms_p999": r.hist.percentile_ms(0.999),
        "latency_ms_max": r.hist.max_ms(),
        "server_pids": a.spread.pid,
        "server_cpu_secs": r.cpu,
        "server_cpu_us_per_delivery": r.cpu.filter(|_| delivered > 0).map(|c| c * 1e6 / delivered as f64),
        "server_rss_kib": r.mem.map(|m| m.0),
        "server_pss_kib": r.mem.map(|m| m.1),
    })
}

/// This process's receivers, each with its channel.
struct Local {
    tasks: Vec<(usize, tokio::task::JoinHandle<Received>)>,
    stop: watch::Sender<bool>,
    progress: Arc<AtomicU64>,
}

impl Local {
    /// The channel of every ready receiver.
    fn channels(&self) -> Vec<usize> {
        self.tasks.iter().map(|(c, _)| *c).collect()
    }

    /// Waits until the receivers have `expected` messages between them, or none
    /// arrived for `drain`, or `deadline`; then stops them and adds up what they saw.
    async fn finish(
        self,
        expected: u64,
        drain: Duration,
        deadline: tokio::time::Instant,
    ) -> ChatPart {
        let mut last = self.progress.load(Ordering::Relaxed);
        let mut last_change = tokio::time::Instant::now();
        while last < expected {
            let now = tokio::time::Instant::now();
            if now >= deadline || now.duration_since(last_change) >= drain {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            let p = self.progress.load(Ordering::Relaxed);
            if p != last {
                last = p;
                last_change = tokio::time::Instant::now();
            }
        }
        let _ = self.stop.send(true);
        let mut part = ChatPart {
            expected,
            ..ChatPart::default()
        };
        let mut hist = Hist::default();
        for (_, t) in self.tasks {
            match t.await {
                Ok((stats, end, _socket)) => {
                    part.delivered += stats.got as u64;
                    part.last_us = part.last_us.max(stats.last_us);
                    for l in stats.lat {
                        hist.record(u64::from(l));
                    }
                    // Every receiver ends by being stopped unless something ended it first.
                    if let Some(e) = end.filter(|e| !e.starts_with("stopped")) {
                        part.ended_early += 1;
                        *part.ends.entry(e).or_default() += 1;
                    }
                }
                Err(e) => {
                    part.ended_early += 1;
                    *part.ends.entry(format!("task: {e}")).or_default() += 1;
                }
            }
        }
        part.hist = hist.sparse();
        part
    }
}

#[allow(clippy::too_many_arguments)]
async fn start_local(
    eps: &[Arc<Endpoint>],
    indices: Vec<usize>,
    sources: &[IpAddr],
    concurrency: usize,
    buf: usize,
    deadline: tokio::time::Instant,
) -> (Local, BTreeMap<String, usize>) {
    let (stop, stop_rx) = watch::channel(false);
    let progress = Arc::new(AtomicU64::new(0));
    let channels = eps.len();
    let (tasks, errors) = open_all(
        eps,
        indices,
        "chat",
        sources,
        concurrency,
        buf,
        0,
        deadline,
        |i, c| {
            let (rx, p) = (stop_rx.clone(), progress.clone());
            // Receives until stopped: how many messages a channel gets is not known
            // in advance.
            (
                channel_of(i, channels),
                tokio::spawn(c.receive(usize::MAX, rx, p)),
            )
        },
    )
    .await;
    (
        Local {
            tasks,
            stop,
            progress,
        },
        errors,
    )
}

/// Runs the publishers: until `secs` have passed since the first publish or
/// `messages` (when > 0) have been sent.
async fn publish(a: &ChatArgs, publisher: Publisher, names: Arc<Vec<String>>) -> Published {
    let publisher = Arc::new(publisher);
    let pad = Arc::new("x".repeat(a.bytes.saturating_sub(40)));
    let next = Arc::new(AtomicUsize::new(0));
    let interval = (a.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / a.rate));
    // --secs 0: only the count bounds it (`run` requires one of the two).
    let until = (a.secs > 0.0).then(|| Duration::from_secs_f64(a.secs.min(86_400.0)));
    let (messages, channels) = (a.messages, names.len());
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..a.publishers.max(1) {
        let (publisher, pad, next, names) =
            (publisher.clone(), pad.clone(), next.clone(), names.clone());
        let mut rng = SplitMix64::new(a.seed.wrapping_add(w as u64));
        workers.push(tokio::spawn(async move {
            let mut accepted = vec![0u64; channels];
            let mut errors = BTreeMap::<String, usize>::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if messages > 0 && i >= messages {
                    break;
                }
                if let Some(iv) = interval {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(
                        started + iv.mul_f64(i as f64),
                    ))
                    .await;
                }
                if until.is_some_and(|u| started.elapsed() >= u) {
                    break;
                }
                let ch = rng.below(channels);
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    publisher.publish_to(&names[ch], now_micros(), &pad),
                )
                .await
                .unwrap_or_else(|_| Err("timeout".into()));
                match r {
                    Ok(()) => accepted[ch] += 1,
                    Err(e) => *errors.entry(e).or_default() += 1,
                }
            }
            (accepted, errors)
        }));
    }
    let mut out = Published {
        accepted: vec![0; channels],
        ..Published::default()
    };
    for w in workers {
        match w.await {
            Ok((acc, errs)) => {
                for (t, v) in out.accepted.iter_mut().zip(acc) {
                    *t += v;
                }
                for (k, v) in errs {
                    *out.errors.entry(k).or_default() += v;
                }
            }
            Err(e) => *out.errors.entry(format!("publisher: {e}")).or_default() += 1,
        }
    }
    out.secs = started.elapsed().as_secs_f64();
    out
}

/// Where a `chat` run's subscribers connect (an endpoint per channel) and its
/// publishes go, and its bounds.
struct ChatPlan {
    url: String,
    api: String,
    names: Arc<Vec<String>>,
    eps: Vec<Arc<Endpoint>>,
    bounds: Bounds,
}

impl ChatPlan {
    /// Checks the flags and resolves the endpoints and the API.
    async fn new(a: &ChatArgs) -> Result<ChatPlan, String> {
        check_sources(&a.spread.sources)?;
        if a.connections == 0 || a.channels == 0 {
            return Err("need at least one connection and one channel".into());
        }
        if a.messages == 0 && !(a.secs > 0.0 && a.secs.is_finite()) {
            return Err("bound the run: --secs > 0 or --messages > 0".into());
        }
        let url = a.url.clone().unwrap_or(default_url(a.server.target).into());
        // One endpoint per channel (the name is checked once: the others differ only in
        // their number).
        let first = endpoint(
            a.server.target,
            a.server.transport,
            &url,
            Some(channel_name(&a.channel_prefix, 0)),
        )
        .await?;
        let names: Arc<Vec<String>> = Arc::new(
            (0..a.channels)
                .map(|k| channel_name(&a.channel_prefix, k))
                .collect(),
        );
        let eps: Vec<Arc<Endpoint>> = names
            .iter()
            .map(|n| {
                Arc::new(Endpoint {
                    channel: Some(n.clone()),
                    ..first.clone()
                })
            })
            .collect();
        let api = a.server.api(&first.host).await?;
        Ok(ChatPlan {
            url,
            api,
            names,
            eps,
            bounds: Bounds::new(a.timeout_secs, a.drain_secs, a.spread.procs, a.buf_kib),
        })
    }

    /// Opens the connections `indices` in this process and starts their receivers.
    async fn start(
        &self,
        a: &ChatArgs,
        indices: Vec<usize>,
    ) -> (Local, usize, BTreeMap<String, usize>) {
        let s = &a.spread;
        let (local, errors) = start_local(
            &self.eps,
            indices,
            &s.sources,
            s.concurrency,
            self.bounds.buf,
            self.bounds.deadline,
        )
        .await;
        let opened = local.tasks.len();
        (local, opened, errors)
    }
}

/// Child `k` of `--procs`: opens its share, prints `READY`, waits for
/// `PUBLISHED [accepted per channel]` (or EOF), drains and prints its `RESULT`.
async fn chat_child(a: &ChatArgs, plan: &ChatPlan, k: usize) -> Result<(), String> {
    let (local, opened, errors) = plan
        .start(a, procs::share(k, plan.bounds.procs, a.connections))
        .await;
    println!("READY {}", json!({"opened": opened, "errors": errors}));
    let mut orders = procs::stdin_lines();
    // `PUBLISHED [accepted per channel]` (or EOF: the parent is gone).
    let publishing = Duration::from_secs_f64(a.secs.clamp(0.0, 86_400.0));
    let accepted: Vec<u64> = tokio::time::timeout_at(plan.bounds.deadline + publishing, async {
        while let Some(line) = orders.recv().await {
            if let Some(v) = line.trim().strip_prefix("PUBLISHED") {
                return serde_json::from_str(v.trim()).unwrap_or_default();
            }
        }
        Vec::new()
    })
    .await
    .unwrap_or_default();
    let expected = expected_deliveries(&accepted, &local.channels());
    let part = local
        .finish(
            expected,
            plan.bounds.drain,
            tokio::time::Instant::now() + plan.bounds.drain * 12,
        )
        .await;
    println!(
        "RESULT {}",
        serde_json::to_string(&part).map_err(|e| e.to_string())?
    );
    Ok(())
}

/// Every process's part once the publishing is over: this one's receivers drained,
/// or the children told `PUBLISHED [accepted per channel]` and their `RESULT` lines
/// read. The receivers get until the last delivery plus `drain` of quiet, and at most
/// 12 × drain (a server that trickles cannot hold the run forever).
async fn collect_parts(
    local: Option<Local>,
    children: Option<&mut Children>,
    published: &Published,
    drain: Duration,
) -> Result<Vec<ChatPart>, String> {
    let drain_deadline = tokio::time::Instant::now() + drain * 12;
    let mut parts = Vec::new();
    if let Some(l) = local {
        let expected = expected_deliveries(&published.accepted, &l.channels());
        parts.push(l.finish(expected, drain, drain_deadline).await);
    }
    if let Some(kids) = children {
        kids.tell(&format!(
            "PUBLISHED {}",
            serde_json::to_string(&published.accepted).map_err(|e| e.to_string())?
        ));
        for v in kids
            .collect("RESULT", drain_deadline + Duration::from_secs(30))
            .await?
        {
            parts.push(serde_json::from_value(v).map_err(|e| format!("child RESULT: {e}"))?);
        }
    }
    Ok(parts)
}

/// `tether bench chat`.
pub async fn run(a: ChatArgs) -> Result<(), String> {
    let plan = ChatPlan::new(&a).await?;
    if let Some(k) = a.child {
        return chat_child(&a, &plan, k).await;
    }
    let publisher = Publisher::new(a.server.target, &plan.api, &plan.names[0])?;
    let subs = open_subscribers(plan.bounds.procs, plan.bounds.deadline, || {
        plan.start(&a, (0..a.connections).collect())
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(a.settle_ms)).await;
    let cpu_before = processes_cpu_secs(&a.spread.pid)?;
    let started_us = now_micros();
    let started = Instant::now();
    let published = publish(&a, publisher, plan.names.clone()).await;
    let Subscribers {
        local,
        mut children,
        opened,
        errors: connect_errors,
    } = subs;
    let parts = collect_parts(local, children.as_mut(), &published, plan.bounds.drain).await?;
    let cpu_after = processes_cpu_secs(&a.spread.pid)?;
    let mem = processes_memory(&a.spread.pid)?;
    if let Some(kids) = children {
        kids.finish(Duration::from_secs(10)).await;
    }
    let (received, hist) = merge_parts(&parts);
    let out = report(&Report {
        args: &a,
        url: &plan.url,
        api: &plan.api,
        opened,
        connect_errors: &connect_errors,
        published: &published,
        received: &received,
        hist: &hist,
        total_secs: secs_to_last_delivery(received.last_us, started_us, started),
        cpu: cpu_before.zip(cpu_after).map(|(b, a)| a - b),
        mem,
    });
    println!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        args: ChatArgs,
    }

    fn args(extra: &[&str]) -> ChatArgs {
        let mut v = vec!["chat"];
        v.extend_from_slice(extra);
        Cli::try_parse_from(v).unwrap().args
    }

    #[test]
    fn defaults_are_the_issue_s_load() {
        let a = args(&[]);
        assert_eq!(
            (a.connections, a.channels, a.publishers, a.secs),
            (10_000, 2_000, 8, 10.0)
        );
        assert_eq!(a.server.target, crate::Target::Tether);
        assert_eq!(channel_name(&a.channel_prefix, 17), "chat_17");
        // Rooms of five: every channel gets connections / channels subscribers.
        let mut per = vec![0usize; a.channels];
        for i in 0..a.connections {
            per[channel_of(i, a.channels)] += 1;
        }
        assert!(per.iter().all(|&n| n == 5));
    }

    #[test]
    fn picks_are_seeded_uniform_and_in_range() {
        let (mut a, mut b) = (SplitMix64::new(7), SplitMix64::new(7));
        let n = 2_000;
        let mut counts = vec![0u32; n];
        for _ in 0..200_000 {
            let x = a.below(n);
            assert_eq!(x, b.below(n));
            counts[x] += 1;
        }
        // 100 expected per channel: every channel is hit, none wildly over.
        assert!(
            counts.iter().all(|&c| (40..=170).contains(&c)),
            "{counts:?}"
        );
        assert_ne!(SplitMix64::new(1).next_u64(), SplitMix64::new(2).next_u64());
        assert_eq!(SplitMix64::new(3).below(1), 0);
    }

    #[test]
    fn expected_counts_each_receiver_s_channel() {
        let accepted = [3, 0, 5];
        // Channel 0 has two receivers, channel 2 one, channel 1 none ready; an
        // out-of-range channel counts nothing.
        assert_eq!(expected_deliveries(&accepted, &[0, 2, 0, 9]), 3 + 5 + 3);
        assert_eq!(expected_deliveries(&[], &[0, 1]), 0);
    }

    #[test]
    fn rates_need_a_duration() {
        assert_eq!(per_sec(500, 2.0), Some(250.0));
        assert_eq!(per_sec(500, 0.0), None);
        assert_eq!(per_sec(0, f64::NAN), None);
    }

    #[test]
    fn parts_merge_and_survive_the_child_line() {
        let mut h1 = Hist::default();
        let mut h2 = Hist::default();
        for us in 1..=99u64 {
            h1.record(us * 1_000); // 1..99 ms
        }
        h2.record(500_000); // one 500 ms outlier
        let p1 = ChatPart {
            delivered: 99,
            expected: 100,
            hist: h1.sparse(),
            last_us: 10,
            ended_early: 1,
            ends: BTreeMap::from([("closed by the server".to_owned(), 1)]),
        };
        let p2 = ChatPart {
            delivered: 1,
            expected: 1,
            hist: h2.sparse(),
            last_us: 20,
            ..ChatPart::default()
        };
        // A child ships its part as JSON.
        let line = serde_json::to_string(&p2).unwrap();
        let p2: ChatPart = serde_json::from_str(&line).unwrap();
        let (total, hist) = merge_parts(&[p1, p2]);
        assert_eq!((total.delivered, total.expected), (100, 101));
        assert_eq!(total.last_us, 20);
        assert_eq!(total.ended_early, 1);
        assert_eq!(total.ends["closed by the server"], 1);
        assert_eq!(hist.len(), 100);
        assert_eq!(hist.max_ms(), Some(500.0));
        // 1..=99 ms and one 500 ms: the median is the 51st sample.
        let p50 = hist.percentile_ms(0.5).unwrap();
        assert!((p50 - 51.0).abs() < 0.5, "{p50}");
        let p99 = hist.percentile_ms(0.99).unwrap();
        assert!((p99 - 99.0).abs() < 1.0, "{p99}");
    }

    /// A run's figures: 10 connections over 2 channels, 9 ready, 10 publishes accepted
    /// and 2 refused over 2 s, 48 of 50 deliveries over 4 s, latencies 1, 2 and 3 ms.
    struct Sample {
        args: ChatArgs,
        published: Published,
        hist: Hist,
        received: ChatPart,
        connect_errors: BTreeMap<String, usize>,
    }

    fn sample() -> Sample {
        let args = args(&[
            "--connections",
            "10",
            "--channels",
            "2",
            "--publishers",
            "3",
        ]);
        let published = Published {
            accepted: vec![4, 6],
            errors: BTreeMap::from([("status 503".to_owned(), 2)]),
            secs: 2.0,
        };
        let mut hist = Hist::default();
        for us in [1_000u64, 2_000, 3_000] {
            hist.record(us);
        }
        let received = ChatPart {
            delivered: 48,
            expected: 50,
            hist: hist.sparse(),
            last_us: 0,
            ended_early: 0,
            ends: BTreeMap::new(),
        };
        let connect_errors = BTreeMap::from([("status 503".to_owned(), 1)]);
        Sample {
            args,
            published,
            hist,
            received,
            connect_errors,
        }
    }

    impl Sample {
        fn report(&self) -> Report<'_> {
            Report {
                args: &self.args,
                url: "ws://127.0.0.1:1/ws",
                api: "http://127.0.0.1:2",
                opened: 9,
                connect_errors: &self.connect_errors,
                published: &self.published,
                received: &self.received,
                hist: &self.hist,
                total_secs: 4.0,
                cpu: Some(0.096),
                mem: Some((1000, 900)),
            }
        }
    }

    #[test]
    fn report_json() {
        let s = sample();
        let v = report(&s.report());
        assert_eq!(v["scenario"], "chat");
        assert_eq!(v["target"], "tether");
        assert_eq!(v["transport"], "ws");
        assert_eq!(
            (v["connections"].as_u64(), v["opened"].as_u64()),
            (Some(10), Some(9))
        );
        assert_eq!(
            (v["channels"].as_u64(), v["publishers"].as_u64()),
            (Some(2), Some(3))
        );
        assert_eq!(v["publishes_accepted"], 10);
        assert_eq!(v["publishes_per_sec"], 5.0);
        assert_eq!(v["deliveries"], 48);
        assert_eq!(v["deliveries_per_sec"], 12.0);
        assert_eq!(v["errors"]["connect"], 1);
        assert_eq!(v["errors"]["publish"], 2);
        assert_eq!(v["errors"]["missing_deliveries"], 2);
        assert_eq!(v["publish_errors"]["status 503"], 2);
        assert_eq!(v["latency_samples"], 3);
        // The histogram is within 0.8 % above 256 µs; the maximum is exact.
        let near = |k: &str, want: f64| (v[k].as_f64().unwrap() - want).abs() <= want * 0.008;
        assert!(near("latency_ms_p50", 2.0), "{}", v["latency_ms_p50"]);
        assert!(near("latency_ms_p99", 3.0), "{}", v["latency_ms_p99"]);
        assert_eq!(v["latency_ms_max"], 3.0);
        assert!((v["server_cpu_us_per_delivery"].as_f64().unwrap() - 2000.0).abs() < 1e-6);
        assert_eq!(v["server_pss_kib"], 900);
    }

    #[test]
    fn report_without_time_or_cpu_has_no_rates() {
        let s = sample();
        // No time, no rate (null, not a division by zero).
        let none = report(&Report {
            url: "",
            api: "",
            opened: 0,
            total_secs: 0.0,
            published: &Published::default(),
            cpu: None,
            mem: None,
            ..s.report()
        });
        assert!(none["deliveries_per_sec"].is_null());
        assert!(none["publishes_per_sec"].is_null());
        assert!(none["server_cpu_us_per_delivery"].is_null());
    }
}
