// DOM utilities and the safe renderer for answers.
//
// Rule of this file: text that came from a user or a model only ever reaches
// the page through textContent or text nodes. Nothing here assigns innerHTML,
// so markup in a message is shown literally, however it is split into tokens.

const SVG_NS = "http://www.w3.org/2000/svg";

/** Creates an element: h("button", {class: "x", "aria-label": "y"}, child, "text"). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "text") el.textContent = value;
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child !== null && child !== undefined && child !== false) {
      el.append(child); // append() turns strings into text nodes
    }
  }
  return el;
}

/** Creates an SVG element (attributes only, no children). */
export function svg(tag, attrs = {}) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, String(value));
  return el;
}

// Stroke icons on a 24×24 grid. They are decoration: buttons carry their
// own text or aria-label.
const ICONS = {
  stop: "M7 7h10v10H7z",
  regenerate: "M20 11a8 8 0 1 0-2.3 5.7M20 4v7h-7",
  copy: "M9 9h10v10H9zM5 15V5h10",
  check: "M5 12l5 5 9-10",
  close: "M6 6l12 12M18 6L6 18",
  tool: "M14.7 6.3a4 4 0 0 0-5.4 5.4L4 17l3 3 5.3-5.3a4 4 0 0 0 5.4-5.4l-2.5 2.5-2.5-.5-.5-2.5z",
};

/** An inline SVG icon by name, hidden from assistive technology. */
export function icon(name, size = 16) {
  const el = svg("svg", { viewBox: "0 0 24 24", width: size, height: size, "aria-hidden": "true", class: "icon" });
  el.append(svg("path", {
    d: ICONS[name], fill: "none", stroke: "currentColor", "stroke-width": 2,
    "stroke-linecap": "round", "stroke-linejoin": "round",
  }));
  return el;
}

// ---------------------------------------------------------------------------
// The answer renderer: fenced code blocks, inline `code` and **bold**.
//
// The container uses `white-space: pre-wrap`, so ordinary text is kept as it
// is, newlines included. That keeps the rendered textContent equal to the
// model's text outside code fences, which makes copy, search and tests
// behave. Everything is rebuilt from the accumulated text on each render, so
// a fence or a backtick split across tokens is handled once it is complete.

const FENCE = /^\s*```\s*([\w+#.-]*)\s*$/;

/** Splits text into blocks: {kind: "text", text} and {kind: "code", lang, text, open}. */
export function parseBlocks(text) {
  const blocks = [];
  let buffer = [];
  let code = null; // the open code block, if any
  const flushText = () => {
    if (buffer.length) blocks.push({ kind: "text", text: buffer.join("\n") });
    buffer = [];
  };
  for (const line of text.split("\n")) {
    const fence = line.match(FENCE);
    if (code) {
      if (fence && fence[1] === "") {
        code.open = false;
        blocks.push(code);
        code = null;
      } else {
        code.lines.push(line);
      }
    } else if (fence) {
      flushText();
      code = { kind: "code", lang: fence[1], lines: [], open: true };
    } else {
      buffer.push(line);
    }
  }
  flushText();
  // An unclosed fence while streaming is shown as code so far.
  if (code) blocks.push(code);
  for (const b of blocks) if (b.kind === "code") b.text = b.lines.join("\n");
  return blocks;
}

const INLINE = /(`[^`\n]+`)|(\*\*[^*\n]+?\*\*)/g;

/** Appends text with inline code and bold spans to `parent`, as DOM nodes. */
function appendInline(parent, text) {
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) parent.append(text.slice(last, m.index));
    if (m[1]) parent.append(h("code", { class: "inline-code", text: m[1].slice(1, -1) }));
    else parent.append(h("strong", { text: m[2].slice(2, -2) }));
    last = m.index + m[0].length;
  }
  if (last < text.length) parent.append(text.slice(last));
}

/** Replaces the content of `container` with the rendered `text`. */
export function renderRich(container, text) {
  const frag = document.createDocumentFragment();
  for (const block of parseBlocks(text)) {
    if (block.kind === "text") {
      appendInline(frag, block.text);
    } else {
      const code = h("code", { text: block.text });
      if (block.lang) code.className = `language-${block.lang}`;
      // The language label is drawn from data-lang by CSS, so it is not
      // part of the message's text.
      const wrap = h("div", { class: "codeblock", "data-lang": block.lang || null },
        h("pre", {}, code));
      if (!block.open) {
        const copy = h("button", { type: "button", class: "icon-btn codeblock-copy", "aria-label": "Copy code" }, icon("copy"));
        copy.addEventListener("click", () => copyText(block.text, copy));
        wrap.prepend(copy);
      }
      frag.append(wrap);
    }
  }
  container.replaceChildren(frag);
}

/** Renders plain text (user messages): no formatting at all. */
export function renderPlain(container, text) {
  container.textContent = text;
}

// ---------------------------------------------------------------------------
// Clipboard with a fallback for pages that are not a secure context.

export async function copyText(text, button) {
  let ok = false;
  try {
    if (navigator.clipboard && window.isSecureContext) {
      await navigator.clipboard.writeText(text);
      ok = true;
    }
  } catch {
    ok = false; // permission refused: try the old way below
  }
  if (!ok) {
    const area = h("textarea", { "aria-hidden": "true", readonly: true, class: "clipboard-proxy" });
    area.value = text;
    document.body.append(area);
    area.select();
    try { ok = document.execCommand("copy"); } catch { ok = false; }
    area.remove();
  }
  if (button) flash(button, ok ? "Copied" : "Copy failed");
  return ok;
}

const flashes = new WeakMap(); // button -> {timer, label, text}

/** Shows a short confirmation on a button: its visible text and its label change. */
function flash(button, message) {
  const span = button.querySelector("span");
  const saved = flashes.get(button) || { label: button.getAttribute("aria-label"), text: span?.textContent };
  clearTimeout(saved.timer);
  button.classList.add("flash");
  button.setAttribute("aria-label", message);
  if (span) span.textContent = message;
  saved.timer = setTimeout(() => {
    button.classList.remove("flash");
    if (saved.label) button.setAttribute("aria-label", saved.label);
    if (span) span.textContent = saved.text;
    flashes.delete(button);
  }, 1500);
  flashes.set(button, saved);
}

// ---------------------------------------------------------------------------
// Words for what the server says.

/** One readable sentence for every error code of the protocol. */
export const ERROR_SENTENCES = {
  bad_request: "The server could not understand this request.",
  too_large: "The message is too long for this server.",
  overloaded: "The server is overloaded right now. Try again in a moment.",
  rate_limited: "Too many questions from this connection in the last minute. Wait a little, then try again.",
  conversation_busy: "This conversation is still answering another question. Wait for it to finish, or stop it.",
  queue_timeout: "The request waited too long in a queue and was given up.",
  processing_timeout: "The model took too long to answer, so the request was stopped.",
  upstream_error: "The model provider failed to answer.",
  cancelled: "The request was cancelled before it started.",
  not_found: "The server no longer knows this request: it ended too long ago to be replayed.",
  slow_consumer: "This page fell behind the stream of tokens.",
  shutting_down: "The server is shutting down.",
  internal: "Something went wrong inside the server.",
};

export function errorSentence(code) {
  return ERROR_SENTENCES[code] || "The request failed.";
}

/** Text for a `state` frame: "queued · 3 ahead", "preparing", … */
export function stateLabel(state, position) {
  const ahead = Number.isInteger(position) && position > 0 ? ` · ${position} ahead` : "";
  switch (state) {
    case "queued": return `queued${ahead}`;
    case "preparing": return "preparing";
    case "waiting_stream": return `waiting for a stream slot${ahead}`;
    case "streaming": return "streaming";
    default: return state;
  }
}

export const ROLE_TITLES = {
  leader: "Leader: this request ran the model",
  follower: "Follower: shared an identical request's generation",
  cache: "Cache: answered from the cache, no model call",
};

/** Milliseconds for people: "0.4 ms", "12 ms", "1530 ms". */
export function ms(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (value < 10) return `${value.toFixed(1)} ms`;
  return `${Math.round(value)} ms`;
}

/** "1 follower", "3 followers". */
export function plural(n, word, many = `${word}s`) {
  return `${n} ${n === 1 ? word : many}`;
}
