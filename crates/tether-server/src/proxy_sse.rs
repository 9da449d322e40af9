//! SSE proxy routes (`upstream = "http(s)://…"`): the upstream request is made
//! before the client is answered (502 `upstream_unavailable` when it fails or
//! answers non-2xx), then its body is relayed to the client as it comes, verbatim.
//! One tracked task owns the guard and both ends: the client going away cancels the
//! upstream request at once, a silent upstream is closed after
//! `upstream_idle_timeout_ms`, and kicks, drain and limits end both.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::StreamBody;
use hyper::body::Frame;
use tether_core::{ConnSpec, ConnectionGuard, Transport};
use tether_protocol::Refusal;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

use crate::admission::{self, AdmitError, Credentials};
use crate::config::ProxyRoute;
use crate::net::SocketInfo;
use crate::App;

/// Chunks waiting between the relay task and hyper's writer.
const BODY_QUEUE: usize = 8;

#[allow(clippy::too_many_arguments)]
pub(crate) async fn handle(
    app: Arc<App>,
    route: ProxyRoute,
    info: SocketInfo,
    headers: &HeaderMap,
    query: Option<String>,
    creds: Credentials<'_>,
    ip: IpAddr,
    origin_ok: bool,
) -> Response {
    let admitted = match admission::admit(&app, creds, ip, Transport::Proxy, origin_ok, &[]) {
        Ok(a) => a,
        Err(AdmitError::BadRequest(m)) => return admission::bad_request(&m),
        Err(AdmitError::Refused(r)) => return admission::http_refusal(r),
    };
    let url = crate::proxy::upstream_url(&route, query.as_deref());
    let mut req = app.http.get(&url).timeout(Duration::from_secs(24 * 3600));
    for (k, v) in crate::proxy::upstream_headers(
        headers,
        &admitted.client_id,
        admitted.reservation.conn_id(),
        ip,
    ) {
        if let Some(k) = k {
            req = req.header(k, v);
        }
    }
    let connect = timeout(
        Duration::from_millis(route.connect_timeout_ms.get()),
        req.send(),
    )
    .await;
    let upstream = match connect {
        Ok(Ok(r)) if r.status().is_success() => r,
        other => {
            let why = match other {
                Err(_) => "no answer in time".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(r)) => format!("status {}", r.status()),
            };
            tracing::info!(upstream = %route.upstream, error = %why, "upstream unavailable");
            drop(admitted);
            let _ = admission::refused(&app, Refusal::UpstreamUnavailable, ip);
            return admission::http_refusal(Refusal::UpstreamUnavailable);
        }
    };
    let content_type = upstream.headers().get(header::CONTENT_TYPE).cloned();
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let guard = admitted.reservation.commit(ConnSpec {
        transport: Transport::Proxy,
        remote_addr: ip,
        user_agent,
        meta: admitted.identity.map(|i| i.meta).unwrap_or_default(),
        upstream: Some(route.upstream.clone()),
    });
    drop(info.take_pending());
    let (tx, rx) = mpsc::channel::<Bytes>(BODY_QUEUE);
    app.tasks.spawn(relay(
        app.clone(),
        guard,
        upstream,
        tx,
        route.upstream_idle_timeout_ms,
    ));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    let mut resp = Response::builder()
        .status(StatusCode::OK)
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no");
    if let Some(ct) = content_type {
        resp = resp.header(header::CONTENT_TYPE, ct);
    }
    resp.body(Body::new(StreamBody::new(stream)))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

async fn relay(
    app: Arc<App>,
    mut guard: ConnectionGuard,
    upstream: reqwest::Response,
    tx: mpsc::Sender<Bytes>,
    idle_ms: u64,
) {
    let conn = guard.conn().clone();
    let wait = Duration::from_millis(app.cfg.heartbeat.timeout_ms.get());
    let idle = (idle_ms > 0).then(|| Duration::from_millis(idle_ms));
    let mut body = upstream.bytes_stream();
    let mut last = Instant::now();
    let far = Duration::from_secs(365 * 24 * 3600);
    let (code, reason): (u16, String) = loop {
        let idle_at = last + idle.unwrap_or(far);
        tokio::select! {
            biased;
            _ = app.drain.hard_stop().cancelled() => break (1001, "shutdown deadline".into()),
            closing = conn.close_requested() => break (closing.code.0, closing.reason),
            _ = tx.closed() => break (1006, "client went away".into()),
            _ = tokio::time::sleep_until(idle_at) => break (1014, "upstream idle".into()),
            chunk = body.next() => match chunk {
                Some(Ok(b)) => {
                    last = Instant::now();
                    let n = b.len();
                    // A client that does not read slows reading the upstream, up to the
                    // heartbeat timeout; then it is a slow consumer.
                    match timeout(wait, tx.send(b)).await {
                        Ok(Ok(())) => conn.add_bytes_out(n),
                        Ok(Err(_)) => break (1006, "client went away".into()),
                        Err(_) => break (tether_protocol::CloseCode::SLOW_CONSUMER.0, "slow consumer".into()),
                    }
                }
                Some(Err(_)) => break (1014, "upstream failed".into()),
                None => break (1000, "upstream ended the stream".into()),
            },
        }
    };
    guard.set_close(code, reason);
    // Dropping the upstream body cancels the upstream request; dropping the sender
    // ends the client's stream.
    drop(body);
    drop(tx);
    drop(guard);
}
