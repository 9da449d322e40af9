//! The SSE transport (`GET /sse`).
//!
//! The handler runs admission and commits at once (there is no upgrade), then
//! answers `200 text/event-stream` with a body fed by a small bounded channel. One
//! tracked task owns the [`ConnectionGuard`] and the channel's sender and runs the
//! connection's `select!`: close requests, heartbeat comments, lifetime, the
//! receiver going away (hyper drops the body when the peer disconnects) and the
//! hard stop. A full channel means the peer stopped reading: 4008.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;
use serde::Deserialize;
use tether_core::{ConnSpec, ConnectionGuard, Transport};
use tether_protocol::{CloseCode, Closing, Refusal, ServerFrame};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

use crate::admission::{self, AdmitError};
use crate::net::SocketInfo;
use crate::App;

/// Events waiting between the connection task and hyper's writer.
const BODY_QUEUE: usize = 16;

#[derive(Debug, Default, Deserialize)]
struct SseQuery {
    client: Option<String>,
}

/// `GET /sse`.
pub(crate) async fn handler(State(app): State<Arc<App>>, req: Request<Body>) -> Response {
    let Some(info) = req.extensions().get::<SocketInfo>().cloned() else {
        return admission::bad_request("SSE is served on the client listener");
    };
    let headers = req.headers();
    let query = match Query::<SseQuery>::try_from_uri(req.uri()) {
        Ok(Query(q)) => q,
        Err(e) => return with_cors(admission::bad_request(&e.body_text()), headers),
    };
    let ip = crate::net::client_ip(info.peer.ip(), headers, &app.cfg.server.trusted_proxies);
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (reservation, _client_id) =
        match admission::admit(&app, query.client.as_deref(), ip, Transport::Sse) {
            Ok(r) => r,
            Err(AdmitError::BadRequest(m)) => {
                return with_cors(admission::bad_request(&m), headers)
            }
            Err(AdmitError::Refused(r)) if r.is_transient() => {
                return with_cors(transient_refusal(r), headers)
            }
            Err(AdmitError::Refused(r)) => return with_cors(admission::http_refusal(r), headers),
        };
    let guard = reservation.commit(ConnSpec {
        transport: Transport::Sse,
        remote_addr: ip,
        user_agent,
        meta: serde_json::Value::Null,
        upstream: None,
    });
    drop(info.take_pending());
    let (tx, rx) = mpsc::channel::<Bytes>(BODY_QUEUE);
    let conn = guard.conn();
    let welcome = serde_json::json!({
        "conn_id": conn.id(),
        "client_id": conn.client_id(),
        "node_id": app.registry.node_id(),
        "recovered": {},
    });
    let first = format!(
        "retry: {}\n\nevent: welcome\ndata: {welcome}\n\n",
        app.cfg.sse.retry_ms
    );
    conn.add_bytes_out(first.len());
    // The channel is new and empty: this cannot be full.
    let _ = tx.try_send(Bytes::from(first));
    app.tasks.spawn(run(app.clone(), guard, tx));
    with_cors(stream_response(rx), headers)
}

fn stream_response(rx: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::new(StreamBody::new(stream)))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// A transient refusal as a `200` stream: `retry:`, `event: closing`, end.
fn transient_refusal(refusal: Refusal) -> Response {
    let retry = admission::retry_ms(refusal);
    let body = format!(
        "retry: {retry}\n\nevent: closing\ndata: {}\n\n",
        admission::closing_json(refusal, retry)
    );
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let _ = tx.try_send(Bytes::from(body));
    drop(tx);
    stream_response(rx)
}

/// CORS for `/sse`: with no `limits.allowed_origins`, `*` and no credentials.
pub(crate) fn with_cors(mut resp: Response, _req_headers: &HeaderMap) -> Response {
    resp.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        http::HeaderValue::from_static("*"),
    );
    resp
}

enum End {
    Announce(Closing),
    Lost,
    Stalled,
    Hard,
}

async fn run(app: Arc<App>, mut guard: ConnectionGuard, tx: mpsc::Sender<Bytes>) {
    let conn = guard.conn().clone();
    let interval = Duration::from_millis(app.cfg.heartbeat.interval_ms.get());
    let start = Instant::now();
    let lifetime_at = match app.cfg.limits.max_connection_lifetime_ms {
        0 => None,
        ms => Some(start + crate::jittered(ms)),
    };
    let mut next_beat = start + interval;
    let timer = tokio::time::sleep_until(next_beat);
    tokio::pin!(timer);
    let end = loop {
        timer
            .as_mut()
            .reset(lifetime_at.map_or(next_beat, |l| l.min(next_beat)));
        tokio::select! {
            biased;
            _ = app.drain.hard_stop().cancelled() => break End::Hard,
            closing = conn.close_requested() => break End::Announce(closing),
            _ = tx.closed() => break End::Lost,
            _ = &mut timer => {
                let now = Instant::now();
                if lifetime_at.is_some_and(|l| now >= l) {
                    break End::Announce(Closing::new(CloseCode::MAX_LIFETIME, "maximum connection lifetime reached"));
                }
                next_beat = now + interval;
                const BEAT: &[u8] = b": hb\n\n";
                match tx.try_send(Bytes::from_static(BEAT)) {
                    Ok(()) => conn.add_bytes_out(BEAT.len()),
                    Err(mpsc::error::TrySendError::Full(_)) => break End::Stalled,
                    Err(mpsc::error::TrySendError::Closed(_)) => break End::Lost,
                }
            }
        }
    };
    match end {
        End::Announce(closing) => {
            guard.set_close(closing.code.0, closing.reason.clone());
            let retry = closing
                .retry_ms
                .map(|r| format!("retry: {r}\n"))
                .unwrap_or_default();
            let text = format!(
                "{retry}event: closing\ndata: {}\n\n",
                ServerFrame::Closing(&closing).encode()
            );
            conn.add_bytes_out(text.len());
            tokio::select! {
                _ = timeout(Duration::from_secs(2), tx.send(Bytes::from(text))) => {}
                _ = app.drain.hard_stop().cancelled() => {}
            }
        }
        End::Lost => guard.set_close(CloseCode::ABNORMAL.0, "stream closed by the peer"),
        End::Stalled => guard.set_close(CloseCode::SLOW_CONSUMER.0, "peer stopped reading"),
        End::Hard => guard.set_close(CloseCode::GOING_AWAY.0, "shutdown deadline"),
    }
    drop(tx);
    drop(guard);
}
