// Unit tests of clients/js/tether.js with Node's built-in runner (`node --test clients/js`):
// the pure state machine (no sockets), then the shell against fake WebSocket and
// EventSource classes (no network).
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  DEFAULTS, backoffCap, branch, makeRng, newMachine, step, sseQuery, statsAt, TetherClient,
} from "./tether.js";

function drive(opts = {}) {
  let m = newMachine({ seed: 7, ...opts });
  const log = [];
  const feed = (input) => {
    const [next, actions] = step(m, input);
    m = next;
    log.push(...actions);
    return actions;
  };
  return { feed, log, get m() { return m; } };
}
const emits = (as, ev) => as.filter((a) => a.type === "emit" && a.event === ev).map((a) => a.data);
const states = (as) => emits(as, "state");
const sent = (as) => as.filter((a) => a.type === "send").map((a) => JSON.parse(a.text));
const waitMs = (as) => as.find((a) => a.type === "wait")?.ms;
const delivered = (as) => emits(as, "message").map((d) => d.position);
const welcome = (now, extra = {}) => ({
  type: "frame", now,
  frame: { type: "welcome", conn_id: "n1-b-1", client_id: "a", node_id: "n1", heartbeat_ms: 500, heartbeat_timeout_ms: 300, ...extra },
});
const msg = (now, channel, position) => ({ type: "frame", now, frame: { type: "message", channel, id: position, position, data: position } });
function dropWith(d, now, closing) {
  if (!closing) return d.feed({ type: "dropped", now, code: null, reason: "reset" });
  const [code, reconnect, retry_ms] = closing;
  d.feed({ type: "frame", now, frame: { type: "closing", code, reason: "r", reconnect, retry_ms } });
  return d.feed({ type: "dropped", now, code, reason: "r" });
}

test("full jitter stays within [0, cap] and covers the range", () => {
  const rand = makeRng(3);
  const b = { ...DEFAULTS };
  assert.deepEqual([1, 2, 3, 8, 9, 50].map((n) => backoffCap(b, n)), [250, 500, 1000, 30000, 30000, 30000]);
  for (let n = 1; n <= 10; n++) {
    const cap = backoffCap(b, n);
    const ds = Array.from({ length: 2000 }, () => Math.min(cap, Math.floor(rand() * (cap + 1))));
    assert.ok(ds.every((x) => x >= 0 && x <= cap));
    assert.ok(ds.some((x) => x < cap / 10) && ds.some((x) => x > cap * 0.9), `attempt ${n} uses the range`);
  }
  // Through the machine, with its own seeded RNG.
  const d = drive();
  d.feed({ type: "start" });
  for (let n = 1; n <= 8; n++) {
    const as = d.feed({ type: "failed", status: null, message: "refused" });
    const ms = waitMs(as);
    assert.ok(ms >= 0 && ms <= backoffCap(b, n), `attempt ${n}: ${ms}`);
    d.feed({ type: "timer" });
  }
});

test("every close code takes its branch (SPEC section 4 table)", () => {
  // code, announced reconnect, expected (announced, retry 900), unannounced, with a refresher
  const S = (r) => ({ kind: "server", retryMs: r });
  const table = [
    [1000, false, { kind: "stop" }, { kind: "stop" }, { kind: "stop" }],
    [1001, true, S(900), S(null), S(900)],
    [1002, false, { kind: "fatal" }, { kind: "fatal" }, { kind: "fatal" }],
    [1007, false, { kind: "fatal" }, { kind: "fatal" }, { kind: "fatal" }],
    [1009, false, { kind: "fatal" }, { kind: "fatal" }, { kind: "fatal" }],
    [1011, true, S(900), { kind: "backoff" }, S(900)],
    [4000, true, S(900), { kind: "backoff" }, S(900)],
    [4001, false, { kind: "stop" }, { kind: "stop" }, { kind: "stop" }],
    [4002, false, { kind: "stop" }, { kind: "stop" }, { kind: "stop" }],
    [4002, true, S(900), { kind: "stop" }, S(900)],
    [4003, true, { kind: "fatal" }, { kind: "fatal" }, { kind: "refresh" }],
    [4004, false, { kind: "fatal" }, { kind: "fatal" }, { kind: "fatal" }],
    [4005, true, S(900), { kind: "backoff" }, S(900)],
    [4008, true, S(900), { kind: "backoff" }, S(900)],
    [4029, true, S(900), { kind: "backoff" }, S(900)],
    [4401, false, { kind: "fatal" }, { kind: "fatal" }, { kind: "refresh" }],
    [4403, false, { kind: "fatal" }, { kind: "fatal" }, { kind: "fatal" }],
    [4409, false, { kind: "fatal" }, { kind: "fatal" }, { kind: "fatal" }],
    [4429, true, S(900), S(null), S(900)],
    [4502, true, S(900), S(null), S(900)],
    [4503, true, S(900), S(null), S(900)],
  ];
  for (const [code, reconnect, ann, bare, refreshed] of table) {
    const c = { code, reason: "r", reconnect, retry_ms: 900 };
    assert.deepEqual(branch(code, c, false), ann, `${code} announced`);
    assert.deepEqual(branch(code, null, false), bare, `${code} unannounced`);
    assert.deepEqual(branch(code, c, true), refreshed, `${code} with a refresher`);
  }
  assert.deepEqual(branch(null, null, false), { kind: "backoff" });
});

test("resume with since = last delivered; duplicates dropped; new epoch; recovered:false surfaced", () => {
  const d = drive({ channels: ["news"] });
  assert.equal(states(d.feed({ type: "start" }))[0].state, "connecting");
  d.feed({ type: "opened" });
  let as = d.feed(welcome(0));
  assert.deepEqual(sent(as), [{ type: "subscribe", ref: 1, channel: "news" }]);
  assert.ok(as.some((a) => a.type === "deadline" && a.ms === 800 && a.heartbeatMs === 500));
  d.feed({ type: "frame", now: 1, frame: { type: "subscribed", ref: 1, channel: "news", position: "e1:4", recovered: false, missed: 0 } });
  assert.deepEqual([...delivered(d.feed(msg(2, "news", "e1:5"))), ...delivered(d.feed(msg(3, "news", "e1:6")))], ["e1:5", "e1:6"]);
  as = dropWith(d, 10, null);
  assert.deepEqual(states(as).map((s) => s.state), ["disconnected", "reconnecting"]);
  assert.equal(states(as)[0].will_reconnect, true);
  d.feed({ type: "timer" });
  d.feed({ type: "opened" });
  as = d.feed(welcome(100));
  assert.deepEqual(sent(as), [{ type: "subscribe", ref: 2, channel: "news", since: "e1:6" }]);
  as = d.feed({ type: "frame", now: 101, frame: { type: "subscribed", ref: 2, channel: "news", position: "e1:8", recovered: true, missed: 2 } });
  assert.deepEqual(emits(as, "recovered"), [{ channel: "news", position: "e1:8", recovered: true, missed: 2 }]);
  const got = ["e1:5", "e1:6", "e1:7", "e1:7", "e1:8", "e2:1", "e2:1"].flatMap((p) => delivered(d.feed(msg(102, "news", p))));
  assert.deepEqual(got, ["e1:7", "e1:8", "e2:1"]);
  // A gap outside the history is surfaced, and the next resume starts after it.
  dropWith(d, 110, [1001, true, 5]);
  d.feed({ type: "timer" });
  d.feed({ type: "opened" });
  d.feed(welcome(200));
  as = d.feed({ type: "frame", now: 201, frame: { type: "subscribed", ref: 3, channel: "news", position: "e3:50", recovered: false, missed: 0 } });
  assert.deepEqual(emits(as, "recovered"), [{ channel: "news", position: "e3:50", recovered: false, missed: 0 }]);
  const st = statsAt(d.m, 300);
  assert.deepEqual([st.messages, st.duplicates, st.reconnects, st.attempts], [5, 4, 2, 3]);
  assert.deepEqual(st.failures, { 1006: 1, 1001: 1 });
  assert.equal(st.connected_ms, 10 + 10 + 100);
});

test("the attempt counter resets after 30 s of stable connection; announced drops do not count", () => {
  const d = drive();
  d.feed({ type: "start" });
  for (let i = 0; i < 5; i++) {
    d.feed({ type: "failed", status: null, message: "x" });
    d.feed({ type: "timer" });
  }
  assert.equal(d.m.n, 5);
  d.feed({ type: "opened" });
  d.feed(welcome(1000));
  dropWith(d, 1000 + 29999, null);
  assert.equal(d.m.n, 6, "dropped unannounced within 30 s: still counting");
  d.feed({ type: "timer" });
  d.feed({ type: "opened" });
  d.feed(welcome(40000));
  const as = dropWith(d, 70000, null);
  assert.equal(d.m.n, 0);
  assert.ok(waitMs(as) <= 250);
  d.feed({ type: "timer" });
  d.feed({ type: "opened" });
  d.feed(welcome(80000));
  dropWith(d, 80001, [4002, true, 5]);
  assert.equal(d.m.n, 0);
});

test("failure cap, refresher, silence and close", () => {
  let d = drive({ failureCap: 2 });
  d.feed({ type: "start" });
  d.feed({ type: "failed", status: null, message: "x" });
  d.feed({ type: "timer" });
  let as = d.feed({ type: "failed", status: null, message: "x" });
  assert.deepEqual(states(as).map((s) => [s.state, s.fatal]), [["disconnected", undefined], ["closed", true]]);
  assert.equal(emits(as, "error")[0].code, "failure_cap");

  d = drive({ hasRefresher: true });
  assert.deepEqual(d.feed({ type: "start" }), [{ type: "refresh" }]);
  d.feed({ type: "token", token: "t1" });
  assert.deepEqual(sent(d.feed({ type: "opened" })), [{ type: "connect", token: "t1" }]);
  d.feed(welcome(0));
  as = dropWith(d, 5, [4003, true, null]);
  assert.equal(waitMs(as), 0);
  assert.deepEqual(d.feed({ type: "timer" }), [{ type: "refresh" }]);
  d.feed({ type: "token", token: "t2" });
  assert.deepEqual(sent(d.feed({ type: "opened" })), [{ type: "connect", token: "t2" }]);

  d = drive();
  d.feed({ type: "start" });
  d.feed({ type: "opened" });
  d.feed(welcome(0));
  as = d.feed({ type: "silent", now: 800 });
  assert.equal(as[0].type, "closeSocket");
  assert.equal(as[0].code, 4000);
  assert.equal(states(as)[1].state, "reconnecting");

  d = drive();
  d.feed({ type: "start" });
  d.feed({ type: "opened" });
  d.feed(welcome(0));
  as = d.feed({ type: "close", now: 50 });
  assert.deepEqual(states(as), [{ state: "closed", code: 1000, reason: "closed by the client", fatal: false }]);
  assert.equal(as.at(-1).type, "finish");
  assert.deepEqual(d.feed({ type: "timer" }), []);
});

test("SSE: the query names sorted channels and a cursor of the last positions", () => {
  const d = drive({ transport: "sse", channels: ["b", "a"] });
  d.feed({ type: "start" });
  assert.deepEqual(sseQuery(d.m), { channels: ["a", "b"], since: null });
  d.feed({ type: "opened" });
  const as = d.feed(welcome(0, { heartbeat_ms: undefined, recovered: { a: false, b: false }, cursor: "v1.n1-b-1.e1:3.e2:0" }));
  assert.deepEqual(sent(as), [], "SSE subscribes through the URL");
  assert.deepEqual(emits(as, "subscribed").map((s) => [s.channel, s.position]), [["a", "e1:3"], ["b", "e2:0"]]);
  assert.ok(as.some((a) => a.type === "deadline" && a.ms === DEFAULTS.heartbeatMs + 300));
  d.feed(msg(1, "a", "e1:4"));
  assert.deepEqual(sseQuery(d.m), { channels: ["a", "b"], since: "v1.n1-b-1.e1:4.e2:0" });
  // A new channel reopens the stream; it has no position yet.
  const re = d.feed({ type: "subscribe", channel: "c" });
  assert.deepEqual(re.map((a) => a.type), ["deadline", "closeSocket", "open"]);
  assert.deepEqual(sseQuery(d.m), { channels: ["a", "b", "c"], since: "v1.n1-b-1.e1:4.e2:0.0:0" });
});

// ---- the shell, over fakes ----

class FakeWS {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeWS.all.push(this);
  }
  send(t) {
    const f = JSON.parse(t);
    this.sent.push(f);
    if (f.type === "ping" && this.autoPong) setTimeout(() => this.serverSend({ type: "pong", ref: null }), 1);
  }
  close(code, reason) {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.closedWith = code;
    queueMicrotask(() => this.onclose?.({ code: code ?? 1005, reason: reason ?? "" }));
  }
  serverOpen() { this.readyState = 1; this.onopen?.(); }
  serverSend(obj) { this.onmessage?.({ data: JSON.stringify(obj) }); }
  serverClose(code, reason = "") { this.readyState = 3; this.onclose?.({ code, reason }); }
}

const tick = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(fn, what, ms = 3000) {
  const end = Date.now() + ms;
  while (Date.now() < end) {
    if (fn()) return;
    await tick(5);
  }
  throw new Error(`timed out: ${what}`);
}

test("WebSocket shell: refusal=close, pings every heartbeat_ms, dead socket dropped, kick without reconnect", async () => {
  FakeWS.all = [];
  const c = new TetherClient("ws://127.0.0.1:1/ws", { client: "al ice", WebSocket: FakeWS, seed: 1, backoff: { minDelayMs: 10 } });
  const seen = [];
  c.on("state", (s) => seen.push(s.state));
  c.subscribe("news");
  c.connect();
  const ws = FakeWS.all[0];
  assert.equal(ws.url, "ws://127.0.0.1:1/ws?refusal=close&client=al+ice");
  ws.serverOpen();
  ws.serverSend({ type: "welcome", conn_id: "c1", client_id: "al ice", node_id: "n", heartbeat_ms: 40, heartbeat_timeout_ms: 40 });
  assert.deepEqual(ws.sent, [{ type: "subscribe", ref: 1, channel: "news" }]);
  // Answered pings keep a quiet connection alive (each pong is a frame).
  ws.autoPong = true;
  await until(() => ws.sent.filter((f) => f.type === "ping").length >= 4, "four pings");
  assert.equal(ws.closedWith, undefined, "alive while pongs come back");
  // Silence: nothing answers any more, so the socket is dropped as dead (4000).
  ws.autoPong = false;
  await until(() => ws.closedWith === 4000, "dropped for silence", 1000);
  await until(() => FakeWS.all.length === 2, "a new attempt");
  const ws2 = FakeWS.all[1];
  ws2.serverOpen();
  ws2.serverSend({ type: "welcome", conn_id: "c2", client_id: "al ice", node_id: "n", heartbeat_ms: 1000, heartbeat_timeout_ms: 1000 });
  ws2.serverSend({ type: "closing", code: 4002, reason: "kicked", reconnect: false, retry_ms: null });
  ws2.serverClose(4002, "kicked");
  await until(() => c.state === "closed", "closed");
  assert.deepEqual(seen, ["connecting", "connected", "disconnected", "reconnecting", "connecting", "connected", "disconnected", "closed"]);
  await tick(60);
  assert.equal(FakeWS.all.length, 2, "no reconnect after a kick with reconnect:false");
  assert.equal(c.stats().reconnects, 1);
});

class FakeES {
  static all = [];
  constructor(url) {
    this.url = new URL(url);
    this.listeners = {};
    this.closed = false;
    FakeES.all.push(this);
  }
  addEventListener(n, f) { (this.listeners[n] ||= []).push(f); }
  close() { this.closed = true; }
  serverEvent(name, data, id = "") {
    for (const f of this.listeners[name] || []) f({ data: JSON.stringify(data), lastEventId: id });
  }
}

test("SSE shell: asks heartbeat=event, reopens with the cursor on subscribe, stops on closing reconnect:false", async () => {
  FakeES.all = [];
  const c = new TetherClient("http://127.0.0.1:1/sse", { client: "b", transport: "sse", EventSource: FakeES, seed: 2 });
  const got = [];
  c.on("message", (m) => got.push(m.data));
  c.subscribe("news");
  c.connect();
  const es = FakeES.all[0];
  assert.deepEqual(es.url.searchParams.getAll("channel"), ["news"]);
  assert.equal(es.url.searchParams.get("heartbeat"), "event");
  assert.equal(es.url.searchParams.get("since"), null);
  es.onopen();
  es.serverEvent("welcome", { conn_id: "n1-x-1", client_id: "b", node_id: "n1", recovered: { news: false } }, "v1.n1-x-1.e:0");
  es.serverEvent("message", { channel: "news", id: "m1", position: "e:1", data: 1 }, "v1.n1-x-1.e:1");
  es.serverEvent("message", { channel: "news", id: "m1", position: "e:1", data: 1 }, "v1.n1-x-1.e:1");
  c.subscribe("alerts");
  assert.equal(es.closed, true);
  const es2 = FakeES.all[1];
  assert.deepEqual(es2.url.searchParams.getAll("channel"), ["alerts", "news"]);
  assert.equal(es2.url.searchParams.get("since"), "v1.n1-x-1.0:0.e:1");
  es2.onopen();
  es2.serverEvent("welcome", { conn_id: "n1-x-2", client_id: "b", node_id: "n1", recovered: { alerts: false, news: true } }, "v1.n1-x-2.f:0.e:1");
  es2.serverEvent("message", { channel: "news", id: "m2", position: "e:2", data: 2 }, "v1.n1-x-2.f:0.e:2");
  es2.serverEvent("closing", { code: 4001, reason: "replaced", reconnect: false, retry_ms: null });
  assert.equal(es2.closed, true);
  assert.equal(c.state, "closed");
  await tick(30);
  assert.equal(FakeES.all.length, 2, "a replaced tab does not fight back");
  assert.deepEqual(got, [1, 2]);
  assert.equal(c.stats().duplicates, 1);
});

test("a handler that closes the client from inside an event leaves no timer behind", async () => {
  FakeWS.all = [];
  const c = new TetherClient("ws://127.0.0.1:1/ws", { client: "h", WebSocket: FakeWS, seed: 3 });
  const seen = [];
  c.on("state", (s) => {
    seen.push(s.state);
    if (s.state === "connected") c.close();
  });
  c.connect();
  const ws = FakeWS.all[0];
  ws.serverOpen();
  ws.serverSend({ type: "welcome", conn_id: "c", client_id: "h", node_id: "n", heartbeat_ms: 20, heartbeat_timeout_ms: 20 });
  try {
    assert.deepEqual(seen, ["connecting", "connected", "closed"]);
    assert.equal(ws.closedWith, 1000);
    assert.equal(c.pinger, null, "no ping interval left running");
    await tick(100);
    assert.equal(FakeWS.all.length, 1);
    assert.deepEqual(ws.sent.filter((f) => f.type === "ping"), []);
  } finally {
    // So that a failure here fails the run instead of keeping it alive.
    clearInterval(c.pinger);
    clearTimeout(c.deadline);
  }
});
