//! The server API's own listener (when `[api] listen` differs from `listen`), plain
//! or TLS. It gets the same protections as the client listener, since both share
//! the process's file table: accept errors back off instead of spinning, at most
//! `limits.max_pending_handshakes` API sockets are open at once (beyond it a new one
//! is reset at once), a request's head must arrive within
//! `limits.handshake_timeout_ms` (which also closes a keep-alive socket idle that
//! long), and a handler (reading the body included) must answer within it (408).
//! A response that streams (`/api/events`) is not cut: only its head is timed.
//!
//! Lifetimes: [`serve`] owns the listener until `stop`; each socket is a task on its
//! own tracker, holding one permit of the socket cap until it ends. On `stop`, open
//! connections finish gracefully; the hard stop cuts them.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::tls::{authority_as_host, is_h2, Tls};
use crate::App;

/// Runs a hyper connection until it ends; `stop` asks it to finish gracefully, the
/// hard stop cuts it.
macro_rules! run_conn {
    ($conn:expr, $stop:expr, $hard:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        tokio::select! {
            _ = &mut conn => return,
            _ = $stop.cancelled() => conn.as_mut().graceful_shutdown(),
            _ = $hard.cancelled() => return,
        }
        tokio::select! {
            _ = &mut conn => {}
            _ = $hard.cancelled() => {}
        }
    }};
}

/// How long to wait after a failed accept (EMFILE and the like).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `router` on `listener` until `stop`, then waits for open connections.
pub(crate) async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<Tls>>,
    stop: CancellationToken,
) {
    let cap = Arc::new(Semaphore::new(
        app.cfg.limits.max_pending_handshakes.get() as usize
    ));
    let conns = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            a = listener.accept() => a,
        };
        let socket = match accepted {
            Ok((socket, _)) => socket,
            Err(e) => {
                tracing::warn!(error = %e, "API accept failed; backing off");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(permit) = cap.clone().try_acquire_owned() else {
            app.metrics.refused("api_sockets");
            // Reset at once rather than linger: the point is to shed this socket.
            let _ = socket2::SockRef::from(&socket).set_linger(Some(Duration::ZERO));
            continue;
        };
        let _ = socket.set_nodelay(true);
        conns.spawn(connection(
            app.clone(),
            socket,
            permit,
            router.clone(),
            tls.clone(),
            stop.clone(),
        ));
    }
    drop(listener);
    conns.close();
    conns.wait().await;
}

/// One API socket: TLS (if any), then HTTP/1.1 with keep-alive or HTTP/2.
async fn connection(
    app: Arc<App>,
    socket: TcpStream,
    _permit: OwnedSemaphorePermit,
    router: Router,
    tls: Option<Arc<Tls>>,
    stop: CancellationToken,
) {
    let deadline = Duration::from_millis(app.cfg.limits.handshake_timeout_ms.get());
    let hard = app.drain.hard_stop().clone();
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        answer(router.clone(), req.map(Body::new), deadline)
    });
    let Some(tls) = tls else {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(deadline)
            .serve_connection(TokioIo::new(socket), service);
        return run_conn!(conn, stop, hard);
    };
    let stream = tokio::select! {
        s = tokio::time::timeout(deadline, tls.accept(socket)) => match s {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "API TLS handshake failed");
                return;
            }
            Err(_) => return,
        },
        _ = stop.cancelled() => return,
    };
    if is_h2(&stream) {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(TokioIo::new(stream), service);
        run_conn!(conn, stop, hard)
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(deadline)
            .serve_connection(TokioIo::new(stream), service);
        run_conn!(conn, stop, hard)
    }
}

/// Serves one request: the router's answer within `deadline` (reading the body
/// included), else 408.
async fn answer(
    mut router: Router,
    mut req: Request<Body>,
    deadline: Duration,
) -> Result<axum::response::Response, Infallible> {
    authority_as_host(&mut req);
    let call = tower_service::Service::call(&mut router, req);
    let mut resp = match tokio::time::timeout(deadline, call).await {
        Ok(resp) => resp.unwrap_or_else(|e| match e {}),
        Err(_) => crate::net::error_response(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request was not complete within limits.handshake_timeout_ms",
        ),
    };
    // A request whose body was not read (too large, too slow) leaves the socket
    // mid-request: say so, so that a keep-alive client does not reuse it.
    if matches!(
        resp.status(),
        StatusCode::REQUEST_TIMEOUT | StatusCode::PAYLOAD_TOO_LARGE
    ) {
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    Ok(resp)
}
