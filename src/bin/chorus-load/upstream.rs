//! `chorus-load upstream`: an OpenAI-compatible model server on loopback,
//! for measuring what chorus costs with a real HTTP upstream instead of
//! the simulated model.
//!
//! `POST …/chat/completions` with `stream: true` gets OpenAI's event
//! stream over HTTP/1.1 chunked encoding, each event in its own chunk and
//! its own `write`: first `{"role":"assistant","content":""}` (together
//! with the response head), then `--tokens` content tokens (" word0",
//! " word1", …), the first `--first-token-ms` after the request and the
//! others `--interval-ms` apart, then an empty delta with
//! `"finish_reason":"stop"`, then the usage when the request asked for it
//! (`stream_options.include_usage`), then `data: [DONE]` and the last
//! chunk. Without `stream: true` the whole text comes as one
//! `chat.completion` when the last token would have been produced (or
//! after `--completion-ms`): a model that answers a non-streamed request
//! generates the same text, it only keeps it to itself until the end.
//!
//! `--no-tools-support` answers a request with a `tools` field with the
//! 500 that llama.cpp's server gives without `--jinja`. `GET /stats` counts
//! the chat completion requests received, those with `tools`, and the TCP
//! connections accepted.
//!
//! Connections stay open across requests unless the client sends
//! `Connection: close`. Request heads over 64 KiB get 431, bodies over
//! 1 MiB 413.
//!
//! One thread serves every connection: non-blocking sockets in one epoll
//! set, and a min-heap of the connections' next send times, whose earliest
//! is the timeout of the wait. A thread per stream sleeping between tokens
//! would cost the two cores chorus is measured on a context switch per
//! token and stream.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::event::{epoll, PollFd, PollFlags, Timespec};
use serde_json::{json, Value};

use crate::Args;

/// Longest request head; a longer one gets 431.
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body; a larger one gets 413.
const MAX_BODY: usize = 1 << 20;
/// Most response bytes that may wait for a client that does not read.
const MAX_UNSENT: usize = 4 << 20;
/// Open connections at most; further ones are closed at once.
const MAX_CONNECTIONS: usize = 10_000;
/// How long a connection that is done waits for the client to close first.
const LINGER: Duration = Duration::from_secs(2);
/// Epoll data of the listening socket; connections count up from 0.
const LISTENER: u64 = u64::MAX;

/// Runs the server until `--seconds` have passed, then returns its counts.
pub fn upstream(args: &Args) -> Result<Value, String> {
    let pace = Pace {
        first_token: Duration::from_secs_f64(args.first_token_ms / 1000.0),
        interval: Duration::from_secs_f64(args.interval_ms / 1000.0),
        completion: Duration::from_secs_f64(
            args.completion_ms.unwrap_or(
                args.first_token_ms + args.interval_ms * args.tokens.saturating_sub(1) as f64,
            ) / 1000.0,
        ),
        tokens: args.tokens,
        tools_support: args.tools_support,
    };
    let until = Instant::now() + Duration::from_secs_f64(args.seconds);
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(args.bind),
        socket2::Type::STREAM,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    socket
        .set_reuse_address(true)
        .and_then(|()| socket.bind(&args.bind.into()))
        .and_then(|()| socket.listen(1024))
        .and_then(|()| socket.set_nonblocking(true))
        .map_err(|e| format!("bind {}: {e}", args.bind))?;
    let listener: TcpListener = socket.into();
    let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| e.to_string())?;
    epoll::add(
        &epoll,
        &listener,
        epoll::EventData::new_u64(LISTENER),
        epoll::EventFlags::IN,
    )
    .map_err(|e| e.to_string())?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!("upstream listening on http://{local}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut server = Server {
        epoll,
        listener,
        conns: HashMap::new(),
        timers: BinaryHeap::new(),
        next_id: 0,
        answers: 0,
        counts: Counts::default(),
        pace,
        scratch: vec![0; 64 * 1024],
    };
    server.run(until)?;
    Ok(server.counts.to_json())
}

/// How answers are paced and what is refused.
struct Pace {
    first_token: Duration,
    interval: Duration,
    completion: Duration,
    tokens: usize,
    tools_support: bool,
}

#[derive(Default)]
struct Counts {
    requests: u64,
    requests_with_tools: u64,
    connections: u64,
}

impl Counts {
    fn to_json(&self) -> Value {
        json!({
            "requests": self.requests,
            "requests_with_tools": self.requests_with_tools,
            "connections": self.connections,
        })
    }
}

/// An answer in progress on a connection.
struct Job {
    started: Instant,
    /// When its timer fires next.
    due: Instant,
    /// `Some(content tokens sent)` for a stream, `None` for a whole
    /// completion.
    streamed: Option<usize>,
    /// The fields every event (or the completion) starts with: `{"id":…,
    /// "object":…,"created":…,"model":…,`.
    head: String,
    include_usage: bool,
    prompt_tokens: usize,
}

struct Conn {
    socket: TcpStream,
    /// Bytes received and not yet consumed as requests.
    input: Vec<u8>,
    /// Bytes of responses the socket did not take yet.
    unsent: Vec<u8>,
    /// Whether the epoll set waits for the socket to be writable.
    wants_out: bool,
    job: Option<Job>,
    /// `100 Continue` was sent for the request being received.
    continued: bool,
    /// The request being answered asked for `Connection: close`.
    close_after: bool,
    /// Close once `unsent` is written.
    closing: bool,
    /// Done: our side is shut down, waiting for the client's close.
    lingering: bool,
    /// A read or write failed or the client left: drop it.
    broken: bool,
}

/// A request head, parsed.
struct Head {
    method: String,
    path: String,
    len: usize,
    content_length: usize,
    keep_alive: bool,
    expect_continue: bool,
}

enum Parsed {
    Partial,
    Bad(u16, &'static str),
    Request(Head),
}

struct Server {
    epoll: rustix::fd::OwnedFd,
    listener: TcpListener,
    conns: HashMap<u64, Conn>,
    /// Next send time of each connection with a job (and linger ends).
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    next_id: u64,
    /// Answers started, for their ids.
    answers: u64,
    counts: Counts,
    pace: Pace,
    scratch: Vec<u8>,
}

impl Server {
    fn run(&mut self, until: Instant) -> Result<(), String> {
        let mut events = Vec::with_capacity(256);
        loop {
            let now = Instant::now();
            self.fire_timers(now);
            if now >= until {
                return Ok(());
            }
            let wake = self
                .timers
                .peek()
                .map_or(until, |Reverse((due, _))| (*due).min(until));
            // ppoll on the epoll descriptor: epoll_wait's timeout is whole
            // milliseconds, which would make every token up to 1 ms late.
            let timeout = Timespec::try_from(wake.saturating_duration_since(Instant::now()))
                .map_err(|e| e.to_string())?;
            let mut fds = [PollFd::new(&self.epoll, PollFlags::IN)];
            match rustix::event::poll(&mut fds, Some(&timeout)) {
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => {}
                Err(e) => return Err(format!("poll: {e}")),
            }
            events.clear();
            let zero = Timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            match epoll::wait(
                &self.epoll,
                rustix::buffer::spare_capacity(&mut events),
                Some(&zero),
            ) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(format!("epoll_wait: {e}")),
            }
            for event in &events {
                let (id, flags) = (event.data.u64(), event.flags);
                if id == LISTENER {
                    self.accept();
                    continue;
                }
                let Some(mut conn) = self.conns.remove(&id) else {
                    continue;
                };
                if flags.contains(epoll::EventFlags::OUT) {
                    flush(&mut conn);
                }
                let readable = epoll::EventFlags::IN
                    | epoll::EventFlags::RDHUP
                    | epoll::EventFlags::HUP
                    | epoll::EventFlags::ERR;
                if flags.intersects(readable) {
                    self.receive(&mut conn);
                    if conn.job.is_none() && !conn.lingering {
                        self.serve(&mut conn, id);
                    }
                }
                self.settle(conn, id);
            }
        }
    }

    /// Accepts every waiting connection.
    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((socket, _)) => {
                    self.counts.connections += 1;
                    if self.conns.len() >= MAX_CONNECTIONS
                        || socket.set_nonblocking(true).is_err()
                        || socket.set_nodelay(true).is_err()
                    {
                        continue;
                    }
                    let id = self.next_id;
                    self.next_id += 1;
                    let interest = epoll::EventFlags::IN | epoll::EventFlags::RDHUP;
                    if epoll::add(
                        &self.epoll,
                        &socket,
                        epoll::EventData::new_u64(id),
                        interest,
                    )
                    .is_ok()
                    {
                        self.conns.insert(id, Conn::new(socket));
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() != ErrorKind::WouldBlock {
                        eprintln!("upstream: accept: {e}");
                    }
                    return;
                }
            }
        }
    }

    /// Reads what the socket holds; notes a client that left.
    fn receive(&mut self, conn: &mut Conn) {
        loop {
            match conn.socket.read(&mut self.scratch) {
                Ok(0) => {
                    conn.broken = true;
                    return;
                }
                Ok(_) if conn.lingering => {}
                Ok(n) => {
                    conn.input.extend_from_slice(&self.scratch[..n]);
                    if conn.input.len() > MAX_HEAD + MAX_BODY {
                        conn.broken = true;
                        return;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    conn.broken = true;
                    return;
                }
            }
        }
    }

    /// Answers the complete requests in `conn.input`, one at a time: stops
    /// at one that starts a job, or that is not complete yet.
    fn serve(&mut self, conn: &mut Conn, id: u64) {
        while conn.job.is_none() && !conn.closing && !conn.broken {
            let head = match parse_head(&conn.input) {
                Parsed::Partial => return,
                Parsed::Bad(status, message) => {
                    conn.close_after = true;
                    conn.closing = true;
                    respond_error(conn, status, message);
                    return;
                }
                Parsed::Request(head) => head,
            };
            if head.content_length > MAX_BODY {
                conn.close_after = true;
                conn.closing = true;
                respond_error(conn, 413, "request body is larger than 1 MiB");
                return;
            }
            let end = head.len + head.content_length;
            if conn.input.len() < end {
                if head.expect_continue && !conn.continued {
                    conn.continued = true;
                    write_out(conn, b"HTTP/1.1 100 Continue\r\n\r\n");
                }
                return;
            }
            conn.continued = false;
            conn.close_after = !head.keep_alive;
            let input = std::mem::take(&mut conn.input);
            self.route(conn, id, &head, &input[head.len..end]);
            conn.input = input;
            conn.input.drain(..end);
            if conn.job.is_none() && conn.close_after {
                conn.closing = true;
            }
        }
    }

    fn route(&mut self, conn: &mut Conn, id: u64, head: &Head, body: &[u8]) {
        let path = head.path.split('?').next().unwrap_or("");
        let chat = path.ends_with("/chat/completions");
        match head.method.as_str() {
            "GET" if path == "/stats" => {
                let body = self.counts.to_json().to_string();
                respond(conn, "200 OK", "application/json", &body);
            }
            "POST" if chat => self.chat(conn, id, body),
            _ if chat || path == "/stats" => respond_error(conn, 405, "method not allowed"),
            _ => respond_error(conn, 404, "not found"),
        }
    }

    /// A chat completion request: refused, or the start of a job.
    fn chat(&mut self, conn: &mut Conn, id: u64, body: &[u8]) {
        self.counts.requests += 1;
        let request = match serde_json::from_slice::<Value>(body) {
            Ok(v) if v.is_object() => v,
            _ => return respond_error(conn, 400, "the body is not a JSON object"),
        };
        if request.get("tools").is_some() {
            self.counts.requests_with_tools += 1;
            if !self.pace.tools_support {
                let body = r#"{"error":{"code":500,"message":"tools param requires --jinja flag","type":"server_error"}}"#;
                return respond(conn, "500 Internal Server Error", "application/json", body);
            }
        }
        let streamed = request["stream"].as_bool() == Some(true);
        let model = request["model"].as_str().unwrap_or("chorus-load-upstream");
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.answers += 1;
        let head = format!(
            r#"{{"id":"chatcmpl-{created:x}{:06x}","object":"{}","created":{created},"model":{},"#,
            self.answers,
            if streamed {
                "chat.completion.chunk"
            } else {
                "chat.completion"
            },
            Value::from(model),
        );
        let started = Instant::now();
        let job = Job {
            started,
            due: started
                + if streamed {
                    self.pace.first_token
                } else {
                    self.pace.completion
                },
            streamed: streamed.then_some(0),
            head,
            include_usage: request
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                == Some(true),
            prompt_tokens: prompt_tokens(&request),
        };
        if streamed {
            let mut out = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\nConnection: {}\r\n\r\n",
                if conn.close_after { "close" } else { "keep-alive" }
            );
            push_event(
                &mut out,
                &job.head,
                r#""choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
            );
            write_out(conn, out.as_bytes());
        }
        self.timers.push(Reverse((job.due, id)));
        conn.job = Some(job);
    }

    /// Runs every timer that is due.
    fn fire_timers(&mut self, now: Instant) {
        while let Some(&Reverse((due, id))) = self.timers.peek() {
            if due > now {
                return;
            }
            self.timers.pop();
            let Some(mut conn) = self.conns.remove(&id) else {
                continue;
            };
            if conn.lingering {
                // The client did not close within LINGER.
                continue;
            }
            if conn.job.as_ref().is_some_and(|j| j.due == due) {
                self.step(&mut conn, id);
            }
            self.settle(conn, id);
        }
    }

    /// The next send of a connection's job.
    fn step(&mut self, conn: &mut Conn, id: u64) {
        let Some(job) = conn.job.as_mut() else {
            return;
        };
        let tokens = self.pace.tokens;
        let usage = |job: &Job| {
            format!(
                r#""usage":{{"prompt_tokens":{},"completion_tokens":{tokens},"total_tokens":{}}}}}"#,
                job.prompt_tokens,
                job.prompt_tokens + tokens
            )
        };
        match job.streamed {
            Some(sent) => {
                if sent < tokens {
                    let mut out = String::with_capacity(256);
                    push_event(
                        &mut out,
                        &job.head,
                        &format!(
                            r#""choices":[{{"index":0,"delta":{{"content":" word{sent}"}},"finish_reason":null}}]}}"#
                        ),
                    );
                    job.streamed = Some(sent + 1);
                    write_out(conn, out.as_bytes());
                    if sent + 1 < tokens {
                        let job = conn.job.as_mut().expect("a job in progress");
                        job.due = job.started
                            + self.pace.first_token
                            + self.pace.interval * (sent + 1) as u32;
                        self.timers.push(Reverse((job.due, id)));
                        return;
                    }
                }
                let job = conn.job.take().expect("a job in progress");
                let mut events = Vec::with_capacity(3);
                let mut out = String::new();
                push_event(
                    &mut out,
                    &job.head,
                    r#""choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
                );
                events.push(std::mem::take(&mut out));
                if job.include_usage {
                    push_event(
                        &mut out,
                        &job.head,
                        &format!(r#""choices":[],{}"#, usage(&job)),
                    );
                    events.push(std::mem::take(&mut out));
                }
                push_chunk(&mut out, "data: [DONE]\n\n");
                out.push_str("0\r\n\r\n");
                events.push(out);
                for event in events {
                    write_out(conn, event.as_bytes());
                }
            }
            None => {
                let job = conn.job.take().expect("a job in progress");
                let text: String = (0..tokens).map(|k| format!(" word{k}")).collect();
                let body = format!(
                    r#"{}"choices":[{{"index":0,"message":{{"role":"assistant","content":{}}},"finish_reason":"stop"}}],{}"#,
                    job.head,
                    Value::from(text),
                    usage(&job)
                );
                respond(conn, "200 OK", "application/json", &body);
            }
        }
        if conn.close_after {
            conn.closing = true;
        } else {
            self.serve(conn, id);
        }
    }

    /// After a connection was handled: drops it, or starts its linger, or
    /// keeps it with the right epoll interest.
    fn settle(&mut self, mut conn: Conn, id: u64) {
        if conn.broken {
            return;
        }
        if conn.closing && conn.unsent.is_empty() && !conn.lingering {
            // Our side is done; a close with unread request bytes would
            // reset the connection under the answer, so wait for the client's.
            let _ = conn.socket.shutdown(Shutdown::Write);
            conn.lingering = true;
            self.timers.push(Reverse((Instant::now() + LINGER, id)));
        }
        let wants_out = !conn.unsent.is_empty();
        if wants_out != conn.wants_out {
            let mut interest = epoll::EventFlags::IN | epoll::EventFlags::RDHUP;
            if wants_out {
                interest |= epoll::EventFlags::OUT;
            }
            if epoll::modify(
                &self.epoll,
                &conn.socket,
                epoll::EventData::new_u64(id),
                interest,
            )
            .is_err()
            {
                return;
            }
            conn.wants_out = wants_out;
        }
        self.conns.insert(id, conn);
    }
}

impl Conn {
    fn new(socket: TcpStream) -> Conn {
        Conn {
            socket,
            input: Vec::new(),
            unsent: Vec::new(),
            wants_out: false,
            job: None,
            continued: false,
            close_after: false,
            closing: false,
            lingering: false,
            broken: false,
        }
    }
}

/// Writes `bytes` now if the socket takes them, else queues the rest.
fn write_out(conn: &mut Conn, bytes: &[u8]) {
    if conn.broken {
        return;
    }
    let mut written = 0;
    while conn.unsent.is_empty() && written < bytes.len() {
        match conn.socket.write(&bytes[written..]) {
            Ok(0) => conn.broken = true,
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(_) => conn.broken = true,
        }
        if conn.broken {
            return;
        }
    }
    conn.unsent.extend_from_slice(&bytes[written..]);
    if conn.unsent.len() > MAX_UNSENT {
        conn.broken = true;
    }
}

/// Writes what is queued, as far as the socket takes it.
fn flush(conn: &mut Conn) {
    while !conn.unsent.is_empty() && !conn.broken {
        match conn.socket.write(&conn.unsent) {
            Ok(0) => conn.broken = true,
            Ok(n) => {
                conn.unsent.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(_) => conn.broken = true,
        }
    }
}

/// A whole response with a `Content-Length`.
fn respond(conn: &mut Conn, status: &str, content_type: &str, body: &str) {
    let connection = if conn.close_after {
        "close"
    } else {
        "keep-alive"
    };
    let out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
        body.len()
    );
    write_out(conn, out.as_bytes());
}

/// An error in OpenAI's shape.
fn respond_error(conn: &mut Conn, status: u16, message: &str) {
    let reason = match status {
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        _ => "Error",
    };
    let body = json!({"error": {
        "code": status,
        "message": message,
        "type": "invalid_request_error",
    }});
    respond(
        conn,
        &format!("{status} {reason}"),
        "application/json",
        &body.to_string(),
    );
}

/// Appends one server-sent event `data: {head}{rest}` as one HTTP chunk.
fn push_event(out: &mut String, head: &str, rest: &str) {
    let len = "data: ".len() + head.len() + rest.len() + "\n\n".len();
    out.push_str(&format!("{len:x}\r\ndata: "));
    out.push_str(head);
    out.push_str(rest);
    out.push_str("\n\n\r\n");
}

/// Appends `data` as one HTTP chunk.
fn push_chunk(out: &mut String, data: &str) {
    out.push_str(&format!("{:x}\r\n{data}\r\n", data.len()));
}

/// The head at the start of `input`, if it is complete.
fn parse_head(input: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(input) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Partial) if input.len() <= MAX_HEAD => return Parsed::Partial,
        Ok(_) | Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Bad(431, "request head is too large")
        }
        Err(_) => return Parsed::Bad(400, "malformed request"),
    };
    let mut head = Head {
        method: request.method.unwrap_or("").to_owned(),
        path: request.path.unwrap_or("").to_owned(),
        len,
        content_length: 0,
        keep_alive: request.version == Some(1),
        expect_continue: false,
    };
    for header in request.headers.iter() {
        let value = String::from_utf8_lossy(header.value);
        let value = value.trim();
        if header.name.eq_ignore_ascii_case("content-length") {
            match value.parse() {
                Ok(n) => head.content_length = n,
                Err(_) => return Parsed::Bad(400, "bad Content-Length"),
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Bad(411, "request bodies need a Content-Length");
        } else if header.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    head.keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    head.keep_alive = true;
                }
            }
        } else if header.name.eq_ignore_ascii_case("expect") {
            head.expect_continue = value.eq_ignore_ascii_case("100-continue");
        }
    }
    Parsed::Request(head)
}

/// A rough prompt size for the usage: the words of every message.
fn prompt_tokens(request: &Value) -> usize {
    let words = |v: &Value| v.as_str().map_or(0, |s| s.split_whitespace().count());
    request["messages"].as_array().map_or(0, |messages| {
        messages
            .iter()
            .map(|m| match &m["content"] {
                Value::Array(parts) => parts.iter().map(|p| words(&p["text"])).sum(),
                content => words(content),
            })
            .sum()
    })
}
