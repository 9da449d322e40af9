//! Real Redis servers for tests (feature `testing`): Debian's `redis-server`,
//! started on a free loopback port with persistence off, stopped (SIGKILL) when
//! dropped. A single server can be killed and started again on the same port, with
//! or without its data; [`RedisCluster`] starts shards with `--cluster-enabled yes`
//! (and what SPEC section 10's "a shard that is down affects only what lives on it"
//! needs: `cluster-require-full-coverage no`, with a short `cluster-node-timeout`)
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

/// The test shards' `cluster-node-timeout`: how long before the others mark a
/// killed shard as failed.
pub const CLUSTER_NODE_TIMEOUT_MS: u64 = 1000;

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
                .arg(self.dir.join("nodes.conf"))
                .args([
                    "--cluster-node-timeout",
                    &CLUSTER_NODE_TIMEOUT_MS.to_string(),
                ])
                .args(["--cluster-require-full-coverage", "no"]);
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

    /// Starts it again on the same port, empty (a Redis that lost its data). A
    /// cluster shard keeps its cluster config file, so it rejoins its cluster with
    /// its slots (and no keys).
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

/// A Redis Cluster of `n` primaries (and `replicas` per primary) on loopback ports.
#[derive(Debug)]
pub struct RedisCluster {
    /// The servers (without replicas, each one a shard's primary).
    pub shards: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `n` (at least 3) cluster-enabled servers and joins them.
    pub fn start(n: usize) -> Result<Self, TestRedisError> {
        Self::start_with_replicas(n, 0)
    }

    /// Starts `n` primaries and `replicas` replicas of each (`n × (1 + replicas)`
    /// servers, which primary is which: [`RedisCluster::shard_of`]) and waits until
    /// every replica is in sync.
    pub fn start_with_replicas(n: usize, replicas: usize) -> Result<Self, TestRedisError> {
        let shards = (0..n * (1 + replicas))
            .map(|_| RedisServer::start_on(free_port(), true))
            .collect::<Result<Vec<_>, _>>()?;
        let addrs: Vec<String> = shards
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
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
        c.wait_replicated()?;
        Ok(c)
    }

    /// Waits (≤ 10 s) until every running replica has its primary's whole
    /// replication stream (`INFO replication` offsets), so a failover loses nothing.
    pub fn wait_replicated(&self) -> Result<(), TestRedisError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let synced = self.shards.iter().filter(|s| s.child.is_some()).all(|s| {
                let info = s.cli(&["INFO", "replication"]).unwrap_or_default();
                let field = |name: &str| {
                    info.lines()
                        .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
                };
                if info.contains("role:slave") {
                    return info.contains("master_link_status:up");
                }
                let head = field("master_repl_offset:");
                info.lines()
                    .filter(|l| l.starts_with("slave") && l.contains("offset="))
                    .all(|l| {
                        let at = l.split(',').find_map(|f| f.strip_prefix("offset="));
                        at.and_then(|o| o.parse::<u64>().ok()) == head
                    })
            });
            if synced {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(TestRedisError::Cluster("replicas never caught up".into()))
    }

    /// The seeds, comma-separated, as `broker.url` takes them.
    pub fn url(&self) -> String {
        self.shards
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the shard that owns `key`'s hash slot (`CLUSTER KEYSLOT`, then
    /// the slot ranges of `CLUSTER NODES`, asked of a shard that answers).
    pub fn shard_of(&self, key: &str) -> Option<usize> {
        let ask = |args: &[&str]| {
            self.shards
                .iter()
                .find_map(|s| s.cli(args).ok().filter(|o| !o.is_empty()))
        };
        let slot: u16 = ask(&["CLUSTER", "KEYSLOT", key])?.parse().ok()?;
        let nodes = ask(&["CLUSTER", "NODES"])?;
        let port = nodes.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let owns = fields.iter().skip(8).any(|r| {
                let (a, b) = r.split_once('-').unwrap_or((r, r));
                matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if (a..=b).contains(&slot))
            });
            let addr = fields.get(1)?.split('@').next()?;
            owns.then(|| addr.rsplit_once(':')?.1.parse::<u16>().ok()).flatten()
        })?;
        self.shards.iter().position(|s| s.port == port)
    }

    /// Waits (≤ 10 s) until every running shard sees shard `i` as `fail` (killed)
    /// or not (restarted): `CLUSTER NODES` flags.
    pub fn wait_marked_failed(&self, i: usize, failed: bool) -> Result<(), TestRedisError> {
        let addr = format!("127.0.0.1:{}@", self.shards[i].port);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let agree = self.shards.iter().filter(|s| s.child.is_some()).all(|s| {
                let nodes = s.cli(&["CLUSTER", "NODES"]).unwrap_or_default();
                nodes.lines().any(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    let flags = f.get(2).map_or(Vec::new(), |f| f.split(',').collect());
                    f.get(1).is_some_and(|a| a.starts_with(&addr))
                        && flags.contains(&"fail") == failed
                        && !flags.contains(&"fail?")
                })
            });
            if agree {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(TestRedisError::Cluster(format!(
            "shard {i} never seen failed={failed}"
        )))
    }

    /// Waits (≤ 10 s) until every shard answers `cluster_state:ok`.
    pub fn wait_ok(&self) -> Result<(), TestRedisError> {
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
