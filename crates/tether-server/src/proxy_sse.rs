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
use tether_core::{ConnSpec, Connection, Outgoing, Transport as Kind};
use tether_protocol::Refusal;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

use crate::admission::{self, AdmitError, Credentials};
use crate::config::ProxyRoute;
use crate::driver::{self, Ctx, Cx, End, Ending, Family, Heard, Leg, Transport};
use crate::edge::Edge;
use crate::net::SocketInfo;
use crate::upstream::UpstreamError;

/// Chunks waiting between the relay task and hyper's writer.
const BODY_QUEUE: usize = 8;

#[allow(clippy::too_many_arguments)]
pub(crate) async fn handle(
    edge: Arc<Edge>,
    route: ProxyRoute,
    info: SocketInfo,
    headers: &HeaderMap,
    query: Option<String>,
    creds: Credentials<'_>,
    ip: IpAddr,
    origin_ok: bool,
) -> Response {
    let admitted = match admission::admit(&edge.gate, creds, ip, Kind::Proxy, origin_ok, &[]).await
    {
        Ok(a) => a,
        Err(AdmitError::BadRequest(m)) => return admission::bad_request(&m),
        Err(AdmitError::Refused(r)) => return admission::http_refusal(r),
    };
    let url = crate::upstream::upstream_url(&route, query.as_deref());
    let mut req = edge
        .upstreams
        .http
        .get(&url)
        .timeout(Duration::from_secs(24 * 3600));
    for (k, v) in crate::upstream::upstream_headers(
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
                Err(_) => UpstreamError::Timeout(route.connect_timeout_ms.get()),
                Ok(Err(e)) => UpstreamError::Http(e),
                Ok(Ok(r)) => UpstreamError::Status(r.status()),
            };
            tracing::info!(upstream = %route.upstream, error = %why, "upstream unavailable");
            drop(admitted);
            let _ = admission::refused(&edge.gate, Refusal::UpstreamUnavailable, ip);
            return admission::http_refusal(Refusal::UpstreamUnavailable);
        }
    };
    let content_type = upstream.headers().get(header::CONTENT_TYPE).cloned();
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let expires_at = admitted
        .identity
        .as_ref()
        .map(|i| edge.gate.auth.expires_at(i));
    let spec = ConnSpec {
        transport: Kind::Proxy,
        remote_addr: ip,
        user_agent,
        meta: admitted.identity.map(|i| i.meta).unwrap_or_default(),
        upstream: Some(route.upstream.clone()),
    };
    let guard = admission::commit(&edge.gate, admitted.reservation, spec).await;
    drop(info.take_pending());
    let (tx, rx) = mpsc::channel::<Bytes>(BODY_QUEUE);
    let relay = SseRelay {
        body: upstream.bytes_stream().boxed(),
        tx,
        wait: edge.driving.timeout,
    };
    let idle = (route.upstream_idle_timeout_ms > 0)
        .then(|| Duration::from_millis(route.upstream_idle_timeout_ms));
    // The request and the upstream's answer were the handshake, and it is done.
    let mut deadlines = edge
        .driving
        .deadlines::<SseRelay>(tokio::time::Instant::now());
    deadlines.expire_at(expires_at);
    deadlines.upstream_idle(idle);
    edge.tasks
        .spawn(driver::drive(edge.driving.clone(), guard, relay, deadlines));
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
