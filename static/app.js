// The chorus demo page: conversations, streaming answers, reconnect and
// resume. The wire protocol is described in docs/protocol.md.

import { Connection } from "./connection.js";
import { Answer, answerOf, userMessage } from "./messages.js";
import { h, copyText, errorSentence, stateLabel } from "./render.js";
import { initPipeline } from "./pipeline.js";
import * as store from "./store.js";

const HISTORY_LIMIT = 200;
const $ = (selector) => document.querySelector(selector);

const ui = {
  messages: $("#messages"),
  composer: $("#composer"),
  form: $("#composer-form"),
  send: $("#send"),
  hint: $("#composer-hint"),
  list: $("#conversations"),
  noConversations: $("#no-conversations"),
  title: $("#conversation-title"),
  connection: $("#connection"),
  notice: $("#notice"),
  sidebarToggle: $("#toggle-sidebar"),
  scrim: $("#scrim"),
};

// Every answer since the page loaded. Requests are found by the chat's
// correlation id until `accepted`, then by request id.
const answers = [];
const byCorrelation = new Map();
const byRequest = new Map();

// What the main pane shows: a stored conversation, or a new one that gets
// its id from the server with the first `accepted` ("draft").
const view = { conversation: null, draft: 1, loaded: false };
let draftCounter = 1;

// Conversations with a `history` request on its way, in order: a `not_found`
// for history carries neither request nor id, so order is how we match it.
const historyWaiting = [];

const connection = new Connection({ onFrame, onOpen, onClose, onState: showConnectionState });

// ---------------------------------------------------------------------------
// Frames from the server

const handlers = {
  accepted(f) {
    const a = byCorrelation.get(f.id);
    if (!a) return;
    byCorrelation.delete(f.id);
    a.setRequest(f.request);
    byRequest.set(f.request, a);
    a.conversation = f.conversation;
    store.touchConversation(f.conversation, titleFrom(a.question));
    store.rememberRunning(f.request, f.conversation, a.question);
    // The first answer of a new conversation names it.
    if (view.conversation === null && a.draft === view.draft) {
      view.conversation = f.conversation;
      view.loaded = true;
      store.setCurrentConversation(f.conversation);
    }
    if (a.cancelRequested) connection.send({ type: "cancel", request: f.request });
    renderSidebar();
    refreshControls();
  },

  state(f) {
    byRequest.get(f.request)?.setState(f.state, stateLabel(f.state, f.position));
  },

  start(f) {
    const a = byRequest.get(f.request);
    if (!a) return;
    a.setRole(f.role);
    if (a.resuming) a.note("resuming…");
  },

  token(f) {
    const a = byRequest.get(f.request);
    if (!a || a.terminal) return;
    if (a.resuming) {
      a.resuming = false;
      a.note(stateLabel(a.state));
    }
    const result = a.addToken(f.seq, f.text);
    if (result === "ok") scheduleRender(a);
    else if (result === "gap" && !a.resyncing) {
      // Should not happen (seq has no gaps), but if it does, ask again
      // from the first missing token instead of showing a hole.
      a.resyncing = true;
      connection.send({ type: "resume", request: a.request, from: a.nextSeq });
    }
  },

  tool(f) {
    byRequest.get(f.request)?.tool(f.name, f.phase, f.text);
  },

  done(f) {
    const a = byRequest.get(f.request);
    if (!a || a.terminal) return;
    a.resuming = false;
    a.finish(f);
    ended(a);
  },

  error(f) {
    const a = (f.request && byRequest.get(f.request)) || (f.id && byCorrelation.get(f.id));
    if (!a) {
      if (f.code === "not_found" && !f.request && historyWaiting.length) {
        historyNotFound(historyWaiting.shift());
      } else {
        showNotice(`${f.code}: ${errorSentence(f.code)}`);
      }
      return;
    }
    if (a.terminal) return;
    if (f.code === "slow_consumer") {
      // The request goes on; this page only fell behind. Pick it up again.
      connection.send({ type: "resume", request: a.request, from: a.nextSeq });
      return;
    }
    if (f.code === "not_found" && a.request) {
      if (a.restored && a.nextSeq === 0) return forget(a); // nothing of it was ever shown
      a.interrupt("Interrupted: the connection dropped and the server no longer has this answer.", "not_found");
    } else {
      a.fail(f.code, f.message, f.code === "cancelled" ? "cancelled" : "error");
    }
    ended(a);
  },

  history(f) {
    const i = historyWaiting.indexOf(f.conversation);
    if (i >= 0) historyWaiting.splice(i, 1);
    if (f.conversation === view.conversation) showHistory(f.conversation, f.messages || []);
  },
};

function onFrame(frame) {
  handlers[frame.type]?.(frame);
}

/** An answer has ended: release its conversation and forget its request id. */
function ended(a) {
  flushRender(a);
  if (a.request) store.forgetRunning(a.request);
  if (a.role) store.rememberAnswerMeta(a.conversation, a.text, a.meta());
  byCorrelation.delete(a.id);
  refreshControls();
}

function forget(a) {
  a.root.remove();
  answers.splice(answers.indexOf(a), 1);
  byRequest.delete(a.request);
  store.forgetRunning(a.request);
  refreshControls();
}

// ---------------------------------------------------------------------------
// Connection life

function onOpen() {
  // Resume everything still running, from the next token we need. Requests
  // that ended meanwhile are replayed with their `done` (within the
  // server's replay window). This goes before `history`, so a replayed
  // answer is complete by the time the history arrives.
  for (const a of answers) {
    if (a.terminal || !a.request) continue;
    a.resuming = true;
    a.note("resuming…");
    connection.send({ type: "resume", request: a.request, from: a.nextSeq });
    if (a.cancelRequested) connection.send({ type: "cancel", request: a.request });
  }
  if (view.conversation && !view.loaded) requestHistory(view.conversation);
  refreshControls();
}

function onClose() {
  historyWaiting.length = 0;
  for (const a of answers) {
    if (a.terminal) continue;
    if (!a.request) {
      // Lost before `accepted`: we never learnt its id, so it cannot be resumed.
      a.interrupt("Interrupted: the connection dropped before the server confirmed this question.");
      ended(a);
    } else {
      a.note("connection lost · will resume");
    }
  }
  refreshControls();
}

const CONNECTION_LABELS = { connecting: "Connecting…", open: "Connected", reconnecting: "Reconnecting…" };

function showConnectionState(state) {
  ui.connection.dataset.state = state;
  ui.connection.querySelector(".connection-label").textContent = CONNECTION_LABELS[state];
  refreshControls();
}

// ---------------------------------------------------------------------------
// Sending

function sendChat(message, { conversation = view.conversation, fresh = false } = {}) {
  const a = new Answer({ conversation, question: message, draft: conversation ? null : view.draft });
  answers.push(a);
  byCorrelation.set(a.id, a);
  hideEmptyState();
  ui.messages.append(userMessage(message), a.root);
  scrollToBottom();
  const frame = { type: "chat", id: a.id, message };
  if (conversation) frame.conversation = conversation;
  if (fresh) frame.options = { fresh: true };
  if (!connection.send(frame)) {
    a.interrupt("Not sent: there is no connection to the server.");
    ended(a);
  }
  refreshControls();
}

function submitComposer() {
  const text = ui.composer.value;
  if (!text.trim() || !canSend()) return;
  ui.composer.value = "";
  autoGrow();
  sendChat(text);
}

/** A conversation has at most one request in flight (else `conversation_busy`). */
function busy(conversation, draft = null) {
  return answers.some((a) => !a.terminal &&
    (conversation ? a.conversation === conversation : a.draft === draft && a.conversation === null));
}

function canSend() {
  return connection.isOpen && !busy(view.conversation, view.draft);
}

/** Enables what can be used now; called whenever a request or the connection changes. */
function refreshControls() {
  const open = connection.isOpen;
  const isBusy = busy(view.conversation, view.draft);
  ui.send.disabled = !open || isBusy || !ui.composer.value.trim();
  ui.hint.textContent = !open ? "Not connected · your message will wait here"
    : isBusy ? "Answering… press Stop to end it early"
    : "Enter to send · Shift+Enter for a new line";
  for (const el of ui.messages.querySelectorAll(".msg.assistant")) {
    const a = answerOf.get(el);
    if (!a) continue;
    a.regenBtn.disabled = !open || !a.conversation || !a.question || busy(a.conversation);
  }
}

// ---------------------------------------------------------------------------
// Rendering tokens: at most once per frame, from the accumulated text.

const dirty = new Set();
let renderFrame = 0;

function scheduleRender(a) {
  dirty.add(a);
  if (!renderFrame) renderFrame = requestAnimationFrame(flushRenders);
}

function flushRenders() {
  renderFrame = 0;
  const stick = nearBottom();
  for (const a of dirty) a.render();
  dirty.clear();
  if (stick) scrollToBottom();
}

function flushRender(a) {
  dirty.delete(a);
  const stick = nearBottom();
  a.render();
  if (stick) scrollToBottom();
}

function nearBottom() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 120;
}

function scrollToBottom() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

// ---------------------------------------------------------------------------
// Conversations

function titleFrom(text) {
  const line = text.trim().split("\n")[0];
  return line.length > 60 ? `${line.slice(0, 57)}…` : line;
}

function renderSidebar() {
  // The list is rebuilt; keep keyboard focus on the same item if it had it.
  const active = document.activeElement;
  const focused = ui.list.contains(active)
    ? { id: active.closest("li")?.dataset.conversation, forget: active.classList.contains("conv-forget") }
    : null;
  const items = store.conversations().map((c) => {
    const current = c.id === view.conversation;
    const li = h("li", { "data-conversation": c.id, "aria-current": current ? "true" : null },
      h("button", { type: "button", class: "conv-open", title: c.title, text: c.title }),
      h("button", { type: "button", class: "icon-btn conv-forget", "aria-label": `Remove “${c.title}” from this list`, title: "Remove from this list" },
        h("span", { "aria-hidden": "true", text: "×" })));
    return li;
  });
  ui.list.replaceChildren(...items);
  if (focused) {
    const li = items.find((item) => item.dataset.conversation === focused.id);
    const target = li?.querySelector(focused.forget ? ".conv-forget" : ".conv-open");
    (target ?? ui.list.querySelector("button") ?? $("#new-conversation")).focus();
  }
  ui.noConversations.hidden = items.length > 0;
  ui.title.textContent = view.conversation ? store.conversationTitle(view.conversation) : "New conversation";
}

function openConversation(id) {
  const same = id === view.conversation;
  view.conversation = id;
  view.loaded = false;
  store.setCurrentConversation(id);
  if (!same) {
    ui.messages.replaceChildren(h("p", { class: "loading muted", text: "Loading the conversation…" }));
  }
  renderSidebar();
  requestHistory(id);
  refreshControls();
  closeSidebar();
}

function newConversation() {
  view.conversation = null;
  view.draft = ++draftCounter;
  view.loaded = true;
  store.setCurrentConversation(null);
  showEmptyState();
  renderSidebar();
  refreshControls();
  closeSidebar();
  ui.composer.focus();
}

function requestHistory(id) {
  if (connection.send({ type: "history", conversation: id, limit: HISTORY_LIMIT })) {
    historyWaiting.push(id);
  }
}

/**
 * Rebuilds the view from stored messages. Answers seen since the page loaded are
 * reused when their text matches, so their role, timings and tools stay;
 * a running answer is not stored yet and goes at the end with its question.
 */
function showHistory(conversation, messages) {
  view.loaded = true;
  const mine = answers.filter((a) => a.conversation === conversation);
  // Answers rebuilt from an earlier history load are replaced now.
  for (const a of mine.filter((a) => a.fromHistory)) answers.splice(answers.indexOf(a), 1);
  const finished = mine.filter((a) => !a.fromHistory && a.terminal);
  const running = mine.filter((a) => !a.terminal);
  const list = messages.slice();
  const lastMsg = list[list.length - 1];
  // A running request's question is already stored: show it with its answer.
  if (running.length && lastMsg?.role === "user" && lastMsg.content === running[0].question.trim()) list.pop();

  const nodes = [];
  let question = "";
  for (const m of list) {
    if (m.role === "user") {
      question = m.content;
      nodes.push(userMessage(m.content));
      continue;
    }
    const i = finished.findIndex((a) => a.text === m.content);
    let a = i >= 0 ? finished.splice(i, 1)[0] : null;
    if (!a) {
      a = Answer.fromHistory(conversation, question, m.content);
      a.applyMeta(store.answerMeta(conversation, m.content));
      answers.push(a);
    }
    nodes.push(a.root);
  }
  for (const a of running) nodes.push(userMessage(a.question), a.root);
  if (nodes.length) ui.messages.replaceChildren(...nodes);
  else showEmptyState();
  scrollToBottom();
  renderSidebar();
  refreshControls();
}

function historyNotFound(conversation) {
  if (conversation !== view.conversation) return;
  // A brand-new conversation may not be committed yet; its answer is running.
  const running = answers.filter((a) => a.conversation === conversation && !a.terminal);
  if (running.length) return showHistory(conversation, []);
  view.loaded = true;
  ui.messages.replaceChildren(h("div", { class: "error standalone", "data-code": "not_found" },
    h("code", { class: "error-code", text: "not_found" }),
    " This conversation is not stored on this server (its database may have been reset)."));
}

// ---------------------------------------------------------------------------
// Empty state and notices

const SUGGESTIONS = [
  "Explain how chorus shares one generation between clients",
  "Calculate (2 + 3) * 4",
  "What time is it?",
  "Search my history for pizza",
];

function showEmptyState() {
  const chips = SUGGESTIONS.map((s) => h("button", {
    type: "button", class: "chip", text: s,
    onclick: () => { ui.composer.value = s; autoGrow(); refreshControls(); ui.composer.focus(); },
  }));
  ui.messages.replaceChildren(h("div", { class: "empty-state" },
    h("h2", { text: "Ask something" }),
    h("p", { class: "muted", text: "Answers stream in token by token. Ask the same thing from two tabs at once and both share one generation; ask it again later and it comes from the cache." }),
    h("div", { class: "chips" }, ...chips)));
}

function hideEmptyState() {
  ui.messages.querySelector(".empty-state, .loading, .error.standalone")?.remove();
}

let noticeTimer = 0;
function showNotice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { ui.notice.hidden = true; }, 6000);
}

// ---------------------------------------------------------------------------
// Layout: the sidebar is a drawer on narrow screens.

const narrow = window.matchMedia("(max-width: 860px)");

function openSidebar() {
  document.body.classList.add("sidebar-open");
  ui.scrim.hidden = false;
  ui.sidebarToggle.setAttribute("aria-expanded", "true");
  $("#new-conversation").focus();
}

function closeSidebar() {
  if (!document.body.classList.contains("sidebar-open")) return;
  document.body.classList.remove("sidebar-open");
  ui.scrim.hidden = true;
  ui.sidebarToggle.setAttribute("aria-expanded", "false");
  if (narrow.matches) ui.sidebarToggle.focus();
}

function autoGrow() {
  ui.composer.style.height = "auto";
  ui.composer.style.height = `${Math.min(ui.composer.scrollHeight, 200)}px`;
}

// ---------------------------------------------------------------------------
// Wiring

function wire(pipeline) {
  ui.form.addEventListener("submit", (e) => {
    e.preventDefault();
    submitComposer();
  });
  ui.composer.addEventListener("keydown", (e) => {
    // Enter sends, Shift+Enter is a newline; never send while an IME composes.
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submitComposer();
    }
  });
  ui.composer.addEventListener("input", () => {
    autoGrow();
    refreshControls();
  });

  $("#new-conversation").addEventListener("click", newConversation);
  ui.list.addEventListener("click", (e) => {
    const li = e.target.closest("li[data-conversation]");
    if (!li) return;
    const id = li.dataset.conversation;
    if (e.target.closest(".conv-forget")) {
      store.forgetConversation(id);
      if (id === view.conversation) newConversation();
      else renderSidebar();
    } else {
      openConversation(id);
    }
  });

  // One listener for the buttons of every answer, present and future.
  ui.messages.addEventListener("click", (e) => {
    const button = e.target.closest("button");
    const a = button && answerOf.get(button.closest(".msg.assistant"));
    if (!a) return;
    if (button === a.stopBtn) stop(a);
    else if (button === a.regenBtn) regenerate(a);
    else if (button === a.copyBtn) copyText(a.text, a.copyBtn);
  });

  ui.sidebarToggle.addEventListener("click", () =>
    document.body.classList.contains("sidebar-open") ? closeSidebar() : openSidebar());
  $("#close-sidebar").addEventListener("click", closeSidebar);
  ui.scrim.addEventListener("click", closeSidebar);
  narrow.addEventListener("change", () => { if (!narrow.matches) closeSidebar(); });

  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape") return;
    if (document.body.classList.contains("sidebar-open")) closeSidebar();
    else if (pipeline.isOpen() && (narrow.matches || $("#pipeline").contains(document.activeElement))) pipeline.close();
  });
}

function stop(a) {
  if (a.terminal) return;
  a.cancelRequested = true;
  a.stopBtn.disabled = true;
  a.note("stopping…");
  // Without a request id yet, `accepted` sends the cancel; while offline,
  // the reconnect does, right after resuming.
  if (a.request) connection.send({ type: "cancel", request: a.request });
}

function regenerate(a) {
  if (!a.conversation || busy(a.conversation)) return;
  if (a.conversation !== view.conversation) return;
  sendChat(a.question, { conversation: a.conversation, fresh: true });
}

/** Recreates answers that were running when the page was last closed. */
function restoreRunning() {
  for (const [request, r] of Object.entries(store.runningRequests())) {
    const a = new Answer({ conversation: r.conversation, question: r.question });
    a.restored = true;
    a.setRequest(request);
    a.note("resuming…");
    answers.push(a);
    byRequest.set(request, a);
  }
}

/** The question for the crowd: the composer's text, else the last one asked here. */
function crowdQuestion() {
  if (ui.composer.value.trim()) return ui.composer.value;
  const users = ui.messages.querySelectorAll(".msg.user .msg-text");
  return users.length ? users[users.length - 1].textContent : "";
}

function boot() {
  const pipeline = initPipeline({ question: crowdQuestion });
  wire(pipeline);
  restoreRunning();
  const current = store.currentConversation();
  if (current && store.conversations().some((c) => c.id === current)) {
    view.conversation = current;
    view.loaded = false;
    ui.messages.replaceChildren(h("p", { class: "loading muted", text: "Loading the conversation…" }));
  } else {
    showEmptyState();
    view.loaded = true;
  }
  renderSidebar();
  refreshControls();
  connection.start();

  window.chorusDebug = {
    dropConnection: () => connection.drop(),
    socket: () => connection.socket,
  };
}

boot();
