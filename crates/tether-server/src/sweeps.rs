//! `[[sweeps]]`: one task per rule, evaluated every `every_ms` over the registry
//! with the same [`Selector`] as `POST /api/disconnect`. Stops with the server.

use std::sync::Arc;
use std::time::Duration;

use tether_core::Selector;
use tether_protocol::{CloseCode, Closing};
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::config::Sweep;

pub(crate) async fn run(app: Arc<App>, rule: Sweep, stop: CancellationToken) {
    let selector = Selector {
        filter: rule.filter.clone(),
        ..Default::default()
    };
    let closing = Closing {
        code: CloseCode(rule.code),
        reason: rule.reason.clone(),
        reconnect: rule.reconnect,
        retry_ms: None,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(rule.every_ms.get()));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                let n = app.registry.disconnect(&selector, &closing);
                app.metrics.swept(n);
                if n > 0 {
                    tracing::info!(closed = n, code = rule.code, reason = %rule.reason, "sweep closed connections");
                }
            }
        }
    }
}
