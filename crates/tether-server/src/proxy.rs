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
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use tether_core::{ConnSpec, Connection, Outgoing, Transport as Kind};
use tether_protocol::Refusal;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WireCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::admission::{self, Credentials};
use crate::config::ProxyRoute;
use crate::driver::{
    self, Ctx, Cx, End, Ending, Family, Heard, Leg, ToClient, ToUpstream, Transport,
};
use crate::edge::Edge;
use crate::net::SocketInfo;
use crate::upstream::{upstream_headers, upstream_url, UpstreamError};
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
    let creds = pr.creds(&edge);
    crate::proxy_sse::handle(
        edge.clone(),
        route,
        info,
        &pr.headers,
        pr.query.clone(),
        creds,
        pr.ip,
        pr.origin_ok,
    )
    .await
}

/// What a proxied request says, read before admission.
struct ProxyRequest {
    headers: HeaderMap,
    query: Option<String>,
    /// The client's address (through trusted proxies).
    ip: std::net::IpAddr,
    origin_ok: bool,
    client: Option<String>,
    token: Option<String>,
    /// `?refusal=close`.
    refusal_close: bool,
}

impl ProxyRequest {
    fn read(edge: &Edge, req: &Request<Body>, info: &SocketInfo) -> Self {
        let headers = req.headers().clone();
        let query = req.uri().query().map(str::to_owned);
        let param = |name: &str| {
            form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.into_owned())
        };
        let (client, token) = (param("client"), param("token"));
        let refusal_close = param("refusal").as_deref() == Some("close");
        let ip = edge.gate.client_ip(info.peer.ip(), &headers);
        let origin_ok = !edge.gate.origins.refused(&headers);
        ProxyRequest {
            headers,
            query,
            ip,
            origin_ok,
            client,
            token,
            refusal_close,
        }
    }

    fn creds(&self, edge: &Edge) -> Credentials<'_> {
        if edge.gate.auth.is_jwt() {
            Credentials::Token(admission::request_token(
                &self.headers,
                self.token.as_deref(),
            ))
        } else {
            Credentials::Client(self.client.as_deref())
        }
    }
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
    let admitted = match admission::admit(
        &edge.gate,
        pr.creds(&edge),
        pr.ip,
        Kind::Proxy,
        pr.origin_ok,
        &[],
    )
    .await
    {
        Ok(a) => a,
        Err(e) => return refuse(e, on_upgrade),
    };
    // Connect the upstream before answering the client.
    let url = upstream_url(&route, pr.query.as_deref());
    let conn_id = admitted.reservation.conn_id();
    let upstream = connect_ws(
        &edge,
        &route,
        &url,
        &pr.headers,
        &admitted.client_id,
        conn_id,
        pr.ip,
    )
    .await;
    let (upstream, protocol) = match upstream {
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
    let pending = info.take_pending();
    let spec = ConnSpec {
        transport: Kind::Proxy,
        remote_addr: pr.ip,
        user_agent: pr
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        meta: admitted
            .identity
            .as_ref()
            .map(|i| i.meta.clone())
            .unwrap_or_default(),
        upstream: Some(route.upstream.clone()),
    };
    // A proxied connection's token expires like any other (1008 on both legs).
    let expires_at = admitted
        .identity
        .as_ref()
        .map(|i| edge.gate.auth.expires_at(i));
    let mut deadlines = edge.driving.deadlines::<WsRelay>(info.handshake_until);
    deadlines.expire_at(expires_at);
    let task_edge = edge.clone();
    edge.tasks.spawn(async move {
        let Some(Ok(up)) = deadlines.within_handshake(on_upgrade).await else {
            return;
        };
        let client = WebSocketStream::from_raw_socket(
            crate::conn_io::ConnIo::new(up),
            Role::Server,
            Some(crate::ws::relay_config(&task_edge)),
        )
        .await;
        let guard = admission::commit(&task_edge.gate, admitted.reservation, spec).await;
        drop(pending);
        let relay = WsRelay {
            client,
            upstream,
            wait: task_edge.driving.timeout,
        };
        driver::drive(task_edge.driving.clone(), guard, relay, deadlines).await;
    });
    crate::ws::switching(&key, protocol)
}

async fn connect_ws(
    edge: &Edge,
    route: &ProxyRoute,
    url: &str,
    client_headers: &HeaderMap,
    client_id: &str,
    conn_id: &str,
    ip: std::net::IpAddr,
) -> Result<(Upstream, Option<HeaderValue>), UpstreamError> {
    let mut request = url
        .into_client_request()
        .map_err(|e| UpstreamError::Request(Box::new(e)))?;
    for (k, v) in upstream_headers(client_headers, client_id, conn_id, ip) {
        if let Some(k) = k {
            request.headers_mut().append(k, v);
        }
    }
    let cfg = crate::ws::relay_config(edge);
    let connector = match (url.starts_with("wss://"), &edge.upstreams.tls) {
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
