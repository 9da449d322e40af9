//! The real binary: drain on SIGTERM, exit codes, the config commands.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

const BIN: &str = env!("CARGO_BIN_EXE_tether");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    Child(cmd.spawn().unwrap())
}

async fn wait_ready(http: &reqwest::Client, api: &str) {
    for _ in 0..200 {
        if let Ok(r) = http.get(format!("{api}/readyz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("server did not become ready");
}

/// Reads a client until its close: (when the closing frame came, closing, code).
async fn watch(url: String) -> (Instant, Value, u16) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut closing = (Instant::now(), Value::Null);
    while let Some(Ok(msg)) = ws.next().await {
        match msg {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                if v["type"] == "closing" {
                    closing = (Instant::now(), v);
                }
            }
            Message::Close(f) => {
                return (
                    closing.0,
                    closing.1,
                    f.map(|f| u16::from(f.code)).unwrap_or(1005),
                )
            }
            _ => {}
        }
    }
    panic!("no close frame");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_spread_over_the_window_and_exits_zero() {
    let (p, q) = (free_port(), free_port());
    let listen = format!("127.0.0.1:{p}");
    let api_listen = format!("127.0.0.1:{q}");
    let mut child = spawn(
        &["serve", "--listen", &listen, "--api-listen", &api_listen],
        &[
            ("TETHER_SHUTDOWN__PRE_DRAIN_MS", "800"),
            ("TETHER_SHUTDOWN__DRAIN_WINDOW_MS", "1500"),
            ("TETHER_SHUTDOWN__TIMEOUT_MS", "10000"),
        ],
    );
    let http = reqwest::Client::new();
    let api = format!("http://{api_listen}");
    wait_ready(&http, &api).await;
    let mut watchers = Vec::new();
    for i in 0..10 {
        watchers.push(tokio::spawn(watch(format!("ws://{listen}/ws?client=d{i}"))));
    }
    while http
        .get(format!("{api}/api/stats"))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["connections"]["ws"]
        != 10
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap()
        .success());
    let signalled = Instant::now();
    // Not ready at once ...
    let mut not_ready = false;
    for _ in 0..20 {
        if http
            .get(format!("{api}/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            == 503
        {
            not_ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(not_ready && signalled.elapsed() < Duration::from_millis(500));
    // ... but still admitting during pre-drain.
    watchers.push(tokio::spawn(watch(format!("ws://{listen}/ws?client=late"))));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stats: Value = http
        .get(format!("{api}/api/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["connections"]["ws"], 11);
    assert_eq!(stats["draining"], true);
    // After pre-drain, refused.
    tokio::time::sleep(Duration::from_millis(900).saturating_sub(signalled.elapsed())).await;
    match tokio_tungstenite::connect_async(format!("ws://{listen}/ws?client=toolate")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status().as_u16(), 503),
        other => panic!("expected 503 draining, got {:?}", other.map(|_| ())),
    }
    let mut times = Vec::new();
    for w in watchers {
        let (at, closing, code) = w.await.unwrap();
        assert_eq!(code, 1001);
        assert_eq!(closing["code"], 1001);
        assert_eq!(closing["reconnect"], true);
        assert!(closing["retry_ms"].as_u64().is_some(), "{closing}");
        times.push(at);
    }
    times.sort();
    let spread = *times.last().unwrap() - times[0];
    assert!(
        spread >= Duration::from_millis(900),
        "closes spread over the 1.5 s window, got {spread:?}"
    );
    let status = tokio::task::spawn_blocking(move || child.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(signalled.elapsed() < Duration::from_secs(8));
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_deadline_closes_the_rest_hard() {
    let (p, q) = (free_port(), free_port());
    let listen = format!("127.0.0.1:{p}");
    let api_listen = format!("127.0.0.1:{q}");
    let mut child = spawn(
        &["serve", "--listen", &listen, "--api-listen", &api_listen],
        &[
            ("TETHER_SHUTDOWN__PRE_DRAIN_MS", "0"),
            ("TETHER_SHUTDOWN__DRAIN_WINDOW_MS", "60000"),
            ("TETHER_SHUTDOWN__TIMEOUT_MS", "1000"),
        ],
    );
    let http = reqwest::Client::new();
    wait_ready(&http, &format!("http://{api_listen}")).await;
    let mut conns = Vec::new();
    for i in 0..5 {
        conns.push(
            tokio_tungstenite::connect_async(format!("ws://{listen}/ws?client=h{i}"))
                .await
                .unwrap()
                .0,
        );
    }
    let started = Instant::now();
    assert!(Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = tokio::task::spawn_blocking(move || child.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "{took:?}"
    );
}

#[test]
fn config_default_prints_a_valid_commented_config() {
    let out = Command::new(BIN)
        .args(["config", "default"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().filter(|l| l.starts_with('#')).count() > 20);
    let cfg = tether_server::config::Config::from_toml("stdout", &text).unwrap();
    assert_eq!(cfg, tether_server::config::Config::default());
}

#[test]
fn config_check_names_the_line_and_key() {
    let dir = std::env::temp_dir().join(format!("tether-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "listen = \"127.0.0.1:7700\"\n\n[limits]\nmax_conections = 5\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["config", "check", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("line 4") && err.contains("max_conections"),
        "{err}"
    );
    let good = dir.join("good.toml");
    std::fs::write(&good, "[heartbeat]\ninterval_ms = 1000\n").unwrap();
    let out = Command::new(BIN)
        .args(["config", "check", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    // serve refuses the bad file the same way, before binding.
    let out = Command::new(BIN)
        .args(["serve", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_conections"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn auth_none_refuses_a_public_listener_unless_allowed() {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--api-listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("allow_insecure"));
}

#[test]
fn a_keyless_api_refuses_a_public_listener() {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "0.0.0.0:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no key"));
    let keyed = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--api-listen",
            "0.0.0.0:0",
        ])
        .env("TETHER_API__KEY", "k")
        .env("TETHER_SHUTDOWN__PRE_DRAIN_MS", "0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // With a key it starts (and is stopped here: it would run until signalled).
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut keyed = keyed;
    assert!(
        keyed.try_wait().unwrap().is_none(),
        "a keyed public API starts"
    );
    let _ = keyed.kill();
    let _ = keyed.wait();
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_tether_variable_is_a_warning_not_an_error() {
    let (p, q) = (free_port(), free_port());
    let api = format!("127.0.0.1:{q}");
    let mut child = spawn(
        &[
            "serve",
            "--listen",
            &format!("127.0.0.1:{p}"),
            "--api-listen",
            &api,
        ],
        &[
            ("TETHER_PORT", "80"),
            ("TETHER_SHUTDOWN__PRE_DRAIN_MS", "0"),
        ],
    );
    let http = reqwest::Client::new();
    wait_ready(&http, &format!("http://{api}")).await;
    assert!(Command::new("kill")
        .args(["-INT", &child.0.id().to_string()])
        .status()
        .unwrap()
        .success());
    let out = tokio::task::spawn_blocking(move || {
        let mut err = String::new();
        use std::io::Read;
        let _ = child.0.stderr.take().unwrap().read_to_string(&mut err);
        (child.0.wait().unwrap(), err)
    })
    .await
    .unwrap();
    assert_eq!(out.0.code(), Some(0));
    assert!(
        out.1.contains("TETHER_PORT") && out.1.contains("WARN"),
        "{}",
        out.1
    );
}
