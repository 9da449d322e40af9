//! The API's doors (SPEC section 8): with `[api] key`, every call needs
//! `Authorization: Bearer KEY` (the scheme in any case, the key compared in constant
//! time) or a dashboard session; with no key, only `Host` localhost/127.0.0.1/[::1]
//! is served and POSTs must be `application/json` (no DNS rebinding, no cross-site
//! form posts).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use super::Api;
use crate::respond::error_response;

/// The API's doors (see the module docs).
pub(super) async fn doors(State(api): State<Arc<Api>>, req: Request, next: Next) -> Response {
    // With the API on the client listener, an API request is not a pending handshake.
    if let Some(info) = req.extensions().get::<crate::net::SocketInfo>() {
        drop(info.take_pending());
    }
    let key = api.key.as_bytes();
    if !key.is_empty() {
        // The dashboard's page and files, and the key-for-cookie exchange.
        if crate::admin::opens_without_key(req.uri().path()) {
            return next.run(req).await;
        }
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::auth::bearer)
            .unwrap_or("");
        if bool::from(given.as_bytes().ct_eq(key)) {
            return next.run(req).await;
        }
        // A dashboard session: cookie-authenticated POSTs must also be JSON, so no
        // form on another site can make one (on top of SameSite=Strict).
        if api.sessions.valid(req.headers()) && (req.method() != Method::POST || is_json(&req)) {
            return next.run(req).await;
        }
        return error_response(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong API key",
        );
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !local_host(host) {
        return error_response(
            StatusCode::FORBIDDEN,
            "forbidden_host",
            "with no [api] key the API answers only Host localhost, 127.0.0.1 or [::1]",
        );
    }
    if req.method() == Method::POST && !is_json(&req) {
        return error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "POST bodies must be Content-Type: application/json",
        );
    }
    next.run(req).await
}

fn is_json(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

fn local_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((h, tail)) if tail.is_empty() || tail.starts_with(':') => return h == "::1",
            _ => return false,
        }
    } else {
        host.split(':').next().unwrap_or("")
    };
    name.eq_ignore_ascii_case("localhost") || name == "127.0.0.1"
}

#[cfg(test)]
mod tests {
    use super::local_host;

    #[test]
    fn only_loopback_hosts_pass() {
        for ok in [
            "localhost",
            "localhost:7701",
            "127.0.0.1",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:7701",
            "LOCALHOST",
        ] {
            assert!(local_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.com",
            "127.0.0.1.evil.com",
            "localhost.evil",
            "[::2]",
            "[::1]x",
            "10.0.0.1",
        ] {
            assert!(!local_host(bad), "{bad}");
        }
    }
}
