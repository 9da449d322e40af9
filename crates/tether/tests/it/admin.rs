//! `/admin`: key-for-cookie exchange, and the cookie opening the API to the dashboard.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::support;

use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread")]
async fn the_key_buys_a_strict_httponly_cookie_that_opens_the_api() {
    let s = start(|c| c.api.key = "k3y-k3y-k3y".into()).await;
    let page = s.http.get(s.api_url("/admin")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("/api/events"));
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
