//! Every Redis key and pub/sub channel Tether uses, in one place. All start with the
//! configured prefix. A channel's keys and its sharded pub/sub channel share the hash
//! tag `{<channel>}` (SPEC section 10), so one Redis Cluster shard holds all of a
//! channel and a Lua script may touch them together; a client's keys share
//! `{c:<client id>}`; a node's, `{n:<node id>}`.

/// Key names under one prefix.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Names under `prefix` (`broker.prefix`, default `tether`).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A channel's pub/sub channel (sharded in a Redis Cluster).
    pub fn channel_pubsub(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:pub", self.prefix)
    }

    /// A channel's `<name>` key (`meta`, `stream`, `idem:<key>`, ...).
    pub fn channel_key(&self, channel: &str, name: &str) -> String {
        format!("{}:{{{channel}}}:{name}", self.prefix)
    }

    /// A client's `<name>` key.
    pub fn client_key(&self, client_id: &str, name: &str) -> String {
        format!("{}:{{c:{client_id}}}:{name}", self.prefix)
    }

    /// A node's `<name>` key.
    pub fn node_key(&self, node_id: &str, name: &str) -> String {
        format!("{}:{{n:{node_id}}}:{name}", self.prefix)
    }

    /// A node's control channel (replace, kick: requests for its connections).
    pub fn node_control(&self, node_id: &str) -> String {
        format!("{}:{{n:{node_id}}}:control", self.prefix)
    }

    /// A key shared by the whole cluster (`nodes`, `epoch`, ...), on one shard.
    pub fn global(&self, name: &str) -> String {
        format!("{}:{{global}}:{name}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The part of a key Redis Cluster hashes: the first `{...}` with something in it.
    fn hash_tag(key: &str) -> &str {
        let open = key.find('{').unwrap_or(0);
        let close = key[open..].find('}').map(|c| open + c).unwrap_or(key.len());
        &key[open + 1..close]
    }

    #[test]
    fn a_channels_keys_and_pubsub_share_its_hash_tag() {
        let k = Keys::new("tether");
        let ch = "chat:room/1";
        for key in [
            k.channel_pubsub(ch),
            k.channel_key(ch, "meta"),
            k.channel_key(ch, "stream"),
            k.channel_key(ch, "idem:abc"),
        ] {
            assert_eq!(hash_tag(&key), ch, "{key}");
        }
        assert_eq!(hash_tag(&k.client_key("alice", "conns")), "c:alice");
        assert_eq!(hash_tag(&k.node_key("tether-0", "alive")), "n:tether-0");
        assert_eq!(hash_tag(&k.node_control("tether-0")), "n:tether-0");
    }
}
