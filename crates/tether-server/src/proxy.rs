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
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Request, StatusCode};
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
use crate::driver::{self, Cx, End, Ending, Family, Heard, Leg, ToClient, ToUpstream, Transport};
use crate::net::SocketInfo;
use crate::ws::Ws;
use crate::App;

type Upstream = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// How long each leg's closing handshake may take.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Request headers that describe one hop, never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "host",
    "connection",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "content-length",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-accept",
];

/// The routes of `[[proxy.routes]]`.
pub(crate) fn router(app: Arc<App>) -> Router {
    let mut r = Router::new();
    for (i, route) in app.cfg.proxy.routes.iter().enumerate() {
        let handler = move |State(app): State<Arc<App>>, req: Request<Body>| async move {
            handle(app, i, req).await
        };
        r = r.route(&route.path, get(handler));
    }
    r.with_state(app)
}

/// Whether a header the client sent must not reach the upstream.
fn stripped(name: &HeaderName) -> bool {
    let n = name.as_str();
    HOP_BY_HOP.contains(&n)
        || n.starts_with("x-tether-")
        || n == "forwarded"
        || n.starts_with("x-forwarded-")
}

/// The upstream URL: the route's, plus the client's query without `token`.
pub(crate) fn upstream_url(route: &ProxyRoute, query: Option<&str>) -> String {
    let kept: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(k, _)| k != "token")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        return route.upstream.clone();
    }
    let q = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(kept)
        .finish();
    let sep = if route.upstream.contains('?') {
        '&'
    } else {
        '?'
    };
    format!("{}{sep}{q}", route.upstream)
}

/// The headers the upstream gets: the client's, less hop-by-hop (the fixed list and
/// every header its `Connection` headers name, RFC 9110 7.6.1) and client-forged
/// `X-Tether-*`/`Forwarded`/`X-Forwarded-*`, plus Tether's own.
pub(crate) fn upstream_headers(
    client: &HeaderMap,
    client_id: &str,
    conn_id: &str,
    ip: std::net::IpAddr,
) -> HeaderMap {
    // Header names are lower case in a `HeaderMap`; the options are made so.
    let named: Vec<String> = client
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    let mut h = HeaderMap::new();
    for (k, v) in client {
        if !stripped(k) && !named.iter().any(|n| n == k.as_str()) {
            h.append(k.clone(), v.clone());
        }
    }
    let mut add = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    };
    add("x-tether-client-id", client_id);
    add("x-tether-conn-id", conn_id);
    add("x-forwarded-for", &ip.to_string());
    h
}

async fn handle(app: Arc<App>, index: usize, mut req: Request<Body>) -> Response {
    // HEAD reaches GET handlers in axum; it must not open a connection.
    if req.method() != http::Method::GET {
        return crate::net::error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        );
    }
    let Some(route) = app.cfg.proxy.routes.get(index).cloned() else {
        return crate::net::error_response(StatusCode::NOT_FOUND, "not_found", "no such route");
    };
    let Some(info) = req.extensions().get::<SocketInfo>().cloned() else {
        return admission::bad_request("proxy routes are served on the client listener");
    };
    let headers = req.headers().clone();
    let query = req.uri().query().map(str::to_owned);
    let param = |name: &str| {
        form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    let (client_param, token_param, refusal_param) =
        (param("client"), param("token"), param("refusal"));
    let refusal_close = refusal_param.as_deref() == Some("close");
    let ip = crate::net::client_ip(info.peer.ip(), &headers, &app.cfg.server.trusted_proxies);
    let origin_ok = !crate::sse::origin_refused(&app, &headers);
    let creds = if app.auth.is_jwt() {
        Credentials::Token(admission::request_token(&headers, token_param.as_deref()))
    } else {
        Credentials::Client(client_param.as_deref())
    };
    if route.is_ws() {
        let key = match crate::ws::check_upgrade(&headers) {
            Ok(k) => k,
            Err(r) => return *r,
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let hs_timeout = Duration::from_millis(app.cfg.limits.handshake_timeout_ms.get());
        let admitted = match admission::admit(&app, creds, ip, Kind::Proxy, origin_ok, &[]) {
            Ok(a) => a,
            Err(e) => {
                let refused = crate::ws::RefusedUpgrade {
                    error: e,
                    close: refusal_close,
                    pending: info.take_pending(),
                };
                return crate::ws::refusal_response(
                    &app, refused, on_upgrade, hs_timeout, &key, None,
                );
            }
        };
        // Connect the upstream before answering the client.
        let url = upstream_url(&route, query.as_deref());
        let upstream = connect_ws(
            &app,
            &route,
            &url,
            &headers,
            &admitted.client_id,
            admitted.reservation.conn_id(),
            ip,
        )
        .await;
        let (upstream, protocol) = match upstream {
            Ok(u) => u,
            Err(why) => {
                tracing::info!(upstream = %route.upstream, error = %why, "upstream unavailable");
                drop(admitted);
                let refused = crate::ws::RefusedUpgrade {
                    error: admission::refused(&app, Refusal::UpstreamUnavailable, ip),
                    close: refusal_close,
                    pending: info.take_pending(),
                };
                return crate::ws::refusal_response(
                    &app, refused, on_upgrade, hs_timeout, &key, None,
                );
            }
        };
        let pending = info.take_pending();
        let user_agent = headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let task_app = app.clone();
        // A proxied connection's token expires like any other (1008 on both legs).
        let admitted_expiry = admitted.identity.as_ref().map(|i| app.auth.expires_at(i));
        app.tasks.spawn(async move {
            let Ok(Ok(up)) = timeout(hs_timeout, on_upgrade).await else {
                return;
            };
            let client = WebSocketStream::from_raw_socket(
                crate::conn_io::ConnIo::new(up),
                Role::Server,
                Some(crate::ws::relay_config(&task_app)),
            )
            .await;
            let guard = admitted.reservation.commit(ConnSpec {
                transport: Kind::Proxy,
                remote_addr: ip,
                user_agent,
                meta: admitted.identity.map(|i| i.meta).unwrap_or_default(),
                upstream: Some(route.upstream.clone()),
            });
            drop(pending);
            let expires_at = admitted_expiry;
            let relay = WsRelay {
                client,
                upstream,
                wait: Duration::from_millis(task_app.cfg.heartbeat.timeout_ms.get()),
            };
            driver::drive(task_app, guard, relay, expires_at, None).await;
        });
        crate::ws::switching(&key, protocol)
    } else {
        crate::proxy_sse::handle(
            app.clone(),
            route,
            info,
            &headers,
            query,
            creds,
            ip,
            origin_ok,
        )
        .await
    }
}

async fn connect_ws(
    app: &App,
    route: &ProxyRoute,
    url: &str,
    client_headers: &HeaderMap,
    client_id: &str,
    conn_id: &str,
    ip: std::net::IpAddr,
) -> Result<(Upstream, Option<HeaderValue>), String> {
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    for (k, v) in upstream_headers(client_headers, client_id, conn_id, ip) {
        if let Some(k) = k {
            request.headers_mut().append(k, v);
        }
    }
    let cfg = crate::ws::relay_config(app);
    let connector = match (url.starts_with("wss://"), &app.upstream_tls) {
        (true, Some(tls)) => Some(tokio_tungstenite::Connector::Rustls(tls.clone())),
        (true, None) => {
            return Err("no trusted root certificates to verify a wss:// upstream".into())
        }
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
        Err(_) => Err(format!("no answer within {} ms", route.connect_timeout_ms)),
        Ok(Err(e)) => Err(e.to_string()),
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
        _app: &App,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_and_hop_by_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("x-tether-client-id", "forged"),
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6"),
            ("connection", "upgrade"),
            ("sec-websocket-key", "abc"),
            ("cookie", "a=b"),
            ("authorization", "Bearer t"),
            ("origin", "https://app.example"),
            ("sec-websocket-protocol", "chat"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = upstream_headers(&h, "alice", "n1-x-1", "10.1.2.3".parse().unwrap());
        assert_eq!(out["x-tether-client-id"], "alice");
        assert_eq!(out["x-tether-conn-id"], "n1-x-1");
        assert_eq!(out["x-forwarded-for"], "10.1.2.3");
        assert!(
            out.get("forwarded").is_none()
                && out.get("connection").is_none()
                && out.get("sec-websocket-key").is_none()
        );
        for kept in [
            "cookie",
            "authorization",
            "origin",
            "sec-websocket-protocol",
        ] {
            assert!(out.get(kept).is_some(), "{kept}");
        }
    }

    /// RFC 9110 7.6.1: the headers a `Connection` header names are hop-by-hop too,
    /// in any case, from every `Connection` header, in comma-separated lists.
    #[test]
    fn headers_named_in_connection_are_stripped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "Upgrade, X-Drop-A ,keep-alive"),
            ("connection", "x-drop-b,, X-DROP-C"),
            ("x-drop-a", "1"),
            ("x-drop-b", "2"),
            ("x-drop-c", "3"),
            ("x-keep", "4"),
            ("cookie", "a=b"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = upstream_headers(&h, "alice", "n1-x-1", "10.1.2.3".parse().unwrap());
        for gone in ["x-drop-a", "x-drop-b", "x-drop-c", "connection"] {
            assert!(out.get(gone).is_none(), "{gone}");
        }
        assert_eq!(out["x-keep"], "4");
        assert_eq!(out["cookie"], "a=b");
        // Naming Tether's own headers cannot remove them.
        let mut h = HeaderMap::new();
        h.append(
            "connection",
            HeaderValue::from_static("x-tether-client-id, x-forwarded-for"),
        );
        let out = upstream_headers(&h, "alice", "n1-x-1", "10.1.2.3".parse().unwrap());
        assert_eq!(out["x-tether-client-id"], "alice");
        assert_eq!(out["x-forwarded-for"], "10.1.2.3");
    }

    #[test]
    fn token_is_removed_from_the_upstream_query() {
        let r = ProxyRoute {
            path: "/chat".into(),
            upstream: "ws://127.0.0.1:9/ws".into(),
            connect_timeout_ms: std::num::NonZeroU64::MIN,
            upstream_idle_timeout_ms: 0,
        };
        assert_eq!(
            upstream_url(&r, Some("token=secret&room=5")),
            "ws://127.0.0.1:9/ws?room=5"
        );
        assert_eq!(
            upstream_url(&r, Some("token=secret")),
            "ws://127.0.0.1:9/ws"
        );
        assert_eq!(upstream_url(&r, None), "ws://127.0.0.1:9/ws");
    }
}
