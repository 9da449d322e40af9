//! Origins (SPEC sections 2 and 6): whether a handshake's `Origin` is refused, and
//! the CORS headers that `/sse` (and the client assets) answer with, so a page on
//! another origin can open a stream or import the browser module.

use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;

/// `limits.allowed_origins`: empty = any origin.
#[derive(Clone, Debug, Default)]
pub(crate) struct Origins(Vec<String>);

impl Origins {
    pub(crate) fn new(allowed: Vec<String>) -> Self {
        Self(allowed)
    }

    /// Whether an `Origin` is present and not allowed (when a list is set).
    pub(crate) fn refused(&self, headers: &HeaderMap) -> bool {
        let allowed = &self.0;
        match headers.get(header::ORIGIN) {
            None => false,
            Some(_) if allowed.is_empty() => false,
            Some(o) => !o.to_str().is_ok_and(|o| allowed.iter().any(|a| a == o)),
        }
    }

    /// CORS for `/sse` and the client assets: see [`cors`].
    pub(crate) fn cors(&self, req: &HeaderMap, resp: &mut Response) {
        cors(self, req, resp)
    }
}

/// CORS for `/sse`: with `limits.allowed_origins` set, an allowed `Origin` is echoed
/// with credentials; with none set, `*` and no credentials.
fn cors(origins: &Origins, req: &HeaderMap, resp: &mut Response) {
    let h = resp.headers_mut();
    if origins.0.is_empty() {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        return;
    }
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(o) = req.get(header::ORIGIN) {
        if !origins.refused(req) {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o.clone());
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
}
