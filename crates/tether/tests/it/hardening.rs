//! The server API against hostile or unusual input: the `Authorization` scheme in any
//! case, 400s that name the offending field, and history that serves what publish
//! accepted, however deeply nested.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use support::*;

const KEY: &str = "api-key-api-key-api-key-api-key";

/// The API key's scheme is case-insensitive (RFC 7235 2.1); the key itself is not.
#[tokio::test(flavor = "multi_thread")]
async fn the_api_key_bearer_scheme_is_case_insensitive() {
    let s = start(|c| c.api.key = KEY.into()).await;
    let status = |auth: String| {
        let req = s
            .http
            .get(s.api_url("/api/stats"))
            .header("authorization", auth);
        async move { req.send().await.unwrap().status().as_u16() }
    };
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        assert_eq!(status(format!("{scheme} {KEY}")).await, 200, "{scheme}");
    }
    assert_eq!(status(format!("Bearer {}", KEY.to_uppercase())).await, 401);
    assert_eq!(status(format!("Basic {KEY}")).await, 401);
    assert_eq!(status(format!("Bearer{KEY}")).await, 401);
    assert_eq!(status(KEY.to_owned()).await, 401);
    s.assert_clean().await;
}
