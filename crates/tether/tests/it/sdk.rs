//! The client SDKs against a real server (SPEC section 13): the Rust crate
//! `tether-client` in-process and over the real binary (restart, SIGSTOP, drain), and
//! `tether connect` driven as a process (its JSON lines and exit codes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;
use tether_client::{Backoff, Client, ClientBuilder, Event, State};

const BIN: &str = env!("CARGO_BIN_EXE_tether");
const SECRET: &str = "sdk-secret-sdk-secret-sdk-secret";

/// A client and everything it said, each event with when it came.
struct Rec {
    client: Client,
    log: Vec<(Instant, Event)>,
}

impl Rec {
    fn new(client: Client) -> Self {
        Self {
            client,
            log: Vec::new(),
        }
    }

    /// Reads events until one matches `pred`, within `limit`; returns it.
    async fn until(&mut self, what: &str, limit: Duration, pred: impl Fn(&Event) -> bool) -> Event {
        let end = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(end, self.client.next_event()).await {
                Ok(Some(e)) => {
                    self.log.push((Instant::now(), e.clone()));
                    if pred(&e) {
                        return e;
                    }
                }
                Ok(None) => panic!("event stream ended waiting for {what}: {:#?}", self.tail()),
                Err(_) => panic!("timed out waiting for {what}: {:#?}", self.tail()),
            }
        }
    }

    async fn state(&mut self, s: State, limit: Duration) -> tether_client::StateChange {
        match self
            .until(
                s.as_str(),
                limit,
                |e| matches!(e, Event::State(c) if c.state == s),
            )
            .await
        {
            Event::State(c) => c,
            _ => unreachable!(),
        }
    }

    /// Reads until the stream ends (the client closed), within `limit`.
    async fn read_to_end(&mut self, limit: Duration) {
        let end = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(end, self.client.next_event()).await {
                Ok(Some(e)) => self.log.push((Instant::now(), e)),
                Ok(None) => return,
                Err(_) => panic!("the client did not end: {:#?}", self.tail()),
            }
        }
    }

    fn tail(&self) -> Vec<&Event> {
        self.log
            .iter()
            .rev()
            .take(12)
            .rev()
            .map(|(_, e)| e)
            .collect()
    }

    /// The `n` of every message delivered, in order.
    fn ns(&self) -> Vec<u64> {
        self.log
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Message { data, .. } => data["n"].as_u64(),
                _ => None,
            })
            .collect()
    }

    fn states(&self) -> Vec<&tether_client::StateChange> {
        self.log
            .iter()
            .filter_map(|(_, e)| match e {
                Event::State(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    /// The resume reports: (recovered, missed).
    fn resumes(&self) -> Vec<(bool, u64)> {
        self.log
            .iter()
            .filter_map(|(_, e)| match e {
                Event::Recovered {
                    recovered, missed, ..
                } => Some((*recovered, *missed)),
                _ => None,
            })
            .collect()
    }
}

fn client(url: &str, id: &str) -> ClientBuilder {
    ClientBuilder::new(url)
        .client_id(id)
        .channel("news")
        .seed(11)
}

const T: Duration = Duration::from_secs(10);

async fn publish(s: &TestServer, n: u64) {
    let (status, body) = s
        .post("/api/publish", json!({"channel": "news", "data": {"n": n}}))
        .await;
    assert_eq!(status, 200, "{body}");
}

async fn kick(s: &TestServer, id: &str, reconnect: bool) -> u64 {
    let (status, body) = s
        .post(
            "/api/disconnect",
            json!({"client_id": id, "reconnect": reconnect}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["closed"].as_u64().unwrap()
}

async fn wait_ws(s: &TestServer, n: u64) {
    for _ in 0..200 {
        if s.stats().await["connections"]["ws"] == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("expected {n} ws connections: {}", s.stats().await);
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_kick_with_reconnect_resumes_every_message_once_and_without_stops() {
    let s = start(|_| {}).await;
    let mut c = Rec::new(client(&s.ws_url(""), "kim").connect().unwrap());
    c.state(State::Connected, T).await;
    c.until("subscribed", T, |e| matches!(e, Event::Subscribed { .. }))
        .await;
    for n in 1..=3 {
        publish(&s, n).await;
    }
    c.until(
        "3",
        T,
        |e| matches!(e, Event::Message { data, .. } if data["n"] == 3),
    )
    .await;
    assert_eq!(kick(&s, "kim", true).await, 1);
    let d = c.state(State::Disconnected, T).await;
    assert_eq!((d.code, d.will_reconnect), (Some(4002), Some(true)));
    // Published while away: only the resume can deliver these.
    for n in 4..=6 {
        publish(&s, n).await;
    }
    let r = c
        .until("resume", T, |e| matches!(e, Event::Recovered { .. }))
        .await;
    assert!(
        matches!(
            r,
            Event::Recovered {
                recovered: true,
                ..
            }
        ),
        "{r:?}"
    );
    c.until(
        "6",
        T,
        |e| matches!(e, Event::Message { data, .. } if data["n"] == 6),
    )
    .await;
    assert_eq!(kick(&s, "kim", false).await, 1);
    let d = c.state(State::Disconnected, T).await;
    assert_eq!((d.code, d.will_reconnect), (Some(4002), Some(false)));
    let closed = c.state(State::Closed, T).await;
    assert!(!closed.fatal);
    c.read_to_end(T).await;
    assert_eq!(c.ns(), [1, 2, 3, 4, 5, 6]);
    let st = c.client.stats();
    assert_eq!((st.reconnects, st.messages, st.duplicates), (1, 6, 0));
    assert_eq!(st.failures.get("4002"), Some(&2));
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_drop_and_close_leave_no_socket_behind() {
    let s = start(|_| {}).await;
    let mut a = Rec::new(client(&s.ws_url(""), "a").connect().unwrap());
    let mut b = Rec::new(client(&s.ws_url(""), "b").connect().unwrap());
    a.state(State::Connected, T).await;
    b.state(State::Connected, T).await;
    wait_ws(&s, 2).await;
    // The client is also a Stream of the same events.
    let next = futures_util::StreamExt::next(&mut a.client).await;
    assert!(matches!(next, Some(Event::Subscribed { .. })), "{next:?}");
    drop(a);
    wait_ws(&s, 1).await;
    b.client.close();
    let closed = b.state(State::Closed, T).await;
    assert_eq!((closed.code, closed.fatal), (Some(1000), false));
    b.read_to_end(T).await;
    assert!(b.client.subscribe("x").is_err(), "a closed client says so");
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_thousand_messages_across_twenty_forced_reconnects_exactly_once_in_order() {
    let s = start(|_| {}).await;
    let mut c = Rec::new(client(&s.ws_url(""), "many").connect().unwrap());
    c.until("subscribed", T, |e| matches!(e, Event::Subscribed { .. }))
        .await;
    for batch in 0..20u64 {
        let base = batch * 50;
        for n in base..base + 25 {
            publish(&s, n).await;
        }
        // Forced reconnect; the next 25 are published while the client is away or
        // resubscribing, so the resume has to replay some of them.
        assert_eq!(kick(&s, "many", true).await, 1);
        for n in base + 25..base + 50 {
            publish(&s, n).await;
        }
        c.until("the resume", T, |e| matches!(e, Event::Recovered { .. }))
            .await;
    }
    c.until(
        "message 999",
        T,
        |e| matches!(e, Event::Message { data, .. } if data["n"] == 999),
    )
    .await;
    assert_eq!(
        c.ns(),
        (0..1000).collect::<Vec<_>>(),
        "exactly once, in order"
    );
    let resumes = c.resumes();
    assert_eq!(resumes.len(), 20, "every resume reports");
    assert!(
        resumes.iter().all(|(recovered, _)| *recovered),
        "{resumes:?}"
    );
    let replayed: u64 = resumes.iter().map(|(_, missed)| missed).sum();
    assert!(
        replayed > 0,
        "some gaps were replayed from history: {resumes:?}"
    );
    let st = c.client.stats();
    assert_eq!((st.reconnects, st.messages), (20, 1000));
    c.client.close();
    c.read_to_end(T).await;
    s.assert_clean().await;
}

/// The documented behaviour of a full event channel: the client stops reading, the
/// server's bounded queue overflows and closes it 4008, and the client resumes from the
/// last delivered position: nothing lost, nothing twice, nothing grows.
#[tokio::test(flavor = "multi_thread")]
async fn sdk_a_slow_app_is_closed_4008_and_resumes_without_loss() {
    let s = start(|c| {
        c.delivery.max_queue_messages = 20.try_into().unwrap();
        c.history.size = 5000.try_into().unwrap();
    })
    .await;
    let mut c = Rec::new(
        client(&s.ws_url(""), "slow")
            .event_capacity(4)
            .connect()
            .unwrap(),
    );
    c.until("subscribed", T, |e| matches!(e, Event::Subscribed { .. }))
        .await;
    // Not reading: 2,000 messages of 4 KiB, more than the socket buffers hold.
    let pad = "x".repeat(4096);
    let mut top = None;
    for n in 0..2000u64 {
        let (status, _) = s
            .post(
                "/api/publish",
                json!({"channel": "news", "data": {"n": n, "pad": pad}}),
            )
            .await;
        assert_eq!(status, 200);
        if n % 100 == 99 && s.stats().await["connections"]["ws"] == 0 {
            top = Some(n);
            break;
        }
    }
    let top = top.expect("the server closed the stalled client");
    assert_eq!(
        c.log.len(),
        3,
        "nothing read meanwhile: connecting, connected, subscribed"
    );
    c.until(
        "the last message",
        Duration::from_secs(30),
        |e| matches!(e, Event::Message { data, .. } if data["n"] == top),
    )
    .await;
    assert_eq!(c.ns(), (0..=top).collect::<Vec<_>>());
    let d = c
        .states()
        .into_iter()
        .find(|s| s.state == State::Disconnected)
        .cloned()
        .unwrap();
    // 4008's announcement is best-effort (SPEC section 4): behind a full socket buffer
    // the close frame may not get through, and the drop is then an unannounced one.
    assert!(matches!(d.code, Some(4008) | None), "{d:?}");
    let resumes = c.resumes();
    assert!(
        !resumes.is_empty() && resumes.iter().all(|(recovered, _)| *recovered),
        "{resumes:?}"
    );
    c.client.close();
    c.read_to_end(T).await;
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_token_expiry_is_healed_by_the_refresher() {
    let s = start(|c| {
        c.auth.mode = tether_server::config::AuthMode::Jwt;
        c.auth.hs256_secret = SECRET.into();
        c.auth.leeway_ms = 0;
    })
    .await;
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    // The first token lives 2 s (exp has 1 s resolution: 1 to 2 s), the next ones 60 s.
    let mut c = Rec::new(
        ClientBuilder::new(s.ws_url(""))
            .channel("news")
            .token_refresher(move || {
                let ttl = if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                    2
                } else {
                    60
                };
                async move {
                    tether_server::auth::mint_hs256(SECRET, "tina", &["news".into()], ttl)
                        .map_err(|e| tether_client::RefreshError::new(e.to_string()))
                }
            })
            .connect()
            .unwrap(),
    );
    c.state(State::Connected, T).await;
    publish(&s, 1).await;
    c.until(
        "1",
        T,
        |e| matches!(e, Event::Message { data, .. } if data["n"] == 1),
    )
    .await;
    let d = c.state(State::Disconnected, Duration::from_secs(5)).await;
    assert_eq!((d.code, d.will_reconnect), (Some(4003), Some(true)));
    publish(&s, 2).await;
    c.state(State::Connected, T).await;
    c.until(
        "2",
        T,
        |e| matches!(e, Event::Message { data, .. } if data["n"] == 2),
    )
    .await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "first token, then one after 4003"
    );
    assert_eq!(c.ns(), [1, 2]);
    let resumes = c.resumes();
    assert!(resumes.len() == 1 && resumes[0].0, "{resumes:?}");
    c.client.close();
    c.read_to_end(T).await;
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_drain_spreads_three_clients_reconnects() {
    let s = start(|c| {
        c.shutdown.pre_drain_ms = 0;
        c.shutdown.drain_window_ms = 3000;
    })
    .await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut c = Rec::new(
            client(&s.ws_url(""), &format!("d{i}"))
                .seed(i)
                .connect()
                .unwrap(),
        );
        c.state(State::Connected, T).await;
        clients.push(c);
    }
    wait_ws(&s, 3).await;
    let drained = Instant::now();
    let stop = tokio::spawn(s.stop());
    // Each client watched by its own task, so each event is timed when it comes.
    let watchers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let d = c.state(State::Disconnected, T).await;
                assert_eq!((d.code, d.will_reconnect), (Some(1001), Some(true)));
                let r = c.state(State::Reconnecting, T).await;
                let told = c.log.last().unwrap().0;
                // The server's jittered retry_ms (at most 1 s), not the client's backoff.
                let delay = r.delay_ms.unwrap();
                assert!(delay <= 1000, "{r:?}");
                c.state(State::Connecting, T).await;
                let at = c.log.last().unwrap().0;
                // ... and the client waited it out (read latency aside).
                assert!(
                    at.duration_since(told) + Duration::from_millis(100)
                        >= Duration::from_millis(delay),
                    "waited {:?} of {delay} ms",
                    at.duration_since(told)
                );
                let at = at.duration_since(drained);
                c.client.close();
                c.read_to_end(T).await;
                at
            })
        })
        .collect();
    let mut first_retry = Vec::new();
    for w in watchers {
        first_retry.push(w.await.unwrap());
    }
    stop.await.unwrap();
    first_retry.sort();
    let spread = first_retry[2] - first_retry[0];
    // Closes at 0, 1 and 2 s of the 3 s window, each plus [0, 1] s: the first and last
    // retries are at least 1 s apart, and all within the window plus the jitter.
    assert!(
        spread >= Duration::from_millis(1000) && first_retry[2] <= Duration::from_millis(5500),
        "reconnects at {first_retry:?}"
    );
}

// ---- the real binary ----

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = signal(&self.0, "CONT");
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &std::process::Child, sig: &str) -> bool {
    Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

struct Binary {
    client: u16,
    api: u16,
    env: Vec<(String, String)>,
}

impl Binary {
    fn new(env: &[(&str, &str)]) -> Self {
        Self {
            client: free_port(),
            api: free_port(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    async fn start(&self) -> Proc {
        let mut cmd = Command::new(BIN);
        cmd.args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", self.client),
            "--api-listen",
            &format!("127.0.0.1:{}", self.api),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let p = Proc(cmd.spawn().unwrap());
        let http = reqwest::Client::new();
        for _ in 0..400 {
            if let Ok(r) = http.get(self.api_url("/readyz")).send().await {
                if r.status() == 200 {
                    return p;
                }
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the binary did not become ready");
    }

    fn ws(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.client)
    }

    fn api_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.api)
    }

    async fn publish(&self, n: u64) {
        let r = reqwest::Client::new()
            .post(self.api_url("/api/publish"))
            .json(&json!({"channel": "news", "data": {"n": n}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_server_restarted_under_the_client_and_down_for_5s() {
    let bin = Binary::new(&[]);
    let server = bin.start().await;
    let mut c = Rec::new(client(&bin.ws(), "rita").connect().unwrap());
    c.until("subscribed", T, |e| matches!(e, Event::Subscribed { .. }))
        .await;
    bin.publish(1).await;
    c.until(
        "1",
        T,
        |e| matches!(e, Event::Message { data, .. } if data["n"] == 1),
    )
    .await;
    drop(server); // SIGKILL: no announcement
    let killed = Instant::now();
    let d = c.state(State::Disconnected, T).await;
    assert_eq!(d.will_reconnect, Some(true));
    // Down for 5 s: attempts keep failing with growing, capped backoff.
    tokio::time::sleep(Duration::from_secs(5).saturating_sub(killed.elapsed())).await;
    let server = bin.start().await;
    let back = c.state(State::Connected, Duration::from_secs(15)).await;
    assert_eq!(back.state, State::Connected);
    let retries: Vec<(u32, u64)> = c
        .states()
        .iter()
        .filter(|s| s.state == State::Reconnecting)
        .map(|s| (s.attempt.unwrap(), s.delay_ms.unwrap()))
        .collect();
    assert!(retries.len() >= 4, "retried while down: {retries:?}");
    for (i, (attempt, delay)) in retries.iter().enumerate() {
        let cap = Backoff::default().cap(u32::try_from(i + 1).unwrap());
        assert_eq!(*attempt, u32::try_from(i + 1).unwrap());
        assert!(*delay <= cap, "retry {i}: {delay} over {cap}");
    }
    // The restarted server lost its in-memory history: the gap is surfaced, not hidden.
    let r = c
        .until("resume", T, |e| matches!(e, Event::Recovered { .. }))
        .await;
    assert!(
        matches!(
            r,
            Event::Recovered {
                recovered: false,
                ..
            }
        ),
        "{r:?}"
    );
    bin.publish(2).await;
    c.until(
        "2",
        T,
        |e| matches!(e, Event::Message { data, .. } if data["n"] == 2),
    )
    .await;
    assert_eq!(c.ns(), [1, 2]);
    c.client.close();
    c.read_to_end(T).await;
    assert_binary_clean(&bin).await;
    drop(server);
}

/// The binary's own leak check: no connection, client or task left.
async fn assert_binary_clean(bin: &Binary) {
    let http = reqwest::Client::new();
    let mut last = Value::Null;
    for _ in 0..100 {
        last = http
            .get(bin.api_url("/api/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if last["connections"]["ws"] == 0 && last["clients"] == 0 && last["tasks"] == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not clean: {last}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_silent_server_is_detected_within_heartbeat_plus_timeout() {
    let bin = Binary::new(&[
        ("TETHER_HEARTBEAT__INTERVAL_MS", "400"),
        ("TETHER_HEARTBEAT__TIMEOUT_MS", "400"),
    ]);
    let server = bin.start().await;
    let mut c = Rec::new(
        client(&bin.ws(), "sam")
            .connect_timeout(Duration::from_secs(3))
            .connect()
            .unwrap(),
    );
    c.until("subscribed", T, |e| matches!(e, Event::Subscribed { .. }))
        .await;
    // Let a few pings pass: a quiet, live server is not dropped.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(c.client.stats().failures.len(), 0);
    assert!(signal(&server.0, "STOP"));
    let stopped = Instant::now();
    let d = c.state(State::Disconnected, T).await;
    let took = stopped.elapsed();
    assert_eq!(d.code, Some(4000));
    // A stopped process keeps its sockets open: only the heartbeat check can see
    // it. The last frame came at most one interval before the stop, so detection
    // is never before the timeout after it, and is due by interval + timeout. The
    // upper bound leaves a loaded 2-core CI machine 1.2 s of scheduling (800 ms of
    // slack failed once under load); without a heartbeat check the client would
    // wait until the test's own limit.
    assert!(
        took >= Duration::from_millis(350) && took <= Duration::from_millis(800 + 1200),
        "detected after {took:?}"
    );
    assert!(signal(&server.0, "CONT"));
    c.state(State::Connected, T).await;
    let r = c
        .until("resume", T, |e| matches!(e, Event::Recovered { .. }))
        .await;
    assert!(
        matches!(
            r,
            Event::Recovered {
                recovered: true,
                ..
            }
        ),
        "{r:?}"
    );
    assert_eq!(c.client.stats().failures.get("silent"), Some(&1));
    c.client.close();
    c.read_to_end(T).await;
    assert_binary_clean(&bin).await;
    drop(server);
}

// ---- `tether connect` as a process ----

struct ConnectProc {
    proc: Proc,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    seen: Vec<Value>,
}

impl ConnectProc {
    fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .arg("connect")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            proc: Proc(child),
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads lines until one matches; every line must be a JSON object with `event`.
    async fn until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        loop {
            let line = tokio::time::timeout(T, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no {what} line: {:#?}", self.seen))
                .unwrap_or_else(|| panic!("output ended before {what}: {:#?}", self.seen));
            let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert!(line.starts_with(r#"{"event":""#), "event first: {line}");
            self.seen.push(v.clone());
            if pred(&v) {
                return v;
            }
        }
    }

    /// Reads the rest of the output (until the process closes it) and the exit code.
    async fn finish(self) -> (Vec<Value>, i32) {
        let Self {
            mut proc,
            mut lines,
            mut seen,
        } = self;
        while let Some(line) = tokio::time::timeout(T, lines.recv())
            .await
            .expect("the process ends")
        {
            seen.push(serde_json::from_str(&line).unwrap());
        }
        let (status, proc) = tokio::task::spawn_blocking(move || (proc.0.wait(), proc))
            .await
            .unwrap();
        drop(proc);
        (seen, status.unwrap().code().unwrap_or(-1))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_tether_connect_prints_spec_lines_and_exits_0_after_a_kick_without_reconnect() {
    let s = start(|_| {}).await;
    let url = s.ws_url("");
    let mut p = ConnectProc::spawn(&[&url, "--client", "cli", "--channel", "news", "--stats"]);
    let first = p.until("connecting", |v| v["event"] == "state").await;
    assert_eq!(
        first,
        json!({"event": "state", "state": "connecting", "attempt": 1})
    );
    p.until("connected", |v| v["state"] == "connected").await;
    let sub = p.until("subscribed", |v| v["event"] == "subscribed").await;
    assert_eq!(sub["channel"], "news");
    assert_eq!(
        (sub["recovered"].clone(), sub["missed"].clone()),
        (json!(false), json!(0))
    );
    publish(&s, 1).await;
    let m = p.until("message", |v| v["event"] == "message").await;
    assert_eq!(m["data"], json!({"n": 1}));
    assert!(m["id"].is_string() && m["position"].is_string() && m["channel"] == "news");
    assert_eq!(kick(&s, "cli", true).await, 1);
    let d = p
        .until("disconnected", |v| v["state"] == "disconnected")
        .await;
    assert_eq!(d["code"], 4002);
    let r = p
        .until("reconnecting", |v| v["state"] == "reconnecting")
        .await;
    assert!(
        r["attempt"] == 1 && r["delay_ms"].as_u64().is_some_and(|d| d <= 250),
        "{r}"
    );
    let resumed = p.until("resume", |v| v["event"] == "subscribed").await;
    assert_eq!(resumed["recovered"], true);
    s.post(
        "/api/send",
        json!({"client_id": "cli", "data": {"hello": true}}),
    )
    .await;
    let direct = p.until("direct", |v| v["event"] == "direct").await;
    assert_eq!(direct["data"], json!({"hello": true}));
    assert_eq!(kick(&s, "cli", false).await, 1);
    let (lines, code) = p.finish().await;
    assert_eq!(code, 0, "{lines:#?}");
    let closed = &lines[lines.len() - 2];
    assert_eq!(
        (closed["state"].as_str(), closed["code"].as_u64()),
        (Some("closed"), Some(4002))
    );
    let stats = lines.last().unwrap();
    assert_eq!(stats["event"], "stats");
    assert_eq!(
        (stats["messages"].clone(), stats["reconnects"].clone()),
        (json!(2), json!(1))
    );
    assert_eq!(stats["failures"], json!({"4002": 2}));
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_tether_connect_exits_0_on_sigint_and_1_when_refused_for_good() {
    let s = start(|_| {}).await;
    let url = s.ws_url("");
    let mut p = ConnectProc::spawn(&[&url, "--client", "int", "--channel", "news"]);
    p.until("connected", |v| v["state"] == "connected").await;
    assert!(signal(&p.proc.0, "INT"));
    let (lines, code) = p.finish().await;
    assert_eq!(code, 0);
    assert_eq!(
        lines.last().unwrap(),
        &json!({"event": "state", "state": "closed", "code": 1000, "reason": "closed by the client"})
    );
    s.assert_clean().await;

    let s = start(|c| {
        c.auth.mode = tether_server::config::AuthMode::Jwt;
        c.auth.hs256_secret = SECRET.into();
    })
    .await;
    let url = s.ws_url("");
    let p = ConnectProc::spawn(&[&url, "--token", "not-a-token", "--channel", "news"]);
    let (lines, code) = p.finish().await;
    assert_eq!(code, 1, "{lines:#?}");
    let err = lines.iter().find(|v| v["event"] == "error").unwrap();
    assert_eq!(err["code"], "unauthorized");
    let last = lines.last().unwrap();
    assert_eq!(
        (last["state"].as_str(), last["code"].as_u64()),
        (Some("closed"), Some(4401))
    );
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_subscribe_and_unsubscribe_at_any_time_survive_reconnects() {
    let s = start(|_| {}).await;
    let mut c = Rec::new(client(&s.ws_url(""), "subs").connect().unwrap());
    c.until("news", T, |e| matches!(e, Event::Subscribed { .. }))
        .await;
    c.client.subscribe("late").unwrap();
    c.until(
        "late",
        T,
        |e| matches!(e, Event::Subscribed { channel, .. } if channel == "late"),
    )
    .await;
    c.client.unsubscribe("news").unwrap();
    assert!(matches!(
        c.client.subscribe("bad name"),
        Err(tether_client::ClientError::InvalidChannel(_))
    ));
    // The unsubscribe is on the wire before this publish: the server says so.
    for _ in 0..200 {
        let (_, p) = s.get("/api/channels/news/presence").await;
        if p.to_string().contains("subs") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        } else {
            break;
        }
    }
    publish(&s, 1).await;
    let late = |n: u64| json!({"channel": "late", "data": {"n": n}});
    assert_eq!(s.post("/api/publish", late(2)).await.0, 200);
    c.until(
        "2",
        T,
        |e| matches!(e, Event::Message { data, .. } if data["n"] == 2),
    )
    .await;
    assert_eq!(kick(&s, "subs", true).await, 1);
    assert_eq!(s.post("/api/publish", late(3)).await.0, 200);
    publish(&s, 4).await;
    let r = c
        .until("resume", T, |e| matches!(e, Event::Recovered { .. }))
        .await;
    assert!(
        matches!(&r, Event::Recovered { channel, recovered: true, .. } if channel == "late"),
        "{r:?}"
    );
    c.until(
        "3",
        T,
        |e| matches!(e, Event::Message { data, .. } if data["n"] == 3),
    )
    .await;
    publish(&s, 5).await;
    assert_eq!(s.post("/api/publish", late(6)).await.0, 200);
    c.until(
        "6",
        T,
        |e| matches!(e, Event::Message { data, .. } if data["n"] == 6),
    )
    .await;
    // Only `late` came back after the reconnect: nothing of `news` since leaving it.
    assert_eq!(c.ns(), [2, 3, 6]);
    assert_eq!(c.resumes().len(), 1);
    c.client.close();
    c.read_to_end(T).await;
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_browser_module_is_served_with_the_cors_of_sse() {
    let s = start(|c| c.limits.allowed_origins = vec!["http://app.test".into()]).await;
    let http = reqwest::Client::new();
    let get = |path: &str, origin: &str| {
        http.get(format!("http://{}{path}", s.client))
            .header("origin", origin)
            .send()
    };
    let js = get("/client/tether.js", "http://app.test").await.unwrap();
    assert_eq!(js.status(), 200);
    let h = js.headers().clone();
    assert!(h["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    assert_eq!(h["access-control-allow-origin"], "http://app.test");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["vary"], "Origin");
    let body = js.text().await.unwrap();
    assert!(body.contains("export class TetherClient"));
    assert_eq!(body, include_str!("../../../../clients/js/tether.js"));
    let sse = get("/sse?channel=x&client=cors", "http://app.test")
        .await
        .unwrap();
    assert_eq!(
        sse.headers()["access-control-allow-origin"],
        h["access-control-allow-origin"],
        "the same answer as /sse"
    );
    drop(sse);
    let other = get("/client/tether.d.ts", "http://evil.test")
        .await
        .unwrap();
    assert!(other.headers()["content-type"]
        .to_str()
        .unwrap()
        .contains("typescript"));
    assert!(other.headers().get("access-control-allow-origin").is_none());
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sdk_tether_connect_exits_0_when_replaced_and_stays_down() {
    let s = start(|c| {
        c.clients.max_connections_per_client = 1.try_into().unwrap();
        c.clients.on_client_limit = tether_core::ClientLimitPolicy::ReplaceOldest;
    })
    .await;
    let url = s.ws_url("");
    let mut p = ConnectProc::spawn(&[&url, "--client", "tab", "--channel", "news"]);
    p.until("connected", |v| v["state"] == "connected").await;
    // A newer connection of the same client replaces it (4001): the old one must not
    // fight back.
    let (newer, _) = s.ws("?client=tab").await;
    let (lines, code) = p.finish().await;
    assert_eq!(code, 0, "{lines:#?}");
    let d = lines.iter().find(|v| v["state"] == "disconnected").unwrap();
    assert_eq!(d["code"], 4001);
    assert_eq!(lines.last().unwrap()["state"], "closed");
    assert!(!lines.iter().any(|v| v["state"] == "reconnecting"));
    client_close(newer).await;
    s.assert_clean().await;
}

/// `wss://`: the client verifies the server's certificate (its own CA given with
/// `tls_config`; an untrusted one is a failed attempt, never a silent downgrade).
#[tokio::test(flavor = "multi_thread")]
async fn sdk_wss_with_a_trusted_certificate_and_refused_without() {
    let ck =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let dir = std::env::temp_dir().join(format!("tether-sdk-wss-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let mut s = start(|c| {
        c.tls.cert_file = cert.display().to_string();
        c.tls.key_file = key.display().to_string();
    })
    .await;
    s.http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ck.cert.pem().as_bytes()).unwrap())
        .build()
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let url = format!("wss://localhost:{}/ws", s.client.port());
    let mut c = Rec::new(
        client(&url, "secure")
            .tls_config(Arc::new(tls))
            .connect()
            .unwrap(),
    );
    c.until("subscribed", T, |e| matches!(e, Event::Subscribed { .. }))
        .await;
    publish(&s, 1).await;
    c.until(
        "1",
        T,
        |e| matches!(e, Event::Message { data, .. } if data["n"] == 1),
    )
    .await;
    c.client.close();
    c.read_to_end(T).await;

    // The same server without trusting its certificate: the attempt fails.
    let mut roots = rustls::RootCertStore::empty();
    let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    roots.add(other.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let wrong = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut c = Rec::new(
        client(&url, "untrusting")
            .tls_config(Arc::new(wrong))
            .failure_cap(1)
            .connect()
            .unwrap(),
    );
    let closed = c.state(State::Closed, T).await;
    assert!(closed.fatal);
    assert_eq!(c.client.stats().failures.get("connect"), Some(&1));
    c.read_to_end(T).await;
    s.assert_clean().await;
    let _ = std::fs::remove_dir_all(&dir);
}
