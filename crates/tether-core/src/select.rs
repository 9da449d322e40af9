//! Connection selectors, shared by `POST /api/disconnect`, `GET /api/connections`
//! and `[[sweeps]]`: one implementation of "which connections does this mean".

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::connection::{Connection, Transport};

/// The `where` part: every field set must match (AND).
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Idle for longer than this (no application frame other than `ping`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_ms_gt: Option<u64>,
    /// Subscribed to this channel.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// On this transport.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<Transport>,
    /// Whose `meta` contains every key of this object with an equal value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meta: Option<Map<String, Value>>,
}

impl Filter {
    /// Whether no field is set (an empty filter matches everything).
    pub fn is_empty(&self) -> bool {
        self.idle_ms_gt.is_none()
            && self.channel.is_none()
            && self.transport.is_none()
            && self.meta.is_none()
    }

    /// Whether `conn` matches every set field.
    pub fn matches(&self, conn: &Connection) -> bool {
        if let Some(t) = self.transport {
            if conn.transport() != t {
                return false;
            }
        }
        if let Some(ms) = self.idle_ms_gt {
            if conn.idle_ms() <= ms {
                return false;
            }
        }
        if let Some(ch) = &self.channel {
            if !conn.has_channel(ch) {
                return false;
            }
        }
        if let Some(want) = &self.meta {
            let Some(have) = conn.meta().as_object() else {
                return false;
            };
            if !want.iter().all(|(k, v)| have.get(k) == Some(v)) {
                return false;
            }
        }
        true
    }
}

/// Which connections an operation means: a client, a connection, a filter, or all.
/// Set fields combine with AND; at least one must be set.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Selector {
    /// Every connection of this client.
    pub client_id: Option<String>,
    /// This one connection.
    pub conn_id: Option<String>,
    /// Connections matching this filter.
    pub filter: Filter,
    /// Every connection (needed to select everything on purpose).
    pub all: bool,
}

impl Selector {
    /// Whether nothing was selected on purpose (an API call with no selector is a 400).
    pub fn is_empty(&self) -> bool {
        self.client_id.is_none() && self.conn_id.is_none() && self.filter.is_empty() && !self.all
    }

    /// Whether `conn` is selected.
    pub fn matches(&self, conn: &Connection) -> bool {
        if self.is_empty() {
            return false;
        }
        if let Some(c) = &self.client_id {
            if conn.client_id() != c.as_str() {
                return false;
            }
        }
        if let Some(c) = &self.conn_id {
            if conn.id() != c.as_str() {
                return false;
            }
        }
        self.filter.matches(conn)
    }
}
