//! `GET /api/events`: lifecycle events as SSE, `event: <type>`, `id: <event id>`.
//! A reader that falls behind the bus gets a `: lagged N` comment for what it lost.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::Response;
use http_body_util::StreamBody;
use hyper::body::Frame;
use tether_core::Phase;
use tokio::sync::broadcast::error::RecvError;

use super::Api;

/// A comment sent when nothing else was, so idle proxies keep the stream.
const KEEPALIVE: Duration = Duration::from_secs(15);

pub(super) async fn events(State(api): State<Arc<Api>>) -> Response {
    let rx = api.registry.events().subscribe();
    // On a listener shared with clients, this stream is one of the sockets the drain
    // waits for: it ends when the drain begins instead of holding the shutdown. On
    // the API's own listener it ends at `stop`, after the drain's last event, which
    // it sends first (`events_tail`).
    let shared = api.shares_client_listener;
    let stream =
        futures_util::stream::unfold((rx, api, true), move |(mut rx, api, first)| async move {
            if first {
                let hello = Frame::data(Bytes::from_static(b": events\n\n"));
                return Some((Ok::<_, Infallible>(hello), (rx, api, false)));
            }
            let item = tokio::select! {
                _ = api.stop.cancelled() => crate::events_tail::tail(&mut rx)?,
                _ = api.drain.hard_stop().cancelled() => return None,
                _ = api.drain.reached(Phase::Draining), if shared => return None,
                _ = tokio::time::sleep(KEEPALIVE) => Bytes::from_static(b": hb\n\n"),
                r = rx.recv() => match r {
                    Ok(ev) => Bytes::from(crate::events_tail::frame(&ev)),
                    Err(RecvError::Lagged(n)) => Bytes::from(format!(": lagged {n}\n\n")),
                    Err(RecvError::Closed) => return None,
                },
            };
            Some((Ok(Frame::data(item)), (rx, api, false)))
        });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::new(StreamBody::new(stream)))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}
