//! The registry's Lua scripts: each touches one client's keys only (all under the
//! hash tag `{c:<client id>}`), so it runs atomically on one Redis or one Redis
//! Cluster shard. Sent with `EVAL` (Redis caches the compiled script by its hash).
//!
//! A client's keys:
//! - `conns`: sorted set of its connection ids (committed and reserved), scored by
//!   admission order; it is what the per-client limit counts.
//! - `info`: hash conn id → `"<r|c> <node> <transport> <opened_at_ms>"` (`r` reserved,
//!   `c` committed), plus `_seq`, the admission counter.
//! - `state`: `online`, `linger:<token>` during the offline grace, or `pending` (its
//!   connections were admitted during an outage and nobody has announced it yet);
//!   absent when the client is offline.
//! - `rel:<conn id>`: a transition's receipt, `"<token> <answer>"`, so that a release
//!   run again (its reply lost to a reconnect or a timeout) answers what it answered
//!   the first time. The releasing node deletes it once it has acted on the answer,
//!   so only receipts whose answer was lost stay (until their TTL).

use fred::clients::Client;
use fred::interfaces::{KeysInterface, LuaInterface};
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

/// Commit, or re-registration after a reconnect: marks the connection committed,
/// sets the client online, and under `replace_oldest`, for an admission (a commit,
/// or a connection admitted during an outage; not committed before), evicts the
/// oldest other committed connection if over the limit. ARGV[7], the mode:
/// - `n`, a commit: *first* when the client was offline (or pending);
/// - `k`, a live connection registered again on a Redis that kept its data: as a
///   commit, so a client the cluster had taken offline meanwhile (a reaper) comes
///   back with a new `client.online`; refused (`over`) under `reject` when it is not
///   registered and the client is at its limit;
/// - `g`, registered again on a Redis that lost its data: never *first* (its session
///   was announced before the loss);
/// - `l`, a connection admitted during an outage (`admit_local`): an offline client
///   becomes `pending` (not announced: [`ANNOUNCE`] decides later), a lingering one
///   online again, an online one stays.
///
/// ARGV: conn id, node, transport, opened_at ms, limit, policy, mode.
/// Returns {first, victim id, victim info, over (1 refused), pending}.
const COMMIT: &str = r#"
local limit = tonumber(ARGV[5])
local mode = ARGV[7]
local prior = redis.call('HGET', KEYS[2], ARGV[1])
if not prior then
  if mode ~= 'n' and ARGV[6] == 'reject' and redis.call('ZCARD', KEYS[1]) >= limit then
    return {0, '', '', 1, 0}
  end
  local seq = redis.call('HINCRBY', KEYS[2], '_seq', 1)
  redis.call('ZADD', KEYS[1], seq, ARGV[1])
end
redis.call('HSET', KEYS[2], ARGV[1], 'c ' .. ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. ARGV[4])
local first, pending = 0, 0
local st = redis.call('GET', KEYS[3])
local offline = (not st) or st == 'pending'
if mode == 'l' and offline then
  redis.call('SET', KEYS[3], 'pending')
  pending = 1
else
  if offline and (mode == 'n' or mode == 'k') then first = 1 end
  if st ~= 'online' then redis.call('SET', KEYS[3], 'online') end
end
-- Only an admission settles the limit: a handshake's commit, or a connection
-- admitted during an outage registered now, either not committed before. Registering
-- again what the cluster had admitted evicts nobody (two nodes re-registering, or a
-- connection evicted a moment ago and not closed yet, must not evict others).
local fresh = (not prior) or string.sub(prior, 1, 1) == 'r'
local settles = fresh and (mode == 'n' or mode == 'l')
if ARGV[6] ~= 'replace' or not settles then return {first, '', '', 0, pending} end
local committed = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local v = redis.call('HGET', KEYS[2], id)
  if v and string.sub(v, 1, 1) == 'c' then table.insert(committed, {id, v}) end
end
if #committed <= limit then return {first, '', '', 0, pending} end
for _, c in ipairs(committed) do
  if c[1] ~= ARGV[1] then
    redis.call('ZREM', KEYS[1], c[1])
    redis.call('HDEL', KEYS[2], c[1])
    return {first, c[1], c[2], 0, pending}
  end
end
return {first, '', '', 0, pending}
"#;

/// The announcement of a client admitted during an outage: online, once, by the
/// first node to ask, if it is still `pending`. Returns 1 announced, 0 nothing.
const ANNOUNCE: &str = r#"
if redis.call('GET', KEYS[3]) ~= 'pending' then return 0 end
redis.call('SET', KEYS[3], 'online')
return 1
"#;

/// Release of a connection or a dropped reservation. When the client has none left
/// and was online: offline now (grace 0) or lingering with token ARGV[3]; a
/// `pending` client (never announced) just ends. A transition's answer is kept as a
/// receipt (KEYS[4], `PX` ARGV[4]): the same release again (same token) answers the
/// same, another token answers nothing.
/// ARGV: conn id, grace ms, token, receipt ms.
/// Returns 0 nothing, 1 offline, 2 lingering, 3 unknown (not a connection of the
/// client: evicted, released by someone else, or lost with Redis' data).
const RELEASE: &str = r#"
local seen = redis.call('GET', KEYS[4])
if seen then
  local token, answer = string.match(seen, '^(.*) (%d)$')
  if token == ARGV[3] then return tonumber(answer) end
  return 0
end
local was = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if was == 0 then return 3 end
local answer = 0
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[1], KEYS[2])
  local st = redis.call('GET', KEYS[3])
  local grace = tonumber(ARGV[2])
  if st == 'pending' then
    redis.call('DEL', KEYS[3])
  elseif st == 'online' and grace > 0 then
    redis.call('SET', KEYS[3], 'linger:' .. ARGV[3], 'PX', grace + 60000)
    answer = 2
  elseif st == 'online' then
    redis.call('DEL', KEYS[3])
    answer = 1
  end
end
if answer > 0 then
  redis.call('SET', KEYS[4], ARGV[3] .. ' ' .. answer, 'PX', ARGV[4])
end
return answer
"#;

/// How long a release's receipt is kept: a release run again later than this (an
/// outage longer than it, on a Redis that kept its data) answers "unknown".
pub(crate) const RECEIPT_MS: u64 = 600_000;

/// The end of an offline grace: offline if the same grace is still running (no
/// reconnect anywhere since). ARGV: token. Returns 1 offline, 0 nothing.
const EXPIRE: &str = r#"
if redis.call('GET', KEYS[3]) ~= 'linger:' .. ARGV[1] then return 0 end
if redis.call('ZCARD', KEYS[1]) > 0 then return 0 end
redis.call('DEL', KEYS[3])
return 1
"#;

/// A client's three keys, in the order every script takes them.
pub(crate) fn client_keys(keys: &Keys, client_id: &str) -> Vec<String> {
    vec![
        keys.client_key(client_id, "conns"),
        keys.client_key(client_id, "info"),
        keys.client_key(client_id, "state"),
    ]
}

/// A release's receipt key.
pub(crate) fn receipt_key(keys: &Keys, client_id: &str, conn_id: &str) -> String {
    keys.client_key(client_id, &format!("rel:{conn_id}"))
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
    /// A connection admitted during an outage left its client `pending`: the
    /// client's `client.online` waits for [`announce`].
    pub(crate) pending: bool,
}

/// How a connection is committed (the commit script's mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// A handshake's commit.
    Commit,
    /// Registered again; Redis kept its data.
    Kept,
    /// Registered again; Redis lost its data (the session was announced before).
    Lost,
    /// Admitted during an outage, registered now.
    Local,
}

impl Mode {
    fn arg(self) -> &'static str {
        match self {
            Mode::Commit => "n",
            Mode::Kept => "k",
            Mode::Lost => "g",
            Mode::Local => "l",
        }
    }
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

/// Runs the commit script. `args`: conn id, node, transport, opened_at ms, limit,
/// policy.
pub(crate) async fn commit(
    client: &Client,
    keys: &Keys,
    client_id: &str,
    args: [&str; 6],
    mode: Mode,
) -> Result<Committed, fred::error::Error> {
    let mut argv = args.to_vec();
    argv.push(mode.arg());
    let v: Vec<Value> = client
        .eval(COMMIT, client_keys(keys, client_id), argv)
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
        pending: int(4) == 1,
    })
}

/// Runs the announcement script: whether this node announces the client online.
pub(crate) async fn announce(
    client: &Client,
    keys: &Keys,
    client_id: &str,
) -> Result<bool, fred::error::Error> {
    let n: i64 = client
        .eval(ANNOUNCE, client_keys(keys, client_id), Vec::<String>::new())
        .await?;
    Ok(n == 1)
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
    /// Not a connection of the client (evicted, released by another, or lost with
    /// Redis' data).
    Unknown,
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
    let mut ks = client_keys(keys, client_id);
    ks.push(receipt_key(keys, client_id, conn_id));
    let argv = vec![
        conn_id.to_owned(),
        grace_ms.to_string(),
        token.to_owned(),
        RECEIPT_MS.to_string(),
    ];
    let n: i64 = client.eval(RELEASE, ks, argv).await?;
    Ok(match n {
        1 => Released::Offline,
        2 => Released::Lingering,
        3 => Released::Unknown,
        _ => Released::Nothing,
    })
}

/// Deletes a transition's receipt once its answer has been acted on (a receipt is
/// only needed when the answer was lost; one left behind expires).
pub(crate) async fn acknowledge(client: &Client, keys: &Keys, client_id: &str, conn_id: &str) {
    let receipt = receipt_key(keys, client_id, conn_id);
    let done: Result<(), _> = client.del(receipt).await;
    if let Err(e) = done {
        tracing::debug!(error = %e, "receipt not deleted (it expires)");
    }
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

    /// Admits and commits `conn` of `client` on node n1 under `reject`.
    async fn online(c: &Client, k: &Keys, client: &str, conn: &str) {
        admit(c, k, client, args(conn, "reject")).await.unwrap();
        commit(
            c,
            k,
            client,
            commit_args(conn, "n1", "reject"),
            Mode::Commit,
        )
        .await
        .unwrap();
    }

    fn commit_args<'a>(conn: &'a str, node: &'a str, policy: &'a str) -> [&'a str; 6] {
        [conn, node, "ws", "1000", "2", policy]
    }

    /// The keys under `t:` except receipts, each of which must expire.
    async fn keys_left(c: &Client) -> Vec<String> {
        let all: Vec<String> = c
            .eval(
                "return redis.call('KEYS', 't:*')",
                Vec::<String>::new(),
                Vec::<String>::new(),
            )
            .await
            .unwrap();
        let mut left = Vec::new();
        for k in all {
            if k.contains(":rel:") {
                let ttl: i64 = c
                    .eval(
                        "return redis.call('PTTL', KEYS[1])",
                        vec![k.clone()],
                        Vec::<String>::new(),
                    )
                    .await
                    .unwrap();
                assert!(ttl > 0 && ttl <= RECEIPT_MS as i64, "{k} pttl {ttl}");
            } else {
                left.push(k);
            }
        }
        left
    }

    async fn state(c: &Client, k: &Keys, client: &str) -> Option<String> {
        c.eval(
            "return redis.call('GET', KEYS[1])",
            vec![k.client_key(client, "state")],
            Vec::<String>::new(),
        )
        .await
        .unwrap()
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
        let one = commit(
            &c,
            &k,
            "x",
            commit_args("c1", "na", "replace"),
            Mode::Commit,
        )
        .await
        .unwrap();
        assert_eq!(
            one,
            Committed {
                first: true,
                ..Committed::default()
            }
        );
        let two = commit(
            &c,
            &k,
            "x",
            commit_args("c2", "nb", "replace"),
            Mode::Commit,
        )
        .await
        .unwrap();
        assert_eq!(two, Committed::default());
        let three = commit(
            &c,
            &k,
            "x",
            commit_args("c3", "nb", "replace"),
            Mode::Commit,
        )
        .await
        .unwrap();
        assert_eq!(three.victim, Some(("c1".into(), "na".into())));
        assert!(!three.first);
    }

    #[tokio::test]
    async fn offline_fires_once_after_the_grace_unless_the_client_came_back() {
        let redis = RedisServer::start().unwrap();
        let (c, k) = (client(&redis).await, Keys::new("t"));
        online(&c, &k, "x", "c1").await;
        let r = release(&c, &k, "x", "c1", 5000, "tok1").await.unwrap();
        assert_eq!(r, Released::Lingering);
        // Back within the grace (another node): the old grace ends in nothing.
        admit(&c, &k, "x", args("c2", "reject")).await.unwrap();
        let back = commit(&c, &k, "x", commit_args("c2", "n2", "reject"), Mode::Commit)
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
        let left = keys_left(&c).await;
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn a_release_run_again_answers_what_it_answered_the_first_time() {
        let redis = RedisServer::start().unwrap();
        let (c, k) = (client(&redis).await, Keys::new("t"));
        online(&c, &k, "x", "c1").await;
        let first = release(&c, &k, "x", "c1", 0, "t1").await.unwrap();
        assert_eq!(first, Released::Offline);
        // The same release again (its reply was lost): the same answer.
        let again = release(&c, &k, "x", "c1", 0, "t1").await.unwrap();
        assert_eq!(again, Released::Offline);
        // Someone else releasing it (a reaper): nothing.
        let other = release(&c, &k, "x", "c1", 0, "t2").await.unwrap();
        assert_eq!(other, Released::Nothing);
        // A connection the client never had: unknown, and no receipt is kept.
        let never = release(&c, &k, "x", "zz", 0, "t3").await.unwrap();
        assert_eq!(never, Released::Unknown);
        assert!(keys_left(&c).await.is_empty());
        // A lingering answer is replayed too.
        online(&c, &k, "y", "c2").await;
        let r = release(&c, &k, "y", "c2", 5000, "t4").await.unwrap();
        assert_eq!(r, Released::Lingering);
        let r = release(&c, &k, "y", "c2", 5000, "t4").await.unwrap();
        assert_eq!(r, Released::Lingering);
        // Acted on: the receipt goes (only lost answers keep theirs).
        acknowledge(&c, &k, "y", "c2").await;
        let n: i64 = c
            .eval(
                "return redis.call('EXISTS', KEYS[1])",
                vec![receipt_key(&k, "y", "c2")],
                Vec::<String>::new(),
            )
            .await
            .unwrap();
        assert_eq!(n, 0);
        let r = release(&c, &k, "y", "c2", 5000, "t4").await.unwrap();
        assert_eq!(r, Released::Unknown);
    }

    #[tokio::test]
    async fn an_outage_admission_is_announced_once_and_only_if_the_client_was_offline() {
        let redis = RedisServer::start().unwrap();
        let (c, k) = (client(&redis).await, Keys::new("t"));
        // Online on n1; n2 admitted it during an outage: no announcement owed.
        commit(&c, &k, "x", commit_args("c1", "n1", "reject"), Mode::Commit)
            .await
            .unwrap();
        let local = commit(&c, &k, "x", commit_args("c2", "n2", "reject"), Mode::Local)
            .await
            .unwrap();
        assert_eq!(local, Committed::default());
        assert!(!announce(&c, &k, "x").await.unwrap());
        // A client nobody had: pending, announced by the first to ask only.
        let y = commit(&c, &k, "y", commit_args("c3", "n1", "reject"), Mode::Local)
            .await
            .unwrap();
        assert!(y.pending && !y.first);
        let y2 = commit(&c, &k, "y", commit_args("c4", "n2", "reject"), Mode::Local)
            .await
            .unwrap();
        assert!(y2.pending);
        assert!(announce(&c, &k, "y").await.unwrap());
        assert!(!announce(&c, &k, "y").await.unwrap());
        assert_eq!(state(&c, &k, "y").await.as_deref(), Some("online"));
        // A pending client whose connections all close was never online: no offline.
        commit(&c, &k, "z", commit_args("c5", "n1", "reject"), Mode::Local)
            .await
            .unwrap();
        let r = release(&c, &k, "z", "c5", 0, "t1").await.unwrap();
        assert_eq!(r, Released::Nothing);
        assert_eq!(state(&c, &k, "z").await, None);
        assert!(!announce(&c, &k, "z").await.unwrap());
        // A handshake commit on a pending client announces it (and it is then online).
        commit(&c, &k, "w", commit_args("c6", "n1", "reject"), Mode::Local)
            .await
            .unwrap();
        let w = commit(&c, &k, "w", commit_args("c7", "n2", "reject"), Mode::Commit)
            .await
            .unwrap();
        assert!(w.first);
        assert!(!announce(&c, &k, "w").await.unwrap());
    }

    #[tokio::test]
    async fn registering_again_a_committed_connection_evicts_nobody() {
        let redis = RedisServer::start().unwrap();
        let (c, k) = (client(&redis).await, Keys::new("t"));
        let with = |id, limit| [id, "n1", "ws", "1000", limit, "replace"];
        commit(&c, &k, "x", with("c1", "1"), Mode::Commit)
            .await
            .unwrap();
        // c2 admitted during an outage, registered now: over the limit of 1, the
        // oldest (c1) goes.
        let local = commit(&c, &k, "x", with("c2", "1"), Mode::Local)
            .await
            .unwrap();
        assert_eq!(local.victim, Some(("c1".into(), "n1".into())));
        // Both committed (under a limit of 2), then both registered again under a
        // limit of 1 (two nodes after an outage): neither evicts the other.
        let y1 = commit(&c, &k, "y", with("c3", "2"), Mode::Commit)
            .await
            .unwrap();
        let y2 = commit(&c, &k, "y", with("c4", "2"), Mode::Commit)
            .await
            .unwrap();
        assert_eq!((y1.victim, y2.victim), (None, None));
        for id in ["c3", "c4"] {
            let again = commit(&c, &k, "y", with(id, "1"), Mode::Kept)
                .await
                .unwrap();
            assert_eq!(again.victim, None, "{id}");
        }
        // A connection evicted a moment ago (c1), registered again by its node before
        // it closed it: it evicts nobody either.
        let back = commit(&c, &k, "x", with("c1", "1"), Mode::Kept)
            .await
            .unwrap();
        assert_eq!(back.victim, None);
    }

    #[tokio::test]
    async fn a_registration_after_data_loss_is_never_first_one_with_data_kept_can_be() {
        let redis = RedisServer::start().unwrap();
        let (c, k) = (client(&redis).await, Keys::new("t"));
        let lost = commit(&c, &k, "x", commit_args("c1", "n1", "reject"), Mode::Lost)
            .await
            .unwrap();
        assert!(!lost.first);
        assert_eq!(state(&c, &k, "x").await.as_deref(), Some("online"));
        // Data kept, but the client was taken offline meanwhile (by a reaper): a new
        // session, announced by the registration.
        let kept = commit(&c, &k, "y", commit_args("c2", "n1", "reject"), Mode::Kept)
            .await
            .unwrap();
        assert!(kept.first);
        // Kept, client still online: nothing.
        let again = commit(&c, &k, "y", commit_args("c2", "n1", "reject"), Mode::Kept)
            .await
            .unwrap();
        assert!(!again.first);
    }
}
