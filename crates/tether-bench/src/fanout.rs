//! `tether bench fanout`: N subscribers on one channel (here or spread over `--procs`
//! child processes), M publishes of B bytes from the parent, back-to-back or paced;
//! deliveries/s, publish→deliver latency and the server's CPU and memory.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::watch;

use crate::hist::Hist;
use crate::lean::Endpoint;
use crate::procs::{self, Children};
use crate::{
    check_sources, default_url, endpoint, node_url, now_micros, open_subscribers,
    processes_cpu_secs, processes_memory, secs_to_last_delivery, start_local, statspoll, Bounds,
    FanoutArgs, Local, Part, Publisher, Subscribers, Target,
};

/// Where a `fanout` run's subscribers connect and its publishes go, and its bounds.
struct FanoutPlan {
    url: String,
    api: String,
    ep: Arc<Endpoint>,
    bounds: Bounds,
}

impl FanoutPlan {
    /// Checks the flags and resolves the endpoint (this process's node) and API.
    async fn new(a: &FanoutArgs) -> Result<FanoutPlan, String> {
        check_sources(&a.spread.sources)?;
        let url = a.url.clone().unwrap_or(default_url(a.server.target).into());
        let ep = Arc::new(
            endpoint(
                a.server.target,
                a.server.transport,
                node_url(&url, a.child, a.spread.procs)?,
                Some(a.channel.clone()),
            )
            .await?,
        );
        let api = a.server.api(&ep.host).await?;
        Ok(FanoutPlan {
            url,
            api,
            ep,
            bounds: Bounds::new(a.timeout_secs, a.drain_secs, a.spread.procs, a.buf_kib),
        })
    }

    /// Opens the subscribers `indices` in this process and starts their receivers.
    async fn start(
        &self,
        a: &FanoutArgs,
        indices: Vec<usize>,
    ) -> (Local, usize, BTreeMap<String, usize>) {
        let s = &a.spread;
        start_local(
            &self.ep,
            indices,
            &s.sources,
            s.concurrency,
            self.bounds.buf,
            a.messages,
            self.bounds.deadline,
        )
        .await
    }
}

/// Child `k` of `--procs`: opens its share, prints `READY`, waits for `PUBLISHED` (or
/// EOF: the parent is gone), drains and prints its `RESULT`.
async fn fanout_child(a: &FanoutArgs, plan: &FanoutPlan, k: usize) -> Result<(), String> {
    let (local, opened, errors) = plan
        .start(a, procs::share(k, plan.bounds.procs, a.subscribers))
        .await;
    println!("READY {}", json!({"opened": opened, "errors": errors}));
    let mut orders = procs::stdin_lines();
    // PUBLISHED (or EOF: the parent is gone) starts the drain clock.
    let _ = tokio::time::timeout_at(plan.bounds.deadline, async {
        while let Some(line) = orders.recv().await {
            if line.trim() == "PUBLISHED" {
                break;
            }
        }
    })
    .await;
    let part = local.finish(plan.bounds.drain, plan.bounds.deadline).await;
    println!(
        "RESULT {}",
        serde_json::to_string(&part).map_err(|e| e.to_string())?
    );
    Ok(())
}

/// How a burst's publishes go out: paced at `interval` by one publisher, or
/// back-to-back by `publishers` with one publish in flight each.
#[derive(Clone, Copy)]
struct Pace {
    interval: Option<Duration>,
    publishers: usize,
}

impl Pace {
    fn of(a: &FanoutArgs) -> Pace {
        let interval = (a.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / a.rate));
        let publishers = if interval.is_some() {
            1
        } else {
            a.publishers.clamp(1, a.messages.max(1))
        };
        Pace {
            interval,
            publishers,
        }
    }
}

/// Sends `messages` publishes of `{"t":now,"p":pad}` from `started`; the count the
/// server did not accept.
async fn publish_burst(
    publisher: Publisher,
    pad: String,
    messages: usize,
    pace: Pace,
    started: Instant,
) -> Result<usize, String> {
    let publisher = Arc::new(publisher);
    let pad = Arc::new(pad);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..pace.publishers {
        let (publisher, pad, next) = (publisher.clone(), pad.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut errors = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= messages {
                    break errors;
                }
                if let Some(iv) = pace.interval {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(
                        started + iv.mul_f64(i as f64),
                    ))
                    .await;
                }
                if !publisher.publish(now_micros(), &pad).await {
                    errors += 1;
                }
            }
        }));
    }
    let mut publish_errors = 0usize;
    for w in workers {
        publish_errors += w.await.map_err(|e| format!("publisher: {e}"))?;
    }
    Ok(publish_errors)
}

/// Every process's part: this one's receivers drained, or the children told
/// `PUBLISHED` and their `RESULT` lines read.
async fn collect_parts(
    local: Option<Local>,
    children: Option<&mut Children>,
    drain: Duration,
    deadline: tokio::time::Instant,
) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    if let Some(l) = local {
        parts.push(l.finish(drain, deadline).await);
    }
    if let Some(kids) = children {
        kids.tell("PUBLISHED");
        for v in kids
            .collect("RESULT", deadline + drain + Duration::from_secs(30))
            .await?
        {
            parts.push(serde_json::from_value(v).map_err(|e| format!("child RESULT: {e}"))?);
        }
    }
    Ok(parts)
}

/// `--poll-stats-ms`: polls the API's stats from the first publish until every
/// receiver is done (Tether only; None otherwise).
fn start_stats_poll(
    a: &FanoutArgs,
    api: &str,
    stop: watch::Receiver<bool>,
) -> Result<Option<std::thread::JoinHandle<statspoll::Polled>>, String> {
    if a.poll_stats_ms == 0 || a.server.target != Target::Tether {
        return Ok(None);
    }
    statspoll::spawn(
        format!("{}/api/stats", api.trim_end_matches('/')),
        Duration::from_millis(a.poll_stats_ms),
        stop,
    )
    .map(Some)
    .map_err(|e| format!("stats poller: {e}"))
}

/// The stats poll's figures (after its stop was sent), the reason there are none
/// (Nchan), or null without `--poll-stats-ms`.
async fn stats_poll_result(
    a: &FanoutArgs,
    poller: Option<std::thread::JoinHandle<statspoll::Polled>>,
) -> Result<serde_json::Value, String> {
    Ok(match poller {
        Some(p) => tokio::task::spawn_blocking(move || p.join())
            .await
            .map_err(|e| format!("stats poller: {e}"))?
            .map_err(|_| "stats poller panicked".to_owned())?
            .to_json(a.poll_stats_ms),
        None if a.poll_stats_ms > 0 => {
            eprintln!("tether bench: --poll-stats-ms: Nchan has no stats endpoint, not polled");
            statspoll::unavailable(a.server.target)
        }
        None => serde_json::Value::Null,
    })
}

/// Every process's part added up.
#[derive(Default)]
struct Merged {
    delivered: u64,
    last_us: u64,
    incomplete: usize,
    ends: BTreeMap<String, usize>,
    hist: Hist,
}

fn merge_fanout_parts(parts: &[Part]) -> Merged {
    let mut m = Merged::default();
    for p in parts {
        m.delivered += p.delivered;
        m.last_us = m.last_us.max(p.last_us);
        m.incomplete += p.incomplete;
        m.hist.merge_sparse(&p.hist);
        for (k, v) in &p.ends {
            *m.ends.entry(k.clone()).or_default() += v;
        }
    }
    m
}

/// The measured side of a `fanout` run, for its JSON.
struct FanoutFigures {
    opened: usize,
    errors: BTreeMap<String, usize>,
    pace: Pace,
    publish_errors: usize,
    published_secs: f64,
    total_secs: f64,
    merged: Merged,
    cpu: Option<f64>,
    mem: Option<(u64, u64)>,
}

/// The scenario's JSON object (without `stats_poll`).
fn fanout_json(a: &FanoutArgs, plan: &FanoutPlan, f: &FanoutFigures) -> serde_json::Value {
    let (m, delivered, cpu) = (&f.merged, f.merged.delivered, f.cpu);
    json!({
        "scenario": "fanout",
        "target": a.server.target,
        "transport": a.server.transport,
        "url": plan.url,
        "api": plan.api,
        "mode": if f.pace.interval.is_some() { "paced" } else { "back_to_back" },
        "rate": a.rate,
        "publishers": f.pace.publishers,
        "subscribers": a.subscribers,
        "opened": f.opened,
        "errors": f.errors,
        "messages": a.messages,
        "bytes": a.bytes,
        "procs": plan.bounds.procs,
        "sources": a.spread.sources,
        "publish_errors": f.publish_errors,
        "expected_deliveries": f.opened * a.messages,
        "deliveries": delivered,
        "incomplete_receivers": m.incomplete,
        "receiver_ends": m.ends,
        "publish_secs": f.published_secs,
        "total_secs": f.total_secs,
        "deliveries_per_sec": delivered as f64 / f.total_secs,
        "latency_samples": m.hist.len(),
        "latency_ms_p50": m.hist.percentile_ms(0.50),
        "latency_ms_p99": m.hist.percentile_ms(0.99),
        "latency_ms_p999": m.hist.percentile_ms(0.999),
        "latency_ms_max": m.hist.max_ms(),
        "server_pid": a.spread.pid.first(),
        "server_pids": a.spread.pid,
        "server_cpu_secs": cpu,
        "server_cpu_us_per_delivery": cpu.filter(|_| delivered > 0).map(|c| c * 1e6 / delivered as f64),
        "server_rss_kib": f.mem.map(|m| m.0),
        "server_pss_kib": f.mem.map(|m| m.1),
    })
}

/// `tether bench fanout`.
pub(crate) async fn run(a: FanoutArgs) -> Result<(), String> {
    let plan = FanoutPlan::new(&a).await?;
    if let Some(k) = a.child {
        return fanout_child(&a, &plan, k).await;
    }
    let publisher = Publisher::new(a.server.target, &plan.api, &a.channel)?;
    let subs = open_subscribers(plan.bounds.procs, plan.bounds.deadline, || {
        plan.start(&a, (0..a.subscribers).collect())
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(a.settle_ms)).await;
    let pad = "x".repeat(a.bytes.saturating_sub(40));
    let cpu_before = processes_cpu_secs(&a.spread.pid)?;
    let (poll_stop, poll_rx) = watch::channel(false);
    let poller = start_stats_poll(&a, &plan.api, poll_rx)?;
    let started = Instant::now();
    let started_us = now_micros();
    let pace = Pace::of(&a);
    let publish_errors = publish_burst(publisher, pad, a.messages, pace, started).await?;
    let published_secs = started.elapsed().as_secs_f64();
    let Subscribers {
        local,
        mut children,
        opened,
        errors,
    } = subs;
    let parts = collect_parts(
        local,
        children.as_mut(),
        plan.bounds.drain,
        plan.bounds.deadline,
    )
    .await?;
    let _ = poll_stop.send(true);
    let stats_poll = stats_poll_result(&a, poller).await?;
    let cpu_after = processes_cpu_secs(&a.spread.pid)?;
    let mem = processes_memory(&a.spread.pid)?;
    if let Some(kids) = children {
        kids.finish(Duration::from_secs(10)).await;
    }
    let merged = merge_fanout_parts(&parts);
    let figures = FanoutFigures {
        opened,
        errors,
        pace,
        publish_errors,
        published_secs,
        total_secs: secs_to_last_delivery(merged.last_us, started_us, started),
        merged,
        cpu: cpu_before.zip(cpu_after).map(|(b, a)| a - b),
        mem,
    };
    let mut out = fanout_json(&a, &plan, &figures);
    if !stats_poll.is_null() {
        out["stats_poll"] = stats_poll;
    }
    println!("{out}");
    Ok(())
}
