// Tether dashboard. It only calls the server API (SPEC section 8) with the
// session cookie that /admin/session hands out, and builds the DOM with
// textContent (never innerHTML): every value shown comes from peers.
"use strict";

const FAST_MS = 1000; // stats + metrics -> tiles and charts
const SLOW_MS = 2000; // tables
const CHART_POINTS = 300; // 5 minutes at FAST_MS
const PAGE_ROWS = 20;
const SCAN_PAGES = 5; // connections scanned for search: SCAN_PAGES x 1000
const FEED_KEEP = 500;
const FEED_SHOW = 200;
const EVENT_TYPES = [
  "connection.opened", "connection.closed", "client.online", "client.offline",
  "subscription.added", "subscription.removed", "channel.occupied", "channel.vacated",
];

const $ = (sel) => document.querySelector(sel);

/** An element with text children (strings) or element children. */
function h(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(e.dataset, v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

// ---------------------------------------------------------------- API calls

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

async function api(path, { method = "GET", body, text = false } = {}) {
  const init = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  if (r.status === 401) {
    showLogin();
    throw new ApiError(401, null);
  }
  if (!r.ok) {
    let b = null;
    try { b = await r.json(); } catch { /* not JSON */ }
    throw new ApiError(r.status, b);
  }
  return text ? r.text() : r.json();
}

// ---------------------------------------------------------------- formatting

function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["kB", "MB", "GB", "TB"];
  let v = n / 1024, i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${v < 10 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

function fmtIdle(ms) {
  if (ms < 1000) return `${ms} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const m = s / 60;
  if (m < 60) return `${m.toFixed(m < 10 ? 1 : 0)} min`;
  return `${(m / 60).toFixed(1)} h`;
}

const fmtNum = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : "–");
const fmtRate = (n) => (n >= 100 ? Math.round(n).toLocaleString("en-US") : n.toFixed(n >= 10 ? 0 : 1));

function toast(message, bad = false) {
  const t = $("#toast");
  t.textContent = message;
  t.classList.toggle("bad", bad);
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.textContent = ""; }, 6000);
}

// ---------------------------------------------------------------- login

let running = false;
let timers = [];

function showLogin() {
  stop();
  $("#dash").hidden = true;
  $("#login").hidden = false;
  $("#key").focus();
}

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  $("#login-error").textContent = "";
  const r = await fetch("/admin/session", {
    method: "POST",
    credentials: "same-origin",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ key: $("#key").value }),
  });
  if (!r.ok) {
    $("#login-error").textContent = r.status === 401 ? "Wrong key." : `Sign-in failed (HTTP ${r.status}).`;
    return;
  }
  $("#key").value = "";
  start();
});

async function start() {
  try {
    await api("/api/stats");
  } catch (e) {
    if (e.status !== 401) toast(`API unreachable: ${e.message}`, true);
    return;
  }
  $("#login").hidden = true;
  $("#dash").hidden = false;
  if (running) return;
  running = true;
  charts.init();
  fast();
  slow();
  timers = [setInterval(fast, FAST_MS), setInterval(slow, SLOW_MS)];
  feed.open();
}

function stop() {
  running = false;
  timers.forEach(clearInterval);
  timers = [];
  feed.close();
}

// ---------------------------------------------------------------- stats, metrics, charts

/** Sums the samples of one metric family in Prometheus / OpenMetrics text. */
function metricSum(text, name) {
  let sum = 0, seen = false;
  for (const line of text.split("\n")) {
    if (!line.startsWith(name)) continue;
    const rest = line.slice(name.length);
    if (rest[0] !== " " && rest[0] !== "{") continue;
    const value = Number(rest.slice(rest.lastIndexOf("}") + 1).trim().split(" ")[0]);
    if (Number.isFinite(value)) { sum += value; seen = true; }
  }
  return seen ? sum : null;
}

const charts = {
  data: { t: [], ws: [], sse: [], proxy: [], pub: [], del: [] },
  prev: null,
  conns: null,
  msgs: null,
  init() {
    if (this.conns || typeof uPlot === "undefined") return;
    const d = this.data;
    const common = (el) => ({
      width: Math.max(200, el.clientWidth), height: 180,
      scales: { x: { time: true } },
      axes: [{ stroke: "#5b6577", grid: { stroke: "#eef1f5" }, space: 70,
        values: (u, ticks) => ticks.map((t) => new Date(t * 1000).toLocaleTimeString("en-GB")) },
        { stroke: "#5b6577", grid: { stroke: "#eef1f5" }, size: 48 }],
      cursor: { drag: { x: false, y: false } },
      legend: { live: false },
    });
    const line = (label, stroke) => ({ label, stroke, width: 2, points: { show: false } });
    const c1 = $("#chart-conns"), c2 = $("#chart-msgs");
    this.conns = new uPlot({ ...common(c1), series: [{},
      line("WebSocket", "#2357d9"), line("SSE", "#12805c"), line("Proxy", "#c46d00")] },
    [d.t, d.ws, d.sse, d.proxy], c1);
    this.msgs = new uPlot({ ...common(c2), series: [{},
      line("Published/s", "#7a3fd1"), line("Delivered/s", "#0f8aa8")] },
    [d.t, d.pub, d.del], c2);
    const fit = () => {
      this.conns.setSize({ width: Math.max(200, c1.clientWidth), height: 180 });
      this.msgs.setSize({ width: Math.max(200, c2.clientWidth), height: 180 });
    };
    new ResizeObserver(fit).observe(c1);
  },
  push(stats, metrics) {
    const now = Date.now() / 1000;
    const pub = metricSum(metrics, "tether_messages_published_total");
    const del = metricSum(metrics, "tether_messages_delivered_total");
    let pubRate = null, delRate = null;
    if (this.prev && now > this.prev.t) {
      const dt = now - this.prev.t;
      const rate = (a, b) => (a === null || b === null ? null : Math.max(0, a - b) / dt);
      pubRate = rate(pub, this.prev.pub);
      delRate = rate(del, this.prev.del);
    }
    this.prev = { t: now, pub, del };
    const d = this.data;
    d.t.push(now);
    d.ws.push(stats.connections.ws);
    d.sse.push(stats.connections.sse);
    d.proxy.push(stats.connections.proxy);
    d.pub.push(pubRate);
    d.del.push(delRate);
    if (d.t.length > CHART_POINTS) for (const k of Object.keys(d)) d[k].shift();
    if (this.conns) {
      this.conns.setData([d.t, d.ws, d.sse, d.proxy]);
      this.msgs.setData([d.t, d.pub, d.del]);
    }
    return { pubRate, delRate };
  },
};

/** `fn`, but a call made while the previous one is still running is skipped. */
function single(fn) {
  let busy = false;
  return async () => {
    if (busy) return;
    busy = true;
    try { await fn(); } finally { busy = false; }
  };
}

const fast = single(async () => {
  let stats, metrics;
  try {
    [stats, metrics] = await Promise.all([api("/api/stats"), api("/metrics", { text: true })]);
  } catch (e) {
    if (e.status !== 401) $("#updated").textContent = `API unreachable (${e.message})`;
    return;
  }
  const { pubRate, delRate } = charts.push(stats, metrics);
  const set = (id, v) => { $(id).textContent = v; };
  set("#t-ws", fmtNum(stats.connections.ws));
  set("#t-sse", fmtNum(stats.connections.sse));
  set("#t-proxy", fmtNum(stats.connections.proxy));
  set("#t-clients", fmtNum(stats.clients));
  set("#t-channels", fmtNum(stats.channels));
  set("#t-max", fmtNum(stats.max_connections));
  set("#t-pending", fmtNum(stats.pending_handshakes));
  set("#t-tasks", fmtNum(stats.tasks));
  set("#t-pub", pubRate === null ? "–" : fmtRate(pubRate));
  set("#t-del", delRate === null ? "–" : fmtRate(delRate));
  const node = $("#node"), state = $("#state");
  node.hidden = false;
  node.textContent = `node ${stats.node_id}`;
  state.hidden = false;
  state.textContent = stats.draining ? "draining" : "serving";
  state.className = `pill ${stats.draining ? "bad" : "good"}`;
  $("#updated").textContent = `updated ${new Date().toLocaleTimeString("en-GB")}`;
});

const slow = single(async () => {
  await Promise.allSettled([conns.load(), channels.load(), clients.load(), webhooks.load()]);
});

// ---------------------------------------------------------------- keyed table updates

/**
 * Brings `tbody` to `rows` (fresh <tr>s, each with a `data-row` key) without
 * replacing a row that is still there: its changed cells are swapped, its buttons
 * stay the same elements, so a click or keyboard focus on one survives a refresh.
 */
function syncRows(tbody, rows) {
  const keys = new Set(rows.map((tr) => tr.dataset.row));
  const old = new Map();
  for (const tr of [...tbody.children]) {
    if (keys.has(tr.dataset.row)) old.set(tr.dataset.row, tr);
    else tr.remove();
  }
  rows.forEach((fresh, i) => {
    const tr = old.get(fresh.dataset.row);
    if (tr) patchRow(tr, fresh);
    const row = tr || fresh;
    const at = tbody.children[i];
    if (at !== row) tbody.insertBefore(row, at || null);
  });
}

function patchRow(tr, fresh) {
  [...fresh.children].forEach((td, i) => {
    const cur = tr.children[i];
    // A cell with buttons acts on the row's key, which is the same: keep it.
    if (!cur || td.querySelector("button")) return;
    if (cur.outerHTML !== td.outerHTML) cur.replaceWith(td);
  });
}

// ---------------------------------------------------------------- connections

const conns = {
  all: [],
  truncated: false,
  page: 0,
  async load() {
    const all = [];
    let token = null, pages = 0;
    do {
      const q = new URLSearchParams({ limit: "1000" });
      if (token) q.set("page", token);
      const r = await api(`/api/connections?${q}`);
      all.push(...r.connections);
      token = r.next_page;
      pages++;
    } while (token && pages < SCAN_PAGES);
    this.all = all;
    this.truncated = Boolean(token);
    this.render();
  },
  filtered() {
    const q = $("#conn-search").value.trim().toLowerCase();
    if (!q) return this.all;
    return this.all.filter((c) =>
      c.client_id.toLowerCase().includes(q) || c.conn_id.toLowerCase().includes(q) ||
      c.channels.some((ch) => ch.toLowerCase().includes(q)));
  },
  render() {
    const rows = this.filtered();
    const pages = Math.max(1, Math.ceil(rows.length / PAGE_ROWS));
    this.page = Math.min(this.page, pages - 1);
    const first = this.page * PAGE_ROWS;
    const shown = rows.slice(first, first + PAGE_ROWS);
    syncRows($("#conns tbody"), shown.map(connRow));
    $("#conns-empty").hidden = rows.length > 0;
    $("#conns-empty").textContent = this.all.length ? "No connection matches the search." : "No connections.";
    const more = this.truncated ? ` (first ${fmtNum(this.all.length)} scanned)` : "";
    $("#conns-range").textContent = rows.length
      ? `${first + 1}–${first + shown.length} of ${fmtNum(rows.length)}${more}` : more.trim();
    $("#conns-prev").disabled = this.page === 0;
    $("#conns-next").disabled = this.page >= pages - 1;
  },
};

function connRow(c) {
  const chans = c.channels.join(", ");
  // Explicit roles: at phone width the table is laid out as blocks (see admin.css).
  return h("tr", { role: "row", dataset: { row: c.conn_id, conn: c.conn_id, client: c.client_id } },
    h("td", { role: "cell", "data-label": "Client" }, h("span", { class: "id", text: c.client_id })),
    h("td", { role: "cell", "data-label": "Conn" }, h("span", { class: "id", title: c.conn_id, text: c.conn_id })),
    h("td", { role: "cell", "data-label": "Transport" }, h("span", { class: `tag ${c.transport}`, text: c.transport })),
    h("td", { class: "chans", role: "cell", "data-label": "Channels", title: chans, text: chans || "—" }),
    h("td", { class: "n", role: "cell", "data-label": "Idle", text: fmtIdle(c.idle_ms) }),
    h("td", { class: "n", role: "cell", "data-label": "In", text: fmtBytes(c.bytes_in) }),
    h("td", { class: "n", role: "cell", "data-label": "Out", text: fmtBytes(c.bytes_out) }),
    h("td", { class: "n", role: "cell", "data-label": "Queued", text: fmtBytes(c.queued_bytes) }),
    h("td", { class: "actions", role: "cell" },
      h("button", {
        type: "button", class: "kick", text: "Kick",
        "aria-label": `Disconnect connection ${c.conn_id}`,
        onclick: () => kick.ask({ conn_id: c.conn_id }, `connection ${c.conn_id} of client ${c.client_id}`),
      }),
      h("button", {
        type: "button", class: "kick", text: "Kick client",
        "aria-label": `Disconnect every connection of client ${c.client_id}`,
        onclick: () => kick.ask({ client_id: c.client_id }, `every connection of client ${c.client_id}`),
      })));
}

$("#conn-search").addEventListener("input", () => { conns.page = 0; conns.render(); });
$("#conns-prev").addEventListener("click", () => { conns.page--; conns.render(); });
$("#conns-next").addEventListener("click", () => { conns.page++; conns.render(); });

// ---------------------------------------------------------------- kick dialog

const kick = {
  target: null,
  ask(target, what) {
    this.target = target;
    $("#kick-what").textContent = `Disconnect ${what}?`;
    $("#kick-code").value = "4002";
    $("#kick-reason").value = "kicked";
    $("#kick-reconnect").checked = false;
    $("#kick-error").textContent = "";
    $("#kick").showModal();
    $("#kick-cancel").focus();
  },
  async confirm() {
    const code = Number($("#kick-code").value);
    if (!(code === 1000 || code === 1001 || (Number.isInteger(code) && code >= 3000 && code <= 4999))) {
      $("#kick-error").textContent = "The code must be 1000, 1001 or 3000 to 4999.";
      return;
    }
    const body = { ...this.target, code, reconnect: $("#kick-reconnect").checked };
    const reason = $("#kick-reason").value.trim();
    if (reason) body.reason = reason;
    try {
      const r = await api("/api/disconnect", { method: "POST", body });
      $("#kick").close();
      toast(`Closed ${r.closed} connection${r.closed === 1 ? "" : "s"}.`);
      conns.load().catch(() => {});
    } catch (e) {
      $("#kick-error").textContent = `Failed: ${e.message}`;
    }
  },
};

$("#kick-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  kick.confirm();
});
$("#kick-cancel").addEventListener("click", () => $("#kick").close());

// ---------------------------------------------------------------- channels

const channels = {
  selected: null,
  history: { epoch: null, since: null, messages: [] },
  async load() {
    const r = await api("/api/channels");
    const list = r.channels.slice().sort((a, b) => b.subscribers - a.subscribers || a.name.localeCompare(b.name));
    syncRows($("#chans tbody"), list.map((c) => h("tr", { dataset: { row: c.name } },
      h("td", {}, h("span", { class: "id", text: c.name })),
      h("td", { class: "n", text: fmtNum(c.subscribers) }),
      h("td", { class: "n", text: fmtNum(c.clients) }),
      h("td", { class: "actions" }, h("button", {
        type: "button", class: "link", text: "Details",
        "aria-label": `Details of channel ${c.name}`,
        onclick: () => this.select(c.name),
      })))));
    $("#chans-empty").hidden = list.length > 0;
    if (this.selected) await this.loadDetail();
  },
  select(name) {
    this.selected = name;
    this.history = { epoch: null, since: null, messages: [] };
    $("#chan-title").textContent = name;
    $("#chan-detail").hidden = false;
    $("#presence").replaceChildren();
    $("#history").replaceChildren();
    this.loadDetail().catch((e) => toast(`Channel ${name}: ${e.message}`, true));
    $("#chan-close").focus();
  },
  async loadDetail() {
    const name = this.selected;
    const enc = encodeURIComponent(name);
    const [presence] = await Promise.all([api(`/api/channels/${enc}/presence`), this.loadHistory(enc)]);
    if (name !== this.selected) return;
    const items = presence.clients.map((c) => h("li", {},
      h("span", { class: "id", text: c.client_id }), ` · ${c.connections} conn${c.connections === 1 ? "" : "s"}`));
    $("#presence").replaceChildren(...(items.length ? items : [h("li", { class: "muted", text: "Nobody here." })]));
    const msgs = this.history.messages.slice().reverse();
    $("#history").replaceChildren(...(msgs.length ? msgs.map((m) => h("li", {},
      h("span", { class: "pos", text: m.position }), JSON.stringify(m.data).slice(0, 300)))
      : [h("li", { class: "muted", text: "No messages in history." })]));
  },
  // History pages go oldest first: read forward from the last position seen and
  // keep the newest 20 (bounded: at most 20 pages of 1000 per refresh).
  async loadHistory(enc) {
    const hs = this.history;
    for (let i = 0; i < 20; i++) {
      const q = new URLSearchParams({ limit: "1000" });
      if (hs.since) q.set("since", hs.since);
      const r = await api(`/api/channels/${enc}/history?${q}`);
      if (hs.epoch !== null && r.epoch !== hs.epoch) { hs.since = null; hs.messages = []; }
      hs.epoch = r.epoch;
      if (r.messages.length === 0) return;
      hs.messages = hs.messages.concat(r.messages).slice(-20);
      hs.since = r.messages[r.messages.length - 1].position;
      if (r.messages.length < 1000) return;
    }
  },
};

$("#chan-close").addEventListener("click", () => {
  channels.selected = null;
  $("#chan-detail").hidden = true;
});

// ---------------------------------------------------------------- clients (GET /api/clients, when the server has it)

/** A call this server may lack (404): asked again only after a while. */
const ABSENT_RETRY_MS = 30000;

const clients = {
  tokens: [null],
  page: 0,
  absentSince: 0,
  async load() {
    if (Date.now() - this.absentSince < ABSENT_RETRY_MS) return;
    const q = new URLSearchParams({ limit: "20" });
    const token = this.tokens[this.page];
    if (token) q.set("page", token);
    let r;
    try {
      r = await api(`/api/clients?${q}`);
    } catch (e) {
      if (e.status === 404) {
        this.absentSince = Date.now();
        $("#clients-na").hidden = false;
        $("#clients-wrap").hidden = true;
        $("#clients-pager").hidden = true;
        return;
      }
      throw e;
    }
    $("#clients-na").hidden = true;
    $("#clients-wrap").hidden = false;
    $("#clients-pager").hidden = false;
    this.tokens[this.page + 1] = r.next_page || null;
    syncRows($("#clients tbody"), r.clients.map((c) => h("tr", { dataset: { row: c.client_id } },
      h("td", {}, h("span", { class: "id", text: c.client_id })),
      h("td", { text: c.state }),
      h("td", { class: "n", text: fmtNum(c.connections) }),
      h("td", { class: "actions" }, h("button", {
        type: "button", class: "kick", text: "Kick",
        "aria-label": `Disconnect every connection of client ${c.client_id}`,
        onclick: () => kick.ask({ client_id: c.client_id }, `every connection of client ${c.client_id}`),
      })))));
    $("#clients-prev").disabled = this.page === 0;
    $("#clients-next").disabled = !r.next_page;
  },
};

$("#clients-prev").addEventListener("click", () => { clients.page = Math.max(0, clients.page - 1); clients.load(); });
$("#clients-next").addEventListener("click", () => { clients.page++; clients.load(); });

// ---------------------------------------------------------------- webhooks (GET /api/webhooks, when the server has it)

const webhooks = {
  absentSince: 0,
  async load() {
    if (Date.now() - this.absentSince < ABSENT_RETRY_MS) return;
    let r;
    try {
      r = await api("/api/webhooks");
    } catch (e) {
      if (e.status !== 404) throw e;
      this.absentSince = Date.now();
      r = { enabled: false };
    }
    $("#hooks-na").hidden = r.enabled !== false;
    if (r.enabled === false) { $("#hooks").replaceChildren(); return; }
    const fields = ["url", "events", "queued", "in_flight", "delivered", "failed", "retries", "dropped", "last_error"];
    const show = (v) => (Array.isArray(v) ? v.join(", ") : v === null || v === undefined || v === "" ? "—"
      : typeof v === "number" ? fmtNum(v) : String(v));
    $("#hooks").replaceChildren(...fields.filter((f) => f in r).flatMap((f) =>
      [h("dt", { text: f.replace("_", " ") }), h("dd", { text: show(r[f]) })]));
  },
};

// ---------------------------------------------------------------- lifecycle feed (GET /api/events)

const feed = {
  es: null,
  events: [],
  queued: false,
  open() {
    if (this.es) return;
    const es = new EventSource("/api/events");
    this.es = es;
    const state = $("#events-state");
    es.onopen = () => { state.textContent = "live"; state.className = "pill small good"; };
    es.onerror = () => {
      state.textContent = es.readyState === EventSource.CLOSED ? "closed" : "reconnecting";
      state.className = "pill small bad";
      // A refused stream (a session that expired) is not retried by EventSource.
      if (es.readyState === EventSource.CLOSED && this.es === es) {
        this.es = null;
        setTimeout(() => { if (running) start().then(() => { if (running) this.open(); }); }, 3000);
      }
    };
    for (const t of EVENT_TYPES) {
      es.addEventListener(t, (e) => {
        let v;
        try { v = JSON.parse(e.data); } catch { return; }
        this.events.unshift(v);
        if (this.events.length > FEED_KEEP) this.events.length = FEED_KEEP;
        this.schedule();
      });
    }
  },
  close() {
    if (this.es) this.es.close();
    this.es = null;
  },
  schedule() {
    if (this.queued) return;
    this.queued = true;
    requestAnimationFrame(() => { this.queued = false; this.render(); });
  },
  render() {
    const type = $("#event-type").value;
    const text = $("#event-text").value.trim().toLowerCase();
    const match = this.events.filter((v) => (!type || v.type === type) &&
      (!text || JSON.stringify(v).toLowerCase().includes(text)));
    const items = match.slice(0, FEED_SHOW).map(eventItem);
    if (match.length > FEED_SHOW) items.push(h("li", { class: "more", text: `${match.length - FEED_SHOW} older not shown` }));
    $("#events").replaceChildren(...items);
  },
};

function eventItem(v) {
  const at = new Date(v.at);
  const when = Number.isNaN(at.getTime()) ? v.at : at.toLocaleTimeString("en-GB");
  const parts = [];
  if (v.client_id) parts.push(`client ${v.client_id}`);
  if (v.conn_id) parts.push(`conn ${v.conn_id}`);
  if (v.channel) parts.push(`channel ${v.channel}`);
  if (v.code !== undefined && v.code !== null) parts.push(`code ${v.code}`);
  if (v.reason) parts.push(v.reason);
  if (v.duration_ms !== undefined && v.duration_ms !== null) parts.push(fmtIdle(v.duration_ms));
  return h("li", { dataset: { type: v.type } },
    h("time", { datetime: v.at, text: when }),
    h("span", { class: `ev ${v.type.split(".")[1] || ""}`, text: v.type }),
    parts.join(" · "));
}

$("#event-type").addEventListener("change", () => feed.render());
$("#event-text").addEventListener("input", () => feed.render());

start();
