// Tether's browser client (SPEC section 13): an ES module with no dependencies.
//
//   import { TetherClient } from "http://host:7700/client/tether.js";
//   const c = new TetherClient("ws://host:7700/ws", { client: "alice", transport: "ws" });
//   c.on("message", (m) => console.log(m.channel, m.data));
//   c.subscribe("news");
//   c.connect();
//
// The same state machine and rules as the Rust crate `tether-client`: `step(machine,
// input) -> [machine, actions]` decides everything (reconnect rule from the close
// table, full-jitter backoff, dedup by position, resume reports, stats) and does no
// I/O; `TetherClient` is the thin shell that performs the actions over WebSocket or
// EventSource (SSE). Served by the binary at /client/tether.js; types in tether.d.ts.

/** Backoff and timing defaults (SPEC section 13). */
export const DEFAULTS = Object.freeze({
  minDelayMs: 250,
  maxDelayMs: 30000,
  factor: 2,
  stableMs: 30000,
  connectTimeoutMs: 10000,
  // Used on SSE until a welcome says otherwise (the server's defaults).
  heartbeatMs: 25000,
  heartbeatTimeoutMs: 10000,
});

/** A small seeded PRNG (mulberry32): uniform floats in [0, 1). */
export function makeRng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Uniform integer in [0, max]. */
function uniform(rand, max) {
  return Math.min(max, Math.floor(rand() * (max + 1)));
}

/** Attempt n's cap: min(maxDelayMs, minDelayMs * factor^(n-1)), n from 1. */
export function backoffCap(b, n) {
  const exp = Math.max(0, n - 1);
  return Math.min(b.maxDelayMs, b.minDelayMs * Math.pow(Math.max(1, b.factor), exp));
}

/**
 * The reconnect rule (SPEC sections 4 and 13): what to do after a close.
 * Returns {kind: "stop"|"fatal"|"refresh"|"server"|"backoff", retryMs}.
 */
export function branch(code, announced, hasRefresher) {
  const retryMs = announced && announced.retry_ms != null ? announced.retry_ms : null;
  const says = announced ? !!announced.reconnect : null;
  const c = code != null ? code : announced ? announced.code : null;
  if (c === 1000 || c === 4001) return { kind: "stop" };
  if (c === 4002) return says === true ? { kind: "server", retryMs } : { kind: "stop" };
  if ([1002, 1007, 1009, 4004].includes(c)) return { kind: "fatal" };
  if (c === 4003 || c === 4401) return hasRefresher ? { kind: "refresh" } : { kind: "fatal" };
  if ([1001, 4429, 4502, 4503].includes(c)) return { kind: "server", retryMs };
  if (c >= 4400 && c <= 4499) return { kind: "fatal" };
  if (says === true) return { kind: "server", retryMs };
  if (says === false) return { kind: "stop" };
  return { kind: "backoff" };
}

/** "<epoch>:<offset>" → {epoch, offset}, or null. */
export function parsePosition(s) {
  if (typeof s !== "string") return null;
  const i = s.lastIndexOf(":");
  if (i <= 0) return null;
  const epoch = s.slice(0, i);
  const off = s.slice(i + 1);
  if (!/^[A-Za-z0-9]{1,32}$/.test(epoch) || !/^[0-9]{1,20}$/.test(off)) return null;
  return { epoch, offset: Number(off) };
}

const CODE_NAMES = {
  1000: "normal", 1001: "going_away", 1002: "protocol_error", 1006: "abnormal",
  1007: "invalid_payload", 1009: "message_too_big", 1011: "internal_error",
  4000: "heartbeat_timeout", 4001: "replaced", 4002: "kicked", 4003: "token_expired",
  4004: "session_error", 4005: "max_lifetime", 4008: "slow_consumer", 4029: "rate_limited",
  4401: "unauthorized", 4403: "forbidden", 4409: "client_limit", 4429: "ip_or_rate_limit",
  4502: "upstream_unavailable", 4503: "unavailable",
};

/** A machine in "idle". `opts`: {transport, backoff, failureCap, hasRefresher, connectTimeoutMs, seed, channels, token}. */
export function newMachine(opts = {}) {
  const subs = new Map();
  for (const ch of opts.channels || []) subs.set(ch, { last: null, confirmed: false });
  return {
    phase: "idle",
    transport: opts.transport === "sse" ? "sse" : "ws",
    backoff: { ...DEFAULTS, ...(opts.backoff || {}) },
    failureCap: opts.failureCap ?? null,
    hasRefresher: !!opts.hasRefresher,
    connectTimeoutMs: opts.connectTimeoutMs ?? DEFAULTS.connectTimeoutMs,
    rand: makeRng(opts.seed ?? Math.floor(Math.random() * 2 ** 32)),
    subs,
    pending: new Map(),
    nextRef: 1,
    token: opts.token ?? null,
    needToken: opts.token == null && !!opts.hasRefresher,
    n: 0,
    failuresInRow: 0,
    tries: 0,
    announced: null,
    welcomedAt: null,
    everWelcomed: false,
    reopening: false,
    connId: null,
    stats: { attempts: 0, successes: 0, failures: {}, reconnects: 0, messages: 0, duplicates: 0, connected_ms: 0 },
  };
}

/** The stats with the current connection counted up to `now`. */
export function statsAt(m, now) {
  const s = { ...m.stats, failures: { ...m.stats.failures } };
  if (m.welcomedAt != null) s.connected_ms += Math.max(0, now - m.welcomedAt);
  return s;
}

/**
 * The SSE query for the machine's subscriptions: sorted channels and, when every
 * position it can name is known, a `since` cursor (`v1.<conn>.<pos>...`, one position
 * per channel in sorted order; a channel never delivered gets "0:0", which the server
 * answers as not recovered, i.e. live from now).
 */
export function sseQuery(m) {
  const channels = [...m.subs.keys()].sort();
  const known = channels.some((c) => m.subs.get(c).last);
  if (!known || !m.connId) return { channels, since: null };
  const ps = channels.map((c) => {
    const l = m.subs.get(c).last;
    return l ? `${l.epoch}:${l.offset}` : "0:0";
  });
  return { channels, since: `v1.${m.connId}.${ps.join(".")}` };
}

/**
 * The transition function. Consumes `m` (it is updated in place and returned, as the
 * Rust machine takes itself by value) and one input; returns [m, actions].
 * Inputs: {type: "start"|"close"|"subscribe"|"unsubscribe"|"opened"|"frame"|"dropped"|"failed"|"silent"|"timer"|"token", ...}.
 * Actions: {type: "open"|"send"|"closeSocket"|"wait"|"refresh"|"deadline"|"emit"|"finish", ...}.
 */
export function step(m, input) {
  const out = [];
  if (m.phase !== "closed") apply(m, input, out);
  return [m, out];
}

function apply(m, input, out) {
  switch (input.type) {
    case "start":
      if (m.phase === "idle") beginAttempt(m, out);
      break;
    case "close":
      closeByApp(m, input.now, out);
      break;
    case "subscribe":
      subscribe(m, input.channel, out);
      break;
    case "unsubscribe":
      unsubscribe(m, input.channel, out);
      break;
    case "opened":
      if (m.phase !== "connecting") break;
      out.push({ type: "deadline", ms: m.connectTimeoutMs });
      if (m.token != null && m.transport === "ws") out.push({ type: "send", text: JSON.stringify({ type: "connect", token: m.token }) });
      break;
    case "frame":
      frame(m, input.now, input.frame, out);
      break;
    case "dropped":
      dropped(m, input.now, input.code ?? null, input.reason || "", out);
      break;
    case "failed":
      failed(m, input.status ?? null, input.message || "", out);
      break;
    case "silent":
      if (m.phase !== "connecting" && m.phase !== "connected") break;
      out.push({ type: "closeSocket", code: 4000, reason: "no frame within heartbeat + timeout" });
      m.announced = null;
      ended(m, input.now, 4000, "silent", "no frame within heartbeat_ms + heartbeat_timeout_ms", { kind: "backoff" }, true, out);
      break;
    case "timer":
      if (m.phase === "waiting") beginAttempt(m, out);
      break;
    case "token":
      if (m.phase === "refreshing") tokenAnswer(m, input, out);
      break;
  }
}

const emit = (out, event, data) => out.push({ type: "emit", event, data });

function beginAttempt(m, out) {
  if (m.needToken) {
    m.phase = "refreshing";
    out.push({ type: "refresh" });
    return;
  }
  m.phase = "connecting";
  m.tries += 1;
  m.stats.attempts += 1;
  m.announced = null;
  emit(out, "state", { state: "connecting", attempt: m.tries });
  out.push({ type: "open" });
}

function tokenAnswer(m, input, out) {
  if (input.token != null) {
    m.token = input.token;
    m.needToken = false;
    beginAttempt(m, out);
    return;
  }
  emit(out, "error", { code: "token_refresh_failed", message: String(input.error || "the token refresher failed") });
  m.n += 1;
  m.failuresInRow += 1;
  if (overCap(m)) return fatalCap(m, null, out);
  wait(m, uniform(m.rand, backoffCap(m.backoff, m.n)), out);
}

function subscribe(m, channel, out) {
  if (m.subs.has(channel)) return;
  m.subs.set(channel, { last: null, confirmed: false });
  if (m.transport === "sse") return reopen(m, out);
  if (m.phase === "connected") {
    const ref = m.nextRef++;
    m.pending.set(ref, channel);
    out.push({ type: "send", text: JSON.stringify({ type: "subscribe", ref, channel }) });
  }
}

function unsubscribe(m, channel, out) {
  if (!m.subs.delete(channel)) return;
  for (const [r, c] of m.pending) if (c === channel) m.pending.delete(r);
  if (m.transport === "sse") return reopen(m, out);
  if (m.phase === "connected") {
    const ref = m.nextRef++;
    out.push({ type: "send", text: JSON.stringify({ type: "unsubscribe", ref, channel }) });
  }
}

/** SSE carries its channels in the URL: a change reopens the stream with the cursor. */
function reopen(m, out) {
  if (m.phase !== "connected" && m.phase !== "connecting") return;
  m.reopening = m.reopening || m.phase === "connected";
  m.phase = "connecting";
  if (m.subs.size > 0) m.stats.attempts += 1;
  out.push({ type: "deadline", ms: null });
  out.push({ type: "closeSocket", code: 1000, reason: "subscriptions changed" });
  out.push({ type: "open" });
}

function frame(m, now, f, out) {
  if (m.phase !== "connecting" && m.phase !== "connected") return;
  if (!f || typeof f !== "object") {
    emit(out, "error", { code: "bad_frame", message: "cannot read a server frame" });
    return;
  }
  switch (f.type) {
    case "welcome":
      if (m.phase === "connecting") welcome(m, now, f, out);
      break;
    case "subscribed":
      subscribed(m, f, out);
      break;
    case "message":
      message(m, f, out);
      break;
    case "direct":
      m.stats.messages += 1;
      emit(out, "direct", { id: f.id, data: f.data });
      break;
    case "error": {
      const ch = f.ref != null ? m.pending.get(f.ref) : undefined;
      if (ch !== undefined) {
        m.pending.delete(f.ref);
        m.subs.delete(ch);
      }
      if (f.channel && m.transport === "sse") m.subs.delete(f.channel);
      emit(out, "error", { code: f.code, message: f.message, channel: f.channel ?? ch ?? null });
      break;
    }
    case "closing":
      m.announced = f;
      break;
    case "pong":
    case "unsubscribed":
    case "heartbeat":
      break;
    default:
      emit(out, "error", { code: "bad_frame", message: `unknown frame type ${JSON.stringify(f.type)}` });
  }
}

function welcome(m, now, f, out) {
  const hb = f.heartbeat_ms ?? m.backoff.heartbeatMs;
  const to = f.heartbeat_timeout_ms ?? m.backoff.heartbeatTimeoutMs;
  const reopened = m.reopening;
  m.reopening = false;
  m.phase = "connected";
  m.connId = f.conn_id ?? m.connId;
  if (!reopened || m.welcomedAt == null) m.welcomedAt = now;
  m.stats.successes += 1;
  if (m.everWelcomed && !reopened) m.stats.reconnects += 1;
  m.everWelcomed = true;
  m.failuresInRow = 0;
  m.tries = 0;
  if (!reopened) emit(out, "state", { state: "connected" });
  out.push({ type: "deadline", ms: hb + to, heartbeatMs: hb });
  m.pending.clear();
  if (m.transport === "sse") {
    // The stream subscribed to its URL's channels: the welcome says which recovered,
    // and its cursor where each channel starts (one position per sorted channel).
    const rec = f.recovered || {};
    const starts = cursorPositions(f.cursor);
    [...m.subs.keys()].sort().forEach((ch, i) => {
      subscribed(m, { channel: ch, position: starts[i] ?? null, recovered: !!rec[ch], missed: null }, out);
    });
    return;
  }
  for (const [channel, sub] of m.subs) {
    const ref = m.nextRef++;
    m.pending.set(ref, channel);
    const frame = { type: "subscribe", ref, channel };
    if (sub.last) frame.since = `${sub.last.epoch}:${sub.last.offset}`;
    out.push({ type: "send", text: JSON.stringify(frame) });
  }
}

/** The positions of an SSE cursor `v1.<conn>.<pos>...` (strings), or []. */
export function cursorPositions(cursor) {
  if (typeof cursor !== "string" || !cursor.startsWith("v1.")) return [];
  return cursor.split(".").slice(2);
}

function subscribed(m, f, out) {
  if (f.ref != null) m.pending.delete(f.ref);
  const sub = m.subs.get(f.channel);
  if (!sub) return;
  const resumed = sub.confirmed;
  sub.confirmed = true;
  if (!(resumed && f.recovered)) sub.last = parsePosition(f.position);
  const report = { channel: f.channel, position: f.position ?? null, recovered: !!f.recovered, missed: f.missed ?? null };
  emit(out, resumed ? "recovered" : "subscribed", report);
}

function message(m, f, out) {
  const sub = m.subs.get(f.channel);
  if (!sub) return;
  const pos = parsePosition(f.position);
  if (pos) {
    const last = sub.last;
    if (last && last.epoch === pos.epoch && pos.offset <= last.offset) {
      m.stats.duplicates += 1;
      return;
    }
    sub.last = pos;
  }
  m.stats.messages += 1;
  emit(out, "message", { channel: f.channel, id: f.id, position: f.position, data: f.data });
}

function dropped(m, now, code, reason, out) {
  if (m.phase !== "connecting" && m.phase !== "connected") return;
  const announced = m.announced;
  m.announced = null;
  const b = branch(code, announced, m.hasRefresher);
  const c = code ?? (announced ? announced.code : null);
  const r = reason === "" && announced ? announced.reason : reason;
  ended(m, now, c, String(c ?? 1006), r, b, announced == null, out);
}

function failed(m, status, message, out) {
  if (m.phase !== "connecting") return;
  let b = { kind: "backoff" };
  // 204: the cursor names a connection closed with reconnect:false (SPEC section 6).
  if (status === 204) b = { kind: "stop" };
  else if (status === 401 && m.hasRefresher) b = { kind: "refresh" };
  else if ([400, 401, 403, 404, 409].includes(status)) b = { kind: "fatal" };
  ended(m, 0, status, "connect", message, b, true, out);
}

function ended(m, now, code, key, reason, b, unannounced, out) {
  out.push({ type: "deadline", ms: null });
  m.announced = null;
  m.reopening = false;
  const wasConnected = m.phase === "connected";
  const up = m.welcomedAt != null ? Math.max(0, now - m.welcomedAt) : null;
  m.welcomedAt = null;
  m.stats.connected_ms += up ?? 0;
  m.stats.failures[key] = (m.stats.failures[key] || 0) + 1;
  if (!wasConnected) {
    m.n += 1;
    m.failuresInRow += 1;
  } else if (unannounced && (up ?? 0) < m.backoff.stableMs) {
    m.n += 1;
  } else {
    m.n = 0;
  }
  const capped = overCap(m) && b.kind !== "stop" && b.kind !== "fatal";
  const will = !capped && b.kind !== "stop" && b.kind !== "fatal";
  emit(out, "state", { state: "disconnected", code, reason, will_reconnect: will });
  if (capped) return fatalCap(m, code, out);
  switch (b.kind) {
    case "stop":
      return finish(m, code, reason, false, out);
    case "fatal":
      emit(out, "error", { code: code != null ? CODE_NAMES[code] || "refused" : "refused", message: reason });
      return finish(m, code, reason, true, out);
    case "refresh":
      m.needToken = true;
      return wait(m, m.n === 0 ? 0 : uniform(m.rand, backoffCap(m.backoff, m.n)), out);
    case "server":
      return wait(m, b.retryMs != null ? b.retryMs : uniform(m.rand, m.backoff.minDelayMs), out);
    default:
      return wait(m, uniform(m.rand, backoffCap(m.backoff, Math.max(1, m.n))), out);
  }
}

function overCap(m) {
  return m.failureCap != null && m.failuresInRow >= m.failureCap;
}

function fatalCap(m, code, out) {
  const message = `${m.failuresInRow} consecutive attempts failed (the failure cap)`;
  emit(out, "error", { code: "failure_cap", message });
  finish(m, code, message, true, out);
}

function wait(m, ms, out) {
  m.phase = "waiting";
  emit(out, "state", { state: "reconnecting", attempt: m.tries + 1, delay_ms: ms });
  out.push({ type: "wait", ms });
}

function finish(m, code, reason, fatal, out) {
  m.phase = "closed";
  emit(out, "state", { state: "closed", code, reason, fatal });
  out.push({ type: "finish" });
}

function closeByApp(m, now, out) {
  if (m.phase === "connecting" || m.phase === "connected") {
    out.push({ type: "deadline", ms: null });
    out.push({ type: "closeSocket", code: 1000, reason: "closed by the client" });
  }
  if (m.welcomedAt != null) m.stats.connected_ms += Math.max(0, now - m.welcomedAt);
  m.welcomedAt = null;
  finish(m, 1000, "closed by the client", false, out);
}

const now = () => (typeof performance !== "undefined" ? performance.now() : Date.now());

function withQuery(url, params) {
  const u = new URL(url);
  for (const [k, v] of params) u.searchParams.append(k, v);
  return u.toString();
}

/**
 * The client: new TetherClient(url, {client | token | getToken, transport: "ws"|"sse",
 * backoff, failureCap, connectTimeoutMs, seed, WebSocket, EventSource}).
 */
export class TetherClient {
  constructor(url, opts = {}) {
    this.url = url;
    this.opts = opts;
    this.transport = opts.transport === "sse" ? "sse" : "ws";
    this.handlers = { state: [], message: [], recovered: [], subscribed: [], direct: [], error: [] };
    this.m = newMachine({
      transport: this.transport,
      backoff: opts.backoff,
      failureCap: opts.failureCap,
      hasRefresher: typeof opts.getToken === "function",
      connectTimeoutMs: opts.connectTimeoutMs,
      seed: opts.seed,
      token: opts.token,
    });
    this.sock = null;
    this.timer = null;
    this.deadline = null;
    this.silenceMs = null;
    this.pinger = null;
    this.gen = 0;
    this.queue = [];
    this.feeding = false;
  }

  /** on("state"|"message"|"recovered"|"subscribed"|"direct"|"error", fn). */
  on(event, fn) {
    (this.handlers[event] || (this.handlers[event] = [])).push(fn);
    return this;
  }

  subscribe(channel) {
    this.feed({ type: "subscribe", channel });
  }

  unsubscribe(channel) {
    this.feed({ type: "unsubscribe", channel });
  }

  connect() {
    this.feed({ type: "start" });
  }

  close() {
    this.feed({ type: "close", now: now() });
  }

  stats() {
    return statsAt(this.m, now());
  }

  get state() {
    return this.m.phase;
  }

  /** Steps the machine; an input fed from inside a handler waits for the current step's actions. */
  feed(input) {
    this.queue.push(input);
    if (this.feeding) return;
    this.feeding = true;
    try {
      while (this.queue.length > 0) {
        const [m, actions] = step(this.m, this.queue.shift());
        this.m = m;
        for (const a of actions) this.perform(a);
      }
    } finally {
      this.feeding = false;
    }
  }

  perform(a) {
    switch (a.type) {
      case "open":
        return this.open();
      case "send":
        if (this.sock && this.transport === "ws" && this.sock.readyState === 1) this.sock.send(a.text);
        return;
      case "closeSocket":
        return this.dropSocket(a.code, a.reason);
      case "wait":
        clearTimeout(this.timer);
        this.timer = setTimeout(() => this.feed({ type: "timer" }), a.ms);
        return;
      case "refresh":
        return this.refresh();
      case "deadline":
        this.silenceMs = a.ms;
        this.rearm();
        this.setPinger(a.ms == null ? null : a.heartbeatMs);
        return;
      case "emit":
        return this.emit(a.event, a.data);
      case "finish":
        clearTimeout(this.timer);
        this.setPinger(null);
        return this.dropSocket(1000, "closed");
    }
  }

  emit(event, data) {
    for (const fn of this.handlers[event] || []) {
      try {
        fn(data);
      } catch (e) {
        // An app handler's error must not break the machine.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  rearm() {
    clearTimeout(this.deadline);
    this.deadline = null;
    if (this.silenceMs == null) return;
    const gen = this.gen;
    this.deadline = setTimeout(() => {
      if (gen === this.gen) this.feed({ type: "silent", now: now() });
    }, this.silenceMs);
  }

  setPinger(heartbeatMs) {
    clearInterval(this.pinger);
    this.pinger = null;
    // Browsers cannot see WebSocket pings: an app ping every heartbeat_ms gets a pong.
    if (heartbeatMs && this.transport === "ws") {
      this.pinger = setInterval(() => {
        if (this.sock && this.sock.readyState === 1) this.sock.send('{"type":"ping"}');
      }, heartbeatMs);
    }
  }

  async refresh() {
    const gen = ++this.gen;
    let input;
    try {
      input = { type: "token", token: String(await this.opts.getToken()) };
    } catch (e) {
      input = { type: "token", error: String((e && e.message) || e) };
    }
    if (gen === this.gen) this.feed(input);
  }

  dropSocket(code, reason) {
    const s = this.sock;
    this.sock = null;
    this.gen++;
    clearTimeout(this.deadline);
    if (!s) return;
    if (this.transport === "ws") {
      try {
        s.close(code, reason);
      } catch {
        s.close();
      }
    } else {
      s.close();
    }
  }

  open() {
    const gen = ++this.gen;
    if (this.transport === "sse") return this.openSse(gen);
    const params = [["refusal", "close"]];
    if (this.opts.client != null) params.push(["client", this.opts.client]);
    const WS = this.opts.WebSocket || globalThis.WebSocket;
    const ws = new WS(withQuery(this.url, params));
    this.sock = ws;
    const mine = () => gen === this.gen && this.sock === ws;
    let closeSeen = false;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      if (mine()) this.feed({ type: "opened" });
    };
    ws.onmessage = (e) => {
      if (!mine()) return;
      this.rearm();
      let f;
      try {
        f = JSON.parse(e.data);
      } catch {
        f = null;
      }
      this.feed({ type: "frame", now: now(), frame: f });
    };
    ws.onclose = (e) => {
      if (!mine() || closeSeen) return;
      closeSeen = true;
      this.sock = null;
      if (!opened) {
        this.feed({ type: "failed", status: null, message: "the socket did not open" });
      } else {
        this.feed({ type: "dropped", now: now(), code: e.code === 1005 ? null : e.code, reason: e.reason || "" });
      }
    };
  }

  openSse(gen) {
    const q = sseQuery(this.m);
    if (q.channels.length === 0) return; // opened when the first channel is subscribed
    const params = q.channels.map((c) => ["channel", c]);
    params.push(["heartbeat", "event"]);
    if (q.since) params.push(["since", q.since]);
    if (this.opts.client != null) params.push(["client", this.opts.client]);
    if (this.m.token != null) params.push(["token", this.m.token]);
    const ES = this.opts.EventSource || globalThis.EventSource;
    const url = withQuery(this.url, params);
    const es = new ES(url);
    this.sock = es;
    const mine = () => gen === this.gen && this.sock === es;
    const on = (name, fn) =>
      es.addEventListener(name, (e) => {
        if (!mine()) return;
        this.rearm();
        let data;
        try {
          data = JSON.parse(e.data);
        } catch {
          data = null;
        }
        fn(data, e);
      });
    es.onopen = () => mine() && this.feed({ type: "opened" });
    on("welcome", (d, e) =>
      this.feed({ type: "frame", now: now(), frame: d && { ...d, type: "welcome", cursor: e.lastEventId } }),
    );
    on("message", (d) => this.feed({ type: "frame", now: now(), frame: d && { ...d, type: "message" } }));
    on("heartbeat", () => {});
    on("error", (d) => d && this.feed({ type: "frame", now: now(), frame: { ...d, type: "error" } }));
    on("closing", (d) => {
      // Stop EventSource's own reconnect: the machine decides (reconnect:false stays down).
      es.close();
      this.sock = null;
      this.feed({ type: "frame", now: now(), frame: d && { ...d, type: "closing" } });
      this.feed({ type: "dropped", now: now(), code: d ? d.code : null, reason: d ? d.reason : "" });
    });
    es.onerror = () => {
      if (!mine()) return;
      const neverOpened = this.m.phase === "connecting";
      es.close();
      this.sock = null;
      if (neverOpened) this.probe(url, gen);
      else this.feed({ type: "dropped", now: now(), code: null, reason: "the stream ended" });
    };
  }

  /** EventSource hides a refusal's status: one fetch reads it (401/403/409 are final). */
  async probe(url, gen) {
    let status = null;
    const ctl = typeof AbortController !== "undefined" ? new AbortController() : null;
    try {
      const r = await fetch(url, { signal: ctl && ctl.signal, headers: { accept: "text/event-stream" } });
      status = r.status;
    } catch {
      status = null;
    }
    if (ctl) ctl.abort();
    if (gen !== this.gen) return;
    const refused = status != null && status !== 200;
    this.feed({ type: "failed", status: refused ? status : null, message: refused ? `HTTP ${status}` : "the stream did not open" });
  }
}
