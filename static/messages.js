// Message views: a user message, and an Answer, which owns one answer
// element (class `msg assistant`) and everything the server told about its request.

import { h, icon, renderRich, renderPlain, errorSentence, stateLabel, ms, ROLE_TITLES } from "./render.js";

const TERMINAL = new Set(["done", "error", "cancelled", "interrupted"]);

/** A user message bubble; its text is shown exactly as typed. */
export function userMessage(text) {
  const body = h("div", { class: "msg-text" });
  renderPlain(body, text);
  return h("div", { class: "msg user" }, h("div", { class: "bubble" }, body));
}

/** Which Answer an element belongs to (for the delegated button clicks). */
export const answerOf = new WeakMap();

let nextCorrelation = 1;

export class Answer {
  /**
   * @param {object} init
   *   conversation  conversation id, or null until `accepted` names it
   *   question      the user message this answers (for Regenerate)
   *   draft         the "new conversation" view it was sent from, if any
   */
  constructor({ conversation = null, question = "", draft = null } = {}) {
    this.id = `m${nextCorrelation++}-${Math.random().toString(36).slice(2, 8)}`;
    this.request = null;
    this.conversation = conversation;
    this.question = question;
    this.draft = draft;
    this.text = "";
    this.nextSeq = 0; // the next token seq wanted; also the `from` of a resume
    this.role = null;
    this.state = "queued";
    this.fromHistory = false;
    this.restored = false; // recreated after a page reload, to be resumed
    this.cancelRequested = false;
    this.resyncing = false;
    this.tools = []; // {name, el, parts, done}
    this.build();
  }

  /** An answer read back from history: finished, with no request behind it. */
  static fromHistory(conversation, question, text) {
    const a = new Answer({ conversation, question });
    a.fromHistory = true;
    a.text = text;
    a.render();
    a.setState("done", "");
    return a;
  }

  get terminal() {
    return TERMINAL.has(this.state);
  }

  build() {
    this.badge = h("span", { class: "badge-role", hidden: true });
    this.status = h("span", { class: "msg-status", text: "sending…" });
    this.timings = h("span", { class: "timings", hidden: true });
    this.toolList = h("div", { class: "tools" });
    this.body = h("div", { class: "msg-text" });
    this.errorBox = h("div", { class: "error", role: "note", hidden: true });
    this.stopBtn = h("button", { type: "button", class: "btn btn-small btn-stop", "aria-label": "Stop this answer" },
      icon("stop", 14), h("span", { text: "Stop" }));
    this.regenBtn = h("button", { type: "button", class: "btn btn-small btn-regenerate", "aria-label": "Regenerate this answer", hidden: true },
      icon("regenerate", 14), h("span", { text: "Regenerate" }));
    this.copyBtn = h("button", { type: "button", class: "btn btn-small btn-copy", "aria-label": "Copy this answer" },
      icon("copy", 14), h("span", { text: "Copy" }));
    this.root = h("article", { class: "msg assistant", "data-state": this.state, "aria-label": "Answer" },
      h("div", { class: "bubble" },
        h("div", { class: "msg-meta" }, this.badge, this.status, this.timings),
        this.toolList,
        this.body,
        this.errorBox,
        h("div", { class: "msg-actions" }, this.stopBtn, this.regenBtn, this.copyBtn)));
    // Screen readers wait for the whole answer instead of every token.
    this.body.setAttribute("aria-busy", "true");
    answerOf.set(this.root, this);
  }

  setRequest(id) {
    this.request = id;
    this.root.dataset.request = id;
  }

  /** Moves to a pipeline stage or an end state; `label` is what the user sees. */
  setState(state, label) {
    // Repeated or late stage frames must not move an ended answer, nor an
    // answer whose tokens are already flowing back to a waiting stage.
    if (this.terminal) return;
    if (this.state === "streaming" && !TERMINAL.has(state) && state !== "streaming") return;
    this.state = state;
    this.root.dataset.state = state;
    this.status.textContent = label ?? stateLabel(state);
    this.status.hidden = !this.status.textContent;
    if (this.terminal) {
      this.stopBtn.hidden = true;
      this.regenBtn.hidden = false;
      this.body.removeAttribute("aria-busy");
    }
  }

  /** Shows a note in the status line without changing the state. */
  note(label) {
    if (!this.terminal) this.status.textContent = label;
  }

  setRole(role) {
    if (!role) return;
    this.role = role;
    this.badge.textContent = role;
    this.badge.dataset.role = role;
    this.badge.title = ROLE_TITLES[role] || role;
    this.badge.hidden = false;
  }

  /**
   * Takes a token frame. Returns "ok", "duplicate" (seq already shown, e.g.
   * replayed after a resume) or "gap" (a seq is missing; the caller resumes).
   */
  addToken(seq, text) {
    if (seq < this.nextSeq) return "duplicate";
    if (seq > this.nextSeq) return "gap";
    this.text += text;
    this.nextSeq += 1;
    this.resyncing = false;
    if (this.state !== "streaming") this.setState("streaming");
    return "ok";
  }

  render() {
    renderRich(this.body, this.text);
    this.root.classList.toggle("empty", this.text.length === 0);
  }

  /**
   * A `tool` frame. Frames carry no call id; calls are announced in order
   * and each one's output and result follow, so output and result go to the
   * oldest unfinished call of that tool.
   */
  tool(name, phase, text) {
    let entry = phase === "call" ? null : this.tools.find((t) => t.name === name && !t.done);
    if (!entry) entry = this.addTool(name);
    if (phase === "call") {
      entry.args.textContent = prettyJson(text);
      entry.phase.textContent = "call";
    } else if (phase === "output") {
      entry.output.textContent += text.endsWith("\n") ? text : `${text}\n`;
      entry.outputSection.hidden = false;
      entry.phase.textContent = "output";
    } else {
      entry.done = true;
      entry.result.textContent = text;
      entry.resultSection.hidden = false;
      const failed = text.startsWith("error:");
      entry.phase.textContent = failed ? "result · failed" : "result";
      entry.el.dataset.phase = failed ? "failed" : "result";
      return;
    }
    entry.el.dataset.phase = phase;
  }

  addTool(name) {
    const section = (title, pre) => h("div", { class: "tool-section" }, h("div", { class: "tool-label", text: title }), pre);
    const entry = {
      name,
      done: false,
      phase: h("span", { class: "tool-phase", text: "call" }),
      args: h("pre", { class: "tool-args" }),
      output: h("pre", { class: "tool-output" }),
      result: h("pre", { class: "tool-result" }),
    };
    entry.outputSection = section("Output", entry.output);
    entry.resultSection = section("Result", entry.result);
    entry.outputSection.hidden = true;
    entry.resultSection.hidden = true;
    entry.el = h("details", { class: "tool", "data-tool": name, "data-phase": "call" },
      h("summary", {}, icon("tool", 14), h("span", { class: "tool-name", text: name }), entry.phase),
      h("div", { class: "tool-body" }, section("Arguments", entry.args), entry.outputSection, entry.resultSection));
    this.tools.push(entry);
    this.toolList.append(entry.el);
    return entry;
  }

  /** The `done` frame. */
  finish(frame) {
    this.setRole(frame.role);
    this.render();
    const t = frame.timings || {};
    this.showTimings(
      `queue ${ms(t.queue_ms)} · prepare ${ms(t.prepare_ms)} · TTFT ${ms(t.ttft_ms)} · total ${ms(t.total_ms)}`,
      `${frame.tokens} tokens`);
    if (frame.finish === "cancelled") this.setState("cancelled", "stopped");
    else if (frame.finish === "length") this.setState("done", "cut off at the token limit");
    else this.setState("done", "");
  }

  showTimings(text, title = "") {
    this.timings.textContent = text;
    this.timings.title = title;
    this.timings.hidden = !text;
  }

  /** What to remember about this answer across reloads. */
  meta() {
    return { role: this.role, timings: this.timings.textContent, state: this.state };
  }

  /** Shows remembered metadata on an answer rebuilt from history. */
  applyMeta(meta) {
    if (!meta) return;
    this.setRole(meta.role);
    this.showTimings(meta.timings || "");
    if (meta.state === "cancelled") {
      this.state = "cancelled";
      this.root.dataset.state = "cancelled";
      this.status.textContent = "stopped";
      this.status.hidden = false;
    }
  }

  /** An ending `error` frame, or a local failure with a protocol code. */
  fail(code, serverMessage, state = "error") {
    this.render();
    this.errorBox.replaceChildren(
      h("code", { class: "error-code", text: code }),
      h("span", { text: ` ${errorSentence(code)}` }));
    if (serverMessage) this.errorBox.title = serverMessage;
    this.errorBox.dataset.code = code;
    this.errorBox.hidden = false;
    this.setState(state, state === "cancelled" ? "stopped" : state);
  }

  /** The answer can no longer be followed: the server lost it, or never confirmed it. */
  interrupt(reason, code = null) {
    this.render();
    const parts = [h("span", { text: reason })];
    if (code) parts.unshift(h("code", { class: "error-code", text: code }), " ");
    this.errorBox.replaceChildren(...parts);
    if (code) this.errorBox.dataset.code = code;
    this.errorBox.hidden = false;
    this.setState("interrupted", "interrupted");
  }
}

/** Tool arguments are JSON written by the model: indent them when they parse. */
function prettyJson(text) {
  try {
    const value = JSON.parse(text);
    return typeof value === "object" && value !== null && Object.keys(value).length === 0
      ? "(none)"
      : JSON.stringify(value, null, 2);
  } catch {
    return text;
  }
}
