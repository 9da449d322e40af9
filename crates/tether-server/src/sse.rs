//! The SSE transport (`GET /sse?channel=a&channel=b[&since=<cursor>]`).
//!
//! The handler runs admission and commits at once (there is no upgrade), subscribes
//! the stream's channels (resuming from `Last-Event-ID`, else `since`), then answers
//! `200 text/event-stream` with a body fed by a small bounded channel. One tracked
//! task owns the [`ConnectionGuard`] and the channel's sender and runs the
//! connection's `select!`: the outbox, close requests, heartbeat comments, lifetime,
//! the receiver going away (hyper drops the body when the peer disconnects) and the
//! hard stop. Every event carries the stream's cursor as its `id`; a stream closed
//! with `reconnect: false` leaves a tombstone so its `EventSource` stops for good.

use std::convert::Infallible;
use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::response::Response;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::StreamBody;
use hyper::body::Frame;
use tether_core::{ConnSpec, Connection, ConnectionGuard, Outgoing, Transport as Kind};
use tether_protocol::position::MAX_STREAM_CHANNELS;
use tether_protocol::{valid_channel, Cursor, Position, Refusal, ServerFrame};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

use crate::admission::{self, AdmitError, BadRequest, Credentials};
use crate::driver::{self, Ctx, Cx, End, Ending, Family, Heard, Leg, ToClient, Transport};
use crate::edge::Edge;
use crate::net::SocketInfo;
use crate::refusal::Refused;
pub use crate::tombstones::Tombstones;

/// Body chunks waiting between the connection task and hyper's writer. Each chunk is
/// a whole batch of events; the bounded outbox is where a slow reader's backlog
/// waits, so this stays short (it is memory outside the outbox's bounds).
const BODY_QUEUE: usize = 2;

/// Bytes a client may send after its request on a taken-over socket (read and
/// dropped) before the stream is closed: an event stream is one-way.
const MAX_HEARD: usize = 64 * 1024;

/// How long the closing announcement may take.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

struct SseQuery {
    client: Option<String>,
    token: Option<String>,
    channels: Vec<String>,
    since: Option<String>,
    /// `heartbeat=event` (else `heartbeat=comment`, the default).
    heartbeat_event: bool,
}

fn parse_query(q: Option<&str>) -> Result<SseQuery, BadRequest> {
    let mut out = SseQuery {
        client: None,
        token: None,
        channels: Vec::new(),
        since: None,
        heartbeat_event: false,
    };
    for (k, v) in form_urlencoded::parse(q.unwrap_or("").as_bytes()) {
        match &*k {
            "client" => out.client = Some(v.into_owned()),
            "token" => out.token = Some(v.into_owned()),
            "since" => out.since = Some(v.into_owned()),
            "heartbeat" => {
                out.heartbeat_event = match &*v {
                    "event" => true,
                    "comment" => false,
                    other => {
                        return Err(BadRequest::Value {
                            name: "heartbeat",
                            allowed: "\"event\" or \"comment\"",
                            value: other.to_owned(),
                        })
                    }
                }
            }
            "channel" => {
                if !valid_channel(&v) {
                    return Err(BadRequest::Channel(v.into_owned()));
                }
                out.channels.push(v.into_owned());
            }
            _ => {}
        }
    }
    out.channels.sort();
    out.channels.dedup();
    if out.channels.len() > MAX_STREAM_CHANNELS {
        return Err(BadRequest::TooManyChannels {
            max: MAX_STREAM_CHANNELS,
        });
    }
    Ok(out)
}

/// `OPTIONS /sse`: the CORS preflight of fetch-based clients.
pub(crate) async fn preflight(State(edge): State<Arc<Edge>>, headers: HeaderMap) -> Response {
    if edge.gate.origins.refused(&headers) {
        return admission::http_refusal(Refusal::OriginNotAllowed);
    }
    let mut r = Response::builder()
        .status(StatusCode::NO_CONTENT)
        .header(header::ACCESS_CONTROL_ALLOW_METHODS, "GET, OPTIONS")
        .header(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            "Authorization, Last-Event-ID, Cache-Control",
        )
        .header(header::ACCESS_CONTROL_MAX_AGE, "600")
        .body(Body::empty())
        .unwrap_or_else(|_| Response::new(Body::empty()));
    edge.gate.origins.cors(&headers, &mut r);
    r
}

/// `GET /sse`.
pub(crate) async fn handler(State(edge): State<Arc<Edge>>, req: Request<Body>) -> Response {
    let headers = req.headers().clone();
    // A plain HTTP/1.1 socket is taken over from hyper once the stream starts.
    let hijack = req
        .extensions()
        .get::<SocketInfo>()
        .and_then(|i| i.hijack.clone())
        .filter(|_| req.version() == http::Version::HTTP_11);
    let start = match answer(&edge, req).await {
        Ok(start) => start,
        Err(mut resp) => {
            edge.gate.origins.cors(&headers, &mut resp);
            return resp;
        }
    };
    let mut resp = stream_head();
    edge.gate.origins.cors(&headers, &mut resp);
    // Taking the socket ends hyper's connection (and this future with it) at the
    // next poll of its task: nothing below awaits.
    match hijack.and_then(|h| h.take()) {
        Some(sock) => {
            let head = http1_head(&resp);
            edge.tasks.spawn(run(
                edge.clone(),
                Box::new(start),
                Out::Socket {
                    sock,
                    pending: Some(head),
                    heard: 0,
                },
            ));
            // Written into the void: the stream writes its own head.
            resp
        }
        None => {
            let (tx, rx) = mpsc::channel::<Bytes>(BODY_QUEUE);
            edge.tasks
                .spawn(run(edge.clone(), Box::new(start), Out::Body(tx)));
            with_body(resp, rx)
        }
    }
}

/// Admits, commits and subscribes a stream; or the answer that refuses it.
async fn answer(edge: &Arc<Edge>, req: Request<Body>) -> Result<Start, Response> {
    // HEAD reaches GET handlers in axum; it must not open a connection.
    if req.method() != http::Method::GET {
        return Err(crate::respond::error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "use GET",
        ));
    }
    let Some(info) = req.extensions().get::<SocketInfo>().cloned() else {
        return Err(admission::bad_request(
            "SSE is served on the client listener",
        ));
    };
    let headers = req.headers();
    let query = parse_query(req.uri().query()).map_err(admission::bad_request)?;
    // `Last-Event-ID` wins over `since`.
    let cursor = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .or(query.since.as_deref())
        .and_then(Cursor::parse);
    if cursor
        .as_ref()
        .is_some_and(|c| edge.driving.tombstones.contains(&c.conn_id))
    {
        return Err(Response::builder()
            .status(StatusCode::NO_CONTENT)
            .body(Body::empty())
            .unwrap_or_else(|_| Response::new(Body::empty())));
    }
    let (guard, expires_at) = admit(edge, headers, &info, &query).await.map_err(|r| *r)?;
    let (stream, first) = subscribe(edge, guard.conn(), &query.channels, cursor).await;
    Ok(Start {
        guard,
        stream,
        first,
        expires_at,
        beat_event: query.heartbeat_event,
    })
}

/// Admission and commit: the guard, and when the token expires; or the refusal in
/// its SSE form (a `200` stream for transient refusals, the HTTP status otherwise).
async fn admit(
    edge: &Arc<Edge>,
    headers: &HeaderMap,
    info: &SocketInfo,
    query: &SseQuery,
) -> Result<(ConnectionGuard, Option<Instant>), Box<Response>> {
    let ip = edge.gate.client_ip(info.peer.ip(), headers);
    let creds = if edge.gate.auth.is_jwt() {
        Credentials::Token(admission::request_token(headers, query.token.as_deref()))
    } else {
        Credentials::Client(query.client.as_deref())
    };
    let origin_ok = !edge.gate.origins.refused(headers);
    let admitted = match admission::admit(
        &edge.gate,
        creds,
        ip,
        Kind::Sse,
        origin_ok,
        &query.channels,
    )
    .await
    {
        Ok(a) => a,
        Err(AdmitError::BadRequest(m)) => return Err(Box::new(admission::bad_request(&m))),
        Err(AdmitError::Refused(r)) if r.is_transient() => {
            return Err(Box::new(transient_refusal(r)))
        }
        Err(AdmitError::Refused(r)) => return Err(Box::new(admission::http_refusal(r))),
    };
    let expires_at = admitted
        .identity
        .as_ref()
        .map(|id| edge.gate.auth.expires_at(id));
    let spec = ConnSpec {
        transport: Kind::Sse,
        remote_addr: ip,
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        meta: admitted
            .identity
            .map(|id| id.meta)
            .unwrap_or(serde_json::Value::Null),
        upstream: None,
    };
    let guard = admission::commit(&edge.gate, admitted.reservation, spec).await;
    drop(info.take_pending());
    Ok((guard, expires_at))
}

/// Subscribes the stream's channels (resuming from `cursor` when it was made for
/// exactly these channels) and writes what goes first: `retry:`, the welcome with
/// `recovered` per channel, and an `error` event per channel that could not be
/// subscribed.
async fn subscribe(
    edge: &Edge,
    conn: &Arc<Connection>,
    channels: &[String],
    cursor: Option<Cursor>,
) -> (Stream, Bytes) {
    // A cursor resumes only the stream it was made for: one position per channel.
    let since: Vec<Option<Position>> = match cursor {
        Some(c) if c.positions.len() == channels.len() => {
            c.positions.into_iter().map(Some).collect()
        }
        _ => vec![None; channels.len()],
    };
    let zero = || Position {
        epoch: "0".into(),
        offset: 0,
    };
    let mut positions = Vec::with_capacity(channels.len());
    let mut recovered = serde_json::Map::new();
    let mut errors = String::new();
    for (ch, since) in channels.iter().zip(since) {
        match edge
            .driving
            .broker
            .subscribe(conn, ch, since.as_ref(), None)
            .await
        {
            Ok(s) => {
                recovered.insert(ch.clone(), s.recovered.into());
                let start = if s.recovered {
                    since
                } else {
                    Position::parse(&s.position)
                };
                positions.push(start.unwrap_or_else(zero));
            }
            Err(e) => {
                recovered.insert(ch.clone(), false.into());
                positions.push(zero());
                let data =
                    serde_json::json!({"code": e.code(), "message": e.message(), "channel": ch});
                errors.push_str(&format!("event: error\ndata: {data}\n\n"));
            }
        }
    }
    let stream = Stream {
        channels: channels.to_vec(),
        positions,
        conn_id: conn.id().to_owned(),
    };
    // The heartbeat settings let a client tell a silent server from a quiet one
    // (with `&heartbeat=event`), as `welcome` does on WebSocket.
    let welcome = serde_json::json!({
        "conn_id": conn.id(),
        "client_id": conn.client_id(),
        "node_id": edge.gate.registry.node_id(),
        "recovered": recovered,
        "heartbeat_ms": edge.driving.interval.as_millis() as u64,
        "heartbeat_timeout_ms": edge.driving.timeout.as_millis() as u64,
    });
    let first = format!(
        "retry: {}\n\nid: {}\nevent: welcome\ndata: {welcome}\n\n{errors}",
        edge.sse_retry_ms,
        stream.cursor()
    );
    (stream, Bytes::from(first))
}

/// An admitted stream, about to be answered.
struct Start {
    guard: ConnectionGuard,
    stream: Stream,
    /// `retry:`, the welcome event and any subscription errors.
    first: Bytes,
    expires_at: Option<Instant>,
    /// `&heartbeat=event`.
    beat_event: bool,
}

/// The stream's task: the driver's future, with nothing of this function's kept
/// beside it (not an `async fn`; see `ws::run`).
fn run(
    edge: Arc<Edge>,
    start: Box<Start>,
    out: Out,
) -> impl std::future::Future<Output = ()> + Send {
    let Start {
        guard,
        stream,
        first,
        expires_at,
        beat_event,
    } = *start;
    let conn = SseConn {
        out,
        stream,
        first: Some(first),
        wait: edge.driving.timeout,
        beat_event,
    };
    // The request was the handshake, and it is done: the connection's clocks start.
    let mut deadlines = edge.driving.deadlines::<SseConn>(Instant::now());
    deadlines.expire_at(expires_at);
    driver::drive(edge.driving.clone(), guard, conn, deadlines)
}

/// The stream's channels and the position it delivered last on each: its cursor.
struct Stream {
    channels: Vec<String>,
    positions: Vec<Position>,
    conn_id: String,
}

impl Stream {
    fn cursor(&self) -> String {
        Cursor::encode(&self.conn_id, &self.positions)
    }
    /// About how long the cursor is (offsets may grow a digit or two meanwhile).
    fn cursor_len(&self) -> usize {
        4 + self.conn_id.len()
            + self
                .positions
                .iter()
                .map(|p| p.epoch.len() + 22)
                .sum::<usize>()
    }
    /// Appends one event for `item` to `buf`, with the cursor as its `id`.
    fn render(&mut self, item: &Outgoing, buf: &mut BytesMut) {
        let body = match item {
            Outgoing::Message(p) => {
                if let Ok(i) = self.channels.binary_search_by(|c| (**c).cmp(&*p.channel)) {
                    let at = &mut self.positions[i];
                    at.offset = p.offset;
                    // `position` is "<epoch>:<offset>"; the epoch rarely changes.
                    let epoch = p.position.split(':').next().unwrap_or_default();
                    if at.epoch != epoch {
                        at.epoch = epoch.to_owned();
                    }
                }
                &p.sse
            }
            Outgoing::Direct(d) => &d.sse,
            // WebSocket-only replies.
            Outgoing::Text(_) => return,
        };
        buf.extend_from_slice(b"id: ");
        Cursor::encode_into(&self.conn_id, &self.positions, buf);
        buf.extend_from_slice(b"\n");
        buf.extend_from_slice(body);
    }
}

/// The stream's answer, without its body.
fn stream_head() -> Response {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-accel-buffering", "no")
        .body(Body::empty())
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// `resp` with a body that hyper feeds from `rx`.
fn with_body(resp: Response, rx: mpsc::Receiver<Bytes>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    resp.map(|_| Body::new(StreamBody::new(stream)))
}

/// The HTTP/1.1 head of a stream written on a taken-over socket: `resp`'s status and
/// headers, a `Date`, a chunked body and `Connection: close` (one request per
/// socket, as hyper would have answered).
fn http1_head(resp: &Response) -> Bytes {
    let status = resp.status();
    let mut head = BytesMut::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.as_str().as_bytes());
    head.extend_from_slice(b" ");
    head.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for (name, value) in resp.headers() {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"date: ");
    head.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    head.extend_from_slice(b"\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n");
    head.freeze()
}

/// Where a stream's bytes go.
enum Out {
    /// hyper's response body (TLS, HTTP/2, HTTP/1.0): a short queue it drains.
    Body(mpsc::Sender<Bytes>),
    /// The plain socket, taken over from hyper: the head, then the body in chunks.
    Socket {
        sock: Arc<TcpStream>,
        /// Bytes due before anything else: the head at first, then the rest of a
        /// chunk whose write was cut off (a stalled peer, an overflow, a timeout),
        /// so that what follows never lands inside it.
        pending: Option<Bytes>,
        /// Bytes the client sent since the request, read and dropped.
        heard: usize,
    },
}

impl Out {
    /// Sends `data` (a whole number of events); `Err` when the peer is gone.
    async fn send(&mut self, data: Bytes) -> Result<(), ()> {
        match self {
            Out::Body(tx) => tx.send(data).await.map_err(|_| ()),
            Out::Socket { sock, pending, .. } => {
                let mut line = [0u8; 18];
                let size = size_line(data.len(), &mut line);
                write_chunk(sock, pending, [size, &data, b"\r\n"])
                    .await
                    .map_err(|_| ())
            }
        }
    }

    /// A heartbeat (a comment, or with `event` an `event: heartbeat`): a full body
    /// queue is a stalled peer at once; a socket gets `wait` to take it.
    async fn beat(&mut self, wait: Duration, event: bool) -> Result<usize, End> {
        const COMMENT: &[u8] = b": hb\n\n";
        const EVENT: &[u8] = b"event: heartbeat\ndata: {}\n\n";
        let beat = Bytes::from_static(if event { EVENT } else { COMMENT });
        let n = beat.len();
        match self {
            Out::Body(tx) => match tx.try_send(beat) {
                Ok(()) => Ok(n),
                Err(mpsc::error::TrySendError::Full(_)) => Err(End::Stalled(Leg::Client)),
                Err(mpsc::error::TrySendError::Closed(_)) => Err(lost()),
            },
            Out::Socket { .. } => match timeout(wait, self.send(beat)).await {
                Ok(Ok(())) => Ok(n),
                Ok(Err(())) => Err(lost()),
                Err(_) => Err(End::Stalled(Leg::Client)),
            },
        }
    }

    /// Resolves when the peer went away (`Lost`), or, on a socket, sent more than
    /// [`MAX_HEARD`] bytes, which a client has no reason to (`Unexpected`).
    async fn closed(&mut self) -> End {
        match self {
            Out::Body(tx) => {
                tx.closed().await;
                lost()
            }
            // `poll_read_ready`, not `readable()`: it takes over the waker slot in which
            // hyper's finished task would otherwise stay registered (and allocated)
            // for the socket's whole life.
            Out::Socket { sock, heard, .. } => loop {
                if std::future::poll_fn(|cx| sock.poll_read_ready(cx))
                    .await
                    .is_err()
                {
                    return lost();
                }
                match drain_input(sock) {
                    None => return lost(),
                    Some(n) => {
                        *heard += n;
                        if *heard > MAX_HEARD {
                            return End::UnexpectedInput;
                        }
                    }
                }
            },
        }
    }

    /// Ends the body after an announced close (hyper ends its own when the sender
    /// drops).
    async fn finish(&mut self) {
        if let Out::Socket { sock, pending, .. } = self {
            if write_chunk(sock, pending, [b"0\r\n\r\n", b"", b""])
                .await
                .is_ok()
            {
                let _ = socket2::SockRef::from(sock.as_ref()).shutdown(std::net::Shutdown::Write);
            }
        }
    }
}

/// Reads (and drops) what the peer sent: how many bytes, or `None` once it closed.
fn drain_input(sock: &TcpStream) -> Option<usize> {
    let mut scratch = [0u8; 256];
    let mut n = 0;
    for _ in 0..16 {
        match sock.try_read(&mut scratch) {
            Ok(0) => return None,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => return None,
        }
    }
    Some(n)
}

/// A chunk's size line (`<hex>\r\n`), formatted into `buf` (no allocation per
/// chunk; 16 hex digits and CRLF fit).
fn size_line(n: usize, buf: &mut [u8; 18]) -> &[u8] {
    let left = {
        let mut w = &mut buf[..];
        let _ = std::io::Write::write_fmt(&mut w, format_args!("{n:x}\r\n"));
        w.len()
    };
    &buf[..buf.len() - left]
}

/// Writes `pending` and then all of `parts`, in order. Safe to cancel at any await:
/// whatever is not yet on the socket is in `pending` (copied there only when the
/// socket takes `parts` in part), and the next write starts with it.
async fn write_chunk(
    sock: &TcpStream,
    pending: &mut Option<Bytes>,
    parts: [&[u8]; 3],
) -> std::io::Result<()> {
    write_pending(sock, pending).await?;
    let mut slices = parts.map(IoSlice::new);
    let mut bufs: &mut [IoSlice<'_>] = &mut slices;
    IoSlice::advance_slices(&mut bufs, 0);
    if bufs.is_empty() {
        return Ok(());
    }
    match sock.try_write_vectored(bufs) {
        Ok(n) => IoSlice::advance_slices(&mut bufs, n),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    if !bufs.is_empty() {
        let mut rest = BytesMut::with_capacity(bufs.iter().map(|b| b.len()).sum());
        for b in bufs.iter() {
            rest.extend_from_slice(b);
        }
        *pending = Some(rest.freeze());
        write_pending(sock, pending).await?;
    }
    Ok(())
}

/// Writes `pending` out, advancing it as the socket takes it (see [`write_chunk`]).
async fn write_pending(sock: &TcpStream, pending: &mut Option<Bytes>) -> std::io::Result<()> {
    while let Some(p) = pending.as_mut() {
        // As for reading (see `Out::closed`): the waker slot hyper used is ours now.
        std::future::poll_fn(|cx| sock.poll_write_ready(cx)).await?;
        match sock.try_write(p) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                p.advance(n);
                if p.is_empty() {
                    *pending = None;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A transient refusal as a `200` stream: `retry:`, `event: closing`, end.
fn transient_refusal(refusal: Refusal) -> Response {
    let body = Refused::new(refusal).sse_body();
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let _ = tx.try_send(Bytes::from(body));
    drop(tx);
    with_body(stream_head(), rx)
}

/// An admitted stream's connection: Tether's protocol over an event stream.
pub(crate) struct SseConn {
    out: Out,
    stream: Stream,
    /// `retry:`, the welcome event and any subscription errors, sent first.
    first: Option<Bytes>,
    /// `heartbeat.timeout_ms`: how long a write may block.
    wait: Duration,
    /// `&heartbeat=event`: heartbeats are `event: heartbeat`, which `EventSource`
    /// shows, instead of a comment, which it hides.
    beat_event: bool,
}

impl Transport for SseConn {
    /// The only thing an event stream hears: that it ended.
    type Inbound = End;
    const FAMILY: Family = Family::Tether;
    const ANSWERS_PINGS: [bool; 2] = [false, false];
    // One turn of the runtime's queue lets a burst catch up.
    const GATHER: u8 = 1;

    async fn start(&mut self, _ctx: &Ctx, conn: &Arc<Connection>) -> Result<(), End> {
        let Some(first) = self.first.take() else {
            return Ok(());
        };
        conn.add_bytes_out(first.len());
        self.send(first).await
    }

    async fn write(&mut self, conn: &Connection, batch: &[Outgoing]) -> Result<(), End> {
        // Sized once for the whole batch (each event's `id:` line is the cursor), so
        // a burst does not leave a trail of regrown buffers behind.
        let id_line = 6 + self.stream.cursor_len();
        let size = batch
            .iter()
            .map(|i| match i {
                Outgoing::Message(p) => p.sse.len() + id_line,
                Outgoing::Direct(d) => d.sse.len() + id_line,
                Outgoing::Text(_) => 0,
            })
            .sum();
        let mut buf = BytesMut::with_capacity(size);
        for item in batch {
            self.stream.render(item, &mut buf);
        }
        if buf.is_empty() {
            return Ok(());
        }
        conn.add_bytes_out(buf.len());
        self.send(buf.freeze()).await
    }

    async fn next(&mut self) -> Heard<End> {
        Heard {
            leg: Leg::Client,
            counts: false,
            item: self.out.closed().await,
        }
    }

    async fn on_inbound(&mut self, _cx: Cx<'_>, end: End) -> Option<End> {
        Some(end)
    }

    async fn ping(&mut self, conn: &Connection) -> Result<(), End> {
        let n = self.out.beat(self.wait, self.beat_event).await?;
        conn.add_bytes_out(n);
        Ok(())
    }

    async fn finish(
        mut self,
        ctx: &Ctx,
        conn: &Connection,
        ending: &Ending,
        queued: Vec<Outgoing>,
    ) {
        let ToClient::Announce(closing) = &ending.client else {
            return;
        };
        if !closing.reconnect {
            ctx.tombstones.add(conn.id());
        }
        let goodbye = async {
            self.write(conn, &queued).await?;
            let retry = closing
                .retry_ms
                .map(|r| format!("retry: {r}\n"))
                .unwrap_or_default();
            let text = format!(
                "{retry}id: {}\nevent: closing\ndata: {}\n\n",
                self.stream.cursor(),
                ServerFrame::Closing(closing).encode()
            );
            conn.add_bytes_out(text.len());
            self.send(Bytes::from(text)).await?;
            self.out.finish().await;
            Ok::<_, End>(())
        };
        let _ = timeout(CLOSE_WAIT, goodbye).await;
    }
}

impl SseConn {
    /// Sends whole events within `wait`: a peer that does not read for that long
    /// stalled.
    async fn send(&mut self, data: Bytes) -> Result<(), End> {
        match timeout(self.wait, self.out.send(data)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(())) => Err(lost()),
            Err(_) => Err(End::Stalled(Leg::Client)),
        }
    }
}

/// The peer closed its end of the stream.
fn lost() -> End {
    End::Lost(Leg::Client, "stream closed by the peer".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_size_lines_are_lowercase_hex() {
        let mut buf = [0u8; 18];
        for (n, line) in [
            (0usize, &b"0\r\n"[..]),
            (9, b"9\r\n"),
            (10, b"a\r\n"),
            (255, b"ff\r\n"),
            (4096, b"1000\r\n"),
            (usize::MAX, b"ffffffffffffffff\r\n"),
        ] {
            assert_eq!(size_line(n, &mut buf), line, "{n}");
        }
    }

    #[test]
    fn query_sorts_dedups_and_bounds_channels() {
        let q = parse_query(Some("channel=b&channel=a&channel=b&client=x&since=v1.c")).unwrap();
        assert_eq!(q.channels, ["a", "b"]);
        assert_eq!(q.client.as_deref(), Some("x"));
        assert!(parse_query(Some("channel=a%20b")).is_err());
        let many: Vec<String> = (0..17).map(|i| format!("channel=c{i}")).collect();
        assert!(parse_query(Some(&many.join("&"))).is_err());
    }
}
