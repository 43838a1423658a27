// The page's WebSocket, reconnected with exponential backoff.
//
// The server sends no pings and keeps running requests alive for a grace
// period after a disconnect, so the job here is only to come back quickly
// and tell the page (onOpen) so it can resume what it was receiving.

const BACKOFF_START_MS = 250;
const BACKOFF_MAX_MS = 5000;

/** ws(s)://<this host>/ws, passing along a ?token= the page was opened with. */
export function socketUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const token = new URLSearchParams(location.search).get("token");
  const query = token ? `?token=${encodeURIComponent(token)}` : "";
  return `${scheme}//${location.host}/ws${query}`;
}

export class Connection {
  /**
   * @param {object} handlers
   *   onFrame(frame)        a parsed JSON frame from the server
   *   onOpen(isReconnect)   the socket is open (again)
   *   onClose()             the socket is gone; a reconnect is scheduled
   *   onState(state, info)  "connecting" | "open" | "reconnecting", info.retryInMs
   */
  constructor(handlers) {
    this.handlers = handlers;
    this.ws = null;
    this.attempt = 0;
    this.everOpened = false;
    this.timer = null;
  }

  get isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  get socket() {
    return this.ws;
  }

  start() {
    // Coming back online is a good moment to retry without waiting out the backoff.
    window.addEventListener("online", () => {
      if (!this.isOpen) this.retryNow();
    });
    this.connect();
  }

  connect() {
    clearTimeout(this.timer);
    this.timer = null;
    this.setState(this.everOpened ? "reconnecting" : "connecting");
    let ws;
    try {
      ws = new WebSocket(socketUrl());
    } catch {
      this.scheduleReconnect();
      return;
    }
    this.ws = ws;
    // Every handler checks that its socket is still the current one: a
    // socket we already gave up on must not feed frames into the page.
    ws.onopen = () => {
      if (ws !== this.ws) return;
      const isReconnect = this.everOpened;
      this.everOpened = true;
      this.attempt = 0;
      this.setState("open");
      this.handlers.onOpen?.(isReconnect);
    };
    ws.onmessage = (event) => {
      if (ws !== this.ws || typeof event.data !== "string") return;
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return; // the server only sends JSON; ignore anything else
      }
      if (frame && typeof frame === "object") this.handlers.onFrame(frame);
    };
    ws.onclose = () => {
      if (ws !== this.ws) return;
      this.ws = null;
      this.handlers.onClose?.();
      this.scheduleReconnect();
    };
    // An error is always followed by close, which does the work.
    ws.onerror = () => {};
  }

  /** Exponential backoff with jitter: half the delay fixed, half random. */
  scheduleReconnect() {
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_START_MS * 2 ** this.attempt);
    const delay = Math.round(base / 2 + Math.random() * (base / 2));
    this.attempt += 1;
    this.setState(this.everOpened ? "reconnecting" : "connecting", { retryInMs: delay });
    this.timer = setTimeout(() => this.connect(), delay);
  }

  retryNow() {
    if (this.ws && this.ws.readyState === WebSocket.CONNECTING) return;
    this.attempt = 0;
    this.connect();
  }

  /** Sends a frame; false when there is no open socket (the caller decides what then). */
  send(frame) {
    if (!this.isOpen) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /**
   * Drops the socket as if the network had gone: the page stops listening to
   * it at once (frames still in flight are lost, as on a real drop) and the
   * usual reconnect follows.
   */
  drop() {
    const ws = this.ws;
    if (!ws) return;
    this.ws = null;
    ws.close();
    this.handlers.onClose?.();
    this.scheduleReconnect();
  }

  setState(state, info = {}) {
    this.state = state;
    this.handlers.onState?.(state, info);
  }
}
