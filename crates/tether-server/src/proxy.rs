//! Proxy mode (`[[proxy.routes]]`): front an upstream WebSocket or SSE service.
//!
//! A proxied connection is admitted like any other (SPEC section 2), then the
//! upstream is connected **before** the client's handshake is answered; only when
//! both legs exist is the connection committed (`transport: "proxy"`). One tracked
//! task owns both legs and the guard and relays messages verbatim, injecting nothing.
//! The legs live and die together: whichever ends first ends the other, with the
//! codes of SPEC section 9, and the guard is dropped once both are closed.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use tether_core::{ConnSpec, Connection, Outgoing};
use tether_protocol::Refusal;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WireCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::admission;
use crate::config::ProxyRoute;
use crate::driver::{
    self, Ctx, Cx, End, Ending, Family, Heard, Leg, ToClient, ToUpstream, Transport,
};
use crate::edge::Edge;
use crate::net::SocketInfo;
use crate::proxy_request::ProxyRequest;
use crate::upstream::{upstream_url, UpstreamError};
use crate::ws::Ws;

type Upstream = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// How long each leg's closing handshake may take.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The routes of `[[proxy.routes]]`.
pub(crate) fn router(edge: Arc<Edge>) -> Router {
    let mut r = Router::new();
    for (i, route) in edge.routes.iter().enumerate() {
        let handler = move |State(edge): State<Arc<Edge>>, req: Request<Body>| async move {
            handle(edge, i, req).await
        };
        r = r.route(&route.path, get(handler));
    }
    r.with_state(edge)
}

async fn handle(edge: Arc<Edge>, index: usize, mut req: Request<Body>) -> Response {
    // HEAD reaches GET handlers in axum; it must not open a connection.
    if req.method() != http::Method::GET {
        return crate::respond::error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        );
    }
    let Some(route) = edge.routes.get(index).cloned() else {
        return crate::respond::error_response(StatusCode::NOT_FOUND, "not_found", "no such route");
    };
    let Some(info) = req.extensions().get::<SocketInfo>().cloned() else {
        return admission::bad_request("proxy routes are served on the client listener");
    };
    let pr = ProxyRequest::read(&edge, &req, &info);
    if route.is_ws() {
        let on_upgrade = hyper::upgrade::on(&mut req);
        return handle_ws(edge, route, info, pr, on_upgrade).await;
    }
    crate::proxy_sse::handle(edge, route, info, &pr).await
}

/// A WebSocket route: admit, connect the upstream before answering the client, then
/// answer `101` and run the relay in one tracked task.
async fn handle_ws(
    edge: Arc<Edge>,
    route: ProxyRoute,
    info: SocketInfo,
    pr: ProxyRequest,
    on_upgrade: hyper::upgrade::OnUpgrade,
) -> Response {
    let key = match crate::ws::check_upgrade(&pr.headers) {
        Ok(k) => k,
        Err(r) => return *r,
    };
    let refuse = |error, on_upgrade| {
        let refused = crate::ws::RefusedUpgrade {
            error,
            close: pr.refusal_close,
            pending: info.take_pending(),
            handshake_until: info.handshake_until,
        };
        crate::ws::refusal_response(&edge, refused, on_upgrade, &key, None)
    };
    let admitted = match pr.admit(&edge).await {
        Ok(a) => a,
        Err(e) => return refuse(e, on_upgrade),
    };
    // Connect the upstream before answering the client.
    let (upstream, protocol) = match connect_ws(&edge, &route, &pr, &admitted).await {
        Ok(u) => u,
        Err(why) => {
            tracing::info!(upstream = %route.upstream, error = %why, "upstream unavailable");
            drop(admitted);
            return refuse(
                admission::refused(&edge.gate, Refusal::UpstreamUnavailable, pr.ip),
                on_upgrade,
            );
        }
    };
    let mut deadlines = edge.driving.deadlines::<WsRelay>(info.handshake_until);
    // A proxied connection's token expires like any other (1008 on both legs).
    deadlines.expire_at(pr.expires_at(&edge, &admitted));
    let relay = Relaying {
        spec: pr.spec(&route, &admitted),
        admitted,
        upstream,
        pending: info.take_pending(),
        deadlines,
    };
    edge.tasks.spawn(relay.run(edge.clone(), on_upgrade));
    crate::ws::switching(&key, protocol)
}

/// An admitted proxied WebSocket whose upstream is connected, waiting for the
/// client's upgrade.
struct Relaying {
    admitted: admission::Admitted,
    spec: ConnSpec,
    upstream: Upstream,
    pending: Option<crate::net::PendingSlot>,
    deadlines: crate::driver::Deadlines,
}

impl Relaying {
    /// Upgrades the client within the handshake's deadline, commits, and relays
    /// until either leg ends (an upgrade that never comes drops the reservation).
    async fn run(self, edge: Arc<Edge>, on_upgrade: hyper::upgrade::OnUpgrade) {
        let Some(Ok(up)) = self.deadlines.within_handshake(on_upgrade).await else {
            return;
        };
        let client = WebSocketStream::from_raw_socket(
            crate::conn_io::ConnIo::new(up),
            Role::Server,
            Some(crate::ws::relay_config(&edge)),
        )
        .await;
        let guard = admission::commit(&edge.gate, self.admitted.reservation, self.spec).await;
        drop(self.pending);
        let relay = WsRelay {
            client,
            upstream: self.upstream,
            wait: edge.driving.timeout,
        };
        driver::drive(edge.driving.clone(), guard, relay, self.deadlines).await;
    }
}

/// Connects the route's upstream for an admitted request (within the route's
/// `connect_timeout_ms`), with the proxy's headers; returns it and the subprotocol
/// it chose.
async fn connect_ws(
    edge: &Edge,
    route: &ProxyRoute,
    pr: &ProxyRequest,
    admitted: &admission::Admitted,
) -> Result<(Upstream, Option<HeaderValue>), UpstreamError> {
    let url = upstream_url(route, pr.query.as_deref());
    let tls = url.starts_with("wss://");
    let mut request = url
        .into_client_request()
        .map_err(|e| UpstreamError::Request(Box::new(e)))?;
    for (k, v) in pr.upstream_headers(admitted) {
        if let Some(k) = k {
            request.headers_mut().append(k, v);
        }
    }
    let cfg = crate::ws::relay_config(edge);
    let connector = match (tls, &edge.upstreams.tls) {
        (true, Some(tls)) => Some(tokio_tungstenite::Connector::Rustls(tls.clone())),
        (true, None) => return Err(UpstreamError::NoTrustRoots),
        (false, _) => None,
    };
    let connect =
        tokio_tungstenite::connect_async_tls_with_config(request, Some(cfg), true, connector);
    match timeout(
        Duration::from_millis(route.connect_timeout_ms.get()),
        connect,
    )
    .await
    {
        Err(_) => Err(UpstreamError::Timeout(route.connect_timeout_ms.get())),
        Ok(Err(e)) => Err(UpstreamError::WebSocket(Box::new(e))),
        Ok(Ok((ws, resp))) => Ok((
            ws,
            resp.headers().get(header::SEC_WEBSOCKET_PROTOCOL).cloned(),
        )),
    }
}

/// A proxied WebSocket: the client leg and the upstream leg, relayed both ways
/// verbatim. Nothing of Tether's protocol is injected; the driver's heartbeats ping
/// both legs and pause while the relay waits on one of them.
pub(crate) struct WsRelay {
    client: Ws,
    upstream: Upstream,
    /// `heartbeat.timeout_ms`: how long a relayed frame may wait on the other leg.
    wait: Duration,
}

/// One frame (or failure) from one leg.
pub(crate) type RelayItem = (Leg, Option<Result<Message, WsError>>);

impl Transport for WsRelay {
    type Inbound = RelayItem;
    const FAMILY: Family = Family::Proxied;
    const ANSWERS_PINGS: [bool; 2] = [true, true];

    /// Nothing of Tether's reaches a proxied client: what the outbox holds (a direct
    /// message sent to the client) is dropped.
    async fn write(&mut self, _conn: &Connection, _batch: &[Outgoing]) -> Result<(), End> {
        Ok(())
    }

    async fn next(&mut self) -> Heard<RelayItem> {
        let (leg, item) = tokio::select! {
            m = self.client.next() => (Leg::Client, m),
            m = self.upstream.next() => (Leg::Upstream, m),
        };
        Heard {
            leg,
            counts: leg == Leg::Client,
            item: (leg, item),
        }
    }

    async fn on_inbound(&mut self, cx: Cx<'_>, (leg, item): RelayItem) -> Option<End> {
        let msg = match (leg, item) {
            (_, Some(Ok(m))) => m,
            (Leg::Client, Some(Err(e))) => return Some(crate::ws::read_error(e)),
            (Leg::Client, None) => {
                return Some(End::Lost(Leg::Client, "client connection lost".into()))
            }
            (Leg::Upstream, Some(Err(_)) | None) => {
                return Some(End::Lost(Leg::Upstream, "upstream failed".into()))
            }
        };
        match msg {
            Message::Text(_) | Message::Binary(_) => self.relay(cx, leg, msg).await,
            Message::Close(f) => {
                let (code, reason) = f
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, String::new()));
                Some(End::Closed(leg, code, reason))
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => None,
        }
    }

    async fn ping(&mut self, _conn: &Connection) -> Result<(), End> {
        let c = timeout(
            self.wait,
            self.client.send(Message::Ping(Default::default())),
        )
        .await;
        if !matches!(c, Ok(Ok(()))) {
            return Err(End::Lost(Leg::Client, "client write failed".into()));
        }
        let u = timeout(
            self.wait,
            self.upstream.send(Message::Ping(Default::default())),
        )
        .await;
        if !matches!(u, Ok(Ok(()))) {
            return Err(End::Lost(Leg::Upstream, "upstream write failed".into()));
        }
        Ok(())
    }

    async fn finish(
        mut self,
        _ctx: &Ctx,
        _conn: &Connection,
        ending: &Ending,
        _queued: Vec<Outgoing>,
    ) {
        let client = match &ending.client {
            ToClient::Close(f) => Some(close_frame(f)),
            ToClient::Answer => Some(None),
            ToClient::Nothing | ToClient::Announce(_) => None,
        };
        let upstream = match &ending.upstream {
            ToUpstream::Close(f) => Some(close_frame(f)),
            ToUpstream::Answer => Some(None),
            ToUpstream::Nothing => None,
        };
        tokio::join!(
            close_leg(&mut self.client, client),
            close_leg(&mut self.upstream, upstream)
        );
    }
}

impl WsRelay {
    /// Sends a data frame from `from` to the other leg, within the heartbeat
    /// timeout; heartbeats pause while it waits.
    async fn relay(&mut self, cx: Cx<'_>, from: Leg, msg: Message) -> Option<End> {
        let n = msg.len();
        let waited = Instant::now();
        let sent = match from {
            Leg::Client => {
                cx.conn.add_bytes_in(n);
                cx.conn.touch();
                timeout(self.wait, self.upstream.send(msg)).await
            }
            Leg::Upstream => timeout(self.wait, self.client.send(msg)).await,
        };
        cx.deadlines.pause(waited.elapsed());
        let to = match from {
            Leg::Client => Leg::Upstream,
            Leg::Upstream => Leg::Client,
        };
        match sent {
            Ok(Ok(())) => {
                if to == Leg::Client {
                    cx.conn.add_bytes_out(n);
                }
                None
            }
            Err(_) => Some(End::Stalled(to)),
            Ok(Err(_)) => Some(End::Lost(to, "write failed".into())),
        }
    }
}

/// A close frame from the table's code and reason.
fn close_frame(f: &Option<(u16, String)>) -> Option<CloseFrame> {
    f.as_ref().map(|(code, reason)| CloseFrame {
        code: WireCode::from(*code),
        reason: reason.clone().into(),
    })
}

/// Closes one leg (`Some(frame)`; `Some(None)` answers a close it sent), then
/// waits, bounded, for its end.
async fn close_leg<S>(leg: &mut WebSocketStream<S>, frame: Option<Option<CloseFrame>>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let Some(frame) = frame else {
        return;
    };
    let _ = timeout(CLOSE_WAIT, leg.close(frame)).await;
    let _ = timeout(CLOSE_WAIT, async {
        while let Some(Ok(_)) = leg.next().await {}
    })
    .await;
}
