//! The client listener: binding, the accept loop, pending-handshake accounting,
//! the per-socket HTTP task and the client's address.
//!
//! A socket's life: accepted → counted as pending (a [`PendingSlot`], refused at
//! once beyond `limits.max_pending_handshakes`) → served by one tracked task running
//! hyper's HTTP/1 connection (one request per socket: answers carry `Connection: close`) → either
//! refused (socket closes), or admitted: the transport takes the pending slot and
//! drops it once the connection is committed. A socket still pending at
//! `limits.handshake_timeout_ms` is dropped (slowloris). With `[tls]` the TLS
//! handshake runs first, inside that deadline; a connection whose ALPN chose `h2`
//! is served by [`crate::tls::serve_h2`] (many streams, same pending rule).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use parking_lot::Mutex;
use tether_core::Metrics;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use crate::conn_io::{Hijack, PlainTcp};
use crate::App;

/// Backlog of the listening sockets.
const BACKLOG: u32 = 4096;

/// Binds a listener with a deep backlog and `SO_REUSEADDR`.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Counts sockets accepted and not yet admitted.
#[derive(Debug)]
pub struct PendingCounter {
    n: Arc<AtomicUsize>,
    metrics: Metrics,
}

impl PendingCounter {
    pub(crate) fn new(metrics: Metrics) -> Self {
        Self {
            n: Arc::new(AtomicUsize::new(0)),
            metrics,
        }
    }
    /// Sockets pending now.
    pub fn get(&self) -> usize {
        self.n.load(Ordering::Acquire)
    }
    fn try_take(&self, max: usize) -> Option<PendingSlot> {
        self.n
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        self.metrics.pending_delta(1);
        Some(PendingSlot {
            n: self.n.clone(),
            metrics: self.metrics.clone(),
        })
    }
}

/// One pending socket; dropping it un-counts it.
#[derive(Debug)]
pub(crate) struct PendingSlot {
    n: Arc<AtomicUsize>,
    metrics: Metrics,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.n.fetch_sub(1, Ordering::AcqRel);
        self.metrics.pending_delta(-1);
    }
}

/// An accepted socket as hyper serves it: plain TCP, or TLS (boxed: a TLS stream is
/// ~1.2 KiB, and the `Either` would make every plain connection that size too).
pub(crate) type Accepted = Either<PlainTcp, Box<tokio_rustls::server::TlsStream<TcpStream>>>;

/// What the accept loop knows about a request's socket, put in its extensions.
#[derive(Clone, Debug)]
pub(crate) struct SocketInfo {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The socket's pending slot, taken by the transport that admits it.
    pub pending: Arc<Mutex<Option<PendingSlot>>>,
    /// Takes a plain HTTP/1 socket over from hyper (SSE); `None` under TLS.
    pub hijack: Option<Arc<Hijack>>,
}

impl SocketInfo {
    /// Takes the pending slot (the socket is being admitted).
    pub fn take_pending(&self) -> Option<PendingSlot> {
        self.pending.lock().take()
    }
    pub(crate) fn is_pending(&self) -> bool {
        self.pending.lock().is_some()
    }
}

/// Accepts until `stop`; never spins on errors (EMFILE and the like back off).
pub(crate) async fn accept_loop(
    app: Arc<App>,
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<crate::tls::Tls>>,
    stop: CancellationToken,
) {
    let max_pending = app.cfg.limits.max_pending_handshakes.get() as usize;
    let user_timeout = Duration::from_millis(
        app.cfg.heartbeat.interval_ms.get() + app.cfg.heartbeat.timeout_ms.get(),
    );
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = app.pending.try_take(max_pending) else {
            app.metrics.refused("pending_handshakes");
            // Reset at once rather than linger: the point is to shed this socket.
            let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
            drop(socket);
            continue;
        };
        let _ = socket.set_nodelay(true);
        let _ = socket2::SockRef::from(&socket).set_tcp_user_timeout(Some(user_timeout));
        let info = SocketInfo {
            peer,
            pending: Arc::new(Mutex::new(Some(slot))),
            hijack: None,
        };
        app.tasks.spawn(serve_socket(
            app.clone(),
            socket,
            info,
            router.clone(),
            tls.clone(),
        ));
    }
}

/// hyper's service for one socket: the router, with the socket's [`SocketInfo`] in
/// every request's extensions.
fn http_service(
    info: SocketInfo,
    router: Router,
) -> impl hyper::service::Service<
    Request<hyper::body::Incoming>,
    Response = Response,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
       + Send
       + 'static {
    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(info.clone());
        crate::tls::authority_as_host(&mut req);
        let http1 = req.version() < http::Version::HTTP_2;
        let mut router = router.clone();
        async move {
            let mut resp = router.call(req).await.unwrap_or_else(|e| match e {});
            // One request per socket: every answer but an upgrade closes it. (hyper's
            // own keep-alive switch would also rewrite the 101's `Connection: upgrade`.)
            // HTTP/2 has no `Connection`; its streams are many per socket by design.
            if http1 && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                resp.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
            }
            Ok::<_, Infallible>(resp)
        }
    })
}

async fn serve_socket(
    app: Arc<App>,
    socket: TcpStream,
    mut info: SocketInfo,
    router: Router,
    tls: Option<Arc<crate::tls::Tls>>,
) {
    let deadline = Duration::from_millis(app.cfg.limits.handshake_timeout_ms.get());
    let until = tokio::time::Instant::now() + deadline;
    let io: Accepted = match tls {
        None => {
            let (plain, hijack) = PlainTcp::new(socket);
            info.hijack = Some(hijack);
            Either::Left(plain)
        }
        Some(tls) => {
            let handshake = tokio::select! {
                // Boxed, as is HTTP/2 below: this task's state is sized by its
                // largest await, and the plain socket's hyper connection needs far
                // less (6.2 KB -> 1.4 KB per handshake in flight).
                h = tokio::time::timeout_at(until, Box::pin(tls.accept(socket))) => h,
                _ = app.drain.hard_stop().cancelled() => return,
            };
            match handshake {
                Ok(Ok(stream)) if crate::tls::is_h2(&stream) => {
                    let service = http_service(info.clone(), router);
                    return Box::pin(crate::tls::serve_h2(&app, &info, stream, service, until))
                        .await;
                }
                Ok(Ok(stream)) => Either::Right(Box::new(stream)),
                Ok(Err(e)) => {
                    tracing::debug!(peer = %info.peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %info.peer, "TLS handshake timed out");
                    return;
                }
            }
        }
    };
    let service = http_service(info.clone(), router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(until.saturating_duration_since(tokio::time::Instant::now()));
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let timer = tokio::time::sleep_until(until);
    tokio::pin!(timer);
    let mut timer_live = true;
    let hijack = info.hijack.clone();
    let hijacked = async {
        match &hijack {
            Some(h) => h.taken().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(hijacked);
    loop {
        tokio::select! {
            _ = &mut conn => break,
            // The SSE handler took the socket: hyper's connection goes, its buffers too.
            _ = &mut hijacked => break,
            _ = &mut timer, if timer_live => {
                if info.is_pending() {
                    tracing::debug!(peer = %info.peer, "handshake timed out");
                    break;
                }
                timer_live = false;
            }
            _ = app.drain.hard_stop().cancelled() => break,
        }
    }
}

/// The client's address: the TCP peer, unless the peer is a trusted proxy, in which
/// case the right-most `X-Forwarded-For` (or `Forwarded: for=`) hop that is not a
/// trusted proxy.
pub(crate) fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    for v in headers.get_all("forwarded") {
        let Ok(s) = v.to_str() else { continue };
        for element in s.split(',') {
            for pair in element.split(';') {
                let mut kv = pair.trim().splitn(2, '=');
                if kv.next().is_some_and(|k| k.eq_ignore_ascii_case("for")) {
                    if let Some(ip) = kv.next().and_then(parse_forwarded_node) {
                        hops.push(ip);
                    }
                }
            }
        }
    }
    if hops.is_empty() {
        for v in headers.get_all("x-forwarded-for") {
            let Ok(s) = v.to_str() else { continue };
            hops.extend(s.split(',').filter_map(|h| h.trim().parse::<IpAddr>().ok()));
        }
    }
    hops.into_iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        .unwrap_or(peer)
}

fn parse_forwarded_node(raw: &str) -> Option<IpAddr> {
    let s = raw.trim().trim_matches('"');
    if let Some(v6) = s.strip_prefix('[') {
        return v6.split(']').next()?.parse().ok();
    }
    s.split(':').next()?.parse().ok()
}

/// `/ws`, `/sse`, `/healthz`, `/readyz`, the proxy routes, plus `extra` (the API's
/// routes when both listeners are one), and a JSON 404 for anything else.
pub(crate) fn client_router(app: Arc<App>, extra: Option<Router>) -> Router {
    let router = Router::new()
        .route("/ws", get(crate::ws::handler))
        .route(
            "/sse",
            get(crate::sse::handler).options(crate::sse::preflight),
        )
        .with_state(app.clone())
        .merge(crate::proxy::router(app.clone()))
        .merge(crate::client_assets::router(app.clone()))
        .merge(health_router(app));
    match extra {
        Some(extra) => router.merge(extra),
        None => router,
    }
    .fallback(not_found)
}

/// `/healthz` and `/readyz`, on both listeners.
pub(crate) fn health_router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(app)
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, serde_json::json!({"status": "ok"}))
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.ready() {
        json_response(StatusCode::OK, serde_json::json!({"status": "ready"}))
    } else {
        let why = if app.drain.phase() != tether_core::Phase::Running {
            "draining"
        } else if !app.broker.is_up() {
            "broker_unavailable"
        } else {
            "server_full"
        };
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"status": "unavailable", "reason": why}),
        )
    }
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// A JSON answer.
pub(crate) fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// `{"error","message"}` with a status.
pub(crate) fn error_response(status: StatusCode, error: &str, message: &str) -> Response {
    json_response(
        status,
        serde_json::json!({"error": error, "message": message}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn untrusted_peer_cannot_set_the_address() {
        let peer: IpAddr = "203.0.113.9".parse().unwrap();
        let h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(client_ip(peer, &h, &["10.0.0.0/8".parse().unwrap()]), peer);
    }

    #[test]
    fn rightmost_untrusted_hop_wins() {
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let trusted = ["10.0.0.0/8".parse().unwrap()];
        let h = headers(&[("x-forwarded-for", "6.6.6.6, 1.2.3.4, 10.0.0.7")]);
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        let h = headers(&[(
            "forwarded",
            "for=6.6.6.6, for=\"[2001:db8::1]:443\";proto=https",
        )]);
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        let h = headers(&[("x-forwarded-for", "10.1.1.1")]);
        assert_eq!(client_ip(peer, &h, &trusted), peer);
    }
}
