//! Chaos in cluster mode (issue 15): three real `tether serve` processes on one real
//! Redis, clients hopping between nodes with `since` while a publisher sends
//! numbered messages; one node is SIGKILLed, Redis is bounced (it comes back empty:
//! a new epoch), one node is drained with SIGTERM, and a fresh node joins. Seeded and
//! bounded (about 20 s). Afterwards: no client saw a message twice, no client missed
//! one without being told (`recovered: false`), every client's final resume is
//! complete, every node still running is back to zero connections, and the webhooks
//! of every node together told each client's sessions exactly: `client.online` and
//! `client.offline` alternate, one of each per session (SPEC section 3).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde_json::{json, Value};
use tether_redis::testing::{free_port, RedisServer};
use tokio::time::{sleep, timeout, Instant};
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_tether");
const CHANNEL: &str = "chaos";
const CLIENTS: usize = 6;

/// One node: the process and its ports.
struct Node {
    child: Option<std::process::Child>,
    client: u16,
    api: u16,
}

impl Node {
    fn spawn(name: &str, redis: &str, hook: &str) -> Node {
        let (client, api) = (free_port(), free_port());
        let mut child = Command::new(BIN);
        child
            .args(["serve", "--node-id", name])
            .args(["--listen", &format!("127.0.0.1:{client}")])
            .args(["--api-listen", &format!("127.0.0.1:{api}")])
            .env("TETHER_BROKER__KIND", "redis")
            .env("TETHER_BROKER__URL", redis)
            .env("TETHER_BROKER__NODE_TTL_MS", "3000")
            .env("TETHER_BROKER__COMMAND_TIMEOUT_MS", "500")
            .env("TETHER_SHUTDOWN__PRE_DRAIN_MS", "0")
            .env("TETHER_SHUTDOWN__DRAIN_WINDOW_MS", "500")
            .env("TETHER_SHUTDOWN__TIMEOUT_MS", "3000")
            .env("TETHER_WEBHOOKS__URL", hook)
            .env("TETHER_WEBHOOKS__SECRET", "chaos")
            .stdout(Stdio::null());
        // TETHER_CHAOS_LOGS=<dir>: each node's log (at info) in <dir>/<node>.log.
        let child = match std::env::var("TETHER_CHAOS_LOGS") {
            Ok(dir) => {
                let log = std::fs::File::create(format!("{dir}/{name}.log")).unwrap();
                child.env("TETHER_LOG__LEVEL", "info").stderr(log)
            }
            Err(_) => child.env("TETHER_LOG__LEVEL", "warn").stderr(Stdio::null()),
        }
        .spawn()
        .unwrap();
        Node {
            child: Some(child),
            client,
            api,
        }
    }

    fn signal(&mut self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    /// Waits for a drained node's exit code.
    fn wait(&mut self) -> Option<i32> {
        self.child.take().and_then(|mut c| c.wait().ok()?.code())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The nodes clients and the publisher may use now (client port, API port), and
/// the node about to be killed, whose sessions stay open until it dies (so that no
/// transition of its is in flight, in its webhook queue, when it is killed).
#[derive(Default)]
struct Live(Mutex<Vec<(u16, u16)>>, std::sync::atomic::AtomicU16);

impl Live {
    fn pick(&self, rng: &mut fastrand::Rng) -> Option<(u16, u16)> {
        let l = self.0.lock();
        (!l.is_empty()).then(|| l[rng.usize(..l.len())])
    }
    fn set(&self, nodes: &[&Node]) {
        *self.0.lock() = nodes.iter().map(|n| (n.client, n.api)).collect();
    }
    fn freeze(&self, node: &Node) {
        self.1.store(node.client, Ordering::Release);
    }
    fn frozen(&self, port: u16) -> bool {
        self.1.load(Ordering::Acquire) == port
    }
}

/// What one client saw.
#[derive(Default, Debug)]
struct Seen {
    numbers: HashSet<u64>,
    last: Option<u64>,
    position: Option<String>,
    duplicates: Vec<u64>,
    unreported_gaps: Vec<(u64, u64)>,
    reported_gaps: u32,
    sessions: u32,
}

impl Seen {
    /// A message `n` at `position`; `continuing` when no gap may precede it.
    fn message(&mut self, n: u64, position: &str, continuing: bool) {
        if !self.numbers.insert(n) {
            self.duplicates.push(n);
        }
        if let (true, Some(last)) = (continuing, self.last) {
            if n != last + 1 {
                self.unreported_gaps.push((last, n));
            }
        }
        self.last = Some(n);
        self.position = Some(position.to_owned());
    }
}

/// One `client.*` event: `at`, type, node.
type Told = (String, String, String);

/// Every node's webhooks: the `client.*` events received, by event id (a batch sent
/// again carries the same ids).
#[derive(Clone, Default)]
struct Hooks(Arc<Mutex<std::collections::BTreeMap<String, Value>>>);

impl Hooks {
    /// Starts the receiver; its URL.
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let hooks = self.clone();
        let router = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |body: axum::body::Bytes| async move {
                let v: Value = serde_json::from_slice(&body).unwrap();
                let mut events = hooks.0.lock();
                for e in v["events"].as_array().unwrap() {
                    events.insert(e["id"].as_str().unwrap().to_owned(), e.clone());
                }
                axum::http::StatusCode::OK
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        url
    }

    /// `client`'s online/offline events in time order (an offline first on a tie).
    fn of(&self, client: &str) -> Vec<Told> {
        let mut out: Vec<Told> = self
            .0
            .lock()
            .values()
            .filter(|e| e["client_id"] == client)
            .map(|e| {
                let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
                (s("at"), s("type"), s("node_id"))
            })
            .collect();
        let key = |e: &Told| (e.0.clone(), e.1 == "client.online");
        out.sort_by_key(key);
        out
    }
}

/// Whether `events` alternate online, offline, …, ending offline. Each node stamps
/// its own events (SPEC 3): an offline on one node and the next session's online on
/// another, one right after the other in Redis, can carry times a millisecond or two
/// apart the other way. So two adjacent events of different nodes within 5 ms may
/// swap; nothing else may.
fn alternates(events: &[Told]) -> bool {
    let mut ev = events.to_vec();
    for i in 0..ev.len() {
        let want = if i % 2 == 0 {
            "client.online"
        } else {
            "client.offline"
        };
        if ev[i].1 == want {
            continue;
        }
        let swappable = ev.get(i + 1).is_some_and(|next| {
            next.1 == want && next.2 != ev[i].2 && ms_of(&next.0) - ms_of(&ev[i].0) <= 5
        });
        if !swappable {
            return false;
        }
        ev.swap(i, i + 1);
    }
    ev.len().is_multiple_of(2)
}

/// Milliseconds into the day of an RFC 3339 time (`…T01:59:17.982Z`).
fn ms_of(at: &str) -> i64 {
    let clock = at
        .split_once('T')
        .map_or("", |(_, c)| c.trim_end_matches('Z'));
    let mut parts = clock.split(':');
    let mut field = || {
        parts
            .next()
            .and_then(|p| p.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let (h, m, s) = (field(), field(), field());
    ((h * 3600.0 + m * 60.0 + s) * 1000.0).round() as i64
}

/// Waits until every client's events alternate and end offline (the last offlines
/// come after `node_ttl` for a node that died or a Redis that lost its data).
async fn sessions_told_exactly(hooks: &Hooks) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let bad: Vec<(usize, Vec<Told>)> = (0..CLIENTS)
            .map(|i| (i, hooks.of(&format!("chaos-{i}"))))
            .filter(|(_, e)| !alternates(e))
            .collect();
        if bad.is_empty() {
            let n: usize = (0..CLIENTS)
                .map(|i| hooks.of(&format!("chaos-{i}")).len())
                .sum();
            eprintln!("chaos: {n} client.online/offline events, every session told once");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sessions not told exactly: {bad:#?}"
        );
        sleep(Duration::from_millis(100)).await;
    }
}

async fn api_ready(http: &reqwest::Client, api: u16) -> bool {
    http.get(format!("http://127.0.0.1:{api}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
}

async fn wait_ready(http: &reqwest::Client, api: u16) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !api_ready(http, api).await {
        assert!(
            Instant::now() < deadline,
            "node on {api} never became ready"
        );
        sleep(Duration::from_millis(50)).await;
    }
}

/// One session: connect, subscribe with `since`, read for `hold` (on a frozen node,
/// until it dies), close. Returns false when the node was not reachable (the caller
/// hops).
async fn session(
    port: u16,
    id: usize,
    seen: &Mutex<Seen>,
    hold: Duration,
    live: Option<&Live>,
) -> bool {
    let url = format!("ws://127.0.0.1:{port}/ws?client=chaos-{id}");
    let Ok(Ok((mut ws, _))) = timeout(
        Duration::from_secs(2),
        tokio_tungstenite::connect_async(url),
    )
    .await
    else {
        return false;
    };
    let since = seen.lock().position.clone();
    let sub = json!({"type": "subscribe", "channel": CHANNEL, "since": since});
    if ws.send(Message::text(sub.to_string())).await.is_err() {
        return false;
    }
    let mut continuing = false;
    let mut until = Instant::now() + hold;
    loop {
        let frame = match timeout(until.saturating_duration_since(Instant::now()), ws.next()).await
        {
            Err(_) if live.is_some_and(|l| l.frozen(port)) => {
                until = Instant::now() + hold;
                continue;
            }
            Err(_) => break, // held long enough
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(_))) => continue,
            Ok(_) => return true, // closed by the node (drain, kill): hop
        };
        let v: Value = serde_json::from_str(frame.as_str()).unwrap();
        match v["type"].as_str() {
            Some("subscribed") => {
                let mut s = seen.lock();
                s.sessions += 1;
                continuing = v["recovered"] == true || s.position.is_none();
                if v["recovered"] == false && s.position.is_some() {
                    s.reported_gaps += 1;
                }
            }
            Some("message") => {
                let n = v["data"]["n"].as_u64().unwrap();
                let pos = v["position"].as_str().unwrap();
                seen.lock().message(n, pos, continuing);
                continuing = true;
            }
            Some("error") => return true, // e.g. broker_unavailable while Redis is away
            _ => {}
        }
    }
    let _ = ws.close(None).await;
    while let Ok(Some(Ok(_))) = timeout(Duration::from_secs(1), ws.next()).await {}
    true
}

/// Publishes 1, 2, … through any live node, each number until accepted (the
/// idempotency key makes a retry after an ambiguous failure harmless).
/// `retried` collects the numbers whose first attempt failed: when Redis died under
/// one, it may have been published all the same, and the retry after Redis came back
/// empty (its idempotency keys gone with it) publishes it again. Those numbers may
/// arrive twice; no other may.
async fn publisher(
    live: Arc<Live>,
    stop: Arc<AtomicBool>,
    published: Arc<AtomicU64>,
    retried: Arc<Mutex<HashSet<u64>>>,
    seed: u64,
) {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut n = 1u64;
    while !stop.load(Ordering::Acquire) {
        let Some((_, api)) = live.pick(&mut rng) else {
            sleep(Duration::from_millis(50)).await;
            continue;
        };
        let body =
            json!({"channel": CHANNEL, "data": {"n": n}, "idempotency_key": format!("n-{n}")});
        let ok = http
            .post(format!("http://127.0.0.1:{api}/api/publish"))
            .json(&body)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if ok {
            published.store(n, Ordering::Release);
            n += 1;
        } else {
            retried.lock().insert(n);
        }
        sleep(Duration::from_millis(40)).await;
    }
}

async fn client(
    id: usize,
    live: Arc<Live>,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    seed: u64,
) {
    let mut rng = fastrand::Rng::with_seed(seed);
    while !stop.load(Ordering::Acquire) {
        let Some((port, _)) = live.pick(&mut rng) else {
            sleep(Duration::from_millis(50)).await;
            continue;
        };
        let hold = Duration::from_millis(rng.u64(200..1500));
        if !session(port, id, &seen, hold, Some(&live)).await {
            sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The final resume: on a settled cluster, from the last position each client saw,
/// everything published since arrives and is reported recovered.
async fn final_catch_up(port: u16, id: usize, seen: &Mutex<Seen>, last_published: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().last != Some(last_published) {
        assert!(Instant::now() < deadline, "client {id}: {:?}", seen.lock());
        let before = seen.lock().reported_gaps;
        session(port, id, seen, Duration::from_millis(500), None).await;
        assert_eq!(
            seen.lock().reported_gaps,
            before,
            "client {id}: the final resume is recovered"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_hop_through_a_kill_a_bounce_and_a_drain_and_lose_nothing_unreported() {
    let seed: u64 = std::env::var("TETHER_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x7e7e_7e7e);
    let mut redis = RedisServer::start().unwrap();
    let http = reqwest::Client::new();
    let hooks = Hooks::default();
    let hook = hooks.start().await;
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| Node::spawn(&format!("chaos-{i}"), &redis.url(), &hook))
        .collect();
    for n in &nodes {
        wait_ready(&http, n.api).await;
    }
    let live = Arc::new(Live::default());
    live.set(&nodes.iter().collect::<Vec<_>>());
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let seens: Vec<Arc<Mutex<Seen>>> = (0..CLIENTS).map(|_| Arc::default()).collect();
    let retried = Arc::new(Mutex::new(HashSet::new()));
    let mut tasks = vec![tokio::spawn(publisher(
        live.clone(),
        stop.clone(),
        published.clone(),
        retried.clone(),
        seed,
    ))];
    for (i, s) in seens.iter().enumerate() {
        tasks.push(tokio::spawn(client(
            i,
            live.clone(),
            stop.clone(),
            s.clone(),
            seed + 1 + i as u64,
        )));
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    let beat = |rng: &mut fastrand::Rng| Duration::from_millis(2500 + rng.u64(..1000));
    // 1. SIGKILL node 0, unannounced, with clients on it; a fresh node joins. Its
    // sessions stay open from 300 ms before the kill, and no new one starts there:
    // a killed process loses the webhooks still in its queue (batch_ms), so no
    // transition of its may be in flight then. Its clients' offlines come from the
    // survivor that removes it.
    sleep(beat(&mut rng)).await;
    live.freeze(&nodes[0]);
    live.set(&[&nodes[1], &nodes[2]]);
    sleep(Duration::from_millis(300)).await;
    nodes[0].signal("-KILL");
    nodes.push(Node::spawn("chaos-3", &redis.url(), &hook));
    wait_ready(&http, nodes[3].api).await;
    live.set(&[&nodes[1], &nodes[2], &nodes[3]]);
    // 2. Redis bounced: it comes back empty (persistence is off), a new epoch.
    sleep(beat(&mut rng)).await;
    redis.restart_empty().unwrap();
    for n in &nodes[1..] {
        wait_ready(&http, n.api).await;
    }
    // 3. SIGTERM node 1: a drain; it exits 0.
    sleep(beat(&mut rng)).await;
    live.set(&[&nodes[2], &nodes[3]]);
    nodes[1].signal("-TERM");
    let drained = tokio::task::spawn_blocking({
        let mut n1 = std::mem::replace(
            &mut nodes[1],
            Node {
                child: None,
                client: 0,
                api: 0,
            },
        );
        move || n1.wait()
    });
    sleep(beat(&mut rng)).await;
    stop.store(true, Ordering::Release);
    for t in tasks {
        timeout(Duration::from_secs(10), t)
            .await
            .expect("tasks end")
            .unwrap();
    }
    assert_eq!(drained.await.unwrap(), Some(0), "a drained node exits 0");
    let last = published.load(Ordering::Acquire);
    assert!(
        last > 100,
        "the publisher kept going through the chaos: {last}"
    );
    for (i, s) in seens.iter().enumerate() {
        final_catch_up(nodes[2 + i % 2].client, i, s, last).await;
        let s = s.lock();
        let retried = retried.lock();
        let dups: Vec<_> = s
            .duplicates
            .iter()
            .filter(|n| !retried.contains(n))
            .collect();
        assert!(dups.is_empty(), "client {i} saw duplicates: {dups:?}");
        assert!(
            s.unreported_gaps.is_empty(),
            "client {i} lost messages silently: {:?}",
            s.unreported_gaps
        );
        assert!(
            s.sessions >= 3,
            "client {i} hopped: {} sessions",
            s.sessions
        );
    }
    for (i, s) in seens.iter().enumerate() {
        let s = s.lock();
        eprintln!(
            "chaos seed {seed:#x}: client {i}: {} sessions, {} messages, {} reported gaps, last {:?} of {last}",
            s.sessions,
            s.numbers.len(),
            s.reported_gaps,
            s.last
        );
    }
    // Every node still running is back to zero connections.
    for n in &nodes[2..] {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stats: Value = http
                .get(format!("http://127.0.0.1:{}/api/stats", n.api))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let open: u64 = ["ws", "sse", "proxy"]
                .iter()
                .map(|t| stats["connections"][t].as_u64().unwrap())
                .sum();
            if open == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {} still holds {open}",
                n.api
            );
            sleep(Duration::from_millis(50)).await;
        }
    }
    sessions_told_exactly(&hooks).await;
}
