//! The server API (SPEC section 8) on its own listener.
//!
//! Doors: with `[api] key`, every call needs `Authorization: Bearer KEY` (the scheme
//! in any case, the key compared in constant time); with no key, only `Host` localhost/127.0.0.1/[::1] is served
//! and POSTs must be `application/json` (no DNS rebinding, no cross-site forms).
//! `/api/events` streams end when the API shuts down.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::StreamBody;
use hyper::body::Frame;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;
use tether_core::{BrokerError, Filter, Outgoing, Phase, Selector, Transport};
use tether_protocol::{valid_channel, CloseCode, Closing, Position};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::respond::{error_response, json_response};

/// Default and maximum page size of `/api/connections`.
const PAGE_DEFAULT: usize = 100;
const PAGE_MAX: usize = 1000;

#[derive(Clone)]
struct ApiState {
    app: Arc<App>,
    stop: CancellationToken,
}

/// The API listener's router: the API calls, `/metrics`, `/admin`, and a JSON 404
/// for anything else (behind the same key and Host checks).
pub(crate) fn router(app: Arc<App>, stop: CancellationToken) -> Router {
    guarded(routes(app.clone(), stop).fallback(not_found), app)
}

/// The API's routes for a client listener that also serves the API (`[api] listen`
/// equal to `listen`): no fallback of their own, the client router has one.
pub(crate) fn shared(app: Arc<App>, stop: CancellationToken) -> Router {
    guarded(routes(app.clone(), stop), app)
}

fn guarded(routes: Router, app: Arc<App>) -> Router {
    routes
        .layer(middleware::from_fn_with_state(app, doors))
        .layer(middleware::from_fn(json_errors))
}

fn routes(app: Arc<App>, stop: CancellationToken) -> Router {
    let state = ApiState {
        app: app.clone(),
        stop,
    };
    Router::new()
        .route("/api/stats", get(stats))
        .route("/api/clients/{id}", get(client))
        .route("/api/connections", get(connections))
        .route("/api/disconnect", post(disconnect))
        .route("/api/publish", post(publish))
        .route("/api/send", post(send))
        .route("/api/channels", get(channels))
        .route("/api/channels/{name}/presence", get(presence))
        .route("/api/channels/{name}/history", get(history))
        .route("/api/events", get(events))
        .route("/api/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .with_state(state)
        .merge(crate::admin::router(app))
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "not_found", "no such API call")
}

/// Every API error is `{"error","message"}` JSON, including the ones the framework
/// produces itself (a path that is not UTF-8, a body over the size limit, an
/// unsupported method): those arrive as plain text or empty and are rewritten here.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let text = axum::body::to_bytes(resp.into_body(), 4096)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let code = match status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => "bad_request",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        _ => "error",
    };
    let message = if text.trim().is_empty() {
        status.canonical_reason().unwrap_or("error").to_owned()
    } else {
        text.into_owned()
    };
    error_response(status, code, &message)
}

/// The API's doors (see the module docs).
async fn doors(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    // With the API on the client listener, an API request is not a pending handshake.
    if let Some(info) = req.extensions().get::<crate::net::SocketInfo>() {
        drop(info.take_pending());
    }
    let key = app.cfg.api.key.as_bytes();
    if !key.is_empty() {
        // The dashboard's page and files, and the key-for-cookie exchange.
        if crate::admin::opens_without_key(req.uri().path()) {
            return next.run(req).await;
        }
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::auth::bearer)
            .unwrap_or("");
        if bool::from(given.as_bytes().ct_eq(key)) {
            return next.run(req).await;
        }
        // A dashboard session: cookie-authenticated POSTs must also be JSON, so no
        // form on another site can make one (on top of SameSite=Strict).
        if app.admin_sessions.valid(req.headers())
            && (req.method() != Method::POST || is_json(&req))
        {
            return next.run(req).await;
        }
        return error_response(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong API key",
        );
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !local_host(host) {
        return error_response(
            StatusCode::FORBIDDEN,
            "forbidden_host",
            "with no [api] key the API answers only Host localhost, 127.0.0.1 or [::1]",
        );
    }
    if req.method() == Method::POST && !is_json(&req) {
        return error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "POST bodies must be Content-Type: application/json",
        );
    }
    next.run(req).await
}

fn is_json(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

fn local_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, tail)) if tail.is_empty() || tail.starts_with(':') => return h == "::1",
            _ => return false,
        }
    } else {
        host.split(':').next().unwrap_or("")
    };
    name.eq_ignore_ascii_case("localhost") || name == "127.0.0.1"
}

async fn stats(State(s): State<ApiState>) -> Response {
    let app = &s.app;
    let [ws, sse, proxy] = app.registry.counts();
    json_response(
        StatusCode::OK,
        json!({
            "node_id": app.registry.node_id(),
            "connections": {"ws": ws, "sse": sse, "proxy": proxy},
            "clients": app.registry.clients(),
            "channels": app.registry.hub().channel_count(),
            "draining": app.drain.phase() != Phase::Running,
            "max_connections": app.max_connections,
            "pending_handshakes": app.pending.get(),
            "tasks": app.tasks.len(),
        }),
    )
}

async fn client(State(s): State<ApiState>, Path(id): Path<String>) -> Response {
    match s.app.registry.client(&id) {
        Some(c) => json_response(StatusCode::OK, json!(c)),
        None => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such client on this node",
        ),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionsQuery {
    client_id: Option<String>,
    transport: Option<Transport>,
    channel: Option<String>,
    idle_ms_gt: Option<u64>,
    limit: Option<usize>,
    page: Option<String>,
}

async fn connections(
    State(s): State<ApiState>,
    query: Result<Query<ConnectionsQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return error_response(StatusCode::BAD_REQUEST, "bad_request", &e.body_text()),
    };
    let limit = q.limit.unwrap_or(PAGE_DEFAULT);
    if limit == 0 || limit > PAGE_MAX {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("limit must be 1 to {PAGE_MAX}"),
        );
    }
    let after = match q.page.as_deref().map(str::parse::<u64>) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "page is not a page token from next_page",
            )
        }
    };
    let filter = Filter {
        idle_ms_gt: q.idle_ms_gt,
        channel: q.channel,
        transport: q.transport,
        meta: None,
    };
    let (conns, next) = s
        .app
        .registry
        .list(q.client_id.as_deref(), &filter, after, limit);
    json_response(
        StatusCode::OK,
        json!({"connections": conns, "next_page": next.map(|n| n.to_string())}),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    client_id: Option<String>,
    conn_id: Option<String>,
    #[serde(rename = "where")]
    filter: Option<Filter>,
    #[serde(default)]
    all: bool,
    code: Option<u16>,
    reason: Option<String>,
    #[serde(default)]
    reconnect: bool,
}

async fn disconnect(State(s): State<ApiState>, body: Bytes) -> Response {
    let b: DisconnectBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return bad(e),
    };
    let code = b.code.unwrap_or(CloseCode::KICKED.0);
    if !(code == 1000 || code == 1001 || (3000..=4999).contains(&code)) {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "code must be 1000, 1001 or 3000 to 4999",
        );
    }
    let selector = Selector {
        client_id: b.client_id,
        conn_id: b.conn_id,
        filter: b.filter.unwrap_or_default(),
        all: b.all,
    };
    if selector.is_empty() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "name a selector: client_id, conn_id, a non-empty where, or all: true",
        );
    }
    let closing = Closing {
        code: CloseCode(code),
        reason: b.reason.unwrap_or_else(|| "kicked".into()),
        reconnect: b.reconnect,
        retry_ms: None,
    };
    let closed = s.app.registry.disconnect(&selector, &closing);
    json_response(StatusCode::OK, json!({"closed": closed}))
}

async fn metrics(State(s): State<ApiState>) -> Response {
    let queued: usize = s
        .app
        .registry
        .connections()
        .iter()
        .map(|c| c.outbox().queued_bytes())
        .sum();
    s.app.metrics.set_queue_bytes(queued as u64);
    s.app.metrics.set_broker_up(s.app.broker.is_up());
    Response::builder()
        .header(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
        .body(Body::from(s.app.metrics.render()))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// `GET /api/openapi.json`: this API described in OpenAPI 3.
async fn openapi() -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(include_str!("openapi.json")))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// Parses a JSON request body. The error, for a 400, names a bad field by its path
/// (`where.idle_ms_gt: invalid type: …`, SPEC section 8); bad JSON is `bad body: …`.
fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let e = e.into_inner();
        if path == "." || e.is_syntax() || e.is_eof() {
            format!("bad body: {e}")
        } else {
            format!("{path}: {e}")
        }
    })?;
    // Text after the value is refused, as `serde_json::from_slice` does.
    de.end().map_err(|e| format!("bad body: {e}"))?;
    Ok(value)
}

fn bad(message: impl AsRef<str>) -> Response {
    error_response(StatusCode::BAD_REQUEST, "bad_request", message.as_ref())
}

/// A 400 naming the channel rule, or `None` for a valid name.
fn bad_channel(name: &str) -> Option<Response> {
    (!valid_channel(name)).then(|| bad("channel: names are 1-200 of A-Z a-z 0-9 _ . : / -"))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    channel: String,
    data: Box<RawValue>,
    idempotency_key: Option<String>,
}

async fn publish(State(s): State<ApiState>, body: Bytes) -> Response {
    let b: PublishBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return bad(e),
    };
    if let Some(r) = bad_channel(&b.channel) {
        return r;
    }
    if b.data.get().len() as u64 > s.app.cfg.limits.max_publish_bytes.get() {
        return error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            &format!(
                "data is over limits.max_publish_bytes ({})",
                s.app.cfg.limits.max_publish_bytes
            ),
        );
    }
    if b.idempotency_key
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.len() > 200)
    {
        return bad("idempotency_key must be 1 to 200 bytes");
    }
    match s
        .app
        .broker
        .publish(&b.channel, b.data.get(), b.idempotency_key.as_deref())
        .await
    {
        Ok(r) => json_response(StatusCode::OK, json!(r)),
        Err(e) => error_response(broker_status(e), e.code(), e.message()),
    }
}

/// The status of a failed broker call: 503 when it may work later (unreachable, a
/// limit), 500 when it failed inside this node.
fn broker_status(e: BrokerError) -> StatusCode {
    match e {
        BrokerError::Unavailable | BrokerError::Hub(_) => StatusCode::SERVICE_UNAVAILABLE,
        BrokerError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    client_id: String,
    data: Box<RawValue>,
}

async fn send(State(s): State<ApiState>, body: Bytes) -> Response {
    let b: SendBody = match parse_body(&body) {
        Ok(b) => b,
        Err(e) => return bad(e),
    };
    if b.data.get().len() as u64 > s.app.cfg.limits.max_publish_bytes.get() {
        return error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "data is over limits.max_publish_bytes",
        );
    }
    let selector = Selector {
        client_id: Some(b.client_id),
        ..Default::default()
    };
    let direct = Arc::new(tether_core::hub::encode_direct(b.data.get()));
    let n = s
        .app
        .registry
        .select(&selector)
        .iter()
        // A proxied connection carries its upstream's protocol: nothing of Tether's
        // is injected into it, so it is neither sent to nor counted.
        .filter(|c| c.transport() != Transport::Proxy)
        .filter(|c| c.outbox().push(Outgoing::Direct(direct.clone())))
        .count();
    json_response(StatusCode::OK, json!({"connections": n}))
}

async fn channels(State(s): State<ApiState>) -> Response {
    let list: Vec<_> = s
        .app
        .broker
        .channels()
        .await
        .into_iter()
        .map(|(name, subscribers, clients)| json!({"name": name, "subscribers": subscribers, "clients": clients}))
        .collect();
    json_response(StatusCode::OK, json!({"channels": list}))
}

async fn presence(State(s): State<ApiState>, Path(name): Path<String>) -> Response {
    if let Some(r) = bad_channel(&name) {
        return r;
    }
    let clients: Vec<_> = s
        .app
        .broker
        .presence(&name)
        .await
        .into_iter()
        .map(|(client_id, connections)| json!({"client_id": client_id, "connections": connections}))
        .collect();
    json_response(StatusCode::OK, json!({"clients": clients}))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    since: Option<String>,
    limit: Option<usize>,
}

async fn history(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Some(r) = bad_channel(&name) {
        return r;
    }
    let q = match query {
        Ok(Query(q)) => q,
        Err(e) => return bad(e.body_text()),
    };
    let limit = q.limit.unwrap_or(PAGE_DEFAULT);
    if limit == 0 || limit > PAGE_MAX {
        return bad(format!("limit must be 1 to {PAGE_MAX}"));
    }
    let since = match q.since.as_deref().map(Position::parse) {
        None => None,
        Some(Some(p)) => Some(p),
        Some(None) => return bad("since must be a position \"<epoch>:<offset>\""),
    };
    let (epoch, messages) = match s.app.broker.history(&name, since.as_ref(), limit).await {
        Ok(page) => page.unwrap_or_default(),
        Err(e) => return error_response(broker_status(e), e.code(), e.message()),
    };
    let page = HistoryPage {
        epoch: (!epoch.is_empty()).then_some(epoch.as_str()),
        messages: messages
            .iter()
            .map(|p| HistoryMessage {
                channel: &p.channel,
                id: &p.id,
                position: &p.position,
                // Validated when published; this borrows it (a scan, no depth limit).
                data: serde_json::from_str(&p.data).ok(),
            })
            .collect(),
    };
    match serde_json::to_vec(&page) {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            &format!("history: {e}"),
        ),
    }
}

/// A history page. `data` is served as the raw JSON text that was published, not
/// re-parsed: what publish accepted (at any nesting depth) is what history serves.
#[derive(Serialize)]
struct HistoryPage<'a> {
    epoch: Option<&'a str>,
    messages: Vec<HistoryMessage<'a>>,
}

#[derive(Serialize)]
struct HistoryMessage<'a> {
    channel: &'a str,
    id: &'a str,
    position: &'a str,
    data: Option<&'a RawValue>,
}

/// `GET /api/events`: lifecycle events as SSE, `event: <type>`, `id: <event id>`.
/// A reader that falls behind the bus gets a `: lagged N` comment for what it lost.
async fn events(State(s): State<ApiState>) -> Response {
    let rx = s.app.registry.events().subscribe();
    let stop = s.stop.clone();
    let drain = s.app.drain.clone();
    // On a listener shared with clients, this stream is one of the sockets the drain
    // waits for: it ends when the drain begins instead of holding the shutdown.
    let end_at = if s.app.cfg.listen == s.app.cfg.api.listen {
        Phase::Draining
    } else {
        Phase::Stopped
    };
    let stream = futures_util::stream::unfold(
        (rx, stop, drain, true),
        move |(mut rx, stop, drain, first)| async move {
            if first {
                let hello = Frame::data(Bytes::from_static(b": events\n\n"));
                return Some((Ok::<_, Infallible>(hello), (rx, stop, drain, false)));
            }
            let item = tokio::select! {
                _ = stop.cancelled() => return None,
                _ = drain.hard_stop().cancelled() => return None,
                _ = drain.reached(end_at) => return None,
                _ = tokio::time::sleep(std::time::Duration::from_secs(15)) => Bytes::from_static(b": hb\n\n"),
                r = rx.recv() => match r {
                    Ok(ev) => Bytes::from(format!("id: {}\nevent: {}\ndata: {}\n\n", ev.id, ev.kind.as_str(), ev.to_json())),
                    Err(RecvError::Lagged(n)) => Bytes::from(format!(": lagged {n}\n\n")),
                    Err(RecvError::Closed) => return None,
                },
            };
            Some((Ok(Frame::data(item)), (rx, stop, drain, false)))
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::new(StreamBody::new(stream)))
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

#[cfg(test)]
mod tests {
    use super::local_host;

    #[test]
    fn only_loopback_hosts_pass() {
        for ok in [
            "localhost",
            "localhost:7701",
            "127.0.0.1",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:7701",
            "LOCALHOST",
        ] {
            assert!(local_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.com",
            "127.0.0.1.evil.com",
            "localhost.evil",
            "[::2]",
            "[::1]x",
            "10.0.0.1",
        ] {
            assert!(!local_host(bad), "{bad}");
        }
    }
}
