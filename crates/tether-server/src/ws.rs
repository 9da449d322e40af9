//! The WebSocket transport (`GET /ws`).
//!
//! The handler runs admission, answers `101` and spawns one tracked task that
//! awaits the upgrade (within `limits.handshake_timeout_ms`), commits the
//! reservation and then owns the socket and the [`ConnectionGuard`] until the end.
//! That task's single `select!` covers: inbound frames, the heartbeat/lifetime
//! timer, the connection's close requests (replace, kick, sweep, drain) and the
//! hard-stop token. Every way out records the close on the guard, announces it
//! (`closing` + close frame) when the server is the one closing, and drops the guard.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tether_core::{ConnSpec, Connection, ConnectionGuard, Outgoing, Transport as Kind};
use tether_protocol::{ClientFrame, Closing, Refusal, ServerFrame};
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WireCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::admission::{self, AdmitError, BadRequest, Credentials};
use crate::auth::Identity;
use crate::commands;
use crate::conn_io::ConnIo;
use crate::driver::{
    self, Ctx, Cx, Deadlines, End, Ending, Family, Heard, Leg, ToClient, Transport,
};
use crate::edge::Edge;
use crate::net::{PendingSlot, SocketInfo};
use crate::refusal::Refused;
use hyper::upgrade::OnUpgrade;

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

/// What a `/ws` request says, read before admission.
struct Handshake {
    /// `Sec-WebSocket-Accept` for the `101`.
    accept: String,
    /// The subprotocol chosen, if the client offered ours.
    protocol: Option<HeaderValue>,
    /// `?refusal=close`.
    refusal_close: bool,
    /// The client's address (through trusted proxies).
    ip: IpAddr,
    /// Whether its `Origin` is allowed.
    origin_ok: bool,
    /// A token from the header or the query (jwt mode).
    token: Option<String>,
    /// `?client=` (auth `none`).
    client: Option<String>,
    /// `User-Agent`.
    user_agent: Option<String>,
    /// When the handshake must be done (from the socket's accept).
    deadlines_until: Instant,
}

impl Handshake {
    /// Reads and checks the request: upgrade headers, query, address, origin.
    fn read(edge: &Edge, req: &Request<Body>, info: &SocketInfo) -> Result<Self, Box<Response>> {
        let headers = req.headers();
        let accept = check_upgrade(headers)?;
        let query = Query::<WsQuery>::try_from_uri(req.uri())
            .map_err(|e| Box::new(admission::bad_request(BadRequest::Query(e.body_text()))))?
            .0;
        let refusal_close = match query.refusal.as_deref() {
            None => false,
            Some("close") => true,
            Some(other) => {
                return Err(Box::new(admission::bad_request(BadRequest::Value {
                    name: "refusal",
                    allowed: "\"close\"",
                    value: other.to_owned(),
                })))
            }
        };
        Ok(Handshake {
            accept,
            protocol: offered_protocol(headers).then(|| HeaderValue::from_static(SUBPROTOCOL)),
            refusal_close,
            ip: edge.gate.client_ip(info.peer.ip(), headers),
            origin_ok: !edge.gate.origins.refused(headers),
            token: admission::request_token(headers, query.token.as_deref()).map(str::to_owned),
            client: query.client,
            user_agent: headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            deadlines_until: info.handshake_until,
        })
    }

    /// What the registry records about the connection, given the token's `meta`.
    fn spec(&self) -> impl FnOnce(serde_json::Value) -> ConnSpec + Send + 'static {
        let (ip, user_agent) = (self.ip, self.user_agent.clone());
        move |meta| ConnSpec {
            transport: Kind::Ws,
            remote_addr: ip,
            user_agent,
            meta,
            upstream: None,
        }
    }

    /// The answer to a refused handshake, in the form the client asked for.
    fn refuse(
        &self,
        edge: &Arc<Edge>,
        error: AdmitError,
        on_upgrade: OnUpgrade,
        pending: Option<PendingSlot>,
    ) -> Response {
        let refused = RefusedUpgrade {
            error,
            close: self.refusal_close,
            pending,
            handshake_until: self.deadlines_until,
        };
        refusal_response(
            edge,
            refused,
            on_upgrade,
            &self.accept,
            self.protocol.clone(),
        )
    }
}

/// `GET /ws`.
pub(crate) async fn handler(State(edge): State<Arc<Edge>>, mut req: Request<Body>) -> Response {
    // HEAD reaches GET handlers in axum; it must not open a connection.
    if req.method() != http::Method::GET {
        return crate::respond::error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        );
    }
    let Some(info) = req.extensions().get::<SocketInfo>().cloned() else {
        return admission::bad_request("WebSocket is served on the client listener");
    };
    let hs = match Handshake::read(&edge, &req, &info) {
        Ok(hs) => hs,
        Err(resp) => return *resp,
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let pending = info.take_pending();
    // jwt mode without a token in the request: the token comes as the first frame,
    // so admission finishes after the upgrade and refusals become close codes.
    if edge.gate.auth.is_jwt() && hs.token.is_none() {
        return admit_by_first_frame(edge, hs, on_upgrade, pending);
    }
    let creds = if edge.gate.auth.is_jwt() {
        Credentials::Token(hs.token.as_deref())
    } else {
        Credentials::Client(hs.client.as_deref())
    };
    let admitted =
        match admission::admit(&edge.gate, creds, hs.ip, Kind::Ws, hs.origin_ok, &[]).await {
            Err(e) => return hs.refuse(&edge, e, on_upgrade, pending),
            Ok(admitted) => admitted,
        };
    let answer = switching(&hs.accept, hs.protocol.clone());
    spawn_admitted(edge, hs, on_upgrade, pending, admitted);
    answer
}

/// An admitted handshake: answers `101`, then upgrades, commits and runs the
/// connection in one tracked task.
fn spawn_admitted(
    edge: Arc<Edge>,
    hs: Handshake,
    on_upgrade: OnUpgrade,
    pending: Option<PendingSlot>,
    admitted: admission::Admitted,
) {
    let deadlines = edge.driving.deadlines::<WsConn>(hs.deadlines_until);
    // One boxed capture: a task's captures stay in its state for its whole life.
    let parts = Box::new((
        edge.clone(),
        pending,
        on_upgrade,
        admitted,
        hs.spec(),
        deadlines,
    ));
    edge.tasks.spawn(async move {
        // Admission finishes in its own future, gone by the time `run` starts: only
        // `run`'s state is kept for the connection's life.
        let started = Box::pin(async move {
            let (task_edge, pending, on_upgrade, admitted, spec, deadlines) = *parts;
            let upgraded = match deadlines.within_handshake(on_upgrade).await {
                Some(Ok(up)) => up,
                _ => return None, // the reservation drops here: slot released, no event
            };
            let ws = upgraded_ws(&task_edge, upgraded).await;
            let admission::Admitted {
                reservation,
                client_id,
                identity,
            } = admitted;
            let start = Start::commit(&task_edge, ws, reservation, identity, spec, deadlines).await;
            drop(pending);
            tracing::debug!(
                client_id,
                conn_id = start.guard.conn().id(),
                "websocket admitted"
            );
            Some((task_edge, start))
        });
        if let Some((task_edge, start)) = started.await {
            run(task_edge, start).await;
        }
    });
}

/// jwt mode with the token as the first frame: the address checks run now, the
/// rest after the upgrade, where a refusal is always a `closing` and a close code.
fn admit_by_first_frame(
    edge: Arc<Edge>,
    hs: Handshake,
    on_upgrade: OnUpgrade,
    pending: Option<PendingSlot>,
) -> Response {
    let slot = match admission::precheck(&edge.gate, hs.ip, hs.origin_ok) {
        Ok(slot) => slot,
        Err(r) => {
            let e = admission::refused(&edge.gate, r, hs.ip);
            return hs.refuse(&edge, e, on_upgrade, pending);
        }
    };
    let deadlines = edge.driving.deadlines::<WsConn>(hs.deadlines_until);
    // One boxed capture: a task's captures stay in its state for its whole life.
    let parts = Box::new((edge.clone(), pending, on_upgrade, hs.spec(), deadlines));
    edge.tasks.spawn(async move {
        // As in `spawn_admitted`: only `run`'s state is kept for the connection's life.
        let started = Box::pin(async move {
            let (task_edge, pending, on_upgrade, spec, deadlines) = *parts;
            let Some(Ok(up)) = deadlines.within_handshake(on_upgrade).await else {
                return None;
            };
            let mut ws = upgraded_ws(&task_edge, up).await;
            let first = deadlines
                .within_handshake(first_token(&mut ws))
                .await
                .flatten();
            let admitted =
                admission::identify(&task_edge.gate, Credentials::Token(first.as_deref()))
                    .and_then(|(client_id, id)| {
                        match task_edge
                            .gate
                            .registry
                            .reserve(&client_id, Kind::Ws, Some(slot))
                        {
                            Ok(r) => Ok((r, id)),
                            Err(r) => Err(AdmitError::Refused(r)),
                        }
                    });
            // Cluster mode: the cluster's checks come last (a refusal drops the
            // reservation).
            let admitted = match (admitted, &task_edge.gate.cluster) {
                (Ok((reservation, identity)), Some(c)) => match c.admit(&reservation).await {
                    Ok(()) => Ok((reservation, identity)),
                    Err(r) => Err(AdmitError::Refused(r)),
                },
                (other, _) => other,
            };
            // The pending slot is held until the connection is committed or refused
            // (close handshake included).
            let refusal = match admitted {
                Ok((reservation, identity)) => {
                    let start =
                        Start::commit(&task_edge, ws, reservation, identity, spec, deadlines).await;
                    drop(pending);
                    return Some((task_edge, start));
                }
                Err(AdmitError::Refused(r)) => {
                    task_edge.gate.metrics.refused(r.error());
                    r
                }
                Err(AdmitError::BadRequest(_)) => Refusal::Unauthorized,
            };
            refuse_after_upgrade(ws, refusal).await;
            drop(pending);
            None
        });
        if let Some((task_edge, start)) = started.await {
            run(task_edge, start).await;
        }
    });
    switching(&hs.accept, hs.protocol)
}

/// The server's side of an upgraded socket, as tungstenite speaks it.
async fn upgraded_ws(edge: &Edge, up: hyper::upgrade::Upgraded) -> Ws {
    WebSocketStream::from_raw_socket(ConnIo::new(up), Role::Server, Some(ws_config(edge))).await
}

/// A refused WebSocket handshake.
pub(crate) struct RefusedUpgrade {
    /// Why.
    pub(crate) error: AdmitError,
    /// `?refusal=close`: upgrade, announce, close with the refusal's code.
    pub(crate) close: bool,
    /// The socket's pending slot: a refused socket counts against
    /// `limits.max_pending_handshakes` until it is gone, close handshake included.
    pub(crate) pending: Option<PendingSlot>,
    /// When the upgrade must be done (from the socket's accept).
    pub(crate) handshake_until: Instant,
}

/// A refused handshake: the HTTP form, or with `?refusal=close` an upgrade that
/// announces the refusal and closes with its code.
pub(crate) fn refusal_response(
    edge: &Arc<Edge>,
    refused: RefusedUpgrade,
    on_upgrade: hyper::upgrade::OnUpgrade,
    key: &str,
    protocol: Option<HeaderValue>,
) -> Response {
    let RefusedUpgrade {
        error,
        close,
        pending,
        handshake_until,
    } = refused;
    let refusal = match error {
        AdmitError::BadRequest(m) => return admission::bad_request(&m),
        AdmitError::Refused(r) if !close => return admission::http_refusal(r),
        AdmitError::Refused(r) => r,
    };
    let cfg = ws_config(edge);
    edge.tasks.spawn(async move {
        if let Ok(Ok(up)) = tokio::time::timeout_at(handshake_until, on_upgrade).await {
            let ws =
                WebSocketStream::from_raw_socket(ConnIo::new(up), Role::Server, Some(cfg)).await;
            refuse_after_upgrade(ws, refusal).await;
        }
        drop(pending);
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
        let mut r = crate::respond::error_response(
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
pub(crate) fn relay_config(edge: &Edge) -> WebSocketConfig {
    ws_config(edge)
        .read_buffer_size(RELAY_READ_BUFFER)
        .write_buffer_size(RELAY_WRITE_BUFFER)
}

pub(crate) fn ws_config(edge: &Edge) -> WebSocketConfig {
    let max = edge.max_message_bytes;
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// `?refusal=close`: announce the refusal, then close with its code.
pub(crate) async fn refuse_after_upgrade(mut ws: Ws, refusal: Refusal) {
    let refused = Refused::new(refusal);
    let body = refused.closing_json().to_string();
    let _ = timeout(CLOSE_WAIT, ws.send(Message::text(body))).await;
    close_handshake(&mut ws, &refused.closing(), CLOSE_WAIT).await;
}

/// What a connection task starts with; boxed so that it is not kept twice in the
/// task's state (once as the argument, once as the locals it moves into).
struct Start {
    ws: Ws,
    guard: ConnectionGuard,
    identity: Option<Identity>,
    /// The handshake's deadline, and from the commit on the connection's.
    deadlines: Deadlines,
}

impl Start {
    /// Commits the reservation (the connection is registered from here on) with the
    /// token's `meta`, if any.
    async fn commit(
        edge: &Edge,
        ws: Ws,
        reservation: tether_core::Reservation,
        identity: Option<Identity>,
        spec: impl FnOnce(serde_json::Value) -> ConnSpec,
        deadlines: Deadlines,
    ) -> Box<Self> {
        let meta = identity
            .as_ref()
            .map(|i| i.meta.clone())
            .unwrap_or_default();
        let guard = admission::commit(&edge.gate, reservation, spec(meta)).await;
        Box::new(Start {
            ws,
            guard,
            identity,
            deadlines,
        })
    }
}

/// Runs a committed `/ws` connection through the driver. Not an `async fn`: the
/// driver's future is what the task holds, with nothing of this function's kept
/// beside it.
fn run(edge: Arc<Edge>, start: Box<Start>) -> impl std::future::Future<Output = ()> + Send {
    let Start {
        ws,
        guard,
        identity,
        mut deadlines,
    } = *start;
    deadlines.expire_at(identity.as_ref().map(|i| edge.gate.auth.expires_at(i)));
    let conn = WsConn {
        ws,
        identity,
        torn: None,
        wait: edge.driving.timeout,
        interval: edge.driving.interval,
    };
    driver::drive(edge.driving.clone(), guard, conn, deadlines)
}

/// A `/ws` connection: Tether's protocol over WebSocket.
pub(crate) struct WsConn {
    ws: Ws,
    /// The token's identity (jwt mode): what it may subscribe to. A `refresh`
    /// replaces it.
    identity: Option<Identity>,
    /// The unwritten rest of a frame whose write was cut off (a timeout, an
    /// overflow): it goes out before anything else is framed.
    torn: Option<Bytes>,
    /// `heartbeat.timeout_ms`: how long a write may block before the peer counts
    /// as not reading.
    wait: Duration,
    /// `heartbeat.interval_ms`, announced in `welcome`.
    interval: Duration,
}

impl Transport for WsConn {
    type Inbound = Result<Message, WsError>;
    const FAMILY: Family = Family::Tether;
    const ANSWERS_PINGS: [bool; 2] = [true, false];
    // Two turns of the runtime's queue: a burst's frames gather into fewer writes.
    const GATHER: u8 = 2;

    async fn start(&mut self, ctx: &Ctx, conn: &Arc<Connection>) -> Result<(), End> {
        // From here on the outbox may write published frames to a plain TCP socket
        // itself.
        self.ws.get_mut().attach(conn);
        let welcome = [Outgoing::text(
            &ServerFrame::Welcome {
                conn_id: conn.id(),
                client_id: conn.client_id(),
                node_id: &ctx.node_id,
                heartbeat_ms: self.interval.as_millis() as u64,
                heartbeat_timeout_ms: self.wait.as_millis() as u64,
            }
            .encode(),
        )];
        self.write(conn, &welcome).await
    }

    async fn write(&mut self, conn: &Connection, batch: &[Outgoing]) -> Result<(), End> {
        match timeout(self.wait, write_frames(&mut self.ws, batch, &mut self.torn)).await {
            Err(_) => Err(End::Stalled(Leg::Client)),
            Ok(Err(e)) => Err(End::Lost(Leg::Client, format!("write failed: {e}"))),
            Ok(Ok(n)) => {
                conn.add_bytes_out(n);
                Ok(())
            }
        }
    }

    async fn next(&mut self) -> Heard<Self::Inbound> {
        let item = match self.ws.next().await {
            Some(m) => m,
            None => Err(WsError::ConnectionClosed),
        };
        Heard {
            leg: Leg::Client,
            counts: true,
            item,
        }
    }

    async fn on_inbound(&mut self, cx: Cx<'_>, item: Self::Inbound) -> Option<End> {
        let msg = match item {
            Ok(m) => m,
            Err(WsError::ConnectionClosed) => {
                return Some(End::Lost(
                    Leg::Client,
                    "connection closed without a close frame".into(),
                ))
            }
            Err(e) => return Some(read_error(e)),
        };
        match msg {
            Message::Text(text) => {
                cx.conn.add_bytes_in(text.len());
                let frame = ClientFrame::decode(text.as_str());
                commands::apply(cx, &mut self.identity, frame).await
            }
            Message::Binary(b) => {
                cx.conn.add_bytes_in(b.len());
                cx.conn.touch();
                commands::reply_error(
                    cx.conn,
                    None,
                    "binary_not_supported",
                    "the tether protocol uses JSON text frames",
                );
                None
            }
            Message::Close(frame) => {
                let (code, reason) = frame
                    .map(|f| (u16::from(f.code), f.reason.to_string()))
                    .unwrap_or((1005, "closed by the peer".into()));
                Some(End::Closed(Leg::Client, code, reason))
            }
            // Pings are answered by tungstenite on the next write or read; pongs only
            // prove liveness, which the driver already recorded.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {
                match timeout(self.wait, self.ws.flush()).await {
                    Err(_) => Some(End::Stalled(Leg::Client)),
                    Ok(Err(e)) => Some(read_error(e)),
                    Ok(Ok(())) => None,
                }
            }
        }
    }

    async fn ping(&mut self, _conn: &Connection) -> Result<(), End> {
        match timeout(self.wait, self.ws.send(Message::Ping(Default::default()))).await {
            Err(_) => Err(End::Stalled(Leg::Client)),
            Ok(Err(e)) => Err(End::Lost(Leg::Client, format!("write failed: {e}"))),
            Ok(Ok(())) => Ok(()),
        }
    }

    async fn finish(
        mut self,
        _ctx: &Ctx,
        conn: &Connection,
        ending: &Ending,
        mut queued: Vec<Outgoing>,
    ) {
        match &ending.client {
            ToClient::Announce(closing) => {
                // A peer closed for not answering or not reading gets a best-effort
                // announcement: nobody waits long on it.
                if closing.code.drops_queue() {
                    self.wait = DEAD_PEER_WAIT;
                } else {
                    self.wait = CLOSE_WAIT;
                }
                // A write cut off mid-frame is finished first: the stream must be
                // back on a frame boundary before anything else is framed.
                if let Some(t) = self.torn.take() {
                    queued.insert(0, Outgoing::Text(t));
                }
                queued.push(Outgoing::text(&ServerFrame::Closing(closing).encode()));
                if self.write(conn, &queued).await.is_ok() {
                    close_handshake(&mut self.ws, closing, self.wait).await;
                }
            }
            ToClient::Answer => {
                let _ = timeout(CLOSE_WAIT, async {
                    while let Some(Ok(_)) = self.ws.next().await {}
                })
                .await;
            }
            ToClient::Nothing | ToClient::Close(_) => {}
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

/// What a failed read of the client leg means (shared with the proxy's client leg).
pub(crate) fn read_error(e: WsError) -> End {
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) | WsError::Capacity(_) => {
            End::TooBig
        }
        WsError::Utf8(_) => End::InvalidUtf8,
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => End::Lost(
            Leg::Client,
            "connection reset without a closing handshake".into(),
        ),
        WsError::Protocol(p) => End::Protocol(p.to_string()),
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            End::Lost(Leg::Client, "connection closed".into())
        }
        WsError::Io(e) => End::Lost(Leg::Client, format!("socket error: {e}")),
        other => End::Internal(other.to_string()),
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
