//! What every call shares to read its input and say what was wrong with it: JSON
//! bodies whose errors name the field (SPEC section 8), page sizes, channel names,
//! and the status of a failed broker call.

use axum::extract::rejection::QueryRejection;
use axum::extract::Query;
use axum::http::StatusCode;
use axum::response::Response;
use serde::de::DeserializeOwned;
use tether_core::BrokerError;
use tether_protocol::valid_channel;

use crate::respond::error_response;

/// Default and maximum page size of the paged calls.
pub(super) const PAGE_DEFAULT: usize = 100;
pub(super) const PAGE_MAX: usize = 1000;

/// Why a JSON body was refused.
#[derive(Debug, thiserror::Error)]
pub(super) enum BodyError {
    /// Not JSON, or not the one value expected.
    #[error("bad body: {0}")]
    Syntax(#[source] serde_json::Error),
    /// JSON, with a field that is wrong (named by its path: `where.idle_ms_gt`).
    #[error("{path}: {source}")]
    Field {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

/// Parses a JSON request body. The error, for a 400, names a bad field by its path
/// (`where.idle_ms_gt: invalid type: …`, SPEC section 8); bad JSON is `bad body: …`.
pub(super) fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, BodyError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let source = e.into_inner();
        if path == "." || source.is_syntax() || source.is_eof() {
            BodyError::Syntax(source)
        } else {
            BodyError::Field { path, source }
        }
    })?;
    // Text after the value is refused, as `serde_json::from_slice` does.
    de.end().map_err(BodyError::Syntax)?;
    Ok(value)
}

/// A 400 `bad_request` saying `message`.
pub(super) fn bad(message: impl AsRef<str>) -> Response {
    error_response(StatusCode::BAD_REQUEST, "bad_request", message.as_ref())
}

/// A 400 naming the channel rule, or `None` for a valid name.
pub(super) fn bad_channel(name: &str) -> Option<Response> {
    (!valid_channel(name)).then(|| bad("channel: names are 1-200 of A-Z a-z 0-9 _ . : / -"))
}

/// A `limit` out of bounds.
#[derive(Debug, thiserror::Error)]
#[error("limit must be 1 to {PAGE_MAX}")]
pub(super) struct BadLimit;

/// A page size (`limit`), defaulted and bounded.
pub(super) fn page_size(limit: Option<usize>) -> Result<usize, BadLimit> {
    let limit = limit.unwrap_or(PAGE_DEFAULT);
    if limit == 0 || limit > PAGE_MAX {
        return Err(BadLimit);
    }
    Ok(limit)
}

/// A paged call's query and its page size (`limit`, defaulted and bounded), or the
/// 400 naming what is wrong (boxed: an error this large stays off the stack).
pub(super) fn paged_query<Q>(
    query: Result<Query<Q>, QueryRejection>,
    limit: impl FnOnce(&Q) -> Option<usize>,
) -> Result<(Q, usize), Box<Response>> {
    let q = query.map_err(|e| Box::new(bad(e.body_text())))?.0;
    let size = page_size(limit(&q)).map_err(|e| Box::new(bad(e.to_string())))?;
    Ok((q, size))
}

/// The answer to a failed broker call: 503 when it may work later (unreachable, a
/// limit), 500 when it failed inside this node.
pub(super) fn broker_error(e: BrokerError) -> Response {
    let status = match e {
        BrokerError::Unavailable | BrokerError::Hub(_) => StatusCode::SERVICE_UNAVAILABLE,
        BrokerError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error_response(status, e.code(), e.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Outer {
        inner: Inner,
    }
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        n: u64,
    }

    #[test]
    fn a_bad_field_is_named_by_its_path() {
        let e = parse_body::<Outer>(br#"{"inner":{"n":"x"}}"#).unwrap_err();
        assert!(e.to_string().starts_with("inner.n: invalid type"), "{e}");
        let e = parse_body::<Outer>(b"{nope").unwrap_err();
        assert!(e.to_string().starts_with("bad body: "), "{e}");
        let e = parse_body::<Outer>(br#"{"inner":{"n":1}} x"#).unwrap_err();
        assert!(e.to_string().starts_with("bad body: trailing"), "{e}");
    }

    #[test]
    fn page_sizes_are_bounded() {
        assert_eq!(page_size(None).ok(), Some(PAGE_DEFAULT));
        assert_eq!(page_size(Some(PAGE_MAX)).ok(), Some(PAGE_MAX));
        assert!(page_size(Some(0)).is_err());
        assert!(page_size(Some(PAGE_MAX + 1)).is_err());
    }
}
