//! `/admin`: the dashboard, and the exchange of the API key for a session cookie
//! (`SameSite=Strict`, `HttpOnly`) that the dashboard's calls and its `/api/events`
//! stream then use. Sessions live in memory, bounded in number and time.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::respond::{error_response, json_response};
use crate::sessions::Sessions;
use crate::sessions::{COOKIE, SESSION_TTL};

/// What the dashboard's login uses: the API key, whether the API is on TLS (the
/// cookie is then `Secure`) and the sessions.
#[derive(Debug)]
pub(crate) struct Login {
    pub(crate) key: String,
    pub(crate) tls: bool,
    pub(crate) sessions: Arc<Sessions>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    key: String,
}

/// `POST /admin/session` `{"key"}` → the session cookie.
pub(crate) async fn session(State(login): State<Arc<Login>>, body: Bytes) -> Response {
    let key = login.key.as_bytes();
    if key.is_empty() {
        return error_response(
            StatusCode::BAD_REQUEST,
            "no_key",
            "the API has no key: no session is needed",
        );
    }
    let Ok(given) = serde_json::from_slice::<Credentials>(&body) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "body must be {\"key\": \"...\"}",
        );
    };
    if !bool::from(given.key.as_bytes().ct_eq(key)) {
        return error_response(StatusCode::UNAUTHORIZED, "unauthorized", "wrong key");
    }
    let token = login.sessions.create();
    let mut r = json_response(StatusCode::OK, serde_json::json!({"session": "created"}));
    // Over TLS the cookie is also `Secure`: it never travels in clear text.
    let secure = if login.tls { "; Secure" } else { "" };
    let cookie = format!(
        "{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
        SESSION_TTL.as_secs()
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// `GET /admin`: the dashboard (it asks for the key when the API has one and the
/// browser has no session yet).
pub(crate) async fn page() -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        Html(DASHBOARD),
    )
        .into_response()
}

const DASHBOARD: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Tether</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
 header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:24px;align-items:baseline}
 header h1{font-size:18px;margin:0} main{padding:16px 20px;display:grid;gap:16px;grid-template-columns:1fr 1fr}
 section{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:12px 16px}
 h2{font-size:14px;margin:0 0 8px} table{border-collapse:collapse;width:100%} td,th{text-align:left;padding:3px 6px;border-bottom:1px solid #eef0f4;font-variant-numeric:tabular-nums}
 .stat{display:inline-block;margin-right:18px} .stat b{font-size:20px;display:block}
 #events{font:12px ui-monospace,monospace;max-height:320px;overflow:auto} #login{grid-column:1/3}
 .wide{grid-column:1/3}
</style></head><body>
<header><h1>Tether</h1><span id="node"></span><span id="state"></span></header>
<main>
 <section id="login" hidden><h2>API key</h2><form id="f"><input id="key" type="password" autocomplete="current-password" placeholder="[api] key"> <button>Open</button> <span id="err"></span></form></section>
 <section class="wide"><h2>Node</h2><div id="stats"></div></section>
 <section><h2>Connections</h2><table id="conns"><thead><tr><th>conn</th><th>client</th><th>transport</th><th>idle ms</th><th>channels</th></tr></thead><tbody></tbody></table></section>
 <section><h2>Channels</h2><table id="chans"><thead><tr><th>name</th><th>subscribers</th><th>clients</th></tr></thead><tbody></tbody></table></section>
 <section class="wide"><h2>Lifecycle events</h2><div id="events"></div></section>
</main>
<script>
const $ = (s) => document.querySelector(s);
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
let es;
async function get(p) { const r = await fetch(p, {credentials: "same-origin"}); if (r.status === 401) throw 401; return r.json(); }
async function refresh() {
  try {
    const s = await get("/api/stats");
    $("#login").hidden = true;
    $("#node").textContent = "node " + s.node_id;
    $("#state").textContent = s.draining ? "draining" : "serving";
    const c = s.connections;
    $("#stats").innerHTML = [["ws", c.ws], ["sse", c.sse], ["proxy", c.proxy], ["clients", s.clients], ["channels", s.channels],
      ["max connections", s.max_connections], ["pending handshakes", s.pending_handshakes], ["tasks", s.tasks]]
      .map(([k, v]) => `<span class="stat"><b>${esc(v)}</b>${esc(k)}</span>`).join("");
    const conns = await get("/api/connections?limit=50");
    $("#conns tbody").innerHTML = conns.connections.map((x) =>
      `<tr><td>${esc(x.conn_id)}</td><td>${esc(x.client_id)}</td><td>${esc(x.transport)}</td><td>${esc(x.idle_ms)}</td><td>${esc(x.channels.join(" "))}</td></tr>`).join("");
    const chans = await get("/api/channels");
    $("#chans tbody").innerHTML = chans.channels.map((x) =>
      `<tr><td>${esc(x.name)}</td><td>${esc(x.subscribers)}</td><td>${esc(x.clients)}</td></tr>`).join("");
    if (!es) {
      es = new EventSource("/api/events");
      for (const t of ["connection.opened","connection.closed","client.online","client.offline","subscription.added","subscription.removed","channel.occupied","channel.vacated"]) {
        es.addEventListener(t, (e) => {
          const v = JSON.parse(e.data);
          const line = document.createElement("div");
          line.textContent = `${v.at} ${v.type} ${v.client_id ?? ""} ${v.conn_id ?? ""} ${v.channel ?? ""} ${v.code ?? ""}`;
          $("#events").prepend(line);
          while ($("#events").childElementCount > 200) $("#events").lastChild.remove();
        });
      }
    }
  } catch (e) {
    if (e === 401) $("#login").hidden = false;
  }
}
$("#f").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const r = await fetch("/admin/session", {method: "POST", headers: {"content-type": "application/json"},
    body: JSON.stringify({key: $("#key").value}), credentials: "same-origin"});
  $("#err").textContent = r.ok ? "" : "wrong key";
  if (r.ok) refresh();
});
refresh();
setInterval(refresh, 2000);
</script></body></html>
"##;
