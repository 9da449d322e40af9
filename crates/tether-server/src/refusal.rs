//! A refused handshake, rendered in SPEC section 2's three forms from one value, so
//! the forms cannot disagree: plain HTTP (status, `{"error","message"}` and
//! `Retry-After` where it applies); an announced close (`closing` carrying `error`,
//! `message` and `retry_ms`, then the refusal's 44xx/45xx code) for a WebSocket
//! opened with `?refusal=close`; and, for SSE's transient refusals, a `200` stream
//! of `retry:` and the same `closing` event. The transports only carry the bytes.

use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use tether_protocol::{Closing, Refusal};

/// A refusal and the retry delay it advertises (chosen once, shared by every form).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Refused {
    refusal: Refusal,
    retry_ms: u64,
}

impl Refused {
    /// `refusal`, with a retry delay picked for it now.
    pub(crate) fn new(refusal: Refusal) -> Self {
        Self {
            refusal,
            retry_ms: retry_ms(refusal),
        }
    }

    /// The HTTP form.
    pub(crate) fn http(self) -> Response {
        let r = self.refusal;
        let status =
            StatusCode::from_u16(r.http_status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let mut resp = crate::respond::error_response(status, r.error(), r.message());
        if r.has_retry_after() {
            let secs = self.retry_ms.div_ceil(1000).max(1);
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(http::header::RETRY_AFTER, v);
            }
        }
        resp
    }

    /// The close that follows the announcement: the refusal's close code, its
    /// reconnect rule and (when it says to reconnect) the retry delay.
    pub(crate) fn closing(self) -> Closing {
        let code = self.refusal.close_code();
        Closing {
            code,
            reason: self.refusal.error().into(),
            reconnect: code.reconnect(),
            retry_ms: code.reconnect().then_some(self.retry_ms),
        }
    }

    /// The `closing` announcement's JSON: the close's fields plus `error` and
    /// `message`.
    pub(crate) fn closing_json(self) -> serde_json::Value {
        let c = self.closing();
        serde_json::json!({
            "type": "closing",
            "code": c.code.0,
            "reason": c.reason,
            "reconnect": c.reconnect,
            "retry_ms": c.retry_ms,
            "error": self.refusal.error(),
            "message": self.refusal.message(),
        })
    }

    /// The SSE form's whole body: `retry:` (so a native `EventSource` waits that
    /// long), then `event: closing`.
    pub(crate) fn sse_body(self) -> String {
        format!(
            "retry: {}\n\nevent: closing\ndata: {}\n\n",
            self.retry_ms,
            self.closing_json()
        )
    }
}

/// How long a refused client should wait before trying again.
fn retry_ms(refusal: Refusal) -> u64 {
    match refusal {
        Refusal::RateLimited => 1000,
        Refusal::IpLimit => 5000,
        Refusal::Draining
        | Refusal::ServerFull
        | Refusal::BrokerUnavailable
        | Refusal::UpstreamUnavailable => 1000 + fastrand::u64(..4000),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_carries_the_same_code_error_and_retry() {
        for r in [
            Refusal::Draining,
            Refusal::RateLimited,
            Refusal::IpLimit,
            Refusal::ServerFull,
            Refusal::Unauthorized,
            Refusal::ClientLimit,
            Refusal::UpstreamUnavailable,
        ] {
            let refused = Refused::new(r);
            let json = refused.closing_json();
            assert_eq!(json["code"], r.close_code().0);
            assert_eq!(json["error"], r.error());
            assert_eq!(json["reason"], r.error());
            assert_eq!(refused.closing().code, r.close_code());
            let sse = refused.sse_body();
            assert!(
                sse.starts_with(&format!("retry: {}\n\n", refused.retry_ms)),
                "{sse}"
            );
            assert!(sse.contains(&format!("data: {json}\n\n")), "{sse}");
            let http = refused.http();
            assert_eq!(http.status().as_u16(), r.http_status());
            if r.close_code().reconnect() {
                assert_eq!(json["retry_ms"], refused.retry_ms);
            } else {
                assert!(json["retry_ms"].is_null());
            }
            if let Some(after) = http.headers().get(http::header::RETRY_AFTER) {
                let secs: u64 = after.to_str().unwrap().parse().unwrap();
                assert_eq!(secs, refused.retry_ms.div_ceil(1000).max(1));
            }
        }
    }
}
