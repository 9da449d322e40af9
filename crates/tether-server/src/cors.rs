//! Origins (SPEC sections 2 and 6): whether a handshake's `Origin` is refused, and
//! the CORS headers that `/sse` (and the client assets) answer with, so a page on
//! another origin can open a stream or import the browser module.

use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;

use crate::app::App;

/// Whether an `Origin` is present and not in `limits.allowed_origins` (when set).
pub(crate) fn origin_refused(app: &App, headers: &HeaderMap) -> bool {
    let allowed = &app.cfg.limits.allowed_origins;
    match headers.get(header::ORIGIN) {
        None => false,
        Some(_) if allowed.is_empty() => false,
        Some(o) => !o.to_str().is_ok_and(|o| allowed.iter().any(|a| a == o)),
    }
}

/// CORS for `/sse`: with `limits.allowed_origins` set, an allowed `Origin` is echoed
/// with credentials; with none set, `*` and no credentials.
pub(crate) fn cors(app: &App, req: &HeaderMap, resp: &mut Response) {
    let h = resp.headers_mut();
    if app.cfg.limits.allowed_origins.is_empty() {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        return;
    }
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(o) = req.get(header::ORIGIN) {
        if !origin_refused(app, req) {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o.clone());
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
    }
}
