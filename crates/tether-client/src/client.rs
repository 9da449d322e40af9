//! The I/O shell around the state machine: one task per client that owns the socket,
//! the timers and the refresher call, performs the machine's actions and feeds back
//! what happened. It decides nothing itself.
//!
//! **Bounded memory.** Events go to the app through a bounded channel
//! ([`ClientBuilder::event_capacity`], default 1024). When it is full the task waits for
//! the app: it stops reading the socket, the server's bounded per-connection queue
//! fills, the server closes the connection with 4008 (slow consumer; behind a full
//! socket the announcement may not get through, which reads as an unannounced drop),
//! and the client resumes from the last delivered position once the app reads again.
//! Nothing is lost and nothing grows (`sdk_a_slow_app_is_closed_4008_and_resumes_without_loss`).
//! Commands (subscribe, unsubscribe, close) are the app's own calls.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

use crate::backoff::Backoff;
use crate::event::{Event, Stats};
use crate::frame::Incoming;
use crate::machine::{step, Action, Input, Machine, Settings, TokenOutcome};
use crate::ClientError;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest wait for one frame to be written.
const SEND_LIMIT: Duration = Duration::from_secs(5);
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Why the app's token refresher could not give a token.
#[derive(Debug, thiserror::Error)]
#[error("token refresher failed: {message}")]
pub struct RefreshError {
    message: String,
}

impl RefreshError {
    /// An error with a human sentence.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

type Refresher = Arc<dyn Fn() -> BoxFuture<Result<String, RefreshError>> + Send + Sync>;

/// Builds a [`Client`].
pub struct ClientBuilder {
    url: String,
    client_id: Option<String>,
    token: Option<String>,
    refresher: Option<Refresher>,
    channels: Vec<String>,
    backoff: Backoff,
    failure_cap: Option<u32>,
    event_capacity: usize,
    connect_timeout: Duration,
    seed: Option<u64>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl ClientBuilder {
    /// A client of `url` (`ws://host:7700/ws` or `wss://…`).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            client_id: None,
            token: None,
            refresher: None,
            channels: Vec::new(),
            backoff: Backoff::default(),
            failure_cap: None,
            event_capacity: 1024,
            connect_timeout: Duration::from_secs(10),
            seed: None,
            tls: None,
        }
    }

    /// The client id (auth mode `none`).
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = Some(id.into());
        self
    }

    /// The token (auth mode `jwt`), sent as the first frame, never in the URL.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// An async callback that returns a fresh token; called before the first
    /// connection when no token was given, and after 4003 (token expired) or 4401.
    pub fn token_refresher<F, Fut>(mut self, f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, RefreshError>> + Send + 'static,
    {
        self.refresher = Some(Arc::new(move || Box::pin(f())));
        self
    }

    /// Subscribes to a channel from the first connection on.
    pub fn channel(mut self, channel: impl Into<String>) -> Self {
        self.channels.push(channel.into());
        self
    }

    /// Backoff settings (default 250 ms, 30 s, factor 2, stable after 30 s).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Ends in a fatal `closed` after this many consecutive failed attempts.
    pub fn failure_cap(mut self, cap: u32) -> Self {
        self.failure_cap = Some(cap);
        self
    }

    /// Capacity of the event channel (at least 1; see the module docs for a full one).
    pub fn event_capacity(mut self, n: usize) -> Self {
        self.event_capacity = n.max(1);
        self
    }

    /// How long opening a socket and getting its `welcome` may take (default 10 s).
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.connect_timeout = d;
        self
    }

    /// Seeds the jitter RNG (tests; default: random).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    /// The TLS configuration for `wss://` (default: the system's root certificates).
    pub fn tls_config(mut self, cfg: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(cfg);
        self
    }

    /// Validates the settings and starts the client on the current tokio runtime.
    pub fn connect(self) -> Result<Client, ClientError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ClientError::NoRuntime)?;
        if !(self.url.starts_with("ws://") || self.url.starts_with("wss://")) {
            return Err(ClientError::InvalidUrl(self.url));
        }
        if let Some(bad) = self
            .channels
            .iter()
            .find(|c| !tether_protocol::valid_channel(c))
        {
            return Err(ClientError::InvalidChannel(bad.clone()));
        }
        let tls = match (self.url.starts_with("wss://"), self.tls) {
            (true, None) => Some(crate::tls::system_roots()?),
            (_, given) => given,
        };
        let settings = Settings {
            backoff: self.backoff,
            failure_cap: self.failure_cap,
            has_refresher: self.refresher.is_some(),
            connect_timeout_ms: u64::try_from(self.connect_timeout.as_millis()).unwrap_or(u64::MAX),
        };
        let seed = self.seed.unwrap_or_else(|| fastrand::u64(..));
        let machine = Machine::new(settings, seed, &self.channels, self.token);
        let (events_tx, events) = mpsc::channel(self.event_capacity);
        let (cmd, cmds) = mpsc::unbounded_channel();
        let shared = Arc::new(Mutex::new(Snapshot::new()));
        let shell = Shell {
            url: socket_url(&self.url, self.client_id.as_deref()),
            connect_timeout: self.connect_timeout,
            tls,
            refresher: self.refresher,
            events: events_tx,
            cmds,
            shared: shared.clone(),
            epoch: Instant::now(),
        };
        let task = runtime.spawn(shell.run(machine));
        Ok(Client {
            cmd,
            events,
            task,
            shared,
        })
    }
}

/// `url` with `refusal=close` (so a refusal arrives as a readable close) and the
/// client id.
fn socket_url(url: &str, client_id: Option<&str>) -> String {
    let mut u = url.to_owned();
    u.push(if u.contains('?') { '&' } else { '?' });
    u.push_str("refusal=close");
    if let Some(id) = client_id {
        u.push_str("&client=");
        u.push_str(&percent_encode(id));
    }
    u
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

enum Command {
    Subscribe(String),
    Unsubscribe(String),
    Close,
}

struct Snapshot {
    stats: Stats,
    at: Instant,
    connected: bool,
}

impl Snapshot {
    fn new() -> Self {
        Self {
            stats: Stats::default(),
            at: Instant::now(),
            connected: false,
        }
    }
}

/// A running client. Read its events with [`Client::next_event`]; dropping it stops
/// its task and closes its socket.
pub struct Client {
    cmd: mpsc::UnboundedSender<Command>,
    events: mpsc::Receiver<Event>,
    task: JoinHandle<()>,
    shared: Arc<Mutex<Snapshot>>,
}

impl Client {
    /// The next event; `None` once the client is closed and every event was read.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Subscribes to a channel; the subscription survives reconnects.
    pub fn subscribe(&self, channel: impl Into<String>) -> Result<(), ClientError> {
        let channel = channel.into();
        if !tether_protocol::valid_channel(&channel) {
            return Err(ClientError::InvalidChannel(channel));
        }
        self.command(Command::Subscribe(channel))
    }

    /// Leaves a channel.
    pub fn unsubscribe(&self, channel: impl Into<String>) -> Result<(), ClientError> {
        self.command(Command::Unsubscribe(channel.into()))
    }

    /// Closes the client (close code 1000). Keep reading events until `None` to see the
    /// final `closed`; or drop the client.
    pub fn close(&self) {
        let _ = self.cmd.send(Command::Close);
    }

    /// The stats so far (SPEC section 13).
    pub fn stats(&self) -> Stats {
        let snap = match self.shared.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut s = snap.stats.clone();
        if snap.connected {
            let extra = u64::try_from(snap.at.elapsed().as_millis()).unwrap_or(0);
            s.connected_ms += extra;
        }
        s
    }

    fn command(&self, c: Command) -> Result<(), ClientError> {
        self.cmd.send(c).map_err(|_| ClientError::Closed)
    }
}

/// The same events as [`Client::next_event`], as a `Stream`.
impl futures_util::Stream for Client {
    type Item = Event;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Event>> {
        self.events.poll_recv(cx)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // The task owns the socket: aborting it drops both.
        self.task.abort();
    }
}

/// Why opening a socket failed.
struct OpenFailure {
    status: Option<u16>,
    message: String,
}

async fn open(
    url: String,
    limit: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Ws, OpenFailure> {
    let connector = tls.map(Connector::Rustls);
    let connect = tokio_tungstenite::connect_async_tls_with_config(url, None, false, connector);
    match tokio::time::timeout(limit, connect).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(WsError::Http(resp))) => Err(OpenFailure {
            status: Some(resp.status().as_u16()),
            message: format!("upgrade refused: HTTP {}", resp.status()),
        }),
        Ok(Err(e)) => Err(OpenFailure {
            status: None,
            message: e.to_string(),
        }),
        Err(_) => Err(OpenFailure {
            status: None,
            message: format!("no upgrade within {} ms", limit.as_millis()),
        }),
    }
}

struct Shell {
    url: String,
    connect_timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
    refresher: Option<Refresher>,
    events: mpsc::Sender<Event>,
    cmds: mpsc::UnboundedReceiver<Command>,
    shared: Arc<Mutex<Snapshot>>,
    epoch: Instant,
}

/// What the shell holds between steps.
#[derive(Default)]
struct Io {
    ws: Option<Ws>,
    opening: Option<BoxFuture<Result<Ws, OpenFailure>>>,
    refreshing: Option<BoxFuture<Result<String, RefreshError>>>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    silence: Option<Duration>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    close_frame: Option<(u16, String)>,
}

impl Io {
    fn rearm(&mut self) {
        self.deadline = self.silence.map(|d| Box::pin(tokio::time::sleep(d)));
    }
}

enum Flow {
    Continue,
    Finish,
}

impl Shell {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn run(mut self, mut machine: Machine) {
        let mut io = Io::default();
        let mut input = Input::Start;
        loop {
            let (next, actions) = step(machine, input);
            machine = next;
            self.publish(&machine);
            for action in actions {
                if let Flow::Finish = self.perform(action, &mut io).await {
                    // Refuse commands before the event stream ends, so an app that saw
                    // the end is told the client is closed.
                    self.cmds.close();
                    return;
                }
            }
            input = self.next_input(&mut io).await;
        }
    }

    fn publish(&self, machine: &Machine) {
        let mut snap = match self.shared.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        snap.stats = machine.stats(self.now());
        snap.at = Instant::now();
        snap.connected = machine.phase() == crate::machine::Phase::Connected;
    }

    async fn perform(&mut self, action: Action, io: &mut Io) -> Flow {
        match action {
            Action::Open => {
                io.close_frame = None;
                let tls = self.tls.clone();
                let url = self.url.clone();
                io.opening = Some(Box::pin(open(url, self.connect_timeout, tls)));
            }
            Action::Send(text) => {
                if let Some(ws) = io.ws.as_mut() {
                    // A failed send surfaces as the socket's end on the next read; a
                    // send stuck behind a peer that stopped reading is given up, and
                    // the silence deadline then finds the peer dead.
                    let send = ws.send(Message::text(text));
                    let _ = tokio::time::timeout(SEND_LIMIT, send).await;
                }
            }
            Action::CloseSocket { code, reason } => {
                io.opening = None;
                if let Some(mut ws) = io.ws.take() {
                    let frame = CloseFrame {
                        code: WsCode::from(code),
                        reason: reason.into(),
                    };
                    let _ =
                        tokio::time::timeout(Duration::from_secs(1), ws.close(Some(frame))).await;
                }
            }
            Action::Wait { ms } => {
                io.timer = Some(Box::pin(tokio::time::sleep(Duration::from_millis(ms))));
            }
            Action::RefreshToken => {
                io.refreshing = self.refresher.as_ref().map(|r| r());
            }
            Action::Deadline(d) => {
                io.silence = d.map(Duration::from_millis);
                io.rearm();
            }
            Action::Emit(event) => {
                if self.events.send(event).await.is_err() {
                    return Flow::Finish; // the app dropped its receiver
                }
            }
            Action::Finish => return Flow::Finish,
        }
        Flow::Continue
    }

    /// Waits for the next thing that matters to the machine.
    async fn next_input(&mut self, io: &mut Io) -> Input {
        loop {
            tokio::select! {
                biased;
                cmd = self.cmds.recv() => return match cmd {
                    Some(Command::Subscribe(c)) => Input::Subscribe(c),
                    Some(Command::Unsubscribe(c)) => Input::Unsubscribe(c),
                    Some(Command::Close) | None => Input::Close { now: self.now() },
                },
                msg = next_message(&mut io.ws), if io.ws.is_some() => {
                    io.rearm();
                    if let Some(input) = self.on_message(msg, io) {
                        return input;
                    }
                }
                r = poll_opt(&mut io.opening), if io.opening.is_some() => {
                    io.opening = None;
                    return match r {
                        Ok(ws) => {
                            io.ws = Some(ws);
                            Input::Opened
                        }
                        Err(f) => Input::Failed { status: f.status, message: f.message },
                    };
                }
                t = poll_opt(&mut io.refreshing), if io.refreshing.is_some() => {
                    io.refreshing = None;
                    return Input::Token(match t {
                        Ok(token) => TokenOutcome::Fresh(token),
                        Err(e) => TokenOutcome::Failed(e.to_string()),
                    });
                }
                () = poll_opt(&mut io.timer), if io.timer.is_some() => {
                    io.timer = None;
                    return Input::TimerFired;
                }
                () = poll_opt(&mut io.deadline), if io.deadline.is_some() && io.ws.is_some() => {
                    io.deadline = None;
                    return Input::Silent { now: self.now() };
                }
            }
        }
    }

    /// One socket read as an input (`None`: nothing for the machine, e.g. a ping).
    fn on_message(&self, msg: Option<Result<Message, WsError>>, io: &mut Io) -> Option<Input> {
        let now = self.now();
        match msg {
            Some(Ok(Message::Text(t))) => Some(Input::Frame {
                now,
                frame: Incoming::decode(t.as_str()),
            }),
            Some(Ok(Message::Close(f))) => {
                // Keep reading: tungstenite answers the close, then the stream ends.
                io.close_frame = Some(
                    f.map(|f| (u16::from(f.code), f.reason.to_string()))
                        .unwrap_or((1005, String::new())),
                );
                None
            }
            Some(Ok(_)) => None,
            Some(Err(e)) => Some(self.dropped(io, e.to_string())),
            None => Some(self.dropped(io, String::new())),
        }
    }

    fn dropped(&self, io: &mut Io, error: String) -> Input {
        io.ws = None;
        let (code, reason) = match io.close_frame.take() {
            Some((code, reason)) => (Some(code), reason),
            None => (None, error),
        };
        Input::Dropped {
            now: self.now(),
            code,
            reason,
        }
    }
}

async fn next_message(ws: &mut Option<Ws>) -> Option<Result<Message, WsError>> {
    match ws.as_mut() {
        Some(ws) => ws.next().await,
        None => std::future::pending().await,
    }
}

async fn poll_opt<F: Future + Unpin>(f: &mut Option<F>) -> F::Output {
    match f.as_mut() {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}
