//! A stand-in for an OpenAI-compatible model server: a real HTTP/1.1 server
//! on loopback that answers each request with the next scripted [`Reply`]
//! and records what it received, so tests can drive chorus's upstream
//! client over real sockets (slow streams, broken streams, stalls and
//! clients that leave included) without a network or a model. [`Script`]
//! scripts streams with tool calls, whole or in pieces, well formed or not.
//!
//! How the server treats its connections is chosen when it starts
//! ([`Connections`]). By default every response carries `Connection:
//! close`, and event streams have no `Content-Length`: their body ends when
//! the socket closes, which any HTTP/1.1 client can read incrementally. The
//! other modes send event streams with `Transfer-Encoding: chunked`, one
//! event per chunk, and no `Connection: close`, so the client may keep the
//! connection: the server then really keeps it and serves the next request
//! on it ([`Connections::KeepAlive`]), or closes it once the response is
//! complete, as llama.cpp's `llama-server` does
//! ([`Connections::CloseAfterResponse`], [`Connections::CloseOnNextRequest`]).
//!
//! Each event goes out in a write of its own on a `TCP_NODELAY` socket, so
//! the client sees a token the moment it is "produced". One thread accepts,
//! one thread serves each connection; nothing here is async.
//!
//! The parts, by job:
//! - this file: what tests use ([`Upstream`], [`Reply`], [`Connections`],
//!   [`Recorded`]) and the state the test's thread shares with the server's
//!   threads;
//! - `script`: the [`Script`] and [`ScriptedCall`] builders of tool-call
//!   streams;
//! - `serve`: the accept loop and the loop of one connection;
//! - `respond`: a [`Reply`] written out as a response, and the waits a
//!   response makes;
//! - `wire`: HTTP/1.1 on the socket: reading a request, framing a response
//!   head.
//!
//! Threads: the test's own thread uses the [`Upstream`] handle (queueing
//! replies, reading what was recorded, waiting, dropping it); the accept
//! thread and every connection thread share the same state through it, under
//! one lock.

mod respond;
mod script;
mod serve;
mod wire;

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

// Not every test crate scripts tool calls; the ones that do import these
// from here.
#[allow(unused_imports)]
pub use script::{Script, ScriptedCall};

/// Granularity of every wait that must notice a client leaving or the
/// server stopping.
const POLL: Duration = Duration::from_millis(20);
/// How long a kept connection waits for the client's next request:
/// [`Connections::KeepAlive`] then closes it as idle,
/// [`Connections::CloseOnNextRequest`] closes it anyway.
pub const KEPT_WAIT: Duration = Duration::from_secs(30);

/// What the server does with a connection once a response is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Connections {
    /// Every response carries `Connection: close`; an event stream is the
    /// body up to the close (no length, no chunks). After the response the
    /// server shuts down its side and waits (bounded) for the client to
    /// close. One request per connection.
    #[default]
    Close,
    /// HTTP/1.1 keep-alive: no `Connection: close`, event streams chunked,
    /// and the next request on the connection is served like the first, for
    /// as long as the client keeps it (a request carrying `Connection:
    /// close` is the last). A stream cut short ([`Reply::ResetAfter`],
    /// [`Reply::StallAfter`]) still ends the connection.
    KeepAlive,
    /// As llama.cpp's `llama-server` answers a stream: chunked, no
    /// `Connection: close`, so the client keeps the connection, and the
    /// socket closed right after the last chunk. No second request is read.
    /// The close races with the client's next request: a client that checks
    /// a kept connection before it reuses it usually sees it closed.
    CloseAfterResponse,
    /// Like [`Connections::CloseAfterResponse`], but the close loses that
    /// race on purpose: the server waits until the client's next request
    /// starts arriving on the kept connection (or [`KEPT_WAIT`] passes, or
    /// the client closes), then closes the socket without reading or
    /// answering it. The client has already sent its request on a
    /// connection that looked alive, and gets an end of stream or a reset
    /// instead of an answer; only a new connection gets one.
    CloseOnNextRequest,
}

impl Connections {
    /// Whether responses say `Connection: close` and streams run to the
    /// close rather than being chunked.
    fn closes(self) -> bool {
        self == Connections::Close
    }
}

/// One scripted answer, used for the next request in FIFO order. When none
/// is queued, a request gets [`Reply::default_stream`].
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with `Content-Type: text/event-stream`: one `data: {json}\n\n`
    /// chunk per token in OpenAI's `chat.completion.chunk` format, `delay`
    /// before each chunk, then a chunk with an empty delta and
    /// `"finish_reason": finish`, then, if `usage` is
    /// `Some((prompt_tokens, completion_tokens))`, a chunk with
    /// `"choices":[]` and the usage, then `data: [DONE]\n\n`, then the end
    /// of the response (the close, or the last chunk; see [`Connections`]).
    Stream {
        tokens: Vec<String>,
        delay: Duration,
        finish: &'static str,
        usage: Option<(u64, u64)>,
    },
    /// `status` with body `{"error":{"message":MESSAGE,"type":"test_error"}}`
    /// (application/json), plus `Retry-After: N` when `retry_after` is
    /// `Some(N)` seconds.
    Error {
        status: u16,
        message: String,
        retry_after: Option<u64>,
    },
    /// 200 event stream: the tokens as in [`Reply::Stream`] (with `delay`),
    /// then the socket is dropped: no finish chunk, no `[DONE]` (and, when
    /// chunked, no last chunk).
    ResetAfter {
        tokens: Vec<String>,
        delay: Duration,
    },
    /// 200 event stream: the tokens (no delay), then silence on an open
    /// socket until the client goes away (a disconnect is recorded) or 60 s
    /// pass.
    StallAfter { tokens: Vec<String> },
    /// `status` with this JSON body, not streamed (for non-streaming calls,
    /// e.g. tool selection).
    Json { status: u16, body: Value },
    /// 200 event stream of arbitrary scripted chunks, for what a plain
    /// [`Reply::Stream`] cannot say: tool calls, content mixed with them,
    /// malformed calls. Each value in `events` is either a `delta` object,
    /// sent as `{"id":"chatcmpl-test","object":"chat.completion.chunk",
    /// "choices":[{"index":0,"delta":VALUE,"finish_reason":null}]}`, or,
    /// when it has a `choices` key, a whole chunk sent exactly as given.
    /// `delay` comes before each event; then a chunk with an empty delta
    /// and `"finish_reason": finish`, then `data: [DONE]\n\n`, then the end
    /// of the response as for [`Reply::Stream`].
    /// Build the events with [`Script`].
    Events {
        events: Vec<Value>,
        delay: Duration,
        finish: &'static str,
    },
}

impl Reply {
    /// What a request gets when no reply is queued: the 4 tokens
    /// `["Hello", " from", " up", "stream"]`, no delay, finish `stop`,
    /// usage 10 prompt + 4 completion tokens.
    pub fn default_stream() -> Reply {
        Reply::Stream {
            tokens: ["Hello", " from", " up", "stream"]
                .iter()
                .map(|t| (*t).to_owned())
                .collect(),
            delay: Duration::ZERO,
            finish: "stop",
            usage: Some((10, 4)),
        }
    }
}

/// A request the server received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The request target as sent, query string included.
    pub path: String,
    /// Header names lower-cased, in the order they were sent.
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON (Null when not JSON).
    pub body: Value,
    /// When the request head arrived.
    pub at: Instant,
}

impl Recorded {
    /// The first header called `name` (give it lower-cased).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A running fake upstream; it stops accepting when dropped.
pub struct Upstream {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl Upstream {
    /// Listens on 127.0.0.1:0; one thread accepts, one thread per
    /// connection; one request per connection ([`Connections::Close`]).
    pub fn start() -> Upstream {
        Upstream::start_with(Connections::Close)
    }

    /// Like [`Upstream::start`], treating connections as `connections` says.
    pub fn start_with(connections: Connections) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the upstream");
        let addr = listener.local_addr().expect("upstream address");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stopped: AtomicBool::new(false),
            connections,
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("upstream-accept".into())
                .spawn(move || serve::accept_loop(listener, shared))
                .expect("spawn the upstream accept thread")
        };
        Upstream {
            shared,
            addr,
            acceptor: Some(acceptor),
        }
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/v1`, what an OpenAI client takes as base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Queues a reply for a later request; without one a request gets
    /// [`Reply::default_stream`].
    pub fn push(&self, reply: Reply) {
        self.shared.lock().replies.push_back(reply);
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// How many responses the client abandoned before the server finished
    /// sending them (a write failed, or, while stalled, a read returned 0
    /// or an error).
    pub fn disconnects(&self) -> usize {
        self.shared.lock().disconnects
    }

    /// Waits until `disconnects() >= n` or `timeout` passes; returns whether
    /// it happened.
    pub fn wait_disconnects(&self, n: usize, timeout: Duration) -> bool {
        self.shared.wait_until(timeout, |s| s.disconnects >= n)
    }

    /// Waits until `requests().len() >= n` or `timeout` passes; returns
    /// whether it happened.
    pub fn wait_requests(&self, n: usize, timeout: Duration) -> bool {
        self.shared.wait_until(timeout, |s| s.requests.len() >= n)
    }

    /// How many TCP connections the server has accepted so far, whether or
    /// not a request came on them.
    pub fn connections(&self) -> usize {
        self.shared.lock().connections
    }

    /// Holds every response, before its first byte, until [`release`]:
    /// requests are still read and recorded (and take their replies in
    /// order), so a test can wait for what the client does meanwhile, such
    /// as identical requests joining one call, instead of racing it.
    ///
    /// [`release`]: Upstream::release
    pub fn hold(&self) {
        self.shared.lock().held = true;
    }

    /// Lets every held response, and those after it, go out.
    pub fn release(&self) {
        self.shared.lock().held = false;
        self.shared.changed.notify_all();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        // `accept` has no timeout: a connection of our own wakes it up to
        // see the flag. Join only when that worked, so a drop never hangs.
        // Connection threads notice the flag within `POLL` and end without
        // counting a disconnect.
        if TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok() {
            if let Some(acceptor) = self.acceptor.take() {
                let _ = acceptor.join();
            }
        }
    }
}

/// State shared by the handle and the server threads.
struct Shared {
    state: Mutex<State>,
    /// Notified whenever a request is recorded or a disconnect counted.
    changed: Condvar,
    stopped: AtomicBool,
    /// Fixed when the server starts.
    connections: Connections,
}

#[derive(Default)]
struct State {
    replies: VecDeque<Reply>,
    requests: Vec<Recorded>,
    disconnects: usize,
    /// TCP connections accepted.
    connections: usize,
    /// Responses wait until this is false again ([`Upstream::hold`]).
    held: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock must not hide what the
        // server saw from the assertions still to run.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Records `request` and takes its reply under one lock, so replies are
    /// handed out in the order requests are recorded.
    fn record(&self, request: Recorded) -> Reply {
        let mut state = self.lock();
        state.requests.push(request);
        let reply = state
            .replies
            .pop_front()
            .unwrap_or_else(Reply::default_stream);
        drop(state);
        self.changed.notify_all();
        reply
    }

    fn count_disconnect(&self) {
        self.lock().disconnects += 1;
        self.changed.notify_all();
    }

    fn count_connection(&self) {
        self.lock().connections += 1;
        self.changed.notify_all();
    }

    /// Waits while responses are held; false when the server stopped
    /// first.
    fn wait_released(&self) -> bool {
        let mut state = self.lock();
        while state.held {
            if self.is_stopped() {
                return false;
            }
            state = match self.changed.wait_timeout(state, POLL) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        !self.is_stopped()
    }

    fn wait_until(&self, timeout: Duration, done: impl Fn(&State) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if done(&state) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = match self.changed.wait_timeout(state, deadline - now) {
                Ok((state, _)) => state,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}
