// The node's live page. Everything shown comes from the store or from peers and
// is untrusted: it is only ever set with textContent or attributes, never as
// HTML. Memory is bounded: MAX_POINTS readings per charted topic, MAX_LIVE topics
// followed at once (a browser keeps ~6 connections per host; each follow holds one).
"use strict";

const MAX_POINTS = 300;
const MAX_SERIES = 6;
const MAX_LIVE = 4;
const RATE_WINDOW_MS = 10000;
const POLL_MS = 2000;
const COLORS = ["#2e90fa", "#f04438", "#12b76a", "#f79009", "#7a5af8", "#ee46bc"];
const SVG = "http://www.w3.org/2000/svg";
const W = 600, H = 180, PAD_L = 48, PAD_R = 8, PAD_T = 8, PAD_B = 18;

// --- the token: off loopback every request needs it (see the README) ---
const TOKEN_KEY = "multifeed-token";
const COOKIE = "multifeed_token";

function takeTokenFromFragment() {
  const match = /^#token=([0-9A-Za-z]+)$/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, match[1]);
    history.replaceState(null, "", location.pathname + location.search);
  }
}

// EventSource can't send headers; a same-site session cookie carries the token
// for it (and for fetch).
function setTokenCookie() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token && /^[0-9A-Za-z]+$/.test(token)) {
    document.cookie = COOKIE + "=" + token + "; path=/; SameSite=Strict";
  }
}

function askForToken() {
  document.getElementById("token-form").hidden = false;
  setStatus("unauthorized", "needs token");
}

function listenForToken() {
  const section = document.getElementById("token-form");
  section.querySelector("form").addEventListener("submit", (e) => {
    e.preventDefault();
    const token = document.getElementById("token").value.trim();
    if (!/^[0-9A-Za-z]+$/.test(token)) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    setTokenCookie();
    section.hidden = true;
    for (const live of charts.values()) live.restart();
    poll();
  });
}

// --- small helpers ---
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "class") node.className = v;
    else if (k === "data") for (const [dk, dv] of Object.entries(v)) node.dataset[dk] = dv;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

// Set through the CSSOM: the page's CSP refuses inline style attributes.
function swatch(color) {
  const node = el("span", { class: "swatch" });
  node.style.backgroundColor = color;
  return node;
}

function setText(id, text) {
  document.getElementById(id).textContent = text;
}

function setStatus(state, text) {
  const s = document.getElementById("status");
  s.dataset.state = state;
  s.textContent = text;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let v = Number(n) || 0, u = 0;
  while (v >= 1024 && u < units.length - 1) { v /= 1024; u++; }
  return u === 0 ? v + " B" : v.toFixed(1) + " " + units[u];
}

function fmtNumber(v) {
  if (!isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e6 || a < 1e-3)) return v.toExponential(2);
  return String(Math.round(v * 1000) / 1000);
}

async function api(path) {
  const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (response.status === 401) {
    askForToken();
    throw new Error("unauthorized");
  }
  if (!response.ok) throw new Error(path + ": HTTP " + response.status);
  return response.json();
}

// --- numeric readings from a payload: a number, or a JSON object's numeric fields ---
function readings(payload) {
  if (typeof payload !== "string" || payload.length > 65536) return null;
  const text = payload.trim();
  if (text === "") return null;
  const number = Number(text);
  if (isFinite(number)) return [["value", number]];
  if (text[0] !== "{") return null;
  let parsed;
  try { parsed = JSON.parse(text); } catch { return null; }
  if (parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) return null;
  const found = [];
  for (const [field, v] of Object.entries(parsed)) {
    if (typeof v === "number" && isFinite(v)) found.push([field.slice(0, 64), v]);
    if (found.length >= MAX_SERIES * 2) break;
  }
  return found.length ? found : null;
}

// --- one charted topic ---
class LiveTopic {
  constructor(topic) {
    this.topic = topic;
    this.points = [];          // {t, values: Map(field -> number)}, oldest first, <= MAX_POINTS
    this.series = [];          // field names in order of first sight, <= MAX_SERIES
    this.arrivals = [];        // arrival times within RATE_WINDOW_MS
    this.received = 0;
    this.source = null;
    this.dirty = false;
    this.build();
    this.restart();
  }

  build() {
    this.rate = el("span", { class: "rate" }, "0 msg/s");
    this.legend = el("div", { class: "legend" });
    this.svg = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
    this.empty = el("p", { class: "empty" }, "no numeric readings yet");
    this.figure = el("figure", { class: "chart", data: { topic: this.topic, points: "0" } },
      el("figcaption", {}, el("span", { class: "topic" }, this.topic), this.rate),
      this.svg, this.empty, this.legend);
    document.getElementById("charts").append(this.figure);
  }

  restart() {
    if (this.source) this.source.close();
    // Reconnects resume with Last-Event-ID (the cursor): no loss, no repeat.
    // Recent readings first (the chart keeps the last MAX_POINTS), then live; a
    // reconnect resumes from the last event's id, which the browser sends.
    this.source = new EventSource("/topics/" + encodeURIComponent(this.topic) + "/events?tail=" + MAX_POINTS);
    this.source.addEventListener("message", (e) => this.onMessage(e));
    this.source.addEventListener("error", () => {
      if (this.source.readyState === EventSource.CLOSED) {
        // Refused outright (e.g. the token): try again with the next poll.
        this.source = null;
      }
    });
  }

  onMessage(event) {
    let message;
    try { message = JSON.parse(event.data); } catch { return; }
    this.received++;
    const now = Date.now();
    this.arrivals.push(now);
    const values = readings(message.payload);
    if (!values) return;
    const point = { t: Number(message.time_ms) || now, values: new Map() };
    for (const [field, v] of values) {
      if (!this.series.includes(field)) {
        if (this.series.length >= MAX_SERIES) continue;
        this.series.push(field);
      }
      point.values.set(field, v);
    }
    if (point.values.size === 0) return;
    this.points.push(point);
    if (this.points.length > MAX_POINTS) this.points.splice(0, this.points.length - MAX_POINTS);
    this.schedule();
  }

  schedule() {
    if (this.dirty) return;
    this.dirty = true;
    setTimeout(() => { this.dirty = false; this.draw(); }, 200);
  }

  updateRate() {
    const since = Date.now() - RATE_WINDOW_MS;
    while (this.arrivals.length && this.arrivals[0] < since) this.arrivals.shift();
    if (this.arrivals.length > 100000) this.arrivals.splice(0, this.arrivals.length - 100000);
    this.rate.textContent = fmtNumber(this.arrivals.length / (RATE_WINDOW_MS / 1000)) + " msg/s";
    this.figure.dataset.received = String(this.received);
  }

  draw() {
    const pts = this.points;
    this.figure.dataset.points = String(pts.length);
    this.empty.hidden = pts.length > 0;
    this.svg.replaceChildren();
    this.legend.replaceChildren();
    if (!pts.length) return;
    let lo = Infinity, hi = -Infinity;
    for (const p of pts) for (const v of p.values.values()) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    if (lo === hi) { lo -= 1; hi += 1; }
    const t0 = pts[0].t, t1 = pts[pts.length - 1].t;
    const n = pts.length;
    // x by arrival order when times don't spread (e.g. a batch with one timestamp).
    const byTime = t1 > t0;
    const x = (p, i) => PAD_L + (W - PAD_L - PAD_R) * (byTime ? (p.t - t0) / (t1 - t0) : (n > 1 ? i / (n - 1) : 0.5));
    const y = (v) => PAD_T + (H - PAD_T - PAD_B) * (1 - (v - lo) / (hi - lo));
    this.svg.append(svg("rect", { class: "frame", x: PAD_L, y: PAD_T, width: W - PAD_L - PAD_R, height: H - PAD_T - PAD_B }));
    const label = (text, attrs) => { const t = svg("text", attrs); t.textContent = text; this.svg.append(t); };
    label(fmtNumber(hi), { x: PAD_L - 4, y: PAD_T + 8, "text-anchor": "end" });
    label(fmtNumber(lo), { x: PAD_L - 4, y: H - PAD_B, "text-anchor": "end" });
    label(new Date(t0).toLocaleTimeString(), { x: PAD_L, y: H - 4 });
    label(new Date(t1).toLocaleTimeString(), { x: W - PAD_R, y: H - 4, "text-anchor": "end" });
    this.series.forEach((field, s) => {
      const coords = [];
      let last;
      pts.forEach((p, i) => {
        const v = p.values.get(field);
        if (v === undefined) return;
        coords.push(x(p, i).toFixed(1) + "," + y(v).toFixed(1));
        last = v;
      });
      if (!coords.length) return;
      const color = COLORS[s % COLORS.length];
      const line = svg("polyline", { points: coords.join(" "), stroke: color });
      line.dataset.series = field;
      line.dataset.points = String(coords.length);
      line.dataset.last = String(last);
      // The newest reading as a dot: a lone reading shows too.
      const [cx, cy] = coords[coords.length - 1].split(",");
      this.svg.append(line, svg("circle", { cx, cy, r: 2.5, fill: color }));
      this.legend.append(el("span", { data: { series: field } },
        swatch(color),
        field + " ", el("span", { class: "last" }, fmtNumber(last))));
    });
  }

  close() {
    if (this.source) this.source.close();
    this.figure.remove();
  }
}

const charts = new Map();

// --- the periodic tables ---
function renderPeers(peers) {
  const body = document.querySelector("#peers tbody");
  const rows = peers.map((p) => {
    const tr = el("tr", { data: { address: String(p.address), state: String(p.state) } },
      el("td", { class: "mono" }, p.address),
      el("td", {}, p.direction),
      el("td", { class: "source" }, p.source || ""),
      el("td", { class: "state" }, p.state),
      el("td", {}, p.since || ""),
      el("td", { class: "mono" }, p.node ? String(p.node).slice(0, 12) : "–"),
      el("td", { class: "num" }, p.blocks_received),
      el("td", { class: "num" }, bytes(p.bytes_received)),
      el("td", { class: "num" }, p.blocks_sent),
      el("td", { class: "num" }, bytes(p.bytes_sent)),
      el("td", {}, p.last_error || ""));
    return tr;
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "11", class: "empty" }, "no peers")));
  body.replaceChildren(...rows);
}

function renderFeeds(feeds) {
  const body = document.querySelector("#feeds tbody");
  const rows = feeds.map((f) => el("tr", { data: { key: String(f.key) } },
    el("td", { class: "mono", title: String(f.key) }, String(f.key).slice(0, 16) + "…"),
    el("td", { class: "gateway" }, f.gateway ? String(f.gateway) : "–"),
    el("td", {}, f.local ? "yes" : ""),
    el("td", { class: "num" }, f.length)));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "4", class: "empty" }, "no feeds")));
  body.replaceChildren(...rows);
}

const MQTT_COLUMNS = ["clients", "received_messages_total", "appended_messages_total",
  "acked_total", "duplicates_total", "possible_duplicates_total", "refused_messages_total",
  "append_lag_ms", "announced_filters", "egress_published_total", "egress_dropped_total"];

function renderMqtt(mqtt) {
  const section = document.getElementById("mqtt");
  section.hidden = !mqtt;
  if (!mqtt) return;
  const row = el("tr", {}, ...MQTT_COLUMNS.map((c) => el("td", { class: "num" }, String(mqtt[c] ?? "–"))));
  document.querySelector("#mqtt-counters tbody").replaceChildren(row);
}

function renderTopics(topics) {
  const wanted = topics.slice(0, MAX_LIVE);
  for (const [topic, live] of charts) {
    if (!wanted.includes(topic)) { live.close(); charts.delete(topic); }
  }
  for (const topic of wanted) {
    if (!charts.has(topic)) charts.set(topic, new LiveTopic(topic));
    else if (!charts.get(topic).source) charts.get(topic).restart();
  }
  const note = topics.length > MAX_LIVE
    ? `${topics.length} topics; charting the first ${MAX_LIVE}: ` + topics.slice(MAX_LIVE).join(", ") + " not charted"
    : topics.length ? "" : "no topics yet";
  setText("topics-note", note);
}

let started = false;
async function poll() {
  try {
    const [health, peers, feeds, topics] = await Promise.all(
      ["/health", "/peers", "/feeds", "/topics"].map(api));
    setText("group", health.group || "–");
    setText("node", health.node || "–");
    setText("name", health.gateway ? "· " + health.gateway : "");
    if (!started && health.started_ms) {
      started = true;
      setText("started", new Date(health.started_ms).toLocaleString());
    }
    renderPeers(peers.peers || []);
    renderMqtt(health.mqtt);
    renderFeeds(feeds.feeds || []);
    renderTopics(topics.topics || []);
    setStatus("live", "live");
  } catch (e) {
    if (String(e.message) !== "unauthorized") setStatus("offline", "node unreachable");
  }
}

takeTokenFromFragment();
setTokenCookie();
listenForToken();
poll();
setInterval(poll, POLL_MS);
setInterval(() => { for (const live of charts.values()) live.updateRate(); }, 1000);
