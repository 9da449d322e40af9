//! Configuration: the TOML file, `TETHER_*` environment variables and flags, in
//! that precedence, validated before anything binds.
//!
//! The embedded `default.toml` is the documentation of every key (`tether config
//! default` prints it) and is checked by tests to equal [`Config::default`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::path::Path;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tether_core::{ClientLimitPolicy, Filter};

/// The default configuration with a comment per key.
pub const DEFAULT_TOML: &str = include_str!("default.toml");

/// The whole configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Client listener.
    pub listen: SocketAddr,
    /// Node id.
    pub node_id: String,
    /// `[server]`.
    pub server: ServerSection,
    /// `[api]`.
    pub api: ApiSection,
    /// `[tls]`.
    pub tls: TlsSection,
    /// `[auth]`.
    pub auth: AuthSection,
    /// `[clients]`.
    pub clients: ClientsSection,
    /// `[limits]`.
    pub limits: LimitsSection,
    /// `[heartbeat]`.
    pub heartbeat: HeartbeatSection,
    /// `[history]`.
    pub history: HistorySection,
    /// `[delivery]`.
    pub delivery: DeliverySection,
    /// `[sse]`.
    pub sse: SseSection,
    /// `[shutdown]`.
    pub shutdown: ShutdownSection,
    /// `[log]`.
    pub log: LogSection,
    /// `[proxy]`.
    pub proxy: ProxySection,
    /// `[[sweeps]]`.
    pub sweeps: Vec<Sweep>,
    /// `[broker]`.
    pub broker: BrokerSection,
    /// `[webhooks]`.
    pub webhooks: crate::webhooks::config::WebhooksSection,
}

/// Where channels and the client registry live (SPEC section 10).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BrokerKind {
    /// One node, in memory (the default).
    #[default]
    Memory,
    /// Several nodes sharing one Redis.
    Redis,
    /// Several nodes sharing one Redis Cluster.
    RedisCluster,
}

/// What admission does while the broker is unreachable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnavailable {
    /// Refuse: 503 `broker_unavailable` / close 4503.
    #[default]
    Reject,
    /// Admit on this node's own view; reconciled when Redis is back.
    AdmitLocal,
}

/// `[broker]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerSection {
    /// `memory`, `redis` or `redis-cluster`.
    pub kind: BrokerKind,
    /// `redis://host:port[/db]` (or `rediss://`); for a cluster, one or more seed
    /// nodes, comma-separated.
    pub url: String,
    /// A node whose heartbeat key is not renewed for this long is removed by a survivor.
    pub node_ttl_ms: NonZeroU64,
    /// Admission while Redis is unreachable.
    pub on_unavailable: OnUnavailable,
    /// Every Redis command's timeout: a hung Redis never freezes a node.
    pub command_timeout_ms: NonZeroU64,
    /// Prefix of every key and pub/sub channel (several clusters can share a Redis).
    pub prefix: String,
}

impl Default for BrokerSection {
    fn default() -> Self {
        Self {
            kind: BrokerKind::Memory,
            url: String::new(),
            node_ttl_ms: nz(30_000),
            on_unavailable: OnUnavailable::Reject,
            command_timeout_ms: nz(1_000),
            prefix: "tether".into(),
        }
    }
}

impl BrokerSection {
    /// The Redis URLs (one, or a cluster's seeds).
    pub fn urls(&self) -> Vec<&str> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }

    /// Checks the section: a Redis kind needs `redis://` URLs (one for `redis`), a
    /// prefix of `[A-Za-z0-9_.-]`, and a node TTL of at least 3 s (it is renewed a
    /// third of the way through).
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.kind == BrokerKind::Memory {
            return Ok(());
        }
        let urls = self.urls();
        if urls.is_empty() {
            return bad("broker.url must be set when broker.kind is redis or redis-cluster".into());
        }
        if let Some(u) = urls
            .iter()
            .find(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
        {
            return bad(format!(
                "broker.url {u:?} must be a redis:// or rediss:// URL"
            ));
        }
        if self.kind == BrokerKind::Redis && urls.len() > 1 {
            return bad(
                "broker.url names one Redis for kind = \"redis\" (seeds are for redis-cluster)"
                    .into(),
            );
        }
        if self.prefix.is_empty() || !self.prefix.chars().all(node_id_char) {
            return bad(format!(
                "broker.prefix {:?} must be non-empty and made of letters, digits, '_', '.' and '-'",
                self.prefix
            ));
        }
        if self.node_ttl_ms.get() < 3_000 {
            return bad(format!(
                "broker.node_ttl_ms ({}) must be at least 3000",
                self.node_ttl_ms
            ));
        }
        Ok(())
    }
}

/// A character of a node id (SPEC section 10: `[A-Za-z0-9_.-]`).
fn node_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-'
}

/// `[proxy]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxySection {
    /// `[[proxy.routes]]`.
    pub routes: Vec<ProxyRoute>,
}

/// One `[[proxy.routes]]`: clients connecting to `path` are relayed to `upstream`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyRoute {
    /// The path clients connect to.
    pub path: String,
    /// `ws://`/`wss://` (WebSocket route) or `http://`/`https://` (SSE route).
    pub upstream: String,
    /// How long connecting the upstream may take before `upstream_unavailable`.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: NonZeroU64,
    /// SSE routes: close a stream whose upstream is silent this long (0 = off).
    #[serde(default)]
    pub upstream_idle_timeout_ms: u64,
}

impl ProxyRoute {
    /// Whether this is a WebSocket route (else SSE).
    pub fn is_ws(&self) -> bool {
        self.upstream.starts_with("ws://") || self.upstream.starts_with("wss://")
    }
}

fn default_connect_timeout() -> NonZeroU64 {
    nz(3000)
}

/// `[server]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    /// Proxies allowed to set the client address.
    pub trusted_proxies: Vec<IpNet>,
}

/// `[api]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSection {
    /// API listener.
    pub listen: SocketAddr,
    /// Bearer key; empty = none.
    pub key: String,
}

/// `[tls]`: both files set = TLS on both listeners; both empty = plain TCP.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// Certificate chain, PEM (leaf first).
    pub cert_file: String,
    /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
}

impl TlsSection {
    /// Whether TLS is configured.
    pub fn enabled(&self) -> bool {
        !self.cert_file.is_empty()
    }
}

/// Auth modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// `?client=ID`.
    #[default]
    None,
    /// A JWT per connection.
    Jwt,
}

/// `[auth]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// The mode.
    pub mode: AuthMode,
    /// Allow `none` on a non-loopback listener.
    pub allow_insecure: bool,
    /// HS256 secret (at least 32 bytes).
    pub hs256_secret: String,
    /// RS256 public key, PEM.
    pub rs256_public_key_file: String,
    /// JWKS file: keys by `kid`.
    pub jwks_file: String,
    /// Required `aud`, when set.
    pub audience: String,
    /// Required `iss`, when set.
    pub issuer: String,
    /// Clock leeway for `exp` and `nbf`, at most a day (`auth::MAX_LEEWAY_MS`).
    pub leeway_ms: u64,
}

impl Default for AuthSection {
    fn default() -> Self {
        Self {
            mode: AuthMode::None,
            allow_insecure: false,
            hs256_secret: String::new(),
            rs256_public_key_file: String::new(),
            jwks_file: String::new(),
            audience: String::new(),
            issuer: String::new(),
            leeway_ms: 5000,
        }
    }
}

/// `[clients]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientsSection {
    /// Per-client limit.
    pub max_connections_per_client: NonZeroU64,
    /// Policy at the limit.
    pub on_client_limit: ClientLimitPolicy,
    /// Offline grace.
    pub offline_grace_ms: u64,
    /// SSE tombstone lifetime.
    pub tombstone_ms: u64,
}

/// `[limits]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    /// Ceiling in sockets; 0 = derived.
    pub max_connections: u64,
    /// Accepted but not admitted sockets.
    pub max_pending_handshakes: NonZeroU64,
    /// Per address; 0 = off.
    pub max_connections_per_ip: u32,
    /// Per address per second; 0 = off.
    pub handshakes_per_ip_per_sec: u32,
    /// Slowloris deadline.
    pub handshake_timeout_ms: NonZeroU64,
    /// 0 = off.
    pub max_connection_lifetime_ms: u64,
    /// WebSocket message bound.
    pub max_message_bytes: NonZeroU64,
    /// Inbound frame rate bound.
    pub max_inbound_per_sec: NonZeroU64,
    /// Subscriptions per connection.
    pub max_channels_per_connection: NonZeroU64,
    /// Channels per node.
    pub max_channels: NonZeroU64,
    /// Publish `data` bound.
    pub max_publish_bytes: NonZeroU64,
    /// Allowed `Origin`s; empty = any.
    pub allowed_origins: Vec<String>,
}

/// `[history]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistorySection {
    /// Messages per channel.
    pub size: NonZeroU64,
    /// Message lifetime in history.
    pub ttl_ms: NonZeroU64,
}

impl Default for HistorySection {
    fn default() -> Self {
        Self {
            size: nz(1000),
            ttl_ms: nz(300_000),
        }
    }
}

/// `[delivery]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliverySection {
    /// Outbound bytes per connection.
    pub max_queue_bytes: NonZeroU64,
    /// Outbound messages per connection.
    pub max_queue_messages: NonZeroU64,
}

impl Default for DeliverySection {
    fn default() -> Self {
        Self {
            max_queue_bytes: nz(1 << 20),
            max_queue_messages: nz(500),
        }
    }
}

/// `[heartbeat]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatSection {
    /// Ping interval.
    pub interval_ms: NonZeroU64,
    /// Pong deadline.
    pub timeout_ms: NonZeroU64,
}

/// `[sse]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SseSection {
    /// `retry:` value.
    pub retry_ms: u64,
}

/// `[shutdown]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownSection {
    /// Admit this long after the signal.
    pub pre_drain_ms: u64,
    /// Spread the closes over this.
    pub drain_window_ms: u64,
    /// Hard deadline.
    pub timeout_ms: NonZeroU64,
}

/// `[log]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// tracing filter.
    pub level: String,
}

/// One `[[sweeps]]` rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sweep {
    /// Evaluation period.
    pub every_ms: NonZeroU64,
    /// Which connections (must not be empty).
    #[serde(rename = "where")]
    pub filter: Filter,
    /// Close code (default 4002).
    #[serde(default = "default_sweep_code")]
    pub code: u16,
    /// Close reason.
    #[serde(default = "default_sweep_reason")]
    pub reason: String,
    /// Whether the client should reconnect.
    #[serde(default)]
    pub reconnect: bool,
}

fn default_sweep_code() -> u16 {
    4002
}
fn default_sweep_reason() -> String {
    "swept".into()
}

fn nz(n: u64) -> NonZeroU64 {
    NonZeroU64::new(n).unwrap_or(NonZeroU64::MIN)
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            node_id: "n1".into(),
            server: ServerSection::default(),
            api: ApiSection::default(),
            tls: TlsSection::default(),
            auth: AuthSection::default(),
            clients: ClientsSection::default(),
            limits: LimitsSection::default(),
            heartbeat: HeartbeatSection::default(),
            history: HistorySection::default(),
            delivery: DeliverySection::default(),
            sse: SseSection::default(),
            shutdown: ShutdownSection::default(),
            log: LogSection::default(),
            proxy: ProxySection::default(),
            sweeps: Vec::new(),
            broker: BrokerSection::default(),
            webhooks: Default::default(),
        }
    }
}
impl Default for ApiSection {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7701)),
            key: String::new(),
        }
    }
}
impl Default for ClientsSection {
    fn default() -> Self {
        Self {
            max_connections_per_client: nz(16),
            on_client_limit: ClientLimitPolicy::Reject,
            offline_grace_ms: 0,
            tombstone_ms: 60_000,
        }
    }
}
impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_connections: 0,
            max_pending_handshakes: nz(1024),
            max_connections_per_ip: 0,
            handshakes_per_ip_per_sec: 0,
            handshake_timeout_ms: nz(10_000),
            max_connection_lifetime_ms: 0,
            max_message_bytes: nz(65_536),
            max_inbound_per_sec: nz(50),
            max_channels_per_connection: nz(128),
            max_channels: nz(100_000),
            max_publish_bytes: nz(65_536),
            allowed_origins: Vec::new(),
        }
    }
}
impl Default for HeartbeatSection {
    fn default() -> Self {
        Self {
            interval_ms: nz(25_000),
            timeout_ms: nz(10_000),
        }
    }
}
impl Default for SseSection {
    fn default() -> Self {
        Self { retry_ms: 2000 }
    }
}
impl Default for ShutdownSection {
    fn default() -> Self {
        Self {
            pre_drain_ms: 5000,
            drain_window_ms: 10_000,
            timeout_ms: nz(25_000),
        }
    }
}
impl Default for LogSection {
    fn default() -> Self {
        Self {
            level: "info".into(),
        }
    }
}

/// A configuration error, naming where the bad key or value came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file has a bad key or value (the message names the line and the key).
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// toml's message, with line and column.
        message: String,
    },
    /// An environment variable or flag has a bad value.
    #[error("{source_name}: {message}")]
    Override {
        /// `TETHER_…` or `--flag`.
        source_name: String,
        /// Why.
        message: String,
    },
    /// The values are individually valid but do not fit together.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// A `[webhooks]` value is invalid.
    #[error("invalid configuration: {0}")]
    Webhooks(#[from] crate::webhooks::config::InvalidWebhooks),
}

/// One override of a key path (from the environment or a flag).
#[derive(Clone, Debug)]
pub struct Override {
    /// Where it came from, for messages (`TETHER_LISTEN`, `--listen`).
    pub source_name: String,
    /// The key path, e.g. `["heartbeat", "interval_ms"]`.
    pub path: Vec<String>,
    /// The raw value.
    pub value: String,
}

/// What loading found besides the configuration (warnings to log once logging is up).
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Unknown `TETHER_*` variables and the like.
    pub warnings: Vec<String>,
}

impl Config {
    /// Parses a file's text; errors name the line and the key.
    pub fn from_toml(path: &str, text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::File {
            path: path.into(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and parses a file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: name.clone(),
            source,
        })?;
        Self::from_toml(&name, &text)
    }

    /// Loads file (optional) + environment + flags, in increasing precedence.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: Vec<Override>,
    ) -> Result<(Config, LoadReport), ConfigError> {
        let mut report = LoadReport::default();
        let base = match file {
            Some(p) => Self::from_file(p)?,
            None => Config::default(),
        };
        let defaults = toml::Table::try_from(Config::default())
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let mut table =
            toml::Table::try_from(&base).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let mut overrides: Vec<Override> = Vec::new();
        let mut env: Vec<(String, String)> = env.into_iter().collect();
        env.sort();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("TETHER_") else {
                continue;
            };
            let path: Vec<String> = rest
                .to_ascii_lowercase()
                .split("__")
                .map(str::to_owned)
                .collect();
            if lookup(&defaults, &path).is_none() {
                report
                    .warnings
                    .push(format!("ignoring unknown environment variable {name}"));
                continue;
            }
            overrides.push(Override {
                source_name: name,
                path,
                value,
            });
        }
        overrides.extend(flags);
        for o in overrides {
            let Some(default_value) = lookup(&defaults, &o.path) else {
                return Err(ConfigError::Override {
                    source_name: o.source_name,
                    message: "no such key".into(),
                });
            };
            let value = coerce(&o.value, default_value);
            set(&mut table, &o.path, value);
            let check: Result<Config, _> = toml::Value::Table(table.clone()).try_into();
            if let Err(e) = check {
                return Err(ConfigError::Override {
                    source_name: o.source_name,
                    message: e.message().to_owned(),
                });
            }
        }
        let cfg: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_owned()))?;
        cfg.validate()?;
        Ok((cfg, report))
    }

    /// Checks what single values cannot: relations between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id.is_empty()
            || self.node_id.len() > 64
            || !self.node_id.chars().all(node_id_char)
        {
            return Err(ConfigError::Invalid(format!(
                "node_id {:?} must be 1 to 64 letters, digits, '_', '.' and '-'",
                self.node_id
            )));
        }
        self.broker.validate()?;
        if self.delivery.max_queue_messages >= self.history.size {
            return Err(ConfigError::Invalid(format!(
                "delivery.max_queue_messages ({}) must be below history.size ({}) so a client closed \
                 for being slow can always resume",
                self.delivery.max_queue_messages, self.history.size
            )));
        }
        let mut paths = std::collections::HashSet::new();
        for (i, r) in self.proxy.routes.iter().enumerate() {
            let scheme_ok = ["ws://", "wss://", "http://", "https://"]
                .iter()
                .any(|p| r.upstream.starts_with(p));
            if !scheme_ok || r.upstream.parse::<http::Uri>().is_err() {
                return Err(ConfigError::Invalid(format!(
                    "proxy.routes[{i}].upstream {:?} must be a ws://, wss://, http:// or https:// URL",
                    r.upstream
                )));
            }
            if !r.path.starts_with('/')
                || ["/ws", "/sse", "/healthz", "/readyz"].contains(&r.path.as_str())
            {
                return Err(ConfigError::Invalid(format!(
                    "proxy.routes[{i}].path {:?} must start with / and not be /ws, /sse, /healthz or /readyz",
                    r.path
                )));
            }
            if !paths.insert(r.path.clone()) {
                return Err(ConfigError::Invalid(format!(
                    "proxy.routes[{i}].path {:?} is used twice",
                    r.path
                )));
            }
        }
        if self.tls.cert_file.is_empty() != self.tls.key_file.is_empty() {
            return Err(ConfigError::Invalid(
                "tls.cert_file and tls.key_file must be set together".into(),
            ));
        }
        self.webhooks.validate()?;
        for (i, s) in self.sweeps.iter().enumerate() {
            if s.filter.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "sweeps[{i}].where must name at least one selector (idle_ms_gt, channel, transport, meta)"
                )));
            }
            if !(1000..=4999).contains(&s.code) {
                return Err(ConfigError::Invalid(format!(
                    "sweeps[{i}].code {} is not a close code",
                    s.code
                )));
            }
        }
        Ok(())
    }

    /// The effective connection ceiling: `limits.max_connections`, or derived from
    /// the open-file limit.
    pub fn max_connections(&self, nofile: u64) -> usize {
        if self.limits.max_connections > 0 {
            return self.limits.max_connections as usize;
        }
        let sockets = nofile.saturating_sub(512).max(1);
        // A proxied connection holds two sockets; the ceiling counts it so.
        (if self.proxy.routes.is_empty() {
            sockets
        } else {
            sockets / 2
        })
        .max(1) as usize
    }
}

fn lookup<'a>(table: &'a toml::Table, path: &[String]) -> Option<&'a toml::Value> {
    let (first, rest) = path.split_first()?;
    let v = table.get(first)?;
    if rest.is_empty() {
        return Some(v);
    }
    lookup(v.as_table()?, rest)
}

fn set(table: &mut toml::Table, path: &[String], value: toml::Value) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    if rest.is_empty() {
        table.insert(first.clone(), value);
        return;
    }
    let sub = table
        .entry(first.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(t) = sub {
        set(t, rest, value);
    }
}

/// Turns a raw override into a value of the default's type: strings stay strings;
/// numbers and booleans are parsed as TOML; arrays are TOML arrays or comma lists.
fn coerce(raw: &str, like: &toml::Value) -> toml::Value {
    let parsed = || -> Option<toml::Value> {
        let t: toml::Table = toml::from_str(&format!("v = {raw}")).ok()?;
        t.get("v").cloned()
    };
    match like {
        toml::Value::String(_) => toml::Value::String(raw.to_owned()),
        toml::Value::Array(_) => match parsed() {
            Some(v @ toml::Value::Array(_)) => v,
            _ => toml::Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| toml::Value::String(s.to_owned()))
                    .collect(),
            ),
        },
        _ => parsed().unwrap_or_else(|| toml::Value::String(raw.to_owned())),
    }
}

/// The keys of a table as dotted paths (for the "default config is complete" check).
pub fn key_paths(table: &toml::Table) -> BTreeMap<String, ()> {
    fn walk(prefix: &str, t: &toml::Table, out: &mut BTreeMap<String, ()>) {
        for (k, v) in t {
            let p = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(sub) => walk(&p, sub, out),
                _ => {
                    out.insert(p, ());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", table, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_is_the_default_and_complete() {
        let parsed = Config::from_toml("default.toml", DEFAULT_TOML);
        assert_eq!(parsed.as_ref().ok(), Some(&Config::default()), "{parsed:?}");
        let shown: toml::Table = toml::from_str(DEFAULT_TOML).unwrap_or_default();
        let all = toml::Table::try_from(Config::default()).unwrap_or_default();
        let mut want = key_paths(&all);
        want.remove("sweeps");
        want.remove("proxy.routes");
        assert_eq!(key_paths(&shown), want);
    }

    #[test]
    fn unknown_file_key_names_line_and_key() {
        let err = Config::from_toml(
            "t.toml",
            "listen = \"127.0.0.1:1\"\n[heartbeat]\nintervall_ms = 5\n",
        );
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("intervall_ms"), "{msg}");
    }

    #[test]
    fn bad_value_names_line() {
        let err = Config::from_toml("t.toml", "[heartbeat]\ninterval_ms = 0\n");
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("line 2") && msg.contains("nonzero"), "{msg}");
        let err = Config::from_toml("t.toml", "[clients]\non_client_limit = \"kick\"\n");
        let msg = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("line 2") && msg.contains("kick"), "{msg}");
    }

    #[test]
    fn precedence_flag_over_env_over_file() {
        let dir = std::env::temp_dir().join(format!("tether-cfg-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join("c.toml");
        let _ = std::fs::write(
            &file,
            "node_id = \"file\"\n[heartbeat]\ninterval_ms = 1111\ntimeout_ms = 2222\n",
        );
        let env = vec![
            (
                "TETHER_HEARTBEAT__INTERVAL_MS".to_owned(),
                "3333".to_owned(),
            ),
            ("TETHER_NODE_ID".to_owned(), "env".to_owned()),
            ("TETHER_PORT".to_owned(), "80".to_owned()),
            (
                "TETHER_SERVER__TRUSTED_PROXIES".to_owned(),
                "10.0.0.0/8, 192.168.0.0/16".to_owned(),
            ),
            ("PATH".to_owned(), "/bin".to_owned()),
        ];
        let flags = vec![Override {
            source_name: "--node-id".into(),
            path: vec!["node_id".into()],
            value: "flag".into(),
        }];
        let (cfg, report) = Config::load(Some(&file), env, flags)
            .map_err(|e| e.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cfg.node_id, "flag");
        assert_eq!(cfg.heartbeat.interval_ms.get(), 3333);
        assert_eq!(cfg.heartbeat.timeout_ms.get(), 2222);
        assert_eq!(cfg.server.trusted_proxies.len(), 2);
        assert_eq!(report.warnings.len(), 1);
        assert!(report.warnings[0].contains("TETHER_PORT"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_env_value_names_the_variable() {
        let env = vec![(
            "TETHER_HEARTBEAT__INTERVAL_MS".to_owned(),
            "soon".to_owned(),
        )];
        let err = Config::load(None, env, vec![])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("TETHER_HEARTBEAT__INTERVAL_MS"), "{err}");
    }

    #[test]
    fn sweeps_need_a_selector() {
        let err = Config::from_toml("t.toml", "[[sweeps]]\nevery_ms = 10\nwhere = {}\n");
        assert!(err
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("sweeps[0].where"));
        let ok = Config::from_toml(
            "t.toml",
            "[[sweeps]]\nevery_ms = 10\nwhere = { idle_ms_gt = 5, transport = \"sse\" }\n",
        );
        assert!(ok.is_ok(), "{ok:?}");
    }

    fn check(toml: &str) -> Result<Config, String> {
        Config::from_toml("t.toml", toml).map_err(|e| e.to_string())
    }

    #[test]
    fn node_ids_are_what_orchestrators_make() {
        for ok in ["tether-0", "web-7f9c-abcde", "n.1_a", &"x".repeat(64)] {
            assert!(check(&format!("node_id = {ok:?}\n")).is_ok(), "{ok}");
        }
        for bad in ["", "a/b", "a b", "ünï", &"x".repeat(65)] {
            let e = check(&format!("node_id = {bad:?}\n")).unwrap_err();
            assert!(e.contains("node_id"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_redis_broker_needs_a_redis_url_and_names_what_is_wrong() {
        let ok = check("[broker]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n").unwrap();
        assert_eq!(ok.broker.kind, BrokerKind::Redis);
        let seeds = "[broker]\nkind = \"redis-cluster\"\nurl = \"redis://a:1, redis://b:2\"\n";
        assert_eq!(
            check(seeds).unwrap().broker.urls(),
            ["redis://a:1", "redis://b:2"]
        );
        for (toml, names) in [
            ("[broker]\nkind = \"redis\"\n", "broker.url must be set"),
            (
                "[broker]\nkind = \"redis\"\nurl = \"http://x\"\n",
                "broker.url \"http://x\"",
            ),
            (
                "[broker]\nkind = \"redis\"\nurl = \"redis://a,redis://b\"\n",
                "names one Redis",
            ),
            (
                "[broker]\nkind = \"redis\"\nurl = \"redis://a\"\nnode_ttl_ms = 100\n",
                "broker.node_ttl_ms",
            ),
            (
                "[broker]\nkind = \"redis\"\nurl = \"redis://a\"\nprefix = \"a b\"\n",
                "broker.prefix",
            ),
            ("[broker]\nkind = \"etcd\"\n", "kind"),
            ("[broker]\non_unavailable = \"maybe\"\n", "on_unavailable"),
        ] {
            let e = check(toml).unwrap_err();
            assert!(e.contains(names), "{toml}: {e}");
        }
    }
}
