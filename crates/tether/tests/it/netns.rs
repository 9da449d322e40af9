//! A proxy leg that goes half-open or is reset, across a real network: the upstream
//! runs in a network namespace this test creates (veth pair, addresses of its own),
//! and nftables blackholes (`drop`) or resets (`reject with tcp reset`) that leg.
//! Needs root, `ip` (iproute2) and `nft` (nftables); `scripts/test.sh` installs them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;
use tether_server::config::ProxyRoute;

/// A namespace with one veth pair; removed (with everything in it) on drop.
struct Netns {
    name: String,
    host_if: String,
    upstream: Option<Child>,
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    fn new(tag: &str, subnet: u8) -> Netns {
        let name = format!("tth{tag}{}", std::process::id() % 100_000);
        let host_if = format!("vh{tag}{}", std::process::id() % 100_000);
        let peer_if = format!("vp{tag}{}", std::process::id() % 100_000);
        let ns = Netns {
            name: name.clone(),
            host_if: host_if.clone(),
            upstream: None,
        };
        run(&["ip", "netns", "add", &name]);
        run(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if,
        ]);
        run(&["ip", "link", "set", &peer_if, "netns", &name]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("10.231.{subnet}.1/24"),
            "dev",
            &host_if,
        ]);
        run(&["ip", "link", "set", &host_if, "up"]);
        run(&[
            "ip",
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            &format!("10.231.{subnet}.2/24"),
            "dev",
            &peer_if,
        ]);
        run(&[
            "ip", "netns", "exec", &name, "ip", "link", "set", &peer_if, "up",
        ]);
        run(&[
            "ip", "netns", "exec", &name, "ip", "link", "set", "lo", "up",
        ]);
        ns
    }

    /// Starts a `tether` inside the namespace as the upstream; returns its address.
    fn start_upstream(&mut self, subnet: u8) -> String {
        let addr = format!("10.231.{subnet}.2:7700");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                env!("CARGO_BIN_EXE_tether"),
                "serve",
                "--listen",
                &addr,
                "--api-listen",
                "127.0.0.1:7701",
            ])
            .env("TETHER_AUTH__ALLOW_INSECURE", "true")
            .env("TETHER_HEARTBEAT__INTERVAL_MS", "600000")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.upstream = Some(child);
        addr
    }

    /// Adds an nftables rule on the upstream's input for its port.
    fn filter(&self, verdict: &str) {
        let nft = |args: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", &self.name, "nft"];
            all.extend_from_slice(args);
            run(&all);
        };
        nft(&["add", "table", "inet", "tether_test"]);
        nft(&[
            "add",
            "chain",
            "inet",
            "tether_test",
            "input",
            "{ type filter hook input priority 0; policy accept; }",
        ]);
        let mut rule = vec![
            "add",
            "rule",
            "inet",
            "tether_test",
            "input",
            "tcp",
            "dport",
            "7700",
        ];
        rule.extend(verdict.split(' '));
        nft(&rule);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(mut c) = self.upstream.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

async fn wait_listening(addr: &str) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("upstream {addr} did not start");
}

/// Whether this process may make network namespaces: root, with `ip` and `nft`.
/// Without them the netns tests skip (saying so) instead of failing.
fn can_make_namespaces() -> bool {
    let out = |cmd: &str, args: &[&str]| {
        Command::new(cmd)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
    };
    let root = out("id", &["-u"]).is_some_and(|o| o.stdout.trim_ascii() == b"0");
    let tools = out("ip", &["-V"]).is_some() && out("nft", &["--version"]).is_some();
    if !(root && tools) {
        eprintln!(
            "SKIPPED: needs root, ip (iproute2) and nft (nftables); scripts/test.sh installs them"
        );
    }
    root && tools
}

async fn half_open_case(tag: &str, subnet: u8, verdict: &str) -> (Duration, bool) {
    let mut ns = Netns::new(tag, subnet);
    let upstream = ns.start_upstream(subnet);
    wait_listening(&upstream).await;
    let s = start(|c| {
        // The client leg must answer its pings in time even on a loaded machine, so
        // the timeout is generous; detection still takes seconds, not TCP minutes.
        c.heartbeat.interval_ms = 500.try_into().unwrap();
        c.heartbeat.timeout_ms = 1500.try_into().unwrap();
        c.proxy.routes = vec![ProxyRoute {
            path: "/chat".into(),
            upstream: format!("ws://{upstream}/ws"),
            connect_timeout_ms: 2000.try_into().unwrap(),
            upstream_idle_timeout_ms: 0,
        }];
    })
    .await;
    let mut events = s.app.registry.events().subscribe();
    // A real client that keeps reading, so it answers the proxy's pings: only the
    // upstream leg is under test.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/chat?client=edge", s.client))
            .await
            .unwrap();
    let first = tokio::time::timeout(
        Duration::from_secs(5),
        futures_util::StreamExt::next(&mut ws),
    )
    .await
    .unwrap();
    assert!(format!("{first:?}").contains("welcome"), "{first:?}");
    ns.filter(verdict);
    let cut = Instant::now();
    let reader = tokio::spawn(async move {
        // The relay ends the client's leg: tungstenite reports the close (it treats
        // 1014 itself as a protocol error, so the code is read from the event below).
        while let Ok(Some(Ok(_))) = tokio::time::timeout(
            Duration::from_secs(10),
            futures_util::StreamExt::next(&mut ws),
        )
        .await
        {}
        Instant::now()
    });
    let ended = reader.await.unwrap();
    let took = ended.duration_since(cut);
    let ev = collect_events(&mut events, Duration::from_millis(300)).await;
    let closed = ev
        .iter()
        .find(|e| e.kind == tether_protocol::EventType::ConnectionClosed)
        .expect("closed");
    let ok = closed.code == Some(1014);
    if !ok {
        eprintln!("closed with {:?} ({:?})", closed.code, closed.reason);
    }
    s.assert_clean().await;
    (took, ok)
}

#[tokio::test(flavor = "multi_thread")]
async fn blackholed_upstream_leg_is_found_by_heartbeat() {
    if !can_make_namespaces() {
        return;
    }
    let (took, ok) = half_open_case("d", 41, "drop").await;
    assert!(ok, "client closed with 1014");
    // interval + timeout = 2 s; bounded well below any TCP retransmission timeout.
    assert!(took < Duration::from_secs(6), "{took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reset_upstream_leg_closes_the_client() {
    if !can_make_namespaces() {
        return;
    }
    let (took, ok) = half_open_case("r", 42, "reject with tcp reset").await;
    assert!(ok, "client closed with 1014");
    assert!(took < Duration::from_secs(6), "{took:?}");
}
