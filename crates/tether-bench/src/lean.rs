//! Lean subscribers: a raw `TcpStream`, a hand-written HTTP/1.1 request (WebSocket
//! upgrade or SSE `GET`), and a parser over one reusable read buffer, so that 10,000+
//! receivers cost the shared cores little next to the server under test.
//!
//! WebSocket: unmasked server frames (FIN, opcode, 7/16/64-bit lengths); a ping is
//! answered with a masked pong, a close ends the receiver. SSE: optional chunked
//! transfer-encoding, then lines; an event is dispatched at its blank line. A message's
//! publish time is found with a byte search for `"t":<micros>` in its payload.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

use crate::{now_micros, Target, Transport};

/// The largest frame or header block a receiver accepts.
const MAX_FRAME: usize = 16 << 20;
/// The longest response header block.
const MAX_HEAD: usize = 16 << 10;
/// The longest SSE line kept across reads.
const MAX_LINE: usize = 1 << 20;
/// A fixed handshake key (the server's answer is not checked: loopback bench).
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// What the subscribers connect to and how.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Tether or Nchan.
    pub target: Target,
    /// WebSocket or SSE.
    pub transport: Transport,
    /// The socket address.
    pub addr: SocketAddr,
    /// The `Host` header.
    pub host: String,
    /// Tether: the request path (`/ws`, `/sse`); Nchan: the subscriber prefix (`/sub`).
    pub path: String,
    /// The channel to subscribe to (Tether WebSocket: none = welcome only).
    pub channel: Option<String>,
}

impl Endpoint {
    fn request(&self, client: &str) -> String {
        let channel = self.channel.as_deref().unwrap_or("bench");
        let path = match self.target {
            Target::Tether => {
                let sep = if self.path.contains('?') { '&' } else { '?' };
                match (self.transport, &self.channel) {
                    (Transport::Sse, Some(c)) => {
                        format!("{}{sep}client={client}&channel={c}", self.path)
                    }
                    _ => format!("{}{sep}client={client}", self.path),
                }
            }
            Target::Nchan => format!("{}/{channel}", self.path.trim_end_matches('/')),
        };
        let extra = match self.transport {
            Transport::Ws => format!(
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n"
            ),
            Transport::Sse => "Accept: text/event-stream\r\n".to_owned(),
        };
        format!("GET {path} HTTP/1.1\r\nHost: {}\r\n{extra}\r\n", self.host)
    }

    /// When a subscriber counts as ready.
    fn ready_on(&self) -> ReadyOn {
        match (self.target, self.transport) {
            (Target::Nchan, _) => ReadyOn::Headers,
            (Target::Tether, Transport::Sse) => ReadyOn::FirstEvent,
            (Target::Tether, Transport::Ws) if self.channel.is_some() => ReadyOn::Subscribed,
            (Target::Tether, Transport::Ws) => ReadyOn::FirstEvent,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadyOn {
    /// The 101 / 200 response (Nchan subscribes on the request itself).
    Headers,
    /// Tether's `welcome` (frame or SSE event).
    FirstEvent,
    /// Tether's `subscribed` frame.
    Subscribed,
}

/// What one WebSocket message or SSE event is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Message,
    Welcome,
    Subscribed,
    Error,
    Other,
}

/// Per-receiver figures, filled by the parsers.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages received.
    pub got: usize,
    /// Latency of each stamped message, µs.
    pub lat: Vec<u32>,
    /// When the last message arrived (µs since the epoch).
    pub last_us: u64,
    ready: bool,
    refused: Option<String>,
}

impl Stats {
    fn on(&mut self, kind: Kind, stamp: Option<u64>, now: u64, ready_on: ReadyOn) {
        match kind {
            Kind::Message => {
                self.got += 1;
                self.last_us = now;
                if let Some(s) = stamp {
                    self.lat
                        .push(now.saturating_sub(s).min(u64::from(u32::MAX)) as u32);
                }
            }
            Kind::Subscribed => self.ready = true,
            Kind::Welcome if ready_on == ReadyOn::FirstEvent => self.ready = true,
            Kind::Error if !self.ready => self.refused = Some("error frame".into()),
            _ => {}
        }
    }
}

/// The publish timestamp in a payload (`"t":<micros>`).
pub fn stamp(b: &[u8]) -> Option<u64> {
    let i = memmem::find(b, b"\"t\":")? + 4;
    let mut v: u64 = 0;
    let mut any = false;
    for &c in b.get(i..)?.iter().take(20) {
        if !c.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
        any = true;
    }
    any.then_some(v)
}

fn classify(target: Target, payload: &[u8]) -> Kind {
    match target {
        Target::Nchan => Kind::Message,
        Target::Tether => {
            let rest = match payload.strip_prefix(b"{\"type\":\"") {
                Some(r) => r,
                None => return Kind::Other,
            };
            if rest.starts_with(b"message\"") {
                Kind::Message
            } else if rest.starts_with(b"subscribed\"") {
                Kind::Subscribed
            } else if rest.starts_with(b"welcome\"") {
                Kind::Welcome
            } else if rest.starts_with(b"error\"") {
                Kind::Error
            } else {
                Kind::Other
            }
        }
    }
}

#[derive(Debug, Default)]
struct WsState {
    /// A fragmented data message in progress: its kind and stamp so far.
    frag: Option<(Kind, Option<u64>)>,
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    Size,
    Data(usize),
    Crlf,
}

#[derive(Debug)]
struct SseState {
    /// `None`: the body is not chunked.
    chunk: Option<Chunk>,
    partial: Vec<u8>,
    event: Kind,
    data: bool,
    stamp: Option<u64>,
}

#[derive(Debug)]
enum Proto {
    Ws(WsState),
    Sse(SseState),
}

/// The parsers' verdict on the bytes so far.
#[derive(Debug, PartialEq, Eq)]
enum Flow {
    More,
    Closed(&'static str),
}

/// One subscriber's socket, read buffer and parser state.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes the current frame needs in the buffer (grown on demand).
    need: usize,
    proto: Proto,
    target: Target,
    ready_on: ReadyOn,
    /// Pongs to write.
    out: Vec<u8>,
    /// The figures.
    pub stats: Stats,
}

/// How a receiver ended when it did not get every message.
pub type EndReason = Option<String>;

/// What [`Conn::receive`] ends with: the figures, why it ended early (if it did), and
/// the socket, still open, of a receiver that got everything it wanted.
pub type Received = (Stats, EndReason, Option<TcpStream>);

impl Conn {
    /// Connects from `src` (`seq`: this connection's number among those from `src`),
    /// sends the request and reads the response head; then, for
    /// Tether, subscribes and waits for `subscribed` (or `welcome`). Returns once the
    /// subscriber is ready.
    pub async fn open(
        ep: &Endpoint,
        client: &str,
        src: IpAddr,
        seq: usize,
        buf_size: usize,
        want: usize,
    ) -> Result<Conn, String> {
        let mut stream = connect_from(src, seq, ep.addr).await?;
        let _ = stream.set_nodelay(true);
        stream
            .write_all(ep.request(client).as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut buf = vec![0u8; buf_size.max(4096)];
        let mut end = 0;
        let head_end = loop {
            if let Some(i) = memmem::find(&buf[..end], b"\r\n\r\n") {
                break i + 4;
            }
            if end >= MAX_HEAD.min(buf.len()) {
                return Err("response head too long".into());
            }
            let n = stream
                .read(&mut buf[end..])
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("closed before the response".into());
            }
            end += n;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .unwrap_or(0);
        let want_status = match ep.transport {
            Transport::Ws => 101,
            Transport::Sse => 200,
        };
        if status != want_status {
            return Err(format!("status {status}"));
        }
        let proto = match ep.transport {
            Transport::Ws => Proto::Ws(WsState::default()),
            Transport::Sse => {
                let chunked = head.lines().any(|l| {
                    l.strip_prefix("transfer-encoding:")
                        .is_some_and(|v| v.contains("chunked"))
                });
                Proto::Sse(SseState {
                    chunk: chunked.then_some(Chunk::Size),
                    partial: Vec::new(),
                    event: Kind::Message,
                    data: false,
                    stamp: None,
                })
            }
        };
        let mut c = Conn {
            stream,
            buf,
            start: head_end,
            end,
            need: 0,
            proto,
            target: ep.target,
            ready_on: ep.ready_on(),
            out: Vec::new(),
            stats: Stats {
                lat: Vec::with_capacity(want),
                ..Stats::default()
            },
        };
        if c.ready_on == ReadyOn::Headers {
            c.stats.ready = true;
            return Ok(c);
        }
        if let (Transport::Ws, Some(ch)) = (ep.transport, &ep.channel) {
            let sub = format!(r#"{{"type":"subscribe","channel":"{ch}"}}"#);
            let frame = masked_frame(0x1, sub.as_bytes());
            c.stream
                .write_all(&frame)
                .await
                .map_err(|e| format!("write: {e}"))?;
        }
        loop {
            let now = now_micros();
            if let Flow::Closed(why) = c.parse(now)? {
                return Err(format!("{why} before ready"));
            }
            c.flush().await?;
            if let Some(r) = c.stats.refused.take() {
                return Err(r);
            }
            if c.stats.ready {
                return Ok(c);
            }
            if !c.fill().await? {
                return Err("closed before ready".into());
            }
        }
    }

    /// Reads into the buffer after moving what is left to its front; false at EOF.
    async fn fill(&mut self) -> Result<bool, String> {
        self.compact();
        let n = self
            .stream
            .read(&mut self.buf[self.end..])
            .await
            .map_err(|e| format!("read: {e}"))?;
        self.end += n;
        Ok(n > 0)
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.need > self.buf.len() {
            self.buf.resize(self.need.next_power_of_two(), 0);
        }
    }

    async fn flush(&mut self) -> Result<(), String> {
        if !self.out.is_empty() {
            self.stream
                .write_all(&self.out)
                .await
                .map_err(|e| format!("write: {e}"))?;
            self.out.clear();
        }
        Ok(())
    }

    /// Parses every complete unit in the buffer.
    fn parse(&mut self, now: u64) -> Result<Flow, String> {
        let data = &self.buf[self.start..self.end];
        let (used, flow) = match &mut self.proto {
            Proto::Ws(st) => parse_ws(
                data,
                st,
                self.target,
                self.ready_on,
                now,
                &mut self.stats,
                &mut self.out,
                &mut self.need,
            )?,
            Proto::Sse(st) => parse_sse(data, st, self.ready_on, now, &mut self.stats)?,
        };
        self.start += used;
        Ok(flow)
    }

    /// Receives until `want` messages, a close, an error or `stop`. Adds each read's
    /// new messages to `progress`. A receiver that got all it wanted hands its socket
    /// back open: the caller closes it once every receiver is done, so the closes of
    /// the early finishers do not load the server and these cores while the last
    /// message is still on its way to the others.
    pub async fn receive(
        mut self,
        want: usize,
        mut stop: watch::Receiver<bool>,
        progress: Arc<AtomicU64>,
    ) -> Received {
        let end = loop {
            if self.stats.got >= want {
                break None;
            }
            if *stop.borrow() {
                break Some("stopped: no progress or deadline".to_owned());
            }
            self.compact();
            let n = tokio::select! {
                r = self.stream.read(&mut self.buf[self.end..]) => r,
                r = stop.changed() => {
                    if r.is_err() {
                        break Some("stopped: the coordinator is gone".to_owned());
                    }
                    continue;
                }
            };
            match n {
                Ok(0) => break Some("closed by the server".into()),
                Ok(n) => self.end += n,
                Err(e) => break Some(format!("read: {}", e.kind())),
            }
            let before = self.stats.got;
            let flow = self.parse(now_micros());
            let new = self.stats.got - before;
            if new > 0 {
                progress.fetch_add(new as u64, Ordering::Relaxed);
            }
            match flow {
                Ok(Flow::More) => {}
                Ok(Flow::Closed(why)) => break Some(why.to_owned()),
                Err(e) => break Some(e),
            }
            if let Err(e) = self.flush().await {
                break Some(e);
            }
        };
        let incomplete = self.stats.got < want;
        let held = (!incomplete).then_some(self.stream);
        (self.stats, end.filter(|_| incomplete), held)
    }
}

/// Connects to `target` from `src`. From the target's own address the kernel picks
/// the port at `connect` (cheap, and it reuses TIME_WAIT pairs on loopback). From any
/// other address the port is ours to pick: `bind(src, 0)` scans the whole range on
/// every call once tens of thousands of ports sit in TIME_WAIT after a previous run
/// (seconds per thousand connects), so connection `seq` takes port 10000 + seq with
/// SO_REUSEADDR (Linux reuses a TIME_WAIT 4-tuple on loopback, tcp_tw_reuse = 2) and
/// steps to another port if that one is taken.
async fn connect_from(src: IpAddr, seq: usize, target: SocketAddr) -> Result<TcpStream, String> {
    let socket = || {
        if src.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| format!("socket: {e}"))
    };
    if src == target.ip() {
        return socket()?
            .connect(target)
            .await
            .map_err(|e| format!("connect: {e}"));
    }
    const FIRST: usize = 10_000;
    const SPAN: usize = 65_535 - FIRST;
    let mut last = String::new();
    for attempt in 0..16 {
        let port = (FIRST + (seq + attempt * 7_919) % SPAN) as u16;
        let s = socket()?;
        let _ = s.set_reuseaddr(true);
        if let Err(e) = s.bind(SocketAddr::new(src, port)) {
            last = format!("bind: {e}");
            continue;
        }
        match s.connect(target).await {
            Ok(stream) => return Ok(stream),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
                ) =>
            {
                last = format!("connect: {e}");
            }
            Err(e) => return Err(format!("connect: {e}")),
        }
    }
    Err(last)
}

/// A masked client frame (fixed mask key: loopback bench).
fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x12u8, 0x34, 0x56, 0x78];
    let mut f = Vec::with_capacity(payload.len() + 14);
    f.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

#[allow(clippy::too_many_arguments)]
fn parse_ws(
    data: &[u8],
    st: &mut WsState,
    target: Target,
    ready_on: ReadyOn,
    now: u64,
    stats: &mut Stats,
    out: &mut Vec<u8>,
    need: &mut usize,
) -> Result<(usize, Flow), String> {
    let mut pos = 0;
    loop {
        let d = &data[pos..];
        if d.len() < 2 {
            return Ok((pos, Flow::More));
        }
        let (b0, b1) = (d[0], d[1]);
        if b1 & 0x80 != 0 {
            return Err("masked server frame".into());
        }
        let (len, hdr) = match b1 & 0x7f {
            126 => {
                if d.len() < 4 {
                    return Ok((pos, Flow::More));
                }
                (usize::from(u16::from_be_bytes([d[2], d[3]])), 4)
            }
            127 => {
                if d.len() < 10 {
                    return Ok((pos, Flow::More));
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&d[2..10]);
                (
                    usize::try_from(u64::from_be_bytes(b)).unwrap_or(usize::MAX),
                    10,
                )
            }
            n => (usize::from(n), 2),
        };
        if len > MAX_FRAME {
            return Err("frame too large".into());
        }
        let total = hdr + len;
        if d.len() < total {
            *need = total;
            return Ok((pos, Flow::More));
        }
        let payload = &d[hdr..total];
        let fin = b0 & 0x80 != 0;
        match b0 & 0x0f {
            0x1 | 0x2 => {
                let kind = classify(target, payload);
                let s = if kind == Kind::Message {
                    stamp(payload)
                } else {
                    None
                };
                if fin {
                    stats.on(kind, s, now, ready_on);
                } else {
                    st.frag = Some((kind, s));
                }
            }
            0x0 => {
                if let Some((kind, s)) = st.frag {
                    let s = if kind == Kind::Message && s.is_none() {
                        stamp(payload)
                    } else {
                        s
                    };
                    if fin {
                        st.frag = None;
                        stats.on(kind, s, now, ready_on);
                    } else {
                        st.frag = Some((kind, s));
                    }
                }
            }
            0x8 => return Ok((pos + total, Flow::Closed("close frame"))),
            0x9 => out.extend_from_slice(&masked_frame(0xA, payload)),
            0xA => {}
            _ => return Err("bad opcode".into()),
        }
        *need = 0;
        pos += total;
    }
}

fn parse_sse(
    data: &[u8],
    st: &mut SseState,
    ready_on: ReadyOn,
    now: u64,
    stats: &mut Stats,
) -> Result<(usize, Flow), String> {
    let Some(mut phase) = st.chunk else {
        sse_feed(st, data, ready_on, now, stats)?;
        return Ok((data.len(), Flow::More));
    };
    let mut pos = 0;
    let flow = loop {
        let d = &data[pos..];
        match phase {
            Chunk::Size => {
                let Some(nl) = memchr::memchr(b'\n', d) else {
                    if d.len() > 1024 {
                        return Err("bad chunk size line".into());
                    }
                    break Flow::More;
                };
                let line = &d[..nl];
                let hex = line
                    .split(|c| *c == b';' || *c == b'\r')
                    .next()
                    .unwrap_or_default();
                let size = std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| usize::from_str_radix(h.trim(), 16).ok())
                    .ok_or("bad chunk size")?;
                pos += nl + 1;
                if size == 0 {
                    break Flow::Closed("end of body");
                }
                phase = Chunk::Data(size);
            }
            Chunk::Data(rem) => {
                let n = rem.min(d.len());
                if n == 0 {
                    break Flow::More;
                }
                // Split borrows: the line state is in `st`, the bytes in `data`.
                sse_feed(st, &d[..n], ready_on, now, stats)?;
                pos += n;
                phase = if rem == n {
                    Chunk::Crlf
                } else {
                    Chunk::Data(rem - n)
                };
            }
            Chunk::Crlf => {
                let Some(nl) = memchr::memchr(b'\n', d) else {
                    break Flow::More;
                };
                pos += nl + 1;
                phase = Chunk::Size;
            }
        }
    };
    st.chunk = Some(phase);
    Ok((pos, flow))
}

fn sse_feed(
    st: &mut SseState,
    data: &[u8],
    ready_on: ReadyOn,
    now: u64,
    stats: &mut Stats,
) -> Result<(), String> {
    let mut rest = data;
    while let Some(nl) = memchr::memchr(b'\n', rest) {
        if st.partial.is_empty() {
            sse_line(st, &rest[..nl], ready_on, now, stats);
        } else {
            let mut line = std::mem::take(&mut st.partial);
            line.extend_from_slice(&rest[..nl]);
            sse_line(st, &line, ready_on, now, stats);
            line.clear();
            st.partial = line;
        }
        rest = &rest[nl + 1..];
    }
    st.partial.extend_from_slice(rest);
    if st.partial.len() > MAX_LINE {
        return Err("SSE line too long".into());
    }
    Ok(())
}

fn sse_line(st: &mut SseState, line: &[u8], ready_on: ReadyOn, now: u64, stats: &mut Stats) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        if st.data {
            stats.on(st.event, st.stamp, now, ready_on);
        }
        st.event = Kind::Message;
        st.data = false;
        st.stamp = None;
    } else if let Some(v) = line.strip_prefix(b"data:") {
        st.data = true;
        if st.stamp.is_none() && st.event == Kind::Message {
            st.stamp = stamp(v);
        }
    } else if let Some(v) = line.strip_prefix(b"event:") {
        let v = v.strip_prefix(b" ").unwrap_or(v);
        st.event = match v {
            b"message" => Kind::Message,
            b"welcome" => Kind::Welcome,
            b"error" => Kind::Error,
            _ => Kind::Other,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(op: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | op];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n if n <= 0xffff => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn stamps() {
        assert_eq!(stamp(br#"{"data":{"t":1234,"p":"x"}}"#), Some(1234));
        assert_eq!(stamp(br#"{"t":}"#), None);
        assert_eq!(stamp(b"nothing"), None);
        assert_eq!(stamp(br#""t":99999999999999999999999"#), None);
    }

    #[test]
    fn ws_frames_split_anywhere() {
        let mut all = Vec::new();
        all.extend(frame(0x1, true, br#"{"type":"subscribed","channel":"a"}"#));
        all.extend(frame(0x9, true, b"hi"));
        let big = format!(
            r#"{{"type":"message","data":{{"t":10,"p":"{}"}}}}"#,
            "x".repeat(300)
        );
        all.extend(frame(0x1, true, big.as_bytes()));
        all.extend(frame(0x1, false, br#"{"type":"message","data":{"#));
        all.extend(frame(0x0, true, br#""t":20}}"#));
        let huge = format!(
            r#"{{"type":"message","data":{{"t":30,"p":"{}"}}}}"#,
            "y".repeat(70_000)
        );
        all.extend(frame(0x1, true, huge.as_bytes()));
        all.extend(frame(0x8, true, b""));
        for split in [1, 3, 7, 64, 1000, all.len()] {
            let (mut st, mut stats, mut out, mut need) =
                (WsState::default(), Stats::default(), Vec::new(), 0);
            let mut buf = Vec::new();
            let mut flow = Flow::More;
            for piece in all.chunks(split) {
                buf.extend_from_slice(piece);
                let (used, f) = parse_ws(
                    &buf,
                    &mut st,
                    Target::Tether,
                    ReadyOn::Subscribed,
                    100,
                    &mut stats,
                    &mut out,
                    &mut need,
                )
                .unwrap();
                buf.drain(..used);
                flow = f;
            }
            assert_eq!(flow, Flow::Closed("close frame"));
            assert!(stats.ready);
            assert_eq!(stats.got, 3);
            assert_eq!(stats.lat, vec![90, 80, 70]);
            assert_eq!(out, masked_frame(0xA, b"hi"));
        }
    }

    #[test]
    fn sse_chunked_and_plain() {
        let events = "retry: 2000\n\nid: 1\nevent: welcome\ndata: {\"client_id\":\"c\"}\n\n: comment\n\nid: 2\nevent: message\ndata: {\"data\":{\"t\":40}}\n\nid: 3\r\ndata: {\"t\":50}\r\n\r\n";
        // Chunked: one chunk per 9 bytes.
        let mut chunked = Vec::new();
        for c in events.as_bytes().chunks(9) {
            chunked.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            chunked.extend_from_slice(c);
            chunked.extend_from_slice(b"\r\n");
        }
        chunked.extend_from_slice(b"0\r\n\r\n");
        for (body, is_chunked) in [(chunked, true), (events.as_bytes().to_vec(), false)] {
            for split in [1, 2, 5, 17, body.len()] {
                let mut st = SseState {
                    chunk: is_chunked.then_some(Chunk::Size),
                    partial: Vec::new(),
                    event: Kind::Message,
                    data: false,
                    stamp: None,
                };
                let mut stats = Stats::default();
                let mut buf = Vec::new();
                let mut flow = Flow::More;
                for piece in body.chunks(split) {
                    if flow != Flow::More {
                        break;
                    }
                    buf.extend_from_slice(piece);
                    let (used, f) =
                        parse_sse(&buf, &mut st, ReadyOn::FirstEvent, 100, &mut stats).unwrap();
                    buf.drain(..used);
                    flow = f;
                }
                assert!(stats.ready);
                assert_eq!(stats.got, 2, "split {split} chunked {is_chunked}");
                assert_eq!(stats.lat, vec![60, 50]);
                assert_eq!(flow == Flow::Closed("end of body"), is_chunked);
            }
        }
    }
}
