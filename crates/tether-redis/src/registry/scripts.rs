//! The registry's Lua scripts: each touches one client's keys only (all under the
//! hash tag `{c:<client id>}`), so it runs atomically on one Redis or one Redis
//! Cluster shard. Sent with `EVAL` (Redis caches the compiled script by its hash).
//!
//! A client's keys:
//! - `conns`: sorted set of its connection ids (committed and reserved), scored by
//!   admission order; it is what the per-client limit counts.
//! - `info`: hash conn id → `"<r|c> <node> <transport> <opened_at_ms>"` (`r` reserved,
//!   `c` committed), plus `_seq`, the admission counter.
//! - `state`: `online`, or `linger:<token>` during the offline grace; absent when
//!   the client is offline.

use fred::clients::Client;
use fred::interfaces::LuaInterface;
use fred::types::Value;

use crate::keys::Keys;

/// Admission: reserves a slot, or refuses when the client is at its limit under
/// `reject` (`replace_oldest` always admits: the commit evicts the oldest).
/// ARGV: conn id, node, transport, now ms, limit, policy. Returns 1 admitted, 0 refused.
const ADMIT: &str = r#"
if ARGV[6] == 'reject' and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[5]) then
  return 0
end
local seq = redis.call('HINCRBY', KEYS[2], '_seq', 1)
redis.call('ZADD', KEYS[1], seq, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], 'r ' .. ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. ARGV[4])
return 1
"#;

/// Commit (or, with ARGV[7] = '1', re-registration after a reconnect): marks the
/// connection committed, sets the client online, and under `replace_oldest` evicts
/// the oldest other committed connection when over the limit. A re-registration
/// under `reject` that would put the client over its limit is refused.
/// ARGV: conn id, node, transport, opened_at ms, limit, policy, resync.
/// Returns {first (1 when the client was offline), victim id, victim info, over (1 refused)}.
const COMMIT: &str = r#"
local limit = tonumber(ARGV[5])
local resync = ARGV[7] == '1'
if not redis.call('HGET', KEYS[2], ARGV[1]) then
  if resync and ARGV[6] == 'reject' and redis.call('ZCARD', KEYS[1]) >= limit then
    return {0, '', '', 1}
  end
  local seq = redis.call('HINCRBY', KEYS[2], '_seq', 1)
  redis.call('ZADD', KEYS[1], seq, ARGV[1])
end
redis.call('HSET', KEYS[2], ARGV[1], 'c ' .. ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. ARGV[4])
local first = 0
local st = redis.call('GET', KEYS[3])
if not st and not resync then first = 1 end
if st ~= 'online' then redis.call('SET', KEYS[3], 'online') end
if ARGV[6] ~= 'replace' then return {first, '', '', 0} end
local committed = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local v = redis.call('HGET', KEYS[2], id)
  if v and string.sub(v, 1, 1) == 'c' then table.insert(committed, {id, v}) end
end
if #committed <= limit then return {first, '', '', 0} end
for _, c in ipairs(committed) do
  if c[1] ~= ARGV[1] then
    redis.call('ZREM', KEYS[1], c[1])
    redis.call('HDEL', KEYS[2], c[1])
    return {first, c[1], c[2], 0}
  end
end
return {first, '', '', 0}
"#;

/// Release of a connection or a dropped reservation. When the client has none left
/// and was online: offline now (grace 0) or lingering with token ARGV[3].
/// ARGV: conn id, grace ms, token. Returns 0 nothing, 1 offline, 2 lingering.
const RELEASE: &str = r#"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('ZCARD', KEYS[1]) > 0 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
if redis.call('GET', KEYS[3]) ~= 'online' then return 0 end
local grace = tonumber(ARGV[2])
if grace > 0 then
  redis.call('SET', KEYS[3], 'linger:' .. ARGV[3], 'PX', grace + 60000)
  return 2
end
redis.call('DEL', KEYS[3])
return 1
"#;

/// The end of an offline grace: offline if the same grace is still running (no
/// reconnect anywhere since). ARGV: token. Returns 1 offline, 0 nothing.
const EXPIRE: &str = r#"
if redis.call('GET', KEYS[3]) ~= 'linger:' .. ARGV[1] then return 0 end
if redis.call('ZCARD', KEYS[1]) > 0 then return 0 end
redis.call('DEL', KEYS[3])
return 1
"#;

/// A client's three keys, in the order every script takes them.
fn client_keys(keys: &Keys, client_id: &str) -> Vec<String> {
    vec![
        keys.client_key(client_id, "conns"),
        keys.client_key(client_id, "info"),
        keys.client_key(client_id, "state"),
    ]
}

/// The policy as the scripts spell it.
pub(crate) fn policy_arg(replace: bool) -> &'static str {
    if replace {
        "replace"
    } else {
        "reject"
    }
}

/// What the commit script decided.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Committed {
    /// The client was offline: this commit fires `client.online`.
    pub(crate) first: bool,
    /// The connection evicted under `replace_oldest`, and the node that holds it.
    pub(crate) victim: Option<(String, String)>,
    /// A re-registration refused under `reject` (the client is over its limit).
    pub(crate) over: bool,
}

/// Runs the admission script.
pub(crate) async fn admit(
    client: &Client,
    keys: &Keys,
    client_id: &str,
    args: [&str; 6],
) -> Result<bool, fred::error::Error> {
    let n: i64 = client
        .eval(ADMIT, client_keys(keys, client_id), args.to_vec())
        .await?;
    Ok(n == 1)
}

/// Runs the commit script.
pub(crate) async fn commit(
    client: &Client,
    keys: &Keys,
    client_id: &str,
    args: [&str; 7],
) -> Result<Committed, fred::error::Error> {
    let v: Vec<Value> = client
        .eval(COMMIT, client_keys(keys, client_id), args.to_vec())
        .await?;
    let int = |i: usize| v.get(i).and_then(Value::as_i64).unwrap_or(0);
    let text = |i: usize| {
        v.get(i)
            .and_then(|x| x.as_string())
            .filter(|s| !s.is_empty())
    };
    let victim = text(1).zip(text(2)).and_then(|(id, info)| {
        let node = info.split(' ').nth(1)?.to_owned();
        Some((id, node))
    });
    Ok(Committed {
        first: int(0) == 1,
        victim,
        over: int(3) == 1,
    })
}

/// What a release did to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Released {
    /// It still has connections elsewhere, or was never online.
    Nothing,
    /// Its last connection: it is offline now.
    Offline,
    /// Its last connection: its offline grace started.
    Lingering,
}

/// Runs the release script.
pub(crate) async fn release(
    client: &Client,
    keys: &Keys,
    client_id: &str,
    conn_id: &str,
    grace_ms: u64,
    token: &str,
) -> Result<Released, fred::error::Error> {
    let n: i64 = client
        .eval(
            RELEASE,
            client_keys(keys, client_id),
            vec![conn_id.to_owned(), grace_ms.to_string(), token.to_owned()],
        )
        .await?;
    Ok(match n {
        1 => Released::Offline,
        2 => Released::Lingering,
        _ => Released::Nothing,
    })
}

/// Runs the grace-expiry script: whether the client went offline.
pub(crate) async fn expire(
    client: &Client,
    keys: &Keys,
    client_id: &str,
    token: &str,
) -> Result<bool, fred::error::Error> {
    let n: i64 = client
        .eval(EXPIRE, client_keys(keys, client_id), vec![token.to_owned()])
        .await?;
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::testing::RedisServer;
    use fred::interfaces::ClientLike;
    use fred::types::config::Config;
    use fred::types::Builder;

    async fn client(redis: &RedisServer) -> Client {
        let c = Builder::from_config(Config::from_url(&redis.url()).unwrap())
            .build()
            .unwrap();
        c.init().await.unwrap();
        c
    }

    fn args<'a>(conn: &'a str, policy: &'a str) -> [&'a str; 6] {
        [conn, "n1", "ws", "1000", "2", policy]
    }

    fn commit_args<'a>(conn: &'a str, node: &'a str, policy: &'a str) -> [&'a str; 7] {
        [conn, node, "ws", "1000", "2", policy, "0"]
    }

    #[tokio::test]
    async fn admit_counts_reservations_against_the_limit_under_reject_only() {
        let redis = RedisServer::start().unwrap();
        let (c, k) = (client(&redis).await, Keys::new("t"));
        assert!(admit(&c, &k, "x", args("c1", "reject")).await.unwrap());
        assert!(admit(&c, &k, "x", args("c2", "reject")).await.unwrap());
        assert!(!admit(&c, &k, "x", args("c3", "reject")).await.unwrap());
        assert!(admit(&c, &k, "x", args("c3", "replace")).await.unwrap());
        // A refused reservation is not recorded.
        let n: i64 = c
            .eval(
                "return redis.call('ZCARD', KEYS[1])",
                vec![k.client_key("x", "conns")],
                Vec::<String>::new(),
            )
            .await
            .unwrap();
        assert_eq!(n, 3);
    }

    #[tokio::test]
    async fn commit_says_first_once_and_evicts_the_oldest_other_committed() {
        let redis = RedisServer::start().unwrap();
        let (c, k) = (client(&redis).await, Keys::new("t"));
        for id in ["c1", "c2", "c3"] {
            assert!(admit(&c, &k, "x", args(id, "replace")).await.unwrap());
        }
        let one = commit(&c, &k, "x", commit_args("c1", "na", "replace"))
            .await
            .unwrap();
        assert_eq!(
            one,
            Committed {
                first: true,
                victim: None,
                over: false
            }
        );
        let two = commit(&c, &k, "x", commit_args("c2", "nb", "replace"))
            .await
            .unwrap();
        assert_eq!(two, Committed::default());
        let three = commit(&c, &k, "x", commit_args("c3", "nb", "replace"))
            .await
            .unwrap();
        assert_eq!(three.victim, Some(("c1".into(), "na".into())));
        assert!(!three.first);
    }

    #[tokio::test]
    async fn offline_fires_once_after_the_grace_unless_the_client_came_back() {
        let redis = RedisServer::start().unwrap();
        let (c, k) = (client(&redis).await, Keys::new("t"));
        admit(&c, &k, "x", args("c1", "reject")).await.unwrap();
        commit(&c, &k, "x", commit_args("c1", "n1", "reject"))
            .await
            .unwrap();
        let r = release(&c, &k, "x", "c1", 5000, "tok1").await.unwrap();
        assert_eq!(r, Released::Lingering);
        // Back within the grace (another node): the old grace ends in nothing.
        admit(&c, &k, "x", args("c2", "reject")).await.unwrap();
        let back = commit(&c, &k, "x", commit_args("c2", "n2", "reject"))
            .await
            .unwrap();
        assert!(!back.first);
        assert!(!expire(&c, &k, "x", "tok1").await.unwrap());
        // Gone again, no grace: offline now, and only once.
        assert_eq!(
            release(&c, &k, "x", "c2", 0, "tok2").await.unwrap(),
            Released::Offline
        );
        assert_eq!(
            release(&c, &k, "x", "c2", 0, "tok3").await.unwrap(),
            Released::Nothing
        );
        let left: Vec<String> = c
            .eval(
                "return redis.call('KEYS', 't:*')",
                Vec::<String>::new(),
                Vec::<String>::new(),
            )
            .await
            .unwrap();
        assert!(left.is_empty(), "{left:?}");
    }
}
