//! What a proxied request looks like to its upstream (SPEC section 9): the URL (the
//! client's query without `token`) and the headers, forwarded as a reverse proxy
//! does: hop-by-hop headers and those the client's `Connection` names dropped,
//! client-forged `X-Tether-*`, `Forwarded` and `X-Forwarded-*` removed, Tether's own
//! added. Pure functions, shared by the WebSocket and SSE proxy routes.

use axum::http::{header, HeaderMap, HeaderName, HeaderValue};

use std::sync::Arc;

use crate::config::ProxyRoute;

/// Request headers that describe one hop, never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "host",
    "connection",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "content-length",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-accept",
];

/// Whether a header the client sent must not reach the upstream.
fn stripped(name: &HeaderName) -> bool {
    let n = name.as_str();
    HOP_BY_HOP.contains(&n)
        || n.starts_with("x-tether-")
        || n == "forwarded"
        || n.starts_with("x-forwarded-")
}

/// The upstream URL: the route's, plus the client's query without `token`.
pub(crate) fn upstream_url(route: &ProxyRoute, query: Option<&str>) -> String {
    let kept: Vec<(String, String)> = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .filter(|(k, _)| k != "token")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        return route.upstream.clone();
    }
    let q = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(kept)
        .finish();
    let sep = if route.upstream.contains('?') {
        '&'
    } else {
        '?'
    };
    format!("{}{sep}{q}", route.upstream)
}

/// The headers the upstream gets: the client's, less hop-by-hop (the fixed list and
/// every header its `Connection` headers name, RFC 9110 7.6.1) and client-forged
/// `X-Tether-*`/`Forwarded`/`X-Forwarded-*`, plus Tether's own.
pub(crate) fn upstream_headers(
    client: &HeaderMap,
    client_id: &str,
    conn_id: &str,
    ip: std::net::IpAddr,
) -> HeaderMap {
    // Header names are lower case in a `HeaderMap`; the options are made so.
    let named: Vec<String> = client
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    let mut h = HeaderMap::new();
    for (k, v) in client {
        if !stripped(k) && !named.iter().any(|n| n == k.as_str()) {
            h.append(k.clone(), v.clone());
        }
    }
    let mut add = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            h.insert(name, v);
        }
    };
    add("x-tether-client-id", client_id);
    add("x-tether-conn-id", conn_id);
    add("x-forwarded-for", &ip.to_string());
    h
}

/// The client TLS config for `wss://` proxy upstreams: the system's trust store
/// (`SSL_CERT_FILE` / `SSL_CERT_DIR` override it, as for OpenSSL), ring provider.
/// Built once at startup; `None` when no root could be loaded (then `wss://` routes
/// fail to connect with a clear error, and the log says why at startup).
pub(crate) fn upstream_client_config() -> Option<Arc<rustls::ClientConfig>> {
    let loaded = rustls_native_certs::load_native_certs();
    for e in &loaded.errors {
        tracing::warn!(error = %e, "loading the system's trusted roots");
    }
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(loaded.certs);
    if added == 0 {
        tracing::warn!("no trusted root certificates: wss:// upstreams cannot be verified");
        return None;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Some(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forged_and_hop_by_hop_headers_are_stripped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("x-tether-client-id", "forged"),
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6"),
            ("connection", "upgrade"),
            ("sec-websocket-key", "abc"),
            ("cookie", "a=b"),
            ("authorization", "Bearer t"),
            ("origin", "https://app.example"),
            ("sec-websocket-protocol", "chat"),
        ] {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = upstream_headers(&h, "alice", "n1-x-1", "10.1.2.3".parse().unwrap());
        assert_eq!(out["x-tether-client-id"], "alice");
        assert_eq!(out["x-tether-conn-id"], "n1-x-1");
        assert_eq!(out["x-forwarded-for"], "10.1.2.3");
        assert!(
            out.get("forwarded").is_none()
                && out.get("connection").is_none()
                && out.get("sec-websocket-key").is_none()
        );
        for kept in [
            "cookie",
            "authorization",
            "origin",
            "sec-websocket-protocol",
        ] {
            assert!(out.get(kept).is_some(), "{kept}");
        }
    }

    /// RFC 9110 7.6.1: the headers a `Connection` header names are hop-by-hop too,
    /// in any case, from every `Connection` header, in comma-separated lists.
    #[test]
    fn headers_named_in_connection_are_stripped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "Upgrade, X-Drop-A ,keep-alive"),
            ("connection", "x-drop-b,, X-DROP-C"),
            ("x-drop-a", "1"),
            ("x-drop-b", "2"),
            ("x-drop-c", "3"),
            ("x-keep", "4"),
            ("cookie", "a=b"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = upstream_headers(&h, "alice", "n1-x-1", "10.1.2.3".parse().unwrap());
        for gone in ["x-drop-a", "x-drop-b", "x-drop-c", "connection"] {
            assert!(out.get(gone).is_none(), "{gone}");
        }
        assert_eq!(out["x-keep"], "4");
        assert_eq!(out["cookie"], "a=b");
        // Naming Tether's own headers cannot remove them.
        let mut h = HeaderMap::new();
        h.append(
            "connection",
            HeaderValue::from_static("x-tether-client-id, x-forwarded-for"),
        );
        let out = upstream_headers(&h, "alice", "n1-x-1", "10.1.2.3".parse().unwrap());
        assert_eq!(out["x-tether-client-id"], "alice");
        assert_eq!(out["x-forwarded-for"], "10.1.2.3");
    }

    #[test]
    fn token_is_removed_from_the_upstream_query() {
        let r = ProxyRoute {
            path: "/chat".into(),
            upstream: "ws://127.0.0.1:9/ws".into(),
            connect_timeout_ms: std::num::NonZeroU64::MIN,
            upstream_idle_timeout_ms: 0,
        };
        assert_eq!(
            upstream_url(&r, Some("token=secret&room=5")),
            "ws://127.0.0.1:9/ws?room=5"
        );
        assert_eq!(
            upstream_url(&r, Some("token=secret")),
            "ws://127.0.0.1:9/ws"
        );
        assert_eq!(upstream_url(&r, None), "ws://127.0.0.1:9/ws");
    }
}

/// Why a proxy route's upstream could not be reached (the client gets 502
/// `upstream_unavailable`; this goes to the log).
#[derive(Debug, thiserror::Error)]
pub(crate) enum UpstreamError {
    /// The route's URL, with the client's query, is not a valid request.
    #[error("bad upstream request: {0}")]
    Request(#[source] Box<tokio_tungstenite::tungstenite::Error>),
    /// A `wss://` upstream and no root certificates to verify it.
    #[error("no trusted root certificates to verify a wss:// upstream")]
    NoTrustRoots,
    /// Nothing within the route's `connect_timeout_ms`.
    #[error("no answer within {0} ms")]
    Timeout(u64),
    /// The WebSocket handshake with the upstream failed.
    #[error("websocket: {0}")]
    WebSocket(#[source] Box<tokio_tungstenite::tungstenite::Error>),
    /// The SSE request failed.
    #[error("http: {0}")]
    Http(#[source] reqwest::Error),
    /// The SSE upstream answered, but not with a success.
    #[error("status {0}")]
    Status(reqwest::StatusCode),
}
