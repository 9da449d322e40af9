//! The drain coordinator (SPEC section 4), run once the shutdown begins:
//! `/readyz` 503 at once, handshakes admitted for `pre_drain_ms`, then refused;
//! every connection asked to close with 1001 at evenly spread moments over
//! `drain_window_ms` (each with a jittered `retry_ms`); then wait for every tracked
//! task until `timeout_ms` after the signal, when the rest are closed hard.

use std::sync::Arc;
use std::time::Duration;

use tether_core::Phase;
use tether_protocol::{CloseCode, Closing};
use tokio::time::{sleep_until, Instant};

use crate::app::App;

/// Most `retry_ms` given to a drained client (jitter on top of the spread closes).
const RETRY_JITTER_MS: u64 = 1000;

pub(crate) async fn run(app: &Arc<App>) {
    let cfg = &app.cfg.shutdown;
    let start = Instant::now();
    let deadline = start + Duration::from_millis(cfg.timeout_ms.get());
    app.drain.advance(Phase::PreDrain);
    tracing::info!(
        pre_drain_ms = cfg.pre_drain_ms,
        "shutdown: not ready; still admitting during pre-drain"
    );
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_millis(cfg.pre_drain_ms)) => {}
        _ = app.drain.hard_stop().cancelled() => {}
    }
    app.drain.advance(Phase::Draining);
    let conns = app.registry.connections();
    let n = conns.len() as u64;
    let window = Duration::from_millis(cfg.drain_window_ms);
    tracing::info!(
        connections = n,
        drain_window_ms = cfg.drain_window_ms,
        "shutdown: draining"
    );
    let spread_start = Instant::now();
    for (i, conn) in conns.iter().enumerate() {
        let at = spread_start + window.mul_f64(i as f64 / n.max(1) as f64);
        tokio::select! {
            _ = sleep_until(at.min(deadline)) => {}
            _ = app.drain.hard_stop().cancelled() => break,
        }
        conn.request_close(going_away());
    }
    // Connections committed from reservations taken just before the refusal began.
    app.tasks.close();
    loop {
        for c in app.registry.connections() {
            c.request_close(going_away());
        }
        tokio::select! {
            _ = app.tasks.wait() => break,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = sleep_until(deadline) => {
                tracing::warn!(left = app.tasks.len(), "shutdown deadline: closing the rest hard");
                app.drain.hard_stop().cancel();
                app.tasks.wait().await;
                break;
            }
        }
    }
    app.registry.flush_lingering();
    app.drain.advance(Phase::Stopped);
    tracing::info!("shutdown: drained");
}

fn going_away() -> Closing {
    Closing {
        code: CloseCode::GOING_AWAY,
        reason: "server shutting down".into(),
        reconnect: true,
        retry_ms: Some(fastrand::u64(..=RETRY_JITTER_MS)),
    }
}
