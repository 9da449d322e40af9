// Headless Chromium runs the browser SDK against the real tether binary: a page on
// another origin imports /client/tether.js cross-origin, then the same cases run over
// WebSocket and over SSE: a kick with reconnect resumes (every message once), a server
// restart is healed (the lost history reported), a kick without reconnect stays down.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import http from "node:http";
import path from "node:path";
import { chromium } from "playwright-core";
import { BIN, ROOT, freePort, sleep, waitFor as waitWithin } from "./harness.mjs";

const waitFor = (fn, what, ms = 15000) => waitWithin(fn, what, ms);


let server, browser, page, pageServer, api, client, cp, ap, log = "";

function startServer() {
  server = spawn(BIN, ["serve", "--listen", `127.0.0.1:${cp}`, "--api-listen", `127.0.0.1:${ap}`], {
    env: {
      PATH: process.env.PATH,
      TETHER_SSE__RETRY_MS: "300",
      TETHER_SHUTDOWN__PRE_DRAIN_MS: "0",
      TETHER_HEARTBEAT__INTERVAL_MS: "1000",
      TETHER_HEARTBEAT__TIMEOUT_MS: "1000",
    },
    stdio: ["ignore", "ignore", "pipe"],
  });
  server.stderr.on("data", (d) => (log += d));
  return waitFor(async () => {
    try {
      return (await fetch(`${api}/readyz`)).status === 200;
    } catch {
      return false;
    }
  }, "tether ready");
}

async function killServer() {
  if (server && server.exitCode === null) {
    const gone = new Promise((r) => server.once("exit", r));
    server.kill("SIGKILL");
    await gone;
  }
}

async function call(method, p, body) {
  const r = await fetch(`${api}${p}`, {
    method,
    headers: { "content-type": "application/json" },
    body: body ? JSON.stringify(body) : undefined,
  });
  return { status: r.status, body: await r.json() };
}

const publish = async (channel, n) =>
  assert.equal((await call("POST", "/api/publish", { channel, data: { n } })).status, 200);
const conns = async () => (await call("GET", "/api/stats")).body.connections;

before(async () => {
  [cp, ap] = [await freePort(), await freePort()];
  const pp = await freePort();
  client = `127.0.0.1:${cp}`;
  api = `http://127.0.0.1:${ap}`;
  await startServer();
  // The page lives on another origin and imports the module from the server.
  const html = `<!doctype html><meta charset=utf-8><title>tether sdk</title><pre id=log></pre>
<script type=module>
  import { TetherClient } from ${JSON.stringify(`http://${client}/client/tether.js`)};
  window.clients = {}; window.received = {}; window.events = {};
  window.startClient = (transport) => {
    const url = transport === "ws" ? ${JSON.stringify(`ws://${client}/ws`)} : ${JSON.stringify(`http://${client}/sse`)};
    const c = new TetherClient(url, { client: "page-" + transport, transport,
      backoff: { heartbeatMs: 1000, heartbeatTimeoutMs: 1000, maxDelayMs: 2000 } });
    window.clients[transport] = c; window.received[transport] = []; window.events[transport] = [];
    const note = (kind) => (e) => {
      window.events[transport].push({ kind, ...e });
      document.getElementById("log").textContent += transport + " " + kind + " " + JSON.stringify(e) + "\\n";
    };
    c.on("state", note("state")); c.on("recovered", note("recovered")); c.on("error", note("error"));
    c.on("message", (m) => {
      window.received[transport].push(m.channel === "news-" + transport ? m.data.n : m.channel + ":" + m.data.n);
      note("message")(m);
    });
    c.subscribe("news-" + transport);
    c.connect();
  };
  window.ready = true;
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
  await waitFor(() => page.evaluate(() => window.ready === true), "the module imported cross-origin");
});

after(async () => {
  await browser?.close();
  pageServer?.close();
  if (server && server.exitCode === null) {
    server.kill("SIGTERM");
    await new Promise((r) => server.once("exit", r));
  }
});

const received = (t) => page.evaluate((t) => window.received[t], t);
const events = (t, kind) => page.evaluate(([t, kind]) => window.events[t].filter((e) => e.kind === kind), [t, kind]);
const stats = (t) => page.evaluate((t) => window.clients[t].stats(), t);

test("the module is served cross-origin with a JavaScript content type", async () => {
  const r = await fetch(`http://${client}/client/tether.js`, { headers: { origin: "http://elsewhere.test" } });
  assert.equal(r.status, 200);
  assert.match(r.headers.get("content-type"), /^text\/javascript/);
  assert.equal(r.headers.get("access-control-allow-origin"), "*");
  const d = await fetch(`http://${client}/client/tether.d.ts`);
  assert.match(d.headers.get("content-type"), /typescript/);
  assert.match(await d.text(), /export declare class TetherClient/);
});

for (const transport of ["ws", "sse"]) {
  const ch = `news-${transport}`;
  const kind = transport === "ws" ? "ws" : "sse";

  test(`${transport}: kick with reconnect resumes, every message once; a quiet connection stays up`, async () => {
    await page.evaluate((t) => window.startClient(t), transport);
    await waitFor(async () => (await events(transport, "state")).some((s) => s.state === "connected"), "connected");
    await waitFor(async () => (await conns())[kind] === 1, "one server-side connection");
    for (const n of [1, 2, 3]) await publish(ch, n);
    await waitFor(async () => (await received(transport)).length === 3, "3 messages");
    const kicked = await call("POST", "/api/disconnect", { client_id: `page-${transport}`, reconnect: true });
    assert.deepEqual(kicked.body, { closed: 1 });
    for (const n of [4, 5, 6]) await publish(ch, n);
    await waitFor(async () => (await received(transport)).length >= 6, "6 messages");
    const rec = await waitFor(async () => (await events(transport, "recovered")).at(-1), "a resume report");
    assert.equal(rec.recovered, true);
    // Quiet for three heartbeats: pings (ws) or heartbeat events (sse) keep it alive.
    await sleep(3000);
    assert.deepEqual(await received(transport), [1, 2, 3, 4, 5, 6]);
    const st = await stats(transport);
    assert.equal(st.reconnects, 1, JSON.stringify(st));
    assert.deepEqual(Object.keys(st.failures), ["4002"], "no drop but the kick");
  });

  test(`${transport}: a server restart is healed and the lost history is reported`, async () => {
    await killServer();
    await waitFor(async () => (await events(transport, "state")).some((s) => s.state === "disconnected" && s.code !== 4002), "the drop");
    await sleep(1000); // down for a while: attempts fail and back off
    await startServer();
    const rec = await waitFor(async () => (await events(transport, "recovered")).at(1), "the resume after the restart");
    // A new process has a new history: the gap is surfaced, never hidden.
    assert.equal(rec.recovered, false);
    for (const n of [7, 8]) await publish(ch, n);
    await waitFor(async () => (await received(transport)).length >= 8, "8 messages");
    await sleep(300);
    assert.deepEqual(await received(transport), [1, 2, 3, 4, 5, 6, 7, 8]);
  });

  test(`${transport}: a channel subscribed while connected joins without losing the others`, async () => {
    const extra = `extra-${transport}`;
    await page.evaluate(([t, ch]) => window.clients[t].subscribe(ch), [transport, extra]);
    // Over SSE this reopens the stream with a cursor naming both channels.
    await waitFor(
      () => page.evaluate(([t, ch]) => window.clients[t].m.subs.get(ch)?.confirmed === true, [transport, extra]),
      "the new subscription confirmed",
    );
    await publish(extra, 100);
    await publish(ch, 9);
    await waitFor(async () => (await received(transport)).length >= 10, "10 messages");
    await sleep(300);
    assert.deepEqual(await received(transport), [1, 2, 3, 4, 5, 6, 7, 8, `${extra}:100`, 9]);
    assert.equal((await conns())[kind], 1);
  });

  test(`${transport}: kick without reconnect stays down`, async () => {
    await waitFor(async () => (await conns())[kind] === 1, "connected again");
    const kicked = await call("POST", "/api/disconnect", { client_id: `page-${transport}`, reconnect: false });
    assert.deepEqual(kicked.body, { closed: 1 });
    await waitFor(() => page.evaluate((t) => window.clients[t].state === "closed", transport), "closed");
    const closed = (await events(transport, "state")).at(-1);
    assert.deepEqual([closed.state, closed.code, closed.fatal], ["closed", 4002, false]);
    await publish(ch, 10);
    await sleep(1000);
    assert.equal((await conns())[kind], 0, "no reconnect");
    assert.deepEqual(await received(transport), [1, 2, 3, 4, 5, 6, 7, 8, `extra-${transport}:100`, 9]);
    await page.screenshot({ path: path.join(ROOT, `target/browser-sdk-${transport}.png`) });
  });
}
