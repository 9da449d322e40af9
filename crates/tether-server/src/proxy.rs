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
use tether_core::{ConnSpec, ConnectionGuard, Transport};
use tether_protocol::{CloseCode, Refusal};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WireCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::admission::{self, Credentials};
use crate::config::ProxyRoute;
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

/// The headers the upstream gets: the client's, less hop-by-hop and client-forged
/// `X-Tether-*`/`Forwarded`/`X-Forwarded-*`, plus Tether's own.
pub(crate) fn upstream_headers(
    client: &HeaderMap,
    client_id: &str,
    conn_id: &str,
    ip: std::net::IpAddr,
) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in client {
        if !stripped(k) {
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
        let admitted = match admission::admit(&app, creds, ip, Transport::Proxy, origin_ok, &[]) {
            Ok(a) => a,
            Err(e) => {
                return crate::ws::refusal_response(
                    &app,
                    e,
                    refusal_close,
                    on_upgrade,
                    hs_timeout,
                    &key,
                    None,
                )
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
                let e = admission::refused(&app, Refusal::UpstreamUnavailable, ip);
                return crate::ws::refusal_response(
                    &app,
                    e,
                    refusal_close,
                    on_upgrade,
                    hs_timeout,
                    &key,
                    None,
                );
            }
        };
        let pending = info.take_pending();
        let user_agent = headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let task_app = app.clone();
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
                transport: Transport::Proxy,
                remote_addr: ip,
                user_agent,
                meta: admitted.identity.map(|i| i.meta).unwrap_or_default(),
                upstream: Some(route.upstream.clone()),
            });
            drop(pending);
            relay(task_app, client, upstream, guard).await;
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

/// How a relay ended: the close each leg gets (`None`: none can be sent), and the
/// code recorded for the connection.
struct Ending {
    to_client: Option<Option<CloseFrame>>,
    to_upstream: Option<Option<CloseFrame>>,
    code: u16,
    reason: String,
}

fn frame(code: u16, reason: &str) -> Option<CloseFrame> {
    Some(CloseFrame {
        code: WireCode::from(code),
        reason: reason.to_owned().into(),
    })
}

/// A code a peer sent, as it may be sent on: 1005/1006/1015 cannot be.
fn passable(code: u16) -> bool {
    !matches!(code, 1005 | 1006 | 1015)
}

async fn relay(app: Arc<App>, mut client: Ws, mut upstream: Upstream, mut guard: ConnectionGuard) {
    let conn = guard.conn().clone();
    let interval = Duration::from_millis(app.cfg.heartbeat.interval_ms.get());
    let hb_timeout = Duration::from_millis(app.cfg.heartbeat.timeout_ms.get());
    let start = Instant::now();
    let lifetime_at = match app.cfg.limits.max_connection_lifetime_ms {
        0 => None,
        ms => Some(start + crate::jittered(ms)),
    };
    let mut next_ping = start + interval;
    let mut client_due: Option<Instant> = None;
    let mut upstream_due: Option<Instant> = None;
    let timer = tokio::time::sleep_until(next_ping);
    tokio::pin!(timer);
    let going_away = |reason: &str| Ending {
        to_client: Some(frame(1001, reason)),
        to_upstream: Some(frame(1001, reason)),
        code: 1001,
        reason: reason.to_owned(),
    };
    let ending = loop {
        let wake = [Some(next_ping), client_due, upstream_due, lifetime_at]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(next_ping);
        timer.as_mut().reset(wake);
        tokio::select! {
            biased;
            _ = app.drain.hard_stop().cancelled() => break going_away("shutdown deadline"),
            closing = conn.close_requested() => {
                // Kicks and drain are 1001 on both legs; limits and token expiry 1008.
                break if matches!(closing.code.0, 1001 | 4001 | 4002) {
                    going_away(&closing.reason)
                } else {
                    Ending { to_client: Some(frame(1008, &closing.reason)), to_upstream: Some(frame(1008, &closing.reason)), code: closing.code.0, reason: closing.reason }
                };
            }
            _ = &mut timer => {
                let now = Instant::now();
                if client_due.is_some_and(|d| now >= d) {
                    break Ending { to_client: None, to_upstream: Some(frame(1001, "client heartbeat timeout")), code: CloseCode::HEARTBEAT_TIMEOUT.0, reason: "client heartbeat timeout".into() };
                }
                if upstream_due.is_some_and(|d| now >= d) {
                    break Ending { to_client: Some(frame(1014, "upstream heartbeat timeout")), to_upstream: None, code: CloseCode::BAD_GATEWAY.0, reason: "upstream heartbeat timeout".into() };
                }
                if lifetime_at.is_some_and(|d| now >= d) {
                    break Ending { to_client: Some(frame(1008, "maximum connection lifetime")), to_upstream: Some(frame(1008, "maximum connection lifetime")), code: CloseCode::MAX_LIFETIME.0, reason: "maximum connection lifetime".into() };
                }
                if now >= next_ping {
                    next_ping = now + interval;
                    client_due.get_or_insert(now + hb_timeout);
                    upstream_due.get_or_insert(now + hb_timeout);
                    let c = timeout(hb_timeout, client.send(Message::Ping(Default::default()))).await;
                    let u = timeout(hb_timeout, upstream.send(Message::Ping(Default::default()))).await;
                    if !matches!(c, Ok(Ok(()))) {
                        break Ending { to_client: None, to_upstream: Some(frame(1001, "client unreachable")), code: 1006, reason: "client write failed".into() };
                    }
                    if !matches!(u, Ok(Ok(()))) {
                        break Ending { to_client: Some(frame(1014, "upstream unreachable")), to_upstream: None, code: 1014, reason: "upstream write failed".into() };
                    }
                }
            }
            m = client.next() => {
                client_due = None;
                match m {
                    Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                        conn.add_bytes_in(m.len());
                        conn.touch();
                        // The relay waits on the upstream; the heartbeats pause meanwhile.
                        let waited = Instant::now();
                        let sent = timeout(hb_timeout, upstream.send(m)).await;
                        shift(&mut upstream_due, waited.elapsed());
                        shift(&mut client_due, waited.elapsed());
                        if !matches!(sent, Ok(Ok(()))) {
                            break Ending { to_client: Some(frame(1014, "upstream is not reading")), to_upstream: None, code: 1014, reason: "upstream write failed".into() };
                        }
                    }
                    Some(Ok(Message::Close(f))) => {
                        let (code, reason) = f.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
                        let onward = if passable(code) { frame(code, &reason) } else { frame(1001, "client closed") };
                        break Ending { to_client: Some(None), to_upstream: Some(onward), code, reason };
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        use tokio_tungstenite::tungstenite::error::ProtocolError;
                        let code = match e {
                            tokio_tungstenite::tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
                            tokio_tungstenite::tungstenite::Error::Capacity(_) => Some(1009),
                            tokio_tungstenite::tungstenite::Error::Protocol(_) => Some(1002),
                            tokio_tungstenite::tungstenite::Error::Utf8(_) => Some(1007),
                            _ => None,
                        };
                        break match code {
                            Some(c) => Ending { to_client: Some(frame(c, "protocol error")), to_upstream: Some(frame(1008, "client protocol error")), code: c, reason: "client protocol error".into() },
                            None => Ending { to_client: None, to_upstream: Some(frame(1001, "client went away")), code: 1006, reason: "client connection lost".into() },
                        };
                    }
                    None => break Ending { to_client: None, to_upstream: Some(frame(1001, "client went away")), code: 1006, reason: "client connection lost".into() },
                }
            }
            m = upstream.next() => {
                upstream_due = None;
                match m {
                    Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                        let n = m.len();
                        let waited = Instant::now();
                        let sent = timeout(hb_timeout, client.send(m)).await;
                        shift(&mut upstream_due, waited.elapsed());
                        shift(&mut client_due, waited.elapsed());
                        match sent {
                            Ok(Ok(())) => conn.add_bytes_out(n),
                            // Waiting on the client past the heartbeat timeout: slow consumer.
                            Err(_) => break Ending { to_client: Some(frame(1008, "slow consumer")), to_upstream: Some(frame(1001, "client is not reading")), code: CloseCode::SLOW_CONSUMER.0, reason: "slow consumer".into() },
                            Ok(Err(_)) => break Ending { to_client: None, to_upstream: Some(frame(1001, "client went away")), code: 1006, reason: "client write failed".into() },
                        }
                    }
                    Some(Ok(Message::Close(f))) => {
                        let (code, reason) = f.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
                        let onward = if passable(code) { frame(code, &reason) } else { None };
                        break Ending { to_client: Some(onward), to_upstream: Some(None), code, reason };
                    }
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => break Ending { to_client: Some(frame(1014, "upstream failed")), to_upstream: None, code: 1014, reason: "upstream failed".into() },
                }
            }
        }
    };
    guard.set_close(ending.code, ending.reason.clone());
    let close_client = async {
        if let Some(f) = ending.to_client {
            let _ = timeout(CLOSE_WAIT, client.close(f)).await;
            let _ = timeout(CLOSE_WAIT, async {
                while let Some(Ok(_)) = client.next().await {}
            })
            .await;
        }
    };
    let close_upstream = async {
        if let Some(f) = ending.to_upstream {
            let _ = timeout(CLOSE_WAIT, upstream.close(f)).await;
            let _ = timeout(CLOSE_WAIT, async {
                while let Some(Ok(_)) = upstream.next().await {}
            })
            .await;
        }
    };
    tokio::select! {
        _ = async { tokio::join!(close_client, close_upstream) } => {}
        _ = app.drain.hard_stop().cancelled() => {}
    }
    drop(guard);
}

/// Moves a heartbeat deadline by the time the relay spent waiting on a leg.
fn shift(due: &mut Option<Instant>, by: Duration) {
    if let Some(d) = due {
        *d += by;
    }
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
