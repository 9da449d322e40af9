//! `fanout --poll-stats-ms N`: the latency of Tether's `GET /api/stats` while a burst
//! runs. One request at a time on its own keep-alive connection, started on a fixed
//! schedule (every N ms from the first publish); a request that overruns its slot
//! makes the poller skip the slots it missed (counted in `missed_slots`) instead of
//! firing them back to back. Latency is from sending the request to having read the
//! whole answer, as an API client would see it. The poller runs on a thread and
//! runtime of its own ([`spawn`]), so 10,000 receivers parsing on the bench's runtime
//! do not delay it.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::hist::Hist;

/// What the poller saw.
#[derive(Debug, Default)]
pub struct Polled {
    /// Latency of each answered poll (2xx, body read), µs.
    pub hist: Hist,
    /// Requests sent.
    pub polls: u64,
    /// Polls without a 2xx answer (status, connection error, or over `timeout`).
    pub errors: u64,
    /// Slots skipped because the previous poll was still running.
    pub missed_slots: u64,
}

impl Polled {
    /// The `stats_poll` object of the scenario's JSON.
    pub fn to_json(&self, every_ms: u64) -> Value {
        json!({
            "every_ms": every_ms,
            "polls": self.polls,
            "errors": self.errors,
            "missed_slots": self.missed_slots,
            "latency_samples": self.hist.len(),
            "latency_ms_p50": self.hist.percentile_ms(0.50),
            "latency_ms_p99": self.hist.percentile_ms(0.99),
            "latency_ms_p999": self.hist.percentile_ms(0.999),
            "latency_ms_max": self.hist.max_ms(),
        })
    }
}

/// The `stats_poll` value when the target has no stats endpoint.
pub fn unavailable(target: crate::Target) -> Value {
    json!({
        "skipped": format!("{target:?} has no stats endpoint: the burst ran without polling"),
    })
}

/// The next slot (`start + k * every`) at or after `now`, and how many slots after
/// `last` were skipped to reach it.
pub fn next_slot(start: Instant, every: Duration, last: u64, now: Instant) -> (u64, u64) {
    let every_us = every.as_micros().max(1);
    let since = now.saturating_duration_since(start).as_micros();
    let due = since.div_ceil(every_us) as u64;
    let next = due.max(last + 1);
    (next, next - last - 1)
}

/// Runs [`poll`] on a thread of its own with a current-thread runtime.
pub fn spawn(
    url: String,
    every: Duration,
    stop: watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<Polled>> {
    std::thread::Builder::new()
        .name("stats-poll".into())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(poll(url, every, stop)))
                .unwrap_or_default()
        })
}

/// Polls `url` every `every` until `stop` turns true (or its sender is gone).
pub async fn poll(url: String, every: Duration, mut stop: watch::Receiver<bool>) -> Polled {
    let timeout = Duration::from_secs(5);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(1)
        .timeout(timeout)
        .build()
        .unwrap_or_default();
    let mut out = Polled::default();
    let start = Instant::now();
    let mut slot = 0u64;
    loop {
        if *stop.borrow() {
            break;
        }
        let sent = Instant::now();
        out.polls += 1;
        let answer = tokio::select! {
            r = async {
                let r = http.get(&url).send().await.map_err(|_| ())?;
                if !r.status().is_success() {
                    return Err(());
                }
                r.bytes().await.map_err(|_| ())
            } => r,
            _ = stop.changed() => {
                // Stopped mid-request: neither a sample nor an error.
                out.polls -= 1;
                break;
            }
        };
        match answer {
            Ok(_) => out.hist.record(sent.elapsed().as_micros() as u64),
            Err(()) => out.errors += 1,
        }
        let (next, missed) = next_slot(start, every, slot, Instant::now());
        slot = next;
        out.missed_slots += missed;
        tokio::select! {
            _ = tokio::time::sleep_until(start + every * slot as u32) => {}
            r = stop.changed() => {
                if r.is_err() {
                    break;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn slots_skip_what_was_missed() {
        let start = Instant::now();
        let every = Duration::from_millis(10);
        // On time: the next slot, nothing missed.
        assert_eq!(
            next_slot(start, every, 0, start + Duration::from_millis(3)),
            (1, 0)
        );
        // Exactly on a slot's time: that slot.
        assert_eq!(next_slot(start, every, 0, start + every), (1, 0));
        // A 35 ms answer to slot 2 (sent at 20 ms, back at 55 ms): slot 6, 3 missed.
        assert_eq!(
            next_slot(start, every, 2, start + Duration::from_millis(55)),
            (6, 3)
        );
        // The clock reads before `start`: the next slot anyway.
        assert_eq!(next_slot(start + every, every, 4, start), (5, 0));
    }

    #[test]
    fn json_fields() {
        let mut p = Polled::default();
        for us in [1_000u64, 2_000, 3_000, 40_000] {
            p.hist.record(us);
        }
        p.polls = 5;
        p.errors = 1;
        p.missed_slots = 2;
        let v = p.to_json(10);
        assert_eq!(v["every_ms"], 10);
        assert_eq!(v["polls"], 5);
        assert_eq!(v["errors"], 1);
        assert_eq!(v["missed_slots"], 2);
        assert_eq!(v["latency_samples"], 4);
        assert_eq!(v["latency_ms_max"], 40.0);
        // Within the histogram's 0.8 % above 256 µs.
        // The median of four is the third (rank round(3 × 0.5) = 2).
        assert!((v["latency_ms_p50"].as_f64().unwrap() - 3.0).abs() < 0.03);
        assert!((v["latency_ms_p99"].as_f64().unwrap() - 40.0).abs() < 0.32);
        let none = Polled::default().to_json(10);
        assert!(none["latency_ms_p99"].is_null());
        let skipped = unavailable(crate::Target::Nchan);
        assert!(skipped["skipped"].as_str().unwrap().contains("Nchan"));
    }

    /// Against a tiny keep-alive HTTP server: every answered poll is a sample, and
    /// a stop ends the poller promptly.
    #[tokio::test]
    async fn polls_a_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = Vec::new();
                    loop {
                        let n = match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        have.extend_from_slice(&buf[..n]);
                        while let Some(i) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                            have.drain(..i + 4);
                            let body = br#"{"connections":{"ws":0}}"#;
                            // One write: head and body in two would meet Nagle and
                            // the delayed ACK (40 ms a poll).
                            let mut answer = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            answer.extend_from_slice(body);
                            if s.write_all(&answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        let (tx, rx) = watch::channel(false);
        let poller = spawn(
            format!("http://{addr}/api/stats"),
            Duration::from_millis(10),
            rx,
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        tx.send(true).unwrap();
        let p = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::task::spawn_blocking(move || poller.join()),
        )
        .await
        .expect("stops promptly")
        .unwrap()
        .unwrap();
        assert_eq!(p.errors, 0);
        assert!(p.polls >= 5, "{} polls", p.polls);
        assert_eq!(p.hist.len(), p.polls);
    }
}
