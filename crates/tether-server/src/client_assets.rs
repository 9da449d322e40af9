//! The browser SDK served by the binary on the client listener (SPEC section 13):
//! `GET /client/tether.js` and `GET /client/tether.d.ts`, embedded at build time from
//! `clients/js/`, with a JavaScript / TypeScript content type and the same
//! `Access-Control-Allow-Origin` as `/sse`, so a page on another origin can import it.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::Router;

use crate::edge::Edge;

const TETHER_JS: &str = include_str!("../../../clients/js/tether.js");
const TETHER_DTS: &str = include_str!("../../../clients/js/tether.d.ts");

/// The two routes, with their state.
pub(crate) fn router(edge: Arc<Edge>) -> Router {
    Router::new()
        .route("/client/tether.js", get(js))
        .route("/client/tether.d.ts", get(dts))
        .with_state(edge)
}

async fn js(State(edge): State<Arc<Edge>>, headers: HeaderMap) -> Response {
    asset(&edge, &headers, TETHER_JS, "text/javascript; charset=utf-8")
}

async fn dts(State(edge): State<Arc<Edge>>, headers: HeaderMap) -> Response {
    asset(
        &edge,
        &headers,
        TETHER_DTS,
        "application/typescript; charset=utf-8",
    )
}

fn asset(edge: &Edge, req: &HeaderMap, body: &'static str, content_type: &'static str) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    edge.gate.origins.cors(req, &mut resp);
    resp
}
