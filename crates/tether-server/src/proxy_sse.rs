//! SSE proxy routes (`upstream = "http(s)://…"`): the upstream request is made
//! before the client is answered (502 `upstream_unavailable` when it fails or
//! answers non-2xx), then its body is relayed to the client as it comes, verbatim.
//! One tracked task owns the guard and both ends: the client going away cancels the
//! upstream request at once, a silent upstream is closed after
//! `upstream_idle_timeout_ms`, and kicks, drain and limits end both.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::StreamBody;
use hyper::body::Frame;
use tether_core::{Connection, Outgoing};
use tether_protocol::Refusal;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

use crate::admission::{self, AdmitError};
use crate::config::ProxyRoute;
use crate::driver::{self, Ctx, Cx, End, Ending, Family, Heard, Leg, Transport};
use crate::edge::Edge;
use crate::net::SocketInfo;
use crate::proxy_request::{upstream_idle, ProxyRequest};
use crate::upstream::UpstreamError;

/// Chunks waiting between the relay task and hyper's writer.
const BODY_QUEUE: usize = 8;

/// An SSE route: admit, make the upstream request before answering the client (502
/// when it fails), commit, and relay the upstream's body in one tracked task.
pub(crate) async fn handle(
    edge: Arc<Edge>,
    route: ProxyRoute,
    info: SocketInfo,
    pr: &ProxyRequest,
) -> Response {
    let admitted = match pr.admit(&edge).await {
        Ok(a) => a,
        Err(AdmitError::BadRequest(m)) => return admission::bad_request(&m),
        Err(AdmitError::Refused(r)) => return admission::http_refusal(r),
    };
    let upstream = match connect(&edge, &route, pr, &admitted).await {
        Ok(r) => r,
        Err(why) => {
            tracing::info!(upstream = %route.upstream, error = %why, "upstream unavailable");
            drop(admitted);
            let _ = admission::refused(&edge.gate, Refusal::UpstreamUnavailable, pr.ip);
            return admission::http_refusal(Refusal::UpstreamUnavailable);
        }
    };
    let content_type = upstream.headers().get(header::CONTENT_TYPE).cloned();
    // The request and the upstream's answer were the handshake, and it is done.
    let mut deadlines = edge.driving.deadlines::<SseRelay>(Instant::now());
    deadlines.expire_at(pr.expires_at(&edge, &admitted));
    deadlines.upstream_idle(upstream_idle(&route));
    let spec = pr.spec(&route, &admitted);
    let guard = admission::commit(&edge.gate, admitted.reservation, spec).await;
    drop(info.take_pending());
    let (tx, rx) = mpsc::channel::<Bytes>(BODY_QUEUE);
    let relay = SseRelay {
        body: upstream.bytes_stream().boxed(),
        tx,
        wait: edge.driving.timeout,
    };
    edge.tasks
        .spawn(driver::drive(edge.driving.clone(), guard, relay, deadlines));
    answer(rx, content_type)
}

/// The upstream request for an admitted client (within the route's
/// `connect_timeout_ms`); a non-2xx answer is a failure.
async fn connect(
    edge: &Edge,
    route: &ProxyRoute,
    pr: &ProxyRequest,
    admitted: &admission::Admitted,
) -> Result<reqwest::Response, UpstreamError> {
    let url = crate::upstream::upstream_url(route, pr.query.as_deref());
    let mut req = edge
        .upstreams
        .http
        .get(&url)
        .timeout(Duration::from_secs(24 * 3600));
    for (k, v) in pr.upstream_headers(admitted) {
        if let Some(k) = k {
            req = req.header(k, v);
        }
    }
    let limit = route.connect_timeout_ms.get();
    match timeout(Duration::from_millis(limit), req.send()).await {
        Err(_) => Err(UpstreamError::Timeout(limit)),
        Ok(Err(e)) => Err(UpstreamError::Http(e)),
        Ok(Ok(r)) if r.status().is_success() => Ok(r),
        Ok(Ok(r)) => Err(UpstreamError::Status(r.status())),
    }
}

/// The client's `200`: what the relay task sends on `rx`, with the upstream's
/// content type.
fn answer(rx: mpsc::Receiver<Bytes>, content_type: Option<HeaderValue>) -> Response {
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

/// A proxied event stream: the upstream's body relayed to the client's as it comes.
/// The client's side is hyper's body (`tx`); dropping `tx` ends it, and dropping
/// `body` cancels the upstream request.
pub(crate) struct SseRelay {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    tx: mpsc::Sender<Bytes>,
    /// `heartbeat.timeout_ms`: how long a chunk may wait on the client.
    wait: Duration,
}

/// What a leg of an SSE relay did: the client went away (`None`), or the upstream
/// sent a chunk, failed or ended.
pub(crate) type SseItem = Option<Option<reqwest::Result<Bytes>>>;

impl Transport for SseRelay {
    type Inbound = SseItem;
    const FAMILY: Family = Family::Proxied;
    const ANSWERS_PINGS: [bool; 2] = [false, false];

    /// Nothing of Tether's reaches a proxied client.
    async fn write(&mut self, _conn: &Connection, _batch: &[Outgoing]) -> Result<(), End> {
        Ok(())
    }

    async fn next(&mut self) -> Heard<SseItem> {
        let (leg, item) = tokio::select! {
            _ = self.tx.closed() => (Leg::Client, None),
            chunk = self.body.next() => (Leg::Upstream, Some(chunk)),
        };
        Heard {
            leg,
            counts: false,
            item,
        }
    }

    async fn on_inbound(&mut self, cx: Cx<'_>, item: SseItem) -> Option<End> {
        let chunk = match item {
            None => return Some(End::Lost(Leg::Client, "client went away".into())),
            Some(None) => return Some(End::UpstreamEnded),
            Some(Some(Err(_))) => return Some(End::Lost(Leg::Upstream, "upstream failed".into())),
            Some(Some(Ok(b))) => b,
        };
        let n = chunk.len();
        let waited = Instant::now();
        // A client that does not read slows reading the upstream, up to the heartbeat
        // timeout; then it is a slow consumer.
        let sent = timeout(self.wait, self.tx.send(chunk)).await;
        cx.deadlines.pause(waited.elapsed());
        match sent {
            Ok(Ok(())) => {
                cx.conn.add_bytes_out(n);
                None
            }
            Ok(Err(_)) => Some(End::Lost(Leg::Client, "client went away".into())),
            Err(_) => Some(End::Stalled(Leg::Client)),
        }
    }

    /// Nothing is injected into a proxied stream.
    async fn ping(&mut self, _conn: &Connection) -> Result<(), End> {
        Ok(())
    }

    /// Dropping the upstream body cancels the upstream request; dropping the sender
    /// ends the client's stream.
    async fn finish(
        self,
        _ctx: &Ctx,
        _conn: &Connection,
        _ending: &Ending,
        _queued: Vec<Outgoing>,
    ) {
    }
}
