// The pipeline view: a live picture of chorus's stages from /api/stats, and
// the Crowd control that asks one question from many connections at once.

import { socketUrl } from "./connection.js";
import { h, svg, ms, plural } from "./render.js";

const POLL_MS = 1000;
const CROWD_OPEN_TIMEOUT_MS = 10000;
const CROWD_ANSWER_TIMEOUT_MS = 120000;
// Where the view is open by default: the "wide" media query of style.css.
const WIDE = "(min-width: 1200px)";

// Where each stage sits in the picture (viewBox 340 × 372).
const BOX_W = 150;
const BOX_H = 64;
const STAGES = [
  // The intake is only a queue: the cache lane's workers drain it.
  { key: "intake", label: "Intake queue", x: 95, y: 4, queueOnly: true },
  { key: "cache", label: "Cache lane", x: 95, y: 100 },
  { key: "prepare", label: "Preparation pool", x: 4, y: 206 },
  { key: "follow", label: "Follower pool", x: 186, y: 206 },
  { key: "stream", label: "Streaming pool", x: 4, y: 304 },
];

const $ = (selector) => document.querySelector(selector);

/**
 * @param {object} options
 *   question()  the text the crowd should ask ("" when there is none)
 * @returns {{isOpen(): boolean, open(): void, close(): void}}
 */
export function initPipeline({ question }) {
  const panel = $("#pipeline");
  const toggle = $("#toggle-pipeline");
  const wide = window.matchMedia(WIDE);
  const diagram = buildDiagram($("#pipeline-diagram"));
  let timer = 0;
  let polling = false;

  // Open or closed is the rule style.css draws, so the page shows its final
  // layout from the first paint: the user's own choice if they toggled the
  // view (body[data-pipeline]), else open on wide screens and closed on
  // narrower ones. The choice wins over the default, also when the window
  // is resized across the breakpoint later, but only for the life of the
  // page: it is not stored, and a reload starts from the default again.
  const chosen = () => document.body.dataset.pipeline;
  const isOpen = () => (chosen() ? chosen() === "open" : wide.matches);
  const shouldPoll = () => isOpen() && document.visibilityState === "visible";

  // Polls only while someone can see the numbers: the panel is open and
  // the tab is visible. One loop at a time, rescheduled after each answer
  // so a slow server never gets overlapping requests.
  async function poll() {
    if (!shouldPoll()) {
      polling = false;
      return;
    }
    polling = true;
    const stats = await fetchStats();
    if (stats) {
      diagram.update(stats);
      updateNumbers(stats);
      $("#pipeline-updated").textContent = `live · ${stats.connections} connection${stats.connections === 1 ? "" : "s"}`;
    } else {
      $("#pipeline-updated").textContent = "stats unavailable";
    }
    if (shouldPoll()) timer = setTimeout(poll, POLL_MS);
    else polling = false;
  }

  function startPolling() {
    if (!polling && shouldPoll()) poll();
  }

  function stopPolling() {
    clearTimeout(timer);
    polling = false;
  }

  /** Brings the toggle and the polling in line with what is shown. */
  function sync() {
    toggle.setAttribute("aria-expanded", String(isOpen()));
    if (isOpen()) startPolling();
    else stopPolling();
  }

  function open() {
    document.body.dataset.pipeline = "open";
    sync();
    // On a phone the panel covers the page, so focus moves into it.
    if (window.matchMedia("(max-width: 860px)").matches) $("#close-pipeline").focus();
  }

  function close() {
    const hadFocus = panel.contains(document.activeElement);
    document.body.dataset.pipeline = "closed";
    sync();
    if (hadFocus) toggle.focus();
  }

  toggle.addEventListener("click", () => (isOpen() ? close() : open()));
  $("#close-pipeline").addEventListener("click", close);
  // Without a choice, crossing the breakpoint opens or closes the view.
  wide.addEventListener("change", () => {
    if (chosen()) return;
    if (!isOpen() && panel.contains(document.activeElement)) toggle.focus();
    sync();
  });
  document.addEventListener("visibilitychange", () =>
    (document.visibilityState === "visible" ? startPolling() : stopPolling()));

  const crowd = new Crowd(question);
  $("#crowd-go").addEventListener("click", () => crowd.run());

  sync();
  return { isOpen, open, close };
}

async function fetchStats() {
  try {
    const response = await fetch("/api/stats", { cache: "no-store" });
    return response.ok ? await response.json() : null;
  } catch {
    return null; // offline or server restarting: the next poll tries again
  }
}

function percent(part, whole) {
  return whole > 0 ? `${Math.round((100 * part) / whole)} %` : "–";
}

function updateNumbers(s) {
  const hits = s.cache?.hits ?? 0;
  const misses = s.cache?.misses ?? 0;
  const r = s.requests ?? {};
  const leaders = r.leader ?? 0;
  const followers = r.follower ?? 0;
  $("#stat-hit-ratio").textContent = `${percent(hits, hits + misses)}`;
  $("#stat-hit-ratio").title = `${hits} hits, ${misses} misses`;
  $("#stat-dedup-ratio").textContent = `${percent(followers, leaders + followers)}`;
  $("#stat-dedup-ratio").title = `${followers} followers of ${leaders + followers} generated requests`;
  const up = s.upstream ?? {};
  $("#stat-upstream").textContent = `${up.calls ?? 0}`;
  $("#stat-upstream").title = `${up.in_flight ?? 0} in flight, ${up.aborted ?? 0} aborted, ${up.failures ?? 0} failed`;
  $("#stat-in-flight").textContent = `${r.in_flight ?? 0}`;
  $("#stat-roles").textContent = [
    plural(leaders, "leader"), plural(followers, "follower"),
    `${r.cache ?? 0} from cache`, `${r.failed ?? 0} failed`,
  ].join(" · ");
  const ttft = s.ttft_ms ?? {};
  $("#stat-ttft").textContent = ttft.recent?.length
    ? `p50 ${ms(ttft.p50)} · p99 ${ms(ttft.p99)}`
    : "no samples yet";
  drawSparkline($("#ttft-sparkline"), ttft.recent ?? []);
}

/** The recent TTFT samples as a polyline, scaled to the largest one. */
function drawSparkline(el, values) {
  const line = el.querySelector("polyline");
  if (values.length < 2) {
    line.setAttribute("points", "");
    return;
  }
  const max = Math.max(...values) || 1;
  const step = 200 / (values.length - 1);
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(38 - (v / max) * 34).toFixed(1)}`);
  line.setAttribute("points", points.join(" "));
  el.setAttribute("aria-label", `Recent time to first token, ${values.length} samples, up to ${ms(max)}`);
}

// ---------------------------------------------------------------------------
// The picture

function text(x, y, content, cls) {
  const t = svg("text", { x, y, class: cls });
  t.textContent = content;
  return t;
}

function arrow(x1, y1, x2, y2, cls = "") {
  return svg("line", { x1, y1, x2, y2, class: `arrow ${cls}`, "marker-end": "url(#arrowhead)" });
}

/** Draws the static picture once and returns an update(stats) function for its live parts. */
function buildDiagram(container) {
  const root = svg("svg", { viewBox: "0 0 340 372", class: "pipeline-svg", role: "img" });
  const defs = svg("defs");
  const marker = svg("marker", { id: "arrowhead", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
  marker.append(svg("path", { d: "M0 0L10 5L0 10z", class: "arrowhead" }));
  defs.append(marker);
  root.append(defs);

  // Arrows first, so boxes sit on top of them.
  root.append(
    arrow(170, 68, 170, 98),
    arrow(130, 164, 84, 204),
    text(100, 181, "cache miss", "edge-label end"), text(100, 193, "→ leader", "edge-label end"),
    arrow(210, 164, 256, 204),
    text(242, 181, "same in flight", "edge-label"), text(242, 193, "→ follower", "edge-label"),
    arrow(245, 132, 268, 132), text(272, 128, "hit:", "edge-label"), text(272, 141, "answered", "edge-label"),
    arrow(79, 270, 79, 302),
    arrow(230, 270, 156, 314, "dashed"), text(200, 298, "joins stream", "edge-label"),
    arrow(154, 346, 192, 346),
  );
  const hits = text(272, 156, "", "edge-value");
  root.append(hits);

  const model = svg("g", { class: "model" });
  model.append(svg("rect", { x: 194, y: 322, width: 142, height: 46, rx: 23 }));
  model.append(text(265, 341, "model", "box-title centered"));
  const modelInfo = text(265, 357, "", "box-stat centered");
  model.append(modelInfo);
  root.append(model);

  const boxes = {};
  for (const stage of STAGES) {
    const { x, y } = stage;
    const g = svg("g", { class: "stage", "data-stage": stage.key });
    g.append(svg("rect", { x, y, width: BOX_W, height: BOX_H, rx: 10, class: "box" }));
    g.append(text(x + 10, y + 18, stage.label, "box-title"));
    const stat = text(x + 10, y + 34, "", "box-stat");
    const queueText = text(x + BOX_W - 10, y + 34, "", "box-stat end");
    g.append(stat, queueText);
    let busy = null;
    if (!stage.queueOnly) {
      g.append(svg("rect", { x: x + 10, y: y + 40, width: BOX_W - 20, height: 7, rx: 3.5, class: "bar-track" }));
      busy = svg("rect", { x: x + 10, y: y + 40, width: 0, height: 7, rx: 3.5, class: "bar-busy" });
      g.append(busy);
    }
    g.append(svg("rect", { x: x + 10, y: y + 52, width: BOX_W - 20, height: 4, rx: 2, class: "bar-track" }));
    const queue = svg("rect", { x: x + 10, y: y + 52, width: 0, height: 4, rx: 2, class: "bar-queue" });
    g.append(queue);
    root.append(g);
    boxes[stage.key] = { g, stat, queueText, busy, queue };
  }
  container.replaceChildren(root);

  function update(stats) {
    const summary = [];
    for (const stage of STAGES) {
      const s = stats.stages?.[stage.key];
      const box = boxes[stage.key];
      if (!s) continue;
      const barWidth = BOX_W - 20;
      const occupancy = s.workers > 0 ? s.busy / s.workers : 0;
      // Any queue at all gets a visible sliver: one waiting request matters.
      const depth = s.capacity > 0 ? s.queue / s.capacity : 0;
      box.busy?.setAttribute("width", (barWidth * Math.min(1, occupancy)).toFixed(1));
      box.queue.setAttribute("width", (s.queue > 0 ? Math.max(3, barWidth * Math.min(1, depth)) : 0).toFixed(1));
      box.stat.textContent = s.workers > 0 ? `${s.busy}/${s.workers} busy` : "";
      box.queueText.textContent = `queue ${s.queue}/${s.capacity}`;
      box.g.classList.toggle("active", s.busy > 0 || s.queue > 0);
      summary.push(`${stage.label}: ${s.workers > 0 ? `${s.busy} of ${s.workers} busy, ` : ""}${s.queue} of ${s.capacity} queued`);
    }
    hits.textContent = plural(stats.cache?.hits ?? 0, "hit");
    modelInfo.textContent = `${stats.upstream?.in_flight ?? 0} in flight`;
    model.classList.toggle("active", (stats.upstream?.in_flight ?? 0) > 0);
    root.setAttribute("aria-label", `Pipeline. ${summary.join(". ")}.`);
  }
  return { update };
}

// ---------------------------------------------------------------------------
// The crowd: N new connections ask the same question at once, each in a new
// conversation, so singleflight makes one leader and N-1 followers.

class Crowd {
  constructor(question) {
    this.question = question;
    this.input = $("#crowd-n");
    this.button = $("#crowd-go");
    this.result = $("#crowd-result");
    this.dots = $("#crowd-dots");
  }

  size() {
    const n = Math.round(Number(this.input.value));
    const clamped = Number.isFinite(n) && n >= 1 ? Math.min(100, n) : 10;
    this.input.value = String(clamped);
    return clamped;
  }

  async run() {
    const message = this.question().trim();
    if (!message) {
      this.result.textContent = "Type a question in the message box first.";
      return;
    }
    const n = this.size();
    this.button.disabled = true;
    // Progress texts avoid the role words: the summary is what names them.
    this.result.textContent = `Opening ${n} connections…`;
    this.dots.replaceChildren(...Array.from({ length: n }, () => h("span", { class: "dot" })));
    const members = [];
    try {
      const before = await fetchStats();
      const sockets = await Promise.all(Array.from({ length: n }, () => openSocket()));
      this.result.textContent = `Asking ${n} at once…`;
      sockets.forEach((ws, i) => members.push(this.ask(ws, i, message)));
      await Promise.all(members.map((m) => m.ended));
      const after = await fetchStats();
      this.result.textContent = summarize(n, members, before, after);
    } finally {
      for (const m of members) m.ws?.close();
      this.button.disabled = false;
    }
  }

  /** Sends the chat on one socket and follows its request to the end. */
  ask(ws, i, message) {
    const member = { ws, role: null, error: null, ended: null };
    const dot = this.dots.children[i];
    const mark = (cls) => { dot.className = `dot ${cls}`; };
    member.ended = new Promise((resolve) => {
      if (!ws) {
        member.error = "no connection";
        mark("failed");
        return resolve();
      }
      const timeout = setTimeout(() => { member.error ??= "timeout"; mark("failed"); resolve(); }, CROWD_ANSWER_TIMEOUT_MS);
      const finish = () => { clearTimeout(timeout); resolve(); };
      ws.onmessage = (event) => {
        let f;
        try { f = JSON.parse(event.data); } catch { return; }
        if (f.type === "start" || f.type === "done") {
          member.role = f.role;
          mark(f.role);
        }
        if (f.type === "done") finish();
        if (f.type === "error") {
          member.error = f.code;
          mark("failed");
          finish();
        }
      };
      ws.onclose = () => {
        if (!member.role) member.error ??= "closed";
        finish();
      };
      ws.send(JSON.stringify({ type: "chat", id: `crowd-${i}`, message }));
    });
    return member;
  }
}

/** Opens one WebSocket; resolves with it, or null if it does not open in time. */
function openSocket() {
  return new Promise((resolve) => {
    let ws;
    try {
      ws = new WebSocket(socketUrl());
    } catch {
      return resolve(null);
    }
    const timeout = setTimeout(() => { ws.close(); resolve(null); }, CROWD_OPEN_TIMEOUT_MS);
    ws.onopen = () => { clearTimeout(timeout); resolve(ws); };
    ws.onerror = () => { clearTimeout(timeout); resolve(null); };
  });
}

/** "10 asked · 1 leader · 9 followers · 1 upstream call". */
function summarize(n, members, before, after) {
  const count = (role) => members.filter((m) => m.role === role && !m.error).length;
  const parts = [`${n} asked`, plural(count("leader"), "leader"), plural(count("follower"), "follower")];
  const cached = count("cache");
  if (cached) parts.push(`${cached} from cache`);
  const failed = members.filter((m) => m.error).length;
  if (failed) parts.push(`${failed} failed`);
  if (before && after) {
    parts.push(plural(after.upstream.calls - before.upstream.calls, "upstream call"));
  } else {
    parts.push("upstream calls unknown");
  }
  return parts.join(" · ");
}
