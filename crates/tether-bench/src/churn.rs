//! `tether bench churn`: connect + subscribe + close cycles per second from
//! `--workers` tasks for `--secs`; then (Tether) the registry must be back to zero.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;

use crate::hist::Hist;
use crate::{check_loopback, default_url, ChurnArgs, Target, Transport};

/// One cycle: connect, read the welcome, subscribe, read `subscribed`, close (Tether);
/// connect to the channel's URL (which subscribes), close (Nchan).
async fn churn_cycle(url: &str, i: usize, channel: &str, target: Target) -> Result<(), String> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let url = match target {
        Target::Tether => format!("{url}?client=churn-{i}"),
        Target::Nchan => format!("{}/{channel}", url.trim_end_matches('/')),
    };
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| e.to_string())?;
    if target == Target::Tether {
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
    }
    ws.close(None).await.map_err(|e| e.to_string())?;
    while let Some(Ok(_)) = ws.next().await {}
    Ok(())
}

/// Cycles back to back from `--workers` tasks until `--secs` have passed: the cycles
/// done and failed, and how long each whole cycle took (connect to closed).
async fn cycles(a: &ChurnArgs, url: &str) -> Result<(usize, usize, Hist), String> {
    let until = Instant::now() + Duration::from_secs(a.secs);
    let mut workers = Vec::new();
    for w in 0..a.workers.max(1) {
        let (url, channel, target) = (url.to_owned(), a.channel.clone(), a.target);
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0usize, 0usize);
            let mut cycle = Hist::default();
            let mut i = w;
            while Instant::now() < until {
                let t = Instant::now();
                match churn_cycle(&url, i, &channel, target).await {
                    Ok(()) => {
                        ok += 1;
                        cycle.record(t.elapsed().as_micros() as u64);
                    }
                    Err(_) => failed += 1,
                }
                i += 1_000_000;
            }
            (ok, failed, cycle.sparse())
        }));
    }
    let (mut ok, mut failed) = (0, 0);
    // How long one whole cycle took (connect to closed), over every worker.
    let mut cycle = Hist::default();
    for w in workers {
        let (o, f, h) = w.await.map_err(|e| e.to_string())?;
        ok += o;
        failed += f;
        cycle.merge_sparse(&h);
    }
    Ok((ok, failed, cycle))
}

/// Tether's registry must return to zero: polls `GET {api}/api/stats` for up to
/// 10 s. The last stats and whether it did (Null and None for Nchan).
async fn registry_back_to_zero(a: &ChurnArgs) -> Result<(serde_json::Value, Option<bool>), String> {
    if a.target != Target::Tether {
        return Ok((serde_json::Value::Null, None));
    }
    let mut stats = serde_json::Value::Null;
    let http = reqwest::Client::new();
    let mut z = false;
    for _ in 0..100 {
        stats = http
            .get(format!("{}/api/stats", a.api))
            .send()
            .await
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        z = stats["connections"]["ws"] == 0 && stats["clients"] == 0 && stats["tasks"] == 0;
        if z {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((stats, Some(z)))
}

/// `tether bench churn`.
pub(crate) async fn run(a: ChurnArgs) -> Result<(), String> {
    let url = a.url.clone().unwrap_or(default_url(a.target).into());
    check_loopback(&url, "ws://").await?;
    if a.target == Target::Tether {
        check_loopback(&a.api, "http://").await?;
    }
    let started = Instant::now();
    let (ok, failed, cycle) = cycles(&a, &url).await?;
    let secs = started.elapsed().as_secs_f64();
    let (stats, zero) = registry_back_to_zero(&a).await?;
    println!(
        "{}",
        json!({
            "scenario": "churn",
            "target": a.target,
            "transport": Transport::Ws,
            "workers": a.workers,
            "secs": secs,
            "cycles": ok,
            "failed": failed,
            "cycles_per_sec": ok as f64 / secs,
            "cycle_ms_p50": cycle.percentile_ms(0.5),
            "cycle_ms_p99": cycle.percentile_ms(0.99),
            "cycle_ms_max": cycle.max_ms(),
            "registry_back_to_zero": zero,
            "stats_after": stats,
        })
    );
    if zero == Some(false) {
        Err("the registry did not return to zero".into())
    } else {
        Ok(())
    }
}
