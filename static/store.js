// What the page remembers in localStorage. The server has no accounts:
// knowing a conversation id is what lets this browser read it back, so the
// ids live here. Running request ids are kept too, so a reload can resume
// an answer that was still streaming.

const KEYS = {
  conversations: "chorus.conversations",
  current: "chorus.current",
  running: "chorus.running",
};
const MAX_CONVERSATIONS = 200;
// Past the server's default replay window a stored request cannot be resumed.
const RUNNING_MAX_AGE_MS = 10 * 60 * 1000;

function read(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw === null ? fallback : JSON.parse(raw);
  } catch {
    return fallback; // storage disabled or corrupt: start empty
  }
}

function write(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch {
    // Quota or privacy mode: the page still works, it just forgets on reload.
  }
}

/** Saved conversations, newest first: [{id, title, at}]. */
export function conversations() {
  const list = read(KEYS.conversations, []);
  return Array.isArray(list) ? list.filter((c) => c && typeof c.id === "string") : [];
}

/** Adds a conversation or moves it to the top; keeps an existing title. */
export function touchConversation(id, title) {
  const list = conversations();
  const old = list.find((c) => c.id === id);
  const entry = { id, title: old?.title || title || "Conversation", at: Date.now() };
  write(KEYS.conversations, [entry, ...list.filter((c) => c.id !== id)].slice(0, MAX_CONVERSATIONS));
}

export function forgetConversation(id) {
  write(KEYS.conversations, conversations().filter((c) => c.id !== id));
  if (currentConversation() === id) setCurrentConversation(null);
}

export function conversationTitle(id) {
  return conversations().find((c) => c.id === id)?.title || "Conversation";
}

export function currentConversation() {
  const id = read(KEYS.current, null);
  return typeof id === "string" ? id : null;
}

export function setCurrentConversation(id) {
  write(KEYS.current, id);
}

/** Requests that had not ended when last seen: {requestId: {conversation, question, at}}. */
export function runningRequests() {
  const all = read(KEYS.running, {});
  const fresh = {};
  for (const [id, r] of Object.entries(all && typeof all === "object" ? all : {})) {
    if (r && Date.now() - r.at < RUNNING_MAX_AGE_MS) fresh[id] = r;
  }
  return fresh;
}

export function rememberRunning(requestId, conversation, question) {
  write(KEYS.running, { ...runningRequests(), [requestId]: { conversation, question, at: Date.now() } });
}

export function forgetRunning(requestId) {
  const all = runningRequests();
  if (requestId in all) {
    delete all[requestId];
    write(KEYS.running, all);
  }
}

// What chorus did for each answer (role, timings) is not part of the stored
// history, so the page keeps it here, keyed by conversation and a hash of
// the answer's text, to show it again after a reload.
const META_KEY = "chorus.answers";
const MAX_META = 500;

function textHash(text) {
  // FNV-1a, 32 bits: small keys; a collision only mislabels a badge.
  let hash = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    hash ^= text.charCodeAt(i);
    hash = Math.imul(hash, 0x01000193);
  }
  return `${text.length}:${(hash >>> 0).toString(36)}`;
}

export function rememberAnswerMeta(conversation, text, meta) {
  if (!conversation || !text) return;
  const all = read(META_KEY, {});
  const key = `${conversation} ${textHash(text)}`;
  delete all[key]; // re-insert so the newest stay when trimming
  all[key] = meta;
  const keys = Object.keys(all);
  for (const old of keys.slice(0, Math.max(0, keys.length - MAX_META))) delete all[old];
  write(META_KEY, all);
}

export function answerMeta(conversation, text) {
  return read(META_KEY, {})[`${conversation} ${textHash(text)}`] || null;
}
