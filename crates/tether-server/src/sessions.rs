//! Dashboard sessions: the cookie `/admin` hands out for the API key, token →
//! expiry, bounded in number and time, compared in constant time. A leaf.

use std::collections::HashMap;
use std::time::Duration;

use axum::http::{header, HeaderMap};
use parking_lot::Mutex;
use subtle::ConstantTimeEq;
use tokio::time::Instant;

/// The cookie's name.
pub const COOKIE: &str = "tether_session";
/// How long a session lasts.
pub(crate) const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most sessions held; the oldest go first beyond it.
const MAX_SESSIONS: usize = 1024;

/// Dashboard sessions: token → expiry.
#[derive(Debug, Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Instant>>,
}

impl Sessions {
    pub(crate) fn create(&self) -> String {
        let token = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let now = Instant::now();
        let mut map = self.map.lock();
        map.retain(|_, exp| *exp > now);
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map.iter().min_by_key(|(_, e)| **e).map(|(k, _)| k.clone()) {
                map.remove(&oldest);
            }
        }
        map.insert(token.clone(), now + SESSION_TTL);
        token
    }

    /// Whether the request carries a live session cookie.
    pub fn valid(&self, headers: &HeaderMap) -> bool {
        let Some(token) = cookie(headers, COOKIE) else {
            return false;
        };
        let now = Instant::now();
        // Compare every live token in constant time, so timing says nothing.
        self.map
            .lock()
            .iter()
            .filter(|(_, exp)| **exp > now)
            .fold(false, |found, (t, _)| {
                found | bool::from(t.as_bytes().ct_eq(token.as_bytes()))
            })
    }
}

pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn cookies_are_parsed_and_sessions_checked() {
        let s = Sessions::default();
        let token = s.create();
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("a=b; {COOKIE}={token}")).unwrap(),
        );
        assert!(s.valid(&h));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("tether_session=nope"),
        );
        assert!(!s.valid(&h));
        assert!(!s.valid(&HeaderMap::new()));
    }
}
