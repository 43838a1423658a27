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

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest request head accepted; anything longer is answered with a 400.
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body accepted; chat prompts in tests are far smaller.
const MAX_BODY: usize = 16 << 20;
/// How long a client may take to send its request (and a send may block),
/// so a misbehaving client cannot pin a connection thread for ever.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stalled stream stays open when the client never leaves.
const STALL_LIMIT: Duration = Duration::from_secs(60);
/// Granularity of every wait that must notice a client leaving or the
/// server stopping.
const POLL: Duration = Duration::from_millis(20);
/// How long a finished connection waits for the client to close first.
const LINGER: Duration = Duration::from_secs(2);
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

/// One tool call as a model streams it: [`Script::call`] and
/// [`Script::calls`] send its head (`index`, `id`, `type`, `name` and
/// empty `arguments`) and then its `arguments` in pieces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptedCall {
    /// The position OpenAI's deltas use to say which call a piece belongs
    /// to. A well-behaved model numbers its calls 0, 1, 2, …; tests of
    /// hostile upstreams give gaps and repeats.
    pub index: u64,
    pub id: String,
    pub name: String,
    /// The whole arguments text; it need not be JSON.
    pub arguments: String,
}

impl ScriptedCall {
    pub fn new(index: u64, id: &str, name: &str, arguments: &str) -> ScriptedCall {
        ScriptedCall {
            index,
            id: id.to_owned(),
            name: name.to_owned(),
            arguments: arguments.to_owned(),
        }
    }

    /// The delta that starts the call: everything but the arguments.
    fn head(&self) -> Value {
        Script::call_head_delta(self.index, &self.id, &self.name, "")
    }

    /// The arguments in pieces of `piece_bytes` bytes (at least 1), each
    /// cut at a character boundary, so a piece holding a multi-byte
    /// character is that much longer. Empty arguments are no piece at all.
    fn pieces(&self, piece_bytes: usize) -> Vec<Value> {
        split(&self.arguments, piece_bytes)
            .into_iter()
            .map(|piece| Script::arguments_delta(self.index, piece))
            .collect()
    }
}

/// Splits `text` into pieces of at least `size` bytes (1 if 0), cut only
/// at character boundaries.
fn split(text: &str, size: usize) -> Vec<&str> {
    let size = size.max(1);
    let mut pieces = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + size).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        pieces.push(&text[start..end]);
        start = end;
    }
    pieces
}

/// Builds the events of a [`Reply::Events`] stream in the order a model
/// would stream them: content tokens and tool calls, in OpenAI's
/// `choices[0].delta` format. The builder says nothing about whether the
/// result is well formed, so tests can script broken upstreams too.
///
/// ```ignore
/// let reply = Script::new()
///     .content("Let me check. ")
///     .call(&ScriptedCall::new(0, "call_1", "calculator", r#"{"expression":"2+3*4"}"#), 1)
///     .reply("tool_calls");
/// ```
#[derive(Debug, Clone, Default)]
pub struct Script {
    events: Vec<Value>,
}

impl Script {
    pub fn new() -> Script {
        Script::default()
    }

    /// One content token: `{"content": text}`.
    pub fn content(mut self, text: &str) -> Script {
        self.events.push(json!({"content": text}));
        self
    }

    /// One content token per item.
    pub fn contents(self, texts: &[&str]) -> Script {
        texts.iter().fold(self, |script, text| script.content(text))
    }

    /// One call: its head, then its arguments in pieces of `piece_bytes`.
    pub fn call(self, call: &ScriptedCall, piece_bytes: usize) -> Script {
        self.calls(std::slice::from_ref(call), piece_bytes)
    }

    /// Several calls streamed at once, as parallel calls may be: every
    /// head first, in order, then the arguments round-robin, piece `k` of
    /// each call before piece `k + 1` of any (so with more than one call
    /// the pieces interleave).
    pub fn calls(mut self, calls: &[ScriptedCall], piece_bytes: usize) -> Script {
        self.events.extend(calls.iter().map(ScriptedCall::head));
        let pieces: Vec<Vec<Value>> = calls.iter().map(|c| c.pieces(piece_bytes)).collect();
        let rounds = pieces.iter().map(Vec::len).max().unwrap_or(0);
        for k in 0..rounds {
            self.events
                .extend(pieces.iter().filter_map(|p| p.get(k)).cloned());
        }
        self
    }

    /// The head of a call on its own, with `arguments` as its first piece
    /// (OpenAI sends `""`; some servers send everything at once).
    pub fn call_head(mut self, index: u64, id: &str, name: &str, arguments: &str) -> Script {
        self.events
            .push(Script::call_head_delta(index, id, name, arguments));
        self
    }

    /// A piece of the arguments of the call at `index`.
    pub fn arguments(mut self, index: u64, piece: &str) -> Script {
        self.events.push(Script::arguments_delta(index, piece));
        self
    }

    /// Any delta object, or any whole chunk (a value with `choices`).
    pub fn raw(mut self, event: Value) -> Script {
        self.events.push(event);
        self
    }

    /// The events so far.
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    /// The stream, with no delay between events.
    pub fn reply(self, finish: &'static str) -> Reply {
        self.reply_with_delay(finish, Duration::ZERO)
    }

    /// The stream, `delay` before each event.
    pub fn reply_with_delay(self, finish: &'static str, delay: Duration) -> Reply {
        Reply::Events {
            events: self.events,
            delay,
            finish,
        }
    }

    fn call_head_delta(index: u64, id: &str, name: &str, arguments: &str) -> Value {
        json!({"tool_calls": [{
            "index": index,
            "id": id,
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }]})
    }

    fn arguments_delta(index: u64, piece: &str) -> Value {
        json!({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
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
                .spawn(move || accept_loop(listener, shared))
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

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.is_stopped() {
            return;
        }
        match accepted {
            Ok((stream, _)) => {
                shared.count_connection();
                let shared = Arc::clone(&shared);
                // When no thread can be spawned the closure, and with it the
                // socket, is dropped: the client sees the connection close.
                let _ = std::thread::Builder::new()
                    .name("upstream-conn".into())
                    .spawn(move || serve(stream, &shared));
            }
            // E.g. out of file descriptors: transient, try again shortly.
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

/// How a response ended when it did not complete.
enum End {
    /// The client went away before the response was fully sent.
    Abandoned,
    /// The [`Upstream`] was dropped; nobody is counting any more.
    Stopped,
}

/// Why no request could be read.
enum BadRequest {
    /// The client closed, reset or timed out: nobody to answer.
    Gone,
    /// The bytes are not an HTTP/1.x request; answered with a 400.
    Malformed(&'static str),
}

impl From<io::Error> for BadRequest {
    fn from(_: io::Error) -> Self {
        BadRequest::Gone
    }
}

/// One connection: a request, its response, then whatever
/// [`Connections`] says (close, or the next request on it).
fn serve(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
    };
    loop {
        let request = match read_request(&mut conn) {
            Ok(request) => request,
            Err(BadRequest::Gone) => return,
            Err(BadRequest::Malformed(why)) => {
                // Whatever the mode: after bytes that are not HTTP there is
                // no telling where a next request would start.
                let body = json!({"error": {"message": why, "type": "bad_request"}}).to_string();
                let head = head(
                    400,
                    "application/json",
                    Framing::Length(body.len()),
                    "",
                    true,
                );
                if send(&mut conn.stream, format!("{head}{body}").as_bytes()).is_ok() {
                    close_gracefully(&mut conn.stream, shared);
                }
                return;
            }
        };
        let last = request
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let reply = shared.record(request);
        let mut out = Out {
            stream: &mut conn.stream,
            shared,
        };
        match respond(&mut out, reply) {
            Ok(Sent::Whole) => {}
            // The reply itself ends the connection: drop the socket.
            Ok(Sent::Cut) | Err(End::Stopped) => return,
            Err(End::Abandoned) => {
                shared.count_disconnect();
                return;
            }
        }
        match shared.connections {
            Connections::Close => {
                close_gracefully(&mut conn.stream, shared);
                return;
            }
            Connections::KeepAlive if last => {
                close_gracefully(&mut conn.stream, shared);
                return;
            }
            Connections::KeepAlive => {
                if !next_request_arrives(&mut conn, shared) {
                    return;
                }
            }
            // Returning drops (closes) the socket; the client has sent
            // nothing since its request, so the close is a plain FIN.
            Connections::CloseAfterResponse => return,
            Connections::CloseOnNextRequest => {
                // Whether a request came, the client closed or the wait
                // ran out, the socket is closed unread: with a request in
                // it, the close is a reset.
                let _ = next_request_arrives(&mut conn, shared);
                return;
            }
        }
    }
}

/// Waits on a kept connection until the client's next request starts
/// arriving (true), or the client closes, the server stops or
/// [`KEPT_WAIT`] passes (false). Reads nothing: the request stays for
/// [`read_request`].
fn next_request_arrives(conn: &mut Conn, shared: &Shared) -> bool {
    if !conn.buf.is_empty() {
        return true;
    }
    if conn.stream.set_read_timeout(Some(POLL)).is_err() {
        return false;
    }
    let deadline = Instant::now() + KEPT_WAIT;
    let mut probe = [0u8; 1];
    let arrived = loop {
        if shared.is_stopped() || Instant::now() >= deadline {
            break false;
        }
        match conn.stream.peek(&mut probe) {
            Ok(0) => break false,
            Ok(_) => break true,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => break false,
        }
    };
    arrived && conn.stream.set_read_timeout(Some(IO_TIMEOUT)).is_ok()
}

/// How a response went out.
enum Sent {
    /// Complete: the connection may carry another request.
    Whole,
    /// Cut short on purpose (a reset or a stall): the connection ends.
    Cut,
}

/// Writes one response in the framing the server's [`Connections`] mode
/// calls for.
struct Out<'a> {
    stream: &'a mut TcpStream,
    shared: &'a Shared,
}

impl Out<'_> {
    /// Whether event streams are chunked (and responses keep the
    /// connection) rather than read to the close.
    fn chunked(&self) -> bool {
        !self.shared.connections.closes()
    }

    /// The head of a 200 event stream.
    fn open_stream(&mut self) -> Result<(), End> {
        let framing = if self.chunked() {
            Framing::Chunked
        } else {
            Framing::ToClose
        };
        let close = !self.chunked();
        send(
            self.stream,
            head(200, "text/event-stream", framing, "", close).as_bytes(),
        )
    }

    /// One server-sent event carrying `value`; in a chunked stream, in a
    /// chunk of its own.
    fn event(&mut self, value: &Value) -> Result<(), End> {
        self.data(format!("data: {value}\n\n").as_bytes())
    }

    /// Stream bytes, as one chunk when chunked.
    fn data(&mut self, bytes: &[u8]) -> Result<(), End> {
        if self.chunked() {
            let mut framed = format!("{:x}\r\n", bytes.len()).into_bytes();
            framed.extend_from_slice(bytes);
            framed.extend_from_slice(b"\r\n");
            send(self.stream, &framed)
        } else {
            send(self.stream, bytes)
        }
    }

    /// The end of a complete stream: the last chunk when chunked (a stream
    /// read to the close ends with the close).
    fn close_stream(&mut self) -> Result<(), End> {
        if self.chunked() {
            send(self.stream, b"0\r\n\r\n")
        } else {
            Ok(())
        }
    }

    /// A whole response with a `Content-Length`.
    fn whole(
        &mut self,
        status: u16,
        content_type: &str,
        body: &str,
        extra: &str,
    ) -> Result<(), End> {
        let close = !self.chunked();
        let head = head(
            status,
            content_type,
            Framing::Length(body.len()),
            extra,
            close,
        );
        send(self.stream, format!("{head}{body}").as_bytes())
    }

    /// One content chunk per token, each after `delay`.
    fn tokens(&mut self, tokens: &[String], delay: Duration) -> Result<(), End> {
        for token in tokens {
            pause(delay, self.shared)?;
            self.event(&chunk(json!({"content": token}), Value::Null))?;
        }
        Ok(())
    }
}

fn respond(out: &mut Out<'_>, reply: Reply) -> Result<Sent, End> {
    match reply {
        Reply::Stream {
            tokens,
            delay,
            finish,
            usage,
        } => {
            out.open_stream()?;
            out.tokens(&tokens, delay)?;
            out.event(&chunk(json!({}), json!(finish)))?;
            if let Some((prompt, completion)) = usage {
                let usage = json!({
                    "id": "chatcmpl-test",
                    "object": "chat.completion.chunk",
                    "choices": [],
                    "usage": {
                        "prompt_tokens": prompt,
                        "completion_tokens": completion,
                        "total_tokens": prompt + completion,
                    },
                });
                out.event(&usage)?;
            }
            out.data(b"data: [DONE]\n\n")?;
            out.close_stream()?;
            Ok(Sent::Whole)
        }
        Reply::Error {
            status,
            message,
            retry_after,
        } => {
            let body = json!({"error": {"message": message, "type": "test_error"}}).to_string();
            let extra = retry_after
                .map(|seconds| format!("Retry-After: {seconds}\r\n"))
                .unwrap_or_default();
            out.whole(status, "application/json", &body, &extra)?;
            Ok(Sent::Whole)
        }
        Reply::ResetAfter { tokens, delay } => {
            out.open_stream()?;
            out.tokens(&tokens, delay)?;
            // The connection is dropped mid-stream (no last chunk when
            // chunked). A plain close (FIN) rather than SO_LINGER 0 (std
            // cannot set it): the client still gets every token it was
            // sent, then an end without `[DONE]`.
            Ok(Sent::Cut)
        }
        Reply::StallAfter { tokens } => {
            out.open_stream()?;
            out.tokens(&tokens, Duration::ZERO)?;
            stall(out.stream, out.shared)?;
            Ok(Sent::Cut)
        }
        Reply::Events {
            events,
            delay,
            finish,
        } => {
            out.open_stream()?;
            for value in events {
                pause(delay, out.shared)?;
                let chunk = if value.get("choices").is_some() {
                    value
                } else {
                    chunk(value, Value::Null)
                };
                out.event(&chunk)?;
            }
            out.event(&chunk(json!({}), json!(finish)))?;
            out.data(b"data: [DONE]\n\n")?;
            out.close_stream()?;
            Ok(Sent::Whole)
        }
        Reply::Json { status, body } => {
            out.whole(status, "application/json", &body.to_string(), "")?;
            Ok(Sent::Whole)
        }
    }
}

/// A `chat.completion.chunk` whose only choice carries `delta`.
fn chunk(delta: Value, finish_reason: Value) -> Value {
    json!({
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    })
}

/// Keeps the socket open and silent until the client leaves, the server
/// stops, or [`STALL_LIMIT`] passes.
fn stall(stream: &mut TcpStream, shared: &Shared) -> Result<(), End> {
    // Only a read tells a silent server that the client left: a short read
    // timeout turns the blocking read into a poll.
    stream
        .set_read_timeout(Some(POLL))
        .map_err(|_| End::Abandoned)?;
    let deadline = Instant::now() + STALL_LIMIT;
    let mut scratch = [0u8; 1024];
    while Instant::now() < deadline {
        if shared.is_stopped() {
            return Err(End::Stopped);
        }
        match stream.read(&mut scratch) {
            // End of input. HTTP clients do not half-close while they wait
            // for a response, so this is the client closing the socket.
            Ok(0) => return Err(End::Abandoned),
            // More bytes from the client are not a goodbye.
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return Err(End::Abandoned),
        }
    }
    Ok(())
}

/// Sleeps `delay` in short steps so a dropped [`Upstream`] ends the stream
/// promptly.
fn pause(delay: Duration, shared: &Shared) -> Result<(), End> {
    let deadline = Instant::now() + delay;
    loop {
        if shared.is_stopped() {
            return Err(End::Stopped);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(());
        }
        std::thread::sleep((deadline - now).min(POLL));
    }
}

/// Writes `bytes` at once; any failure (EPIPE, ECONNRESET, a send timeout)
/// means the client is no longer reading.
fn send(stream: &mut TcpStream, bytes: &[u8]) -> Result<(), End> {
    stream
        .write_all(bytes)
        .and_then(|()| stream.flush())
        .map_err(|_| End::Abandoned)
}

/// Ends a complete response: FIN first, then wait (bounded) for the client
/// to close its side. Closing a socket with unread input sends a reset,
/// which may destroy response bytes the client has not read yet; draining
/// first makes the end of every complete response an orderly EOF.
fn close_gracefully(stream: &mut TcpStream, shared: &Shared) {
    if stream.shutdown(Shutdown::Write).is_err() || stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut scratch = [0u8; 1024];
    while Instant::now() < deadline && !shared.is_stopped() {
        match stream.read(&mut scratch) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

/// How the end of a response body is found.
enum Framing {
    /// `Content-Length: N`.
    Length(usize),
    /// `Transfer-Encoding: chunked`, ended by the last (empty) chunk.
    Chunked,
    /// Neither: the body runs until the socket closes.
    ToClose,
}

/// A response head, with `Connection: close` when `close`.
fn head(status: u16, content_type: &str, framing: Framing, extra: &str, close: bool) -> String {
    let mut head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\n",
        reason(status)
    );
    match framing {
        Framing::Length(n) => head.push_str(&format!("Content-Length: {n}\r\n")),
        Framing::Chunked => {
            head.push_str("Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n")
        }
        Framing::ToClose => head.push_str("Cache-Control: no-cache\r\n"),
    }
    head.push_str(extra);
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    head
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        529 => "Overloaded",
        _ => "Unknown",
    }
}

/// Reads one request: the head up to the blank line, then a body framed by
/// `Content-Length` or chunked transfer coding.
fn read_request(conn: &mut Conn) -> Result<Recorded, BadRequest> {
    let raw = conn.take_until(b"\r\n\r\n", MAX_HEAD)?;
    let at = Instant::now();
    let text = String::from_utf8_lossy(&raw[..raw.len() - 4]).into_owned();
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, path) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(method), Some(path), Some(version), None)
            if !method.is_empty() && !path.is_empty() && version.starts_with("HTTP/1.") =>
        {
            (method.to_owned(), path.to_owned())
        }
        _ => return Err(BadRequest::Malformed("bad request line")),
    };
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or(BadRequest::Malformed("header line without a colon"))?;
        if name.is_empty() || name.contains(|c: char| c.is_ascii_whitespace()) {
            return Err(BadRequest::Malformed("bad header name"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    let header = |wanted: &str| {
        headers
            .iter()
            .find(|(name, _)| name == wanted)
            .map(|(_, value)| value.as_str())
    };
    if header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        conn.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let chunked =
        header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        read_chunked(conn)?
    } else if let Some(length) = header("content-length") {
        let length: usize = length
            .parse()
            .map_err(|_| BadRequest::Malformed("bad Content-Length"))?;
        if length > MAX_BODY {
            return Err(BadRequest::Malformed("body too large"));
        }
        conn.take(length)?
    } else {
        Vec::new()
    };
    Ok(Recorded {
        method,
        path,
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        at,
    })
}

/// A chunked request body, decoded; trailers are read and ignored.
fn read_chunked(conn: &mut Conn) -> Result<Vec<u8>, BadRequest> {
    let mut body = Vec::new();
    loop {
        let line = conn.take_until(b"\r\n", 1024)?;
        let line = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
        let size = line.split(';').next().unwrap_or_default().trim();
        let size =
            usize::from_str_radix(size, 16).map_err(|_| BadRequest::Malformed("bad chunk size"))?;
        if size == 0 {
            while conn.take_until(b"\r\n", MAX_HEAD)?.len() > 2 {}
            return Ok(body);
        }
        if body.len() + size > MAX_BODY {
            return Err(BadRequest::Malformed("body too large"));
        }
        body.extend_from_slice(&conn.take(size)?);
        if conn.take(2)? != b"\r\n" {
            return Err(BadRequest::Malformed("chunk without its CRLF"));
        }
    }
}

/// A socket plus the bytes read from it but not consumed yet: the head may
/// arrive together with (part of) the body, or split anywhere.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    /// Reads whatever arrives next into `buf`; end of stream is `Gone`.
    fn fill(&mut self) -> Result<(), BadRequest> {
        let mut chunk = [0u8; 8192];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(BadRequest::Gone),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Err(BadRequest::Gone),
            }
        }
    }

    /// Everything up to and including the first `delim`, at most `limit`
    /// bytes before it.
    fn take_until(&mut self, delim: &[u8], limit: usize) -> Result<Vec<u8>, BadRequest> {
        let mut from = 0;
        loop {
            if let Some(i) = self.buf[from..]
                .windows(delim.len())
                .position(|window| window == delim)
            {
                let end = from + i + delim.len();
                return Ok(self.buf.drain(..end).collect());
            }
            if self.buf.len() > limit {
                return Err(BadRequest::Malformed("request head too long"));
            }
            // The delimiter may straddle what is here and what comes next.
            from = self.buf.len().saturating_sub(delim.len() - 1);
            self.fill()?;
        }
    }

    /// Exactly `n` bytes.
    fn take(&mut self, n: usize) -> Result<Vec<u8>, BadRequest> {
        while self.buf.len() < n {
            self.fill()?;
        }
        Ok(self.buf.drain(..n).collect())
    }
}
