//! `[webhooks]` (SPEC section 3): where lifecycle events are POSTed, which ones, and
//! the batching, retry and overflow bounds. Checked at startup like every section.

use std::num::NonZeroU64;

use serde::{Deserialize, Serialize};
use tether_protocol::EventType;

/// A `[webhooks]` value that does not fit (the message names the key).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidWebhooks(String);

/// `[webhooks]`. An empty `url` turns webhooks off.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhooksSection {
    /// Receiver, `http://` or `https://`; empty = off.
    pub url: String,
    /// HMAC-SHA256 key of `X-Tether-Signature` (required with a `url`).
    pub secret: String,
    /// The event types sent (an unknown name is a startup error naming it).
    pub events: Vec<EventType>,
    /// Most events per POST.
    pub batch_max: NonZeroU64,
    /// How long a batch waits for more events after its first.
    pub batch_ms: u64,
    /// Most POSTs of one batch before it is dropped.
    pub max_attempts: NonZeroU64,
    /// Most events waiting (the batch in flight included); beyond, dropped.
    pub max_pending: NonZeroU64,
    /// Deadline of one POST.
    pub timeout_ms: NonZeroU64,
}

impl Default for WebhooksSection {
    fn default() -> Self {
        Self {
            url: String::new(),
            secret: String::new(),
            events: vec![EventType::ClientOnline, EventType::ClientOffline],
            batch_max: nz(100),
            batch_ms: 50,
            max_attempts: nz(8),
            max_pending: nz(10_000),
            timeout_ms: nz(5000),
        }
    }
}

fn nz(n: u64) -> NonZeroU64 {
    NonZeroU64::new(n).unwrap_or(NonZeroU64::MIN)
}

/// Longest `batch_ms`: a batch held longer than a minute is not "batching".
const MAX_BATCH_MS: u64 = 60_000;

impl WebhooksSection {
    /// Whether webhooks are on.
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }

    /// Checks the values serde cannot: the URL, the secret, the bounds.
    pub fn validate(&self) -> Result<(), InvalidWebhooks> {
        let invalid = |m: String| Err(InvalidWebhooks(m));
        if !self.enabled() {
            return Ok(());
        }
        let uri = self.url.parse::<http::Uri>().ok();
        let scheme_ok = uri
            .as_ref()
            .and_then(|u| u.scheme_str())
            .is_some_and(|s| s == "http" || s == "https");
        if !scheme_ok || uri.as_ref().and_then(|u| u.host()).is_none() {
            return invalid(format!(
                "webhooks.url {:?} must be an http:// or https:// URL",
                public_url(&self.url)
            ));
        }
        if self.secret.is_empty() {
            return invalid(
                "webhooks.secret must be set when webhooks.url is (it signs every POST)".into(),
            );
        }
        if self.events.is_empty() {
            return invalid("webhooks.events must name at least one event type".into());
        }
        if self.batch_ms > MAX_BATCH_MS {
            return invalid(format!("webhooks.batch_ms must be at most {MAX_BATCH_MS}"));
        }
        if self.batch_max > self.max_pending {
            return invalid(format!(
                "webhooks.batch_max ({}) must not exceed webhooks.max_pending ({})",
                self.batch_max, self.max_pending
            ));
        }
        Ok(())
    }
}

/// `url` without its userinfo (`https://user:pass@host/x` → `https://host/x`), for
/// logs, errors and `/api/webhooks`.
pub fn public_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.rsplit('@').next().unwrap_or_default().to_owned();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{host}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn check(toml: &str) -> String {
        Config::from_toml("t.toml", toml)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn bad_url_scheme_names_the_field() {
        let msg = check("[webhooks]\nurl = \"ftp://x\"\nsecret = \"s\"\n");
        assert!(
            msg.contains("webhooks.url") && msg.contains("ftp://x"),
            "{msg}"
        );
    }

    #[test]
    fn unknown_event_type_names_the_value_and_line() {
        let msg = check("[webhooks]\nurl = \"http://x\"\nsecret = \"s\"\nevents = [\"client.online\", \"client.gone\"]\n");
        assert!(
            msg.contains("client.gone") && msg.contains("line 4"),
            "{msg}"
        );
    }

    #[test]
    fn url_needs_a_secret_and_sane_bounds() {
        assert!(check("[webhooks]\nurl = \"http://x\"\n").contains("webhooks.secret"));
        let msg = check(
            "[webhooks]\nurl = \"http://x\"\nsecret = \"s\"\nbatch_max = 10\nmax_pending = 5\n",
        );
        assert!(msg.contains("webhooks.batch_max"), "{msg}");
        let msg = check("[webhooks]\nmax_attempts = 0\n");
        assert!(
            msg.contains("max_attempts") && msg.contains("line 2"),
            "{msg}"
        );
        let ok = Config::from_toml(
            "t.toml",
            "[webhooks]\nurl = \"https://h:1/p\"\nsecret = \"s\"\n",
        );
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn public_url_hides_userinfo() {
        assert_eq!(public_url("https://u:p@h:1/x?a@b"), "https://h:1/x?a@b");
        assert_eq!(public_url("http://h/x"), "http://h/x");
    }
}
