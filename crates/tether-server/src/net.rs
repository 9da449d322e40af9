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
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use crate::app::App;
use crate::conn_io::{Accepted, PlainTcp};
pub(crate) use crate::pending::PendingSlot;
pub(crate) use crate::socket_info::SocketInfo;

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

/// Accepts until `stop`; never spins on errors (EMFILE and the like back off).
pub(crate) async fn accept_loop(
    app: Arc<App>,
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<crate::tls::Tls>>,
    stop: CancellationToken,
) {
    let max_pending = app.cfg.limits.max_pending_handshakes.get() as usize;
    let handshake_timeout = Duration::from_millis(app.cfg.limits.handshake_timeout_ms.get());
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
            handshake_until: tokio::time::Instant::now() + handshake_timeout,
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
    let until = info.handshake_until;
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
