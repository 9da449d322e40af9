// Headless Chromium drives the /admin dashboard of the real tether binary with an
// API key: sign in (key -> session cookie), watch a WebSocket client appear in the
// connections table, kick it through the confirmation dialog, and see its row go
// and its connection.closed (code 4002) arrive in the lifecycle feed. Also: the
// page runs under its CSP with no violation, and it has no horizontal scroll at
// phone width. Saves admin-desktop.png (1400x900) and admin-phone.png (390x844)
// under target/, or under docs/ (the screenshots the README shows) with
// TETHER_SCREENSHOTS=docs, so a test run leaves the tree as it was.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import path from "node:path";
import { chromium } from "playwright-core";
import { BIN, ROOT, freePort, sleep, waitFor } from "./harness.mjs";

const SHOTS = path.join(ROOT, process.env.TETHER_SCREENSHOTS === "docs" ? "docs" : "target");

const KEY = "admin-test-key-0123456789";
let server, browser, context, admin, peers, api, client, log = "";
const problems = [];

async function call(method, p, body) {
  const r = await fetch(`${api}${p}`, {
    method,
    headers: { "content-type": "application/json", authorization: `Bearer ${KEY}` },
    body: body ? JSON.stringify(body) : undefined,
  });
  return { status: r.status, body: await r.json() };
}

before(async () => {
  const [cp, ap] = [await freePort(), await freePort()];
  client = `127.0.0.1:${cp}`;
  api = `http://127.0.0.1:${ap}`;
  server = spawn(BIN, ["serve", "--listen", client, "--api-listen", `127.0.0.1:${ap}`], {
    env: { PATH: process.env.PATH, TETHER_API__KEY: KEY, TETHER_SHUTDOWN__PRE_DRAIN_MS: "0" },
    stdio: ["ignore", "ignore", "pipe"],
  });
  server.stderr.on("data", (d) => (log += d));
  await waitFor(async () => {
    try {
      return (await fetch(`http://${client}/readyz`)).status === 200;
    } catch {
      return false;
    }
  }, "tether ready");
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
      "--disable-sync", "--no-first-run", "--disable-quic"],
  });
  context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  admin = await context.newPage();
  // Any CSP violation, script error or failed load of the dashboard is a defect.
  // (The 401s before signing in and the 404s of API calls this server lacks are
  // expected: a failed load is judged by its URL below, not by its console line.)
  admin.on("console", (m) => {
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) problems.push(m.text());
  });
  admin.on("response", (r) => {
    if (new URL(r.url()).pathname.startsWith("/admin") && r.status() >= 400 && !r.url().endsWith("/admin/session")) {
      problems.push(`${r.status()} ${r.url()}`);
    }
  });
  admin.on("pageerror", (e) => problems.push(String(e)));
  // The WebSocket and SSE peers live in a page on the client listener's origin.
  peers = await context.newPage();
  await peers.goto(`http://${client}/healthz`);
  await peers.evaluate(() => { window.sockets = {}; window.closes = {}; window.streams = []; });
});

after(async () => {
  await browser?.close();
  if (server && server.exitCode === null) {
    server.kill("SIGTERM");
    await new Promise((r) => server.once("exit", r));
  }
});

/** Opens a WebSocket client in the peers page and subscribes it to `channels`. */
function openWs(id, channels) {
  return peers.evaluate(([url, id, channels]) => new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    window.sockets[id] = ws;
    ws.onopen = () => {
      channels.forEach((channel, i) => ws.send(JSON.stringify({ type: "subscribe", ref: i + 1, channel })));
      resolve();
    };
    ws.onerror = () => reject(new Error(`ws ${id} failed`));
    ws.onclose = (e) => { window.closes[id] = e.code; };
  }), [`ws://${client}/ws?client=${id}`, id, channels]);
}

function openSse(id, channels) {
  return peers.evaluate(([url]) => { window.streams.push(new EventSource(url)); },
    [`http://${client}/sse?client=${id}&${channels.map((c) => `channel=${c}`).join("&")}`]);
}

const rowOf = (clientId) => admin.locator(`#conns tbody tr[data-client="${clientId}"]`);

test("a wrong key is refused and the right one opens the dashboard", async () => {
  await admin.goto(`${api}/admin`);
  await admin.locator("#login").waitFor({ state: "visible" });
  assert.equal(await admin.locator("#dash").isVisible(), false);
  await admin.getByLabel("API key").fill("not-the-key");
  await admin.getByRole("button", { name: "Open dashboard" }).click();
  await waitFor(async () => (await admin.locator("#login-error").textContent()) === "Wrong key.", "the refusal");
  await admin.getByLabel("API key").fill(KEY);
  await admin.getByRole("button", { name: "Open dashboard" }).click();
  await admin.locator("#dash").waitFor({ state: "visible" });
  await waitFor(async () => (await admin.locator("#events-state").textContent()) === "live", "the event stream");
  // The cookie is HttpOnly: the page's script cannot read it.
  assert.equal(await admin.evaluate(() => document.cookie), "");
});

test("a WebSocket client appears, is kicked from the dialog, and its close reaches the feed", async () => {
  await openWs("kick-me", ["room.kick"]);
  await openWs("stays", ["room.kick"]);
  await rowOf("kick-me").waitFor({ timeout: 10000 });
  const connId = await rowOf("kick-me").getAttribute("data-conn");
  assert.match(connId, /\S/);
  // Search narrows the table to the matching row, by client id and by channel.
  await admin.getByLabel("Search connections").fill("kick-me");
  await waitFor(async () => (await admin.locator("#conns tbody tr").count()) === 1, "one row for kick-me");
  await admin.getByLabel("Search connections").fill("room.kick");
  await waitFor(async () => (await admin.locator("#conns tbody tr").count()) === 2, "two rows on room.kick");
  await admin.getByLabel("Search connections").fill("");

  // Cancel first: nothing is closed.
  await admin.getByRole("button", { name: `Disconnect connection ${connId}` }).click();
  const dialog = admin.locator("#kick");
  await dialog.waitFor({ state: "visible" });
  assert.match(await admin.locator("#kick-what").textContent(), /kick-me/);
  await admin.getByRole("button", { name: "Cancel" }).click();
  await dialog.waitFor({ state: "hidden" });
  assert.equal((await call("GET", "/api/clients/kick-me")).status, 200);

  await admin.getByRole("button", { name: `Disconnect connection ${connId}` }).click();
  await dialog.waitFor({ state: "visible" });
  assert.equal(await admin.getByLabel("Close code").inputValue(), "4002");
  assert.equal(await admin.getByLabel("Allow it to reconnect").isChecked(), false);
  await dialog.getByRole("button", { name: "Disconnect" }).click();
  await dialog.waitFor({ state: "hidden" });
  await waitFor(async () => (await admin.locator("#toast").textContent()) === "Closed 1 connection.", "the toast");

  await rowOf("kick-me").waitFor({ state: "detached", timeout: 10000 });
  assert.equal(await rowOf("stays").count(), 1, "the other client is still listed");
  await waitFor(() => peers.evaluate(() => window.closes["kick-me"]), "the client's close");
  assert.equal(await peers.evaluate(() => window.closes["kick-me"]), 4002);

  const closed = admin.locator(`#events li[data-type="connection.closed"]`, { hasText: connId });
  await closed.first().waitFor({ timeout: 10000 });
  assert.match(await closed.first().textContent(), /code 4002/);
  // The type filter keeps only that type; the text filter only the matching ones.
  await admin.getByLabel("Event type").selectOption("connection.closed");
  await admin.getByLabel("Filter events").fill("kick-me");
  const shown = await admin.locator("#events li").evaluateAll((lis) => lis.map((li) => li.dataset.type));
  assert.ok(shown.length >= 1 && shown.every((t) => t === "connection.closed"), JSON.stringify(shown));
  await admin.getByLabel("Event type").selectOption("");
  await admin.getByLabel("Filter events").fill("");
});

test("channel details show presence and the last messages", async () => {
  for (let n = 1; n <= 25; n++) {
    assert.equal((await call("POST", "/api/publish", { channel: "room.kick", data: { n } })).status, 200);
  }
  await admin.getByRole("button", { name: "Details of channel room.kick" }).click();
  await admin.locator("#chan-detail").waitFor({ state: "visible" });
  await waitFor(async () => (await admin.locator("#presence li").allTextContents()).some((t) => t.includes("stays")),
    "presence lists stays");
  // Newest first, the last 20 of 25.
  await waitFor(async () => (await admin.locator("#history li").count()) === 20, "20 messages");
  assert.match(await admin.locator("#history li").first().textContent(), /\{"n":25\}/);
  assert.match(await admin.locator("#history li").last().textContent(), /\{"n":6\}/);
});

test("webhooks without a webhook API or config say so", async () => {
  await waitFor(async () => admin.locator("#hooks-na").isVisible(), "the webhooks card");
  assert.equal(await admin.locator("#hooks-na").textContent(), "Webhooks not configured.");
});

test("screenshots at 1400x900 and 390x844, no horizontal scroll on a phone", async () => {
  for (const [id, chans] of [["alice", ["chat.general", "presence.lobby"]], ["bob", ["chat.general"]],
    ["carol", ["chat.general", "orders.eu"]], ["dave", ["orders.eu"]]]) {
    await openWs(id, chans);
  }
  await openSse("erin", ["chat.general"]);
  await openSse("frank", ["presence.lobby", "orders.eu"]);
  // Traffic for the charts, kept up while the pictures are taken (bounded: 80 publishes).
  let publishing = true;
  const traffic = (async () => {
    for (let i = 0; i < 80 && publishing; i++) {
      await call("POST", "/api/publish", { channel: i % 3 ? "chat.general" : "orders.eu", data: { i } });
      await sleep(100 + (i % 7) * 30);
    }
  })();
  await rowOf("frank").waitFor({ timeout: 10000 });
  await admin.getByRole("button", { name: "Details of channel chat.general" }).click();
  await waitFor(async () => (await admin.locator("#history li").count()) === 20, "chat history");
  await sleep(5000); // five seconds of rates on the chart
  // The rates come from the /metrics counters: while publishing, both are above 0.
  for (const id of ["#t-pub", "#t-del"]) {
    await waitFor(async () => Number(await admin.locator(id).textContent()) > 0, `${id} above 0`);
  }
  await admin.evaluate(() => window.scrollTo(0, 0));
  await admin.screenshot({ path: path.join(SHOTS, "admin-desktop.png") });

  await admin.setViewportSize({ width: 390, height: 844 });
  await sleep(500); // the charts' ResizeObserver settles before the picture
  await admin.screenshot({ path: path.join(SHOTS, "admin-phone.png") });
  publishing = false;
  await traffic;
  if (process.env.ADMIN_FULL_SHOTS) {
    await admin.screenshot({ path: path.join(ROOT, "target/admin-phone-full.png"), fullPage: true });
  }
  const wide = await admin.evaluate(() => {
    const w = window.innerWidth;
    const out = [...document.querySelectorAll("body *")]
      .filter((e) => e.getBoundingClientRect().right > w + 0.5 && !e.closest(".scroll"))
      .map((e) => `${e.tagName}#${e.id}.${e.className}`);
    return { scroll: document.documentElement.scrollWidth, w, out: out.slice(0, 10) };
  });
  assert.ok(wide.scroll <= wide.w, `page scrolls sideways at phone width: ${JSON.stringify(wide)}`);
  if (process.env.ADMIN_FULL_SHOTS) {
    await admin.setViewportSize({ width: 1400, height: 900 });
    await sleep(300);
    await admin.screenshot({ path: path.join(ROOT, "target/admin-desktop-full.png"), fullPage: true });
  }
  assert.deepEqual(problems, [], `console errors: ${problems.join("\n")}\n${log.slice(-2000)}`);
});
