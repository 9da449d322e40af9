//! The WebSocket transport (`GET /ws`).
//!
//! The handler runs admission, answers `101` and spawns one tracked task that
//! awaits the upgrade (within `limits.handshake_timeout_ms`), commits the
//! reservation and then owns the socket and the [`ConnectionGuard`] until the end.
//! That task's single `select!` covers: inbound frames, the heartbeat/lifetime
//! timer, the connection's close requests (replace, kick, sweep, drain) and the
//! hard-stop token. Every way out records the close on the guard, announces it
//! (`closing` + close frame) when the server is the one closing, and drops the guard.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tether_core::{CatchUp, ConnSpec, ConnectionGuard, Outgoing, Transport};
use tether_protocol::{
    valid_channel, ClientFrame, CloseCode, Closing, Position, Refusal, ServerFrame,
};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WireCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::admission::{self, AdmitError, Credentials};
use crate::auth::Identity;
use crate::conn_io::ConnIo;
use crate::net::SocketInfo;
use crate::App;

pub(crate) type Ws = WebSocketStream<ConnIo>;

/// The subprotocol Tether speaks when asked.
const SUBPROTOCOL: &str = "tether.v1";

/// Bytes tungstenite reserves up front for reading. Client frames are small in this
/// protocol (larger ones grow the buffer as needed), and idle memory matters.
const READ_BUFFER: usize = 256;

/// Bytes tungstenite may buffer before writing. Only control frames (pings, pongs,
/// close) and refusals go through it; every text frame is written by [`write_frames`].
const WRITE_BUFFER: usize = 512;

/// The proxy's legs relay every frame through tungstenite both ways: they keep the
/// buffers that let it coalesce (what they were before the edge's writer bypassed it).
const RELAY_READ_BUFFER: usize = 512;
const RELAY_WRITE_BUFFER: usize = 16 * 1024;

/// Frames per `writev`.
const MAX_IOV: usize = 128;

/// How long a closing handshake may take once announced.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The same for a peer that stopped answering (4000) or reading (4008, 1009).
const DEAD_PEER_WAIT: Duration = Duration::from_millis(250);

#[derive(Debug, Default, Deserialize)]
struct WsQuery {
    client: Option<String>,
    token: Option<String>,
    refusal: Option<String>,
}

/// `GET /ws`.
pub(crate) async fn handler(State(app): State<Arc<App>>, mut req: Request<Body>) -> Response {
    // HEAD reaches GET handlers in axum; it must not open a connection.
    if req.method() != http::Method::GET {
        return crate::net::error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        );
    }
    let Some(info) = req.extensions().get::<SocketInfo>().cloned() else {
        return admission::bad_request("WebSocket is served on the client listener");
    };
    let headers = req.headers();
    let key = match check_upgrade(headers) {
        Ok(k) => k,
        Err(resp) => return *resp,
    };
    let query = match Query::<WsQuery>::try_from_uri(req.uri()) {
        Ok(Query(q)) => q,
        Err(e) => return admission::bad_request(&e.body_text()),
    };
    let refusal_close = match query.refusal.as_deref() {
        None => false,
        Some("close") => true,
        Some(other) => {
            return admission::bad_request(&format!("refusal must be \"close\", not {other:?}"))
        }
    };
    let protocol = offered_protocol(headers).then(|| HeaderValue::from_static(SUBPROTOCOL));
    let ip = crate::net::client_ip(info.peer.ip(), headers, &app.cfg.server.trusted_proxies);
    let user_agent = headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let origin_ok = !crate::sse::origin_refused(&app, headers);
    let token = admission::request_token(headers, query.token.as_deref()).map(str::to_owned);
    let on_upgrade = hyper::upgrade::on(&mut req);
    let hs_timeout = Duration::from_millis(app.cfg.limits.handshake_timeout_ms.get());
    let pending = info.take_pending();
    let spec = move |meta| ConnSpec {
        transport: Transport::Ws,
        remote_addr: ip,
        user_agent,
        meta,
        upstream: None,
    };

    // jwt mode without a token in the request: the token comes as the first frame,
    // so admission finishes after the upgrade and refusals become close codes.
    if app.auth.is_jwt() && token.is_none() {
        let slot = match admission::precheck(&app, ip, origin_ok) {
            Ok(slot) => slot,
            Err(r) => {
                let e = admission::refused(&app, r, ip);
                drop(pending);
                return refusal_response(
                    &app,
                    e,
                    refusal_close,
                    on_upgrade,
                    hs_timeout,
                    &key,
                    protocol,
                );
            }
        };
        // One boxed capture: a task's captures stay in its state for its whole life.
        let parts = Box::new((app.clone(), pending, on_upgrade, spec));
        app.tasks.spawn(async move {
            // Admission finishes in its own future, gone by the time `run` starts:
            // only `run`'s state is kept for the connection's life.
            let started = Box::pin(async move {
                let (task_app, _pending, on_upgrade, spec) = *parts;
                let deadline = Instant::now() + hs_timeout;
                let Ok(Ok(up)) = tokio::time::timeout_at(deadline, on_upgrade).await else {
                    return None;
                };
                let mut ws = WebSocketStream::from_raw_socket(
                    ConnIo::new(up),
                    Role::Server,
                    Some(ws_config(&task_app)),
                )
                .await;
                let first = tokio::time::timeout_at(deadline, first_token(&mut ws))
                    .await
                    .ok()
                    .flatten();
                let admitted = admission::identify(&task_app, Credentials::Token(first.as_deref()))
                    .and_then(|(client_id, id)| {
                        match task_app
                            .registry
                            .reserve(&client_id, Transport::Ws, Some(slot))
                        {
                            Ok(r) => Ok((r, id)),
                            Err(r) => Err(AdmitError::Refused(r)),
                        }
                    });
                match admitted {
                    Ok((reservation, identity)) => {
                        let start = Start::commit(ws, reservation, identity, spec);
                        drop(_pending);
                        Some((task_app, start))
                    }
                    Err(AdmitError::Refused(r)) => {
                        task_app.metrics.refused(r.error());
                        refuse_after_upgrade(ws, r).await;
                        None
                    }
                    Err(AdmitError::BadRequest(_)) => {
                        refuse_after_upgrade(ws, Refusal::Unauthorized).await;
                        None
                    }
                }
            });
            if let Some((task_app, start)) = started.await {
                run(task_app, start).await;
            }
        });
        return switching(&key, protocol);
    }

    let creds = if app.auth.is_jwt() {
        Credentials::Token(token.as_deref())
    } else {
        Credentials::Client(query.client.as_deref())
    };
    match admission::admit(&app, creds, ip, Transport::Ws, origin_ok, &[]) {
        Err(e) => {
            drop(pending);
            refusal_response(
                &app,
                e,
                refusal_close,
                on_upgrade,
                hs_timeout,
                &key,
                protocol,
            )
        }
        Ok(admitted) => {
            // One boxed capture: a task's captures stay in its state for its whole life.
            let parts = Box::new((app.clone(), pending, on_upgrade, admitted, spec));
            app.tasks.spawn(async move {
                // As above: only `run`'s state is kept for the connection's life.
                let started = Box::pin(async move {
                    let (task_app, pending, on_upgrade, admitted, spec) = *parts;
                    let upgraded = match timeout(hs_timeout, on_upgrade).await {
                        Ok(Ok(up)) => up,
                        _ => return None, // the reservation drops here: slot released, no event
                    };
                    let ws = WebSocketStream::from_raw_socket(
                        ConnIo::new(upgraded),
                        Role::Server,
                        Some(ws_config(&task_app)),
                    )
                    .await;
                    let admission::Admitted {
                        reservation,
                        client_id,
                        identity,
                    } = admitted;
                    let start = Start::commit(ws, reservation, identity, spec);
                    drop(pending);
                    tracing::debug!(
                        client_id,
                        conn_id = start.guard.conn().id(),
                        "websocket admitted"
                    );
                    Some((task_app, start))
                });
                if let Some((task_app, start)) = started.await {
                    run(task_app, start).await;
                }
            });
            switching(&key, protocol)
        }
    }
}

/// A refused handshake: the HTTP form, or with `?refusal=close` an upgrade that
/// announces the refusal and closes with its code.
pub(crate) fn refusal_response(
    app: &Arc<App>,
    e: AdmitError,
    refusal_close: bool,
    on_upgrade: hyper::upgrade::OnUpgrade,
    hs_timeout: Duration,
    key: &str,
    protocol: Option<HeaderValue>,
) -> Response {
    let refusal = match e {
        AdmitError::BadRequest(m) => return admission::bad_request(&m),
        AdmitError::Refused(r) if !refusal_close => return admission::http_refusal(r),
        AdmitError::Refused(r) => r,
    };
    let cfg = ws_config(app);
    app.tasks.spawn(async move {
        if let Ok(Ok(up)) = timeout(hs_timeout, on_upgrade).await {
            let ws =
                WebSocketStream::from_raw_socket(ConnIo::new(up), Role::Server, Some(cfg)).await;
            refuse_after_upgrade(ws, refusal).await;
        }
    });
    switching(key, protocol)
}

/// Reads the first frame, which must be `{"type":"connect","token":"…"}`.
async fn first_token(ws: &mut Ws) -> Option<String> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(t)) => {
                return match ClientFrame::decode(t.as_str()) {
                    Ok(ClientFrame::Connect { token }) => Some(token),
                    _ => None,
                }
            }
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            _ => return None,
        }
    }
}

/// Validates an upgrade request; returns the `Sec-WebSocket-Key`.
pub(crate) fn check_upgrade(headers: &HeaderMap) -> Result<String, Box<Response>> {
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        let mut r = crate::net::error_response(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint speaks WebSocket: send Upgrade: websocket",
        );
        r.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return Err(Box::new(r));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return Err(Box::new(admission::bad_request(
            "Sec-WebSocket-Version must be 13",
        )));
    }
    match headers.get(header::SEC_WEBSOCKET_KEY) {
        Some(k) if !k.as_bytes().is_empty() => Ok(derive_accept_key(k.as_bytes())),
        _ => Err(Box::new(admission::bad_request(
            "Sec-WebSocket-Key is missing",
        ))),
    }
}

fn offered_protocol(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .any(|v| {
            v.to_str()
                .is_ok_and(|s| s.split(',').any(|p| p.trim() == SUBPROTOCOL))
        })
}

/// The `101` answer; `protocol` is the subprotocol chosen, if any.
pub(crate) fn switching(accept: &str, protocol: Option<HeaderValue>) -> Response {
    let mut builder = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept);
    if let Some(p) = protocol {
        builder = builder.header(header::SEC_WEBSOCKET_PROTOCOL, p);
    }
    builder
        .body(Body::empty())
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// [`ws_config`] for a proxy route's legs.
pub(crate) fn relay_config(app: &App) -> WebSocketConfig {
    ws_config(app)
        .read_buffer_size(RELAY_READ_BUFFER)
        .write_buffer_size(RELAY_WRITE_BUFFER)
}

pub(crate) fn ws_config(app: &App) -> WebSocketConfig {
    let max = app.cfg.limits.max_message_bytes.get() as usize;
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// `?refusal=close`: announce the refusal, then close with its code.
pub(crate) async fn refuse_after_upgrade(mut ws: Ws, refusal: Refusal) {
    let retry = admission::retry_ms(refusal);
    let body = admission::closing_json(refusal, retry).to_string();
    let code = refusal.close_code();
    let closing = Closing {
        code,
        reason: refusal.error().into(),
        reconnect: code.reconnect(),
        retry_ms: Some(retry),
    };
    let _ = timeout(CLOSE_WAIT, ws.send(Message::text(body))).await;
    close_handshake(&mut ws, &closing, CLOSE_WAIT).await;
}

/// Why the connection loop ended.
enum End {
    /// The server closes: announce, then close frame.
    Announce(Closing),
    /// The peer sent a close frame with this code.
    PeerClosed(u16, String),
    /// The socket failed or ended without a close frame.
    Lost(String),
    /// Writes stalled past the heartbeat timeout: the peer does not read.
    Stalled,
    /// The shutdown deadline passed.
    Hard,
}

/// What the connection knows about its token (jwt mode).
struct Session {
    identity: Option<Identity>,
    /// When the token (plus leeway) runs out: 4003 unless refreshed.
    expires_at: Option<Instant>,
}

/// What a connection task starts with; boxed so that it is not kept twice in the
/// task's state (once as the argument, once as the locals it moves into).
struct Start {
    ws: Ws,
    guard: ConnectionGuard,
    identity: Option<Identity>,
}

impl Start {
    /// Commits the reservation (the connection is registered from here on) with the
    /// token's `meta`, if any.
    fn commit(
        ws: Ws,
        reservation: tether_core::Reservation,
        identity: Option<Identity>,
        spec: impl FnOnce(serde_json::Value) -> ConnSpec,
    ) -> Box<Self> {
        let meta = identity
            .as_ref()
            .map(|i| i.meta.clone())
            .unwrap_or_default();
        let guard = reservation.commit(spec(meta));
        Box::new(Start {
            ws,
            guard,
            identity,
        })
    }
}

async fn run(app: Arc<App>, start: Box<Start>) {
    // Locals that end inside a block take no room in the task's state after it.
    let (mut ws, mut guard, mut session) = {
        // `{ start }` moves the box into a temporary, freed at the end of this
        // statement; destructuring `*start` itself would keep the emptied box
        // allocated (~0.5 KiB) until the task ends.
        let Start {
            ws,
            guard,
            identity,
        } = *{ start };
        let session = Session {
            expires_at: identity.as_ref().map(|i| app.auth.expires_at(i)),
            identity,
        };
        (ws, guard, session)
    };
    let conn = guard.conn().clone();
    // From here on the outbox may write published frames to a plain TCP socket itself.
    ws.get_mut().attach(&conn);
    let cfg = &app.cfg;
    let interval = Duration::from_millis(cfg.heartbeat.interval_ms.get());
    let hb_timeout = Duration::from_millis(cfg.heartbeat.timeout_ms.get());
    let max_rate = cfg.limits.max_inbound_per_sec.get();
    let start = Instant::now();
    let lifetime_at = match cfg.limits.max_connection_lifetime_ms {
        0 => None,
        ms => Some(start + crate::jittered(ms)),
    };
    let mut next_ping = start + interval;
    let mut pong_due: Option<Instant> = None;
    let mut window = (start, 0u64);

    let welcome = [Outgoing::text(
        &ServerFrame::Welcome {
            conn_id: conn.id(),
            client_id: conn.client_id(),
            node_id: app.registry.node_id(),
            heartbeat_ms: interval.as_millis() as u64,
        }
        .encode(),
    )];
    let mut torn = None;
    // Futures that run now and then are boxed: the task's own state, held for the
    // connection's whole life, stays small (idle memory per connection).
    let mut end = Box::pin(write_timed(
        &mut ws, &guard, &welcome, hb_timeout, &mut torn,
    ))
    .await
    .err();
    drop(welcome);
    let timer = tokio::time::sleep_until(next_ping);
    tokio::pin!(timer);
    // Made once, not per turn of the loop: every connection's hard-stop waiter sits
    // in the one token's list, and re-registering it on each wake-up would take that
    // list's lock twice per delivery, from every worker.
    let hard_stop = app.drain.hard_stop().cancelled();
    tokio::pin!(hard_stop);
    let close_requested = conn.close_requested();
    tokio::pin!(close_requested);
    let mut batch = Vec::new();

    let end = loop {
        if let Some(e) = end.take() {
            break e;
        }
        let wake = [Some(next_ping), pong_due, lifetime_at, session.expires_at]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(next_ping);
        // Re-arming moves the timer in the runtime's wheel (a lock): only when the
        // deadline changed (or it fired), not on every message.
        if wake != timer.deadline() || timer.is_elapsed() {
            timer.as_mut().reset(wake);
        }
        tokio::select! {
            biased;
            _ = &mut hard_stop => break End::Hard,
            closing = &mut close_requested => break End::Announce(closing),
            _ = conn.outbox().ready() => {
                if let Some(e) = Box::pin(flush_outbox(&app, &mut ws, &guard, hb_timeout, &mut batch, &mut torn)).await {
                    break e;
                }
            }
            _ = &mut timer => {
                let now = Instant::now();
                if pong_due.is_some_and(|d| now >= d) {
                    break End::Announce(Closing::new(CloseCode::HEARTBEAT_TIMEOUT, "no heartbeat from the peer"));
                }
                if lifetime_at.is_some_and(|d| now >= d) {
                    break End::Announce(Closing::new(CloseCode::MAX_LIFETIME, "maximum connection lifetime reached"));
                }
                if session.expires_at.is_some_and(|d| now >= d) {
                    break End::Announce(Closing::new(CloseCode::TOKEN_EXPIRED, "token expired"));
                }
                if now >= next_ping {
                    next_ping = now + interval;
                    if pong_due.is_none() {
                        pong_due = Some(now + hb_timeout);
                    }
                    match Box::pin(timeout(hb_timeout, ws.send(Message::Ping(Default::default())))).await {
                        Err(_) => break End::Stalled,
                        Ok(Err(e)) => break End::Lost(format!("write failed: {e}")),
                        Ok(Ok(())) => {}
                    }
                }
            }
            msg = ws.next() => {
                let msg = match msg {
                    None => break End::Lost("connection closed without a close frame".into()),
                    Some(Err(e)) => break read_error(e),
                    Some(Ok(m)) => m,
                };
                pong_due = None;
                let now = Instant::now();
                if now.duration_since(window.0) >= Duration::from_secs(1) {
                    window = (now, 0);
                }
                window.1 += 1;
                if window.1 > max_rate {
                    break End::Announce(Closing::new(CloseCode::RATE_LIMITED, "too many frames per second"));
                }
                if let Some(e) = Box::pin(handle(&app, &mut ws, msg, hb_timeout, &guard, &mut session)).await {
                    break e;
                }
            }
        }
    };

    // No direct writes from here on: the close sequence is the task's alone.
    conn.outbox().seal();
    match end {
        End::Announce(closing) => {
            guard.set_close(closing.code.0, closing.reason.clone());
            let text = ServerFrame::Closing(&closing).encode();
            // A peer closed for not answering or not reading gets a best-effort
            // announcement: nobody waits long on it.
            let wait = if closing.code.drops_queue() {
                DEAD_PEER_WAIT
            } else {
                CLOSE_WAIT
            };
            let announce = Box::pin(async {
                // `closing` follows what is already queued, except for the codes
                // that exist because the queue cannot be delivered.
                batch.clear();
                // A write cut off mid-frame is finished first: the stream must be
                // back on a frame boundary before anything else is framed.
                batch.extend(torn.take().map(Outgoing::Text));
                if !closing.code.drops_queue() {
                    conn.outbox().take(&mut batch);
                }
                batch.push(Outgoing::text(&text));
                if write_timed(&mut ws, &guard, &batch, wait, &mut torn)
                    .await
                    .is_ok()
                {
                    close_handshake(&mut ws, &closing, wait).await;
                }
            });
            tokio::select! {
                _ = announce => {}
                _ = app.drain.hard_stop().cancelled() => {}
            }
        }
        End::PeerClosed(code, reason) => {
            guard.set_close(code, reason);
            let _ = Box::pin(timeout(CLOSE_WAIT, async {
                while let Some(Ok(_)) = ws.next().await {}
            }))
            .await;
        }
        End::Lost(why) => guard.set_close(CloseCode::ABNORMAL.0, why),
        End::Stalled => guard.set_close(CloseCode::SLOW_CONSUMER.0, "peer stopped reading"),
        End::Hard => guard.set_close(CloseCode::GOING_AWAY.0, "shutdown deadline"),
    }
    drop(ws);
    drop(guard);
}

/// Handles one inbound message; returns how the loop ends, if it does.
async fn handle(
    app: &App,
    ws: &mut Ws,
    msg: Message,
    hb_timeout: Duration,
    guard: &ConnectionGuard,
    session: &mut Session,
) -> Option<End> {
    let conn = guard.conn();
    match msg {
        Message::Text(text) => {
            conn.add_bytes_in(text.len());
            let frame = ClientFrame::decode(text.as_str());
            if !matches!(frame, Ok(ClientFrame::Ping { .. })) {
                conn.touch();
            }
            let error = |reference: Option<u64>, code: &str, message: &str| {
                ServerFrame::Error {
                    reference,
                    code,
                    message,
                }
                .encode()
            };
            let reply = match frame {
                Ok(ClientFrame::Ping { reference }) => {
                    Some(ServerFrame::Pong { reference }.encode())
                }
                Ok(ClientFrame::Subscribe {
                    reference,
                    channel,
                    since,
                }) => {
                    if !valid_channel(&channel) {
                        Some(error(
                            reference,
                            "bad_channel",
                            "channel names are 1-200 of A-Z a-z 0-9 _ . : / -",
                        ))
                    } else if session
                        .identity
                        .as_ref()
                        .is_some_and(|id| !id.may_subscribe(&channel))
                    {
                        Some(error(
                            reference,
                            "forbidden_channel",
                            "the token does not permit this channel",
                        ))
                    } else {
                        let since = since.as_deref().and_then(Position::parse);
                        match app.registry.hub().subscribe(
                            conn,
                            &channel,
                            since.as_ref(),
                            Some(reference),
                        ) {
                            // The `subscribed` frame went through the outbox, ahead of
                            // the channel's messages.
                            Ok(_) => None,
                            Err(e) => Some(error(reference, e.code(), e.message())),
                        }
                    }
                }
                Ok(ClientFrame::Unsubscribe { reference, channel }) => {
                    match app.registry.hub().unsubscribe(conn, &channel) {
                        Ok(()) => {
                            let frame = ServerFrame::Unsubscribed {
                                reference,
                                channel: &channel,
                            }
                            .encode();
                            conn.outbox().push(Outgoing::text(&frame));
                            None
                        }
                        Err(e) => Some(error(reference, e.code(), e.message())),
                    }
                }
                Ok(ClientFrame::Refresh { reference, token }) => {
                    if !app.auth.is_jwt() {
                        Some(error(
                            reference,
                            "unsupported",
                            "refresh needs [auth] mode = \"jwt\"",
                        ))
                    } else {
                        match app.auth.verify(&token) {
                            Ok(id) if id.client_id != conn.client_id() => {
                                return Some(End::Announce(Closing::new(
                                    CloseCode::SESSION_ERROR,
                                    "refresh token is for another subject",
                                )));
                            }
                            Ok(id) => {
                                session.expires_at = Some(app.auth.expires_at(&id));
                                session.identity = Some(id);
                                None
                            }
                            Err(_) => {
                                Some(error(reference, "unauthorized", "invalid or expired token"))
                            }
                        }
                    }
                }
                Ok(ClientFrame::Connect { .. }) => Some(error(
                    None,
                    "unexpected_connect",
                    "connect is only valid as the first frame",
                )),
                Err(e) => Some(error(e.reference, e.code, &e.message)),
            };
            if let Some(r) = reply {
                conn.outbox().push(Outgoing::text(&r));
            }
            None
        }
        Message::Binary(b) => {
            conn.add_bytes_in(b.len());
            conn.touch();
            let reply = ServerFrame::Error {
                reference: None,
                code: "binary_not_supported",
                message: "the tether protocol uses JSON text frames",
            }
            .encode();
            conn.outbox().push(Outgoing::text(&reply));
            None
        }
        Message::Close(frame) => {
            let (code, reason) = frame
                .map(|f| (u16::from(f.code), f.reason.to_string()))
                .unwrap_or((1005, "closed by the peer".into()));
            Some(End::PeerClosed(code, reason))
        }
        // Pings are answered by tungstenite on the next write or read; pongs only
        // prove liveness, which the caller already recorded.
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {
            match timeout(hb_timeout, ws.flush()).await {
                Err(_) => Some(End::Stalled),
                Ok(Err(e)) => Some(read_error(e)),
                Ok(Ok(())) => None,
            }
        }
    }
}

/// Writes everything queued, then tops the queue up from history for any
/// subscription still catching up.
async fn flush_outbox(
    app: &App,
    ws: &mut Ws,
    guard: &ConnectionGuard,
    hb_timeout: Duration,
    batch: &mut Vec<Outgoing>,
    torn: &mut Option<Bytes>,
) -> Option<End> {
    let conn = guard.conn();
    // Let the rest of a burst catch up before taking (two turns of the runtime's
    // queue: immediate when nothing else is ready).
    tokio::task::yield_now().await;
    tokio::task::yield_now().await;
    loop {
        batch.clear();
        if conn.outbox().take(batch) {
            return Some(End::Announce(Closing::new(
                CloseCode::SLOW_CONSUMER,
                "outbound queue full",
            )));
        }
        if batch.is_empty() {
            // Nothing kept while idle.
            *batch = Vec::new();
            return None;
        }
        let written = conn
            .outbox()
            .unless_overflowed(write_timed(ws, guard, batch, hb_timeout, torn))
            .await;
        match written {
            None => {
                return Some(End::Announce(Closing::new(
                    CloseCode::SLOW_CONSUMER,
                    "outbound queue full",
                )))
            }
            Some(Err(e)) => return Some(e),
            Some(Ok(())) => {}
        }
        if conn.is_catching_up() && app.registry.hub().catch_up(conn) == CatchUp::Lost {
            return Some(End::Announce(Closing::new(
                CloseCode::SLOW_CONSUMER,
                "fell behind the channel history",
            )));
        }
    }
}

/// [`write_frames`] within `wait`: a peer that does not read for that long stalled.
async fn write_timed(
    ws: &mut Ws,
    guard: &ConnectionGuard,
    frames: &[Outgoing],
    wait: Duration,
    torn: &mut Option<Bytes>,
) -> Result<(), End> {
    match timeout(wait, write_frames(ws, frames, torn)).await {
        Err(_) => Err(End::Stalled),
        Ok(Err(e)) => Err(End::Lost(format!("write failed: {e}"))),
        Ok(Ok(n)) => {
            guard.conn().add_bytes_out(n);
            Ok(())
        }
    }
}

/// Writes whole text frames straight to the socket, several per `writev`: a
/// published message's frame is the same `Bytes` for every subscriber, so nothing is
/// copied and no write buffer is kept per connection. Whatever tungstenite holds
/// (a pong it owes) is flushed first, so frames never interleave. While a frame is
/// part-written, `torn` holds its unwritten rest: if this future is dropped then
/// (timeout, overflow), that rest must go out before any other frame.
async fn write_frames(
    ws: &mut Ws,
    frames: &[Outgoing],
    torn: &mut Option<Bytes>,
) -> std::io::Result<usize> {
    use tokio::io::AsyncWriteExt;
    ws.flush().await.map_err(std::io::Error::other)?;
    let io = ws.get_mut();
    let total = frames.iter().map(|f| f.ws_frame().len()).sum();
    let mut slices = Vec::with_capacity(frames.len().min(MAX_IOV));
    // The next byte to write: frame `i`, offset `off`.
    let (mut i, mut off) = (0, 0);
    while let Some(first) = frames.get(i) {
        slices.clear();
        slices.push(std::io::IoSlice::new(&first.ws_frame()[off..]));
        slices.extend(
            frames[i + 1..]
                .iter()
                .take(MAX_IOV - 1)
                .map(|f| std::io::IoSlice::new(f.ws_frame())),
        );
        let mut n = io.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while let Some(f) = frames.get(i).filter(|_| n > 0) {
            let left = f.ws_frame().len() - off;
            if n >= left {
                n -= left;
                (i, off) = (i + 1, 0);
            } else {
                off += n;
                n = 0;
            }
        }
        *torn = frames
            .get(i)
            .filter(|_| off > 0)
            .map(|f| f.ws_frame().slice(off..));
    }
    io.flush().await?;
    Ok(total)
}

fn read_error(e: WsError) -> End {
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) | WsError::Capacity(_) => {
            End::Announce(Closing::new(CloseCode::MESSAGE_TOO_BIG, "message too big"))
        }
        WsError::Utf8(_) => End::Announce(Closing::new(
            CloseCode::INVALID_PAYLOAD,
            "text frame is not valid UTF-8",
        )),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => {
            End::Lost("connection reset without a closing handshake".into())
        }
        WsError::Protocol(p) => End::Announce(Closing::new(
            CloseCode::PROTOCOL_ERROR,
            format!("protocol error: {p}"),
        )),
        WsError::ConnectionClosed | WsError::AlreadyClosed => End::Lost("connection closed".into()),
        WsError::Io(e) => End::Lost(format!("socket error: {e}")),
        other => End::Announce(Closing::new(
            CloseCode::INTERNAL_ERROR,
            format!("internal error: {other}"),
        )),
    }
}

/// Sends the close frame and waits (bounded) for the peer's close.
async fn close_handshake(ws: &mut Ws, closing: &Closing, wait: Duration) {
    let frame = CloseFrame {
        code: WireCode::from(closing.code.0),
        reason: closing.frame_reason().to_owned().into(),
    };
    let _ = timeout(wait, ws.close(Some(frame))).await;
    let _ = timeout(wait, async { while let Some(Ok(_)) = ws.next().await {} }).await;
}
