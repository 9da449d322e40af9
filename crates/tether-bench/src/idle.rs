//! `tether bench idle`: opens N connections (spread over source addresses in
//! 127.0.0.0/8 and over `--procs` child processes, bounded concurrency), holds them,
//! and reads the server's memory before and after.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::lean::{Conn, Endpoint};
use crate::procs;
use crate::{
    check_sources, default_url, endpoint, node_url, open_all, open_subscribers, processes_memory,
    IdleArgs, Subscribers, Target, Transport,
};

/// Where an `idle` run connects, and its bounds.
struct IdlePlan {
    url: String,
    channel: Option<String>,
    ep: Arc<Endpoint>,
    deadline: tokio::time::Instant,
    procs: usize,
}

impl IdlePlan {
    /// Checks the flags and resolves the endpoint (this process's node).
    async fn new(a: &IdleArgs) -> Result<IdlePlan, String> {
        check_sources(&a.sources)?;
        if a.connections == 0 {
            return Err("need at least one connection".into());
        }
        let url = a.url.clone().unwrap_or(default_url(a.target).into());
        let channel = a.channel.clone().or_else(|| {
            (a.target == Target::Nchan || a.transport == Transport::Sse).then(|| "idle".into())
        });
        let node = node_url(&url, a.child, a.procs)?;
        let ep = Arc::new(endpoint(a.target, a.transport, node, channel.clone()).await?);
        Ok(IdlePlan {
            url,
            channel,
            ep,
            deadline: tokio::time::Instant::now() + Duration::from_secs(a.timeout_secs),
            procs: a.procs.max(1),
        })
    }

    /// Opens the connections `indices` in this process.
    async fn open(
        &self,
        a: &IdleArgs,
        indices: Vec<usize>,
    ) -> (Vec<Conn>, BTreeMap<String, usize>) {
        open_all(
            std::slice::from_ref(&self.ep),
            indices,
            "bench",
            &a.sources,
            a.concurrency,
            4096,
            0,
            self.deadline,
            |_, c| c,
        )
        .await
    }
}

/// Child `k` of `--procs`: opens its share, prints `READY` and holds the connections
/// until `CLOSE` (or EOF: the parent is gone).
async fn idle_child(a: &IdleArgs, plan: &IdlePlan, k: usize) -> Result<(), String> {
    let (held, errors) = plan
        .open(a, procs::share(k, plan.procs, a.connections))
        .await;
    println!("READY {}", json!({"opened": held.len(), "errors": errors}));
    let mut orders = procs::stdin_lines();
    while let Some(line) = orders.recv().await {
        if line.trim() == "CLOSE" {
            break;
        }
    }
    drop(held);
    Ok(())
}

/// The scenario's JSON object: the server's memory (RSS, PSS KiB) `before` and
/// `after`, and per connection opened.
fn idle_json(
    a: &IdleArgs,
    plan: &IdlePlan,
    subs: &Subscribers<Vec<Conn>>,
    connect_secs: f64,
    before: Option<(u64, u64)>,
    after: Option<(u64, u64)>,
) -> serde_json::Value {
    let n = subs.opened as f64;
    let per = |b: Option<(u64, u64)>, f: fn((u64, u64)) -> u64| -> Option<f64> {
        let (b, a) = (b?, after?);
        (n > 0.0).then(|| (f(a) as f64 - f(b) as f64) * 1024.0 / n)
    };
    json!({
        "scenario": "idle",
        "target": a.target,
        "transport": a.transport,
        "url": plan.url,
        "channel": plan.channel,
        "requested": a.connections,
        "opened": subs.opened,
        "errors": subs.errors,
        "connect_secs": connect_secs,
        "procs": plan.procs,
        "sources": a.sources,
        "server_pid": a.pid.first(),
        "server_pids": a.pid,
        "server_rss_kib_before": before.map(|m| m.0),
        "server_rss_kib_after": after.map(|m| m.0),
        "server_pss_kib_before": before.map(|m| m.1),
        "server_pss_kib_after": after.map(|m| m.1),
        "rss_bytes_per_connection": per(before, |m| m.0),
        "pss_bytes_per_connection": per(before, |m| m.1),
    })
}

/// `tether bench idle`.
pub(crate) async fn run(a: IdleArgs) -> Result<(), String> {
    let plan = IdlePlan::new(&a).await?;
    if let Some(k) = a.child {
        return idle_child(&a, &plan, k).await;
    }
    let before = processes_memory(&a.pid)?;
    let started = Instant::now();
    let subs = open_subscribers(plan.procs, plan.deadline, || async {
        let (held, errors) = plan.open(&a, (0..a.connections).collect()).await;
        let opened = held.len();
        (held, opened, errors)
    })
    .await?;
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(a.hold_secs)).await;
    let after = processes_memory(&a.pid)?;
    println!(
        "{}",
        idle_json(&a, &plan, &subs, connect_secs, before, after)
    );
    let Subscribers {
        local, children, ..
    } = subs;
    drop(local);
    if let Some(mut kids) = children {
        kids.tell("CLOSE");
        kids.finish(Duration::from_secs(10)).await;
    }
    Ok(())
}
