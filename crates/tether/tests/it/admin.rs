//! `/admin`: key-for-cookie exchange, the cookie opening the API to the dashboard, and
//! the dashboard's embedded files (types, CSP, caching, doors).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn the_key_buys_a_strict_httponly_cookie_that_opens_the_api() {
    let s = start(|c| c.api.key = "k3y-k3y-k3y".into()).await;
    let page = s.http.get(s.api_url("/admin")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page
        .text()
        .await
        .unwrap()
        .contains("/admin/assets/admin.js"));
    let wrong = s
        .http
        .post(s.api_url("/admin/session"))
        .json(&json!({"key": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert!(wrong.headers().get("set-cookie").is_none());
    let ok = s
        .http
        .post(s.api_url("/admin/session"))
        .json(&json!({"key": "k3y-k3y-k3y"}))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let cookie = ok.headers()["set-cookie"].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_owned();
    let r = s
        .http
        .get(s.api_url("/api/stats"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = s
        .http
        .get(s.api_url("/api/events"))
        .header("cookie", &pair)
        .send()
        .await
        .unwrap();
    assert_eq!(
        (
            r.status().as_u16(),
            r.headers()["content-type"].to_str().unwrap()
        ),
        (200, "text/event-stream")
    );
    drop(r);
    // A cross-site form post carrying the cookie is refused; the dashboard's JSON call is not.
    let form = s
        .http
        .post(s.api_url("/api/disconnect"))
        .header("cookie", &pair)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("all=true")
        .send()
        .await
        .unwrap();
    assert_eq!(form.status(), 401);
    let r = s
        .http
        .post(s.api_url("/api/disconnect"))
        .header("cookie", &pair)
        .json(&json!({"all": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let forged = s
        .http
        .get(s.api_url("/api/stats"))
        .header("cookie", "tether_session=forged")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keyless_admin_is_local_only() {
    let s = start(|_| {}).await;
    assert_eq!(
        s.http
            .get(s.api_url("/admin"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = s
        .http
        .get(s.api_url("/admin"))
        .header("host", "attacker.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = s
        .http
        .post(s.api_url("/admin/session"))
        .json(&json!({"key": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

/// GETs `path` on the API listener with no key, and optional extra headers.
async fn bare_get(s: &TestServer, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = s.http.get(s.api_url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboard_files_have_their_type_a_strict_csp_and_cache_headers() {
    let s = start(|c| c.api.key = "k3y-k3y-k3y".into()).await;
    // With a key, the API is closed without it, but the page and its files are not
    // (they hold nothing secret: the data comes from the API).
    assert_eq!(bare_get(&s, "/api/stats", &[]).await.status(), 401);
    let files = [
        ("/admin", "text/html; charset=utf-8", "no-store"),
        (
            "/admin/assets/admin.js",
            "text/javascript; charset=utf-8",
            "no-cache",
        ),
        (
            "/admin/assets/admin.css",
            "text/css; charset=utf-8",
            "no-cache",
        ),
        (
            "/admin/assets/vendor/uplot-1.6.32/uPlot.iife.min.js",
            "text/javascript; charset=utf-8",
            "public, max-age=31536000, immutable",
        ),
        (
            "/admin/assets/vendor/uplot-1.6.32/uPlot.min.css",
            "text/css; charset=utf-8",
            "public, max-age=31536000, immutable",
        ),
    ];
    for (path, content_type, cache) in files {
        let r = bare_get(&s, path, &[]).await;
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(header(&r, "content-type"), content_type, "{path}");
        assert_eq!(header(&r, "cache-control"), cache, "{path}");
        assert_eq!(header(&r, "x-content-type-options"), "nosniff", "{path}");
        let csp = header(&r, "content-security-policy");
        for part in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
        ] {
            assert!(csp.contains(part), "{path}: {csp}");
        }
        assert!(!csp.contains("unsafe-inline"), "{path}: {csp}");
        // Revalidation: the same ETag answers 304 with no body.
        let etag = header(&r, "etag");
        assert!(etag.starts_with('"') && etag.len() > 2, "{path}: {etag}");
        let again = bare_get(&s, path, &[("if-none-match", &etag)]).await;
        assert_eq!(again.status(), 304, "{path}");
        assert!(again.bytes().await.unwrap().is_empty(), "{path}");
    }
    // Every file the page names is served.
    let page = bare_get(&s, "/admin", &[]).await.text().await.unwrap();
    for named in page
        .split(['"', '\''])
        .filter(|p| p.starts_with("/admin/assets/"))
    {
        assert_eq!(bare_get(&s, named, &[]).await.status(), 200, "{named}");
    }
    assert!(
        !page.contains("<script>") && !page.contains("style="),
        "inline script or style"
    );
    let js = bare_get(&s, "/admin/assets/admin.js", &[]).await;
    assert!(js.text().await.unwrap().contains("/api/events"));
    let missing = bare_get(&s, "/admin/assets/nope.js", &[]).await;
    assert_eq!(missing.status(), 404);
    assert_eq!(header(&missing, "content-type"), "application/json");
    // Only the files in the table: nothing else under the assets folder is served.
    let other = bare_get(&s, "/admin/assets/vendor/uplot-1.6.32/LICENSE", &[]).await;
    assert_eq!(other.status(), 404);
    s.assert_clean().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_no_key_dashboard_files_answer_only_a_local_host() {
    let s = start(|_| {}).await;
    for path in ["/admin", "/admin/assets/admin.js", "/admin/assets/nope.js"] {
        let r = bare_get(&s, path, &[("host", "attacker.example")]).await;
        assert_eq!(r.status(), 403, "{path}");
    }
    let r = bare_get(&s, "/admin/assets/admin.js", &[("host", "localhost")]).await;
    assert_eq!(r.status(), 200);
    s.assert_clean().await;
}
