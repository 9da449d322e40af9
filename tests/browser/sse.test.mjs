// Headless Chromium's native EventSource against the real tether binary, from a
// page served by another origin: a kick with reconnect resumes every message once
// (Last-Event-ID), a kick with reconnect: false leaves the EventSource closed.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import http from "node:http";
import path from "node:path";
import { chromium } from "playwright-core";
import { BIN, ROOT, freePort, sleep, waitFor } from "./harness.mjs";


let server, page, browser, pageServer, api, client, log = "";

async function call(method, p, body) {
  const r = await fetch(`${api}${p}`, {
    method,
    headers: { "content-type": "application/json" },
    body: body ? JSON.stringify(body) : undefined,
  });
  return { status: r.status, body: await r.json() };
}

before(async () => {
  const [cp, ap, pp] = [await freePort(), await freePort(), await freePort()];
  client = `http://127.0.0.1:${cp}`;
  api = `http://127.0.0.1:${ap}`;
  server = spawn(BIN, ["serve", "--listen", `127.0.0.1:${cp}`, "--api-listen", `127.0.0.1:${ap}`], {
    env: { PATH: process.env.PATH, TETHER_SSE__RETRY_MS: "300", TETHER_SHUTDOWN__PRE_DRAIN_MS: "0" },
    stdio: ["ignore", "ignore", "pipe"],
  });
  server.stderr.on("data", (d) => (log += d));
  await waitFor(async () => {
    try {
      return (await fetch(`${api}/readyz`)).status === 200;
    } catch {
      return false;
    }
  }, "tether ready");
  // The page lives on another origin (another port) and knows nothing but the URL.
  const html = `<!doctype html><meta charset=utf-8><title>tether sse</title><ul id=log></ul>
<script>
  window.received = []; window.opens = 0; window.errors = 0;
  const es = new EventSource(${JSON.stringify(`${client}/sse?client=browser&channel=news`)});
  window.es = es;
  es.onopen = () => window.opens++;
  es.onerror = () => window.errors++;
  es.addEventListener("message", (e) => {
    const m = JSON.parse(e.data);
    window.received.push(m.data.n);
    const li = document.createElement("li"); li.textContent = m.data.n; document.getElementById("log").append(li);
  });
</script>`;
  pageServer = http.createServer((_, res) => {
    res.writeHead(200, { "content-type": "text/html" });
    res.end(html);
  });
  await new Promise((r) => pageServer.listen(pp, "127.0.0.1", r));
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
      "--disable-sync", "--no-first-run", "--disable-quic"],
  });
  page = await browser.newPage();
  await page.goto(`http://127.0.0.1:${pp}/`);
});

after(async () => {
  await browser?.close();
  pageServer?.close();
  if (server && server.exitCode === null) {
    server.kill("SIGTERM");
    await new Promise((r) => server.once("exit", r));
  }
});

test("kick with reconnect: EventSource resumes with Last-Event-ID, every message once", async () => {
  await waitFor(async () => (await call("GET", "/api/stats")).body.connections.sse === 1, "the stream");
  for (const n of [1, 2, 3]) assert.equal((await call("POST", "/api/publish", { channel: "news", data: { n } })).status, 200);
  await waitFor(() => page.evaluate(() => window.received.length === 3), "3 messages");
  const kicked = await call("POST", "/api/disconnect", { client_id: "browser", reconnect: true });
  assert.deepEqual(kicked.body, { closed: 1 });
  // Published while the browser is away: only history can deliver these.
  for (const n of [4, 5, 6]) await call("POST", "/api/publish", { channel: "news", data: { n } });
  await waitFor(() => page.evaluate(() => window.received.length >= 6), "6 messages");
  await sleep(300);
  assert.deepEqual(await page.evaluate(() => window.received), [1, 2, 3, 4, 5, 6]);
  assert.ok((await page.evaluate(() => window.opens)) >= 2, "the browser reconnected by itself");
  await page.screenshot({ path: path.join(ROOT, "target/browser-resume.png") });
});

test("kick with reconnect: false leaves the EventSource closed", async () => {
  await waitFor(async () => (await call("GET", "/api/stats")).body.connections.sse === 1, "the stream");
  const kicked = await call("POST", "/api/disconnect", { client_id: "browser", reconnect: false });
  assert.deepEqual(kicked.body, { closed: 1 });
  // EventSource retries once with its Last-Event-ID, gets 204 (tombstone) and stops.
  await waitFor(() => page.evaluate(() => window.es.readyState === 2), "EventSource CLOSED");
  await sleep(1000);
  assert.equal(await page.evaluate(() => window.es.readyState), 2);
  assert.equal((await call("GET", "/api/stats")).body.connections.sse, 0);
  await call("POST", "/api/publish", { channel: "news", data: { n: 7 } });
  await sleep(300);
  assert.deepEqual(await page.evaluate(() => window.received), [1, 2, 3, 4, 5, 6]);
});
