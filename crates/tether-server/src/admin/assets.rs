//! The dashboard's files, embedded at build time from `assets/admin/` (no CDN, no
//! build step): `GET /admin` is `index.html`, `GET /admin/assets/{file}` the rest.
//! Every answer carries a Content-Security-Policy that allows only this origin's
//! scripts, styles and API calls (no inline script or style), and an `ETag` from the
//! file's content. The vendored chart library has its version in its path and is
//! cached for a year; the dashboard's own files are revalidated (`no-cache`).

use axum::body::Body;
use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;

use crate::respond::error_response;

/// What the dashboard may load: its own files and API calls, nothing inline, no frames.
pub(crate) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; \
    frame-ancestors 'none'";

/// How a file may be cached.
#[derive(Clone, Copy)]
enum Cache {
    /// Never stored (the page: small, and always the one matching the binary).
    NoStore,
    /// Stored but revalidated with its `ETag` (the dashboard's own script and style).
    Revalidate,
    /// Its path names its version: cached for a year.
    Immutable,
}

impl Cache {
    fn header(self) -> &'static str {
        match self {
            Cache::NoStore => "no-store",
            Cache::Revalidate => "no-cache",
            Cache::Immutable => "public, max-age=31536000, immutable",
        }
    }
}

struct Asset {
    body: &'static [u8],
    content_type: &'static str,
    cache: Cache,
    hash: u64,
}

macro_rules! asset {
    ($file:literal, $content_type:literal, $cache:expr) => {{
        const BODY: &[u8] = include_bytes!(concat!("../../assets/admin/", $file));
        Asset {
            body: BODY,
            content_type: $content_type,
            cache: $cache,
            hash: fnv1a(BODY),
        }
    }};
}

static PAGE: Asset = asset!("index.html", "text/html; charset=utf-8", Cache::NoStore);

/// The files under `/admin/assets/`, by name. The chart library is uPlot 1.6.32 (MIT,
/// its LICENSE beside it), from `npm pack uplot`: `dist/uPlot.iife.min.js` and
/// `dist/uPlot.min.css`. Another version goes in a folder named for it (the path is
/// what lets browsers cache it for a year), here and in `index.html`.
static FILES: &[(&str, Asset)] = &[
    (
        "admin.js",
        asset!(
            "admin.js",
            "text/javascript; charset=utf-8",
            Cache::Revalidate
        ),
    ),
    (
        "admin.css",
        asset!("admin.css", "text/css; charset=utf-8", Cache::Revalidate),
    ),
    (
        "vendor/uplot-1.6.32/uPlot.iife.min.js",
        asset!(
            "vendor/uplot-1.6.32/uPlot.iife.min.js",
            "text/javascript; charset=utf-8",
            Cache::Immutable
        ),
    ),
    (
        "vendor/uplot-1.6.32/uPlot.min.css",
        asset!(
            "vendor/uplot-1.6.32/uPlot.min.css",
            "text/css; charset=utf-8",
            Cache::Immutable
        ),
    ),
];

/// FNV-1a, 64 bits, computed at build time: a content tag for `ETag`, not a MAC.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        h ^= bytes[i] as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    h
}

/// `GET /admin`: the dashboard page (it asks for the key when the API has one and
/// the browser has no session yet).
pub(super) async fn page(headers: HeaderMap) -> Response {
    serve(&PAGE, &headers)
}

/// `GET /admin/assets/{file}`.
pub(super) async fn file(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match FILES.iter().find(|(n, _)| *n == name) {
        Some((_, asset)) => serve(asset, &headers),
        None => error_response(StatusCode::NOT_FOUND, "not_found", "no such dashboard file"),
    }
}

fn serve(asset: &Asset, req: &HeaderMap) -> Response {
    let etag = format!("\"{:016x}\"", asset.hash);
    let fresh = req
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*");
    let mut resp = if fresh {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        Response::new(Body::from(asset.body))
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    let fixed = [
        (header::CONTENT_TYPE, asset.content_type),
        (header::CACHE_CONTROL, asset.cache.header()),
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
    ];
    for (name, value) in fixed {
        h.insert(name, HeaderValue::from_static(value));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_matching_etag_is_not_modified_and_another_is_served() {
        let (_, js) = &FILES[0];
        let full = serve(js, &HeaderMap::new());
        assert_eq!(full.status(), StatusCode::OK);
        let tag = full.headers()[header::ETAG].clone();
        let mut req = HeaderMap::new();
        req.insert(header::IF_NONE_MATCH, tag);
        assert_eq!(serve(js, &req).status(), StatusCode::NOT_MODIFIED);
        req.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"0\""));
        assert_eq!(serve(js, &req).status(), StatusCode::OK);
    }

    #[test]
    fn every_file_has_its_own_tag() {
        let mut tags: Vec<u64> = FILES.iter().map(|(_, a)| a.hash).collect();
        tags.push(PAGE.hash);
        tags.sort_unstable();
        tags.dedup();
        assert_eq!(tags.len(), FILES.len() + 1);
    }
}
