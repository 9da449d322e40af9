//! Real Redis servers for tests (feature `testing`): Debian's `redis-server`,
//! started on a free loopback port with persistence off, stopped (SIGKILL) when
//! dropped. A single server can be killed and started again on the same port, with
//! or without its data; [`RedisCluster`] starts shards with `--cluster-enabled yes`
//! and joins them with `redis-cli --cluster create`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a test Redis could not be started.
#[derive(Debug, thiserror::Error)]
pub enum TestRedisError {
    /// Spawning `redis-server` or `redis-cli` failed (not installed?).
    #[error("{what}: {source}")]
    Spawn {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// It did not answer in time.
    #[error("redis on port {0} did not start")]
    NotReady(u16),
    /// `redis-cli --cluster create` failed.
    #[error("cluster create failed: {0}")]
    Cluster(String),
}

/// One `redis-server` process on a loopback port.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    cluster: bool,
}

impl RedisServer {
    /// Starts a server on a free port, persistence off.
    pub fn start() -> Result<Self, TestRedisError> {
        Self::start_on(free_port(), false)
    }

    fn start_on(port: u16, cluster: bool) -> Result<Self, TestRedisError> {
        let dir = std::env::temp_dir().join(format!("tether-redis-{}-{port}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let mut s = RedisServer {
            port,
            dir,
            child: None,
            cluster,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<(), TestRedisError> {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if self.cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(self.dir.join("nodes.conf"));
        }
        let child = cmd.spawn().map_err(|source| TestRedisError::Spawn {
            what: "redis-server",
            source,
        })?;
        self.child = Some(child);
        wait_ping(self.port)
    }

    /// Its process id while it runs (to pause it with SIGSTOP in a test).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// SIGKILLs it (its data is gone: persistence is off).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty (a Redis that lost its data).
    pub fn restart_empty(&mut self) -> Result<(), TestRedisError> {
        self.kill();
        self.spawn()
    }

    /// Runs `redis-cli` against it and returns its output.
    pub fn cli(&self, args: &[&str]) -> Result<String, TestRedisError> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .map_err(|source| TestRedisError::Spawn {
                what: "redis-cli",
                source,
            })?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of `n` primaries (no replicas) on loopback ports.
#[derive(Debug)]
pub struct RedisCluster {
    /// The shards.
    pub shards: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `n` (at least 3) cluster-enabled servers and joins them.
    pub fn start(n: usize) -> Result<Self, TestRedisError> {
        let shards = (0..n)
            .map(|_| RedisServer::start_on(free_port(), true))
            .collect::<Result<Vec<_>, _>>()?;
        let addrs: Vec<String> = shards
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .map_err(|source| TestRedisError::Spawn {
                what: "redis-cli --cluster create",
                source,
            })?;
        if !out.status.success() {
            return Err(TestRedisError::Cluster(
                String::from_utf8_lossy(&out.stdout).into_owned(),
            ));
        }
        let c = RedisCluster { shards };
        c.wait_ok()?;
        Ok(c)
    }

    /// The seeds, comma-separated, as `broker.url` takes them.
    pub fn url(&self) -> String {
        self.shards
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    fn wait_ok(&self) -> Result<(), TestRedisError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let all_ok = self.shards.iter().all(|s| {
                s.cli(&["cluster", "info"])
                    .is_ok_and(|i| i.contains("cluster_state:ok"))
            });
            if all_ok {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(TestRedisError::Cluster(
            "cluster_state never became ok".into(),
        ))
    }
}

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

fn wait_ping(port: u16) -> Result<(), TestRedisError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let ok = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "ping"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "PONG");
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(TestRedisError::NotReady(port))
}
