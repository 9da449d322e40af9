//! The broker's two Lua scripts (publish, range) and their replies, called by SHA
//! (loaded again when Redis answers `NOSCRIPT`, e.g. after it restarted). Every key
//! a script touches is one channel's, under its hash tag, so both run on the
//! channel's shard of a Redis Cluster.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::clients::Client;
use fred::types::scripts::Script;
use fred::types::Value;

use crate::keys::Keys;

/// Why a script call failed (every one answers `broker_unavailable`).
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// Redis did not answer in time, refused, or is unreachable.
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    /// The reply did not have the script's shape.
    #[error("unexpected reply from the {0} script")]
    Reply(&'static str),
}

fn publish_script() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    S.get_or_init(|| Script::from_lua(include_str!("publish.lua")))
}

fn range_script() -> &'static Script {
    static S: OnceLock<Script> = OnceLock::new();
    S.get_or_init(|| Script::from_lua(include_str!("range.lua")))
}

/// What the publish script needs besides the channel.
#[derive(Clone, Copy, Debug)]
pub struct PublishArgs<'a> {
    /// The raw JSON, on one line.
    pub data: &'a str,
    /// The caller's idempotency key.
    pub idempotency_key: Option<&'a str>,
    /// `history.size`.
    pub history_size: usize,
    /// `history.ttl_ms`.
    pub history_ttl: Duration,
    /// Whether to SPUBLISH (Redis Cluster).
    pub sharded: bool,
}

/// The publish script's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Published {
    /// `"<epoch>:<offset>"`.
    pub position: String,
    /// The message id.
    pub id: String,
    /// Subscribers on every node (as their nodes last wrote them).
    pub subscribers: usize,
    /// Whether the idempotency key had been seen (nothing was published).
    pub duplicate: bool,
}

/// A channel's meta outlives its stream by this much at least: a quiet channel's
/// history expires, its epoch and offset stay, so positions continue.
pub const META_TTL_MIN: Duration = Duration::from_secs(24 * 3600);

/// How long a channel's meta lives after its last write: at least a day, and never
/// less than its history.
pub fn meta_ttl(history_ttl: Duration) -> Duration {
    history_ttl.max(META_TTL_MIN)
}

/// Runs the publish script.
pub async fn publish(
    client: &Client,
    keys: &Keys,
    channel: &str,
    a: PublishArgs<'_>,
) -> Result<Published, ScriptError> {
    let idem = a.idempotency_key.unwrap_or_default();
    let ks = vec![
        keys.channel_key(channel, "meta"),
        keys.channel_key(channel, "stream"),
        keys.channel_key(channel, &format!("idem:{idem}")),
        keys.channel_key(channel, "nodes"),
    ];
    let ttl = a.history_ttl.as_millis().max(1);
    let args: Vec<String> = vec![
        a.data.to_owned(),
        a.history_size.to_string(),
        ttl.to_string(),
        meta_ttl(a.history_ttl).as_millis().to_string(),
        new_epoch(),
        uuid_like(),
        keys.channel_pubsub(channel),
        flag(a.idempotency_key.is_some()),
        flag(a.sharded),
    ];
    let reply: Vec<Value> = publish_script()
        .evalsha_with_reload(client, ks, args)
        .await?;
    let bad = || ScriptError::Reply("publish");
    let [dup, result, subs] = reply.as_slice() else {
        return Err(bad());
    };
    let result = result.as_string().ok_or_else(bad)?;
    let (position, id) = result.split_once(' ').ok_or_else(bad)?;
    Ok(Published {
        position: position.to_owned(),
        id: id.to_owned(),
        subscribers: subs.as_usize().unwrap_or(0),
        duplicate: dup.as_u64() == Some(1),
    })
}

/// One message read back from a channel's stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its offset.
    pub offset: u64,
    /// Its id.
    pub id: String,
    /// When Redis stored it (ms since the Unix epoch).
    pub at_ms: u64,
    /// The raw JSON.
    pub data: String,
}

impl Entry {
    /// How long ago it was published (by this node's clock).
    pub fn age(&self) -> Duration {
        age(self.at_ms)
    }
}

/// How long ago `at_ms` (ms since the Unix epoch, Redis's clock) was, by this
/// node's clock (0 if it seems to be in the future).
pub fn age(at_ms: u64) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    Duration::from_millis(now.saturating_sub(at_ms))
}

/// A channel's head and part of its history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Range {
    /// Its epoch.
    pub epoch: String,
    /// Its latest offset.
    pub last: u64,
    /// The messages read, ascending.
    pub entries: Vec<Entry>,
}

/// What to read: messages `first..=last` (`last` 0: to the head) when the channel
/// is still in `epoch` (else from its oldest), at most `count` (0: the head only).
#[derive(Clone, Copy, Debug, Default)]
pub struct Want<'a> {
    /// The epoch the caller knows.
    pub epoch: &'a str,
    /// The first offset wanted.
    pub first: u64,
    /// The last offset wanted (0: up to the head).
    pub last: u64,
    /// At most this many.
    pub count: usize,
    /// Start a channel with no history at a new epoch, its meta kept this long.
    pub create: Option<Duration>,
}

/// Runs the range script: `None` for a channel with no history in Redis.
pub async fn range(
    client: &Client,
    keys: &Keys,
    channel: &str,
    want: Want<'_>,
) -> Result<Option<Range>, ScriptError> {
    let ks = vec![
        keys.channel_key(channel, "meta"),
        keys.channel_key(channel, "stream"),
    ];
    let args: Vec<String> = vec![
        want.epoch.to_owned(),
        want.first.to_string(),
        want.last.to_string(),
        want.count.to_string(),
        want.create.map(|_| new_epoch()).unwrap_or_default(),
        want.create.map_or(0, |t| t.as_millis()).to_string(),
    ];
    let reply: Vec<Value> = range_script().evalsha_with_reload(client, ks, args).await?;
    parse_range(reply)
}

fn parse_range(reply: Vec<Value>) -> Result<Option<Range>, ScriptError> {
    let bad = || ScriptError::Reply("range");
    let mut it = reply.into_iter();
    let Some(epoch) = it.next() else {
        return Ok(None);
    };
    let epoch = epoch.into_string().ok_or_else(bad)?;
    let last = it.next().and_then(|v| v.as_u64()).ok_or_else(bad)?;
    let mut entries = Vec::new();
    while let Some(offset) = it.next() {
        let (Some(id), Some(at), Some(data)) = (it.next(), it.next(), it.next()) else {
            return Err(bad());
        };
        entries.push(Entry {
            offset: offset.as_u64().ok_or_else(bad)?,
            id: id.into_string().ok_or_else(bad)?,
            at_ms: at.as_u64().unwrap_or(0),
            data: data.into_string().ok_or_else(bad)?,
        });
    }
    Ok(Some(Range {
        epoch,
        last,
        entries,
    }))
}

fn flag(on: bool) -> String {
    if on { "1" } else { "0" }.to_owned()
}

/// A fresh epoch name: 8 characters of `[a-z0-9]` (as the in-memory broker's).
fn new_epoch() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    (0..8)
        .map(|_| ALPHABET[fastrand::usize(..ALPHABET.len())] as char)
        .collect()
}

/// A message id, as the in-memory broker's: a v4 UUID's 32 hex digits.
fn uuid_like() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
